//! Chapter 4's benchmark: for each schedule on two stages with 2, 4 and 8 micro-batches, the
//! bubble measured from the trace beside the simulator's, and tokens/s against chapter 1's.
//!
//!     cargo bench -p ch04-pipeline --bench bubble [-- --steps N --model NAME --batch-size B --seq-len T]
//!
//! Each run trains `--steps` steps (the first, which allocates the buffers, is left out) with a
//! trace, and, per measured step:
//!
//! - **measured**: 1 - (time in forwards, backwards and W's) / (2 stages x the window from the
//!   first compute span's start to the last one's end). That window is the simulator's step: it
//!   counts compute only, so messages, the tied sum and the optimizer step are outside it or idle
//!   inside it, as in the simulator.
//! - **simulated, unit**: the schedule with F = B = W = 1 (the formulas of the book).
//! - **simulated, traced**: the schedule with each stage's mean forward, B and W (or fused
//!   backward) of the measured steps as its costs.
//!
//! The table quotes the medians over the measured steps. Thread ranks share the machine's cores:
//! a stage that idles lends its cores to the other, so the measured costs are those of a busy
//! machine. No number here is asserted anywhere.

use ch01_single_gpu::TrainConfig;
use ch01_single_gpu::data::DataOrder;
use ch04_pipeline::simulate::{Costs, simulate_stages};
use ch04_pipeline::stage::Partition;
use ch04_pipeline::{PipelineConfig, Schedule, ScheduleKind};
use kernels::device::DeviceRequest;
use std::collections::BTreeMap;

const STAGES: usize = 2;

struct Span {
    name: String,
    lane: u64,
    start: f64,
    end: f64,
}

fn read_trace(path: &std::path::Path) -> Vec<Span> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let events = json["traceEvents"].as_array().cloned().unwrap_or_default();
    events
        .iter()
        .filter_map(|e| {
            let (start, dur) = (e["ts"].as_f64()?, e["dur"].as_f64()?);
            Some(Span { name: e["name"].as_str()?.to_string(), lane: e["pid"].as_u64()?, start, end: start + dur })
        })
        .collect()
}

