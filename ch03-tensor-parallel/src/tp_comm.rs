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
//!
//! The buffers the pairs take and return carry their placement in their type: a [`Partial`]
//! sum, a [`Replicated`] whole, or rows [`SplitByTokens`], and only the reductions turn a
//! `Partial` into either of the others. Inside chapter 1's block, over raw views, the types do
//! not reach: there [`PlacementCheck`] checks at run time, when asked to.

use ch01_single_gpu::model::BlockComm;
use kernels::comm::ring::chunk;
use kernels::comm::{CommError, Communicator, ReduceOp};
use kernels::{View, ViewMut};
use std::ops::Range;

// ANCHOR: placements
/// A buffer of which each rank of the group holds a partial sum: the output of a row-parallel
/// matmul, a column-parallel layer's share of its input gradient, a vocabulary shard's lookups.
/// Anyone may declare one; only the sums below read it as anything else, so a partial sum
/// cannot reach code that wants the whole one without going through a reduction.
///
/// A forgotten sum does not compile:
///
/// ```compile_fail,E0308
/// use ch03_tensor_parallel::tp_comm::{Partial, Replicated};
/// fn layernorm(x: Replicated<'_>) {}
/// fn after_the_projection(out: &mut [f32]) {
///     layernorm(Partial::new(out)); // expected `Replicated`, found `Partial`
/// }
/// ```
///
/// and through the reduction it does:
///
/// ```
/// use ch03_tensor_parallel::tp_comm::{Partial, Replicated, SumFromShards};
/// use kernels::comm::{CommError, Communicator};
/// fn layernorm(x: Replicated<'_>) {}
/// fn after_the_projection(group: &mut dyn Communicator, out: &mut [f32]) -> Result<(), CommError> {
///     layernorm(SumFromShards::forward(group, Partial::new(out))?);
///     Ok(())
/// }
/// ```
pub struct Partial<'a>(&'a mut [f32]);

/// A buffer that every rank of the group holds bit for bit the same. Made only by a reduction
/// over a [`Partial`] (or an all-gather of a [`SplitByTokens`]), or by [`Replicated::computed_alike`].
pub struct Replicated<'a>(&'a mut [f32]);

/// A [B·T, C] buffer of which each rank holds (and is the only one to hold) its tokens' rows.
pub struct SplitByTokens<'a>(&'a mut [f32]);

impl<'a> Partial<'a> {
    /// This rank's contribution to a sum over the group, to be written through `DerefMut`.
    pub fn new(buf: &'a mut [f32]) -> Partial<'a> {
        Partial(buf)
    }
}

impl<'a> Replicated<'a> {
    /// A buffer that every rank computed by the same arithmetic from the same inputs (the batch,
    /// replicated parameters): replicated without a collective.
    pub fn computed_alike(buf: &'a mut [f32]) -> Replicated<'a> {
        Replicated(buf)
    }

    /// Leaves the typed world, into chapter 1's raw views.
    pub fn into_inner(self) -> &'a mut [f32] {
        self.0
    }
}

impl<'a> SplitByTokens<'a> {
    /// `buf` [B·T, C], of which this rank's rows (`Stream::rows`) are its tokens'.
    pub fn new(buf: &'a mut [f32]) -> SplitByTokens<'a> {
        SplitByTokens(buf)
    }

    pub fn into_inner(self) -> &'a mut [f32] {
        self.0
    }
}

macro_rules! deref_to_slice {
    ($($placed:ident),*) => {$(
        impl std::ops::Deref for $placed<'_> {
            type Target = [f32];
            fn deref(&self) -> &[f32] {
                self.0
            }
        }
        impl std::ops::DerefMut for $placed<'_> {
            fn deref_mut(&mut self) -> &mut [f32] {
                self.0
            }
        }
    )*};
}
deref_to_slice!(Partial, Replicated, SplitByTokens);
// ANCHOR_END: placements

// ANCHOR: conjugate_pair
/// The input of a column-parallel layer: every rank uses all of it. Forward copies (nothing to
/// do: it is already on every rank); backward sums the ranks' partial gradients, since each
/// rank's columns contributed a share of dL/dx.
pub struct CopyToShards;

