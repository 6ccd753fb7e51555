//! The planner against the published numbers: the ZeRO paper's memory figure and Megatron-LM's
//! Table 1; and its formulas against the chapters' own (which their tests hold to the runs).

use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::params::ParamLayout;
use ch03_tensor_parallel::cost::activation_floats_per_token;
use ch06_zero_checkpointing::Recompute;
use ch06_zero_checkpointing::plan::inputs::{Assumptions, gpu, preset};
use ch06_zero_checkpointing::plan::memory::{Sizes, activation_floats, stage_memory, stage_units};
use ch06_zero_checkpointing::plan::search::search;
use ch06_zero_checkpointing::plan::time::Timer;
use ch06_zero_checkpointing::plan::{Choices, Layout, Plan, Problem};
use ch06_zero_checkpointing::recompute::ActivationFloats;
use ch06_zero_checkpointing::zero::{ZeroStage, units};

fn problem(model: ModelConfig, global_batch: usize, assumptions: Assumptions) -> Problem {
    Problem {
        seq: model.block_size,
        model,
        global_batch,
        gpu: gpu("a100-80gb").unwrap(),
        assumptions,
        sizes: Sizes::BF16,
    }
}

fn layout(dp: usize, tp: usize, pp: usize, zero: u8, recompute: Recompute) -> Layout {
    Layout { dp, tp, pp, microbatch_size: 1, chunks: 1, zero: ZeroStage::new(zero).unwrap(), recompute }
}

// ANCHOR: zero_figure
#[test]
fn the_zero_papers_7_5b_on_64_gpus_is_120_31_4_16_6_and_1_9_gb_through_the_planner() {
    // Rajbhandari et al. 2020, figure 1: Ψ = 7.5B, N = 64 data-parallel ranks, mixed precision.
    // GPT-2 blocks at 36 x 4096 with the vocabulary padded to 59,136 rows are 7.5003B parameters.
    let model = ModelConfig { n_layer: 36, n_head: 32, n_embd: 4096, block_size: 2048, vocab_size: 59136 };
    assert_eq!(ParamLayout::new(&model).total, 7_500_292_096);
    let p = problem(model, 64, Assumptions::DEFAULT);
    let gb: Vec<f64> = (0..=3)
        .map(|stage| {
            let m = stage_memory(&p, &layout(64, 1, 1, stage, Recompute::Full), 0, 1, 0);
            (m.model_state_theory / 1e9 * 10.0).round() / 10.0
        })
        .collect();
    assert_eq!(gb, [120.0, 31.4, 16.6, 1.9]);
}
// ANCHOR_END: zero_figure

#[test]
fn a_whole_models_units_and_activations_are_chapter_6s_and_chapter_3s() {
    let model = ModelConfig::preset("tiny", 256).unwrap();
    for dp in 1..=4 {
        let l = Layout { dp, ..layout(1, 1, 1, 0, Recompute::None) };
        assert_eq!(stage_units(&model, &l, 0), units(&ParamLayout::new(&model), dp), "dp {dp}");
    }
    for mode in [Recompute::None, Recompute::Selective, Recompute::Full] {
        assert_eq!(activation_floats(&model, 32, 1, mode), ActivationFloats::new(&model, 32, mode), "{mode}");
    }
    for tp in [1, 2, 4] {
        let floats = activation_floats(&model, 32, tp, Recompute::None).total();
        assert_eq!(floats, activation_floats_per_token(&model, 32, tp), "tp {tp}");
        // Tensor parallelism splits each stage's parameters but the replicated LayerNorms and biases.
        let split: usize = stage_units(&model, &layout(1, tp, 1, 0, Recompute::None), 0).iter().map(|u| u.len()).sum();
        let c = model.n_embd;
        let replicated = model.block_size * c + model.n_layer * 6 * c + 2 * c; // wpe, LayerNorms, 2 biases, ln_f
        assert_eq!(split, (ParamLayout::new(&model).total - replicated) / tp + replicated, "tp {tp}");
    }
}

#[test]
fn the_first_1f1b_stage_keeps_one_micro_batch_per_stage_in_flight() {
    let model = ModelConfig { n_layer: 8, ..ModelConfig::preset("small", 256).unwrap() };
    let p = problem(model, 16, Assumptions::DEFAULT);
    let l = layout(1, 1, 4, 0, Recompute::None);
    let flights = Timer::default().in_flight(&l, 16);
    assert_eq!((flights[0], flights[3]), (4, 1), "1F1B: stage s holds p - s");
    let first = stage_memory(&p, &l, 0, flights[0], 0);
    let one = stage_memory(&p, &l, 0, 1, 0);
    assert_eq!(first.activations, one.activations, "one micro-batch's own");
    // Not the last stage and no recompute buffer: a micro-batch is its blocks and its input.
    assert_eq!(first.pipeline_in_flight, 3.0 * one.activations, "three more micro-batches");
}

// ANCHOR: megatron
/// Narayanan et al. 2021, Table 1 (A100 80 GB, sequence 2048, vocabulary 51,200, activation
/// checkpointing): model, tp, pp, dp, global batch, achieved TFLOP/s per GPU.
const MEGATRON_TABLE_1: [(&str, usize, usize, usize, usize, f64); 5] = [
    ("megatron-1.7b", 1, 1, 32, 512, 137.0),
    ("megatron-7.5b", 4, 1, 32, 512, 142.0),
    ("megatron-39b", 8, 2, 32, 1536, 138.0),
    ("megatron-146b", 8, 8, 24, 2304, 148.0),
    ("megatron-530b", 8, 35, 9, 2520, 163.0),
];

/// The paper's FLOPs per step: 96·B·s·l·h²·(1 + s/6h + V/16lh), recomputation counted.
fn megatron_flops(model: &ModelConfig, batch: usize) -> f64 {
    let (b, s, l, h, v) =
        (batch as f64, model.block_size as f64, model.n_layer as f64, model.n_embd as f64, model.vocab_size as f64);
    96.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))
}

/// The fastest plan that fits, with Megatron's choices (full recompute, no ZeRO) and `layout`.
fn fastest(p: &Problem, gpus: usize, layout: Option<(usize, usize, usize)>) -> Plan {
    let choices =
        Choices { layout, zero: Some(ZeroStage::NONE), recompute: Some(Recompute::Full), microbatch_size: None };
    let plans = search(p, gpus, &choices);
    plans.into_iter().next().filter(|plan| plan.fits).expect("a layout that fits")
}

#[test]
fn megatron_table_1_within_15_percent_and_the_planners_own_pick_is_no_slower() {
    for (name, tp, pp, dp, batch, published) in MEGATRON_TABLE_1 {
        let p = problem(preset(name).unwrap(), batch, Assumptions::MEGATRON_2021);
        let theirs = fastest(&p, dp * tp * pp, Some((dp, tp, pp)));
        let time = theirs.time.unwrap();
        // Our FLOPs with full recomputation are the paper's count exactly.
        let paper = megatron_flops(&p.model, batch);
        assert!((time.hardware_flops / paper - 1.0).abs() < 1e-9, "{name}: {} vs {paper}", time.hardware_flops);
        let predicted = theirs.tflops_per_gpu();
        eprintln!("{name}: predicted {predicted:.1} TFLOP/s per GPU, published {published}");
        assert!((predicted / published - 1.0).abs() < 0.15, "{name}: {predicted:.1} vs {published}");
        let ours = fastest(&p, dp * tp * pp, None);
        assert!(ours.step_seconds() <= time.step_seconds, "{name}: {:?} is slower than theirs", ours.layout);
    }
}
// ANCHOR_END: megatron
