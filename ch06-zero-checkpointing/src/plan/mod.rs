//! `ch06-zero-checkpointing plan`: how many GPUs a model needs, and in which layout.
//!
//! For each layout (dp, tp, pp, the micro-batch size, the pipeline's chunks, the ZeRO stage,
//! the recompute mode) it predicts the memory of a rank by category (`memory.rs`) and the step
//! time (`time.rs`) by the formulas the chapters assert against their runs, searches the
//! layouts (`search.rs`) and prints them fastest first (`output.rs`, `svg.rs`).

pub mod inputs;
pub mod memory;
pub mod output;
pub mod search;
pub mod svg;
pub mod time;

use crate::recompute::Recompute;
use crate::zero::ZeroStage;
use anyhow::{Context, bail};
use ch01_single_gpu::config::ModelConfig;
use clap::Parser;
use inputs::{Assumptions, Gpu};
use memory::{Memory, Sizes};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use time::StepTime;

/// What is planned for: the model, the batch, the machine, the sizes of its numbers.
#[derive(Clone, Debug)]
pub struct Problem {
    /// Its `block_size` is the training sequence length.
    pub model: ModelConfig,
    pub seq: usize,
    /// Sequences per optimizer step, over all data-parallel ranks.
    pub global_batch: usize,
    pub gpu: Gpu,
    pub assumptions: Assumptions,
    pub sizes: Sizes,
}

/// One way to lay the model out on dp·tp·pp GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Layout {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    /// Sequences per micro-batch.
    pub microbatch_size: usize,
    /// Model chunks per pipeline stage: 1 is 1F1B, more is the interleaved schedule.
    pub chunks: usize,
    pub zero: ZeroStage,
    pub recompute: Recompute,
}

impl Layout {
    pub fn gpus(&self) -> usize {
        self.dp * self.tp * self.pp
    }
}

/// A layout evaluated.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub layout: Layout,
    /// Micro-batches per data-parallel rank per step.
    pub microbatches: usize,
    pub memory: Memory,
    /// Left out for layouts that do not fit (a search does not price them).
    pub time: Option<StepTime>,
    pub fits: bool,
    /// Why it does not fit, and what to try.
    pub reason: Option<String>,
}

impl Plan {
    pub fn step_seconds(&self) -> f64 {
        self.time.map_or(f64::INFINITY, |t| t.step_seconds)
    }
    /// Achieved FLOP/s per GPU, recomputation counted (Megatron-LM's convention).
    pub fn tflops_per_gpu(&self) -> f64 {
        self.time.map_or(0.0, |t| t.hardware_flops / t.step_seconds / self.layout.gpus() as f64 / 1e12)
    }
    /// Model FLOPs utilisation: chapter 1's model FLOPs (no recomputation) over the peak.
    pub fn mfu(&self, gpu: &Gpu) -> f64 {
        self.time.map_or(0.0, |t| t.model_flops / t.step_seconds / self.layout.gpus() as f64 / gpu.peak_flops)
    }
    pub fn tokens_per_second(&self, problem: &Problem) -> f64 {
        self.time.map_or(0.0, |t| (problem.global_batch * problem.seq) as f64 / t.step_seconds)
    }
}

/// Plan how to train a GPT-2-shaped model on GPUs: memory per rank, step time, the fastest
/// layouts that fit.
///
/// Every layout (data, tensor, pipeline parallel sizes, micro-batch size, pipeline chunks,
/// ZeRO stage, recompute mode) that divides the model and the batch is priced by the formulas
/// chapters 1-6 assert against their runs; the fastest that fit are listed first, and those
/// that do not fit say why.
#[derive(Parser, Debug)]
#[command(name = "ch06-zero-checkpointing plan", version, about, long_about)]
pub struct PlanCli {
    /// A preset: tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl, 7b, 13b, 70b,
    /// megatron-1.7b, megatron-7.5b, megatron-39b, megatron-146b, megatron-530b.
    #[arg(long, default_value = "gpt2")]
    model: String,
    /// A Hugging Face config.json instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the model's layers, hidden size, heads, vocabulary, sequence length.
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    hidden: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    vocab: Option<usize>,
    #[arg(long)]
    seq: Option<usize>,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 512)]
    global_batch: usize,
    /// a100-40gb, a100-80gb, h100-80gb or h200.
    #[arg(long, default_value = "a100-80gb")]
    gpu: String,
    /// Override the GPU's dense bf16 TFLOP/s, memory (GB), NVLink and network GB/s one way, GPUs per node.
    #[arg(long)]
    peak_tflops: Option<f64>,
    #[arg(long)]
    memory_gb: Option<f64>,
    #[arg(long)]
    nvlink_gbps: Option<f64>,
    #[arg(long)]
    network_gbps: Option<f64>,
    #[arg(long)]
    gpus_per_node: Option<usize>,
    /// Override the share of peak FLOP/s the matmuls reach (the planner's one assumed constant).
    #[arg(long)]
    efficiency: Option<f64>,
    /// Price the data-parallel gradient sync after backward instead of under it (as Megatron-LM
    /// ran in 2021).
    #[arg(long)]
    dp_after_backward: bool,
    /// GPUs: N, or a range A..B (its powers of two and whole nodes).
    #[arg(long, default_value = "8")]
    gpus: String,
    /// Fix the recompute mode instead of searching it.
    #[arg(long, value_enum)]
    recompute: Option<Recompute>,
    /// Fix the ZeRO stage (0-3) instead of searching it.
    #[arg(long)]
    zero: Option<u8>,
    /// Fix the sequences per micro-batch instead of searching them.
    #[arg(long)]
    microbatch_size: Option<usize>,
    /// Evaluate this layout only: dp,tp,pp (on dp·tp·pp GPUs: --gpus is ignored).
    #[arg(long)]
    layout: Option<String>,
    /// Sizes of numbers: bf16 (mixed precision, 2+2+12 bytes a parameter) or f32 (this book's CPU runs).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    precision: String,
    /// How many layouts to list.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print JSON (an array of layouts) instead of tables.
    #[arg(long)]
    json: bool,
    /// Write an SVG of the top layouts' memory and step time.
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// What the user fixed instead of letting the search choose.
#[derive(Clone, Debug, Default)]
pub struct Choices {
    pub layout: Option<(usize, usize, usize)>,
    pub zero: Option<ZeroStage>,
    pub recompute: Option<Recompute>,
    pub microbatch_size: Option<usize>,
}

