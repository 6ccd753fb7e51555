//! Data parallelism: every rank holds a full replica of the model and computes its share of the
//! rows of the same global batch chapter 1 would see; the gradients are summed across ranks, so
//! every rank takes the same optimizer step and the replicas never drift apart.
//!
//! Why the sum is right: the step's loss is the mean over all B·T·accum tokens, L = Σ_r L_r with
//! L_r = (1/(B·T·accum)) · (sum of rank r's token losses). Gradients are linear, so
//! ∇L = Σ_r ∇L_r: each rank backpropagates its own L_r, one all-reduce adds them up.

use crate::grad_sync::GradSync;
use ch01_single_gpu::data::Dataset;
use ch01_single_gpu::params::Part;
use ch01_single_gpu::preflight;
use ch01_single_gpu::tokenizer::Tokenizer;
use ch01_single_gpu::train::{StepRecord, TrainSteps, Trainer, drive, load_dataset, model_config};
use ch01_single_gpu::{TrainConfig, TrainError, TrainReport};
use kernels::comm::process::all_gather_json;
use kernels::comm::process::run_rank as run_process_rank;
use kernels::comm::rendezvous::RendezvousConfig;
use kernels::comm::thread::{LaunchError, launch};
use kernels::comm::{CommStats, Communicator, ReduceOp};
use kernels::device::DeviceRequest;
use kernels::trace::TraceEvent;
use kernels::{MemoryReport, Trace, View};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Thread ranks on the CPU: more than this only thrashes a machine, and is almost surely a typo.
pub const MAX_THREAD_RANKS: usize = 64;

#[derive(Clone, Debug)]
pub struct DpConfig {
    pub train: TrainConfig,
    /// Data-parallel ranks; `None`: one per CPU core.
    pub dp: Option<usize>,
    /// Gradient bucket size in MiB; 0: one all-reduce of every gradient after backward.
    pub bucket_mb: f64,
    /// Draw the last training step of every rank as an SVG timeline here.
    pub timeline: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DpError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("--dp must be at least 1")]
    ZeroRanks,
    #[error(
        "the global batch of {batch} sequences is not divisible by --dp {dp}: every rank must get the same number of rows"
    )]
    BatchNotDivisible { batch: usize, dp: usize },
    #[error("--dp {dp} is more ranks than are available ({available} {what})")]
    TooManyRanks { dp: usize, available: usize, what: &'static str },
    #[error("--bucket-mb must be a finite number of MiB, 0 or more (got {0})")]
    BadBucketSize(f64),
    /// A rank failed: which one, and why (the other ranks' failures are its consequences).
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("rank 0 returned no report")]
    NoReport,
    #[error(
        "--dp {dp} does not match the {world} rank processes (WORLD_SIZE={world}): leave --dp out, or make them equal"
    )]
    WorldSizeMismatch { dp: usize, world: usize },
    #[error(
        "chapter 2's ranks are threads or processes on the CPU (GPU ranks, over NCCL, are not built yet); run it with --device cpu or auto"
    )]
    GpuRanks,
}

/// One data-parallel replica's account of a run (the JSON report's per-rank entry is
/// `ch01_single_gpu::report::RankReport`, built from this). Serializable: process ranks send it
/// to rank 0.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub rank: usize,
    pub memory: MemoryReport,
    pub comm: CommStats,
    /// Time the gradient all-reduces took on the communication thread.
    pub comm_seconds: f64,
    /// Time the compute thread waited for them after backward: the part not hidden.
    pub exposed_seconds: f64,
    /// A hash of the final parameters' bits: equal on every rank, or the replicas diverged.
    pub params_fingerprint: u64,
}

pub struct DpReport {
    pub dp: usize,
    /// Rank 0's report (every rank ends with the same parameters).
    pub report: TrainReport,
    pub ranks: Vec<ReplicaReport>,
    /// Bytes of the gradient buffer reduced each step.
    pub grad_bytes: u64,
}

// ANCHOR: hidden_fraction
impl DpReport {
    /// The fraction of gradient communication that overlapped backward.
    pub fn hidden_fraction(&self) -> f64 {
        let comm: f64 = self.ranks.iter().map(|r| r.comm_seconds).sum();
        let exposed: f64 = self.ranks.iter().map(|r| r.exposed_seconds).sum();
        if comm > 0.0 { (1.0 - exposed / comm).clamp(0.0, 1.0) } else { 0.0 }
    }
}
// ANCHOR_END: hidden_fraction

