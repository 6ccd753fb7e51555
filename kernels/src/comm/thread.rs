//! Thread ranks: each rank is a thread of this process, and a message is a `Vec<f32>` handed
//! from one thread to another through a post office (`mailbox.rs`: an inbox per rank, a queue per
//! group and sender in it).
//!
//! [`launch`] starts one closure per rank, each with its [`ThreadComm`]. The collectives are the
//! [ring algorithms](super::ring), so the bytes counted here are the bytes a network would carry.
//!
//! Sends never wait for their receive (messages queue up). Code that is to run on NCCL as well
//! must not rely on that for point-to-point messages: there, two ranks that both send before
//! they receive wait on each other. An exchange is [`Communicator::sendrecv`], on both.

use super::mailbox::{GroupId, GroupKey, Message, PostOffice};
use super::{Collective, CommError, CommStats, Rank, ReduceOp, bytes, check_received, ring, split_position};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use super::DEFAULT_TIMEOUT;
pub use super::launcher::{FAILURE_GRACE, LaunchError, launch};

/// How many spare message buffers a communicator keeps: the buffers that arrive are reused as
/// the buffers that leave, because a fresh multi-megabyte `Vec` per step costs page faults that would dominate
/// the time of a large all-reduce. Two cover every ring step; more would only hold memory.
const SPARE_BUFFERS: usize = 2;

/// One rank's communicator over a group of thread ranks. `Send`: it can move to a
/// communication thread.
pub struct ThreadComm {
    office: Arc<PostOffice>,
    group: GroupId,
    /// World rank of each group rank.
    members: Arc<[Rank]>,
    rank: Rank,
    timeout: Duration,
    stats: CommStats,
    /// How many times each member list was split from this communicator (see [`GroupKey`]).
    splits: HashMap<Vec<Rank>, usize>,
    spare: Vec<Vec<f32>>,
}

impl ThreadComm {
    /// One communicator per rank of a new world of `office.world_size()` ranks.
    pub(crate) fn world(office: &Arc<PostOffice>, timeout: Duration) -> Vec<ThreadComm> {
        let members: Arc<[Rank]> = (0..office.world_size()).collect();
        let comm = |rank| ThreadComm::new(office.clone(), 0, members.clone(), rank, timeout);
        (0..members.len()).map(comm).collect()
    }

    fn new(office: Arc<PostOffice>, group: GroupId, members: Arc<[Rank]>, rank: Rank, timeout: Duration) -> ThreadComm {
        let (stats, splits, spare) = Default::default();
        ThreadComm { office, group, members, rank, timeout, stats, splits, spare }
    }

    /// This rank's rank in the world the launcher started (the one errors name).
    pub fn world_rank(&self) -> Rank {
        self.members[self.rank]
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long a receive waits, while every rank it waits for is waiting too and nothing
    /// moves, before [`CommError::Timeout`] (a busy rank is waited for however long it takes).
    /// [`launch`] starts from [`TIMEOUT_VAR`](super::TIMEOUT_VAR) or [`DEFAULT_TIMEOUT`];
    /// communicators split from this one afterwards inherit it.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// A communicator over the sub-group `ranks` (ranks of `self`, in the order of their new
    /// ranks). Every member calls it with the same list; non-members do not call it. No message
    /// is exchanged: each member works out the same group from the list alone.
    pub fn split_group(&mut self, ranks: &[Rank]) -> Result<ThreadComm, CommError> {
        self.office.check()?;
        let new_rank = split_position(ranks, self.members.len(), self.rank)?;
        let count = self.splits.entry(ranks.to_vec()).or_default();
        let occurrence = *count;
        *count += 1;
        let members: Arc<[Rank]> = ranks.iter().map(|&r| self.members[r]).collect();
        let group = self.office.group_id(GroupKey { parent: self.group, members: members.to_vec(), occurrence });
        Ok(ThreadComm::new(self.office.clone(), group, members, new_rank, self.timeout))
    }
}

/// A communicator's wire for the length of one collective: group ranks in, world ranks out, and
/// every byte counted under that collective.
pub struct Link<'a> {
    comm: &'a mut ThreadComm,
    collective: Collective,
}

impl Link<'_> {
    fn take(&mut self, from: Rank, len: usize) -> Result<Vec<f32>, CommError> {
        let (c, collective) = (&mut *self.comm, self.collective);
        let from_world = c.members[from];
        let message = c.office.take(c.group, from_world, c.world_rank(), collective, c.timeout)?;
        check_received(collective, from_world, message.collective, message.data.len(), len)?;
        *c.stats.received.entry(collective).or_default() += bytes(len);
        Ok(message.data)
    }

    fn recycle(&mut self, buffer: Vec<f32>) {
        if self.comm.spare.len() < SPARE_BUFFERS {
            self.comm.spare.push(buffer);
        }
    }
}

impl ring::Wire for Link<'_> {
    fn rank(&self) -> Rank {
        self.comm.rank
    }

    fn size(&self) -> usize {
        self.comm.members.len()
    }

    fn send(&mut self, to: Rank, data: &[f32]) -> Result<(), CommError> {
        let c = &mut *self.comm;
        let mut buffer = c.spare.pop().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(data);
        let message = Message { collective: self.collective, data: buffer };
        c.office.post(c.group, c.world_rank(), c.members[to], message)?;
        *c.stats.sent.entry(self.collective).or_default() += bytes(data.len());
        Ok(())
    }

    fn recv(&mut self, from: Rank, into: &mut [f32]) -> Result<(), CommError> {
        let data = self.take(from, into.len())?;
        into.copy_from_slice(&data);
        self.recycle(data);
        Ok(())
    }

    fn recv_reduce(&mut self, from: Rank, into: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let data = self.take(from, into.len())?;
        ring::combine(into, &data, op);
        self.recycle(data);
        Ok(())
    }
}

impl ring::RingTransport for ThreadComm {
    type Link<'a> = Link<'a>;
    type Group = ThreadComm;

    fn position(&self) -> Rank {
        self.rank
    }
    fn members(&self) -> usize {
        self.members.len()
    }
    fn check(&self) -> Result<(), CommError> {
        self.office.check()
    }
    fn link(&mut self, collective: Collective) -> Link<'_> {
        Link { comm: self, collective }
    }
    fn counts(&mut self) -> &mut CommStats {
        &mut self.stats
    }
    fn counted(&self) -> &CommStats {
        &self.stats
    }
    fn split_group(&mut self, ranks: &[Rank]) -> Result<ThreadComm, CommError> {
        ThreadComm::split_group(self, ranks)
    }
}
