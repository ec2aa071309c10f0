//! Quantized experts on the device: each format keeps its parts packed in device memory (no
//! 16-bit copy of the weights) and runs the weight-only grouped GEMMs of `kernels/quant_gemm.cu`,
//! which dequantize each k-tile in shared memory right before the tensor-core MMAs.
//!
//! A format plugs in as a [`Packer`]: it turns expert `e` of an [`ExpertTensor`] into the device
//! layout its kernel reads — the 8-bit formats' packed weight bytes as stored (`[rows, K]`) and
//! scale words `[K / kspan, rows]`; the 4-bit formats' in 8-row tiles ([`tile_rows8`],
//! [`tile_scales8`]), so the decode kernels read long contiguous runs; in both, the scales of one
//! k-tile and 8 weight rows are one aligned 16-byte copy — and per-row and per-expert f32 factors
//! applied in the epilogue. [`QuantExperts`]
//! owns the device buffers of both projections, uploads, replaces slots (EPLB) and launches.
//! The backend's forward calls [`QuantExperts::gemm`] without knowing the format.

use cudarc::driver::CudaSlice;
use moe_core::quant::{quant_method, ExpertTensor, QuantFormat};
use moe_core::weights::ExpertWeights;
use moe_core::{DType, MoeConfig, MoeError, Result};

use crate::device::{CudaDevice, Dep, Workspace};
use crate::error::CudaError;
use crate::heuristics::{self, Layout, Plan};
use crate::kernels::{
    fp8_tile, DecodeParams, Elem, F8RowsParams, Fp8GemmParams, GemmMode, GemmParams, GemmTile, KernelId, Proj,
    QActParams, QDecodeParams, QGemmParams, QuantKind, QuantRowsParams, QuantTile, QDECODE_SMEM,
};

/// Host-side parts of one expert projection in the device layout.
#[derive(Debug, Default, Clone)]
pub struct HostParts {
    /// Packed weight bytes `[rows, K * bits / 8]` (4-bit formats: in 8-row tiles, [`tile_rows8`]).
    pub w: Vec<u8>,
    /// Scale words `[ceil(K / kspan), rows]`, `sw` bytes each (empty when the format has none;
    /// 4-bit formats: `[rows / 8, ceil(K / kspan), 8]`, [`tile_scales8`]).
    pub scales: Vec<u8>,
    /// Per-row factors `[rows]` (empty: none).
    pub col: Vec<f32>,
    /// The per-expert factor (`None`: none).
    pub exp: Option<f32>,
}

/// One format's conversion from its [`ExpertTensor`] parts to the kernel's device layout.
pub trait Packer: Send + Sync + std::fmt::Debug {
    /// The kernel family that reads the packed parts.
    fn kind(&self) -> QuantKind;
    /// Expert `e` of `t` in the device layout; `elem` is the 16-bit compute type.
    fn pack(&self, t: &ExpertTensor, e: usize, elem: Elem) -> Result<HostParts>;
}

fn bad(format: QuantFormat, msg: impl Into<String>) -> MoeError {
    MoeError::quant(format.name(), msg.into())
}

/// Bytes `[rows, len]` of expert `e` of a u8 part `[E, rows, ...]`.
fn expert_bytes<'a>(t: &'a ExpertTensor, part: &str, e: usize) -> Result<&'a [u8]> {
    let p = t.part(part)?;
    let v = p.as_u8()?;
    let per = v.len() / t.experts.max(1);
    v.get(e * per..(e + 1) * per).ok_or_else(|| bad(t.format, format!("expert {e} out of range for `{part}`")))
}

fn expert_f32(t: &ExpertTensor, part: &str, e: usize) -> Result<Vec<f32>> {
    let p = t.part(part)?;
    p.narrow_rows(e, 1)?.to_f32_vec()
}

fn bits16(v: f32, elem: Elem) -> u16 {
    match elem {
        Elem::Bf16 => half::bf16::from_f32(v).to_bits(),
        Elem::F16 => half::f16::from_f32(v).to_bits(),
    }
}

/// Scale words `[ceil(cols / span), rows]` from per-row groups `[rows, groups]` of `group`
/// columns: word (ks, r) packs the `span / group` consecutive group entries as bytes.
fn group_words(rows: usize, cols: usize, groups: &[u8], group: usize, span: usize) -> Vec<u8> {
    let g = cols / group;
    let per = span / group;
    let ks = cols.div_ceil(span);
    let mut out = vec![0u8; ks * rows * per];
    for k in 0..ks {
        for r in 0..rows {
            for j in 0..per {
                let gi = k * per + j;
                out[(k * rows + r) * per + j] = if gi < g { groups[r * g + gi] } else { 0 };
            }
        }
    }
    out
}

/// 4-bit words for the kernel's shift-and-mask conversion: in every 32-bit word, elements
/// (2k, 2k + 1) move to nibbles (k, k + 4) (stored order: low nibble = even element).
pub fn repack_nibbles(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for w in bytes.chunks(4) {
        let mut word = [0u8; 4];
        word[..w.len()].copy_from_slice(w);
        let v = u32::from_le_bytes(word);
        let mut r = 0u32;
        for k in 0..4 {
            r |= ((v >> (8 * k)) & 0xF) << (4 * k);
            r |= ((v >> (8 * k + 4)) & 0xF) << (16 + 4 * k);
        }
        out.extend_from_slice(&r.to_le_bytes()[..w.len()]);
    }
    out
}

/// The 4-bit formats' weight layout (`qw_index` in `kernels/quant_gemm.cu`): rows in tiles of 8;
/// a tile's 16-byte chunks ordered by 4-chunk block, then row, then chunk, the last block of a row
/// as wide as the chunks left (`chunks % 4` when not 0). One decode-kernel load of 8 rows x 4
/// chunks is then 512 contiguous bytes and each tile's bytes are one run (session 13's probe:
/// 1.8 TB/s against 1.1 TB/s for the same loads on plain rows). `w` is `[rows, row_bytes]`.
pub fn tile_rows8(w: &[u8], rows: usize, row_bytes: usize, format: QuantFormat) -> Result<Vec<u8>> {
    if !rows.is_multiple_of(8) || !row_bytes.is_multiple_of(16) || w.len() != rows * row_bytes {
        return Err(bad(
            format,
            format!(
                "the cuda layout tiles 8 rows of 16-byte chunks: got {} bytes for {rows} rows of {row_bytes} bytes",
                w.len()
            ),
        ));
    }
    let chunks = row_bytes / 16;
    let mut out = vec![0u8; w.len()];
    for r in 0..rows {
        for c in 0..chunks {
            let b = c / 4;
            let wb = 4.min(chunks - 4 * b);
            let dst = (r / 8) * 8 * chunks + 32 * b + (r % 8) * wb + c % 4;
            out[dst * 16..dst * 16 + 16].copy_from_slice(&w[(r * chunks + c) * 16..(r * chunks + c + 1) * 16]);
        }
    }
    Ok(out)
}

/// The 4-bit formats' scale layout (`qs_offset` in `kernels/quant_gemm.cu`): words of `sw` bytes
/// from `[spans, rows]` to `[rows / 8, spans, 8]`, so a tile's words over its whole reduction are
/// one run and 8 rows' words of one span stay one aligned piece.
pub fn tile_scales8(s: &[u8], rows: usize, spans: usize, sw: usize, format: QuantFormat) -> Result<Vec<u8>> {
    if !rows.is_multiple_of(8) || s.len() != spans * rows * sw {
        return Err(bad(
            format,
            format!(
                "the cuda layout tiles 8 rows of scale words: got {} bytes for {spans} x {rows} words of {sw}",
                s.len()
            ),
        ));
    }
    let mut out = vec![0u8; s.len()];
    for k in 0..spans {
        for r in 0..rows {
            let dst = (r / 8) * 8 * spans + k * 8 + r % 8;
            out[dst * sw..(dst + 1) * sw].copy_from_slice(&s[(k * rows + r) * sw..(k * rows + r + 1) * sw]);
        }
    }
    Ok(out)
}

