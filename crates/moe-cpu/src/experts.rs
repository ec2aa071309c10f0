//! Packed expert weights of one kernel family, with their workspaces, and the routed and
//! shared-expert computations on them.

use moe_core::quant::ExpertTensor;
use moe_core::tensor::{HostData, Tensor};
use moe_core::weights::{copy_bias_row, ExpertWeights, SharedWeights};
use moe_core::{Activation, MoeError, Result};

use crate::engine::{self, ExpertSet, Group, Workspace};
use crate::kernels::{AElem, Family};
use crate::layout::{gather_rows, RowLayout};
use crate::pack::{ColumnMap, PackedMats, WElem};
use crate::pool;

/// The shared expert: gate_up, down and its intermediate size.
type Shared<W> = (PackedMats<W>, PackedMats<W>, usize);

/// Routed experts (and the shared expert) in one family's layout.
#[derive(Debug)]
pub struct Experts<F: Family> {
    fam: F,
    inter: usize,
    hidden: usize,
    act: Activation,
    w13: PackedMats<F::W>,
    w2: PackedMats<F::W>,
    b13: Option<Vec<f32>>,
    b2: Option<Vec<f32>>,
    shared: Option<Shared<F::W>>,
    ws: Workspace<F::A>,
    a: Vec<F::A>,
    y: Vec<f32>,
}

fn part_slice<'a, W: WElem>(t: &'a ExpertTensor, what: &str) -> Result<&'a [W]> {
    let part = t.part("weight")?;
    W::host_slice(part.host()?).ok_or_else(|| MoeError::DType {
        op: "cpu.load_weights",
        expected: format!("{what} stored as {}", W::NAME),
        got: part.dtype().to_string(),
    })
}

fn f32_data(t: &Option<Tensor>) -> Result<Option<Vec<f32>>> {
    t.as_ref().map(|t| t.to_f32_vec()).transpose()
}

fn converted<W: WElem>(t: &Tensor) -> Result<Vec<W>> {
    match W::host_slice(t.host()?) {
        Some(s) => Ok(s.to_vec()),
        None => Ok(t.to_f32_vec()?.into_iter().map(W::from_f32).collect()),
    }
}

impl<F: Family> Experts<F> {
    /// Repacks `w` (canonical layout, one entry per local slot) and the shared expert.
    pub fn pack(
        fam: F,
        act: Activation,
        hidden: usize,
        inter: usize,
        w: &ExpertWeights,
        shared: Option<(&SharedWeights, usize)>,
    ) -> Result<Self> {
        let n = w.num_experts();
        let mut w13 = PackedMats::new(n, 2 * inter, hidden, ColumnMap::GateUp { inter }, F::PAIRS);
        w13.pack_all(part_slice::<F::W>(&w.w13, "experts.w13")?);
        let mut w2 = PackedMats::new(n, hidden, inter, ColumnMap::Plain, F::PAIRS);
        w2.pack_all(part_slice::<F::W>(&w.w2, "experts.w2")?);
        let shared = match shared {
            Some((s, si)) => {
                let mut a = PackedMats::new(1, 2 * si, hidden, ColumnMap::GateUp { inter: si }, F::PAIRS);
                a.pack_one(0, &converted::<F::W>(&s.w13)?);
                let mut b = PackedMats::new(1, hidden, si, ColumnMap::Plain, F::PAIRS);
                b.pack_one(0, &converted::<F::W>(&s.w2)?);
                Some((a, b, si))
            }
            None => None,
        };
        Ok(Experts {
            fam,
            inter,
            hidden,
            act,
            w13,
            w2,
            b13: f32_data(&w.b13)?,
            b2: f32_data(&w.b2)?,
            shared,
            ws: Workspace::default(),
            a: Vec::new(),
            y: Vec::new(),
        })
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        self.w13.bytes() + self.w2.bytes() + self.shared.as_ref().map_or(0, |(a, b, _)| a.bytes() + b.bytes())
    }

    /// The kernel family.
    pub fn family(&self) -> &F {
        &self.fam
    }

