//! Backend-vs-reference checks, shared by `moe check` and the test matrix: build the block on a
//! backend and on `reference`, feed both the same fresh random weights and input, compare.
//! Skips come only from `can_implement` reasons.

use std::time::Duration;

use moe_core::backend::Hardware;
use moe_core::comm::{create_communication, run_in_process, CommOptions, SharedTransport, StrategyChoice};
use moe_core::compare::{rel_l2_tensors, tolerance};
use moe_core::config::ParallelConfig;
use moe_core::eplb::balancer::{DynamicEplb, EplbOptions};
use moe_core::weights::random_hidden;
use moe_core::{
    BackendRegistry, BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeWeights, QuantFormat, Result, Tensor,
};

use crate::presets::{family_config, Shape};

/// One point of the matrix.
#[derive(Debug, Clone)]
pub struct CheckCase {
    /// Model family (routing/activation/shared expert semantics).
    pub family: &'static str,
    /// Shape.
    pub shape: Shape,
    /// Weight and activation dtype.
    pub dtype: DType,
    /// Weight format.
    pub quant: QuantFormat,
    /// Tokens.
    pub tokens: usize,
    /// Scheduler chunk size.
    pub chunk_size: Option<usize>,
    /// Expert-parallel ranks (in-process threads) and the strategy; `1` runs the local path.
    pub ep: usize,
    /// Communication strategy when `ep > 1`.
    pub strategy: StrategyChoice,
    /// Physical slots for dynamic EPLB (experts plus replicas); the balancer re-plans and
    /// migrates weights after every forward, and each forward must still match the reference.
    pub eplb_slots: Option<usize>,
}

impl CheckCase {
    /// The block config of this case.
    pub fn config(&self) -> Result<MoeConfig> {
        let mut c = family_config(self.family, self.shape, self.dtype)?;
        c.quant = self.quant;
        c.chunk_size = self.chunk_size;
        c.eplb_slots = self.eplb_slots;
        c.validate()?;
        Ok(c)
    }

    /// A single-rank, unchunked, unquantized case.
    pub fn new(family: &'static str, shape: Shape, dtype: DType, tokens: usize) -> Self {
        CheckCase {
            family,
            shape,
            dtype,
            quant: QuantFormat::None,
            tokens,
            chunk_size: None,
            ep: 1,
            strategy: StrategyChoice::Local,
            eplb_slots: None,
        }
    }

    /// One-line description.
    pub fn label(&self) -> String {
        format!(
            "{} {} {} {} T={}{}{}{}",
            self.family,
            self.shape.name,
            self.dtype,
            self.quant,
            self.tokens,
            self.chunk_size.map(|c| format!(" chunk={c}")).unwrap_or_default(),
            if self.ep > 1 { format!(" ep={} {:?}", self.ep, self.strategy) } else { String::new() },
            self.eplb_slots.map(|n| format!(" eplb={n}")).unwrap_or_default()
        )
    }
}

/// The outcome of one case on one backend.
#[derive(Debug, Clone)]
pub enum CheckOutcome {
    /// Ran; relative L2 error and the tolerance it was held to.
    Ran {
        /// Relative L2 error vs reference.
        rel_err: f64,
        /// Tolerance.
        tol: f64,
    },
    /// `can_implement` refused, with its reason.
    Skipped(String),
    /// The backend accepted the problem and then failed.
    Failed(String),
}

impl CheckOutcome {
    /// Whether this outcome is acceptable (ran within tolerance, or skipped with a reason).
    pub fn ok(&self) -> bool {
        match self {
            CheckOutcome::Ran { rel_err, tol } => rel_err <= tol,
            CheckOutcome::Skipped(_) => true,
            CheckOutcome::Failed(_) => false,
        }
    }
}

