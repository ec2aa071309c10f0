//! AVX-512F widening kernels: weights (f32, bf16 or f16) are widened to f32 in registers and
//! FMA'd with broadcast f32 activations. Tiles of up to 8 rows x 32 columns (16 accumulators);
//! the one-row tile (GEMV, memory bound) unrolls k by 4 with independent accumulators so loads,
//! not FMA latency, set the pace.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::ROUTER_LANES as RL;
use crate::pack::NB;

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_f32(p: *const f32) -> __m512 {
    _mm512_loadu_ps(p)
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_bf16(p: *const bf16) -> __m512 {
    // bf16 is the top half of an f32: zero-extend to 32 bits and shift into place.
    let h = _mm256_loadu_si256(p as *const __m256i);
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_f16(p: *const f16) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

macro_rules! kernels {
    ($entry:ident, $tile:ident, $gemv:ident, $t:ty, $load:ident) => {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn $tile<const MR: usize>(a: *const f32, lda: usize, b: *const $t, k: usize, c: *mut [f32; NB]) {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            for kk in 0..k {
                let bp = b.add(kk * NB);
                let b0 = $load(bp);
                let b1 = $load(bp.add(16));
                for (m, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(m * lda + kk));
                    acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                }
            }
            for (m, acc) in acc.iter().enumerate() {
                let row = (*c.add(m)).as_mut_ptr();
                _mm512_storeu_ps(row, acc[0]);
                _mm512_storeu_ps(row.add(16), acc[1]);
            }
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn $gemv(a: *const f32, b: *const $t, k: usize, c: *mut [f32; NB]) {
            let mut acc = [_mm512_setzero_ps(); 8];
            let mut kk = 0;
            while kk + 4 <= k {
                for u in 0..4 {
                    let bp = b.add((kk + u) * NB);
                    let av = _mm512_set1_ps(*a.add(kk + u));
                    acc[2 * u] = _mm512_fmadd_ps(av, $load(bp), acc[2 * u]);
                    acc[2 * u + 1] = _mm512_fmadd_ps(av, $load(bp.add(16)), acc[2 * u + 1]);
                }
                kk += 4;
            }
            while kk < k {
                let bp = b.add(kk * NB);
                let av = _mm512_set1_ps(*a.add(kk));
                acc[0] = _mm512_fmadd_ps(av, $load(bp), acc[0]);
                acc[1] = _mm512_fmadd_ps(av, $load(bp.add(16)), acc[1]);
                kk += 1;
            }
            let lo = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[4], acc[6]));
            let hi = _mm512_add_ps(_mm512_add_ps(acc[1], acc[3]), _mm512_add_ps(acc[5], acc[7]));
            let row = (*c).as_mut_ptr();
            _mm512_storeu_ps(row, lo);
            _mm512_storeu_ps(row.add(16), hi);
        }

        /// One tile of `m` rows (1..=8).
        ///
        /// # Safety
        /// AVX-512F must be available; `a` holds `m` rows of `k` f32 at stride `lda`, `b` a block of
        /// `k * 32` elements, `c` room for `m` rows.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn $entry(a: *const f32, lda: usize, m: usize, b: *const $t, k: usize, c: *mut [f32; NB]) {
            match m {
                1 => $gemv(a, b, k, c),
                2 => $tile::<2>(a, lda, b, k, c),
                3 => $tile::<3>(a, lda, b, k, c),
                4 => $tile::<4>(a, lda, b, k, c),
                5 => $tile::<5>(a, lda, b, k, c),
                6 => $tile::<6>(a, lda, b, k, c),
                7 => $tile::<7>(a, lda, b, k, c),
                _ => $tile::<8>(a, lda, b, k, c),
            }
        }
    };
}

kernels!(tile_f32, tile_f32_mr, gemv_f32, f32, load_f32);
kernels!(tile_bf16, tile_bf16_mr, gemv_bf16, bf16, load_bf16);
kernels!(tile_f16, tile_f16_mr, gemv_f16, f16, load_f16);

