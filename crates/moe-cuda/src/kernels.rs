//! Every kernel by typed id: [`KernelId`] produces each entry-point name, so call sites never
//! spell a kernel name. The CUDA sources live in `kernels/*.cu` (compiled at run time by NVRTC);
//! the `#define`s there that mirror the enums below are checked by a unit test.

use cudarc::driver::DeviceRepr;

/// Shared helpers prepended to every module.
pub const COMMON_SRC: &str = include_str!("../kernels/common.cuh");

/// A compilation unit (one `.cu` file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    /// Router logits and routing methods.
    Route,
    /// Counts, layouts, permute, unpermute-reduce, finalize.
    Permute,
    /// Grouped GEMMs with fused epilogues, one module per element type.
    GroupedGemm(Elem),
    /// Weight-only quantized grouped GEMMs (`quant_gemm.cu`), one module per format and type.
    QuantGemm(QuantKind, Elem),
    /// Matrix-vector expert MLPs for decode-sized forwards.
    Decode,
}

impl Module {
    /// Every module.
    pub const ALL: [Module; 5] = [
        Module::Route,
        Module::Permute,
        Module::GroupedGemm(Elem::Bf16),
        Module::GroupedGemm(Elem::F16),
        Module::Decode,
    ];

    /// Every module, the quantized GEMM modules included.
    pub fn every() -> Vec<Module> {
        let mut v = Module::ALL.to_vec();
        for q in QuantKind::ALL {
            v.extend([Module::QuantGemm(q, Elem::Bf16), Module::QuantGemm(q, Elem::F16)]);
        }
        v
    }

    /// File stem, used in cache file names and errors.
    pub fn name(self) -> &'static str {
        match self {
            Module::QuantGemm(q, Elem::Bf16) => q.module_bf16(),
            Module::QuantGemm(q, Elem::F16) => q.module_f16(),
            Module::Route => "route",
            Module::Permute => "permute",
            Module::GroupedGemm(Elem::Bf16) => "grouped_gemm_bf16",
            Module::GroupedGemm(Elem::F16) => "grouped_gemm_f16",
            Module::Decode => "decode",
        }
    }

    /// Full source text: the common header followed by the module.
    pub fn source(self) -> String {
        let body = match self {
            Module::Route => include_str!("../kernels/route.cu"),
            Module::Permute => include_str!("../kernels/permute.cu"),
            Module::GroupedGemm(_) => include_str!("../kernels/grouped_gemm.cu"),
            Module::QuantGemm(q, d) => {
                let dt = if d == Elem::Bf16 { "BF16" } else { "F16" };
                return format!(
                    "#define QFMT {}\n#define MOE_QGEMM_{dt} 1\n{}{COMMON_SRC}\n{}",
                    q as i32,
                    qd2_defines(),
                    include_str!("../kernels/quant_gemm.cu")
                );
            }
            Module::Decode => include_str!("../kernels/decode.cu"),
        };
        let select = match self {
            Module::GroupedGemm(Elem::Bf16) => "#define MOE_GEMM_BF16 1\n",
            Module::GroupedGemm(Elem::F16) => "#define MOE_GEMM_F16 1\n",
            _ => "",
        };
        format!("{select}{COMMON_SRC}\n{body}")
    }
}

/// `qdecode2_*` build switches for measurements (`MOE_CUDA_QD2_U`: 4-chunk blocks in flight,
/// 1-4; `MOE_CUDA_QD2_MINB`: blocks of 256 threads an SM the registers are sized for, 1-4):
/// defines ahead of quant_gemm.cu when set, so the kernel cache keys them.
fn qd2_defines() -> &'static str {
    static DEFS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DEFS.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok()).map(|v| v.clamp(1, 4));
        let mut d = String::new();
        if let Some(u) = var("MOE_CUDA_QD2_U") {
            d.push_str(&format!("#define QD2_U {u}\n"));
        }
        if let Some(m) = var("MOE_CUDA_QD2_MINB") {
            d.push_str(&format!("#define QD2_MINB {m}\n"));
        }
        d
    })
}

/// The 16-bit element type of activations and expert weights on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Elem {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl Elem {
    fn suffix(self) -> &'static str {
        match self {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
        }
    }
}

/// A GEMM tile configuration; BN = 128 for all. Must match the `*_ENTRY` lines of grouped_gemm.cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GemmTile {
    /// mma.sync, 16 rows, BK 64, 4 warps along N, 4 stages: decode-sized groups.
    M16,
    /// mma.sync, 64 rows, BK 64, 2x2 warps, 3 stages.
    M64,
    /// mma.sync, 128 rows, BK 32, 2x4 warps, 4 stages.
    M128,
    /// Hopper wgmma (sm_90a only), 128 x 128, BK 64, two warpgroups, 4 stages, swizzled tiles.
    W128,
    /// Hopper wgmma (sm_90a only), 128 x 256, BK 64, two warpgroups, 4 stages, swizzled tiles.
    W256,
    /// Hopper wgmma (sm_90a only), 128 x 256, BK 64: a TMA producer warpgroup and two MMA
    /// warpgroups over a 4-stage mbarrier ring, persistent grid (`TmaGemmParams`).
    T256,
    /// T256 in 2-CTA clusters over two row tiles of one expert that share their weight tile
    /// (each CTA loads half and multicasts it); the layout aligns experts to 256 rows.
    T256X2,
    /// The T256 structure for e4m3 operands with block scales: 128 x 128 tiles, 128-byte
    /// k-tiles, 6 stages (`F8TmaParams`).
    F8T128,
    /// F8T128 in 2-CTA clusters over neighbouring column blocks that share their A tile (each
    /// CTA loads half and multicasts it): needs an even column-block count.
    F8T128X2,
    /// The F8T128 structure with 128 x 256 tiles (a consumer promotes one 128-column half at a
    /// time), 4 stages.
    F8T256,
    /// F8T256 in 2-CTA clusters over neighbouring column blocks that share their A tile (each
    /// CTA loads half and multicasts it): needs an even column-block count.
    F8T256X2,
}

