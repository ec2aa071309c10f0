//! Pre-quantized checkpoints in each family's real naming, written here as shape-correct
//! miniatures (DeepSeek-V3 FP8, GPT-OSS MXFP4, ModelOpt NVFP4, AutoAWQ, GPTQ, FP8 per-tensor):
//! the loaded experts dequantize to exactly what was written, and the loaded block computes
//! what the same block with those dequantized weights computes.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use moe_core::backend::Hardware;
use moe_core::checkpoint::Checkpoint;
use moe_core::compare::rel_l2;
use moe_core::quant::codec::{e4m3_to_f32, f32_to_e4m3};
use moe_core::quant::int4_group::AWQ_ORDER;
use moe_core::quant::{quant_method, ExpertTensor, Fp8Block, Mxfp4, Nvfp4, QuantMethod};
use moe_core::weights::random_hidden;
use moe_core::{BackendRegistry, BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeError, MoeWeights, QuantFormat};
use rand::{Rng, SeedableRng};
use safetensors::tensor::View;
use safetensors::Dtype;
use serde_json::json;

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32s(shape: &[usize], v: &[f32]) -> Raw {
    Raw { dtype: Dtype::F32, shape: shape.to_vec(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}
fn bf16s(shape: &[usize], v: &[f32]) -> Raw {
    Raw {
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
    }
}
fn f16s(shape: &[usize], v: &[f16]) -> Raw {
    Raw { dtype: Dtype::F16, shape: shape.to_vec(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}
fn i32s(shape: &[usize], v: &[i32]) -> Raw {
    Raw { dtype: Dtype::I32, shape: shape.to_vec(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}
fn bytes(dtype: Dtype, shape: &[usize], v: Vec<u8>) -> Raw {
    Raw { dtype, shape: shape.to_vec(), data: v }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A model directory in a temp dir, removed on drop.
struct Mini {
    dir: PathBuf,
    tensors: Vec<(String, Raw)>,
}

impl Mini {
    fn new(config: serde_json::Value) -> Mini {
        let dir = std::env::temp_dir().join(format!(
            "moe-quant-ckpt-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
        Mini { dir, tensors: Vec::new() }
    }

    fn put(&mut self, name: impl Into<String>, t: Raw) {
        self.tensors.push((name.into(), t));
    }

    fn write(&self) {
        let refs: Vec<(String, &Raw)> = self.tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        safetensors::tensor::serialize_to_file(refs, None, &self.dir.join("model.safetensors")).unwrap();
    }

    fn load(&self) -> moe_core::Result<moe_core::checkpoint::LoadedLayer> {
        Checkpoint::open(&self.dir)?.load_layer(0, None, &mut |_, _| {})
    }
}

impl Drop for Mini {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn normal(g: &mut rand::rngs::StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| (g.gen::<f32>() + g.gen::<f32>() + g.gen::<f32>() - 1.5) * 2.0 * std).collect()
}

/// One projection `[rows, cols]` quantized alone (as a checkpoint stores it) and dequantized.
fn quantize_one(m: &dyn QuantMethod, w: &[f32], rows: usize, cols: usize) -> (ExpertTensor, Vec<f32>) {
    let t = m.quantize(w, 1, rows, cols).unwrap();
    let d = m.dequantize_expert(&t, 0).unwrap();
    (t, d)
}

fn part_bytes(t: &ExpertTensor, name: &str) -> Vec<u8> {
    t.parts[name].as_u8().unwrap().to_vec()
}

fn dequant_all(t: &ExpertTensor) -> Vec<f32> {
    let m = quant_method(t.format, DType::F32).unwrap();
    (0..t.experts).flat_map(|e| m.dequantize_expert(t, e).unwrap()).collect()
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

/// The loaded block against the same block with plain f32 weights `w13`/`w2` (dequantized).
fn check_block(layer: &moe_core::checkpoint::LoadedLayer, w13: &[f32], w2: &[f32]) {
    let mut cfg = layer.config.clone();
    cfg.act_dtype = DType::F32;
    let mut plain_cfg = cfg.clone();
    plain_cfg.quant = QuantFormat::None;
    plain_cfg.weight_dtype = DType::F32;
    let mut plain = layer.weights.clone();
    let f = quant_method(QuantFormat::None, DType::F32).unwrap();
    let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size);
    plain.experts.w13 = f.quantize(w13, e, 2 * i, h).unwrap();
    plain.experts.w2 = f.quantize(w2, e, h, i).unwrap();
    if let Some(s) = plain.shared.as_mut() {
        s.w13 = s.w13.to_dtype(DType::F32).unwrap();
        s.w2 = s.w2.to_dtype(DType::F32).unwrap();
    }
    let mut qw = layer.weights.clone();
    if let Some(s) = qw.shared.as_mut() {
        s.w13 = s.w13.to_dtype(DType::F32).unwrap();
        s.w2 = s.w2.to_dtype(DType::F32).unwrap();
    }
    cfg.weight_dtype = DType::F32;
    let x = random_hidden(9, h, DType::F32, 77).unwrap();
    let a = build(&cfg, &qw).forward(&x).unwrap();
    let b = build(&plain_cfg, &plain).forward(&x).unwrap();
    let err = rel_l2(a.as_f32().unwrap(), b.as_f32().unwrap());
    assert!(err < 1e-5, "{}: loaded block vs dequantized block: {err:e}", cfg.quant);
}

const P: &str = "model.layers.0.mlp.";

#[test]
fn deepseek_v3_fp8_block_checkpoint() {
    let (e, h, i) = (4, 256, 128);
    let mut m = Mini::new(json!({
        "model_type": "deepseek_v3", "hidden_size": h, "num_hidden_layers": 1, "n_routed_experts": e,
        "num_experts_per_tok": 2, "moe_intermediate_size": i, "n_group": 2, "topk_group": 1,
        "n_shared_experts": 1, "first_k_dense_replace": 0, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]}
    }));
    let mut g = rng(1);
    m.put(format!("{P}gate.weight"), bf16s(&[e, h], &normal(&mut g, e * h, 0.06)));
    m.put(format!("{P}gate.e_score_correction_bias"), f32s(&[e], &normal(&mut g, e, 0.05)));
    let (mut w13, mut w2) = (Vec::new(), Vec::new());
    let mut put_fp8 = |m: &mut Mini, name: String, rows: usize, cols: usize, sink: Option<&mut Vec<f32>>| {
        let w = normal(&mut g, rows * cols, 0.06);
        let (t, d) = quantize_one(&Fp8Block, &w, rows, cols);
        m.put(format!("{name}.weight"), bytes(Dtype::F8_E4M3, &[rows, cols], part_bytes(&t, "weight")));
        let s = t.parts["weight_scale_inv"].as_f32().unwrap().to_vec();
        m.put(format!("{name}.weight_scale_inv"), f32s(&[rows.div_ceil(128), cols.div_ceil(128)], &s));
        if let Some(sink) = sink {
            sink.extend(d);
        }
    };
    for ex in 0..e {
        put_fp8(&mut m, format!("{P}experts.{ex}.gate_proj"), i, h, Some(&mut w13));
        put_fp8(&mut m, format!("{P}experts.{ex}.up_proj"), i, h, Some(&mut w13));
        put_fp8(&mut m, format!("{P}experts.{ex}.down_proj"), h, i, Some(&mut w2));
    }
    for p in ["gate", "up"] {
        put_fp8(&mut m, format!("{P}shared_experts.{p}_proj"), i, h, None);
    }
    put_fp8(&mut m, format!("{P}shared_experts.down_proj"), h, i, None);
    m.write();
    let layer = m.load().unwrap();
    assert_eq!(layer.config.quant, QuantFormat::Fp8Block);
    assert_eq!(layer.weights.experts.w13.parts["weight_scale_inv"].shape(), &[e, 2, 2]);
    assert_eq!(dequant_all(&layer.weights.experts.w13), w13);
    assert_eq!(dequant_all(&layer.weights.experts.w2), w2);
    assert!(layer.weights.shared.is_some(), "the FP8 shared expert is dequantized");
    check_block(&layer, &w13, &w2);
}

#[test]
fn gpt_oss_mxfp4_checkpoint() {
    let (e, h, i) = (4, 128, 64);
    let mut m = Mini::new(json!({
        "model_type": "gpt_oss", "hidden_size": h, "num_hidden_layers": 1, "num_local_experts": e,
        "experts_per_token": 2, "intermediate_size": i, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4"}
    }));
    let mut g = rng(2);
    m.put(format!("{P}router.weight"), bf16s(&[e, h], &normal(&mut g, e * h, 0.08)));
    m.put(format!("{P}router.bias"), bf16s(&[e], &normal(&mut g, e, 0.1)));
    // Gate/up interleaved along the output rows, as GPT-OSS stores them.
    let gu = normal(&mut g, e * 2 * i * h, 0.08);
    let gu_t = Mxfp4.quantize(&gu, e, 2 * i, h).unwrap();
    let gu_d = dequant_all(&gu_t);
    m.put(
        format!("{P}experts.gate_up_proj_blocks"),
        bytes(Dtype::U8, &[e, 2 * i, h / 32, 16], part_bytes(&gu_t, "blocks")),
    );
    m.put(
        format!("{P}experts.gate_up_proj_scales"),
        bytes(Dtype::U8, &[e, 2 * i, h / 32], part_bytes(&gu_t, "scales")),
    );
    let dn = normal(&mut g, e * h * i, 0.1);
    let dn_t = Mxfp4.quantize(&dn, e, h, i).unwrap();
    m.put(format!("{P}experts.down_proj_blocks"), bytes(Dtype::U8, &[e, h, i / 32, 16], part_bytes(&dn_t, "blocks")));
    m.put(format!("{P}experts.down_proj_scales"), bytes(Dtype::U8, &[e, h, i / 32], part_bytes(&dn_t, "scales")));
    let bgu = normal(&mut g, e * 2 * i, 0.05);
    m.put(format!("{P}experts.gate_up_proj_bias"), f32s(&[e, 2 * i], &bgu));
    m.put(format!("{P}experts.down_proj_bias"), f32s(&[e, h], &normal(&mut g, e * h, 0.05)));
    m.write();
    let layer = m.load().unwrap();
    assert_eq!(layer.config.quant, QuantFormat::Mxfp4);
    // Canonical w13: gate rows (even on disk) then up rows (odd on disk).
    let mut want13 = Vec::new();
    for ex in 0..e {
        for half in 0..2 {
            for r in 0..i {
                let src = (ex * 2 * i + 2 * r + half) * h;
                want13.extend_from_slice(&gu_d[src..src + h]);
            }
        }
    }
    assert_eq!(dequant_all(&layer.weights.experts.w13), want13);
    let b13 = layer.weights.experts.b13.as_ref().unwrap().as_f32().unwrap();
    assert_eq!(b13[1], bgu[2], "bias de-interleaved like the weights");
    assert_eq!(b13[i], bgu[1]);
    check_block(&layer, &want13, &dequant_all(&dn_t));
}

fn qwen3_config(e: usize, h: usize, i: usize, quant: serde_json::Value) -> serde_json::Value {
    json!({
        "model_type": "qwen3_moe", "hidden_size": h, "num_hidden_layers": 1, "num_experts": e,
        "num_experts_per_tok": 2, "moe_intermediate_size": i, "norm_topk_prob": true,
        "torch_dtype": "bfloat16", "quantization_config": quant
    })
}

#[test]
fn modelopt_nvfp4_checkpoint_including_different_gate_and_up_global_scales() {
    let (e, h, i) = (4, 128, 64);
    let mut m = Mini::new(qwen3_config(e, h, i, json!({"quant_method": "modelopt", "quant_algo": "NVFP4"})));
    let mut g = rng(3);
    m.put(format!("{P}gate.weight"), bf16s(&[e, h], &normal(&mut g, e * h, 0.08)));
    let (mut w13, mut w2) = (Vec::new(), Vec::new());
    for ex in 0..e {
        for (p, rows, cols, scale) in [("gate", i, h, 0.08), ("up", i, h, 0.02), ("down", h, i, 0.1)] {
            let w = normal(&mut g, rows * cols, scale);
            let (t, d) = quantize_one(&Nvfp4, &w, rows, cols);
            let name = format!("{P}experts.{ex}.{p}_proj");
            m.put(format!("{name}.weight"), bytes(Dtype::U8, &[rows, cols / 2], part_bytes(&t, "weight")));
            m.put(
                format!("{name}.weight_scale"),
                bytes(Dtype::F8_E4M3, &[rows, cols / 16], part_bytes(&t, "weight_scale")),
            );
            m.put(format!("{name}.weight_scale_2"), f32s(&[], &t.parts["weight_scale_2"].as_f32().unwrap()[..1]));
            m.put(format!("{name}.input_scale"), f32s(&[], &[0.01 * (ex + 1) as f32]));
            if p == "down" {
                w2.extend(d)
            } else {
                w13.extend(d)
            }
        }
    }
    m.write();
    let layer = m.load().unwrap();
    assert_eq!(layer.config.quant, QuantFormat::Nvfp4);
    let t = &layer.weights.experts.w13;
    assert_eq!(t.parts["input_scale"].as_f32().unwrap(), &[0.01, 0.02, 0.03, 0.04]);
    assert_eq!(dequant_all(&layer.weights.experts.w2), w2, "down has one global scale: exact");
    // Gate (larger) keeps its scales; up's block scales are re-encoded against gate's global
    // scale: within an e4m3 rounding of the block scale.
    let got = dequant_all(t);
    let err = rel_l2(&got, &w13);
    assert!(err > 0.0 && err < 4e-2, "fused gate/up vs per-shard dequantization: {err}");
    check_block(&layer, &got, &w2);
}

/// Random int4 linear in checkpoint orientation: codes [in][out], zeros/scales [group][out].
struct Ints {
    q: Vec<Vec<u8>>,
    z: Vec<Vec<u8>>,
    s: Vec<Vec<f16>>,
}

impl Ints {
    fn random(g: &mut rand::rngs::StdRng, inp: usize, out: usize, sym: bool) -> Ints {
        Ints {
            q: (0..inp).map(|_| (0..out).map(|_| g.gen_range(0..16)).collect()).collect(),
            z: (0..inp / 128).map(|_| (0..out).map(|_| if sym { 8 } else { g.gen_range(1..16) }).collect()).collect(),
            s: (0..inp / 128).map(|_| (0..out).map(|_| f16::from_f32(g.gen_range(2e-3f32..1e-2))).collect()).collect(),
        }
    }

    /// `(out, in)` order.
    fn dequant(&self) -> Vec<f32> {
        let (inp, out) = (self.q.len(), self.q[0].len());
        let mut w = vec![0.0; out * inp];
        for o in 0..out {
            for i in 0..inp {
                w[o * inp + i] = (self.q[i][o] as f32 - self.z[i / 128][o] as f32) * self.s[i / 128][o].to_f32();
            }
        }
        w
    }

    fn scales(&self) -> Vec<f16> {
        self.s.iter().flatten().copied().collect()
    }
}

fn pack8(vals: impl Fn(usize) -> u32, order: &[usize; 8]) -> i32 {
    order.iter().enumerate().fold(0u32, |w, (n, &o)| w | (vals(o) << (4 * n))) as i32
}

#[test]
fn awq_and_gptq_checkpoints() {
    let (e, h, i) = (2, 256, 128);
    for method in ["awq", "gptq"] {
        let quant = if method == "awq" {
            json!({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true, "version": "gemm"})
        } else {
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false, "sym": true,
                   "checkpoint_format": "gptq"})
        };
        let mut m = Mini::new(qwen3_config(e, h, i, quant));
        let mut g = rng(4);
        m.put(format!("{P}gate.weight"), bf16s(&[e, h], &normal(&mut g, e * h, 0.08)));
        let (mut w13, mut w2) = (Vec::new(), Vec::new());
        let seq = [0, 1, 2, 3, 4, 5, 6, 7];
        for ex in 0..e {
            for (p, out, inp) in [("gate", i, h), ("up", i, h), ("down", h, i)] {
                let ints = Ints::random(&mut g, inp, out, method == "gptq");
                let name = format!("{P}experts.{ex}.{p}_proj");
                let groups = inp / 128;
                if method == "awq" {
                    let qw: Vec<i32> = (0..inp)
                        .flat_map(|r| (0..out / 8).map(move |c| (r, c)))
                        .map(|(r, c)| pack8(|o| ints.q[r][c * 8 + o] as u32, &AWQ_ORDER))
                        .collect();
                    let qz: Vec<i32> = (0..groups)
                        .flat_map(|gr| (0..out / 8).map(move |c| (gr, c)))
                        .map(|(gr, c)| pack8(|o| ints.z[gr][c * 8 + o] as u32, &AWQ_ORDER))
                        .collect();
                    m.put(format!("{name}.qweight"), i32s(&[inp, out / 8], &qw));
                    m.put(format!("{name}.qzeros"), i32s(&[groups, out / 8], &qz));
                } else {
                    let qw: Vec<i32> = (0..inp / 8)
                        .flat_map(|r| (0..out).map(move |o| (r, o)))
                        .map(|(r, o)| pack8(|n| ints.q[r * 8 + n][o] as u32, &seq))
                        .collect();
                    // v1 format: zeros stored minus one.
                    let qz: Vec<i32> = (0..groups)
                        .flat_map(|gr| (0..out / 8).map(move |c| (gr, c)))
                        .map(|(gr, c)| pack8(|o| ints.z[gr][c * 8 + o] as u32 - 1, &seq))
                        .collect();
                    m.put(format!("{name}.qweight"), i32s(&[inp / 8, out], &qw));
                    m.put(format!("{name}.qzeros"), i32s(&[groups, out / 8], &qz));
                    let gi: Vec<i32> = (0..inp).map(|c| (c / 128) as i32).collect();
                    m.put(format!("{name}.g_idx"), i32s(&[inp], &gi));
                }
                m.put(format!("{name}.scales"), f16s(&[groups, out], &ints.scales()));
                if p == "down" {
                    w2.extend(ints.dequant())
                } else {
                    w13.extend(ints.dequant())
                }
            }
        }
        m.write();
        let layer = m.load().unwrap();
        assert_eq!(layer.config.quant, QuantFormat::Int4Group, "{method}");
        let t = &layer.weights.experts.w13;
        assert_eq!(t.parts.contains_key("weight_zero_point"), method == "awq", "{method}: symmetric GPTQ drops zeros");
        assert!(!t.parts.contains_key("weight_g_idx"), "{method}: trivial g_idx dropped");
        assert_eq!(dequant_all(t), w13, "{method}");
        assert_eq!(dequant_all(&layer.weights.experts.w2), w2, "{method}");
        check_block(&layer, &w13, &w2);
    }
}

#[test]
fn fp8_per_tensor_checkpoint_fuses_gate_and_up_to_one_scale() {
    let (e, h, i) = (2, 64, 32);
    let mut m = Mini::new(qwen3_config(e, h, i, json!({"quant_method": "compressed-tensors"})));
    let mut g = rng(5);
    m.put(format!("{P}gate.weight"), bf16s(&[e, h], &normal(&mut g, e * h, 0.1)));
    let mut w13 = Vec::new();
    for ex in 0..e {
        for (p, rows, cols, sc) in [("gate", i, h, 1e-3f32), ("up", i, h, 4e-4), ("down", h, i, 5e-4)] {
            let q: Vec<u8> = (0..rows * cols).map(|_| f32_to_e4m3(g.gen_range(-400.0f32..400.0))).collect();
            let name = format!("{P}experts.{ex}.{p}_proj");
            if p != "down" {
                w13.extend(q.iter().map(|&b| e4m3_to_f32(b) * sc));
            }
            m.put(format!("{name}.weight"), bytes(Dtype::F8_E4M3, &[rows, cols], q));
            m.put(format!("{name}.weight_scale"), f32s(&[], &[sc]));
            m.put(format!("{name}.input_scale"), f32s(&[], &[0.1]));
        }
    }
    m.write();
    let layer = m.load().unwrap();
    assert_eq!(layer.config.quant, QuantFormat::Fp8Tensor);
    assert_eq!(layer.weights.experts.w13.parts["weight_scale"].as_f32().unwrap(), &[1e-3, 1e-3]);
    let err = rel_l2(&dequant_all(&layer.weights.experts.w13), &w13);
    assert!(err > 0.0 && err < 3e-2, "up requantized to gate's scale: {err}");
}

#[test]
fn bad_quantized_checkpoints_name_the_tensor() {
    let (e, h, i) = (2, 256, 128);
    // AWQ with group size 64.
    let mut m = Mini::new(qwen3_config(
        e,
        h,
        i,
        json!({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}),
    ));
    m.put(format!("{P}gate.weight"), bf16s(&[e, h], &vec![0.01; e * h]));
    for ex in 0..e {
        for (p, out, inp) in [("gate", i, h), ("up", i, h), ("down", h, i)] {
            let name = format!("{P}experts.{ex}.{p}_proj");
            m.put(format!("{name}.qweight"), i32s(&[inp, out / 8], &vec![0; inp * out / 8]));
            m.put(format!("{name}.qzeros"), i32s(&[inp / 64, out / 8], &vec![0; inp / 64 * out / 8]));
            m.put(format!("{name}.scales"), f16s(&[inp / 64, out], &vec![f16::ONE; inp / 64 * out]));
        }
    }
    m.write();
    let err = m.load().unwrap_err().to_string();
    assert!(err.contains("qweight") && err.contains("group size 64"), "{err}");

    // DeepSeek FP8 with a scale grid for 64-blocks and a NaN scale.
    for bad in ["grid", "nan"] {
        let mut m = Mini::new(json!({
            "model_type": "deepseek_v3", "hidden_size": h, "num_hidden_layers": 1, "n_routed_experts": e,
            "num_experts_per_tok": 2, "moe_intermediate_size": i, "n_group": 1, "topk_group": 1
        }));
        m.put(format!("{P}gate.weight"), bf16s(&[e, h], &vec![0.01; e * h]));
        m.put(format!("{P}gate.e_score_correction_bias"), f32s(&[e], &vec![0.0; e]));
        for ex in 0..e {
            for (p, rows, cols) in [("gate", i, h), ("up", i, h), ("down", h, i)] {
                let name = format!("{P}experts.{ex}.{p}_proj");
                m.put(format!("{name}.weight"), bytes(Dtype::F8_E4M3, &[rows, cols], vec![0x38; rows * cols]));
                let (rb, cb) =
                    if bad == "grid" && p == "down" { (rows / 64, cols / 64) } else { (rows / 128, cols / 128) };
                let mut s = vec![0.01f32; rb * cb];
                if bad == "nan" && ex == 1 && p == "up" {
                    s[0] = f32::NAN;
                }
                m.put(format!("{name}.weight_scale_inv"), f32s(&[rb, cb], &s));
            }
        }
        m.write();
        let err = m.load().unwrap_err();
        match bad {
            "grid" => {
                let s = err.to_string();
                assert!(s.contains("down_proj.weight_scale_inv") && s.contains("[2, 1]"), "{s}");
            }
            _ => assert!(matches!(&err, MoeError::Quant { reason, .. } if reason.contains("NaN")), "{err}"),
        }
    }
}
