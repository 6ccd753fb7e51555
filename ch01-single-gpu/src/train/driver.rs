//! The training loop, [`drive`], for anything that can take a step: chapter 1's [`Trainer`], or
//! one rank of a parallel run.

use super::{StepRecord, TrainConfig, TrainError};
use crate::checkpoint::{self};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn progress_bar(cfg: &TrainConfig, start: u64) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(cfg.steps).with_position(start);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Prints a line above the progress bar (or plainly when it is hidden or stderr is a file).
fn say(bar: &ProgressBar, progress: bool, line: &str) {
    if progress {
        bar.suspend(|| eprintln!("{line}"));
    }
}

/// What the training loop needs from whatever trains: chapter 1's [`Trainer`], or one rank of
/// a parallel run (where `step` and `evaluate` are collective: every rank calls them in turn).
pub trait TrainSteps {
    fn step(&mut self) -> Result<StepRecord, TrainError>;
    fn evaluate(&mut self) -> Result<f32, TrainError>;
    fn save(&self, dir: &Path) -> Result<(), TrainError>;
    /// Optimizer steps completed (more than 0 on a resumed run).
    fn steps_done(&self) -> u64;
    /// How many ranks run the loop in lockstep (each calling `step` and `evaluate` together).
    fn ranks(&self) -> usize {
        1
    }
}

/// What the loop saw.
pub struct LoopOutcome {
    pub steps: Vec<StepRecord>,
    /// (step, validation loss) at each evaluation.
    pub val_losses: Vec<(u64, f32)>,
    /// Time spent in training steps (evaluation and saving excluded).
    pub train_seconds: f64,
}

/// Whether [`drive`] saves a checkpoint after step `done` (1-based): every `save_every` steps and
/// after the last, when `--save` is given. A layout whose save is collective (its ranks gather
/// their shards first) asks this to know when to gather.
pub fn saves_after(cfg: &TrainConfig, done: u64) -> bool {
    cfg.save.is_some() && (done == cfg.steps || (cfg.save_every > 0 && done.is_multiple_of(cfg.save_every)))
}

// ANCHOR: drive
/// The training loop: step until `cfg.steps`, evaluating every `eval_every` steps and after the
/// last, and saving every `save_every` and at the end. Only the `leader` (rank 0) shows
/// progress, writes metrics and saves checkpoints; `header` is its first line (after, on a
/// resumed run, the line saying what it resumed). Ctrl-C (see [`crate::interrupt`]) stops the
/// loop between steps.
pub fn drive(
    cfg: &TrainConfig,
    trainer: &mut dyn TrainSteps,
    leader: bool,
    header: &str,
) -> Result<LoopOutcome, TrainError> {
    let resumed = trainer.steps_done();
    // Held until the loop returns: a second run saving to the same place is refused.
    let _lock = match &cfg.save {
        Some(dir) if leader => {
            let lock = checkpoint::SaveLock::take(dir)?;
            checkpoint::remove_leftover_staging(dir)?;
            Some(lock)
        }
        _ => None,
    };
    let mut metrics = match &cfg.metrics {
        Some(path) if leader => Some(crate::metrics::MetricsLog::open(path, resumed)?),
        _ => None,
    };
    let progress = cfg.progress && leader;
    let bar = progress_bar(&TrainConfig { progress, ..cfg.clone() }, resumed);
    // A resumed run starts from its checkpoint, which is also the last good one until it saves.
    let mut last_checkpoint: Option<(PathBuf, u64)> = cfg.resume.clone().filter(|_| resumed > 0).map(|d| (d, resumed));
    if let Some((dir, at)) = &last_checkpoint {
        say(&bar, progress, &format!("resuming from step {at} of {} ({})", cfg.steps, dir.display()));
    }
    say(&bar, progress, header);

    let mut outcome = LoopOutcome { steps: Vec::new(), val_losses: Vec::new(), train_seconds: 0.0 };
    // Ranks in lockstep stop at the same step: one step after the first to see the interrupt.
    let lag = u64::from(trainer.ranks() > 1);
    while trainer.steps_done() < cfg.steps {
        if crate::interrupt::stop_at(trainer.steps_done() + lag).is_some_and(|at| trainer.steps_done() >= at) {
            bar.abandon();
            return Err(TrainError::Interrupted { step: trainer.steps_done(), last_checkpoint });
        }
        let started = Instant::now();
        let mut record = match trainer.step() {
            Ok(record) => record,
            Err(TrainError::NonFiniteLoss { step, loss, grad_norm, .. }) => {
                bar.abandon();
                if let Some(log) = metrics.as_mut() {
                    log.write_stopped(step, loss, grad_norm)?;
                }
                return Err(TrainError::NonFiniteLoss { step, loss, grad_norm, last_checkpoint });
            }
            Err(e) => return Err(e),
        };
        outcome.train_seconds += started.elapsed().as_secs_f64();
        let done = record.step;
        if done == cfg.steps || (cfg.eval_every > 0 && done.is_multiple_of(cfg.eval_every)) {
            let val = trainer.evaluate()?;
            record.val_loss = Some(val);
            outcome.val_losses.push((done, val));
            say(&bar, progress, &format!("step {done:>6}: train loss {:.4}, val loss {val:.4}", record.loss));
        }
        if let Some(log) = metrics.as_mut() {
            log.write(&record)?;
        }
        bar.set_message(format!("loss {:.4} | lr {:.2e} | {:.0} tok/s", record.loss, record.lr, record.tokens_per_sec));
        bar.inc(1);
        outcome.steps.push(record);
        if let Some(dir) = &cfg.save
            && saves_after(cfg, done)
        {
            if leader {
                trainer.save(dir)?;
            }
            // Every rank knows where the last checkpoint is: the leader saves before its next
            // step, which no rank can finish without it.
            last_checkpoint = Some((dir.clone(), done));
        }
    }
    bar.finish_and_clear();
    Ok(outcome)
}
// ANCHOR_END: drive
