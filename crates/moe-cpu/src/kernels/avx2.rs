//! AVX2 + FMA + F16C widening kernels: a 32-column block is four 8-lane vectors; tiles of up to
//! 2 rows keep 8 accumulators plus 4 weight vectors in the 16 registers.

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::pack::NB;

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_f32(p: *const f32) -> __m256 {
    _mm256_loadu_ps(p)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_bf16(p: *const bf16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

macro_rules! kernels {
    ($entry:ident, $tile:ident, $t:ty, $load:ident) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $tile<const MR: usize>(a: *const f32, lda: usize, b: *const $t, k: usize, c: *mut [f32; NB]) {
            let mut acc = [[_mm256_setzero_ps(); 4]; MR];
            for kk in 0..k {
                let bp = b.add(kk * NB);
                let bv = [$load(bp), $load(bp.add(8)), $load(bp.add(16)), $load(bp.add(24))];
                for (m, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_ps(*a.add(m * lda + kk));
                    for v in 0..4 {
                        acc[v] = _mm256_fmadd_ps(av, bv[v], acc[v]);
                    }
                }
            }
            for (m, acc) in acc.iter().enumerate() {
                let row = (*c.add(m)).as_mut_ptr();
                for (v, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(row.add(8 * v), *acc);
                }
            }
        }

        /// One tile of `m` rows (1..=2).
        ///
        /// # Safety
        /// AVX2, FMA and F16C must be available; `a` holds `m` rows of `k` f32 at stride `lda`, `b`
        /// a block of `k * 32` elements, `c` room for `m` rows.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn $entry(a: *const f32, lda: usize, m: usize, b: *const $t, k: usize, c: *mut [f32; NB]) {
            match m {
                1 => $tile::<1>(a, lda, b, k, c),
                _ => $tile::<2>(a, lda, b, k, c),
            }
        }
    };
}

kernels!(tile_f32, tile_f32_mr, f32, load_f32);
kernels!(tile_bf16, tile_bf16_mr, bf16, load_bf16);
kernels!(tile_f16, tile_f16_mr, f16, load_f16);
