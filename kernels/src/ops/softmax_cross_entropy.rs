//! Fused softmax + cross-entropy over the vocabulary.
//!
//! Fused because the logits are the largest activation of a small model (B·T·Vp floats; 51 MB
//! for GPT-2 at B=4, T=64): forward turns them into probabilities in place, backward turns the
//! probabilities into dlogits in place, and no second buffer of that size ever exists.

use super::math::{self, exp};
use rayon::prelude::*;

// ANCHOR: softmax_cross_entropy_forward
/// logits [N, Vp] (overwritten with probs), targets [N] -> losses [N]. Only the first V columns
/// are real tokens; the padding columns get probability 0.
///
///   probs_i = exp(z_i - max z) / sum_j exp(z_j - max z)
///   loss    = -ln probs_target = ln sum_j exp(z_j - max z) - (z_target - max z)
pub fn softmax_cross_entropy_forward(
    logits_to_probs: &mut [f32],
    losses: &mut [f32],
    targets: &[u32],
    v: usize,
    vp: usize,
) {
    logits_to_probs.par_chunks_mut(vp).zip(losses.par_iter_mut()).zip(targets.par_iter()).for_each(
        |((row, loss), &target)| {
            let max = math::max(&row[..v]);
            let target_logit = row[target as usize] - max;
            for z in &mut row[..v] {
                *z = exp(*z - max);
            }
            let sum = math::sum(&row[..v]);
            let inv = 1.0 / sum;
            for p in &mut row[..v] {
                *p *= inv;
            }
            row[v..].fill(0.0);
            *loss = sum.ln() - target_logit;
        },
    );
}
// ANCHOR_END: softmax_cross_entropy_forward

// ANCHOR: softmax_cross_entropy_backward
/// probs [N, Vp] (overwritten with dlogits). For a loss L = sum_n dloss[n] * loss_n:
///
///   dlogits_i = dloss[n] * (probs_i - [i == target])
///
/// `dloss` is 1 / (number of tokens averaged over) for a mean loss.
pub fn softmax_cross_entropy_backward(probs_to_dlogits: &mut [f32], targets: &[u32], dloss: f32, vp: usize) {
    probs_to_dlogits.par_chunks_mut(vp).zip(targets.par_iter()).for_each(|(row, &target)| {
        row[target as usize] -= 1.0;
        for d in row.iter_mut() {
            *d *= dloss;
        }
    });
}
// ANCHOR_END: softmax_cross_entropy_backward

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::finite_difference::{check_gradient, random};

    #[test]
    fn forward_matches_hand_computed() {
        // Uniform logits over V = 4 real tokens: loss = ln 4; padding column stays 0.
        let mut logits = vec![2.0, 2.0, 2.0, 2.0, 99.0];
        let mut loss = [0.0];
        softmax_cross_entropy_forward(&mut logits, &mut loss, &[1], 4, 5);
        assert!((loss[0] - 4f32.ln()).abs() < 1e-6);
        assert_eq!(logits, vec![0.25, 0.25, 0.25, 0.25, 0.0]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, v, vp) = (3, 6, 8);
        let targets = [0u32, 5, 2];
        let logits = random(n * vp, 1);
        let dlosses = random(n, 2);
        // The op takes one dloss for all rows; check each row with its own scale.
        let mut dlogits = vec![0.0; n * vp];
        for r in 0..n {
            let mut probs = logits[r * vp..(r + 1) * vp].to_vec();
            softmax_cross_entropy_forward(&mut probs, &mut [0.0], &targets[r..r + 1], v, vp);
            softmax_cross_entropy_backward(&mut probs, &targets[r..r + 1], dlosses[r], vp);
            dlogits[r * vp..(r + 1) * vp].copy_from_slice(&probs);
        }
        check_gradient(&logits, &dlogits, &dlosses, |z| {
            let mut probs = z.to_vec();
            let mut losses = vec![0.0; n];
            softmax_cross_entropy_forward(&mut probs, &mut losses, &targets, v, vp);
            losses
        });
        assert!(dlogits[v..vp].iter().all(|&d| d == 0.0), "padding gets no gradient");
    }
}
