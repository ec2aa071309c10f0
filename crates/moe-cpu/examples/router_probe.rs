//! Median time of the CPU router linear (`Router::logits`, bf16 weights and hidden states, qwen3-
//! 30b-a3b's 128 experts x 2048) at T tokens on rayon's pool (`RAYON_NUM_THREADS`). The printed
//! checksum is one logit summed over the repetitions, to compare builds' results.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release -p moe-cpu --example router_probe -- [T] [reps]

use std::time::Instant;

use moe_core::weights::RouterWeights;
use moe_core::{DType, Tensor};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (t, reps) = (args.first().copied().unwrap_or(1), args.get(1).copied().unwrap_or(20000));
    let (e, h) = (128usize, 2048usize);
    let w: Vec<f32> = (0..e * h).map(|i| ((i * 7919 % 997) as f32).sin() * 0.05).collect();
    let rw = RouterWeights {
        weight: Tensor::from_f32_as(vec![e, h], &w, DType::BF16).expect("router probe"),
        bias: None,
        correction_bias: None,
    };
    let isa = moe_cpu::Isa::detect().expect("router probe");
    let r = moe_cpu::router::Router::new(&rw, e, h, isa).expect("router probe");
    let x: Vec<f32> = (0..t * h).map(|i| ((i * 31 % 101) as f32).cos()).collect();
    let x = Tensor::from_f32_as(vec![t, h], &x, DType::BF16).expect("router probe");
    let mut v = Vec::with_capacity(reps);
    let mut sum = 0.0f32;
    for _ in 0..reps {
        let s = Instant::now();
        let l = r.logits(&x).expect("router probe");
        v.push(s.elapsed().as_secs_f64() * 1e6);
        sum += l.to_f32_vec().expect("router probe")[0];
    }
    v.sort_by(f64::total_cmp);
    println!("T={t} median {:.2} us p10 {:.2} ({sum})", v[v.len() / 2], v[v.len() / 10]);
}
