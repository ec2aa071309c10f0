//! The availability probe: never panics. Every way CUDA can be missing (no libcuda, cuInit
//! failing, no device, a driver older than the bindings) becomes a reason string.

use moe_core::backend::GpuInfo;

use cudarc::driver::{result, sys};

/// Oldest driver API the bindings need (CUDA 12.0); older drivers lack symbols cudarc loads.
pub const MIN_DRIVER_VERSION: i32 = 12000;

/// The usable GPUs, or why there are none. Safe to call on any machine, any number of times.
pub fn probe_gpus() -> Result<Vec<GpuInfo>, String> {
    match std::panic::catch_unwind(probe_inner) {
        Ok(r) => r,
        Err(_) => Err("the CUDA driver library panicked while being probed (incompatible libcuda?)".into()),
    }
}

fn probe_inner() -> Result<Vec<GpuInfo>, String> {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Err("no NVIDIA driver: libcuda.so was not found on the library path".into());
    }
    let mut version = 0;
    // SAFETY: out-parameter; cuDriverGetVersion needs no cuInit.
    let r = unsafe { sys::cuDriverGetVersion(&mut version) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuDriverGetVersion failed: {r:?}"));
    }
    if version < MIN_DRIVER_VERSION {
        return Err(format!(
            "the NVIDIA driver supports CUDA {}.{}; the cuda backend needs at least CUDA {}.{} (update the driver)",
            version / 1000,
            version % 1000 / 10,
            MIN_DRIVER_VERSION / 1000,
            MIN_DRIVER_VERSION % 1000 / 10
        ));
    }
    result::init().map_err(|e| format!("cuInit failed ({e:?}): no usable NVIDIA GPU or driver"))?;
    let n = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
    if n <= 0 {
        return Err("the NVIDIA driver sees no GPU (check CUDA_VISIBLE_DEVICES)".into());
    }
    let mut gpus = Vec::new();
    for ordinal in 0..n {
        let dev = result::device::get(ordinal).map_err(|e| format!("cuDeviceGet({ordinal}) failed: {e:?}"))?;
        let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown NVIDIA GPU".into());
        use sys::CUdevice_attribute::*;
        // SAFETY: `dev` is a valid device handle from cuDeviceGet.
        let major = unsafe { result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) };
        // SAFETY: as above.
        let minor = unsafe { result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) };
        // SAFETY: as above.
        let mem = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
        let (major, minor) = match (major, minor) {
            (Ok(a), Ok(b)) => (a as u32, b as u32),
            _ => return Err(format!("could not read the compute capability of GPU {ordinal}")),
        };
        gpus.push(GpuInfo {
            ordinal: ordinal as usize,
            name,
            compute_capability: (major, minor),
            memory_bytes: mem as u64,
        });
    }
    Ok(gpus)
}

/// Fills `hw.gpus` / `hw.gpu_unavailable` from [`probe_gpus`]. GPUs count as usable only when
/// NVRTC can be loaded too (the kernels are compiled at run time), so `can_implement` decides
/// from the hardware description alone.
pub fn fill_hardware(hw: &mut moe_core::Hardware) {
    let probed = probe_gpus().and_then(|g| match crate::nvrtc::ensure_nvrtc() {
        Ok(()) => Ok(g),
        Err(e) => {
            let names: Vec<_> = g.iter().map(|g| g.name.clone()).collect();
            Err(format!("found {} but cannot compile kernels: {e}", names.join(", ")))
        }
    });
    match probed {
        Ok(g) => {
            hw.gpus = g;
            hw.gpu_unavailable = None;
        }
        Err(reason) => {
            hw.gpus.clear();
            hw.gpu_unavailable = Some(reason);
        }
    }
}

/// NVRTC's target for a compute capability: the arch-specific `a` variant on Hopper and newer.
pub fn arch_for(cc: (u32, u32)) -> String {
    if cc.0 >= 9 {
        format!("sm_{}{}a", cc.0, cc.1)
    } else {
        format!("sm_{}{}", cc.0, cc.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_explains_absence() {
        match probe_gpus() {
            Ok(g) => assert!(!g.is_empty()),
            Err(reason) => assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_for((9, 0)), "sm_90a");
        assert_eq!(arch_for((8, 0)), "sm_80");
        assert_eq!(arch_for((8, 9)), "sm_89");
    }
}
