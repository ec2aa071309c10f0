//! The expert engine: `y[rows] = down(act(gate_up(a[rows])))` for groups of rows that share an
//! expert, on the backend's threads ([`crate::pool`]).
//!
//! Two schedules, chosen by the amount of work:
//! - **fused** (enough (expert, row-tile) tasks to keep every thread busy): one task runs gate_up
//!   plus activation for up to 64 rows into a per-thread buffer that stays in L2, then the down
//!   projection from it. No barrier, and the intermediate never reaches memory.
//! - **split** (few active experts, e.g. one token): the weight blocks of each expert are split
//!   across tasks; gate_up+activation for all rows, a barrier, then down. Every thread streams a
//!   share of the weights, which is what a memory-bound GEMV needs.
//!
//! Inside a task, weight blocks are the outer loop and row tiles the inner one, so one block
//! (k x 32 weights) is read from memory once and reused from cache by every row tile.

use std::ops::Range;
use std::sync::Mutex;

use moe_core::Activation;

use crate::act::apply16;
use crate::kernels::{AElem, Family, Tile, MR_MAX};
use crate::pack::{PackedMats, NB};
use crate::pool::{self, Out};

/// The rows of one expert in the permuted buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// Index of the expert in the packed stacks.
    pub expert: usize,
    /// First row.
    pub row0: usize,
    /// Rows.
    pub rows: usize,
}

/// A set of experts in the kernels' layout.
#[derive(Debug, Clone, Copy)]
pub struct ExpertSet<'a, W> {
    /// `[2I, H]` per expert, gate/up interleaved by block.
    pub w13: &'a PackedMats<W>,
    /// `[H, I]` per expert.
    pub w2: &'a PackedMats<W>,
    /// `[E, 2I]` (gate then up).
    pub b13: Option<&'a [f32]>,
    /// `[E, H]`.
    pub b2: Option<&'a [f32]>,
    /// Intermediate size.
    pub inter: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Gated activation.
    pub act: Activation,
}

#[derive(Debug, Clone, Copy)]
struct Task {
    group: usize,
    r0: usize,
    m: usize,
    blocks: (usize, usize),
}

/// Buffers reused across forwards (grown, never shrunk).
#[derive(Debug, Default)]
pub struct Workspace<A> {
    inter: Vec<A>,
    scratch: Vec<Mutex<Vec<A>>>,
    tasks: Vec<Task>,
}

impl<A: Copy> Workspace<A> {
    /// Overwrites every buffer with `v` (tests poison them to prove each read was written).
    pub fn poison(&mut self, v: A) {
        self.inter.iter_mut().for_each(|x| *x = v);
        for s in self.scratch.iter_mut() {
            s.get_mut().unwrap_or_else(|p| p.into_inner()).iter_mut().for_each(|x| *x = v);
        }
    }
}

/// The row stride, in elements of `T`, of activation buffers whose rows hold `kp` inputs: whole
/// cache lines, an odd number of them. Tiles load up to 32 rows at this stride, and at a multiple
/// of 4 KiB (hidden 2048 in bf16) every row would map to the same L1 set: 16-row AMX loads then
/// evicted each other on every k step.
pub fn row_stride<T>(kp: usize) -> usize {
    let per_line = (64 / std::mem::size_of::<T>()).max(1);
    let lines = kp.div_ceil(per_line);
    (lines | 1) * per_line
}

