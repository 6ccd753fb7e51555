//! GPT-2: pre-LayerNorm transformer blocks, learned position embeddings, an output projection
//! tied to the token embedding. Forward is a loop over blocks; backward is the same loop
//! reversed, accumulating into gradient buffers of the parameters' layout. No autograd.
//!
//! The model is three parts, each a forward/backward pair with its inputs and outputs passed
//! explicitly: the embeddings, the blocks, and the head with the loss. Chapter 1's [`forward`]
//! and [`backward`] run all three in turn; a pipeline stage runs some of the blocks, a recomputed
//! block runs its forward again from its saved input. A block computes at a [`BlockShape`] and
//! calls a [`BlockComm`] where a tensor-parallel shard of it must talk to the others; chapter 1's
//! is [`Whole`], which has no one to talk to.

use crate::config::ModelConfig;
use crate::params::{BlockParams, GptParams, ParamLayout, Part};
use kernels::comm::CommError;
use kernels::dispatch::{
    attention_backward, attention_forward, copy, embedding_backward, embedding_forward, gelu_backward,
    layernorm_backward, layernorm_forward, linear_backward, linear_forward, linear_gelu_forward, matmul,
    residual_forward, softmax_cross_entropy_backward, softmax_cross_entropy_forward, zero,
};
use kernels::{Category, CudaError, DType, Device, MemoryLedger, Rng, Tensor, TensorError, View, ViewMut};
use std::ops::Range;

/// What a pass can fail with: reading a result back from a GPU, allocating, or (in a sharded
/// block) a collective.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error(transparent)]
    Comm(#[from] CommError),
}

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

// ANCHOR: block_shape
/// The widths one block computes at. A whole block (chapter 1) has all the heads and the whole
/// MLP; a tensor-parallel shard has its heads and its share of the MLP's units, and reads and
/// writes the same full-width residual stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockShape {
    /// C: the residual stream's width, never split.
    pub n_embd: usize,
    /// Heads this block computes, and the size of each.
    pub n_head: usize,
    pub head_size: usize,
    /// Width of the MLP's hidden layer here (4C in a whole block).
    pub mlp_hidden: usize,
}

impl BlockShape {
    pub fn whole(cfg: &ModelConfig) -> BlockShape {
        BlockShape { n_embd: cfg.n_embd, n_head: cfg.n_head, head_size: cfg.head_size(), mlp_hidden: 4 * cfg.n_embd }
    }

    /// One of `n` equal shards: n_head/n heads and 4C/n MLP units (`n` must divide both, as
    /// `ParamLayout::shard` checks for the weights).
    pub fn shard(cfg: &ModelConfig, n: usize) -> BlockShape {
        let whole = BlockShape::whole(cfg);
        BlockShape { n_head: whole.n_head / n, mlp_hidden: whole.mlp_hidden / n, ..whole }
    }

    /// Width of the attention output (and of each of q, k, v): heads · head size.
    pub fn attn_width(&self) -> usize {
        self.n_head * self.head_size
    }
}
// ANCHOR_END: block_shape

