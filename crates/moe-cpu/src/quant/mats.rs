//! Quantized expert matrices as the CPU kernels read them: packed codes plus f32 scales, decoded
//! one output row at a time into a small f32 buffer (a few KiB, in L1) right before its dot
//! products. The weights stay packed in memory; nothing is widened ahead of time.
//!
//! Two-code-per-byte formats (int4, MXFP4, NVFP4) decode a 16-byte chunk into its 16 even and
//! then its 16 odd inputs ("pair order"), which keeps the decode loop free of shuffles; the
//! activations are put in the same order once per token ([`QMat::order_input`]), so the dot
//! products are unchanged.

use moe_core::quant::codec::{e8m0_to_f32, E2M1_LUT, E4M3_LUT};
use moe_core::quant::ExpertTensor;
use moe_core::{MoeError, QuantFormat, Result};

use crate::isa::Isa;

/// Inputs per 16-byte chunk of a two-codes-per-byte format.
const CHUNK: usize = 32;

#[derive(Debug, Clone)]
enum Data {
    /// `codes [E, n, k/2]`, `scale`/`zs` (zero * scale)/`zp` (zero) `[E, n, k/128]`:
    /// `w = q * s - zs`.
    Int4 { codes: Vec<u8>, scale: Vec<f32>, zs: Vec<f32>, zp: Vec<u8> },
    /// E2M1 `codes [E, n, k/2]`, `scale [E, n, k/group]` (MXFP4: E8M0; NVFP4: e4m3 * global).
    /// `fold`: every `code * scale` is exact in bf16 (see [`QMat::panel`]).
    E2m1 { codes: Vec<u8>, scale: Vec<f32>, group: usize, fold: bool },
    /// i8 `q [E, n, k]`, `scale [E, n]`; `sums [E, n, k/128]`: each 128-input group's code sum
    /// (for the VNNI decode's unsigned-activation offset), empty when `k % 128 != 0`.
    Int8 { q: Vec<u8>, scale: Vec<f32>, sums: Vec<i32> },
    /// e4m3 `q [E, n, k]`, `scale [E, n, ceil(k/128)]` (per-tensor scales repeated).
    Fp8 { q: Vec<u8>, scale: Vec<f32> },
}

/// A stack of quantized `[n, k]` matrices (one per local expert slot).
#[derive(Debug, Clone)]
pub struct QMat {
    /// Matrices held.
    pub mats: usize,
    /// Output rows.
    pub n: usize,
    /// Inputs.
    pub k: usize,
    data: Data,
    /// GPTQ act-order: per matrix, the input column of each packed position (groups made
    /// contiguous at load), applied to the activations in [`QMat::order_input`].
    perm: Option<Vec<u32>>,
}

/// The integer-dot decode's code forms ([`QMat::vnni_codes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VnniCodes {
    /// Unsigned nibbles with a zero point a group, inputs in pair order.
    Int4,
    /// Signed bytes with a scale a row, inputs in natural order.
    Int8,
}

impl VnniCodes {
    /// Writes `x` (natural order, a multiple of 128 values) in the order whose
    /// `simd::quantize_i8_groups` output these codes' dot takes.
    pub fn order_input(self, x: impl Fn(usize) -> f32, out: &mut [f32]) {
        match self {
            VnniCodes::Int4 => pair_order(x, out),
            VnniCodes::Int8 => super::simd::int8_vnni_order(x, out),
        }
    }
}

/// The integer tiles' code forms ([`QMat::tile_form`]): which unsigned bytes a VNNI panel holds
/// and how each 128-input group splits into sub-groups of one scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileForm {
    /// int4 nibbles `q` (pair order), one scale and zero point a group.
    Int4,
    /// int8 codes plus 128 (natural order), one scale a row.
    Int8,
    /// E2M1 codes as `2 x value + 12` (pair order), one scale per 32 inputs (MXFP4).
    E2m1Group32,
    /// As [`TileForm::E2m1Group32`], one scale per 16 inputs (NVFP4).
    E2m1Group16,
}

impl TileForm {
    /// Panel quads of each half (even and odd inputs) a scale sub-group spans.
    pub fn half_quads(self) -> usize {
        match self {
            TileForm::Int4 | TileForm::Int8 => 16,
            TileForm::E2m1Group32 => 4,
            TileForm::E2m1Group16 => 2,
        }
    }

    /// Rows an expert from which the integer tiles beat this form's register paths (measured on
    /// qwen3-30b-a3b at T = 32 / 64, docs/perf/quant.md "Session 21"): int4 5 (its VNNI register
    /// rows are fast), int8 2 (its register rows widen to bf16), E2M1 3.
    pub fn tile_rows(self) -> usize {
        match self {
            TileForm::Int4 => 5,
            TileForm::Int8 => 2,
            TileForm::E2m1Group32 | TileForm::E2m1Group16 => 3,
        }
    }

    /// Scale sub-groups a 128-input group holds.
    pub fn subs(self) -> usize {
        16 / self.half_quads()
    }

    /// Writes `x` (the matrix's input order, `k` values) into `out` (`k` rounded up to a
    /// multiple of 128, the rest zeros) in the order whose `simd::quantize_i8_groups` bytes a
    /// panel of this form meets quad for quad.
    pub fn order_input(self, x: &[f32], out: &mut [f32]) {
        let k = x.len();
        debug_assert!(out.len() == k.div_ceil(128) * 128);
        match self {
            // The 4-bit codes' pair order is what the quantizer takes, with one exception: a
            // short last chunk (NVFP4 with k % 32 == 16) holds its `h` even then its `h` odd
            // inputs, where a whole chunk's odd inputs start at 16.
            TileForm::Int4 | TileForm::E2m1Group32 | TileForm::E2m1Group16 => {
                out[..k].copy_from_slice(x);
                out[k..].fill(0.0);
                let (c0, h) = (k - k % CHUNK, k % CHUNK / 2);
                if h > 0 {
                    out.copy_within(c0 + h..c0 + 2 * h, c0 + 16);
                    out[c0 + h..c0 + 16].fill(0.0);
                }
            }
            TileForm::Int8 => super::simd::int8_vnni_order(|j| if j < k { x[j] } else { 0.0 }, out),
        }
    }
}

/// `x` (natural order, `out.len()` values) in the pair order of the two-codes-per-byte formats:
/// per 32-input chunk (a shorter last one too), its even inputs, then its odd ones.
#[inline(always)]
fn pair_order(x: impl Fn(usize) -> f32, out: &mut [f32]) {
    let k = out.len();
    for c0 in (0..k).step_by(CHUNK) {
        let half = CHUNK.min(k - c0) / 2;
        for l in 0..half {
            out[c0 + l] = x(c0 + 2 * l);
            out[c0 + half + l] = x(c0 + 2 * l + 1);
        }
    }
}

