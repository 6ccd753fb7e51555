//! ZeRO's shard arithmetic and its memory formulas.
//!
//! The flat buffer is cut into units, the pieces of the model that run and finish together
//! (the embeddings, each block, the head: `ParamLayout::part_tensors`). Every unit is sharded on
//! its own, as PyTorch's FSDP shards each wrapped module: unit u of L_u floats is padded to
//! P_u = N·⌈L_u/N⌉ and rank r holds floats [r·S_u, (r+1)·S_u) of it (S_u = P_u/N), the
//! ring's chunk r. A unit is then one reduce-scatter (its gradient) and one all-gather (its
//! parameters) with no bookkeeping: ZeRO-2 reduces a unit the moment backward finishes it, and
//! ZeRO-3 gathers one block just before it runs. A rank's Adam moments cover its real floats
//! only; the padding (at most N-1 floats a unit) is zeros that nobody updates.

use ch01_single_gpu::params::{ParamLayout, Part};
use kernels::Category;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// `--zero`: what is sharded over the data-parallel group (each stage adds one thing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ZeroStage(u8);

impl ZeroStage {
    pub const NONE: ZeroStage = ZeroStage(0);
    /// The highest stage.
    pub const MAX: u8 = 3;

    /// Stage `n`, or `None` above 3.
    pub fn new(n: u8) -> Option<ZeroStage> {
        (n <= Self::MAX).then_some(ZeroStage(n))
    }
    pub fn number(self) -> u8 {
        self.0
    }
    /// Stage 1 and up: Adam's moments.
    pub fn shards_optimizer(self) -> bool {
        self.0 >= 1
    }
    /// Stage 2 and up: the gradients too.
    pub fn shards_gradients(self) -> bool {
        self.0 >= 2
    }
    /// Stage 3: the parameters too.
    pub fn shards_parameters(self) -> bool {
        self.0 >= 3
    }
}

impl std::fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

// ANCHOR: unit
/// One unit of the flat buffer and how it divides among N ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub part: Part,
    /// Its floats in the flat buffer (chapter 1's layout).
    pub range: Range<usize>,
    /// S_u: the floats of each rank's shard, padding included.
    pub shard: usize,
}

impl Unit {
    /// L_u: the unit's floats.
    pub fn len(&self) -> usize {
        self.range.len()
    }
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
    /// P_u = N·S_u: the padded length a collective moves.
    pub fn padded(&self, n: usize) -> usize {
        self.shard * n
    }
    /// Rank r's real floats, in the flat buffer: [r·S_u, (r+1)·S_u) of the unit, cut at its end
    /// (the last ranks' shards may hold padding, or be padding entirely).
    pub fn owned(&self, rank: usize) -> Range<usize> {
        // EXERCISE(ch06-shard-range, points = 5): rank r's S_u floats start r·S_u into the unit; cut both ends at the unit's end, so that padding is never owned
        // TESTS: -p ch06-zero-checkpointing --lib -- zero::tests::units_tile_the_buffer_and_shards_tile_each_unit zero::tests::predictions_without_padding_are_the_papers_terms_plus_named_buffers
        let start = (self.range.start + rank * self.shard).min(self.range.end);
        start..(start + self.shard).min(self.range.end)
        // WRONG(owns the padding, past the unit's end): `(start + self.shard).min(self.range.end)` -> `start + self.shard`
        // END EXERCISE
    }
}

/// The units of `layout` in layout order (embeddings, blocks 0..L, head), sharded `n` ways.
pub fn units(layout: &ParamLayout, n: usize) -> Vec<Unit> {
    let parts = std::iter::once(Part::Embeddings).chain((0..layout.n_layer).map(Part::Block)).chain([Part::Head]);
    parts
        .map(|part| {
            let tensors = layout.part_tensors(part);
            let range = layout.specs[tensors.start].offset..layout.specs[tensors.end - 1].range().end;
            Unit { part, shard: range.len().div_ceil(n), range }
        })
        .collect()
}
// ANCHOR_END: unit

// ANCHOR: theory
/// Bytes per parameter of the three kinds of model state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateBytes {
    pub parameter: f64,
    pub gradient: f64,
    /// Everything the optimizer keeps: Adam's two moments, and the f32 master weights where the
    /// parameters are not f32 themselves.
    pub optimizer: f64,
}

impl StateBytes {
    /// This chapter's runs: f32 parameters and gradients, two f32 moments (4 + 4 + 8 = 16).
    pub const F32: StateBytes = StateBytes { parameter: 4.0, gradient: 4.0, optimizer: 8.0 };
    /// The ZeRO paper's mixed precision: fp16 parameters and gradients, and an f32 master copy
    /// and two f32 moments (2 + 2 + 12 = 16).
    pub const MIXED: StateBytes = StateBytes { parameter: 2.0, gradient: 2.0, optimizer: 12.0 };
}

