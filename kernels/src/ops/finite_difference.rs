//! Test helper: compare an analytic gradient with central finite differences.

use crate::rng::Rng;

pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0; n];
    Rng::new(seed).fill_normal(&mut out, 1.0);
    out
}

// ANCHOR: check_gradient
/// L(x) = sum_i dout[i] * f(x)[i], accumulated in f64. Its gradient with respect to x is what
/// a backward pass given `dout` must return; check each element of `analytic` against
/// (L(x + h e_i) - L(x - h e_i)) / 2h.
///
/// The tolerance (1% relative, plus 2e-3 absolute for f32 rounding in L) is far below the
/// error of any wrong formula we have seen (a missing term or factor is off by O(1)), and the
/// check refuses an all-zero gradient so that a backward that does nothing cannot pass.
pub fn check_gradient(x: &[f32], analytic: &[f32], dout: &[f32], f: impl Fn(&[f32]) -> Vec<f32>) {
    check_named_gradient("gradient", x, analytic, dout, f);
}

/// [`check_gradient`], naming the gradient in its failure: `dx element 3: analytic … vs numeric …`.
pub fn check_named_gradient(name: &str, x: &[f32], analytic: &[f32], dout: &[f32], f: impl Fn(&[f32]) -> Vec<f32>) {
    assert_eq!(x.len(), analytic.len(), "{name}: as many values as its tensor");
    let loss = |x: &[f32]| -> f64 {
        let y = f(x);
        assert_eq!(y.len(), dout.len());
        y.iter().zip(dout).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let h = 1e-2f32;
    let mut x = x.to_vec();
    let mut worst = 0.0f64;
    for i in 0..x.len() {
        let orig = x[i];
        x[i] = orig + h;
        let plus = loss(&x);
        x[i] = orig - h;
        let minus = loss(&x);
        x[i] = orig;
        let numeric = (plus - minus) / (2.0 * h as f64);
        let err = (numeric - analytic[i] as f64).abs();
        let allowed = 2e-3 + 1e-2 * numeric.abs().max((analytic[i] as f64).abs());
        assert!(err <= allowed, "{name} element {i}: analytic {} vs numeric {numeric}", analytic[i]);
        worst = worst.max(err);
    }
    let largest = analytic.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    assert!(largest > 1e-3, "{name} is (almost) all zeros: the check would prove nothing");
}
// ANCHOR_END: check_gradient