/// Consecutive rows of one matrix as the integer-dot decode reads them ([`QMat::vnni_rows`]).
#[derive(Debug, Clone, Copy)]
pub enum VnniRows<'a> {
    /// `64 g` code bytes, `g` scales and `g` zero * scale values a row.
    Int4 { codes: &'a [u8], scale: &'a [f32], zs: &'a [f32] },
    /// `128 g` code bytes, one scale and `g` group code sums a row.
    Int8 { q: &'a [u8], scale: &'a [f32], sums: &'a [i32] },
}

impl<'a> VnniRows<'a> {
    /// The rows' code bytes (to prefetch).
    pub fn bytes(&self) -> &'a [u8] {
        match self {
            VnniRows::Int4 { codes, .. } => codes,
            VnniRows::Int8 { q, .. } => q,
        }
    }

    /// Row `i` alone (`g` groups a row).
    pub fn row(&self, i: usize, g: usize) -> VnniRows<'a> {
        match *self {
            VnniRows::Int4 { codes, scale, zs } => VnniRows::Int4 {
                codes: &codes[i * 64 * g..(i + 1) * 64 * g],
                scale: &scale[i * g..(i + 1) * g],
                zs: &zs[i * g..(i + 1) * g],
            },
            VnniRows::Int8 { q, scale, sums } => VnniRows::Int8 {
                q: &q[i * 128 * g..(i + 1) * 128 * g],
                scale: &scale[i..i + 1],
                sums: &sums[i * g..(i + 1) * g],
            },
        }
    }

    /// The first `N` rows' dots with one activation row of
    /// `simd::quantize_i8_groups` (`g = unit.len()` groups, in [`VnniCodes::order_input`]'s
    /// order for these codes).
    ///
    /// # Safety
    /// AVX-512F, AVX-512BW and AVX-512 VNNI must be available; the rows hold at least `N` rows of
    /// `g` groups; `xq` holds `i8_group_bytes(split) * g` bytes, `xsum` `g` values.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub unsafe fn dot<const N: usize>(&self, split: bool, xq: &[i8], unit: &[f32], xsum: &[f32]) -> [f32; N] {
        // SAFETY: forwarded contract.
        unsafe {
            match *self {
                VnniRows::Int4 { codes, scale, zs } => {
                    super::simd::int4_dot_rows_vnni::<N>(split, codes, scale, zs, xq, unit, xsum)
                }
                VnniRows::Int8 { q, scale, sums } => {
                    super::simd::int8_dot_rows_vnni::<N>(split, q, scale, sums, xq, unit)
                }
            }
        }
    }
}

fn f32_part(t: &ExpertTensor, name: &str) -> Result<Vec<f32>> {
    t.part(name)?.to_f32_vec()
}

fn u8_part(t: &ExpertTensor, name: &str) -> Result<Vec<u8>> {
    Ok(t.part(name)?.as_u8()?.to_vec())
}

