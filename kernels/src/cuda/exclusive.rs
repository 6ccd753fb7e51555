//! One thread at a time on a GPU's shared state.
//!
//! A [`super::Gpu`] is shared by every thread of the process (tests run on several), but some of
//! what it holds is one per GPU and used by a whole op, from its first launch to its last: the
//! token-id and scratch buffers (attention backward's dS, the partial sums of a column sum), the
//! cuBLAS handle and the cuBLASLt workspace. Two threads interleaving their launches on the one
//! stream would overwrite each other's partial sums, and a scratch buffer grown by one thread
//! would be freed under the other's queued kernels. So that state sits in a [`ReentrantLock`]:
//! an op holds it from its first launch to its last, and a caller may hold it across a sequence
//! of ops. It is re-entrant because ops call ops (a linear layer calls the matmul).
//!
//! The errors of queued work are kept per thread ([`FirstErrors`]), so that a thread's
//! synchronisation reports its own launches' errors, not another test's.
//!
//! Everything here is plain `std`: its tests run on any machine.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::{Condvar, Mutex};
use std::thread::ThreadId;

/// A value that one thread at a time may use, and that thread as often as it likes (nested).
/// `T` need not be `Sync`: only the thread holding the lock ever sees it.
pub struct ReentrantLock<T> {
    owner: Mutex<Owner>,
    released: Condvar,
    value: T,
}

#[derive(Default)]
struct Owner {
    thread: Option<ThreadId>,
    depth: usize,
}

// SAFETY: `value` is reachable only through a `Held`, which exists only on the thread recorded
// in `owner` (it is not `Send`), and no two threads are recorded at once. So `T` is used from
// one thread at a time: `Send` is all it needs, as for `Mutex<T>`.
unsafe impl<T: Send> Sync for ReentrantLock<T> {}

/// The lock, held by this thread; released when the last nested `Held` is dropped.
#[must_use = "the lock is released when this is dropped"]
pub struct Held<'a, T> {
    lock: &'a ReentrantLock<T>,
    /// Not `Send`: dropped on another thread, it would release a lock that thread does not hold.
    _this_thread: PhantomData<*const ()>,
}

impl<T> ReentrantLock<T> {
    pub fn new(value: T) -> ReentrantLock<T> {
        ReentrantLock { owner: Mutex::new(Owner::default()), released: Condvar::new(), value }
    }

    /// Waits until no other thread holds the lock, and takes it (again, if this thread has it).
    pub fn lock(&self) -> Held<'_, T> {
        let me = std::thread::current().id();
        let mut owner = self.owner.lock().unwrap_or_else(|e| e.into_inner());
        while owner.thread.is_some_and(|t| t != me) {
            owner = self.released.wait(owner).unwrap_or_else(|e| e.into_inner());
        }
        owner.thread = Some(me);
        owner.depth += 1;
        Held { lock: self, _this_thread: PhantomData }
    }

    /// The lock if no other thread holds it, without waiting.
    pub fn try_lock(&self) -> Option<Held<'_, T>> {
        let me = std::thread::current().id();
        let mut owner = self.owner.lock().unwrap_or_else(|e| e.into_inner());
        if owner.thread.is_some_and(|t| t != me) {
            return None;
        }
        owner.thread = Some(me);
        owner.depth += 1;
        Some(Held { lock: self, _this_thread: PhantomData })
    }
}

impl<T> Deref for Held<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.lock.value
    }
}

impl<T> Drop for Held<'_, T> {
    fn drop(&mut self) {
        let mut owner = self.lock.owner.lock().unwrap_or_else(|e| e.into_inner());
        owner.depth -= 1;
        if owner.depth == 0 {
            owner.thread = None;
            self.lock.released.notify_one();
        }
    }
}

/// The first error of each thread's queued work, until that thread asks for it.
#[derive(Default)]
pub struct FirstErrors(Mutex<HashMap<ThreadId, String>>);

