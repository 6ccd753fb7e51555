//! The tensor-parallel group's communication: Megatron's conjugate pair of operations, the
//! `BlockComm` that puts them at the block's four points, and two small reductions the rest of
//! the rank needs (a row-wise max, and an exact sum of an f64).
//!
//! The pair, for a buffer that every rank of the group holds:
//!
//! | op               | forward              | backward             |
//! |------------------|----------------------|----------------------|
//! | [`CopyToShards`] | identity (a copy)    | all-reduce (sum)     |
//! | [`SumFromShards`]| all-reduce (sum)     | identity             |
//!
//! Each is the other's transpose: copying x to n ranks is the linear map x -> (x, ..., x), whose
//! transpose is (y_1, ..., y_n) -> y_1 + ... + y_n. A branch's input goes through the copy (every
//! rank's columns read the same input), its output through the sum.
//!
//! With sequence parallelism the residual stream is split by tokens (rank r holds rows
//! [r·BT/n, (r+1)·BT/n) of the B·T), and the pair becomes the two halves of an all-reduce:
//!
//! | op                   | forward              | backward             |
//! |----------------------|----------------------|----------------------|
//! | [`GatherTokens`]     | all-gather           | reduce-scatter       |
//! | [`ScatterTokens`]    | reduce-scatter       | all-gather           |
//!
//! [`Stream`] says which pair a run uses.

use ch01_single_gpu::model::BlockComm;
use kernels::comm::ring::chunk;
use kernels::comm::{CommError, Communicator, ReduceOp};
use kernels::{View, ViewMut};
use std::ops::Range;

// ANCHOR: conjugate_pair
/// The input of a column-parallel layer: every rank uses all of it. Forward copies (nothing to
/// do: it is already on every rank); backward sums the ranks' partial gradients, since each
/// rank's columns contributed a share of dL/dx.
pub struct CopyToShards;

impl CopyToShards {
    /// x -> x on every rank.
    pub fn forward(_x: &mut [f32]) {}

    /// dL/dx (partial on each rank) -> the sum over the group, on every rank.
    pub fn backward(group: &mut dyn Communicator, grad: &mut [f32]) -> Result<(), CommError> {
        // EXERCISE(ch03-copy-backward, points = 5): the transpose of x -> (x, ..., x): every rank's partial gradient summed over the group, in place, on every rank
        // TESTS: -p ch03-tensor-parallel --lib -- tp_comm::tests::copy_backward_is_the_transpose_of_its_forward
        // NEEDS: ch02-ring-reduce-scatter ch02-ring-all-gather
        group.all_reduce(grad, ReduceOp::Sum)
        // WRONG(the identity, as forward is): `group.all_reduce(grad, ReduceOp::Sum)` -> `Ok(())`
        // WRONG(the mean of the partials, not their sum): `ReduceOp::Sum` -> `ReduceOp::Avg`
        // END EXERCISE
    }
}

/// The output of a row-parallel layer: each rank holds a partial sum of it. Forward sums over
/// the group; backward is the identity, since every rank's partial contributed to the sum with
/// weight 1 and so receives all of dL/d(sum).
pub struct SumFromShards;

impl SumFromShards {
    /// partial -> the sum over the group, on every rank.
    pub fn forward(group: &mut dyn Communicator, partial: &mut [f32]) -> Result<(), CommError> {
        // EXERCISE(ch03-sum-forward, points = 5): the ranks' partial sums added over the group, in place, so that every rank holds the whole sum
        // TESTS: -p ch03-tensor-parallel --lib -- tp_comm::tests::sum_backward_is_the_transpose_of_its_forward
        // NEEDS: ch02-ring-reduce-scatter ch02-ring-all-gather
        group.all_reduce(partial, ReduceOp::Sum)
        // WRONG(leaves each rank its partial): `group.all_reduce(partial, ReduceOp::Sum)` -> `Ok(())`
        // WRONG(the mean of the partials, not their sum): `ReduceOp::Sum` -> `ReduceOp::Avg`
        // END EXERCISE
    }

    /// dL/d(sum) -> dL/d(partial): the same on every rank.
    pub fn backward(_grad: &mut [f32]) {}
}
// ANCHOR_END: conjugate_pair

// ANCHOR: sequence_pair
/// This rank's rows of a [B·T, C] buffer split by tokens: chunk r of n, as the ring cuts it
/// (whole rows when n divides B·T, which `--sequence-parallel` checks).
fn own_rows(group: &dyn Communicator, len: usize) -> Range<usize> {
    chunk(len, group.world_size(), group.rank())
}

/// The input of a column-parallel layer under sequence parallelism: each rank holds its tokens'
/// rows of the buffer, and the layer needs all of them. Forward all-gathers; backward
/// reduce-scatters, since every rank's columns contributed to the gradient of every row, and
/// each rank keeps the sum for its own rows.
pub struct GatherTokens;

