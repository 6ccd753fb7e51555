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

// ANCHOR: equivalence
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
// ANCHOR_END: equivalence

#[test]
fn three_ranks_pad_every_unit_and_still_match_single_device() {
    use kernels::Category;
    // The tiny model's units do not divide by 3: every unit is padded, and stages 1 and 2
    // stage the padded ones through a buffer of their own.
    let cfg = TrainConfig { batch_size: 6, grad_accum: 2, ..config() };
    let single = ch01_single_gpu::train(&cfg).unwrap();
    for stage in 1..=3 {
        let run = zero(&cfg, 3, stage, Recompute::None);
        assert!(run.units.iter().any(|u| u.padded(3) != u.len()), "some unit is padded");
        assert_matches_ch01(&cfg, &single, &run.report, 1e-5);
        for rank in &run.ranks {
            for category in
                [Category::Parameters, Category::Gradients, Category::OptimizerState, Category::Communication]
            {
                assert_eq!(
                    rank.memory.peak[&category],
                    rank.predicted.bytes(category),
                    "zero {stage}, rank {}: {category}",
                    rank.rank
                );
            }
        }
    }
}

// ANCHOR: recompute_bits
#[test]
fn recomputation_is_bit_identical_to_keeping_everything() {
    let cfg = config();
    // One rank without ZeRO is chapter 1 itself, bit for bit; recomputing changes no bit.
    let single = ch01_single_gpu::train(&cfg).unwrap();
    for (dp, stage) in [(1, 0), (2, 2), (4, 3)] {
        let kept = zero(&cfg, dp, stage, Recompute::None);
        if dp == 1 {
            assert_eq!(bits(&single), bits(&kept.report), "dp 1, zero 0 is chapter 1");
        }
        for mode in [Recompute::Selective, Recompute::Full] {
            let recomputed = zero(&cfg, dp, stage, mode);
            assert_eq!(bits(&kept.report), bits(&recomputed.report), "dp {dp}, zero {stage}, recompute {mode}");
        }
    }
}
// ANCHOR_END: recompute_bits

// ANCHOR: memory_test
#[test]
fn the_ledger_holds_what_the_formulas_say_at_every_stage() {
    use kernels::Category;
    let cfg = TrainConfig { eval_every: 0, ..config() };
    for dp in [2, 4] {
        let psi =
            ch01_single_gpu::params::ParamLayout::new(&zero(&cfg, 1, 0, Recompute::None).report.model).total as u64;
        let mut gradients = Vec::new();
        for stage in 0..=3 {
            let run = zero(&cfg, dp, stage, Recompute::None);
            for rank in &run.ranks {
                for category in
                    [Category::Parameters, Category::Gradients, Category::OptimizerState, Category::Communication]
                {
                    let (ledger, formula) = (rank.memory.peak[&category], rank.predicted.bytes(category));
                    assert_eq!(
                        ledger,
                        formula,
                        "dp {dp}, zero {stage}, rank {}: {category}: {}",
                        rank.rank,
                        rank.predicted.describe(category)
                    );
                }
            }
            // The paper's terms: 16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N (the tiny model's units
            // divide 2 and 4 ways: no padding).
            let n = dp as u64;
            let theory: u64 = [Category::Parameters, Category::Gradients, Category::OptimizerState]
                .into_iter()
                .map(|c| run.ranks[1].predicted.theory_bytes(c))
                .sum();
            let expected = [16 * psi, 8 * psi + 8 * psi / n, 4 * psi + 12 * psi / n, 16 * psi / n][stage as usize];
            assert_eq!(theory, expected, "dp {dp}, zero {stage}");
            gradients.push(run.ranks[0].predicted.theory_bytes(Category::Gradients));
        }
        assert_eq!(gradients[2], gradients[0] / dp as u64, "ZeRO-2's gradient shard is 1/N of them all");
    }
}
// ANCHOR_END: memory_test