// ANCHOR: block_comm
/// Where a shard of a block must talk to the other shards of its tensor-parallel group:
/// Megatron's two points per branch (attention, then MLP). Each branch reads the replicated
/// residual stream, computes with its own columns and rows, and writes a partial sum.
pub trait BlockComm {
    /// Forward, after a branch's output projection: this shard's partial sum becomes the full
    /// sum (an all-reduce; its backward is the identity, since every shard gets all of d_out).
    fn sum_branch_output(&mut self, partial: ViewMut<'_>) -> Result<(), CommError>;
    /// Backward, at a branch's input: this shard's columns gave part of dL/d(input); it becomes
    /// the full sum (the backward of the identity the input went through in forward).
    fn sum_branch_input_grad(&mut self, partial: ViewMut<'_>) -> Result<(), CommError>;
    /// Whether this shard adds the output projections' biases. Exactly one shard of a group must,
    /// so that the sum holds each bias once.
    fn adds_output_bias(&self) -> bool;

    // Sequence parallelism (chapter 3) splits the residual stream by tokens. Whole blocks and
    // plain tensor parallelism keep all of it, and need none of these.

    /// The rows of the B·T tokens whose residual stream this shard holds (the block's input and
    /// output, the LayerNorms' statistics): all of them, unless the stream is split by tokens.
    /// The two sums above then leave their result in these rows only.
    fn stream_rows(&self, bt: usize) -> Range<usize> {
        0..bt
    }
    /// Forward, at a branch's input: `ln` [B·T, C] holds the LayerNorm's output in this shard's
    /// stream rows; afterwards it must hold every row (an all-gather, when the stream is split).
    fn gather_branch_input(&mut self, _ln: ViewMut<'_>) -> Result<(), CommError> {
        Ok(())
    }
    /// Backward, at a branch's output: `d_out` is dL/d(the stream rows here); returns dL/d(the
    /// branch's whole output) [B·T, C], gathered into `buf` when the stream is split.
    fn gather_branch_output_grad<'a>(&mut self, d_out: View<'a>, _buf: ViewMut<'a>) -> Result<View<'a>, CommError> {
        Ok(d_out)
    }
}

/// A whole block: nothing to sum with, and it adds its own biases.
pub struct Whole;

impl BlockComm for Whole {
    fn sum_branch_output(&mut self, _partial: ViewMut<'_>) -> Result<(), CommError> {
        Ok(())
    }
    fn sum_branch_input_grad(&mut self, _partial: ViewMut<'_>) -> Result<(), CommError> {
        Ok(())
    }
    fn adds_output_bias(&self) -> bool {
        true
    }
}
// ANCHOR_END: block_comm

// ANCHOR: activations
/// What one block's forward saves for its backward. Every buffer is sized for the capacity
/// (B, T) it was made with; a pass over a smaller batch or sequence uses a prefix. A is the
/// attention width and H the heads of the block's shape (C and n_head when whole), M its MLP
/// width (4C when whole).
pub struct BlockActivations {
    pub ln_1: Tensor,      // [B, T, C]
    pub ln_1_mean: Tensor, // [B, T]
    pub ln_1_rstd: Tensor, // [B, T]
    pub qkv: Tensor,       // [B, T, 3A]
    pub att: Tensor,       // [B, H, T, T]
    pub att_y: Tensor,     // [B, T, A]   attention output, before its projection
    pub res_2: Tensor,     // [B, T, C]   residual stream after the attention branch
    pub ln_2: Tensor,      // [B, T, C]
    pub ln_2_mean: Tensor, // [B, T]
    pub ln_2_rstd: Tensor, // [B, T]
    pub fc: Tensor,        // [B, T, M]
    pub fc_gelu: Tensor,   // [B, T, M]
    pub out: Tensor,       // [B, T, C]   residual stream after the MLP branch: the block's output
}

/// What the head's forward saves: the final LayerNorm and the logits.
pub struct HeadActivations {
    pub ln_f: Tensor,      // [B, T, C]
    pub ln_f_mean: Tensor, // [B, T]
    pub ln_f_rstd: Tensor, // [B, T]
    /// [B, T, Vp]: logits after forward, probabilities after the loss, dlogits after backward.
    pub logits: Tensor,
    pub losses: Tensor, // [B, T]
}

/// Everything forward saves, for a batch of up to `batch` sequences of up to `seq` tokens.
pub struct Activations {
    pub batch: usize,
    pub seq: usize,
    pub embedded: Tensor, // [B, T, C]   the first residual stream
    pub blocks: Vec<BlockActivations>,
    pub head: HeadActivations,
    /// A projection's output before it joins the residual stream. Not needed by backward, so
    /// one buffer serves every block.
    pub proj: Tensor, // [B, T, C]
}
// ANCHOR_END: activations

// ANCHOR: gradients_scratch
/// Backward's working buffers: gradients with respect to activations (not parameters). One set
/// serves every block, since block l's are dead once block l-1's backward starts.
pub struct BackwardScratch {
    /// [B, T, C] each, used in turn: dL/d(block output) in one, dL/d(block input) out the other.
    pub d_res: [Tensor; 2],
    pub block: BlockScratch,
}

/// The activation gradients inside one block's backward (widths as in [`BlockActivations`]).
pub struct BlockScratch {
    pub d_res_2: Tensor,   // [B, T, C]
    pub d_ln: Tensor,      // [B, T, C]
    pub d_att_y: Tensor,   // [B, T, A]
    pub d_qkv: Tensor,     // [B, T, 3A]
    pub d_fc: Tensor,      // [B, T, M]
    pub d_fc_gelu: Tensor, // [B, T, M]
}
// ANCHOR_END: gradients_scratch

/// Allocates tensors of one device, type and ledger category.
struct Alloc<'a> {
    device: Device,
    dtype: DType,
    category: Category,
    ledger: &'a MemoryLedger,
}

impl Alloc<'_> {
    fn t(&self, shape: &[usize]) -> Result<Tensor, TensorError> {
        Tensor::zeros_on(shape, self.device, self.dtype, self.category, self.ledger)
    }
    /// LayerNorm statistics and losses stay f32 in a bf16 run.
    fn stat(&self, shape: &[usize]) -> Result<Tensor, TensorError> {
        Tensor::zeros_on(shape, self.device, DType::F32, self.category, self.ledger)
    }
}

impl BlockActivations {
    /// Buffers for one block of `shape` over passes of up to `batch` x `seq` tokens.
    pub fn new(
        shape: BlockShape,
        batch: usize,
        seq: usize,
        device: Device,
        dtype: DType,
        ledger: &MemoryLedger,
    ) -> Result<BlockActivations, TensorError> {
        BlockActivations::with_stream_rows(shape, batch, seq, batch * seq, device, dtype, ledger)
    }

    /// The same, for a shard that holds the residual stream of `stream` of the B·T tokens
    /// ([`BlockComm::stream_rows`]): the stream after each branch and the LayerNorms'
    /// statistics have `stream` rows, everything else B·T.
    pub fn with_stream_rows(
        shape: BlockShape,
        batch: usize,
        seq: usize,
        stream: usize,
        device: Device,
        dtype: DType,
        ledger: &MemoryLedger,
    ) -> Result<BlockActivations, TensorError> {
        let a = Alloc { device, dtype, category: Category::Activations, ledger };
        let (bt, c, w, m, s) = (batch * seq, shape.n_embd, shape.attn_width(), shape.mlp_hidden, stream);
        Ok(BlockActivations {
            ln_1: a.t(&[bt, c])?,
            ln_1_mean: a.stat(&[s])?,
            ln_1_rstd: a.stat(&[s])?,
            qkv: a.t(&[bt, 3 * w])?,
            att: a.t(&[batch, shape.n_head, seq, seq])?,
            att_y: a.t(&[bt, w])?,
            res_2: a.t(&[s, c])?,
            ln_2: a.t(&[bt, c])?,
            ln_2_mean: a.stat(&[s])?,
            ln_2_rstd: a.stat(&[s])?,
            fc: a.t(&[bt, m])?,
            fc_gelu: a.t(&[bt, m])?,
            out: a.t(&[s, c])?,
        })
    }
}

