//! Interleaved A/B timing of the `cpu` backend's streaming switches (`moe_cpu::tuning`) on the
//! qwen3-30b-a3b shape (bf16): two backends with the same weights, variant A and variant B, run in
//! alternating slices of `--slice-s` seconds so both see the same host noise (this VM's memory
//! bandwidth moves by tens of percent within minutes, which makes back-to-back `moe bench` runs
//! useless for differences of a few percent).
//!
//!     cargo run --release -p moe-runtime --example cpu_ab -- --tokens 1 --a-thp 0 --a-pf 0 \
//!         --b-thp 1 --b-pf 16 --slices 20 --slice-s 0.5 --threads 2
//!
//! `--{a,b}-split N`: tasks per thread of the engine's split schedule (default 12).
//! `--{a,b}-amx N`: rows from which bf16 tiles run on AMX where the CPU has it (default 2; 0 off).
//! `--{a,b}-quant F`: quantize that variant's experts at load (`int4-group`, ...; default none),
//! e.g. to time a format against bf16 under the same noise.
//! `--{a,b}-int4-act N`: how int4 rows take activations at decode sizes (0 bf16, 1 int8, 2 two
//! int8 bytes; default 2; see `moe_cpu::tuning::int4_act`).
//! `--{a,b}-qdecode N`: the two-step int4 decode path, 0 off, else its gate_up tasks per
//! 128-wide group (1, 2, 4, 8; default 4; `moe_cpu::tuning::quant_decode_splits`).
//! `--{a,b}-int4-rows N`: weight rows a dot of that path takes together (4 or 1; default 4).
//! `--{a,b}-int-tiles N`: quantized experts' tile path as integer tiles (0 never, 1 always, 2
//! unless the bf16 tiles run on AMX; default 2; `moe_cpu::tuning::quant_int_tiles`), e.g. on an
//! AMX host: `--a-quant int4-group --b-quant int4-group --a-int-tiles 0 --b-int-tiles 1`.
//! `--{a,b}-kc N`: inputs per k-chunk of the dense engine (default 2048; `moe_cpu::tuning::k_chunk`).
//! `--{a,b}-tile-pf N`: how bf16 tiles of 2-8 rows prefetch (0, 1, 2; default 2;
//! `moe_cpu::tuning::small_tile_prefetch`).
//! `--{a,b}-pool team|rayon`: where the backend's parallel steps run (default team, see
//! `moe_cpu::pool`).
//! `--gap-us N`: the calling thread sleeps N us between forwards (default 0), as a model's other
//! layers would keep it away from the MoE block; pools whose threads sleep pay for it.

use std::time::Instant;

