//! `--quant FORMAT`: quantize a block's experts at load and report the quantization error.

use moe_core::quant::quantize_block;
use moe_core::{MoeConfig, MoeWeights, QuantFormat, Result};

/// Parses `--quant` (`none` or absent leaves the weights as they are).
pub fn parse(flag: Option<&str>) -> Result<Option<QuantFormat>> {
    match flag.map(QuantFormat::parse).transpose()? {
        Some(QuantFormat::None) | None => Ok(None),
        Some(f) => Ok(Some(f)),
    }
}

/// Quantizes `w`'s routed experts to `--quant` (if given), printing the error per projection.
pub fn at_load(flag: Option<&str>, cfg: MoeConfig, w: MoeWeights) -> Result<(MoeConfig, MoeWeights)> {
    let Some(format) = parse(flag)? else { return Ok((cfg, w)) };
    if cfg.quant != QuantFormat::None {
        println!("  quant      requantizing {} experts to {format}", cfg.quant);
    }
    let t0 = std::time::Instant::now();
    let (qcfg, qw, [r13, r2]) = quantize_block(&cfg, &w, format)?;
    println!(
        "  quant      {format} at load in {:.2} s: {:.1} -> {:.1} MiB of experts ({:.2}x smaller than bf16)",
        t0.elapsed().as_secs_f64(),
        (r13.bf16_bytes + r2.bf16_bytes) as f64 / 1048576.0,
        (r13.bytes + r2.bytes) as f64 / 1048576.0,
        (r13.bf16_bytes + r2.bf16_bytes) as f64 / (r13.bytes + r2.bytes).max(1) as f64
    );
    for (name, r) in [("w13", r13), ("w2", r2)] {
        println!("  quant      {name} weight error: relative L2 {:.3e}, max |err| {:.3e}", r.rel_l2, r.max_abs);
    }
    Ok((qcfg, qw))
}
