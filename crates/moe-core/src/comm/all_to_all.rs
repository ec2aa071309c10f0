//! The all-to-all strategy: each token goes only to the ranks that own at least one of its
//! slots (once per rank, however many of its k slots that rank holds), and each rank's partial
//! output goes back to the token's home rank, where the parts are summed in rank order.
//!
//! `prepare_dispatch` exchanges the per-peer token counts, so the payload exchange knows every
//! size in advance (NCCL needs that, and a disagreement is caught instead of truncated).

use std::time::Instant;

use super::strategy::{CommStatsHandle, StrategyLimits};
use super::transport::{f32_from, f32_to_bytes, SharedTransport};
use super::wire::{decode, Encoder};
use super::{Communication, DispatchPlan};
use crate::backend::BackendInput;
use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::routing::{Physical, TopK};
use crate::tensor::Tensor;

/// Strategy name.
pub const NAME: &str = "all_to_all";

/// All-to-all dispatch and combine.
#[derive(Debug)]
pub struct AllToAll {
    transport: SharedTransport,
    hidden: usize,
    slots_per_rank: usize,
    num_slots: usize,
    limits: StrategyLimits,
    stats: CommStatsHandle,
}

#[derive(Debug)]
struct Plan {
    /// Local token indices sent to each rank, in token order.
    send: Vec<Vec<usize>>,
    /// Tokens received from each rank.
    recv_counts: Vec<usize>,
}

impl AllToAll {
    /// A strategy over `transport` for blocks of `cfg` (contiguous slot blocks per rank).
    pub fn new(cfg: &MoeConfig, transport: SharedTransport, limits: StrategyLimits, stats: CommStatsHandle) -> Self {
        AllToAll {
            transport,
            hidden: cfg.hidden_size,
            slots_per_rank: cfg.slots_per_rank(),
            num_slots: cfg.num_slots(),
            limits,
            stats,
        }
    }

    fn err(&self, reason: impl Into<String>) -> MoeError {
        MoeError::Comm { strategy: NAME.into(), rank: self.transport.rank(), reason: reason.into() }
    }

    fn plan<'a>(&self, plan: &'a DispatchPlan) -> Result<&'a Plan> {
        super::plan_state(plan, NAME, self.transport.rank())
    }
}

impl Communication for AllToAll {
    fn name(&self) -> &str {
        NAME
    }

    fn rank(&self) -> (usize, usize) {
        (self.transport.rank(), self.transport.world_size())
    }

    fn is_workload_feasible(&self, cfg: &MoeConfig, tokens_per_rank: usize) -> std::result::Result<(), String> {
        super::check_world(cfg, self.transport.world_size())?;
        // worst case: every token of every rank lands here (skewed routing)
        let row = super::token_bytes(cfg);
        let bytes = cfg.parallel.ep_size.saturating_mul(tokens_per_rank).saturating_mul(row);
        if bytes > self.limits.max_receive_bytes {
            return Err(format!(
                "a fully skewed chunk of {tokens_per_rank} tokens per rank over {} ranks could need {bytes} bytes \
                 on one rank, over the {} byte limit; lower chunk_size",
                cfg.parallel.ep_size, self.limits.max_receive_bytes
            ));
        }
        Ok(())
    }

    fn supports_post_quant_dispatch(&self) -> bool {
        true
    }

    fn max_tokens_across_ranks(&mut self, local_tokens: usize) -> Result<usize> {
        let mut v = [local_tokens as u64];
        self.transport.lock()?.all_reduce_u64(&mut v, super::transport::ReduceOp::Max)?;
        Ok(v[0] as usize)
    }