impl BlockActivations {
    /// As [`BlockActivations::new`], with no room for the attention matrices (`att` is empty):
    /// selective recomputation (chapter 6) keeps everything else and recomputes them, the part
    /// that grows with T², in backward, into one buffer that serves every block.
    pub fn without_attention(
        shape: BlockShape,
        batch: usize,
        seq: usize,
        device: Device,
        dtype: DType,
        ledger: &MemoryLedger,
    ) -> Result<BlockActivations, TensorError> {
        let a = Alloc { device, dtype, category: Category::Activations, ledger };
        let (bt, c, w, m) = (batch * seq, shape.n_embd, shape.attn_width(), shape.mlp_hidden);
        Ok(BlockActivations {
            ln_1: a.t(&[bt, c])?,
            ln_1_mean: a.stat(&[bt])?,
            ln_1_rstd: a.stat(&[bt])?,
            qkv: a.t(&[bt, 3 * w])?,
            att: a.t(&[0])?,
            att_y: a.t(&[bt, w])?,
            res_2: a.t(&[bt, c])?,
            ln_2: a.t(&[bt, c])?,
            ln_2_mean: a.stat(&[bt])?,
            ln_2_rstd: a.stat(&[bt])?,
            fc: a.t(&[bt, m])?,
            fc_gelu: a.t(&[bt, m])?,
            out: a.t(&[bt, c])?,
        })
    }
}

impl HeadActivations {
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
        device: Device,
        dtype: DType,
        ledger: &MemoryLedger,
    ) -> Result<HeadActivations, TensorError> {
        HeadActivations::with_columns(cfg, cfg.padded_vocab_size(), batch, seq, device, dtype, ledger)
    }

    /// The same with `columns` of the logits (a vocabulary shard's, on a tensor-parallel rank).
    pub fn with_columns(
        cfg: &ModelConfig,
        columns: usize,
        batch: usize,
        seq: usize,
        device: Device,
        dtype: DType,
        ledger: &MemoryLedger,
    ) -> Result<HeadActivations, TensorError> {
        let a = Alloc { device, dtype, category: Category::Activations, ledger };
        let (bt, c) = (batch * seq, cfg.n_embd);
        Ok(HeadActivations {
            ln_f: a.t(&[bt, c])?,
            ln_f_mean: a.stat(&[bt])?,
            ln_f_rstd: a.stat(&[bt])?,
            logits: a.t(&[bt, columns])?,
            losses: a.stat(&[bt])?,
        })
    }
}

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
        let a = Alloc { device, dtype, category: Category::Activations, ledger };
        let bt = batch * seq;
        let embedded = a.t(&[bt, cfg.n_embd])?;
        let shape = BlockShape::whole(cfg);
        let blocks = (0..cfg.n_layer)
            .map(|_| BlockActivations::new(shape, batch, seq, device, dtype, ledger))
            .collect::<Result<_, TensorError>>()?;
        let head = HeadActivations::new(cfg, batch, seq, device, dtype, ledger)?;
        let proj = Alloc { category: Category::Other, ..a }.t(&[bt, cfg.n_embd])?;
        Ok(Activations { batch, seq, embedded, blocks, head, proj })
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

impl BackwardScratch {
    /// Working buffers for the backward of blocks of `shape`.
    pub fn new(
        shape: BlockShape,
        batch: usize,
        seq: usize,
        device: Device,
        dtype: DType,
        ledger: &MemoryLedger,
    ) -> Result<BackwardScratch, TensorError> {
        let a = Alloc { device, dtype, category: Category::Other, ledger };
        let (bt, c, w, m) = (batch * seq, shape.n_embd, shape.attn_width(), shape.mlp_hidden);
        Ok(BackwardScratch {
            d_res: [a.t(&[bt, c])?, a.t(&[bt, c])?],
            block: BlockScratch {
                d_res_2: a.t(&[bt, c])?,
                d_ln: a.t(&[bt, c])?,
                d_att_y: a.t(&[bt, w])?,
                d_qkv: a.t(&[bt, 3 * w])?,
                d_fc: a.t(&[bt, m])?,
                d_fc_gelu: a.t(&[bt, m])?,
            },
        })
    }
}

