//! One CUDA device: context, stream, lazily compiled and loaded kernel modules, device buffers
//! and a grow-only workspace reused across forwards. Shared per ordinal by every backend instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::error::{CudaError, CudaResult};
use crate::kernels::{KernelId, Module};
use crate::probe::arch_for;

/// How a launch depends on the launch queued just before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dep {
    /// Starts after the previous operation has completed.
    Full,
    /// Programmatic dependent launch: may start once every block of the previous kernel has
    /// started (or signalled); the kernel waits for that kernel's results itself.
    Programmatic,
}

/// Whether programmatic dependent launches are used where a kernel supports them (sm_90+):
/// `MOE_CUDA_PDL=0` turns them off (a measurement switch).
pub fn pdl_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| env_switch("MOE_CUDA_PDL", true))
}

/// A boolean measurement switch from the environment: `0` / `off` / `false` and `1` / `on` /
/// `true`; unset or anything else is `default`.
pub(crate) fn env_switch(var: &str, default: bool) -> bool {
    match std::env::var(var).as_deref() {
        Ok("0") | Ok("off") | Ok("false") => false,
        Ok("1") | Ok("on") | Ok("true") => true,
        _ => default,
    }
}

/// A device with its stream and kernels.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    cc: (u32, u32),
    arch: String,
    sm_count: u32,
    modules: RwLock<HashMap<Module, Arc<CudaModule>>>,
    funcs: RwLock<HashMap<KernelId, CudaFunction>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice(cuda:{}, {})", self.ordinal, self.arch)
    }
}

