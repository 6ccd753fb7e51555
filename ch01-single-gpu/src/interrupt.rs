//! Ctrl-C during a run: the first one asks the training loop to stop between steps and say
//! where the last checkpoint is; a second one quits at once.
//!
//! The handler only sets a flag (all a signal handler may safely do, besides `write` and
//! `_exit`); [`crate::train::drive`] reads it before each step. Ranks that step in lockstep
//! must stop at the same step, or one would wait forever in a collective for another that
//! stopped: the first rank to see the flag fixes that step for all of them ([`stop_at`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static STOP_AT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Routes SIGINT to the flag. Binaries call it; a library caller keeps its own handling.
pub fn install() {
    #[cfg(unix)]
    // SAFETY: `sigaction` is given a zeroed, fully initialised struct and a handler that only
    // touches an atomic and calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
}

#[cfg(unix)]
extern "C" fn on_sigint(_signal: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
    let note = b"\ninterrupted: stopping after this step (press Ctrl-C again to quit at once)\n";
    // SAFETY: `write` is async-signal-safe; the buffer outlives the call.
    unsafe { libc::write(2, note.as_ptr().cast(), note.len()) };
}

/// Whether Ctrl-C was pressed.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// After Ctrl-C, the step count at which every rank stops: the first caller's `proposal` (its
/// steps done, plus one if other ranks may already be inside the next step). `None` before.
pub fn stop_at(proposal: u64) -> Option<u64> {
    if !requested() {
        return None;
    }
    let _ = STOP_AT.compare_exchange(u64::MAX, proposal, Ordering::SeqCst, Ordering::SeqCst);
    Some(STOP_AT.load(Ordering::SeqCst))
}
