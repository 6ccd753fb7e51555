//! One rank of the data-parallel group under ZeRO: chapter 1's model run in its parts, with
//! each unit's parameters and gradients wherever the stage keeps them.
//!
//! | stage | parameters            | gradients                     | Adam moments  |
//! |-------|-----------------------|-------------------------------|---------------|
//! | 0     | all (all-reduce)      | all                           | all           |
//! | 1     | all                   | all, reduce-scattered at end  | the shard     |
//! | 2     | all                   | the shard; a unit while used  | the shard     |
//! | 3     | the shard; a unit while used | the shard; a unit while used | the shard |
//!
//! The communicator is the data-parallel group's: thread ranks here, the grid's data-parallel
//! sub-group in a 3D run. Every rank makes the same collectives in the same order: units go in
//! layout order for the optimizer, in backward order during backward.

use crate::recompute::{Recompute, SavedActivations, block_backward, block_forward, recompute};
use crate::zero::{Unit, ZeroStage, units};
use ch01_single_gpu::checkpoint::{self, CheckpointContents, RunShape, TrainerState};
use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::data::{BatchSampler, Dataset, sequential_batch};
use ch01_single_gpu::model::{BackwardScratch, Dims, Head, Whole};
use ch01_single_gpu::optimizer::{Optimizer, squared_norm};
use ch01_single_gpu::params::{BlockParams, ParamLayout};
use ch01_single_gpu::schedule::learning_rate;
use ch01_single_gpu::train::{StartState, StepRecord, TrainSteps, saves_after};
use ch01_single_gpu::{TrainConfig, TrainError};
use ch04_pipeline::parts::StageParts;
use ch04_pipeline::pipeline::norm_ranges;
use kernels::comm::{CommStats, Communicator, ReduceOp};
use kernels::ops::grad_norm::clip_scale;
use kernels::{Category, DType, Device, MemoryLedger, Tensor, TensorError, Trace, View, ViewMut};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The model in chapter 1's layout, gathered from every rank: what a checkpoint holds.
pub struct Gathered {
    pub params: Vec<f32>,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
}

/// Where a rank keeps its parameters: all of them (stages 0-2), or its shard of each unit and
/// the units gathered now (stage 3).
struct Params {
    full: Option<Tensor>,
    /// S_u floats per unit.
    shards: Vec<Tensor>,
    /// P_u floats per unit, while it is in use.
    gathered: Vec<Option<Tensor>>,
}

impl Params {
    /// Unit u's parameters (L_u floats).
    fn unit(&self, units: &[Unit], u: usize) -> View<'_> {
        let unit = &units[u];
        match (&self.full, &self.gathered[u]) {
            (Some(all), _) => all.view().slice(unit.range.clone()),
            (None, Some(gathered)) => gathered.view().slice(0..unit.len()),
            (None, None) => unreachable!("unit {u} used before it was gathered"),
        }
    }
}

/// Where a rank keeps its gradients: all of them (stages 0, 1), or its reduced shard of each
/// unit and the units whose gradients backward is computing now (stages 2, 3).
struct Grads {
    full: Option<Tensor>,
    shards: Vec<Tensor>,
    /// P_u floats per unit (the padding stays zero), from its first gradient to its reduction.
    working: Vec<Option<Tensor>>,
}

impl Grads {
    /// Unit u's gradients (L_u floats), and the embeddings' beside them: the head's backward
    /// writes both (wte is also the output projection).
    fn unit(&mut self, units: &[Unit], u: usize) -> (ViewMut<'_>, Option<ViewMut<'_>>) {
        let (range, embeddings) = (units[u].range.clone(), units[0].range.clone());
        let len = range.len();
        match &mut self.full {
            Some(all) => {
                let (front, back) = all.view_mut().split_at_mut(range.start);
                match u {
                    0 => (back.slice_into(0..len), None),
                    _ => (back.slice_into(0..len), Some(front.slice_into(embeddings))),
                }
            }
            None => {
                let (front, back) = self.working.split_at_mut(u);
                let Some(mine) = back[0].as_mut() else { unreachable!("unit {u}'s gradients used before begin") };
                let first = front.first_mut().and_then(Option::as_mut);
                (mine.view_mut().slice_into(0..len), first.map(|w| w.view_mut().slice_into(0..embeddings.len())))
            }
        }
    }
}

