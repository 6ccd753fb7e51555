//! The backward pass in two halves, for zero-bubble pipeline schedules (chapter 4's `zb-h1`).
//!
//! A linear layer y = x W + b has two gradients: dL/dx = dL/dy · Wᵀ, which needs W and dL/dy,
//! and dL/dW = xᵀ · dL/dy (dL/db = Σ dL/dy), which needs x and dL/dy. The previous layer waits
//! for the first; nothing waits for the second until the optimizer step. So a block's backward
//! splits into B, the input gradients (the chain a pipeline's previous stage waits on), and W,
//! the weight gradients of the four projections, which a schedule may run later, in an idle
//! slot. B keeps, for W, the gradient at each projection's output ([`BlockOutputGrads`]); W
//! reads the projections' inputs from the forward's saved activations.
//!
//! B also computes the LayerNorms' parameter gradients: the kernels compute a LayerNorm's input
//! and parameter gradients in one op, and the latter are O(B·T·C), not a matmul's O(B·T·C²).
//! The head splits the same way (B: dL/dx through the output projection; W: its share of dwte),
//! and the embedding's backward, all weight gradient, is a W.
//!
//! Each gradient comes from the same kernel calls on the same inputs as in chapter 1's fused
//! [`BlockParams::backward`], so B then W gives the fused backward's bits (the tests check it).

use crate::config::ModelConfig;
use crate::model::{
    BackwardScratch, BlockActivations, BlockComm, BlockScratch, BlockShape, Dims, Head, HeadActivations,
};
use crate::params::BlockParams;
use kernels::comm::CommError;
use kernels::dispatch::{
    attention_backward, copy, gelu_backward, layernorm_backward, linear_backward, matmul,
    softmax_cross_entropy_backward, zero,
};
use kernels::{Category, DType, Device, MemoryLedger, Tensor, TensorError, View, ViewMut};

// ANCHOR: output_grads
/// What a block's B leaves for its W: dL/d(each projection's output). Widths as in
/// [`BlockActivations`]. Held from B to W, like the activations.
pub struct BlockOutputGrads {
    pub d_out: Tensor,   // [B, T, C]   at mlp.c_proj's output (the block's output)
    pub d_fc: Tensor,    // [B, T, M]   at mlp.c_fc's output
    pub d_res_2: Tensor, // [B, T, C]   at attn.c_proj's output (the residual after attention)
    pub d_qkv: Tensor,   // [B, T, 3A]  at attn.c_attn's output
}
// ANCHOR_END: output_grads

impl BlockOutputGrads {
    /// Buffers for one block of `shape` over passes of up to `batch` x `seq` tokens.
    pub fn new(
        shape: BlockShape,
        batch: usize,
        seq: usize,
        device: Device,
        dtype: DType,
        ledger: &MemoryLedger,
    ) -> Result<BlockOutputGrads, TensorError> {
        let t = |shape: &[usize]| Tensor::zeros_on(shape, device, dtype, Category::Activations, ledger);
        let (bt, c, w, m) = (batch * seq, shape.n_embd, shape.attn_width(), shape.mlp_hidden);
        Ok(BlockOutputGrads { d_out: t(&[bt, c])?, d_fc: t(&[bt, m])?, d_res_2: t(&[bt, c])?, d_qkv: t(&[bt, 3 * w])? })
    }

    /// Floats per (B, T) for a block of `shape`: 2C + M + 3A (9C whole, beside the 16C + H·T + 4
    /// of a block's activations).
    pub fn floats_per_token(shape: BlockShape) -> usize {
        2 * shape.n_embd + shape.mlp_hidden + 3 * shape.attn_width()
    }
}

/// dinp [m, k] += dout [m, n] · weightᵀ (weight [k, n]): a linear layer's input gradient, the
/// first matmul of `linear_backward`, on its own.
fn linear_input_grad(dinp: ViewMut<'_>, dout: View<'_>, weight: View<'_>, m: usize, k: usize, n: usize) {
    matmul(dinp, dout, weight, m, n, k, false, true, true);
}

/// dweight [k, n] += inpᵀ · dout, dbias [n] += Σ rows of dout: the rest of `linear_backward`.
#[allow(clippy::too_many_arguments)]
fn linear_weight_grad(
    dweight: ViewMut<'_>,
    dbias: ViewMut<'_>,
    dout: View<'_>,
    inp: View<'_>,
    weight: View<'_>,
    m: usize,
    k: usize,
    n: usize,
) {
    linear_backward(None, dweight, Some(dbias), dout, inp, weight, m, k, n);
}

