//! `moe bench`: a grid of shapes x token counts through a backend (via `ConfigurableMoe`, so the
//! router, routing, combine and output cast are all timed), each point set against the machine's
//! floor, `max(FLOPs / peak, bytes / bandwidth)`, measured in the same run, and against the
//! `reference` backend.
//!
//! The floor numbers come from [`MachineLimits`]; this file fills them for the host CPU (copy and
//! read bandwidth, the best GEMM rate of the cpu kernels). A device section can fill the same
//! struct from its own measurements and reuse the grid, the table and the JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use moe_core::backend::reference::host_router_logits;
use moe_core::quant::ExpertTensor;
use moe_core::routing::route_host;
use moe_core::tensor::HostData;
use moe_core::weights::{random_hidden, ExpertWeights, RouterWeights};
use moe_core::{BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeError, MoeWeights, QuantFormat, Result, Tensor};
use moe_runtime::presets::{family_config, shape, Shape};
use moe_runtime::{default_registry, probe_hardware};
use rayon::prelude::*;
use serde::Serialize;

/// Arguments of `moe bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Backend to measure (a registered name; see `moe info`).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Comma-separated shape presets.
    #[arg(long, default_value = "qwen3-30b-a3b,mixtral-8x7b,deepseek-v3,gpt-oss-20b")]
    pub shapes: String,
    /// Comma-separated token counts.
    #[arg(long, default_value = "1,16,128,1024")]
    pub tokens: String,
    /// Weight and activation dtype: f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Expert weights per shape, in GiB; shapes above it run with fewer experts (said in the table).
    #[arg(long, default_value_t = 1.5)]
    pub mem_gib: f64,
    /// Seconds of timed forwards per point (at least 5 forwards).
    #[arg(long, default_value_t = 1.0)]
    pub min_time: f64,
    /// Skip `reference` where one forward of it is expected to take longer than this (seconds).
    #[arg(long, default_value_t = 1.5)]
    pub ref_max_s: f64,
    /// Do not run `reference` at all.
    #[arg(long)]
    pub no_reference: bool,
    /// Quantize the experts at load (fp8-block, fp8-tensor, mxfp4, nvfp4, int4-group,
    /// int8-channel); the floor then counts the quantized bytes.
    #[arg(long)]
    pub quant: Option<String>,
    /// Expert parallelism (--ep N ...): report dispatch/combine GB/s and their share of forward time.
    #[command(flatten)]
    pub ep: crate::ep::EpArgs,
    /// `--backend cuda`: the torch peer's JSON (python/peers/gpu_torch_moe.py) for the ratio column.
    #[arg(long)]
    pub peer_json: Option<PathBuf>,
}

/// What the machine can do, measured in the same run: the floor of every point.
#[derive(Debug, Clone, Serialize)]
pub struct MachineLimits {
    /// The device measured.
    pub device: String,
    /// Threads used.
    pub threads: usize,
    /// Parallel memcpy rate, bytes read + written per second (STREAM "copy" convention), GB/s.
    pub copy_gbps: f64,
    /// Parallel streaming read rate, GB/s.
    pub read_gbps: f64,
    /// The bandwidth the floor uses (the larger of the two: weights are only read).
    pub bandwidth_gbps: f64,
    /// Best GEMM rate per dtype (GFLOP/s) and how it was measured.
    pub gemm: Vec<moe_cpu::peak::GemmRate>,
}

impl MachineLimits {
    /// Measures the host CPU on the current rayon pool.
    pub fn measure_cpu(dtypes: &[DType]) -> Result<Self> {
        let isa = moe_cpu::Isa::detect()?;
        let amx = match moe_cpu::kernels::amx_status() {
            _ if isa != moe_cpu::Isa::Avx512Bf16 => String::new(),
            Ok(()) if moe_cpu::tuning::amx_rows() > 0 => " + AMX-BF16".into(),
            Ok(()) => ", AMX off (MOE_CPU_AMX_ROWS=0)".into(),
            Err(why) => format!("; no AMX: {why}"),
        };
        let (copy_gbps, read_gbps) = moe_cpu::peak::bandwidth();
        let gemm = dtypes.iter().map(|&d| moe_cpu::peak::gemm_rate(d, isa, 1.0)).collect::<Result<Vec<_>>>()?;
        Ok(MachineLimits {
            device: format!("host CPU ({} kernels{amx})", isa.name()),
            threads: rayon::current_num_threads(),
            copy_gbps,
            read_gbps,
            bandwidth_gbps: copy_gbps.max(read_gbps),
            gemm,
        })
    }

