//! The training loop: the whole chapter as one function, [`train`].

use crate::checkpoint::{self, CheckpointContents, CheckpointError, RunShape, TrainerState};
use crate::config::{ConfigError, ModelConfig};
use crate::data::{Batch, BatchSampler, DataError, DataOrder, Dataset, SHAKESPEARE, sequential_batch};
use crate::model::{Activations, BackwardScratch, BlockShape, GradsReady, ModelError, backward, forward};
use crate::optimizer::{Optimizer, squared_norm};
use crate::params::{GptParams, ParamLayout};
use crate::sample::{SampleConfig, generate};
use crate::schedule::{LrSchedule, learning_rate};
use crate::tokenizer::{Tokenizer, TokenizerKind};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::cuda::Gpu;
use kernels::cuda::timing::{StreamSpan, StreamTrace};
use kernels::device::DeviceRequest;
use kernels::dispatch::copy;
use kernels::ops::adamw::AdamWConfig;
use kernels::ops::grad_norm::clip_scale;
use kernels::{
    Category, CudaError, DType, Device, DeviceError, MemoryLedger, MemoryReport, Tensor, TensorError, Trace, View,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Where the training text comes from.
#[derive(Clone, Debug)]
pub enum DataSource {
    /// The Shakespeare corpus compiled into the binary.
    Embedded,
    /// Any UTF-8 text file.
    File(PathBuf),
    /// Text in memory (tests).
    Text(String),
}

/// Everything a run needs. `Default` is the CLI's defaults, less the sample (`sample_tokens: 0`)
/// and the progress display (`progress: false`): the quiet run that tests and later chapters want.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// A preset name: tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl.
    pub model: String,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    pub block_size: Option<usize>,
    pub tokenizer: TokenizerKind,
    pub data: DataSource,
    pub data_order: DataOrder,
    /// Total optimizer steps (a resumed run continues up to this number).
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence; `None` means the model's block size.
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f32,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub grad_clip: f32,
    pub adam: AdamWConfig,
    pub seed: u64,
    /// Evaluate every this many steps (and after the last); 0 means only after the last.
    pub eval_every: u64,
    pub val_batches: usize,
    pub save: Option<PathBuf>,
    /// Also save every this many steps (0: only at the end).
    pub save_every: u64,
    pub init: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub metrics: Option<PathBuf>,
    pub trace: Option<PathBuf>,
    pub sample_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub prompt: String,
    pub device: DeviceRequest,
    /// The type activations and matmuls compute in: f32, or bf16 (GPU only) with f32 master
    /// weights and optimizer state.
    pub dtype: DType,
    /// Show a progress bar and evaluation lines on stderr.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "small".into(),
            n_layer: None,
            n_head: None,
            n_embd: None,
            block_size: None,
            tokenizer: TokenizerKind::Byte,
            data: DataSource::Embedded,
            data_order: DataOrder::Random,
            steps: 1500,
            batch_size: 16,
            seq_len: None,
            grad_accum: 1,
            lr: 3e-3,
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: 100,
            weight_decay: 0.1,
            grad_clip: 1.0,
            adam: AdamWConfig::default(),
            seed: 1337,
            eval_every: 250,
            val_batches: 20,
            save: None,
            save_every: 0,
            init: None,
            resume: None,
            metrics: None,
            trace: None,
            sample_tokens: 0,
            temperature: 0.8,
            top_k: 40,
            prompt: "\n".into(),
            device: DeviceRequest::Auto,
            dtype: DType::F32,
            progress: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("a trainer computes between 1 and all {batch} rows of each micro-batch, not {rows}")]
    RowsPerRank { rows: usize, batch: usize },
    #[error("seq_len {seq_len} exceeds the model's block size {block_size}")]
    SeqLenTooLong { seq_len: usize, block_size: usize },
    #[error("cannot read data file {path}: {source}")]
    DataFile { path: PathBuf, source: std::io::Error },
    #[error("data file {0} is empty")]
    EmptyDataFile(PathBuf),
    #[error("--init and --resume cannot be used together (--resume already restores the weights)")]
    InitAndResume,
    #[error("cannot resume from {path}: {reason}")]
    Resume { path: PathBuf, reason: String },
    #[error("loss is {loss} at step {step}: training stopped{}", match .last_checkpoint {
        Some((dir, at)) => format!(" (the last good checkpoint, from step {at}, is in {})", dir.display()),
        None => String::new(),
    })]
    NonFiniteLoss { step: u64, loss: f32, last_checkpoint: Option<(PathBuf, u64)> },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "this trainer holds only part of the optimizer state: a checkpoint holds all of it, so gather the parts first"
    )]
    PartialOptimizer,
    /// A collective failed (in later chapters: usually because another rank failed first).
    #[error(transparent)]
    Comm(#[from] kernels::comm::CommError),
}

