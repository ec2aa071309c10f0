//! Expert parallelism from the command line: `moe run --ep N` (N ranks as threads of this process,
//! over the in-process transport or NCCL with one GPU each), the multi-process form
//! (`--rank/--world-size/--master-addr/--master-port` or torchrun's variables; TCP or NCCL), and
//! the dispatch/combine bandwidth report that `moe bench --ep N` prints.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use moe_core::comm::rendezvous::RendezvousConfig;
use moe_core::comm::tcp::TcpTransport;
use moe_core::comm::transport::{config_hash, f32_from, f32_to_bytes, ReduceOp};
use moe_core::comm::{
    create_communication, run_ranks, CommOptions, CommStats, InProcessTransport, SharedTransport, StrategyChoice,
    Transport,
};
use moe_core::compare::{rel_l2, tolerance};
use moe_core::{BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeError, MoeWeights, ParallelConfig, Result, Tensor};
use moe_cuda::nccl::{self, NcclTransport};
use moe_runtime::presets::{family_config, Shape};
use moe_runtime::{default_registry, probe_hardware};

/// Expert-parallel flags shared by `moe run` and `moe bench`.
#[derive(Debug, Clone, Args)]
pub struct EpArgs {
    /// Expert-parallel ranks as threads of this process (experts split in contiguous blocks).
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
    /// Communication strategy: auto, allgather_reducescatter or all_to_all.
    #[arg(long, default_value = "auto")]
    pub comm: String,
    /// Transport: auto (NCCL when every rank can have its own GPU, else in-process threads or TCP
    /// between processes), inprocess, tcp or nccl.
    #[arg(long, default_value = "auto")]
    pub transport: String,
    /// This process's rank in a multi-process run (torchrun: RANK).
    #[arg(long, env = "RANK")]
    pub rank: Option<usize>,
    /// Processes in a multi-process run (torchrun: WORLD_SIZE).
    #[arg(long, env = "WORLD_SIZE")]
    pub world_size: Option<usize>,
    /// Host of rank 0 (torchrun: MASTER_ADDR; default 127.0.0.1).
    #[arg(long, env = "MASTER_ADDR")]
    pub master_addr: Option<String>,
    /// Port rank 0 listens on (torchrun: MASTER_PORT; default 29500).
    #[arg(long, env = "MASTER_PORT")]
    pub master_port: Option<u16>,
    /// Seconds a rank waits for its peers (rendezvous and every collective) before failing.
    #[arg(long, default_value_t = 120.0, env = "MOE_COMM_TIMEOUT_S")]
    pub comm_timeout_s: f64,
}

impl EpArgs {
    /// Whether expert parallelism was asked for (threads, processes, or a named transport, which
    /// runs even one rank through the expert-parallel path).
    pub fn enabled(&self) -> bool {
        self.ep > 1 || self.world_size.is_some() || self.rank.is_some() || self.transport != "auto"
    }

    fn timeout(&self) -> Result<Duration> {
        if !(self.comm_timeout_s.is_finite() && self.comm_timeout_s > 0.0) {
            return Err(MoeError::config("comm_timeout_s", "must be a positive number of seconds"));
        }
        Ok(Duration::from_secs_f64(self.comm_timeout_s))
    }
}

/// What to run on every rank.
#[derive(Debug, Clone)]
pub struct EpJob {
    /// The block (its `parallel` is filled per rank).
    pub cfg: MoeConfig,
    /// `auto` or a backend name.
    pub backend: String,
    /// Tokens of the whole batch, split over the ranks (data-parallel attention in front).
    pub tokens: usize,
    /// Seed of weights (`seed`) and input (`seed + 1`).
    pub seed: u64,
    /// Untimed forwards.
    pub warmup: usize,
    /// Timed forwards.
    pub iters: usize,
    /// Also run one rank on the whole batch and compare.
    pub check: bool,
    /// Expert load balancing and the input workload (`--eplb`, `--skew`).
    pub eplb: crate::eplb_cmd::RunEplb,
}

/// What a run measured (rank 0's view).
#[derive(Debug, Clone)]
pub struct EpReport {
    /// Ranks.
    pub world: usize,
    /// Transport used.
    pub transport: String,
    /// Strategy used.
    pub strategy: String,
    /// The backend of rank 0.
    pub backend: String,
    /// Tokens per rank.
    pub tokens_per_rank: Vec<usize>,
    /// Sorted forward times, slowest rank per iteration, seconds.
    pub times: Vec<f64>,
    /// Rank 0's dispatch/combine counters over the timed forwards.
    pub stats: CommStats,
    /// The whole batch's output (rows of every rank, in rank order), f32.
    pub output: Vec<f32>,
    /// Relative L2 against one rank, when checked.
    pub rel_l2_vs_one_rank: Option<f64>,
    /// What rank 0's load balancer did, when there is one.
    pub eplb_summary: Option<String>,
}

