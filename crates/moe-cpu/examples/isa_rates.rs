//! How often one core issues the dot-product instructions the CPU kernels choose between:
//! `vpdpbusd` (AVX-512 VNNI, 64 int8 products), `vdpbf16ps` (AVX-512 BF16, 32 bf16 products)
//! and `vfmadd` (16 f32 products), each on 512-bit registers in 12 independent chains, so
//! throughput rather than latency bounds it. Run it on every thread at once
//! (`-- --threads N`) to see whether the cores share their units.
//!
//!     cargo run --release -p moe-cpu --example isa_rates [-- --threads N]

#[cfg(target_arch = "x86_64")]
mod rates {
    use std::arch::x86_64::*;
    use std::time::Instant;

    const CHAINS: usize = 12;
    const STEPS: usize = 4_000_000;

    /// Instructions a nanosecond of `step` over `CHAINS` accumulators starting at `zero`
    /// (`#[inline(always)]` into each caller, so it runs with that caller's target features).
    /// The inputs come through `black_box`, so nothing folds at compile time, and the chains
    /// stay in registers.
    #[inline(always)]
    fn rate<T: Copy>(zero: T, step: impl Fn(T) -> T) -> f64 {
        let mut a = std::hint::black_box([zero; CHAINS]);
        let t = Instant::now();
        for _ in 0..STEPS {
            for v in a.iter_mut() {
                *v = step(*v);
            }
        }
        std::hint::black_box(a);
        (STEPS * CHAINS) as f64 / t.elapsed().as_nanos() as f64
    }

    /// `vpdpbusd` a nanosecond.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 VNNI must be available.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn vpdpbusd() -> f64 {
        let (b, c) = std::hint::black_box((_mm512_set1_epi32(0x0102_0304), _mm512_set1_epi32(0x0101_0101)));
        rate(_mm512_setzero_si512(), |v| _mm512_dpbusd_epi32(v, b, c))
    }

    /// `vdpbf16ps` a nanosecond.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 must be available.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn vdpbf16ps() -> f64 {
        // SAFETY: __m512i and __m512bh are both 64 plain bytes.
        let x =
            std::hint::black_box(unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3F80_3F80)) });
        rate(_mm512_setzero_ps(), |v| _mm512_dpbf16_ps(v, x, x))
    }

    /// 512-bit `vfmadd` a nanosecond.
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn fma() -> f64 {
        let p = std::hint::black_box(_mm512_set1_ps(1.000_1));
        rate(_mm512_setzero_ps(), |v| _mm512_fmadd_ps(v, p, p))
    }
}

#[cfg(target_arch = "x86_64")]
fn one_thread() -> String {
    let has = |f: &str| match f {
        "vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
        "bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
        _ => std::arch::is_x86_feature_detected!("avx512f"),
    };
    let mut line = String::new();
    // SAFETY: each kernel runs only where its features were detected.
    unsafe {
        if has("vnni") {
            let r = rates::vpdpbusd();
            line += &format!("vpdpbusd {r:.2}/ns ({:.0} int8 products/ns)  ", 64.0 * r);
        }
        if has("bf16") {
            let r = rates::vdpbf16ps();
            line += &format!("vdpbf16ps {r:.2}/ns ({:.0} bf16 products/ns)  ", 32.0 * r);
        }
        if has("f") {
            let r = rates::fma();
            line += &format!("vfmadd {r:.2}/ns ({:.0} f32 products/ns)", 16.0 * r);
        }
    }
    if line.is_empty() {
        line = "no AVX-512 on this CPU".into();
    }
    line
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        let args: Vec<String> = std::env::args().collect();
        let threads = args
            .iter()
            .position(|a| a == "--threads")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1);
        let lines: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(one_thread)).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| "thread failed".into())).collect()
        });
        for (i, l) in lines.iter().enumerate() {
            println!("thread {i}: {l}");
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only");
}
