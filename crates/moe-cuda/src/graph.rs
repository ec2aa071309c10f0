//! CUDA graphs for decode-sized forwards.
//!
//! A decode forward is a handful of tiny kernels whose launch shapes depend only on the token
//! count, so their cost is launch overhead, not work. `run_moe` (and `finalize` with a shared
//! expert) can therefore run as a graph: while a [`Recording`] is active on this thread,
//! [`crate::device::CudaDevice::launch`] and `memset_ptr_value` append their operation to a list
//! instead of queueing it (everything else - allocations, uploads - still happens at once, so it
//! is stream-ordered before the graph). [`GraphCache::launch`] then looks the list's shape up
//! (kernels, grids, block sizes, memset sizes), builds and instantiates a linear graph on a miss,
//! and on a hit rewrites only the kernel nodes whose parameter bytes changed (the per-call input,
//! routing and output addresses) with `cuGraphExecKernelNodeSetParams` before one `cuGraphLaunch`.
//!
//! The graph runs exactly the kernels, parameters and order of the plain path, so results are
//! bitwise equal (tests check it). Per-call buffers need no copies into static ones: parameter
//! updates cost a few host microseconds each and no device work (docs/perf/cuda.md has the
//! measurement).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use crate::device::{CudaDevice, Dep};
use crate::error::{CudaError, CudaResult};
use crate::kernels::KernelId;

/// One recorded stream operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// A kernel launch with its by-value parameter struct as bytes, and how it depends on the
    /// operation before it.
    Kernel { id: KernelId, grid: (u32, u32, u32), block: u32, smem: u32, dep: Dep, params: Vec<u8> },
    /// A byte memset.
    Memset { ptr: u64, value: u8, bytes: usize },
}

/// The part of an op that fixes the graph's topology; addresses and parameters are updated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Shape {
    Kernel { id: KernelId, grid: (u32, u32, u32), block: u32, smem: u32, dep: Dep, param_len: usize },
    Memset { value: u8, bytes: usize },
}

impl Op {
    fn shape(&self) -> Shape {
        match self {
            Op::Kernel { id, grid, block, smem, dep, params } => {
                Shape::Kernel { id: *id, grid: *grid, block: *block, smem: *smem, dep: *dep, param_len: params.len() }
            }
            Op::Memset { value, bytes, .. } => Shape::Memset { value: *value, bytes: *bytes },
        }
    }
}

thread_local! {
    static RECORDING: RefCell<Option<Vec<Op>>> = const { RefCell::new(None) };
}

/// Appends `op()` to this thread's recording; `false` (and `op` not called) when none is active.
pub(crate) fn try_record(op: impl FnOnce() -> Op) -> bool {
    RECORDING.with(|r| match r.borrow_mut().as_mut() {
        Some(v) => {
            v.push(op());
            true
        }
        None => false,
    })
}

/// Whether this thread is recording.
pub(crate) fn recording() -> bool {
    RECORDING.with(|r| r.borrow().is_some())
}

/// An active recording on this thread; dropping it without [`Recording::finish`] (an early error
/// return) discards the operations.
#[derive(Debug)]
pub(crate) struct Recording(());

impl Recording {
    /// Starts recording on this thread (one at a time).
    pub(crate) fn start() -> CudaResult<Recording> {
        RECORDING.with(|r| {
            let mut r = r.borrow_mut();
            if r.is_some() {
                return Err(CudaError::Kernel("a CUDA graph recording is already active on this thread".into()));
            }
            *r = Some(Vec::new());
            Ok(Recording(()))
        })
    }

    /// Stops recording and returns the operations in order.
    pub(crate) fn finish(self) -> Vec<Op> {
        RECORDING.with(|r| r.borrow_mut().take().unwrap_or_default())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        RECORDING.with(|r| r.borrow_mut().take());
    }
}

/// An instantiated graph and what its nodes were last set to.
struct Entry {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    nodes: Vec<sys::CUgraphNode>,
    ops: Vec<Op>,
}