impl CopyToShards {
    /// x -> x on every rank.
    pub fn forward(x: Replicated<'_>) -> Replicated<'_> {
        x
    }

    /// dL/dx (partial on each rank) -> the sum over the group, on every rank.
    pub fn backward<'b>(group: &mut dyn Communicator, Partial(grad): Partial<'b>) -> Result<Replicated<'b>, CommError> {
        // EXERCISE(ch03-copy-backward, points = 5): the transpose of x -> (x, ..., x): every rank's partial gradient summed over the group, in place, on every rank
        // TESTS: -p ch03-tensor-parallel --lib -- tp_comm::tests::copy_backward_is_the_transpose_of_its_forward
        // NEEDS: ch02-ring-reduce-scatter ch02-ring-all-gather
        group.all_reduce(grad, ReduceOp::Sum)?;
        // WRONG(the identity, as forward is): `group.all_reduce(grad, ReduceOp::Sum)?;` -> ``
        // WRONG(the mean of the partials, not their sum): `ReduceOp::Sum` -> `ReduceOp::Avg`
        Ok(Replicated(grad))
        // END EXERCISE
    }
}

/// The output of a row-parallel layer: each rank holds a partial sum of it. Forward sums over
/// the group; backward is the identity, since every rank's partial contributed to the sum with
/// weight 1 and so receives all of dL/d(sum).
pub struct SumFromShards;

impl SumFromShards {
    /// partial -> the sum over the group, on every rank.
    pub fn forward<'b>(group: &mut dyn Communicator, Partial(sum): Partial<'b>) -> Result<Replicated<'b>, CommError> {
        // EXERCISE(ch03-sum-forward, points = 5): the ranks' partial sums added over the group, in place, so that every rank holds the whole sum
        // TESTS: -p ch03-tensor-parallel --lib -- tp_comm::tests::sum_backward_is_the_transpose_of_its_forward
        // NEEDS: ch02-ring-reduce-scatter ch02-ring-all-gather
        group.all_reduce(sum, ReduceOp::Sum)?;
        // WRONG(leaves each rank its partial): `group.all_reduce(sum, ReduceOp::Sum)?;` -> ``
        // WRONG(the mean of the partials, not their sum): `ReduceOp::Sum` -> `ReduceOp::Avg`
        Ok(Replicated(sum))
        // END EXERCISE
    }

    /// dL/d(sum) -> dL/d(partial): the same on every rank.
    pub fn backward(grad: Replicated<'_>) -> Replicated<'_> {
        grad
    }
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
    pub fn forward<'b>(
        group: &mut dyn Communicator,
        SplitByTokens(buf): SplitByTokens<'b>,
    ) -> Result<Replicated<'b>, CommError> {
        let mine = buf[own_rows(group, buf.len())].to_vec();
        group.all_gather(&mine, buf)?;
        Ok(Replicated(buf))
    }

    /// grad [B·T, C]: this rank's partial gradient of every row -> the sum over the group, in
    /// this rank's rows (the other rows are left as they were, and are not read again).
    pub fn backward<'b>(
        group: &mut dyn Communicator,
        Partial(grad): Partial<'b>,
    ) -> Result<SplitByTokens<'b>, CommError> {
        let own = own_rows(group, grad.len());
        let mut mine = vec![0.0; own.len()];
        group.reduce_scatter(grad, &mut mine, ReduceOp::Sum)?;
        grad[own].copy_from_slice(&mine);
        Ok(SplitByTokens(grad))
    }
}

/// The output of a row-parallel layer under sequence parallelism: a partial sum of every row on
/// each rank, of which each rank needs only its tokens' rows. Forward reduce-scatters; backward
/// all-gathers, since each row's sum sent its gradient to every rank's partial.
pub struct ScatterTokens;

impl ScatterTokens {
    /// partial [B·T, C] -> the sum over the group, in this rank's rows.
    pub fn forward<'b>(group: &mut dyn Communicator, partial: Partial<'b>) -> Result<SplitByTokens<'b>, CommError> {
        GatherTokens::backward(group, partial)
    }

    /// grad (this rank's rows) -> every rank's rows, in `whole` [B·T, C].
    pub fn backward<'b>(
        group: &mut dyn Communicator,
        grad: &[f32],
        whole: &'b mut [f32],
    ) -> Result<Replicated<'b>, CommError> {
        group.all_gather(grad, whole)?;
        Ok(Replicated(whole))
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

