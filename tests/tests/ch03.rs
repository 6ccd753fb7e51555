//! Chapter 3's claims: tensor parallelism computes what chapter 1 computes.
//!
//! Tolerance: a sharded matmul adds its products in a different order (each rank sums over its
//! rows of the reduction, then the ring adds the ranks' partial sums), and so do the
//! cross-entropy's sums of exponentials; results agree to float rounding, not bit for bit.
//! tp = 1 is bit for bit: the same matmuls, and sums over one rank are no-ops.
//!
//! Losses and gradient norms agree within 1e-5. The parameters' tolerance is 2e-5 of the update,
//! and the reason is one tensor: the key bias of `c_attn`. Adding a constant vector b to every
//! key adds q·b to every score of a row, and softmax ignores a constant added to a row, so the
//! key bias's gradient is exactly zero in exact arithmetic, and in floats it is rounding noise.
//! AdamW divides by the noise's own scale, so it takes steps of about lr in a random direction,
//! and the two layouts' noise differs. At tp 2 that tensor alone is 1.4e-5 of the whole update
//! (the query and value biases: 1e-7); every other tensor is within 1.6e-5 of its own update.
const RTOL: f32 = 1e-5;
const PARAMS_RTOL: f32 = 2e-5;

use ch01_single_gpu::schedule::LrSchedule;
use ch01_single_gpu::{TrainConfig, TrainReport};
use ch03_tensor_parallel::cost::{
    CollectiveFloats, activation_floats_per_token, backward_collectives, forward_collectives, ring_bytes_sent,
    sequence_parallel_activation_floats, step_collectives,
};
use ch03_tensor_parallel::tp_comm::Fault;
use ch03_tensor_parallel::{TpConfig, TpReport};
use kernels::Category;
use kernels::comm::Collective;
use scale_tests::{assert_matches_ch01, tiny_config};

fn ch01(cfg: &TrainConfig) -> TrainReport {
    ch01_single_gpu::train(cfg).unwrap()
}

fn tp(cfg: &TrainConfig, tp: usize) -> TpReport {
    tp_dp(cfg, tp, 1)
}

fn tp_dp(cfg: &TrainConfig, tp: usize, dp: usize) -> TpReport {
    run(cfg, tp, dp, false, None)
}

fn run(cfg: &TrainConfig, tp: usize, dp: usize, sequence_parallel: bool, fault: Option<Fault>) -> TpReport {
    ch03_tensor_parallel::train(&TpConfig { train: cfg.clone(), tp, dp, sequence_parallel, fault }).unwrap()
}

fn grad_norms(r: &TrainReport) -> Vec<f32> {
    r.steps.iter().map(|s| s.grad_norm).collect()
}

fn config() -> TrainConfig {
    TrainConfig { eval_every: 3, ..tiny_config(6) }
}

// ANCHOR: equivalence_tests
#[test]
fn tp1_tp2_tp4_match_single_device() {
    for accum in [1, 2] {
        let cfg = TrainConfig { grad_accum: accum, ..config() };
        let single = ch01(&cfg);
        for n in [1, 2, 4] {
            eprintln!("tp = {n}, grad_accum = {accum}");
            let run = tp(&cfg, n);
            assert_matches_ch01(&cfg, &single, &run.report, PARAMS_RTOL);
            scale_tests::assert_close("loss", &single.losses(), &run.report.losses(), RTOL);
            let norms = |r: &TrainReport| r.steps.iter().map(|s| s.grad_norm).collect::<Vec<f32>>();
            scale_tests::assert_close("grad norm", &norms(&single), &norms(&run.report), RTOL);
            if n == 1 {
                assert_eq!(run.report.losses(), single.losses(), "tp 1 is chapter 1, bit for bit");
                assert_eq!(run.report.params, single.params, "tp 1 is chapter 1, bit for bit");
            }
        }
    }
}

#[test]
fn tp2_times_dp2_matches_single_device() {
    // Four ranks: two tensor-parallel groups of two, each a replica computing half the rows;
    // chapter 2's gradient sum between the replicas.
    for accum in [1, 2] {
        let cfg = TrainConfig { grad_accum: accum, ..config() };
        let single = ch01(&cfg);
        let run = tp_dp(&cfg, 2, 2);
        assert_matches_ch01(&cfg, &single, &run.report, PARAMS_RTOL);
        let grid: Vec<(usize, usize)> = run.ranks.iter().map(|r| (r.tp_rank, r.dp_rank)).collect();
        assert_eq!(grid, [(0, 0), (1, 0), (0, 1), (1, 1)], "tensor parallelism innermost");
        assert!(run.ranks.iter().all(|r| r.dp_comm.total_sent() > 0), "the replicas summed gradients");
    }
}

