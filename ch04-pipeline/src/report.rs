//! Chapter 4's run report: chapter 1's [`RunReport`] with one rank per stage of every pipe, each
//! at its `pp` and `dp` coordinates, with its pipeline and data-parallel traffic as two groups,
//! and the pipeline's own figures (schedule, bubble, the stages' blocks).

use crate::{PipelineConfig, PipelineReport};
use ch01_single_gpu::report::{RankReport, RunReport};
use clap::ValueEnum;
use serde_json::json;

impl PipelineReport {
    /// The run as `--report` writes it. Beyond chapter 1's fields: `pp`, `microbatches`,
    /// `schedule`, `virtual_stages`, the bubble simulated, estimated and (when traced) measured;
    /// per rank, its blocks, its share of the estimated work and the micro-batches it held.
    pub fn run_report(&self, cfg: &PipelineConfig) -> RunReport {
        let mut ranks: Vec<RankReport> = self
            .stages
            .iter()
            .chain(&self.replicas)
            .map(|s| {
                // Stage s of pipe d is world rank d + dp·s (see `run_stage`).
                let mut rank = RankReport::new(s.replica + cfg.dp * s.stage, s.memory.clone());
                rank.grid.insert("pp".into(), s.stage);
                rank.grid.insert("dp".into(), s.replica);
                rank.comm.insert("pp".into(), s.comm.clone());
                rank.comm.insert("dp".into(), s.dp_comm.clone());
                let blocks: Vec<[usize; 2]> = s.blocks.iter().map(|b| [b.start, b.end]).collect();
                rank.extra.insert("blocks".into(), json!(blocks));
                rank.extra.insert("estimated_share".into(), json!(self.estimated_shares.get(s.stage)));
                rank.extra.insert("peak_in_flight".into(), json!(s.peak_in_flight));
                rank
            })
            .collect();
        ranks.sort_by_key(|r| r.rank);
        let mut report = RunReport::from_train_report("ch04-pipeline", &cfg.train, &self.report, ranks);
        for (key, value) in [
            ("pp", json!(self.pp)),
            ("dp", json!(cfg.dp)),
            ("microbatches", json!(self.microbatches)),
            ("schedule", json!(self.schedule.to_possible_value().map(|v| v.get_name().to_string()))),
            ("virtual_stages", json!(self.virtual_stages)),
            ("bubble_fraction", json!(self.bubble)),
            ("bubble_fraction_estimated", json!(self.bubble_estimated)),
            ("bubble_fraction_measured", json!(self.measured_bubble)),
        ] {
            report.extra.insert(key.into(), value);
        }
        report
    }
}
