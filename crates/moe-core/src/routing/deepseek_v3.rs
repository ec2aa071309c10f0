//! DeepSeek-V3 `noaux_tc`: `s = sigmoid(logits)`, `c = s + bias` (selection only), group score =
//! sum of the top-2 `c` per group, keep `topk_group` groups, mask the rest (0.0 as in transformers
//! 4.x, or -inf as in transformers 5.x, vLLM and TensorRT-LLM), `ids = topk(c_masked)`, `w = s[ids]`, optional
//! renormalization `w /= sum + 1e-20`, then `w *= routed_scaling_factor`.

use super::{topk_indices, RoutingMethod};
use crate::config::{sigmoid, GroupMaskValue};

/// DeepSeek-V3 grouped, bias-corrected sigmoid routing.
#[derive(Debug, Clone, Copy)]
pub struct DeepseekV3 {
    /// Expert groups.
    pub n_group: usize,
    /// Groups kept.
    pub topk_group: usize,
    /// Renormalize selected weights.
    pub norm_topk_prob: bool,
    /// Final multiplier.
    pub routed_scaling_factor: f32,
    /// Value written into losing groups.
    pub group_mask: GroupMaskValue,
}

impl RoutingMethod for DeepseekV3 {
    fn name(&self) -> &'static str {
        "deepseek_v3"
    }

    fn route_rows(
        &self,
        logits: &[f32],
        e: usize,
        k: usize,
        bias: Option<&[f32]>,
        ids: &mut [i32],
        weights: &mut [f32],
    ) {
        let s: Vec<f32> = logits.iter().map(|&x| sigmoid(x)).collect();
        let mut c: Vec<f32> = match bias {
            Some(b) => s.iter().zip(b).map(|(x, y)| x + y).collect(),
            None => s.clone(),
        };
        let group_size = e / self.n_group;
        let group_scores: Vec<f32> = c
            .chunks(group_size)
            .map(|g| {
                let mut top2 = [0i32; 2];
                topk_indices(g, 2, &mut top2);
                g[top2[0] as usize] + g[top2[1] as usize]
            })
            .collect();
        let mut kept = vec![0i32; self.topk_group];
        topk_indices(&group_scores, self.topk_group, &mut kept);
        let mask = match self.group_mask {
            GroupMaskValue::Zero => 0.0,
            GroupMaskValue::NegInf => f32::NEG_INFINITY,
        };
        for (g, chunk) in c.chunks_mut(group_size).enumerate() {
            if !kept.contains(&(g as i32)) {
                chunk.iter_mut().for_each(|x| *x = mask);
            }
        }
        topk_indices(&c, k, ids);
        for (w, &i) in weights.iter_mut().zip(ids.iter()) {
            *w = s[i as usize];
        }
        if self.norm_topk_prob {
            let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        weights.iter_mut().for_each(|w| *w *= self.routed_scaling_factor);
    }
}
