//! Tensor parallelism: a group of `--tp` ranks holds one model between them. Every block is
//! split Megatron's way (the placements of `ParamLayout`: c_attn and c_fc by columns, the two
//! projections by rows), and so is the vocabulary (`vocab_parallel.rs`). All ranks compute on
//! the same batch; only the sums of `tp_comm.rs` join them.
//!
//! A rank initialises the full model from the seed, exactly as chapter 1 does, and keeps its
//! shard (`ParamLayout::take_shard`): so every layout starts from chapter 1's parameters. Its
//! gradients, AdamW moments and activations exist only for its shard. Replicated tensors (the
//! LayerNorms, wpe, the row-parallel biases) get the same gradient on every rank, because they
//! are computed from sums that every rank holds identically, so they stay identical without a
//! collective of their own.
//!
//! With `--sequence-parallel` the residual stream is split by tokens as well (`tp_comm::Stream`):
//! each rank runs the LayerNorms and the residual adds on its B·T/n rows. Then the LayerNorms'
//! gradients are sums over this rank's tokens only, and must be summed over the group once per
//! step ([`TpRank::sum_token_split_grads`]); the row-parallel biases and wpe still get the
//! gradient of every token (their backward reads the gathered output gradient), like the rest.

use crate::tp_comm::{Fault, PlacementCheck, Stream, TpBlockComm, sum_f64_over_group};
use crate::vocab_parallel::{VocabShard, embed_backward, embed_forward, head_backward, head_forward};
use ch01_single_gpu::checkpoint::{self, CheckpointContents, RunShape, TrainerState};
use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::data::{BatchSampler, Dataset, sequential_batch};
use ch01_single_gpu::model::{
    BackwardScratch, BlockActivations, BlockShape, Dims, GradsReady, Head, HeadActivations, blocks_backward,
    blocks_forward,
};
use ch01_single_gpu::optimizer::{Optimizer, squared_norm};
use ch01_single_gpu::params::ParamSpec;
use ch01_single_gpu::params::{BlockParams, ParamLayout, Part, Placement, ShardError};
use ch01_single_gpu::sample::{SampleConfig, sample_next};
use ch01_single_gpu::schedule::learning_rate;
use ch01_single_gpu::tokenizer::Tokenizer;
use ch01_single_gpu::train::{
    LoopOutcome, StartState, StepRecord, TrainSteps, check_config, drive, load_dataset, model_config, run_shape,
    saves_after,
};
use ch01_single_gpu::{TrainConfig, TrainError, TrainReport};
use ch02_data_parallel::grad_sync::GradSync;
use kernels::comm::grid::{Coords, Grid, GroupKind};
use kernels::comm::thread::{LaunchError, ThreadComm, launch};
use kernels::comm::{CommStats, Communicator, ReduceOp};
use kernels::device::DeviceRequest;
use kernels::ops::grad_norm::clip_scale;
use kernels::{Category, DType, Device, MemoryLedger, MemoryReport, Rng, Tensor, TensorError, Trace, View, ViewMut};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Thread ranks on the CPU: more than this only thrashes a machine, and is almost surely a typo.
pub use ch02_data_parallel::data_parallel::MAX_THREAD_RANKS;

#[derive(Clone, Debug)]
pub struct TpConfig {
    pub train: TrainConfig,
    /// Tensor-parallel ranks: must divide the heads, the MLP width and the padded vocabulary.
    pub tp: usize,
    /// Data-parallel replicas of the tensor-parallel group (1: none). Must divide the batch.
    pub dp: usize,
    /// Split the residual stream by tokens too (Korthikanti et al. 2022): the B·T tokens of a
    /// replica's micro-batch must divide among the `tp` ranks.
    pub sequence_parallel: bool,
    /// A deliberate mistake (tests only: the check must catch it).
    pub fault: Option<Fault>,
}

