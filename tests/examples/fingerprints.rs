//! Bit-level fingerprints of chapter 1's and chapter 2's results on the configurations of their
//! tests: losses, validation losses, gradient norms and final parameters, hashed bit for bit.
//!
//! A refactor that must change no number (the seams for chapters 3–6 were one) runs this before
//! and after and compares the output: equal lines mean equal bits. The hashes hold on one
//! machine only (the matmul library picks its kernels by CPU), so they are compared, not
//! committed.
//!
//!     cargo run --release -p scale-tests --example fingerprints > before.txt

use ch01_single_gpu::TrainConfig;
use ch01_single_gpu::data::DataOrder;
use ch02_data_parallel::DpConfig;
use scale_tests::tiny_config;

/// FNV-1a over the bits of a run's figures.
fn fingerprint(values: impl Iterator<Item = f32>) -> u64 {
    values.fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ x.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

fn describe(what: &str, report: &ch01_single_gpu::TrainReport) {
    let losses = fingerprint(report.steps.iter().map(|s| s.loss));
    let norms = fingerprint(report.steps.iter().map(|s| s.grad_norm));
    let val = fingerprint(report.val_losses.iter().map(|v| v.1));
    let params = fingerprint(report.params.iter().copied());
    let last = report.steps.last().map_or(f32::NAN, |s| s.loss);
    println!("{what:<48} loss {losses:016x} norm {norms:016x} val {val:016x} params {params:016x} (last loss {last})");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = TrainConfig { batch_size: 8, eval_every: 3, ..tiny_config(6) };
    let configs = [
        ("ch02 config", base.clone()),
        ("ch02 config, grad_accum 2", TrainConfig { grad_accum: 2, ..base.clone() }),
        ("ch02 config, random order", TrainConfig { data_order: DataOrder::Random, ..base.clone() }),
        ("tiny_config(20)", tiny_config(20)),
        ("small model, 3 steps", TrainConfig { model: "small".into(), steps: 3, eval_every: 0, ..tiny_config(3) }),
    ];
    for (name, cfg) in &configs {
        describe(&format!("ch01 {name}"), &ch01_single_gpu::train(cfg)?);
    }
    for (name, cfg) in &configs[..3] {
        for dp in [1, 2, 4] {
            for bucket_mb in [0.0, 1.0 / 64.0] {
                let run = ch02_data_parallel::train(&DpConfig {
                    train: cfg.clone(),
                    dp: Some(dp),
                    bucket_mb,
                    timeline: None,
                })?;
                describe(&format!("ch02 dp {dp} bucket {bucket_mb} {name}"), &run.report);
            }
        }
    }
    Ok(())
}
