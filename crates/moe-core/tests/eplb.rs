//! Expert load balancing: the output never changes (any placement, any replica counts, before
//! and after dynamic migrations, one rank or several), the policy balances a skewed trace and
//! generalises to a fresh one, and migration moves every per-expert tensor through the right
//! index space (regression r9: staging entries outnumber slots).

use std::collections::BTreeMap;
use std::time::Duration;

use moe_core::backend::reference::ReferenceBackend;
use moe_core::backend::{ExpertBackend, Hardware, LocalWeights, SlotRange};
use moe_core::comm::{create_communication, run_in_process, CommOptions, SharedTransport, StrategyChoice};
use moe_core::config::{Activation, GroupMaskValue, MoeConfig, ParallelConfig, RoutingConfig, SharedExpertConfig};
use moe_core::eplb::migration::{apply_moves, migrate, plan_moves, BackendSlots, SlotStore};
use moe_core::eplb::trace::ZipfSkew;
use moe_core::eplb::{
    imbalance, DynamicEplb, EplbOptions, ExpertId, HostStaging, LoadBalancer, LocalSlot, Placement, Policy, SlotMove,
    StaticEplb, Topology, TransportReducer,
};
use moe_core::quant::{ExpertTensor, QuantFormat};
use moe_core::routing::{Physical, TopK};
use moe_core::weights::ExpertWeights;
use moe_core::{random_hidden, BackendRegistry, BuildOptions, ConfigurableMoe, DType, MoeError, MoeWeights, Tensor};
use rand::{Rng, SeedableRng};

fn configs() -> Vec<(&'static str, MoeConfig)> {
    let base = MoeConfig::new(8, 2, 16, 8);
    let mut v = vec![("softmax", base.clone())];
    let mut c = base.clone();
    c.routing = RoutingConfig::DeepseekV3 {
        n_group: 4,
        topk_group: 2,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
        group_mask: GroupMaskValue::Zero,
    };
    c.top_k = 3;
    c.shared_expert = Some(SharedExpertConfig { intermediate_size: 8, gated: false });
    v.push(("deepseek_v3", c));
    let mut c = base.clone();
    c.routing = RoutingConfig::GptOss;
    c.activation = Activation::GPT_OSS;
    c.router_bias = true;
    c.expert_bias = true;
    c.top_k = 4;
    v.push(("gpt_oss_biases", c));
    let mut c = base;
    c.routing = RoutingConfig::Llama4;
    c.top_k = 1;
    v.push(("llama4", c));
    v
}

fn build(cfg: &MoeConfig, eplb: Option<Box<dyn LoadBalancer>>, w: &MoeWeights) -> ConfigurableMoe {
    let opts = BuildOptions { backend: "reference".into(), comm: None, eplb };
    let mut moe = ConfigurableMoe::build(cfg.clone(), &BackendRegistry::with_reference(), &Hardware::cpu_only(), opts)
        .unwrap_or_else(|e| panic!("build: {e}"));
    moe.load_weights(w).unwrap();
    moe
}

/// Logits that send most tokens to experts 0 and 1 (a skewed workload).
fn skewed_logits(t: usize, e: usize, seed: u64) -> Tensor {
    let x = random_hidden(t, e, DType::F32, seed).unwrap().to_f32_vec().unwrap();
    let v: Vec<f32> = x.iter().enumerate().map(|(i, v)| if i % e < 2 { v + 4.0 } else { *v }).collect();
    Tensor::from_f32(vec![t, e], v).unwrap()
}

fn assert_same(name: &str, got: &Tensor, want: &Tensor) {
    let (g, w) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
    assert_eq!(g.len(), w.len(), "{name}");
    assert!(w.iter().any(|x| *x != 0.0), "{name}: the reference output is all zeros");
    let err = moe_core::compare::rel_l2(&g, &w);
    assert!(err < 1e-6, "{name}: rel L2 {err:e} between the EPLB and plain outputs");
}

