//! GPT-2: pre-LayerNorm transformer blocks, learned position embeddings, an output projection
//! tied to the token embedding. Forward is a loop over blocks; backward is the same loop
//! reversed, accumulating into gradient buffers of the parameters' layout. No autograd.

use crate::config::ModelConfig;
use crate::params::{BlockParams, GptParams, ParamLayout};
use kernels::dispatch::{
    attention_backward, attention_forward, copy, embedding_backward, embedding_forward, gelu_backward,
    layernorm_backward, layernorm_forward, linear_backward, linear_forward, linear_gelu_forward, matmul,
    residual_forward, softmax_cross_entropy_backward, softmax_cross_entropy_forward, zero,
};
use kernels::{Category, CudaError, DType, Device, MemoryLedger, Rng, Tensor, TensorError, View, ViewMut};
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
    /// Buffers for passes of up to `batch` x `seq` tokens, on `device`, in `dtype` (the
    /// LayerNorm statistics and the losses stay f32 in a bf16 run).
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
        device: Device,
        dtype: DType,
        ledger: &MemoryLedger,
    ) -> Result<Activations, TensorError> {
        let (bt, c, h) = (batch * seq, cfg.n_embd, cfg.n_head);
        let t = |shape: &[usize]| Tensor::zeros_on(shape, device, dtype, Category::Activations, ledger);
        let stat = |shape: &[usize]| Tensor::zeros_on(shape, device, DType::F32, Category::Activations, ledger);
        let blocks = (0..cfg.n_layer)
            .map(|_| {
                Ok(BlockActivations {
                    ln_1: t(&[bt, c])?,
                    ln_1_mean: stat(&[bt])?,
                    ln_1_rstd: stat(&[bt])?,
                    qkv: t(&[bt, 3 * c])?,
                    att: t(&[batch, h, seq, seq])?,
                    att_y: t(&[bt, c])?,
                    res_2: t(&[bt, c])?,
                    ln_2: t(&[bt, c])?,
                    ln_2_mean: stat(&[bt])?,
                    ln_2_rstd: stat(&[bt])?,
                    fc: t(&[bt, 4 * c])?,
                    fc_gelu: t(&[bt, 4 * c])?,
                    out: t(&[bt, c])?,
                })
            })
            .collect::<Result<_, TensorError>>()?;
        Ok(Activations {
            batch,
            seq,
            embedded: t(&[bt, c])?,
            blocks,
            ln_f: t(&[bt, c])?,
            ln_f_mean: stat(&[bt])?,
            ln_f_rstd: stat(&[bt])?,
            logits: t(&[bt, cfg.padded_vocab_size()])?,
            losses: stat(&[bt])?,
            proj: Tensor::zeros_on(&[bt, c], device, dtype, Category::Other, ledger)?,
        })
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
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
        device: Device,
        dtype: DType,
        ledger: &MemoryLedger,
    ) -> Result<Gradients, TensorError> {
        let (bt, c) = (batch * seq, cfg.n_embd);
        let t = |shape: &[usize]| Tensor::zeros_on(shape, device, dtype, Category::Other, ledger);
        Ok(Gradients {
            d_res: [t(&[bt, c])?, t(&[bt, c])?],
            block: BlockGradients {
                d_res_2: t(&[bt, c])?,
                d_ln: t(&[bt, c])?,
                d_att_y: t(&[bt, c])?,
                d_qkv: t(&[bt, 3 * c])?,
                d_fc: t(&[bt, 4 * c])?,
                d_fc_gelu: t(&[bt, 4 * c])?,
            },
        })
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
impl BlockParams<View<'_>> {
    /// x [B, T, C] -> acts.out [B, T, C]:
    ///   res_2 = x + attn_proj(attention(c_attn(ln_1(x))))
    ///   out   = res_2 + mlp_proj(gelu(c_fc(ln_2(res_2))))
    pub fn forward(&self, x: View<'_>, acts: &mut BlockActivations, mut proj: ViewMut<'_>, d: Dims) {
        let (bt, c) = (d.bt(), d.c);
        let a = acts;
        let (mean, rstd) = (a.ln_1_mean.prefix_mut(bt), a.ln_1_rstd.prefix_mut(bt));
        layernorm_forward(a.ln_1.prefix_mut(bt * c), mean, rstd, x, self.ln_1_weight, self.ln_1_bias, c);
        let (ln_1, bias) = (a.ln_1.prefix(bt * c), Some(self.attn_c_attn_bias));
        linear_forward(a.qkv.prefix_mut(bt * 3 * c), ln_1, self.attn_c_attn_weight, bias, bt, c, 3 * c);
        let att = a.att.prefix_mut(d.b * d.n_head * d.t * d.t);
        attention_forward(a.att_y.prefix_mut(bt * c), att, a.qkv.prefix(bt * 3 * c), d.t, c, d.n_head);
        let (att_y, bias) = (a.att_y.prefix(bt * c), Some(self.attn_c_proj_bias));
        linear_forward(proj.reborrow(), att_y, self.attn_c_proj_weight, bias, bt, c, c);
        residual_forward(a.res_2.prefix_mut(bt * c), x, proj.as_view());

        let (mean, rstd) = (a.ln_2_mean.prefix_mut(bt), a.ln_2_rstd.prefix_mut(bt));
        let res_2 = a.res_2.prefix(bt * c);
        layernorm_forward(a.ln_2.prefix_mut(bt * c), mean, rstd, res_2, self.ln_2_weight, self.ln_2_bias, c);
        // fc = ln_2 @ W + b, fc_gelu = gelu(fc): one op, so that a GPU can do both in one matmul.
        let (fc, fc_gelu, ln_2) =
            (a.fc.prefix_mut(bt * 4 * c), a.fc_gelu.prefix_mut(bt * 4 * c), a.ln_2.prefix(bt * c));
        linear_gelu_forward(fc_gelu, fc, ln_2, self.mlp_c_fc_weight, self.mlp_c_fc_bias, bt, c, 4 * c);
        let (fc_gelu, bias) = (a.fc_gelu.prefix(bt * 4 * c), Some(self.mlp_c_proj_bias));
        linear_forward(proj.reborrow(), fc_gelu, self.mlp_c_proj_weight, bias, bt, 4 * c, c);
        residual_forward(a.out.prefix_mut(bt * c), a.res_2.prefix(bt * c), proj.as_view());
    }
}
// ANCHOR_END: block_forward

