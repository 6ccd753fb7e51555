//! The command line every chapter shares: ch01's flags as a clap `Args` group, and the summary
//! printed at the end of a run.

use crate::data::DataOrder;
use crate::plot::{LossCurves, loss_chart, memory_chart, write_svg};
use crate::report::RunReport;
use crate::schedule::LrSchedule;
use crate::tokenizer::TokenizerKind;
use crate::{DataSource, TrainConfig, TrainReport};
use anyhow::Context;
use clap::Args;
use kernels::memory::format_bytes;
use kernels::{Category, ops::adamw::AdamWConfig};
use std::path::PathBuf;

/// The flags every chapter's trainer shares; later chapters `#[command(flatten)]` them next to
/// their own (`--dp`, `--tp`, ...).
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Model preset: tiny, small, gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl.
    #[arg(long, default_value = "small")]
    model: String,
    /// Override the preset's number of transformer blocks.
    #[arg(long, allow_negative_numbers = true)]
    n_layer: Option<usize>,
    /// Override the preset's number of attention heads (must divide n_embd).
    #[arg(long, allow_negative_numbers = true)]
    n_head: Option<usize>,
    /// Override the preset's embedding width.
    #[arg(long, allow_negative_numbers = true)]
    n_embd: Option<usize>,
    /// Override the preset's maximum sequence length (the position table's size).
    #[arg(long, allow_negative_numbers = true)]
    block_size: Option<usize>,
    /// Tokenizer: bytes (vocabulary 256) or GPT-2's BPE (50257, padded to 50304).
    #[arg(long, value_enum, default_value_t = TokenizerKind::Byte)]
    tokenizer: TokenizerKind,
    /// A UTF-8 text file to train on instead of the embedded Shakespeare corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Batch order: random windows (seeded) or consecutive windows (see the book's protocol).
    #[arg(long, value_enum, default_value_t = DataOrder::Random)]
    data_order: DataOrder,
    /// Optimizer steps in total (a resumed run continues up to this number).
    #[arg(long, default_value_t = TrainConfig::default().steps, allow_negative_numbers = true)]
    steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = TrainConfig::default().batch_size, allow_negative_numbers = true)]
    batch_size: usize,
    /// Tokens per sequence [default: the model's block size].
    #[arg(long, allow_negative_numbers = true)]
    seq_len: Option<usize>,
    /// Micro-batches whose gradients are summed before each optimizer step.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = TrainConfig::default().lr, allow_negative_numbers = true)]
    lr: f32,
    /// Learning-rate schedule: linear warmup then cosine decay to 10%, or constant.
    #[arg(long, value_enum, default_value_t = LrSchedule::Cosine)]
    lr_schedule: LrSchedule,
    /// Warmup steps of the cosine schedule.
    #[arg(long, default_value_t = TrainConfig::default().warmup_steps, allow_negative_numbers = true)]
    warmup_steps: u64,
    /// AdamW weight decay (applied to matmul weights and embeddings only).
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    weight_decay: f32,
    /// AdamW beta1.
    #[arg(long, default_value_t = AdamWConfig::default().beta1, allow_negative_numbers = true)]
    beta1: f32,
    /// AdamW beta2.
    #[arg(long, default_value_t = AdamWConfig::default().beta2, allow_negative_numbers = true)]
    beta2: f32,
    /// AdamW epsilon.
    #[arg(long, default_value_t = AdamWConfig::default().eps, allow_negative_numbers = true)]
    adam_eps: f32,
    /// Clip the global gradient norm to this value.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    grad_clip: f32,
    /// Seed for initialisation, batch order and sampling.
    #[arg(long, default_value_t = TrainConfig::default().seed, allow_negative_numbers = true)]
    seed: u64,
    /// Evaluate the validation loss every this many steps (0: only at the end).
    #[arg(long, default_value_t = TrainConfig::default().eval_every, allow_negative_numbers = true)]
    eval_every: u64,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = TrainConfig::default().val_batches, allow_negative_numbers = true)]
    val_batches: usize,
    /// Write a checkpoint here at the end (Hugging Face GPT-2 layout + optimizer state). It
    /// replaces only a checkpoint or an empty directory.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Also save every this many steps (0: only at the end).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    save_every: u64,
    /// Start from the weights of a GPT-2 checkpoint directory (ours or Hugging Face's).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue a run from its checkpoint, exactly as if it had never stopped.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Write one JSON object per step (step, loss, lr, grad_norm, tokens_per_sec, val_loss); a
    /// resumed run continues the file.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Write a Chrome trace of the run (open it in https://ui.perfetto.dev).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Tokens of text to generate at the end (0: none).
    #[arg(long, default_value_t = 400, allow_negative_numbers = true)]
    sample_tokens: usize,
    /// Sampling temperature (0: always the most likely token).
    #[arg(long, default_value_t = TrainConfig::default().temperature, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = TrainConfig::default().top_k, allow_negative_numbers = true)]
    top_k: usize,
    /// Text the sample starts from.
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Device: auto (a GPU if there is one, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// What activations and matmuls compute in: f32, or bf16 (GPU only; weights and optimizer
    /// state stay f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// No progress bar or evaluation lines; only the summary.
    #[arg(long)]
    quiet: bool,
    /// What to write about the run when it ends: --report, --plot, --plot-compare, --plot-memory.
    #[command(flatten)]
    pub outputs: RunOutputs,
}

