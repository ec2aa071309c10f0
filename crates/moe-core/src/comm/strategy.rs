//! Picking a communication strategy for a rank: the user's choice, or `auto` by workload, each
//! candidate checked with [`Communication::is_workload_feasible`]. Before anything else the
//! ranks exchange a hash of their config, so a rank started with a different model fails at
//! start-up on every rank instead of exchanging garbage later.

use std::sync::{Arc, Mutex};

use super::all_to_all::{self, AllToAll};
use super::allgather_reducescatter::{self, AllGatherReduceScatter};
use super::transport::{check_same_config, ReduceOp, SharedTransport};
use super::{Communication, LocalComm};
use crate::config::MoeConfig;
use crate::error::{MoeError, Result};

/// Which strategy to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StrategyChoice {
    /// By workload: `local` for one rank; `allgather_reducescatter` when every token would reach
    /// most ranks anyway (`top_k >= ep_size`) or the chunks are small (latency-bound); otherwise
    /// `all_to_all`. An infeasible first choice falls back to the other with the reason logged.
    #[default]
    Auto,
    /// One rank, nothing moves.
    Local,
    /// All-gather dispatch, reduce-scatter combine.
    AllGatherReduceScatter,
    /// All-to-all dispatch and combine.
    AllToAll,
}

impl StrategyChoice {
    /// Parses `auto`, `local`, `allgather_reducescatter` (or `allgather`), `all_to_all` (or `alltoall`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "auto" => Ok(StrategyChoice::Auto),
            "local" => Ok(StrategyChoice::Local),
            "allgather_reducescatter" | "allgather" | "ag_rs" => Ok(StrategyChoice::AllGatherReduceScatter),
            "all_to_all" | "alltoall" | "a2a" => Ok(StrategyChoice::AllToAll),
            other => Err(MoeError::config(
                "comm",
                format!(
                    "unknown communication strategy `{other}`; use auto, local, allgather_reducescatter or all_to_all"
                ),
            )),
        }
    }

    /// Canonical name.
    pub fn name(self) -> &'static str {
        match self {
            StrategyChoice::Auto => "auto",
            StrategyChoice::Local => "local",
            StrategyChoice::AllGatherReduceScatter => allgather_reducescatter::NAME,
            StrategyChoice::AllToAll => all_to_all::NAME,
        }
    }
}

/// Memory bounds the feasibility checks use.
#[derive(Debug, Clone, Copy)]
pub struct StrategyLimits {
    /// Most bytes a rank may hold after an all-gather of one chunk.
    pub max_gather_bytes: usize,
    /// Most bytes a rank may receive in one all-to-all chunk (worst case: fully skewed routing).
    pub max_receive_bytes: usize,
}

impl Default for StrategyLimits {
    fn default() -> Self {
        StrategyLimits { max_gather_bytes: 2 << 30, max_receive_bytes: 8 << 30 }
    }
}

/// Counters of one rank's dispatch and combine traffic (bytes that left the rank) and time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommStats {
    /// Chunks dispatched.
    pub chunks: u64,
    /// Activation bytes (payload + scales) sent to other ranks by dispatch.
    pub dispatch_bytes: u64,
    /// Seconds spent in dispatch (encode, exchange, decode).
    pub dispatch_secs: f64,
    /// Partial-output bytes sent to other ranks by combine.
    pub combine_bytes: u64,
    /// Seconds spent in combine.
    pub combine_secs: f64,
}

impl CommStats {
    /// Dispatch bandwidth in GB/s (0 when nothing was timed).
    pub fn dispatch_gbps(&self) -> f64 {
        gbps(self.dispatch_bytes, self.dispatch_secs)
    }

