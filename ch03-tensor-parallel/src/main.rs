//! `ch03-tensor-parallel`: chapter 1's model split across `--tp` ranks, Megatron's way.

use ch01_single_gpu::cli::{CommonArgs, print_summary, run_main};
use ch03_tensor_parallel::{TpConfig, TpReport, train};
use clap::Parser;
use kernels::Category;
use kernels::memory::format_bytes;
use std::process::ExitCode;

/// Train GPT-2 with tensor parallelism (chapter 3 of Scale from Scratch).
///
/// Every block is split across the ranks: each computes some of the heads and part of the
/// MLP, and holds a share of the vocabulary; two sums per block in forward and two in backward
/// join them. On the CPU the ranks are threads. With the same seed and batch, the losses are
/// chapter 1's.
#[derive(Parser, Debug)]
#[command(version, about, long_about, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Tensor-parallel ranks. Must divide the attention heads, the MLP width and the padded
    /// vocabulary.
    #[arg(long, default_value_t = 2)]
    tp: usize,
    /// Data-parallel replicas of the tensor-parallel group (tp x dp thread ranks in all). Must
    /// divide --batch-size.
    #[arg(long, default_value_t = 1)]
    dp: usize,
    /// Split the residual stream (the LayerNorms and the residual adds) by tokens as well:
    /// all-gathers and reduce-scatters in place of the all-reduces, the same bytes, less
    /// activation memory. The tokens of a micro-batch (batch / dp x seq_len) must divide by --tp.
    #[arg(long)]
    sequence_parallel: bool,
}

fn print_tensor_parallel(r: &TpReport) {
    let steps = r.report.steps.len().max(1) as u64;
    println!("tensor parallel");
    println!("  ranks              {} x {} (tp x dp; rank = tp_rank + tp x dp_rank)", r.tp, r.dp);
    let how = match r.sequence_parallel {
        true => {
            "2 all-gathers and 2 reduce-scatters of B·T·C per block each way, plus the embedding's and the head's, and the LayerNorms' gradients"
        }
        false => "2 all-reduces of B·T·C per block each way, plus the embedding's and the head's",
    };
    println!("  sent per step      {} per rank by the formula ({how})", format_bytes(r.bytes_sent_per_step()));
    if let Some(ms) = r.ranks.first().and_then(|rank| rank.sample_ms_per_token) {
        println!("  sample             generated on the shards, {ms:.1} ms per token");
    }
    for rank in &r.ranks {
        let held = |c| rank.memory.at_peak.get(&c).copied().unwrap_or(0);
        println!(
            "  rank {:<3} (tp {}, dp {}) sent {} per step ({} in all, with evaluation and gathers), data-parallel {} in all, peak memory {} (parameters {}, gradients {}, optimizer {}, activations {})",
            rank.rank,
            rank.tp_rank,
            rank.dp_rank,
            format_bytes(rank.sent_in_steps / steps),
            format_bytes(rank.comm.total_sent()),
            format_bytes(rank.dp_comm.total_sent()),
            format_bytes(rank.memory.peak_total),
            format_bytes(held(Category::Parameters)),
            format_bytes(held(Category::Gradients)),
            format_bytes(held(Category::OptimizerState)),
            format_bytes(held(Category::Activations)),
        );
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let outputs = cli.common.outputs.clone();
    let compare = outputs.prepare()?;
    let (tp, dp, sequence_parallel) = (cli.tp, cli.dp, cli.sequence_parallel);
    let cfg = TpConfig { train: cli.common.into_config()?, tp, dp, sequence_parallel, fault: None };
    let report = train(&cfg)?;
    print_summary(&report.report);
    print_tensor_parallel(&report);
    outputs.write(&report.run_report(&cfg), compare)
}

fn main() -> ExitCode {
    run_main::<Cli>(run)
}
