//! Every op of `crate::ops`, on the GPU. Same names, same shapes, same semantics (backward
//! functions accumulate `+=` into gradients) as the CPU functions they mirror; the comment on each
//! CPU function states the math, and so does the comment on each kernel in `kernels/*.cu`.
//!
//! Element types: "X" is the activation type, `F32` or `BF16` (the dtype of the views says which;
//! every X argument of one call has the same one). Parameters are read in X (in bf16 runs, a bf16
//! copy of the f32 master weights); parameter gradients, LayerNorm statistics, losses, optimizer
//! state and master weights are always `F32`.
//!
//! Token ids come from the host (`&[u32]`) and are uploaded by `Gpu::upload_indices`.
//!
//! Matmuls are cuBLAS (`cublasGemmEx`, f32 accumulation, no TF32), or cuBLASLt where a bias or
//! GELU is fused into the matmul (`super::lt`, the same accumulation); everything else is a kernel
//! of one of the `.cu` files, templated over X and instantiated as `<kernel>_f32` and
//! `<kernel>_bf16`. A wrong dtype or length is a bug in the caller: it panics, before anything is
//! queued. Errors of the GPU itself are kept by `Gpu::record` and reported at the next sync.
//!
//! Every op holds its GPU's turn (`Gpu::exclusive`) from its first launch to its last, which is
//! what `launch`, `gemm` and the scratch buffers take: no other thread's work comes between.

use super::lt;
use super::modules::Source;
use super::{DType, DevView, DevViewMut, Exclusive};
use cudarc::cublas::result as cublas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::ffi::c_void;

// ---------------------------------------------------------------------------------------------
// The kernels' sources, and how to launch one.

static ELEMENTWISE: Source = Source {
    file: "elementwise.cu",
    code: include_str!("kernels/elementwise.cu"),
    kernels: &[
        "convert_f32_to_f32",
        "convert_f32_to_bf16",
        "convert_bf16_to_f32",
        "convert_bf16_to_bf16",
        "broadcast_rows_f32",
        "broadcast_rows_bf16",
    ],
};

static RESIDUAL: Source = Source {
    file: "residual.cu",
    code: include_str!("kernels/residual.cu"),
    kernels: &["residual_forward_f32", "residual_forward_bf16"],
};

// ANCHOR: gelu_source
static GELU: Source = Source {
    file: "gelu.cu",
    code: include_str!("kernels/gelu.cu"),
    kernels: &["gelu_forward_f32", "gelu_forward_bf16", "gelu_backward_f32", "gelu_backward_bf16"],
};
// ANCHOR_END: gelu_source

static EMBEDDING: Source = Source {
    file: "embedding.cu",
    code: include_str!("kernels/embedding.cu"),
    kernels: &[
        "embedding_forward_f32",
        "embedding_forward_bf16",
        "embedding_backward_wpe_f32",
        "embedding_backward_wpe_bf16",
        "embedding_backward_wte_f32",
        "embedding_backward_wte_bf16",
    ],
};

static LAYERNORM: Source = Source {
    file: "layernorm.cu",
    code: include_str!("kernels/layernorm.cu"),
    kernels: &[
        "layernorm_forward_f32",
        "layernorm_forward_bf16",
        "layernorm_backward_input_f32",
        "layernorm_backward_input_bf16",
        "layernorm_backward_params_partial_f32",
        "layernorm_backward_params_partial_bf16",
    ],
};

static ATTENTION: Source = Source {
    file: "attention.cu",
    code: include_str!("kernels/attention.cu"),
    kernels: &[
        "attention_softmax_f32",
        "attention_softmax_bf16",
        "attention_softmax_backward_f32",
        "attention_softmax_backward_bf16",
    ],
};

static SOFTMAX_CROSS_ENTROPY: Source = Source {
    file: "softmax_cross_entropy.cu",
    code: include_str!("kernels/softmax_cross_entropy.cu"),
    kernels: &[
        "softmax_cross_entropy_forward_f32",
        "softmax_cross_entropy_forward_bf16",
        "softmax_cross_entropy_backward_f32",
        "softmax_cross_entropy_backward_bf16",
    ],
};

static ADAMW: Source = Source { file: "adamw.cu", code: include_str!("kernels/adamw.cu"), kernels: &["adamw_update"] };

static REDUCE: Source = Source {
    file: "reduce.cu",
    code: include_str!("kernels/reduce.cu"),
    kernels: &[
        "column_sum_partial_f32",
        "column_sum_partial_bf16",
        "add_column_partials",
        "sum_squares_partial",
        "sum_partials_sqrt",
    ],
};

static SOURCES: [&Source; 9] =
    [&ELEMENTWISE, &RESIDUAL, &GELU, &EMBEDDING, &LAYERNORM, &ATTENTION, &SOFTMAX_CROSS_ENTROPY, &ADAMW, &REDUCE];

/// Every `.cu` file of the backend, with the kernels it defines (for the NVRTC compile test).
pub fn sources() -> &'static [&'static Source] {
    &SOURCES
}

// ANCHOR: launch
/// The instantiation of kernel template `name` for activation type `x`: `name_f32` or `name_bf16`.
macro_rules! for_x {
    ($name:literal, $x:expr) => {
        match $x {
            DType::F32 => concat!($name, "_f32"),
            DType::BF16 => concat!($name, "_bf16"),
            DType::U32 => unreachable!("activation types are checked first"),
        }
    };
}

/// A kernel argument, named for the C type of the parameter it fills. The driver reads each
/// argument by the size of that parameter, so the variant must match the kernel's signature:
/// `Ptr` for any pointer, `Int` for `int`, `Long` for `long` (64 bits on Linux), `Float` for `float`.
enum Arg {
    Ptr(u64),
    Int(i32),
    Long(i64),
    Float(f32),
}
use Arg::{Float, Int, Long, Ptr};

