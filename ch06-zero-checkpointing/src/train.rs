//! The chapter's trainer: `--dp` thread ranks, one data-parallel group, ZeRO over it, and
//! activation checkpointing on every rank. On chapter 5's grid (`train_on_grid`), ZeRO shards
//! each tensor rank's own parameters over its data-parallel group (`--tp`, every stage).

use crate::rank::{RankGroups, ZeroRank};
use crate::recompute::{ActivationFloats, Recompute};
use crate::zero::{Prediction, Unit, ZeroStage, predict};
use ch01_single_gpu::data::Dataset;
use ch01_single_gpu::model::{BlockShape, Whole};
use ch01_single_gpu::preflight;
use ch01_single_gpu::sample::{SampleConfig, generate};
use ch01_single_gpu::tokenizer::Tokenizer;
use ch01_single_gpu::train::{LoopOutcome, check_config, drive, load_dataset, model_config, run_shape};
use ch01_single_gpu::{TrainConfig, TrainError, TrainReport};
use ch02_data_parallel::data_parallel::MAX_THREAD_RANKS;
use ch03_tensor_parallel::tensor_parallel::{TpConfig, TpError, check_tp};
use ch04_pipeline::PipelineConfig;
use ch04_pipeline::schedule::ScheduleKind;
use ch04_pipeline::stage::Partition;
use ch05_3d_hybrid::tp_stage::TpParts;
use ch05_3d_hybrid::{HybridConfig, HybridError, HybridReport};
use kernels::comm::CommStats;
use kernels::comm::Communicator;
use kernels::comm::grid::{Grid, GroupKind};
use kernels::comm::process::{all_gather_json, run_rank as run_process_rank};
use kernels::comm::rendezvous::RendezvousConfig;
use kernels::comm::thread::{LaunchError, launch};
use kernels::device::DeviceRequest;
use kernels::trace::TraceEvent;
use kernels::{DType, Device, MemoryReport, Trace, View};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct ZeroConfig {
    pub train: TrainConfig,
    /// Data-parallel ranks (thread ranks on the CPU).
    pub dp: usize,
    /// `--zero`: 0 to 3.
    pub zero: u8,
    pub recompute: Recompute,
}

/// The grid's other dimensions, beside `--dp` (chapter 5's flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GridShape {
    /// Tensor-parallel ranks: each holds its shard of every split tensor (chapter 3), and ZeRO
    /// shards that shard over the data-parallel group.
    pub tp: usize,
    /// Pipeline stages (chapter 4), the micro-batches of each pipe's share of a batch, and
    /// the schedule: with pp > 1 the run is chapter 5's, with ZeRO-1 over each data-parallel
    /// group ([`train_pipelined`]).
    pub pp: usize,
    pub microbatches: usize,
    pub schedule: ScheduleKind,
}

