//! Fills the kernel cache ahead of time: compiles every kernel module with NVRTC for the given
//! architectures (default `sm_90a`) into `MOE_KERNEL_CACHE` (or `~/.cache/moe-runtime/kernels`),
//! so a deployment's first forward does not wait for NVRTC. Needs libnvrtc, not a GPU; the
//! cache key holds the source hash, the architecture, the options and the NVRTC version, so the
//! machine that runs the kernels must load the same NVRTC major.minor.
//!
//!   MOE_KERNEL_CACHE=dir cargo run --release -p moe-cuda --example kernel_cache -- sm_90a
use moe_cuda::kernels::Module;
use moe_cuda::nvrtc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let archs: Vec<String> = std::env::args().skip(1).collect();
    let archs = if archs.is_empty() { vec!["sm_90a".to_string()] } else { archs };
    nvrtc::ensure_nvrtc()?;
    let t0 = std::time::Instant::now();
    let mut n = 0;
    for arch in &archs {
        for m in Module::every() {
            nvrtc::cubin(m, arch)?;
            n += 1;
        }
    }
    println!("{n} modules cached in {} ({:.1} s)", nvrtc::cache_dir().display(), t0.elapsed().as_secs_f64());
    Ok(())
}
