//! The plans as tables, or as JSON.

use super::{Plan, Problem};
use serde_json::{Value, json};

/// What a listing shows of a search: the `top` fastest that fit, then up to `top` that do not
/// (nearest to fitting first: each says why).
pub fn shown(plans: &[Plan], top: usize) -> Vec<&Plan> {
    let fit = plans.iter().filter(|p| p.fits).take(top);
    let misfit = plans.iter().filter(|p| !p.fits).take(top.min(if plans.iter().any(|p| p.fits) { 3 } else { top }));
    fit.chain(misfit).collect()
}

/// One plan as `--json` prints it.
pub fn json(problem: &Problem, p: &Plan) -> Value {
    let l = &p.layout;
    let m = &p.memory;
    json!({
        "gpus": l.gpus(),
        "dp": l.dp, "tp": l.tp, "pp": l.pp,
        "microbatch_size": l.microbatch_size,
        "microbatches": p.microbatches,
        "schedule": if l.pp == 1 { "none" } else if l.chunks == 1 { "1f1b" } else { "interleaved" },
        "chunks": l.chunks,
        "zero": l.zero.number(),
        "recompute": l.recompute,
        "memory_per_rank_bytes": m.total(),
        "memory": {
            "stage": m.stage,
            "parameters": m.parameters,
            "gradients": m.gradients,
            "optimizer_state": m.optimizer_state,
            "activations": m.activations,
            "pipeline_in_flight": m.pipeline_in_flight,
            "in_flight_microbatches": m.in_flight,
            "communication": m.communication,
            "scratch": m.scratch,
            "activations_without_recompute": m.activations_without_recompute,
        },
        "step_seconds": p.time.map(|t| t.step_seconds),
        "compute_seconds": p.time.map(|t| t.compute_seconds),
        "exposed_comm_seconds": p.time.map(|t| t.exposed_comm_seconds),
        "bubble_seconds": p.time.map(|t| t.bubble_seconds),
        "tflops_per_gpu": p.time.map(|_| p.tflops_per_gpu()),
        "mfu": p.time.map(|_| p.mfu(&problem.gpu)),
        "tokens_per_second": p.time.map(|_| p.tokens_per_second(problem)),
        "fits": p.fits,
        "reason": p.reason,
    })
}

fn gb(bytes: f64) -> String {
    if bytes >= 1e9 { format!("{:.1} GB", bytes / 1e9) } else { format!("{:.0} MB", bytes / 1e6) }
}

fn schedule(p: &Plan) -> String {
    match (p.layout.pp, p.layout.chunks) {
        (1, _) => "-".into(),
        (_, 1) => "1f1b".into(),
        (_, v) => format!("int×{v}"),
    }
}

fn row(problem: &Problem, p: &Plan) -> String {
    let l = &p.layout;
    let time = match p.time {
        Some(t) => format!(
            "{:>8.3} {:>10.0} {:>6.0} {:>5.1}%",
            t.step_seconds,
            p.tokens_per_second(problem),
            p.tflops_per_gpu(),
            100.0 * p.mfu(&problem.gpu)
        ),
        None => format!("{:>8} {:>10} {:>6} {:>6}", "-", "-", "-", "-"),
    };
    format!(
        "{:>5} {:>3} {:>3} {:>3} {:>4}×{:<4} {:>6} {:>4} {:<9} {:>9} {time}",
        l.gpus(),
        l.dp,
        l.tp,
        l.pp,
        l.microbatch_size,
        p.microbatches,
        schedule(p),
        l.zero.number(),
        l.recompute.to_string(),
        gb(p.memory.total()),
    )
}

const HEADER: &str = " GPUs  dp  tp  pp   mb×count  sched zero recompute  mem/rank   step s   tokens/s TFLOP/s    MFU";

/// The tables: per GPU count, the fastest layouts that fit and why the nearest others do not;
/// for a range of counts, the best of each.
pub fn print(problem: &Problem, per_count: &[(usize, Vec<Plan>)], top: usize) {
    let (m, g) = (&problem.model, &problem.gpu);
    let params = ch01_single_gpu::params::ParamLayout::new(m).total;
    println!("plan");
    println!(
        "  model     {} layers, hidden {}, {} heads, vocabulary {}, sequence {}: {:.2}B parameters",
        m.n_layer,
        m.n_embd,
        m.n_head,
        m.vocab_size,
        problem.seq,
        params as f64 / 1e9
    );
    println!(
        "  batch     {} sequences ({} tokens) a step; {} bytes a parameter (params + grads + optimizer), {} an activation",
        problem.global_batch,
        problem.global_batch * problem.seq,
        problem.sizes.state.parameter + problem.sizes.state.gradient + problem.sizes.state.optimizer,
        problem.sizes.activation
    );
    println!(
        "  gpu       {}: {:.0} TFLOP/s bf16 at {:.0}% efficiency, {}, NVLink {:.0} GB/s, network {:.0} GB/s, {} per node",
        g.name,
        g.peak_flops / 1e12,
        100.0 * problem.assumptions.efficiency,
        gb(g.memory_bytes),
        g.nvlink_bandwidth / 1e9,
        g.network_bandwidth / 1e9,
        g.gpus_per_node
    );
    if per_count.len() > 1 {
        println!("\nthe fastest layout of each GPU count");
        println!("{HEADER}");
        for (n, plans) in per_count {
            match plans.first() {
                Some(p) if p.fits => println!("{}", row(problem, p)),
                Some(p) => println!("{n:>5}  nothing fits: nearest {}", p.reason.as_deref().unwrap_or("")),
                None => println!("{n:>5}  no layout divides the model and the batch"),
            }
        }
        if let Some((n, _)) = per_count.iter().find(|(_, plans)| plans.first().is_some_and(|p| p.fits)) {
            println!("\nfewest GPUs that fit: {n}");
        }
        return;
    }
    let Some((n, plans)) = per_count.first() else { return };
    let fits = plans.iter().filter(|p| p.fits).count();
    match fits {
        0 => println!("\nnone of the {} layouts of {n} GPUs fits", plans.len()),
        _ => println!("\n{fits} of {} layouts of {n} GPUs fit; the fastest:\n{HEADER}", plans.len()),
    }
    let shown = shown(plans, top);
    for p in shown.iter().filter(|p| p.fits) {
        println!("{}", row(problem, p));
    }
    if let Some(best) = plans.first().filter(|p| p.fits) {
        let m = &best.memory;
        println!("\nthe fastest, per rank (pipeline stage {} of {}):", m.stage, best.layout.pp);
        for (name, bytes) in m.named() {
            println!("  {name:<24} {:>9}", gb(bytes));
        }
        println!(
            "  {:<24} {:>9}   (activations without recompute: {})",
            "total",
            gb(m.total()),
            gb(m.activations_without_recompute)
        );
        if let Some(t) = best.time {
            println!(
                "  step {:.3} s = compute {:.3} + exposed communication {:.3} + bubble {:.3}",
                t.step_seconds, t.compute_seconds, t.exposed_comm_seconds, t.bubble_seconds
            );
        }
    }
    let misfits: Vec<&&Plan> = shown.iter().filter(|p| !p.fits).collect();
    if !misfits.is_empty() {
        println!("\n{} do not fit; the nearest:", plans.len() - fits);
        for p in misfits {
            let l = &p.layout;
            println!(
                "  dp {} tp {} pp {} mb {} zero {} recompute {}: {}",
                l.dp,
                l.tp,
                l.pp,
                l.microbatch_size,
                l.zero.number(),
                l.recompute,
                p.reason.as_deref().unwrap_or("")
            );
        }
    }
}
