//! Collectives benchmark for thread ranks, reported the way nccl-tests reports NCCL.
//!
//! ```text
//! cargo bench -p kernels --bench collectives                    # n = 2, 4; 1 KiB to 256 MiB
//! cargo bench -p kernels --bench collectives -- --max-size 16MiB --ranks 2,4,8 --ops all-reduce
//! COLLECTIVES_MAX_SIZE=4MiB cargo bench -p kernels              # the env var limits sizes too
//! cargo bench -p kernels --bench collectives -- --transports threads,tcp --ops all-reduce \
//!     --ranks 2 --min-size 16MiB --max-size 16MiB                # thread ranks beside TCP ranks
//! ```
//!
//! Options: `--ranks 2,4`, `--ops all-reduce,reduce-scatter,all-gather`, `--min-size 1KiB`,
//! `--max-size 256MiB` (sizes go up by 4x), `--transports threads,tcp` (thread ranks, the
//! default, or TCP ranks: threads of this process with their own sockets on the loopback
//! interface). The default run takes about 30 s on 2 cores.
//!
//! ## How to read it
//! - `size`: the bytes of the largest buffer of the call, as nccl-tests counts it: the buffer of
//!   an all-reduce, the input of a reduce-scatter, the output of an all-gather.
//! - `time`: per call, from a barrier until the slowest rank is done (a collective is done when
//!   every rank is), averaged over up to 200 calls in a row and the median of 5 such runs.
//! - `algbw` = size / time: how fast the caller's data went through, in GB/s (10^9 bytes).
//! - `busbw` = algbw · 2(n-1)/n for an all-reduce, algbw · (n-1)/n for a reduce-scatter or an
//!   all-gather: the bytes each rank's link really carried per second. A ring all-reduce of S
//!   bytes sends 2(n-1)/n · S per rank (see `kernels::comm::ring`), so busbw removes the factor
//!   that depends on n and is comparable with the hardware's peak bandwidth, and across n: a
//!   busbw that stays flat as n grows means the algorithm scales. Here the "link" is memory: a
//!   message is a copy into a buffer, a receive a copy or an add out of it, and all n ranks share
//!   the same cores and memory bus, so expect busbw to fall as n grows past the core count.
//! - Small sizes measure latency (thread wake-ups: microseconds), not bandwidth.

use kernels::comm::rendezvous::RendezvousConfig;
use kernels::comm::tcp::TcpComm;
use kernels::comm::thread::launch;
use kernels::comm::{CommError, Communicator, ReduceOp};
use std::net::TcpListener;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
}

impl Op {
    fn parse(name: &str) -> Result<Op, String> {
        match name {
            "all-reduce" => Ok(Op::AllReduce),
            "reduce-scatter" => Ok(Op::ReduceScatter),
            "all-gather" => Ok(Op::AllGather),
            _ => Err(format!("unknown collective {name:?} (all-reduce, reduce-scatter, all-gather)")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all-reduce",
            Op::ReduceScatter => "reduce-scatter",
            Op::AllGather => "all-gather",
        }
    }

    // ANCHOR: bus_factor
    /// busbw / algbw, as nccl-tests defines it.
    fn bus_factor(self, n: usize) -> f64 {
        let ring = (n - 1) as f64 / n as f64;
        if self == Op::AllReduce { 2.0 * ring } else { ring }
    }
    // ANCHOR_END: bus_factor
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    Threads,
    Tcp,
}

impl Transport {
    fn parse(name: &str) -> Result<Transport, String> {
        match name {
            "threads" => Ok(Transport::Threads),
            "tcp" => Ok(Transport::Tcp),
            _ => Err(format!("unknown transport {name:?} (threads, tcp)")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Transport::Threads => "threads",
            Transport::Tcp => "tcp",
        }
    }
}

struct Options {
    transports: Vec<Transport>,
    ranks: Vec<usize>,
    ops: Vec<Op>,
    min_size: usize,
    max_size: usize,
}

/// `"16MiB"`, `"16M"`, `"1KiB"`, `"4096"` -> bytes.
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("size {text:?}: use bytes, KiB, MiB or GiB")),
    };
    digits.parse::<usize>().map(|v| v << shift).map_err(|e| format!("size {text:?}: {e}"))
}

fn list<T>(text: &str, item: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    text.split(',').map(|s| item(s.trim())).collect()
}