/// A rank's buffers, apart from its communicator so that a pass can borrow both.
struct State {
    stage: ZeroStage,
    /// Chapter 1's layout, and the one this rank's tensors are laid out by: the same, or (with
    /// tensor parallelism) its tensor rank's shard of it, which ZeRO then shards over the
    /// data-parallel group.
    full: ParamLayout,
    layout: ParamLayout,
    /// The floats of `layout` this rank counts in the global norm (a tensor that every rank of
    /// a tensor group holds the same copy of is counted by one of them), neighbours merged.
    norm_ranges: Vec<Range<usize>>,
    units: Vec<Unit>,
    n: usize,
    rank: usize,
    ledger: MemoryLedger,
    params: Params,
    grads: Grads,
    /// Stage 0: one over every parameter. Stages 1-3: one per unit, over the rank's floats.
    optimizers: Vec<Optimizer>,
    /// A padded unit's staging (stages 1, 2), a shard to receive a reduce-scatter into, and
    /// one to send an all-gather from (stages 1, 2; stage 3 sends its shard itself).
    staging: Option<Tensor>,
    received: Option<Tensor>,
    sending: Option<Tensor>,
}

fn f32_tensor(len: usize, category: Category, ledger: &MemoryLedger) -> Result<Tensor, TensorError> {
    Tensor::zeros_on(&[len], Device::Cpu, DType::F32, category, ledger)
}

fn staging_of(staging: &mut Option<Tensor>, len: usize) -> &mut [f32] {
    let Some(staging) = staging.as_mut() else { unreachable!("a padded unit has a staging buffer") };
    &mut staging.as_mut_slice()[..len]
}

impl State {
    // ANCHOR: gather
    /// Stage 3: all-gathers unit u's parameters from every rank's shard, just before use.
    fn gather(&mut self, comm: &mut dyn Communicator, u: usize) -> Result<(), TrainError> {
        if self.params.full.is_some() {
            return Ok(());
        }
        let mut full = f32_tensor(self.units[u].padded(self.n), Category::Parameters, &self.ledger)?;
        comm.all_gather(self.params.shards[u].as_slice(), full.as_mut_slice())?;
        self.params.gathered[u] = Some(full);
        Ok(())
    }

    /// Stage 3: frees unit u's gathered parameters (its ledger entry goes with them).
    fn release(&mut self, u: usize) {
        self.params.gathered[u] = None;
    }
    // ANCHOR_END: gather

    /// Stages 2, 3: a zeroed buffer for unit u's gradients, for one backward.
    fn begin_grads(&mut self, u: usize) -> Result<(), TrainError> {
        if self.grads.full.is_none() {
            let buffer = f32_tensor(self.units[u].padded(self.n), Category::Gradients, &self.ledger)?;
            self.grads.working[u] = Some(buffer);
        }
        Ok(())
    }

    // ANCHOR: finish_grads
    /// Stages 2, 3: unit u's gradient is final: reduce-scatter it, add this rank's chunk (the
    /// sum over ranks) to its shard, and free the unit's buffer.
    fn finish_grads(&mut self, comm: &mut dyn Communicator, u: usize) -> Result<(), TrainError> {
        let (Some(working), Some(received)) = (self.grads.working[u].take(), self.received.as_mut()) else {
            return Ok(());
        };
        let chunk = &mut received.as_mut_slice()[..self.units[u].shard];
        comm.reduce_scatter(working.as_slice(), chunk, ReduceOp::Sum)?;
        for (g, r) in self.grads.shards[u].as_mut_slice().iter_mut().zip(chunk.iter()) {
            *g += r;
        }
        Ok(())
    }
    // ANCHOR_END: finish_grads

    // ANCHOR: stage1_collectives
    /// Stage 1: after the last backward, each unit's gradient is reduce-scattered: this rank's
    /// floats of the gradient buffer hold the sum over ranks (the others are left stale).
    fn reduce_scatter_gradients(&mut self, comm: &mut dyn Communicator) -> Result<(), TrainError> {
        let (Some(grads), Some(received)) = (self.grads.full.as_mut(), self.received.as_mut()) else {
            return Ok(());
        };
        for unit in &self.units {
            let (chunk, p) = (&mut received.as_mut_slice()[..unit.shard], unit.padded(self.n));
            if p == unit.len() {
                comm.reduce_scatter(&grads.as_slice()[unit.range.clone()], chunk, ReduceOp::Sum)?;
            } else {
                let staging = staging_of(&mut self.staging, p);
                staging[..unit.len()].copy_from_slice(&grads.as_slice()[unit.range.clone()]);
                staging[unit.len()..].fill(0.0);
                comm.reduce_scatter(staging, chunk, ReduceOp::Sum)?;
            }
            let owned = unit.owned(self.rank);
            let len = owned.len();
            grads.as_mut_slice()[owned].copy_from_slice(&chunk[..len]);
        }
        Ok(())
    }

