//! Quantized routed experts on the CPU: every format of `moe_core::quant` dequantized on the fly,
//! one weight row at a time, inside the tasks that use it ([`mats`]). The packed codes and scales
//! are all that is kept in memory.
//!
//! Schedule: gate_up over (expert, block of output rows) tasks on the backend's threads
//! ([`crate::pool`]), the activation,
//! then down the same way. A task decodes each of its rows into an L1-resident f32 buffer and
//! takes that row's dot product with every token of the expert, so a row is read from memory
//! once per forward. At one token the work is a GEMV and the tasks split each expert's rows
//! across all threads, which is what a memory-bound decode needs.
//!
//! From [`QMat::tile_rows`] rows an expert (AVX-512 BF16, bf16 activations), a
//! task instead dequantizes 32-row x 128..256-input panels into the dense kernels' pair-packed
//! bf16 layout in a reused per-thread buffer and runs the dense `vdpbf16ps` tile on them
//! ([`tiles`]): one decode serves every token of the expert. int4, int8, MXFP4 and NVFP4 stacks
//! on AVX-512 VNNI instead quantize the activations to int8 groups and run integer tiles on
//! panels of code bytes (`itiles`), where the CPU's bf16 tiles would not run on AMX.
//!
//! The shared expert is not quantized: it runs on the dense kernels ([`crate::experts`]).

#[cfg(target_arch = "x86_64")]
mod decode;
#[cfg(target_arch = "x86_64")]
mod itiles;
pub mod mats;
mod simd;
mod tiles;

use half::{bf16, f16};
use moe_core::quant::codec::E4M3_LUT;
use moe_core::quant::ExpertTensor;
use moe_core::tensor::{HostData, Tensor};
use moe_core::weights::{copy_bias_row, ExpertWeights, SharedWeights};
use moe_core::{Activation, DType, MoeError, QuantFormat, Result};

use crate::experts::Experts;
use crate::isa::Isa;
use crate::kernels::Widen;
use crate::layout::{gather_rows, RowLayout};
use crate::pool::{self, each_row, Out};
use mats::{dot, QMat};
use scratch::Scratch;
use tracing::debug_span as span;

/// The dense shared expert, in its weight dtype.
#[derive(Debug)]
enum Shared {
    F32(Experts<Widen<f32>>),
    Bf16(Experts<Widen<bf16>>),
    F16(Experts<Widen<f16>>),
}

/// Quantized routed experts plus the dense shared expert, with reusable buffers.
#[derive(Debug)]
pub struct QuantExperts {
    isa: Isa,
    /// bf16 activations on AVX-512 BF16: int4 rows use `vdpbf16ps` (activations rounded to
    /// bf16, as the dense bf16 kernels do).
    bf16_dot: bool,
    /// AVX-512 VNNI beside `bf16_dot`: int4 rows at decode sizes may take int8 activations
    /// (`vpdpbusd`; [`crate::tuning::int4_act`]).
    vnni: bool,
    format: QuantFormat,
    hidden: usize,
    inter: usize,
    act: Activation,
    w13: QMat,
    w2: QMat,
    b13: Option<Vec<f32>>,
    b2: Option<Vec<f32>>,
    shared: Option<Shared>,
    /// Gathered activations `[rows, H]`, then in each expert's input order.
    a: Vec<f32>,
    ao: Vec<f32>,
    /// gate_up outputs, per group transposed `[2I][rows of the group]`.
    gu: Vec<f32>,
    /// Activated intermediate `[rows, I]` in w2's input order.
    mid: Vec<f32>,
    /// bf16 activations of the projection being run, in packed-position order (tile path).
    xb: Vec<u16>,
    /// int8 activation groups of the projection being run (integer tile path).
    #[cfg(target_arch = "x86_64")]
    xi: itiles::IntBufs,
    /// down outputs, per group transposed `[H][rows]`, then `[rows, H]`.
    yt: Vec<f32>,
    y: Vec<f32>,
    /// The forward's experts (spans of rows) and the span of every row.
    spans: Vec<Span>,
    of_row: Vec<Span>,
    #[cfg(target_arch = "x86_64")]
    decode: decode::DecodeBufs,
}

/// An empty routed stack, so the dense [`Experts`] can hold only the shared expert.
fn no_routed(dtype: DType, hidden: usize, si: usize) -> Result<ExpertWeights> {
    let t = |rows: usize, cols: usize| -> Result<ExpertTensor> {
        Ok(ExpertTensor {
            format: QuantFormat::None,
            experts: 0,
            rows,
            cols,
            parts: [("weight".to_string(), Tensor::zeros(vec![0, rows, cols], dtype))].into_iter().collect(),
        })
    };
    Ok(ExpertWeights { w13: t(2 * si, hidden)?, w2: t(hidden, si)?, b13: None, b2: None })
}

fn f32_vec(t: &Option<Tensor>) -> Result<Option<Vec<f32>>> {
    t.as_ref().map(|t| t.to_f32_vec()).transpose()
}

