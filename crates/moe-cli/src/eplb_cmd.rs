//! `moe eplb`: plans an expert placement for a routing trace (a file, or a synthetic Zipf skew)
//! and shows the per-rank load before and after, with an SVG bar chart.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use clap::Args;
use moe_core::comm::SharedTransport;
use moe_core::eplb::trace::{skewed_hidden, RoutingTrace, ZipfSkew};
use moe_core::eplb::{
    calibrate, imbalance, rebalance, EplbMode, EplbOptions, EplbSpec, HostStaging, LoadBalancer, Placement, Policy,
    Topology,
};
use moe_core::weights::random_hidden;
use moe_core::{MoeConfig, MoeError, MoeWeights, Tensor};

const TRACE_HELP: &str = "\
TRACE FORMAT (--trace FILE)
  Text, one token per line: the token's top-k logical expert ids, separated by spaces or commas.
  Every line has the same number of ids. Blank lines and lines starting with '#' are skipped,
  except an optional header '# experts N' giving the number of experts (default: largest id + 1).

      # experts 8
      3 5
      0,3

  Without --trace, a synthetic trace is drawn: expert popularity ~ 1/rank^s (Zipf, --zipf s) over a
  random expert order (--seed), each token taking --top-k distinct experts in proportion to it.
  The synthetic mode also evaluates the plan on a fresh trace of the same distribution.

LOAD
  A rank's load is the number of (token, k) assignments that land on its slots; a replicated
  expert's tokens go to its replicas by token index, exactly as the runtime routes them.";

/// Arguments of `moe eplb`.
#[derive(Debug, Args)]
#[command(after_long_help = TRACE_HELP)]
pub struct EplbArgs {
    /// Routing trace file (format: see `moe eplb --help`); default: a synthetic Zipf trace.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Synthetic trace: number of experts.
    #[arg(long, default_value_t = 256)]
    pub experts: usize,
    /// Synthetic trace: experts per token.
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    /// Synthetic trace: tokens.
    #[arg(long, default_value_t = 20_000)]
    pub tokens: usize,
    /// Synthetic trace: Zipf exponent of expert popularity.
    #[arg(long, default_value_t = 1.2)]
    pub zipf: f64,
    /// Synthetic trace: seed of the expert order (the token draws use seed + 1 and seed + 2).
    #[arg(long, default_value_t = 4)]
    pub seed: u64,
    /// Expert-parallel ranks (GPUs).
    #[arg(long, default_value_t = 8)]
    pub ranks: usize,
    /// Redundant slots on top of one per expert (total slots must divide over the ranks).
    #[arg(long, default_value_t = 32)]
    pub redundant: usize,
    /// Nodes the ranks are spread over (hierarchical policy).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Expert groups (DeepSeek n_group) for the hierarchical policy.
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    /// Policy: auto (hierarchical when groups divide over nodes), hierarchical or global.
    #[arg(long, default_value = "auto")]
    pub policy: String,
    /// Where to write the SVG plot of per-rank load.
    #[arg(long, default_value = "eplb.svg")]
    pub svg: PathBuf,
    /// Also write the planned placement as JSON (usable by `moe run --eplb static --placement`).
    #[arg(long)]
    pub write_placement: Option<PathBuf>,
    /// Also write the (synthetic) trace in the text format.
    #[arg(long)]
    pub write_trace: Option<PathBuf>,
}

/// EPLB flags of `moe run`.
#[derive(Debug, Clone, Args)]
pub struct RunEplbArgs {
    /// Expert load balancing: none; static (one placement, planned from a routing pass over the
    /// input, or --placement); dynamic (re-planned every --eplb-interval forwards, weights migrated
    /// into slots during the run).
    #[arg(long, default_value = "none")]
    pub eplb: String,
    /// Physical expert slots (experts + redundant replicas). Default with EPLB: experts + experts/8,
    /// rounded up to a multiple of the ranks.
    #[arg(long)]
    pub eplb_slots: Option<usize>,
    /// Dynamic EPLB: plan every N forwards from the last N forwards' statistics.
    #[arg(long, default_value_t = 4)]
    pub eplb_interval: usize,
    /// EPLB policy: auto, hierarchical or global.
    #[arg(long, default_value = "auto")]
    pub eplb_policy: String,
    /// Nodes the ranks span, for the hierarchical policy (expert groups are kept on one node).
    #[arg(long, default_value_t = 1)]
    pub eplb_nodes: usize,
    /// Placement JSON file (as `moe eplb --write-placement` writes): the static placement, or
    /// where dynamic EPLB starts.
    #[arg(long)]
    pub placement: Option<PathBuf>,
    /// Skewed input: each token leans toward one expert drawn with Zipf weights of this exponent
    /// (over a random expert order), so routing is skewed as in real serving; 0 = plain random input.
    #[arg(long, default_value_t = 0.0)]
    pub skew: f64,
    /// Write the routing of the run's input (host router, logical experts) as a trace for
    /// `moe eplb --trace`.
    #[arg(long)]
    pub write_trace: Option<PathBuf>,
}

