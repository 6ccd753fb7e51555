//! `ch06-zero-checkpointing`: chapter 2's data parallelism with ZeRO (the model state sharded
//! over the ranks) and activation checkpointing.

use ch01_single_gpu::cli::{CommonArgs, RunOutputs, print_summary, run_main};
use ch01_single_gpu::plot::LossCurves;
use ch04_pipeline::schedule::ScheduleKind;
use ch05_3d_hybrid::HybridReport;
use ch06_zero_checkpointing::recompute::ActivationFloats;
use ch06_zero_checkpointing::zero::predict;
use ch06_zero_checkpointing::{
    GridShape, Ran, Recompute, ZeroConfig, ZeroReport, ZeroStage, check_launch, pipelined_config, train_on_grid,
    train_pipelined, train_this_process,
};
use clap::Parser;
use kernels::Category;
use kernels::comm::process::{Ranks, launch_this_program};
use kernels::memory::format_bytes;
use std::process::ExitCode;

/// Train GPT-2 with ZeRO and activation checkpointing (chapter 6 of Scale from Scratch).
///
/// Data parallelism as in chapter 2, but the ranks share one copy of the model state instead of
/// keeping one each: --zero 1 shards Adam's moments, 2 also the gradients, 3 also the
/// parameters (each block gathered just before it runs). --recompute trades compute for
/// activation memory. With --tp, ZeRO shards each tensor rank's own parameters over its
/// data-parallel group (every stage); with --pp, the run is chapter 5's pipeline with ZeRO-1
/// over each data-parallel group (stages 2 and 3 are refused: see the error). On the CPU the
/// ranks are threads, or processes with --nproc-per-node (or under torchrun). With the same seed
/// and global batch, the losses are chapter 1's.
#[derive(Parser, Debug)]
#[command(version, about, long_about, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Data-parallel ranks. Must divide --batch-size.
    #[arg(long, default_value_t = 2)]
    dp: usize,
    /// ZeRO stage: 0 (plain data parallelism), 1 (optimizer state sharded), 2 (+ gradients),
    /// 3 (+ parameters).
    #[arg(long, default_value_t = 1)]
    zero: u8,
    /// What backward recomputes: none, selective (the attention matrices), full (each block).
    #[arg(long, value_enum, default_value_t = Recompute::None)]
    recompute: Recompute,
    #[command(flatten)]
    grid: GridArgs,
    /// Run each rank as a process of its own (this program started K times, the ranks talking
    /// over TCP on 127.0.0.1) instead of a thread; K must be the grid's size (--dp x --tp x
    /// --pp). Under torchrun or another launcher, leave it out: the environment (WORLD_SIZE,
    /// RANK, ...) says the ranks are processes.
    #[arg(long, allow_negative_numbers = true)]
    nproc_per_node: Option<usize>,
}

/// Chapter 5's grid flags beside --dp.
#[derive(clap::Args, Debug)]
struct GridArgs {
    /// Tensor-parallel ranks; must divide the heads, the MLP width and the padded vocabulary.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline stages; at most the model's number of blocks. With more than one, --zero must
    /// be 0 or 1.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Micro-batches each pipe's share of a batch is split into (with --pp; default 4 there,
    /// 1 without).
    #[arg(long)]
    microbatches: Option<usize>,
    /// The pipeline schedule (with --pp): gpipe or 1f1b.
    #[arg(long, value_enum, default_value_t = ScheduleKind::OneFOneB)]
    schedule: ScheduleKind,
}

impl GridArgs {
    fn shape(&self) -> GridShape {
        let microbatches = self.microbatches.unwrap_or(if self.pp > 1 { 4 } else { 1 });
        GridShape { tp: self.tp, pp: self.pp, microbatches, schedule: self.schedule }
    }
}

