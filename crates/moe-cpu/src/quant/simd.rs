//! SIMD decoders for the 4-bit formats: 16 packed bytes -> 16 even + 16 odd f32 values (the
//! pair order of [`super::mats`]), and for e4m3 bytes (FP8, in order). Written with intrinsics because the compiler vectorizes the
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

/// One int4 row times one bf16 activation vector with `vdpbf16ps`, 64 weights per step. A code q
/// becomes the bf16 `0x4300 | q`, which is exactly 128 + q (bf16 has 7 mantissa bits): one OR,
/// no table lookup on the shuffle port. The 128 x (group sum of x) this adds is subtracted with
/// the zero-point term. `xb` holds, for every 64 inputs, the 32 even then the 32 odd inputs as
/// bf16 bits; `xsum` the per-group sums of those bf16 values.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 BF16 must be available; `bytes` holds `64 * s.len()` bytes,
/// `xb` holds `128 * s.len()` values, `zs` and `xsum` hold `s.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
pub unsafe fn int4_dot_bf16(bytes: &[u8], s: &[f32], zs: &[f32], xb: &[u16], xsum: &[f32]) -> f32 {
    let g = s.len();
    debug_assert!(bytes.len() >= 64 * g && xb.len() >= 128 * g && zs.len() >= g && xsum.len() >= g);
    // SAFETY: reads of chunks in bounds by the contract below.
    unsafe {
        let (mask, bias) = (_mm512_set1_epi16(15), _mm512_set1_epi16(0x4300));
        let mut tot = _mm512_setzero_ps();
        let mut zterm = 0.0f32;
        for gi in 0..g {
            // Four independent sums per group: one `vdpbf16ps` chain would wait on its latency.
            let mut accs = [_mm512_setzero_ps(); 4];
            for c in 0..2 {
                // 32 bytes = 64 weights: lane j of `lo` is input 2j, of `hi` input 2j + 1.
                let v =
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256(bytes.as_ptr().add(64 * gi + 32 * c) as *const __m256i));
                // (v & 15) | 0x4300 and (v >> 4) | 0x4300 (v < 256, so the shift leaves 4 bits).
                let lo = _mm512_ternarylogic_epi32::<0xEA>(v, mask, bias);
                let hi = _mm512_or_si512(_mm512_srli_epi16(v, 4), bias);
                let xp = xb.as_ptr().add(128 * gi + 64 * c);
                let xe = _mm512_loadu_si512(xp as *const _);
                let xo = _mm512_loadu_si512(xp.add(32) as *const _);
                accs[2 * c] = _mm512_dpbf16_ps(
                    accs[2 * c],
                    std::mem::transmute::<__m512i, __m512bh>(lo),
                    std::mem::transmute::<__m512i, __m512bh>(xe),
                );
                accs[2 * c + 1] = _mm512_dpbf16_ps(
                    accs[2 * c + 1],
                    std::mem::transmute::<__m512i, __m512bh>(hi),
                    std::mem::transmute::<__m512i, __m512bh>(xo),
                );
            }
            let acc = _mm512_add_ps(_mm512_add_ps(accs[0], accs[1]), _mm512_add_ps(accs[2], accs[3]));
            tot = _mm512_fmadd_ps(acc, _mm512_set1_ps(s[gi]), tot);
            zterm += (zs[gi] + 128.0 * s[gi]) * xsum[gi];
        }
        _mm512_reduce_add_ps(tot) - zterm
    }
}

/// Bytes a 128-input group of int8 activations takes in [`int4_dot_vnni`]: the 64 even then
/// the 64 odd inputs of the group, then (`split`) the same of the residual byte.
pub const fn i8_group_bytes(split: bool) -> usize {
    if split {
        256
    } else {
        128
    }
}

/// One int4 row times int8 activations with `vpdpbusd` (unsigned codes times signed bytes,
/// four products a lane), 128 weights per step: the codes need only a mask and a shift, no
/// widening. Each 128-input group `g` of the activations is `unit[g] * v` with `v` the group's
/// integer: `v = h` (one byte a value) or, with `split`, `v = 256 h + l` (a residual byte `l`:
/// finer than bf16's rounding). The group's integer dot is exact in i32; `xsum[g]` is the sum of
/// the group's activation values `unit[g] * v`, for the zero-point term.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 VNNI must be available; `bytes` holds `64 * s.len()` bytes,
/// `xq` holds `i8_group_bytes(split) * s.len()` bytes, `zs`, `unit` and `xsum` hold `s.len()`
/// values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn int4_dot_vnni(
    split: bool,
    bytes: &[u8],
    s: &[f32],
    zs: &[f32],
    xq: &[i8],
    unit: &[f32],
    xsum: &[f32],
) -> f32 {
    // SAFETY: forwarded contract (one row; `s` gives the group count).
    unsafe { int4_dot_rows_vnni::<1>(split, bytes, s, zs, xq, &unit[..s.len()], xsum)[0] }
}

/// [`int4_dot_vnni`] of `N` consecutive rows (`bytes`, `s` and `zs` hold the rows one after
/// another) against one activation row, with the same arithmetic per row (so the same bits;
/// `int4_dot_vnni` is this with `N = 1`):
/// the activation bytes are loaded once per group for all rows, and the rows' independent
/// chains keep the vector ports busy where one row waits on `vpdpbusd`'s latency.
///
/// # Safety
/// As [`int4_dot_vnni`], for `N` rows: `bytes` holds `N * 64 * g` bytes, `s` and `zs` `N * g`
/// values (`g = unit.len()`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn int4_dot_rows_vnni<const N: usize>(
    split: bool,
    bytes: &[u8],
    s: &[f32],
    zs: &[f32],
    xq: &[i8],
    unit: &[f32],
    xsum: &[f32],
) -> [f32; N] {
    // SAFETY: forwarded contract.
    unsafe {
        if split {
            int4_dot_rows_vnni_as::<true, N>(bytes, s, zs, xq, unit, xsum)
        } else {
            int4_dot_rows_vnni_as::<false, N>(bytes, s, zs, xq, unit, xsum)
        }
    }
}

