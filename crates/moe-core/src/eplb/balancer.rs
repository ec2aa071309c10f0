//! The two load balancers: [`StaticEplb`] (one placement for the whole run, from a file or
//! computed once from a load profile) and [`DynamicEplb`] (collects statistics and, every
//! `interval` forwards, plans a new placement from the window and migrates weights into slots).

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::{ExpertBackend, SlotRange};
use crate::comm::SharedTransport;
use crate::config::{MoeConfig, RoutingConfig, V2TopkMethod};
use crate::error::{MoeError, Result};
use crate::routing::{route_host, Logical, Physical, TopK};
use crate::tensor::Tensor;
use crate::weights::{ExpertWeights, MoeWeights};

use super::migration::{apply_moves, migrate, plan_moves, BackendSlots, HostStaging};
use super::placement::Placement;
use super::policy::{rebalance, Policy, Topology};
use super::stats::{CountReducer, LoadWindow, SingleRank, TransportReducer};
use super::LoadBalancer;

/// Settings of the rebalancing policy and of dynamic rebalancing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EplbOptions {
    /// Which policy plans placements.
    pub policy: Policy,
    /// Nodes the ranks are spread over (hierarchical policy).
    pub num_nodes: usize,
    /// Expert groups (DeepSeek `n_group`; 1 when the model has none).
    pub num_groups: usize,
    /// Forwards of statistics a dynamic plan looks at.
    pub window: usize,
    /// A dynamic balancer plans every `interval` forwards.
    pub interval: usize,
    /// Migrate only when the planned max/mean rank load beats the current one by at least this
    /// much (0 applies every plan that differs from the current placement).
    pub min_gain: f64,
}

impl EplbOptions {
    /// Defaults for `cfg`: groups from its routing (DeepSeek `n_group`), one node, auto policy,
    /// a window of 16 forwards, a plan every 8, migrate for a 1% gain.
    pub fn for_config(cfg: &MoeConfig) -> Self {
        let num_groups = match cfg.routing {
            RoutingConfig::DeepseekV3 { n_group, .. } => n_group,
            RoutingConfig::DeepseekV2 { method: V2TopkMethod::GroupLimitedGreedy { n_group, .. }, .. } => n_group,
            _ => 1,
        };
        EplbOptions { policy: Policy::Auto, num_nodes: 1, num_groups, window: 16, interval: 8, min_gain: 0.01 }
    }

    /// The topology for `cfg` under these options.
    pub fn topology(&self, cfg: &MoeConfig) -> Topology {
        Topology {
            num_slots: cfg.num_slots(),
            num_ranks: cfg.parallel.ep_size,
            num_nodes: self.num_nodes,
            num_groups: self.num_groups,
        }
    }
}

fn check_placement(cfg: &MoeConfig, p: &Placement) -> Result<()> {
    if p.num_experts() != cfg.num_experts || p.num_slots() != cfg.num_slots() {
        return Err(MoeError::config(
            "eplb_slots",
            format!(
                "the placement has {} experts on {} slots; the config {} experts on {} slots (set eplb_slots)",
                p.num_experts(),
                p.num_slots(),
                cfg.num_experts,
                cfg.num_slots()
            ),
        ));
    }
    Ok(())
}

/// Max/mean of per-rank loads (1.0 is perfect; 1.0 for no load at all).
pub fn imbalance(rank_loads: &[f64]) -> f64 {
    let mean = rank_loads.iter().sum::<f64>() / rank_loads.len().max(1) as f64;
    let max = rank_loads.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 {
        max / mean
    } else {
        1.0
    }
}

/// A fixed placement: replicas share load, nothing migrates.
#[derive(Debug, Clone)]
pub struct StaticEplb {
    placement: Placement,
    /// Max/mean rank load of the calibration profile without and with this placement.
    planned: Option<(f64, f64)>,
}

impl StaticEplb {
    /// Uses `placement` (checked against the config's experts and slots).
    pub fn new(cfg: &MoeConfig, placement: Placement) -> Result<Self> {
        check_placement(cfg, &placement)?;
        Ok(StaticEplb { placement, planned: None })
    }

