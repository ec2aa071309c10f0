//! The `cpu` backend against `reference` (relative L2, DESIGN.md tolerances) across routing x
//! activation x dtype, every instruction set this machine runs, token counts 0, 1 and odd ones,
//! empty experts, shared experts, biases, expert-parallel slot ranges, poisoned workspaces and
//! EPLB slot replacement.

use moe_core::backend::reference::ReferenceBackend;
use moe_core::backend::{BackendProvider, ExpertBackend, Hardware, LocalWeights, SlotRange};
use moe_core::compare::{rel_l2_tensors, tolerance};
use moe_core::config::{GroupMaskValue, SharedExpertConfig, V2TopkMethod};
use moe_core::weights::random_hidden;
use moe_core::{
    Activation, BackendRegistry, BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeWeights, ParallelConfig, Result,
    RoutingConfig, Tensor,
};
use moe_cpu::{CpuBackend, CpuProvider, Isa};

/// Registers `cpu` pinned to one instruction set.
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
    fn create(&self, cfg: &MoeConfig, _hw: &Hardware) -> Result<Box<dyn ExpertBackend>> {
        Ok(Box::new(CpuBackend::new(cfg.clone(), self.0)))
    }
}

fn isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.available()).collect()
}

fn routings(experts: usize) -> Vec<RoutingConfig> {
    let _ = experts;
    vec![
        RoutingConfig::SoftmaxTopk { renormalize: true },
        RoutingConfig::SoftmaxTopk { renormalize: false },
        RoutingConfig::DeepseekV3 {
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
            group_mask: GroupMaskValue::Zero,
        },
        RoutingConfig::DeepseekV3 {
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
            group_mask: GroupMaskValue::NegInf,
        },
        RoutingConfig::DeepseekV2 { method: V2TopkMethod::Greedy, norm_topk_prob: true, routed_scaling_factor: 1.0 },
        RoutingConfig::DeepseekV2 {
            method: V2TopkMethod::GroupLimitedGreedy { n_group: 4, topk_group: 2 },
            norm_topk_prob: false,
            routed_scaling_factor: 16.0,
        },
        RoutingConfig::GptOss,
        RoutingConfig::Llama4,
    ]
}

fn config(routing: RoutingConfig, act: Activation, wd: DType, ad: DType, h: usize, i: usize) -> MoeConfig {
    let mut c = MoeConfig::new(16, 4, h, i);
    c.routing = routing;
    c.activation = act;
    c.weight_dtype = wd;
    c.act_dtype = ad;
    if routing == RoutingConfig::Llama4 {
        c.top_k = 1;
        c.shared_expert = Some(SharedExpertConfig { intermediate_size: i, gated: false });
    }
    if routing == RoutingConfig::GptOss {
        c.router_bias = true;
        c.expert_bias = true;
    }
    c
}

/// Relative L2 error of `cpu` (pinned to `isa`) against `reference` with f32 activations.
fn rel_err(cfg: &MoeConfig, isa: Isa, tokens: usize, seed: u64) -> Result<f64> {
    let hw = Hardware::cpu_only();
    let mut registry = BackendRegistry::with_reference();
    registry.register(Box::new(PinnedCpu(isa)));
    let weights = MoeWeights::random(cfg, seed)?;
    let hidden = random_hidden(tokens, cfg.hidden_size, cfg.act_dtype, seed + 1)?;
    let mut rcfg = cfg.clone();
    rcfg.act_dtype = DType::F32;
    let opts = |b: &str| BuildOptions { backend: b.into(), ..Default::default() };
    let mut reference = ConfigurableMoe::build(rcfg, &registry, &hw, opts("reference"))?;
    reference.load_weights(&weights)?;
    let want = reference.forward(&hidden.to_dtype(DType::F32)?)?;
    let mut cpu = ConfigurableMoe::build(cfg.clone(), &registry, &hw, opts("cpu"))?;
    cpu.load_weights(&weights)?;
    let got = cpu.forward(&hidden)?;
    assert_eq!(got.dtype(), cfg.act_dtype, "output dtype");
    assert_eq!(got.shape(), &[tokens, cfg.hidden_size]);
    rel_l2_tensors(&got, &want)
}

