//! TCP ranks: each rank is a process (or, in tests, a thread) and a message is a frame on a
//! socket, as in Gloo. The collectives are the same [ring algorithms](super::ring) as the thread
//! ranks', over a [`ring::Wire`] made of sockets, so the results are the thread ranks' bit for
//! bit and the bytes counted are the same.
//!
//! ## How the processes find each other
//! 1. Rank 0 opens a listener for the mesh (any free port on the interface `MASTER_ADDR` names)
//!    and hands its address out through the torchrun-style [rendezvous](super::rendezvous).
//! 2. Every other rank connects to it, opens a listener of its own on the address that
//!    connection came from, and says hello: its rank, the world size, its listener's address.
//! 3. Once all have said hello, rank 0 sends everyone the table of addresses.
//! 4. Rank r connects to every rank 0 < p < r and accepts a connection from every p > r.
//!
//! The result is a full mesh, opened eagerly: n(n-1)/2 connections, 28 for 8 ranks, before the
//! first collective. The ring uses two of each rank's, `send`/`recv` any of them, and sub-groups
//! share them (each frame names its group). Every wait of the setup is bounded by one deadline;
//! a wrong `WORLD_SIZE` or two processes claiming the same `RANK` is an error that says so.
//!
//! ## Frames
//! Every message is one frame, integers little-endian:
//!
//! ```text
//! "SFSM"  kind: u8  0 0 0  group: u64  sequence: u64  length: u64  payload
//! ```
//!
//! `kind` is the collective that sent it (a receive that finds another collective's message says
//! the ranks called different collectives), or [`GOODBYE`]. `group` names the communicator (the
//! world is 0, a split's id is a hash of its parent, members and occurrence, the same on every
//! member with no message exchanged). `sequence` counts the frames on the connection, so a
//! stream that got out of step is caught at once. A data frame's payload is `length` f32 values;
//! a receive that expected another number of values is [`CommError::InvalidArgument`].
//!
//! ## Sends never wait for their receive
//! A reader thread per connection drains its socket into an inbox (a queue per group and
//! sender) as soon as bytes arrive, so a send returns once the kernel took its bytes, whether or
//! not the peer is receiving yet: two ranks that both send 16 MiB before they receive do not
//! deadlock, and the ring's send-then-receive steps work as on thread ranks.
//!
//! ## What a failure looks like
//! A communicator (with all the sub-groups split from it) that is dropped sends every peer a
//! goodbye frame and closes its sockets' write side. The goodbye carries the failure this rank
//! saw, if any (or "panicked", when dropped by a panic), so the others report the first rank
//! that failed. A peer that said goodbye is "finished": a receive from it fails with
//! [`CommError::PeerFailed`] naming it. A connection that closes without a goodbye (the process
//! was killed or crashed) fails every pending and later collective of this process with
//! `PeerFailed` naming that rank. Nothing waits forever: a receive that sees nothing arrive from
//! anyone for the whole timeout ([`TIMEOUT_VAR`](super::TIMEOUT_VAR), 30 minutes by default) is
//! a [`CommError::Timeout`], and so is a send the peer does not drain for that long.

use super::rendezvous::{RendezvousConfig, rendezvous};
use super::{
    Collective, CommError, CommStats, Communicator, Rank, ReduceOp, bytes, check_received, parse_seconds, ring,
    split_position, timeout_from_env,
};
use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long [`TcpComm::from_env`] waits for every process to show up, unless
/// [`RENDEZVOUS_TIMEOUT_VAR`] says otherwise.
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

/// The environment variable that bounds [`TcpComm::from_env`]'s wait for the other processes
/// (connection refused, a missing rank), in whole seconds.
pub const RENDEZVOUS_TIMEOUT_VAR: &str = "SFS_RENDEZVOUS_TIMEOUT_SECS";