/// One optimizer step, as written to `--metrics` (one JSON object per line).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepRecord {
    /// 1-based: the number of optimizer steps completed.
    pub step: u64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
}

/// What a run did.
pub struct TrainReport {
    pub model: ModelConfig,
    pub tokenizer: TokenizerKind,
    /// The device, described ("cuda:0 (NVIDIA H100 80GB HBM3, sm_90, 79.2 GiB)").
    pub device: String,
    pub dtype: DType,
    /// Model FLOPs per trained token (`ModelConfig::flops_per_token`).
    pub flops_per_token: f64,
    /// The device's peak matmul FLOP/s in `dtype`, where known (GPUs in `kernels::cuda::peak_flops`).
    pub peak_flops: Option<f64>,
    /// Parameters of the model (the vocabulary padding not counted).
    pub n_params: usize,
    /// The steps this call ran (a resumed run starts after the checkpoint's step).
    pub steps: Vec<StepRecord>,
    /// (step, validation loss) at each evaluation.
    pub val_losses: Vec<(u64, f32)>,
    /// Tokens per second over the training steps (evaluation excluded).
    pub tokens_per_sec: f64,
    pub memory: MemoryReport,
    pub sample: Option<String>,
    pub layout: ParamLayout,
    /// The final parameters in our flat layout (see [`TrainReport::params_by_name`]).
    pub params: Vec<f32>,
}

impl TrainReport {
    pub fn losses(&self) -> Vec<f32> {
        self.steps.iter().map(|s| s.loss).collect()
    }

    /// Model FLOPs per second over the training steps.
    pub fn model_flops_per_sec(&self) -> f64 {
        self.tokens_per_sec * self.flops_per_token
    }

    // ANCHOR: mfu
    /// Model FLOPs utilisation: the share of the device's peak that the model's own FLOPs
    /// (`flops_per_token` · tokens/s) would use. Recomputation, padding and the masked half of
    /// attention are work the hardware does that MFU does not credit.
    pub fn mfu(&self) -> Option<f64> {
        self.peak_flops.map(|peak| self.model_flops_per_sec() / peak)
    }
    // ANCHOR_END: mfu

    pub fn final_val_loss(&self) -> Option<f32> {
        self.val_losses.last().map(|v| v.1)
    }

    /// The final parameters by Hugging Face name, in Hugging Face shape (no vocabulary padding).
    pub fn params_by_name(&self) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        self.layout
            .specs
            .iter()
            .map(|spec| {
                let mut shape = spec.shape.clone();
                if spec.name == "wte.weight" {
                    shape[0] = self.model.vocab_size;
                }
                let n: usize = shape.iter().product();
                (spec.name.clone(), (shape, self.params[spec.offset..spec.offset + n].to_vec()))
            })
            .collect()
    }
}

/// The model shape a config asks for: the preset, then the overrides.
pub fn model_config(cfg: &TrainConfig, vocab_size: usize) -> Result<ModelConfig, TrainError> {
    let mut model = ModelConfig::preset(&cfg.model, vocab_size)?;
    model.n_layer = cfg.n_layer.unwrap_or(model.n_layer);
    model.n_head = cfg.n_head.unwrap_or(model.n_head);
    model.n_embd = cfg.n_embd.unwrap_or(model.n_embd);
    model.block_size = cfg.block_size.unwrap_or(model.block_size);
    model.validate()?;
    Ok(model)
}

