//! Quantized experts at prefill sizes (AVX-512 BF16, bf16 activations): each task dequantizes
//! panels of 32 output rows x [`QMat::panel_k`] inputs into the pair-packed bf16 block layout of
//! the dense kernels and runs the dense bf16 tile (`vdpbf16ps`, or AMX) on them for a row tile of tokens at a time,
//! so a decoded panel (at most 16 KiB, L1-resident, reused) serves every token of the expert.
//! Scales that cannot be folded into exact bf16 values multiply each panel's partial sums in f32.

use std::cell::RefCell;

use half::bf16;

use super::mats::QMat;
use super::{grow, Task};
use crate::kernels::{DotBf16, Family, Tile, MR_MAX};
use crate::pack::NB;

/// One thread's reusable panel and accumulators (grown once, never per forward).
#[derive(Default)]
struct Workspace {
    panel: Vec<u32>,
    acc: Vec<f32>,
}

thread_local! {
    static WS: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// `out[(c - c0) * rows + r] = W_e x_r (+ bias)` for the task's output rows `c` and its span's
/// tokens `r`; `xb` holds the span's activations as bf16 in packed-position order at stride `kp`
/// ([`QMat::natural_bf16`]).
pub(super) fn run(fam: &DotBf16, w: &QMat, t: Task, (xb, kp): (&[u16], usize), out: &mut [f32], bias: Option<&[f32]>) {
    let (n, k, s) = (w.n, w.k, t.span);
    let kc = w.panel_k();
    // SAFETY: `bf16` is a transparent wrapper of `u16` (same size and alignment), and the slice
    // covers exactly the memory of `xb`.
    let xb: &[bf16] = unsafe { std::slice::from_raw_parts(xb.as_ptr() as *const bf16, xb.len()) };
    WS.with_borrow_mut(|ws| {
        grow(&mut ws.panel, kc.div_ceil(2) * NB);
        grow(&mut ws.acc, s.rows * NB);
        let mut c: Tile = [[0.0; NB]; MR_MAX];
        let mut sc = [0.0f32; NB];
        for b0 in (t.c0..t.c1).step_by(NB) {
            let lanes = (t.c1 - b0).min(NB);
            let acc = &mut ws.acc[..s.rows * NB];
            acc.fill(0.0);
            for k0 in (0..k).step_by(kc) {
                let len = kc.min(k - k0);
                let kk = len.div_ceil(2) * 2;
                w.panel(s.expert, b0, lanes, (k0, len), &mut ws.panel, &mut sc);
                let words = &ws.panel[..kk / 2 * NB];
                // SAFETY: two bf16 per u32 word, in memory order (even input in the low half on
                // this little-endian target); the slice covers exactly `words`.
                let blk: &[bf16] = unsafe { std::slice::from_raw_parts(words.as_ptr() as *const bf16, kk * NB) };
                for r0 in (0..s.rows).step_by(fam.mr()) {
                    let m = (s.rows - r0).min(fam.mr());
                    fam.tile(&xb[(s.row0 + r0) * kp + k0..], kp, m, blk, kk, &mut c, None);
                    for (a, c) in acc[r0 * NB..(r0 + m) * NB].chunks_exact_mut(NB).zip(&c) {
                        for l in 0..NB {
                            a[l] += c[l] * sc[l];
                        }
                    }
                }
            }
            super::store_block(t, n, bias, (b0, lanes), &ws.acc, out);
        }
    });
}
