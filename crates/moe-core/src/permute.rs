//! Token <-> expert layouts (host reference implementations; devices have their own kernels).
//!
//! - **contiguous**: rows sorted by local expert, each expert's block padded to `alignment` rows,
//!   with a `row -> (token, k)` map (`None` for padding). Large token counts.
//! - **masked**: `[local_experts, max_m, hidden]`, expert `e` uses its first `counts[e]` rows.
//!   Fixed shapes for small token counts (graph-capturable on GPUs).
//!
//! Both use only the `(t, k)` pairs whose slot is local ([`SlotRange`]); the rest are skipped.
//! Within an expert, rows are in `(token, k)` order, so layouts are deterministic.

use crate::backend::SlotRange;
use crate::error::{MoeError, Result};

/// Where one permuted row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSource {
    /// Token index.
    pub token: u32,
    /// Which of the token's k choices.
    pub k: u32,
}

/// Tokens per local expert.
pub fn expert_counts(ids: &[i32], slots: SlotRange) -> Vec<usize> {
    let mut counts = vec![0usize; slots.count];
    for &id in ids {
        if let Some(l) = slots.local(id) {
            counts[l] += 1;
        }
    }
    counts
}

/// Exclusive prefix sums of `counts`, each rounded up to `alignment` (length `counts.len() + 1`).
pub fn aligned_offsets(counts: &[usize], alignment: usize) -> Vec<usize> {
    let a = alignment.max(1);
    let mut off = Vec::with_capacity(counts.len() + 1);
    let mut acc = 0;
    off.push(0);
    for &c in counts {
        acc += c.div_ceil(a) * a;
        off.push(acc);
    }
    off
}

/// The aligned contiguous layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContiguousLayout {
    /// Rows of each block are padded to a multiple of this.
    pub alignment: usize,
    /// Real rows per local expert.
    pub counts: Vec<usize>,
    /// Block start per local expert, plus the total row count at the end.
    pub offsets: Vec<usize>,
    /// Source of every row; `None` for padding.
    pub rows: Vec<Option<RowSource>>,
}

impl ContiguousLayout {
    /// Builds the layout for `ids` (`[T, k]`, row-major).
    pub fn new(ids: &[i32], k: usize, slots: SlotRange, alignment: usize) -> Result<Self> {
        if alignment == 0 {
            return Err(MoeError::config("alignment", "must be at least 1"));
        }
        check_ids(ids, k, slots)?;
        let counts = expert_counts(ids, slots);
        let offsets = aligned_offsets(&counts, alignment);
        let mut rows = vec![None; *offsets.last().unwrap_or(&0)];
        let mut fill = offsets[..counts.len()].to_vec();
        for (i, &id) in ids.iter().enumerate() {
            if let Some(l) = slots.local(id) {
                rows[fill[l]] = Some(RowSource { token: (i / k) as u32, k: (i % k) as u32 });
                fill[l] += 1;
            }
        }
        Ok(ContiguousLayout { alignment, counts, offsets, rows })
    }

    /// Total rows including padding.
    pub fn total_rows(&self) -> usize {
        self.rows.len()
    }

    /// Gathers `src` rows (`[T, width]`) into the layout (`[total_rows, width]`); padding rows zero.
    pub fn permute<T: Copy + Default>(&self, src: &[T], width: usize) -> Vec<T> {
        let mut out = vec![T::default(); self.rows.len() * width];
        for (r, s) in self.rows.iter().enumerate() {
            if let Some(s) = s {
                let t = s.token as usize;
                out[r * width..(r + 1) * width].copy_from_slice(&src[t * width..(t + 1) * width]);
            }
        }
        out
    }

    /// `out[t] += w[t, k] * rows[r]` for every real row: the weighted unpermute-reduce (fp32).
    pub fn unpermute_reduce(&self, expert_out: &[f32], width: usize, weights: &[f32], k: usize, out: &mut [f32]) {
        for (r, s) in self.rows.iter().enumerate() {
            if let Some(s) = s {
                let t = s.token as usize;
                let w = weights[t * k + s.k as usize];
                let dst = &mut out[t * width..(t + 1) * width];
                for (d, &y) in dst.iter_mut().zip(&expert_out[r * width..(r + 1) * width]) {
                    *d += w * y;
                }
            }
        }
    }
}

/// The masked layout: `[local_experts, max_m]` row slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedLayout {
    /// Rows reserved per expert.
    pub max_m: usize,
    /// Real rows per local expert (`<= max_m`).
    pub counts: Vec<usize>,
    /// `[experts * max_m]` sources; `None` past each expert's count.
    pub rows: Vec<Option<RowSource>>,
}

impl MaskedLayout {
    /// Builds the layout; `max_m` must hold the busiest expert (an error says how many it needs).
    pub fn new(ids: &[i32], k: usize, slots: SlotRange, max_m: usize) -> Result<Self> {
        check_ids(ids, k, slots)?;
        let counts = expert_counts(ids, slots);
        if let Some((e, &c)) = counts.iter().enumerate().find(|(_, &c)| c > max_m) {
            return Err(MoeError::shape(
                "MaskedLayout::new",
                format!("at most max_m = {max_m} tokens per expert"),
                format!("local expert {e} has {c}"),
            ));
        }
        let mut rows = vec![None; slots.count * max_m];
        let mut fill = vec![0usize; slots.count];
        for (i, &id) in ids.iter().enumerate() {
            if let Some(l) = slots.local(id) {
                rows[l * max_m + fill[l]] = Some(RowSource { token: (i / k) as u32, k: (i % k) as u32 });
                fill[l] += 1;
            }
        }
        Ok(MaskedLayout { max_m, counts, rows })
    }