/// The sizes one pass of a block runs at.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub shape: BlockShape,
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
    /// Each projection's output is a partial sum on a shard: `comm` completes it before it joins
    /// the residual stream (and the one shard that adds biases adds them).
    pub fn forward(
        &self,
        x: View<'_>,
        acts: &mut BlockActivations,
        mut proj: ViewMut<'_>,
        d: Dims,
        comm: &mut dyn BlockComm,
    ) -> Result<(), CommError> {
        let (bt, c, w, m) = (d.bt(), d.shape.n_embd, d.shape.attn_width(), d.shape.mlp_hidden);
        let a = acts;
        let adds_bias = comm.adds_output_bias();
        // x and the stream hold `s` rows, `mine` of B·T: all of them unless split by tokens.
        let rows = comm.stream_rows(bt);
        let (s, mine) = (rows.len(), rows.start * c..rows.end * c);
        let (mean, rstd) = (a.ln_1_mean.prefix_mut(s), a.ln_1_rstd.prefix_mut(s));
        let ln_1 = a.ln_1.prefix_mut(bt * c).slice_into(mine.clone());
        layernorm_forward(ln_1, mean, rstd, x, self.ln_1_weight, self.ln_1_bias, c);
        comm.gather_branch_input(a.ln_1.prefix_mut(bt * c))?;
        let (ln_1, bias) = (a.ln_1.prefix(bt * c), Some(self.attn_c_attn_bias));
        linear_forward(a.qkv.prefix_mut(bt * 3 * w), ln_1, self.attn_c_attn_weight, bias, bt, c, 3 * w);
        let att = a.att.prefix_mut(d.b * d.shape.n_head * d.t * d.t);
        attention_forward(a.att_y.prefix_mut(bt * w), att, a.qkv.prefix(bt * 3 * w), d.t, w, d.shape.n_head);
        let (att_y, bias) = (a.att_y.prefix(bt * w), adds_bias.then_some(self.attn_c_proj_bias));
        linear_forward(proj.reborrow(), att_y, self.attn_c_proj_weight, bias, bt, w, c);
        comm.sum_branch_output(proj.reborrow())?;
        residual_forward(a.res_2.prefix_mut(s * c), x, proj.as_view().slice(mine.clone()));

        let (mean, rstd) = (a.ln_2_mean.prefix_mut(s), a.ln_2_rstd.prefix_mut(s));
        let (res_2, ln_2) = (a.res_2.prefix(s * c), a.ln_2.prefix_mut(bt * c).slice_into(mine.clone()));
        layernorm_forward(ln_2, mean, rstd, res_2, self.ln_2_weight, self.ln_2_bias, c);
        comm.gather_branch_input(a.ln_2.prefix_mut(bt * c))?;
        // fc = ln_2 @ W + b, fc_gelu = gelu(fc): one op, so that a GPU can do both in one matmul.
        let (fc, fc_gelu, ln_2) = (a.fc.prefix_mut(bt * m), a.fc_gelu.prefix_mut(bt * m), a.ln_2.prefix(bt * c));
        linear_gelu_forward(fc_gelu, fc, ln_2, self.mlp_c_fc_weight, self.mlp_c_fc_bias, bt, c, m);
        let (fc_gelu, bias) = (a.fc_gelu.prefix(bt * m), adds_bias.then_some(self.mlp_c_proj_bias));
        linear_forward(proj.reborrow(), fc_gelu, self.mlp_c_proj_weight, bias, bt, m, c);
        comm.sum_branch_output(proj.reborrow())?;
        residual_forward(a.out.prefix_mut(s * c), a.res_2.prefix(s * c), proj.as_view().slice(mine));
        Ok(())
    }
}
// ANCHOR_END: block_forward

// ANCHOR: block_backward
impl BlockParams<View<'_>> {
    /// Given d_out = dL/d(out), accumulates the block's parameter gradients into `grads` and
    /// writes dL/dx into `d_x`: the forward above, read bottom to top.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        grads: &mut BlockParams<ViewMut<'_>>,
        d_out: View<'_>,
        x: View<'_>,
        acts: &BlockActivations,
        g: &mut BlockScratch,
        mut d_x: ViewMut<'_>,
        d: Dims,
        comm: &mut dyn BlockComm,
    ) -> Result<(), CommError> {
        let (bt, c, w, m) = (d.bt(), d.shape.n_embd, d.shape.attn_width(), d.shape.mlp_hidden);
        let a = acts;
        let rows = comm.stream_rows(bt); // as in forward: d_out, x and d_x hold `s` rows
        let (s, mine) = (rows.len(), rows.start * c..rows.end * c);

        // out = res_2 + mlp(res_2). A sum passes its gradient to both inputs unchanged
        // (residual_backward): d_out flows straight into d_res_2 through the skip, and is the
        // gradient of the MLP's output, whose backward then adds its share into d_res_2.
        copy(g.d_res_2.prefix_mut(s * c), d_out);
        let d_mlp = comm.gather_branch_output_grad(d_out, g.d_ln.prefix_mut(bt * c))?;
        zero(g.d_fc_gelu.prefix_mut(bt * m));
        linear_backward(
            Some(g.d_fc_gelu.prefix_mut(bt * m)),
            grads.mlp_c_proj_weight.reborrow(),
            Some(grads.mlp_c_proj_bias.reborrow()),
            d_mlp,
            a.fc_gelu.prefix(bt * m),
            self.mlp_c_proj_weight,
            bt,
            m,
            c,
        );
        zero(g.d_fc.prefix_mut(bt * m));
        gelu_backward(g.d_fc.prefix_mut(bt * m), a.fc.prefix(bt * m), g.d_fc_gelu.prefix(bt * m));
        zero(g.d_ln.prefix_mut(bt * c));
        linear_backward(
            Some(g.d_ln.prefix_mut(bt * c)),
            grads.mlp_c_fc_weight.reborrow(),
            Some(grads.mlp_c_fc_bias.reborrow()),
            g.d_fc.prefix(bt * m),
            a.ln_2.prefix(bt * c),
            self.mlp_c_fc_weight,
            bt,
            c,
            m,
        );
        comm.sum_branch_input_grad(g.d_ln.prefix_mut(bt * c))?;
        layernorm_backward(
            g.d_res_2.prefix_mut(s * c),
            grads.ln_2_weight.reborrow(),
            grads.ln_2_bias.reborrow(),
            g.d_ln.prefix(bt * c).slice(mine.clone()),
            a.res_2.prefix(s * c),
            self.ln_2_weight,
            a.ln_2_mean.prefix(s),
            a.ln_2_rstd.prefix(s),
            c,
        );

        // res_2 = x + attn(x): the same again for the attention branch.
        let d_res_2 = g.d_res_2.prefix(s * c);
        copy(d_x.reborrow(), d_res_2);
        let d_attn = comm.gather_branch_output_grad(d_res_2, g.d_ln.prefix_mut(bt * c))?;
        zero(g.d_att_y.prefix_mut(bt * w));
        linear_backward(
            Some(g.d_att_y.prefix_mut(bt * w)),
            grads.attn_c_proj_weight.reborrow(),
            Some(grads.attn_c_proj_bias.reborrow()),
            d_attn,
            a.att_y.prefix(bt * w),
            self.attn_c_proj_weight,
            bt,
            w,
            c,
        );
        zero(g.d_qkv.prefix_mut(bt * 3 * w));
        attention_backward(
            g.d_qkv.prefix_mut(bt * 3 * w),
            g.d_att_y.prefix(bt * w),
            a.qkv.prefix(bt * 3 * w),
            a.att.prefix(d.b * d.shape.n_head * d.t * d.t),
            d.t,
            w,
            d.shape.n_head,
        );
        zero(g.d_ln.prefix_mut(bt * c));
        linear_backward(
            Some(g.d_ln.prefix_mut(bt * c)),
            grads.attn_c_attn_weight.reborrow(),
            Some(grads.attn_c_attn_bias.reborrow()),
            g.d_qkv.prefix(bt * 3 * w),
            a.ln_1.prefix(bt * c),
            self.attn_c_attn_weight,
            bt,
            c,
            3 * w,
        );
        comm.sum_branch_input_grad(g.d_ln.prefix_mut(bt * c))?;
        layernorm_backward(
            d_x,
            grads.ln_1_weight.reborrow(),
            grads.ln_1_bias.reborrow(),
            g.d_ln.prefix(bt * c).slice(mine),
            x,
            self.ln_1_weight,
            a.ln_1_mean.prefix(s),
            a.ln_1_rstd.prefix(s),
            c,
        );
        Ok(())
    }
}
// ANCHOR_END: block_backward

