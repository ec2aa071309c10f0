//! The router linear, `logits = x W^T (+ b)` in f32, computed with exactly the reference's
//! arithmetic (per expert: products added in input order, no fused multiply-add; see
//! [`crate::kernels::tile_exact_f32`]) so that top-k
//! selection never differs from `reference` on near-ties. Experts are the vector lanes (the
//! block layout of [`crate::pack`]), so the sequential order per expert still vectorizes.

use moe_core::tensor::HostData;
use moe_core::weights::RouterWeights;
use moe_core::{MoeError, Result, Tensor};

use crate::isa::Isa;
use crate::kernels::{tile_exact_f32, Tile, MR_MAX, MR_REG};
use crate::pack::{ColumnMap, PackedMats, WElem, NB};
use crate::pool::{self, Out};

/// The packed router and its biases.
#[derive(Debug)]
pub struct Router {
    w: PackedMats<f32>,
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
        let mut w = PackedMats::new(1, experts, hidden, ColumnMap::Plain, false);
        w.pack_one(0, &r.weight.to_f32_vec()?);
        Ok(Router {
            w,
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
        let (e, h) = (self.experts, self.hidden);
        if e == 0 || h == 0 {
            return;
        }
        let t = out.len() / e;
        let tiles = t.div_ceil(MR_REG);
        // Few token tiles (decode): split each tile's expert blocks over threads too. The sum per
        // expert must stay sequential over the inputs (exactness), so blocks are the only other
        // axis; at one token that is E / 32 tasks instead of one thread reading the whole router.
        let per_task = if tiles >= pool::threads() { self.w.blocks } else { 1 };
        let split = self.w.blocks.div_ceil(per_task);
        let dst = Out::new(out);
        pool::for_each(tiles * split, |i, _| {
            let (tile, b0) = (i / split, (i % split) * per_task);
            let t0 = tile * MR_REG;
            let m = MR_REG.min(t - t0);
            let xr: Vec<f32> = x[t0 * h..(t0 + m) * h].iter().map(|v| v.to_f32()).collect();
            let mut c: Tile = [[0.0; NB]; MR_MAX];
            for b in b0..(b0 + per_task).min(self.w.blocks) {
                tile_exact_f32(self.isa, &xr, h, m, self.w.block(0, b), h, &mut c);
                let n = NB.min(e - b * NB);
                for (r, c) in c.iter().enumerate().take(m) {
                    // SAFETY: item i alone writes columns of blocks b0 .. b0 + per_task of the
                    // tile's rows; items cover disjoint (row, block) ranges.
                    let o = unsafe { dst.slice((t0 + r) * e + b * NB, n) };
                    for ((o, c), j) in o.iter_mut().zip(&c[..n]).zip(b * NB..) {
                        *o = c + self.bias.as_ref().map_or(0.0, |bias| bias[j]);
                    }
                }
            }
        });
    }
}
