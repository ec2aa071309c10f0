//! Where a MoE block's tensors live in a checkpoint, and how each on-disk layout becomes the
//! canonical one (`w13 [E, 2I, H]` gate rows then up rows, `w2 [E, H, I]`, nn.Linear order).
//!
//! | layout | on disk | conversion |
//! |---|---|---|
//! | per-expert | `experts.E.{w1,w3,w2}` or `experts.E.{gate,up,down}_proj` `.weight` | stack |
//! | fused 3D | `experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]` | none |
//! | GPT-OSS | `gate_up_proj [E, H, 2I]` x@W, gate/up interleaved columns, `_bias` | transpose, de-interleave |
//! | Llama-4 | `gate_up_proj [E, H, 2I]` x@W, gate half then up half | transpose |

use crate::checkpoint::hf_config::Family;
use crate::checkpoint::store::TensorStore;
use crate::error::{MoeError, Result};

/// The on-disk layout of the routed experts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertLayout {
    /// One tensor per expert and projection; `{e}` in the patterns is the expert index.
    PerExpert {
        /// Gate projection `[I, H]`.
        gate: String,
        /// Up projection `[I, H]`.
        up: String,
        /// Down projection `[H, I]`.
        down: String,
    },
    /// `gate_up_proj [E, 2I, H]` (gate rows then up rows) and `down_proj [E, H, I]`.
    Fused {
        /// Gate-up tensor name.
        gate_up: String,
        /// Down tensor name.
        down: String,
    },
    /// x@W order `[E, H, 2I]` / `[E, I, H]`; gate/up interleaved (GPT-OSS) or halved (Llama-4).
    Transposed {
        /// Gate-up tensor name.
        gate_up: String,
        /// Down tensor name.
        down: String,
        /// Gate in even columns, up in odd columns (GPT-OSS); otherwise gate half then up half.
        interleaved: bool,
        /// `[E, 2I]` and `[E, H]` biases (GPT-OSS).
        biases: Option<(String, String)>,
    },
}

impl ExpertLayout {
    /// A short description for messages.
    pub fn describe(&self) -> &'static str {
        match self {
            ExpertLayout::PerExpert { .. } => "per-expert tensors",
            ExpertLayout::Fused { .. } => "fused 3D gate_up_proj/down_proj",
            ExpertLayout::Transposed { interleaved: true, .. } => "GPT-OSS x@W, interleaved gate/up",
            ExpertLayout::Transposed { .. } => "Llama-4 x@W, gate half then up half",
        }
    }

    /// The name of expert `e`'s tensor for a per-expert pattern.
    pub fn expert_name(pattern: &str, e: usize) -> String {
        pattern.replace("{e}", &e.to_string())
    }
}

/// The shared expert's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedNames {
    /// `[Is, H]`.
    pub gate: String,
    /// `[Is, H]`.
    pub up: String,
    /// `[H, Is]`.
    pub down: String,
    /// Qwen2-MoE `shared_expert_gate.weight [1, H]`.
    pub gate_weight: Option<String>,
}

/// Every tensor name of one MoE block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// Prefix of the block, e.g. `model.layers.3.mlp.`.
    pub prefix: String,
    /// Router `[E, H]`.
    pub router: String,
    /// Router bias `[E]` (GPT-OSS).
    pub router_bias: Option<String>,
    /// DeepSeek-V3 `e_score_correction_bias [E]`.
    pub correction_bias: Option<String>,
    /// Routed experts.
    pub experts: ExpertLayout,
    /// Shared expert.
    pub shared: Option<SharedNames>,
}

/// Prefixes under which decoder layers are found (text models, multimodal wrappers).
const ROOTS: [&str; 4] = ["model.", "language_model.model.", "model.language_model.", ""];
/// Names of the MLP module in a decoder layer.
const BLOCKS: [&str; 3] = ["mlp.", "block_sparse_moe.", "feed_forward."];