macro_rules! exact {
    ($entry:ident, $tile:ident, $t:ty, $load:ident) => {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn $tile<const MR: usize, const NBK: usize>(
            a: *const f32,
            lda: usize,
            b: *const $t,
            bstride: usize,
            k: usize,
            c: *mut [f32; RL],
        ) {
            let mut acc = [[_mm512_set1_ps(-0.0); NBK]; MR];
            for kk in 0..k {
                let mut w = [_mm512_setzero_ps(); NBK];
                for (j, w) in w.iter_mut().enumerate() {
                    *w = $load(b.add(j * bstride + kk * RL));
                }
                for (m, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(m * lda + kk));
                    for (acc, w) in acc.iter_mut().zip(&w) {
                        *acc = _mm512_add_ps(*acc, _mm512_mul_ps(*w, av));
                    }
                }
            }
            for (m, acc) in acc.iter().enumerate() {
                for (j, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps((*c.add(m * NBK + j)).as_mut_ptr(), *acc);
                }
            }
        }

        /// Router tile of `m` rows (1..=8) against `nblk` 16-lane blocks (up to 4 for one row,
        /// 2 otherwise: enough independent add chains to cover the add latency): a separate multiply and add per step, in input order, so each lane is
        /// bit-identical to the reference's scalar loop (top-k never flips on near-ties against
        /// `reference`). The weights widen exactly. Row `r` of block `j` goes to `c[r * nblk + j]`.
        ///
        /// # Safety
        /// AVX-512F must be available; `a` holds `m` rows of `k` f32 at stride `lda`, `b` `nblk`
        /// blocks of `k * 16` elements at stride `bstride`, `c` room for `m * nblk` rows.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn $entry(
            a: *const f32,
            lda: usize,
            m: usize,
            (b, nblk, bstride): (*const $t, usize, usize),
            k: usize,
            c: *mut [f32; RL],
        ) {
            match (m, nblk) {
                (1, 1) => $tile::<1, 1>(a, lda, b, bstride, k, c),
                (1, 2) => $tile::<1, 2>(a, lda, b, bstride, k, c),
                (1, 3) => $tile::<1, 3>(a, lda, b, bstride, k, c),
                (1, _) => $tile::<1, 4>(a, lda, b, bstride, k, c),
                (2, 1) => $tile::<2, 1>(a, lda, b, bstride, k, c),
                (2, _) => $tile::<2, 2>(a, lda, b, bstride, k, c),
                (3, 1) => $tile::<3, 1>(a, lda, b, bstride, k, c),
                (3, _) => $tile::<3, 2>(a, lda, b, bstride, k, c),
                (4, 1) => $tile::<4, 1>(a, lda, b, bstride, k, c),
                (4, _) => $tile::<4, 2>(a, lda, b, bstride, k, c),
                (5, 1) => $tile::<5, 1>(a, lda, b, bstride, k, c),
                (5, _) => $tile::<5, 2>(a, lda, b, bstride, k, c),
                (6, 1) => $tile::<6, 1>(a, lda, b, bstride, k, c),
                (6, _) => $tile::<6, 2>(a, lda, b, bstride, k, c),
                (7, 1) => $tile::<7, 1>(a, lda, b, bstride, k, c),
                (7, _) => $tile::<7, 2>(a, lda, b, bstride, k, c),
                (_, 1) => $tile::<8, 1>(a, lda, b, bstride, k, c),
                _ => $tile::<8, 2>(a, lda, b, bstride, k, c),
            }
        }
    };
}

exact!(exact_f32, exact_f32_mr, f32, load_f32);
exact!(exact_bf16, exact_bf16_mr, bf16, load_bf16);
exact!(exact_f16, exact_f16_mr, f16, load_f16);

/// Wrapping sum of `n` u64 words with 64-byte loads and four independent accumulators: a
/// streaming read as fast as the core can issue it (the bandwidth probe of `moe bench`).
///
/// # Safety
/// AVX-512F must be available and `p` must point to `n` readable u64 words.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn sum_u64(p: *const u64, n: usize) -> u64 {
    let mut acc = [_mm512_setzero_si512(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_add_epi64(*acc, _mm512_loadu_si512(p.add(i + 8 * j) as *const _));
        }
        i += 32;
    }
    let v = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    let mut s = _mm512_reduce_add_epi64(v) as u64;
    while i < n {
        s = s.wrapping_add(*p.add(i));
        i += 1;
    }
    s
}