/// A rank's trainer: chapter 1's, computing its rows, plus the gradient all-reduce.
struct DpRank {
    trainer: Trainer,
    rank: usize,
    dp: usize,
    sync: GradSync,
}

impl DpRank {
    /// This rank's rows of a micro-batch of B rows.
    fn my_rows(&self) -> Range<usize> {
        let (rows, t) = self.trainer.shard_shape();
        self.rank * rows * t..(self.rank + 1) * rows * t
    }
}

impl TrainSteps for DpRank {
    // ANCHOR: dp_step
    fn step(&mut self) -> Result<StepRecord, TrainError> {
        let started = Instant::now();
        let trace = self.trainer.trace.clone();
        let _span = trace.span("step");
        self.trainer.zero_grads();
        let accum = self.trainer.cfg.grad_accum;
        let dloss = self.trainer.dloss(); // 1/(global tokens per step), on every rank
        let mut loss_sum = 0.0f64;
        for micro in 0..accum {
            let batch = self.trainer.next_micro_batch();
            let mine = self.my_rows();
            let (inputs, targets) = (&batch.inputs[mine.clone()], &batch.targets[mine]);
            // Only the last micro-batch's backward communicates: before it, gradients are still
            // accumulating locally (what PyTorch's DDP calls no_sync).
            let last = micro + 1 == accum;
            let Self { trainer, sync, .. } = self;
            sync.begin();
            let mut on_ready = |part: Part, grads: &[View<'_>]| {
                if last {
                    sync.on_ready(part, grads)
                }
            };
            loss_sum += trainer.forward_backward(inputs, targets, dloss, &mut on_ready)? as f64;
        }
        // Sends what the hook did not, waits for every sum, and writes the sums back.
        self.sync.finish(self.trainer.grads_mut())?;
        // Every rank's rows are the same number of tokens: the step's loss is the ranks' mean.
        let loss = self.sync.reduce_scalars(vec![(loss_sum / accum as f64) as f32], ReduceOp::Avg)?[0];
        self.trainer.apply_gradients(loss, started)
    }
    // ANCHOR_END: dp_step

    // ANCHOR: dp_evaluate
    /// The validation protocol's batches of B rows are, in rows/rank-row batches, batches
    /// 0..val_batches·dp: rank r evaluates every dp-th of them, and the sum is all-reduced.
    fn evaluate(&mut self) -> Result<f32, TrainError> {
        let n = (self.trainer.cfg.val_batches * self.dp) as u64;
        let mine = (self.rank as u64..n).step_by(self.dp);
        let sum = self.trainer.val_loss_sum(mine)? as f32;
        Ok(self.sync.reduce_scalars(vec![sum], ReduceOp::Sum)?[0] / n as f32)
    }
    // ANCHOR_END: dp_evaluate

    fn save(&self, dir: &Path) -> Result<(), TrainError> {
        self.trainer.save(dir)
    }

    fn steps_done(&self) -> u64 {
        self.trainer.step
    }

    fn ranks(&self) -> usize {
        self.dp
    }
}

