//! A TCP rendezvous configured like torchrun: how separate processes find each other.
//!
//! Thread ranks share memory, so they need no introduction. Processes do: before NCCL ranks can
//! run a collective, all of them must hold the same 128-byte unique id, which rank 0 makes
//! (`ncclGetUniqueId`) and every rank passes to `ncclCommInitRank`. We do what torchrun does:
//! every process starts with five environment variables,
//!
//! | variable      | meaning                                              |
//! |---------------|------------------------------------------------------|
//! | `WORLD_SIZE`  | how many processes (ranks) in all                    |
//! | `RANK`        | this process's rank, `0..WORLD_SIZE`                 |
//! | `LOCAL_RANK`  | its rank on this machine (which GPU it drives)       |
//! | `MASTER_ADDR` | where rank 0 listens (a host name or an IP address)  |
//! | `MASTER_PORT` | the TCP port rank 0 listens on                       |
//!
//! rank 0 listens on `MASTER_ADDR:MASTER_PORT`, every other rank connects (retrying until rank 0
//! is up), and rank 0 sends each of them the payload. The bytes on the wire, integers
//! little-endian:
//!
//! ```text
//! rank r > 0 -> rank 0:  "SFSR"  rank: u32  world_size: u32
//! rank 0 -> rank r:      "SFSR"  length: u32  payload: length bytes
//!   or, refusing:        "SFSX"  length: u32  reason: length bytes of UTF-8
//! ```
//!
//! Rank 0 refuses every rank it has heard from when one hello is wrong (another `WORLD_SIZE`, a
//! `RANK` that a live connection already claimed), so that all of them fail at once with the
//! same reason instead of waiting for the deadline.
//!
//! Rank 0 answers only once all `WORLD_SIZE - 1` ranks have said hello, so a rendezvous that
//! returns also means that every process has started: it is a barrier too. Every wait is bounded
//! by one deadline.

