//! The vocabulary-parallel embedding and cross-entropy: each rank holds Vp/n rows of the token
//! embedding `wte`, which is also the output projection (tied), so that neither the embedding
//! table nor the logits [B·T, Vp] ever exist whole on one rank.
//!
//! - Embedding: a rank looks up the tokens in its rows and writes zero rows for the others; the
//!   sum over the group is the full lookup (exactly: x + 0 = x), and the position embedding is
//!   added after it, once.
//! - Cross-entropy over logits split by columns (Megatron's `cross_entropy.py`): per row,
//!   loss = log Σ_v exp(z_v − m) − (z_target − m), with m the row's max. Three reductions suffice:
//!   the max of the ranks' maxima, the sum of their sums of exponentials, and the target logit,
//!   which exactly one rank holds (the others contribute 0).
//! - The tied weight's two gradients (the head's dlogitsᵀ·x and the embedding's scatter-add) land
//!   in the same rows of the same shard: rank r's rows of the head are rank r's rows of the table.

use crate::tp_comm::{Partial, Stream, SumFromShards, max_over_group};
use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::model::{Head, HeadActivations, lm_head_backward, lm_head_forward};
use kernels::comm::{CommError, Communicator};
use kernels::dispatch::{layernorm_backward, layernorm_forward, zero};
use kernels::ops::math;
use kernels::{View, ViewMut};
use std::ops::Range;

// ANCHOR: vocab_shard
/// The rows of the padded vocabulary one rank holds: ids `rows`, of which the first `real` are
/// real tokens (ids < V) and the rest padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VocabShard {
    pub rows: Range<usize>,
    pub real: usize,
}

impl VocabShard {
    /// Rank `rank`'s rows of `n`: a contiguous Vp/n of them, as `ParamLayout::shard` cuts wte.
    pub fn new(cfg: &ModelConfig, rank: usize, n: usize) -> VocabShard {
        let per_rank = cfg.padded_vocab_size() / n;
        let rows = rank * per_rank..(rank + 1) * per_rank;
        let real = cfg.vocab_size.clamp(rows.start, rows.end) - rows.start;
        VocabShard { rows, real }
    }

    /// Where token `id` sits in this rank's rows, if it is one of them.
    pub fn local(&self, id: u32) -> Option<usize> {
        let id = id as usize;
        self.rows.contains(&id).then(|| id - self.rows.start)
    }
}
// ANCHOR_END: vocab_shard

// ANCHOR: embedding
/// tokens [B, T] -> x [B, T, C] = wte[token] + wpe[position], with this rank's rows of wte
/// (wte_local [Vp/n, C]): the rank's lookups (zero rows for tokens it does not hold), summed over
/// the group, then the position embedding (replicated) added once. With the stream split by
/// tokens, the sum is a reduce-scatter, and only this rank's rows of x are the embedding.
#[allow(clippy::too_many_arguments)]
pub fn embed_forward(
    group: &mut dyn Communicator,
    stream: Stream,
    x: &mut [f32],
    tokens: &[u32],
    wte_local: &[f32],
    wpe: &[f32],
    shard: &VocabShard,
    t: usize,
    c: usize,
) -> Result<(), CommError> {
    // EXERCISE(ch03-vocab-embedding, points = 5): each row of x is this rank's row of wte for its token (shard.local), or zeros if another rank holds it; sum over the group (stream.sum of a Partial: an all-reduce, or a reduce-scatter when the stream is split by tokens); then add wpe[position] once, to the rows the sum is in (stream.rows)
    // TESTS: -p ch03-tensor-parallel --lib -- vocab_parallel::tests::a_rank_embeds_its_own_tokens_and_zeros_for_the_rest
    // NEEDS: ch03-sum-forward
    let mut lookups = Partial::new(x);
    for (row, &token) in lookups.chunks_exact_mut(c).zip(tokens) {
        match shard.local(token) {
            Some(i) => row.copy_from_slice(&wte_local[i * c..(i + 1) * c]),
            // WRONG(looks the global id up in the local rows): `&wte_local[i * c..(i + 1) * c]` -> `&wte_local[token as usize * c..(token as usize + 1) * c]`
            None => row.fill(0.0),
            // WRONG(leaves the rows of tokens it does not hold as they were): `row.fill(0.0)` -> `()`
        }
    }
    let x = stream.sum(group, lookups, false)?.into_inner();
    let rows = stream.rows(tokens.len(), group);
    for (i, row) in x.chunks_exact_mut(c).enumerate().take(rows.end).skip(rows.start) {
        let position = &wpe[(i % t) * c..(i % t + 1) * c];
        row.iter_mut().zip(position).for_each(|(o, p)| *o += p);
    }
    Ok(())
    // END EXERCISE
}

