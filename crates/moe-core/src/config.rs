//! The problem description: one MoE block, its routing, activation, dtypes, quantization,
//! parallel layout and EPLB slots, with validation that names the bad field.

use serde::{Deserialize, Serialize};

use crate::error::{MoeError, Result};
use crate::quant::QuantFormat;
use crate::tensor::DType;

/// The expert MLP's gated activation. Weights are always held as `w13 = [gate; up]` rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Activation {
    /// `silu(gate) * up` (Mixtral, Qwen, DeepSeek, OLMoE, Llama-4).
    Swiglu,
    /// GPT-OSS: `gate = min(gate, limit)`, `up = clamp(up, -limit, limit)`,
    /// `(up + 1) * gate * sigmoid(alpha * gate)`.
    GptOssSwiglu {
        /// Sigmoid slope (1.702 in GPT-OSS).
        alpha: f32,
        /// Clamp limit (7.0 in GPT-OSS).
        limit: f32,
    },
    /// `gelu_tanh(gate) * up`.
    GeluTanhGlu,
}

impl Activation {
    /// GPT-OSS's constants.
    pub const GPT_OSS: Activation = Activation::GptOssSwiglu { alpha: 1.702, limit: 7.0 };

    /// Short name for tables and the CLI.
    pub fn name(&self) -> &'static str {
        match self {
            Activation::Swiglu => "swiglu",
            Activation::GptOssSwiglu { .. } => "gptoss_swiglu",
            Activation::GeluTanhGlu => "gelu_tanh_glu",
        }
    }

    /// Every activation kind with its default constants (for the capability table and tests).
    pub fn all() -> [Activation; 3] {
        [Activation::Swiglu, Activation::GPT_OSS, Activation::GeluTanhGlu]
    }

    /// Applies the activation to one row: `gate` and `up` of equal length, result in `out`.
    pub fn apply(&self, gate: &[f32], up: &[f32], out: &mut [f32]) {
        match *self {
            Activation::Swiglu => {
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = silu(g) * u;
                }
            }
            Activation::GptOssSwiglu { alpha, limit } => {
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    let g = g.min(limit);
                    let u = u.clamp(-limit, limit);
                    *o = (u + 1.0) * g * sigmoid(alpha * g);
                }
            }
            Activation::GeluTanhGlu => {
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = gelu_tanh(g) * u;
                }
            }
        }
    }
}

/// Logistic sigmoid.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// GELU with the tanh approximation.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// How DeepSeek-V3 masks the groups that lose the group top-k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupMaskValue {
    /// Hugging Face transformers 4.x: losing groups' scores become 0.0. Differs from `NegInf`
    /// when a biased score in a winning group is negative (a masked 0.0 then outranks it).
    Zero,
    /// DeepSeek's reference, vLLM, TensorRT-LLM and transformers 5.x (measured against
    /// transformers 5.23 by the golden fixtures): losing groups become -inf. The default.
    #[default]
    NegInf,
}

/// DeepSeek-V2 top-k method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum V2TopkMethod {
    /// Plain top-k over all experts.
    Greedy,
    /// Keep the `topk_group` groups with the highest max score, then top-k among them.
    GroupLimitedGreedy {
        /// Number of expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
    },
}

/// The routing method and its parameters (see DESIGN.md for the exact semantics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoutingConfig {
    /// `softmax -> topk -> (renormalize)`: Mixtral, Qwen2/3-MoE, OLMoE.
    SoftmaxTopk {
        /// Divide the k weights by their sum.
        renormalize: bool,
    },
    /// DeepSeek-V3 `noaux_tc`: sigmoid scores, bias for selection, grouped top-k.
    DeepseekV3 {
        /// Expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Renormalize the selected (unbiased) scores.
        norm_topk_prob: bool,
        /// Final multiplier.
        routed_scaling_factor: f32,
        /// Masking convention for losing groups.
        group_mask: GroupMaskValue,
    },
    /// DeepSeek-V2: softmax scores, greedy or group-limited greedy.
    DeepseekV2 {
        /// Greedy or group-limited.
        method: V2TopkMethod,
        /// Renormalize when `top_k > 1`; otherwise scale.
        norm_topk_prob: bool,
        /// Multiplier used when not renormalizing.
        routed_scaling_factor: f32,
    },
    /// GPT-OSS: `topk(logits)` then softmax over the k values.
    GptOss,
    /// Llama-4: `topk(logits)`, `sigmoid` of the values multiplies the expert's input.
    Llama4,
}