impl Default for GridShape {
    fn default() -> GridShape {
        GridShape { tp: 1, pp: 1, microbatches: 1, schedule: ScheduleKind::OneFOneB }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(
        "--zero must be 0, 1, 2 or 3 (got {0}): 1 shards the optimizer state, 2 also the gradients, 3 also the parameters"
    )]
    BadStage(u8),
    #[error("--dp must be at least 1")]
    ZeroRanks,
    #[error("--dp {0} is more ranks than are available ({MAX_THREAD_RANKS} thread ranks on the CPU)")]
    TooManyRanks(usize),
    #[error(
        "the global batch of {batch} sequences is not divisible by --dp {dp}: every rank must get the same number of rows"
    )]
    BatchNotDivisible { batch: usize, dp: usize },
    #[error(
        "chapter 6's ranks are threads or processes on the CPU (GPU ranks, over NCCL, are not built yet); run it with --device cpu or auto"
    )]
    GpuRanks,
    #[error(transparent)]
    Tensor(#[from] TpError),
    #[error("--dp {dp} x --tp {tp} is more ranks than are available ({MAX_THREAD_RANKS} thread ranks on the CPU)")]
    TooManyGridRanks { dp: usize, tp: usize },
    // ANCHOR: pipeline_refusal
    #[error(
        "--zero {0} with --pp > 1 is refused, as DeepSpeed refuses it: a stage's gradients are final only after its last micro-batch's backward, so ZeRO-2 would reduce-scatter every micro-batch's gradients (M times the bytes) or keep them whole until then (no saving), and ZeRO-3 would gather each stage's parameters for every micro-batch's forward and backward (2M gathers a step); use --zero 1, which composes with pipelines"
    )]
    PipelineShards(u8),
    // ANCHOR_END: pipeline_refusal
    #[error(
        "--recompute {0} with --pp > 1 is not built: chapter 4's stages keep every micro-batch's activations; use --recompute none with pipelines"
    )]
    PipelineRecompute(Recompute),
    #[error("--microbatches must be 1 without --pp (chapter 6's data-parallel ranks take whole batches), got {0}")]
    MicrobatchesWithoutPipeline(usize),
    #[error(transparent)]
    Hybrid(#[from] HybridError),
    #[error(
        "--nproc-per-node {nproc} starts {nproc} ranks, but the grid --dp x --tp x --pp has {grid}: one process per rank"
    )]
    NprocNotGrid { nproc: usize, grid: usize },
    #[error("WORLD_SIZE is {world}, but the grid --dp x --tp x --pp has {grid} ranks: start one process per rank")]
    WorldSize { world: usize, grid: usize },
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("rank 0 returned no report")]
    NoReport,
}

/// One rank's account of a run. Serializable: process ranks send it to rank 0.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ZeroRankReport {
    /// Its rank in the grid (rank = tp_rank + tp · dp_rank), and its coordinates.
    pub rank: usize,
    pub dp_rank: usize,
    pub tp_rank: usize,
    /// What it sent and received inside its tensor group (nothing without one).
    pub tp_comm: CommStats,
    pub memory: MemoryReport,
    /// What the formula says the ledger's peaks must be.
    pub predicted: Prediction,
    pub comm: CommStats,
    /// What the last training step alone sent and received.
    pub step_comm: CommStats,
}

pub struct ZeroReport {
    pub dp: usize,
    /// Tensor-parallel ranks (1: none): the units are a tensor rank's shard's.
    pub tp: usize,
    pub zero: ZeroStage,
    pub recompute: Recompute,
    /// Chapter 1's report from rank 0: every step's loss and norm, the parameters gathered into
    /// chapter 1's layout.
    pub report: TrainReport,
    pub ranks: Vec<ZeroRankReport>,
    /// The units the flat buffer is sharded by, on these `dp` ranks.
    pub units: Vec<Unit>,
    /// Activation floats per token by the formula, and the tokens of each rank's pass.
    pub activations: ActivationFloats,
    pub tokens_per_rank: usize,
    /// T: tokens per sequence.
    pub seq_len: usize,
}

fn check(cfg: &ZeroConfig, grid: &GridShape) -> Result<ZeroStage, ZeroError> {
    let stage = ZeroStage::new(cfg.zero).ok_or(ZeroError::BadStage(cfg.zero))?;
    if matches!(cfg.train.device, DeviceRequest::Cuda(_)) {
        return Err(ZeroError::GpuRanks);
    }
    let (dp, batch) = (cfg.dp, cfg.train.batch_size);
    match () {
        _ if dp == 0 => return Err(ZeroError::ZeroRanks),
        _ if dp > MAX_THREAD_RANKS => return Err(ZeroError::TooManyRanks(dp)),
        _ if batch > 0 && !batch.is_multiple_of(dp) => return Err(ZeroError::BatchNotDivisible { batch, dp }),
        _ => {}
    }
    cfg.train.validate()?;
    // Chapter 3's checks of the split (heads, MLP, vocabulary), and the grid's size.
    check_tp(&TpConfig { train: cfg.train.clone(), tp: grid.tp, dp: 1, sequence_parallel: false, fault: None })?;
    if dp.saturating_mul(grid.tp) > MAX_THREAD_RANKS {
        return Err(ZeroError::TooManyGridRanks { dp, tp: grid.tp });
    }
    let model = model_config(&cfg.train, Tokenizer::new(cfg.train.tokenizer).vocab_size())?;
    let t = cfg.train.seq_len.unwrap_or(model.block_size);
    if batch > 0 && t > 0 {
        // dp x tp ranks of chapter 1's size at most: ZeRO, tensor parallelism and
        // recomputation only take away.
        preflight::check_memory(&cfg.train, &model, batch / dp, t, Device::Cpu, dp * grid.tp)?;
    }
    Ok(stage)
}

