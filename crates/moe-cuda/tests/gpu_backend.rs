//! The `cuda` backend against `reference`, stage by stage and end to end, on the GPU. Without a
//! usable GPU every test prints the `can_implement` reason as its skip and passes.
//!
//! Every routing method x activation x dtype, T = 0 / 1 / odd / both layouts, empty experts,
//! a partial slot range (expert parallelism), poisoned outputs and scratch buffers.

use moe_core::backend::{BackendInput, BackendProvider, ExpertBackend, Hardware, LocalWeights, SlotRange};
use moe_core::compare::rel_l2;
use moe_core::config::{Activation, GroupMaskValue, RoutingConfig, SharedExpertConfig, V2TopkMethod};
use moe_core::weights::random_hidden;
use moe_core::{DType, MoeConfig, MoeWeights, Tensor, TopK};
use moe_cuda::kernels::{GemmTile, TW_SKIP_DEAD, TW_STAGED_EPI, TW_THREE_STAGES};
use moe_cuda::CudaProvider;

mod common;
use common::{full, hardware, pair_with, usable, Pair};

fn families(dtype: DType) -> Vec<(&'static str, MoeConfig)> {
    let base = |e, k| {
        let mut c = MoeConfig::new(e, k, 128, 64);
        c.weight_dtype = dtype;
        c.act_dtype = dtype;
        c
    };
    let mut v = Vec::new();
    let mut c = base(16, 4);
    c.routing = RoutingConfig::SoftmaxTopk { renormalize: true };
    v.push(("softmax_renorm_swiglu", c));
    let mut c = base(16, 4);
    c.routing = RoutingConfig::SoftmaxTopk { renormalize: false };
    c.shared_expert = Some(SharedExpertConfig { intermediate_size: 128, gated: true });
    v.push(("softmax_shared_gated", c));
    for mask in [GroupMaskValue::Zero, GroupMaskValue::NegInf] {
        let mut c = base(32, 4);
        c.routing = RoutingConfig::DeepseekV3 {
            n_group: 8,
            topk_group: 3,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
            group_mask: mask,
        };
        c.shared_expert = Some(SharedExpertConfig { intermediate_size: 64, gated: false });
        v.push((if mask == GroupMaskValue::Zero { "deepseek_v3_zero" } else { "deepseek_v3_neginf" }, c));
    }
    let mut c = base(16, 4);
    c.routing = RoutingConfig::DeepseekV2 {
        method: V2TopkMethod::GroupLimitedGreedy { n_group: 4, topk_group: 2 },
        norm_topk_prob: false,
        routed_scaling_factor: 16.0,
    };
    v.push(("deepseek_v2_group", c));
    let mut c = base(16, 3);
    c.routing =
        RoutingConfig::DeepseekV2 { method: V2TopkMethod::Greedy, norm_topk_prob: true, routed_scaling_factor: 1.0 };
    c.activation = Activation::GeluTanhGlu;
    v.push(("deepseek_v2_greedy_gelu", c));
    let mut c = base(8, 2);
    c.routing = RoutingConfig::GptOss;
    c.activation = Activation::GPT_OSS;
    c.router_bias = true;
    c.expert_bias = true;
    v.push(("gpt_oss", c));
    // Sizes that are not multiples of any tile: K and N tails, partial column blocks.
    let mut c = base(12, 3);
    c.hidden_size = 136;
    c.intermediate_size = 200;
    v.push(("odd_dims_swiglu", c));
    // A long down-projection reduction: decode sizes split it over K (partials summed in order).
    let mut c = base(8, 2);
    c.intermediate_size = 1024;
    c.routing = RoutingConfig::GptOss;
    c.activation = Activation::GPT_OSS;
    c.router_bias = true;
    c.expert_bias = true;
    v.push(("split_k_gpt_oss", c));
    let mut c = base(8, 1);
    c.routing = RoutingConfig::Llama4;
    c.shared_expert = Some(SharedExpertConfig { intermediate_size: 64, gated: false });
    v.push(("llama4", c));
    v
}

fn local(w: &MoeWeights, slots: SlotRange) -> LocalWeights {
    let ids: Vec<usize> = (slots.start..slots.start + slots.count).collect();
    LocalWeights {
        router: w.router.clone(),
        experts: w.experts.select_experts(&ids).unwrap(),
        shared: w.shared.clone(),
    }
}

fn pair(cfg: &MoeConfig, w: &MoeWeights, slots: SlotRange, hw: &Hardware) -> Pair {
    pair_with(cfg, &local(w, slots), slots, hw)
}

