//! The pipeline trainer: the flags, the checks, one thread per stage (`pipeline.rs`), and the
//! stages' shares gathered back into chapter 1's layout for the report and the checkpoint.

use crate::pipeline::Stage;
use crate::schedule::{Pipe, Schedule, ScheduleKind};
use crate::simulate::{Costs, ScheduleError, simulate, simulate_stages};
use crate::stage::{PartCosts, Partition, balanced_partition, copy_by_name, uniform_partition};
use ch01_single_gpu::checkpoint::{self, CheckpointContents, TrainerState};
use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::data::{BatchSampler, Dataset};
use ch01_single_gpu::model::Whole;
use ch01_single_gpu::params::ParamLayout;
use ch01_single_gpu::sample::{SampleConfig, generate};
use ch01_single_gpu::tokenizer::Tokenizer;
use ch01_single_gpu::train::{LoopOutcome, check_config, drive, load_dataset, model_config, run_shape};
use ch01_single_gpu::{TrainConfig, TrainError, TrainReport};
use ch02_data_parallel::data_parallel::MAX_THREAD_RANKS;
use kernels::comm::grid::{Grid, GroupKind};
use kernels::comm::thread::{LaunchError, ThreadComm, launch};
use kernels::comm::{CommStats, Communicator};
use kernels::device::DeviceRequest;
use kernels::{DType, Device, MemoryReport, Trace, View};
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub train: TrainConfig,
    /// Pipeline stages (thread ranks), each a contiguous range of blocks.
    pub pp: usize,
    /// Micro-batches each pipe's share of a batch of B sequences is split into.
    pub microbatches: usize,
    /// Pipelines side by side (data parallelism): each computes B/dp rows of every batch, and
    /// their gradients are summed after the flush.
    pub dp: usize,
    pub schedule: ScheduleKind,
    /// Model chunks per stage (the interleaved schedule; 1 otherwise).
    pub virtual_stages: usize,
    pub partition: Partition,
    /// Draw the last training step of every stage as an SVG timeline here (measured).
    pub timeline: Option<std::path::PathBuf>,
    /// For the tests: leave out the sum of the tied embedding's two gradients (and so compute a
    /// wrong gradient), to show that the equivalence check catches it.
    pub skip_tied_sum: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("--pp must be at least 1")]
    ZeroStages,
    #[error("--pp {pp} is more stages than the model has blocks ({n_layer}): every stage needs at least one")]
    MoreStagesThanBlocks { pp: usize, n_layer: usize },
    #[error("--pp {pp} x --dp {dp} is more ranks than are available ({MAX_THREAD_RANKS} thread ranks on the CPU)")]
    TooManyRanks { pp: usize, dp: usize },
    #[error("--dp must be at least 1")]
    ZeroReplicas,
    #[error("--microbatches must be at least 1")]
    ZeroMicrobatches,
    #[error(
        "--microbatches {m} x --dp {dp} does not divide the batch of {batch} sequences: every micro-batch must have as many"
    )]
    MicrobatchesNotDividing { m: usize, dp: usize, batch: usize },
    #[error(
        "chapter 4's stages are threads on the CPU (GPU stages, over NCCL, are not built yet); run it with --device cpu or auto"
    )]
    GpuRanks,
    #[error(
        "the interleaved schedule sends micro-batches through each chunk in groups of --pp {pp}: the {m} micro-batches per step (--microbatches x --grad-accum) must be a multiple of it"
    )]
    InterleavedGroups { pp: usize, m: usize },
    #[error("--virtual-stages must be at least 1")]
    ZeroChunks,
    #[error("--virtual-stages {v} needs --schedule interleaved (the other schedules run one chunk per stage)")]
    ChunksNeedInterleaved { v: usize },
    #[error(
        "--pp {pp} x --virtual-stages {v} is {chunks} model chunks, more than the model has blocks ({n_layer}): every chunk needs at least one"
    )]
    MoreChunksThanBlocks { pp: usize, v: usize, chunks: usize, n_layer: usize },
    #[error("the {schedule} schedule is broken: {source}")]
    Schedule { schedule: ScheduleKind, source: ScheduleError },
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("the last stage returned no report")]
    NoReport,
}

