//! `config.json` of a Hugging Face model -> the family, its MoE hyper-parameters, and which
//! layers are MoE layers. Key names and defaults follow the transformers config classes (and the
//! keys released checkpoints actually use, e.g. `num_experts` vs `num_local_experts`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{Activation, GroupMaskValue, MoeConfig, RoutingConfig, SharedExpertConfig, V2TopkMethod};
use crate::error::{MoeError, Result};
use crate::tensor::DType;

/// A supported model family (from `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `mixtral`.
    Mixtral,
    /// `qwen2_moe`.
    Qwen2Moe,
    /// `qwen3_moe`.
    Qwen3Moe,
    /// `olmoe`.
    Olmoe,
    /// `deepseek_v2`.
    DeepseekV2,
    /// `deepseek_v3`.
    DeepseekV3,
    /// `gpt_oss`.
    GptOss,
    /// `llama4_text`, or `llama4` with a `text_config`.
    Llama4,
}

impl Family {
    /// Every supported `model_type` with its family.
    pub const MODEL_TYPES: [(&'static str, Family); 9] = [
        ("mixtral", Family::Mixtral),
        ("qwen2_moe", Family::Qwen2Moe),
        ("qwen3_moe", Family::Qwen3Moe),
        ("olmoe", Family::Olmoe),
        ("deepseek_v2", Family::DeepseekV2),
        ("deepseek_v3", Family::DeepseekV3),
        ("gpt_oss", Family::GptOss),
        ("llama4_text", Family::Llama4),
        ("llama4", Family::Llama4),
    ];

    /// The canonical `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Olmoe => "olmoe",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
            Family::GptOss => "gpt_oss",
            Family::Llama4 => "llama4_text",
        }
    }
}

/// Which layers of the model are MoE layers.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerRule {
    /// Every layer (Mixtral, OLMoE, GPT-OSS).
    All,
    /// Qwen: not in `mlp_only_layers` and `(layer + 1) % decoder_sparse_step == 0`.
    Qwen {
        /// `decoder_sparse_step`.
        sparse_step: usize,
        /// `mlp_only_layers`.
        mlp_only: Vec<usize>,
    },
    /// DeepSeek: `layer >= first_k_dense_replace` and `layer % moe_layer_freq == 0`.
    Deepseek {
        /// `first_k_dense_replace`.
        first_k_dense: usize,
        /// `moe_layer_freq`.
        freq: usize,
    },
    /// Llama-4: `moe_layers`, or every `interleave_moe_layer_step`-th layer.
    List(Vec<usize>),
}

/// Everything the loader needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The family.
    pub family: Family,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// A block config in f32 (the loader sets the dtypes).
    pub block: MoeConfig,
    /// Which layers are MoE layers.
    pub layers: LayerRule,
    /// `dtype` / `torch_dtype`, when given as a float type.
    pub dtype: Option<DType>,
    /// `quantization_config.quant_method`, when present.
    pub quant_method: Option<String>,
}

/// Reads keys of one config object, naming the file and key in errors.
struct Keys<'a> {
    path: &'a Path,
    v: &'a Value,
    family: &'static str,
}

impl Keys<'_> {
    fn err(&self, reason: String) -> MoeError {
        MoeError::checkpoint(self.path.display().to_string(), "-", reason)
    }

    fn get(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter().find_map(|k| self.v.get(*k).filter(|x| !x.is_null()))
    }

    fn usize_opt(&self, keys: &[&str]) -> Result<Option<usize>> {
        match self.get(keys) {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{}` should be a non-negative integer, found {x}", keys[0]))),
        }
    }

    fn usize(&self, keys: &[&str]) -> Result<usize> {
        self.usize_opt(keys)?
            .ok_or_else(|| self.err(format!("missing `{}` (needed for a {} model)", keys.join("` or `"), self.family)))
    }

    fn usize_or(&self, keys: &[&str], d: usize) -> Result<usize> {
        Ok(self.usize_opt(keys)?.unwrap_or(d))
    }

    fn f32_or(&self, key: &str, d: f32) -> Result<f32> {
        match self.get(&[key]) {
            None => Ok(d),
            Some(x) => {
                x.as_f64().map(|f| f as f32).ok_or_else(|| self.err(format!("`{key}` should be a number, found {x}")))
            }
        }
    }

    fn bool_or(&self, key: &str, d: bool) -> Result<bool> {
        match self.get(&[key]) {
            None => Ok(d),
            Some(x) => x.as_bool().ok_or_else(|| self.err(format!("`{key}` should be true or false, found {x}"))),
        }
    }

    fn str_or<'b>(&'b self, key: &str, d: &'b str) -> Result<&'b str> {
        match self.get(&[key]) {
            None => Ok(d),
            Some(x) => x.as_str().ok_or_else(|| self.err(format!("`{key}` should be a string, found {x}"))),
        }
    }

    fn usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.get(&[key]) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` should be a list of layer indices"))),
            Some(x) => Err(self.err(format!("`{key}` should be a list of layer indices, found {x}"))),
        }
    }
}