#[derive(Debug, thiserror::Error)]
pub enum TpError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("--tp must be at least 1")]
    ZeroRanks,
    #[error("--dp must be at least 1")]
    ZeroReplicas,
    #[error("--tp {tp} x --dp {dp} is more ranks than are available ({MAX_THREAD_RANKS} thread ranks on the CPU)")]
    TooManyRanks { tp: usize, dp: usize },
    #[error(
        "the batch of {batch} sequences is not divisible by --dp {dp}: every replica must get the same number of rows"
    )]
    BatchNotDivisible { batch: usize, dp: usize },
    #[error("--tp {tp} does not divide the model's {n_head} attention heads: each rank computes whole heads")]
    Heads { tp: usize, n_head: usize },
    #[error("--tp {tp} does not divide the MLP's {hidden} units (4 x n_embd): each rank computes an equal share")]
    Mlp { tp: usize, hidden: usize },
    #[error("--tp {tp} does not divide the padded vocabulary of {vp} rows: each rank holds an equal share of wte")]
    Vocab { tp: usize, vp: usize },
    #[error(
        "--sequence-parallel needs the {tokens} tokens of a micro-batch (batch {rows} x seq_len {t}, per replica) divisible by --tp {tp}: each rank holds an equal share of them"
    )]
    TokensNotDivisible { tokens: usize, rows: usize, t: usize, tp: usize },
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(
        "chapter 3's ranks are threads on the CPU (GPU ranks, over NCCL, are not built yet); run it with --device cpu or auto"
    )]
    GpuRanks,
    /// A rank failed: which one, and why.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("rank 0 returned no report")]
    NoReport,
    #[error("could not start a rank's compute threads: {0}")]
    ThreadPool(#[from] rayon::ThreadPoolBuildError),
}

/// One rank's account of a run.
#[derive(Clone, Debug)]
pub struct TpRankReport {
    pub rank: usize,
    /// Its place in the grid: rank = tp_rank + tp · dp_rank.
    pub tp_rank: usize,
    pub dp_rank: usize,
    pub memory: MemoryReport,
    /// Bytes sent and received in the tensor-parallel group, by collective.
    pub comm: CommStats,
    /// Of those, the bytes sent by training steps (evaluation and gathers for checkpoints and
    /// the report left out): what the formula predicts.
    pub sent_in_steps: u64,
    /// Bytes of the data-parallel group (the gradient sum and the losses).
    pub dp_comm: CommStats,
    /// Milliseconds per token of the text sample, generated on the shards (when asked for).
    pub sample_ms_per_token: Option<f64>,
}

pub struct TpReport {
    pub tp: usize,
    pub dp: usize,
    pub sequence_parallel: bool,
    /// Tokens per micro-batch of one replica (B·T/dp) and micro-batches per step: what the
    /// formulas need.
    pub tokens: usize,
    pub grad_accum: usize,
    /// The run as chapter 1 reports it, with the parameters gathered into chapter 1's layout.
    pub report: TrainReport,
    pub ranks: Vec<TpRankReport>,
}

/// What forward saves on a rank: the blocks' activations at the shard's shape, the head's with
/// this rank's columns of the logits. With the stream split by tokens, what holds the stream
/// has S = B·T/n rows (`BlockActivations::with_stream_rows`), and so do ln_f's statistics.
struct TpActivations {
    embedded: Tensor, // [B, T, C]: the partial lookups, then (this rank's rows of) the embedding
    blocks: Vec<BlockActivations>,
    head: HeadActivations,
    proj: Tensor, // [B, T, C]
}

/// Gradient buckets of the data-parallel sum: chapter 2's default size.
const BUCKET_BYTES: usize = 1024 * 1024;

fn sync_gone() -> TrainError {
    TrainError::Comm(kernels::comm::CommError::Backend("the data-parallel sync was lost by an earlier failure".into()))
}

/// The full model gathered from the shards, for a checkpoint.
struct Gathered {
    params: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
    state: TrainerState,
}

/// One rank of a tensor-parallel group.
struct TpRank {
    cfg: TrainConfig,
    model: ModelConfig,
    /// Chapter 1's layout, and this rank's shard of it.
    full: ParamLayout,
    layout: ParamLayout,
    /// The tensor-parallel group (this rank's shard-mates), and the gradient sync of the
    /// data-parallel group (the ranks that hold the same shard in the other replicas). `None`
    /// only while backward's hook holds it.
    group: ThreadComm,
    sync: Option<GradSync>,
    tp: usize,
    dp: usize,
    /// This replica's index in the data-parallel group, and its rows of each micro-batch.
    replica: usize,
    rows: usize,
    /// How the residual stream lies on the group (split by tokens under --sequence-parallel).
    stream: Stream,
    fault: Option<Fault>,
    /// Check the block's replicated buffers at every hook (`PlacementCheck`).
    check_placements: bool,
    shape: BlockShape,
    vocab: VocabShard,
    params: Tensor,
    grads: Tensor,
    optimizer: Optimizer,
    acts: TpActivations,
    scratch: BackwardScratch,
    dataset: Arc<Dataset>,
    sampler: BatchSampler,
    run: RunShape,
    step: u64,
    t: usize,
    ledger: MemoryLedger,
    gathered: Option<Gathered>,
    sent_in_steps: u64,
}