    /// Peak GEMM rate for `dtype` in GFLOP/s.
    pub fn peak_gflops(&self, dtype: DType) -> f64 {
        self.gemm.iter().find(|g| g.dtype == dtype.to_string()).map_or(f64::NAN, |g| g.gflops)
    }

    /// Keeps, for every limit, the better of `self` and `other` (two measurements of one machine).
    pub fn keep_best(&mut self, other: &MachineLimits) {
        self.copy_gbps = self.copy_gbps.max(other.copy_gbps);
        self.read_gbps = self.read_gbps.max(other.read_gbps);
        self.bandwidth_gbps = self.bandwidth_gbps.max(other.bandwidth_gbps);
        for g in self.gemm.iter_mut() {
            if let Some(o) = other.gemm.iter().find(|o| o.dtype == g.dtype) {
                g.gflops = g.gflops.max(o.gflops);
            }
        }
    }

    /// The floor in seconds and which limit sets it.
    pub fn floor(&self, flops: f64, bytes: f64, dtype: DType) -> (f64, &'static str) {
        let compute = flops / (self.peak_gflops(dtype) * 1e9);
        let memory = bytes / (self.bandwidth_gbps * 1e9);
        if compute >= memory {
            (compute, "compute")
        } else {
            (memory, "memory")
        }
    }
}

/// One measured point.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Shape preset.
    pub shape: String,
    /// Experts benchmarked (may be fewer than the model's).
    pub experts: usize,
    /// Experts of the real model.
    pub experts_full: usize,
    /// Top-k.
    pub top_k: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Intermediate size.
    pub intermediate: usize,
    /// Tokens per forward.
    pub tokens: usize,
    /// Median seconds per forward.
    pub time_s: f64,
    /// Timed forwards.
    pub runs: usize,
    /// 6 T k H I.
    pub flops: f64,
    /// Average distinct experts hit per forward.
    pub experts_hit: f64,
    /// Weights of the hit experts plus activations in and out.
    pub bytes: f64,
    /// FLOPs / time, GFLOP/s.
    pub gflops: f64,
    /// Weight bytes of the hit experts / time, GB/s.
    pub weight_gbps: f64,
    /// The floor, seconds.
    pub floor_s: f64,
    /// Which limit sets the floor.
    pub bound: &'static str,
    /// floor / time, percent.
    pub pct_of_floor: f64,
    /// Median seconds per forward of `reference`, when measured.
    pub reference_s: Option<f64>,
    /// reference time / time.
    pub speedup_vs_reference: Option<f64>,
    /// Why something was scaled or skipped.
    pub note: String,
}

