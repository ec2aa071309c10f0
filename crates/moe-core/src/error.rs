//! One error type for the core crate, split by category. Every variant names what to fix.

use thiserror::Error;

/// Result alias used across the workspace.
pub type Result<T, E = MoeError> = std::result::Result<T, E>;

/// Everything that can go wrong in the MoE runtime, by category.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MoeError {
    // ---- configuration ----
    /// A config field has a value the runtime cannot accept.
    #[error("invalid config field `{field}`: {reason}")]
    Config {
        /// The offending field (e.g. `top_k`).
        field: &'static str,
        /// What is wrong and what would be accepted.
        reason: String,
    },

    // ---- shapes and dtypes ----
    /// A tensor has the wrong shape for an operation.
    #[error("shape mismatch in {op}: expected {expected}, got {got}")]
    Shape {
        /// The operation that checked the shape.
        op: &'static str,
        /// The expected shape, in words or as `[a, b]`.
        expected: String,
        /// The shape that was passed.
        got: String,
    },
    /// A tensor has the wrong dtype for an operation.
    #[error("dtype mismatch in {op}: expected {expected}, got {got}")]
    DType {
        /// The operation that checked the dtype.
        op: &'static str,
        /// The accepted dtype(s).
        expected: String,
        /// The dtype that was passed.
        got: String,
    },
    /// Input contains NaN or infinity where the runtime refuses to guess.
    #[error("non-finite input in {op}: {detail}")]
    NonFinite {
        /// The operation that found it.
        op: &'static str,
        /// Which row/element and what value.
        detail: String,
    },

    // ---- backends and the factory ----
    /// A backend cannot implement the requested problem.
    #[error("backend `{backend}` cannot run this problem: {reason}")]
    Unsupported {
        /// Backend name.
        backend: String,
        /// The precise reason from `can_implement`.
        reason: String,
    },
    /// No backend with this name is registered.
    #[error("unknown backend `{name}`; available: {available}")]
    UnknownBackend {
        /// The requested name.
        name: String,
        /// Comma-separated registered names.
        available: String,
    },
    /// `auto` found no backend; every rejected candidate is listed with its reason.
    #[error("no backend can run this problem:\n{rejections}")]
    NoBackend {
        /// One line per candidate: `name: reason`.
        rejections: String,
    },
    /// The backend was used before its weights were loaded.
    #[error("backend `{backend}` has no weights loaded: call load_weights (and post_load) first")]
    WeightsNotLoaded {
        /// Backend name.
        backend: String,
    },

    // ---- checkpoints ----
    /// A checkpoint file or tensor is missing, malformed or unsupported.
    #[error("checkpoint error in {path} (tensor `{tensor}`): {reason}")]
    Checkpoint {
        /// The file (or directory) involved.
        path: String,
        /// The tensor name, or `-` when the file itself is at fault.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The requested layer is dense in this model.
    #[error("layer {layer} is not a MoE layer in this model: {reason}")]
    NotMoeLayer {
        /// Layer index.
        layer: usize,
        /// Which config rule makes it dense.
        reason: String,
    },

    // ---- quantization ----
    /// Quantized weights or scales are malformed.
    #[error("quantization error ({format}): {reason}")]
    Quant {
        /// The quant format name.
        format: String,
        /// What is wrong.
        reason: String,
    },

    // ---- communication ----
    /// A collective failed, timed out, or ranks disagree.
    #[error("communication error ({strategy}, rank {rank}): {reason}")]
    Comm {
        /// Strategy or transport name.
        strategy: String,
        /// The local rank.
        rank: usize,
        /// What happened.
        reason: String,
    },

    // ---- devices ----
    /// A device (GPU) error or an unavailable device/library.
    #[error("device error: {0}")]
    Device(String),

    // ---- wrapped ----
    /// An I/O error with the path involved.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl MoeError {
    /// Shorthand for a [`MoeError::Config`].
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        MoeError::Config { field, reason: reason.into() }
    }

    /// Shorthand for a [`MoeError::Shape`].
    pub fn shape(op: &'static str, expected: impl Into<String>, got: impl Into<String>) -> Self {
        MoeError::Shape { op, expected: expected.into(), got: got.into() }
    }

    /// Shorthand for a [`MoeError::Unsupported`].
    pub fn unsupported(backend: impl Into<String>, reason: impl Into<String>) -> Self {
        MoeError::Unsupported { backend: backend.into(), reason: reason.into() }
    }

    /// Shorthand for a [`MoeError::Checkpoint`].
    pub fn checkpoint(path: impl Into<String>, tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        MoeError::Checkpoint { path: path.into(), tensor: tensor.into(), reason: reason.into() }
    }

    /// Shorthand for a [`MoeError::Quant`].
    pub fn quant(format: impl Into<String>, reason: impl Into<String>) -> Self {
        MoeError::Quant { format: format.into(), reason: reason.into() }
    }
}
