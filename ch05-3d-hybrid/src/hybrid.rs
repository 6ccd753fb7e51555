//! The three dimensions at once, on one grid: chapter 4's pipeline across stages, each stage
//! split across a tensor-parallel group with chapter 3's pieces (`tp_stage.rs`), and `--dp`
//! copies of the whole pipe summing their gradients with chapter 2's `GradSync`. Each of those
//! is the earlier chapter's code, unchanged; what is new is the grid that makes their groups,
//! and the order in which a step's sums happen:
//!
//! 1. forward and backward of each micro-batch: the tensor group's sums inside every block (and
//!    the vocabulary-parallel embedding and cross-entropy on the first and last stages), the
//!    pipe's sends between stages;
//! 2. after the flush, the tied embedding: its first stage's and last stage's gradients summed,
//!    per tensor rank (both hold the same vocabulary rows);
//! 3. the data-parallel sum of every gradient over the replicas;
//! 4. the global norm: each rank's squared norm (replicated tensors counted by tensor rank 0,
//!    the tied copy once), summed over the tensor group, then over the pipe; every rank clips
//!    with it and takes chapter 1's AdamW step on its shard.

use crate::tp_stage::TpParts;
use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::data::Dataset;
use ch01_single_gpu::params::{ParamLayout, Placement};
use ch01_single_gpu::tokenizer::Tokenizer;
use ch01_single_gpu::train::{LoopOutcome, check_config, drive, load_dataset, model_config};
use ch01_single_gpu::{TrainConfig, TrainError, TrainReport};
use ch02_data_parallel::data_parallel::MAX_THREAD_RANKS;
use ch03_tensor_parallel::tensor_parallel::{TpConfig, TpError, check_tp};
use ch03_tensor_parallel::tp_comm::Fault;
use ch04_pipeline::pipeline::Stage;
use ch04_pipeline::schedule::ScheduleKind;
use ch04_pipeline::stage::copy_by_name;
use ch04_pipeline::train::{
    Gathered, PipelinePlan, check, conclude, measured_bubble, plan, save_gathered, write_trace,
};
use ch04_pipeline::{PipelineConfig, PipelineError, StageReport};
use kernels::comm::grid::{Coords, Grid, GroupKind};
use kernels::comm::process::{all_gather_json, run_rank as run_process_rank};
use kernels::comm::rendezvous::RendezvousConfig;
use kernels::comm::thread::{LaunchError, launch};
use kernels::comm::{CommStats, Communicator, ReduceOp};
use kernels::device::DeviceRequest;
use kernels::trace::TraceEvent;
use kernels::{Category, MemoryReport, Trace};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct HybridConfig {
    /// Chapter 4's flags: the training, --pp, --dp, --microbatches, the schedule and its chunks.
    pub pipeline: PipelineConfig,
    /// Tensor-parallel ranks per stage.
    pub tp: usize,
    /// A deliberate mistake inside the tensor group (tests only: the check must catch it).
    pub fault: Option<Fault>,
    /// Chapter 6's ZeRO-1 over each data-parallel group: Adam's moments sharded, the
    /// gradients reduce-scattered and the parameters all-gathered (false: chapter 2's sum).
    pub shard_optimizer: bool,
}

impl HybridConfig {
    pub fn grid(&self) -> Grid {
        Grid::new(self.pipeline.dp, self.tp, self.pipeline.pp)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Tensor(#[from] TpError),
    #[error(
        "--dp {dp} x --tp {tp} x --pp {pp} is {} ranks, more than are available ({MAX_THREAD_RANKS} thread ranks on the CPU)", dp * tp * pp
    )]
    TooManyRanks { dp: usize, tp: usize, pp: usize },
    #[error(
        "chapter 5's ranks are threads or processes on the CPU here; --device cuda is not built yet (NCCL ranks are unverified without a GPU)"
    )]
    GpuRanks,
    #[error(
        "--nproc-per-node {nproc} starts {nproc} ranks, but the grid --dp x --tp x --pp has {grid}: one process per rank"
    )]
    NprocNotGrid { nproc: usize, grid: usize },
    #[error("WORLD_SIZE is {world}, but the grid --dp x --tp x --pp has {grid} ranks: start one process per rank")]
    WorldSize { world: usize, grid: usize },
    #[error(
        "--schedule zb-h1 is chapter 4's (a whole-width stage); chapter 5's stages would need chapter 3's vocabulary-parallel head split into B and W, which is not built: use 1f1b or interleaved"
    )]
    ZeroBubble,
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("rank 0 returned no report")]
    NoReport,
}

