//! NCCL ranks against thread ranks.
//!
//! Two kinds of tests. Those that run everywhere check what a machine without a GPU sees: no
//! panic, one clear error. Those marked `#[ignore = "needs a CUDA device"]` need a GPU, a driver
//! and NCCL (`cargo test --release -p kernels --test nccl -- --ignored`); they fail, not pass,
//! where there is none, and the multi-GPU ones say so when they find a single device.

use kernels::Rng;
use kernels::comm::nccl::{self, NcclComm, cuda_devices, cuda_driver_present};
use kernels::comm::rendezvous::RendezvousConfig;
use kernels::comm::thread::{self, LaunchError};
use kernels::comm::{Collective, CommError, CommStats, Communicator, Rank, ReduceOp};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Everywhere.

#[test]
fn cuda_devices_answers_without_panicking() {
    match cuda_devices() {
        Ok(n) => {
            assert!(cuda_driver_present(), "a device count without a driver");
            println!("a CUDA driver is present: {n} device(s)");
        }
        Err(e) => {
            assert!(!cuda_driver_present(), "the driver is present but failed: {e}");
            let text = e.to_string();
            assert!(text.contains("no CUDA driver") && text.contains("libcuda.so"), "{text}");
            println!("no CUDA driver, as reported: {text}");
        }
    }
}

#[test]
fn launch_fails_with_one_clear_error_when_ranks_cannot_have_a_gpu() {
    let started = Arc::new(AtomicUsize::new(0));
    let count = {
        let started = started.clone();
        move |_: NcclComm| {
            started.fetch_add(1, Ordering::SeqCst);
            Ok::<(), CommError>(())
        }
    };
    assert_eq!(nccl::launch(0, count.clone()), Ok(vec![]), "no ranks, nothing to check");
    // One rank more than there are devices: none (no driver, or no GPU) or all of them.
    let devices = cuda_devices();
    let ranks = devices.as_ref().map_or(2, |n| n + 1);
    match nccl::launch(ranks, count) {
        Err(LaunchError::Failed { rank, message }) => match devices {
            Err(_) => {
                assert_eq!(rank, 0);
                assert!(message.contains("no CUDA driver"), "{message}");
            }
            Ok(n) => {
                assert_eq!(rank, n, "the first rank without a device");
                assert!(message.contains(&format!("needs CUDA device {n}")), "{message}");
            }
        },
        other => panic!("expected a launch failure, got {other:?}"),
    }
    assert_eq!(started.load(Ordering::SeqCst), 0, "no rank may start when not all can");
}

#[test]
fn from_rendezvous_without_a_driver_is_an_error() {
    if cuda_driver_present() {
        println!("skipped: a CUDA driver is present (the GPU tests cover from_rendezvous)");
        return;
    }
    let config = RendezvousConfig {
        world_size: 1,
        rank: 0,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 29_500,
    };
    let e = NcclComm::from_rendezvous(&config, Duration::from_secs(1)).unwrap_err();
    assert!(e.to_string().contains("no CUDA driver"), "{e}");
}

#[test]
fn from_env_names_a_missing_variable() {
    if std::env::var_os("WORLD_SIZE").is_some() {
        println!("skipped: WORLD_SIZE is set in this environment");
        return;
    }
    let e = NcclComm::from_env().unwrap_err();
    assert!(e.to_string().contains("WORLD_SIZE is not set"), "{e}");
}

#[test]
fn nccl_comm_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<NcclComm>();
}

// ---------------------------------------------------------------------------------------------
// With a GPU: NCCL computes what thread ranks compute, and counts the same bytes.

/// Rank `rank`'s input number `step`, of `len` values: any rank can recompute any other's.
fn input(rank: Rank, step: usize, len: usize) -> Vec<f32> {
    let mut v = vec![0.0; len];
    Rng::new((rank * 1_000_003 + step * 7919 + len) as u64).fill_normal(&mut v, 1.0);
    v
}

/// One rank's outputs, in call order, and its stats.
type Outputs = (Vec<Vec<f32>>, CommStats);

