//! The `cpu` expert backend: the fastest way this runtime knows to run a MoE block on a CPU.
//!
//! - Weights are repacked at `post_load` into 32-column blocks ([`pack`]) that the kernels stream
//!   front to back; bf16 weights are pair-packed for `vdpbf16ps` where the CPU has AVX-512 BF16,
//!   which is also the B-tile layout of AMX-BF16 (used for row tiles of 2 rows and more where the
//!   CPU and OS allow it).
//! - Kernels ([`kernels`]) are picked at run time: AVX-512 BF16, AVX-512F, AVX2+FMA+F16C, or a
//!   portable path ([`Isa`]); f16 and bf16 weights are otherwise widened to f32 in registers.
//! - The engine ([`engine`]) runs gate_up + activation + down per (expert, row tile) on the
//!   backend's spinning worker team ([`pool`]) with the intermediate kept in a per-thread
//!   buffer, or, when few experts are active
//!   (a handful of tokens), splits each expert's weights across threads.
//! - Buffers live in the backend and are reused across forwards.
//!
//! Quantized experts (every `moe_core::quant` format) run through [`quant`]: packed codes and
//! scales, dequantized row by row inside the tasks that use them.

pub mod backend;
pub mod engine;
pub mod experts;
pub mod isa;
pub mod kernels;
pub mod layout;
pub mod pack;
pub mod peak;
pub mod pool;
pub mod quant;
pub mod router;
pub mod tuning;

mod act;

use moe_core::backend::{BackendProvider, ExpertBackend, Hardware};
use moe_core::{MoeConfig, MoeError, Result};

pub use backend::CpuBackend;
pub use isa::Isa;

/// Provider of the `cpu` backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuProvider;

impl BackendProvider for CpuProvider {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn priority(&self) -> i32 {
        10
    }

    fn description(&self) -> &'static str {
        "host CPU: repacked weights, AMX-BF16 / AVX-512 BF16 / AVX-512 / AVX2 / portable kernels, multithreaded"
    }

    fn can_implement(&self, cfg: &MoeConfig, _hw: &Hardware) -> std::result::Result<(), String> {
        cfg.validate().map_err(|e| e.to_string())?;
        Isa::detect().map_err(|e| e.to_string())?;
        Ok(())
    }

    fn create(&self, cfg: &MoeConfig, hw: &Hardware) -> Result<Box<dyn ExpertBackend>> {
        self.can_implement(cfg, hw).map_err(|r| MoeError::unsupported("cpu", r))?;
        Ok(Box::new(CpuBackend::new(cfg.clone(), Isa::detect()?)))
    }
}
