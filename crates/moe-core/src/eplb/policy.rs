//! The rebalancing algorithm, after DeepSeek's EPLB: given per-expert load, produce a
//! [`Placement`] of `num_slots` slots over `num_ranks` GPUs in `num_nodes` nodes.
//!
//! - Hierarchical (used when expert groups divide evenly over nodes, to keep a group's experts on
//!   one node and so limit cross-node traffic under group-limited routing):
//!   1. pack expert groups onto nodes, balancing the groups' total load;
//!   2. within each node, add replicas one at a time to the expert whose per-replica load is
//!      highest;
//!   3. pack the node's replicas onto its GPUs (each GPU gets exactly `slots / ranks` of them),
//!      balancing load.
//! - Global: the same with one group and one node, so replication and packing see every expert.
//!
//! Every choice breaks ties by the lower index, so equal input always gives the same placement,
//! on every rank, without communication.

use crate::error::{MoeError, Result};

use super::placement::{ExpertId, Placement};

/// Which rebalancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Hierarchical when `num_groups % num_nodes == 0`, otherwise global (DeepSeek's rule).
    #[default]
    Auto,
    /// Groups to nodes, replicate within nodes, pack to GPUs.
    Hierarchical,
    /// Replicate and pack over all experts and GPUs at once.
    Global,
}

impl Policy {
    /// Parses `auto`, `hierarchical` or `global`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Policy::Auto),
            "hierarchical" => Ok(Policy::Hierarchical),
            "global" => Ok(Policy::Global),
            _ => {
                Err(MoeError::config("eplb.policy", format!("unknown policy `{s}`; one of auto, hierarchical, global")))
            }
        }
    }
}

/// The shape of the machine a placement is computed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Physical slots in total (>= experts, divisible by `num_ranks`).
    pub num_slots: usize,
    /// GPUs (expert-parallel ranks).
    pub num_ranks: usize,
    /// Nodes (`num_ranks` divisible by it).
    pub num_nodes: usize,
    /// Expert groups (DeepSeek `n_group`; 1 when the model has none).
    pub num_groups: usize,
}

/// Computes a placement for `load` (one non-negative value per logical expert).
pub fn rebalance(load: &[f64], topo: Topology, policy: Policy) -> Result<Placement> {
    let e = load.len();
    if let Some(i) = load.iter().position(|x| !x.is_finite() || *x < 0.0) {
        return Err(MoeError::NonFinite { op: "eplb.rebalance", detail: format!("load of expert {i} is {}", load[i]) });
    }
    let Topology { num_slots, num_ranks, num_nodes, num_groups } = topo;
    let check =
        |ok: bool, field: &'static str, why: String| if ok { Ok(()) } else { Err(MoeError::config(field, why)) };
    check(e > 0, "num_experts", "no experts to place".into())?;
    check(num_slots >= e, "eplb_slots", format!("{num_slots} slots cannot hold {e} experts"))?;
    check(
        num_ranks > 0 && num_slots.is_multiple_of(num_ranks),
        "parallel.ep_size",
        format!("{num_slots} slots do not split evenly over {num_ranks} ranks"),
    )?;
    let hierarchical = match policy {
        Policy::Global => false,
        Policy::Hierarchical => true,
        Policy::Auto => num_groups > 0 && num_nodes > 0 && num_groups.is_multiple_of(num_nodes),
    };
    let (groups, nodes) = if hierarchical { (num_groups, num_nodes) } else { (1, 1) };
    check(
        groups > 0 && e.is_multiple_of(groups),
        "eplb.num_groups",
        format!("{groups} expert groups do not divide {e} experts"),
    )?;
    check(
        nodes > 0 && groups.is_multiple_of(nodes),
        "eplb.num_nodes",
        format!("{groups} expert groups do not split evenly over {nodes} nodes (use the global policy)"),
    )?;
    check(
        num_ranks.is_multiple_of(nodes),
        "eplb.num_nodes",
        format!("{num_ranks} ranks do not split evenly over {nodes} nodes"),
    )?;
    Placement::new(e, hierarchical_map(load, num_slots, groups, nodes, num_ranks))
}

