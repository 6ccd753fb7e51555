//! GPT-2: pre-LayerNorm transformer blocks, learned position embeddings, an output projection
//! tied to the token embedding. Forward is a loop over blocks; backward is the same loop
//! reversed, accumulating into gradient buffers of the parameters' layout. No autograd.

use crate::config::ModelConfig;
use crate::params::{BlockParams, GptParams, ParamLayout};
use kernels::ops::attention::{attention_backward, attention_forward};
use kernels::ops::embedding::{embedding_backward, embedding_forward};
use kernels::ops::gelu::{gelu_backward, gelu_forward};
use kernels::ops::layernorm::{layernorm_backward, layernorm_forward};
use kernels::ops::matmul::{MatMut, MatRef, gemm, linear_backward, linear_forward};
use kernels::ops::residual::residual_forward;
use kernels::ops::softmax_cross_entropy::{softmax_cross_entropy_backward, softmax_cross_entropy_forward};
use kernels::{Category, MemoryLedger, Rng, Tensor};
use std::ops::Range;

// ANCHOR: init_params
/// Fresh parameters, GPT-2's initialisation: weights N(0, 0.02²), the two projections that write
/// into the residual stream N(0, (0.02/sqrt(2·n_layer))²) so the stream's variance does not grow
/// with depth, biases 0, LayerNorm gains 1. The embedding's padding rows stay 0 (and, receiving
/// no gradient, stay 0 forever).
pub fn init_params(cfg: &ModelConfig, layout: &ParamLayout, seed: u64, out: &mut [f32]) {
    let mut rng = Rng::derive(seed, "init");
    let residual_std = 0.02 / (2.0 * cfg.n_layer as f32).sqrt();
    for spec in &layout.specs {
        let buf = &mut out[spec.range()];
        if spec.name.ends_with("ln_1.weight") || spec.name.ends_with("ln_2.weight") || spec.name == "ln_f.weight" {
            buf.fill(1.0);
        } else if spec.name.ends_with(".bias") {
            buf.fill(0.0);
        } else if spec.name == "wte.weight" {
            let real_rows = cfg.vocab_size * cfg.n_embd;
            rng.fill_normal(&mut buf[..real_rows], 0.02);
            buf[real_rows..].fill(0.0);
        } else if spec.name.ends_with("c_proj.weight") {
            rng.fill_normal(buf, residual_std);
        } else {
            rng.fill_normal(buf, 0.02);
        }
    }
}
// ANCHOR_END: init_params

// ANCHOR: activations
/// What one block's forward saves for its backward. Every buffer is sized for the capacity
/// (B, T) it was made with; a pass over a smaller batch or sequence uses a prefix.
pub struct BlockActivations {
    pub ln_1: Tensor,      // [B, T, C]
    pub ln_1_mean: Tensor, // [B, T]
    pub ln_1_rstd: Tensor, // [B, T]
    pub qkv: Tensor,       // [B, T, 3C]
    pub att: Tensor,       // [B, H, T, T]
    pub att_y: Tensor,     // [B, T, C]   attention output, before its projection
    pub res_2: Tensor,     // [B, T, C]   residual stream after the attention branch
    pub ln_2: Tensor,      // [B, T, C]
    pub ln_2_mean: Tensor, // [B, T]
    pub ln_2_rstd: Tensor, // [B, T]
    pub fc: Tensor,        // [B, T, 4C]
    pub fc_gelu: Tensor,   // [B, T, 4C]
    pub out: Tensor,       // [B, T, C]   residual stream after the MLP branch: the block's output
}

/// Everything forward saves, for a batch of up to `batch` sequences of up to `seq` tokens.
pub struct Activations {
    pub batch: usize,
    pub seq: usize,
    pub embedded: Tensor, // [B, T, C]   the first residual stream
    pub blocks: Vec<BlockActivations>,
    pub ln_f: Tensor,      // [B, T, C]
    pub ln_f_mean: Tensor, // [B, T]
    pub ln_f_rstd: Tensor, // [B, T]
    /// [B, T, Vp]: logits after forward, probabilities after the loss, dlogits after backward.
    pub logits: Tensor,
    pub losses: Tensor, // [B, T]
    /// A projection's output before it joins the residual stream. Not needed by backward, so
    /// one buffer serves every block.
    pub proj: Tensor, // [B, T, C]
}
// ANCHOR_END: activations

