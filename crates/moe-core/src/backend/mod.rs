//! The expert backend contract.
//!
//! A backend computes experts on tokens that are already routed and dispatched; it never runs
//! communication, advances layer state or chunks. Its [`BackendProvider`] answers
//! `can_implement(problem, hardware)` with `Ok` or a precise reason, and creates instances.
//!
//! Weight lifecycle, in order: [`ExpertBackend::create_weights`] (allocate for a placement),
//! [`ExpertBackend::load_weights`] (copy/convert the canonical weights), then
//! [`ExpertBackend::post_load`] (repack into the layout the kernels want). Reload is
//! `load_weights` + `post_load` again and must give the same output.

use std::fmt;

use crate::config::MoeConfig;
use crate::error::Result;
use crate::routing::{Logical, Physical, TopK};
use crate::tensor::Tensor;
use crate::weights::{ExpertWeights, RouterWeights, SharedWeights};

pub mod reference;

/// Whether communication runs outside the backend (the scheduler calls dispatch/combine) or
/// inside it (a fused kernel that dispatches and computes, e.g. DeepEP-style low latency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// The scheduler calls `Communication::dispatch` / `combine` around `run_moe`.
    External,
    /// The backend communicates itself; the scheduler skips dispatch and combine.
    FusedCommunication,
}

/// A GPU as seen by the hardware probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Total memory in bytes.
    pub memory_bytes: u64,
}

/// What the machine offers, probed once by the runtime and passed to every `can_implement`.
#[derive(Debug, Clone, Default)]
pub struct Hardware {
    /// Logical CPU cores usable by the process.
    pub cpu_threads: usize,
    /// CPU SIMD features detected at run time (e.g. `avx512bf16`, `avx2`, `fma`).
    pub cpu_features: Vec<String>,
    /// GPUs that are usable.
    pub gpus: Vec<GpuInfo>,
    /// Why no GPU is usable (no libcuda, no device, driver too old...), when `gpus` is empty.
    pub gpu_unavailable: Option<String>,
}

impl Hardware {
    /// Probes the CPU only (GPU fields say why they are empty).
    pub fn cpu_only() -> Hardware {
        Hardware {
            cpu_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_features: detect_cpu_features(),
            gpus: Vec::new(),
            gpu_unavailable: Some("no GPU probe was run (CPU-only hardware description)".into()),
        }
    }

    /// Whether a CPU feature was detected.
    pub fn has_cpu_feature(&self, f: &str) -> bool {
        self.cpu_features.iter().any(|x| x == f)
    }
}

/// CPU features relevant to the kernels, detected at run time.
pub fn detect_cpu_features() -> Vec<String> {
    #[allow(unused_mut)]
    let mut v: Vec<String> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) { v.push($f.to_string()); }
            )*};
        }
        probe!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512bf16",
            "avx512fp16",
            "avx512vnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push("neon".into());
        }
    }
    v
}

/// Which experts (slots) a backend instance holds: slots `[start, start + count)` of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRange {
    /// First slot held.
    pub start: usize,
    /// Slots held.
    pub count: usize,
    /// Slots across all ranks.
    pub total: usize,
}

impl SlotRange {
    /// The range this rank holds under `cfg`.
    pub fn for_config(cfg: &MoeConfig) -> SlotRange {
        SlotRange { start: cfg.local_slot_start(), count: cfg.slots_per_rank(), total: cfg.num_slots() }
    }

    /// The local index of a global slot id, if this rank holds it.
    #[inline]
    pub fn local(&self, slot: i32) -> Option<usize> {
        let s = usize::try_from(slot).ok()?;
        (s >= self.start && s < self.start + self.count).then(|| s - self.start)
    }
}

/// The weights a backend loads: router and shared expert in full, routed experts for its slots.
#[derive(Debug, Clone)]
pub struct LocalWeights {
    /// Router.
    pub router: RouterWeights,
    /// Experts of the local slots, in slot order.
    pub experts: ExpertWeights,
    /// Shared expert.
    pub shared: Option<SharedWeights>,
}