impl CommonArgs {
    /// The run these flags describe.
    pub fn into_config(self) -> anyhow::Result<TrainConfig> {
        Ok(TrainConfig {
            model: self.model,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_embd: self.n_embd,
            block_size: self.block_size,
            tokenizer: self.tokenizer,
            data: self.data.map_or(DataSource::Embedded, DataSource::File),
            data_order: self.data_order,
            steps: self.steps,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            grad_accum: self.grad_accum,
            lr: self.lr,
            lr_schedule: self.lr_schedule,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            adam: AdamWConfig { beta1: self.beta1, beta2: self.beta2, eps: self.adam_eps },
            seed: self.seed,
            eval_every: self.eval_every,
            val_batches: self.val_batches,
            save: self.save,
            save_every: self.save_every,
            init: self.init,
            resume: self.resume,
            metrics: self.metrics,
            trace: self.trace,
            sample_tokens: self.sample_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            prompt: self.prompt,
            device: self.device.parse().context("--device")?,
            dtype: self.dtype.parse().map_err(anyhow::Error::msg).context("--dtype")?,
            progress: !self.quiet,
        })
    }
}

// ANCHOR: one_line_errors
/// Parses the command line; a mistake in it is one line on stderr ("error: ... (see --help)")
/// and exit status 2, like every other bad input, instead of clap's usage block.
pub fn parse_args<T: clap::Parser>() -> T {
    parse_args_from(std::env::args_os())
}

/// As [`parse_args`], from `args` (the program's name first): a subcommand's own flags.
pub fn parse_args_from<T: clap::Parser>(args: impl IntoIterator<Item = std::ffi::OsString>) -> T {
    use clap::error::ErrorKind;
    match T::try_parse_from(args) {
        Ok(args) => args,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().find(|l| !l.trim().is_empty()).unwrap_or("error: bad arguments");
            eprintln!("{} (see --help)", first.trim_end());
            std::process::exit(2)
        }
    }
}

/// An error and its causes as one line, each cause said once: an I/O error that a message
/// already quotes is not repeated ("ck: No such file or directory", not that twice).
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        if !line.contains(text.trim()) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(text.trim());
        }
    }
    line
}