/// What a compute span is: "forward", "input" (B), "weights" (W) or "backward" (fused).
fn kind(name: &str) -> Option<&'static str> {
    match name.split(' ').collect::<Vec<_>>()[..] {
        ["forward", ..] => Some("forward"),
        ["backward", "input", ..] => Some("input"),
        ["weight", "grads", ..] => Some("weights"),
        ["backward", ..] => Some("backward"),
        _ => None,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

struct Measured {
    /// One bubble per measured step.
    bubbles: Vec<f64>,
    /// Each stage's mean time (µs) per kind of compute span.
    costs: Vec<BTreeMap<&'static str, f64>>,
}

/// The measured steps of a traced run: every step but the first.
fn measure(spans: &[Span]) -> Measured {
    let steps_of = |lane: u64| {
        let mut steps: Vec<(f64, f64)> =
            spans.iter().filter(|s| s.lane == lane && s.name == "step").map(|s| (s.start, s.end)).collect();
        steps.sort_by(|a, b| a.0.total_cmp(&b.0));
        steps
    };
    let lanes: Vec<Vec<(f64, f64)>> = (0..STAGES as u64).map(steps_of).collect();
    let n_steps = lanes.iter().map(Vec::len).min().unwrap_or(0);
    let mut bubbles = Vec::new();
    let mut sums: Vec<BTreeMap<&'static str, (f64, usize)>> = vec![BTreeMap::new(); STAGES];
    for k in 1..n_steps {
        let from = lanes.iter().map(|l| l[k].0).fold(f64::INFINITY, f64::min);
        let to = lanes.iter().map(|l| l[k].1).fold(f64::NEG_INFINITY, f64::max);
        let compute: Vec<(&Span, &'static str)> = spans
            .iter()
            .filter(|s| s.start >= from && s.end <= to)
            .filter_map(|s| kind(&s.name).map(|k| (s, k)))
            .collect();
        let start = compute.iter().map(|(s, _)| s.start).fold(f64::INFINITY, f64::min);
        let end = compute.iter().map(|(s, _)| s.end).fold(f64::NEG_INFINITY, f64::max);
        let busy: f64 = compute.iter().map(|(s, _)| s.end - s.start).sum();
        bubbles.push(1.0 - busy / (STAGES as f64 * (end - start)));
        for (span, kind) in compute {
            let entry = sums[span.lane as usize].entry(kind).or_default();
            entry.0 += span.end - span.start;
            entry.1 += 1;
        }
    }
    let costs = sums.into_iter().map(|m| m.into_iter().map(|(k, (t, n))| (k, t / n as f64)).collect()).collect();
    Measured { bubbles, costs }
}

/// The simulator's costs for a stage from its measured means (µs): a fused backward is B + W.
fn stage_costs(means: &BTreeMap<&'static str, f64>, chunks: usize) -> Costs {
    let get = |k| means.get(k).copied().unwrap_or(0.0) * chunks as f64;
    let weight = get("weights");
    Costs { forward: get("forward"), backward: get("backward") + get("input") + weight, weight }
}

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parse = |flag: &str, default: usize| arg(&args, flag).and_then(|v| v.parse().ok()).unwrap_or(default);
    let steps = parse("--steps", 8) as u64;
    let (batch, seq) = (parse("--batch-size", 8), parse("--seq-len", 128));
    let model = arg(&args, "--model").unwrap_or_else(|| "small".into());
    let dir = std::env::temp_dir().join(format!("ch04-bubble-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let train = TrainConfig {
        model: model.clone(),
        batch_size: batch,
        seq_len: Some(seq),
        steps,
        eval_every: 0,
        val_batches: 1,
        sample_tokens: 0,
        progress: false,
        data_order: DataOrder::Sequential,
        device: DeviceRequest::Cpu,
        ..TrainConfig::default()
    };
    println!(
        "model {model}, batch {batch} x {seq} tokens, {STAGES} stages, {steps} steps (the first left out): medians"
    );
    let single = ch01_single_gpu::train(&train).unwrap_or_else(|e| panic!("chapter 1: {e}"));
    let ch01_tps = median(single.steps[1..].iter().map(|s| s.tokens_per_sec).collect());
    println!("chapter 1: {ch01_tps:.0} tokens/s");
    println!();
    println!(
        "{:<12} {:>3}  {:>10} {:>12} {:>9} {:>11}  {:>9} {:>8}",
        "schedule", "m", "sim (unit)", "sim (traced)", "measured", "meas - sim", "tokens/s", "vs ch01"
    );
    let schedules = [
        (ScheduleKind::Gpipe, 1),
        (ScheduleKind::OneFOneB, 1),
        (ScheduleKind::Interleaved, 2),
        (ScheduleKind::ZbH1, 1),
    ];
    for (schedule, chunks) in schedules {
        for m in [2, 4, 8] {
            let trace = dir.join(format!("{schedule}-{m}.json"));
            let cfg = PipelineConfig {
                train: TrainConfig { trace: Some(trace.clone()), ..train.clone() },
                pp: STAGES,
                microbatches: m,
                dp: 1,
                schedule,
                virtual_stages: chunks,
                partition: Partition::Uniform,
                timeline: None,
                skip_tied_sum: false,
            };
            let run = ch04_pipeline::train(&cfg).unwrap_or_else(|e| panic!("{schedule} m {m}: {e}"));
            let measured = measure(&read_trace(&trace));
            let costs: Vec<Costs> = measured.costs.iter().map(|c| stage_costs(c, chunks)).collect();
            let traced = simulate_stages(&Schedule::new(schedule, STAGES, chunks, m), &costs)
                .map(|s| s.bubble_fraction())
                .unwrap_or(f64::NAN);
            let bubble = median(measured.bubbles);
            let tps = median(run.report.steps[1..].iter().map(|s| s.tokens_per_sec).collect());
            let name = if chunks > 1 { format!("{schedule} v{chunks}") } else { schedule.to_string() };
            println!(
                "{name:<12} {m:>3}  {:>9.1}% {:>11.1}% {:>8.1}% {:>+10.1}pp  {tps:>9.0} {:>7.2}x",
                100.0 * run.bubble,
                100.0 * traced,
                100.0 * bubble,
                100.0 * (bubble - traced),
                tps / ch01_tps,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
