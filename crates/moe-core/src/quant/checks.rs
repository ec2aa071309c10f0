//! Validation and bookkeeping helpers shared by the quant methods. Every error is a
//! [`MoeError::Quant`] naming the format, the part and the offending element.

use crate::error::{MoeError, Result};
use crate::quant::{ExpertTensor, QuantFormat};

/// `MoeError::Quant` for a format.
pub(crate) fn err(format: QuantFormat, reason: impl Into<String>) -> MoeError {
    MoeError::quant(format.name(), reason)
}

/// Errors unless `e` is an expert of `t`.
pub(crate) fn check_expert(t: &ExpertTensor, e: usize) -> Result<()> {
    if e >= t.experts {
        return Err(MoeError::shape("dequantize_expert", format!("expert < {}", t.experts), e.to_string()));
    }
    Ok(())
}

/// Errors unless `n` is a multiple of `block` (the format packs `block` values along `what`).
pub(crate) fn check_divisible(format: QuantFormat, what: &str, n: usize, block: usize) -> Result<()> {
    if !n.is_multiple_of(block) {
        return Err(err(
            format,
            format!("{what} = {n} is not a multiple of the block size {block}; this format cannot pack it"),
        ));
    }
    Ok(())
}

/// Errors on the first scale that is NaN, infinite or negative (zero is allowed: an all-zero
/// block). `shape` is the part's shape, to name the element by index.
pub(crate) fn check_scales(format: QuantFormat, part: &str, v: &[f32], shape: &[usize]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite() || *x < 0.0) {
        return Err(err(
            format,
            format!(
                "part `{part}` holds {} at index {:?}: scales must be finite and non-negative (corrupt checkpoint?)",
                v[i],
                unravel(i, shape)
            ),
        ));
    }
    Ok(())
}

/// Flat index -> multi-index for error messages.
pub(crate) fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        let n = shape[d].max(1);
        idx[d] = i % n;
        i /= n;
    }
    idx
}

/// Errors unless `w` holds `experts * rows * cols` finite values (quantizer input).
pub(crate) fn check_quantize_input(
    format: QuantFormat,
    w: &[f32],
    experts: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if w.len() != experts * rows * cols {
        return Err(MoeError::shape(
            "quantize",
            format!("{} values for [{experts}, {rows}, {cols}]", experts * rows * cols),
            format!("{} values", w.len()),
        ));
    }
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        return Err(MoeError::NonFinite {
            op: "quantize",
            detail: format!("{} weight {:?} is {}", format.name(), unravel(i, &[experts, rows, cols]), w[i]),
        });
    }
    Ok(())
}

/// Max |x| of a slice.
#[inline]
pub(crate) fn amax(v: impl IntoIterator<Item = f32>) -> f32 {
    v.into_iter().fold(0.0f32, |m, x| m.max(x.abs()))
}
