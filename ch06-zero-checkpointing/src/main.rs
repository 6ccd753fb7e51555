//! `ch06-zero-checkpointing`: chapter 2's data parallelism with ZeRO (the model state sharded
//! over the ranks) and activation checkpointing.

use ch01_single_gpu::cli::{CommonArgs, print_summary, run_main};
use ch06_zero_checkpointing::recompute::ActivationFloats;
use ch06_zero_checkpointing::zero::predict;
use ch06_zero_checkpointing::{Recompute, ZeroConfig, ZeroReport, ZeroStage, train};
use clap::Parser;
use kernels::Category;
use kernels::memory::format_bytes;
use std::process::ExitCode;

/// Train GPT-2 with ZeRO and activation checkpointing (chapter 6 of Scale from Scratch).
///
/// Data parallelism as in chapter 2, but the ranks share one copy of the model state instead of
/// keeping one each: --zero 1 shards Adam's moments, 2 also the gradients, 3 also the
/// parameters (each block gathered just before it runs). --recompute trades compute for
/// activation memory. On the CPU the ranks are threads. With the same seed and global batch,
/// the losses are chapter 1's.
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
}

// ANCHOR: print_memory
fn print_zero(r: &ZeroReport) {
    let n = r.dp as f64;
    let grad_bytes = 4 * r.units.iter().map(|u| u.padded(r.dp)).sum::<usize>() as u64;
    let padding: usize = r.units.iter().map(|u| u.padded(r.dp) - u.len()).sum();
    println!("zero");
    println!(
        "  ranks              {} (one data-parallel group), ZeRO stage {}, recompute {}",
        r.dp, r.zero, r.recompute
    );
    println!(
        "  units              {} (embeddings, each block, head), each sharded {} ways; padding {padding} floats",
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
        let baseline = state(&predict(ZeroStage::NONE, &r.units, r.dp, rank.rank)) + baseline_acts;
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

fn run(cli: Cli) -> anyhow::Result<()> {
    let outputs = cli.common.outputs.clone();
    let compare = outputs.prepare()?;
    let cfg = ZeroConfig { train: cli.common.into_config()?, dp: cli.dp, zero: cli.zero, recompute: cli.recompute };
    let report = train(&cfg)?;
    print_summary(&report.report);
    print_zero(&report);
    outputs.write(&report.run_report(&cfg), compare)
}

fn main() -> ExitCode {
    // `ch06-zero-checkpointing plan ...`: the planner (its own flags).
    if std::env::args_os().nth(1).is_some_and(|a| a == "plan") {
        return ch06_zero_checkpointing::plan::main();
    }
    run_main::<Cli>(run)
}
