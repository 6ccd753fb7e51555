//! Chapter 1: a complete GPT-2 trainer on one device.
//!
//! [`train::train`] is the whole chapter as a function: it trains from a [`train::TrainConfig`]
//! and returns a [`train::TrainReport`]. The binary (`main.rs`) is a thin command line around it,
//! and later chapters and the cross-chapter tests call it directly.

pub mod backward_split;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod interrupt;
pub mod metrics;
pub mod model;
pub mod optimizer;
pub mod params;
pub mod plot;
pub mod preflight;
pub mod report;
pub mod sample;
pub mod schedule;
pub mod testing;
pub mod tokenizer;
pub mod train;

pub use train::{DataSource, TrainConfig, TrainError, TrainReport, train};