struct RankResult {
    report: ZeroRankReport,
    /// Rank 0: the loop's outcome and the gathered model.
    leader: Option<(LoopOutcome, Vec<f32>)>,
    units: Vec<Unit>,
}

// ANCHOR: grid_groups
/// Rank `world.rank()` of a dp x tp grid: its data-parallel group (ZeRO's), and how it runs
/// the model's parts: whole with one tensor rank, else chapter 5's `TpParts` over its tensor
/// group (and that group once more, to gather the shards).
fn grid_groups(
    mut world: Box<dyn Communicator>,
    model: &ch01_single_gpu::config::ModelConfig,
    tp: usize,
) -> Result<RankGroups, TrainError> {
    if tp == 1 {
        return Ok((world, Box::new(Whole), None)); // chapter 2's ranks: the world is the group
    }
    let (rank, dp) = (world.rank(), world.world_size() / tp);
    let grid = Grid::new(dp, tp, 1);
    let data = world.split(&grid.group(GroupKind::Data, rank))?;
    let tensor = world.split(&grid.group(GroupKind::Tensor, rank))?;
    let gather = world.split(&grid.group(GroupKind::Tensor, rank))?;
    Ok((data, Box::new(TpParts::new(model, tensor, None)), Some(gather)))
}
// ANCHOR_END: grid_groups

// ANCHOR: run_rank
/// One rank: its trainer over the data-parallel group, driven by chapter 1's loop.
fn run_rank(
    cfg: &ZeroConfig,
    (stage, tp, processes): (ZeroStage, usize, bool),
    world: Box<dyn Communicator>,
    dataset: Arc<Dataset>,
    trace: &Trace,
) -> Result<RankResult, ZeroError> {
    let train = &cfg.train;
    let model = model_config(train, Tokenizer::new(train.tokenizer).vocab_size())?;
    let t = check_config(train, &model)?;
    dataset.check_seq_len(t).map_err(TrainError::from)?;
    let run = run_shape(train, &model, t, &dataset);
    let rank = world.rank();
    let (comm, parts, gather) = grid_groups(world, &model, tp)?;
    let (dp_rank, dp) = (comm.rank(), comm.world_size());
    let rows = train.batch_size / dp;
    let groups = (comm, parts, gather);
    let mut me = ZeroRank::on_shard(train, model, (stage, cfg.recompute), groups, (rows, t), run, dataset)?;
    me.trace = trace.lane(rank as u32, 0);
    let m = &me.model;
    let n_params =
        (ch01_single_gpu::params::ParamLayout::new(m).total - (m.padded_vocab_size() - m.vocab_size) * m.n_embd) as f64;
    let tensor = match tp {
        1 => String::new(),
        _ => format!(" | tensor parallel: {tp} ranks, {} heads each", m.n_head / tp),
    };
    let header = format!(
        "device: cpu ({} {}) | dtype: f32 | model: {} layers, {} heads, {} dims, {:.2}M parameters | tokenizer: {:?} | data parallel: {dp} ranks, {rows} rows each{tensor} | ZeRO stage {stage} | recompute {}",
        dp * tp,
        if processes { "processes over TCP" } else { "thread ranks" },
        m.n_layer,
        m.n_head,
        m.n_embd,
        n_params / 1e6,
        train.tokenizer,
        cfg.recompute
    );
    let outcome = drive(train, &mut me, rank == 0, &header)?;
    let gathered = me.gather_all()?; // collective: every rank takes part
    let report = ZeroRankReport {
        rank,
        dp_rank,
        tp_rank: rank % tp,
        tp_comm: me.tp_stats(),
        memory: me.ledger().report(),
        predicted: predict(stage, me.units(), dp, dp_rank),
        comm: me.comm_stats(),
        step_comm: me.step_comm.clone(),
    };
    let leader = (rank == 0).then_some((outcome, gathered.params));
    Ok(RankResult { report, leader, units: me.units().to_vec() })
}
// ANCHOR_END: run_rank

