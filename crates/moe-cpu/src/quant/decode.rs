//! Decode-sized forwards of int4 and int8 experts on AVX-512 VNNI (int8 activations in 128-input
//! groups, [`super::mats::VnniRows`]): every expert holds at most
//! [`super::INT4_REG_ROWS`] rows, so the forward is a stream over the hit experts' packed weights
//! and its cost beside that stream is the number of parallel steps. Two steps instead of six:
//!
//! 1. gate_up: a task takes one expert and one 128-wide group of the intermediate, computes the
//!    group's gate and up rows for the expert's tokens (activations quantized once per token,
//!    before the step), applies the activation and quantizes the group straight into the down
//!    projection's int8 input. No gather, no reordering pass, no separate activation step.
//! 2. down: a task takes a range of output columns over every hit expert and adds each
//!    weighted result into the token's output, which is the combine (tasks own disjoint
//!    columns, so no two write one element). No transposed buffer, no combine step.
//!
//! int4: the same arithmetic as the register path of [`super::task`] (`simd::int4_dot_vnni`), so
//! the results match it up to the order in which the experts' contributions are added. int8
//! (`simd::int8_dot_rows_vnni`) has no register path of its own: elsewhere its rows are
//! widened to bf16 (`simd::int8_dot_bf16_rows`, the tiles).
//!
//! The switches keep their int4 names (`MOE_CPU_INT4_ACT`, `MOE_CPU_QUANT_DECODE`): they
//! choose the activation bytes and the path for both code forms.

use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use moe_core::tensor::HostData;
use moe_core::{MoeError, Result};

use super::mats::{VnniCodes, VnniRows};
use super::{grow, scratch, simd, QuantExperts, INT4_REG_ROWS};
use crate::layout::RowLayout;
use crate::pack::WElem;
use crate::pool::{self, Out};

/// Weight rows one dot call takes (both steps): independent chains for the vector ports.
const ROWS: usize = 4;

/// `ROWS` consecutive rows' dots, four at a time or (`one_row`, a measurement switch) one by one;
/// the same bits either way.
///
/// # Safety
/// As [`VnniRows::dot`] for `ROWS` rows.
#[inline(always)]
unsafe fn dot_rows(one_row: bool, split: bool, rows: VnniRows, xq: &[i8], unit: &[f32], xsum: &[f32]) -> [f32; ROWS] {
    // SAFETY: forwarded contract; `row(i)` is row i of the same stack.
    unsafe {
        if !one_row {
            return rows.dot::<ROWS>(split, xq, unit, xsum);
        }
        std::array::from_fn(|i| rows.row(i, unit.len()).dot::<1>(split, xq, unit, xsum)[0])
    }
}

/// Reused buffers of the decode path.
#[derive(Debug, Default)]
pub(super) struct DecodeBufs {
    /// Per token: int8 groups of the hidden state, their units and sums.
    xq: Vec<i8>,
    xu: Vec<f32>,
    xs: Vec<f32>,
    /// Per layout row: int8 groups of the activated intermediate, units and sums.
    mq: Vec<i8>,
    mu: Vec<f32>,
    ms: Vec<f32>,
    /// Per layout row and intermediate group: gate then up outputs `[2][128]`, and per
    /// (expert, group) how many of its sub-tasks have written theirs.
    gu: Vec<f32>,
    done: Vec<AtomicUsize>,
}

/// Where [`quantize_tokens`] writes: per token, `groups` int8 groups of `per` bytes, their
/// units and sums.
#[derive(Clone, Copy)]
struct TokenGroups {
    q: Out<i8>,
    unit: Out<f32>,
    sum: Out<f32>,
    per: usize,
    groups: usize,
}

/// Every token row of `x` (`[tokens, h]`) as int8 groups (`simd::quantize_i8_groups`), in the
/// input order of `codes`.
fn quantize_tokens<S: WElem>(x: &[S], h: usize, tokens: usize, split: bool, codes: VnniCodes, dst: TokenGroups) {
    let (per, g) = (dst.per, dst.groups);
    pool::for_each(tokens, |t, _| {
        scratch::with(|sc| {
            grow(&mut sc.row, 2 * h);
            let (natural, row) = sc.row.split_at_mut(h);
            natural.iter_mut().zip(&x[t * h..(t + 1) * h]).for_each(|(d, v)| *d = v.to_f32());
            codes.order_input(|j| natural[j], &mut row[..h]);
            // SAFETY: token t alone writes its ranges; the caller (`vnni_decode` held) has
            // AVX-512F/BW.
            unsafe {
                let (q, u, s) = (dst.q.slice(t * g * per, g * per), dst.unit.slice(t * g, g), dst.sum.slice(t * g, g));
                simd::quantize_i8_groups(split, row, q, u, s)
            }
        })
    });
}