/// Queues kernel `name` of `source`. Nothing to do (an empty grid) queues nothing.
fn launch(gpu: &Exclusive, source: &Source, name: &'static str, cfg: LaunchConfig, args: &[Arg]) {
    if cfg.grid_dim.0 == 0 {
        return;
    }
    let f = gpu.function(source, name);
    let mut builder = gpu.stream().launch_builder(&f);
    for arg in args {
        match arg {
            Ptr(p) => builder.arg(p),
            Int(i) => builder.arg(i),
            Long(l) => builder.arg(l),
            Float(x) => builder.arg(x),
        };
    }
    // SAFETY: the arguments match the kernel's C signature (each call site lists them in order,
    // by C type), and every pointer is a device view whose length the calling op has checked
    // against the extent the kernel touches.
    let result = unsafe { builder.launch(cfg) };
    gpu.record(name, result);
}
// ANCHOR_END: launch

// ANCHOR: per_element
/// Threads per block for the one-thread-per-element kernels.
const BLOCK: u32 = 256;

fn grid_size(blocks: usize) -> u32 {
    assert!(blocks < i32::MAX as usize, "{blocks} blocks is more than a grid can hold");
    blocks as u32
}

/// One thread per element of `n`.
fn per_element(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid_size(n.div_ceil(BLOCK as usize)), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}
// ANCHOR_END: per_element

/// One warp per row of `rows` (8 rows per block of 256 threads).
fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid_size(rows.div_ceil(8)), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// How the column-sum kernels cut `rows`: into chunks of at least 256 rows (8 per thread of a
/// 32 x 32 block), at most 32 of them. Fixed by the shape, so the order of the sums is too.
fn column_chunks(rows: usize) -> (usize, usize) {
    let chunks = rows.div_ceil(256).clamp(1, 32);
    (chunks, rows.div_ceil(chunks).max(1))
}

/// Pass 1 of a column sum: a block of 32 x 32 threads per 32 columns and per chunk of rows.
fn per_32_columns_and_chunk(cols: usize, chunks: usize) -> LaunchConfig {
    let grid = (grid_size(cols.div_ceil(32)), grid_size(chunks), 1);
    LaunchConfig { grid_dim: grid, block_dim: (32, 32, 1), shared_mem_bytes: 0 }
}

/// Pass 2 of a column sum: out [cols] += the sum, in chunk order, of partials [chunks, cols].
fn add_column_partials(gpu: &Exclusive, out: u64, partials: u64, chunks: usize, cols: usize) {
    let args = [Ptr(out), Ptr(partials), Int(int(chunks)), Int(int(cols))];
    launch(gpu, &REDUCE, "add_column_partials", per_element(cols), &args);
}

/// A size for an `int` kernel parameter or a cuBLAS dimension.
fn int(x: usize) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("{x} does not fit a 32-bit int"))
}

fn long(x: usize) -> i64 {
    x as i64
}

// ---------------------------------------------------------------------------------------------
// Checks of the caller's views.

/// The activation type X of an op: the dtype shared by all of `dtypes`, F32 or BF16.
fn activation_type(op: &str, dtypes: &[DType]) -> DType {
    let x = dtypes[0];
    assert!(matches!(x, DType::F32 | DType::BF16), "{op}: activations must be f32 or bf16, not {x}");
    assert!(dtypes.iter().all(|&d| d == x), "{op}: activations of different types {dtypes:?}");
    x
}

fn assert_f32(op: &str, name: &str, dtype: DType) {
    assert_eq!(dtype, DType::F32, "{op}: {name} must be f32");
}

fn assert_len(op: &str, name: &str, len: usize, expected: usize) {
    assert_eq!(len, expected, "{op}: {name} has {len} elements, expected {expected}");
}

/// Uploads token ids after checking that each is below `limit` (a bad id would read out of
/// bounds on the device, where nothing checks).
fn upload_tokens<'a>(op: &str, gpu: &'a Exclusive<'_>, ids: &[u32], limit: usize) -> DevView<'a> {
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= limit) {
        panic!("{op}: token id {bad} is not below {limit}");
    }
    gpu.upload_indices(ids)
}

// ---------------------------------------------------------------------------------------------
// Matmuls: cuBLAS.

fn cuda_type(dtype: DType) -> cudaDataType {
    match dtype {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        DType::U32 => unreachable!("no matmul of token ids"),
    }
}

/// A row-major matrix operand: the address of element (0, 0), the row stride `ld` in elements,
/// and, in a batch, the distance in elements from one matrix to the next.
#[derive(Clone, Copy)]
struct Mat {
    ptr: u64,
    ld: usize,
    stride: usize,
}

// ANCHOR: gemm
/// For each of `batch` matrices:  C[m, n] = alpha · op(A)[m, k] · op(B)[k, n] + beta · C,
/// all row-major with the row strides of `Mat`. `a_t`: A is stored [k, m] and used transposed,
/// so op(A)[i, p] = a[p·lda + i]; `b_t`: B is stored [n, k], op(B)[p, j] = b[j·ldb + p]. A and B
/// are of type `x`, C of `c_type`; the sums run in f32.
///
/// cuBLAS is column-major. A row-major matrix with row stride ld is, in the same memory, the
/// column-major matrix of its transpose with leading dimension ld. So the memory of C is
/// column-major Cᵀ [n, m] (ldc), and we ask cuBLAS for
///
///   Cᵀ = op(B)ᵀ · op(A)ᵀ        (cuBLAS's m, n, k = our n, m, k)
///
/// with B's memory as cuBLAS's first operand and A's as its second:
/// - B not transposed: B's memory is column-major Bᵀ [n, k], which is op(B)ᵀ: OP_N, ld = ldb.
///   B transposed (stored [n, k]): its memory is column-major [k, n] = op(B); we need its
///   transpose: OP_T, ld = ldb.
/// - A not transposed: A's memory is column-major Aᵀ [k, m], which is op(A)ᵀ: OP_N, ld = lda.
///   A transposed (stored [k, m]): its memory is column-major [m, k] = op(A): OP_T, ld = lda.
///
/// So the flags are (b_t, a_t) in that order, and every leading dimension is the row stride.
#[allow(clippy::too_many_arguments)]
fn gemm(
    gpu: &Exclusive,
    x: DType,
    c_type: DType,
    c: Mat,
    a: Mat,
    a_t: bool,
    b: Mat,
    b_t: bool,
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    beta: f32,
    batch: usize,
) {
    assert!(m > 0 && k > 0 && n > 0 && batch > 0, "gemm of an empty matrix");
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let handle = *gpu.blas().handle();
    let (alpha, beta) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
    let (a_ptr, b_ptr, c_ptr) = (a.ptr as *const c_void, b.ptr as *const c_void, c.ptr as *mut c_void);
    let compute = cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
    // SAFETY: the calling op checked that every view holds the matrices described (extent from
    // m, k, n, the lds and the batch strides); alpha and beta are host f32 (pointer mode host, the
    // default; f32 scalars for CUBLAS_COMPUTE_32F) and live across the call, which reads them
    // before it returns. The handle's stream is the GPU's one stream.
    let result = unsafe {
        if batch == 1 {
            cublas::gemm_ex(
                handle,
                op(b_t),
                op(a_t),
                int(n),
                int(m),
                int(k),
                alpha,
                b_ptr,
                cuda_type(x),
                int(b.ld),
                a_ptr,
                cuda_type(x),
                int(a.ld),
                beta,
                c_ptr,
                cuda_type(c_type),
                int(c.ld),
                compute,
                algo,
            )
        } else {
            cublas::gemm_strided_batched_ex(
                handle,
                op(b_t),
                op(a_t),
                int(n),
                int(m),
                int(k),
                alpha,
                b_ptr,
                cuda_type(x),
                int(b.ld),
                long(b.stride),
                a_ptr,
                cuda_type(x),
                int(a.ld),
                long(a.stride),
                beta,
                c_ptr,
                cuda_type(c_type),
                int(c.ld),
                long(c.stride),
                int(batch),
                compute,
                algo,
            )
        }
    };
    gpu.record("a cuBLAS matmul", result);
}
// ANCHOR_END: gemm