// ANCHOR: train
/// Trains with `dp` data-parallel thread ranks under ZeRO stage `zero`, recomputing as asked.
pub fn train(cfg: &ZeroConfig) -> Result<ZeroReport, ZeroError> {
    train_on_grid(cfg, &GridShape::default())
}

/// The same on a dp x tp grid: `dp * tp` thread ranks, ZeRO over each data-parallel group.
pub fn train_on_grid(cfg: &ZeroConfig, grid: &GridShape) -> Result<ZeroReport, ZeroError> {
    let run = prepare(cfg, grid)?;
    let (rank_cfg, rank_trace, dataset) = (run.cfg.clone(), run.trace.clone(), run.dataset.clone());
    let (stage, tp) = (run.stage, run.tp);
    let results = launch(run.cfg.dp * tp, move |comm| {
        run_rank(&rank_cfg, (stage, tp, false), Box::new(comm), dataset.clone(), &rank_trace)
    })?;
    let mut ranks = Vec::new();
    let (mut leader, mut units) = (None, Vec::new());
    for result in results {
        leader = leader.or(result.leader);
        units = result.units;
        ranks.push(result.report);
    }
    let leader = leader.ok_or(ZeroError::NoReport)?;
    let device = match tp {
        1 => format!("cpu ({} data-parallel ranks on threads)", run.cfg.dp),
        _ => format!("cpu ({} thread ranks: dp {} x tp {tp})", run.cfg.dp * tp, run.cfg.dp),
    };
    finish(run, leader, (ranks, units), device)
}
// ANCHOR_END: train

/// What every run checks and loads before its ranks start, threads or processes.
struct Prepared {
    cfg: ZeroConfig,
    stage: ZeroStage,
    tp: usize,
    dataset: Arc<Dataset>,
    trace: Trace,
}

fn prepare(cfg: &ZeroConfig, grid: &GridShape) -> Result<Prepared, ZeroError> {
    if grid.pp > 1 {
        return Err(ZeroError::Train(TrainError::OutOfRange {
            flag: "--pp",
            expected: "1 here (train_pipelined runs pipelines)",
            value: grid.pp.to_string(),
        }));
    }
    if grid.microbatches != 1 {
        return Err(ZeroError::MicrobatchesWithoutPipeline(grid.microbatches));
    }
    let stage = check(cfg, grid)?;
    let cfg = ZeroConfig { train: TrainConfig { device: DeviceRequest::Cpu, ..cfg.train.clone() }, ..cfg.clone() };
    let tokenizer = Tokenizer::new(cfg.train.tokenizer);
    let model = model_config(&cfg.train, tokenizer.vocab_size())?;
    check_config(&cfg.train, &model)?;
    let dataset = Arc::new(load_dataset(&cfg.train.data, &tokenizer)?);
    let trace = if cfg.train.trace.is_some() { Trace::enabled() } else { Trace::disabled() };
    Ok(Prepared { cfg, stage, tp: grid.tp, dataset, trace })
}