// ANCHOR: activation_test
#[test]
fn activation_memory_per_block_is_the_formulas_for_none_selective_and_full() {
    use kernels::Category;
    let cfg = TrainConfig { eval_every: 0, ..config() };
    let mut per_block = Vec::new();
    for mode in [Recompute::None, Recompute::Selective, Recompute::Full] {
        let run = zero(&cfg, 2, 1, mode);
        let f = run.activations;
        let bytes = (f.total() * run.tokens_per_rank * 4) as u64;
        assert_eq!(run.ranks[0].memory.peak[&Category::Activations], bytes, "recompute {mode}");
        // The rest: the first block's input, and the head's input, ln_f (+ 2 statistics),
        // logits and losses.
        let model = &run.report.model;
        assert_eq!(f.rest, model.n_embd + model.n_embd + 2 + model.padded_vocab_size() + 1);
        per_block.push((f.per_block, f.recompute));
    }
    let model = ch01_single_gpu::config::ModelConfig::preset("tiny", 256).unwrap();
    let (c, h, t) = (model.n_embd, model.n_head, config().seq_len.unwrap());
    assert_eq!(per_block[0], (16 * c + 4 + h * t, 0), "none: every tensor, the attention matrix's H·T a token too");
    assert_eq!(per_block[1], (16 * c + 4, h * t), "selective: all but B·H·T·T, one such buffer shared");
    assert_eq!(per_block[2], (c, 16 * c + 4 + h * t), "full: the block's input, one block's buffers shared");
}
// ANCHOR_END: activation_test

// ANCHOR: bytes_test
#[test]
fn stages_1_and_2_move_what_data_parallelism_moves_and_stage_3_half_as_much_again() {
    use kernels::comm::Collective::{AllGather, AllReduce, ReduceScatter};
    let cfg = TrainConfig { eval_every: 0, ..config() };
    for dp in [2, 4] {
        let n = dp as u64;
        let sent = |stage| {
            let run = zero(&cfg, dp, stage, Recompute::None);
            let shard: u64 = run.units.iter().map(|u| u.shard as u64).sum();
            let step = &run.ranks[1].step_comm.sent;
            let get = |c| step.get(&c).copied().unwrap_or(0);
            (get(AllReduce), get(ReduceScatter) + get(AllGather), shard)
        };
        // Plain data parallelism: one ring all-reduce of the gradient, 2(N-1)/N·4Ψ, and the loss.
        let (all_reduce, _, shard) = sent(0);
        let gradient = 4 * shard * n;
        let ring = 2 * (n - 1) * gradient / n;
        assert!(all_reduce >= ring && all_reduce <= ring + 2 * (n - 1) * 4, "dp {dp}: {all_reduce} vs {ring}");
        // The norm and loss gather: 3 floats from each rank.
        let scalars = (n - 1) * 3 * 4;
        for stage in [1, 2] {
            let (_, zero_bytes, _) = sent(stage);
            assert_eq!(zero_bytes - scalars, ring, "dp {dp}, zero {stage}: reduce-scatter + all-gather = 2(N-1)/N");
        }
        let (_, zero3, _) = sent(3);
        assert_eq!(2 * (zero3 - scalars), 3 * ring, "dp {dp}, zero 3: gathered twice, 1.5x");
    }
}
// ANCHOR_END: bytes_test

#[test]
fn a_zero_3_checkpoint_is_chapter_1s_and_resumes_under_any_layout() {
    use ch01_single_gpu::schedule::LrSchedule;
    // A constant schedule lets a run be extended: 3 steps under ZeRO-3 on 2 ranks, saved
    // (gathered into chapter 1's layout, moments included), then resumed to 6 by chapter 1 and
    // by ZeRO-1 on 4 ranks, must continue chapter 1's uninterrupted 6 steps.
    let dir = tempfile::tempdir().unwrap();
    let six = TrainConfig { lr_schedule: LrSchedule::Constant, eval_every: 0, batch_size: 8, ..tiny_config(6) };
    let straight = ch01_single_gpu::train(&six).unwrap();
    let three = TrainConfig { steps: 3, save: Some(dir.path().to_path_buf()), ..six.clone() };
    zero(&three, 2, 3, Recompute::Full);
    let resumed = TrainConfig { resume: Some(dir.path().to_path_buf()), ..six.clone() };
    let by_ch01 = ch01_single_gpu::train(&resumed).unwrap();
    let by_zero1 = zero(&resumed, 4, 1, Recompute::Selective);
    scale_tests::assert_close("chapter 1 resumed", &by_ch01.losses(), &straight.losses()[3..], 1e-5);
    scale_tests::assert_close("zero 1 resumed", &by_zero1.report.losses(), &straight.losses()[3..], 1e-5);
    let tol = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(tol(&by_zero1.report.params, &straight.params) < 1e-4, "resumed to chapter 1's parameters");
    assert!(tol(&by_ch01.params, &straight.params) < 1e-4, "chapter 1 resumed to its own parameters");
}

