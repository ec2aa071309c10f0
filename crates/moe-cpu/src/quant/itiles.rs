//! int4, int8, MXFP4 and NVFP4 experts at prefill sizes on AVX-512 VNNI: the activations are
//! quantized once per projection into int8 groups of 128 inputs (the decode path's
//! `simd::quantize_i8_groups`, by default two bytes a value: finer than bf16), and a task turns
//! each 32-column x 128-input block of codes into a panel of unsigned code bytes in a reused
//! per-thread buffer ([`QMat::vnni_panel`]: a transpose and a mask, for E2M1 one byte shuffle
//! to `2 x value + 12`; no conversion to bf16) that every 8-row tile of the expert's tokens
//! multiplies with `vpdpbusd` (`simd::vnni_tile`), scaled per 128 (int4, int8), 32 (MXFP4) or
//! 16 (NVFP4) inputs.
//!
//! Why: `vpdpbusd` takes 64 products an instruction against `vdpbf16ps`'s 32, and on the dev VM's
//! Xeon it issues four times as often (5.4 against 1.3 a ns on one core, docs/perf/quant.md
//! "Session 21"), so even with two activation bytes the integer tile does about four times the
//! work a cycle of the dense bf16 tile that [`super::tiles`] feeds with dequantized panels.

use std::cell::RefCell;

use super::mats::{QMat, TileForm};
use super::simd::{self, TileScales, VnniTileRows, VNNI_QUADS};
use super::{grow, scratch, Task};
use crate::pool::{self, Out};

/// Token rows a tile takes (16 accumulators plus two panel vectors in the 32 registers).
const MR: usize = 8;
/// Columns of a panel.
const NB: usize = 32;

/// One thread's reusable panel and accumulators (grown once, never per forward).
#[derive(Default)]
struct Workspace {
    panel: Vec<u32>,
    acc: Vec<f32>,
    scales: TileScales,
}

thread_local! {
    static WS: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// Reused buffers of the quantized activations (per row: `g` groups of bytes, units and value
/// sums, and the integer sums of every scale sub-group).
#[derive(Debug, Default)]
pub(super) struct IntBufs {
    q: Vec<i8>,
    unit: Vec<f32>,
    xsum: Vec<f32>,
    vsum: Vec<i32>,
}

impl IntBufs {
    /// Fills every buffer with garbage (tests: each value read must have been written).
    pub(super) fn poison(&mut self) {
        self.q.iter_mut().for_each(|v| *v = i8::MIN);
        self.unit.iter_mut().chain(self.xsum.iter_mut()).for_each(|v| *v = f32::NAN);
        self.vsum.iter_mut().for_each(|v| *v = i32::MIN);
    }
}

/// A projection's activation rows as int8 groups ([`quantize_rows`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct IntActs<'a> {
    /// Row `r`'s `groups` groups at `q[r * ldq..]`.
    q: &'a [i8],
    ldq: usize,
    groups: usize,
    unit: &'a [f32],
    xsum: &'a [f32],
    vsum: &'a [i32],
    form: TileForm,
    split: bool,
}

impl<'a> IntActs<'a> {
    /// The code form the rows were quantized for.
    pub(super) fn form(&self) -> TileForm {
        self.form
    }

    /// Whether each value took two bytes.
    pub(super) fn split(&self) -> bool {
        self.split
    }

    /// Row `r`'s group bytes, units and value sums, as `simd::quantize_i8_groups` wrote them.
    pub(super) fn row(&self, r: usize) -> (&'a [i8], &'a [f32], &'a [f32]) {
        let g = self.groups;
        let bytes = g * simd::i8_group_bytes(self.split);
        (&self.q[r * self.ldq..][..bytes], &self.unit[r * g..][..g], &self.xsum[r * g..][..g])
    }
}

