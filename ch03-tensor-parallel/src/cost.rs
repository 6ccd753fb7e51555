//! What tensor parallelism costs, as formulas: the bytes a rank sends per step, and the
//! activations it saves per token. The tests hold the run to them exactly (`tests/ch03.rs`), and
//! the book derives them.

use crate::tensor_parallel::TpReport;
use crate::tp_comm::Stream;
use ch01_single_gpu::config::ModelConfig;

// ANCHOR: bytes_formula
/// The floats one rank puts into each kind of collective: the buffer of an all-reduce or a
/// reduce-scatter (whole), its own part of an all-gather.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CollectiveFloats {
    pub all_reduced: usize,
    pub all_gathered: usize,
    pub reduce_scattered: usize,
}

/// A forward pass over `bt` tokens on `n` ranks. The stream's sums: the embedding's (BT·C) and
/// two per block (2L·BT·C), all-reduces, or with the stream split by tokens reduce-scatters,
/// and then the inputs of the column-parallel layers (two per block, and the head's) are
/// all-gathered, BT·C/n from each rank. The cross-entropy's sums of exponentials and target
/// logits (2·BT, all-reduced) and row maxima (BT, gathered).
pub fn forward_collectives(model: &ModelConfig, bt: usize, n: usize, stream: Stream) -> CollectiveFloats {
    let (l, c) = (model.n_layer, model.n_embd);
    let sums = (2 * l + 1) * bt * c;
    match stream {
        Stream::Replicated => CollectiveFloats { all_reduced: sums + 2 * bt, all_gathered: bt, reduce_scattered: 0 },
        Stream::SplitByTokens => {
            CollectiveFloats { all_reduced: 2 * bt, all_gathered: sums / n + bt, reduce_scattered: sums }
        }
    }
}

/// Its backward: the input-gradient sums, two per block and the head's ((2L + 1)·BT·C:
/// all-reduces, or reduce-scatters), and with the stream split the conjugates of the forward
/// reduce-scatters: the output gradients of the row-parallel layers (two per block) and the
/// embedding's, all-gathered.
pub fn backward_collectives(model: &ModelConfig, bt: usize, n: usize, stream: Stream) -> CollectiveFloats {
    let (l, c) = (model.n_layer, model.n_embd);
    let sums = (2 * l + 1) * bt * c;
    match stream {
        Stream::Replicated => CollectiveFloats { all_reduced: sums, all_gathered: 0, reduce_scattered: 0 },
        Stream::SplitByTokens => CollectiveFloats { all_reduced: 0, all_gathered: sums / n, reduce_scattered: sums },
    }
}

/// Once per step with the stream split: the LayerNorms' gradients (a weight and a bias of C
/// for each of the 2L + 1), all-reduced.
pub fn step_collectives(model: &ModelConfig, stream: Stream) -> CollectiveFloats {
    let norms = 2 * (2 * model.n_layer + 1) * model.n_embd;
    let all_reduced = if stream == Stream::SplitByTokens { norms } else { 0 };
    CollectiveFloats { all_reduced, all_gathered: 0, reduce_scattered: 0 }
}

/// Elements one rank sends, by collective: for numbers of any size (the planner prices bf16
/// ones); [`ring_bytes_sent`] for this chapter's f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingElements {
    pub all_reduce: usize,
    pub all_gather: usize,
    pub reduce_scatter: usize,
}

impl RingElements {
    pub fn total(&self) -> usize {
        self.all_reduce + self.all_gather + self.reduce_scatter
    }
}

/// What a rank sends for them on a ring of `n`: a reduce-scatter of N elements sends
/// (n-1)/n·N of them, an all-reduce twice that (a reduce-scatter and an all-gather of
/// N/n-element chunks), an all-gather of N elements per rank (n-1)·N.
pub fn ring_elements_sent(f: CollectiveFloats, n: usize) -> RingElements {
    RingElements {
        all_reduce: 2 * (n - 1) * f.all_reduced / n,
        all_gather: (n - 1) * f.all_gathered,
        reduce_scatter: (n - 1) * f.reduce_scattered / n,
    }
}

