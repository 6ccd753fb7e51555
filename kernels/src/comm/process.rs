//! Ranks as processes: one program, run once per rank, the ranks talking over [`TcpComm`].
//!
//! There are two ways to start them, and a chapter's binary supports both with the same code:
//!
//! - **`--nproc-per-node K`**: the program is its own launcher. It starts K copies of itself
//!   (the same executable and arguments, minus that flag), each with torchrun's environment
//!   variables set (`WORLD_SIZE=K`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR=127.0.0.1` and a free
//!   `MASTER_PORT`), and waits for them ([`launch_this_program`]).
//! - **torchrun's environment**: a launcher (torchrun, SLURM's `srun` with a wrapper, a shell
//!   loop, a test) starts the processes and sets the variables itself; each process sees
//!   `WORLD_SIZE` and is one rank ([`Ranks::Process`]).
//!
//! Either way a rank runs its part through [`run_rank`], which meets the others (the
//! [rendezvous](super::rendezvous), bounded by
//! [`RENDEZVOUS_TIMEOUT_VAR`](super::tcp::RENDEZVOUS_TIMEOUT_VAR)) and then calls the chapter's
//! rank function with its communicator: the same function thread ranks run.
//!
//! ## What a failure looks like
//! Every process ends with one line that names the first rank to fail, and why: `rank 1
//! failed: ...`, the same line a run on thread ranks prints. A rank whose own work fails records
//! that in the goodbye its peers receive; a rank that is killed (SIGKILL, the OOM killer) closes
//! its sockets without one, and every peer's pending or next collective fails naming it. A rank
//! that is computing, not communicating, when a peer dies finds out from a watchdog thread and
//! exits within [`FAILURE_GRACE`] of it. The launcher watches its children: when one fails, it
//! gives the others [`FAILURE_GRACE`] to end, kills those still running, and prints one line of
//! its own naming the first failure (a rank killed by a signal is named for the signal, not
//! for what its peers then saw).
//!
//! ## Output
//! Rank 0's standard output is the run's: the launcher passes it through untouched. Rank 0's
//! standard error is passed through line by line, but for its last `error:` line, which the
//! launcher's own one line replaces. The other ranks are quiet: their standard output is
//! discarded, their standard error kept for the one line if they fail.

use super::rendezvous::{RendezvousConfig, RendezvousError};
use super::tcp::{TcpComm, rendezvous_timeout_from_env};
use super::thread::LaunchError;
use super::{CommError, Communicator, Rank};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::ffi::OsString;
use std::fmt::Display;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The flag that makes a program launch its own ranks.
pub const NPROC_PER_NODE_FLAG: &str = "--nproc-per-node";

/// How long a rank that knows of a failure may go on before it exits (its main thread, busy
/// computing, has not noticed yet), and how long the launcher waits for the other ranks after
/// one failed before it kills them. Under 5 s in all: every rank ends within 5 s of the first
/// failure.
pub const FAILURE_GRACE: Duration = Duration::from_secs(3);

/// How often the launcher looks at its children.
const POLL: Duration = Duration::from_millis(20);

/// How many of a quiet rank's last standard-error lines the launcher keeps.
const TAIL_LINES: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A rank failed: the first one, and why.
    #[error(transparent)]
    Rank(#[from] LaunchError),
    #[error("{NPROC_PER_NODE_FLAG} must be at least 1")]
    ZeroProcesses,
    #[error(
        "{NPROC_PER_NODE_FLAG} starts the ranks itself, but WORLD_SIZE={0} says a launcher (torchrun?) already did: use one or the other"
    )]
    AlreadyLaunched(String),
    #[error(transparent)]
    Environment(#[from] RendezvousError),
    #[error("could not start the rank processes: {0}")]
    Spawn(String),
}

// ANCHOR: ranks
/// How this process's ranks run, from the launcher flag and the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ranks {
    /// Neither: every rank is a thread of this process.
    Threads,
    /// `--nproc-per-node K`: this process starts K rank processes and waits for them.
    Launcher { nproc: usize },
    /// `WORLD_SIZE` is set (by our launcher, or torchrun): this process is one rank.
    Process(RendezvousConfig),
}

