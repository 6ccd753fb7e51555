//! Chapter 3's run report: chapter 1's [`RunReport`] with one rank per thread rank, each at its
//! `tp` and `dp` coordinates, with its tensor-parallel and data-parallel traffic as two groups.

use crate::{TpConfig, TpReport};
use ch01_single_gpu::report::{RankReport, RunReport};
use serde_json::json;

impl TpReport {
    /// The run as `--report` writes it. Beyond chapter 1's fields: `tp`, `dp`, the bytes each rank
    /// sends per step by the formula; per rank, the bytes it sent in training steps.
    pub fn run_report(&self, cfg: &TpConfig) -> RunReport {
        let ranks = self
            .ranks
            .iter()
            .map(|r| {
                let mut rank = RankReport::new(r.rank, r.memory.clone());
                rank.grid.insert("tp".into(), r.tp_rank);
                rank.grid.insert("dp".into(), r.dp_rank);
                rank.comm.insert("tp".into(), r.comm.clone());
                rank.comm.insert("dp".into(), r.dp_comm.clone());
                rank.extra.insert("sent_in_steps".into(), json!(r.sent_in_steps));
                rank
            })
            .collect();
        let mut report = RunReport::from_train_report("ch03-tensor-parallel", &cfg.train, &self.report, ranks);
        report.extra.insert("tp".into(), json!(self.tp));
        report.extra.insert("dp".into(), json!(self.dp));
        report.extra.insert("sequence_parallel".into(), json!(self.sequence_parallel));
        report.extra.insert("bytes_sent_per_step".into(), json!(self.bytes_sent_per_step()));
        report
    }
}
