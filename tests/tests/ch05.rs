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
    HybridConfig { pipeline, tp, fault: None, shard_optimizer: false }
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

#[test]
fn micro_batches_interleaving_and_accumulation_match_chapter_1() {
    // Four blocks as two chunks on each of two stages (interleaved), each stage over two tensor
    // ranks; then two pipes of two micro-batches each, accumulating two batches per step.
    let cfg = config();
    let single = ch01(&cfg);
    let interleaved = HybridConfig {
        pipeline: PipelineConfig {
            schedule: ScheduleKind::Interleaved,
            virtual_stages: 2,
            ..hybrid_config(&cfg, (1, 2, 2), 2).pipeline
        },
        ..hybrid_config(&cfg, (1, 2, 2), 2)
    };
    let run = hybrid(&interleaved);
    assert_eq!(run.ranks[0].blocks, vec![0..1, 2..3], "stage 0 holds chunks 0 and 2");
    assert_matches(&cfg, &single, &run.report);
    let accumulating = TrainConfig { grad_accum: 2, ..config() };
    let single = ch01(&accumulating);
    assert_matches(&accumulating, &single, &hybrid(&hybrid_config(&accumulating, (2, 2, 2), 2)).report);
}

// ANCHOR: fault_tests
#[test]
fn a_missing_collective_is_caught() {
    let cfg = config();
    let single = ch01(&cfg);
    let caught = |broken: HybridConfig| {
        let run = hybrid(&broken).report;
        let caught = std::panic::catch_unwind(|| assert_matches(&cfg, &single, &run));
        caught.err().and_then(|e| e.downcast_ref::<String>().cloned()).unwrap_or_default()
    };
    // The tied embedding's two gradients not summed between the first and the last stage: each
    // tensor rank's pair would have to do it.
    let mut no_tied_sum = hybrid_config(&cfg, (1, 2, 2), 2);
    no_tied_sum.pipeline.skip_tied_sum = true;
    // The first step's loss comes before any update and agrees; a later one feels the wrong
    // gradient of wte (by about 1e-3: a curve that still looks plausible).
    let message = caught(no_tied_sum);
    assert!(message.starts_with("loss[") && !message.starts_with("loss[0]"), "not caught: {message:?}");
    // The tensor group's sum of the branch inputs' gradients left out, inside every stage: the
    // forward is right, so the first loss agrees, and the first update is wrong.
    let no_input_grad_sum = HybridConfig { fault: Some(Fault::SkipInputGradSum), ..hybrid_config(&cfg, (2, 2, 2), 1) };
    let message = caught(no_input_grad_sum);
    assert!(message.starts_with("loss[1]"), "not caught where expected: {message:?}");
}
// ANCHOR_END: fault_tests

// ANCHOR: theory_tests
#[test]
fn each_group_sends_what_its_formula_says() {
    use ch05_3d_hybrid::cost::*;
    use kernels::comm::Collective;
    let cfg = TrainConfig { eval_every: 0, val_batches: 1, ..config() };
    for (grid, m, v) in [((2, 2, 2), 1, 1), ((1, 2, 2), 2, 2)] {
        let mut hc = hybrid_config(&cfg, grid, m);
        if v > 1 {
            hc.pipeline.schedule = ScheduleKind::Interleaved;
            hc.pipeline.virtual_stages = v;
        }
        let r = hybrid(&hc);
        let (steps, evaluations) = (r.report.steps.len() as u64, r.report.val_losses.len() as u64);
        assert_eq!((steps, evaluations), (3, 1));
        for rank in &r.ranks {
            let s = rank;
            let tensor = steps * tensor_bytes_per_step(&r, s) + evaluations * tensor_bytes_per_evaluation(&r, s, 1);
            assert_eq!(s.tensor_comm.total_sent(), tensor, "{grid:?}: rank {} in its tensor group", rank.rank);
            let pipe = steps * pipeline_bytes_per_step(&r, s) + evaluations * pipeline_bytes_per_evaluation(&r, s, 1);
            assert_eq!(s.pipe_comm.sent[&Collective::SendRecv], pipe, "{grid:?}: rank {} to its pipe", rank.rank);
            // The gradients, and a few floats more (the loss, averaged over the replicas).
            let data = steps * data_bytes_per_step(&r, s);
            let sent = s.data_comm.total_sent();
            assert!(
                sent >= data && sent <= data + 64,
                "{grid:?}: rank {} sent {sent} to its replicas, {data} by the formula",
                rank.rank
            );
        }
    }
}
// ANCHOR_END: theory_tests

#[test]
fn replicas_and_the_tied_copies_end_bit_identical() {
    let cfg = config();
    let r = hybrid(&hybrid_config(&cfg, (2, 2, 2), 2));
    let at = |dp, tp, pp| {
        let rank = r.ranks.iter().position(|x| (x.coords.dp, x.coords.tp, x.coords.pp) == (dp, tp, pp)).unwrap();
        &r.stages[rank]
    };
    let wte = |s: &ch04_pipeline::StageReport| {
        let spec = s.layout.get("wte.weight").unwrap();
        s.params[spec.range()].to_vec()
    };
    for tp in 0..2 {
        // Stage 0 and stage 1 of one pipe hold the same vocabulary rows of the tied embedding.
        assert!(wte(at(0, tp, 0)) == wte(at(0, tp, 1)), "tensor rank {tp}: the tied copies differ");
        for pp in 0..2 {
            assert!(at(0, tp, pp).params == at(1, tp, pp).params, "tp {tp}, pp {pp}: replicas differ");
        }
    }
    assert!(wte(at(0, 0, 0)) != wte(at(0, 1, 0)), "the tensor ranks hold different rows");
}

// ANCHOR: checkpoint_test
#[test]
fn checkpoints_are_layout_independent() {
    // Two steps saved by one grid, resumed up to four by another and by chapter 1; the
    // reference: chapter 1 saving and resuming itself (a constant rate lets a run be extended).
    let dir = tempfile::tempdir().unwrap();
    let (ch01_ckpt, grid_ckpt) = (dir.path().join("ch01"), dir.path().join("grid"));
    let four = TrainConfig { lr_schedule: ch01_single_gpu::schedule::LrSchedule::Constant, steps: 4, ..config() };
    let two = TrainConfig { steps: 2, ..four.clone() };
    ch01(&TrainConfig { save: Some(ch01_ckpt.clone()), ..two.clone() });
    let reference = ch01(&TrainConfig { resume: Some(ch01_ckpt.clone()), ..four.clone() });
    hybrid(&hybrid_config(&TrainConfig { save: Some(grid_ckpt.clone()), ..two }, (2, 2, 2), 1));
    let from_grid = ch01(&TrainConfig { resume: Some(grid_ckpt.clone()), ..four.clone() });
    assert_matches(&four, &reference, &from_grid);
    // The case: saved by dp 2 x tp 2 x pp 2, resumed by tp 4 x pp 2 (and by 1 x 2 x 2).
    for (grid, m) in [((1, 4, 2), 1), ((1, 2, 2), 2)] {
        let resume = TrainConfig { resume: Some(grid_ckpt.clone()), ..four.clone() };
        let resumed = hybrid(&hybrid_config(&resume, grid, m));
        assert_eq!(resumed.report.steps.first().map(|s| s.step), Some(3));
        assert_matches(&four, &reference, &resumed.report);
    }
}
// ANCHOR_END: checkpoint_test