/// Runs `case` on `backend` and on `reference` with the same weights and input (seeded).
pub fn check_case(
    registry: &BackendRegistry,
    hw: &Hardware,
    backend: &str,
    case: &CheckCase,
    seed: u64,
) -> CheckOutcome {
    let cfg = match case.config() {
        Ok(c) => c,
        Err(e) => return CheckOutcome::Failed(format!("bad case: {e}")),
    };
    let provider = match registry.providers().into_iter().find(|p| p.name() == backend) {
        Some(p) => p,
        None => return CheckOutcome::Failed(format!("backend `{backend}` is not registered")),
    };
    if let Err(reason) = provider.can_implement(&cfg, hw) {
        return CheckOutcome::Skipped(reason);
    }
    match run_pair(registry, hw, backend, &cfg, case, seed) {
        Ok(rel_err) => CheckOutcome::Ran { rel_err, tol: tolerance(cfg.act_dtype, cfg.weight_dtype, cfg.quant) },
        Err(e) => CheckOutcome::Failed(e.to_string()),
    }
}

fn run_pair(
    registry: &BackendRegistry,
    hw: &Hardware,
    backend: &str,
    cfg: &MoeConfig,
    case: &CheckCase,
    seed: u64,
) -> Result<f64> {
    let weights = MoeWeights::random(cfg, seed)?;
    let hidden = random_hidden(case.tokens, cfg.hidden_size, cfg.act_dtype, seed + 1)?;
    // The oracle: same (rounded) weights and input, f32 activations and output.
    let mut ref_cfg = cfg.clone();
    ref_cfg.act_dtype = DType::F32;
    ref_cfg.chunk_size = None;
    ref_cfg.eplb_slots = None;
    let mut reference = ConfigurableMoe::build(
        ref_cfg,
        registry,
        hw,
        BuildOptions { backend: "reference".into(), ..Default::default() },
    )?;
    reference.load_weights(&weights)?;
    let expected = reference.forward(&hidden.to_dtype(DType::F32)?)?;
    let out = if case.ep > 1 {
        run_expert_parallel(registry, hw, backend, cfg, case, &weights, &hidden)?
    } else if cfg.eplb_slots.is_some() {
        return run_dynamic_eplb(registry, hw, backend, cfg, &weights, &hidden, &expected);
    } else {
        let mut moe = ConfigurableMoe::build(
            cfg.clone(),
            registry,
            hw,
            BuildOptions { backend: backend.into(), ..Default::default() },
        )?;
        moe.load_weights(&weights)?;
        moe.forward(&hidden)?
    };
    if out.dtype() != cfg.act_dtype {
        return Err(moe_core::MoeError::DType {
            op: "check",
            expected: cfg.act_dtype.to_string(),
            got: out.dtype().to_string(),
        });
    }
    rel_l2_tensors(&out.to_host()?, &expected)
}

/// Three forwards under a dynamic balancer that re-plans and migrates weights between slots after
/// every forward; returns the worst relative error against the reference output.
fn run_dynamic_eplb(
    registry: &BackendRegistry,
    hw: &Hardware,
    backend: &str,
    cfg: &MoeConfig,
    weights: &MoeWeights,
    hidden: &Tensor,
    expected: &Tensor,
) -> Result<f64> {
    let opts = EplbOptions { window: 1, interval: 1, min_gain: 0.0, ..EplbOptions::for_config(cfg) };
    let eplb = DynamicEplb::single_rank(cfg, opts)?;
    let bo = BuildOptions { backend: backend.into(), comm: None, eplb: Some(Box::new(eplb)) };
    let mut moe = ConfigurableMoe::build(cfg.clone(), registry, hw, bo)?;
    moe.load_weights(weights)?;
    let mut worst = 0.0f64;
    let mut placements = vec![moe.eplb().slot_to_expert()];
    for _ in 0..3 {
        let out = moe.forward(hidden)?;
        worst = worst.max(rel_l2_tensors(&out.to_host()?, expected)?);
        placements.push(moe.eplb().slot_to_expert());
    }
    if placements.windows(2).all(|p| p[0] == p[1]) {
        return Err(moe_core::MoeError::config(
            "eplb_slots",
            "the dynamic balancer never migrated a slot, so this case would test nothing",
        ));
    }
    Ok(worst)
}

