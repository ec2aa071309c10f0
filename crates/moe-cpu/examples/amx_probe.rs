//! Where the bf16 tile kernels (AMX where the CPU has it) lose time in expert-shaped GEMMs: the
//! same `Family::tile` calls as the engine, without the engine (no epilogue, no scheduling), over
//! a grid of rows per expert, k chunk and weight footprint, on all threads of the pool.
//!
//!     cargo run --release -p moe-cpu --example amx_probe -- [threads] [amx_rows]

use std::time::Instant;

use half::bf16;
use moe_cpu::kernels::{DotBf16, Family, Tile, MR_MAX};
use moe_cpu::pack::{ColumnMap, PackedMats, NB};
use rayon::prelude::*;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let threads = args.first().copied().unwrap_or_else(rayon::current_num_threads);
    if let Some(&rows) = args.get(1) {
        moe_cpu::tuning::set_amx_rows(rows);
    }
    let Some(fam) = DotBf16::new() else {
        eprintln!("this CPU has no AVX-512 BF16");
        return;
    };
    println!("threads {threads}, amx {:?}, amx rows {}", moe_cpu::kernels::amx_status(), moe_cpu::tuning::amx_rows());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    pool.install(|| {
        let (n, k) = (1536, 2048);
        println!("{:>8} {:>6} {:>6} {:>8} {:>10}", "experts", "rows", "kc", "pf", "GFLOP/s");
        for &(experts, rows, kc, pf) in &[
            (16usize, 256usize, 2048usize, false),
            (16, 64, 1024, true),
            (16, 64, 2048, true),
            (128, 64, 1024, true),
            (128, 64, 1024, false),
            (128, 64, 2048, true),
            (128, 64, 512, true),
            (128, 32, 1024, true),
            (128, 96, 1024, true),
            (128, 128, 1024, true),
        ] {
            let g = probe(&fam, experts, rows, n, k, kc, pf);
            println!("{experts:>8} {rows:>6} {kc:>6} {pf:>8} {g:>10.0}");
        }
    });
}

fn probe(fam: &DotBf16, experts: usize, m: usize, n: usize, k: usize, kc: usize, pf: bool) -> f64 {
    let mut w = PackedMats::<bf16>::new(experts, n, k, ColumnMap::Plain, true);
    let src: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32(((i * 7) % 17) as f32 / 17.0 - 0.5)).collect();
    for e in 0..experts {
        w.pack_one(e, &src);
    }
    let lda = moe_cpu::engine::row_stride::<bf16>(w.kp);
    let a: Vec<bf16> = (0..experts * m * lda).map(|i| bf16::from_f32(((i * 5) % 13) as f32 / 13.0 - 0.5)).collect();
    let mr = fam.mr();
    let once = || {
        (0..experts).into_par_iter().for_each(|e| {
            let mut c: Tile = [[0.0; NB]; MR_MAX];
            let a = &a[e * m * lda..];
            for b in 0..w.blocks {
                let blk = w.block(e, b);
                let next = (b + 1 < w.blocks).then(|| w.block(e, b + 1));
                for k0 in (0..w.kp).step_by(kc) {
                    let kl = kc.min(w.kp - k0);
                    let tiles = m.div_ceil(mr);
                    for rb in (0..m).step_by(mr) {
                        let p = next.filter(|_| pf).map(|nx| {
                            let chunk = &nx[k0 * NB..(k0 + kl) * NB];
                            let i = rb / mr;
                            &chunk[i * chunk.len() / tiles..(i + 1) * chunk.len() / tiles]
                        });
                        fam.tile(&a[rb * lda + k0..], lda, mr.min(m - rb), &blk[k0 * NB..], kl, &mut c, p);
                        std::hint::black_box(&mut c);
                    }
                }
            }
        })
    };
    once();
    let flops = 2.0 * (experts * m * n * k) as f64;
    let (start, mut best) = (Instant::now(), 0.0f64);
    while start.elapsed().as_secs_f64() < 1.0 {
        let t = Instant::now();
        once();
        best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}
