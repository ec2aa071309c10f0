//! `moe run --checkpoint` end to end: the binary reproduces transformers' output for every golden
//! fixture (`tests/fixtures/`), with the reference backend and with the automatic choice.

use std::path::{Path, PathBuf};
use std::process::Command;

use moe_core::checkpoint::{read_tensor_file, take_tensor};
use moe_core::compare::rel_l2_tensors;
use moe_core::DType;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn moe(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moe")).args(args).output().expect("run the moe binary");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .flat_map(|e| ["f32", "bf16"].map(|d| e.as_ref().unwrap().path().join(d)))
        .filter(|d| d.join("fixture.json").exists())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn run_checkpoint_reproduces_transformers() {
    let tmp = std::env::temp_dir().join(format!("moe-cli-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let dirs = fixture_dirs();
    assert!(dirs.len() >= 29, "expected every family's fixtures, found {}", dirs.len());
    for dir in &dirs {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
        let layer = meta["layer"].as_u64().unwrap().to_string();
        let dtype = DType::parse_float(meta["dtype"].as_str().unwrap()).unwrap();
        let reference = read_tensor_file(&dir.join("reference.safetensors")).unwrap();
        let want = take_tensor(dir, &reference, "hidden_states").unwrap();
        for backend in ["reference", "auto"] {
            let out_path = tmp.join("out.safetensors");
            let _ = std::fs::remove_file(&out_path);
            let (ok, text) = moe(&[
                "run",
                "--checkpoint",
                dir.to_str().unwrap(),
                "--layer",
                &layer,
                "--input",
                dir.join("input.safetensors").to_str().unwrap(),
                "--output",
                out_path.to_str().unwrap(),
                "--save-routing",
                "--backend",
                backend,
            ]);
            assert!(ok, "{}: moe run failed:\n{text}", dir.display());
            let out = read_tensor_file(&out_path).unwrap();
            let got = take_tensor(&out_path, &out, "hidden_states").unwrap();
            assert_eq!(got.dtype(), dtype, "{}: output keeps the input dtype", dir.display());
            let err = rel_l2_tensors(&got, &want).unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(err < tol, "{} ({backend}): rel L2 {err:e} >= {tol:e}\n{text}", dir.display());
            let ids = take_tensor(&out_path, &out, "topk_ids").unwrap();
            let w = take_tensor(&out_path, &out, "topk_weights").unwrap();
            let k = take_tensor(dir, &reference, "topk_ids").unwrap().shape()[1];
            assert_eq!((ids.dtype(), ids.shape()), (DType::I32, &[16, k][..]));
            assert_eq!((w.dtype(), w.shape()), (DType::F32, &[16, k][..]));
            if dtype == DType::F32 {
                let sorted = |t: &moe_core::Tensor| -> Vec<Vec<i32>> {
                    t.as_i32()
                        .unwrap()
                        .chunks(k)
                        .map(|r| {
                            let mut r = r.to_vec();
                            r.sort();
                            r
                        })
                        .collect()
                };
                assert_eq!(
                    sorted(&ids),
                    sorted(&take_tensor(dir, &reference, "topk_ids").unwrap()),
                    "{}",
                    dir.display()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn run_checkpoint_without_input_times_a_random_input() {
    let dir = fixtures().join("qwen2_moe/bf16");
    let (ok, text) =
        moe(&["run", "--checkpoint", dir.to_str().unwrap(), "--tokens", "8", "--iters", "2", "--warmup", "1"]);
    assert!(ok, "{text}");
    assert!(text.contains("ms per forward of 8 random tokens") && text.contains("checksum:"), "{text}");
    assert!(text.contains("qwen2_moe") && text.contains("gated shared expert"), "{text}");
}

#[test]
fn run_checkpoint_reports_dense_layers_and_bad_inputs() {
    let dir = fixtures().join("deepseek_v3/f32");
    let (ok, text) = moe(&["run", "--checkpoint", dir.to_str().unwrap(), "--layer", "0"]);
    assert!(!ok && text.contains("layer 0 is not a MoE layer") && text.contains("first_k_dense_replace"), "{text}");
    // An input of the wrong hidden size names the file and tensor.
    let bad = std::env::temp_dir().join(format!("moe-cli-bad-input-{}.safetensors", std::process::id()));
    let x = moe_core::weights::random_hidden(4, 20, DType::F32, 3).unwrap();
    moe_core::checkpoint::write_tensor_file(&bad, &[("hidden_states", &x)]).unwrap();
    let (ok, text) = moe(&["run", "--checkpoint", dir.to_str().unwrap(), "--input", bad.to_str().unwrap()]);
    let _ = std::fs::remove_file(&bad);
    assert!(!ok && text.contains("hidden_states") && text.contains("expected [tokens, 32]"), "{text}");
}