    /// Gathers `src` (`[T, width]`) into `[experts, max_m, width]`; unused rows zero.
    pub fn permute<T: Copy + Default>(&self, src: &[T], width: usize) -> Vec<T> {
        let mut out = vec![T::default(); self.rows.len() * width];
        for (r, s) in self.rows.iter().enumerate() {
            if let Some(s) = s {
                let t = s.token as usize;
                out[r * width..(r + 1) * width].copy_from_slice(&src[t * width..(t + 1) * width]);
            }
        }
        out
    }

    /// Weighted unpermute-reduce from `[experts, max_m, width]` into `out [T, width]`.
    pub fn unpermute_reduce(&self, expert_out: &[f32], width: usize, weights: &[f32], k: usize, out: &mut [f32]) {
        for (r, s) in self.rows.iter().enumerate() {
            if let Some(s) = s {
                let t = s.token as usize;
                let w = weights[t * k + s.k as usize];
                for (d, &y) in out[t * width..(t + 1) * width].iter_mut().zip(&expert_out[r * width..(r + 1) * width]) {
                    *d += w * y;
                }
            }
        }
    }
}

fn check_ids(ids: &[i32], k: usize, slots: SlotRange) -> Result<()> {
    if k == 0 || !ids.len().is_multiple_of(k) {
        return Err(MoeError::shape("permute", format!("[tokens, k = {k}] ids"), format!("{} ids", ids.len())));
    }
    if let Some(&bad) = ids.iter().find(|&&id| id < 0 || id as usize >= slots.total) {
        return Err(MoeError::shape("permute", format!("slot ids in 0..{}", slots.total), bad.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL8: SlotRange = SlotRange { start: 0, count: 4, total: 4 };

    #[test]
    fn contiguous_pads_and_maps_back() {
        // 3 tokens, k = 2
        let ids = [0, 2, 2, 0, 3, 2];
        let l = ContiguousLayout::new(&ids, 2, ALL8, 4).unwrap();
        assert_eq!(l.counts, vec![2, 0, 3, 1]);
        assert_eq!(l.offsets, vec![0, 4, 4, 8, 12]);
        assert_eq!(l.rows[0], Some(RowSource { token: 0, k: 0 }));
        assert_eq!(l.rows[1], Some(RowSource { token: 1, k: 1 }));
        assert_eq!(l.rows[2], None);
        assert_eq!(
            l.rows[4..7],
            [
                Some(RowSource { token: 0, k: 1 }),
                Some(RowSource { token: 1, k: 0 }),
                Some(RowSource { token: 2, k: 1 })
            ]
        );
        let x: Vec<f32> = (0..3 * 2).map(|v| v as f32).collect(); // width 2
        let p = l.permute(&x, 2);
        assert_eq!(&p[0..4], &[0.0, 1.0, 2.0, 3.0]);
        assert_eq!(&p[4..8], &[0.0, 0.0, 0.0, 0.0]);
        let w = [0.5, 0.5, 0.25, 0.75, 1.0, 2.0];
        let mut out = vec![0.0; 6];
        l.unpermute_reduce(&p, 2, &w, 2, &mut out);
        // each token gets (sum of its weights) * x
        assert_eq!(out, vec![0.0, 1.0, 2.0, 3.0, 12.0, 15.0]);
    }

    #[test]
    fn local_range_skips_remote_slots() {
        let ids = [0, 5, 7, 1];
        let l = ContiguousLayout::new(&ids, 2, SlotRange { start: 4, count: 4, total: 8 }, 1).unwrap();
        assert_eq!(l.counts, vec![0, 1, 0, 1]);
        assert_eq!(l.total_rows(), 2);
    }

    #[test]
    fn masked_refuses_overflow_and_matches_contiguous() {
        let ids = [1, 1, 1, 0];
        assert!(MaskedLayout::new(&ids, 1, SlotRange { start: 0, count: 2, total: 2 }, 2).is_err());
        let m = MaskedLayout::new(&ids, 1, SlotRange { start: 0, count: 2, total: 2 }, 3).unwrap();
        assert_eq!(m.counts, vec![1, 3]);
        assert_eq!(m.rows[0], Some(RowSource { token: 3, k: 0 }));
        assert_eq!(m.rows[1], None);
        assert_eq!(m.rows[3], Some(RowSource { token: 0, k: 0 }));
    }

    #[test]
    fn bad_ids_are_errors() {
        assert!(ContiguousLayout::new(&[0, 9], 1, ALL8, 1).is_err());
        assert!(ContiguousLayout::new(&[0, -1], 1, ALL8, 1).is_err());
        assert!(ContiguousLayout::new(&[0, 1, 2], 2, ALL8, 1).is_err());
    }
}
