//! SIMD decoders for the 4-bit formats: 16 packed bytes -> 16 even + 16 odd f32 values (the
//! pair order of [`super::mats`]). Written with intrinsics because the compiler vectorizes the
//! scalar loop across chunks (with gathers and scatters) instead of across the 16 lanes.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// E2M1 magnitudes (codes 0..8); the sign is bit 3 of the code.
#[cfg(target_arch = "x86_64")]
const E2M1_MAG: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// int4: `out[32 c + l] = lo(b[16 c + l]) * s - z`, `out[32 c + 16 + l] = hi(..) * s - z` for the
/// `bytes.len() / 16` chunks of one group.
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; `out` must hold `2 * bytes.len()` values and
/// `bytes.len()` must be a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
pub unsafe fn int4_avx512(bytes: &[u8], s: f32, z: f32, out: &mut [f32]) {
    debug_assert!(bytes.len().is_multiple_of(16) && out.len() >= 2 * bytes.len());
    let (vs, vz, mask) = (_mm512_set1_ps(s), _mm512_set1_ps(z), _mm512_set1_epi32(15));
    for c in 0..bytes.len() / 16 {
        // SAFETY: chunk c covers bytes [16c, 16c + 16) and outputs [32c, 32c + 32), in bounds
        // by the caller's contract.
        unsafe {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.as_ptr().add(16 * c) as *const __m128i));
            let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, mask));
            let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
            let o = out.as_mut_ptr().add(32 * c);
            _mm512_storeu_ps(o, _mm512_fmsub_ps(lo, vs, vz));
            _mm512_storeu_ps(o.add(16), _mm512_fmsub_ps(hi, vs, vz));
        }
    }
}

/// As [`int4_avx512`], with AVX2.
///
/// # Safety
/// AVX2 and FMA must be available; same buffer contract as [`int4_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn int4_avx2(bytes: &[u8], s: f32, z: f32, out: &mut [f32]) {
    debug_assert!(bytes.len().is_multiple_of(16) && out.len() >= 2 * bytes.len());
    let (vs, vz, mask) = (_mm256_set1_ps(s), _mm256_set1_ps(z), _mm256_set1_epi32(15));
    for c in 0..bytes.len() / 16 {
        for half in 0..2 {
            // SAFETY: 8 bytes at 16c + 8 half and 8 outputs at 32c + 8 half (+16): in bounds.
            unsafe {
                let p = bytes.as_ptr().add(16 * c + 8 * half) as *const __m128i;
                let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p));
                let lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
                let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                let o = out.as_mut_ptr().add(32 * c + 8 * half);
                _mm256_storeu_ps(o, _mm256_fmsub_ps(lo, vs, vz));
                _mm256_storeu_ps(o.add(16), _mm256_fmsub_ps(hi, vs, vz));
            }
        }
    }
}

/// E2M1 (MXFP4/NVFP4) row decode: every 16 bytes -> 32 values (pair order); the chunk starting
/// at input `c0` is scaled by `scale[c0 / group]` for its first 8 bytes and
/// `scale[(c0 + 16) / group]` for the last 8 (one scale for MXFP4's 32, two for NVFP4's 16);
/// `group` is 16 or 32.
///
/// # Safety
/// AVX-512F must be available; `bytes.len()` is a multiple of 16, `out` holds
/// `2 * bytes.len()` values and `scale` covers them in groups of `group` (16 or 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
pub unsafe fn e2m1_row_avx512(bytes: &[u8], scale: &[f32], group: usize, out: &mut [f32]) {
    debug_assert!(bytes.len().is_multiple_of(16) && out.len() >= 2 * bytes.len());
    // SAFETY: chunk c reads bytes [16c, 16c + 16) and writes out [32c, 32c + 32); in bounds.
    unsafe {
        let lut = _mm512_castps256_ps512(_mm256_loadu_ps(E2M1_MAG.as_ptr()));
        let (seven, eight, fifteen) = (_mm512_set1_epi32(7), _mm512_set1_epi32(8), _mm512_set1_epi32(15));
        // Scales per 32-input chunk: one (group 32) or two (group 16); no division in the loop.
        let pc = if group == 16 { 2 } else { 1 };
        for c in 0..bytes.len() / 16 {
            let c0 = 32 * c;
            let (s0, s1) = (scale[c * pc], scale[c * pc + pc - 1]);
            let vs = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.as_ptr().add(16 * c) as *const __m128i));
            let decode = |code: __m512i| {
                let mag = _mm512_permutexvar_ps(_mm512_and_si512(code, seven), lut);
                let sign = _mm512_slli_epi32(_mm512_and_si512(code, eight), 28);
                _mm512_mul_ps(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(mag), sign)), vs)
            };
            _mm512_storeu_ps(out.as_mut_ptr().add(c0), decode(_mm512_and_si512(v, fifteen)));
            _mm512_storeu_ps(out.as_mut_ptr().add(c0 + 16), decode(_mm512_srli_epi32(v, 4)));
        }
    }
}

