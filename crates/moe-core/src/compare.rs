//! Comparing outputs against a reference: relative L2 error and the DESIGN.md tolerances.

use crate::error::{MoeError, Result};
use crate::quant::QuantFormat;
use crate::tensor::{DType, Tensor};

/// `||out - ref|| / ||ref||` in f64; `inf` when either side holds NaN/Inf or lengths differ.
pub fn rel_l2(out: &[f32], reference: &[f32]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in out.iter().zip(reference) {
        if !a.is_finite() || !b.is_finite() {
            return f64::INFINITY;
        }
        let d = a as f64 - b as f64;
        num += d * d;
        den += (b as f64) * (b as f64);
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// Relative L2 between two tensors of equal shape (copied to the host as f32).
pub fn rel_l2_tensors(out: &Tensor, reference: &Tensor) -> Result<f64> {
    if out.shape() != reference.shape() {
        return Err(MoeError::shape("rel_l2", format!("{:?}", reference.shape()), format!("{:?}", out.shape())));
    }
    Ok(rel_l2(&out.to_f32_vec()?, &reference.to_f32_vec()?))
}

/// The DESIGN.md tolerance for a compute dtype and weight format.
pub fn tolerance(act: DType, weights: DType, quant: QuantFormat) -> f64 {
    match quant {
        QuantFormat::Fp8Block | QuantFormat::Fp8Tensor => 5e-2,
        QuantFormat::Mxfp4 | QuantFormat::Nvfp4 | QuantFormat::Int4Group => 1e-1,
        QuantFormat::Int8Channel => 5e-2,
        QuantFormat::None => {
            if act == DType::F32 && weights == DType::F32 {
                1e-5
            } else {
                1e-2
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_never_passes() {
        assert!(rel_l2(&[f32::NAN], &[1.0]).is_infinite());
        assert!(rel_l2(&[1.0], &[1.0, 2.0]).is_infinite());
        assert_eq!(rel_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_l2(&[1.1], &[1.0]) - 0.1).abs() < 1e-6);
    }
}
