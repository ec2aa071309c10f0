//! Per-expert load statistics of one MoE layer (one balancer per layer, so per layer per expert),
//! summed over a sliding window of the last `window` forwards.
//!
//! Recording never synchronizes with a device in the hot path: host ids are counted at once,
//! device ids are only held (a cheap handle clone) and counted when the forward ends, in
//! [`LoadWindow::end_iteration`], off the critical path of the chunks. Across ranks the window
//! totals are summed by a [`CountReducer`] (an all-reduce over the communication layer's
//! transport) right before a rebalance, so every rank plans from the same numbers.

use std::collections::VecDeque;
use std::fmt;

use crate::comm::transport::{ReduceOp, SharedTransport};
use crate::error::{MoeError, Result};
use crate::routing::{Logical, TopK};
use crate::tensor::Tensor;

/// Token counts per logical expert over the last `window` forwards.
#[derive(Debug, Clone)]
pub struct LoadWindow {
    num_experts: usize,
    window: usize,
    current: Vec<u64>,
    pending: Vec<Tensor>,
    history: VecDeque<Vec<u64>>,
    total: Vec<u64>,
}

impl LoadWindow {
    /// An empty window of `window` forwards (at least 1) over `num_experts` experts.
    pub fn new(num_experts: usize, window: usize) -> Result<Self> {
        if window == 0 {
            return Err(MoeError::config("eplb.window", "the statistics window must hold at least one forward"));
        }
        Ok(LoadWindow {
            num_experts,
            window,
            current: vec![0; num_experts],
            pending: Vec::new(),
            history: VecDeque::with_capacity(window),
            total: vec![0; num_experts],
        })
    }

    /// Counts one chunk's routing (host ids now; device ids at the end of the forward).
    pub fn record(&mut self, routing: &TopK<Logical>) -> Result<()> {
        if routing.ids().is_host() {
            let ids = routing.ids_host()?;
            count_into(&mut self.current, ids)
        } else {
            self.pending.push(routing.ids().clone());
            Ok(())
        }
    }

    /// Counts raw logical ids (a trace).
    pub fn record_ids(&mut self, ids: &[i32]) -> Result<()> {
        count_into(&mut self.current, ids)
    }

    /// Closes the current forward: counts deferred device ids, then slides the window.
    pub fn end_iteration(&mut self) -> Result<()> {
        for t in std::mem::take(&mut self.pending) {
            let host = t.to_host()?;
            count_into(&mut self.current, host.as_i32()?)?;
        }
        let done = std::mem::replace(&mut self.current, vec![0; self.num_experts]);
        for (t, c) in self.total.iter_mut().zip(&done) {
            *t += c;
        }
        self.history.push_back(done);
        if self.history.len() > self.window {
            if let Some(old) = self.history.pop_front() {
                for (t, c) in self.total.iter_mut().zip(&old) {
                    *t -= c;
                }
            }
        }
        Ok(())
    }

    /// Counts per expert over the completed forwards in the window.
    pub fn totals(&self) -> &[u64] {
        &self.total
    }

    /// Completed forwards in the window.
    pub fn forwards(&self) -> usize {
        self.history.len()
    }

    /// Experts counted.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
}

fn count_into(counts: &mut [u64], ids: &[i32]) -> Result<()> {
    let n = counts.len();
    for &id in ids {
        let c = usize::try_from(id)
            .ok()
            .and_then(|e| counts.get_mut(e))
            .ok_or_else(|| MoeError::shape("eplb.record", format!("logical expert ids in 0..{n}"), id.to_string()))?;
        *c += 1;
    }
    Ok(())
}

/// Sums per-expert counts across the ranks of an expert-parallel group (a collective: every rank
/// calls it at the same point, with the same length).
pub trait CountReducer: Send + fmt::Debug {
    /// For messages.
    fn name(&self) -> &str;

    /// Replaces `counts` with the element-wise sum over all ranks.
    fn all_reduce_sum(&mut self, counts: &mut [u64]) -> Result<()>;
}

/// One rank: the local counts are the global counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl CountReducer for SingleRank {
    fn name(&self) -> &str {
        "single-rank"
    }

    fn all_reduce_sum(&mut self, _counts: &mut [u64]) -> Result<()> {
        Ok(())
    }
}

/// All-reduce over the communication layer's transport (the same group the strategy uses; the
/// balancer's collective runs after the forward's last combine, in the same order on every rank).
#[derive(Debug, Clone)]
pub struct TransportReducer {
    transport: SharedTransport,
}

impl TransportReducer {
    /// Reduces over `transport`.
    pub fn new(transport: SharedTransport) -> Self {
        TransportReducer { transport }
    }
}

impl CountReducer for TransportReducer {
    fn name(&self) -> &str {
        self.transport.name()
    }

    fn all_reduce_sum(&mut self, counts: &mut [u64]) -> Result<()> {
        self.transport.lock()?.all_reduce_u64(counts, ReduceOp::Sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_slides() {
        let mut w = LoadWindow::new(3, 2).unwrap();
        for ids in [vec![0, 1], vec![1, 1], vec![2, 2]] {
            let r = TopK::<Logical>::from_vecs(1, 2, ids, vec![0.5; 2], false).unwrap();
            w.record(&r).unwrap();
            w.end_iteration().unwrap();
        }
        assert_eq!(w.totals(), &[0, 2, 2], "the first forward left the window");
        assert_eq!(w.forwards(), 2);
        assert!(w.record_ids(&[3]).is_err());
        assert!(w.record_ids(&[-1]).is_err());
        assert!(LoadWindow::new(3, 0).is_err());
    }
}