// ANCHOR: block_backward
impl BlockParams<View<'_>> {
    /// Given d_out = dL/d(out), accumulates the block's parameter gradients into `grads` and
    /// writes dL/dx into `d_x`: the forward above, read bottom to top.
    pub fn backward(
        &self,
        grads: &mut BlockParams<ViewMut<'_>>,
        d_out: View<'_>,
        x: View<'_>,
        acts: &BlockActivations,
        g: &mut BlockGradients,
        mut d_x: ViewMut<'_>,
        d: Dims,
    ) {
        let (bt, c) = (d.bt(), d.c);
        let a = acts;

        // out = res_2 + mlp(res_2). A sum passes its gradient to both inputs unchanged
        // (residual_backward): d_out flows straight into d_res_2 through the skip, and is the
        // gradient of the MLP's output, whose backward then adds its share into d_res_2.
        copy(g.d_res_2.prefix_mut(bt * c), d_out);
        zero(g.d_fc_gelu.prefix_mut(bt * 4 * c));
        linear_backward(
            Some(g.d_fc_gelu.prefix_mut(bt * 4 * c)),
            grads.mlp_c_proj_weight.reborrow(),
            Some(grads.mlp_c_proj_bias.reborrow()),
            d_out,
            a.fc_gelu.prefix(bt * 4 * c),
            self.mlp_c_proj_weight,
            bt,
            4 * c,
            c,
        );
        zero(g.d_fc.prefix_mut(bt * 4 * c));
        gelu_backward(g.d_fc.prefix_mut(bt * 4 * c), a.fc.prefix(bt * 4 * c), g.d_fc_gelu.prefix(bt * 4 * c));
        zero(g.d_ln.prefix_mut(bt * c));
        linear_backward(
            Some(g.d_ln.prefix_mut(bt * c)),
            grads.mlp_c_fc_weight.reborrow(),
            Some(grads.mlp_c_fc_bias.reborrow()),
            g.d_fc.prefix(bt * 4 * c),
            a.ln_2.prefix(bt * c),
            self.mlp_c_fc_weight,
            bt,
            c,
            4 * c,
        );
        layernorm_backward(
            g.d_res_2.prefix_mut(bt * c),
            grads.ln_2_weight.reborrow(),
            grads.ln_2_bias.reborrow(),
            g.d_ln.prefix(bt * c),
            a.res_2.prefix(bt * c),
            self.ln_2_weight,
            a.ln_2_mean.prefix(bt),
            a.ln_2_rstd.prefix(bt),
            c,
        );

        // res_2 = x + attn(x): the same again for the attention branch.
        let d_res_2 = g.d_res_2.prefix(bt * c);
        copy(d_x.reborrow(), d_res_2);
        zero(g.d_att_y.prefix_mut(bt * c));
        linear_backward(
            Some(g.d_att_y.prefix_mut(bt * c)),
            grads.attn_c_proj_weight.reborrow(),
            Some(grads.attn_c_proj_bias.reborrow()),
            d_res_2,
            a.att_y.prefix(bt * c),
            self.attn_c_proj_weight,
            bt,
            c,
            c,
        );
        zero(g.d_qkv.prefix_mut(bt * 3 * c));
        attention_backward(
            g.d_qkv.prefix_mut(bt * 3 * c),
            g.d_att_y.prefix(bt * c),
            a.qkv.prefix(bt * 3 * c),
            a.att.prefix(d.b * d.n_head * d.t * d.t),
            d.t,
            c,
            d.n_head,
        );
        zero(g.d_ln.prefix_mut(bt * c));
        linear_backward(
            Some(g.d_ln.prefix_mut(bt * c)),
            grads.attn_c_attn_weight.reborrow(),
            Some(grads.attn_c_attn_bias.reborrow()),
            g.d_qkv.prefix(bt * 3 * c),
            a.ln_1.prefix(bt * c),
            self.attn_c_attn_weight,
            bt,
            c,
            3 * c,
        );
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
    }
}
// ANCHOR_END: block_backward

