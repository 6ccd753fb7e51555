//! A pipeline stage split across a tensor-parallel group: chapter 4's `StageParts` written with
//! chapter 3's pieces. The stage's blocks run at the shard's widths with chapter 3's hook at
//! Megatron's two points per branch; the first stage embeds over its vocabulary shard, the last
//! computes its columns of the logits and the cross-entropy over the group. Nothing here is new
//! arithmetic: it is where chapter 3's functions plug into chapter 4's interpreter.

use ch01_single_gpu::TrainError;
use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::model::{BlockComm, BlockShape, Head, HeadActivations};
use ch01_single_gpu::params::{ParamLayout, ParamSpec, Placement};
use ch03_tensor_parallel::tp_comm::{Fault, Stream, TpBlockComm, sum_f64_over_group};
use ch03_tensor_parallel::vocab_parallel::{self, VocabShard};
use ch04_pipeline::parts::StageParts;
use kernels::comm::{CommError, CommStats, Communicator};
use kernels::{View, ViewMut};

// ANCHOR: tp_parts
/// This rank's share of a stage: rank `group.rank()` of the stage's tensor-parallel group.
pub struct TpParts {
    group: Box<dyn Communicator>,
    vocab: VocabShard,
    shape: BlockShape,
    fault: Option<Fault>,
}

impl TpParts {
    pub fn new(model: &ModelConfig, group: Box<dyn Communicator>, fault: Option<Fault>) -> TpParts {
        let (rank, n) = (group.rank(), group.world_size());
        TpParts { vocab: VocabShard::new(model, rank, n), shape: BlockShape::shard(model, n), group, fault }
    }

    /// Chapter 3's hook over this stage's group.
    fn hook(&mut self) -> TpBlockComm<'_> {
        TpBlockComm { group: &mut *self.group, stream: Stream::Replicated, fault: self.fault, check: None }
    }
}

impl StageParts for TpParts {
    fn shape(&self, _model: &ModelConfig) -> BlockShape {
        self.shape
    }

    /// Chapter 3's shard of chapter 1's layout: the stage's tensors are cut from it by name.
    fn layout(&self, full: &ParamLayout) -> Result<ParamLayout, TrainError> {
        // The flags were checked against the model before any rank started: this does not fail.
        let n = self.group.world_size();
        full.shard(n).map_err(|e| TrainError::OutOfRange {
            flag: "--tp",
            expected: "a divisor of every split tensor",
            value: e.to_string(),
        })
    }

    fn take(&self, full: &ParamLayout, layout: &ParamLayout, whole: &[f32]) -> Vec<f32> {
        let mut piece = vec![0.0; layout.total];
        full.take_shard(layout, whole, self.group.rank(), self.group.world_size(), &mut piece);
        piece
    }

    fn logit_columns(&self, _model: &ModelConfig) -> usize {
        self.vocab.rows.len()
    }

    fn embed_forward(
        &mut self,
        x: ViewMut<'_>,
        tokens: &[u32],
        wte: View<'_>,
        wpe: View<'_>,
        t: usize,
        c: usize,
    ) -> Result<(), CommError> {
        vocab_parallel::embed_forward(
            &mut *self.group,
            Stream::Replicated,
            x.cpu(),
            tokens,
            wte.cpu(),
            wpe.cpu(),
            &self.vocab,
            t,
            c,
        )
    }

    fn embed_backward(
        &mut self,
        dwte: ViewMut<'_>,
        dwpe: ViewMut<'_>,
        d_x: View<'_>,
        tokens: &[u32],
        t: usize,
        c: usize,
    ) {
        vocab_parallel::embed_backward(dwte.cpu(), dwpe.cpu(), d_x.cpu(), tokens, &self.vocab, t, c);
    }

    fn head_forward(
        &mut self,
        head: &Head<View<'_>>,
        model: &ModelConfig,
        x: View<'_>,
        acts: &mut HeadActivations,
        targets: Option<&[u32]>,
        bt: usize,
    ) -> Result<Option<f32>, TrainError> {
        Ok(vocab_parallel::head_forward(
            &mut *self.group,
            Stream::Replicated,
            head,
            model,
            x,
            acts,
            targets,
            &self.vocab,
            bt,
        )?)
    }

