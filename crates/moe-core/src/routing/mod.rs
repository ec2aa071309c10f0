//! Routing: router logits (+ bias) -> top-k expert ids (i32) and weights (f32), per token.
//!
//! Each method is one file implementing [`RoutingMethod`]; [`routing_method`] picks it from the
//! config. Ties are deterministic: the lower expert index wins. Non-finite logits are rejected with
//! [`MoeError::NonFinite`] naming the token, because any choice of experts for a NaN row would be
//! arbitrary and would silently poison the output.
//!
//! Results are [`TopK<S>`], typed by id space: routing produces [`Logical`] expert ids; the EPLB
//! placement maps them to [`Physical`] slot ids, which is what backends and communication consume.

use std::fmt;
use std::marker::PhantomData;

use crate::config::{MoeConfig, RoutingConfig};
use crate::error::{MoeError, Result};
use crate::tensor::Tensor;

mod deepseek_v2;
mod deepseek_v3;
mod gpt_oss;
mod llama4;
mod softmax_topk;

pub use deepseek_v2::DeepseekV2;
pub use deepseek_v3::DeepseekV3;
pub use gpt_oss::GptOss;
pub use llama4::Llama4;
pub use softmax_topk::SoftmaxTopk;

mod sealed {
    pub trait Sealed {}
}

/// A space of expert indices: logical experts or physical slots.
pub trait IdSpace: sealed::Sealed + fmt::Debug + Clone + Copy + Send + Sync + 'static {
    /// For messages.
    const NAME: &'static str;
}

/// Logical expert ids, as the router sees them.
#[derive(Debug, Clone, Copy)]
pub struct Logical;
/// Physical slot ids, as backends and communication see them (experts plus EPLB replicas).
#[derive(Debug, Clone, Copy)]
pub struct Physical;
impl sealed::Sealed for Logical {}
impl sealed::Sealed for Physical {}
impl IdSpace for Logical {
    const NAME: &'static str = "logical expert";
}
impl IdSpace for Physical {
    const NAME: &'static str = "physical slot";
}

/// Top-k routing of `num_tokens` tokens: `ids` i32 `[T, k]` and `weights` f32 `[T, k]`.
#[derive(Debug, Clone)]
pub struct TopK<S: IdSpace> {
    ids: Tensor,
    weights: Tensor,
    weights_on_input: bool,
    _space: PhantomData<S>,
}

impl<S: IdSpace> TopK<S> {
    /// Builds a routing result, checking that both tensors are `[T, k]` with the right dtypes.
    pub fn new(ids: Tensor, weights: Tensor, weights_on_input: bool) -> Result<Self> {
        if ids.shape().len() != 2 || ids.shape() != weights.shape() {
            return Err(MoeError::shape(
                "TopK::new",
                "ids and weights both [tokens, k]",
                format!("ids {:?}, weights {:?}", ids.shape(), weights.shape()),
            ));
        }
        if ids.dtype() != crate::DType::I32 || weights.dtype() != crate::DType::F32 {
            return Err(MoeError::DType {
                op: "TopK::new",
                expected: "ids i32, weights f32".into(),
                got: format!("ids {}, weights {}", ids.dtype(), weights.dtype()),
            });
        }
        Ok(TopK { ids, weights, weights_on_input, _space: PhantomData })
    }

    /// From host vectors.
    pub fn from_vecs(
        num_tokens: usize,
        k: usize,
        ids: Vec<i32>,
        weights: Vec<f32>,
        weights_on_input: bool,
    ) -> Result<Self> {
        Self::new(
            Tensor::from_i32(vec![num_tokens, k], ids)?,
            Tensor::from_f32(vec![num_tokens, k], weights)?,
            weights_on_input,
        )
    }

    /// Tokens routed.
    pub fn num_tokens(&self) -> usize {
        self.ids.shape()[0]
    }

    /// Experts per token.
    pub fn k(&self) -> usize {
        self.ids.shape()[1]
    }

    /// The id tensor (may be on a device).
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// The weight tensor (may be on a device).
    pub fn weights(&self) -> &Tensor {
        &self.weights
    }

    /// Host ids.
    pub fn ids_host(&self) -> Result<&[i32]> {
        self.ids.as_i32()
    }

    /// Host weights.
    pub fn weights_host(&self) -> Result<&[f32]> {
        self.weights.as_f32()
    }

