//! The planner's memory per rank against the ledgers of real runs: for layouts the CPU test
//! suites of chapters 2 to 6 train (f32), the planner's prediction of each rank's peak,
//! category by category, is the ledger's to the byte.

use ch01_single_gpu::TrainConfig;
use ch01_single_gpu::config::ModelConfig;
use ch02_data_parallel::DpConfig;
use ch03_tensor_parallel::TpConfig;
use ch04_pipeline::schedule::ScheduleKind;
use ch04_pipeline::stage::Partition;
use ch04_pipeline::train::PipelineConfig;
use ch05_3d_hybrid::HybridConfig;
use ch06_zero_checkpointing::plan::inputs::{Assumptions, gpu};
use ch06_zero_checkpointing::plan::memory::{Memory, Sizes, in_flight, schedule, stage_memory};
use ch06_zero_checkpointing::plan::{Layout, Problem};
use ch06_zero_checkpointing::zero::ZeroStage;
use ch06_zero_checkpointing::{Recompute, ZeroConfig};
use kernels::Category;
use kernels::memory::MemoryReport;
use scale_tests::tiny_config;

fn problem(model: &ModelConfig, train: &TrainConfig) -> Problem {
    Problem {
        model: model.clone(),
        seq: train.seq_len.unwrap(),
        global_batch: train.batch_size * train.grad_accum,
        gpu: gpu("a100-80gb").unwrap(),
        assumptions: Assumptions::DEFAULT,
        sizes: Sizes::F32,
    }
}

fn layout(dp: usize, tp: usize, pp: usize, microbatch_size: usize) -> Layout {
    Layout { dp, tp, pp, microbatch_size, chunks: 1, zero: ZeroStage::NONE, recompute: Recompute::None }
}

/// Each category of `planned` against the ledger's peak. Chapters 2-4 keep a copy of the
/// gradients for their data-parallel all-reduce (`GradSync`'s buckets; chapter 6 reduces in
/// place, and the planner prices chapter 6): `dp_copy` leaves communication out for them.
fn assert_ledger(what: &str, planned: &Memory, ledger: &MemoryReport, dp_copy: bool) {
    let peak = |c: Category| ledger.peak.get(&c).copied().unwrap_or(0) as f64;
    assert_eq!(planned.parameters, peak(Category::Parameters), "{what}: parameters");
    assert_eq!(planned.gradients, peak(Category::Gradients), "{what}: gradients");
    assert_eq!(planned.optimizer_state, peak(Category::OptimizerState), "{what}: optimizer state");
    assert_eq!(planned.activations + planned.pipeline_in_flight, peak(Category::Activations), "{what}: activations");
    assert_eq!(planned.scratch, peak(Category::Other), "{what}: backward's scratch");
    if dp_copy {
        assert_eq!(peak(Category::Communication), planned.gradients, "{what}: the all-reduce's copy");
    } else {
        assert_eq!(planned.communication, peak(Category::Communication), "{what}: communication");
    }
}

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
        let p = problem(&run.report.model, &train);
        let l = Layout { zero: run.zero, recompute, ..layout(dp, 1, 1, train.batch_size / dp) };
        for rank in &run.ranks {
            let what = format!("ch06 dp {dp}, zero {zero}, recompute {recompute}, rank {}", rank.rank);
            assert_ledger(&what, &stage_memory(&p, &l, 0, 1, rank.rank), &rank.memory, false);
        }
    }
}
// ANCHOR_END: ledger

#[test]
fn the_planners_memory_per_rank_and_category_is_the_ledgers_for_chapters_2_3_and_4() {
    let cfg = TrainConfig { batch_size: 8, ..tiny_config(1) };
    let dp = ch02_data_parallel::train(&DpConfig { train: cfg.clone(), dp: Some(2), bucket_mb: 0.0, timeline: None })
        .unwrap();
    let p = problem(&dp.report.model, &cfg);
    for rank in &dp.ranks {
        assert_ledger("ch02 dp 2", &stage_memory(&p, &layout(2, 1, 1, 4), 0, 1, 0), &rank.memory, true);
    }
    for (tp, dp) in [(2, 1), (4, 1), (2, 2)] {
        let run = ch03_tensor_parallel::train(&TpConfig {
            train: cfg.clone(),
            tp,
            dp,
            sequence_parallel: false,
            fault: None,
        })
        .unwrap();
        for rank in &run.ranks {
            let planned = stage_memory(&p, &layout(dp, tp, 1, 8 / dp), 0, 1, 0);
            assert_ledger(&format!("ch03 tp {tp} dp {dp}, rank {}", rank.rank), &planned, &rank.memory, dp > 1);
        }
    }
    let four_blocks = TrainConfig { n_layer: Some(4), ..cfg.clone() };
    for (pp, microbatches, chunks, dp) in [(2, 4, 1, 1), (4, 4, 1, 1), (2, 4, 2, 1), (2, 4, 1, 2)] {
        let run = ch04_pipeline::train(&PipelineConfig {
            train: four_blocks.clone(),
            pp,
            microbatches,
            dp,
            schedule: if chunks > 1 { ScheduleKind::Interleaved } else { ScheduleKind::OneFOneB },
            virtual_stages: chunks,
            partition: Partition::Uniform,
            timeline: None,
            skip_tied_sum: false,
        })
        .unwrap();
        let p = problem(&run.report.model, &four_blocks);
        let l = Layout { chunks, ..layout(dp, 1, pp, 8 / dp / microbatches) };
        let sched = schedule(&l, microbatches);
        for stage in &run.stages {
            let planned = stage_memory(&p, &l, stage.stage, in_flight(&sched, stage.stage), 0);
            let what = format!("ch04 pp {pp}, m {microbatches}, chunks {chunks}, dp {dp}, stage {}", stage.stage);
            assert_ledger(&what, &planned, &stage.memory, dp > 1);
        }
    }
}

#[test]
fn the_planners_memory_per_rank_and_category_is_the_ledgers_for_chapter_5s_grids() {
    let cfg = TrainConfig { batch_size: 8, n_layer: Some(4), ..tiny_config(1) };
    for (dp, tp, pp, microbatches) in [(1, 2, 2, 2), (2, 2, 2, 2), (1, 2, 4, 4)] {
        let pipeline = PipelineConfig {
            train: cfg.clone(),
            pp,
            microbatches,
            dp,
            schedule: ScheduleKind::OneFOneB,
            virtual_stages: 1,
            partition: Partition::Uniform,
            timeline: None,
            skip_tied_sum: false,
        };
        let run = ch05_3d_hybrid::train(&HybridConfig { pipeline, tp, fault: None, shard_optimizer: false }).unwrap();
        let p = problem(&run.report.model, &cfg);
        let l = layout(dp, tp, pp, 8 / dp / microbatches);
        let sched = schedule(&l, microbatches);
        for rank in &run.ranks {
            let s = rank.coords.pp;
            let planned = stage_memory(&p, &l, s, in_flight(&sched, s), 0);
            let what = format!("ch05 dp {dp} tp {tp} pp {pp}, m {microbatches}, rank {}", rank.rank);
            assert_ledger(&what, &planned, &rank.memory, dp > 1);
        }
    }
}
