//! Tokens per second of tensor parallelism against chapter 1, on the same global batch: the
//! `small` model at its default batch (16 x 128 tokens), chapter 1 on the whole machine, then
//! `--tp 2` and `--tp 2 --sequence-parallel` on thread ranks sharing it. The three runs take
//! turns, round after round, so that a machine whose speed drifts (others' work) slows all three
//! alike; each round's ratio is taken within the round, and the medians are printed, with each
//! one's best run (on a shared machine, the nearest to a quiet one).
//!
//!     cargo bench -p ch03-tensor-parallel --bench tokens_per_sec
//!     TP_BENCH_ROUNDS=9 TP_BENCH_STEPS=40 cargo bench -p ch03-tensor-parallel --bench tokens_per_sec
//!
//! A plain bench binary, not Criterion: one sample is a whole training run of many steps.

use ch01_single_gpu::TrainConfig;
use ch03_tensor_parallel::tensor_parallel::threads_per_rank;
use ch03_tensor_parallel::{TpConfig, train};
use kernels::device::DeviceRequest;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let (rounds, steps) = (env_or("TP_BENCH_ROUNDS", 5).max(1), env_or("TP_BENCH_STEPS", 30).max(1));
    let cfg = TrainConfig {
        model: "small".into(),
        steps,
        eval_every: 0,
        val_batches: 1,
        sample_tokens: 0,
        progress: false,
        device: DeviceRequest::Cpu,
        ..TrainConfig::default()
    };
    let tp = |sequence_parallel| TpConfig { train: cfg.clone(), tp: 2, dp: 1, sequence_parallel, fault: None };
    println!(
        "small model, batch {} x {}, {steps} steps a run, {rounds} rounds; chapter 1 on {} threads, tp 2 on {} per rank",
        cfg.batch_size,
        cfg.seq_len.map_or("its block size".into(), |t| t.to_string()),
        rayon::current_num_threads(),
        threads_per_rank(2),
    );
    let mut runs: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        let single = ch01_single_gpu::train(&cfg).map(|r| r.tokens_per_sec);
        let split = [false, true].map(|sp| train(&tp(sp)).map(|r| r.report.tokens_per_sec));
        match (single, split) {
            (Ok(a), [Ok(b), Ok(c)]) => {
                println!("round {round}: ch01 {a:.0}, tp 2 {b:.0}, tp 2 + sp {c:.0} tokens/s");
                for (run, x) in runs.iter_mut().zip([a, b, c]) {
                    run.push(x);
                }
            }
            (Err(e), _) => panic!("chapter 1 failed: {e}"),
            (_, [Err(e), _] | [_, Err(e)]) => panic!("tensor parallel failed: {e}"),
        }
    }
    let best = |i: usize| runs[i].iter().copied().fold(0.0, f64::max);
    println!("best (the least disturbed run): ch01 {:.0}, tp 2 {:.0}, tp 2 + sp {:.0}", best(0), best(1), best(2));
    let ratios = |i: usize| median(runs[0].iter().zip(&runs[i]).map(|(a, b)| b / a).collect());
    println!(
        "median tokens/s: ch01 {:.0}, tp 2 {:.0}, tp 2 + sp {:.0}",
        median(runs[0].clone()),
        median(runs[1].clone()),
        median(runs[2].clone())
    );
    println!("median ratio to ch01 (per round): tp 2 {:.2}x, tp 2 + sp {:.2}x", ratios(1), ratios(2));
}
