//! The `reference` backend: the simplest correct implementation and the oracle every other
//! backend is tested against. Weights are dequantized to f32 once at `post_load` through the
//! format's [`QuantMethod`](crate::quant::QuantMethod); compute is f32 with f32 accumulation over
//! the contiguous permuted layout.

use crate::backend::{BackendInput, BackendProvider, ExpertBackend, Hardware, LocalWeights, SlotRange};
use crate::config::MoeConfig;
use crate::error::{MoeError, Result};
use crate::permute::ContiguousLayout;
use crate::quant::quant_method;
use crate::routing::{route_host, Logical, Physical, TopK};
use crate::tensor::Tensor;
use crate::weights::ExpertWeights;

/// Provider for the reference backend.
#[derive(Debug, Default)]
pub struct ReferenceProvider;

impl BackendProvider for ReferenceProvider {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn priority(&self) -> i32 {
        0
    }

    fn description(&self) -> &'static str {
        "simplest correct implementation: dequantize to f32, f32 accumulate, one thread"
    }

    fn can_implement(&self, cfg: &MoeConfig, _hw: &Hardware) -> std::result::Result<(), String> {
        cfg.validate().map_err(|e| e.to_string())?;
        quant_method(cfg.quant, cfg.weight_dtype).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn create(&self, cfg: &MoeConfig, hw: &Hardware) -> Result<Box<dyn ExpertBackend>> {
        self.can_implement(cfg, hw).map_err(|r| MoeError::unsupported("reference", r))?;
        Ok(Box::new(ReferenceBackend::new(cfg.clone())))
    }
}

/// Dense f32 copy of one expert stack.
#[derive(Debug, Clone, Default)]
struct DenseExperts {
    /// `[n][2I * H]`.
    w13: Vec<Vec<f32>>,
    /// `[n][H * I]`.
    w2: Vec<Vec<f32>>,
    b13: Option<Vec<f32>>,
    b2: Option<Vec<f32>>,
}

/// The reference backend instance.
#[derive(Debug)]
pub struct ReferenceBackend {
    cfg: MoeConfig,
    slots: Option<SlotRange>,
    loaded: Option<LocalWeights>,
    dense: Option<DenseExperts>,
}

impl ReferenceBackend {
    /// A backend for `cfg` (no weights yet).
    pub fn new(cfg: MoeConfig) -> Self {
        ReferenceBackend { cfg, slots: None, loaded: None, dense: None }
    }

    fn weights(&self) -> Result<(&LocalWeights, &DenseExperts, SlotRange)> {
        match (&self.loaded, &self.dense, self.slots) {
            (Some(w), Some(d), Some(s)) => Ok((w, d, s)),
            _ => Err(MoeError::WeightsNotLoaded { backend: "reference".into() }),
        }
    }

    fn densify(&self, x: &ExpertWeights) -> Result<DenseExperts> {
        let m = quant_method(self.cfg.quant, self.cfg.weight_dtype)?;
        let n = x.num_experts();
        Ok(DenseExperts {
            w13: (0..n).map(|e| m.dequantize_expert(&x.w13, e)).collect::<Result<_>>()?,
            w2: (0..n).map(|e| m.dequantize_expert(&x.w2, e)).collect::<Result<_>>()?,
            b13: x.b13.as_ref().map(|t| t.to_f32_vec()).transpose()?,
            b2: x.b2.as_ref().map(|t| t.to_f32_vec()).transpose()?,
        })
    }
}

/// `y[r] = sum_c w[r, c] * x[c]` for a row-major `[rows, cols]` matrix.
pub(crate) fn matvec(w: &[f32], x: &[f32], rows: usize, y: &mut [f32]) {
    let cols = x.len();
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        y[r] = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}

/// One gated MLP's weights (f32, nn.Linear order) and optional biases.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MlpWeights<'a> {
    pub inter: usize,
    pub w13: &'a [f32],
    pub w2: &'a [f32],
    pub b13: Option<&'a [f32]>,
    pub b2: Option<&'a [f32]>,
}

