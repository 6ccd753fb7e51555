//! GELU, in the tanh form GPT-2 was trained with ("gelu_new" in Hugging Face).

use super::math::tanh;
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;
const CHUNK: usize = 4096;

// ANCHOR: gelu_forward
/// inp [N] -> out [N]:   out = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(out, inp)| {
        for (o, &x) in out.iter_mut().zip(inp) {
            let u = SQRT_2_OVER_PI * (x + CUBIC * x * x * x);
            *o = 0.5 * x * (1.0 + tanh(u));
        }
    });
}
// ANCHOR_END: gelu_forward

// ANCHOR: gelu_backward
/// dinp += dout * d(out)/dx, where
///   d(out)/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    dinp.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).zip(dout.par_chunks(CHUNK)).for_each(
        |((dinp, inp), dout)| {
            for ((dx, &x), &dy) in dinp.iter_mut().zip(inp).zip(dout) {
                let u = SQRT_2_OVER_PI * (x + CUBIC * x * x * x);
                let t = tanh(u);
                let du_dx = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x);
                *dx += dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx);
            }
        },
    );
}
// ANCHOR_END: gelu_backward

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::finite_difference::{check_gradient, random};

    fn forward(x: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        gelu_forward(&mut out, x);
        out
    }

    #[test]
    fn forward_matches_hand_computed() {
        // gelu(0) = 0; gelu(1) = 0.5 (1 + tanh(0.7978846 * 1.044715)) = 0.8411920
        let out = forward(&[0.0, 1.0, -30.0]);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 0.841_192).abs() < 1e-6, "{}", out[1]);
        assert!(out[2].abs() < 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x = random(50, 1);
        let dout = random(50, 2);
        let mut dx = vec![0.0; 50];
        gelu_backward(&mut dx, &x, &dout);
        check_gradient(&x, &dx, &dout, forward);
    }
}