fn random_placement(e: usize, slots: usize, rng: &mut rand::rngs::StdRng) -> Placement {
    // Every expert once, the rest replicas of random (often repeated) experts, shuffled.
    let mut map: Vec<usize> = (0..e).chain((e..slots).map(|_| rng.gen_range(0..e.min(3)))).collect();
    for i in (1..map.len()).rev() {
        map.swap(i, rng.gen_range(0..=i));
    }
    Placement::new(e, map.into_iter().map(ExpertId).collect()).unwrap()
}

#[test]
fn any_static_placement_keeps_the_output() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for (name, cfg) in configs() {
        let w = MoeWeights::random(&cfg, 3).unwrap();
        let x = random_hidden(13, cfg.hidden_size, cfg.act_dtype, 5).unwrap();
        let want = build(&cfg, None, &w).forward(&x).unwrap();
        for slots in [8, 9, 12, 24] {
            let mut c = cfg.clone();
            c.eplb_slots = Some(slots);
            let p = random_placement(c.num_experts, slots, &mut rng);
            let counts = p.replica_counts();
            let mut moe = build(&c, Some(Box::new(StaticEplb::new(&c, p).unwrap())), &w);
            assert_same(&format!("{name} {slots} slots, replicas {counts:?}"), &moe.forward(&x).unwrap(), &want);
        }
    }
}

#[test]
fn static_placement_must_fit_the_config() {
    let mut cfg = MoeConfig::new(8, 2, 16, 8);
    cfg.eplb_slots = Some(12);
    let p = Placement::round_robin(8, 10).unwrap();
    assert!(matches!(StaticEplb::new(&cfg, p), Err(MoeError::Config { field: "eplb_slots", .. })));
}

fn dynamic_opts(cfg: &MoeConfig) -> EplbOptions {
    EplbOptions { window: 2, interval: 2, min_gain: 0.0, ..EplbOptions::for_config(cfg) }
}

#[test]
fn dynamic_migration_keeps_the_output() {
    for (name, cfg) in configs() {
        let mut c = cfg.clone();
        c.eplb_slots = Some(12);
        c.chunk_size = Some(5);
        let w = MoeWeights::random(&c, 11).unwrap();
        let mut plain = build(&cfg, None, &w);
        let mut moe = build(&c, Some(Box::new(DynamicEplb::single_rank(&c, dynamic_opts(&c)).unwrap())), &w);
        let start = moe.eplb().slot_to_expert();
        for it in 0..6 {
            let x = random_hidden(17, c.hidden_size, c.act_dtype, 100 + it).unwrap();
            let logits = skewed_logits(17, c.num_experts, 200 + it);
            let want = plain.forward_with_logits(&x, &logits).unwrap();
            let got = moe.forward_with_logits(&x, &logits).unwrap();
            assert_same(&format!("{name} forward {it}, placement {:?}", moe.eplb().slot_to_expert()), &got, &want);
        }
        let now = moe.eplb().slot_to_expert();
        assert_ne!(start, now, "{name}: a skewed load must have moved experts");
        let hot = now.iter().filter(|&&e| e < 2).count();
        assert!(hot >= 4, "{name}: the two hot experts should hold most of the 4 extra slots: {now:?}");
        // A reload under the migrated placement still matches.
        moe.load_weights(&w).unwrap();
        let x = random_hidden(9, c.hidden_size, c.act_dtype, 1).unwrap();
        assert_same(&format!("{name} reload"), &moe.forward(&x).unwrap(), &plain.forward(&x).unwrap());
    }
}

