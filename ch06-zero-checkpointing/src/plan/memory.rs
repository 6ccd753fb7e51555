//! Memory per rank, by category, for one layout: the chapters' formulas composed.
//!
//! - Model state: chapter 6's [`predict`] over the units this rank holds: chapter 4's stage
//!   (its blocks, the embeddings on the first stage, the tied `wte` and `ln_f` on the last),
//!   each tensor cut to chapter 3's tensor-parallel shard by its placement, sharded over the
//!   data-parallel group by ZeRO. `predict` counts f32; [`Sizes`] rescales each category.
//! - Activations: chapter 6's [`ActivationFloats`] per token for the recompute mode, with the
//!   tensor-parallel split of chapter 3's `activation_floats_per_token`, times the tokens of a
//!   micro-batch, times the micro-batches in flight on the stage in chapter 4's schedule.

use super::{Layout, Problem};
use crate::recompute::{ActivationFloats, Recompute};
use crate::zero::{StateBytes, Unit, predict};
use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::params::{ParamLayout, Placement};
use ch03_tensor_parallel::cost::activation_floats_per_token;
use ch04_pipeline::schedule::{Schedule, ScheduleKind, peak_in_flight};
use ch04_pipeline::stage::{holds, uniform_partition};
use kernels::Category;
use serde::Serialize;
use std::ops::Range;

// ANCHOR: sizes
/// Bytes of each kind of number.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sizes {
    #[serde(skip)]
    pub state: StateBytes,
    /// One element of an activation.
    pub activation: f64,
}

impl Sizes {
    /// Mixed precision, as the ZeRO paper and Megatron-LM train: bf16 parameters, gradients and
    /// activations; f32 master weights and Adam moments (2 + 2 + 12 bytes a parameter).
    pub const BF16: Sizes = Sizes { state: StateBytes::MIXED, activation: 2.0 };
    /// This book's CPU runs: everything f32 (4 + 4 + 8).
    pub const F32: Sizes = Sizes { state: StateBytes::F32, activation: 4.0 };
}
// ANCHOR_END: sizes

/// One rank's peak, by category, in bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Memory {
    /// The pipeline stage this is (the stage that needs the most).
    pub stage: usize,
    pub parameters: f64,
    pub gradients: f64,
    pub optimizer_state: f64,
    /// One micro-batch's activations (with the recompute mode's buffer), and the head's.
    pub activations: f64,
    /// The activations of the other micro-batches the schedule keeps in flight on this stage.
    pub pipeline_in_flight: f64,
    /// Staging buffers of ZeRO's collectives (a pipeline receives into its slots, counted above
    /// and below).
    pub communication: f64,
    /// Backward's scratch (the ledger's "other"): the activation gradients of the block being
    /// computed, one set for all blocks, and the projection buffer: 17C floats a token
    /// (chapter 1's memory page), of which the 12C of the split tensors (d_att_y, d_qkv, d_fc,
    /// d_fc_gelu) are 1/tp on a tensor-parallel rank; and a pipeline slot's gradient buffer
    /// (C a token) for each micro-batch in flight.
    pub scratch: f64,
    /// The same activations (both rows above) without recomputation, for comparison.
    pub activations_without_recompute: f64,
    /// The paper's model-state terms alone (ZeRO's Ψ, Ψ/N terms), for the ZeRO figure.
    pub model_state_theory: f64,
    /// Micro-batches in flight on this stage.
    pub in_flight: usize,
}

impl Memory {
    /// The categories by name, in a fixed order.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("activations", self.activations),
            ("in-flight micro-batches", self.pipeline_in_flight),
            ("communication", self.communication),
            ("backward scratch", self.scratch),
        ]
    }

    pub fn total(&self) -> f64 {
        self.named().iter().map(|(_, bytes)| bytes).sum()
    }

    /// The categories, largest first.
    pub fn categories(&self) -> [(&'static str, f64); 7] {
        let mut all = self.named();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        all
    }
}

