//! A pipeline stage's share of the model: a contiguous range of blocks, with the embeddings on
//! the first stage and the final LayerNorm on the last. The output projection is the token
//! embedding (tied), so the last stage holds a copy of `wte` too, and the two copies' gradients
//! are summed every step (`Instr::ReduceTiedGrads`) so that they stay identical.
//!
//! A stage's tensors are one flat buffer, like chapter 1's, laid out by a layout cut from
//! chapter 1's by name: so a stage's parameters, gradients and Adam moments are exactly its
//! share, and gathering the stages' buffers by name rebuilds chapter 1's.

use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::params::{BlockParams, ParamLayout, ParamSpec, Part};
use std::ops::Range;

// ANCHOR: partition
/// Blocks of each of `stages` stages: contiguous, as even as possible, the first stages taking
/// one more when `n_layer` does not divide.
pub fn uniform_partition(n_layer: usize, stages: usize) -> Vec<Range<usize>> {
    let (each, extra) = (n_layer / stages, n_layer % stages);
    let mut start = 0;
    (0..stages)
        .map(|s| {
            let len = each + usize::from(s < extra);
            start += len;
            start - len..start
        })
        .collect()
}
// ANCHOR_END: partition

/// How the blocks are divided among the stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Partition {
    /// The same number of blocks on every stage (the first stages take one more if need be).
    Uniform,
    /// The stages' estimated costs (the head's included) as even as they can be.
    Balanced,
}

// ANCHOR: part_costs
/// Estimated work per token of each part of the model, forward and backward: chapter 1's model
/// FLOPs (`ModelConfig::flops_per_token`), split by difference into a block's share and the
/// output projection's. The embeddings are a lookup: free by this count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PartCosts {
    pub block: f64,
    pub head: f64,
}

impl PartCosts {
    pub fn estimate(model: &ModelConfig, t: usize) -> PartCosts {
        let flops = |n_layer| ModelConfig { n_layer, ..model.clone() }.flops_per_token(t);
        PartCosts { block: flops(1) - flops(0), head: flops(0) }
    }

    /// The cost of stage `s` of `n` holding `blocks`.
    pub fn stage(&self, s: usize, n: usize, blocks: &Range<usize>) -> f64 {
        blocks.len() as f64 * self.block + if s + 1 == n { self.head } else { 0.0 }
    }
}

/// Contiguous blocks for each stage such that the slowest stage is as fast as it can be, and,
/// among the partitions that achieve that, the stages are as even as they can be (the least sum
/// of squared stage costs).
pub fn balanced_partition(n_layer: usize, stages: usize, costs: &PartCosts) -> Vec<Range<usize>> {
    let cost = |s: usize, blocks: Range<usize>| costs.stage(s, stages, &blocks);
    let (slowest, _) = best_split(n_layer, stages, cost, f64::max);
    let fits = |c: f64| if c <= slowest * (1.0 + 1e-12) { c * c } else { f64::INFINITY };
    best_split(n_layer, stages, |s, b| fits(cost(s, b)), |a, b| a + b).1
}

/// The split of `n_layer` blocks into `stages` non-empty contiguous ranges that minimises the
/// `combine` of every stage's `value`, by dynamic programming over (stages, blocks covered).
fn best_split(
    n_layer: usize,
    stages: usize,
    value: impl Fn(usize, Range<usize>) -> f64,
    combine: impl Fn(f64, f64) -> f64,
) -> (f64, Vec<Range<usize>>) {
    // best[s][l]: the best value of the first s stages covering blocks 0..l, and where stage s-1
    // starts.
    let mut best = vec![vec![(f64::INFINITY, 0); n_layer + 1]; stages + 1];
    best[0][0] = (0.0, 0);
    for s in 1..=stages {
        for l in s..=n_layer {
            for start in s - 1..l {
                let v = combine(best[s - 1][start].0, value(s - 1, start..l));
                // On a tie the later start wins: earlier stages take the extra blocks, as in the
                // uniform partition.
                if v <= best[s][l].0 {
                    best[s][l] = (v, start);
                }
            }
        }
    }
    let mut ranges = vec![0..0; stages];
    let mut end = n_layer;
    for s in (1..=stages).rev() {
        let start = best[s][end].1;
        ranges[s - 1] = start..end;
        end = start;
    }
    (best[stages][n_layer].0, ranges)
}
// ANCHOR_END: part_costs

// ANCHOR: stage_layout
/// Which of chapter 1's tensors stage `s` of `n` (holding the blocks of `chunks`) keeps: its
/// blocks, the embeddings on the first stage, the final LayerNorm and the tied `wte` on the last.
pub fn holds(spec: &ParamSpec, s: usize, n: usize, chunks: &[Range<usize>]) -> bool {
    let (first, last) = (s == 0, s + 1 == n);
    match spec.part {
        Part::Block(l) => chunks.iter().any(|b| b.contains(&l)),
        Part::Embeddings => first || (last && spec.name == "wte.weight"),
        Part::Head => last,
    }
}

/// The layout of the tensors `keep` selects from `full`, in `full`'s order, packed back to
/// back. It lays out a stage's buffers; its `n_layer` is the stage's block count, and, since it
/// lacks some tensors, it is read with [`StageParams::new`], never `ParamLayout::views`.
pub fn stage_layout(full: &ParamLayout, keep: impl Fn(&ParamSpec) -> bool, n_blocks: usize) -> ParamLayout {
    let mut offset = 0;
    let specs: Vec<ParamSpec> = full
        .specs
        .iter()
        .filter(|spec| keep(spec))
        .map(|spec| {
            let spec = ParamSpec { offset, ..spec.clone() };
            offset += spec.numel();
            spec
        })
        .collect();
    ParamLayout { specs, total: offset, n_layer: n_blocks }
}
// ANCHOR_END: stage_layout