/// C[m, n] (+)= op(A)[m, k] · op(B)[k, n], all row-major and contiguous. `a_t`: A is stored as
/// [k, m] and used transposed; `b_t`: B is stored as [n, k] and used transposed. A and B have
/// the same dtype (X); C is X or F32. Accumulates when `accumulate`, else overwrites.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: DevViewMut<'_>,
    a: DevView<'_>,
    b: DevView<'_>,
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
    accumulate: bool,
) {
    let x = activation_type("matmul", &[a.dtype(), b.dtype()]);
    assert!(c.dtype() == x || c.dtype() == DType::F32, "matmul: C must be {x} or f32, not {}", c.dtype());
    assert_len("matmul", "A", a.len(), m * k);
    assert_len("matmul", "B", b.len(), k * n);
    assert_len("matmul", "C", c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: C = 0, or C unchanged.
        if !accumulate {
            zero(c);
        }
        return;
    }
    // Contiguous row-major: the row stride is the stored width.
    let a_mat = Mat { ptr: a.ptr(), ld: if a_t { m } else { k }, stride: 0 };
    let b_mat = Mat { ptr: b.ptr(), ld: if b_t { k } else { n }, stride: 0 };
    let c_mat = Mat { ptr: c.ptr(), ld: n, stride: 0 };
    let beta = if accumulate { 1.0 } else { 0.0 }; // beta 0: cuBLAS does not read C (NaN-safe)
    gemm(&c.gpu().exclusive(), x, c.dtype(), c_mat, a_mat, a_t, b_mat, b_t, (m, k, n), 1.0, beta, 1);
}

// ANCHOR: linear_forward
/// out [BT, C_out] = inp [BT, C_in] @ weight [C_in, C_out] + bias [C_out]. All X.
///
/// With a bias, one cuBLASLt matmul whose epilogue adds the bias to the f32 sums before they are
/// rounded to X: one rounding, as on the CPU (which starts out as the bias and accumulates into
/// it), and no separate pass over out. Without, a plain cuBLAS matmul.
pub fn linear_forward(
    out: DevViewMut<'_>,
    inp: DevView<'_>,
    weight: DevView<'_>,
    bias: Option<DevView<'_>>,
    bt: usize,
    c_in: usize,
    c_out: usize,
) {
    let op = "linear_forward";
    let mut dtypes = vec![out.dtype(), inp.dtype(), weight.dtype()];
    dtypes.extend(bias.map(|b| b.dtype()));
    let x = activation_type(op, &dtypes);
    assert_len(op, "out", out.len(), bt * c_out);
    assert_len(op, "inp", inp.len(), bt * c_in);
    assert_len(op, "weight", weight.len(), c_in * c_out);
    let Some(bias) = bias else {
        return matmul(out, inp, weight, bt, c_in, c_out, false, false, false);
    };
    assert_len(op, "bias", bias.len(), c_out);
    if bt == 0 || c_out == 0 {
        return;
    }
    let gpu = out.gpu().exclusive();
    // One cuBLASLt matmul that adds the bias as it writes out (c_in = 0, an empty sum, has none).
    if c_in > 0
        && lt::linear_epilogue(&gpu, x, out.ptr(), None, inp.ptr(), weight.ptr(), bias.ptr(), bt, c_in, c_out)
            == lt::Queued::Yes
    {
        return;
    }
    // Without an epilogue: out = bias in every row, then out += inp @ weight.
    let mut out = out;
    broadcast_rows(out.reborrow(), bias, bt, c_out);
    matmul(out, inp, weight, bt, c_in, c_out, false, false, true);
}
// ANCHOR_END: linear_forward

/// out [rows, cols] = bias [cols] in every row. X.
fn broadcast_rows(out: DevViewMut<'_>, bias: DevView<'_>, rows: usize, cols: usize) {
    let x = activation_type("broadcast_rows", &[out.dtype(), bias.dtype()]);
    let args = [Ptr(out.ptr()), Ptr(bias.ptr()), Long(long(rows)), Int(int(cols))];
    launch(&out.gpu().exclusive(), &ELEMENTWISE, for_x!("broadcast_rows", x), per_element(rows * cols), &args);
}

