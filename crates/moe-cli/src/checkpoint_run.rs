//! `moe run --checkpoint DIR`: one MoE layer of a Hugging Face model directory, on an input file
//! (`hidden_states [T, H]`) or on a random input of the model's real shape, timed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use moe_core::backend::reference::host_router_logits;
use moe_core::checkpoint::{read_tensor_file, take_tensor, write_tensor_file, Checkpoint};
use moe_core::routing::route_host;
use moe_core::weights::random_hidden;
use moe_core::{BuildOptions, ConfigurableMoe, DType, MoeError, Result, Tensor};
use moe_runtime::{default_registry, probe_hardware};

use crate::run::{checksum, describe, time_forwards, RunArgs};

/// Checkpoint flags of `moe run`.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index): run
    /// one of its MoE layers instead of the embedded block.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// Layer to run (default: the first MoE layer of the model).
    #[arg(long, requires = "checkpoint")]
    pub layer: Option<usize>,
    /// Input safetensors file with `hidden_states` [T, H] (bf16, f16 or f32). Without it, a
    /// random input of --tokens rows is timed.
    #[arg(long, value_name = "IN.safetensors", requires = "checkpoint")]
    pub input: Option<PathBuf>,
    /// Output safetensors file: `hidden_states` [T, H] in the input's dtype (or --dtype).
    #[arg(long, value_name = "OUT.safetensors", requires = "checkpoint")]
    pub output: Option<PathBuf>,
    /// Also write `topk_ids` (i32 [T, k]) and `topk_weights` (f32 [T, k]) to the output (the
    /// reference router's choice).
    #[arg(long, requires = "output")]
    pub save_routing: bool,
}

/// Runs a checkpoint layer.
pub fn run(args: &RunArgs, c: &CheckpointArgs) -> Result<ExitCode> {
    let dir = c.checkpoint.as_ref().ok_or_else(|| MoeError::config("checkpoint", "no --checkpoint directory"))?;
    if args.ep.enabled() {
        return Err(MoeError::config("ep", "--checkpoint runs on one rank; drop --ep/--world-size/--rank"));
    }
    let ckpt = Checkpoint::open(dir)?;
    let spec = ckpt.spec();
    let layer = match c.layer {
        Some(l) => l,
        None => *ckpt.moe_layers().first().ok_or_else(|| {
            MoeError::checkpoint(dir.display().to_string(), "-", "config.json describes no MoE layer")
        })?,
    };
    let flag_dtype = args.dtype.as_deref().map(DType::parse_float).transpose()?;
    let input = match &c.input {
        Some(p) => Some(take_tensor(p, &read_tensor_file(p)?, "hidden_states")?),
        None => None,
    };
    let weight_dtype = flag_dtype.or(spec.dtype).unwrap_or(DType::BF16);
    let act_dtype = flag_dtype.or(input.as_ref().map(|t| t.dtype())).unwrap_or(weight_dtype);

    println!("moe run: {} layer {layer} of {}", spec.family.name(), dir.display());
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("  loading    [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .map_err(|e| MoeError::config("progress", e.to_string()))?
            .progress_chars("=> "),
    );
    let t0 = Instant::now();
    let loaded = ckpt.load_layer(layer, Some(weight_dtype), &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let load_s = t0.elapsed().as_secs_f64();
    let (mut cfg, weights) = crate::quant_cmd::at_load(args.quant.as_deref(), loaded.config.clone(), loaded.weights)?;
    cfg.act_dtype = act_dtype;
    cfg.chunk_size = args.chunk_size;
    let (h, k) = (cfg.hidden_size, cfg.top_k);
    println!("  family     {} ({})", spec.family.name(), describe(&cfg));
    println!(
        "  block      {} experts, top-{k}, hidden {h}, intermediate {}; {} ({})",
        cfg.num_experts,
        cfg.intermediate_size,
        loaded.layout.prefix,
        loaded.layout.experts.describe()
    );
    println!("  dtype      {weight_dtype} weights, {act_dtype} activations, f32 accumulation");
    println!("  moe layers {:?}", ckpt.moe_layers());

    let mut moe = ConfigurableMoe::build(
        cfg.clone(),
        &default_registry(),
        &probe_hardware(),
        BuildOptions { backend: args.backend.clone(), ..Default::default() },
    )?;
    let sel = moe.selection().clone();
    println!("  backend    {} ({})", sel.chosen, sel.why);
    moe.load_weights(&weights)?;
    println!("  weights    read in {load_s:.2} s, loaded in {:.2} s total", t0.elapsed().as_secs_f64());

    let hidden = match &input {
        Some(x) => {
            let t = x.dim(0)?;
            if x.shape() != [t, h] {
                let p = c.input.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                return Err(MoeError::checkpoint(
                    p,
                    "hidden_states",
                    format!("shape {:?} does not fit the model: expected [tokens, {h}]", x.shape()),
                ));
            }
            x.to_dtype(act_dtype)?
        }
        None => random_hidden(args.tokens, h, act_dtype, args.seed + 1)?,
    };
    let t = hidden.dim(0)?;
    let out = if input.is_some() {
        let t1 = Instant::now();
        let out = moe.forward(&hidden)?.to_host()?;
        println!("  time       {:.3} ms for {t} tokens (one forward)", t1.elapsed().as_secs_f64() * 1e3);
        out
    } else {
        let (out, times) = time_forwards(&mut moe, &hidden, args.warmup, args.iters)?;
        let median = times[times.len() / 2];
        let flops = 6.0 * (t * k * h * cfg.intermediate_size) as f64;
        println!(
            "  time       {:.3} ms per forward of {t} random tokens (median of {}, min {:.3} ms); {:.1} GFLOP/s",
            median * 1e3,
            times.len(),
            times[0] * 1e3,
            flops / median / 1e9
        );
        out
    };
    if let Some(path) = &c.output {
        let mut tensors: Vec<(&str, &Tensor)> = vec![("hidden_states", &out)];
        let routing;
        if c.save_routing {
            let logits = host_router_logits(&cfg, &weights.router, &hidden)?;
            let bias = weights.router.correction_bias.as_ref().map(|b| b.to_f32_vec()).transpose()?;
            routing = route_host(&cfg, &logits, bias.as_deref())?;
            tensors.push(("topk_ids", routing.ids()));
            tensors.push(("topk_weights", routing.weights()));
        }
        write_tensor_file(path, &tensors)?;
        let what = if c.save_routing { "hidden_states, topk_ids, topk_weights" } else { "hidden_states" };
        println!("  output     [{t}, {h}] {} -> {} ({what})", out.dtype(), path.display());
    }
    println!("checksum: {:.6e}", checksum(&out)?);
    Ok(ExitCode::SUCCESS)
}