/// Copies each tensor of `from` (laid out by `from_layout`) that `to_layout` also has into `to`.
/// Cuts a stage's share out of chapter 1's buffer, and puts it back.
pub fn copy_by_name(from_layout: &ParamLayout, from: &[f32], to_layout: &ParamLayout, to: &mut [f32]) {
    for spec in &to_layout.specs {
        if let Some(src) = from_layout.get(&spec.name) {
            to[spec.range()].copy_from_slice(&from[src.range()]);
        }
    }
}

/// Named views of a stage's tensors (`T` is a view or a mutable view).
pub struct StageParams<T> {
    pub wte: Option<T>,
    pub wpe: Option<T>,
    pub blocks: Vec<BlockParams<T>>,
    pub ln_f_weight: Option<T>,
    pub ln_f_bias: Option<T>,
}

impl<T> StageParams<T> {
    /// From one view per tensor of `layout`, in its order.
    pub fn new(layout: &ParamLayout, pieces: Vec<T>) -> StageParams<T> {
        let mut p = StageParams { wte: None, wpe: None, blocks: Vec::new(), ln_f_weight: None, ln_f_bias: None };
        let mut pieces = layout.specs.iter().zip(pieces).peekable();
        while let Some((spec, piece)) = pieces.next() {
            match spec.name.as_str() {
                "wte.weight" => p.wte = Some(piece),
                "wpe.weight" => p.wpe = Some(piece),
                "ln_f.weight" => p.ln_f_weight = Some(piece),
                "ln_f.bias" => p.ln_f_bias = Some(piece),
                _ => {
                    // The first tensor of a block: the next ones are the rest of it, in order.
                    let mut first = Some(piece);
                    let block = BlockParams::from_tensors(|| match first.take() {
                        Some(t) => t,
                        None => pieces.next().map(|(_, t)| t).expect("a block's tensors are consecutive"),
                    });
                    p.blocks.push(block);
                }
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_balanced_partition_gives_the_head_stage_fewer_blocks() {
        // Byte vocabulary: the head is cheap, and the blocks split evenly.
        let small = ModelConfig { n_layer: 8, n_head: 4, n_embd: 128, block_size: 128, vocab_size: 256 };
        let costs = PartCosts::estimate(&small, 128);
        assert_eq!(balanced_partition(8, 4, &costs), vec![0..2, 2..4, 4..6, 6..8]);
        // GPT-2's vocabulary: at this width the head costs 28 blocks, so the last stage gets one
        // block and the others share the rest as evenly as they can.
        let bpe = ModelConfig { vocab_size: 50257, ..small };
        let costs = PartCosts::estimate(&bpe, 128);
        assert!((costs.head / costs.block - 28.0).abs() < 0.1, "{costs:?}");
        assert_eq!(balanced_partition(8, 4, &costs), vec![0..3, 3..5, 5..7, 7..8]);
        // Never worse than uniform in its slowest stage.
        for (n_layer, stages) in [(12, 4), (8, 3), (5, 5), (24, 7)] {
            let slowest = |parts: &[Range<usize>]| {
                parts.iter().enumerate().map(|(s, b)| costs.stage(s, stages, b)).fold(0.0, f64::max)
            };
            let balanced = balanced_partition(n_layer, stages, &costs);
            assert_eq!(balanced.iter().map(|b| b.len()).sum::<usize>(), n_layer);
            assert!(balanced.iter().all(|b| !b.is_empty()));
            assert!(slowest(&balanced) <= slowest(&uniform_partition(n_layer, stages)));
        }
    }

    #[test]
    fn stages_hold_every_tensor_once_except_the_tied_embedding() {
        let cfg = ModelConfig { n_layer: 5, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 200 };
        let full = ParamLayout::new(&cfg);
        let parts = uniform_partition(5, 3);
        assert_eq!(parts, vec![0..2, 2..4, 4..5]);
        let layouts: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(s, b)| stage_layout(&full, |spec| holds(spec, s, 3, std::slice::from_ref(b)), b.len()))
            .collect();
        let wte = full.get("wte.weight").unwrap().numel();
        assert_eq!(layouts.iter().map(|l| l.total).sum::<usize>(), full.total + wte, "wte twice, the rest once");
        assert_eq!(layouts[2].specs.first().map(|s| s.name.as_str()), Some("wte.weight"));
        assert!(layouts[1].get("wte.weight").is_none() && layouts[1].get("h.2.ln_1.weight").is_some());
        // Cut out and put back: chapter 1's buffer again.
        let params: Vec<f32> = (0..full.total).map(|i| i as f32).collect();
        let mut gathered = vec![0.0; full.total];
        for layout in &layouts {
            let mut mine = vec![0.0; layout.total];
            copy_by_name(&full, &params, layout, &mut mine);
            copy_by_name(layout, &mine, &full, &mut gathered);
            let views = StageParams::new(layout, layout.tensor_views(kernels::View::Cpu(&mine)));
            assert_eq!(views.blocks.len(), layout.n_layer);
        }
        assert_eq!(gathered, params);
    }
}
