//! [`CpuBackend`]: the expert backend contract on the host CPU.

use half::{bf16, f16};
use moe_core::backend::{BackendInput, ExpertBackend, LocalWeights, SlotRange};
use moe_core::routing::{route_host_on, ChunkRunner, RouteChunk};
use moe_core::tensor::HostData;
use moe_core::weights::ExpertWeights;
use moe_core::{DType, Logical, MoeConfig, MoeError, Physical, Result, Tensor, TopK};

use crate::experts::Experts;
use crate::isa::Isa;
use crate::kernels::{DotBf16, Widen};
use crate::layout::RowLayout;
use crate::quant::QuantExperts;
use crate::router::Router;

const NAME: &str = "cpu";

/// Packed experts of the kernel family chosen for the weight dtype and instruction set.
#[derive(Debug)]
enum Packed {
    Dot(Experts<DotBf16>),
    F32(Experts<Widen<f32>>),
    Bf16(Experts<Widen<bf16>>),
    F16(Experts<Widen<f16>>),
    Quant(Box<QuantExperts>),
}

macro_rules! with_experts {
    ($packed:expr, $x:ident => $body:expr) => {
        match $packed {
            Packed::Dot($x) => $body,
            Packed::F32($x) => $body,
            Packed::Bf16($x) => $body,
            Packed::F16($x) => $body,
            Packed::Quant($x) => $body,
        }
    };
}

/// Routing's row chunks on the backend's worker team: rayon's workers would start next to the
/// team's, which still spin from the router step (on 16 cores the 1024-token routing took 0.56
/// ms that way).
struct PoolChunks;

impl ChunkRunner for PoolChunks {
    fn for_each_chunk(&self, ids: &mut [i32], weights: &mut [f32], chunk: usize, f: &RouteChunk<'_>) {
        if chunk == 0 || ids.len() != weights.len() {
            // Not a routing layout (ids and weights are both [T, k]): nothing to split safely.
            return f(0, ids, weights);
        }
        let w = crate::pool::Out::new(weights);
        crate::pool::for_each_chunk(ids, chunk, |c, ids, _| {
            // SAFETY: chunk c of `ids` covers [c * chunk, c * chunk + ids.len()), and the same
            // range of `weights` (equal lengths) is written by this item only.
            f(c, ids, unsafe { w.slice(c * chunk, ids.len()) })
        });
    }
}

/// `[t, h]` f32 rows rounded to `dtype` (f32, bf16 or f16), converted in parallel.
fn rows_to_dtype(v: &[f32], t: usize, h: usize, dtype: DType) -> Result<Tensor> {
    fn convert<T: Send + Copy>(v: &[f32], t: usize, h: usize, cvt: impl Fn(f32) -> T + Sync) -> Vec<T> {
        // Not zero-filled first: a serial fill of the fresh buffer cost as much as the conversion.
        let mut out: Vec<T> = Vec::with_capacity(t * h);
        crate::pool::each_row(&mut out.spare_capacity_mut()[..t * h], h, t, |r, o| {
            for (o, &x) in o.iter_mut().zip(&v[r * h..(r + 1) * h]) {
                o.write(cvt(x));
            }
        });
        // SAFETY: `each_row` ran the closure for all `t` rows of `h` elements (nothing when
        // h = 0), and it writes every element of its row, so the first t * h are initialized.
        unsafe { out.set_len(t * h) };
        out
    }
    let shape = vec![t, h];
    match dtype {
        DType::F32 => Tensor::from_f32(shape, v.to_vec()),
        DType::BF16 => {
            Tensor::from_host(shape, HostData::BF16(convert(v, t, h, |x| bf16::from_bits(crate::quant::bf16_bits(x)))))
        }
        DType::F16 => Tensor::from_host(shape, HostData::F16(convert(v, t, h, f16::from_f32))),
        other => Tensor::from_f32_as(shape, v, other),
    }
}

/// The CPU backend instance: one MoE layer's local experts.
#[derive(Debug)]
pub struct CpuBackend {
    cfg: MoeConfig,
    isa: Isa,
    slots: Option<SlotRange>,
    staged: Option<LocalWeights>,
    router: Option<Router>,
    shared_gate: Option<Vec<f32>>,
    packed: Option<Packed>,
    layout: RowLayout,
    /// The f32 `[T, H]` buffer `run_moe` returns, back from `finalize` for the next forward (a
    /// fresh 8 MiB zeroed allocation cost 0.8 ms of a 2-core T = 1024 forward).
    routed_buf: Vec<f32>,
}

impl CpuBackend {
    /// A backend for `cfg` using kernels for `isa` (see [`Isa::detect`]).
    pub fn new(cfg: MoeConfig, isa: Isa) -> Self {
        CpuBackend {
            cfg,
            isa,
            slots: None,
            staged: None,
            router: None,
            shared_gate: None,
            packed: None,
            layout: RowLayout::default(),
            routed_buf: Vec::new(),
        }
    }

