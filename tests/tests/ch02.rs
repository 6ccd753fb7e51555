//! Chapter 2's claims: data parallelism computes what chapter 1 computes.
//!
//! Tolerance: the sum over a batch's rows happens in a different order (each rank sums its rows,
//! then the ring adds the ranks' sums), so results agree to float rounding, not bit for bit
//! (dp = 1 is bitwise). Rounding of ~1e-7 per step keeps losses, gradient norms and the
//! parameters' update within a relative 1e-5 over these short runs (the largest seen: 7e-6, for
//! the parameters at dp 4 with accumulation).

use ch01_single_gpu::{TrainConfig, TrainReport};
use ch02_data_parallel::{DpConfig, DpReport};
use scale_tests::{assert_matches_ch01, tiny_config};

fn ch01(cfg: &TrainConfig) -> TrainReport {
    ch01_single_gpu::train(cfg).unwrap()
}

fn dp(cfg: &TrainConfig, dp: usize, bucket_mb: f64) -> DpReport {
    ch02_data_parallel::train(&DpConfig { train: cfg.clone(), dp: Some(dp), bucket_mb, timeline: None }).unwrap()
}

// ANCHOR: assert_matches_single_device
/// Chapter 1's check (`scale_tests::assert_matches_ch01`: losses, grad norms, validation losses,
/// parameters), plus what data parallelism adds: every replica ended with the same parameters.
fn assert_matches_single_device(cfg: &TrainConfig, single: &TrainReport, parallel: &DpReport) {
    assert_matches_ch01(cfg, single, &parallel.report, 1e-5);
    let first = parallel.ranks[0].params_fingerprint;
    assert!(parallel.ranks.iter().all(|r| r.params_fingerprint == first), "replicas diverged");
}

fn config() -> TrainConfig {
    TrainConfig { batch_size: 8, eval_every: 3, ..tiny_config(6) }
}
// ANCHOR_END: assert_matches_single_device

// ANCHOR: equivalence_tests
#[test]
fn dp1_dp2_dp4_match_single_device() {
    // Every layout of the grid: dp in {1, 2, 4}, with and without accumulation, with and
    // without bucketing (16 KiB buckets: the tiny model's 471 KiB of gradients in many buckets).
    for accum in [1, 2] {
        let cfg = TrainConfig { grad_accum: accum, ..config() };
        let single = ch01(&cfg);
        for n in [1, 2, 4] {
            for bucket_mb in [0.0, 1.0 / 64.0] {
                eprintln!("dp = {n}, grad_accum = {accum}, bucket_mb = {bucket_mb}");
                assert_matches_single_device(&cfg, &single, &dp(&cfg, n, bucket_mb));
            }
        }
    }
}

#[test]
fn bucketed_overlapped_all_reduce_matches_single_device() {
    let cfg = config();
    let single = ch01(&cfg);
    // 16 KiB buckets: the tiny model's gradients (471 KiB) go out in several buckets. (One
    // rank has nothing to reduce and plans no buckets.)
    assert_matches_single_device(&cfg, &single, &dp(&cfg, 1, 1.0 / 64.0));
    let bucketed = dp(&cfg, 4, 1.0 / 64.0);
    assert_matches_single_device(&cfg, &single, &bucketed);
    assert!(bucketed.ranks[0].comm.calls.values().sum::<u64>() > 6 * 4, "several buckets per step");
}

#[test]
fn dp2_with_accumulation_matches_single_device_with_the_same_global_batch() {
    // dp 2 x accumulation 2 over micro-batches of 8 rows = ch01 with micro-batches of 8 rows,
    // accumulated twice: the same 16 sequences per step, in the same order.
    let cfg = TrainConfig { grad_accum: 2, ..config() };
    let single = ch01(&cfg);
    assert_matches_single_device(&cfg, &single, &dp(&cfg, 2, 0.0));
    assert_matches_single_device(&cfg, &single, &dp(&cfg, 2, 1.0 / 64.0));
}

#[test]
fn random_order_matches_too() {
    let cfg = TrainConfig { data_order: ch01_single_gpu::data::DataOrder::Random, ..config() };
    assert_matches_single_device(&cfg, &ch01(&cfg), &dp(&cfg, 2, 1.0 / 64.0));
}
// ANCHOR_END: equivalence_tests

#[test]
fn each_rank_sends_2_n_minus_1_over_n_of_the_gradients_per_step() {
    let cfg = TrainConfig { eval_every: 0, val_batches: 1, ..config() };
    let n = 4;
    let run = dp(&cfg, n, 0.0);
    let steps = cfg.steps;
    let grad = run.grad_bytes;
    let all_reduce = kernels::comm::Collective::AllReduce;
    for rank in &run.ranks {
        // Per step: the gradient buffer (one ring all-reduce) + the loss (one f32); at the end the
        // validation loss (one f32). Each all-reduce of L bytes sends 2(n-1)/n·L when n divides
        // L, and a chunk of a 4-byte scalar is at most 4 bytes.
        let ring = 2 * (n as u64 - 1) * grad / n as u64;
        let scalars = (steps + 1) * 2 * (n as u64 - 1) * 4;
        for (what, bytes) in [("sent", rank.comm.sent[&all_reduce]), ("received", rank.comm.received[&all_reduce])] {
            assert!(bytes >= steps * ring && bytes <= steps * ring + scalars, "rank {} {what} {bytes}", rank.rank);
        }
    }
}

#[test]
fn bad_dp_gets_a_clear_error() {
    let cfg = config();
    let err = ch02_data_parallel::train(&DpConfig { train: cfg.clone(), dp: Some(3), bucket_mb: 0.0, timeline: None })
        .err()
        .unwrap();
    assert!(err.to_string().contains("global batch of 8 sequences is not divisible by --dp 3"), "{err}");
    let err =
        ch02_data_parallel::train(&DpConfig { train: cfg.clone(), dp: Some(128), bucket_mb: 0.0, timeline: None })
            .err()
            .unwrap();
    assert!(err.to_string().contains("more ranks than are available"), "{err}");
    let err =
        ch02_data_parallel::train(&DpConfig { train: cfg, dp: Some(0), bucket_mb: 0.0, timeline: None }).err().unwrap();
    assert!(err.to_string().contains("at least 1"), "{err}");
}