#[test]
fn dynamic_eplb_over_in_process_ranks() {
    let cfg = configs().remove(1).1;
    for ep in [2, 4] {
        let mut c = cfg.clone();
        c.eplb_slots = Some(12);
        let w = MoeWeights::random(&c, 21).unwrap();
        let t = 12;
        let xs: Vec<Tensor> =
            (0..4).map(|i| random_hidden(t * ep, c.hidden_size, c.act_dtype, 50 + i).unwrap()).collect();
        let ls: Vec<Tensor> = (0..4).map(|i| skewed_logits(t * ep, c.num_experts, 60 + i)).collect();
        let mut plain = build(&cfg, None, &w);
        let want: Vec<Tensor> = xs.iter().zip(&ls).map(|(x, l)| plain.forward_with_logits(x, l).unwrap()).collect();
        let per_rank = run_in_process(ep, Duration::from_secs(30), |rank, tr| {
            let mut c = c.clone();
            c.parallel = ParallelConfig { ep_size: ep, ep_rank: rank };
            let shared = SharedTransport::new(Box::new(tr));
            let opts = CommOptions { choice: StrategyChoice::AllToAll, ..Default::default() };
            let (comm, _) = create_communication(&c, shared.clone(), &opts)?;
            let eplb = DynamicEplb::new(&c, dynamic_opts(&c), Box::new(TransportReducer::new(shared)))?;
            let bo = BuildOptions { backend: "reference".into(), comm: Some(comm), eplb: Some(Box::new(eplb)) };
            let mut moe = ConfigurableMoe::build(c, &BackendRegistry::with_reference(), &Hardware::cpu_only(), bo)?;
            moe.load_weights(&w)?;
            let mut outs = Vec::new();
            for (x, l) in xs.iter().zip(&ls) {
                outs.push(moe.forward_with_logits(&x.narrow_rows(rank * t, t)?, &l.narrow_rows(rank * t, t)?)?);
            }
            Ok((outs, moe.eplb().slot_to_expert()))
        })
        .unwrap_or_else(|e| panic!("ep={ep}: {e}"));
        let placement = &per_rank[0].1;
        let start: Vec<usize> = Placement::round_robin(8, 12).unwrap().slot_to_expert().iter().map(|e| e.0).collect();
        assert_ne!(placement, &start, "ep={ep}: the skewed load must have moved experts");
        for (rank, (_, p)) in per_rank.iter().enumerate() {
            assert_eq!(p, placement, "rank {rank} planned a different placement");
        }
        for (i, want) in want.iter().enumerate() {
            let parts: Vec<Tensor> = per_rank.iter().map(|(o, _)| o[i].clone()).collect();
            let got = Tensor::cat_rows(&parts, &[c.hidden_size], c.act_dtype).unwrap();
            assert_same(&format!("ep={ep} forward {i}"), &got, want);
        }
    }
}

/// The acceptance setting of the issue: top-8 of 256 experts, Zipf s = 1.2 over a random expert
/// order, 20k tokens, 8 ranks, 32 redundant slots.
#[test]
fn policy_balances_a_zipf_trace_and_generalises() {
    let (e, k, ranks, slots) = (256, 8, 8, 256 + 32);
    let f = |v: Vec<u64>| imbalance(&v.into_iter().map(|x| x as f64).collect::<Vec<_>>());
    // Expert orders whose unbalanced max/mean is 1.79 (the "about 1.8"), 2.54 and 1.47.
    for order_seed in [4, 1, 16] {
        let skew = ZipfSkew::new(e, k, 1.2, order_seed).unwrap();
        let train = skew.sample(20_000, 1).unwrap();
        let fresh = skew.sample(20_000, 2).unwrap();
        let before = f(train.rank_loads(&Placement::identity(e).unwrap(), ranks).unwrap());
        assert!(before > 1.4, "the unbalanced trace should be skewed (max/mean {before:.3})");
        let load: Vec<f64> = train.expert_counts().iter().map(|&c| c as f64).collect();
        for (policy, nodes, groups) in
            [(Policy::Global, 1, 1), (Policy::Hierarchical, 1, 8), (Policy::Hierarchical, 2, 8)]
        {
            let topo = Topology { num_slots: slots, num_ranks: ranks, num_nodes: nodes, num_groups: groups };
            let p = moe_core::eplb::rebalance(&load, topo, policy).unwrap();
            assert_eq!(p.replica_counts().iter().sum::<usize>(), slots);
            let on_train = f(train.rank_loads(&p, ranks).unwrap());
            let on_fresh = f(fresh.rank_loads(&p, ranks).unwrap());
            let what = format!("order {order_seed} {policy:?} nodes={nodes} groups={groups}");
            eprintln!("{what}: before {before:.3}, after {on_train:.4}, fresh {on_fresh:.4}");
            if nodes == 1 {
                assert!(on_train <= 1.02, "{what}: max/mean {on_train:.4} on the trace it was balanced on");
                assert!(on_fresh <= 1.10, "{what}: max/mean {on_fresh:.4} on a fresh trace");
            } else {
                // Groups pinned to nodes limit the choice; it must still beat no balancing clearly.
                assert!(on_train < 1.2 && on_fresh < 1.25, "{what}: {on_train} {on_fresh}");
            }
        }
    }
}

