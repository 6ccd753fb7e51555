//! Chapter 2's run report: chapter 1's [`RunReport`] with one rank per data-parallel replica,
//! each on the `"dp"` axis of the grid and the `"dp"` communicator group.

use crate::{DpConfig, DpReport};
use ch01_single_gpu::report::{RankReport, RunReport};
use serde_json::json;

impl DpReport {
    /// The run as `--report` writes it. Beyond chapter 1's fields: `dp`, `bucket_mb`, the bytes
    /// of the gradient buffer all-reduced each step, the fraction of that communication hidden
    /// by backward; and per rank, the seconds its all-reduces took and the seconds it waited.
    pub fn run_report(&self, cfg: &DpConfig) -> RunReport {
        let ranks = self
            .ranks
            .iter()
            .map(|r| {
                let mut rank = RankReport::new(r.rank, r.memory.clone());
                rank.grid.insert("dp".into(), r.rank);
                rank.comm.insert("dp".into(), r.comm.clone());
                rank.extra.insert("comm_seconds".into(), json!(r.comm_seconds));
                rank.extra.insert("exposed_comm_seconds".into(), json!(r.exposed_seconds));
                rank
            })
            .collect();
        let mut report = RunReport::from_train_report("ch02-data-parallel", &cfg.train, &self.report, ranks);
        report.extra.insert("dp".into(), json!(self.dp));
        report.extra.insert("bucket_mb".into(), json!(cfg.bucket_mb));
        report.extra.insert("gradient_bytes".into(), json!(self.grad_bytes));
        report.extra.insert("hidden_fraction".into(), json!(self.hidden_fraction()));
        report
    }
}
