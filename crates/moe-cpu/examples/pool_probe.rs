//! What a decode step's small host steps cost on this machine: an empty parallel step on the
//! rayon pool and on the backend's spinning team (`moe_cpu::pool`), right after another one and
//! after the threads idled, and one thread reading 64 KiB that the other threads have just
//! written (the quantized T = 1 path's serial steps read the projections' outputs like that).
//!
//!     cargo run --release -p moe-cpu --example pool_probe -- [threads]

use std::time::{Duration, Instant};

use rayon::prelude::*;

fn median_us(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2] * 1e6
}

fn main() {
    let threads = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or_else(rayon::current_num_threads);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    pool.install(|| {
        let region = || {
            (0..threads).into_par_iter().for_each(|i| {
                std::hint::black_box(i);
            })
        };
        let team_step = || {
            moe_cpu::pool::for_each(threads, |i, _| {
                std::hint::black_box(i);
            })
        };
        let steps: [(&str, &dyn Fn()); 2] = [("team", &team_step), ("rayon", &region)];
        for (name, step) in steps {
            for idle_us in [0u64, 50, 200, 1000, 5000] {
                let mut t = Vec::new();
                for _ in 0..400 {
                    step();
                    if idle_us > 0 {
                        std::thread::sleep(Duration::from_micros(idle_us));
                    }
                    let s = Instant::now();
                    step();
                    t.push(s.elapsed().as_secs_f64());
                }
                println!(
                    "empty parallel step ({name:>5}) over {threads} items after {idle_us:>4} us idle: {:7.1} us",
                    median_us(t)
                );
            }
        }
        // 64 KiB = 16 Ki f32: written by the pool, then summed by this thread.
        let mut buf = vec![0.0f32; 16 << 10];
        let chunk = buf.len().div_ceil(threads);
        let (mut other, mut own) = (Vec::new(), Vec::new());
        for round in 0..400 {
            buf.par_chunks_mut(chunk).for_each(|c| c.iter_mut().for_each(|x| *x += 1.0));
            let s = Instant::now();
            std::hint::black_box(buf.iter().sum::<f32>());
            other.push(s.elapsed().as_secs_f64());
            buf.iter_mut().for_each(|x| *x += round as f32);
            let s = Instant::now();
            std::hint::black_box(buf.iter().sum::<f32>());
            own.push(s.elapsed().as_secs_f64());
        }
        println!(
            "one thread reads 64 KiB the pool just wrote: {:7.1} us; that it wrote itself: {:7.1} us",
            median_us(other),
            median_us(own)
        );
    });
}