impl Ranks {
    /// `nproc_per_node`: the value of [`NPROC_PER_NODE_FLAG`], if given.
    pub fn from_env(nproc_per_node: Option<usize>) -> Result<Ranks, ProcessError> {
        let world = std::env::var_os("WORLD_SIZE").map(|v| v.to_string_lossy().into_owned());
        match (nproc_per_node, world) {
            (Some(_), Some(world)) => Err(ProcessError::AlreadyLaunched(world)),
            (Some(0), None) => Err(ProcessError::ZeroProcesses),
            (Some(nproc), None) => Ok(Ranks::Launcher { nproc }),
            (None, Some(_)) => Ok(Ranks::Process(RendezvousConfig::from_env()?)),
            (None, None) => Ok(Ranks::Threads),
        }
    }

    /// How many ranks in all, where this process knows (`None` for threads: the chapter's flags
    /// say).
    pub fn world_size(&self) -> Option<usize> {
        match self {
            Ranks::Threads => None,
            Ranks::Launcher { nproc } => Some(*nproc),
            Ranks::Process(config) => Some(config.world_size),
        }
    }
}
// ANCHOR_END: ranks

// ANCHOR: run_rank
/// Runs this process's rank: meets the other processes, then runs `f` with the communicator.
/// Returns `f`'s result, or the first failure of the job as [`LaunchError`] (this rank's own,
/// or the peer's that made `f` fail), so that every process reports the same first failure.
/// While `f` runs, a watchdog ends the process (one line on standard error, exit status 1)
/// [`FAILURE_GRACE`] after a failure is known, if `f` has not returned by then.
pub fn run_rank<T, E: Display>(
    config: &RendezvousConfig,
    f: impl FnOnce(TcpComm) -> Result<T, E>,
) -> Result<T, LaunchError> {
    let me = config.rank;
    let failed = |message: String| LaunchError::Failed { rank: me, message };
    let timeout = rendezvous_timeout_from_env().map_err(|e| failed(e.to_string()))?;
    let comm = TcpComm::from_rendezvous(config, timeout).map_err(|e| failed(with_torchrun_hint(e.to_string())))?;
    // Keeps the connections open until this rank's failure, if any, is recorded for its goodbye.
    let guard = comm.guard();
    let watchdog = Watchdog::start(&comm);
    let outcome = catch_unwind(AssertUnwindSafe(|| f(comm)));
    watchdog.disarm();
    // The goodbye goes out when the guard drops, once the communicators are gone too.
    guard.wait_for_communicators(Duration::from_secs(1));
    let own = match outcome {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(e)) => LaunchError::Failed { rank: me, message: format!("{e:#}") },
        Err(payload) => LaunchError::Panicked { rank: me, message: super::launcher::panic_message(&*payload) },
    };
    // If a peer failed first, `f`'s error is only the consequence: name the peer.
    if let Some(super::CommError::PeerFailed { rank, reason }) = guard.failure()
        && rank != me
    {
        return Err(LaunchError::Failed { rank, message: reason });
    }
    let reason = match &own {
        LaunchError::Panicked { message, .. } => format!("panicked: {message}"),
        LaunchError::Failed { message, .. } => message.clone(),
    };
    guard.fail(reason);
    Err(own)
}
// ANCHOR_END: run_rank

// ANCHOR: all_gather_json
/// Every rank's `value`, in rank order, on every rank: how process ranks hand rank 0 what
/// thread ranks return to their launcher (their reports, their traces). A collective: every rank
/// calls it. The value travels as JSON, four bytes to an `f32` (their bits, which the
/// collectives copy and never compute with), padded to the longest rank's.
pub fn all_gather_json<T, C>(comm: &mut C, value: &T) -> Result<Vec<T>, CommError>
where
    T: Serialize + DeserializeOwned,
    C: Communicator + ?Sized,
{
    let n = comm.world_size();
    let bytes =
        serde_json::to_vec(value).map_err(|e| CommError::Backend(format!("encoding a value to gather: {e}")))?;
    let mut lengths = vec![0.0f32; n];
    comm.all_gather(&[f32::from_bits(bytes.len() as u32)], &mut lengths)?;
    let lengths: Vec<usize> = lengths.iter().map(|l| l.to_bits() as usize).collect();
    let words = lengths.iter().max().map_or(0, |&l| l.div_ceil(4));
    let mut mine = vec![0.0f32; words];
    for (word, chunk) in mine.iter_mut().zip(bytes.chunks(4)) {
        let mut four = [0u8; 4];
        four[..chunk.len()].copy_from_slice(chunk);
        *word = f32::from_bits(u32::from_le_bytes(four));
    }
    let mut all = vec![0.0f32; words * n];
    comm.all_gather(&mine, &mut all)?;
    all.chunks(words.max(1))
        .zip(&lengths)
        .enumerate()
        .map(|(rank, (words, &len))| {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_bits().to_le_bytes()).take(len).collect();
            serde_json::from_slice(&bytes)
                .map_err(|e| CommError::Backend(format!("decoding the value rank {rank} sent: {e}")))
        })
        .collect()
}
// ANCHOR_END: all_gather_json

