//! All parameters in one flat buffer, with a named view per tensor (llm.c's layout, with
//! Hugging Face's names next to the ranges).
//!
//! One buffer means: the gradient is one buffer of the same layout, AdamW is one loop, a
//! data-parallel all-reduce is one call, a bucket or a ZeRO shard is a range. The names and
//! shapes are Hugging Face GPT-2's (`h.3.mlp.c_fc.weight`, Conv1D weights stored [in, out]), so a
//! checkpoint is this buffer cut along the ranges, minus the vocabulary padding.
//!
//! Each tensor also says which part of the model it belongs to (the embeddings, a block, the
//! head: what a pipeline stage holds and what backward finishes together) and how it divides
//! among tensor-parallel ranks (its [`Placement`]). The layouts of a shard, and the helpers that
//! cut a full buffer into shards and gather them back, are derived from these by name, so every
//! parallel layout starts from chapter 1's parameters exactly.

use crate::config::ModelConfig;
use kernels::{View, ViewMut};
use std::ops::Range;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// AdamW's weight decay applies to matmul weights and embeddings, not to biases and
    /// LayerNorm parameters.
    pub weight_decay: bool,
    pub part: Part,
    pub placement: Placement,
}

/// The piece of the model a tensor belongs to: the pieces run separately (a pipeline stage runs
/// some blocks; the first stage adds the embeddings, the last the head), and backward finishes
/// each piece's gradients together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// wte and wpe (wte is also the head's output projection: tied).
    Embeddings,
    Block(usize),
    /// The final LayerNorm.
    Head,
}

// ANCHOR: placement
/// How a tensor divides among the ranks of a tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Every rank holds all of it (LayerNorms, position embeddings, the biases added after a
    /// row-parallel matmul's sum).
    Replicated,
    /// Cut along `axis` into equal pieces, one per rank. With `groups` > 1 the axis holds that
    /// many consecutive blocks and each is cut separately: c_attn's output is [q | k | v], and a
    /// rank owns the same heads of all three.
    Split { axis: usize, groups: usize },
}
// ANCHOR_END: placement

impl Placement {
    /// Column-parallel: the output features (the last axis) are split, by heads or by MLP units.
    pub const fn columns(groups: usize) -> Placement {
        Placement::Split { axis: 1, groups }
    }
    /// Row-parallel: a [in, out] weight split along its input features.
    pub const ROWS: Placement = Placement::Split { axis: 0, groups: 1 };
    /// A 1-D tensor (a column-parallel bias) split in `groups` blocks.
    pub const fn vector(groups: usize) -> Placement {
        Placement::Split { axis: 0, groups }
    }
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// The tensors of one transformer block, in checkpoint order. `T` is `&[f32]` for parameters,
/// `&mut [f32]` for gradients.
#[derive(Debug)]
pub struct BlockParams<T> {
    pub ln_1_weight: T,
    pub ln_1_bias: T,
    pub attn_c_attn_weight: T,
    pub attn_c_attn_bias: T,
    pub attn_c_proj_weight: T,
    pub attn_c_proj_bias: T,
    pub ln_2_weight: T,
    pub ln_2_bias: T,
    pub mlp_c_fc_weight: T,
    pub mlp_c_fc_bias: T,
    pub mlp_c_proj_weight: T,
    pub mlp_c_proj_bias: T,
}

/// Every tensor of the model, in checkpoint order.
#[derive(Debug)]
pub struct GptParams<T> {
    /// [Vp, C]: token embedding, tied with the output projection.
    pub wte: T,
    /// [block_size, C]
    pub wpe: T,
    pub blocks: Vec<BlockParams<T>>,
    pub ln_f_weight: T,
    pub ln_f_bias: T,
}

// ANCHOR: block_tensors
/// (suffix, shape as a function of C, decayed?, how it splits) for the tensors of one block, in
/// order. The last column is Megatron's recipe: each branch's first matmul is column-parallel
/// (c_attn by heads, its q, k and v alike; c_fc by MLP units), its output projection
/// row-parallel, and what is added after the row-parallel sum (its bias) or normalises the
/// replicated stream (the LayerNorms) is replicated.
fn block_tensors(c: usize) -> [(&'static str, Vec<usize>, bool, Placement); 12] {
    use Placement::Replicated;
    let (columns, vector, rows) = (Placement::columns, Placement::vector, Placement::ROWS);
    [
        ("ln_1.weight", vec![c], false, Replicated),
        ("ln_1.bias", vec![c], false, Replicated),
        ("attn.c_attn.weight", vec![c, 3 * c], true, columns(3)),
        ("attn.c_attn.bias", vec![3 * c], false, vector(3)),
        ("attn.c_proj.weight", vec![c, c], true, rows),
        ("attn.c_proj.bias", vec![c], false, Replicated),
        ("ln_2.weight", vec![c], false, Replicated),
        ("ln_2.bias", vec![c], false, Replicated),
        ("mlp.c_fc.weight", vec![c, 4 * c], true, columns(1)),
        ("mlp.c_fc.bias", vec![4 * c], false, vector(1)),
        ("mlp.c_proj.weight", vec![4 * c, c], true, rows),
        ("mlp.c_proj.bias", vec![c], false, Replicated),
    ]
}
// ANCHOR_END: block_tensors

/// Where each named tensor lives in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub total: usize,
    pub n_layer: usize,
}

// ANCHOR: param_layout
impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> ParamLayout {
        let c = cfg.n_embd;
        // The embedding is vocabulary-parallel: each rank holds a range of the (padded) rows.
        let mut named: Vec<(String, Vec<usize>, bool, Part, Placement)> = vec![
            ("wte.weight".into(), vec![cfg.padded_vocab_size(), c], true, Part::Embeddings, Placement::ROWS),
            ("wpe.weight".into(), vec![cfg.block_size, c], true, Part::Embeddings, Placement::Replicated),
        ];
        for layer in 0..cfg.n_layer {
            for (suffix, shape, decay, placement) in block_tensors(c) {
                named.push((format!("h.{layer}.{suffix}"), shape, decay, Part::Block(layer), placement));
            }
        }
        named.push(("ln_f.weight".into(), vec![c], false, Part::Head, Placement::Replicated));
        named.push(("ln_f.bias".into(), vec![c], false, Part::Head, Placement::Replicated));
        ParamLayout::from_named(named, cfg.n_layer)
    }
    // ANCHOR_END: param_layout

