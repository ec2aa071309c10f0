//! Expert parallelism on the CPU: in-process ranks (one thread each) must give the single-rank
//! reference output for every routing method, both strategies and ep_size 1, 2, 4, 8, including
//! ranks with zero tokens, skewed routing, uneven token counts and chunking. Start-up checks
//! (config hash, rendezvous, timeouts) run across real processes on 127.0.0.1.

use std::process::Command;
use std::time::Duration;

use moe_core::backend::Hardware;
use moe_core::comm::rendezvous::{free_local_port, rendezvous, RendezvousConfig};
use moe_core::comm::tcp::TcpTransport;
use moe_core::comm::transport::config_hash;
use moe_core::comm::{create_communication, run_in_process, CommOptions, CommStats, SharedTransport, StrategyChoice};
use moe_core::compare::{rel_l2_tensors, tolerance};
use moe_core::config::{
    Activation, GroupMaskValue, MoeConfig, ParallelConfig, RoutingConfig, SharedExpertConfig, V2TopkMethod,
};
use moe_core::{random_hidden, BackendRegistry, BuildOptions, ConfigurableMoe, DType, MoeError, MoeWeights, Tensor};

const TIMEOUT: Duration = Duration::from_secs(30);

/// One config per routing method (16 experts split over 1, 2, 4 and 8 ranks).
fn configs() -> Vec<(&'static str, MoeConfig)> {
    let base = MoeConfig::new(16, 2, 24, 12);
    let mut v = Vec::new();
    v.push(("softmax_renorm", base.clone()));
    let mut c = base.clone();
    c.routing = RoutingConfig::SoftmaxTopk { renormalize: false };
    c.top_k = 3;
    c.shared_expert = Some(SharedExpertConfig { intermediate_size: 8, gated: true });
    v.push(("softmax_qwen2_shared", c));
    let mut c = base.clone();
    c.routing = RoutingConfig::DeepseekV3 {
        n_group: 4,
        topk_group: 2,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
        group_mask: GroupMaskValue::Zero,
    };
    c.top_k = 4;
    c.shared_expert = Some(SharedExpertConfig { intermediate_size: 16, gated: false });
    v.push(("deepseek_v3", c));
    let mut c = base.clone();
    c.routing = RoutingConfig::DeepseekV2 {
        method: V2TopkMethod::GroupLimitedGreedy { n_group: 4, topk_group: 2 },
        norm_topk_prob: false,
        routed_scaling_factor: 1.5,
    };
    v.push(("deepseek_v2_group", c));
    let mut c = base.clone();
    c.routing =
        RoutingConfig::DeepseekV2 { method: V2TopkMethod::Greedy, norm_topk_prob: true, routed_scaling_factor: 1.0 };
    v.push(("deepseek_v2_greedy", c));
    let mut c = base.clone();
    c.routing = RoutingConfig::GptOss;
    c.activation = Activation::GPT_OSS;
    c.router_bias = true;
    c.expert_bias = true;
    c.top_k = 4;
    v.push(("gpt_oss", c));
    let mut c = base;
    c.routing = RoutingConfig::Llama4;
    c.top_k = 1;
    c.shared_expert = Some(SharedExpertConfig { intermediate_size: 12, gated: false });
    v.push(("llama4", c));
    v
}

/// Uneven token counts per rank, zeros included whenever there is more than one rank.
fn split(total_hint: usize, ep: usize) -> Vec<usize> {
    if ep == 1 {
        return vec![total_hint];
    }
    (0..ep).map(|r| if r % 3 == 1 { 0 } else { (r * 5 + 3) % 7 + 1 }).collect()
}

fn reference(cfg: &MoeConfig, w: &MoeWeights, x: &Tensor, logits: Option<&Tensor>) -> Tensor {
    let registry = BackendRegistry::with_reference();
    let opts = BuildOptions { backend: "reference".into(), ..Default::default() };
    let mut moe = ConfigurableMoe::build(cfg.clone(), &registry, &Hardware::cpu_only(), opts).unwrap();
    moe.load_weights(w).unwrap();
    match logits {
        Some(l) => moe.forward_with_logits(x, l).unwrap(),
        None => moe.forward(x).unwrap(),
    }
}

