//! Where each logical expert lives: the physical->logical map (one entry per slot), its inverse
//! (each expert's replicas) and replica counts. [`ExpertId`] and [`SlotId`] are distinct types, so
//! an expert id is never used where a slot id belongs; the only way a routing result changes id
//! space is [`Placement::route`], which goes through [`TopK::remap`].

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{MoeError, Result};
use crate::routing::{Logical, Physical, TopK};
use crate::tensor::Tensor;

/// A logical expert id (what the router picks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExpertId(pub usize);

/// A global physical slot id (what backends and communication see), `0..num_slots`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SlotId(pub usize);

impl fmt::Display for ExpertId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expert {}", self.0)
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

/// The on-disk form of a placement (`--placement FILE`, `moe eplb --write-placement`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlacementFile {
    /// Logical experts.
    pub num_experts: usize,
    /// `slot_to_expert[s]` is the logical expert slot `s` holds.
    pub slot_to_expert: Vec<usize>,
}

/// A complete placement of `num_experts` logical experts onto `num_slots` physical slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    num_experts: usize,
    slot_to_expert: Vec<ExpertId>,
    /// CSR of expert -> its slots (ascending): slots of `e` are `slots[offsets[e]..offsets[e + 1]]`.
    offsets: Vec<usize>,
    slots: Vec<SlotId>,
}

impl Placement {
    /// A placement from the physical->logical map; every expert needs at least one slot.
    pub fn new(num_experts: usize, slot_to_expert: Vec<ExpertId>) -> Result<Self> {
        if num_experts == 0 {
            return Err(MoeError::config("eplb_slots", "a placement needs at least one expert"));
        }
        if slot_to_expert.len() < num_experts {
            return Err(MoeError::config(
                "eplb_slots",
                format!("{} slots cannot hold {num_experts} experts", slot_to_expert.len()),
            ));
        }
        let mut counts = vec![0usize; num_experts];
        for (s, e) in slot_to_expert.iter().enumerate() {
            let c = counts.get_mut(e.0).ok_or_else(|| {
                MoeError::config(
                    "placement",
                    format!("slot {s} holds expert {} but there are {num_experts} experts", e.0),
                )
            })?;
            *c += 1;
        }
        if let Some(e) = counts.iter().position(|&c| c == 0) {
            return Err(MoeError::config("placement", format!("expert {e} has no slot; every expert needs one")));
        }
        let mut offsets = vec![0usize; num_experts + 1];
        for e in 0..num_experts {
            offsets[e + 1] = offsets[e] + counts[e];
        }
        let mut fill = offsets.clone();
        let mut slots = vec![SlotId(0); slot_to_expert.len()];
        for (s, e) in slot_to_expert.iter().enumerate() {
            slots[fill[e.0]] = SlotId(s);
            fill[e.0] += 1;
        }
        Ok(Placement { num_experts, slot_to_expert, offsets, slots })
    }

    /// Slot `i` holds expert `i` (no replicas).
    pub fn identity(num_experts: usize) -> Result<Self> {
        Self::round_robin(num_experts, num_experts)
    }

    /// Slot `s` holds expert `s % num_experts`: a valid starting point before any statistics.
    pub fn round_robin(num_experts: usize, num_slots: usize) -> Result<Self> {
        Self::new(num_experts, (0..num_slots).map(|s| ExpertId(s % num_experts.max(1))).collect())
    }

    /// Logical experts.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Physical slots.
    pub fn num_slots(&self) -> usize {
        self.slot_to_expert.len()
    }

    /// The physical->logical map.
    pub fn slot_to_expert(&self) -> &[ExpertId] {
        &self.slot_to_expert
    }

    /// The expert slot `s` holds.
    pub fn expert_of(&self, s: SlotId) -> Option<ExpertId> {
        self.slot_to_expert.get(s.0).copied()
    }

    /// The slots holding expert `e` (ascending; empty for an unknown expert).
    pub fn replicas(&self, e: ExpertId) -> &[SlotId] {
        if e.0 >= self.num_experts {
            return &[];
        }
        &self.slots[self.offsets[e.0]..self.offsets[e.0 + 1]]
    }

    /// Replicas per expert.
    pub fn replica_counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// The logical->physical table `[experts, max_replicas]` (i32, -1 padded) and replica counts
    /// `[experts]`: what a device kernel needs to map ids without the host.
    pub fn logical_to_physical_table(&self) -> Result<(Tensor, Tensor)> {
        let counts = self.replica_counts();
        let width = counts.iter().copied().max().unwrap_or(1);
        let mut table = vec![-1i32; self.num_experts * width];
        for e in 0..self.num_experts {
            for (j, s) in self.replicas(ExpertId(e)).iter().enumerate() {
                table[e * width + j] = to_i32(s.0)?;
            }
        }
        let counts = counts.into_iter().map(to_i32).collect::<Result<Vec<_>>>()?;
        Ok((Tensor::from_i32(vec![self.num_experts, width], table)?, Tensor::from_i32(vec![self.num_experts], counts)?))
    }

    /// The replica serving `(token, expert)`: `token % replicas`, so a replicated expert's tokens
    /// are spread evenly and deterministically over its slots.
    #[inline]
    pub fn slot_for(&self, token: usize, e: ExpertId) -> Option<SlotId> {
        let r = self.replicas(e);
        (!r.is_empty()).then(|| r[token % r.len()])
    }

