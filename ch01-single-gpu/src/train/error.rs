//! Everything a run can fail with, each as one line a user can act on.

use crate::checkpoint::CheckpointError;
use crate::config::ConfigError;
use crate::data::DataError;
use crate::model::ModelError;
use kernels::{CudaError, DeviceError, TensorError};
use std::path::PathBuf;

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
    /// The loss or the gradient norm of a step came out NaN or infinite; the step changed nothing.
    #[error("loss is {loss} and the gradient norm {grad_norm} at step {step}: training stopped, the weights are those of step {}{}", .step - 1, last_checkpoint_clause(.last_checkpoint))]
    NonFiniteLoss { step: u64, loss: f32, grad_norm: f32, last_checkpoint: Option<(PathBuf, u64)> },
    /// Ctrl-C: the loop stopped between steps.
    #[error("interrupted after step {step}{}", last_checkpoint_clause(.last_checkpoint))]
    Interrupted { step: u64, last_checkpoint: Option<(PathBuf, u64)> },
    /// A setting outside the range where it means anything.
    #[error("{flag} must be {expected} (got {value})")]
    OutOfRange { flag: &'static str, expected: &'static str, value: String },
    /// An output path that cannot be written, found before the first step.
    #[error("{flag} {path}: {reason}")]
    Output { flag: &'static str, path: PathBuf, reason: String },
    /// The buffers the run needs do not fit (or their sizes overflow 64 bits).
    #[error("{0}")]
    OutOfMemory(String),
    /// `--metrics` of a resumed run holds lines that are not this run's step records.
    #[error(
        "--metrics {path}: line {line} is not a step record, so the file is not this run's log; refusing to append to it (pass another --metrics)"
    )]
    NotAMetricsLog { path: PathBuf, line: usize },
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

fn last_checkpoint_clause(last: &Option<(PathBuf, u64)>) -> String {
    match last {
        Some((dir, at)) => {
            format!("; the last good checkpoint, from step {at}, is in {} (continue with --resume {0})", dir.display())
        }
        None => "; no checkpoint was saved (--save DIR --save-every N saves as the run goes)".to_string(),
    }
}