/// Runs `ep` in-process ranks; rank `r` forwards rows `[off_r, off_r + counts[r])` of `x`.
fn run_ep(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    logits: Option<&Tensor>,
    counts: &[usize],
    choice: StrategyChoice,
) -> moe_core::Result<(Tensor, Vec<CommStats>, Vec<String>)> {
    let ep = counts.len();
    let offsets: Vec<usize> = counts.iter().scan(0, |a, &c| Some(std::mem::replace(a, *a + c))).collect();
    let outs = run_in_process(ep, TIMEOUT, |rank, t| {
        let mut c = cfg.clone();
        c.parallel = ParallelConfig { ep_size: ep, ep_rank: rank };
        let shared = SharedTransport::new(Box::new(t));
        let opts = CommOptions { choice, ..Default::default() };
        let (comm, stats) = create_communication(&c, shared, &opts)?;
        let registry = BackendRegistry::with_reference();
        let bo = BuildOptions { backend: "reference".into(), comm: Some(comm), eplb: None };
        let mut moe = ConfigurableMoe::build(c, &registry, &Hardware::cpu_only(), bo)?;
        moe.load_weights(w)?;
        let xr = x.narrow_rows(offsets[rank], counts[rank])?;
        let out = match logits {
            Some(l) => moe.forward_with_logits(&xr, &l.narrow_rows(offsets[rank], counts[rank])?)?,
            None => moe.forward(&xr)?,
        };
        let s = stats.lock().unwrap().clone();
        Ok((out, s, moe.comm_name().to_string()))
    })?;
    let dtype = outs[0].0.dtype();
    let h = cfg.hidden_size;
    let mut parts = Vec::new();
    let mut stats = Vec::new();
    let mut names = Vec::new();
    for (o, s, n) in outs {
        parts.push(o.to_host()?);
        stats.push(s);
        names.push(n);
    }
    Ok((Tensor::cat_rows(&parts, &[h], dtype)?, stats, names))
}

fn check(name: &str, cfg: &MoeConfig, ep: usize, choice: StrategyChoice, logits_fn: Option<&dyn Fn(usize) -> Tensor>) {
    let counts = split(11, ep);
    let t: usize = counts.iter().sum();
    let w = MoeWeights::random(cfg, 42 + ep as u64).unwrap();
    let x = random_hidden(t, cfg.hidden_size, cfg.act_dtype, 7 * ep as u64 + 1).unwrap();
    let logits = logits_fn.map(|f| f(t));
    let want = reference(cfg, &w, &x, logits.as_ref());
    let (got, stats, names) = run_ep(cfg, &w, &x, logits.as_ref(), &counts, choice)
        .unwrap_or_else(|e| panic!("{name} ep={ep} {choice:?}: {e}"));
    let err = rel_l2_tensors(&got, &want).unwrap();
    let tol = tolerance(cfg.act_dtype, cfg.weight_dtype, cfg.quant);
    assert!(err < tol, "{name} ep={ep} {choice:?} counts={counts:?}: rel L2 {err:e} >= {tol:e}");
    assert!(names.iter().all(|n| n == choice.name()), "{names:?}");
    if ep > 1 {
        // every rank ran the same number of chunks, zero-token ranks included
        assert!(stats.iter().all(|s| s.chunks == stats[0].chunks && s.chunks >= 1), "{stats:?}");
        assert!(stats.iter().map(|s| s.dispatch_bytes).sum::<u64>() > 0);
    }
}

const STRATEGIES: [StrategyChoice; 2] = [StrategyChoice::AllGatherReduceScatter, StrategyChoice::AllToAll];

#[test]
fn every_routing_method_matches_one_rank() {
    for (name, cfg) in configs() {
        for ep in [1, 2, 4, 8] {
            for choice in STRATEGIES {
                check(name, &cfg, ep, choice, None);
            }
        }
    }
}

#[test]
fn chunking_with_uneven_and_zero_token_ranks() {
    for (name, mut cfg) in configs().into_iter().take(3) {
        cfg.chunk_size = Some(3);
        for ep in [2, 4, 8] {
            for choice in STRATEGIES {
                check(name, &cfg, ep, choice, None);
            }
        }
    }
}

