//! The run report: what a finished run knows, as one JSON document (`--report PATH`).
//!
//! A [`RunReport`] is the run's shape, every optimizer step, the validation losses, the
//! throughput, and a `ranks` array: per rank, its coordinates in the process grid, its memory
//! ledger by category and the bytes it sent and received, per communicator group and per
//! collective. Chapter 1 has one rank, no grid and no groups; chapter 2 has `dp` ranks on one
//! group, `"dp"`. Chapters 3–6 add grid axes (`"tp"`, `"pp"`), groups, and their own fields
//! (`extra`: bubble fraction, schedule, ZeRO stage) without changing what is already there, so
//! the tests, the book's figures and the planner read every chapter's report the same way.
//!
//! ```json
//! { "config": { "n_layer": 2, ..., "steps": 2, "batch_size": 4, "seq_len": 16 },
//!   "steps": [ { "step": 1, "loss": 5.6, "lr": 0.003, "grad_norm": 4.1, "tokens_per_sec": 9e4 }, ... ],
//!   "val_losses": [ { "step": 2, "loss": 5.4 } ],
//!   "tokens_per_sec": 9e4, "mfu": null, ...,
//!   "ranks": [ { "rank": 0, "grid": { "dp": 0 },
//!                "memory": { "peak": { "parameters": 1234, ... }, "current": { ... }, ... },
//!                "comm": { "dp": { "sent": { "all_reduce": 5678 }, "received": { ... }, "calls": { ... } } } } ] }
//! ```

use crate::train::StepRecord;
use crate::{TrainConfig, TrainReport};
use kernels::MemoryReport;
use kernels::comm::CommStats;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The run's shape: enough to tell two reports apart, and to recompute their FLOPs and memory.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunSummary {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub vocab_size: usize,
    /// Rows of the embedding table (the vocabulary rounded up; the extra rows are parameters
    /// that never train, and are not counted in `n_params`).
    pub padded_vocab_size: usize,
    pub n_params: usize,
    pub tokenizer: crate::tokenizer::TokenizerKind,
    /// The device, described as the summary prints it.
    pub device: String,
    pub dtype: String,
    /// Optimizer steps the run was asked for (a resumed run's `steps` array starts later).
    pub steps: u64,
    /// Sequences per micro-batch, over all ranks.
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub seed: u64,
}

/// One validation loss.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ValLoss {
    pub step: u64,
    pub loss: f32,
}

/// One rank's account: where it sits in the grid, its memory, its traffic.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankReport {
    pub rank: usize,
    /// Coordinates by axis name: `{}` for chapter 1, `{"dp": r}` for chapter 2; later chapters
    /// add `"tp"` and `"pp"`.
    pub grid: BTreeMap<String, usize>,
    /// The memory ledger by category: `current` (at the end), `peak` (each category's own
    /// highest), `peak_total` and `at_peak` (the highest total, and its categories then).
    pub memory: MemoryReport,
    /// Bytes sent and received and calls made, by collective, per communicator group ("dp").
    pub comm: BTreeMap<String, CommStats>,
    /// A chapter's own per-rank figures (chapter 2: seconds spent in and waiting for the
    /// gradient all-reduce), flattened into this object.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl RankReport {
    /// A rank with memory and no grid position, groups or extra fields (chapter 1's only rank).
    pub fn new(rank: usize, memory: MemoryReport) -> RankReport {
        RankReport { rank, grid: BTreeMap::new(), memory, comm: BTreeMap::new(), extra: Map::new() }
    }
}

// ANCHOR: run_report
/// What a run did, as `--report` writes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunReport {
    /// The crate that ran it: "ch01-single-gpu", "ch02-data-parallel", ...
    pub chapter: String,
    pub config: RunSummary,
    /// Every optimizer step this run took: step, loss, lr, grad_norm, tokens_per_sec (and
    /// val_loss on evaluation steps), as in `--metrics`.
    pub steps: Vec<StepRecord>,
    pub val_losses: Vec<ValLoss>,
    /// Over the training steps (evaluation excluded).
    pub tokens_per_sec: f64,
    /// Model FLOPs per trained token, and per second at `tokens_per_sec`.
    pub flops_per_token: f64,
    pub model_flops_per_sec: f64,
    /// The device's peak FLOP/s in this dtype and the model FLOPs utilisation, where known.
    pub peak_flops: Option<f64>,
    pub mfu: Option<f64>,
    pub ranks: Vec<RankReport>,
    /// A chapter's own run-wide figures, flattened into the top level.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}
// ANCHOR_END: run_report

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write the report to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot serialise the report: {0}")]
    Json(#[from] serde_json::Error),
}

impl RunReport {
    /// The report of a chapter 1 run of `cfg`: one rank, no grid, no communication.
    pub fn single_device(cfg: &TrainConfig, report: &TrainReport) -> RunReport {
        RunReport::from_train_report("ch01-single-gpu", cfg, report, vec![RankReport::new(0, report.memory.clone())])
    }

    /// The run-wide part of a report from what rank 0's trainer saw; `ranks` from the chapter.
    pub fn from_train_report(
        chapter: &str,
        cfg: &TrainConfig,
        report: &TrainReport,
        ranks: Vec<RankReport>,
    ) -> RunReport {
        let model = &report.model;
        RunReport {
            chapter: chapter.to_string(),
            config: RunSummary {
                n_layer: model.n_layer,
                n_head: model.n_head,
                n_embd: model.n_embd,
                block_size: model.block_size,
                vocab_size: model.vocab_size,
                padded_vocab_size: model.padded_vocab_size(),
                n_params: report.n_params,
                tokenizer: report.tokenizer,
                device: report.device.clone(),
                dtype: report.dtype.to_string(),
                steps: cfg.steps,
                batch_size: cfg.batch_size,
                seq_len: cfg.seq_len.unwrap_or(model.block_size),
                grad_accum: cfg.grad_accum,
                seed: cfg.seed,
            },
            steps: report.steps.clone(),
            val_losses: report.val_losses.iter().map(|&(step, loss)| ValLoss { step, loss }).collect(),
            tokens_per_sec: report.tokens_per_sec,
            flops_per_token: report.flops_per_token,
            model_flops_per_sec: report.model_flops_per_sec(),
            peak_flops: report.peak_flops,
            mfu: report.mfu(),
            ranks,
            extra: Map::new(),
        }
    }

    /// The report as pretty-printed JSON (non-finite numbers, which JSON has not, become null).
    pub fn to_json(&self) -> Result<String, ReportError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Writes [`RunReport::to_json`] to `path`.
    pub fn write(&self, path: &Path) -> Result<(), ReportError> {
        std::fs::write(path, self.to_json()? + "\n")
            .map_err(|source| ReportError::Write { path: path.to_path_buf(), source })
    }
}