/// A 4-bit expert's weights and scale words (`[spans, rows]`, `sw` bytes each) in the tiled layout.
fn tiled4(t: &ExpertTensor, w: Vec<u8>, scales: Vec<u8>, span: usize, sw: usize) -> Result<(Vec<u8>, Vec<u8>)> {
    let w = tile_rows8(&w, t.rows, t.cols / 2, t.format)?;
    let s = tile_scales8(&scales, t.rows, t.cols.div_ceil(span), sw, t.format)?;
    Ok((w, s))
}

#[derive(Debug)]
struct Mxfp4Packer;
impl Packer for Mxfp4Packer {
    fn kind(&self) -> QuantKind {
        QuantKind::Mxfp4
    }
    fn pack(&self, t: &ExpertTensor, e: usize, _: Elem) -> Result<HostParts> {
        let w = repack_nibbles(expert_bytes(t, "blocks", e)?);
        let s = expert_bytes(t, "scales", e)?;
        if let Some(i) = s.iter().position(|&b| b == 255) {
            return Err(bad(t.format, format!("expert {e}: E8M0 NaN scale (255) at flat index {i}")));
        }
        let (w, scales) = tiled4(t, w, group_words(t.rows, t.cols, s, 32, 64), 64, 2)?;
        Ok(HostParts { w, scales, ..Default::default() })
    }
}

#[derive(Debug)]
struct Nvfp4Packer;
impl Packer for Nvfp4Packer {
    fn kind(&self) -> QuantKind {
        QuantKind::Nvfp4
    }
    fn pack(&self, t: &ExpertTensor, e: usize, _: Elem) -> Result<HostParts> {
        let w = repack_nibbles(expert_bytes(t, "weight", e)?);
        let s = expert_bytes(t, "weight_scale", e)?;
        let g = expert_f32(t, "weight_scale_2", e)?;
        let g = *g.first().ok_or_else(|| bad(t.format, "empty weight_scale_2"))?;
        if !(g.is_finite() && g > 0.0) {
            return Err(bad(t.format, format!("expert {e}: weight_scale_2 = {g} must be finite and positive")));
        }
        let (w, scales) = tiled4(t, w, group_words(t.rows, t.cols, s, 16, 64), 64, 4)?;
        Ok(HostParts { w, scales, col: Vec::new(), exp: Some(g) })
    }
}

#[derive(Debug)]
struct Int4Packer;
impl Packer for Int4Packer {
    fn kind(&self) -> QuantKind {
        QuantKind::Int4
    }
    fn pack(&self, t: &ExpertTensor, e: usize, elem: Elem) -> Result<HostParts> {
        let (rows, cols) = (t.rows, t.cols);
        let groups = cols / 128;
        if let Some(g) = t.parts.get("weight_g_idx") {
            let g = &g.as_i32()?[e * cols..(e + 1) * cols];
            if g.iter().enumerate().any(|(c, &x)| x as usize != c / 128) {
                return Err(bad(
                    t.format,
                    "GPTQ act-order (a weight_g_idx that is not column / 128) has no CUDA kernel: the kernel \
                     streams one scale per 128 consecutive input columns; re-export the checkpoint with \
                     desc_act=False or use the cpu backend",
                ));
            }
        }
        let w = repack_nibbles(expert_bytes(t, "weight_packed", e)?);
        // The kernel reads code q as MAGIC + q (128 in bf16, 1024 in f16) and subtracts MAGIC + z.
        let magic = if elem == Elem::Bf16 { 128.0 } else { 1024.0 };
        let s = expert_f32(t, "weight_scale", e)?;
        let z = match t.parts.get("weight_zero_point") {
            Some(_) => expert_bytes(t, "weight_zero_point", e)?.to_vec(),
            None => vec![8u8; rows * groups],
        };
        let mut scales = vec![0u8; groups * rows * 4];
        for g in 0..groups {
            for r in 0..rows {
                let sc = s[r * groups + g];
                if !(sc.is_finite() && sc > 0.0) {
                    return Err(bad(t.format, format!("expert {e}: scale {sc} at row {r}, group {g}")));
                }
                let word = bits16(sc, elem) as u32 | ((bits16(-(magic + z[r * groups + g] as f32), elem) as u32) << 16);
                scales[(g * rows + r) * 4..(g * rows + r + 1) * 4].copy_from_slice(&word.to_le_bytes());
            }
        }
        let (w, scales) = tiled4(t, w, scales, 128, 4)?;
        Ok(HostParts { w, scales, ..Default::default() })
    }
}

#[derive(Debug)]
struct Int8Packer;
impl Packer for Int8Packer {
    fn kind(&self) -> QuantKind {
        QuantKind::Int8
    }
    fn pack(&self, t: &ExpertTensor, e: usize, _: Elem) -> Result<HostParts> {
        let w = expert_bytes(t, "weight", e)?.to_vec();
        let col = expert_f32(t, "weight_scale", e)?;
        Ok(HostParts { w, col, ..Default::default() })
    }
}

#[derive(Debug)]
struct Fp8BlockPacker;
impl Packer for Fp8BlockPacker {
    fn kind(&self) -> QuantKind {
        QuantKind::Fp8Block
    }
    fn pack(&self, t: &ExpertTensor, e: usize, _: Elem) -> Result<HostParts> {
        let (rows, cols) = (t.rows, t.cols);
        let w = expert_bytes(t, "weight", e)?.to_vec();
        let s = expert_f32(t, "weight_scale_inv", e)?;
        let (rb, cb) = (rows.div_ceil(128), cols.div_ceil(128));
        if s.len() != rb * cb {
            return Err(bad(t.format, format!("weight_scale_inv holds {} values, expected {rb} x {cb}", s.len())));
        }
        // One f32 word per (128 input columns, row): the row's block scale.
        let mut scales = Vec::with_capacity(cb * rows * 4);
        for k in 0..cb {
            for r in 0..rows {
                scales.extend_from_slice(&s[(r / 128) * cb + k].to_le_bytes());
            }
        }
        Ok(HostParts { w, scales, ..Default::default() })
    }
}

#[derive(Debug)]
struct Fp8TensorPacker;
impl Packer for Fp8TensorPacker {
    fn kind(&self) -> QuantKind {
        QuantKind::Fp8Tensor
    }
    fn pack(&self, t: &ExpertTensor, e: usize, _: Elem) -> Result<HostParts> {
        let w = expert_bytes(t, "weight", e)?.to_vec();
        let s = expert_f32(t, "weight_scale", e)?;
        Ok(HostParts { w, exp: s.first().copied(), ..Default::default() })
    }
}

/// The packer of a format, or why the cuda kernels cannot run it.
pub fn packer(format: QuantFormat) -> std::result::Result<Box<dyn Packer>, String> {
    match format {
        QuantFormat::Mxfp4 => Ok(Box::new(Mxfp4Packer)),
        QuantFormat::Nvfp4 => Ok(Box::new(Nvfp4Packer)),
        QuantFormat::Int4Group => Ok(Box::new(Int4Packer)),
        QuantFormat::Int8Channel => Ok(Box::new(Int8Packer)),
        QuantFormat::Fp8Block => Ok(Box::new(Fp8BlockPacker)),
        QuantFormat::Fp8Tensor => Ok(Box::new(Fp8TensorPacker)),
        QuantFormat::None => Err("unquantized weights use the bf16/f16 grouped GEMMs".into()),
    }
}