/// One gated MLP on one row: `down(act(gate(x), up(x)))` with optional biases.
pub(crate) fn mlp_row(cfg: &MoeConfig, m: MlpWeights<'_>, x: &[f32], out: &mut [f32]) {
    let inter = m.inter;
    let mut gu = vec![0.0f32; 2 * inter];
    matvec(m.w13, x, 2 * inter, &mut gu);
    if let Some(b) = m.b13 {
        gu.iter_mut().zip(b).for_each(|(g, b)| *g += b);
    }
    let mut act = vec![0.0f32; inter];
    cfg.activation.apply(&gu[..inter], &gu[inter..], &mut act);
    matvec(m.w2, &act, out.len(), out);
    if let Some(b) = m.b2 {
        out.iter_mut().zip(b).for_each(|(o, b)| *o += b);
    }
}

/// Router logits on the host: `x W^T (+ b)` in f32.
pub fn host_router_logits(cfg: &MoeConfig, router: &crate::weights::RouterWeights, hidden: &Tensor) -> Result<Tensor> {
    let (e, h) = (cfg.num_experts, cfg.hidden_size);
    let t = hidden.dim(0)?;
    hidden.expect_shape("router_logits", &[t, h])?;
    let x = hidden.to_f32_vec()?;
    let w = router.weight.to_f32_vec()?;
    let b = router.bias.as_ref().map(|b| b.to_f32_vec()).transpose()?;
    let mut logits = vec![0.0f32; t * e];
    for row in 0..t {
        let y = &mut logits[row * e..(row + 1) * e];
        matvec(&w, &x[row * h..(row + 1) * h], e, y);
        if let Some(b) = &b {
            y.iter_mut().zip(b).for_each(|(l, b)| *l += b);
        }
    }
    Tensor::from_f32(vec![t, e], logits)
}

/// Host shared-expert add and final cast, shared by host backends.
pub fn host_finalize(
    cfg: &MoeConfig,
    shared: Option<&crate::weights::SharedWeights>,
    hidden: &Tensor,
    routed: Tensor,
) -> Result<Tensor> {
    let h = cfg.hidden_size;
    let t = hidden.dim(0)?;
    routed.expect_shape("finalize", &[t, h])?;
    let mut out = routed.to_f32_vec()?;
    if let (Some(s), Some(sc)) = (shared, cfg.shared_expert) {
        let x = hidden.to_f32_vec()?;
        let (w13, w2) = (s.w13.to_f32_vec()?, s.w2.to_f32_vec()?);
        let gate = s.gate.as_ref().map(|g| g.to_f32_vec()).transpose()?;
        let mut y = vec![0.0f32; h];
        for row in 0..t {
            let xr = &x[row * h..(row + 1) * h];
            let m = MlpWeights { inter: sc.intermediate_size, w13: &w13, w2: &w2, b13: None, b2: None };
            mlp_row(cfg, m, xr, &mut y);
            let g = gate.as_ref().map_or(1.0, |g| crate::config::sigmoid(g.iter().zip(xr).map(|(a, b)| a * b).sum()));
            out[row * h..(row + 1) * h].iter_mut().zip(&y).for_each(|(o, v)| *o += g * v);
        }
    }
    Tensor::from_f32_as(vec![t, h], &out, cfg.act_dtype)
}

impl ExpertBackend for ReferenceBackend {
    fn name(&self) -> &str {
        "reference"
    }

    fn create_weights(&mut self, slots: SlotRange) -> Result<()> {
        self.slots = Some(slots);
        self.loaded = None;
        self.dense = None;
        Ok(())
    }

    fn load_weights(&mut self, weights: &LocalWeights) -> Result<()> {
        let slots = self
            .slots
            .ok_or_else(|| MoeError::WeightsNotLoaded { backend: "reference (create_weights first)".into() })?;
        if weights.experts.num_experts() != slots.count {
            return Err(MoeError::shape(
                "reference.load_weights",
                format!("{} local slots", slots.count),
                format!("{} experts", weights.experts.num_experts()),
            ));
        }
        self.loaded = Some(weights.clone());
        self.dense = None;
        Ok(())
    }

    fn post_load(&mut self) -> Result<()> {
        let loaded = self.loaded.as_ref().ok_or_else(|| MoeError::WeightsNotLoaded { backend: "reference".into() })?;
        self.dense = Some(self.densify(&loaded.experts)?);
        Ok(())
    }

