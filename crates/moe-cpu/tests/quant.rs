//! Quantized experts on the `cpu` backend against `reference` (which dequantizes to f32): every
//! format x families with biases, shared experts and input-side routing weights, every
//! instruction set this machine runs, 0/1/odd token counts, poisoned workspaces, expert-parallel
//! slot ranges and EPLB slot replacement. Both sides hold the same quantized weights, so the
//! tolerance is that of f32 (or bf16) compute, far tighter than the formats' own error.

use moe_core::backend::reference::ReferenceBackend;
use moe_core::backend::{BackendProvider, ExpertBackend, Hardware, LocalWeights, SlotRange};
use moe_core::compare::rel_l2_tensors;
use moe_core::config::SharedExpertConfig;
use moe_core::quant::{quant_method, ExpertTensor, Int4Group, QuantMethod};
use moe_core::weights::random_hidden;
use moe_core::{
    Activation, BackendRegistry, BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeWeights, ParallelConfig,
    QuantFormat, RoutingConfig, Tensor,
};
use moe_cpu::{CpuBackend, CpuProvider, Isa};

struct PinnedCpu(Isa);

impl BackendProvider for PinnedCpu {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn priority(&self) -> i32 {
        10
    }
    fn description(&self) -> &'static str {
        "cpu pinned to one ISA (tests)"
    }
    fn can_implement(&self, cfg: &MoeConfig, hw: &Hardware) -> std::result::Result<(), String> {
        CpuProvider.can_implement(cfg, hw)
    }
    fn create(&self, cfg: &MoeConfig, _hw: &Hardware) -> moe_core::Result<Box<dyn ExpertBackend>> {
        Ok(Box::new(CpuBackend::new(cfg.clone(), self.0)))
    }
}

/// Held by the tests that flip the process-wide `moe_cpu::tuning` switches and by the one that
/// compares bits across instances: a switch flipped between its two forwards changes rounding.
static TUNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tuning_lock() -> std::sync::MutexGuard<'static, ()> {
    TUNING.lock().unwrap_or_else(|e| e.into_inner())
}

fn formats() -> Vec<QuantFormat> {
    QuantFormat::ALL.into_iter().filter(|f| *f != QuantFormat::None).collect()
}

/// `cfg` with random weights whose experts are quantized with `m`.
fn quantized(cfg: &MoeConfig, m: &dyn QuantMethod, seed: u64) -> (MoeConfig, MoeWeights) {
    let mut plain = cfg.clone();
    plain.quant = QuantFormat::None;
    let mut w = MoeWeights::random(&plain, seed).unwrap();
    let p = quant_method(QuantFormat::None, cfg.weight_dtype).unwrap();
    let q = |t: &ExpertTensor| {
        let f: Vec<f32> = (0..t.experts).flat_map(|e| p.dequantize_expert(t, e).unwrap()).collect();
        m.quantize(&f, t.experts, t.rows, t.cols).unwrap()
    };
    w.experts.w13 = q(&w.experts.w13);
    w.experts.w2 = q(&w.experts.w2);
    let mut c = cfg.clone();
    c.quant = m.format();
    w.validate(&c).unwrap();
    (c, w)
}

fn families(h: usize, i: usize, dtype: DType) -> Vec<(&'static str, MoeConfig)> {
    let mut base = MoeConfig::new(8, 2, h, i);
    base.weight_dtype = dtype;
    base.act_dtype = dtype;
    let mut gpt = base.clone();
    gpt.routing = RoutingConfig::GptOss;
    gpt.activation = Activation::GPT_OSS;
    gpt.router_bias = true;
    gpt.expert_bias = true;
    let mut llama = base.clone();
    llama.routing = RoutingConfig::Llama4;
    llama.top_k = 1;
    llama.shared_expert = Some(SharedExpertConfig { intermediate_size: i, gated: false });
    let mut qwen2 = base.clone();
    qwen2.shared_expert = Some(SharedExpertConfig { intermediate_size: 128, gated: true });
    vec![("softmax", base), ("gpt-oss", gpt), ("llama4", llama), ("qwen2-shared", qwen2)]
}