impl GemmTile {
    /// Every tile.
    pub const ALL: [GemmTile; 11] = [
        GemmTile::M16,
        GemmTile::M64,
        GemmTile::M128,
        GemmTile::W128,
        GemmTile::W256,
        GemmTile::T256,
        GemmTile::T256X2,
        GemmTile::F8T128,
        GemmTile::F8T128X2,
        GemmTile::F8T256,
        GemmTile::F8T256X2,
    ];
    /// K elements per pipeline stage of the m64/m128 tiles (`GEMM_BK`).
    pub const BK: usize = 32;

    /// The tile each CTA of a cluster runs: the 2-CTA forms share every per-CTA property of
    /// their one-CTA tile and differ only in [`Self::cluster`] and their entry.
    pub fn single(self) -> GemmTile {
        match self {
            GemmTile::T256X2 => GemmTile::T256,
            GemmTile::F8T128X2 => GemmTile::F8T128,
            GemmTile::F8T256X2 => GemmTile::F8T256,
            t => t,
        }
    }

    /// Rows per tile (BM).
    pub fn block_m(self) -> usize {
        match self.single() {
            GemmTile::M16 => 16,
            GemmTile::M64 => 64,
            _ => 128,
        }
    }

    /// Columns of the weight tile (BN).
    pub fn block_n(self) -> usize {
        if matches!(self.single(), GemmTile::W256 | GemmTile::T256 | GemmTile::F8T256) {
            256
        } else {
            128
        }
    }

    fn block_k(self) -> usize {
        match self.single() {
            GemmTile::M128 => Self::BK,
            GemmTile::F8T128 | GemmTile::F8T256 => 128,
            _ => 64,
        }
    }

    /// Threads per block.
    pub fn threads(self) -> u32 {
        match self.single() {
            GemmTile::M16 | GemmTile::M64 => 128,
            GemmTile::M128 | GemmTile::W128 | GemmTile::W256 => 256,
            _ => 384,
        }
    }

    fn stages(self) -> usize {
        match self.single() {
            GemmTile::F8T128 => 6,
            GemmTile::M64 => 3,
            _ => 4,
        }
    }

    /// Whether the tile uses Hopper-only instructions (wgmma): only for an `sm_90a` build.
    pub fn needs_sm90a(self) -> bool {
        !matches!(self, GemmTile::M16 | GemmTile::M64 | GemmTile::M128)
    }

    /// Whether the tile is one of the FP8 store's (e4m3 operands, [`F8TmaParams`]).
    pub fn is_fp8(self) -> bool {
        matches!(self.single(), GemmTile::F8T128 | GemmTile::F8T256)
    }

    /// Whether the kernel takes [`TmaGemmParams`] and runs a persistent grid.
    pub fn uses_tma(self) -> bool {
        self.single() == GemmTile::T256
    }

    /// CTAs a cluster of this tile runs as (they share an operand tile through TMA multicast).
    pub fn cluster(self) -> usize {
        if self.single() != self {
            2
        } else {
            1
        }
    }

    /// Dynamic shared memory per block in bytes.
    pub fn smem_bytes(self) -> u32 {
        let (m, n, k, s) = (self.block_m(), self.block_n(), self.block_k(), self.stages());
        match self.single() {
            // Unpadded swizzled tiles plus 1 KiB to align them to 1024 bytes.
            GemmTile::W128 | GemmTile::W256 => (s * (m + n) * k * 2 + 1024) as u32,
            // Plus a full and an empty mbarrier per stage.
            // The most any launch asks for (`t256_smem_bytes`).
            GemmTile::T256 => t256_smem_bytes(TW_SKIP_DEAD | TW_STAGED_EPI),
            // One byte per element, plus each stage's scales (128 row scales, 8 weight words).
            GemmTile::F8T128 | GemmTile::F8T256 => {
                (s * (m + n) * k + s * (m * 4 + 32) + 1024 + 2 * s * 8 + 4 * 8 + 4 * 4) as u32
            }
            _ => (s * (m + n) * (k + 8) * 2) as u32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            GemmTile::M16 => "m16",
            GemmTile::M64 => "m64",
            GemmTile::M128 => "m128",
            GemmTile::W128 => "w128",
            GemmTile::W256 => "w256",
            GemmTile::T256 => "t256",
            GemmTile::T256X2 => "t256x2",
            GemmTile::F8T128 => "f8t128",
            GemmTile::F8T128X2 => "f8t128x2",
            GemmTile::F8T256 => "f8t256",
            GemmTile::F8T256X2 => "f8t256x2",
        }
    }
}

