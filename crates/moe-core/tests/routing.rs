//! Routing property tests: every method against the f64 re-implementation on random logits.

mod common;

use common::reference64;
use moe_core::config::{GroupMaskValue, MoeConfig, RoutingConfig, V2TopkMethod};
use moe_core::routing::route_host;
use moe_core::Tensor;
use proptest::prelude::*;

fn close(a: &[f32], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (*x as f64 - y).abs() <= tol * (1.0 + y.abs()))
}

fn run(c: &MoeConfig, logits: &[f32], bias: Option<&[f32]>) -> (Vec<i32>, Vec<f32>) {
    let t = logits.len() / c.num_experts;
    let r = route_host(c, &Tensor::from_f32(vec![t, c.num_experts], logits.to_vec()).unwrap(), bias).unwrap();
    (r.ids_host().unwrap().to_vec(), r.weights_host().unwrap().to_vec())
}

fn routing_strategy() -> impl Strategy<Value = MoeConfig> {
    // (experts, groups) pairs with groups of at least 2 experts
    let shapes = prop_oneof![Just((8usize, 4usize)), Just((16, 4)), Just((12, 3)), Just((32, 8)), Just((6, 2))];
    (shapes, 0usize..7, 1usize..=8, any::<bool>(), any::<bool>()).prop_filter_map(
        "top_k must fit the kept groups",
        |((e, ng), which, k, flag, negmask)| {
            let k = k.min(e);
            let g = e / ng;
            let tg = (k.div_ceil(g)).max(1).min(ng);
            let routing = match which {
                0 => RoutingConfig::SoftmaxTopk { renormalize: flag },
                1 => RoutingConfig::DeepseekV3 {
                    n_group: ng,
                    topk_group: tg,
                    norm_topk_prob: flag,
                    routed_scaling_factor: 2.5,
                    group_mask: if negmask { GroupMaskValue::NegInf } else { GroupMaskValue::Zero },
                },
                2 => RoutingConfig::DeepseekV2 {
                    method: V2TopkMethod::Greedy,
                    norm_topk_prob: flag,
                    routed_scaling_factor: 16.0,
                },
                3 => RoutingConfig::DeepseekV2 {
                    method: V2TopkMethod::GroupLimitedGreedy { n_group: ng, topk_group: tg },
                    norm_topk_prob: flag,
                    routed_scaling_factor: 1.5,
                },
                4 => RoutingConfig::GptOss,
                5 => RoutingConfig::Llama4,
                _ => RoutingConfig::SoftmaxTopk { renormalize: true },
            };
            let mut c = MoeConfig::new(e, k, 8, 8);
            c.routing = routing;
            c.validate().ok().map(|_| c)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Logits and biases on a coarse grid: exact ties are frequent (tie-breaking is exercised)
    /// and distinct values are far apart, so f32 and f64 must agree on every id.
    #[test]
    fn matches_f64_reimplementation(c in routing_strategy(), seed in any::<u64>(), tokens in 1usize..6) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let e = c.num_experts;
        let logits: Vec<f32> = (0..tokens * e).map(|_| rng.gen_range(-16i32..=16) as f32 / 8.0).collect();
        let bias: Vec<f32> = (0..e).map(|_| rng.gen_range(-8i32..=8) as f32 / 16.0).collect();
        let uses_bias = c.routing.uses_correction_bias();
        let (ids, w) = run(&c, &logits, uses_bias.then_some(&bias[..]));
        let k = c.top_k;
        let b64: Vec<f64> = bias.iter().map(|&x| x as f64).collect();
        for t in 0..tokens {
            let row: Vec<f64> = logits[t * e..(t + 1) * e].iter().map(|&x| x as f64).collect();
            let (rid, rw) = reference64(&c, &row, &b64);
            let got: Vec<usize> = ids[t * k..(t + 1) * k].iter().map(|&i| i as usize).collect();
            prop_assert_eq!(&got, &rid, "token {} of {:?}", t, c.routing);
            prop_assert!(close(&w[t * k..(t + 1) * k], &rw, 1e-5), "weights {:?} vs {:?}", &w[t * k..(t + 1) * k], rw);
        }
    }
}
