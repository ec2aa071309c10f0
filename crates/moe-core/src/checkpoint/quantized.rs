//! Loaders for pre-quantized checkpoints, each in its family's real naming, producing the
//! in-memory parts of the matching [`QuantMethod`](crate::quant::QuantMethod):
//!
//! | format | names (per expert unless noted) | notes |
//! |---|---|---|
//! | fp8-block (DeepSeek-V3) | `{proj}.weight` e4m3 + `{proj}.weight_scale_inv` f32 | gate/up blocks concatenate (I % 128 == 0) |
//! | fp8-tensor | `{proj}.weight` e4m3 + `{proj}.weight_scale` scalar (+ `input_scale`) | gate/up requantized to the larger scale |
//! | mxfp4 (GPT-OSS) | `experts.gate_up_proj_blocks/_scales`, `experts.down_proj_blocks/_scales` (stacked) | gate/up rows de-interleaved |
//! | nvfp4 (ModelOpt) | `{proj}.weight` u8 + `weight_scale` e4m3 + `weight_scale_2` + `input_scale` | gate/up global scales unified |
//! | int4-group (AWQ, GPTQ) | `{proj}.qweight`, `qzeros`, `scales` (+ `g_idx`) | per `quantization_config` |
//!
//! Shared experts stored in FP8 or NVFP4 (DeepSeek-V3, ModelOpt) are dequantized to the
//! config's weight dtype: they are dense and small next to the routed experts.

use half::f16;
use safetensors::Dtype;
use serde_json::Value;

use crate::checkpoint::hf_config::ModelSpec;
use crate::checkpoint::layout::{BlockLayout, ExpertLayout};
use crate::checkpoint::quant::{Projection, QuantLoader};
use crate::checkpoint::store::TensorStore;
use crate::error::{MoeError, Result};
use crate::quant::int4_group::{unpack_awq, unpack_gptq, Int4Matrix, PackedLinear};
use crate::quant::{fp8_tensor, nvfp4, ExpertTensor, Fp8Block, Nvfp4, QuantFormat, QuantMethod};
use crate::tensor::{DType, HostData, Tensor};
use crate::weights::SharedWeights;

/// The quantized loaders, most specific marker first.
pub fn loaders() -> Vec<Box<dyn QuantLoader>> {
    vec![
        Box::new(Fp8BlockLoader),
        Box::new(Nvfp4Loader),
        Box::new(Fp8TensorLoader),
        Box::new(Int4Loader),
        Box::new(Mxfp4Loader),
    ]
}

fn ckpt(store: &TensorStore, name: &str, reason: impl Into<String>) -> MoeError {
    let file =
        store.meta(name).map(|m| m.file.display().to_string()).unwrap_or_else(|_| store.dir().display().to_string());
    MoeError::checkpoint(file, name, reason)
}

/// Reads raw tensors with dtype and shape checks that name the tensor.
struct Reader<'a> {
    store: &'a TensorStore,
    progress: &'a mut dyn FnMut(u64),
}

impl Reader<'_> {
    fn raw(&mut self, name: &str, dtypes: &[Dtype], shape: &[usize]) -> Result<(Dtype, Vec<u8>)> {
        if !self.store.contains(name) {
            return Err(MoeError::checkpoint(
                self.store.dir().display().to_string(),
                name,
                format!("missing tensor (expected {dtypes:?} {shape:?})"),
            ));
        }
        let (m, bytes) = self.store.read_raw(name)?;
        if !dtypes.contains(&m.dtype) {
            return Err(ckpt(self.store, name, format!("dtype {:?}, expected one of {dtypes:?}", m.dtype)));
        }
        let scalar = shape.iter().product::<usize>() == 1 && m.shape.iter().product::<usize>() == 1;
        if m.shape != shape && !scalar {
            return Err(ckpt(
                self.store,
                name,
                format!("wrong shape: expected {shape:?} from config.json, found {:?}", m.shape),
            ));
        }
        (self.progress)(bytes.len() as u64);
        Ok((m.dtype, bytes))
    }

    fn u8s(&mut self, name: &str, dtypes: &[Dtype], shape: &[usize]) -> Result<Vec<u8>> {
        Ok(self.raw(name, dtypes, shape)?.1)
    }

    fn f32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (dt, b) = self.raw(name, &[Dtype::F32, Dtype::BF16, Dtype::F16], shape)?;
        Ok(match dt {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        })
    }

    fn f16s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
        Ok(self.f32s(name, shape)?.into_iter().map(f16::from_f32).collect())
    }

    fn i32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
        let (_, b) = self.raw(name, &[Dtype::I32], shape)?;
        Ok(b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn scalar(&mut self, name: &str) -> Result<f32> {
        Ok(self.f32s(name, &[1])?[0])
    }
}