/// Every kernel entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelId {
    /// `router_logits_{dt}`.
    RouterLogits(Elem),
    /// `router_prep_{dt}` (f32 activations and bias rows for the cuBLAS router).
    RouterPrep(Elem),
    /// `moe_route`.
    Route,
    /// `moe_count`.
    Count,
    /// `moe_layout`.
    Layout,
    /// `moe_permute_{dt}`.
    Permute(Elem),
    /// `moe_unpermute`.
    Unpermute,
    /// `moe_unpermute_wide`: the same reduce with a token's row loads issued together (k >= 8).
    UnpermuteWide,
    /// `moe_shared_gate_{dt}`.
    SharedGate(Elem),
    /// `moe_finalize_{dt}`.
    Finalize(Elem),
    /// `moe_fill_random_{dt}` (benchmarks).
    FillRandom(Elem),
    /// `moe_place_f8_rows`: dispatched FP8 rows and scales into their layout rows.
    PlaceF8Rows,
    /// `moe_dequant_f8_rows_{dt}`: dispatched FP8 rows to 16-bit activations.
    DequantF8Rows(Elem),
    /// `moe_fill_random_f32` (benchmarks).
    FillRandomF32,
    /// `gemm_gate_up_{dt}_{tile}`.
    GemmGateUp(Elem, GemmTile),
    /// `gemm_down_{dt}_{tile}`.
    GemmDown(Elem, GemmTile),
    /// `qgemm_{gate_up|down}_{dt}_{tile}` of the quantized module of one format.
    QGemm(QuantKind, Elem, QuantTile, Proj),
    /// `qg_act_{dt}`: bias + activation over split-K gate_up partial sums.
    QAct(QuantKind, Elem),
    /// `moe_quant_rows_{dt}` (FP8 formats): rows to e4m3 with per-128 scales.
    QuantRows(QuantKind, Elem),
    /// `f8gemm_{gate_up|down}_{dt}` (FP8 formats): FP8 tensor-core GEMM, 128 x 128 tiles.
    F8Gemm(QuantKind, Elem, Proj),
    /// `qdecode_gate_up_{dt}` of the quantized module of one format (decode sizes).
    QDecodeGateUp(QuantKind, Elem),
    /// `qdecode_down_{dt}` of the quantized module of one format (decode sizes).
    QDecodeDown(QuantKind, Elem),
    /// `qdecode_sum_{dt}`: each token's pair rows added in choice order (decode sizes).
    QDecodeSum(QuantKind, Elem),
    /// `qdecode2_gate_up_{dt}`: the decode gate_up with the packed weights as the A operand.
    QDecode2GateUp(QuantKind, Elem),
    /// `qdecode2_down_{dt}`: the decode down with the packed weights as the A operand.
    QDecode2Down(QuantKind, Elem),
    /// `moe_decode_gate_up_{dt}`.
    DecodeGateUp(Elem),
    /// `moe_decode_down_{dt}`.
    DecodeDown(Elem),
    /// `moe_decode_down_short_{dt}`: rows up to `DECODE_SHORT_MAX_INTER` held in registers.
    DecodeDownShort(Elem),
}

/// Largest intermediate size the short-row decode down kernel holds in registers (decode.cu:
/// `DOWN_PRE_CHUNKS` x 32 lanes x 8 elements).
pub const DECODE_SHORT_MAX_INTER: usize = 768;

impl KernelId {
    /// The module that defines this kernel.
    pub fn module(self) -> Module {
        match self {
            KernelId::RouterLogits(_) | KernelId::RouterPrep(_) | KernelId::Route => Module::Route,
            KernelId::Count
            | KernelId::Layout
            | KernelId::Permute(_)
            | KernelId::Unpermute
            | KernelId::UnpermuteWide
            | KernelId::SharedGate(_)
            | KernelId::Finalize(_)
            | KernelId::FillRandom(_)
            | KernelId::FillRandomF32
            | KernelId::PlaceF8Rows
            | KernelId::DequantF8Rows(_) => Module::Permute,
            KernelId::GemmGateUp(d, _) | KernelId::GemmDown(d, _) => Module::GroupedGemm(d),
            KernelId::QGemm(q, d, _, _)
            | KernelId::QAct(q, d)
            | KernelId::QuantRows(q, d)
            | KernelId::F8Gemm(q, d, _)
            | KernelId::QDecodeGateUp(q, d)
            | KernelId::QDecodeDown(q, d)
            | KernelId::QDecodeSum(q, d)
            | KernelId::QDecode2GateUp(q, d)
            | KernelId::QDecode2Down(q, d) => Module::QuantGemm(q, d),
            KernelId::DecodeGateUp(_) | KernelId::DecodeDown(_) | KernelId::DecodeDownShort(_) => Module::Decode,
        }
    }

    /// The `extern "C"` entry-point name.
    pub fn name(self) -> String {
        match self {
            KernelId::RouterLogits(d) => format!("router_logits_{}", d.suffix()),
            KernelId::RouterPrep(d) => format!("router_prep_{}", d.suffix()),
            KernelId::Route => "moe_route".into(),
            KernelId::Count => "moe_count".into(),
            KernelId::Layout => "moe_layout".into(),
            KernelId::Permute(d) => format!("moe_permute_{}", d.suffix()),
            KernelId::Unpermute => "moe_unpermute".into(),
            KernelId::UnpermuteWide => "moe_unpermute_wide".into(),
            KernelId::SharedGate(d) => format!("moe_shared_gate_{}", d.suffix()),
            KernelId::Finalize(d) => format!("moe_finalize_{}", d.suffix()),
            KernelId::FillRandom(d) => format!("moe_fill_random_{}", d.suffix()),
            KernelId::FillRandomF32 => "moe_fill_random_f32".into(),
            KernelId::PlaceF8Rows => "moe_place_f8_rows".into(),
            KernelId::DequantF8Rows(d) => format!("moe_dequant_f8_rows_{}", d.suffix()),
            KernelId::GemmGateUp(d, t) => format!("gemm_gate_up_{}_{}", d.suffix(), t.name()),
            KernelId::GemmDown(d, t) => format!("gemm_down_{}_{}", d.suffix(), t.name()),
            KernelId::QGemm(_, d, t, proj) => format!("qgemm_{}_{}_{}", proj.name(), d.suffix(), t.name()),
            KernelId::QAct(_, d) => format!("qg_act_{}", d.suffix()),
            KernelId::QuantRows(_, d) => format!("moe_quant_rows_{}", d.suffix()),
            KernelId::F8Gemm(_, d, proj) => format!("f8gemm_{}_{}", proj.name(), d.suffix()),
            KernelId::QDecodeGateUp(_, d) => format!("qdecode_gate_up_{}", d.suffix()),
            KernelId::QDecodeDown(_, d) => format!("qdecode_down_{}", d.suffix()),
            KernelId::QDecodeSum(_, d) => format!("qdecode_sum_{}", d.suffix()),
            KernelId::QDecode2GateUp(_, d) => format!("qdecode2_gate_up_{}", d.suffix()),
            KernelId::QDecode2Down(_, d) => format!("qdecode2_down_{}", d.suffix()),
            KernelId::DecodeGateUp(d) => format!("moe_decode_gate_up_{}", d.suffix()),
            KernelId::DecodeDown(d) => format!("moe_decode_down_{}", d.suffix()),
            KernelId::DecodeDownShort(d) => format!("moe_decode_down_short_{}", d.suffix()),
        }
    }