    /// Plans once from a per-expert load profile (e.g. counts from a calibration trace).
    pub fn from_load(cfg: &MoeConfig, load: &[f64], opts: &EplbOptions) -> Result<Self> {
        if load.len() != cfg.num_experts {
            return Err(MoeError::shape(
                "StaticEplb::from_load",
                format!("{} loads", cfg.num_experts),
                load.len().to_string(),
            ));
        }
        let mut s = Self::new(cfg, rebalance(load, opts.topology(cfg), opts.policy)?)?;
        let ranks = cfg.parallel.ep_size;
        if cfg.num_experts.is_multiple_of(ranks) {
            let plain = Placement::identity(cfg.num_experts)?.expected_rank_loads(load, ranks)?;
            s.planned = Some((imbalance(&plain), imbalance(&s.placement.expected_rank_loads(load, ranks)?)));
        }
        Ok(s)
    }

    /// The placement.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }
}

impl LoadBalancer for StaticEplb {
    fn name(&self) -> &str {
        "static"
    }

    fn record(&mut self, _routing: &TopK<Logical>) -> Result<()> {
        Ok(())
    }

    fn map_to_slots(&mut self, routing: TopK<Logical>) -> Result<TopK<Physical>> {
        self.placement.route(&routing)
    }

    fn end_iteration(&mut self, _backend: &mut dyn ExpertBackend) -> Result<()> {
        Ok(())
    }

    fn slot_to_expert(&self) -> Vec<usize> {
        self.placement.slot_to_expert().iter().map(|e| e.0).collect()
    }

    fn summary(&self) -> Option<String> {
        let counts = self.placement.replica_counts();
        let mut s = format!(
            "static placement: {} slots, {} of {} experts replicated (up to {} replicas)",
            self.placement.num_slots(),
            counts.iter().filter(|&&c| c > 1).count(),
            counts.len(),
            counts.iter().copied().max().unwrap_or(1)
        );
        if let Some((before, after)) = self.planned {
            s += &format!("; calibration max/mean rank load {before:.3} without EPLB -> {after:.3}");
        }
        Some(s)
    }
}

/// What a dynamic balancer has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DynamicStats {
    /// Plans computed.
    pub plans: u64,
    /// Plans applied (weights migrated).
    pub migrations: u64,
    /// Local slots rewritten in total.
    pub slots_moved: u64,
    /// Max/mean rank load of the last plan's window without EPLB (one slot per expert,
    /// contiguous blocks per rank); 0 when the experts do not split evenly over the ranks.
    pub last_plain: f64,
    /// Planned max/mean rank load (on the window it was planned from) before the last plan.
    pub last_before: f64,
    /// ... and after it.
    pub last_after: f64,
}

/// Rebalances during the run: statistics over a window, a new plan every `interval` forwards
/// (from the window summed over all ranks), weights migrated from host staging into the slots
/// that change, the routing switched only once every slot holds its new expert.
#[derive(Debug)]
pub struct DynamicEplb {
    placement: Placement,
    stats: LoadWindow,
    reducer: Box<dyn CountReducer>,
    staging: Option<Arc<HostStaging>>,
    /// Whether `staging` was built here from the loaded weights (rebuilt on reload).
    own_staging: bool,
    topo: Topology,
    local: SlotRange,
    opts: EplbOptions,
    forwards: u64,
    report: DynamicStats,
}