/// One forward through both backends' stages; returns (rel err of the block, rel err of logits).
fn forward(p: &mut Pair, cfg: &MoeConfig, tokens: usize, seed: u64) -> (f64, f64) {
    let x = random_hidden(tokens, cfg.hidden_size, cfg.act_dtype, seed).unwrap();
    let x32 = x.to_dtype(DType::F32).unwrap();
    let logits = p.cuda.router_logits(&x).unwrap();
    let ref_logits = p.reference.router_logits(&x32).unwrap();
    let l_err = rel_l2(&logits.to_f32_vec().unwrap(), &ref_logits.to_f32_vec().unwrap());
    // Route both from the reference's logits so expert choices are comparable exactly.
    let r_cuda = p.cuda.route(&ref_logits).unwrap();
    let r_ref = p.reference.route(&ref_logits).unwrap();
    let ids_c = r_cuda.ids().to_host().unwrap();
    let ids_r = r_ref.ids().to_host().unwrap();
    assert_eq!(ids_c.as_i32().unwrap(), ids_r.as_i32().unwrap(), "expert ids differ");
    let wc = r_cuda.weights().to_f32_vec().unwrap();
    let wr = r_ref.weights().to_f32_vec().unwrap();
    if tokens > 0 {
        assert!(rel_l2(&wc, &wr) < 1e-5, "routing weights differ: {wc:?} vs {wr:?}");
    }
    let routed = p.cuda.run_moe(&BackendInput::plain(x.clone()), &r_cuda.into_identity_slots()).unwrap();
    let out = p.cuda.finalize(&x, routed).unwrap();
    assert_eq!(out.dtype(), cfg.act_dtype);
    let routed_ref = p.reference.run_moe(&BackendInput::plain(x32.clone()), &r_ref.into_identity_slots()).unwrap();
    let out_ref = p.reference.finalize(&x32, routed_ref).unwrap();
    let o = out.to_f32_vec().unwrap();
    assert_eq!(o.len(), tokens * cfg.hidden_size);
    assert!(o.iter().all(|v| v.is_finite()), "non-finite output (an unwritten element?)");
    (rel_l2(&o, &out_ref.to_f32_vec().unwrap()), l_err)
}

#[test]
fn every_family_and_dtype_matches_reference_on_both_layouts() {
    let mut ran = 0;
    for dtype in [DType::BF16, DType::F16] {
        for (name, cfg) in families(dtype) {
            let Some(hw) = usable(&cfg, name) else { continue };
            let w = MoeWeights::random(&cfg, 7).unwrap();
            let mut p = pair(&cfg, &w, full(&cfg), &hw);
            // (masked switch point, wgmma tile, T256 gathers token rows, T256 writes 16-bit
            // expert outputs, decode path up to, T256 switches); T256 at every size (its
            // rows-per-expert switch off).
            const T256_ALL: i32 = TW_SKIP_DEAD | TW_STAGED_EPI;
            for (masked_max, wgmma, gather, y16, decode_max, t256_flags) in [
                (0usize, Some(GemmTile::T256), false, true, 0usize, T256_ALL),
                (0, Some(GemmTile::T256), true, false, 0, T256_ALL),
                (0, Some(GemmTile::T256), true, true, 0, T256_ALL),
                (0, Some(GemmTile::T256), true, true, 0, 0),
                (0, Some(GemmTile::T256), true, true, 0, T256_ALL | TW_THREE_STAGES),
                (0, Some(GemmTile::T256X2), false, true, 0, T256_ALL),
                (0, Some(GemmTile::T256X2), true, true, 0, T256_ALL),
                (0, Some(GemmTile::T256X2), true, false, 0, 0),
                (1 << 20, Some(GemmTile::T256X2), true, true, 0, T256_ALL),
                (0, Some(GemmTile::W256), false, true, 0, T256_ALL),
                (1 << 20, Some(GemmTile::T256), false, true, 0, T256_ALL),
                (1 << 20, Some(GemmTile::W128), false, true, 8, T256_ALL),
                (0, Some(GemmTile::W128), false, true, 0, T256_ALL),
                (0, None, false, true, 2, T256_ALL),
            ] {
                p.cuda.set_t256_flags(t256_flags);
                p.cuda.set_tma_min_rows(0);
                p.cuda.set_gather(gather);
                p.cuda.set_y16(y16);
                p.cuda.set_decode_max_tokens(Some(decode_max));
                p.cuda.set_masked_max_tokens(masked_max);
                p.cuda.set_wgmma(wgmma);
                for (i, tokens) in [0usize, 1, 5, 37, 300, 700].into_iter().enumerate() {
                    let (err, l_err) = forward(&mut p, &cfg, tokens, 100 + i as u64);
                    let plan = p.cuda.plan(tokens);
                    let label = format!("{name} {dtype} T={tokens} {:?}/{:?}", plan.layout, plan.tile);
                    if tokens > 0 {
                        assert!(l_err < 1e-5, "{label}: router logits rel err {l_err:e}");
                        assert!(err < 1e-2, "{label}: rel err {err:e}");
                    }
                    eprintln!("{label}: rel err {err:.2e}");
                    ran += 1;
                }
            }
        }
    }
    eprintln!("{ran} forwards checked");
}

