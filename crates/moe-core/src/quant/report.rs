//! Quantize at load with the error reported: the method quantizes, dequantizes back, and the
//! relative L2 and max-abs error against the source weights come with the result.

use rayon::prelude::*;

use crate::error::Result;
use crate::quant::{ExpertTensor, QuantMethod};
use crate::tensor::Tensor;

/// How far a quantized projection is from the weights it was made from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantReport {
    /// `||dequant(q(w)) - w|| / ||w||` over the whole projection.
    pub rel_l2: f64,
    /// Largest element-wise `|dequant(q(w)) - w|`.
    pub max_abs: f32,
    /// Stored bytes of the quantized parts.
    pub bytes: usize,
    /// Bytes of the source as bf16, for the compression ratio.
    pub bf16_bytes: usize,
}

/// Quantizes `w` `[experts, rows, cols]` with `method` and measures the error (experts in
/// parallel: every format quantizes each expert independently).
pub fn quantize_reported(
    method: &dyn QuantMethod,
    w: &[f32],
    experts: usize,
    rows: usize,
    cols: usize,
) -> Result<(ExpertTensor, QuantReport)> {
    crate::quant::checks::check_quantize_input(method.format(), w, experts, rows, cols)?;
    let n = rows * cols;
    let each: Vec<ExpertTensor> = (0..experts)
        .into_par_iter()
        .map(|e| method.quantize(&w[e * n..(e + 1) * n], 1, rows, cols))
        .collect::<Result<_>>()?;
    let t = match each.first() {
        Some(first) if experts > 1 => {
            let mut parts = std::collections::BTreeMap::new();
            for (name, p) in &first.parts {
                let all: Vec<Tensor> = each.iter().map(|t| t.part(name).cloned()).collect::<Result<_>>()?;
                parts.insert(name.clone(), Tensor::cat_rows(&all, &p.shape()[1..], p.dtype())?);
            }
            ExpertTensor { format: first.format, experts, rows, cols, parts }
        }
        _ => method.quantize(w, experts, rows, cols)?,
    };
    let sums: Vec<(f64, f64, f32)> = (0..experts)
        .into_par_iter()
        .map(|e| {
            let d = method.dequantize_expert(&t, e)?;
            let (mut num, mut den, mut max_abs) = (0.0f64, 0.0f64, 0.0f32);
            for (a, b) in d.iter().zip(&w[e * n..(e + 1) * n]) {
                let diff = a - b;
                num += (diff as f64) * (diff as f64);
                den += (*b as f64) * (*b as f64);
                max_abs = max_abs.max(diff.abs());
            }
            Ok((num, den, max_abs))
        })
        .collect::<Result<_>>()?;
    let (num, den, max_abs) = sums.iter().fold((0.0, 0.0, 0.0f32), |a, s| (a.0 + s.0, a.1 + s.1, a.2.max(s.2)));
    let rel_l2 = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    let bytes = t.parts.values().map(|p| p.numel() * p.dtype().size_bytes()).sum();
    Ok((t, QuantReport { rel_l2, max_abs, bytes, bf16_bytes: w.len() * 2 }))
}

/// Quantize at load: the routed experts of a block (in `cfg.quant`, usually unquantized bf16)
/// converted to `format`, with the error of each projection (`w13`, then `w2`). The router,
/// biases and shared expert stay as they are. The returned config has `quant = format`.
pub fn quantize_block(
    cfg: &crate::config::MoeConfig,
    w: &crate::weights::MoeWeights,
    format: crate::quant::QuantFormat,
) -> Result<(crate::config::MoeConfig, crate::weights::MoeWeights, [QuantReport; 2])> {
    let mut out_cfg = cfg.clone();
    out_cfg.quant = format;
    out_cfg.validate()?;
    let from = crate::quant::quant_method(cfg.quant, cfg.weight_dtype)?;
    let to = crate::quant::quant_method(format, cfg.weight_dtype)?;
    let convert = |t: &ExpertTensor| -> Result<(ExpertTensor, QuantReport)> {
        let f: Vec<Vec<f32>> =
            (0..t.experts).into_par_iter().map(|e| from.dequantize_expert(t, e)).collect::<Result<_>>()?;
        quantize_reported(to.as_ref(), &f.concat(), t.experts, t.rows, t.cols)
    };
    let (w13, r13) = convert(&w.experts.w13)?;
    let (w2, r2) = convert(&w.experts.w2)?;
    let mut out = w.clone();
    out.experts.w13 = w13;
    out.experts.w2 = w2;
    out.validate(&out_cfg)?;
    Ok((out_cfg, out, [r13, r2]))
}
