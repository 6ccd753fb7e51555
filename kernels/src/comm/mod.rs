//! Collectives: one communicator interface for every chapter, and its implementations.
//!
//! - [`thread`]: ranks as threads of one process (the default on the CPU, and the test bed), and
//!   the launcher that starts them. The collectives run the real ring algorithms over chunks, not
//!   a shared sum: this is what the book teaches, and what the byte counts measure.
//! - [`ring`]: those algorithms, written once against a two-method transport ([`ring::Wire`]),
//!   with the step-by-step math on top.
//! - [`rendezvous`]: how separate processes find each other (torchrun's environment variables and
//!   a TCP handshake with rank 0): what an NCCL communicator needs before its first collective.
//! - [`tcp`]: ranks as processes (on one machine or several) connected by TCP sockets, as Gloo
//!   does: the same ring algorithms over a socket [`ring::Wire`], so the same bits and bytes as
//!   thread ranks; processes meet through the [`rendezvous`].
//! - [`grid`]: the `dp × tp × pp` grid, the one place ranks are mapped to coordinates and groups.
//! - [`process`]: ranks as processes of one program: `--nproc-per-node K` (the program starts K
//!   copies of itself, as torchrun would) or torchrun's environment, and how a job whose ranks
//!   are processes fails (one line naming the first failed rank, never a hang).
//! - NCCL (through cudarc), one thread per GPU, for multi-GPU runs (see the CUDA chapter).
//!
//! Every call is a collective: all ranks of the communicator make the same calls in the same
//! order with buffers of the same size. A rank that fails makes every other rank's pending or
//! next collective return [`CommError::PeerFailed`] within a bounded time: nothing ever hangs.
//! A rank that is only slow (rank 0 writing a checkpoint) is waited for: the one time-out,
//! [`DEFAULT_TIMEOUT`] (30 minutes, or [`TIMEOUT_VAR`]), is for deadlocks, and for what NCCL
//! cannot see. The thread launcher returns within [`thread::FAILURE_GRACE`] of the first failure,
//! even if some rank's thread never ends.
//!
//! ## Host slices, device buffers
//! Every collective takes host slices (`&[f32]`). Thread ranks hand them from thread to thread,
//! TCP ranks write them to sockets: the ring algorithms run on any host
//! [`ring::Wire`]. A tensor on a GPU is staged through the host for now: its owner copies it
//! out (`Tensor::to_vec`), runs the collective, and copies the result back
//! (`Tensor::copy_from`). NCCL works on device memory, and stages the host slices it is given
//! through device buffers of its own ([`nccl`]); handing it a tensor's device buffer directly,
//! with no host copy, is not built yet.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

pub mod grid;
mod launcher;
mod mailbox;
pub mod nccl;
pub mod process;
pub mod rendezvous;
pub mod ring;
pub mod tcp;
pub mod thread;

/// A rank's index in its communicator: 0..world_size.
pub type Rank = usize;

/// How long a collective waits before [`CommError::Timeout`], unless [`TIMEOUT_VAR`] or
/// `set_timeout` says otherwise: 30 minutes, far longer than any save or metrics write of one
/// rank, because a slow rank is not a failed one (failures are reported at once, not timed).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The environment variable that sets every communicator's timeout, in whole seconds.
pub const TIMEOUT_VAR: &str = "SFS_COMM_TIMEOUT_SECS";

/// The timeout [`TIMEOUT_VAR`] asks for, or [`DEFAULT_TIMEOUT`] where it is not set.
pub fn timeout_from_env() -> Result<Duration, CommError> {
    let value = std::env::var_os(TIMEOUT_VAR).map(|v| v.to_string_lossy().into_owned());
    parse_timeout(value.as_deref())
}

/// [`timeout_from_env`] on a value: `None` is the default, anything but a whole number of
/// seconds above 0 is an error naming the variable (waiting forever is not an option).
pub fn parse_timeout(value: Option<&str>) -> Result<Duration, CommError> {
    parse_seconds(TIMEOUT_VAR, value, DEFAULT_TIMEOUT)
}