fn compare(cfg: &MoeConfig, w: &MoeWeights, isa: Isa, tokens: usize, seed: u64) -> f64 {
    let hw = Hardware::cpu_only();
    let mut registry = BackendRegistry::with_reference();
    registry.register(Box::new(PinnedCpu(isa)));
    let x = random_hidden(tokens, cfg.hidden_size, cfg.act_dtype, seed).unwrap();
    let opts = |b: &str| BuildOptions { backend: b.into(), ..Default::default() };
    let mut rcfg = cfg.clone();
    rcfg.act_dtype = DType::F32;
    let mut r = ConfigurableMoe::build(rcfg, &registry, &hw, opts("reference")).unwrap();
    r.load_weights(w).unwrap();
    let want = r.forward(&x.to_dtype(DType::F32).unwrap()).unwrap();
    let mut c = ConfigurableMoe::build(cfg.clone(), &registry, &hw, opts("cpu")).unwrap();
    assert_eq!(c.backend_name(), "cpu");
    c.load_weights(w).unwrap();
    let got = c.forward(&x).unwrap();
    assert_eq!(got.shape(), &[tokens, cfg.hidden_size]);
    rel_l2_tensors(&got, &want).unwrap()
}

#[test]
fn can_implement_accepts_every_format() {
    for f in formats() {
        let mut c = MoeConfig::new(8, 2, 256, 128);
        c.quant = f;
        CpuProvider.can_implement(&c, &Hardware::cpu_only()).unwrap();
    }
}

#[test]
fn every_format_and_family_matches_reference() {
    for f in formats() {
        for (name, cfg) in families(256, 128, DType::F32) {
            let (c, w) = quantized(&cfg, quant_method(f, DType::F32).unwrap().as_ref(), 3);
            for tokens in [0, 1, 37] {
                let err = compare(&c, &w, Isa::best(), tokens, 11 + tokens as u64);
                assert!(err < 1e-5, "{f} {name} T={tokens}: rel L2 {err:e}");
            }
        }
    }
}

#[test]
fn every_isa_with_bf16_activations_and_zero_points() {
    let _tuning = tuning_lock();
    let act0 = moe_cpu::tuning::int4_act();
    let decode0 = if moe_cpu::tuning::quant_decode() { moe_cpu::tuning::quant_decode_splits() } else { 0 };
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        for (m, label) in [
            (Box::new(Int4Group::with_zero_points()) as Box<dyn QuantMethod>, "int4 zero points"),
            (quant_method(QuantFormat::Mxfp4, DType::BF16).unwrap(), "mxfp4"),
            (quant_method(QuantFormat::Nvfp4, DType::BF16).unwrap(), "nvfp4"),
            (quant_method(QuantFormat::Int8Channel, DType::BF16).unwrap(), "int8"),
            (quant_method(QuantFormat::Fp8Block, DType::BF16).unwrap(), "fp8-block"),
        ] {
            // hidden 384 / intermediate 128: three int4 groups, a partial FP8 block row.
            for (name, cfg) in families(384, 128, DType::BF16).into_iter().take(2) {
                let (c, w) = quantized(&cfg, m.as_ref(), 5);
                // int4 rows at decode sizes: two-byte int8 activations through the two-step
                // decode path and through the general one, and bf16 activations (the switches
                // change speed and rounding only, so tests running meanwhile stay correct).
                for (int4_act, decode) in [(2, 1), (2, 4), (2, 0), (0, 1)] {
                    moe_cpu::tuning::set_int4_act(int4_act);
                    moe_cpu::tuning::set_quant_decode(decode);
                    for tokens in [1, 9] {
                        let err = compare(&c, &w, isa, tokens, 2);
                        assert!(
                            err < 1e-2,
                            "{label} {name} {isa:?} T={tokens} int4 act {int4_act} decode {decode}: rel L2 {err:e}"
                        );
                    }
                }
                moe_cpu::tuning::set_int4_act(act0);
                moe_cpu::tuning::set_quant_decode(decode0);
            }
        }
    }
}

