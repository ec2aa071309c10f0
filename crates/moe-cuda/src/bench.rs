//! GPU measurements for `moe bench`: the two ceilings (device copy bandwidth, cuBLAS bf16 GEMM
//! rate) and the MoE block per (shape, tokens) point, timed with CUDA events (warm-up, then the
//! median of many iterations, rotating over several inputs and routings).
//!
//! Per point: FLOPs = 6 T k H I; bytes = the expert weights hit + activations in and out; floor =
//! max(FLOPs / GEMM rate, bytes / copy bandwidth), both measured in the same run.

use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use moe_core::backend::{BackendInput, ExpertBackend, SlotRange};
use moe_core::{DType, MoeConfig, Physical, QuantFormat, Result, Tensor, TopK};
use serde_json::json;

use crate::backend::CudaBackend;
use crate::device::CudaDevice;
use crate::error::CudaError;

/// The standard shapes of DESIGN.md: (name, experts, top-k, hidden, intermediate).
pub const STANDARD_SHAPES: [(&str, usize, usize, usize, usize); 4] = [
    ("mixtral-8x7b", 8, 2, 4096, 14336),
    ("qwen3-30b-a3b", 128, 8, 2048, 768),
    ("deepseek-v3", 256, 8, 7168, 2048),
    ("gpt-oss-20b", 32, 4, 2880, 2880),
];
/// The standard token counts.
pub const STANDARD_TOKENS: [usize; 6] = [1, 16, 128, 1024, 4096, 16384];

/// Measured ceilings.
#[derive(Debug, Clone, Copy)]
pub struct Ceilings {
    /// Device-to-device copy, bytes read + written per second, in GB/s.
    pub copy_gbps: f64,
    /// cuBLAS bf16 GEMM (8192^3, f32 accumulate), TFLOP/s.
    pub gemm_tflops: f64,
}

fn timing_event(dev: &CudaDevice) -> Result<CudaEvent> {
    Ok(dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| CudaError::driver("event", e))?)
}

/// Runs `f` `warmup` times, then times `iters` runs with events; returns per-run milliseconds.
fn time_runs(
    dev: &CudaDevice,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f64>> {
    for i in 0..warmup {
        f(i)?;
    }
    let mut evs = Vec::with_capacity(iters + 1);
    for _ in 0..=iters {
        evs.push(timing_event(dev)?);
    }
    evs[0].record(dev.stream()).map_err(|e| CudaError::driver("event record", e))?;
    let mut per = Vec::with_capacity(iters);
    for i in 0..iters {
        f(warmup + i)?;
        evs[i + 1].record(dev.stream()).map_err(|e| CudaError::driver("event record", e))?;
    }
    dev.synchronize()?;
    for i in 0..iters {
        per.push(evs[i].elapsed_ms(&evs[i + 1]).map_err(|e| CudaError::driver("event elapsed", e))? as f64);
    }
    Ok(per)
}

/// Median, 10th and 90th percentile.
pub fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.1), at(0.9))
}

/// Times `f` adaptively: about `target_ms` of runs, between 5 and 200 of them.
fn time_adaptive(dev: &CudaDevice, target_ms: f64, mut f: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    let probe = time_runs(dev, 2, 3, &mut f)?;
    let est = stats(probe).0.max(1e-3);
    let iters = ((target_ms / est).ceil() as usize).clamp(5, 200);
    time_runs(dev, 1, iters, f)
}