/// Activations ready for a backend: possibly quantized, with their scales.
#[derive(Debug, Clone)]
pub struct BackendInput {
    /// `[T, H]`: the hidden states, or their quantized payload.
    pub hidden: Tensor,
    /// Per-token (per-group) scales when `hidden` is quantized.
    pub scales: Option<Tensor>,
}

impl BackendInput {
    /// Unquantized activations.
    pub fn plain(hidden: Tensor) -> Self {
        BackendInput { hidden, scales: None }
    }

    /// Tokens held.
    pub fn num_tokens(&self) -> usize {
        self.hidden.shape().first().copied().unwrap_or(0)
    }

    /// The activations as f32 `[T * H]`; an FP8 payload (u8 `hidden` plus f32 `scales`, the
    /// wire form of [`crate::quant::activation`]) is dequantized.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        crate::quant::activation::dequantize_input(self)
    }
}

/// An expert backend instance (one MoE layer's experts on one rank).
pub trait ExpertBackend: Send + fmt::Debug {
    /// Registered name.
    fn name(&self) -> &str;

    /// External or fused communication.
    fn scheduler_kind(&self) -> SchedulerKind {
        SchedulerKind::External
    }

    /// Allocates for the slots this instance will hold.
    fn create_weights(&mut self, slots: SlotRange) -> Result<()>;

    /// Loads (or reloads) canonical weights for the local slots.
    fn load_weights(&mut self, weights: &LocalWeights) -> Result<()>;

    /// Transforms loaded weights into the kernel layout.
    fn post_load(&mut self) -> Result<()>;

    /// Router logits `[T, E]` f32 (router linear + bias) for hidden `[T, H]`.
    fn router_logits(&mut self, hidden: &Tensor) -> Result<Tensor>;

    /// Routing of logits `[T, E]` (the config's method; correction bias from the loaded router).
    fn route(&mut self, logits: &Tensor) -> Result<TopK<Logical>>;

    /// Prepares activations for `run_moe` (quantizes them if the weight format computes that way).
    fn quantize_input(&mut self, hidden: &Tensor) -> Result<BackendInput>;

    /// Computes the local experts' share: `out[t] = sum_k w[t,k] * expert_{id[t,k]}(x[t])` over the
    /// `(t, k)` whose slot is local (others contribute zero). Returns f32 `[T, H]`.
    fn run_moe(&mut self, input: &BackendInput, routing: &TopK<Physical>) -> Result<Tensor>;

    /// Returns `routed + shared_expert(hidden)` (just `routed` without a shared expert), cast to
    /// the config's activation dtype: the block's final output.
    fn finalize(&mut self, hidden: &Tensor, routed: Tensor) -> Result<Tensor>;

    /// Replaces the weights of local slot `slot` (EPLB migration); default: unsupported.
    fn replace_slot(&mut self, slot: usize, weights: &ExpertWeights, src: usize) -> Result<()> {
        let _ = (slot, weights, src);
        Err(crate::MoeError::unsupported(self.name(), "live slot replacement (EPLB migration) is not implemented"))
    }
}

/// A registered backend: capability answers and a constructor.
pub trait BackendProvider: Send + Sync {
    /// Name used on the command line and in tables.
    fn name(&self) -> &'static str;

    /// Higher wins when several backends can implement a problem.
    fn priority(&self) -> i32;

    /// Opt-in backends are never picked by `auto`.
    fn opt_in(&self) -> bool {
        false
    }

    /// One-line description for `moe info`.
    fn description(&self) -> &'static str;

    /// `Ok` or the precise reason this backend cannot run `cfg` on `hw`.
    fn can_implement(&self, cfg: &MoeConfig, hw: &Hardware) -> std::result::Result<(), String>;

    /// A new backend instance for `cfg` (weights not yet created).
    fn create(&self, cfg: &MoeConfig, hw: &Hardware) -> Result<Box<dyn ExpertBackend>>;
}