/// The lookup's gradient, a scatter-add into this rank's rows: dwte[token] += d_x for the tokens
/// it holds, and (replicated, so on every rank) dwpe[t] += d_x. d_x [B, T, C] is whole on every
/// rank (gathered first, when the stream is split by tokens). The same order as chapter 1's, so that one rank's sums are chapter 1's bit for bit.
pub fn embed_backward(
    dwte_local: &mut [f32],
    dwpe: &mut [f32],
    d_x: &[f32],
    tokens: &[u32],
    shard: &VocabShard,
    t: usize,
    c: usize,
) {
    for (i, (row, &token)) in d_x.chunks_exact(c).zip(tokens).enumerate() {
        if let Some(local) = shard.local(token) {
            dwte_local[local * c..(local + 1) * c].iter_mut().zip(row).for_each(|(g, d)| *g += d);
        }
        dwpe[(i % t) * c..(i % t + 1) * c].iter_mut().zip(row).for_each(|(g, d)| *g += d);
    }
}
// ANCHOR_END: embedding

// ANCHOR: cross_entropy
/// logits [BT, Vp/n] (this rank's columns) -> the probabilities of those columns in place, and
/// every row's loss in `losses` [BT] (the same on every rank):
///   m = max over all ranks of the row's real logits
///   s = Σ over all ranks of Σ_v exp(z_v − m)
///   loss = ln s − (z_target − m)       (z_target − m from the rank that holds the target)
pub fn cross_entropy_forward(
    group: &mut dyn Communicator,
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[u32],
    shard: &VocabShard,
) -> Result<(), CommError> {
    // EXERCISE(ch03-vocab-cross-entropy, points = 10): per row: the max m over the group (max_over_group) of the real logits; the sum over the group (SumFromShards::forward of a Partial) of exp(z - m) and of the target's z - m (one rank holds it, the others add 0); probabilities exp(z - m) / sum with zeros for padding; loss = ln sum - (z_target - m)
    // TESTS: -p ch03-tensor-parallel --lib -- vocab_parallel::tests::cross_entropy_over_shards_is_the_whole_one
    // NEEDS: ch02-ring-reduce-scatter ch02-ring-all-gather ch03-sum-forward
    let (width, real, bt) = (shard.rows.len(), shard.real, losses.len());
    let local_max: Vec<f32> = logits.chunks_exact(width).map(|row| math::max(&row[..real])).collect();
    let max = max_over_group(group, &local_max)?;
    // WRONG(each rank's own maximum, not the group's): `max_over_group(group, &local_max)?` -> `local_max.clone()`
    // [sum of exponentials | target logit − m], one all-reduce for both.
    let mut sums = vec![0.0f32; 2 * bt];
    let mut local = Partial::new(&mut sums);
    for (i, (row, &target)) in logits.chunks_exact_mut(width).zip(targets).enumerate() {
        if let Some(target_col) = shard.local(target) {
            local[bt + i] = row[target_col] - max[i];
            // WRONG(the target logit not shifted by the max): `row[target_col] - max[i]` -> `row[target_col]`
        }
        for z in &mut row[..real] {
            *z = math::exp(*z - max[i]);
        }
        row[real..].fill(0.0);
        // WRONG(padding columns keep their logits as probabilities): `row[real..].fill(0.0);` -> ``
        local[i] = math::sum(&row[..real]);
    }
    // A partial sum can only be read through a sum over the group: forgetting it does not compile.
    let sums = SumFromShards::forward(group, local)?;
    for (i, (row, loss)) in logits.chunks_exact_mut(width).zip(losses.iter_mut()).enumerate() {
        let inv = 1.0 / sums[i];
        row[..real].iter_mut().for_each(|p| *p *= inv);
        *loss = sums[i].ln() - sums[bt + i];
    }
    Ok(())
    // END EXERCISE
}

/// probs -> dlogits in place, for L = dloss · Σ losses: dL/dz_v = dloss · (p_v − [v = target]),
/// each rank for its own columns (the one-hot only where it holds the target). No communication.
pub fn cross_entropy_backward(probs: &mut [f32], targets: &[u32], dloss: f32, shard: &VocabShard) {
    for (row, &target) in probs.chunks_exact_mut(shard.rows.len()).zip(targets) {
        if let Some(local) = shard.local(target) {
            row[local] -= 1.0;
        }
        row.iter_mut().for_each(|d| *d *= dloss);
    }
}
// ANCHOR_END: cross_entropy