/// The flags checked against each other and the model, once, before any rank starts.
pub fn check_tp(cfg: &TpConfig) -> Result<(), TpError> {
    let (tp, dp) = (cfg.tp, cfg.dp);
    if tp == 0 {
        return Err(TpError::ZeroRanks);
    }
    if dp == 0 {
        return Err(TpError::ZeroReplicas);
    }
    if tp.saturating_mul(dp) > MAX_THREAD_RANKS {
        return Err(TpError::TooManyRanks { tp, dp });
    }
    if !cfg.train.batch_size.is_multiple_of(dp) {
        return Err(TpError::BatchNotDivisible { batch: cfg.train.batch_size, dp });
    }
    if matches!(cfg.train.device, DeviceRequest::Cuda(_)) {
        return Err(TpError::GpuRanks);
    }
    // Chapter 1's range and path checks, once, before any rank starts (not once per rank).
    cfg.train.validate()?;
    let model = model_config(&cfg.train, Tokenizer::new(cfg.train.tokenizer).vocab_size())?;
    if !model.n_head.is_multiple_of(tp) {
        return Err(TpError::Heads { tp, n_head: model.n_head });
    }
    // Implied by the heads today (n_head divides C), said separately for a model whose MLP is not 4C.
    if !(4 * model.n_embd).is_multiple_of(tp) {
        return Err(TpError::Mlp { tp, hidden: 4 * model.n_embd });
    }
    if !model.padded_vocab_size().is_multiple_of(tp) {
        return Err(TpError::Vocab { tp, vp: model.padded_vocab_size() });
    }
    let (rows, t) = (cfg.train.batch_size / dp, check_config(&cfg.train, &model)?);
    if cfg.sequence_parallel && !(rows * t).is_multiple_of(tp) {
        return Err(TpError::TokensNotDivisible { tokens: rows * t, rows, t, tp });
    }
    Ok(())
}

impl TpRank {
    /// Rank `group.rank()` of the group, holding its part (`layout`) of chapter 1's model.
    fn new(
        cfg: &TpConfig,
        layout: ParamLayout,
        group: ThreadComm,
        dp_group: ThreadComm,
        dataset: Arc<Dataset>,
    ) -> Result<TpRank, TrainError> {
        let (train, tp, rank, replica) = (&cfg.train, cfg.tp, group.rank(), dp_group.rank());
        let tokenizer = Tokenizer::new(train.tokenizer);
        let model = model_config(train, tokenizer.vocab_size())?;
        let t = check_config(train, &model)?;
        dataset.check_seq_len(t)?;
        let (rows, device) = (train.batch_size / cfg.dp, Device::Cpu);
        let full = ParamLayout::new(&model);
        let run = run_shape(train, &model, t, &dataset);

        // ANCHOR: shard_init
        // The full model, as chapter 1 starts it (fresh, --init or --resume), then this rank's part.
        let ledger = MemoryLedger::new();
        let buffer = |category| Tensor::zeros_on(&[layout.total], device, DType::F32, category, &ledger);
        let (mut params, grads) = (buffer(Category::Parameters)?, buffer(Category::Gradients)?);
        let mut optimizer = Optimizer::new(&layout, 0..layout.total, train.weight_decay, train.adam, device, &ledger)?;
        let mine = |whole: &[f32]| {
            let mut piece = vec![0.0f32; layout.total];
            full.take_shard(&layout, whole, rank, tp, &mut piece);
            piece
        };
        let StartState { params: whole, moments, step, sampler } = StartState::load(train, &run, &full)?;
        if let Some((m, v)) = &moments {
            optimizer.load_moments(&mine(m), &mine(v))?;
        }
        params.copy_from(&mine(&whole))?;
        // ANCHOR_END: shard_init

        let shape = BlockShape::shard(&model, tp);
        let vocab = VocabShard::new(&model, rank, tp);
        let stream = if cfg.sequence_parallel { Stream::SplitByTokens } else { Stream::Replicated };
        let stream_rows = stream.rows(rows * t, &group).len();
        let acts = TpActivations::new(&model, shape, vocab.rows.len(), rows, t, stream_rows, &ledger)?;
        let scratch = BackwardScratch::new(shape, rows, t, device, DType::F32, &ledger)?;
        let sync = GradSync::new(dp_group, &layout, BUCKET_BYTES, &ledger, Trace::disabled());
        Ok(TpRank {
            cfg: train.clone(),
            model,
            full,
            layout,
            group,
            sync: Some(sync),
            tp,
            dp: cfg.dp,
            replica,
            rows,
            stream,
            fault: cfg.fault,
            check_placements: false,
            shape,
            vocab,
            params,
            grads,
            optimizer,
            acts,
            scratch,
            dataset,
            sampler,
            run,
            step,
            t,
            ledger,
            gathered: None,
            sent_in_steps: 0,
        })
    }

