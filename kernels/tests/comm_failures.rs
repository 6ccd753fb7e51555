//! Failure never hangs, and slowness is not failure: a rank that errs, panics or leaves early
//! ends every rank promptly, ranks that wait on each other time out, a rank that is only slow is
//! waited for, and the launcher names the first rank that failed and why, even if another rank
//! never ends.

use kernels::comm::thread::{DEFAULT_TIMEOUT, FAILURE_GRACE, LaunchError, ThreadComm, launch};
use kernels::comm::{Collective, CommError, Communicator, Rank, ReduceOp, TIMEOUT_VAR, parse_timeout};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[test]
fn thread_comm_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<ThreadComm>();
}

#[test]
fn launch_returns_every_result_in_rank_order() {
    let out = launch(5, |comm| Ok::<_, CommError>(comm.rank() * 10));
    assert_eq!(out, Ok(vec![0, 10, 20, 30, 40]));
    assert_eq!(launch(0, |_| Ok::<(), CommError>(())), Ok(vec![]));
}

/// 4 ranks loop over 100 all-reduces; rank 2 fails in iteration 10 with `fail`. Returns the
/// launch result, what the other ranks' collectives returned, and how long it all took.
fn kill_rank_2_at_step_10(fail: fn(usize) -> String) -> (LaunchError, Vec<(Rank, CommError)>, Duration) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_by_ranks = seen.clone();
    let start = Instant::now();
    let result = launch(4, move |mut comm| {
        assert_eq!(comm.timeout(), DEFAULT_TIMEOUT, "the timeout is not what ends this test");
        let mut buf = vec![1.0; 1000];
        for step in 0..100 {
            if comm.rank() == 2 && step == 10 {
                return Err(fail(step));
            }
            if let Err(e) = comm.all_reduce(&mut buf, ReduceOp::Avg) {
                seen_by_ranks.lock().unwrap().push((comm.rank(), e.clone()));
                return Err(e.to_string());
            }
        }
        Ok(())
    });
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|(r, _)| *r);
    (result.expect_err("rank 2 failed"), seen, start.elapsed())
}

fn assert_others_saw_rank_2_fail(seen: &[(Rank, CommError)], reason: &str) {
    assert_eq!(seen.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![0, 1, 3]);
    for (r, e) in seen {
        assert!(
            matches!(e, CommError::PeerFailed { rank: 2, reason: why } if why.contains(reason)),
            "rank {r} got {e:?}"
        );
    }
}

