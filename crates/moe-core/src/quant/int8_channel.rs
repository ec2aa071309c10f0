//! INT8 weight-only, symmetric, one fp32 scale per output channel: `W[r, c] = q[r, c] * s[r]`.
//!
//! Parts (`[E, rows, cols]` projection):
//! - `weight`: u8 `[E, rows, cols]` holding two's-complement i8 values (the tensor type has no
//!   i8; `q as i8` recovers them);
//! - `weight_scale`: f32 `[E, rows]`.

use crate::error::Result;
use crate::quant::checks::{amax, check_expert, check_quantize_input, check_scales};
use crate::quant::{check_parts, ExpertTensor, PartSpec, QuantFormat, QuantMethod};
use crate::tensor::{DType, HostData, Tensor};

/// INT8 with per-output-channel scales.
#[derive(Debug, Clone, Copy, Default)]
pub struct Int8Channel;

const F: QuantFormat = QuantFormat::Int8Channel;

impl QuantMethod for Int8Channel {
    fn format(&self) -> QuantFormat {
        F
    }

    fn part_specs(&self, experts: usize, rows: usize, cols: usize) -> Result<Vec<PartSpec>> {
        Ok(vec![
            PartSpec { name: "weight", dtype: DType::U8, shape: vec![experts, rows, cols] },
            PartSpec { name: "weight_scale", dtype: DType::F32, shape: vec![experts, rows] },
        ])
    }

    fn validate(&self, t: &ExpertTensor) -> Result<()> {
        check_parts(t, &self.part_specs(t.experts, t.rows, t.cols)?)?;
        let s = t.part("weight_scale")?;
        check_scales(F, "weight_scale", s.as_f32()?, s.shape())
    }

    fn dequantize_expert(&self, t: &ExpertTensor, e: usize) -> Result<Vec<f32>> {
        check_parts(t, &self.part_specs(t.experts, t.rows, t.cols)?)?;
        check_expert(t, e)?;
        let (rows, cols) = (t.rows, t.cols);
        let q = &t.part("weight")?.as_u8()?[e * rows * cols..(e + 1) * rows * cols];
        let s = &t.part("weight_scale")?.as_f32()?[e * rows..(e + 1) * rows];
        check_scales(F, "weight_scale", s, &[rows])?;
        Ok(q.iter().enumerate().map(|(i, &b)| b as i8 as f32 * s[i / cols]).collect())
    }

    fn quantize(&self, w: &[f32], experts: usize, rows: usize, cols: usize) -> Result<ExpertTensor> {
        check_quantize_input(F, w, experts, rows, cols)?;
        let mut q = vec![0u8; w.len()];
        let mut scales = vec![0.0f32; experts * rows];
        for (r, s) in scales.iter_mut().enumerate() {
            let x = &w[r * cols..(r + 1) * cols];
            let m = amax(x.iter().copied());
            *s = if m > 0.0 { m / 127.0 } else { 1.0 };
            for (o, &v) in q[r * cols..(r + 1) * cols].iter_mut().zip(x) {
                *o = (v / *s).round().clamp(-127.0, 127.0) as i8 as u8;
            }
        }
        Ok(ExpertTensor {
            format: F,
            experts,
            rows,
            cols,
            parts: [
                ("weight".to_string(), Tensor::from_host(vec![experts, rows, cols], HostData::U8(q))?),
                ("weight_scale".to_string(), Tensor::from_f32(vec![experts, rows], scales)?),
            ]
            .into_iter()
            .collect(),
        })
    }
}