    /// Llama-4 semantics: each weight scales its expert's input; outputs are summed unweighted.
    pub fn weights_on_input(&self) -> bool {
        self.weights_on_input
    }

    /// Rows `[start, start + len)` (host).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Self::new(self.ids.narrow_rows(start, len)?, self.weights.narrow_rows(start, len)?, self.weights_on_input)
    }

    /// Replaces the ids with ids of another space. Only the EPLB placement (or the identity map
    /// when EPLB is off) calls this; it is the one door between the spaces.
    pub fn remap<T: IdSpace>(&self, ids: Tensor) -> Result<TopK<T>> {
        TopK::new(ids, self.weights.clone(), self.weights_on_input)
    }
}

impl TopK<Logical> {
    /// The identity placement: slot `i` holds expert `i` (no EPLB, no replicas).
    pub fn into_identity_slots(self) -> TopK<Physical> {
        TopK { ids: self.ids, weights: self.weights, weights_on_input: self.weights_on_input, _space: PhantomData }
    }
}

/// One routing method's semantics on host f32 logits.
pub trait RoutingMethod: Send + Sync + fmt::Debug {
    /// Short name.
    fn name(&self) -> &'static str;

    /// Routes one token's `logits` (`[experts]`, finite) to `top_k` experts, writing `ids` and
    /// `weights` (`[top_k]`). `correction_bias` (`[experts]`) is given exactly when the method
    /// uses one.
    fn route_rows(
        &self,
        logits: &[f32],
        num_experts: usize,
        top_k: usize,
        correction_bias: Option<&[f32]>,
        ids: &mut [i32],
        weights: &mut [f32],
    );

    /// Whether the weights scale the expert input (Llama-4) rather than the output.
    fn weights_on_input(&self) -> bool {
        false
    }
}

/// The method for a routing config.
pub fn routing_method(cfg: &RoutingConfig) -> Box<dyn RoutingMethod> {
    match *cfg {
        RoutingConfig::SoftmaxTopk { renormalize } => Box::new(SoftmaxTopk { renormalize }),
        RoutingConfig::DeepseekV3 { n_group, topk_group, norm_topk_prob, routed_scaling_factor, group_mask } => {
            Box::new(DeepseekV3 { n_group, topk_group, norm_topk_prob, routed_scaling_factor, group_mask })
        }
        RoutingConfig::DeepseekV2 { method, norm_topk_prob, routed_scaling_factor } => {
            Box::new(DeepseekV2 { method, norm_topk_prob, routed_scaling_factor })
        }
        RoutingConfig::GptOss => Box::new(GptOss),
        RoutingConfig::Llama4 => Box::new(Llama4),
    }
}

/// What a [`ChunkRunner`] calls per chunk: `(chunk index, its ids, its weights)`.
pub type RouteChunk<'a> = dyn Fn(usize, &mut [i32], &mut [f32]) + Sync + 'a;