impl GatherTokens {
    /// buf [B·T, C]: this rank's rows -> every rank's rows, in place.
    pub fn forward(group: &mut dyn Communicator, buf: &mut [f32]) -> Result<(), CommError> {
        let mine = buf[own_rows(group, buf.len())].to_vec();
        group.all_gather(&mine, buf)
    }

    /// grad [B·T, C]: this rank's partial gradient of every row -> the sum over the group, in
    /// this rank's rows (the other rows are left as they were, and are not read again).
    pub fn backward(group: &mut dyn Communicator, grad: &mut [f32]) -> Result<(), CommError> {
        let own = own_rows(group, grad.len());
        let mut mine = vec![0.0; own.len()];
        group.reduce_scatter(grad, &mut mine, ReduceOp::Sum)?;
        grad[own].copy_from_slice(&mine);
        Ok(())
    }
}

/// The output of a row-parallel layer under sequence parallelism: a partial sum of every row on
/// each rank, of which each rank needs only its tokens' rows. Forward reduce-scatters; backward
/// all-gathers, since each row's sum sent its gradient to every rank's partial.
pub struct ScatterTokens;

impl ScatterTokens {
    /// partial [B·T, C] -> the sum over the group, in this rank's rows.
    pub fn forward(group: &mut dyn Communicator, partial: &mut [f32]) -> Result<(), CommError> {
        GatherTokens::backward(group, partial)
    }

    /// grad (this rank's rows) -> every rank's rows, in `whole` [B·T, C].
    pub fn backward(group: &mut dyn Communicator, grad: &[f32], whole: &mut [f32]) -> Result<(), CommError> {
        group.all_gather(grad, whole)
    }
}

/// How the residual stream (and each LayerNorm's input and output) lies on the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Every rank holds every token's row: tensor parallelism, the copy and the sum.
    Replicated,
    /// Rank r holds its 1/n of the tokens: sequence parallelism, the gather and the scatter.
    SplitByTokens,
}

impl Stream {
    /// The rows of the B·T tokens whose stream this rank holds.
    pub fn rows(self, bt: usize, group: &dyn Communicator) -> Range<usize> {
        match self {
            Stream::Replicated => 0..bt,
            Stream::SplitByTokens => own_rows(group, bt),
        }
    }

    /// Forward, into a column-parallel layer: `buf` [B·T, C], filled in this rank's stream rows,
    /// becomes whole on every rank.
    pub fn gather(self, group: &mut dyn Communicator, buf: &mut [f32]) -> Result<(), CommError> {
        match self {
            Stream::Replicated => {
                CopyToShards::forward(buf);
                Ok(())
            }
            Stream::SplitByTokens => GatherTokens::forward(group, buf),
        }
    }

    /// Forward, out of a row-parallel layer (`buf` a partial sum), and backward, out of a
    /// column-parallel one (`buf` a partial gradient): the sum over the group, in this rank's
    /// stream rows of `buf` [B·T, C].
    pub fn sum(self, group: &mut dyn Communicator, buf: &mut [f32], backward: bool) -> Result<(), CommError> {
        match (self, backward) {
            (Stream::Replicated, false) => SumFromShards::forward(group, buf),
            (Stream::Replicated, true) => CopyToShards::backward(group, buf),
            (Stream::SplitByTokens, false) => ScatterTokens::forward(group, buf),
            (Stream::SplitByTokens, true) => GatherTokens::backward(group, buf),
        }
    }

    /// Backward, into a row-parallel layer: dL/d(this rank's stream rows) of its output ->
    /// dL/d(the whole output) [B·T, C]: `grad` itself when replicated, gathered into `whole`
    /// when split.
    pub fn gather_grad<'a>(
        self,
        group: &mut dyn Communicator,
        grad: View<'a>,
        whole: ViewMut<'a>,
    ) -> Result<View<'a>, CommError> {
        match self {
            Stream::Replicated => Ok(grad), // SumFromShards::backward: the identity
            Stream::SplitByTokens => {
                let whole = whole.cpu();
                ScatterTokens::backward(group, grad.cpu(), whole)?;
                Ok(View::Cpu(whole))
            }
        }
    }
}
// ANCHOR_END: sequence_pair

/// A deliberate mistake, for the test that shows the equivalence check can see a missing
/// collective. Never set outside tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Skip the sum of the branch inputs' gradients (the copy's backward): forward stays right,
    /// every gradient below the first branch is wrong.
    SkipInputGradSum,
    /// Under sequence parallelism, skip the sum over the group of the LayerNorms' gradients:
    /// each rank then updates its copy with its own tokens' share, the copies drift apart, and
    /// the loss still falls.
    SkipLayerNormGradSum,
}

