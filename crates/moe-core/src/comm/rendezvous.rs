//! A torchrun-like TCP rendezvous: rank 0 listens on `master_addr:master_port`, every other rank
//! connects and says who it is and which config it runs; rank 0 checks that every rank arrived
//! once, with the same world size and the same config hash, then hands each one the same
//! payload (the NCCL unique id). Any failure is reported to every rank that arrived, and a rank
//! that never arrives fails the others after the timeout.
//!
//! Settings come from flags or the torchrun variables `RANK`, `WORLD_SIZE`, `MASTER_ADDR`
//! (default `127.0.0.1`), `MASTER_PORT` (default 29500), plus `MOE_RENDEZVOUS_TIMEOUT_S`.
//!
//! Wire format (little endian): hello = `MOERDV01`, rank u64, world u64, hash 32 bytes;
//! reply = status u8 (0 ok, 1 error), length u32, then the payload or a UTF-8 message.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{MoeError, Result};

const MAGIC: &[u8; 8] = b"MOERDV01";
const HELLO_LEN: usize = 8 + 8 + 8 + 32;
/// Largest payload a reply may carry (an NCCL unique id is 128 bytes).
const MAX_PAYLOAD: usize = 1 << 20;

/// How much longer than its own deadline a rank waits for rank 0's verdict.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// Default port, as torchrun's.
pub const DEFAULT_PORT: u16 = 29500;
/// Default time to wait for every rank.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Where and how the ranks meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// This rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world_size: usize,
    /// Host of rank 0.
    pub master_addr: String,
    /// Port rank 0 listens on.
    pub master_port: u16,
    /// How long to wait for the others.
    pub timeout: Duration,
}

fn env_parse<T: std::str::FromStr>(name: &'static str) -> Result<Option<T>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map(Some).map_err(|_| {
            MoeError::config("rendezvous", format!("environment variable {name}={v} is not a valid number"))
        }),
        _ => Ok(None),
    }
}

impl RendezvousConfig {
    /// Resolves each setting from its flag, else its torchrun variable, else its default.
    /// Returns `None` when neither a rank nor a world size was given (single-process run).
    pub fn resolve(
        rank: Option<usize>,
        world_size: Option<usize>,
        master_addr: Option<String>,
        master_port: Option<u16>,
        timeout: Option<Duration>,
    ) -> Result<Option<RendezvousConfig>> {
        let rank = match rank {
            Some(r) => Some(r),
            None => env_parse::<usize>("RANK")?,
        };
        let world = match world_size {
            Some(w) => Some(w),
            None => env_parse::<usize>("WORLD_SIZE")?,
        };
        let (rank, world_size) = match (rank, world) {
            (None, None) => return Ok(None),
            (Some(r), Some(w)) => (r, w),
            (None, Some(_)) => {
                return Err(MoeError::config("rendezvous", "a world size was given without a rank (--rank or RANK)"))
            }
            (Some(_), None) => {
                return Err(MoeError::config(
                    "rendezvous",
                    "a rank was given without a world size (--world-size or WORLD_SIZE)",
                ))
            }
        };
        if world_size == 0 || rank >= world_size {
            return Err(MoeError::config("rendezvous", format!("rank {rank} is not below world size {world_size}")));
        }
        let master_addr = master_addr
            .or_else(|| std::env::var("MASTER_ADDR").ok().filter(|s| !s.trim().is_empty()))
            .unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match master_port {
            Some(p) => p,
            None => env_parse::<u16>("MASTER_PORT")?.unwrap_or(DEFAULT_PORT),
        };
        let timeout = match timeout {
            Some(t) => t,
            None => {
                env_parse::<f64>("MOE_RENDEZVOUS_TIMEOUT_S")?.map(Duration::from_secs_f64).unwrap_or(DEFAULT_TIMEOUT)
            }
        };
        Ok(Some(RendezvousConfig { rank, world_size, master_addr, master_port, timeout }))
    }

    fn err(&self, reason: impl Into<String>) -> MoeError {
        MoeError::Comm { strategy: "rendezvous".into(), rank: self.rank, reason: reason.into() }
    }

    fn addrs(&self) -> Result<Vec<SocketAddr>> {
        let v: Vec<SocketAddr> = (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| self.err(format!("cannot resolve master address {}: {e}", self.master_addr)))?
            .collect();
        if v.is_empty() {
            return Err(self.err(format!("master address {} resolves to nothing", self.master_addr)));
        }
        Ok(v)
    }
}

/// Meets the other ranks. Rank 0 calls `make_payload` once every rank has arrived with a
/// matching config hash and returns that payload; every other rank returns the payload it got.
pub fn rendezvous(
    cfg: &RendezvousConfig,
    config_hash: &[u8; 32],
    make_payload: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    meet(cfg, config_hash, make_payload).map(|(p, _)| p)
}