// ANCHOR: linear_gelu_forward
/// pre_gelu [BT, C_out] = inp [BT, C_in] @ weight [C_in, C_out] + bias [C_out];
/// out [BT, C_out] = gelu(pre_gelu) (tanh form). All X. The MLP's first half: pre_gelu is what
/// GELU's backward needs.
///
/// In bf16, one cuBLASLt matmul whose epilogue adds the bias, writes the sum to pre_gelu, and
/// writes its GELU to out. cuBLASLt needs the leading dimension of pre_gelu (C_out, see
/// `lt::linear_epilogue`) to be a multiple of 8; when it is not (never for GPT-2's 4C = 3072, but
/// a small test model can have any width), when cuBLASLt has no kernel for the alignments, and in
/// f32, it is `linear_forward` then `gelu_forward`: the same values, except that in bf16 the fused
/// GELU reads the f32 sum where the separate kernel reads it rounded to bf16 (a difference in the
/// last bit of some outputs).
#[allow(clippy::too_many_arguments)]
pub fn linear_gelu_forward(
    out: DevViewMut<'_>,
    mut pre_gelu: DevViewMut<'_>,
    inp: DevView<'_>,
    weight: DevView<'_>,
    bias: DevView<'_>,
    bt: usize,
    c_in: usize,
    c_out: usize,
) {
    let op = "linear_gelu_forward";
    let x = activation_type(op, &[out.dtype(), pre_gelu.dtype(), inp.dtype(), weight.dtype(), bias.dtype()]);
    assert_len(op, "out", out.len(), bt * c_out);
    assert_len(op, "pre_gelu", pre_gelu.len(), bt * c_out);
    assert_len(op, "inp", inp.len(), bt * c_in);
    assert_len(op, "weight", weight.len(), c_in * c_out);
    assert_len(op, "bias", bias.len(), c_out);
    if bt == 0 || c_out == 0 {
        return;
    }
    // Fused in bf16 only. cuBLASLt documents its GELU as the same tanh formula, but not its
    // accuracy: where it uses a fast tanh, the difference (up to ~1e-4) would be visible against
    // the CPU in f32, and nowhere against bf16's own rounding (~4e-3).
    if x == DType::BF16 && c_in > 0 && c_out.is_multiple_of(8) {
        let (gpu, aux) = (out.gpu().exclusive(), Some(pre_gelu.ptr()));
        let queued = lt::linear_epilogue(&gpu, x, out.ptr(), aux, inp.ptr(), weight.ptr(), bias.ptr(), bt, c_in, c_out);
        if queued == lt::Queued::Yes {
            return;
        }
    }
    linear_forward(pre_gelu.reborrow(), inp, weight, Some(bias), bt, c_in, c_out);
    gelu_forward(out, pre_gelu.as_view());
}
// ANCHOR_END: linear_gelu_forward

// ANCHOR: linear_backward
/// dinp [BT, C_in] += dout @ weight^T (X);  dweight [C_in, C_out] += inp^T @ dout (F32);
/// dbias [C_out] += column sums of dout (F32).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dinp: Option<DevViewMut<'_>>,
    dweight: DevViewMut<'_>,
    dbias: Option<DevViewMut<'_>>,
    dout: DevView<'_>,
    inp: DevView<'_>,
    weight: DevView<'_>,
    bt: usize,
    c_in: usize,
    c_out: usize,
) {
    let op = "linear_backward";
    let mut dtypes = vec![dout.dtype(), inp.dtype(), weight.dtype()];
    dtypes.extend(dinp.as_ref().map(|d| d.dtype()));
    let x = activation_type(op, &dtypes);
    assert_f32(op, "dweight", dweight.dtype());
    assert_len(op, "dout", dout.len(), bt * c_out);
    if let Some(dbias) = &dbias {
        assert_f32(op, "dbias", dbias.dtype());
        assert_len(op, "dbias", dbias.len(), c_out);
    }
    // (matmul checks the other lengths.)
    // dinp [bt, c_in] = dout [bt, c_out] · weightᵀ, weight stored [c_in, c_out] = [n, k].
    if let Some(dinp) = dinp {
        matmul(dinp, dout, weight, bt, c_out, c_in, false, true, true);
    }
    // dweight [c_in, c_out] = inpᵀ · dout, inp stored [bt, c_in] = [k, m].
    matmul(dweight, inp, dout, c_in, bt, c_out, true, false, true);
    if let Some(dbias) = dbias {
        let gpu = dbias.gpu().exclusive();
        let (chunks, chunk) = column_chunks(bt);
        let partials = gpu.scratch(chunks * c_out, DType::F32);
        let args = [Ptr(partials.ptr()), Ptr(dout.ptr()), Int(int(bt)), Int(int(c_out)), Int(int(chunk))];
        launch(&gpu, &REDUCE, for_x!("column_sum_partial", x), per_32_columns_and_chunk(c_out, chunks), &args);
        add_column_partials(&gpu, dbias.ptr(), partials.ptr(), chunks, c_out);
    }
}
// ANCHOR_END: linear_backward

// ---------------------------------------------------------------------------------------------
// Embedding, LayerNorm.

/// out [BT, C] (X) = wte[token] + wpe[t]; wte [Vp, C], wpe [T_max, C] in X.
pub fn embedding_forward(
    out: DevViewMut<'_>,
    tokens: &[u32],
    wte: DevView<'_>,
    wpe: DevView<'_>,
    t_len: usize,
    c: usize,
) {
    let op = "embedding_forward";
    let x = activation_type(op, &[out.dtype(), wte.dtype(), wpe.dtype()]);
    let bt = tokens.len();
    assert!(
        t_len > 0 && c > 0 && bt.is_multiple_of(t_len),
        "{op}: {bt} tokens is not a whole number of rows of {t_len}"
    );
    assert_len(op, "out", out.len(), bt * c);
    assert!(wte.len().is_multiple_of(c), "{op}: wte of {} is not rows of {c}", wte.len());
    assert!(wpe.len() >= t_len * c, "{op}: wpe of {} has fewer than {t_len} rows of {c}", wpe.len());
    let gpu = out.gpu().exclusive();
    let ids = upload_tokens(op, &gpu, tokens, wte.len() / c);
    let args =
        [Ptr(out.ptr()), Ptr(ids.ptr()), Ptr(wte.ptr()), Ptr(wpe.ptr()), Long(long(bt)), Int(int(t_len)), Int(int(c))];
    launch(&gpu, &EMBEDDING, for_x!("embedding_forward", x), per_element(bt * c), &args);
}

