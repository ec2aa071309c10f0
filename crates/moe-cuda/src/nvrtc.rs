//! Run-time compilation of the kernel modules with NVRTC, and the on-disk cubin cache.
//!
//! libnvrtc is found by cudarc's loader (soname on the library path). When it is not on the
//! path, [`ensure_nvrtc`] preloads it by absolute path from, in order: `MOE_NVRTC_LIB_DIR`,
//! `$CUDA_PATH/lib64`, `$CUDA_HOME/lib64`, `/usr/local/cuda/lib64`, and the pip wheel
//! `nvidia-cuda-nvrtc` (`<site-packages>/nvidia/cu13/lib`, found through `python3`); once a
//! library with the soname is loaded, cudarc's `dlopen("libnvrtc.so.13")` resolves to it.
//! The kernels include no CUDA headers, so no include path is needed.
//!
//! Cache: `MOE_KERNEL_CACHE` or `~/.cache/moe-runtime/kernels`; one cubin per
//! (source + header text, architecture, options, NVRTC version), keyed by SHA-256, written through
//! a temporary file and an atomic rename so concurrent processes never read a partial file.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::sys as nvsys;
use sha2::{Digest, Sha256};

use crate::error::{CudaError, CudaResult};
use crate::kernels::{KernelId, Module};

const NVRTC_SONAMES: [&str; 2] = ["libnvrtc.so.13", "libnvrtc.so.12"];

/// Makes libnvrtc loadable, or says why not. Never panics; the answer is cached.
pub fn ensure_nvrtc() -> Result<(), String> {
    static STATE: OnceLock<Result<(), String>> = OnceLock::new();
    STATE.get_or_init(find_and_load).clone()
}

fn find_and_load() -> Result<(), String> {
    // SAFETY: only dlopen()s candidate library names, which runs their initializers; libnvrtc's
    // are side-effect free.
    if std::panic::catch_unwind(|| unsafe { nvsys::is_culib_present() }).unwrap_or(false) {
        return Ok(());
    }
    let mut tried = Vec::new();
    for dir in candidate_dirs() {
        for so in NVRTC_SONAMES {
            let path = dir.join(so);
            if !path.exists() {
                continue;
            }
            // libnvrtc dlopen()s its builtins by soname; preload them from the same directory.
            preload_builtins(&dir);
            // SAFETY: loading the NVIDIA runtime compiler by absolute path (see above). The handle is
            // leaked on purpose so the library stays loaded for the process's life.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => {
                    std::mem::forget(lib);
                    // SAFETY: as above.
                    if std::panic::catch_unwind(|| unsafe { nvsys::is_culib_present() }).unwrap_or(false) {
                        return Ok(());
                    }
                }
                Err(e) => tried.push(format!("{}: {e}", path.display())),
            }
        }
        tried.push(format!("{} (no libnvrtc)", dir.display()));
    }
    Err(format!(
        "libnvrtc (CUDA's run-time compiler) not found on the library path nor in {}; install the \
         CUDA toolkit or `pip install nvidia-cuda-nvrtc==13.0.88`, or set MOE_NVRTC_LIB_DIR",
        if tried.is_empty() { "any known location".to_string() } else { tried.join(", ") }
    ))
}

fn preload_builtins(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("libnvrtc-builtins.so.") {
            // SAFETY: NVIDIA's builtins library, loaded by absolute path and kept loaded.
            if let Ok(lib) = unsafe { libloading::Library::new(e.path()) } {
                std::mem::forget(lib);
            }
        }
    }
}

fn candidate_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("MOE_NVRTC_LIB_DIR") {
        v.push(PathBuf::from(d));
    }
    for var in ["CUDA_PATH", "CUDA_HOME", "CUDA_ROOT"] {
        if let Some(d) = std::env::var_os(var) {
            v.push(Path::new(&d).join("lib64"));
            v.push(Path::new(&d).join("lib"));
        }
    }
    v.push(PathBuf::from("/usr/local/cuda/lib64"));
    // The pip wheel: ask python3 where the `nvidia` namespace package lives (cheap, once).
    let py = std::process::Command::new("python3")
        .args(["-c", "import nvidia,sys; sys.stdout.write('\\n'.join(nvidia.__path__))"])
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(out) = py {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            for sub in ["cu13/lib", "cuda_nvrtc/lib", "cu12/lib"] {
                v.push(Path::new(line).join(sub));
            }
        }
    }
    v
}

/// NVRTC's version (major, minor).
pub fn nvrtc_version() -> CudaResult<(i32, i32)> {
    ensure_nvrtc().map_err(CudaError::Unavailable)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    let r = unsafe { nvsys::nvrtcVersion(&mut major, &mut minor) };
    if r != nvsys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Unavailable(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((major, minor))
}

/// The NVRTC options for `arch` (e.g. `sm_90a`).
pub fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "-std=c++17".into(), "--device-as-default-execution-space".into()]
}