/// [`int4_dot_rows_vnni`] for one activation form.
///
/// # Safety
/// As [`int4_dot_rows_vnni`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
unsafe fn int4_dot_rows_vnni_as<const SPLIT: bool, const N: usize>(
    bytes: &[u8],
    s: &[f32],
    zs: &[f32],
    xq: &[i8],
    unit: &[f32],
    xsum: &[f32],
) -> [f32; N] {
    let g = unit.len();
    let per = i8_group_bytes(SPLIT);
    debug_assert!(bytes.len() >= N * 64 * g && s.len() >= N * g && zs.len() >= N * g);
    debug_assert!(xq.len() >= per * g && xsum.len() >= g);
    // SAFETY: every load is inside row r's group gi, in bounds by the contract.
    unsafe {
        let mask = _mm512_set1_epi8(15);
        // Two running sums a row: one chain of dependent FMAs would wait on their latency.
        let mut tot = [[_mm512_setzero_ps(); 2]; N];
        for gi in 0..g {
            let xp = xq.as_ptr().add(per * gi);
            let x = |o: usize| _mm512_loadu_si512(xp.add(o) as *const _);
            let (x0, x1) = (x(0), x(64));
            let (x2, x3) = if SPLIT { (x(128), x(192)) } else { (x0, x1) };
            for (r, t) in tot.iter_mut().enumerate() {
                // Byte j holds inputs 2j (low nibble) and 2j + 1 (high nibble) of the group.
                let v = _mm512_loadu_si512(bytes.as_ptr().add(64 * (r * g + gi)) as *const _);
                let lo = _mm512_and_si512(v, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
                let mut a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x0);
                a = _mm512_dpbusd_epi32(a, hi, x1);
                if SPLIT {
                    let mut b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x2);
                    b = _mm512_dpbusd_epi32(b, hi, x3);
                    // |a| <= 8 * 15 * 127 a lane: 256 a + b stays far inside i32.
                    a = _mm512_add_epi32(_mm512_slli_epi32::<8>(a), b);
                }
                let t = &mut t[gi & 1];
                *t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(s[r * g + gi] * unit[gi]), *t);
            }
        }
        std::array::from_fn(|r| {
            let mut zterm = [0.0f32; 4];
            for gi in 0..g {
                zterm[gi & 3] += zs[r * g + gi] * xsum[gi];
            }
            _mm512_reduce_add_ps(_mm512_add_ps(tot[r][0], tot[r][1])) - (zterm[0] + zterm[1]) - (zterm[2] + zterm[3])
        })
    }
}

/// `N` consecutive int8 weight rows (signed codes, natural input order, one scale a row) times
/// one activation row of [`quantize_i8_groups`]'s groups with `vpdpbusd`, 128 weights a step.
/// `vpdpbusd` multiplies unsigned by signed bytes, so the activation bytes are flipped to
/// `v + 128` (one xor, shared by the rows) and each group's integer dot loses
/// `128 * sums[g]` (`257 * 128 * sums[g]` with `split`, whose integer is `256 h + l`), the
/// group's code sum, subtracted from lane 0 in i32: exact before the conversion to f32. The
/// activation bytes must hold the group's inputs in natural order (feed the quantizer
/// [`int8_vnni_order`]).
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 VNNI must be available; `q` holds `N * 128 * g` bytes
/// (`g = unit.len()`), `scale` `N` values, `sums` `N * g`, `xq` `i8_group_bytes(split) * g`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn int8_dot_rows_vnni<const N: usize>(
    split: bool,
    q: &[u8],
    scale: &[f32],
    sums: &[i32],
    xq: &[i8],
    unit: &[f32],
) -> [f32; N] {
    // SAFETY: forwarded contract.
    unsafe {
        if split {
            int8_dot_rows_vnni_as::<true, N>(q, scale, sums, xq, unit)
        } else {
            int8_dot_rows_vnni_as::<false, N>(q, scale, sums, xq, unit)
        }
    }
}

/// [`int8_dot_rows_vnni`] for one activation form.
///
/// # Safety
/// As [`int8_dot_rows_vnni`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
unsafe fn int8_dot_rows_vnni_as<const SPLIT: bool, const N: usize>(
    q: &[u8],
    scale: &[f32],
    sums: &[i32],
    xq: &[i8],
    unit: &[f32],
) -> [f32; N] {
    let g = unit.len();
    let per = i8_group_bytes(SPLIT);
    debug_assert!(q.len() >= N * 128 * g && scale.len() >= N && sums.len() >= N * g);
    debug_assert!(xq.len() >= per * g);
    // Offset products a code sum stands for: 128 (v + 128), or 257 * 128 for 256 (h + 128) + (l + 128).
    let offset = if SPLIT { 257 * 128 } else { 128 };
    // SAFETY: every load is inside row r's group gi, in bounds by the contract.
    unsafe {
        let flip = _mm512_set1_epi8(i8::MIN);
        let mut tot = [[_mm512_setzero_ps(); 2]; N];
        for gi in 0..g {
            let xp = xq.as_ptr().add(per * gi);
            let x = |o: usize| _mm512_xor_si512(_mm512_loadu_si512(xp.add(o) as *const _), flip);
            let (x0, x1) = (x(0), x(64));
            let (x2, x3) = if SPLIT { (x(128), x(192)) } else { (x0, x1) };
            for (r, t) in tot.iter_mut().enumerate() {
                let wp = q.as_ptr().add(128 * (r * g + gi));
                let (w0, w1) = (_mm512_loadu_si512(wp as *const _), _mm512_loadu_si512(wp.add(64) as *const _));
                let mut a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x0, w0);
                a = _mm512_dpbusd_epi32(a, x1, w1);
                if SPLIT {
                    let mut b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x2, w0);
                    b = _mm512_dpbusd_epi32(b, x3, w1);
                    // |a| <= 128 * 255 * 128 in all: 256 a + b stays inside i32.
                    a = _mm512_add_epi32(_mm512_slli_epi32::<8>(a), b);
                }
                let corr = _mm512_zextsi128_si512(_mm_cvtsi32_si128(offset * sums[r * g + gi]));
                a = _mm512_sub_epi32(a, corr);
                let t = &mut t[gi & 1];
                *t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(unit[gi]), *t);
            }
        }
        std::array::from_fn(|r| scale[r] * _mm512_reduce_add_ps(_mm512_add_ps(tot[r][0], tot[r][1])))
    }
}

