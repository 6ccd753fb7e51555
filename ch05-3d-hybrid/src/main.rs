//! `ch05-3d-hybrid`: chapter 1's model on a `--dp x --tp x --pp` grid of ranks.

use ch01_single_gpu::cli::{CommonArgs, print_summary, run_main};
use ch04_pipeline::PipelineConfig;
use ch04_pipeline::schedule::ScheduleKind;
use ch04_pipeline::stage::Partition;
use ch05_3d_hybrid::cost::{
    data_bytes_per_step, pipeline_bytes_per_evaluation, pipeline_bytes_per_step, tensor_bytes_per_evaluation,
    tensor_bytes_per_step,
};
use ch05_3d_hybrid::hybrid::{check_launch, held, train_this_process};
use ch05_3d_hybrid::{HybridConfig, HybridReport, train};
use clap::Parser;
use kernels::Category;
use kernels::comm::Collective;
use kernels::comm::process::{Ranks, launch_this_program};
use kernels::comm::rendezvous::RendezvousConfig;
use kernels::memory::format_bytes;
use std::path::PathBuf;
use std::process::ExitCode;

/// Train GPT-2 with data, tensor and pipeline parallelism at once (chapter 5 of Scale from
/// Scratch).
///
/// The ranks form a dp x tp x pp grid (rank = tp + TP·(dp + DP·pp)): the model's blocks are cut
/// into --pp pipeline stages (chapter 4), each stage is split across --tp tensor-parallel ranks
/// (chapter 3), and --dp copies of the whole pipe each compute a share of every batch and sum
/// their gradients (chapter 2). On the CPU the ranks are threads. With the same seed and global
/// batch, the losses are chapter 1's. With none of --dp, --tp, --pp, it runs dp 1 x tp 2 x pp 2.
#[derive(Parser, Debug)]
#[command(version, about, long_about, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Data-parallel replicas of the pipe (1 if another grid flag is given).
    #[arg(long)]
    dp: Option<usize>,
    /// Tensor-parallel ranks per stage; must divide the heads, the MLP width and the padded
    /// vocabulary (1 if another grid flag is given).
    #[arg(long)]
    tp: Option<usize>,
    /// Pipeline stages; at most the model's number of blocks (1 if another grid flag is given).
    #[arg(long)]
    pp: Option<usize>,
    /// Micro-batches each pipe's share of a batch is split into; --microbatches x --dp must
    /// divide --batch-size.
    #[arg(long, default_value_t = 4)]
    microbatches: usize,
    /// The pipeline schedule: gpipe, 1f1b, or interleaved (over --virtual-stages chunks).
    #[arg(long, value_enum, default_value_t = ScheduleKind::OneFOneB)]
    schedule: ScheduleKind,
    /// Model chunks per stage, for --schedule interleaved.
    #[arg(long, default_value_t = 1)]
    virtual_stages: usize,
    /// How blocks are divided among stages: the same number each, or by estimated cost.
    #[arg(long, value_enum, default_value_t = Partition::Uniform)]
    partition: Partition,
    /// Draw the last training step of the first pipe's stages, as measured, as an SVG timeline.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Run each rank as a process of its own (this program started K times, the ranks talking
    /// over TCP on 127.0.0.1) instead of a thread; K must be the grid's size. Under torchrun or
    /// another launcher, leave it out: the environment (WORLD_SIZE, RANK, ...) says the ranks
    /// are processes.
    #[arg(long, allow_negative_numbers = true)]
    nproc_per_node: Option<usize>,
}

/// The grid the flags ask for: what is given, 1 for the rest; with none given, the smallest
/// grid that has all three kinds of group but data (which would double it to 8 ranks).
fn grid_flags(cli: &Cli) -> (usize, usize, usize, bool) {
    match (cli.dp, cli.tp, cli.pp) {
        (None, None, None) => (1, 2, 2, true),
        (dp, tp, pp) => (dp.unwrap_or(1), tp.unwrap_or(1), pp.unwrap_or(1), false),
    }
}