impl QuantExperts {
    /// Packs quantized routed experts `w` and the dense shared expert (weights in `dtype`;
    /// `act_dtype` is the block's activation dtype).
    pub fn pack(
        isa: Isa,
        act: Activation,
        hidden: usize,
        inter: usize,
        (dtype, act_dtype): (DType, DType),
        w: &ExpertWeights,
        shared: Option<(&SharedWeights, usize)>,
    ) -> Result<Self> {
        // Like the dense kernels, never use an instruction set this CPU lacks.
        let isa = if isa.available() { isa } else { Isa::Portable };
        let w13 = QMat::from_tensor(&w.w13)?;
        let w2 = QMat::from_tensor(&w.w2)?;
        if (w13.n, w13.k, w2.n, w2.k) != (2 * inter, hidden, hidden, inter) {
            return Err(MoeError::shape(
                "cpu.quant.pack",
                format!("w13 [{}, {hidden}], w2 [{hidden}, {inter}]", 2 * inter),
                format!("w13 [{}, {}], w2 [{}, {}]", w13.n, w13.k, w2.n, w2.k),
            ));
        }
        let shared = match shared {
            None => None,
            Some((s, si)) => {
                let dense = no_routed(dtype, hidden, si)?;
                let sh = Some((s, si));
                Some(match dtype {
                    DType::F32 => Shared::F32(Experts::pack(Widen::new(isa), act, hidden, si, &dense, sh)?),
                    DType::BF16 => Shared::Bf16(Experts::pack(Widen::new(isa), act, hidden, si, &dense, sh)?),
                    DType::F16 => Shared::F16(Experts::pack(Widen::new(isa), act, hidden, si, &dense, sh)?),
                    other => return Err(MoeError::config("weight_dtype", format!("{other} is not a float dtype"))),
                })
            }
        };
        Ok(QuantExperts {
            isa,
            bf16_dot: isa == Isa::Avx512Bf16 && act_dtype == DType::BF16,
            vnni: isa == Isa::Avx512Bf16 && act_dtype == DType::BF16 && vnni_available(),
            format: w.w13.format,
            hidden,
            inter,
            act,
            w13,
            w2,
            b13: f32_vec(&w.b13)?,
            b2: f32_vec(&w.b2)?,
            shared,
            a: Vec::new(),
            ao: Vec::new(),
            gu: Vec::new(),
            mid: Vec::new(),
            xb: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            xi: Default::default(),
            yt: Vec::new(),
            y: Vec::new(),
            spans: Vec::new(),
            of_row: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            decode: Default::default(),
        })
    }

    /// The weight format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Bytes of packed weights and scales (routed and shared).
    pub fn bytes(&self) -> usize {
        self.w13.bytes()
            + self.w2.bytes()
            + match &self.shared {
                Some(Shared::F32(x)) => x.bytes(),
                Some(Shared::Bf16(x)) => x.bytes(),
                Some(Shared::F16(x)) => x.bytes(),
                None => 0,
            }
    }

    /// Fills every reused buffer with NaN (tests: each value read must have been written).
    pub fn poison(&mut self) {
        for b in [&mut self.a, &mut self.ao, &mut self.gu, &mut self.mid, &mut self.yt, &mut self.y] {
            b.iter_mut().for_each(|v| *v = f32::NAN);
        }
        self.xb.iter_mut().for_each(|v| *v = 0x7FC0);
        #[cfg(target_arch = "x86_64")]
        self.xi.poison();
        match &mut self.shared {
            Some(Shared::F32(x)) => x.poison(),
            Some(Shared::Bf16(x)) => x.poison(),
            Some(Shared::F16(x)) => x.poison(),
            None => {}
        }
    }

    /// Overwrites local slot `slot` with expert `src` of `w` (EPLB migration).
    pub fn replace(&mut self, slot: usize, w: &ExpertWeights, src: usize) -> Result<()> {
        let one = w.select_experts(&[src])?;
        self.w13.copy_from(slot, &QMat::from_tensor(&one.w13)?, 0)?;
        self.w2.copy_from(slot, &QMat::from_tensor(&one.w2)?, 0)?;
        let (h, i) = (self.hidden, self.inter);
        for (dst, from, width) in [(&mut self.b13, &w.b13, 2 * i), (&mut self.b2, &w.b2, h)] {
            copy_bias_row(dst.as_deref_mut(), from.as_ref(), slot, src, width)?;
        }
        Ok(())
    }

    /// Adds the shared expert's output (see [`Experts::run_shared`]); false without one.
    pub fn run_shared(
        &mut self,
        x: &HostData,
        tokens: usize,
        gate: &(dyn Fn(usize) -> f32 + Sync),
        out: &mut [f32],
    ) -> Result<bool> {
        match &mut self.shared {
            Some(Shared::F32(s)) => s.run_shared(x, tokens, gate, out),
            Some(Shared::Bf16(s)) => s.run_shared(x, tokens, gate, out),
            Some(Shared::F16(s)) => s.run_shared(x, tokens, gate, out),
            None => Ok(false),
        }
    }

