//! Ranks as processes: ZeRO over TCP trains what ZeRO over thread ranks trains, bit for bit
//! (the same reduce-scatters and all-gathers in the same order, over sockets instead of
//! queues): losses, grad norms, the saved checkpoint and every rank's memory and bytes; a
//! WORLD_SIZE that is not the grid is one line.

use ch01_single_gpu::testing::{assert_one_error_line, output_within};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ch06(dir: &Path, name: &str, grid: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ch06-zero-checkpointing"));
    cmd.args(["--model", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "16", "--val-batches", "1"]);
    cmd.args(["--eval-every", "0", "--sample-tokens", "0", "--quiet"]);
    cmd.args(grid);
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

/// The summary's ZeRO section: every rank's bytes sent and memory beside the formulas.
fn zero_section(out: &Output) -> Vec<String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().skip_while(|l| *l != "zero").map(String::from).collect()
}

/// The two runs in `dir` (`threads`, `procs`) trained the same model, bit for bit.
fn assert_same_run(dir: &Path, steps: usize) {
    let (a, b) = (dir.join("threads.jsonl"), dir.join("procs.jsonl"));
    assert_eq!(losses(&a).len(), steps);
    assert_eq!(losses(&a), losses(&b), "losses and gradient norms");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let read = |name: &str| std::fs::read(dir.join(name).join(file)).unwrap();
        assert!(read("threads") == read("procs"), "{file} differs");
    }
}

// ANCHOR: processes_test
#[test]
fn two_zero_2_processes_under_torchrun_variables_train_what_two_thread_ranks_train() {
    let dir = tempfile::tempdir().unwrap();
    let grid = ["--dp", "2", "--zero", "2"];
    let threads = output_within(&mut ch06(dir.path(), "threads", &grid), Duration::from_secs(60));
    assert!(threads.status.success(), "{}", String::from_utf8_lossy(&threads.stderr));
    let port = free_port().to_string();
    let mut job = Job((0..2)
        .map(|rank| {
            let mut cmd = ch06(dir.path(), "procs", &grid);
            let rank = rank.to_string();
            let vars = [("WORLD_SIZE", "2"), ("RANK", &rank), ("LOCAL_RANK", &rank), ("MASTER_ADDR", "127.0.0.1")];
            cmd.envs(vars).env("MASTER_PORT", &port).stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.spawn().expect("a rank starts")
        })
        .collect());
    // Never a hang: every rank is killed (by the job's drop) if it is not done in a minute.
    let started = Instant::now();
    while job.0.iter_mut().any(|c| c.try_wait().ok().flatten().is_none()) {
        assert!(started.elapsed() < Duration::from_secs(60), "the two processes still run after 60 s: they hang");
        std::thread::sleep(Duration::from_millis(20));
    }
    let outs: Vec<Output> = std::mem::take(&mut job.0).into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (rank, out) in outs.iter().enumerate() {
        assert!(out.status.success(), "rank {rank}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(outs[1].stdout.is_empty(), "rank 1 printed: rank 0 speaks for the job");
    let stdout = String::from_utf8_lossy(&outs[0].stdout);
    assert!(stdout.contains("2 data-parallel ranks as processes over TCP"), "{stdout}");
    // Rank 0 reports both ranks' memory and bytes, the same as the threads measured.
    assert!(zero_section(&threads).len() > 5);
    assert_eq!(zero_section(&outs[0]), zero_section(&threads));
    assert_same_run(dir.path(), 3);
}
// ANCHOR_END: processes_test

#[test]
fn nproc_per_node_runs_dp_2_x_tp_2_zero_3_as_four_processes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let grid = ["--dp", "2", "--tp", "2", "--zero", "3", "--recompute", "selective"];
    let threads = output_within(&mut ch06(dir.path(), "threads", &grid), Duration::from_secs(60));
    assert!(threads.status.success(), "{}", String::from_utf8_lossy(&threads.stderr));
    let out = output_within(ch06(dir.path(), "procs", &grid).args(["--nproc-per-node", "4"]), Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4 processes over TCP: dp 2 x tp 2"), "{stdout}");
    assert_eq!(zero_section(&out), zero_section(&threads));
    assert_same_run(dir.path(), 3);
    // One process per rank of the grid, or one line before any starts.
    let out = output_within(ch06(dir.path(), "wrong", &grid).args(["--nproc-per-node", "2"]), Duration::from_secs(30));
    assert_one_error_line(&out, "--nproc-per-node 2 starts 2 ranks, but the grid --dp x --tp x --pp has 4");
}

#[test]
fn with_pipelines_the_processes_are_chapter_5s_with_zero_1_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let grid = ["--dp", "1", "--pp", "2", "--microbatches", "2", "--zero", "1"];
    let threads = output_within(&mut ch06(dir.path(), "threads", &grid), Duration::from_secs(60));
    assert!(threads.status.success(), "{}", String::from_utf8_lossy(&threads.stderr));
    let out = output_within(ch06(dir.path(), "procs", &grid).args(["--nproc-per-node", "2"]), Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Both stages' optimizer state beside ZeRO-1's formula, as the threads measured it.
    assert_eq!(zero_section(&out).len(), 4, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(zero_section(&out), zero_section(&threads));
    assert_same_run(dir.path(), 3);
    // ZeRO's own refusal comes first, before any process starts.
    let refused = ["--dp", "1", "--pp", "2", "--microbatches", "2", "--zero", "2", "--nproc-per-node", "2"];
    let out = output_within(&mut ch06(dir.path(), "refused", &refused), Duration::from_secs(30));
    assert_one_error_line(&out, "--zero 2 with --pp > 1 is refused");
}

#[test]
fn a_world_size_that_is_not_the_grid_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let mut cmd = ch06(dir.path(), "one", &["--dp", "2", "--zero", "2"]);
    // Rank 0 of 4 would wait for three others that never come: it must say what is wrong at once.
    cmd.envs([("WORLD_SIZE", "4"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")]);
    let out = output_within(cmd.env("MASTER_PORT", &port), Duration::from_secs(30));
    assert_one_error_line(&out, "WORLD_SIZE is 4, but the grid --dp x --tp x --pp has 2 ranks");
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