use moe_core::config::RoutingConfig;
use moe_core::weights::random_hidden;
use moe_core::{BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeWeights, QuantFormat, Tensor};
use moe_runtime::{default_registry, probe_hardware};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// One side of the A/B: the switches set before its slices run.
#[derive(Debug, Clone, Copy)]
struct Variant {
    thp: bool,
    prefetch: usize,
    split: usize,
    amx: usize,
    quant: QuantFormat,
    int4_act: usize,
    qdecode: usize,
    int4_rows: usize,
    int_tiles: usize,
    kc: usize,
    tile_pf: usize,
    team: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or(default.into())
    };
    let tokens: usize = opt("--tokens", "1").parse()?;
    let slices: usize = opt("--slices", "20").parse()?;
    let slice_s: f64 = opt("--slice-s", "0.5").parse()?;
    let threads: usize = opt("--threads", "2").parse()?;
    let gap_us: u64 = opt("--gap-us", "0").parse()?;
    let variant = |p: &str| -> Result<Variant, Box<dyn std::error::Error>> {
        Ok(Variant {
            thp: opt(&format!("--{p}-thp"), "0").parse::<u8>()? != 0,
            prefetch: opt(&format!("--{p}-pf"), "16").parse()?,
            split: opt(&format!("--{p}-split"), "12").parse()?,
            amx: opt(&format!("--{p}-amx"), "2").parse()?,
            quant: QuantFormat::parse(&opt(&format!("--{p}-quant"), "none"))?,
            int4_act: opt(&format!("--{p}-int4-act"), "2").parse()?,
            qdecode: opt(&format!("--{p}-qdecode"), "4").parse()?,
            int4_rows: opt(&format!("--{p}-int4-rows"), "4").parse()?,
            int_tiles: opt(&format!("--{p}-int-tiles"), "2").parse()?,
            kc: opt(&format!("--{p}-kc"), "2048").parse()?,
            tile_pf: opt(&format!("--{p}-tile-pf"), "2").parse()?,
            team: match opt(&format!("--{p}-pool"), "team").as_str() {
                "team" => true,
                "rayon" => false,
                other => return Err(format!("--{p}-pool: team or rayon, not {other}").into()),
            },
        })
    };
    let variants = [variant("a")?, variant("b")?];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    pool.install(|| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut cfg = MoeConfig::new(128, 8, 2048, 768);
        cfg.weight_dtype = DType::BF16;
        cfg.act_dtype = DType::BF16;
        cfg.routing = RoutingConfig::SoftmaxTopk { renormalize: true };
        let weights = MoeWeights::random(&cfg, 7)?;
        let (registry, hw) = (default_registry(), probe_hardware());
        let mut moes = Vec::new();
        for &Variant { thp, quant, .. } in &variants {
            moe_cpu::tuning::set_huge_pages(thp);
            let opts = BuildOptions { backend: "cpu".into(), ..Default::default() };
            let (c, w) = match quant {
                QuantFormat::None => (cfg.clone(), weights.clone()),
                f => {
                    let (c, w, _) = moe_core::quant::quantize_block(&cfg, &weights, f)?;
                    (c, w)
                }
            };
            let mut m = ConfigurableMoe::build(c, &registry, &hw, opts)?;
            m.load_weights(&w)?;
            moes.push(m);
        }
        let inputs: Vec<Tensor> =
            (0..6).map(|i| random_hidden(tokens, cfg.hidden_size, DType::BF16, 100 + i)).collect::<Result<_, _>>()?;
        let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut paired = Vec::new();
        for s in 0..slices {
            let mut slice_median = [0.0; 2];
            // Alternate which variant goes first so a drift inside a slice pair cancels.
            for v in if s % 2 == 0 { [0, 1] } else { [1, 0] } {
                let var = &variants[v];
                moe_cpu::tuning::set_gemv_prefetch(var.prefetch);
                moe_cpu::tuning::set_split_tasks_per_thread(var.split);
                moe_cpu::tuning::set_amx_rows(var.amx);
                moe_cpu::tuning::set_int4_act(var.int4_act);
                moe_cpu::tuning::set_quant_decode(var.qdecode);
                moe_cpu::tuning::set_int4_dot_rows(var.int4_rows);
                moe_cpu::tuning::set_quant_int_tiles(var.int_tiles);
                moe_cpu::tuning::set_k_chunk(var.kc);
                moe_cpu::tuning::set_small_tile_prefetch(var.tile_pf);
                moe_cpu::pool::set_use_team(var.team);
                let m = &mut moes[v];
                let mut t = Vec::new();
                let start = Instant::now();
                while t.len() < 3 || start.elapsed().as_secs_f64() < slice_s {
                    if gap_us > 0 {
                        std::thread::sleep(std::time::Duration::from_micros(gap_us));
                    }
                    let x = &inputs[t.len() % inputs.len()];
                    let t0 = Instant::now();
                    std::hint::black_box(m.forward(x)?.to_host()?);
                    t.push(t0.elapsed().as_secs_f64());
                }
                slice_median[v] = median(&mut t.clone());
                times[v].extend(t);
            }
            paired.push(slice_median[1] / slice_median[0]);
        }
        for (v, Variant { thp, prefetch: pf, split, amx, quant, int4_act, qdecode, int4_rows, int_tiles, kc, tile_pf, team }) in
            variants.iter().enumerate()
        {
            let pool = if *team { "team" } else { "rayon" };
            let med = median(&mut times[v]);
            println!(
                "variant {} (thp {thp}, gemv prefetch {pf}, split tasks {split}, amx rows {amx}, quant {quant}, int4 act {int4_act}, int4 decode path {qdecode}, int4 rows {int4_rows}, int tiles {int_tiles}, k chunk {kc}, tile pf {tile_pf}, pool {pool}): median {:.3} ms over {} forwards",
                ["A", "B"][v],
                med * 1e3,
                times[v].len()
            );
        }
        let mut p = paired.clone();
        let m = median(&mut p);
        let better = paired.iter().filter(|&&r| r < 1.0).count();
        println!("B / A per slice: median {m:.3} (B faster in {better} of {} slices)", paired.len());
        Ok(())
    })
    .map_err(|e| e.to_string().into())
}
