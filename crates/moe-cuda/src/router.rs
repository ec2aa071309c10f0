//! Router logits at large token counts: cuBLAS SGEMM in f32 (TF32 off, so logits stay within the
//! f32 reference's tolerance and expert choices match it), after a kernel that widens the
//! activations to f32 and writes the bias rows the SGEMM adds to. Small token counts keep the
//! warp-per-(token, expert) kernel, which needs no f32 copy of the activations (switch measured in
//! docs/perf/cuda.md). libcublas is loaded at run time; without it every size uses the kernel.

use std::sync::{Arc, OnceLock};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::CudaContext;

use crate::device::CudaDevice;
use crate::error::{CudaError, CudaResult};

/// Default switch: cuBLAS from this many multiply-adds (`T * experts * hidden`). Below it the
/// warp kernel is faster (cuBLAS plus the f32 widening cost ~20 us at any size); measured on the
/// H100 (docs/perf/cuda.md): deepseek-v3 crosses at T ~ 24 (44 M), qwen3-30b-a3b between 128
/// (34 M, kernel faster) and 1024.
pub const ROUTER_BLAS_MIN_MACS: usize = 48_000_000;

/// Tokens per SGEMM: bounds the f32 activation scratch (`CHUNK * H * 4` bytes).
pub(crate) const CHUNK: usize = 4096;

/// The switch point for `experts` x `hidden`: `MOE_CUDA_ROUTER_BLAS_MIN_TOKENS` or the token count
/// that reaches [`ROUTER_BLAS_MIN_MACS`].
pub fn router_blas_min_tokens(experts: usize, hidden: usize) -> usize {
    std::env::var("MOE_CUDA_ROUTER_BLAS_MIN_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| ROUTER_BLAS_MIN_MACS.div_ceil((experts * hidden).max(1)))
}

/// `Ok` when libcublas can be loaded, else the reason (probed once).
pub fn cublas_available() -> Result<(), String> {
    static PRESENT: OnceLock<Result<(), String>> = OnceLock::new();
    PRESENT
        .get_or_init(|| {
            // SAFETY: probes for the library by name only; a loader panic is caught.
            match std::panic::catch_unwind(|| unsafe { blas_sys::is_culib_present() }) {
                Ok(true) => Ok(()),
                _ => Err("libcublas not found (install the CUDA toolkit's cuBLAS or add it to the library path); \
                          the router uses its f32 kernel at every size"
                    .into()),
            }
        })
        .clone()
}

struct Handle {
    h: blas_sys::cublasHandle_t,
    ctx: Arc<CudaContext>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: our handle, destroyed once; its queued work is stream-ordered before any reuse
        // of the buffers it read.
        let _ = unsafe { blas::destroy_handle(self.h) };
    }
}

/// The cuBLAS router of one backend: the switch point and a lazily created handle.
pub(crate) struct RouterGemm {
    min_tokens: usize,
    handle: Option<Handle>,
    failed: Option<String>,
}

// SAFETY: the cuBLAS handle is only used through `&mut self` (one thread at a time), with its
// context bound first; cuBLAS handles may move between threads.
unsafe impl Send for RouterGemm {}

impl std::fmt::Debug for RouterGemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouterGemm(min_tokens {}, handle {})", self.min_tokens, self.handle.is_some())
    }
}

impl RouterGemm {
    /// The switch point from the environment.
    pub(crate) fn from_env(experts: usize, hidden: usize) -> Self {
        RouterGemm { min_tokens: router_blas_min_tokens(experts, hidden), handle: None, failed: None }
    }

    pub(crate) fn set_min_tokens(&mut self, t: usize) {
        self.min_tokens = t;
    }

    /// Whether `tokens` tokens go through cuBLAS (creating the handle on first use; a failure is
    /// logged once and leaves the kernel in charge).
    pub(crate) fn ready(&mut self, dev: &CudaDevice, tokens: usize) -> bool {
        if tokens < self.min_tokens || self.failed.is_some() || cublas_available().is_err() {
            return false;
        }
        match self.handle(dev) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("cuda router: cuBLAS unusable, keeping the f32 kernel: {e}");
                self.failed = Some(e.to_string());
                false
            }
        }
    }

    fn handle(&mut self, dev: &CudaDevice) -> CudaResult<blas_sys::cublasHandle_t> {
        if let Some(h) = &self.handle {
            return Ok(h.h);
        }
        dev.context().bind_to_thread().map_err(|e| CudaError::driver("bind context", e))?;
        let h = blas::create_handle().map_err(|e| CudaError::driver("cublasCreate", e))?;
        let handle = Handle { h, ctx: dev.context().clone() };
        // SAFETY: a fresh handle; the stream belongs to this device's context.
        unsafe { blas::set_stream(h, dev.stream().cu_stream() as _) }
            .map_err(|e| CudaError::driver("cublasSetStream", e))?;
        // Plain f32 FMA: no TF32 tensor-op math (its 10-bit mantissa would move logits by ~1e-3).
        // SAFETY: a live handle.
        let st = unsafe { blas_sys::cublasSetMathMode(h, blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH) };
        if st != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(CudaError::Driver { op: "cublasSetMathMode", detail: format!("{st:?}") });
        }
        self.handle = Some(handle);
        Ok(h)
    }

    /// `logits[t, e] = x32[t, :] . w[e, :] + beta * logits[t, e]` for `tokens` rows (row-major,
    /// f32, device addresses), queued on the device's stream.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sgemm(
        &mut self,
        dev: &CudaDevice,
        w: u64,
        x32: u64,
        logits: u64,
        tokens: usize,
        experts: usize,
        hidden: usize,
        beta: f32,
    ) -> CudaResult<()> {
        let h = self.handle(dev)?;
        let alpha = 1.0f32;
        // Column-major view: logits^T [E, T] = W [H, E]^T x32 [H, T].
        // SAFETY: `w` holds E * H, `x32` T * H and `logits` T * E live f32 elements on this
        // device; the scalars are host f32 as the default pointer mode expects.
        unsafe {
            blas::sgemm(
                h,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                experts as i32,
                tokens as i32,
                hidden as i32,
                &alpha,
                w as *const f32,
                hidden as i32,
                x32 as *const f32,
                hidden as i32,
                &beta,
                logits as *mut f32,
                experts as i32,
            )
        }
        .map_err(|e| CudaError::driver("cublasSgemm (router logits)", e))
    }
}
