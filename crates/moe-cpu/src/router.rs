//! The router linear, `logits = x W^T (+ b)` in f32, computed with exactly the reference's
//! arithmetic (per expert: products added in input order, no fused multiply-add; see
//! [`crate::kernels::tile_exact`]) so that top-k selection never differs from `reference` on
//! near-ties. Experts are the vector lanes (blocks of [`ROUTER_LANES`]), so the sequential order
//! per expert still vectorizes. Decode steps read a copy in the checkpoint's 16-bit type where it
//! has one (bf16 and f16 widen to f32 exactly): half the bytes, the same sums.

use std::borrow::Cow;

use half::{bf16, f16};
use moe_core::tensor::HostData;
use moe_core::weights::RouterWeights;
use moe_core::{MoeError, Result, Tensor};

use crate::isa::Isa;
use crate::kernels::{router_blocks_per_call, tile_exact, ExactElem, RouterTile, MR_REG, ROUTER_LANES};
use crate::pack::WElem;
use crate::pool::{self, Out};

/// Router weights in the checkpoint's 16-bit type, for decode steps, where the bytes read set
/// the time (layout as [`blocks_of`]).
#[derive(Debug)]
enum Narrow {
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// Blocks of [`ROUTER_LANES`] experts: block `b` holds `w[b * 16 + l][kk]` at
/// `(b * hidden + kk) * 16 + l`, zero past the last expert.
fn blocks_of<W: WElem>(w: &[W], experts: usize, hidden: usize) -> Vec<W> {
    let nb = experts.div_ceil(ROUTER_LANES);
    let mut out = vec![W::default(); nb * hidden * ROUTER_LANES];
    for (j, row) in w.chunks_exact(hidden.max(1)).enumerate().take(experts) {
        let (b, l) = (j / ROUTER_LANES, j % ROUTER_LANES);
        for (kk, &v) in row.iter().enumerate() {
            out[(b * hidden + kk) * ROUTER_LANES + l] = v;
        }
    }
    out
}

/// The packed router and its biases.
#[derive(Debug)]
pub struct Router {
    /// f32 blocks: many tokens' tiles are bound by arithmetic, where widening 16-bit weights
    /// costs issue slots.
    wide: Vec<f32>,
    narrow: Option<Narrow>,
    bias: Option<Vec<f32>>,
    /// DeepSeek-V3 selection bias.
    pub correction_bias: Option<Vec<f32>>,
    experts: usize,
    hidden: usize,
    isa: Isa,
}

impl Router {
    /// Packs `r` (`weight [E, H]`).
    pub fn new(r: &RouterWeights, experts: usize, hidden: usize, isa: Isa) -> Result<Self> {
        r.weight.expect_shape("cpu.router", &[experts, hidden])?;
        let narrow = match r.weight.host() {
            Ok(HostData::BF16(v)) => Some(Narrow::Bf16(blocks_of(v, experts, hidden))),
            Ok(HostData::F16(v)) => Some(Narrow::F16(blocks_of(v, experts, hidden))),
            _ => None,
        };
        Ok(Router {
            wide: blocks_of(&r.weight.to_f32_vec()?, experts, hidden),
            narrow,
            bias: r.bias.as_ref().map(|b| b.to_f32_vec()).transpose()?,
            correction_bias: r.correction_bias.as_ref().map(|b| b.to_f32_vec()).transpose()?,
            experts,
            hidden,
            isa,
        })
    }

    /// Logits `[T, E]` for `hidden [T, H]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (e, h) = (self.experts, self.hidden);
        let t = hidden.dim(0)?;
        hidden.expect_shape("cpu.router_logits", &[t, h])?;
        let mut out = vec![0.0f32; t * e];
        let host = hidden.host()?;
        match host {
            HostData::F32(x) => self.rows(x, &mut out),
            HostData::BF16(x) => self.rows(x, &mut out),
            HostData::F16(x) => self.rows(x, &mut out),
            other => {
                return Err(MoeError::DType {
                    op: "cpu.router_logits",
                    expected: "f32, bf16 or f16 hidden states".into(),
                    got: other.dtype().to_string(),
                })
            }
        }
        Tensor::from_f32(vec![t, e], out)
    }

    fn rows<S: WElem>(&self, x: &[S], out: &mut [f32]) {
        let tiles = (out.len() / self.experts.max(1)).div_ceil(MR_REG);
        match &self.narrow {
            Some(Narrow::Bf16(w)) if tiles < pool::threads() => self.rows_with(x, w, out),
            Some(Narrow::F16(w)) if tiles < pool::threads() => self.rows_with(x, w, out),
            _ => self.rows_with(x, &self.wide, out),
        }
    }