// ANCHOR: lm_head
/// logits [BT, Vp] = x [BT, C] @ wte^T. The output projection is the token embedding itself,
/// transposed (tied weights): the vector a token is read in as is also the one it is scored by.
pub fn lm_head_forward(logits: ViewMut<'_>, x: View<'_>, wte: View<'_>, bt: usize, c: usize, vp: usize) {
    matmul(logits, x, wte, bt, c, vp, false, true, false);
}

/// dx = dlogits @ wte [BT, C];  dwte += dlogits^T @ x [Vp, C] (added to the embedding's own
/// gradient: one tensor, two uses, one sum).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_backward(
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

// ANCHOR: model_parts
/// The head's parameters: the final LayerNorm and the (tied) output projection.
pub struct Head<T> {
    pub ln_f_weight: T,
    pub ln_f_bias: T,
    /// [Vp, C]: the token embedding, read as the output projection.
    pub wte: T,
}

impl<'a> GptParams<View<'a>> {
    pub fn head(&self) -> Head<View<'a>> {
        Head { ln_f_weight: self.ln_f_weight, ln_f_bias: self.ln_f_bias, wte: self.wte }
    }
}

impl BlockParams<ViewMut<'_>> {
    /// Read-only views of the block's tensors, in layout order.
    pub fn views(&self) -> Vec<View<'_>> {
        self.tensors().into_iter().map(ViewMut::as_view).collect()
    }
}

/// Part 1, the embeddings: tokens [B, T] -> x [B, T, C] = wte[token] + wpe[position].
pub fn embed_forward(x: ViewMut<'_>, tokens: &[u32], wte: View<'_>, wpe: View<'_>, t: usize, c: usize) {
    embedding_forward(x, tokens, wte, wpe, t, c);
}