// ANCHOR: block_backward_input
impl BlockParams<View<'_>> {
    /// B: given d_out = dL/d(out), writes dL/dx into `d_x`, accumulates the LayerNorms'
    /// gradients into `grads` (no other tensor of it), and keeps in `saved` what W needs. The
    /// fused backward's steps in its order, less the four weight-gradient matmuls.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_input(
        &self,
        grads: &mut BlockParams<ViewMut<'_>>,
        d_out: View<'_>,
        x: View<'_>,
        acts: &BlockActivations,
        g: &mut BlockScratch,
        saved: &mut BlockOutputGrads,
        mut d_x: ViewMut<'_>,
        d: Dims,
        comm: &mut dyn BlockComm,
    ) -> Result<(), CommError> {
        let (bt, c, w, m) = (d.bt(), d.shape.n_embd, d.shape.attn_width(), d.shape.mlp_hidden);
        let (a, s) = (acts, saved);

        // The MLP branch: d_out reaches res_2 through the skip and through the MLP.
        copy(s.d_out.prefix_mut(bt * c), d_out);
        copy(s.d_res_2.prefix_mut(bt * c), d_out);
        zero(g.d_fc_gelu.prefix_mut(bt * m));
        linear_input_grad(g.d_fc_gelu.prefix_mut(bt * m), d_out, self.mlp_c_proj_weight, bt, m, c);
        zero(s.d_fc.prefix_mut(bt * m));
        gelu_backward(s.d_fc.prefix_mut(bt * m), a.fc.prefix(bt * m), g.d_fc_gelu.prefix(bt * m));
        zero(g.d_ln.prefix_mut(bt * c));
        linear_input_grad(g.d_ln.prefix_mut(bt * c), s.d_fc.prefix(bt * m), self.mlp_c_fc_weight, bt, c, m);
        comm.sum_branch_input_grad(g.d_ln.prefix_mut(bt * c))?;
        layernorm_backward(
            s.d_res_2.prefix_mut(bt * c),
            grads.ln_2_weight.reborrow(),
            grads.ln_2_bias.reborrow(),
            g.d_ln.prefix(bt * c),
            a.res_2.prefix(bt * c),
            self.ln_2_weight,
            a.ln_2_mean.prefix(bt),
            a.ln_2_rstd.prefix(bt),
            c,
        );

        // The attention branch, the same way.
        let d_res_2 = s.d_res_2.prefix(bt * c);
        copy(d_x.reborrow(), d_res_2);
        zero(g.d_att_y.prefix_mut(bt * w));
        linear_input_grad(g.d_att_y.prefix_mut(bt * w), d_res_2, self.attn_c_proj_weight, bt, w, c);
        zero(s.d_qkv.prefix_mut(bt * 3 * w));
        attention_backward(
            s.d_qkv.prefix_mut(bt * 3 * w),
            g.d_att_y.prefix(bt * w),
            a.qkv.prefix(bt * 3 * w),
            a.att.prefix(d.b * d.shape.n_head * d.t * d.t),
            d.t,
            w,
            d.shape.n_head,
        );
        zero(g.d_ln.prefix_mut(bt * c));
        linear_input_grad(g.d_ln.prefix_mut(bt * c), s.d_qkv.prefix(bt * 3 * w), self.attn_c_attn_weight, bt, c, 3 * w);
        comm.sum_branch_input_grad(g.d_ln.prefix_mut(bt * c))?;
        layernorm_backward(
            d_x,
            grads.ln_1_weight.reborrow(),
            grads.ln_1_bias.reborrow(),
            g.d_ln.prefix(bt * c),
            x,
            self.ln_1_weight,
            a.ln_1_mean.prefix(bt),
            a.ln_1_rstd.prefix(bt),
            c,
        );
        Ok(())
    }
}
// ANCHOR_END: block_backward_input

// ANCHOR: block_backward_weights
impl BlockParams<View<'_>> {
    /// W: the four projections' weight and bias gradients, each its saved input (from the
    /// forward) against the gradient at its output (from B). No communication: on a
    /// tensor-parallel shard each rank's weight gradient is its own.
    pub fn backward_weights(
        &self,
        grads: &mut BlockParams<ViewMut<'_>>,
        acts: &BlockActivations,
        saved: &BlockOutputGrads,
        d: Dims,
    ) {
        let (bt, c, w, m) = (d.bt(), d.shape.n_embd, d.shape.attn_width(), d.shape.mlp_hidden);
        let (a, s) = (acts, saved);
        let (dw, db) = (grads.mlp_c_proj_weight.reborrow(), grads.mlp_c_proj_bias.reborrow());
        linear_weight_grad(dw, db, s.d_out.prefix(bt * c), a.fc_gelu.prefix(bt * m), self.mlp_c_proj_weight, bt, m, c);
        let (dw, db) = (grads.mlp_c_fc_weight.reborrow(), grads.mlp_c_fc_bias.reborrow());
        linear_weight_grad(dw, db, s.d_fc.prefix(bt * m), a.ln_2.prefix(bt * c), self.mlp_c_fc_weight, bt, c, m);
        let (dw, db) = (grads.attn_c_proj_weight.reborrow(), grads.attn_c_proj_bias.reborrow());
        let (d_res_2, att_y) = (s.d_res_2.prefix(bt * c), a.att_y.prefix(bt * w));
        linear_weight_grad(dw, db, d_res_2, att_y, self.attn_c_proj_weight, bt, w, c);
        let (dw, db) = (grads.attn_c_attn_weight.reborrow(), grads.attn_c_attn_bias.reborrow());
        let (d_qkv, ln_1) = (s.d_qkv.prefix(bt * 3 * w), a.ln_1.prefix(bt * c));
        linear_weight_grad(dw, db, d_qkv, ln_1, self.attn_c_attn_weight, bt, c, 3 * w);
    }
}
// ANCHOR_END: block_backward_weights

