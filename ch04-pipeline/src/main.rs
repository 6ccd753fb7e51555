//! `ch04-pipeline`: chapter 1's model cut into `--pp` stages of contiguous blocks, the batch
//! into `--microbatches` micro-batches, run by a schedule that is data.

use ch01_single_gpu::cli::{CommonArgs, print_summary, run_main};
use ch04_pipeline::schedule::ScheduleKind;
use ch04_pipeline::simulate::{Costs, simulate};
use ch04_pipeline::stage::Partition;
use ch04_pipeline::{PipelineConfig, PipelineReport, Schedule, train};
use clap::Parser;
use kernels::comm::Collective;
use kernels::memory::format_bytes;
use std::path::PathBuf;
use std::process::ExitCode;

/// Train GPT-2 with pipeline parallelism (chapter 4 of Scale from Scratch).
///
/// Each stage holds a contiguous range of blocks (the first also the embeddings, the last the
/// final LayerNorm and the tied output projection); micro-batches flow forward through the
/// stages and their gradients flow back, in the order the schedule says. On the CPU the stages
/// are threads. With the same seed and global batch, the losses are chapter 1's.
#[derive(Parser, Debug)]
#[command(version, about, long_about, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Pipeline stages; at most the model's number of blocks.
    #[arg(long, default_value_t = 2)]
    pp: usize,
    /// Micro-batches each pipe's share of a batch is split into; --microbatches x --dp must
    /// divide --batch-size.
    #[arg(long, default_value_t = 4)]
    microbatches: usize,
    /// Pipelines side by side (data parallelism): each computes batch-size/dp of every batch.
    #[arg(long, default_value_t = 1)]
    dp: usize,
    /// The schedule: gpipe (all forwards, then all backwards), 1f1b (one forward, one backward),
    /// interleaved (1F1B over --virtual-stages chunks per stage), or zb-h1 (1F1B with each
    /// backward split into its input and its weight gradients, the latter deferred).
    #[arg(long, value_enum, default_value_t = ScheduleKind::OneFOneB)]
    schedule: ScheduleKind,
    /// Model chunks per stage, for --schedule interleaved: stage s holds chunks s, s + N, s + 2N, ...
    #[arg(long, default_value_t = 1)]
    virtual_stages: usize,
    /// How blocks are divided among stages: the same number each, or by estimated cost (the
    /// output projection counts: with GPT-2's vocabulary it weighs as much as many blocks).
    #[arg(long, value_enum, default_value_t = Partition::Uniform)]
    partition: Partition,
    /// Draw the last training step of every stage, as measured, as an SVG timeline.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Draw the simulated schedule (unit costs: a forward 1, a backward 2) as an SVG timeline.
    #[arg(long)]
    timeline_sim: Option<PathBuf>,
}

fn print_pipeline(r: &PipelineReport) {
    let (n, m, v) = (r.pp as f64, r.micro_per_step as f64, r.virtual_stages as f64);
    let in_flight = if r.virtual_stages > 1 { "micro-batch chunks" } else { "micro-batches" };
    println!("pipeline");
    println!("  stages             {} ({} schedule, {} micro-batches per batch)", r.pp, r.schedule, r.microbatches);
    for (stage, share) in r.stages.iter().zip(&r.estimated_shares) {
        let p2p = stage.comm.sent.get(&Collective::SendRecv).copied().unwrap_or(0);
        println!(
            "  stage {:<3}          blocks {} ({:.0}% of the estimated work), {} parameters, {} {in_flight} in flight, sent {}, peak memory {}",
            stage.stage,
            stage.blocks.iter().map(|b| format!("{b:?}")).collect::<Vec<_>>().join(" + "),
            100.0 * share,
            format_bytes(4 * stage.layout.total as u64),
            stage.peak_in_flight,
            format_bytes(p2p),
            format_bytes(stage.memory.peak_total),
        );
    }
    if let Some(replica) = r.replicas.first() {
        println!(
            "  pipelines          {} side by side (--dp): each stage's gradients summed over them, {} sent by stage 0's replica 1",
            r.replicas.len() / r.pp + 1,
            format_bytes(replica.dp_comm.total_sent()),
        );
    }
    if r.schedule == ScheduleKind::ZbH1 {
        // F = B = W: the step is 2m + p - 1 + max(m, p) (see the simulator's tests).
        println!(
            "  bubble             {:.1}% simulated with equal stages (theory 1 - 3m/(2m+p-1+max(m,p)) = {:.1}%, (p-1)/(3m+p-1) once m >= p; m = {m} micro-batches per step)",
            100.0 * r.bubble,
            100.0 * (1.0 - 3.0 * m / (2.0 * m + n - 1.0 + m.max(n))),
        );
    } else {
        println!(
            "  bubble             {:.1}% simulated with equal stages (theory (p-1)/(v·m+p-1) = {:.1}%, v = {v} chunks, m = {m} micro-batches per step)",
            100.0 * r.bubble,
            100.0 * (n - 1.0) / (v * m + n - 1.0),
        );
    }
    println!("                     {:.1}% with the stages' estimated costs", 100.0 * r.bubble_estimated);
    match r.measured_bubble {
        Some(measured) => println!("                     {:.1}% measured in the last step", 100.0 * measured),
        None => println!("                     (--trace or --timeline measures the last step's)"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let outputs = cli.common.outputs.clone();
    let compare = outputs.prepare()?;
    let train_cfg = cli.common.into_config()?;
    if let Some(path) = &cli.timeline_sim {
        let micro = cli.microbatches * train_cfg.grad_accum;
        let sim = simulate(&Schedule::new(cli.schedule, cli.pp, cli.virtual_stages, micro), Costs::UNIT)?;
        let svg = sim.to_trace().to_svg(0.0, sim.makespan * 1000.0, |stage, _| format!("stage {stage}"));
        std::fs::write(path, svg).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let cfg = PipelineConfig {
        train: train_cfg,
        pp: cli.pp,
        microbatches: cli.microbatches,
        dp: cli.dp,
        schedule: cli.schedule,
        virtual_stages: cli.virtual_stages,
        partition: cli.partition,
        timeline: cli.timeline.clone(),
        skip_tied_sum: false,
    };
    let report = train(&cfg)?;
    print_summary(&report.report);
    print_pipeline(&report);
    outputs.write(&report.run_report(&cfg), compare)
}

fn main() -> ExitCode {
    run_main::<Cli>(run)
}