/// The resolved EPLB request of a run: the balancer spec and the input workload.
#[derive(Debug, Clone, Default)]
pub struct RunEplb {
    /// Which balancer and how.
    pub spec: EplbSpec,
    /// Zipf exponent of the input skew (0: none).
    pub skew: f64,
    /// Where to write the routing trace of the input.
    pub write_trace: Option<PathBuf>,
    /// One host staging copy of the experts for all ranks (threads) of this process.
    staging: OnceLock<Arc<HostStaging>>,
}

impl RunEplbArgs {
    /// Checks the flags, sets `cfg.eplb_slots` for `ranks` ranks and returns the request.
    pub fn resolve(&self, cfg: &mut MoeConfig, ranks: usize) -> moe_core::Result<RunEplb> {
        let mode = EplbMode::parse(&self.eplb)?;
        if !(self.skew.is_finite() && self.skew >= 0.0) {
            return Err(MoeError::config("skew", format!("must be a finite exponent >= 0, got {}", self.skew)));
        }
        let ranks = ranks.max(1);
        if mode != EplbMode::None || self.eplb_slots.is_some() {
            let e = cfg.num_experts;
            let slots = self.eplb_slots.unwrap_or_else(|| (e + e.div_ceil(8)).div_ceil(ranks) * ranks);
            cfg.eplb_slots = Some(slots);
        }
        let mut options = EplbOptions::for_config(cfg);
        options.policy = Policy::parse(&self.eplb_policy)?;
        options.num_nodes = self.eplb_nodes;
        options.interval = self.eplb_interval;
        options.window = self.eplb_interval.max(1);
        Ok(RunEplb {
            spec: EplbSpec { mode, options: Some(options), placement: self.placement.clone(), staging: None },
            skew: self.skew,
            write_trace: self.write_trace.clone(),
            staging: OnceLock::new(),
        })
    }
}

impl RunEplb {
    /// The run's input: plain random activations, or skewed toward Zipf-popular experts. Writes
    /// its routing trace when asked.
    pub fn hidden(&self, cfg: &MoeConfig, weights: &MoeWeights, tokens: usize, seed: u64) -> moe_core::Result<Tensor> {
        let hidden = if self.skew == 0.0 {
            random_hidden(tokens, cfg.hidden_size, cfg.act_dtype, seed)?
        } else {
            let skew = ZipfSkew::new(cfg.num_experts, cfg.top_k, self.skew, seed)?;
            skewed_hidden(&weights.router, &skew, tokens, 3.0, cfg.act_dtype, seed)?
        };
        if let Some(path) = &self.write_trace {
            let logits = moe_core::backend::reference::host_router_logits(cfg, &weights.router, &hidden)?;
            let bias = weights.router.correction_bias.as_ref().map(|b| b.to_f32_vec()).transpose()?;
            let routing = moe_core::routing::route_host(cfg, &logits, bias.as_deref())?;
            let ids = routing.ids_host()?.iter().map(|&i| i as u32).collect();
            let trace = RoutingTrace::new(cfg.num_experts, cfg.top_k, ids)?;
            std::fs::write(path, trace.to_text())
                .map_err(|source| MoeError::Io { path: path.display().to_string(), source })?;
        }
        Ok(hidden)
    }

    /// This rank's balancer; a static plan is calibrated on the whole batch `hidden` (the same on
    /// every rank).
    pub fn build(
        &self,
        cfg: &MoeConfig,
        weights: &MoeWeights,
        hidden: &Tensor,
        transport: Option<SharedTransport>,
    ) -> moe_core::Result<Option<Box<dyn LoadBalancer>>> {
        let calibration = match (self.spec.mode, &self.spec.placement) {
            (EplbMode::Static, None) => Some(calibrate(cfg, weights, hidden)?),
            _ => None,
        };
        let mut spec = self.spec.clone();
        if spec.mode == EplbMode::Dynamic {
            if self.staging.get().is_none() {
                // Two ranks racing here both build a copy; only one is kept.
                let _ = self.staging.set(Arc::new(HostStaging::all(&weights.experts)?));
            }
            spec.staging = self.staging.get().cloned();
        }
        spec.build(cfg, calibration.as_deref(), transport)
    }
}