/// One stage's account of a run.
#[derive(Clone, Debug)]
pub struct StageReport {
    pub stage: usize,
    /// Which of the --dp pipelines it belongs to, and what its gradient sync sent.
    pub replica: usize,
    pub dp_comm: CommStats,
    /// The blocks of each of its model chunks (one chunk but for the interleaved schedule).
    pub blocks: Vec<Range<usize>>,
    pub memory: MemoryReport,
    pub comm: CommStats,
    /// The traffic inside the stage: its tensor-parallel group's in chapter 5, none here.
    pub stage_comm: CommStats,
    /// Micro-batches whose activations this stage held at once (the schedule's prediction).
    pub peak_in_flight: usize,
    /// Floats of one micro-batch's activations on this stage.
    pub micro_activation_bytes: u64,
    /// The stage's final parameters and Adam moments, in its own layout.
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
    /// Where the data stood at the end (the same on every stage).
    pub sampler: BatchSampler,
    pub step: u64,
}

pub struct PipelineReport {
    pub pp: usize,
    pub microbatches: usize,
    /// Micro-batches per optimizer step: --microbatches x --grad-accum.
    pub micro_per_step: usize,
    /// Model chunks per stage.
    pub virtual_stages: usize,
    pub schedule: ScheduleKind,
    /// The simulated bubble fraction of one step with equal stages (a forward 1, a backward 2)...
    pub bubble: f64,
    /// ...and with each stage's estimated cost ([`PartCosts`]).
    pub bubble_estimated: f64,
    /// Each stage's share of the estimated cost of a step.
    pub estimated_shares: Vec<f64>,
    /// The last step's bubble as measured, when the run was traced (see [`measured_bubble`]).
    pub measured_bubble: Option<f64>,
    /// Chapter 1's report: every step's loss and norm, and the stages' parameters gathered into
    /// chapter 1's layout.
    pub report: TrainReport,
    /// The first pipe's stages, in order...
    pub stages: Vec<StageReport>,
    /// ...and, with --dp, the other pipes' (by world rank).
    pub replicas: Vec<StageReport>,
}

pub fn check(cfg: &PipelineConfig, model: &ModelConfig) -> Result<(), PipelineError> {
    if matches!(cfg.train.device, DeviceRequest::Cuda(_)) {
        return Err(PipelineError::GpuRanks);
    }
    let (pp, m, batch, v, dp) = (cfg.pp, cfg.microbatches, cfg.train.batch_size, cfg.virtual_stages, cfg.dp);
    match () {
        _ if pp == 0 => Err(PipelineError::ZeroStages),
        _ if dp == 0 => Err(PipelineError::ZeroReplicas),
        _ if pp * dp > MAX_THREAD_RANKS => Err(PipelineError::TooManyRanks { pp, dp }),
        _ if pp > model.n_layer => Err(PipelineError::MoreStagesThanBlocks { pp, n_layer: model.n_layer }),
        _ if m == 0 => Err(PipelineError::ZeroMicrobatches),
        _ if v == 0 => Err(PipelineError::ZeroChunks),
        _ if v > 1 && cfg.schedule != ScheduleKind::Interleaved => Err(PipelineError::ChunksNeedInterleaved { v }),
        _ if pp * v > model.n_layer => {
            Err(PipelineError::MoreChunksThanBlocks { pp, v, chunks: pp * v, n_layer: model.n_layer })
        }
        _ if cfg.schedule == ScheduleKind::Interleaved && !(m * cfg.train.grad_accum).is_multiple_of(pp) => {
            Err(PipelineError::InterleavedGroups { pp, m: m * cfg.train.grad_accum })
        }
        _ if batch > 0 && !batch.is_multiple_of(m * dp) => Err(PipelineError::MicrobatchesNotDividing { m, dp, batch }),
        _ => Ok(()),
    }
}

/// The blocks of each virtual stage (--pp x --virtual-stages of them, in pipe order), as
/// `cfg.partition` says.
pub fn partition(cfg: &PipelineConfig, model: &ModelConfig, t: usize) -> Vec<Range<usize>> {
    let n = cfg.pp * cfg.virtual_stages;
    match cfg.partition {
        Partition::Uniform => uniform_partition(model.n_layer, n),
        Partition::Balanced => balanced_partition(model.n_layer, n, &PartCosts::estimate(model, t)),
    }
}