// ANCHOR: tp_block_comm
/// Chapter 1's block hook, over a tensor-parallel group: the sum after each row-parallel
/// projection, the sum of each column-parallel layer's input gradient, and the output biases
/// added by rank 0 alone (before the sum, so that the bias's gradient is that of the whole
/// output, on every rank). With the stream split by tokens, the sums are reduce-scatters and
/// the branch inputs and output gradients are all-gathered.
pub struct TpBlockComm<'a> {
    pub group: &'a mut dyn Communicator,
    pub stream: Stream,
    pub fault: Option<Fault>,
}

impl BlockComm for TpBlockComm<'_> {
    fn sum_branch_output(&mut self, partial: ViewMut<'_>) -> Result<(), CommError> {
        self.stream.sum(self.group, partial.cpu(), false)
    }

    fn sum_branch_input_grad(&mut self, partial: ViewMut<'_>) -> Result<(), CommError> {
        if self.fault == Some(Fault::SkipInputGradSum) {
            return Ok(());
        }
        self.stream.sum(self.group, partial.cpu(), true)
    }

    fn adds_output_bias(&self) -> bool {
        self.group.rank() == 0
    }

    fn stream_rows(&self, bt: usize) -> Range<usize> {
        self.stream.rows(bt, &*self.group)
    }

    fn gather_branch_input(&mut self, ln: ViewMut<'_>) -> Result<(), CommError> {
        self.stream.gather(self.group, ln.cpu())
    }

    fn gather_branch_output_grad<'a>(&mut self, d_out: View<'a>, buf: ViewMut<'a>) -> Result<View<'a>, CommError> {
        self.stream.gather_grad(self.group, d_out, buf)
    }
}
// ANCHOR_END: tp_block_comm

// ANCHOR: row_max
/// The elementwise max over the group of `local` (one value per row), on every rank. An
/// all-gather of every rank's values and a max over them: exact, like a max all-reduce, at
/// (n-1)·len floats sent per rank.
pub fn max_over_group(group: &mut dyn Communicator, local: &[f32]) -> Result<Vec<f32>, CommError> {
    let n = group.world_size();
    let mut all = vec![0.0; n * local.len()];
    group.all_gather(local, &mut all)?;
    let mut max = local.to_vec();
    for rank_values in all.chunks_exact(local.len().max(1)) {
        for (m, &v) in max.iter_mut().zip(rank_values) {
            *m = m.max(v);
        }
    }
    Ok(max)
}
// ANCHOR_END: row_max