/// Tokens per rank: as even as possible, the first ranks take the remainder.
pub fn split_tokens(tokens: usize, world: usize) -> Vec<usize> {
    (0..world).map(|r| tokens / world + usize::from(r < tokens % world)).collect()
}

fn pick_transport(args: &EpArgs, multi_process: bool, world: usize) -> Result<&'static str> {
    let probe = nccl::probe();
    let t = match args.transport.as_str() {
        "auto" => match &probe {
            Ok(info) if multi_process || info.devices >= world => "nccl",
            _ if multi_process => "tcp",
            _ => "inprocess",
        },
        "nccl" => "nccl",
        "tcp" if multi_process => "tcp",
        "inprocess" if !multi_process => "inprocess",
        other => {
            return Err(MoeError::config(
                "transport",
                format!(
                    "transport `{other}` does not fit a {} run; use auto, nccl or {}",
                    if multi_process { "multi-process" } else { "threads-in-one-process" },
                    if multi_process { "tcp" } else { "inprocess" }
                ),
            ))
        }
    };
    if t == "nccl" {
        if let Err(reason) = probe {
            return Err(MoeError::Device(format!("the NCCL transport cannot be used: {reason}")));
        }
    }
    Ok(t)
}

/// Everything one rank does: build, load, forward its share, gather the outputs.
fn rank_main(
    rank: usize,
    transport: Box<dyn Transport>,
    job: &EpJob,
    choice: StrategyChoice,
    weights: &MoeWeights,
    hidden: &Tensor,
) -> Result<EpReport> {
    let world = transport.world_size();
    let transport_name = transport.name().to_string();
    let mut cfg = job.cfg.clone();
    cfg.parallel = ParallelConfig { ep_size: world, ep_rank: rank };
    let counts = split_tokens(job.tokens, world);
    let shared = SharedTransport::new(transport);
    let opts = CommOptions { choice, tokens_per_rank: counts[0].max(1), ..Default::default() };
    let (comm, stats) = create_communication(&cfg, shared.clone(), &opts)?;
    let hw = probe_hardware();
    let registry = default_registry();
    let eplb = job.eplb.build(&cfg, weights, hidden, Some(shared.clone()))?;
    let bo = BuildOptions { backend: job.backend.clone(), comm: Some(comm), eplb };
    let mut moe = ConfigurableMoe::build(cfg.clone(), &registry, &hw, bo)?;
    moe.load_weights(weights)?;
    let off: usize = counts[..rank].iter().sum();
    let x = hidden.narrow_rows(off, counts[rank])?;
    for _ in 0..job.warmup {
        moe.forward(&x)?;
    }
    *stats.lock().map_err(|_| MoeError::Device("stats lock poisoned".into()))? = CommStats::default();
    let mut times = Vec::with_capacity(job.iters.max(1));
    let mut out = Tensor::zeros(vec![0, cfg.hidden_size], cfg.act_dtype);
    for _ in 0..job.iters.max(1) {
        shared.lock()?.barrier()?;
        let t0 = Instant::now();
        out = moe.forward(&x)?.to_host()?;
        let mut dt = [t0.elapsed().as_secs_f32()];
        // an iteration lasts as long as its slowest rank
        shared.lock()?.all_reduce_f32(&mut dt, ReduceOp::Max)?;
        times.push(dt[0] as f64);
    }
    times.sort_by(f64::total_cmp);
    let h = cfg.hidden_size;
    let sizes: Vec<usize> = counts.iter().map(|c| c * h * 4).collect();
    let parts = shared.lock()?.all_gather_v(&f32_to_bytes(&out.to_f32_vec()?), &sizes)?;
    let output: Vec<f32> = parts.concat().chunks_exact(4).map(f32_from).collect();
    let stats = stats.lock().map_err(|_| MoeError::Device("stats lock poisoned".into()))?.clone();
    Ok(EpReport {
        world,
        transport: transport_name,
        strategy: moe.comm_name().to_string(),
        backend: moe.backend_name().to_string(),
        tokens_per_rank: counts,
        times,
        stats,
        output,
        rel_l2_vs_one_rank: None,
        eplb_summary: moe.eplb().summary(),
    })
}

/// Runs `job` with expert parallelism as `args` asks: threads of this process (`--ep N`) or
/// this process as one rank of several (rendezvous flags). Returns rank 0's report on rank 0,
/// `None` on the other ranks of a multi-process run.
pub fn run_job(args: &EpArgs, job: &EpJob) -> Result<Option<EpReport>> {
    let weights = MoeWeights::random(&job.cfg, job.seed)?;
    run_job_with(args, job, &weights)
}

