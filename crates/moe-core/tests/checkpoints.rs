//! Hugging Face checkpoints against transformers' own outputs (the golden fixtures under
//! `tests/fixtures/`, made by `python/fixtures/gen_fixtures.py`), and bad checkpoints that must
//! fail with errors naming the file and the tensor.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use moe_core::backend::reference::host_router_logits;
use moe_core::checkpoint::{read_tensor_file, take_tensor, write_tensor_file, Checkpoint};
use moe_core::compare::rel_l2_tensors;
use moe_core::config::{GroupMaskValue, RoutingConfig};
use moe_core::routing::route_host;
use moe_core::{BackendRegistry, BuildOptions, ConfigurableMoe, DType, Hardware, MoeConfig, MoeError, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Fixture {
    dir: PathBuf,
    layer: usize,
    dense_layer: Option<usize>,
    dtype: DType,
}

fn fixture(dir: PathBuf) -> Fixture {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
    Fixture {
        layer: meta["layer"].as_u64().unwrap() as usize,
        dense_layer: meta["dense_layer"].as_u64().map(|l| l as usize),
        dtype: DType::parse_float(meta["dtype"].as_str().unwrap()).unwrap(),
        dir,
    }
}

/// Every `tests/fixtures/<case>/<dtype>/` directory.
fn all_fixtures() -> Vec<Fixture> {
    let mut out = Vec::new();
    let mut cases: Vec<_> = std::fs::read_dir(fixtures()).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    for case in cases.into_iter().filter(|c| c.is_dir()) {
        for dt in ["f32", "bf16"] {
            if case.join(dt).join("fixture.json").exists() {
                out.push(fixture(case.join(dt)));
            }
        }
    }
    out
}

fn build(cfg: &MoeConfig) -> ConfigurableMoe {
    ConfigurableMoe::build(
        cfg.clone(),
        &BackendRegistry::with_reference(),
        &Hardware::cpu_only(),
        BuildOptions::default(),
    )
    .unwrap()
}

/// Per-row (id, weight) pairs sorted by id: transformers' routers use `topk(sorted=False)`.
fn sorted_rows(ids: &[i32], w: &[f32], k: usize) -> Vec<Vec<(i32, f32)>> {
    ids.chunks(k)
        .zip(w.chunks(k))
        .map(|(i, w)| {
            let mut r: Vec<(i32, f32)> = i.iter().copied().zip(w.iter().copied()).collect();
            r.sort_by_key(|p| p.0);
            r
        })
        .collect()
}

fn routing_of(cfg: &MoeConfig, ckpt_weights: &moe_core::MoeWeights, x: &Tensor) -> (Vec<i32>, Vec<f32>) {
    let logits = host_router_logits(cfg, &ckpt_weights.router, x).unwrap();
    let bias = ckpt_weights.router.correction_bias.as_ref().map(|b| b.to_f32_vec().unwrap());
    let topk = route_host(cfg, &logits, bias.as_deref()).unwrap();
    (topk.ids_host().unwrap().to_vec(), topk.weights_host().unwrap().to_vec())
}

#[test]
fn every_family_matches_transformers() {
    let fx = all_fixtures();
    // 8 families: 6 with a hub and a fused layout, GPT-OSS and Llama-4 with one; f32 and bf16;
    // plus the DeepSeek-V3 negative-bias case.
    assert!(fx.len() >= 29, "expected every family's fixtures, found {}", fx.len());
    let mut report = Vec::new();
    for f in &fx {
        let name = f.dir.strip_prefix(fixtures()).unwrap().display().to_string();
        let ckpt = Checkpoint::open(&f.dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut ticks = Vec::new();
        let loaded =
            ckpt.load_layer(f.layer, None, &mut |d, t| ticks.push((d, t))).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(loaded.config.weight_dtype, f.dtype, "{name}: dtype from config.json");
        let (last, total) = *ticks.last().unwrap();
        assert!(total > 0 && last == total && ticks.windows(2).all(|w| w[0].0 <= w[1].0), "{name}: progress");
        let input = read_tensor_file(&f.dir.join("input.safetensors")).unwrap();
        let x = take_tensor(&f.dir, &input, "hidden_states").unwrap();
        let reference = read_tensor_file(&f.dir.join("reference.safetensors")).unwrap();
        let want = take_tensor(&f.dir, &reference, "hidden_states").unwrap();

        let mut moe = build(&loaded.config);
        moe.load_weights(&loaded.weights).unwrap();
        let out = moe.forward(&x).unwrap();
        assert_eq!(out.dtype(), f.dtype);
        assert!(out.to_f32_vec().unwrap().iter().all(|v| v.is_finite()), "{name}: non-finite output");
        let err = rel_l2_tensors(&out, &want).unwrap();
        let tol = if f.dtype == DType::F32 { 1e-5 } else { 1e-2 };
        report.push(format!("{name}: rel L2 {err:.2e} ({})", loaded.layout.experts.describe()));
        assert!(err < tol, "{name}: rel L2 {err:e} >= {tol:e}");

        // Reload through the weight lifecycle: same output, bit for bit.
        moe.load_weights(&ckpt.load_layer(f.layer, None, &mut |_, _| {}).unwrap().weights).unwrap();
        let again = moe.forward(&x).unwrap();
        assert_eq!(again.to_f32_vec().unwrap(), out.to_f32_vec().unwrap(), "{name}: reload changed the output");

        let k = loaded.config.top_k;
        let (ids, w) = routing_of(&loaded.config, &loaded.weights, &x);
        let want_ids = take_tensor(&f.dir, &reference, "topk_ids").unwrap();
        let want_w = take_tensor(&f.dir, &reference, "topk_weights").unwrap().to_f32_vec().unwrap();
        let got = sorted_rows(&ids, &w, k);
        let exp = sorted_rows(want_ids.as_i32().unwrap(), &want_w, k);
        if f.dtype == DType::F32 {
            for (t, (g, e)) in got.iter().zip(&exp).enumerate() {
                let gi: Vec<i32> = g.iter().map(|p| p.0).collect();
                let ei: Vec<i32> = e.iter().map(|p| p.0).collect();
                assert_eq!(gi, ei, "{name}: token {t} routed to different experts");
                for (a, b) in g.iter().zip(e) {
                    assert!((a.1 - b.1).abs() <= 1e-5 * b.1.abs().max(1.0), "{name}: token {t} weights {g:?} vs {e:?}");
                }
            }
        }
        if let Some(d) = f.dense_layer {
            let e = ckpt.load_layer(d, None, &mut |_, _| {}).unwrap_err();
            assert!(matches!(e, MoeError::NotMoeLayer { layer, .. } if layer == d), "{name}: {e}");
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn deepseek_v3_masking_conventions() {
    let f = fixture(fixtures().join("deepseek_v3_negbias/f32"));
    let ckpt = Checkpoint::open(&f.dir).unwrap();
    let loaded = ckpt.load_layer(f.layer, None, &mut |_, _| {}).unwrap();
    // transformers 5.x masks losing groups with -inf; the loader picks that convention.
    assert!(matches!(loaded.config.routing, RoutingConfig::DeepseekV3 { group_mask: GroupMaskValue::NegInf, .. }));
    let x = take_tensor(&f.dir, &read_tensor_file(&f.dir.join("input.safetensors")).unwrap(), "hidden_states").unwrap();
    let reference = read_tensor_file(&f.dir.join("reference.safetensors")).unwrap();
    let k = loaded.config.top_k;
    let ids_of = |name: &str| {
        let w = take_tensor(&f.dir, &reference, name.replace("ids", "weights").as_str()).unwrap().to_f32_vec().unwrap();
        sorted_rows(take_tensor(&f.dir, &reference, name).unwrap().as_i32().unwrap(), &w, k)
    };
    let ids_only =
        |rows: &[Vec<(i32, f32)>]| -> Vec<Vec<i32>> { rows.iter().map(|r| r.iter().map(|p| p.0).collect()).collect() };
    let (hf, zero) = (ids_only(&ids_of("topk_ids")), ids_only(&ids_of("topk_ids_zero_mask")));
    assert_ne!(hf, zero, "the fixture must make the conventions disagree");

    let (ids, w) = routing_of(&loaded.config, &loaded.weights, &x);
    assert_eq!(ids_only(&sorted_rows(&ids, &w, k)), hf, "-inf masking must match transformers");
    let mut zcfg = loaded.config.clone();
    if let RoutingConfig::DeepseekV3 { group_mask, .. } = &mut zcfg.routing {
        *group_mask = GroupMaskValue::Zero;
    }
    let (zids, zw) = routing_of(&zcfg, &loaded.weights, &x);
    let zrows = sorted_rows(&zids, &zw, k);
    assert_eq!(ids_only(&zrows), zero, "0.0 masking must match the 0.0-mask reference");
    for (g, e) in zrows.iter().zip(ids_of("topk_ids_zero_mask")) {
        for (a, b) in g.iter().zip(&e) {
            assert!((a.1 - b.1).abs() < 1e-5, "zero-mask weights {g:?} vs {e:?}");
        }
    }
}

// ---- bad checkpoints ----

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh copy of a fixture in a temp dir (removed on drop).
struct TempCopy(PathBuf);

impl TempCopy {
    fn of(case: &str) -> TempCopy {
        let dir = std::env::temp_dir().join(format!(
            "moe-ckpt-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(fixtures().join(case)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
        TempCopy(dir)
    }

    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let p = self.0.join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    }

    fn load(&self, layer: usize) -> String {
        match Checkpoint::open(&self.0).and_then(|c| c.load_layer(layer, None, &mut |_, _| {})) {
            Ok(_) => panic!("loading {} should fail", self.0.display()),
            Err(e) => e.to_string(),
        }
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rewrites `model.safetensors` keeping tensors for which `keep` is true, transformed by `map`.
fn rewrite(dir: &Path, keep: impl Fn(&str) -> bool) {
    let p = dir.join("model.safetensors");
    let all = read_tensor_file(&p).unwrap();
    let kept: Vec<(&str, &Tensor)> = all.iter().filter(|(n, _)| keep(n)).map(|(n, t)| (n.as_str(), t)).collect();
    write_tensor_file(&p, &kept).unwrap();
}

#[test]
fn missing_expert_names_the_tensor() {
    let t = TempCopy::of("mixtral/f32");
    rewrite(&t.0, |n| n != "model.layers.1.block_sparse_moe.experts.5.w3.weight");
    let e = t.load(1);
    assert!(
        e.contains("model.layers.1.block_sparse_moe.experts.5.w3.weight") && e.contains("missing expert 5 of 8"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_file_and_tensor() {
    let t = TempCopy::of("qwen2_moe_fused/f32");
    t.edit_config(|v| v["moe_intermediate_size"] = 8.into());
    let e = t.load(1);
    assert!(e.contains("model.safetensors") && e.contains("experts.gate_up_proj") && e.contains("wrong shape"), "{e}");
    let t = TempCopy::of("olmoe/f32");
    t.edit_config(|v| v["hidden_size"] = 48.into());
    let e = t.load(1);
    assert!(e.contains("model.layers.1.mlp.gate.weight") && e.contains("expected [8, 48]"), "{e}");
}

#[test]
fn truncated_file_is_reported() {
    let t = TempCopy::of("gpt_oss/f32");
    let p = t.0.join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 1000).unwrap();
    let e = t.load(1);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    f.set_len(5).unwrap();
    let e = t.load(1);
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn index_pointing_to_a_missing_shard() {
    let t = TempCopy::of("qwen3_moe/f32");
    std::fs::remove_file(t.0.join("model-00003-of-00003.safetensors")).unwrap();
    let e = t.load(1);
    assert!(
        e.contains("model-00003-of-00003.safetensors")
            && e.contains("tensor `model.layers.1.mlp.")
            && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn unsupported_model_type_and_dense_layers() {
    let t = TempCopy::of("mixtral/f32");
    t.edit_config(|v| v["model_type"] = "bert".into());
    let e = t.load(1);
    assert!(e.contains("config.json") && e.contains("unsupported model_type `bert`") && e.contains("mixtral"), "{e}");
    let t = TempCopy::of("deepseek_v2/f32");
    let e = t.load(0);
    assert!(e.contains("layer 0 is not a MoE layer") && e.contains("first_k_dense_replace"), "{e}");
    let e = t.load(7);
    assert!(e.contains("layer 7 does not exist"), "{e}");
}

#[test]
fn unsupported_dtype_and_quantized_tensors() {
    // An int8 expert tensor (a quantized payload without its scales).
    let t = TempCopy::of("olmoe/f32");
    let p = t.0.join("model.safetensors");
    let all = read_tensor_file(&p).unwrap();
    let bad = Tensor::from_host(vec![16, 32], moe_core::tensor::HostData::U8(vec![7; 512])).unwrap();
    let mut v: Vec<(&str, &Tensor)> = all.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let name = "model.layers.1.mlp.experts.2.up_proj.weight";
    v.iter_mut().filter(|(n, _)| *n == name).for_each(|p| p.1 = &bad);
    write_tensor_file(&p, &v).unwrap();
    let e = t.load(1);
    assert!(e.contains(name) && e.contains("unsupported dtype U8"), "{e}");

    // FP8 block scales next to the experts: the error names the format and the tensor.
    let t = TempCopy::of("deepseek_v3/f32");
    let p = t.0.join("model.safetensors");
    let all = read_tensor_file(&p).unwrap();
    let scale = Tensor::from_f32(vec![1, 1], vec![1.0]).unwrap();
    let mut v: Vec<(&str, &Tensor)> = all.iter().map(|(n, t)| (n.as_str(), t)).collect();
    v.push(("model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv", &scale));
    write_tensor_file(&p, &v).unwrap();
    let e = t.load(1);
    // The FP8 loader (or, in a build without it, the quantized-checkpoint error) names the
    // format and the tensor; a bare scale beside f32 weights is not a loadable FP8 block.
    assert!(e.contains("experts.0.gate_proj") && e.to_lowercase().contains("fp8"), "{e}");
}

#[test]
fn weights_convert_to_the_requested_dtype() {
    let f = fixture(fixtures().join("llama4/bf16"));
    let ckpt = Checkpoint::open(&f.dir).unwrap();
    let as_f32 = ckpt.load_layer(f.layer, Some(DType::F32), &mut |_, _| {}).unwrap();
    let as_bf16 = ckpt.load_layer(f.layer, None, &mut |_, _| {}).unwrap();
    assert_eq!(as_f32.config.weight_dtype, DType::F32);
    assert_eq!(as_f32.weights.experts.w13.part("weight").unwrap().dtype(), DType::F32);
    assert_eq!(as_bf16.weights.experts.w13.part("weight").unwrap().dtype(), DType::BF16);
    // bf16 -> f32 is exact.
    let a = as_f32.weights.experts.w13.part("weight").unwrap().to_f32_vec().unwrap();
    let b = as_bf16.weights.experts.w13.part("weight").unwrap().to_f32_vec().unwrap();
    assert_eq!(a, b);
}

/// Runs `dir`'s layer 1 on the fixture input of `case` and returns the rel L2 error vs transformers.
fn error_vs_fixture(dir: &Path, case: &str, dtype: Option<DType>) -> f64 {
    let f = fixture(fixtures().join(case));
    let loaded = Checkpoint::open(dir).unwrap().load_layer(f.layer, dtype, &mut |_, _| {}).unwrap();
    let x = take_tensor(&f.dir, &read_tensor_file(&f.dir.join("input.safetensors")).unwrap(), "hidden_states").unwrap();
    let want =
        take_tensor(&f.dir, &read_tensor_file(&f.dir.join("reference.safetensors")).unwrap(), "hidden_states").unwrap();
    let mut moe = build(&loaded.config);
    moe.load_weights(&loaded.weights).unwrap();
    rel_l2_tensors(&moe.forward(&x.to_dtype(loaded.config.act_dtype).unwrap()).unwrap(), &want).unwrap()
}

#[test]
fn multimodal_llama4_wrapper() {
    // `model_type: llama4` keeps the text model in `text_config` and prefixes `language_model.model.`.
    let t = TempCopy::of("llama4/f32");
    t.edit_config(|v| {
        let text = v.clone();
        *v = serde_json::json!({"model_type": "llama4", "text_config": text, "vision_config": {}});
    });
    let p = t.0.join("model.safetensors");
    let all = read_tensor_file(&p).unwrap();
    let renamed: Vec<(String, &Tensor)> =
        all.iter().map(|(n, t)| (n.replacen("model.", "language_model.model.", 1), t)).collect();
    write_tensor_file(&p, &renamed.iter().map(|(n, t)| (n.as_str(), *t)).collect::<Vec<_>>()).unwrap();
    let err = error_vs_fixture(&t.0, "llama4/f32", None);
    assert!(err < 1e-5, "rel L2 {err:e}");
}

#[test]
fn f16_weights_on_disk() {
    let t = TempCopy::of("qwen2_moe/f32");
    let p = t.0.join("model.safetensors");
    let all = read_tensor_file(&p).unwrap();
    let half: Vec<(String, Tensor)> = all.iter().map(|(n, t)| (n.clone(), t.to_dtype(DType::F16).unwrap())).collect();
    write_tensor_file(&p, &half.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>()).unwrap();
    t.edit_config(|v| v["dtype"] = "float16".into());
    // f16 weights computed in f32: the only error is the weights' rounding.
    let err = error_vs_fixture(&t.0, "qwen2_moe/f32", Some(DType::F32));
    assert!(err < 5e-3 && err > 0.0, "rel L2 {err:e}");
    let ckpt = Checkpoint::open(&t.0).unwrap();
    assert_eq!(ckpt.moe_config(1, None).unwrap().weight_dtype, DType::F16);
}
