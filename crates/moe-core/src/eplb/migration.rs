//! Moving expert weights into slots when the placement changes.
//!
//! Three index spaces meet here and each has its own type:
//! - [`ExpertId`]: the logical expert;
//! - [`LocalSlot`]: a routed slot of this rank, `0..slots_per_rank` (what the backend's weight
//!   buffers are sized by);
//! - [`StagingIdx`]: a position in a [`HostStaging`] buffer, the host-resident copy of expert
//!   weights that migration copies from. A node's staging buffer holds the experts of all its
//!   ranks (or all experts), so it routinely has MORE entries than a rank has slots.
//!
//! Writing into a routed-sized buffer with a staging-space index reads or writes the wrong slot
//! (single node) or out of bounds (multi-node, where staging entries outnumber slots); TensorRT-LLM
//! shipped exactly that bug. Here a staging index is only ever used to read the staging buffer,
//! and a slot index only to write the destination ([`migrate`]).
//!
//! Every per-expert tensor moves: all parts of both projections (weights and every scale) and
//! both biases, through [`crate::quant::ExpertTensor::copy_expert_from`] and
//! [`ExpertWeights::select_experts`], so no half of a pair is left stale.
//!
//! Double buffering: [`apply_moves`] first gathers the incoming experts into a back buffer (the
//! host transfer buffer; nothing the forward reads is touched), then writes the slots, and the
//! caller switches the routing placement only after every slot is written. If a write fails, the
//! slots already written are restored from staging, so the backend never holds a mix of two
//! placements while the routing points at either.

use std::collections::BTreeMap;
use std::fmt;

use crate::backend::ExpertBackend;
use crate::error::{MoeError, Result};
use crate::weights::ExpertWeights;

use super::placement::{ExpertId, Placement};
use crate::backend::SlotRange;

/// A routed slot of this rank: `0..slots_per_rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalSlot(pub usize);

/// A position in a [`HostStaging`] buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StagingIdx(pub usize);

impl fmt::Display for LocalSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "local slot {}", self.0)
    }
}

/// Host copies of some experts' weights (all parts and biases), indexed by staging position.
#[derive(Debug, Clone)]
pub struct HostStaging {
    experts: Vec<ExpertId>,
    index: BTreeMap<ExpertId, StagingIdx>,
    weights: ExpertWeights,
}

impl HostStaging {
    /// Stages `experts` (in that order) from the logical expert weights `all`.
    pub fn from_logical(all: &ExpertWeights, experts: &[ExpertId]) -> Result<Self> {
        let ids: Vec<usize> = experts.iter().map(|e| e.0).collect();
        Self::new(experts.to_vec(), all.select_experts(&ids)?)
    }

    /// Stages every expert of `all`.
    pub fn all(all: &ExpertWeights) -> Result<Self> {
        Self::new((0..all.num_experts()).map(ExpertId).collect(), all.clone())
    }

    /// A staging buffer whose entry `i` holds expert `experts[i]`.
    pub fn new(experts: Vec<ExpertId>, weights: ExpertWeights) -> Result<Self> {
        if experts.len() != weights.num_experts() {
            return Err(MoeError::shape(
                "HostStaging::new",
                format!("{} staged entries", experts.len()),
                format!("{} in the weights", weights.num_experts()),
            ));
        }
        let mut index = BTreeMap::new();
        for (i, &e) in experts.iter().enumerate() {
            if index.insert(e, StagingIdx(i)).is_some() {
                return Err(MoeError::config("eplb.staging", format!("{e} is staged twice")));
            }
        }
        Ok(HostStaging { experts, index, weights })
    }

    /// Entries staged.
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    /// Where expert `e` is staged.
    pub fn find(&self, e: ExpertId) -> Option<StagingIdx> {
        self.index.get(&e).copied()
    }

    /// The staged weights (leading dimension in staging space).
    pub fn weights(&self) -> &ExpertWeights {
        &self.weights
    }
}

/// One slot receiving one expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotMove {
    /// The routed slot written.
    pub slot: LocalSlot,
    /// The expert it will hold.
    pub expert: ExpertId,
}

/// Where migrated weights land: a backend's slots or a host buffer in routed-slot space.
pub trait SlotStore {
    /// Routed slots held (the bound every [`LocalSlot`] is checked against).
    fn num_slots(&self) -> usize;

    /// Overwrites every per-expert tensor of `slot` with entry `src` of `from`.
    fn write_slot(&mut self, slot: LocalSlot, from: &ExpertWeights, src: usize) -> Result<()>;
}

