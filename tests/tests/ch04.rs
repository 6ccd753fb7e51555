//! Chapter 4's claims: a pipeline computes what chapter 1 computes, in every schedule.
//!
//! Tolerance: with one stage and one micro-batch the stage runs chapter 1's operations on the
//! same buffers, so the run is bit for bit chapter 1's. With more micro-batches, a parameter's
//! gradient is summed over the micro-batches in turn rather than over the whole batch in one
//! matmul, and the squared norm is summed per stage: the same sums in another order, within
//! float rounding (relative 1e-5). More stages alone change no sum but the tied embedding's
//! (its two shares are added once, in the same order chapter 1 adds them) and the norm's.

use ch01_single_gpu::{TrainConfig, TrainReport};
use ch04_pipeline::schedule::{ScheduleKind, peak_in_flight};
use ch04_pipeline::stage::Partition;
use ch04_pipeline::{PipelineConfig, PipelineReport, Schedule};
use kernels::Category;
use kernels::comm::Collective;
use scale_tests::{assert_matches_ch01, tiny_config};

fn ch01(cfg: &TrainConfig) -> TrainReport {
    ch01_single_gpu::train(cfg).unwrap()
}

fn pipeline_config(cfg: &TrainConfig, pp: usize, microbatches: usize, schedule: ScheduleKind) -> PipelineConfig {
    PipelineConfig {
        train: cfg.clone(),
        pp,
        microbatches,
        dp: 1,
        schedule,
        virtual_stages: 1,
        partition: Partition::Uniform,
        timeline: None,
        skip_tied_sum: false,
    }
}

fn pipeline(cfg: &TrainConfig, pp: usize, microbatches: usize, schedule: ScheduleKind) -> PipelineReport {
    ch04_pipeline::train(&pipeline_config(cfg, pp, microbatches, schedule)).unwrap()
}

/// The tiny model with four blocks (so that four stages have one each), evaluated mid-run and
/// at the end.
fn config() -> TrainConfig {
    TrainConfig { n_layer: Some(4), eval_every: 2, ..tiny_config(4) }
}

const SCHEDULES: [ScheduleKind; 2] = [ScheduleKind::Gpipe, ScheduleKind::OneFOneB];

// ANCHOR: equivalence_tests
#[test]
fn one_stage_one_micro_batch_is_chapter_1_bit_for_bit() {
    let cfg = config();
    let single = ch01(&cfg);
    for schedule in SCHEDULES.into_iter().chain([ScheduleKind::ZbH1]) {
        let run = pipeline(&cfg, 1, 1, schedule).report;
        assert_eq!(single.losses(), run.losses(), "{schedule}");
        assert_eq!(single.val_losses, run.val_losses, "{schedule}");
        assert!(single.steps.iter().zip(&run.steps).all(|(a, b)| a.grad_norm == b.grad_norm), "{schedule}");
        assert!(single.params == run.params, "{schedule}: parameters differ");
    }
}

#[test]
fn every_schedule_stage_count_and_micro_batch_count_matches_chapter_1() {
    let cfg = config();
    let single = ch01(&cfg);
    for schedule in SCHEDULES {
        for pp in [1, 2, 4] {
            for m in [1, 2, 4] {
                eprintln!("{schedule}, pp {pp}, {m} micro-batches");
                assert_matches_ch01(&cfg, &single, &pipeline(&cfg, pp, m, schedule).report, 1e-5);
            }
        }
    }
}

