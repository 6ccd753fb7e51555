//! The interpreter: a stage of the pipe runs its instruction list (`schedule.rs`) with chapter 1's
//! model parts. One interpreter runs every schedule.
//!
//! Why it computes chapter 1's step: the step's loss is the mean over all B·T·accum tokens, so
//! every micro-batch's backward starts from dloss = 1/(B·T·accum), not 1/(its own tokens);
//! each stage accumulates its tensors' gradients over the micro-batches, exactly the sums
//! chapter 1 forms over the rows of its batch. The tied embedding gets one part of its gradient
//! on the first stage (the embedding) and one on the last (the output projection): their sum,
//! on both, is chapter 1's gradient. The global norm is the sum of the stages' squared norms
//! (counting the tied copy once), so every stage clips as chapter 1 does.

use crate::parts::StageParts;
use crate::schedule::{Instr, Pipe, Schedule, ScheduleKind, last_use, peak_in_flight};
use crate::stage::{StageParams, copy_by_name, holds, stage_layout};
use crate::train::{PipelineConfig, StageReport, partition};
use ch01_single_gpu::TrainError;
use ch01_single_gpu::backward_split::{BlockOutputGrads, blocks_backward_input, blocks_backward_weights};
use ch01_single_gpu::checkpoint::{self, CheckpointContents, TrainerState};
use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::data::{Batch, BatchSampler, Dataset, sequential_batch};
use ch01_single_gpu::model::{
    BackwardScratch, BlockActivations, Dims, Head, HeadActivations, blocks_backward, blocks_forward,
};
use ch01_single_gpu::optimizer::{Optimizer, squared_norm};
use ch01_single_gpu::params::{ParamLayout, ParamSpec};
use ch01_single_gpu::schedule::learning_rate;
use ch01_single_gpu::tokenizer::Tokenizer;
use ch01_single_gpu::train::{StartState, StepRecord, TrainSteps, check_config, model_config, run_shape, saves_after};
use ch02_data_parallel::grad_sync::GradSync;
use kernels::comm::{CommStats, Communicator, ReduceOp};
use kernels::dispatch::copy;
use kernels::ops::grad_norm::clip_scale;
use kernels::{Category, DType, Device, MemoryLedger, Tensor, Trace};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// One micro-batch's buffers in one model chunk of a stage: its input, what the chunk's blocks'
/// forward saved, and (on the last stage) the head's; `grad` is dL/d(output) as it arrives and
/// dL/d(input) as it leaves. With a split backward (zb-h1), `output_grads` holds what each
/// block's B leaves for its W, and on the first stage `grad` keeps dL/d(embeddings) for W.
struct Slot {
    chunk: usize,
    input: Tensor,
    blocks: Vec<BlockActivations>,
    head: Option<HeadActivations>,
    grad: Tensor,
    output_grads: Vec<BlockOutputGrads>,
}

/// A stage: its share of the model, its buffers, and its place in the pipe.
pub struct Stage {
    s: usize,
    n: usize,
    cfg: PipelineConfig,
    model: ModelConfig,
    layout: ParamLayout,
    pipe: Pipe,
    /// The blocks of each chunk.
    chunks: Vec<Range<usize>>,
    params: Tensor,
    grads: Tensor,
    optimizer: Optimizer,
    /// The squared norm counts each parameter once: the last stage's copy of wte is left out
    /// (and so are the tensors `parts` says another rank counts).
    norm_ranges: Vec<Range<usize>>,
    /// Activation buffers, taken by a micro-batch at its first instruction and given back after
    /// its last. They grow to the schedule's peak in flight, and no further.
    slots: Vec<Slot>,
    /// Free slots of each chunk.
    free: Vec<Vec<usize>>,
    slot_of: HashMap<(usize, usize), usize>,
    scratch: BackwardScratch,
    proj: Tensor,
    /// Activations travel on `comm`, gradients on `grad_comm` (all stages each): two wires, each
    /// delivering in order, so that the two kinds never need to agree on an order.
    comm: Box<dyn Communicator>,
    grad_comm: Box<dyn Communicator>,
    /// First and last stage only: the pair that sums the tied embedding's gradient.
    tied: Option<Box<dyn Communicator>>,
    /// How this stage runs the model's parts: whole, or on a tensor-parallel shard (chapter 5).
    parts: Box<dyn StageParts>,
    /// With --dp: this stage's replicas in the other pipelines (chapter 2's gradient sync), and
    /// which replica this is.
    dp_sync: Option<GradSync>,
    replica: usize,
    train_list: Vec<Instr>,
    eval_list: Vec<Instr>,
    dataset: Arc<Dataset>,
    sampler: BatchSampler,
    /// Rows per micro-batch, and tokens per row.
    rows: usize,
    t: usize,
    step: u64,
    started: Instant,
    record: Option<StepRecord>,
    ledger: MemoryLedger,
    /// This stage's lane of the run's trace (the caller's choice): one span per instruction.
    trace: Trace,
    /// Stage 0 of the first pipe, after a step that saves: every stage's tensors and moments in
    /// chapter 1's layout, and where the run stands, for [`TrainSteps::save`].
    gathered: Option<Gathered>,
    /// Chapter 6's ZeRO-1, when asked for ([`Stage::sharding_optimizer`]): instead of `dp_sync`.
    sharded: Option<ShardedOptimizer>,
}