fn expect_close(cfg: &MoeConfig, isa: Isa, tokens: usize, seed: u64) {
    let tol = tolerance(cfg.act_dtype, cfg.weight_dtype, cfg.quant);
    let err = rel_err(cfg, isa, tokens, seed).unwrap_or_else(|e| panic!("{cfg:?} on {isa:?}: {e}"));
    let label = format!(
        "{} {} w={} a={} H={} I={} T={tokens} {}",
        cfg.routing.name(),
        cfg.activation.name(),
        cfg.weight_dtype,
        cfg.act_dtype,
        cfg.hidden_size,
        cfg.intermediate_size,
        isa.name()
    );
    if tokens == 0 {
        assert_eq!(err, 0.0, "{label}");
    } else {
        assert!(err < tol, "{label}: rel L2 {err:e} >= {tol:e}");
    }
}

#[test]
fn routing_x_activation_x_dtype_on_the_best_isa() {
    let isa = Isa::best();
    for (ri, routing) in routings(16).into_iter().enumerate() {
        for (ai, act) in Activation::all().into_iter().enumerate() {
            for (di, dt) in [DType::F32, DType::BF16, DType::F16].into_iter().enumerate() {
                let cfg = config(routing, act, dt, dt, 64, 48);
                let seed = (ri * 100 + ai * 10 + di) as u64;
                expect_close(&cfg, isa, 13, seed);
            }
        }
    }
}

#[test]
fn every_isa_every_weight_dtype_and_odd_shapes() {
    for isa in isas() {
        for (wd, ad) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::F16, DType::F16),
            (DType::BF16, DType::F32),
            (DType::F32, DType::BF16),
        ] {
            // odd hidden/intermediate sizes exercise the padded columns and the padded k pair
            for (h, i) in [(64, 32), (50, 23), (96, 80)] {
                let cfg = config(RoutingConfig::GptOss, Activation::GPT_OSS, wd, ad, h, i);
                for tokens in [1, 5, 40] {
                    expect_close(&cfg, isa, tokens, (h * 7 + i + tokens) as u64);
                }
            }
        }
    }
}

#[test]
fn zero_and_one_token_and_empty_experts() {
    for isa in isas() {
        for dt in [DType::F32, DType::BF16] {
            let mut cfg = config(RoutingConfig::SoftmaxTopk { renormalize: true }, Activation::Swiglu, dt, dt, 64, 32);
            for tokens in [0, 1, 2] {
                expect_close(&cfg, isa, tokens, 7);
            }
            // 64 experts, top-1, 3 tokens: almost every expert is empty
            cfg.num_experts = 64;
            cfg.top_k = 1;
            expect_close(&cfg, isa, 3, 8);
        }
    }
}

#[test]
fn shared_experts_with_and_without_gate() {
    for isa in isas() {
        for gated in [false, true] {
            for dt in [DType::F32, DType::BF16] {
                let mut cfg =
                    config(RoutingConfig::SoftmaxTopk { renormalize: false }, Activation::Swiglu, dt, dt, 64, 32);
                cfg.shared_expert = Some(SharedExpertConfig { intermediate_size: 40, gated });
                for tokens in [0, 1, 9] {
                    expect_close(&cfg, isa, tokens, 11 + tokens as u64);
                }
            }
        }
    }
}

#[test]
fn large_token_counts_use_the_fused_schedule() {
    // 300 tokens x top-4 over 16 experts: many (expert, row-tile) tasks, row tiles > 8 rows.
    for dt in [DType::F32, DType::BF16] {
        let cfg = config(RoutingConfig::SoftmaxTopk { renormalize: true }, Activation::GeluTanhGlu, dt, dt, 128, 96);
        expect_close(&cfg, Isa::best(), 300, 21);
    }
}

