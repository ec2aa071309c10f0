//! The collectives expert parallelism needs, over any transport (threads of one process, NCCL).
//!
//! A [`Transport`] moves bytes between the ranks of one group. Only
//! [`Transport::all_to_all_v`] is required; the other collectives have portable default
//! implementations on top of it (reductions are done in rank order, so every rank gets bitwise the
//! same result) that a transport with native collectives (NCCL) overrides.
//!
//! Every collective must be called by every rank of the group in the same order, with zero-length
//! payloads where a rank has nothing to send. A peer that never answers ends the call with
//! [`MoeError::Comm`] after the transport's timeout; a peer that left the group ends it at once.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::MoeConfig;
use crate::error::{MoeError, Result};

/// How a reduction combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
}

/// The default time a rank waits for its peers before a collective fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Collectives between the ranks of one group. Every method is a collective: all ranks call it.
pub trait Transport: Send + fmt::Debug {
    /// Transport name for messages (`inprocess`, `nccl`).
    fn name(&self) -> &str;

    /// This rank.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn world_size(&self) -> usize;

    /// How long a collective waits for its peers before it fails.
    fn timeout(&self) -> Duration;

    /// Personalized all-to-all: `send[p]` goes to rank `p`; the result holds, for each rank `p`,
    /// exactly `recv_bytes[p]` bytes it sent here. Sizes are agreed beforehand (see
    /// [`Transport::exchange_counts`]); a disagreement is an error, never a truncation.
    fn all_to_all_v(&mut self, send: &[Vec<u8>], recv_bytes: &[usize]) -> Result<Vec<Vec<u8>>>;

    /// All-to-all of one `u64` per peer: `counts[p]` goes to rank `p`; returns what each rank sent.
    fn exchange_counts(&mut self, counts: &[u64]) -> Result<Vec<u64>> {
        let w = self.world_size();
        check_len(self, "exchange_counts", counts.len(), w)?;
        let send: Vec<Vec<u8>> = counts.iter().map(|c| c.to_le_bytes().to_vec()).collect();
        let recv = self.all_to_all_v(&send, &vec![8; w])?;
        recv.iter().map(|b| Ok(u64_from(b))).collect()
    }

    /// Every rank's `data`, in rank order; `sizes[p]` is the length rank `p` contributes.
    fn all_gather_v(&mut self, data: &[u8], sizes: &[usize]) -> Result<Vec<Vec<u8>>> {
        let w = self.world_size();
        check_len(self, "all_gather_v", sizes.len(), w)?;
        let me = self.rank();
        if sizes[me] != data.len() {
            return Err(comm_err(
                self,
                format!("all_gather_v: this rank contributes {} bytes but sizes says {}", data.len(), sizes[me]),
            ));
        }
        let send = vec![data.to_vec(); w];
        self.all_to_all_v(&send, sizes)
    }

    /// Every rank's `data` (all of the same length), in rank order.
    fn all_gather(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let sizes = vec![data.len(); self.world_size()];
        self.all_gather_v(data, &sizes)
    }

    /// In-place all-reduce of f32 values.
    fn all_reduce_f32(&mut self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        let parts = self.all_gather(&f32_to_bytes(data))?;
        data.fill(match op {
            ReduceOp::Sum => 0.0,
            ReduceOp::Max => f32::NEG_INFINITY,
        });
        for p in &parts {
            for (d, v) in data.iter_mut().zip(p.chunks_exact(4).map(f32_from)) {
                *d = match op {
                    ReduceOp::Sum => *d + v,
                    ReduceOp::Max => d.max(v),
                };
            }
        }
        Ok(())
    }

    /// In-place all-reduce of u64 values (token counts, per-expert loads).
    fn all_reduce_u64(&mut self, data: &mut [u64], op: ReduceOp) -> Result<()> {
        let parts = self.all_gather(&u64_to_bytes(data))?;
        data.fill(0);
        for p in &parts {
            for (d, v) in data.iter_mut().zip(p.chunks_exact(8).map(u64_from)) {
                *d = match op {
                    ReduceOp::Sum => d.wrapping_add(v),
                    ReduceOp::Max => (*d).max(v),
                };
            }
        }
        Ok(())
    }