/// ZeRO-1 over the stage's data-parallel group (chapter 6): the stage's flat buffer, padded to
/// P = N·S floats, is cut into N shards of S; replica r owns floats [r·S, (r+1)·S) and keeps
/// Adam's moments for those alone. After the flush the gradients are reduce-scattered (each
/// replica gets the sum of its shard), each replica updates its shard, and the parameters are
/// all-gathered: the bytes of chapter 2's all-reduce, and 1/N of its optimizer state.
struct ShardedOptimizer {
    dp: Box<dyn Communicator>,
    /// The stage's floats, and this replica's of them.
    total: usize,
    owned: Range<usize>,
    /// P floats (a collective's whole buffer, padding included) and S floats (this shard).
    padded: Tensor,
    shard: Tensor,
}

/// The whole model's state, gathered from the stages for a checkpoint.
struct Gathered {
    params: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
    state: TrainerState,
}

impl Stage {
    /// Stage `comm.rank()` of a pipe (`comm` is the pipe's communicator), replica `replica` of
    /// --dp, with `dp` its data-parallel group when there is more than one pipe, running the
    /// model's parts as `parts` does.
    pub fn new(
        cfg: &PipelineConfig,
        comm: Box<dyn Communicator>,
        (replica, dp): (usize, Option<Box<dyn Communicator>>),
        parts: Box<dyn StageParts>,
        dataset: Arc<Dataset>,
        trace: Trace,
    ) -> Result<Stage, TrainError> {
        Stage::build(cfg, comm, (replica, dp), parts, dataset, trace, false)
    }

    /// As [`Stage::new`], with chapter 6's ZeRO-1 over the data-parallel group `dp`: Adam's
    /// moments for this replica's shard of the stage only, the gradients reduce-scattered and
    /// the parameters all-gathered instead of chapter 2's all-reduce.
    pub fn sharding_optimizer(
        cfg: &PipelineConfig,
        comm: Box<dyn Communicator>,
        (replica, dp): (usize, Option<Box<dyn Communicator>>),
        parts: Box<dyn StageParts>,
        dataset: Arc<Dataset>,
        trace: Trace,
    ) -> Result<Stage, TrainError> {
        Stage::build(cfg, comm, (replica, dp), parts, dataset, trace, true)
    }

    fn build(
        cfg: &PipelineConfig,
        mut comm: Box<dyn Communicator>,
        (replica, dp): (usize, Option<Box<dyn Communicator>>),
        parts: Box<dyn StageParts>,
        dataset: Arc<Dataset>,
        trace: Trace,
        shard_optimizer: bool,
    ) -> Result<Stage, TrainError> {
        let train = &cfg.train;
        let model = model_config(train, Tokenizer::new(train.tokenizer).vocab_size())?;
        let t = check_config(train, &model)?;
        dataset.check_seq_len(t)?;
        let (s, n) = (comm.rank(), comm.world_size());
        let pipe = Pipe { ranks: n, chunks: cfg.virtual_stages };
        let blocks_of = partition(cfg, &model, t);
        let chunks: Vec<Range<usize>> = (0..pipe.chunks).map(|c| blocks_of[pipe.virtual_stage(s, c)].clone()).collect();
        let full = ParamLayout::new(&model);
        let n_blocks = chunks.iter().map(|b| b.len()).sum();
        let cut_from = parts.layout(&full)?;
        let layout = stage_layout(&cut_from, |spec| holds(spec, s, n, &chunks), n_blocks);
        let (first, last) = (s == 0, s + 1 == n);

        let ledger = MemoryLedger::new();
        let buffer = |category| Tensor::zeros_on(&[layout.total], Device::Cpu, DType::F32, category, &ledger);
        let (mut params, grads) = (buffer(Category::Parameters)?, buffer(Category::Gradients)?);
        let (mut dp, mut owned, mut sharded) = (dp, 0..layout.total, None);
        if shard_optimizer && let Some(group) = dp.take() {
            let (r, n) = (group.rank(), group.world_size());
            let s = layout.total.div_ceil(n);
            owned = (r * s).min(layout.total)..((r + 1) * s).min(layout.total);
            let comm_buffer = |len| Tensor::zeros_on(&[len], Device::Cpu, DType::F32, Category::Communication, &ledger);
            let (padded, shard) = (comm_buffer(n * s)?, comm_buffer(s)?);
            sharded = Some(ShardedOptimizer { dp: group, total: layout.total, owned: owned.clone(), padded, shard });
        }
        let mut optimizer = Optimizer::new(&layout, owned, train.weight_decay, train.adam, Device::Cpu, &ledger)?;
        // ANCHOR: stage_init
        // Every stage reads the whole model as chapter 1 does (initialised from the seed, or a
        // checkpoint in chapter 1's layout), and keeps its share: the same start in every layout.
        let mine = |whole: &[f32]| {
            let mut share = vec![0.0; layout.total];
            copy_by_name(&cut_from, &parts.take(&full, &cut_from, whole), &layout, &mut share);
            share
        };
        let run = run_shape(train, &model, t, &dataset);
        let StartState { params: host, moments, step, sampler } = StartState::load(train, &run, &full)?;
        if let Some((m, v)) = &moments {
            optimizer.load_moments(&mine(m), &mine(v))?;
        }
        params.copy_from(&mine(&host))?;
        // ANCHOR_END: stage_init
        let norm_ranges =
            norm_ranges(&layout, |spec| parts.counts_in_norm(spec) && !(last && !first && spec.name == "wte.weight"));

        // Each pipe computes its replica's share of every batch, in micro-batches.
        let rows = train.batch_size / (cfg.dp * cfg.microbatches);
        let grad_comm = comm.split(&(0..n).collect::<Vec<_>>())?;
        let tied = if n > 1 && (first || last) { Some(comm.split(&[0, n - 1])?) } else { None };
        let micro_per_step = cfg.microbatches * train.grad_accum;
        let train_list = Schedule::new(cfg.schedule, n, pipe.chunks, micro_per_step).stages[s].clone();
        let train_list = if cfg.skip_tied_sum {
            train_list.into_iter().filter(|i| *i != Instr::ReduceTiedGrads).collect()
        } else {
            train_list
        };
        let eval_list = Schedule::forward_only(n, pipe.chunks, cfg.microbatches).stages[s].clone();
        let scratch = BackwardScratch::new(parts.shape(&model), rows, t, Device::Cpu, DType::F32, &ledger)?;
        let dp_sync = dp.map(|dp| GradSync::new(dp, &layout, 0, &ledger, Trace::disabled()));
        let proj = Tensor::zeros_on(&[rows * t, model.n_embd], Device::Cpu, DType::F32, Category::Other, &ledger)?;
        Ok(Stage {
            s,
            n,
            cfg: cfg.clone(),
            model,
            layout,
            pipe,
            chunks,
            params,
            grads,
            optimizer,
            norm_ranges,
            slots: Vec::new(),
            free: vec![Vec::new(); pipe.chunks],
            slot_of: HashMap::new(),
            scratch,
            proj,
            comm,
            grad_comm,
            tied,
            parts,
            dp_sync,
            replica,
            train_list,
            eval_list,
            dataset,
            sampler,
            rows,
            t,
            step,
            started: Instant::now(),
            record: None,
            ledger,
            trace,
            gathered: None,
            sharded,
        })
    }