fn parse_options() -> Result<Options, String> {
    let max_size = std::env::var("COLLECTIVES_MAX_SIZE").map_or(Ok(256 << 20), |s| parse_size(&s))?;
    let mut o = Options {
        transports: vec![Transport::Threads],
        ranks: vec![2, 4],
        ops: vec![Op::AllReduce, Op::ReduceScatter, Op::AllGather],
        min_size: 1 << 10,
        max_size,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        // `cargo bench` passes `--bench` to every bench binary.
        if flag == "--bench" {
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--ranks" => {
                o.ranks = list(&value, |s| s.parse().map_err(|e| format!("ranks {s:?}: {e}")))?;
            }
            "--ops" => o.ops = list(&value, Op::parse)?,
            "--transports" => o.transports = list(&value, Transport::parse)?,
            "--min-size" => o.min_size = parse_size(&value)?,
            "--max-size" => o.max_size = parse_size(&value)?,
            _ => return Err(format!("unknown option {flag} (--transports, --ranks, --ops, --min-size, --max-size)")),
        }
    }
    if o.ranks.contains(&0) || o.min_size < 4 {
        return Err("ranks and sizes must be positive (sizes of at least one f32)".into());
    }
    Ok(o)
}

/// Timed repetitions; the median of them is reported.
const REPS: usize = 5;

/// Calls per timed repetition: small collectives run back to back and the time is divided by
/// their number (as nccl-tests does), so a thread's wake-up after the barrier is spread over
/// many calls instead of dominating one.
fn calls_per_rep(size: usize) -> usize {
    ((16 << 20) / size).clamp(1, 200)
}

/// One rank's time per call of `op` on a buffer of `count` values, for each repetition.
fn time_calls(comm: &mut dyn Communicator, op: Op, count: usize, calls: usize) -> Result<Vec<Duration>, CommError> {
    let n = comm.world_size();
    let mut big = vec![1.0f32; count];
    let mut small = vec![1.0f32; count / n];
    let mut once = |comm: &mut dyn Communicator| match op {
        Op::AllReduce => comm.all_reduce(&mut big, ReduceOp::Sum),
        Op::ReduceScatter => comm.reduce_scatter(&big, &mut small, ReduceOp::Sum),
        Op::AllGather => comm.all_gather(&small, &mut big),
    };
    once(comm)?; // warm up: page in the buffers, fill the spare message buffers
    (0..REPS)
        .map(|_| {
            comm.barrier()?;
            let start = Instant::now();
            for _ in 0..calls {
                once(comm)?;
            }
            Ok(start.elapsed() / calls as u32)
        })
        .collect()
}

/// [`time_calls`] on `n` TCP ranks, threads of this process meeting on a free loopback port.
fn tcp_times(n: usize, op: Op, count: usize, calls: usize) -> Result<Vec<Vec<Duration>>, String> {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
    let ranks: Vec<_> = (0..n)
        .map(|rank| {
            let master_addr = "127.0.0.1".to_string();
            let config = RendezvousConfig { world_size: n, rank, local_rank: rank, master_addr, master_port: port };
            std::thread::spawn(move || {
                let mut comm = TcpComm::from_rendezvous(&config, Duration::from_secs(20))?;
                time_calls(&mut comm, op, count, calls)
            })
        })
        .collect();
    let joined = ranks.into_iter().map(|h| h.join().map_err(|_| "a TCP rank panicked".to_string()));
    joined.map(|times| times.and_then(|t| t.map_err(|e| e.to_string()))).collect()
}

/// The median over repetitions of the slowest rank's time for one `op` on `n` ranks.
fn measure(transport: Transport, op: Op, n: usize, size: usize) -> Result<Duration, String> {
    // Whole f32s, and a count the n ranks divide (the collectives' contract for these two).
    let count = size / 4 / n * n;
    let calls = calls_per_rep(size);
    let times = match transport {
        Transport::Threads => {
            launch(n, move |mut comm| time_calls(&mut comm, op, count, calls)).map_err(|e| e.to_string())?
        }
        Transport::Tcp => tcp_times(n, op, count, calls)?,
    };
    let mut slowest: Vec<Duration> = (0..REPS).map(|i| times.iter().map(|t| t[i]).max().unwrap_or_default()).collect();
    slowest.sort();
    Ok(slowest[REPS / 2])
}

fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn main() -> Result<(), String> {
    let o = parse_options()?;
    // The transport column only where there is a choice: the default table stays as it was.
    let show_transport = o.transports != [Transport::Threads];
    let transport = |name: &str| if show_transport { format!("{name:<9} ") } else { String::new() };
    println!(
        "{}{:<15} {:>5} {:>9} {:>12} {:>12} {:>12}",
        transport("transport"),
        "collective",
        "ranks",
        "size",
        "time (us)",
        "algbw GB/s",
        "busbw GB/s"
    );
    for &op in &o.ops {
        for &n in &o.ranks {
            let mut size = o.min_size;
            while size <= o.max_size {
                for &t in &o.transports {
                    let time = measure(t, op, n, size)?;
                    let algbw = size as f64 / time.as_secs_f64() / 1e9;
                    let (label, micros) = (size_label(size), time.as_secs_f64() * 1e6);
                    let (name, busbw) = (transport(t.name()), algbw * op.bus_factor(n));
                    println!("{name}{:<15} {n:>5} {label:>9} {micros:>12.1} {algbw:>12.2} {busbw:>12.2}", op.name());
                }
                size *= 4;
            }
        }
    }
    Ok(())
}