    /// The routed experts' share for tokens `x` (`[T, H]`) with the row layout already built.
    pub fn run_routed(
        &mut self,
        x: &HostData,
        layout: &RowLayout,
        k: usize,
        weights: &[f32],
        weights_on_input: bool,
        out: &mut [f32],
    ) -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        if let Some(split) = self.vnni_decode(layout, weights_on_input) {
            return span!("cpu.q.decode").in_scope(|| self.run_vnni_decode(x, layout, k, weights, out, split));
        }
        let (h, i, rows) = (self.hidden, self.inter, layout.rows());
        grow(&mut self.a, rows * h);
        grow(&mut self.ao, rows * h);
        grow(&mut self.gu, rows * 2 * i);
        grow(&mut self.mid, rows * i);
        grow(&mut self.yt, rows * h);
        grow(&mut self.y, rows * h);
        let src = &layout.src;
        let row_token = |r: usize| src[r] as usize / k;
        let scale = |r: usize| weights[src[r] as usize];
        let scale: Option<&(dyn Fn(usize) -> f32 + Sync)> = if weights_on_input { Some(&scale) } else { None };
        span!("cpu.q.gather").in_scope(|| gather_rows(x, h, h, rows, &row_token, scale, &mut self.a))?;
        let groups = &layout.groups;
        self.spans.clear();
        self.spans.extend(groups.iter().map(|g| Span { expert: g.expert, row0: g.row0, rows: g.rows }));
        // The span of every row (rows are sorted by expert).
        self.of_row.clear();
        self.of_row.extend(self.spans.iter().flat_map(|s| std::iter::repeat_n(*s, s.rows)));
        let (spans, of_row) = (&self.spans, &self.of_row);
        // Activations in each expert's w13 input order (a copy only where that order differs).
        let (w13, a) = (&self.w13, &self.a);
        let x13 = if w13.natural_input() {
            &self.a
        } else {
            span!("cpu.q.order").in_scope(|| {
                each_row(&mut self.ao, h, rows, |r, o| w13.order_input(of_row[r].expert, &a[r * h..(r + 1) * h], o))
            });
            &self.ao
        };
        let mode = Mode::new(self);
        let bufs = TileBufs {
            xb: &mut self.xb,
            #[cfg(target_arch = "x86_64")]
            xi: &mut self.xi,
        };
        span!("cpu.q.gate_up")
            .in_scope(|| project(mode, &self.w13, spans, x13, (&mut self.gu, bufs), self.b13.as_deref()));
        // Activation, then the intermediate in w2's input order.
        let (act, w2, gu) = (self.act, &self.w2, &self.gu);
        let act_span = span!("cpu.q.act").entered();
        each_row(&mut self.mid, i, rows, |r, o| {
            let sp = of_row[r];
            let (n, base, rr) = (sp.rows, sp.row0 * 2 * i, r - sp.row0);
            scratch::with(|sc| {
                grow(&mut sc.row, i);
                let v = &mut sc.row[..i];
                let (mut g, mut u, mut y) = ([0.0f32; 16], [0.0f32; 16], [0.0f32; 16]);
                for j0 in (0..i).step_by(16) {
                    let l = 16.min(i - j0);
                    for jj in 0..l {
                        g[jj] = gu[base + (j0 + jj) * n + rr];
                        u[jj] = gu[base + (i + j0 + jj) * n + rr];
                    }
                    crate::act::apply16(act, &g, &u, &mut y);
                    v[j0..j0 + l].copy_from_slice(&y[..l]);
                }
                w2.order_input(sp.expert, v, o);
            })
        });
        let mode = Mode::new(self);
        drop(act_span);
        let bufs = TileBufs {
            xb: &mut self.xb,
            #[cfg(target_arch = "x86_64")]
            xi: &mut self.xi,
        };
        span!("cpu.q.down")
            .in_scope(|| project(mode, &self.w2, spans, &self.mid, (&mut self.yt, bufs), self.b2.as_deref()));
        // [H][rows] per span -> [rows, H].
        let yt = &self.yt;
        let out_span = span!("cpu.q.combine").entered();
        each_row(&mut self.y, h, rows, |r, o| {
            let sp = of_row[r];
            let (n, base, rr) = (sp.rows, sp.row0 * h, r - sp.row0);
            for (c, v) in o.iter_mut().enumerate() {
                *v = yt[base + c * n + rr];
            }
        });
        layout.combine(&self.y, h, k, (!weights_on_input).then_some(weights), out);
        drop(out_span);
        Ok(())
    }
}

/// Whether a projection of a stack of `form` runs the integer tiles ([`itiles`]) for its experts
/// of [`mats::TileForm::tile_rows`] rows or more (some expert has that many): VNNI, int8
/// activations chosen ([`crate::tuning::int4_act`]), and [`crate::tuning::quant_int_tiles`]
/// given whether the bf16 tiles would run on AMX.
#[cfg(target_arch = "x86_64")]
fn int_tiles(mode: Mode, form: mats::TileForm, spans: &[Span]) -> bool {
    let from = crate::tuning::quant_tile_rows(form.tile_rows());
    let amx = crate::tuning::amx_rows() > 0 && crate::kernels::DotBf16::new().is_some_and(|d| d.uses_amx());
    mode.vnni
        && crate::tuning::int4_act() != 0
        && spans.iter().any(|s| s.rows >= from)
        && crate::tuning::quant_int_tiles(amx)
}

/// Whether the CPU has AVX-512 VNNI (`vpdpbusd` on zmm).
fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Grows a reused buffer to at least `n` elements (never shrinks it).
fn grow<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Which kernels a projection uses.
#[derive(Debug, Clone, Copy)]
struct Mode<'a> {
    isa: Isa,
    bf16_dot: bool,
    vnni: bool,
    /// The activations as bf16 in packed-position order and their row stride, when the tile
    /// path runs (empty otherwise).
    xb: (&'a [u16], usize),
    /// The activations as int8 groups, when the integer tile path runs.
    #[cfg(target_arch = "x86_64")]
    xi: Option<itiles::IntActs<'a>>,
}

impl Mode<'_> {
    /// The kernels of `q`'s projections, before any activations are prepared.
    fn new(q: &QuantExperts) -> Self {
        Mode {
            isa: q.isa,
            bf16_dot: q.bf16_dot,
            vnni: q.vnni,
            xb: (&[], 0),
            #[cfg(target_arch = "x86_64")]
            xi: None,
        }
    }
}

/// The reused activation buffers of the tile paths.
struct TileBufs<'a> {
    xb: &'a mut Vec<u16>,
    #[cfg(target_arch = "x86_64")]
    xi: &'a mut itiles::IntBufs,
}

/// The rows of one expert.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    expert: usize,
    row0: usize,
    rows: usize,
}

/// One task: output rows `c0..c1` of `span`'s expert for all of the span's tokens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Task {
    span: Span,
    c0: usize,
    c1: usize,
}