/// As [`run_job`] with the whole block's weights given (every rank keeps its slots).
pub fn run_job_with(args: &EpArgs, job: &EpJob, weights: &MoeWeights) -> Result<Option<EpReport>> {
    let timeout = args.timeout()?;
    let choice = StrategyChoice::parse(&args.comm)?;
    let rdv = RendezvousConfig::resolve(
        args.rank,
        args.world_size,
        args.master_addr.clone(),
        args.master_port,
        Some(timeout),
    )?;
    let hidden = job.eplb.hidden(&job.cfg, weights, job.tokens, job.seed + 1)?;
    let mut report = match &rdv {
        Some(rdv) => {
            if args.ep > 1 && args.ep != rdv.world_size {
                return Err(MoeError::config(
                    "ep",
                    format!(
                        "--ep {} (threads) and a world size of {} (processes) were both given; use one",
                        args.ep, rdv.world_size
                    ),
                ));
            }
            let mut cfg = job.cfg.clone();
            cfg.parallel = ParallelConfig { ep_size: rdv.world_size, ep_rank: rdv.rank };
            cfg.validate()?;
            let hash = config_hash(&cfg)?;
            let transport: Box<dyn Transport> = match pick_transport(args, true, rdv.world_size)? {
                "nccl" => Box::new(NcclTransport::from_rendezvous(rdv, &hash, timeout)?),
                _ => Box::new(TcpTransport::connect(rdv, &hash, timeout)?),
            };
            let r = rank_main(rdv.rank, transport, job, choice, weights, &hidden)?;
            if rdv.rank != 0 {
                return Ok(None);
            }
            r
        }
        None => {
            let world = args.ep.max(1);
            let mut cfg = job.cfg.clone();
            cfg.parallel = ParallelConfig { ep_size: world, ep_rank: 0 };
            cfg.validate()?;
            let f = |rank: usize, t: Box<dyn Transport>| rank_main(rank, t, job, choice, weights, &hidden);
            let mut reports = match pick_transport(args, false, world)? {
                "nccl" => {
                    let ordinals: Vec<usize> = (0..world).collect();
                    let group: Vec<Box<dyn Transport>> = NcclTransport::local_group(&ordinals, timeout)?
                        .into_iter()
                        .map(|t| Box::new(t) as Box<dyn Transport>)
                        .collect();
                    run_ranks(group, f)?
                }
                _ => {
                    let group: Vec<Box<dyn Transport>> = InProcessTransport::group(world, timeout)?
                        .into_iter()
                        .map(|t| Box::new(t) as Box<dyn Transport>)
                        .collect();
                    run_ranks(group, f)?
                }
            };
            reports.swap_remove(0)
        }
    };
    if job.check {
        let mut one = job.cfg.clone();
        one.parallel = ParallelConfig::default();
        // The check is against the plain block: no EPLB slots or replicas.
        one.eplb_slots = None;
        let hw = probe_hardware();
        let registry = default_registry();
        let bo = BuildOptions { backend: job.backend.clone(), ..Default::default() };
        let mut moe = ConfigurableMoe::build(one, &registry, &hw, bo)?;
        moe.load_weights(weights)?;
        let want = moe.forward(&hidden)?.to_f32_vec()?;
        report.rel_l2_vs_one_rank = Some(rel_l2(&report.output, &want));
    }
    Ok(Some(report))
}

/// Prints the expert-parallel part of a report: layout, time, traffic and the one-rank check.
pub fn print_report(r: &EpReport, cfg: &MoeConfig) -> Result<bool> {
    let median = r.times[r.times.len() / 2];
    let per_rank = cfg.num_slots() / r.world;
    println!(
        "  ep         {} ranks over {} ({} strategy), {} slots each (contiguous blocks), tokens per rank {:?}",
        r.world, r.transport, r.strategy, per_rank, r.tokens_per_rank
    );
    println!("  backend    {} on every rank", r.backend);
    println!(
        "  time       {:.3} ms per forward (median of {}, slowest rank per iteration, min {:.3} ms)",
        median * 1e3,
        r.times.len(),
        r.times[0] * 1e3
    );
    let total: f64 = r.times.iter().sum();
    let s = &r.stats;
    println!(
        "  dispatch   {:.3} GB/s ({} bytes off rank 0 in {:.3} ms, {:.1}% of forward time)",
        s.dispatch_gbps(),
        s.dispatch_bytes,
        s.dispatch_secs * 1e3,
        100.0 * s.dispatch_secs / total.max(1e-12)
    );
    println!(
        "  combine    {:.3} GB/s ({} bytes off rank 0 in {:.3} ms, {:.1}% of forward time)",
        s.combine_gbps(),
        s.combine_bytes,
        s.combine_secs * 1e3,
        100.0 * s.combine_secs / total.max(1e-12)
    );
    if let Some(s) = &r.eplb_summary {
        println!("  eplb       {s}");
    }
    let mut ok = true;
    if let Some(err) = r.rel_l2_vs_one_rank {
        let tol = tolerance(cfg.act_dtype, cfg.weight_dtype, cfg.quant);
        ok = err < tol;
        println!(
            "  ep check   rel L2 vs one rank = {err:.3e} (tolerance {tol:.0e}): {}",
            if ok { "OK" } else { "MISMATCH" }
        );
    }
    Ok(ok)
}