/// The rendezvous timeout [`RENDEZVOUS_TIMEOUT_VAR`] asks for, or [`RENDEZVOUS_TIMEOUT`].
pub fn rendezvous_timeout_from_env() -> Result<Duration, CommError> {
    let value = std::env::var_os(RENDEZVOUS_TIMEOUT_VAR).map(|v| v.to_string_lossy().into_owned());
    parse_seconds(RENDEZVOUS_TIMEOUT_VAR, value.as_deref(), RENDEZVOUS_TIMEOUT)
}

/// Names a communicator's group on the wire: the world is 0.
type GroupId = u64;
const WORLD: GroupId = 0;

const FRAME_MAGIC: &[u8; 4] = b"SFSM";
const HELLO_MAGIC: &[u8; 4] = b"SFSH";
const TABLE_MAGIC: &[u8; 4] = b"SFST";
const HEADER_BYTES: usize = 32;
/// The frame kind of a goodbye: the sender's communicator is gone. Its payload is the failure
/// it saw, `rank: u32` then the reason in UTF-8, or nothing when it ended cleanly.
pub const GOODBYE: u8 = 0xff;
/// Every collective, in the order of their frame kinds.
const KINDS: [Collective; 7] = [
    Collective::AllReduce,
    Collective::ReduceScatter,
    Collective::AllGather,
    Collective::Broadcast,
    Collective::SendRecv,
    Collective::Barrier,
    Collective::Split,
];

fn kind_of(collective: Collective) -> u8 {
    KINDS.iter().position(|&c| c == collective).unwrap_or(0) as u8
}

/// No code runs while these locks are held but our own few lines: a lock poisoned by a panic
/// elsewhere is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

struct Frame {
    collective: Collective,
    data: Vec<f32>,
}

/// What has arrived for this process, from every peer, for every group.
struct InboxState {
    queues: HashMap<(GroupId, Rank), VecDeque<Frame>>,
    /// Peers (world ranks) that said goodbye.
    finished: Vec<bool>,
    /// The first failure seen: every collective fails with it from then on.
    failure: Option<CommError>,
    /// Frames arrived so far: a wait that sees it move knows some peer is alive.
    arrived: u64,
}

struct Inbox {
    state: Mutex<InboxState>,
    /// Signalled on every arrival, goodbye and failure; several communicators (sub-groups on
    /// other threads) can wait at once, so every signal wakes them all.
    changed: Condvar,
}

impl Inbox {
    fn update(&self, f: impl FnOnce(&mut InboxState)) {
        f(&mut lock(&self.state));
        self.changed.notify_all();
    }

    fn push(&self, group: GroupId, from: Rank, frame: Frame) {
        self.update(|s| {
            s.queues.entry((group, from)).or_default().push_back(frame);
            s.arrived += 1;
        });
    }

    fn fail(&self, failure: CommError) {
        self.update(|s| {
            s.failure.get_or_insert(failure);
        });
    }

    fn check(&self) -> Result<(), CommError> {
        lock(&self.state).failure.clone().map_or(Ok(()), Err)
    }

