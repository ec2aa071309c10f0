//! `moe bench --backend cuda`: the GPU measurement of `moe_cuda::bench` (copy bandwidth and
//! cuBLAS bf16 GEMM rate measured in the same run, CUDA-event timing, optional torch peer JSON).

use std::process::ExitCode;

use moe_core::{MoeError, Result};
use moe_runtime::presets::Shape;

/// Runs the GPU grid over `shapes` x `tokens`; writes JSON to `json` when given.
pub fn run(
    shapes: &[Shape],
    tokens: &[usize],
    dtype: moe_core::DType,
    peer_json: Option<&std::path::Path>,
    json: Option<&std::path::Path>,
    quant: Option<moe_core::QuantFormat>,
) -> Result<ExitCode> {
    if dtype != moe_core::DType::BF16 {
        return Err(MoeError::config("dtype", "the GPU benchmark measures bf16 (the torch peer's dtype)"));
    }
    let hw = moe_runtime::probe_hardware();
    if hw.gpus.is_empty() {
        return Err(MoeError::Device(format!(
            "no usable GPU for `moe bench --backend cuda`: {}",
            hw.gpu_unavailable.unwrap_or_default()
        )));
    }
    let grid: Vec<_> = shapes.iter().map(|s| (s.name, s.experts, s.top_k, s.hidden, s.intermediate)).collect();
    let quant = quant.unwrap_or_default();
    if quant != moe_core::QuantFormat::None {
        println!(
            "quant: experts in {quant} (random experts quantized on the host, 4 distinct replicated over the slots)"
        );
    }
    let doc = moe_cuda::bench::run_grid_quant(&grid, tokens, peer_json, None, 200.0, quant)?;
    if let Some(p) = json {
        let text = serde_json::to_string_pretty(&doc).map_err(|e| MoeError::Device(e.to_string()))?;
        std::fs::write(p, text).map_err(|source| MoeError::Io { path: p.display().to_string(), source })?;
    }
    Ok(ExitCode::SUCCESS)
}