/// Reads and tokenizes the corpus, split 90/10.
pub fn load_dataset(source: &DataSource, tokenizer: &Tokenizer) -> Result<Dataset, TrainError> {
    let text = match source {
        DataSource::Embedded => SHAKESPEARE.to_string(),
        DataSource::Text(text) => text.clone(),
        DataSource::File(path) => {
            let bytes = std::fs::read(path).map_err(|source| TrainError::DataFile { path: path.clone(), source })?;
            if bytes.is_empty() {
                return Err(TrainError::EmptyDataFile(path.clone()));
            }
            String::from_utf8(bytes).map_err(|e| TrainError::DataFile {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8 text ({e})")),
            })?
        }
    };
    Ok(Dataset::new(tokenizer.encode(&text))?)
}

/// Checks what a run's flags can get wrong by themselves (zeros, a sequence longer than the
/// model's block size, --init with --resume), and returns the sequence length.
pub fn check_config(cfg: &TrainConfig, model: &ModelConfig) -> Result<usize, TrainError> {
    for (value, name) in
        [(cfg.batch_size, "batch size"), (cfg.grad_accum, "grad_accum"), (cfg.val_batches, "val_batches")]
    {
        if value == 0 {
            return Err(TrainError::Zero(name));
        }
    }
    if cfg.steps == 0 {
        return Err(TrainError::Zero("steps"));
    }
    let seq_len = cfg.seq_len.unwrap_or(model.block_size);
    if seq_len == 0 {
        return Err(TrainError::Zero("seq_len"));
    }
    if seq_len > model.block_size {
        return Err(TrainError::SeqLenTooLong { seq_len, block_size: model.block_size });
    }
    if cfg.init.is_some() && cfg.resume.is_some() {
        return Err(TrainError::InitAndResume);
    }
    Ok(seq_len)
}

/// The run a checkpoint of `cfg` belongs to (what `--resume` compares).
pub fn run_shape(cfg: &TrainConfig, model: &ModelConfig, seq_len: usize) -> RunShape {
    RunShape {
        model: model.clone(),
        tokenizer: cfg.tokenizer,
        batch_size: cfg.batch_size,
        seq_len,
        grad_accum: cfg.grad_accum,
        data_order: cfg.data_order,
        seed: cfg.seed,
        steps: cfg.steps,
        lr: cfg.lr,
        lr_schedule: cfg.lr_schedule,
        warmup_steps: cfg.warmup_steps,
        weight_decay: cfg.weight_decay,
        grad_clip: cfg.grad_clip,
        adam: cfg.adam,
    }
}

/// The state a run of shape `run` resumes from `dir` with: refused if another run wrote it, or
/// if that run is already complete.
pub fn resume_state(dir: &Path, run: &RunShape) -> Result<TrainerState, TrainError> {
    let state = checkpoint::read_trainer_state(dir)?;
    if !run.continues(&state.run) {
        let reason =
            format!("it was written by a different run ({:?}); resume with the same flags as that run", state.run);
        return Err(TrainError::Resume { path: dir.to_path_buf(), reason });
    }
    if state.step >= run.steps {
        let reason = format!("that run is already complete (step {} of {})", state.step, run.steps);
        return Err(TrainError::Resume { path: dir.to_path_buf(), reason });
    }
    Ok(state)
}

fn progress_bar(cfg: &TrainConfig, start: u64) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(cfg.steps).with_position(start);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Prints a line above the progress bar (or plainly when it is hidden or stderr is a file).
fn say(bar: &ProgressBar, progress: bool, line: &str) {
    if progress {
        bar.suspend(|| eprintln!("{line}"));
    }
}

/// A run in progress: the model, its optimizer state, the data, and the buffers a step needs.
/// [`train`] drives it; benchmarks and later chapters can step it themselves.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: ModelConfig,
    pub layout: ParamLayout,
    pub tokenizer: Tokenizer,
    pub device: Device,
    /// What was picked, and why (`--device auto` says why it fell back to the CPU).
    pub device_line: String,
    pub dtype: DType,
    /// The corpus, tokenized once and shared by every trainer of a run (data-parallel ranks).
    pub dataset: Arc<Dataset>,
    run: RunShape,
    /// Parameters and their gradients, two buffers of one layout, f32 on the device; AdamW's
    /// two moments (in `optimizer`) make four. In a bf16 run, `params_copy` is the bf16 copy of
    /// the parameters that forward and backward compute with, rewritten after each update.
    params: Tensor,
    params_copy: Option<Tensor>,
    grads: Tensor,
    optimizer: Optimizer,
    acts: Activations,
    scratch: BackwardScratch,
    sampler: BatchSampler,
    /// Optimizer steps completed.
    pub step: u64,
    /// Sequences of each micro-batch this trainer computes (all B here; a data-parallel rank
    /// computes its share) and tokens per sequence.
    rows: usize,
    t: usize,
    pub ledger: MemoryLedger,
    pub trace: Trace,
    /// On a GPU: the same spans as the GPU executed them (lane 1 of the trace).
    gpu_trace: Option<StreamTrace>,
}

