//! Criterion benchmarks of the hot ops. Matmul throughput is reported as elements/s where one
//! element is one floating-point operation, so criterion's "Gelem/s" reads as GFLOP/s.
//!
//!     cargo bench -p kernels --bench ops

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kernels::Rng;
use kernels::ops::attention::{attention_backward, attention_forward};
use kernels::ops::matmul::{MatMut, MatRef, gemm, linear_forward};
use kernels::ops::softmax_cross_entropy::{softmax_cross_entropy_backward, softmax_cross_entropy_forward};
use std::hint::black_box;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0.0; n];
    Rng::new(seed).fill_normal(&mut v, 1.0);
    v
}

/// The matmuls of one GPT-2 (124M) training step at B = 4, T = 64 (M = 256 rows).
fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    group.sample_size(20);
    let m = 256;
    for (name, k, n) in
        [("qkv 256x768x2304", 768, 2304), ("fc 256x768x3072", 768, 3072), ("proj 256x3072x768", 3072, 768)]
    {
        let (inp, w, bias) = (random(m * k, 1), random(k * n, 2), random(n, 3));
        let mut out = vec![0.0; m * n];
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(name, |b| b.iter(|| linear_forward(black_box(&mut out), &inp, &w, Some(&bias), m, k, n)));
    }
    // A large square product: the ceiling the shapes above are measured against.
    let sq = 1536;
    let (a, b2) = (random(sq * sq, 6), random(sq * sq, 7));
    let mut out = vec![0.0; sq * sq];
    group.throughput(Throughput::Elements((2 * sq * sq * sq) as u64));
    group.bench_function("square 1536", |b| {
        b.iter(|| {
            gemm(
                MatMut::row_major(&mut out, sq, sq),
                MatRef::row_major(&a, sq, sq),
                MatRef::row_major(&b2, sq, sq),
                false,
            )
        })
    });
    // The tied output projection: logits = x @ wte^T, wte stored [Vp, C].
    let (k, n) = (768, 50304);
    let (x, wte) = (random(m * k, 4), random(n * k, 5));
    let mut logits = vec![0.0; m * n];
    group.throughput(Throughput::Elements((2 * m * k * n) as u64));
    group.bench_function("lm_head 256x768x50304 (B^T)", |b| {
        b.iter(|| {
            gemm(
                MatMut::row_major(&mut logits, m, n),
                MatRef::row_major(&x, m, k),
                MatRef::row_major(&wte, n, k).t(),
                false,
            )
        })
    });
    // Its weight gradient: dwte [Vp, C] += dlogits^T @ x, a reduction over only 256 rows.
    let mut dwte = vec![0.0; n * k];
    group.bench_function("lm_head dW 50304x256x768 (A^T)", |b| {
        b.iter(|| {
            gemm(
                MatMut::row_major(&mut dwte, n, k),
                MatRef::row_major(&logits, m, n).t(),
                MatRef::row_major(&x, m, k),
                true,
            )
        })
    });
    group.finish();
}

fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(20);
    let (b, t, ch, h) = (4, 64, 768, 12);
    let qkv = random(b * t * 3 * ch, 1);
    let dout = random(b * t * ch, 2);
    let (mut out, mut att, mut dqkv) = (vec![0.0; b * t * ch], vec![0.0; b * h * t * t], vec![0.0; b * t * 3 * ch]);
    group.bench_function("forward B4 T64 C768 H12", |bench| {
        bench.iter(|| attention_forward(&mut out, &mut att, &qkv, t, ch, h))
    });
    group.bench_function("backward B4 T64 C768 H12", |bench| {
        bench.iter(|| attention_backward(&mut dqkv, &dout, &qkv, &att, t, ch, h))
    });
    group.finish();
}

/// The classifier of GPT-2 at B = 4, T = 64: 256 rows of 50304 logits.
fn softmax_cross_entropy(c: &mut Criterion) {
    let mut group = c.benchmark_group("softmax_cross_entropy");
    group.sample_size(20);
    let (n, v, vp) = (256, 50257, 50304);
    let logits = random(n * vp, 1);
    let targets: Vec<u32> = (0..n as u32).map(|i| i * 97 % v as u32).collect();
    let (mut probs, mut losses) = (logits.clone(), vec![0.0; n]);
    group.throughput(Throughput::Elements((n * vp) as u64));
    group.bench_function("forward+backward 256x50304", |b| {
        b.iter(|| {
            probs.copy_from_slice(&logits);
            softmax_cross_entropy_forward(&mut probs, &mut losses, &targets, v, vp);
            softmax_cross_entropy_backward(&mut probs, &targets, 1.0 / n as f32, vp);
        })
    });
    group.finish();
}

criterion_group!(benches, matmul, attention, softmax_cross_entropy);
criterion_main!(benches);