    /// Stages 1, 2: after the update, every rank's updated floats are all-gathered into the
    /// full parameter buffer.
    fn all_gather_parameters(&mut self, comm: &mut dyn Communicator) -> Result<(), TrainError> {
        let (Some(params), Some(sending)) = (self.params.full.as_mut(), self.sending.as_mut()) else {
            return Ok(());
        };
        for unit in &self.units {
            let (p, owned) = (unit.padded(self.n), unit.owned(self.rank));
            let send = &mut sending.as_mut_slice()[..unit.shard];
            send[..owned.len()].copy_from_slice(&params.as_slice()[owned.clone()]);
            send[owned.len()..].fill(0.0);
            if p == unit.len() {
                comm.all_gather(send, &mut params.as_mut_slice()[unit.range.clone()])?;
            } else {
                let staging = staging_of(&mut self.staging, p);
                comm.all_gather(send, staging)?;
                params.as_mut_slice()[unit.range.clone()].copy_from_slice(&staging[..unit.len()]);
            }
        }
        Ok(())
    }
    // ANCHOR_END: stage1_collectives

    /// Σ g² of the reduced gradient floats this rank owns (all of them at stage 0) and counts.
    fn partial_squared_norm(&self) -> Result<f64, TrainError> {
        let mut sum = 0.0;
        // The counted floats of `owned`, as ranges of a buffer whose index 0 is `at`.
        let counted = |owned: Range<usize>, at: usize| {
            let cut = move |r: &Range<usize>| r.start.max(owned.start)..r.end.min(owned.end);
            self.norm_ranges.iter().map(cut).filter(|r| !r.is_empty()).map(move |r| r.start - at..r.end - at)
        };
        match (&self.grads.full, self.stage.shards_optimizer()) {
            (Some(all), false) => {
                for range in counted(0..self.layout.total, 0) {
                    sum += squared_norm(all.view(), range)?;
                }
            }
            (Some(all), true) => {
                for unit in &self.units {
                    for range in counted(unit.owned(self.rank), 0) {
                        sum += squared_norm(all.view(), range)?;
                    }
                }
            }
            (None, _) => {
                for (unit, shard) in self.units.iter().zip(&self.grads.shards) {
                    let owned = unit.owned(self.rank);
                    for range in counted(owned.clone(), owned.start) {
                        sum += squared_norm(shard.view(), range)?;
                    }
                }
            }
        }
        Ok(sum)
    }

    // ANCHOR: zero_update
    /// The clipped AdamW step of the floats this rank owns.
    fn update(&mut self, lr: f32, scale: f32, step: u64) {
        let rank = self.rank;
        let (units, opts) = (&self.units, &mut self.optimizers);
        match (&mut self.params.full, &self.grads.full) {
            // Stages 0, 1: chapter 1's update, of every float (0) or each unit's owned ones (1).
            (Some(params), Some(grads)) => opts.iter_mut().for_each(|o| o.update(params, None, grads, lr, scale, step)),
            // Stage 2: the owned floats of the full parameters, from the gradient shard.
            (Some(params), None) => {
                for ((unit, opt), g) in units.iter().zip(opts).zip(&self.grads.shards) {
                    let owned = unit.owned(rank);
                    let g = g.view().slice(0..owned.len());
                    opt.update_owned(params.view_mut().slice_into(owned), g, lr, scale, step);
                }
            }
            // Stage 3: the parameter shard, from the gradient shard.
            (None, _) => {
                let shards = self.params.shards.iter_mut().zip(&self.grads.shards);
                for ((unit, opt), (p, g)) in units.iter().zip(opts).zip(shards) {
                    let len = unit.owned(rank).len();
                    opt.update_owned(p.view_mut().slice_into(0..len), g.view().slice(0..len), lr, scale, step);
                }
            }
        }
    }
    // ANCHOR_END: zero_update

    fn zero_grads(&mut self) {
        self.grads.full.iter_mut().chain(&mut self.grads.shards).for_each(|g| g.fill(0.0));
    }

