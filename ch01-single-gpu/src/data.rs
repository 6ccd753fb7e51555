//! The corpus as token streams, and the batches cut from them.
//!
//! Protocol (the book documents it so that others can reproduce our numbers):
//! - train split = the first 90% of the token stream, validation = the last 10%;
//! - `sequential` order: row r of micro-batch k is the window starting at token (k·B + r)·T of
//!   the train split, wrapping at its end; inputs are tokens [s, s+T), targets [s+1, s+T+1);
//! - `random` order (the default): each row starts at a uniform position in [0, len - T - 1],
//!   drawn from a generator seeded by `--seed`;
//! - validation loss = the mean token loss over the first `--val-batches` batches of consecutive
//!   windows from the start of the validation split, laid out as in `sequential`.

use kernels::Rng;
use serde::{Deserialize, Serialize};

/// The default corpus: eight Shakespeare plays (see data/README.md), compiled into the binary.
pub const SHAKESPEARE: &str = include_str!("../../data/shakespeare.txt");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DataError {
    #[error("the corpus is empty")]
    Empty,
    #[error("the {split} split has {len} tokens, too few for sequences of {seq_len} (it needs at least {needed})")]
    TooShort { split: &'static str, len: usize, seq_len: usize, needed: usize },
    #[error("the data sampler's random generator state is all zeros, which no run can reach (a corrupt file)")]
    ZeroRngState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DataOrder {
    Random,
    Sequential,
}

pub struct Dataset {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

/// B rows of T tokens, row-major, with the next-token targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

// ANCHOR: dataset_split
impl Dataset {
    pub fn new(tokens: Vec<u32>) -> Result<Dataset, DataError> {
        if tokens.is_empty() {
            return Err(DataError::Empty);
        }
        let split = tokens.len() * 9 / 10;
        let val = tokens[split..].to_vec();
        let mut train = tokens;
        train.truncate(split);
        Ok(Dataset { train, val })
    }
    // ANCHOR_END: dataset_split

    /// Both splits must hold at least one full window (T inputs plus the last target).
    pub fn check_seq_len(&self, seq_len: usize) -> Result<(), DataError> {
        for (split, tokens) in [("train", &self.train), ("validation", &self.val)] {
            let needed = seq_len.saturating_add(2);
            if tokens.len() < needed {
                return Err(DataError::TooShort { split, len: tokens.len(), seq_len, needed });
            }
        }
        Ok(())
    }
}

/// What identifies the text a run trains on, as the tokenizer cut it: the number of tokens and a
/// hash of them (FNV-1a over their little-endian bytes). A checkpoint stores it, so that
/// `--resume` with another `--data` (or the same text tokenized differently) is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    pub tokens: usize,
    /// 16 hex digits.
    pub fingerprint: String,
}

impl Dataset {
    pub fn identity(&self) -> DataIdentity {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for token in self.train.iter().chain(&self.val) {
            for byte in token.to_le_bytes() {
                h = (h ^ byte as u64).wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
        DataIdentity { tokens: self.train.len() + self.val.len(), fingerprint: format!("{h:016x}") }
    }
}

// ANCHOR: sequential_batch
/// Appends the window starting at `start` (wrapping at the end of `split`) to `batch`.
fn push_window(batch: &mut Batch, split: &[u32], start: usize, t: usize) {
    let n = split.len();
    batch.inputs.extend((0..t).map(|i| split[(start + i) % n]));
    batch.targets.extend((0..t).map(|i| split[(start + i + 1) % n]));
}

/// Micro-batch `k` in sequential order: row r starts at (k·B + r)·T.
pub fn sequential_batch(split: &[u32], k: u64, b: usize, t: usize) -> Batch {
    let mut batch = Batch { inputs: Vec::with_capacity(b * t), targets: Vec::with_capacity(b * t) };
    for r in 0..b {
        let start = ((k as u128 * b as u128 + r as u128) * t as u128 % split.len() as u128) as usize;
        push_window(&mut batch, split, start, t);
    }
    batch
}
// ANCHOR_END: sequential_batch

/// Hands out the training micro-batches in order; its state is all a resumed run needs to see
/// the same batches as an uninterrupted one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSampler {
    pub order: DataOrder,
    /// The index of the next micro-batch.
    pub next: u64,
    rng: Rng,
}

impl BatchSampler {
    pub fn new(order: DataOrder, seed: u64) -> BatchSampler {
        BatchSampler { order, next: 0, rng: Rng::derive(seed, "data") }
    }

    /// Refuses a state read from a file that no run can have written: xoshiro's all-zero state
    /// is a fixed point (every draw is 0, and drawing a window position would loop forever).
    pub fn check(&self) -> Result<(), DataError> {
        // The all-zero state is the only state one draw leaves unchanged.
        let mut probe = self.rng.clone();
        probe.next_u64();
        if probe == self.rng { Err(DataError::ZeroRngState) } else { Ok(()) }
    }

    // ANCHOR: next_batch
    pub fn next_batch(&mut self, train: &[u32], b: usize, t: usize) -> Batch {
        let batch = match self.order {
            DataOrder::Sequential => sequential_batch(train, self.next, b, t),
            DataOrder::Random => {
                let mut batch = Batch { inputs: Vec::with_capacity(b * t), targets: Vec::with_capacity(b * t) };
                for _ in 0..b {
                    let start = self.rng.below((train.len() - t) as u64) as usize;
                    push_window(&mut batch, train, start, t);
                }
                batch
            }
        };
        self.next += 1;
        batch
    }
    // ANCHOR_END: next_batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_ninety_ten() {
        let ds = Dataset::new((0..100).collect()).unwrap();
        assert_eq!((ds.train.len(), ds.val.len()), (90, 10));
        assert_eq!(ds.val[0], 90);
        assert!(ds.check_seq_len(8).is_ok());
        assert!(matches!(ds.check_seq_len(9), Err(DataError::TooShort { split: "validation", .. })));
        assert_eq!(Dataset::new(vec![]).err(), Some(DataError::Empty));
    }

    #[test]
    fn sequential_follows_the_protocol_and_wraps() {
        let split: Vec<u32> = (0..10).collect();
        // B = 2, T = 3: batch 0 rows start at 0 and 3; batch 1 at 6 and 9 (wrapping).
        let b1 = sequential_batch(&split, 1, 2, 3);
        assert_eq!(b1.inputs, vec![6, 7, 8, 9, 0, 1]);
        assert_eq!(b1.targets, vec![7, 8, 9, 0, 1, 2]);
    }

    #[test]
    fn identity_and_corrupt_sampler_state() {
        let a = Dataset::new((0..100).collect()).unwrap().identity();
        assert_eq!(a, Dataset::new((0..100).collect()).unwrap().identity());
        assert_ne!(a.fingerprint, Dataset::new((1..101).collect()).unwrap().identity().fingerprint);
        let sampler = BatchSampler::new(DataOrder::Random, 1);
        assert_eq!(sampler.check(), Ok(()));
        let mut json = serde_json::to_value(&sampler).unwrap();
        json["rng"]["state"] = serde_json::json!([0, 0, 0, 0]);
        let zero: BatchSampler = serde_json::from_value(json).unwrap();
        assert_eq!(zero.check(), Err(DataError::ZeroRngState));
    }

    #[test]
    fn random_order_is_seeded_and_in_range() {
        let split: Vec<u32> = (0..1000).collect();
        let mut a = BatchSampler::new(DataOrder::Random, 1);
        let mut b = BatchSampler::new(DataOrder::Random, 1);
        let batch = a.next_batch(&split, 4, 16);
        assert_eq!(batch, b.next_batch(&split, 4, 16));
        assert_ne!(batch, a.next_batch(&split, 4, 16));
        for (i, t) in batch.inputs.iter().zip(&batch.targets) {
            assert_eq!(i + 1, *t, "targets are the inputs shifted by one, with no wrap");
        }
    }
}