/// A sum over the group, where the stream lies: whole on every rank, or this rank's rows of it.
/// Which one is known only at run time (`--sequence-parallel`).
pub enum Summed<'a> {
    Replicated(Replicated<'a>),
    SplitByTokens(SplitByTokens<'a>),
}

impl<'a> Summed<'a> {
    /// The [B·T, C] buffer, whose stream rows (`Stream::rows`) hold the sum.
    pub fn into_inner(self) -> &'a mut [f32] {
        match self {
            Summed::Replicated(whole) => whole.into_inner(),
            Summed::SplitByTokens(rows) => rows.into_inner(),
        }
    }
}

impl Stream {
    /// The rows of the B·T tokens whose stream this rank holds.
    pub fn rows(self, bt: usize, group: &dyn Communicator) -> Range<usize> {
        match self {
            Stream::Replicated => 0..bt,
            Stream::SplitByTokens => own_rows(group, bt),
        }
    }

    /// Forward, into a column-parallel layer: `buf` [B·T, C], filled in this rank's stream rows
    /// (by the same arithmetic on every rank, when they are all the rows), becomes whole on every
    /// rank.
    pub fn gather<'b>(self, group: &mut dyn Communicator, buf: &'b mut [f32]) -> Result<Replicated<'b>, CommError> {
        match self {
            Stream::Replicated => Ok(CopyToShards::forward(Replicated::computed_alike(buf))),
            Stream::SplitByTokens => GatherTokens::forward(group, SplitByTokens::new(buf)),
        }
    }

    /// Forward, out of a row-parallel layer (`partial` a partial sum), and backward, out of a
    /// column-parallel one (`partial` a partial gradient): the sum over the group, in this rank's
    /// stream rows of the buffer [B·T, C].
    pub fn sum<'b>(
        self,
        group: &mut dyn Communicator,
        partial: Partial<'b>,
        backward: bool,
    ) -> Result<Summed<'b>, CommError> {
        Ok(match (self, backward) {
            (Stream::Replicated, false) => Summed::Replicated(SumFromShards::forward(group, partial)?),
            (Stream::Replicated, true) => Summed::Replicated(CopyToShards::backward(group, partial)?),
            (Stream::SplitByTokens, false) => Summed::SplitByTokens(ScatterTokens::forward(group, partial)?),
            (Stream::SplitByTokens, true) => Summed::SplitByTokens(GatherTokens::backward(group, partial)?),
        })
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
                let whole = ScatterTokens::backward(group, grad.cpu(), whole.cpu())?;
                Ok(View::Cpu(whole.into_inner()))
            }
        }
    }
}
// ANCHOR_END: sequence_pair

/// A deliberate mistake, for the tests that show the equivalence check and the placement check
/// can see a missing collective. Never set outside tests.
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
    /// Whether to check, at each point where the block must leave a buffer replicated, that it
    /// is ([`PlacementCheck`]); `None` costs nothing.
    pub check: Option<PlacementCheck>,
}

impl BlockComm for TpBlockComm<'_> {
    fn sum_branch_output(&mut self, partial: ViewMut<'_>) -> Result<(), CommError> {
        let summed = self.stream.sum(self.group, Partial::new(partial.cpu()), false)?;
        if let (Some(check), Summed::Replicated(sum)) = (&mut self.check, summed) {
            check.after(self.group, Point::OutputSum, &sum)?;
        }
        Ok(())
    }

    fn sum_branch_input_grad(&mut self, partial: ViewMut<'_>) -> Result<(), CommError> {
        let grad = partial.cpu();
        if self.fault != Some(Fault::SkipInputGradSum) {
            self.stream.sum(self.group, Partial::new(&mut *grad), true)?;
        }
        match &mut self.check {
            Some(check) if self.stream == Stream::Replicated => check.after(self.group, Point::InputGradSum, grad),
            _ => Ok(()),
        }
    }

    fn adds_output_bias(&self) -> bool {
        self.group.rank() == 0
    }

    fn stream_rows(&self, bt: usize) -> Range<usize> {
        self.stream.rows(bt, &*self.group)
    }

    fn gather_branch_input(&mut self, ln: ViewMut<'_>) -> Result<(), CommError> {
        let whole = self.stream.gather(self.group, ln.cpu())?;
        match &mut self.check {
            Some(check) => check.after(self.group, Point::InputGather, &whole),
            None => Ok(()),
        }
    }

    fn gather_branch_output_grad<'a>(&mut self, d_out: View<'a>, buf: ViewMut<'a>) -> Result<View<'a>, CommError> {
        self.stream.gather_grad(self.group, d_out, buf)
    }
}
// ANCHOR_END: tp_block_comm

