//! The TCP rendezvous, across real processes on the loopback interface: every rank receives rank
//! 0's payload, and bad configuration or a missing rank 0 is a clear error, never a hang.

use kernels::comm::rendezvous::{RendezvousConfig, RendezvousError, rendezvous};
use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CHECK: &str = env!("CARGO_BIN_EXE_rendezvous-check");

/// A port nobody listens on right now (the OS picks it; we let it go for a process to take),
/// and never one handed to another test of this file: tests run in parallel.
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

fn spawn(world_size: usize, rank: usize, port: u16) -> Child {
    Command::new(CHECK)
        .env_clear()
        .envs([
            ("WORLD_SIZE", world_size.to_string()),
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.to_string()),
            ("RENDEZVOUS_TIMEOUT_S", "20".to_string()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rendezvous-check starts")
}

/// Waits for `child` until `deadline`, killing it past that: a broken rendezvous fails the test
/// instead of hanging it.
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

#[test]
fn every_process_receives_rank_0s_payload() {
    let (n, port) = (4, free_port());
    // The other ranks start first and must retry until rank 0 listens.
    let mut children: Vec<Child> = (1..n).map(|rank| spawn(n, rank, port)).collect();
    std::thread::sleep(Duration::from_millis(200));
    children.insert(0, spawn(n, 0, port));
    let deadline = Instant::now() + Duration::from_secs(30);
    let outputs: Vec<Output> = children.into_iter().map(|c| wait(c, deadline)).collect();
    let mut payloads = Vec::new();
    for (rank, out) in outputs.iter().enumerate() {
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "rank {rank}: {}\n{stdout}{stderr}", out.status);
        let prefix = format!("rank {rank} of {n} received 128 bytes: ");
        let hex = stdout.trim().strip_prefix(&prefix).unwrap_or_else(|| panic!("rank {rank} printed {stdout:?}"));
        assert_eq!(hex.len(), 256);
        payloads.push(hex.to_string());
    }
    assert!(payloads.iter().all(|p| *p == payloads[0]), "{payloads:#?}");
}

#[test]
fn a_missing_variable_is_named_and_exits_non_zero() {
    let out = Command::new(CHECK)
        .env_clear()
        .envs([("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1")])
        .output()
        .expect("rendezvous-check runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("environment variable MASTER_PORT is not set"), "{stderr}");
}

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |name| map.get(name).cloned()
}

const GOOD: [(&str, &str); 5] =
    [("WORLD_SIZE", "8"), ("RANK", "5"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node-0"), ("MASTER_PORT", "29500")];

#[test]
fn config_reads_torchrun_variables() {
    let config = RendezvousConfig::from_vars(vars(&GOOD)).expect("valid");
    let want =
        RendezvousConfig { world_size: 8, rank: 5, local_rank: 1, master_addr: "node-0".into(), master_port: 29500 };
    assert_eq!(config, want);
}

#[test]
fn config_names_the_variable_that_is_wrong() {
    let with = |name: &str, value: &str| {
        let pairs: Vec<_> = GOOD.iter().map(|&(k, v)| (k, if k == name { value } else { v })).collect();
        RendezvousConfig::from_vars(vars(&pairs)).expect_err("invalid").to_string()
    };
    let cases = [
        ("RANK", "8", "RANK=\"8\" is invalid: ranks go from 0 to WORLD_SIZE - 1 = 7"),
        ("RANK", "-1", "RANK=\"-1\" is invalid"),
        ("WORLD_SIZE", "0", "WORLD_SIZE=\"0\" is invalid"),
        ("MASTER_PORT", "70000", "MASTER_PORT=\"70000\" is invalid"),
        ("LOCAL_RANK", "one", "LOCAL_RANK=\"one\" is invalid"),
        ("MASTER_ADDR", " ", "MASTER_ADDR=\"\" is invalid: it is empty"),
    ];
    for (name, value, want) in cases {
        let got = with(name, value);
        assert!(got.contains(want), "{name}={value}: {got}");
    }
    let missing = RendezvousConfig::from_vars(vars(&GOOD[..2])).expect_err("missing");
    assert!(matches!(missing, RendezvousError::Missing { name: "LOCAL_RANK" }), "{missing}");
}

#[test]
fn a_rank_without_rank_0_times_out() {
    let config = RendezvousConfig {
        world_size: 2,
        rank: 1,
        local_rank: 1,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
    };
    let start = Instant::now();
    let err = rendezvous(&config, Vec::new, Duration::from_millis(300)).expect_err("nobody listens");
    assert!(matches!(err, RendezvousError::Timeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

#[test]
fn rank_0_without_the_others_times_out() {
    let config = RendezvousConfig {
        world_size: 3,
        rank: 0,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
    };
    let err = rendezvous(&config, || vec![7; 128], Duration::from_millis(300)).expect_err("nobody connects");
    assert!(err.to_string().contains("ranks [1, 2] to connect"), "{err}");
}

#[test]
fn ranks_that_disagree_on_the_world_size_are_told_so() {
    let port = free_port();
    let config = |world_size, rank| RendezvousConfig {
        world_size,
        rank,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let err = std::thread::scope(|s| {
        let server = s.spawn(|| rendezvous(&config(2, 0), || vec![1; 128], Duration::from_secs(5)));
        // Rank 0 tells the client why, so it fails at once rather than at its deadline.
        let start = Instant::now();
        let client = rendezvous(&config(3, 1), Vec::new, Duration::from_secs(20)).expect_err("refused");
        assert!(start.elapsed() < Duration::from_secs(10), "told at once, not at the deadline");
        assert!(client.to_string().contains("rank 0 refused rank 1: rank 1 of WORLD_SIZE 3"), "{client}");
        server.join().expect("no panic").expect_err("rank 0 refuses the hello")
    });
    assert!(err.to_string().contains("rank 1 of WORLD_SIZE 3 said hello to rank 0 of WORLD_SIZE 2"), "{err}");
}

#[test]
fn two_processes_claiming_the_same_rank_are_both_refused() {
    let port = free_port();
    let config = |rank| RendezvousConfig {
        world_size: 3,
        rank,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let start = Instant::now();
    let (server, clients) = std::thread::scope(|s| {
        let server = s.spawn(|| rendezvous(&config(0), || vec![1; 128], Duration::from_secs(20)));
        let clients: Vec<_> =
            (0..2).map(|_| s.spawn(|| rendezvous(&config(1), Vec::new, Duration::from_secs(20)))).collect();
        let clients: Vec<_> = clients.into_iter().map(|c| c.join().expect("no panic")).collect();
        (server.join().expect("no panic"), clients)
    });
    assert!(start.elapsed() < Duration::from_secs(10), "no rank waits for its deadline: {:?}", start.elapsed());
    let err = server.expect_err("rank 0 refuses");
    assert!(err.to_string().contains("two processes say they are rank 1"), "{err}");
    for client in clients {
        let err = client.expect_err("both rank 1s are refused");
        assert!(err.to_string().contains("two processes say they are rank 1"), "{err}");
    }
}