// ANCHOR: measured_bubble
/// The last training step's bubble, from the trace: the share of N x the step's length (from the
/// first stage's start to the last one's end) that no stage spent in a forward or a backward.
/// Waiting for messages, the tied sum and the optimizer step all count as idle. `None` when the
/// run was not traced. A stage's lane is (s, 0); chapter 5 traces more lanes per stage (its
/// tensor ranks and replicas), and the first pipe's are the ones measured.
pub fn measured_bubble(trace: &Trace, n: usize) -> Option<f64> {
    let steps: Vec<(f64, f64)> = (0..n).map(|s| trace.last_span("step", s as u32, 0)).collect::<Option<_>>()?;
    let from = steps.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
    let to = steps.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    let computing = |name: &str| ["forward", "backward", "weight"].iter().any(|w| name.starts_with(w));
    let busy: f64 = trace
        .events()
        .iter()
        .filter(|e| e.tid == 0 && e.start_us >= from && e.start_us + e.dur_us <= to && computing(&e.name))
        .map(|e| e.dur_us)
        .sum();
    Some(1.0 - busy / (n as f64 * (to - from)))
}
// ANCHOR_END: measured_bubble

// ANCHOR: check_schedules
/// Simulates the training and evaluation schedules before any rank runs them: a broken one is
/// an error here, not a hang later. Returns the training schedule's bubble fraction.
pub fn check_schedules(
    kind: ScheduleKind,
    pipe: Pipe,
    micro_per_step: usize,
    eval_micro: usize,
) -> Result<f64, PipelineError> {
    let broken = |source| PipelineError::Schedule { schedule: kind, source };
    let sim = simulate(&Schedule::new(kind, pipe.ranks, pipe.chunks, micro_per_step), Costs::UNIT).map_err(broken)?;
    simulate(&Schedule::forward_only(pipe.ranks, pipe.chunks, eval_micro), Costs::UNIT).map_err(broken)?;
    Ok(sim.bubble_fraction())
}
// ANCHOR_END: check_schedules

// ANCHOR: run_stage
/// One rank of the grid: stage s of pipe d is world rank d + dp·s (`Grid`: the pipeline
/// dimension outermost, as in the book's grid). It joins its pipe and its data-parallel group, and runs.
fn run_stage(
    cfg: &PipelineConfig,
    mut world: ThreadComm,
    dataset: Arc<Dataset>,
    trace: &Trace,
) -> Result<(StageReport, Option<LoopOutcome>), PipelineError> {
    let (rank, dp) = (world.rank(), cfg.dp);
    let grid = Grid::new(dp, 1, cfg.pp);
    let replica = grid.coords(rank).dp;
    let pipe = world.split(&grid.group(GroupKind::Pipeline, rank)).map_err(TrainError::from)?;
    let dp_group = match dp {
        1 => None,
        _ => Some(world.split(&grid.group(GroupKind::Data, rank)).map_err(TrainError::from)?),
    };
    // The trace follows the first pipe, one lane per stage.
    let trace = if replica == 0 { trace.lane(grid.coords(rank).pp as u32, 0) } else { Trace::disabled() };
    let mut me = Stage::new(cfg, pipe, (replica, dp_group), Box::new(Whole), dataset, trace)?;
    let header = me.header();
    // A step that saves gathers every stage's share on rank 0 (stage 0 of the first pipe),
    // which writes the checkpoint.
    let leads = rank == 0;
    let outcome = drive(&cfg.train, &mut me, leads, &header)?;
    Ok((me.report()?, leads.then_some(outcome)))
}
// ANCHOR_END: run_stage

/// What a pipeline's step will cost before any rank runs it: the schedules simulated (a broken
/// one is an error here), the bubble with equal stages and with the stages' estimated costs.
pub struct PipelinePlan {
    /// Micro-batches per optimizer step: --microbatches x --grad-accum.
    pub micro_per_step: usize,
    pub bubble: f64,
    pub bubble_estimated: f64,
    pub estimated_shares: Vec<f64>,
}