/// One 16-byte chunk of [`e2m1_row_avx512`], with AVX2 (`s0`, `s1`: the chunk's two scales).
///
/// # Safety
/// AVX2 must be available; `bytes` holds 16 bytes and `out` 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn e2m1_chunk_avx2(bytes: &[u8], s0: f32, s1: f32, out: &mut [f32]) {
    debug_assert!(bytes.len() >= 16 && out.len() >= 32);
    // SAFETY: 16 bytes read and 32 floats written, in bounds by the contract.
    unsafe {
        let lut = _mm256_loadu_ps(E2M1_MAG.as_ptr());
        let (seven, eight) = (_mm256_set1_epi32(7), _mm256_set1_epi32(8));
        for (half, s) in [(0usize, s0), (1, s1)] {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.as_ptr().add(8 * half) as *const __m128i));
            let vs = _mm256_set1_ps(s);
            let decode = |code: __m256i| {
                let mag = _mm256_permutevar8x32_ps(lut, _mm256_and_si256(code, seven));
                let sign = _mm256_slli_epi32(_mm256_and_si256(code, eight), 28);
                _mm256_mul_ps(_mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(mag), sign)), vs)
            };
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * half), decode(_mm256_and_si256(v, _mm256_set1_epi32(15))));
            _mm256_storeu_ps(out.as_mut_ptr().add(16 + 8 * half), decode(_mm256_srli_epi32(v, 4)));
        }
    }
}

/// One int4 row times one activation vector (pair order), decoded in registers:
/// `sum_g s[g] * sum_{c in g} q[c] x[c] - sum_g zs[g] * xsum[g]`.
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; `bytes` holds `64 * s.len()` bytes, `x` holds
/// `128 * s.len()` values, `zs` and `xsum` hold `s.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
pub unsafe fn int4_dot_avx512(bytes: &[u8], s: &[f32], zs: &[f32], x: &[f32], xsum: &[f32]) -> f32 {
    let g = s.len();
    debug_assert!(bytes.len() >= 64 * g && x.len() >= 128 * g && zs.len() >= g && xsum.len() >= g);
    let mask = _mm512_set1_epi32(15);
    let mut tot = _mm512_setzero_ps();
    let mut zterm = 0.0f32;
    for gi in 0..g {
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for c in 0..4 {
            // SAFETY: chunk c of group gi: 16 bytes at 64 gi + 16 c and 32 values of x at
            // 128 gi + 32 c, in bounds by the contract.
            unsafe {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.as_ptr().add(64 * gi + 16 * c) as *const __m128i));
                let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, mask));
                let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                let xp = x.as_ptr().add(128 * gi + 32 * c);
                a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp), a0);
                a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), a1);
            }
        }
        tot = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(s[gi]), tot);
        zterm += zs[gi] * xsum[gi];
    }
    _mm512_reduce_add_ps(tot) - zterm
}

/// One int4 row times one bf16 activation vector with `vdpbf16ps`: the codes become bf16 through
/// a 16-entry table (`vpermw`), 64 weights per step. `xb` holds, for every 64 inputs, the 32 even
/// then the 32 odd inputs as bf16 bits; `xsum` the per-group sums of those bf16 values.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 BF16 must be available; `bytes` holds `64 * s.len()` bytes,
/// `xb` holds `128 * s.len()` values, `zs` and `xsum` hold `s.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
pub unsafe fn int4_dot_bf16(bytes: &[u8], s: &[f32], zs: &[f32], xb: &[u16], xsum: &[f32]) -> f32 {
    let g = s.len();
    debug_assert!(bytes.len() >= 64 * g && xb.len() >= 128 * g && zs.len() >= g && xsum.len() >= g);
    // bf16 bits of 0.0, 1.0, ..., 15.0 (all exact in bf16).
    let mut table = [0u16; 32];
    for (q, t) in table.iter_mut().enumerate().take(16) {
        *t = half::bf16::from_f32(q as f32).to_bits();
    }
    // SAFETY: reads of 32 u16 and of chunks in bounds by the contract below.
    unsafe {
        let lut = _mm512_loadu_si512(table.as_ptr() as *const _);
        let mask = _mm512_set1_epi16(15);
        let mut tot = _mm512_setzero_ps();
        let mut zterm = 0.0f32;
        for gi in 0..g {
            let mut acc = _mm512_setzero_ps();
            for c in 0..2 {
                // 32 bytes = 64 weights: lane j of `lo` is input 2j, of `hi` input 2j + 1.
                let v =
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256(bytes.as_ptr().add(64 * gi + 32 * c) as *const __m256i));
                let lo = _mm512_permutexvar_epi16(_mm512_and_si512(v, mask), lut);
                let hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
                let xp = xb.as_ptr().add(128 * gi + 64 * c);
                let xe = _mm512_loadu_si512(xp as *const _);
                let xo = _mm512_loadu_si512(xp.add(32) as *const _);
                acc = _mm512_dpbf16_ps(
                    acc,
                    std::mem::transmute::<__m512i, __m512bh>(lo),
                    std::mem::transmute::<__m512i, __m512bh>(xe),
                );
                acc = _mm512_dpbf16_ps(
                    acc,
                    std::mem::transmute::<__m512i, __m512bh>(hi),
                    std::mem::transmute::<__m512i, __m512bh>(xo),
                );
            }
            tot = _mm512_fmadd_ps(acc, _mm512_set1_ps(s[gi]), tot);
            zterm += zs[gi] * xsum[gi];
        }
        _mm512_reduce_add_ps(tot) - zterm
    }
}