// ANCHOR: tp_test
#[test]
fn every_stage_and_recompute_on_dp_2_x_tp_2_matches_single_device_and_holds_the_shards_formula() {
    use ch04_pipeline::PipelineConfig;
    use ch04_pipeline::schedule::ScheduleKind;
    use ch04_pipeline::stage::Partition;
    use ch05_3d_hybrid::HybridConfig;
    use ch06_zero_checkpointing::GridShape;
    use kernels::Category;
    // ZeRO shards each tensor rank's own parameters over its data-parallel group: the units
    // are the tensor shard's, and the ledger must hold predict() of them, exactly.
    let cfg = config();
    let single = ch01_single_gpu::train(&cfg).unwrap();
    let whole = ch01_single_gpu::params::ParamLayout::new(&single.model);
    let shard = whole.shard(2).unwrap();
    let mut kept = None; // stage's run without recomputation
    let modes = [Recompute::None, Recompute::Selective, Recompute::Full];
    for (stage, recompute) in (0..=3).flat_map(|s| modes.map(|m| (s, m))) {
        eprintln!("dp 2 x tp 2, zero {stage}, recompute {recompute}");
        let zero_cfg = ZeroConfig { train: cfg.clone(), dp: 2, zero: stage, recompute };
        let run =
            ch06_zero_checkpointing::train_on_grid(&zero_cfg, &GridShape { tp: 2, ..GridShape::default() }).unwrap();
        // Chapter 5's tolerance for a tensor group (2e-5: chapter 3's key bias, see tests/ch03.rs).
        assert_matches_ch01(&cfg, &single, &run.report, 2e-5);
        // Recomputing on the shard runs the same ops and the same sums again: no bit changes.
        match recompute {
            Recompute::None => kept = Some(bits(&run.report)),
            _ => assert!(kept.as_ref() == Some(&bits(&run.report)), "zero {stage}: recompute {recompute} changed bits"),
        }
        if stage == 0 && recompute == Recompute::None {
            // ZeRO-0 on dp 2 x tp 2 is chapter 5's dp 2 x tp 2 x pp 1, bit for bit.
            let pipeline = PipelineConfig {
                train: cfg.clone(),
                pp: 1,
                microbatches: 1,
                dp: 2,
                schedule: ScheduleKind::OneFOneB,
                virtual_stages: 1,
                partition: Partition::Uniform,
                timeline: None,
                skip_tied_sum: false,
            };
            let ch05 = ch05_3d_hybrid::train(&HybridConfig { pipeline, tp: 2, fault: None, shard_optimizer: false });
            assert_eq!(bits(&ch05.unwrap().report), bits(&run.report), "zero 0 is chapter 5");
        }
        assert_eq!(run.units.iter().map(|u| u.len()).sum::<usize>(), shard.total, "units tile the tp shard");
        assert_eq!(run.ranks.len(), 4);
        for rank in &run.ranks {
            assert_eq!(rank.rank, rank.tp_rank + 2 * rank.dp_rank, "tensor ranks innermost");
            assert!(rank.tp_comm.total_sent() > 0, "the tensor group's sums happened");
            for category in
                [Category::Parameters, Category::Gradients, Category::OptimizerState, Category::Communication]
            {
                assert_eq!(
                    rank.memory.peak[&category],
                    rank.predicted.bytes(category),
                    "zero {stage}, rank {}: {category}: {}",
                    rank.rank,
                    rank.predicted.describe(category)
                );
            }
            let acts = (run.activations.total() * run.tokens_per_rank * 4) as u64;
            assert_eq!(rank.memory.peak[&Category::Activations], acts, "zero {stage}: activations on the shard");
            // The data-parallel group moves ZeRO's bytes of the shard: 2(N-1)/N of its gradient
            // at stages 1 and 2, 1.5 times that at stage 3 (and 3 scalars from each rank).
            use kernels::comm::Collective::{AllGather, ReduceScatter};
            let n = 2u64;
            let ring = 2 * (n - 1) * 4 * run.units.iter().map(|u| u.padded(2) as u64).sum::<u64>() / n;
            let get = |c| rank.step_comm.sent.get(&c).copied().unwrap_or(0);
            let zero_bytes = (get(ReduceScatter) + get(AllGather)).saturating_sub((n - 1) * 3 * 4);
            match stage {
                1 | 2 => assert_eq!(zero_bytes, ring, "zero {stage}, rank {}", rank.rank),
                3 => assert_eq!(2 * zero_bytes, 3 * ring, "zero 3, rank {}", rank.rank),
                _ => {}
            }
        }
    }
}
// ANCHOR_END: tp_test

