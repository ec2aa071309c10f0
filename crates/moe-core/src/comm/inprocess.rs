//! The in-process transport: one thread per rank, one channel per ordered pair of ranks.
//!
//! Used by the tests and by `moe run --ep N` on a CPU. Messages between two ranks are FIFO and
//! carry a sequence number, so ranks that run collectives in different orders are caught instead
//! of exchanging the wrong data. A rank that returns (or panics) drops its channels: its peers'
//! next collective fails at once with "left the group"; a rank that is merely stuck makes its
//! peers fail after the timeout.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::transport::{comm_err, Transport};
use crate::error::{MoeError, Result};

#[derive(Debug)]
struct Msg {
    seq: u64,
    data: Vec<u8>,
}

/// One rank's end of an in-process group.
#[derive(Debug)]
pub struct InProcessTransport {
    rank: usize,
    world: usize,
    timeout: Duration,
    seq: u64,
    to: Vec<Sender<Msg>>,
    from: Vec<Receiver<Msg>>,
}

impl InProcessTransport {
    /// A group of `world` connected ranks (index = rank), each failing a collective after `timeout`.
    pub fn group(world: usize, timeout: Duration) -> Result<Vec<InProcessTransport>> {
        if world == 0 {
            return Err(MoeError::config("parallel.ep_size", "an in-process group needs at least one rank"));
        }
        // senders[src][dst], receivers[dst][src]
        let mut senders: Vec<Vec<Sender<Msg>>> = (0..world).map(|_| Vec::with_capacity(world)).collect();
        let mut receivers: Vec<Vec<Option<Receiver<Msg>>>> =
            (0..world).map(|_| (0..world).map(|_| None).collect()).collect();
        for (src, row) in senders.iter_mut().enumerate() {
            for (dst, recv_row) in receivers.iter_mut().enumerate() {
                let (tx, rx) = channel();
                row.push(tx);
                recv_row[src] = Some(rx);
                let _ = dst;
            }
        }
        Ok(senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| InProcessTransport {
                rank,
                world,
                timeout,
                seq: 0,
                to,
                from: from.into_iter().flatten().collect(),
            })
            .collect())
    }
}

impl Transport for InProcessTransport {
    fn name(&self) -> &str {
        "inprocess"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_to_all_v(&mut self, send: &[Vec<u8>], recv_bytes: &[usize]) -> Result<Vec<Vec<u8>>> {
        if send.len() != self.world || recv_bytes.len() != self.world {
            return Err(comm_err(
                self,
                format!(
                    "all_to_all_v: {} send buffers and {} receive sizes for a group of {} ranks",
                    send.len(),
                    recv_bytes.len(),
                    self.world
                ),
            ));
        }
        let seq = self.seq;
        self.seq += 1;
        for (p, (tx, data)) in self.to.iter().zip(send).enumerate() {
            if tx.send(Msg { seq, data: data.clone() }).is_err() {
                return Err(comm_err(self, format!("rank {p} {LEFT_THE_GROUP} before collective #{seq}")));
            }
        }
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::with_capacity(self.world);
        for (p, rx) in self.from.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match rx.recv_timeout(left) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(comm_err(
                        self,
                        format!(
                            "rank {p} did not join collective #{seq} within {:.1} s (stuck, dead or running \
                             a different number of collectives)",
                            self.timeout.as_secs_f64()
                        ),
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(comm_err(
                        self,
                        format!("rank {p} {LEFT_THE_GROUP} before collective #{seq} (it failed or exited)"),
                    ))
                }
            };
            if msg.seq != seq {
                return Err(comm_err(
                    self,
                    format!("rank {p} is at collective #{} while this rank is at #{seq}: ranks diverged", msg.seq),
                ));
            }
            if msg.data.len() != recv_bytes[p] {
                return Err(comm_err(
                    self,
                    format!(
                        "rank {p} sent {} bytes in collective #{seq}, this rank expected {}: ranks disagree about \
                         counts",
                        msg.data.len(),
                        recv_bytes[p]
                    ),
                ));
            }
            out.push(msg.data);
        }
        Ok(out)
    }
}

