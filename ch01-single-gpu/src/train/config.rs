//! What a run is asked to do: [`TrainConfig`] and the checks made before anything is allocated.

use super::TrainError;
use crate::checkpoint::{self, RunShape, TrainerState};
use crate::config::ModelConfig;
use crate::data::{BatchSampler, DataOrder, Dataset, SHAKESPEARE};
use crate::params::ParamLayout;
use crate::schedule::LrSchedule;
use crate::tokenizer::{Tokenizer, TokenizerKind};
use kernels::DType;
use kernels::device::DeviceRequest;
use kernels::ops::adamw::AdamWConfig;
use std::path::{Path, PathBuf};

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

pub fn check_config(cfg: &TrainConfig, model: &ModelConfig) -> Result<usize, TrainError> {
    cfg.validate()?;
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
    // Tokens per step (the loss's divisor) and the validation windows must be countable.
    if cfg.batch_size.checked_mul(seq_len).and_then(|n| n.checked_mul(cfg.grad_accum)).is_none() {
        let expected = "small enough that batch size x seq_len x grad_accum tokens fit in 64 bits";
        return Err(TrainError::OutOfRange { flag: "--grad-accum", expected, value: cfg.grad_accum.to_string() });
    }
    if cfg.val_batches.checked_mul(cfg.batch_size).and_then(|n| n.checked_mul(seq_len)).is_none() {
        let expected = "small enough that val_batches x batch size x seq_len tokens fit in 64 bits";
        return Err(TrainError::OutOfRange { flag: "--val-batches", expected, value: cfg.val_batches.to_string() });
    }
    if cfg.init.is_some() && cfg.resume.is_some() {
        return Err(TrainError::InitAndResume);
    }
    Ok(seq_len)
}

/// The shape of a run, as its checkpoints record it (`t`: the sequence length it trains at),
/// with what identifies its data.
pub fn run_shape(cfg: &TrainConfig, model: &ModelConfig, t: usize, dataset: &Dataset) -> RunShape {
    RunShape {
        model: model.clone(),
        tokenizer: cfg.tokenizer,
        batch_size: cfg.batch_size,
        seq_len: t,
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
        data: Some(dataset.identity()),
    }
}

/// The trainer state of the checkpoint in `dir`, if a run of shape `run` can resume from it
/// (the same run, not yet at `steps`).
pub fn resume_state(dir: &Path, run: &RunShape, steps: u64) -> Result<TrainerState, TrainError> {
    let state = checkpoint::read_trainer_state(dir)?;
    if let Some(reason) = run.difference(&state.run) {
        return Err(TrainError::Resume { path: dir.to_path_buf(), reason });
    }
    if state.step >= steps {
        let reason = format!("that run is already complete (step {} of {})", state.step, steps);
        return Err(TrainError::Resume { path: dir.to_path_buf(), reason });
    }
    Ok(state)
}

// ANCHOR: start_state
/// Where a run starts, always in chapter 1's full layout: a checkpoint's weights, Adam moments and
/// data position (`--resume`), a checkpoint's weights (`--init`), or the model fresh from the
/// seed. A parallel layout takes its part of each, so every layout starts where chapter 1 does.
pub struct StartState {
    pub params: Vec<f32>,
    /// Adam's two moments, on a resumed run.
    pub moments: Option<(Vec<f32>, Vec<f32>)>,
    /// Optimizer steps already taken, and where the batch order stands.
    pub step: u64,
    pub sampler: BatchSampler,
}

impl StartState {
    /// The start `cfg` asks for, for a run of shape `run` of a model laid out as `layout`.
    pub fn load(cfg: &TrainConfig, run: &RunShape, layout: &ParamLayout) -> Result<StartState, TrainError> {
        let model = &run.model;
        let mut params = vec![0.0f32; layout.total];
        let (mut step, mut sampler, mut moments) = (0, BatchSampler::new(cfg.data_order, cfg.seed), None);
        if let Some(dir) = &cfg.resume {
            let state = resume_state(dir, run, cfg.steps)?;
            checkpoint::load_weights(dir, model, layout, &mut params)?;
            let (mut m, mut v) = (vec![0.0f32; layout.total], vec![0.0f32; layout.total]);
            checkpoint::load_optimizer(dir, layout, &mut m, &mut v)?;
            (step, sampler, moments) = (state.step, state.sampler, Some((m, v)));
        } else if let Some(dir) = &cfg.init {
            checkpoint::load_weights(dir, model, layout, &mut params)?;
        } else {
            crate::model::init_params(model, layout, cfg.seed, &mut params);
        }
        Ok(StartState { params, moments, step, sampler })
    }
}
// ANCHOR_END: start_state