/// DeepSeek's hierarchical policy; the global policy is this with one group on one node.
fn hierarchical_map(load: &[f64], num_slots: usize, groups: usize, nodes: usize, gpus: usize) -> Vec<ExpertId> {
    let e = load.len();
    let group_size = e / groups;
    let groups_per_node = groups / nodes;
    let experts_per_node = e / nodes;
    let slots_per_node = num_slots / nodes;
    let slots_per_gpu = num_slots / gpus;
    let gpus_per_node = gpus / nodes;

    // 1. Groups to nodes. "Node-local" expert index: node-major, groups in pack order.
    let group_load: Vec<f64> = (0..groups).map(|g| load[g * group_size..(g + 1) * group_size].iter().sum()).collect();
    let (node_of_group, rank_in_node) = balanced_packing(&group_load, nodes);
    let mut local_to_expert = vec![0usize; e];
    for g in 0..groups {
        let base = (node_of_group[g] * groups_per_node + rank_in_node[g]) * group_size;
        for j in 0..group_size {
            local_to_expert[base + j] = g * group_size + j;
        }
    }

    let mut slot_to_expert = vec![ExpertId(0); num_slots];
    for node in 0..nodes {
        let experts = &local_to_expert[node * experts_per_node..(node + 1) * experts_per_node];
        let node_load: Vec<f64> = experts.iter().map(|&x| load[x]).collect();
        // 2. Replicate the heaviest (per replica) within the node.
        let (replica_expert, counts) = replicate(&node_load, slots_per_node);
        // 3. Pack the node's replicas onto its GPUs.
        let replica_load: Vec<f64> = replica_expert.iter().map(|&x| node_load[x] / counts[x] as f64).collect();
        let (gpu, rank_in_gpu) = balanced_packing(&replica_load, gpus_per_node);
        for (r, &x) in replica_expert.iter().enumerate() {
            let slot = node * slots_per_node + gpu[r] * slots_per_gpu + rank_in_gpu[r];
            slot_to_expert[slot] = ExpertId(experts[x]);
        }
    }
    slot_to_expert
}