/// The activation order [`int8_dot_rows_vnni`] takes: `out` is `x` (natural order) permuted so
/// that [`quantize_i8_groups`] (which writes its 16-value runs even ones first, for int4's
/// nibbles) leaves each group's bytes in natural order.
pub fn int8_vnni_order(x: impl Fn(usize) -> f32, out: &mut [f32]) {
    for g0 in (0..out.len()).step_by(128) {
        for i in 0..8 {
            let src = g0 + (i & 1) * 64 + 16 * (i / 2);
            for l in 0..16 {
                out[g0 + 16 * i + l] = x(src + l);
            }
        }
    }
}

/// Quantizes one activation row (`x`: `128 * unit.len()` inputs in the int4 pair order of
/// [`super::mats`]) into [`int4_dot_vnni`]'s groups: per 128 inputs `unit = amax / 127` (with
/// `split`, `/ 256` more), `h = round(x / (amax / 127))`, and with `split` the residual byte
/// `l = round(256 (x / (amax / 127) - h))`. A non-finite input makes its group's unit NaN, so
/// the dot is NaN as with float activations.
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; `out` holds `i8_group_bytes(split) * unit.len()`
/// bytes, `x` `128 * unit.len()` values and `xsum` `unit.len()` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn quantize_i8_groups(split: bool, x: &[f32], out: &mut [i8], unit: &mut [f32], xsum: &mut [f32]) {
    // SAFETY: forwarded contract.
    unsafe {
        if split {
            quantize_i8_groups_as::<true>(x, out, unit, xsum)
        } else {
            quantize_i8_groups_as::<false>(x, out, unit, xsum)
        }
    }
}

/// [`quantize_i8_groups`] for one activation form.
///
/// # Safety
/// As [`quantize_i8_groups`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn quantize_i8_groups_as<const SPLIT: bool>(x: &[f32], out: &mut [i8], unit: &mut [f32], xsum: &mut [f32]) {
    let g = unit.len();
    let per = i8_group_bytes(SPLIT);
    debug_assert!(x.len() >= 128 * g && out.len() >= per * g && xsum.len() >= g);
    // SAFETY: loads and stores stay inside group gi, in bounds by the contract.
    unsafe {
        for gi in 0..g {
            let xp = x.as_ptr().add(128 * gi);
            let v: [__m512; 8] = std::array::from_fn(|m| _mm512_loadu_ps(xp.add(16 * m)));
            let (mut m, mut probe) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for r in &v {
                m = _mm512_max_ps(m, _mm512_abs_ps(*r));
                // inf * 0 and NaN * 0 are NaN: a non-finite input poisons the probe.
                probe = _mm512_fmadd_ps(*r, _mm512_setzero_ps(), probe);
            }
            let amax = _mm512_reduce_max_ps(m);
            let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            let mut vsum = _mm512_setzero_ps();
            let op = out.as_mut_ptr().add(per * gi);
            for (i, r) in v.iter().enumerate() {
                // 16 values at pair-order offset 16 i: even inputs (i even) or odd inputs of
                // the group's 32-input chunk i / 2.
                let dst = (i & 1) * 64 + 16 * (i / 2);
                let t = _mm512_mul_ps(*r, inv);
                let h = _mm512_cvtps_epi32(t);
                _mm_storeu_si128(op.add(dst) as *mut __m128i, _mm512_cvtsepi32_epi8(h));
                let hf = _mm512_cvtepi32_ps(h);
                if SPLIT {
                    let l = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(t, hf), _mm512_set1_ps(256.0)));
                    let l = _mm512_max_epi32(_mm512_min_epi32(l, _mm512_set1_epi32(127)), _mm512_set1_epi32(-128));
                    _mm_storeu_si128(op.add(128 + dst) as *mut __m128i, _mm512_cvtsepi32_epi8(l));
                    vsum = _mm512_add_ps(vsum, _mm512_fmadd_ps(hf, _mm512_set1_ps(256.0), _mm512_cvtepi32_ps(l)));
                } else {
                    vsum = _mm512_add_ps(vsum, hf);
                }
            }
            let u = amax / 127.0 / if SPLIT { 256.0 } else { 1.0 } + _mm512_reduce_add_ps(probe);
            unit[gi] = u;
            // Exact: every lane sum is an integer below 2^24.
            xsum[gi] = u * _mm512_reduce_add_ps(vsum);
        }
    }
}

/// e4m3fn bits moved into an f32 (sign to bit 31, exponent and mantissa to bits 26..20) are the
/// value times 2^-120, subnormals included (they land on f32 subnormals); 2^120 undoes it exactly.
#[cfg(target_arch = "x86_64")]
const E4M3_UNBIAS: f32 = 1.329_228e36; // 2^120

/// FP8 (e4m3fn) row decode: `out[c] = e4m3(bytes[c]) * scale[c / 128]` for the whole 16-byte
/// chunks of the row, bit for bit the table decode (`E4M3_LUT[b] * s`: one exact power-of-two
/// multiply, then the one rounding multiply); NaN codes (0x7F, 0xFF) decode to NaN. Returns how
/// many values it wrote (the row length rounded down to 16); the caller decodes the tail.
///
/// # Safety
/// AVX-512F must be available; `out.len() >= bytes.len()` and `scale` covers
/// `ceil(bytes.len() / 128)` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
pub unsafe fn e4m3_row_avx512(bytes: &[u8], scale: &[f32], out: &mut [f32]) -> usize {
    debug_assert!(out.len() >= bytes.len() && scale.len() >= bytes.len().div_ceil(128));
    let whole = bytes.len() / 16 * 16;
    // SAFETY: chunk c reads bytes [c, c + 16) and writes out [c, c + 16), c + 16 <= whole.
    unsafe {
        let (mag, sgn) = (_mm512_set1_epi32(0x7F), _mm512_set1_epi32(0x80));
        let (unbias, nan) = (_mm512_set1_ps(E4M3_UNBIAS), _mm512_set1_ps(f32::NAN));
        for c in (0..whole).step_by(16) {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.as_ptr().add(c) as *const __m128i));
            let m = _mm512_and_si512(v, mag);
            let bits = _mm512_or_si512(_mm512_slli_epi32(m, 20), _mm512_slli_epi32(_mm512_and_si512(v, sgn), 24));
            let x = _mm512_mul_ps(_mm512_mul_ps(_mm512_castsi512_ps(bits), unbias), _mm512_set1_ps(scale[c / 128]));
            let x = _mm512_mask_mov_ps(x, _mm512_cmpeq_epi32_mask(m, mag), nan);
            _mm512_storeu_ps(out.as_mut_ptr().add(c), x);
        }
    }
    whole
}

