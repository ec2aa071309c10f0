//! Compiles every kernel module with NVRTC for Hopper (`sm_90a`) and Ampere (`sm_80`) whenever
//! libnvrtc can be loaded (no GPU needed). CI installs `nvidia-cuda-nvrtc==13.0.88` with pip; the
//! crate finds the wheel itself (see `moe_cuda::nvrtc`). Without libnvrtc the test prints why it
//! skipped, unless `MOE_REQUIRE_NVRTC=1`, which turns the skip into a failure.

use moe_cuda::kernels::{KernelId, Module};
use moe_cuda::nvrtc;

#[test]
fn every_kernel_compiles_for_sm90a_and_sm80() {
    if let Err(reason) = nvrtc::ensure_nvrtc() {
        assert!(std::env::var_os("MOE_REQUIRE_NVRTC").is_none(), "MOE_REQUIRE_NVRTC is set but: {reason}");
        eprintln!("skip: {reason}");
        return;
    }
    let (major, minor) = nvrtc::nvrtc_version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    let mut failures = Vec::new();
    for arch in ["sm_90a", "sm_80"] {
        for m in Module::every() {
            match nvrtc::compile(m, arch) {
                Ok(cubin) => {
                    for id in KernelId::all().into_iter().filter(|k| k.module() == m) {
                        let name = id.name();
                        let found = cubin
                            .windows(name.len() + 1)
                            .any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0);
                        if !found {
                            failures.push(format!("{arch}: {} has no symbol {name}", m.name()));
                        }
                    }
                }
                Err(e) => failures.push(format!("{arch}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