    /// Specs laid out back to back in the order given.
    fn from_named(named: Vec<(String, Vec<usize>, bool, Part, Placement)>, n_layer: usize) -> ParamLayout {
        let mut offset = 0;
        let specs = named
            .into_iter()
            .map(|(name, shape, weight_decay, part, placement)| {
                let spec = ParamSpec { name, shape, offset, weight_decay, part, placement };
                offset += spec.numel();
                spec
            })
            .collect();
        ParamLayout { specs, total: offset, n_layer }
    }

    /// The tensors (index range into `specs`) of one part of the model.
    pub fn part_tensors(&self, part: Part) -> Range<usize> {
        let start = self.specs.iter().position(|s| s.part == part).unwrap_or(self.specs.len());
        let len = self.specs[start..].iter().take_while(|s| s.part == part).count();
        start..start + len
    }

    /// The parts of the model in the order backward finishes their gradients: the head (ln_f),
    /// block L-1, ..., block 0, then the embeddings (wte last of all: it collects the output
    /// projection's gradient first and the embedding's at the very end).
    pub fn backward_order(&self) -> Vec<Part> {
        let blocks = (0..self.n_layer).rev().map(Part::Block);
        std::iter::once(Part::Head).chain(blocks).chain(std::iter::once(Part::Embeddings)).collect()
    }

    /// The groups of tensors (index ranges into `specs`) whose gradients backward finishes
    /// together, in the order it finishes them ([`ParamLayout::backward_order`]).
    pub fn backward_units(&self) -> Vec<Range<usize>> {
        self.backward_order().into_iter().map(|part| self.part_tensors(part)).collect()
    }

    // ANCHOR: shard_layout
    /// The layout of tensor-parallel rank `rank` of `n`: every split tensor's split axis
    /// divided by `n`, in the same order. Fails, naming the tensor, when `n` does not divide it.
    pub fn shard(&self, n: usize) -> Result<ParamLayout, ShardError> {
        let named = self
            .specs
            .iter()
            .map(|spec| {
                let mut shape = spec.shape.clone();
                if let Placement::Split { axis, groups } = spec.placement {
                    if n == 0 || !shape[axis].is_multiple_of(groups * n) {
                        return Err(ShardError { name: spec.name.clone(), len: shape[axis], n, groups });
                    }
                    shape[axis] /= n;
                }
                Ok((spec.name.clone(), shape, spec.weight_decay, spec.part, spec.placement))
            })
            .collect::<Result<_, _>>()?;
        Ok(ParamLayout::from_named(named, self.n_layer))
    }
    // ANCHOR_END: shard_layout