    fn last(&self) -> bool {
        self.s + 1 == self.n
    }

    /// The slot (micro-batch, chunk) uses: its own, or a free one of the chunk, or a new one.
    fn slot(&mut self, key: (usize, usize)) -> Result<usize, TrainError> {
        if let Some(&i) = self.slot_of.get(&key) {
            return Ok(i);
        }
        let chunk = key.1;
        let i = match self.free[chunk].pop() {
            Some(i) => i,
            None => {
                let (rows, t, c, ledger) = (self.rows, self.t, self.model.n_embd, &self.ledger);
                let shape = self.parts.shape(&self.model);
                let act = |category| Tensor::zeros_on(&[rows * t, c], Device::Cpu, DType::F32, category, ledger);
                let blocks = self.chunks[chunk]
                    .clone()
                    .map(|_| BlockActivations::new(shape, rows, t, Device::Cpu, DType::F32, ledger))
                    .collect::<Result<_, _>>()?;
                let columns = self.parts.logit_columns(&self.model);
                let head = match self.pipe.is_last(self.s, chunk) {
                    true => Some(HeadActivations::with_columns(
                        &self.model,
                        columns,
                        rows,
                        t,
                        Device::Cpu,
                        DType::F32,
                        ledger,
                    )?),
                    false => None,
                };
                let (input, grad) = (act(Category::Activations)?, act(Category::Other)?);
                let output_grads = match self.cfg.schedule {
                    ScheduleKind::ZbH1 => self.chunks[chunk]
                        .clone()
                        .map(|_| BlockOutputGrads::new(shape, rows, t, Device::Cpu, DType::F32, ledger))
                        .collect::<Result<_, _>>()?,
                    _ => Vec::new(),
                };
                self.slots.push(Slot { chunk, input, blocks, head, grad, output_grads });
                self.slots.len() - 1
            }
        };
        self.slot_of.insert(key, i);
        Ok(i)
    }

    /// Chunk `chunk`'s blocks among the stage's (they are in layout order, chunk by chunk).
    fn chunk_blocks(&self, chunk: usize) -> Range<usize> {
        let start = self.chunks[..chunk].iter().map(|b| b.len()).sum();
        start..start + self.chunks[chunk].len()
    }