impl FirstErrors {
    /// Keeps `error` unless this thread already has one waiting.
    pub fn keep(&self, error: impl FnOnce() -> String) {
        let mut errors = self.0.lock().unwrap_or_else(|e| e.into_inner());
        errors.entry(std::thread::current().id()).or_insert_with(error);
    }

    /// This thread's first error since it last asked, if any.
    pub fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&std::thread::current().id())
    }
}

/// `assert_not_impl!(T: Send)` compiles only if `T` is not `Send` (likewise for any auto trait):
/// were it, both impls below would apply and the call would be ambiguous.
macro_rules! assert_not_impl {
    ($t:ty: $bound:path) => {
        const _: fn() = || {
            trait AmbiguousIfImpl<A> {
                fn some_item() {}
            }
            impl<T: ?Sized> AmbiguousIfImpl<()> for T {}
            impl<T: ?Sized + $bound> AmbiguousIfImpl<u8> for T {}
            let _ = <$t as AmbiguousIfImpl<_>>::some_item;
        };
    };
}

pub(crate) use assert_not_impl;

// A held lock stays on the thread that took it.
assert_not_impl!(Held<'static, ()>: Send);

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_second_thread_cannot_take_a_held_lock() {
        let lock = ReentrantLock::new(Cell::new(0));
        let held = lock.lock();
        std::thread::scope(|s| {
            s.spawn(|| assert!(lock.try_lock().is_none(), "another thread took a held lock"));
        });
        drop(held);
        std::thread::scope(|s| {
            s.spawn(|| assert!(lock.try_lock().is_some(), "a released lock stayed taken"));
        });
    }

    #[test]
    fn a_second_thread_waits_until_the_first_lets_go() {
        let lock = ReentrantLock::new(Cell::new(0));
        let released = AtomicBool::new(false);
        let held = lock.lock();
        held.set(1);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let held = lock.lock();
                // Only reached once the first thread has let go, after it set `released`.
                assert!(released.load(Ordering::SeqCst), "took the lock while another thread held it");
                assert_eq!(held.get(), 1, "sees what the first thread wrote");
                held.set(2);
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiter.is_finished(), "the waiter did not wait");
            released.store(true, Ordering::SeqCst);
            drop(held);
            waiter.join().unwrap();
        });
        assert_eq!(lock.lock().get(), 2);
    }

    #[test]
    fn the_holding_thread_can_take_it_again_and_it_is_released_by_the_last_drop() {
        let lock = ReentrantLock::new(Cell::new(0));
        let outer = lock.lock();
        let inner = lock.try_lock().expect("re-entrant on the same thread");
        inner.set(7);
        drop(inner);
        std::thread::scope(|s| {
            s.spawn(|| assert!(lock.try_lock().is_none(), "released while the outer hold lives"));
        });
        assert_eq!(outer.get(), 7);
        drop(outer);
        std::thread::scope(|s| {
            s.spawn(|| assert!(lock.try_lock().is_some(), "still held after every drop"));
        });
    }

    #[test]
    fn a_panic_while_holding_releases_the_lock() {
        let lock = ReentrantLock::new(());
        std::thread::scope(|s| {
            let r = s.spawn(|| {
                let _held = lock.lock();
                panic!("an op's assertion");
            });
            assert!(r.join().is_err());
        });
        assert!(lock.try_lock().is_some(), "a panicking holder left the lock taken");
    }

    #[test]
    fn each_thread_gets_its_own_errors() {
        let errors = FirstErrors::default();
        errors.keep(|| "first".into());
        errors.keep(|| "second".into());
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(errors.take(), None, "another thread's error");
                errors.keep(|| "theirs".into());
                assert_eq!(errors.take().as_deref(), Some("theirs"));
            });
        });
        assert_eq!(errors.take().as_deref(), Some("first"), "the first error is kept");
        assert_eq!(errors.take(), None, "taken once");
    }
}