    // ANCHOR: shard_buffer
    /// Copies rank `rank`'s piece of every tensor of `full` (in this layout) into `out` (in
    /// `shard`, this layout's [`ParamLayout::shard`] for `n` ranks).
    pub fn take_shard(&self, shard: &ParamLayout, full: &[f32], rank: usize, n: usize, out: &mut [f32]) {
        for (whole, piece) in self.specs.iter().zip(&shard.specs) {
            let (src, dst) = (&full[whole.range()], &mut out[piece.range()]);
            for (from, to) in shard_copies(whole, rank, n) {
                dst[to..to + from.len()].copy_from_slice(&src[from]);
            }
        }
    }

    /// The inverse of [`ParamLayout::take_shard`]: writes `piece` (rank `rank`'s, in `shard`)
    /// into its place in `full`. Gathering all `n` ranks' pieces rebuilds the full buffer
    /// (replicated tensors are written by each, with the same values).
    pub fn put_shard(&self, shard: &ParamLayout, piece: &[f32], rank: usize, n: usize, full: &mut [f32]) {
        for (whole, part) in self.specs.iter().zip(&shard.specs) {
            let (src, dst) = (&piece[part.range()], &mut full[whole.range()]);
            for (from, to) in shard_copies(whole, rank, n) {
                dst[from.clone()].copy_from_slice(&src[to..to + from.len()]);
            }
        }
    }
    // ANCHOR_END: shard_buffer

    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// Named read-only views into `buf`, on whichever device it lives.
    pub fn views<'a>(&self, buf: View<'a>) -> GptParams<View<'a>> {
        GptParams::from_pieces(self.tensor_views(buf).into_iter(), self.n_layer)
    }

    /// One read-only view per tensor of `buf`, in `specs` order (for a layout that holds only
    /// some of the model's tensors, whose views are not a whole [`GptParams`]).
    pub fn tensor_views<'a>(&self, buf: View<'a>) -> Vec<View<'a>> {
        assert_eq!(buf.len(), self.total, "buffer does not match the layout");
        self.specs.iter().map(|spec| buf.slice(spec.range())).collect()
    }

    // ANCHOR: views_mut
    /// Named writable views into `buf` (each tensor a disjoint mutable view, cut off the front
    /// of what is left as `split_at_mut` cuts a slice).
    pub fn views_mut<'a>(&self, buf: ViewMut<'a>) -> GptParams<ViewMut<'a>> {
        GptParams::from_pieces(self.tensor_views_mut(buf).into_iter(), self.n_layer)
    }

    /// One writable view per tensor of `buf`, in `specs` order.
    pub fn tensor_views_mut<'a>(&self, buf: ViewMut<'a>) -> Vec<ViewMut<'a>> {
        assert_eq!(buf.len(), self.total, "buffer does not match the layout");
        let mut rest = Some(buf);
        let pieces = self.specs.iter().map(|spec| {
            let (piece, tail) = rest.take().expect("one tail per tensor").split_at_mut(spec.numel());
            rest = Some(tail);
            piece
        });
        pieces.collect()
    }
    // ANCHOR_END: views_mut
}

/// A tensor that does not divide among the ranks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name} cannot be split {n} ways: its split axis has {len} entries in {groups} group(s)")]
pub struct ShardError {
    pub name: String,
    pub len: usize,
    pub n: usize,
    pub groups: usize,
}

/// The contiguous runs that make up rank `rank`'s piece of a tensor: (range in the full tensor,
/// offset in the piece), in order. A tensor [rows, cols] split on axis 1 into `groups` blocks
/// gives each rank, in every row, `groups` runs of cols/(groups·n); split on axis 0, one run of
/// whole rows. Replicated: the whole tensor.
fn shard_copies(spec: &ParamSpec, rank: usize, n: usize) -> Vec<(Range<usize>, usize)> {
    let Placement::Split { axis, groups } = spec.placement else {
        return vec![(0..spec.numel(), 0)];
    };
    // Everything after the split axis is one contiguous "inner" run per index of the axis.
    let inner: usize = spec.shape[axis + 1..].iter().product();
    let outer: usize = spec.shape[..axis].iter().product();
    let block = spec.shape[axis] / groups; // one group's length along the axis
    let mine = block / n; // this rank's length within a group
    let mut runs = Vec::with_capacity(outer * groups);
    let mut at = 0;
    for o in 0..outer {
        for g in 0..groups {
            let start = (o * spec.shape[axis] + g * block + rank * mine) * inner;
            runs.push((start..start + mine * inner, at));
            at += mine * inner;
        }
    }
    runs
}

