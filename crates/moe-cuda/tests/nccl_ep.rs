//! The NCCL transport on one GPU: world size 1 through the same strategy code as several ranks
//! must equal the local path; the collectives and the device-resident bandwidth path run end to
//! end; a rank that never arrives ends creation with an error after the timeout. Without a GPU
//! or libnccl every test prints why and passes.

use std::time::{Duration, Instant};

use moe_core::backend::Hardware;
use moe_core::comm::rendezvous::{free_local_port, RendezvousConfig};
use moe_core::comm::transport::{config_hash, ReduceOp, Transport};
use moe_core::comm::{create_communication, CommOptions, SharedTransport, StrategyChoice};
use moe_core::compare::rel_l2_tensors;
use moe_core::config::{MoeConfig, RoutingConfig, SharedExpertConfig};
use moe_core::{random_hidden, BackendRegistry, BuildOptions, ConfigurableMoe, MoeWeights};
use moe_cuda::nccl::{self, NcclTransport};

fn gpu() -> bool {
    match nccl::probe() {
        Ok(info) => {
            println!("NCCL {} with {} device(s)", info.version, info.devices);
            true
        }
        Err(reason) => {
            println!("skipped: {reason}");
            false
        }
    }
}

const T: Duration = Duration::from_secs(60);

#[test]
fn world_one_strategies_equal_the_local_path() {
    if !gpu() {
        return;
    }
    let mut cfg = MoeConfig::new(16, 4, 64, 32);
    cfg.routing = RoutingConfig::SoftmaxTopk { renormalize: false };
    cfg.shared_expert = Some(SharedExpertConfig { intermediate_size: 16, gated: true });
    cfg.chunk_size = Some(5);
    let w = MoeWeights::random(&cfg, 9).unwrap();
    let x = random_hidden(13, cfg.hidden_size, cfg.act_dtype, 9).unwrap();
    let registry = BackendRegistry::with_reference();
    let hw = Hardware::cpu_only();
    let mut local = ConfigurableMoe::build(
        cfg.clone(),
        &registry,
        &hw,
        BuildOptions { backend: "reference".into(), ..Default::default() },
    )
    .unwrap();
    local.load_weights(&w).unwrap();
    let want = local.forward(&x).unwrap();
    for choice in [StrategyChoice::AllToAll, StrategyChoice::AllGatherReduceScatter] {
        let t = NcclTransport::local_group(&[0], T).unwrap().pop().unwrap();
        let (comm, stats) = create_communication(
            &cfg,
            SharedTransport::new(Box::new(t)),
            &CommOptions { choice, ..Default::default() },
        )
        .unwrap();
        let bo = BuildOptions { backend: "reference".into(), comm: Some(comm), eplb: None };
        let mut moe = ConfigurableMoe::build(cfg.clone(), &registry, &hw, bo).unwrap();
        moe.load_weights(&w).unwrap();
        let got = moe.forward(&x).unwrap();
        let err = rel_l2_tensors(&got, &want).unwrap();
        assert!(err <= 1e-7, "{choice:?}: rel L2 {err:e} vs the local path");
        assert_eq!(stats.lock().unwrap().chunks, 3, "13 tokens in chunks of 5");
        println!("{}: rel L2 vs local {err:e}", choice.name());
    }
}

#[test]
fn collectives_and_bandwidth_path_run_end_to_end() {
    if !gpu() {
        return;
    }
    // world 1 through the rendezvous code path too (no peer, the id is made locally)
    let mut cfg = MoeConfig::new(8, 2, 16, 8);
    cfg.parallel.ep_size = 1;
    let rdv = RendezvousConfig {
        rank: 0,
        world_size: 1,
        master_addr: "127.0.0.1".into(),
        master_port: free_local_port().unwrap(),
        timeout: T,
    };
    let mut t = NcclTransport::from_rendezvous(&rdv, &config_hash(&cfg).unwrap(), T).unwrap();
    let mut v = [1.5f32, -2.0, 3.0];
    t.all_reduce_f32(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v, [1.5, -2.0, 3.0]);
    let mut m = [7u64, 9];
    t.all_reduce_u64(&mut m, ReduceOp::Max).unwrap();
    assert_eq!(m, [7, 9]);
    assert_eq!(t.reduce_scatter_f32(&[1.0, 2.0, 3.0], &[3]).unwrap(), vec![1.0, 2.0, 3.0]);
    assert_eq!(t.all_gather_v(&[4, 5, 6], &[3]).unwrap(), vec![vec![4u8, 5, 6]]);
    assert_eq!(t.all_to_all_v(&[vec![1, 2, 3, 4]], &[4]).unwrap(), vec![vec![1u8, 2, 3, 4]]);
    assert_eq!(t.all_to_all_v(&[vec![]], &[0]).unwrap(), vec![Vec::<u8>::new()]);
    assert_eq!(t.exchange_counts(&[42]).unwrap(), vec![42]);
    t.barrier().unwrap();
    for mib in [1usize, 64] {
        let gbps = t.bench_all_to_all(mib << 20, 10).unwrap();
        assert!(gbps.is_finite() && gbps > 0.0);
        println!("NCCL all-to-all (world 1, device-resident) {mib} MiB per peer: {gbps:.1} GB/s");
    }
    let mut cfg1 = cfg.clone();
    cfg1.chunk_size = Some(4);
    let err = create_communication(&cfg1, SharedTransport::new(Box::new(t)), &CommOptions::default());
    assert!(err.is_ok(), "world 1 accepts any config: {err:?}");
}

#[test]
fn a_rank_that_never_arrives_ends_creation_with_an_error() {
    if !gpu() {
        return;
    }
    let id = nccl::new_unique_id().unwrap();
    let start = Instant::now();
    // rank 0 of 2; rank 1 is never started
    let err = NcclTransport::new(0, 0, 2, &id, Duration::from_secs(3)).unwrap_err();
    let msg = err.to_string();
    println!("after {:.1} s: {msg}", start.elapsed().as_secs_f64());
    assert!(msg.contains("not complete within") || msg.contains("NCCL reports"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(30), "must not hang");
}
