//! What each kind of group sends, as formulas: the run is held to them (`tests/ch05.rs`) and the
//! summary prints them beside what was measured.
//!
//! A rank on stage s (its blocks L_s, micro-batches of bt = rows·T tokens, m per step) sends:
//! - in its tensor group of n: chapter 3's collectives restricted to what the stage computes,
//!   the two sums per block each way, the embedding's sum on the first stage, the head's
//!   input-gradient sum and the cross-entropy's reductions on the last, and the norm's f64;
//! - in its pipe: one activation of bt·C floats forward and one gradient back per micro-batch
//!   across each boundary it touches (chapter 4);
//! - in its data group of d: the ring all-reduce of its shard's gradients, 2(d-1)/d of them.

use crate::hybrid::{HybridRankReport, HybridReport};
use ch03_tensor_parallel::cost::{CollectiveFloats, ring_bytes_sent};

// ANCHOR: tensor_bytes
/// The floats one rank of stage `stage` puts into its tensor group's collectives for the
/// forward (and, with `backward`, the backward) of one micro-batch of `bt` tokens.
pub fn stage_collectives(r: &HybridReport, stage: &HybridRankReport, bt: usize, backward: bool) -> CollectiveFloats {
    let (c, pp) = (r.report.model.n_embd, r.grid.pp);
    let blocks: usize = stage.blocks.iter().map(|b| b.len()).sum();
    let (first, last) = (stage.stage == 0, stage.stage + 1 == pp);
    let mut all_reduced = 2 * blocks * bt * c + usize::from(first) * bt * c + usize::from(last) * 2 * bt;
    let all_gathered = usize::from(last) * bt;
    if backward {
        all_reduced += 2 * blocks * bt * c + usize::from(last) * bt * c;
    }
    CollectiveFloats { all_reduced, all_gathered, reduce_scattered: 0 }
}

/// Bytes a rank of `stage` sends in its tensor group per training step: every micro-batch's
/// forward and backward, and the norm's f64 (three f32s, all-gathered).
pub fn tensor_bytes_per_step(r: &HybridReport, stage: &HybridRankReport) -> u64 {
    let n = r.grid.tp;
    let micro = ring_bytes_sent(stage_collectives(r, stage, r.rows * r.t, true), n).total();
    let norm = 4 * 3 * (n as u64 - 1);
    r.plan.micro_per_step as u64 * micro + norm
}

/// Bytes a rank of `stage` sends in its tensor group for one evaluation: the forward alone of
/// --val-batches batches, each in --microbatches micro-batches.
pub fn tensor_bytes_per_evaluation(r: &HybridReport, stage: &HybridRankReport, val_batches: usize) -> u64 {
    let micro = ring_bytes_sent(stage_collectives(r, stage, r.rows * r.t, false), r.grid.tp).total();
    (val_batches * r.microbatches) as u64 * micro
}
// ANCHOR_END: tensor_bytes

/// Model chunks of `stage` that send their output on (all but the pipe's last) and their input
/// gradient back (all but the first).
fn boundaries(r: &HybridReport, stage: &HybridRankReport) -> (usize, usize) {
    let (chunks, pp) = (stage.blocks.len(), r.grid.pp);
    let forward = (0..chunks).filter(|&k| stage.stage + k * pp + 1 < chunks * pp).count();
    let back = (0..chunks).filter(|&k| stage.stage + k * pp > 0).count();
    (forward, back)
}

/// Bytes a rank of `stage` sends to its pipe's neighbours per step: each micro-batch's
/// activation (bt·C floats) forward and its gradient back, across every boundary it touches.
pub fn pipeline_bytes_per_step(r: &HybridReport, stage: &HybridRankReport) -> u64 {
    let (forward, back) = boundaries(r, stage);
    4 * (r.plan.micro_per_step * (forward + back) * r.rows * r.t * r.report.model.n_embd) as u64
}

/// The same for one evaluation: activations forward only, --microbatches per batch.
pub fn pipeline_bytes_per_evaluation(r: &HybridReport, stage: &HybridRankReport, val_batches: usize) -> u64 {
    let (forward, _) = boundaries(r, stage);
    4 * (val_batches * r.microbatches * forward * r.rows * r.t * r.report.model.n_embd) as u64
}

/// Bytes a rank sends in its data group per step for the gradients: the ring all-reduce of its
/// stage's shard, 2(d-1)/d of its floats.
pub fn data_bytes_per_step(r: &HybridReport, stage: &HybridRankReport) -> u64 {
    let d = r.grid.dp;
    4 * (2 * (d - 1) * stage.shard_floats / d) as u64
}