impl SlotStore for ExpertWeights {
    fn num_slots(&self) -> usize {
        self.num_experts()
    }

    fn write_slot(&mut self, slot: LocalSlot, from: &ExpertWeights, src: usize) -> Result<()> {
        self.copy_expert_from(slot.0, from, src)
    }
}

/// A backend's local slots as a [`SlotStore`] (through [`ExpertBackend::replace_slot`]).
pub struct BackendSlots<'a> {
    backend: &'a mut dyn ExpertBackend,
    slots: usize,
}

impl<'a> BackendSlots<'a> {
    /// The `slots` local slots of `backend`.
    pub fn new(backend: &'a mut dyn ExpertBackend, slots: usize) -> Self {
        BackendSlots { backend, slots }
    }
}

impl SlotStore for BackendSlots<'_> {
    fn num_slots(&self) -> usize {
        self.slots
    }

    fn write_slot(&mut self, slot: LocalSlot, from: &ExpertWeights, src: usize) -> Result<()> {
        self.backend.replace_slot(slot.0, from, src)
    }
}

/// The local slots whose expert differs between `old` and `new` (ascending slot order).
pub fn plan_moves(old: &Placement, new: &Placement, local: SlotRange) -> Result<Vec<SlotMove>> {
    if old.num_slots() != new.num_slots() || new.num_slots() != local.total {
        return Err(MoeError::config(
            "eplb_slots",
            format!(
                "placements of {} and {} slots for {} slots in total",
                old.num_slots(),
                new.num_slots(),
                local.total
            ),
        ));
    }
    let (a, b) = (old.slot_to_expert(), new.slot_to_expert());
    Ok((0..local.count)
        .filter(|&i| a[local.start + i] != b[local.start + i])
        .map(|i| SlotMove { slot: LocalSlot(i), expert: b[local.start + i] })
        .collect())
}

/// Copies each move's expert from `staging` into its slot of `dst`. Every slot is checked against
/// `dst`'s routed bound and every expert looked up in staging BEFORE anything is written, so a bad
/// plan changes nothing. The staging index only reads `staging`; the slot index only writes `dst`.
pub fn migrate(moves: &[SlotMove], staging: &HostStaging, dst: &mut dyn SlotStore) -> Result<()> {
    let sources = resolve(moves, staging, dst.num_slots())?;
    for (m, src) in moves.iter().zip(sources) {
        dst.write_slot(m.slot, staging.weights(), src.0)?;
    }
    Ok(())
}

fn resolve(moves: &[SlotMove], staging: &HostStaging, slots: usize) -> Result<Vec<StagingIdx>> {
    moves
        .iter()
        .map(|m| {
            if m.slot.0 >= slots {
                return Err(MoeError::shape(
                    "eplb.migrate",
                    format!("a routed slot below {slots}"),
                    format!("{} (for {})", m.slot, m.expert),
                ));
            }
            staging.find(m.expert).ok_or_else(|| {
                MoeError::config(
                    "eplb.staging",
                    format!("{} must move into {} but is not in the host staging buffer", m.expert, m.slot),
                )
            })
        })
        .collect()
}

/// Double-buffered migration into a backend: gathers the incoming experts into a back buffer,
/// writes each slot, and on a failed write restores the written slots to `undo` (their previous
/// experts) before returning the error.
pub fn apply_moves(
    moves: &[SlotMove],
    undo: &[SlotMove],
    staging: &HostStaging,
    dst: &mut dyn SlotStore,
) -> Result<()> {
    let sources = resolve(moves, staging, dst.num_slots())?;
    let ids: Vec<usize> = sources.iter().map(|s| s.0).collect();
    // The back buffer: entry `i` holds the expert for `moves[i]` (a third index space, local to
    // this function).
    let back = staging.weights().select_experts(&ids)?;
    for (i, m) in moves.iter().enumerate() {
        if let Err(e) = dst.write_slot(m.slot, &back, i) {
            let written: Vec<SlotMove> =
                undo.iter().copied().filter(|u| moves[..i].iter().any(|m| m.slot == u.slot)).collect();
            return match migrate(&written, staging, dst) {
                Ok(()) => Err(e),
                Err(undo_err) => Err(MoeError::config(
                    "eplb.migration",
                    format!("{e}; restoring the slots already written also failed ({undo_err}): reload the weights"),
                )),
            };
        }
    }
    Ok(())
}