/// Expert weights with every kind of per-expert tensor: a quantized-style pair of parts (u8
/// payload + f32 block scales) per projection, plus both biases; each value encodes its expert.
fn tagged_weights(n: usize, tag: f32) -> ExpertWeights {
    let proj = |rows: usize, cols: usize, salt: f32| {
        let payload: Vec<f32> = (0..n * rows * cols).map(|i| ((i / (rows * cols)) as f32 + tag) * 3.0 + salt).collect();
        let u8s: Vec<u8> = payload.iter().map(|&v| (v as u32 % 251) as u8).collect();
        let scales: Vec<f32> = (0..n * 2).map(|i| (i / 2) as f32 + tag + salt / 10.0 + 0.5).collect();
        let mut parts = BTreeMap::new();
        parts.insert(
            "weight".to_string(),
            Tensor::from_host(vec![n, rows, cols], moe_core::tensor::HostData::U8(u8s)).unwrap(),
        );
        parts.insert("weight_scale_inv".to_string(), Tensor::from_f32(vec![n, 2, 1], scales).unwrap());
        ExpertTensor { format: QuantFormat::Fp8Block, experts: n, rows, cols, parts }
    };
    let bias = |w: usize, salt: f32| {
        Tensor::from_f32(vec![n, w], (0..n * w).map(|i| (i / w) as f32 * 10.0 + tag + salt).collect()).unwrap()
    };
    ExpertWeights { w13: proj(8, 4, 1.0), w2: proj(4, 4, 2.0), b13: Some(bias(8, 0.25)), b2: Some(bias(4, 0.75)) }
}

/// Row `i` of every per-expert tensor, as bytes-ish f32 for comparison.
fn expert_rows(w: &ExpertWeights, i: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for t in [&w.w13, &w.w2] {
        for p in t.parts.values() {
            let row = p.narrow_rows(i, 1).unwrap();
            out.push(match row.host().unwrap() {
                moe_core::tensor::HostData::U8(v) => v.iter().map(|&b| b as f32).collect(),
                _ => row.to_f32_vec().unwrap(),
            });
        }
    }
    for b in [&w.b13, &w.b2] {
        out.push(b.as_ref().unwrap().narrow_rows(i, 1).unwrap().to_f32_vec().unwrap());
    }
    out
}

/// Regression for issue 9 (TensorRT-LLM NVBug 6130334): a node's staging buffer has more entries
/// than a rank has routed slots, so a staging index used as a slot index goes out of bounds (or,
/// when it happens to fit, overwrites the wrong slot). Migration must read staging by staging
/// index and write slots by slot index.
#[test]
fn r9_staging_entries_outnumber_slots() {
    let staged = [7usize, 2, 5, 0, 3, 6];
    let staging = HostStaging::new(staged.iter().map(|&e| ExpertId(e)).collect(), tagged_weights(6, 100.0)).unwrap();
    let mut slots = tagged_weights(2, 0.0);
    let untouched = expert_rows(&slots, 0);
    // Expert 6 is staged at index 5 and expert 3 at index 4, both beyond the 2 routed slots.
    let moves = [SlotMove { slot: LocalSlot(1), expert: ExpertId(6) }];
    migrate(&moves, &staging, &mut slots).unwrap();
    assert_eq!(expert_rows(&slots, 1), expert_rows(staging.weights(), 5), "slot 1 holds staging entry 5");
    assert_eq!(expert_rows(&slots, 0), untouched, "slot 0 is untouched");
    let moves =
        [SlotMove { slot: LocalSlot(0), expert: ExpertId(3) }, SlotMove { slot: LocalSlot(1), expert: ExpertId(7) }];
    migrate(&moves, &staging, &mut slots).unwrap();
    assert_eq!(expert_rows(&slots, 0), expert_rows(staging.weights(), 4));
    assert_eq!(expert_rows(&slots, 1), expert_rows(staging.weights(), 0));
    // A slot beyond the routed bound, or an expert that is not staged, is refused before any write.
    let before = (expert_rows(&slots, 0), expert_rows(&slots, 1));
    for bad in [
        vec![
            SlotMove { slot: LocalSlot(0), expert: ExpertId(5) },
            SlotMove { slot: LocalSlot(4), expert: ExpertId(6) },
        ],
        vec![
            SlotMove { slot: LocalSlot(0), expert: ExpertId(5) },
            SlotMove { slot: LocalSlot(1), expert: ExpertId(1) },
        ],
    ] {
        assert!(migrate(&bad, &staging, &mut slots).is_err(), "{bad:?}");
        assert_eq!((expert_rows(&slots, 0), expert_rows(&slots, 1)), before, "a refused plan wrote nothing");
    }
}

