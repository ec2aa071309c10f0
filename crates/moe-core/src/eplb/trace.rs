//! Routing traces (per-token logical expert ids) and the offline simulation of a placement on
//! them: what `moe eplb` and the balance tests run.
//!
//! Text format (one token per line): the token's `top_k` expert ids separated by spaces or commas.
//! Blank lines and lines starting with `#` are skipped, except an optional header
//! `# experts N` that fixes the number of experts (otherwise it is the largest id + 1).
//!
//! ```text
//! # experts 8
//! 3 5
//! 0,3
//! ```

use std::path::Path;

use rand::{Rng, SeedableRng};

use crate::error::{MoeError, Result};

use super::placement::{ExpertId, Placement};

/// Routed expert ids of `num_tokens` tokens, `top_k` each (flat, token-major).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTrace {
    num_experts: usize,
    top_k: usize,
    ids: Vec<u32>,
}

impl RoutingTrace {
    /// A trace over `num_experts` experts; `ids.len()` must be a multiple of `top_k`.
    pub fn new(num_experts: usize, top_k: usize, ids: Vec<u32>) -> Result<Self> {
        if top_k == 0 || !ids.len().is_multiple_of(top_k) {
            return Err(MoeError::shape(
                "RoutingTrace::new",
                format!("a multiple of top_k = {top_k} ids"),
                ids.len().to_string(),
            ));
        }
        if let Some(pos) = ids.iter().position(|&e| e as usize >= num_experts) {
            return Err(MoeError::shape(
                "RoutingTrace::new",
                format!("expert ids below {num_experts}"),
                format!("{} at token {}", ids[pos], pos / top_k),
            ));
        }
        Ok(RoutingTrace { num_experts, top_k, ids })
    }

    /// Parses the text format (see the module docs).
    pub fn parse_text(text: &str) -> Result<Self> {
        let mut experts: Option<usize> = None;
        let mut top_k: Option<usize> = None;
        let mut ids = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix('#') {
                if let Some(v) = rest.trim().strip_prefix("experts") {
                    let v = v.trim().parse::<usize>().map_err(|_| {
                        MoeError::config(
                            "trace",
                            format!("line {}: `# experts` needs a number, got `{}`", n + 1, v.trim()),
                        )
                    })?;
                    experts = Some(v);
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let row: Vec<u32> = line
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<u32>().map_err(|_| {
                        MoeError::config("trace", format!("line {}: `{s}` is not a non-negative expert id", n + 1))
                    })
                })
                .collect::<Result<_>>()?;
            match top_k {
                None => top_k = Some(row.len()),
                Some(k) if k != row.len() => {
                    return Err(MoeError::config(
                        "trace",
                        format!(
                            "line {} has {} expert ids; earlier lines have {k} (top_k must be constant)",
                            n + 1,
                            row.len()
                        ),
                    ))
                }
                _ => {}
            }
            ids.extend(row);
        }
        let k = top_k.ok_or_else(|| MoeError::config("trace", "the trace has no tokens"))?;
        let e = experts.unwrap_or_else(|| ids.iter().map(|&x| x as usize + 1).max().unwrap_or(1));
        Self::new(e, k, ids)
    }

    /// Reads a trace file in the text format.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| MoeError::Io { path: path.display().to_string(), source })?;
        Self::parse_text(&text)
    }

    /// The text format.
    pub fn to_text(&self) -> String {
        let mut s = format!("# experts {}\n", self.num_experts);
        for row in self.ids.chunks(self.top_k) {
            let v: Vec<String> = row.iter().map(|x| x.to_string()).collect();
            s.push_str(&v.join(" "));
            s.push('\n');
        }
        s
    }

    /// Experts.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Tokens.
    pub fn num_tokens(&self) -> usize {
        self.ids.len() / self.top_k
    }

    /// The ids, token-major.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The ids as i32 (the routing tensor's dtype).
    pub fn ids_i32(&self) -> Vec<i32> {
        self.ids.iter().map(|&x| x as i32).collect()
    }

    /// Tokens per expert.
    pub fn expert_counts(&self) -> Vec<u64> {
        let mut c = vec![0u64; self.num_experts];
        for &e in &self.ids {
            c[e as usize] += 1;
        }
        c
    }

    /// Routes every `(token, k)` through `placement` exactly as the balancer does (replica chosen
    /// by token index) and counts the assignments landing on each of `ranks` ranks.
    pub fn rank_loads(&self, placement: &Placement, ranks: usize) -> Result<Vec<u64>> {
        if placement.num_experts() != self.num_experts || ranks == 0 || !placement.num_slots().is_multiple_of(ranks) {
            return Err(MoeError::config(
                "eplb",
                format!(
                    "a trace over {} experts cannot run on a placement of {} experts / {} slots over {ranks} ranks",
                    self.num_experts,
                    placement.num_experts(),
                    placement.num_slots()
                ),
            ));
        }
        let per_rank = placement.num_slots() / ranks;
        let mut loads = vec![0u64; ranks];
        for (i, &e) in self.ids.iter().enumerate() {
            let slot = placement
                .slot_for(i / self.top_k, ExpertId(e as usize))
                .ok_or_else(|| MoeError::config("placement", format!("expert {e} has no slot")))?;
            loads[Placement::rank_of(slot, per_rank)] += 1;
        }
        Ok(loads)
    }
}

