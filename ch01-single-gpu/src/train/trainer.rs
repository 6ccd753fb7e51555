//! [`Trainer`]: the model, its optimizer state, the data, and the buffers a step needs.

use super::{
    LoopOutcome, StartState, StepRecord, TrainConfig, TrainError, TrainReport, TrainSteps, check_config, load_dataset,
    model_config, run_shape,
};
use crate::checkpoint::{self, CheckpointContents, RunShape, TrainerState};
use crate::config::ModelConfig;
use crate::data::{Batch, BatchSampler, Dataset, sequential_batch};
use crate::model::{Activations, BackwardScratch, BlockShape, GradsReady, backward, forward};
use crate::optimizer::{Optimizer, squared_norm};
use crate::params::{GptParams, ParamLayout};
use crate::sample::{SampleConfig, generate};
use crate::schedule::learning_rate;
use crate::tokenizer::Tokenizer;
use kernels::cuda::Gpu;
use kernels::cuda::timing::{StreamSpan, StreamTrace};
use kernels::dispatch::copy;
use kernels::ops::grad_norm::clip_scale;
use kernels::{Category, DType, Device, MemoryLedger, Tensor, TensorError, Trace, View};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

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
        crate::preflight::check_memory(cfg, &model, rows, t, device, 1)?;
        let run = run_shape(cfg, &model, t, &dataset);

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
        let StartState { params: host, moments, step, sampler } = StartState::load(cfg, &run, &layout)?;
        if let Some((m, v)) = &moments {
            optimizer.load_moments(m, v)?;
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

    /// Part two: clips the gradient with the global norm `grad_norm` to `grad_clip`, takes the
    /// AdamW step with the scheduled learning rate on the parameters this trainer owns, and
    /// counts the step.
    pub fn take_step(&mut self, loss: f32, grad_norm: f32, started: Instant) -> Result<StepRecord, TrainError> {
        // A NaN or infinite gradient would poison the weights (its clip scale is NaN, or 1):
        // such a step updates nothing, and the run stops with the weights of the last good step.
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(TrainError::NonFiniteLoss { step: self.step + 1, loss, grad_norm, last_checkpoint: None });
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
