//! Weights of one MoE block in the canonical in-memory layout every loader produces and every
//! backend consumes:
//! - router `[E, H]` (+ bias `[E]`, + DeepSeek-V3 `e_score_correction_bias` `[E]`), f32;
//! - experts `w13 [E, 2I, H]` (gate rows, then up rows) and `w2 [E, H, I]`, nn.Linear order,
//!   in the config's quant format; optional biases `b13 [E, 2I]`, `b2 [E, H]` in f32;
//! - shared expert `w13 [2Is, H]`, `w2 [H, Is]`, optional gate `[H]`.

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::quant::{quant_method, ExpertTensor};
use crate::tensor::{DType, Tensor};

/// The router linear and routing biases.
#[derive(Debug, Clone)]
pub struct RouterWeights {
    /// `[E, H]`.
    pub weight: Tensor,
    /// `[E]`, GPT-OSS.
    pub bias: Option<Tensor>,
    /// `[E]` f32, DeepSeek-V3 selection bias.
    pub correction_bias: Option<Tensor>,
}

/// Routed experts (or slots): stacked projections plus optional biases.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// `[E, 2I, H]`: gate rows then up rows.
    pub w13: ExpertTensor,
    /// `[E, H, I]`.
    pub w2: ExpertTensor,
    /// `[E, 2I]` f32.
    pub b13: Option<Tensor>,
    /// `[E, H]` f32.
    pub b2: Option<Tensor>,
}

impl ExpertWeights {
    /// Experts (or slots) held.
    pub fn num_experts(&self) -> usize {
        self.w13.experts
    }

    /// A copy holding experts `ids` in order (repeats allowed): weights, scales and biases together.
    pub fn select_experts(&self, ids: &[usize]) -> Result<ExpertWeights> {
        let n = self.num_experts();
        let sel = |b: &Option<Tensor>| b.as_ref().map(|t| crate::quant::select_rows(t, ids, n)).transpose();
        Ok(ExpertWeights {
            w13: self.w13.select_experts(ids)?,
            w2: self.w2.select_experts(ids)?,
            b13: sel(&self.b13)?,
            b2: sel(&self.b2)?,
        })
    }