/// Part 2, blocks `blocks` in order: x [B, T, C] is the first block's input; block i's output
/// is `acts[i].out`, and the last one's is the part's output.
pub fn blocks_forward(
    blocks: &[BlockParams<View<'_>>],
    x: View<'_>,
    acts: &mut [BlockActivations],
    mut proj: ViewMut<'_>,
    d: Dims,
    comm: &mut dyn BlockComm,
) -> Result<(), CommError> {
    let bt_c = comm.stream_rows(d.bt()).len() * d.shape.n_embd;
    for (l, block) in blocks.iter().enumerate() {
        let (done, todo) = acts.split_at_mut(l);
        let input = done.last().map_or(x, |prev| prev.out.prefix(bt_c));
        block.forward(input, &mut todo[0], proj.reborrow(), d, comm)?;
    }
    Ok(())
}

/// Part 3, the head: x [B, T, C] -> logits [B, T, Vp] in `acts.logits`. With targets [B, T],
/// also returns the mean loss, and `acts.logits` then holds the probabilities that backward
/// needs. On a GPU, reading the loss back waits for the queued work, and reports its first error.
#[allow(clippy::too_many_arguments)]
pub fn head_forward(
    p: &Head<View<'_>>,
    cfg: &ModelConfig,
    x: View<'_>,
    acts: &mut HeadActivations,
    targets: Option<&[u32]>,
    bt: usize,
) -> Result<Option<f32>, ModelError> {
    let (c, vp) = (cfg.n_embd, cfg.padded_vocab_size());
    let (mean, rstd) = (acts.ln_f_mean.prefix_mut(bt), acts.ln_f_rstd.prefix_mut(bt));
    layernorm_forward(acts.ln_f.prefix_mut(bt * c), mean, rstd, x, p.ln_f_weight, p.ln_f_bias, c);
    lm_head_forward(acts.logits.prefix_mut(bt * vp), acts.ln_f.prefix(bt * c), p.wte, bt, c, vp);

    let Some(targets) = targets else { return Ok(None) };
    let losses = acts.losses.prefix_mut(bt);
    softmax_cross_entropy_forward(acts.logits.prefix_mut(bt * vp), losses, targets, cfg.vocab_size, vp);
    let losses = acts.losses.prefix(bt).to_vec()?;
    Ok(Some((losses.iter().map(|&l| l as f64).sum::<f64>() / bt as f64) as f32))
}

/// Part 3 backward, for L = dloss · (sum of the token losses of the last `head_forward`):
/// accumulates the head's gradients (ln_f, and the output projection's share of dwte) and
/// writes dL/dx [B, T, C] into `d_x`. `d_ln` is [B, T, C] scratch.
#[allow(clippy::too_many_arguments)]
pub fn head_backward(
    p: &Head<View<'_>>,
    grads: Head<ViewMut<'_>>,
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
    let (dlogits, ln_f) = (acts.logits.prefix(bt * vp), acts.ln_f.prefix(bt * c));
    lm_head_backward(d_ln.reborrow(), grads.wte, dlogits, ln_f, p.wte, bt, c, vp);
    zero(d_x.reborrow());
    layernorm_backward(
        d_x,
        grads.ln_f_weight,
        grads.ln_f_bias,
        d_ln.as_view(),
        x,
        p.ln_f_weight,
        acts.ln_f_mean.prefix(bt),
        acts.ln_f_rstd.prefix(bt),
        c,
    );
}

/// Part 2 backward: blocks `blocks` from the last to the first, given d_out = dL/d(the last
/// block's output) in `d_res[0]`; `x` is the first block's input. Leaves dL/dx in `d_res[0]`.
/// `on_block_done(i, grads)` hears as block i's gradients become final.
#[allow(clippy::too_many_arguments)]
pub fn blocks_backward(
    blocks: &[BlockParams<View<'_>>],
    grads: &mut [BlockParams<ViewMut<'_>>],
    x: View<'_>,
    acts: &[BlockActivations],
    scratch: &mut BackwardScratch,
    d: Dims,
    comm: &mut dyn BlockComm,
    on_block_done: &mut dyn FnMut(usize, &BlockParams<ViewMut<'_>>),
) -> Result<(), CommError> {
    let bt_c = comm.stream_rows(d.bt()).len() * d.shape.n_embd;
    let [d_a, d_b] = &mut scratch.d_res;
    let (mut d_out, mut d_in) = (d_a, d_b);
    for l in (0..blocks.len()).rev() {
        let input = if l == 0 { x } else { acts[l - 1].out.prefix(bt_c) };
        let (g, d_x) = (&mut scratch.block, d_in.prefix_mut(bt_c));
        blocks[l].backward(&mut grads[l], d_out.prefix(bt_c), input, &acts[l], g, d_x, d, comm)?;
        std::mem::swap(&mut d_out, &mut d_in);
        on_block_done(l, &grads[l]);
    }
    // The gradient ended in whichever buffer the last swap left as d_out: keep it in d_res[0].
    if blocks.len() % 2 == 1 {
        scratch.d_res.swap(0, 1);
    }
    Ok(())
}

/// Part 1 backward: scatters dL/dx [B, T, C] into the rows of dwte and dwpe it came from.
pub fn embed_backward(dwte: ViewMut<'_>, dwpe: ViewMut<'_>, d_x: View<'_>, tokens: &[u32], t: usize, c: usize) {
    embedding_backward(dwte, dwpe, d_x, tokens, t, c);
}
// ANCHOR_END: model_parts

// ANCHOR: model_forward
/// tokens [B, T] -> logits [B, T, Vp] in `acts.head.logits`: the three parts in turn, on whole
/// blocks. With targets [B, T], also returns the mean loss (see [`head_forward`]).
pub fn forward(
    p: &GptParams<View<'_>>,
    cfg: &ModelConfig,
    acts: &mut Activations,
    tokens: &[u32],
    targets: Option<&[u32]>,
    b: usize,
    t: usize,
) -> Result<Option<f32>, ModelError> {
    assert!(b <= acts.batch && t <= acts.seq && t <= cfg.block_size, "pass larger than its buffers");
    assert_eq!(tokens.len(), b * t);
    let d = Dims { b, t, shape: BlockShape::whole(cfg) };
    let (bt, c) = (b * t, cfg.n_embd);

    embed_forward(acts.embedded.prefix_mut(bt * c), tokens, p.wte, p.wpe, t, c);
    let (x, proj) = (acts.embedded.prefix(bt * c), acts.proj.prefix_mut(bt * c));
    blocks_forward(&p.blocks, x, &mut acts.blocks, proj, d, &mut Whole)?;
    let last = acts.blocks.last().map_or(&acts.embedded, |b| &b.out).prefix(bt * c);
    head_forward(&p.head(), cfg, last, &mut acts.head, targets, bt)
}
// ANCHOR_END: model_forward

// ANCHOR: grads_ready
/// Told, during backward, that a part's gradients are now final, with that part's gradient
/// tensors in layout order (`ParamLayout::part_tensors` says which those are). They become final in the
/// order of `ParamLayout::backward_order`: the head, block L-1 down to block 0, then the
/// embeddings (wte last: it collects the output projection's gradient first and the embedding's
/// at the very end). Chapter 2 hangs its gradient all-reduce here, to overlap communication with
/// the rest of backward.
pub type GradsReady<'a> = &'a mut dyn FnMut(Part, &[View<'_>]);
// ANCHOR_END: grads_ready

// ANCHOR: model_backward
/// Accumulates dL/dθ into `grads` for L = dloss * (sum of the token losses of the last
/// `forward`, which must have been given targets): the three parts' backwards in reverse.
/// dloss = 1/(tokens in the step) makes L the step's mean loss.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    p: &GptParams<View<'_>>,
    grads: &mut GptParams<ViewMut<'_>>,
    cfg: &ModelConfig,
    acts: &mut Activations,
    scratch: &mut BackwardScratch,
    tokens: &[u32],
    targets: &[u32],
    dloss: f32,
    b: usize,
    t: usize,
    on_ready: GradsReady<'_>,
) -> Result<(), ModelError> {
    let d = Dims { b, t, shape: BlockShape::whole(cfg) };
    let (bt, c) = (b * t, cfg.n_embd);

    let last = acts.blocks.last().map_or(&acts.embedded, |b| &b.out).prefix(bt * c);
    let head_grads = Head {
        ln_f_weight: grads.ln_f_weight.reborrow(),
        ln_f_bias: grads.ln_f_bias.reborrow(),
        wte: grads.wte.reborrow(),
    };
    let (d_ln, d_x) = (scratch.block.d_ln.prefix_mut(bt * c), scratch.d_res[0].prefix_mut(bt * c));
    head_backward(&p.head(), head_grads, cfg, last, &mut acts.head, d_ln, d_x, targets, dloss, bt);
    on_ready(Part::Head, &[grads.ln_f_weight.as_view(), grads.ln_f_bias.as_view()]);

    let x = acts.embedded.prefix(bt * c);
    let mut block_done = |l: usize, g: &BlockParams<ViewMut<'_>>| on_ready(Part::Block(l), &g.views());
    blocks_backward(&p.blocks, &mut grads.blocks, x, &acts.blocks, scratch, d, &mut Whole, &mut block_done)?;
    embed_backward(grads.wte.reborrow(), grads.wpe.reborrow(), scratch.d_res[0].prefix(bt * c), tokens, t, c);
    on_ready(Part::Embeddings, &[grads.wte.as_view(), grads.wpe.as_view()]);
    Ok(())
}
// ANCHOR_END: model_backward

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Placement;

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
        let mut scratch = BackwardScratch::new(BlockShape::whole(cfg), b, t, Device::Cpu, DType::F32, &ledger).unwrap();
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
        )
        .unwrap();
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

    // ANCHOR: shard_test
    /// A test's stand-in for a tensor-parallel group of two thread ranks: `sum` adds the two
    /// ranks' buffers by hand (each writes its own, both read the sum).
    struct PairSum {
        rank: usize,
        slots: std::sync::Arc<std::sync::Mutex<[Vec<f32>; 2]>>,
        barrier: std::sync::Arc<std::sync::Barrier>,
    }

    impl PairSum {
        fn sum(&mut self, buf: ViewMut<'_>) -> Result<(), CommError> {
            let ViewMut::Cpu(buf) = buf else { unreachable!("CPU test") };
            self.slots.lock().unwrap()[self.rank] = buf.to_vec();
            self.barrier.wait();
            let slots = self.slots.lock().unwrap();
            buf.iter_mut().enumerate().for_each(|(i, x)| *x = slots[0][i] + slots[1][i]);
            drop(slots);
            self.barrier.wait(); // nobody overwrites a slot before both have read it
            Ok(())
        }
    }

    impl BlockComm for PairSum {
        fn sum_branch_output(&mut self, partial: ViewMut<'_>) -> Result<(), CommError> {
            self.sum(partial)
        }
        fn sum_branch_input_grad(&mut self, partial: ViewMut<'_>) -> Result<(), CommError> {
            self.sum(partial)
        }
        fn adds_output_bias(&self) -> bool {
            self.rank == 0
        }
    }

    /// One block's forward and backward at `shape`: (output, dL/dx, the block's gradients in
    /// `layout`'s buffer).
    fn block_pass(
        layout: &ParamLayout,
        params: &[f32],
        shape: BlockShape,
        x: &[f32],
        d_out: &[f32],
        (b, t): (usize, usize),
        comm: &mut dyn BlockComm,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let ledger = MemoryLedger::new();
        let mut acts = BlockActivations::new(shape, b, t, Device::Cpu, DType::F32, &ledger).unwrap();
        let mut scratch = BackwardScratch::new(shape, b, t, Device::Cpu, DType::F32, &ledger).unwrap();
        let mut proj = vec![0.0; x.len()];
        let (p, d) = (layout.views(View::Cpu(params)), Dims { b, t, shape });
        p.blocks[0].forward(View::Cpu(x), &mut acts, ViewMut::Cpu(&mut proj), d, comm).unwrap();
        let mut grads = vec![0.0; layout.total];
        let mut d_x = vec![0.0; x.len()];
        let mut g = layout.views_mut(ViewMut::Cpu(&mut grads));
        let (d_out, x) = (View::Cpu(d_out), View::Cpu(x));
        p.blocks[0]
            .backward(&mut g.blocks[0], d_out, x, &acts, &mut scratch.block, ViewMut::Cpu(&mut d_x), d, comm)
            .unwrap();
        (acts.out.as_slice().to_vec(), d_x, grads)
    }

    #[test]
    fn a_block_split_in_two_by_hand_computes_the_whole_block() {
        // Two heads, 16 dims: each shard has one head (its q, k and v columns of c_attn) and 32
        // of the MLP's 64 units; the sums at the hook points make the two one block.
        let (cfg, layout, params) = tiny();
        let (b, t, n) = (2, 8, 2);
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..b * t * cfg.n_embd).map(|_| rng.normal() as f32).collect();
        let d_out: Vec<f32> = (0..x.len()).map(|_| rng.normal() as f32 * 0.1).collect();
        let (out, d_x, grads) = block_pass(&layout, &params, BlockShape::whole(&cfg), &x, &d_out, (b, t), &mut Whole);

        let shard = layout.shard(n).unwrap();
        let slots = std::sync::Arc::new(std::sync::Mutex::new([Vec::new(), Vec::new()]));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|rank| {
                    let (layout, shard, params, x, d_out, cfg) = (&layout, &shard, &params, &x, &d_out, &cfg);
                    let mut comm = PairSum { rank, slots: slots.clone(), barrier: barrier.clone() };
                    scope.spawn(move || {
                        let mut mine = vec![0.0; shard.total];
                        layout.take_shard(shard, params, rank, n, &mut mine);
                        block_pass(shard, &mine, BlockShape::shard(cfg, n), x, d_out, (b, t), &mut comm)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });

        let close = |what: &str, a: &[f32], b: &[f32]| {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{what}[{i}]: {x} vs {y}");
            }
        };
        let mut gathered = vec![0.0; layout.total];
        for (rank, (out_r, d_x_r, grads_r)) in results.iter().enumerate() {
            close("out", &out, out_r);
            close("d_x", &d_x, d_x_r);
            layout.put_shard(&shard, grads_r, rank, n, &mut gathered);
            // Replicated tensors (LayerNorms, output biases): every shard has the whole gradient.
            for (whole, mine) in
                layout.specs.iter().zip(&shard.specs).filter(|(s, _)| s.placement == Placement::Replicated)
            {
                close(&whole.name, &grads[whole.range()], &grads_r[mine.range()]);
            }
        }
        for spec in layout.specs.iter().filter(|s| s.part == Part::Block(0)) {
            close(&spec.name, &grads[spec.range()], &gathered[spec.range()]);
        }
    }
    // ANCHOR_END: shard_test

    #[test]
    fn shards_cover_every_parameter_once_and_gather_back() {
        let (_, layout, params) = tiny();
        let n = 2;
        let shard = layout.shard(n).unwrap();
        // Split tensors halve, replicated ones stay: the shards hold less than two copies.
        assert!(shard.total < layout.total && 2 * shard.total > layout.total);
        let c_attn = shard.get("h.1.attn.c_attn.weight").unwrap();
        assert_eq!(c_attn.shape, vec![16, 24], "one head of q, k and v: 3 x 8 columns");
        let mut gathered = vec![0.0; layout.total];
        for rank in 0..n {
            let mut mine = vec![0.0; shard.total];
            layout.take_shard(&shard, &params, rank, n, &mut mine);
            layout.put_shard(&shard, &mine, rank, n, &mut gathered);
        }
        assert_eq!(gathered, params);
        // Rank 1's q columns of c_attn start at column 8 of the full tensor's first row.
        let full = layout.get("h.0.attn.c_attn.weight").unwrap().offset;
        let mut mine = vec![0.0; shard.total];
        layout.take_shard(&shard, &params, 1, n, &mut mine);
        let at = shard.get("h.0.attn.c_attn.weight").unwrap().offset;
        assert_eq!(mine[at..at + 8], params[full + 8..full + 16], "q of head 1");
        assert_eq!(mine[at + 8..at + 16], params[full + 24..full + 32], "k of head 1");
        let err = layout.shard(3).unwrap_err();
        assert!(err.to_string().contains("wte.weight cannot be split 3 ways"), "{err}");
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
        let mut hook = |part: Part, g: &[View<'_>]| {
            // What the hook reads is the final gradient: nonzero for every tensor.
            assert!(g.iter().all(|t| t.cpu().iter().any(|&x| x != 0.0)), "{part:?}");
            let lens: Vec<usize> = g.iter().map(|t| t.len()).collect();
            seen.push((part, lens));
        };
        gradient(&cfg, &layout, &params, &tokens, &tokens, 1, 4, &mut hook);
        assert_eq!(seen.first().map(|s| s.0), Some(Part::Head), "ln_f first");
        assert_eq!(seen.last().map(|s| s.0), Some(Part::Embeddings), "embeddings last");
        let order: Vec<Part> = seen.iter().map(|s| s.0).collect();
        assert_eq!(order, layout.backward_order(), "the layout states what backward does");
        for (part, lens) in &seen {
            let specs = &layout.specs[layout.part_tensors(*part)];
            assert_eq!(lens, &specs.iter().map(|s| s.numel()).collect::<Vec<_>>(), "{part:?}: the part's tensors");
        }
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
