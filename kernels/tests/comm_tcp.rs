//! TCP ranks on the loopback interface: every collective gives the thread ranks' bits and byte
//! counts; large exchanges do not deadlock; sizes that disagree, a rank that leaves and a
//! process that dies are errors naming the rank, within seconds; and separate processes started
//! with torchrun's variables all-reduce together.

use kernels::Rng;
use kernels::comm::process::{FAILURE_GRACE, run_rank};
use kernels::comm::rendezvous::RendezvousConfig;
use kernels::comm::tcp::TcpComm;
use kernels::comm::thread::launch;
use kernels::comm::{CommError, CommStats, Communicator, Rank, ReduceOp};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A port nobody listens on now, never one handed to another test of this file.
fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let port =
            TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no fresh loopback port in 100 tries");
}

fn config(world_size: usize, rank: Rank, port: u16) -> RendezvousConfig {
    let master_addr = "127.0.0.1".to_string();
    RendezvousConfig { world_size, rank, local_rank: rank, master_addr, master_port: port }
}

/// Runs `f` on `n` TCP ranks, each a thread of this test with its own sockets.
fn tcp_run<T: Send + 'static>(
    n: usize,
    f: impl Fn(&mut TcpComm) -> Result<T, CommError> + Send + Sync + Clone + 'static,
) -> Vec<Result<T, CommError>> {
    let port = free_port();
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut comm = TcpComm::from_rendezvous(&config(n, rank, port), Duration::from_secs(20))?;
                f(&mut comm)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap_or_else(|_| panic!("a rank panicked"))).collect()
}

fn input(rank: Rank, step: usize, len: usize) -> Vec<f32> {
    let mut v = vec![0.0; len];
    Rng::new((rank * 1_000_003 + step * 7 + len) as u64).fill_normal(&mut v, 1.0);
    v
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Every collective once (sizes that the ranks do not divide, a broadcast of several pieces, a
/// sub-group), on any communicator: what each call left in its buffers, as bits, and the stats.
fn every_collective(comm: &mut dyn Communicator) -> Result<(Vec<Vec<u32>>, CommStats), CommError> {
    let (r, n, len) = (comm.rank(), comm.world_size(), 1003);
    let mut out = Vec::new();
    for (step, op) in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max].into_iter().enumerate() {
        let mut buf = input(r, step, len);
        comm.all_reduce(&mut buf, op)?;
        out.push(bits(&buf));
        let mut shard = vec![0.0; 7];
        comm.reduce_scatter(&input(r, step + 10, 7 * n), &mut shard, op)?;
        out.push(bits(&shard));
    }
    let mut gathered = vec![0.0; 5 * n];
    comm.all_gather(&input(r, 20, 5), &mut gathered)?;
    out.push(bits(&gathered));
    let mut buf = input(r, 30, 70_000); // more than one broadcast piece
    comm.broadcast(&mut buf, n - 1)?;
    out.push(bits(&buf));
    // A ring shift: everyone sends right and receives from the left at once.
    let mut shifted = vec![0.0; 9];
    comm.sendrecv(&input(r, 40, 9), (r + 1) % n, &mut shifted, (r + n - 1) % n)?;
    out.push(bits(&shifted));
    if n > 1 {
        if r == 0 {
            comm.send(&input(r, 50, 3), n - 1)?;
        } else if r == n - 1 {
            let mut got = vec![0.0; 3];
            comm.recv(&mut got, 0)?;
            out.push(bits(&got));
        }
    }
    comm.barrier()?;
    // The even ranks, in reverse order, as a sub-group; the odd ones as another.
    let mut group: Vec<Rank> = (0..n).filter(|q| q % 2 == r % 2).collect();
    group.reverse();
    let mut sub = comm.split(&group)?;
    let mut buf = input(r, 60, 11);
    sub.all_reduce(&mut buf, ReduceOp::Sum)?;
    out.push(bits(&buf));
    Ok((out, comm.stats()))
}

#[test]
fn every_collective_gives_the_thread_ranks_bits_and_byte_counts() {
    for n in 1..=4 {
        let threads = launch(n, |mut comm| every_collective(&mut comm)).unwrap_or_else(|e| panic!("{e}"));
        let tcp = tcp_run(n, |comm| every_collective(comm));
        for (rank, (want, got)) in threads.into_iter().zip(tcp).enumerate() {
            let got = got.unwrap_or_else(|e| panic!("{n} ranks, rank {rank}: {e}"));
            assert_eq!(got.0, want.0, "{n} ranks, rank {rank}: results");
            assert_eq!(got.1, want.1, "{n} ranks, rank {rank}: stats");
            assert!(n == 1 || got.1.total_sent() > 0, "{n} ranks: some bytes moved");
        }
    }
}

#[test]
fn both_ranks_sending_16_mib_at_once_do_not_deadlock() {
    let len = 4 << 20; // 16 MiB of f32: far more than a socket buffer holds
    let results = tcp_run(2, move |comm| {
        let (r, peer) = (comm.rank(), 1 - comm.rank());
        let mut got = vec![0.0; len];
        comm.sendrecv(&input(r, 0, len), peer, &mut got, peer)?;
        Ok(got == input(peer, 0, len))
    });
    for (rank, result) in results.into_iter().enumerate() {
        assert_eq!(result, Ok(true), "rank {rank} received its peer's 16 MiB");
    }
}

#[test]
fn sizes_that_disagree_are_an_invalid_argument() {
    let results =
        tcp_run(2, |comm| if comm.rank() == 0 { comm.send(&[1.0; 4], 1) } else { comm.recv(&mut [0.0; 5], 0) });
    assert!(results[0].is_ok(), "the send went out: {:?}", results[0]);
    match &results[1] {
        Err(CommError::InvalidArgument { reason, .. }) => assert!(reason.contains("sent 4 values where 5"), "{reason}"),
        other => panic!("rank 1: {other:?}"),
    }
    // In an all-reduce: the rank that notices says so, the other is told who failed.
    let results = tcp_run(2, |comm| comm.all_reduce(&mut vec![1.0; 10 + comm.rank()], ReduceOp::Sum));
    assert!(matches!(results[1], Err(CommError::InvalidArgument { .. })), "rank 1: {:?}", results[1]);
    assert!(
        matches!(&results[0], Err(CommError::PeerFailed { rank: 1, reason }) if reason.contains("values where")),
        "rank 0: {:?}",
        results[0]
    );
}

#[test]
fn a_rank_that_drops_its_communicator_mid_collective_fails_the_others_quickly() {
    let start = Instant::now();
    let results = tcp_run(3, |comm| {
        if comm.rank() == 2 {
            std::thread::sleep(Duration::from_millis(100));
            return Ok(()); // drops the communicator without taking part
        }
        comm.all_reduce(&mut vec![1.0; 1000], ReduceOp::Sum)
    });
    let elapsed = start.elapsed();
    assert!(results[2].is_ok());
    for (rank, result) in results[..2].iter().enumerate() {
        assert!(matches!(result, Err(CommError::PeerFailed { rank: 2, .. })), "rank {rank}: {result:?}");
    }
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}: no hang");
}