/// Every collective of the interface on random data, in one fixed order, with lengths that the
/// group size does not divide. The same function runs on thread ranks and on NCCL ranks.
fn every_collective(comm: &mut dyn Communicator) -> Result<Outputs, CommError> {
    let (r, n) = (comm.rank(), comm.world_size());
    let mut out = Vec::new();
    let all_reduces = [(1, ReduceOp::Sum), (1003, ReduceOp::Sum), (4096, ReduceOp::Avg), (2049, ReduceOp::Max)];
    for (step, (len, op)) in all_reduces.into_iter().enumerate() {
        let mut buf = input(r, step, len);
        comm.all_reduce(&mut buf, op)?;
        out.push(buf);
    }
    for (step, op) in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max].into_iter().enumerate() {
        let m = 257;
        let mut shard = vec![0.0; m];
        comm.reduce_scatter(&input(r, 10 + step, n * m), &mut shard, op)?;
        out.push(shard);
    }
    let mut gathered = vec![0.0; n * 129];
    comm.all_gather(&input(r, 20, 129), &mut gathered)?;
    out.push(gathered);
    // Larger than the thread ranks' broadcast piece, from the last rank.
    let mut buf = input(r, 30, 70_000);
    comm.broadcast(&mut buf, n - 1)?;
    out.push(buf);
    if n > 1 {
        // Around the ring; even ranks send first, odd ranks receive first, so blocking sends
        // never wait on each other in a cycle.
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let mut got = vec![0.0; 333];
        if r % 2 == 0 {
            comm.send(&input(r, 40, 333), next)?;
            comm.recv(&mut got, prev)?;
        } else {
            comm.recv(&mut got, prev)?;
            comm.send(&input(r, 40, 333), next)?;
        }
        out.push(got);
    }
    // Everyone sends right and receives from the left at once (on one rank: to itself).
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    let mut got = vec![0.0; 222];
    comm.sendrecv(&input(r, 41, 222), next, &mut got, prev)?;
    out.push(got);
    comm.barrier()?;
    Ok((out, comm.stats()))
}

/// What every rank runs, on thread ranks and on NCCL ranks.
type RankFn = fn(&mut dyn Communicator) -> Result<Outputs, CommError>;

fn on_threads(n: usize, f: RankFn) -> Vec<Outputs> {
    thread::launch(n, move |mut comm| f(&mut comm)).unwrap_or_else(|e| panic!("thread ranks: {e}"))
}

fn on_gpus(n: usize, f: RankFn) -> Vec<Outputs> {
    nccl::launch(n, move |mut comm| {
        assert_eq!(comm.device(), comm.rank(), "rank r drives device r");
        f(&mut comm)
    })
    .unwrap_or_else(|e| panic!("NCCL ranks: {e}"))
}

/// NCCL's outputs equal the thread ranks' up to the rounding of a different summation order,
/// and the byte counts are the same.
fn assert_same(threads: &[Outputs], gpus: &[Outputs]) {
    assert_eq!(threads.len(), gpus.len());
    for (r, ((want, want_stats), (got, got_stats))) in threads.iter().zip(gpus).enumerate() {
        assert_eq!(want.len(), got.len(), "rank {r}: number of outputs");
        for (i, (w, g)) in want.iter().zip(got).enumerate() {
            assert_eq!(w.len(), g.len(), "rank {r}, output {i}: length");
            for (j, (a, b)) in w.iter().zip(g).enumerate() {
                // At most 8 terms of N(0, 1): a few ulps of the sum's magnitude.
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "rank {r}, output {i}[{j}]: threads {a}, NCCL {b}");
            }
        }
        assert_eq!(want_stats, got_stats, "rank {r}: the ring's bytes");
    }
}

/// [`every_collective`]'s first four outputs (all-reduces) are the same on every rank, bit for
/// bit.
fn assert_all_reduce_identical_on_every_rank(gpus: &[Outputs]) {
    for (i, first) in gpus[0].0.iter().take(4).enumerate() {
        for (r, (got, _)) in gpus.iter().enumerate() {
            assert!(
                got[i].iter().zip(first).all(|(a, b)| a.to_bits() == b.to_bits()),
                "all-reduce {i}: rank {r} differs"
            );
        }
    }
}

fn devices_for_multi_gpu_test() -> Option<usize> {
    let devices = cuda_devices().unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"));
    assert!(devices > 0, "this test needs a CUDA device, and the driver sees none");
    if devices < 2 {
        println!("skipped: needs 2 CUDA devices, found 1 (this is not a pass)");
        return None;
    }
    Some(devices)
}

#[test]
#[ignore = "needs a CUDA device"]
fn every_collective_matches_thread_ranks_on_one_gpu() {
    let gpus = on_gpus(1, every_collective);
    assert_same(&on_threads(1, every_collective), &gpus);
    assert_all_reduce_identical_on_every_rank(&gpus);
}

#[test]
#[ignore = "needs a CUDA device"]
fn every_collective_matches_thread_ranks_on_every_gpu() {
    let Some(devices) = devices_for_multi_gpu_test() else { return };
    for n in 2..=devices {
        let gpus = on_gpus(n, every_collective);
        assert_same(&on_threads(n, every_collective), &gpus);
        assert_all_reduce_identical_on_every_rank(&gpus);
    }
}