    /// Every kernel of every module (the compile-everything test walks this).
    pub fn all() -> Vec<KernelId> {
        let mut v = vec![
            KernelId::Route,
            KernelId::Count,
            KernelId::Layout,
            KernelId::Unpermute,
            KernelId::UnpermuteWide,
            KernelId::FillRandomF32,
            KernelId::PlaceF8Rows,
        ];
        for d in [Elem::Bf16, Elem::F16] {
            v.extend([
                KernelId::RouterLogits(d),
                KernelId::RouterPrep(d),
                KernelId::Permute(d),
                KernelId::SharedGate(d),
                KernelId::Finalize(d),
                KernelId::FillRandom(d),
                KernelId::DequantF8Rows(d),
                KernelId::DecodeGateUp(d),
                KernelId::DecodeDown(d),
                KernelId::DecodeDownShort(d),
            ]);
            for t in GemmTile::ALL {
                v.extend([KernelId::GemmGateUp(d, t), KernelId::GemmDown(d, t)]);
            }
            for q in QuantKind::ALL {
                for t in QuantTile::ALL {
                    v.extend([KernelId::QGemm(q, d, t, Proj::GateUp), KernelId::QGemm(q, d, t, Proj::Down)]);
                }
                v.extend([
                    KernelId::QAct(q, d),
                    KernelId::QDecodeGateUp(q, d),
                    KernelId::QDecodeDown(q, d),
                    KernelId::QDecodeSum(q, d),
                    KernelId::QDecode2GateUp(q, d),
                    KernelId::QDecode2Down(q, d),
                ]);
                if q.is_fp8() {
                    v.extend([
                        KernelId::QuantRows(q, d),
                        KernelId::F8Gemm(q, d, Proj::GateUp),
                        KernelId::F8Gemm(q, d, Proj::Down),
                    ]);
                }
            }
        }
        v
    }
}

/// Layout of GEMM row tiles; must match `MOE_MODE_*` in common.cuh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum GemmMode {
    /// Tile map built on the device from aligned offsets.
    Contiguous = 0,
    /// `[experts, max_m]` rows.
    Masked = 1,
    /// One expert, all rows (the shared expert).
    Dense = 2,
}

/// Activation kind; must match `MOE_ACT_*` in common.cuh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ActKind {
    /// SwiGLU.
    Swiglu = 0,
    /// GPT-OSS clamped SwiGLU.
    GptOss = 1,
    /// GELU-tanh GLU.
    GeluTanh = 2,
}

/// Routing method; must match `ROUTE_*` in route.cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum RouteMethod {
    /// Softmax, top-k, optional renormalization.
    SoftmaxTopk = 0,
    /// DeepSeek-V3 noaux_tc.
    DeepseekV3 = 1,
    /// DeepSeek-V2 greedy / group-limited greedy.
    DeepseekV2 = 2,
    /// GPT-OSS.
    GptOss = 3,
    /// Llama-4.
    Llama4 = 4,
}

/// Router logits launch parameters (`RouterLogitsParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RouterLogitsParams {
    pub x: u64,
    pub w: u64,
    pub bias: u64,
    pub logits: u64,
    pub tokens: i32,
    pub experts: i32,
    pub hidden: i32,
    pub pad: i32,
}

/// cuBLAS router preparation parameters (`RouterPrepParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RouterPrepParams {
    pub x: u64,
    pub x32: u64,
    pub bias: u64,
    pub logits: u64,
    pub n: i64,
    pub tokens: i32,
    pub experts: i32,
}

/// Routing launch parameters (`RouteParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteParams {
    pub logits: u64,
    pub bias: u64,
    pub ids: u64,
    pub weights: u64,
    pub err: u64,
    pub tokens: i32,
    pub experts: i32,
    pub k: i32,
    pub method: i32,
    pub n_group: i32,
    pub topk_group: i32,
    pub renormalize: i32,
    pub mask_neg_inf: i32,
    pub scale: f32,
    pub pad0: f32,
}

/// Counting launch parameters (`CountParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CountParams {
    pub ids: u64,
    pub counts: u64,
    pub pos: u64,
    pub err: u64,
    pub pairs: i32,
    pub slot_start: i32,
    pub n_local: i32,
    pub slot_total: i32,
}

/// Layout launch parameters (`LayoutParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct LayoutParams {
    pub counts: u64,
    pub offsets: u64,
    pub tile_expert: u64,
    pub tile_end: u64,
    pub n_local: i32,
    pub block_m: i32,
    pub tiles: i32,
    /// Rows each expert's offset is aligned to (a multiple of `block_m`; 0: `block_m`).
    pub align: i32,
}

/// Permute launch parameters (`PermuteParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PermuteParams {
    pub x: u64,
    pub ids: u64,
    pub pos: u64,
    pub offsets: u64,
    pub weights: u64,
    pub a: u64,
    pub row_of: u64,
    pub pairs: i32,
    pub k: i32,
    pub hidden: i32,
    pub slot_start: i32,
    pub max_m: i32,
    pub scale_input: i32,
    pub token_of_row: u64,
}

/// Unpermute launch parameters (`UnpermuteParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UnpermuteParams {
    pub y: u64,
    pub row_of: u64,
    pub weights: u64,
    pub out: u64,
    pub tokens: i32,
    pub k: i32,
    pub hidden: i32,
    pub unweighted: i32,
    pub split_stride: i64,
    pub splits: i32,
    pub y_elem: i32,
}

/// Shared-expert gate launch parameters (`SharedGateParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SharedGateParams {
    pub x: u64,
    pub gate: u64,
    pub out: u64,
    pub tokens: i32,
    pub hidden: i32,
}

/// Finalize launch parameters (`FinalizeParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct FinalizeParams {
    pub routed: u64,
    pub shared: u64,
    pub gate: u64,
    pub out: u64,
    pub n: i64,
    pub hidden: i32,
    pub pad: i32,
}

/// Random fill launch parameters (`FillParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct FillParams {
    pub out: u64,
    pub n: i64,
    pub scale: f32,
    pub seed: u32,
}