/// Counters, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs built and instantiated.
    pub built: u64,
    /// Launches of a cached graph.
    pub replays: u64,
    /// Kernel or memset nodes rewritten before a replay.
    pub node_updates: u64,
}

/// Instantiated graphs keyed by the shape of their operation list.
#[derive(Default)]
pub struct GraphCache {
    entries: HashMap<Vec<Shape>, Entry>,
    stats: GraphStats,
    ctx: Option<Arc<CudaContext>>,
}

// SAFETY: the raw graph handles are only used through `&mut self` (one thread at a time), with
// the owning device's context bound first; CUDA graphs may be used from any thread when access
// is serialized.
unsafe impl Send for GraphCache {}

impl std::fmt::Debug for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GraphCache({} graphs, {:?})", self.entries.len(), self.stats)
    }
}

/// Graphs kept per backend before the cache is emptied (one per decode token count and call site).
const MAX_GRAPHS: usize = 128;

fn drv(op: &'static str, r: sys::CUresult) -> CudaResult<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver { op, detail: format!("{r:?}") })
    }
}

fn kernel_params(dev: &CudaDevice, op: &Op, slot: &mut *mut c_void) -> CudaResult<sys::CUDA_KERNEL_NODE_PARAMS> {
    let Op::Kernel { id, grid, block, smem, params, .. } = op else {
        return Err(CudaError::Kernel("internal: kernel node parameters asked for a memset".into()));
    };
    let f = dev.func(*id)?;
    *slot = params.as_ptr() as *mut c_void;
    Ok(sys::CUDA_KERNEL_NODE_PARAMS {
        func: f.cu_function(),
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: *block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: *smem,
        kernelParams: slot as *mut *mut c_void,
        extra: std::ptr::null_mut(),
        kern: std::ptr::null_mut(),
        ctx: std::ptr::null_mut(),
    })
}

fn memset_params(op: &Op) -> sys::CUDA_MEMSET_NODE_PARAMS {
    let (ptr, value, bytes) = match op {
        Op::Memset { ptr, value, bytes } => (*ptr, *value, *bytes),
        Op::Kernel { .. } => (0, 0, 0),
    };
    sys::CUDA_MEMSET_NODE_PARAMS { dst: ptr, pitch: 0, value: value as u32, elementSize: 1, width: bytes, height: 1 }
}

impl GraphCache {
    /// Counters so far.
    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Graphs held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no graph is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every graph (weights or workspace moved, or a test wants a cold cache).
    pub fn clear(&mut self) {
        if let Some(ctx) = &self.ctx {
            let _ = ctx.bind_to_thread();
        }
        for (_, e) in self.entries.drain() {
            destroy(e);
        }
    }

    /// Runs `ops` on `dev`'s stream as one graph launch (building the graph on first use).
    pub(crate) fn launch(&mut self, dev: &CudaDevice, ops: Vec<Op>) -> CudaResult<()> {
        // Zero-sized work is skipped by the plain path too; a graph cannot hold it.
        let ops: Vec<Op> = ops
            .into_iter()
            .filter(|op| match op {
                Op::Kernel { grid, .. } => grid.0 > 0 && grid.1 > 0 && grid.2 > 0,
                Op::Memset { bytes, .. } => *bytes > 0,
            })
            .collect();
        if ops.is_empty() {
            return Ok(());
        }
        if self.ctx.as_ref().is_some_and(|c| c.cu_ctx() != dev.context().cu_ctx()) {
            self.clear();
        }
        self.ctx = Some(dev.context().clone());
        dev.context().bind_to_thread().map_err(|e| CudaError::driver("bind context", e))?;
        let key: Vec<Shape> = ops.iter().map(Op::shape).collect();
        let updated = match self.entries.get_mut(&key) {
            Some(e) => update(dev, e, &ops).map(|n| {
                self.stats.replays += 1;
                self.stats.node_updates += n;
            }),
            None => Err(CudaError::Kernel("no graph yet".into())),
        };
        if updated.is_err() {
            // No graph of this shape yet, or the driver refused an in-place update: build afresh.
            if let Some(old) = self.entries.remove(&key) {
                destroy(old);
            }
            if self.entries.len() >= MAX_GRAPHS {
                self.clear();
            }
            let e = build(dev, &ops)?;
            self.stats.built += 1;
            self.entries.insert(key.clone(), e);
        }
        let e = self.entries.get(&key).ok_or_else(|| CudaError::Kernel("internal: graph vanished".into()))?;
        // SAFETY: a live executable graph of this context, launched on this device's stream.
        drv("cuGraphLaunch", unsafe { sys::cuGraphLaunch(e.exec, dev.stream().cu_stream()) })
    }
}

