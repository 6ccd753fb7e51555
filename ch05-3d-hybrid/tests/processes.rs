//! Ranks as processes: four copies of the binary started with torchrun's variables on
//! 127.0.0.1 train the grid that four thread ranks train, bit for bit (the same ring algorithms
//! in the same order, over sockets instead of queues); a wrong WORLD_SIZE is one line.

use ch01_single_gpu::testing::{assert_one_error_line, output_within};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ch05(dir: &Path, name: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ch05-3d-hybrid"));
    cmd.args(["--model", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "16", "--val-batches", "1"]);
    cmd.args(["--eval-every", "0", "--sample-tokens", "0", "--quiet", "--microbatches", "2"]);
    cmd.args(["--dp", "1", "--tp", "2", "--pp", "2"]);
    cmd.arg("--metrics").arg(dir.join(format!("{name}.jsonl"))).arg("--save").arg(dir.join(name));
    cmd.env_remove("WORLD_SIZE");
    cmd
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// The losses and norms of a metrics file, without the timings.
fn losses(path: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap())
        })
        .collect()
}

// ANCHOR: processes_test
#[test]
fn four_processes_over_tcp_train_what_four_thread_ranks_train_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let threads = output_within(&mut ch05(dir.path(), "threads"), Duration::from_secs(120));
    assert!(threads.status.success(), "{}", String::from_utf8_lossy(&threads.stderr));
    let port = free_port().to_string();
    let ranks: Vec<_> = (0..4)
        .map(|rank| {
            let mut cmd = ch05(dir.path(), "procs");
            let rank = rank.to_string();
            let vars = [("WORLD_SIZE", "4"), ("RANK", &rank), ("LOCAL_RANK", &rank), ("MASTER_ADDR", "127.0.0.1")];
            cmd.envs(vars).env("MASTER_PORT", &port).stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.spawn().expect("a rank starts")
        })
        .collect();
    // Never a hang: every rank is killed if the job is not done in two minutes.
    let started = Instant::now();
    let mut ranks = ranks;
    while ranks.iter_mut().any(|c| c.try_wait().ok().flatten().is_none()) {
        if started.elapsed() > Duration::from_secs(120) {
            ranks.iter_mut().for_each(|c| drop(c.kill()));
            panic!("the four processes are still running after 120 s: they hang");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (rank, child) in ranks.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "rank {rank}: {}", String::from_utf8_lossy(&out.stderr));
        if rank > 0 {
            assert!(out.stdout.is_empty(), "rank {rank} printed: rank 0 speaks for the job");
        }
    }
    let (a, b) = (dir.path().join("threads.jsonl"), dir.path().join("procs.jsonl"));
    assert_eq!(losses(&a).len(), 3);
    assert_eq!(losses(&a), losses(&b), "losses and gradient norms");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let read = |name: &str| std::fs::read(dir.path().join(name).join(file)).unwrap();
        assert!(read("threads") == read("procs"), "{file} differs");
    }
}
// ANCHOR_END: processes_test

#[test]
fn nproc_per_node_launches_the_grid_as_processes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let threads = output_within(&mut ch05(dir.path(), "threads"), Duration::from_secs(120));
    assert!(threads.status.success(), "{}", String::from_utf8_lossy(&threads.stderr));
    let out = output_within(ch05(dir.path(), "procs").args(["--nproc-per-node", "4"]), Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4 processes over TCP"), "{stdout}");
    // Rank 0's summary has every process's figures, and the same bytes as on threads.
    let threads_out = String::from_utf8_lossy(&threads.stdout);
    let rank_lines =
        |text: &str| text.lines().filter(|l| l.starts_with("  rank ")).map(String::from).collect::<Vec<_>>();
    assert_eq!(rank_lines(&stdout).len(), 8, "two lines per rank: bytes and memory");
    assert_eq!(rank_lines(&stdout), rank_lines(&threads_out));
    let (a, b) = (dir.path().join("threads.jsonl"), dir.path().join("procs.jsonl"));
    assert_eq!(losses(&a), losses(&b), "losses and gradient norms");
    let read = |name: &str| std::fs::read(dir.path().join(name).join("model.safetensors")).unwrap();
    assert!(read("threads") == read("procs"), "the saved weights differ");
    // One process per rank of the grid, or one line before any starts.
    let out = output_within(ch05(dir.path(), "wrong").args(["--nproc-per-node", "2"]), Duration::from_secs(60));
    assert_one_error_line(&out, "--nproc-per-node 2 starts 2 ranks, but the grid --dp x --tp x --pp has 4");
}

#[test]
fn a_world_size_that_is_not_the_grid_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let mut cmd = ch05(dir.path(), "one");
    // Rank 0 of 8 would wait minutes for seven others: it must say what is wrong at once.
    cmd.envs([("WORLD_SIZE", "8"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")]);
    let out = output_within(cmd.env("MASTER_PORT", &port), Duration::from_secs(60));
    assert_one_error_line(&out, "WORLD_SIZE is 8, but the grid --dp x --tp x --pp has 4 ranks");
}

#[test]
fn a_killed_rank_ends_every_other_rank_with_one_line_naming_it() {
    // A long run; once it trains, rank 2 (stage 1's tensor rank 0) is killed with SIGKILL: its
    // tensor partner, its pipe and rank 0 must each end within seconds, naming it.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let mut job = Job((0..4)
        .map(|rank| {
            let mut cmd = ch05(dir.path(), "long");
            cmd.args(["--steps", "1000000"]);
            let rank = rank.to_string();
            let vars = [("WORLD_SIZE", "4"), ("RANK", &rank), ("LOCAL_RANK", &rank), ("MASTER_ADDR", "127.0.0.1")];
            cmd.envs(vars).env("MASTER_PORT", &port).stdout(Stdio::null()).stderr(Stdio::piped());
            cmd.spawn().expect("a rank starts")
        })
        .collect());
    let ranks = &mut job.0;
    let metrics = dir.path().join("long.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
        assert!(started.elapsed() < Duration::from_secs(120), "the job never trained");
        std::thread::sleep(Duration::from_millis(50));
    }
    ranks[2].kill().expect("SIGKILL");
    let killed = Instant::now();
    for (rank, child) in ranks.iter_mut().enumerate().filter(|(r, _)| *r != 2) {
        while child.try_wait().ok().flatten().is_none() {
            assert!(killed.elapsed() < Duration::from_secs(30), "rank {rank} still runs 30 s after rank 2 was killed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (rank, child) in std::mem::take(ranks).into_iter().enumerate().filter(|(r, _)| *r != 2) {
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "rank {rank} exited 0");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: rank 2 failed"), "rank {rank}'s last line: {stderr}");
    }
}

/// The processes of a job, killed if a test fails before they end (no run is left behind).
struct Job(Vec<std::process::Child>);

impl Drop for Job {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