/// Fast deterministic weights: uniform with the std of `MoeWeights::random` (1/sqrt(fan_in)),
/// generated in parallel straight into the storage dtype (big shapes would take minutes otherwise).
fn fast_weights(cfg: &MoeConfig, seed: u64) -> Result<MoeWeights> {
    let (e, h, i, dt) = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype);
    fn fill(n: usize, fan_in: usize, seed: u64, dt: DType) -> HostData {
        let a = 3.0f32.sqrt() / (fan_in as f32).sqrt();
        let val = move |j: usize| {
            let mut x = (j as u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
            x ^= x >> 32;
            x = x.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            x ^= x >> 29;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        };
        match dt {
            DType::BF16 => HostData::BF16((0..n).into_par_iter().map(|j| bf16::from_f32(val(j))).collect()),
            DType::F16 => HostData::F16((0..n).into_par_iter().map(|j| f16::from_f32(val(j))).collect()),
            _ => HostData::F32((0..n).into_par_iter().map(val).collect()),
        }
    }
    let part = |rows: usize, cols: usize, s: u64| -> Result<ExpertTensor> {
        let t = Tensor::from_host(vec![e, rows, cols], fill(e * rows * cols, cols, s, dt))?;
        Ok(ExpertTensor { format: QuantFormat::None, experts: e, rows, cols, parts: [("weight".into(), t)].into() })
    };
    let router = Tensor::from_host(vec![e, h], fill(e * h, h, seed + 3, DType::F32))?;
    Ok(MoeWeights {
        router: RouterWeights { weight: router, bias: None, correction_bias: None },
        experts: ExpertWeights { w13: part(2 * i, h, seed + 1)?, w2: part(h, i, seed + 2)?, b13: None, b2: None },
        shared: None,
    })
}

/// Median seconds of `forward` over rotating inputs, after a warm-up.
fn time_point(moe: &mut ConfigurableMoe, inputs: &[Tensor], min_time: f64, max_runs: usize) -> Result<(f64, usize)> {
    for x in inputs.iter().take(2) {
        moe.forward(x)?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed().as_secs_f64() < min_time && times.len() < max_runs) {
        let x = &inputs[times.len() % inputs.len()];
        let t = Instant::now();
        let out = moe.forward(x)?.to_host()?;
        times.push(t.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times.len()))
}

/// Average distinct experts hit per input (the weights a forward must read).
fn experts_hit(cfg: &MoeConfig, w: &MoeWeights, inputs: &[Tensor]) -> Result<f64> {
    let mut total = 0usize;
    for x in inputs {
        let logits = host_router_logits(cfg, &w.router, x)?;
        let r = route_host(cfg, &logits, None)?;
        let mut hit = vec![false; cfg.num_experts];
        r.ids_host()?.iter().for_each(|&i| hit[i as usize] = true);
        total += hit.iter().filter(|&&b| b).count();
    }
    Ok(total as f64 / inputs.len().max(1) as f64)
}

fn parse_list<T: std::str::FromStr>(s: &str, what: &'static str) -> Result<Vec<T>> {
    s.split(',')
        .map(|x| x.trim().parse::<T>().map_err(|_| MoeError::config(what, format!("cannot parse `{x}` in `{s}`"))))
        .collect()
}

/// Runs the benchmark grid.
pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let dtype = DType::parse_float(&args.dtype)?;
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| MoeError::config("threads", format!("cannot start {threads} threads: {e}")))?;
    pool.install(|| run_in_pool(&args, dtype))
}