    // ANCHOR: interpreter
    /// Runs one instruction list over `micros` (the micro-batches, each `rows` x T tokens).
    /// Returns the sum of the micro-batches' mean losses (the last stage computes them; the
    /// others return 0).
    fn execute(&mut self, list: &[Instr], micros: &[Batch], dloss: f32) -> Result<f64, TrainError> {
        let last_use = last_use(list);
        let mut loss_sum = 0.0f64;
        let trace = self.trace.clone();
        for (at, &instr) in list.iter().enumerate() {
            let _span = trace.is_enabled().then(|| trace.span(instr.to_string()));
            let micro = instr.micro();
            let slot = match micro {
                Some(m) => Some(self.slot(m)?),
                None => None,
            };
            let (s, pipe) = (self.s, self.pipe);
            match (instr, slot) {
                (Instr::RecvActivation { chunk, .. }, Some(i)) => {
                    self.comm.recv(self.slots[i].input.as_mut_slice(), pipe.prev(s, chunk).0)?;
                }
                (Instr::Forward { micro, .. }, Some(i)) => loss_sum += self.forward(i, &micros[micro])?,
                (Instr::SendActivation { chunk, .. }, Some(i)) => {
                    let out = self.slots[i].blocks.last().map_or(&self.slots[i].input, |b| &b.out);
                    self.comm.send(out.as_slice(), pipe.next(s, chunk).0)?;
                }
                (Instr::RecvGrad { chunk, .. }, Some(i)) => {
                    self.grad_comm.recv(self.slots[i].grad.as_mut_slice(), pipe.next(s, chunk).0)?;
                }
                (Instr::Backward { micro, .. }, Some(i)) => self.backward(i, &micros[micro], dloss)?,
                (Instr::BackwardInput { micro, .. }, Some(i)) => self.backward_input(i, &micros[micro], dloss)?,
                (Instr::BackwardWeights { micro, .. }, Some(i)) => self.backward_weights(i, &micros[micro])?,
                (Instr::SendGrad { chunk, .. }, Some(i)) => {
                    self.grad_comm.send(self.slots[i].grad.as_slice(), pipe.prev(s, chunk).0)?;
                }
                (Instr::ReduceTiedGrads, _) => self.reduce_tied_grads()?,
                (Instr::OptimizerStep, _) => self.optimizer_step(loss_sum / micros.len() as f64)?,
                _ => unreachable!("every micro-batch instruction has a slot"),
            }
            // The micro-batch's last instruction here: its buffers are free for the next one.
            if let Some(m) = micro
                && last_use.get(&m) == Some(&at)
                && let Some(i) = self.slot_of.remove(&m)
            {
                self.free[m.1].push(i);
            }
        }
        Ok(loss_sum)
    }
    // ANCHOR_END: interpreter

    // ANCHOR: stage_forward
    /// The stage's forward of one micro-batch: embeddings (first stage), its blocks, the head
    /// and the loss (last stage). Returns the micro-batch's mean loss on the last stage, else 0.
    fn forward(&mut self, i: usize, batch: &Batch) -> Result<f64, TrainError> {
        let chunk = self.slots[i].chunk;
        let (first, last) = (self.pipe.is_first(self.s, chunk), self.pipe.is_last(self.s, chunk));
        let (t, c) = (self.t, self.model.n_embd);
        let d = Dims { b: self.rows, t, shape: self.parts.shape(&self.model) };
        let p = StageParams::new(&self.layout, self.layout.tensor_views(self.params.view()));
        let blocks = &p.blocks[self.chunk_blocks(chunk)];
        let slot = &mut self.slots[i];
        if first && let (Some(wte), Some(wpe)) = (p.wte, p.wpe) {
            self.parts.embed_forward(slot.input.view_mut(), &batch.inputs, wte, wpe, t, c)?;
        }
        let comm = self.parts.block_comm();
        blocks_forward(blocks, slot.input.view(), &mut slot.blocks, self.proj.view_mut(), d, comm)?;
        if !last {
            return Ok(0.0);
        }
        let (Some(ln_f_weight), Some(ln_f_bias), Some(wte), Some(acts)) =
            (p.ln_f_weight, p.ln_f_bias, p.wte, slot.head.as_mut())
        else {
            unreachable!("the last stage holds the head")
        };
        let x = slot.blocks.last().map_or(&slot.input, |b| &b.out).view();
        let head = Head { ln_f_weight, ln_f_bias, wte };
        let loss = self.parts.head_forward(&head, &self.model, x, acts, Some(&batch.targets), d.bt())?;
        Ok(loss.unwrap_or(f32::NAN) as f64)
    }
    // ANCHOR_END: stage_forward

    // ANCHOR: stage_backward
    /// The stage's backward of one micro-batch, from dL/d(output) in the slot's `grad` (or from
    /// the loss, on the last stage), accumulating the stage's gradients; dL/d(input) is left in
    /// `grad` for the previous stage (the first stage scatters it into the embeddings instead).
    fn backward(&mut self, i: usize, batch: &Batch, dloss: f32) -> Result<(), TrainError> {
        let chunk = self.slots[i].chunk;
        let (first, last) = (self.pipe.is_first(self.s, chunk), self.pipe.is_last(self.s, chunk));
        let (t, c) = (self.t, self.model.n_embd);
        let d = Dims { b: self.rows, t, shape: self.parts.shape(&self.model) };
        let mine = self.chunk_blocks(chunk);
        let p = StageParams::new(&self.layout, self.layout.tensor_views(self.params.view()));
        let mut g = StageParams::new(&self.layout, self.layout.tensor_views_mut(self.grads.view_mut()));
        let (slot, scratch) = (&mut self.slots[i], &mut self.scratch);
        if last {
            let (Some(ln_f_weight), Some(ln_f_bias), Some(wte), Some(acts)) =
                (p.ln_f_weight, p.ln_f_bias, p.wte, slot.head.as_mut())
            else {
                unreachable!("the last stage holds the head")
            };
            let (Some(gw), Some(gb), Some(gwte)) = (g.ln_f_weight.as_mut(), g.ln_f_bias.as_mut(), g.wte.as_mut())
            else {
                unreachable!("the last stage holds the head's gradients")
            };
            let grads = Head { ln_f_weight: gw.reborrow(), ln_f_bias: gb.reborrow(), wte: gwte.reborrow() };
            let x = slot.blocks.last().map_or(&slot.input, |b| &b.out).view();
            let (d_ln, d_x) = (scratch.block.d_ln.view_mut(), scratch.d_res[0].view_mut());
            let head = Head { ln_f_weight, ln_f_bias, wte };
            self.parts.head_backward(&head, grads, &self.model, x, acts, d_ln, d_x, &batch.targets, dloss, d.bt())?;
        } else {
            copy(scratch.d_res[0].view_mut(), slot.grad.view());
        }
        let x = slot.input.view();
        let (blocks, grads) = (&p.blocks[mine.clone()], &mut g.blocks[mine]);
        let comm = self.parts.block_comm();
        blocks_backward(blocks, grads, x, &slot.blocks, scratch, d, comm, &mut |_, _| {})?;
        if first {
            if let (Some(dwte), Some(dwpe)) = (g.wte, g.wpe) {
                self.parts.embed_backward(dwte, dwpe, scratch.d_res[0].view(), &batch.inputs, t, c);
            }
        } else {
            copy(slot.grad.view_mut(), scratch.d_res[0].view());
        }
        Ok(())
    }
    // ANCHOR_END: stage_backward

