//! The TCP transport: ranks in separate processes (or hosts) without GPUs, over the connections
//! the rendezvous opened. Rank 0 relays (a star): every rank sends rank 0 its per-peer buffers,
//! rank 0 sends each rank what the others sent it. Simple and portable; meant for CPU runs,
//! tests and start-up checks, not for bandwidth (NCCL is the transport for that).
//!
//! Frames are `seq u64`, then per peer `len u64` + bytes. A peer that closes its connection ends
//! the collective at once; one that stops answering ends it after the timeout.

use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::rendezvous::{meet, Links, RendezvousConfig};
use super::transport::{comm_err, Transport};
use crate::error::{MoeError, Result};

/// Largest buffer one peer may announce (guards against reading garbage as a length).
const MAX_BUFFER: u64 = 1 << 36;

/// One rank of a TCP group.
#[derive(Debug)]
pub struct TcpTransport {
    rank: usize,
    world: usize,
    timeout: Duration,
    seq: u64,
    links: Links,
}

impl TcpTransport {
    /// Meets the other ranks at the rendezvous (checking `config_hash`) and keeps the
    /// connections as a transport whose collectives fail after `timeout`.
    pub fn connect(rdv: &RendezvousConfig, config_hash: &[u8; 32], timeout: Duration) -> Result<TcpTransport> {
        let (_, links) = meet(rdv, config_hash, || Ok(Vec::new()))?;
        let set = |s: &TcpStream| -> std::io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))
        };
        let err = |e: std::io::Error| MoeError::Comm {
            strategy: "tcp".into(),
            rank: rdv.rank,
            reason: format!("cannot configure a connection: {e}"),
        };
        match &links {
            Links::Root(v) => {
                for s in v.iter().flatten() {
                    set(s).map_err(err)?;
                }
            }
            Links::Leaf(s) => set(s).map_err(err)?,
            Links::Alone => {}
        }
        Ok(TcpTransport { rank: rdv.rank, world: rdv.world_size, timeout, seq: 0, links })
    }

    fn io_err(&self, peer: usize, what: &str, e: std::io::Error) -> MoeError {
        let reason = match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
                "rank {peer} did not answer collective #{} within {:.1} s ({what}; stuck or dead)",
                self.seq,
                self.timeout.as_secs_f64()
            ),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                format!("rank {peer} left the group before collective #{} (it failed or exited)", self.seq)
            }
            _ => format!("{what} with rank {peer} failed in collective #{}: {e}", self.seq),
        };
        comm_err(self, reason)
    }
}

fn write_frame(s: &TcpStream, seq: u64, bufs: &[&[u8]]) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 16, s);
    w.write_all(&seq.to_le_bytes())?;
    for b in bufs {
        w.write_all(&(b.len() as u64).to_le_bytes())?;
        w.write_all(b)?;
    }
    w.flush()
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a frame of `n` buffers; returns its sequence number and the buffers. The buffered
/// reader cannot swallow part of a later frame: a peer sends its next frame only after it got
/// this collective's answer.
fn read_frame(s: &TcpStream, n: usize) -> std::io::Result<(u64, Vec<Vec<u8>>)> {
    let mut r = BufReader::with_capacity(1 << 16, s);
    let seq = read_u64(&mut r)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = read_u64(&mut r)?;
        if len > MAX_BUFFER {
            return Err(std::io::Error::new(ErrorKind::InvalidData, format!("announced buffer of {len} bytes")));
        }
        let mut b = vec![0u8; len as usize];
        r.read_exact(&mut b)?;
        out.push(b);
    }
    Ok((seq, out))
}

impl Transport for TcpTransport {
    fn name(&self) -> &str {
        "tcp"
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
        let w = self.world;
        if send.len() != w || recv_bytes.len() != w {
            return Err(comm_err(
                self,
                format!(
                    "all_to_all_v: {} send buffers and {} receive sizes for {w} ranks",
                    send.len(),
                    recv_bytes.len()
                ),
            ));
        }
        let seq = self.seq;
        let got: Vec<Vec<u8>> = match &self.links {
            Links::Alone => send.to_vec(),
            Links::Leaf(s) => {
                let refs: Vec<&[u8]> = send.iter().map(|b| b.as_slice()).collect();
                write_frame(s, seq, &refs).map_err(|e| self.io_err(0, "send", e))?;
                let (rseq, bufs) = read_frame(s, w).map_err(|e| self.io_err(0, "receive", e))?;
                if rseq != seq {
                    return Err(comm_err(
                        self,
                        format!("rank 0 relayed collective #{rseq} while this rank is at #{seq}"),
                    ));
                }
                bufs
            }
            Links::Root(links) => {
                // rows[src][dst]
                let mut rows: Vec<Vec<Vec<u8>>> = Vec::with_capacity(w);
                for (src, link) in links.iter().enumerate() {
                    match link {
                        None => rows.push(send.to_vec()),
                        Some(s) => {
                            let (rseq, bufs) = read_frame(s, w).map_err(|e| self.io_err(src, "receive", e))?;
                            if rseq != seq {
                                return Err(comm_err(
                                    self,
                                    format!(
                                        "rank {src} is at collective #{rseq} while rank 0 is at #{seq}: ranks diverged"
                                    ),
                                ));
                            }
                            rows.push(bufs);
                        }
                    }
                }
                for (dst, link) in links.iter().enumerate() {
                    if let Some(s) = link {
                        let col: Vec<&[u8]> = rows.iter().map(|r| r[dst].as_slice()).collect();
                        write_frame(s, seq, &col).map_err(|e| self.io_err(dst, "send", e))?;
                    }
                }
                rows.into_iter().map(|mut r| std::mem::take(&mut r[0])).collect()
            }
        };
        self.seq += 1;
        for (p, (b, &want)) in got.iter().zip(recv_bytes).enumerate() {
            if b.len() != want {
                return Err(comm_err(
                    self,
                    format!(
                        "rank {p} sent {} bytes in collective #{seq}, this rank expected {want}: ranks disagree about \
                         counts",
                        b.len()
                    ),
                ));
            }
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::rendezvous::free_local_port;
    use crate::comm::transport::ReduceOp;

    #[test]
    fn tcp_ranks_in_threads_run_collectives() {
        let port = free_local_port().unwrap();
        let res: Vec<Result<(Vec<f32>, Vec<u64>)>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || {
                        let rdv = RendezvousConfig {
                            rank,
                            world_size: 3,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                            timeout: Duration::from_secs(10),
                        };
                        let mut t = TcpTransport::connect(&rdv, &[3; 32], Duration::from_secs(10))?;
                        let mut v = vec![rank as f32; 4];
                        t.all_reduce_f32(&mut v, ReduceOp::Sum)?;
                        let c = t.exchange_counts(&[rank as u64, 10 + rank as u64, 20 + rank as u64])?;
                        Ok((v, c))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, r) in res.into_iter().enumerate() {
            let (v, c) = r.unwrap();
            assert_eq!(v, vec![3.0; 4]);
            assert_eq!(c, vec![10 * rank as u64, 1 + 10 * rank as u64, 2 + 10 * rank as u64]);
        }
    }
}
