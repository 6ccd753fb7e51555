//! Chapter 2: data parallelism.
//!
//! Chapter 1's trainer, once per rank: each rank computes its rows of the global batch, the
//! gradients are summed with a ring all-reduce, bucket by bucket while backward is still running
//! (`buckets.rs`, `overlap.rs`, `grad_sync.rs`: a piece later chapters reuse on their data-parallel group), and every rank takes the same step (`data_parallel.rs`).

pub mod buckets;
pub mod data_parallel;
pub mod grad_sync;
pub mod overlap;
pub mod report;

pub use data_parallel::{DpConfig, DpError, DpReport, Processes, ReplicaReport, check_config, train, train_process};