#[test]
fn skewed_routing_all_tokens_to_one_rank() {
    let cfg = configs().remove(0);
    for ep in [2, 4, 8] {
        let per = 16 / ep;
        // every token prefers the experts of the last rank
        let hot = 16 - per;
        let logits = move |t: usize| {
            let x = random_hidden(t, 16, DType::F32, 99).unwrap().to_f32_vec().unwrap();
            let v: Vec<f32> = x.iter().enumerate().map(|(i, v)| if i % 16 >= hot { v + 20.0 } else { *v }).collect();
            Tensor::from_f32(vec![t, 16], v).unwrap()
        };
        for choice in STRATEGIES {
            check("skewed", &cfg.1, ep, choice, Some(&logits));
        }
    }
}

#[test]
fn bf16_activations_within_tolerance() {
    let mut cfg = configs().remove(2).1;
    cfg.act_dtype = DType::BF16;
    cfg.weight_dtype = DType::BF16;
    for choice in STRATEGIES {
        check("deepseek_v3_bf16", &cfg, 4, choice, None);
    }
}

#[test]
fn all_ranks_with_zero_tokens_still_run() {
    let cfg = configs().remove(0).1;
    let w = MoeWeights::random(&cfg, 1).unwrap();
    let x = random_hidden(0, cfg.hidden_size, cfg.act_dtype, 1).unwrap();
    for choice in STRATEGIES {
        let (out, stats, _) = run_ep(&cfg, &w, &x, None, &[0, 0, 0, 0], choice).unwrap();
        assert_eq!(out.shape(), &[0, cfg.hidden_size]);
        assert!(stats.iter().all(|s| s.chunks == 1));
    }
}

#[test]
fn auto_picks_by_workload_and_all_ranks_agree() {
    let cfg = configs().remove(0).1;
    let w = MoeWeights::random(&cfg, 3).unwrap();
    let x = random_hidden(8, cfg.hidden_size, cfg.act_dtype, 3).unwrap();
    let (_, _, names) = run_ep(&cfg, &w, &x, None, &[2, 2, 2, 2], StrategyChoice::Auto).unwrap();
    assert!(names.iter().all(|n| n == &names[0]), "{names:?}");
    let (_, _, names) = run_ep(&cfg, &w, &x, None, &[8], StrategyChoice::Auto).unwrap();
    assert_eq!(names, vec!["local".to_string()]);
}

#[test]
fn mismatched_configs_fail_on_every_rank_at_start() {
    let cfg = configs().remove(0).1;
    let errs: Vec<MoeError> = run_in_process(3, TIMEOUT, |rank, t| {
        let mut c = cfg.clone();
        c.parallel = ParallelConfig { ep_size: 3, ep_rank: rank };
        c.eplb_slots = Some(18);
        if rank == 2 {
            c.chunk_size = Some(5);
        }
        match create_communication(&c, SharedTransport::new(Box::new(t)), &CommOptions::default()) {
            Ok(_) => Ok(None),
            Err(e) => Ok(Some(e)),
        }
    })
    .unwrap()
    .into_iter()
    .map(|e| e.expect("every rank must fail"))
    .collect();
    for e in errs {
        let m = e.to_string();
        assert!(m.contains("disagree about the MoE config") && m.contains("ranks 2"), "{m}");
    }
}

#[test]
fn different_strategy_requests_are_refused() {
    let cfg = configs().remove(0).1;
    let err = run_in_process(2, TIMEOUT, |rank, t| {
        let mut c = cfg.clone();
        c.parallel = ParallelConfig { ep_size: 2, ep_rank: rank };
        let choice = if rank == 0 { StrategyChoice::AllToAll } else { StrategyChoice::AllGatherReduceScatter };
        create_communication(&c, SharedTransport::new(Box::new(t)), &CommOptions { choice, ..Default::default() })
            .map(|_| ())
    })
    .unwrap_err();
    assert!(err.to_string().contains("different communication strategies"), "{err}");
}

