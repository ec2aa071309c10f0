//! Runs forwards of one block in a loop and prints per-stage times, for profiling the cpu
//! backend without the benchmark's setup: `cargo run --release -p moe-cpu --example forward_loop
//! -- TOKENS [EXPERTS] [SECONDS]` (qwen3-30b-a3b proportions, bf16).

use std::time::Instant;

use half::bf16;
use moe_core::backend::{ExpertBackend, LocalWeights, SlotRange};
use moe_core::quant::ExpertTensor;
use moe_core::tensor::HostData;
use moe_core::weights::{random_hidden, ExpertWeights, RouterWeights};
use moe_core::{DType, MoeConfig, QuantFormat, Tensor};
use moe_cpu::{CpuBackend, Isa};

fn main() -> moe_core::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let tokens = args.first().copied().unwrap_or(16);
    let experts = args.get(1).copied().unwrap_or(128);
    let seconds = args.get(2).copied().unwrap_or(5) as f64;
    let (h, i) = (2048, 768);
    let mut cfg = MoeConfig::new(experts, 8, h, i);
    cfg.weight_dtype = DType::BF16;
    cfg.act_dtype = DType::BF16;
    let val = |j: usize| bf16::from_f32(((j.wrapping_mul(2654435761) >> 7) % 1000) as f32 / 20000.0 - 0.025);
    let part = |rows: usize, cols: usize| -> moe_core::Result<ExpertTensor> {
        let v: Vec<bf16> = (0..experts * rows * cols).map(val).collect();
        let t = Tensor::from_host(vec![experts, rows, cols], HostData::BF16(v))?;
        Ok(ExpertTensor { format: QuantFormat::None, experts, rows, cols, parts: [("weight".into(), t)].into() })
    };
    let router = Tensor::from_f32(vec![experts, h], (0..experts * h).map(|j| val(j * 7).to_f32()).collect())?;
    let w = LocalWeights {
        router: RouterWeights { weight: router, bias: None, correction_bias: None },
        experts: ExpertWeights { w13: part(2 * i, h)?, w2: part(h, i)?, b13: None, b2: None },
        shared: None,
    };
    let mut b = CpuBackend::new(cfg.clone(), Isa::detect()?);
    b.create_weights(SlotRange::for_config(&cfg))?;
    b.load_weights(&w)?;
    drop(w);
    b.post_load()?;
    let inputs: Vec<Tensor> = (0..6).map(|s| random_hidden(tokens, h, DType::BF16, s)).collect::<Result<_, _>>()?;
    // CPU seconds of this process (user + system), to see through other load on a shared machine.
    let cpu_s = || -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (tick(11) + tick(12)) / 100.0
    };
    let cpu0 = cpu_s();
    let mut st = [0.0f64; 4];
    let mut n = 0;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        let x = &inputs[n % inputs.len()];
        let t0 = Instant::now();
        let logits = b.router_logits(x)?;
        let t1 = Instant::now();
        let routing = b.route(&logits)?.into_identity_slots();
        let t2 = Instant::now();
        let input = b.quantize_input(x)?;
        let routed = b.run_moe(&input, &routing)?;
        let t3 = Instant::now();
        std::hint::black_box(b.finalize(x, routed)?);
        let t4 = Instant::now();
        for (s, d) in st.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
            *s += d.as_secs_f64();
        }
        n += 1;
    }
    let cpu = cpu_s() - cpu0;
    let flops = 6.0 * (tokens * 8 * h * i) as f64;
    println!(
        "  {:.1} GFLOP/s wall, {:.1} GFLOP/s per CPU-second x {} threads (CPU time {:.2} s of {:.2} s wall)",
        flops * n as f64 / start.elapsed().as_secs_f64() / 1e9,
        flops * n as f64 / cpu * rayon::current_num_threads() as f64 / 1e9,
        rayon::current_num_threads(),
        cpu,
        start.elapsed().as_secs_f64()
    );
    let ms = |s: f64| s / n as f64 * 1e3;
    println!(
        "T={tokens} E={experts}: {n} forwards; router {:.3} ms, route {:.3} ms, run_moe {:.3} ms, finalize {:.3} ms",
        ms(st[0]),
        ms(st[1]),
        ms(st[2]),
        ms(st[3])
    );
    Ok(())
}