    /// Combine bandwidth in GB/s.
    pub fn combine_gbps(&self) -> f64 {
        gbps(self.combine_bytes, self.combine_secs)
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

/// Shared view of a strategy's counters (the strategy updates it; a benchmark reads it).
pub type CommStatsHandle = Arc<Mutex<CommStats>>;

/// Options for [`create_communication`].
#[derive(Debug, Clone, Default)]
pub struct CommOptions {
    /// Strategy to use.
    pub choice: StrategyChoice,
    /// Expected tokens per rank per chunk (for `auto` and the feasibility checks); 0 = unknown,
    /// taken as the chunk size or 256.
    pub tokens_per_rank: usize,
    /// Memory bounds.
    pub limits: StrategyLimits,
}

/// Tokens per rank at or below which `auto` prefers all-gather (one collective each way beats
/// the count exchange of all-to-all when the payload is tiny).
pub const SMALL_CHUNK_TOKENS: usize = 32;

/// Checks that every rank has the same config, then builds the strategy for this rank.
/// Returns the strategy and the handle of its traffic counters.
pub fn create_communication(
    cfg: &MoeConfig,
    transport: SharedTransport,
    opts: &CommOptions,
) -> Result<(Box<dyn Communication>, CommStatsHandle)> {
    cfg.validate()?;
    check_same_config(transport.lock()?.as_mut(), cfg)?;
    let stats: CommStatsHandle = Arc::default();
    let ep = cfg.parallel.ep_size;
    let tokens = match opts.tokens_per_rank {
        0 => cfg.chunk_size.unwrap_or(256),
        n => n,
    };
    // Ranks may see different token counts; all must pick the same strategy.
    let c = opts.choice as u64;
    let mut agreed = [tokens as u64, c, u64::MAX - c];
    transport.lock()?.all_reduce_u64(&mut agreed, ReduceOp::Max)?;
    if agreed[1] != u64::MAX - agreed[2] {
        return Err(MoeError::Comm {
            strategy: opts.choice.name().into(),
            rank: transport.rank(),
            reason: "ranks asked for different communication strategies; pass the same --comm to every rank".into(),
        });
    }
    let tokens = agreed[0] as usize;
    let build = |c: StrategyChoice| -> Box<dyn Communication> {
        match c {
            StrategyChoice::Local | StrategyChoice::Auto => Box::new(LocalComm),
            StrategyChoice::AllGatherReduceScatter => {
                Box::new(AllGatherReduceScatter::new(cfg, transport.clone(), opts.limits, stats.clone()))
            }
            StrategyChoice::AllToAll => Box::new(AllToAll::new(cfg, transport.clone(), opts.limits, stats.clone())),
        }
    };
    let order: Vec<StrategyChoice> = match opts.choice {
        StrategyChoice::Auto if ep == 1 => vec![StrategyChoice::Local],
        StrategyChoice::Auto if cfg.top_k >= ep || tokens <= SMALL_CHUNK_TOKENS => {
            vec![StrategyChoice::AllGatherReduceScatter, StrategyChoice::AllToAll]
        }
        StrategyChoice::Auto => vec![StrategyChoice::AllToAll, StrategyChoice::AllGatherReduceScatter],
        c => vec![c],
    };
    let mut rejected = Vec::new();
    for c in order {
        let comm = build(c);
        match comm.is_workload_feasible(cfg, tokens) {
            Ok(()) => {
                if !rejected.is_empty() {
                    tracing::info!("communication: chose {} after rejecting {}", c.name(), rejected.join("; "));
                }
                return Ok((comm, stats));
            }
            Err(reason) => rejected.push(format!("{}: {reason}", c.name())),
        }
    }
    Err(MoeError::Comm {
        strategy: opts.choice.name().into(),
        rank: transport.rank(),
        reason: format!("no strategy can serve this workload: {}", rejected.join("; ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::run_in_process;
    use crate::config::ParallelConfig;
    use std::time::Duration;

    fn pick(choice: StrategyChoice, tokens: usize, limits: StrategyLimits, top_k: usize) -> Result<Vec<String>> {
        run_in_process(2, Duration::from_secs(10), |rank, t| {
            let mut cfg = MoeConfig::new(8, top_k, 16, 8);
            cfg.parallel = ParallelConfig { ep_size: 2, ep_rank: rank };
            let opts = CommOptions { choice, tokens_per_rank: tokens, limits };
            let (c, _) = create_communication(&cfg, SharedTransport::new(Box::new(t)), &opts)?;
            Ok(c.name().to_string())
        })
    }

    #[test]
    fn auto_follows_the_workload() {
        let l = StrategyLimits::default();
        assert_eq!(pick(StrategyChoice::Auto, 8, l, 1).unwrap(), vec![allgather_reducescatter::NAME; 2]);
        assert_eq!(pick(StrategyChoice::Auto, 4096, l, 1).unwrap(), vec![all_to_all::NAME; 2]);
        // top_k >= ep_size: every token reaches both ranks anyway
        assert_eq!(pick(StrategyChoice::Auto, 4096, l, 2).unwrap(), vec![allgather_reducescatter::NAME; 2]);
    }

    #[test]
    fn infeasible_choices_fall_back_or_fail_with_reasons() {
        let tight = StrategyLimits { max_gather_bytes: 1000, max_receive_bytes: usize::MAX };
        assert_eq!(pick(StrategyChoice::Auto, 8, tight, 1).unwrap(), vec![all_to_all::NAME; 2]);
        let err = pick(StrategyChoice::AllGatherReduceScatter, 8, tight, 1).unwrap_err().to_string();
        assert!(err.contains("over the 1000 byte limit"), "{err}");
        let none = StrategyLimits { max_gather_bytes: 10, max_receive_bytes: 10 };
        let err = pick(StrategyChoice::Auto, 8, none, 1).unwrap_err().to_string();
        assert!(err.contains("no strategy can serve") && err.contains("lower chunk_size"), "{err}");
        assert!(StrategyChoice::parse("bogus").is_err());
        assert_eq!(StrategyChoice::parse("a2a").unwrap(), StrategyChoice::AllToAll);
    }
}