/// One rank's account of a run: its place in the grid, its stage, what it held and what each
/// of its groups carried. Serializable: process ranks send it to rank 0.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HybridRankReport {
    pub rank: usize,
    pub coords: Coords,
    /// Its stage, and the blocks of each of its model chunks.
    pub stage: usize,
    pub blocks: Vec<Range<usize>>,
    /// Floats of its shard of the stage's tensors (parameters; as many gradients).
    pub shard_floats: usize,
    pub memory: MemoryReport,
    /// What it sent and received in its tensor group, its pipe and its data group.
    pub tensor_comm: CommStats,
    pub pipe_comm: CommStats,
    pub data_comm: CommStats,
    /// Micro-batches whose activations it held at once.
    pub peak_in_flight: usize,
}

impl HybridRankReport {
    fn new(rank: usize, coords: Coords, s: &StageReport) -> HybridRankReport {
        HybridRankReport {
            rank,
            coords,
            stage: s.stage,
            blocks: s.blocks.clone(),
            shard_floats: s.layout.total,
            memory: s.memory.clone(),
            tensor_comm: s.stage_comm.clone(),
            pipe_comm: s.comm.clone(),
            data_comm: s.dp_comm.clone(),
            peak_in_flight: s.peak_in_flight,
        }
    }
}

pub struct HybridReport {
    pub grid: Grid,
    pub plan: PipelinePlan,
    /// Micro-batches per batch, rows of each (B / (dp · microbatches)), and tokens per row.
    pub microbatches: usize,
    pub rows: usize,
    pub t: usize,
    /// The last step's bubble as measured on the first pipe, when traced.
    pub measured_bubble: Option<f64>,
    /// Chapter 1's report of the run, the parameters gathered into chapter 1's layout.
    pub report: TrainReport,
    /// Every rank's, in rank order.
    pub ranks: Vec<HybridRankReport>,
    /// Every rank's stage with its final tensors, in its own layout, in rank order: on thread
    /// ranks only (on processes they stay in their processes).
    pub stages: Vec<StageReport>,
}

/// The flags checked against each other and the model, once, before any rank starts: chapter
/// 4's checks of the pipe, chapter 3's of the tensor split, and the grid's size.
pub fn check_hybrid(cfg: &HybridConfig, model: &ModelConfig) -> Result<(), HybridError> {
    if matches!(cfg.pipeline.train.device, DeviceRequest::Cuda(_)) {
        return Err(HybridError::GpuRanks);
    }
    let p = &cfg.pipeline;
    if p.schedule == ScheduleKind::ZbH1 {
        return Err(HybridError::ZeroBubble);
    }
    // The pipe alone first (dp 1, and batch 0, which skips the batch's split: an error about
    // it would name dp 1; it is checked with the real --dp below).
    let pipe_alone = PipelineConfig { dp: 1, train: TrainConfig { batch_size: 0, ..p.train.clone() }, ..p.clone() };
    check(&pipe_alone, model)?;
    check_tp(&TpConfig { train: p.train.clone(), tp: cfg.tp, dp: 1, sequence_parallel: false, fault: None })?;
    let (dp, tp, pp) = (p.dp, cfg.tp, p.pp);
    if dp.saturating_mul(tp).saturating_mul(pp) > MAX_THREAD_RANKS {
        return Err(HybridError::TooManyRanks { dp, tp, pp });
    }
    check(p, model)?; // now with --dp: the batch split into replicas and micro-batches
    Ok(())
}

