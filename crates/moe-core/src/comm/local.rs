//! The single-rank strategy: every expert is local, nothing moves.

use super::{Communication, DispatchPlan};
use crate::backend::BackendInput;
use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::routing::{Physical, TopK};
use crate::tensor::Tensor;

/// One rank, no communication.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalComm;

impl Communication for LocalComm {
    fn name(&self) -> &str {
        "local"
    }

    fn rank(&self) -> (usize, usize) {
        (0, 1)
    }

    fn is_workload_feasible(&self, cfg: &MoeConfig, _tokens: usize) -> std::result::Result<(), String> {
        if cfg.parallel.ep_size != 1 {
            return Err(format!("local runs one rank; ep_size is {}", cfg.parallel.ep_size));
        }
        Ok(())
    }

    fn supports_post_quant_dispatch(&self) -> bool {
        true
    }

    fn max_tokens_across_ranks(&mut self, local_tokens: usize) -> Result<usize> {
        Ok(local_tokens)
    }

    fn prepare_dispatch(&mut self, routing: &TopK<Physical>) -> Result<DispatchPlan> {
        let n = routing.num_tokens();
        Ok(DispatchPlan { local_tokens: n, received_tokens: n, state: Box::new(()) })
    }

    fn dispatch(
        &mut self,
        plan: &DispatchPlan,
        input: BackendInput,
        routing: TopK<Physical>,
    ) -> Result<(BackendInput, TopK<Physical>)> {
        if input.num_tokens() != plan.local_tokens {
            return Err(MoeError::shape(
                "local.dispatch",
                plan.local_tokens.to_string(),
                input.num_tokens().to_string(),
            ));
        }
        Ok((input, routing))
    }

    fn combine(&mut self, plan: &DispatchPlan, partial: Tensor) -> Result<Tensor> {
        if partial.shape().first() != Some(&plan.local_tokens) {
            return Err(MoeError::shape(
                "local.combine",
                format!("[{}, H]", plan.local_tokens),
                format!("{:?}", partial.shape()),
            ));
        }
        Ok(partial)
    }
}
