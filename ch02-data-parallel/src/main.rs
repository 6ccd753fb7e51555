//! `ch02-data-parallel`: chapter 1's trainer on `--dp` ranks, gradients averaged by a bucketed
//! ring all-reduce that overlaps backward.

use ch01_single_gpu::cli::{CommonArgs, print_summary, run_main};
use ch02_data_parallel::{DpConfig, DpReport, Processes, check_config, train, train_process};
use clap::Parser;
use kernels::comm::process::{Ranks, launch_this_program};
use kernels::memory::format_bytes;
use std::process::ExitCode;

/// Train GPT-2 with data parallelism (chapter 2 of Scale from Scratch).
///
/// Every rank holds a replica and computes its share of each batch; gradients are summed with a
/// ring all-reduce, bucket by bucket while backward still runs. On the CPU the ranks are
/// threads. With the same seed and global batch, the losses are chapter 1's.
#[derive(Parser, Debug)]
#[command(version, about, long_about, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Data-parallel ranks [default: one per CPU core]. Must divide --batch-size.
    #[arg(long)]
    dp: Option<usize>,
    /// Gradient bucket size in MiB (0: one all-reduce after backward, no overlap).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    bucket_mb: f64,
    /// Draw the last step of every rank (compute and communication) as an SVG timeline.
    #[arg(long)]
    timeline: Option<std::path::PathBuf>,
    /// Run each rank as a process of its own (this program started K times, the ranks talking
    /// over TCP on 127.0.0.1) instead of a thread. Under torchrun, leave it out: the
    /// environment (WORLD_SIZE, RANK, ...) says the ranks are processes.
    #[arg(long, allow_negative_numbers = true)]
    nproc_per_node: Option<usize>,
}

fn print_data_parallel(r: &DpReport) {
    let n = r.dp as f64;
    println!("data parallel");
    println!("  ranks              {}", r.dp);
    println!("  gradient buffer    {} (all-reduced each step)", format_bytes(r.grad_bytes));
    let steps = r.report.steps.len() as f64;
    for rank in &r.ranks {
        let per_step = rank.comm.total_sent() as f64 / steps.max(1.0);
        println!(
            "  rank {:<3}           sent {} ({} per step; ring theory 2(n-1)/n x buffer = {}), peak memory {}",
            rank.rank,
            format_bytes(rank.comm.total_sent()),
            format_bytes(per_step as u64),
            format_bytes((2.0 * (n - 1.0) / n * r.grad_bytes as f64) as u64),
            format_bytes(rank.memory.peak_total),
        );
    }
    println!("  communication hidden by backward: {:.0}%", 100.0 * r.hidden_fraction());
}

// ANCHOR: run
fn run(cli: Cli) -> anyhow::Result<()> {
    let ranks = Ranks::from_env(cli.nproc_per_node)?;
    let outputs = cli.common.outputs.clone();
    let cfg =
        DpConfig { train: cli.common.into_config()?, dp: cli.dp, bucket_mb: cli.bucket_mb, timeline: cli.timeline };
    let report = match ranks {
        Ranks::Threads => {
            let compare = outputs.prepare()?;
            Some((train(&cfg)?, compare))
        }
        // Bad settings get their one line here, before any process starts.
        Ranks::Launcher { nproc } => {
            outputs.prepare()?;
            check_config(&cfg, Some(Processes { world: nproc, on_this_machine: nproc }))?;
            return Ok(launch_this_program(nproc)?);
        }
        // Rank 0 prints and writes for the run; the others only train.
        Ranks::Process(config) => {
            let compare = if config.rank == 0 { outputs.prepare()? } else { None };
            train_process(&cfg, &config)?.map(|report| (report, compare))
        }
    };
    let Some((report, compare)) = report else { return Ok(()) };
    print_summary(&report.report);
    print_data_parallel(&report);
    outputs.write(&report.run_report(&cfg), compare)
}
// ANCHOR_END: run

fn main() -> ExitCode {
    run_main::<Cli>(run)
}
