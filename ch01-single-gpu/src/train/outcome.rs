//! What a run did: one record per step, and the report of the whole run.

use crate::config::ModelConfig;
use crate::params::ParamLayout;
use crate::tokenizer::TokenizerKind;
use kernels::{DType, MemoryReport};
use serde::Serialize;
use std::collections::BTreeMap;

/// One optimizer step, as written to `--metrics` (one JSON object per line).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepRecord {
    /// 1-based: the number of optimizer steps completed.
    pub step: u64,
    #[serde(serialize_with = "crate::metrics::number")]
    pub loss: f32,
    pub lr: f32,
    #[serde(serialize_with = "crate::metrics::number")]
    pub grad_norm: f32,
    pub tokens_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "crate::metrics::optional_number")]
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