/// Why the quantized kernels cannot run `cfg` (beyond the generic checks), if they cannot.
pub fn refuse(cfg: &MoeConfig) -> Option<String> {
    if cfg.quant == QuantFormat::None {
        return None;
    }
    if let Err(r) = packer(cfg.quant) {
        return Some(r);
    }
    let bk = QuantTile::BK;
    for (name, v) in [("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size)] {
        if v % bk != 0 {
            return Some(format!(
                "{} on cuda streams k-tiles of {bk}: {name} = {v} is not a multiple of {bk}",
                cfg.quant
            ));
        }
    }
    None
}

/// Whether FP8 weights run large groups on FP8 tensor cores: sm_89+, both sizes multiples of
/// the 128-deep scale blocks, and not turned off with `MOE_CUDA_FP8_MMA=0`.
pub fn fp8_mma_ok(arch: &str, format: QuantFormat, hidden: usize, inter: usize) -> bool {
    let sm: u32 = arch.trim_start_matches("sm_").trim_end_matches('a').parse().unwrap_or(0);
    matches!(format, QuantFormat::Fp8Block | QuantFormat::Fp8Tensor)
        && sm >= 89
        && hidden.is_multiple_of(128)
        && inter.is_multiple_of(128)
        && std::env::var("MOE_CUDA_FP8_MMA").as_deref() != Ok("0")
}

/// Launches `id` (a `moe_quant_rows` kernel) over `p`'s source rows into `rows` rows of `p.q`
/// (`p.k` channels a row): the FP8 path's row pass, and `cuda`'s quantization for post-quant
/// dispatch.
pub(crate) fn launch_quant_rows(dev: &CudaDevice, id: KernelId, mut p: QuantRowsParams, rows: usize) -> Result<()> {
    // QR_ROWS source rows a block; QR_PAIRS * 2 groups of 128 channels a block column.
    const QR_ROWS: usize = 8;
    const QR_GROUPS: usize = 8;
    p.rows = rows as i32;
    let (blocks, cols) =
        ((p.src_rows.max(0) as usize).div_ceil(QR_ROWS), (p.k.max(0) as usize / 128).div_ceil(QR_GROUPS));
    if blocks == 0 || cols == 0 {
        return Ok(());
    }
    if blocks > i32::MAX as usize || cols > 65535 {
        return Err(MoeError::shape(
            "cuda.quant_rows",
            "fewer than 2^31 row blocks and 2^16 column blocks",
            format!("{blocks} x {cols}"),
        ));
    }
    dev.launch(id, (blocks as u32, cols as u32, 1), 256, 0, &p)?;
    Ok(())
}

/// Largest `T * k` of the packed-weight decode path; must match `QD_MAX_PAIRS` in
/// quant_gemm.cu (its member scan keeps one expert's pairs in shared memory).
pub const QDECODE_MAX_PAIRS: usize = 256;
/// Row padding of the staged activation rows (`QD_PAD` in quant_gemm.cu).
const QD_PAD: usize = 8;
/// Shared memory of a decode kernel's cp.async rings: 8 warps x `QD_NS` (8) slots x 32 lanes x
/// (16 weight + 4 scale bytes); twice that for the deep ring.
const QD_RING_BYTES: usize = 8 * 8 * 32 * 20;

/// Which packed decode kernels run: `MOE_CUDA_QD_MODE` when set, else the format's measured
/// default ([`default_decode_mode`]). 0 `qdecode2_*`, the packed weights as the mma A operand
/// (16 rows a row group); the older `qdecode_*` (weights as B, 8 rows a warp) with its rows
/// streamed through a cp.async ring of 8 (1) or 16 (2) slots a lane, or through registers (3).
/// `MOE_CUDA_QD_RING=1` / `2` (session 9's switch) still picks the rings.
fn decode_mode(format: QuantFormat) -> usize {
    static MODE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *MODE.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
        var("MOE_CUDA_QD_MODE").or_else(|| var("MOE_CUDA_QD_RING").filter(|&r| r > 0)).map(|m| m.min(3))
    });
    forced.unwrap_or_else(|| default_decode_mode(format))
}

/// The packed decode kernels each format runs by default, from same-run H100 A/Bs (session 12,
/// docs/perf/quant.md): `qdecode2_*` for the 4-bit formats (MXFP4 -9 to -10%, NVFP4 -15 to
/// -27%, int4 -27 to -34% at T = 1 and 16), `qdecode_*` for the 8-bit ones, where `qdecode2_*`
/// measured 4-33% (int8) and 30% (FP8 block) slower.
pub fn default_decode_mode(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Mxfp4 | QuantFormat::Nvfp4 | QuantFormat::Int4Group => 0,
        QuantFormat::None | QuantFormat::Int8Channel | QuantFormat::Fp8Block | QuantFormat::Fp8Tensor => 3,
    }
}

/// `qdecode2_*` warps a block (`MOE_CUDA_QD2_WARPS`: 4 or 8, default 8).
fn decode2_warps() -> usize {
    static WARPS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WARPS.get_or_init(|| {
        let w = std::env::var("MOE_CUDA_QD2_WARPS").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(8);
        if w >= 8 {
            8
        } else {
            4
        }
    })
}

/// The `qdecode2_*` reduction split for a forward's (token, choice) pairs against the local
/// experts, as measured on the H100 (sessions 14-15, MXFP4 gpt-oss-20b, docs/perf/quant.md): 4
/// when at most one expert in 8 can be hit (T = 1: the few experts' blocks must fill the SMs;
/// 10-12% faster than 2), 1 when there are at least two pairs an expert (T = 16: nearly every
/// expert hit, no partial sums to add; 2-5% faster), 2 between (T = 2). The default since
/// session 15, whose `gpu_quant` run checked splits 1, 2 and 4 against the reference.
fn decode2_ksplit_auto(pairs: usize, experts: usize) -> usize {
    if pairs * 8 <= experts {
        4
    } else if pairs >= 2 * experts {
        1
    } else {
        2
    }
}

/// Warps that split one `qdecode2_*` row group's reduction, for the gate_up and the down launch
/// (1, 2, 4 or 8, at most `warps`; 8 only when set, for measurements): `MOE_CUDA_QD2_KSPLIT`
/// (a number) sets both, `MOE_CUDA_QD2_KSPLIT_UP` / `_DOWN` one each; else
/// [`decode2_ksplit_auto`] when `auto` (the default), else 2.
fn decode2_ksplit(pairs: usize, experts: usize, warps: usize, auto: bool) -> (usize, usize) {
    // Read once: this runs on every decode forward.
    static FORCED: std::sync::OnceLock<[Option<usize>; 3]> = std::sync::OnceLock::new();
    let [both, up, down] = *FORCED.get_or_init(|| {
        let var = |name: &str| {
            std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).map(|k| match k {
                0 | 1 => 1,
                2 | 3 => 2,
                4..=7 => 4,
                _ => 8,
            })
        };
        [var("MOE_CUDA_QD2_KSPLIT"), var("MOE_CUDA_QD2_KSPLIT_UP"), var("MOE_CUDA_QD2_KSPLIT_DOWN")]
    });
    let both = both.unwrap_or_else(|| if auto { decode2_ksplit_auto(pairs, experts) } else { 2 });
    (up.unwrap_or(both).min(warps), down.unwrap_or(both).min(warps))
}

