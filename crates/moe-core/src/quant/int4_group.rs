//! INT4 weight-only with groups of 128 along the input, symmetric or with zero points:
//! `W[r, c] = (q[r, c] - z[r, g]) * s[r, g]` with `g = c / 128` (or `g_idx[c]` for GPTQ
//! act-order), `z = 8` when symmetric.
//!
//! In-memory parts (`[E, rows, cols]` projection, row-major `(out, in)` so a kernel streams one
//! output row's bytes and its scales together):
//! - `weight_packed`: u8 `[E, rows, cols/2]`, 4-bit codes 0..15, low nibble = even column;
//! - `weight_scale`: f16 `[E, rows, cols/128]` (AWQ and GPTQ store f16 scales);
//! - `weight_zero_point` (optional, absent = symmetric): u8 `[E, rows, cols/128]`, 0..15;
//! - `weight_g_idx` (optional, GPTQ act-order): i32 `[E, cols]`, the group of each input column.
//!
//! Checkpoint packings are converted by [`unpack_awq`] (AutoAWQ GEMM: `qweight` i32
//! `[in, out/8]` with nibble order `[0, 2, 4, 6, 1, 3, 5, 7]`, `qzeros` i32 `[in/g, out/8]`,
//! `scales` f16 `[in/g, out]`) and [`unpack_gptq`] (`qweight` i32 `[in/8, out]`, sequential
//! nibbles along the input, `qzeros` i32 `[in/g, out/8]` stored minus one in the v1 format,
//! `scales` f16 `[in/g, out]`, `g_idx` i32 `[in]`).

use half::f16;

use crate::error::{MoeError, Result};
use crate::quant::checks::{amax, check_divisible, check_expert, check_quantize_input, check_scales, err};
use crate::quant::codec::{pack_nibbles, unpack_nibbles};
use crate::quant::{check_parts, ExpertTensor, PartSpec, QuantFormat, QuantMethod};
use crate::tensor::{DType, HostData, Tensor};

const F: QuantFormat = QuantFormat::Int4Group;

/// INT4 with group-128 scales; `zero_points` picks the quantizer's mode (dequantization and
/// validation accept both).
#[derive(Debug, Clone, Copy, Default)]
pub struct Int4Group {
    /// Quantize with per-group zero points (AWQ style) instead of symmetric (GPTQ `sym=True`).
    pub zero_points: bool,
}

impl Int4Group {
    /// Input columns per scale.
    pub const GROUP_SIZE: usize = 128;
    /// Implicit zero point of the symmetric mode.
    pub const SYMMETRIC_ZERO: u8 = 8;

    /// Symmetric quantizer (no zero-point part).
    pub fn symmetric() -> Self {
        Int4Group { zero_points: false }
    }

    /// Quantizer with zero points.
    pub fn with_zero_points() -> Self {
        Int4Group { zero_points: true }
    }

    fn check_layout(&self, t: &ExpertTensor) -> Result<()> {
        let mut specs = self.part_specs(t.experts, t.rows, t.cols)?;
        let groups = t.cols / Self::GROUP_SIZE;
        if t.parts.contains_key("weight_zero_point") {
            specs.push(PartSpec {
                name: "weight_zero_point",
                dtype: DType::U8,
                shape: vec![t.experts, t.rows, groups],
            });
        }
        if t.parts.contains_key("weight_g_idx") {
            specs.push(PartSpec { name: "weight_g_idx", dtype: DType::I32, shape: vec![t.experts, t.cols] });
        }
        check_parts(t, &specs)
    }
}

fn check_codes(part: &str, v: &[u8]) -> Result<()> {
    if let Some(i) = v.iter().position(|&z| z > 15) {
        return Err(err(F, format!("part `{part}` holds {} at flat index {i}; 4-bit values are 0..=15", v[i])));
    }
    Ok(())
}

fn check_g_idx(g: &[i32], groups: usize) -> Result<()> {
    if let Some(i) = g.iter().position(|&x| x < 0 || x as usize >= groups) {
        return Err(err(F, format!("part `weight_g_idx` maps column {i} to group {}; groups are 0..{groups}", g[i])));
    }
    Ok(())
}

impl QuantMethod for Int4Group {
    fn format(&self) -> QuantFormat {
        F
    }

    fn part_specs(&self, experts: usize, rows: usize, cols: usize) -> Result<Vec<PartSpec>> {
        check_divisible(F, "input features (cols)", cols, Self::GROUP_SIZE)?;
        let groups = cols / Self::GROUP_SIZE;
        let mut v = vec![
            PartSpec { name: "weight_packed", dtype: DType::U8, shape: vec![experts, rows, cols / 2] },
            PartSpec { name: "weight_scale", dtype: DType::F16, shape: vec![experts, rows, groups] },
        ];
        if self.zero_points {
            v.push(PartSpec { name: "weight_zero_point", dtype: DType::U8, shape: vec![experts, rows, groups] });
        }
        Ok(v)
    }

