//! Training steps of the `gpt2` preset (124M) on a GPU, at sequence 1024, in bf16 and in f32:
//! time per step (median of 10 after 3 warm-up steps), tokens/s and MFU.
//!
//!     cargo bench -p ch01-single-gpu --bench gpu_step            # batch 8, cuda:0
//!     GPU_BENCH_BATCH=16 GPU_BENCH_DEVICE=cuda:1 cargo bench -p ch01-single-gpu --bench gpu_step
//!
//! It fails, loudly, where there is no usable GPU. (A bench binary rather than criterion: steps
//! take a tenth of a second and more, and a median of ten is what the performance page quotes.)

use ch01_single_gpu::tokenizer::TokenizerKind;
use ch01_single_gpu::train::{TrainConfig, Trainer};
use kernels::DType;
use kernels::device::DeviceRequest;
use std::time::Instant;

fn main() {
    let batch: usize = std::env::var("GPU_BENCH_BATCH").ok().and_then(|b| b.parse().ok()).unwrap_or(8);
    let device = std::env::var("GPU_BENCH_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    let device: DeviceRequest = device.parse().unwrap_or_else(|e| panic!("GPU_BENCH_DEVICE: {e}"));
    println!("gpt2 (124M), GPT-2 tokenizer, B={batch} T=1024; median of 10 steps after 3 warm-up steps");
    for dtype in [DType::BF16, DType::F32] {
        let cfg = TrainConfig {
            model: "gpt2".into(),
            tokenizer: TokenizerKind::Gpt2,
            batch_size: batch,
            seq_len: Some(1024),
            steps: u64::MAX,
            device: device.clone(),
            dtype,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(&cfg).unwrap_or_else(|e| panic!("no GPU run possible: {e}"));
        let mut seconds = Vec::new();
        for i in 0..13 {
            let started = Instant::now();
            let record = trainer.step().unwrap_or_else(|e| panic!("step {i}: {e}"));
            if i >= 3 {
                seconds.push(started.elapsed().as_secs_f64());
            }
            if i == 12 {
                println!("  ({dtype}: loss at step 13 {:.4})", record.loss);
            }
        }
        seconds.sort_by(f64::total_cmp);
        let median = seconds[seconds.len() / 2];
        let tokens_per_sec = trainer.tokens_per_step() as f64 / median;
        let flops = tokens_per_sec * trainer.model.flops_per_token(1024);
        let peak = trainer.device.peak_flops(dtype);
        let mfu = peak.map_or("n/a".to_string(), |p| format!("{:.1}%", 100.0 * flops / p));
        println!(
            "{dtype:>5}: {:7.1} ms/step  {:9.0} tokens/s  {:6.1} TFLOP/s  MFU {mfu}  on {}",
            median * 1e3,
            tokens_per_sec,
            flops / 1e12,
            trainer.device.describe()
        );
    }
}