// ANCHOR: placement_check
/// The environment variable that turns [`PlacementCheck`] on for a run (`=1`).
pub const CHECK_PLACEMENTS_VAR: &str = "SFS_CHECK_PLACEMENTS";

/// The run-time check of what the types cannot see: inside chapter 1's block, which computes
/// over raw views, a buffer the hooks must leave replicated (the branch inputs after their
/// gather, and, when the stream is replicated, each sum) is hashed on every rank, the hashes are
/// all-gathered, and a rank whose hash differs from rank 0's is an error that names the op. The
/// hooks are called in the block's order (forward: the attention's gather and sum, then the
/// MLP's; backward: the MLP's input-gradient sum, then the attention's), which names the op
/// from a count. Costs an all-gather of 4 floats per point when on.
#[derive(Clone, Debug, Default)]
pub struct PlacementCheck {
    gathers: usize,
    output_sums: usize,
    input_grad_sums: usize,
}

/// The three points of the block the check looks at.
#[derive(Clone, Copy, Debug)]
enum Point {
    InputGather,
    OutputSum,
    InputGradSum,
}

impl PlacementCheck {
    /// On when [`CHECK_PLACEMENTS_VAR`] is `1` (read once per run, not per call).
    pub fn enabled_by_env() -> bool {
        std::env::var_os(CHECK_PLACEMENTS_VAR).is_some_and(|v| v == "1")
    }

    fn after(&mut self, group: &mut dyn Communicator, point: Point, buf: &[f32]) -> Result<(), CommError> {
        let (count, op) = match point {
            Point::InputGather => {
                (&mut self.gathers, ["the attention's input (ln_1) gather", "the MLP's input (ln_2) gather"])
            }
            Point::OutputSum => (&mut self.output_sums, ["the attention's c_proj sum", "the MLP's c_proj sum"]),
            Point::InputGradSum => (
                &mut self.input_grad_sums,
                ["the MLP's c_fc input-gradient sum", "the attention's c_attn input-gradient sum"],
            ),
        };
        let (block, op) = (*count / 2, op[*count % 2]);
        *count += 1;
        let pass = match point {
            Point::InputGradSum => format!("backward, block {block} of this pass counted from its last"),
            _ => format!("forward, block {block} of this pass"),
        };
        let hashes = all_hashes(group, buf)?;
        match hashes.iter().position(|h| *h != hashes[0]) {
            None => Ok(()),
            Some(rank) => Err(CommError::Backend(format!(
                "after {op} ({pass}), rank {rank} differs from rank 0: a missing all-reduce?"
            ))),
        }
    }
}

/// Every rank's 64-bit FNV-1a hash of `buf`'s bits, in rank order. Collectives move f32s: a
/// hash travels as four 16-bit pieces, each an f32 exactly.
fn all_hashes(group: &mut dyn Communicator, buf: &[f32]) -> Result<Vec<u64>, CommError> {
    let hash = buf.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3));
    let pieces: Vec<f32> = (0..4).map(|i| ((hash >> (16 * i)) & 0xffff) as f32).collect();
    let mut all = vec![0.0; 4 * group.world_size()];
    group.all_gather(&pieces, &mut all)?;
    Ok(all.chunks_exact(4).map(|p| p.iter().enumerate().fold(0, |h, (i, &x)| h | (x as u64) << (16 * i))).collect())
}
// ANCHOR_END: placement_check

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
                let ax = CopyToShards::forward(Replicated::computed_alike(&mut ax));
                let mut total = vec![dot(&ax, &y) as f32];
                comm.all_reduce(&mut total, ReduceOp::Sum)?; // Σ_r <(A x)_r, y_r>
                let mut aty = y.clone();
                let aty = CopyToShards::backward(&mut comm, Partial::new(&mut aty))?;
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
                let ax = SumFromShards::forward(&mut comm, Partial::new(&mut ax))?;
                let mut aty = y.clone();
                let aty = SumFromShards::backward(Replicated::computed_alike(&mut aty));
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
            let ax = GatherTokens::forward(comm, SplitByTokens::new(&mut ax))?;
            let y = random(len, 40 + rank);
            let mut aty = y.clone();
            let aty = GatherTokens::backward(comm, Partial::new(&mut aty))?;
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
            let ap = ScatterTokens::forward(comm, Partial::new(&mut ap))?;
            let g = random(own.len(), 60 + rank);
            let mut atg = vec![0.0; len];
            let atg = ScatterTokens::backward(comm, &g, &mut atg)?;
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
