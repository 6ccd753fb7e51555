//! Every operation GPT-2 training needs, each a forward/backward pair of plain functions.
//!
//! Conventions, as in llm.c: `B` batch, `T` time (sequence), `C` channels, `V` vocabulary,
//! `Vp` vocabulary padded for speed. Tensors are row-major slices; the comment on top of each
//! function states its shapes. Backward functions *accumulate* (`+=`) into gradient buffers, so
//! the caller zeroes them once per optimizer step: this is what makes gradient accumulation and
//! tied weights (one gradient fed from two places) free.
//!
//! Parallel loops split work into fixed-size chunks and reduce partial sums in chunk order, so
//! every result is bit-for-bit the same run to run. (Across machines, the gemm crate's choice of
//! kernel for the CPU at hand, and the matmul's row blocks per thread, may change the last bits.)

pub mod adamw;
pub mod attention;
pub mod embedding;
pub mod gelu;
pub mod grad_norm;
pub mod layernorm;
pub mod math;
pub mod matmul;
pub mod residual;
pub mod softmax_cross_entropy;

#[cfg(test)]
pub(crate) mod finite_difference;

use rayon::prelude::*;
use std::ops::Range;

/// Rows per parallel task in row-wise reductions. Fixed, so that results do not depend on the
/// number of threads.
pub(crate) const ROWS_PER_TASK: usize = 32;

/// `out[j] += sum over rows r of f(r)[j]`, computed in parallel over fixed chunks of rows and
/// summed in chunk order (deterministic). `f` adds the rows of one chunk into a zeroed partial.
pub(crate) fn reduce_rows(n_rows: usize, width: usize, out: &mut [f32], f: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    let n_chunks = n_rows.div_ceil(ROWS_PER_TASK);
    let partials: Vec<Vec<f32>> = (0..n_chunks)
        .into_par_iter()
        .map(|chunk| {
            let mut partial = vec![0.0f32; width];
            let start = chunk * ROWS_PER_TASK;
            f(start..(start + ROWS_PER_TASK).min(n_rows), &mut partial);
            partial
        })
        .collect();
    for partial in partials {
        for (o, p) in out.iter_mut().zip(&partial) {
            *o += p;
        }
    }
}