/// Grouped GEMM launch parameters (`GemmParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GemmParams {
    pub a: u64,
    pub w: u64,
    pub bias: u64,
    pub out: u64,
    pub tile_expert: u64,
    pub tile_end: u64,
    pub counts: u64,
    pub k: i32,
    pub n: i32,
    pub mode: i32,
    pub max_m: i32,
    pub m_total: i32,
    pub tiles_per_expert: i32,
    pub act: i32,
    pub num_n: i32,
    pub alpha: f32,
    pub limit: f32,
    pub split_stride: i64,
}

/// Quantized weight layouts the weight-only GEMM dequantizes; must match `QFMT_*` in
/// quant_gemm.cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i32)]
pub enum QuantKind {
    /// E2M1 with an E8M0 scale per 32.
    Mxfp4 = 0,
    /// E2M1 with an e4m3 scale per 16 (global scale in the epilogue).
    Nvfp4 = 1,
    /// 4-bit codes with a 16-bit scale and zero point per 128.
    Int4 = 2,
    /// int8 with a per-output-channel scale (epilogue).
    Int8 = 3,
    /// e4m3 with an f32 scale per 128 x 128 block.
    Fp8Block = 4,
    /// e4m3 with one f32 scale per expert (epilogue).
    Fp8Tensor = 5,
}

impl QuantKind {
    /// Every kind.
    pub const ALL: [QuantKind; 6] = [
        QuantKind::Mxfp4,
        QuantKind::Nvfp4,
        QuantKind::Int4,
        QuantKind::Int8,
        QuantKind::Fp8Block,
        QuantKind::Fp8Tensor,
    ];

    fn module_bf16(self) -> &'static str {
        match self {
            QuantKind::Mxfp4 => "quant_gemm_mxfp4_bf16",
            QuantKind::Nvfp4 => "quant_gemm_nvfp4_bf16",
            QuantKind::Int4 => "quant_gemm_int4_bf16",
            QuantKind::Int8 => "quant_gemm_int8_bf16",
            QuantKind::Fp8Block => "quant_gemm_fp8_block_bf16",
            QuantKind::Fp8Tensor => "quant_gemm_fp8_tensor_bf16",
        }
    }

    fn module_f16(self) -> &'static str {
        match self {
            QuantKind::Mxfp4 => "quant_gemm_mxfp4_f16",
            QuantKind::Nvfp4 => "quant_gemm_nvfp4_f16",
            QuantKind::Int4 => "quant_gemm_int4_f16",
            QuantKind::Int8 => "quant_gemm_int8_f16",
            QuantKind::Fp8Block => "quant_gemm_fp8_block_f16",
            QuantKind::Fp8Tensor => "quant_gemm_fp8_tensor_f16",
        }
    }

    /// e4m3 weights (the FP8 tensor-core path applies on sm_89+).
    pub fn is_fp8(self) -> bool {
        matches!(self, QuantKind::Fp8Block | QuantKind::Fp8Tensor)
    }

    /// Bits per packed weight.
    pub fn bits(self) -> usize {
        match self {
            QuantKind::Mxfp4 | QuantKind::Nvfp4 | QuantKind::Int4 => 4,
            QuantKind::Int8 | QuantKind::Fp8Block | QuantKind::Fp8Tensor => 8,
        }
    }

    /// `(k per scale word, bytes per scale word)` of the k-dependent scales, if any.
    pub fn scale_words(self) -> Option<(usize, usize)> {
        match self {
            QuantKind::Mxfp4 => Some((64, 2)),
            QuantKind::Nvfp4 => Some((64, 4)),
            QuantKind::Int4 | QuantKind::Fp8Block => Some((128, 4)),
            QuantKind::Int8 | QuantKind::Fp8Tensor => None,
        }
    }
}

/// Which projection a quantized GEMM computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    /// gate_up with the fused bias + activation epilogue (writes the activation dtype).
    GateUp,
    /// down (+ bias), f32 partial sums per K split.
    Down,
}

impl Proj {
    fn name(self) -> &'static str {
        match self {
            Proj::GateUp => "gate_up",
            Proj::Down => "down",
        }
    }
}

/// Row tiles of the quantized GEMM (BN 128, BK 64, 4 warps, 4 stages); must match the
/// `QGEMM_ENTRY` lines of quant_gemm.cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantTile {
    /// 16 rows, 1 x 4 warps: decode-sized groups.
    M16,
    /// 64 rows, 2 x 2 warps.
    M64,
}

impl QuantTile {
    /// Every tile.
    pub const ALL: [QuantTile; 2] = [QuantTile::M16, QuantTile::M64];
    /// K per pipeline stage (`QG_BK`).
    pub const BK: usize = 64;
    /// Output columns per block (`QG_BN`).
    pub const BN: usize = 128;
    const STAGES: usize = 4;

    /// Rows per tile.
    pub fn block_m(self) -> usize {
        match self {
            QuantTile::M16 => 16,
            QuantTile::M64 => 64,
        }
    }

    /// Threads per block.
    pub fn threads(self) -> u32 {
        128
    }

    /// Dynamic shared memory in bytes: A ring, packed-weight ring, scale ring, the dequantized
    /// B tile and the 256-entry lookup table.
    pub fn smem_bytes(self, q: QuantKind) -> u32 {
        let ld = Self::BK + 8;
        let a = self.block_m() * ld * 2;
        let w = Self::BN * Self::BK * q.bits() / 8;
        let s = q.scale_words().map_or(16, |(_, sw)| Self::BN * sw);
        (Self::STAGES * (a + w + s) + Self::BN * ld * 2 + 1024) as u32
    }

    fn name(self) -> &'static str {
        match self {
            QuantTile::M16 => "m16",
            QuantTile::M64 => "m64",
        }
    }
}

/// FP8 GEMM tile rows (`F8_BM`), k-block (`F8_BK`), threads and dynamic shared memory.
pub mod fp8_tile {
    /// Rows per tile.
    pub const BM: usize = 128;
    /// k per block (one scale block).
    pub const BK: usize = 128;
    /// Threads per block.
    pub const THREADS: u32 = 256;
    /// 3 stages of A and B (rows padded to 144 bytes) plus A and B scales.
    pub const SMEM: u32 = (3 * (2 * 128 * 144) + 3 * 128 * 4 * 2) as u32;
}