/// The same bug class through a backend: a rank holding 2 of 8 slots migrates from a staging
/// buffer of all 8 experts and computes exactly what a backend loaded with those experts does.
#[test]
fn r9_backend_migration_from_a_larger_staging_buffer() {
    let mut cfg = MoeConfig::new(8, 2, 16, 8);
    cfg.expert_bias = true;
    cfg.parallel = ParallelConfig { ep_size: 4, ep_rank: 3 };
    let w = MoeWeights::random(&cfg, 8).unwrap();
    let range = SlotRange { start: 6, count: 2, total: 8 };
    let load = |experts: &[usize]| {
        let mut b = ReferenceBackend::new(cfg.clone());
        b.create_weights(range).unwrap();
        let lw = LocalWeights {
            router: w.router.clone(),
            experts: w.experts.select_experts(experts).unwrap(),
            shared: None,
        };
        b.load_weights(&lw).unwrap();
        b.post_load().unwrap();
        b
    };
    let mut migrated = load(&[6, 7]);
    let staging = HostStaging::all(&w.experts).unwrap();
    let moves =
        [SlotMove { slot: LocalSlot(0), expert: ExpertId(5) }, SlotMove { slot: LocalSlot(1), expert: ExpertId(2) }];
    apply_moves(&moves, &[], &staging, &mut BackendSlots::new(&mut migrated, 2)).unwrap();
    let mut direct = load(&[5, 2]);
    let t = 6;
    let x = moe_core::backend::BackendInput::plain(random_hidden(t, 16, DType::F32, 4).unwrap());
    let ids: Vec<i32> = (0..t * 2).map(|i| 6 + (i % 2) as i32).collect();
    let routing = TopK::<Physical>::from_vecs(t, 2, ids, [0.7, 0.3].repeat(t), false).unwrap();
    let a = migrated.run_moe(&x, &routing).unwrap();
    let b = direct.run_moe(&x, &routing).unwrap();
    assert_eq!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    assert!(a.to_f32_vec().unwrap().iter().any(|v| *v != 0.0));
}

#[test]
fn migration_moves_every_per_expert_tensor() {
    let staging = HostStaging::all(&tagged_weights(5, 50.0)).unwrap();
    let mut slots = tagged_weights(3, 0.0);
    let old: Vec<_> = (0..3).map(|i| expert_rows(&slots, i)).collect();
    let moves =
        [SlotMove { slot: LocalSlot(2), expert: ExpertId(4) }, SlotMove { slot: LocalSlot(0), expert: ExpertId(1) }];
    apply_moves(&moves, &[], &staging, &mut slots).unwrap();
    let (want2, want0) = (expert_rows(staging.weights(), 4), expert_rows(staging.weights(), 1));
    assert_eq!(want2.len(), 6, "two parts per projection, two biases");
    assert_eq!(expert_rows(&slots, 2), want2, "weights, scales and biases of slot 2 all moved");
    assert_eq!(expert_rows(&slots, 0), want0);
    assert_eq!(expert_rows(&slots, 1), old[1]);
    // Half of a bias pair missing is refused, never half-migrated silently.
    let mut no_bias = tagged_weights(3, 0.0);
    no_bias.b2 = None;
    assert!(migrate(&moves, &staging, &mut no_bias).is_err());
}