// ANCHOR: gradients_scratch
/// Backward's working buffers: gradients with respect to activations. One set serves every
/// block, since block l's are dead once block l-1's backward starts.
pub struct Gradients {
    /// [B, T, C] each, used in turn: dL/d(block output) in one, dL/d(block input) out the other.
    pub d_res: [Tensor; 2],
    pub block: BlockGradients,
}

/// The activation gradients inside one block's backward.
pub struct BlockGradients {
    pub d_res_2: Tensor,   // [B, T, C]
    pub d_ln: Tensor,      // [B, T, C]
    pub d_att_y: Tensor,   // [B, T, C]
    pub d_qkv: Tensor,     // [B, T, 3C]
    pub d_fc: Tensor,      // [B, T, 4C]
    pub d_fc_gelu: Tensor, // [B, T, 4C]
}
// ANCHOR_END: gradients_scratch

impl Activations {
    pub fn new(cfg: &ModelConfig, batch: usize, seq: usize, ledger: &MemoryLedger) -> Activations {
        let (bt, c, h) = (batch * seq, cfg.n_embd, cfg.n_head);
        let t = |shape: &[usize]| Tensor::zeros_in(shape, Category::Activations, ledger);
        let blocks = (0..cfg.n_layer)
            .map(|_| BlockActivations {
                ln_1: t(&[bt, c]),
                ln_1_mean: t(&[bt]),
                ln_1_rstd: t(&[bt]),
                qkv: t(&[bt, 3 * c]),
                att: t(&[batch, h, seq, seq]),
                att_y: t(&[bt, c]),
                res_2: t(&[bt, c]),
                ln_2: t(&[bt, c]),
                ln_2_mean: t(&[bt]),
                ln_2_rstd: t(&[bt]),
                fc: t(&[bt, 4 * c]),
                fc_gelu: t(&[bt, 4 * c]),
                out: t(&[bt, c]),
            })
            .collect();
        Activations {
            batch,
            seq,
            embedded: t(&[bt, c]),
            blocks,
            ln_f: t(&[bt, c]),
            ln_f_mean: t(&[bt]),
            ln_f_rstd: t(&[bt]),
            logits: t(&[bt, cfg.padded_vocab_size()]),
            losses: t(&[bt]),
            proj: Tensor::zeros_in(&[bt, c], Category::Other, ledger),
        }
    }

    // ANCHOR: floats_per_token
    /// Floats saved per (B, T) by the formula the book derives; the ledger must agree.
    pub fn floats_per_token(cfg: &ModelConfig, seq: usize) -> usize {
        let (c, h, l) = (cfg.n_embd, cfg.n_head, cfg.n_layer);
        let per_block = 4 * c + 2 + 2 + 3 * c + h * seq + 2 * 4 * c + c;
        c + l * per_block + c + 2 + cfg.padded_vocab_size() + 1
    }
    // ANCHOR_END: floats_per_token
}

impl Gradients {
    pub fn new(cfg: &ModelConfig, batch: usize, seq: usize, ledger: &MemoryLedger) -> Gradients {
        let (bt, c) = (batch * seq, cfg.n_embd);
        let t = |shape: &[usize]| Tensor::zeros_in(shape, Category::Other, ledger);
        Gradients {
            d_res: [t(&[bt, c]), t(&[bt, c])],
            block: BlockGradients {
                d_res_2: t(&[bt, c]),
                d_ln: t(&[bt, c]),
                d_att_y: t(&[bt, c]),
                d_qkv: t(&[bt, 3 * c]),
                d_fc: t(&[bt, 4 * c]),
                d_fc_gelu: t(&[bt, 4 * c]),
            },
        }
    }
}

/// The sizes one pass runs at.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub n_head: usize,
}

impl Dims {
    pub fn bt(&self) -> usize {
        self.b * self.t
    }
}