/// [`e4m3_row_avx512`] with AVX2, 8 values a step (the row length rounded down to 8).
///
/// # Safety
/// AVX2 must be available; the same slice contract.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn e4m3_row_avx2(bytes: &[u8], scale: &[f32], out: &mut [f32]) -> usize {
    debug_assert!(out.len() >= bytes.len() && scale.len() >= bytes.len().div_ceil(128));
    let whole = bytes.len() / 8 * 8;
    // SAFETY: step c reads bytes [c, c + 8) and writes out [c, c + 8), c + 8 <= whole.
    unsafe {
        let (mag, sgn) = (_mm256_set1_epi32(0x7F), _mm256_set1_epi32(0x80));
        let (unbias, nan) = (_mm256_set1_ps(E4M3_UNBIAS), _mm256_set1_ps(f32::NAN));
        for c in (0..whole).step_by(8) {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.as_ptr().add(c) as *const __m128i));
            let m = _mm256_and_si256(v, mag);
            let bits = _mm256_or_si256(_mm256_slli_epi32(m, 20), _mm256_slli_epi32(_mm256_and_si256(v, sgn), 24));
            let x = _mm256_mul_ps(_mm256_mul_ps(_mm256_castsi256_ps(bits), unbias), _mm256_set1_ps(scale[c / 128]));
            let is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(m, mag));
            _mm256_storeu_ps(out.as_mut_ptr().add(c), _mm256_blendv_ps(x, nan, is_nan));
        }
    }
    whole
}

/// bf16 bits of every e4m3fn magnitude (codes 0..128; 0x7F is NaN). Every finite e4m3 value,
/// subnormals included, is a normal bf16 (3 mantissa bits, exponents 2^-9 .. 2^8): exact.
pub fn e4m3_bf16_magnitudes() -> [u16; 128] {
    let mut t = [0u16; 128];
    for (c, v) in t.iter_mut().enumerate() {
        *v = half::bf16::from_f32(moe_core::quant::codec::E4M3_LUT[c]).to_bits();
    }
    t
}

/// One FP8 (e4m3fn, block-scaled) row times `R` bf16 activation rows (`xb`: row r at `r * ld`)
/// with `vdpbf16ps`: per row `sum_b scale[b] * sum_{c in block b} e4m3(q[c]) x[c]`. The codes
/// become bf16 through a 128-entry table (two `vpermi2w` and a blend on bit 6, then the sign),
/// 32 weights a step in input order, once for all rows (the lookups cost more than the
/// `vdpbf16ps`); each 128-block's partial sum is scaled once, so a row's bits do not depend on
/// `R`. Handles the whole 32-element chunks; the caller adds the rest (returns the sums and how
/// many inputs they cover).
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 BF16 must be available; `xb.len() >= (R - 1) * ld +
/// bytes.len()` with `ld >= bytes.len()`, and `scale` covers `ceil(bytes.len() / 128)` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
pub unsafe fn e4m3_dot_bf16_rows<const R: usize>(
    bytes: &[u8],
    scale: &[f32],
    xb: &[u16],
    ld: usize,
    table: &[u16; 128],
) -> ([f32; R], usize) {
    let whole = bytes.len() / 32 * 32;
    debug_assert!(ld >= bytes.len() && xb.len() >= (R - 1) * ld + bytes.len());
    debug_assert!(scale.len() >= bytes.len().div_ceil(128));
    // SAFETY: the table reads are 4 x 32 u16 of a 128-entry array; step c reads bytes [c, c + 32)
    // and row r's xb [r ld + c, r ld + c + 32) with c + 32 <= whole <= bytes.len() <= ld.
    unsafe {
        let t: [__m512i; 4] = std::array::from_fn(|i| _mm512_loadu_si512(table.as_ptr().add(32 * i) as *const _));
        let (bit6, sign) = (_mm512_set1_epi16(0x40), _mm512_set1_epi16(0x80));
        let mut tot = [_mm512_setzero_ps(); R];
        let mut acc = [_mm512_setzero_ps(); R];
        for c in (0..whole).step_by(32) {
            let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(bytes.as_ptr().add(c) as *const __m256i));
            // Codes 0..63 from tables 0/1, 64..127 from 2/3 (the index's low 6 bits pick).
            let lo = _mm512_permutex2var_epi16(t[0], v, t[1]);
            let hi = _mm512_permutex2var_epi16(t[2], v, t[3]);
            let mag = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(v, bit6), lo, hi);
            let w = std::mem::transmute::<__m512i, __m512bh>(_mm512_or_si512(
                mag,
                _mm512_slli_epi16(_mm512_and_si512(v, sign), 8),
            ));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_si512(xb.as_ptr().add(r * ld + c) as *const _);
                *acc = _mm512_dpbf16_ps(*acc, w, std::mem::transmute::<__m512i, __m512bh>(x));
            }
            if (c + 32) % 128 == 0 || c + 32 == whole {
                let sc = _mm512_set1_ps(scale[c / 128]);
                for (tot, acc) in tot.iter_mut().zip(acc.iter_mut()) {
                    *tot = _mm512_fmadd_ps(*acc, sc, *tot);
                    *acc = _mm512_setzero_ps();
                }
            }
        }
        (std::array::from_fn(|r| _mm512_reduce_add_ps(tot[r])), whole)
    }
}