    fn validate(&self, t: &ExpertTensor) -> Result<()> {
        // The quantizer's mode does not constrain loaded tensors: zero points are optional.
        Int4Group::symmetric().check_layout(t)?;
        let s = t.part("weight_scale")?;
        check_scales(F, "weight_scale", &s.to_f32_vec()?, s.shape())?;
        if let Some(z) = t.parts.get("weight_zero_point") {
            check_codes("weight_zero_point", z.as_u8()?)?;
        }
        if let Some(g) = t.parts.get("weight_g_idx") {
            check_g_idx(g.as_i32()?, t.cols / Self::GROUP_SIZE)?;
        }
        Ok(())
    }

    fn dequantize_expert(&self, t: &ExpertTensor, e: usize) -> Result<Vec<f32>> {
        Int4Group::symmetric().check_layout(t)?;
        check_expert(t, e)?;
        let (rows, cols) = (t.rows, t.cols);
        let groups = cols / Self::GROUP_SIZE;
        let q = unpack_nibbles(&t.part("weight_packed")?.as_u8()?[e * rows * cols / 2..(e + 1) * rows * cols / 2]);
        let s = t.part("weight_scale")?.narrow_rows(e, 1)?.to_f32_vec()?;
        check_scales(F, "weight_scale", &s, &[rows, groups])?;
        let z = match t.parts.get("weight_zero_point") {
            Some(z) => z.as_u8()?[e * rows * groups..(e + 1) * rows * groups].to_vec(),
            None => vec![Self::SYMMETRIC_ZERO; rows * groups],
        };
        check_codes("weight_zero_point", &z)?;
        let gi: Vec<usize> = match t.parts.get("weight_g_idx") {
            Some(g) => {
                let g = &g.as_i32()?[e * cols..(e + 1) * cols];
                check_g_idx(g, groups)?;
                g.iter().map(|&x| x as usize).collect()
            }
            None => (0..cols).map(|c| c / Self::GROUP_SIZE).collect(),
        };
        let mut out = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let g = r * groups + gi[c];
                out[r * cols + c] = (q[r * cols + c] as f32 - z[g] as f32) * s[g];
            }
        }
        Ok(out)
    }

    fn quantize(&self, w: &[f32], experts: usize, rows: usize, cols: usize) -> Result<ExpertTensor> {
        check_quantize_input(F, w, experts, rows, cols)?;
        let specs = self.part_specs(experts, rows, cols)?;
        let gs = Self::GROUP_SIZE;
        let ngroups = w.len() / gs;
        let mut codes = vec![0u8; w.len()];
        let mut scales = vec![f16::ZERO; ngroups];
        let mut zeros = vec![Self::SYMMETRIC_ZERO; ngroups];
        for g in 0..ngroups {
            let x = &w[g * gs..(g + 1) * gs];
            let (s, z) = if self.zero_points {
                // AWQ: the group's [min, max] onto 0..15 with an integer zero point.
                let (lo, hi) = x.iter().fold((0.0f32, 0.0f32), |(l, h), &v| (l.min(v), h.max(v)));
                let s = if hi > lo { (hi - lo) / 15.0 } else { 1.0 };
                let s = f16::from_f32(s).to_f32().max(f32::MIN_POSITIVE);
                (s, (-lo / s).round().clamp(0.0, 15.0) as u8)
            } else {
                // GPTQ sym: scale = 2 * amax / 15, zero 8.
                let m = amax(x.iter().copied());
                let s = if m > 0.0 { 2.0 * m / 15.0 } else { 1.0 };
                (f16::from_f32(s).to_f32().max(f32::MIN_POSITIVE), Self::SYMMETRIC_ZERO)
            };
            scales[g] = f16::from_f32(s);
            zeros[g] = z;
            for (c, &v) in codes[g * gs..(g + 1) * gs].iter_mut().zip(x) {
                *c = ((v / s).round() + z as f32).clamp(0.0, 15.0) as u8;
            }
        }
        let mut parts = vec![
            (
                "weight_packed".to_string(),
                Tensor::from_host(specs[0].shape.clone(), HostData::U8(pack_nibbles(&codes)))?,
            ),
            ("weight_scale".to_string(), Tensor::from_host(specs[1].shape.clone(), HostData::F16(scales))?),
        ];
        if self.zero_points {
            parts.push((
                "weight_zero_point".to_string(),
                Tensor::from_host(specs[2].shape.clone(), HostData::U8(zeros))?,
            ));
        }
        Ok(ExpertTensor { format: F, experts, rows, cols, parts: parts.into_iter().collect() })
    }
}

