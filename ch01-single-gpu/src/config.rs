//! The model's shape: presets and overrides, checked before anything is allocated.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown model preset '{0}' (expected one of: {names})", names = PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", "))]
    UnknownPreset(String),
    #[error("n_embd ({n_embd}) is not divisible by n_head ({n_head})")]
    HeadsDoNotDivide { n_embd: usize, n_head: usize },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// GPT-2's shape. The vocabulary is the tokenizer's; the embedding table is padded to
/// [`ModelConfig::padded_vocab_size`] rows so that the largest matmul has a friendly width.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Longest sequence the position embedding covers.
    pub block_size: usize,
    pub vocab_size: usize,
}

// ANCHOR: presets
/// (name, n_layer, n_head, n_embd, block_size)
pub const PRESETS: [(&str, usize, usize, usize, usize); 6] = [
    ("tiny", 2, 4, 64, 64),
    ("small", 4, 4, 128, 128),
    ("gpt2", 12, 12, 768, 1024),
    ("gpt2-medium", 24, 16, 1024, 1024),
    ("gpt2-large", 36, 20, 1280, 1024),
    ("gpt2-xl", 48, 25, 1600, 1024),
];
// ANCHOR_END: presets

impl ModelConfig {
    pub fn preset(name: &str, vocab_size: usize) -> Result<ModelConfig, ConfigError> {
        let &(_, n_layer, n_head, n_embd, block_size) =
            PRESETS.iter().find(|p| p.0 == name).ok_or_else(|| ConfigError::UnknownPreset(name.to_string()))?;
        Ok(ModelConfig { n_layer, n_head, n_embd, block_size, vocab_size })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (value, name) in [
            (self.n_layer, "n_layer"),
            (self.n_head, "n_head"),
            (self.n_embd, "n_embd"),
            (self.block_size, "block_size"),
            (self.vocab_size, "vocab_size"),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ConfigError::HeadsDoNotDivide { n_embd: self.n_embd, n_head: self.n_head });
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    // ANCHOR: padded_vocab_size
    /// The vocabulary rounded up to a multiple of 128 (50257 -> 50304 for GPT-2's BPE).
    pub fn padded_vocab_size(&self) -> usize {
        self.vocab_size.div_ceil(128) * 128
    }
    // ANCHOR_END: padded_vocab_size

    // ANCHOR: flops_per_token
    /// Floating-point operations to train on one token at sequence length `t`: forward and
    /// backward of every matmul (a matmul of a token's vector by a K x N weight is 2KN in forward
    /// and twice that in backward, so 6 per weight), plus attention's two T-long products:
    ///
    ///   6 · (12·L·C² + V·C)  +  12 · L · T · C
    ///
    /// 12·L·C² are the blocks' weights (QKV 3C², projection C², MLP 8C²), V·C the output
    /// projection (the real vocabulary, not the padding). Biases, LayerNorm and softmax are left
    /// out, and attention is counted for all T keys, as in the PaLM paper and llm.c: this is the
    /// "model FLOPs" of model FLOPs utilisation (MFU), not what the hardware executes.
    pub fn flops_per_token(&self, t: usize) -> f64 {
        let (l, c, v, t) = (self.n_layer as f64, self.n_embd as f64, self.vocab_size as f64, t as f64);
        6.0 * (12.0 * l * c * c + v * c) + 12.0 * l * t * c
    }
    // ANCHOR_END: flops_per_token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_errors() {
        let gpt2 = ModelConfig::preset("gpt2", 50257).unwrap();
        assert_eq!((gpt2.n_layer, gpt2.n_embd, gpt2.padded_vocab_size()), (12, 768, 50304));
        assert_eq!(ModelConfig::preset("tiny", 256).unwrap().padded_vocab_size(), 256);
        let err = ModelConfig::preset("huge", 256).unwrap_err();
        assert!(err.to_string().contains("unknown model preset 'huge'") && err.to_string().contains("gpt2-xl"));
        // 6 · (84.9M + 38.6M) + 113.2M: what llm.c counts for GPT-2 at T = 1024, less its
        // biases, LayerNorms and position embeddings (6 · 124.4M + 113.2M = 859.9M).
        assert_eq!(gpt2.flops_per_token(1024), 854_438_400.0);
        let bad = ModelConfig { n_head: 5, ..gpt2 };
        assert_eq!(bad.validate(), Err(ConfigError::HeadsDoNotDivide { n_embd: 768, n_head: 5 }));
    }
}