/// dwte[token] += dout row; dwpe[t] += dout row. dwte, dwpe F32; dout X.
///
/// dwpe is deterministic (one thread per element, summing over b in order); dwte uses atomicAdd,
/// so the order of the additions to a repeated token's row, and its last bits, vary run to run.
pub fn embedding_backward(
    dwte: DevViewMut<'_>,
    dwpe: DevViewMut<'_>,
    dout: DevView<'_>,
    tokens: &[u32],
    t_len: usize,
    c: usize,
) {
    let op = "embedding_backward";
    let x = activation_type(op, &[dout.dtype()]);
    assert_f32(op, "dwte", dwte.dtype());
    assert_f32(op, "dwpe", dwpe.dtype());
    let bt = tokens.len();
    assert!(
        t_len > 0 && c > 0 && bt.is_multiple_of(t_len),
        "{op}: {bt} tokens is not a whole number of rows of {t_len}"
    );
    assert_len(op, "dout", dout.len(), bt * c);
    assert!(dwte.len().is_multiple_of(c), "{op}: dwte of {} is not rows of {c}", dwte.len());
    assert!(dwpe.len() >= t_len * c, "{op}: dwpe of {} has fewer than {t_len} rows of {c}", dwpe.len());
    let gpu = dout.gpu().exclusive();
    let ids = upload_tokens(op, &gpu, tokens, dwte.len() / c);
    let b = bt / t_len;
    let args = [Ptr(dwpe.ptr()), Ptr(dout.ptr()), Int(int(b)), Int(int(t_len)), Int(int(c))];
    launch(&gpu, &EMBEDDING, for_x!("embedding_backward_wpe", x), per_element(t_len * c), &args);
    let args = [Ptr(dwte.ptr()), Ptr(dout.ptr()), Ptr(ids.ptr()), Long(long(bt)), Int(int(c))];
    launch(&gpu, &EMBEDDING, for_x!("embedding_backward_wte", x), per_element(bt * c), &args);
}

/// out (X), mean, rstd (F32, [rows]); inp, weight, bias X. eps 1e-5, biased variance.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: DevViewMut<'_>,
    mean: DevViewMut<'_>,
    rstd: DevViewMut<'_>,
    inp: DevView<'_>,
    weight: DevView<'_>,
    bias: DevView<'_>,
    c: usize,
) {
    let op = "layernorm_forward";
    let x = activation_type(op, &[out.dtype(), inp.dtype(), weight.dtype(), bias.dtype()]);
    assert!(c > 0 && inp.len().is_multiple_of(c), "{op}: input of {} is not rows of {c}", inp.len());
    let rows = inp.len() / c;
    assert_len(op, "out", out.len(), rows * c);
    assert_len(op, "weight", weight.len(), c);
    assert_len(op, "bias", bias.len(), c);
    for (name, stat) in [("mean", &mean), ("rstd", &rstd)] {
        assert_f32(op, name, stat.dtype());
        assert_len(op, name, stat.len(), rows);
    }
    let args = [
        Ptr(out.ptr()),
        Ptr(mean.ptr()),
        Ptr(rstd.ptr()),
        Ptr(inp.ptr()),
        Ptr(weight.ptr()),
        Ptr(bias.ptr()),
        Int(int(rows)),
        Int(int(c)),
    ];
    launch(&out.gpu().exclusive(), &LAYERNORM, for_x!("layernorm_forward", x), warp_per_row(rows), &args);
}

/// dinp (X) +=, dweight, dbias (F32) +=; dout, inp, weight X; mean, rstd F32.
///
/// Two kernels: the input gradient (one warp per row), and the parameter gradients (column sums
/// over rows, in a fixed order: deterministic).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: DevViewMut<'_>,
    dweight: DevViewMut<'_>,
    dbias: DevViewMut<'_>,
    dout: DevView<'_>,
    inp: DevView<'_>,
    weight: DevView<'_>,
    mean: DevView<'_>,
    rstd: DevView<'_>,
    c: usize,
) {
    let op = "layernorm_backward";
    let x = activation_type(op, &[dinp.dtype(), dout.dtype(), inp.dtype(), weight.dtype()]);
    assert!(c > 0 && inp.len().is_multiple_of(c), "{op}: input of {} is not rows of {c}", inp.len());
    let rows = inp.len() / c;
    assert_len(op, "dinp", dinp.len(), rows * c);
    assert_len(op, "dout", dout.len(), rows * c);
    assert_len(op, "weight", weight.len(), c);
    for (name, dtype, len, expected) in [
        ("dweight", dweight.dtype(), dweight.len(), c),
        ("dbias", dbias.dtype(), dbias.len(), c),
        ("mean", mean.dtype(), mean.len(), rows),
        ("rstd", rstd.dtype(), rstd.len(), rows),
    ] {
        assert_f32(op, name, dtype);
        assert_len(op, name, len, expected);
    }
    let gpu = dinp.gpu().exclusive();
    let args = [
        Ptr(dinp.ptr()),
        Ptr(dout.ptr()),
        Ptr(inp.ptr()),
        Ptr(weight.ptr()),
        Ptr(mean.ptr()),
        Ptr(rstd.ptr()),
        Int(int(rows)),
        Int(int(c)),
    ];
    launch(&gpu, &LAYERNORM, for_x!("layernorm_backward_input", x), warp_per_row(rows), &args);
    let (chunks, chunk) = column_chunks(rows);
    let partials = gpu.scratch(2 * chunks * c, DType::F32); // dweight's [chunks, C], then dbias's
    let args = [
        Ptr(partials.ptr()),
        Ptr(dout.ptr()),
        Ptr(inp.ptr()),
        Ptr(mean.ptr()),
        Ptr(rstd.ptr()),
        Int(int(rows)),
        Int(int(c)),
        Int(int(chunk)),
    ];
    let cfg = per_32_columns_and_chunk(c, chunks);
    launch(&gpu, &LAYERNORM, for_x!("layernorm_backward_params_partial", x), cfg, &args);
    add_column_partials(&gpu, dweight.ptr(), partials.ptr(), chunks, c);
    add_column_partials(&gpu, dbias.ptr(), partials.ptr() + (chunks * c * 4) as u64, chunks, c);
}

