//! Chapter 5's claims: the three dimensions at once compute what chapter 1 computes, on every
//! grid of up to 8 thread ranks with dp, tp, pp in {1, 2}.
//!
//! Tolerance: relative 1e-5, as chapters 3 and 4. The tensor group splits each matmul's sum over
//! heads and units across ranks and adds the pieces, the micro-batches add a gradient's rows in
//! turn, and the norm is summed per tensor rank and per stage: the same sums in other orders.
//! The parameters' tolerance is chapter 3's 2e-5 of the update, for chapter 3's reason (the key
//! bias of `c_attn`, whose gradient is rounding noise that AdamW amplifies: see tests/ch03.rs).
const RTOL: f32 = 1e-5;
const PARAMS_RTOL: f32 = 2e-5;

use ch01_single_gpu::{TrainConfig, TrainReport};
use ch03_tensor_parallel::tp_comm::Fault;
use ch04_pipeline::PipelineConfig;
use ch04_pipeline::schedule::ScheduleKind;
use ch04_pipeline::stage::Partition;
use ch05_3d_hybrid::{HybridConfig, HybridReport};
use scale_tests::{assert_close, assert_matches_ch01, tiny_config};

fn ch01(cfg: &TrainConfig) -> TrainReport {
    ch01_single_gpu::train(cfg).unwrap()
}

fn hybrid_config(cfg: &TrainConfig, (dp, tp, pp): (usize, usize, usize), microbatches: usize) -> HybridConfig {
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
    HybridConfig { pipeline, tp, fault: None }
}

fn hybrid(cfg: &HybridConfig) -> HybridReport {
    ch05_3d_hybrid::train(cfg).unwrap()
}

/// Chapter 3's check: the losses and norms within 1e-5, the parameters within 2e-5 of the update.
fn assert_matches(cfg: &TrainConfig, single: &TrainReport, run: &TrainReport) {
    assert_matches_ch01(cfg, single, run, PARAMS_RTOL);
    assert_close("loss", &single.losses(), &run.losses(), RTOL);
    let norms = |r: &TrainReport| r.steps.iter().map(|s| s.grad_norm).collect::<Vec<f32>>();
    assert_close("grad norm", &norms(single), &norms(run), RTOL);
}

/// The tiny model with four blocks, three steps, evaluated at the end.
fn config() -> TrainConfig {
    TrainConfig { n_layer: Some(4), eval_every: 3, ..tiny_config(3) }
}

// ANCHOR: equivalence_tests
#[test]
fn every_grid_of_up_to_8_ranks_matches_chapter_1() {
    let cfg = config();
    let single = ch01(&cfg);
    for dp in [1, 2] {
        for tp in [1, 2] {
            for pp in [1, 2] {
                eprintln!("dp {dp} x tp {tp} x pp {pp}");
                let run = hybrid(&hybrid_config(&cfg, (dp, tp, pp), 1));
                assert_matches(&cfg, &single, &run.report);
            }
        }
    }
}
// ANCHOR_END: equivalence_tests