    /// The first failure, once there is one, or `None` after `timeout` without one.
    fn wait_for_failure(&self, timeout: Duration) -> Option<CommError> {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.state);
        loop {
            let now = Instant::now();
            if state.failure.is_some() || now >= deadline {
                return state.failure.clone();
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The next frame of `group` from world rank `from`, for world rank `me`. Gives up after
    /// `timeout` only if no frame arrived from anyone meanwhile.
    fn take(
        &self,
        group: GroupId,
        from: Rank,
        me: Rank,
        collective: Collective,
        timeout: Duration,
    ) -> Result<Frame, CommError> {
        let mut state = lock(&self.state);
        let (mut deadline, mut arrived) = (Instant::now() + timeout, state.arrived);
        loop {
            if let Some(failure) = &state.failure {
                return Err(failure.clone());
            }
            if let Some(frame) = state.queues.get_mut(&(group, from)).and_then(|q| q.pop_front()) {
                return Ok(frame);
            }
            if state.finished[from] {
                let reason = format!(
                    "finished while rank {me} still waited for its {collective:?} message (did the ranks make different calls?)"
                );
                let failure = CommError::PeerFailed { rank: from, reason };
                state.failure = Some(failure.clone());
                return Err(failure);
            }
            let now = Instant::now();
            if now >= deadline {
                if state.arrived == arrived {
                    return Err(CommError::Timeout { collective, peer: from, seconds: timeout.as_secs() });
                }
                (deadline, arrived) = (now + timeout, state.arrived);
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// The write half of one connection.
struct Writer {
    stream: TcpStream,
    sequence: u64,
    /// The frame being written, reused: a fresh buffer per message costs page faults.
    bytes: Vec<u8>,
}

impl Writer {
    fn write_frame(
        &mut self,
        kind: u8,
        group: GroupId,
        length: usize,
        payload: impl FnOnce(&mut Vec<u8>),
    ) -> io::Result<()> {
        let bytes = &mut self.bytes;
        bytes.clear();
        bytes.extend_from_slice(FRAME_MAGIC);
        bytes.extend_from_slice(&[kind, 0, 0, 0]);
        bytes.extend_from_slice(&group.to_le_bytes());
        bytes.extend_from_slice(&self.sequence.to_le_bytes());
        bytes.extend_from_slice(&(length as u64).to_le_bytes());
        payload(bytes);
        self.sequence += 1;
        self.stream.write_all(bytes)
    }
}

/// One process's connections: a writer per peer (none for itself) and the inbox its reader
/// threads fill. Shared by the world communicator and every sub-group split from it.
struct Mesh {
    rank: Rank,
    inbox: Arc<Inbox>,
    writers: Vec<Option<Mutex<Writer>>>,
}

impl Drop for Mesh {
    /// Says goodbye to every peer (with the failure this rank saw, so that they name the first
    /// failed rank), then closes the write side: the peers' readers see the goodbye, then the end.
    fn drop(&mut self) {
        let failure = if std::thread::panicking() {
            Some((self.rank, "panicked".to_string()))
        } else {
            match lock(&self.inbox.state).failure.clone() {
                Some(CommError::PeerFailed { rank, reason }) => Some((rank, reason)),
                Some(other) => Some((self.rank, other.to_string())),
                None => None,
            }
        };
        for writer in self.writers.iter().flatten() {
            let mut writer = lock(writer);
            let (rank, reason) = failure.clone().map_or((u32::MAX, String::new()), |(r, why)| (r as u32, why));
            let length = if failure.is_some() { 4 + reason.len() } else { 0 };
            // A peer that is gone cannot be told: nothing to do about an error here.
            let _ = writer.write_frame(GOODBYE, WORLD, length, |bytes| {
                if failure.is_some() {
                    bytes.extend_from_slice(&rank.to_le_bytes());
                    bytes.extend_from_slice(reason.as_bytes());
                }
            });
            let _ = writer.stream.shutdown(Shutdown::Write);
        }
    }
}

/// What a reader thread found on its connection.
enum Incoming {
    Data { group: GroupId, frame: Frame },
    Goodbye(Option<CommError>),
}

/// Reads one frame; an `Err` is why the connection cannot be read any more.
fn read_frame(reader: &mut impl Read, sequence: u64) -> Result<Incoming, String> {
    let mut header = [0u8; HEADER_BYTES];
    reader.read_exact(&mut header).map_err(|e| format!("its connection closed without a goodbye ({e})"))?;
    let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
    let (kind, group, got_sequence, length) = (header[4], word(8), word(16), word(24) as usize);
    if &header[..4] != FRAME_MAGIC || got_sequence != sequence {
        return Err(format!("sent a malformed frame (header {header:?}, expected sequence {sequence})"));
    }
    let closed = |e: io::Error| format!("its connection closed in the middle of a frame ({e})");
    if kind == GOODBYE {
        if length == 0 {
            return Ok(Incoming::Goodbye(None));
        }
        let mut payload = vec![0u8; length.min(1 << 16)];
        reader.read_exact(&mut payload).map_err(closed)?;
        let rank = u32::from_le_bytes(payload[..4].try_into().unwrap_or_default()) as Rank;
        let reason = String::from_utf8_lossy(&payload[4..]).into_owned();
        return Ok(Incoming::Goodbye(Some(CommError::PeerFailed { rank, reason })));
    }
    let Some(&collective) = KINDS.get(kind as usize) else {
        return Err(format!("sent a frame of unknown kind {kind}"));
    };
    // Read in pieces, so that a corrupt length cannot allocate gigabytes before the read fails.
    let mut data = Vec::with_capacity(length.min(1 << 20));
    let mut piece = [0u8; 1 << 16];
    let mut left = length * size_of::<f32>();
    while left > 0 {
        let take = left.min(piece.len());
        reader.read_exact(&mut piece[..take]).map_err(closed)?;
        data.extend(piece[..take].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        left -= take;
    }
    Ok(Incoming::Data { group, frame: Frame { collective, data } })
}

/// A reader thread: moves frames from `peer`'s connection into the inbox until a goodbye or
/// the connection's end (a failure, naming `peer`).
fn read_frames(stream: TcpStream, peer: Rank, inbox: Arc<Inbox>) {
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    for sequence in 0.. {
        match read_frame(&mut reader, sequence) {
            Ok(Incoming::Data { group, frame }) => inbox.push(group, peer, frame),
            Ok(Incoming::Goodbye(None)) => return inbox.update(|s| s.finished[peer] = true),
            Ok(Incoming::Goodbye(Some(failure))) => return inbox.fail(failure),
            Err(reason) => return inbox.fail(CommError::PeerFailed { rank: peer, reason }),
        }
    }
}

/// The setup's one deadline, and its errors.
struct Setup {
    rank: Rank,
    world_size: usize,
    end: Instant,
    timeout: Duration,
}

impl Setup {
    fn error(&self, what: impl Display) -> CommError {
        CommError::Backend(format!("TCP setup of rank {} of {}: {what}", self.rank, self.world_size))
    }

    fn left(&self, waiting_for: impl Display) -> Result<Duration, CommError> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(
                self.error(format!("timed out after {:.1} s waiting for {waiting_for}", self.timeout.as_secs_f64()))
            );
        }
        Ok(left)
    }

    fn read_exact(&self, stream: &mut TcpStream, buf: &mut [u8], what: &str) -> Result<(), CommError> {
        let left = self.left(what)?;
        stream.set_read_timeout(Some(left)).map_err(|e| self.error(e))?;
        stream.read_exact(buf).map_err(|e| self.error(format!("reading {what}: {e}")))
    }

    fn write_all(&self, stream: &mut TcpStream, bytes: &[u8], what: &str) -> Result<(), CommError> {
        stream.set_write_timeout(Some(self.left(what)?)).map_err(|e| self.error(e))?;
        stream.write_all(bytes).map_err(|e| self.error(format!("sending {what}: {e}")))
    }

    /// Connects to `addr`, retrying while nobody listens yet.
    fn connect(&self, addr: &str, peer: Rank) -> Result<TcpStream, CommError> {
        let addr: SocketAddr = addr.parse().map_err(|e| self.error(format!("rank {peer}'s address {addr:?}: {e}")))?;
        let mut last_error = String::from("none");
        loop {
            let left = self.left(format_args!("rank {peer} at {addr} to accept (last error: {last_error})"))?;
            match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1))) {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(20).min(left));
        }
    }

    /// `hello`: "SFSH" rank: u32 world_size: u32 address length: u16, address.
    fn hello(&self, listening: &str) -> Vec<u8> {
        let mut hello = HELLO_MAGIC.to_vec();
        hello.extend_from_slice(&(self.rank as u32).to_le_bytes());
        hello.extend_from_slice(&(self.world_size as u32).to_le_bytes());
        hello.extend_from_slice(&(listening.len() as u16).to_le_bytes());
        hello.extend_from_slice(listening.as_bytes());
        hello
    }

    /// Accepts connections until every rank in `expected` has said hello on one; returns each
    /// one's stream and listening address, by rank.
    fn accept(
        &self,
        listener: &TcpListener,
        expected: impl Fn(Rank) -> bool,
        count: usize,
    ) -> Result<HashMap<Rank, (TcpStream, String)>, CommError> {
        listener.set_nonblocking(true).map_err(|e| self.error(e))?;
        let mut peers = HashMap::new();
        while peers.len() < count {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.left(format_args!("{} more ranks to connect", count - peers.len()))?;
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(self.error(e)),
            };
            stream.set_nonblocking(false).map_err(|e| self.error(e))?;
            let mut head = [0u8; 14];
            self.read_exact(&mut stream, &mut head, "a connected rank's hello")?;
            let u32_at = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]) as usize;
            let (rank, size, len) = (u32_at(4), u32_at(8), u16::from_le_bytes([head[12], head[13]]) as usize);
            if &head[..4] != HELLO_MAGIC {
                return Err(self.error("a connection that is not one of ours said hello"));
            }
            if size != self.world_size {
                return Err(self.error(format!("rank {rank} has WORLD_SIZE {size}, this rank {}", self.world_size)));
            }
            if !expected(rank) || peers.contains_key(&rank) {
                return Err(
                    self.error(format!("a second process says it is rank {rank} (two ranks with the same RANK?)"))
                );
            }
            let mut addr = vec![0u8; len];
            self.read_exact(&mut stream, &mut addr, "a connected rank's address")?;
            peers.insert(rank, (stream, String::from_utf8_lossy(&addr).into_owned()));
        }
        Ok(peers)
    }
}

