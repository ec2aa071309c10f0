//! Per-forward row bookkeeping on the host: which (token, k) pairs go to which local expert, the
//! gather of activations into expert-sorted rows (converted to the kernels' element type), and
//! the weighted combine back to tokens. All buffers are reused across forwards.

use half::{bf16, f16};
use moe_core::backend::SlotRange;
use moe_core::tensor::HostData;
use moe_core::{MoeError, Result};

use crate::engine::Group;
use crate::kernels::AElem;
use crate::pack::WElem;
use crate::pool;

/// Marks a (token, k) pair whose slot lives on another rank.
const REMOTE: u32 = u32::MAX;

/// Rows sorted by local expert, in (token, k) order within an expert.
#[derive(Debug, Default)]
pub struct RowLayout {
    counts: Vec<usize>,
    fill: Vec<usize>,
    /// Non-empty experts and their row ranges.
    pub groups: Vec<Group>,
    /// `[T * k]`: the row of each (token, k) pair, or `REMOTE`.
    pub pos: Vec<u32>,
    /// `[rows]`: the flat (token * k + k) index of each row.
    pub src: Vec<u32>,
}

impl RowLayout {
    /// Builds the layout of `ids` (`[T, k]` slot ids) for the local `slots`.
    pub fn build(&mut self, ids: &[i32], slots: SlotRange) -> Result<()> {
        if ids.len() > u32::MAX as usize - 1 {
            return Err(MoeError::shape("cpu.run_moe", "fewer than 2^32 (token, k) pairs", ids.len().to_string()));
        }
        self.counts.clear();
        self.counts.resize(slots.count, 0);
        for &id in ids {
            if id < 0 || id as usize >= slots.total {
                return Err(MoeError::shape("cpu.run_moe", format!("slot ids in 0..{}", slots.total), id.to_string()));
            }
            if let Some(l) = slots.local(id) {
                self.counts[l] += 1;
            }
        }
        self.groups.clear();
        self.fill.clear();
        let mut acc = 0;
        for (e, &c) in self.counts.iter().enumerate() {
            self.fill.push(acc);
            if c > 0 {
                self.groups.push(Group { expert: e, row0: acc, rows: c });
            }
            acc += c;
        }
        self.pos.clear();
        self.pos.resize(ids.len(), REMOTE);
        self.src.clear();
        self.src.resize(acc, 0);
        for (i, &id) in ids.iter().enumerate() {
            if let Some(l) = slots.local(id) {
                let r = self.fill[l];
                self.fill[l] += 1;
                self.pos[i] = r as u32;
                self.src[r] = i as u32;
            }
        }
        Ok(())
    }

    /// Rows in the layout.
    pub fn rows(&self) -> usize {
        self.src.len()
    }

    /// `out[t] = sum_k w[t, k] * y[pos[t, k]]` over local pairs (`w = 1` when weights scale inputs).
    pub fn combine(&self, y: &[f32], h: usize, k: usize, weights: Option<&[f32]>, out: &mut [f32]) {
        if h == 0 {
            return;
        }
        pool::each_row(out, h, out.len() / h, |t, o| {
            o.fill(0.0);
            for kk in 0..k {
                let r = self.pos[t * k + kk];
                if r == REMOTE {
                    continue;
                }
                let w = weights.map_or(1.0, |w| w[t * k + kk]);
                let row = &y[r as usize * h..(r as usize + 1) * h];
                for (o, &v) in o.iter_mut().zip(row) {
                    *o += w * v;
                }
            }
        });
    }
}

/// Converts rows of `x` (`[T, h]`) into `dst` (`[rows, kp]`, padding zero): row `r` is token
/// `rows_src(r)`, scaled by `scale(r)` when given.
pub fn gather_rows<A: AElem>(
    x: &HostData,
    h: usize,
    kp: usize,
    rows: usize,
    row_token: &(dyn Fn(usize) -> usize + Sync),
    scale: Option<&(dyn Fn(usize) -> f32 + Sync)>,
    dst: &mut [A],
) -> Result<()> {
    fn go<S: WElem, A: AElem>(
        x: &[S],
        h: usize,
        kp: usize,
        row_token: &(dyn Fn(usize) -> usize + Sync),
        scale: Option<&(dyn Fn(usize) -> f32 + Sync)>,
        dst: &mut [A],
    ) {
        let same_type = std::any::TypeId::of::<S>() == std::any::TypeId::of::<A>();
        let row = |r: usize, d: &mut [A]| {
            let t = row_token(r);
            let s = &x[t * h..(t + 1) * h];
            match scale {
                None if same_type => {
                    // SAFETY: `S` and `A` are the same type (equal `TypeId`s), so the slice is
                    // reinterpreted as itself: same length, layout and alignment.
                    let s: &[A] = unsafe { std::slice::from_raw_parts(s.as_ptr() as *const A, s.len()) };
                    d[..h].copy_from_slice(s);
                }
                Some(f) => {
                    let w = f(r);
                    for (d, &v) in d.iter_mut().zip(s) {
                        *d = A::from_f32(v.to_f32() * w);
                    }
                }
                None => {
                    for (d, &v) in d.iter_mut().zip(s) {
                        *d = A::from_f32(v.to_f32());
                    }
                }
            }
            d[h..].fill(A::default());
        };
        let rows = dst.len() / kp;
        pool::each_row(dst, kp, rows, row);
    }
    if kp == 0 {
        return Ok(());
    }
    let dst = &mut dst[..rows * kp];
    match x {
        HostData::F32(v) => go::<f32, A>(v, h, kp, row_token, scale, dst),
        HostData::BF16(v) => go::<bf16, A>(v, h, kp, row_token, scale, dst),
        HostData::F16(v) => go::<f16, A>(v, h, kp, row_token, scale, dst),
        other => {
            return Err(MoeError::DType {
                op: "cpu.run_moe",
                expected: "f32, bf16 or f16 activations".into(),
                got: other.dtype().to_string(),
            })
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sorts_by_expert_and_skips_remote_slots() {
        let mut l = RowLayout::default();
        // 3 tokens, k = 2, local slots 2..4 of 4
        l.build(&[0, 3, 2, 3, 1, 0], SlotRange { start: 2, count: 2, total: 4 }).unwrap();
        assert_eq!(l.groups, vec![Group { expert: 0, row0: 0, rows: 1 }, Group { expert: 1, row0: 1, rows: 2 }]);
        assert_eq!(l.src, vec![2, 1, 3]);
        assert_eq!(l.pos, vec![REMOTE, 1, 0, 2, REMOTE, REMOTE]);
        assert!(l.build(&[0, 4], SlotRange { start: 0, count: 4, total: 4 }).is_err());
        assert!(l.build(&[-1, 0], SlotRange { start: 0, count: 4, total: 4 }).is_err());
    }
}
