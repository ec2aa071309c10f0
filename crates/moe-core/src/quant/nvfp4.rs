//! NVFP4 (NVIDIA ModelOpt): E2M1 values with one float8 e4m3fn scale per 16 along the input and
//! an fp32 global scale per projection: `W = lut[nibble] * e4m3(weight_scale) * weight_scale_2`.
//!
//! Parts (`[E, rows, cols]` projection, ModelOpt names with the experts stacked first):
//! - `weight`: u8 `[E, rows, cols/2]`, two E2M1 codes a byte, low nibble = even element;
//! - `weight_scale`: u8 `[E, rows, cols/16]`, e4m3fn block scales (NaN/negative rejected);
//! - `weight_scale_2`: f32 `[E]`, the global scale;
//! - `input_scale` (optional): f32 `[E]`, the calibrated activation global scale (kept for
//!   FP4-activation paths; the weight-only paths here ignore it).

use crate::error::{MoeError, Result};
use crate::quant::checks::{amax, check_divisible, check_expert, check_quantize_input, check_scales, err, unravel};
use crate::quant::codec::{e4m3_is_nan, e4m3_to_f32, f32_to_e2m1, f32_to_e4m3, E2M1_LUT, E2M1_MAX, E4M3_MAX};
use crate::quant::{check_parts, ExpertTensor, PartSpec, QuantFormat, QuantMethod};
use crate::tensor::{DType, HostData, Tensor};

/// NVFP4 with e4m3 scales per 16 values and an fp32 global scale.
#[derive(Debug, Clone, Copy, Default)]
pub struct Nvfp4;

impl Nvfp4 {
    /// Values per block scale.
    pub const BLOCK_SIZE: usize = 16;
}

const F: QuantFormat = QuantFormat::Nvfp4;

fn check_block_scales(s: &[u8], shape: &[usize]) -> Result<()> {
    // A set sign bit on a non-zero scale is a negative scale; 0x80 (-0) is harmless.
    if let Some(i) = s.iter().position(|&b| e4m3_is_nan(b) || (b & 0x80 != 0 && b != 0x80)) {
        return Err(err(
            F,
            format!(
                "part `weight_scale` holds {} ({:#04x}) at {:?}: block scales must be finite and non-negative",
                e4m3_to_f32(s[i]),
                s[i],
                unravel(i, shape)
            ),
        ));
    }
    Ok(())
}

impl Nvfp4 {
    fn check_layout(&self, t: &ExpertTensor) -> Result<()> {
        let mut specs = self.part_specs(t.experts, t.rows, t.cols)?;
        if let Some(s) = t.parts.get("input_scale") {
            if s.dtype() != DType::F32 || s.shape() != [t.experts] {
                return Err(MoeError::quant(
                    F.name(),
                    format!("part `input_scale` should be f32 [{}], found {} {:?}", t.experts, s.dtype(), s.shape()),
                ));
            }
            specs.push(PartSpec { name: "input_scale", dtype: DType::F32, shape: vec![t.experts] });
        }
        check_parts(t, &specs)
    }
}

impl QuantMethod for Nvfp4 {
    fn format(&self) -> QuantFormat {
        F
    }

    fn part_specs(&self, experts: usize, rows: usize, cols: usize) -> Result<Vec<PartSpec>> {
        check_divisible(F, "input features (cols)", cols, Nvfp4::BLOCK_SIZE)?;
        Ok(vec![
            PartSpec { name: "weight", dtype: DType::U8, shape: vec![experts, rows, cols / 2] },
            PartSpec { name: "weight_scale", dtype: DType::U8, shape: vec![experts, rows, cols / Nvfp4::BLOCK_SIZE] },
            PartSpec { name: "weight_scale_2", dtype: DType::F32, shape: vec![experts] },
        ])
    }

    fn validate(&self, t: &ExpertTensor) -> Result<()> {
        self.check_layout(t)?;
        let s = t.part("weight_scale")?;
        check_block_scales(s.as_u8()?, s.shape())?;
        let g = t.part("weight_scale_2")?;
        check_scales(F, "weight_scale_2", g.as_f32()?, g.shape())?;
        if let Some(i) = t.parts.get("input_scale") {
            check_scales(F, "input_scale", i.as_f32()?, i.shape())?;
        }
        Ok(())
    }

