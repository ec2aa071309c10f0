//! The NCCL transport: one GPU per rank, ranks as threads of one process
//! ([`NcclTransport::local_group`]) or as processes that met through the TCP rendezvous
//! ([`NcclTransport::from_rendezvous`]). libnccl is loaded at run time; [`probe`] says whether it
//! can be used and never panics.
//!
//! Failure behaviour: communicators are created non-blocking (`ncclConfig_t.blocking = 0`), and
//! every wait (communicator creation, enqueue, stream completion) polls
//! `ncclCommGetAsyncError` and the stream against the transport's timeout. When the timeout
//! passes or NCCL reports an error, the communicator is aborted (`ncclCommAbort`) and the call
//! returns [`MoeError::Comm`]; a rank that died or never arrived therefore ends its peers with an
//! error, never a silent hang.
//!
//! Payloads are host bytes (the [`Transport`] contract), staged through device buffers; the
//! device-resident path used for bandwidth measurements is [`NcclTransport::bench_all_to_all`].

use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result as nres;
use cudarc::nccl::sys as nsys;
use moe_core::comm::rendezvous::{rendezvous, RendezvousConfig};
use moe_core::comm::transport::{f32_from, f32_to_bytes, u64_from, u64_to_bytes, ReduceOp, Transport};
use moe_core::{MoeError, Result};

const NAME: &str = "nccl";
/// `NCCL_CONFIG_UNDEF_INT`: leave the field to NCCL's default.
const UNDEF_INT: i32 = i32::MIN;
/// Size of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// What the NCCL probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclInfo {
    /// `ncclGetVersion`, e.g. 22803 for 2.28.3.
    pub version: i32,
    /// CUDA devices visible.
    pub devices: usize,
}

/// Whether NCCL and a GPU can be used, or why not. Never panics (a missing library or symbol is
/// turned into the error string).
pub fn probe() -> std::result::Result<NcclInfo, String> {
    let r = std::panic::catch_unwind(|| {
        // SAFETY: only tries to dlopen the libraries; no symbol is called.
        let (cuda, nccl) = unsafe { (cudarc::driver::sys::is_culib_present(), nsys::is_culib_present()) };
        if !cuda {
            return Err("libcuda is not loadable (no NVIDIA driver)".to_string());
        }
        if !nccl {
            return Err("libnccl is not loadable: install NCCL, or, where only libnccl.so.2 exists (the pip \
                        wheel nvidia-nccl), link libnccl.so to it in a directory on LD_LIBRARY_PATH"
                .to_string());
        }
        let devices = CudaContext::device_count().map_err(|e| format!("cannot count CUDA devices: {e:?}"))?;
        if devices < 1 {
            return Err("no CUDA device is visible".into());
        }
        let version = nres::get_nccl_version().map_err(|e| format!("ncclGetVersion failed: {:?}", e.0))?;
        if version < 21800 {
            return Err(format!("NCCL {version} is too old; 2.18 or newer is needed (non-blocking communicators)"));
        }
        Ok(NcclInfo { version, devices: devices as usize })
    });
    match r {
        Ok(x) => x,
        Err(_) => Err("loading NCCL panicked (library or symbol missing)".into()),
    }
}