    // ANCHOR: tp_forward
    /// tokens [B, T] -> the mean loss (with targets): chapter 1's three parts, each on its shard.
    fn forward(
        &mut self,
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<f32>, TrainError> {
        let Self { params, acts, group, layout, vocab, model, stream, .. } = self;
        let (c, stream) = (model.n_embd, *stream);
        let bt = b * t;
        let p = layout.views(params.view());
        let group: &mut dyn Communicator = group;
        let x = acts.embedded.prefix_mut(bt * c).cpu();
        embed_forward(group, stream, x, tokens, p.wte.cpu(), p.wpe.cpu(), vocab, t, c)?;
        let d = Dims { b, t, shape: self.shape };
        let mine = stream.rows(bt, group);
        let check = self.check_placements.then(PlacementCheck::default);
        let mut comm = TpBlockComm { group, stream, fault: self.fault, check };
        let x = acts.embedded.prefix(bt * c).slice(mine.start * c..mine.end * c);
        blocks_forward(&p.blocks, x, &mut acts.blocks, acts.proj.prefix_mut(bt * c), d, &mut comm)?;
        let last = acts.blocks.last().map_or(x, |b| b.out.prefix(mine.len() * c));
        Ok(head_forward(comm.group, stream, &p.head(), model, last, &mut acts.head, targets, vocab, bt)?)
    }

    /// Accumulates this rank's gradients of dloss · (sum of the token losses of the last forward).
    /// `on_ready` hears as each part's gradients become final (chapter 1's `GradsReady`).
    fn backward(
        &mut self,
        tokens: &[u32],
        targets: &[u32],
        dloss: f32,
        b: usize,
        on_ready: GradsReady<'_>,
    ) -> Result<(), TrainError> {
        let Self { params, grads, acts, scratch, group, layout, vocab, model, stream, .. } = self;
        let (t, c, stream) = (self.t, model.n_embd, *stream);
        let bt = b * t;
        let p = layout.views(params.view());
        let mut g = layout.views_mut(grads.view_mut());
        let group: &mut dyn Communicator = group;
        let mine = stream.rows(bt, group);
        let (s, mine) = (mine.len(), mine.start * c..mine.end * c);
        let x = acts.embedded.prefix(bt * c).slice(mine);
        let last = acts.blocks.last().map_or(x, |b| b.out.prefix(s * c));
        let head_grads =
            Head { ln_f_weight: g.ln_f_weight.reborrow(), ln_f_bias: g.ln_f_bias.reborrow(), wte: g.wte.reborrow() };
        let (d_ln, d_x) = (scratch.block.d_ln.prefix_mut(bt * c), scratch.d_res[0].prefix_mut(s * c));
        let head = &mut acts.head;
        head_backward(group, stream, &p.head(), head_grads, model, last, head, d_ln, d_x, targets, dloss, vocab, bt)?;
        on_ready(Part::Head, &[g.ln_f_weight.as_view(), g.ln_f_bias.as_view()]);
        let d = Dims { b, t, shape: self.shape };
        let check = self.check_placements.then(PlacementCheck::default);
        let mut comm = TpBlockComm { group, stream, fault: self.fault, check };
        let mut block_done = |l: usize, g: &BlockParams<ViewMut<'_>>| on_ready(Part::Block(l), &g.views());
        blocks_backward(&p.blocks, &mut g.blocks, x, &acts.blocks, scratch, d, &mut comm, &mut block_done)?;
        // dL/d(embedding), whole on every rank (gathered, when split by tokens: ScatterTokens'
        // backward), for the scatter-add into this rank's rows of wte and into wpe.
        let [d_mine, d_whole] = &mut scratch.d_res;
        let d_x = stream.gather_grad(comm.group, d_mine.prefix(s * c), d_whole.prefix_mut(bt * c))?;
        let (dwte, dwpe) = (g.wte.reborrow().cpu(), g.wpe.reborrow().cpu());
        embed_backward(dwte, dwpe, d_x.cpu(), tokens, vocab, t, c);
        on_ready(Part::Embeddings, &[g.wte.as_view(), g.wpe.as_view()]);
        Ok(())
    }
    // ANCHOR_END: tp_forward

    // ANCHOR: grad_norm
    /// This rank's part of the squared global gradient norm: its pieces of the split tensors,
    /// and, on rank 0 only, the replicated ones (every rank holds the same copy: counted once).
    fn squared_norm_part(&self) -> Result<f64, TrainError> {
        let rank = self.group.rank();
        let mut ranges: Vec<Range<usize>> = Vec::new();
        for spec in self.layout.specs.iter().filter(|s| s.placement != Placement::Replicated || rank == 0) {
            match ranges.last_mut() {
                Some(last) if last.end == spec.offset => last.end = spec.range().end,
                _ => ranges.push(spec.range()),
            }
        }
        let mut sum = 0.0;
        for range in ranges {
            sum += squared_norm(self.grads.view(), range)?;
        }
        Ok(sum)
    }
    // ANCHOR_END: grad_norm

    // ANCHOR: token_split_grads
    /// Under sequence parallelism, the replicated tensors whose gradient is a sum over the
    /// stream's rows (each rank's LayerNorms saw only its tokens): all-reduced over the group,
    /// packed into one buffer. The other replicated tensors (the row-parallel biases, wpe) are
    /// fed the gathered gradient of every token, and are whole on every rank already.
    fn sum_token_split_grads(&mut self) -> Result<(), TrainError> {
        let specs: Vec<ParamSpec> = self.layout.specs.iter().filter(|s| sums_over_tokens(s)).cloned().collect();
        let grads = self.grads.as_mut_slice();
        let mut packed: Vec<f32> = specs.iter().flat_map(|s| grads[s.range()].to_vec()).collect();
        self.group.all_reduce(&mut packed, ReduceOp::Sum)?;
        let mut at = 0;
        for spec in &specs {
            grads[spec.range()].copy_from_slice(&packed[at..at + spec.numel()]);
            at += spec.numel();
        }
        Ok(())
    }
    // ANCHOR_END: token_split_grads

    /// Every rank's `piece` (a buffer in the shard's layout), put together in chapter 1's layout.
    fn gather(&mut self, piece: &[f32]) -> Result<Vec<f32>, TrainError> {
        let mut all = vec![0.0; self.tp * self.layout.total];
        self.group.all_gather(piece, &mut all)?;
        let mut whole = vec![0.0; self.full.total];
        for (rank, piece) in all.chunks_exact(self.layout.total).enumerate() {
            self.full.put_shard(&self.layout, piece, rank, self.tp, &mut whole);
        }
        Ok(whole)
    }

    // ANCHOR: generate
    /// Continues `prompt` by `cfg.tokens` tokens on the shards, as chapter 1's `generate` does on
    /// the whole model (the last `block_size` tokens rerun each time): each rank computes its
    /// heads and its columns of the logits; the last position's columns are all-gathered (rank
    /// order is vocabulary order), so every rank samples the same token with the same seed.
    fn generate(&mut self, prompt: &[u32], cfg: SampleConfig) -> Result<Vec<u32>, TrainError> {
        let (window, width, vocab) = (self.model.block_size, self.vocab.rows.len(), self.model.vocab_size);
        let (ledger, mut rng) = (MemoryLedger::new(), Rng::derive(cfg.seed, "sample"));
        let acts = TpActivations::new(&self.model, self.shape, width, 1, window, window, &ledger)?;
        let training_acts = std::mem::replace(&mut self.acts, acts);
        // A context of any length, so the stream is not split by tokens (as Megatron's inference).
        let training_stream = std::mem::replace(&mut self.stream, Stream::Replicated);
        let (mut tokens, mut logits) = (prompt.to_vec(), vec![0.0f32; width * self.tp]);
        for _ in 0..cfg.tokens {
            let context = tokens[tokens.len().saturating_sub(window)..].to_vec();
            let t = context.len();
            self.forward(&context, None, 1, t)?;
            let mine = self.acts.head.logits.view().slice((t - 1) * width..t * width).cpu();
            self.group.all_gather(mine, &mut logits)?;
            tokens.push(sample_next(&logits[..vocab], cfg.temperature, cfg.top_k, &mut rng));
        }
        self.acts = training_acts;
        self.stream = training_stream;
        Ok(tokens.split_off(prompt.len()))
    }
    // ANCHOR_END: generate

    fn gather_checkpoint(&mut self) -> Result<Gathered, TrainError> {
        let params = self.gather(&self.params.to_vec()?)?;
        let adam_m = self.gather(&self.optimizer.adam_m.to_vec()?)?;
        let adam_v = self.gather(&self.optimizer.adam_v.to_vec()?)?;
        let state = TrainerState { step: self.step, sampler: self.sampler.clone(), run: self.run.clone() };
        Ok(Gathered { params, adam_m, adam_v, state })
    }

    fn tokens_per_step(&self) -> usize {
        self.cfg.batch_size * self.t * self.cfg.grad_accum
    }
}

// ANCHOR: sums_over_tokens
/// Whether a replicated tensor's gradient is a sum over the stream's rows: the LayerNorms
/// (ln_1 and ln_2 of every block, ln_f), which normalise the stream where it lies.
pub fn sums_over_tokens(spec: &ParamSpec) -> bool {
    spec.placement == Placement::Replicated && spec.name.contains("ln_")
}
// ANCHOR_END: sums_over_tokens

impl TpActivations {
    fn new(
        model: &ModelConfig,
        shape: BlockShape,
        vocab_rows: usize,
        b: usize,
        t: usize,
        stream_rows: usize,
        ledger: &MemoryLedger,
    ) -> Result<TpActivations, TensorError> {
        let (bt, c, s) = (b * t, model.n_embd, stream_rows);
        let t_ = |shape: &[usize], category| Tensor::zeros_on(shape, Device::Cpu, DType::F32, category, ledger);
        let act = |shape: &[usize]| t_(shape, Category::Activations);
        let blocks = (0..model.n_layer)
            .map(|_| BlockActivations::with_stream_rows(shape, b, t, s, Device::Cpu, DType::F32, ledger))
            .collect::<Result<_, _>>()?;
        let head = HeadActivations {
            ln_f: act(&[bt, c])?,
            ln_f_mean: act(&[s])?,
            ln_f_rstd: act(&[s])?,
            logits: act(&[bt, vocab_rows])?,
            losses: act(&[bt])?,
        };
        Ok(TpActivations { embedded: act(&[bt, c])?, blocks, head, proj: t_(&[bt, c], Category::Other)? })
    }
}

impl TrainSteps for TpRank {
    // ANCHOR: tp_step
    fn step(&mut self) -> Result<StepRecord, TrainError> {
        let (started, sent_before) = (Instant::now(), self.group.stats().total_sent());
        self.grads.fill(0.0);
        let (b, t, rows, accum) = (self.cfg.batch_size, self.t, self.rows, self.cfg.grad_accum);
        let dloss = 1.0 / self.tokens_per_step() as f32; // 1/(global tokens), on every rank
        let mut sync = self.sync.take().ok_or_else(sync_gone)?;
        let mut loss_sum = 0.0f64;
        for micro in 0..accum {
            // The ranks of a tensor-parallel group compute the same rows (one model between
            // them); each data-parallel replica computes its share of the batch (chapter 2).
            let batch = self.sampler.next_batch(&self.dataset.train, b, t);
            let mine = self.replica * rows * t..(self.replica + 1) * rows * t;
            let (inputs, targets) = (&batch.inputs[mine.clone()], &batch.targets[mine]);
            loss_sum += self.forward(inputs, Some(targets), rows, t)?.unwrap_or(f32::NAN) as f64;
            let last = micro + 1 == accum; // only the last backward sends (DDP's no_sync)
            sync.begin();
            let mut on_ready = |part: Part, grads: &[View<'_>]| {
                if last {
                    sync.on_ready(part, grads)
                }
            };
            self.backward(inputs, targets, dloss, rows, &mut on_ready)?;
        }
        // The replicas' gradients summed (nothing to do with one replica), the losses averaged.
        sync.finish(self.grads.as_mut_slice())?;
        if self.stream == Stream::SplitByTokens && self.fault != Some(Fault::SkipLayerNormGradSum) {
            self.sum_token_split_grads()?;
        }
        let loss = (loss_sum / accum as f64) as f32;
        let loss = if self.dp == 1 { loss } else { sync.reduce_scalars(vec![loss], ReduceOp::Avg)?[0] };
        self.sync = Some(sync);
        let part = self.squared_norm_part()?;
        let grad_norm = sum_f64_over_group(&mut self.group, part)?.sqrt() as f32;
        // As chapter 1's take_step: a non-finite step updates nothing.
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(TrainError::NonFiniteLoss { step: self.step + 1, loss, grad_norm, last_checkpoint: None });
        }
        let cfg = &self.cfg;
        let lr = learning_rate(cfg.lr_schedule, cfg.lr, self.step, cfg.steps, cfg.warmup_steps);
        let scale = clip_scale(grad_norm, cfg.grad_clip);
        self.optimizer.update(&mut self.params, None, &self.grads, lr, scale, self.step + 1);
        self.step += 1;
        self.sent_in_steps += self.group.stats().total_sent() - sent_before;
        if saves_after(&self.cfg, self.step) {
            // Saving is collective: every rank sends its shard, rank 0 writes the whole.
            self.gathered = Some(self.gather_checkpoint()?);
        }
        let tokens_per_sec = self.tokens_per_step() as f64 / started.elapsed().as_secs_f64();
        Ok(StepRecord { step: self.step, loss, lr, grad_norm, tokens_per_sec, val_loss: None })
    }
    // ANCHOR_END: tp_step

