//! Plain Rust tile (any CPU): 32 independent lane sums per row, which the compiler vectorizes
//! with whatever the baseline target offers.

use crate::kernels::Tile;
use crate::pack::{WElem, NB};

/// `c[r] = a[r] * block` for `r < m`.
pub(super) fn tile<W: WElem>(a: &[f32], lda: usize, m: usize, b: &[W], k: usize, c: &mut Tile) {
    for (r, c) in c.iter_mut().enumerate().take(m) {
        let mut acc = [0.0f32; NB];
        let row = &a[r * lda..r * lda + k];
        for (kk, &av) in row.iter().enumerate() {
            let w = &b[kk * NB..(kk + 1) * NB];
            for (acc, &w) in acc.iter_mut().zip(w) {
                *acc += av * w.to_f32();
            }
        }
        *c = acc;
    }
}