/// One `(out, in)` projection of one expert, unpacked from a checkpoint packing.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Matrix {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Codes `[rows, cols]`, 0..15.
    pub codes: Vec<u8>,
    /// Scales `[rows, cols/128]`.
    pub scales: Vec<f16>,
    /// Zero points `[rows, cols/128]`.
    pub zeros: Vec<u8>,
    /// Group of each input column, when not `c / 128`.
    pub g_idx: Option<Vec<i32>>,
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(err(F, format!("{what} has {got} elements, expected {want}")));
    }
    Ok(())
}

fn check_group(inp: usize, group: usize) -> Result<usize> {
    if group != Int4Group::GROUP_SIZE {
        return Err(err(
            F,
            format!(
                "checkpoint group size {group} is not supported; int4-group uses groups of {}",
                Int4Group::GROUP_SIZE
            ),
        ));
    }
    check_divisible(F, "input features", inp, group)?;
    Ok(inp / group)
}

/// Scales `[in/g, out]` (checkpoint order) -> `[out, in/g]`.
fn transpose_scales(scales: &[f16], groups: usize, out: usize) -> Vec<f16> {
    (0..out * groups).map(|i| scales[(i % groups) * out + i / groups]).collect()
}

/// Zero points packed eight per i32 along the output, nibble `i` holding output
/// `8 * col + order[i]`, `[in/g, out/8]` -> `[out, in/g]`, plus `offset` (GPTQ v1 stores z - 1).
fn unpack_zeros(qzeros: &[i32], groups: usize, out: usize, order: &[usize; 8], offset: u8) -> Vec<u8> {
    let mut z = vec![0u8; out * groups];
    for g in 0..groups {
        for pc in 0..out / 8 {
            let word = qzeros[g * (out / 8) + pc] as u32;
            for (i, &o) in order.iter().enumerate() {
                let v = ((word >> (4 * i)) & 0xF) as u8;
                z[(pc * 8 + o) * groups + g] = (v + offset) & 0xF;
            }
        }
    }
    z
}

/// One packed 4-bit linear as a checkpoint stores it (AWQ or GPTQ tensors of one module).
#[derive(Debug, Clone, Copy)]
pub struct PackedLinear<'a> {
    /// `qweight` as i32 words.
    pub qweight: &'a [i32],
    /// `qzeros` as i32 words.
    pub qzeros: &'a [i32],
    /// `scales`, `[in/g, out]`.
    pub scales: &'a [f16],
    /// GPTQ `g_idx` `[in]`, if stored.
    pub g_idx: Option<&'a [i32]>,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Inputs per group.
    pub group: usize,
}

/// AutoAWQ's nibble order within an i32: nibble `i` holds column `AWQ_ORDER[i]` of its eight.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Unpacks one AutoAWQ (GEMM) linear: `qweight` i32 `[in, out/8]`, `qzeros` i32 `[in/g, out/8]`,
/// `scales` f16 `[in/g, out]`; `W[o, i] = (q - z) * s`.
pub fn unpack_awq(l: &PackedLinear<'_>) -> Result<Int4Matrix> {
    let PackedLinear { qweight, qzeros, scales, in_features, out_features, group, .. } = *l;
    let groups = check_group(in_features, group)?;
    check_divisible(F, "output features (AWQ packs 8 per i32)", out_features, 8)?;
    check_len("AWQ qweight", qweight.len(), in_features * out_features / 8)?;
    check_len("AWQ qzeros", qzeros.len(), groups * out_features / 8)?;
    check_len("AWQ scales", scales.len(), groups * out_features)?;
    let mut codes = vec![0u8; out_features * in_features];
    for i in 0..in_features {
        for pc in 0..out_features / 8 {
            let word = qweight[i * (out_features / 8) + pc] as u32;
            for (n, &o) in AWQ_ORDER.iter().enumerate() {
                codes[(pc * 8 + o) * in_features + i] = ((word >> (4 * n)) & 0xF) as u8;
            }
        }
    }
    Ok(Int4Matrix {
        rows: out_features,
        cols: in_features,
        codes,
        scales: transpose_scales(scales, groups, out_features),
        zeros: unpack_zeros(qzeros, groups, out_features, &AWQ_ORDER, 0),
        g_idx: None,
    })
}