/// `--nproc-per-node K`, checked before any process starts: the flags, and K against the grid.
pub fn check_launch(cfg: &HybridConfig, nproc: usize) -> Result<(), HybridError> {
    let model = model_config(&cfg.pipeline.train, Tokenizer::new(cfg.pipeline.train.tokenizer).vocab_size())?;
    check_hybrid(cfg, &model)?;
    let grid = cfg.grid().world_size();
    if nproc != grid {
        return Err(HybridError::NprocNotGrid { nproc, grid });
    }
    Ok(())
}

/// What rank 0 alone ends a run with: the training loop's outcome, and the model gathered into
/// chapter 1's layout.
pub type Leader = (LoopOutcome, Gathered);

// ANCHOR: run_rank
/// One rank of the grid, on any communicator (thread ranks, or this process's TCP rank): its
/// three groups cut from the world by the grid, its stage run by chapter 4's interpreter with
/// chapter 3's shard, and at the end its share put back into chapter 1's layout on rank 0.
pub fn run_rank<C: Communicator>(
    cfg: &HybridConfig,
    mut world: C,
    dataset: Arc<Dataset>,
    trace: &Trace,
) -> Result<(HybridRankReport, StageReport, Option<Leader>), HybridError> {
    let (grid, rank) = (cfg.grid(), world.rank());
    let at = grid.coords(rank);
    let mut group = |kind| world.split(&grid.group(kind, rank)).map_err(TrainError::from);
    let (pipe, tensor) = (group(GroupKind::Pipeline)?, group(GroupKind::Tensor)?);
    let data = if grid.dp > 1 { Some(group(GroupKind::Data)?) } else { None };
    let train = &cfg.pipeline.train;
    let model = model_config(train, Tokenizer::new(train.tokenizer).vocab_size())?;
    let parts = Box::new(TpParts::new(&model, tensor, cfg.fault));
    // A lane per rank: its stage, then its place in the stage (tensor rank, replica).
    let trace = trace.lane(at.pp as u32, (at.tp + grid.tp * at.dp) as u32);
    // Saving needs every rank's share: it is gathered, and saved once the loop is done (not by
    // chapter 4's stage, which gathers a pipe of whole-width stages).
    let loop_cfg = TrainConfig { save: None, ..train.clone() };
    let stage_cfg = PipelineConfig { train: loop_cfg.clone(), ..cfg.pipeline.clone() };
    let mut me = match cfg.shard_optimizer {
        false => Stage::new(&stage_cfg, pipe, (at.dp, data), parts, dataset, trace)?,
        true => Stage::sharding_optimizer(&stage_cfg, pipe, (at.dp, data), parts, dataset, trace)?,
    };
    let outcome = drive(&loop_cfg, &mut me, rank == 0, &header(cfg, &model))?;
    let stage = me.report()?;
    let gathered = gather(&mut world, cfg, &model, at, &stage)?;
    Ok((HybridRankReport::new(rank, at, &stage), stage, gathered.map(|g| (outcome, g))))
}
// ANCHOR_END: run_rank

// ANCHOR: gather
/// Chapter 1's layout from every rank's share, on rank 0 (the others get `None`): each rank
/// writes the tensors only it is to write (its replica is the first, its stage holds them and,
/// for the tied wte, is the first stage; a replicated tensor by tensor rank 0) into zeros of
/// chapter 1's size, and one sum over the world puts them together (x + 0 is x, exactly).
fn gather<C: Communicator>(
    world: &mut C,
    cfg: &HybridConfig,
    model: &ModelConfig,
    at: Coords,
    stage: &StageReport,
) -> Result<Option<Gathered>, HybridError> {
    let full = ParamLayout::new(model);
    let shard = full.shard(cfg.tp).map_err(TpError::from)?;
    let writes = |name: &str| {
        let Some(spec) = shard.get(name) else { return false };
        let tied_copy = name == "wte.weight" && at.pp > 0;
        at.dp == 0 && !tied_copy && (spec.placement != Placement::Replicated || at.tp == 0)
    };
    let mut mine = ParamLayout { specs: Vec::new(), total: stage.layout.total, n_layer: stage.layout.n_layer };
    mine.specs = stage.layout.specs.iter().filter(|s| writes(&s.name)).cloned().collect();
    let (tp, full_total) = (cfg.tp, full.total);
    let mut put_together = |piece: &[f32]| -> Result<Vec<f32>, TrainError> {
        let mut shard_buf = vec![0.0; shard.total];
        copy_by_name(&mine, piece, &shard, &mut shard_buf);
        let mut whole = vec![0.0; full_total];
        full.put_shard(&shard, &shard_buf, at.tp, tp, &mut whole);
        world.all_reduce(&mut whole, ReduceOp::Sum)?;
        Ok(whole)
    };
    let params = put_together(&stage.params)?;
    let (adam_m, adam_v) = (put_together(&stage.adam_m)?, put_together(&stage.adam_v)?);
    let gathered = Gathered { params, adam_m, adam_v, step: stage.step, sampler: stage.sampler.clone() };
    Ok((world.rank() == 0).then_some(gathered))
}
// ANCHOR_END: gather

