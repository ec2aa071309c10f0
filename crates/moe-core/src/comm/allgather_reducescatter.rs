//! The all-gather + reduce-scatter strategy: every rank receives every rank's tokens (with their
//! routing), computes its own experts' share of all of them, and the partial outputs are
//! reduce-scattered (summed) back to the token's home rank.
//!
//! Traffic per rank is `(ep_size - 1) * T * row` whatever the routing, in two collectives, so it
//! suits small token counts (decode) and large top-k; memory grows with `ep_size * T`, which is
//! what [`Communication::is_workload_feasible`] bounds.

use std::time::Instant;

use super::strategy::{CommStatsHandle, StrategyLimits};
use super::transport::SharedTransport;
use super::wire::{decode, Encoder};
use super::{Communication, DispatchPlan};
use crate::backend::BackendInput;
use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::routing::{Physical, TopK};
use crate::tensor::Tensor;

/// Strategy name.
pub const NAME: &str = "allgather_reducescatter";

/// All-gather dispatch, reduce-scatter combine.
#[derive(Debug)]
pub struct AllGatherReduceScatter {
    transport: SharedTransport,
    hidden: usize,
    limits: StrategyLimits,
    stats: CommStatsHandle,
}

#[derive(Debug)]
struct Plan {
    /// Tokens of every rank in this chunk.
    counts: Vec<usize>,
}

impl AllGatherReduceScatter {
    /// A strategy over `transport` for blocks of `cfg`.
    pub fn new(cfg: &MoeConfig, transport: SharedTransport, limits: StrategyLimits, stats: CommStatsHandle) -> Self {
        AllGatherReduceScatter { transport, hidden: cfg.hidden_size, limits, stats }
    }

    fn err(&self, reason: impl Into<String>) -> MoeError {
        MoeError::Comm { strategy: NAME.into(), rank: self.transport.rank(), reason: reason.into() }
    }

    fn plan<'a>(&self, plan: &'a DispatchPlan) -> Result<&'a Plan> {
        super::plan_state(plan, NAME, self.transport.rank())
    }
}

impl Communication for AllGatherReduceScatter {
    fn name(&self) -> &str {
        NAME
    }

    fn rank(&self) -> (usize, usize) {
        (self.transport.rank(), self.transport.world_size())
    }

    fn is_workload_feasible(&self, cfg: &MoeConfig, tokens_per_rank: usize) -> std::result::Result<(), String> {
        super::check_world(cfg, self.transport.world_size())?;
        // gathered activations (bf16-sized rows at least) plus the f32 partial output
        let row = super::token_bytes(cfg);
        let bytes = cfg.parallel.ep_size.saturating_mul(tokens_per_rank).saturating_mul(row);
        if bytes > self.limits.max_gather_bytes {
            return Err(format!(
                "gathering {tokens_per_rank} tokens from each of {} ranks needs {bytes} bytes per rank, over the \
                 {} byte limit; use all_to_all (or a smaller chunk_size)",
                cfg.parallel.ep_size, self.limits.max_gather_bytes
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
        let n = routing.num_tokens();
        let all = self.transport.lock()?.all_gather(&(n as u64).to_le_bytes())?;
        let counts: Vec<usize> = all.iter().map(|b| super::transport::u64_from(b) as usize).collect();
        let received = counts.iter().sum();
        Ok(DispatchPlan { local_tokens: n, received_tokens: received, state: Box::new(Plan { counts }) })
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
                "allgather.dispatch",
                format!("{} tokens (as prepared)", plan.local_tokens),
                input.num_tokens().to_string(),
            ));
        }
        let enc = Encoder::new(&input, &routing)?;
        let rb = enc.format().record_bytes();
        let mine = enc.records(0..plan.local_tokens);
        let sizes: Vec<usize> = p.counts.iter().map(|c| c * rb).collect();
        let parts = self.transport.lock()?.all_gather_v(&mine, &sizes)?;
        let out = decode(enc.format(), &parts)?;
        let world = self.transport.world_size() as u64;
        let mut s = self.stats.lock().map_err(|_| self.err("stats lock poisoned"))?;
        s.dispatch_bytes += (world - 1) * (plan.local_tokens * enc.format().payload_bytes()) as u64;
        s.dispatch_secs += start.elapsed().as_secs_f64();
        s.chunks += 1;
        Ok(out)
    }

    fn combine(&mut self, plan: &DispatchPlan, partial: Tensor) -> Result<Tensor> {
        let start = Instant::now();
        let p = self.plan(plan)?;
        let h = self.hidden;
        partial.expect_shape("allgather.combine", &[plan.received_tokens, h])?;
        let data = partial.to_host()?;
        let counts: Vec<usize> = p.counts.iter().map(|c| c * h).collect();
        let mine = self.transport.lock()?.reduce_scatter_f32(data.as_f32()?, &counts)?;
        let mut s = self.stats.lock().map_err(|_| self.err("stats lock poisoned"))?;
        s.combine_bytes += ((plan.received_tokens - plan.local_tokens) * h * 4) as u64;
        s.combine_secs += start.elapsed().as_secs_f64();
        drop(s);
        Tensor::from_f32(vec![plan.local_tokens, h], mine)
    }
}