#[test]
fn a_missing_all_reduce_is_caught() {
    // Rank-local input gradients (the copy's backward skipped): forward is still right, the
    // loss still falls, and only the gradients below each branch are wrong.
    let cfg = config();
    let single = ch01(&cfg);
    let broken = run(&cfg, 2, 1, false, Some(Fault::SkipInputGradSum));
    let first = [broken.report.losses()[0]];
    scale_tests::assert_close("the first loss, forward's: right", &first, &single.losses()[..1], RTOL);
    let check = std::panic::catch_unwind(|| assert_matches_ch01(&cfg, &single, &broken.report, PARAMS_RTOL));
    assert!(check.is_err(), "the check must see the missing sum");
}
// ANCHOR_END: equivalence_tests

// ANCHOR: sequence_parallel_tests
#[test]
fn every_tp_and_dp_layout_matches_single_device_with_and_without_sequence_parallelism() {
    // B·T = 128 tokens: 32, 64 or 128 per rank's stream. With dp 2, each replica has 64. The
    // grid without sequence parallelism too (the tests above cover tp 1, 2 and 4 and tp 2 x dp 2
    // with accumulation).
    let cfg = config();
    let single = ch01(&cfg);
    let grid = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)];
    for ((n, dp), sequence_parallel) in grid.into_iter().flat_map(|l| [(l, true), (l, false)]) {
        eprintln!("tp = {n}, dp = {dp}, sequence parallel {sequence_parallel}");
        let run = run(&cfg, n, dp, sequence_parallel, None);
        assert_matches_ch01(&cfg, &single, &run.report, PARAMS_RTOL);
        scale_tests::assert_close("loss", &single.losses(), &run.report.losses(), RTOL);
        scale_tests::assert_close("grad norm", &grad_norms(&single), &grad_norms(&run.report), RTOL);
        if n == 1 && dp == 1 {
            assert_eq!(run.report.params, single.params, "one rank's stream is all of it: chapter 1, bit for bit");
        }
    }
}

#[test]
fn forgetting_the_layernorm_gradient_sum_is_caught() {
    // Each rank's LayerNorms then learn from its own tokens only: the loss still falls, and
    // forward is right, but the gradient norm (rank 0's share) and the parameters are wrong.
    let cfg = config();
    let single = ch01(&cfg);
    let broken = run(&cfg, 2, 1, true, Some(Fault::SkipLayerNormGradSum));
    let losses = broken.report.losses();
    assert!(losses.last() < losses.first(), "the loss still falls: {losses:?}");
    scale_tests::assert_close("the first loss, forward's: right", &losses[..1], &single.losses()[..1], RTOL);
    let norms = std::panic::catch_unwind(|| {
        scale_tests::assert_close("grad norm", &grad_norms(&single), &grad_norms(&broken.report), RTOL)
    });
    assert!(norms.is_err(), "the gradient norms must differ");
    let check = std::panic::catch_unwind(|| assert_matches_ch01(&cfg, &single, &broken.report, PARAMS_RTOL));
    assert!(check.is_err(), "the check must see the missing sum");
}
// ANCHOR_END: sequence_parallel_tests

// ANCHOR: bytes_test
#[test]
fn each_rank_sends_what_the_formula_says() {
    for (accum, sequence_parallel) in [(1, false), (2, false), (1, true), (2, true)] {
        let cfg = TrainConfig { grad_accum: accum, ..config() };
        let bt = cfg.batch_size * cfg.seq_len.unwrap_or_default();
        for n in [2, 4] {
            let run = run(&cfg, n, 1, sequence_parallel, None);
            let (model, stream) = (&run.report.model, run.stream());
            let (fwd, bwd) = (forward_collectives(model, bt, n, stream), backward_collectives(model, bt, n, stream));
            let bytes = |f: CollectiveFloats| ring_bytes_sent(f, n);
            let step = bytes(step_collectives(model, stream));
            // Two evaluations of two batches: forward only.
            let (steps, evals) = (cfg.steps, 2 * cfg.val_batches as u64);
            for rank in &run.ranks {
                let what = format!("tp {n}, sequence parallel {sequence_parallel}, accum {accum}, rank {}", rank.rank);
                assert_eq!(rank.sent_in_steps, steps * run.bytes_sent_per_step(), "{what}");
                // All of the all-reduces and reduce-scatters are the model's: forward and
                // backward of each micro-batch, the LayerNorms' gradients of each step, and
                // forward of each validation batch.
                let model_bytes = |b: fn(&ch03_tensor_parallel::cost::RingBytes) -> u64| {
                    steps * accum as u64 * (b(&bytes(fwd)) + b(&bytes(bwd))) + evals * b(&bytes(fwd))
                };
                let all_reduce = model_bytes(|b| b.all_reduce) + steps * step.all_reduce;
                assert_eq!(rank.comm.sent[&Collective::AllReduce], all_reduce, "{what}");
                let reduce_scatter = rank.comm.sent.get(&Collective::ReduceScatter).copied().unwrap_or(0);
                assert_eq!(reduce_scatter, model_bytes(|b| b.reduce_scatter), "{what}");
                assert_eq!(sequence_parallel, reduce_scatter > 0, "{what}: reduce-scatters only with the stream split");
            }
        }
    }
}
// ANCHOR_END: bytes_test