/// The [`PipelinePlan`] of `cfg` (chapter 5 plans its pipes with it too).
pub fn plan(cfg: &PipelineConfig, model: &ModelConfig, t: usize) -> Result<PipelinePlan, PipelineError> {
    let micro_per_step = cfg.microbatches * cfg.train.grad_accum.max(1);
    let pipe = Pipe { ranks: cfg.pp, chunks: cfg.virtual_stages };
    let bubble = check_schedules(cfg.schedule, pipe, micro_per_step, cfg.microbatches)?;
    // The same schedule with each stage's estimated cost: what an uneven partition costs.
    let (parts, costs) = (partition(cfg, model, t), PartCosts::estimate(model, t));
    let n_virtual = cfg.pp * cfg.virtual_stages;
    let virtual_cost = |v: usize| costs.stage(v, n_virtual, &parts[v]);
    let stage_costs: Vec<f64> =
        (0..cfg.pp).map(|s| (0..pipe.chunks).map(|c| virtual_cost(pipe.virtual_stage(s, c))).sum()).collect();
    let total: f64 = stage_costs.iter().sum();
    let estimated_shares = stage_costs.iter().map(|c| c / total).collect();
    let per_micro: Vec<Costs> = stage_costs
        .iter()
        .map(|c| Costs { forward: c / total, backward: 2.0 * c / total, weight: c / total })
        .collect();
    let simulated = simulate_stages(&Schedule::new(cfg.schedule, cfg.pp, pipe.chunks, micro_per_step), &per_micro)
        .map_err(|source| PipelineError::Schedule { schedule: cfg.schedule, source })?;
    Ok(PipelinePlan { micro_per_step, bubble, bubble_estimated: simulated.bubble_fraction(), estimated_shares })
}

/// The model gathered into chapter 1's layout, with where the data stood: what a run reports and
/// saves, whatever its layout was.
pub struct Gathered {
    pub params: Vec<f32>,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
    pub step: u64,
    pub sampler: BatchSampler,
}

// ANCHOR: train
/// Trains with `pp` pipeline stages on thread ranks and reports chapter 1's figures (the
/// parameters gathered into chapter 1's layout) and every stage's.
pub fn train(cfg: &PipelineConfig) -> Result<PipelineReport, PipelineError> {
    let tokenizer = Tokenizer::new(cfg.train.tokenizer);
    let model = model_config(&cfg.train, tokenizer.vocab_size())?;
    check(cfg, &model)?;
    let cfg = &PipelineConfig { train: TrainConfig { device: DeviceRequest::Cpu, ..cfg.train.clone() }, ..cfg.clone() };
    let t = check_config(&cfg.train, &model)?;
    let PipelinePlan { micro_per_step, bubble, bubble_estimated, estimated_shares } = plan(cfg, &model, t)?;
    let dataset = Arc::new(load_dataset(&cfg.train.data, &tokenizer)?);
    let traced = cfg.train.trace.is_some() || cfg.timeline.is_some();
    let trace = if traced { Trace::enabled() } else { Trace::disabled() };
    // Each rank owns what it uses (the launcher's ranks are `'static` threads).
    let (rank_cfg, rank_trace, rank_data) = (cfg.clone(), trace.clone(), dataset.clone());
    let results = launch(cfg.pp * cfg.dp, move |comm| run_stage(&rank_cfg, comm, rank_data.clone(), &rank_trace))?;
    write_trace(cfg, &trace, |stage, _| format!("stage {stage}"))?;

    // ANCHOR: gather
    // Chapter 1's layout, from every stage's share (the tied wte is the same on both holders):
    // the report's parameters. (The checkpoints, which any layout resumes, were gathered the
    // same way at each step that saved: see `Stage::gather_checkpoint`.)
    let full = ParamLayout::new(&model);
    let mut params = vec![0.0; full.total];
    let mut stages = Vec::new();
    let mut leader = None;
    let mut replicas = Vec::new();
    for (stage, lead) in results {
        leader = leader.or(lead);
        // The pipes end with the same parameters: the first one's are the run's.
        if stage.replica > 0 {
            replicas.push(stage);
            continue;
        }
        copy_by_name(&stage.layout, &stage.params, &full, &mut params);
        stages.push(stage);
    }
    let outcome = leader.ok_or(PipelineError::NoReport)?;
    // ANCHOR_END: gather
    // The checkpoints were written by the loop (`Stage::save`): here, only the report.
    let device = format!("cpu ({} pipeline stages on threads)", cfg.pp);
    let report = conclude(cfg, &model, t, params, outcome, stages[0].memory.clone(), device)?;
    Ok(PipelineReport {
        pp: cfg.pp,
        microbatches: cfg.microbatches,
        micro_per_step,
        virtual_stages: cfg.virtual_stages,
        schedule: cfg.schedule,
        bubble,
        bubble_estimated,
        estimated_shares,
        replicas,
        measured_bubble: measured_bubble(&trace, cfg.pp),
        report,
        stages,
    })
}
// ANCHOR_END: train