// ANCHOR: block_forward
impl BlockParams<&[f32]> {
    /// x [B, T, C] -> acts.out [B, T, C]:
    ///   res_2 = x + attn_proj(attention(c_attn(ln_1(x))))
    ///   out   = res_2 + mlp_proj(gelu(c_fc(ln_2(res_2))))
    pub fn forward(&self, x: &[f32], acts: &mut BlockActivations, proj: &mut [f32], d: Dims) {
        let (bt, c) = (d.bt(), d.c);
        let ln_1 = &mut acts.ln_1.as_mut_slice()[..bt * c];
        let (mean, rstd) = (&mut acts.ln_1_mean.as_mut_slice()[..bt], &mut acts.ln_1_rstd.as_mut_slice()[..bt]);
        layernorm_forward(ln_1, mean, rstd, x, self.ln_1_weight, self.ln_1_bias, c);
        let qkv = &mut acts.qkv.as_mut_slice()[..bt * 3 * c];
        linear_forward(qkv, ln_1, self.attn_c_attn_weight, Some(self.attn_c_attn_bias), bt, c, 3 * c);
        let att_y = &mut acts.att_y.as_mut_slice()[..bt * c];
        let att = &mut acts.att.as_mut_slice()[..d.b * d.n_head * d.t * d.t];
        attention_forward(att_y, att, qkv, d.t, c, d.n_head);
        linear_forward(proj, att_y, self.attn_c_proj_weight, Some(self.attn_c_proj_bias), bt, c, c);
        let res_2 = &mut acts.res_2.as_mut_slice()[..bt * c];
        residual_forward(res_2, x, proj);

        let ln_2 = &mut acts.ln_2.as_mut_slice()[..bt * c];
        let (mean, rstd) = (&mut acts.ln_2_mean.as_mut_slice()[..bt], &mut acts.ln_2_rstd.as_mut_slice()[..bt]);
        layernorm_forward(ln_2, mean, rstd, res_2, self.ln_2_weight, self.ln_2_bias, c);
        let fc = &mut acts.fc.as_mut_slice()[..bt * 4 * c];
        linear_forward(fc, ln_2, self.mlp_c_fc_weight, Some(self.mlp_c_fc_bias), bt, c, 4 * c);
        let fc_gelu = &mut acts.fc_gelu.as_mut_slice()[..bt * 4 * c];
        gelu_forward(fc_gelu, fc);
        linear_forward(proj, fc_gelu, self.mlp_c_proj_weight, Some(self.mlp_c_proj_bias), bt, 4 * c, c);
        residual_forward(&mut acts.out.as_mut_slice()[..bt * c], res_2, proj);
    }
}
// ANCHOR_END: block_forward

/// The first `n` elements of a tensor: a pass over a batch smaller than the buffers' capacity.
fn s(t: &Tensor, n: usize) -> &[f32] {
    &t.as_slice()[..n]
}