impl RoutingConfig {
    /// Short name for tables and the CLI.
    pub fn name(&self) -> &'static str {
        match self {
            RoutingConfig::SoftmaxTopk { renormalize: true } => "softmax_topk_renorm",
            RoutingConfig::SoftmaxTopk { renormalize: false } => "softmax_topk",
            RoutingConfig::DeepseekV3 { .. } => "deepseek_v3",
            RoutingConfig::DeepseekV2 { method: V2TopkMethod::Greedy, .. } => "deepseek_v2_greedy",
            RoutingConfig::DeepseekV2 { .. } => "deepseek_v2_group_limited",
            RoutingConfig::GptOss => "gpt_oss",
            RoutingConfig::Llama4 => "llama4",
        }
    }

    /// Whether routing needs a per-expert score-correction bias (`e_score_correction_bias`).
    pub fn uses_correction_bias(&self) -> bool {
        matches!(self, RoutingConfig::DeepseekV3 { .. })
    }

    /// Whether the routing weight scales the expert input instead of its output.
    pub fn weights_on_input(&self) -> bool {
        matches!(self, RoutingConfig::Llama4)
    }
}

/// The always-on shared expert(s), run on every token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedExpertConfig {
    /// Intermediate size of the (fused) shared MLP (DeepSeek: `n_shared * moe_intermediate`).
    pub intermediate_size: usize,
    /// Qwen2-MoE: output is multiplied by `sigmoid(x . shared_expert_gate)`.
    pub gated: bool,
}

/// Expert parallel layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelConfig {
    /// Number of expert-parallel ranks.
    pub ep_size: usize,
    /// This rank.
    pub ep_rank: usize,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig { ep_size: 1, ep_rank: 0 }
    }
}

/// One MoE block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Routed (logical) experts.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Model hidden size.
    pub hidden_size: usize,
    /// Per-expert intermediate size.
    pub intermediate_size: usize,
    /// Expert activation.
    pub activation: Activation,
    /// Routing method.
    pub routing: RoutingConfig,
    /// Shared expert, if any.
    pub shared_expert: Option<SharedExpertConfig>,
    /// Experts have biases on gate_up and down (GPT-OSS).
    pub expert_bias: bool,
    /// The router linear has a bias (GPT-OSS).
    pub router_bias: bool,
    /// Storage dtype of unquantized weights.
    pub weight_dtype: DType,
    /// Activation dtype (input and output of the block).
    pub act_dtype: DType,
    /// Quantization of expert weights.
    pub quant: QuantFormat,
    /// Tokens per scheduler chunk; `None` runs all tokens at once.
    pub chunk_size: Option<usize>,
    /// Expert-parallel layout.
    pub parallel: ParallelConfig,
    /// Physical expert slots for EPLB (>= num_experts); `None` means one slot per expert.
    pub eplb_slots: Option<usize>,
}

impl MoeConfig {
    /// A plain softmax-top-k SwiGLU block in f32, a convenient starting point.
    pub fn new(num_experts: usize, top_k: usize, hidden_size: usize, intermediate_size: usize) -> Self {
        MoeConfig {
            num_experts,
            top_k,
            hidden_size,
            intermediate_size,
            activation: Activation::Swiglu,
            routing: RoutingConfig::SoftmaxTopk { renormalize: true },
            shared_expert: None,
            expert_bias: false,
            router_bias: false,
            weight_dtype: DType::F32,
            act_dtype: DType::F32,
            quant: QuantFormat::None,
            chunk_size: None,
            parallel: ParallelConfig::default(),
            eplb_slots: None,
        }
    }

    /// Number of physical expert slots (experts plus redundant replicas).
    pub fn num_slots(&self) -> usize {
        self.eplb_slots.unwrap_or(self.num_experts)
    }

    /// Slots owned by one rank (contiguous blocks; validation ensures even division).
    pub fn slots_per_rank(&self) -> usize {
        self.num_slots() / self.parallel.ep_size.max(1)
    }

