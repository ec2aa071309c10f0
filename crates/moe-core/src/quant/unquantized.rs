//! Unquantized f32 / bf16 / f16 weights: one part, `weight`.

use crate::error::{MoeError, Result};
use crate::quant::{ExpertTensor, PartSpec, QuantFormat, QuantMethod};
use crate::tensor::{DType, Tensor};

/// Plain weights in one float dtype.
#[derive(Debug, Clone, Copy)]
pub struct Unquantized {
    dtype: DType,
}

impl Unquantized {
    /// A method storing weights as `dtype` (f32, bf16 or f16).
    pub fn new(dtype: DType) -> Result<Self> {
        if !dtype.is_float() {
            return Err(MoeError::config("weight_dtype", format!("{dtype} is not a float dtype")));
        }
        Ok(Unquantized { dtype })
    }
}

impl QuantMethod for Unquantized {
    fn format(&self) -> QuantFormat {
        QuantFormat::None
    }

    fn part_specs(&self, experts: usize, rows: usize, cols: usize) -> Result<Vec<PartSpec>> {
        Ok(vec![PartSpec { name: "weight", dtype: self.dtype, shape: vec![experts, rows, cols] }])
    }

    fn dequantize_expert(&self, t: &ExpertTensor, e: usize) -> Result<Vec<f32>> {
        self.validate(t)?;
        if e >= t.experts {
            return Err(MoeError::shape("dequantize_expert", format!("expert < {}", t.experts), e.to_string()));
        }
        let n = t.rows * t.cols;
        Ok(t.part("weight")?.narrow_rows(e, 1)?.to_f32_vec()?.into_iter().take(n).collect())
    }

    fn quantize(&self, w: &[f32], experts: usize, rows: usize, cols: usize) -> Result<ExpertTensor> {
        let weight = Tensor::from_f32_as(vec![experts, rows, cols], w, self.dtype)?;
        Ok(ExpertTensor {
            format: QuantFormat::None,
            experts,
            rows,
            cols,
            parts: [("weight".to_string(), weight)].into_iter().collect(),
        })
    }
}