    fn router_logits(&mut self, hidden: &Tensor) -> Result<Tensor> {
        let (w, _, _) = self.weights()?;
        host_router_logits(&self.cfg, &w.router, hidden)
    }

    fn route(&mut self, logits: &Tensor) -> Result<TopK<Logical>> {
        let (w, _, _) = self.weights()?;
        let bias = w.router.correction_bias.as_ref().map(|b| b.to_f32_vec()).transpose()?;
        route_host(&self.cfg, logits, bias.as_deref())
    }

    fn quantize_input(&mut self, hidden: &Tensor) -> Result<BackendInput> {
        Ok(BackendInput::plain(hidden.to_host()?))
    }

    fn run_moe(&mut self, input: &BackendInput, routing: &TopK<Physical>) -> Result<Tensor> {
        let (_, d, slots) = self.weights()?;
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let t = input.num_tokens();
        input.hidden.expect_shape("reference.run_moe", &[t, h])?;
        if routing.num_tokens() != t {
            return Err(MoeError::shape(
                "reference.run_moe",
                format!("routing for {t} tokens"),
                routing.num_tokens().to_string(),
            ));
        }
        let k = routing.k();
        let x = input.to_f32_vec()?;
        let weights = routing.weights_host()?;
        let layout = ContiguousLayout::new(routing.ids_host()?, k, slots, 1)?;
        let mut rows_in = layout.permute(&x, h);
        let on_input = routing.weights_on_input();
        let mut rows_out = vec![0.0f32; layout.total_rows() * h];
        for e in 0..layout.counts.len() {
            for r in layout.offsets[e]..layout.offsets[e] + layout.counts[e] {
                let src =
                    layout.rows[r].ok_or_else(|| MoeError::shape("reference.run_moe", "a real row", "padding"))?;
                let xr = &mut rows_in[r * h..(r + 1) * h];
                if on_input {
                    let s = weights[src.token as usize * k + src.k as usize];
                    xr.iter_mut().for_each(|v| *v *= s);
                }
                let b13 = d.b13.as_ref().map(|b| &b[e * 2 * i..(e + 1) * 2 * i]);
                let b2 = d.b2.as_ref().map(|b| &b[e * h..(e + 1) * h]);
                let m = MlpWeights { inter: i, w13: &d.w13[e], w2: &d.w2[e], b13, b2 };
                mlp_row(&self.cfg, m, xr, &mut rows_out[r * h..(r + 1) * h]);
            }
        }
        let mut out = vec![0.0f32; t * h];
        if on_input {
            layout.unpermute_reduce(&rows_out, h, &vec![1.0; weights.len()], k, &mut out);
        } else {
            layout.unpermute_reduce(&rows_out, h, weights, k, &mut out);
        }
        Tensor::from_f32(vec![t, h], out)
    }

    fn finalize(&mut self, hidden: &Tensor, routed: Tensor) -> Result<Tensor> {
        let (w, _, _) = self.weights()?;
        host_finalize(&self.cfg, w.shared.as_ref(), hidden, routed)
    }

    fn replace_slot(&mut self, slot: usize, weights: &ExpertWeights, src: usize) -> Result<()> {
        let loaded = self.loaded.as_mut().ok_or_else(|| MoeError::WeightsNotLoaded { backend: "reference".into() })?;
        loaded.experts.copy_expert_from(slot, weights, src)?;
        let Some(dense) = self.dense.as_mut() else {
            return self.post_load();
        };
        // Only the replaced slot needs dequantizing again.
        let x = &loaded.experts;
        let m = quant_method(self.cfg.quant, self.cfg.weight_dtype)?;
        dense.w13[slot] = m.dequantize_expert(&x.w13, slot)?;
        dense.w2[slot] = m.dequantize_expert(&x.w2, slot)?;
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        for (d, b, width) in [(&mut dense.b13, &x.b13, 2 * i), (&mut dense.b2, &x.b2, h)] {
            crate::weights::copy_bias_row(d.as_deref_mut(), b.as_ref(), slot, slot, width)?;
        }
        Ok(())
    }
}