impl Trainer {
    /// Checks the config, loads the corpus, and initialises (or loads) the model.
    pub fn new(cfg: &TrainConfig) -> Result<Trainer, TrainError> {
        let dataset = load_dataset(&cfg.data, &Tokenizer::new(cfg.tokenizer))?;
        Trainer::with_shard(cfg, cfg.batch_size, Arc::new(dataset))
    }

    /// A trainer that computes `rows` of the B rows of every micro-batch, on a corpus loaded
    /// once for the whole run. Chapter 1 computes them all; a data-parallel rank, its share.
    pub fn with_shard(cfg: &TrainConfig, rows: usize, dataset: Arc<Dataset>) -> Result<Trainer, TrainError> {
        let (device, device_line) = cfg.device.resolve_explained()?;
        if device == Device::Cpu && cfg.dtype != DType::F32 {
            return Err(TensorError::CpuDType(cfg.dtype).into());
        }
        let tokenizer = Tokenizer::new(cfg.tokenizer);
        let model = model_config(cfg, tokenizer.vocab_size())?;
        let seq_len = check_config(cfg, &model)?;
        let (b, t) = (cfg.batch_size, seq_len);
        if rows == 0 || rows > b {
            return Err(TrainError::RowsPerRank { rows, batch: b });
        }
        dataset.check_seq_len(t)?;
        let run = run_shape(cfg, &model, t);

        // ANCHOR: four_buffers
        let ledger = MemoryLedger::new();
        let layout = ParamLayout::new(&model);
        let buffer = |category| Tensor::zeros_on(&[layout.total], device, DType::F32, category, &ledger);
        let mut params = buffer(Category::Parameters)?;
        let grads = buffer(Category::Gradients)?;
        let owned = 0..layout.total; // this trainer updates every parameter
        let mut optimizer = Optimizer::new(&layout, owned, cfg.weight_decay, cfg.adam, device, &ledger)?;
        // ANCHOR_END: four_buffers
        // Weights and moments are read and initialised on the host, then copied to the device.
        let mut host = vec![0.0f32; layout.total];
        let mut sampler = BatchSampler::new(cfg.data_order, cfg.seed);
        let mut step = 0;
        if let Some(dir) = &cfg.resume {
            let state = resume_state(dir, &run)?;
            checkpoint::load_weights(dir, &model, &layout, &mut host)?;
            let (mut m, mut v) = (vec![0.0f32; layout.total], vec![0.0f32; layout.total]);
            checkpoint::load_optimizer(dir, &layout, &mut m, &mut v)?;
            optimizer.load_moments(&m, &v)?;
            (step, sampler) = (state.step, state.sampler);
        } else if let Some(dir) = &cfg.init {
            checkpoint::load_weights(dir, &model, &layout, &mut host)?;
        } else {
            crate::model::init_params(&model, &layout, cfg.seed, &mut host);
        }
        params.copy_from(&host)?;
        let params_copy = match cfg.dtype {
            DType::F32 => None,
            dtype => {
                let mut copy_ = Tensor::zeros_on(&[layout.total], device, dtype, Category::Parameters, &ledger)?;
                copy(copy_.view_mut(), params.view());
                Some(copy_)
            }
        };

        let acts = Activations::new(&model, rows, t, device, cfg.dtype, &ledger)?;
        let scratch = BackwardScratch::new(BlockShape::whole(&model), rows, t, device, cfg.dtype, &ledger)?;
        let trace = if cfg.trace.is_some() { Trace::enabled() } else { Trace::disabled() };
        let gpu_trace = match device {
            Device::Cuda(ordinal) => Some(StreamTrace::new(Gpu::get(ordinal)?, trace.lane(0, 1))),
            Device::Cpu => None,
        };
        Ok(Trainer {
            cfg: cfg.clone(),
            model,
            layout,
            tokenizer,
            device,
            device_line,
            dtype: cfg.dtype,
            dataset,
            run,
            params,
            params_copy,
            grads,
            optimizer,
            acts,
            scratch,
            sampler,
            step,
            rows,
            t,
            ledger,
            trace,
            gpu_trace,
        })
    }