/// `{proj}` of expert `e`: the per-expert weight name with `.weight` removed.
fn base(pattern: &str, e: usize) -> String {
    let n = ExpertLayout::expert_name(pattern, e);
    n.strip_suffix(".weight").unwrap_or(&n).to_string()
}

fn per_expert(layout: &BlockLayout) -> Option<(&str, &str, &str)> {
    match &layout.experts {
        ExpertLayout::PerExpert { gate, up, down } => Some((gate, up, down)),
        _ => None,
    }
}

fn has_suffix(store: &TensorStore, layout: &BlockLayout, suffix: &str) -> bool {
    per_expert(layout).is_some_and(|(g, _, _)| store.contains(&format!("{}{suffix}", base(g, 0))))
}

fn u8_tensor(shape: Vec<usize>, v: Vec<u8>) -> Result<Tensor> {
    Tensor::from_host(shape, HostData::U8(v))
}

fn tensor(format: QuantFormat, e: usize, rows: usize, cols: usize, parts: Vec<(&str, Tensor)>) -> ExpertTensor {
    ExpertTensor { format, experts: e, rows, cols, parts: parts.into_iter().map(|(n, t)| (n.to_string(), t)).collect() }
}

/// (experts, rows, cols, [(projection pattern, rows) fused in order]) for a projection.
type Plan<'a> = (usize, usize, usize, Vec<(&'a str, usize)>);

/// The [`Plan`] of `p`.
fn plan<'a>(spec: &ModelSpec, layout: &'a BlockLayout, p: Projection) -> Result<Plan<'a>> {
    let (e, h, i) = (spec.block.num_experts, spec.block.hidden_size, spec.block.intermediate_size);
    let (g, u, d) =
        per_expert(layout).ok_or_else(|| MoeError::checkpoint("-", &layout.prefix, "expected per-expert tensors"))?;
    Ok(match p {
        Projection::GateUp => (e, 2 * i, h, vec![(g, i), (u, i)]),
        Projection::Down => (e, h, i, vec![(d, h)]),
    })
}

// ---------------------------------------------------------------- FP8 block (DeepSeek-V3)

/// DeepSeek-V3 FP8: `weight` e4m3 + `weight_scale_inv` per 128x128 block.
#[derive(Debug, Clone, Copy)]
pub struct Fp8BlockLoader;

impl QuantLoader for Fp8BlockLoader {
    fn format(&self) -> QuantFormat {
        QuantFormat::Fp8Block
    }

    fn detect(&self, store: &TensorStore, _spec: &ModelSpec, layout: &BlockLayout) -> bool {
        has_suffix(store, layout, ".weight_scale_inv")
    }

