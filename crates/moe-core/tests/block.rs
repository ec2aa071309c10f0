//! The whole block on the reference backend against an independent f64 per-token loop, for
//! every routing method x activation x shared-expert combination; edge cases; bad input.

mod common;

use common::{naive_block64, rel_l2_64};
use moe_core::backend::Hardware;
use moe_core::config::{Activation, GroupMaskValue, RoutingConfig, SharedExpertConfig, V2TopkMethod};
use moe_core::weights::random_hidden;
use moe_core::{BackendRegistry, BuildOptions, ConfigurableMoe, DType, MoeConfig, MoeError, MoeWeights, Tensor};

fn routings() -> Vec<(RoutingConfig, usize)> {
    vec![
        (RoutingConfig::SoftmaxTopk { renormalize: false }, 3),
        (RoutingConfig::SoftmaxTopk { renormalize: true }, 2),
        (
            RoutingConfig::DeepseekV3 {
                n_group: 4,
                topk_group: 2,
                norm_topk_prob: true,
                routed_scaling_factor: 2.5,
                group_mask: GroupMaskValue::Zero,
            },
            3,
        ),
        (
            RoutingConfig::DeepseekV3 {
                n_group: 4,
                topk_group: 2,
                norm_topk_prob: false,
                routed_scaling_factor: 1.0,
                group_mask: GroupMaskValue::NegInf,
            },
            3,
        ),
        (
            RoutingConfig::DeepseekV2 {
                method: V2TopkMethod::Greedy,
                norm_topk_prob: false,
                routed_scaling_factor: 16.0,
            },
            2,
        ),
        (
            RoutingConfig::DeepseekV2 {
                method: V2TopkMethod::GroupLimitedGreedy { n_group: 4, topk_group: 2 },
                norm_topk_prob: true,
                routed_scaling_factor: 1.0,
            },
            3,
        ),
        (RoutingConfig::GptOss, 2),
        (RoutingConfig::Llama4, 1),
    ]
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

fn base(routing: RoutingConfig, k: usize) -> MoeConfig {
    let mut c = MoeConfig::new(8, k, 48, 24);
    c.routing = routing;
    c.router_bias = matches!(routing, RoutingConfig::GptOss);
    c
}

#[test]
fn reference_equals_naive_f64_for_every_combination() {
    let shareds = [
        None,
        Some(SharedExpertConfig { intermediate_size: 40, gated: false }),
        Some(SharedExpertConfig { intermediate_size: 16, gated: true }),
    ];
    let mut n = 0;
    for (ri, (routing, k)) in routings().into_iter().enumerate() {
        for (ai, act) in Activation::all().into_iter().enumerate() {
            for (si, shared) in shareds.iter().enumerate() {
                let mut c = base(routing, k);
                c.activation = act;
                c.expert_bias = matches!(act, Activation::GptOssSwiglu { .. });
                c.shared_expert = *shared;
                let seed = (ri * 100 + ai * 10 + si) as u64;
                let w = MoeWeights::random(&c, seed).unwrap();
                let x = random_hidden(13, c.hidden_size, DType::F32, seed).unwrap();
                let out = build(&c, &w).forward(&x).unwrap();
                let expect = naive_block64(&c, &w, x.as_f32().unwrap());
                let err = rel_l2_64(out.as_f32().unwrap(), &expect);
                assert!(err < 1e-5, "{} {} shared={:?}: rel err {err:e}", routing.name(), act.name(), shared);
                n += 1;
            }
        }
    }
    assert_eq!(n, 8 * 3 * 3);
}

#[test]
fn bf16_block_is_within_tolerance_of_f64() {
    for (routing, k) in routings() {
        let mut c = base(routing, k);
        c.weight_dtype = DType::BF16;
        c.act_dtype = DType::BF16;
        c.shared_expert = Some(SharedExpertConfig { intermediate_size: 16, gated: true });
        let w = MoeWeights::random(&c, 7).unwrap();
        let x = random_hidden(9, c.hidden_size, DType::BF16, 7).unwrap();
        let out = build(&c, &w).forward(&x).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        let expect = naive_block64(&c, &w, &x.to_f32_vec().unwrap());
        let err = rel_l2_64(&out.to_f32_vec().unwrap(), &expect);
        assert!(err < 1e-2, "{}: {err:e}", routing.name());
    }
}

#[test]
fn zero_and_one_token() {
    for (routing, k) in routings() {
        let c = base(routing, k);
        let w = MoeWeights::random(&c, 3).unwrap();
        let mut moe = build(&c, &w);
        let out = moe.forward(&Tensor::zeros(vec![0, c.hidden_size], DType::F32)).unwrap();
        assert_eq!(out.shape(), &[0, c.hidden_size]);
        let x = random_hidden(1, c.hidden_size, DType::F32, 4).unwrap();
        let out = moe.forward(&x).unwrap();
        let err = rel_l2_64(out.as_f32().unwrap(), &naive_block64(&c, &w, x.as_f32().unwrap()));
        assert!(err < 1e-5, "{}: {err:e}", routing.name());
    }
}

#[test]
fn experts_no_token_picks_are_fine() {
    // 64 experts, 2 tokens, top-2: at least 60 experts receive nothing.
    let mut c = MoeConfig::new(64, 2, 32, 16);
    c.shared_expert = Some(SharedExpertConfig { intermediate_size: 8, gated: false });
    let w = MoeWeights::random(&c, 11).unwrap();
    let x = random_hidden(2, 32, DType::F32, 12).unwrap();
    let out = build(&c, &w).forward(&x).unwrap();
    let err = rel_l2_64(out.as_f32().unwrap(), &naive_block64(&c, &w, x.as_f32().unwrap()));
    assert!(err < 1e-5, "{err:e}");
}

#[test]
fn chunking_does_not_change_the_output() {
    for (routing, k) in routings() {
        let c = base(routing, k);
        let w = MoeWeights::random(&c, 21).unwrap();
        let x = random_hidden(23, c.hidden_size, DType::F32, 22).unwrap();
        let whole = build(&c, &w).forward(&x).unwrap();
        for chunk in [1usize, 7, 23, 100] {
            let mut cc = c.clone();
            cc.chunk_size = Some(chunk);
            let out = build(&cc, &w).forward(&x).unwrap();
            assert_eq!(out.as_f32().unwrap(), whole.as_f32().unwrap(), "{} chunk {chunk}", routing.name());
        }
    }
}

#[test]
fn forward_with_logits_matches_forward() {
    let mut c = base(RoutingConfig::SoftmaxTopk { renormalize: true }, 2);
    c.chunk_size = Some(5);
    let w = MoeWeights::random(&c, 5).unwrap();
    let x = random_hidden(12, c.hidden_size, DType::F32, 6).unwrap();
    let mut moe = build(&c, &w);
    let a = moe.forward(&x).unwrap();
    let logits = moe_core::backend::reference::host_router_logits(&c, &w.router, &x).unwrap();
    let b = moe.forward_with_logits(&x, &logits).unwrap();
    assert_eq!(a.as_f32().unwrap(), b.as_f32().unwrap());
}

#[test]
fn reload_gives_the_same_output() {
    let c = base(RoutingConfig::GptOss, 2);
    let w = MoeWeights::random(&c, 31).unwrap();
    let other = MoeWeights::random(&c, 32).unwrap();
    let x = random_hidden(5, c.hidden_size, DType::F32, 33).unwrap();
    let mut moe = build(&c, &w);
    let a = moe.forward(&x).unwrap();
    moe.load_weights(&other).unwrap();
    assert_ne!(moe.forward(&x).unwrap().as_f32().unwrap(), a.as_f32().unwrap());
    moe.load_weights(&w).unwrap();
    assert_eq!(moe.forward(&x).unwrap().as_f32().unwrap(), a.as_f32().unwrap());
}

// ---------- bad input: errors that name the problem, never panics ----------

#[test]
fn wrong_hidden_size_is_a_shape_error() {
    let c = base(RoutingConfig::SoftmaxTopk { renormalize: true }, 2);
    let w = MoeWeights::random(&c, 1).unwrap();
    let err = build(&c, &w).forward(&random_hidden(3, 47, DType::F32, 1).unwrap()).unwrap_err();
    assert!(matches!(err, MoeError::Shape { .. }), "{err}");
    assert!(err.to_string().contains("[3, 48]"), "{err}");
}

#[test]
fn top_k_above_experts_and_bad_groups_are_config_errors() {
    let c = MoeConfig::new(4, 5, 8, 8);
    let err =
        ConfigurableMoe::build(c, &BackendRegistry::with_reference(), &Hardware::cpu_only(), BuildOptions::default())
            .unwrap_err();
    assert!(matches!(err, MoeError::Config { field: "top_k", .. }), "{err}");
    let mut c = MoeConfig::new(10, 2, 8, 8);
    c.routing = RoutingConfig::DeepseekV3 {
        n_group: 4,
        topk_group: 2,
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
        group_mask: GroupMaskValue::Zero,
    };
    let err =
        ConfigurableMoe::build(c, &BackendRegistry::with_reference(), &Hardware::cpu_only(), BuildOptions::default())
            .unwrap_err();
    assert!(matches!(err, MoeError::Config { field: "n_group", .. }), "{err}");
}

#[test]
fn nan_input_is_rejected_at_routing() {
    // Documented behaviour: a NaN in the hidden states makes its router logits NaN, and routing
    // refuses non-finite logits with an error naming the token (no arbitrary expert choice).
    let c = base(RoutingConfig::SoftmaxTopk { renormalize: true }, 2);
    let w = MoeWeights::random(&c, 1).unwrap();
    let mut v = random_hidden(4, c.hidden_size, DType::F32, 2).unwrap().as_f32().unwrap().to_vec();
    v[2 * c.hidden_size + 5] = f32::NAN;
    let err = build(&c, &w).forward(&Tensor::from_f32(vec![4, c.hidden_size], v).unwrap()).unwrap_err();
    assert!(matches!(err, MoeError::NonFinite { .. }), "{err}");
    assert!(err.to_string().contains("token 2"), "{err}");
}

#[test]
fn unknown_backend_lists_the_available_ones() {
    let c = base(RoutingConfig::SoftmaxTopk { renormalize: true }, 2);
    let err = ConfigurableMoe::build(
        c,
        &BackendRegistry::with_reference(),
        &Hardware::cpu_only(),
        BuildOptions { backend: "tpu".into(), ..Default::default() },
    )
    .unwrap_err();
    assert!(matches!(err, MoeError::UnknownBackend { .. }));
    assert!(err.to_string().contains("reference"), "{err}");
}

#[test]
fn weights_that_do_not_fit_the_config_are_rejected() {
    let c = base(RoutingConfig::SoftmaxTopk { renormalize: true }, 2);
    let mut other = c.clone();
    other.intermediate_size = 20;
    let w = MoeWeights::random(&other, 1).unwrap();
    let mut moe =
        ConfigurableMoe::build(c, &BackendRegistry::with_reference(), &Hardware::cpu_only(), BuildOptions::default())
            .unwrap();
    let err = moe.load_weights(&w).unwrap_err();
    assert!(err.to_string().contains("experts.w13"), "{err}");
    let x = random_hidden(1, 48, DType::F32, 1).unwrap();
    assert!(matches!(moe.forward(&x), Err(MoeError::WeightsNotLoaded { .. })));
}