#[test]
fn partial_slot_range_and_empty_experts() {
    let mut cfg = MoeConfig::new(8, 2, 128, 64);
    cfg.weight_dtype = DType::BF16;
    cfg.act_dtype = DType::BF16;
    let Some(hw) = usable(&cfg, "partial slots") else { return };
    let w = MoeWeights::random(&cfg, 3).unwrap();
    let slots = SlotRange { start: 4, count: 4, total: 8 };
    let mut p = pair(&cfg, &w, slots, &hw);
    for tokens in [1usize, 9, 200] {
        // Only experts 0, 5 and 6 get tokens: local experts 4 and 7 stay empty.
        let ids: Vec<i32> = (0..tokens).flat_map(|t| if t % 2 == 0 { [0, 5] } else { [6, 5] }).collect();
        let wts: Vec<f32> = (0..tokens * 2).map(|i| 0.25 + (i % 3) as f32 * 0.2).collect();
        let routing = TopK::from_vecs(tokens, 2, ids, wts, false).unwrap();
        let x = random_hidden(tokens, 128, DType::BF16, 9).unwrap();
        for (masked_max, decode_max) in [(0usize, 0usize), (1 << 20, 0), (0, 16)] {
            p.cuda.set_masked_max_tokens(masked_max);
            p.cuda.set_decode_max_tokens(Some(decode_max));
            let got = p.cuda.run_moe(&BackendInput::plain(x.clone()), &routing).unwrap().to_f32_vec().unwrap();
            let x32 = x.to_dtype(DType::F32).unwrap();
            let want = p.reference.run_moe(&BackendInput::plain(x32), &routing).unwrap().to_f32_vec().unwrap();
            let err = rel_l2(&got, &want);
            assert!(err < 1e-2, "T={tokens} masked_max={masked_max} decode_max={decode_max}: {err:e}");
        }
    }
}

#[test]
fn non_finite_logits_and_bad_ids_are_errors() {
    let mut cfg = MoeConfig::new(8, 2, 128, 64);
    cfg.weight_dtype = DType::BF16;
    cfg.act_dtype = DType::BF16;
    let Some(hw) = usable(&cfg, "error flags") else { return };
    let w = MoeWeights::random(&cfg, 3).unwrap();
    let mut p = pair(&cfg, &w, full(&cfg), &hw);
    let mut l = vec![0.5f32; 3 * 8];
    l[9] = f32::NAN;
    let r = p.cuda.route(&Tensor::from_f32(vec![3, 8], l).unwrap()).unwrap();
    let err = r.ids().to_host().unwrap_err().to_string();
    assert!(err.contains("token 1"), "{err}");
    let routing = TopK::from_vecs(1, 2, vec![0, 8], vec![0.5, 0.5], false).unwrap();
    let x = random_hidden(1, 128, DType::BF16, 1).unwrap();
    let out = p.cuda.run_moe(&BackendInput::plain(x), &routing).unwrap();
    assert!(out.to_host().is_err(), "slot 8 of 8 must be refused");
}

