//! One whole training step (forward, backward, AdamW) at the two reference configurations of
//! the book's performance page, both with GPT-2's tokenizer at batch 4, sequence 64:
//!
//! - `d4-c256`: 4 layers, 256 wide, 4 heads (llm.c's CPU trainer: ~560 ms/step on our 2-core
//!   machine, a jit-compiled JAX version ~190 ms);
//! - `gpt2-124M`: the `gpt2` preset (llm.c ~3.1 s, JAX ~2.8 s).
//!
//! criterion's `time` is the time per step and its `thrpt` (elements/s) is tokens/s.
//!
//!     cargo bench -p ch01-single-gpu --bench train_step

use ch01_single_gpu::tokenizer::TokenizerKind;
use ch01_single_gpu::train::{TrainConfig, Trainer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kernels::device::DeviceRequest;

fn reference_config(n_layer: Option<usize>, n_embd: Option<usize>, n_head: Option<usize>) -> TrainConfig {
    TrainConfig {
        model: "gpt2".into(),
        n_layer,
        n_embd,
        n_head,
        tokenizer: TokenizerKind::Gpt2,
        batch_size: 4,
        seq_len: Some(64),
        steps: u64::MAX,            // the schedule never ends: every step is a full-rate step
        device: DeviceRequest::Cpu, // the GPU has its own benchmark, gpu_step
        ..TrainConfig::default()
    }
}

fn train_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    for (name, cfg) in [
        ("d4-c256 B4 T64", reference_config(Some(4), Some(256), Some(4))),
        ("gpt2-124M B4 T64", reference_config(None, None, None)),
    ] {
        let mut trainer = match Trainer::new(&cfg) {
            Ok(trainer) => trainer,
            Err(e) => panic!("cannot build the {name} trainer: {e}"),
        };
        group.throughput(Throughput::Elements(trainer.tokens_per_step() as u64));
        group.bench_function(name, |b| b.iter(|| trainer.step().map(|r| r.loss).unwrap_or(f32::NAN)));
    }
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