#[test]
fn a_rank_that_returns_an_error_stops_every_rank_promptly() {
    let (err, seen, elapsed) = kill_rank_2_at_step_10(|step| format!("out of memory at iteration {step}"));
    assert_eq!(err, LaunchError::Failed { rank: 2, message: "out of memory at iteration 10".into() });
    assert_others_saw_rank_2_fail(&seen, "out of memory at iteration 10");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn a_rank_that_panics_stops_every_rank_promptly() {
    let (err, seen, elapsed) = kill_rank_2_at_step_10(|step| panic!("NaN in the loss at iteration {step}"));
    assert_eq!(err, LaunchError::Panicked { rank: 2, message: "NaN in the loss at iteration 10".into() });
    assert_eq!(err.to_string(), "rank 2 panicked: NaN in the loss at iteration 10");
    assert_others_saw_rank_2_fail(&seen, "panicked: NaN in the loss at iteration 10");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn the_next_collective_after_a_failure_returns_peer_failed() {
    let seen = Arc::new(Mutex::new(None));
    let seen_by_rank_0 = seen.clone();
    let result = launch(3, move |mut comm| {
        if comm.rank() == 1 {
            return Err("bad batch".to_string());
        }
        // Long enough for rank 1's failure to be recorded before this rank calls anything.
        std::thread::sleep(Duration::from_millis(100));
        let result = if comm.rank() == 0 { comm.barrier() } else { comm.split_group(&[2]).map(drop) };
        if comm.rank() == 0 {
            *seen_by_rank_0.lock().unwrap() = result.clone().err();
        }
        result.map_err(|e| e.to_string())
    });
    assert_eq!(result, Err(LaunchError::Failed { rank: 1, message: "bad batch".into() }));
    assert_eq!(*seen.lock().unwrap(), Some(CommError::PeerFailed { rank: 1, reason: "bad batch".into() }));
}

#[test]
fn a_rank_that_leaves_early_is_named() {
    let start = Instant::now();
    let result =
        launch(3, |mut comm| if comm.rank() == 1 { Ok(()) } else { comm.all_reduce(&mut [1.0; 9], ReduceOp::Sum) });
    let err = result.expect_err("ranks 0 and 2 wait for rank 1 forever");
    assert_eq!(err.rank(), 1);
    assert!(err.to_string().contains("finished while rank"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_slow_rank_is_not_a_failure() {
    // Rank 0 works (a large save, say) for seven timeouts while the others wait in an
    // all-reduce. Only rank 3 waits on rank 0 itself; ranks 2 and 1 wait on ranks that wait: the
    // post office follows the chain to a rank that is working, and they all wait on.
    let out = launch(4, |mut comm| {
        comm.set_timeout(Duration::from_millis(100));
        if comm.rank() == 0 {
            std::thread::sleep(Duration::from_millis(700));
        }
        let mut buf = [comm.rank() as f32; 5];
        comm.all_reduce(&mut buf, ReduceOp::Sum).map(|()| buf[0])
    });
    assert_eq!(out, Ok(vec![6.0; 4]));
}

#[test]
fn a_slow_rank_is_waited_for_by_a_communication_thread_too() {
    // Chapter 2's shape: each rank's communicator lives on a thread of its own, and rank 1's
    // waits in an all-reduce while rank 0's compute thread sleeps (its communication thread
    // is idle, not in a receive).
    let out = launch(2, |mut comm| {
        comm.set_timeout(Duration::from_millis(100));
        let rank = comm.rank();
        let (jobs, queue) = std::sync::mpsc::channel::<Vec<f32>>();
        let worker = std::thread::spawn(move || -> Result<Vec<f32>, CommError> {
            let mut buf = queue.recv().map_err(|e| CommError::Backend(e.to_string()))?;
            comm.all_reduce(&mut buf, ReduceOp::Sum).map(|()| buf)
        });
        if rank == 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        jobs.send(vec![1.0; 3]).map_err(|e| CommError::Backend(e.to_string()))?;
        worker.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    assert_eq!(out, Ok(vec![vec![2.0; 3]; 2]));
}

#[test]
fn ranks_that_wait_on_each_other_time_out() {
    // A deadlock: both ranks receive first. Each waits on a rank that waits, nothing moves,
    // and after the timeout both give up.
    let start = Instant::now();
    let result = launch(2, |mut comm| {
        comm.set_timeout(Duration::from_millis(200));
        let peer = 1 - comm.rank();
        comm.recv(&mut [0.0; 4], peer)?;
        comm.send(&[1.0; 4], peer)
    });
    let waited = start.elapsed();
    match result {
        Err(LaunchError::Failed { message, .. }) => {
            assert!(message.contains("SendRecv timed out"), "{message}");
            assert!(message.contains("SFS_COMM_TIMEOUT_SECS sets the limit"), "{message}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(10), "{waited:?}");
}

#[test]
fn a_rank_stuck_forever_does_not_keep_launch_from_reporting_the_first_failure() {
    // Rank 1 blocks on a lock of its own (no collective can wake it) until the test lets it go;
    // rank 0 fails; rank 2 learns of it in its all-reduce.
    let release = Arc::new((Mutex::new(false), Condvar::new()));
    let stuck = release.clone();
    let start = Instant::now();
    let result = launch(3, move |mut comm| match comm.rank() {
        0 => Err("rank 0 lost its disk".to_string()),
        1 => {
            let (released, wake) = &*stuck;
            let _released = wake.wait_while(released.lock().unwrap(), |released| !*released).unwrap();
            Ok(())
        }
        _ => comm.all_reduce(&mut [1.0; 4], ReduceOp::Sum).map_err(|e| e.to_string()),
    });
    let returned = start.elapsed();
    assert_eq!(result, Err(LaunchError::Failed { rank: 0, message: "rank 0 lost its disk".into() }));
    assert!(returned >= FAILURE_GRACE, "it gave up after {returned:?}, before the grace");
    assert!(returned < FAILURE_GRACE + Duration::from_secs(5), "it took {returned:?}");
    let (released, wake) = &*release;
    *released.lock().unwrap() = true;
    wake.notify_all();
}

#[test]
fn a_failure_seen_by_a_rank_that_never_ends_is_still_reported() {
    // Rank 0 returns while rank 1's communication thread waits for its message: that thread
    // records the failure ("rank 0 finished while ...") and ends, but rank 1's own thread is
    // stuck, so no failing rank ever returns to tell the launcher.
    let release = Arc::new((Mutex::new(false), Condvar::new()));
    let stuck = release.clone();
    let start = Instant::now();
    let result = launch(2, move |mut comm| {
        if comm.rank() == 0 {
            return Ok(());
        }
        std::thread::spawn(move || comm.recv(&mut [0.0; 4], 0));
        let (released, wake) = &*stuck;
        let _released = wake.wait_while(released.lock().unwrap(), |released| !*released).unwrap();
        Ok::<(), CommError>(())
    });
    let returned = start.elapsed();
    let err = result.expect_err("rank 0 left while rank 1 waited for it");
    assert_eq!(err.rank(), 0);
    assert!(err.to_string().contains("finished while rank 1 still waited"), "{err}");
    assert!(returned < FAILURE_GRACE + Duration::from_secs(5), "it took {returned:?}");
    let (released, wake) = &*release;
    *released.lock().unwrap() = true;
    wake.notify_all();
}

#[test]
fn the_timeout_comes_from_the_environment_or_is_thirty_minutes() {
    assert_eq!(parse_timeout(None), Ok(DEFAULT_TIMEOUT));
    assert_eq!(DEFAULT_TIMEOUT, Duration::from_secs(1800));
    assert_eq!(parse_timeout(Some(" 7200 ")), Ok(Duration::from_secs(7200)));
    for bad in ["0", "-5", "1.5", "an hour", ""] {
        match parse_timeout(Some(bad)) {
            Err(CommError::Backend(message)) => {
                assert!(message.starts_with(&format!("{TIMEOUT_VAR}={bad:?}")), "{message}")
            }
            other => panic!("{bad:?}: expected an error, got {other:?}"),
        }
    }
}

#[test]
fn ranks_that_disagree_get_an_error_not_a_hang() {
    // Different lengths.
    let result = launch(2, |mut comm| comm.all_reduce(&mut vec![1.0; 8 + comm.rank()], ReduceOp::Sum));
    assert!(result.expect_err("sizes differ").to_string().contains("buffers of different sizes"));
    // Different collectives.
    let result = launch(2, |mut comm| {
        if comm.rank() == 0 {
            comm.all_reduce(&mut [1.0; 8], ReduceOp::Sum)
        } else {
            comm.all_gather(&[1.0; 4], &mut [0.0; 8])
        }
    });
    assert!(result.expect_err("collectives differ").to_string().contains("called different collectives"));
}

#[test]
fn bad_arguments_are_errors_on_the_calling_rank() {
    let out = launch(2, |mut comm| {
        let invalid = |r: Result<(), CommError>, c: Collective| {
            assert!(matches!(r, Err(CommError::InvalidArgument { collective, .. }) if collective == c), "{r:?}");
        };
        invalid(comm.reduce_scatter(&[0.0; 5], &mut [0.0; 2], ReduceOp::Sum), Collective::ReduceScatter);
        invalid(comm.all_gather(&[0.0; 2], &mut [0.0; 5]), Collective::AllGather);
        invalid(comm.broadcast(&mut [0.0; 2], 2), Collective::Broadcast);
        invalid(comm.send(&[0.0], 7), Collective::SendRecv);
        invalid(comm.recv(&mut [0.0], 2), Collective::SendRecv);
        invalid(comm.sendrecv(&[0.0], 2, &mut [0.0], 0), Collective::SendRecv);
        invalid(comm.sendrecv(&[0.0], 0, &mut [0.0], 5), Collective::SendRecv);
        let r = comm.rank();
        for bad in [vec![2], vec![r, r], vec![1 - r]] {
            invalid(comm.split_group(&bad).map(drop), Collective::Split);
        }
        // Nothing was sent, so the ranks are still in step: a real collective still works.
        let mut buf = [1.0];
        comm.all_reduce(&mut buf, ReduceOp::Sum).map(|()| buf[0])
    });
    assert_eq!(out, Ok(vec![2.0, 2.0]));
}

#[test]
fn an_exchange_of_different_sizes_is_an_invalid_argument() {
    let seen = Arc::new(Mutex::new(None));
    let seen_by_rank_0 = seen.clone();
    let result = launch(2, move |mut comm| {
        // Rank 1 sends 5 values where rank 0 expects 4; rank 0 sends the 4 that rank 1 expects.
        let (r, peer) = (comm.rank(), 1 - comm.rank());
        let result = comm.sendrecv(&vec![1.0; 4 + r], peer, &mut [0.0; 4], peer);
        if r == 0 {
            *seen_by_rank_0.lock().unwrap() = result.clone().err();
        }
        result
    });
    assert_eq!(result.expect_err("rank 0 got 5 values").rank(), 0);
    let seen = seen.lock().unwrap().clone();
    match seen {
        Some(CommError::InvalidArgument { collective: Collective::SendRecv, reason }) => {
            assert!(reason.contains("rank 1 sent 5 values where 4 were expected"), "{reason}")
        }
        other => panic!("expected an invalid SendRecv, got {other:?}"),
    }
}

#[test]
fn a_peer_that_fails_during_an_exchange_ends_it_with_peer_failed() {
    let seen = Arc::new(Mutex::new(None));
    let seen_by_rank_0 = seen.clone();
    let start = Instant::now();
    let result = launch(2, move |mut comm| {
        if comm.rank() == 1 {
            // Rank 0 is already waiting in its exchange when this stage fails.
            std::thread::sleep(Duration::from_millis(50));
            return Err("stage 1 ran out of memory".to_string());
        }
        let result = comm.sendrecv(&[1.0; 8], 1, &mut [0.0; 8], 1);
        *seen_by_rank_0.lock().unwrap() = result.clone().err();
        result.map_err(|e| e.to_string())
    });
    assert_eq!(result, Err(LaunchError::Failed { rank: 1, message: "stage 1 ran out of memory".into() }));
    let reason = "stage 1 ran out of memory".to_string();
    assert_eq!(*seen.lock().unwrap(), Some(CommError::PeerFailed { rank: 1, reason }));
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}