    fn load(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
        projection: Projection,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ExpertTensor> {
        let (e, rows, cols, projs) = plan(spec, layout, projection)?;
        let b = Fp8Block::BLOCK_SIZE;
        if projs.len() > 1 && !projs[0].1.is_multiple_of(b) {
            return Err(MoeError::checkpoint(
                store.dir().display().to_string(),
                base(projs[0].0, 0),
                format!(
                    "fp8-block: intermediate size {} is not a multiple of {b}, so gate and up blocks cannot be fused",
                    projs[0].1
                ),
            ));
        }
        let mut r = Reader { store, progress };
        let (mut q, mut s) = (Vec::new(), Vec::new());
        for ex in 0..e {
            for (pat, n) in &projs {
                let name = base(pat, ex);
                q.extend(r.u8s(&format!("{name}.weight"), &[Dtype::F8_E4M3, Dtype::U8], &[*n, cols])?);
                s.extend(r.f32s(&format!("{name}.weight_scale_inv"), &[n.div_ceil(b), cols.div_ceil(b)])?);
            }
        }
        let (rb, cb) = (rows.div_ceil(b), cols.div_ceil(b));
        Ok(tensor(
            QuantFormat::Fp8Block,
            e,
            rows,
            cols,
            vec![
                ("weight", u8_tensor(vec![e, rows, cols], q)?),
                ("weight_scale_inv", Tensor::from_f32(vec![e, rb, cb], s)?),
            ],
        ))
    }

    fn load_shared(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
        dtype: DType,
    ) -> Result<Option<SharedWeights>> {
        dequantized_shared(store, spec, layout, dtype, &mut |r, name, rows, cols| {
            if !r.store.contains(&format!("{name}.weight_scale_inv")) {
                return Ok(None);
            }
            let b = Fp8Block::BLOCK_SIZE;
            let q = r.u8s(&format!("{name}.weight"), &[Dtype::F8_E4M3, Dtype::U8], &[rows, cols])?;
            let s = r.f32s(&format!("{name}.weight_scale_inv"), &[rows.div_ceil(b), cols.div_ceil(b)])?;
            let t = tensor(
                QuantFormat::Fp8Block,
                1,
                rows,
                cols,
                vec![
                    ("weight", u8_tensor(vec![1, rows, cols], q)?),
                    ("weight_scale_inv", Tensor::from_f32(vec![1, rows.div_ceil(b), cols.div_ceil(b)], s)?),
                ],
            );
            Ok(Some(Fp8Block.dequantize_expert(&t, 0)?))
        })
    }
}

/// Dequantizes one linear `(reader, name, rows, cols)`, `None` when it is not quantized.
type DequantFn<'a> = dyn FnMut(&mut Reader<'_>, &str, usize, usize) -> Result<Option<Vec<f32>>> + 'a;

/// Reads the shared expert through `dequant(reader, name, rows, cols)`, which returns `None` when
/// the tensor is not quantized (then the plain loader reads the shared expert).
fn dequantized_shared(
    store: &TensorStore,
    spec: &ModelSpec,
    layout: &BlockLayout,
    dtype: DType,
    dequant: &mut DequantFn<'_>,
) -> Result<Option<SharedWeights>> {
    let (Some(names), Some(sc)) = (&layout.shared, spec.block.shared_expert) else { return Ok(None) };
    let (h, si) = (spec.block.hidden_size, sc.intermediate_size);
    let mut ignore = |_: u64| {};
    let mut r = Reader { store, progress: &mut ignore };
    let strip = |n: &str| n.strip_suffix(".weight").unwrap_or(n).to_string();
    let Some(mut w13) = dequant(&mut r, &strip(&names.gate), si, h)? else { return Ok(None) };
    let up = dequant(&mut r, &strip(&names.up), si, h)?;
    let down = dequant(&mut r, &strip(&names.down), h, si)?;
    let (Some(up), Some(down)) = (up, down) else {
        return Err(MoeError::checkpoint(
            store.dir().display().to_string(),
            &names.up,
            "shared expert is partly quantized (gate is, up or down is not)",
        ));
    };
    w13.extend(up);
    let gate = match (&names.gate_weight, sc.gated) {
        (Some(g), true) => Some(Tensor::from_f32(vec![h], r.f32s(g, &[1, h])?)?),
        _ => None,
    };
    Ok(Some(SharedWeights {
        w13: Tensor::from_f32_as(vec![2 * si, h], &w13, dtype)?,
        w2: Tensor::from_f32_as(vec![h, si], &down, dtype)?,
        gate,
    }))
}