/// A store whose `fail_at`-th write fails: the slots written before it must be restored.
struct Flaky {
    inner: ExpertWeights,
    writes: usize,
    fail_at: usize,
}

impl SlotStore for Flaky {
    fn num_slots(&self) -> usize {
        self.inner.num_experts()
    }

    fn write_slot(&mut self, slot: LocalSlot, from: &ExpertWeights, src: usize) -> moe_core::Result<()> {
        self.writes += 1;
        if self.writes == self.fail_at {
            return Err(MoeError::Device("injected copy failure".into()));
        }
        self.inner.write_slot(slot, from, src)
    }
}

#[test]
fn failed_migration_restores_the_old_slots() {
    let all = tagged_weights(6, 10.0);
    let staging = HostStaging::all(&all).unwrap();
    let old = Placement::new(6, [0, 1, 2, 3, 4, 5].map(ExpertId).to_vec()).unwrap();
    let new = Placement::new(6, [5, 4, 2, 3, 1, 0].map(ExpertId).to_vec()).unwrap();
    let range = SlotRange { start: 0, count: 6, total: 6 };
    let moves = plan_moves(&old, &new, range).unwrap();
    let undo = plan_moves(&new, &old, range).unwrap();
    assert_eq!(moves.len(), 4);
    let mut store = Flaky { inner: all.clone(), writes: 0, fail_at: 3 };
    let before: Vec<_> = (0..6).map(|i| expert_rows(&store.inner, i)).collect();
    assert!(apply_moves(&moves, &undo, &staging, &mut store).is_err());
    let after: Vec<_> = (0..6).map(|i| expert_rows(&store.inner, i)).collect();
    assert_eq!(before, after, "the slots written before the failure were restored");
}

#[test]
fn dynamic_balancer_needs_staged_weights_and_a_reducer_for_several_ranks() {
    let mut cfg = MoeConfig::new(8, 2, 16, 8);
    cfg.eplb_slots = Some(16);
    cfg.parallel = ParallelConfig { ep_size: 2, ep_rank: 0 };
    let err = DynamicEplb::single_rank(&cfg, EplbOptions::for_config(&cfg)).unwrap_err();
    assert!(err.to_string().contains("reducer"), "{err}");
    let bad = EplbOptions { interval: 0, ..EplbOptions::for_config(&cfg) };
    cfg.parallel = ParallelConfig::default();
    assert!(DynamicEplb::single_rank(&cfg, bad).is_err());
}

/// The reference backend whose slot writes fail on rank 1 (an injected device copy failure).
#[derive(Debug)]
struct FailsOnRank1(ReferenceBackend, usize);

impl ExpertBackend for FailsOnRank1 {
    fn name(&self) -> &str {
        "fails_on_rank1"
    }
    fn create_weights(&mut self, slots: SlotRange) -> moe_core::Result<()> {
        self.0.create_weights(slots)
    }
    fn load_weights(&mut self, w: &LocalWeights) -> moe_core::Result<()> {
        self.0.load_weights(w)
    }
    fn post_load(&mut self) -> moe_core::Result<()> {
        self.0.post_load()
    }
    fn router_logits(&mut self, hidden: &Tensor) -> moe_core::Result<Tensor> {
        self.0.router_logits(hidden)
    }
    fn route(&mut self, logits: &Tensor) -> moe_core::Result<TopK<moe_core::Logical>> {
        self.0.route(logits)
    }
    fn quantize_input(&mut self, hidden: &Tensor) -> moe_core::Result<moe_core::BackendInput> {
        self.0.quantize_input(hidden)
    }
    fn run_moe(&mut self, input: &moe_core::BackendInput, routing: &TopK<Physical>) -> moe_core::Result<Tensor> {
        self.0.run_moe(input, routing)
    }
    fn finalize(&mut self, hidden: &Tensor, routed: Tensor) -> moe_core::Result<Tensor> {
        self.0.finalize(hidden, routed)
    }
    fn replace_slot(&mut self, slot: usize, weights: &ExpertWeights, src: usize) -> moe_core::Result<()> {
        if self.1 == 1 {
            return Err(MoeError::Device("injected slot copy failure".into()));
        }
        self.0.replace_slot(slot, weights, src)
    }
}

