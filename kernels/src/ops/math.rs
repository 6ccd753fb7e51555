//! Scalar helpers written so that LLVM vectorises them: a dot product with independent
//! accumulators, and `exp`/`tanh` without a libm call per element (libm's `tanhf` alone would
//! cost a GPT-2 step ~0.2 s on two cores).

/// `sum_i a[i] * b[i]` with 16 independent partial sums (vectorised; the summation order is
/// fixed, so the result is deterministic).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 16];
    let (a16, a_tail) = a.split_at(a.len() - a.len() % 16);
    let (b16, b_tail) = b.split_at(a16.len());
    for (x, y) in a16.chunks_exact(16).zip(b16.chunks_exact(16)) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut sum = 0.0;
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    // Pairwise, in a fixed order.
    let mut width = 8;
    while width > 0 {
        for j in 0..width {
            acc[j] += acc[j + width];
        }
        width /= 2;
    }
    acc[0] + sum
}

/// `sum_i x[i]` with 16 independent partial sums (LLVM will not vectorise a plain `iter().sum()`
/// of floats: that would reorder the additions, which changes the rounding).
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (x16, tail) = x.split_at(x.len() - x.len() % 16);
    for chunk in x16.chunks_exact(16) {
        for j in 0..16 {
            acc[j] += chunk[j];
        }
    }
    let mut width = 8;
    while width > 0 {
        for j in 0..width {
            acc[j] += acc[j + width];
        }
        width /= 2;
    }
    acc[0] + tail.iter().sum::<f32>()
}

/// `max_i x[i]` (negative infinity for an empty slice), vectorised the same way.
#[inline]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let (x16, tail) = x.split_at(x.len() - x.len() % 16);
    for chunk in x16.chunks_exact(16) {
        for j in 0..16 {
            acc[j] = acc[j].max(chunk[j]);
        }
    }
    acc.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `exp(x)` to within 2 ulp over the whole f32 range (NaN in, NaN out).
///
/// Range reduction: x = n·ln2 + r with |r| ≤ ln2/2, so exp(x) = 2ⁿ·exp(r); exp(r) is its Taylor
/// polynomial of degree 7 (truncation error below 2e-8 relative); 2ⁿ is built in the exponent
/// bits directly. n comes from the "shifter" trick rather than a float-to-int cast, because
/// Rust's saturating `as i32` does not vectorise: adding 1.5·2²³ rounds x·log₂e to an integer
/// and leaves that integer in the low mantissa bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFTER: f32 = 12_582_912.0; // 1.5 · 2²³
    let x = x.clamp(-87.0, 88.0); // clamp keeps NaN
    let shifted = x * LOG2_E + SHIFTER;
    let n = shifted - SHIFTER; // x·log₂e rounded to the nearest integer
    let n_bits = shifted.to_bits().wrapping_sub(SHIFTER.to_bits()); // n as a two's-complement integer
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    p * scale
}

/// `tanh(x) = 1 - 2 / (exp(2x) + 1)`: absolute error below 1e-7.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-1000.0), exp(-87.0));
    }

    #[test]
    fn tanh_matches_libm() {
        let mut x = -20.0f32;
        while x < 20.0 {
            assert!((tanh(x) as f64 - (x as f64).tanh()).abs() < 2e-7, "x = {x}");
            x += 0.0031;
        }
    }

    #[test]
    fn sum_and_max_match_naive() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
        assert_eq!(sum(&x), x.iter().sum::<f32>());
        assert_eq!(max(&x), 50.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.25).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }
}
