//! Expert load balancing hooks. The scheduler calls them in this order, per chunk:
//! 1. [`LoadBalancer::record`] on the logical routing (statistics),
//! 2. [`LoadBalancer::map_to_slots`] (logical expert -> one of its physical replicas),
//!
//! and once per forward, after the last chunk, [`LoadBalancer::end_iteration`] (where a new
//! placement may be applied by migrating weights). EPLB never changes the math: the output with
//! any placement equals the output without EPLB.
//!
//! Parts: [`stats`] (per-expert counts over a window, summed across ranks), [`policy`] (DeepSeek's
//! hierarchical and global rebalancing), [`placement`] (slot <-> expert maps, replica routing),
//! [`migration`] (host staging, slot writes, double buffering), [`balancer`] ([`StaticEplb`],
//! [`DynamicEplb`]) and [`trace`] (routing traces and the offline simulation behind `moe eplb`).

use std::fmt;

use crate::backend::ExpertBackend;
use crate::error::Result;
use crate::routing::{Logical, Physical, TopK};
use crate::weights::ExpertWeights;

pub mod balancer;
pub mod migration;
pub mod placement;
pub mod policy;
pub mod stats;
pub mod trace;

pub use balancer::{calibrate, imbalance, DynamicEplb, DynamicStats, EplbMode, EplbOptions, EplbSpec, StaticEplb};
pub use migration::{HostStaging, LocalSlot, SlotMove, StagingIdx};
pub use placement::{ExpertId, Placement, SlotId};
pub use policy::{rebalance, Policy, Topology};
pub use stats::{CountReducer, LoadWindow, SingleRank, TransportReducer};

/// The EPLB hook points.
pub trait LoadBalancer: Send + fmt::Debug {
    /// Name for messages.
    fn name(&self) -> &str;

    /// Records per-expert load of one chunk's routing.
    fn record(&mut self, routing: &TopK<Logical>) -> Result<()>;

    /// Maps logical expert ids to physical slot ids.
    fn map_to_slots(&mut self, routing: TopK<Logical>) -> Result<TopK<Physical>>;

    /// Called after each forward; may migrate weights into the backend's slots.
    fn end_iteration(&mut self, backend: &mut dyn ExpertBackend) -> Result<()>;

    /// Which logical expert each of all `num_slots` slots holds (identity without EPLB).
    fn slot_to_expert(&self) -> Vec<usize>;

    /// Called by `load_weights` with the full logical expert weights (before the local slots
    /// are cut out), so a balancer that migrates can stage the experts it may need later.
    fn on_load_weights(&mut self, experts: &ExpertWeights) -> Result<()> {
        let _ = experts;
        Ok(())
    }

    /// Tokens per logical expert in the current statistics window (this rank), if collected.
    fn expert_load(&self) -> Option<Vec<u64>> {
        None
    }

    /// One line on what the balancer did (plans, migrations, balance), for reports.
    fn summary(&self) -> Option<String> {
        None
    }
}

/// No load balancing: slot `i` holds expert `i`.
#[derive(Debug, Clone)]
pub struct NoEplb {
    num_experts: usize,
}

impl NoEplb {
    /// Identity placement over `num_experts`.
    pub fn new(num_experts: usize) -> Self {
        NoEplb { num_experts }
    }
}

impl LoadBalancer for NoEplb {
    fn name(&self) -> &str {
        "none"
    }

    fn record(&mut self, _routing: &TopK<Logical>) -> Result<()> {
        Ok(())
    }

    fn map_to_slots(&mut self, routing: TopK<Logical>) -> Result<TopK<Physical>> {
        Ok(routing.into_identity_slots())
    }

    fn end_iteration(&mut self, _backend: &mut dyn ExpertBackend) -> Result<()> {
        Ok(())
    }

    fn slot_to_expert(&self) -> Vec<usize> {
        (0..self.num_experts).collect()
    }
}