#[test]
fn a_rank_failing_mid_forward_ends_the_others_with_an_error() {
    let cfg = configs().remove(0).1;
    let w = MoeWeights::random(&cfg, 5).unwrap();
    let start = std::time::Instant::now();
    let err = run_in_process(4, TIMEOUT, |rank, t| {
        let mut c = cfg.clone();
        c.parallel = ParallelConfig { ep_size: 4, ep_rank: rank };
        let (comm, _) = create_communication(&c, SharedTransport::new(Box::new(t)), &CommOptions::default())?;
        let registry = BackendRegistry::with_reference();
        let bo = BuildOptions { backend: "reference".into(), comm: Some(comm), eplb: None };
        let mut moe = ConfigurableMoe::build(c, &registry, &Hardware::cpu_only(), bo)?;
        moe.load_weights(&w)?;
        // rank 3 feeds a NaN, which routing refuses before any collective of the chunk
        let mut x = random_hidden(4, cfg.hidden_size, cfg.act_dtype, rank as u64).unwrap().to_f32_vec()?;
        if rank == 3 {
            x[0] = f32::NAN;
        }
        moe.forward(&Tensor::from_f32(vec![4, cfg.hidden_size], x)?).map(|_| ())
    })
    .unwrap_err();
    assert!(matches!(err, MoeError::NonFinite { .. }), "the root cause must be reported, got: {err}");
    assert!(start.elapsed() < Duration::from_secs(10), "peers must not wait for the timeout");
}

// ---- rendezvous across processes ----

const CHILD_ENV: &str = "MOE_EP_TEST_CHILD";

/// Not a test on its own: the body runs only in child processes spawned by the tests below.
/// Variants: `same` / `different` (rendezvous only), `forward-<strategy>` (a real forward over
/// the TCP transport, outputs gathered and checked on rank 0), `die` (exits mid-run).
#[test]
fn rendezvous_child_process() {
    let Ok(variant) = std::env::var(CHILD_ENV) else { return };
    let rdv = RendezvousConfig::resolve(None, None, None, None, None).unwrap().expect("RANK and WORLD_SIZE are set");
    let mut cfg = configs().remove(2).1; // deepseek_v3 with a shared expert
    cfg.parallel = ParallelConfig { ep_size: rdv.world_size, ep_rank: rdv.rank };
    if variant == "different" {
        cfg.hidden_size = 32;
    }
    let hash = config_hash(&cfg).unwrap();
    if variant == "same" || variant == "different" {
        let res = rendezvous(&rdv, &hash, || Ok(format!("unique-id-from-pid-{}", std::process::id()).into_bytes()));
        match res {
            Ok(p) => println!("RDV_RESULT ok {}", String::from_utf8_lossy(&p)),
            Err(e) => println!("RDV_RESULT err {e}"),
        }
        return;
    }
    match child_forward(&rdv, &hash, cfg, &variant) {
        Ok(msg) => println!("RDV_RESULT ok {msg}"),
        Err(e) => println!("RDV_RESULT err {e}"),
    }
}

fn child_forward(rdv: &RendezvousConfig, hash: &[u8; 32], cfg: MoeConfig, variant: &str) -> moe_core::Result<String> {
    let transport = TcpTransport::connect(rdv, hash, Duration::from_secs(20))?;
    let shared = SharedTransport::new(Box::new(transport));
    let choice = StrategyChoice::parse(variant.strip_prefix("forward-").unwrap_or("auto"))?;
    let (comm, _) = create_communication(&cfg, shared.clone(), &CommOptions { choice, ..Default::default() })?;
    if variant == "die" && rdv.rank == 2 {
        println!("RDV_RESULT died");
        std::process::exit(3);
    }
    let registry = BackendRegistry::with_reference();
    let bo = BuildOptions { backend: "reference".into(), comm: Some(comm), eplb: None };
    let mut moe = ConfigurableMoe::build(cfg.clone(), &registry, &Hardware::cpu_only(), bo)?;
    let w = MoeWeights::random(&cfg, 11)?;
    moe.load_weights(&w)?;
    let counts = split(11, rdv.world_size);
    let t: usize = counts.iter().sum();
    let x = random_hidden(t, cfg.hidden_size, cfg.act_dtype, 5)?;
    let off: usize = counts[..rdv.rank].iter().sum();
    let out = moe.forward(&x.narrow_rows(off, counts[rdv.rank])?)?;
    // gather every rank's rows and compare with one rank on the whole input
    let h = cfg.hidden_size;
    let sizes: Vec<usize> = counts.iter().map(|c| c * h * 4).collect();
    let mine = moe_core::comm::transport::f32_to_bytes(&out.to_f32_vec()?);
    let parts = shared.lock()?.all_gather_v(&mine, &sizes)?;
    let all: Vec<f32> = parts.concat().chunks_exact(4).map(moe_core::comm::transport::f32_from).collect();
    let mut one = cfg.clone();
    one.parallel = ParallelConfig::default();
    let want = reference(&one, &w, &x, None);
    let err = moe_core::compare::rel_l2(&all, &want.to_f32_vec()?);
    Ok(format!("{} rel_l2={err:e}", moe.comm_name()))
}