/// `out` (per span transposed: `out[span.row0 * n + c * span.rows + r]`) = `W_e a_r (+ bias)` for
/// every span; `a` is `[rows, k]` in the matrix's input order. `bufs` are the reused buffers of
/// the tile paths' activations.
fn project<'a>(
    mut mode: Mode<'a>,
    w: &QMat,
    spans: &[Span],
    a: &[f32],
    (out, bufs): (&mut [f32], TileBufs<'a>),
    bias: Option<&[f32]>,
) {
    let (n, k) = (w.n, w.k);
    let tile_rows = crate::tuning::quant_tile_rows(w.tile_rows());
    let rows = spans.iter().map(|s| s.row0 + s.rows).max().unwrap_or(0);
    let xb = bufs.xb;
    #[cfg(target_arch = "x86_64")]
    if let Some(form) = w.tile_form().filter(|&f| int_tiles(mode, f, spans)) {
        // SAFETY: `vnni` is only set with `Isa::Avx512Bf16` (AVX-512F/BW) and VNNI detected.
        mode.xi = Some(unsafe { itiles::quantize_rows(form, crate::tuning::int4_act() == 2, (a, k, rows), bufs.xi) });
    }
    #[cfg(target_arch = "x86_64")]
    let bf16_tiles = mode.xi.is_none();
    #[cfg(not(target_arch = "x86_64"))]
    let bf16_tiles = true;
    if mode.bf16_dot && bf16_tiles && spans.iter().any(|s| s.rows >= tile_rows) {
        // Every row once, as bf16 in packed-position order (rows padded to whole cache lines, an
        // odd number of them: the tiles load many rows at this stride).
        let kp = crate::engine::row_stride::<u16>(k.div_ceil(2) * 2);
        grow(xb, rows * kp);
        each_row(xb, kp, rows, |r, o| w.natural_bf16(&a[r * k..(r + 1) * k], o));
        mode.xb = (&xb[..rows * kp], kp);
    }
    let threads = pool::threads();
    let total: usize = spans.len() * n;
    // About four tasks per thread, at least 8 rows each (12 a thread, as the bf16 split schedule
    // uses, measured 1.27x the time at T = 1 on 16 cores: every task converts its activations).
    let per = (total / (4 * threads)).clamp(8, n.max(8));
    // The tile paths decode whole 32-row panels: keep task boundaries on them.
    #[cfg(target_arch = "x86_64")]
    let panels = !mode.xb.0.is_empty() || mode.xi.is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let panels = !mode.xb.0.is_empty();
    let per = if panels { per.next_multiple_of(crate::pack::NB) } else { per };
    let per_span = n.div_ceil(per);
    // Task i: output rows [c0, c1) of span i / per_span, written to its own range of `out`.
    let out = Out::new(out);
    pool::for_each(spans.len() * per_span, |i, _| {
        let s = spans[i / per_span];
        let c0 = (i % per_span) * per;
        let t = Task { span: s, c0, c1: (c0 + per).min(n) };
        // SAFETY: tasks cover disjoint ranges of `out` (rows c0..c1 of the span's transposed
        // block), each once.
        let o = unsafe { out.slice(s.row0 * n + c0 * s.rows, (t.c1 - c0) * s.rows) };
        scratch::with(|sc| {
            grow(&mut sc.row, k);
            match mode.isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Bf16 | Isa::Avx512 => {
                    // SAFETY: `Isa::Avx512*` is only selected when AVX-512F was detected at run time.
                    unsafe { task_avx512(mode, w, t, a, o, bias, sc) }
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => {
                    // SAFETY: `Isa::Avx2` is only selected when AVX2, FMA and F16C were detected.
                    unsafe { task_avx2(mode, w, t, a, o, bias, sc) }
                }
                _ => task(Mode { isa: Isa::Portable, bf16_dot: false, vnni: false, ..mode }, w, t, a, o, bias, sc),
            }
        })
    });
}

/// Per-thread buffers of the parallel steps, reused across forwards.
mod scratch {
    use std::cell::RefCell;

    /// A task's decoded weight row (f32) and activation rows as bf16 bits.
    #[derive(Default)]
    pub(super) struct Scratch {
        pub(super) row: Vec<f32>,
        pub(super) bf16: Vec<u16>,
        /// Int8 activation groups, and their units and sums (`vpdpbusd` int4 rows).
        pub(super) i8: Vec<i8>,
        pub(super) unit: Vec<f32>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }

    /// `f` on this thread's buffers (contents unspecified; callers grow what they use).
    ///
    /// # Panics
    /// If `f` calls `with` again (no step nests another).
    pub(super) fn with<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
        SCRATCH.with(|b| f(&mut b.borrow_mut()))
    }
}

/// `out[(c - c0) * rows + r] = y(c, r) + bias[c]` over the task's output rows `c` and the span's
/// tokens `r`.
#[inline(always)]
fn each_output(t: Task, n: usize, bias: Option<&[f32]>, out: &mut [f32], mut y: impl FnMut(usize, usize) -> f32) {
    let s = t.span;
    for c in t.c0..t.c1 {
        let b = bias.map_or(0.0, |b| b[s.expert * n + c]);
        for r in 0..s.rows {
            out[(c - t.c0) * s.rows + r] = y(c, r) + b;
        }
    }
}

/// `out[(c - c0) * rows + r] = acc[r * NB + c - b0] + bias[c]` for the `NB`-column (32) block of
/// a tile path's task from column `b0` (`lanes` of them) over the span's tokens `r`.
fn store_block(t: Task, n: usize, bias: Option<&[f32]>, (b0, lanes): (usize, usize), acc: &[f32], out: &mut [f32]) {
    let s = t.span;
    for l in 0..lanes {
        let col = b0 + l;
        let b = bias.map_or(0.0, |b| b[s.expert * n + col]);
        for r in 0..s.rows {
            out[(col - t.c0) * s.rows + r] = acc[r * crate::pack::NB + l] + b;
        }
    }
}

/// [`each_output`] for kernels that take all of the span's rows (1 ..= 4) at once: `ys(c)` gives
/// output `c` of every row (the first `rows` of the four count).
#[cfg(target_arch = "x86_64")]
fn each_output_rows(t: Task, n: usize, bias: Option<&[f32]>, out: &mut [f32], mut ys: impl FnMut(usize) -> [f32; 4]) {
    let s = t.span;
    for c in t.c0..t.c1 {
        let b = bias.map_or(0.0, |b| b[s.expert * n + c]);
        for (r, y) in ys(c).into_iter().take(s.rows).enumerate() {
            out[(c - t.c0) * s.rows + r] = y + b;
        }
    }
}

/// The most rows an expert the int4 register path takes, and so the decode path's limit (every
/// expert at most this many rows; docs/perf/quant.md, "Session 4"). Where some expert has more,
/// experts from [`QMat::tile_rows`] (5) rows take the tile path instead ("Session 13 (CPU)").
const INT4_REG_ROWS: usize = 8;

/// Prefetches the `len` bytes at `p` into L1 (rows of a stack are contiguous, so a pointer
/// `gemv_prefetch` steps past the current row is a later row of the same stream). One core keeps
/// too few lines in flight on its own to stream at its share of the machine's bandwidth: the
/// same reason as the bf16 matrix-vector kernel's prefetch (`tuning::gemv_prefetch`).
#[inline(always)]
fn prefetch_l1(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..len).step_by(64) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(off) as *const i8)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// The sum of `v` in 16 interleaved partial sums (vectorizable: a single chain would wait on
/// the add latency for every element).
#[inline(always)]
fn lane_sum(v: impl Iterator<Item = f32>) -> f32 {
    let mut acc = [0.0f32; 16];
    for (i, x) in v.enumerate() {
        acc[i % 16] += x;
    }
    acc.iter().sum()
}