impl KernelId {
    /// Dynamic shared memory of the quantized-module kernels (None for the others).
    pub fn quant_smem(self) -> Option<u32> {
        match self {
            KernelId::QGemm(q, _, t, _) => Some(t.smem_bytes(q)),
            KernelId::F8Gemm(..) => Some(fp8_tile::SMEM),
            KernelId::QDecodeGateUp(..)
            | KernelId::QDecodeDown(..)
            | KernelId::QDecode2GateUp(..)
            | KernelId::QDecode2Down(..) => Some(QDECODE_SMEM),
            _ => None,
        }
    }
}

/// Split-K gate_up activation parameters (`QActParams` in quant_gemm.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct QActParams {
    pub partial: u64,
    pub bias: u64,
    pub out: u64,
    pub tile_expert: u64,
    pub tile_end: u64,
    pub counts: u64,
    pub split_stride: i64,
    pub n: i32,
    pub splits: i32,
    pub mode: i32,
    pub max_m: i32,
    pub bm: i32,
    pub act: i32,
    pub alpha: f32,
    pub limit: f32,
}

/// FP8 row quantization parameters (`QuantRowsParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct QuantRowsParams {
    pub x: u64,
    pub q: u64,
    pub scales: u64,
    /// `[src_rows * top_k]` i32 layout rows of each source row (-1: none), or 0: each row itself.
    pub dest: u64,
    /// Tile map (or 0): with `dest == 0`, rows past their tile's real rows are skipped.
    pub tile_expert: u64,
    pub tile_end: u64,
    pub src_rows: i32,
    pub k: i32,
    pub top_k: i32,
    pub tile_m: i32,
    /// Rows of `q` (the stride of the scale words).
    pub rows: i32,
    /// Bit 0: scales token-major `[rows, k / 128]` (the dispatch wire form) instead of
    /// `[k / 128, rows]`.
    pub flags: i32,
}

/// Dispatched FP8 rows (`F8RowsParams` in permute.cu): the wire form of post-quant dispatch,
/// e4m3 bytes `[src_rows, k]` plus token-major f32 scales `[src_rows, k / 128]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct F8RowsParams {
    pub q_src: u64,
    pub s_src: u64,
    /// Place: `[src_rows * top_k]` i32 layout rows (-1: none).
    pub dest: u64,
    /// Place: `[rows, k]` e4m3 out.
    pub q: u64,
    /// Place: `[k / 128, rows]` f32 out.
    pub scales: u64,
    /// Dequantize: `[src_rows, k]` 16-bit out.
    pub x: u64,
    pub src_rows: i32,
    pub k: i32,
    pub top_k: i32,
    pub rows: i32,
}

// SAFETY: `#[repr(C)]` plain data matching the CUDA struct of the same name.
unsafe impl DeviceRepr for F8RowsParams {}

/// FP8 GEMM parameters (`Fp8GemmParams`): the quantized GEMM's plus the activation scales.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Fp8GemmParams {
    pub g: QGemmParams,
    pub a_scales: u64,
    pub rows_total: i32,
    pub pad: i32,
}

// SAFETY: `#[repr(C)]` plain data matching the CUDA structs of the same names.
unsafe impl DeviceRepr for QActParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for QuantRowsParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for Fp8GemmParams {}

/// Quantized grouped GEMM launch parameters (`QGemmParams` in quant_gemm.cu): the 16-bit GEMM's
/// (with `w` pointing at the packed weights) plus the formats' scale parts.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct QGemmParams {
    pub base: GemmParams,
    pub scales: u64,
    pub col_scale: u64,
    pub exp_scale: u64,
}

// SAFETY: `#[repr(C)]` plain data matching `QGemmParams` in quant_gemm.cu field for field.
unsafe impl DeviceRepr for QGemmParams {}
/// Quantized decode launch parameters (`QDecodeParams`): the 16-bit decode parameters (with
/// `w13` / `w2` pointing at the packed weights) plus the formats' parts and the per-pair rows.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct QDecodeParams {
    pub d: DecodeParams,
    pub s13: u64,
    pub c13: u64,
    pub e13: u64,
    pub s2: u64,
    pub c2: u64,
    pub e2: u64,
    /// `[T*k, H]` f32 scratch: each pair's weighted down row.
    pub ypair: u64,
    /// Member rows (activation vectors of one expert's pairs) the gate_up launch's dynamic shared
    /// memory holds: at most 16.
    pub rows_up: i32,
    /// The same for the down launch.
    pub rows_down: i32,
    /// 1 / 2: each warp streams its packed rows through 8 / 16 cp.async slots a lane in shared
    /// memory (after the staged rows); 0: through registers.
    pub ring: i32,
    /// `qdecode2_*`: warps that split one row group's reduction (a divisor of the block's warps;
    /// their partial sums are added in warp order).
    pub ksplit: i32,
}

/// Dynamic shared memory the packed-weight decode kernels may use for staged activation rows.
pub const QDECODE_SMEM: u32 = 96 * 1024;

// SAFETY: `#[repr(C)]` plain data matching `QDecodeParams` in quant_gemm.cu field for field.
unsafe impl DeviceRepr for QDecodeParams {}

/// Decode matrix-vector launch parameters (`DecodeParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeParams {
    pub x: u64,
    pub ids: u64,
    pub weights: u64,
    pub w13: u64,
    pub b13: u64,
    pub w2: u64,
    pub b2: u64,
    pub act: u64,
    pub out: u64,
    pub err: u64,
    pub tokens: i32,
    pub k: i32,
    pub hidden: i32,
    pub inter: i32,
    pub slot_start: i32,
    pub n_local: i32,
    pub slot_total: i32,
    pub act_kind: i32,
    pub alpha: f32,
    pub limit: f32,
    pub scale_input: i32,
    pub pad: i32,
}