    /// The first slot this rank owns.
    pub fn local_slot_start(&self) -> usize {
        self.parallel.ep_rank * self.slots_per_rank()
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let pos = |field: &'static str, v: usize| {
            if v == 0 {
                Err(MoeError::config(field, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        pos("num_experts", self.num_experts)?;
        pos("top_k", self.top_k)?;
        pos("hidden_size", self.hidden_size)?;
        pos("intermediate_size", self.intermediate_size)?;
        if self.top_k > self.num_experts {
            return Err(MoeError::config(
                "top_k",
                format!("top_k = {} exceeds num_experts = {}", self.top_k, self.num_experts),
            ));
        }
        for (field, dt) in [("weight_dtype", self.weight_dtype), ("act_dtype", self.act_dtype)] {
            if !dt.is_float() {
                return Err(MoeError::config(field, format!("{dt} is not a float dtype; use f32, bf16 or f16")));
            }
        }
        match self.routing {
            RoutingConfig::DeepseekV3 { n_group, topk_group, routed_scaling_factor, .. } => {
                self.check_groups(n_group, topk_group, 2)?;
                if !routed_scaling_factor.is_finite() {
                    return Err(MoeError::config("routed_scaling_factor", "must be finite"));
                }
            }
            RoutingConfig::DeepseekV2 { method, routed_scaling_factor, .. } => {
                if let V2TopkMethod::GroupLimitedGreedy { n_group, topk_group } = method {
                    self.check_groups(n_group, topk_group, 1)?;
                }
                if !routed_scaling_factor.is_finite() {
                    return Err(MoeError::config("routed_scaling_factor", "must be finite"));
                }
            }
            _ => {}
        }
        if let Activation::GptOssSwiglu { alpha, limit } = self.activation {
            if !(alpha.is_finite() && limit.is_finite() && limit > 0.0) {
                return Err(MoeError::config("activation", "GPT-OSS alpha and limit must be finite, limit > 0"));
            }
        }
        if let Some(shared) = self.shared_expert {
            pos("shared_expert.intermediate_size", shared.intermediate_size)?;
        }
        if self.chunk_size == Some(0) {
            return Err(MoeError::config("chunk_size", "must be at least 1 (or unset for no chunking)"));
        }
        let ParallelConfig { ep_size, ep_rank } = self.parallel;
        pos("parallel.ep_size", ep_size)?;
        if ep_rank >= ep_size {
            return Err(MoeError::config("parallel.ep_rank", format!("rank {ep_rank} is not below ep_size {ep_size}")));
        }
        let slots = self.num_slots();
        if slots < self.num_experts {
            return Err(MoeError::config(
                "eplb_slots",
                format!("{slots} slots cannot hold {} experts; need at least one slot per expert", self.num_experts),
            ));
        }
        if !slots.is_multiple_of(ep_size) {
            return Err(MoeError::config(
                "parallel.ep_size",
                format!(
                    "{slots} expert slots do not split evenly over {ep_size} ranks; uneven splits are not supported"
                ),
            ));
        }
        self.quant.validate_shape(self.hidden_size, self.intermediate_size)?;
        Ok(())
    }

    fn check_groups(&self, n_group: usize, topk_group: usize, min_group_size: usize) -> Result<()> {
        if n_group == 0 || !self.num_experts.is_multiple_of(n_group) {
            return Err(MoeError::config(
                "n_group",
                format!("n_group = {n_group} must divide num_experts = {}", self.num_experts),
            ));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(MoeError::config("topk_group", format!("topk_group = {topk_group} must be in 1..={n_group}")));
        }
        let group_size = self.num_experts / n_group;
        if group_size < min_group_size {
            return Err(MoeError::config(
                "n_group",
                format!("groups of {group_size} experts are too small; this method needs at least {min_group_size}"),
            ));
        }
        if topk_group * group_size < self.top_k {
            return Err(MoeError::config(
                "topk_group",
                format!("{topk_group} groups of {group_size} experts hold fewer than top_k = {} experts", self.top_k),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let mut c = MoeConfig::new(8, 2, 64, 32);
        c.validate().unwrap();
        c.top_k = 9;
        assert!(matches!(c.validate(), Err(MoeError::Config { field: "top_k", .. })));
        c.top_k = 2;
        c.routing = RoutingConfig::DeepseekV3 {
            n_group: 3,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
            group_mask: GroupMaskValue::Zero,
        };
        assert!(matches!(c.validate(), Err(MoeError::Config { field: "n_group", .. })));
        c.routing = RoutingConfig::GptOss;
        c.parallel = ParallelConfig { ep_size: 3, ep_rank: 0 };
        assert!(matches!(c.validate(), Err(MoeError::Config { field: "parallel.ep_size", .. })));
        c.parallel = ParallelConfig { ep_size: 2, ep_rank: 2 };
        assert!(matches!(c.validate(), Err(MoeError::Config { field: "parallel.ep_rank", .. })));
        c.parallel = ParallelConfig::default();
        c.chunk_size = Some(0);
        assert!(matches!(c.validate(), Err(MoeError::Config { field: "chunk_size", .. })));
    }

    #[test]
    fn activations_match_formulas() {
        let mut out = [0.0f32; 2];
        Activation::GPT_OSS.apply(&[10.0, -1.0], &[-9.0, 0.5], &mut out);
        let g: f32 = 7.0;
        assert!((out[0] - (-7.0 + 1.0) * g * sigmoid(1.702 * g)).abs() < 1e-5);
        assert!((out[1] + 1.5 * sigmoid(-1.702)).abs() < 1e-6);
        Activation::Swiglu.apply(&[1.0], &[2.0], &mut out[..1]);
        assert!((out[0] - 2.0 * silu(1.0)).abs() < 1e-6);
    }
}