/// Runs `f(rank, transport)` on one thread per rank of a fresh in-process group and returns the
/// per-rank results in rank order. When ranks fail, the error returned is the earliest one (the
/// cause; later ones are usually peers noticing that a rank left).
/// `f` owns its transport: returning (or panicking) drops it, which releases the peers.
pub fn run_in_process<T, F>(world: usize, timeout: Duration, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(usize, InProcessTransport) -> Result<T> + Sync,
{
    run_ranks(InProcessTransport::group(world, timeout)?, f)
}

/// As [`run_in_process`] over given transports (index = rank), e.g. NCCL ranks of one process.
pub fn run_ranks<X, T, F>(group: Vec<X>, f: F) -> Result<Vec<T>>
where
    X: Send,
    T: Send,
    F: Fn(usize, X) -> Result<T> + Sync,
{
    let world = group.len();
    let results: Vec<(Result<T>, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .enumerate()
            .map(|(rank, t)| {
                let f = &f;
                std::thread::Builder::new().name(format!("ep-rank-{rank}")).spawn_scoped(s, move || {
                    let r = f(rank, t);
                    (r, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    (
                        Err(MoeError::Comm {
                            strategy: "inprocess".into(),
                            rank,
                            reason: "the rank's thread panicked".into(),
                        }),
                        Instant::now(),
                    )
                }),
                Err(e) => (
                    Err(MoeError::Comm {
                        strategy: "inprocess".into(),
                        rank,
                        reason: format!("cannot start the rank's thread: {e}"),
                    }),
                    Instant::now(),
                ),
            })
            .collect()
    });
    // A rank's own failure beats a peer noticing that it left; then the earliest wins.
    let mut first_err: Option<(bool, Instant, MoeError)> = None;
    let mut ok = Vec::with_capacity(world);
    for (r, at) in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => {
                let key = (is_peer_departure(&e), at);
                if first_err.as_ref().is_none_or(|(d, t, _)| key < (*d, *t)) {
                    first_err = Some((key.0, key.1, e));
                }
            }
        }
    }
    match first_err {
        Some((_, _, e)) => Err(e),
        None => Ok(ok),
    }
}

/// Whether `e` only reports that a peer left the group (a consequence, not a cause).
pub fn is_peer_departure(e: &MoeError) -> bool {
    matches!(e, MoeError::Comm { reason, .. } if reason.contains(LEFT_THE_GROUP))
}

const LEFT_THE_GROUP: &str = "left the group";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::transport::ReduceOp;

    #[test]
    fn collectives_agree_across_ranks() {
        let out = run_in_process(3, Duration::from_secs(10), |rank, mut t| {
            let mut v = [rank as f32 + 1.0, 10.0 * rank as f32];
            t.all_reduce_f32(&mut v, ReduceOp::Sum)?;
            let mut m = [rank as u64 * 7];
            t.all_reduce_u64(&mut m, ReduceOp::Max)?;
            let counts: Vec<u64> = (0..3).map(|p| (rank * 10 + p) as u64).collect();
            let got = t.exchange_counts(&counts)?;
            // segment p holds 1 + p values of (rank + 1)
            let counts_rs = [1, 2, 3];
            let data = vec![rank as f32 + 1.0; 6];
            let rs = t.reduce_scatter_f32(&data, &counts_rs)?;
            let sizes = [0usize, 2, 5];
            let mine = vec![rank as u8; sizes[rank]];
            let gv = t.all_gather_v(&mine, &sizes)?;
            t.barrier()?;
            Ok((v, m[0], got, rs, gv))
        })
        .unwrap();
        for (rank, (v, m, got, rs, gv)) in out.into_iter().enumerate() {
            assert_eq!(v, [6.0, 30.0]);
            assert_eq!(m, 14);
            assert_eq!(got, (0..3).map(|p| (p * 10 + rank) as u64).collect::<Vec<_>>());
            assert_eq!(rs, vec![6.0; rank + 1]);
            assert_eq!(gv, vec![vec![], vec![1u8; 2], vec![2u8; 5]]);
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_its_peers_quickly() {
        let start = Instant::now();
        let err = run_in_process(3, Duration::from_secs(30), |rank, mut t| {
            if rank == 1 {
                return Err(MoeError::config("test", "rank 1 fails before the collective"));
            }
            t.barrier()
        })
        .unwrap_err();
        assert!(matches!(err, MoeError::Config { field: "test", .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_stuck_rank_times_out() {
        let err = run_in_process(2, Duration::from_millis(200), |rank, mut t| {
            if rank == 1 {
                std::thread::sleep(Duration::from_millis(800));
                return Ok(());
            }
            t.barrier()
        })
        .unwrap_err();
        assert!(err.to_string().contains("did not join"), "{err}");
    }

    #[test]
    fn count_disagreements_are_errors() {
        let err = run_in_process(2, Duration::from_secs(5), |rank, mut t| {
            let send = vec![vec![0u8; 4]; 2];
            let expect = if rank == 0 { vec![4, 8] } else { vec![4, 4] };
            t.all_to_all_v(&send, &expect).map(|_| ())
        })
        .unwrap_err();
        assert!(err.to_string().contains("disagree"), "{err}");
    }
}
