//! The CUDA runtime and the `cuda` expert backend.
//!
//! - [`probe`]: availability probe that never panics (no libcuda, no device, old driver).
//! - [`nvrtc`]: run-time compilation of `kernels/*.cu` for the device's architecture, with an
//!   on-disk cubin cache.
//! - [`device`]: context, stream, kernel loading, buffers and the reusable workspace.
//! - [`kernels`]: [`kernels::KernelId`], the one source of kernel names, and launch parameters.
//! - [`backend`] / [`provider`]: the expert backend and its capability answers.
//! - [`quant`]: quantized experts packed on the device and their weight-only GEMMs.
//! - [`graph`]: CUDA graphs for decode-sized forwards; [`router`]: the cuBLAS router at large T.
//! - [`nccl`]: the NCCL transport for expert parallelism (docs/ep.md).
//!
//! Every library is loaded at run time (cudarc `dynamic-loading`), so this crate builds and its
//! users run on machines without CUDA; the probe says why the GPU is not used.

pub mod backend;
pub mod bench;
pub mod buffer;
pub mod device;
pub mod error;
pub mod fp8_gemm;
pub mod graph;
pub mod heuristics;
pub mod kernels;
pub mod nccl;
pub mod nvrtc;
pub mod probe;
pub mod provider;
pub mod quant;
pub mod router;

pub use backend::CudaBackend;
pub use buffer::CudaBuffer;
pub use error::CudaError;
pub use probe::{fill_hardware, probe_gpus};
pub use provider::CudaProvider;

/// Lines for `moe info`: the device runtime's settings and the masked/contiguous switch point.
pub fn runtime_notes(hw: &moe_core::Hardware) -> Vec<String> {
    let mut v = vec![format!(
        "cuda: masked layout up to {} tokens per forward, contiguous above (MOE_CUDA_MASKED_MAX_TOKENS; default {})",
        heuristics::masked_max_tokens(),
        heuristics::DEFAULT_MASKED_MAX_TOKENS
    )];
    v.push(match heuristics::decode_max_tokens() {
        Some(t) => format!("cuda: matrix-vector decode path up to {t} tokens (MOE_CUDA_DECODE_MAX_TOKENS)"),
        None => "cuda: matrix-vector decode path up to 2 tokens, or while tokens x top_k <= experts / 4 \
                 (MOE_CUDA_DECODE_MAX_TOKENS fixes a count, 0 = off)"
            .into(),
    });
    v.push(format!(
        "cuda: CUDA graphs for forwards of 1..={} tokens: {} (MOE_CUDA_GRAPHS=0 turns them off, \
         MOE_CUDA_GRAPH_MAX_TOKENS moves the limit)",
        graph::graph_max_tokens()
            .unwrap_or_else(|| heuristics::masked_max_tokens().max(graph::DEFAULT_GRAPH_MAX_TOKENS)),
        if graph::graphs_default() { "on" } else { "off" }
    ));
    v.push(match router::cublas_available() {
        Ok(()) => match std::env::var("MOE_CUDA_ROUTER_BLAS_MIN_TOKENS") {
            Ok(t) => {
                format!("cuda: router logits by cuBLAS SGEMM (f32) from {t} tokens (MOE_CUDA_ROUTER_BLAS_MIN_TOKENS)")
            }
            Err(_) => format!(
                "cuda: router logits by cuBLAS SGEMM (f32) from T * experts * hidden >= {}, the f32 kernel \
                 below (MOE_CUDA_ROUTER_BLAS_MIN_TOKENS sets a token count)",
                router::ROUTER_BLAS_MIN_MACS
            ),
        },
        Err(e) => format!("cuda: router: {e}"),
    });
    v.push(format!("cuda: kernel cache {} (MOE_KERNEL_CACHE)", nvrtc::cache_dir().display()));
    match nvrtc::ensure_nvrtc().map_err(CudaError::Unavailable).and_then(|_| nvrtc::nvrtc_version()) {
        Ok((a, b)) => v.push(format!("cuda: NVRTC {a}.{b}")),
        Err(e) => v.push(format!("cuda: {e}")),
    }
    for g in &hw.gpus {
        v.push(format!(
            "cuda: GPU {} {} sm_{}{} -> NVRTC target {}",
            g.ordinal,
            g.name,
            g.compute_capability.0,
            g.compute_capability.1,
            probe::arch_for(g.compute_capability)
        ));
    }
    v
}