    fn prepare_dispatch(&mut self, routing: &TopK<Physical>) -> Result<DispatchPlan> {
        let world = self.transport.world_size();
        let (n, k) = (routing.num_tokens(), routing.k());
        // Device backends route on the device; the plan is made on the host.
        let ids_t = routing.ids().to_host()?;
        let ids = ids_t.as_i32()?;
        let mut send: Vec<Vec<usize>> = vec![Vec::new(); world];
        let mut hit = vec![usize::MAX; world];
        for t in 0..n {
            for &id in &ids[t * k..(t + 1) * k] {
                let slot = usize::try_from(id).ok().filter(|&s| s < self.num_slots).ok_or_else(|| {
                    self.err(format!("token {t} is routed to slot {id}, outside 0..{}", self.num_slots))
                })?;
                let r = slot / self.slots_per_rank;
                if hit[r] != t {
                    hit[r] = t;
                    send[r].push(t);
                }
            }
        }
        let counts: Vec<u64> = send.iter().map(|s| s.len() as u64).collect();
        let recv = self.transport.lock()?.exchange_counts(&counts)?;
        let recv_counts: Vec<usize> = recv.iter().map(|&c| c as usize).collect();
        let received = recv_counts.iter().sum();
        Ok(DispatchPlan { local_tokens: n, received_tokens: received, state: Box::new(Plan { send, recv_counts }) })
    }

    fn dispatch(
        &mut self,
        plan: &DispatchPlan,
        input: BackendInput,
        routing: TopK<Physical>,
    ) -> Result<(BackendInput, TopK<Physical>)> {
        let start = Instant::now();
        let p = self.plan(plan)?;
        if input.num_tokens() != plan.local_tokens {
            return Err(MoeError::shape(
                "all_to_all.dispatch",
                format!("{} tokens (as prepared)", plan.local_tokens),
                input.num_tokens().to_string(),
            ));
        }
        let enc = Encoder::new(&input, &routing)?;
        let rb = enc.format().record_bytes();
        let bufs: Vec<Vec<u8>> = p.send.iter().map(|toks| enc.records(toks.iter().copied())).collect();
        let recv_bytes: Vec<usize> = p.recv_counts.iter().map(|c| c * rb).collect();
        let parts = self.transport.lock()?.all_to_all_v(&bufs, &recv_bytes)?;
        let out = decode(enc.format(), &parts)?;
        let me = self.transport.rank();
        let off_rank: usize = p.send.iter().enumerate().filter(|(r, _)| *r != me).map(|(_, s)| s.len()).sum();
        let mut s = self.stats.lock().map_err(|_| self.err("stats lock poisoned"))?;
        s.dispatch_bytes += (off_rank * enc.format().payload_bytes()) as u64;
        s.dispatch_secs += start.elapsed().as_secs_f64();
        s.chunks += 1;
        Ok(out)
    }

    fn combine(&mut self, plan: &DispatchPlan, partial: Tensor) -> Result<Tensor> {
        let start = Instant::now();
        let p = self.plan(plan)?;
        let h = self.hidden;
        partial.expect_shape("all_to_all.combine", &[plan.received_tokens, h])?;
        let host = partial.to_host()?;
        let data = host.as_f32()?;
        let mut bufs = Vec::with_capacity(p.recv_counts.len());
        let mut off = 0;
        for &c in &p.recv_counts {
            bufs.push(f32_to_bytes(&data[off * h..(off + c) * h]));
            off += c;
        }
        let recv_bytes: Vec<usize> = p.send.iter().map(|s| s.len() * h * 4).collect();
        let parts = self.transport.lock()?.all_to_all_v(&bufs, &recv_bytes)?;
        let mut out = vec![0.0f32; plan.local_tokens * h];
        for (toks, bytes) in p.send.iter().zip(&parts) {
            for (&t, row) in toks.iter().zip(bytes.chunks_exact(h * 4)) {
                for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(row.chunks_exact(4).map(f32_from)) {
                    *o += v;
                }
            }
        }
        let me = self.transport.rank();
        let off_rank: usize =
            p.recv_counts.iter().enumerate().filter(|(r, _)| *r != me).map(|(_, c)| c).sum::<usize>() * h * 4;
        let mut s = self.stats.lock().map_err(|_| self.err("stats lock poisoned"))?;
        s.combine_bytes += off_rank as u64;
        s.combine_secs += start.elapsed().as_secs_f64();
        drop(s);
        Tensor::from_f32(vec![plan.local_tokens, h], out)
    }
}