    /// Chapter 1's validation protocol, computed by each tensor-parallel group; with replicas,
    /// chapter 2's: the batches of B/dp rows split among them, and their sums added.
    fn evaluate(&mut self) -> Result<f32, TrainError> {
        let (rows, t, dp) = (self.rows, self.t, self.dp as u64);
        let batches = self.cfg.val_batches as u64 * dp;
        let mut total = 0.0f64;
        for k in (self.replica as u64..batches).step_by(dp as usize) {
            let batch = sequential_batch(&self.dataset.val, k, rows, t);
            total += self.forward(&batch.inputs, Some(&batch.targets), rows, t)?.unwrap_or(f32::NAN) as f64;
        }
        if dp == 1 {
            return Ok((total / batches as f64) as f32);
        }
        let sync = self.sync.as_mut().ok_or_else(sync_gone)?;
        Ok(sync.reduce_scalars(vec![total as f32], ReduceOp::Sum)?[0] / batches as f32)
    }

    fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let Some(g) = &self.gathered else { return Err(TrainError::PartialOptimizer) };
        let contents = CheckpointContents {
            cfg: &self.model,
            layout: &self.full,
            params: &g.params,
            optimizer: Some((&g.adam_m, &g.adam_v, &g.state)),
        };
        Ok(checkpoint::save(dir, &contents)?)
    }

    fn steps_done(&self) -> u64 {
        self.step
    }

    fn ranks(&self) -> usize {
        self.tp * self.dp
    }
}