impl QMat {
    /// Packs a validated quantized tensor.
    pub fn from_tensor(t: &ExpertTensor) -> Result<QMat> {
        moe_core::quant::quant_method(t.format, moe_core::DType::F32)?.validate(t)?;
        let (e, n, k) = (t.experts, t.rows, t.cols);
        let mut perm = None;
        let data = match t.format {
            QuantFormat::Int4Group => {
                let groups = k / 128;
                let mut codes = u8_part(t, "weight_packed")?;
                let scale = f32_part(t, "weight_scale")?;
                let zeros = match t.parts.get("weight_zero_point") {
                    Some(z) => z.as_u8()?.to_vec(),
                    None => vec![8; e * n * groups],
                };
                if let Some(g) = t.parts.get("weight_g_idx") {
                    let (c, p) = group_contiguous(&codes, g.as_i32()?, e, n, k)?;
                    codes = c;
                    perm = Some(p);
                }
                let zs = scale.iter().zip(&zeros).map(|(s, &z)| s * z as f32).collect();
                Data::Int4 { codes, scale, zs, zp: zeros }
            }
            QuantFormat::Mxfp4 => {
                let scale: Vec<f32> = u8_part(t, "scales")?.into_iter().map(e8m0_to_f32).collect();
                let fold = scale.iter().all(|&s| folds_exactly(s));
                Data::E2m1 { codes: u8_part(t, "blocks")?, scale, group: 32, fold }
            }
            QuantFormat::Nvfp4 => {
                let g = f32_part(t, "weight_scale_2")?;
                let per = n * k / 16;
                let scale: Vec<f32> = u8_part(t, "weight_scale")?
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| E4M3_LUT[b as usize] * g[i / per])
                    .collect();
                let fold = scale.iter().all(|&s| folds_exactly(s));
                Data::E2m1 { codes: u8_part(t, "weight")?, scale, group: 16, fold }
            }
            QuantFormat::Int8Channel => {
                let q = u8_part(t, "weight")?;
                let sums = if k % 128 == 0 {
                    q.chunks_exact(128).map(|g| g.iter().map(|&b| b as i8 as i32).sum()).collect()
                } else {
                    Vec::new()
                };
                Data::Int8 { q, scale: f32_part(t, "weight_scale")?, sums }
            }
            QuantFormat::Fp8Block => {
                let s = f32_part(t, "weight_scale_inv")?;
                let (rb, cb) = (n.div_ceil(128), k.div_ceil(128));
                let scale =
                    (0..e * n * cb).map(|i| s[((i / (n * cb)) * rb + (i / cb) % n / 128) * cb + i % cb]).collect();
                Data::Fp8 { q: u8_part(t, "weight")?, scale }
            }
            QuantFormat::Fp8Tensor => {
                let s = f32_part(t, "weight_scale")?;
                let cb = k.div_ceil(128);
                Data::Fp8 { q: u8_part(t, "weight")?, scale: (0..e * n * cb).map(|i| s[i / (n * cb)]).collect() }
            }
            QuantFormat::None => {
                return Err(MoeError::quant("none", "unquantized weights use the cpu backend's dense kernels"))
            }
        };
        Ok(QMat { mats: e, n, k, data, perm })
    }

    /// Bytes of packed weights and scales.
    pub fn bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        let p = self.perm.as_ref().map_or(0, |p| p.len() * 4);
        p + match &self.data {
            Data::Int4 { codes, scale, zs, zp } => codes.len() + zp.len() + (scale.len() + zs.len()) * f,
            Data::E2m1 { codes, scale, .. } => codes.len() + scale.len() * f,
            Data::Int8 { q, scale, sums } => q.len() + (scale.len() + sums.len()) * f,
            Data::Fp8 { q, scale } => q.len() + scale.len() * f,
        }
    }

    /// Overwrites matrix `slot` with matrix `src` of `other` (same format and shape).
    pub fn copy_from(&mut self, slot: usize, other: &QMat, src: usize) -> Result<()> {
        fn put<T: Copy>(d: &mut [T], s: &[T], slot: usize, src: usize, per: usize) {
            d[slot * per..(slot + 1) * per].copy_from_slice(&s[src * per..(src + 1) * per]);
        }
        let (n, k) = (self.n, self.k);
        if other.n != n
            || other.k != k
            || slot >= self.mats
            || src >= other.mats
            || self.perm.is_some() != other.perm.is_some()
        {
            return Err(MoeError::shape(
                "cpu.replace_slot",
                format!("[{n}, {k}] slot < {}", self.mats),
                format!("[{}, {}]", other.n, other.k),
            ));
        }
        if let (Some(d), Some(s)) = (self.perm.as_mut(), other.perm.as_ref()) {
            put(d, s, slot, src, k);
        }
        match (&mut self.data, &other.data) {
            (Data::Int4 { codes, scale, zs, zp }, Data::Int4 { codes: c2, scale: s2, zs: z2, zp: p2 }) => {
                put(codes, c2, slot, src, n * k / 2);
                put(scale, s2, slot, src, n * k / 128);
                put(zs, z2, slot, src, n * k / 128);
                put(zp, p2, slot, src, n * k / 128);
            }
            (Data::E2m1 { codes, scale, group, fold }, Data::E2m1 { codes: c2, scale: s2, fold: f2, .. }) => {
                let g = *group;
                *fold &= *f2;
                put(codes, c2, slot, src, n * k / 2);
                put(scale, s2, slot, src, n * k / g);
            }
            (Data::Int8 { q, scale, sums }, Data::Int8 { q: q2, scale: s2, sums: u2 }) => {
                put(q, q2, slot, src, n * k);
                put(scale, s2, slot, src, n);
                if !sums.is_empty() {
                    put(sums, u2, slot, src, n * k / 128);
                }
            }
            (Data::Fp8 { q, scale }, Data::Fp8 { q: q2, scale: s2 }) => {
                put(q, q2, slot, src, n * k);
                put(scale, s2, slot, src, n * k.div_ceil(128));
            }
            _ => return Err(MoeError::quant("cpu", "migration source and destination formats differ")),
        }
        Ok(())
    }

    /// Whether decoded rows come out in pair order.
    fn pairs(&self) -> bool {
        matches!(self.data, Data::Int4 { .. } | Data::E2m1 { .. })
    }

    /// Writes activation row `x` (`k` values) for matrix `m` in the order decoded rows use.
    #[inline(always)]
    pub fn order_input(&self, m: usize, x: &[f32], out: &mut [f32]) {
        debug_assert!(out.len() >= self.k);
        let k = self.k;
        let perm = self.perm.as_ref().map(|p| &p[m * k..(m + 1) * k]);
        let at = |j: usize| perm.map_or(x[j], |p| x[p[j] as usize]);
        if !self.pairs() {
            for (j, o) in out[..k].iter_mut().enumerate() {
                *o = at(j);
            }
            return;
        }
        pair_order(at, &mut out[..k]);
    }

    /// Whether [`QMat::order_input`] is the identity (no act-order permutation, no pair order).
    pub fn natural_input(&self) -> bool {
        self.perm.is_none() && !self.pairs()
    }

    /// Row `r` of matrix `m` of an int4 stack: codes, scales and zero * scale per group.
    #[inline(always)]
    pub fn int4_row(&self, m: usize, r: usize) -> Option<(&[u8], &[f32], &[f32])> {
        self.int4_rows(m, r, 1)
    }

    /// Rows `r .. r + n` of matrix `m` of an int4 stack, one after another in each part; `None`
    /// for other formats or rows past the matrix.
    #[inline(always)]
    pub fn int4_rows(&self, m: usize, r: usize, n: usize) -> Option<(&[u8], &[f32], &[f32])> {
        match &self.data {
            Data::Int4 { codes, scale, zs, .. } if r + n <= self.n => {
                let (row, k, g) = (m * self.n + r, self.k, self.k / 128);
                Some((
                    codes.get(row * k / 2..(row + n) * k / 2)?,
                    scale.get(row * g..(row + n) * g)?,
                    zs.get(row * g..(row + n) * g)?,
                ))
            }
            _ => None,
        }
    }

    /// The integer-dot decode this stack can take (AVX-512 VNNI, int8 activations in 128-input
    /// groups): int4 without an act-order permutation, and int8 with whole groups.
    pub fn vnni_codes(&self) -> Option<VnniCodes> {
        match &self.data {
            Data::Int4 { .. } if self.perm.is_none() => Some(VnniCodes::Int4),
            Data::Int8 { sums, .. } if !sums.is_empty() => Some(VnniCodes::Int8),
            _ => None,
        }
    }

    /// Rows `r .. r + n` of matrix `m` as [`QMat::vnni_codes`] reads them; `None` for other
    /// stacks or rows past the matrix.
    #[inline(always)]
    pub fn vnni_rows(&self, m: usize, r: usize, n: usize) -> Option<VnniRows<'_>> {
        if r + n > self.n {
            return None;
        }
        let (row, k, g) = (m * self.n + r, self.k, self.k / 128);
        match &self.data {
            Data::Int4 { codes, scale, zs, .. } if self.perm.is_none() => Some(VnniRows::Int4 {
                codes: codes.get(row * k / 2..(row + n) * k / 2)?,
                scale: scale.get(row * g..(row + n) * g)?,
                zs: zs.get(row * g..(row + n) * g)?,
            }),
            Data::Int8 { q, scale, sums } if !sums.is_empty() => Some(VnniRows::Int8 {
                q: q.get(row * k..(row + n) * k)?,
                scale: scale.get(row..row + n)?,
                sums: sums.get(row * g..(row + n) * g)?,
            }),
            _ => None,
        }
    }

    /// Row `r` of matrix `m` of an FP8 stack: its e4m3 bytes and block scales (one per 128
    /// inputs); `None` for other formats.
    pub fn fp8_row(&self, m: usize, r: usize) -> Option<(&[u8], &[f32])> {
        match &self.data {
            Data::Fp8 { q, scale } => {
                let (row, k) = (m * self.n + r, self.k);
                let cb = k.div_ceil(128);
                Some((&q[row * k..(row + 1) * k], &scale[row * cb..(row + 1) * cb]))
            }
            _ => None,
        }
    }

    /// Row `r` of matrix `m` of an int8 stack: its signed bytes and the row's scale; `None` for
    /// other formats.
    pub fn int8_row(&self, m: usize, r: usize) -> Option<(&[u8], f32)> {
        match &self.data {
            Data::Int8 { q, scale, .. } => {
                let (row, k) = (m * self.n + r, self.k);
                Some((&q[row * k..(row + 1) * k], scale[row]))
            }
            _ => None,
        }
    }

    /// Row `r` of matrix `m` of an E2M1 stack (MXFP4 / NVFP4): its packed bytes, per-group f32
    /// scales and the group size; `None` for other formats or with a GPTQ-style permutation.
    pub fn e2m1_row(&self, m: usize, r: usize) -> Option<(&[u8], &[f32], usize)> {
        match &self.data {
            Data::E2m1 { codes, scale, group, .. } if self.perm.is_none() => {
                let (row, k) = (m * self.n + r, self.k);
                let per = k / group;
                Some((&codes[row * k / 2..(row + 1) * k / 2], &scale[row * per..(row + 1) * per], *group))
            }
            _ => None,
        }
    }

    /// Rows an expert from which the dense tile on dequantized panels beats this format's
    /// register paths (measured on qwen3-30b-a3b, docs/perf/quant.md "Session 4" and, for int4,
    /// "Session 13 (CPU)"): 5 for every format whose panels decode with vector ops. E2M1 whose
    /// scales do not fold (NVFP4 with an arbitrary global scale) never: 16-input panels with a
    /// scalar decode measured 3.4x slower than the row path.
    pub fn tile_rows(&self) -> usize {
        match self.data {
            Data::E2m1 { fold: false, .. } => usize::MAX,
            _ => 5,
        }
    }

    /// Inputs per panel of [`QMat::panel`] (even): the span over which each output row's scale
    /// is one number (int4 and FP8: 128; E2M1 without folding: the group), else 256.
    pub fn panel_k(&self) -> usize {
        match &self.data {
            Data::Int4 { .. } | Data::Fp8 { .. } => 128,
            Data::E2m1 { group, fold: false, .. } => *group,
            Data::E2m1 { fold: true, .. } | Data::Int8 { .. } => 256,
        }
    }

    /// Writes rows `r0 .. r0 + lanes` (`lanes <= 32`) of matrix `m`, inputs `k0 .. k0 + len`
    /// (`k0` a multiple of [`QMat::panel_k`], `len` up to it), into the pair-packed bf16 block
    /// layout of the dense kernels (`out[p * 32 + l]` = inputs `k0 + 2p`, `k0 + 2p + 1` of lane
    /// `l`, the even one in the low half; an odd tail pairs with 0), in packed-position order
    /// (not the pair order of [`QMat::order_input`]: see [`QMat::natural_bf16`]). `scale[l]` gets
    /// the factor that lane's dot over the panel is multiplied by.
    ///
    /// The bf16 values are exact, so the panel dot differs from the reference's dequantized dot
    /// only by f32 summation order: int4 stores `q - z` (|q - z| <= 15) and scales by `s` per
    /// 128-input group; FP8 stores the e4m3 value (3 mantissa bits) and scales per 128-block;
    /// int8 stores `q` and scales per row; E2M1 stores `code * scale` when every group scale
    /// makes that exact (at most 6 significant bits, normal range: MXFP4's powers of two, NVFP4
    /// with such scales), else the code, scaled per group.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // lane `l` indexes the rows, the panel and `scale`
    pub fn panel(
        &self,
        m: usize,
        r0: usize,
        lanes: usize,
        (k0, len): (usize, usize),
        out: &mut [u32],
        scale: &mut [f32; 32],
    ) {
        let (n, k) = (self.n, self.k);
        let pairs = len.div_ceil(2);
        let out = &mut out[..pairs * 32];
        match &self.data {
            Data::Int4 { codes, scale: s, zp, .. } => {
                let lut = int4_pairs();
                let (g, gi) = (k / 128, k0 / 128);
                let mut simd_lanes = 0;
                #[cfg(target_arch = "x86_64")]
                if pairs == 64 && std::arch::is_x86_feature_detected!("avx512bw") {
                    for l0 in (0..lanes / 16 * 16).step_by(16) {
                        let row0 = m * n + r0 + l0;
                        let z: [u8; 16] = std::array::from_fn(|l| zp[(row0 + l) * g + gi]);
                        // SAFETY: AVX-512F/BW are available (checked above and by the caller's
                        // `DotBf16`); lanes `l0 .. l0 + 16` are rows of this matrix, each with the
                        // panel's 64 bytes at stride k / 2; `out` holds 64 pairs x 32 lanes.
                        unsafe {
                            let c = codes.as_ptr().add(row0 * k / 2 + k0 / 2);
                            super::simd::int4_panel16(c, k / 2, (int4_tables(), &z), 4, out.as_mut_ptr().add(l0))
                        }
                    }
                    simd_lanes = lanes / 16 * 16;
                }
                for l in 0..simd_lanes {
                    scale[l] = s[(m * n + r0 + l) * g + gi];
                }
                for l in simd_lanes..lanes {
                    let row = m * n + r0 + l;
                    let t = &lut[(zp[row * g + gi] & 15) as usize];
                    let b = &codes[row * k / 2 + k0 / 2..row * k / 2 + k0 / 2 + pairs];
                    for (p, &b) in b.iter().enumerate() {
                        out[p * 32 + l] = t[b as usize];
                    }
                    scale[l] = s[row * g + gi];
                }
            }
            Data::Fp8 { q, scale: s } => {
                let lut = e4m3_bf16();
                let cb = k.div_ceil(128);
                let done = byte_panel::<false>(q, (m * n + r0, k), lanes, (k0, len), out);
                for l in 0..lanes {
                    let row = m * n + r0 + l;
                    let b = &q[row * k + k0 + done..row * k + k0 + len];
                    pairs_of_bytes(b, |v| lut[v as usize], &mut out[done / 2 * 32..], l);
                    scale[l] = s[row * cb + k0 / 128];
                }
            }
            Data::Int8 { q, scale: s, .. } => {
                let done = byte_panel::<true>(q, (m * n + r0, k), lanes, (k0, len), out);
                for l in 0..lanes {
                    let row = m * n + r0 + l;
                    let b = &q[row * k + k0 + done..row * k + k0 + len];
                    let f = |v: u8| half::bf16::from_f32(v as i8 as f32).to_bits();
                    pairs_of_bytes(b, f, &mut out[done / 2 * 32..], l);
                    scale[l] = s[row];
                }
            }
            Data::E2m1 { codes, scale: s, group, fold } => {
                let per = k / group;
                #[cfg(target_arch = "x86_64")]
                if *fold && lanes == 32 && len.is_multiple_of(32) && matches!(group, 16 | 32) {
                    for l0 in [0, 16] {
                        let row0 = m * n + r0 + l0;
                        // SAFETY: AVX-512F is available (the caller's `DotBf16`); lanes `l0 ..
                        // l0 + 16` are rows with the panel's `len / 2` bytes at stride k / 2 and
                        // its `len / group` scales at stride k / group; `out` holds `len / 2`
                        // pairs x 32 lanes.
                        unsafe {
                            let c = codes.as_ptr().add(row0 * k / 2 + k0 / 2);
                            let sc = (s.as_ptr().add(row0 * per + k0 / group), per, *group);
                            super::simd::e2m1_panel16(c, k / 2, sc, len / 32, out.as_mut_ptr().add(l0))
                        }
                    }
                    scale.fill(1.0);
                    return;
                }
                for l in 0..lanes {
                    let row = m * n + r0 + l;
                    let b = &codes[row * k / 2 + k0 / 2..row * k / 2 + k0 / 2 + pairs];
                    for (gi, b) in b.chunks(group / 2).enumerate() {
                        let sg = s[row * per + k0 / group + gi];
                        let f = if *fold { sg } else { 1.0 };
                        let t: [u16; 16] = std::array::from_fn(|c| half::bf16::from_f32(E2M1_LUT[c] * f).to_bits());
                        let p0 = gi * group / 2;
                        for (p, &b) in b.iter().enumerate() {
                            out[(p0 + p) * 32 + l] = t[(b & 15) as usize] as u32 | (t[(b >> 4) as usize] as u32) << 16;
                        }
                    }
                    scale[l] = if *fold { 1.0 } else { s[row * per + k0 / group] };
                }
            }
        }
    }

    /// The integer tiles' code form of this stack (`quant::itiles`): int4 without an act-order
    /// permutation, int8 and E2M1 (a last activation group shorter than 128 inputs is padded
    /// with zeros); `None` for FP8.
    pub fn tile_form(&self) -> Option<TileForm> {
        if self.perm.is_some() {
            return None;
        }
        match &self.data {
            Data::Int4 { .. } => Some(TileForm::Int4),
            Data::Int8 { .. } => Some(TileForm::Int8),
            Data::E2m1 { group: 32, .. } => Some(TileForm::E2m1Group32),
            Data::E2m1 { group: 16, .. } => Some(TileForm::E2m1Group16),
            _ => None,
        }
    }

    /// Writes columns `r0 .. r0 + lanes` (`lanes <= 32`) of matrix `m` at 128-input group `gi` as
    /// a VNNI panel (`simd::VNNI_QUADS` quads x 32 columns of unsigned code bytes, see
    /// [`TileForm`]; columns past `lanes` are zero, as are the inputs past `k` of a last, shorter
    /// group: code 0 and scale 0) and its per-column factors (`simd::TileScales`) for a stack
    /// with a [`QMat::tile_form`], and prefetches the next group's codes. False (nothing
    /// written) for other stacks or columns / groups outside the matrix.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub fn vnni_panel(
        &self,
        m: usize,
        (r0, lanes): (usize, usize),
        gi: usize,
        out: &mut [u32],
        sc: &mut super::simd::TileScales,
    ) -> bool {
        const QUADS: usize = super::simd::VNNI_QUADS;
        let (n, k, g) = (self.n, self.k, self.k.div_ceil(128));
        let out = &mut out[..QUADS * 32];
        let Some(form) = self.tile_form() else { return false };
        if lanes > 32 || r0 + lanes > n || gi * 128 >= k {
            return false;
        }
        let len = (k - gi * 128).min(128);
        let simd = std::arch::is_x86_feature_detected!("avx512bw");
        let (bytes, row_bytes, group_bytes, valid) = match &self.data {
            Data::Int4 { codes, .. } | Data::E2m1 { codes, .. } => (codes, k / 2, 64, len / 2),
            Data::Int8 { q, .. } => (q, k, 128, len),
            Data::Fp8 { .. } => return false,
        };
        let mut done = 0;
        while simd && done + 16 <= lanes {
            let first = (m * n + r0 + done) * row_bytes + gi * group_bytes;
            for l in 0..16 {
                super::prefetch_l1(bytes.as_ptr().wrapping_add(first + l * row_bytes + group_bytes), group_bytes);
            }
            // SAFETY: AVX-512F/BW were detected; columns done .. done + 16 are rows of this
            // matrix, each with the group's `valid` bytes at stride `row_bytes`; `out` holds
            // QUADS x 32 words.
            unsafe {
                let (src, dst) = (bytes.as_ptr().add(first), out.as_mut_ptr().add(done));
                match form {
                    TileForm::Int4 => super::simd::nibble_vnni_panel16::<false>(src, row_bytes, valid, dst),
                    TileForm::Int8 => super::simd::int8_vnni_panel16(src, row_bytes, valid, dst),
                    TileForm::E2m1Group32 | TileForm::E2m1Group16 => {
                        super::simd::nibble_vnni_panel16::<true>(src, row_bytes, valid, dst)
                    }
                }
            }
            done += 16;
        }
        let nibble = |v: u8| match form {
            TileForm::Int4 => v,
            _ => super::simd::E2M1_VNNI[v as usize],
        };
        for l in done..32 {
            let row = m * n + r0 + l;
            let b = (l < lanes).then(|| &bytes[row * row_bytes + gi * group_bytes..][..valid]);
            // Byte j of the column's group, 0 past the matrix's inputs.
            let at = |b: &[u8], j: usize| b.get(j).copied().unwrap_or(0);
            for p in 0..QUADS {
                let word: [u8; 4] = match (b, form) {
                    (None, _) => [0; 4],
                    (Some(b), TileForm::Int8) => std::array::from_fn(|i| at(b, 4 * p + i) ^ 0x80),
                    (Some(b), _) => std::array::from_fn(|i| {
                        let v = at(b, 4 * (p % 16) + i);
                        nibble(if p < 16 { v & 15 } else { v >> 4 })
                    }),
                };
                out[p * 32 + l] = u32::from_le_bytes(word);
            }
        }
        let subs = form.subs();
        for l in 0..32 {
            let row = m * n + r0 + l.min(lanes.saturating_sub(1));
            match &self.data {
                Data::Int4 { scale, zs, .. } => (sc.s[l], sc.zs[l]) = (scale[row * g + gi], zs[row * g + gi]),
                Data::Int8 { scale, .. } => sc.s[l] = scale[row],
                Data::E2m1 { scale, group, .. } => {
                    // Sub-groups past the matrix's inputs hold zero codes and scale 0.
                    let per = k / group;
                    for t in 0..subs {
                        let j = gi * subs + t;
                        sc.s[32 * t + l] = if j < per { 0.5 * scale[row * per + j] } else { 0.0 };
                    }
                }
                Data::Fp8 { .. } => return false,
            }
        }
        true
    }

    /// Activation row `x` in [`QMat::order_input`]'s order as bf16 bits in packed-position order
    /// (the order of [`QMat::panel`]), padded with zeros to `out.len()`.
    pub fn natural_bf16(&self, x: &[f32], out: &mut [u16]) {
        let k = self.k;
        let b = |v: f32| half::bf16::from_f32(v).to_bits();
        if self.pairs() {
            for c0 in (0..k).step_by(CHUNK) {
                let half = CHUNK.min(k - c0) / 2;
                for l in 0..half {
                    out[c0 + 2 * l] = b(x[c0 + l]);
                    out[c0 + 2 * l + 1] = b(x[c0 + half + l]);
                }
            }
        } else {
            for (o, &v) in out.iter_mut().zip(&x[..k]) {
                *o = b(v);
            }
        }
        out[k..].iter_mut().for_each(|v| *v = 0);
    }

    /// [`QMat::decode_row`] with the SIMD decoders of `isa` (4-bit formats and FP8).
    ///
    /// `isa` must be available on this CPU (the caller checked it with [`Isa::available`]).
    #[inline(always)]
    pub fn decode_row_isa(&self, isa: Isa, m: usize, r: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            let (n, k) = (self.n, self.k);
            let row = m * n + r;
            let wide = matches!(isa, Isa::Avx512Bf16 | Isa::Avx512);
            match &self.data {
                Data::Int4 { codes, scale, zs, .. } if isa != Isa::Portable => {
                    let g = k / 128;
                    let bytes = &codes[row * k / 2..(row + 1) * k / 2];
                    for gi in 0..g {
                        let (b, o) = (&bytes[gi * 64..(gi + 1) * 64], &mut out[gi * 128..(gi + 1) * 128]);
                        let (s, z) = (scale[row * g + gi], zs[row * g + gi]);
                        if wide {
                            // SAFETY: AVX-512 was detected (caller contract); 64 bytes -> 128 values.
                            unsafe { super::simd::int4_avx512(b, s, z, o) }
                        } else {
                            // SAFETY: AVX2 and FMA were detected (caller contract); same sizes.
                            unsafe { super::simd::int4_avx2(b, s, z, o) }
                        }
                    }
                    return;
                }
                Data::E2m1 { codes, scale, group, .. } if isa != Isa::Portable && k.is_multiple_of(CHUNK) => {
                    let per = k / group;
                    let bytes = &codes[row * k / 2..(row + 1) * k / 2];
                    let sc = &scale[row * per..(row + 1) * per];
                    if wide {
                        // SAFETY: AVX-512 was detected (caller contract); one whole row: k/2 bytes
                        // -> k values, `sc` holds its k / group scales.
                        unsafe { super::simd::e2m1_row_avx512(bytes, sc, *group, &mut out[..k]) }
                        return;
                    }
                    for c0 in (0..k).step_by(CHUNK) {
                        let (s0, s1) = (sc[c0 / group], sc[(c0 + 16) / group]);
                        let (b, o) = (&bytes[c0 / 2..c0 / 2 + 16], &mut out[c0..c0 + CHUNK]);
                        // SAFETY: AVX2 was detected (caller contract); 16 bytes -> 32 values.
                        unsafe { super::simd::e2m1_chunk_avx2(b, s0, s1, o) }
                    }
                    return;
                }
                Data::Fp8 { q, scale } if isa != Isa::Portable => {
                    let cb = k.div_ceil(128);
                    let (bytes, sc) = (&q[row * k..(row + 1) * k], &scale[row * cb..(row + 1) * cb]);
                    let done = if wide {
                        // SAFETY: AVX-512 was detected (caller contract); `out` holds k values and
                        // `sc` the row's ceil(k / 128) block scales.
                        unsafe { super::simd::e4m3_row_avx512(bytes, sc, out) }
                    } else {
                        // SAFETY: AVX2 was detected (caller contract); the same sizes.
                        unsafe { super::simd::e4m3_row_avx2(bytes, sc, out) }
                    };
                    for c in done..k {
                        out[c] = E4M3_LUT[bytes[c] as usize] * sc[c / 128];
                    }
                    return;
                }
                _ => {}
            }
        }
        let _ = isa;
        self.decode_row(m, r, out)
    }

    /// Decodes row `r` of matrix `m` into `out[..k]` (in the order of [`QMat::order_input`]).
    #[inline(always)]
    pub fn decode_row(&self, m: usize, r: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        let row = m * n + r;
        let out = &mut out[..k];
        match &self.data {
            Data::Int4 { codes, scale, zs, .. } => {
                let g = k / 128;
                let bytes = &codes[row * k / 2..(row + 1) * k / 2];
                for gi in 0..g {
                    let (s, z) = (scale[row * g + gi], zs[row * g + gi]);
                    let b = &bytes[gi * 64..(gi + 1) * 64];
                    let o = &mut out[gi * 128..(gi + 1) * 128];
                    for (cb, co) in b.chunks_exact(16).zip(o.chunks_exact_mut(32)) {
                        // Fixed-size views: no bounds checks, so the loop vectorizes.
                        let cb: &[u8; 16] = cb.try_into().expect("16-byte chunk");
                        let co: &mut [f32; 32] = co.try_into().expect("32-value chunk");
                        for l in 0..16 {
                            co[l] = (cb[l] & 15) as f32 * s - z;
                            co[16 + l] = (cb[l] >> 4) as f32 * s - z;
                        }
                    }
                }
            }
            Data::E2m1 { codes, scale, group, .. } => {
                let per = k / group;
                let bytes = &codes[row * k / 2..(row + 1) * k / 2];
                let sc = &scale[row * per..(row + 1) * per];
                for c0 in (0..k).step_by(CHUNK) {
                    let len = CHUNK.min(k - c0);
                    let half = len / 2;
                    let b = &bytes[c0 / 2..c0 / 2 + half];
                    for l in 0..half {
                        let s = sc[(c0 + 2 * l) / group];
                        out[c0 + l] = E2M1_LUT[(b[l] & 15) as usize] * s;
                        out[c0 + half + l] = E2M1_LUT[(b[l] >> 4) as usize] * s;
                    }
                }
            }
            Data::Int8 { q, scale, .. } => {
                let s = scale[row];
                for (o, &b) in out.iter_mut().zip(&q[row * k..(row + 1) * k]) {
                    *o = (b as i8) as f32 * s;
                }
            }
            Data::Fp8 { q, scale } => {
                let cb = k.div_ceil(128);
                let sc = &scale[row * cb..(row + 1) * cb];
                for (c0, (o, b)) in out.chunks_mut(128).zip(q[row * k..(row + 1) * k].chunks(128)).enumerate() {
                    let s = sc[c0];
                    for (o, &b) in o.iter_mut().zip(b) {
                        *o = E4M3_LUT[b as usize] * s;
                    }
                }
            }
        }
    }
}