fn io_err(setup: &Setup) -> impl Fn(io::Error) -> CommError + '_ {
    |e| setup.error(e)
}

/// Opens the mesh: one connected stream per peer (`None` for this rank).
fn open_mesh(config: &RendezvousConfig, rendezvous_timeout: Duration) -> Result<Vec<Option<TcpStream>>, CommError> {
    let (n, me) = (config.world_size, config.rank);
    let setup =
        Setup { rank: me, world_size: n, end: Instant::now() + rendezvous_timeout, timeout: rendezvous_timeout };
    let mut streams: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    // ANCHOR: tcp_mesh
    // Rank 0 listens on the interface MASTER_ADDR names, on a port the OS picks; the rendezvous
    // hands that address to everyone (and returns once every process has started).
    let listener0 = match me == 0 && n > 1 {
        true => Some(TcpListener::bind((config.master_addr.as_str(), 0)).map_err(io_err(&setup))?),
        false => None,
    };
    let addr0 = listener0.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default();
    let payload = rendezvous(config, || addr0.clone().into_bytes(), rendezvous_timeout)
        .map_err(|e| CommError::Backend(e.to_string()))?;
    if n == 1 {
        return Ok(streams);
    }
    let mut table: Vec<String> = vec![String::new(); n];
    let mut listener = listener0;
    if me == 0 {
        // Everyone connects to rank 0 and says where it listens; rank 0 sends the table back.
        let peers =
            setup.accept(listener.as_ref().ok_or_else(|| setup.error("no listener"))?, |r| r > 0 && r < n, n - 1)?;
        table[0] = addr0;
        for (&rank, (_, addr)) in &peers {
            table[rank] = addr.clone();
        }
        let mut reply = TABLE_MAGIC.to_vec();
        for addr in &table {
            reply.extend_from_slice(&(addr.len() as u16).to_le_bytes());
            reply.extend_from_slice(addr.as_bytes());
        }
        for (rank, (mut stream, _)) in peers {
            setup.write_all(&mut stream, &reply, "the address table")?;
            streams[rank] = Some(stream);
        }
    } else {
        let addr0 = String::from_utf8_lossy(&payload).into_owned();
        let mut stream0 = setup.connect(&addr0, 0)?;
        // Listen where rank 0 sees this rank: an address the other ranks can reach too.
        let ip = stream0.local_addr().map_err(io_err(&setup))?.ip();
        let own = TcpListener::bind((ip, 0)).map_err(io_err(&setup))?;
        let own_addr = own.local_addr().map_err(io_err(&setup))?.to_string();
        setup.write_all(&mut stream0, &setup.hello(&own_addr), "the hello to rank 0")?;
        let mut magic = [0u8; 4];
        setup.read_exact(&mut stream0, &mut magic, "rank 0's address table")?;
        if &magic != TABLE_MAGIC {
            return Err(setup.error("rank 0 answered the hello with something else than the address table"));
        }
        for addr in table.iter_mut() {
            let mut len = [0u8; 2];
            setup.read_exact(&mut stream0, &mut len, "rank 0's address table")?;
            let mut bytes = vec![0u8; u16::from_le_bytes(len) as usize];
            setup.read_exact(&mut stream0, &mut bytes, "rank 0's address table")?;
            *addr = String::from_utf8_lossy(&bytes).into_owned();
        }
        streams[0] = Some(stream0);
        listener = Some(own);
    }
    // Rank r connects to the ranks between 0 and r, and accepts the ranks above r.
    for (peer, addr) in table.iter().enumerate().take(me).skip(1) {
        let mut stream = setup.connect(addr, peer)?;
        setup.write_all(&mut stream, &setup.hello(""), "a hello")?;
        streams[peer] = Some(stream);
    }
    if me > 0 && me < n - 1 {
        let peers = setup.accept(
            listener.as_ref().ok_or_else(|| setup.error("no listener"))?,
            |r| r > me && r < n,
            n - 1 - me,
        )?;
        for (rank, (stream, _)) in peers {
            streams[rank] = Some(stream);
        }
    }
    // ANCHOR_END: tcp_mesh
    Ok(streams)
}