// ANCHOR: print_memory
fn print_zero(r: &ZeroReport) {
    let n = r.dp as f64;
    let grad_bytes = 4 * r.units.iter().map(|u| u.padded(r.dp)).sum::<usize>() as u64;
    let padding: usize = r.units.iter().map(|u| u.padded(r.dp) - u.len()).sum();
    println!("zero");
    let groups = match r.tp {
        1 => "one data-parallel group".to_string(),
        tp => format!("x tp {tp}: {tp} data-parallel groups, one per tensor rank"),
    };
    println!("  ranks              {} ({groups}), ZeRO stage {}, recompute {}", r.dp, r.zero, r.recompute);
    let whose = if r.tp > 1 { " of a tensor rank's shard" } else { "" };
    println!(
        "  units              {} (embeddings, each block, head){whose}, each sharded {} ways; padding {padding} floats",
        r.units.len(),
        r.dp
    );
    let ring = (2.0 * (n - 1.0) / n * grad_bytes as f64) as u64;
    let act_bytes = |f: ActivationFloats| (f.total() * r.tokens_per_rank * 4) as u64;
    let baseline_acts = act_bytes(ActivationFloats::new(&r.report.model, r.seq_len, Recompute::None));
    for (i, rank) in r.ranks.iter().enumerate() {
        // Ranks that hold and send what the one before them does are said once.
        let same = |a: &ch06_zero_checkpointing::ZeroRankReport| {
            (&a.memory.peak, &a.predicted, a.step_comm.total_sent())
                == (&rank.memory.peak, &rank.predicted, rank.step_comm.total_sent())
        };
        if i > 0 && same(&r.ranks[i - 1]) {
            if r.ranks.get(i + 1).is_none_or(|next| !same(next)) {
                let first = r.ranks[..i].iter().rposition(|a| !same(a)).map_or(0, |k| k + 1);
                let which = match first + 1 == rank.rank {
                    true => format!("rank {}", rank.rank),
                    false => format!("ranks {}-{}", first + 1, rank.rank),
                };
                println!("  {which:<18} as rank {first}");
            }
            continue;
        }
        let peak = |c| rank.memory.peak.get(&c).copied().unwrap_or(0);
        let step_sent = rank.step_comm.total_sent();
        println!(
            "  rank {:<3}           sent {} in the last step; formula: {}(N-1)/N x gradients = {}{}",
            rank.rank,
            format_bytes(step_sent),
            if r.zero.shards_parameters() { 3 } else { 2 },
            format_bytes(if r.zero.shards_parameters() { ring * 3 / 2 } else { ring }),
            if r.zero.shards_parameters() {
                " (parameters gathered twice, gradients reduce-scattered once)"
            } else {
                ""
            },
        );
        for category in [Category::Parameters, Category::Gradients, Category::OptimizerState, Category::Communication] {
            println!(
                "    {:<16} {:>11}   formula: {}",
                category.to_string(),
                format_bytes(peak(category)),
                rank.predicted.describe(category)
            );
        }
        println!(
            "    {:<16} {:>11}   formula: ({} per block x {} + {} recompute + {} rest) floats x {} tokens x 4",
            "activations",
            format_bytes(peak(Category::Activations)),
            r.activations.per_block,
            r.activations.blocks,
            r.activations.recompute,
            r.activations.rest,
            r.tokens_per_rank,
        );
        // The same rank at --zero 0 --recompute none, by the same formulas.
        let state = |p: &ch06_zero_checkpointing::zero::Prediction| {
            [Category::Parameters, Category::Gradients, Category::OptimizerState, Category::Communication]
                .map(|c| p.bytes(c))
                .iter()
                .sum::<u64>()
        };
        let now = state(&rank.predicted) + act_bytes(r.activations);
        let baseline = state(&predict(ZeroStage::NONE, &r.units, r.dp, rank.dp_rank)) + baseline_acts;
        let saving = baseline.saturating_sub(now);
        println!(
            "    {:<16} {:>11}   vs {} at --zero 0 --recompute none: saves {} ({:.0}%)",
            "model + acts",
            format_bytes(now),
            format_bytes(baseline),
            format_bytes(saving),
            100.0 * saving as f64 / baseline.max(1) as f64
        );
    }
}
// ANCHOR_END: print_memory