impl CudaDevice {
    /// The shared device for `ordinal` (created on first use).
    pub fn get(ordinal: usize) -> CudaResult<Arc<CudaDevice>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
        let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = map.lock().map_err(|_| CudaError::Kernel("device table poisoned by a panic".into()))?;
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        crate::probe::probe_gpus().map_err(CudaError::Unavailable)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::driver("create context", e))?;
        let (maj, min) = ctx.compute_capability().map_err(|e| CudaError::driver("compute capability", e))?;
        let cc = (maj as u32, min as u32);
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| CudaError::driver("SM count", e))? as u32;
        let stream = ctx.new_stream().map_err(|e| CudaError::driver("create stream", e))?;
        let dev = Arc::new(CudaDevice {
            ctx,
            stream,
            ordinal,
            cc,
            arch: arch_for(cc),
            sm_count,
            modules: RwLock::new(HashMap::new()),
            funcs: RwLock::new(HashMap::new()),
        });
        map.insert(ordinal, dev.clone());
        Ok(dev)
    }

    /// The stream every kernel of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Compute capability.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }

    /// NVRTC target architecture.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Grid of a persistent kernel over `blocks` work items: one block an SM, never more blocks
    /// than items (the T256 and f8t128 tiles walk the rest through their tile scheduler).
    pub fn persistent_grid(&self, blocks: usize) -> u32 {
        blocks.min(self.sm_count as usize) as u32
    }

    /// [`Self::persistent_grid`] for kernels launched as clusters of `cluster` CTAs that share
    /// each work item: whole clusters, at most one CTA an SM, at least one cluster.
    pub fn persistent_cluster_grid(&self, blocks: usize, cluster: usize) -> u32 {
        let cluster = cluster.max(1);
        (cluster * (blocks / cluster).min(self.sm_count as usize / cluster).max(1)) as u32
    }

    fn module(&self, m: Module) -> CudaResult<Arc<CudaModule>> {
        if let Some(md) = self.modules.read().ok().and_then(|g| g.get(&m).cloned()) {
            return Ok(md);
        }
        let cubin = crate::nvrtc::cubin(m, &self.arch)?;
        let md = self.ctx.load_module(Ptx::from_binary(cubin)).map_err(|e| CudaError::driver("load module", e))?;
        if let Ok(mut g) = self.modules.write() {
            g.insert(m, md.clone());
        }
        Ok(md)
    }

    /// A kernel, compiling and loading its module on first use.
    pub fn func(&self, id: KernelId) -> CudaResult<CudaFunction> {
        if let Some(f) = self.funcs.read().ok().and_then(|g| g.get(&id).cloned()) {
            return Ok(f);
        }
        let md = self.module(id.module())?;
        let f = md.load_function(&id.name()).map_err(|e| CudaError::Driver {
            op: "load kernel",
            detail: format!("{} from module {}: {e:?}", id.name(), id.module().name()),
        })?;
        if let KernelId::GemmGateUp(_, t) | KernelId::GemmDown(_, t) = id {
            if t.smem_bytes() > 48 * 1024 {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    t.smem_bytes() as i32,
                )
                .map_err(|e| CudaError::driver("raise the dynamic shared-memory limit", e))?;
            }
        }
        if let Some(bytes) = id.quant_smem() {
            if bytes > 48 * 1024 {
                f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
                    .map_err(|e| CudaError::driver("raise the dynamic shared-memory limit", e))?;
            }
        }
        if let Ok(mut g) = self.funcs.write() {
            g.insert(id, f.clone());
        }
        Ok(f)
    }

    /// Queues kernel `id` on the device's stream after everything queued before it.
    pub fn launch<P: DeviceRepr>(
        &self,
        id: KernelId,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        p: &P,
    ) -> CudaResult<()> {
        self.launch_dep(id, grid, block, smem, p, Dep::Full)
    }

    /// [`Self::launch`] with the dependency on the previous launch spelled out: with
    /// [`Dep::Programmatic`] (sm_90+, and [`pdl_enabled`]) the kernel may start before its
    /// predecessor ends; it must `pdl_wait()` (kernels/common.cuh) before reading that kernel's
    /// outputs. Elsewhere it is an ordinary launch.
    pub fn launch_dep<P: DeviceRepr>(
        &self,
        id: KernelId,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        p: &P,
        dep: Dep,
    ) -> CudaResult<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let dep = if dep == Dep::Programmatic && self.cc.0 >= 9 && pdl_enabled() { dep } else { Dep::Full };
        // Inside a CUDA-graph recording (crate::graph) the launch becomes a graph node instead.
        // Any other stream operation added to the forward path must do the same.
        let f = self.func(id)?;
        // SAFETY: `P` is a `#[repr(C)]` plain-data parameter struct (DeviceRepr); its bytes are
        // exactly what the kernel receives by value.
        let bytes = || unsafe { std::slice::from_raw_parts(p as *const P as *const u8, std::mem::size_of::<P>()) };
        if crate::graph::try_record(|| crate::graph::Op::Kernel {
            id,
            grid,
            block,
            smem,
            dep,
            params: bytes().to_vec(),
        }) {
            return Ok(());
        }
        if dep == Dep::Programmatic {
            return self.launch_programmatic(&f, id, grid, block, smem, p);
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem };
        // SAFETY: the parameter struct mirrors the kernel's signature (checked by unit tests);
        // every pointer inside was taken from a live allocation sized by the caller for this
        // launch; the launch is ordered on this device's single stream.
        unsafe { self.stream.launch_builder(&f).arg(p).launch(cfg) }
            .map(|_| ())
            .map_err(|e| CudaError::Driver { op: "kernel launch", detail: format!("{}: {e:?}", id.name()) })
    }

    fn launch_programmatic<P: DeviceRepr>(
        &self,
        f: &CudaFunction,
        id: KernelId,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        p: &P,
    ) -> CudaResult<()> {
        use cudarc::driver::sys;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue { programmaticStreamSerializationAllowed: 1 },
        };
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        self.ctx.bind_to_thread().map_err(|e| CudaError::driver("bind context", e))?;
        let mut arg = p as *const P as *mut std::ffi::c_void;
        // SAFETY: as in `launch_dep`: `arg` points at the by-value parameter struct, which
        // mirrors the kernel's single parameter and outlives the call (the driver copies it);
        // `attr` and `cfg` live across the call; the context, which owns the stream, is current
        // on this thread.
        let r = unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), &mut arg, std::ptr::null_mut()) };
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(CudaError::Driver { op: "kernel launch", detail: format!("{} (programmatic): {r:?}", id.name()) })
        }
    }

    /// Uploads a host slice.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> CudaResult<CudaSlice<T>> {
        if data.is_empty() {
            return self.alloc::<T>(1);
        }
        self.stream.clone_htod(data).map_err(|e| CudaError::driver("host-to-device copy", e))
    }

    /// Uninitialized device memory for `len` elements (at least one, so pointers are valid).
    pub fn alloc<T: DeviceRepr>(&self, len: usize) -> CudaResult<CudaSlice<T>> {
        // SAFETY: the memory is uninitialized; every user writes before reading (poisoned-output
        // tests check this) or zeroes it explicitly.
        unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(|e| CudaError::driver("device allocation", e))
    }

    /// Zero-filled device memory.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, len: usize) -> CudaResult<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len.max(1)).map_err(|e| CudaError::driver("device allocation", e))
    }

    /// Zeroes a buffer (stream-ordered).
    pub fn memset_zero<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, s: &mut CudaSlice<T>) -> CudaResult<()> {
        self.stream.memset_zeros(s).map_err(|e| CudaError::driver("memset", e))
    }

    /// Copies a device buffer to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>, len: usize) -> CudaResult<Vec<T>> {
        let mut v = self.stream.clone_dtoh(s).map_err(|e| CudaError::driver("device-to-host copy", e))?;
        v.truncate(len);
        Ok(v)
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> CudaResult<()> {
        self.stream.synchronize().map_err(|e| CudaError::driver("stream synchronize", e))
    }

    /// The device address of a buffer, for parameter structs.
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    /// The device address of an optional buffer (0 when absent).
    pub fn ptr_opt<T>(&self, s: Option<&CudaSlice<T>>) -> u64 {
        s.map_or(0, |s| self.ptr(s))
    }
}