/// bf16 bits of the 16 E2M1 codes (sign in bit 3), for `vpermw`; all exact in bf16.
pub fn e2m1_bf16_codes() -> [u16; 32] {
    let mut t = [0u16; 32];
    for (c, v) in t.iter_mut().enumerate().take(16) {
        *v = half::bf16::from_f32(moe_core::quant::codec::E2M1_LUT[c]).to_bits();
    }
    t
}

/// One E2M1 row (MXFP4 group 32 / NVFP4 group 16, f32 scale per group) times one bf16
/// activation vector with `vdpbf16ps`, 64 weights (two 16-byte chunks) a step. Byte l of a
/// chunk at input c0 holds inputs c0 + 2l (low nibble) and c0 + 2l + 1 (high); `xb` holds, for
/// every 64 inputs, the even inputs of both chunks then the odd ones, as bf16 bits. Output lane
/// j of `vdpbf16ps` covers bytes 2j, 2j + 1 of the step, so lanes 0-3 / 4-7 / 8-11 / 12-15 take
/// the scales of inputs c0 / c0 + 16 / c0 + 32 / c0 + 48.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 BF16 must be available; `bytes.len()` is a multiple of 32,
/// `xb` holds `2 * bytes.len()` values, `scale` covers them in groups of `group` (16 or 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
pub unsafe fn e2m1_dot_bf16(bytes: &[u8], scale: &[f32], group: usize, xb: &[u16], table: &[u16; 32]) -> f32 {
    debug_assert!(bytes.len().is_multiple_of(32) && xb.len() >= 2 * bytes.len());
    debug_assert!(group == 16 || group == 32);
    // SAFETY: step m reads bytes [32m, 32m + 32), xb [64m, 64m + 64) and scales
    // [64m / group, 64m / group + 64 / group), all in bounds by the contract.
    unsafe {
        let lut = _mm512_loadu_si512(table.as_ptr() as *const _);
        let fifteen = _mm512_set1_epi16(15);
        // Lane -> scale slot: 4 slots (group 16) or 2 (group 32) per 64 inputs.
        let pick = if group == 16 {
            _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
        } else {
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
        };
        let per = 64 / group;
        let mut tot = _mm512_setzero_ps();
        for m in 0..bytes.len() / 32 {
            let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(bytes.as_ptr().add(32 * m) as *const __m256i));
            let lo = _mm512_permutexvar_epi16(_mm512_and_si512(v, fifteen), lut);
            let hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
            let xp = xb.as_ptr().add(64 * m);
            let xe = _mm512_loadu_si512(xp as *const _);
            let xo = _mm512_loadu_si512(xp.add(32) as *const _);
            let acc = _mm512_dpbf16_ps(
                _mm512_setzero_ps(),
                std::mem::transmute::<__m512i, __m512bh>(lo),
                std::mem::transmute::<__m512i, __m512bh>(xe),
            );
            let acc = _mm512_dpbf16_ps(
                acc,
                std::mem::transmute::<__m512i, __m512bh>(hi),
                std::mem::transmute::<__m512i, __m512bh>(xo),
            );
            let sp = scale.as_ptr().add(m * per);
            let s4 = if per == 4 { _mm_loadu_ps(sp) } else { _mm_castsi128_ps(_mm_loadl_epi64(sp as *const __m128i)) };
            tot = _mm512_fmadd_ps(acc, _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(s4)), tot);
        }
        _mm512_reduce_add_ps(tot)
    }
}

/// One int8 row times `R` bf16 activation rows (`xb`: row r at `r * ld`) with `vdpbf16ps`
/// (int8 values are exact in bf16): per row the unscaled sum over the whole 32-byte steps (the
/// caller applies the row's scale and adds the rest). Each step's codes are widened to bf16 once
/// for all rows, and a row's bits do not depend on `R`. Returns the sums and how many inputs
/// they cover.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 BF16 must be available; `ld >= bytes.len()` and
/// `xb.len() >= (R - 1) * ld + bytes.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
pub unsafe fn int8_dot_bf16_rows<const R: usize>(bytes: &[u8], xb: &[u16], ld: usize) -> ([f32; R], usize) {
    let whole = bytes.len() / 32 * 32;
    debug_assert!(ld >= bytes.len() && xb.len() >= (R - 1) * ld + bytes.len());
    // SAFETY: step c reads bytes [c, c + 32) and row r's xb [r ld + c, r ld + c + 32) with
    // c + 32 <= whole <= bytes.len() <= ld.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        for c in (0..whole).step_by(32) {
            let p = bytes.as_ptr().add(c) as *const __m128i;
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(1))));
            let w = _mm512_cvtne2ps_pbh(hi, lo);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_si512(xb.as_ptr().add(r * ld + c) as *const _);
                *acc = _mm512_dpbf16_ps(*acc, w, std::mem::transmute::<__m512i, __m512bh>(x));
            }
        }
        (std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r])), whole)
    }
}

/// Transposes 16 vectors of 16 words (`r[i]` = lane `i`'s words `0..16`): word `p` of every
/// lane as one vector, returned as element `p`.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &[__m512i; 16]) -> [__m512i; 16] {
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + j], 128-bit lane L: word 4L + j of lanes 4i .. 4i + 4.
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    let mut t = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let c0 = _mm512_shuffle_i32x4::<0x88>(b[j], b[4 + j]);
        let c1 = _mm512_shuffle_i32x4::<0xdd>(b[j], b[4 + j]);
        let c2 = _mm512_shuffle_i32x4::<0x88>(b[8 + j], b[12 + j]);
        let c3 = _mm512_shuffle_i32x4::<0xdd>(b[8 + j], b[12 + j]);
        t[j] = _mm512_shuffle_i32x4::<0x88>(c0, c2);
        t[8 + j] = _mm512_shuffle_i32x4::<0xdd>(c0, c2);
        t[4 + j] = _mm512_shuffle_i32x4::<0x88>(c1, c3);
        t[12 + j] = _mm512_shuffle_i32x4::<0xdd>(c1, c3);
    }
    t
}

