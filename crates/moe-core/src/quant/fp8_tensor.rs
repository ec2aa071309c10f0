//! FP8 per-tensor: float8 e4m3fn weights with one fp32 scale per expert projection,
//! `W = q * weight_scale[e]`; activations scaled per tensor, dynamically (`amax / 448` per batch)
//! or statically (a calibrated `input_scale`).
//!
//! Parts (`[E, rows, cols]` projection):
//! - `weight`: u8 `[E, rows, cols]`, e4m3fn bytes;
//! - `weight_scale`: f32 `[E]`;
//! - `input_scale` (optional): f32 `[E]`, static activation scale per expert. Where present, the
//!   compute path uses the largest over the experts (one activation scale for the whole layer,
//!   as vLLM does), see [`Fp8Tensor::activation_scaling`].
//!
//! Checkpoints scale gate and up separately; fusing them into `w13` requantizes the shard with
//! the smaller scale to the larger one ([`requantize`]), exactly like vLLM's post-load step.

use crate::error::{MoeError, Result};
use crate::quant::activation::ActScaling;
use crate::quant::checks::{amax, check_expert, check_quantize_input, check_scales, err};
use crate::quant::codec::{e4m3_to_f32, f32_to_e4m3, E4M3_MAX};
use crate::quant::fp8_block::check_e4m3_weights;
use crate::quant::{check_parts, ExpertTensor, PartSpec, QuantFormat, QuantMethod};
use crate::tensor::{DType, HostData, Tensor};

/// FP8 with one scale per expert projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fp8Tensor;

const F: QuantFormat = QuantFormat::Fp8Tensor;

impl Fp8Tensor {
    /// The activation scaling for a tensor: static with the largest `input_scale` when the part
    /// is present, dynamic per tensor otherwise.
    pub fn activation_scaling(t: &ExpertTensor) -> Result<ActScaling> {
        match t.parts.get("input_scale") {
            Some(s) => {
                let v = s.as_f32()?;
                check_scales(F, "input_scale", v, s.shape())?;
                let m = v.iter().fold(0.0f32, |m, &x| m.max(x));
                if m <= 0.0 {
                    return Err(err(F, "part `input_scale` is all zero; a static activation scale must be positive"));
                }
                Ok(ActScaling::PerTensorStatic(m))
            }
            None => Ok(ActScaling::PerTensorDynamic),
        }
    }
}

/// Re-encodes e4m3 bytes stored with scale `from` so they dequantize with scale `to >= from`
/// (used when fusing shards that were scaled separately). Returns the new bytes.
pub fn requantize(q: &[u8], from: f32, to: f32) -> Result<Vec<u8>> {
    if !(from.is_finite() && to.is_finite() && from >= 0.0 && to > 0.0) {
        return Err(err(F, format!("cannot requantize from scale {from} to scale {to}")));
    }
    Ok(q.iter().map(|&b| f32_to_e4m3(e4m3_to_f32(b) * from / to)).collect())
}

impl QuantMethod for Fp8Tensor {
    fn format(&self) -> QuantFormat {
        F
    }

    fn part_specs(&self, experts: usize, rows: usize, cols: usize) -> Result<Vec<PartSpec>> {
        Ok(vec![
            PartSpec { name: "weight", dtype: DType::U8, shape: vec![experts, rows, cols] },
            PartSpec { name: "weight_scale", dtype: DType::F32, shape: vec![experts] },
        ])
    }

    fn validate(&self, t: &ExpertTensor) -> Result<()> {
        self.check_layout(t)?;
        let s = t.part("weight_scale")?;
        check_scales(F, "weight_scale", s.as_f32()?, s.shape())?;
        if t.parts.contains_key("input_scale") {
            Fp8Tensor::activation_scaling(t)?;
        }
        let w = t.part("weight")?;
        check_e4m3_weights(F, "weight", w.as_u8()?, w.shape())
    }

    fn dequantize_expert(&self, t: &ExpertTensor, e: usize) -> Result<Vec<f32>> {
        self.check_layout(t)?;
        check_expert(t, e)?;
        let n = t.rows * t.cols;
        let q = &t.part("weight")?.as_u8()?[e * n..(e + 1) * n];
        let s = t.part("weight_scale")?.as_f32()?[e];
        check_scales(F, "weight_scale", &[s], &[1])?;
        check_e4m3_weights(F, "weight", q, &[t.rows, t.cols])?;
        Ok(q.iter().map(|&b| e4m3_to_f32(b) * s).collect())
    }

    fn quantize(&self, w: &[f32], experts: usize, rows: usize, cols: usize) -> Result<ExpertTensor> {
        check_quantize_input(F, w, experts, rows, cols)?;
        let n = rows * cols;
        let mut q = vec![0u8; w.len()];
        let mut scales = vec![0.0f32; experts];
        for e in 0..experts {
            let m = amax(w[e * n..(e + 1) * n].iter().copied());
            let s = if m > 0.0 { m / E4M3_MAX } else { 1.0 };
            scales[e] = s;
            for i in e * n..(e + 1) * n {
                q[i] = f32_to_e4m3(w[i] / s);
            }
        }
        Ok(ExpertTensor {
            format: F,
            experts,
            rows,
            cols,
            parts: [
                ("weight".to_string(), Tensor::from_host(vec![experts, rows, cols], HostData::U8(q))?),
                ("weight_scale".to_string(), Tensor::from_f32(vec![experts], scales)?),
            ]
            .into_iter()
            .collect(),
        })
    }
}

impl Fp8Tensor {
    /// The required parts, plus the optional `input_scale` `[E]`.
    fn check_layout(&self, t: &ExpertTensor) -> Result<()> {
        match t.parts.get("input_scale") {
            None => check_parts(t, &self.part_specs(t.experts, t.rows, t.cols)?),
            Some(s) => {
                if s.dtype() != DType::F32 || s.shape() != [t.experts] {
                    return Err(MoeError::quant(
                        F.name(),
                        format!(
                            "part `input_scale` should be f32 [{}], found {} {:?}",
                            t.experts,
                            s.dtype(),
                            s.shape()
                        ),
                    ));
                }
                let mut specs = self.part_specs(t.experts, t.rows, t.cols)?;
                specs.push(PartSpec { name: "input_scale", dtype: DType::F32, shape: vec![t.experts] });
                check_parts(t, &specs)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requantize_to_a_larger_scale_keeps_values() {
        let vals = [0.5f32, -1.25, 3.0, 0.0];
        let q: Vec<u8> = vals.iter().map(|&v| f32_to_e4m3(v / 0.01)).collect();
        let r = requantize(&q, 0.01, 0.02).unwrap();
        for (i, &v) in vals.iter().enumerate() {
            assert!((e4m3_to_f32(r[i]) * 0.02 - v).abs() <= v.abs() * 0.07, "{v}");
        }
    }

    #[test]
    fn static_input_scale_is_the_max_over_experts() {
        let mut t = Fp8Tensor.quantize(&[0.1, -0.2, 0.3, 0.4], 2, 1, 2).unwrap();
        t.parts.insert("input_scale".into(), Tensor::from_f32(vec![2], vec![0.5, 0.25]).unwrap());
        Fp8Tensor.validate(&t).unwrap();
        assert_eq!(Fp8Tensor::activation_scaling(&t).unwrap(), ActScaling::PerTensorStatic(0.5));
        t.parts.insert("input_scale".into(), Tensor::from_f32(vec![2], vec![f32::NAN, 0.25]).unwrap());
        assert!(Fp8Tensor.validate(&t).is_err());
    }
}