/// One rank's communicator over a group of TCP ranks. `Send`: it can move to a communication
/// thread; a sub-group shares its parent's connections.
pub struct TcpComm {
    mesh: Arc<Mesh>,
    group: GroupId,
    /// World rank of each group rank.
    members: Arc<[Rank]>,
    rank: Rank,
    timeout: Duration,
    stats: CommStats,
    /// How many times each member list was split from this communicator.
    splits: HashMap<Vec<Rank>, usize>,
}

impl TcpComm {
    /// This process's communicator in a job started by torchrun or any launcher that sets
    /// `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`. Waits up to
    /// [`RENDEZVOUS_TIMEOUT`] (or [`RENDEZVOUS_TIMEOUT_VAR`]) for the others.
    pub fn from_env() -> Result<TcpComm, CommError> {
        let config = RendezvousConfig::from_env().map_err(|e| CommError::Backend(e.to_string()))?;
        TcpComm::from_rendezvous(&config, rendezvous_timeout_from_env()?)
    }

    /// Rank `config.rank` of `config.world_size`: meets the others (see the module's
    /// documentation), within `rendezvous_timeout` in all. Collectives time out after
    /// [`TIMEOUT_VAR`](super::TIMEOUT_VAR) or [`DEFAULT_TIMEOUT`](super::DEFAULT_TIMEOUT).
    pub fn from_rendezvous(config: &RendezvousConfig, rendezvous_timeout: Duration) -> Result<TcpComm, CommError> {
        let timeout = timeout_from_env()?;
        let streams = open_mesh(config, rendezvous_timeout)?;
        let n = config.world_size;
        let state = InboxState { queues: HashMap::new(), finished: vec![false; n], failure: None, arrived: 0 };
        let inbox = Arc::new(Inbox { state: Mutex::new(state), changed: Condvar::new() });
        let mut writers = Vec::with_capacity(n);
        for (peer, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else {
                writers.push(None);
                continue;
            };
            let backend =
                |e: io::Error| CommError::Backend(format!("rank {}: the connection to rank {peer}: {e}", config.rank));
            // Small messages (a barrier, a row max) go out at once, not after Nagle's wait.
            stream.set_nodelay(true).map_err(backend)?;
            stream.set_read_timeout(None).map_err(backend)?;
            stream.set_write_timeout(Some(timeout)).map_err(backend)?;
            let (read_half, inbox) = (stream.try_clone().map_err(backend)?, inbox.clone());
            std::thread::Builder::new()
                .name(format!("tcp rank {} <- {peer}", config.rank))
                .spawn(move || read_frames(read_half, peer, inbox))
                .map_err(backend)?;
            writers.push(Some(Mutex::new(Writer { stream, sequence: 0, bytes: Vec::new() })));
        }
        let mesh = Arc::new(Mesh { rank: config.rank, inbox, writers });
        let members: Arc<[Rank]> = (0..n).collect();
        Ok(TcpComm::new(mesh, WORLD, members, config.rank, timeout))
    }

