//! What recomputation costs in time, and saves in memory: the same run under each `--recompute`,
//! traced, with the time of its `recompute` spans beside its forwards and steps (a benchmark: it
//! reports times, nothing asserts them). Ratios within one run hold on a busy machine, where
//! times from separate runs do not.
//!
//!     cargo run --release -p ch06-zero-checkpointing --example recompute_cost [-- STEPS [DP]]

use ch01_single_gpu::TrainConfig;
use ch06_zero_checkpointing::{Recompute, ZeroConfig, train};
use kernels::Category;
use kernels::memory::format_bytes;

/// Total microseconds of the trace's spans called `name`, in training steps.
fn total(events: &[serde_json::Value], name: &str) -> f64 {
    events.iter().filter(|e| e["name"] == name).filter_map(|e| e["dur"].as_f64()).sum::<f64>().max(0.0)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let dp: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let dir = tempfile::tempdir()?;
    let trace = dir.path().join("trace.json");
    let train_cfg = TrainConfig {
        steps,
        eval_every: 0,
        val_batches: 1,
        sample_tokens: 0,
        progress: false,
        trace: Some(trace.clone()),
        ..TrainConfig::default()
    };
    println!(
        "| --recompute | activations per rank | forward | backward | of which recompute | recompute / (step - recompute) |"
    );
    println!("|---|---|---|---|---|---|");
    for mode in [Recompute::None, Recompute::Selective, Recompute::Full] {
        let report = train(&ZeroConfig { train: train_cfg.clone(), dp, zero: 1, recompute: mode })?;
        let acts = report.ranks[0].memory.peak[&Category::Activations];
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace)?)?;
        let events = json["traceEvents"].as_array().cloned().unwrap_or_default();
        let ms = |name| total(&events, name) / 1e3 / (steps as f64 * dp as f64); // per step and rank
        let (forward, backward, recompute, step) = (ms("forward"), ms("backward"), ms("recompute"), ms("step"));
        println!(
            "| {mode} | {} | {forward:.0} ms | {backward:.0} ms | {recompute:.0} ms | {:.0}% |",
            format_bytes(acts),
            100.0 * recompute / (step - recompute)
        );
    }
    Ok(())
}