impl ModelSpec {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelSpec> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| MoeError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(e.kind(), format!("{e} (a model directory needs config.json)")),
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| MoeError::checkpoint(path.display().to_string(), "-", format!("invalid JSON: {e}")))?;
        Self::from_json(&path, &v)
    }

    /// Parses a config object; `path` is only used in error messages.
    pub fn from_json(path: &Path, root: &Value) -> Result<ModelSpec> {
        let cfg_err = |reason: String| MoeError::checkpoint(path.display().to_string(), "-", reason);
        let model_type = root
            .get("model_type")
            .and_then(|m| m.as_str())
            .ok_or_else(|| cfg_err("no `model_type` string in config.json".into()))?;
        let family = Family::MODEL_TYPES.iter().find(|(n, _)| *n == model_type).map(|(_, f)| *f).ok_or_else(|| {
            let names: Vec<_> = Family::MODEL_TYPES.iter().map(|(n, _)| *n).collect();
            cfg_err(format!("unsupported model_type `{model_type}`; supported MoE families: {}", names.join(", ")))
        })?;
        // Multimodal Llama-4 keeps the language model's settings in `text_config`.
        let v = match (model_type, root.get("text_config")) {
            ("llama4", Some(t)) if t.is_object() => t,
            ("llama4", _) => return Err(cfg_err("model_type `llama4` without a `text_config` object".into())),
            _ => root,
        };
        let k = Keys { path, v, family: family.name() };
        let hidden = k.usize(&["hidden_size"])?;
        let num_layers = k.usize(&["num_hidden_layers"])?;
        let experts = k.usize(&["num_local_experts", "num_experts", "n_routed_experts"])?;
        let top_k = k.usize(&["num_experts_per_tok", "experts_per_token"])?;
        let inter = match family {
            Family::Qwen2Moe | Family::Qwen3Moe | Family::DeepseekV2 | Family::DeepseekV3 => {
                k.usize(&["moe_intermediate_size"])?
            }
            _ => k.usize(&["intermediate_size"])?,
        };
        let mut block = MoeConfig::new(experts, top_k, hidden, inter);
        block.activation = match (family, k.str_or("hidden_act", "silu")?) {
            (Family::GptOss, _) => Activation::GptOssSwiglu {
                alpha: k.f32_or("swiglu_alpha", 1.702)?,
                limit: k.f32_or("swiglu_limit", 7.0)?,
            },
            (_, "silu" | "swish") => Activation::Swiglu,
            (_, "gelu_pytorch_tanh" | "gelu_tanh") => Activation::GeluTanhGlu,
            (_, other) => {
                return Err(k.err(format!("unsupported hidden_act `{other}` (supported: silu, gelu_pytorch_tanh)")))
            }
        };
        let deepseek_layers = || -> Result<LayerRule> {
            Ok(LayerRule::Deepseek {
                first_k_dense: k.usize_or(&["first_k_dense_replace"], 0)?,
                freq: k.usize_or(&["moe_layer_freq"], 1)?.max(1),
            })
        };
        let qwen_layers = || -> Result<LayerRule> {
            Ok(LayerRule::Qwen {
                sparse_step: k.usize_or(&["decoder_sparse_step"], 1)?.max(1),
                mlp_only: k.usize_list("mlp_only_layers")?.unwrap_or_default(),
            })
        };
        let layers = match family {
            Family::Mixtral => {
                block.routing = RoutingConfig::SoftmaxTopk { renormalize: true };
                LayerRule::All
            }
            Family::Olmoe => {
                block.routing = RoutingConfig::SoftmaxTopk { renormalize: k.bool_or("norm_topk_prob", false)? };
                LayerRule::All
            }
            Family::Qwen3Moe => {
                block.routing = RoutingConfig::SoftmaxTopk { renormalize: k.bool_or("norm_topk_prob", false)? };
                qwen_layers()?
            }
            Family::Qwen2Moe => {
                block.routing = RoutingConfig::SoftmaxTopk { renormalize: k.bool_or("norm_topk_prob", false)? };
                let si = k.usize_or(&["shared_expert_intermediate_size"], 0)?;
                if si > 0 {
                    block.shared_expert = Some(SharedExpertConfig { intermediate_size: si, gated: true });
                }
                qwen_layers()?
            }
            Family::DeepseekV2 => {
                let scoring = k.str_or("scoring_func", "softmax")?;
                if scoring != "softmax" {
                    return Err(k.err(format!("deepseek_v2 with scoring_func `{scoring}` is not supported (softmax)")));
                }
                let method = match k.str_or("topk_method", "greedy")? {
                    "greedy" => V2TopkMethod::Greedy,
                    "group_limited_greedy" => V2TopkMethod::GroupLimitedGreedy {
                        n_group: k.usize(&["n_group"])?,
                        topk_group: k.usize(&["topk_group"])?,
                    },
                    other => {
                        return Err(k.err(format!(
                            "deepseek_v2 topk_method `{other}` is not supported (greedy, group_limited_greedy)"
                        )))
                    }
                };
                block.routing = RoutingConfig::DeepseekV2 {
                    method,
                    norm_topk_prob: k.bool_or("norm_topk_prob", false)?,
                    routed_scaling_factor: k.f32_or("routed_scaling_factor", 1.0)?,
                };
                block.shared_expert = deepseek_shared(&k, inter)?;
                deepseek_layers()?
            }
            Family::DeepseekV3 => {
                let method = k.str_or("topk_method", "noaux_tc")?;
                let scoring = k.str_or("scoring_func", "sigmoid")?;
                if method != "noaux_tc" || scoring != "sigmoid" {
                    return Err(k.err(format!(
                        "deepseek_v3 with topk_method `{method}` / scoring_func `{scoring}` is not supported \
                         (noaux_tc with sigmoid)"
                    )));
                }
                block.routing = RoutingConfig::DeepseekV3 {
                    n_group: k.usize_or(&["n_group"], 1)?,
                    topk_group: k.usize_or(&["topk_group"], 1)?,
                    norm_topk_prob: k.bool_or("norm_topk_prob", true)?,
                    routed_scaling_factor: k.f32_or("routed_scaling_factor", 2.5)?,
                    // transformers 5.x masks losing groups with -inf (`masked_fill(~mask, -inf)`),
                    // like DeepSeek's reference and vLLM; our golden fixtures come from it.
                    group_mask: GroupMaskValue::NegInf,
                };
                block.shared_expert = deepseek_shared(&k, inter)?;
                deepseek_layers()?
            }
            Family::GptOss => {
                block.routing = RoutingConfig::GptOss;
                block.router_bias = true;
                block.expert_bias = true;
                LayerRule::All
            }
            Family::Llama4 => {
                block.routing = RoutingConfig::Llama4;
                block.shared_expert = Some(SharedExpertConfig { intermediate_size: inter, gated: false });
                LayerRule::List(match k.usize_list("moe_layers")? {
                    Some(l) => l,
                    None => {
                        let step = k.usize_or(&["interleave_moe_layer_step"], 1)?.max(1);
                        (step - 1..num_layers).step_by(step).collect()
                    }
                })
            }
        };
        let dtype = root
            .get("dtype")
            .or_else(|| root.get("torch_dtype"))
            .or_else(|| v.get("torch_dtype"))
            .and_then(|d| d.as_str())
            .and_then(|d| DType::parse_float(d).ok());
        let quant_method = root
            .get("quantization_config")
            .or_else(|| v.get("quantization_config"))
            .map(|q| q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("unknown").to_string());
        block.validate().map_err(|e| cfg_err(format!("config.json describes an invalid MoE block: {e}")))?;
        Ok(ModelSpec { family, num_layers, block, layers, dtype, quant_method })
    }

    /// `Ok` if `layer` is a MoE layer; otherwise [`MoeError::NotMoeLayer`] naming the rule.
    pub fn check_moe_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.num_layers {
            return Err(MoeError::config(
                "layer",
                format!(
                    "layer {layer} does not exist: the model has {} layers (0..{})",
                    self.num_layers, self.num_layers
                ),
            ));
        }
        let dense = |reason: String| Err(MoeError::NotMoeLayer { layer, reason });
        match &self.layers {
            LayerRule::All => Ok(()),
            LayerRule::Qwen { sparse_step, mlp_only } => {
                if mlp_only.contains(&layer) {
                    dense(format!("it is listed in mlp_only_layers {mlp_only:?}"))
                } else if !(layer + 1).is_multiple_of(*sparse_step) {
                    dense(format!("decoder_sparse_step = {sparse_step} makes only layers with (layer + 1) % {sparse_step} == 0 sparse"))
                } else {
                    Ok(())
                }
            }
            LayerRule::Deepseek { first_k_dense, freq } => {
                if layer < *first_k_dense {
                    dense(format!("first_k_dense_replace = {first_k_dense}: layers 0..{first_k_dense} are dense"))
                } else if !layer.is_multiple_of(*freq) {
                    dense(format!("moe_layer_freq = {freq}: only layers divisible by {freq} are MoE"))
                } else {
                    Ok(())
                }
            }
            LayerRule::List(l) => {
                if l.contains(&layer) {
                    Ok(())
                } else {
                    dense(format!("not in moe_layers {l:?} (interleave_moe_layer_step)"))
                }
            }
        }
    }

    /// The MoE layers, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_layers).filter(|&l| self.check_moe_layer(l).is_ok()).collect()
    }
}