#[test]
fn refuses_f32_and_quant_with_reasons() {
    let cfg = MoeConfig::new(8, 2, 128, 64);
    let reason = CudaProvider.can_implement(&cfg, &hardware()).unwrap_err();
    assert!(reason.contains("f32") || reason.contains("GPU"), "{reason}");
    let mut hw = Hardware::cpu_only();
    hw.gpu_unavailable = Some("test: no driver".into());
    let mut c = cfg.clone();
    c.weight_dtype = DType::BF16;
    c.act_dtype = DType::BF16;
    let reason = CudaProvider.can_implement(&c, &hw).unwrap_err();
    assert!(reason.contains("test: no driver"), "{reason}");
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Router, routing, experts and finalize of one input on the device; the bits of `run_moe`'s
/// output and of the block's.
fn device_block(p: &mut Pair, x: &Tensor) -> (Vec<u32>, Vec<u32>) {
    let logits = p.cuda.router_logits(x).unwrap();
    let r = p.cuda.route(&logits).unwrap().into_identity_slots();
    let routed = p.cuda.run_moe(&BackendInput::plain(x.clone()), &r).unwrap();
    let routed_bits = bits(&routed);
    let out = p.cuda.finalize(x, routed).unwrap();
    (routed_bits, bits(&out))
}

#[test]
fn cuda_graphs_are_bitwise_equal_to_plain_launches() {
    let mut ran = 0;
    for dtype in [DType::BF16, DType::F16] {
        for (name, cfg) in families(dtype) {
            let Some(hw) = usable(&cfg, name) else { continue };
            let w = MoeWeights::random(&cfg, 11).unwrap();
            let mut plain = pair(&cfg, &w, full(&cfg), &hw);
            plain.cuda.set_cuda_graphs(false);
            let mut graph = pair(&cfg, &w, full(&cfg), &hw);
            graph.cuda.set_cuda_graphs(true);
            // Masked layout with the m16 tile (T <= 16, split-K down GEMM where it applies) and
            // the m64 tile (17..=32), and the contiguous layout at the same sizes: every layout a
            // decode-sized graph can hold.
            // The decode path (T <= 2 in the third configuration) adds its own graphs.
            for (i, ((masked_max, decode_max), tokens)) in [(0usize, 0usize), (32, 0), (0, 2)]
                .into_iter()
                .flat_map(|m| [1usize, 3, 16, 17, 32].map(|t| (m, t)))
                .enumerate()
            {
                graph.cuda.set_masked_max_tokens(masked_max);
                plain.cuda.set_masked_max_tokens(masked_max);
                graph.cuda.set_decode_max_tokens(Some(decode_max));
                plain.cuda.set_decode_max_tokens(Some(decode_max));
                graph.cuda.set_graph_max_tokens(Some(32));
                assert!(graph.cuda.graphs_apply(tokens));
                for rep in 0..3u64 {
                    let x = random_hidden(tokens, cfg.hidden_size, dtype, 1000 + 10 * i as u64 + rep).unwrap();
                    let want = device_block(&mut plain, &x);
                    let got = device_block(&mut graph, &x);
                    let plan = graph.cuda.plan(tokens);
                    let label = format!("{name} {dtype} T={tokens} {:?}/{:?}", plan.layout, plan.tile);
                    assert!(want.0 == got.0, "{label}: run_moe output differs with CUDA graphs");
                    assert!(want.1 == got.1, "{label}: block output differs with CUDA graphs");
                    assert!(got.1.iter().all(|b| f32::from_bits(*b).is_finite()), "{label}: non-finite output");
                    ran += 1;
                }
            }
            let s = graph.cuda.graph_stats();
            assert!(s.built >= 10 && s.replays >= 20 && s.node_updates > 0, "{name}: graphs not reused: {s:?}");
            assert_eq!(plain.cuda.graph_stats().built, 0, "{name}: graphs built while off");
        }
    }
    eprintln!("{ran} forwards compared bitwise");
}

#[test]
fn graph_cache_replays_fresh_inputs_against_reference() {
    for (name, cfg) in families(DType::BF16) {
        if !matches!(name, "softmax_renorm_swiglu" | "deepseek_v3_neginf" | "split_k_gpt_oss" | "llama4") {
            continue;
        }
        let Some(hw) = usable(&cfg, name) else { return };
        let w = MoeWeights::random(&cfg, 21).unwrap();
        let mut p = pair(&cfg, &w, full(&cfg), &hw);
        p.cuda.set_cuda_graphs(true);
        p.cuda.set_masked_max_tokens(32);
        let sizes = [1usize, 2, 7];
        for round in 0..4u64 {
            for tokens in sizes {
                let (err, _) = forward(&mut p, &cfg, tokens, 5000 + round * 100 + tokens as u64);
                assert!(err < 1e-2, "{name} round {round} T={tokens}: rel err {err:e}");
            }
        }
        // One graph per token count for run_moe, and one for finalize when a shared expert adds
        // GEMMs; every later forward replays them.
        let per_t = if cfg.shared_expert.is_some() { 2 } else { 1 };
        let s = p.cuda.graph_stats();
        assert_eq!(s.built, (per_t * sizes.len()) as u64, "{name}: {s:?}");
        assert_eq!(s.replays, (per_t * sizes.len() * 3) as u64, "{name}: {s:?}");
    }
}

#[test]
fn graphs_with_host_routing_and_error_flags() {
    let mut cfg = MoeConfig::new(8, 2, 128, 64);
    cfg.weight_dtype = DType::BF16;
    cfg.act_dtype = DType::BF16;
    let Some(hw) = usable(&cfg, "graphs with host routing") else { return };
    let w = MoeWeights::random(&cfg, 3).unwrap();
    // A partial slot range as under expert parallelism, routing given as host tensors (EP / EPLB).
    let slots = SlotRange { start: 4, count: 4, total: 8 };
    let mut p = pair(&cfg, &w, slots, &hw);
    p.cuda.set_cuda_graphs(true);
    p.cuda.set_masked_max_tokens(32);
    for round in 0..3u64 {
        for tokens in [1usize, 9] {
            let ids: Vec<i32> =
                (0..tokens).flat_map(|t| if (t as u64 + round).is_multiple_of(2) { [0, 5] } else { [6, 4] }).collect();
            let wts: Vec<f32> = (0..tokens * 2).map(|i| 0.2 + ((i as u64 + round) % 3) as f32 * 0.3).collect();
            let routing = TopK::from_vecs(tokens, 2, ids, wts, false).unwrap();
            let x = random_hidden(tokens, 128, DType::BF16, 70 + round * 10 + tokens as u64).unwrap();
            let got = p.cuda.run_moe(&BackendInput::plain(x.clone()), &routing).unwrap().to_f32_vec().unwrap();
            let x32 = x.to_dtype(DType::F32).unwrap();
            let want = p.reference.run_moe(&BackendInput::plain(x32), &routing).unwrap().to_f32_vec().unwrap();
            let err = rel_l2(&got, &want);
            assert!(err < 1e-2, "round {round} T={tokens}: {err:e}");
        }
    }
    assert!(p.cuda.graph_stats().replays >= 4, "{:?}", p.cuda.graph_stats());
    // A replayed graph still reports an out-of-range id, and the next forward is clean again.
    let x = random_hidden(1, 128, DType::BF16, 1).unwrap();
    let bad = TopK::from_vecs(1, 2, vec![0, 8], vec![0.5, 0.5], false).unwrap();
    let out = p.cuda.run_moe(&BackendInput::plain(x.clone()), &bad).unwrap();
    assert!(out.to_host().is_err(), "slot 8 of 8 must be refused under a graph replay");
    let good = TopK::from_vecs(1, 2, vec![4, 7], vec![0.5, 0.5], false).unwrap();
    let out = p.cuda.run_moe(&BackendInput::plain(x), &good).unwrap();
    assert!(out.to_host().is_ok());
}

#[test]
fn cublas_router_matches_reference_logits_and_ids() {
    if let Err(why) = moe_cuda::router::cublas_available() {
        eprintln!("skip cuBLAS router: {why}");
        return;
    }
    let mut ran = 0;
    for dtype in [DType::BF16, DType::F16] {
        for (name, cfg) in families(dtype) {
            let Some(hw) = usable(&cfg, name) else { continue };
            let w = MoeWeights::random(&cfg, 31).unwrap();
            let mut p = pair(&cfg, &w, full(&cfg), &hw);
            for tokens in [1usize, 37, 300] {
                let x = random_hidden(tokens, cfg.hidden_size, dtype, 900 + tokens as u64).unwrap();
                let x32 = x.to_dtype(DType::F32).unwrap();
                p.cuda.set_router_blas_min_tokens(0);
                let logits = p.cuda.router_logits(&x).unwrap();
                let ref_logits = p.reference.router_logits(&x32).unwrap();
                let err = rel_l2(&logits.to_f32_vec().unwrap(), &ref_logits.to_f32_vec().unwrap());
                assert!(err < 1e-5, "{name} {dtype} T={tokens}: cuBLAS logits rel err {err:e}");
                let ids_c = p.cuda.route(&logits).unwrap().ids().to_host().unwrap();
                let ids_r = p.reference.route(&ref_logits).unwrap().ids().to_host().unwrap();
                assert_eq!(ids_c.as_i32().unwrap(), ids_r.as_i32().unwrap(), "{name} {dtype} T={tokens}: ids differ");
                ran += 1;
            }
            // Past one SGEMM chunk (4096 tokens): logits against the warp kernel's.
            let x = random_hidden(4100, cfg.hidden_size, dtype, 77).unwrap();
            p.cuda.set_router_blas_min_tokens(0);
            let blas = p.cuda.router_logits(&x).unwrap().to_f32_vec().unwrap();
            p.cuda.set_router_blas_min_tokens(usize::MAX);
            let kernel = p.cuda.router_logits(&x).unwrap().to_f32_vec().unwrap();
            let err = rel_l2(&blas, &kernel);
            assert!(err < 1e-6, "{name} {dtype} T=4100: cuBLAS vs kernel logits rel err {err:e}");
        }
    }
    eprintln!("{ran} cuBLAS router checks");
}
