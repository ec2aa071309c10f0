//! Activation quantization for the FP8 compute paths and the form quantized activations take in
//! a [`BackendInput`], which is also what expert parallelism dispatches after quantization
//! (`supports_post_quant_dispatch`): every tensor is indexed by token first, so a strategy moves
//! rows of `hidden` and rows of `scales` together.
//!
//! Wire form: `hidden` u8 `[T, H]` e4m3fn bytes; `scales` f32 `[T, G]` with either `G = 1` (one
//! scale per token: per-token or per-tensor scaling, the tensor scale repeated on every row) or
//! `G = ceil(H / 128)` (one scale per token per 128 channels, DeepSeek-V3). `x = q * scale`.

use crate::backend::BackendInput;
use crate::error::{MoeError, Result};
use crate::quant::checks::amax;
use crate::quant::codec::{e4m3_to_f32, f32_to_e4m3, E4M3_MAX};
use crate::tensor::{DType, HostData, Tensor};

/// Channels per scale in the grouped wire form.
pub const ACT_GROUP: usize = 128;

/// How activations are scaled when quantized to FP8.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActScaling {
    /// One scale per token per 128 channels, `amax / 448` (FP8 block).
    PerTokenGroup,
    /// One scale per token, `amax / 448`.
    PerToken,
    /// One dynamic scale for the whole batch, `amax / 448` (FP8 per-tensor, dynamic).
    PerTensorDynamic,
    /// A fixed calibrated scale (FP8 per-tensor, static `input_scale`); values saturate at 448.
    PerTensorStatic(f32),
}

/// Quantizes `[tokens, hidden]` per token per `group` channels (`group >= hidden`: per token).
pub fn quantize_groups(x: &[f32], tokens: usize, hidden: usize, group: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    if x.len() != tokens * hidden || group == 0 {
        return Err(MoeError::shape(
            "quantize_activations",
            format!("{tokens} x {hidden} values"),
            x.len().to_string(),
        ));
    }
    let g = hidden.div_ceil(group).max(1);
    let mut q = vec![0u8; x.len()];
    let mut s = vec![0.0f32; tokens * g];
    for t in 0..tokens {
        for gi in 0..g {
            let (c0, c1) = (t * hidden + gi * group, t * hidden + ((gi + 1) * group).min(hidden));
            let m = amax(x[c0..c1].iter().copied());
            if !m.is_finite() {
                return Err(MoeError::NonFinite { op: "quantize_activations", detail: format!("token {t} holds {m}") });
            }
            let sc = if m > 0.0 { m / E4M3_MAX } else { 1.0 };
            s[t * g + gi] = sc;
            for c in c0..c1 {
                q[c] = f32_to_e4m3(x[c] / sc);
            }
        }
    }
    Ok((q, s))
}

/// Quantizes `hidden` `[T, H]` (any float dtype, host) into the FP8 wire form.
pub fn quantize_fp8_input(hidden: &Tensor, scaling: ActScaling) -> Result<BackendInput> {
    let t = hidden.dim(0)?;
    let h = hidden.dim(1)?;
    let x = hidden.to_f32_vec()?;
    let (q, s, g) = match scaling {
        ActScaling::PerTokenGroup => {
            let (q, s) = quantize_groups(&x, t, h, ACT_GROUP)?;
            (q, s, h.div_ceil(ACT_GROUP).max(1))
        }
        ActScaling::PerToken => {
            let (q, s) = quantize_groups(&x, t, h, h.max(1))?;
            (q, s, 1)
        }
        ActScaling::PerTensorDynamic | ActScaling::PerTensorStatic(_) => {
            let sc = match scaling {
                ActScaling::PerTensorStatic(sc) => sc,
                _ => {
                    let m = amax(x.iter().copied());
                    if m > 0.0 {
                        m / E4M3_MAX
                    } else {
                        1.0
                    }
                }
            };
            if !(sc.is_finite() && sc > 0.0) {
                return Err(MoeError::quant(
                    "fp8-tensor",
                    format!("activation scale {sc} must be finite and positive"),
                ));
            }
            (x.iter().map(|&v| f32_to_e4m3(v / sc)).collect(), vec![sc; t], 1)
        }
    };
    Ok(BackendInput {
        hidden: Tensor::from_host(vec![t, h], HostData::U8(q))?,
        scales: Some(Tensor::from_f32(vec![t, g], s)?),
    })
}

/// The activations of `input` as f32 `[T * H]`: plain float tensors are converted, FP8 payloads
/// are dequantized with their scales.
pub fn dequantize_input(input: &BackendInput) -> Result<Vec<f32>> {
    let Some(scales) = &input.scales else {
        return input.hidden.to_f32_vec();
    };
    let hidden = input.hidden.to_host()?;
    if hidden.dtype() != DType::U8 {
        return Err(MoeError::DType {
            op: "dequantize_input",
            expected: "u8 (e4m3) payload when scales are present".into(),
            got: hidden.dtype().to_string(),
        });
    }
    let t = hidden.dim(0)?;
    let h = hidden.dim(1)?;
    let scales = scales.to_host()?;
    let s = scales.as_f32()?;
    let g = scales.dim(1)?;
    let group = if g == 1 { h.max(1) } else { ACT_GROUP };
    if scales.dim(0)? != t || (g != 1 && g != h.div_ceil(ACT_GROUP)) {
        return Err(MoeError::shape(
            "dequantize_input",
            format!("scales [{t}, 1] or [{t}, {}]", h.div_ceil(ACT_GROUP)),
            format!("{:?}", scales.shape()),
        ));
    }
    let q = hidden.as_u8()?;
    Ok((0..t * h).map(|i| e4m3_to_f32(q[i]) * s[(i / h) * g + (i % h) / group]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: usize, h: usize) -> Tensor {
        let v: Vec<f32> = (0..t * h).map(|i| ((i * 7919 % 211) as f32 - 105.0) * 0.03 * (1 + i / h) as f32).collect();
        Tensor::from_f32(vec![t, h], v).unwrap()
    }

    #[test]
    fn every_scaling_roundtrips_within_fp8_precision() {
        let x = sample(5, 300);
        for scaling in [
            ActScaling::PerTokenGroup,
            ActScaling::PerToken,
            ActScaling::PerTensorDynamic,
            ActScaling::PerTensorStatic(0.05),
        ] {
            let inp = quantize_fp8_input(&x, scaling).unwrap();
            let g = inp.scales.as_ref().unwrap().shape()[1];
            assert_eq!(g, if scaling == ActScaling::PerTokenGroup { 3 } else { 1 });
            let back = dequantize_input(&inp).unwrap();
            let err = crate::compare::rel_l2(&back, x.as_f32().unwrap());
            assert!(err < 5e-2, "{scaling:?}: {err}");
        }
    }

    #[test]
    fn per_token_group_scale_is_amax_over_448() {
        let x = sample(2, 256);
        let (_, s) = quantize_groups(x.as_f32().unwrap(), 2, 256, 128).unwrap();
        let v = x.as_f32().unwrap();
        let m = v[128..256].iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert_eq!(s[1], m / 448.0);
    }
}