// ANCHOR: zb_h1_equivalence
#[test]
fn zb_h1_is_1f1b_bit_for_bit_and_so_chapter_1() {
    // The split backward computes each gradient with the fused one's operations, and zb-h1
    // runs its W's in 1F1B's micro-batch order: every sum is 1F1B's, in 1F1B's order.
    let cfg = config();
    let single = ch01(&cfg);
    for (pp, m, dp) in [(2, 1, 1), (2, 4, 1), (4, 2, 1), (4, 4, 1), (2, 2, 2)] {
        eprintln!("zb-h1, pp {pp}, {m} micro-batches, dp {dp}");
        let run = |schedule| ch04_pipeline::train(&PipelineConfig { dp, ..pipeline_config(&cfg, pp, m, schedule) });
        let (zb, one_f_one_b) = (run(ScheduleKind::ZbH1).unwrap().report, run(ScheduleKind::OneFOneB).unwrap().report);
        assert_matches_ch01(&cfg, &single, &zb, 1e-5);
        assert_eq!(zb.losses(), one_f_one_b.losses(), "pp {pp} m {m} dp {dp}");
        assert!(zb.steps.iter().zip(&one_f_one_b.steps).all(|(a, b)| a.grad_norm == b.grad_norm));
        assert!(zb.params == one_f_one_b.params, "pp {pp} m {m} dp {dp}: parameters differ from 1F1B's");
    }
}
// ANCHOR_END: zb_h1_equivalence

#[test]
fn an_uneven_partition_and_accumulation_match_chapter_1() {
    // Four blocks on three stages (2, 1, 1), and two batches per step: eight micro-batches.
    let cfg = TrainConfig { grad_accum: 2, ..config() };
    let single = ch01(&cfg);
    let run = pipeline(&cfg, 3, 4, ScheduleKind::OneFOneB);
    assert_eq!(
        run.stages.iter().map(|s| s.blocks.clone()).collect::<Vec<_>>(),
        vec![vec![0..2], vec![2..3], vec![3..4]]
    );
    assert_matches_ch01(&cfg, &single, &run.report, 1e-5);
}

#[test]
fn the_interleaved_schedule_matches_chapter_1() {
    // Two chunks per stage: with four blocks on two stages, stage 0 holds blocks 0 and 2, stage 1
    // blocks 1 and 3, and a micro-batch crosses from stage 1 back to stage 0 in the middle. One
    // stage with two chunks sends to itself.
    let cfg = config();
    let single = ch01(&cfg);
    for (pp, m) in [(2, 2), (2, 4), (1, 2)] {
        eprintln!("interleaved, pp {pp}, 2 chunks, {m} micro-batches");
        let interleaved =
            PipelineConfig { virtual_stages: 2, ..pipeline_config(&cfg, pp, m, ScheduleKind::Interleaved) };
        let run = ch04_pipeline::train(&interleaved).unwrap();
        if pp == 2 {
            assert_eq!(run.stages[0].blocks, vec![0..1, 2..3]);
        }
        assert_matches_ch01(&cfg, &single, &run.report, 1e-5);
    }
}

#[test]
fn pipelines_side_by_side_match_chapter_1() {
    // Two pipes of two stages: each pipe computes half of every batch, and each stage's two
    // replicas sum their gradients after the flush (chapter 2's sync).
    let cfg = config();
    let single = ch01(&cfg);
    for (schedule, m) in [(ScheduleKind::OneFOneB, 1), (ScheduleKind::Gpipe, 2)] {
        eprintln!("{schedule}, pp 2 x dp 2, {m} micro-batches");
        let run = ch04_pipeline::train(&PipelineConfig { dp: 2, ..pipeline_config(&cfg, 2, m, schedule) }).unwrap();
        assert_matches_ch01(&cfg, &single, &run.report, 1e-5);
        for (first, other) in run.stages.iter().zip(&run.replicas) {
            assert_eq!((first.stage, other.stage, other.replica), (other.stage, first.stage, 1));
            assert!(first.params == other.params, "stage {}: the pipes diverged", first.stage);
            assert!(other.dp_comm.total_sent() > 0, "the replicas' gradients were summed");
        }
    }
}