/// Model state per rank, in bytes, by the ZeRO paper's formulas for Ψ parameters on N ranks:
/// each stage divides one more kind by N.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateMemory {
    pub parameters: f64,
    pub gradients: f64,
    pub optimizer: f64,
}

impl StateMemory {
    pub fn total(&self) -> f64 {
        self.parameters + self.gradients + self.optimizer
    }
}

pub fn theory(stage: ZeroStage, psi: f64, n: f64, bytes: StateBytes) -> StateMemory {
    let share = |sharded: bool| if sharded { 1.0 / n } else { 1.0 };
    StateMemory {
        parameters: bytes.parameter * psi * share(stage.shards_parameters()),
        gradients: bytes.gradient * psi * share(stage.shards_gradients()),
        optimizer: bytes.optimizer * psi * share(stage.shards_optimizer()),
    }
}
// ANCHOR_END: theory

/// One named term of a prediction: `theory` marks the paper's terms (the others are what this
/// implementation keeps on top: padding, gathered units, staging buffers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term {
    pub category: Category,
    pub name: String,
    pub bytes: u64,
    pub theory: bool,
}

/// The peak bytes of each category the ledger must show on one rank, as named terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prediction {
    pub terms: Vec<Term>,
}

impl Prediction {
    pub fn bytes(&self, category: Category) -> u64 {
        self.terms.iter().filter(|t| t.category == category).map(|t| t.bytes).sum()
    }
    /// The paper's terms only.
    pub fn theory_bytes(&self, category: Category) -> u64 {
        self.terms.iter().filter(|t| t.category == category && t.theory).map(|t| t.bytes).sum()
    }
    /// One category as "a + b (name) + ...".
    pub fn describe(&self, category: Category) -> String {
        let terms: Vec<String> = self
            .terms
            .iter()
            .filter(|t| t.category == category)
            .map(|t| format!("{} {}", t.name, kernels::memory::format_bytes(t.bytes)))
            .collect();
        if terms.is_empty() { "0".into() } else { terms.join(" + ") }
    }
}

// ANCHOR: predict
/// What rank `rank` of `n` holds at its peak, in f32 (4 bytes a float), category by category:
/// the ZeRO paper's terms for Ψ = the layout's floats, plus what this implementation keeps.
///
/// - Parameters: 4Ψ, or (stage 3) the rank's shard, 4Ψ/N, plus its padding, plus the gathered
///   units held at once: the embeddings (wte is the head's projection too, so they stay
///   gathered through a whole forward and a whole backward) and the larger of a block and
///   the head (one at a time).
/// - Gradients: 4Ψ, or (stages 2, 3) the reduced shard, 4Ψ/N plus padding, plus the units
///   being computed: the embeddings' (from the head's backward to the end) and the larger of
///   a block's and the head's.
/// - Optimizer state: 8Ψ, or (stages 1-3) 8 bytes for each of the rank's real floats (8Ψ/N
///   when N divides every unit).
/// - Communication: the staging buffers a collective needs where a unit's padding stops it from
///   working in place: the largest padded unit P_u (stages 1, 2), and one shard S_u to send
///   and receive (stages 1-3).
pub fn predict(stage: ZeroStage, units: &[Unit], n: usize, rank: usize) -> Prediction {
    let f = 4u64; // bytes of an f32
    let psi: usize = units.iter().map(Unit::len).sum();
    let owned: usize = units.iter().map(|u| u.owned(rank).len()).sum();
    let shard: usize = units.iter().map(|u| u.shard).sum();
    let max_padded = |keep: &dyn Fn(&Unit) -> bool| units.iter().filter(|u| keep(u)).map(|u| u.padded(n)).max();
    let embeddings = max_padded(&|u| u.part == Part::Embeddings).unwrap_or(0);
    let largest_other = max_padded(&|u| u.part != Part::Embeddings).unwrap_or(0);
    let mut terms = Vec::new();
    let mut term = |category, name: &str, floats: usize, theory| {
        if floats > 0 || theory {
            terms.push(Term { category, name: name.into(), bytes: f * floats as u64, theory });
        }
    };
    let sharded = |term: &mut dyn FnMut(Category, &str, usize, bool), category, what: &str| {
        term(category, &format!("{what} shard (Ψ/N)"), owned, true);
        term(category, "padding", shard - owned, false);
        term(category, "embeddings unit in use", embeddings, false);
        term(category, "largest other unit in use", largest_other, false);
    };
    match stage.shards_parameters() {
        true => sharded(&mut term, Category::Parameters, "parameter"),
        false => term(Category::Parameters, "parameters (Ψ)", psi, true),
    }
    match stage.shards_gradients() {
        true => sharded(&mut term, Category::Gradients, "gradient"),
        false => term(Category::Gradients, "gradients (Ψ)", psi, true),
    }
    match stage.shards_optimizer() {
        true => term(Category::OptimizerState, "Adam m, v of the shard (2Ψ/N)", 2 * owned, true),
        false => term(Category::OptimizerState, "Adam m, v (2Ψ)", 2 * psi, true),
    }
    if stage.shards_optimizer() {
        let padded_units = units.iter().filter(|u| u.len() != u.padded(n));
        let staging = if stage.shards_parameters() { 0 } else { padded_units.map(|u| u.padded(n)).max().unwrap_or(0) };
        term(Category::Communication, "staging for a padded unit", staging, false);
        let largest_shard = units.iter().map(|u| u.shard).max().unwrap_or(0);
        let sends = if stage.shards_parameters() { 1 } else { 2 }; // stage 3 gathers from its shard
        term(Category::Communication, "shard-sized send/receive buffers", sends * largest_shard, false);
    }
    Prediction { terms }
}
// ANCHOR_END: predict