// ANCHOR: block_backward
impl BlockParams<&[f32]> {
    /// Given d_out = dL/d(out), accumulates the block's parameter gradients into `grads` and
    /// writes dL/dx into `d_x`: the forward above, read bottom to top.
    pub fn backward(
        &self,
        grads: &mut BlockParams<&mut [f32]>,
        d_out: &[f32],
        x: &[f32],
        acts: &BlockActivations,
        g: &mut BlockGradients,
        d_x: &mut [f32],
        d: Dims,
    ) {
        let (bt, c) = (d.bt(), d.c);

        // out = res_2 + mlp(res_2). A sum passes its gradient to both inputs unchanged
        // (residual_backward): d_out flows straight into d_res_2 through the skip, and is the
        // gradient of the MLP's output, whose backward then adds its share into d_res_2.
        let d_res_2 = &mut g.d_res_2.as_mut_slice()[..bt * c];
        d_res_2.copy_from_slice(d_out);
        let d_fc_gelu = &mut g.d_fc_gelu.as_mut_slice()[..bt * 4 * c];
        d_fc_gelu.fill(0.0);
        linear_backward(
            Some(d_fc_gelu),
            grads.mlp_c_proj_weight,
            Some(grads.mlp_c_proj_bias),
            d_out,
            s(&acts.fc_gelu, bt * 4 * c),
            self.mlp_c_proj_weight,
            bt,
            4 * c,
            c,
        );
        let d_fc = &mut g.d_fc.as_mut_slice()[..bt * 4 * c];
        d_fc.fill(0.0);
        gelu_backward(d_fc, s(&acts.fc, bt * 4 * c), d_fc_gelu);
        let d_ln = &mut g.d_ln.as_mut_slice()[..bt * c];
        d_ln.fill(0.0);
        linear_backward(
            Some(d_ln),
            grads.mlp_c_fc_weight,
            Some(grads.mlp_c_fc_bias),
            d_fc,
            s(&acts.ln_2, bt * c),
            self.mlp_c_fc_weight,
            bt,
            c,
            4 * c,
        );
        layernorm_backward(
            d_res_2,
            grads.ln_2_weight,
            grads.ln_2_bias,
            d_ln,
            s(&acts.res_2, bt * c),
            self.ln_2_weight,
            s(&acts.ln_2_mean, bt),
            s(&acts.ln_2_rstd, bt),
            c,
        );

        // res_2 = x + attn(x): the same again for the attention branch.
        d_x.copy_from_slice(d_res_2);
        let d_att_y = &mut g.d_att_y.as_mut_slice()[..bt * c];
        d_att_y.fill(0.0);
        linear_backward(
            Some(d_att_y),
            grads.attn_c_proj_weight,
            Some(grads.attn_c_proj_bias),
            d_res_2,
            s(&acts.att_y, bt * c),
            self.attn_c_proj_weight,
            bt,
            c,
            c,
        );
        let d_qkv = &mut g.d_qkv.as_mut_slice()[..bt * 3 * c];
        d_qkv.fill(0.0);
        attention_backward(
            d_qkv,
            d_att_y,
            s(&acts.qkv, bt * 3 * c),
            s(&acts.att, d.b * d.n_head * d.t * d.t),
            d.t,
            c,
            d.n_head,
        );
        d_ln.fill(0.0);
        linear_backward(
            Some(d_ln),
            grads.attn_c_attn_weight,
            Some(grads.attn_c_attn_bias),
            d_qkv,
            s(&acts.ln_1, bt * c),
            self.attn_c_attn_weight,
            bt,
            c,
            3 * c,
        );
        layernorm_backward(
            d_x,
            grads.ln_1_weight,
            grads.ln_1_bias,
            d_ln,
            x,
            self.ln_1_weight,
            s(&acts.ln_1_mean, bt),
            s(&acts.ln_1_rstd, bt),
            c,
        );
    }
}
// ANCHOR_END: block_backward

// ANCHOR: lm_head
/// logits [BT, Vp] = x [BT, C] @ wte^T. The output projection is the token embedding itself,
/// transposed (tied weights): the vector a token is read in as is also the one it is scored by.
fn lm_head_forward(logits: &mut [f32], x: &[f32], wte: &[f32], bt: usize, c: usize, vp: usize) {
    gemm(MatMut::row_major(logits, bt, vp), MatRef::row_major(x, bt, c), MatRef::row_major(wte, vp, c).t(), false);
}

/// dx = dlogits @ wte [BT, C];  dwte += dlogits^T @ x [Vp, C] (added to the embedding's own
/// gradient: one tensor, two uses, one sum).
fn lm_head_backward(
    dx: &mut [f32],
    dwte: &mut [f32],
    dlogits: &[f32],
    x: &[f32],
    wte: &[f32],
    bt: usize,
    c: usize,
    vp: usize,
) {
    let dlogits = MatRef::row_major(dlogits, bt, vp);
    gemm(MatMut::row_major(dx, bt, c), dlogits, MatRef::row_major(wte, vp, c), false);
    gemm(MatMut::row_major(dwte, vp, c), dlogits.t(), MatRef::row_major(x, bt, c), true);
}
// ANCHOR_END: lm_head