/// [`transpose16`], storing word `p` of every lane as 16 consecutive words at `out + p * 32`
/// (the pair-packed panel layout).
///
/// # Safety
/// AVX-512F must be available; `out + p * 32 .. + 16` must be writable for `p < 16`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_store16(r: &[__m512i; 16], out: *mut u32) {
    for (p, v) in transpose16(r).into_iter().enumerate() {
        _mm512_storeu_si512(out.add(p * 32) as *mut _, v);
    }
}

/// int4 panel for 16 lanes: lane `l`'s `16 * steps` bytes at `codes + l * stride` become the
/// bf16 pairs `(lo - z, hi - z)` (exact: small integers) through `tables[z[l]]` (entry `q`: the
/// bf16 bits of `q - z`), stored at `out + p * 32 + l`.
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; every lane's bytes must be readable and
/// `out + p * 32 .. + 16` writable for `p < 16 * steps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn int4_panel16(
    codes: *const u8,
    stride: usize,
    (tables, z): (&[[u16; 32]; 16], &[u8; 16]),
    steps: usize,
    out: *mut u32,
) {
    let nib = _mm512_set1_epi32(0x000F_000F);
    for st in 0..steps {
        let mut r = [_mm512_setzero_si512(); 16];
        for (l, v) in r.iter_mut().enumerate() {
            let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.add(l * stride + 16 * st) as *const _));
            // u16 indices: the low nibble in the even (low) half of each pair, the high one odd.
            // (b << 12) moves bits 4..8 to 16..20; the mask drops everything but the two nibbles.
            let idx = _mm512_and_si512(_mm512_or_si512(b, _mm512_slli_epi32::<12>(b)), nib);
            let t = _mm512_loadu_si512(tables[(z[l] & 15) as usize].as_ptr() as *const _);
            *v = _mm512_permutexvar_epi16(idx, t);
        }
        transpose_store16(&r, out.add(16 * st * 32));
    }
}

/// One-byte-per-input panel for 16 lanes (FP8 with `INT8 = false`, int8 with `true`): lane `l`'s
/// `32 * steps` bytes at `bytes + l * stride` become bf16 pairs (exact: e4m3 through `table`,
/// int8 as integers), stored at `out + p * 32 + l`.
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; every lane's bytes must be readable and
/// `out + p * 32 .. + 16` writable for `p < 16 * steps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn byte_panel16<const INT8: bool>(
    bytes: *const u8,
    stride: usize,
    table: &[u16; 128],
    steps: usize,
    out: *mut u32,
) {
    let t: [__m512i; 4] = std::array::from_fn(|i| _mm512_loadu_si512(table.as_ptr().add(32 * i) as *const _));
    let (bit6, sign) = (_mm512_set1_epi16(0x40), _mm512_set1_epi16(0x80));
    let hi_half = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for st in 0..steps {
        let mut r = [_mm512_setzero_si512(); 16];
        for (l, v) in r.iter_mut().enumerate() {
            let src = _mm256_loadu_si256(bytes.add(l * stride + 32 * st) as *const __m256i);
            *v = if INT8 {
                let w = _mm512_cvtepi8_epi16(src);
                let even = _mm512_cvtepi32_ps(_mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(w)));
                let odd = _mm512_cvtepi32_ps(_mm512_srai_epi32::<16>(w));
                _mm512_or_si512(
                    _mm512_srli_epi32::<16>(_mm512_castps_si512(even)),
                    _mm512_and_si512(_mm512_castps_si512(odd), hi_half),
                )
            } else {
                let w = _mm512_cvtepu8_epi16(src);
                let lo = _mm512_permutex2var_epi16(t[0], w, t[1]);
                let hi = _mm512_permutex2var_epi16(t[2], w, t[3]);
                let mag = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(w, bit6), lo, hi);
                _mm512_or_si512(mag, _mm512_slli_epi16::<8>(_mm512_and_si512(w, sign)))
            };
        }
        transpose_store16(&r, out.add(16 * st * 32));
    }
}

/// E2M1 panel for 16 lanes with the group scales folded in (the caller checked that every
/// `code * scale` is exact in bf16): lane `l`'s `16 * steps` bytes at `codes + l * stride`
/// become the bf16 pairs `(E2M1(lo) * s, E2M1(hi) * s)`, `s` read at `scale + l * sstride`
/// (one per `group` = 16 or 32 inputs), stored at `out + p * 32 + l`.
///
/// # Safety
/// AVX-512F must be available; every lane's bytes and `16 * steps * 2 / group` scales must be
/// readable and `out + p * 32 .. + 16` writable for `p < 16 * steps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn e2m1_panel16(
    codes: *const u8,
    stride: usize,
    (scale, sstride, group): (*const f32, usize, usize),
    steps: usize,
    out: *mut u32,
) {
    let lut = _mm512_loadu_ps(moe_core::quant::codec::E2M1_LUT.as_ptr());
    let lo16 = _mm512_set1_epi32(15);
    let hi_half = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for st in 0..steps {
        let mut r = [_mm512_setzero_si512(); 16];
        for (l, v) in r.iter_mut().enumerate() {
            let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.add(l * stride + 16 * st) as *const _));
            let sc = scale.add(l * sstride);
            // 16 bytes = 32 inputs: one group of 32, or two of 16 (bytes 0..8, 8..16).
            let s = if group == 32 {
                _mm512_set1_ps(*sc.add(st))
            } else {
                _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(*sc.add(2 * st)), _mm512_set1_ps(*sc.add(2 * st + 1)))
            };
            let lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b, lo16), lut), s);
            let hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b), lut), s);
            // Exact products: the upper half is the bf16 value.
            *v = _mm512_or_si512(
                _mm512_srli_epi32::<16>(_mm512_castps_si512(lo)),
                _mm512_and_si512(_mm512_castps_si512(hi), hi_half),
            );
        }
        transpose_store16(&r, out.add(16 * st * 32));
    }
}