impl DynamicEplb {
    /// A dynamic balancer for one rank of `cfg`, starting from the round-robin placement (slot
    /// `s` holds expert `s % experts`). `reducer` sums statistics across ranks ([`SingleRank`]
    /// for one rank, [`super::TransportReducer`] over the strategy's transport otherwise).
    pub fn new(cfg: &MoeConfig, opts: EplbOptions, reducer: Box<dyn CountReducer>) -> Result<Self> {
        cfg.validate()?;
        if opts.interval == 0 {
            return Err(MoeError::config("eplb.interval", "rebalance every N forwards needs N >= 1"));
        }
        if !(opts.min_gain.is_finite() && opts.min_gain >= 0.0) {
            return Err(MoeError::config("eplb.min_gain", "must be finite and non-negative"));
        }
        if cfg.parallel.ep_size > 1 && reducer.name() == SingleRank.name() {
            return Err(MoeError::config(
                "eplb",
                "a dynamic balancer over several ranks needs a cross-rank reducer (TransportReducer), or the ranks \
                 would plan different placements",
            ));
        }
        Ok(DynamicEplb {
            placement: Placement::round_robin(cfg.num_experts, cfg.num_slots())?,
            stats: LoadWindow::new(cfg.num_experts, opts.window)?,
            reducer,
            staging: None,
            own_staging: true,
            topo: opts.topology(cfg),
            local: SlotRange::for_config(cfg),
            opts,
            forwards: 0,
            report: DynamicStats::default(),
        })
    }

    /// One rank's balancer with no cross-rank statistics.
    pub fn single_rank(cfg: &MoeConfig, opts: EplbOptions) -> Result<Self> {
        Self::new(cfg, opts, Box::new(SingleRank))
    }

    /// Starts from `placement` instead of round-robin.
    pub fn with_placement(mut self, cfg: &MoeConfig, placement: Placement) -> Result<Self> {
        check_placement(cfg, &placement)?;
        self.placement = placement;
        Ok(self)
    }

    /// Shares a host staging buffer (e.g. one per node for all its ranks) instead of staging a
    /// copy of every expert at `load_weights`. The owner keeps it in step with weight reloads.
    pub fn with_staging(mut self, staging: Arc<HostStaging>) -> Self {
        self.staging = Some(staging);
        self.own_staging = false;
        self
    }

    /// The placement routing uses now.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Counts in the statistics window (this rank only).
    pub fn window_counts(&self) -> &[u64] {
        self.stats.totals()
    }

    /// Plans and migrations so far.
    pub fn report(&self) -> DynamicStats {
        self.report
    }

    fn rebalance_now(&mut self, backend: &mut dyn ExpertBackend) -> Result<()> {
        let mut counts = self.stats.totals().to_vec();
        self.reducer.all_reduce_sum(&mut counts)?;
        if counts.iter().all(|&c| c == 0) {
            return Ok(());
        }
        let load: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
        let new = rebalance(&load, self.topo, self.opts.policy)?;
        let ranks = self.topo.num_ranks;
        let before = imbalance(&self.placement.expected_rank_loads(&load, ranks)?);
        let after = imbalance(&new.expected_rank_loads(&load, ranks)?);
        self.report.plans += 1;
        self.report.last_plain = match self.topo.num_ranks {
            r if self.stats.num_experts().is_multiple_of(r) => {
                imbalance(&Placement::identity(self.stats.num_experts())?.expected_rank_loads(&load, r)?)
            }
            _ => 0.0,
        };
        self.report.last_before = before;
        self.report.last_after = after;
        // Every rank sees the same summed counts, so every rank takes the same decision here.
        if new == self.placement || before - after < self.opts.min_gain {
            return Ok(());
        }
        let moves = plan_moves(&self.placement, &new, self.local)?;
        let undo = plan_moves(&new, &self.placement, self.local)?;
        // A local failure must still reach the collective below, or the peers would wait on it.
        let local = match &self.staging {
            Some(st) => apply_moves(&moves, &undo, st, &mut BackendSlots::new(backend, self.local.count)),
            None => Err(MoeError::config(
                "eplb",
                "dynamic EPLB has no staged expert weights: load weights through ConfigurableMoe::load_weights",
            )),
        };
        // All ranks switch together or none does: a rank whose migration failed has restored its
        // slots; the others restore theirs.
        let mut failed = [u64::from(local.is_err())];
        self.reducer.all_reduce_sum(&mut failed)?;
        if failed[0] > 0 {
            if let (Ok(()), Some(st)) = (&local, &self.staging) {
                migrate(&undo, st, &mut BackendSlots::new(backend, self.local.count))?;
            }
            return Err(local.err().unwrap_or_else(|| {
                MoeError::config(
                    "eplb.migration",
                    format!("migration failed on {} other rank(s); kept the old placement", failed[0]),
                )
            }));
        }
        self.placement = new;
        self.report.migrations += 1;
        self.report.slots_moved += moves.len() as u64;
        tracing::debug!(before, after, moved = moves.len(), "eplb: applied a new placement");
        Ok(())
    }
}