/// Shared memory a ring decode block may take (`MOE_CUDA_QD_SMEM_KB`, default 72 KiB: three
/// blocks an SM on sm_90).
fn decode_smem_budget() -> usize {
    static KB: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KB.get_or_init(|| std::env::var("MOE_CUDA_QD_SMEM_KB").ok().and_then(|v| v.parse().ok()).unwrap_or(72)) * 1024
}

/// Whether a quantized forward of `tokens` takes the grouped matrix-vector decode path by
/// default: up to 8 rows an expert on average (its MMAs take 16 rows at once, and it reads each
/// hit expert once), within [`QDECODE_MAX_PAIRS`].
pub fn decode_auto(tokens: usize, k: usize, n_local: usize) -> bool {
    let pairs = tokens * k;
    pairs <= QDECODE_MAX_PAIRS && (tokens <= 2 || pairs <= 8 * n_local.max(1))
}

/// The launch plan of a quantized forward: the heuristics' layout with row tiles of at most 64
/// (the weight-only GEMM has m16 and m64 tiles); 128-row contiguous tiles stay when the FP8
/// tensor-core GEMM runs them (`fp8_mma`).
pub fn plan(tokens: usize, k: usize, n_local: usize, masked_max: usize, fp8_mma: bool) -> Plan {
    let p = heuristics::plan(tokens, k, n_local, masked_max);
    if p.tile.block_m() == 128 && p.layout == Layout::Contiguous && fp8_mma {
        return Plan { tile: GemmTile::M128, ..p };
    }
    if p.tile.block_m() <= 64 {
        return Plan { tile: if p.tile.block_m() <= 16 { GemmTile::M16 } else { GemmTile::M64 }, ..p };
    }
    if let Layout::Masked { max_m } = p.layout {
        // max_m is a multiple of the 128-row tile, so of 64 as well.
        return Plan { tile: GemmTile::M64, tiles: n_local.max(1) * max_m / 64, ..p };
    }
    let tiles = (tokens * k).div_ceil(64) + n_local.max(1);
    Plan { layout: Layout::Contiguous, tile: GemmTile::M64, tiles, rows: tiles * 64 }
}

/// The quantized launch parameters sharing everything but the weights with a bf16 launch.
pub fn params(g: &crate::kernels::GemmParams) -> QGemmParams {
    QGemmParams { base: GemmParams { w: 0, n: 0, k: 0, num_n: 0, ..*g }, ..Default::default() }
}

/// One projection of every local slot on the device.
#[derive(Debug)]
struct DeviceProj {
    rows: usize,
    cols: usize,
    w: CudaSlice<u8>,
    scales: Option<CudaSlice<u8>>,
    col: Option<CudaSlice<f32>>,
    exp: Option<CudaSlice<f32>>,
}

impl DeviceProj {
    fn bytes(&self) -> usize {
        self.w.len() + self.scales.as_ref().map_or(0, |s| s.len()) + 4 * self.col.as_ref().map_or(0, |c| c.len())
    }
}

/// Per-slot element counts of the device parts.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    w: usize,
    s: usize,
    col: usize,
    exp: bool,
}

/// Quantized experts (both projections of every local slot) on one GPU.
#[derive(Debug)]
pub struct QuantExperts {
    format: QuantFormat,
    packer: Box<dyn Packer>,
    elem: Elem,
    w13: DeviceProj,
    w2: DeviceProj,
    ws: Workspace,
    /// FP8 block on sm_90a: the wgmma tile (default; `MOE_CUDA_F8_TILE=0` keeps mma.sync).
    use_f8_tile: bool,
    /// The packed decode kernels: 0 `qdecode2_*`; `qdecode_*` with a cp.async ring of 8 (1) or
    /// 16 (2) slots, or through registers (3).
    decode_mode: usize,
    /// `qdecode2_*` splits its reductions by the forward's pairs an expert (else over 2 warps).
    decode_split_auto: bool,
}

/// What one quantized forward takes from the backend: the plan, the permuted activations and
/// outputs (inside `g1`/`g2`: `g1.a` the permuted rows, `g1.out` the activation buffer, `g2.a`
/// the same activation buffer, `g2.out` the f32 partial outputs), biases, tile map, epilogue.
#[derive(Debug, Clone, Copy)]
pub struct Forward {
    /// The plan of [`plan`].
    pub plan: Plan,
    /// Routed (token, expert) pairs.
    pub pairs: usize,
    /// Local slots.
    pub n_local: usize,
    /// gate_up launch parameters.
    pub g1: QGemmParams,
    /// down launch parameters (`split_stride` set for split K).
    pub g2: QGemmParams,
    /// Hidden size.
    pub hidden: usize,
    /// Intermediate size.
    pub inter: usize,
    /// K splits of the down projection (the backend sized `g2.out` for them).
    pub down_splits: usize,
    /// Nonzero: `g1.a` holds the token rows `[pairs / top_k, hidden]` (no permuted copy) and this
    /// the i32 layout row of each (token, choice) pair (-1: not local); the FP8 path gathers and
    /// quantizes them in one pass. 0: `g1.a` is the permuted copy `[plan.rows, hidden]`.
    pub row_of: u64,
    /// Choices per token.
    pub top_k: usize,
    /// Whether the down projection may write 16-bit outputs (one split, routed rows).
    pub y16: bool,
    /// FP8 wire-form token rows (e4m3 `[pairs / top_k, hidden]`, token-major scales), placed
    /// into the FP8 GEMM's rows through `row_of` instead of quantizing `g1.a`.
    pub f8_src: Option<(u64, u64)>,
}

