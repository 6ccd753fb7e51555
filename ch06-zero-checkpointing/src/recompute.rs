//! Activation checkpointing: what forward keeps for backward, and what backward recomputes.
//!
//! - `none`: chapter 1: every block keeps its 13 tensors, 16C + 4 + H·T floats per token.
//! - `selective` (Korthikanti et al. 2022): every block keeps everything but the attention
//!   matrices (softmax(QKᵀ), B·H·T·T, the only part that grows with T²); backward recomputes
//!   them from the saved q, k, v, into one buffer that serves every block. The cost: one
//!   attention forward per block, a few percent of the step.
//! - `full`: every block keeps only its input (C floats per token); backward re-runs the
//!   block's whole forward from it into one block's worth of buffers, then its backward. The
//!   cost: a second forward, about a third more compute.
//!
//! All three run chapter 1's ops in the same order on the same inputs, so on the CPU the
//! recomputed tensors are the saved ones, bit for bit, and so is everything after them.

use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::model::{BackwardScratch, BlockActivations, BlockComm, BlockShape, Dims, HeadActivations};
use ch01_single_gpu::params::BlockParams;
use kernels::comm::CommError;
use kernels::dispatch::{attention_forward, copy};
use kernels::{Category, DType, Device, MemoryLedger, Tensor, TensorError, View, ViewMut};
use serde::Serialize;

/// `--recompute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// Keep every activation (chapter 1).
    None,
    /// Keep all but the attention matrices; recompute attention in backward.
    Selective,
    /// Keep each block's input; recompute the block in backward.
    Full,
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        })
    }
}

// ANCHOR: activation_formula
/// Activation memory of one pass, in floats per token (multiply by B·T·4 for bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ActivationFloats {
    /// What each block keeps until its backward.
    pub per_block: usize,
    pub blocks: usize,
    /// The one buffer recomputation works in: an attention matrix (selective), or one block's
    /// activations (full).
    pub recompute: usize,
    /// The first block's input and the head (its input, ln_f with its statistics, the
    /// logits, the losses): the same in every mode.
    pub rest: usize,
}

impl ActivationFloats {
    pub fn new(cfg: &ModelConfig, seq: usize, mode: Recompute) -> ActivationFloats {
        ActivationFloats::on_shard(cfg, seq, mode, BlockShape::whole(cfg), cfg.padded_vocab_size())
    }

    /// The same on a tensor-parallel rank: blocks of `shape` (W = its heads' width, M its MLP
    /// width, H its heads) and `columns` of the logits. The residual stream (C wide) is whole
    /// on every rank.
    pub fn on_shard(
        cfg: &ModelConfig,
        seq: usize,
        mode: Recompute,
        shape: BlockShape,
        columns: usize,
    ) -> ActivationFloats {
        let (c, w, m, h) = (cfg.n_embd, shape.attn_width(), shape.mlp_hidden, shape.n_head);
        // ln_1, res_2, ln_2, out (4C); qkv (3W); att_y (W); fc, fc_gelu (2M); 4 statistics.
        // A whole block (W = C, M = 4C): 16C + 4.
        let without_attention = 4 * c + 4 * w + 2 * m + 4;
        let attention = h * seq; // one row of B·H·T·T per token
        let (per_block, recompute) = match mode {
            Recompute::None => (without_attention + attention, 0),
            Recompute::Selective => (without_attention, attention),
            Recompute::Full => (c, without_attention + attention),
        };
        let head = c + 2 + columns + 1;
        ActivationFloats { per_block, blocks: cfg.n_layer, recompute, rest: c + head }
    }

    pub fn total(&self) -> usize {
        self.per_block * self.blocks + self.recompute + self.rest
    }
}
// ANCHOR_END: activation_formula