/// Runs `groups` of rows: `a` is `[rows, row_stride(w13.kp)]` (padding columns zero), `y` is
/// `[rows, hidden]`.
///
/// # Panics
/// If a buffer is shorter than the groups say (an internal bug; the backend sizes them).
pub fn run<F: Family>(
    fam: &F,
    set: &ExpertSet<'_, F::W>,
    groups: &[Group],
    a: &[F::A],
    y: &mut [f32],
    ws: &mut Workspace<F::A>,
) {
    let (h, kph) = (set.hidden, set.w13.kp);
    let (lda, ldi) = (row_stride::<F::A>(kph), row_stride::<F::A>(set.w2.kp));
    let rows_total = groups.iter().map(|g| g.row0 + g.rows).max().unwrap_or(0);
    assert!(a.len() >= rows_total * lda && y.len() >= rows_total * h, "engine buffers too short");
    if rows_total == 0 {
        return;
    }
    let threads = pool::threads();
    let mr = fam.mr();
    // Row tile: a k-chunk of its activations (about 256 KiB) shares L2 with a chunk of one block;
    // an expert's rows are split into equal tiles, so no tile re-reads the weights for a few rows.
    let mtile = ((256usize << 10) / (kph.min(TILE_KC) * std::mem::size_of::<F::A>()).max(1)).clamp(mr, MT) / mr * mr;
    let fused_tasks: usize = groups.iter().map(|g| g.rows.div_ceil(mtile)).sum();
    let yo = Out::new(y);
    ws.tasks.clear();
    if threads == 1 || fused_tasks >= 3 * threads {
        for (gi, g) in groups.iter().enumerate() {
            let step = g.rows.div_ceil(g.rows.div_ceil(mtile)).div_ceil(mr) * mr;
            for r0 in (0..g.rows).step_by(step) {
                ws.tasks.push(Task { group: gi, r0, m: step.min(g.rows - r0), blocks: (0, set.w13.blocks) });
            }
        }
        while ws.scratch.len() < threads {
            ws.scratch.push(Mutex::new(Vec::new()));
        }
        for s in ws.scratch.iter_mut() {
            let s = s.get_mut().unwrap_or_else(|p| p.into_inner());
            if s.len() < mtile * ldi {
                s.resize(mtile * ldi, F::A::default());
            }
        }
        let scratch = &ws.scratch;
        let tasks = &ws.tasks;
        pool::for_each(tasks.len(), |i, slot| {
            let t = &tasks[i];
            let mut buf = scratch[slot].lock().unwrap_or_else(|p| p.into_inner());
            let g = groups[t.group];
            let row = g.row0 + t.r0;
            let a_t = &a[row * lda..(row + t.m) * lda];
            let inter = &mut buf[..t.m * ldi];
            let io = Out::new(inter);
            gate_up(fam, set, g.expert, a_t, t.m, 0..set.w13.blocks, io, 0);
            down(fam, set, g.expert, &buf[..t.m * ldi], t.m, 0..set.w2.blocks, yo, row);
        });
        return;
    }
    // Split schedule: enough block chunks per expert to give every thread a few tasks.
    let chunks = (crate::tuning::split_tasks_per_thread() * threads).div_ceil(groups.len().max(1));
    if ws.inter.len() < rows_total * ldi {
        ws.inter.resize(rows_total * ldi, F::A::default());
    }
    let io = Out::new(&mut ws.inter);
    push_split_tasks(&mut ws.tasks, groups, mtile, set.w13.blocks, chunks);
    let tasks = &ws.tasks;
    pool::for_each(tasks.len(), |i, _| {
        let t = &tasks[i];
        let g = groups[t.group];
        let row = g.row0 + t.r0;
        gate_up(fam, set, g.expert, &a[row * lda..(row + t.m) * lda], t.m, t.blocks.0..t.blocks.1, io, row);
    });
    push_split_tasks(&mut ws.tasks, groups, mtile, set.w2.blocks, chunks);
    let (inter, tasks) = (&ws.inter, &ws.tasks);
    pool::for_each(tasks.len(), |i, _| {
        let t = &tasks[i];
        let g = groups[t.group];
        let row = g.row0 + t.r0;
        down(fam, set, g.expert, &inter[row * ldi..(row + t.m) * ldi], t.m, t.blocks.0..t.blocks.1, yo, row);
    });
}

fn push_split_tasks(tasks: &mut Vec<Task>, groups: &[Group], mtile: usize, blocks: usize, chunks: usize) {
    tasks.clear();
    let per = blocks.div_ceil(chunks.clamp(1, blocks.max(1)));
    for (gi, g) in groups.iter().enumerate() {
        for r0 in (0..g.rows).step_by(mtile) {
            for b0 in (0..blocks).step_by(per.max(1)) {
                tasks.push(Task { group: gi, r0, m: mtile.min(g.rows - r0), blocks: (b0, (b0 + per).min(blocks)) });
            }
        }
    }
}

/// Inputs per k-chunk the row-tile size is planned for (about 256 KiB of activations per chunk).
/// The chunk the block products take is [`crate::tuning::k_chunk`] (the same by default).
const TILE_KC: usize = 1024;

/// Rows per task at most (the per-task accumulator lives on the stack).
const MT: usize = 128;

