//! Chapter 3: tensor parallelism.
//!
//! Chapter 1's model, split across `--tp` ranks Megatron's way: each block's first matmul of a
//! branch by columns, its output projection by rows, the vocabulary by rows of the tied
//! embedding. `tp_comm.rs` is the communication (the conjugate pair of copy and sum, and the
//! block hook that calls it), `vocab_parallel.rs` the embedding and cross-entropy over a
//! vocabulary shard, `tensor_parallel.rs` the rank and the run, `cost.rs` the formulas its bytes
//! and memory are held to.

pub mod cost;
pub mod report;
pub mod tensor_parallel;
pub mod tp_comm;
pub mod vocab_parallel;

pub use tensor_parallel::{TpConfig, TpError, TpRankReport, TpReport, train};