/// Spawns one child per `(rank, variant)` and returns each child's result line.
fn spawn_ranks(world: usize, ranks: &[(usize, &str)], timeout_s: f64) -> Vec<String> {
    let port = free_local_port().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = ranks
        .iter()
        .map(|(rank, variant)| {
            Command::new(&exe)
                .args(["--exact", "rendezvous_child_process", "--nocapture", "--test-threads", "1"])
                .env(CHILD_ENV, variant)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("MOE_RENDEZVOUS_TIMEOUT_S", timeout_s.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            // the harness may print `test name ... ` on the same line
            let line = s.lines().find_map(|l| l.find("RDV_RESULT").map(|i| l[i..].to_string()));
            line.unwrap_or_else(|| panic!("no result line in: {s}"))
        })
        .collect()
}

#[test]
fn processes_exchange_the_unique_id() {
    let lines = spawn_ranks(3, &[(2, "same"), (1, "same"), (0, "same")], 20.0);
    let first = &lines[0];
    assert!(first.starts_with("RDV_RESULT ok unique-id-from-pid-"), "{lines:?}");
    assert!(lines.iter().all(|l| l == first), "every rank must get rank 0's id: {lines:?}");
}

#[test]
fn processes_detect_a_config_mismatch() {
    let lines = spawn_ranks(3, &[(0, "same"), (1, "same"), (2, "different")], 20.0);
    for l in &lines {
        assert!(l.starts_with("RDV_RESULT err") && l.contains("config hash mismatch: ranks 2"), "{lines:?}");
    }
}

#[test]
fn processes_time_out_when_a_rank_never_arrives() {
    let start = std::time::Instant::now();
    let lines = spawn_ranks(3, &[(0, "same"), (1, "same")], 1.0);
    assert!(lines[0].contains("ranks 2 did not arrive"), "{lines:?}");
    assert!(lines[1].contains("rank 0 reports") && lines[1].contains("ranks 2 did not arrive"), "{lines:?}");
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn processes_run_a_forward_over_tcp_equal_to_one_rank() {
    for strategy in ["all_to_all", "allgather_reducescatter"] {
        let v = format!("forward-{strategy}");
        let lines = spawn_ranks(4, &[(0, &v), (1, &v), (2, &v), (3, &v)], 20.0);
        for l in &lines {
            let err: f64 =
                l.split("rel_l2=").nth(1).and_then(|x| x.trim().parse().ok()).unwrap_or_else(|| panic!("{lines:?}"));
            assert!(l.contains(strategy) && err < 1e-5, "{lines:?}");
        }
    }
}

#[test]
fn a_process_that_dies_ends_the_others_with_an_error() {
    let start = std::time::Instant::now();
    let lines = spawn_ranks(4, &[(0, "die"), (1, "die"), (2, "die"), (3, "die")], 20.0);
    assert_eq!(lines[2], "RDV_RESULT died");
    for l in [&lines[0], &lines[1], &lines[3]] {
        assert!(l.starts_with("RDV_RESULT err") && l.contains("left the group"), "{lines:?}");
    }
    assert!(start.elapsed() < Duration::from_secs(15), "peers must fail fast, not at the 20 s timeout");
}

// ---- device-resident tensors (as a GPU backend returns them) ----

/// Host data posing as device storage.
#[derive(Debug)]
struct FakeDevice(moe_core::tensor::HostData);

impl moe_core::tensor::DeviceStorage for FakeDevice {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn location(&self) -> String {
        "fake:0".into()
    }
    fn to_host(&self) -> moe_core::Result<moe_core::tensor::HostData> {
        Ok(self.0.clone())
    }
}

fn on_device(t: Tensor) -> Tensor {
    let host = t.host().unwrap().clone();
    Tensor::from_device(t.shape().to_vec(), t.dtype(), std::sync::Arc::new(FakeDevice(host)))
}

/// The reference backend, but routing, activations and partial outputs live "on the device".
#[derive(Debug)]
struct DeviceLike(moe_core::backend::reference::ReferenceBackend);

impl moe_core::ExpertBackend for DeviceLike {
    fn name(&self) -> &str {
        "device_like"
    }
    fn create_weights(&mut self, slots: moe_core::SlotRange) -> moe_core::Result<()> {
        self.0.create_weights(slots)
    }
    fn load_weights(&mut self, w: &moe_core::LocalWeights) -> moe_core::Result<()> {
        self.0.load_weights(w)
    }
    fn post_load(&mut self) -> moe_core::Result<()> {
        self.0.post_load()
    }
    fn router_logits(&mut self, hidden: &Tensor) -> moe_core::Result<Tensor> {
        Ok(on_device(self.0.router_logits(&hidden.to_host()?)?))
    }
    fn route(&mut self, logits: &Tensor) -> moe_core::Result<moe_core::TopK<moe_core::Logical>> {
        let r = self.0.route(&logits.to_host()?)?;
        moe_core::TopK::new(on_device(r.ids().clone()), on_device(r.weights().clone()), r.weights_on_input())
    }
    fn quantize_input(&mut self, hidden: &Tensor) -> moe_core::Result<moe_core::BackendInput> {
        Ok(moe_core::BackendInput::plain(on_device(hidden.to_host()?)))
    }
    fn run_moe(
        &mut self,
        input: &moe_core::BackendInput,
        routing: &moe_core::TopK<moe_core::Physical>,
    ) -> moe_core::Result<Tensor> {
        let host_in = moe_core::BackendInput::plain(input.hidden.to_host()?);
        let host_r =
            moe_core::TopK::new(routing.ids().to_host()?, routing.weights().to_host()?, routing.weights_on_input())?;
        Ok(on_device(self.0.run_moe(&host_in, &host_r)?))
    }
    fn finalize(&mut self, hidden: &Tensor, routed: Tensor) -> moe_core::Result<Tensor> {
        self.0.finalize(&hidden.to_host()?, routed.to_host()?)
    }
}

struct DeviceLikeProvider;

impl moe_core::BackendProvider for DeviceLikeProvider {
    fn name(&self) -> &'static str {
        "device_like"
    }
    fn priority(&self) -> i32 {
        -1
    }
    fn description(&self) -> &'static str {
        "reference with device-resident tensors (test only)"
    }
    fn can_implement(&self, _cfg: &MoeConfig, _hw: &Hardware) -> Result<(), String> {
        Ok(())
    }
    fn create(&self, cfg: &MoeConfig, _hw: &Hardware) -> moe_core::Result<Box<dyn moe_core::ExpertBackend>> {
        Ok(Box::new(DeviceLike(moe_core::backend::reference::ReferenceBackend::new(cfg.clone()))))
    }
}