/// A fresh NCCL unique id (rank 0 creates it; the others receive it through the rendezvous).
pub fn new_unique_id() -> Result<Vec<u8>> {
    probe().map_err(MoeError::Device)?;
    let id = nres::get_uniqueid().map_err(|e| MoeError::Device(format!("ncclGetUniqueId failed: {:?}", e.0)))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// One rank of an NCCL communicator, bound to one GPU.
#[derive(Debug)]
pub struct NcclTransport {
    comm: nsys::ncclComm_t,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
    aborted: bool,
}

// SAFETY: the communicator handle is only used through `&mut self` (one thread at a time), which
// NCCL allows; the CUDA context is bound to the calling thread before every use.
unsafe impl Send for NcclTransport {}

fn dev_err(what: &str, e: impl std::fmt::Debug) -> MoeError {
    MoeError::Device(format!("{what}: {e:?}"))
}

impl NcclTransport {
    fn err(&self, reason: impl Into<String>) -> MoeError {
        MoeError::Comm { strategy: NAME.into(), rank: self.rank, reason: reason.into() }
    }

    /// Starts (non-blocking) the creation of rank `rank` of `world` on GPU `ordinal`; call
    /// [`Self::wait_ready`] before use.
    fn start(ordinal: usize, rank: usize, world: usize, id: &[u8], timeout: Duration) -> Result<Self> {
        probe().map_err(MoeError::Device)?;
        if id.len() != UNIQUE_ID_BYTES {
            return Err(MoeError::Comm {
                strategy: NAME.into(),
                rank,
                reason: format!("the NCCL unique id has {} bytes, expected {UNIQUE_ID_BYTES}", id.len()),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err(&format!("cannot open GPU {ordinal}"), e))?;
        let stream = ctx.new_stream().map_err(|e| dev_err("cannot create a stream", e))?;
        ctx.bind_to_thread().map_err(|e| dev_err("cannot bind the CUDA context", e))?;
        let mut internal = [0 as std::ffi::c_char; UNIQUE_ID_BYTES];
        for (d, &s) in internal.iter_mut().zip(id) {
            *d = s as std::ffi::c_char;
        }
        let uid = nsys::ncclUniqueId { internal };
        let mut config = nsys::ncclConfig_t {
            size: std::mem::size_of::<nsys::ncclConfig_t>(),
            magic: 0xcafe_beef,
            version: 22800,
            blocking: 0,
            cgaClusterSize: UNDEF_INT,
            minCTAs: UNDEF_INT,
            maxCTAs: UNDEF_INT,
            netName: std::ptr::null(),
            splitShare: UNDEF_INT,
            trafficClass: UNDEF_INT,
            commName: std::ptr::null(),
            collnetEnable: UNDEF_INT,
            CTAPolicy: UNDEF_INT,
            shrinkShare: UNDEF_INT,
            nvlsCTAs: UNDEF_INT,
            nChannelsPerNetPeer: UNDEF_INT,
            nvlinkCentricSched: UNDEF_INT,
        };
        let mut comm: nsys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for the call; the id is 128 bytes as NCCL expects.
        let r = unsafe { nres::comm_init_rank_config(&mut comm, world as i32, uid, rank as i32, &mut config) };
        if let Err(e) = r {
            if !comm.is_null() {
                // SAFETY: a communicator NCCL handed back, aborted once.
                unsafe {
                    let _ = nres::comm_abort(comm);
                }
            }
            return Err(MoeError::Comm {
                strategy: NAME.into(),
                rank,
                reason: format!("ncclCommInitRankConfig failed: {:?}", e.0),
            });
        }
        Ok(NcclTransport { comm, ctx, stream, rank, world, timeout, aborted: false })
    }

    /// Rank `rank` of `world` on GPU `ordinal`, from a unique id every rank shares.
    pub fn new(ordinal: usize, rank: usize, world: usize, id: &[u8], timeout: Duration) -> Result<Self> {
        let mut t = Self::start(ordinal, rank, world, id, timeout)?;
        t.wait_ready("communicator creation (are all ranks started?)")?;
        Ok(t)
    }

    /// One rank per GPU in `ordinals`, all in this process (index = rank). Each transport may then
    /// move to its own thread.
    pub fn local_group(ordinals: &[usize], timeout: Duration) -> Result<Vec<NcclTransport>> {
        let id = new_unique_id()?;
        let world = ordinals.len();
        // Non-blocking creation lets one thread start every rank before waiting on any.
        let mut ts = Vec::with_capacity(world);
        for (rank, &o) in ordinals.iter().enumerate() {
            ts.push(Self::start(o, rank, world, &id, timeout)?);
        }
        for t in ts.iter_mut() {
            t.wait_ready("communicator creation")?;
        }
        Ok(ts)
    }

    /// This process's rank, after meeting the others at the TCP rendezvous (which also checks
    /// `config_hash`). GPU: `LOCAL_RANK` if set, else `rank % device_count`.
    pub fn from_rendezvous(rdv: &RendezvousConfig, config_hash: &[u8; 32], timeout: Duration) -> Result<Self> {
        let info = probe().map_err(MoeError::Device)?;
        let id = rendezvous(rdv, config_hash, new_unique_id)?;
        let ordinal = match std::env::var("LOCAL_RANK").ok().and_then(|s| s.trim().parse::<usize>().ok()) {
            Some(l) => l,
            None => rdv.rank % info.devices,
        };
        Self::new(ordinal, rdv.rank, rdv.world_size, &id, timeout)
    }

    /// The CUDA stream collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn raw_stream(&self) -> nsys::cudaStream_t {
        self.stream.cu_stream() as nsys::cudaStream_t
    }

    fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: our communicator, aborted at most once.
            unsafe {
                let _ = nres::comm_abort(self.comm);
            }
        }
    }

    fn check_alive(&self) -> Result<()> {
        if self.aborted {
            return Err(self.err("the communicator was aborted after an earlier failure; recreate the group"));
        }
        Ok(())
    }

    /// Polls the communicator until its last operation left the in-progress state.
    fn wait_ready(&mut self, what: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut state = nsys::ncclResult_t::ncclSuccess;
            // SAFETY: valid communicator and out-pointer.
            let r = unsafe { nsys::ncclCommGetAsyncError(self.comm, &mut state) };
            if r != nsys::ncclResult_t::ncclSuccess {
                self.abort();
                return Err(self.err(format!("{what}: ncclCommGetAsyncError failed: {r:?}")));
            }
            match state {
                nsys::ncclResult_t::ncclSuccess => return Ok(()),
                nsys::ncclResult_t::ncclInProgress => {}
                other => {
                    self.abort();
                    return Err(self.err(format!("{what}: NCCL reports {other:?} (a peer failed or left)")));
                }
            }
            if Instant::now() >= deadline {
                self.abort();
                return Err(self.err(format!(
                    "{what}: not complete within {:.1} s; communicator aborted (a rank died or never arrived)",
                    self.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits for the stream with the timeout, watching NCCL's asynchronous errors.
    fn wait_stream(&mut self, what: &str) -> Result<()> {
        let event = self.stream.record_event(None).map_err(|e| dev_err("cannot record an event", e))?;
        let start = Instant::now();
        let deadline = start + self.timeout;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.abort();
                    return Err(self.err(format!("{what}: CUDA error {e:?}")));
                }
            }
            let mut state = nsys::ncclResult_t::ncclSuccess;
            // SAFETY: valid communicator and out-pointer.
            unsafe {
                let _ = nsys::ncclCommGetAsyncError(self.comm, &mut state);
            }
            if !matches!(state, nsys::ncclResult_t::ncclSuccess | nsys::ncclResult_t::ncclInProgress) {
                self.abort();
                return Err(self.err(format!("{what}: NCCL reports {state:?} (a peer failed or left)")));
            }
            if Instant::now() >= deadline {
                self.abort();
                return Err(self.err(format!(
                    "{what}: not complete within {:.1} s; communicator aborted (a rank died or stopped calling \
                     collectives)",
                    self.timeout.as_secs_f64()
                )));
            }
            // Spin briefly (small collectives finish in microseconds), then stop burning the core.
            if start.elapsed() < Duration::from_millis(2) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Checks an enqueue result: in-progress is waited for, errors abort.
    fn enqueued(&mut self, what: &str, r: std::result::Result<nres::NcclStatus, nres::NcclError>) -> Result<()> {
        match r {
            Ok(nres::NcclStatus::InProgress) => self.wait_ready(what),
            Ok(_) => Ok(()),
            Err(e) => {
                self.abort();
                Err(self.err(format!("{what}: {:?}", e.0)))
            }
        }
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        if bytes.is_empty() {
            return self.stream.alloc_zeros::<u8>(1).map_err(|e| dev_err("device allocation", e));
        }
        self.stream.clone_htod(bytes).map_err(|e| dev_err("host-to-device copy", e))
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<u8>> {
        self.stream.alloc_zeros::<u8>(n.max(1)).map_err(|e| dev_err("device allocation", e))
    }

    fn download(&self, buf: &CudaSlice<u8>, n: usize) -> Result<Vec<u8>> {
        let mut v = self.stream.clone_dtoh(buf).map_err(|e| dev_err("device-to-host copy", e))?;
        v.truncate(n);
        Ok(v)
    }

    /// Device-resident grouped send/recv: `send[p]` bytes at `src + send_off[p]` to `p`, `recv[p]`
    /// bytes into `dst + recv_off[p]` from `p`.
    fn grouped_send_recv(
        &mut self,
        src: &CudaSlice<u8>,
        send: &[(usize, usize)],
        dst: &mut CudaSlice<u8>,
        recv: &[(usize, usize)],
    ) -> Result<()> {
        let stream = self.stream.clone();
        let raw = self.raw_stream();
        let comm = self.comm;
        let (sp, _g1) = src.device_ptr(&stream);
        let (dp, _g2) = dst.device_ptr_mut(&stream);
        self.enqueued("ncclGroupStart", nres::group_start())?;
        let mut first_err = None;
        for p in 0..self.world {
            let (so, sl) = send[p];
            let (ro, rl) = recv[p];
            // SAFETY: offsets and lengths lie inside the device buffers (checked by the callers'
            // size arithmetic); the buffers outlive the stream wait below.
            unsafe {
                if sl > 0 {
                    if let Err(e) = nres::send(
                        (sp + so as u64) as *const c_void,
                        sl,
                        nsys::ncclDataType_t::ncclUint8,
                        p as i32,
                        comm,
                        raw,
                    ) {
                        first_err.get_or_insert(e);
                    }
                }
                if rl > 0 {
                    if let Err(e) = nres::recv(
                        (dp + ro as u64) as *mut c_void,
                        rl,
                        nsys::ncclDataType_t::ncclUint8,
                        p as i32,
                        comm,
                        raw,
                    ) {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        let end = nres::group_end();
        if let Some(e) = first_err {
            self.abort();
            return Err(self.err(format!("ncclSend/ncclRecv: {:?}", e.0)));
        }
        self.enqueued("ncclGroupEnd", end)?;
        self.wait_stream("all_to_all_v")
    }

    /// Measures a device-resident all-to-all of `bytes_per_peer` bytes to every rank (staging
    /// excluded): returns GB/s of bytes sent per rank (self included), averaged over `iters`.
    pub fn bench_all_to_all(&mut self, bytes_per_peer: usize, iters: usize) -> Result<f64> {
        self.check_alive()?;
        self.ctx.bind_to_thread().map_err(|e| dev_err("bind", e))?;
        let total = bytes_per_peer * self.world;
        let src = self.upload(&vec![0x5a; total])?;
        let mut dst = self.alloc(total)?;
        let lay: Vec<(usize, usize)> = (0..self.world).map(|p| (p * bytes_per_peer, bytes_per_peer)).collect();
        self.grouped_send_recv(&src, &lay, &mut dst, &lay)?; // warm-up
        let start = Instant::now();
        for _ in 0..iters.max(1) {
            self.grouped_send_recv(&src, &lay, &mut dst, &lay)?;
        }
        let secs = start.elapsed().as_secs_f64() / iters.max(1) as f64;
        let back = self.download(&dst, total)?;
        if back.iter().any(|&b| b != 0x5a) {
            return Err(self.err("bench_all_to_all: received bytes differ from the ones sent"));
        }
        Ok(total as f64 / secs / 1e9)
    }

    fn reduce_bytes(&mut self, data: &[u8], count: usize, dt: nsys::ncclDataType_t, op: ReduceOp) -> Result<Vec<u8>> {
        self.check_alive()?;
        self.ctx.bind_to_thread().map_err(|e| dev_err("bind", e))?;
        let src = self.upload(data)?;
        let mut dst = self.alloc(data.len())?;
        let op = match op {
            ReduceOp::Sum => nsys::ncclRedOp_t::ncclSum,
            ReduceOp::Max => nsys::ncclRedOp_t::ncclMax,
        };
        {
            let stream = self.stream.clone();
            let (sp, _g1) = src.device_ptr(&stream);
            let (dp, _g2) = dst.device_ptr_mut(&stream);
            // SAFETY: both buffers hold `count` elements of `dt`.
            let r = unsafe {
                nres::all_reduce(sp as *const c_void, dp as *mut c_void, count, dt, op, self.comm, self.raw_stream())
            };
            self.enqueued("ncclAllReduce", r)?;
        }
        self.wait_stream("all_reduce")?;
        self.download(&dst, data.len())
    }
}

impl Drop for NcclTransport {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        self.abort();
    }
}

impl Transport for NcclTransport {
    fn name(&self) -> &str {
        NAME
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_to_all_v(&mut self, send: &[Vec<u8>], recv_bytes: &[usize]) -> Result<Vec<Vec<u8>>> {
        self.check_alive()?;
        if send.len() != self.world || recv_bytes.len() != self.world {
            return Err(self.err(format!(
                "all_to_all_v: {} send buffers and {} receive sizes for {} ranks",
                send.len(),
                recv_bytes.len(),
                self.world
            )));
        }
        self.ctx.bind_to_thread().map_err(|e| dev_err("bind", e))?;
        let mut flat = Vec::with_capacity(send.iter().map(|s| s.len()).sum());
        let mut s_lay = Vec::with_capacity(self.world);
        for s in send {
            s_lay.push((flat.len(), s.len()));
            flat.extend_from_slice(s);
        }
        let mut r_lay = Vec::with_capacity(self.world);
        let mut total = 0;
        for &r in recv_bytes {
            r_lay.push((total, r));
            total += r;
        }
        let src = self.upload(&flat)?;
        let mut dst = self.alloc(total)?;
        self.grouped_send_recv(&src, &s_lay, &mut dst, &r_lay)?;
        let back = self.download(&dst, total)?;
        Ok(r_lay.iter().map(|&(o, l)| back[o..o + l].to_vec()).collect())
    }

    fn all_gather_v(&mut self, data: &[u8], sizes: &[usize]) -> Result<Vec<Vec<u8>>> {
        self.check_alive()?;
        if sizes.len() != self.world || sizes[self.rank] != data.len() {
            return Err(self.err(format!(
                "all_gather_v: sizes {sizes:?} do not fit {} ranks and this rank's {} bytes",
                self.world,
                data.len()
            )));
        }
        self.ctx.bind_to_thread().map_err(|e| dev_err("bind", e))?;
        // Pad every contribution to the largest, so one ncclAllGather serves uneven sizes.
        let max = sizes.iter().copied().max().unwrap_or(0);
        if max == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        let mut padded = data.to_vec();
        padded.resize(max, 0);
        let src = self.upload(&padded)?;
        let mut dst = self.alloc(max * self.world)?;
        {
            let stream = self.stream.clone();
            let (sp, _g1) = src.device_ptr(&stream);
            let (dp, _g2) = dst.device_ptr_mut(&stream);
            // SAFETY: `src` holds `max` bytes, `dst` holds `max * world`.
            let r = unsafe {
                nres::all_gather(
                    sp as *const c_void,
                    dp as *mut c_void,
                    max,
                    nsys::ncclDataType_t::ncclUint8,
                    self.comm,
                    self.raw_stream(),
                )
            };
            self.enqueued("ncclAllGather", r)?;
        }
        self.wait_stream("all_gather")?;
        let back = self.download(&dst, max * self.world)?;
        Ok(sizes.iter().enumerate().map(|(p, &s)| back[p * max..p * max + s].to_vec()).collect())
    }

    fn all_reduce_f32(&mut self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        let out = self.reduce_bytes(&f32_to_bytes(data), data.len(), nsys::ncclDataType_t::ncclFloat32, op)?;
        for (d, c) in data.iter_mut().zip(out.chunks_exact(4)) {
            *d = f32_from(c);
        }
        Ok(())
    }

    fn all_reduce_u64(&mut self, data: &mut [u64], op: ReduceOp) -> Result<()> {
        let out = self.reduce_bytes(&u64_to_bytes(data), data.len(), nsys::ncclDataType_t::ncclUint64, op)?;
        for (d, c) in data.iter_mut().zip(out.chunks_exact(8)) {
            *d = u64_from(c);
        }
        Ok(())
    }

    fn reduce_scatter_f32(&mut self, data: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        self.check_alive()?;
        if counts.len() != self.world || counts.iter().sum::<usize>() != data.len() {
            return Err(self.err(format!(
                "reduce_scatter_f32: counts {counts:?} do not describe {} values over {} ranks",
                data.len(),
                self.world
            )));
        }
        self.ctx.bind_to_thread().map_err(|e| dev_err("bind", e))?;
        // Pad every segment to the largest, so one ncclReduceScatter serves uneven segments.
        let max = counts.iter().copied().max().unwrap_or(0);
        let mine = counts[self.rank];
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut padded = vec![0.0f32; max * self.world];
        let mut off = 0;
        for (p, &c) in counts.iter().enumerate() {
            padded[p * max..p * max + c].copy_from_slice(&data[off..off + c]);
            off += c;
        }
        let src = self.upload(&f32_to_bytes(&padded))?;
        let mut dst = self.alloc(max * 4)?;
        {
            let stream = self.stream.clone();
            let (sp, _g1) = src.device_ptr(&stream);
            let (dp, _g2) = dst.device_ptr_mut(&stream);
            // SAFETY: `src` holds `max * world` f32, `dst` holds `max`.
            let r = unsafe {
                nres::reduce_scatter(
                    sp as *const c_void,
                    dp as *mut c_void,
                    max,
                    nsys::ncclDataType_t::ncclFloat32,
                    nsys::ncclRedOp_t::ncclSum,
                    self.comm,
                    self.raw_stream(),
                )
            };
            self.enqueued("ncclReduceScatter", r)?;
        }
        self.wait_stream("reduce_scatter")?;
        let back = self.download(&dst, max * 4)?;
        Ok(back[..mine * 4].chunks_exact(4).map(f32_from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics() {
        match probe() {
            Ok(i) => assert!(i.version >= 21800 && i.devices >= 1),
            Err(reason) => assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn bad_unique_id_is_an_error() {
        if probe().is_err() {
            return; // needs a GPU only to get past the probe; the id check itself is host-side
        }
        let e = NcclTransport::new(0, 0, 1, &[0u8; 3], Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("unique id"), "{e}");
    }
}