#[test]
fn activation_memory_per_rank_is_the_formula() {
    let cfg = TrainConfig { eval_every: 0, val_batches: 1, ..tiny_config(1) };
    let (b, t) = (cfg.batch_size, cfg.seq_len.unwrap_or_default());
    let whole = ch01_single_gpu::model::Activations::floats_per_token(&ch01(&cfg).model, t);
    for n in [1, 2, 4] {
        let run = tp(&cfg, n);
        let floats = activation_floats_per_token(&run.report.model, t, n);
        if n == 1 {
            assert_eq!(floats, whole, "tp 1 saves what chapter 1 saves");
        }
        for rank in &run.ranks {
            let counted = rank.memory.at_peak[&Category::Activations];
            assert_eq!(counted, (4 * b * t * floats) as u64, "tp {n}, rank {}", rank.rank);
        }
    }
}

// ANCHOR: sequence_parallel_memory_test
#[test]
fn activation_memory_per_rank_with_sequence_parallelism_is_the_formula() {
    let cfg = TrainConfig { eval_every: 0, val_batches: 1, ..tiny_config(1) };
    let (b, t) = (cfg.batch_size, cfg.seq_len.unwrap_or_default());
    for n in [1, 2, 4] {
        let run = run(&cfg, n, 1, true, None);
        let model = &run.report.model;
        let floats = sequence_parallel_activation_floats(model, b * t, t, n);
        if n == 1 {
            assert_eq!(floats, b * t * activation_floats_per_token(model, t, 1), "one rank: nothing to split");
        } else {
            assert!(floats < b * t * activation_floats_per_token(model, t, n), "tp {n}: less than without");
        }
        for rank in &run.ranks {
            let counted = rank.memory.at_peak[&Category::Activations];
            assert_eq!(counted, 4 * floats as u64, "tp {n}, rank {}", rank.rank);
        }
    }
}
// ANCHOR_END: sequence_parallel_memory_test

#[test]
fn a_tp2_checkpoint_is_chapter_1s_and_resumes_under_any_layout() {
    // A constant schedule lets a run be extended; the checkpoint after 3 steps, resumed to 6 by
    // chapter 1 and by tp 4, must give chapter 1's uninterrupted 6 steps.
    let dir = tempfile::tempdir().unwrap();
    let six = TrainConfig { lr_schedule: LrSchedule::Constant, eval_every: 0, ..tiny_config(6) };
    let straight = ch01(&six);
    let three = TrainConfig { steps: 3, save: Some(dir.path().to_path_buf()), ..six.clone() };
    tp(&three, 2);
    let resumed = TrainConfig { resume: Some(dir.path().to_path_buf()), ..six.clone() };
    let by_ch01 = ch01(&resumed);
    let by_tp4 = tp(&resumed, 4);
    scale_tests::assert_close("chapter 1 resumed", &by_ch01.losses(), &straight.losses()[3..], RTOL);
    scale_tests::assert_close("loss", &by_tp4.report.losses(), &straight.losses()[3..], 1e-5);
    let tol = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(tol(&by_tp4.report.params, &straight.params) < 1e-4, "tp 4 resumed to chapter 1's parameters");
}

#[test]
fn the_sample_is_generated_on_the_shards() {
    let cfg = TrainConfig { sample_tokens: 24, eval_every: 0, val_batches: 1, ..tiny_config(3) };
    let single = ch01(&cfg);
    let one = tp(&cfg, 1);
    assert_eq!(one.report.sample, single.sample, "tp 1 samples chapter 1's text");
    let two = tp(&cfg, 2);
    let text = two.report.sample.unwrap_or_default();
    // 24 byte tokens decode to 8 to 24 characters (an invalid UTF-8 run becomes one U+FFFD).
    let generated = text.strip_prefix(&cfg.prompt).map_or(0, |t| t.chars().count());
    assert!((8..=24).contains(&generated), "24 byte tokens after the prompt: {text:?}");
    assert!(two.ranks.iter().all(|r| r.sample_ms_per_token.is_some_and(|ms| ms > 0.0)));
}