// ---------------------------------------------------------------------------------------------
// Attention.

/// The shapes of attention: batch rows, time, channels, heads, head size.
struct AttentionShape {
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    hs: usize,
}

impl AttentionShape {
    fn new(op: &str, qkv_len: usize, t: usize, c: usize, h: usize) -> AttentionShape {
        assert!(t > 0 && h > 0 && c > 0 && c.is_multiple_of(h), "{op}: C = {c} is not a multiple of H = {h}");
        assert!(qkv_len.is_multiple_of(t * 3 * c), "{op}: qkv of {qkv_len} is not rows of T x 3C = {t} x {}", 3 * c);
        AttentionShape { b: qkv_len / (t * 3 * c), t, c, h, hs: c / h }
    }

    /// Byte address of element `index` of a view of type `x` starting at `ptr`.
    fn at(ptr: u64, index: usize, x: DType) -> u64 {
        ptr + (index * x.size()) as u64
    }

    /// Head h (for h in the batch) of q, k or v (`part` 0, 1, 2) of batch row `b`, in qkv
    /// [B, T, 3C]: a [T, hs] matrix at b·T·3C + part·C + h·hs, row stride 3C, and hs from one
    /// head to the next.
    fn qkv_heads(&self, qkv: u64, x: DType, b: usize, part: usize) -> Mat {
        let offset = b * self.t * 3 * self.c + part * self.c;
        Mat { ptr: Self::at(qkv, offset, x), ld: 3 * self.c, stride: self.hs }
    }

    /// Head h of batch row b in out [B, T, C] (or dout): [T, hs] at b·T·C + h·hs, row stride C.
    fn out_heads(&self, out: u64, x: DType, b: usize) -> Mat {
        Mat { ptr: Self::at(out, b * self.t * self.c, x), ld: self.c, stride: self.hs }
    }

    /// Head h of batch row b in att [B, H, T, T] (or a scratch [H, T, T] when `b` is 0): a
    /// [T, T] matrix at (b·H + h)·T·T, row stride T.
    fn att_heads(&self, att: u64, x: DType, b: usize) -> Mat {
        Mat { ptr: Self::at(att, b * self.h * self.t * self.t, x), ld: self.t, stride: self.t * self.t }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.hs as f32).sqrt()
    }
}

// ANCHOR: attention_forward
/// Causal self-attention. qkv [B, T, 3C] -> out [B, T, C]; att [B, H, T, T] keeps the
/// probabilities (zero above the diagonal). All X. B = qkv.len() / (T · 3C).
///
/// For each batch row b, two cuBLAS calls batched over the H heads read the heads in place
/// (strided views of qkv: no permutation copies), with a softmax kernel between them:
///
///   att_h = Q_h · K_hᵀ / sqrt(hs)          [T, T]   (matmul, scale as alpha)
///   att_h = causal softmax of each row     (kernel: zero above the diagonal)
///   out_h = att_h · V_h                    [T, hs]  (matmul, written into out's columns of h)
///
/// The first matmul computes the whole T x T square, the masked half too, which the softmax
/// overwrites with zeros: twice the work of a fused ("flash") kernel, which would also never
/// store att. Simple first.
pub fn attention_forward(
    out: DevViewMut<'_>,
    att: DevViewMut<'_>,
    qkv: DevView<'_>,
    t_len: usize,
    c: usize,
    n_head: usize,
) {
    let op = "attention_forward";
    let x = activation_type(op, &[out.dtype(), att.dtype(), qkv.dtype()]);
    let s = AttentionShape::new(op, qkv.len(), t_len, c, n_head);
    assert_len(op, "out", out.len(), s.b * s.t * s.c);
    assert_len(op, "att", att.len(), s.b * s.h * s.t * s.t);
    let gpu = out.gpu().exclusive();
    let (t, hs) = (s.t, s.hs);
    for b in 0..s.b {
        // scores [T, T] = scale · Q [T, hs] · Kᵀ, K stored [T, hs] = [n, k]: b_t.
        let (q, k) = (s.qkv_heads(qkv.ptr(), x, b, 0), s.qkv_heads(qkv.ptr(), x, b, 1));
        let scores = s.att_heads(att.ptr(), x, b);
        gemm(&gpu, x, x, scores, q, false, k, true, (t, hs, t), s.scale(), 0.0, s.h);
    }
    let rows = s.b * s.h * s.t;
    let args = [Ptr(att.ptr()), Long(long(rows)), Int(int(t))];
    launch(&gpu, &ATTENTION, for_x!("attention_softmax", x), warp_per_row(rows), &args);
    for b in 0..s.b {
        // out_h [T, hs] = att [T, T] · V [T, hs].
        let (probs, v) = (s.att_heads(att.ptr(), x, b), s.qkv_heads(qkv.ptr(), x, b, 2));
        let y = s.out_heads(out.ptr(), x, b);
        gemm(&gpu, x, x, y, probs, false, v, false, (t, t, hs), 1.0, 0.0, s.h);
    }
}
// ANCHOR_END: attention_forward