    /// The parameters and Adam moments in chapter 1's layout, from every rank (collective).
    fn gather_all(&self, comm: &mut dyn Communicator) -> Result<Gathered, TrainError> {
        let total = self.layout.total;
        let mut out = Gathered { params: vec![0.0; total], adam_m: vec![0.0; total], adam_v: vec![0.0; total] };
        if let Some(params) = &self.params.full {
            out.params.copy_from_slice(params.as_slice());
        }
        if !self.stage.shards_optimizer() {
            out.adam_m = self.optimizers[0].adam_m.to_vec()?;
            out.adam_v = self.optimizers[0].adam_v.to_vec()?;
            return Ok(out);
        }
        for (u, unit) in self.units.iter().enumerate() {
            let own = unit.owned(self.rank).len();
            let opt = &self.optimizers[u];
            let mut pieces = vec![(opt.adam_m.as_slice(), &mut out.adam_m), (opt.adam_v.as_slice(), &mut out.adam_v)];
            if self.params.full.is_none() {
                pieces.push((&self.params.shards[u].as_slice()[..own], &mut out.params));
            }
            for (mine, full) in pieces {
                let mut send = vec![0.0; unit.shard];
                send[..own].copy_from_slice(mine);
                let mut all = vec![0.0; unit.padded(self.n)];
                comm.all_gather(&send, &mut all)?;
                full[unit.range.clone()].copy_from_slice(&all[..unit.len()]);
            }
        }
        Ok(out)
    }
}

/// The tensors of `unit` (in layout order) from a buffer that holds just the unit.
fn unit_tensors<'a>(layout: &ParamLayout, unit: &Unit, buf: View<'a>) -> Vec<View<'a>> {
    let at = unit.range.start;
    layout.specs[layout.part_tensors(unit.part)].iter().map(|s| buf.slice(s.offset - at..s.range().end - at)).collect()
}

/// As [`unit_tensors`], writable.
fn unit_tensors_mut<'a>(layout: &ParamLayout, unit: &Unit, buf: ViewMut<'a>) -> Vec<ViewMut<'a>> {
    let mut rest = Some(buf);
    let specs = &layout.specs[layout.part_tensors(unit.part)];
    let mut pieces = Vec::with_capacity(specs.len());
    for spec in specs {
        let Some(tail) = rest.take() else { break };
        let (piece, tail) = tail.split_at_mut(spec.numel());
        pieces.push(piece);
        rest = Some(tail);
    }
    pieces
}

/// The head's parameters: ln_f from the head's unit, wte (the tied output projection) from the
/// embeddings'.
fn head_params<'a>(layout: &ParamLayout, units: &[Unit], params: &'a Params) -> Head<View<'a>> {
    let head = units.len() - 1;
    let wte = unit_tensors(layout, &units[0], params.unit(units, 0))[0];
    let ln_f = unit_tensors(layout, &units[head], params.unit(units, head));
    Head { ln_f_weight: ln_f[0], ln_f_bias: ln_f[1], wte }
}

/// The head's gradients, from the same two units.
fn head_grads<'a>(layout: &ParamLayout, units: &[Unit], grads: &'a mut Grads) -> Head<ViewMut<'a>> {
    let head = units.len() - 1;
    let (ln_f, embeddings) = grads.unit(units, head);
    let mut ln_f = unit_tensors_mut(layout, &units[head], ln_f).into_iter();
    let wte = embeddings.and_then(|e| unit_tensors_mut(layout, &units[0], e).into_iter().next());
    let (Some(ln_f_weight), Some(ln_f_bias), Some(wte)) = (ln_f.next(), ln_f.next(), wte) else {
        unreachable!("the head's unit holds ln_f, the embeddings' wte")
    };
    Head { ln_f_weight, ln_f_bias, wte }
}

fn block_of<T>(pieces: Vec<T>) -> BlockParams<T> {
    let mut it = pieces.into_iter();
    BlockParams::from_tensors(|| it.next().unwrap_or_else(|| unreachable!("a block has 12 tensors")))
}

/// What a rank runs over: its data-parallel group (ZeRO's), how it runs the model's parts,
/// and, with tensor parallelism, its tensor group again (to gather the shards).
pub type RankGroups = (Box<dyn Communicator>, Box<dyn StageParts>, Option<Box<dyn Communicator>>);

/// One data-parallel rank under ZeRO.
pub struct ZeroRank {
    pub cfg: TrainConfig,
    pub model: ModelConfig,
    pub recompute: Recompute,
    state: State,
    comm: Box<dyn Communicator>,
    /// How the model's parts run here: whole (chapter 2's ranks), or on a tensor-parallel
    /// shard (chapter 5's `TpParts`), and the tensor group again, to gather the shards.
    parts: Box<dyn StageParts>,
    tp_gather: Option<Box<dyn Communicator>>,
    acts: SavedActivations,
    scratch: BackwardScratch,
    proj: Tensor,
    dataset: Arc<Dataset>,
    sampler: BatchSampler,
    run: RunShape,
    rows: usize,
    t: usize,
    step: u64,
    /// Rank 0, when this step's end is a save: the gathered model the leader writes.
    pending_save: Option<Gathered>,
    /// What the last training step sent and received (evaluation and gathers excluded).
    pub step_comm: CommStats,
    pub trace: Trace,
}

