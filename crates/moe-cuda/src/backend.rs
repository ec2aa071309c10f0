//! The `cuda` expert backend: the whole block on one GPU, device-resident between stages.
//!
//! router_logits (f32 warp dot products) -> route (one warp per token, every routing method) ->
//! run_moe: count -> (contiguous: aligned offsets + tile map) -> permute -> gate_up grouped GEMM
//! with fused bias + activation -> down grouped GEMM (+ bias) -> weighted unpermute-reduce ->
//! finalize: shared expert (dense GEMMs, optional sigmoid gate) + cast to the activation dtype.
//! No stage reads anything back to the host; launch shapes depend only on the token count.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use moe_core::backend::{BackendInput, ExpertBackend, LocalWeights, SlotRange};
use moe_core::config::{Activation, GroupMaskValue, RoutingConfig, V2TopkMethod};
use moe_core::tensor::HostData;
use moe_core::weights::ExpertWeights;
use moe_core::{DType, Logical, MoeConfig, MoeError, Physical, Result, Tensor, TopK};

use crate::buffer::{device_buffer, CudaBuffer, ErrorFlag, Half16, Slice};
use crate::device::{CudaDevice, Dep, Workspace};
use crate::error::CudaError;
use crate::graph::{GraphCache, GraphStats, Recording};
use crate::heuristics::{self, Layout, Plan};
use crate::kernels::*;
use crate::quant::QuantExperts;

const NAME: &str = "cuda";

/// Expert and router weights on the device.
#[derive(Debug)]
struct DeviceWeights {
    router_w: CudaSlice<f32>,
    router_b: Option<CudaSlice<f32>>,
    corr_bias: Option<CudaSlice<f32>>,
    w13: CudaSlice<u16>,
    w2: CudaSlice<u16>,
    b13: Option<CudaSlice<f32>>,
    b2: Option<CudaSlice<f32>>,
    shared: Option<SharedDevice>,
    /// Quantized formats: the packed experts (then `w13`/`w2` are unused one-element buffers).
    quant: Option<QuantExperts>,
}

#[derive(Debug)]
struct SharedDevice {
    w13: CudaSlice<u16>,
    w2: CudaSlice<u16>,
    gate: Option<CudaSlice<f32>>,
    inter: usize,
}

/// `w13`, `w2`, `b13`, `b2` of an expert stack on the device.
type ExpertSlices = (CudaSlice<u16>, CudaSlice<u16>, Option<CudaSlice<f32>>, Option<CudaSlice<f32>>);

/// One MoE layer's experts on one GPU.
#[derive(Debug)]
pub struct CudaBackend {
    cfg: MoeConfig,
    dev: Arc<CudaDevice>,
    elem: Elem,
    slots: Option<SlotRange>,
    weights: Option<DeviceWeights>,
    ws: Workspace,
    masked_max: usize,
    host_routing: bool,
    poison: bool,
    wgmma: Option<GemmTile>,
    tma_min_rows: usize,
    decode_max: Option<usize>,
    gather: bool,
    y16: bool,
    /// T256 switches (`kernels::TW_*`): dead-half skip (`MOE_CUDA_T256_SKIP=0` off), the staged
    /// epilogue (`MOE_CUDA_T256_EPI=0` off), both on by default, and a 3-stage ring
    /// (`MOE_CUDA_T256_STAGES=3`); kept for A/B runs.
    t256_flags: i32,
    /// The T256 tile scheduler's block counter (zeroed before each launch).
    tile_counter: CudaSlice<u32>,
    graphs: GraphCache,
    use_graphs: bool,
    graph_max: Option<usize>,
    router: crate::router::RouterGemm,
}

/// 16-bit bit patterns of a float tensor in `dtype` (converting if it is stored otherwise).
fn bits16(t: &Tensor, dtype: DType) -> Result<Vec<u16>> {
    let host = t.to_host()?;
    match (host.host()?, dtype) {
        (HostData::BF16(v), DType::BF16) => Ok(v.iter().map(|x| x.to_bits()).collect()),
        (HostData::F16(v), DType::F16) => Ok(v.iter().map(|x| x.to_bits()).collect()),
        (_, DType::BF16) => Ok(host.to_f32_vec()?.into_iter().map(|x| half::bf16::from_f32(x).to_bits()).collect()),
        (_, DType::F16) => Ok(host.to_f32_vec()?.into_iter().map(|x| half::f16::from_f32(x).to_bits()).collect()),
        (_, other) => {
            Err(MoeError::DType { op: "cuda upload", expected: "bf16 or f16".into(), got: other.to_string() })
        }
    }
}