/// How every chapter's binary runs: the flags parsed (a mistake is one line), Ctrl-C set to stop
/// the run between steps, then `run`; and how it ends: exit status 0, or one line on stderr and
/// status 1 (130 after Ctrl-C, as shells expect).
pub fn run_main<T: clap::Parser>(run: impl FnOnce(T) -> anyhow::Result<()>) -> std::process::ExitCode {
    let cli = parse_args::<T>();
    crate::interrupt::install();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) if crate::interrupt::requested() => {
            // Every rank stopped at the same step: which one reported it first says nothing.
            let line = error_line(&err);
            let line = match line.split_once(" failed: ") {
                Some((rank, rest)) if rank.starts_with("rank ") => rest.to_string(),
                _ => line,
            };
            eprintln!("error: {line}");
            std::process::ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("error: {}", error_line(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
// ANCHOR_END: one_line_errors

/// The end-of-run summary: losses, throughput, peak memory by category, the sample.
pub fn print_summary(report: &TrainReport) {
    let last = report.steps.last();
    println!("summary");
    println!("  device             {}", report.device);
    println!("  parameters         {:.2}M", report.n_params as f64 / 1e6);
    if let Some(last) = last {
        println!("  steps              {}", last.step);
        println!("  train loss         {:.4} (last step)", last.loss);
    }
    if let Some(val) = report.final_val_loss() {
        println!("  val loss           {val:.4}");
    }
    println!("  dtype              {}", report.dtype);
    println!("  tokens/s           {:.0}", report.tokens_per_sec);
    let flops = report.model_flops_per_sec();
    println!(
        "  model FLOP/s       {:.3e} ({:.3e} FLOPs per token: 6(12LC² + VC) + 12LTC)",
        flops, report.flops_per_token
    );
    match report.mfu() {
        Some(mfu) => println!(
            "  MFU                {:.1}% of {:.0} TFLOP/s peak",
            100.0 * mfu,
            report.peak_flops.unwrap_or(0.0) / 1e12
        ),
        None => println!("  MFU                n/a (no peak FLOP/s known for this device)"),
    }
    println!("  peak memory        {}", format_bytes(report.memory.peak_total));
    for category in Category::ALL {
        let bytes = report.memory.at_peak[&category];
        if bytes > 0 {
            println!("    {category:<16} {}", format_bytes(bytes));
        }
    }
    if let Some(sample) = &report.sample {
        println!("sample\n{sample}");
    }
}

/// The files a run writes about itself when it ends, drawn from its [`RunReport`]. Every
/// chapter's command line has them (they are part of [`CommonArgs`]).
#[derive(Args, Debug, Clone, Default)]
pub struct RunOutputs {
    /// Write the run as JSON: config, every step, validation losses, throughput, and per rank its
    /// grid coordinates, memory by category and bytes sent and received per collective.
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
    /// Draw the training and validation loss curves as SVG.
    #[arg(long, value_name = "PATH.svg")]
    pub plot: Option<PathBuf>,
    /// Lay another run's --metrics file over the --plot curves (named by its file name).
    #[arg(long, value_name = "FILE")]
    pub plot_compare: Option<PathBuf>,
    /// Draw each rank's memory at its peak, by ledger category, as an SVG bar chart.
    #[arg(long, value_name = "PATH.svg")]
    pub plot_memory: Option<PathBuf>,
}

impl RunOutputs {
    /// Checks what can be checked before training (so that a typo does not cost a whole run)
    /// and reads the --plot-compare file.
    pub fn prepare(&self) -> anyhow::Result<Option<LossCurves>> {
        let outputs = [("--report", &self.report), ("--plot", &self.plot), ("--plot-memory", &self.plot_memory)];
        for (flag, path) in outputs.into_iter().filter_map(|(flag, path)| Some((flag, path.as_deref()?))) {
            crate::preflight::check_output_file(flag, path)?;
        }
        match &self.plot_compare {
            Some(_) if self.plot.is_none() => {
                anyhow::bail!("--plot-compare draws onto --plot: give --plot PATH.svg too")
            }
            Some(path) => Ok(Some(LossCurves::from_metrics_file(path).context("--plot-compare")?)),
            None => Ok(None),
        }
    }

    /// Writes the report and the pictures the flags ask for; `compare` is what [`Self::prepare`] read.
    pub fn write(&self, report: &RunReport, compare: Option<LossCurves>) -> anyhow::Result<()> {
        if let Some(path) = &self.report {
            report.write(path).context("--report")?;
        }
        if let Some(path) = &self.plot {
            let runs: Vec<LossCurves> = std::iter::once(LossCurves::from_report(report)).chain(compare).collect();
            write_svg(path, &loss_chart(&runs)?).context("--plot")?;
        }
        if let Some(path) = &self.plot_memory {
            write_svg(path, &memory_chart(report)?).context("--plot-memory")?;
        }
        Ok(())
    }
}