// ANCHOR: head
/// The head on a shard: x [BT, C] -> ln_f -> logits [BT, Vp/n] of this rank's vocabulary rows
/// (the output projection is column-parallel by vocabulary, its input replicated) -> the loss.
/// Returns the mean loss when given targets; `acts.logits` then holds this rank's probabilities.
/// With the stream split by tokens, x and ln_f's statistics are this rank's rows, and ln_f's
/// output is gathered before the projection.
#[allow(clippy::too_many_arguments)]
pub fn head_forward(
    group: &mut dyn Communicator,
    stream: Stream,
    p: &Head<View<'_>>,
    cfg: &ModelConfig,
    x: View<'_>,
    acts: &mut HeadActivations,
    targets: Option<&[u32]>,
    shard: &VocabShard,
    bt: usize,
) -> Result<Option<f32>, CommError> {
    let (c, width) = (cfg.n_embd, shard.rows.len());
    let rows = stream.rows(bt, group);
    let (mean, rstd) = (acts.ln_f_mean.prefix_mut(rows.len()), acts.ln_f_rstd.prefix_mut(rows.len()));
    let ln_f = acts.ln_f.prefix_mut(bt * c).slice_into(rows.start * c..rows.end * c);
    layernorm_forward(ln_f, mean, rstd, x, p.ln_f_weight, p.ln_f_bias, c);
    stream.gather(group, acts.ln_f.prefix_mut(bt * c).cpu())?;
    lm_head_forward(acts.logits.prefix_mut(bt * width), acts.ln_f.prefix(bt * c), p.wte, bt, c, width);
    let Some(targets) = targets else { return Ok(None) };
    let (logits, losses) = (acts.logits.prefix_mut(bt * width).cpu(), acts.losses.prefix_mut(bt).cpu());
    cross_entropy_forward(group, logits, losses, targets, shard)?;
    let losses = acts.losses.prefix(bt).cpu();
    Ok(Some((losses.iter().map(|&l| l as f64).sum::<f64>() / bt as f64) as f32))
}

