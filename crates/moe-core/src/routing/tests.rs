//! Routing against hand-computed cases and against straightforward f64 re-implementations.

use super::*;
use crate::config::{GroupMaskValue, MoeConfig, RoutingConfig, V2TopkMethod};

fn cfg(e: usize, k: usize, routing: RoutingConfig) -> MoeConfig {
    let mut c = MoeConfig::new(e, k, 8, 8);
    c.routing = routing;
    c.validate().unwrap();
    c
}

fn run(c: &MoeConfig, logits: &[f32], bias: Option<&[f32]>) -> (Vec<i32>, Vec<f32>) {
    let t = logits.len() / c.num_experts;
    let r = route_host(c, &Tensor::from_f32(vec![t, c.num_experts], logits.to_vec()).unwrap(), bias).unwrap();
    (r.ids_host().unwrap().to_vec(), r.weights_host().unwrap().to_vec())
}

fn close(a: &[f32], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (*x as f64 - y).abs() <= tol * (1.0 + y.abs()))
}

// ---------- hand-computed cases ----------

#[test]
fn softmax_topk_hand_case() {
    let c = cfg(4, 2, RoutingConfig::SoftmaxTopk { renormalize: false });
    let (ids, w) = run(&c, &[0.0, 2.0, 1.0, 2.0], None);
    // tie between experts 1 and 3: the lower index wins the first place
    assert_eq!(ids, vec![1, 3]);
    let z = 1.0 + 2.0 * 2f64.exp() + 1f64.exp();
    assert!(close(&w, &[2f64.exp() / z, 2f64.exp() / z], 1e-6));
    let c = cfg(4, 2, RoutingConfig::SoftmaxTopk { renormalize: true });
    let (_, w) = run(&c, &[0.0, 2.0, 1.0, 2.0], None);
    assert!(close(&w, &[0.5, 0.5], 1e-6));
}

#[test]
fn top_k_equal_to_experts_and_one() {
    let c = cfg(3, 3, RoutingConfig::SoftmaxTopk { renormalize: true });
    let (ids, w) = run(&c, &[0.1, 0.3, 0.2], None);
    assert_eq!(ids, vec![1, 2, 0]);
    assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    let c = cfg(3, 1, RoutingConfig::GptOss);
    let (ids, w) = run(&c, &[0.1, 0.3, 0.2], None);
    assert_eq!((ids, w), (vec![1], vec![1.0]));
}

#[test]
fn all_equal_logits_pick_lowest_indices() {
    let c = cfg(8, 3, RoutingConfig::SoftmaxTopk { renormalize: false });
    let (ids, _) = run(&c, &[0.5; 8], None);
    assert_eq!(ids, vec![0, 1, 2]);
}

#[test]
fn deepseek_v3_hand_case_and_mask_conventions() {
    // 4 experts in 2 groups, keep 1 group, top-2. Biases push group 0 ahead, but one of its
    // biased scores is negative: with 0.0 masking a losing-group expert (0.0) outranks it.
    let logits = [2.0f32, 0.0, -1.0, -1.0];
    let bias = [0.0f32, -0.9, -0.55, -0.55];
    let s: Vec<f64> = logits.iter().map(|&x| 1.0 / (1.0 + (-(x as f64)).exp())).collect();
    // c = [0.881, -0.4, -0.281, -0.281]; group 0 sum 0.481 > group 1 sum -0.562
    for (mask, want) in [(GroupMaskValue::Zero, vec![0, 2]), (GroupMaskValue::NegInf, vec![0, 1])] {
        let c = cfg(
            4,
            2,
            RoutingConfig::DeepseekV3 {
                n_group: 2,
                topk_group: 1,
                norm_topk_prob: false,
                routed_scaling_factor: 2.0,
                group_mask: mask,
            },
        );
        let (ids, w) = run(&c, &logits, Some(&bias));
        assert_eq!(ids, want, "{mask:?}");
        let expect: Vec<f64> = want.iter().map(|&i| 2.0 * s[i as usize]).collect();
        assert!(close(&w, &expect, 1e-6), "{mask:?}: {w:?} vs {expect:?}");
    }
}