    fn dequantize_expert(&self, t: &ExpertTensor, e: usize) -> Result<Vec<f32>> {
        self.check_layout(t)?;
        check_expert(t, e)?;
        let (rows, cols) = (t.rows, t.cols);
        let nb = cols / Nvfp4::BLOCK_SIZE;
        let q = &t.part("weight")?.as_u8()?[e * rows * cols / 2..(e + 1) * rows * cols / 2];
        let s = &t.part("weight_scale")?.as_u8()?[e * rows * nb..(e + 1) * rows * nb];
        let g = t.part("weight_scale_2")?.as_f32()?[e];
        check_block_scales(s, &[rows, nb])?;
        check_scales(F, "weight_scale_2", &[g], &[1])?;
        let mut out = vec![0.0f32; rows * cols];
        for (bi, (&byte, o)) in q.iter().zip(out.chunks_exact_mut(2)).enumerate() {
            let sc = e4m3_to_f32(s[bi / (Nvfp4::BLOCK_SIZE / 2)]) * g;
            o[0] = E2M1_LUT[(byte & 0x0F) as usize] * sc;
            o[1] = E2M1_LUT[(byte >> 4) as usize] * sc;
        }
        Ok(out)
    }

    fn quantize(&self, w: &[f32], experts: usize, rows: usize, cols: usize) -> Result<ExpertTensor> {
        check_quantize_input(F, w, experts, rows, cols)?;
        let specs = self.part_specs(experts, rows, cols)?;
        let n = rows * cols;
        let bs = Nvfp4::BLOCK_SIZE;
        let mut q = vec![0u8; w.len() / 2];
        let mut scales = vec![0u8; w.len() / bs];
        let mut global = vec![0.0f32; experts];
        for e in 0..experts {
            // ModelOpt's recipe: the global scale maps the tensor amax to 6 * 448.
            let m = amax(w[e * n..(e + 1) * n].iter().copied());
            let g = if m > 0.0 { m / (E2M1_MAX * E4M3_MAX) } else { 1.0 };
            global[e] = g;
            for b in e * n / bs..(e + 1) * n / bs {
                let x = &w[b * bs..(b + 1) * bs];
                scales[b] = f32_to_e4m3(amax(x.iter().copied()) / E2M1_MAX / g);
                let sc = e4m3_to_f32(scales[b]) * g;
                let inv = if sc > 0.0 { 1.0 / sc } else { 0.0 };
                for (j, byte) in q[b * bs / 2..(b + 1) * bs / 2].iter_mut().enumerate() {
                    *byte = f32_to_e2m1(x[2 * j] * inv) | (f32_to_e2m1(x[2 * j + 1] * inv) << 4);
                }
            }
        }
        Ok(ExpertTensor {
            format: F,
            experts,
            rows,
            cols,
            parts: [
                ("weight".to_string(), Tensor::from_host(specs[0].shape.clone(), HostData::U8(q))?),
                ("weight_scale".to_string(), Tensor::from_host(specs[1].shape.clone(), HostData::U8(scales))?),
                ("weight_scale_2".to_string(), Tensor::from_f32(vec![experts], global)?),
            ]
            .into_iter()
            .collect(),
        })
    }
}

/// Re-encodes e4m3 block scales that were paired with global scale `from` so they pair with
/// `to >= from` (fusing gate and up shards with different global scales). Rounding the rescaled
/// block scale to e4m3 adds at most half an e4m3 ulp of error per block.
pub fn rescale_block_scales(s: &[u8], from: f32, to: f32) -> Result<Vec<u8>> {
    if !(from.is_finite() && to.is_finite() && from >= 0.0 && to > 0.0) {
        return Err(err(F, format!("cannot rescale block scales from global scale {from} to {to}")));
    }
    Ok(s.iter().map(|&b| f32_to_e4m3(e4m3_to_f32(b) * from / to)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_block_scale_is_rejected_but_negative_zero_is_fine() {
        let mut t = Nvfp4.quantize(&(0..32).map(|i| i as f32 * 0.1 - 1.0).collect::<Vec<_>>(), 1, 1, 32).unwrap();
        Nvfp4.validate(&t).unwrap();
        t.parts
            .insert("weight_scale".into(), Tensor::from_host(vec![1, 1, 2], HostData::U8(vec![0x80, 0x38])).unwrap());
        Nvfp4.validate(&t).unwrap();
        t.parts
            .insert("weight_scale".into(), Tensor::from_host(vec![1, 1, 2], HostData::U8(vec![0xB8, 0x38])).unwrap());
        let e = Nvfp4.validate(&t).unwrap_err().to_string();
        assert!(e.contains("weight_scale") && e.contains("non-negative"), "{e}");
    }
}