/// The connections the rendezvous leaves open: rank 0 holds one per other rank (index = rank,
/// `None` for itself); every other rank holds its connection to rank 0.
#[derive(Debug)]
pub(crate) enum Links {
    /// World size 1.
    Alone,
    /// Rank 0.
    Root(Vec<Option<TcpStream>>),
    /// Any other rank.
    Leaf(TcpStream),
}

/// [`rendezvous`], keeping the connections (the TCP transport runs over them).
pub(crate) fn meet(
    cfg: &RendezvousConfig,
    config_hash: &[u8; 32],
    make_payload: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<(Vec<u8>, Links)> {
    let deadline = Instant::now() + cfg.timeout;
    if cfg.world_size == 1 {
        return Ok((make_payload()?, Links::Alone));
    }
    if cfg.rank == 0 {
        serve(cfg, config_hash, make_payload, deadline)
    } else {
        join(cfg, config_hash, deadline)
    }
}

fn bind(cfg: &RendezvousConfig) -> Result<TcpListener> {
    let mut last = None;
    for a in cfg.addrs()? {
        match TcpListener::bind(a) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(format!("{a}: {e}")),
        }
    }
    Err(cfg.err(format!(
        "rank 0 cannot listen on {}:{} ({}); pick a free --master-port",
        cfg.master_addr,
        cfg.master_port,
        last.unwrap_or_default()
    )))
}

struct Arrival {
    stream: TcpStream,
    rank: usize,
    hash: [u8; 32],
}

fn serve(
    cfg: &RendezvousConfig,
    hash: &[u8; 32],
    make_payload: impl FnOnce() -> Result<Vec<u8>>,
    deadline: Instant,
) -> Result<(Vec<u8>, Links)> {
    let listener = bind(cfg)?;
    listener.set_nonblocking(true).map_err(|e| cfg.err(format!("cannot configure the listener: {e}")))?;
    let mut arrived: Vec<Arrival> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    while arrived.len() + 1 < cfg.world_size && Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(remaining(deadline)));
                match read_hello(&mut stream) {
                    Ok((rank, world, h)) => {
                        let problem = if world != cfg.world_size as u64 {
                            Some(format!(
                                "rank {rank} (from {peer}) has world size {world}, rank 0 has {}",
                                cfg.world_size
                            ))
                        } else if rank == 0 || rank >= world {
                            Some(format!("a process at {peer} claims rank {rank}, which is not in 1..{world}"))
                        } else if arrived.iter().any(|a| a.rank as u64 == rank) {
                            Some(format!(
                                "rank {rank} arrived twice (second time from {peer}); give every process its own RANK"
                            ))
                        } else {
                            None
                        };
                        match problem {
                            Some(p) => {
                                let _ = send_reply(&mut stream, false, p.as_bytes());
                                problems.push(p);
                            }
                            None => arrived.push(Arrival { stream, rank: rank as usize, hash: h }),
                        }
                    }
                    Err(e) => problems.push(format!("a connection from {peer} did not say hello: {e}")),
                }
                if !problems.is_empty() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(cfg.err(format!("accept failed on port {}: {e}", cfg.master_port))),
        }
    }
    let fail = |arrived: &mut Vec<Arrival>, msg: String| -> MoeError {
        for a in arrived.iter_mut() {
            let _ = send_reply(&mut a.stream, false, msg.as_bytes());
        }
        cfg.err(msg)
    };
    if !problems.is_empty() {
        return Err(fail(&mut arrived, format!("rendezvous failed: {}", problems.join("; "))));
    }
    if arrived.len() + 1 < cfg.world_size {
        let missing: Vec<String> =
            (1..cfg.world_size).filter(|r| !arrived.iter().any(|a| a.rank == *r)).map(|r| r.to_string()).collect();
        return Err(fail(
            &mut arrived,
            format!(
                "ranks {} did not arrive at {}:{} within {:.1} s (not started, crashed, or given another \
                 MASTER_ADDR/MASTER_PORT)",
                missing.join(", "),
                cfg.master_addr,
                cfg.master_port,
                cfg.timeout.as_secs_f64()
            ),
        ));
    }
    let bad: Vec<String> = arrived.iter().filter(|a| &a.hash != hash).map(|a| a.rank.to_string()).collect();
    if !bad.is_empty() {
        return Err(fail(
            &mut arrived,
            format!(
                "config hash mismatch: ranks {} run a different MoE config than rank 0 (hash {}); start every \
                 rank with the same model, dtypes, chunk size and ep_size",
                bad.join(", "),
                super::transport::hash_hex(hash)
            ),
        ));
    }
    let payload = match make_payload() {
        Ok(p) => p,
        Err(e) => return Err(fail(&mut arrived, format!("rank 0 could not create the group: {e}"))),
    };
    for a in arrived.iter_mut() {
        send_reply(&mut a.stream, true, &payload)
            .map_err(|e| cfg.err(format!("cannot answer rank {}: {e} (did it exit?)", a.rank)))?;
    }
    let mut links: Vec<Option<TcpStream>> = (0..cfg.world_size).map(|_| None).collect();
    for a in arrived {
        links[a.rank] = Some(a.stream);
    }
    Ok((payload, Links::Root(links)))
}