#[cfg(test)]
mod tests {
    use super::*;
    use ch01_single_gpu::config::ModelConfig;

    #[test]
    fn units_tile_the_buffer_and_shards_tile_each_unit() {
        let layout = ParamLayout::new(&ModelConfig::preset("tiny", 256).unwrap());
        for n in [1, 2, 3, 4, 7] {
            let units = units(&layout, n);
            assert_eq!(units.len(), layout.n_layer + 2);
            assert_eq!(units.first().map(|u| u.range.start), Some(0));
            assert_eq!(units.last().map(|u| u.range.end), Some(layout.total));
            for pair in units.windows(2) {
                assert_eq!(pair[0].range.end, pair[1].range.start);
            }
            for u in &units {
                assert!(u.padded(n) >= u.len() && u.padded(n) - u.len() < n, "{u:?}: padding under n");
                let covered: usize = (0..n).map(|r| u.owned(r).len()).sum();
                assert_eq!(covered, u.len(), "{u:?} on {n} ranks");
                for r in 1..n {
                    assert_eq!(u.owned(r - 1).end, u.owned(r).start, "contiguous in rank order");
                }
            }
        }
    }

    #[test]
    fn the_f32_formulas_are_16_8_plus_8_4_plus_12_and_16_over_n() {
        let (psi, n) = (1e6, 8.0);
        let total = |s| theory(ZeroStage::new(s).unwrap(), psi, n, StateBytes::F32).total();
        assert_eq!(total(0), 16.0 * psi);
        assert_eq!(total(1), 8.0 * psi + 8.0 * psi / n);
        assert_eq!(total(2), 4.0 * psi + 12.0 * psi / n);
        assert_eq!(total(3), 16.0 * psi / n);
    }

    // ANCHOR: paper_test
    #[test]
    fn the_zero_papers_7_5b_model_on_64_gpus_needs_120_31_4_16_6_and_1_9_gb() {
        // Rajbhandari et al. 2020, figure 1: Ψ = 7.5B, N = 64, mixed precision (K = 12).
        let gb = |s| theory(ZeroStage::new(s).unwrap(), 7.5e9, 64.0, StateBytes::MIXED).total() / 1e9;
        let rounded: Vec<f64> = (0..=3).map(|s| (gb(s) * 10.0).round() / 10.0).collect();
        assert_eq!(rounded, [120.0, 31.4, 16.6, 1.9]);
    }
    // ANCHOR_END: paper_test

    #[test]
    fn predictions_without_padding_are_the_papers_terms_plus_named_buffers() {
        let layout = ParamLayout::new(&ModelConfig::preset("tiny", 256).unwrap());
        let n = 4;
        let units = units(&layout, n);
        assert!(units.iter().all(|u| u.len() == u.padded(n)), "tiny divides 4 ways");
        for s in 0..=3 {
            let stage = ZeroStage::new(s).unwrap();
            let p = predict(stage, &units, n, 1);
            let t = theory(stage, layout.total as f64, n as f64, StateBytes::F32);
            assert_eq!(p.theory_bytes(Category::Parameters) as f64, t.parameters, "stage {s}");
            assert_eq!(p.theory_bytes(Category::Gradients) as f64, t.gradients, "stage {s}");
            assert_eq!(p.theory_bytes(Category::OptimizerState) as f64, t.optimizer, "stage {s}");
            assert!(p.terms.iter().all(|t| t.name != "padding"), "no padding term");
        }
        // Three ranks do not divide the tiny model's units: the last ranks carry the padding.
        let units = super::units(&layout, 3);
        let pad: u64 = (0..3)
            .map(|r| predict(ZeroStage::new(3).unwrap(), &units, 3, r))
            .map(|p| {
                p.terms
                    .iter()
                    .filter(|t| t.name == "padding" && t.category == Category::Parameters)
                    .map(|t| t.bytes)
                    .sum::<u64>()
            })
            .sum();
        let expected: usize = units.iter().map(|u| u.padded(3) - u.len()).sum();
        assert_eq!(pad, 4 * expected as u64, "every padded float is on exactly one rank");
    }
}