/// Quantizes `rows` activation rows of `a` (`[rows, k]` in the matrix's input order; a last
/// group shorter than 128 inputs is padded with zeros) for stacks of `form`, in parallel, into
/// `bufs`.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 VNNI must be available.
pub(super) unsafe fn quantize_rows<'a>(
    form: TileForm,
    split: bool,
    (a, k, rows): (&[f32], usize, usize),
    bufs: &'a mut IntBufs,
) -> IntActs<'a> {
    let (g, per, subs) = (k.div_ceil(128), simd::i8_group_bytes(split), form.subs());
    let (hq, kg) = (form.half_quads(), 128 * k.div_ceil(128));
    // Whole cache lines, an odd number: at a multiple of 4 KiB (hidden 2048, two bytes a value)
    // a tile's 8 rows would share one L1 set.
    let ldq = crate::engine::row_stride::<i8>(g * per);
    grow(&mut bufs.q, rows * ldq);
    grow(&mut bufs.unit, rows * g);
    grow(&mut bufs.xsum, rows * g);
    grow(&mut bufs.vsum, rows * g * subs);
    let (q, unit, xsum, vsum) =
        (Out::new(&mut bufs.q), Out::new(&mut bufs.unit), Out::new(&mut bufs.xsum), Out::new(&mut bufs.vsum));
    pool::for_each(rows, |r, _| {
        scratch::with(|sc| {
            grow(&mut sc.row, kg);
            let x = &mut sc.row[..kg];
            form.order_input(&a[r * k..(r + 1) * k], x);
            // SAFETY: row r alone writes its ranges of the four buffers (grown above); AVX-512F/BW
            // and VNNI by the caller's contract; group gi's bytes are `per` from `gi * per`.
            unsafe {
                let (q, u, s, v) = (
                    q.slice(r * ldq, g * per),
                    unit.slice(r * g, g),
                    xsum.slice(r * g, g),
                    vsum.slice(r * g * subs, g * subs),
                );
                simd::quantize_i8_groups(split, x, q, u, s);
                for (gi, v) in v.chunks_exact_mut(subs).enumerate() {
                    simd::group_sub_sums(split, hq, q.as_ptr().add(gi * per), v);
                }
            }
        })
    });
    IntActs {
        q: &bufs.q[..rows * ldq],
        ldq,
        groups: g,
        unit: &bufs.unit[..rows * g],
        xsum: &bufs.xsum[..rows * g],
        vsum: &bufs.vsum[..rows * g * subs],
        form,
        split,
    }
}