#[test]
fn expert_parallel_ranks_sum_to_the_whole() {
    // Each rank computes only its slots; the ranks' run_moe outputs must add up to the reference.
    let cfg =
        config(RoutingConfig::SoftmaxTopk { renormalize: true }, Activation::Swiglu, DType::F32, DType::F32, 64, 32);
    let w = MoeWeights::random(&cfg, 3).unwrap();
    let x = random_hidden(11, 64, DType::F32, 4).unwrap();
    let local = |s: SlotRange| LocalWeights {
        router: w.router.clone(),
        experts: w.experts.select_experts(&(s.start..s.start + s.count).collect::<Vec<_>>()).unwrap(),
        shared: None,
    };
    let all = SlotRange { start: 0, count: 16, total: 16 };
    let mut reference = ReferenceBackend::new(cfg.clone());
    reference.create_weights(all).unwrap();
    reference.load_weights(&local(all)).unwrap();
    reference.post_load().unwrap();
    let logits = reference.router_logits(&x).unwrap();
    let routing = reference.route(&logits).unwrap().into_identity_slots();
    let input = reference.quantize_input(&x).unwrap();
    let want = reference.run_moe(&input, &routing).unwrap().to_f32_vec().unwrap();
    let mut sum = vec![0.0f32; want.len()];
    for rank in 0..4 {
        let s = SlotRange { start: rank * 4, count: 4, total: 16 };
        let mut c = cfg.clone();
        c.parallel = ParallelConfig { ep_size: 4, ep_rank: rank };
        let mut cpu = CpuBackend::new(c, Isa::best());
        cpu.create_weights(s).unwrap();
        cpu.load_weights(&local(s)).unwrap();
        cpu.post_load().unwrap();
        let input = cpu.quantize_input(&x).unwrap();
        let part = cpu.run_moe(&input, &routing).unwrap().to_f32_vec().unwrap();
        sum.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
    let err = moe_core::compare::rel_l2(&sum, &want);
    assert!(err < 1e-5, "rel L2 {err:e}");
}

/// Drives a backend by hand through one forward.
fn forward(b: &mut dyn ExpertBackend, x: &Tensor) -> Tensor {
    let logits = b.router_logits(x).unwrap();
    let routing = b.route(&logits).unwrap().into_identity_slots();
    let input = b.quantize_input(x).unwrap();
    let routed = b.run_moe(&input, &routing).unwrap();
    b.finalize(x, routed).unwrap()
}

fn loaded(cfg: &MoeConfig, w: &MoeWeights, isa: Isa) -> CpuBackend {
    let mut b = CpuBackend::new(cfg.clone(), isa);
    b.create_weights(SlotRange::for_config(cfg)).unwrap();
    b.load_weights(&LocalWeights { router: w.router.clone(), experts: w.experts.clone(), shared: w.shared.clone() })
        .unwrap();
    b.post_load().unwrap();
    b
}

#[test]
fn poisoned_workspaces_never_leak_into_outputs() {
    for isa in isas() {
        for dt in [DType::F32, DType::BF16] {
            let mut cfg = config(RoutingConfig::GptOss, Activation::GPT_OSS, dt, DType::F32, 50, 23);
            cfg.shared_expert = Some(SharedExpertConfig { intermediate_size: 24, gated: true });
            let w = MoeWeights::random(&cfg, 5).unwrap();
            let mut b = loaded(&cfg, &w, isa);
            let mut reference = ReferenceBackend::new(cfg.clone());
            reference.create_weights(SlotRange::for_config(&cfg)).unwrap();
            reference
                .load_weights(&LocalWeights {
                    router: w.router.clone(),
                    experts: w.experts.clone(),
                    shared: w.shared.clone(),
                })
                .unwrap();
            reference.post_load().unwrap();
            // a large forward grows every buffer; then each smaller one runs on poisoned buffers
            for (i, tokens) in [200usize, 7, 1, 0, 33].into_iter().enumerate() {
                let x = random_hidden(tokens, 50, DType::F32, 40 + i as u64).unwrap();
                b.poison_workspaces();
                let got = forward(&mut b, &x);
                let want = forward(&mut reference, &x);
                let err = rel_l2_tensors(&got, &want).unwrap();
                let tol = tolerance(DType::F32, dt, moe_core::QuantFormat::None);
                assert!(err < tol || (tokens == 0 && err == 0.0), "{} {dt} T={tokens}: {err:e}", isa.name());
            }
        }
    }
}

#[test]
fn replace_slot_repacks_one_expert_with_its_biases() {
    for dt in [DType::F32, DType::BF16] {
        let cfg = config(RoutingConfig::GptOss, Activation::GPT_OSS, dt, DType::F32, 64, 32);
        let w = MoeWeights::random(&cfg, 1).unwrap();
        let other = MoeWeights::random(&cfg, 2).unwrap();
        let mut b = loaded(&cfg, &w, Isa::best());
        // slot 3 <- expert 9 of `other`
        b.replace_slot(3, &other.experts, 9).unwrap();
        let mut ids: Vec<usize> = (0..16).collect();
        ids[3] = 16 + 9;
        let both = moe_core::weights::ExpertWeights {
            w13: cat(&w.experts.w13, &other.experts.w13),
            w2: cat(&w.experts.w2, &other.experts.w2),
            b13: Some(cat_t(w.experts.b13.as_ref().unwrap(), other.experts.b13.as_ref().unwrap())),
            b2: Some(cat_t(w.experts.b2.as_ref().unwrap(), other.experts.b2.as_ref().unwrap())),
        };
        let mut w2 = w.clone();
        w2.experts = both.select_experts(&ids).unwrap();
        let mut fresh = loaded(&cfg, &w2, Isa::best());
        let x = random_hidden(64, 64, DType::F32, 3).unwrap();
        let (a, c) = (forward(&mut b, &x), forward(&mut fresh, &x));
        assert_eq!(a.to_f32_vec().unwrap(), c.to_f32_vec().unwrap(), "{dt}");
        assert!(b.replace_slot(16, &other.experts, 0).is_err());
        assert!(b.replace_slot(0, &other.experts, 16).is_err());
    }
}

fn cat_t(a: &Tensor, b: &Tensor) -> Tensor {
    let row = a.shape()[1..].to_vec();
    Tensor::cat_rows(&[a.clone(), b.clone()], &row, a.dtype()).unwrap()
}

fn cat(a: &moe_core::quant::ExpertTensor, b: &moe_core::quant::ExpertTensor) -> moe_core::quant::ExpertTensor {
    let mut out = a.clone();
    out.experts += b.experts;
    for (name, t) in out.parts.iter_mut() {
        *t = cat_t(t, b.part(name).unwrap());
    }
    out
}

#[test]
fn can_implement_gives_reasons() {
    let hw = Hardware::cpu_only();
    let mut cfg = MoeConfig::new(8, 2, 64, 32);
    assert!(CpuProvider.can_implement(&cfg, &hw).is_ok());
    cfg.top_k = 9;
    assert!(CpuProvider.can_implement(&cfg, &hw).unwrap_err().contains("top_k"));
}

#[test]
fn using_the_backend_before_loading_is_an_error() {
    let cfg = MoeConfig::new(8, 2, 64, 32);
    let mut b = CpuBackend::new(cfg, Isa::best());
    let x = random_hidden(2, 64, DType::F32, 0).unwrap();
    assert!(b.router_logits(&x).is_err());
    assert!(b.post_load().is_err());
    assert!(b
        .load_weights(&LocalWeights {
            router: MoeWeights::random(&MoeConfig::new(8, 2, 64, 32), 0).unwrap().router,
            experts: MoeWeights::random(&MoeConfig::new(8, 2, 64, 32), 0).unwrap().experts,
            shared: None
        })
        .is_err());
}

#[test]
fn one_instance_across_token_counts_gives_the_bits_of_fresh_ones() {
    // run_moe reuses its output buffer (handed back by finalize) and finalize rounds in parallel:
    // a long-lived instance must give exactly what a fresh one gives, whatever ran before.
    let hw = Hardware::cpu_only();
    let mut registry = BackendRegistry::with_reference();
    registry.register(Box::new(PinnedCpu(Isa::best())));
    let opts = || BuildOptions { backend: "cpu".into(), ..Default::default() };
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for shared in [false, true] {
            let mut cfg = config(RoutingConfig::SoftmaxTopk { renormalize: true }, Activation::Swiglu, dt, dt, 64, 32);
            if shared {
                cfg.shared_expert = Some(SharedExpertConfig { intermediate_size: 40, gated: true });
            }
            let w = MoeWeights::random(&cfg, 5).unwrap();
            let mut long_lived = ConfigurableMoe::build(cfg.clone(), &registry, &hw, opts()).unwrap();
            long_lived.load_weights(&w).unwrap();
            for (i, tokens) in [70, 3, 0, 70, 129, 1].into_iter().enumerate() {
                let x = random_hidden(tokens, cfg.hidden_size, dt, 40 + i as u64).unwrap();
                let mut fresh = ConfigurableMoe::build(cfg.clone(), &registry, &hw, opts()).unwrap();
                fresh.load_weights(&w).unwrap();
                let want = fresh.forward(&x).unwrap();
                let got = long_lived.forward(&x).unwrap();
                assert_eq!(got.dtype(), dt);
                assert_eq!(got.shape(), want.shape());
                let bits = |t: &Tensor| -> Vec<u32> { t.to_f32_vec().unwrap().iter().map(|v| v.to_bits()).collect() };
                assert_eq!(bits(&got), bits(&want), "{dt} shared {shared} T = {tokens} (forward {i})");
            }
        }
    }
}