/// What forward keeps, by mode (see the module's comment).
pub struct SavedActivations {
    pub mode: Recompute,
    /// `full`: each block's input, then the head's (L + 1). Otherwise only the first block's
    /// (the embeddings' output): block l's input is block l-1's `out`.
    pub inputs: Vec<Tensor>,
    /// `none`, `selective` (without `att`): one per block. `full`: one, reused by every block.
    pub blocks: Vec<BlockActivations>,
    /// `selective`: the attention matrices of whichever block is being computed.
    pub att: Option<Tensor>,
    pub head: HeadActivations,
}

impl SavedActivations {
    pub fn new(
        cfg: &ModelConfig,
        mode: Recompute,
        batch: usize,
        seq: usize,
        ledger: &MemoryLedger,
    ) -> Result<SavedActivations, TensorError> {
        SavedActivations::on_shard(cfg, mode, (BlockShape::whole(cfg), cfg.padded_vocab_size()), batch, seq, ledger)
    }

    /// The same on a tensor-parallel rank: blocks of `shape`, `columns` of the logits.
    pub fn on_shard(
        cfg: &ModelConfig,
        mode: Recompute,
        (shape, columns): (BlockShape, usize),
        batch: usize,
        seq: usize,
        ledger: &MemoryLedger,
    ) -> Result<SavedActivations, TensorError> {
        let (device, dtype) = (Device::Cpu, DType::F32);
        let input = || Tensor::zeros_on(&[batch * seq, cfg.n_embd], device, dtype, Category::Activations, ledger);
        let n_inputs = if mode == Recompute::Full { cfg.n_layer + 1 } else { 1 };
        let inputs = (0..n_inputs).map(|_| input()).collect::<Result<_, _>>()?;
        let kept = match mode {
            Recompute::None | Recompute::Selective => cfg.n_layer,
            Recompute::Full => 1,
        };
        let blocks = (0..kept)
            .map(|_| match mode {
                Recompute::Selective => BlockActivations::without_attention(shape, batch, seq, device, dtype, ledger),
                _ => BlockActivations::new(shape, batch, seq, device, dtype, ledger),
            })
            .collect::<Result<_, _>>()?;
        let att = match mode {
            Recompute::Selective => {
                Some(Tensor::zeros_on(&[batch, shape.n_head, seq, seq], device, dtype, Category::Activations, ledger)?)
            }
            _ => None,
        };
        let head = HeadActivations::with_columns(cfg, columns, batch, seq, device, dtype, ledger)?;
        Ok(SavedActivations { mode, inputs, blocks, att, head })
    }

    /// Where the embeddings write the first block's input.
    pub fn first_input(&mut self) -> ViewMut<'_> {
        self.inputs[0].view_mut()
    }

    /// Block l's input.
    pub fn input(&self, l: usize) -> View<'_> {
        match self.mode {
            Recompute::Full => self.inputs[l].view(),
            _ if l == 0 => self.inputs[0].view(),
            _ => self.blocks[l - 1].out.view(),
        }
    }

    /// The head's input and its buffers, at once (the head reads one and writes the other).
    pub fn head_parts(&mut self) -> (View<'_>, &mut HeadActivations) {
        let SavedActivations { mode, inputs, blocks, head, .. } = self;
        let x = match mode {
            Recompute::Full => inputs[inputs.len() - 1].view(),
            _ => blocks.last().map_or(inputs[0].view(), |b| b.out.view()),
        };
        (x, head)
    }

    /// The head's input: the last block's output.
    pub fn head_input(&self) -> View<'_> {
        match self.mode {
            Recompute::Full => self.inputs[self.inputs.len() - 1].view(),
            _ => self.blocks.last().map_or(self.inputs[0].view(), |b| b.out.view()),
        }
    }
}