/// `out[(c - c0) * rows + r] = W_e x_r (+ bias)` for the task's output rows `c` and its span's
/// tokens `r`, from the span's rows of `x` (quantized for this stack's [`QMat::tile_form`]).
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 VNNI must be available; `x` holds the span's rows of `w.k`
/// inputs.
pub(super) unsafe fn run(w: &QMat, t: Task, x: IntActs, out: &mut [f32], bias: Option<&[f32]>) {
    let (n, k, s) = (w.n, w.k, t.span);
    let (g, per, subs) = (k.div_ceil(128), simd::i8_group_bytes(x.split), x.form.subs());
    WS.with_borrow_mut(|ws| {
        grow(&mut ws.panel, VNNI_QUADS * NB);
        grow(&mut ws.acc, s.rows * NB);
        let sc = &mut ws.scales;
        for b0 in (t.c0..t.c1).step_by(NB) {
            let lanes = (t.c1 - b0).min(NB);
            let acc = &mut ws.acc[..s.rows * NB];
            acc.fill(0.0);
            for gi in 0..g {
                let whole = w.vnni_panel(s.expert, (b0, lanes), gi, &mut ws.panel, sc);
                debug_assert!(whole, "the caller checked the stack's codes and the task's columns");
                for r0 in (0..s.rows).step_by(MR) {
                    let (m, row) = ((s.rows - r0).min(MR), s.row0 + r0);
                    let rows = VnniTileRows {
                        q: x.q[row * x.ldq + gi * per..].as_ptr(),
                        ldq: x.ldq,
                        unit: x.unit[row * g + gi..].as_ptr(),
                        xsum: x.xsum[row * g + gi..].as_ptr(),
                        ldg: g,
                        vsum: x.vsum[(row * g + gi) * subs..].as_ptr(),
                        ldv: g * subs,
                    };
                    // SAFETY: VNNI by the caller's contract; the panel holds VNNI_QUADS x 32 words,
                    // rows row .. row + m of `x` exist (the span's), `acc` holds m x 32 values
                    // from r0.
                    unsafe {
                        simd::vnni_tile((x.form, x.split), m, ws.panel.as_ptr(), rows, sc, acc[r0 * NB..].as_mut_ptr())
                    }
                }
            }
            super::store_block(t, n, bias, (b0, lanes), acc, out);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::{Span, Task};
    use super::*;
    use moe_core::quant::{quant_method, Int4Group, QuantMethod};
    use moe_core::{DType, QuantFormat};

    /// Where each activation position of the matrix's input order lands in a row's bytes: the
    /// position in [`TileForm::order_input`]'s output (traced with an index vector), then the
    /// quantizer's layout (16-value run `i` of a group at `(i & 1) * 64 + 16 (i / 2)`).
    fn bytes_of(form: TileForm, k: usize, per: usize) -> Vec<usize> {
        let iota: Vec<f32> = (0..k).map(|j| (j + 1) as f32).collect();
        let mut ordered = vec![0.0f32; k.div_ceil(128) * 128];
        form.order_input(&iota, &mut ordered);
        let mut at = vec![usize::MAX; k];
        for (pos, &v) in ordered.iter().enumerate() {
            if v > 0.0 {
                let p = pos % 128;
                at[v as usize - 1] = (pos / 128) * per + ((p / 16) & 1) * 64 + 16 * (p / 32) + p % 16;
            }
        }
        assert!(at.iter().all(|&b| b != usize::MAX), "every input lands somewhere");
        at
    }

    #[test]
    fn integer_tiles_dot_exactly_what_the_activation_groups_encode() {
        let isa = crate::isa::Isa::Avx512Bf16;
        if !(std::arch::is_x86_feature_detected!("avx512vnni") && isa.available()) {
            eprintln!("no AVX-512 VNNI / BF16 here: the integer tiles cannot run");
            return;
        }
        // 2 experts of [40, k]: a SIMD 16-column half, a ragged scalar block (8 of 32
        // columns); 11 token rows: an 8-row tile and a 3-row one. k = 384: whole groups; 352,
        // 336 and 330: a last group of 96 / 80 / 74 inputs (padded; 336 ends in a 16-input
        // chunk of NVFP4 codes).
        let (e, n, rows) = (2usize, 40usize, 11usize);
        let cases: Vec<(Box<dyn QuantMethod>, &str, usize)> = vec![
            (Box::new(Int4Group::with_zero_points()), "int4 zero points", 384),
            (Box::new(Int4Group::symmetric()), "int4", 384),
            (quant_method(QuantFormat::Int8Channel, DType::F32).unwrap(), "int8", 384),
            (quant_method(QuantFormat::Int8Channel, DType::F32).unwrap(), "int8", 330),
            (quant_method(QuantFormat::Mxfp4, DType::F32).unwrap(), "mxfp4", 384),
            (quant_method(QuantFormat::Mxfp4, DType::F32).unwrap(), "mxfp4", 352),
            (quant_method(QuantFormat::Nvfp4, DType::F32).unwrap(), "nvfp4", 384),
            (quant_method(QuantFormat::Nvfp4, DType::F32).unwrap(), "nvfp4", 352),
            (quant_method(QuantFormat::Nvfp4, DType::F32).unwrap(), "nvfp4", 336),
        ];
        for (m, label, k) in cases {
            let g = k.div_ceil(128);
            let w: Vec<f32> = (0..e * n * k).map(|i| ((i * 7919 % 211) as f32 - 105.0) * 1e-3).collect();
            let label = format!("{label} k={k}");
            let t = m.quantize(&w, e, n, k).unwrap();
            let q = QMat::from_tensor(&t).unwrap();
            let form = q.tile_form().expect("whole 128-input groups take the integer tiles");
            let expert = 1;
            // Activations with a large and a zero group among them, in the matrix's input order.
            let x: Vec<f32> = (0..rows * k)
                .map(|i| match (i % k) / 128 {
                    1 if i / k == 3 => 0.0,
                    gi => ((i * 131 % 997) as f32 - 498.0) * 1e-3 * (1 + gi * 40) as f32,
                })
                .collect();
            let mut ordered = vec![0.0f32; rows * k];
            for r in 0..rows {
                q.order_input(expert, &x[r * k..(r + 1) * k], &mut ordered[r * k..(r + 1) * k]);
            }
            let bias: Vec<f32> = (0..e * n).map(|i| i as f32 * 0.01).collect();
            for split in [false, true] {
                let mut bufs = IntBufs::default();
                bufs.poison();
                // SAFETY: AVX-512F/BW detected above.
                let acts = unsafe { quantize_rows(form, split, (&ordered, k, rows), &mut bufs) };
                let per = simd::i8_group_bytes(split);
                let at = bytes_of(form, k, per);
                let value = |r: usize, j: usize| -> f64 {
                    let (gi, b) = (at[j] / per, r * acts.ldq + at[j]);
                    let h = acts.q[b] as f64;
                    let v = if split { 256.0 * h + acts.q[b + 128] as f64 } else { h };
                    acts.unit[r * g + gi] as f64 * v
                };
                let mut out = vec![f32::NAN; n * rows];
                let task = Task { span: Span { expert, row0: 0, rows }, c0: 0, c1: n };
                // SAFETY: VNNI detected above; `acts` holds the span's rows.
                unsafe { run(&q, task, acts, &mut out, Some(&bias)) };
                let mut row = vec![0.0f32; k];
                for c in 0..n {
                    q.decode_row(expert, c, &mut row);
                    for r in 0..rows {
                        let want =
                            bias[expert * n + c] as f64 + (0..k).map(|j| row[j] as f64 * value(r, j)).sum::<f64>();
                        let got = out[c * rows + r] as f64;
                        let scale = (0..k).map(|j| (row[j] as f64 * value(r, j)).abs()).sum::<f64>();
                        assert!(
                            (got - want).abs() <= 2e-6 * (1.0 + scale),
                            "{label} split={split} column {c} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_and_scalar_panels_agree() {
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            eprintln!("no AVX-512 BW here: only the scalar panel exists");
            return;
        }
        let (e, n) = (1usize, 64usize);
        // k = 256: whole groups; 224 / 212: a last group of 96 / 84 inputs.
        let methods = [
            (Box::new(Int4Group::with_zero_points()) as Box<dyn QuantMethod>, 256),
            (quant_method(QuantFormat::Int8Channel, DType::F32).unwrap(), 256),
            (quant_method(QuantFormat::Int8Channel, DType::F32).unwrap(), 212),
            (quant_method(QuantFormat::Mxfp4, DType::F32).unwrap(), 224),
            (quant_method(QuantFormat::Nvfp4, DType::F32).unwrap(), 224),
        ];
        for (m, k) in methods {
            let w: Vec<f32> = (0..e * n * k).map(|i| ((i * 7919 % 211) as f32 - 105.0) * 1e-3).collect();
            let q = QMat::from_tensor(&m.quantize(&w, e, n, k).unwrap()).unwrap();
            let (mut simd, mut scalar) = (vec![0u32; VNNI_QUADS * NB], vec![0u32; VNNI_QUADS * NB]);
            let (mut s, mut s2) = (TileScales::default(), TileScales::default());
            for gi in 0..k.div_ceil(128) {
                // 32 lanes take the SIMD halves; 15 lanes (of the same rows) the scalar path.
                assert!(q.vnni_panel(0, (16, 32), gi, &mut simd, &mut s));
                assert!(q.vnni_panel(0, (16, 15), gi, &mut scalar, &mut s2));
                for p in 0..VNNI_QUADS {
                    assert_eq!(&simd[p * NB..p * NB + 15], &scalar[p * NB..p * NB + 15], "group {gi} quad {p}");
                    assert!(
                        scalar[p * NB + 15..(p + 1) * NB].iter().all(|&v| v == 0),
                        "lanes past the columns are zero"
                    );
                }
                for t in 0..8 {
                    assert_eq!(&s.s[32 * t..32 * t + 15], &s2.s[32 * t..32 * t + 15]);
                }
                assert_eq!(&s.zs[..15], &s2.zs[..15]);
            }
            assert!(!q.vnni_panel(0, (48, 32), 0, &mut simd, &mut s), "columns past the matrix");
            assert!(!q.vnni_panel(0, (0, 32), 2, &mut simd, &mut s), "a group past the matrix");
        }
    }
}