    // ANCHOR: stage_backward_split
    /// B of one micro-batch (zb-h1): the stage's backward less its weight gradients (see
    /// `ch01_single_gpu::backward_split`). dL/d(input) is left in `grad`: sent back, or, on the
    /// first stage, kept for the embedding's W.
    fn backward_input(&mut self, i: usize, batch: &Batch, dloss: f32) -> Result<(), TrainError> {
        let chunk = self.slots[i].chunk;
        let last = self.pipe.is_last(self.s, chunk);
        let d = Dims { b: self.rows, t: self.t, shape: self.parts.shape(&self.model) };
        let mine = self.chunk_blocks(chunk);
        let p = StageParams::new(&self.layout, self.layout.tensor_views(self.params.view()));
        let mut g = StageParams::new(&self.layout, self.layout.tensor_views_mut(self.grads.view_mut()));
        let (slot, scratch, parts) = (&mut self.slots[i], &mut self.scratch, &mut self.parts);
        if last {
            let (Some(ln_f_weight), Some(ln_f_bias), Some(wte), Some(acts)) =
                (p.ln_f_weight, p.ln_f_bias, p.wte, slot.head.as_mut())
            else {
                unreachable!("the last stage holds the head")
            };
            let (Some(gw), Some(gb)) = (g.ln_f_weight.as_mut(), g.ln_f_bias.as_mut()) else {
                unreachable!("the last stage holds the head's gradients")
            };
            let x = slot.blocks.last().map_or(&slot.input, |b| &b.out).view();
            let (d_ln, d_x) = (scratch.block.d_ln.view_mut(), scratch.d_res[0].view_mut());
            let head = Head { ln_f_weight, ln_f_bias, wte };
            let (gw, gb) = (gw.reborrow(), gb.reborrow());
            parts.head_backward_input(
                &head,
                (gw, gb),
                &self.model,
                x,
                acts,
                d_ln,
                d_x,
                &batch.targets,
                dloss,
                d.bt(),
            )?;
        } else {
            copy(scratch.d_res[0].view_mut(), slot.grad.view());
        }
        let (blocks, grads) = (&p.blocks[mine.clone()], &mut g.blocks[mine]);
        let (x, acts, saved) = (slot.input.view(), &slot.blocks, &mut slot.output_grads);
        blocks_backward_input(blocks, grads, x, acts, saved, scratch, d, parts.block_comm())?;
        copy(slot.grad.view_mut(), scratch.d_res[0].view());
        Ok(())
    }

    /// W of one micro-batch: the head's share of dwte (last stage), the blocks' weight
    /// gradients, the embeddings' (first stage), in the order the fused backward adds them.
    fn backward_weights(&mut self, i: usize, batch: &Batch) -> Result<(), TrainError> {
        let chunk = self.slots[i].chunk;
        let (first, last) = (self.pipe.is_first(self.s, chunk), self.pipe.is_last(self.s, chunk));
        let (t, c) = (self.t, self.model.n_embd);
        let d = Dims { b: self.rows, t, shape: self.parts.shape(&self.model) };
        let mine = self.chunk_blocks(chunk);
        let p = StageParams::new(&self.layout, self.layout.tensor_views(self.params.view()));
        let mut g = StageParams::new(&self.layout, self.layout.tensor_views_mut(self.grads.view_mut()));
        let slot = &self.slots[i];
        if last && let (Some(dwte), Some(acts)) = (g.wte.as_mut(), slot.head.as_ref()) {
            self.parts.head_backward_weights(dwte.reborrow(), &self.model, acts, d.bt())?;
        }
        blocks_backward_weights(&p.blocks[mine.clone()], &mut g.blocks[mine], &slot.blocks, &slot.output_grads, d);
        if first && let (Some(dwte), Some(dwpe)) = (g.wte, g.wpe) {
            self.parts.embed_backward(dwte, dwpe, slot.grad.view(), &batch.inputs, t, c);
        }
        Ok(())
    }
    // ANCHOR_END: stage_backward_split

