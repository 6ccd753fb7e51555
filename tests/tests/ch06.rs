//! Chapter 6's claims: ZeRO and activation checkpointing compute what chapter 1 computes, and
//! use the memory and move the bytes the formulas say.

use ch01_single_gpu::{TrainConfig, TrainReport};
use ch02_data_parallel::DpConfig;
use ch06_zero_checkpointing::{Recompute, ZeroConfig, ZeroReport};
use scale_tests::{assert_matches_ch01, tiny_config};

fn config() -> TrainConfig {
    TrainConfig { batch_size: 8, eval_every: 2, ..tiny_config(3) }
}

fn zero(cfg: &TrainConfig, dp: usize, zero: u8, recompute: Recompute) -> ZeroReport {
    ch06_zero_checkpointing::train(&ZeroConfig { train: cfg.clone(), dp, zero, recompute }).unwrap()
}

fn bits(r: &TrainReport) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let f = |v: &mut dyn Iterator<Item = f32>| v.map(f32::to_bits).collect::<Vec<_>>();
    (
        f(&mut r.steps.iter().map(|s| s.loss)),
        f(&mut r.steps.iter().map(|s| s.grad_norm)),
        f(&mut r.params.iter().copied()),
    )
}

#[test]
fn zero_0_is_chapter_2_bit_for_bit() {
    let cfg = config();
    let dp = ch02_data_parallel::train(&DpConfig { train: cfg.clone(), dp: Some(2), bucket_mb: 0.0, timeline: None })
        .unwrap();
    let z = zero(&cfg, 2, 0, Recompute::None);
    assert_eq!(bits(&dp.report), bits(&z.report));
}

#[test]
fn every_stage_on_dp_2_and_4_matches_single_device() {
    let cfg = config();
    let single = ch01_single_gpu::train(&cfg).unwrap();
    for dp in [2, 4] {
        for stage in 0..=3 {
            eprintln!("dp {dp}, zero {stage}");
            assert_matches_ch01(&cfg, &single, &zero(&cfg, dp, stage, Recompute::None).report, 1e-5);
        }
    }
}