// ANCHOR: blocks_split
/// B of blocks `blocks`, last to first, as `blocks_backward`: d_out = dL/d(the last block's
/// output) in `d_res[0]`, `x` the first block's input; leaves dL/dx in `d_res[0]` and block i's
/// output gradients in `saved[i]`.
#[allow(clippy::too_many_arguments)]
pub fn blocks_backward_input(
    blocks: &[BlockParams<View<'_>>],
    grads: &mut [BlockParams<ViewMut<'_>>],
    x: View<'_>,
    acts: &[BlockActivations],
    saved: &mut [BlockOutputGrads],
    scratch: &mut BackwardScratch,
    d: Dims,
    comm: &mut dyn BlockComm,
) -> Result<(), CommError> {
    let bt_c = d.bt() * d.shape.n_embd;
    let [d_a, d_b] = &mut scratch.d_res;
    let (mut d_out, mut d_in) = (d_a, d_b);
    for l in (0..blocks.len()).rev() {
        let input = if l == 0 { x } else { acts[l - 1].out.prefix(bt_c) };
        let (g, d_x) = (&mut scratch.block, d_in.prefix_mut(bt_c));
        let (d_y, s) = (d_out.prefix(bt_c), &mut saved[l]);
        blocks[l].backward_input(&mut grads[l], d_y, input, &acts[l], g, s, d_x, d, comm)?;
        std::mem::swap(&mut d_out, &mut d_in);
    }
    if blocks.len() % 2 == 1 {
        scratch.d_res.swap(0, 1);
    }
    Ok(())
}

/// W of blocks `blocks`, from what their B saved.
pub fn blocks_backward_weights(
    blocks: &[BlockParams<View<'_>>],
    grads: &mut [BlockParams<ViewMut<'_>>],
    acts: &[BlockActivations],
    saved: &[BlockOutputGrads],
    d: Dims,
) {
    for l in (0..blocks.len()).rev() {
        blocks[l].backward_weights(&mut grads[l], &acts[l], &saved[l], d);
    }
}
// ANCHOR_END: blocks_split

// ANCHOR: head_split
/// The head's B: as `head_backward`, less the output projection's share of dwte. Leaves
/// dlogits in `acts.logits` for [`head_backward_weights`].
#[allow(clippy::too_many_arguments)]
pub fn head_backward_input(
    p: &Head<View<'_>>,
    d_ln_f_weight: ViewMut<'_>,
    d_ln_f_bias: ViewMut<'_>,
    cfg: &ModelConfig,
    x: View<'_>,
    acts: &mut HeadActivations,
    mut d_ln: ViewMut<'_>,
    mut d_x: ViewMut<'_>,
    targets: &[u32],
    dloss: f32,
    bt: usize,
) {
    let (c, vp) = (cfg.n_embd, cfg.padded_vocab_size());
    softmax_cross_entropy_backward(acts.logits.prefix_mut(bt * vp), targets, dloss, vp);
    // d_ln = dlogits @ wte: the first matmul of lm_head_backward.
    matmul(d_ln.reborrow(), acts.logits.prefix(bt * vp), p.wte, bt, vp, c, false, false, false);
    zero(d_x.reborrow());
    layernorm_backward(
        d_x,
        d_ln_f_weight,
        d_ln_f_bias,
        d_ln.as_view(),
        x,
        p.ln_f_weight,
        acts.ln_f_mean.prefix(bt),
        acts.ln_f_rstd.prefix(bt),
        c,
    );
}

/// The head's W: dwte += dlogitsᵀ @ ln_f, the output projection's share of the tied gradient.
pub fn head_backward_weights(dwte: ViewMut<'_>, cfg: &ModelConfig, acts: &HeadActivations, bt: usize) {
    let (c, vp) = (cfg.n_embd, cfg.padded_vocab_size());
    matmul(dwte, acts.logits.prefix(bt * vp), acts.ln_f.prefix(bt * c), vp, bt, c, true, false, true);
}
// ANCHOR_END: head_split

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activations, Whole, backward, embed_backward, forward};
    use crate::params::ParamLayout;
    use kernels::Rng;

    // ANCHOR: split_test
    #[test]
    fn b_then_w_is_the_fused_backward_bit_for_bit() {
        // The whole model, so that the head, two blocks and the embedding are all split: the
        // gradients of every tensor and dL/d(embeddings) must be the fused backward's bits.
        let cfg = ModelConfig { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 200 };
        let layout = ParamLayout::new(&cfg);
        let mut params = vec![0.0; layout.total];
        crate::model::init_params(&cfg, &layout, 7, &mut params);
        let mut rng = Rng::new(3);
        params.iter_mut().for_each(|x| *x += (rng.normal() * 0.02) as f32);
        let (b, t) = (2, 8);
        let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(200) as u32).collect();
        let targets: Vec<u32> = (0..b * t).map(|_| rng.below(200) as u32).collect();
        let (ledger, shape, dloss) = (MemoryLedger::new(), BlockShape::whole(&cfg), 1.0 / (b * t) as f32);
        let p = layout.views(View::Cpu(&params));
        let pass = || {
            let mut acts = Activations::new(&cfg, b, t, Device::Cpu, DType::F32, &ledger).unwrap();
            forward(&p, &cfg, &mut acts, &tokens, Some(&targets), b, t).unwrap();
            let scratch = BackwardScratch::new(shape, b, t, Device::Cpu, DType::F32, &ledger).unwrap();
            (acts, scratch, vec![0.0f32; layout.total])
        };

        let (mut acts, mut scratch, mut fused) = pass();
        let mut g = layout.views_mut(ViewMut::Cpu(&mut fused));
        backward(&p, &mut g, &cfg, &mut acts, &mut scratch, &tokens, &targets, dloss, b, t, &mut |_, _| {}).unwrap();
        let fused_d_x = scratch.d_res[0].as_slice().to_vec();

        let (mut acts, mut scratch, mut split) = pass();
        let mut saved: Vec<_> = (0..cfg.n_layer)
            .map(|_| BlockOutputGrads::new(shape, b, t, Device::Cpu, DType::F32, &ledger).unwrap())
            .collect();
        let mut g = layout.views_mut(ViewMut::Cpu(&mut split));
        let d = Dims { b, t, shape };
        let (bt, c) = (b * t, cfg.n_embd);
        // B: the head, then the blocks.
        let last = acts.blocks.last().unwrap().out.prefix(bt * c);
        let (d_ln, d_x) = (scratch.block.d_ln.prefix_mut(bt * c), scratch.d_res[0].prefix_mut(bt * c));
        let (gw, gb) = (g.ln_f_weight.reborrow(), g.ln_f_bias.reborrow());
        head_backward_input(&p.head(), gw, gb, &cfg, last, &mut acts.head, d_ln, d_x, &targets, dloss, bt);
        let x = acts.embedded.prefix(bt * c);
        blocks_backward_input(&p.blocks, &mut g.blocks, x, &acts.blocks, &mut saved, &mut scratch, d, &mut Whole)
            .unwrap();
        let split_d_x = scratch.d_res[0].as_slice().to_vec();
        // W, in the fused backward's order for the tied wte: the head's share, then the
        // embedding's.
        head_backward_weights(g.wte.reborrow(), &cfg, &acts.head, bt);
        blocks_backward_weights(&p.blocks, &mut g.blocks, &acts.blocks, &saved, d);
        embed_backward(g.wte.reborrow(), g.wpe.reborrow(), scratch.d_res[0].prefix(bt * c), &tokens, t, c);

        assert!(fused_d_x == split_d_x, "dL/d(embeddings) differs");
        for spec in &layout.specs {
            let (a, b) = (&fused[spec.range()], &split[spec.range()]);
            assert!(a.iter().any(|&x| x != 0.0), "{}: a gradient to compare", spec.name);
            assert!(a == b, "{}: the split backward's gradient differs", spec.name);
        }
    }
    // ANCHOR_END: split_test

    #[test]
    fn the_saved_output_grads_are_what_the_ledger_counts() {
        let cfg = ModelConfig::preset("small", 256).unwrap();
        let (ledger, shape) = (MemoryLedger::new(), BlockShape::whole(&cfg));
        let _saved = BlockOutputGrads::new(shape, 2, 64, Device::Cpu, DType::F32, &ledger).unwrap();
        let counted = ledger.report().current[&Category::Activations];
        assert_eq!(counted, (4 * 2 * 64 * BlockOutputGrads::floats_per_token(shape)) as u64);
        assert_eq!(BlockOutputGrads::floats_per_token(shape), 9 * cfg.n_embd);
    }
}