/// The line the run starts with.
fn header(cfg: &HybridConfig, model: &ModelConfig) -> String {
    let (p, grid) = (&cfg.pipeline, cfg.grid());
    let rows = p.train.batch_size / (p.dp * p.microbatches);
    format!(
        "grid: dp {} x tp {} x pp {} = {} ranks | model: {} layers, {} heads, {} dims | each stage over {} tensor ranks ({} heads each) | {} micro-batches of {} rows, {}",
        grid.dp,
        grid.tp,
        grid.pp,
        grid.world_size(),
        model.n_layer,
        model.n_head,
        model.n_embd,
        grid.tp,
        model.n_head / grid.tp,
        p.microbatches,
        rows,
        p.schedule,
    )
}

/// What every way of running the ranks does before they start: the checks, the pipeline's
/// plan, the data, the trace.
struct Prepared {
    cfg: HybridConfig,
    model: ModelConfig,
    t: usize,
    plan: PipelinePlan,
    dataset: Arc<Dataset>,
    trace: Trace,
}

fn prepare(cfg: &HybridConfig) -> Result<Prepared, HybridError> {
    let tokenizer = Tokenizer::new(cfg.pipeline.train.tokenizer);
    let model = model_config(&cfg.pipeline.train, tokenizer.vocab_size())?;
    check_hybrid(cfg, &model)?;
    let mut cfg = cfg.clone();
    cfg.pipeline.train.device = DeviceRequest::Cpu;
    let p = &cfg.pipeline;
    let t = check_config(&p.train, &model)?;
    let plan = plan(p, &model, t)?;
    let dataset = Arc::new(load_dataset(&p.train.data, &tokenizer)?);
    let traced = p.train.trace.is_some() || p.timeline.is_some();
    let trace = if traced { Trace::enabled() } else { Trace::disabled() };
    Ok(Prepared { cfg, model, t, plan, dataset, trace })
}

/// ...and after, on rank 0: the trace written, the checkpoint saved, the report.
fn finish(
    run: Prepared,
    (outcome, gathered): Leader,
    (ranks, stages): (Vec<HybridRankReport>, Vec<StageReport>),
    device: String,
) -> Result<HybridReport, HybridError> {
    let Prepared { cfg, model, t, plan, dataset, trace } = run;
    let p = &cfg.pipeline;
    let grid = cfg.grid();
    write_trace(p, &trace, |pp, lane| {
        let at = Coords { pp: pp as usize, tp: lane as usize % grid.tp, dp: lane as usize / grid.tp };
        format!("rank {} (dp {}, tp {}, pp {pp})", grid.rank(at), at.dp, at.tp)
    })?;
    let memory = ranks[0].memory.clone();
    save_gathered(p, &model, (t, &dataset), &gathered)?;
    let report = conclude(p, &model, t, gathered.params, outcome, memory, device)?;
    let (microbatches, rows) = (p.microbatches, p.train.batch_size / (p.dp * p.microbatches));
    let measured_bubble = measured_bubble(&trace, p.pp);
    Ok(HybridReport { grid, plan, microbatches, rows, t, measured_bubble, report, ranks, stages })
}