/// Rewrites the nodes of `e` whose operation changed; returns how many.
fn update(dev: &CudaDevice, e: &mut Entry, ops: &[Op]) -> CudaResult<u64> {
    let mut n = 0;
    for (i, op) in ops.iter().enumerate() {
        if *op == e.ops[i] {
            continue;
        }
        match op {
            Op::Kernel { .. } => {
                let mut slot = std::ptr::null_mut();
                let p = kernel_params(dev, op, &mut slot)?;
                // SAFETY: `exec` and `nodes[i]` belong to this live graph; `p` points at `slot`,
                // which points at the parameter bytes, all alive for the call (the driver copies
                // the parameters).
                drv("update a graph kernel node", unsafe {
                    sys::cuGraphExecKernelNodeSetParams_v2(e.exec, e.nodes[i], &p)
                })?;
            }
            Op::Memset { .. } => {
                let p = memset_params(op);
                // SAFETY: as above; the new address comes from the same context's allocator.
                drv("update a graph memset node", unsafe {
                    sys::cuGraphExecMemsetNodeSetParams(e.exec, e.nodes[i], &p, dev.context().cu_ctx())
                })?;
            }
        }
        e.ops[i] = op.clone();
        n += 1;
    }
    Ok(n)
}

impl Drop for GraphCache {
    fn drop(&mut self) {
        self.clear();
    }
}

fn destroy(e: Entry) {
    // SAFETY: handles created by `build` and destroyed once; an in-flight launch of the exec
    // graph completes before the driver frees it.
    unsafe {
        let _ = sys::cuGraphExecDestroy(e.exec);
        let _ = sys::cuGraphDestroy(e.graph);
    }
}

/// The operation before the `i`-th one.
fn ops_before(ops: &[Op], i: usize) -> Option<&Op> {
    i.checked_sub(1).and_then(|j| ops.get(j))
}

/// Builds the linear graph of `ops` and instantiates it.
fn build(dev: &CudaDevice, ops: &[Op]) -> CudaResult<Entry> {
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    // SAFETY: out-pointer for a new graph.
    drv("cuGraphCreate", unsafe { sys::cuGraphCreate(&mut graph, 0) })?;
    let mut nodes: Vec<sys::CUgraphNode> = Vec::with_capacity(ops.len());
    let mut add = || -> CudaResult<()> {
        for op in ops {
            let mut node: sys::CUgraphNode = std::ptr::null_mut();
            let deps = nodes.last().map_or(std::ptr::null(), |n| n as *const sys::CUgraphNode);
            let ndeps = nodes.len().min(1);
            match op {
                Op::Kernel { dep, .. } => {
                    let mut slot = std::ptr::null_mut();
                    let p = kernel_params(dev, op, &mut slot)?;
                    // A programmatic edge needs a kernel on its other end.
                    let programmatic = *dep == Dep::Programmatic
                        && ndeps == 1
                        && matches!(ops_before(ops, nodes.len()), Some(Op::Kernel { .. }));
                    let (deps, ndeps) = if programmatic { (std::ptr::null(), 0) } else { (deps, ndeps) };
                    // SAFETY: `graph` is live; `deps` points at the previous node (or is null with 0
                    // dependencies); the parameter bytes outlive the call (the driver copies them).
                    drv("add a graph kernel node", unsafe {
                        sys::cuGraphAddKernelNode_v2(&mut node, graph, deps, ndeps, &p)
                    })?;
                    if programmatic {
                        let edge = sys::CUgraphEdgeData {
                            from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
                            to_port: 0,
                            type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
                            reserved: [0; 5],
                        };
                        let from = nodes[nodes.len() - 1];
                        // SAFETY: both nodes belong to `graph`; one edge, read during the call.
                        drv("add a programmatic graph edge", unsafe {
                            sys::cuGraphAddDependencies_v2(graph, &from, &node, &edge, 1)
                        })?;
                    }
                }
                Op::Memset { .. } => {
                    let p = memset_params(op);
                    // SAFETY: as above; the address belongs to this device's context.
                    drv("add a graph memset node", unsafe {
                        sys::cuGraphAddMemsetNode(&mut node, graph, deps, ndeps, &p, dev.context().cu_ctx())
                    })?;
                }
            }
            nodes.push(node);
        }
        Ok(())
    };
    if let Err(e) = add() {
        // SAFETY: the graph created above, destroyed once on this error path.
        unsafe {
            let _ = sys::cuGraphDestroy(graph);
        }
        return Err(e);
    }
    let mut exec: sys::CUgraphExec = std::ptr::null_mut();
    // SAFETY: a complete graph; out-pointer for its executable form.
    if let Err(e) = drv("cuGraphInstantiate", unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }) {
        // SAFETY: as above.
        unsafe {
            let _ = sys::cuGraphDestroy(graph);
        }
        return Err(e);
    }
    Ok(Entry { graph, exec, nodes, ops: ops.to_vec() })
}