/// Writes the run's trace (--trace) and the last step's timeline (--timeline), if asked for,
/// naming the lanes (stage, lane) by `lane_names`.
pub fn write_trace(
    cfg: &PipelineConfig,
    trace: &Trace,
    lane_names: impl Fn(u32, u32) -> String,
) -> Result<(), TrainError> {
    if let Some(path) = &cfg.train.trace {
        trace.write_chrome_json(path).map_err(|source| TrainError::Io { path: path.clone(), source })?;
    }
    // The last step runs from the first stage's first instruction to the last stage's step.
    if let Some(path) = &cfg.timeline
        && let (Some((from, _)), Some((_, to))) =
            (trace.last_span("step", 0, 0), trace.last_span("step", cfg.pp as u32 - 1, 0))
    {
        std::fs::write(path, trace.to_svg(from, to, lane_names))
            .map_err(|source| TrainError::Io { path: path.clone(), source })?;
    }
    Ok(())
}

/// The checkpoint (--save) of a run whose model was `gathered` into chapter 1's layout after its
/// loop (chapter 5: its stages are shards, which chapter 4's in-loop gather does not know).
pub fn save_gathered(
    cfg: &PipelineConfig,
    model: &ModelConfig,
    (t, dataset): (usize, &Dataset),
    gathered: &Gathered,
) -> Result<(), PipelineError> {
    let Some(dir) = &cfg.train.save else { return Ok(()) };
    let full = ParamLayout::new(model);
    let run = run_shape(&cfg.train, model, t, dataset);
    let state = TrainerState { step: gathered.step, sampler: gathered.sampler.clone(), run };
    let optimizer = Some((&gathered.adam_m[..], &gathered.adam_v[..], &state));
    let contents = CheckpointContents { cfg: model, layout: &full, params: &gathered.params, optimizer };
    checkpoint::save(dir, &contents).map_err(TrainError::from)?;
    Ok(())
}

/// The end of a run whose parameters are `params` in chapter 1's layout: the text sample, and
/// chapter 1's report of it.
pub fn conclude(
    cfg: &PipelineConfig,
    model: &ModelConfig,
    t: usize,
    params: Vec<f32>,
    outcome: LoopOutcome,
    memory: MemoryReport,
    device: String,
) -> Result<TrainReport, PipelineError> {
    let full = ParamLayout::new(model);
    let LoopOutcome { steps, val_losses, train_seconds } = outcome;
    let train = &cfg.train;
    let tokenizer = Tokenizer::new(train.tokenizer);
    let sample = match train.sample_tokens {
        0 => None,
        tokens => {
            let sample_cfg =
                SampleConfig { tokens, temperature: train.temperature, top_k: train.top_k, seed: train.seed };
            let prompt = tokenizer.encode(&train.prompt);
            let out = generate(&full.views(View::Cpu(&params)), model, &prompt, sample_cfg, Device::Cpu, DType::F32)
                .map_err(TrainError::from)?;
            Some(train.prompt.clone() + &tokenizer.decode(&out))
        }
    };
    let tokens = (steps.len() * train.batch_size * t * train.grad_accum) as f64;
    Ok(TrainReport {
        model: model.clone(),
        tokenizer: train.tokenizer,
        device,
        dtype: DType::F32,
        flops_per_token: model.flops_per_token(t),
        peak_flops: None,
        n_params: full.total - (model.padded_vocab_size() - model.vocab_size) * model.n_embd,
        steps,
        val_losses,
        tokens_per_sec: if train_seconds > 0.0 { tokens / train_seconds } else { 0.0 },
        memory,
        sample,
        layout: full,
        params,
    })
}
