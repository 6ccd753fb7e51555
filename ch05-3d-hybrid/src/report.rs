//! Chapter 5's run report: chapter 1's [`RunReport`] with one rank per grid point, each at its
//! `dp`, `tp` and `pp` coordinates, with the traffic of its three groups, and the pipeline's
//! figures (schedule, bubble).

use crate::{HybridConfig, HybridReport};
use ch01_single_gpu::report::{RankReport, RunReport};
use clap::ValueEnum;
use serde_json::json;

impl HybridReport {
    /// The run as `--report` writes it. Beyond chapter 1's fields: `dp`, `tp`, `pp`,
    /// `microbatches`, `schedule`, `virtual_stages` and the bubble; per rank, its coordinates,
    /// `comm.tp`, `comm.pp`, `comm.dp`, and its blocks.
    pub fn run_report(&self, cfg: &HybridConfig) -> RunReport {
        let ranks: Vec<RankReport> = self
            .ranks
            .iter()
            .map(|r| {
                let mut rank = RankReport::new(r.rank, r.memory.clone());
                for (axis, at) in [("dp", r.coords.dp), ("tp", r.coords.tp), ("pp", r.coords.pp)] {
                    rank.grid.insert(axis.into(), at);
                }
                rank.comm.insert("tp".into(), r.tensor_comm.clone());
                rank.comm.insert("pp".into(), r.pipe_comm.clone());
                rank.comm.insert("dp".into(), r.data_comm.clone());
                let blocks: Vec<[usize; 2]> = r.blocks.iter().map(|b| [b.start, b.end]).collect();
                rank.extra.insert("blocks".into(), json!(blocks));
                rank.extra.insert("peak_in_flight".into(), json!(r.peak_in_flight));
                rank
            })
            .collect();
        let mut report = RunReport::from_train_report("ch05-3d-hybrid", &cfg.pipeline.train, &self.report, ranks);
        let p = &cfg.pipeline;
        for (key, value) in [
            ("dp", json!(self.grid.dp)),
            ("tp", json!(self.grid.tp)),
            ("pp", json!(self.grid.pp)),
            ("microbatches", json!(p.microbatches)),
            ("schedule", json!(p.schedule.to_possible_value().map(|v| v.get_name().to_string()))),
            ("virtual_stages", json!(p.virtual_stages)),
            ("bubble_fraction", json!(self.plan.bubble)),
            ("bubble_fraction_estimated", json!(self.plan.bubble_estimated)),
            ("bubble_fraction_measured", json!(self.measured_bubble)),
        ] {
            report.extra.insert(key.into(), value);
        }
        report
    }
}