// ANCHOR: model_forward
/// tokens [B, T] -> logits [B, T, Vp] in `acts.logits`. With targets [B, T], also returns the
/// mean loss, and `acts.logits` then holds the probabilities that backward needs.
pub fn forward(
    p: &GptParams<&[f32]>,
    cfg: &ModelConfig,
    acts: &mut Activations,
    tokens: &[u32],
    targets: Option<&[u32]>,
    b: usize,
    t: usize,
) -> Option<f32> {
    assert!(b <= acts.batch && t <= acts.seq && t <= cfg.block_size, "pass larger than its buffers");
    assert_eq!(tokens.len(), b * t);
    let d = Dims { b, t, c: cfg.n_embd, n_head: cfg.n_head };
    let (bt, c, vp) = (b * t, cfg.n_embd, cfg.padded_vocab_size());

    embedding_forward(&mut acts.embedded.as_mut_slice()[..bt * c], tokens, p.wte, p.wpe, t, c);
    let proj = &mut acts.proj.as_mut_slice()[..bt * c];
    for (l, block) in p.blocks.iter().enumerate() {
        let (done, todo) = acts.blocks.split_at_mut(l);
        let x = match done.last() {
            Some(prev) => &prev.out.as_slice()[..bt * c],
            None => &acts.embedded.as_slice()[..bt * c],
        };
        block.forward(x, &mut todo[0], proj, d);
    }
    let last = acts.blocks.last().map_or(&acts.embedded, |b| &b.out);
    let ln_f = &mut acts.ln_f.as_mut_slice()[..bt * c];
    let (mean, rstd) = (&mut acts.ln_f_mean.as_mut_slice()[..bt], &mut acts.ln_f_rstd.as_mut_slice()[..bt]);
    layernorm_forward(ln_f, mean, rstd, &last.as_slice()[..bt * c], p.ln_f_weight, p.ln_f_bias, c);
    let logits = &mut acts.logits.as_mut_slice()[..bt * vp];
    lm_head_forward(logits, ln_f, p.wte, bt, c, vp);

    let targets = targets?;
    let losses = &mut acts.losses.as_mut_slice()[..bt];
    softmax_cross_entropy_forward(logits, losses, targets, cfg.vocab_size, vp);
    Some((losses.iter().map(|&l| l as f64).sum::<f64>() / bt as f64) as f32)
}
// ANCHOR_END: model_forward

// ANCHOR: grads_ready
/// Told, during backward, which parameters' gradients are now final: a range of indices into
/// `ParamLayout::specs`, and read access to every gradient. They become final in reverse layout
/// order: ln_f, then block L-1 down to block 0, then wte and wpe (wte last: it collects the
/// output projection's gradient first and the embedding's at the very end). Chapter 2 hangs its
/// gradient all-reduce here, to overlap communication with the rest of backward.
pub type GradsReady<'a> = &'a mut dyn FnMut(Range<usize>, &GptParams<&mut [f32]>);
// ANCHOR_END: grads_ready