    fn head_backward(
        &mut self,
        head: &Head<View<'_>>,
        grads: Head<ViewMut<'_>>,
        model: &ModelConfig,
        x: View<'_>,
        acts: &mut HeadActivations,
        d_ln: ViewMut<'_>,
        d_x: ViewMut<'_>,
        targets: &[u32],
        dloss: f32,
        bt: usize,
    ) -> Result<(), TrainError> {
        let group = &mut *self.group;
        Ok(vocab_parallel::head_backward(
            group,
            Stream::Replicated,
            head,
            grads,
            model,
            x,
            acts,
            d_ln,
            d_x,
            targets,
            dloss,
            &self.vocab,
            bt,
        )?)
    }

    fn block_comm(&mut self) -> &mut dyn BlockComm {
        self
    }

    /// The split tensors' pieces on every rank; a replicated tensor (the same copy on every
    /// rank of the group) on rank 0 only, as chapter 3 counts it.
    fn counts_in_norm(&self, spec: &ParamSpec) -> bool {
        // EXERCISE(ch05-norm-counts, points = 5): whether this tensor rank counts `spec` in the squared norm: its piece of a split tensor always, a replicated tensor (every rank holds the same copy) on one rank of the group only
        // TESTS: -p ch05-3d-hybrid --lib -- tp_stage::tests::every_parameter_is_counted_once_across_the_tensor_group
        spec.placement != Placement::Replicated || self.group.rank() == 0
        // WRONG(every rank counts its copy: the replicated tensors' share of the norm n times over): `spec.placement != Placement::Replicated || self.group.rank() == 0` -> `true`
        // WRONG(rank 0 alone counts, and the other ranks' pieces of the split tensors are lost): `spec.placement != Placement::Replicated || self.group.rank() == 0` -> `self.group.rank() == 0`
        // END EXERCISE
    }

    fn sum_norm(&mut self, squared: f64) -> Result<f64, TrainError> {
        Ok(sum_f64_over_group(&mut *self.group, squared)?)
    }

    fn ranks(&self) -> usize {
        self.group.world_size()
    }

    fn stats(&self) -> CommStats {
        self.group.stats()
    }
}

/// The blocks call chapter 3's hook, over this stage's group.
impl BlockComm for TpParts {
    fn sum_branch_output(&mut self, partial: ViewMut<'_>) -> Result<(), CommError> {
        self.hook().sum_branch_output(partial)
    }

    fn sum_branch_input_grad(&mut self, partial: ViewMut<'_>) -> Result<(), CommError> {
        self.hook().sum_branch_input_grad(partial)
    }

    fn adds_output_bias(&self) -> bool {
        self.group.rank() == 0 // as chapter 3's hook: the row-parallel biases are added once
    }
}
// ANCHOR_END: tp_parts

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::comm::thread::launch;

    #[test]
    fn every_parameter_is_counted_once_across_the_tensor_group() {
        // A tensor split n ways has n pieces, one per rank, each to be counted; a replicated one
        // has n identical copies, one to be counted.
        let model = ModelConfig { n_layer: 2, n_head: 4, n_embd: 16, block_size: 8, vocab_size: 200 };
        for n in [1, 2, 4] {
            let cfg = model.clone();
            let counted = launch(n, move |comm| {
                let parts = TpParts::new(&cfg, Box::new(comm), None);
                let full = ParamLayout::new(&cfg);
                let shard = parts.layout(&full)?;
                Ok::<_, TrainError>(shard.specs.iter().map(|spec| parts.counts_in_norm(spec)).collect::<Vec<_>>())
            })
            .unwrap();
            let specs = ParamLayout::new(&model).specs;
            for (i, spec) in specs.iter().enumerate() {
                let ranks = counted.iter().filter(|c| c[i]).count();
                let expected = if spec.placement == Placement::Replicated { 1 } else { n };
                assert_eq!(ranks, expected, "{} ({:?}) counted by {ranks} of {n} ranks", spec.name, spec.placement);
            }
        }
    }
}
