//! `moe run`: the embedded default block (or a checkpoint layer), timed, with a checksum.

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use moe_core::{BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeWeights, Tensor};
use moe_runtime::presets::{family_config, shape, DEFAULT_SHAPE};
use moe_runtime::{default_registry, probe_hardware};

/// Arguments of `moe run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model shape preset: qwen3-mini (default), qwen3-30b-a3b, mixtral-8x7b, deepseek-v3, gpt-oss-20b, tiny.
    #[arg(long, default_value = DEFAULT_SHAPE)]
    pub shape: String,
    /// Model family (routing, activation, shared experts): qwen3_moe, mixtral, qwen2_moe, olmoe,
    /// deepseek_v3, deepseek_v2, gpt_oss, llama4.
    #[arg(long, default_value = "qwen3_moe")]
    pub family: String,
    /// Override the number of experts of the shape.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Tokens per forward.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Weight and activation dtype: f32, bf16 or f16 (default bf16; with --checkpoint, the
    /// checkpoint's dtype for weights and the input's for activations).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Backend: auto or a registered name (see `moe info`).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Seed for the embedded weights and input.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Timed forwards (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed warm-up forwards.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Scheduler chunk size in tokens (default: no chunking).
    #[arg(long)]
    pub chunk_size: Option<usize>,
    /// Quantize the experts at load and report the error: fp8-block, fp8-tensor, mxfp4, nvfp4,
    /// int4-group, int8-channel (default: keep the weights as they are).
    #[arg(long)]
    pub quant: Option<String>,
    /// Expert parallelism (--ep N, --comm, --transport, multi-process rendezvous flags).
    #[command(flatten)]
    pub ep: crate::ep::EpArgs,
    /// Expert load balancing (--eplb none|static|dynamic, --eplb-slots, --skew...).
    #[command(flatten)]
    pub eplb: crate::eplb_cmd::RunEplbArgs,
    /// A Hugging Face checkpoint layer (--checkpoint DIR, --layer, --input, --output, --save-routing).
    #[command(flatten)]
    pub checkpoint: crate::checkpoint_run::CheckpointArgs,
}

/// A deterministic function of the output: a position-weighted sum in f64.
pub fn checksum(out: &Tensor) -> moe_core::Result<f64> {
    let v = out.to_f32_vec()?;
    // `+ 0.0` turns an empty sum's -0.0 into 0.0.
    Ok(v.iter().enumerate().map(|(i, &x)| x as f64 * (1.0 + (i % 251) as f64 / 251.0)).sum::<f64>() + 0.0)
}

/// Describes the routing of a config in words.
pub fn describe(cfg: &MoeConfig) -> String {
    format!(
        "{} routing, {} activation{}{}",
        cfg.routing.name(),
        cfg.activation.name(),
        match cfg.shared_expert {
            Some(s) if s.gated => format!(", gated shared expert (intermediate {})", s.intermediate_size),
            Some(s) => format!(", shared expert (intermediate {})", s.intermediate_size),
            None => String::new(),
        },
        if cfg.expert_bias { ", expert biases" } else { "" }
    )
}

/// Times `iters` forwards after `warmup`; returns the last output and sorted times in seconds.
pub fn time_forwards(
    moe: &mut ConfigurableMoe,
    hidden: &Tensor,
    warmup: usize,
    iters: usize,
) -> moe_core::Result<(Tensor, Vec<f64>)> {
    let mut out = moe.forward(hidden)?;
    for _ in 1..warmup {
        out = moe.forward(hidden)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        out = moe.forward(hidden)?;
        // Device backends may return device tensors: the copy back is part of the forward's cost.
        out = out.to_host()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((out, times))
}

/// Runs the block.
pub fn run(args: RunArgs) -> moe_core::Result<ExitCode> {
    if args.checkpoint.checkpoint.is_some() {
        return crate::checkpoint_run::run(&args, &args.checkpoint);
    }
    let dtype = DType::parse_float(args.dtype.as_deref().unwrap_or("bf16"))?;
    let mut s = shape(&args.shape)?;
    if let Some(e) = args.experts {
        s.experts = e;
    }
    let mut cfg = family_config(&args.family, s, dtype)?;
    cfg.chunk_size = args.chunk_size;
    let eplb = args.eplb.resolve(&mut cfg, args.ep.world_size.unwrap_or(args.ep.ep))?;
    cfg.validate()?;
    if args.ep.enabled() {
        println!("moe run: embedded default MoE block, expert parallel (seeded random weights, seed {})", args.seed);
        println!("  family     {} ({})", args.family, describe(&cfg));
        let job = crate::ep::EpJob {
            cfg,
            backend: args.backend.clone(),
            tokens: args.tokens,
            seed: args.seed,
            warmup: args.warmup,
            iters: args.iters,
            check: true,
            eplb,
        };
        return crate::ep::run(&args.ep, &job);
    }
    let hw = probe_hardware();
    let registry = default_registry();
    let t0 = Instant::now();
    let weights = MoeWeights::random(&cfg, args.seed)?;
    let (cfg, weights) = crate::quant_cmd::at_load(args.quant.as_deref(), cfg, weights)?;
    let hidden = eplb.hidden(&cfg, &weights, args.tokens, args.seed + 1)?;
    let balancer = eplb.build(&cfg, &weights, &hidden, None)?;
    let mut moe = ConfigurableMoe::build(
        cfg.clone(),
        &registry,
        &hw,
        BuildOptions { backend: args.backend.clone(), eplb: balancer, ..Default::default() },
    )?;
    println!("moe run: embedded default MoE block (seeded random weights, seed {})", args.seed);
    println!("  family     {} ({})", args.family, describe(&cfg));
    println!(
        "  shape      {}: {} experts, top-{}, hidden {}, intermediate {}",
        s.name, cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size
    );
    println!("  dtype      {dtype} weights and activations, f32 accumulation");
    println!("  tokens     {}{}", args.tokens, cfg.chunk_size.map(|c| format!(" (chunks of {c})")).unwrap_or_default());
    let sel = moe.selection().clone();
    println!("  backend    {} ({})", sel.chosen, sel.why);
    for (name, reason) in &sel.rejected {
        println!("    not {name}: {reason}");
    }
    moe.load_weights(&weights)?;
    let weight_bytes = (cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size * dtype.size_bytes()) as f64;
    println!(
        "  weights    {:.1} MiB of experts, generated and loaded in {:.2} s",
        weight_bytes / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    let (out, times) = time_forwards(&mut moe, &hidden, args.warmup, args.iters)?;
    let median = times[times.len() / 2];
    let flops = 6.0 * (args.tokens * cfg.top_k * cfg.hidden_size * cfg.intermediate_size) as f64;
    println!(
        "  time       {:.3} ms per forward (median of {}, min {:.3} ms, after {} warm-up)",
        median * 1e3,
        times.len(),
        times[0] * 1e3,
        args.warmup
    );
    println!("  compute    {:.1} GFLOP/s (6*T*k*H*I = {:.3} GFLOP per forward)", flops / median / 1e9, flops / 1e9);
    let v = out.to_f32_vec()?;
    let rms = (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt() + 0.0;
    println!("  output     [{}, {}] {}, rms {:.4}", args.tokens, cfg.hidden_size, out.dtype(), rms);
    if let Some(s) = moe.eplb().summary() {
        println!("  eplb       {s}");
    }
    println!("checksum: {:.6e}", checksum(&out)?);
    Ok(ExitCode::SUCCESS)
}