/// The blocks of each model chunk of stage `s`: chapter 4's uniform partition of the layers
/// into pp·v virtual stages, chunk c of stage s being virtual stage c·pp + s.
pub fn stage_chunks(n_layer: usize, pp: usize, chunks: usize, s: usize) -> Vec<Range<usize>> {
    let parts = uniform_partition(n_layer, pp * chunks);
    (0..chunks).map(|c| parts[c * pp + s].clone()).collect()
}

// ANCHOR: stage_units
/// The units (chapter 6) that a rank of pipeline stage `s` holds, each tensor cut to its
/// tensor-parallel shard: a split tensor is 1/tp of its elements, a replicated one whole.
pub fn stage_units(model: &ModelConfig, layout: &Layout, s: usize) -> Vec<Unit> {
    let full = ParamLayout::new(model);
    let chunks = stage_chunks(model.n_layer, layout.pp, layout.chunks, s);
    let mut units: Vec<Unit> = Vec::new();
    let mut offset = 0;
    for spec in full.specs.iter().filter(|spec| holds(spec, s, layout.pp, &chunks)) {
        let floats = match spec.placement {
            Placement::Replicated => spec.numel(),
            Placement::Split { .. } => spec.numel() / layout.tp,
        };
        match units.last_mut() {
            Some(unit) if unit.part == spec.part => unit.range.end += floats,
            _ => units.push(Unit { part: spec.part, range: offset..offset + floats, shard: 0 }),
        }
        offset += floats;
    }
    for unit in &mut units {
        unit.shard = unit.len().div_ceil(layout.dp);
    }
    units
}
// ANCHOR_END: stage_units

// ANCHOR: activations
/// Chapter 6's activation floats per token, on a tensor-parallel rank of `tp`: chapter 3's
/// split (per block 4C + 4 replicated, the rest 1/tp; the head's logits 1/tp) applied to each
/// recompute mode. At tp = 1 it is [`ActivationFloats::new`] exactly.
pub fn activation_floats(model: &ModelConfig, seq: usize, tp: usize, mode: Recompute) -> ActivationFloats {
    let with_layers = |n_layer| ModelConfig { n_layer, ..model.clone() };
    // Chapter 3: one block's floats per token on a shard, and the rest (input and head).
    let rest = activation_floats_per_token(&with_layers(0), seq, tp);
    let block = activation_floats_per_token(&with_layers(1), seq, tp) - rest;
    // Chapter 6: what selective recomputation drops is the attention matrix, H·T a token.
    let whole = |mode| ActivationFloats::new(model, seq, mode);
    let attention = (whole(Recompute::None).per_block - whole(Recompute::Selective).per_block) / tp;
    let (per_block, recompute) = match mode {
        Recompute::None => (block, 0),
        Recompute::Selective => (block - attention, attention),
        // The block's input is the replicated residual stream.
        Recompute::Full => (whole(Recompute::Full).per_block, block),
    };
    ActivationFloats { per_block, blocks: model.n_layer, recompute, rest }
}
// ANCHOR_END: activations

/// The schedule the layout runs: 1F1B, or interleaved over its chunks.
pub fn schedule(layout: &Layout, microbatches: usize) -> Schedule {
    let kind = if layout.chunks > 1 { ScheduleKind::Interleaved } else { ScheduleKind::OneFOneB };
    Schedule::new(kind, layout.pp, layout.chunks, microbatches)
}

/// Micro-batch-chunks in flight on stage `s`, from chapter 4's schedule: its slots are pooled
/// per chunk, so the peak of each chunk's instructions, summed.
pub fn in_flight(schedule: &Schedule, s: usize) -> usize {
    let instrs = &schedule.stages[s];
    (0..schedule.chunks)
        .map(|c| {
            let of_chunk: Vec<_> =
                instrs.iter().filter(|i| i.micro().is_some_and(|(_, chunk)| chunk == c)).copied().collect();
            peak_in_flight(&of_chunk)
        })
        .sum()
}