    // ANCHOR: gather_checkpoint
    /// After a step that saves (first pipe only: the pipes hold the same model): every stage
    /// sends its parameters and Adam moments to stage 0, which puts them into chapter 1's layout
    /// by name (the tied wte is the same on both holders), as `train` does with the report.
    fn gather_checkpoint(&mut self) -> Result<(), TrainError> {
        let mine = [self.params.to_vec()?, self.optimizer.adam_m.to_vec()?, self.optimizer.adam_v.to_vec()?];
        if self.s > 0 {
            for buf in &mine {
                self.comm.send(buf, 0)?;
            }
            return Ok(());
        }
        let full = ParamLayout::new(&self.model);
        let mut whole = [vec![0.0; full.total], vec![0.0; full.total], vec![0.0; full.total]];
        for (w, m) in whole.iter_mut().zip(&mine) {
            copy_by_name(&self.layout, m, &full, w);
        }
        for s in 1..self.n {
            let layout = self.layout_of(s, &full);
            for w in whole.iter_mut() {
                let mut theirs = vec![0.0; layout.total];
                self.comm.recv(&mut theirs, s)?;
                copy_by_name(&layout, &theirs, &full, w);
            }
        }
        let [params, adam_m, adam_v] = whole;
        let run = run_shape(&self.cfg.train, &self.model, self.t, &self.dataset);
        let state = TrainerState { step: self.step, sampler: self.sampler.clone(), run };
        self.gathered = Some(Gathered { params, adam_m, adam_v, state });
        Ok(())
    }
    // ANCHOR_END: gather_checkpoint

    /// Stage s's layout, derived as [`Stage::new`] derives its own.
    fn layout_of(&self, s: usize, full: &ParamLayout) -> ParamLayout {
        let parts = partition(&self.cfg, &self.model, self.t);
        let chunks: Vec<Range<usize>> =
            (0..self.pipe.chunks).map(|c| parts[self.pipe.virtual_stage(s, c)].clone()).collect();
        let n_blocks = chunks.iter().map(|b| b.len()).sum();
        stage_layout(full, |spec| holds(spec, s, self.n, &chunks), n_blocks)
    }

    // ANCHOR: reduce_tied
    /// The first stage holds the embedding's share of dL/d(wte), the last the output
    /// projection's: after the sum both hold chapter 1's gradient (bit-identical, so the two
    /// copies take the same AdamW step and stay equal).
    fn reduce_tied_grads(&mut self) -> Result<(), TrainError> {
        let (Some(tied), Some(spec)) = (self.tied.as_mut(), self.layout.get("wte.weight")) else {
            return Ok(()); // one stage: wte is one tensor, and backward already summed its uses
        };
        tied.all_reduce(&mut self.grads.as_mut_slice()[spec.range()], ReduceOp::Sum)?;
        Ok(())
    }
    // ANCHOR_END: reduce_tied

    // ANCHOR: optimizer_step
    /// Every stage: the global gradient norm from every stage's squared norm, the step's loss
    /// from the last stage, then chapter 1's clipped AdamW update of this stage's tensors.
    fn optimizer_step(&mut self, mean_loss: f64) -> Result<(), TrainError> {
        let mut loss = if self.last() { mean_loss as f32 } else { 0.0 };
        // With --dp, the pipes' gradients add up (chapter 2's sync, one all-reduce after the
        // flush), and the step's loss is the mean of theirs: every replica has as many tokens.
        if let Some(sync) = self.dp_sync.as_mut() {
            sync.begin();
            sync.finish(self.grads.as_mut_slice())?;
            loss = sync.reduce_scalars(vec![loss], ReduceOp::Avg)?[0];
        }
        let mut squared = 0.0;
        match self.sharded.as_mut() {
            None => {
                for range in &self.norm_ranges {
                    squared += squared_norm(self.grads.view(), range.clone())?;
                }
            }
            Some(z) => (squared, loss) = z.reduce_scatter(&mut self.grads, &self.norm_ranges, loss)?,
        }
        // With tensor parallelism, the stage's ranks' parts first (nothing to do without).
        let squared = self.parts.sum_norm(squared)?;
        // A squared norm is an f64: it travels as an f32 and the f32 rounding of the rest, so
        // that the sum (in stage order, in f64, the same on every stage) loses nothing.
        let hi = squared as f32;
        let mine = [hi, (squared - hi as f64) as f32, loss];
        let mut all = vec![0.0f32; 3 * self.n];
        self.comm.all_gather(&mine, &mut all)?;
        let squared: f64 = all.chunks(3).map(|s| s[0] as f64 + s[1] as f64).sum();
        let (loss, grad_norm) = (all[3 * self.n - 1], squared.sqrt() as f32);
        // As chapter 1's take_step: a non-finite step updates nothing.
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(TrainError::NonFiniteLoss { step: self.step + 1, loss, grad_norm, last_checkpoint: None });
        }
        let train = &self.cfg.train;
        let lr = learning_rate(train.lr_schedule, train.lr, self.step, train.steps, train.warmup_steps);
        let scale = clip_scale(grad_norm, train.grad_clip);
        self.optimizer.update(&mut self.params, None, &self.grads, lr, scale, self.step + 1);
        if let Some(z) = self.sharded.as_mut() {
            z.all_gather(&mut self.params)?;
        }
        self.step += 1;
        let tokens = (train.batch_size * self.t * train.grad_accum) as f64;
        let tokens_per_sec = tokens / self.started.elapsed().as_secs_f64();
        self.record = Some(StepRecord { step: self.step, loss, lr, grad_norm, tokens_per_sec, val_loss: None });
        Ok(())
    }
    // ANCHOR_END: optimizer_step

    /// This replica's rows of batch `batch`, cut into `m` micro-batches of `rows` rows.
    fn split(&self, batch: &Batch, m: usize) -> Vec<Batch> {
        let n = self.rows * self.t;
        (self.replica * m..(self.replica + 1) * m)
            .map(|j| Batch {
                inputs: batch.inputs[j * n..(j + 1) * n].to_vec(),
                targets: batch.targets[j * n..(j + 1) * n].to_vec(),
            })
            .collect()
    }

    /// The line the run starts with.
    pub fn header(&self) -> String {
        let (cfg, m) = (&self.cfg, &self.model);
        format!(
            "device: cpu ({} thread ranks) | model: {} layers, {} heads, {} dims | pipeline: {} stages, {} micro-batches of {} rows, {}",
            cfg.pp, m.n_layer, m.n_head, m.n_embd, cfg.pp, cfg.microbatches, self.rows, cfg.schedule
        )
    }

    /// This stage's account of the run, its final tensors included (and its data-parallel
    /// sync stopped).
    pub fn report(&mut self) -> Result<StageReport, TrainError> {
        let dp_comm = match (self.dp_sync.as_mut(), self.sharded.as_ref()) {
            (Some(sync), _) => sync.stop()?,
            (None, Some(z)) => z.dp.stats(),
            (None, None) => CommStats::default(),
        };
        // ZeRO-1: every replica's moments, put together into the stage's layout.
        let (adam_m, adam_v) = match self.sharded.as_mut() {
            Some(z) => (z.gather(&self.optimizer.adam_m)?, z.gather(&self.optimizer.adam_v)?),
            None => (self.optimizer.adam_m.to_vec()?, self.optimizer.adam_v.to_vec()?),
        };
        Ok(StageReport {
            stage: self.s,
            replica: self.replica,
            dp_comm,
            blocks: self.chunks.clone(),
            memory: self.ledger.report(),
            comm: merged(self.comm.stats(), self.grad_comm.stats()),
            stage_comm: self.parts.stats(),
            peak_in_flight: peak_in_flight(&self.train_list),
            // One slot of each chunk: one micro-batch's activations through the whole stage.
            micro_activation_bytes: (0..self.pipe.chunks)
                .filter_map(|c| self.slots.iter().find(|s| s.chunk == c))
                .map(|s| {
                    4 * (s.input.numel()
                        + s.blocks.iter().map(block_floats).sum::<usize>()
                        + s.head.as_ref().map_or(0, head_floats)
                        + s.output_grads
                            .iter()
                            .map(|g| [&g.d_out, &g.d_fc, &g.d_res_2, &g.d_qkv].iter().map(|t| t.numel()).sum::<usize>())
                            .sum::<usize>()) as u64
                })
                .sum(),
            layout: self.layout.clone(),
            params: self.params.to_vec()?,
            adam_m,
            adam_v,
            sampler: self.sampler.clone(),
            step: self.step,
        })
    }
}

