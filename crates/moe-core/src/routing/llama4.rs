//! Llama-4: `v, ids = topk(logits, k)` (k = 1 in released models); `score = sigmoid(v)`
//! multiplies the expert's INPUT: `out = shared(x) + sum_i expert_i(x * score_i)`.

use super::{topk_indices, RoutingMethod};
use crate::config::sigmoid;

/// Sigmoid top-k applied to the expert input.
#[derive(Debug, Clone, Copy)]
pub struct Llama4;

impl RoutingMethod for Llama4 {
    fn name(&self) -> &'static str {
        "llama4"
    }

    fn route_rows(
        &self,
        logits: &[f32],
        _e: usize,
        k: usize,
        _bias: Option<&[f32]>,
        ids: &mut [i32],
        weights: &mut [f32],
    ) {
        topk_indices(logits, k, ids);
        for (w, &i) in weights.iter_mut().zip(ids.iter()) {
            *w = sigmoid(logits[i as usize]);
        }
    }

    fn weights_on_input(&self) -> bool {
        true
    }
}