/// Whether `code * s` is exact in bf16 for every E2M1 code: `s` has at most 6 significant bits
/// (E2M1 magnitudes have at most 2) and the products stay normal.
fn folds_exactly(s: f32) -> bool {
    s == 0.0 || (s.is_normal() && s.to_bits() & 0x3_FFFF == 0 && (2f32.powi(-120)..2f32.powi(120)).contains(&s.abs()))
}

/// `pairs_of_bytes`: lane `l` of a panel from one byte per input (FP8, int8).
#[inline(always)]
fn pairs_of_bytes(b: &[u8], f: impl Fn(u8) -> u16, out: &mut [u32], l: usize) {
    let mut it = b.chunks_exact(2);
    for (p, c) in it.by_ref().enumerate() {
        out[p * 32 + l] = f(c[0]) as u32 | (f(c[1]) as u32) << 16;
    }
    if let [last] = it.remainder() {
        out[b.len() / 2 * 32 + l] = f(*last) as u32;
    }
}

/// The SIMD part of a one-byte-per-input panel (rows from `row0`, `k` bytes a row): whole
/// 32-input steps of whole 16-lane groups, when AVX-512BW is there. Returns the inputs done for
/// every lane (0: the caller decodes everything, or only the ragged tail).
#[inline(always)]
fn byte_panel<const INT8: bool>(
    q: &[u8],
    (row0, k): (usize, usize),
    lanes: usize,
    (k0, len): (usize, usize),
    out: &mut [u32],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if lanes == 32 && len >= 32 && std::arch::is_x86_feature_detected!("avx512bw") {
        let steps = len / 32;
        let table = e4m3_magnitudes();
        for l0 in [0, 16] {
            // SAFETY: AVX-512F/BW are available (checked above; AVX-512F by the caller's
            // `DotBf16`); lanes `l0 .. l0 + 16` are rows with `k0 + 32 * steps <= k` bytes each;
            // `out` holds `len / 2` pairs x 32 lanes.
            unsafe {
                let b = q.as_ptr().add((row0 + l0) * k + k0);
                super::simd::byte_panel16::<INT8>(b, k, table, steps, out.as_mut_ptr().add(l0))
            }
        }
        return steps * 32;
    }
    let _ = (q, row0, k, lanes, k0, len, out);
    0
}