/// Recent torchrun versions run a store of their own on `MASTER_PORT` (and tell their workers so
/// with `TORCHELASTIC_USE_AGENT_STORE`), where our rank 0 means to listen: say so when it is taken.
fn with_torchrun_hint(message: String) -> String {
    if message.contains("Address already in use") && std::env::var_os("TORCHELASTIC_USE_AGENT_STORE").is_some() {
        return format!(
            "{message} (torchrun's own store listens on MASTER_PORT: start the ranks with {NPROC_PER_NODE_FLAG}, or set the variables yourself)"
        );
    }
    message
}

/// The thread that ends a rank whose main thread does not notice a failure (it is computing).
struct Watchdog {
    disarmed: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(comm: &TcpComm) -> Watchdog {
        let disarmed = Arc::new(AtomicBool::new(false));
        let (watch, off) = (comm.failure_watch(), disarmed.clone());
        let watching = move || {
            let failure = loop {
                if off.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(failure) = watch.wait(Duration::from_millis(200)) {
                    break failure;
                }
            };
            std::thread::sleep(FAILURE_GRACE);
            if !off.load(Ordering::SeqCst) {
                eprintln!("error: {failure} (this rank was still computing: stopped after {FAILURE_GRACE:?})");
                std::process::exit(1);
            }
        };
        // Without the thread a failure is still seen, at the next collective.
        let _ = std::thread::Builder::new().name("rank watchdog".into()).spawn(watching);
        Watchdog { disarmed }
    }

    fn disarm(&self) {
        self.disarmed.store(true, Ordering::SeqCst);
    }
}

/// `args` without `flag` and its value (`--flag V` or `--flag=V`): what the launcher passes on.
pub fn without_flag(args: impl IntoIterator<Item = OsString>, flag: &str) -> Vec<OsString> {
    let mut kept = Vec::new();
    let mut args = args.into_iter();
    let with_value = format!("{flag}=");
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == flag {
            args.next();
        } else if !text.starts_with(&with_value) {
            kept.push(arg);
        }
    }
    kept
}

// ANCHOR: launch_this_program
/// `--nproc-per-node K`: starts this program K times, with the arguments it was given minus
/// that flag, as ranks 0..K of one job on this machine, and waits for them ([`launch`]).
pub fn launch_this_program(nproc: usize) -> Result<(), ProcessError> {
    let exe = std::env::current_exe().map_err(|e| ProcessError::Spawn(format!("this program's path: {e}")))?;
    let args = without_flag(std::env::args_os().skip(1), NPROC_PER_NODE_FLAG);
    launch(&exe, &args, nproc)
}
// ANCHOR_END: launch_this_program

/// A port on `addr` that nobody listens on now (the OS picks it; it stays free unless another
/// program takes it before rank 0 does).
fn free_port(addr: &str) -> Result<u16, ProcessError> {
    let listener =
        TcpListener::bind((addr, 0)).map_err(|e| ProcessError::Spawn(format!("a free port on {addr}: {e}")))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| ProcessError::Spawn(e.to_string()))
}

/// One rank process, its standard error's reader, and how it ended.
struct RankProcess {
    child: Child,
    /// Its last standard-error lines (rank 0's `error:` lines only: the rest went through).
    tail: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    ended: Option<(ExitStatus, Instant)>,
    /// The launcher killed it (after another rank failed): not a failure of its own.
    killed: bool,
}