impl<T> BlockParams<T> {
    /// The block's tensors in layout order.
    pub fn tensors(&self) -> Vec<&T> {
        vec![
            &self.ln_1_weight,
            &self.ln_1_bias,
            &self.attn_c_attn_weight,
            &self.attn_c_attn_bias,
            &self.attn_c_proj_weight,
            &self.attn_c_proj_bias,
            &self.ln_2_weight,
            &self.ln_2_bias,
            &self.mlp_c_fc_weight,
            &self.mlp_c_fc_bias,
            &self.mlp_c_proj_weight,
            &self.mlp_c_proj_bias,
        ]
    }
}

impl<T> GptParams<T> {
    /// Every tensor, in layout (checkpoint) order: index i is `ParamLayout::specs[i]`.
    pub fn tensors(&self) -> Vec<&T> {
        let mut out = vec![&self.wte, &self.wpe];
        out.extend(self.blocks.iter().flat_map(BlockParams::tensors));
        out.extend([&self.ln_f_weight, &self.ln_f_bias]);
        out
    }

    fn from_pieces(pieces: impl Iterator<Item = T>, n_layer: usize) -> GptParams<T> {
        let mut it = pieces;
        let mut next = || it.next().expect("layout has every tensor");
        let wte = next();
        let wpe = next();
        let blocks = (0..n_layer).map(|_| BlockParams::from_tensors(&mut next)).collect();
        GptParams { wte, wpe, blocks, ln_f_weight: next(), ln_f_bias: next() }
    }
}

impl<T> BlockParams<T> {
    /// A block from its tensors in layout order, each taken from `next` (a pipeline stage builds
    /// its blocks from its own buffer this way).
    pub fn from_tensors(mut next: impl FnMut() -> T) -> BlockParams<T> {
        BlockParams {
            ln_1_weight: next(),
            ln_1_bias: next(),
            attn_c_attn_weight: next(),
            attn_c_attn_bias: next(),
            attn_c_proj_weight: next(),
            attn_c_proj_bias: next(),
            ln_2_weight: next(),
            ln_2_bias: next(),
            mlp_c_fc_weight: next(),
            mlp_c_fc_bias: next(),
            mlp_c_proj_weight: next(),
            mlp_c_proj_bias: next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_124m_has_the_published_parameter_count() {
        let cfg = ModelConfig::preset("gpt2", 50257).unwrap();
        let layout = ParamLayout::new(&cfg);
        // 124,439,808 with the real vocabulary; padding adds (50304 - 50257) * 768 = 36,096.
        assert_eq!(layout.total, 124_439_808 + 36_096);
        assert_eq!(layout.specs.len(), 2 + 12 * 12 + 2);
        assert_eq!(layout.get("h.11.mlp.c_proj.weight").unwrap().shape, vec![3072, 768]);
    }

    #[test]
    fn views_cover_the_buffer_in_order() {
        let cfg = ModelConfig::preset("tiny", 256).unwrap();
        let layout = ParamLayout::new(&cfg);
        let mut buf: Vec<f32> = (0..layout.total).map(|i| i as f32).collect();
        let spec = layout.get("h.1.attn.c_proj.bias").unwrap().clone();
        let views = layout.views_mut(ViewMut::Cpu(&mut buf));
        assert_eq!(views.blocks[1].attn_c_proj_bias.as_slice()[0], spec.offset as f32);
        assert_eq!(views.ln_f_bias.as_slice().last().copied(), Some((layout.total - 1) as f32));
        for (tensor, spec) in views.tensors().iter().zip(&layout.specs) {
            let tensor = tensor.as_slice();
            assert_eq!((tensor.len(), tensor[0]), (spec.numel(), spec.offset as f32), "{}", spec.name);
        }
    }
}