    fn rows_with<S: WElem, W: ExactElem>(&self, x: &[S], w: &[W], out: &mut [f32]) {
        let (e, h) = (self.experts, self.hidden);
        let t = out.len() / e.max(1);
        if t == 0 || e == 0 || h == 0 {
            return;
        }
        let blocks = e.div_ceil(ROUTER_LANES);
        let tiles = t.div_ceil(MR_REG);
        // Few token tiles (decode): split each tile's expert blocks over threads too. The sum per
        // expert must stay sequential over the inputs (exactness), so blocks are the only other
        // axis: at one token the blocks spread over up to every thread.
        let threads = pool::threads();
        let split = if tiles >= threads { 1 } else { (threads / tiles).clamp(1, blocks) };
        let per_task = blocks.div_ceil(split);
        let split = blocks.div_ceil(per_task);
        let dst = Out::new(out);
        pool::for_each(tiles * split, |i, _| {
            let (tile, b0) = (i / split, (i % split) * per_task);
            let b_end = (b0 + per_task).min(blocks);
            let t0 = tile * MR_REG;
            let m = MR_REG.min(t - t0);
            let rows = &x[t0 * h..(t0 + m) * h];
            let xr: Cow<'_, [f32]> = match S::as_f32(rows) {
                Some(f) => Cow::Borrowed(f),
                None => Cow::Owned(rows.iter().map(|v| v.to_f32()).collect()),
            };
            let mut c: RouterTile = [[0.0; ROUTER_LANES]; 2 * MR_REG];
            for b in (b0..b_end).step_by(router_blocks_per_call(m)) {
                let nblk = router_blocks_per_call(m).min(b_end - b);
                tile_exact(self.isa, &xr, h, m, &w[b * h * ROUTER_LANES..], nblk, h, &mut c);
                for j in 0..nblk {
                    let col = (b + j) * ROUTER_LANES;
                    let n = ROUTER_LANES.min(e - col);
                    for r in 0..m {
                        // SAFETY: item i alone writes columns of blocks b0 .. b_end of the
                        // tile's rows; items cover disjoint (row, block) ranges.
                        let o = unsafe { dst.slice((t0 + r) * e + col, n) };
                        for ((o, c), jj) in o.iter_mut().zip(&c[r * nblk + j][..n]).zip(col..) {
                            *o = c + self.bias.as_ref().map_or(0.0, |bias| bias[jj]);
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_core::DType;

    /// Every path (decode split over blocks, 16-bit copy, many-token tiles, tails of experts and
    /// rows) gives the reference's bits: products widened to f32, added in input order.
    #[test]
    fn logits_are_bit_identical_to_a_sequential_sum() {
        let (e, h) = (40, 67);
        let w: Vec<f32> = (0..e * h).map(|i| ((i * 7919 % 997) as f32).sin() * 0.1).collect();
        let bias: Vec<f32> = (0..e).map(|j| j as f32 * 0.01 - 0.2).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let weight = Tensor::from_f32_as(vec![e, h], &w, dtype).expect("weight");
            let wq = weight.to_f32_vec().expect("weight values");
            let rw = RouterWeights {
                weight,
                bias: Some(Tensor::from_f32(vec![e], bias.clone()).expect("bias")),
                correction_bias: None,
            };
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                let router = Router::new(&rw, e, h, isa).expect("router");
                for threads in [1, 4] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
                    for t in [0, 1, 3, 9, 17, 40] {
                        let x: Vec<f32> = (0..t * h).map(|i| ((i * 31 % 101) as f32).cos()).collect();
                        let xt = Tensor::from_f32_as(vec![t, h], &x, DType::BF16).expect("hidden");
                        let xq = xt.to_f32_vec().expect("hidden values");
                        let got = pool.install(|| router.logits(&xt)).expect("logits").to_f32_vec().expect("f32");
                        for r in 0..t {
                            for j in 0..e {
                                let dot = (0..h).fold(-0.0f32, |s, kk| s + wq[j * h + kk] * xq[r * h + kk]);
                                let want = dot + bias[j];
                                assert_eq!(
                                    got[r * e + j].to_bits(),
                                    want.to_bits(),
                                    "{dtype} {isa:?} threads={threads} t={t} r={r} j={j}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