impl PlanCli {
    /// The problem, the GPU counts and the fixed choices, or the first thing wrong with them.
    pub fn resolve(&self) -> anyhow::Result<(Problem, Vec<usize>, Choices)> {
        let mut model = match &self.config {
            Some(path) => inputs::from_hf_config(path)?,
            None => inputs::preset(&self.model)?,
        };
        let set = |field: &mut usize, value: Option<usize>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        set(&mut model.n_layer, self.layers);
        set(&mut model.n_embd, self.hidden);
        set(&mut model.n_head, self.heads);
        set(&mut model.vocab_size, self.vocab);
        set(&mut model.block_size, self.seq);
        model.validate().context("model")?;
        let mut gpu = inputs::gpu(&self.gpu)?;
        let positive = |value: Option<f64>, name: &str| -> anyhow::Result<Option<f64>> {
            match value {
                Some(v) if !(v > 0.0 && v.is_finite()) => bail!("{name} must be a positive number, not {v}"),
                v => Ok(v),
            }
        };
        if let Some(v) = positive(self.peak_tflops, "--peak-tflops")? {
            gpu.peak_flops = v * 1e12;
        }
        if let Some(v) = positive(self.memory_gb, "--memory-gb")? {
            gpu.memory_bytes = v * 1e9;
        }
        if let Some(v) = positive(self.nvlink_gbps, "--nvlink-gbps")? {
            gpu.nvlink_bandwidth = v * 1e9;
        }
        if let Some(v) = positive(self.network_gbps, "--network-gbps")? {
            gpu.network_bandwidth = v * 1e9;
        }
        match self.gpus_per_node {
            Some(0) => bail!("--gpus-per-node must be at least 1"),
            Some(n) => gpu.gpus_per_node = n,
            None => {}
        }
        if self.global_batch == 0 {
            bail!("--global-batch must be at least 1");
        }
        if self.microbatch_size == Some(0) {
            bail!("--microbatch-size must be at least 1");
        }
        let zero = match self.zero {
            None => None,
            Some(n) => Some(ZeroStage::new(n).with_context(|| format!("--zero {n}: the stages are 0, 1, 2, 3"))?),
        };
        let layout = self.layout.as_deref().map(inputs::parse_layout).transpose()?;
        let counts = match layout {
            Some((dp, tp, pp)) => vec![dp * tp * pp],
            None => inputs::gpu_counts(&self.gpus, gpu.gpus_per_node)?,
        };
        if let Some((dp, tp, pp)) = layout {
            search::check_layout(&model, self.global_batch, dp, tp, pp)?;
        }
        let mut assumptions = Assumptions::DEFAULT;
        assumptions.overlap_data_parallel = !self.dp_after_backward;
        match self.efficiency {
            Some(e) if !(e > 0.0 && e <= 1.0) => bail!("--efficiency must be in (0, 1], not {e}"),
            Some(e) => assumptions.efficiency = e,
            None => {}
        }
        let sizes = if self.precision == "f32" { Sizes::F32 } else { Sizes::BF16 };
        let problem =
            Problem { seq: model.block_size, model, global_batch: self.global_batch, gpu, assumptions, sizes };
        Ok((
            problem,
            counts,
            Choices { layout, zero, recompute: self.recompute, microbatch_size: self.microbatch_size },
        ))
    }
}

fn run(cli: PlanCli) -> anyhow::Result<()> {
    let (problem, counts, choices) = cli.resolve()?;
    let per_count: Vec<(usize, Vec<Plan>)> =
        counts.iter().map(|&n| (n, search::search(&problem, n, &choices))).collect();
    if per_count.iter().all(|(_, plans)| plans.is_empty()) {
        bail!("no layout of {} GPUs divides the model and the batch (try another --gpus or --global-batch)", cli.gpus);
    }
    if let Some(path) = &cli.svg {
        let mut top: Vec<&Plan> = per_count.iter().flat_map(|(_, p)| p.iter().filter(|p| p.fits)).collect();
        top.sort_by(|a, b| a.step_seconds().total_cmp(&b.step_seconds()));
        top.truncate(cli.top.clamp(1, 8));
        let svg = svg::chart(&problem, &top)?;
        ch01_single_gpu::plot::write_svg(path, &svg)?;
    }
    if cli.json {
        let all: Vec<serde_json::Value> = per_count
            .iter()
            .flat_map(|(_, plans)| output::shown(plans, cli.top))
            .map(|p| output::json(&problem, p))
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        output::print(&problem, &per_count, cli.top);
    }
    Ok(())
}

/// The subcommand's entry: `ch06-zero-checkpointing plan [flags]`.
pub fn main() -> ExitCode {
    let cli: PlanCli = ch01_single_gpu::cli::parse_args_from(std::env::args_os().skip(1));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", ch01_single_gpu::cli::error_line(&err));
            ExitCode::FAILURE
        }
    }
}