/// e4m3 magnitude code (0..128) -> bf16 bits.
fn e4m3_magnitudes() -> &'static [u16; 128] {
    static T: std::sync::OnceLock<[u16; 128]> = std::sync::OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|b| half::bf16::from_f32(E4M3_LUT[b]).to_bits()))
}

/// Per zero point, per byte: the bf16 pair `(lo - z, hi - z)`.
fn int4_pairs() -> &'static [[u32; 256]; 16] {
    static T: std::sync::OnceLock<Box<[[u32; 256]; 16]>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let v = |q: u8, z: usize| half::bf16::from_f32(q as f32 - z as f32).to_bits() as u32;
        Box::new(std::array::from_fn(|z| std::array::from_fn(|b| v(b as u8 & 15, z) | v(b as u8 >> 4, z) << 16)))
    })
}

/// Per zero point `z`: the bf16 bits of `q - z` for `q < 16` (then 16 unused entries).
fn int4_tables() -> &'static [[u16; 32]; 16] {
    static T: std::sync::OnceLock<[[u16; 32]; 16]> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        std::array::from_fn(|z| std::array::from_fn(|q| half::bf16::from_f32(q as f32 - z as f32).to_bits()))
    })
}

/// e4m3 byte -> bf16 bits (exact; NaN codes stay NaN).
fn e4m3_bf16() -> &'static [u16; 256] {
    static T: std::sync::OnceLock<[u16; 256]> = std::sync::OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|b| half::bf16::from_f32(E4M3_LUT[b]).to_bits()))
}

