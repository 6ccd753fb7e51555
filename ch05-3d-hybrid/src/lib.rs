//! Chapter 5: 3D parallelism.
//!
//! Chapters 2, 3 and 4 on one grid of `--dp x --tp x --pp` ranks (`kernels::comm::grid`):
//! chapter 4's pipeline runs across stages, each stage is split across a tensor-parallel group
//! with chapter 3's pieces (`tp_stage.rs`), and the pipes are data-parallel replicas that sum
//! their gradients with chapter 2's `GradSync` (`hybrid.rs`). `cost.rs` holds the run to the
//! formulas for what each kind of group sends.

pub mod cost;
pub mod hybrid;
pub mod report;
pub mod tp_stage;

pub use hybrid::{HybridConfig, HybridError, HybridRankReport, HybridReport, train};