#[test]
fn a_panicking_rank_is_named_as_panicked() {
    let results = tcp_run(2, |comm| {
        if comm.rank() == 1 {
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _moved =
                    std::mem::replace(comm, TcpComm::from_rendezvous(&config(1, 0, 0), Duration::from_secs(1))?);
                panic!("rank 1 breaks")
            }));
            return caught.unwrap_or(Ok(()));
        }
        comm.barrier()
    });
    match &results[0] {
        Err(CommError::PeerFailed { rank: 1, reason }) => assert!(reason.contains("panicked"), "{reason}"),
        other => panic!("rank 0: {other:?}"),
    }
}

#[test]
fn two_ranks_that_both_receive_time_out_with_the_configured_limit() {
    let start = Instant::now();
    let results = tcp_run(2, |comm| {
        comm.set_timeout(Duration::from_secs(1));
        let peer = 1 - comm.rank();
        comm.recv(&mut [0.0; 4], peer)
    });
    // Whichever rank gives up first leaves, and the other is told it finished while awaited.
    assert!(
        results.iter().any(|r| matches!(r, Err(CommError::Timeout { seconds: 1, .. }))),
        "a deadlock is a timeout: {results:?}"
    );
    assert!(results.iter().all(Result::is_err), "{results:?}");
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

#[test]
fn sub_groups_on_two_threads_share_the_connections_without_mixing() {
    let results = tcp_run(2, |comm| {
        let r = comm.rank();
        let (mut first, mut second) = (comm.split_group(&[0, 1])?, comm.split_group(&[0, 1])?);
        // The first group's all-reduces run on another thread while the second's run here.
        let other = std::thread::spawn(move || {
            let mut buf = input(r, 1, 5000);
            (0..20).try_for_each(|_| first.all_reduce(&mut buf, ReduceOp::Max)).map(|()| bits(&buf))
        });
        let mut buf = input(r, 2, 3000);
        (0..20).try_for_each(|_| second.all_reduce(&mut buf, ReduceOp::Max))?;
        let first_bits = other.join().unwrap_or_else(|_| panic!("the other thread panicked"))?;
        Ok((first_bits, bits(&buf)))
    });
    let max = |step| {
        let len = if step == 1 { 5000 } else { 3000 };
        bits(&input(0, step, len).iter().zip(input(1, step, len)).map(|(a, b)| a.max(b)).collect::<Vec<_>>())
    };
    for (rank, result) in results.into_iter().enumerate() {
        assert_eq!(result, Ok((max(1), max(2))), "rank {rank}");
    }
}

/// The environment variable that makes a copy of this test binary a rank (see `child_rank`).
const CHILD: &str = "SFS_TCP_TEST_CHILD";

/// Not a test of its own: it does nothing unless [`CHILD`] is set, and then it is one rank of a
/// job started by `processes_started_with_torchrun_variables_all_reduce_together`, which
/// re-executes this binary. It prints its all-reduce's bits, or its error; in the "exit" mode
/// the last rank exits abruptly instead (as a killed process would, with no goodbye).
#[test]
fn child_rank() {
    let Ok(mode) = std::env::var(CHILD) else { return };
    if mode == "compute" {
        return computing_rank();
    }
    let result = TcpComm::from_env().and_then(|mut comm| {
        let (r, n) = (comm.rank(), comm.world_size());
        if mode == "exit" && r == n - 1 {
            std::process::exit(3);
        }
        let mut buf = input(r, 0, 1000);
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        Ok(bits(&buf))
    });
    match result {
        // A line of its own: the harness has already printed "test child_rank ... ".
        Ok(bits) => println!("\nRESULT {bits:?}"),
        Err(e) => println!("\nERROR {e}"),
    }
}

/// The "compute" mode: through `process::run_rank`, the last rank exits abruptly after the first
/// all-reduce while the others are busy computing (sleeping) for a minute, never calling another
/// collective: the watchdog must end them.
fn computing_rank() {
    let config = RendezvousConfig::from_env().expect("torchrun's variables");
    let result = run_rank(&config, |mut comm| {
        let (r, n) = (comm.rank(), comm.world_size());
        comm.all_reduce(&mut [1.0; 4], ReduceOp::Sum)?;
        if r == n - 1 {
            std::process::exit(3);
        }
        std::thread::sleep(Duration::from_secs(60));
        Ok::<_, CommError>(())
    });
    println!("\nRESULT {result:?}");
}

fn spawn(mode: &str, world_size: usize, rank: Rank, port: u16) -> Child {
    let exe = std::env::current_exe().expect("the test binary's path");
    Command::new(exe)
        .args(["--exact", "child_rank", "--nocapture", "--test-threads=1"])
        .envs([
            (CHILD, mode.to_string()),
            ("WORLD_SIZE", world_size.to_string()),
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.to_string()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the test binary starts again")
}

/// Waits for `child` until `deadline`, killing it past that: a hang fails the test.
fn wait(mut child: Child, deadline: Instant) -> Output {
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            child.kill().expect("kill the process this test started");
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

fn run_processes(mode: &str, n: usize) -> Vec<String> {
    let port = free_port();
    let children: Vec<Child> = (0..n).map(|rank| spawn(mode, n, rank, port)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    children
        .into_iter()
        .map(|child| {
            let output = wait(child, deadline);
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let line = stdout.lines().find(|l| l.starts_with("RESULT") || l.starts_with("ERROR"));
            line.map(str::to_string).unwrap_or_else(|| format!("NOTHING ({:?})", output.status))
        })
        .collect()
}

#[test]
fn processes_started_with_torchrun_variables_all_reduce_together() {
    let n = 3;
    let want = launch(n, |mut comm| {
        let mut buf = input(comm.rank(), 0, 1000);
        comm.all_reduce(&mut buf, ReduceOp::Sum).map(|()| format!("RESULT {:?}", bits(&buf)))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run_processes("all-reduce", n), want, "each process ends with the thread ranks' bits");
}

#[test]
fn a_rank_busy_computing_when_a_peer_dies_exits_within_the_grace() {
    let start = Instant::now();
    let port = free_port();
    let children: Vec<Child> = (0..2).map(|rank| spawn("compute", 2, rank, port)).collect();
    let outputs: Vec<Output> = children.into_iter().map(|c| wait(c, start + Duration::from_secs(30))).collect();
    let elapsed = start.elapsed();
    assert_eq!(outputs[1].status.code(), Some(3), "rank 1 exits abruptly");
    let stderr = String::from_utf8_lossy(&outputs[0].stderr);
    assert_eq!(outputs[0].status.code(), Some(1), "rank 0: {stderr}");
    assert!(stderr.contains("error: rank 1 failed: its connection closed"), "{stderr}");
    // The grace, plus starting two processes: far below the minute rank 0 meant to compute.
    assert!(elapsed < FAILURE_GRACE + Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn a_process_that_dies_mid_job_fails_the_others_naming_it() {
    let lines = run_processes("exit", 3);
    assert!(lines[2].starts_with("NOTHING"), "rank 2 exited without a word: {}", lines[2]);
    for line in &lines[..2] {
        assert!(line.starts_with("ERROR rank 2 failed"), "{line}");
    }
}