/// The span's activation rows as bf16 bits, in input order (exact for bf16 activations), in
/// the reused `buf`.
fn bf16_rows<'b>(a: &[f32], s: Span, k: usize, buf: &'b mut Vec<u16>) -> &'b [u16] {
    let src = &a[s.row0 * k..(s.row0 + s.rows) * k];
    grow(buf, src.len());
    buf.iter_mut().zip(src).for_each(|(d, &v)| *d = bf16_bits(v));
    &buf[..src.len()]
}

/// A per-row result of up to 4 rows as 4 (the rest zero).
#[cfg(target_arch = "x86_64")]
fn pad4<const R: usize>((y, done): ([f32; R], usize)) -> ([f32; 4], usize) {
    (std::array::from_fn(|i| if i < R { y[i] } else { 0.0 }), done)
}

/// `half::bf16::from_f32(v).to_bits()` (round to nearest even, NaN stays NaN) without branches
/// on the value, so row conversions vectorize: every task of a decode step converts its rows.
#[inline(always)]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if v.is_nan() {
        (b >> 16) as u16 | 0x40
    } else {
        rounded
    }
}

/// `out[(c - c0) * rows + r] = dot(int4 row c, r) + bias[c]` over the task's weight rows `c` and
/// the span's tokens `r`, the rows prefetched into L1 `gemv_prefetch` steps ahead when
/// `prefetch` (`dot` gets the row's codes, group scales and zero * scale terms).
#[inline(always)]
fn int4_rows(
    w: &QMat,
    t: Task,
    bias: Option<&[f32]>,
    prefetch: bool,
    out: &mut [f32],
    dot: impl Fn(&[u8], &[f32], &[f32], usize) -> f32,
) {
    let (n, s) = (w.n, t.span);
    let ahead = 128 * crate::tuning::gemv_prefetch();
    for c in t.c0..t.c1 {
        let (bytes, sc, zs) = w.int4_row(s.expert, c).expect("int4 stack");
        let b = bias.map_or(0.0, |b| b[s.expert * n + c]);
        if prefetch {
            prefetch_l1(bytes.as_ptr().wrapping_add(ahead), bytes.len());
        }
        for r in 0..s.rows {
            out[(c - t.c0) * s.rows + r] = dot(bytes, sc, zs, r) + b;
        }
    }
}

