//! Where the bf16 tile kernels (AMX where the CPU has it) lose time in expert-shaped GEMMs: the
//! same `Family::tile` calls as the engine, without the engine (no epilogue, no scheduling), over
//! a grid of rows per expert, k chunk and weight footprint, on all threads of the pool; then the
//! engine itself (`engine::run`, gate_up + activation + down) on qwen3-30b-a3b's expert shape
//! with every expert at 64 rows and with the row counts of a random top-8 routing of 1024 tokens.
//!
//!     cargo run --release -p moe-cpu --example amx_probe -- [threads] [amx_rows] [grid: 0 = engine only]

use std::time::Instant;

use half::bf16;
use moe_cpu::kernels::{DotBf16, Family, Tile, MR_MAX};
use moe_cpu::pack::{ColumnMap, PackedMats, NB};
use rayon::prelude::*;

/// (experts, rows an expert, k chunk, prefetch) points of the tile-loop grid.
const GRID: &[(usize, usize, usize, bool)] = &[
    (16, 256, 2048, false),
    (16, 64, 1024, true),
    (16, 64, 2048, true),
    (128, 64, 1024, true),
    (128, 64, 1024, false),
    (128, 64, 2048, true),
    (128, 64, 512, true),
    (128, 32, 1024, true),
    (128, 70, 1024, true),
    (128, 96, 1024, true),
    (128, 128, 1024, true),
];

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
        let grid: &[(usize, usize, usize, bool)] = if args.get(2) == Some(&0) { &[] } else { GRID };
        for &(experts, rows, kc, pf) in grid {
            let g = probe(&fam, experts, rows, n, k, kc, pf);
            println!("{experts:>8} {rows:>6} {kc:>6} {pf:>8} {g:>10.0}");
        }
        println!("engine (qwen3 experts, 8192 rows):");
        let uniform = vec![64usize; 128];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut routed = vec![0usize; 128];
        for _ in 0..1024 {
            // 8 distinct experts per token, as top-8 routing picks them
            let mut picked = Vec::new();
            while picked.len() < 8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let e = (seed % 128) as usize;
                if !picked.contains(&e) {
                    picked.push(e);
                }
            }
            picked.into_iter().for_each(|e| routed[e] += 1);
        }
        for (name, counts) in [("uniform 64", &uniform), ("routed", &routed)] {
            let (g, ms) = engine(&fam, counts);
            println!("  {name:>12}: {ms:8.2} ms {g:8.0} GFLOP/s (max rows {})", counts.iter().max().unwrap_or(&0));
        }
    });
}

fn engine(fam: &DotBf16, counts: &[usize]) -> (f64, f64) {
    use moe_cpu::engine::{ExpertSet, Group, Workspace};
    let (e, h, i) = (counts.len(), 2048usize, 768usize);
    let mut w13 = PackedMats::<bf16>::new(e, 2 * i, h, ColumnMap::GateUp { inter: i }, true);
    let mut w2 = PackedMats::<bf16>::new(e, h, i, ColumnMap::Plain, true);
    let s13: Vec<bf16> = (0..2 * i * h).map(|x| bf16::from_f32(((x * 7) % 17) as f32 / 170.0 - 0.05)).collect();
    let s2: Vec<bf16> = (0..h * i).map(|x| bf16::from_f32(((x * 5) % 19) as f32 / 190.0 - 0.05)).collect();
    for x in 0..e {
        w13.pack_one(x, &s13);
        w2.pack_one(x, &s2);
    }
    let set =
        ExpertSet { w13: &w13, w2: &w2, b13: None, b2: None, inter: i, hidden: h, act: moe_core::Activation::Swiglu };
    let mut groups = Vec::new();
    let mut row0 = 0;
    for (x, &c) in counts.iter().enumerate() {
        if c > 0 {
            groups.push(Group { expert: x, row0, rows: c });
        }
        row0 += c;
    }
    let lda = moe_cpu::engine::row_stride::<bf16>(w13.kp);
    let a: Vec<bf16> = (0..row0 * lda).map(|x| bf16::from_f32(((x * 3) % 11) as f32 / 11.0 - 0.5)).collect();
    let mut y = vec![0.0f32; row0 * h];
    let mut ws = Workspace::default();
    moe_cpu::engine::run(fam, &set, &groups, &a, &mut y, &mut ws);
    let flops = 2.0 * row0 as f64 * (2 * i * h + h * i) as f64;
    let (start, mut best) = (Instant::now(), f64::MAX);
    while start.elapsed().as_secs_f64() < 2.0 {
        let t = Instant::now();
        moe_cpu::engine::run(fam, &set, &groups, &a, &mut y, &mut ws);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (flops / best / 1e9, best * 1e3)
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
