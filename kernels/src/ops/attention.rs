//! Causal multi-head self-attention (the part between the QKV projection and the output
//! projection; both projections are linear layers).
//!
//! Shapes: qkv [B, T, 3C] holds q, k, v side by side; head h of q is channels
//! [h*hs, (h+1)*hs) with hs = C/H, of k the same range shifted by C, of v by 2C.
//! Work is split over batch rows b: each owns a contiguous block of every buffer.

use super::math::{axpy, dot, exp};
use rayon::prelude::*;

// ANCHOR: attention_forward
/// qkv [B, T, 3C] -> out [B, T, C]; saves the attention probabilities att [B, H, T, T]
/// (zero above the diagonal).
///
///   s[t, u]  = q_t . k_u / sqrt(hs)             for u <= t (causal: t sees only the past)
///   att[t,u] = exp(s[t,u] - max_u s) / sum_u' exp(s[t,u'] - max_u s)
///   out_t    = sum_u att[t, u] v_u
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], t_len: usize, c: usize, n_head: usize) {
    let hs = c / n_head;
    let scale = 1.0 / (hs as f32).sqrt();
    out.par_chunks_mut(t_len * c)
        .zip(att.par_chunks_mut(n_head * t_len * t_len))
        .zip(qkv.par_chunks(t_len * 3 * c))
        .for_each(|((out, att), qkv)| {
            for h in 0..n_head {
                for t in 0..t_len {
                    let q = &qkv[t * 3 * c + h * hs..][..hs];
                    let row = &mut att[(h * t_len + t) * t_len..][..t_len];
                    let mut max = f32::NEG_INFINITY;
                    for u in 0..=t {
                        let k = &qkv[u * 3 * c + c + h * hs..][..hs];
                        row[u] = dot(q, k) * scale;
                        max = max.max(row[u]);
                    }
                    let mut sum = 0.0;
                    for p in &mut row[..=t] {
                        *p = exp(*p - max);
                        sum += *p;
                    }
                    let inv = 1.0 / sum;
                    for p in &mut row[..=t] {
                        *p *= inv;
                    }
                    row[t + 1..].fill(0.0);
                    let o = &mut out[t * c + h * hs..][..hs];
                    o.fill(0.0);
                    for u in 0..=t {
                        axpy(row[u], &qkv[u * 3 * c + 2 * c + h * hs..][..hs], o);
                    }
                }
            }
        });
}
// ANCHOR_END: attention_forward

// ANCHOR: attention_backward
/// Backward of [`attention_forward`], accumulating into dqkv [B, T, 3C]. For each query t:
///
///   datt[u]  = dout_t . v_u                  dv_u += att[t,u] dout_t
///   ds[u]    = att[t,u] (datt[u] - sum_u' att[t,u'] datt[u'])      (softmax backward)
///   dq_t    += sum_u ds[u] k_u / sqrt(hs)    dk_u += ds[u] q_t / sqrt(hs)
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    t_len: usize,
    c: usize,
    n_head: usize,
) {
    // EXERCISE(ch01-attention-backward, points = 10): for each batch row, head and query t: datt and dv from dout, the softmax backward ds, then dq and dk (both scaled by 1/sqrt(hs))
    // TESTS: -p kernels --lib -- ops::attention::tests::backward_matches_finite_differences
    let hs = c / n_head;
    let scale = 1.0 / (hs as f32).sqrt();
    dqkv.par_chunks_mut(t_len * 3 * c)
        .zip(dout.par_chunks(t_len * c))
        .zip(qkv.par_chunks(t_len * 3 * c))
        .zip(att.par_chunks(n_head * t_len * t_len))
        .for_each(|(((dqkv, dout), qkv), att)| {
            let mut datt = vec![0.0f32; t_len];
            let mut dq = vec![0.0f32; hs];
            for h in 0..n_head {
                for t in 0..t_len {
                    let row = &att[(h * t_len + t) * t_len..][..t_len];
                    let dy = &dout[t * c + h * hs..][..hs];
                    for u in 0..=t {
                        datt[u] = dot(dy, &qkv[u * 3 * c + 2 * c + h * hs..][..hs]);
                        axpy(row[u], dy, &mut dqkv[u * 3 * c + 2 * c + h * hs..][..hs]);
                    }
                    let weighted: f32 = (0..=t).map(|u| row[u] * datt[u]).sum();
                    let q = &qkv[t * 3 * c + h * hs..][..hs];
                    dq.fill(0.0);
                    for u in 0..=t {
                        let ds = row[u] * (datt[u] - weighted) * scale;
                        // WRONG(softmax backward as if elementwise): `(datt[u] - weighted)` -> `datt[u]`
                        axpy(ds, &qkv[u * 3 * c + c + h * hs..][..hs], &mut dq);
                        axpy(ds, q, &mut dqkv[u * 3 * c + c + h * hs..][..hs]);
                    }
                    axpy(1.0, &dq, &mut dqkv[t * 3 * c + h * hs..][..hs]);
                }
            }
        });
    // END EXERCISE
}
// ANCHOR_END: attention_backward

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::finite_difference::{check_named_gradient, random};

    fn forward(qkv: &[f32], b: usize, t: usize, c: usize, h: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * h * t * t]);
        attention_forward(&mut out, &mut att, qkv, t, c, h);
        (out, att)
    }

    #[test]
    fn forward_is_causal_and_hand_checkable() {
        // One head, C = 1: q = k = 1 everywhere, so every visible position gets equal weight and
        // out_t is the mean of v_0..v_t.
        let qkv = [1., 1., 10., 1., 1., 20., 1., 1., 60.];
        let (out, att) = forward(&qkv, 1, 3, 1, 1);
        assert_eq!(out, vec![10., 15., 30.]);
        assert_eq!(&att[..3], &[1., 0., 0.]);
        assert!((att[3] - 0.5).abs() < 1e-7 && att[5] == 0.0);
    }

    #[test]
    fn future_tokens_do_not_change_the_past() {
        let (b, t, c, h) = (1, 5, 8, 2);
        let mut qkv = random(b * t * 3 * c, 1);
        let (before, _) = forward(&qkv, b, t, c, h);
        for x in &mut qkv[(t - 1) * 3 * c..] {
            *x += 1.0;
        }
        let (after, _) = forward(&qkv, b, t, c, h);
        assert_eq!(before[..(t - 1) * c], after[..(t - 1) * c]);
        assert_ne!(before[(t - 1) * c..], after[(t - 1) * c..]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (b, t, c, h) = (2, 4, 8, 2);
        let qkv = random(b * t * 3 * c, 1);
        let dout = random(b * t * c, 2);
        let (_, att) = forward(&qkv, b, t, c, h);
        let mut dqkv = vec![0.0; qkv.len()];
        attention_backward(&mut dqkv, &dout, &qkv, &att, t, c, h);
        check_named_gradient("dqkv", &qkv, &dqkv, &dout, |x| forward(x, b, t, c, h).0);
    }
}
