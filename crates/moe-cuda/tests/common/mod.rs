//! Helpers shared by the GPU integration tests: the hardware the provider sees, the skip rule
//! (the provider's `can_implement` reason), and a poisoned `cuda` backend paired with `reference`
//! (f32 activations) over the same local weights.
#![allow(dead_code)] // each test binary uses a subset

use moe_core::backend::reference::ReferenceBackend;
use moe_core::backend::{BackendProvider, ExpertBackend, Hardware, LocalWeights, SlotRange};
use moe_core::{DType, MoeConfig};
use moe_cuda::{CudaBackend, CudaProvider};

pub fn hardware() -> Hardware {
    let mut hw = Hardware::cpu_only();
    moe_cuda::fill_hardware(&mut hw);
    hw
}

/// `Some(hw)` when the provider accepts `cfg`; otherwise prints the skip reason.
pub fn usable(cfg: &MoeConfig, what: &str) -> Option<Hardware> {
    let hw = hardware();
    match CudaProvider.can_implement(cfg, &hw) {
        Ok(()) => Some(hw),
        Err(reason) => {
            eprintln!("skip {what}: {reason}");
            None
        }
    }
}

/// Every slot of `cfg`.
pub fn full(cfg: &MoeConfig) -> SlotRange {
    SlotRange { start: 0, count: cfg.num_experts, total: cfg.num_experts }
}

pub struct Pair {
    pub cuda: CudaBackend,
    pub reference: ReferenceBackend,
}

/// A poisoned `cuda` backend and the f32 `reference`, both holding `lw` in `slots`.
pub fn pair_with(cfg: &MoeConfig, lw: &LocalWeights, slots: SlotRange, hw: &Hardware) -> Pair {
    let mut cuda = CudaBackend::new(cfg.clone(), moe_cuda::provider::ordinal_for(cfg, hw)).unwrap();
    cuda.set_poison(true);
    let mut ref_cfg = cfg.clone();
    ref_cfg.act_dtype = DType::F32;
    let mut reference = ReferenceBackend::new(ref_cfg);
    for b in [&mut cuda as &mut dyn ExpertBackend, &mut reference] {
        b.create_weights(slots).unwrap();
        b.load_weights(lw).unwrap();
        b.post_load().unwrap();
    }
    Pair { cuda, reference }
}