/// Per-rank loads of one evaluation.
struct Series {
    label: String,
    color: &'static str,
    loads: Vec<u64>,
}

fn ratio(loads: &[u64]) -> f64 {
    imbalance(&loads.iter().map(|&x| x as f64).collect::<Vec<_>>())
}

/// Runs `moe eplb`.
pub fn run(args: EplbArgs) -> moe_core::Result<ExitCode> {
    let policy = Policy::parse(&args.policy)?;
    let (trace, fresh, source) = match &args.trace {
        Some(path) => (RoutingTrace::load(path)?, None, format!("trace {}", path.display())),
        None => {
            let skew = ZipfSkew::new(args.experts, args.top_k, args.zipf, args.seed)?;
            let t = skew.sample(args.tokens, args.seed + 1)?;
            let f = skew.sample(args.tokens, args.seed + 2)?;
            let src = format!("synthetic Zipf trace (s = {}, expert order seed {})", args.zipf, args.seed);
            (t, Some(f), src)
        }
    };
    if let Some(p) = &args.write_trace {
        std::fs::write(p, trace.to_text()).map_err(|source| MoeError::Io { path: p.display().to_string(), source })?;
    }
    let e = trace.num_experts();
    let slots = e + args.redundant;
    let topo = Topology { num_slots: slots, num_ranks: args.ranks, num_nodes: args.nodes, num_groups: args.groups };
    if !slots.is_multiple_of(args.ranks.max(1)) {
        return Err(MoeError::config(
            "redundant",
            format!(
                "{e} experts + {} redundant = {slots} slots do not split over {} ranks; pick --redundant so they do",
                args.redundant, args.ranks
            ),
        ));
    }
    if !e.is_multiple_of(args.ranks) {
        return Err(MoeError::config(
            "ranks",
            format!("{e} experts do not split over {} ranks for the unbalanced baseline", args.ranks),
        ));
    }
    // "Before": one slot per expert, contiguous blocks per rank, no replicas (plain EP).
    let before = trace.rank_loads(&Placement::identity(e)?, args.ranks)?;
    let load: Vec<f64> = trace.expert_counts().iter().map(|&c| c as f64).collect();
    let placement = rebalance(&load, topo, policy)?;
    let after = trace.rank_loads(&placement, args.ranks)?;
    let mean = trace.ids().len() as f64 / args.ranks as f64;

    println!("moe eplb: {source}");
    println!("  trace      {} tokens, {e} experts, top-{}", trace.num_tokens(), trace.top_k());
    let used = match policy {
        Policy::Auto if args.groups.is_multiple_of(args.nodes.max(1)) => "auto -> hierarchical",
        Policy::Auto => "auto -> global",
        Policy::Hierarchical => "hierarchical",
        Policy::Global => "global",
    };
    println!(
        "  placement  {used} policy, {slots} slots ({} redundant) over {} ranks in {} node(s), {} groups; {} slots per rank",
        args.redundant,
        args.ranks,
        args.nodes,
        args.groups,
        slots / args.ranks
    );
    let line = |name: &str, l: &[u64], what: &str| {
        let max = l.iter().copied().max().unwrap_or(0);
        println!("  {name:<10} max/mean {:.4}  (max {max}, mean {mean:.0} assignments per rank){what}", ratio(l));
    };
    line("before", &before, " without EPLB");
    line("after", &after, " on the planned trace");
    let mut series = vec![
        Series { label: format!("before (max/mean {:.3})", ratio(&before)), color: "#9e9e9e", loads: before },
        Series { label: format!("after (max/mean {:.3})", ratio(&after)), color: "#1f77b4", loads: after },
    ];
    if let Some(f) = fresh {
        let l = f.rank_loads(&placement, args.ranks)?;
        line("fresh", &l, " on a fresh trace of the same distribution");
        series.push(Series { label: format!("fresh trace (max/mean {:.3})", ratio(&l)), color: "#ff7f0e", loads: l });
    }
    let counts = placement.replica_counts();
    let replicated = counts.iter().filter(|&&c| c > 1).count();
    let (hot, hot_n) = counts.iter().enumerate().max_by_key(|&(i, &c)| (c, std::cmp::Reverse(i))).unwrap_or((0, &1));
    println!("  replicas   {replicated} experts replicated; expert {hot} has the most ({hot_n})");
    let title = format!("Per-rank load, {} ranks, {slots} slots ({source})", args.ranks);
    std::fs::write(&args.svg, svg_rank_loads(&title, mean, &series))
        .map_err(|source| MoeError::Io { path: args.svg.display().to_string(), source })?;
    println!("  plot       {}", args.svg.display());
    if let Some(p) = &args.write_placement {
        placement.save(p)?;
        println!("  placement  written to {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A grouped bar chart: one group per rank, one bar per series, a dashed line at the mean.
fn svg_rank_loads(title: &str, mean: f64, series: &[Series]) -> String {
    let ranks = series.iter().map(|s| s.loads.len()).max().unwrap_or(0).max(1);
    let ymax = series.iter().flat_map(|s| s.loads.iter().copied()).max().unwrap_or(1).max(1) as f64 * 1.08;
    let (w, h) = (960.0, 480.0);
    let (left, right, top, bottom) = (80.0, 20.0, 50.0, 90.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let group = pw / ranks as f64;
    let bar = group * 0.8 / series.len().max(1) as f64;
    let y = |v: f64| top + ph - v / ymax * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        esc(title)
    );
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>\n",
            left + pw,
            left - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
    }
    for (k, ser) in series.iter().enumerate() {
        for (r, &v) in ser.loads.iter().enumerate() {
            let x = left + r as f64 * group + group * 0.1 + k as f64 * bar;
            s += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>rank {r}: {v}</title></rect>\n",
                y(v as f64),
                bar.max(1.0),
                (top + ph - y(v as f64)).max(0.0),
                ser.color
            );
        }
    }
    for r in 0..ranks {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{r}</text>\n",
            left + (r as f64 + 0.5) * group,
            top + ph + 16.0
        );
    }
    s += &format!(
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{m:.1}\" y2=\"{m:.1}\" stroke=\"black\" stroke-dasharray=\"6 4\"/>\
         <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">mean {mean:.0}</text>\n",
        left + pw,
        left + pw,
        y(mean) - 4.0,
        m = y(mean)
    );
    s += &format!(
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\" stroke=\"black\"/>\
         <line x1=\"{left}\" x2=\"{}\" y1=\"{b}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">rank</text>\n\
         <text transform=\"translate(18 {}) rotate(-90)\" text-anchor=\"middle\">(token, k) assignments</text>\n",
        top + ph,
        left + pw,
        left + pw / 2.0,
        top + ph + 34.0,
        top + ph / 2.0,
        b = top + ph
    );
    for (k, ser) in series.iter().enumerate() {
        let x = left + k as f64 * 260.0;
        let ly = h - 24.0;
        s += &format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"14\" height=\"14\" fill=\"{}\"/><text x=\"{}\" y=\"{ly}\">{}</text>\n",
            ly - 11.0,
            ser.color,
            x + 20.0,
            esc(&ser.label)
        );
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `moe run --ep 4 --eplb dynamic --skew 1.2` in small: the balancer migrates and the output
    /// still equals one rank without EPLB.
    #[test]
    fn ep_run_with_dynamic_eplb_matches_one_rank() {
        let ep = crate::ep::EpArgs {
            ep: 4,
            comm: "all_to_all".into(),
            transport: "inprocess".into(),
            rank: None,
            world_size: None,
            master_addr: None,
            master_port: None,
            comm_timeout_s: 30.0,
        };
        let flags = RunEplbArgs {
            eplb: "dynamic".into(),
            eplb_slots: None,
            eplb_interval: 2,
            eplb_policy: "auto".into(),
            eplb_nodes: 1,
            placement: None,
            skew: 1.2,
            write_trace: None,
        };
        let mut cfg = MoeConfig::new(8, 2, 16, 8);
        let eplb = flags.resolve(&mut cfg, 4).unwrap();
        assert_eq!(cfg.eplb_slots, Some(12), "8 + 1 rounded up to a multiple of 4 ranks");
        let job = crate::ep::EpJob {
            cfg,
            backend: "reference".into(),
            tokens: 64,
            seed: 5,
            warmup: 2,
            iters: 3,
            check: true,
            eplb,
        };
        let r = crate::ep::run_job(&ep, &job).unwrap().unwrap();
        assert!(r.rel_l2_vs_one_rank.unwrap() < 1e-6, "{:?}", r.rel_l2_vs_one_rank);
        let summary = r.eplb_summary.unwrap();
        assert!(summary.contains("dynamic: 2 plan(s)") && !summary.contains(" 0 migration"), "{summary}");
    }

    #[test]
    fn svg_has_one_bar_per_rank_and_series() {
        let series = vec![
            Series { label: "a<b".into(), color: "#000", loads: vec![1, 5, 3] },
            Series { label: "c".into(), color: "#111", loads: vec![3, 3, 3] },
        ];
        let s = svg_rank_loads("t & u", 3.0, &series);
        assert_eq!(s.matches("<rect x=").count(), 6 + 2, "6 bars and 2 legend swatches");
        assert!(s.contains("a&lt;b") && s.contains("t &amp; u"));
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }
}