/// The head's backward: dlogits of this rank's columns, its share of dwte, and the sum of the
/// ranks' shares of dL/d(ln_f) (the copy's backward) before the LayerNorm's backward writes
/// dL/dx [BT, C] into `d_x` (this rank's rows of it, when the stream is split by tokens; and
/// ln_f's gradients are then this rank's tokens' share). `d_ln` is [BT, C] scratch.
#[allow(clippy::too_many_arguments)]
pub fn head_backward(
    group: &mut dyn Communicator,
    stream: Stream,
    p: &Head<View<'_>>,
    grads: Head<ViewMut<'_>>,
    cfg: &ModelConfig,
    x: View<'_>,
    acts: &mut HeadActivations,
    mut d_ln: ViewMut<'_>,
    mut d_x: ViewMut<'_>,
    targets: &[u32],
    dloss: f32,
    shard: &VocabShard,
    bt: usize,
) -> Result<(), CommError> {
    let (c, width) = (cfg.n_embd, shard.rows.len());
    cross_entropy_backward(acts.logits.prefix_mut(bt * width).cpu(), targets, dloss, shard);
    let (dlogits, ln_f) = (acts.logits.prefix(bt * width), acts.ln_f.prefix(bt * c));
    lm_head_backward(d_ln.reborrow(), grads.wte, dlogits, ln_f, p.wte, bt, c, width);
    stream.sum(group, Partial::new(d_ln.reborrow().cpu()), true)?;
    zero(d_x.reborrow());
    let rows = stream.rows(bt, group);
    let (mean, rstd) = (acts.ln_f_mean.prefix(rows.len()), acts.ln_f_rstd.prefix(rows.len()));
    let d_ln = d_ln.as_view().slice(rows.start * c..rows.end * c);
    layernorm_backward(d_x, grads.ln_f_weight, grads.ln_f_bias, d_ln, x, p.ln_f_weight, mean, rstd, c);
    Ok(())
}
// ANCHOR_END: head

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::Rng;
    use kernels::comm::thread::launch;
    use kernels::ops::softmax_cross_entropy as whole;

    #[test]
    fn cross_entropy_over_shards_is_the_whole_one() {
        // 200 real tokens padded to 256: with 4 ranks, the last holds 8 real rows and 56 padding.
        let cfg = ModelConfig { n_layer: 1, n_head: 1, n_embd: 8, block_size: 8, vocab_size: 200 };
        let (bt, vp, v) = (6, cfg.padded_vocab_size(), cfg.vocab_size);
        let mut rng = Rng::new(4);
        let logits: Vec<f32> = (0..bt * vp).map(|_| 3.0 * rng.normal() as f32).collect();
        let targets: Vec<u32> = vec![0, 5, 63, 64, 150, 199];
        let (mut probs, mut losses) = (logits.clone(), vec![0.0; bt]);
        whole::softmax_cross_entropy_forward(&mut probs, &mut losses, &targets, v, vp);
        whole::softmax_cross_entropy_backward(&mut probs, &targets, 0.5, vp);
        let (logits, targets) = (std::sync::Arc::new(logits), std::sync::Arc::new(targets));
        for n in [1, 2, 4] {
            let (logits, targets, cfg) = (logits.clone(), targets.clone(), cfg.clone());
            let out = launch(n, move |mut comm| {
                let shard = VocabShard::new(&cfg, comm.rank(), n);
                let cols = shard.rows.clone();
                let mut mine: Vec<f32> = logits.chunks_exact(vp).flat_map(|row| row[cols.clone()].to_vec()).collect();
                let mut my_losses = vec![0.0; bt];
                cross_entropy_forward(&mut comm, &mut mine, &mut my_losses, &targets, &shard)?;
                cross_entropy_backward(&mut mine, &targets, 0.5, &shard);
                Ok::<_, CommError>((cols, mine, my_losses))
            })
            .unwrap();
            for (cols, dlogits, my_losses) in out {
                for (a, b) in my_losses.iter().zip(&losses) {
                    assert!((a - b).abs() <= 1e-6 * b.abs(), "tp {n}: loss {a} vs {b}");
                }
                for (i, row) in dlogits.chunks_exact(cols.len()).enumerate() {
                    for (j, d) in row.iter().enumerate() {
                        let expected = probs[i * vp + cols.start + j];
                        assert!((d - expected).abs() <= 1e-6, "tp {n}: dlogits[{i}, {}]", cols.start + j);
                        if cols.start + j >= v {
                            assert_eq!(*d, 0.0, "padding gets no gradient");
                        }
                    }
                }
            }
        }
    }

    /// One rank's share of the lookup, in a group of one (whose sum changes nothing): its own
    /// rows for the tokens it holds, zeros for the others, whatever x held before, and the
    /// position embedding once on every row. Summing the four ranks' shares gives the whole
    /// lookup.
    #[test]
    fn a_rank_embeds_its_own_tokens_and_zeros_for_the_rest() {
        let cfg = ModelConfig { n_layer: 1, n_head: 1, n_embd: 3, block_size: 4, vocab_size: 200 };
        let (c, t, vp) = (cfg.n_embd, 4, cfg.padded_vocab_size());
        let wte: Vec<f32> = (0..vp * c).map(|i| 1.0 + i as f32).collect();
        let wpe: Vec<f32> = (0..t * c).map(|i| 0.25 * i as f32).collect();
        let tokens: Vec<u32> = vec![0, 64, 130, 199, 191, 128, 5, 150];
        let data = std::sync::Arc::new((wte, wpe, tokens));
        let shares = launch(1, {
            let data = data.clone();
            move |mut comm| {
                let (wte, wpe, tokens) = &*data;
                let mut shares = Vec::new();
                for rank in 0..4 {
                    let shard = VocabShard::new(&cfg, rank, 4);
                    let wte_local = &wte[shard.rows.start * c..shard.rows.end * c];
                    let mut x = vec![f32::NAN; tokens.len() * c]; // stale contents must not survive
                    embed_forward(&mut comm, Stream::Replicated, &mut x, tokens, wte_local, wpe, &shard, t, c)?;
                    shares.push((shard, x));
                }
                Ok::<_, CommError>(shares)
            }
        })
        .unwrap();
        let (wte, wpe, tokens) = &*data;
        for (i, &token) in tokens.iter().enumerate() {
            for j in 0..c {
                let position = wpe[(i % t) * c + j];
                for (shard, x) in &shares[0] {
                    let own = if shard.rows.contains(&(token as usize)) { wte[token as usize * c + j] } else { 0.0 };
                    let rank = shard.rows.start / shard.rows.len();
                    assert_eq!(x[i * c + j], own + position, "rank {rank} of 4, token {token} (row {i}), column {j}");
                }
                let sum = shares[0].iter().map(|(_, x)| x[i * c + j] - position).sum::<f32>() + position;
                assert_eq!(sum, wte[token as usize * c + j] + position, "token {token}, column {j}");
            }
        }
    }

    #[test]
    fn a_token_is_looked_up_by_exactly_one_rank() {
        let cfg = ModelConfig { n_layer: 1, n_head: 1, n_embd: 2, block_size: 4, vocab_size: 200 };
        let shards: Vec<VocabShard> = (0..4).map(|r| VocabShard::new(&cfg, r, 4)).collect();
        assert_eq!(shards[3], VocabShard { rows: 192..256, real: 8 });
        for id in [0u32, 63, 64, 199, 255] {
            assert_eq!(shards.iter().filter(|s| s.local(id).is_some()).count(), 1, "token {id}");
        }
    }
}