/// Runs `case.ep` in-process ranks of `backend`; rank `r < ep - 1` holds a share of the tokens
/// proportional to `r + 1` and the last rank holds none, as data-parallel attention may hand
/// them over: uneven counts and a zero-token rank that still joins every collective.
fn run_expert_parallel(
    registry: &BackendRegistry,
    hw: &Hardware,
    backend: &str,
    cfg: &MoeConfig,
    case: &CheckCase,
    weights: &MoeWeights,
    hidden: &Tensor,
) -> Result<Tensor> {
    let ep = case.ep;
    let total: usize = (1..ep).sum();
    let mut counts: Vec<usize> = (0..ep).map(|r| if r + 1 < ep { case.tokens * (r + 1) / total } else { 0 }).collect();
    counts[0] += case.tokens - counts.iter().sum::<usize>();
    let offsets: Vec<usize> = counts.iter().scan(0, |a, &c| Some(std::mem::replace(a, *a + c))).collect();
    let outs = run_in_process(ep, Duration::from_secs(60), |rank, transport| {
        let mut c = cfg.clone();
        c.parallel = ParallelConfig { ep_size: ep, ep_rank: rank };
        let opts = CommOptions { choice: case.strategy, ..Default::default() };
        let (comm, _stats) = create_communication(&c, SharedTransport::new(Box::new(transport)), &opts)?;
        let bo = BuildOptions { backend: backend.into(), comm: Some(comm), eplb: None };
        let mut moe = ConfigurableMoe::build(c, registry, hw, bo)?;
        moe.load_weights(weights)?;
        moe.forward(&hidden.narrow_rows(offsets[rank], counts[rank])?)?.to_host()
    })?;
    Tensor::cat_rows(&outs, &[cfg.hidden_size], cfg.act_dtype)
}

/// The cases `moe check` runs: every family on a small and a medium shape, f32 and bf16, a
/// few token counts including 0 and 1, one chunked case.
pub fn default_cases(quick: bool) -> Vec<CheckCase> {
    let small = Shape { name: "check-small", experts: 16, top_k: 4, hidden: 128, intermediate: 64 };
    let medium = Shape { name: "check-medium", experts: 32, top_k: 8, hidden: 512, intermediate: 256 };
    let mut v = Vec::new();
    for family in crate::presets::FAMILIES {
        for dtype in [DType::F32, DType::BF16] {
            for (shape, tokens) in [(small, 0), (small, 1), (small, 37), (medium, 64)] {
                if quick && shape == medium {
                    continue;
                }
                v.push(CheckCase::new(family, shape, dtype, tokens));
            }
            v.push(CheckCase { chunk_size: Some(7), ..CheckCase::new(family, small, dtype, 23) });
        }
        // Communication axis: in-process expert parallelism, both strategies, uneven tokens.
        for (ep, strategy, dtype) in [
            (2, StrategyChoice::AllToAll, DType::F32),
            (4, StrategyChoice::AllGatherReduceScatter, DType::F32),
            (2, StrategyChoice::AllGatherReduceScatter, DType::BF16),
            (4, StrategyChoice::AllToAll, DType::BF16),
        ] {
            v.push(CheckCase { ep, strategy, chunk_size: Some(8), ..CheckCase::new(family, small, dtype, 29) });
        }
        // EPLB axis: 16 experts in 24 slots, re-planned and migrated after every forward.
        for dtype in [DType::F32, DType::BF16] {
            v.push(CheckCase { eplb_slots: Some(24), chunk_size: Some(9), ..CheckCase::new(family, small, dtype, 31) });
        }
    }
    // Quant axis: every weight format on a shape its groups divide (vs the same quantized
    // weights dequantized by the reference).
    let quant_shape = Shape { name: "check-quant", experts: 16, top_k: 4, hidden: 256, intermediate: 128 };
    for quant in QuantFormat::ALL {
        for family in ["qwen3_moe", "gpt_oss"] {
            v.push(CheckCase { quant, ..CheckCase::new(family, quant_shape, DType::BF16, 19) });
        }
    }
    v
}