// ANCHOR: train
/// Trains on a dp x tp x pp grid of thread ranks and reports chapter 1's figures (the
/// parameters gathered into chapter 1's layout) and every rank's.
pub fn train(cfg: &HybridConfig) -> Result<HybridReport, HybridError> {
    let run = prepare(cfg)?;
    let grid = run.cfg.grid();
    // Each rank owns what it uses (the launcher's ranks are `'static` threads).
    let (rank_cfg, rank_trace, rank_data) = (run.cfg.clone(), run.trace.clone(), run.dataset.clone());
    let results = launch(grid.world_size(), move |comm| run_rank(&rank_cfg, comm, rank_data.clone(), &rank_trace))?;
    let (mut ranks, mut stages) = (Vec::with_capacity(results.len()), Vec::with_capacity(results.len()));
    let mut leader = None;
    for (rank, stage, lead) in results {
        leader = leader.or(lead);
        ranks.push(rank);
        stages.push(stage);
    }
    let leader = leader.ok_or(HybridError::NoReport)?;
    let device = format!("cpu ({} thread ranks: dp {} x tp {} x pp {})", grid.world_size(), grid.dp, grid.tp, grid.pp);
    finish(run, leader, (ranks, stages), device)
}
// ANCHOR_END: train

/// What a process rank hands rank 0 at the end: its figures and its lanes of the trace.
#[derive(Serialize, Deserialize)]
struct ProcessReport {
    rank: HybridRankReport,
    events: Vec<TraceEvent>,
    origin_unix_us: f64,
}

// ANCHOR: train_process
/// This process is one rank of the grid (`config`: `WORLD_SIZE`, `RANK`, `MASTER_ADDR`,
/// `MASTER_PORT`, as `--nproc-per-node` or torchrun sets them): the same `run_rank` as a thread
/// rank's, over TCP, under chapter 2's process runner (a failure anywhere ends every rank with
/// one line naming the first). Rank 0 returns the run's report, with its own rank's figures
/// only; the other ranks return `None`.
pub fn train_this_process(cfg: &HybridConfig, config: &RendezvousConfig) -> Result<Option<HybridReport>, HybridError> {
    let run = prepare(cfg)?;
    let grid = run.cfg.grid();
    // Checked before meeting the other ranks, which would wait for ranks that never come.
    if config.world_size != grid.world_size() {
        return Err(HybridError::WorldSize { world: config.world_size, grid: grid.world_size() });
    }
    let (rank_cfg, dataset, trace) = (&run.cfg, run.dataset.clone(), &run.trace);
    let n = grid.world_size();
    let (lead, all) = run_process_rank(config, |mut world| {
        // The reports travel on a group of their own: the training's byte counts stay its own.
        let mut reports = world.split(&(0..n).collect::<Vec<_>>()).map_err(TrainError::from)?;
        let (rank, _stage, lead) = run_rank(rank_cfg, world, dataset, trace)?;
        let origin_unix_us = trace.origin_unix_us().unwrap_or(0.0);
        let mine = ProcessReport { rank, events: trace.events(), origin_unix_us };
        let all = all_gather_json(&mut *reports, &mine).map_err(TrainError::from)?;
        Ok::<_, HybridError>((lead, all))
    })?;
    let Some(lead) = lead else { return Ok(None) };
    // Rank 0's trace gets every rank's lanes, its report every rank's figures.
    let mut ranks = Vec::with_capacity(n);
    for other in all {
        if other.rank.rank != 0 {
            run.trace.merge(other.events, other.origin_unix_us);
        }
        ranks.push(other.rank);
    }
    let device =
        format!("cpu ({} processes over TCP: dp {} x tp {} x pp {})", grid.world_size(), grid.dp, grid.tp, grid.pp);
    Ok(Some(finish(run, lead, (ranks, Vec::new()), device)?))
}
// ANCHOR_END: train_process

/// Bytes of one rank's memory at its peak, by category (0 where it held none).
pub fn held(rank: &HybridRankReport, category: Category) -> u64 {
    rank.memory.at_peak.get(&category).copied().unwrap_or(0)
}