    /// Maps a logical routing to physical slots (host ids; device ids are copied to the host).
    pub fn route(&self, routing: &TopK<Logical>) -> Result<TopK<Physical>> {
        let (t, k) = (routing.num_tokens(), routing.k());
        let host;
        let ids = if routing.ids().is_host() {
            routing.ids_host()?
        } else {
            host = routing.ids().to_host()?;
            host.as_i32()?
        };
        let mut out = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let token = i / k.max(1);
            let slot = usize::try_from(id).ok().and_then(|e| self.slot_for(token, ExpertId(e))).ok_or_else(|| {
                MoeError::shape(
                    "eplb.map_to_slots",
                    format!("logical expert ids in 0..{}", self.num_experts),
                    format!("{id} at token {token}"),
                )
            })?;
            out.push(to_i32(slot.0)?);
        }
        routing.remap(Tensor::from_i32(vec![t, k], out)?)
    }

    /// The rank owning slot `s` when each rank holds `slots_per_rank` contiguous slots.
    pub fn rank_of(s: SlotId, slots_per_rank: usize) -> usize {
        s.0 / slots_per_rank.max(1)
    }

    /// Expected load per rank when each expert's `load` is split evenly over its replicas.
    pub fn expected_rank_loads(&self, load: &[f64], ranks: usize) -> Result<Vec<f64>> {
        if load.len() != self.num_experts || ranks == 0 || !self.num_slots().is_multiple_of(ranks) {
            return Err(MoeError::config(
                "eplb",
                format!(
                    "{} expert loads and {ranks} ranks do not fit a placement of {} experts on {} slots",
                    load.len(),
                    self.num_experts,
                    self.num_slots()
                ),
            ));
        }
        let per_rank = self.num_slots() / ranks;
        let counts = self.replica_counts();
        let mut out = vec![0.0; ranks];
        for (s, e) in self.slot_to_expert.iter().enumerate() {
            out[s / per_rank] += load[e.0] / counts[e.0] as f64;
        }
        Ok(out)
    }

    /// The serializable form.
    pub fn to_file(&self) -> PlacementFile {
        PlacementFile {
            num_experts: self.num_experts,
            slot_to_expert: self.slot_to_expert.iter().map(|e| e.0).collect(),
        }
    }

    /// From the serializable form (validated).
    pub fn from_file(f: PlacementFile) -> Result<Self> {
        Self::new(f.num_experts, f.slot_to_expert.into_iter().map(ExpertId).collect())
    }

    /// Reads a JSON placement file: `{"num_experts": E, "slot_to_expert": [e0, e1, ...]}`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| MoeError::Io { path: path.display().to_string(), source })?;
        let f: PlacementFile = serde_json::from_str(&text).map_err(|e| {
            MoeError::config(
                "placement",
                format!(
                    "{} is not a placement file ({e}); expected {{\"num_experts\": E, \"slot_to_expert\": [...]}}",
                    path.display()
                ),
            )
        })?;
        Self::from_file(f)
    }

    /// Writes the JSON placement file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(&self.to_file())
            .map_err(|e| MoeError::config("placement", format!("cannot serialize the placement: {e}")))?;
        std::fs::write(path, text).map_err(|source| MoeError::Io { path: path.display().to_string(), source })
    }
}

fn to_i32(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| MoeError::config("eplb_slots", format!("slot id {v} does not fit an i32")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_maps_agree() {
        let p = Placement::new(3, [0, 1, 2, 0, 0, 2].map(ExpertId).to_vec()).unwrap();
        assert_eq!(p.replicas(ExpertId(0)), &[SlotId(0), SlotId(3), SlotId(4)]);
        assert_eq!(p.replicas(ExpertId(1)), &[SlotId(1)]);
        assert_eq!(p.replica_counts(), vec![3, 1, 2]);
        for e in 0..3 {
            for &s in p.replicas(ExpertId(e)) {
                assert_eq!(p.expert_of(s), Some(ExpertId(e)));
            }
        }
        let (table, counts) = p.logical_to_physical_table().unwrap();
        assert_eq!(table.as_i32().unwrap(), &[0, 3, 4, 1, -1, -1, 2, 5, -1]);
        assert_eq!(counts.as_i32().unwrap(), &[3, 1, 2]);
    }

    #[test]
    fn rejects_bad_placements() {
        assert!(Placement::new(3, [0, 1, 1].map(ExpertId).to_vec()).is_err(), "expert 2 has no slot");
        assert!(Placement::new(2, [0, 1, 2].map(ExpertId).to_vec()).is_err(), "expert 2 does not exist");
        assert!(Placement::new(3, [0, 1].map(ExpertId).to_vec()).is_err(), "too few slots");
    }

    #[test]
    fn route_spreads_tokens_over_replicas() {
        let p = Placement::new(2, [0, 1, 0, 0].map(ExpertId).to_vec()).unwrap();
        let r = TopK::<Logical>::from_vecs(4, 2, vec![0, 1, 0, 1, 0, 1, 0, 1], vec![0.5; 8], false).unwrap();
        let phys = p.route(&r).unwrap();
        assert_eq!(phys.ids_host().unwrap(), &[0, 1, 2, 1, 3, 1, 0, 1]);
        assert_eq!(phys.weights_host().unwrap(), r.weights_host().unwrap());
        let bad = TopK::<Logical>::from_vecs(1, 1, vec![2], vec![1.0], false).unwrap();
        assert!(p.route(&bad).is_err());
    }

    #[test]
    fn file_round_trip() {
        let p = Placement::new(3, [2, 1, 0, 2].map(ExpertId).to_vec()).unwrap();
        let dir = std::env::temp_dir().join(format!("moe-eplb-placement-{}", std::process::id()));
        p.save(&dir).unwrap();
        let q = Placement::load(&dir).unwrap();
        std::fs::remove_file(&dir).ok();
        assert_eq!(p, q);
    }
}