/// Unpacks one GPTQ linear: `qweight` i32 `[in/8, out]` (nibble `n` of row `r` is input
/// `8r + n`), `qzeros` i32 `[in/g, out/8]` (sequential nibbles, stored minus one when
/// `v1_zeros`, the `gptq` checkpoint format; `gptq_v2` stores them as is), `scales` f16
/// `[in/g, out]`, `g_idx` i32 `[in]` (act-order; dropped when it is the trivial `i / g`).
pub fn unpack_gptq(l: &PackedLinear<'_>, v1_zeros: bool) -> Result<Int4Matrix> {
    let PackedLinear { qweight, qzeros, scales, g_idx, in_features, out_features, group } = *l;
    let groups = check_group(in_features, group)?;
    check_divisible(F, "output features (GPTQ packs zeros 8 per i32)", out_features, 8)?;
    check_len("GPTQ qweight", qweight.len(), in_features / 8 * out_features)?;
    check_len("GPTQ qzeros", qzeros.len(), groups * out_features / 8)?;
    check_len("GPTQ scales", scales.len(), groups * out_features)?;
    let mut codes = vec![0u8; out_features * in_features];
    for pr in 0..in_features / 8 {
        for o in 0..out_features {
            let word = qweight[pr * out_features + o] as u32;
            for n in 0..8 {
                codes[o * in_features + pr * 8 + n] = ((word >> (4 * n)) & 0xF) as u8;
            }
        }
    }
    let g_idx = match g_idx {
        None => None,
        Some(g) => {
            check_len("GPTQ g_idx", g.len(), in_features)?;
            check_g_idx(g, groups)?;
            let trivial = g.iter().enumerate().all(|(i, &x)| x as usize == i / group);
            (!trivial).then(|| g.to_vec())
        }
    };
    let seq = [0, 1, 2, 3, 4, 5, 6, 7];
    Ok(Int4Matrix {
        rows: out_features,
        cols: in_features,
        codes,
        scales: transpose_scales(scales, groups, out_features),
        zeros: unpack_zeros(qzeros, groups, out_features, &seq, u8::from(v1_zeros)),
        g_idx,
    })
}

impl Int4Matrix {
    /// Stacks the rows of `parts` (e.g. gate then up) into one projection.
    pub fn concat_rows(parts: &[Int4Matrix]) -> Result<Int4Matrix> {
        let first = parts.first().ok_or_else(|| err(F, "nothing to concatenate"))?;
        let mut out =
            Int4Matrix { rows: 0, cols: first.cols, codes: vec![], scales: vec![], zeros: vec![], g_idx: None };
        out.g_idx = first.g_idx.clone();
        for p in parts {
            if p.cols != first.cols || p.g_idx != first.g_idx {
                return Err(err(
                    F,
                    "cannot fuse projections with different input sizes or different GPTQ act-order g_idx \
                     (re-quantize without desc_act, or load them unfused)",
                ));
            }
            out.rows += p.rows;
            out.codes.extend_from_slice(&p.codes);
            out.scales.extend_from_slice(&p.scales);
            out.zeros.extend_from_slice(&p.zeros);
        }
        Ok(out)
    }

    /// Stacks per-expert matrices into the in-memory `[E, rows, cols]` tensor. Zero points are
    /// dropped when every one is 8 (symmetric); `g_idx` is kept when any expert has one.
    pub fn stack(experts: &[Int4Matrix]) -> Result<ExpertTensor> {
        let first = experts.first().ok_or_else(|| err(F, "no experts to stack"))?;
        let (rows, cols) = (first.rows, first.cols);
        let groups = cols / Int4Group::GROUP_SIZE;
        let n = experts.len();
        let (mut codes, mut scales, mut zeros, mut gidx) = (vec![], vec![], vec![], vec![]);
        for (e, m) in experts.iter().enumerate() {
            if m.rows != rows || m.cols != cols {
                return Err(MoeError::shape(
                    "Int4Matrix::stack",
                    format!("expert {e} as [{rows}, {cols}]"),
                    format!("[{}, {}]", m.rows, m.cols),
                ));
            }
            codes.extend_from_slice(&m.codes);
            scales.extend_from_slice(&m.scales);
            zeros.extend_from_slice(&m.zeros);
            match &m.g_idx {
                Some(g) => gidx.extend_from_slice(g),
                None => gidx.extend((0..cols).map(|c| (c / Int4Group::GROUP_SIZE) as i32)),
            }
        }
        let mut parts = vec![
            (
                "weight_packed".to_string(),
                Tensor::from_host(vec![n, rows, cols / 2], HostData::U8(pack_nibbles(&codes)))?,
            ),
            ("weight_scale".to_string(), Tensor::from_host(vec![n, rows, groups], HostData::F16(scales))?),
        ];
        if zeros.iter().any(|&z| z != Int4Group::SYMMETRIC_ZERO) {
            parts.push((
                "weight_zero_point".to_string(),
                Tensor::from_host(vec![n, rows, groups], HostData::U8(zeros))?,
            ));
        }
        if experts.iter().any(|m| m.g_idx.is_some()) {
            parts.push(("weight_g_idx".to_string(), Tensor::from_i32(vec![n, cols], gidx)?));
        }
        let t = ExpertTensor { format: F, experts: n, rows, cols, parts: parts.into_iter().collect() };
        Int4Group::symmetric().validate(&t)?;
        Ok(t)
    }
}