/// A TMA tensor map (`CUtensorMap`, 128 opaque bytes) as a kernel parameter.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Default)]
pub struct TmaDesc {
    pub opaque: [u64; 16],
}

/// Parameters of the TMA tiles (`TmaGemmParams`): tensor maps of A and of the weights, the
/// grouped GEMM parameters, and the row-tile count the persistent grid walks.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Default)]
pub struct TmaGemmParams {
    pub a: TmaDesc,
    pub b: TmaDesc,
    pub p: GemmParams,
    pub num_m: i32,
    pub y16: i32,
    pub token_of_row: u64,
    pub tile_counter: u64,
    /// `TW_SKIP_DEAD` | `TW_STAGED_EPI` (grouped_gemm.cu).
    pub flags: i32,
    pub pad: i32,
}

/// T256 switch: a consumer warpgroup whose 64 rows are all past the expert's end skips its MMAs.
pub const TW_SKIP_DEAD: i32 = 1;
/// T256 switch: 16-bit outputs leave through a shared-memory buffer as 16-byte row chunks.
pub const TW_STAGED_EPI: i32 = 2;
/// T256 switch: a 3-stage ring instead of 4 (less shared memory, more L1).
pub const TW_THREE_STAGES: i32 = 4;
/// Shared memory of the T256 staged epilogue: 8 consumer warps x 16 rows x 128 16-bit columns,
/// rows padded to 272 bytes but the last (`TW_EPI_BYTES` in grouped_gemm.cu).
const TW_EPI_BYTES: usize = 8 * (15 * 272 + 256);
/// The T256 barriers and scheduler slots (`TW_BAR_BYTES`).
const TW_BAR_BYTES: usize = 128;
// 2 x 4 stage barriers + 4 scheduler barriers + 3 block ids.
const _: () = assert!((2 * 4 + 4) * 8 + 3 * 4 <= TW_BAR_BYTES);

/// Dynamic shared memory of a T256 launch with switches `flags`: the ring, the barriers, the
/// epilogue buffer when it is used, and 1 KiB to align the ring to 1024 bytes.
pub fn t256_smem_bytes(flags: i32) -> u32 {
    let t = GemmTile::T256;
    let stages = if flags & TW_THREE_STAGES != 0 { 3 } else { t.stages() };
    let epi = if flags & TW_STAGED_EPI != 0 { TW_EPI_BYTES } else { 0 };
    (stages * (t.block_m() + t.block_n()) * t.block_k() * 2 + 1024 + TW_BAR_BYTES + epi) as u32
}

/// Parameters of the FP8 TMA tile (`F8TmaParams`): e4m3 operands with f32 block scales.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Default)]
pub struct F8TmaParams {
    pub a: TmaDesc,
    pub b: TmaDesc,
    pub p: GemmParams,
    pub num_m: i32,
    pub y16: i32,
    pub tile_counter: u64,
    pub a_scales: u64,
    pub w_scales: u64,
    pub a_rows: i32,
    /// `F8_PINGPONG` (measurement switch).
    pub flags: i32,
}

/// `F8TmaParams::flags`: two partial-sum register sets a consumer, so one k-tile's MMAs run
/// while the previous one's are promoted (kernels/grouped_gemm.cu).
pub const F8_PINGPONG: i32 = 1;

// SAFETY: each is `#[repr(C)]` plain data (u64 device addresses and 4/8-byte scalars) whose
// field order and types match the CUDA struct of the same name, so passing it by value as a
// kernel parameter reproduces the device layout exactly.
unsafe impl DeviceRepr for RouterLogitsParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for RouterPrepParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for RouteParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for CountParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for LayoutParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for PermuteParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for UnpermuteParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for SharedGateParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for FinalizeParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for GemmParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for FillParams {}
// SAFETY: see above; the tensor maps are opaque bytes written by cuTensorMapEncodeTiled, and the
// 64-byte alignment matches the CUDA declaration (TMA requires it in parameter space).
unsafe impl DeviceRepr for TmaGemmParams {}
// SAFETY: see above.
unsafe impl DeviceRepr for DecodeParams {}
// SAFETY: as for TmaGemmParams.
unsafe impl DeviceRepr for F8TmaParams {}

#[cfg(test)]
mod tests {
    use super::*;