/// Splits the ranks into evens and odds, runs every collective in each group, then an
/// all-reduce on the parent: the groups never mix, and each counts its own bytes.
fn split_in_two(comm: &mut dyn Communicator) -> Result<Outputs, CommError> {
    let (r, n) = (comm.rank(), comm.world_size());
    let group: Vec<Rank> = (0..n).filter(|q| q % 2 == r % 2).collect();
    let mut sub = comm.split(&group)?;
    let (mut out, stats) = every_collective(&mut *sub)?;
    let mut buf = input(r, 50, 1000);
    comm.all_reduce(&mut buf, ReduceOp::Sum)?;
    out.push(buf);
    // The parent's stats hold its own all-reduce only.
    assert_eq!(comm.stats().calls.values().sum::<u64>(), 1, "rank {r}: the parent counted the group's calls");
    Ok((out, stats))
}

#[test]
#[ignore = "needs a CUDA device"]
fn split_groups_match_thread_ranks() {
    let devices = cuda_devices().unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"));
    for n in 1..=devices {
        assert_same(&on_threads(n, split_in_two), &on_gpus(n, split_in_two));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn staging_buffers_only_grow() {
    let sizes = nccl::launch(1, |mut comm| {
        let mut seen = Vec::new();
        for len in [1000, 10, 1000, 5000, 100] {
            let mut buf = vec![1.0; len];
            comm.all_reduce(&mut buf, ReduceOp::Sum)?;
            seen.push(comm.staging_bytes());
        }
        Ok::<_, CommError>(seen)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sizes[0], vec![4000, 4000, 4000, 20_000, 20_000]);
}

#[test]
#[ignore = "needs a CUDA device"]
fn one_process_of_one_rank_from_a_rendezvous() {
    let config = RendezvousConfig {
        world_size: 1,
        rank: 0,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 29_500,
    };
    let mut comm = NcclComm::from_rendezvous(&config, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    let mut buf = input(0, 0, 100);
    let want = buf.clone();
    comm.all_reduce(&mut buf, ReduceOp::Avg).unwrap();
    assert_eq!(buf, want);
    comm.barrier().unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_failing_rank_ends_every_rank_promptly() {
    let Some(devices) = devices_for_multi_gpu_test() else { return };
    let start = Instant::now();
    let result = nccl::launch(devices, |mut comm| {
        let mut buf = vec![1.0; 100_000];
        for step in 0..100 {
            if comm.rank() == 1 && step == 10 {
                return Err("rank 1 gives up".to_string());
            }
            comm.all_reduce(&mut buf, ReduceOp::Avg).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    assert_eq!(result, Err(LaunchError::Failed { rank: 1, message: "rank 1 gives up".into() }));
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_receive_with_no_sender_times_out() {
    let Some(_) = devices_for_multi_gpu_test() else { return };
    let result = nccl::launch(2, |mut comm| {
        if comm.rank() == 0 {
            comm.set_timeout(Duration::from_secs(2));
            let mut buf = vec![0.0; 10];
            let e = comm.recv(&mut buf, 1).unwrap_err();
            assert_eq!(e, CommError::Timeout { collective: Collective::SendRecv, peer: 1, seconds: 2 });
            // Aborted: every later call gives the same answer at once.
            assert_eq!(comm.barrier(), Err(e));
        }
        Ok::<(), CommError>(())
    });
    assert_eq!(result, Ok(vec![(), ()]));
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_arguments_are_errors_not_hangs() {
    let result = nccl::launch(1, |mut comm| {
        let invalid = |e: CommError| matches!(e, CommError::InvalidArgument { .. });
        assert!(invalid(comm.reduce_scatter(&[1.0; 3], &mut [0.0; 2], ReduceOp::Sum).unwrap_err()));
        assert!(invalid(comm.all_gather(&[1.0; 3], &mut [0.0; 2]).unwrap_err()));
        assert!(invalid(comm.broadcast(&mut [0.0; 2], 1).unwrap_err()));
        assert!(invalid(comm.send(&[1.0], 0).unwrap_err()), "a send to itself");
        assert!(invalid(comm.sendrecv(&[1.0], 1, &mut [0.0], 0).unwrap_err()), "no rank 1");
        assert!(invalid(comm.split_group(&[0, 0]).unwrap_err()));
        // Still usable afterwards.
        let mut buf = vec![2.0; 3];
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        assert_eq!(buf, vec![2.0; 3]);
        Ok::<(), CommError>(())
    });
    assert_eq!(result, Ok(vec![()]));
}