    /// Overwrites local slot `slot` with expert `src` of `w` (weights and biases), repacking it.
    pub fn replace(&mut self, slot: usize, w: &ExpertWeights, src: usize) -> Result<()> {
        let (h, i) = (self.hidden, self.inter);
        if slot >= self.w13.mats || src >= w.num_experts() {
            return Err(MoeError::shape(
                "cpu.replace_slot",
                format!("slot < {} and source expert < {}", self.w13.mats, w.num_experts()),
                format!("slot {slot}, source {src}"),
            ));
        }
        for (t, rows, cols, name) in [(&w.w13, 2 * i, h, "experts.w13"), (&w.w2, h, i, "experts.w2")] {
            if t.rows != rows || t.cols != cols {
                return Err(MoeError::shape(
                    "cpu.replace_slot",
                    format!("{name} [_, {rows}, {cols}]"),
                    format!("[{}, {}, {}]", t.experts, t.rows, t.cols),
                ));
            }
        }
        let s13 = part_slice::<F::W>(&w.w13, "experts.w13")?;
        let s2 = part_slice::<F::W>(&w.w2, "experts.w2")?;
        self.w13.pack_one(slot, &s13[src * 2 * i * h..(src + 1) * 2 * i * h]);
        self.w2.pack_one(slot, &s2[src * h * i..(src + 1) * h * i]);
        for (dst, from, width) in [(&mut self.b13, &w.b13, 2 * i), (&mut self.b2, &w.b2, h)] {
            copy_bias_row(dst.as_deref_mut(), from.as_ref(), slot, src, width)?;
        }
        Ok(())
    }

    /// Fills every reused buffer with NaN (tests: whatever a forward reads must be written first).
    pub fn poison(&mut self) {
        self.a.iter_mut().for_each(|v| *v = F::A::from_f32(f32::NAN));
        self.y.iter_mut().for_each(|v| *v = f32::NAN);
        self.ws.poison(F::A::from_f32(f32::NAN));
    }

    fn grow(&mut self, rows: usize, kp: usize) {
        if self.a.len() < rows * kp {
            self.a.resize(rows * kp, Default::default());
        }
        if self.y.len() < rows * self.hidden {
            self.y.resize(rows * self.hidden, 0.0);
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
        let (h, rows) = (self.hidden, layout.rows());
        let kp = engine::row_stride::<F::A>(self.w13.kp);
        self.grow(rows, kp);
        let src = &layout.src;
        let row_token = |r: usize| src[r] as usize / k;
        let scale = |r: usize| weights[src[r] as usize];
        let scale: Option<&(dyn Fn(usize) -> f32 + Sync)> = if weights_on_input { Some(&scale) } else { None };
        tracing::debug_span!("cpu.gather").in_scope(|| gather_rows(x, h, kp, rows, &row_token, scale, &mut self.a))?;
        let set = ExpertSet {
            w13: &self.w13,
            w2: &self.w2,
            b13: self.b13.as_deref(),
            b2: self.b2.as_deref(),
            inter: self.inter,
            hidden: h,
            act: self.act,
        };
        tracing::debug_span!("cpu.experts")
            .in_scope(|| engine::run(&self.fam, &set, &layout.groups, &self.a, &mut self.y, &mut self.ws));
        tracing::debug_span!("cpu.combine")
            .in_scope(|| layout.combine(&self.y, h, k, (!weights_on_input).then_some(weights), out));
        Ok(())
    }

    /// Adds `gate(t) * shared_expert(x[t])` to `out` (`[T, H]`); false without a shared expert.
    pub fn run_shared(
        &mut self,
        x: &HostData,
        tokens: usize,
        gate: &(dyn Fn(usize) -> f32 + Sync),
        out: &mut [f32],
    ) -> Result<bool> {
        let Some((w13, w2, si)) = &self.shared else { return Ok(false) };
        let (h, kp) = (self.hidden, engine::row_stride::<F::A>(w13.kp));
        if tokens == 0 {
            return Ok(true);
        }
        if self.a.len() < tokens * kp {
            self.a.resize(tokens * kp, Default::default());
        }
        if self.y.len() < tokens * h {
            self.y.resize(tokens * h, 0.0);
        }
        gather_rows(x, h, kp, tokens, &|r| r, None, &mut self.a)?;
        let set = ExpertSet { w13, w2, b13: None, b2: None, inter: *si, hidden: h, act: self.act };
        let groups = [Group { expert: 0, row0: 0, rows: tokens }];
        engine::run(&self.fam, &set, &groups, &self.a, &mut self.y, &mut self.ws);
        let y = &self.y;
        pool::each_row(out, h, tokens, |t, o| {
            let g = gate(t);
            o.iter_mut().zip(&y[t * h..(t + 1) * h]).for_each(|(o, v)| *o += g * v);
        });
        Ok(true)
    }
}