impl QuantExperts {
    /// Whether this forward takes the decode path: int4 experts without an act-order
    /// permutation or int8 experts with whole 128-input groups ([`super::mats::QMat::vnni_codes`]),
    /// int8 activations on VNNI, routing weights on the output, every expert at most
    /// [`INT4_REG_ROWS`] rows. `Some(split)`: the activation mode of [`crate::tuning::int4_act`].
    pub(super) fn vnni_decode(&self, layout: &RowLayout, weights_on_input: bool) -> Option<bool> {
        let mode = crate::tuning::int4_act();
        let codes = self.w13.vnni_codes();
        let ok = crate::tuning::quant_decode()
            && self.vnni
            && mode != 0
            && !weights_on_input
            && codes.is_some()
            && codes == self.w2.vnni_codes()
            && layout.groups.iter().all(|g| g.rows <= INT4_REG_ROWS);
        ok.then_some(mode == 2)
    }

    /// The decode path (see the module docs); overwrites `out` `[T, H]` (the caller may pass a
    /// reused buffer).
    pub(super) fn run_vnni_decode(
        &mut self,
        x: &HostData,
        layout: &RowLayout,
        k: usize,
        weights: &[f32],
        out: &mut [f32],
        split: bool,
    ) -> Result<()> {
        let (h, inter) = (self.hidden, self.inter);
        let tokens = out.len() / h.max(1);
        // Both stacks take the same codes (checked by `vnni_decode`).
        let codes =
            self.w13.vnni_codes().ok_or_else(|| MoeError::quant("cpu", "the decode path needs int4 or int8 codes"))?;
        let per = simd::i8_group_bytes(split);
        let (gh, gi) = (h / 128, inter / 128);
        let rows = layout.rows();
        let b = &mut self.decode;
        grow(&mut b.xq, tokens * gh * per);
        grow(&mut b.xu, tokens * gh);
        grow(&mut b.xs, tokens * gh);
        grow(&mut b.mq, rows * gi * per);
        grow(&mut b.mu, rows * gi);
        grow(&mut b.ms, rows * gi);
        let dst = TokenGroups {
            q: Out::new(&mut b.xq),
            unit: Out::new(&mut b.xu),
            sum: Out::new(&mut b.xs),
            per,
            groups: gh,
        };
        // Each token's hidden state, once (every expert of a token reads the same bytes).
        match x {
            HostData::F32(v) => quantize_tokens(v, h, tokens, split, codes, dst),
            HostData::BF16(v) => quantize_tokens::<bf16>(v, h, tokens, split, codes, dst),
            HostData::F16(v) => quantize_tokens::<f16>(v, h, tokens, split, codes, dst),
            other => {
                return Err(MoeError::DType {
                    op: "cpu.run_moe",
                    expected: "f32, bf16 or f16 activations".into(),
                    got: other.dtype().to_string(),
                })
            }
        }
        let (xq, xu, xs) = (&b.xq[..], &b.xu[..], &b.xs[..]);
        let (mq, mu, ms) = (Out::new(&mut b.mq), Out::new(&mut b.mu), Out::new(&mut b.ms));
        let (w13, w2, act) = (&self.w13, &self.w2, self.act);
        let (b13, b2) = (self.b13.as_deref(), self.b2.as_deref());
        let groups = &layout.groups;
        let token = |r: usize| layout.src[r] as usize / k;
        let ahead = 128 * crate::tuning::gemv_prefetch();
        let one_row = crate::tuning::int4_dot_rows() == 1;
        let _gate_up = tracing::debug_span!("cpu.q.gate_up").entered();
        // A task: `128 / subs` intermediate columns of one group of one expert (gate and up rows).
        // The task that completes a group applies the activation and quantizes it: the int8
        // groups need all 128 values, and finer tasks even out the threads (one late task
        // holds up the step).
        let subs = crate::tuning::quant_decode_splits();
        let jn = 128 / subs;
        let pending = groups.len() * gi;
        if b.done.len() < pending {
            b.done.resize_with(pending, || AtomicUsize::new(0));
        }
        b.done[..pending].iter().for_each(|d| d.store(0, Ordering::Relaxed));
        grow(&mut b.gu, rows * gi * 256);
        let (gu, done) = (Out::new(&mut b.gu), &b.done[..pending]);
        pool::for_each(pending * subs, |task, _| {
            let (gg, sub) = (task / subs, task % subs);
            let (g, grp) = (groups[gg / gi], gg % gi);
            let j0 = sub * jn;
            // The task's rows in order: its gate rows, then its up rows.
            let row_at = |i: usize| if i < jn { 128 * grp + j0 + i } else { inter + 128 * grp + j0 + i - jn };
            let d13 = ahead.div_ceil(h / 2).max(1);
            for (half, row0) in [(0, 0), (1, inter)] {
                // Four weight rows at a time (`jn` is a multiple of 4).
                for j in (j0..j0 + jn).step_by(ROWS) {
                    let c = row0 + 128 * grp + j;
                    let w = w13.vnni_rows(g.expert, c, ROWS).expect("vnni stack");
                    // Prefetch along the task's order (the up rows lie elsewhere), so the jump
                    // from gate to up rows does not restart the stream cold.
                    for i in 0..ROWS {
                        let next = (jn * half + j + i - j0 + d13).min(2 * jn - 1);
                        if let Some(next) = w13.vnni_rows(g.expert, row_at(next), 1) {
                            super::prefetch_l1(next.bytes().as_ptr(), next.bytes().len());
                        }
                    }
                    for r in 0..g.rows {
                        let t = token(g.row0 + r);
                        let (q, u, xsum) = (
                            &xq[t * gh * per..(t + 1) * gh * per],
                            &xu[t * gh..(t + 1) * gh],
                            &xs[t * gh..(t + 1) * gh],
                        );
                        // SAFETY: `vnni` (AVX-512 VNNI detected); ROWS full rows of `gh` groups.
                        let y = unsafe { dot_rows(one_row, split, w, q, u, xsum) };
                        // SAFETY: (row, group, half, j .. j + ROWS) belongs to this task alone.
                        let dst = unsafe { gu.slice((((g.row0 + r) * gi + grp) * 2 + half) * 128 + j, ROWS) };
                        for (i, (d, y)) in dst.iter_mut().zip(y).enumerate() {
                            *d = y + b13.map_or(0.0, |b| b[g.expert * 2 * inter + c + i]);
                        }
                    }
                }
            }
            // The release orders this task's writes before the count; the acquire of the task
            // that completes the group makes every sub-task's writes visible to it.
            if done[gg].fetch_add(1, Ordering::AcqRel) + 1 != subs {
                return;
            }
            for r in 0..g.rows {
                let row = g.row0 + r;
                // SAFETY: every sub-task of this group has finished writing (counted above);
                // only this task touches the group's values now.
                let v = unsafe { gu.slice((row * gi + grp) * 256, 256) };
                let mut y = [0.0f32; 128];
                for l0 in (0..128).step_by(16) {
                    let lanes = |a: &[f32]| -> [f32; 16] { std::array::from_fn(|l| a[l0 + l]) };
                    let mut o = [0.0f32; 16];
                    crate::act::apply16(act, &lanes(&v[..128]), &lanes(&v[128..]), &mut o);
                    y[l0..l0 + 16].copy_from_slice(&o);
                }
                let mut p = [0.0f32; 128];
                codes.order_input(|j| y[j], &mut p);
                // SAFETY: (row, group) is this task's alone; `vnni` implies AVX-512F/BW.
                unsafe {
                    let at = (row * gi + grp) * per;
                    let (q, u, s) = (mq.slice(at, per), mu.slice(row * gi + grp, 1), ms.slice(row * gi + grp, 1));
                    simd::quantize_i8_groups(split, &p, q, u, s)
                }
            }
        });
        drop(_gate_up);
        let (mq, mu, ms) = (&b.mq[..], &b.mu[..], &b.ms[..]);
        let _down = tracing::debug_span!("cpu.q.down").entered();
        // Columns a task: about 8 tasks a thread, whole 16-column runs.
        let cols = (h / (8 * pool::threads())).clamp(16, h.max(16)).next_multiple_of(16);
        let dst = Out::new(out);
        pool::for_each(h.div_ceil(cols), |task, _| {
            let (c0, c1) = (task * cols, ((task + 1) * cols).min(h));
            for t in 0..tokens {
                // SAFETY: columns c0 .. c1 of every token belong to this task alone.
                unsafe { dst.slice(t * h + c0, c1 - c0) }.fill(0.0);
            }
            let d2 = ahead.div_ceil(inter / 2).max(1);
            for (gn, g) in groups.iter().enumerate() {
                // Four columns at a time (`cols` and `h` are multiples of 16).
                for c in (c0..c1).step_by(ROWS) {
                    let w = w2.vnni_rows(g.expert, c, ROWS).expect("vnni stack");
                    // Prefetch along the task's order: past its last column, the next expert's
                    // first ones (each expert's run of columns is a short separate stream).
                    for c in c..c + ROWS {
                        let (pe, pc) = if c + d2 < c1 {
                            (Some(g.expert), c + d2)
                        } else {
                            (groups.get(gn + 1).map(|g| g.expert), (c0 + c + d2 - c1).min(c1 - 1))
                        };
                        if let Some(next) = pe.and_then(|e| w2.vnni_rows(e, pc, 1)) {
                            super::prefetch_l1(next.bytes().as_ptr(), next.bytes().len());
                        }
                    }
                    for r in g.row0..g.row0 + g.rows {
                        let (q, u, msum) = (
                            &mq[r * gi * per..(r + 1) * gi * per],
                            &mu[r * gi..(r + 1) * gi],
                            &ms[r * gi..(r + 1) * gi],
                        );
                        // SAFETY: `vnni`; ROWS full rows of `gi` groups.
                        let y = unsafe { dot_rows(one_row, split, w, q, u, msum) };
                        // SAFETY: columns c .. c + ROWS of the row's token belong to this task alone.
                        let o = unsafe { dst.slice(token(r) * h + c, ROWS) };
                        let wt = weights[layout.src[r] as usize];
                        for (i, (o, y)) in o.iter_mut().zip(y).enumerate() {
                            *o += wt * (y + b2.map_or(0.0, |b| b[g.expert * h + c + i]));
                        }
                    }
                }
            }
        });
        Ok(())
    }
}
