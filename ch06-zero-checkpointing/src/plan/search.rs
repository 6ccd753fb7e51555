//! Which layouts there are, and the search over them.

use super::memory::{Memory, memory};
use super::time::Timer;
use super::{Choices, Layout, Plan, Problem};
use crate::recompute::Recompute;
use crate::zero::ZeroStage;
use anyhow::bail;
use ch01_single_gpu::config::ModelConfig;

/// Whether dp·tp·pp can run the model at all: tensor parallelism splits the heads (chapter 3),
/// a pipeline stage needs a block (chapter 4), the data-parallel ranks split the batch.
pub fn check_layout(model: &ModelConfig, global_batch: usize, dp: usize, tp: usize, pp: usize) -> anyhow::Result<()> {
    if !model.n_head.is_multiple_of(tp) {
        bail!("--layout: tp {tp} does not divide the {} heads", model.n_head);
    }
    if !model.padded_vocab_size().is_multiple_of(tp) {
        bail!("--layout: tp {tp} does not divide the padded vocabulary {}", model.padded_vocab_size());
    }
    if pp > model.n_layer {
        bail!("--layout: pp {pp} is more stages than the {} layers", model.n_layer);
    }
    if !global_batch.is_multiple_of(dp) {
        bail!("--layout: dp {dp} does not divide --global-batch {global_batch}");
    }
    Ok(())
}

/// The layouts of `n` GPUs: tp a power of two up to a node (its NVLink), pp a divisor of the
/// layers, dp the rest; micro-batch sizes the powers of two that divide a rank's share of the
/// batch; 1F1B, or the interleaved schedule over 2-5 chunks that divide a stage's layers; every
/// ZeRO stage (only 0 without data parallelism) and recompute mode. `choices` fix any of them.
pub fn layouts(problem: &Problem, n: usize, choices: &Choices) -> Vec<Layout> {
    let model = &problem.model;
    let triples: Vec<(usize, usize, usize)> = match choices.layout {
        Some(t) => vec![t],
        None => {
            let tps = (0..).map(|k| 1usize << k).take_while(|&tp| tp <= problem.gpu.gpus_per_node.min(n));
            tps.flat_map(|tp| {
                (1..=model.n_layer)
                    .filter(move |&pp| model.n_layer.is_multiple_of(pp) && n.is_multiple_of(tp * pp))
                    .map(move |pp| (n / (tp * pp), tp, pp))
            })
            .filter(|&(dp, tp, pp)| check_layout(model, problem.global_batch, dp, tp, pp).is_ok())
            .collect()
        }
    };
    let recomputes = match choices.recompute {
        Some(r) => vec![r],
        None => vec![Recompute::None, Recompute::Selective, Recompute::Full],
    };
    let mut out = Vec::new();
    for (dp, tp, pp) in triples {
        let share = problem.global_batch / dp;
        let sizes: Vec<usize> = match choices.microbatch_size {
            Some(b) if share.is_multiple_of(b) => vec![b],
            Some(_) => vec![],
            None => (0..)
                .map(|k| 1usize << k)
                .take_while(|&b| b <= share.min(64))
                .filter(|b| share.is_multiple_of(*b))
                .collect(),
        };
        let zeros: Vec<ZeroStage> = match choices.zero {
            Some(z) => vec![z],
            None if dp == 1 => vec![ZeroStage::NONE],
            None => (0..=ZeroStage::MAX).filter_map(ZeroStage::new).collect(),
        };
        for &microbatch_size in &sizes {
            let m = share / microbatch_size;
            let per_stage = model.n_layer / pp;
            let chunks = std::iter::once(1).chain((2..=5).filter(|&v| {
                pp > 1 && per_stage.is_multiple_of(v) && m.is_multiple_of(pp) && model.n_layer.is_multiple_of(pp)
            }));
            for chunks in chunks {
                for &zero in &zeros {
                    for &recompute in &recomputes {
                        out.push(Layout { dp, tp, pp, microbatch_size, chunks, zero, recompute });
                    }
                }
            }
        }
    }
    out
}

/// What does not fit, and what would help.
pub fn reason(problem: &Problem, layout: &Layout, memory: &Memory) -> String {
    let gb = |b: f64| format!("{:.1} GB", b / 1e9);
    let (name, largest) = memory.categories()[0];
    let mut tries = Vec::new();
    let activations = matches!(name, "activations" | "in-flight micro-batches");
    if activations {
        match layout.recompute {
            Recompute::None => tries.push("--recompute selective".to_string()),
            Recompute::Selective => tries.push("--recompute full".to_string()),
            Recompute::Full => {}
        }
        if layout.microbatch_size > 1 {
            tries.push(format!("--microbatch-size {}", layout.microbatch_size / 2));
        }
    } else if layout.zero.number() < ZeroStage::MAX && layout.dp > 1 {
        tries.push(format!("--zero {}", layout.zero.number() + 1));
    }
    if layout.tp * 2 <= problem.gpu.gpus_per_node && problem.model.n_head.is_multiple_of(layout.tp * 2) {
        tries.push(format!("tp {}", layout.tp * 2));
    }
    if !activations || layout.pp > 1 {
        tries.push(format!("pp {}", layout.pp * 2));
    }
    format!(
        "{name} {}, in all {:.2} GB > {}{}{}",
        gb(largest),
        memory.total() / 1e9,
        gb(problem.gpu.memory_bytes),
        if tries.is_empty() { "" } else { ": try " },
        tries.join(" or ")
    )
}

/// One layout evaluated; `price_all` prices it even when it does not fit.
pub fn evaluate(problem: &Problem, layout: &Layout, timer: &Timer, price_all: bool) -> Plan {
    let microbatches = problem.global_batch / (layout.dp * layout.microbatch_size);
    let flights = timer.in_flight(layout, microbatches);
    let memory = memory(problem, layout, |s| flights[s]);
    let fits = memory.total() <= problem.gpu.memory_bytes;
    let time = (fits || price_all).then(|| timer.step(problem, layout, microbatches));
    let reason = (!fits).then(|| reason(problem, layout, &memory));
    Plan { layout: *layout, microbatches, memory, time, fits, reason }
}

/// Every layout of `n` GPUs: those that fit fastest first, then the rest, nearest to fitting
/// first. A single `--layout` is priced even when it does not fit.
pub fn search(problem: &Problem, n: usize, choices: &Choices) -> Vec<Plan> {
    let timer = Timer::default();
    let price_all = choices.layout.is_some();
    let mut plans: Vec<Plan> =
        layouts(problem, n, choices).iter().map(|l| evaluate(problem, l, &timer, price_all)).collect();
    plans.sort_by(|a, b| {
        b.fits
            .cmp(&a.fits)
            // Step times within a nanosecond are a tie (rounding): the smaller memory first.
            .then((a.step_seconds() * 1e9).round().total_cmp(&(b.step_seconds() * 1e9).round()))
            .then(a.memory.total().total_cmp(&b.memory.total()))
    });
    plans
}