/// GPTQ act-order: reorders each matrix's input columns so every group of 128 is contiguous
/// (`g_idx` assigns exactly 128 columns to each group). Returns the new codes and, per matrix,
/// the original column of every new position.
fn group_contiguous(codes: &[u8], g_idx: &[i32], e: usize, n: usize, k: usize) -> Result<(Vec<u8>, Vec<u32>)> {
    let mut out = vec![0u8; codes.len()];
    let mut perm = Vec::with_capacity(e * k);
    for m in 0..e {
        let g = &g_idx[m * k..(m + 1) * k];
        let mut p: Vec<u32> = (0..k as u32).collect();
        p.sort_by_key(|&c| g[c as usize]);
        for (j, &c) in p.iter().enumerate() {
            if g[c as usize] as usize != j / 128 {
                return Err(MoeError::quant(
                    "int4-group",
                    format!("weight_g_idx of expert {m} does not give every group exactly 128 columns"),
                ));
            }
        }
        for r in 0..n {
            let src = &codes[(m * n + r) * k / 2..(m * n + r + 1) * k / 2];
            let dst = &mut out[(m * n + r) * k / 2..(m * n + r + 1) * k / 2];
            for (j, &c) in p.iter().enumerate() {
                let c = c as usize;
                let v = if c.is_multiple_of(2) { src[c / 2] & 15 } else { src[c / 2] >> 4 };
                dst[j / 2] |= if j.is_multiple_of(2) { v } else { v << 4 };
            }
        }
        perm.extend(p);
    }
    Ok((out, perm))
}

