//! The `cuda` provider: capability answers with precise reasons, and construction.

use moe_core::backend::{BackendProvider, ExpertBackend, Hardware};
use moe_core::config::RoutingConfig;
use moe_core::{DType, MoeConfig, MoeError, QuantFormat, Result};

use crate::backend::CudaBackend;

/// Oldest compute capability the kernels run on (bf16 mma.sync, cp.async, ldmatrix).
pub const MIN_COMPUTE_CAPABILITY: (u32, u32) = (8, 0);
/// Largest expert count the routing kernel keeps in shared memory.
pub const MAX_EXPERTS: usize = 1024;
/// Largest group count of grouped top-k.
pub const MAX_GROUPS: usize = 64;

/// Registers as `cuda`, priority 100 (auto prefers it when a GPU can run the problem).
#[derive(Debug, Default)]
pub struct CudaProvider;

/// The GPU a rank uses: ranks are spread over the visible GPUs in order.
pub fn ordinal_for(cfg: &MoeConfig, hw: &Hardware) -> usize {
    cfg.parallel.ep_rank % hw.gpus.len().max(1)
}

impl BackendProvider for CudaProvider {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn priority(&self) -> i32 {
        100
    }

    fn description(&self) -> &'static str {
        "NVIDIA GPUs: NVRTC-compiled routing/permute kernels and tensor-core grouped GEMMs (bf16/f16; weight-only \
         dequantize-in-GEMM for fp8/mxfp4/nvfp4/int4/int8)"
    }

    fn can_implement(&self, cfg: &MoeConfig, hw: &Hardware) -> std::result::Result<(), String> {
        cfg.validate().map_err(|e| e.to_string())?;
        if let Some(reason) = crate::quant::refuse(cfg) {
            return Err(reason);
        }
        // Quantized formats carry their own storage; only the activation dtype matters then.
        let weight_dtype = if cfg.quant == QuantFormat::None { cfg.weight_dtype } else { cfg.act_dtype };
        match (cfg.act_dtype, weight_dtype) {
            (DType::BF16, DType::BF16) | (DType::F16, DType::F16) => {}
            (DType::F32, _) | (_, DType::F32) => {
                return Err("f32 is not supported: the CUDA kernels are bf16/f16 tensor-core GEMMs with f32 \
                            accumulation (use bf16 or f16)"
                    .into())
            }
            (a, w) => return Err(format!("activations ({a}) and weights ({w}) must share one 16-bit dtype")),
        }
        let mut dims = vec![("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size)];
        if let Some(s) = cfg.shared_expert {
            dims.push(("shared_expert.intermediate_size", s.intermediate_size));
        }
        for (name, v) in dims {
            if v % 8 != 0 {
                return Err(format!("{name} = {v} is not a multiple of 8 (16-byte vector loads)"));
            }
        }
        if cfg.num_experts > MAX_EXPERTS {
            return Err(format!("{} experts exceed the routing kernel's limit of {MAX_EXPERTS}", cfg.num_experts));
        }
        if let RoutingConfig::DeepseekV3 { n_group, .. }
        | RoutingConfig::DeepseekV2 {
            method: moe_core::config::V2TopkMethod::GroupLimitedGreedy { n_group, .. },
            ..
        } = cfg.routing
        {
            if n_group > MAX_GROUPS {
                return Err(format!("n_group = {n_group} exceeds the routing kernel's limit of {MAX_GROUPS}"));
            }
        }
        if hw.gpus.is_empty() {
            return Err(format!(
                "no usable GPU: {}",
                hw.gpu_unavailable.as_deref().unwrap_or("the hardware description lists none")
            ));
        }
        let gpu = &hw.gpus[ordinal_for(cfg, hw)];
        if gpu.compute_capability < MIN_COMPUTE_CAPABILITY {
            return Err(format!(
                "GPU {} ({}) has compute capability {}.{}; the cuda backend needs {}.{} or newer",
                gpu.ordinal,
                gpu.name,
                gpu.compute_capability.0,
                gpu.compute_capability.1,
                MIN_COMPUTE_CAPABILITY.0,
                MIN_COMPUTE_CAPABILITY.1
            ));
        }
        Ok(())
    }

    fn create(&self, cfg: &MoeConfig, hw: &Hardware) -> Result<Box<dyn ExpertBackend>> {
        self.can_implement(cfg, hw).map_err(|r| MoeError::unsupported("cuda", r))?;
        Ok(Box::new(CudaBackend::new(cfg.clone(), ordinal_for(cfg, hw))?))
    }
}