/// Kernel cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MOE_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache/moe-runtime/kernels")
}

/// Cache key of a module build.
pub fn cache_key(module: Module, arch: &str, version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(module.source().as_bytes());
    h.update([0]);
    h.update(arch.as_bytes());
    for o in options(arch) {
        h.update([0]);
        h.update(o.as_bytes());
    }
    h.update(format!("\0nvrtc {}.{}", version.0, version.1).as_bytes());
    let d = h.finalize();
    d.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

fn kernels_of(module: Module) -> String {
    KernelId::all().into_iter().filter(|k| k.module() == module).map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

/// Compiles `module` for `arch` to a cubin (no cache).
pub fn compile(module: Module, arch: &str) -> CudaResult<Vec<u8>> {
    ensure_nvrtc().map_err(CudaError::Unavailable)?;
    let src = CString::new(module.source()).map_err(|_| CudaError::Kernel("kernel source holds a NUL byte".into()))?;
    let name = CString::new(format!("{}.cu", module.name())).unwrap_or_default();
    let opts = options(arch);
    let copts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).unwrap_or_default()).collect();
    let ptrs: Vec<*const c_char> = copts.iter().map(|c| c.as_ptr()).collect();
    let fail = |what: &str, r: nvsys::nvrtcResult, log: String| CudaError::Compile {
        module: module.name(),
        kernels: kernels_of(module),
        arch: arch.to_string(),
        options: opts.clone(),
        log: format!("{what}: {r:?}\n{log}"),
    };
    let mut prog: nvsys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: `src` and `name` outlive the call; zero headers are passed.
    let r = unsafe {
        nvsys::nvrtcCreateProgram(&mut prog, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null())
    };
    if r != nvsys::nvrtcResult::NVRTC_SUCCESS {
        return Err(fail("nvrtcCreateProgram", r, String::new()));
    }
    // SAFETY: `prog` is valid until destroyed below; option pointers outlive the call.
    let r = unsafe { nvsys::nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr()) };
    let log = program_log(prog);
    let out = if r != nvsys::nvrtcResult::NVRTC_SUCCESS {
        Err(fail("nvrtcCompileProgram", r, log))
    } else {
        let mut size = 0usize;
        // SAFETY: valid program, out-parameter.
        let r = unsafe { nvsys::nvrtcGetCUBINSize(prog, &mut size) };
        if r != nvsys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            Err(fail("nvrtcGetCUBINSize", r, log))
        } else {
            let mut buf = vec![0u8; size];
            // SAFETY: `buf` holds exactly the size NVRTC reported.
            let r = unsafe { nvsys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) };
            if r != nvsys::nvrtcResult::NVRTC_SUCCESS {
                Err(fail("nvrtcGetCUBIN", r, log))
            } else {
                Ok(buf)
            }
        }
    };
    // SAFETY: destroys the program created above exactly once.
    unsafe { nvsys::nvrtcDestroyProgram(&mut prog) };
    out
}

fn program_log(prog: nvsys::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: valid program, out-parameter.
    if unsafe { nvsys::nvrtcGetProgramLogSize(prog, &mut size) } != nvsys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds the reported size, including the terminating NUL.
    if unsafe { nvsys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) } != nvsys::nvrtcResult::NVRTC_SUCCESS
    {
        return String::new();
    }
    CStr::from_bytes_until_nul(&buf).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The cubin of `module` for `arch`, from the disk cache or freshly compiled (then cached).
/// A cache that cannot be written is not an error: the cubin is still returned.
pub fn cubin(module: Module, arch: &str) -> CudaResult<Vec<u8>> {
    let key = cache_key(module, arch, nvrtc_version()?);
    let dir = cache_dir();
    let path = dir.join(format!("{}-{arch}-{key}.cubin", module.name()));
    if let Ok(bytes) = std::fs::read(&path) {
        if !bytes.is_empty() {
            return Ok(bytes);
        }
    }
    let bytes = compile(module, arch)?;
    if let Err(e) = write_atomic(&dir, &path, &bytes) {
        tracing::warn!("kernel cache not written: {e}");
    }
    Ok(bytes)
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> CudaResult<()> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| CudaError::Cache { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".tmp-{}-{nanos}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_arch_and_version() {
        let a = cache_key(Module::Route, "sm_90a", (13, 0));
        assert_ne!(a, cache_key(Module::Route, "sm_80", (13, 0)));
        assert_ne!(a, cache_key(Module::Route, "sm_90a", (13, 1)));
        assert_ne!(a, cache_key(Module::Permute, "sm_90a", (13, 0)));
        assert_eq!(a, cache_key(Module::Route, "sm_90a", (13, 0)));
    }

    #[test]
    fn atomic_write_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("moe-cuda-cache-test-{}", std::process::id()));
        let path = dir.join("x.cubin");
        write_atomic(&dir, &path, b"abc").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).collect();
        assert_eq!(left.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