#[test]
fn gptq_act_order_runs_on_cpu() {
    let (c, mut w) = quantized(&MoeConfig::new(4, 2, 256, 128), &Int4Group::with_zero_points(), 8);
    // A g_idx interleaving the groups (what desc_act produces), the same for every expert.
    for t in [&mut w.experts.w13, &mut w.experts.w2] {
        let g: Vec<i32> = (0..t.experts * t.cols).map(|i| ((i % t.cols) % (t.cols / 128)) as i32).collect();
        t.parts.insert("weight_g_idx".into(), Tensor::from_i32(vec![t.experts, t.cols], g).unwrap());
    }
    w.validate(&c).unwrap();
    let err = compare(&c, &w, Isa::best(), 7, 1);
    assert!(err < 1e-5, "{err:e}");
}

fn backend(cfg: &MoeConfig, w: &MoeWeights, slots: SlotRange) -> CpuBackend {
    let mut b = CpuBackend::new(cfg.clone(), Isa::best());
    b.create_weights(slots).unwrap();
    let ids: Vec<usize> = (slots.start..slots.start + slots.count).collect();
    let lw = LocalWeights {
        router: w.router.clone(),
        experts: w.experts.select_experts(&ids).unwrap(),
        shared: w.shared.clone(),
    };
    b.load_weights(&lw).unwrap();
    b.post_load().unwrap();
    b
}

#[test]
fn poisoned_workspaces_expert_parallel_slots_and_slot_replacement() {
    let mut cfg = MoeConfig::new(8, 2, 256, 128);
    cfg.shared_expert = Some(SharedExpertConfig { intermediate_size: 64, gated: true });
    let (c, w) = quantized(&cfg, &Int4Group::symmetric(), 4);
    let mut reference = ReferenceBackend::new(c.clone());
    reference.create_weights(SlotRange::for_config(&c)).unwrap();
    reference
        .load_weights(&LocalWeights { router: w.router.clone(), experts: w.experts.clone(), shared: w.shared.clone() })
        .unwrap();
    reference.post_load().unwrap();
    let run = |b: &mut dyn ExpertBackend, x: &Tensor| {
        let logits = b.router_logits(x).unwrap();
        let topk = b.route(&logits).unwrap().into_identity_slots();
        let input = b.quantize_input(x).unwrap();
        b.run_moe(&input, &topk).unwrap()
    };
    // Two ranks of four slots each sum to the full answer; workspaces poisoned between forwards.
    let big = random_hidden(50, 256, DType::F32, 1).unwrap();
    let x = random_hidden(6, 256, DType::F32, 2).unwrap();
    let want = run(&mut reference, &x);
    let mut sum = vec![0.0f32; 6 * 256];
    for rank in 0..2 {
        let mut c2 = c.clone();
        c2.parallel = ParallelConfig { ep_size: 2, ep_rank: rank };
        let mut b = backend(&c2, &w, SlotRange::for_config(&c2));
        run(&mut b, &big);
        b.poison_workspaces();
        let part = run(&mut b, &x).to_f32_vec().unwrap();
        assert!(part.iter().all(|v| v.is_finite()));
        sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
    }
    let err = moe_core::compare::rel_l2(&sum, want.as_f32().unwrap());
    assert!(err < 1e-5, "EP halves vs reference: {err:e}");
    // Slot 3 replaced by expert 6: equal to a backend loaded with that placement.
    let mut b = backend(&c, &w, SlotRange::for_config(&c));
    b.replace_slot(3, &w.experts, 6).unwrap();
    let mut placed = w.clone();
    placed.experts = w.experts.select_experts(&[0, 1, 2, 6, 4, 5, 6, 7]).unwrap();
    let mut expect = backend(&c, &placed, SlotRange::for_config(&c));
    let (a, e) = (run(&mut b, &x), run(&mut expect, &x));
    assert_eq!(a.as_f32().unwrap(), e.as_f32().unwrap());
    assert!(b.kernel_name().contains("quantized"));
    assert!(b.packed_bytes() < 8 * 3 * 256 * 128, "int4 experts take well under a byte per weight");
}