fn join(cfg: &RendezvousConfig, hash: &[u8; 32], deadline: Instant) -> Result<(Vec<u8>, Links)> {
    let addrs = cfg.addrs()?;
    let mut last_err = String::from("no attempt");
    let mut stream = loop {
        if let Some(s) = addrs.iter().find_map(|a| match TcpStream::connect_timeout(a, Duration::from_millis(500)) {
            Ok(s) => Some(s),
            Err(e) => {
                last_err = e.to_string();
                None
            }
        }) {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(cfg.err(format!(
                "could not reach rank 0 at {}:{} within {:.1} s ({last_err}); is rank 0 running with the same \
                 MASTER_ADDR/MASTER_PORT?",
                cfg.master_addr,
                cfg.master_port,
                cfg.timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(cfg.rank as u64).to_le_bytes());
    hello.extend_from_slice(&(cfg.world_size as u64).to_le_bytes());
    hello.extend_from_slice(hash);
    stream.write_all(&hello).map_err(|e| cfg.err(format!("cannot greet rank 0: {e}")))?;
    // Rank 0 arbitrates and answers by its own deadline, which may be a little later than ours
    // (processes start at different times): wait a grace period longer for its verdict.
    let _ = stream.set_read_timeout(Some(remaining(deadline) + REPLY_GRACE));
    let mut status = [0u8; 5];
    stream.read_exact(&mut status).map_err(|e| {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            cfg.err(format!(
                "rank 0 did not complete the rendezvous within {:.1} s (other ranks missing?)",
                cfg.timeout.as_secs_f64()
            ))
        } else {
            cfg.err(format!("rank 0 closed the rendezvous: {e}"))
        }
    })?;
    let len = u32::from_le_bytes([status[1], status[2], status[3], status[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(cfg.err(format!("rank 0 announced a {len}-byte reply; this is not a moe rendezvous")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(|e| cfg.err(format!("truncated reply from rank 0: {e}")))?;
    if status[0] == 0 {
        Ok((body, Links::Leaf(stream)))
    } else {
        Err(cfg.err(format!("rank 0 reports: {}", String::from_utf8_lossy(&body))))
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn read_hello(s: &mut TcpStream) -> std::io::Result<(u64, u64, [u8; 32])> {
    let mut b = [0u8; HELLO_LEN];
    s.read_exact(&mut b)?;
    if &b[..8] != MAGIC {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a moe rendezvous hello"));
    }
    let u = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[r]);
        u64::from_le_bytes(a)
    };
    let mut h = [0u8; 32];
    h.copy_from_slice(&b[24..56]);
    Ok((u(8..16), u(16..24), h))
}

fn send_reply(s: &mut TcpStream, ok: bool, body: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(5 + body.len());
    m.push(if ok { 0 } else { 1 });
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    s.write_all(&m)?;
    s.flush()
}

/// A free TCP port on 127.0.0.1 (for tests and `moe run --ep N` launching local processes).
pub fn free_local_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| MoeError::Io { path: "127.0.0.1:0".into(), source: e })?;
    l.local_addr().map(|a| a.port()).map_err(|e| MoeError::Io { path: "127.0.0.1:0".into(), source: e })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rank: usize, world: usize, port: u16, ms: u64) -> RendezvousConfig {
        RendezvousConfig {
            rank,
            world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_millis(ms),
        }
    }

    #[test]
    fn threads_meet_and_share_the_payload() {
        let port = free_local_port().unwrap();
        let out: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| s.spawn(move || rendezvous(&cfg(r, 3, port, 10_000), &[7; 32], || Ok(b"uid-123".to_vec()))))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in out {
            assert_eq!(o.unwrap(), b"uid-123");
        }
    }

    #[test]
    fn missing_rank_times_out_with_its_number() {
        let port = free_local_port().unwrap();
        let err = rendezvous(&cfg(0, 3, port, 300), &[1; 32], || Ok(vec![])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("ranks 1, 2 did not arrive"), "{msg}");
        let err = rendezvous(&cfg(1, 3, free_local_port().unwrap(), 300), &[1; 32], || Ok(vec![])).unwrap_err();
        assert!(err.to_string().contains("could not reach rank 0"), "{err}");
    }

    #[test]
    fn resolve_checks_ranges() {
        assert!(RendezvousConfig::resolve(Some(2), Some(2), None, Some(1), None).is_err());
        let c = RendezvousConfig::resolve(Some(1), Some(2), Some("localhost".into()), Some(1234), None).unwrap();
        assert_eq!(c.unwrap().master_port, 1234);
    }
}
