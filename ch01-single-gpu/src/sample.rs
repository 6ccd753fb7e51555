//! Text generation: the model's next-token distribution, sharpened by a temperature and cut to
//! the k most likely tokens, sampled with a seeded generator.

use crate::config::ModelConfig;
use crate::model::{Activations, ModelError, forward};
use crate::params::GptParams;
use kernels::{DType, Device, MemoryLedger, Rng, View};

#[derive(Clone, Copy, Debug)]
pub struct SampleConfig {
    pub tokens: usize,
    /// Divides the logits: below 1 sharpens, above 1 flattens; 0 picks the most likely token.
    pub temperature: f32,
    /// Sample among the k most likely tokens only; 0 means all.
    pub top_k: usize,
    pub seed: u64,
}

/// Picks the next token from one row of logits.
pub fn sample_next(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> u32 {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if temperature <= 0.0 {
        return order[0];
    }
    let k = if top_k == 0 { order.len() } else { top_k.min(order.len()) };
    let top = &order[..k];
    let max = logits[top[0] as usize];
    let weights: Vec<f64> = top.iter().map(|&i| (((logits[i as usize] - max) / temperature) as f64).exp()).collect();
    let mut u = rng.next_f64() * weights.iter().sum::<f64>();
    for (&token, w) in top.iter().zip(&weights) {
        if u < *w {
            return token;
        }
        u -= w;
    }
    top[k - 1]
}

// ANCHOR: generate
/// Continues `prompt` by `cfg.tokens` tokens, feeding the model at most its last `block_size`
/// tokens each time (no KV cache: every step reruns the whole window, which is simple and fast
/// enough for a few hundred tokens of a small model).
pub fn generate(
    p: &GptParams<View<'_>>,
    model: &ModelConfig,
    prompt: &[u32],
    cfg: SampleConfig,
    device: Device,
    dtype: DType,
) -> Result<Vec<u32>, ModelError> {
    let mut rng = Rng::derive(cfg.seed, "sample");
    let window = model.block_size;
    let mut acts = Activations::new(model, 1, window, device, dtype, &MemoryLedger::new())?;
    let mut tokens = prompt.to_vec();
    let vp = model.padded_vocab_size();
    for _ in 0..cfg.tokens {
        let context = &tokens[tokens.len().saturating_sub(window)..];
        let t = context.len();
        forward(p, model, &mut acts, context, None, 1, t)?;
        let last = acts.head.logits.view().slice((t - 1) * vp..(t - 1) * vp + model.vocab_size).to_vec()?;
        tokens.push(sample_next(&last, cfg.temperature, cfg.top_k, &mut rng));
    }
    Ok(tokens.split_off(prompt.len()))
}
// ANCHOR_END: generate

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_seeded_sampling() {
        let logits = [0.0, 5.0, 1.0, 4.9];
        let mut rng = Rng::new(0);
        assert_eq!(sample_next(&logits, 0.0, 0, &mut rng), 1);
        for _ in 0..50 {
            let t = sample_next(&logits, 1.0, 2, &mut rng);
            assert!(t == 1 || t == 3, "top-2 only");
        }
        let draw = |seed| (0..20).map(|_| sample_next(&logits, 2.0, 0, &mut Rng::new(seed))).collect::<Vec<_>>();
        assert_eq!(draw(3), draw(3));
    }
}