// ---------------------------------------------------------------- FP8 per-tensor

/// FP8 with one scale per projection (`weight_scale` scalar, optional `input_scale`).
#[derive(Debug, Clone, Copy)]
pub struct Fp8TensorLoader;

impl QuantLoader for Fp8TensorLoader {
    fn format(&self) -> QuantFormat {
        QuantFormat::Fp8Tensor
    }

    fn detect(&self, store: &TensorStore, _spec: &ModelSpec, layout: &BlockLayout) -> bool {
        let Some((g, _, _)) = per_expert(layout) else { return false };
        let scale = format!("{}.weight_scale", base(g, 0));
        store.meta(&ExpertLayout::expert_name(g, 0)).is_ok_and(|m| m.dtype == Dtype::F8_E4M3)
            && store.meta(&scale).is_ok_and(|m| m.shape.iter().product::<usize>() == 1)
    }

    fn load(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
        projection: Projection,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ExpertTensor> {
        let (e, rows, cols, projs) = plan(spec, layout, projection)?;
        let mut r = Reader { store, progress };
        let (mut q, mut scales, mut inputs) = (Vec::new(), Vec::new(), Vec::new());
        let mut all_inputs = true;
        for ex in 0..e {
            let mut shards = Vec::new();
            for (pat, n) in &projs {
                let name = base(pat, ex);
                let w = r.u8s(&format!("{name}.weight"), &[Dtype::F8_E4M3], &[*n, cols])?;
                let s = r.scalar(&format!("{name}.weight_scale"))?;
                let input = format!("{name}.input_scale");
                if store.contains(&input) {
                    inputs.push(r.scalar(&input)?);
                } else {
                    all_inputs = false;
                }
                shards.push((w, s));
            }
            // One scale per fused projection: the larger, the other shard requantized to it.
            let smax = shards.iter().map(|x| x.1).fold(0.0f32, f32::max);
            for (w, s) in shards {
                q.extend(if s == smax { w } else { fp8_tensor::requantize(&w, s, smax)? });
            }
            scales.push(smax);
        }
        let mut parts =
            vec![("weight", u8_tensor(vec![e, rows, cols], q)?), ("weight_scale", Tensor::from_f32(vec![e], scales)?)];
        if all_inputs && !inputs.is_empty() {
            let per: Vec<f32> = inputs.chunks(projs.len()).map(|c| c.iter().copied().fold(0.0, f32::max)).collect();
            parts.push(("input_scale", Tensor::from_f32(vec![e], per)?));
        }
        Ok(tensor(QuantFormat::Fp8Tensor, e, rows, cols, parts))
    }
}

// ---------------------------------------------------------------- NVFP4 (ModelOpt)

/// ModelOpt NVFP4: `weight` packed E2M1, `weight_scale` e4m3 per 16, `weight_scale_2` global.
#[derive(Debug, Clone, Copy)]
pub struct Nvfp4Loader;

/// One NVFP4 linear: packed codes, e4m3 block scales, global scale, input scale.
type Nvfp4Linear = (Vec<u8>, Vec<u8>, f32, Option<f32>);

fn nvfp4_linear(r: &mut Reader<'_>, name: &str, rows: usize, cols: usize) -> Result<Nvfp4Linear> {
    if !cols.is_multiple_of(Nvfp4::BLOCK_SIZE) {
        return Err(ckpt(r.store, &format!("{name}.weight"), format!("nvfp4: {cols} inputs are not a multiple of 16")));
    }
    let w = r.u8s(&format!("{name}.weight"), &[Dtype::U8], &[rows, cols / 2])?;
    let s = r.u8s(&format!("{name}.weight_scale"), &[Dtype::F8_E4M3, Dtype::U8], &[rows, cols / Nvfp4::BLOCK_SIZE])?;
    let g = r.scalar(&format!("{name}.weight_scale_2"))?;
    let input = format!("{name}.input_scale");
    let i = if r.store.contains(&input) { Some(r.scalar(&input)?) } else { None };
    Ok((w, s, g, i))
}

impl QuantLoader for Nvfp4Loader {
    fn format(&self) -> QuantFormat {
        QuantFormat::Nvfp4
    }

