//! Backend-vs-reference checks, shared by `moe check` and the test matrix: build the block on a
//! backend and on `reference`, feed both the same fresh random weights and input, compare.
//! Skips come only from `can_implement` reasons.

use moe_core::backend::Hardware;
use moe_core::compare::{rel_l2_tensors, tolerance};
use moe_core::weights::random_hidden;
use moe_core::{BackendRegistry, BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeWeights, QuantFormat, Result};

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
}

impl CheckCase {
    /// The block config of this case.
    pub fn config(&self) -> Result<MoeConfig> {
        let mut c = family_config(self.family, self.shape, self.dtype)?;
        c.quant = self.quant;
        c.chunk_size = self.chunk_size;
        Ok(c)
    }

    /// One-line description.
    pub fn label(&self) -> String {
        format!(
            "{} {} {} {} T={}{}",
            self.family,
            self.shape.name,
            self.dtype,
            self.quant,
            self.tokens,
            self.chunk_size.map(|c| format!(" chunk={c}")).unwrap_or_default()
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
    match run_pair(registry, hw, backend, &cfg, case.tokens, seed) {
        Ok(rel_err) => CheckOutcome::Ran { rel_err, tol: tolerance(cfg.act_dtype, cfg.weight_dtype, cfg.quant) },
        Err(e) => CheckOutcome::Failed(e.to_string()),
    }
}

fn run_pair(
    registry: &BackendRegistry,
    hw: &Hardware,
    backend: &str,
    cfg: &MoeConfig,
    tokens: usize,
    seed: u64,
) -> Result<f64> {
    let weights = MoeWeights::random(cfg, seed)?;
    let hidden = random_hidden(tokens, cfg.hidden_size, cfg.act_dtype, seed + 1)?;
    // The oracle: same (rounded) weights and input, f32 activations and output.
    let mut ref_cfg = cfg.clone();
    ref_cfg.act_dtype = DType::F32;
    ref_cfg.chunk_size = None;
    let mut reference = ConfigurableMoe::build(
        ref_cfg,
        registry,
        hw,
        BuildOptions { backend: "reference".into(), ..Default::default() },
    )?;
    reference.load_weights(&weights)?;
    let expected = reference.forward(&hidden.to_dtype(DType::F32)?)?;
    let mut moe = ConfigurableMoe::build(
        cfg.clone(),
        registry,
        hw,
        BuildOptions { backend: backend.into(), ..Default::default() },
    )?;
    moe.load_weights(&weights)?;
    let out = moe.forward(&hidden)?;
    if out.dtype() != cfg.act_dtype {
        return Err(moe_core::MoeError::DType {
            op: "check",
            expected: cfg.act_dtype.to_string(),
            got: out.dtype().to_string(),
        });
    }
    rel_l2_tensors(&out.to_host()?, &expected)
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
                v.push(CheckCase { family, shape, dtype, quant: QuantFormat::None, tokens, chunk_size: None });
            }
            v.push(CheckCase {
                family,
                shape: small,
                dtype,
                quant: QuantFormat::None,
                tokens: 23,
                chunk_size: Some(7),
            });
        }
    }
    v
}