impl CudaBackend {
    /// A backend for `cfg` on GPU `ordinal` (weights not yet created).
    pub fn new(cfg: MoeConfig, ordinal: usize) -> Result<Self> {
        let elem = match cfg.act_dtype {
            DType::BF16 => Elem::Bf16,
            DType::F16 => Elem::F16,
            other => return Err(MoeError::unsupported(NAME, format!("activation dtype {other}"))),
        };
        let dev = CudaDevice::get(ordinal)?;
        let host_routing = cfg.parallel.ep_size > 1 || cfg.eplb_slots.is_some();
        let tile_counter = dev.zeros::<u32>(1)?;
        let router = crate::router::RouterGemm::from_env(cfg.num_experts, cfg.hidden_size);
        Ok(CudaBackend {
            cfg,
            dev,
            elem,
            slots: None,
            weights: None,
            ws: Workspace::default(),
            masked_max: heuristics::masked_max_tokens(),
            host_routing,
            tma_min_rows: heuristics::tma_min_rows(),
            decode_max: heuristics::decode_max_tokens(),
            gather: std::env::var("MOE_CUDA_GATHER").as_deref() != Ok("0"),
            y16: std::env::var("MOE_CUDA_Y16").as_deref() != Ok("0"),
            t256_flags: {
                let on = |name: &str| std::env::var(name).as_deref() != Ok("0");
                (if on("MOE_CUDA_T256_SKIP") { crate::kernels::TW_SKIP_DEAD } else { 0 })
                    | (if on("MOE_CUDA_T256_EPI") { crate::kernels::TW_STAGED_EPI } else { 0 })
                    | (if std::env::var("MOE_CUDA_T256_STAGES").as_deref() == Ok("3") {
                        crate::kernels::TW_THREE_STAGES
                    } else {
                        0
                    })
            },
            tile_counter,
            poison: false,
            graphs: GraphCache::default(),
            use_graphs: crate::graph::graphs_default(),
            graph_max: crate::graph::graph_max_tokens(),
            router,
            wgmma: match std::env::var("MOE_CUDA_WGMMA").as_deref() {
                Ok("0") => None,
                Ok("128") => Some(GemmTile::W128),
                Ok("256") => Some(GemmTile::W256),
                Ok("t256x2") => Some(GemmTile::T256X2),
                _ => Some(GemmTile::T256),
            },
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The launch plan `run_moe` uses for `tokens` tokens.
    pub fn plan(&self, tokens: usize) -> Plan {
        let n_local = self.slots.map_or(self.cfg.num_slots(), |s| s.count);
        let quant = self.cfg.quant != moe_core::QuantFormat::None;
        let decode = match self.decode_max {
            Some(m) => tokens <= m,
            None if quant => crate::quant::decode_auto(tokens, self.cfg.top_k, n_local),
            None => heuristics::decode_auto(tokens, self.cfg.top_k, self.cfg.num_experts),
        };
        // The 16-bit decode kernels keep the token row in shared memory (48 KiB without opt-in);
        // the packed-weight ones read it from global memory but hold at most QDECODE_MAX_PAIRS.
        let fits = if quant {
            tokens * self.cfg.top_k <= crate::quant::QDECODE_MAX_PAIRS
        } else {
            self.cfg.hidden_size * 2 <= 48 * 1024
        };
        if decode && fits {
            let pairs = tokens * self.cfg.top_k;
            return Plan { layout: Layout::Decode, tile: GemmTile::M16, tiles: 0, rows: pairs };
        }
        if quant {
            let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
            let fp8 = crate::quant::fp8_mma_ok(self.dev.arch(), self.cfg.quant, h, i);
            return crate::quant::plan(tokens, self.cfg.top_k, n_local, self.masked_max, fp8);
        }
        let mut p = heuristics::plan(tokens, self.cfg.top_k, n_local, self.masked_max);
        p.tile = self.upgrade(p.tile, tokens * self.cfg.top_k / n_local.max(1));
        if p.tile == GemmTile::T256X2 {
            if p.layout == Layout::Contiguous {
                let bm = GemmTile::T256X2.block_m();
                p.tiles =
                    heuristics::aligned_tiles(tokens * self.cfg.top_k, n_local, bm, bm * GemmTile::T256X2.cluster());
                p.rows = p.tiles * bm;
            } else {
                // A masked expert may own an odd number of tiles: a pair could span two experts.
                p.tile = GemmTile::T256;
            }
        }
        p
    }

    /// The Hopper wgmma tile replaces the mma.sync tile of the same rows on sm_90a; the TMA tile
    /// only where experts average at least `tma_min_rows` rows (the cp.async tile below that).
    fn upgrade(&self, tile: GemmTile, rows_per_expert: usize) -> GemmTile {
        match self.wgmma {
            Some(t @ (GemmTile::T256 | GemmTile::T256X2)) if tile == GemmTile::M128 && self.dev.arch() == "sm_90a" => {
                if rows_per_expert >= self.tma_min_rows {
                    t
                } else {
                    GemmTile::W256
                }
            }
            Some(w) if tile == GemmTile::M128 && self.dev.arch() == "sm_90a" => w,
            _ => tile,
        }
    }

    /// Benchmarks and tests: whether the TMA tile gathers token rows itself in the contiguous
    /// layout, and FP8 experts quantize token rows straight into their layout rows (default;
    /// `MOE_CUDA_GATHER=0` turns both off) instead of reading a permuted copy.
    pub fn set_gather(&mut self, on: bool) {
        self.gather = on;
    }

    /// Benchmarks and tests: whether the TMA tile writes expert outputs in the activation dtype
    /// (default; `MOE_CUDA_Y16=0` keeps f32), halving the traffic of the unpermute-reduce.
    pub fn set_y16(&mut self, on: bool) {
        self.y16 = on;
    }

    /// Benchmarks and tests: the T256 switches (`kernels::TW_SKIP_DEAD | kernels::TW_STAGED_EPI`
    /// by default, `kernels::TW_THREE_STAGES`).
    pub fn set_t256_flags(&mut self, flags: i32) {
        self.t256_flags = flags;
    }

    /// Benchmarks and tests: the smallest average rows per expert that use the TMA tile.
    pub fn set_tma_min_rows(&mut self, rows: usize) {
        self.tma_min_rows = rows;
    }

    /// Benchmarks and tests: the wgmma tile used for large groups on sm_90a (`None`: mma.sync
    /// only). Default `T256` (TMA, warp-specialized); `MOE_CUDA_WGMMA=0` turns it off, `=128`
    /// picks `W128`, `=256` the cp.async `W256`, `=t256x2` the 2-CTA `T256X2` (contiguous
    /// layouts; masked ones keep `T256`, whose experts may own an odd number of tiles).
    pub fn set_wgmma(&mut self, tile: Option<GemmTile>) {
        // The FP8 tiles are the FP8 store's, not bf16/f16 ones.
        self.wgmma = tile.filter(|t| t.needs_sm90a() && !t.is_fp8());
    }

    /// K splits of the down projection: decode-sized problems have too few output tiles to keep
    /// every SM streaming weights, so the reduction over the intermediate size is split and the
    /// partial sums are added by the unpermute kernel (deterministically, in split order).
    fn down_splits(&self, plan: &Plan, tokens: usize) -> usize {
        if plan.tile != GemmTile::M16 {
            return 1;
        }
        let n_local = self.slots.map_or(self.cfg.num_slots(), |s| s.count);
        let active = (tokens * self.cfg.top_k).min(n_local).max(1);
        let ctas = self.cfg.hidden_size.div_ceil(plan.tile.block_n()) * active;
        let want = (2 * self.dev.sm_count() as usize).div_ceil(ctas);
        want.clamp(1, 8).min((self.cfg.intermediate_size / 256).max(1))
    }

    /// The masked/contiguous switch point in use.
    pub fn masked_max_tokens(&self) -> usize {
        self.masked_max
    }

    /// The loaded weights' quantized experts (`None`: 16-bit weights); an error before loading.
    fn loaded_quant(&mut self) -> Result<Option<&mut crate::quant::QuantExperts>> {
        let w = self.weights.as_mut().ok_or_else(|| MoeError::WeightsNotLoaded { backend: NAME.into() })?;
        Ok(w.quant.as_mut())
    }

    /// Tests and benchmarks: FP8-block experts on sm_90a run the wgmma tile (`true`, default)
    /// or the mma.sync FP8 GEMM. Applies to the loaded weights.
    pub fn set_f8_tile(&mut self, on: bool) -> Result<()> {
        if let Some(q) = self.loaded_quant()? {
            q.set_f8_tile(on);
        }
        Ok(())
    }

    /// Tests and benchmarks: which packed-weight decode kernels run (0 `qdecode2_*`, the packed
    /// weights as the mma A operand; the older `qdecode_*` with a cp.async ring of 8 (1) or 16 (2)
    /// slots a lane, or through registers (3); `MOE_CUDA_QD_MODE`). Applies to the loaded
    /// weights; cached graphs pick the change up (their parameters are compared).
    pub fn set_decode_mode(&mut self, mode: usize) -> Result<()> {
        if let Some(q) = self.loaded_quant()? {
            q.set_decode_mode(mode);
        }
        Ok(())
    }

    /// Tests and benchmarks: whether the packed-weight decode (`qdecode2_*`) splits each row
    /// group's reduction by the forward's pairs an expert (4 / 2 / 1 warps; the default) or
    /// over 2 warps.
    pub fn set_decode_split_auto(&mut self, on: bool) -> Result<()> {
        if let Some(q) = self.loaded_quant()? {
            q.set_decode_split_auto(on);
        }
        Ok(())
    }

    /// Overrides the largest token count of the matrix-vector decode path (`Some(0)` turns it
    /// off, `None` restores the automatic choice [`heuristics::decode_auto`]).
    pub fn set_decode_max_tokens(&mut self, t: Option<usize>) {
        self.decode_max = t;
    }

    /// Overrides the masked/contiguous switch point (benchmarks measure it with this).
    pub fn set_masked_max_tokens(&mut self, t: usize) {
        self.masked_max = t;
    }

    /// Decode-sized forwards (`1 <= T <=` the masked switch point) run as cached CUDA graphs
    /// (default on; `MOE_CUDA_GRAPHS=0` turns them off). Results are bitwise the same either way.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.use_graphs = on;
        if !on {
            self.graphs.clear();
        }
    }

    /// Whether a forward of `t` tokens runs as a CUDA graph: `1 <= t <=` the graph limit
    /// (`MOE_CUDA_GRAPH_MAX_TOKENS`; default the larger of 32 and the masked switch point).
    pub fn graphs_apply(&self, t: usize) -> bool {
        let max = self.graph_max.unwrap_or(self.masked_max.max(crate::graph::DEFAULT_GRAPH_MAX_TOKENS));
        self.use_graphs && t >= 1 && t <= max
    }

    /// Overrides the largest token count run as a CUDA graph (`None`: the default rule).
    pub fn set_graph_max_tokens(&mut self, t: Option<usize>) {
        self.graph_max = t;
    }

    /// Graphs built, replays and node updates so far.
    pub fn graph_stats(&self) -> GraphStats {
        self.graphs.stats()
    }

    /// A graph recording for a forward of `t` tokens, when graphs apply to it.
    fn graph_recording(&self, t: usize) -> Result<Option<Recording>> {
        if self.graphs_apply(t) && !crate::graph::recording() {
            return Ok(Some(Recording::start()?));
        }
        Ok(None)
    }

    /// Router logits at or above `tokens` tokens use cuBLAS SGEMM (f32, no TF32) when libcublas
    /// loads; `usize::MAX` keeps the warp kernel everywhere. Default: from
    /// `T * experts * hidden >=` [`crate::router::ROUTER_BLAS_MIN_MACS`].
    pub fn set_router_blas_min_tokens(&mut self, tokens: usize) {
        self.router.set_min_tokens(tokens);
    }

    /// Tests: fill every output and scratch buffer with NaN bytes before kernels write them, so
    /// an element a kernel forgets to write shows up as NaN.
    pub fn set_poison(&mut self, on: bool) {
        self.poison = on;
    }

    fn out_alloc<T: cudarc::driver::DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        let s = self.dev.alloc::<T>(len)?;
        if self.poison {
            self.dev.memset_ptr_value(self.dev.ptr(&s), 0xFF, len.max(1) * std::mem::size_of::<T>())?;
        }
        Ok(s)
    }

    fn scratch(&mut self, name: &'static str, bytes: usize) -> Result<u64> {
        let p = self.ws.get(&self.dev, name, bytes)?;
        if self.poison {
            self.dev.memset_ptr_value(p, 0xFF, bytes)?;
        }
        Ok(p)
    }

    fn fill(&self, id: KernelId, ptr: u64, len: usize, scale: f32, seed: u32) -> Result<()> {
        let p = FillParams { out: ptr, n: len as i64, scale, seed };
        self.dev.launch(id, (len.div_ceil(256).clamp(1, 16384) as u32, 1, 1), 256, 0, &p)?;
        Ok(())
    }

    fn random16(&self, len: usize, fan_in: usize, seed: u32) -> Result<CudaSlice<u16>> {
        let s = self.dev.alloc::<u16>(len)?;
        // uniform(-a, a) with a = sqrt(3 / fan_in): std 1/sqrt(fan_in), like a trained layer.
        self.fill(KernelId::FillRandom(self.elem), self.dev.ptr(&s), len, (3.0 / fan_in as f32).sqrt(), seed)?;
        Ok(s)
    }

    fn random32(&self, len: usize, scale: f32, seed: u32) -> Result<CudaSlice<f32>> {
        let s = self.dev.alloc::<f32>(len)?;
        self.fill(KernelId::FillRandomF32, self.dev.ptr(&s), len, scale, seed)?;
        Ok(s)
    }

    /// Benchmarks: random weights generated on the device for the created slots (no multi-GB host
    /// copies). The same seed gives the same weights.
    pub fn load_random_device_weights(&mut self, seed: u32) -> Result<()> {
        let slots =
            self.slots.ok_or_else(|| MoeError::WeightsNotLoaded { backend: "cuda (create_weights first)".into() })?;
        let (n, e, h, i) = (slots.count, self.cfg.num_experts, self.cfg.hidden_size, self.cfg.intermediate_size);
        let cfg = self.cfg.clone();
        let shared = match cfg.shared_expert {
            Some(sc) => Some(SharedDevice {
                w13: self.random16(2 * sc.intermediate_size * h, h, seed ^ 11)?,
                w2: self.random16(h * sc.intermediate_size, sc.intermediate_size, seed ^ 12)?,
                gate: if sc.gated { Some(self.random32(h, (3.0 / h as f32).sqrt(), seed ^ 13)?) } else { None },
                inter: sc.intermediate_size,
            }),
            None => None,
        };
        let quant = if cfg.quant != moe_core::QuantFormat::None {
            // A few distinct experts quantized on the host, replicated into every slot.
            Some(QuantExperts::random(&self.dev, self.elem, &cfg, n, 4, seed as u64)?)
        } else {
            None
        };
        let (w13, w2) = if quant.is_some() {
            (self.dev.alloc::<u16>(1)?, self.dev.alloc::<u16>(1)?)
        } else {
            (self.random16(n * 2 * i * h, h, seed ^ 4)?, self.random16(n * h * i, i, seed ^ 5)?)
        };
        let w = DeviceWeights {
            quant,
            router_w: self.random32(e * h, (3.0 / h as f32).sqrt(), seed ^ 1)?,
            router_b: if cfg.router_bias { Some(self.random32(e, 0.1, seed ^ 2)?) } else { None },
            corr_bias: if cfg.routing.uses_correction_bias() { Some(self.random32(e, 0.05, seed ^ 3)?) } else { None },
            w13,
            w2,
            b13: if cfg.expert_bias { Some(self.random32(n * 2 * i, 0.05, seed ^ 6)?) } else { None },
            b2: if cfg.expert_bias { Some(self.random32(n * h, 0.05, seed ^ 7)?) } else { None },
            shared,
        };
        self.weights = Some(w);
        self.dev.synchronize()?;
        Ok(())
    }

    /// Benchmarks: random activations `[tokens, hidden]` on the device.
    pub fn random_device_hidden(&self, tokens: usize, seed: u32) -> Result<Tensor> {
        let h = self.cfg.hidden_size;
        let s = self.dev.alloc::<u16>(tokens * h)?;
        self.fill(KernelId::FillRandom(self.elem), self.dev.ptr(&s), tokens * h, 1.7, seed)?;
        Ok(Half16::tensor(
            CudaBuffer::new(self.dev.clone(), Slice::U16(s), tokens * h),
            vec![tokens, h],
            self.cfg.act_dtype,
        ))
    }

    fn w(&self) -> Result<&DeviceWeights> {
        self.weights.as_ref().ok_or_else(|| MoeError::WeightsNotLoaded { backend: NAME.into() })
    }

    fn new_flag(&self) -> Result<Arc<ErrorFlag>> {
        Ok(Arc::new(ErrorFlag { slice: self.dev.zeros::<i32>(1)? }))
    }

    /// The FP8 kind whose rows `quantize_input` emits for post-quant dispatch, if any: FP8
    /// experts on FP8 tensor cores under expert parallelism, where the payload crosses ranks at
    /// half the bytes of 16-bit rows. On one rank the FP8 path quantizes token rows straight into
    /// their layout rows instead (no separate pass).
    fn fp8_dispatch_kind(&self) -> Option<QuantKind> {
        let kind = match self.cfg.quant {
            moe_core::QuantFormat::Fp8Block => QuantKind::Fp8Block,
            moe_core::QuantFormat::Fp8Tensor => QuantKind::Fp8Tensor,
            _ => return None,
        };
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        (self.cfg.parallel.ep_size > 1 && crate::quant::fp8_mma_ok(self.dev.arch(), self.cfg.quant, h, i))
            .then_some(kind)
    }

    /// `hidden` `[T, H]` in the FP8 wire form of `moe_core::quant::activation` (per token per 128
    /// channels, `amax / 448`: the FP8 GEMM's own activation quantization), quantized on the
    /// device and read back: the communication strategies move host bytes.
    fn quantize_fp8(&mut self, hidden: &Tensor, kind: QuantKind) -> Result<BackendInput> {
        let h = self.cfg.hidden_size;
        let t = hidden.dim(0)?;
        hidden.expect_shape("cuda.quantize_input", &[t, h])?;
        let g = h / 128;
        if t == 0 {
            return Ok(BackendInput {
                hidden: Tensor::from_host(vec![0, h], HostData::U8(Vec::new()))?,
                scales: Some(Tensor::from_f32(vec![0, g], Vec::new())?),
            });
        }
        let (x, _kx) = self.act_ptr(hidden, "cuda.quantize_input")?;
        let q = self.dev.alloc::<u8>(t * h)?;
        let sc = self.dev.alloc::<f32>(t * g)?;
        let p = QuantRowsParams {
            x,
            q: self.dev.ptr(&q),
            scales: self.dev.ptr(&sc),
            src_rows: t as i32,
            k: h as i32,
            top_k: 1,
            flags: 1,
            ..Default::default()
        };
        crate::quant::launch_quant_rows(&self.dev, KernelId::QuantRows(kind, self.elem), p, t)?;
        Ok(BackendInput {
            hidden: Tensor::from_host(vec![t, h], HostData::U8(self.dev.download(&q, t * h)?))?,
            scales: Some(Tensor::from_f32(vec![t, g], self.dev.download(&sc, t * g)?)?),
        })
    }

    /// Uploads FP8 wire-form rows (`hidden` u8 `[T, H]`, `scales` f32 `[T, H / 128]` or `[T, 1]`,
    /// a per-token scale repeated over the groups) for this forward.
    fn upload_fp8_rows(&self, hidden: &Tensor, scales: &Tensor, t: usize) -> Result<(CudaSlice<u8>, CudaSlice<f32>)> {
        let h = self.cfg.hidden_size;
        if !h.is_multiple_of(128) {
            return Err(MoeError::unsupported(
                NAME,
                format!("FP8 activations need a hidden size that is a multiple of 128 (got {h})"),
            ));
        }
        let g = h / 128;
        let host = hidden.to_host()?;
        let q = host.as_u8().map_err(|_| MoeError::DType {
            op: "cuda.run_moe",
            expected: "u8 e4m3 bytes with scales".into(),
            got: hidden.dtype().to_string(),
        })?;
        let s = scales.to_f32_vec()?;
        let s = match scales.shape() {
            [st, sg] if *st == t && *sg == g => s,
            [st, 1] if *st == t => s.iter().flat_map(|&v| std::iter::repeat_n(v, g)).collect(),
            other => {
                return Err(MoeError::shape(
                    "cuda.run_moe",
                    format!("scales [{t}, {g}] or [{t}, 1]"),
                    format!("{other:?}"),
                ))
            }
        };
        Ok((self.dev.upload(q)?, self.dev.upload(&s)?))
    }

    /// The activations as a device 16-bit buffer address (uploading host data). The returned
    /// owner keeps an upload alive until the launches that use it are queued.
    fn act_ptr(&self, t: &Tensor, op: &'static str) -> Result<(u64, Option<CudaSlice<u16>>)> {
        if let Some(b) = device_buffer(t) {
            if t.dtype() != self.cfg.act_dtype {
                return Err(MoeError::DType {
                    op,
                    expected: self.cfg.act_dtype.to_string(),
                    got: t.dtype().to_string(),
                });
            }
            return Ok((b.ptr(), None));
        }
        let s = self.dev.upload(&bits16(t, self.cfg.act_dtype)?)?;
        Ok((self.dev.ptr(&s), Some(s)))
    }

    fn f32_ptr(&self, t: &Tensor, op: &'static str) -> Result<(u64, Option<CudaSlice<f32>>)> {
        if let Some(b) = CudaBuffer::of(t) {
            if t.dtype() != DType::F32 {
                return Err(MoeError::DType { op, expected: "f32".into(), got: t.dtype().to_string() });
            }
            return Ok((b.ptr(), None));
        }
        let s = self.dev.upload(&t.to_f32_vec()?)?;
        Ok((self.dev.ptr(&s), Some(s)))
    }

    fn i32_ptr(&self, t: &Tensor) -> Result<(u64, Option<CudaSlice<i32>>)> {
        if let Some(b) = CudaBuffer::of(t) {
            return Ok((b.ptr(), None));
        }
        let s = self.dev.upload(t.as_i32()?)?;
        Ok((self.dev.ptr(&s), Some(s)))
    }

    /// One grouped GEMM. `a_rows` and `w_rows` are the row counts of the A buffer and of the
    /// stacked weights (`experts * n_total`), which bound the TMA maps of the T256 tile. Returns
    /// the element type the down projection wrote its outputs in (0 f32, 1 bf16, 2 f16).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        gate_up: bool,
        tile: GemmTile,
        tiles: usize,
        mut p: GemmParams,
        n: usize,
        k: usize,
        splits: usize,
        a_rows: usize,
        w_rows: usize,
        token_of_row: u64,
    ) -> Result<i32> {
        // The TMA tile needs 16-byte aligned operands; anything else takes the cp.async tile.
        let tile = if tile.uses_tma() && (!p.a.is_multiple_of(16) || !p.w.is_multiple_of(16)) {
            if token_of_row != 0 {
                return Err(MoeError::shape(
                    "cuda.gemm",
                    "16-byte aligned activations for the gather",
                    p.a.to_string(),
                ));
            }
            GemmTile::W256
        } else {
            tile
        };
        p.n = n as i32;
        p.k = k as i32;
        let (id, cols) = if gate_up {
            (KernelId::GemmGateUp(self.elem, tile), tile.block_n() / 2)
        } else {
            (KernelId::GemmDown(self.elem, tile), tile.block_n())
        };
        let num_n = n.div_ceil(cols);
        p.num_n = num_n as i32;
        let blocks = num_n * tiles;
        if blocks > i32::MAX as usize {
            return Err(MoeError::shape("cuda.gemm", "fewer than 2^31 blocks", blocks.to_string()));
        }
        if tile.uses_tma() {
            // Clusters: each CTA loads (and multicasts) half of the weight tile.
            let b_box = if gate_up { tile.block_n() / 2 } else { tile.block_n() / tile.cluster() } as u32;
            let a = if token_of_row != 0 {
                TmaDesc::default() // rows are gathered with cp.async
            } else {
                self.dev.tensor_map_16(p.a, a_rows, k, tile.block_m() as u32, 64)?
            };
            // Launches are stream-ordered, so one counter serves them all.
            let counter = self.dev.ptr(&self.tile_counter);
            self.dev.memset_ptr(counter, 4)?;
            let tp = TmaGemmParams {
                tile_counter: counter,
                a,
                b: self.dev.tensor_map_16(p.w, w_rows, k, b_box, 64)?,
                p,
                num_m: tiles as i32,
                // Routed outputs only: the unpermute reads 16-bit y, the shared expert's finalize f32.
                y16: (!gate_up && splits == 1 && self.y16 && p.mode != GemmMode::Dense as i32) as i32,
                token_of_row,
                flags: self.t256_flags,
                pad: 0,
            };
            let smem = crate::kernels::t256_smem_bytes(tp.flags);
            let grid = if tile.cluster() == 2 {
                // Whole clusters of a row-tile pair each, one per pair of SMs.
                if !tiles.is_multiple_of(2) {
                    return Err(MoeError::unsupported(
                        NAME,
                        format!("internal: {tiles} row tiles for the paired tile"),
                    ));
                }
                self.dev.persistent_cluster_grid(blocks, 2)
            } else {
                self.dev.persistent_grid(blocks)
            };
            self.dev.launch(id, (grid, 1, 1), tile.threads(), smem, &tp)?;
            let y_elem = match self.elem {
                Elem::Bf16 => 1,
                Elem::F16 => 2,
            };
            return Ok(if tp.y16 != 0 { y_elem } else { 0 });
        }
        let grid = (blocks as u32, 1, splits as u32);
        self.dev.launch(id, grid, tile.threads(), tile.smem_bytes(), &p)?;
        Ok(0)
    }