/// `sum a[i] * b[i]` with 64 lanes of independent accumulators (vectorizes without reassociation).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; 64];
    let main = n / 64 * 64;
    for (ca, cb) in a[..main].chunks_exact(64).zip(b[..main].chunks_exact(64)) {
        let ca: &[f32; 64] = ca.try_into().expect("64-value chunk");
        let cb: &[f32; 64] = cb.try_into().expect("64-value chunk");
        for l in 0..64 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut tail = 0.0f32;
    for i in main..n {
        tail += a[i] * b[i];
    }
    let mut s = [0.0f32; 16];
    for (l, v) in acc.iter().enumerate() {
        s[l % 16] += v;
    }
    s.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_core::quant::{quant_method, Int4Group, QuantMethod};
    use moe_core::DType;

    #[test]
    fn decoded_rows_dot_like_the_reference_for_every_format() {
        let (e, n, k) = (2, 3, 256);
        let w: Vec<f32> = (0..e * n * k).map(|i| ((i * 7919 % 211) as f32 - 105.0) * 1e-3).collect();
        let x: Vec<f32> = (0..k).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1).collect();
        for f in QuantFormat::ALL.into_iter().filter(|f| *f != QuantFormat::None) {
            let m = quant_method(f, DType::F32).unwrap();
            let methods: Vec<Box<dyn moe_core::quant::QuantMethod>> = if f == QuantFormat::Int4Group {
                vec![Box::new(Int4Group::symmetric()), Box::new(Int4Group::with_zero_points())]
            } else {
                vec![m]
            };
            for m in methods {
                let t = m.quantize(&w, e, n, k).unwrap();
                let q = QMat::from_tensor(&t).unwrap();
                let (mut xo, mut row) = (vec![0.0; k], vec![0.0; k]);
                for ex in 0..e {
                    let d = m.dequantize_expert(&t, ex).unwrap();
                    q.order_input(ex, &x, &mut xo);
                    for r in 0..n {
                        q.decode_row(ex, r, &mut row);
                        let want: f32 = d[r * k..(r + 1) * k].iter().zip(&x).map(|(a, b)| a * b).sum();
                        let got = dot(&row, &xo);
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{f} expert {ex} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn panels_dot_like_decoded_rows_for_every_format() {
        // 40 rows: a full 32-lane block (SIMD panels where available) and a partial one (scalar).
        // k: int4 256 (two groups), E2M1 160 (partial 256-panel / 16-input groups), FP8 200 and
        // int8 131 (ragged and odd last panels).
        let n = 40;
        let methods: Vec<(Box<dyn QuantMethod>, usize)> = vec![
            (Box::new(Int4Group::symmetric()), 256),
            (Box::new(Int4Group::with_zero_points()), 256),
            (quant_method(QuantFormat::Mxfp4, DType::F32).unwrap(), 160),
            (quant_method(QuantFormat::Nvfp4, DType::F32).unwrap(), 160),
            (quant_method(QuantFormat::Int8Channel, DType::F32).unwrap(), 131),
            (quant_method(QuantFormat::Fp8Block, DType::F32).unwrap(), 200),
            (quant_method(QuantFormat::Fp8Tensor, DType::F32).unwrap(), 131),
        ];
        for (m, k) in methods {
            let w: Vec<f32> = (0..2 * n * k).map(|i| ((i * 7919 % 211) as f32 - 105.0) * 1e-3).collect();
            let x: Vec<f32> =
                (0..k).map(|i| half::bf16::from_f32(((i * 31 % 17) as f32 - 8.0) * 0.1).to_f32()).collect();
            let t = m.quantize(&w, 2, n, k).unwrap();
            let q = QMat::from_tensor(&t).unwrap();
            let (mut xo, mut row) = (vec![0.0; k], vec![0.0; k]);
            q.order_input(1, &x, &mut xo);
            let kp = k.div_ceil(2) * 2;
            let mut xb = vec![0x7FC0u16; kp];
            q.natural_bf16(&xo, &mut xb);
            let kc = q.panel_k();
            let mut panel = vec![u32::MAX; kc.div_ceil(2) * 32];
            let mut sc = [f32::NAN; 32];
            for b0 in [0, 32] {
                let lanes = (n - b0).min(32);
                let mut got = [0.0f64; 32];
                for k0 in (0..k).step_by(kc) {
                    let len = kc.min(k - k0);
                    q.panel(1, b0, lanes, (k0, len), &mut panel, &mut sc);
                    for (l, g) in got.iter_mut().enumerate().take(lanes) {
                        let mut part = 0.0f64;
                        for p in 0..len.div_ceil(2) {
                            let v = panel[p * 32 + l];
                            for (h, bits) in [(0, v as u16), (1, (v >> 16) as u16)] {
                                let xv = half::bf16::from_bits(xb[k0 + 2 * p + h]).to_f32();
                                part += half::bf16::from_bits(bits).to_f32() as f64 * xv as f64;
                            }
                        }
                        *g += part * sc[l] as f64;
                    }
                }
                for (l, g) in got.iter().enumerate().take(lanes) {
                    q.decode_row(1, b0 + l, &mut row);
                    let want = dot(&row, &xo) as f64;
                    let norm: f64 = row.iter().zip(&xo).map(|(a, b)| (a * b).abs() as f64).sum();
                    assert!(
                        (g - want).abs() <= 1e-5 * (norm + 1e-6),
                        "{} k={k} row {}: {g} vs {want}",
                        m.format(),
                        b0 + l
                    );
                }
            }
        }
    }

    #[test]
    fn simd_fp8_rows_equal_the_table_decode_bit_for_bit() {
        // Every byte value (NaN codes and subnormals included), scales spanning 2^-20 .. 2^10,
        // rows with a partial last 128-block and a tail shorter than one SIMD step.
        for k in [256usize, 200, 131] {
            let (e, n) = (1, 3);
            let q: Vec<u8> = (0..e * n * k).map(|i| (i * 37 % 256) as u8).collect();
            let cb = k.div_ceil(128);
            let scale: Vec<f32> = (0..e * n * cb).map(|i| 2f32.powi(i as i32 * 7 % 31 - 20) * 1.37).collect();
            let m = QMat { mats: e, n, k, data: Data::Fp8 { q, scale }, perm: None };
            for isa in [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2] {
                if !isa.available() {
                    continue;
                }
                for r in 0..n {
                    let (mut want, mut got) = (vec![0.0f32; k], vec![0.0f32; k]);
                    m.decode_row(0, r, &mut want);
                    m.decode_row_isa(isa, 0, r, &mut got);
                    for c in 0..k {
                        let same = want[c].to_bits() == got[c].to_bits() || want[c].is_nan() && got[c].is_nan();
                        assert!(same, "{isa:?} k={k} row {r} col {c}: {} vs {}", got[c], want[c]);
                    }
                }
            }
        }
    }

    /// `k` activations exactly representable in bf16, as f32 and as bf16 bits.
    #[cfg(target_arch = "x86_64")]
    fn bf16_activations(k: usize) -> (Vec<f32>, Vec<u16>) {
        let x: Vec<f32> = (0..k).map(|i| half::bf16::from_f32(((i * 29 % 23) as f32 - 11.0) * 0.37).to_f32()).collect();
        let xb = x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        (x, xb)
    }

    /// `got` equals the f64 sum of `term(0..k)` within 1e-6 of the sum of magnitudes.
    #[cfg(target_arch = "x86_64")]
    fn assert_exact_dot(got: f32, k: usize, term: impl Fn(usize) -> f64) {
        let want: f64 = (0..k).map(&term).sum();
        let norm: f64 = (0..k).map(|i| term(i).abs()).sum();
        assert!((got as f64 - want).abs() <= 1e-6 * norm, "k={k}: {got} vs {want}");
    }

    #[test]
    fn fp8_bf16_dot_matches_the_exact_dot() {
        #[cfg(target_arch = "x86_64")]
        {
            if !Isa::Avx512Bf16.available() {
                return;
            }
            let table = super::super::simd::e4m3_bf16_magnitudes();
            for k in [256usize, 200, 131, 32] {
                // Every finite code (subnormals included; NaN codes 0x7F / 0xFF skipped).
                let q: Vec<u8> =
                    (0..k).map(|i| (i * 53 % 256) as u8).map(|b| if b & 0x7F == 0x7F { 1 } else { b }).collect();
                let sc: Vec<f32> = (0..k.div_ceil(128)).map(|b| 0.013 * (b + 1) as f32).collect();
                let (x, xb) = bf16_activations(k);
                // SAFETY: AVX-512 BF16 was detected above; the slices are one row of k inputs.
                let ([mut got], done) = unsafe { super::super::simd::e4m3_dot_bf16_rows::<1>(&q, &sc, &xb, k, &table) };
                for i in done..k {
                    got += E4M3_LUT[q[i] as usize] * sc[i / 128] * x[i];
                }
                assert_exact_dot(got, k, |i| E4M3_LUT[q[i] as usize] as f64 * sc[i / 128] as f64 * x[i] as f64);
                // Three activation rows at once (the second and third are the first reversed and
                // negated): each row's bits as one row at a time.
                let rev: Vec<u16> = xb.iter().rev().copied().collect();
                let neg: Vec<u16> = xb.iter().map(|b| b ^ 0x8000).collect();
                let rows: Vec<u16> = [&xb[..], &rev[..], &neg[..]].concat();
                // SAFETY: as above; `rows` holds three rows of k.
                let (three, _) = unsafe { super::super::simd::e4m3_dot_bf16_rows::<3>(&q, &sc, &rows, k, &table) };
                for (r, x) in [&xb, &rev, &neg].into_iter().enumerate() {
                    // SAFETY: as above.
                    let ([one], _) = unsafe { super::super::simd::e4m3_dot_bf16_rows::<1>(&q, &sc, x, k, &table) };
                    assert_eq!(three[r].to_bits(), one.to_bits(), "k={k} row {r}");
                }
            }
        }
    }

    #[test]
    fn int4_bf16_dot_matches_the_exact_dot() {
        #[cfg(target_arch = "x86_64")]
        {
            if !Isa::Avx512Bf16.available() {
                return;
            }
            let (g, k) = (3usize, 384usize);
            // Byte j of a 32-byte chunk: low nibble input 2j, high nibble input 2j + 1 of its 64.
            let bytes: Vec<u8> = (0..k / 2).map(|i| (i * 37 % 256) as u8).collect();
            let q = |i: usize| (bytes[i / 2] >> (4 * (i % 2))) & 15;
            let (sc, zero) = ([0.021f32, 0.5, 3.0e-3], [8.0f32, 0.0, 3.0]);
            let zs: Vec<f32> = (0..g).map(|gi| sc[gi] * zero[gi]).collect();
            let (x, _) = bf16_activations(k);
            // The kernel's order: per 64 inputs, the 32 even then the 32 odd ones.
            let xb: Vec<u16> = (0..k)
                .map(|i| {
                    let (base, l) = (i / 64 * 64, i % 64);
                    let src = if l < 32 { base + 2 * l } else { base + 2 * (l - 32) + 1 };
                    half::bf16::from_f32(x[src]).to_bits()
                })
                .collect();
            let xsum: Vec<f32> = (0..g).map(|gi| x[gi * 128..(gi + 1) * 128].iter().sum()).collect();
            // SAFETY: AVX-512 BF16 was detected above; the slices are one row of `g` groups.
            let got = unsafe { super::super::simd::int4_dot_bf16(&bytes, &sc, &zs, &xb, &xsum) };
            assert_exact_dot(got, k, |i| sc[i / 128] as f64 * (q(i) as f64 - zero[i / 128] as f64) * x[i] as f64);
        }
    }

    #[test]
    fn int8_bf16_dot_matches_the_exact_dot() {
        #[cfg(target_arch = "x86_64")]
        {
            if !Isa::Avx512Bf16.available() {
                return;
            }
            for k in [256usize, 200, 31] {
                let q: Vec<u8> = (0..k).map(|i| (i * 53 % 256) as u8).collect();
                let (x, xb) = bf16_activations(k);
                // SAFETY: AVX-512 BF16 was detected above; the slices are one row of k inputs.
                let ([mut got], done) = unsafe { super::super::simd::int8_dot_bf16_rows::<1>(&q, &xb, k) };
                for i in done..k {
                    got += (q[i] as i8) as f32 * x[i];
                }
                assert_exact_dot(got, k, |i| (q[i] as i8) as f64 * x[i] as f64);
                // Two activation rows at once: each row's bits as one row at a time.
                let neg: Vec<u16> = xb.iter().map(|b| b ^ 0x8000).collect();
                let rows: Vec<u16> = [&xb[..], &neg[..]].concat();
                // SAFETY: as above; `rows` holds two rows of k.
                let (two, _) = unsafe { super::super::simd::int8_dot_bf16_rows::<2>(&q, &rows, k) };
                for (r, x) in [&xb, &neg].into_iter().enumerate() {
                    // SAFETY: as above.
                    let ([one], _) = unsafe { super::super::simd::int8_dot_bf16_rows::<1>(&q, x, k) };
                    assert_eq!(two[r].to_bits(), one.to_bits(), "k={k} row {r}");
                }
            }
        }
    }

    #[test]
    fn e2m1_bf16_dot_matches_the_decoded_dot() {
        #[cfg(target_arch = "x86_64")]
        {
            if !Isa::Avx512Bf16.available() {
                return;
            }
            let table = super::super::simd::e2m1_bf16_codes();
            let (e, n, k) = (1, 4, 384);
            let w: Vec<f32> = (0..e * n * k).map(|i| ((i * 7919 % 211) as f32 - 105.0) * 1e-3).collect();
            // bf16 activations, then put in the matrix's pair order as the engine does.
            let x: Vec<f32> =
                (0..k).map(|i| half::bf16::from_f32(((i * 31 % 17) as f32 - 8.0) * 0.1).to_f32()).collect();
            for f in [QuantFormat::Mxfp4, QuantFormat::Nvfp4] {
                let t = quant_method(f, DType::F32).unwrap().quantize(&w, e, n, k).unwrap();
                let q = QMat::from_tensor(&t).unwrap();
                let (mut xo, mut row) = (vec![0.0; k], vec![0.0; k]);
                q.order_input(0, &x, &mut xo);
                let mut xb = vec![0u16; k];
                for m in 0..k / 64 {
                    for (c, (chunk, odd)) in [(0usize, 0usize), (1, 0), (0, 1), (1, 1)].into_iter().enumerate() {
                        for l in 0..16 {
                            let v = xo[64 * m + 32 * chunk + 16 * odd + l];
                            xb[64 * m + 16 * c + l] = half::bf16::from_f32(v).to_bits();
                        }
                    }
                }
                for r in 0..n {
                    q.decode_row(0, r, &mut row);
                    let want = dot(&row, &xo);
                    let (bytes, sc, group) = q.e2m1_row(0, r).unwrap();
                    // SAFETY: AVX-512 BF16 was detected above; k is a multiple of 64.
                    let got = unsafe { super::super::simd::e2m1_dot_bf16(bytes, sc, group, &xb, &table) };
                    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{f} row {r}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn act_order_columns_are_regrouped_exactly() {
        let (e, n, k) = (1, 2, 256);
        let w: Vec<f32> = (0..e * n * k).map(|i| ((i * 13 % 29) as f32 - 14.0) * 1e-2).collect();
        let mut t = Int4Group::with_zero_points().quantize(&w, e, n, k).unwrap();
        // A g_idx that interleaves the two groups; the codes/scales keep their meaning.
        let g: Vec<i32> = (0..k).map(|c| (c % 2) as i32).collect();
        t.parts.insert("weight_g_idx".into(), moe_core::Tensor::from_i32(vec![1, k], g).unwrap());
        let d = Int4Group::symmetric().dequantize_expert(&t, 0).unwrap();
        let q = QMat::from_tensor(&t).unwrap();
        let x: Vec<f32> = (0..k).map(|i| (i % 7) as f32 - 3.0).collect();
        let (mut xo, mut row) = (vec![0.0; k], vec![0.0; k]);
        q.order_input(0, &x, &mut xo);
        for r in 0..n {
            q.decode_row(0, r, &mut row);
            let want: f32 = d[r * k..(r + 1) * k].iter().zip(&x).map(|(a, b)| a * b).sum();
            assert!((dot(&row, &xo) - want).abs() < 1e-3, "row {r}");
        }
    }
}