    fn new(mesh: Arc<Mesh>, group: GroupId, members: Arc<[Rank]>, rank: Rank, timeout: Duration) -> TcpComm {
        let (stats, splits) = Default::default();
        TcpComm { mesh, group, members, rank, timeout, stats, splits }
    }

    /// This rank's rank in the world (the one errors name).
    pub fn world_rank(&self) -> Rank {
        self.members[self.rank]
    }

    /// A handle on this process's connections that outlives the communicator: it keeps them
    /// open (the goodbye goes out once it and every communicator are dropped), records this
    /// rank's own failure for that goodbye, and says whether a failure is known.
    pub fn guard(&self) -> MeshGuard {
        MeshGuard { mesh: self.mesh.clone() }
    }

    /// Something another thread can wait on for this process's first communication failure,
    /// without keeping the connections open.
    pub fn failure_watch(&self) -> FailureWatch {
        FailureWatch { inbox: self.mesh.inbox.clone() }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long a receive waits while nothing arrives from anyone, before
    /// [`CommError::Timeout`]; sub-groups split afterwards inherit it. Sends wait as long as the
    /// timeout the communicator was made with.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// A communicator over the sub-group `ranks` (ranks of `self`, in the order of their new
    /// ranks), over the same connections. Every member calls it with the same list.
    pub fn split_group(&mut self, ranks: &[Rank]) -> Result<TcpComm, CommError> {
        self.mesh.inbox.check()?;
        let new_rank = split_position(ranks, self.world_size(), self.rank)?;
        let count = self.splits.entry(ranks.to_vec()).or_default();
        let occurrence = *count as u64;
        *count += 1;
        let members: Arc<[Rank]> = ranks.iter().map(|&r| self.members[r]).collect();
        let group = group_id(self.group, &members, occurrence);
        Ok(TcpComm::new(self.mesh.clone(), group, members, new_rank, self.timeout))
    }
}

/// See [`TcpComm::guard`].
#[derive(Clone)]
pub struct MeshGuard {
    mesh: Arc<Mesh>,
}

impl MeshGuard {
    /// Records that this rank failed, unless a failure is already known: the goodbye every
    /// peer receives then names this rank and `reason`, and every later collective fails.
    pub fn fail(&self, reason: String) {
        self.mesh.inbox.fail(CommError::PeerFailed { rank: self.mesh.rank, reason });
    }