// ANCHOR: print_pipelined
/// With pipelines: each rank's optimizer state beside ZeRO-1's formula for its stage (8 bytes
/// for each of its shard's floats, ⌈Ψ_s/N⌉ or fewer for the last replicas).
fn print_pipelined(r: &HybridReport, zero: u8) {
    let g = r.grid;
    println!("zero");
    println!(
        "  grid               dp {} x tp {} x pp {}, ZeRO stage {zero} over each data-parallel group",
        g.dp, g.tp, g.pp
    );
    for rank in r.ranks.iter().filter(|rank| rank.coords.tp == 0) {
        let (total, at) = (rank.shard_floats, rank.coords);
        let owned = match zero {
            0 => total,
            _ => {
                let s = total.div_ceil(g.dp);
                ((at.dp + 1) * s).min(total) - (at.dp * s).min(total)
            }
        };
        let held = rank.memory.peak.get(&Category::OptimizerState).copied().unwrap_or(0);
        println!(
            "  rank {:<3} (dp {}, pp {}) optimizer state {:>11}   formula: 8 x {owned} floats (stage {} holds Ψ_s = {total})",
            rank.rank,
            at.dp,
            at.pp,
            format_bytes(held),
            at.pp
        );
    }
}
// ANCHOR_END: print_pipelined

// ANCHOR: run
fn run(cli: Cli) -> anyhow::Result<()> {
    let ranks = Ranks::from_env(cli.nproc_per_node)?;
    let outputs = cli.common.outputs.clone();
    let grid = cli.grid.shape();
    let cfg = ZeroConfig { train: cli.common.into_config()?, dp: cli.dp, zero: cli.zero, recompute: cli.recompute };
    let compare = match ranks {
        // Bad settings get their one line here, before any process starts.
        Ranks::Launcher { nproc } => {
            outputs.prepare()?;
            check_launch(&cfg, &grid, nproc)?;
            return Ok(launch_this_program(nproc)?);
        }
        // One rank of the job: rank 0 prints and writes for the run; the others only train.
        Ranks::Process(config) => {
            let compare = if config.rank == 0 { outputs.prepare()? } else { None };
            let Some(ran) = train_this_process(&cfg, &grid, &config)? else { return Ok(()) };
            return match ran {
                Ran::Grid(report) => print_grid_run(&cfg, &report, &outputs, compare),
                Ran::Pipelined(report) => print_pipelined_run(&cfg, &grid, &report, &outputs, compare),
            };
        }
        Ranks::Threads if grid.pp > 1 => {
            pipelined_config(&cfg, &grid)?; // ZeRO's refusals, before anything starts
            let compare = outputs.prepare()?;
            let report = train_pipelined(&cfg, &grid)?;
            return print_pipelined_run(&cfg, &grid, &report, &outputs, compare);
        }
        Ranks::Threads => outputs.prepare()?,
    };
    let report = train_on_grid(&cfg, &grid)?;
    print_grid_run(&cfg, &report, &outputs, compare)
}
// ANCHOR_END: run

fn print_grid_run(
    cfg: &ZeroConfig,
    report: &ZeroReport,
    outputs: &RunOutputs,
    compare: Option<LossCurves>,
) -> anyhow::Result<()> {
    print_summary(&report.report);
    print_zero(report);
    outputs.write(&report.run_report(cfg), compare)
}

fn print_pipelined_run(
    cfg: &ZeroConfig,
    grid: &GridShape,
    report: &HybridReport,
    outputs: &RunOutputs,
    compare: Option<LossCurves>,
) -> anyhow::Result<()> {
    let hybrid = pipelined_config(cfg, grid)?;
    print_summary(&report.report);
    print_pipelined(report, cfg.zero);
    // Chapter 5's report, said to be this chapter's run, with its ZeRO stage.
    let mut run_report = report.run_report(&hybrid);
    run_report.chapter = "ch06-zero-checkpointing".into();
    run_report.extra.insert("zero".into(), serde_json::json!(cfg.zero));
    outputs.write(&run_report, compare)
}

fn main() -> ExitCode {
    // `ch06-zero-checkpointing plan ...`: the planner (its own flags).
    if std::env::args_os().nth(1).is_some_and(|a| a == "plan") {
        return ch06_zero_checkpointing::plan::main();
    }
    run_main::<Cli>(run)
}