/// The sum over the group of one f64 per rank, exactly as every rank adds them (in rank order),
/// on every rank. Collectives move f32s: an f64 is three of them (24 + 24 + 24 bits cover its 53),
/// all-gathered and put back together, so that one rank's sum is the f64 it started with.
pub fn sum_f64_over_group(group: &mut dyn Communicator, x: f64) -> Result<f64, CommError> {
    let hi = x as f32;
    let mid = (x - hi as f64) as f32;
    let lo = (x - hi as f64 - mid as f64) as f32;
    let mut all = vec![0.0; 3 * group.world_size()];
    group.all_gather(&[hi, mid, lo], &mut all)?;
    Ok(all.chunks_exact(3).map(|p| p[0] as f64 + p[1] as f64 + p[2] as f64).sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::Rng;
    use kernels::comm::thread::{ThreadComm, launch};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..len).map(|_| rng.normal() as f32).collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    // ANCHOR: transpose_tests
    /// The adjoint test, <A x, y> = <x, Aᵀ y>, for the copy A: R^L -> (R^L)^n, x -> (x, ..., x).
    /// x is the same on every rank (replicated); y_r is rank r's. <A x, y> = Σ_r <x, y_r>, and
    /// the backward must give Aᵀ y = Σ_r y_r: with an identity backward the two sides differ.
    #[test]
    fn copy_backward_is_the_transpose_of_its_forward() {
        for n in [2, 4] {
            let len = 37;
            let sides = launch(n, move |mut comm| {
                let rank = comm.rank();
                let x = random(len, 1);
                let y = random(len, 10 + rank as u64);
                let mut ax = x.clone();
                CopyToShards::forward(&mut ax);
                let mut total = vec![dot(&ax, &y) as f32];
                comm.all_reduce(&mut total, ReduceOp::Sum)?; // Σ_r <(A x)_r, y_r>
                let mut aty = y.clone();
                CopyToShards::backward(&mut comm, &mut aty)?;
                Ok::<_, CommError>((total[0] as f64, dot(&x, &aty)))
            })
            .unwrap();
            for (lhs, rhs) in sides {
                assert!((lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0), "n = {n}: {lhs} vs {rhs}");
            }
        }
    }

    /// The same for the sum A: (R^L)^n -> R^L, (x_1, ..., x_n) -> Σ x_r: <A x, y> = <Σ x_r, y>
    /// with y replicated, and Aᵀ y = (y, ..., y), so <x, Aᵀ y> = Σ_r <x_r, y>.
    #[test]
    fn sum_backward_is_the_transpose_of_its_forward() {
        for n in [2, 4] {
            let len = 37;
            let sides = launch(n, move |mut comm| {
                let rank = comm.rank();
                let x = random(len, 20 + rank as u64);
                let y = random(len, 2);
                let mut ax = x.clone();
                SumFromShards::forward(&mut comm, &mut ax)?;
                let mut aty = y.clone();
                SumFromShards::backward(&mut aty);
                let mut total = vec![dot(&x, &aty) as f32];
                comm.all_reduce(&mut total, ReduceOp::Sum)?; // Σ_r <x_r, (Aᵀ y)_r>
                Ok::<_, CommError>((dot(&ax, &y), total[0] as f64))
            })
            .unwrap();
            for (lhs, rhs) in sides {
                assert!((lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0), "n = {n}: {lhs} vs {rhs}");
            }
        }
    }
    // ANCHOR_END: transpose_tests

    /// Runs `sides` on 2 and then 4 ranks, over buffers of 3n rows of 5, and asserts that the
    /// two sides of the adjoint identity (summed over the ranks) agree on every rank.
    fn assert_adjoint(sides: fn(&mut ThreadComm, usize) -> Result<[f64; 2], CommError>) {
        for n in [2, 4] {
            let out = launch(n, move |mut comm| {
                let [lhs, rhs] = sides(&mut comm, 3 * n * 5)?;
                let mut sums = vec![lhs as f32, rhs as f32];
                comm.all_reduce(&mut sums, ReduceOp::Sum)?;
                Ok::<_, CommError>((sums[0] as f64, sums[1] as f64))
            })
            .unwrap();
            for (lhs, rhs) in out {
                assert!((lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0), "n = {n}: {lhs} vs {rhs}");
            }
        }
    }

    /// The sequence-parallel pair, by the same test. Gather: rank r's rows x_r -> the whole
    /// (x_1, ..., x_n) on every rank; its transpose takes y_q (whole, on each rank q) to
    /// rank r's rows of Σ_q y_q, a reduce-scatter.
    #[test]
    fn gather_tokens_backward_is_the_transpose_of_its_forward() {
        assert_adjoint(|comm, len| {
            let (rank, own) = (comm.rank() as u64, own_rows(comm, len));
            let mut ax = vec![0.0; len];
            ax[own.clone()].copy_from_slice(&random(own.len(), 30 + rank));
            let x = ax[own.clone()].to_vec();
            GatherTokens::forward(comm, &mut ax)?;
            let y = random(len, 40 + rank);
            let mut aty = y.clone();
            GatherTokens::backward(comm, &mut aty)?;
            Ok([dot(&ax, &y), dot(&x, &aty[own])])
        });
    }

    /// Scatter: partials p_r (whole, on each rank) -> rank r's rows of Σ_q p_q; its transpose
    /// takes g_r (rank r's rows) to the whole (g_1, ..., g_n) on every rank, an all-gather.
    #[test]
    fn scatter_tokens_backward_is_the_transpose_of_its_forward() {
        assert_adjoint(|comm, len| {
            let (rank, own) = (comm.rank() as u64, own_rows(comm, len));
            let p = random(len, 50 + rank);
            let mut ap = p.clone();
            ScatterTokens::forward(comm, &mut ap)?;
            let g = random(own.len(), 60 + rank);
            let mut atg = vec![0.0; len];
            ScatterTokens::backward(comm, &g, &mut atg)?;
            Ok([dot(&ap[own], &g), dot(&p, &atg)])
        });
    }

    #[test]
    fn row_max_and_f64_sum_are_exact() {
        let out = launch(3, |mut comm| {
            let rank = comm.rank();
            let max = max_over_group(&mut comm, &[rank as f32, -(rank as f32), f32::NEG_INFINITY])?;
            let sum = sum_f64_over_group(&mut comm, 0.1 + rank as f64 * 1e-9)?;
            Ok::<_, CommError>((max, sum))
        })
        .unwrap();
        for (max, sum) in out {
            assert_eq!(max, vec![2.0, 0.0, f32::NEG_INFINITY]);
            assert_eq!(sum, 0.1 + (0.1 + 1e-9) + (0.1 + 2e-9));
        }
        let alone = launch(1, |mut comm| sum_f64_over_group(&mut comm, std::f64::consts::PI)).unwrap();
        assert_eq!(alone[0], std::f64::consts::PI, "one rank gets back its f64, bit for bit");
    }
}