/// The text sample the config asks for, generated by the group (every rank calls it), and the
/// time per generated token.
fn sample(me: &mut TpRank) -> Result<Option<(String, f64)>, TrainError> {
    let cfg = &me.cfg;
    if cfg.sample_tokens == 0 {
        return Ok(None);
    }
    let sample_cfg =
        SampleConfig { tokens: cfg.sample_tokens, temperature: cfg.temperature, top_k: cfg.top_k, seed: cfg.seed };
    let (tokenizer, prompt) = (Tokenizer::new(cfg.tokenizer), cfg.prompt.clone());
    let started = Instant::now();
    let out = me.generate(&tokenizer.encode(&prompt), sample_cfg)?;
    let ms_per_token = 1e3 * started.elapsed().as_secs_f64() / out.len().max(1) as f64;
    Ok(Some((prompt + &tokenizer.decode(&out), ms_per_token)))
}

/// Rank 0's report of the run, from the gathered parameters.
fn report(
    me: &TpRank,
    outcome: LoopOutcome,
    params: Vec<f32>,
    sample: Option<String>,
) -> Result<TrainReport, TrainError> {
    let (cfg, model) = (&me.cfg, &me.model);
    let tokens = (outcome.steps.len() * me.tokens_per_step()) as f64;
    // Called in the rank's own pool (`threads_per_rank`): rayon's threads are this rank's.
    let threads = match rayon::current_num_threads() {
        1 => "1 compute thread".to_string(),
        n => format!("{n} compute threads"),
    };
    Ok(TrainReport {
        model: model.clone(),
        tokenizer: cfg.tokenizer,
        device: format!("cpu, {} x {} (tp x dp) thread ranks, {threads} each", me.tp, me.dp),
        dtype: DType::F32,
        flops_per_token: model.flops_per_token(me.t),
        peak_flops: Device::Cpu.peak_flops(DType::F32),
        n_params: me.full.total - (model.padded_vocab_size() - model.vocab_size) * model.n_embd,
        tokens_per_sec: if outcome.train_seconds > 0.0 { tokens / outcome.train_seconds } else { 0.0 },
        steps: outcome.steps,
        val_losses: outcome.val_losses,
        memory: me.ledger.report(),
        sample,
        layout: me.full.clone(),
        params,
    })
}