/// `moe run` with expert parallelism: rank 0 prints the report and the checksum of the whole
/// batch; other processes of a multi-process run print one line.
pub fn run(args: &EpArgs, job: &EpJob) -> Result<ExitCode> {
    match run_job(args, job)? {
        None => {
            println!("moe run: rank {} done (rank 0 prints the report)", args.rank.unwrap_or(0));
            Ok(ExitCode::SUCCESS)
        }
        Some(r) => {
            let ok = print_report(&r, &job.cfg)?;
            let out = Tensor::from_f32(vec![job.tokens, job.cfg.hidden_size], r.output.clone())?;
            let out = out.to_dtype(job.cfg.act_dtype)?;
            println!("checksum: {:.6e}", crate::run::checksum(&out)?);
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

/// `moe bench --ep N`: every shape x token count with `N` ranks; prints per point the forward
/// time, the dispatch and combine bandwidth (bytes that left rank 0 per second of dispatch or
/// combine) and their share of the forward time. Expert counts are cut to `mem_gib` of weights
/// (and to a multiple of the rank count), as the single-rank bench does.
pub fn bench(
    args: &EpArgs,
    backend: &str,
    shapes: &[Shape],
    tokens: &[usize],
    dtype: DType,
    mem_gib: f64,
) -> Result<ExitCode> {
    let world = args.world_size.unwrap_or(args.ep.max(1));
    let mut header = true;
    for s in shapes {
        let per_expert = (3 * s.hidden * s.intermediate * dtype.size_bytes()) as f64;
        let fit = ((mem_gib * (1u64 << 30) as f64 / per_expert) as usize).min(s.experts);
        let mut scaled = *s;
        // a multiple of the ranks, holding at least top_k experts, at most the model's
        scaled.experts = (fit / world * world).max(s.top_k.div_ceil(world) * world).min(s.experts / world * world);
        let cfg = family_config("qwen3_moe", scaled, dtype)?;
        let weights = MoeWeights::random(&cfg, 7)?;
        for &t in tokens {
            let job = EpJob {
                cfg: cfg.clone(),
                backend: backend.to_string(),
                tokens: t,
                seed: 7,
                warmup: 1,
                iters: 5,
                check: false,
                eplb: Default::default(),
            };
            let Some(r) = run_job_with(args, &job, &weights)? else { continue };
            if header {
                println!("moe bench --ep {world}: backend `{backend}`, {dtype}, transport {}", r.transport);
                println!(
                    "{:<14} {:>7} {:>6} {:<24} {:>9} {:>13} {:>12} {:>10} {:>9}",
                    "shape",
                    "experts",
                    "T",
                    "strategy",
                    "fwd ms",
                    "dispatch GB/s",
                    "combine GB/s",
                    "dispatch%",
                    "combine%"
                );
                header = false;
            }
            let total: f64 = r.times.iter().sum::<f64>().max(1e-12);
            println!(
                "{:<14} {:>7} {:>6} {:<24} {:>9.3} {:>13.3} {:>12.3} {:>10.1} {:>9.1}",
                s.name,
                cfg.num_experts,
                t,
                r.strategy,
                r.times[r.times.len() / 2] * 1e3,
                r.stats.dispatch_gbps(),
                r.stats.combine_gbps(),
                100.0 * r.stats.dispatch_secs / total,
                100.0 * r.stats.combine_secs / total
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_split_is_even_with_remainder_first() {
        assert_eq!(split_tokens(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(split_tokens(2, 4), vec![1, 1, 0, 0]);
    }

    #[test]
    fn in_process_ep_matches_one_rank() {
        let args = EpArgs {
            ep: 4,
            comm: "all_to_all".into(),
            transport: "inprocess".into(),
            rank: None,
            world_size: None,
            master_addr: None,
            master_port: None,
            comm_timeout_s: 30.0,
        };
        let job = EpJob {
            cfg: MoeConfig::new(8, 2, 16, 8),
            backend: "reference".into(),
            tokens: 7,
            seed: 3,
            warmup: 1,
            iters: 2,
            check: true,
            eplb: Default::default(),
        };
        let r = run_job(&args, &job).unwrap().unwrap();
        assert_eq!(r.strategy, "all_to_all");
        assert_eq!(r.output.len(), 7 * 16);
        assert!(r.rel_l2_vs_one_rank.unwrap() < 1e-5);
        assert!(r.stats.dispatch_bytes > 0 && r.stats.combine_bytes > 0);
    }
}