/// Code quads a 128-input group of a VNNI panel holds: `panel[q * 32 + l]` is quad `q` of
/// column `l`, four unsigned code bytes that meet the activation quad at byte `4 q` of the
/// group's [`quantize_i8_groups`] bytes.
pub const VNNI_QUADS: usize = 32;

/// 4-bit VNNI panel for 16 columns, one 128-input group: column `l`'s 64 code bytes at
/// `codes + l * stride` (byte `j`: inputs `2 j` low, `2 j + 1` high nibble; only the first
/// `valid` are read, the rest count as code 0) become quad `p` =
/// the low nibbles of its bytes `4 p .. 4 p + 4` (the even inputs `8 p, 8 p + 2, ..`) and quad
/// `16 + p` = their high nibbles (the odd inputs), stored at `out + q * 32 + l`: the order of
/// [`quantize_i8_groups`] (the group's 64 even inputs, then its 64 odd ones). int4 keeps the
/// nibble; E2M1 (`E2M1 = true`) stores `2 x value + 12` (0 ..= 24).
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; `valid <= 64` bytes of every column must be
/// readable and `out + q * 32 .. + 16` writable for `q < 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn nibble_vnni_panel16<const E2M1: bool>(codes: *const u8, stride: usize, valid: usize, out: *mut u32) {
    let mut r = [_mm512_setzero_si512(); 16];
    let mask = bytes_mask(valid);
    for (l, v) in r.iter_mut().enumerate() {
        *v = _mm512_maskz_loadu_epi8(mask, codes.add(l * stride) as *const i8);
    }
    let nib = _mm512_set1_epi8(15);
    let lut = _mm512_broadcast_i32x4(_mm_loadu_si128(E2M1_VNNI.as_ptr() as *const _));
    let code = |v: __m512i| if E2M1 { _mm512_shuffle_epi8(lut, v) } else { v };
    for (p, v) in transpose16(&r).into_iter().enumerate() {
        let (lo, hi) = (_mm512_and_si512(v, nib), _mm512_and_si512(_mm512_srli_epi32::<4>(v), nib));
        _mm512_storeu_si512(out.add(p * 32) as *mut _, code(lo));
        _mm512_storeu_si512(out.add((16 + p) * 32) as *mut _, code(hi));
    }
}

/// The load mask of the first `n` (saturating at 64) bytes of a vector.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bytes_mask(n: usize) -> __mmask64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// E2M1 codes as the integer tiles' unsigned bytes: `2 x value + 12` (values 0, 0.5 .. 6, sign
/// in bit 3).
pub const E2M1_VNNI: [u8; 16] = [12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0];

/// int8 VNNI panel for 16 columns, one 128-input group: column `l`'s 128 signed codes at
/// `q + l * stride` (only the first `valid` are read, the rest count as 0) become quad `p` =
/// its bytes `4 p .. 4 p + 4` plus 128 (unsigned for `vpdpbusd`; the kernel takes the offset
/// back), stored at `out + p * 32 + l`.
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; `valid <= 128` bytes of every column must be
/// readable and `out + p * 32 .. + 16` writable for `p < 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn int8_vnni_panel16(q: *const u8, stride: usize, valid: usize, out: *mut u32) {
    let flip = _mm512_set1_epi8(i8::MIN);
    for half in 0..2 {
        let mut r = [_mm512_setzero_si512(); 16];
        let mask = bytes_mask(valid.saturating_sub(64 * half));
        for (l, v) in r.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_epi8(mask, q.add(l * stride + 64 * half) as *const i8);
        }
        for (p, v) in transpose16(&r).into_iter().enumerate() {
            _mm512_storeu_si512(out.add((16 * half + p) * 32) as *mut _, _mm512_xor_si512(v, flip));
        }
    }
}

/// A VNNI tile's activation rows at one 128-input group, from [`quantize_i8_groups`]: row `m`'s
/// group bytes at `q + m * ldq`, its unit and value sum (`unit x` the group's integer sum) at
/// `unit / xsum + m * ldg`, and the integer sums of its scale sub-groups at `vsum + m * ldv`.
#[derive(Debug, Clone, Copy)]
pub struct VnniTileRows {
    pub q: *const i8,
    pub ldq: usize,
    pub unit: *const f32,
    pub xsum: *const f32,
    pub ldg: usize,
    pub vsum: *const i32,
    pub ldv: usize,
}

/// A panel's per-column factors: `s[t * 32 + l]` for sub-group `t` (int4: the group's scale;
/// int8: the row's scale; E2M1: half the sub-group's scale), `zs[l]` int4's zero * scale.
#[derive(Debug, Clone)]
pub struct TileScales {
    pub s: [f32; 256],
    pub zs: [f32; 32],
}

impl Default for TileScales {
    fn default() -> Self {
        TileScales { s: [0.0; 256], zs: [0.0; 32] }
    }
}