    fn act_params(&self) -> (i32, f32, f32) {
        match self.cfg.activation {
            Activation::Swiglu => (ActKind::Swiglu as i32, 0.0, 0.0),
            Activation::GptOssSwiglu { alpha, limit } => (ActKind::GptOss as i32, alpha, limit),
            Activation::GeluTanhGlu => (ActKind::GeluTanh as i32, 0.0, 0.0),
        }
    }

    /// A host-side copy of a routing tensor when communication or EPLB needs host ids.
    fn maybe_host(&self, t: Tensor) -> Result<Tensor> {
        if self.host_routing {
            t.to_host()
        } else {
            Ok(t)
        }
    }

    fn upload_experts(&self, x: &ExpertWeights) -> Result<ExpertSlices> {
        let wd = self.cfg.act_dtype;
        let (w13, w2) = if self.cfg.quant != moe_core::QuantFormat::None {
            // Quantized experts live in `QuantExperts`.
            (self.dev.alloc::<u16>(1)?, self.dev.alloc::<u16>(1)?)
        } else {
            (
                self.dev.upload(&bits16(x.w13.part("weight")?, wd)?)?,
                self.dev.upload(&bits16(x.w2.part("weight")?, wd)?)?,
            )
        };
        let b13 = x.b13.as_ref().map(|b| b.to_f32_vec().and_then(|v| Ok(self.dev.upload(&v)?))).transpose()?;
        let b2 = x.b2.as_ref().map(|b| b.to_f32_vec().and_then(|v| Ok(self.dev.upload(&v)?))).transpose()?;
        Ok((w13, w2, b13, b2))
    }
}