#[test]
fn bad_tp_gets_a_clear_error() {
    let err = |cfg: &TrainConfig, n: usize| {
        let tp = TpConfig { train: cfg.clone(), tp: n, dp: 1, sequence_parallel: false, fault: None };
        ch03_tensor_parallel::train(&tp).err().unwrap().to_string()
    };
    let cfg = config();
    assert!(err(&cfg, 0).contains("--tp must be at least 1"));
    assert!(err(&cfg, 3).contains("--tp 3 does not divide the model's 4 attention heads"), "{}", err(&cfg, 3));
    assert!(err(&cfg, 100).contains("more ranks than are available"));
    let three_heads = TrainConfig { n_head: Some(3), n_embd: Some(96), ..config() };
    let vocab = err(&three_heads, 3);
    assert!(vocab.contains("--tp 3 does not divide the padded vocabulary of 256 rows"), "{vocab}");
    let dp3 = TpConfig { train: cfg.clone(), tp: 2, dp: 3, sequence_parallel: false, fault: None };
    let dp3 = ch03_tensor_parallel::train(&dp3).err().unwrap().to_string();
    assert!(dp3.contains("batch of 4 sequences is not divisible by --dp 3"), "{dp3}");
    // 3 x 5 = 15 tokens do not split 2 ways; without --sequence-parallel they need not.
    let odd = TrainConfig { batch_size: 3, seq_len: Some(5), ..config() };
    let sp = TpConfig { train: odd, tp: 2, dp: 1, sequence_parallel: true, fault: None };
    let sp = ch03_tensor_parallel::train(&sp).err().unwrap().to_string();
    assert!(
        sp.contains("the 15 tokens of a micro-batch (batch 3 x seq_len 5, per replica) divisible by --tp 2"),
        "{sp}"
    );
    let gpu = TrainConfig { device: kernels::device::DeviceRequest::Cuda(0), ..config() };
    assert!(err(&gpu, 2).contains("threads on the CPU"));
}

#[test]
fn a_gpt2_sized_vocabulary_with_padding_matches_too() {
    // 50257 tokens padded to 50304: the last rank's rows end in 47 padding rows, which must get
    // no probability, no gradient, and stay zero.
    let cfg = TrainConfig {
        tokenizer: ch01_single_gpu::tokenizer::TokenizerKind::Gpt2,
        eval_every: 0,
        val_batches: 1,
        batch_size: 2,
        seq_len: Some(16),
        ..tiny_config(2)
    };
    let single = ch01(&cfg);
    let wte = single.layout.get("wte.weight").unwrap().clone();
    let padding = wte.offset + single.model.vocab_size * single.model.n_embd..wte.range().end;
    for (n, dp, sequence_parallel) in [(2, 1, false), (4, 1, false), (2, 1, true), (4, 1, true), (2, 2, true)] {
        let run = run(&cfg, n, dp, sequence_parallel, None);
        assert_matches_ch01(&cfg, &single, &run.report, PARAMS_RTOL);
        scale_tests::assert_close("loss", &single.losses(), &run.report.losses(), RTOL);
        scale_tests::assert_close("grad norm", &grad_norms(&single), &grad_norms(&run.report), RTOL);
        assert!(run.report.params[padding.clone()].iter().all(|&p| p == 0.0), "tp {n}: padding rows stay zero");
    }
}

// ANCHOR: placement_check_tests
#[test]
fn the_placement_check_names_a_skipped_sum_at_the_first_step() {
    // The same fault as above: with the check on, the run stops in its first backward, at the
    // first input-gradient sum (the last block's MLP), instead of training on.
    let cfg = config();
    let broken =
        TpConfig { train: cfg.clone(), tp: 2, dp: 1, sequence_parallel: false, fault: Some(Fault::SkipInputGradSum) };
    let error =
        ch03_tensor_parallel::tensor_parallel::train_checking_placements(&broken, true).err().map(|e| e.to_string());
    let error = error.unwrap_or_default();
    assert!(error.contains("after the MLP's c_fc input-gradient sum (backward, block 0 of this pass"), "{error}");
    assert!(error.contains("rank 1 differs from rank 0: a missing all-reduce?"), "{error}");
}

#[test]
fn the_placement_check_is_silent_and_changes_nothing_on_a_right_run() {
    let cfg = TrainConfig { steps: 2, ..config() };
    for sequence_parallel in [false, true] {
        let right = TpConfig { train: cfg.clone(), tp: 2, dp: 1, sequence_parallel, fault: None };
        let checked = ch03_tensor_parallel::tensor_parallel::train_checking_placements(&right, true).unwrap();
        let unchecked = ch03_tensor_parallel::tensor_parallel::train_checking_placements(&right, false).unwrap();
        assert_eq!(checked.report.params, unchecked.report.params, "sequence parallel {sequence_parallel}");
        assert_eq!(checked.report.losses(), unchecked.report.losses(), "sequence parallel {sequence_parallel}");
    }
}
// ANCHOR_END: placement_check_tests