#[test]
fn deepseek_v2_renormalizes_or_scales() {
    let logits = [1.0f32, 2.0, 3.0, 0.0];
    let c = cfg(
        4,
        2,
        RoutingConfig::DeepseekV2 { method: V2TopkMethod::Greedy, norm_topk_prob: true, routed_scaling_factor: 16.0 },
    );
    let (ids, w) = run(&c, &logits, None);
    assert_eq!(ids, vec![2, 1]);
    let (a, b) = (3f64.exp(), 2f64.exp());
    assert!(close(&w, &[a / (a + b), b / (a + b)], 1e-6));
    let c = cfg(
        4,
        2,
        RoutingConfig::DeepseekV2 { method: V2TopkMethod::Greedy, norm_topk_prob: false, routed_scaling_factor: 16.0 },
    );
    let (_, w) = run(&c, &logits, None);
    let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
    assert!(close(&w, &[16.0 * a / z, 16.0 * b / z], 1e-6));
    // group-limited: groups {0,1} (max p(2.0)) and {2,3} (max p(3.0)); keep one group
    let c = cfg(
        4,
        2,
        RoutingConfig::DeepseekV2 {
            method: V2TopkMethod::GroupLimitedGreedy { n_group: 2, topk_group: 1 },
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
        },
    );
    let (ids, _) = run(&c, &logits, None);
    assert_eq!(ids, vec![2, 3]);
}

#[test]
fn gpt_oss_and_llama4_hand_cases() {
    let c = cfg(4, 2, RoutingConfig::GptOss);
    let (ids, w) = run(&c, &[1.0, -2.0, 3.0, 0.0], None);
    assert_eq!(ids, vec![2, 0]);
    let (a, b) = (3f64.exp(), 1f64.exp());
    assert!(close(&w, &[a / (a + b), b / (a + b)], 1e-6));
    let c = cfg(4, 1, RoutingConfig::Llama4);
    let r = route_host(&c, &Tensor::from_f32(vec![1, 4], vec![1.0, -2.0, 3.0, 0.0]).unwrap(), None).unwrap();
    assert!(r.weights_on_input());
    assert_eq!(r.ids_host().unwrap(), &[2]);
    assert!(close(r.weights_host().unwrap(), &[1.0 / (1.0 + (-3f64).exp())], 1e-6));
}

#[test]
fn non_finite_logits_are_rejected_naming_the_token() {
    let c = cfg(4, 2, RoutingConfig::SoftmaxTopk { renormalize: true });
    let t = Tensor::from_f32(vec![2, 4], vec![0.0, 1.0, 2.0, 3.0, 0.0, f32::NAN, 1.0, 1.0]).unwrap();
    let err = route_host(&c, &t, None).unwrap_err().to_string();
    assert!(err.contains("token 1 expert 1"), "{err}");
    let t = Tensor::from_f32(vec![1, 4], vec![0.0, f32::INFINITY, 2.0, 3.0]).unwrap();
    assert!(matches!(route_host(&c, &t, None), Err(MoeError::NonFinite { .. })));
}

#[test]
fn missing_or_misshaped_correction_bias_is_an_error() {
    let c = cfg(
        4,
        2,
        RoutingConfig::DeepseekV3 {
            n_group: 2,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
            group_mask: GroupMaskValue::Zero,
        },
    );
    let t = Tensor::from_f32(vec![1, 4], vec![0.0; 4]).unwrap();
    assert!(route_host(&c, &t, None).is_err());
    assert!(route_host(&c, &t, Some(&[0.0; 3])).is_err());
    let wrong = Tensor::from_f32(vec![1, 3], vec![0.0; 3]).unwrap();
    assert!(route_host(&c, &wrong, Some(&[0.0; 4])).is_err());
}