/// Bytes one rank sends, by collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingBytes {
    pub all_reduce: u64,
    pub all_gather: u64,
    pub reduce_scatter: u64,
}

impl RingBytes {
    pub fn total(&self) -> u64 {
        self.all_reduce + self.all_gather + self.reduce_scatter
    }
}

/// The same in bytes of f32.
pub fn ring_bytes_sent(f: CollectiveFloats, n: usize) -> RingBytes {
    let e = ring_elements_sent(f, n);
    RingBytes {
        all_reduce: 4 * e.all_reduce as u64,
        all_gather: 4 * e.all_gather as u64,
        reduce_scatter: 4 * e.reduce_scatter as u64,
    }
}

impl TpReport {
    /// How the residual stream lay on the group in this run.
    pub fn stream(&self) -> Stream {
        if self.sequence_parallel { Stream::SplitByTokens } else { Stream::Replicated }
    }

    /// The bytes every rank sends per training step by the formulas above: forward and backward
    /// of each micro-batch, the LayerNorms' gradients (with the stream split), and the gradient
    /// norm (an f64 as three f32s, all-gathered).
    pub fn bytes_sent_per_step(&self) -> u64 {
        let (model, n, bt, stream) = (&self.report.model, self.tp, self.tokens, self.stream());
        let fwd = ring_bytes_sent(forward_collectives(model, bt, n, stream), n);
        let bwd = ring_bytes_sent(backward_collectives(model, bt, n, stream), n);
        let step = ring_bytes_sent(step_collectives(model, stream), n);
        let norm = 4 * 3 * (n as u64 - 1);
        self.grad_accum as u64 * (fwd.total() + bwd.total()) + step.total() + norm
    }
}
// ANCHOR_END: bytes_formula

// ANCHOR: activation_formula
/// Floats of activations one rank saves per token (per row of B·T), at sequence length `seq`,
/// by the formula the book derives; the ledger must agree. Per block, what is computed from the
/// replicated residual stream is replicated (the two LayerNorms' outputs and statistics, the
/// stream after each branch: 4C + 4), and what a rank's heads and units compute is split
/// (q, k, v and the attention output: 4C; the MLP's 4C before and after GELU: 8C; the
/// attention matrix: H·T):
///
///   per block: 4C + 4 + (12C + H·T)/t      whole model: + C (embedded) + C + 2 + Vp/t + 1 (head)
pub fn activation_floats_per_token(model: &ModelConfig, seq: usize, tp: usize) -> usize {
    let (c, h, l, vp) = (model.n_embd, model.n_head, model.n_layer, model.padded_vocab_size());
    let per_block = 4 * c + 4 + (12 * c + h * seq) / tp;
    c + l * per_block + c + 2 + vp / tp + 1
}
// ANCHOR_END: activation_formula

// ANCHOR: sequence_parallel_activations
/// The same with the stream split by tokens, for `bt` tokens on `tp` ranks (a total, not per
/// token: the split parts are whole rows, bt/t of them). What holds the stream gets 1/t of the
/// rows: the stream after each branch and the LayerNorms' statistics (2C + 4 per block). The
/// LayerNorms' outputs stay whole (2C per block): they are the all-gathered inputs of c_attn
/// and c_fc, which backward needs for the weight gradients. So per token:
///
///   per block: 2C + (2C + 4 + 12C + H·T)/t    whole model: + C (the embedding's lookups)
///                                              + C + 2/t + Vp/t + 1 (head: ln_f gathered)
pub fn sequence_parallel_activation_floats(model: &ModelConfig, bt: usize, seq: usize, tp: usize) -> usize {
    let (c, h, l, vp) = (model.n_embd, model.n_head, model.n_layer, model.padded_vocab_size());
    let s = bt / tp; // the tokens of the stream on this rank
    let per_block = 2 * c * bt + (2 * c + 4) * s + (12 * c + h * seq) * s;
    c * bt + l * per_block + c * bt + 2 * s + vp / tp * bt + bt
}
// ANCHOR_END: sequence_parallel_activations