// ANCHOR: block_forward
/// Block l's forward, keeping what the mode keeps. `full` runs it in the shared buffers and
/// keeps only the output (the next block's input); `selective` lends the block the shared
/// attention buffer, and takes it back.
pub fn block_forward(
    p: &BlockParams<View<'_>>,
    acts: &mut SavedActivations,
    l: usize,
    proj: ViewMut<'_>,
    d: Dims,
    comm: &mut dyn BlockComm,
) -> Result<(), CommError> {
    let SavedActivations { mode, inputs, blocks, att, .. } = acts;
    match mode {
        Recompute::Full => {
            let (done, next) = inputs.split_at_mut(l + 1);
            p.forward(done[l].view(), &mut blocks[0], proj, d, comm)?;
            copy(next[0].view_mut(), blocks[0].out.view());
        }
        Recompute::None | Recompute::Selective => {
            let (done, todo) = blocks.split_at_mut(l);
            let x = done.last().map_or(inputs[0].view(), |prev| prev.out.view());
            let lent = att.as_mut().map(|shared| std::mem::swap(shared, &mut todo[0].att)).is_some();
            let result = p.forward(x, &mut todo[0], proj, d, comm);
            if lent && let Some(shared) = att.as_mut() {
                std::mem::swap(shared, &mut todo[0].att);
            }
            result?;
        }
    }
    Ok(())
}
// ANCHOR_END: block_forward

// ANCHOR: recompute
/// What backward needs of block l that forward did not keep, recomputed: nothing (`none`);
/// the attention matrices, from the saved q, k, v, into the shared buffer, lent to the block
/// until its backward (`selective`); the whole block's forward from its saved input, into the
/// shared buffers (`full`).
pub fn recompute(
    p: &BlockParams<View<'_>>,
    acts: &mut SavedActivations,
    l: usize,
    proj: ViewMut<'_>,
    d: Dims,
    comm: &mut dyn BlockComm,
) -> Result<(), CommError> {
    let SavedActivations { mode, inputs, blocks, att, .. } = acts;
    match mode {
        Recompute::None => Ok(()),
        Recompute::Selective => {
            let Some(shared) = att.as_mut() else { unreachable!("selective recomputation has its buffer") };
            let acts = &mut blocks[l];
            std::mem::swap(shared, &mut acts.att);
            // softmax(QKᵀ) again (and att_y again, to the same bits).
            let (w, h) = (d.shape.attn_width(), d.shape.n_head);
            attention_forward(acts.att_y.view_mut(), acts.att.view_mut(), acts.qkv.view(), d.t, w, h);
            Ok(())
        }
        Recompute::Full => p.forward(inputs[l].view(), &mut blocks[0], proj, d, comm),
    }
}
// ANCHOR_END: recompute

// ANCHOR: block_backward
/// Block l's backward (after [`recompute`]), from dL/d(out) in `scratch.d_res[from]` to
/// dL/d(input) in the other one, accumulating into `grads`. `selective` takes the attention
/// buffer back from the block.
pub fn block_backward(
    p: &BlockParams<View<'_>>,
    grads: &mut BlockParams<ViewMut<'_>>,
    acts: &mut SavedActivations,
    l: usize,
    scratch: &mut BackwardScratch,
    from: usize,
    d: Dims,
    comm: &mut dyn BlockComm,
) -> Result<(), CommError> {
    let SavedActivations { mode, inputs, blocks, att, .. } = acts;
    let BackwardScratch { d_res, block: g } = scratch;
    let [first, second] = d_res;
    let (d_out, d_x) = if from == 0 { (first, second) } else { (second, first) };
    if *mode == Recompute::Full {
        return p.backward(grads, d_out.view(), inputs[l].view(), &blocks[0], g, d_x.view_mut(), d, comm);
    }
    let (done, todo) = blocks.split_at_mut(l);
    let x = done.last().map_or(inputs[0].view(), |prev| prev.out.view());
    let result = p.backward(grads, d_out.view(), x, &todo[0], g, d_x.view_mut(), d, comm);
    if let Some(shared) = att.as_mut() {
        std::mem::swap(shared, &mut todo[0].att);
    }
    result
}
// ANCHOR_END: block_backward