#[test]
fn device_resident_routing_and_activations_are_dispatched() {
    let cfg = configs().remove(2).1;
    let w = MoeWeights::random(&cfg, 21).unwrap();
    let counts = [3usize, 0, 5, 2];
    let t: usize = counts.iter().sum();
    let x = random_hidden(t, cfg.hidden_size, cfg.act_dtype, 21).unwrap();
    let want = reference(&cfg, &w, &x, None);
    for choice in STRATEGIES {
        let outs = run_in_process(4, TIMEOUT, |rank, tr| {
            let mut c = cfg.clone();
            c.parallel = ParallelConfig { ep_size: 4, ep_rank: rank };
            let opts = CommOptions { choice, ..Default::default() };
            let (comm, _) = create_communication(&c, SharedTransport::new(Box::new(tr)), &opts)?;
            let mut registry = BackendRegistry::new();
            registry.register(Box::new(DeviceLikeProvider));
            let bo = BuildOptions { backend: "device_like".into(), comm: Some(comm), eplb: None };
            let mut moe = ConfigurableMoe::build(c, &registry, &Hardware::cpu_only(), bo)?;
            moe.load_weights(&w)?;
            let off: usize = counts[..rank].iter().sum();
            moe.forward(&x.narrow_rows(off, counts[rank])?)
        })
        .unwrap_or_else(|e| panic!("{choice:?}: {e}"));
        let got = Tensor::cat_rows(&outs, &[cfg.hidden_size], outs[0].dtype()).unwrap();
        let err = rel_l2_tensors(&got, &want).unwrap();
        assert!(err < 1e-5, "{choice:?}: rel L2 {err:e}");
    }
}