impl TrainSteps for Stage {
    // ANCHOR: pipeline_step
    /// One optimizer step: every stage draws the same batches (only the first reads the
    /// inputs, only the last the targets), cuts them into micro-batches, and runs its list.
    fn step(&mut self) -> Result<StepRecord, TrainError> {
        self.started = Instant::now();
        let trace = self.trace.clone();
        let _span = trace.span("step");
        self.grads.fill(0.0);
        let (train, m) = (&self.cfg.train, self.cfg.microbatches);
        let (b, t, accum) = (train.batch_size, self.t, train.grad_accum);
        let mut micros = Vec::with_capacity(accum * m);
        for _ in 0..accum {
            let batch = self.sampler.next_batch(&self.dataset.train, b, t);
            micros.extend(self.split(&batch, m));
        }
        let dloss = 1.0 / (b * t * accum) as f32; // every token counts 1/(tokens in the step)
        let list = std::mem::take(&mut self.train_list);
        let result = self.execute(&list, &micros, dloss);
        self.train_list = list;
        result?;
        if self.replica == 0 && saves_after(&self.cfg.train, self.step) {
            self.gather_checkpoint()?;
        }
        self.record.take().ok_or(TrainError::Zero("optimizer steps in the schedule"))
    }
    // ANCHOR_END: pipeline_step

    /// Chapter 1's validation batches, each cut into micro-batches and sent down the pipe with
    /// the forward passes alone; every stage learns the mean loss.
    fn evaluate(&mut self) -> Result<f32, TrainError> {
        let (m, batches) = (self.cfg.microbatches, self.cfg.train.val_batches);
        let list = std::mem::take(&mut self.eval_list);
        let mut total = 0.0;
        for k in 0..batches as u64 {
            // Batch k of chapter 1's protocol, in micro-batches of `rows`: this replica's share.
            let first = (k * self.cfg.dp as u64 + self.replica as u64) * m as u64;
            let micros: Vec<Batch> =
                (first..first + m as u64).map(|j| sequential_batch(&self.dataset.val, j, self.rows, self.t)).collect();
            match self.execute(&list, &micros, 0.0) {
                Ok(sum) => total += sum / m as f64,
                Err(e) => {
                    self.eval_list = list;
                    return Err(e);
                }
            }
        }
        self.eval_list = list;
        let mut loss = [if self.last() { (total / batches as f64) as f32 } else { 0.0 }];
        if let Some(sync) = self.dp_sync.as_mut() {
            loss[0] = sync.reduce_scalars(vec![loss[0]], ReduceOp::Avg)?[0];
        }
        if let Some(z) = self.sharded.as_mut() {
            z.dp.all_reduce(&mut loss, ReduceOp::Avg)?;
        }
        self.comm.all_reduce(&mut loss, ReduceOp::Sum)?;
        Ok(loss[0])
    }