/// The value of the environment variable `name`, a whole number of seconds above 0, or
/// `default` where it is not set.
pub(crate) fn parse_seconds(name: &str, value: Option<&str>, default: Duration) -> Result<Duration, CommError> {
    let Some(text) = value else { return Ok(default) };
    match text.trim().parse::<u64>() {
        Ok(seconds) if seconds > 0 => Ok(Duration::from_secs(seconds)),
        _ => Err(CommError::Backend(format!("{name}={text:?} is not a whole number of seconds above 0"))),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the number of ranks.
    Avg,
    /// The largest value: vocabulary-parallel cross-entropy's row max. On thread ranks a NaN
    /// anywhere makes it NaN; NCCL runs its own `ncclMax`.
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Collective {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    SendRecv,
    Barrier,
    /// Making a sub-group communicator: moves no bytes, but can fail (a bad member list).
    Split,
}

/// Ranks in errors are world ranks (the launcher's), not ranks within a sub-group: they name the
/// thread or process to look at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// Another rank returned an error or panicked; this collective cannot complete.
    #[error("rank {rank} failed: {reason}")]
    PeerFailed { rank: Rank, reason: String },
    /// The last resort when a peer neither answers nor fails. Thread ranks give up only when
    /// every rank they wait for, directly or through others, is waiting too and nothing moved for
    /// the whole timeout (a deadlock: the ranks made different calls); a rank that is busy (a
    /// long save) is waited for. NCCL cannot tell, and gives up when a call takes longer than the
    /// timeout: [`DEFAULT_TIMEOUT`], far longer than any save, or [`TIMEOUT_VAR`].
    #[error("{collective:?} timed out after {seconds} s waiting for rank {peer} ({TIMEOUT_VAR} sets the limit)")]
    Timeout { collective: Collective, peer: Rank, seconds: u64 },
    #[error("{collective:?}: {reason}")]
    InvalidArgument { collective: Collective, reason: String },
    #[error("{0}")]
    Backend(String),
}

/// Bytes one rank sent and received, by collective, through one communicator (a sub-group's
/// communicator counts its own traffic, not its parent's). Every collective called at least once
/// has an entry in all three maps, zero included.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommStats {
    pub sent: BTreeMap<Collective, u64>,
    pub received: BTreeMap<Collective, u64>,
    pub calls: BTreeMap<Collective, u64>,
}

impl CommStats {
    pub fn total_sent(&self) -> u64 {
        self.sent.values().sum()
    }

    pub fn total_received(&self) -> u64 {
        self.received.values().sum()
    }
}

// ANCHOR: communicator
/// One rank's view of a group of ranks. `Send`, so that a communicator (a sub-group's too) can
/// move to the thread that runs its collectives.
pub trait Communicator: Send {
    fn rank(&self) -> Rank;
    fn world_size(&self) -> usize;