/// One 128-input group of `m` (1 ..= 8) activation rows times a 32-column VNNI panel of `form`
/// with `vpdpbusd`, added into `acc` (`[m][32]` f32). Per row, column and scale sub-group the
/// integer dot `A` (with `split`: `256 x` the first bytes' dot plus the residual bytes', exact
/// in i32) becomes
/// - int4 (codes `q`, `w = s (q - z)`): `acc += s unit A - zs xsum`;
/// - int8 (codes `c + 128`): `acc += s unit (A - 128 V)`;
/// - E2M1 (codes `2 e + 12`, one scale per 32 or 16 inputs): `acc += (s / 2) unit (A - 12 V)`,
///
/// with `V` the sub-group's integer activation sum.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 VNNI must be available; `panel` holds [`VNNI_QUADS`] x 32
/// words; the rows' group bytes ([`i8_group_bytes`]) and sums are readable; `acc` holds
/// `m * 32` values.
#[cfg(target_arch = "x86_64")]
pub unsafe fn vnni_tile(
    (form, split): (super::mats::TileForm, bool),
    m: usize,
    panel: *const u32,
    x: VnniTileRows,
    sc: &TileScales,
    acc: *mut f32,
) {
    use super::mats::TileForm;
    macro_rules! rows {
        ($split:literal, $form:literal, $hq:literal) => {
            match m {
                1 => vnni_tile_as::<1, $split, $form, $hq>(panel, x, sc, acc),
                2 => vnni_tile_as::<2, $split, $form, $hq>(panel, x, sc, acc),
                3 => vnni_tile_as::<3, $split, $form, $hq>(panel, x, sc, acc),
                4 => vnni_tile_as::<4, $split, $form, $hq>(panel, x, sc, acc),
                5 => vnni_tile_as::<5, $split, $form, $hq>(panel, x, sc, acc),
                6 => vnni_tile_as::<6, $split, $form, $hq>(panel, x, sc, acc),
                7 => vnni_tile_as::<7, $split, $form, $hq>(panel, x, sc, acc),
                _ => vnni_tile_as::<8, $split, $form, $hq>(panel, x, sc, acc),
            }
        };
    }
    macro_rules! forms {
        ($split:literal) => {
            match form {
                TileForm::Int4 => rows!($split, 0, 16),
                TileForm::Int8 => rows!($split, 1, 16),
                TileForm::E2m1Group32 => rows!($split, 2, 4),
                TileForm::E2m1Group16 => rows!($split, 2, 2),
            }
        };
    }
    // SAFETY: forwarded contract.
    unsafe {
        if split {
            forms!(true)
        } else {
            forms!(false)
        }
    }
}

/// [`vnni_tile`] for `M` rows, one activation form and one code form (`FORM` 0 int4, 1 int8,
/// 2 E2M1; `HQ` quads of each panel half a scale sub-group spans: 16, or 4 / 2 for E2M1
/// groups of 32 / 16 inputs).
///
/// # Safety
/// As [`vnni_tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
unsafe fn vnni_tile_as<const M: usize, const SPLIT: bool, const FORM: u8, const HQ: usize>(
    panel: *const u32,
    x: VnniTileRows,
    sc: &TileScales,
    acc: *mut f32,
) {
    let offset = if FORM == 1 { 128 } else { 12 };
    // SAFETY: every load is a panel word or a row's group byte, sum or unit, in bounds by the
    // contract; the stores are `acc`'s `M * 32` values.
    unsafe {
        for t in 0..16 / HQ {
            // 2 M accumulators (16 at M = 8) plus the two panel vectors fit the 32 registers.
            let mut a = [[_mm512_setzero_si512(); 2]; M];
            for pass in 0..if SPLIT { 2 } else { 1 } {
                if pass == 1 {
                    // 256 x the first bytes' dot, then the residual bytes' dot on top.
                    for r in a.iter_mut() {
                        r[0] = _mm512_slli_epi32::<8>(r[0]);
                        r[1] = _mm512_slli_epi32::<8>(r[1]);
                    }
                }
                let xq = x.q.add(128 * pass);
                for p in (0..2 * HQ).map(|i| 16 * (i / HQ) + HQ * t + i % HQ) {
                    let w0 = _mm512_loadu_si512(panel.add(p * 32) as *const _);
                    let w1 = _mm512_loadu_si512(panel.add(p * 32 + 16) as *const _);
                    for (m, r) in a.iter_mut().enumerate() {
                        let v = _mm512_set1_epi32((xq.add(m * x.ldq + 4 * p) as *const i32).read_unaligned());
                        r[0] = _mm512_dpbusd_epi32(r[0], w0, v);
                        r[1] = _mm512_dpbusd_epi32(r[1], w1, v);
                    }
                }
            }
            for (m, r) in a.iter().enumerate() {
                let unit = _mm512_set1_ps(*x.unit.add(m * x.ldg));
                for (h, &v) in r.iter().enumerate() {
                    let y = acc.add(m * 32 + 16 * h);
                    let su = _mm512_mul_ps(_mm512_loadu_ps(sc.s.as_ptr().add(32 * t + 16 * h)), unit);
                    let out = if FORM == 0 {
                        let t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), su, _mm512_loadu_ps(y));
                        let xsum = _mm512_set1_ps(*x.xsum.add(m * x.ldg));
                        _mm512_fnmadd_ps(_mm512_loadu_ps(sc.zs.as_ptr().add(16 * h)), xsum, t)
                    } else {
                        // int8: |A| <= 128 x 255 x 32640 < 2^31 and 128 |V| < 2^30; E2M1 far
                        // less: exact.
                        let off = _mm512_set1_epi32(offset * *x.vsum.add(m * x.ldv + t));
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, off)), su, _mm512_loadu_ps(y))
                    };
                    _mm512_storeu_ps(y, out);
                }
            }
        }
    }
}

/// The integer activation sums `V` of the scale sub-groups of one 128-input group of
/// [`quantize_i8_groups`] bytes at `q` (`split`: `256 x` the first bytes' sum plus the residual
/// bytes'): sub-group `t` is quads `hq t .. hq (t + 1)` of both halves (the panel quads it
/// meets), `out[t]` for `t < 16 / hq`.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 VNNI must be available; `q` holds [`i8_group_bytes`] bytes;
/// `hq` is 16, 4 or 2 and `out` holds `16 / hq` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn group_sub_sums(split: bool, hq: usize, q: *const i8, out: &mut [i32]) {
    // SAFETY: the loads are the group's bytes, in bounds by the contract.
    unsafe {
        // Lane l: the sum of quads l and 16 + l (one byte times 1 four times, twice).
        let ones = _mm512_set1_epi8(1);
        let quads = |o: usize| {
            let a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(q.add(o) as *const _));
            _mm512_dpbusd_epi32(a, ones, _mm512_loadu_si512(q.add(o + 64) as *const _))
        };
        let mut v = quads(0);
        if split {
            v = _mm512_add_epi32(_mm512_slli_epi32::<8>(v), quads(128));
        }
        let run = (1u32 << hq) - 1;
        for (t, o) in out.iter_mut().take(16 / hq).enumerate() {
            *o = _mm512_mask_reduce_add_epi32((run << (hq * t)) as u16, v);
        }
    }
}