// ANCHOR: lm_head
/// logits [BT, Vp] = x [BT, C] @ wte^T. The output projection is the token embedding itself,
/// transposed (tied weights): the vector a token is read in as is also the one it is scored by.
fn lm_head_forward(logits: ViewMut<'_>, x: View<'_>, wte: View<'_>, bt: usize, c: usize, vp: usize) {
    matmul(logits, x, wte, bt, c, vp, false, true, false);
}

/// dx = dlogits @ wte [BT, C];  dwte += dlogits^T @ x [Vp, C] (added to the embedding's own
/// gradient: one tensor, two uses, one sum).
#[allow(clippy::too_many_arguments)]
fn lm_head_backward(
    dx: ViewMut<'_>,
    dwte: ViewMut<'_>,
    dlogits: View<'_>,
    x: View<'_>,
    wte: View<'_>,
    bt: usize,
    c: usize,
    vp: usize,
) {
    matmul(dx, dlogits, wte, bt, vp, c, false, false, false);
    matmul(dwte, dlogits, x, vp, bt, c, true, false, true);
}
// ANCHOR_END: lm_head

// ANCHOR: model_forward
/// tokens [B, T] -> logits [B, T, Vp] in `acts.logits`. With targets [B, T], also returns the
/// mean loss, and `acts.logits` then holds the probabilities that backward needs. On a GPU,
/// reading the loss back waits for the queued work, and reports its first error.
pub fn forward(
    p: &GptParams<View<'_>>,
    cfg: &ModelConfig,
    acts: &mut Activations,
    tokens: &[u32],
    targets: Option<&[u32]>,
    b: usize,
    t: usize,
) -> Result<Option<f32>, CudaError> {
    assert!(b <= acts.batch && t <= acts.seq && t <= cfg.block_size, "pass larger than its buffers");
    assert_eq!(tokens.len(), b * t);
    let d = Dims { b, t, c: cfg.n_embd, n_head: cfg.n_head };
    let (bt, c, vp) = (b * t, cfg.n_embd, cfg.padded_vocab_size());

    embedding_forward(acts.embedded.prefix_mut(bt * c), tokens, p.wte, p.wpe, t, c);
    for (l, block) in p.blocks.iter().enumerate() {
        let (done, todo) = acts.blocks.split_at_mut(l);
        let x = done.last().map_or(&acts.embedded, |prev| &prev.out).prefix(bt * c);
        block.forward(x, &mut todo[0], acts.proj.prefix_mut(bt * c), d);
    }
    let last = acts.blocks.last().map_or(&acts.embedded, |b| &b.out).prefix(bt * c);
    let (mean, rstd) = (acts.ln_f_mean.prefix_mut(bt), acts.ln_f_rstd.prefix_mut(bt));
    layernorm_forward(acts.ln_f.prefix_mut(bt * c), mean, rstd, last, p.ln_f_weight, p.ln_f_bias, c);
    lm_head_forward(acts.logits.prefix_mut(bt * vp), acts.ln_f.prefix(bt * c), p.wte, bt, c, vp);

    let Some(targets) = targets else { return Ok(None) };
    let losses = acts.losses.prefix_mut(bt);
    softmax_cross_entropy_forward(acts.logits.prefix_mut(bt * vp), losses, targets, cfg.vocab_size, vp);
    let losses = acts.losses.prefix(bt).to_vec()?;
    Ok(Some((losses.iter().map(|&l| l as f64).sum::<f64>() / bt as f64) as f32))
}
// ANCHOR_END: model_forward