// ANCHOR: run_rank
/// One rank of the dp x tp grid. Ranks are numbered by `Grid` with tensor parallelism innermost,
/// rank = tp_rank + tp · dp_rank, so that a tensor-parallel group is neighbours (one node's
/// fast links, on a cluster).
fn run_rank(
    cfg: &TpConfig,
    check_placements: bool,
    mut world: ThreadComm,
    dataset: Arc<Dataset>,
) -> Result<(Option<TrainReport>, TpRankReport), TpError> {
    let (rank, tp, dp) = (world.rank(), cfg.tp, cfg.dp);
    let grid = Grid::new(dp, tp, 1);
    let Coords { tp: tp_rank, dp: dp_rank, .. } = grid.coords(rank);
    let shard_mates = grid.group(GroupKind::Tensor, rank);
    let replicas = grid.group(GroupKind::Data, rank);
    let split = |world: &mut ThreadComm, ranks: &[usize]| world.split_group(ranks).map_err(TrainError::Comm);
    let (group, dp_group) = (split(&mut world, &shard_mates)?, split(&mut world, &replicas)?);
    let model = model_config(&cfg.train, Tokenizer::new(cfg.train.tokenizer).vocab_size())?;
    let layout = ParamLayout::new(&model).shard(tp)?;
    let mut me = TpRank::new(cfg, layout, group, dp_group, dataset)?;
    me.check_placements = check_placements;
    let (m, s) = (&me.model, me.shape);
    let replicas = match dp {
        1 => String::new(),
        _ => format!(" | data parallel: {dp} replicas of {} rows", me.rows),
    };
    let sequence = match me.stream {
        Stream::SplitByTokens => format!(", the stream of {} of the {} tokens", me.rows * me.t / tp, me.rows * me.t),
        Stream::Replicated => String::new(),
    };
    let header = format!(
        "model: {} layers, {} heads, {} dims | tensor parallel: {} ranks, each {} heads, {} MLP units, {} vocabulary rows{sequence}{replicas}",
        m.n_layer,
        m.n_head,
        m.n_embd,
        cfg.tp,
        s.n_head,
        s.mlp_hidden,
        me.vocab.rows.len(),
    );
    let outcome = drive(&cfg.train, &mut me, rank == 0, &header)?;
    let params = me.gather(&me.params.to_vec().map_err(TrainError::from)?)?;
    let sample = sample(&mut me)?;
    let sample_ms_per_token = sample.as_ref().map(|s| s.1);
    let leader = if rank == 0 { Some(report(&me, outcome, params, sample.map(|s| s.0))?) } else { None };
    let comm = me.group.stats();
    let dp_comm = me.sync.as_mut().ok_or_else(sync_gone)?.stop()?;
    let memory = me.ledger.report();
    let sent_in_steps = me.sent_in_steps;
    Ok((leader, TpRankReport { rank, tp_rank, dp_rank, memory, comm, dp_comm, sent_in_steps, sample_ms_per_token }))
}
// ANCHOR_END: run_rank

