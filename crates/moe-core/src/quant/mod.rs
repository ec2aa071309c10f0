//! Weight formats. A [`QuantMethod`] owns one format's on-disk/in-memory layout, its scales, a
//! quantizer (for quantize-at-load) and the dequantize reference every backend is checked against.
//!
//! Expert weights of every format travel in one container, [`ExpertTensor`]: a logical
//! `[experts, rows, cols]` projection (nn.Linear `(out, in)` order) stored as named parts whose
//! leading dimension is the expert. `weight` for unquantized formats; `weight` + `weight_scale_inv`
//! for FP8 block; `blocks` + `scales` for MXFP4; and so on. Because every part is indexed by expert
//! first, selecting, replicating or migrating experts (EP, EPLB) is format-independent.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{MoeError, Result};
use crate::tensor::{DType, HostData, Tensor};

pub mod activation;
mod checks;
pub mod codec;
pub mod fp8_block;
pub mod fp8_tensor;
pub mod int4_group;
pub mod int8_channel;
pub mod mxfp4;
pub mod nvfp4;
mod report;
mod unquantized;

pub use fp8_block::Fp8Block;
pub use fp8_tensor::Fp8Tensor;
pub use int4_group::Int4Group;
pub use int8_channel::Int8Channel;
pub use mxfp4::Mxfp4;
pub use nvfp4::Nvfp4;
pub use report::{quantize_block, quantize_reported, QuantReport};
pub use unquantized::Unquantized;

/// Expert weight formats, by name. Behaviour lives in the [`QuantMethod`] for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuantFormat {
    /// Unquantized weights in the config's `weight_dtype`.
    #[default]
    None,
    /// float8_e4m3fn weights with an fp32 `weight_scale_inv` per 128x128 block (DeepSeek-V3).
    Fp8Block,
    /// float8_e4m3fn weights with one fp32 scale per expert projection.
    Fp8Tensor,
    /// E2M1 pairs with an E8M0 scale per 32 values (GPT-OSS).
    Mxfp4,
    /// E2M1 pairs with an E4M3 scale per 16 values and an fp32 global scale (ModelOpt).
    Nvfp4,
    /// 4-bit weight-only, groups of 128 along the input, with scales and optional zero points.
    Int4Group,
    /// 8-bit weight-only, one scale per output channel.
    Int8Channel,
}

impl QuantFormat {
    /// Every format, for the capability table.
    pub const ALL: [QuantFormat; 7] = [
        QuantFormat::None,
        QuantFormat::Fp8Block,
        QuantFormat::Fp8Tensor,
        QuantFormat::Mxfp4,
        QuantFormat::Nvfp4,
        QuantFormat::Int4Group,
        QuantFormat::Int8Channel,
    ];

