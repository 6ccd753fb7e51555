//! The planner's memory per rank against the ledgers of real runs: for the layouts chapter 6's
//! CPU tests train (f32, every ZeRO stage on 2 and 4 ranks, every recompute mode, 3 ranks with
//! padding), the planner's prediction of each rank's peak, category by category, is the ledger's
//! to the byte.

use ch01_single_gpu::TrainConfig;
use ch06_zero_checkpointing::plan::inputs::{Assumptions, gpu};
use ch06_zero_checkpointing::plan::memory::{Sizes, stage_memory};
use ch06_zero_checkpointing::plan::{Layout, Problem};
use ch06_zero_checkpointing::{Recompute, ZeroConfig};
use kernels::Category;
use scale_tests::tiny_config;

// ANCHOR: ledger
#[test]
fn the_planners_memory_per_rank_and_category_is_the_ledgers_for_chapter_6s_runs() {
    let cfg = TrainConfig { batch_size: 8, ..tiny_config(1) };
    let mut runs = Vec::new();
    for dp in [2, 4] {
        for zero in 0..=3 {
            runs.push((cfg.clone(), dp, zero, Recompute::None));
        }
    }
    for recompute in [Recompute::Selective, Recompute::Full] {
        runs.push((cfg.clone(), 2, 1, recompute));
        runs.push((cfg.clone(), 4, 3, recompute));
    }
    let padded = TrainConfig { batch_size: 6, grad_accum: 2, ..cfg.clone() };
    for zero in 1..=3 {
        runs.push((padded.clone(), 3, zero, Recompute::None));
    }
    for (train, dp, zero, recompute) in runs {
        let run = ch06_zero_checkpointing::train(&ZeroConfig { train: train.clone(), dp, zero, recompute }).unwrap();
        let problem = Problem {
            model: run.report.model.clone(),
            seq: run.seq_len,
            global_batch: train.batch_size * train.grad_accum,
            gpu: gpu("a100-80gb").unwrap(),
            assumptions: Assumptions::DEFAULT,
            sizes: Sizes::F32,
        };
        let layout =
            Layout { dp, tp: 1, pp: 1, microbatch_size: train.batch_size / dp, chunks: 1, zero: run.zero, recompute };
        for rank in &run.ranks {
            let planned = stage_memory(&problem, &layout, 0, 1, rank.rank);
            let ledger = |c: Category| rank.memory.peak.get(&c).copied().unwrap_or(0) as f64;
            let what = format!("dp {dp}, zero {zero}, recompute {recompute}, rank {}", rank.rank);
            assert_eq!(planned.parameters, ledger(Category::Parameters), "{what}: parameters");
            assert_eq!(planned.gradients, ledger(Category::Gradients), "{what}: gradients");
            assert_eq!(planned.optimizer_state, ledger(Category::OptimizerState), "{what}: optimizer state");
            assert_eq!(planned.communication, ledger(Category::Communication), "{what}: communication");
            assert_eq!(planned.scratch, ledger(Category::Other), "{what}: backward's scratch");
            assert_eq!(
                planned.activations + planned.pipeline_in_flight,
                ledger(Category::Activations),
                "{what}: activations"
            );
        }
    }
}
// ANCHOR_END: ledger
