//! Shared helpers for the cross-chapter suite: the small configurations every chapter is
//! compared on, and comparisons that say what differed.

use ch01_single_gpu::TrainConfig;
use ch01_single_gpu::data::DataOrder;
use kernels::device::DeviceRequest;

/// The `tiny` model on the embedded corpus: fast enough for dozens of runs per test suite. On
/// the CPU, also on a machine with a GPU: the suite's tolerances are the CPU's, and the GPU
/// tests (`tests/gpu.rs`) ask for the GPU themselves.
pub fn tiny_config(steps: u64) -> TrainConfig {
    TrainConfig {
        device: DeviceRequest::Cpu,
        model: "tiny".into(),
        steps,
        batch_size: 4,
        seq_len: Some(32),
        warmup_steps: 2,
        eval_every: 0,
        val_batches: 2,
        data_order: DataOrder::Sequential,
        ..TrainConfig::default()
    }
}

/// Asserts |a - b| <= rtol * max(|a|, |b|) element by element, naming the first offender.
pub fn assert_close(what: &str, a: &[f32], b: &[f32], rtol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let tol = rtol * x.abs().max(y.abs());
        assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y} (rtol {rtol})");
    }
}

/// The entropy (nats per token) of the train split's token frequencies: the best loss a model
/// can reach without looking at context.
pub fn unigram_entropy(tokens: &[u32]) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for t in tokens {
        *counts.entry(*t).or_insert(0usize) += 1;
    }
    let n = tokens.len() as f64;
    counts.values().map(|&c| -(c as f64 / n) * (c as f64 / n).ln()).sum()
}

/// Every chapter's command-line suite asserts bad input the same way: one error line, no panic,
/// nothing touched (defined in chapter 1, which every chapter's tests can reach).
pub use ch01_single_gpu::testing::{Snapshot, assert_one_error_line, output_within};
