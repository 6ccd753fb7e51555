//! How a stage computes chapter 1's parts. In this chapter a stage holds the whole width of its
//! blocks and calls chapter 1's functions ([`Whole`]); chapter 5 runs the same interpreter with
//! each stage split across a tensor-parallel group, by implementing this trait with chapter 3's
//! pieces. The interpreter never asks which.

use ch01_single_gpu::TrainError;
use ch01_single_gpu::backward_split::{head_backward_input, head_backward_weights};
use ch01_single_gpu::config::ModelConfig;
use ch01_single_gpu::model::{
    BlockComm, BlockShape, Head, HeadActivations, Whole, embed_backward, embed_forward, head_backward, head_forward,
};
use ch01_single_gpu::params::{ParamLayout, ParamSpec};
use kernels::comm::{CommError, CommStats};
use kernels::{View, ViewMut};

// ANCHOR: stage_parts
/// A stage's way of running the embedding, the blocks' communication and the head.
pub trait StageParts: Send {
    /// A block's widths here.
    fn shape(&self, model: &ModelConfig) -> BlockShape;
    /// The layout a stage's tensors are cut from by name (chapter 1's, or a shard of it)...
    fn layout(&self, full: &ParamLayout) -> Result<ParamLayout, TrainError>;
    /// ...and that layout's buffer, from chapter 1's `whole`.
    fn take(&self, full: &ParamLayout, layout: &ParamLayout, whole: &[f32]) -> Vec<f32>;
    /// Columns of the logits computed here.
    fn logit_columns(&self, model: &ModelConfig) -> usize;
    /// tokens [B, T] -> x [B, T, C].
    #[allow(clippy::too_many_arguments)]
    fn embed_forward(
        &mut self,
        x: ViewMut<'_>,
        tokens: &[u32],
        wte: View<'_>,
        wpe: View<'_>,
        t: usize,
        c: usize,
    ) -> Result<(), CommError>;
    #[allow(clippy::too_many_arguments)]
    fn embed_backward(
        &mut self,
        dwte: ViewMut<'_>,
        dwpe: ViewMut<'_>,
        d_x: View<'_>,
        tokens: &[u32],
        t: usize,
        c: usize,
    );
    /// x [BT, C] -> the mean loss (with targets), as chapter 1's `head_forward`.
    #[allow(clippy::too_many_arguments)]
    fn head_forward(
        &mut self,
        head: &Head<View<'_>>,
        model: &ModelConfig,
        x: View<'_>,
        acts: &mut HeadActivations,
        targets: Option<&[u32]>,
        bt: usize,
    ) -> Result<Option<f32>, TrainError>;
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<(), TrainError>;
    /// zb-h1's B of the head: its backward less the output projection's weight gradient, which
    /// [`StageParts::head_backward_weights`] adds at W (`ch01_single_gpu::backward_split`). A
    /// stage whose head cannot split says so (chapter 5 refuses zb-h1 before it starts).
    #[allow(clippy::too_many_arguments)]
    fn head_backward_input(
        &mut self,
        _head: &Head<View<'_>>,
        _grads: (ViewMut<'_>, ViewMut<'_>),
        _model: &ModelConfig,
        _x: View<'_>,
        _acts: &mut HeadActivations,
        _d_ln: ViewMut<'_>,
        _d_x: ViewMut<'_>,
        _targets: &[u32],
        _dloss: f32,
        _bt: usize,
    ) -> Result<(), TrainError> {
        Err(cannot_split())
    }
    fn head_backward_weights(
        &mut self,
        _dwte: ViewMut<'_>,
        _model: &ModelConfig,
        _acts: &HeadActivations,
        _bt: usize,
    ) -> Result<(), TrainError> {
        Err(cannot_split())
    }
    /// The hook the blocks call at Megatron's two points per branch.
    fn block_comm(&mut self) -> &mut dyn BlockComm;
    /// Whether this rank counts `spec`'s gradient in the global norm (a tensor every rank of a
    /// group holds the same copy of is counted by one of them).
    fn counts_in_norm(&self, spec: &ParamSpec) -> bool;
    /// This rank's squared norm -> its group's (the identity with no group).
    fn sum_norm(&mut self, squared: f64) -> Result<f64, TrainError>;
    /// Ranks that compute one stage between them.
    fn ranks(&self) -> usize;
    /// What this rank sent and received inside its stage (nothing, without a group).
    fn stats(&self) -> CommStats {
        CommStats::default()
    }
}
// ANCHOR_END: stage_parts

fn cannot_split() -> TrainError {
    TrainError::OutOfRange {
        flag: "--schedule",
        expected: "a schedule whose head backward this stage can split into B and W",
        value: "zb-h1".into(),
    }
}

/// Chapter 4's stage: the whole width, chapter 1's functions, no communication inside a stage.
impl StageParts for Whole {
    fn shape(&self, model: &ModelConfig) -> BlockShape {
        BlockShape::whole(model)
    }

    fn layout(&self, full: &ParamLayout) -> Result<ParamLayout, TrainError> {
        Ok(full.clone())
    }

    fn take(&self, _full: &ParamLayout, _layout: &ParamLayout, whole: &[f32]) -> Vec<f32> {
        whole.to_vec()
    }

    fn logit_columns(&self, model: &ModelConfig) -> usize {
        model.padded_vocab_size()
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
        embed_forward(x, tokens, wte, wpe, t, c);
        Ok(())
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
        embed_backward(dwte, dwpe, d_x, tokens, t, c);
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
        Ok(head_forward(head, model, x, acts, targets, bt)?)
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
        head_backward(head, grads, model, x, acts, d_ln, d_x, targets, dloss, bt);
        Ok(())
    }

    fn head_backward_input(
        &mut self,
        head: &Head<View<'_>>,
        (d_ln_f_weight, d_ln_f_bias): (ViewMut<'_>, ViewMut<'_>),
        model: &ModelConfig,
        x: View<'_>,
        acts: &mut HeadActivations,
        d_ln: ViewMut<'_>,
        d_x: ViewMut<'_>,
        targets: &[u32],
        dloss: f32,
        bt: usize,
    ) -> Result<(), TrainError> {
        head_backward_input(head, d_ln_f_weight, d_ln_f_bias, model, x, acts, d_ln, d_x, targets, dloss, bt);
        Ok(())
    }

    fn head_backward_weights(
        &mut self,
        dwte: ViewMut<'_>,
        model: &ModelConfig,
        acts: &HeadActivations,
        bt: usize,
    ) -> Result<(), TrainError> {
        head_backward_weights(dwte, model, acts, bt);
        Ok(())
    }

    fn block_comm(&mut self) -> &mut dyn BlockComm {
        self
    }

    fn counts_in_norm(&self, _spec: &ParamSpec) -> bool {
        true
    }

    fn sum_norm(&mut self, squared: f64) -> Result<f64, TrainError> {
        Ok(squared)
    }

    fn ranks(&self) -> usize {
        1
    }
}
