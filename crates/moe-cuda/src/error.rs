//! The CUDA crate's errors, converted into [`moe_core::MoeError::Device`] at the API boundary.

use thiserror::Error;

/// Everything that can go wrong below the backend.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CudaError {
    /// A CUDA library or device is not usable; the reason says what to install or set.
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),
    /// A driver call failed.
    #[error("CUDA driver error in {op}: {detail}")]
    Driver {
        /// What was being done.
        op: &'static str,
        /// The driver's error.
        detail: String,
    },
    /// NVRTC refused a module.
    #[error(
        "NVRTC failed to compile module `{module}` (kernels: {kernels}) for {arch} with options {options:?}:\n{log}"
    )]
    Compile {
        /// Module (file) name.
        module: &'static str,
        /// The kernels the module defines.
        kernels: String,
        /// Target architecture.
        arch: String,
        /// Options passed to NVRTC.
        options: Vec<String>,
        /// NVRTC's log.
        log: String,
    },
    /// The kernel cache directory could not be used.
    #[error("kernel cache error at {path}: {source}")]
    Cache {
        /// The file or directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A device-side check failed (non-finite logits, out-of-range ids).
    #[error("{0}")]
    Kernel(String),
}

impl CudaError {
    /// Wraps a driver error with the operation that failed.
    pub fn driver(op: &'static str, e: impl std::fmt::Debug) -> Self {
        CudaError::Driver { op, detail: format!("{e:?}") }
    }
}

impl From<CudaError> for moe_core::MoeError {
    fn from(e: CudaError) -> Self {
        moe_core::MoeError::Device(e.to_string())
    }
}

/// Result alias for this crate's internals.
pub type CudaResult<T> = std::result::Result<T, CudaError>;