#[test]
fn prefill_sized_routing_matches_row_by_row_routing() {
    // Above one task's 64 rows, rows are routed in parallel chunks: same ids and weights as
    // routing each token alone.
    let mut cfg = MoeConfig::new(128, 8, 16, 8);
    cfg.routing = RoutingConfig::SoftmaxTopk { renormalize: true };
    let (t, e) = (1000, 128);
    let logits: Vec<f32> = (0..t * e).map(|i| ((i * 7919 % 1013) as f32).sin() * 3.0).collect();
    let all = route_host(&cfg, &Tensor::from_f32(vec![t, e], logits.clone()).unwrap(), None).unwrap();
    let (ids, w) = (all.ids_host().unwrap(), all.weights_host().unwrap());
    for row in [0, 63, 64, 65, 500, 999] {
        let one =
            route_host(&cfg, &Tensor::from_f32(vec![1, e], logits[row * e..(row + 1) * e].to_vec()).unwrap(), None)
                .unwrap();
        assert_eq!(&ids[row * 8..(row + 1) * 8], one.ids_host().unwrap(), "row {row}");
        assert_eq!(&w[row * 8..(row + 1) * 8], one.weights_host().unwrap(), "row {row}");
    }
}

// ---------- top-k selection ----------

/// The selection as first written: sort every index by (score descending, index ascending).
fn topk_by_sort(scores: &[f32], k: usize, out_len: usize) -> Vec<i32> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.iter().take(k.min(out_len)).map(|&i| i as i32).collect()
}

proptest::proptest! {
    #[test]
    fn topk_indices_matches_a_full_sort(
        // Few distinct values, so ties (and -0.0 against 0.0) are common.
        scores in proptest::collection::vec(proptest::sample::select(vec![-2.0f32, -0.0, 0.0, 0.5, 1.0, 3.0, f32::MIN, f32::MAX]), 0..80),
        k in 0usize..90,
        out_len in 0usize..90,
    ) {
        let mut out = vec![-7i32; out_len];
        topk_indices(&scores, k, &mut out);
        let want = topk_by_sort(&scores, k, out_len);
        proptest::prop_assert_eq!(&out[..want.len()], &want[..]);
        proptest::prop_assert!(out[want.len()..].iter().all(|&v| v == -7), "wrote past min(k, n, out)");
    }

    #[test]
    fn topk_indices_matches_a_full_sort_on_random_scores(
        scores in proptest::collection::vec(-1e3f32..1e3, 1..300),
        k in 1usize..12,
    ) {
        let mut out = vec![0i32; k];
        topk_indices(&scores, k, &mut out);
        let want = topk_by_sort(&scores, k, k);
        proptest::prop_assert_eq!(&out[..want.len()], &want[..]);
    }
}

#[test]
fn a_custom_chunk_runner_routes_the_same() {
    // Runs chunks in reverse order on one thread: the result must not depend on the order.
    struct Backwards;
    impl ChunkRunner for Backwards {
        fn for_each_chunk(&self, ids: &mut [i32], weights: &mut [f32], chunk: usize, f: &RouteChunk<'_>) {
            let parts: Vec<_> = ids.chunks_mut(chunk).zip(weights.chunks_mut(chunk)).enumerate().collect();
            for (c, (i, w)) in parts.into_iter().rev() {
                f(c, i, w);
            }
        }
    }
    let c = cfg(16, 4, RoutingConfig::SoftmaxTopk { renormalize: true });
    let t = 200;
    let logits: Vec<f32> = (0..t * 16).map(|i| ((i * 7919) % 1009) as f32 / 101.0 - 5.0).collect();
    let x = Tensor::from_f32(vec![t, 16], logits).unwrap();
    let a = route_host(&c, &x, None).unwrap();
    let b = route_host_on(&c, &x, None, &Backwards).unwrap();
    assert_eq!(a.ids_host().unwrap(), b.ids_host().unwrap());
    assert_eq!(a.weights_host().unwrap(), b.weights_host().unwrap());
}