    /// Parameters of the model (the vocabulary padding not counted).
    pub fn n_params(&self) -> usize {
        self.layout.total - (self.model.padded_vocab_size() - self.model.vocab_size) * self.model.n_embd
    }

    /// The parameters (f32 master weights), copied to the host.
    pub fn params(&self) -> Result<Vec<f32>, TrainError> {
        Ok(self.params.to_vec()?)
    }

    /// The parameters forward and backward read: the bf16 copy in a bf16 run.
    fn compute_params(&self) -> GptParams<View<'_>> {
        self.layout.views(self.params_copy.as_ref().unwrap_or(&self.params).view())
    }

    // ANCHOR: train_step
    /// One optimizer step: forward and backward over `grad_accum` micro-batches, then clip and
    /// update. Returns the step's record (without validation loss).
    pub fn step(&mut self) -> Result<StepRecord, TrainError> {
        let started = Instant::now();
        let trace = self.trace.clone();
        let _span = trace.span("step");
        self.zero_grads();
        let accum = self.cfg.grad_accum;
        let mut loss_sum = 0.0f64;
        for _ in 0..accum {
            let batch = self.next_micro_batch();
            let dloss = self.dloss();
            loss_sum += self.forward_backward(&batch.inputs, &batch.targets, dloss, &mut |_, _| {})? as f64;
        }
        let record = self.apply_gradients((loss_sum / accum as f64) as f32, started)?;
        if let Some(gpu_trace) = &mut self.gpu_trace {
            gpu_trace.flush()?;
        }
        Ok(record)
    }
    // ANCHOR_END: train_step

    /// Sets every gradient to zero: backward accumulates, so each optimizer step starts here.
    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
    }

    /// The run's next micro-batch: all B rows (every data-parallel rank draws the same one and
    /// keeps its own rows).
    pub fn next_micro_batch(&mut self) -> Batch {
        self.sampler.next_batch(&self.dataset.train, self.cfg.batch_size, self.t)
    }

    /// The gradient scale that makes the accumulated gradient that of the step's mean loss:
    /// each token's loss counts 1/(B·T·grad_accum), whichever rank computes it.
    pub fn dloss(&self) -> f32 {
        1.0 / self.tokens_per_step() as f32
    }

    // ANCHOR: forward_backward
    /// Forward and backward over some rows (at most this trainer's `rows`), accumulating the
    /// gradient of dloss · (sum of their token losses). `on_ready` hears as gradients become
    /// final. Returns the mean token loss of these rows.
    pub fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        dloss: f32,
        on_ready: GradsReady<'_>,
    ) -> Result<f32, TrainError> {
        let (t, model) = (self.t, &self.model);
        let b = inputs.len() / t;
        let p = self.layout.views(self.params_copy.as_ref().unwrap_or(&self.params).view());
        let mut gpu = GpuSpans(self.gpu_trace.as_mut());
        let (span, gpu_span) = (self.trace.span("forward"), gpu.start("forward"));
        let loss = forward(&p, model, &mut self.acts, inputs, Some(targets), b, t)?.unwrap_or(f32::NAN);
        drop(span);
        gpu.end(gpu_span);
        let (_span, gpu_span) = (self.trace.span("backward"), gpu.start("backward"));
        let mut g = self.layout.views_mut(self.grads.view_mut());
        backward(&p, &mut g, model, &mut self.acts, &mut self.scratch, inputs, targets, dloss, b, t, on_ready)?;
        gpu.end(gpu_span);
        Ok(loss)
    }
    // ANCHOR_END: forward_backward

    /// The gradients, one flat buffer in the layout of `layout`. CPU trainers only (chapter 2's
    /// thread ranks): a GPU trainer's gradients live on the device, and asking panics.
    pub fn grads(&self) -> &[f32] {
        self.grads.as_slice()
    }

    /// As [`Trainer::grads`], writable; CPU trainers only.
    pub fn grads_mut(&mut self) -> &mut [f32] {
        self.grads.as_mut_slice()
    }

    // ANCHOR: apply_gradients
    /// Ends a step of a trainer that holds the whole model: its squared gradient norm is the
    /// global one, so it takes the step with it.
    pub fn apply_gradients(&mut self, loss: f32, started: Instant) -> Result<StepRecord, TrainError> {
        let squared = self.grad_squared_norm(0..self.layout.total)?;
        self.take_step(loss, squared.sqrt() as f32, started)
    }

    /// The optimizer's part one: Σ g² over `range` of the gradient buffer (see
    /// [`optimizer::squared_norm`](crate::optimizer::squared_norm)).
    pub fn grad_squared_norm(&self, range: Range<usize>) -> Result<f64, TrainError> {
        Ok(squared_norm(self.grads.view(), range)?)
    }

    /// Part two: checks the loss, clips the gradient with the global norm `grad_norm` to
    /// `grad_clip`, takes the AdamW step with the scheduled learning rate on the parameters this
    /// trainer owns, and counts the step.
    pub fn take_step(&mut self, loss: f32, grad_norm: f32, started: Instant) -> Result<StepRecord, TrainError> {
        if !loss.is_finite() {
            return Err(TrainError::NonFiniteLoss { step: self.step + 1, loss, last_checkpoint: None });
        }
        let _span = self.trace.span("optimizer");
        let gpu_span = GpuSpans(self.gpu_trace.as_mut()).start("optimizer");
        let scale = clip_scale(grad_norm, self.cfg.grad_clip);
        let cfg = &self.cfg;
        let lr = learning_rate(cfg.lr_schedule, cfg.lr, self.step, cfg.steps, cfg.warmup_steps);
        self.optimizer.update(&mut self.params, self.params_copy.as_mut(), &self.grads, lr, scale, self.step + 1);
        GpuSpans(self.gpu_trace.as_mut()).end(gpu_span);
        // On a GPU the update is only queued: wait for it, so that the step's time is its own.
        if let Device::Cuda(ordinal) = self.device {
            Gpu::get(ordinal)?.synchronize()?;
        }
        self.step += 1;
        let tokens_per_sec = self.tokens_per_step() as f64 / started.elapsed().as_secs_f64();
        Ok(StepRecord { step: self.step, loss, lr, grad_norm, tokens_per_sec, val_loss: None })
    }
    // ANCHOR_END: apply_gradients

    // ANCHOR: evaluate
    /// The validation loss of the current parameters: the mean token loss over the first
    /// `val_batches` batches of consecutive windows from the start of the validation split (the
    /// protocol in `data.rs`). Every batch has the same number of tokens, so the mean of the batch
    /// means is the mean over all of them.
    pub fn evaluate(&mut self) -> Result<f32, TrainError> {
        let batches = self.cfg.val_batches as u64;
        Ok((self.val_loss_sum(0..batches)? / batches as f64) as f32)
    }

    /// The sum of the mean losses of validation batches `batches` of this trainer's `rows` rows
    /// (batch k starts at window k·rows, as in the protocol): ranks that split the validation
    /// batches between them add these sums up.
    pub fn val_loss_sum(&mut self, batches: impl IntoIterator<Item = u64>) -> Result<f64, TrainError> {
        let _span = self.trace.span("eval");
        let p = self.layout.views(self.params_copy.as_ref().unwrap_or(&self.params).view());
        let (rows, t) = (self.rows, self.t);
        let mut total = 0.0;
        for k in batches {
            let batch = sequential_batch(&self.dataset.val, k, rows, t);
            total += forward(&p, &self.model, &mut self.acts, &batch.inputs, Some(&batch.targets), rows, t)?
                .unwrap_or(f32::NAN) as f64;
        }
        Ok(total)
    }
    // ANCHOR_END: evaluate

    /// Writes a full checkpoint (weights, optimizer, data position) into `dir`, atomically.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let _span = self.trace.span("save");
        let state = TrainerState { step: self.step, sampler: self.sampler.clone(), run: self.run.clone() };
        if self.optimizer.owned != (0..self.layout.total) {
            return Err(TrainError::PartialOptimizer);
        }
        let (params, m, v) = (self.params.to_vec()?, self.optimizer.adam_m.to_vec()?, self.optimizer.adam_v.to_vec()?);
        let contents = CheckpointContents {
            cfg: &self.model,
            layout: &self.layout,
            params: &params,
            optimizer: Some((&m, &v, &state)),
        };
        Ok(checkpoint::save(dir, &contents)?)
    }

    /// Generates text from the prompt with the current parameters.
    pub fn sample(&self, prompt: &str, cfg: SampleConfig) -> Result<String, TrainError> {
        let prompt_tokens = self.tokenizer.encode(prompt);
        let tokens = generate(&self.compute_params(), &self.model, &prompt_tokens, cfg, self.device, self.dtype)?;
        Ok(prompt.to_string() + &self.tokenizer.decode(&tokens))
    }
}

