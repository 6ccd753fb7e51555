//! Text to token ids and back: bytes (vocabulary 256, the default) or GPT-2's BPE.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// One token per byte: vocabulary 256, nothing to learn, every text encodes.
    Byte,
    /// GPT-2's byte-pair encoding (r50k_base, vocabulary 50257), shipped inside `tiktoken-rs`.
    Gpt2,
}

pub enum Tokenizer {
    Byte,
    Gpt2(&'static tiktoken_rs::CoreBPE),
}

impl Tokenizer {
    pub fn new(kind: TokenizerKind) -> Tokenizer {
        match kind {
            TokenizerKind::Byte => Tokenizer::Byte,
            TokenizerKind::Gpt2 => Tokenizer::Gpt2(tiktoken_rs::r50k_base_singleton()),
        }
    }

    pub fn kind(&self) -> TokenizerKind {
        match self {
            Tokenizer::Byte => TokenizerKind::Byte,
            Tokenizer::Gpt2(_) => TokenizerKind::Gpt2,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::Gpt2(_) => 50257,
        }
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Byte => text.bytes().map(u32::from).collect(),
            Tokenizer::Gpt2(bpe) => bpe.encode_ordinary(text),
        }
    }

    /// Token ids back to text; a sequence that stops inside a multi-byte character (or an id
    /// outside the vocabulary) decodes lossily rather than failing.
    pub fn decode(&self, tokens: &[u32]) -> String {
        let bytes: Vec<u8> = match self {
            Tokenizer::Byte => tokens.iter().map(|&t| t as u8).collect(),
            Tokenizer::Gpt2(bpe) => {
                let valid: Vec<u32> = tokens.iter().copied().filter(|&t| (t as usize) < 50257).collect();
                bpe.decode_bytes(&valid).unwrap_or_default()
            }
        };
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_tokenizers_round_trip() {
        let text = "HAMLET:\nTo be, or not to be";
        for kind in [TokenizerKind::Byte, TokenizerKind::Gpt2] {
            let tok = Tokenizer::new(kind);
            let ids = tok.encode(text);
            assert!(ids.iter().all(|&t| (t as usize) < tok.vocab_size()));
            assert_eq!(tok.decode(&ids), text);
        }
        // GPT-2's BPE compresses English about 4x relative to bytes.
        assert!(Tokenizer::new(TokenizerKind::Gpt2).encode(text).len() < text.len() / 2);
    }
}