#[test]
fn a_balanced_partition_matches_chapter_1() {
    // GPT-2's vocabulary makes the head worth about 60 of the tiny model's blocks: the balanced
    // partition leaves the last stage one block. (A slice of the corpus keeps tokenizing quick.)
    let text = ch01_single_gpu::data::SHAKESPEARE[..50_000].to_string();
    let cfg = TrainConfig {
        tokenizer: ch01_single_gpu::tokenizer::TokenizerKind::Gpt2,
        data: ch01_single_gpu::DataSource::Text(text),
        steps: 2,
        val_batches: 1,
        ..config()
    };
    let single = ch01(&cfg);
    let balanced =
        PipelineConfig { partition: Partition::Balanced, ..pipeline_config(&cfg, 2, 2, ScheduleKind::OneFOneB) };
    let run = ch04_pipeline::train(&balanced).unwrap();
    assert_eq!(run.stages.iter().map(|s| s.blocks.clone()).collect::<Vec<_>>(), vec![vec![0..3], vec![3..4]]);
    assert!(run.estimated_shares[1] > 0.9, "the head is most of the work: {:?}", run.estimated_shares);
    assert_matches_ch01(&cfg, &single, &run.report, 1e-5);
}
// ANCHOR_END: equivalence_tests

// ANCHOR: tied_tests
#[test]
fn the_two_copies_of_the_tied_embedding_stay_bit_identical() {
    let run = pipeline(&config(), 4, 2, ScheduleKind::OneFOneB);
    let wte = |s: usize| {
        let stage = &run.stages[s];
        stage.params[stage.layout.get("wte.weight").unwrap().range()].to_vec()
    };
    assert!(wte(0) == wte(3), "the first and last stage's wte differ");
    assert!(run.stages[1].layout.get("wte.weight").is_none(), "a middle stage holds no embedding");
}

#[test]
fn a_missing_tied_gradient_sum_is_caught() {
    let cfg = config();
    let single = ch01(&cfg);
    let broken = PipelineConfig { skip_tied_sum: true, ..pipeline_config(&cfg, 2, 2, ScheduleKind::OneFOneB) };
    let run = ch04_pipeline::train(&broken).unwrap().report;
    let caught = std::panic::catch_unwind(|| assert_matches_ch01(&cfg, &single, &run, 1e-5));
    let message = caught.err().and_then(|e| e.downcast_ref::<String>().cloned()).unwrap_or_default();
    // The first step's loss comes before any update and agrees; the second step's is the first
    // to feel the wrong gradient of wte (by about 1e-5 only: a plausible-looking curve).
    assert!(message.starts_with("loss[1]"), "not caught where expected: {message:?}");
}
// ANCHOR_END: tied_tests

// ANCHOR: theory_tests
#[test]
fn activation_memory_is_micro_batches_in_flight_times_one_micro_batch() {
    let cfg = TrainConfig { eval_every: 0, ..config() };
    for (schedule, m) in [(ScheduleKind::Gpipe, 4), (ScheduleKind::OneFOneB, 4), (ScheduleKind::ZbH1, 4)] {
        let run = pipeline(&cfg, 2, m, schedule);
        let lists = Schedule::new(schedule, 2, 1, m).stages;
        for stage in &run.stages {
            let in_flight = peak_in_flight(&lists[stage.stage]);
            assert_eq!(stage.peak_in_flight, in_flight);
            let expected = match schedule {
                ScheduleKind::Gpipe => m,
                // A micro-batch is held until its W: N on every stage.
                ScheduleKind::ZbH1 => m.min(2),
                _ => m.min(2 - stage.stage),
            };
            assert_eq!(in_flight, expected, "{schedule} stage {}", stage.stage);
            let activations = stage.memory.peak[&Category::Activations];
            assert_eq!(
                activations,
                in_flight as u64 * stage.micro_activation_bytes,
                "{schedule} stage {}",
                stage.stage
            );
        }
    }
}

#[test]
fn each_boundary_carries_one_activation_and_one_gradient_per_micro_batch() {
    let cfg = TrainConfig { eval_every: 0, val_batches: 1, ..config() };
    let (pp, m) = (4, 2);
    let run = pipeline(&cfg, pp, m, ScheduleKind::OneFOneB);
    let (b, t, c) = (cfg.batch_size, cfg.seq_len.unwrap(), 64);
    // One step: M micro-batches of B/M rows each way, B·T·C floats in all, per boundary; the
    // evaluation at the end sends the activations of one more batch forward.
    let per_step = (b * t * c * 4) as u64;
    let steps = cfg.steps;
    for stage in &run.stages {
        let forward = if stage.stage + 1 < pp { steps * per_step + per_step } else { 0 };
        let backward = if stage.stage > 0 { steps * per_step } else { 0 };
        assert_eq!(stage.comm.sent[&Collective::SendRecv], forward + backward, "stage {}", stage.stage);
    }
}