/// What the training loop needs from whatever trains: chapter 1's [`Trainer`], or one rank of
/// a parallel run (where `step` and `evaluate` are collective: every rank calls them in turn).
pub trait TrainSteps {
    fn step(&mut self) -> Result<StepRecord, TrainError>;
    fn evaluate(&mut self) -> Result<f32, TrainError>;
    fn save(&self, dir: &Path) -> Result<(), TrainError>;
    /// Optimizer steps completed (more than 0 on a resumed run).
    fn steps_done(&self) -> u64;
}

impl TrainSteps for Trainer {
    fn step(&mut self) -> Result<StepRecord, TrainError> {
        Trainer::step(self)
    }
    fn evaluate(&mut self) -> Result<f32, TrainError> {
        Trainer::evaluate(self)
    }
    fn save(&self, dir: &Path) -> Result<(), TrainError> {
        Trainer::save(self, dir)
    }
    fn steps_done(&self) -> u64 {
        self.step
    }
}

/// What the loop saw.
pub struct LoopOutcome {
    pub steps: Vec<StepRecord>,
    /// (step, validation loss) at each evaluation.
    pub val_losses: Vec<(u64, f32)>,
    /// Time spent in training steps (evaluation and saving excluded).
    pub train_seconds: f64,
}

// ANCHOR: drive
/// The training loop: step until `cfg.steps`, evaluating every `eval_every` steps and after the
/// last, and saving every `save_every` and at the end. Only the `leader` (rank 0) shows
/// progress, writes metrics and saves checkpoints; `header` is its first line.
pub fn drive(
    cfg: &TrainConfig,
    trainer: &mut dyn TrainSteps,
    leader: bool,
    header: &str,
) -> Result<LoopOutcome, TrainError> {
    let mut metrics = match &cfg.metrics {
        Some(path) if leader => {
            Some(std::fs::File::create(path).map_err(|source| TrainError::Io { path: path.clone(), source })?)
        }
        _ => None,
    };
    let progress = cfg.progress && leader;
    let bar = progress_bar(&TrainConfig { progress, ..cfg.clone() }, trainer.steps_done());
    say(&bar, progress, header);

    let mut outcome = LoopOutcome { steps: Vec::new(), val_losses: Vec::new(), train_seconds: 0.0 };
    let mut last_checkpoint: Option<(PathBuf, u64)> = None;
    while trainer.steps_done() < cfg.steps {
        let started = Instant::now();
        let mut record = match trainer.step() {
            Ok(record) => record,
            Err(TrainError::NonFiniteLoss { step, loss, .. }) => {
                bar.abandon();
                return Err(TrainError::NonFiniteLoss { step, loss, last_checkpoint });
            }
            Err(e) => return Err(e),
        };
        outcome.train_seconds += started.elapsed().as_secs_f64();
        let done = record.step;
        if done == cfg.steps || (cfg.eval_every > 0 && done.is_multiple_of(cfg.eval_every)) {
            let val = trainer.evaluate()?;
            record.val_loss = Some(val);
            outcome.val_losses.push((done, val));
            say(&bar, progress, &format!("step {done:>6}: train loss {:.4}, val loss {val:.4}", record.loss));
        }
        if let Some(file) = metrics.as_mut() {
            let line = serde_json::to_string(&record).unwrap_or_default();
            writeln!(file, "{line}")
                .map_err(|source| TrainError::Io { path: cfg.metrics.clone().unwrap_or_default(), source })?;
        }
        bar.set_message(format!("loss {:.4} | lr {:.2e} | {:.0} tok/s", record.loss, record.lr, record.tokens_per_sec));
        bar.inc(1);
        outcome.steps.push(record);
        if let Some(dir) = &cfg.save
            && leader
            && (done == cfg.steps || (cfg.save_every > 0 && done.is_multiple_of(cfg.save_every)))
        {
            trainer.save(dir)?;
            last_checkpoint = Some((dir.clone(), done));
        }
    }
    bar.finish_and_clear();
    Ok(outcome)
}
// ANCHOR_END: drive

