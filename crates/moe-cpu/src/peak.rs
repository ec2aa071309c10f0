//! The machine's GEMM ceiling as this crate's kernels reach it: a dense `C = A B^T` with the same
//! tiles and blocking as the expert engine, cache-friendly sizes, all threads of the current
//! rayon pool. Benchmarks use it as the arithmetic floor (`moe bench`).

use std::time::Instant;

use half::{bf16, f16};
use moe_core::{DType, MoeError, Result};
use rayon::prelude::*;

use crate::isa::Isa;
use crate::kernels::{AElem, DotBf16, Family, Tile, Widen, MR_MAX};
use crate::pack::{ColumnMap, PackedMats, WElem, NB};

/// A measured GEMM rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GemmRate {
    /// Weight dtype.
    pub dtype: String,
    /// Kernel description.
    pub kernel: String,
    /// Rows, columns, depth.
    pub mnk: (usize, usize, usize),
    /// Best rate over the trials, in GFLOP/s.
    pub gflops: f64,
}

/// Measures the best rate of the kernels for `dtype` weights on `isa` over about `seconds`.
pub fn gemm_rate(dtype: DType, isa: Isa, seconds: f64) -> Result<GemmRate> {
    let (m, n, k) = (256, 2048, 2048);
    let (kernel, gflops) = match dtype {
        DType::BF16 => match DotBf16::new().filter(|_| isa == Isa::Avx512Bf16) {
            Some(d) if d.uses_amx() && crate::tuning::amx_rows() > 0 => ("bf16 AMX tiles", rate(&d, m, n, k, seconds)),
            Some(d) => ("bf16 vdpbf16ps", rate(&d, m, n, k, seconds)),
            None => ("bf16 widened, f32 FMA", rate(&Widen::<bf16>::new(isa), m, n, k, seconds)),
        },
        DType::F32 => ("f32 FMA", rate(&Widen::<f32>::new(isa), m, n, k, seconds)),
        DType::F16 => ("f16 widened, f32 FMA", rate(&Widen::<f16>::new(isa), m, n, k, seconds)),
        other => return Err(MoeError::config("dtype", format!("{other} has no GEMM kernel; use f32, bf16 or f16"))),
    };
    Ok(GemmRate { dtype: dtype.to_string(), kernel: format!("{kernel} ({})", isa.name()), mnk: (m, n, k), gflops })
}

/// Memory bandwidth in GB/s on the current rayon pool: `(copy, read)`, each the best of a few
/// passes over buffers of [`probe_bytes`]. Copy counts bytes read plus bytes written (the STREAM
/// convention); read streams one buffer with the widest loads available.
pub fn bandwidth() -> (f64, f64) {
    let n = probe_bytes(last_level_cache_bytes()) / 8; // u64 words
    let src: Vec<u64> = (0..n).into_par_iter().map(|i| i as u64 ^ 0x9E37_79B9).collect();
    let mut dst = vec![0u64; n];
    let chunk = n.div_ceil(rayon::current_num_threads() * 8);
    let (mut copy, mut read) = (0.0f64, 0.0f64);
    for _ in 0..6 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        copy = copy.max(16.0 * n as f64 / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        let s = src.par_chunks(chunk).map(crate::kernels::sum_words).reduce(|| 0, u64::wrapping_add);
        read = read.max(8.0 * n as f64 / t.elapsed().as_secs_f64() / 1e9);
        std::hint::black_box(s);
    }
    std::hint::black_box(&dst);
    (copy, read)
}

/// Bytes of each bandwidth-probe buffer: 256 MiB, or four times the last-level cache where that
/// is larger (a 300 MiB L3 would otherwise hold most of a 256 MiB buffer, and the probe would
/// time the cache, not memory), at most 2 GiB.
pub fn probe_bytes(llc: Option<usize>) -> usize {
    (4 * llc.unwrap_or(0)).clamp(256 << 20, 2 << 30)
}

/// The largest data cache Linux reports for CPU 0 (`/sys/devices/system/cpu/cpu0/cache`), in bytes.
pub fn last_level_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("size")).ok())
        .filter_map(|s| parse_cache_size(s.trim()))
        .max()
}

/// `"32768K"`, `"300M"`, `"1G"` or plain bytes.
fn parse_cache_size(s: &str) -> Option<usize> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1usize << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<usize>().ok().map(|v| v * mult)
}

fn rate<F: Family>(fam: &F, m: usize, n: usize, k: usize, seconds: f64) -> f64 {
    let w: Vec<F::W> = (0..n * k).map(|i| F::W::from_f32(((i * 7) % 17) as f32 / 17.0 - 0.5)).collect();
    let mut p = PackedMats::new(1, n, k, ColumnMap::Plain, F::PAIRS);
    p.pack_one(0, &w);
    let (kp, lda) = (p.kp, crate::engine::row_stride::<F::A>(p.kp));
    let a: Vec<F::A> = (0..m * lda).map(|i| F::A::from_f32(((i * 5) % 13) as f32 / 13.0 - 0.5)).collect();
    let mr = fam.mr();
    let once = || {
        // Each task owns a range of column blocks and sweeps every row tile over them.
        (0..p.blocks).into_par_iter().with_min_len(2).for_each(|b| {
            let mut c: Tile = [[0.0; NB]; MR_MAX];
            let blk = p.block(0, b);
            for rb in (0..m).step_by(mr) {
                fam.tile(&a[rb * lda..], lda, mr.min(m - rb), blk, kp, &mut c, None);
                // keep every tile's result live, or the compiler may drop all but the last
                std::hint::black_box(&mut c);
            }
        })
    };
    once();
    let flops = 2.0 * (m * n * k) as f64;
    let start = Instant::now();
    let mut best = 0.0f64;
    while start.elapsed().as_secs_f64() < seconds || best == 0.0 {
        let t = Instant::now();
        once();
        best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_buffers_outgrow_the_last_level_cache() {
        assert_eq!(parse_cache_size("32768K"), Some(32 << 20));
        assert_eq!(parse_cache_size("300M"), Some(300 << 20));
        assert_eq!(parse_cache_size("1G"), Some(1 << 30));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("x"), None);
        assert_eq!(probe_bytes(None), 256 << 20);
        assert_eq!(probe_bytes(Some(32 << 20)), 256 << 20);
        assert_eq!(probe_bytes(Some(300 << 20)), 1200 << 20, "4x a 300 MiB L3");
        assert_eq!(probe_bytes(Some(4 << 30)), 2 << 30);
    }
}
