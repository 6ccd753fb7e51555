//! Global gradient-norm clipping.

use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

// ANCHOR: grad_norm
/// sqrt(sum of g^2) over every gradient, accumulated in f64 over fixed chunks summed in order
/// (deterministic whatever the thread count).
pub fn global_norm(grads: &[f32]) -> f32 {
    squared_norm(grads).sqrt() as f32
}

/// sum of g^2, in f64, the same way: the part of the squared global norm that one rank's
/// gradients contribute, when ranks hold different parts of the model.
pub fn squared_norm(grads: &[f32]) -> f64 {
    let partials: Vec<f64> = grads.par_chunks(CHUNK).map(|c| c.iter().map(|&g| g as f64 * g as f64).sum()).collect();
    partials.iter().sum::<f64>()
}

/// The factor that brings a gradient of global norm `norm` down to at most `max_norm`:
/// min(1, max_norm / norm). The optimizer applies it as it reads each gradient (see `adamw`),
/// which saves a pass over every gradient.
pub fn clip_scale(norm: f32, max_norm: f32) -> f32 {
    if norm > max_norm && norm.is_finite() { max_norm / norm } else { 1.0 }
}
// ANCHOR_END: grad_norm

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_only_above_the_threshold() {
        let g = vec![3.0; 4 * CHUNK]; // several chunks: norm = 3 * sqrt(4 * CHUNK)
        let norm = global_norm(&g);
        assert!((norm - 3.0 * (4.0 * CHUNK as f32).sqrt()).abs() < 1e-3);
        assert_eq!(global_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(clip_scale(5.0, 10.0), 1.0);
        assert_eq!(clip_scale(5.0, 1.0), 0.2);
        assert_eq!(clip_scale(f32::NAN, 1.0), 1.0);
    }
}