impl ZeroRank {
    /// Rank `comm.rank()` of the data-parallel group `comm`, computing `rows` of every
    /// micro-batch of B. Every rank starts from the whole model (chapter 1's initialisation or
    /// checkpoint) and keeps what its stage keeps.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &TrainConfig,
        model: ModelConfig,
        (stage, recompute): (ZeroStage, Recompute),
        comm: Box<dyn Communicator>,
        (rows, t): (usize, usize),
        run: RunShape,
        dataset: Arc<Dataset>,
    ) -> Result<ZeroRank, TrainError> {
        ZeroRank::on_shard(cfg, model, (stage, recompute), (comm, Box::new(Whole), None), (rows, t), run, dataset)
    }

    /// The same on a tensor-parallel shard: `parts` runs the model's parts (chapter 5's
    /// `TpParts` over the tensor group), ZeRO shards this tensor rank's parameters over the
    /// data-parallel group `comm`, and `tp_gather` (the tensor group, a second time) puts the
    /// shards back together for checkpoints and the report.
    pub fn on_shard(
        cfg: &TrainConfig,
        model: ModelConfig,
        (stage, recompute): (ZeroStage, Recompute),
        (comm, parts, tp_gather): RankGroups,
        (rows, t): (usize, usize),
        run: RunShape,
        dataset: Arc<Dataset>,
    ) -> Result<ZeroRank, TrainError> {
        let (rank, n) = (comm.rank(), comm.world_size());
        let full = ParamLayout::new(&model);
        let layout = parts.layout(&full)?;
        let units = units(&layout, n);
        let ledger = MemoryLedger::new();
        let StartState { params: whole, moments, step, sampler } = StartState::load(cfg, &run, &full)?;
        // Every rank starts from chapter 1's model and keeps its tensor rank's part of it.
        let host = parts.take(&full, &layout, &whole);
        let moments = moments.map(|(m, v)| (parts.take(&full, &layout, &m), parts.take(&full, &layout, &v)));
        let norm_ranges = norm_ranges(&layout, |spec| parts.counts_in_norm(spec));
        let filled = |len, category, values: &[f32]| -> Result<Tensor, TrainError> {
            let mut tensor = f32_tensor(len, category, &ledger)?;
            tensor.as_mut_slice()[..values.len()].copy_from_slice(values);
            Ok(tensor)
        };
        let mut params = Params { full: None, shards: Vec::new(), gathered: units.iter().map(|_| None).collect() };
        match stage.shards_parameters() {
            false => params.full = Some(filled(layout.total, Category::Parameters, &host)?),
            true => {
                for u in &units {
                    params.shards.push(filled(u.shard, Category::Parameters, &host[u.owned(rank)])?);
                }
            }
        }
        let mut grads = Grads { full: None, shards: Vec::new(), working: units.iter().map(|_| None).collect() };
        match stage.shards_gradients() {
            false => grads.full = Some(f32_tensor(layout.total, Category::Gradients, &ledger)?),
            true => {
                for u in &units {
                    grads.shards.push(f32_tensor(u.shard, Category::Gradients, &ledger)?);
                }
            }
        }
        let owned_ranges: Vec<Range<usize>> = match stage.shards_optimizer() {
            false => std::iter::once(0..layout.total).collect(),
            true => units.iter().map(|u| u.owned(rank)).collect(),
        };
        let mut optimizers = Vec::new();
        for owned in owned_ranges {
            let mut opt = Optimizer::new(&layout, owned, cfg.weight_decay, cfg.adam, Device::Cpu, &ledger)?;
            if let Some((m, v)) = &moments {
                opt.load_moments(m, v)?;
            }
            optimizers.push(opt);
        }
        let (mut staging, mut received, mut sending) = (None, None, None);
        if stage.shards_optimizer() {
            let largest_shard = units.iter().map(|u| u.shard).max().unwrap_or(0);
            let comm_buffer = |len| f32_tensor(len, Category::Communication, &ledger);
            received = Some(comm_buffer(largest_shard)?);
            if !stage.shards_parameters() {
                sending = Some(comm_buffer(largest_shard)?);
                let padded = units.iter().filter(|u| u.len() != u.padded(n)).map(|u| u.padded(n)).max();
                staging = padded.map(comm_buffer).transpose()?;
            }
        }
        let (shape, columns) = (parts.shape(&model), parts.logit_columns(&model));
        let acts = SavedActivations::on_shard(&model, recompute, (shape, columns), rows, t, &ledger)?;
        let scratch = BackwardScratch::new(shape, rows, t, Device::Cpu, DType::F32, &ledger)?;
        let proj = Tensor::zeros_on(&[rows * t, model.n_embd], Device::Cpu, DType::F32, Category::Other, &ledger)?;
        let state = State {
            stage,
            full,
            layout,
            norm_ranges,
            units,
            n,
            rank,
            ledger,
            params,
            grads,
            optimizers,
            staging,
            received,
            sending,
        };
        Ok(ZeroRank {
            cfg: cfg.clone(),
            model,
            recompute,
            state,
            comm,
            parts,
            tp_gather,
            acts,
            scratch,
            proj,
            dataset,
            sampler,
            run,
            rows,
            t,
            step,
            pending_save: None,
            step_comm: CommStats::default(),
            trace: Trace::disabled(),
        })
    }

    pub fn rank(&self) -> usize {
        self.state.rank
    }
    pub fn ledger(&self) -> &MemoryLedger {
        &self.state.ledger
    }
    pub fn units(&self) -> &[Unit] {
        &self.state.units
    }
    pub fn comm_stats(&self) -> CommStats {
        self.comm.stats()
    }

    /// The whole model in chapter 1's layout (collective: every rank must call it): each
    /// tensor rank's share from the data-parallel group's shards, then (with tensor
    /// parallelism) the tensor ranks' shares put together as chapter 3 does.
    pub fn gather_all(&mut self) -> Result<Gathered, TrainError> {
        let mine = self.state.gather_all(self.comm.as_mut())?;
        let Some(group) = self.tp_gather.as_mut() else { return Ok(mine) };
        let (full, layout) = (&self.state.full, &self.state.layout);
        let tp = group.world_size();
        let mut put_together = |piece: &[f32]| -> Result<Vec<f32>, TrainError> {
            let mut all = vec![0.0; tp * layout.total];
            group.all_gather(piece, &mut all)?;
            let mut whole = vec![0.0; full.total];
            for (rank, piece) in all.chunks_exact(layout.total).enumerate() {
                full.put_shard(layout, piece, rank, tp, &mut whole);
            }
            Ok(whole)
        };
        Ok(Gathered {
            params: put_together(&mine.params)?,
            adam_m: put_together(&mine.adam_m)?,
            adam_v: put_together(&mine.adam_v)?,
        })
    }

    /// Tensor-parallel ranks of the group this rank's parts run over (1: none).
    pub fn tp(&self) -> usize {
        self.parts.ranks()
    }

    /// What this rank sent and received inside its tensor group.
    pub fn tp_stats(&self) -> CommStats {
        self.parts.stats()
    }

    fn dims(&self) -> Dims {
        Dims { b: self.rows, t: self.t, shape: self.parts.shape(&self.model) }
    }

    // ANCHOR: zero_forward
    /// Forward over some rows: each unit's parameters are gathered just before it runs and freed
    /// after (stage 3; the embeddings stay until the head, which reads wte too). Returns the
    /// rows' mean loss.
    fn forward(&mut self, inputs: &[u32], targets: &[u32]) -> Result<f32, TrainError> {
        let (d, c) = (self.dims(), self.model.n_embd);
        let Self { state, comm, acts, proj, model, parts, .. } = self;
        let comm = comm.as_mut();
        let (emb, head) = (0, state.units.len() - 1);
        state.gather(comm, emb)?;
        let wte_wpe = unit_tensors(&state.layout, &state.units[emb], state.params.unit(&state.units, emb));
        parts.embed_forward(acts.first_input(), inputs, wte_wpe[0], wte_wpe[1], d.t, c)?;
        for l in 0..model.n_layer {
            let u = 1 + l;
            state.gather(comm, u)?;
            let p = block_of(unit_tensors(&state.layout, &state.units[u], state.params.unit(&state.units, u)));
            block_forward(&p, acts, l, proj.view_mut(), d, parts.block_comm())?;
            state.release(u);
        }
        state.gather(comm, head)?;
        let loss = {
            let params = head_params(&state.layout, &state.units, &state.params);
            let (x, head_acts) = acts.head_parts();
            parts.head_forward(&params, model, x, head_acts, Some(targets), d.bt())?
        };
        state.release(head);
        state.release(emb);
        Ok(loss.unwrap_or(f32::NAN))
    }
    // ANCHOR_END: zero_forward

    // ANCHOR: zero_backward
    /// Backward of the last forward, for L = dloss · (its rows' token losses): each unit's
    /// parameters gathered again (stage 3), and its gradient computed into a buffer of its own
    /// and reduce-scattered the moment it is final (stages 2, 3). Units finish in backward
    /// order: the head, block L-1, ..., block 0, the embeddings (wte collects the head's part
    /// first and the embedding's last, so its buffer lives through the whole backward).
    fn backward(&mut self, inputs: &[u32], targets: &[u32], dloss: f32) -> Result<(), TrainError> {
        let (d, c) = (self.dims(), self.model.n_embd);
        let Self { state, comm, acts, scratch, proj, model, trace, parts, .. } = self;
        let comm = comm.as_mut();
        let (emb, head) = (0, state.units.len() - 1);
        for u in [emb, head] {
            state.gather(comm, u)?;
            state.begin_grads(u)?;
        }
        {
            let State { layout, units, params, grads, .. } = &mut *state;
            let (head_params, head_grads) = (head_params(layout, units, params), head_grads(layout, units, grads));
            let (x, head_acts) = acts.head_parts();
            let (d_ln, d_x) = (scratch.block.d_ln.view_mut(), scratch.d_res[0].view_mut());
            parts.head_backward(&head_params, head_grads, model, x, head_acts, d_ln, d_x, targets, dloss, d.bt())?;
        }
        state.release(head);
        state.finish_grads(comm, head)?;
        let mut from = 0; // which of scratch.d_res holds dL/d(the current block's output)
        for l in (0..model.n_layer).rev() {
            let u = 1 + l;
            state.gather(comm, u)?;
            state.begin_grads(u)?;
            {
                let State { layout, units, params, grads, .. } = &mut *state;
                let p = block_of(unit_tensors(layout, &units[u], params.unit(units, u)));
                let mut g = block_of(unit_tensors_mut(layout, &units[u], grads.unit(units, u).0));
                if acts.mode != Recompute::None {
                    let _span = trace.span("recompute");
                    recompute(&p, acts, l, proj.view_mut(), d, parts.block_comm())?;
                }
                block_backward(&p, &mut g, acts, l, scratch, from, d, parts.block_comm())?;
            }
            from = 1 - from;
            state.release(u);
            state.finish_grads(comm, u)?;
        }
        {
            let State { layout, units, grads, .. } = &mut *state;
            let mut wte_wpe = unit_tensors_mut(layout, &units[emb], grads.unit(units, emb).0).into_iter();
            let (Some(dwte), Some(dwpe)) = (wte_wpe.next(), wte_wpe.next()) else { unreachable!("wte and wpe") };
            parts.embed_backward(dwte, dwpe, scratch.d_res[from].view(), inputs, d.t, c);
        }
        state.release(emb);
        state.finish_grads(comm, emb)?;
        Ok(())
    }
    // ANCHOR_END: zero_backward

    /// This rank's rows of a micro-batch of B rows.
    fn my_rows(&self) -> Range<usize> {
        let n = self.rows * self.t;
        self.state.rank * n..(self.state.rank + 1) * n
    }

    /// Sums the rank's squared norm and loss over the group: [hi, lo, loss] from each rank
    /// (an f64 travels as an f32 and the f32 rounding of the rest), added in rank order.
    fn reduce_norm_and_loss(&mut self, squared: f64, loss: f32) -> Result<(f64, f32), TrainError> {
        let n = self.state.n;
        let hi = squared as f32;
        let mine = [hi, (squared - hi as f64) as f32, loss];
        let mut all = vec![0.0f32; 3 * n];
        self.comm.all_gather(&mine, &mut all)?;
        let squared = all.chunks(3).map(|s| s[0] as f64 + s[1] as f64).sum();
        let loss = all.chunks(3).map(|s| s[2] as f64).sum::<f64>() / n as f64;
        Ok((squared, loss as f32))
    }
}

