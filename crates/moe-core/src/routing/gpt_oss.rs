//! GPT-OSS: `v, ids = topk(logits, k)`; `w = softmax(v)` over the k selected values. The router
//! bias is part of the router linear, so it is already in the logits.

use super::{softmax_in_place, topk_indices, RoutingMethod};

/// Top-k of the raw logits, then softmax over the selected values.
#[derive(Debug, Clone, Copy)]
pub struct GptOss;

impl RoutingMethod for GptOss {
    fn name(&self) -> &'static str {
        "gpt_oss"
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
            *w = logits[i as usize];
        }
        softmax_in_place(weights);
    }
}