fn run_in_pool(args: &BenchArgs, dtype: DType) -> Result<ExitCode> {
    let shapes: Vec<Shape> = args.shapes.split(',').map(|s| shape(s.trim())).collect::<Result<_>>()?;
    let tokens: Vec<usize> = parse_list(&args.tokens, "tokens")?;
    if args.ep.enabled() {
        return crate::ep::bench(&args.ep, &args.backend, &shapes, &tokens, dtype, args.mem_gib);
    }
    if args.backend == "cuda" {
        let quant = crate::quant_cmd::parse(args.quant.as_deref())?;
        return crate::bench_gpu::run(&shapes, &tokens, dtype, args.peer_json.as_deref(), args.json.as_deref(), quant);
    }
    let hw = probe_hardware();
    let registry = default_registry();
    eprintln!("moe bench: measuring the machine ({} threads)...", rayon::current_num_threads());
    let mut limits = MachineLimits::measure_cpu(&[DType::BF16, DType::F32])?;
    println!("moe bench: backend `{}`, {dtype} weights and activations, {} threads", args.backend, limits.threads);
    if let Some(q) = &args.quant {
        println!("quant: experts quantized to {q} at load (floor bytes count the quantized experts)");
    }
    println!(
        "machine: {}; copy {:.1} GB/s (read+write), read {:.1} GB/s; floor uses {:.1} GB/s",
        limits.device, limits.copy_gbps, limits.read_gbps, limits.bandwidth_gbps
    );
    for g in &limits.gemm {
        println!("peak GEMM {}: {:.1} GFLOP/s ({}, m,n,k = {:?})", g.dtype, g.gflops, g.kernel, g.mnk);
    }
    println!("routing: softmax top-k (renormalized), SwiGLU, no shared expert, for every shape");
    let budget = args.mem_gib * (1u64 << 30) as f64;
    let bar = ProgressBar::new((shapes.len() * tokens.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut points = Vec::new();
    for s in &shapes {
        let per_expert = (3 * s.hidden * s.intermediate * dtype.size_bytes()) as f64;
        let fit = ((budget / per_expert) as usize).min(s.experts);
        let mut scaled = *s;
        scaled.experts = fit.max(s.top_k);
        let note = if scaled.experts < s.experts {
            format!("{} of {} experts (memory budget {:.1} GiB)", scaled.experts, s.experts, args.mem_gib)
        } else {
            String::new()
        };
        let cfg = family_config("qwen3_moe", scaled, dtype)?;
        cfg.validate()?;
        bar.set_message(format!("{}: generating weights", s.name));
        let weights = fast_weights(&cfg, 7)?;
        let (cfg, weights, per_expert) = match crate::quant_cmd::parse(args.quant.as_deref())? {
            None => (cfg, weights, per_expert),
            Some(f) => {
                bar.set_message(format!("{}: quantizing to {f}", s.name));
                let (c, w, [a, b]) = moe_core::quant::quantize_block(&cfg, &weights, f)?;
                (c, w, (a.bytes + b.bytes) as f64 / cfg.num_experts as f64)
            }
        };
        let opts = |b: &str| BuildOptions { backend: b.to_string(), ..Default::default() };
        let mut moe = ConfigurableMoe::build(cfg.clone(), &registry, &hw, opts(&args.backend))?;
        bar.set_message(format!("{}: loading", s.name));
        moe.load_weights(&weights)?;
        let mut shape_points = Vec::new();
        for &t in &tokens {
            bar.set_message(format!("{} T={t}", s.name));
            let inputs: Vec<Tensor> =
                (0..6).map(|i| random_hidden(t, cfg.hidden_size, dtype, 100 + i)).collect::<Result<_>>()?;
            let (time_s, runs) = time_point(&mut moe, &inputs, args.min_time, 1000)?;
            let hit = experts_hit(&cfg, &weights, &inputs)?;
            let flops = 6.0 * (t * cfg.top_k * cfg.hidden_size * cfg.intermediate_size) as f64;
            let wbytes = hit * per_expert;
            let bytes = wbytes + 2.0 * (t * cfg.hidden_size * dtype.size_bytes()) as f64;
            let (floor_s, bound) = limits.floor(flops, bytes, dtype);
            shape_points.push((
                inputs,
                Point {
                    shape: s.name.to_string(),
                    experts: cfg.num_experts,
                    experts_full: s.experts,
                    top_k: cfg.top_k,
                    hidden: cfg.hidden_size,
                    intermediate: cfg.intermediate_size,
                    tokens: t,
                    time_s,
                    runs,
                    flops,
                    experts_hit: hit,
                    bytes,
                    gflops: flops / time_s / 1e9,
                    weight_gbps: wbytes / time_s / 1e9,
                    floor_s,
                    bound,
                    pct_of_floor: 100.0 * floor_s / time_s,
                    reference_s: None,
                    speedup_vs_reference: None,
                    note: note.clone(),
                },
            ));
            bar.inc(1);
        }
        drop(moe);
        if !args.no_reference && args.backend != "reference" {
            reference_points(args, &cfg, &weights, &registry, &hw, &bar, &mut shape_points)?;
        }
        points.extend(shape_points.into_iter().map(|(_, p)| p));
    }
    bar.finish_and_clear();
    // Other load on a shared machine changes during a run: measure again, keep the best of both
    // (the more demanding floor) and recompute every point's floor with it.
    limits.keep_best(&MachineLimits::measure_cpu(&[DType::BF16, DType::F32])?);
    let peaks: Vec<String> = limits.gemm.iter().map(|g| format!("{} {:.1} GFLOP/s", g.dtype, g.gflops)).collect();
    println!(
        "floor (best of start and end): copy {:.1} GB/s, read {:.1} GB/s, peak GEMM {}",
        limits.copy_gbps,
        limits.read_gbps,
        peaks.join(", ")
    );
    for p in points.iter_mut() {
        let (floor_s, bound) = limits.floor(p.flops, p.bytes, dtype);
        (p.floor_s, p.bound, p.pct_of_floor) = (floor_s, bound, 100.0 * floor_s / p.time_s);
    }
    print_table(&points);
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "backend": args.backend,
            "dtype": dtype.to_string(),
            "machine": limits,
            "routing": "softmax top-k renormalized, SwiGLU, no shared expert",
            "points": points,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| MoeError::config("json", e.to_string()))?;
        std::fs::write(path, text).map_err(|e| MoeError::Io { path: path.display().to_string(), source: e })?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Times `reference` on the points where it finishes in reasonable time (estimated from its
/// rate on the smallest point); the others say why they were skipped.
fn reference_points(
    args: &BenchArgs,
    cfg: &MoeConfig,
    weights: &MoeWeights,
    registry: &moe_core::BackendRegistry,
    hw: &moe_core::Hardware,
    bar: &ProgressBar,
    points: &mut [(Vec<Tensor>, Point)],
) -> Result<()> {
    // reference holds an f32 copy of every expert: skip shapes where that would not fit.
    let f32_bytes = (cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size * 4) as f64;
    if f32_bytes > 2.0 * args.mem_gib * (1u64 << 30) as f64 {
        for (_, p) in points.iter_mut() {
            p.note = join(&p.note, "reference skipped (its f32 copy of the experts exceeds 2x the memory budget)");
        }
        return Ok(());
    }
    bar.set_message(format!("{}: loading reference", points.first().map_or("", |p| p.1.shape.as_str())));
    let mut r = ConfigurableMoe::build(
        cfg.clone(),
        registry,
        hw,
        BuildOptions { backend: "reference".into(), ..Default::default() },
    )?;
    r.load_weights(weights)?;
    let mut rate: Option<f64> = None; // reference FLOP/s, from its first point
    for (inputs, p) in points.iter_mut() {
        if let Some(rate) = rate {
            if p.flops / rate > args.ref_max_s {
                p.note = join(&p.note, &format!("reference skipped (~{:.0} s per forward)", p.flops / rate));
                continue;
            }
        }
        bar.set_message(format!("{} T={} reference", p.shape, p.tokens));
        let (t, _) = time_point(&mut r, inputs, args.min_time.min(0.5), 20)?;
        rate = Some(p.flops.max(1.0) / t);
        p.reference_s = Some(t);
        p.speedup_vs_reference = Some(t / p.time_s);
    }
    Ok(())
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}; {b}")
    }
}

fn print_table(points: &[Point]) {
    println!(
        "{:<15} {:>7} {:>6} {:>11} {:>9} {:>8} {:>8} {:>8} {:>10}  notes",
        "shape", "experts", "T", "time ms", "GFLOP/s", "GB/s", "% floor", "bound", "vs ref"
    );
    for p in points {
        println!(
            "{:<15} {:>7} {:>6} {:>11.3} {:>9.1} {:>8.1} {:>7.1}% {:>8} {:>10}  {}",
            p.shape,
            format!("{}/{}", p.experts, p.experts_full),
            p.tokens,
            p.time_s * 1e3,
            p.gflops,
            p.weight_gbps,
            p.pct_of_floor,
            p.bound,
            p.speedup_vs_reference.map_or("-".into(), |s| format!("{s:.1}x")),
            p.note
        );
    }
}