/// Runs the routing of row chunks in parallel: `f(c, ids, weights)` once for every chunk `c` of
/// `chunk` ids of `ids` and the same range of `weights` (the last chunk may be shorter), and
/// returns when all have run. A backend with its own worker threads passes itself, so routing
/// does not start a second pool next to its workers.
pub trait ChunkRunner: Sync {
    /// Calls `f` for every chunk.
    fn for_each_chunk(&self, ids: &mut [i32], weights: &mut [f32], chunk: usize, f: &RouteChunk<'_>);
}

/// [`ChunkRunner`] on rayon's current pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct RayonChunks;

impl ChunkRunner for RayonChunks {
    fn for_each_chunk(&self, ids: &mut [i32], weights: &mut [f32], chunk: usize, f: &RouteChunk<'_>) {
        use rayon::prelude::*;
        ids.par_chunks_mut(chunk).zip(weights.par_chunks_mut(chunk)).enumerate().for_each(|(c, (i, w))| f(c, i, w));
    }
}

/// Routes host f32 logits `[T, E]` with the config's method on the host (the reference path),
/// spreading rows over rayon's pool.
pub fn route_host(cfg: &MoeConfig, logits: &Tensor, correction_bias: Option<&[f32]>) -> Result<TopK<Logical>> {
    route_host_on(cfg, logits, correction_bias, &RayonChunks)
}

/// [`route_host`] with the rows' parallel chunks run by `runner`.
pub fn route_host_on(
    cfg: &MoeConfig,
    logits: &Tensor,
    correction_bias: Option<&[f32]>,
    runner: &dyn ChunkRunner,
) -> Result<TopK<Logical>> {
    let e = cfg.num_experts;
    let t = logits.dim(0)?;
    logits.expect_shape("route", &[t, e])?;
    let owned;
    let logits = match logits.as_f32() {
        Ok(v) => v,
        Err(_) => {
            owned = logits.to_f32_vec()?;
            &owned[..]
        }
    };
    if let Some(pos) = logits.iter().position(|x| !x.is_finite()) {
        return Err(MoeError::NonFinite {
            op: "route",
            detail: format!("router logit of token {} expert {} is {}", pos / e, pos % e, logits[pos]),
        });
    }
    let bias = match (cfg.routing.uses_correction_bias(), correction_bias) {
        (true, Some(b)) => {
            if b.len() != e {
                return Err(MoeError::shape("route", format!("correction bias [{e}]"), format!("[{}]", b.len())));
            }
            if let Some(i) = b.iter().position(|x| !x.is_finite()) {
                return Err(MoeError::NonFinite {
                    op: "route",
                    detail: format!("e_score_correction_bias[{i}] = {}", b[i]),
                });
            }
            Some(b)
        }
        (true, None) => {
            return Err(MoeError::config(
                "routing",
                "DeepSeek-V3 routing needs e_score_correction_bias in the router weights",
            ))
        }
        (false, _) => None,
    };
    let k = cfg.top_k;
    let method = routing_method(&cfg.routing);
    let mut ids = vec![0i32; t * k];
    let mut weights = vec![0f32; t * k];
    // Rows are independent: 64 a task (a 1024-token prefill routed on one thread took ~2.6 ms of
    // the forward on a 16-core host; a decode step stays on the caller's thread).
    const ROWS: usize = 64;
    let route = |c: usize, ids: &mut [i32], weights: &mut [f32]| {
        for (r, (ids, weights)) in ids.chunks_mut(k).zip(weights.chunks_mut(k)).enumerate() {
            let row = c * ROWS + r;
            method.route_rows(&logits[row * e..(row + 1) * e], e, k, bias, ids, weights);
        }
    };
    if k > 0 && t <= ROWS {
        route(0, &mut ids, &mut weights);
    } else if k > 0 {
        runner.for_each_chunk(&mut ids, &mut weights, ROWS * k, &route);
    }
    TopK::from_vecs(t, k, ids, weights, method.weights_on_input())
}

/// Indices of the `k` largest `scores`, largest first; ties go to the lower index. Writes
/// `min(k, scores.len(), out.len())` entries. No allocation: an insertion into the sorted prefix
/// of `out`, which for the small k of routing rejects most scores with one compare.
pub fn topk_indices(scores: &[f32], k: usize, out: &mut [i32]) {
    let k = k.min(scores.len()).min(out.len());
    if k == 0 {
        return;
    }
    // Whether score index `a` ranks before `b` (a total order: `total_cmp`, then the index).
    let before = |a: usize, b: usize| match scores[a].total_cmp(&scores[b]) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => a < b,
    };
    let mut n = 0;
    for i in 0..scores.len() {
        if n == k {
            if !before(i, out[k - 1] as usize) {
                continue;
            }
            n -= 1;
        }
        let mut j = n;
        while j > 0 && before(i, out[j - 1] as usize) {
            out[j] = out[j - 1];
            j -= 1;
        }
        out[j] = i as i32;
        n += 1;
    }
}

/// `f` on a scratch copy of `v`: on the stack up to 512 values (every routing config of
/// DESIGN.md), so routing a token allocates nothing.
pub(crate) fn with_scratch_copy<R>(v: &[f32], f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut stack = [0f32; 512];
    match stack.get_mut(..v.len()) {
        Some(s) => {
            s.copy_from_slice(v);
            f(s)
        }
        None => f(&mut v.to_vec()),
    }
}

/// In-place softmax (max-subtracted).
pub fn softmax_in_place(v: &mut [f32]) {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0;
    for x in v.iter_mut() {
        *x = (*x - m).exp();
        s += *x;
    }
    for x in v.iter_mut() {
        *x /= s;
    }
}

#[cfg(test)]
mod tests;
