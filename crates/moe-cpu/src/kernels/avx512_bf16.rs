//! AVX-512 BF16 kernels: `vdpbf16ps` multiplies bf16 pairs and accumulates in f32, two k steps
//! per instruction. Weights are pair-packed (`[k/2][32][2]` per block); an activation pair is
//! broadcast as one 32-bit value. Tiles of up to 8 rows x 32 columns; the one-row tile (GEMV)
//! keeps 8 independent accumulators so it is limited by memory, not by the instruction latency.

use std::arch::x86_64::*;
use std::mem::transmute;

use half::bf16;

use crate::pack::NB;

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn load_pairs(p: *const bf16) -> __m512bh {
    transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bcast_pair(p: *const bf16) -> __m512bh {
    transmute::<__m512i, __m512bh>(_mm512_set1_epi32((p as *const i32).read_unaligned()))
}

/// Prefetches `lines` 64-byte lines into L1 from k-step `step` of the pair-packed block `b` (two
/// lines a step). Prefetches never fault, so steps past the block's end are fine.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn prefetch_l1(b: *const bf16, step: usize, lines: usize) {
    let p = b.wrapping_add(step * 2 * NB) as *const i8;
    for l in 0..lines {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * l));
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_mr<const MR: usize, const PF: bool, const AHEAD: bool>(
    a: *const bf16,
    lda: usize,
    b: *const bf16,
    ksteps: usize,
    c: *mut [f32; NB],
    pf: *const bf16,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let ahead = if AHEAD { crate::tuning::gemv_prefetch() } else { 0 };
    for ks in 0..ksteps {
        let bp = b.add(ks * 2 * NB);
        if PF {
            // the next block, into L2, two lines per step: it arrives while this one computes
            _mm_prefetch::<_MM_HINT_T1>(pf.add(ks * 2 * NB) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(pf.add(ks * 2 * NB + NB) as *const i8);
        }
        if AHEAD {
            prefetch_l1(b, ks + ahead, 2);
        }
        let b0 = load_pairs(bp);
        let b1 = load_pairs(bp.add(NB));
        for (m, acc) in acc.iter_mut().enumerate() {
            let av = bcast_pair(a.add(m * lda + 2 * ks));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    for (m, acc) in acc.iter().enumerate() {
        let row = (*c.add(m)).as_mut_ptr();
        _mm512_storeu_ps(row, acc[0]);
        _mm512_storeu_ps(row.add(16), acc[1]);
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn gemv(a: *const bf16, b: *const bf16, ksteps: usize, c: *mut [f32; NB]) {
    let mut acc = [_mm512_setzero_ps(); 8];
    let mut ks = 0;
    let pf = crate::tuning::gemv_prefetch();
    while ks + 4 <= ksteps {
        if pf > 0 {
            prefetch_l1(b, ks + pf, 8); // the 4 steps `pf` ahead
        }
        for u in 0..4 {
            let bp = b.add((ks + u) * 2 * NB);
            let av = bcast_pair(a.add(2 * (ks + u)));
            acc[2 * u] = _mm512_dpbf16_ps(acc[2 * u], av, load_pairs(bp));
            acc[2 * u + 1] = _mm512_dpbf16_ps(acc[2 * u + 1], av, load_pairs(bp.add(NB)));
        }
        ks += 4;
    }
    while ks < ksteps {
        let bp = b.add(ks * 2 * NB);
        let av = bcast_pair(a.add(2 * ks));
        acc[0] = _mm512_dpbf16_ps(acc[0], av, load_pairs(bp));
        acc[1] = _mm512_dpbf16_ps(acc[1], av, load_pairs(bp.add(NB)));
        ks += 1;
    }
    let lo = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[4], acc[6]));
    let hi = _mm512_add_ps(_mm512_add_ps(acc[1], acc[3]), _mm512_add_ps(acc[5], acc[7]));
    let row = (*c).as_mut_ptr();
    _mm512_storeu_ps(row, lo);
    _mm512_storeu_ps(row.add(16), hi);
}

/// One tile of `m` rows (1..=8), `ksteps` pairs. Tiles of 2-8 rows prefetch as
/// [`crate::tuning::small_tile_prefetch`] says: `b` itself ahead into L1 and/or, when `pf` is not
/// null, the block it points to (same size) into L2 meanwhile. The one-row kernel prefetches `b`
/// ahead only.
///
/// # Safety
/// AVX-512F and AVX-512 BF16 must be available; `a` holds `m` rows of `2 * ksteps` bf16 at stride
/// `lda`, `b` a pair-packed block of `ksteps * 64` bf16, `c` room for `m` rows. (Prefetches never
/// fault, so `pf` needs no such guarantee.)
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn tile(
    a: *const bf16,
    lda: usize,
    m: usize,
    b: *const bf16,
    ksteps: usize,
    c: *mut [f32; NB],
    pf: *const bf16,
) {
    if m == 1 {
        return gemv(a, b, ksteps, c);
    }
    macro_rules! by_rows {
        ($pf:literal, $ahead:literal) => {
            match m {
                2 => tile_mr::<2, $pf, $ahead>(a, lda, b, ksteps, c, pf),
                3 => tile_mr::<3, $pf, $ahead>(a, lda, b, ksteps, c, pf),
                4 => tile_mr::<4, $pf, $ahead>(a, lda, b, ksteps, c, pf),
                5 => tile_mr::<5, $pf, $ahead>(a, lda, b, ksteps, c, pf),
                6 => tile_mr::<6, $pf, $ahead>(a, lda, b, ksteps, c, pf),
                7 => tile_mr::<7, $pf, $ahead>(a, lda, b, ksteps, c, pf),
                _ => tile_mr::<8, $pf, $ahead>(a, lda, b, ksteps, c, pf),
            }
        };
    }
    let mode = crate::tuning::small_tile_prefetch();
    match (!pf.is_null() && mode != 1, mode != 0) {
        (true, true) => by_rows!(true, true),
        (true, false) => by_rows!(true, false),
        (false, true) => by_rows!(false, true),
        (false, false) => by_rows!(false, false),
    }
}