/// Finds the MoE block of `layer` in the checkpoint and names its tensors.
pub fn locate(store: &TensorStore, family: Family, layer: usize) -> Result<BlockLayout> {
    let mut prefix = None;
    'outer: for root in ROOTS {
        for block in BLOCKS {
            let p = format!("{root}layers.{layer}.{block}");
            if store.names().any(|n| n.starts_with(&p) && (n.contains("experts") || n.contains("router"))) {
                prefix = Some(p);
                break 'outer;
            }
        }
    }
    let p = prefix.ok_or_else(|| {
        MoeError::checkpoint(
            store.dir().display().to_string(),
            format!("model.layers.{layer}.mlp.experts.*"),
            "no expert tensors for this layer in the checkpoint (tried the mlp., block_sparse_moe. and \
             feed_forward. blocks under model., language_model.model. and model.language_model.)",
        )
    })?;
    let has = |s: &str| store.contains(&format!("{p}{s}"));
    let name = |s: &str| format!("{p}{s}");
    let router = if has("router.weight") { name("router.weight") } else { name("gate.weight") };
    let experts = match family {
        Family::GptOss => ExpertLayout::Transposed {
            gate_up: name("experts.gate_up_proj"),
            down: name("experts.down_proj"),
            interleaved: true,
            biases: Some((name("experts.gate_up_proj_bias"), name("experts.down_proj_bias"))),
        },
        Family::Llama4 => ExpertLayout::Transposed {
            gate_up: name("experts.gate_up_proj"),
            down: name("experts.down_proj"),
            interleaved: false,
            biases: None,
        },
        _ if has("experts.gate_up_proj") => {
            ExpertLayout::Fused { gate_up: name("experts.gate_up_proj"), down: name("experts.down_proj") }
        }
        _ if has("experts.0.w1.weight") => ExpertLayout::PerExpert {
            gate: name("experts.{e}.w1.weight"),
            up: name("experts.{e}.w3.weight"),
            down: name("experts.{e}.w2.weight"),
        },
        _ => ExpertLayout::PerExpert {
            gate: name("experts.{e}.gate_proj.weight"),
            up: name("experts.{e}.up_proj.weight"),
            down: name("experts.{e}.down_proj.weight"),
        },
    };
    let shared = match family {
        Family::Qwen2Moe => Some(SharedNames {
            gate: name("shared_expert.gate_proj.weight"),
            up: name("shared_expert.up_proj.weight"),
            down: name("shared_expert.down_proj.weight"),
            gate_weight: Some(name("shared_expert_gate.weight")),
        }),
        Family::DeepseekV2 | Family::DeepseekV3 => Some(SharedNames {
            gate: name("shared_experts.gate_proj.weight"),
            up: name("shared_experts.up_proj.weight"),
            down: name("shared_experts.down_proj.weight"),
            gate_weight: None,
        }),
        Family::Llama4 => Some(SharedNames {
            gate: name("shared_expert.gate_proj.weight"),
            up: name("shared_expert.up_proj.weight"),
            down: name("shared_expert.down_proj.weight"),
            gate_weight: None,
        }),
        _ => None,
    };
    Ok(BlockLayout {
        router_bias: (family == Family::GptOss).then(|| name("router.bias")),
        correction_bias: (family == Family::DeepseekV3).then(|| name("gate.e_score_correction_bias")),
        prefix: p.clone(),
        router,
        experts,
        shared,
    })
}

/// Index map turning one expert's x@W gate-up `[H, 2I]` into canonical `[2I, H]` rows:
/// `out[r * h + c] = in[src[r * h + c]]`.
pub fn gate_up_permutation(h: usize, i: usize, interleaved: bool) -> Vec<usize> {
    let mut idx = Vec::with_capacity(2 * i * h);
    for r in 0..2 * i {
        // Canonical row r is gate row r (r < I) or up row r - I.
        let col = match (interleaved, r < i) {
            (true, true) => 2 * r,
            (true, false) => 2 * (r - i) + 1,
            (false, _) => r,
        };
        idx.extend((0..h).map(|c| c * 2 * i + col));
    }
    idx
}

/// Index map of a plain transpose of a row-major `[rows, cols]` matrix into `[cols, rows]`.
pub fn transpose_permutation(rows: usize, cols: usize) -> Vec<usize> {
    let mut idx = Vec::with_capacity(rows * cols);
    for c in 0..cols {
        idx.extend((0..rows).map(|r| r * cols + c));
    }
    idx
}

/// Index map of the GPT-OSS bias `[2I]` (interleaved) into gate then up.
pub fn bias_permutation(i: usize, interleaved: bool) -> Vec<usize> {
    (0..2 * i)
        .map(|r| {
            if !interleaved {
                r
            } else if r < i {
                2 * r
            } else {
                2 * (r - i) + 1
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_match_the_formulas() {
        // x@W gate_up [H=2, 2I=4]: element (c, j) holds 10*c + j.
        let w: Vec<usize> = (0..2).flat_map(|c| (0..4).map(move |j| 10 * c + j)).collect();
        let got: Vec<usize> = gate_up_permutation(2, 2, true).iter().map(|&s| w[s]).collect();
        // gate rows = columns 0, 2; up rows = columns 1, 3; each row runs over c.
        assert_eq!(got, vec![0, 10, 2, 12, 1, 11, 3, 13]);
        let got: Vec<usize> = gate_up_permutation(2, 2, false).iter().map(|&s| w[s]).collect();
        assert_eq!(got, vec![0, 10, 1, 11, 2, 12, 3, 13]);
        assert_eq!(transpose_permutation(2, 3), vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(bias_permutation(2, true), vec![0, 2, 1, 3]);
    }
}