/// Reads a rank's standard error line by line: rank 0's lines go to ours as they come, except
/// its `error:` lines; every rank's are kept (its last [`TAIL_LINES`]).
fn read_stderr(rank: Rank, stream: impl Read + Send + 'static, tail: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r']).to_string();
            if rank == 0 && !text.starts_with("error: ") {
                let _ = std::io::stderr().write_all(&line);
            }
            let mut kept = tail.lock().unwrap_or_else(|e| e.into_inner());
            if rank != 0 || text.starts_with("error: ") {
                kept.push(text);
                let excess = kept.len().saturating_sub(TAIL_LINES);
                kept.drain(..excess);
            }
            line.clear();
        }
    })
}

/// What a rank's exit says: its status in words.
fn describe(status: &ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let name = match signal {
                libc::SIGKILL => " (SIGKILL: killed, perhaps by the out-of-memory killer)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                _ => "",
            };
            return format!("killed by signal {signal}{name}");
        }
    }
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => status.to_string(),
    }
}

/// The one line a failed rank's standard error ends with, if any: its last `error:` line (the
/// binaries' one-line errors), or a panic's message.
fn error_line(lines: &[String]) -> Option<String> {
    if let Some(line) = lines.iter().rev().find_map(|l| l.strip_prefix("error: ")) {
        return Some(line.to_string());
    }
    let panicked = lines.iter().rposition(|l| l.contains("panicked at"))?;
    lines.get(panicked + 1).map(|message| format!("panicked: {message}"))
}

/// `rank N failed: why` or `rank N panicked: why`, the line every rank of a job prints, back
/// into the error it came from.
fn parse_rank_line(line: &str) -> Option<LaunchError> {
    let rest = line.strip_prefix("rank ")?;
    let (number, rest) = rest.split_once(' ')?;
    let rank = number.parse().ok()?;
    if let Some(message) = rest.strip_prefix("failed: ") {
        return Some(LaunchError::Failed { rank, message: message.to_string() });
    }
    rest.strip_prefix("panicked: ").map(|message| LaunchError::Panicked { rank, message: message.to_string() })
}

/// The first failure among ranks that ended: a rank killed by a signal (not by us) comes first,
/// since what the others saw was its death; otherwise the first rank to exit non-zero, which
/// names the first failure itself (see [`run_rank`]).
fn first_failure(ranks: &[RankProcess]) -> Option<LaunchError> {
    let mut failed: Vec<(Rank, &RankProcess, ExitStatus, Instant)> = ranks
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.killed)
        .filter_map(|(rank, p)| p.ended.filter(|(status, _)| !status.success()).map(|(s, at)| (rank, p, s, at)))
        .collect();
    failed.sort_by_key(|&(rank, _, status, at)| (status.code().is_some(), at, rank));
    let &(rank, process, status, _) = failed.first()?;
    let lines = process.tail.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let line = error_line(&lines);
    if status.code().is_none() {
        let message = describe(&status);
        return Some(LaunchError::Failed { rank, message });
    }
    Some(match line {
        Some(line) => parse_rank_line(&line).unwrap_or(LaunchError::Failed { rank, message: line }),
        None => LaunchError::Failed { rank, message: describe(&status) },
    })
}

// ANCHOR: launch
/// Starts `program` with `args` as `nproc` rank processes of one job on this machine (torchrun's
/// variables set for each; `MASTER_ADDR` and `MASTER_PORT` taken from our environment if set,
/// else 127.0.0.1 and a free port; `RAYON_NUM_THREADS` the cores divided among them, unless
/// set) and waits for all of them. When one fails, the others get
/// [`FAILURE_GRACE`] to end, and are killed after it; the error names the first failure.
pub fn launch(program: &Path, args: &[OsString], nproc: usize) -> Result<(), ProcessError> {
    if nproc == 0 {
        return Err(ProcessError::ZeroProcesses);
    }
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".to_string());
    let port = match std::env::var("MASTER_PORT") {
        Ok(port) => port,
        Err(_) => free_port(&addr)?.to_string(),
    };
    // Each rank computes on its share of the cores, as torchrun's OMP_NUM_THREADS does: K
    // processes that each start a thread per core only thrash. Our setting wins if given.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| (cores / nproc).max(1).to_string());
    let mut ranks: Vec<RankProcess> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("WORLD_SIZE", nproc.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", &port)
            .env("RAYON_NUM_THREADS", &threads)
            .stdin(Stdio::null())
            .stdout(if rank == 0 { Stdio::inherit() } else { Stdio::null() })
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                stop_all(&mut ranks);
                return Err(ProcessError::Spawn(format!("rank {rank} ({}): {e}", program.display())));
            }
        };
        let tail = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stderr.take().map(|stderr| read_stderr(rank, stderr, tail.clone()));
        ranks.push(RankProcess { child, tail, reader, ended: None, killed: false });
    }
    wait_all(&mut ranks);
    for process in &mut ranks {
        if let Some(reader) = process.reader.take() {
            let _ = reader.join(); // the pipe closed with the process
        }
    }
    first_failure(&ranks).map_or(Ok(()), |failure| Err(failure.into()))
}
// ANCHOR_END: launch