    fn define(src: &str, name: &str) -> i32 {
        let line = src
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("#define {name} missing"));
        line.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad {line}"))
    }

    #[test]
    fn enums_match_the_cuda_defines() {
        let common = COMMON_SRC;
        assert_eq!(define(common, "MOE_MODE_CONTIGUOUS"), GemmMode::Contiguous as i32);
        assert_eq!(define(common, "MOE_MODE_MASKED"), GemmMode::Masked as i32);
        assert_eq!(define(common, "MOE_MODE_DENSE"), GemmMode::Dense as i32);
        assert_eq!(define(common, "MOE_ACT_SWIGLU"), ActKind::Swiglu as i32);
        assert_eq!(define(common, "MOE_ACT_GPTOSS"), ActKind::GptOss as i32);
        assert_eq!(define(common, "MOE_ACT_GELU_TANH"), ActKind::GeluTanh as i32);
        let route = Module::Route.source();
        assert_eq!(define(&route, "ROUTE_SOFTMAX_TOPK"), RouteMethod::SoftmaxTopk as i32);
        assert_eq!(define(&route, "ROUTE_DEEPSEEK_V3"), RouteMethod::DeepseekV3 as i32);
        assert_eq!(define(&route, "ROUTE_DEEPSEEK_V2"), RouteMethod::DeepseekV2 as i32);
        assert_eq!(define(&route, "ROUTE_GPT_OSS"), RouteMethod::GptOss as i32);
        assert_eq!(define(&route, "ROUTE_LLAMA4"), RouteMethod::Llama4 as i32);
        assert_eq!(define(&Module::GroupedGemm(Elem::Bf16).source(), "GEMM_BK"), GemmTile::BK as i32);
        // 16-byte chunks a lane x 32 lanes x 8 elements: the rows the short down kernel holds.
        assert_eq!(define(&Module::Decode.source(), "DOWN_PRE_CHUNKS") as usize * 32 * 8, DECODE_SHORT_MAX_INTER);
    }

    #[test]
    fn every_kernel_name_is_defined_in_its_module() {
        for id in KernelId::all() {
            let src = id.module().source();
            let name = id.name();
            let found = src.contains(&format!("void {name}("))
                || src.contains(&format!(") {name}(")) // after __launch_bounds__(...)
                || src.contains(&format!("void {name}_")) // never: guards against prefixes
                || match id {
                    KernelId::GemmGateUp(d, t) | KernelId::GemmDown(d, t) => {
                        src.contains(&format!("_ENTRY({}, {},", t.name(), d.suffix()))
                    }
                    KernelId::QGemm(_, d, t, _) => src.contains(&format!("QGEMM_ENTRY({}, {},", t.name(), d.suffix())),
                    KernelId::QAct(_, d) => src.contains(&format!("QACT_ENTRY({},", d.suffix())),
                    KernelId::QDecodeGateUp(_, d)
                    | KernelId::QDecodeDown(_, d)
                    | KernelId::QDecodeSum(_, d)
                    | KernelId::QDecode2GateUp(_, d)
                    | KernelId::QDecode2Down(_, d) => {
                        src.contains(&format!("QDECODE_ENTRY({},", d.suffix()))
                    }
                    KernelId::QuantRows(_, d) | KernelId::F8Gemm(_, d, _) => {
                        src.contains(&format!("FP8_ENTRY({},", d.suffix()))
                    }
                    _ => false,
                };
            assert!(found, "{name} is not defined in {}", id.module().name());
        }
    }

    #[test]
    fn param_structs_have_the_cuda_sizes() {
        // Sizes computed from the CUDA declarations (8-byte alignment, no hidden padding).
        assert_eq!(std::mem::size_of::<RouterLogitsParams>(), 48);
        assert_eq!(std::mem::size_of::<RouterPrepParams>(), 48);
        assert_eq!(std::mem::size_of::<RouteParams>(), 80);
        assert_eq!(std::mem::size_of::<CountParams>(), 48);
        assert_eq!(std::mem::size_of::<LayoutParams>(), 48);
        assert_eq!(std::mem::size_of::<PermuteParams>(), 88);
        assert_eq!(std::mem::size_of::<UnpermuteParams>(), 64);
        assert_eq!(std::mem::size_of::<SharedGateParams>(), 32);
        assert_eq!(std::mem::size_of::<FinalizeParams>(), 48);
        assert_eq!(std::mem::size_of::<GemmParams>(), 104);
        assert_eq!(std::mem::size_of::<FillParams>(), 24);
        // 2 x 128-byte maps, GemmParams at 256, 4 + 4 + 8 + 8 + 4 + 4 bytes, rounded up to 64.
        assert_eq!(std::mem::size_of::<TmaGemmParams>(), 448);
        assert_eq!(std::mem::size_of::<DecodeParams>(), 128);
        assert_eq!(std::mem::size_of::<QDecodeParams>(), 200);
        // Maps, GemmParams at 256, then 4 + 4 + 8 + 8 + 8 + 4 + 4 bytes, rounded up to 64.
        assert_eq!(std::mem::size_of::<F8TmaParams>(), 448);
        assert_eq!(std::mem::offset_of!(TmaGemmParams, p), 256);
        assert_eq!(std::mem::size_of::<QGemmParams>(), 128);
        assert_eq!(std::mem::size_of::<QActParams>(), 88);
        assert_eq!(std::mem::size_of::<QuantRowsParams>(), 72);
        assert_eq!(std::mem::size_of::<F8RowsParams>(), 64);
        assert_eq!(std::mem::size_of::<Fp8GemmParams>(), 144);
    }

    #[test]
    fn quant_defines_match_the_enums() {
        for q in QuantKind::ALL {
            let src = Module::QuantGemm(q, Elem::Bf16).source();
            assert_eq!(define(&src, "QFMT"), q as i32);
            assert_eq!(define(&src, "QG_BK"), QuantTile::BK as i32);
            assert_eq!(define(&src, "QG_BN"), QuantTile::BN as i32);
        }
        let src = Module::QuantGemm(QuantKind::Mxfp4, Elem::Bf16).source();
        let names = ["QFMT_MXFP4", "QFMT_NVFP4", "QFMT_INT4", "QFMT_INT8", "QFMT_FP8_BLOCK", "QFMT_FP8_TENSOR"];
        for (q, name) in QuantKind::ALL.into_iter().zip(names) {
            assert_eq!(define(&src, name), q as i32);
        }
        for t in QuantTile::ALL {
            for q in QuantKind::ALL {
                assert!(t.smem_bytes(q) <= 227 * 1024, "{t:?} {q:?}");
            }
        }
    }

    #[test]
    fn t256_epilogue_buffer_matches_the_cuda_size_and_fits() {
        let src = Module::GroupedGemm(Elem::Bf16).source();
        assert_eq!(define(&src, "TW_EPI_LD") as usize * 4, 272);
        assert_eq!(define(&src, "TW_SKIP_DEAD"), TW_SKIP_DEAD);
        assert_eq!(define(&src, "TW_STAGED_EPI"), TW_STAGED_EPI);
        assert_eq!(define(&src, "TW_THREE_STAGES"), TW_THREE_STAGES);
        assert_eq!(define(&src, "TW_BAR_BYTES") as usize, TW_BAR_BYTES);
        assert!(t256_smem_bytes(TW_STAGED_EPI | TW_THREE_STAGES) < t256_smem_bytes(TW_STAGED_EPI));
        assert!(t256_smem_bytes(0) < t256_smem_bytes(TW_STAGED_EPI));
        // Sm90's opt-in limit per block; the ring, the buffer, the alignment slack and barriers.
        assert!(GemmTile::T256.smem_bytes() <= 227 * 1024, "{}", GemmTile::T256.smem_bytes());
    }
}