impl LoadBalancer for DynamicEplb {
    fn name(&self) -> &str {
        "dynamic"
    }

    fn record(&mut self, routing: &TopK<Logical>) -> Result<()> {
        self.stats.record(routing)
    }

    fn map_to_slots(&mut self, routing: TopK<Logical>) -> Result<TopK<Physical>> {
        self.placement.route(&routing)
    }

    fn end_iteration(&mut self, backend: &mut dyn ExpertBackend) -> Result<()> {
        self.stats.end_iteration()?;
        self.forwards += 1;
        if self.forwards.is_multiple_of(self.opts.interval as u64) {
            self.rebalance_now(backend)?;
        }
        Ok(())
    }

    fn slot_to_expert(&self) -> Vec<usize> {
        self.placement.slot_to_expert().iter().map(|e| e.0).collect()
    }

    fn on_load_weights(&mut self, experts: &ExpertWeights) -> Result<()> {
        if self.own_staging {
            self.staging = Some(Arc::new(HostStaging::all(experts)?));
        }
        Ok(())
    }

    fn expert_load(&self) -> Option<Vec<u64>> {
        Some(self.stats.totals().to_vec())
    }

    fn summary(&self) -> Option<String> {
        let r = self.report;
        let mut s = format!(
            "dynamic: {} plan(s) every {} forwards, {} migration(s), {} local slot(s) rewritten",
            r.plans, self.opts.interval, r.migrations, r.slots_moved
        );
        if r.plans > 0 {
            if r.last_plain > 0.0 {
                s += &format!("; last window's max/mean rank load: {:.3} without EPLB,", r.last_plain);
            } else {
                s += "; last window's max/mean rank load:";
            }
            s += &format!(" {:.3} with the placement it found, {:.3} planned", r.last_before, r.last_after);
        }
        Some(s)
    }
}

/// Which balancer a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EplbMode {
    /// No balancing (slot `i` holds expert `i`).
    #[default]
    None,
    /// One placement for the run ([`StaticEplb`]).
    Static,
    /// Rebalancing during the run ([`DynamicEplb`]).
    Dynamic,
}

impl EplbMode {
    /// Parses `none`, `static` or `dynamic`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" | "off" => Ok(EplbMode::None),
            "static" => Ok(EplbMode::Static),
            "dynamic" => Ok(EplbMode::Dynamic),
            _ => Err(MoeError::config("eplb", format!("unknown EPLB mode `{s}`; one of none, static, dynamic"))),
        }
    }
}

/// A balancer request as a run states it (CLI flags), built once per rank by [`EplbSpec::build`].
#[derive(Debug, Clone, Default)]
pub struct EplbSpec {
    /// Which balancer.
    pub mode: EplbMode,
    /// Policy and dynamic settings (`None`: [`EplbOptions::for_config`]).
    pub options: Option<EplbOptions>,
    /// Static: read this placement file instead of planning from a calibration profile.
    pub placement: Option<PathBuf>,
    /// Dynamic: a host staging buffer shared by the ranks of this process (one node's host
    /// memory), instead of each rank staging its own copy at `load_weights`.
    pub staging: Option<Arc<HostStaging>>,
}