/// Waits for every rank; from the first failure on, for [`FAILURE_GRACE`] more, then kills the
/// ranks still running.
fn wait_all(ranks: &mut [RankProcess]) {
    let mut kill_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        for process in ranks.iter_mut().filter(|p| p.ended.is_none()) {
            match process.child.try_wait() {
                Ok(Some(status)) => process.ended = Some((status, now)),
                Ok(None) => {}
                // Cannot be watched: treat it as gone, and failed.
                Err(_) => {
                    let _ = process.child.kill();
                    process.ended = process.child.wait().ok().map(|s| (s, now));
                }
            }
            if process.ended.is_some_and(|(s, _)| !s.success()) && kill_at.is_none() {
                kill_at = Some(now + FAILURE_GRACE);
            }
        }
        if ranks.iter().all(|p| p.ended.is_some()) {
            return;
        }
        if kill_at.is_some_and(|at| now >= at) {
            stop_all(ranks);
            return;
        }
        std::thread::sleep(POLL);
    }
}

/// Kills every rank still running, and waits for it.
fn stop_all(ranks: &mut [RankProcess]) {
    for process in ranks.iter_mut().filter(|p| p.ended.is_none()) {
        let _ = process.child.kill();
        process.killed = true;
        process.ended = process.child.wait().ok().map(|s| (s, Instant::now()));
    }
}

/// On Linux, a rank dies with its launcher (killed, say), instead of training on unwatched.
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: `prctl` is async-signal-safe, and the closure touches nothing else.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn all_gather_json_hands_every_rank_every_value() {
        let results = crate::comm::thread::launch(3, |mut comm| {
            // Lengths that differ, and are not multiples of four.
            let mine: Vec<String> = (0..comm.rank() * 5 + 1).map(|i| format!("r{}-{i}", comm.rank())).collect();
            all_gather_json(&mut comm, &mine)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<Vec<String>> = (0..3).map(|r| (0..r * 5 + 1).map(|i| format!("r{r}-{i}")).collect()).collect();
        assert!(results.iter().all(|got| got == &want), "{results:?}");
    }

    #[test]
    fn the_launcher_flag_and_its_value_are_left_out() {
        let args = os(&["--dp", "2", "--nproc-per-node", "2", "--steps", "3", "--nproc-per-node=4", "--quiet"]);
        assert_eq!(without_flag(args, NPROC_PER_NODE_FLAG), os(&["--dp", "2", "--steps", "3", "--quiet"]));
    }

    #[test]
    fn a_rank_line_names_its_rank() {
        let failed = parse_rank_line("rank 3 failed: its connection closed");
        assert_eq!(failed, Some(LaunchError::Failed { rank: 3, message: "its connection closed".into() }));
        let panicked = parse_rank_line("rank 1 panicked: boom");
        assert_eq!(panicked, Some(LaunchError::Panicked { rank: 1, message: "boom".into() }));
        assert_eq!(parse_rank_line("rendezvous at x: refused"), None);
    }

    #[test]
    fn the_error_line_is_the_last_error_or_the_panic_message() {
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(error_line(&lines(&["step 1", "error: first", "error: last"])), Some("last".into()));
        let panic = lines(&["thread 'main' panicked at src/x.rs:1:2:", "boom", "note: run with RUST_BACKTRACE=1"]);
        assert_eq!(error_line(&panic), Some("panicked: boom".into()));
        assert_eq!(error_line(&lines(&["nothing to see"])), None);
    }
}
