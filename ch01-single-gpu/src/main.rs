//! `ch01-single-gpu`: train GPT-2 on one device. A thin command line around
//! [`ch01_single_gpu::train`]; every flag maps onto a field of `TrainConfig` (see `cli.rs`).

use ch01_single_gpu::cli::{CommonArgs, print_summary, run_main};
use ch01_single_gpu::report::RunReport;
use ch01_single_gpu::train;
use clap::Parser;
use std::process::ExitCode;

/// Train a GPT-2 language model on one device (chapter 1 of Scale from Scratch).
///
/// With no flags: the `small` model on the embedded Shakespeare corpus, a few minutes on a
/// laptop CPU, ending with a summary and a generated sample.
#[derive(Parser, Debug)]
#[command(version, about, long_about, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let outputs = cli.common.outputs.clone();
    let compare = outputs.prepare()?;
    let cfg = cli.common.into_config()?;
    let report = train(&cfg)?;
    print_summary(&report);
    outputs.write(&RunReport::single_device(&cfg, &report), compare)
}

fn main() -> ExitCode {
    run_main::<Cli>(run)
}