// ANCHOR: model_backward
/// Accumulates dL/dθ into `grads` for L = dloss * (sum of the token losses of the last
/// `forward`, which must have been given targets). dloss = 1/(tokens in the step) makes L the
/// step's mean loss.
pub fn backward(
    p: &GptParams<&[f32]>,
    grads: &mut GptParams<&mut [f32]>,
    cfg: &ModelConfig,
    acts: &mut Activations,
    g: &mut Gradients,
    tokens: &[u32],
    targets: &[u32],
    dloss: f32,
    b: usize,
    t: usize,
    on_ready: GradsReady<'_>,
) {
    let d = Dims { b, t, c: cfg.n_embd, n_head: cfg.n_head };
    let (bt, c, vp) = (b * t, cfg.n_embd, cfg.padded_vocab_size());
    let n_tensors = 2 + 12 * cfg.n_layer + 2;

    let dlogits = &mut acts.logits.as_mut_slice()[..bt * vp];
    softmax_cross_entropy_backward(dlogits, targets, dloss, vp);
    let d_ln_f = &mut g.block.d_ln.as_mut_slice()[..bt * c];
    lm_head_backward(d_ln_f, grads.wte, dlogits, &acts.ln_f.as_slice()[..bt * c], p.wte, bt, c, vp);

    let [d_a, d_b] = &mut g.d_res;
    let (mut d_out, mut d_in) = (&mut d_a.as_mut_slice()[..bt * c], &mut d_b.as_mut_slice()[..bt * c]);
    let last = acts.blocks.last().map_or(&acts.embedded, |b| &b.out);
    d_out.fill(0.0);
    let (mean, rstd) = (&acts.ln_f_mean.as_slice()[..bt], &acts.ln_f_rstd.as_slice()[..bt]);
    layernorm_backward(
        d_out,
        grads.ln_f_weight,
        grads.ln_f_bias,
        d_ln_f,
        &last.as_slice()[..bt * c],
        p.ln_f_weight,
        mean,
        rstd,
        c,
    );
    on_ready(n_tensors - 2..n_tensors, grads);

    for l in (0..cfg.n_layer).rev() {
        let x = match l {
            0 => &acts.embedded.as_slice()[..bt * c],
            _ => &acts.blocks[l - 1].out.as_slice()[..bt * c],
        };
        p.blocks[l].backward(&mut grads.blocks[l], d_out, x, &acts.blocks[l], &mut g.block, d_in, d);
        std::mem::swap(&mut d_out, &mut d_in);
        on_ready(2 + 12 * l..2 + 12 * (l + 1), grads);
    }
    embedding_backward(grads.wte, grads.wpe, d_out, tokens, t, c);
    on_ready(0..2, grads);
}
// ANCHOR_END: model_backward

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (ModelConfig, ParamLayout, Vec<f32>) {
        let cfg = ModelConfig { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 200 };
        let layout = ParamLayout::new(&cfg);
        let mut params = vec![0.0; layout.total];
        init_params(&cfg, &layout, 7, &mut params);
        // Perturb the gains and biases away from 1 and 0, so that their gradients are generic.
        let mut rng = Rng::new(3);
        for spec in layout.specs.iter().filter(|s| s.name.contains("ln_") || s.name.ends_with(".bias")) {
            for x in &mut params[spec.range()] {
                *x += (rng.normal() * 0.1) as f32;
            }
        }
        (cfg, layout, params)
    }

    /// Forward then backward of the mean loss; the gradient in the flat layout.
    fn gradient(
        cfg: &ModelConfig,
        layout: &ParamLayout,
        params: &[f32],
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        hook: GradsReady<'_>,
    ) -> Vec<f32> {
        let ledger = MemoryLedger::new();
        let mut acts = Activations::new(cfg, b, t, &ledger);
        let mut scratch = Gradients::new(cfg, b, t, &ledger);
        let mut grads = vec![0.0; layout.total];
        let p = layout.views(params);
        forward(&p, cfg, &mut acts, tokens, Some(targets), b, t);
        let dloss = 1.0 / (b * t) as f32;
        backward(
            &p,
            &mut layout.views_mut(&mut grads),
            cfg,
            &mut acts,
            &mut scratch,
            tokens,
            targets,
            dloss,
            b,
            t,
            hook,
        );
        grads
    }

    fn loss(
        cfg: &ModelConfig,
        layout: &ParamLayout,
        params: &[f32],
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
    ) -> f32 {
        let mut acts = Activations::new(cfg, b, t, &MemoryLedger::new());
        forward(&layout.views(params), cfg, &mut acts, tokens, Some(targets), b, t).unwrap()
    }

    // ANCHOR: whole_model_gradient_check
    #[test]
    fn whole_model_gradient_matches_finite_differences() {
        let (cfg, layout, params) = tiny();
        let (b, t) = (2, 8);
        let mut rng = Rng::new(11);
        let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(200) as u32).collect();
        let targets: Vec<u32> = (0..b * t).map(|_| rng.below(200) as u32).collect();

        let grads = gradient(&cfg, &layout, &params, &tokens, &targets, b, t, &mut |_, _| {});

        // Check a spread of elements in every tensor: a wiring mistake anywhere (a missing
        // residual path, a transposed weight, the tied embedding's second use) shows up as
        // relative errors of order 1 (breaking the attention skip's gradient gives an analytic
        // 1e-6 against a numeric -6e-3 on wpe). The loss is a mean, so gradients are small:
        // compare in f64 with a step large enough for f32 rounding to stay below 1e-5.
        let h = 1e-2f32;
        let mut perturbed = params.clone();
        for spec in &layout.specs {
            let range = spec.range();
            let used = if spec.name == "wte.weight" { cfg.vocab_size * cfg.n_embd } else { range.len() };
            for j in (0..used).step_by(used.div_ceil(6)) {
                let i = range.start + j;
                perturbed[i] = params[i] + h;
                let plus = loss(&cfg, &layout, &perturbed, &tokens, &targets, b, t) as f64;
                perturbed[i] = params[i] - h;
                let minus = loss(&cfg, &layout, &perturbed, &tokens, &targets, b, t) as f64;
                perturbed[i] = params[i];
                let numeric = (plus - minus) / (2.0 * h as f64);
                let analytic = grads[i] as f64;
                assert!(
                    (numeric - analytic).abs() <= 2e-4 + 0.05 * analytic.abs(),
                    "{}[{j}]: analytic {analytic:.6e} vs numeric {numeric:.6e}",
                    spec.name
                );
            }
        }
        let pad = layout.get("wte.weight").unwrap().offset + cfg.vocab_size * cfg.n_embd;
        assert!(grads[pad..pad + (cfg.padded_vocab_size() - cfg.vocab_size) * cfg.n_embd].iter().all(|&g| g == 0.0));
    }
    // ANCHOR_END: whole_model_gradient_check

    #[test]
    fn gradients_become_ready_in_reverse_layout_order_each_once() {
        let (cfg, layout, params) = tiny();
        let tokens = [1u32, 2, 3, 4];
        let mut seen = Vec::new();
        let mut hook = |ready: Range<usize>, g: &GptParams<&mut [f32]>| {
            // What the hook reads is the final gradient: nonzero for every tensor but the unused
            // positions' rows of wpe.
            assert!(ready.clone().all(|i| g.tensors()[i].iter().any(|&x| x != 0.0)));
            seen.push(ready);
        };
        gradient(&cfg, &layout, &params, &tokens, &tokens, 1, 4, &mut hook);
        let n = layout.specs.len();
        assert_eq!(seen.first(), Some(&(n - 2..n)), "ln_f first");
        assert_eq!(seen.last(), Some(&(0..2)), "embeddings last");
        for pair in seen.windows(2) {
            assert_eq!(pair[1].end, pair[0].start, "contiguous, descending");
        }
        assert_eq!(seen, layout.backward_units(), "the layout states what backward does");
    }

    #[test]
    fn loss_at_initialisation_is_ln_vocab() {
        // Small weights make every logit about 0: the prediction is uniform, loss = ln V.
        let cfg = ModelConfig::preset("tiny", 256).unwrap();
        let layout = ParamLayout::new(&cfg);
        let mut params = vec![0.0; layout.total];
        init_params(&cfg, &layout, 1, &mut params);
        let tokens: Vec<u32> = (0..64).map(|i| (i * 7 % 256) as u32).collect();
        let l = loss(&cfg, &layout, &params, &tokens[..32], &tokens[32..], 1, 32);
        assert!((l - 256f32.ln()).abs() < 0.05, "loss {l} vs ln 256 = {}", 256f32.ln());
    }

    // ANCHOR: activation_ledger_test
    #[test]
    fn activation_ledger_matches_the_formula() {
        let cfg = ModelConfig::preset("small", 256).unwrap();
        let ledger = MemoryLedger::new();
        let (b, t) = (4, 128);
        let _acts = Activations::new(&cfg, b, t, &ledger);
        let counted = ledger.report().current[&Category::Activations];
        assert_eq!(counted, (4 * b * t * Activations::floats_per_token(&cfg, t)) as u64);
    }
    // ANCHOR_END: activation_ledger_test
}