    /// Overwrites entry `dst` with entry `src` of `from`: both projections with every quant part,
    /// and both biases, so no half of a pair is left stale.
    pub fn copy_expert_from(&mut self, dst: usize, from: &ExpertWeights, src: usize) -> Result<()> {
        let (n, from_n) = (self.num_experts(), from.num_experts());
        self.w13.copy_expert_from(dst, &from.w13, src)?;
        self.w2.copy_expert_from(dst, &from.w2, src)?;
        for (d, f) in [(&mut self.b13, &from.b13), (&mut self.b2, &from.b2)] {
            match (d, f) {
                (Some(d), Some(f)) => crate::quant::copy_row(d, dst, n, f, src, from_n)?,
                (None, None) => {}
                _ => {
                    return Err(MoeError::config(
                        "expert_bias",
                        "migration source and destination disagree about expert biases",
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Copies bias row `src` of `from` (`[n, width]`) into row `slot` of a backend's flat f32 copy
/// `dst`. Both or neither side must have the bias: a half-migrated pair is an error.
pub fn copy_bias_row(
    dst: Option<&mut [f32]>,
    from: Option<&Tensor>,
    slot: usize,
    src: usize,
    width: usize,
) -> Result<()> {
    match (dst, from) {
        (Some(d), Some(f)) => {
            let row = f.narrow_rows(src, 1)?.to_f32_vec()?;
            let out = d.get_mut(slot * width..(slot + 1) * width).ok_or_else(|| {
                MoeError::shape(
                    "copy_bias_row",
                    format!("slot {slot} of width {width}"),
                    format!("{} values", row.len()),
                )
            })?;
            if row.len() != width {
                return Err(MoeError::shape("copy_bias_row", format!("rows of {width}"), format!("{:?}", f.shape())));
            }
            out.copy_from_slice(&row);
            Ok(())
        }
        (None, None) => Ok(()),
        _ => Err(MoeError::config("expert_bias", "migration source and destination disagree about expert biases")),
    }
}

/// The shared expert MLP.
#[derive(Debug, Clone)]
pub struct SharedWeights {
    /// `[2Is, H]`: gate rows then up rows.
    pub w13: Tensor,
    /// `[H, Is]`.
    pub w2: Tensor,
    /// `[H]`: Qwen2-MoE `shared_expert_gate`.
    pub gate: Option<Tensor>,
}

/// Everything one MoE block needs.
#[derive(Debug, Clone)]
pub struct MoeWeights {
    /// Router.
    pub router: RouterWeights,
    /// Routed experts, indexed by logical expert (or by slot once placed).
    pub experts: ExpertWeights,
    /// Shared expert.
    pub shared: Option<SharedWeights>,
}

impl MoeWeights {
    /// Checks every tensor against the config, naming the first that does not fit.
    pub fn validate(&self, cfg: &MoeConfig) -> Result<()> {
        let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size);
        self.router.weight.expect_shape("router.weight", &[e, h])?;
        match (&self.router.bias, cfg.router_bias) {
            (Some(b), true) => b.expect_shape("router.bias", &[e])?,
            (None, false) => {}
            (None, true) => {
                return Err(MoeError::config("router_bias", "config has a router bias but the weights do not"))
            }
            (Some(_), false) => {
                return Err(MoeError::config("router_bias", "weights have a router bias but the config does not"))
            }
        }
        match (&self.router.correction_bias, cfg.routing.uses_correction_bias()) {
            (Some(b), true) => b.expect_shape("router.correction_bias", &[e])?,
            (None, false) | (Some(_), false) => {}
            (None, true) => {
                return Err(MoeError::config("routing", "DeepSeek-V3 routing needs e_score_correction_bias"))
            }
        }
        self.validate_experts(cfg, &self.experts, e)?;
        let _ = (h, i);
        match (&self.shared, cfg.shared_expert) {
            (Some(s), Some(sc)) => {
                let is = sc.intermediate_size;
                s.w13.expect_shape("shared.w13", &[2 * is, h])?;
                s.w2.expect_shape("shared.w2", &[h, is])?;
                match (&s.gate, sc.gated) {
                    (Some(g), true) => g.expect_shape("shared.gate", &[h])?,
                    (None, false) => {}
                    _ => {
                        return Err(MoeError::config(
                            "shared_expert.gated",
                            "config and weights disagree about the shared-expert gate",
                        ))
                    }
                }
            }
            (None, None) => {}
            _ => return Err(MoeError::config("shared_expert", "config and weights disagree about the shared expert")),
        }
        Ok(())
    }

    /// Checks an expert (or slot) stack of `n` entries against the config.
    pub fn validate_experts(&self, cfg: &MoeConfig, x: &ExpertWeights, n: usize) -> Result<()> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let method = quant_method(cfg.quant, cfg.weight_dtype)?;
        for (name, t, rows, cols) in [("experts.w13", &x.w13, 2 * i, h), ("experts.w2", &x.w2, h, i)] {
            if t.format != cfg.quant || t.experts != n || t.rows != rows || t.cols != cols {
                return Err(MoeError::shape(
                    "MoeWeights::validate",
                    format!("{name} {} [{n}, {rows}, {cols}]", cfg.quant),
                    format!("{} [{}, {}, {}]", t.format, t.experts, t.rows, t.cols),
                ));
            }
            method.validate(t)?;
        }
        match (&x.b13, &x.b2, cfg.expert_bias) {
            (Some(b13), Some(b2), true) => {
                b13.expect_shape("experts.b13", &[n, 2 * i])?;
                b2.expect_shape("experts.b2", &[n, h])?;
            }
            (None, None, false) => {}
            _ => {
                return Err(MoeError::config(
                    "expert_bias",
                    "config and weights disagree about expert biases (both b13 and b2 are needed)",
                ))
            }
        }
        Ok(())
    }

    /// Deterministic random weights for `cfg` (scaled like a trained model: std ~ 1/sqrt(fan_in)).
    pub fn random(cfg: &MoeConfig, seed: u64) -> Result<MoeWeights> {
        cfg.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size);
        let mut normal = |n: usize, std: f32| -> Vec<f32> {
            let d = Normal::new(0.0f32, std).expect("std is positive and finite");
            (0..n).map(|_| d.sample(&mut rng)).collect()
        };
        let hs = 1.0 / (h as f32).sqrt();
        let is = 1.0 / (i as f32).sqrt();
        let router = RouterWeights {
            weight: Tensor::from_f32(vec![e, h], normal(e * h, hs))?,
            bias: if cfg.router_bias { Some(Tensor::from_f32(vec![e], normal(e, 0.1))?) } else { None },
            correction_bias: if cfg.routing.uses_correction_bias() {
                Some(Tensor::from_f32(vec![e], normal(e, 0.05))?)
            } else {
                None
            },
        };
        let method = quant_method(cfg.quant, cfg.weight_dtype)?;
        let w13 = method.quantize(&normal(e * 2 * i * h, hs), e, 2 * i, h)?;
        let w2 = method.quantize(&normal(e * h * i, is), e, h, i)?;
        let (b13, b2) = if cfg.expert_bias {
            (
                Some(Tensor::from_f32(vec![e, 2 * i], normal(e * 2 * i, 0.05))?),
                Some(Tensor::from_f32(vec![e, h], normal(e * h, 0.05))?),
            )
        } else {
            (None, None)
        };
        let shared = match cfg.shared_expert {
            Some(sc) => {
                let si = sc.intermediate_size;
                let wd = cfg.weight_dtype;
                Some(SharedWeights {
                    w13: Tensor::from_f32_as(vec![2 * si, h], &normal(2 * si * h, hs), wd)?,
                    w2: Tensor::from_f32_as(vec![h, si], &normal(h * si, 1.0 / (si as f32).sqrt()), wd)?,
                    gate: if sc.gated { Some(Tensor::from_f32(vec![h], normal(h, hs))?) } else { None },
                })
            }
            None => None,
        };
        Ok(MoeWeights { router, experts: ExpertWeights { w13, w2, b13, b2 }, shared })
    }
}

/// Deterministic random activations `[tokens, hidden]` in `dtype` (standard normal).
pub fn random_hidden(tokens: usize, hidden: usize, dtype: DType, seed: u64) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15);
    let v: Vec<f32> = (0..tokens * hidden).map(|_| rng.gen::<f32>() * 2.0 - 1.0).map(|x| x * 1.7).collect();
    Tensor::from_f32_as(vec![tokens, hidden], &v, dtype)
}
