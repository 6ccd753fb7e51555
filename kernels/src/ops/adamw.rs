//! AdamW (Loshchilov and Hutter): Adam with weight decay applied to the weights directly,
//! not through the gradient.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for AdamWConfig {
    /// GPT-2/GPT-3's betas and epsilon.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8 }
    }
}

const CHUNK: usize = 16 * 1024;

// ANCHOR: adamw
/// One AdamW step at step number `t` (1-based) over params, grads and moments m, v (all [N]).
/// The gradient is used as g = grad_scale · grads, so that gradient clipping costs no extra
/// pass over memory (this loop is bandwidth-bound: 7 floats moved per parameter).
///
///   m = b1 m + (1 - b1) g              v = b2 v + (1 - b2) g^2
///   m^ = m / (1 - b1^t)                v^ = v / (1 - b2^t)            (bias correction)
///   p = p - lr (m^ / (sqrt(v^) + eps) + weight_decay p)
pub fn adamw_update(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    cfg: AdamWConfig,
    lr: f32,
    weight_decay: f32,
    grad_scale: f32,
    t: u64,
) {
    // EXERCISE(ch01-adamw, points = 5): update the moments m and v from g = grad_scale * grad, correct their bias by 1 - beta^t, then step p with the decoupled weight decay
    // TESTS: -p kernels --lib -- ops::adamw::tests::
    assert!(t >= 1, "AdamW steps are numbered from 1");
    let AdamWConfig { beta1, beta2, eps } = cfg;
    let correction1 = (1.0 - (beta1 as f64).powf(t as f64)) as f32;
    // WRONG(no bias correction of the first moment): `(1.0 - (beta1 as f64).powf(t as f64)) as f32` -> `1.0`
    let correction2 = (1.0 - (beta2 as f64).powf(t as f64)) as f32;
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let g = grad_scale * g[i];
                m[i] = beta1 * m[i] + (1.0 - beta1) * g;
                v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
                let m_hat = m[i] / correction1;
                let v_hat = v[i] / correction2;
                p[i] -= lr * (m_hat / (v_hat.sqrt() + eps) + weight_decay * p[i]);
                // WRONG(weight decay not scaled by the learning rate): `lr * (m_hat / (v_hat.sqrt() + eps) + weight_decay * p[i])` -> `lr * m_hat / (v_hat.sqrt() + eps) + weight_decay * p[i]`
            }
        });
    // END EXERCISE
}
// ANCHOR_END: adamw

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_hand_worked_step() {
        // Step 1 from zero moments: m = 0.1 g, v = 0.05 g^2, m^ = g, v^ = g^2, so the Adam part
        // of the update is g/(|g| + eps) = sign(g) (to 1e-8 relative).
        // p = 1.0, g = 0.5, lr = 0.1, wd = 0.1: p = 1 - 0.1 (1 + 0.1) = 0.89
        let (mut p, mut m, mut v) = ([1.0f32, -2.0], [0.0f32; 2], [0.0f32; 2]);
        adamw_update(&mut p, &[0.5, -0.25], &mut m, &mut v, AdamWConfig::default(), 0.1, 0.1, 1.0, 1);
        assert!((p[0] - 0.89).abs() < 1e-6, "step 1: p[0] = {}, want 0.89", p[0]);
        // p = -2, g < 0: p = -2 - 0.1 (-1 + 0.1 * -2) = -1.88
        assert!((p[1] + 1.88).abs() < 1e-6, "step 1: p[1] = {}, want -1.88", p[1]);
        assert!(
            (m[0] - 0.05).abs() < 1e-7 && (v[0] - 0.0125).abs() < 1e-8,
            "step 1: m[0] = {}, v[0] = {}, want 0.05, 0.0125",
            m[0],
            v[0]
        );

        // Step 2 with g = 0 (no weight decay): m = 0.9 * 0.05 = 0.045, v = 0.95 * 0.0125 =
        // 0.011875, m^ = 0.045 / 0.19 = 0.236842, v^ = 0.011875 / 0.0975 = 0.121795,
        // update = 0.1 * 0.236842 / 0.348991 = 0.0678648
        adamw_update(&mut p, &[0.0, -0.25], &mut m, &mut v, AdamWConfig::default(), 0.1, 0.0, 1.0, 2);
        assert!((p[0] - (0.89 - 0.067_864_8)).abs() < 1e-6, "step 2: p[0] = {}, want 0.8221352", p[0]);
    }

    #[test]
    fn grad_scale_equals_scaling_the_gradient() {
        let run = |g: &[f32], scale: f32| {
            let (mut p, mut m, mut v) = ([1.0f32, -2.0], [0.0f32; 2], [0.0f32; 2]);
            for t in 1..=3 {
                adamw_update(&mut p, g, &mut m, &mut v, AdamWConfig::default(), 0.1, 0.1, scale, t);
            }
            (p, m, v)
        };
        assert_eq!(
            run(&[0.5, -0.25], 0.5),
            run(&[0.25, -0.125], 1.0),
            "grad_scale 0.5 differs from halving the gradient"
        );
    }
}
