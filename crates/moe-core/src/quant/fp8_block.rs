//! FP8 block (DeepSeek-V3): float8 e4m3fn weights with one fp32 `weight_scale_inv` per 128x128
//! block, `W = q * scale_inv`. Activations for the FP8 compute path are quantized per token per
//! 128 channels with `scale = amax / 448` (see [`quantize_activations`]).
//!
//! Parts (`[E, rows, cols]` projection):
//! - `weight`: u8 `[E, rows, cols]`, e4m3fn bytes;
//! - `weight_scale_inv`: f32 `[E, ceil(rows/128), ceil(cols/128)]`.
//!
//! Rows and columns need not be multiples of 128: edge blocks are partial, as in DeepSeek's files.

use crate::error::Result;
use crate::quant::checks::{amax, check_expert, check_quantize_input, check_scales, err};
use crate::quant::codec::{e4m3_is_nan, e4m3_to_f32, f32_to_e4m3, E4M3_MAX};
use crate::quant::{check_parts, ExpertTensor, PartSpec, QuantFormat, QuantMethod};
use crate::tensor::{DType, HostData, Tensor};

/// FP8 with 128x128 block scales.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fp8Block;

impl Fp8Block {
    /// Rows and columns per weight scale block.
    pub const BLOCK_SIZE: usize = 128;
    /// Channels per activation scale.
    pub const ACT_GROUP: usize = 128;
}

const F: QuantFormat = QuantFormat::Fp8Block;

fn scale_shape(rows: usize, cols: usize) -> (usize, usize) {
    (rows.div_ceil(Fp8Block::BLOCK_SIZE), cols.div_ceil(Fp8Block::BLOCK_SIZE))
}

/// Errors on the first NaN byte of an e4m3 weight part.
pub(crate) fn check_e4m3_weights(format: QuantFormat, part: &str, q: &[u8], shape: &[usize]) -> Result<()> {
    if let Some(i) = q.iter().position(|&b| e4m3_is_nan(b)) {
        return Err(err(
            format,
            format!(
                "part `{part}` holds an e4m3 NaN byte ({:#04x}) at {:?} (corrupt checkpoint?)",
                q[i],
                crate::quant::checks::unravel(i, shape)
            ),
        ));
    }
    Ok(())
}

impl QuantMethod for Fp8Block {
    fn format(&self) -> QuantFormat {
        F
    }

    fn part_specs(&self, experts: usize, rows: usize, cols: usize) -> Result<Vec<PartSpec>> {
        let (rb, cb) = scale_shape(rows, cols);
        Ok(vec![
            PartSpec { name: "weight", dtype: DType::U8, shape: vec![experts, rows, cols] },
            PartSpec { name: "weight_scale_inv", dtype: DType::F32, shape: vec![experts, rb, cb] },
        ])
    }

    fn validate(&self, t: &ExpertTensor) -> Result<()> {
        check_parts(t, &self.part_specs(t.experts, t.rows, t.cols)?)?;
        let s = t.part("weight_scale_inv")?;
        check_scales(F, "weight_scale_inv", s.as_f32()?, s.shape())?;
        let w = t.part("weight")?;
        check_e4m3_weights(F, "weight", w.as_u8()?, w.shape())
    }

    fn dequantize_expert(&self, t: &ExpertTensor, e: usize) -> Result<Vec<f32>> {
        check_parts(t, &self.part_specs(t.experts, t.rows, t.cols)?)?;
        check_expert(t, e)?;
        let (rows, cols) = (t.rows, t.cols);
        let (rb, cb) = scale_shape(rows, cols);
        let q = &t.part("weight")?.as_u8()?[e * rows * cols..(e + 1) * rows * cols];
        let s = &t.part("weight_scale_inv")?.as_f32()?[e * rb * cb..(e + 1) * rb * cb];
        check_scales(F, "weight_scale_inv", s, &[rb, cb])?;
        check_e4m3_weights(F, "weight", q, &[rows, cols])?;
        let b = Fp8Block::BLOCK_SIZE;
        let mut out = vec![0.0f32; rows * cols];
        for r in 0..rows {
            let srow = &s[(r / b) * cb..(r / b + 1) * cb];
            for (c, o) in out[r * cols..(r + 1) * cols].iter_mut().enumerate() {
                *o = e4m3_to_f32(q[r * cols + c]) * srow[c / b];
            }
        }
        Ok(out)
    }

    fn quantize(&self, w: &[f32], experts: usize, rows: usize, cols: usize) -> Result<ExpertTensor> {
        check_quantize_input(F, w, experts, rows, cols)?;
        let b = Fp8Block::BLOCK_SIZE;
        let (rb, cb) = scale_shape(rows, cols);
        let mut q = vec![0u8; w.len()];
        let mut scales = vec![0.0f32; experts * rb * cb];
        for e in 0..experts {
            let we = &w[e * rows * cols..(e + 1) * rows * cols];
            let qe = &mut q[e * rows * cols..(e + 1) * rows * cols];
            for bi in 0..rb {
                for bj in 0..cb {
                    let (r0, r1, c0, c1) = (bi * b, ((bi + 1) * b).min(rows), bj * b, ((bj + 1) * b).min(cols));
                    let m = amax((r0..r1).flat_map(|r| we[r * cols + c0..r * cols + c1].iter().copied()));
                    let s = if m > 0.0 { m / E4M3_MAX } else { 1.0 };
                    scales[(e * rb + bi) * cb + bj] = s;
                    for r in r0..r1 {
                        for c in c0..c1 {
                            qe[r * cols + c] = f32_to_e4m3(we[r * cols + c] / s);
                        }
                    }
                }
            }
        }
        Ok(ExpertTensor {
            format: F,
            experts,
            rows,
            cols,
            parts: [
                ("weight".to_string(), Tensor::from_host(vec![experts, rows, cols], HostData::U8(q))?),
                ("weight_scale_inv".to_string(), Tensor::from_f32(vec![experts, rb, cb], scales)?),
            ]
            .into_iter()
            .collect(),
        })
    }
}

/// Quantizes activations `[tokens, hidden]` to e4m3 per token per [`Fp8Block::ACT_GROUP`]
/// channels: `scale = amax / 448` (1.0 for an all-zero group), `q = e4m3(x / scale)`.
/// Returns the payload bytes `[tokens, hidden]` and the scales `[tokens, ceil(hidden/128)]`.
pub fn quantize_activations(x: &[f32], tokens: usize, hidden: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    crate::quant::activation::quantize_groups(x, tokens, hidden, Fp8Block::ACT_GROUP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_then_dequantize_is_close_on_partial_blocks() {
        let (e, r, c) = (2, 130, 200);
        let w: Vec<f32> = (0..e * r * c).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let t = Fp8Block.quantize(&w, e, r, c).unwrap();
        Fp8Block.validate(&t).unwrap();
        assert_eq!(t.part("weight_scale_inv").unwrap().shape(), &[2, 2, 2]);
        for ex in 0..e {
            let d = Fp8Block.dequantize_expert(&t, ex).unwrap();
            let err = crate::compare::rel_l2(&d, &w[ex * r * c..(ex + 1) * r * c]);
            assert!(err < 4e-2, "expert {ex}: {err}");
        }
    }
}
