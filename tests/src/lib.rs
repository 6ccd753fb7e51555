//! Shared helpers for the cross-chapter suite: the small configurations every chapter is
//! compared on, and comparisons that say what differed.

use ch01_single_gpu::data::DataOrder;
use ch01_single_gpu::train::Trainer;
use ch01_single_gpu::{TrainConfig, TrainReport};
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

// ANCHOR: assert_matches_ch01
/// The check every chapter's layouts must pass against chapter 1 run on the same `cfg`: the step
/// losses, the gradient norms, the validation losses and the final parameters, within `rtol`.
///
/// The gradient norm is compared, not only its effect: clipping and AdamW both cancel a
/// constant factor, so a gradient n times too large (each rank scaling by its own token count,
/// a tied weight's two halves summed twice) would leave the losses right and only show here.
/// Parameters are compared relative to what training changed, ||p - p_1|| / ||p_1 - p_0||:
/// element by element, Adam's update m/sqrt(v) amplifies rounding for a parameter whose
/// gradient is near 0, so single elements are not a fair measure of the whole.
pub fn assert_matches_ch01(cfg: &TrainConfig, single: &TrainReport, other: &TrainReport, rtol: f32) {
    assert_close("loss", &single.losses(), &other.losses(), rtol);
    let norms = |r: &TrainReport| r.steps.iter().map(|s| s.grad_norm).collect::<Vec<f32>>();
    assert_close("grad norm", &norms(single), &norms(other), rtol);
    let val = |r: &TrainReport| r.val_losses.iter().map(|v| v.1).collect::<Vec<f32>>();
    assert_close("val loss", &val(single), &val(other), rtol);
    assert_eq!(single.params.len(), other.params.len(), "parameters: lengths differ (a gathered layout?)");
    let p0 = Trainer::new(cfg).and_then(|t| t.params()).expect("chapter 1 initialises"); // the same start
    let norm = |it: &mut dyn Iterator<Item = f64>| it.map(|x| x * x).sum::<f64>().sqrt();
    let diff = norm(&mut single.params.iter().zip(&other.params).map(|(a, b)| (*a - *b) as f64));
    let moved = norm(&mut single.params.iter().zip(&p0).map(|(a, b)| (*a - *b) as f64));
    eprintln!("relative parameter error {:.2e}", diff / moved);
    assert!(
        diff <= rtol as f64 * moved,
        "parameters differ by {diff:.3e}, {:.2e} of the update (tolerance {rtol:.0e})",
        diff / moved
    );
}
// ANCHOR_END: assert_matches_ch01

/// Every chapter's command-line suite asserts bad input the same way: one error line, no panic,
/// nothing touched (defined in chapter 1, which every chapter's tests can reach).
pub use ch01_single_gpu::testing::{Snapshot, assert_one_error_line, output_within};
