//! The learning rate at each step.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Linear warmup, then cosine decay towards 10% of the peak (reached at step `total`, just
    /// past the last step).
    Cosine,
    /// The peak rate at every step: no warmup, no decay.
    Constant,
}

/// The fraction of the peak that cosine decay ends at.
pub const MIN_LR_FRACTION: f32 = 0.1;

// ANCHOR: learning_rate
/// Learning rate for `step` (0-based) of `total` steps.
///   warmup:  lr · (step + 1) / warmup                          for step < warmup
///   decay:   min + (lr - min) · (1 + cos(pi · progress)) / 2,  progress = (step - warmup) / (total - warmup)
pub fn learning_rate(schedule: LrSchedule, lr: f32, step: u64, total: u64, warmup: u64) -> f32 {
    match schedule {
        LrSchedule::Constant => lr,
        LrSchedule::Cosine => {
            if step < warmup {
                return lr * (step + 1) as f32 / warmup as f32;
            }
            let min = lr * MIN_LR_FRACTION;
            let decay_steps = total.saturating_sub(warmup).max(1);
            let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
            min + (lr - min) * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
        }
    }
}
// ANCHOR_END: learning_rate

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_ten_percent() {
        let lr = |s| learning_rate(LrSchedule::Cosine, 1.0, s, 110, 10);
        assert!((lr(0) - 0.1).abs() < 1e-7);
        assert_eq!(lr(9), 1.0);
        assert_eq!(lr(10), 1.0);
        assert!((lr(60) - 0.55).abs() < 1e-6);
        assert!((lr(110) - 0.1).abs() < 1e-6);
        assert_eq!(learning_rate(LrSchedule::Constant, 0.3, 5, 10, 3), 0.3);
    }
}