    /// The leader (stage 0 of the first pipe) writes what the step gathered.
    fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let Some(g) = &self.gathered else { return Err(TrainError::PartialOptimizer) };
        let full = ParamLayout::new(&self.model);
        let optimizer = Some((&g.adam_m[..], &g.adam_v[..], &g.state));
        let contents = CheckpointContents { cfg: &self.model, layout: &full, params: &g.params, optimizer };
        Ok(checkpoint::save(dir, &contents)?)
    }

    fn steps_done(&self) -> u64 {
        self.step
    }

    fn ranks(&self) -> usize {
        self.cfg.pp * self.cfg.dp * self.parts.ranks()
    }
}

// ANCHOR: sharded_optimizer
impl ShardedOptimizer {
    /// After the flush: each replica's gradients reduce-scattered, so this replica's shard of
    /// `grads` holds their sum (the rest is left stale); returns the squared norm of the
    /// counted floats of every shard and the replicas' mean loss (the same on every replica).
    fn reduce_scatter(
        &mut self,
        grads: &mut Tensor,
        counted: &[Range<usize>],
        loss: f32,
    ) -> Result<(f64, f32), TrainError> {
        let (total, owned) = (grads.numel(), self.owned.clone());
        let padded = self.padded.as_mut_slice();
        padded[..total].copy_from_slice(grads.as_slice());
        padded[total..].fill(0.0);
        self.dp.reduce_scatter(padded, self.shard.as_mut_slice(), ReduceOp::Sum)?;
        grads.as_mut_slice()[owned.clone()].copy_from_slice(&self.shard.as_slice()[..owned.len()]);
        let mut squared = 0.0;
        for range in counted {
            let mine = range.start.max(owned.start)..range.end.min(owned.end);
            if !mine.is_empty() {
                squared += squared_norm(grads.view(), mine)?;
            }
        }
        // [hi, lo, loss] from each replica (an f64 travels as an f32 and its rounding), added
        // in replica order.
        let n = self.dp.world_size();
        let hi = squared as f32;
        let mut all = vec![0.0f32; 3 * n];
        self.dp.all_gather(&[hi, (squared - hi as f64) as f32, loss], &mut all)?;
        let squared = all.chunks(3).map(|s| s[0] as f64 + s[1] as f64).sum();
        let loss = all.chunks(3).map(|s| s[2] as f64).sum::<f64>() / n as f64;
        Ok((squared, loss as f32))
    }

    /// After this replica's update of its shard: every replica's updated shard, to all.
    fn all_gather(&mut self, params: &mut Tensor) -> Result<(), TrainError> {
        let (total, owned) = (params.numel(), self.owned.clone());
        let shard = self.shard.as_mut_slice();
        shard[..owned.len()].copy_from_slice(&params.as_slice()[owned.clone()]);
        shard[owned.len()..].fill(0.0);
        self.dp.all_gather(shard, self.padded.as_mut_slice())?;
        params.as_mut_slice().copy_from_slice(&self.padded.as_slice()[..total]);
        Ok(())
    }

    /// A moment of the owned floats -> the stage's whole buffer of it (collective).
    fn gather(&mut self, moment: &Tensor) -> Result<Vec<f32>, TrainError> {
        let (n, s) = (self.dp.world_size(), self.shard.numel());
        let mut send = vec![0.0f32; s];
        send[..moment.numel()].copy_from_slice(moment.as_slice());
        let mut all = vec![0.0f32; n * s];
        self.dp.all_gather(&send, &mut all)?;
        all.truncate(self.total);
        Ok(all)
    }
}
// ANCHOR_END: sharded_optimizer

/// The ranges of `layout` made of the tensors `counts` keeps, neighbours merged: the squared
/// norm of each is one sum (so one range, when every tensor counts, is one sum as before).
pub fn norm_ranges(layout: &ParamLayout, counts: impl Fn(&ParamSpec) -> bool) -> Vec<Range<usize>> {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for spec in layout.specs.iter().filter(|spec| counts(spec)) {
        match ranges.last_mut() {
            Some(last) if last.end == spec.offset => last.end = spec.range().end,
            _ => ranges.push(spec.range()),
        }
    }
    ranges
}

/// The bytes of two communicators, added up.
fn merged(mut a: CommStats, b: CommStats) -> CommStats {
    for (mine, theirs) in [(&mut a.sent, b.sent), (&mut a.received, b.received), (&mut a.calls, b.calls)] {
        for (collective, n) in theirs {
            *mine.entry(collective).or_default() += n;
        }
    }
    a
}

fn block_floats(a: &BlockActivations) -> usize {
    [
        &a.ln_1,
        &a.ln_1_mean,
        &a.ln_1_rstd,
        &a.qkv,
        &a.att,
        &a.att_y,
        &a.res_2,
        &a.ln_2,
        &a.ln_2_mean,
        &a.ln_2_rstd,
        &a.fc,
        &a.fc_gelu,
        &a.out,
    ]
    .iter()
    .map(|t| t.numel())
    .sum()
}

fn head_floats(a: &HeadActivations) -> usize {
    [&a.ln_f, &a.ln_f_mean, &a.ln_f_rstd, &a.logits, &a.losses].iter().map(|t| t.numel()).sum()
}