// ANCHOR: attention_backward
/// dqkv [B, T, 3C] += the gradient of attention_forward, given dout [B, T, C]. All X.
///
/// For each batch row b, batched over the heads (dS is a scratch [H, T, T], reused for every b):
///
///   dS_h  = dY_h · V_hᵀ                          [T, T]   (matmul: d att)
///   dV_h += att_hᵀ · dY_h                        [T, hs]
///   dS_h  = att ⊙ (dS − rowsum(att ⊙ dS))        (kernel: softmax backward, zero above diagonal)
///   dQ_h += dS_h · K_h / sqrt(hs)                [T, hs]
///   dK_h += dS_hᵀ · Q_h / sqrt(hs)               [T, hs]
///
/// The scratch is the GPU's kept working memory (`Gpu::scratch`): no allocation per call.
pub fn attention_backward(
    dqkv: DevViewMut<'_>,
    dout: DevView<'_>,
    qkv: DevView<'_>,
    att: DevView<'_>,
    t_len: usize,
    c: usize,
    n_head: usize,
) {
    let op = "attention_backward";
    let x = activation_type(op, &[dqkv.dtype(), dout.dtype(), qkv.dtype(), att.dtype()]);
    let s = AttentionShape::new(op, qkv.len(), t_len, c, n_head);
    assert_len(op, "dqkv", dqkv.len(), qkv.len());
    assert_len(op, "dout", dout.len(), s.b * s.t * s.c);
    assert_len(op, "att", att.len(), s.b * s.h * s.t * s.t);
    let gpu = dqkv.gpu().exclusive();
    let scratch = gpu.scratch(s.h * s.t * s.t, x);
    let (t, hs) = (s.t, s.hs);
    let ds = s.att_heads(scratch.ptr(), x, 0);
    for b in 0..s.b {
        let (q, k, v) =
            (s.qkv_heads(qkv.ptr(), x, b, 0), s.qkv_heads(qkv.ptr(), x, b, 1), s.qkv_heads(qkv.ptr(), x, b, 2));
        let (dq, dk, dv) =
            (s.qkv_heads(dqkv.ptr(), x, b, 0), s.qkv_heads(dqkv.ptr(), x, b, 1), s.qkv_heads(dqkv.ptr(), x, b, 2));
        let dy = s.out_heads(dout.ptr(), x, b);
        let probs = s.att_heads(att.ptr(), x, b);
        // d att [T, T] = dY [T, hs] · Vᵀ, V stored [T, hs] = [n, k]: b_t.
        gemm(&gpu, x, x, ds, dy, false, v, true, (t, hs, t), 1.0, 0.0, s.h);
        // dV [T, hs] += attᵀ · dY, att stored [t, u] = [k, m]: a_t.
        gemm(&gpu, x, x, dv, probs, true, dy, false, (t, t, hs), 1.0, 1.0, s.h);
        let rows = s.h * s.t;
        let args = [Ptr(ds.ptr), Ptr(probs.ptr), Long(long(rows)), Int(int(t))];
        launch(&gpu, &ATTENTION, for_x!("attention_softmax_backward", x), warp_per_row(rows), &args);
        // dQ [T, hs] += scale · dS [T, T] · K [T, hs].
        gemm(&gpu, x, x, dq, ds, false, k, false, (t, t, hs), s.scale(), 1.0, s.h);
        // dK [T, hs] += scale · dSᵀ · Q, dS stored [t, u] = [k, m]: a_t.
        gemm(&gpu, x, x, dk, ds, true, q, false, (t, t, hs), s.scale(), 1.0, s.h);
    }
}
// ANCHOR_END: attention_backward

// ---------------------------------------------------------------------------------------------
// Elementwise.

// ANCHOR: gelu_forward
/// out = gelu(inp), tanh approximation. X.
pub fn gelu_forward(out: DevViewMut<'_>, inp: DevView<'_>) {
    let x = activation_type("gelu_forward", &[out.dtype(), inp.dtype()]);
    assert_len("gelu_forward", "out", out.len(), inp.len());
    let args = [Ptr(out.ptr()), Ptr(inp.ptr()), Long(long(inp.len()))];
    launch(&out.gpu().exclusive(), &GELU, for_x!("gelu_forward", x), per_element(inp.len()), &args);
}
// ANCHOR_END: gelu_forward

/// dinp += gelu'(inp) · dout. X.
pub fn gelu_backward(dinp: DevViewMut<'_>, inp: DevView<'_>, dout: DevView<'_>) {
    let x = activation_type("gelu_backward", &[dinp.dtype(), inp.dtype(), dout.dtype()]);
    assert_len("gelu_backward", "dinp", dinp.len(), inp.len());
    assert_len("gelu_backward", "dout", dout.len(), inp.len());
    let args = [Ptr(dinp.ptr()), Ptr(inp.ptr()), Ptr(dout.ptr()), Long(long(inp.len()))];
    launch(&dinp.gpu().exclusive(), &GELU, for_x!("gelu_backward", x), per_element(inp.len()), &args);
}

/// out = a + b. X.
pub fn residual_forward(out: DevViewMut<'_>, a: DevView<'_>, b: DevView<'_>) {
    let x = activation_type("residual_forward", &[out.dtype(), a.dtype(), b.dtype()]);
    assert_len("residual_forward", "a", a.len(), out.len());
    assert_len("residual_forward", "b", b.len(), out.len());
    let args = [Ptr(out.ptr()), Ptr(a.ptr()), Ptr(b.ptr()), Long(long(out.len()))];
    launch(&out.gpu().exclusive(), &RESIDUAL, for_x!("residual_forward", x), per_element(out.len()), &args);
}

// ---------------------------------------------------------------------------------------------
// Loss.

/// Threads per block of the softmax over the vocabulary (one block per row).
const SOFTMAX_BLOCK: u32 = 512;

/// Per row of `vp`: logits -> probabilities in place (only the first `v` columns are real: the
/// padding columns get probability 0), losses[row] = -ln p[target]. logits X, losses F32.
pub fn softmax_cross_entropy_forward(
    logits_to_probs: DevViewMut<'_>,
    losses: DevViewMut<'_>,
    targets: &[u32],
    v: usize,
    vp: usize,
) {
    let op = "softmax_cross_entropy_forward";
    let x = activation_type(op, &[logits_to_probs.dtype()]);
    assert!(0 < v && v <= vp, "{op}: need 0 < V <= Vp, got V = {v}, Vp = {vp}");
    let n = targets.len();
    assert_len(op, "logits", logits_to_probs.len(), n * vp);
    assert_f32(op, "losses", losses.dtype());
    assert_len(op, "losses", losses.len(), n);
    let gpu = logits_to_probs.gpu().exclusive();
    let ids = upload_tokens(op, &gpu, targets, v);
    let cfg = LaunchConfig { grid_dim: (grid_size(n), 1, 1), block_dim: (SOFTMAX_BLOCK, 1, 1), shared_mem_bytes: 0 };
    let args = [Ptr(logits_to_probs.ptr()), Ptr(losses.ptr()), Ptr(ids.ptr()), Int(int(v)), Int(int(vp))];
    launch(&gpu, &SOFTMAX_CROSS_ENTROPY, for_x!("softmax_cross_entropy_forward", x), cfg, &args);
}