#[test]
fn interleaving_multiplies_the_messages_by_the_chunks() {
    // N·V virtual stages have N·V - 1 boundaries: each step sends one activation and one
    // gradient of B·T·C floats across each, and the final evaluation one more activation.
    let cfg = TrainConfig { eval_every: 0, val_batches: 1, ..config() };
    let (b, t, c) = (cfg.batch_size, cfg.seq_len.unwrap(), 64);
    let batch_bytes = (b * t * c * 4) as u64;
    for (schedule, pp, v) in [(ScheduleKind::OneFOneB, 2, 1), (ScheduleKind::Interleaved, 2, 2)] {
        let run = ch04_pipeline::train(&PipelineConfig { virtual_stages: v, ..pipeline_config(&cfg, pp, 2, schedule) })
            .unwrap();
        let sent: u64 = run.stages.iter().map(|s| s.comm.sent[&Collective::SendRecv]).sum();
        let boundaries = (pp * v - 1) as u64;
        assert_eq!(sent, boundaries * (2 * cfg.steps + 1) * batch_bytes, "{schedule}, {v} chunks");
    }
}
// ANCHOR_END: theory_tests

#[test]
fn a_traced_run_measures_its_bubble() {
    // No timing is asserted: only that the measurement exists, is a fraction, and is absent
    // from an untraced run.
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { steps: 2, eval_every: 0, val_batches: 1, ..config() };
    let timeline = Some(dir.path().join("step.svg"));
    let run = ch04_pipeline::train(&PipelineConfig { timeline, ..pipeline_config(&cfg, 2, 4, ScheduleKind::OneFOneB) })
        .unwrap();
    let measured = run.measured_bubble.unwrap();
    assert!((0.0..1.0).contains(&measured), "{measured}");
    let svg = std::fs::read_to_string(dir.path().join("step.svg")).unwrap();
    assert!(svg.contains("stage 1") && svg.contains("backward 3"), "one span per instruction, both stages");
    assert!(pipeline(&cfg, 2, 4, ScheduleKind::OneFOneB).measured_bubble.is_none());
}

#[test]
fn bad_flags_get_one_clear_line() {
    let cfg = config();
    let err =
        |pp, m| ch04_pipeline::train(&pipeline_config(&cfg, pp, m, ScheduleKind::Gpipe)).err().unwrap().to_string();
    assert!(err(5, 1).contains("--pp 5 is more stages than the model has blocks (4)"), "{}", err(5, 1));
    assert!(err(0, 1).contains("--pp must be at least 1"), "{}", err(0, 1));
    assert!(err(2, 3).contains("--microbatches 3 x --dp 1 does not divide the batch of 4 sequences"), "{}", err(2, 3));
    assert!(err(2, 0).contains("--microbatches must be at least 1"), "{}", err(2, 0));
    let dp = |dp| {
        let cfg = PipelineConfig { dp, ..pipeline_config(&cfg, 2, 4, ScheduleKind::Gpipe) };
        ch04_pipeline::train(&cfg).err().unwrap().to_string()
    };
    assert!(dp(2).contains("--microbatches 4 x --dp 2 does not divide the batch of 4 sequences"), "{}", dp(2));
    assert!(dp(40).contains("--pp 2 x --dp 40 is more ranks than are available"), "{}", dp(40));
    let chunks = |pp, v, m, schedule| {
        let cfg = PipelineConfig { virtual_stages: v, ..pipeline_config(&cfg, pp, m, schedule) };
        ch04_pipeline::train(&cfg).err().unwrap().to_string()
    };
    let e = chunks(2, 2, 1, ScheduleKind::Interleaved);
    assert!(e.contains("the 1 micro-batches per step (--microbatches x --grad-accum) must be a multiple of it"), "{e}");
    let e = chunks(2, 3, 2, ScheduleKind::Interleaved);
    assert!(e.contains("--pp 2 x --virtual-stages 3 is 6 model chunks, more than the model has blocks (4)"), "{e}");
    let e = chunks(2, 2, 2, ScheduleKind::OneFOneB);
    assert!(e.contains("--virtual-stages 2 needs --schedule interleaved"), "{e}");
}

