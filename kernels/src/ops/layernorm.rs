//! Layer normalisation over the last dimension.

use super::math::sum;
use super::{ROWS_PER_TASK, reduce_rows};
use rayon::prelude::*;

/// GPT-2's epsilon.
pub const EPS: f32 = 1e-5;

// ANCHOR: layernorm_forward
/// inp [N, C], weight [C], bias [C] -> out [N, C]; saves mean [N] and rstd [N] for backward.
///
///   mean = (1/C) sum_c x_c        var = (1/C) sum_c (x_c - mean)^2      rstd = 1/sqrt(var + eps)
///   out_c = (x_c - mean) * rstd * weight_c + bias_c
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    c: usize,
) {
    out.par_chunks_mut(c)
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((out, x), (mean, rstd))| {
            let m = sum(x) / c as f32;
            let var = x.iter().map(|xi| (xi - m) * (xi - m)).fold(0.0, |acc, d| acc + d) / c as f32;
            let s = 1.0 / (var + EPS).sqrt();
            for i in 0..c {
                out[i] = (x[i] - m) * s * weight[i] + bias[i];
            }
            *mean = m;
            *rstd = s;
        });
}
// ANCHOR_END: layernorm_forward

// ANCHOR: layernorm_backward
/// Backward of [`layernorm_forward`]. With norm = (x - mean) * rstd and dnorm = dout * weight:
///
///   dbias   += sum over rows of dout
///   dweight += sum over rows of dout * norm
///   dinp    += rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm * norm))
///
/// The last line is the derivative through mean and rstd: both depend on every x_c of the row.
pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    // EXERCISE(ch01-layernorm-backward, points = 10): per row, first the means of dnorm and dnorm * norm, then dx from the formula above; dweight and dbias are sums over rows (reduce_rows)
    // TESTS: -p kernels --lib -- ops::layernorm::tests::backward_matches_finite_differences
    let n = mean.len();
    dinp.par_chunks_mut(c).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, dx)| {
        let (x, dy) = (&inp[r * c..(r + 1) * c], &dout[r * c..(r + 1) * c]);
        let (m, s) = (mean[r], rstd[r]);
        let mut dnorm_mean = 0.0f32;
        let mut dnorm_norm_mean = 0.0f32;
        for i in 0..c {
            let norm = (x[i] - m) * s;
            let dnorm = dy[i] * weight[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= c as f32;
        dnorm_norm_mean /= c as f32;
        for i in 0..c {
            let norm = (x[i] - m) * s;
            let dnorm = dy[i] * weight[i];
            dx[i] += s * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
            // WRONG(forgets the path through the mean): `(dnorm - dnorm_mean - norm * dnorm_norm_mean)` -> `(dnorm - norm * dnorm_norm_mean)`
        }
    });
    reduce_rows(n, c, dbias, |rows, partial| {
        for r in rows {
            for (p, d) in partial.iter_mut().zip(&dout[r * c..(r + 1) * c]) {
                *p += d;
            }
        }
    });
    reduce_rows(n, c, dweight, |rows, partial| {
        for r in rows {
            let (m, s) = (mean[r], rstd[r]);
            for ((p, d), x) in partial.iter_mut().zip(&dout[r * c..(r + 1) * c]).zip(&inp[r * c..(r + 1) * c]) {
                *p += d * (x - m) * s;
                // WRONG(dweight without rstd): `d * (x - m) * s` -> `d * (x - m)`
            }
        }
    });
    // END EXERCISE
}
// ANCHOR_END: layernorm_backward

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::finite_difference::{check_named_gradient, random};

    fn forward(x: &[f32], w: &[f32], b: &[f32], c: usize) -> Vec<f32> {
        let n = x.len() / c;
        let (mut out, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, x, w, b, c);
        out
    }

    #[test]
    fn forward_matches_hand_computed() {
        // Row [1, 2, 3]: mean 2, var 2/3, normalised [-1.2247, 0, 1.2247].
        let out = forward(&[1., 2., 3.], &[1., 2., 1.], &[0., 0., 0.5], 3);
        let k = 1.0 / (2.0f32 / 3.0 + EPS).sqrt();
        assert!((out[0] + k).abs() < 1e-6 && out[1].abs() < 1e-6 && (out[2] - (k + 0.5)).abs() < 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, c) = (3, 8);
        let x = random(n * c, 1);
        let w = random(c, 2);
        let b = random(c, 3);
        let dout = random(n * c, 4);
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, c);
        let (mut dx, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        layernorm_backward(&mut dx, &mut dw, &mut db, &dout, &x, &w, &mean, &rstd, c);
        check_named_gradient("dx", &x, &dx, &dout, |x| forward(x, &w, &b, c));
        check_named_gradient("dweight", &w, &dw, &dout, |w| forward(&x, w, &b, c));
        check_named_gradient("dbias", &b, &db, &dout, |b| forward(&x, &w, b, c));
    }
}