// ANCHOR: threads_per_rank
/// The compute threads each rank's ops may use: the machine's share (rayon's global pool, one
/// thread per core unless RAYON_NUM_THREADS says otherwise) divided among the ranks, at least
/// one. Every rank in the global pool would split each matmul as though it had every core to
/// itself: twice the threads of the cores at 2 ranks, fighting over the caches and the
/// scheduler. A rank runs in its own pool of this many threads instead.
pub fn threads_per_rank(ranks: usize) -> usize {
    (rayon::current_num_threads() / ranks.max(1)).max(1)
}
// ANCHOR_END: threads_per_rank

// ANCHOR: train
/// Trains with `tp` tensor-parallel thread ranks; reports what rank 0 saw (parameters gathered
/// into chapter 1's layout) and what every rank held and sent.
pub fn train(cfg: &TpConfig) -> Result<TpReport, TpError> {
    train_checking_placements(cfg, PlacementCheck::enabled_by_env())
}

/// [`train`], with the run-time placement check of chapter 1's block on or off
/// ([`PlacementCheck`]; `train` turns it on with `SFS_CHECK_PLACEMENTS=1`).
pub fn train_checking_placements(cfg: &TpConfig, check_placements: bool) -> Result<TpReport, TpError> {
    check_tp(cfg)?;
    let dataset = Arc::new(load_dataset(&cfg.train.data, &Tokenizer::new(cfg.train.tokenizer))?);
    // Each rank owns what it uses (the launcher's ranks are `'static` threads).
    let rank_cfg = cfg.clone();
    let threads = threads_per_rank(cfg.tp * cfg.dp);
    let results = launch(cfg.tp * cfg.dp, move |comm| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        pool.install(|| run_rank(&rank_cfg, check_placements, comm, dataset.clone()))
    })?;
    let mut ranks = Vec::with_capacity(cfg.tp);
    let mut leader = None;
    for (report, rank) in results {
        leader = leader.or(report);
        ranks.push(rank);
    }
    let report = leader.ok_or(TpError::NoReport)?;
    let tokens = cfg.train.batch_size / cfg.dp * cfg.train.seq_len.unwrap_or(report.model.block_size);
    let sequence_parallel = cfg.sequence_parallel;
    Ok(TpReport { tp: cfg.tp, dp: cfg.dp, sequence_parallel, tokens, grad_accum: cfg.train.grad_accum, report, ranks })
}
// ANCHOR_END: train
