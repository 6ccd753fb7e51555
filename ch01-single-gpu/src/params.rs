//! All parameters in one flat buffer, with a named view per tensor (llm.c's layout, with
//! Hugging Face's names next to the ranges).
//!
//! One buffer means: the gradient is one buffer of the same layout, AdamW is one loop, a
//! data-parallel all-reduce is one call, a bucket or a ZeRO shard is a range. The names and
//! shapes are Hugging Face GPT-2's (`h.3.mlp.c_fc.weight`, Conv1D weights stored [in, out]), so a
//! checkpoint is this buffer cut along the ranges, minus the vocabulary padding.

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
/// (suffix, shape as a function of C, decayed?) for the tensors of one block, in order.
fn block_tensors(c: usize) -> [(&'static str, Vec<usize>, bool); 12] {
    [
        ("ln_1.weight", vec![c], false),
        ("ln_1.bias", vec![c], false),
        ("attn.c_attn.weight", vec![c, 3 * c], true),
        ("attn.c_attn.bias", vec![3 * c], false),
        ("attn.c_proj.weight", vec![c, c], true),
        ("attn.c_proj.bias", vec![c], false),
        ("ln_2.weight", vec![c], false),
        ("ln_2.bias", vec![c], false),
        ("mlp.c_fc.weight", vec![c, 4 * c], true),
        ("mlp.c_fc.bias", vec![4 * c], false),
        ("mlp.c_proj.weight", vec![4 * c, c], true),
        ("mlp.c_proj.bias", vec![c], false),
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
        let mut named: Vec<(String, Vec<usize>, bool)> = vec![
            ("wte.weight".into(), vec![cfg.padded_vocab_size(), c], true),
            ("wpe.weight".into(), vec![cfg.block_size, c], true),
        ];
        for layer in 0..cfg.n_layer {
            for (suffix, shape, decay) in block_tensors(c) {
                named.push((format!("h.{layer}.{suffix}"), shape, decay));
            }
        }
        named.push(("ln_f.weight".into(), vec![c], false));
        named.push(("ln_f.bias".into(), vec![c], false));

        let mut offset = 0;
        let specs = named
            .into_iter()
            .map(|(name, shape, weight_decay)| {
                let spec = ParamSpec { name, shape, offset, weight_decay };
                offset += spec.numel();
                spec
            })
            .collect();
        ParamLayout { specs, total: offset, n_layer: cfg.n_layer }
    }
    // ANCHOR_END: param_layout

    /// The groups of tensors (index ranges into `specs`) whose gradients backward finishes
    /// together, in the order it finishes them: ln_f, block L-1, ..., block 0, then the two
    /// embeddings. Backward's `GradsReady` hook reports exactly these ranges.
    pub fn backward_units(&self) -> Vec<Range<usize>> {
        let n = self.specs.len();
        let blocks = (0..self.n_layer).rev().map(|l| 2 + 12 * l..2 + 12 * (l + 1));
        std::iter::once(n - 2..n).chain(blocks).chain(std::iter::once(0..2)).collect()
    }

    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// Named read-only views into `buf`, on whichever device it lives.
    pub fn views<'a>(&self, buf: View<'a>) -> GptParams<View<'a>> {
        assert_eq!(buf.len(), self.total, "buffer does not match the layout");
        let pieces = self.specs.iter().map(|spec| buf.slice(spec.range()));
        GptParams::from_pieces(pieces, self.n_layer)
    }

    // ANCHOR: views_mut
    /// Named writable views into `buf` (each tensor a disjoint mutable view, cut off the front
    /// of what is left as `split_at_mut` cuts a slice).
    pub fn views_mut<'a>(&self, buf: ViewMut<'a>) -> GptParams<ViewMut<'a>> {
        assert_eq!(buf.len(), self.total, "buffer does not match the layout");
        let mut rest = Some(buf);
        let pieces = self.specs.iter().map(|spec| {
            let (piece, tail) = rest.take().expect("one tail per tensor").split_at_mut(spec.numel());
            rest = Some(tail);
            piece
        });
        GptParams::from_pieces(pieces, self.n_layer)
    }
    // ANCHOR_END: views_mut
}

impl<T> GptParams<T> {
    /// Every tensor, in layout (checkpoint) order: index i is `ParamLayout::specs[i]`.
    pub fn tensors(&self) -> Vec<&T> {
        let mut out = vec![&self.wte, &self.wpe];
        for b in &self.blocks {
            out.extend([
                &b.ln_1_weight,
                &b.ln_1_bias,
                &b.attn_c_attn_weight,
                &b.attn_c_attn_bias,
                &b.attn_c_proj_weight,
                &b.attn_c_proj_bias,
                &b.ln_2_weight,
                &b.ln_2_bias,
                &b.mlp_c_fc_weight,
                &b.mlp_c_fc_bias,
                &b.mlp_c_proj_weight,
                &b.mlp_c_proj_bias,
            ]);
        }
        out.extend([&self.ln_f_weight, &self.ln_f_bias]);
        out
    }

    fn from_pieces(pieces: impl Iterator<Item = T>, n_layer: usize) -> GptParams<T> {
        let mut it = pieces;
        let mut next = || it.next().expect("layout has every tensor");
        let wte = next();
        let wpe = next();
        let blocks = (0..n_layer)
            .map(|_| BlockParams {
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
            })
            .collect();
        GptParams { wte, wpe, blocks, ln_f_weight: next(), ln_f_bias: next() }
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
