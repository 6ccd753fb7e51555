//! The launcher: one closure per rank, each on its own thread, and every rank's result or the
//! first failure.

use super::Rank;
use super::mailbox::{Failure, PostOffice};
use super::thread::ThreadComm;
use std::any::Any;
use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

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
/// other rank's pending or next collective returns `PeerFailed`, so all threads end promptly.
/// `world_size` 0 runs nothing and returns no results.
pub fn launch<T: Send, E: Display>(
    world_size: usize,
    f: impl Fn(ThreadComm) -> Result<T, E> + Sync,
) -> Result<Vec<T>, LaunchError> {
    let office = Arc::new(PostOffice::new(world_size));
    let comms = ThreadComm::world(&office);
    let results: Vec<Option<T>> = std::thread::scope(|scope| {
        let (f, office) = (&f, &office);
        let handles: Vec<_> = (0..world_size)
            .zip(comms)
            .map(|(rank, comm)| {
                let run = move || match catch_unwind(AssertUnwindSafe(|| f(comm))) {
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
                };
                let spawned = std::thread::Builder::new().name(format!("rank {rank}")).spawn_scoped(scope, run);
                spawned.map_err(|e| {
                    let message = format!("could not start its thread: {e}");
                    office.abort(Failure { rank, message, panicked: false });
                })
            })
            .collect();
        // A thread cannot panic past `catch_unwind`, so a failed join is only a thread that
        // never started, already recorded as a failure.
        handles.into_iter().map(|h| h.ok().and_then(|h| h.join().ok().flatten())).collect()
    });
    if let Some(failure) = office.failure() {
        return Err(failure.into());
    }
    results
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.ok_or_else(|| LaunchError::Failed { rank, message: "ended without a result".into() }))
        .collect()
}
// ANCHOR_END: launch
