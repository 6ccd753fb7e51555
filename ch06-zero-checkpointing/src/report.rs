//! Chapter 6's run report: chapter 1's [`RunReport`] with one rank per data-parallel rank, and
//! beside each rank's ledger the formula's prediction and what one training step moved.

use crate::{ZeroConfig, ZeroReport};
use ch01_single_gpu::report::{RankReport, RunReport};
use serde_json::json;

impl ZeroReport {
    /// The run as `--report` writes it. Beyond chapter 1's fields: `dp`, `zero`, `recompute`,
    /// the activation formula; per rank, the predicted peak of each category (named terms) and
    /// the bytes of the last training step by collective (`step_comm`).
    pub fn run_report(&self, cfg: &ZeroConfig) -> RunReport {
        let ranks = self
            .ranks
            .iter()
            .map(|r| {
                let mut rank = RankReport::new(r.rank, r.memory.clone());
                rank.grid.insert("dp".into(), r.dp_rank);
                rank.comm.insert("dp".into(), r.comm.clone());
                if self.tp > 1 {
                    rank.grid.insert("tp".into(), r.tp_rank);
                    rank.comm.insert("tp".into(), r.tp_comm.clone());
                }
                rank.extra.insert("step_comm".into(), json!(r.step_comm));
                rank.extra.insert("predicted_memory".into(), json!(r.predicted));
                rank
            })
            .collect();
        let mut report = RunReport::from_train_report("ch06-zero-checkpointing", &cfg.train, &self.report, ranks);
        report.extra.insert("dp".into(), json!(self.dp));
        report.extra.insert("tp".into(), json!(self.tp));
        report.extra.insert("zero".into(), json!(self.zero.number()));
        report.extra.insert("recompute".into(), json!(self.recompute));
        report.extra.insert("activation_floats_per_token".into(), json!(self.activations));
        report.extra.insert("tokens_per_rank".into(), json!(self.tokens_per_rank));
        report
    }
}
