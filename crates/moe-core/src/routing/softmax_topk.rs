//! Softmax top-k (Mixtral, Qwen2/3-MoE, OLMoE): `p = softmax(logits)`, top-k of `p`,
//! renormalized to sum 1 when `renormalize` (Mixtral always; Qwen by `norm_topk_prob`).

use super::{softmax_in_place, topk_indices, with_scratch_copy, RoutingMethod};

/// Softmax then top-k.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxTopk {
    /// Divide the k weights by their sum.
    pub renormalize: bool,
}

impl RoutingMethod for SoftmaxTopk {
    fn name(&self) -> &'static str {
        "softmax_topk"
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
        with_scratch_copy(logits, |p| {
            softmax_in_place(p);
            topk_indices(p, k, ids);
            for (w, &i) in weights.iter_mut().zip(ids.iter()) {
                *w = p[i as usize];
            }
        });
        if self.renormalize {
            let s: f32 = weights.iter().sum();
            weights.iter_mut().for_each(|w| *w /= s);
        }
    }
}