impl Trainer {
    /// The line a run starts with: device, model, tokenizer, corpus.
    pub fn header(&self) -> String {
        let (ds, m) = (&self.dataset, &self.model);
        format!(
            "device: {} | dtype: {} | model: {} layers, {} heads, {} dims, {:.2}M parameters | tokenizer: {:?} ({} tokens: {} train, {} val)",
            self.device_line,
            self.dtype,
            m.n_layer,
            m.n_head,
            m.n_embd,
            self.n_params() as f64 / 1e6,
            self.cfg.tokenizer,
            ds.train.len() + ds.val.len(),
            ds.train.len(),
            ds.val.len()
        )
    }

    /// The report of a finished run, with a sample generated if the config asks for one.
    pub fn report(&self, outcome: LoopOutcome) -> Result<TrainReport, TrainError> {
        let cfg = &self.cfg;
        let sample_cfg =
            SampleConfig { tokens: cfg.sample_tokens, temperature: cfg.temperature, top_k: cfg.top_k, seed: cfg.seed };
        let tokens = (outcome.steps.len() * self.tokens_per_step()) as f64;
        let sample = match cfg.sample_tokens {
            0 => None,
            _ => Some(self.sample(&cfg.prompt, sample_cfg)?),
        };
        Ok(TrainReport {
            model: self.model.clone(),
            tokenizer: cfg.tokenizer,
            device: self.device.describe(),
            dtype: self.dtype,
            flops_per_token: self.model.flops_per_token(self.t),
            peak_flops: self.device.peak_flops(self.dtype),
            n_params: self.n_params(),
            tokens_per_sec: if outcome.train_seconds > 0.0 { tokens / outcome.train_seconds } else { 0.0 },
            steps: outcome.steps,
            val_losses: outcome.val_losses,
            memory: self.ledger.report(),
            sample,
            layout: self.layout.clone(),
            params: self.params.to_vec()?,
        })
    }
}