struct FailsOnRank1Provider;

impl moe_core::BackendProvider for FailsOnRank1Provider {
    fn name(&self) -> &'static str {
        "fails_on_rank1"
    }
    fn priority(&self) -> i32 {
        -1
    }
    fn description(&self) -> &'static str {
        "reference whose slot writes fail on rank 1 (test only)"
    }
    fn can_implement(&self, _cfg: &MoeConfig, _hw: &Hardware) -> Result<(), String> {
        Ok(())
    }
    fn create(&self, cfg: &MoeConfig, _hw: &Hardware) -> moe_core::Result<Box<dyn ExpertBackend>> {
        Ok(Box::new(FailsOnRank1(ReferenceBackend::new(cfg.clone()), cfg.parallel.ep_rank)))
    }
}

/// A migration that fails on one rank is undone on every rank: all keep the old placement, the
/// ranks that had written their slots restore them, and the next forward is still exact.
#[test]
fn a_migration_failing_on_one_rank_is_undone_on_all() {
    let mut c = configs().remove(0).1;
    c.eplb_slots = Some(12);
    let w = MoeWeights::random(&c, 31).unwrap();
    let (ep, t) = (4, 6);
    let x = random_hidden(t * ep, c.hidden_size, c.act_dtype, 3).unwrap();
    let l = skewed_logits(t * ep, c.num_experts, 4);
    let mut plain_cfg = c.clone();
    plain_cfg.eplb_slots = None;
    let want = build(&plain_cfg, None, &w).forward_with_logits(&x, &l).unwrap();
    let start: Vec<usize> = Placement::round_robin(8, 12).unwrap().slot_to_expert().iter().map(|e| e.0).collect();
    let per_rank = run_in_process(ep, Duration::from_secs(30), |rank, tr| {
        let mut c = c.clone();
        c.parallel = ParallelConfig { ep_size: ep, ep_rank: rank };
        let shared = SharedTransport::new(Box::new(tr));
        let opts = CommOptions { choice: StrategyChoice::AllGatherReduceScatter, ..Default::default() };
        let (comm, _) = create_communication(&c, shared.clone(), &opts)?;
        let eplb = DynamicEplb::new(&c, dynamic_opts(&c), Box::new(TransportReducer::new(shared)))?;
        let mut registry = BackendRegistry::new();
        registry.register(Box::new(FailsOnRank1Provider));
        let bo = BuildOptions { backend: "fails_on_rank1".into(), comm: Some(comm), eplb: Some(Box::new(eplb)) };
        let mut moe = ConfigurableMoe::build(c, &registry, &Hardware::cpu_only(), bo)?;
        moe.load_weights(&w)?;
        let (xr, lr) = (x.narrow_rows(rank * t, t)?, l.narrow_rows(rank * t, t)?);
        moe.forward_with_logits(&xr, &lr)?;
        // The second forward ends the interval: the plan migrates, rank 1 fails.
        let failed = moe.forward_with_logits(&xr, &lr).map(|_| ()).map_err(|e| e.to_string());
        let out = moe.forward_with_logits(&xr, &lr)?;
        Ok((failed, moe.eplb().slot_to_expert(), out))
    })
    .unwrap();
    for (rank, (failed, placement, _)) in per_rank.iter().enumerate() {
        let err = failed.as_ref().expect_err("every rank reports the failed migration");
        let want_msg = if rank == 1 { "injected" } else { "other rank" };
        assert!(err.contains(want_msg), "rank {rank}: {err}");
        assert_eq!(placement, &start, "rank {rank} kept the old placement");
    }
    let parts: Vec<Tensor> = per_rank.iter().map(|(_, _, o)| o.clone()).collect();
    let got = Tensor::cat_rows(&parts, &[c.hidden_size], c.act_dtype).unwrap();
    assert_same("after an undone migration", &got, &want);
}
