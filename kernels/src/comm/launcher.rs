//! The launcher: one closure per rank, each on its own thread, and every rank's result or the
//! first failure, within a bounded time of it.

use super::mailbox::{Failure, PostOffice};
use super::thread::ThreadComm;
use super::{Rank, timeout_from_env};
use std::any::Any;
use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long [`launch`] waits, after the first failure, for the other ranks' threads to end.
/// Ranks in a collective end at once; a rank that is computing ends at its next collective, and
/// one that is not back by then is left running while the failure is reported.
pub const FAILURE_GRACE: Duration = Duration::from_secs(5);

/// How often [`launch`] looks for a failure while no rank's thread ends.
const POLL: Duration = Duration::from_millis(50);

/// The first rank to fail, and why. Later failures are left out: they are the other ranks
/// learning of the first one ([`CommError::PeerFailed`](super::CommError::PeerFailed)).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// The rank's closure returned an error (its `{:#}` text), or the rank left while others
    /// still waited for it.
    #[error("rank {rank} failed: {message}")]
    Failed { rank: Rank, message: String },
    #[error("rank {rank} panicked: {message}")]
    Panicked { rank: Rank, message: String },
}

impl LaunchError {
    pub fn rank(&self) -> Rank {
        match self {
            LaunchError::Failed { rank, .. } | LaunchError::Panicked { rank, .. } => *rank,
        }
    }
}

impl From<Failure> for LaunchError {
    fn from(f: Failure) -> LaunchError {
        let (rank, message) = (f.rank, f.message);
        if f.panicked { LaunchError::Panicked { rank, message } } else { LaunchError::Failed { rank, message } }
    }
}

/// The text a panic was raised with (`panic!` makes a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic with a payload that is not a string".to_string(),
    }
}

// ANCHOR: launch
/// Runs `f` once per rank, each on its own thread with its own [`ThreadComm`], and returns the
/// results in rank order, or the first failure (an error or a panic). When a rank fails, every
/// other rank's pending or next collective returns `PeerFailed`, so the threads end promptly;
/// the launcher waits [`FAILURE_GRACE`] for them, and no longer: a rank stuck outside the
/// collectives (in a loop, on a lock) cannot keep the failure from being reported. Its thread is
/// left behind, which is why `f` and its results own their data (`'static`: share with `Arc`).
/// The communicators' timeout is [`TIMEOUT_VAR`](super::TIMEOUT_VAR)'s, or the default.
/// `world_size` 0 runs nothing and returns no results.
pub fn launch<T, E, F>(world_size: usize, f: F) -> Result<Vec<T>, LaunchError>
where
    T: Send + 'static,
    E: Display,
    F: Fn(ThreadComm) -> Result<T, E> + Send + Sync + 'static,
{
    let timeout = timeout_from_env().map_err(|e| LaunchError::Failed { rank: 0, message: e.to_string() })?;
    let office = Arc::new(PostOffice::new(world_size));
    let (f, (ended, results)) = (Arc::new(f), mpsc::channel());
    for (rank, comm) in ThreadComm::world(&office, timeout).into_iter().enumerate() {
        let (f, rank_office, ended) = (f.clone(), office.clone(), ended.clone());
        let run = move || {
            let value = run_rank(rank, comm, &*f, &rank_office);
            let _ = ended.send((rank, value)); // nobody listens once the launcher has returned
        };
        if let Err(e) = std::thread::Builder::new().name(format!("rank {rank}")).spawn(run) {
            let message = format!("could not start its thread: {e}");
            office.abort(Failure { rank, message, panicked: false });
        }
    }
    drop(ended);
    let results = collect(world_size, &office, &results);
    if let Some(failure) = office.failure() {
        return Err(failure.into());
    }
    results
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.ok_or_else(|| LaunchError::Failed { rank, message: "ended without a result".into() }))
        .collect()
}

/// Every rank's result as its thread ends: all of them, or, once a failure is known, those that
/// end within [`FAILURE_GRACE`] of it.
fn collect<T>(world_size: usize, office: &PostOffice, ended: &Receiver<(Rank, Option<T>)>) -> Vec<Option<T>> {
    let mut results: Vec<Option<T>> = (0..world_size).map(|_| None).collect();
    let mut give_up = None;
    loop {
        if give_up.is_none() && office.failure().is_some() {
            give_up = Some(Instant::now() + FAILURE_GRACE);
        }
        // Until a failure is known, look again every `POLL`: a rank that records one need not
        // end (it saw a peer leave early, and its own thread is stuck elsewhere).
        let wait = give_up.map_or(POLL, |at: Instant| at.saturating_duration_since(Instant::now()));
        match ended.recv_timeout(wait) {
            Ok((rank, value)) => results[rank] = value,
            Err(RecvTimeoutError::Timeout) if give_up.is_none() => {}
            // Every thread has ended (or never started), or the grace is over.
            Err(_) => return results,
        }
    }
}
// ANCHOR_END: launch

/// One rank's closure, with its failure (an error or a panic) recorded for every rank to see.
fn run_rank<T, E: Display>(
    rank: Rank,
    comm: ThreadComm,
    f: &impl Fn(ThreadComm) -> Result<T, E>,
    office: &PostOffice,
) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(|| f(comm))) {
        Ok(Ok(value)) => {
            office.finish(rank);
            Some(value)
        }
        Ok(Err(e)) => {
            office.abort(Failure { rank, message: format!("{e:#}"), panicked: false });
            None
        }
        Err(payload) => {
            office.abort(Failure { rank, message: panic_message(&*payload), panicked: true });
            None
        }
    }
}