fn stats_since(now: &CommStats, before: &CommStats) -> CommStats {
    let diff = |a: &BTreeMap<_, u64>, b: &BTreeMap<_, u64>| {
        a.iter().map(|(k, v)| (*k, v - b.get(k).copied().unwrap_or(0))).collect()
    };
    CommStats {
        sent: diff(&now.sent, &before.sent),
        received: diff(&now.received, &before.received),
        calls: diff(&now.calls, &before.calls),
    }
}

impl TrainSteps for ZeroRank {
    // ANCHOR: zero_step
    fn step(&mut self) -> Result<StepRecord, TrainError> {
        let started = Instant::now();
        let before = self.comm.stats();
        let trace = self.trace.clone();
        let _span = trace.span("step");
        self.pending_save = None;
        self.state.zero_grads();
        let accum = self.cfg.grad_accum;
        let dloss = 1.0 / (self.cfg.batch_size * self.t * accum) as f32; // every token counts once
        let mut loss_sum = 0.0f64;
        for _ in 0..accum {
            let batch = self.sampler.next_batch(&self.dataset.train, self.cfg.batch_size, self.t);
            let mine = self.my_rows();
            let (inputs, targets) = (&batch.inputs[mine.clone()], &batch.targets[mine]);
            {
                let _span = trace.span("forward");
                loss_sum += self.forward(inputs, targets)? as f64;
            }
            let _span = trace.span("backward");
            self.backward(inputs, targets, dloss)?;
        }
        let loss = (loss_sum / accum as f64) as f32;
        let comm = self.comm.as_mut();
        let (loss, grad_norm) = match self.state.stage.shards_optimizer() {
            // Chapter 2 exactly: one all-reduce of every gradient, the loss averaged.
            false => {
                if let Some(grads) = self.state.grads.full.as_mut() {
                    comm.all_reduce(grads.as_mut_slice(), ReduceOp::Sum)?;
                }
                let mut mean = [loss];
                comm.all_reduce(&mut mean, ReduceOp::Avg)?;
                (mean[0], self.parts.sum_norm(self.state.partial_squared_norm()?)?.sqrt() as f32)
            }
            // Each rank holds the sum of its own floats only: the norm is the sum of the parts.
            true => {
                self.state.reduce_scatter_gradients(comm)?;
                let partial = self.state.partial_squared_norm()?;
                let (squared, loss) = self.reduce_norm_and_loss(partial, loss)?;
                // With tensor parallelism, then the tensor group's parts (identity without).
                (loss, self.parts.sum_norm(squared)?.sqrt() as f32)
            }
        };
        // As chapter 1's take_step: a non-finite step updates nothing.
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(TrainError::NonFiniteLoss { step: self.step + 1, loss, grad_norm, last_checkpoint: None });
        }
        let cfg = &self.cfg;
        let lr = learning_rate(cfg.lr_schedule, cfg.lr, self.step, cfg.steps, cfg.warmup_steps);
        {
            let _span = trace.span("optimizer");
            self.state.update(lr, clip_scale(grad_norm, cfg.grad_clip), self.step + 1);
            self.state.all_gather_parameters(self.comm.as_mut())?;
        }
        self.step += 1;
        self.step_comm = stats_since(&self.comm.stats(), &before);
        let tokens_per_sec = (cfg.batch_size * self.t * accum) as f64 / started.elapsed().as_secs_f64();
        if saves_after(&self.cfg, self.step) {
            let gathered = self.gather_all()?;
            self.pending_save = (self.state.rank == 0).then_some(gathered);
        }
        Ok(StepRecord { step: self.step, loss, lr, grad_norm, tokens_per_sec, val_loss: None })
    }
    // ANCHOR_END: zero_step

    /// As chapter 2: rank r evaluates every dp-th of the protocol's batches, the sums are added.
    fn evaluate(&mut self) -> Result<f32, TrainError> {
        let n = (self.cfg.val_batches * self.state.n) as u64;
        let mut sum = 0.0f64;
        for k in (self.state.rank as u64..n).step_by(self.state.n) {
            let batch = sequential_batch(&self.dataset.val, k, self.rows, self.t);
            sum += self.forward(&batch.inputs, &batch.targets)? as f64;
        }
        let mut total = [sum as f32];
        self.comm.all_reduce(&mut total, ReduceOp::Sum)?;
        Ok(total[0] / n as f32)
    }

    /// The leader writes what every rank gathered at the end of the step: chapter 1's layout,
    /// so that any layout resumes it.
    fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let Some(g) = &self.pending_save else { return Err(TrainError::PartialOptimizer) };
        let state = TrainerState { step: self.step, sampler: self.sampler.clone(), run: self.run.clone() };
        let optimizer = Some((&g.adam_m[..], &g.adam_v[..], &state));
        let contents = CheckpointContents { cfg: &self.model, layout: &self.state.full, params: &g.params, optimizer };
        Ok(checkpoint::save(dir, &contents)?)
    }

    fn steps_done(&self) -> u64 {
        self.step
    }

    fn ranks(&self) -> usize {
        self.state.n
    }
}
