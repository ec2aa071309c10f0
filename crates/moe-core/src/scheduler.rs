//! Forward-time policy for one MoE block: chunking (with chunk counts agreed across ranks, so a
//! rank with fewer or zero tokens still joins every collective), the EPLB hook order, and the
//! quantize-vs-dispatch order. It calls the backend's `quantize_input` then `run_moe`; it owns no
//! weights and creates no communication.

use crate::backend::{ExpertBackend, SchedulerKind};
use crate::comm::Communication;
use crate::config::MoeConfig;
use crate::eplb::LoadBalancer;
use crate::error::{MoeError, Result};
use crate::tensor::Tensor;

/// Where router logits come from.
#[derive(Debug, Clone, Copy)]
pub enum LogitsSource<'a> {
    /// The block's router linear.
    Router,
    /// Precomputed `[T, E]` logits (`forward_with_logits`).
    Given(&'a Tensor),
}

/// The chunking scheduler.
#[derive(Debug, Clone)]
pub struct Scheduler {
    chunk_size: Option<usize>,
    hidden: usize,
}

impl Scheduler {
    /// A scheduler for `cfg` (chunk size from the config).
    pub fn new(cfg: &MoeConfig) -> Self {
        Scheduler { chunk_size: cfg.chunk_size, hidden: cfg.hidden_size }
    }

    /// Runs one forward over `hidden [T, H]`.
    pub fn forward(
        &self,
        backend: &mut dyn ExpertBackend,
        comm: &mut dyn Communication,
        eplb: &mut dyn LoadBalancer,
        hidden: &Tensor,
        logits: LogitsSource<'_>,
    ) -> Result<Tensor> {
        let h = self.hidden;
        let t = hidden.dim(0)?;
        hidden.expect_shape("forward", &[t, h])?;
        if let LogitsSource::Given(l) = logits {
            if l.dim(0)? != t {
                return Err(MoeError::shape(
                    "forward_with_logits",
                    format!("logits for {t} tokens"),
                    format!("{:?}", l.shape()),
                ));
            }
        }
        if backend.scheduler_kind() == SchedulerKind::FusedCommunication {
            return Err(MoeError::unsupported(
                backend.name(),
                "fused-communication backends need a fused scheduler, which this build does not have",
            ));
        }
        let max_t = comm.max_tokens_across_ranks(t)?;
        let chunk = self.chunk_size.unwrap_or(max_t.max(1));
        // Every rank runs the same number of chunks; a zero-token input still runs one.
        let num_chunks = max_t.div_ceil(chunk).max(1);
        let mut outs = Vec::with_capacity(num_chunks);
        for c in 0..num_chunks {
            let start = (c * chunk).min(t);
            let len = chunk.min(t - start);
            let x = if start == 0 && len == t { hidden.clone() } else { hidden.narrow_rows(start, len)? };
            let chunk_logits = match logits {
                LogitsSource::Router => tracing::debug_span!("router_logits").in_scope(|| backend.router_logits(&x))?,
                LogitsSource::Given(l) => {
                    if start == 0 && len == t {
                        l.clone()
                    } else {
                        l.narrow_rows(start, len)?
                    }
                }
            };
            outs.push(self.forward_chunk(backend, comm, eplb, &x, &chunk_logits)?);
        }
        eplb.end_iteration(backend)?;
        if outs.len() == 1 {
            return Ok(outs.pop().unwrap_or_else(|| Tensor::zeros(vec![0, h], hidden.dtype())));
        }
        let dtype = outs[0].dtype();
        let host: Vec<Tensor> = outs.iter().map(|o| o.to_host()).collect::<Result<_>>()?;
        Tensor::cat_rows(&host, &[h], dtype)
    }

    fn forward_chunk(
        &self,
        backend: &mut dyn ExpertBackend,
        comm: &mut dyn Communication,
        eplb: &mut dyn LoadBalancer,
        x: &Tensor,
        logits: &Tensor,
    ) -> Result<Tensor> {
        // Debug-level spans time each step (`MOE_LOG=debug` on the CLI prints their busy time).
        use tracing::debug_span as span;
        let logical = span!("route").in_scope(|| backend.route(logits))?;
        let routing = span!("eplb").in_scope(|| {
            eplb.record(&logical)?;
            eplb.map_to_slots(logical)
        })?;
        let (plan, input, routing) = span!("dispatch").in_scope(|| -> Result<_> {
            let plan = comm.prepare_dispatch(&routing)?;
            let (input, routing) = if comm.supports_post_quant_dispatch() {
                let q = backend.quantize_input(x)?;
                comm.dispatch(&plan, q, routing)?
            } else {
                let (plain, routing) = comm.dispatch(&plan, crate::backend::BackendInput::plain(x.clone()), routing)?;
                (backend.quantize_input(&plain.hidden)?, routing)
            };
            Ok((plan, input, routing))
        })?;
        let partial = span!("run_moe").in_scope(|| backend.run_moe(&input, &routing))?;
        let routed = span!("combine").in_scope(|| comm.combine(&plan, partial))?;
        span!("finalize").in_scope(|| backend.finalize(x, routed))
    }
}