    /// Every rank ends with the elementwise reduction of all ranks' `buf`; identical bit for
    /// bit on every rank.
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError>;
    /// `input` is n equal chunks; rank r ends with the reduction of every rank's chunk r in
    /// `output` (input.len() == n * output.len()).
    fn reduce_scatter(&mut self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<(), CommError>;
    /// Every rank ends with all ranks' `input`s concatenated in rank order in `output`
    /// (output.len() == n * input.len()).
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// Every rank ends with `root`'s `buf`.
    fn broadcast(&mut self, buf: &mut [f32], root: Rank) -> Result<(), CommError>;
    /// Point to point: pairs with `recv` on rank `to`.
    fn send(&mut self, buf: &[f32], to: Rank) -> Result<(), CommError>;
    fn recv(&mut self, buf: &mut [f32], from: Rank) -> Result<(), CommError>;
    /// Both at once: sends `send` to rank `to` while it receives `recv` from rank `from`, and
    /// neither half waits for the other. Two pipeline stages that send to each other, or a ring
    /// shift (everyone sends right, receives from the left), cannot deadlock. Pairs with a
    /// `sendrecv` on `to` and on `from` (on NCCL, pairing it with a plain `send` or `recv` is
    /// undefined); `to` and `from` may be this rank.
    fn sendrecv(&mut self, send: &[f32], to: Rank, recv: &mut [f32], from: Rank) -> Result<(), CommError>;
    fn barrier(&mut self) -> Result<(), CommError>;

    /// A communicator over a sub-group: `ranks` lists members by their rank in `self`, in the
    /// order that defines their rank in the new group. Every member calls it with the same list
    /// (non-members must not call it). The 3D grid makes one per row, column and pipe.
    fn split(&mut self, ranks: &[Rank]) -> Result<Box<dyn Communicator>, CommError>;

    /// What this rank has sent and received so far.
    fn stats(&self) -> CommStats;
}
// ANCHOR_END: communicator

/// A sub-group's communicator (what [`Communicator::split`] returns) is a communicator too, so
/// code generic over `C: Communicator` runs on it.
impl Communicator for Box<dyn Communicator> {
    fn rank(&self) -> Rank {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        (**self).all_reduce(buf, op)
    }
    fn reduce_scatter(&mut self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        (**self).reduce_scatter(input, output, op)
    }
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        (**self).all_gather(input, output)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: Rank) -> Result<(), CommError> {
        (**self).broadcast(buf, root)
    }
    fn send(&mut self, buf: &[f32], to: Rank) -> Result<(), CommError> {
        (**self).send(buf, to)
    }
    fn recv(&mut self, buf: &mut [f32], from: Rank) -> Result<(), CommError> {
        (**self).recv(buf, from)
    }
    fn sendrecv(&mut self, send: &[f32], to: Rank, recv: &mut [f32], from: Rank) -> Result<(), CommError> {
        (**self).sendrecv(send, to, recv, from)
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        (**self).barrier()
    }
    fn split(&mut self, ranks: &[Rank]) -> Result<Box<dyn Communicator>, CommError> {
        (**self).split(ranks)
    }
    fn stats(&self) -> CommStats {
        (**self).stats()
    }
}

/// A message received in `collective` from world rank `from`, checked against what this rank
/// expects: it was sent in the same collective (`sent`), with `len` values (it has `got`).
/// Every transport's receive ends here, so the ranks' mistakes read the same on each.
pub(crate) fn check_received(
    collective: Collective,
    from: Rank,
    sent: Collective,
    got: usize,
    len: usize,
) -> Result<(), CommError> {
    let invalid = |reason| CommError::InvalidArgument { collective, reason };
    if sent != collective {
        return Err(invalid(format!("rank {from} sent a {sent:?} message: the ranks called different collectives")));
    }
    if got != len {
        return Err(invalid(format!(
            "rank {from} sent {got} values where {len} were expected: the ranks passed buffers of different sizes"
        )));
    }
    Ok(())
}

/// Bytes of `values` f32s, as the statistics count them.
pub(crate) fn bytes(values: usize) -> u64 {
    (values * size_of::<f32>()) as u64
}

/// A sub-group's member list checked against a group of `n` ranks: where `me` stands in it (its
/// rank in the new group), or why the list is wrong. Every implementation's `split` starts here.
pub(crate) fn split_position(ranks: &[Rank], n: usize, me: Rank) -> Result<Rank, CommError> {
    let invalid = |reason: String| CommError::InvalidArgument { collective: Collective::Split, reason };
    if let Some(&bad) = ranks.iter().find(|&&r| r >= n) {
        return Err(invalid(format!("rank {bad} is not in this group of {n} ranks")));
    }
    if let Some(i) = (1..ranks.len()).find(|&i| ranks[..i].contains(&ranks[i])) {
        return Err(invalid(format!("rank {} is listed twice in {ranks:?}", ranks[i])));
    }
    ranks
        .iter()
        .position(|&r| r == me)
        .ok_or_else(|| invalid(format!("rank {me} called split but is not in {ranks:?}")))
}