use super::Rank;
use std::fmt::Display;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"SFSR";
const REFUSED: &[u8; 4] = b"SFSX";
/// A bound on what a reply may announce, so that a stray connection cannot make us allocate
/// gigabytes. A unique id is 128 bytes.
pub const MAX_PAYLOAD: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error(
        "environment variable {name} is not set (a launcher such as torchrun sets WORLD_SIZE, RANK, \
         LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
    )]
    Missing { name: &'static str },
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Invalid { name: &'static str, value: String, reason: String },
    #[error("rendezvous at {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("rendezvous at {addr} timed out after {seconds:.1} s: {waiting_for}")]
    Timeout { addr: String, seconds: f64, waiting_for: String },
    #[error("rendezvous at {addr}: {reason}")]
    Protocol { addr: String, reason: String },
}

/// Where this process stands in the job, as torchrun's environment variables say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RendezvousConfig {
    pub world_size: usize,
    pub rank: Rank,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl RendezvousConfig {
    pub fn from_env() -> Result<RendezvousConfig, RendezvousError> {
        // A value that is not UTF-8 becomes text that fails to parse, with a clear error.
        RendezvousConfig::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Reads the variables through `get` (the environment, or a map in a test).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<RendezvousConfig, RendezvousError> {
        let text = |name: &'static str| get(name).ok_or(RendezvousError::Missing { name });
        let world_size: usize = number("WORLD_SIZE", text("WORLD_SIZE")?)?;
        let rank_text = text("RANK")?;
        let rank: Rank = number("RANK", rank_text.clone())?;
        let local_rank = number("LOCAL_RANK", text("LOCAL_RANK")?)?;
        let master_addr = text("MASTER_ADDR")?.trim().to_string();
        let master_port = number("MASTER_PORT", text("MASTER_PORT")?)?;
        let invalid = |name, value, reason: String| Err(RendezvousError::Invalid { name, value, reason });
        if world_size == 0 {
            return invalid("WORLD_SIZE", "0".into(), "a job needs at least one rank".into());
        }
        if rank >= world_size {
            return invalid("RANK", rank_text, format!("ranks go from 0 to WORLD_SIZE - 1 = {}", world_size - 1));
        }
        if master_addr.is_empty() {
            return invalid("MASTER_ADDR", master_addr, "it is empty".into());
        }
        Ok(RendezvousConfig { world_size, rank, local_rank, master_addr, master_port })
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

fn number<T: FromStr<Err: Display>>(name: &'static str, value: String) -> Result<T, RendezvousError> {
    value.trim().parse().map_err(|e: T::Err| RendezvousError::Invalid { name, reason: e.to_string(), value })
}

/// Meets every other rank and returns rank 0's payload on every rank. Only rank 0 calls
/// `payload` (as only rank 0 calls `ncclGetUniqueId`). Fails after `timeout` if a rank is missing.
pub fn rendezvous(
    config: &RendezvousConfig,
    payload: impl FnOnce() -> Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, RendezvousError> {
    let deadline = Deadline { end: Instant::now() + timeout, timeout, addr: config.addr() };
    if config.rank == 0 {
        let payload = payload();
        if payload.len() > MAX_PAYLOAD {
            return Err(deadline.protocol(format!("a payload of {} bytes is over {MAX_PAYLOAD}", payload.len())));
        }
        serve(config, &payload, &deadline)?;
        Ok(payload)
    } else {
        join(config, &deadline)
    }
}

/// The one deadline every wait of a rendezvous shares, and the errors that name its address.
struct Deadline {
    end: Instant,
    timeout: Duration,
    addr: String,
}

impl Deadline {
    /// Time left, or a timeout error saying what we were waiting for.
    fn left(&self, waiting_for: impl FnOnce() -> String) -> Result<Duration, RendezvousError> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let (addr, seconds) = (self.addr.clone(), self.timeout.as_secs_f64());
            return Err(RendezvousError::Timeout { addr, seconds, waiting_for: waiting_for() });
        }
        Ok(left)
    }

    fn io(&self, source: io::Error) -> RendezvousError {
        RendezvousError::Io { addr: self.addr.clone(), source }
    }

    fn protocol(&self, reason: String) -> RendezvousError {
        RendezvousError::Protocol { addr: self.addr.clone(), reason }
    }

    /// Bounds the next read on `stream` by the deadline; a read that runs out of time is then
    /// reported as a timeout, not as an I/O error.
    fn read_exact(&self, stream: &mut TcpStream, buf: &mut [u8], what: &str) -> Result<(), RendezvousError> {
        let left = self.left(|| what.to_string())?;
        stream.set_read_timeout(Some(left)).map_err(|e| self.io(e))?;
        stream.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                let seconds = self.timeout.as_secs_f64();
                RendezvousError::Timeout { addr: self.addr.clone(), seconds, waiting_for: what.to_string() }
            }
            _ => self.io(e),
        })
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Rank 0: waits for every other rank's hello, then sends each the payload.
fn serve(config: &RendezvousConfig, payload: &[u8], deadline: &Deadline) -> Result<(), RendezvousError> {
    let n = config.world_size;
    if n == 1 {
        return Ok(()); // nobody to meet: do not even take the port
    }
    let listener = TcpListener::bind((config.master_addr.as_str(), config.master_port)).map_err(|e| deadline.io(e))?;
    // std has no accept with a timeout: poll a non-blocking listener until the deadline.
    listener.set_nonblocking(true).map_err(|e| deadline.io(e))?;
    let mut peers: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let missing = |peers: &[Option<TcpStream>]| -> Vec<Rank> { (1..n).filter(|&r| peers[r].is_none()).collect() };
    while !missing(&peers).is_empty() {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                deadline.left(|| format!("ranks {:?} to connect", missing(&peers)))?;
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(deadline.io(e)),
        };
        stream.set_nonblocking(false).map_err(|e| deadline.io(e))?;
        let mut hello = [0u8; 12];
        match deadline.read_exact(&mut stream, &mut hello, "a connected rank to say hello") {
            // A connection that breaks before its hello: that rank connects again.
            Err(RendezvousError::Io { .. }) => continue,
            result => result?,
        }
        if &hello[..4] != MAGIC {
            continue; // not one of ours (a port scanner, another program): ignore it
        }
        let (rank, size) = (u32_at(&hello, 4) as usize, u32_at(&hello, 8) as usize);
        let wrong = if size != n || rank == 0 || rank >= n {
            Some(format!("rank {rank} of WORLD_SIZE {size} said hello to rank 0 of WORLD_SIZE {n}"))
        } else if peers[rank].as_ref().is_some_and(still_open) {
            Some(format!("two processes say they are rank {rank} (RANK={rank} twice)"))
        } else {
            None
        };
        if let Some(reason) = wrong {
            refuse(peers.iter_mut().flatten().chain([&mut stream]), &reason);
            return Err(deadline.protocol(reason));
        }
        // A second hello from a rank whose first connection closed: that rank connected again.
        peers[rank] = Some(stream);
    }
    let mut reply = MAGIC.to_vec();
    reply.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    reply.extend_from_slice(payload);
    for stream in peers.iter_mut().flatten() {
        let left = deadline.left(|| "sending the payload".into())?;
        stream.set_write_timeout(Some(left)).map_err(|e| deadline.io(e))?;
        stream.write_all(&reply).map_err(|e| deadline.io(e))?;
    }
    Ok(())
}

/// Whether a connection that said hello is still open (its rank has not gone away): a closed
/// one reads as the end of the stream at once, an open one has nothing to read yet.
fn still_open(stream: &TcpStream) -> bool {
    let open = stream.set_nonblocking(true).is_ok()
        && matches!(stream.peek(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    let _ = stream.set_nonblocking(false);
    open
}

/// Tells every rank rank 0 heard from why the rendezvous failed (best effort: a rank that is
/// gone cannot be told, and finds out at its deadline).
fn refuse<'a>(streams: impl Iterator<Item = &'a mut TcpStream>, reason: &str) {
    let mut reply = REFUSED.to_vec();
    reply.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    reply.extend_from_slice(reason.as_bytes());
    for stream in streams {
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = stream.write_all(&reply);
    }
}

/// Connects to rank 0, retrying while it is not listening yet (it may start last).
fn connect(config: &RendezvousConfig, deadline: &Deadline) -> Result<TcpStream, RendezvousError> {
    let mut pause = Duration::from_millis(10);
    let mut last_error = String::from("no address tried yet");
    loop {
        let left = deadline.left(|| format!("rank 0 to accept a connection (last error: {last_error})"))?;
        let addrs: Vec<SocketAddr> = match (config.master_addr.as_str(), config.master_port).to_socket_addrs() {
            Ok(addrs) => addrs.collect(),
            Err(e) => {
                last_error = e.to_string();
                Vec::new()
            }
        };
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, left.min(Duration::from_secs(1))) {
                // Connecting to a free local port can, rarely, connect the socket to itself.
                Ok(stream) if stream.local_addr().ok() == stream.peer_addr().ok() => {
                    last_error = format!("{addr}: connected to itself, so nobody listens there");
                }
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = format!("{addr}: {e}"),
            }
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Ranks above 0: say hello to rank 0 and read the payload back, connecting again if the
/// connection breaks on the way (rank 0 restarted, say): only the deadline ends the attempts.
fn join(config: &RendezvousConfig, deadline: &Deadline) -> Result<Vec<u8>, RendezvousError> {
    let mut last_error = String::new();
    loop {
        deadline.left(|| format!("rank 0 to hand out the payload (last error: {last_error})"))?;
        match connect(config, deadline).and_then(|stream| handshake(config, stream, deadline)) {
            Ok(payload) => return Ok(payload),
            Err(RendezvousError::Io { source, .. }) => last_error = source.to_string(),
            Err(e) => return Err(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn handshake(
    config: &RendezvousConfig,
    mut stream: TcpStream,
    deadline: &Deadline,
) -> Result<Vec<u8>, RendezvousError> {
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&(config.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(config.world_size as u32).to_le_bytes());
    stream.write_all(&hello).map_err(|e| deadline.io(e))?;
    let mut header = [0u8; 8];
    deadline.read_exact(&mut stream, &mut header, "rank 0 to send the payload (are all ranks started?)")?;
    let len = u32_at(&header, 4) as usize;
    if &header[..4] == REFUSED && len <= MAX_PAYLOAD {
        let mut reason = vec![0u8; len];
        deadline.read_exact(&mut stream, &mut reason, "rank 0's reason for refusing this rank")?;
        let reason = String::from_utf8_lossy(&reason);
        return Err(deadline.protocol(format!("rank 0 refused rank {}: {reason}", config.rank)));
    }
    if &header[..4] != MAGIC || len > MAX_PAYLOAD {
        return Err(
            deadline.protocol(format!("unexpected reply header {header:?}: is rank 0 running this rendezvous?"))
        );
    }
    let mut payload = vec![0u8; len];
    deadline.read_exact(&mut stream, &mut payload, "the rest of the payload")?;
    Ok(payload)
}