#[test]
fn dequantized_bf16_tiles_on_both_sides_of_the_switch() {
    // bf16 activations, 4 experts: T = 3 leaves experts empty or with 1-3 rows (register paths),
    // T = 17 puts experts on both sides of the tile switch (5 rows), T = 45
    // gives every expert 20+ rows (tile path: several 8-row tiles and a partial one).
    // FP8 / int8 with intermediate 200 and 131: ragged and odd K chunks of the down projection,
    // gate_up's 400 / 262 output rows end in a partial 32-row block.
    let cases: Vec<(Box<dyn QuantMethod>, &str, usize)> = vec![
        (Box::new(Int4Group::with_zero_points()), "int4 zero points", 128),
        (Box::new(Int4Group::symmetric()), "int4", 256),
        (quant_method(QuantFormat::Mxfp4, DType::BF16).unwrap(), "mxfp4", 128),
        (quant_method(QuantFormat::Nvfp4, DType::BF16).unwrap(), "nvfp4", 144),
        (quant_method(QuantFormat::Int8Channel, DType::BF16).unwrap(), "int8", 131),
        (quant_method(QuantFormat::Fp8Block, DType::BF16).unwrap(), "fp8-block", 200),
        (quant_method(QuantFormat::Fp8Tensor, DType::BF16).unwrap(), "fp8-tensor", 131),
    ];
    for (m, label, inter) in cases {
        let mut cfg = MoeConfig::new(4, 2, 384, inter);
        cfg.weight_dtype = DType::BF16;
        cfg.act_dtype = DType::BF16;
        let (c, w) = quantized(&cfg, m.as_ref(), 6);
        for tokens in [3, 17, 45] {
            let err = compare(&c, &w, Isa::best(), tokens, 7 + tokens as u64);
            assert!(err < 1e-2, "{label} T={tokens}: rel L2 {err:e}");
        }
        if label == "nvfp4" {
            // Unfolded E2M1 (16-input panels, scaled per group) only runs when forced; the
            // switch changes speed only, so other tests running meanwhile stay correct.
            let _tuning = tuning_lock();
            moe_cpu::tuning::set_quant_tile_rows(2);
            let err = compare(&c, &w, Isa::best(), 45, 3);
            moe_cpu::tuning::set_quant_tile_rows(0);
            assert!(err < 1e-2, "{label} forced tiles: rel L2 {err:e}");
        }
    }
}

#[test]
fn integer_tiles_on_both_sides_of_the_switch() {
    // int4, int8 and E2M1 stacks on both projections, 4 experts: T = 17
    // puts experts on both sides of the tile switch, T = 45 gives every expert 20+ rows. The
    // integer tiles (int8 activations, two bytes or one) against the bf16 tiles on the same
    // weights; where the CPU has no VNNI every setting runs the bf16 tiles or rows.
    let _tuning = tuning_lock();
    let (act0, decode0) = (moe_cpu::tuning::int4_act(), moe_cpu::tuning::quant_decode_splits());
    let cases: Vec<(Box<dyn QuantMethod>, &str)> = vec![
        (Box::new(Int4Group::with_zero_points()), "int4 zero points"),
        (Box::new(Int4Group::symmetric()), "int4"),
        (quant_method(QuantFormat::Int8Channel, DType::BF16).unwrap(), "int8"),
        (quant_method(QuantFormat::Mxfp4, DType::BF16).unwrap(), "mxfp4"),
        (quant_method(QuantFormat::Nvfp4, DType::BF16).unwrap(), "nvfp4"),
    ];
    // 384 / 256: whole 128-input groups; 320 / 160 (int4 needs whole groups): a last group of
    // 64 / 32 inputs, padded, as gpt-oss-20b's 2880 has.
    let shapes = |label: &str| if label.starts_with("int4") { vec![(384, 256)] } else { vec![(384, 256), (320, 160)] };
    for (m, label) in cases {
        for (name, cfg) in shapes(label).into_iter().flat_map(|(h, i)| families(h, i, DType::BF16).into_iter().take(2))
        {
            let mut cfg = cfg;
            cfg.num_experts = 4;
            let (c, w) = quantized(&cfg, m.as_ref(), 8);
            for tokens in [17, 45] {
                // (integer tiles, activation bytes, bound): one byte rounds to 1/254 of a
                // group's largest value, coarser than bf16.
                for (int_tiles, act, bound) in [(0, 2, 1e-2), (1, 2, 1e-2), (1, 1, 3e-2)] {
                    moe_cpu::tuning::set_quant_int_tiles(int_tiles);
                    moe_cpu::tuning::set_int4_act(act);
                    let err = compare(&c, &w, Isa::best(), tokens, 9 + tokens as u64);
                    assert!(err < bound, "{label} {name} T={tokens} int tiles {int_tiles} act {act}: rel L2 {err:e}");
                }
            }
        }
    }
    moe_cpu::tuning::set_quant_int_tiles(2);
    moe_cpu::tuning::set_int4_act(act0);
    moe_cpu::tuning::set_quant_decode(decode0);
}