/// Default largest forward run as a graph. Both layouts are graph-safe (launch shapes depend only
/// on T); above a few dozen tokens launches are a negligible share of the forward.
pub const DEFAULT_GRAPH_MAX_TOKENS: usize = 32;

/// `MOE_CUDA_GRAPH_MAX_TOKENS` or, unset, the larger of [`DEFAULT_GRAPH_MAX_TOKENS`] and the
/// masked switch point in use.
pub fn graph_max_tokens() -> Option<usize> {
    std::env::var("MOE_CUDA_GRAPH_MAX_TOKENS").ok().and_then(|v| v.parse().ok())
}

/// Whether CUDA graphs are on by default: `MOE_CUDA_GRAPHS=0` turns them off.
pub fn graphs_default() -> bool {
    !matches!(std::env::var("MOE_CUDA_GRAPHS").as_deref(), Ok("0") | Ok("off") | Ok("false"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_collects_and_drop_discards() {
        assert!(!recording());
        assert!(!try_record(|| Op::Memset { ptr: 1, value: 0, bytes: 4 }));
        let r = Recording::start().unwrap();
        assert!(Recording::start().is_err(), "nested recordings are refused");
        assert!(try_record(|| Op::Memset { ptr: 1, value: 0, bytes: 4 }));
        let ops = r.finish();
        assert_eq!(ops.len(), 1);
        assert!(!recording());
        {
            let _r = Recording::start().unwrap();
            assert!(try_record(|| Op::Memset { ptr: 2, value: 0, bytes: 4 }));
        }
        assert!(!recording(), "a dropped recording ends");
    }

    #[test]
    fn shapes_ignore_addresses_and_parameter_values() {
        let op = |grid, dep, params| Op::Kernel { id: KernelId::Count, grid, block: 256, smem: 0, dep, params };
        let a = op((1, 1, 1), Dep::Full, vec![1, 2]);
        assert_eq!(a.shape(), op((1, 1, 1), Dep::Full, vec![3, 4]).shape());
        assert_ne!(a.shape(), op((2, 1, 1), Dep::Full, vec![3, 4]).shape());
        assert_ne!(a.shape(), op((1, 1, 1), Dep::Programmatic, vec![1, 2]).shape(), "the edge type is topology");
        let m1 = Op::Memset { ptr: 1, value: 0xFF, bytes: 8 };
        let m2 = Op::Memset { ptr: 9, value: 0xFF, bytes: 8 };
        assert_eq!(m1.shape(), m2.shape());
    }
}
