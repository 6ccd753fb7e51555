//! The training loop: the whole chapter as one function, [`train`], and the pieces it is made of,
//! one file each: what a run is asked to do (`config.rs`), the [`Trainer`] that holds a run in
//! progress (`trainer.rs`), the loop that drives it (`driver.rs`: later chapters drive their
//! ranks with it), what a run did (`outcome.rs`) and what can go wrong (`error.rs`).

use kernels::Trace;
use std::path::Path;

mod config;
mod driver;
mod error;
mod outcome;
mod trainer;

pub use config::*;
pub use driver::*;
pub use error::*;
pub use outcome::*;
pub use trainer::*;

// ANCHOR: train
/// Trains a GPT-2 as `cfg` says and reports what happened.
pub fn train(cfg: &TrainConfig) -> Result<TrainReport, TrainError> {
    let mut trainer = Trainer::new(cfg)?;
    let header = trainer.header();
    let outcome = drive(cfg, &mut trainer, true, &header)?;
    if let Some(path) = &cfg.trace {
        write_trace(&trainer.trace, path)?;
    }
    trainer.report(outcome)
}
// ANCHOR_END: train

fn write_trace(trace: &Trace, path: &Path) -> Result<(), TrainError> {
    trace.write_chrome_json(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })
}