impl EplbSpec {
    /// This rank's balancer (`None` for no balancing). A static plan comes from the placement
    /// file or from `calibration` (per-expert loads, the same on every rank, e.g. [`calibrate`]);
    /// a dynamic one sums its statistics over `transport` when there are several ranks.
    pub fn build(
        &self,
        cfg: &MoeConfig,
        calibration: Option<&[f64]>,
        transport: Option<SharedTransport>,
    ) -> Result<Option<Box<dyn LoadBalancer>>> {
        let opts = self.options.unwrap_or_else(|| EplbOptions::for_config(cfg));
        match self.mode {
            EplbMode::None => Ok(None),
            EplbMode::Static => {
                let s = match (&self.placement, calibration) {
                    (Some(path), _) => StaticEplb::new(cfg, Placement::load(path)?)?,
                    (None, Some(load)) => StaticEplb::from_load(cfg, load, &opts)?,
                    (None, None) => {
                        return Err(MoeError::config(
                            "eplb",
                            "static EPLB needs a placement file or a calibration load profile",
                        ))
                    }
                };
                Ok(Some(Box::new(s)))
            }
            EplbMode::Dynamic => {
                let reducer: Box<dyn CountReducer> = match transport {
                    Some(t) if cfg.parallel.ep_size > 1 => Box::new(TransportReducer::new(t)),
                    _ => Box::new(SingleRank),
                };
                let mut d = DynamicEplb::new(cfg, opts, reducer)?;
                if let Some(path) = &self.placement {
                    d = d.with_placement(cfg, Placement::load(path)?)?;
                }
                if let Some(st) = &self.staging {
                    d = d.with_staging(st.clone());
                }
                Ok(Some(Box::new(d)))
            }
        }
    }
}

/// Tokens per logical expert when the block's router (host, f32) routes `hidden`: a calibration
/// profile for a static placement.
pub fn calibrate(cfg: &MoeConfig, weights: &MoeWeights, hidden: &Tensor) -> Result<Vec<f64>> {
    let logits = crate::backend::reference::host_router_logits(cfg, &weights.router, hidden)?;
    let bias = weights.router.correction_bias.as_ref().map(|b| b.to_f32_vec()).transpose()?;
    let routing = route_host(cfg, &logits, bias.as_deref())?;
    let mut w = LoadWindow::new(cfg.num_experts, 1)?;
    w.record(&routing)?;
    w.end_iteration()?;
    Ok(w.totals().iter().map(|&c| c as f64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random_hidden;

    #[test]
    fn spec_builds_each_mode() {
        let mut cfg = MoeConfig::new(8, 2, 16, 8);
        cfg.eplb_slots = Some(12);
        let w = MoeWeights::random(&cfg, 1).unwrap();
        let x = random_hidden(40, 16, cfg.act_dtype, 2).unwrap();
        let load = calibrate(&cfg, &w, &x).unwrap();
        assert_eq!(load.iter().sum::<f64>(), 80.0, "40 tokens x top-2");
        let none = EplbSpec::default().build(&cfg, None, None).unwrap();
        assert!(none.is_none());
        let spec = EplbSpec { mode: EplbMode::Static, ..Default::default() };
        assert!(spec.build(&cfg, None, None).is_err(), "static needs a placement or a profile");
        let s = spec.build(&cfg, Some(&load), None).unwrap().unwrap();
        assert_eq!(s.slot_to_expert().len(), 12);
        assert!(s.summary().unwrap().contains("static placement"));
        let d = EplbSpec { mode: EplbMode::Dynamic, ..Default::default() }.build(&cfg, None, None).unwrap().unwrap();
        assert_eq!(d.name(), "dynamic");
        assert!(EplbMode::parse("sometimes").is_err());
    }

    #[test]
    fn static_plan_favours_the_hot_expert() {
        let mut cfg = MoeConfig::new(4, 1, 8, 8);
        cfg.eplb_slots = Some(8);
        cfg.parallel.ep_size = 2;
        let s = StaticEplb::from_load(&cfg, &[100.0, 1.0, 1.0, 1.0], &EplbOptions::for_config(&cfg)).unwrap();
        assert_eq!(s.placement().replica_counts()[0], 5);
        let (plain, planned) = s.planned.unwrap();
        // 5 replicas of 20 over 2 ranks of 4 slots: one rank holds 3 of them (61 vs 42 of 103).
        assert!(plain > 1.9 && planned < 1.2, "{plain} {planned}");
    }
}
