//! Global gradient-norm clipping.

use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

// ANCHOR: grad_norm
/// sqrt(sum of g^2) over every gradient, accumulated in f64 over fixed chunks summed in order
/// (deterministic whatever the thread count).
pub fn global_norm(grads: &[f32]) -> f32 {
    let partials: Vec<f64> = grads.par_chunks(CHUNK).map(|c| c.iter().map(|&g| g as f64 * g as f64).sum()).collect();
    partials.iter().sum::<f64>().sqrt() as f32
}

/// Scales the gradients so that their global norm is at most `max_norm`; returns the norm
/// before clipping (the number worth logging: it shows how often clipping fires).
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = global_norm(grads);
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / norm;
        grads.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|g| *g *= scale));
    }
    norm
}
// ANCHOR_END: grad_norm

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_only_above_the_threshold() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 10.0), 5.0);
        assert_eq!(g, vec![3.0, 4.0]);
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-7 && (g[1] - 0.8).abs() < 1e-7);
    }
}