/// ...and after, from rank 0's loop and model and every rank's report: the trace written, the
/// sample drawn, the run's report.
fn finish(
    run: Prepared,
    (LoopOutcome { steps, val_losses, train_seconds }, params): (LoopOutcome, Vec<f32>),
    (ranks, units): (Vec<ZeroRankReport>, Vec<Unit>),
    device: String,
) -> Result<ZeroReport, ZeroError> {
    let Prepared { cfg, stage, tp, trace, .. } = run;
    if let Some(path) = &cfg.train.trace {
        trace.write_chrome_json(path).map_err(|source| TrainError::Io { path: path.clone(), source })?;
    }
    let train = &cfg.train;
    let tokenizer = Tokenizer::new(train.tokenizer);
    let model = model_config(train, tokenizer.vocab_size())?;
    let t = check_config(train, &model)?;
    let layout = ch01_single_gpu::params::ParamLayout::new(&model);
    let sample = match train.sample_tokens {
        0 => None,
        tokens => {
            let sample_cfg =
                SampleConfig { tokens, temperature: train.temperature, top_k: train.top_k, seed: train.seed };
            let prompt = tokenizer.encode(&train.prompt);
            let out = generate(&layout.views(View::Cpu(&params)), &model, &prompt, sample_cfg, Device::Cpu, DType::F32)
                .map_err(TrainError::from)?;
            Some(train.prompt.clone() + &tokenizer.decode(&out))
        }
    };
    let tokens = (steps.len() * train.batch_size * t * train.grad_accum) as f64;
    let report = TrainReport {
        model: model.clone(),
        tokenizer: train.tokenizer,
        device,
        dtype: DType::F32,
        flops_per_token: model.flops_per_token(t),
        peak_flops: None,
        n_params: layout.total - (model.padded_vocab_size() - model.vocab_size) * model.n_embd,
        steps,
        val_losses,
        tokens_per_sec: if train_seconds > 0.0 { tokens / train_seconds } else { 0.0 },
        memory: ranks[0].memory.clone(),
        sample,
        layout,
        params,
    };
    let (shape, columns) = (BlockShape::shard(&model, tp), model.padded_vocab_size() / tp);
    Ok(ZeroReport {
        dp: cfg.dp,
        tp,
        zero: stage,
        recompute: cfg.recompute,
        report,
        ranks,
        units,
        activations: ActivationFloats::on_shard(&model, t, cfg.recompute, shape, columns),
        tokens_per_rank: train.batch_size / cfg.dp * t,
        seq_len: t,
    })
}

/// `--nproc-per-node K`, before any process starts: the run's own checks, and K the grid's size.
pub fn check_launch(cfg: &ZeroConfig, grid: &GridShape, nproc: usize) -> Result<(), ZeroError> {
    if grid.pp > 1 {
        return Ok(ch05_3d_hybrid::hybrid::check_launch(&pipelined_config(cfg, grid)?, nproc)?);
    }
    prepare(cfg, grid)?;
    let ranks = cfg.dp * grid.tp;
    if nproc != ranks {
        return Err(ZeroError::NprocNotGrid { nproc, grid: ranks });
    }
    Ok(())
}

/// What a process rank hands rank 0 at the end: its figures and its lanes of the trace.
#[derive(Serialize, Deserialize)]
struct ProcessReport {
    rank: ZeroRankReport,
    events: Vec<TraceEvent>,
    origin_unix_us: f64,
}

