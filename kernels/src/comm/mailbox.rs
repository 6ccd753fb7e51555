//! The post office behind thread ranks: one inbox per rank, and in it one queue per (group,
//! sender), so that messages of different groups between the same two ranks never mix.
//!
//! It also holds the world's fate. The first rank to fail records why and wakes every waiting
//! rank, whose receive then returns [`CommError::PeerFailed`]: a failure anywhere reaches every
//! rank within one wake-up, with no polling. A rank that waits on a peer that has already
//! finished its closure is told so too.
//!
//! What is left for the timeout is a deadlock, and the post office can tell one from a slow rank
//! (rank 0 writing a checkpoint while the others wait): it counts who waits on whom. A wait
//! gives up only if, after a whole timeout, every rank it waits for, directly or through
//! others, is itself waiting in a receive, and no message was posted anywhere meanwhile. A rank
//! with no thread in a receive is working, and will send, finish or fail: all three are seen.

use super::{Collective, CommError, Rank};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// `waiting[to * n + from]`: how many threads of rank `to` wait in a receive from `from`.
    waiting: Vec<AtomicUsize>,
    /// Messages posted so far, world-wide: a wait that sees it move knows some rank moved on.
    posted: AtomicU64,
}

/// Counts a thread as waiting on a peer for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn on(count: &'a AtomicUsize) -> Waiting<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
            waiting: (0..world_size * world_size).map(|_| AtomicUsize::new(0)).collect(),
            posted: AtomicU64::new(0),
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
        self.posted.fetch_add(1, Ordering::SeqCst);
        inbox.changed.notify_all();
        Ok(())
    }

    /// Whether every rank that `rank` waits for, directly or through others, is itself waiting
    /// in a receive: then none of them can send, and only a deadlock looks like this for long.
    /// One rank with no thread in a receive (computing, saving) means someone is still working.
    fn all_waiting_from(&self, rank: Rank) -> bool {
        let n = self.world_size();
        let waits_on = |r: Rank| (0..n).filter(move |&p| self.waiting[r * n + p].load(Ordering::SeqCst) > 0);
        let (mut seen, mut todo) = (vec![false; n], vec![rank]);
        seen[rank] = true;
        while let Some(r) = todo.pop() {
            let mut peers = waits_on(r).peekable();
            if peers.peek().is_none() {
                return false; // rank r is working
            }
            for p in peers {
                if !std::mem::replace(&mut seen[p], true) {
                    todo.push(p);
                }
            }
        }
        true
    }

    // ANCHOR: take
    /// The next message for world rank `to` from world rank `from` in `group`. Gives up after
    /// `timeout` only if nothing moved meanwhile and everyone it waits for is waiting too.
    pub fn take(
        &self,
        group: GroupId,
        from: Rank,
        to: Rank,
        collective: Collective,
        timeout: Duration,
    ) -> Result<Message, CommError> {
        let _waiting = Waiting::on(&self.waiting[to * self.world_size() + from]);
        let (mut deadline, mut posted) = (Instant::now() + timeout, self.posted.load(Ordering::SeqCst));
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
                // A slow rank is not a failed one: wait on while anything moves or anyone works.
                let posted_now = self.posted.load(Ordering::SeqCst);
                if posted_now == posted && self.all_waiting_from(from) {
                    return Err(CommError::Timeout { collective, peer: from, seconds: timeout.as_secs() });
                }
                (deadline, posted) = (now + timeout, posted_now);
            }
            queues = inbox.changed.wait_timeout(queues, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
    // ANCHOR_END: take
}
