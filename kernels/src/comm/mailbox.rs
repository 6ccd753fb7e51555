//! The post office behind thread ranks: one inbox per rank, and in it one queue per (group,
//! sender), so that messages of different groups between the same two ranks never mix.
//!
//! It also holds the world's fate. The first rank to fail records why and wakes every waiting
//! rank, whose receive then returns [`CommError::PeerFailed`]: a failure anywhere reaches every
//! rank within one wake-up, with no polling. A rank that waits on a peer that has already
//! finished its closure is told so too, and the timeout catches everything else.

use super::{Collective, CommError, Rank};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Names a group: the whole world is group 0, each split gets the next number.
pub(crate) type GroupId = u64;

pub(crate) struct Message {
    /// Which collective sent it: a receive that finds another collective's message knows the
    /// ranks called different collectives, and says so instead of mixing their data.
    pub collective: Collective,
    pub data: Vec<f32>,
}

/// Why the world stopped: the first rank to fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub rank: Rank,
    pub message: String,
    pub panicked: bool,
}

impl Failure {
    pub fn to_comm_error(&self) -> CommError {
        let reason = if self.panicked { format!("panicked: {}", self.message) } else { self.message.clone() };
        CommError::PeerFailed { rank: self.rank, reason }
    }
}

/// What makes a split's group the same group on every member, with no message exchanged: the
/// parent group, the members (world ranks, in order), and how many times this same list was
/// split from this parent before.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GroupKey {
    pub parent: GroupId,
    pub members: Vec<Rank>,
    pub occurrence: usize,
}

#[derive(Default)]
struct Inbox {
    queues: Mutex<HashMap<(GroupId, Rank), VecDeque<Message>>>,
    /// Signalled when a message arrives, a rank finishes, or the world aborts. Several threads of
    /// one rank can wait here at once (one per communicator), so every signal wakes them all.
    changed: Condvar,
}

pub(crate) struct PostOffice {
    inboxes: Vec<Inbox>,
    aborted: AtomicBool,
    failure: Mutex<Option<Failure>>,
    finished: Vec<AtomicBool>,
    groups: Mutex<HashMap<GroupKey, GroupId>>,
}

/// No code runs while these locks are held but our own few lines, which cannot leave the state
/// half-updated: a lock poisoned by a panic elsewhere is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl PostOffice {
    pub fn new(world_size: usize) -> PostOffice {
        PostOffice {
            inboxes: (0..world_size).map(|_| Inbox::default()).collect(),
            aborted: AtomicBool::new(false),
            failure: Mutex::new(None),
            finished: (0..world_size).map(|_| AtomicBool::new(false)).collect(),
            groups: Mutex::new(HashMap::new()),
        }
    }

    pub fn world_size(&self) -> usize {
        self.inboxes.len()
    }

    /// `Err(PeerFailed)` once any rank has failed.
    pub fn check(&self) -> Result<(), CommError> {
        match self.aborted.load(Ordering::SeqCst).then(|| self.failure()).flatten() {
            Some(failure) => Err(failure.to_comm_error()),
            None => Ok(()),
        }
    }

    pub fn failure(&self) -> Option<Failure> {
        lock(&self.failure).clone()
    }

    /// Records `failure` unless an earlier one was recorded (the first failure is the cause; the
    /// others are its consequences), wakes every waiting rank, and returns the first failure.
    pub fn abort(&self, failure: Failure) -> Failure {
        let first = lock(&self.failure).get_or_insert(failure).clone();
        self.aborted.store(true, Ordering::SeqCst);
        self.wake_everyone();
        first
    }

    /// Rank `rank` has returned from its closure: it will send nothing more.
    pub fn finish(&self, rank: Rank) {
        self.finished[rank].store(true, Ordering::SeqCst);
        self.wake_everyone();
    }

    fn wake_everyone(&self) {
        // Taking each inbox's lock before notifying closes the gap between a waiter checking
        // the flags and starting to wait: it is either before the check (and sees the flag) or
        // already waiting (and is woken).
        for inbox in &self.inboxes {
            let _queues = lock(&inbox.queues);
            inbox.changed.notify_all();
        }
    }

    pub fn group_id(&self, key: GroupKey) -> GroupId {
        let mut groups = lock(&self.groups);
        let next = groups.len() as GroupId + 1;
        *groups.entry(key).or_insert(next)
    }

    /// Queues `message` for world rank `to`, from world rank `from`, in `group`.
    pub fn post(&self, group: GroupId, from: Rank, to: Rank, message: Message) -> Result<(), CommError> {
        self.check()?;
        let inbox = &self.inboxes[to];
        lock(&inbox.queues).entry((group, from)).or_default().push_back(message);
        inbox.changed.notify_all();
        Ok(())
    }

    // ANCHOR: take
    /// The next message for world rank `to` from world rank `from` in `group`, waiting up to
    /// `timeout` for it.
    pub fn take(
        &self,
        group: GroupId,
        from: Rank,
        to: Rank,
        collective: Collective,
        timeout: Duration,
    ) -> Result<Message, CommError> {
        let deadline = Instant::now() + timeout;
        let inbox = &self.inboxes[to];
        let mut queues = lock(&inbox.queues);
        loop {
            self.check()?;
            if let Some(message) = queues.get_mut(&(group, from)).and_then(|q| q.pop_front()) {
                return Ok(message);
            }
            if self.finished[from].load(Ordering::SeqCst) {
                drop(queues);
                let message = format!(
                    "finished while rank {to} still waited for its {collective:?} message \
                     (did the ranks make different calls?)"
                );
                return Err(self.abort(Failure { rank: from, message, panicked: false }).to_comm_error());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout { collective, peer: from, seconds: timeout.as_secs() });
            }
            queues = inbox.changed.wait_timeout(queues, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
    // ANCHOR_END: take
}