/// Decodes each row of the task once and dots it with every token of the span.
#[inline(always)]
fn task(mode: Mode, w: &QMat, t: Task, a: &[f32], out: &mut [f32], bias: Option<&[f32]>, sc: &mut Scratch) {
    let isa = mode.isa;
    let (n, k, s) = (w.n, w.k, t.span);
    #[cfg(target_arch = "x86_64")]
    if let Some(xi) = mode.xi.filter(|xi| s.rows >= crate::tuning::quant_tile_rows(xi.form().tile_rows())) {
        // SAFETY: `xi` is only built with `vnni` (AVX-512F/BW and VNNI detected) for a stack with
        // VNNI codes, from every span's rows.
        return unsafe { itiles::run(w, t, xi, out, bias) };
    }
    if s.rows >= crate::tuning::quant_tile_rows(w.tile_rows()) && !mode.xb.0.is_empty() {
        if let Some(fam) = crate::kernels::DotBf16::new() {
            // Enough tokens to reuse a decoded panel: the dense bf16 tile on dequantized panels.
            return tiles::run(&fam, w, t, mode.xb, out, bias);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx512Bf16) && s.rows <= INT4_REG_ROWS && w.int4_row(s.expert, 0).is_some() {
        // Few tokens: int4 rows are decoded in registers and never stored.
        let g = k / 128;
        let mut xsum = [0.0f32; INT4_REG_ROWS * 64];
        let xs = &mut xsum[..s.rows * g.min(64)];
        if g <= 64 {
            let int8 = crate::tuning::int4_act();
            if let Some(xi) = mode.xi {
                // The projection's rows are quantized already (its other experts run the integer
                // tiles): the same quantizer on the same rows as below, so the same bits.
                int4_rows(w, t, bias, true, out, |bytes, sc, zs, r| {
                    let (q, unit, xs) = xi.row(s.row0 + r);
                    // SAFETY: `xi` is only built with `vnni` (AVX-512F/BW and VNNI detected), for
                    // this int4 stack: one full row of `g` groups.
                    unsafe { simd::int4_dot_vnni(xi.split(), bytes, sc, zs, q, unit, xs) }
                });
                return;
            }
            if mode.vnni && int8 != 0 {
                let split = int8 == 2;
                let per = simd::i8_group_bytes(split);
                grow(&mut sc.i8, s.rows * g * per);
                grow(&mut sc.unit, s.rows * g);
                let (xq, unit) = (&mut sc.i8[..s.rows * g * per], &mut sc.unit[..s.rows * g]);
                for r in 0..s.rows {
                    let x = &a[(s.row0 + r) * k..(s.row0 + r + 1) * k];
                    let (q, u, xs) = (
                        &mut xq[r * g * per..(r + 1) * g * per],
                        &mut unit[r * g..(r + 1) * g],
                        &mut xs[r * g..(r + 1) * g],
                    );
                    // SAFETY: `vnni` is only set with `Isa::Avx512Bf16` (AVX-512F/BW detected)
                    // and AVX-512 VNNI detected; each slice is one row of `g` groups.
                    unsafe { simd::quantize_i8_groups(split, x, q, u, xs) }
                }
                int4_rows(w, t, bias, true, out, |bytes, sc, zs, r| {
                    let (q, u, xs) =
                        (&xq[r * g * per..(r + 1) * g * per], &unit[r * g..(r + 1) * g], &xs[r * g..(r + 1) * g]);
                    // SAFETY: as above; the slices are one full row of `g` groups.
                    unsafe { simd::int4_dot_vnni(split, bytes, sc, zs, q, u, xs) }
                });
                return;
            }
            if mode.bf16_dot {
                // Activations as bf16, 32 even then 32 odd inputs per 64 (from the 32-pair order).
                grow(&mut sc.bf16, s.rows * k);
                let xb = &mut sc.bf16[..s.rows * k];
                for r in 0..s.rows {
                    let x = &a[(s.row0 + r) * k..(s.row0 + r + 1) * k];
                    let xr = &mut xb[r * k..(r + 1) * k];
                    for m in 0..k / 64 {
                        let src = [(0, 0), (16, 32), (32, 16), (48, 48)];
                        for (from, to) in src {
                            for l in 0..16 {
                                xr[64 * m + to + l] = bf16_bits(x[64 * m + from + l]);
                            }
                        }
                    }
                    for (gi, v) in xs[r * g..(r + 1) * g].iter_mut().enumerate() {
                        *v = lane_sum(xr[gi * 128..(gi + 1) * 128].iter().map(|&b| half::bf16::from_bits(b).to_f32()));
                    }
                }
                int4_rows(w, t, bias, true, out, |bytes, sc, zs, r| {
                    // SAFETY: `bf16_dot` is only set with `Isa::Avx512Bf16`, which was detected at
                    // run time; the slices are one full row of `g` groups.
                    unsafe { simd::int4_dot_bf16(bytes, sc, zs, &xb[r * k..(r + 1) * k], &xs[r * g..(r + 1) * g]) }
                });
                return;
            }
            for r in 0..s.rows {
                let x = &a[(s.row0 + r) * k..(s.row0 + r + 1) * k];
                for (gi, v) in xs[r * g..(r + 1) * g].iter_mut().enumerate() {
                    *v = lane_sum(x[gi * 128..(gi + 1) * 128].iter().copied());
                }
            }
            int4_rows(w, t, bias, false, out, |bytes, sc, zs, r| {
                let x = &a[(s.row0 + r) * k..(s.row0 + r + 1) * k];
                // SAFETY: AVX-512 was detected (the caller dispatched on `isa`); `bytes`, `x`,
                // `sc`, `zs` and this token's sums are one full row of `g` groups.
                unsafe { simd::int4_dot_avx512(bytes, sc, zs, x, &xs[r * g..(r + 1) * g]) }
            });
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if mode.bf16_dot && s.rows <= 4 && k.is_multiple_of(64) && w.e2m1_row(s.expert, 0).is_some() {
        // Few tokens: E2M1 codes become bf16 in registers (`vpermw`, exact) for `vdpbf16ps`,
        // scaled per group in f32; activations (bf16 already) as even / odd halves per 64.
        let table = simd::e2m1_bf16_codes();
        grow(&mut sc.bf16, s.rows * k);
        let xb = &mut sc.bf16[..s.rows * k];
        for (r, xr) in xb.chunks_exact_mut(k).enumerate() {
            let x = &a[(s.row0 + r) * k..(s.row0 + r + 1) * k];
            // `a` is in the matrix's pair order (32-input chunks: 16 even, then 16 odd inputs).
            for m in 0..k / 64 {
                for (c, half) in [(0usize, 0usize), (1, 0), (0, 1), (1, 1)].into_iter().enumerate() {
                    let (chunk, odd) = half;
                    let src = &x[64 * m + 32 * chunk + 16 * odd..64 * m + 32 * chunk + 16 * odd + 16];
                    for (d, &v) in xr[64 * m + 16 * c..64 * m + 16 * c + 16].iter_mut().zip(src) {
                        *d = bf16_bits(v);
                    }
                }
            }
        }
        each_output(t, n, bias, out, |c, r| {
            let (bytes, sc, group) = w.e2m1_row(s.expert, c).expect("e2m1 stack");
            if r == 0 {
                prefetch_l1(bytes.as_ptr().wrapping_add(128 * crate::tuning::gemv_prefetch()), bytes.len());
            }
            // SAFETY: `bf16_dot` is only set with `Isa::Avx512Bf16`, detected at run time; k is a
            // multiple of 64, so `bytes` is whole 32-byte steps and `xb`'s row and `sc` cover them.
            unsafe { simd::e2m1_dot_bf16(bytes, sc, group, &xb[r * k..(r + 1) * k], &table) }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if mode.bf16_dot && (1..=4).contains(&s.rows) && w.int8_row(s.expert, 0).is_some() {
        // Few tokens: int8 codes are exact in bf16, widened once for all of the expert's tokens;
        // the row's scale multiplies each sum once.
        let xb = bf16_rows(a, s, k, &mut sc.bf16);
        each_output_rows(t, n, bias, out, |c| {
            let (bytes, scale) = w.int8_row(s.expert, c).expect("int8 stack");
            prefetch_l1(bytes.as_ptr().wrapping_add(128 * crate::tuning::gemv_prefetch()), bytes.len());
            // SAFETY: `bf16_dot` is only set with `Isa::Avx512Bf16`, detected at run time; `xb`
            // holds `s.rows` (1 ..= 4) rows of k, `bytes` one full row.
            let (mut ys, done) = unsafe {
                match s.rows {
                    1 => pad4(simd::int8_dot_bf16_rows::<1>(bytes, xb, k)),
                    2 => pad4(simd::int8_dot_bf16_rows::<2>(bytes, xb, k)),
                    3 => pad4(simd::int8_dot_bf16_rows::<3>(bytes, xb, k)),
                    _ => simd::int8_dot_bf16_rows::<4>(bytes, xb, k),
                }
            };
            for (r, y) in ys.iter_mut().take(s.rows).enumerate() {
                let x = &a[(s.row0 + r) * k..(s.row0 + r + 1) * k];
                for i in done..k {
                    *y += (bytes[i] as i8) as f32 * x[i];
                }
                *y *= scale;
            }
            ys
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if mode.bf16_dot && (1..=4).contains(&s.rows) && w.fp8_row(s.expert, 0).is_some() {
        // Few tokens (decode): FP8 rows become bf16 in registers (exact) for `vdpbf16ps`; the
        // activations are bf16 already (`bf16_dot` needs bf16 activations), so nothing rounds.
        // Each row's codes become bf16 once for all of the expert's tokens (the same bits as
        // one token at a time).
        let table = simd::e4m3_bf16_magnitudes();
        let xb = bf16_rows(a, s, k, &mut sc.bf16);
        each_output_rows(t, n, bias, out, |c| {
            let (bytes, scale) = w.fp8_row(s.expert, c).expect("fp8 stack");
            prefetch_l1(bytes.as_ptr().wrapping_add(128 * crate::tuning::gemv_prefetch()), bytes.len());
            // SAFETY: `bf16_dot` is only set with `Isa::Avx512Bf16`, detected at run time; `xb`
            // holds `s.rows` (1 ..= 4) rows of k, `bytes` and `scale` one full row.
            let (mut ys, done) = unsafe {
                match s.rows {
                    1 => pad4(simd::e4m3_dot_bf16_rows::<1>(bytes, scale, xb, k, &table)),
                    2 => pad4(simd::e4m3_dot_bf16_rows::<2>(bytes, scale, xb, k, &table)),
                    3 => pad4(simd::e4m3_dot_bf16_rows::<3>(bytes, scale, xb, k, &table)),
                    _ => simd::e4m3_dot_bf16_rows::<4>(bytes, scale, xb, k, &table),
                }
            };
            for (r, y) in ys.iter_mut().take(s.rows).enumerate() {
                let x = &a[(s.row0 + r) * k..(s.row0 + r + 1) * k];
                for i in done..k {
                    *y += E4M3_LUT[bytes[i] as usize] * scale[i / 128] * x[i];
                }
            }
            ys
        });
        return;
    }
    let row = &mut sc.row[..k];
    for c in t.c0..t.c1 {
        w.decode_row_isa(isa, s.expert, c, row);
        let b = bias.map_or(0.0, |b| b[s.expert * n + c]);
        let o = &mut out[(c - t.c0) * s.rows..(c - t.c0 + 1) * s.rows];
        for (r, o) in o.iter_mut().enumerate() {
            *o = dot(&row[..k], &a[(s.row0 + r) * k..(s.row0 + r + 1) * k]) + b;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
fn task_avx512(mode: Mode, w: &QMat, t: Task, a: &[f32], out: &mut [f32], bias: Option<&[f32]>, sc: &mut Scratch) {
    task(Mode { isa: Isa::Avx512, ..mode }, w, t, a, out, bias, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn task_avx2(mode: Mode, w: &QMat, t: Task, a: &[f32], out: &mut [f32], bias: Option<&[f32]>, sc: &mut Scratch) {
    task(Mode { isa: Isa::Avx2, bf16_dot: false, ..mode }, w, t, a, out, bias, sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_free_bf16_rounding_matches_half() {
        // Every 2^-12 of the f32 bit patterns plus the edges: ties, subnormals, max, inf, NaN.
        let edges = [0x0000_8000u32, 0x0001_8000, 0x3F80_8000, 0x3F81_8000, 0x7F7F_FFFF, 0x7F80_0000, 0xFF80_0000];
        let bits = (0..=u32::MAX).step_by(4093).chain(edges).chain([0x7FC0_0001, 0xFFFF_FFFF, 0x0000_0001]);
        for b in bits {
            let v = f32::from_bits(b);
            let want = half::bf16::from_f32(v);
            let got = half::bf16::from_bits(bf16_bits(v));
            if v.is_nan() {
                assert!(got.is_nan(), "{b:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{b:#x}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn int8_activation_groups_dot_exactly_what_they_encode() {
        if !(vnni_available() && Isa::Avx512Bf16.available()) {
            eprintln!("no AVX-512 VNNI / BF16 here: the int8 activation kernels cannot run");
            return;
        }
        let (g, n) = (3usize, 5usize);
        // Codes 0..15 with zero points; activations spanning magnitudes, one all-zero group.
        let codes: Vec<u8> = (0..n * 64 * g).map(|i| (i * 37 % 251) as u8).collect();
        let s: Vec<f32> = (0..n * g).map(|i| 0.01 + 0.003 * i as f32).collect();
        let z: Vec<f32> = (0..n * g).map(|i| (i % 16) as f32).collect();
        let zs: Vec<f32> = s.iter().zip(&z).map(|(s, z)| s * z).collect();
        let x: Vec<f32> = (0..128 * g)
            .map(|i| if i >= 256 { 0.0 } else { ((i * 7919 % 1000) as f32 - 500.0) * 1e-3 * (1 + i % 5) as f32 })
            .collect();
        for split in [false, true] {
            let per = simd::i8_group_bytes(split);
            let (mut q, mut unit, mut xsum) = (vec![0i8; per * g], vec![0.0f32; g], vec![0.0f32; g]);
            // SAFETY: AVX-512 F/BW/VNNI detected above; buffers sized per the contracts.
            unsafe { simd::quantize_i8_groups(split, &x, &mut q, &mut unit, &mut xsum) }
            // The encoded activation of pair-order position p (group gi, chunk c, lane l).
            let value = |gi: usize, p: usize| -> f32 {
                let (c, l) = (p / 32, p % 32);
                let j = 16 * c + l % 16; // even/odd input index within the group's halves
                let off = if l < 16 { 0 } else { 64 };
                let h = q[per * gi + off + j] as f32;
                let lo = if split { q[per * gi + 128 + off + j] as f32 } else { 0.0 };
                unit[gi] * if split { 256.0 * h + lo } else { h }
            };
            let err = (0..128 * g).map(|p| (value(p / 128, p % 128) - x[p]).abs()).fold(0.0f32, f32::max);
            // Within half a step of the finest byte (a little more for the f32 arithmetic).
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let step = amax / 127.0 / if split { 256.0 } else { 1.0 };
            assert!(err <= 0.51 * step, "split={split}: encoding error {err} (step {step})");
            assert_eq!(unit[2] * 0.0, 0.0);
            for r in 0..n {
                let bytes = &codes[r * 64 * g..(r + 1) * 64 * g];
                let (sr, zr) = (&s[r * g..(r + 1) * g], &zs[r * g..(r + 1) * g]);
                // SAFETY: as above; one row of g groups.
                let got = unsafe { simd::int4_dot_vnni(split, bytes, sr, zr, &q, &unit, &xsum) };
                // Pair order: byte b of a group holds positions (b % 16) + 32 (b / 16) (low
                // nibble) and that + 16 (high nibble).
                let mut want = 0.0f64;
                for gi in 0..g {
                    for b in 0..64 {
                        let byte = bytes[64 * gi + b];
                        for (code, p) in [(byte & 15, b % 16 + 32 * (b / 16)), (byte >> 4, b % 16 + 32 * (b / 16) + 16)]
                        {
                            let w = (code as f32 - z[r * g + gi]) * sr[gi];
                            want += (w * value(gi, p)) as f64;
                        }
                    }
                }
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "split={split} row {r}: {got} vs {want}"
                );
            }
            // Four rows at a time: the same bits as one by one (rows 1 .. 4, so no row starts
            // the buffers).
            // SAFETY: as above; rows 1 .. 5 hold 4 full rows of g groups.
            let four =
                unsafe { simd::int4_dot_rows_vnni::<4>(split, &codes[64 * g..], &s[g..], &zs[g..], &q, &unit, &xsum) };
            for (i, got) in four.into_iter().enumerate() {
                let r = i + 1;
                let bytes = &codes[r * 64 * g..(r + 1) * 64 * g];
                // SAFETY: as above.
                let one = unsafe {
                    simd::int4_dot_vnni(split, bytes, &s[r * g..(r + 1) * g], &zs[r * g..(r + 1) * g], &q, &unit, &xsum)
                };
                assert_eq!(got.to_bits(), one.to_bits(), "split={split} row {r}");
            }
            // A NaN input poisons its group and the dot.
            let mut bad = x.clone();
            bad[130] = f32::NAN;
            // SAFETY: as above.
            let nan = unsafe {
                simd::quantize_i8_groups(false, &bad, &mut q[..128 * g], &mut unit, &mut xsum);
                simd::int4_dot_vnni(false, &codes[..64 * g], &s[..g], &zs[..g], &q, &unit, &xsum)
            };
            assert!(nan.is_nan());
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn int8_codes_dot_exactly_what_the_activation_groups_encode() {
        if !(vnni_available() && Isa::Avx512Bf16.available()) {
            eprintln!("no AVX-512 VNNI / BF16 here: the int8 activation kernels cannot run");
            return;
        }
        let (g, n) = (3usize, 5usize);
        // Signed codes over the whole byte range (-128 and 127 included), one scale a row.
        let codes: Vec<u8> = (0..n * 128 * g).map(|i| if i % 97 == 0 { 0x80 } else { (i * 37 % 256) as u8 }).collect();
        let scale: Vec<f32> = (0..n).map(|r| 0.004 + 0.001 * r as f32).collect();
        let sums: Vec<i32> = codes.chunks_exact(128).map(|c| c.iter().map(|&b| b as i8 as i32).sum()).collect();
        let x: Vec<f32> = (0..128 * g)
            .map(|i| if i >= 256 { 0.0 } else { ((i * 7919 % 1000) as f32 - 500.0) * 1e-3 * (1 + i % 5) as f32 })
            .collect();
        let mut ordered = vec![0.0f32; x.len()];
        mats::VnniCodes::Int8.order_input(|j| x[j], &mut ordered);
        for split in [false, true] {
            let per = simd::i8_group_bytes(split);
            let (mut q, mut unit, mut xsum) = (vec![0i8; per * g], vec![0.0f32; g], vec![0.0f32; g]);
            // SAFETY: AVX-512 F/BW/VNNI detected above; buffers sized per the contracts.
            unsafe { simd::quantize_i8_groups(split, &ordered, &mut q, &mut unit, &mut xsum) }
            // The order leaves each group's bytes in natural input order.
            let value = |j: usize| -> f64 {
                let (gi, c) = (j / 128, j % 128);
                let h = q[per * gi + c] as f64;
                let lo = if split { q[per * gi + 128 + c] as f64 } else { 0.0 };
                unit[gi] as f64 * if split { 256.0 * h + lo } else { h }
            };
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            let step = amax / 127.0 / if split { 256.0 } else { 1.0 };
            let err = (0..128 * g).map(|j| (value(j) - x[j] as f64).abs()).fold(0.0, f64::max);
            assert!(err <= 0.51 * step, "split={split}: encoding error {err} (step {step})");
            let want = |r: usize| -> f64 {
                let row = &codes[r * 128 * g..(r + 1) * 128 * g];
                scale[r] as f64 * row.iter().enumerate().map(|(j, &b)| b as i8 as f64 * value(j)).sum::<f64>()
            };
            for r in 0..n {
                let rows = mats::VnniRows::Int8 {
                    q: &codes[r * 128 * g..(r + 1) * 128 * g],
                    scale: &scale[r..r + 1],
                    sums: &sums[r * g..(r + 1) * g],
                };
                // SAFETY: as above; one row of g groups.
                let got = unsafe { rows.dot::<1>(split, &q, &unit, &xsum)[0] } as f64;
                let w = want(r);
                assert!((got - w).abs() <= 1e-5 * (1.0 + w.abs()), "split={split} row {r}: {got} vs {w}");
            }
            // Four rows at a time: the same bits as one by one.
            let four = mats::VnniRows::Int8 { q: &codes[128 * g..], scale: &scale[1..], sums: &sums[g..] };
            // SAFETY: as above; rows 1 .. 5 hold 4 full rows of g groups.
            let got4 = unsafe { four.dot::<4>(split, &q, &unit, &xsum) };
            for (i, got) in got4.into_iter().enumerate() {
                // SAFETY: as above.
                let one = unsafe { four.row(i, g).dot::<1>(split, &q, &unit, &xsum)[0] };
                assert_eq!(got.to_bits(), one.to_bits(), "split={split} row {}", i + 1);
            }
        }
    }
}
