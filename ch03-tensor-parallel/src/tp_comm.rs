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

use ch01_single_gpu::model::BlockComm;
use kernels::ViewMut;
use kernels::comm::{CommError, Communicator, ReduceOp};

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

/// A deliberate mistake, for the test that shows the equivalence check can see a missing
/// collective. Never set outside tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Skip the sum of the branch inputs' gradients (the copy's backward): forward stays right,
    /// every gradient below the first branch is wrong.
    SkipInputGradSum,
}

// ANCHOR: tp_block_comm
/// Chapter 1's block hook, over a tensor-parallel group: the sum after each row-parallel
/// projection, the sum of each column-parallel layer's input gradient, and the output biases
/// added by rank 0 alone.
pub struct TpBlockComm<'a> {
    pub group: &'a mut dyn Communicator,
    pub fault: Option<Fault>,
}

impl BlockComm for TpBlockComm<'_> {
    fn sum_branch_output(&mut self, partial: ViewMut<'_>) -> Result<(), CommError> {
        SumFromShards::forward(self.group, partial.cpu())
    }

    fn sum_branch_input_grad(&mut self, partial: ViewMut<'_>) -> Result<(), CommError> {
        if self.fault == Some(Fault::SkipInputGradSum) {
            return Ok(());
        }
        CopyToShards::backward(self.group, partial.cpu())
    }

    fn adds_output_bias(&self) -> bool {
        self.group.rank() == 0
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
    use kernels::comm::thread::launch;

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