/// The stages that can need the most: the first (the most micro-batches in flight, the
/// embeddings, and, from the uniform partition, the most blocks) and the last (the head).
pub fn fullest_stages(pp: usize) -> Vec<usize> {
    if pp == 1 { vec![0] } else { vec![0, pp - 1] }
}

// ANCHOR: memory
/// Memory of rank `dp_rank` of stage `s`, by category.
pub fn stage_memory(problem: &Problem, layout: &Layout, s: usize, in_flight: usize, dp_rank: usize) -> Memory {
    let (model, sizes) = (&problem.model, problem.sizes);
    let units = stage_units(model, layout, s);
    let state = predict(layout.zero, &units, layout.dp, dp_rank);
    // `predict` counts 4 bytes a float, 8 an Adam pair: rescale each category to `sizes`.
    let scale = |c: Category| match c {
        Category::Parameters => sizes.state.parameter / 4.0,
        Category::Gradients | Category::Communication => sizes.state.gradient / 4.0,
        _ => sizes.state.optimizer / 8.0,
    };
    let bytes = |c: Category| state.bytes(c) as f64 * scale(c);
    let theory: f64 = [Category::Parameters, Category::Gradients, Category::OptimizerState]
        .into_iter()
        .map(|c| state.theory_bytes(c) as f64 * scale(c))
        .sum();

    let tokens = (layout.microbatch_size * problem.seq) as f64;
    let blocks_per_chunk = stage_chunks(model.n_layer, layout.pp, layout.chunks, s).iter().map(|c| c.len()).max();
    let blocks_per_chunk = blocks_per_chunk.unwrap_or(0) as f64;
    let last = s + 1 == layout.pp;
    let input = model.n_embd as f64;
    let acts = |mode| {
        let f = activation_floats(model, problem.seq, layout.tp, mode);
        // In flight are (micro-batch, chunk) pairs, each with its blocks' activations and its
        // input (chapter 4's slots); one micro-batch is this stage's chunks. The last stage adds
        // the head (chapter 3's rest is the input and the head).
        let head = if last { f.rest as f64 - input } else { 0.0 };
        let mine = in_flight.min(layout.chunks) as f64;
        let pair = blocks_per_chunk * f.per_block as f64 + input;
        let one = (mine * pair + f.recompute as f64 + head) * tokens;
        let others = (in_flight as f64 - mine) * pair * tokens;
        (one * sizes.activation, others * sizes.activation)
    };
    let (activations, pipeline_in_flight) = acts(layout.recompute);
    let (none_one, none_others) = acts(Recompute::None);
    // Backward's scratch (chapter 1: 17C a token, 12C of it split by tp), and in a pipeline
    // each slot's gradient buffer (chapter 4), where the next stage's gradient arrives.
    let slots = if layout.pp > 1 { in_flight as f64 } else { 0.0 };
    let scratch = ((5.0 + 12.0 / layout.tp as f64) * input + slots * input) * tokens * sizes.activation;
    Memory {
        stage: s,
        parameters: bytes(Category::Parameters),
        gradients: bytes(Category::Gradients),
        optimizer_state: bytes(Category::OptimizerState),
        activations,
        pipeline_in_flight,
        communication: bytes(Category::Communication),
        scratch,
        activations_without_recompute: none_one + none_others,
        model_state_theory: theory,
        in_flight,
    }
}

/// The rank that needs the most: the first data-parallel rank (it owns the most real floats)
/// of the fullest stage. `in_flight[s]` is stage s's micro-batch-chunks in flight.
pub fn memory(problem: &Problem, layout: &Layout, in_flight: impl Fn(usize) -> usize) -> Memory {
    fullest_stages(layout.pp)
        .into_iter()
        .map(|s| stage_memory(problem, layout, s, in_flight(s), 0))
        .max_by(|a, b| a.total().total_cmp(&b.total()))
        .expect("at least one stage")
}
// ANCHOR_END: memory