    /// The first failure this process saw (a peer's, or its own), if any.
    pub fn failure(&self) -> Option<CommError> {
        self.mesh.inbox.check().err()
    }

    /// This process's world rank.
    pub fn rank(&self) -> Rank {
        self.mesh.rank
    }

    /// Waits until every communicator on these connections is dropped (a communication thread
    /// may still be ending), for at most `timeout`: then dropping this guard sends the goodbye,
    /// which a process that exits with a communicator still alive would never send.
    pub fn wait_for_communicators(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Arc::strong_count(&self.mesh) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// See [`TcpComm::failure_watch`].
#[derive(Clone)]
pub struct FailureWatch {
    inbox: Arc<Inbox>,
}

impl FailureWatch {
    /// Blocks until a failure is known (and returns it) or `timeout` passes (`None`).
    pub fn wait(&self, timeout: Duration) -> Option<CommError> {
        self.inbox.wait_for_failure(timeout)
    }
}

/// A split's group id, the same on every member: FNV-1a over the parent's id, the members'
/// world ranks and how many times this list was split from that parent before.
fn group_id(parent: GroupId, members: &[Rank], occurrence: u64) -> GroupId {
    let words = [parent, members.len() as u64, occurrence].into_iter().chain(members.iter().map(|&r| r as u64));
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in words.flat_map(u64::to_le_bytes) {
        hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    hash.max(1) // never the world's 0
}

/// A communicator's wire for the length of one collective: group ranks in, world ranks out,
/// every byte counted under that collective.
pub struct Link<'a> {
    comm: &'a mut TcpComm,
    collective: Collective,
}

impl Link<'_> {
    fn take(&mut self, from: Rank, len: usize) -> Result<Vec<f32>, CommError> {
        let (c, collective) = (&mut *self.comm, self.collective);
        let from_world = c.members[from];
        let frame = c.mesh.inbox.take(c.group, from_world, c.world_rank(), collective, c.timeout)?;
        check_received(collective, from_world, frame.collective, frame.data.len(), len)?;
        *c.stats.received.entry(collective).or_default() += bytes(len);
        Ok(frame.data)
    }
}

impl ring::Wire for Link<'_> {
    fn rank(&self) -> Rank {
        self.comm.rank
    }

