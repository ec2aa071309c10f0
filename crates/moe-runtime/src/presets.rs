//! Model shapes and families: the standard shapes of DESIGN.md and each family's routing,
//! activation and shared-expert semantics, so the CLI, `moe check`, benchmarks and the test
//! matrix describe problems the same way.

use moe_core::config::{Activation, GroupMaskValue, RoutingConfig, SharedExpertConfig, V2TopkMethod};
use moe_core::{DType, MoeConfig, MoeError, Result};

/// Experts, top-k, hidden, intermediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Preset name.
    pub name: &'static str,
    /// Routed experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Expert intermediate size.
    pub intermediate: usize,
}

/// The standard shapes of DESIGN.md plus the embedded default and small test shapes.
pub const SHAPES: &[Shape] = &[
    Shape { name: "mixtral-8x7b", experts: 8, top_k: 2, hidden: 4096, intermediate: 14336 },
    Shape { name: "qwen3-30b-a3b", experts: 128, top_k: 8, hidden: 2048, intermediate: 768 },
    Shape { name: "deepseek-v3", experts: 256, top_k: 8, hidden: 7168, intermediate: 2048 },
    Shape { name: "gpt-oss-20b", experts: 32, top_k: 4, hidden: 2880, intermediate: 2880 },
    // The embedded default: qwen3-30b-a3b proportions with 32 experts (fits any laptop).
    Shape { name: "qwen3-mini", experts: 32, top_k: 8, hidden: 2048, intermediate: 768 },
    Shape { name: "tiny", experts: 8, top_k: 2, hidden: 64, intermediate: 32 },
];

/// The shape `moe run` uses without arguments.
pub const DEFAULT_SHAPE: &str = "qwen3-mini";

/// A shape by name.
pub fn shape(name: &str) -> Result<Shape> {
    SHAPES.iter().copied().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<_> = SHAPES.iter().map(|s| s.name).collect();
        MoeError::config("shape", format!("unknown shape `{name}`; one of {}", names.join(", ")))
    })
}

/// Model families: routing, activation, biases and shared experts as the real models use them.
pub const FAMILIES: &[&str] =
    &["qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "deepseek_v2", "gpt_oss", "llama4"];

/// A block config for `family` at `shape` in `dtype` (weights and activations).
pub fn family_config(family: &str, s: Shape, dtype: DType) -> Result<MoeConfig> {
    let mut c = MoeConfig::new(s.experts, s.top_k, s.hidden, s.intermediate);
    c.weight_dtype = dtype;
    c.act_dtype = dtype;
    let groups = |want: usize| {
        // The largest group count <= want that divides the experts into groups of at least 2.
        (1..=want).rev().find(|g| s.experts.is_multiple_of(*g) && s.experts / g >= 2).unwrap_or(1)
    };
    match family {
        "qwen3_moe" => c.routing = RoutingConfig::SoftmaxTopk { renormalize: true },
        "mixtral" => c.routing = RoutingConfig::SoftmaxTopk { renormalize: true },
        "olmoe" => c.routing = RoutingConfig::SoftmaxTopk { renormalize: false },
        "qwen2_moe" => {
            c.routing = RoutingConfig::SoftmaxTopk { renormalize: false };
            c.shared_expert = Some(SharedExpertConfig { intermediate_size: 2 * s.intermediate, gated: true });
        }
        "deepseek_v3" => {
            let n_group = groups(8);
            let per = s.experts / n_group;
            let topk_group = (n_group / 2).max(1).max(s.top_k.div_ceil(per)).min(n_group);
            c.routing = RoutingConfig::DeepseekV3 {
                n_group,
                topk_group,
                norm_topk_prob: true,
                routed_scaling_factor: 2.5,
                group_mask: GroupMaskValue::NegInf,
            };
            c.shared_expert = Some(SharedExpertConfig { intermediate_size: s.intermediate, gated: false });
        }
        "deepseek_v2" => {
            let n_group = groups(8);
            let per = s.experts / n_group;
            let topk_group = 3.min(n_group).max(s.top_k.div_ceil(per)).min(n_group);
            c.routing = RoutingConfig::DeepseekV2 {
                method: V2TopkMethod::GroupLimitedGreedy { n_group, topk_group },
                norm_topk_prob: false,
                routed_scaling_factor: 16.0,
            };
            c.shared_expert = Some(SharedExpertConfig { intermediate_size: 2 * s.intermediate, gated: false });
        }
        "gpt_oss" => {
            c.routing = RoutingConfig::GptOss;
            c.activation = Activation::GPT_OSS;
            c.router_bias = true;
            c.expert_bias = true;
        }
        "llama4" => {
            c.routing = RoutingConfig::Llama4;
            c.top_k = 1;
            c.shared_expert = Some(SharedExpertConfig { intermediate_size: s.intermediate, gated: false });
        }
        other => {
            return Err(MoeError::config("family", format!("unknown family `{other}`; one of {}", FAMILIES.join(", "))))
        }
    }
    c.validate()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_and_shape_validates() {
        for s in SHAPES {
            for f in FAMILIES {
                family_config(f, *s, DType::BF16).unwrap_or_else(|e| panic!("{f} at {}: {e}", s.name));
            }
        }
    }
}