// ANCHOR: print_grid
fn print_grid(r: &HybridReport, val_batches: usize) {
    let (steps, evaluations) = (r.report.steps.len() as u64, r.report.val_losses.len() as u64);
    println!("{}", r.grid);
    println!(
        "  bytes sent per rank: per step by the formula, and in the whole run measured beside the formula ({steps} steps, {evaluations} evaluation{})",
        if evaluations == 1 { "" } else { "s" }
    );
    for rank in &r.ranks {
        let s = rank;
        let tp_sent = s.tensor_comm.total_sent();
        let pp_sent = s.pipe_comm.sent.get(&Collective::SendRecv).copied().unwrap_or(0);
        let tp_total =
            steps * tensor_bytes_per_step(r, s) + evaluations * tensor_bytes_per_evaluation(r, s, val_batches);
        let pp_total =
            steps * pipeline_bytes_per_step(r, s) + evaluations * pipeline_bytes_per_evaluation(r, s, val_batches);
        println!(
            "  rank {:<2} (dp {}, tp {}, pp {}) tensor {}/step (run: {} measured, {} formula) | pipeline {}/step (run: {}, {}) | data {}/step (run: {})",
            rank.rank,
            rank.coords.dp,
            rank.coords.tp,
            rank.coords.pp,
            format_bytes(tensor_bytes_per_step(r, s)),
            format_bytes(tp_sent),
            format_bytes(tp_total),
            format_bytes(pipeline_bytes_per_step(r, s)),
            format_bytes(pp_sent),
            format_bytes(pp_total),
            format_bytes(data_bytes_per_step(r, s)),
            format_bytes(s.data_comm.total_sent()),
        );
    }
    println!(
        "  formulas, for a stage of L_s blocks, m micro-batches of bt tokens, groups of n tensor and d data ranks:"
    );
    println!(
        "    tensor   2(n-1)/n x 4 B x m x (4·L_s·bt·C + bt·C on the first stage + (bt·C + 2·bt) on the last) + gathers"
    );
    println!("    pipeline 4 B x m x bt·C per boundary each way; data 2(d-1)/d x 4 B x the stage's shard (+ the loss)");
    let (n, m, v) = (r.grid.pp as f64, r.plan.micro_per_step as f64, r.ranks[0].blocks.len() as f64);
    println!(
        "  bubble             {:.1}% simulated (theory (p-1)/(v·m+p-1) = {:.1}%), {:.1}% with the stages' estimated costs{}",
        100.0 * r.plan.bubble,
        100.0 * (n - 1.0) / (v * m + n - 1.0),
        100.0 * r.plan.bubble_estimated,
        r.measured_bubble.map_or(String::new(), |b| format!(", {:.1}% measured", 100.0 * b)),
    );
    println!("  memory per rank at its peak");
    for rank in &r.ranks {
        println!(
            "  rank {:<2} blocks {} | {} parameters ({} floats: its stage's shard), gradients {}, optimizer {}, activations {}, communication {}, peak {}",
            rank.rank,
            rank.blocks.iter().map(|b| format!("{b:?}")).collect::<Vec<_>>().join(" + "),
            format_bytes(held(rank, Category::Parameters)),
            rank.shard_floats,
            format_bytes(held(rank, Category::Gradients)),
            format_bytes(held(rank, Category::OptimizerState)),
            format_bytes(held(rank, Category::Activations)),
            format_bytes(held(rank, Category::Communication)),
            format_bytes(rank.memory.peak_total),
        );
    }
}
// ANCHOR_END: print_grid

// ANCHOR: run
fn run(cli: Cli) -> anyhow::Result<()> {
    let ranks = Ranks::from_env(cli.nproc_per_node)?;
    let (dp, tp, pp, chosen) = grid_flags(&cli);
    // Under a launcher every process runs this: rank 0 speaks for them (and for the launcher).
    if chosen && matches!(&ranks, Ranks::Threads | Ranks::Process(RendezvousConfig { rank: 0, .. })) {
        let how = if ranks == Ranks::Threads { "thread ranks" } else { "processes" };
        println!(
            "no --dp/--tp/--pp given: running dp 1 x tp 2 x pp 2 (4 {how}), the smallest grid with tensor and pipeline groups (add --dp 2 for data-parallel ones)"
        );
    }
    let outputs = cli.common.outputs.clone();
    let pipeline = PipelineConfig {
        train: cli.common.into_config()?,
        pp,
        microbatches: cli.microbatches,
        dp,
        schedule: cli.schedule,
        virtual_stages: cli.virtual_stages,
        partition: cli.partition,
        timeline: cli.timeline.clone(),
        skip_tied_sum: false,
    };
    let cfg = HybridConfig { pipeline, tp, fault: None, shard_optimizer: false };
    let (report, compare) = match ranks {
        Ranks::Threads => {
            let compare = outputs.prepare()?;
            (train(&cfg)?, compare)
        }
        // Bad settings get their one line here, before any process starts.
        Ranks::Launcher { nproc } => {
            outputs.prepare()?;
            check_launch(&cfg, nproc)?;
            return Ok(launch_this_program(nproc)?);
        }
        // One rank of the job: rank 0 prints and writes for the run; the others only train.
        Ranks::Process(config) => {
            let compare = if config.rank == 0 { outputs.prepare()? } else { None };
            match train_this_process(&cfg, &config)? {
                Some(report) => (report, compare),
                None => return Ok(()),
            }
        }
    };
    print_summary(&report.report);
    print_grid(&report, cfg.pipeline.train.val_batches);
    outputs.write(&report.run_report(&cfg), compare)
}
// ANCHOR_END: run

fn main() -> ExitCode {
    run_main::<Cli>(run)
}