fn driver(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> MoeError {
    move |e| CudaError::driver(op, e).into()
}

fn alloc_proj(dev: &CudaDevice, n: usize, rows: usize, cols: usize, z: Sizes) -> Result<DeviceProj> {
    Ok(DeviceProj {
        rows,
        cols,
        w: dev.alloc::<u8>(n * z.w)?,
        // 16 bytes of tail slack: the decode ring reads 2-byte scale words as their aligned 4 bytes.
        scales: if z.s > 0 { Some(dev.alloc::<u8>(n * z.s + 16)?) } else { None },
        col: if z.col > 0 { Some(dev.alloc::<f32>(n * z.col)?) } else { None },
        exp: if z.exp { Some(dev.alloc::<f32>(n)?) } else { None },
    })
}

fn sizes(p: &HostParts) -> Sizes {
    Sizes { w: p.w.len(), s: p.scales.len(), col: p.col.len(), exp: p.exp.is_some() }
}

/// Writes one packed expert into slot `slot` of a projection.
fn write_slot(dev: &CudaDevice, d: &mut DeviceProj, slot: usize, p: &HostParts) -> Result<()> {
    let st = dev.stream();
    let z = sizes(p);
    let mut v = d.w.slice_mut(slot * z.w..(slot + 1) * z.w);
    st.memcpy_htod(&p.w, &mut v).map_err(driver("upload packed weights"))?;
    if let Some(s) = d.scales.as_mut() {
        let mut v = s.slice_mut(slot * z.s..(slot + 1) * z.s);
        st.memcpy_htod(&p.scales, &mut v).map_err(driver("upload scales"))?;
    }
    if let Some(c) = d.col.as_mut() {
        let mut v = c.slice_mut(slot * z.col..(slot + 1) * z.col);
        st.memcpy_htod(&p.col, &mut v).map_err(driver("upload channel scales"))?;
    }
    if let (Some(x), Some(val)) = (d.exp.as_mut(), p.exp) {
        let mut v = x.slice_mut(slot..slot + 1);
        st.memcpy_htod(&[val], &mut v).map_err(driver("upload expert scale"))?;
    }
    Ok(())
}

impl QuantExperts {
    /// Packs and uploads every expert of `x` (the local slots, in order).
    pub fn upload(dev: &CudaDevice, elem: Elem, x: &ExpertWeights) -> Result<QuantExperts> {
        let n = x.num_experts();
        Self::upload_pattern(dev, elem, x, &(0..n).collect::<Vec<_>>())
    }

    /// Uploads `src[slot]` of `x` into every slot (benchmarks replicate a few distinct experts).
    fn upload_pattern(dev: &CudaDevice, elem: Elem, x: &ExpertWeights, src: &[usize]) -> Result<QuantExperts> {
        let format = x.w13.format;
        if x.w2.format != format {
            return Err(bad(format, format!("w13 is {format} but w2 is {}", x.w2.format)));
        }
        let packer = packer(format).map_err(|r| MoeError::unsupported("cuda", r))?;
        if x.num_experts() == 0 || src.is_empty() {
            return Err(MoeError::shape("cuda.load_weights", "at least one local expert", "none"));
        }
        let method = quant_method(format, DType::BF16)?;
        method.validate(&x.w13)?;
        method.validate(&x.w2)?;
        let distinct: Vec<usize> = {
            let mut d = src.to_vec();
            d.sort_unstable();
            d.dedup();
            d
        };
        let first = distinct.first().copied().unwrap_or(0);
        let p13 = packer.pack(&x.w13, first, elem)?;
        let p2 = packer.pack(&x.w2, first, elem)?;
        let n = src.len().max(1);
        let mut w13 = alloc_proj(dev, n, x.w13.rows, x.w13.cols, sizes(&p13))?;
        let mut w2 = alloc_proj(dev, n, x.w2.rows, x.w2.cols, sizes(&p2))?;
        for &d in &distinct {
            let (a, b) = if d == first {
                (p13.clone(), p2.clone())
            } else {
                (packer.pack(&x.w13, d, elem)?, packer.pack(&x.w2, d, elem)?)
            };
            for (slot, _) in src.iter().enumerate().filter(|(_, &s)| s == d) {
                write_slot(dev, &mut w13, slot, &a)?;
                write_slot(dev, &mut w2, slot, &b)?;
            }
        }
        dev.synchronize()?;
        Ok(QuantExperts {
            format,
            packer,
            elem,
            w13,
            w2,
            ws: Workspace::default(),
            use_f8_tile: crate::fp8_gemm::tiles_enabled(),
            decode_mode: decode_mode(format),
            decode_split_auto: true,
        })
    }

    /// Benchmarks: `n` slots of `format` from `distinct` random experts quantized on the host and
    /// replicated (quantizing every expert of a large model on the host would take minutes).
    pub fn random(dev: &CudaDevice, elem: Elem, cfg: &MoeConfig, n: usize, distinct: usize, seed: u64) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let d = distinct.clamp(1, n.max(1));
        let method = quant_method(cfg.quant, DType::BF16)?;
        // splitmix64: uniform(-a, a), a = sqrt(3 / fan_in) (std 1/sqrt(fan_in), like the bf16 bench).
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = |len: usize, fan_in: usize| -> Vec<f32> {
            let a = (3.0 / fan_in as f32).sqrt();
            (0..len)
                .map(|_| {
                    state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^= z >> 31;
                    ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
                })
                .collect()
        };
        let x = ExpertWeights {
            w13: method.quantize(&uniform(d * 2 * i * h, h), d, 2 * i, h)?,
            w2: method.quantize(&uniform(d * h * i, i), d, h, i)?,
            b13: None,
            b2: None,
        };
        Self::upload_pattern(dev, elem, &x, &(0..n).map(|s| s % d).collect::<Vec<_>>())
    }

    /// A decode-sized forward: the format's grouped matrix-vector kernels (`qdecode_*`) over the
    /// packed weights. `p` carries everything but the weights, as the 16-bit decode kernels take
    /// it; `ypair` is `[T*k, H]` f32 scratch for the pairs' weighted down rows.
    pub fn decode(&self, dev: &CudaDevice, p: &DecodeParams, ypair: u64) -> Result<()> {
        let (h, i) = (p.hidden as usize, p.inter as usize);
        let pairs = (p.tokens * p.k) as usize;
        if pairs > QDECODE_MAX_PAIRS {
            return Err(MoeError::unsupported(
                "cuda",
                format!("the packed-weight decode path holds at most {QDECODE_MAX_PAIRS} (token, choice) pairs, got {pairs}"),
            ));
        }
        let (w13, w2) = (self.proj(Proj::GateUp, i, h)?, self.proj(Proj::Down, h, i)?);
        let opt = |s: &Option<CudaSlice<u8>>| s.as_ref().map_or(0, |s| dev.ptr(s));
        let opt32 = |s: &Option<CudaSlice<f32>>| s.as_ref().map_or(0, |s| dev.ptr(s));
        // An expert's pairs come from distinct tokens, so at most T of them share the staged rows;
        // more (or longer rows than fit) run in several rounds over the expert's weights.
        // The cp.async ring (8 or 16 slots of 16 + 4 bytes a lane, 8 warps) sits after the staged
        // rows; the default budget keeps three blocks an SM on Hopper.
        let row_bytes = |k: usize| (k + QD_PAD) * 2;
        let v2 = self.decode_mode == 0;
        let mut ring = if self.decode_mode == 1 || self.decode_mode == 2 { self.decode_mode } else { 0 };
        if ring * QD_RING_BYTES + row_bytes(h.max(i)) > QDECODE_SMEM as usize {
            ring = 0; // rows too long for a ring beside one staged row
        }
        let ring_bytes = ring * QD_RING_BYTES;
        let budget = if ring > 0 {
            decode_smem_budget().clamp(ring_bytes, QDECODE_SMEM as usize)
        } else {
            QDECODE_SMEM as usize
        };
        // v2 stages at most 8 rows (one mma column block): more members take more passes.
        let most = if v2 { 8 } else { 16 };
        let rows = |k: usize| (p.tokens as usize).min(most).min((budget - ring_bytes) / row_bytes(k)).max(1);
        let (ru, rd) = (rows(h), rows(i));
        let q = QDecodeParams {
            d: DecodeParams { w13: dev.ptr(&w13.w), w2: dev.ptr(&w2.w), ..*p },
            s13: opt(&w13.scales),
            c13: opt32(&w13.col),
            e13: opt32(&w13.exp),
            s2: opt(&w2.scales),
            c2: opt32(&w2.col),
            e2: opt32(&w2.exp),
            ypair,
            rows_up: ru as i32,
            rows_down: rd as i32,
            ring: ring as i32,
            ksplit: 1,
        };
        let smem = |r: usize, k: usize| (r * row_bytes(k) + ring_bytes) as u32;
        let kind = self.packer.kind();
        // v1: 8 warps of 4 intermediate / 8 hidden columns. v2: `warps / ksplit` row groups a
        // block of 8 intermediate / 16 hidden columns, each reduced by `ksplit` warps.
        let (warps, ks_up, ks_down, up_id, down_id) = if v2 {
            let warps = decode2_warps();
            let (up, down) = decode2_ksplit(pairs, p.n_local as usize, warps, self.decode_split_auto);
            (warps, up, down, KernelId::QDecode2GateUp(kind, self.elem), KernelId::QDecode2Down(kind, self.elem))
        } else {
            (8, 1, 1, KernelId::QDecodeGateUp(kind, self.elem), KernelId::QDecodeDown(kind, self.elem))
        };
        let (up_cols, down_cols) = if v2 { (8 * warps / ks_up, 16 * warps / ks_down) } else { (32, 64) };
        let threads = 32 * warps as u32;
        let grid_up = (i.div_ceil(up_cols) as u32, pairs as u32, 1);
        let q_up = QDecodeParams { ksplit: ks_up as i32, ..q };
        dev.launch(up_id, grid_up, threads, smem(ru, h), &q_up)?;
        let grid_down = (h.div_ceil(down_cols) as u32, pairs as u32, 1);
        let q_down = QDecodeParams { ksplit: ks_down as i32, ..q };
        dev.launch_dep(down_id, grid_down, threads, smem(rd, i), &q_down, Dep::Programmatic)?;
        let n = p.tokens as usize * h;
        let grid_sum = (n.div_ceil(256) as u32, 1, 1);
        dev.launch_dep(KernelId::QDecodeSum(kind, self.elem), grid_sum, 256, 0, &q, Dep::Programmatic)?;
        Ok(())
    }

    /// Benchmarks and tests: FP8 block on sm_90a through the wgmma tile (default) or mma.sync.
    pub fn set_f8_tile(&mut self, on: bool) {
        self.use_f8_tile = on;
    }

    /// Tests and benchmarks: which packed decode kernels run (0 `qdecode2_*`; `qdecode_*` with
    /// a ring of 8 (1) or 16 (2) slots a lane, or registers (3); larger values mean 3).
    pub fn set_decode_mode(&mut self, mode: usize) {
        self.decode_mode = mode.min(3);
    }

    /// Tests and benchmarks: whether `qdecode2_*` splits its reductions by the forward's pairs
    /// an expert (the default) or over 2 warps.
    pub fn set_decode_split_auto(&mut self, on: bool) {
        self.decode_split_auto = on;
    }

    /// The format held.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Device bytes of the packed experts.
    pub fn bytes(&self) -> usize {
        self.w13.bytes() + self.w2.bytes()
    }

    /// EPLB: overwrites slot `slot` with expert `src` of `weights` (every part of both
    /// projections, packed on the host first so a bad expert leaves the slot untouched).
    pub fn replace_slot(&mut self, dev: &CudaDevice, slot: usize, weights: &ExpertWeights, src: usize) -> Result<()> {
        if weights.w13.format != self.format || weights.w2.format != self.format {
            return Err(bad(self.format, format!("replace_slot got {} weights", weights.w13.format)));
        }
        let one = weights.select_experts(&[src])?;
        let method = quant_method(self.format, DType::BF16)?;
        method.validate(&one.w13)?;
        method.validate(&one.w2)?;
        let a = self.packer.pack(&one.w13, 0, self.elem)?;
        let b = self.packer.pack(&one.w2, 0, self.elem)?;
        for (d, t, p) in [(&self.w13, &weights.w13, &a), (&self.w2, &weights.w2, &b)] {
            if (d.rows, d.cols) != (t.rows, t.cols) {
                return Err(MoeError::shape(
                    "cuda.replace_slot",
                    format!("[{}, {}] projections", d.rows, d.cols),
                    format!("[{}, {}]", t.rows, t.cols),
                ));
            }
            if d.w.len() < (slot + 1) * p.w.len() {
                let slots = d.w.len() / p.w.len().max(1);
                return Err(MoeError::shape("cuda.replace_slot", format!("slot < {slots}"), slot.to_string()));
            }
        }
        write_slot(dev, &mut self.w13, slot, &a)?;
        write_slot(dev, &mut self.w2, slot, &b)?;
        Ok(())
    }

    /// Both projections of one forward: FP8 tensor cores for 128-row tiles of FP8 weights
    /// (activations quantized per row per 128 channels in between), the weight-only GEMMs
    /// otherwise, with gate_up split over K at decode sizes (bias + activation in `qg_act`).
    /// Returns the element type of the down outputs in `g2.out` (0 f32, 1 bf16, 2 f16).
    pub fn forward(&mut self, dev: &CudaDevice, f: &Forward) -> Result<i32> {
        let (h, inter, rows) = (f.hidden, f.inter, f.plan.rows);
        if f.plan.tile.block_m() == fp8_tile::BM {
            let qa = self.ws.get(dev, "f8_a", rows * h)?;
            let sa = self.ws.get(dev, "f8_sa", rows * (h / 128) * 4)?;
            let src = if f.row_of != 0 {
                // Token rows straight to their layout rows (no 16-bit permuted copy).
                let tokens = f.pairs / f.top_k.max(1);
                QuantRowsParams { dest: f.row_of, src_rows: tokens as i32, top_k: f.top_k as i32, ..Default::default() }
            } else {
                self.skip_padding(f)
            };
            match f.f8_src {
                Some((q_src, s_src)) if f.row_of != 0 => {
                    let p = F8RowsParams {
                        q_src,
                        s_src,
                        dest: f.row_of,
                        q: qa,
                        scales: sa,
                        src_rows: src.src_rows,
                        k: h as i32,
                        top_k: f.top_k as i32,
                        rows: rows as i32,
                        ..Default::default()
                    };
                    dev.launch(KernelId::PlaceF8Rows, (src.src_rows.max(1) as u32, 1, 1), 128, 0, &p)?;
                }
                Some(_) => {
                    return Err(MoeError::unsupported(
                        "cuda",
                        "internal: FP8 token rows reached the FP8 GEMM without their layout rows",
                    ))
                }
                None => self.quant_rows(
                    dev,
                    QuantRowsParams { x: f.g1.base.a, q: qa, scales: sa, k: h as i32, ..src },
                    rows,
                )?,
            }
            let g1 = QGemmParams { base: GemmParams { a: qa, ..f.g1.base }, ..f.g1 };
            self.fp8_gemm(dev, Proj::GateUp, f.plan.tiles, g1, sa, rows, inter, h, false)?;
            let qact = self.ws.get(dev, "f8_act", rows * inter)?;
            let sact = self.ws.get(dev, "f8_sact", rows * (inter / 128) * 4)?;
            let act =
                QuantRowsParams { x: f.g1.base.out, q: qact, scales: sact, k: inter as i32, ..self.skip_padding(f) };
            self.quant_rows(dev, act, rows)?;
            let g2 = QGemmParams { base: GemmParams { a: qact, ..f.g2.base }, ..f.g2 };
            let y16 = f.y16 && f.down_splits == 1 && f.g2.base.mode != GemmMode::Dense as i32;
            let wrote16 = self.fp8_gemm(dev, Proj::Down, f.plan.tiles, g2, sact, rows, h, inter, y16)?;
            return Ok(match (wrote16, self.elem) {
                (false, _) => 0,
                (true, Elem::Bf16) => 1,
                (true, Elem::F16) => 2,
            });
        }
        if f.row_of != 0 {
            return Err(MoeError::unsupported(
                "cuda",
                "internal: token rows without a permuted copy reached the weight-only GEMMs (only the FP8 \
                 128-row path gathers them)",
            ));
        }
        let splits = self.gate_up_splits(dev, f);
        if splits > 1 {
            let stride = rows * 2 * inter;
            let partial = self.ws.get(dev, "gu_partial", splits * stride * 4)?;
            let g1 =
                QGemmParams { base: GemmParams { out: partial, split_stride: stride as i64, ..f.g1.base }, ..f.g1 };
            self.gemm(dev, Proj::GateUp, f.plan.tile, f.plan.tiles, g1, inter, h, splits)?;
            let ap = QActParams {
                partial,
                bias: f.g1.base.bias,
                out: f.g1.base.out,
                tile_expert: f.g1.base.tile_expert,
                tile_end: f.g1.base.tile_end,
                counts: f.g1.base.counts,
                split_stride: stride as i64,
                n: inter as i32,
                splits: splits as i32,
                mode: f.g1.base.mode,
                max_m: f.g1.base.max_m,
                bm: f.plan.tile.block_m() as i32,
                act: f.g1.base.act,
                alpha: f.g1.base.alpha,
                limit: f.g1.base.limit,
            };
            dev.launch(
                KernelId::QAct(self.packer.kind(), self.elem),
                (inter.div_ceil(256) as u32, rows as u32, 1),
                256,
                0,
                &ap,
            )?;
        } else {
            self.gemm(dev, Proj::GateUp, f.plan.tile, f.plan.tiles, f.g1, inter, h, 1)?;
        }
        self.gemm(dev, Proj::Down, f.plan.tile, f.plan.tiles, f.g2, h, inter, f.down_splits)?;
        Ok(0)
    }

    /// K splits of gate_up: decode-sized problems have too few column blocks to keep every SM
    /// streaming weights (same reasoning as the bf16 down projection), so partial sums go to a
    /// scratch buffer and `qg_act` adds them with the bias and activation.
    fn gate_up_splits(&self, dev: &CudaDevice, f: &Forward) -> usize {
        if f.plan.tile != GemmTile::M16 || f.plan.rows > 65535 || f.g1.base.mode == GemmMode::Dense as i32 {
            return 1;
        }
        let active = f.pairs.min(f.n_local).max(1);
        let ctas = f.inter.div_ceil(QuantTile::BN / 2) * active;
        let want = (4 * dev.sm_count() as usize).div_ceil(ctas);
        want.clamp(1, 8).min((f.hidden / (4 * QuantTile::BK)).max(1))
    }

    /// Row quantization over every layout row, skipping the padding rows of contiguous tiles.
    fn skip_padding(&self, f: &Forward) -> QuantRowsParams {
        let contiguous = f.g1.base.mode == GemmMode::Contiguous as i32;
        QuantRowsParams {
            tile_expert: if contiguous { f.g1.base.tile_expert } else { 0 },
            tile_end: f.g1.base.tile_end,
            src_rows: f.plan.rows as i32,
            tile_m: f.plan.tile.block_m() as i32,
            ..Default::default()
        }
    }

    /// `moe_quant_rows` over `p`'s source rows into `rows` layout rows (`p.k` channels a row).
    fn quant_rows(&self, dev: &CudaDevice, p: QuantRowsParams, rows: usize) -> Result<()> {
        launch_quant_rows(dev, KernelId::QuantRows(self.packer.kind(), self.elem), p, rows)
    }

    #[allow(clippy::too_many_arguments)]
    fn fp8_gemm(
        &mut self,
        dev: &CudaDevice,
        proj: Proj,
        tiles: usize,
        mut g: QGemmParams,
        a_scales: u64,
        rows: usize,
        n: usize,
        k: usize,
        y16: bool,
    ) -> Result<bool> {
        let counter = self.ws.get(dev, "f8_counter", 4)?;
        let d = self.proj(proj, n, k)?;
        g.base.w = dev.ptr(&d.w);
        g.scales = d.scales.as_ref().map_or(0, |s| dev.ptr(s));
        g.col_scale = d.col.as_ref().map_or(0, |s| dev.ptr(s));
        g.exp_scale = d.exp.as_ref().map_or(0, |s| dev.ptr(s));
        g.base.n = n as i32;
        g.base.k = k as i32;
        let cols = if proj == Proj::GateUp { QuantTile::BN / 2 } else { QuantTile::BN };
        let num_n = n.div_ceil(cols);
        g.base.num_n = num_n as i32;
        let blocks = num_n * tiles;
        if blocks > i32::MAX as usize {
            return Err(MoeError::shape("cuda.fp8_gemm", "fewer than 2^31 blocks", blocks.to_string()));
        }
        // Hopper, block scales: the TMA + wgmma tile (crate::fp8_gemm) instead of mma.sync.
        let gate_up = proj == Proj::GateUp;
        if self.packer.kind() == QuantKind::Fp8Block
            && self.use_f8_tile
            && crate::fp8_gemm::refuse(dev.arch(), n, k, gate_up).is_none()
        {
            if let Some(scales) = d.scales.as_ref() {
                let f8 = crate::fp8_gemm::Fp8Gemm {
                    gate_up,
                    // n, k and num_n are set by the launch; no split partials on this tile.
                    params: GemmParams { split_stride: 0, ..g.base },
                    tiles,
                    n,
                    k,
                    a_rows: rows,
                    a_scales,
                    w_rows: d.w.len() / k,
                    w_scales: dev.ptr(scales),
                    y16,
                };
                crate::fp8_gemm::launch(dev, self.elem, counter, &f8)?;
                return Ok(y16);
            }
        }
        let p = Fp8GemmParams { g, a_scales, rows_total: rows as i32, pad: 0 };
        let id = KernelId::F8Gemm(self.packer.kind(), self.elem, proj);
        dev.launch(id, (blocks as u32, 1, 1), fp8_tile::THREADS, fp8_tile::SMEM, &p)?;
        Ok(false)
    }

    fn proj(&self, proj: Proj, n: usize, k: usize) -> Result<&DeviceProj> {
        let d = match proj {
            Proj::GateUp => &self.w13,
            Proj::Down => &self.w2,
        };
        let want_rows = if proj == Proj::GateUp { 2 * n } else { n };
        if d.rows != want_rows || d.cols != k {
            return Err(MoeError::shape(
                "cuda.quant_gemm",
                format!("[{want_rows}, {k}] weights"),
                format!("[{}, {}]", d.rows, d.cols),
            ));
        }
        Ok(d)
    }

    /// Launches one projection's weight-only grouped GEMM. `p` carries activations, output,
    /// bias, the row tile map and the epilogue; this fills in the weights and the grid.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        dev: &CudaDevice,
        proj: Proj,
        tile: GemmTile,
        tiles: usize,
        mut p: QGemmParams,
        n: usize,
        k: usize,
        splits: usize,
    ) -> Result<()> {
        let d = self.proj(proj, n, k)?;
        let qt = match tile.block_m() {
            16 => QuantTile::M16,
            64 => QuantTile::M64,
            m => return Err(MoeError::shape("cuda.quant_gemm", "row tiles of 16 or 64", m.to_string())),
        };
        p.base.w = dev.ptr(&d.w);
        p.scales = d.scales.as_ref().map_or(0, |s| dev.ptr(s));
        p.col_scale = d.col.as_ref().map_or(0, |s| dev.ptr(s));
        p.exp_scale = d.exp.as_ref().map_or(0, |s| dev.ptr(s));
        p.base.n = n as i32;
        p.base.k = k as i32;
        let cols = match proj {
            Proj::GateUp => QuantTile::BN / 2,
            Proj::Down => QuantTile::BN,
        };
        let num_n = n.div_ceil(cols);
        p.base.num_n = num_n as i32;
        let blocks = num_n * tiles;
        if blocks > i32::MAX as usize {
            return Err(MoeError::shape("cuda.quant_gemm", "fewer than 2^31 blocks", blocks.to_string()));
        }
        let kind = self.packer.kind();
        let id = KernelId::QGemm(kind, self.elem, qt, proj);
        dev.launch(id, (blocks as u32, 1, splits.max(1) as u32), qt.threads(), qt.smem_bytes(kind), &p)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_split_follows_the_pairs_an_expert() {
        let split = decode2_ksplit_auto;
        // gpt-oss-20b (32 experts, top-4): T = 1, 2, 16 measured best at 4, 2, 1.
        assert_eq!(split(4, 32), 4);
        assert_eq!(split(8, 32), 2);
        assert_eq!(split(64, 32), 1);
        // qwen3-30b-a3b (128 experts, top-8): T = 1 and 2 hit at most one expert in 8.
        assert_eq!(split(8, 128), 4);
        assert_eq!(split(16, 128), 4);
        assert_eq!(split(128, 128), 2);
        assert_eq!(split(256, 128), 1);
    }

    #[test]
    fn packed_decode_takes_up_to_eight_rows_an_expert_within_the_pair_limit() {
        // gpt-oss-20b (32 experts, top-4): T = 16 (64 pairs) and T = 64 (256) decode, T = 65 not.
        assert!(decode_auto(16, 4, 32) && decode_auto(64, 4, 32) && !decode_auto(65, 4, 32));
        // deepseek-v3 (256, top-8): up to the pair limit, T = 32; qwen3 (128, top-8) likewise.
        assert!(decode_auto(32, 8, 256) && !decode_auto(33, 8, 256));
        assert!(decode_auto(32, 8, 128) && !decode_auto(33, 8, 128));
        // Few experts: T <= 2 always, then at most 8 rows an expert (8 experts, top-2: T <= 32).
        assert!(decode_auto(2, 8, 1) && decode_auto(32, 2, 8) && !decode_auto(33, 2, 8));
    }

    #[test]
    fn large_masked_plans_use_64_row_tiles() {
        // 200 tokens on the masked layout: 256 rows an expert, 128-row tiles in the bf16 plan.
        let p = plan(200, 2, 8, 1 << 20, false);
        assert_eq!(p.layout, Layout::Masked { max_m: 256 });
        assert_eq!((p.tile, p.tiles, p.rows), (GemmTile::M64, 8 * 256 / 64, 8 * 256));
        let p = plan(600, 2, 8, 0, false);
        assert_eq!((p.layout, p.tile), (Layout::Contiguous, GemmTile::M64));
        assert_eq!(plan(600, 2, 8, 0, true).tile, GemmTile::M128);
    }

    #[test]
    fn nibble_repack_puts_consecutive_elements_in_halves() {
        // Elements 0..7 with value = index: bytes (1 << 4 | 0), (3 << 4 | 2), ...
        let bytes = [0x10u8, 0x32, 0x54, 0x76];
        let w = u32::from_le_bytes(repack_nibbles(&bytes).try_into().unwrap());
        for k in 0..4 {
            let t = w >> (4 * k);
            assert_eq!(t & 0xF, 2 * k);
            assert_eq!((t >> 16) & 0xF, 2 * k + 1);
        }
    }

    // Host models of quant_gemm.cu's bit placement: the 16-bit pattern the kernel builds, read
    // back as a number, times the constant the kernel multiplies by, must be the format's value
    // (subnormal patterns included).
    fn bf16_val(bits: u32) -> f32 {
        f32::from_bits((bits & 0xFFFF) << 16)
    }
    fn f16_val(bits: u32) -> f32 {
        half::f16::from_bits((bits & 0xFFFF) as u16).to_f32()
    }

    #[test]
    fn fp4_bit_placement_matches_e2m1() {
        use moe_core::quant::codec::E2M1_LUT;
        for code in 0..16u32 {
            // `fp4_pair<0>` for bf16 and f16 on the low half.
            let b = ((code << 6) & 0x01C0) | ((code << 12) & 0x8000);
            let h = ((code << 9) & 0x0E00) | ((code << 12) & 0x8000);
            assert_eq!(bf16_val(b) * 2f32.powi(126), E2M1_LUT[code as usize], "bf16 code {code}");
            assert_eq!(f16_val(h) * 2f32.powi(14), E2M1_LUT[code as usize], "f16 code {code}");
        }
    }

    #[test]
    fn fp8_bit_placement_matches_e4m3() {
        use moe_core::quant::codec::{e4m3_is_nan, e4m3_to_f32};
        for byte in 0..256u32 {
            if e4m3_is_nan(byte as u8) {
                continue;
            }
            let b = ((byte << 4) & 0x07F0) | ((byte << 8) & 0x8000);
            let h = ((byte << 7) & 0x3F80) | ((byte << 8) & 0x8000);
            let want = e4m3_to_f32(byte as u8);
            assert_eq!(bf16_val(b) * 2f32.powi(120), want, "bf16 byte {byte:#x}");
            assert_eq!(f16_val(h) * 256.0, want, "f16 byte {byte:#x}");
        }
    }

    #[test]
    fn int4_magic_gives_code_minus_zero() {
        for q in 0..16u32 {
            assert_eq!(bf16_val(q | 0x4300) - (128.0 + 3.0), q as f32 - 3.0);
            assert_eq!(f16_val(q | 0x6400) - (1024.0 + 3.0), q as f32 - 3.0);
        }
    }

    #[test]
    fn group_words_pack_consecutive_groups() {
        // 2 rows, 128 columns, groups of 32 -> 4 groups; span 64 -> 2 words of 2 bytes per row.
        let groups: Vec<u8> = (0..8).collect();
        let w = group_words(2, 128, &groups, 32, 64);
        assert_eq!(w, vec![0, 1, 4, 5, 2, 3, 6, 7]);
    }

    #[test]
    fn row_tiles_put_a_decode_load_in_one_contiguous_run() {
        // 16 rows; 8 chunks a row (full blocks) and 6 (a 2-wide last block, as gpt-oss's 90).
        for chunks in [8usize, 6] {
            let rows = 16;
            // Chunk (r, c) holds the bytes r, c, then 14 filler bytes.
            let w: Vec<u8> = (0..rows * chunks)
                .flat_map(|i| [(i / chunks) as u8, (i % chunks) as u8].into_iter().chain([0xAA; 14]))
                .collect();
            let t = tile_rows8(&w, rows, chunks * 16, QuantFormat::Mxfp4).unwrap();
            let at = |i: usize| (t[16 * i] as usize, t[16 * i + 1] as usize);
            // A lane (g, q) of the decode loads chunk 4 b + q of row 8 tile + g at 32 b + g wb + q.
            for tile in 0..rows / 8 {
                for b in 0..chunks.div_ceil(4) {
                    let wb = 4.min(chunks - 4 * b);
                    for g in 0..8 {
                        for q in 0..wb {
                            assert_eq!(at(tile * 8 * chunks + 32 * b + g * wb + q), (8 * tile + g, 4 * b + q));
                        }
                    }
                }
            }
            // A bijection: every chunk exactly once.
            let mut seen: Vec<(usize, usize)> = (0..rows * chunks).map(at).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), rows * chunks);
        }
        assert!(tile_rows8(&[0u8; 12 * 32], 12, 32, QuantFormat::Int4Group).is_err());
        assert!(tile_rows8(&[0u8; 8 * 32], 8, 48, QuantFormat::Int4Group).is_err());
    }

    #[test]
    fn scale_tiles_keep_eight_rows_of_a_span_together() {
        // 16 rows, 3 spans, 2-byte words: word (k, r) = [k, r].
        let s: Vec<u8> = (0..3).flat_map(|k| (0..16).flat_map(move |r| [k as u8, r as u8])).collect();
        let t = tile_scales8(&s, 16, 3, 2, QuantFormat::Mxfp4).unwrap();
        for r in 0..16 {
            for k in 0..3 {
                let i = (r / 8) * 24 + k * 8 + r % 8;
                assert_eq!((t[2 * i], t[2 * i + 1]), (k as u8, r as u8));
            }
        }
        assert!(tile_scales8(&s, 16, 2, 2, QuantFormat::Mxfp4).is_err());
    }
}