/// A skewed routing distribution: expert popularity follows Zipf (`weight ∝ 1 / rank^s`) over a
/// random order of the experts; each token draws `top_k` distinct experts in proportion to it.
#[derive(Debug, Clone)]
pub struct ZipfSkew {
    top_k: usize,
    weights: Vec<f64>,
}

impl ZipfSkew {
    /// Zipf exponent `s` over `num_experts` experts shuffled by `order_seed`.
    pub fn new(num_experts: usize, top_k: usize, s: f64, order_seed: u64) -> Result<Self> {
        if top_k == 0 || top_k > num_experts {
            return Err(MoeError::config("top_k", format!("top_k = {top_k} must be in 1..={num_experts}")));
        }
        if !(s.is_finite() && s >= 0.0) {
            return Err(MoeError::config("zipf", format!("the exponent must be finite and >= 0, got {s}")));
        }
        let mut order: Vec<usize> = (0..num_experts).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(order_seed);
        for i in (1..num_experts).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        let mut weights = vec![0.0; num_experts];
        for (rank, &e) in order.iter().enumerate() {
            weights[e] = 1.0 / ((rank + 1) as f64).powf(s);
        }
        Ok(ZipfSkew { top_k, weights })
    }

    /// Popularity weight of each expert.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// A trace of `tokens` tokens. Distinct experts per token are drawn without replacement in
    /// proportion to the weights (Efraimidis-Spirakis keys `u^(1/w)`, largest `top_k` win).
    pub fn sample(&self, tokens: usize, seed: u64) -> Result<RoutingTrace> {
        let (e, k) = (self.weights.len(), self.top_k);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut ids = Vec::with_capacity(tokens * k);
        let mut keys: Vec<(f64, usize)> = vec![(0.0, 0); e];
        for _ in 0..tokens {
            for (i, key) in keys.iter_mut().enumerate() {
                let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
                *key = (u.ln() / self.weights[i], i);
            }
            keys.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            ids.extend(keys[..k].iter().map(|&(_, i)| i as u32));
        }
        RoutingTrace::new(e, k, ids)
    }
}

/// Activations `[tokens, hidden]` (in `dtype`) whose routing follows `skew`: each token is random
/// noise (as [`crate::random_hidden`]) plus `strength` times the unit router row of one expert drawn
/// from the skew, so that expert's logit rises by about `strength` and it is almost always picked.
/// A skewed workload for the real router without changing the model.
pub fn skewed_hidden(
    router: &crate::weights::RouterWeights,
    skew: &ZipfSkew,
    tokens: usize,
    strength: f32,
    dtype: crate::DType,
    seed: u64,
) -> Result<crate::Tensor> {
    let e = skew.weights.len();
    let h = router.weight.dim(1)?;
    router.weight.expect_shape("skewed_hidden", &[e, h])?;
    let w = router.weight.to_f32_vec()?;
    let mut x = crate::random_hidden(tokens, h, crate::DType::F32, seed)?.to_f32_vec()?;
    let total: f64 = skew.weights.iter().sum();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED_0F5C_E7E7);
    for t in 0..tokens {
        let mut u = rng.gen_range(0.0..total);
        let p = skew.weights.iter().position(|&wt| {
            u -= wt;
            u < 0.0
        });
        let row = &w[p.unwrap_or(e - 1) * h..][..h];
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        for (xv, rv) in x[t * h..(t + 1) * h].iter_mut().zip(row) {
            *xv += strength * rv / norm;
        }
    }
    crate::Tensor::from_f32_as(vec![tokens, h], &x, dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let t = RoutingTrace::parse_text("# experts 6\n# a comment\n1 2\n\n3,5\n").unwrap();
        assert_eq!((t.num_experts(), t.top_k(), t.num_tokens()), (6, 2, 2));
        assert_eq!(t.ids(), &[1, 2, 3, 5]);
        assert_eq!(RoutingTrace::parse_text(&t.to_text()).unwrap(), t);
        assert!(RoutingTrace::parse_text("1 2\n3\n").is_err(), "ragged");
        assert!(RoutingTrace::parse_text("# experts 2\n1 2\n").is_err(), "id out of range");
        assert!(RoutingTrace::parse_text("1 x\n").is_err());
        assert!(RoutingTrace::parse_text("# nothing\n").is_err());
    }

    #[test]
    fn zipf_draws_distinct_skewed_experts() {
        let z = ZipfSkew::new(32, 4, 1.2, 7).unwrap();
        let t = z.sample(2000, 1).unwrap();
        for row in t.ids().chunks(4) {
            let mut r = row.to_vec();
            r.sort();
            r.dedup();
            assert_eq!(r.len(), 4, "distinct experts per token");
        }
        let c = t.expert_counts();
        let top = (0..32).max_by(|&a, &b| z.weights()[a].total_cmp(&z.weights()[b])).unwrap();
        assert_eq!(c[top], *c.iter().max().unwrap(), "the most popular expert is hit most");
        assert_eq!(t, z.sample(2000, 1).unwrap(), "deterministic per seed");
    }

    #[test]
    fn rank_loads_follow_replicas() {
        let t = RoutingTrace::new(2, 1, vec![0, 0, 0, 0, 1, 1]).unwrap();
        let p = Placement::new(2, [0, 1, 0, 0].map(ExpertId).to_vec()).unwrap();
        // Expert 0 on slots 0, 2, 3 (ranks 0, 1, 1); tokens 0..4 use slots 0, 2, 3, 0; expert 1 is on slot 0's rank.
        assert_eq!(t.rank_loads(&p, 2).unwrap(), vec![2 + 2, 2]);
    }
}
