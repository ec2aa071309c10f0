//! The runtime facade: every backend and strategy registered in one place, and the machine
//! probed once. The CLI and the shared test matrix use this crate; the core never names a backend
//! crate.

use moe_core::backend::Hardware;
use moe_core::BackendRegistry;

pub mod check;
pub mod presets;

pub use moe_core;

/// All backends of this build, registered with the core's factory.
pub fn default_registry() -> BackendRegistry {
    #[allow(unused_mut)]
    let mut registry = BackendRegistry::with_reference();
    // backend registrations (one line per backend crate):
    registry.register(Box::new(moe_cpu::CpuProvider));
    registry.register(Box::new(moe_cuda::CudaProvider));
    registry
}

/// Probes the CPU and, without ever panicking, the GPUs.
pub fn probe_hardware() -> Hardware {
    #[allow(unused_mut)]
    let mut hw = Hardware::cpu_only();
    // GPU probe (fills hw.gpus / hw.gpu_unavailable):
    moe_cuda::fill_hardware(&mut hw);
    hw
}

/// Extra lines for `moe info` from the device runtimes (e.g. the CUDA masked/contiguous switch).
pub fn runtime_notes(hw: &Hardware) -> Vec<String> {
    #[allow(unused_mut)]
    let mut notes = Vec::new();
    let _ = hw;
    // device runtime notes:
    notes.extend(moe_cuda::runtime_notes(hw));
    notes
}

/// The machine docs/capabilities.md describes: an x86-64 host with AVX-512 BF16 and one H100.
pub fn documented_hardware() -> Hardware {
    Hardware {
        cpu_threads: 16,
        cpu_features: ["sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512bf16"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        gpus: vec![moe_core::backend::GpuInfo {
            ordinal: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            memory_bytes: 80 << 30,
        }],
        gpu_unavailable: None,
    }
}

/// docs/capabilities.md: the capability table generated from every backend's `can_implement`
/// on [`documented_hardware`].
pub fn capability_doc() -> String {
    format!(
        "# Capability table\n\nGenerated from each backend's `can_implement` (do not edit; regenerate with\n`MOE_WRITE_CAPABILITIES=1 cargo test -p moe-runtime --test matrix capability_table`).\nMachine described: x86-64 with AVX-512 BF16, one H100 (sm_90). `moe info` prints the same\ntable for the machine it runs on. Base problem: 16 experts, top-4, hidden 512, intermediate 256,\nvaried along one axis per row.\n\n{}",
        default_registry().capability_table(&documented_hardware())
    )
}