    /// The instruction set in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// A one-line description of the kernels chosen for the loaded weights.
    pub fn kernel_name(&self) -> &'static str {
        match &self.packed {
            Some(Packed::Dot(_)) => "bf16 x bf16 vdpbf16ps",
            Some(Packed::F32(_)) => "f32 weights, f32 FMA",
            Some(Packed::Bf16(_)) => "bf16 weights widened to f32, f32 FMA",
            Some(Packed::F16(_)) => "f16 weights widened to f32, f32 FMA",
            Some(Packed::Quant(_)) => "quantized weights decoded on the fly, f32 or bf16 dot products",
            None => "none (weights not loaded)",
        }
    }

    /// Bytes of packed expert weights.
    pub fn packed_bytes(&self) -> usize {
        self.packed.as_ref().map_or(0, |p| with_experts!(p, x => x.bytes()))
    }

    /// Fills the reused workspaces with NaN, so a test can prove that a forward writes every
    /// element it reads.
    pub fn poison_workspaces(&mut self) {
        if let Some(p) = self.packed.as_mut() {
            with_experts!(p, x => x.poison());
        }
    }

    fn not_loaded() -> MoeError {
        MoeError::WeightsNotLoaded { backend: NAME.into() }
    }

    fn pack(&self, w: &LocalWeights) -> Result<Packed> {
        let c = &self.cfg;
        let (h, i, act) = (c.hidden_size, c.intermediate_size, c.activation);
        let shared = match (&w.shared, c.shared_expert) {
            (Some(s), Some(sc)) => Some((s, sc.intermediate_size)),
            (None, None) => None,
            _ => return Err(MoeError::config("shared_expert", "config and weights disagree about the shared expert")),
        };
        let e = &w.experts;
        if c.quant != moe_core::QuantFormat::None {
            return Ok(Packed::Quant(Box::new(QuantExperts::pack(
                self.isa,
                act,
                h,
                i,
                (c.weight_dtype, c.act_dtype),
                e,
                shared,
            )?)));
        }
        Ok(match c.weight_dtype {
            DType::BF16 => match DotBf16::new().filter(|_| self.isa == Isa::Avx512Bf16) {
                Some(d) => Packed::Dot(Experts::pack(d, act, h, i, e, shared)?),
                None => Packed::Bf16(Experts::pack(Widen::new(self.isa), act, h, i, e, shared)?),
            },
            DType::F32 => Packed::F32(Experts::pack(Widen::new(self.isa), act, h, i, e, shared)?),
            DType::F16 => Packed::F16(Experts::pack(Widen::new(self.isa), act, h, i, e, shared)?),
            other => {
                return Err(MoeError::config(
                    "weight_dtype",
                    format!("{other} is not a float dtype; the cpu backend reads f32, bf16 or f16"),
                ))
            }
        })
    }
}