/// FNV-1a over the parameters' bits.
fn fingerprint(params: &[f32]) -> u64 {
    params.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, p| (h ^ p.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

/// A run whose ranks are processes: how many in all, and how many of them hold a replica in this
/// machine's memory (all of them under `--nproc-per-node`; this process alone, for a rank that
/// checks itself).
#[derive(Clone, Copy, Debug)]
pub struct Processes {
    pub world: usize,
    pub on_this_machine: usize,
}

/// Checks a run's settings before any rank starts, and returns its number of ranks. `processes`:
/// the ranks are processes (one replica each), not threads of this one.
pub fn check_config(cfg: &DpConfig, processes: Option<Processes>) -> Result<usize, DpError> {
    let world = processes.map(|p| p.world);
    if matches!(cfg.train.device, DeviceRequest::Cuda(_)) {
        return Err(DpError::GpuRanks);
    }
    // The default: one rank per core, or the most ranks up to that which divide the batch.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = (1..=cores.min(cfg.train.batch_size.max(1))).rev().find(|d| cfg.train.batch_size.is_multiple_of(*d));
    let dp = cfg.dp.or(world).unwrap_or(default.unwrap_or(1));
    if dp == 0 {
        return Err(DpError::ZeroRanks);
    }
    if let Some(world) = world
        && world != dp
    {
        return Err(DpError::WorldSizeMismatch { dp, world });
    }
    if processes.is_none() && dp > MAX_THREAD_RANKS {
        return Err(DpError::TooManyRanks { dp, available: MAX_THREAD_RANKS, what: "thread ranks on the CPU" });
    }
    let batch = cfg.train.batch_size;
    if batch > 0 && !batch.is_multiple_of(dp) {
        return Err(DpError::BatchNotDivisible { batch, dp });
    }
    if !cfg.bucket_mb.is_finite() || cfg.bucket_mb < 0.0 {
        return Err(DpError::BadBucketSize(cfg.bucket_mb));
    }
    // Before any rank allocates or steps: chapter 1's ranges and paths, then ours.
    let train = &cfg.train;
    train.validate()?;
    if let Some(path) = &cfg.timeline {
        preflight::check_output_file("--timeline", path)?;
    }
    // dp replicas in one process, or one in each (their communication buffers, a quarter of
    // the parameters' four buffers, come on top).
    let model = model_config(train, Tokenizer::new(train.tokenizer).vocab_size())?;
    let t = train.seq_len.unwrap_or(model.block_size);
    if batch > 0 && t > 0 {
        let replicas = processes.map_or(dp, |p| p.on_this_machine);
        preflight::check_memory(train, &model, batch / dp, t, kernels::Device::Cpu, replicas)?;
    }
    Ok(dp)
}

// ANCHOR: run_rank
/// One rank: chapter 1's trainer on its rows, a communication thread beside it, and the loop.
/// The same on any communicator: a thread rank's, or a process's over TCP.
fn run_rank<C: Communicator + 'static>(
    cfg: &DpConfig,
    dp: usize,
    comm: C,
    dataset: Arc<Dataset>,
    trace: &Trace,
) -> Result<(Option<TrainReport>, ReplicaReport, u64), DpError> {
    let rank = comm.rank();
    let mut trainer = Trainer::with_shard(&cfg.train, cfg.train.batch_size / dp, dataset)?;
    trainer.trace = trace.lane(rank as u32, 0);
    let bucket_bytes = (cfg.bucket_mb * 1024.0 * 1024.0) as usize;
    let sync = GradSync::new(comm, &trainer.layout, bucket_bytes, &trainer.ledger, trace.lane(rank as u32, 1));
    let grad_bytes = (trainer.layout.total * 4) as u64;
    let mut me = DpRank { trainer, rank, dp, sync };
    let header =
        format!("{} | data parallel: {dp} ranks, {} rows each", me.trainer.header(), cfg.train.batch_size / dp);
    let outcome = drive(&cfg.train, &mut me, rank == 0, &header)?;
    let comm = me.sync.stop()?;
    let report = ReplicaReport {
        rank,
        memory: me.trainer.ledger.report(),
        comm,
        comm_seconds: me.sync.comm_seconds,
        exposed_seconds: me.sync.exposed_seconds,
        params_fingerprint: fingerprint(&me.trainer.params()?),
    };
    // Rank 0 reports for the run (and generates the sample); the replicas are identical.
    let leader = if rank == 0 { Some(me.trainer.report(outcome)?) } else { None };
    Ok((leader, report, grad_bytes))
}
// ANCHOR_END: run_rank

/// `--trace` and `--timeline`: every rank's lanes, from one trace.
fn write_trace(cfg: &DpConfig, trace: &Trace) -> Result<(), DpError> {
    if let Some(path) = &cfg.train.trace {
        trace.write_chrome_json(path).map_err(|source| TrainError::Io { path: path.clone(), source })?;
    }
    if let Some(path) = &cfg.timeline
        && let Some((from, to)) = trace.last_spans("step")
    {
        let lanes =
            |rank: u32, lane: u32| format!("rank {rank} {}", if lane == 0 { "compute" } else { "communication" });
        std::fs::write(path, trace.to_svg(from, to, lanes))
            .map_err(|source| TrainError::Io { path: path.clone(), source })?;
    }
    Ok(())
}

// ANCHOR: train
/// Trains with `dp` data-parallel thread ranks and reports what rank 0 saw, plus every rank's
/// memory and communication.
pub fn train(cfg: &DpConfig) -> Result<DpReport, DpError> {
    let dp = check_config(cfg, None)?;
    // Thread ranks compute on the CPU, whatever `auto` would pick.
    let cfg = &DpConfig { train: TrainConfig { device: DeviceRequest::Cpu, ..cfg.train.clone() }, ..cfg.clone() };
    let dataset = Arc::new(load_dataset(&cfg.train.data, &Tokenizer::new(cfg.train.tokenizer))?);
    let traced = cfg.train.trace.is_some() || cfg.timeline.is_some();
    let trace = if traced { Trace::enabled() } else { Trace::disabled() };
    // The launcher names the rank that failed first, and why ("rank 1 failed: ..."). Each rank
    // owns what it uses (`'static`): a rank stuck after a failure cannot hold up the report.
    let (rank_cfg, rank_trace) = (cfg.clone(), trace.clone());
    let results = launch(dp, move |comm| run_rank(&rank_cfg, dp, comm, dataset.clone(), &rank_trace))?;
    write_trace(cfg, &trace)?;
    let mut ranks = Vec::new();
    let mut leader = None;
    let mut grad_bytes = 0;
    for (report, rank_report, bytes) in results {
        leader = leader.or(report);
        grad_bytes = bytes;
        ranks.push(rank_report);
    }
    let report = leader.ok_or(DpError::NoReport)?;
    Ok(DpReport { dp, report, ranks, grad_bytes })
}
// ANCHOR_END: train

// ANCHOR: train_process
/// What a process rank hands rank 0 at the end: what thread ranks return to their launcher,
/// and its trace's events with the wall-clock time the trace began (to line them up).
#[derive(Serialize, Deserialize)]
struct ProcessReport {
    replica: ReplicaReport,
    events: Vec<TraceEvent>,
    origin_unix_us: f64,
}

/// One rank of a run whose ranks are processes (`--nproc-per-node`, or torchrun's variables in
/// `config`): the same rank function as [`train`]'s threads, over TCP. Every rank's report and
/// trace are then gathered on rank 0, which returns the run's report (the same as on threads,
/// but for timings) and writes one trace with every rank's lanes; the other ranks return `None`.
pub fn train_process(cfg: &DpConfig, config: &RendezvousConfig) -> Result<Option<DpReport>, DpError> {
    let dp = check_config(cfg, Some(Processes { world: config.world_size, on_this_machine: 1 }))?;
    let cfg = &DpConfig { train: TrainConfig { device: DeviceRequest::Cpu, ..cfg.train.clone() }, ..cfg.clone() };
    let dataset = Arc::new(load_dataset(&cfg.train.data, &Tokenizer::new(cfg.train.tokenizer))?);
    let traced = cfg.train.trace.is_some() || cfg.timeline.is_some();
    let trace = if traced { Trace::enabled() } else { Trace::disabled() };
    // The error names the first rank to fail, as on threads ("rank 1 failed: ...").
    let (leader, reports, grad_bytes) = run_process_rank(config, |mut comm| {
        // The reports travel on a group of their own: the training's byte counts stay its own.
        let mut reports_group = comm.split(&(0..dp).collect::<Vec<_>>()).map_err(TrainError::from)?;
        let (leader, replica, grad_bytes) = run_rank(cfg, dp, comm, dataset, &trace)?;
        let origin_unix_us = trace.origin_unix_us().unwrap_or(0.0);
        let mine = ProcessReport { replica, events: trace.events(), origin_unix_us };
        let all = all_gather_json(&mut *reports_group, &mine).map_err(TrainError::from)?;
        Ok::<_, DpError>((leader, all, grad_bytes))
    })?;
    let Some(report) = leader else { return Ok(None) };
    let mut ranks = Vec::new();
    for rank in reports {
        if rank.replica.rank != 0 {
            trace.merge(rank.events, rank.origin_unix_us);
        }
        ranks.push(rank.replica);
    }
    write_trace(cfg, &trace)?;
    Ok(Some(DpReport { dp, report, ranks, grad_bytes }))
}
// ANCHOR_END: train_process
