//! Quant formats: decoding against independent references (transformers' MXFP4 dequantization,
//! PyTorch's float8 decoding, DeepSeek's block formula, straightforward NVFP4/AWQ/GPTQ decoders
//! written here from the format descriptions), the reference block with each format against the
//! bf16 model, post-quant activations, and named errors for corrupt or misshaped inputs.

mod common;

use common::{naive_block64, rel_l2_64};
use half::f16;
use moe_core::backend::{BackendInput, Hardware};
use moe_core::compare::rel_l2;
use moe_core::quant::activation::{quantize_fp8_input, ActScaling};
use moe_core::quant::int4_group::{unpack_awq, unpack_gptq, Int4Matrix, PackedLinear, AWQ_ORDER};
use moe_core::quant::{quant_method, quantize_reported, ExpertTensor, Fp8Block, Int4Group, Mxfp4, Nvfp4, QuantMethod};
use moe_core::tensor::HostData;
use moe_core::weights::random_hidden;
use moe_core::{
    Activation, BackendRegistry, BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeError, MoeWeights, QuantFormat,
    RoutingConfig, Tensor,
};
use rand::{Rng, SeedableRng};

const FIXTURE: &str = include_str!("fixtures/quant/reference_vectors.json");

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn hex_f32(s: &str) -> Vec<f32> {
    hex_bytes(s).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn u8_tensor(shape: Vec<usize>, v: Vec<u8>) -> Tensor {
    Tensor::from_host(shape, HostData::U8(v)).unwrap()
}

fn tensor_of(
    format: QuantFormat,
    experts: usize,
    rows: usize,
    cols: usize,
    parts: Vec<(&str, Tensor)>,
) -> ExpertTensor {
    ExpertTensor { format, experts, rows, cols, parts: parts.into_iter().map(|(n, t)| (n.to_string(), t)).collect() }
}

/// float8 e4m3fn from the bit layout: 1 sign, 4 exponent (bias 7), 3 mantissa, S.1111.111 NaN.
fn e4m3_naive(b: u8) -> f32 {
    let s = if b & 0x80 != 0 { -1.0f64 } else { 1.0 };
    let (e, m) = (((b >> 3) & 0xF) as i32, (b & 7) as f64);
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    let v = if e == 0 { m / 8.0 * 2f64.powi(-6) } else { (1.0 + m / 8.0) * 2f64.powi(e - 7) };
    (s * v) as f32
}

/// E2M1 from the bit layout: 1 sign, 2 exponent (bias 1), 1 mantissa.
fn e2m1_naive(n: u8) -> f32 {
    let s = if n & 8 != 0 { -1.0f32 } else { 1.0 };
    let (e, m) = (((n >> 1) & 3) as i32, (n & 1) as f32);
    let v = if e == 0 { m * 0.5 } else { (1.0 + m / 2.0) * 2f32.powi(e - 1) };
    s * v
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(FIXTURE).unwrap()
}

#[test]
fn mxfp4_matches_transformers_dequantization() {
    let doc = fixture();
    let m = &doc["mxfp4"];
    let (e, r, c) = (m["experts"].as_u64().unwrap() as usize, m["rows"].as_u64().unwrap() as usize, 96);
    assert_eq!(m["cols"].as_u64().unwrap() as usize, c);
    let blocks = hex_bytes(m["blocks_hex"].as_str().unwrap());
    let scales = hex_bytes(m["scales_hex"].as_str().unwrap());
    let want = hex_f32(m["dequant_f32le_hex"].as_str().unwrap());
    let t = tensor_of(
        QuantFormat::Mxfp4,
        e,
        r,
        c,
        vec![("blocks", u8_tensor(vec![e, r, c / 32, 16], blocks)), ("scales", u8_tensor(vec![e, r, c / 32], scales))],
    );
    Mxfp4.validate(&t).unwrap();
    for ex in 0..e {
        let got = Mxfp4.dequantize_expert(&t, ex).unwrap();
        for (i, (&g, &w)) in got.iter().zip(&want[ex * r * c..(ex + 1) * r * c]).enumerate() {
            // transformers computes in bf16; every MXFP4 value is exact in bf16 at these scales.
            assert_eq!(g.to_bits(), w.to_bits(), "expert {ex} element {i}: {g} vs transformers {w}");
        }
    }
}

#[test]
fn e4m3_decoding_matches_pytorch_for_all_bytes() {
    let torch = hex_f32(fixture()["e4m3fn_f32le_hex"].as_str().unwrap());
    assert_eq!(torch.len(), 256);
    for (b, &t) in torch.iter().enumerate() {
        let ours = moe_core::quant::codec::e4m3_to_f32(b as u8);
        assert!(ours.to_bits() == t.to_bits() || (ours.is_nan() && t.is_nan()), "byte {b:#04x}: {ours} vs {t}");
    }
}

#[test]
fn fp8_block_matches_deepseek_weight_dequant() {
    // DeepSeek-V3 weight_dequant: for each 128x128 block (i, j): y = x.float() * s[i, j], edge
    // blocks masked. Partial blocks on both axes.
    let (e, rows, cols) = (2, 200, 300);
    let mut g = rng(1);
    let q: Vec<u8> = (0..e * rows * cols)
        .map(|_| loop {
            let b: u8 = g.gen();
            if b & 0x7F != 0x7F {
                break b;
            }
        })
        .collect();
    let (rb, cb) = (2, 3);
    let s: Vec<f32> = (0..e * rb * cb).map(|_| g.gen_range(1e-4f32..1e-2)).collect();
    let t = tensor_of(
        QuantFormat::Fp8Block,
        e,
        rows,
        cols,
        vec![
            ("weight", u8_tensor(vec![e, rows, cols], q.clone())),
            ("weight_scale_inv", Tensor::from_f32(vec![e, rb, cb], s.clone()).unwrap()),
        ],
    );
    Fp8Block.validate(&t).unwrap();
    for ex in 0..e {
        let got = Fp8Block.dequantize_expert(&t, ex).unwrap();
        let mut want = vec![f32::NAN; rows * cols];
        for pid_m in 0..rb {
            for pid_n in 0..cb {
                for r in pid_m * 128..((pid_m + 1) * 128).min(rows) {
                    for c in pid_n * 128..((pid_n + 1) * 128).min(cols) {
                        want[r * cols + c] =
                            e4m3_naive(q[(ex * rows + r) * cols + c]) * s[(ex * rb + pid_m) * cb + pid_n];
                    }
                }
            }
        }
        assert_eq!(got, want, "expert {ex}");
    }
}

#[test]
fn nvfp4_matches_straightforward_decoder() {
    let (e, rows, cols) = (3, 5, 64);
    let mut g = rng(2);
    let q: Vec<u8> = (0..e * rows * cols / 2).map(|_| g.gen()).collect();
    // Non-negative, non-NaN e4m3 block scales.
    let sc: Vec<u8> = (0..e * rows * cols / 16).map(|_| g.gen_range(0u8..0x7F)).collect();
    let gs: Vec<f32> = (0..e).map(|_| g.gen_range(1e-4f32..1e-3)).collect();
    let t = tensor_of(
        QuantFormat::Nvfp4,
        e,
        rows,
        cols,
        vec![
            ("weight", u8_tensor(vec![e, rows, cols / 2], q.clone())),
            ("weight_scale", u8_tensor(vec![e, rows, cols / 16], sc.clone())),
            ("weight_scale_2", Tensor::from_f32(vec![e], gs.clone()).unwrap()),
            ("input_scale", Tensor::from_f32(vec![e], vec![0.5; e]).unwrap()),
        ],
    );
    Nvfp4.validate(&t).unwrap();
    for (ex, &global) in gs.iter().enumerate() {
        let got = Nvfp4.dequantize_expert(&t, ex).unwrap();
        for r in 0..rows {
            for c in 0..cols {
                let flat = (ex * rows + r) * cols + c;
                let byte = q[flat / 2];
                let nib = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
                let want = e2m1_naive(nib) as f64 * e4m3_naive(sc[flat / 16]) as f64 * global as f64;
                // f32 products in a different order: equal to within one rounding.
                let g = got[r * cols + c] as f64;
                assert!((g - want).abs() <= want.abs() * 2e-7, "expert {ex} [{r}, {c}]: {g} vs {want}");
            }
        }
    }
}

/// A random int4 linear in the checkpoint's `(in, out)` orientation, with its true values.
struct IntLinear {
    inp: usize,
    out: usize,
    q: Vec<Vec<u8>>,  // [in][out]
    z: Vec<Vec<u8>>,  // [group][out]
    s: Vec<Vec<f16>>, // [group][out]
    g_idx: Vec<usize>,
}

impl IntLinear {
    fn random(inp: usize, out: usize, act_order: bool, seed: u64) -> Self {
        let mut g = rng(seed);
        let groups = inp / 128;
        let mut g_idx: Vec<usize> = (0..inp).map(|i| i / 128).collect();
        if act_order {
            // desc_act: groups follow a permutation of the input channels.
            for i in (1..inp).rev() {
                let j = g.gen_range(0..=i);
                g_idx.swap(i, j);
            }
        }
        IntLinear {
            inp,
            out,
            q: (0..inp).map(|_| (0..out).map(|_| g.gen_range(0..16)).collect()).collect(),
            z: (0..groups).map(|_| (0..out).map(|_| g.gen_range(1..16)).collect()).collect(),
            s: (0..groups).map(|_| (0..out).map(|_| f16::from_f32(g.gen_range(1e-3f32..2e-2))).collect()).collect(),
            g_idx,
        }
    }

    /// `W[o, i] = (q - z) * s` straight from the integers, `(out, in)` order.
    fn dequant(&self) -> Vec<f32> {
        let mut w = vec![0.0; self.out * self.inp];
        for o in 0..self.out {
            for i in 0..self.inp {
                let gi = self.g_idx[i];
                w[o * self.inp + i] = (self.q[i][o] as f32 - self.z[gi][o] as f32) * self.s[gi][o].to_f32();
            }
        }
        w
    }

    fn scales_flat(&self) -> Vec<f16> {
        self.s.iter().flatten().copied().collect()
    }

    /// AutoAWQ GEMM packing: qweight[i, col] |= q[i, 8 col + order[n]] << 4n; qzeros alike.
    fn pack_awq(&self) -> (Vec<i32>, Vec<i32>) {
        let pack = |m: &Vec<Vec<u8>>| -> Vec<i32> {
            let mut v = Vec::new();
            for row in m {
                for col in 0..self.out / 8 {
                    let mut word = 0u32;
                    for (n, &o) in AWQ_ORDER.iter().enumerate() {
                        word |= (row[col * 8 + o] as u32) << (4 * n);
                    }
                    v.push(word as i32);
                }
            }
            v
        };
        (pack(&self.q), pack(&self.z))
    }

    /// GPTQ packing: qweight[r, o] |= q[8r + n, o] << 4n; qzeros[g, col] |= (z - 1) << 4n (v1).
    fn pack_gptq(&self) -> (Vec<i32>, Vec<i32>) {
        let mut qw = vec![0i32; self.inp / 8 * self.out];
        for r in 0..self.inp / 8 {
            for o in 0..self.out {
                let mut word = 0u32;
                for n in 0..8 {
                    word |= (self.q[r * 8 + n][o] as u32) << (4 * n);
                }
                qw[r * self.out + o] = word as i32;
            }
        }
        let mut qz = Vec::new();
        for zrow in &self.z {
            for col in 0..self.out / 8 {
                let mut word = 0u32;
                for n in 0..8 {
                    word |= ((zrow[col * 8 + n] - 1) as u32) << (4 * n);
                }
                qz.push(word as i32);
            }
        }
        (qw, qz)
    }
}

fn dequant_all(t: &ExpertTensor) -> Vec<f32> {
    let m = Int4Group::symmetric();
    (0..t.experts).flat_map(|e| m.dequantize_expert(t, e).unwrap()).collect()
}

#[test]
fn awq_packing_decodes_like_a_straightforward_decoder() {
    let lins: Vec<IntLinear> = (0..2).map(|s| IntLinear::random(256, 24, false, 10 + s)).collect();
    let mats: Vec<Int4Matrix> = lins
        .iter()
        .map(|l| {
            let (qw, qz) = l.pack_awq();
            let sc = l.scales_flat();
            let p = PackedLinear {
                qweight: &qw,
                qzeros: &qz,
                scales: &sc,
                g_idx: None,
                in_features: l.inp,
                out_features: l.out,
                group: 128,
            };
            unpack_awq(&p).unwrap()
        })
        .collect();
    let t = Int4Matrix::stack(&mats).unwrap();
    assert!(t.parts.contains_key("weight_zero_point"));
    let want: Vec<f32> = lins.iter().flat_map(|l| l.dequant()).collect();
    assert_eq!(dequant_all(&t), want);
}

#[test]
fn gptq_packing_decodes_like_a_straightforward_decoder_with_and_without_act_order() {
    for act_order in [false, true] {
        let l = IntLinear::random(384, 16, act_order, 20);
        let (qw, qz) = l.pack_gptq();
        let sc = l.scales_flat();
        let g: Vec<i32> = l.g_idx.iter().map(|&x| x as i32).collect();
        let p = PackedLinear {
            qweight: &qw,
            qzeros: &qz,
            scales: &sc,
            g_idx: Some(&g),
            in_features: l.inp,
            out_features: l.out,
            group: 128,
        };
        let m = unpack_gptq(&p, true).unwrap();
        assert_eq!(m.g_idx.is_some(), act_order, "a trivial g_idx is dropped");
        let t = Int4Matrix::stack(&[m]).unwrap();
        assert_eq!(dequant_all(&t), l.dequant(), "act_order={act_order}");
    }
}

#[test]
fn checkpoint_group_size_other_than_128_is_a_named_error() {
    let l = IntLinear::random(256, 8, false, 3);
    let (qw, qz) = l.pack_awq();
    let sc = l.scales_flat();
    let p = PackedLinear {
        qweight: &qw,
        qzeros: &qz,
        scales: &sc,
        g_idx: None,
        in_features: 256,
        out_features: 8,
        group: 64,
    };
    let e = unpack_awq(&p).unwrap_err();
    assert!(matches!(&e, MoeError::Quant { format, reason } if format == "int4-group" && reason.contains("64")), "{e}");
}

fn formats() -> Vec<QuantFormat> {
    QuantFormat::ALL.into_iter().filter(|f| *f != QuantFormat::None).collect()
}

fn build(cfg: &MoeConfig, w: &MoeWeights) -> ConfigurableMoe {
    let mut moe = ConfigurableMoe::build(
        cfg.clone(),
        &BackendRegistry::with_reference(),
        &Hardware::cpu_only(),
        BuildOptions::default(),
    )
    .unwrap();
    moe.load_weights(w).unwrap();
    moe
}

/// `w` with its routed experts quantized to `format` (router, biases and shared expert stay).
fn quantized(cfg: &MoeConfig, w: &MoeWeights, format: QuantFormat) -> (MoeConfig, MoeWeights) {
    let plain = quant_method(QuantFormat::None, cfg.weight_dtype).unwrap();
    let m = quant_method(format, cfg.weight_dtype).unwrap();
    let q = |t: &ExpertTensor| {
        let f: Vec<f32> = (0..t.experts).flat_map(|e| plain.dequantize_expert(t, e).unwrap()).collect();
        m.quantize(&f, t.experts, t.rows, t.cols).unwrap()
    };
    let mut wq = w.clone();
    wq.experts.w13 = q(&w.experts.w13);
    wq.experts.w2 = q(&w.experts.w2);
    let mut c = cfg.clone();
    c.quant = format;
    wq.validate(&c).unwrap();
    (c, wq)
}

fn test_configs(dtype: DType) -> Vec<(&'static str, MoeConfig)> {
    let mut qwen = MoeConfig::new(8, 2, 256, 128);
    qwen.weight_dtype = dtype;
    qwen.act_dtype = dtype;
    let mut gpt_oss = qwen.clone();
    gpt_oss.routing = RoutingConfig::GptOss;
    gpt_oss.activation = Activation::GPT_OSS;
    gpt_oss.router_bias = true;
    gpt_oss.expert_bias = true;
    vec![("softmax/swiglu", qwen), ("gpt-oss", gpt_oss)]
}

/// The same block with the quantized experts dequantized into plain f32 weights.
fn dequantized_model(cfg: &MoeConfig, w: &MoeWeights) -> (MoeConfig, MoeWeights) {
    let m = quant_method(cfg.quant, cfg.weight_dtype).unwrap();
    let plain = quant_method(QuantFormat::None, DType::F32).unwrap();
    let d = |t: &ExpertTensor| {
        let f: Vec<f32> = (0..t.experts).flat_map(|e| m.dequantize_expert(t, e).unwrap()).collect();
        plain.quantize(&f, t.experts, t.rows, t.cols).unwrap()
    };
    let mut wd = w.clone();
    wd.experts.w13 = d(&w.experts.w13);
    wd.experts.w2 = d(&w.experts.w2);
    let mut c = cfg.clone();
    c.quant = QuantFormat::None;
    c.weight_dtype = DType::F32;
    (c, wd)
}

#[test]
fn reference_with_each_format_equals_the_dequantized_model_in_f64() {
    for (name, cfg) in test_configs(DType::F32) {
        let w = MoeWeights::random(&cfg, 40).unwrap();
        let x = random_hidden(11, cfg.hidden_size, DType::F32, 41).unwrap();
        for f in formats() {
            let (cq, wq) = quantized(&cfg, &w, f);
            let out = build(&cq, &wq).forward(&x).unwrap();
            let (cd, wd) = dequantized_model(&cq, &wq);
            let expect = naive_block64(&cd, &wd, x.as_f32().unwrap());
            let err = rel_l2_64(out.as_f32().unwrap(), &expect);
            assert!(err < 1e-5, "{name} {f}: rel err vs dequantized f64 model {err:e}");
        }
    }
}

#[test]
fn reference_block_with_each_format_is_close_to_the_bf16_model() {
    // Quantization error propagates through the block as about sqrt(3) times the weights'
    // relative error (gate and up both feed the product, then down adds its own). On Gaussian
    // weights e4m3 has ~2.7% weight error (-> ~4.7% at the output, inside DESIGN.md's 5e-2), but
    // every 4-bit round-to-nearest format has ~9.5-12% (the optimum for a 16-level grid on a
    // Gaussian is ~9.7%), which lands at ~0.17-0.20 at the output: DESIGN.md's 1e-1 for 4-bit
    // cannot hold against the bf16 model on such weights, so 4-bit is held to 2.5e-1 here and
    // to 1e-5 against the dequantized model above. See docs/quant.md.
    for (name, cfg) in test_configs(DType::BF16) {
        let w = MoeWeights::random(&cfg, 42).unwrap();
        let x = random_hidden(16, cfg.hidden_size, DType::BF16, 43).unwrap();
        let base = build(&cfg, &w).forward(&x).unwrap().to_f32_vec().unwrap();
        for f in formats() {
            let (cq, wq) = quantized(&cfg, &w, f);
            let out = build(&cq, &wq).forward(&x).unwrap().to_f32_vec().unwrap();
            let err = rel_l2(&out, &base);
            let tol = match f {
                QuantFormat::Fp8Block | QuantFormat::Fp8Tensor | QuantFormat::Int8Channel => 5e-2,
                _ => 2.5e-1,
            };
            assert!(err < tol && err > 0.0, "{name} {f}: rel err {err:.4} vs bf16 (bound {tol})");
            eprintln!("{name} {f}: rel err vs bf16 {err:.4} (bound {tol})");
        }
    }
}

#[test]
fn quantize_reported_measures_the_error() {
    let mut g = rng(5);
    let (e, r, c) = (2, 64, 256);
    let w: Vec<f32> = (0..e * r * c).map(|_| g.gen_range(-1.0f32..1.0) * 0.05).collect();
    let mut errs = Vec::new();
    for f in formats() {
        let m = quant_method(f, DType::BF16).unwrap();
        let (t, rep) = quantize_reported(m.as_ref(), &w, e, r, c).unwrap();
        m.validate(&t).unwrap();
        let d: Vec<f32> = (0..e).flat_map(|x| m.dequantize_expert(&t, x).unwrap()).collect();
        assert!((rep.rel_l2 - rel_l2(&d, &w)).abs() < 1e-6, "{f}");
        assert!(rep.rel_l2 > 0.0 && rep.rel_l2 < 0.2 && rep.bytes < rep.bf16_bytes, "{f}: {rep:?}");
        errs.push((f, rep.rel_l2));
    }
    let get = |f| errs.iter().find(|x| x.0 == f).unwrap().1;
    assert!(get(QuantFormat::Int8Channel) < get(QuantFormat::Fp8Block));
    assert!(get(QuantFormat::Fp8Block) < get(QuantFormat::Int4Group));
}

#[test]
fn fp8_activations_travel_as_payload_plus_scales_and_the_reference_accepts_them() {
    let mut cfg = MoeConfig::new(4, 2, 256, 128);
    cfg.quant = QuantFormat::None;
    let w = MoeWeights::random(&cfg, 9).unwrap();
    let x = random_hidden(7, cfg.hidden_size, DType::F32, 9).unwrap();
    let reg = BackendRegistry::with_reference();
    let mut backend = reg.create("reference", &cfg, &Hardware::cpu_only()).unwrap().0;
    let slots = moe_core::SlotRange::for_config(&cfg);
    backend.create_weights(slots).unwrap();
    let lw = moe_core::LocalWeights { router: w.router.clone(), experts: w.experts.clone(), shared: None };
    backend.load_weights(&lw).unwrap();
    backend.post_load().unwrap();
    let logits = backend.router_logits(&x).unwrap();
    let routing = backend.route(&logits).unwrap().into_identity_slots();
    let plain = backend.run_moe(&BackendInput::plain(x.clone()), &routing).unwrap();
    for scaling in [ActScaling::PerTokenGroup, ActScaling::PerTensorDynamic] {
        let q = quantize_fp8_input(&x, scaling).unwrap();
        assert_eq!(q.hidden.dtype(), DType::U8);
        assert_eq!(q.num_tokens(), 7);
        let out = backend.run_moe(&q, &routing).unwrap();
        let err = rel_l2(&out.to_f32_vec().unwrap(), &plain.to_f32_vec().unwrap());
        assert!(err < 5e-2 && err > 0.0, "{scaling:?}: {err}");
    }
}

fn quant_err(r: moe_core::Result<()>) -> String {
    match r {
        Err(MoeError::Quant { format, reason }) => format!("{format}: {reason}"),
        other => panic!("expected a quantization error, got {other:?}"),
    }
}

#[test]
fn corrupt_scales_are_named_errors() {
    let mut g = rng(7);
    let w: Vec<f32> = (0..2 * 256 * 256).map(|_| g.gen_range(-0.1f32..0.1)).collect();
    for (f, part, bad) in [
        (QuantFormat::Fp8Block, "weight_scale_inv", f32::NAN),
        (QuantFormat::Fp8Block, "weight_scale_inv", -1.0),
        (QuantFormat::Fp8Tensor, "weight_scale", f32::INFINITY),
        (QuantFormat::Nvfp4, "weight_scale_2", f32::NAN),
        (QuantFormat::Int8Channel, "weight_scale", -0.5),
        (QuantFormat::Int4Group, "weight_scale", f32::INFINITY),
    ] {
        let m = quant_method(f, DType::BF16).unwrap();
        let mut t = m.quantize(&w, 2, 256, 256).unwrap();
        let p = t.parts[part].clone();
        let mut v = p.to_f32_vec().unwrap();
        let last = v.len() - 1;
        v[last] = bad;
        let corrupted = Tensor::from_f32_as(p.shape().to_vec(), &v, p.dtype()).unwrap();
        t.parts.insert(part.to_string(), corrupted);
        let msg = quant_err(m.validate(&t));
        assert!(msg.contains(part) && msg.starts_with(f.name()), "{msg}");
        // The reference path reports it too (expert 1 holds the corrupt scale).
        assert!(matches!(m.dequantize_expert(&t, 1), Err(MoeError::Quant { .. })), "{f}");
    }
    // MXFP4 E8M0 NaN code and e4m3 NaN weight bytes.
    let mut t = Mxfp4.quantize(&w, 2, 256, 256).unwrap();
    let mut s = t.parts["scales"].as_u8().unwrap().to_vec();
    s[3] = 255;
    t.parts.insert("scales".into(), u8_tensor(vec![2, 256, 8], s));
    assert!(quant_err(Mxfp4.validate(&t)).contains("255"));
    let mut t = Fp8Block.quantize(&w, 2, 256, 256).unwrap();
    let mut q = t.parts["weight"].as_u8().unwrap().to_vec();
    q[17] = 0xFF;
    t.parts.insert("weight".into(), u8_tensor(vec![2, 256, 256], q));
    assert!(quant_err(Fp8Block.validate(&t)).contains("NaN"));
}

#[test]
fn wrong_block_sizes_and_indivisible_shapes_are_named_errors() {
    let mut g = rng(8);
    let w: Vec<f32> = (0..256 * 256).map(|_| g.gen_range(-0.1f32..0.1)).collect();
    // Scales for 64-blocks handed to the 128-block format.
    let mut t = Fp8Block.quantize(&w, 1, 256, 256).unwrap();
    t.parts.insert("weight_scale_inv".into(), Tensor::from_f32(vec![1, 4, 4], vec![0.01; 16]).unwrap());
    let msg = quant_err(Fp8Block.validate(&t));
    assert!(msg.contains("weight_scale_inv") && msg.contains("[1, 2, 2]"), "{msg}");
    // MXFP4 blocks of 16 bytes expected; 8 given.
    let mut t = Mxfp4.quantize(&w, 1, 256, 256).unwrap();
    t.parts.insert("blocks".into(), u8_tensor(vec![1, 256, 16, 8], vec![0; 256 * 128]));
    assert!(quant_err(Mxfp4.validate(&t)).contains("blocks"));
    // Input features not a multiple of the block.
    for (f, cols) in [(QuantFormat::Mxfp4, 48), (QuantFormat::Nvfp4, 40), (QuantFormat::Int4Group, 192)] {
        let m = quant_method(f, DType::BF16).unwrap();
        let msg = quant_err(m.quantize(&vec![0.1; 4 * cols], 1, 4, cols).map(|_| ()));
        assert!(msg.contains(&cols.to_string()) && msg.contains("multiple"), "{msg}");
        let mut c = MoeConfig::new(4, 2, cols, 128);
        c.quant = f;
        assert!(matches!(c.validate(), Err(MoeError::Config { field: "quant", .. })), "{f}");
    }
    // Zero points out of the 4-bit range and g_idx past the last group.
    let mut t = Int4Group::with_zero_points().quantize(&w, 1, 256, 256).unwrap();
    t.parts.insert("weight_zero_point".into(), u8_tensor(vec![1, 256, 2], vec![16; 512]));
    assert!(quant_err(Int4Group::symmetric().validate(&t)).contains("weight_zero_point"));
    let mut t = Int4Group::symmetric().quantize(&w, 1, 256, 256).unwrap();
    t.parts.insert("weight_g_idx".into(), Tensor::from_i32(vec![1, 256], vec![2; 256]).unwrap());
    assert!(quant_err(Int4Group::symmetric().validate(&t)).contains("weight_g_idx"));
    // A missing part is named.
    let mut t = Nvfp4.quantize(&w, 1, 256, 256).unwrap();
    t.parts.remove("weight_scale_2");
    assert!(quant_err(Nvfp4.validate(&t)).contains("weight_scale_2"));
}

#[test]
fn non_finite_weights_are_refused_by_every_quantizer() {
    for f in formats() {
        let m = quant_method(f, DType::BF16).unwrap();
        let mut w = vec![0.01f32; 128 * 128];
        w[77] = f32::NAN;
        assert!(matches!(m.quantize(&w, 1, 128, 128), Err(MoeError::NonFinite { .. })), "{f}");
    }
}