/// `acc[r] = a[r] . blk` for `r < m`, k-chunked. The same chunk of `next` is prefetched meanwhile:
/// by the first row tile, or, for families that [`Family::spreads_prefetch`], a share by each.
#[allow(clippy::too_many_arguments)]
fn block_product<F: Family>(
    fam: &F,
    a: &[F::A],
    lda: usize,
    m: usize,
    blk: &[F::W],
    kp: usize,
    next: Option<&[F::W]>,
    acc: &mut [[f32; NB]; MT],
) {
    let mr = fam.mr();
    let mut c: Tile = [[0.0; NB]; MR_MAX];
    let tiles = m.div_ceil(mr);
    let kc = crate::tuning::k_chunk();
    for k0 in (0..kp).step_by(kc) {
        let kl = kc.min(kp - k0);
        for rb in (0..m).step_by(mr) {
            let mm = mr.min(m - rb);
            let pf = match next {
                Some(n) if fam.spreads_prefetch() => {
                    let (chunk, i) = (&n[k0 * NB..(k0 + kl) * NB], rb / mr);
                    Some(&chunk[i * chunk.len() / tiles..(i + 1) * chunk.len() / tiles])
                }
                Some(n) if rb == 0 => Some(&n[k0 * NB..]),
                _ => None,
            };
            fam.tile(&a[rb * lda + k0..], lda, mm, &blk[k0 * NB..], kl, &mut c, pf);
            for (acc, c) in acc[rb..rb + mm].iter_mut().zip(&c) {
                if k0 == 0 {
                    *acc = *c;
                } else {
                    acc.iter_mut().zip(c).for_each(|(a, c)| *a += c);
                }
            }
        }
    }
}

/// gate_up + bias + activation for `m` rows of `a` (stride [`row_stride`] of `w13.kp`) over
/// `blocks`, into rows `row0..` of `out` (stride [`row_stride`] of `w2.kp`; columns past `inter`
/// in the written blocks are set to zero).
#[allow(clippy::too_many_arguments)]
fn gate_up<F: Family>(
    fam: &F,
    set: &ExpertSet<'_, F::W>,
    e: usize,
    a: &[F::A],
    m: usize,
    blocks: Range<usize>,
    out: Out<F::A>,
    row0: usize,
) {
    let (kph, kpi, inter) = (set.w13.kp, set.w2.kp, set.inter);
    let (lda, ldo) = (row_stride::<F::A>(kph), row_stride::<F::A>(kpi));
    let mut acc = [[0.0f32; NB]; MT];
    let (mut g, mut u, mut v) = ([0.0f32; 16], [0.0f32; 16], [0.0f32; 16]);
    let bias = set.b13.map(|b| &b[e * 2 * inter..(e + 1) * 2 * inter]);
    let end = blocks.end;
    for b in blocks {
        let next = (b + 1 < end).then(|| set.w13.block(e, b + 1));
        block_product(fam, a, lda, m, set.w13.block(e, b), kph, next, &mut acc);
        let j0 = 16 * b;
        let width = kpi.min(j0 + 16) - j0;
        for (r, c) in acc.iter().enumerate().take(m) {
            g.copy_from_slice(&c[..16]);
            u.copy_from_slice(&c[16..]);
            if let Some(bias) = bias {
                for l in 0..16.min(inter.saturating_sub(j0)) {
                    g[l] += bias[j0 + l];
                    u[l] += bias[inter + j0 + l];
                }
            }
            apply16(set.act, &g, &u, &mut v);
            // SAFETY: this task alone writes columns [j0, j0 + width) of row row0 + r.
            let dst = unsafe { out.slice((row0 + r) * ldo + j0, width) };
            for (l, d) in dst.iter_mut().enumerate() {
                *d = if j0 + l < inter { F::A::from_f32(v[l]) } else { F::A::default() };
            }
        }
    }
}

/// down + bias for `m` rows of the intermediate `a` (stride [`row_stride`] of `w2.kp`) over
/// `blocks`, into rows `row0..` of `y` (stride `hidden`).
#[allow(clippy::too_many_arguments)]
fn down<F: Family>(
    fam: &F,
    set: &ExpertSet<'_, F::W>,
    e: usize,
    a: &[F::A],
    m: usize,
    blocks: Range<usize>,
    y: Out<f32>,
    row0: usize,
) {
    let (kpi, h) = (set.w2.kp, set.hidden);
    let lda = row_stride::<F::A>(kpi);
    let mut acc = [[0.0f32; NB]; MT];
    let bias = set.b2.map(|b| &b[e * h..(e + 1) * h]);
    let end = blocks.end;
    for b in blocks {
        let next = (b + 1 < end).then(|| set.w2.block(e, b + 1));
        block_product(fam, a, lda, m, set.w2.block(e, b), kpi, next, &mut acc);
        let j0 = NB * b;
        let width = NB.min(h - j0);
        for (r, c) in acc.iter().enumerate().take(m) {
            // SAFETY: this task alone writes columns [j0, j0 + width) of row row0 + r.
            let dst = unsafe { y.slice((row0 + r) * h + j0, width) };
            match bias {
                Some(bias) => {
                    for (l, d) in dst.iter_mut().enumerate() {
                        *d = c[l] + bias[j0 + l];
                    }
                }
                None => dst.copy_from_slice(&c[..width]),
            }
        }
    }
}