// ANCHOR: checkpoint_test
#[test]
fn checkpoints_are_layout_independent_both_ways() {
    // Two steps, saved; then resumed up to four (a constant learning rate lets a run be
    // extended). The reference: chapter 1 saving and resuming itself.
    let dir = tempfile::tempdir().unwrap();
    let (ch01_ckpt, pp_ckpt) = (dir.path().join("ch01"), dir.path().join("pp"));
    let four = TrainConfig { lr_schedule: ch01_single_gpu::schedule::LrSchedule::Constant, ..config() };
    let two = TrainConfig { steps: 2, ..four.clone() };
    ch01(&TrainConfig { save: Some(ch01_ckpt.clone()), ..two.clone() });
    let reference = ch01(&TrainConfig { resume: Some(ch01_ckpt.clone()), ..four.clone() });
    assert_eq!(reference.steps.first().map(|s| s.step), Some(3));

    // Chapter 1 resumes a checkpoint that two stages saved...
    pipeline(&TrainConfig { save: Some(pp_ckpt.clone()), ..two }, 2, 2, ScheduleKind::OneFOneB);
    let from_pipeline = ch01(&TrainConfig { resume: Some(pp_ckpt), ..four.clone() });
    assert_matches_ch01(&four, &reference, &from_pipeline, 1e-5);
    // ...and four stages resume chapter 1's.
    let resumed = pipeline(&TrainConfig { resume: Some(ch01_ckpt), ..four.clone() }, 4, 2, ScheduleKind::Gpipe);
    assert_matches_ch01(&four, &reference, &resumed.report, 1e-5);
}

#[test]
fn save_every_checkpoints_mid_run_and_a_resume_is_bit_for_bit() {
    // Four steps straight, against two saving after every step (the first save mid-run, the
    // second at the end, each gathered from both stages) and a resume for the other two.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let four = TrainConfig { lr_schedule: ch01_single_gpu::schedule::LrSchedule::Constant, ..config() };
    let straight = pipeline(&four, 2, 2, ScheduleKind::ZbH1).report;
    let two = TrainConfig { steps: 2, save: Some(ckpt.clone()), save_every: 1, ..four.clone() };
    pipeline(&two, 2, 2, ScheduleKind::ZbH1);
    assert_eq!(ch01_single_gpu::checkpoint::read_trainer_state(&ckpt).unwrap().step, 2);
    let resumed = pipeline(&TrainConfig { resume: Some(ckpt), ..four.clone() }, 2, 2, ScheduleKind::ZbH1).report;
    assert_eq!(resumed.steps.iter().map(|s| s.step).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(straight.losses()[2..], resumed.losses()[..]);
    assert!(straight.steps[2..].iter().zip(&resumed.steps).all(|(a, b)| a.grad_norm == b.grad_norm));
    assert!(straight.params == resumed.params, "the resumed run ends elsewhere");
    // A run that stops (a learning rate of 1e30 overflows within a few steps) keeps the
    // checkpoint of its last good step: saved mid-run, never at the end.
    let ckpt = dir.path().join("stopped");
    let exploding = TrainConfig { lr: 1e30, steps: 5, save: Some(ckpt.clone()), save_every: 1, ..four };
    let err = ch04_pipeline::train(&pipeline_config(&exploding, 2, 2, ScheduleKind::OneFOneB)).err().unwrap();
    assert!(err.to_string().contains("the last good checkpoint, from step"), "{err}");
    let saved = ch01_single_gpu::checkpoint::read_trainer_state(&ckpt).unwrap().step;
    assert!((1..5).contains(&saved), "saved at step {saved}");
}
// ANCHOR_END: checkpoint_test