// ANCHOR: grads_ready
/// Told, during backward, which parameters' gradients are now final: a range of indices into
/// `ParamLayout::specs`, and read access to every gradient. They become final in reverse layout
/// order: ln_f, then block L-1 down to block 0, then wte and wpe (wte last: it collects the
/// output projection's gradient first and the embedding's at the very end). Chapter 2 hangs its
/// gradient all-reduce here, to overlap communication with the rest of backward.
pub type GradsReady<'a> = &'a mut dyn FnMut(Range<usize>, &GptParams<ViewMut<'_>>);
// ANCHOR_END: grads_ready

// ANCHOR: model_backward
/// Accumulates dL/dθ into `grads` for L = dloss * (sum of the token losses of the last
/// `forward`, which must have been given targets). dloss = 1/(tokens in the step) makes L the
/// step's mean loss.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    p: &GptParams<View<'_>>,
    grads: &mut GptParams<ViewMut<'_>>,
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

    softmax_cross_entropy_backward(acts.logits.prefix_mut(bt * vp), targets, dloss, vp);
    let (dlogits, ln_f) = (acts.logits.prefix(bt * vp), acts.ln_f.prefix(bt * c));
    lm_head_backward(g.block.d_ln.prefix_mut(bt * c), grads.wte.reborrow(), dlogits, ln_f, p.wte, bt, c, vp);

    let [d_a, d_b] = &mut g.d_res;
    let (mut d_out, mut d_in) = (d_a, d_b);
    let last = acts.blocks.last().map_or(&acts.embedded, |b| &b.out).prefix(bt * c);
    zero(d_out.prefix_mut(bt * c));
    layernorm_backward(
        d_out.prefix_mut(bt * c),
        grads.ln_f_weight.reborrow(),
        grads.ln_f_bias.reborrow(),
        g.block.d_ln.prefix(bt * c),
        last,
        p.ln_f_weight,
        acts.ln_f_mean.prefix(bt),
        acts.ln_f_rstd.prefix(bt),
        c,
    );
    on_ready(n_tensors - 2..n_tensors, grads);

    for l in (0..cfg.n_layer).rev() {
        let x = match l {
            0 => acts.embedded.prefix(bt * c),
            _ => acts.blocks[l - 1].out.prefix(bt * c),
        };
        let (block_grads, acts_l) = (&mut grads.blocks[l], &acts.blocks[l]);
        p.blocks[l].backward(block_grads, d_out.prefix(bt * c), x, acts_l, &mut g.block, d_in.prefix_mut(bt * c), d);
        std::mem::swap(&mut d_out, &mut d_in);
        on_ready(2 + 12 * l..2 + 12 * (l + 1), grads);
    }
    embedding_backward(grads.wte.reborrow(), grads.wpe.reborrow(), d_out.prefix(bt * c), tokens, t, c);
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
        let mut acts = Activations::new(cfg, b, t, Device::Cpu, DType::F32, &ledger).unwrap();
        let mut scratch = Gradients::new(cfg, b, t, Device::Cpu, DType::F32, &ledger).unwrap();
        let mut grads = vec![0.0; layout.total];
        let p = layout.views(View::Cpu(params));
        forward(&p, cfg, &mut acts, tokens, Some(targets), b, t).unwrap();
        let dloss = 1.0 / (b * t) as f32;
        backward(
            &p,
            &mut layout.views_mut(ViewMut::Cpu(&mut grads)),
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
        let mut acts = Activations::new(cfg, b, t, Device::Cpu, DType::F32, &MemoryLedger::new()).unwrap();
        forward(&layout.views(View::Cpu(params)), cfg, &mut acts, tokens, Some(targets), b, t).unwrap().unwrap()
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
        let mut hook = |ready: Range<usize>, g: &GptParams<ViewMut<'_>>| {
            // What the hook reads is the final gradient: nonzero for every tensor but the unused
            // positions' rows of wpe.
            assert!(ready.clone().all(|i| g.tensors()[i].as_slice().iter().any(|&x| x != 0.0)));
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
        let _acts = Activations::new(&cfg, b, t, Device::Cpu, DType::F32, &ledger).unwrap();
        let counted = ledger.report().current[&Category::Activations];
        assert_eq!(counted, (4 * b * t * Activations::floats_per_token(&cfg, t)) as u64);
    }
    // ANCHOR_END: activation_ledger_test
}