/// In place: dlogits = dloss · (probs - onehot(target)). X.
pub fn softmax_cross_entropy_backward(probs_to_dlogits: DevViewMut<'_>, targets: &[u32], dloss: f32, vp: usize) {
    let op = "softmax_cross_entropy_backward";
    let x = activation_type(op, &[probs_to_dlogits.dtype()]);
    let n = targets.len();
    assert_len(op, "probs", probs_to_dlogits.len(), n * vp);
    let gpu = probs_to_dlogits.gpu().exclusive();
    let ids = upload_tokens(op, &gpu, targets, vp);
    let args = [Ptr(probs_to_dlogits.ptr()), Ptr(ids.ptr()), Float(dloss), Long(long(n)), Int(int(vp))];
    launch(&gpu, &SOFTMAX_CROSS_ENTROPY, for_x!("softmax_cross_entropy_backward", x), per_element(n * vp), &args);
}

// ---------------------------------------------------------------------------------------------
// Optimizer.

/// The CPU's `adamw_update`, on F32 params, grads, m, v; and, when `params_copy` is given (a
/// BF16 view of the same length), writes the updated parameters into it too (the bf16 copy
/// that forward and backward read).
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    params: DevViewMut<'_>,
    params_copy: Option<DevViewMut<'_>>,
    grads: DevView<'_>,
    m: DevViewMut<'_>,
    v: DevViewMut<'_>,
    cfg: crate::ops::adamw::AdamWConfig,
    lr: f32,
    weight_decay: f32,
    grad_scale: f32,
    t: u64,
) {
    let op = "adamw_update";
    assert!(t >= 1, "AdamW steps are numbered from 1");
    let n = params.len();
    for (name, dtype, len) in
        [("grads", grads.dtype(), grads.len()), ("m", m.dtype(), m.len()), ("v", v.dtype(), v.len())]
    {
        assert_f32(op, name, dtype);
        assert_len(op, name, len, n);
    }
    assert_f32(op, "params", params.dtype());
    if let Some(copy) = &params_copy {
        assert_eq!(copy.dtype(), DType::BF16, "{op}: params_copy must be bf16");
        assert_len(op, "params_copy", copy.len(), n);
    }
    // The bias corrections, exactly as the CPU computes them: in f64, rounded to f32.
    let correction1 = (1.0 - (cfg.beta1 as f64).powf(t as f64)) as f32;
    let correction2 = (1.0 - (cfg.beta2 as f64).powf(t as f64)) as f32;
    let args = [
        Ptr(params.ptr()),
        Ptr(params_copy.as_ref().map_or(0, |copy| copy.ptr())), // null: no copy
        Ptr(grads.ptr()),
        Ptr(m.ptr()),
        Ptr(v.ptr()),
        Long(long(n)),
        Float(cfg.beta1),
        Float(cfg.beta2),
        Float(cfg.eps),
        Float(lr),
        Float(weight_decay),
        Float(grad_scale),
        Float(correction1),
        Float(correction2),
    ];
    launch(&params.gpu().exclusive(), &ADAMW, "adamw_update", per_element(n), &args);
}

/// Blocks of the first pass of `global_norm`: fixed, so the order of the sum is too.
const NORM_BLOCKS: usize = 256;

/// sqrt(sum of squares) of an F32 view, summed in f64 or in a fixed tree (deterministic).
/// Reads the result back, so it waits for the queued work.
///
/// Two kernels: 256 blocks each sum the squares of a fixed strided subset into an f64 partial;
/// one block sums the partials and writes the square root as f32.
pub fn global_norm(grads: DevView<'_>) -> Result<f32, super::CudaError> {
    assert_f32("global_norm", "grads", grads.dtype());
    let gpu = grads.gpu().exclusive();
    // NORM_BLOCKS f64 partials (two f32 slots each: allocations are 256-byte aligned, so the
    // f64s are aligned too), then the f32 result.
    let scratch = gpu.scratch(2 * NORM_BLOCKS + 1, DType::F32);
    let partials = scratch.ptr();
    let result = scratch.as_view().slice(2 * NORM_BLOCKS..2 * NORM_BLOCKS + 1);
    let cfg = LaunchConfig { grid_dim: (NORM_BLOCKS as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
    let args = [Ptr(partials), Ptr(grads.ptr()), Long(long(grads.len()))];
    launch(&gpu, &REDUCE, "sum_squares_partial", cfg, &args);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let args = [Ptr(result.ptr()), Ptr(partials), Int(int(NORM_BLOCKS))];
    launch(&gpu, &REDUCE, "sum_partials_sqrt", cfg, &args);
    Ok(result.to_vec_f32()?[0])
}

// ---------------------------------------------------------------------------------------------
// Utilities.

/// dst = src, converting between F32 and BF16 as the two views' dtypes say (either way, or the
/// same type).
pub fn convert(dst: DevViewMut<'_>, src: DevView<'_>) {
    assert_len("convert", "dst", dst.len(), src.len());
    let name = match (src.dtype(), dst.dtype()) {
        (DType::F32, DType::F32) => "convert_f32_to_f32",
        (DType::F32, DType::BF16) => "convert_f32_to_bf16",
        (DType::BF16, DType::F32) => "convert_bf16_to_f32",
        (DType::BF16, DType::BF16) => "convert_bf16_to_bf16",
        (from, to) => panic!("convert: from {from} to {to}: only f32 and bf16 convert"),
    };
    let args = [Ptr(dst.ptr()), Ptr(src.ptr()), Long(long(src.len()))];
    launch(&dst.gpu().exclusive(), &ELEMENTWISE, name, per_element(src.len()), &args);
}

/// Sets every element to zero.
pub fn zero(dst: DevViewMut<'_>) {
    let gpu = dst.gpu().exclusive();
    if dst.is_empty() {
        return;
    }
    // SAFETY: the range is the view's own; the memset is queued on the GPU's one stream, after
    // every op queued before it. All-zero bytes are 0.0 in f32 and bf16, and id 0 in u32.
    let result = unsafe {
        cudarc::driver::result::memset_d8_async(dst.ptr(), 0, dst.len() * dst.dtype().size(), gpu.stream().cu_stream())
    };
    gpu.record("zeroing device memory", result);
}