    /// Reduce-scatter (sum) of f32 values: `data` is every rank's segment back to back
    /// (`counts[p]` values for rank `p`); returns this rank's segment summed over ranks.
    fn reduce_scatter_f32(&mut self, data: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let w = self.world_size();
        check_len(self, "reduce_scatter_f32", counts.len(), w)?;
        let total: usize = counts.iter().sum();
        if total != data.len() {
            return Err(comm_err(
                self,
                format!("reduce_scatter_f32: counts add up to {total} values but {} were given", data.len()),
            ));
        }
        let mut send = Vec::with_capacity(w);
        let mut off = 0;
        for &c in counts {
            send.push(f32_to_bytes(&data[off..off + c]));
            off += c;
        }
        let mine = counts[self.rank()];
        let parts = self.all_to_all_v(&send, &vec![mine * 4; w])?;
        let mut out = vec![0.0f32; mine];
        for p in &parts {
            for (o, v) in out.iter_mut().zip(p.chunks_exact(4).map(f32_from)) {
                *o += v;
            }
        }
        Ok(out)
    }

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_u64(&mut [0], ReduceOp::Sum)
    }
}

/// A transport shared by the communication strategy and the load balancer of one rank (both
/// issue collectives on the same group, in the order the scheduler calls them).
#[derive(Clone)]
pub struct SharedTransport {
    inner: Arc<Mutex<Box<dyn Transport>>>,
    rank: usize,
    world: usize,
    name: String,
}

impl fmt::Debug for SharedTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedTransport({} rank {} of {})", self.name, self.rank, self.world)
    }
}

impl SharedTransport {
    /// Wraps a transport.
    pub fn new(t: Box<dyn Transport>) -> Self {
        let (rank, world, name) = (t.rank(), t.world_size(), t.name().to_string());
        SharedTransport { inner: Arc::new(Mutex::new(t)), rank, world, name }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Transport name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Exclusive access for a sequence of collectives.
    pub fn lock(&self) -> Result<MutexGuard<'_, Box<dyn Transport>>> {
        self.inner.lock().map_err(|_| MoeError::Comm {
            strategy: self.name.clone(),
            rank: self.rank,
            reason: "the transport lock is poisoned: an earlier collective panicked on this rank".into(),
        })
    }
}

/// A [`MoeError::Comm`] naming the transport and rank.
pub fn comm_err<T: Transport + ?Sized>(t: &T, reason: impl Into<String>) -> MoeError {
    MoeError::Comm { strategy: t.name().to_string(), rank: t.rank(), reason: reason.into() }
}

fn check_len<T: Transport + ?Sized>(t: &T, op: &str, got: usize, world: usize) -> Result<()> {
    if got != world {
        return Err(comm_err(t, format!("{op}: {got} per-rank entries given for a group of {world} ranks")));
    }
    Ok(())
}

/// Little-endian bytes of f32 values.
pub fn f32_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes of u64 values.
pub fn u64_to_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One f32 from 4 little-endian bytes (callers pass `chunks_exact(4)` items).
pub fn f32_from(b: &[u8]) -> f32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    f32::from_le_bytes(a)
}

/// One u64 from 8 little-endian bytes (callers pass `chunks_exact(8)` items or 8-byte messages).
pub fn u64_from(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(a)
}

/// SHA-256 of the problem every rank must agree on: the config without its `ep_rank`.
pub fn config_hash(cfg: &MoeConfig) -> Result<[u8; 32]> {
    let mut c = cfg.clone();
    c.parallel.ep_rank = 0;
    let json = serde_json::to_vec(&c).map_err(|e| MoeError::config("parallel", format!("cannot hash config: {e}")))?;
    Ok(Sha256::digest(&json).into())
}

/// Short hex form of a hash for messages.
pub fn hash_hex(h: &[u8]) -> String {
    h.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Exchanges [`config_hash`] across the group and fails on every rank, naming the ranks that
/// disagree with rank 0, when the configs differ.
pub fn check_same_config(t: &mut dyn Transport, cfg: &MoeConfig) -> Result<()> {
    if t.world_size() != cfg.parallel.ep_size || t.rank() != cfg.parallel.ep_rank {
        return Err(comm_err(
            t,
            format!(
                "the config says rank {} of {} but the transport is rank {} of {}",
                cfg.parallel.ep_rank,
                cfg.parallel.ep_size,
                t.rank(),
                t.world_size()
            ),
        ));
    }
    let mine = config_hash(cfg)?;
    let all = t.all_gather(&mine)?;
    let bad: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, h)| h[..] != all[0][..])
        .map(|(r, h)| format!("{r} ({})", hash_hex(h)))
        .collect();
    if !bad.is_empty() {
        return Err(comm_err(
            t,
            format!(
                "ranks disagree about the MoE config: rank 0 has config hash {}, ranks {} differ; \
                 start every rank with the same model, dtypes, chunk size and ep_size",
                hash_hex(&all[0]),
                bad.join(", ")
            ),
        ));
    }
    Ok(())
}
