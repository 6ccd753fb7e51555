//! Chapter 6: ZeRO and activation checkpointing.
//!
//! Chapter 2's data parallelism keeps a whole copy of the model state on every rank: 16 bytes a
//! parameter in f32 (4 for the parameter, 4 for its gradient, 8 for Adam's two moments). ZeRO
//! keeps one copy across the data-parallel group instead, each rank 1/N of it (`zero.rs`: the
//! shards and the memory formulas; `rank.rs`: the rank that trains with them). Activation
//! checkpointing trades compute for the rest of the memory: what forward keeps, backward
//! recomputes (`recompute.rs`).
//!
//! On chapter 5's grid (`train_on_grid`, `train_pipelined`): with tensor parallelism, ZeRO
//! shards each tensor rank's own parameters over its data-parallel group, at every stage; with
//! pipelines, stage 1 runs inside chapter 4's stage (`Stage::sharding_optimizer`), and stages
//! 2 and 3 are refused with the reason.

pub mod plan;
pub mod rank;
pub mod recompute;
pub mod report;
pub mod train;
pub mod zero;

pub use recompute::Recompute;
pub use train::{
    GridShape, Ran, ZeroConfig, ZeroError, ZeroRankReport, ZeroReport, check_launch, pipelined_config, train,
    train_on_grid, train_pipelined, train_this_process,
};
pub use zero::ZeroStage;