/// Measures the copy bandwidth and the cuBLAS bf16 GEMM rate on GPU `ordinal`.
pub fn measure_ceilings(ordinal: usize) -> Result<Ceilings> {
    let dev = CudaDevice::get(ordinal)?;
    let bytes = 1usize << 30;
    let src = dev.alloc::<u8>(bytes)?;
    let mut dst = dev.alloc::<u8>(bytes)?;
    dev.memset_ptr(dev.ptr(&src), bytes)?;
    let per = time_runs(&dev, 2, 10, |_| {
        dev.stream().memcpy_dtod(&src, &mut dst).map_err(|e| CudaError::driver("copy", e))?;
        Ok(())
    })?;
    let copy_gbps = 2.0 * bytes as f64 / (stats(per).0 * 1e-3) / 1e9;
    drop((src, dst));

    crate::nvrtc::ensure_nvrtc().map_err(CudaError::Unavailable)?;
    // SAFETY: probes for libcublas by name only.
    if !std::panic::catch_unwind(|| unsafe { blas_sys::is_culib_present() }).unwrap_or(false) {
        return Err(CudaError::Unavailable("libcublas not found; the GEMM ceiling needs cuBLAS".into()).into());
    }
    let n = 8192usize;
    let mut cfg = MoeConfig::new(1, 1, n, n);
    cfg.act_dtype = DType::BF16;
    cfg.weight_dtype = DType::BF16;
    let b = CudaBackend::new(cfg, ordinal)?;
    let a = b.random_device_hidden(n, 1)?;
    let bm = b.random_device_hidden(n, 2)?;
    let c = dev.alloc::<u16>(n * n)?;
    let (pa, pb, pc) = (
        crate::buffer::device_buffer(&a).map_or(0, |x| x.ptr()),
        crate::buffer::device_buffer(&bm).map_or(0, |x| x.ptr()),
        dev.ptr(&c),
    );
    let handle = blas::create_handle().map_err(|e| CudaError::driver("cublasCreate", e))?;
    // SAFETY: the handle is fresh; the stream belongs to this device's context.
    unsafe { blas::set_stream(handle, dev.stream().cu_stream() as _) }
        .map_err(|e| CudaError::driver("cublasSetStream", e))?;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let per = time_runs(&dev, 3, 10, |_| {
        // SAFETY: three live n x n bf16 buffers; scalars are f32 as the compute type requires.
        unsafe {
            blas::gemm_ex(
                handle,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                n as i32,
                n as i32,
                &alpha as *const f32 as *const _,
                pa as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                n as i32,
                pb as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                n as i32,
                &beta as *const f32 as *const _,
                pc as *mut _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::driver("cublasGemmEx", e))?;
        Ok(())
    })?;
    // SAFETY: destroys the handle created above after its work finished (time_runs synchronized).
    let _ = unsafe { blas::destroy_handle(handle) };
    let gemm_tflops = 2.0 * (n as f64).powi(3) / (stats(per).0 * 1e-3) / 1e12;
    Ok(Ceilings { copy_gbps, gemm_tflops })
}

/// One benchmark point.
#[derive(Debug, Clone)]
pub struct Point {
    /// Shape name.
    pub shape: String,
    /// Tokens.
    pub tokens: usize,
    /// Median ms of `run_moe` (routing given: permute, GEMMs, activation, unpermute-reduce).
    pub experts_ms: f64,
    /// 10th / 90th percentile of `experts_ms`.
    pub experts_p10_p90: (f64, f64),
    /// Median ms of the whole block (router, routing, experts, finalize).
    pub block_ms: f64,
    /// 6 T k H I.
    pub flops: f64,
    /// Expert weights hit + activations in and out.
    pub bytes: f64,
    /// Distinct experts hit (first input).
    pub experts_hit: usize,
    /// max(flops / rate, bytes / bandwidth), ms.
    pub floor_ms: f64,
    /// Layout and tile used.
    pub plan: String,
    /// Median ms of `router_logits` with the f32 warp kernel.
    pub router_kernel_ms: f64,
    /// Median ms of `router_logits` with cuBLAS SGEMM (`None` without libcublas).
    pub router_blas_ms: Option<f64>,
    /// Median host microseconds to enqueue one `run_moe` (T <= 1024 only).
    pub experts_host_us: Option<f64>,
    /// Whether decode-sized forwards ran as CUDA graphs.
    pub graphs: bool,
}

impl Point {
    /// JSON object for the results file.
    pub fn json(&self, c: &Ceilings) -> serde_json::Value {
        json!({
            "shape": self.shape, "tokens": self.tokens, "experts_ms": self.experts_ms,
            "experts_p10_ms": self.experts_p10_p90.0, "experts_p90_ms": self.experts_p10_p90.1,
            "block_ms": self.block_ms, "flops": self.flops, "bytes": self.bytes, "experts_hit": self.experts_hit,
            "floor_ms": self.floor_ms, "tflops": self.flops / (self.experts_ms * 1e-3) / 1e12,
            "pct_of_floor": 100.0 * self.floor_ms / self.experts_ms, "plan": self.plan,
            "router_kernel_ms": self.router_kernel_ms, "router_blas_ms": self.router_blas_ms,
            "experts_host_us": self.experts_host_us, "graphs": self.graphs,
            "copy_gbps": c.copy_gbps, "gemm_tflops": c.gemm_tflops,
        })
    }
}

/// Measures one (shape, tokens) point in bf16 with softmax top-k routing (renormalized).
pub fn bench_point(
    ordinal: usize,
    shape: (&str, usize, usize, usize, usize),
    tokens: usize,
    ceilings: &Ceilings,
    masked_max: Option<usize>,
    target_ms: f64,
) -> Result<Point> {
    bench_point_quant(ordinal, shape, tokens, ceilings, masked_max, target_ms, QuantFormat::None)
}

/// Device bytes per expert weight of `quant` (packed values plus the device scale words).
pub fn bytes_per_weight(quant: QuantFormat) -> f64 {
    match crate::quant::packer(quant) {
        Ok(p) => {
            let k = p.kind();
            k.bits() as f64 / 8.0 + k.scale_words().map_or(0.0, |(span, sw)| sw as f64 / span as f64)
        }
        Err(_) => 2.0,
    }
}

/// [`bench_point`] with the experts in `quant` (random experts quantized on the host, a few
/// distinct ones replicated over the slots; activations bf16).
#[allow(clippy::too_many_arguments)]
pub fn bench_point_quant(
    ordinal: usize,
    shape: (&str, usize, usize, usize, usize),
    tokens: usize,
    ceilings: &Ceilings,
    masked_max: Option<usize>,
    target_ms: f64,
    quant: QuantFormat,
) -> Result<Point> {
    let (name, e, k, h, i) = shape;
    let mut cfg = MoeConfig::new(e, k, h, i);
    cfg.act_dtype = DType::BF16;
    cfg.weight_dtype = DType::BF16;
    cfg.quant = quant;
    let mut b = CudaBackend::new(cfg, ordinal)?;
    if let Some(m) = masked_max {
        b.set_masked_max_tokens(m);
    }
    let dev: Arc<CudaDevice> = b.device().clone();
    b.create_weights(SlotRange { start: 0, count: e, total: e })?;
    b.load_random_device_weights(0x5EED)?;
    // Rotate over several inputs so activations and routing change between runs.
    const ROT: usize = 4;
    let mut inputs: Vec<(Tensor, TopK<Physical>)> = Vec::new();
    for r in 0..ROT {
        let x = b.random_device_hidden(tokens, 100 + r as u32)?;
        let logits = b.router_logits(&x)?;
        let routing = b.route(&logits)?.into_identity_slots();
        inputs.push((x, routing));
    }
    let ids = inputs[0].1.ids().to_host()?;
    let mut hit = vec![false; e];
    for &id in ids.as_i32()? {
        hit[id as usize] = true;
    }
    let experts_hit = hit.iter().filter(|&&x| x).count();
    let flops = 6.0 * (tokens * k * h * i) as f64;
    let bytes = experts_hit as f64 * 3.0 * (h * i) as f64 * bytes_per_weight(quant) + (tokens * h * 2 * 2) as f64;
    let floor_ms = (flops / (ceilings.gemm_tflops * 1e12)).max(bytes / (ceilings.copy_gbps * 1e9)) * 1e3;
    let per = time_adaptive(&dev, target_ms, |it| {
        let (x, r) = &inputs[it % ROT];
        b.run_moe(&BackendInput::plain(x.clone()), r).map(|_| ())
    })?;
    let (experts_ms, p10, p90) = stats(per);
    // Host cost of enqueueing one forward (launch-bound decode sizes), GPU queue not drained.
    let experts_host_us = if tokens <= 1024 {
        dev.synchronize()?;
        let mut v = Vec::new();
        for it in 0..40 {
            let (x, r) = &inputs[it % ROT];
            let t0 = std::time::Instant::now();
            b.run_moe(&BackendInput::plain(x.clone()), r)?;
            v.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        dev.synchronize()?;
        Some(stats(v).0)
    } else {
        None
    };
    b.set_router_blas_min_tokens(usize::MAX);
    let router_kernel_ms =
        stats(time_adaptive(&dev, target_ms / 4.0, |it| b.router_logits(&inputs[it % ROT].0).map(|_| ()))?).0;
    let router_blas_ms = if crate::router::cublas_available().is_ok() {
        b.set_router_blas_min_tokens(0);
        Some(stats(time_adaptive(&dev, target_ms / 4.0, |it| b.router_logits(&inputs[it % ROT].0).map(|_| ()))?).0)
    } else {
        None
    };
    b.set_router_blas_min_tokens(crate::router::router_blas_min_tokens(e, h));
    let per = time_adaptive(&dev, target_ms, |it| {
        let (x, _) = &inputs[it % ROT];
        let logits = b.router_logits(x)?;
        let r = b.route(&logits)?.into_identity_slots();
        let routed = b.run_moe(&BackendInput::plain(x.clone()), &r)?;
        b.finalize(x, routed).map(|_| ())
    })?;
    let block_ms = stats(per).0;
    let p = b.plan(tokens);
    Ok(Point {
        shape: if quant == QuantFormat::None { name.to_string() } else { format!("{name}/{quant}") },
        tokens,
        experts_ms,
        experts_p10_p90: (p10, p90),
        block_ms,
        flops,
        bytes,
        experts_hit,
        floor_ms,
        plan: format!("{:?}/{:?}", p.layout, p.tile),
        router_kernel_ms,
        router_blas_ms,
        experts_host_us,
        graphs: b.graphs_apply(tokens),
    })
}

/// Reads the torch peer's JSON (`python/peers/gpu_torch_moe.py`) into (shape, tokens, impl) -> ms.
pub fn read_peer(path: &std::path::Path) -> Result<Vec<(String, usize, String, f64)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| moe_core::MoeError::Io { path: path.display().to_string(), source })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| moe_core::MoeError::Device(format!("peer JSON {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for r in v["results"].as_array().into_iter().flatten() {
        if let (Some(s), Some(t), Some(im), Some(ms)) =
            (r["shape"].as_str(), r["tokens"].as_u64(), r["impl"].as_str(), r["median_ms"].as_f64())
        {
            out.push((s.to_string(), t as usize, im.to_string(), ms));
        }
    }
    Ok(out)
}

/// Measures the ceilings and every (shape, tokens) point, prints one row per point (with the
/// torch peer's times and the ratio when `peer_json` is given) and returns the JSON document.
pub fn run_grid(
    shapes: &[(&str, usize, usize, usize, usize)],
    tokens: &[usize],
    peer_json: Option<&std::path::Path>,
    masked_max: Option<usize>,
    target_ms: f64,
) -> Result<serde_json::Value> {
    run_grid_quant(shapes, tokens, peer_json, masked_max, target_ms, QuantFormat::None)
}

/// [`run_grid`] with the experts in `quant`.
pub fn run_grid_quant(
    shapes: &[(&str, usize, usize, usize, usize)],
    tokens: &[usize],
    peer_json: Option<&std::path::Path>,
    masked_max: Option<usize>,
    target_ms: f64,
    quant: QuantFormat,
) -> Result<serde_json::Value> {
    let peer = match peer_json {
        Some(p) => read_peer(p)?,
        None => Vec::new(),
    };
    let c = measure_ceilings(0)?;
    println!("ceilings: copy {:.0} GB/s (read+write), cuBLAS bf16 GEMM {:.0} TFLOP/s", c.copy_gbps, c.gemm_tflops);
    println!(
        "{:<14} {:>6} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>8} {:>9} {:>9} {:>8}  plan",
        "shape",
        "T",
        "moe ms",
        "block ms",
        "TFLOP/s",
        "%floor",
        "torch_gm",
        "hf_loop",
        "x torch",
        "rt_kern",
        "rt_blas",
        "host_us"
    );
    let mut rows = Vec::new();
    for s in shapes {
        for &t in tokens {
            let p = bench_point_quant(0, *s, t, &c, masked_max, target_ms, quant)?;
            let find = |im: &str| peer.iter().find(|(sh, tt, i, _)| sh == s.0 && *tt == t && i == im).map(|x| x.3);
            let (gm, hf) = (find("grouped_mm"), find("hf_loop"));
            let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            println!(
                "{:<14} {:>6} {:>10.4} {:>10.4} {:>8.1} {:>7.1}% {:>10} {:>10} {:>8} {:>9.4} {:>9} {:>8}  {}{}",
                p.shape,
                t,
                p.experts_ms,
                p.block_ms,
                p.flops / (p.experts_ms * 1e-3) / 1e12,
                100.0 * p.floor_ms / p.experts_ms,
                fmt(gm),
                fmt(hf),
                gm.map_or("-".into(), |g| format!("{:.2}", g / p.experts_ms)),
                p.router_kernel_ms,
                fmt(p.router_blas_ms),
                p.experts_host_us.map_or("-".into(), |v| format!("{v:.1}")),
                p.plan,
                if p.graphs { " graph" } else { "" }
            );
            let mut j = p.json(&c);
            j["torch_grouped_mm_ms"] = gm.into();
            j["torch_hf_loop_ms"] = hf.into();
            j["speedup_vs_torch_grouped_mm"] = gm.map(|g| g / p.experts_ms).into();
            rows.push(j);
        }
    }
    Ok(json!({"ceilings": {"copy_gbps": c.copy_gbps, "gemm_tflops": c.gemm_tflops}, "results": rows}))
}

/// Host and device costs behind the CUDA-graph design, on GPU `ordinal`: one plain launch, one
/// graph replay, one replay that rewrites a kernel node's parameters first (the per-call input
/// and output addresses), and one small device-to-device copy (the alternative: copying inputs
/// into static buffers the graph reads). Returns a line for the log.
pub fn graph_micro(ordinal: usize) -> Result<String> {
    use crate::graph::{GraphCache, Op};
    use crate::kernels::{CountParams, KernelId};
    const N: usize = 2000;
    let dev = CudaDevice::get(ordinal)?;
    let src = dev.zeros::<u8>(4096)?;
    let mut dst = dev.zeros::<u8>(4096)?;
    // A kernel that does nothing (no pairs), so only launch costs are timed.
    let params = |ids: u64| CountParams { ids, ..Default::default() };
    let bytes = |p: &CountParams| {
        // SAFETY: a #[repr(C)] plain-data struct viewed as its bytes.
        unsafe { std::slice::from_raw_parts(p as *const CountParams as *const u8, std::mem::size_of::<CountParams>()) }
            .to_vec()
    };
    let op = |ids: u64| Op::Kernel {
        id: KernelId::Count,
        grid: (1, 1, 1),
        block: 256,
        smem: 0,
        dep: crate::device::Dep::Full,
        params: bytes(&params(ids)),
    };
    let host_us = |f: &mut dyn FnMut(usize) -> Result<()>| -> Result<(f64, f64)> {
        dev.synchronize()?;
        let ev0 = timing_event(&dev)?;
        let ev1 = timing_event(&dev)?;
        ev0.record(dev.stream()).map_err(|e| CudaError::driver("event record", e))?;
        let t0 = std::time::Instant::now();
        for i in 0..N {
            f(i)?;
        }
        let host = t0.elapsed().as_secs_f64() * 1e6 / N as f64;
        ev1.record(dev.stream()).map_err(|e| CudaError::driver("event record", e))?;
        dev.synchronize()?;
        let gpu = ev0.elapsed_ms(&ev1).map_err(|e| CudaError::driver("event elapsed", e))? as f64 * 1e3 / N as f64;
        Ok((host, gpu))
    };
    // Warm-up: module load and graph instantiation stay out of the timed calls.
    dev.launch(KernelId::Count, (1, 1, 1), 256, 0, &params(0))?;
    dev.stream().memcpy_dtod(&src, &mut dst).map_err(|e| CudaError::driver("copy", e))?;
    let launch = host_us(&mut |_| Ok(dev.launch(KernelId::Count, (1, 1, 1), 256, 0, &params(0))?))?;
    let mut cache = GraphCache::default();
    cache.launch(&dev, vec![op(0)])?;
    let replay = host_us(&mut |_| Ok(cache.launch(&dev, vec![op(0)])?))?;
    let update = host_us(&mut |i| Ok(cache.launch(&dev, vec![op(8 * (i as u64 % 2 + 1))])?))?;
    let copy = host_us(&mut |_| {
        dev.stream().memcpy_dtod(&src, &mut dst).map_err(|e| CudaError::driver("copy", e))?;
        Ok(())
    })?;
    Ok(format!(
        "graph micro (host us / device us per call, {N} calls): plain launch {:.2}/{:.2}; graph replay {:.2}/{:.2}; \
         replay + 1 kernel-node update {:.2}/{:.2}; 4 KiB device copy {:.2}/{:.2}",
        launch.0, launch.1, replay.0, replay.1, update.0, update.1, copy.0, copy.1
    ))
}
