//! Chapter 4: pipeline parallelism.
//!
//! The model's blocks are cut into `--pp` contiguous stages, one per rank (`stage.rs`); the
//! batch is cut into `--microbatches` micro-batches that flow through them. What each stage does
//! and when is a schedule, written as data (`schedule.rs`: GPipe, 1F1B, interleaved, ZB-H1), checked and timed by a
//! simulator with no devices (`simulate.rs`), and run by one interpreter (`pipeline.rs`) on one
//! thread per stage (`train.rs`).

pub mod parts;
pub mod pipeline;
pub mod report;
pub mod schedule;
pub mod simulate;
pub mod stage;
pub mod train;

pub use schedule::{Instr, Schedule, ScheduleKind};
pub use train::{PipelineConfig, PipelineError, PipelineReport, StageReport, train};