// ANCHOR: train
/// Trains a GPT-2 as `cfg` says and reports what happened.
pub fn train(cfg: &TrainConfig) -> Result<TrainReport, TrainError> {
    let mut trainer = Trainer::new(cfg)?;
    let header = trainer.header();
    let outcome = drive(cfg, &mut trainer, true, &header)?;
    if let Some(path) = &cfg.trace {
        write_trace(&trainer.trace, path)?;
    }
    trainer.report(outcome)
}
// ANCHOR_END: train

impl Trainer {
    /// Tokens each optimizer step trains on: B · T · grad_accum (across all ranks).
    pub fn tokens_per_step(&self) -> usize {
        self.cfg.batch_size * self.t * self.cfg.grad_accum
    }

    /// This trainer's rows of each micro-batch, and the sequence length.
    pub fn shard_shape(&self) -> (usize, usize) {
        (self.rows, self.t)
    }
}

/// GPU spans where there is a GPU, nothing on the CPU.
struct GpuSpans<'a>(Option<&'a mut StreamTrace>);

impl GpuSpans<'_> {
    fn start(&mut self, name: &'static str) -> Option<StreamSpan> {
        self.0.as_mut().map(|t| t.start(name))
    }

    fn end(&mut self, span: Option<StreamSpan>) {
        if let (Some(t), Some(span)) = (self.0.as_mut(), span) {
            t.end(span);
        }
    }
}

fn write_trace(trace: &Trace, path: &Path) -> Result<(), TrainError> {
    trace.write_chrome_json(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })
}
