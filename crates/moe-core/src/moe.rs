//! The assembler: builds backend, communication and scheduler (in that order), validates them
//! together, owns the weight lifecycle and per-iteration state, and exposes `forward`.

use crate::backend::{ExpertBackend, Hardware, LocalWeights, SlotRange};
use crate::comm::{Communication, LocalComm};
use crate::config::MoeConfig;
use crate::eplb::{LoadBalancer, NoEplb};
use crate::error::{MoeError, Result};
use crate::factory::{BackendRegistry, Selection};
use crate::scheduler::{LogitsSource, Scheduler};
use crate::tensor::Tensor;
use crate::weights::MoeWeights;

/// One MoE block, assembled.
#[derive(Debug)]
pub struct ConfigurableMoe {
    cfg: MoeConfig,
    backend: Box<dyn ExpertBackend>,
    comm: Box<dyn Communication>,
    scheduler: Scheduler,
    eplb: Box<dyn LoadBalancer>,
    selection: Selection,
    iteration: u64,
    loaded: bool,
}

/// Options for [`ConfigurableMoe::build`].
#[derive(Debug)]
pub struct BuildOptions {
    /// `auto` or a backend name.
    pub backend: String,
    /// The communication strategy (defaults to [`LocalComm`]).
    pub comm: Option<Box<dyn Communication>>,
    /// The load balancer (defaults to [`NoEplb`]).
    pub eplb: Option<Box<dyn LoadBalancer>>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions { backend: "auto".into(), comm: None, eplb: None }
    }
}

impl ConfigurableMoe {
    /// Builds the block: backend (via the registry), then communication, then scheduler.
    pub fn build(cfg: MoeConfig, registry: &BackendRegistry, hw: &Hardware, opts: BuildOptions) -> Result<Self> {
        cfg.validate()?;
        let (mut backend, selection) = registry.create(&opts.backend, &cfg, hw)?;
        let comm = opts.comm.unwrap_or_else(|| Box::new(LocalComm));
        comm.is_workload_feasible(&cfg, 0).map_err(|reason| MoeError::Comm {
            strategy: comm.name().to_string(),
            rank: comm.rank().0,
            reason,
        })?;
        let (rank, world) = comm.rank();
        if (rank, world) != (cfg.parallel.ep_rank, cfg.parallel.ep_size) {
            return Err(MoeError::config(
                "parallel",
                format!(
                    "config says rank {} of {}, communication says rank {rank} of {world}",
                    cfg.parallel.ep_rank, cfg.parallel.ep_size
                ),
            ));
        }
        let scheduler = Scheduler::new(&cfg);
        let eplb = opts.eplb.unwrap_or_else(|| Box::new(NoEplb::new(cfg.num_experts)));
        if eplb.slot_to_expert().len() != cfg.num_slots() {
            return Err(MoeError::config(
                "eplb_slots",
                format!("the placement has {} slots, the config {}", eplb.slot_to_expert().len(), cfg.num_slots()),
            ));
        }
        backend.create_weights(SlotRange::for_config(&cfg))?;
        Ok(ConfigurableMoe { cfg, backend, comm, scheduler, eplb, selection, iteration: 0, loaded: false })
    }

    /// Loads (or reloads) the block's weights: the local slots are cut out per the placement.
    pub fn load_weights(&mut self, weights: &MoeWeights) -> Result<()> {
        weights.validate(&self.cfg)?;
        // A migrating balancer stages the experts it may move into slots later.
        self.eplb.on_load_weights(&weights.experts)?;
        let slots = SlotRange::for_config(&self.cfg);
        let map = self.eplb.slot_to_expert();
        let local: Vec<usize> = map[slots.start..slots.start + slots.count].to_vec();
        let local = LocalWeights {
            router: weights.router.clone(),
            experts: weights.experts.select_experts(&local)?,
            shared: weights.shared.clone(),
        };
        self.backend.load_weights(&local)?;
        self.backend.post_load()?;
        self.loaded = true;
        Ok(())
    }

    /// The block's output `[T, H]` (act dtype) for `hidden [T, H]`, router included.
    pub fn forward(&mut self, hidden: &Tensor) -> Result<Tensor> {
        self.run(hidden, LogitsSource::Router)
    }

    /// As [`Self::forward`] with precomputed router logits `[T, E]`.
    pub fn forward_with_logits(&mut self, hidden: &Tensor, logits: &Tensor) -> Result<Tensor> {
        logits.expect_shape("forward_with_logits", &[hidden.dim(0)?, self.cfg.num_experts])?;
        self.run(hidden, LogitsSource::Given(logits))
    }

    fn run(&mut self, hidden: &Tensor, logits: LogitsSource<'_>) -> Result<Tensor> {
        if !self.loaded {
            return Err(MoeError::WeightsNotLoaded { backend: self.backend.name().to_string() });
        }
        let out =
            self.scheduler.forward(self.backend.as_mut(), self.comm.as_mut(), self.eplb.as_mut(), hidden, logits)?;
        self.iteration += 1;
        Ok(out)
    }

    /// The config.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// How the backend was chosen.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    /// The communication strategy's name.
    pub fn comm_name(&self) -> &str {
        self.comm.name()
    }

    /// Forwards run so far.
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// The load balancer.
    pub fn eplb(&self) -> &dyn LoadBalancer {
        self.eplb.as_ref()
    }
}