/// Splits `weights.len()` items into `packs` packs of equal item count, balancing total weight:
/// heaviest item first, each into the lightest pack that still has room (lower index on ties).
/// Returns each item's pack and its position within the pack.
pub fn balanced_packing(weights: &[f64], packs: usize) -> (Vec<usize>, Vec<usize>) {
    let n = weights.len();
    // Callers pass a multiple of `packs`; otherwise the last packs get fewer items.
    let per_pack = n.div_ceil(packs.max(1));
    if per_pack <= 1 {
        return ((0..n).map(|i| i / per_pack.max(1)).collect(), vec![0; n]);
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut pack_load = vec![0.0f64; packs];
    let mut pack_items = vec![0usize; packs];
    let (mut pack, mut rank) = (vec![0usize; n], vec![0usize; n]);
    for i in order {
        let p = (0..packs)
            .filter(|&p| pack_items[p] < per_pack)
            .min_by(|&a, &b| pack_load[a].total_cmp(&pack_load[b]).then(a.cmp(&b)))
            .unwrap_or(0);
        pack[i] = p;
        rank[i] = pack_items[p];
        pack_load[p] += weights[i];
        pack_items[p] += 1;
    }
    (pack, rank)
}

/// Gives `load.len()` experts `num_replicas` replicas: one each, then every extra one to the
/// expert with the highest load per replica (lower index on ties). Returns each replica's expert
/// (experts first in order, then the extras) and the replica count per expert.
pub fn replicate(load: &[f64], num_replicas: usize) -> (Vec<usize>, Vec<usize>) {
    let n = load.len();
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    let mut expert: Vec<usize> = (0..n).collect();
    let mut counts = vec![1usize; n];
    for _ in n..num_replicas {
        let best = (0..n)
            .max_by(|&a, &b| (load[a] / counts[a] as f64).total_cmp(&(load[b] / counts[b] as f64)).then(b.cmp(&a)))
            .unwrap_or(0);
        expert.push(best);
        counts[best] += 1;
    }
    (expert, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(num_slots: usize, num_ranks: usize, num_nodes: usize, num_groups: usize) -> Topology {
        Topology { num_slots, num_ranks, num_nodes, num_groups }
    }

    #[test]
    fn packing_fills_every_pack_evenly() {
        let w = [9.0, 1.0, 8.0, 2.0, 7.0, 3.0];
        let (pack, rank) = balanced_packing(&w, 2);
        let mut per = [0.0; 2];
        for i in 0..6 {
            per[pack[i]] += w[i];
        }
        assert_eq!(pack.iter().filter(|&&p| p == 0).count(), 3);
        // Greedy: 9->0, 8->1, 7->1, 3->0, 2->0 (now full), 1->1.
        assert_eq!(per, [14.0, 16.0]);
        let mut seen: Vec<_> = (0..6).map(|i| (pack[i], rank[i])).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 6, "positions within packs are unique");
    }

    #[test]
    fn replication_goes_to_the_heaviest() {
        let (expert, counts) = replicate(&[10.0, 1.0, 4.0], 6);
        // 10 -> 5 -> 3.33 < 4, so the last extra replica goes to expert 2.
        assert_eq!(counts, vec![3, 1, 2]);
        assert_eq!(expert, vec![0, 1, 2, 0, 0, 2]);
        let (_, counts) = replicate(&[5.0, 5.0], 3);
        assert_eq!(counts, vec![2, 1], "ties go to the lower index");
    }

    #[test]
    fn hierarchical_keeps_groups_on_nodes() {
        // 16 experts in 4 groups, 2 nodes of 2 GPUs, 24 slots.
        let load: Vec<f64> = (0..16).map(|i| ((i * 7) % 16) as f64 + 1.0).collect();
        let p = rebalance(&load, topo(24, 4, 2, 4), Policy::Hierarchical).unwrap();
        assert_eq!(p.num_slots(), 24);
        for node in 0..2 {
            let groups: std::collections::BTreeSet<usize> =
                p.slot_to_expert()[node * 12..(node + 1) * 12].iter().map(|e| e.0 / 4).collect();
            assert_eq!(groups.len(), 2, "node {node} holds whole groups: {groups:?}");
        }
        assert_eq!(p, rebalance(&load, topo(24, 4, 2, 4), Policy::Hierarchical).unwrap(), "deterministic");
        let g = rebalance(&load, topo(24, 4, 2, 3), Policy::Hierarchical);
        assert!(g.is_err(), "3 groups do not divide 16 experts");
        let g = rebalance(&load, topo(24, 4, 2, 1), Policy::Auto).unwrap();
        assert_eq!(g.num_slots(), 24, "one group cannot split over 2 nodes: auto falls back to global");
    }

    #[test]
    fn global_balances_a_skewed_load() {
        let load: Vec<f64> = (0..64).map(|i| 1000.0 / (i as f64 + 1.0)).collect();
        let p = rebalance(&load, topo(80, 8, 1, 1), Policy::Global).unwrap();
        let ranks = p.expected_rank_loads(&load, 8).unwrap();
        let mean = ranks.iter().sum::<f64>() / 8.0;
        let max = ranks.iter().copied().fold(0.0, f64::max);
        assert!(max / mean < 1.05, "max/mean {}", max / mean);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(rebalance(&[1.0, f64::NAN], topo(2, 1, 1, 1), Policy::Global).is_err());
        assert!(rebalance(&[1.0, 2.0], topo(3, 2, 1, 1), Policy::Global).is_err());
        assert!(rebalance(&[1.0, 2.0], topo(1, 1, 1, 1), Policy::Global).is_err());
    }
}