impl ExpertBackend for CudaBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn create_weights(&mut self, slots: SlotRange) -> Result<()> {
        self.slots = Some(slots);
        self.weights = None;
        Ok(())
    }

    fn load_weights(&mut self, weights: &LocalWeights) -> Result<()> {
        let slots =
            self.slots.ok_or_else(|| MoeError::WeightsNotLoaded { backend: "cuda (create_weights first)".into() })?;
        let x = &weights.experts;
        if x.num_experts() != slots.count {
            return Err(MoeError::shape(
                "cuda.load_weights",
                format!("{} local slots", slots.count),
                format!("{} experts", x.num_experts()),
            ));
        }
        if x.w13.format != self.cfg.quant || x.w2.format != self.cfg.quant {
            return Err(MoeError::config(
                "quant",
                format!("the backend was configured for {} but the weights are {}", self.cfg.quant, x.w13.format),
            ));
        }
        let (w13, w2, b13, b2) = self.upload_experts(x)?;
        let quant = if self.cfg.quant != moe_core::QuantFormat::None {
            Some(QuantExperts::upload(&self.dev, self.elem, x)?)
        } else {
            None
        };
        let up32 = |t: &Tensor| -> Result<CudaSlice<f32>> { Ok(self.dev.upload(&t.to_f32_vec()?)?) };
        let shared = match (&weights.shared, self.cfg.shared_expert) {
            (Some(s), Some(sc)) => Some(SharedDevice {
                w13: self.dev.upload(&bits16(&s.w13, self.cfg.act_dtype)?)?,
                w2: self.dev.upload(&bits16(&s.w2, self.cfg.act_dtype)?)?,
                gate: s.gate.as_ref().map(up32).transpose()?,
                inter: sc.intermediate_size,
            }),
            _ => None,
        };
        self.weights = Some(DeviceWeights {
            router_w: up32(&weights.router.weight)?,
            router_b: weights.router.bias.as_ref().map(up32).transpose()?,
            corr_bias: weights.router.correction_bias.as_ref().map(up32).transpose()?,
            w13,
            w2,
            b13,
            b2,
            shared,
            quant,
        });
        Ok(())
    }

    fn post_load(&mut self) -> Result<()> {
        // The canonical layout ([E, 2I, H] gate rows then up rows; [E, H, I]) is what the kernels
        // read; nothing to repack. Make sure the upload finished before weights are dropped.
        self.w()?;
        self.dev.synchronize()?;
        Ok(())
    }

    fn router_logits(&mut self, hidden: &Tensor) -> Result<Tensor> {
        let (e, h) = (self.cfg.num_experts, self.cfg.hidden_size);
        let t = hidden.dim(0)?;
        hidden.expect_shape("cuda.router_logits", &[t, h])?;
        let (x, _keep) = self.act_ptr(hidden, "cuda.router_logits")?;
        let out = self.out_alloc::<f32>(t * e)?;
        let dev = self.dev.clone();
        if self.router.ready(&dev, t) {
            let w = self.w()?;
            let (wp, bp) = (dev.ptr(&w.router_w), dev.ptr_opt(w.router_b.as_ref()));
            let x32 = self.scratch("router_x32", t.min(crate::router::CHUNK) * h * 4)?;
            let logits = dev.ptr(&out);
            for start in (0..t).step_by(crate::router::CHUNK) {
                let n = (t - start).min(crate::router::CHUNK);
                let lp = logits + (start * e * 4) as u64;
                let pp = RouterPrepParams {
                    x: x + (start * h * 2) as u64,
                    x32,
                    bias: bp,
                    logits: lp,
                    n: (n * h) as i64,
                    tokens: n as i32,
                    experts: e as i32,
                };
                dev.launch(
                    KernelId::RouterPrep(self.elem),
                    ((n * h).div_ceil(256).min(8192) as u32, 1, 1),
                    256,
                    0,
                    &pp,
                )?;
                let beta = if bp != 0 { 1.0 } else { 0.0 };
                self.router.sgemm(&dev, wp, x32, lp, n, e, h, beta)?;
            }
            return Ok(CudaBuffer::new(dev, Slice::F32(out), t * e).into_tensor(vec![t, e], DType::F32));
        }
        let w = self.w()?;
        let p = RouterLogitsParams {
            x,
            w: self.dev.ptr(&w.router_w),
            bias: self.dev.ptr_opt(w.router_b.as_ref()),
            logits: self.dev.ptr(&out),
            tokens: t as i32,
            experts: e as i32,
            hidden: h as i32,
            pad: 0,
        };
        let warps = t * e;
        self.dev.launch(KernelId::RouterLogits(self.elem), (warps.div_ceil(8) as u32, 1, 1), 256, 0, &p)?;
        Ok(CudaBuffer::new(self.dev.clone(), Slice::F32(out), t * e).into_tensor(vec![t, e], DType::F32))
    }

    fn route(&mut self, logits: &Tensor) -> Result<TopK<Logical>> {
        let (e, k) = (self.cfg.num_experts, self.cfg.top_k);
        let t = logits.dim(0)?;
        logits.expect_shape("cuda.route", &[t, e])?;
        let w = self.w()?;
        let (lp, _keep) = self.f32_ptr(logits, "cuda.route")?;
        let flag = self.new_flag()?;
        let ids = self.out_alloc::<i32>(t * k)?;
        let wts = self.out_alloc::<f32>(t * k)?;
        let mut p = RouteParams {
            logits: lp,
            bias: 0,
            ids: self.dev.ptr(&ids),
            weights: self.dev.ptr(&wts),
            err: self.dev.ptr(&flag.slice),
            tokens: t as i32,
            experts: e as i32,
            k: k as i32,
            scale: 1.0,
            ..Default::default()
        };
        match self.cfg.routing {
            RoutingConfig::SoftmaxTopk { renormalize } => {
                p.method = RouteMethod::SoftmaxTopk as i32;
                p.renormalize = renormalize as i32;
            }
            RoutingConfig::DeepseekV3 { n_group, topk_group, norm_topk_prob, routed_scaling_factor, group_mask } => {
                p.method = RouteMethod::DeepseekV3 as i32;
                p.bias = self.dev.ptr_opt(w.corr_bias.as_ref());
                if p.bias == 0 {
                    return Err(MoeError::config(
                        "routing",
                        "DeepSeek-V3 routing needs e_score_correction_bias in the router weights",
                    ));
                }
                p.n_group = n_group as i32;
                p.topk_group = topk_group as i32;
                p.renormalize = norm_topk_prob as i32;
                p.scale = routed_scaling_factor;
                p.mask_neg_inf = (group_mask == GroupMaskValue::NegInf) as i32;
            }
            RoutingConfig::DeepseekV2 { method, norm_topk_prob, routed_scaling_factor } => {
                p.method = RouteMethod::DeepseekV2 as i32;
                if let V2TopkMethod::GroupLimitedGreedy { n_group, topk_group } = method {
                    p.n_group = n_group as i32;
                    p.topk_group = topk_group as i32;
                }
                p.renormalize = norm_topk_prob as i32;
                p.scale = routed_scaling_factor;
            }
            RoutingConfig::GptOss => p.method = RouteMethod::GptOss as i32,
            RoutingConfig::Llama4 => p.method = RouteMethod::Llama4 as i32,
        }
        const WARPS: usize = 4;
        let smem = (WARPS * (2 * e + 64) * 4) as u32;
        self.dev.launch(KernelId::Route, (t.div_ceil(WARPS) as u32, 1, 1), (WARPS * 32) as u32, smem, &p)?;
        let ids = CudaBuffer::new(self.dev.clone(), Slice::I32(ids), t * k).with_flag(flag.clone(), k);
        let wts = CudaBuffer::new(self.dev.clone(), Slice::F32(wts), t * k).with_flag(flag, k);
        let ids = self.maybe_host(ids.into_tensor(vec![t, k], DType::I32))?;
        let wts = self.maybe_host(wts.into_tensor(vec![t, k], DType::F32))?;
        TopK::new(ids, wts, self.cfg.routing.weights_on_input())
    }

    fn quantize_input(&mut self, hidden: &Tensor) -> Result<BackendInput> {
        match self.fp8_dispatch_kind() {
            Some(kind) => self.quantize_fp8(hidden, kind),
            // Keep the tensor as given (uploaded once inside run_moe when on the host, so
            // host-side communication still sees host data).
            None => Ok(BackendInput::plain(hidden.clone())),
        }
    }

    fn run_moe(&mut self, input: &BackendInput, routing: &TopK<Physical>) -> Result<Tensor> {
        let slots = self.slots.ok_or_else(|| MoeError::WeightsNotLoaded { backend: NAME.into() })?;
        let (h, inter) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let t = input.num_tokens();
        input.hidden.expect_shape("cuda.run_moe", &[t, h])?;
        if routing.num_tokens() != t {
            return Err(MoeError::shape(
                "cuda.run_moe",
                format!("routing for {t} tokens"),
                routing.num_tokens().to_string(),
            ));
        }
        if t == 0 {
            return Ok(Tensor::zeros(vec![0, h], DType::F32));
        }
        let k = routing.k();
        let pairs = t * k;
        let n_local = slots.count;
        let plan = self.plan(t);
        let bm = plan.tile.block_m();
        // FP8 wire-form rows (post-quant dispatch): placed straight into the FP8 GEMM's rows
        // where the forward takes that path, else dequantized to the activation dtype first.
        let f8 = match &input.scales {
            Some(s) => Some(self.upload_fp8_rows(&input.hidden, s, t)?),
            None => None,
        };
        // The TMA tile gathers token rows itself, and FP8 experts quantize (or place) token rows
        // straight into their layout rows (crate::quant); otherwise permute copies them into `a`.
        let fp8_rows = plan.tile == GemmTile::M128 && self.weights.as_ref().is_some_and(|w| w.quant.is_some());
        let gathers = plan.layout == Layout::Contiguous && !routing.weights_on_input() && self.gather;
        let f8_place = f8.is_some() && fp8_rows && gathers;
        let (x, _kx) = match &f8 {
            None => self.act_ptr(&input.hidden, "cuda.run_moe")?,
            // Unread: gather mode records token ids; the FP8 rows come from `f8_src`.
            Some((q, _)) if f8_place => (self.dev.ptr(q), None),
            Some((q, s)) => {
                let xd = self.scratch("f8_x", t * h * 2)?;
                let p = F8RowsParams {
                    q_src: self.dev.ptr(q),
                    s_src: self.dev.ptr(s),
                    x: xd,
                    src_rows: t as i32,
                    k: h as i32,
                    ..Default::default()
                };
                self.dev.launch(KernelId::DequantF8Rows(self.elem), (t as u32, 1, 1), 256, 0, &p)?;
                (xd, None)
            }
        };
        let f8_src = match &f8 {
            Some((q, s)) if f8_place => Some((self.dev.ptr(q), self.dev.ptr(s))),
            _ => None,
        };
        let (ids, _ki) = self.i32_ptr(routing.ids())?;
        let (wts, _kw) = self.f32_ptr(routing.weights(), "cuda.run_moe")?;
        let flag = match device_buffer(routing.ids()).and_then(|b| b.flag()) {
            Some((f, _)) => f.clone(),
            None => self.new_flag()?,
        };
        let dev = self.dev.clone();
        // From here to the unpermute, launches and memsets may be recorded into a CUDA graph.
        let out = self.out_alloc::<f32>(t * h)?;
        let rec = self.graph_recording(t)?;
        if plan.layout == Layout::Decode {
            let act = self.scratch("act", pairs * inter * 2)?;
            let ypair =
                if self.cfg.quant != moe_core::QuantFormat::None { self.scratch("ypair", pairs * h * 4)? } else { 0 };
            let w = self.w()?;
            let (act_kind, alpha, limit) = self.act_params();
            let dp = DecodeParams {
                x,
                ids,
                weights: wts,
                w13: dev.ptr(&w.w13),
                b13: dev.ptr_opt(w.b13.as_ref()),
                w2: dev.ptr(&w.w2),
                b2: dev.ptr_opt(w.b2.as_ref()),
                act,
                out: dev.ptr(&out),
                err: dev.ptr(&flag.slice),
                tokens: t as i32,
                k: k as i32,
                hidden: h as i32,
                inter: inter as i32,
                slot_start: slots.start as i32,
                n_local: n_local as i32,
                slot_total: slots.total as i32,
                act_kind,
                alpha,
                limit,
                scale_input: routing.weights_on_input() as i32,
                pad: 0,
            };
            if let Some(q) = w.quant.as_ref() {
                // Packed weights: the format's matrix-vector kernels (same launch shape).
                q.decode(&dev, &dp, ypair)?;
            } else {
                const WARPS: usize = 8; // DECODE_WARPS: one output column per warp
                let grid_up = (inter.div_ceil(WARPS) as u32, pairs as u32, 1);
                dev.launch(KernelId::DecodeGateUp(self.elem), grid_up, 256, (h * 2) as u32, &dp)?;
                let grid_down = (h.div_ceil(WARPS) as u32, t as u32, 1);
                let down = if inter <= crate::kernels::DECODE_SHORT_MAX_INTER {
                    KernelId::DecodeDownShort(self.elem)
                } else {
                    KernelId::DecodeDown(self.elem)
                };
                dev.launch_dep(down, grid_down, 256, 0, &dp, Dep::Programmatic)?;
            }
            if let Some(rec) = rec {
                self.graphs.launch(&dev, rec.finish())?;
            }
            let out = CudaBuffer::new(dev.clone(), Slice::F32(out), t * h).with_flag(flag, k);
            return Ok(out.into_tensor(vec![t, h], DType::F32));
        }
        let counts = self.scratch("counts", n_local * 4)?;
        dev.memset_ptr(counts, n_local * 4)?;
        let pos = self.scratch("pos", pairs * 4)?;
        let row_of = self.scratch("row_of", pairs * 4)?;
        let offsets = self.scratch("offsets", (n_local + 1) * 4)?;
        let tile_expert = self.scratch("tile_expert", plan.tiles * 4)?;
        let tile_end = self.scratch("tile_end", plan.tiles * 4)?;
        let gather = (plan.tile.uses_tma() || fp8_rows) && gathers && x.is_multiple_of(16);
        let (a, token_of_row) = if gather {
            (x, self.scratch("token_of_row", plan.rows * 4)?)
        } else {
            (self.scratch("a", plan.rows * h * 2)?, 0)
        };
        let act = self.scratch("act", plan.rows * inter * 2)?;
        let splits = self.down_splits(&plan, t);
        let y = self.scratch("y", splits * plan.rows * h * 4)?;

        let cp = CountParams {
            ids,
            counts,
            pos,
            err: dev.ptr(&flag.slice),
            pairs: pairs as i32,
            slot_start: slots.start as i32,
            n_local: n_local as i32,
            slot_total: slots.total as i32,
        };
        dev.launch(KernelId::Count, (pairs.div_ceil(256) as u32, 1, 1), 256, 0, &cp)?;
        let (mode, max_m) = match plan.layout {
            Layout::Contiguous => {
                let lp = LayoutParams {
                    counts,
                    offsets,
                    tile_expert,
                    tile_end,
                    n_local: n_local as i32,
                    block_m: bm as i32,
                    tiles: plan.tiles as i32,
                    align: (bm * plan.tile.cluster()) as i32,
                };
                dev.launch(KernelId::Layout, (1, 1, 1), 256, 0, &lp)?;
                (GemmMode::Contiguous, 0)
            }
            Layout::Masked { max_m } => (GemmMode::Masked, max_m),
            Layout::Decode => {
                return Err(MoeError::unsupported(NAME, "internal: the decode layout reached the grouped path"))
            }
        };
        let pp = PermuteParams {
            x,
            ids,
            pos,
            offsets: if mode == GemmMode::Contiguous { offsets } else { 0 },
            weights: wts,
            a,
            row_of,
            pairs: pairs as i32,
            k: k as i32,
            hidden: h as i32,
            slot_start: slots.start as i32,
            max_m: max_m as i32,
            scale_input: routing.weights_on_input() as i32,
            token_of_row,
        };
        // Gather mode records token ids only: a thread a pair instead of a block a pair.
        let (grid, block) = if token_of_row != 0 { (pairs.div_ceil(256), 256) } else { (pairs, 128) };
        dev.launch(KernelId::Permute(self.elem), (grid as u32, 1, 1), block, 0, &pp)?;
        let (act_kind, alpha, limit) = self.act_params();
        let w = self.w()?;
        let base = GemmParams {
            tile_expert,
            tile_end,
            counts,
            mode: mode as i32,
            max_m: max_m as i32,
            tiles_per_expert: (max_m / bm).max(1) as i32,
            act: act_kind,
            alpha,
            limit,
            ..Default::default()
        };
        let g1 = GemmParams { a, w: dev.ptr(&w.w13), bias: dev.ptr_opt(w.b13.as_ref()), out: act, ..base };
        let split_stride = (plan.rows * h) as i64;
        let g2 =
            GemmParams { a: act, w: dev.ptr(&w.w2), bias: dev.ptr_opt(w.b2.as_ref()), out: y, split_stride, ..base };
        let y_elem = if w.quant.is_some() {
            // Quantized experts: the format's own GEMMs.
            let f = crate::quant::Forward {
                plan,
                pairs,
                n_local,
                g1: crate::quant::params(&g1),
                g2: crate::quant::params(&g2),
                hidden: h,
                inter,
                down_splits: splits,
                row_of: if gather { row_of } else { 0 },
                top_k: k,
                y16: self.y16,
                f8_src,
            };
            match self.weights.as_mut().and_then(|w| w.quant.as_mut()) {
                Some(q) => q.forward(&dev, &f)?,
                None => 0,
            }
        } else {
            let a_rows = if gather { t } else { plan.rows };
            self.gemm(true, plan.tile, plan.tiles, g1, inter, h, 1, a_rows, n_local * 2 * inter, token_of_row)?;
            self.gemm(false, plan.tile, plan.tiles, g2, h, inter, splits, plan.rows, n_local * h, 0)?
        };
        let up = UnpermuteParams {
            y,
            row_of,
            weights: wts,
            out: dev.ptr(&out),
            tokens: t as i32,
            k: k as i32,
            hidden: h as i32,
            unweighted: routing.weights_on_input() as i32,
            split_stride,
            splits: splits as i32,
            y_elem,
        };
        // Measured (docs/perf/cuda.md): issuing a token's row loads together pays at k = 8 and
        // costs at k = 4, where the leaner kernel keeps more blocks resident.
        let unpermute = if k >= 8 { KernelId::UnpermuteWide } else { KernelId::Unpermute };
        dev.launch(unpermute, (t as u32, 1, 1), 256, 0, &up)?;
        if let Some(rec) = rec {
            self.graphs.launch(&dev, rec.finish())?;
        }
        let out = CudaBuffer::new(dev.clone(), Slice::F32(out), t * h).with_flag(flag, k);
        Ok(out.into_tensor(vec![t, h], DType::F32))
    }

    fn finalize(&mut self, hidden: &Tensor, routed: Tensor) -> Result<Tensor> {
        let h = self.cfg.hidden_size;
        let t = hidden.dim(0)?;
        routed.expect_shape("cuda.finalize", &[t, h])?;
        if t == 0 {
            return Ok(Tensor::zeros(vec![0, h], self.cfg.act_dtype));
        }
        let (rp, _kr) = self.f32_ptr(&routed, "cuda.finalize")?;
        let flag = device_buffer(&routed).and_then(|b| b.flag()).cloned();
        let dev = self.dev.clone();
        let out = self.out_alloc::<u16>(t * h)?;
        let mut fp = FinalizeParams {
            routed: rp,
            out: dev.ptr(&out),
            n: (t * h) as i64,
            hidden: h as i32,
            ..Default::default()
        };
        let (x, _kx) = self.act_ptr(hidden, "cuda.finalize")?;
        let rec = if self.w()?.shared.is_some() { self.graph_recording(t)? } else { None };
        let shared = self
            .w()?
            .shared
            .as_ref()
            .map(|s| (dev.ptr(&s.w13), dev.ptr(&s.w2), s.gate.as_ref().map(|g| dev.ptr(g)), s.inter));
        if let Some((w13, w2, gate, inter)) = shared {
            let tile = self.upgrade(heuristics::tile_for(t), t);
            // A paired tile's second tile past the rows is empty (and skipped).
            let tiles = t.div_ceil(tile.block_m()).next_multiple_of(tile.cluster());
            let act = self.scratch("shared_act", t * inter * 2)?;
            let ys = self.scratch("shared_y", t * h * 4)?;
            let (act_kind, alpha, limit) = self.act_params();
            let base = GemmParams {
                mode: GemmMode::Dense as i32,
                m_total: t as i32,
                tiles_per_expert: 1,
                act: act_kind,
                alpha,
                limit,
                ..Default::default()
            };
            self.gemm(true, tile, tiles, GemmParams { a: x, w: w13, out: act, ..base }, inter, h, 1, t, 2 * inter, 0)?;
            self.gemm(false, tile, tiles, GemmParams { a: act, w: w2, out: ys, ..base }, h, inter, 1, t, h, 0)?;
            fp.shared = ys;
            if let Some(g) = gate {
                let gbuf = self.scratch("shared_gate", t * 4)?;
                let gp = SharedGateParams { x, gate: g, out: gbuf, tokens: t as i32, hidden: h as i32 };
                dev.launch(KernelId::SharedGate(self.elem), (t.div_ceil(8) as u32, 1, 1), 256, 0, &gp)?;
                fp.gate = gbuf;
            }
        }
        dev.launch(KernelId::Finalize(self.elem), ((t * h).div_ceil(256) as u32, 1, 1), 256, 0, &fp)?;
        if let Some(rec) = rec {
            self.graphs.launch(&dev, rec.finish())?;
        }
        let mut buf = CudaBuffer::new(dev, Slice::U16(out), t * h);
        if let Some((f, k)) = flag {
            buf = buf.with_flag(f, k);
        }
        Ok(Half16::tensor(buf, vec![t, h], self.cfg.act_dtype))
    }

    fn replace_slot(&mut self, slot: usize, weights: &ExpertWeights, src: usize) -> Result<()> {
        let n = self.slots.map_or(0, |s| s.count);
        if slot >= n || src >= weights.num_experts() {
            return Err(MoeError::shape(
                "cuda.replace_slot",
                format!("slot < {n}, source < {}", weights.num_experts()),
                format!("slot {slot}, source {src}"),
            ));
        }
        let one = weights.select_experts(&[src])?;
        let (w13, w2, b13, b2) = self.upload_experts(&one)?;
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let dev = self.dev.clone();
        let dw = self.weights.as_mut().ok_or_else(|| MoeError::WeightsNotLoaded { backend: NAME.into() })?;
        if let Some(q) = dw.quant.as_mut() {
            q.replace_slot(&dev, slot, weights, src)?;
        }
        let copy = |dst: &mut CudaSlice<u16>, src: &CudaSlice<u16>, len: usize| -> Result<()> {
            let mut view = dst.slice_mut(slot * len..(slot + 1) * len);
            dev.stream().memcpy_dtod(src, &mut view).map_err(|e| CudaError::driver("replace_slot copy", e))?;
            Ok(())
        };
        if dw.quant.is_none() {
            copy(&mut dw.w13, &w13, 2 * i * h)?;
            copy(&mut dw.w2, &w2, h * i)?;
        }
        let copy32 = |dst: &mut Option<CudaSlice<f32>>, src: &Option<CudaSlice<f32>>, len: usize| -> Result<()> {
            if let (Some(d), Some(s)) = (dst.as_mut(), src.as_ref()) {
                let mut view = d.slice_mut(slot * len..(slot + 1) * len);
                dev.stream().memcpy_dtod(s, &mut view).map_err(|e| CudaError::driver("replace_slot copy", e))?;
            }
            Ok(())
        };
        copy32(&mut dw.b13, &b13, 2 * i)?;
        copy32(&mut dw.b2, &b2, h)?;
        dev.synchronize()?;
        Ok(())
    }
}