    fn size(&self) -> usize {
        self.comm.members.len()
    }

    // ANCHOR: tcp_send
    /// Writes one frame to `to`'s socket; returns once the kernel has the bytes (the peer's
    /// reader thread drains them whether or not it is receiving). A message to this rank goes
    /// straight into its own inbox.
    fn send(&mut self, to: Rank, data: &[f32]) -> Result<(), CommError> {
        let (c, collective) = (&mut *self.comm, self.collective);
        let (me, to_world) = (c.world_rank(), c.members[to]);
        match &c.mesh.writers[to_world] {
            None => c.mesh.inbox.push(c.group, me, Frame { collective, data: data.to_vec() }),
            Some(writer) => {
                let written = lock(writer).write_frame(kind_of(collective), c.group, data.len(), |bytes| {
                    bytes.reserve(size_of_val(data));
                    data.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
                });
                written.map_err(|e| match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        CommError::Timeout { collective, peer: to_world, seconds: c.timeout.as_secs() }
                    }
                    _ => CommError::PeerFailed { rank: to_world, reason: format!("sending to it failed: {e}") },
                })?;
            }
        }
        *c.stats.sent.entry(collective).or_default() += bytes(data.len());
        Ok(())
    }
    // ANCHOR_END: tcp_send

    fn recv(&mut self, from: Rank, into: &mut [f32]) -> Result<(), CommError> {
        into.copy_from_slice(&self.take(from, into.len())?);
        Ok(())
    }

    fn recv_reduce(&mut self, from: Rank, into: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        ring::combine(into, &self.take(from, into.len())?, op);
        Ok(())
    }
}

impl ring::RingTransport for TcpComm {
    type Link<'a> = Link<'a>;
    type Group = TcpComm;

    fn position(&self) -> Rank {
        self.rank
    }
    fn members(&self) -> usize {
        self.members.len()
    }
    fn check(&self) -> Result<(), CommError> {
        self.mesh.inbox.check()
    }
    fn link(&mut self, collective: Collective) -> Link<'_> {
        Link { comm: self, collective }
    }
    /// The ring is out of step now: every later call fails too, and the goodbye says why.
    fn failed(&mut self, error: &CommError) {
        self.mesh.inbox.fail(error.clone());
    }
    fn counts(&mut self) -> &mut CommStats {
        &mut self.stats
    }
    fn counted(&self) -> &CommStats {
        &self.stats
    }
    fn split_group(&mut self, ranks: &[Rank]) -> Result<TcpComm, CommError> {
        TcpComm::split_group(self, ranks)
    }
}