    /// The CLI / table name.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::None => "none",
            QuantFormat::Fp8Block => "fp8-block",
            QuantFormat::Fp8Tensor => "fp8-tensor",
            QuantFormat::Mxfp4 => "mxfp4",
            QuantFormat::Nvfp4 => "nvfp4",
            QuantFormat::Int4Group => "int4-group",
            QuantFormat::Int8Channel => "int8-channel",
        }
    }

    /// Parses a CLI name.
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|f| f.name()).collect();
            MoeError::config("quant", format!("unknown quant format `{s}`; one of {}", names.join(", ")))
        })
    }

    /// Values per scale along the input dimension, where the format has such groups.
    pub fn group_size(self) -> Option<usize> {
        match self {
            QuantFormat::Mxfp4 => Some(32),
            QuantFormat::Nvfp4 => Some(16),
            QuantFormat::Int4Group => Some(128),
            _ => None,
        }
    }

    /// Rejects hidden/intermediate sizes the format cannot pack.
    pub fn validate_shape(self, hidden: usize, intermediate: usize) -> Result<()> {
        if let Some(g) = self.group_size() {
            for (name, v) in [("hidden_size", hidden), ("intermediate_size", intermediate)] {
                if !v.is_multiple_of(g) {
                    return Err(MoeError::config(
                        "quant",
                        format!(
                            "{} packs groups of {g} along the input; {name} = {v} is not a multiple of {g}",
                            self.name()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One stored part of a quantized projection: its name, dtype and full shape (experts first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSpec {
    /// Part name, e.g. `weight` or `weight_scale_inv`.
    pub name: &'static str,
    /// Storage dtype.
    pub dtype: DType,
    /// Full shape, `[experts, ...]`.
    pub shape: Vec<usize>,
}

/// A `[experts, rows, cols]` projection in some format, stored as named parts (experts first).
#[derive(Debug, Clone)]
pub struct ExpertTensor {
    /// The format of the parts.
    pub format: QuantFormat,
    /// Leading (expert or slot) dimension.
    pub experts: usize,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The stored parts by name.
    pub parts: BTreeMap<String, Tensor>,
}

impl ExpertTensor {
    /// A part by name, or an error naming the missing part.
    pub fn part(&self, name: &str) -> Result<&Tensor> {
        self.parts.get(name).ok_or_else(|| {
            MoeError::quant(self.format.name(), format!("missing part `{name}` (have: {:?})", self.parts.keys()))
        })
    }

    /// A new tensor holding experts `ids` (in that order, repeats allowed) of every part.
    /// This is how EP slices local experts and EPLB builds replicas: scales travel with weights.
    pub fn select_experts(&self, ids: &[usize]) -> Result<ExpertTensor> {
        let mut parts = BTreeMap::new();
        for (name, t) in &self.parts {
            parts.insert(name.clone(), select_rows(t, ids, self.experts)?);
        }
        Ok(ExpertTensor { format: self.format, experts: ids.len(), rows: self.rows, cols: self.cols, parts })
    }

    /// Overwrites expert slot `dst` of every part with expert `src` of `from` (same format/shape).
    pub fn copy_expert_from(&mut self, dst: usize, from: &ExpertTensor, src: usize) -> Result<()> {
        if from.format != self.format || from.rows != self.rows || from.cols != self.cols {
            return Err(MoeError::quant(
                self.format.name(),
                format!(
                    "cannot copy a {} [{}, {}] expert into a {} [{}, {}] tensor",
                    from.format, from.rows, from.cols, self.format, self.rows, self.cols
                ),
            ));
        }
        for (name, dst_t) in self.parts.iter_mut() {
            let src_t = from.part(name)?;
            copy_row(dst_t, dst, self.experts, src_t, src, from.experts)?;
        }
        Ok(())
    }
}

/// Rows `ids` of the leading dimension of a host tensor whose leading dimension is `n`.
pub fn select_rows(t: &Tensor, ids: &[usize], n: usize) -> Result<Tensor> {
    if t.dim(0)? != n {
        return Err(MoeError::shape("select_rows", format!("leading dim {n}"), format!("{:?}", t.shape())));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i >= n) {
        return Err(MoeError::shape("select_rows", format!("expert index < {n}"), bad.to_string()));
    }
    let row: usize = t.shape()[1..].iter().product();
    fn gather<T: Clone>(v: &[T], ids: &[usize], row: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(ids.len() * row);
        for &i in ids {
            out.extend_from_slice(&v[i * row..(i + 1) * row]);
        }
        out
    }
    let data = match t.host()? {
        HostData::F32(v) => HostData::F32(gather(v, ids, row)),
        HostData::BF16(v) => HostData::BF16(gather(v, ids, row)),
        HostData::F16(v) => HostData::F16(gather(v, ids, row)),
        HostData::I32(v) => HostData::I32(gather(v, ids, row)),
        HostData::U8(v) => HostData::U8(gather(v, ids, row)),
    };
    let mut shape = t.shape().to_vec();
    shape[0] = ids.len();
    Tensor::from_host(shape, data)
}

/// Copies leading-dimension row `src` of `from` into row `dst` of `to` in place (host, same
/// dtype/row shape; `to_n` and `from_n` are the leading dimensions the caller expects).
pub fn copy_row(to: &mut Tensor, dst: usize, to_n: usize, from: &Tensor, src: usize, from_n: usize) -> Result<()> {
    if to.shape()[1..] != from.shape()[1..]
        || to.dtype() != from.dtype()
        || to.dim(0)? != to_n
        || from.dim(0)? != from_n
        || dst >= to_n
        || src >= from_n
    {
        return Err(MoeError::shape(
            "copy_row",
            format!("{} {:?} row {dst} < {to_n}", to.dtype(), to.shape()),
            format!("{} {:?} row {src} < {from_n}", from.dtype(), from.shape()),
        ));
    }
    let row: usize = to.shape()[1..].iter().product();
    fn put<T: Clone>(d: &mut [T], s: &[T], dst: usize, src: usize, row: usize) {
        d[dst * row..(dst + 1) * row].clone_from_slice(&s[src * row..(src + 1) * row]);
    }
    let (to_dtype, from_dtype) = (to.dtype(), from.dtype());
    match (to.host_mut()?, from.host()?) {
        (HostData::F32(d), HostData::F32(s)) => put(d, s, dst, src, row),
        (HostData::BF16(d), HostData::BF16(s)) => put(d, s, dst, src, row),
        (HostData::F16(d), HostData::F16(s)) => put(d, s, dst, src, row),
        (HostData::I32(d), HostData::I32(s)) => put(d, s, dst, src, row),
        (HostData::U8(d), HostData::U8(s)) => put(d, s, dst, src, row),
        _ => {
            return Err(MoeError::DType { op: "copy_row", expected: to_dtype.to_string(), got: from_dtype.to_string() })
        }
    }
    Ok(())
}

/// One weight format's behaviour. Implementations are selected by [`quant_method`]; backends pick
/// the method for their problem, callers never reach into the parts themselves.
pub trait QuantMethod: Send + Sync + fmt::Debug {
    /// The format this method implements.
    fn format(&self) -> QuantFormat;

    /// The parts stored for a `[experts, rows, cols]` projection.
    fn part_specs(&self, experts: usize, rows: usize, cols: usize) -> Result<Vec<PartSpec>>;

    /// Checks that `t` has exactly the parts, dtypes and shapes of [`Self::part_specs`], plus
    /// any format rule (e.g. finite, positive scales).
    fn validate(&self, t: &ExpertTensor) -> Result<()> {
        check_parts(t, &self.part_specs(t.experts, t.rows, t.cols)?)
    }

    /// The reference: expert `e` dequantized to f32 `[rows, cols]`.
    fn dequantize_expert(&self, t: &ExpertTensor, e: usize) -> Result<Vec<f32>>;

    /// Quantizes f32 weights `[experts, rows, cols]` into this format (quantize at load).
    fn quantize(&self, w: &[f32], experts: usize, rows: usize, cols: usize) -> Result<ExpertTensor>;
}

/// Checks parts against specs, naming the first mismatch.
pub fn check_parts(t: &ExpertTensor, specs: &[PartSpec]) -> Result<()> {
    for spec in specs {
        let p = t.part(spec.name)?;
        if p.dtype() != spec.dtype || p.shape() != spec.shape.as_slice() {
            return Err(MoeError::quant(
                t.format.name(),
                format!(
                    "part `{}` should be {} {:?}, found {} {:?}",
                    spec.name,
                    spec.dtype,
                    spec.shape,
                    p.dtype(),
                    p.shape()
                ),
            ));
        }
    }
    if t.parts.len() != specs.len() {
        let expected: Vec<_> = specs.iter().map(|s| s.name).collect();
        return Err(MoeError::quant(
            t.format.name(),
            format!("expected parts {expected:?}, found {:?}", t.parts.keys().collect::<Vec<_>>()),
        ));
    }
    Ok(())
}

/// The method for a format. `weight_dtype` is the storage dtype of unquantized weights (quantized
/// formats ignore it). `int4-group` quantizes symmetrically; its validation and dequantization
/// accept zero points too.
pub fn quant_method(format: QuantFormat, weight_dtype: DType) -> Result<Box<dyn QuantMethod>> {
    match format {
        QuantFormat::None => Ok(Box::new(Unquantized::new(weight_dtype)?)),
        QuantFormat::Fp8Block => Ok(Box::new(Fp8Block)),
        QuantFormat::Fp8Tensor => Ok(Box::new(Fp8Tensor)),
        QuantFormat::Mxfp4 => Ok(Box::new(Mxfp4)),
        QuantFormat::Nvfp4 => Ok(Box::new(Nvfp4)),
        QuantFormat::Int4Group => Ok(Box::new(Int4Group::symmetric())),
        QuantFormat::Int8Channel => Ok(Box::new(Int8Channel)),
    }
}