// ANCHOR: train_process
/// This process is one rank of the grid (`config`: `WORLD_SIZE`, `RANK`, `MASTER_ADDR`,
/// `MASTER_PORT`, as `--nproc-per-node` or torchrun sets them): the same `run_rank` as a thread
/// rank's, over TCP, under chapter 2's process runner. Rank 0 returns the run's report, with
/// every rank's figures; the other ranks return `None`. With `--pp`, chapter 5's process rank.
pub fn train_this_process(
    cfg: &ZeroConfig,
    grid: &GridShape,
    config: &RendezvousConfig,
) -> Result<Option<Ran>, ZeroError> {
    if grid.pp > 1 {
        let hybrid = pipelined_config(cfg, grid)?;
        let report = ch05_3d_hybrid::hybrid::train_this_process(&hybrid, config)?;
        return Ok(report.map(Ran::Pipelined));
    }
    let run = prepare(cfg, grid)?;
    let n = run.cfg.dp * run.tp;
    // Checked before meeting the other ranks, which would wait for ranks that never come.
    if config.world_size != n {
        return Err(ZeroError::WorldSize { world: config.world_size, grid: n });
    }
    let (stage, tp) = (run.stage, run.tp);
    let (rank_cfg, dataset, trace) = (&run.cfg, run.dataset.clone(), &run.trace);
    let (lead, all) = run_process_rank(config, |mut world| {
        // The reports travel on a group of their own: the training's byte counts stay its own.
        let mut reports = world.split(&(0..n).collect::<Vec<_>>()).map_err(TrainError::from)?;
        let result = run_rank(rank_cfg, (stage, tp, true), Box::new(world), dataset, trace)?;
        let origin_unix_us = trace.origin_unix_us().unwrap_or(0.0);
        let mine = ProcessReport { rank: result.report, events: trace.events(), origin_unix_us };
        let all = all_gather_json(&mut *reports, &mine).map_err(TrainError::from)?;
        Ok::<_, ZeroError>((result.leader.map(|lead| (lead, result.units)), all))
    })?;
    let Some((lead, units)) = lead else { return Ok(None) };
    // Rank 0's trace gets every rank's lanes, its report every rank's figures.
    let mut ranks = Vec::with_capacity(n);
    for other in all {
        if other.rank.rank != 0 {
            run.trace.merge(other.events, other.origin_unix_us);
        }
        ranks.push(other.rank);
    }
    let device = match tp {
        1 => format!("cpu ({n} data-parallel ranks as processes over TCP)"),
        _ => format!("cpu ({n} processes over TCP: dp {} x tp {tp})", run.cfg.dp),
    };
    Ok(Some(Ran::Grid(finish(run, lead, (ranks, units), device)?)))
}
// ANCHOR_END: train_process

/// What rank 0 of a process job ends with: chapter 6's report, or chapter 5's with pipelines.
pub enum Ran {
    Grid(ZeroReport),
    Pipelined(HybridReport),
}

// ANCHOR: train_pipelined
/// ZeRO with pipelines: chapter 5's dp x tp x pp run, with ZeRO-1 over each data-parallel
/// group at `--zero 1` (each stage's replicas reduce-scatter its gradients, update their
/// shard and all-gather the parameters) and chapter 5 itself at `--zero 0`. Stages 2 and 3
/// are refused with the reason (`ZeroError::PipelineShards`).
pub fn train_pipelined(cfg: &ZeroConfig, grid: &GridShape) -> Result<HybridReport, ZeroError> {
    Ok(ch05_3d_hybrid::train(&pipelined_config(cfg, grid)?)?)
}

/// Chapter 5's configuration of that run, once ZeRO's own refusals are passed.
pub fn pipelined_config(cfg: &ZeroConfig, grid: &GridShape) -> Result<HybridConfig, ZeroError> {
    let stage = ZeroStage::new(cfg.zero).ok_or(ZeroError::BadStage(cfg.zero))?;
    if stage.shards_gradients() {
        return Err(ZeroError::PipelineShards(cfg.zero));
    }
    if cfg.recompute != Recompute::None {
        return Err(ZeroError::PipelineRecompute(cfg.recompute));
    }
    let pipeline = PipelineConfig {
        train: cfg.train.clone(),
        pp: grid.pp,
        microbatches: grid.microbatches,
        dp: cfg.dp,
        schedule: grid.schedule,
        virtual_stages: 1,
        partition: Partition::Uniform,
        timeline: None,
        skip_tied_sum: false,
    };
    Ok(HybridConfig { pipeline, tp: grid.tp, fault: None, shard_optimizer: stage.shards_optimizer() })
}
// ANCHOR_END: train_pipelined