impl CudaDevice {
    /// A TMA map of a row-major 16-bit matrix `[rows, cols]` at `ptr`, loaded in boxes of
    /// `box_rows x box_cols` with the 128-byte swizzle the wgmma operand descriptors expect.
    /// Out-of-range rows and columns read as zero.
    pub fn tensor_map_16(
        &self,
        ptr: u64,
        rows: usize,
        cols: usize,
        box_rows: u32,
        box_cols: u32,
    ) -> CudaResult<crate::kernels::TmaDesc> {
        self.tensor_map_2d(ptr, rows, cols, 2, box_rows, box_cols)
    }

    /// [`Self::tensor_map_16`] for elements of `elem_bytes` (1: e4m3, 2: bf16/f16); a box row
    /// must be 128 bytes.
    pub fn tensor_map_2d(
        &self,
        ptr: u64,
        rows: usize,
        cols: usize,
        elem_bytes: usize,
        box_rows: u32,
        box_cols: u32,
    ) -> CudaResult<crate::kernels::TmaDesc> {
        use cudarc::driver::sys::{
            CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
            CUtensorMapSwizzle,
        };
        let row_bytes = cols * elem_bytes;
        if !ptr.is_multiple_of(16)
            || !row_bytes.is_multiple_of(16)
            || box_cols as usize * elem_bytes != 128
            || rows == 0
            || !(1..=2).contains(&elem_bytes)
        {
            return Err(CudaError::Kernel(format!(
                "TMA map needs a 16-byte aligned base, a row stride multiple of 16 bytes and 128-byte box rows \
                 (ptr {ptr:#x}, [{rows}, {cols}] x {elem_bytes} B, box {box_rows} x {box_cols})"
            )));
        }
        let dims = [cols as u64, rows as u64];
        let strides = [row_bytes as u64];
        let boxes = [box_cols, box_rows];
        let elem_strides = [1u32, 1];
        let dtype = if elem_bytes == 1 {
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8
        } else {
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16
        };
        let mut map = CUtensorMap { opaque: [0; 16] };
        // SAFETY: `map` is a valid out-pointer; the dims/strides/box arrays have rank (2) and
        // rank - 1 entries as the driver requires; `ptr` is a live device allocation of at least
        // rows x cols elements (the caller's buffer) and is only read by later launches.
        let res = unsafe {
            cudarc::driver::sys::cuTensorMapEncodeTiled(
                &mut map,
                dtype,
                2,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem_strides.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        res.result().map_err(|e| CudaError::driver("cuTensorMapEncodeTiled", e))?;
        Ok(crate::kernels::TmaDesc { opaque: map.opaque })
    }
}

/// Grow-only named scratch buffers, reused across forwards (stream-ordered, so a buffer can be
/// rewritten by the next forward as soon as the previous one's kernels were queued).
#[derive(Default)]
pub struct Workspace {
    // The address is kept beside the buffer: taking it from the slice records events on every
    // forward (cudarc's multi-stream tracking), which decode-sized forwards cannot afford.
    bufs: HashMap<&'static str, (CudaSlice<u8>, u64)>,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: usize = self.bufs.values().map(|b| b.0.len()).sum();
        write!(f, "Workspace({} buffers, {total} bytes)", self.bufs.len())
    }
}

impl Workspace {
    /// The device address of scratch buffer `name` holding at least `bytes`.
    pub fn get(&mut self, dev: &CudaDevice, name: &'static str, bytes: usize) -> CudaResult<u64> {
        let need = bytes.max(16);
        let grow = self.bufs.get(name).is_none_or(|b| b.0.len() < need);
        if grow {
            // Round up so slowly growing token counts do not reallocate every forward.
            let cap = need.next_power_of_two();
            let b = dev.alloc::<u8>(cap)?;
            let p = dev.ptr(&b);
            self.bufs.insert(name, (b, p));
        }
        Ok(self.bufs.get(name).map_or(0, |b| b.1))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bufs.values().map(|b| b.0.len()).sum()
    }
}

impl CudaDevice {
    /// Zeroes `bytes` at device address `ptr` (stream-ordered).
    pub fn memset_ptr(&self, ptr: u64, bytes: usize) -> CudaResult<()> {
        self.memset_ptr_value(ptr, 0, bytes)
    }

    /// Fills `bytes` at `ptr` with the byte `value` (stream-ordered).
    pub fn memset_ptr_value(&self, ptr: u64, value: u8, bytes: usize) -> CudaResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        if crate::graph::try_record(|| crate::graph::Op::Memset { ptr, value, bytes }) {
            return Ok(());
        }
        // SAFETY: `ptr` comes from a live allocation of at least `bytes` (workspace or buffer);
        // the memset is queued on this device's stream like every kernel that uses it.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, value, bytes, self.stream.cu_stream()) }
            .map_err(|e| CudaError::driver("memset", e))
    }
}