#[test]
fn fp8_dispatched_activations_match_reference_on_the_same_payload() {
    // Post-quant dispatch hands run_moe the FP8 wire form (e4m3 bytes + per-token-group scales);
    // cpu dequantizes it as reference does, so both agree to f32 compute on that payload.
    use moe_core::quant::activation::{quantize_fp8_input, ActScaling};
    for (quant, scaling) in [
        (QuantFormat::None, ActScaling::PerTokenGroup),
        (QuantFormat::Fp8Block, ActScaling::PerTokenGroup),
        (QuantFormat::Int4Group, ActScaling::PerToken),
    ] {
        let cfg = MoeConfig::new(8, 2, 256, 128);
        let (c, w) = match quant {
            QuantFormat::None => (cfg.clone(), MoeWeights::random(&cfg, 3).unwrap()),
            f => quantized(&cfg, quant_method(f, DType::F32).unwrap().as_ref(), 3),
        };
        let mut reference = ReferenceBackend::new(c.clone());
        reference.create_weights(SlotRange::for_config(&c)).unwrap();
        reference
            .load_weights(&LocalWeights { router: w.router.clone(), experts: w.experts.clone(), shared: None })
            .unwrap();
        reference.post_load().unwrap();
        let mut cpu = backend(&c, &w, SlotRange::for_config(&c));
        for tokens in [0, 1, 19] {
            let x = random_hidden(tokens, 256, DType::F32, 40 + tokens as u64).unwrap();
            let logits = reference.router_logits(&x).unwrap();
            let topk = reference.route(&logits).unwrap().into_identity_slots();
            let input = quantize_fp8_input(&x, scaling).unwrap();
            assert!(input.scales.is_some());
            let want = reference.run_moe(&input, &topk).unwrap();
            let got = cpu.run_moe(&input, &topk).unwrap();
            assert_eq!(got.shape(), &[tokens, 256]);
            let err = rel_l2_tensors(&got, &want).unwrap();
            assert!(err < 1e-5 || tokens == 0, "{quant} T={tokens}: rel L2 {err:e}");
        }
    }
}

#[test]
fn one_instance_across_token_counts_gives_the_bits_of_fresh_ones() {
    // run_moe hands its kernels a reused output buffer (the previous forward's values still in
    // it): every path, the int4 decode path that adds into its output included, must overwrite it.
    let _tuning = tuning_lock();
    let hw = Hardware::cpu_only();
    let mut registry = BackendRegistry::with_reference();
    registry.register(Box::new(PinnedCpu(Isa::best())));
    let opts = || BuildOptions { backend: "cpu".into(), ..Default::default() };
    for f in formats() {
        for (name, cfg) in families(256, 256, DType::BF16) {
            let (cfg, w) = quantized(&cfg, quant_method(f, cfg.weight_dtype).unwrap().as_ref(), 3);
            let mut long_lived = ConfigurableMoe::build(cfg.clone(), &registry, &hw, opts()).unwrap();
            long_lived.load_weights(&w).unwrap();
            for (i, tokens) in [1, 2, 1, 5, 0, 1, 40, 1].into_iter().enumerate() {
                let x = random_hidden(tokens, cfg.hidden_size, cfg.act_dtype, 60 + i as u64).unwrap();
                let mut fresh = ConfigurableMoe::build(cfg.clone(), &registry, &hw, opts()).unwrap();
                fresh.load_weights(&w).unwrap();
                let want = fresh.forward(&x).unwrap().to_f32_vec().unwrap();
                let got = long_lived.forward(&x).unwrap().to_f32_vec().unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{f} {name} T = {tokens} (forward {i})");
            }
        }
    }
}
