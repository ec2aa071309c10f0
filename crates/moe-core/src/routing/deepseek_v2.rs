//! DeepSeek-V2: softmax scores; `greedy` top-k, or `group_limited_greedy` (group score = max in
//! group, keep `topk_group` groups, losing groups masked with 0.0). If `top_k > 1` and
//! `norm_topk_prob`: `w /= sum + 1e-20`; otherwise `w *= routed_scaling_factor`.

use super::{softmax_in_place, topk_indices, RoutingMethod};
use crate::config::V2TopkMethod;

/// DeepSeek-V2 routing.
#[derive(Debug, Clone, Copy)]
pub struct DeepseekV2 {
    /// Greedy or group-limited greedy.
    pub method: V2TopkMethod,
    /// Renormalize when top_k > 1.
    pub norm_topk_prob: bool,
    /// Multiplier when not renormalizing.
    pub routed_scaling_factor: f32,
}

impl RoutingMethod for DeepseekV2 {
    fn name(&self) -> &'static str {
        "deepseek_v2"
    }

    fn route_rows(
        &self,
        logits: &[f32],
        e: usize,
        k: usize,
        _bias: Option<&[f32]>,
        ids: &mut [i32],
        weights: &mut [f32],
    ) {
        let mut p = logits.to_vec();
        softmax_in_place(&mut p);
        match self.method {
            V2TopkMethod::Greedy => topk_indices(&p, k, ids),
            V2TopkMethod::GroupLimitedGreedy { n_group, topk_group } => {
                let group_size = e / n_group;
                let group_max: Vec<f32> =
                    p.chunks(group_size).map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max)).collect();
                let mut kept = vec![0i32; topk_group];
                topk_indices(&group_max, topk_group, &mut kept);
                let mut masked = p.clone();
                for (g, chunk) in masked.chunks_mut(group_size).enumerate() {
                    if !kept.contains(&(g as i32)) {
                        chunk.iter_mut().for_each(|x| *x = 0.0);
                    }
                }
                topk_indices(&masked, k, ids);
            }
        }
        for (w, &i) in weights.iter_mut().zip(ids.iter()) {
            *w = p[i as usize];
        }
        if k > 1 && self.norm_topk_prob {
            let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        } else {
            weights.iter_mut().for_each(|w| *w *= self.routed_scaling_factor);
        }
    }
}
