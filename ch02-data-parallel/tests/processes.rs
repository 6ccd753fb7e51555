//! Ranks as processes: ch02's binary with `--nproc-per-node` (it starts its own ranks) and under
//! torchrun's environment variables (this test starts the ranks, as torchrun would), against the
//! same run on thread ranks, bit for bit; and how such a job fails: a killed process, and every
//! bad input of the rendezvous, each one line and a non-zero exit, never a hang.

use ch01_single_gpu::testing::assert_one_error_line;
use serde_json::Value;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ch02-data-parallel");

/// The "no hang" bound: generous, since the claim is that a failure ends the job, not how fast.
const NO_HANG: Duration = Duration::from_secs(20);

fn args(steps: u64, extra: &[&str]) -> Vec<String> {
    let steps = steps.to_string();
    let mut args = vec!["--model", "tiny", "--steps", &steps, "--batch-size", "4", "--seq-len", "16"];
    args.extend_from_slice(&["--val-batches", "1", "--eval-every", "2", "--sample-tokens", "0", "--quiet"]);
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// One rank of a job of `world_size` on 127.0.0.1:`port`, started as torchrun would.
fn rank_command(world_size: usize, rank: usize, port: u16, args: &[String]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("WORLD_SIZE", world_size.to_string())
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("SFS_RENDEZVOUS_TIMEOUT_SECS", "10")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Children that are killed if the test fails before it waited for them.
struct Job(Vec<Option<Child>>);

impl Job {
    fn start(commands: impl IntoIterator<Item = Command>) -> Job {
        Job(commands.into_iter().map(|mut c| Some(c.spawn().expect("the binary starts"))).collect())
    }

    fn pid(&self, i: usize) -> u32 {
        self.0[i].as_ref().map(Child::id).expect("not waited for yet")
    }

    /// Waits for child `i` until `deadline`: a hang fails the test.
    fn wait(&mut self, i: usize, deadline: Instant) -> Output {
        let mut child = self.0[i].take().expect("waited for once");
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!("child {i} still ran after the deadline: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().expect("output")
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for child in self.0.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn succeeded(out: &Output) -> &Output {
    assert!(out.status.success(), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

fn run(args: &[String]) -> Output {
    Command::new(BIN).args(args).output().expect("the binary runs")
}

/// What must be equal bit for bit between layouts: each step's loss, learning rate and grad
/// norm, the validation losses (the report writes f32s in their shortest exact form) and the
/// checkpoint's parameters, byte for byte.
fn fingerprint(report: &Path, checkpoint: &Path) -> (Vec<Value>, Value, Vec<u8>) {
    let text = std::fs::read_to_string(report).expect("the report");
    let report: Value = serde_json::from_str(&text).expect("JSON");
    let steps = report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| serde_json::json!([s["step"], s["loss"], s["lr"], s["grad_norm"]]))
        .collect();
    let params = std::fs::read(checkpoint.join("model.safetensors")).expect("the checkpoint's parameters");
    (steps, report["val_losses"].clone(), params)
}

/// The thread ranks' run of `args` with `--dp n`, saved and reported under `dir/threads`.
fn on_threads(dir: &Path, n: usize, steps: u64) -> (Vec<Value>, Value, Vec<u8>) {
    let (report, ckpt) = (dir.join("threads.json"), dir.join("threads"));
    let extra = ["--dp", &n.to_string(), "--report", report.to_str().unwrap(), "--save", ckpt.to_str().unwrap()];
    succeeded(&run(&args(steps, &extra)));
    fingerprint(&report, &ckpt)
}

#[test]
fn two_processes_launched_by_nproc_per_node_match_two_threads_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let want = on_threads(dir.path(), 2, 4);
    let (report, ckpt, trace) = (dir.path().join("procs.json"), dir.path().join("procs"), dir.path().join("t.json"));
    let (r, c, t) = (report.to_str().unwrap(), ckpt.to_str().unwrap(), trace.to_str().unwrap());
    let out = run(&args(4, &["--dp", "2", "--nproc-per-node", "2", "--report", r, "--save", c, "--trace", t]));
    let stdout = String::from_utf8_lossy(&succeeded(&out).stdout);
    // Rank 0's output is the run's, once: one summary, not one per process.
    assert_eq!(stdout.matches("summary").count(), 1, "{stdout}");
    assert!(stdout.contains("ranks              2"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).trim().is_empty(), "the ranks are quiet");
    assert_eq!(fingerprint(&report, &ckpt), want, "processes over TCP compute the thread ranks' bits");
    // Every rank in the report, as on threads, with the same byte counts.
    let ranks = |path: &Path| {
        let report: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        report["ranks"].as_array().unwrap().iter().map(|r| (r["rank"].clone(), r["comm"].clone())).collect::<Vec<_>>()
    };
    assert_eq!(ranks(&report), ranks(&dir.path().join("threads.json")));
    // One trace, rank 0's, with both ranks' compute and communication lanes, the steps of
    // rank 1 lined up with rank 0's (within a step's length: they wait for each other).
    let trace: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let lanes: std::collections::BTreeSet<(u64, u64)> =
        events.iter().map(|e| (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap())).collect();
    assert_eq!(lanes.into_iter().collect::<Vec<_>>(), [(0, 0), (0, 1), (1, 0), (1, 1)]);
    let last_step = |pid: u64| {
        let steps = events.iter().filter(|e| e["name"] == "step" && e["pid"] == pid);
        steps.map(|e| (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap())).next_back().unwrap()
    };
    let ((start0, dur0), (start1, _)) = (last_step(0), last_step(1));
    assert!((start0 - start1).abs() < dur0 + 1e5, "rank 1's last step at {start1} µs, rank 0's at {start0} µs");
}

#[test]
fn four_processes_started_with_torchrun_variables_match_four_threads_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let want = on_threads(dir.path(), 4, 3);
    let (report, ckpt) = (dir.path().join("procs.json"), dir.path().join("procs"));
    let rank_args = args(3, &["--report", report.to_str().unwrap(), "--save", ckpt.to_str().unwrap()]);
    let port = free_port();
    // Started highest rank first: the others wait for rank 0 to listen.
    let mut job = Job::start((0..4).rev().map(|rank| rank_command(4, rank, port, &rank_args)));
    let deadline = Instant::now() + NO_HANG;
    let outputs: Vec<Output> = (0..4).map(|i| job.wait(i, deadline)).collect();
    for out in &outputs {
        succeeded(out);
    }
    // Rank 0 (started last) prints the summary; the other ranks print nothing.
    assert!(String::from_utf8_lossy(&outputs[3].stdout).contains("summary"));
    assert!(outputs[..3].iter().all(|o| o.stdout.is_empty() && o.stderr.is_empty()), "ranks 1-3 are quiet");
    assert_eq!(fingerprint(&report, &ckpt), want, "processes over TCP compute the thread ranks' bits");
}

/// Waits until rank 0 has written a metrics line: every rank has met the others and is training.
fn wait_for_training(metrics: &Path) {
    let deadline = Instant::now() + NO_HANG;
    while std::fs::read_to_string(metrics).map_or(true, |m| m.lines().count() < 2) {
        assert!(Instant::now() < deadline, "the run did not start training");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigkill(pid: u32) {
    let status = Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill runs");
    assert!(status.success(), "kill -KILL {pid}");
}

/// The rank processes a launcher started: (pid, RANK) of each child, from /proc (Linux).
#[cfg(target_os = "linux")]
fn children_of(launcher: u32) -> Vec<(u32, String)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The parent's pid is the second field after the parenthesised name.
        let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
        if fields.get(1) != Some(&launcher.to_string().as_str()) {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let rank = environ
            .split(|&b| b == 0)
            .find_map(|var| String::from_utf8_lossy(var).strip_prefix("RANK=").map(str::to_string));
        children.push((pid, rank.unwrap_or_default()));
    }
    children
}

#[test]
#[cfg(target_os = "linux")]
fn a_killed_rank_under_nproc_per_node_ends_the_job_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let launch = args(1_000_000, &["--dp", "2", "--nproc-per-node", "2", "--metrics", metrics.to_str().unwrap()]);
    let mut command = Command::new(BIN);
    command.args(&launch).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut job = Job::start([command]);
    wait_for_training(&metrics);
    let children = children_of(job.pid(0));
    assert_eq!(children.len(), 2, "the launcher started two ranks: {children:?}");
    let rank1 = children.iter().find(|(_, rank)| rank == "1").expect("rank 1").0;
    sigkill(rank1);
    let killed = Instant::now();
    let out = job.wait(0, killed + NO_HANG);
    eprintln!("the launcher ended {:?} after rank 1 was killed", killed.elapsed());
    assert_one_error_line(&out, "rank 1 failed: killed by signal 9");
    // Rank 0 is gone too, not left training.
    for (pid, rank) in children {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(state.is_empty() || state.contains(") Z"), "rank {rank} (pid {pid}) still runs: {state}");
    }
}

#[test]
fn a_killed_rank_under_torchrun_variables_makes_every_other_rank_exit_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let rank_args = args(1_000_000, &["--batch-size", "6", "--metrics", metrics.to_str().unwrap()]);
    let port = free_port();
    let mut job = Job::start((0..3).map(|rank| rank_command(3, rank, port, &rank_args)));
    wait_for_training(&metrics);
    sigkill(job.pid(1));
    let killed = Instant::now();
    for rank in [0, 2] {
        let out = job.wait(rank, killed + NO_HANG);
        assert_one_error_line(&out, "rank 1 failed: its connection closed without a goodbye");
    }
    eprintln!("ranks 0 and 2 ended {:?} after rank 1 was killed", killed.elapsed());
}

/// Runs ranks (world size, rank) of one job on one port and returns their outputs in order.
fn job(ranks: &[(usize, usize)], port: u16) -> Vec<Output> {
    let mut job =
        Job::start(ranks.iter().map(|&(n, rank)| rank_command(n, rank, port, &args(2, &["--batch-size", "12"]))));
    let deadline = Instant::now() + NO_HANG;
    (0..ranks.len()).map(|i| job.wait(i, deadline)).collect()
}

#[test]
fn every_bad_launch_is_one_line_and_a_non_zero_exit() {
    // Nobody listens where rank 1 looks for rank 0: it retries until its rendezvous timeout.
    let mut alone = rank_command(2, 1, free_port(), &args(2, &[]));
    let out = alone.env("SFS_RENDEZVOUS_TIMEOUT_SECS", "1").output().expect("runs");
    assert_one_error_line(&out, "timed out after 1.0 s");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Connection refused"));
    // Another program holds MASTER_PORT.
    let taken = TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = taken.local_addr().expect("its address").port();
    assert_one_error_line(&job(&[(2, 0)], port)[0], "Address already in use");
    drop(taken);
    // The ranks disagree on WORLD_SIZE: both are told, at once.
    let outs = job(&[(2, 0), (4, 1)], free_port());
    for out in &outs {
        assert_one_error_line(out, "rank 1 of WORLD_SIZE 4 said hello to rank 0 of WORLD_SIZE 2");
    }
    // Two processes say they are rank 1 (and rank 2 never comes): all three are told.
    let outs = job(&[(3, 0), (3, 1), (3, 1)], free_port());
    for out in &outs {
        assert_one_error_line(out, "two processes say they are rank 1");
    }
    // What the command line gets wrong, before any process starts.
    let port = free_port();
    let out = rank_command(2, 0, port, &args(2, &["--dp", "4"])).output().expect("runs");
    assert_one_error_line(&out, "--dp 4 does not match the 2 rank processes");
    let out = rank_command(2, 0, port, &args(2, &["--nproc-per-node", "2"])).output().expect("runs");
    assert_one_error_line(&out, "use one or the other");
    assert_one_error_line(&run(&args(2, &["--nproc-per-node", "0"])), "--nproc-per-node must be at least 1");
    assert_one_error_line(&run(&args(2, &["--nproc-per-node", "3"])), "global batch of 4 sequences is not divisible");
    // The launcher counts the memory of all its processes (they share this machine).
    let huge = args(2, &["--nproc-per-node", "4", "--batch-size", "400000000"]);
    assert_one_error_line(&run(&huge), "on 4 ranks");
    let bad_timeout = rank_command(2, 1, port, &args(2, &[])).env("SFS_RENDEZVOUS_TIMEOUT_SECS", "soon").output();
    assert_one_error_line(&bad_timeout.expect("runs"), "SFS_RENDEZVOUS_TIMEOUT_SECS=\"soon\" is not a whole number");
}
