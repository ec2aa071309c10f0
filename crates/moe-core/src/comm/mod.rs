//! Communication strategies: how routed tokens reach the ranks that own their experts and how
//! partial outputs come back. Strategies never compute experts.
//!
//! Per chunk the scheduler calls, in order: [`Communication::prepare_dispatch`] (counts and
//! metadata move before the payload), [`Communication::dispatch`] (payload: activations, maybe
//! already quantized, plus routing), the backend's `run_moe`, then [`Communication::combine`]
//! (partial outputs return to the token's home rank and are summed).

use std::any::Any;
use std::fmt;

use crate::backend::BackendInput;
use crate::config::MoeConfig;
use crate::error::Result;
use crate::routing::{Physical, TopK};
use crate::tensor::Tensor;

pub mod all_to_all;
pub mod allgather_reducescatter;
pub mod inprocess;
mod local;
pub mod rendezvous;
pub mod strategy;
pub mod tcp;
pub mod transport;
mod wire;

pub use inprocess::{run_in_process, run_ranks, InProcessTransport};
pub use local::LocalComm;
pub use strategy::{create_communication, CommOptions, CommStats, CommStatsHandle, StrategyChoice};
pub use transport::{ReduceOp, SharedTransport, Transport};

/// What `prepare_dispatch` learned, carried to `dispatch` and `combine` of the same chunk.
#[derive(Debug)]
pub struct DispatchPlan {
    /// Tokens this rank holds before dispatch (the chunk's local tokens).
    pub local_tokens: usize,
    /// Tokens this rank will compute on after dispatch.
    pub received_tokens: usize,
    /// Strategy-specific state (send/receive maps).
    pub state: Box<dyn Any + Send>,
}

/// One communication strategy bound to one rank.
pub trait Communication: Send + fmt::Debug {
    /// Strategy name.
    fn name(&self) -> &str;

    /// This rank and the world size.
    fn rank(&self) -> (usize, usize);

    /// `Ok` or why this strategy cannot serve `tokens_per_rank` tokens of `cfg`.
    fn is_workload_feasible(&self, cfg: &MoeConfig, tokens_per_rank: usize) -> std::result::Result<(), String>;

    /// Whether quantized activations (payload + scales) may be dispatched (quantize first).
    fn supports_post_quant_dispatch(&self) -> bool;

    /// Largest local token count across ranks (every rank runs that many chunks).
    fn max_tokens_across_ranks(&mut self, local_tokens: usize) -> Result<usize>;

    /// Exchanges counts/metadata for this chunk's routing.
    fn prepare_dispatch(&mut self, routing: &TopK<Physical>) -> Result<DispatchPlan>;

    /// Moves activations and routing to the ranks that compute them.
    fn dispatch(
        &mut self,
        plan: &DispatchPlan,
        input: BackendInput,
        routing: TopK<Physical>,
    ) -> Result<(BackendInput, TopK<Physical>)>;

    /// Returns partial outputs (f32 `[received, H]`) to their home ranks, summed: f32 `[local, H]`.
    fn combine(&mut self, plan: &DispatchPlan, partial: Tensor) -> Result<Tensor>;
}

/// `Ok` when the transport's world size is the config's `ep_size`, else the mismatch in words.
pub(crate) fn check_world(cfg: &MoeConfig, world: usize) -> std::result::Result<(), String> {
    if cfg.parallel.ep_size != world {
        return Err(format!("the config has ep_size {} but the transport has {world} ranks", cfg.parallel.ep_size));
    }
    Ok(())
}

/// Bytes one token occupies in flight on a rank: its activations (act dtype), its f32 partial
/// output and its k (id, weight) pairs. Strategies size their worst cases with it.
pub(crate) fn token_bytes(cfg: &MoeConfig) -> usize {
    cfg.hidden_size * (cfg.act_dtype.size_bytes() + 4) + 8 * cfg.top_k
}

/// The strategy-specific state of `plan`, or an error naming `strategy` and `rank` when the plan
/// came from another strategy.
pub(crate) fn plan_state<'a, P: 'static>(plan: &'a DispatchPlan, strategy: &str, rank: usize) -> Result<&'a P> {
    plan.state.downcast_ref::<P>().ok_or_else(|| crate::MoeError::Comm {
        strategy: strategy.into(),
        rank,
        reason: "the dispatch plan comes from another strategy".into(),
    })
}