fn deepseek_shared(k: &Keys<'_>, inter: usize) -> Result<Option<SharedExpertConfig>> {
    Ok(match k.usize_or(&["n_shared_experts"], 0)? {
        0 => None,
        n => Some(SharedExpertConfig { intermediate_size: n * inter, gated: false }),
    })
}

/// The `config.json` path of a model directory (for messages).
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> Result<ModelSpec> {
        ModelSpec::from_json(Path::new("config.json"), &v)
    }

    #[test]
    fn layer_rules_follow_transformers() {
        let q = spec(serde_json::json!({"model_type": "qwen2_moe", "hidden_size": 8, "num_hidden_layers": 6,
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4, "decoder_sparse_step": 2,
            "mlp_only_layers": [3]}))
        .unwrap();
        assert_eq!(q.moe_layers(), vec![1, 5]);
        assert!(matches!(q.check_moe_layer(3), Err(MoeError::NotMoeLayer { layer: 3, .. })));
        let d = spec(serde_json::json!({"model_type": "deepseek_v3", "hidden_size": 8, "num_hidden_layers": 5,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 4, "n_group": 2,
            "topk_group": 1, "first_k_dense_replace": 3}))
        .unwrap();
        assert_eq!(d.moe_layers(), vec![3, 4]);
        assert!(matches!(d.block.routing, RoutingConfig::DeepseekV3 { group_mask: GroupMaskValue::NegInf, .. }));
        let l = spec(serde_json::json!({"model_type": "llama4", "text_config": {"hidden_size": 8,
            "num_hidden_layers": 4, "num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size": 4,
            "interleave_moe_layer_step": 2}}))
        .unwrap();
        assert_eq!(l.moe_layers(), vec![1, 3]);
        assert!(matches!(l.check_moe_layer(9), Err(MoeError::Config { field: "layer", .. })));
    }

    #[test]
    fn errors_name_the_key() {
        let e = spec(serde_json::json!({"model_type": "bert"})).unwrap_err().to_string();
        assert!(e.contains("unsupported model_type `bert`"), "{e}");
        let e = spec(serde_json::json!({"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 1,
            "num_experts_per_tok": 2, "intermediate_size": 4}))
        .unwrap_err()
        .to_string();
        assert!(e.contains("num_local_experts"), "{e}");
    }
}