// ANCHOR: pp_test
#[test]
fn zero_1_with_pipelines_matches_single_device_and_keeps_a_shard_of_each_stages_moments() {
    use ch04_pipeline::schedule::ScheduleKind;
    use ch06_zero_checkpointing::{GridShape, train_pipelined};
    use kernels::Category;
    let cfg = config();
    let single = ch01_single_gpu::train(&cfg).unwrap();
    for (dp, tp, pp) in [(2, 1, 2), (2, 2, 2)] {
        eprintln!("dp {dp} x tp {tp} x pp {pp}, zero 1");
        let grid = GridShape { tp, pp, microbatches: 2, schedule: ScheduleKind::OneFOneB };
        let run =
            |zero| train_pipelined(&ZeroConfig { train: cfg.clone(), dp, zero, recompute: Recompute::None }, &grid);
        let (sharded, plain) = (run(1).unwrap(), run(0).unwrap());
        assert_matches_ch01(&cfg, &single, &sharded.report, 2e-5); // chapter 5's tolerance
        for (z, p) in sharded.ranks.iter().zip(&plain.ranks) {
            // Each stage's buffer of Ψ_s floats, padded to N·S: replica r owns [r·S, (r+1)·S).
            let (total, r) = (z.shard_floats, z.coords.dp);
            let s = total.div_ceil(dp);
            let owned = ((r + 1) * s).min(total) - (r * s).min(total);
            let peak = |rank: &ch05_3d_hybrid::HybridRankReport| rank.memory.peak[&Category::OptimizerState];
            assert_eq!(peak(p), 8 * total as u64, "rank {}: zero 0 keeps 8 bytes a float of its stage", z.rank);
            assert_eq!(peak(z), 8 * owned as u64, "rank {}: zero 1 keeps them for its shard only", z.rank);
            // Reduce-scatter + all-gather move what the all-reduce moved: 2(N-1)/N of the stage.
            let sent = |rank: &ch05_3d_hybrid::HybridRankReport| rank.data_comm.total_sent();
            // (The padding, under N floats, and a few scalars a step aside: losses, the norm.)
            let ring = |floats: usize| 2 * (dp as u64 - 1) * 4 * floats as u64 / dp as u64 * cfg.steps;
            for (zero, rank) in [(1, z), (0, p)] {
                let (low, high) = (ring(total), ring(dp * s) + 256 * cfg.steps);
                assert!((low..=high).contains(&sent(rank)), "zero {zero}, rank {}: {} vs {low}", rank.rank, sent(rank));
            }
        }
    }
}

#[test]
fn zero_2_and_3_with_pipelines_are_refused_with_the_reason() {
    use ch06_zero_checkpointing::{GridShape, ZeroError, train_pipelined};
    let grid = GridShape { pp: 2, microbatches: 2, ..GridShape::default() };
    for zero in [2, 3] {
        let cfg = ZeroConfig { train: config(), dp: 2, zero, recompute: Recompute::None };
        let err = train_pipelined(&cfg, &grid).err().expect("refused");
        assert!(matches!(err, ZeroError::PipelineShards(z) if z == zero), "{err}");
        assert!(err.to_string().contains("DeepSpeed") && err.to_string().contains("micro-batch"), "{err}");
    }
}
// ANCHOR_END: pp_test

#[test]
fn a_zero_1_pipeline_checkpoint_holds_every_replicas_moments() {
    use ch01_single_gpu::schedule::LrSchedule;
    use ch06_zero_checkpointing::{GridShape, train_pipelined};
    // Saved after 3 steps of dp 2 x pp 2 under ZeRO-1 (each replica held half of each stage's
    // moments: the checkpoint must have put them together), resumed by chapter 1 to 6 steps:
    // chapter 1's uninterrupted run.
    let dir = tempfile::tempdir().unwrap();
    let six = TrainConfig { lr_schedule: LrSchedule::Constant, eval_every: 0, batch_size: 8, ..tiny_config(6) };
    let straight = ch01_single_gpu::train(&six).unwrap();
    let three = TrainConfig { steps: 3, save: Some(dir.path().to_path_buf()), ..six.clone() };
    let grid = GridShape { pp: 2, microbatches: 2, ..GridShape::default() };
    train_pipelined(&ZeroConfig { train: three, dp: 2, zero: 1, recompute: Recompute::None }, &grid).unwrap();
    let resumed = ch01_single_gpu::train(&TrainConfig { resume: Some(dir.path().to_path_buf()), ..six }).unwrap();
    scale_tests::assert_close("resumed", &resumed.losses(), &straight.losses()[3..], 1e-5);
    let worst = resumed.params.iter().zip(&straight.params).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-4, "resumed to chapter 1's parameters ({worst})");
}
