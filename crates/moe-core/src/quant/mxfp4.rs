//! MXFP4 (OCP microscaling, GPT-OSS): E2M1 values with one E8M0 scale per 32 along the input,
//! `value = lut[nibble] * 2^(scale - 127)`.
//!
//! Parts (`[E, rows, cols]` projection, the GPT-OSS on-disk layout):
//! - `blocks`: u8 `[E, rows, cols/32, 16]`, two E2M1 codes a byte, low nibble = even element;
//! - `scales`: u8 `[E, rows, cols/32]`, E8M0 (255 is NaN and rejected).

use crate::error::Result;
use crate::quant::checks::{amax, check_divisible, check_expert, check_quantize_input, err, unravel};
use crate::quant::codec::{e8m0_to_f32, f32_to_e2m1, E2M1_LUT, E2M1_MAX};
use crate::quant::{check_parts, ExpertTensor, PartSpec, QuantFormat, QuantMethod};
use crate::tensor::{DType, HostData, Tensor};

/// MXFP4 with E8M0 scales per 32 values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mxfp4;

impl Mxfp4 {
    /// Values per scale.
    pub const BLOCK_SIZE: usize = 32;
    /// Bytes per block.
    pub const BLOCK_BYTES: usize = 16;
}

const F: QuantFormat = QuantFormat::Mxfp4;

fn check_e8m0(part: &str, s: &[u8], shape: &[usize]) -> Result<()> {
    if let Some(i) = s.iter().position(|&b| b == 255) {
        return Err(err(
            F,
            format!("part `{part}` holds the E8M0 NaN code 255 at {:?} (corrupt checkpoint?)", unravel(i, shape)),
        ));
    }
    Ok(())
}

impl QuantMethod for Mxfp4 {
    fn format(&self) -> QuantFormat {
        F
    }

    fn part_specs(&self, experts: usize, rows: usize, cols: usize) -> Result<Vec<PartSpec>> {
        check_divisible(F, "input features (cols)", cols, Mxfp4::BLOCK_SIZE)?;
        let g = cols / Mxfp4::BLOCK_SIZE;
        Ok(vec![
            PartSpec { name: "blocks", dtype: DType::U8, shape: vec![experts, rows, g, Mxfp4::BLOCK_BYTES] },
            PartSpec { name: "scales", dtype: DType::U8, shape: vec![experts, rows, g] },
        ])
    }

    fn validate(&self, t: &ExpertTensor) -> Result<()> {
        check_parts(t, &self.part_specs(t.experts, t.rows, t.cols)?)?;
        let s = t.part("scales")?;
        check_e8m0("scales", s.as_u8()?, s.shape())
    }

    fn dequantize_expert(&self, t: &ExpertTensor, e: usize) -> Result<Vec<f32>> {
        check_parts(t, &self.part_specs(t.experts, t.rows, t.cols)?)?;
        check_expert(t, e)?;
        let (rows, cols) = (t.rows, t.cols);
        let g = cols / Mxfp4::BLOCK_SIZE;
        let blocks = &t.part("blocks")?.as_u8()?[e * rows * cols / 2..(e + 1) * rows * cols / 2];
        let scales = &t.part("scales")?.as_u8()?[e * rows * g..(e + 1) * rows * g];
        check_e8m0("scales", scales, &[rows, g])?;
        let mut out = vec![0.0f32; rows * cols];
        for (bi, (&byte, o)) in blocks.iter().zip(out.chunks_exact_mut(2)).enumerate() {
            let s = e8m0_to_f32(scales[bi / Mxfp4::BLOCK_BYTES]);
            o[0] = E2M1_LUT[(byte & 0x0F) as usize] * s;
            o[1] = E2M1_LUT[(byte >> 4) as usize] * s;
        }
        Ok(out)
    }

    fn quantize(&self, w: &[f32], experts: usize, rows: usize, cols: usize) -> Result<ExpertTensor> {
        check_quantize_input(F, w, experts, rows, cols)?;
        let specs = self.part_specs(experts, rows, cols)?;
        let nblocks = w.len() / Mxfp4::BLOCK_SIZE;
        let mut blocks = vec![0u8; w.len() / 2];
        let mut scales = vec![0u8; nblocks];
        for b in 0..nblocks {
            let x = &w[b * Mxfp4::BLOCK_SIZE..(b + 1) * Mxfp4::BLOCK_SIZE];
            let m = amax(x.iter().copied());
            // The smallest power of two that maps amax into E2M1's range never clips; one step
            // finer (OCP's choice) clips the largest values but resolves the rest better. Keep
            // whichever reconstructs the block with less squared error.
            let fit = if m > 0.0 { (m / E2M1_MAX).log2().ceil().clamp(-126.0, 127.0) as i32 } else { 0 };
            let sq_err = |code: u8| {
                let (sc, inv) = (e8m0_to_f32(code), 1.0 / e8m0_to_f32(code));
                x.iter().map(|&v| (E2M1_LUT[f32_to_e2m1(v * inv) as usize] * sc - v).powi(2)).sum::<f32>()
            };
            let (a, b1) = ((fit + 127) as u8, (fit + 126) as u8);
            scales[b] = if sq_err(b1) < sq_err(a) { b1 } else { a };
            let inv = 1.0 / e8m0_to_f32(scales[b]);
            for (j, byte) in blocks[b * 16..(b + 1) * 16].iter_mut().enumerate() {
                *byte = f32_to_e2m1(x[2 * j] * inv) | (f32_to_e2m1(x[2 * j + 1] * inv) << 4);
            }
        }
        Ok(ExpertTensor {
            format: F,
            experts,
            rows,
            cols,
            parts: [
                ("blocks".to_string(), Tensor::from_host(specs[0].shape.clone(), HostData::U8(blocks))?),
                ("scales".to_string(), Tensor::from_host(specs[1].shape.clone(), HostData::U8(scales))?),
            ]
            .into_iter()
            .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_one_block_by_hand() {
        // Row of 32: byte j = codes (j % 16) low and 15 - (j % 16) high; scale 2^1.
        let bytes: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let t = ExpertTensor {
            format: F,
            experts: 1,
            rows: 1,
            cols: 32,
            parts: [
                ("blocks".to_string(), Tensor::from_host(vec![1, 1, 1, 16], HostData::U8(bytes)).unwrap()),
                ("scales".to_string(), Tensor::from_host(vec![1, 1, 1], HostData::U8(vec![128])).unwrap()),
            ]
            .into_iter()
            .collect(),
        };
        let d = Mxfp4.dequantize_expert(&t, 0).unwrap();
        for j in 0..16 {
            assert_eq!(d[2 * j], E2M1_LUT[j] * 2.0);
            assert_eq!(d[2 * j + 1], E2M1_LUT[15 - j] * 2.0);
        }
    }
}