impl ExpertBackend for CpuBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn create_weights(&mut self, slots: SlotRange) -> Result<()> {
        self.slots = Some(slots);
        self.staged = None;
        self.router = None;
        self.packed = None;
        Ok(())
    }

    fn load_weights(&mut self, weights: &LocalWeights) -> Result<()> {
        let slots =
            self.slots.ok_or_else(|| MoeError::WeightsNotLoaded { backend: "cpu (create_weights first)".into() })?;
        let c = &self.cfg;
        if weights.experts.num_experts() != slots.count {
            return Err(MoeError::shape(
                "cpu.load_weights",
                format!("{} local slots", slots.count),
                format!("{} experts", weights.experts.num_experts()),
            ));
        }
        for (name, t, rows, cols) in [
            ("experts.w13", &weights.experts.w13, 2 * c.intermediate_size, c.hidden_size),
            ("experts.w2", &weights.experts.w2, c.hidden_size, c.intermediate_size),
        ] {
            if t.format != c.quant || t.rows != rows || t.cols != cols {
                return Err(MoeError::shape(
                    "cpu.load_weights",
                    format!("{name} {} [_, {rows}, {cols}]", c.quant),
                    format!("{} [{}, {}, {}]", t.format, t.experts, t.rows, t.cols),
                ));
            }
        }
        self.staged = Some(weights.clone());
        Ok(())
    }

    fn post_load(&mut self) -> Result<()> {
        let staged = self.staged.take().ok_or_else(Self::not_loaded)?;
        let c = &self.cfg;
        let packed = self.pack(&staged);
        let router = Router::new(&staged.router, c.num_experts, c.hidden_size, self.isa);
        let gate = staged.shared.as_ref().and_then(|s| s.gate.as_ref()).map(|g| g.to_f32_vec()).transpose();
        match (packed, router, gate) {
            (Ok(p), Ok(r), Ok(g)) => {
                self.packed = Some(p);
                self.router = Some(r);
                self.shared_gate = g;
                Ok(())
            }
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                // keep the canonical copy so a corrected retry can pack again
                self.staged = Some(staged);
                Err(e)
            }
        }
    }

    fn router_logits(&mut self, hidden: &Tensor) -> Result<Tensor> {
        self.router.as_ref().ok_or_else(Self::not_loaded)?.logits(&hidden.to_host()?)
    }

    fn route(&mut self, logits: &Tensor) -> Result<TopK<Logical>> {
        let r = self.router.as_ref().ok_or_else(Self::not_loaded)?;
        route_host_on(&self.cfg, logits, r.correction_bias.as_deref(), &PoolChunks)
    }

    fn quantize_input(&mut self, hidden: &Tensor) -> Result<BackendInput> {
        Ok(BackendInput::plain(hidden.to_host()?))
    }

    fn run_moe(&mut self, input: &BackendInput, routing: &TopK<Physical>) -> Result<Tensor> {
        let slots = self.slots.ok_or_else(Self::not_loaded)?;
        let packed = self.packed.as_mut().ok_or_else(Self::not_loaded)?;
        let h = self.cfg.hidden_size;
        let t = input.num_tokens();
        input.hidden.expect_shape("cpu.run_moe", &[t, h])?;
        // FP8 activations (post-quant dispatch from another rank): dequantized to f32 once; the
        // kernels take f32 rows like any other activation dtype.
        let dequantized = match input.scales {
            Some(_) => Some(Tensor::from_f32(vec![t, h], input.to_f32_vec()?)?),
            None => None,
        };
        if routing.num_tokens() != t {
            return Err(MoeError::shape(
                "cpu.run_moe",
                format!("routing for {t} tokens"),
                routing.num_tokens().to_string(),
            ));
        }
        let k = routing.k();
        let ids = routing.ids_host()?;
        let weights = routing.weights_host()?;
        self.layout.build(ids, slots)?;
        // Every row is written by the combine, so a reused buffer needs no clearing.
        let mut out = std::mem::take(&mut self.routed_buf);
        out.resize(t * h, 0.0);
        let x = dequantized.as_ref().unwrap_or(&input.hidden).host()?;
        let on_input = routing.weights_on_input();
        with_experts!(packed, e => e.run_routed(x, &self.layout, k, weights, on_input, &mut out))?;
        Tensor::from_f32(vec![t, h], out)
    }

    fn finalize(&mut self, hidden: &Tensor, routed: Tensor) -> Result<Tensor> {
        let packed = self.packed.as_mut().ok_or_else(Self::not_loaded)?;
        let h = self.cfg.hidden_size;
        let t = hidden.dim(0)?;
        hidden.expect_shape("cpu.finalize", &[t, h])?;
        routed.expect_shape("cpu.finalize", &[t, h])?;
        if self.cfg.shared_expert.is_none() && self.cfg.act_dtype == DType::F32 && routed.dtype() == DType::F32 {
            return Ok(routed);
        }
        let mut out = match routed.into_host_data()? {
            HostData::F32(v) => v,
            other => Tensor::from_host(vec![t, h], other)?.to_f32_vec()?,
        };
        if self.cfg.shared_expert.is_some() {
            let hidden = hidden.to_host()?;
            let x = hidden.host()?;
            let xf = match &self.shared_gate {
                Some(_) => hidden.to_f32_vec()?,
                None => Vec::new(),
            };
            let gate_w = self.shared_gate.as_deref();
            // The gate is computed exactly as the reference does (sequential f32 dot).
            let gate = |row: usize| {
                gate_w.map_or(1.0, |g| {
                    moe_core::config::sigmoid(g.iter().zip(&xf[row * h..(row + 1) * h]).map(|(a, b)| a * b).sum())
                })
            };
            with_experts!(packed, e => e.run_shared(x, t, &gate, &mut out))?;
        }
        if self.cfg.act_dtype == DType::F32 {
            return Tensor::from_f32(vec![t, h], out);
        }
        let result = rows_to_dtype(&out, t, h, self.cfg.act_dtype);
        self.routed_buf = out;
        result
    }

    fn replace_slot(&mut self, slot: usize, weights: &ExpertWeights, src: usize) -> Result<()> {
        let packed = self.packed.as_mut().ok_or_else(Self::not_loaded)?;
        if weights.w13.format != self.cfg.quant || weights.w2.format != self.cfg.quant {
            return Err(MoeError::quant(
                weights.w13.format.name(),
                format!("migration source is {}, the backend holds {}", weights.w13.format, self.cfg.quant),
            ));
        }
        with_experts!(packed, e => e.replace(slot, weights, src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_rounding_matches_the_serial_conversion_bit_for_bit() {
        // Ties to even, overflow to infinity, subnormals, signed zeros, NaN payloads.
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0x3F80_8001),
            65504.0,
            65520.0,
            6.0e-8,
            1.0e-40,
        ];
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        while v.len() < 96 * 257 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            v.push(f32::from_bits(s as u32));
        }
        let (t, h) = (96, 257);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let got = pool.install(|| rows_to_dtype(&v, t, h, dtype)).unwrap();
            let want = Tensor::from_f32_as(vec![t, h], &v, dtype).unwrap();
            assert_eq!(got.dtype(), dtype);
            assert_eq!(got.shape(), want.shape());
            // Bit patterns: NaN never equals itself as a float.
            let bits = |t: &Tensor| -> Vec<u32> {
                match t.host().unwrap() {
                    HostData::BF16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
                    HostData::F16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
                    HostData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
                    other => panic!("unexpected {:?}", other.dtype()),
                }
            };
            assert_eq!(bits(&got), bits(&want), "{dtype}");
        }
    }
}
