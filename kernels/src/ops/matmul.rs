//! Matrix multiplication: a safe, strided wrapper around the `gemm` crate, and the linear layer
//! (`Conv1D` in Hugging Face's GPT-2) built on it.
//!
//! Strides make transposes free: `A^T` is `A` with its row and column strides swapped. So the
//! three products of a linear layer's forward and backward are one function with three
//! different views, and no matrix is ever copied to be transposed.

use super::reduce_rows;
use rayon::prelude::*;

/// A read-only matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// A writable matrix view, laid out as [`MatRef`].
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

fn check_extent(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) {
    if rows > 0 && cols > 0 {
        let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
        assert!(last < len, "matrix view {rows}x{cols} (strides {row_stride},{col_stride}) overruns a buffer of {len}");
    }
}

impl<'a> MatRef<'a> {
    /// `data` as a dense row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "buffer is not {rows}x{cols}");
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose: the same memory, strides swapped.
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }
}

impl<'a> MatMut<'a> {
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "buffer is not {rows}x{cols}");
        MatMut { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    pub fn t(self) -> Self {
        MatMut { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }
}

/// `c = a @ b`, or `c += a @ b` when `accumulate`. Shapes: a [M,K], b [K,N], c [M,N].
///
/// Threads: the rows of `c` (and of `a`) are cut into one block per thread, and each block is
/// an independent single-threaded product. On two cores this runs at 1.8x one core, where
/// gemm's own threading reached only 1.1x at the model's shapes (M = 256; see the `matmul`
/// benchmark). Every element of `c` is still summed by one thread in one order: deterministic.
pub fn gemm(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert_eq!((c.rows, c.cols), (m, n), "output shape");
    check_extent(a.data.len(), a.rows, a.cols, a.row_stride, a.col_stride);
    check_extent(b.data.len(), b.rows, b.cols, b.row_stride, b.col_stride);
    check_extent(c.data.len(), c.rows, c.cols, c.row_stride, c.col_stride);
    let threads = rayon::current_num_threads();
    let rows_per_block = m.div_ceil(threads).next_multiple_of(8);
    let worth_splitting = threads > 1 && m >= 2 * 8 && m * n * k >= 1 << 18;
    if !worth_splitting || c.col_stride != 1 || c.row_stride != n {
        return gemm_serial(c, a, b, accumulate);
    }
    c.data.par_chunks_mut(rows_per_block * n).enumerate().for_each(|(i, c_block)| {
        let rows = c_block.len() / n;
        let a_block = MatRef { data: &a.data[i * rows_per_block * a.row_stride..], rows, ..a };
        gemm_serial(MatMut::row_major(c_block, rows, n), a_block, b, accumulate);
    });
}

/// One thread's product; the checks of [`gemm`] apply.
fn gemm_serial(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    check_extent(a.data.len(), a.rows, a.cols, a.row_stride, a.col_stride);
    check_extent(c.data.len(), c.rows, c.cols, c.row_stride, c.col_stride);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c.data[i * c.row_stride + j * c.col_stride] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: the extents of all three views were checked against their slices; `c` is a
    // unique borrow, so it cannot alias `a` or `b`; gemm reads and writes only within the
    // described matrices. gemm computes dst = alpha*dst + beta*lhs*rhs (alpha read only when
    // read_dst is true).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            c.col_stride as isize,
            c.row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

// ANCHOR: linear_forward
/// Linear layer forward, Hugging Face `Conv1D` layout (weight stored [in, out]).
///
/// inp [M, K], weight [K, N], bias [N] -> out [M, N]:   out = inp @ weight + bias
pub fn linear_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    match bias {
        Some(bias) => {
            for row in out.chunks_exact_mut(n) {
                row.copy_from_slice(bias);
            }
        }
        None => out.fill(0.0),
    }
    gemm(MatMut::row_major(out, m, n), MatRef::row_major(inp, m, k), MatRef::row_major(weight, k, n), true);
}
// ANCHOR_END: linear_forward

// ANCHOR: linear_backward
/// Linear layer backward. Given dout = dL/dout [M, N]:
///
///   dinp    += dout @ weight^T      [M, K]
///   dweight += inp^T @ dout         [K, N]
///   dbias   += sum over rows of dout [N]
pub fn linear_backward(
    dinp: Option<&mut [f32]>,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    let dout_mat = MatRef::row_major(dout, m, n);
    if let Some(dinp) = dinp {
        gemm(MatMut::row_major(dinp, m, k), dout_mat, MatRef::row_major(weight, k, n).t(), true);
    }
    gemm(MatMut::row_major(dweight, k, n), MatRef::row_major(inp, m, k).t(), dout_mat, true);
    if let Some(dbias) = dbias {
        reduce_rows(m, n, dbias, |rows, partial| {
            for r in rows {
                for (p, d) in partial.iter_mut().zip(&dout[r * n..(r + 1) * n]) {
                    *p += d;
                }
            }
        });
    }
}
// ANCHOR_END: linear_backward

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::finite_difference::{check_gradient, random};

    #[test]
    fn forward_matches_hand_computed() {
        // [1 2; 3 4] @ [1 0 1; 0 1 1] + [10 20 30]
        let mut out = vec![0.0; 6];
        linear_forward(&mut out, &[1., 2., 3., 4.], &[1., 0., 1., 0., 1., 1.], Some(&[10., 20., 30.]), 2, 2, 3);
        assert_eq!(out, vec![11., 22., 33., 13., 24., 37.]);
    }

    #[test]
    fn gemm_handles_transposed_views_and_accumulates() {
        // a^T @ b with a stored [2,3] and b stored [2,2].
        let a = [1., 2., 3., 4., 5., 6.];
        let b = [1., 0., 0., 1.];
        let mut c = vec![1.0; 6];
        gemm(MatMut::row_major(&mut c, 3, 2), MatRef::row_major(&a, 2, 3).t(), MatRef::row_major(&b, 2, 2), true);
        assert_eq!(c, vec![2., 5., 3., 6., 4., 7.]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (m, k, n) = (5, 7, 3);
        let inp = random(m * k, 1);
        let weight = random(k * n, 2);
        let bias = random(n, 3);
        let forward = |inp: &[f32], weight: &[f32], bias: &[f32]| {
            let mut out = vec![0.0; m * n];
            linear_forward(&mut out, inp, weight, Some(bias), m, k, n);
            out
        };
        let dout = random(m * n, 4);
        let (mut dinp, mut dw, mut db) = (vec![0.0; m * k], vec![0.0; k * n], vec![0.0; n]);
        linear_backward(Some(&mut dinp), &mut dw, Some(&mut db), &dout, &inp, &weight, m, k, n);
        check_gradient(&inp, &dinp, &dout, |x| forward(x, &weight, &bias));
        check_gradient(&weight, &dw, &dout, |w| forward(&inp, w, &bias));
        check_gradient(&bias, &db, &dout, |b| forward(&inp, &weight, b));
    }
}
