//! What tensor parallelism costs, as formulas: the bytes a rank sends per step, and the
//! activations it saves per token. The tests hold the run to them exactly (`tests/ch03.rs`), and
//! the book derives them.

use crate::tensor_parallel::TpReport;
use ch01_single_gpu::config::ModelConfig;

// ANCHOR: bytes_formula
/// The floats one rank puts into each kind of collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CollectiveFloats {
    pub all_reduced: usize,
    pub all_gathered: usize,
}

/// A forward pass over `bt` tokens: the embedding's sum (BT·C), two sums per block (2L·BT·C),
/// and the cross-entropy's sums of exponentials and target logits (2·BT) and row maxima (BT,
/// gathered).
pub fn forward_collectives(model: &ModelConfig, bt: usize) -> CollectiveFloats {
    let (l, c) = (model.n_layer, model.n_embd);
    CollectiveFloats { all_reduced: (2 * l + 1) * bt * c + 2 * bt, all_gathered: bt }
}

/// Its backward: the head's input gradient (BT·C) and two input-gradient sums per block.
pub fn backward_collectives(model: &ModelConfig, bt: usize) -> CollectiveFloats {
    let (l, c) = (model.n_layer, model.n_embd);
    CollectiveFloats { all_reduced: (2 * l + 1) * bt * c, all_gathered: 0 }
}

/// The bytes a rank sends for them on a ring of `n`: an all-reduce of N floats sends
/// 2(n-1)/n·N of them (a reduce-scatter and an all-gather of N/n-float chunks), an all-gather
/// of N floats per rank sends (n-1)·N.
pub fn ring_bytes_sent(f: CollectiveFloats, n: usize) -> (u64, u64) {
    let (all_reduce, all_gather) = ring_elements_sent(f, n);
    (4 * all_reduce as u64, 4 * all_gather as u64)
}

/// The same in elements, for numbers of any size (the planner prices bf16 ones).
pub fn ring_elements_sent(f: CollectiveFloats, n: usize) -> (usize, usize) {
    (2 * (n - 1) * f.all_reduced / n, (n - 1) * f.all_gathered)
}

impl TpReport {
    /// The bytes every rank sends per training step by the formulas above: forward and backward
    /// of each micro-batch, and the gradient norm (an f64 as three f32s, all-gathered).
    pub fn bytes_sent_per_step(&self) -> u64 {
        let (model, n, bt) = (&self.report.model, self.tp, self.tokens);
        let (fwd, bwd) =
            (ring_bytes_sent(forward_collectives(model, bt), n), ring_bytes_sent(backward_collectives(model, bt), n));
        let norm = 4 * 3 * (n as u64 - 1);
        self.grad_accum as u64 * (fwd.0 + fwd.1 + bwd.0 + bwd.1) + norm
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