    fn detect(&self, store: &TensorStore, _spec: &ModelSpec, layout: &BlockLayout) -> bool {
        has_suffix(store, layout, ".weight_scale_2")
    }

    fn load(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
        projection: Projection,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ExpertTensor> {
        let (e, rows, cols, projs) = plan(spec, layout, projection)?;
        let mut r = Reader { store, progress };
        let (mut q, mut sc, mut globals, mut inputs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ex in 0..e {
            let shards: Vec<_> =
                projs.iter().map(|(pat, n)| nvfp4_linear(&mut r, &base(pat, ex), *n, cols)).collect::<Result<_>>()?;
            // ModelOpt usually exports gate and up with one global scale; when they differ the
            // block scales of the smaller one are re-encoded against the larger.
            let gmax = shards.iter().map(|x| x.2).fold(0.0f32, f32::max);
            for (w, s, g, _) in &shards {
                q.extend_from_slice(w);
                sc.extend(if *g == gmax { s.clone() } else { nvfp4::rescale_block_scales(s, *g, gmax)? });
            }
            globals.push(gmax);
            inputs.push(
                shards.iter().map(|x| x.3).collect::<Option<Vec<f32>>>().map(|v| v.into_iter().fold(0.0, f32::max)),
            );
        }
        let mut parts = vec![
            ("weight", u8_tensor(vec![e, rows, cols / 2], q)?),
            ("weight_scale", u8_tensor(vec![e, rows, cols / Nvfp4::BLOCK_SIZE], sc)?),
            ("weight_scale_2", Tensor::from_f32(vec![e], globals)?),
        ];
        if let Some(v) = inputs.into_iter().collect::<Option<Vec<f32>>>() {
            parts.push(("input_scale", Tensor::from_f32(vec![e], v)?));
        }
        Ok(tensor(QuantFormat::Nvfp4, e, rows, cols, parts))
    }

    fn load_shared(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
        dtype: DType,
    ) -> Result<Option<SharedWeights>> {
        dequantized_shared(store, spec, layout, dtype, &mut |r, name, rows, cols| {
            if !r.store.contains(&format!("{name}.weight_scale_2")) {
                return Ok(None);
            }
            let (w, s, g, _) = nvfp4_linear(r, name, rows, cols)?;
            let t = tensor(
                QuantFormat::Nvfp4,
                1,
                rows,
                cols,
                vec![
                    ("weight", u8_tensor(vec![1, rows, cols / 2], w)?),
                    ("weight_scale", u8_tensor(vec![1, rows, cols / Nvfp4::BLOCK_SIZE], s)?),
                    ("weight_scale_2", Tensor::from_f32(vec![1], vec![g])?),
                ],
            );
            Ok(Some(Nvfp4.dequantize_expert(&t, 0)?))
        })
    }
}

// ---------------------------------------------------------------- MXFP4 (GPT-OSS)

/// GPT-OSS MXFP4: stacked `_blocks` `[E, out, in/32, 16]` and `_scales` `[E, out, in/32]`.
#[derive(Debug, Clone, Copy)]
pub struct Mxfp4Loader;

impl QuantLoader for Mxfp4Loader {
    fn format(&self) -> QuantFormat {
        QuantFormat::Mxfp4
    }

    fn detect(&self, store: &TensorStore, _spec: &ModelSpec, layout: &BlockLayout) -> bool {
        match &layout.experts {
            ExpertLayout::Transposed { gate_up, .. } | ExpertLayout::Fused { gate_up, .. } => {
                store.contains(&format!("{gate_up}_blocks"))
            }
            ExpertLayout::PerExpert { .. } => false,
        }
    }

    fn load(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
        projection: Projection,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ExpertTensor> {
        let (e, h, i) = (spec.block.num_experts, spec.block.hidden_size, spec.block.intermediate_size);
        let (gate_up, down, interleaved) = match &layout.experts {
            ExpertLayout::Transposed { gate_up, down, interleaved, .. } => (gate_up, down, *interleaved),
            ExpertLayout::Fused { gate_up, down } => (gate_up, down, false),
            ExpertLayout::PerExpert { gate, .. } => {
                return Err(MoeError::checkpoint(
                    store.dir().display().to_string(),
                    gate,
                    "mxfp4 expects stacked experts",
                ))
            }
        };
        let (name, rows, cols) = match projection {
            Projection::GateUp => (gate_up, 2 * i, h),
            Projection::Down => (down, h, i),
        };
        if !cols.is_multiple_of(32) {
            return Err(ckpt(store, name, format!("mxfp4: {cols} inputs are not a multiple of 32")));
        }
        let g = cols / 32;
        let mut r = Reader { store, progress };
        let blocks = r.u8s(&format!("{name}_blocks"), &[Dtype::U8], &[e, rows, g, 16])?;
        let scales = r.u8s(&format!("{name}_scales"), &[Dtype::U8, Dtype::F8_E8M0], &[e, rows, g])?;
        // GPT-OSS interleaves gate (even rows) and up (odd rows); canonical is gate then up.
        let (blocks, scales) = if projection == Projection::GateUp && interleaved {
            let perm = crate::checkpoint::layout::bias_permutation(i, true);
            let reorder = |v: &[u8], row: usize| -> Vec<u8> {
                let mut out = Vec::with_capacity(v.len());
                for ex in 0..e {
                    for &src in &perm {
                        out.extend_from_slice(&v[(ex * rows + src) * row..(ex * rows + src + 1) * row]);
                    }
                }
                out
            };
            (reorder(&blocks, g * 16), reorder(&scales, g))
        } else {
            (blocks, scales)
        };
        Ok(tensor(
            QuantFormat::Mxfp4,
            e,
            rows,
            cols,
            vec![
                ("blocks", u8_tensor(vec![e, rows, g, 16], blocks)?),
                ("scales", u8_tensor(vec![e, rows, g], scales)?),
            ],
        ))
    }

    fn load_biases(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ExpertLayout::Transposed { biases: Some((bgu, bd)), interleaved, .. } = &layout.experts else {
            return Ok((None, None));
        };
        let (e, h, i) = (spec.block.num_experts, spec.block.hidden_size, spec.block.intermediate_size);
        let mut ignore = |_: u64| {};
        let mut r = Reader { store, progress: &mut ignore };
        let raw = r.f32s(bgu, &[e, 2 * i])?;
        let perm = crate::checkpoint::layout::bias_permutation(i, *interleaved);
        let b13: Vec<f32> = raw.chunks(2 * i).flat_map(|row| perm.iter().map(|&s| row[s])).collect();
        Ok((Some(Tensor::from_f32(vec![e, 2 * i], b13)?), Some(Tensor::from_f32(vec![e, h], r.f32s(bd, &[e, h])?)?)))
    }
}

// ---------------------------------------------------------------- INT4 (AWQ, GPTQ)

/// AutoAWQ (GEMM) and GPTQ int4 checkpoints, read as `quantization_config` says.
#[derive(Debug, Clone, Copy)]
pub struct Int4Loader;

#[derive(Debug, Clone)]
struct Int4Config {
    gptq: bool,
    group: usize,
    v1_zeros: bool,
}

fn int4_config(store: &TensorStore) -> Result<Int4Config> {
    let path = crate::checkpoint::hf_config::config_path(store.dir());
    let bad = |reason: String| MoeError::checkpoint(path.display().to_string(), "quantization_config", reason);
    let text =
        std::fs::read_to_string(&path).map_err(|e| MoeError::Io { path: path.display().to_string(), source: e })?;
    let root: Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let q = root
        .get("quantization_config")
        .or_else(|| root.get("text_config").and_then(|t| t.get("quantization_config")))
        .ok_or_else(|| bad("qweight tensors but no quantization_config in config.json".into()))?;
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    let bits = q.get("bits").or_else(|| q.get("w_bit")).and_then(|b| b.as_u64()).unwrap_or(4);
    if bits != 4 {
        return Err(bad(format!("{bits}-bit {method} is not supported; int4-group reads 4-bit checkpoints")));
    }
    let group = q.get("group_size").or_else(|| q.get("q_group_size")).and_then(|g| g.as_i64()).unwrap_or(128);
    let group = usize::try_from(group)
        .map_err(|_| bad(format!("group_size {group} (per-channel) is not supported; use groups of 128")))?;
    match method {
        "awq" => {
            let version = q.get("version").and_then(|v| v.as_str()).unwrap_or("gemm").to_ascii_lowercase();
            if version != "gemm" {
                return Err(bad(format!("AWQ version `{version}` is not supported (gemm packing only)")));
            }
            Ok(Int4Config { gptq: false, group, v1_zeros: false })
        }
        "gptq" => {
            let fmt = q.get("checkpoint_format").and_then(|v| v.as_str()).unwrap_or("gptq");
            Ok(Int4Config { gptq: true, group, v1_zeros: fmt != "gptq_v2" })
        }
        other => Err(bad(format!("quant_method `{other}` with qweight tensors is not supported (awq, gptq)"))),
    }
}

fn int4_linear(r: &mut Reader<'_>, c: &Int4Config, name: &str, out: usize, inp: usize) -> Result<Int4Matrix> {
    let g = c.group.max(1);
    if !inp.is_multiple_of(g) || !out.is_multiple_of(8) || !inp.is_multiple_of(8) {
        return Err(ckpt(
            r.store,
            &format!("{name}.qweight"),
            format!("{inp} inputs / {out} outputs do not pack into groups of {g} and words of 8"),
        ));
    }
    let qshape = if c.gptq { [inp / 8, out] } else { [inp, out / 8] };
    let qweight = r.i32s(&format!("{name}.qweight"), &qshape)?;
    let qzeros = r.i32s(&format!("{name}.qzeros"), &[inp / g, out / 8])?;
    let scales = r.f16s(&format!("{name}.scales"), &[inp / g, out])?;
    let gname = format!("{name}.g_idx");
    let g_idx = if c.gptq && r.store.contains(&gname) { Some(r.i32s(&gname, &[inp])?) } else { None };
    let p = PackedLinear {
        qweight: &qweight,
        qzeros: &qzeros,
        scales: &scales,
        g_idx: g_idx.as_deref(),
        in_features: inp,
        out_features: out,
        group: c.group,
    };
    let m = if c.gptq { unpack_gptq(&p, c.v1_zeros) } else { unpack_awq(&p) };
    m.map_err(|e| ckpt(r.store, &format!("{name}.qweight"), e.to_string()))
}

impl QuantLoader for Int4Loader {
    fn format(&self) -> QuantFormat {
        QuantFormat::Int4Group
    }

    fn detect(&self, store: &TensorStore, _spec: &ModelSpec, layout: &BlockLayout) -> bool {
        has_suffix(store, layout, ".qweight")
    }

    fn load(
        &self,
        store: &TensorStore,
        spec: &ModelSpec,
        layout: &BlockLayout,
        projection: Projection,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ExpertTensor> {
        let (e, _, cols, projs) = plan(spec, layout, projection)?;
        let c = int4_config(store)?;
        let mut r = Reader { store, progress };
        let mut experts = Vec::with_capacity(e);
        for ex in 0..e {
            let shards: Vec<Int4Matrix> = projs
                .iter()
                .map(|(pat, n)| int4_linear(&mut r, &c, &base(pat, ex), *n, cols))
                .collect::<Result<_>>()?;
            experts.push(
                Int4Matrix::concat_rows(&shards).map_err(|err| ckpt(store, &base(projs[0].0, ex), err.to_string()))?,
            );
        }
        Int4Matrix::stack(&experts)
    }
}
