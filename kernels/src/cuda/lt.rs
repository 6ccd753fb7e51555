//! cuBLASLt: the matmul of a linear layer with its bias (and GELU) fused into the matmul's
//! epilogue, so that the bias is added, and GELU applied, to the f32 sums while they are still in
//! registers, instead of by separate kernels reading and writing the whole output again.
//!
//! cuBLASLt is the library under cuBLAS (`cublasGemmEx` calls it): the same matmul kernels, with
//! every choice made explicit. A matmul is described by a descriptor (compute and scale types,
//! transposes, the epilogue and its pointers) and one layout per matrix (type, rows, columns,
//! leading dimension); a heuristic picks a kernel for that description, and `cublasLtMatmul` runs
//! it. Here the descriptors are made and destroyed on every call (destroyed on drop, so on every
//! error path too): a few microseconds of host work, and cuBLASLt caches the heuristic's answers.
//!
//! What NVIDIA's cuBLAS documentation says, and this file relies on
//! (<https://docs.nvidia.com/cuda/cublas/#cublasltepilogue-t> and the attribute tables after it):
//! - `CUBLASLT_EPILOGUE_BIAS` adds a bias vector "whose length must match matrix D rows", packed,
//!   "broadcast to all columns and added before applying the final postprocessing".
//! - `CUBLASLT_EPILOGUE_GELU_AUX_BIAS` adds the bias, then applies GELU, and writes GELU's input
//!   (the "auxiliary" output) to `EPILOGUE_AUX_POINTER`. Its GELU "is approximated by
//!   0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x³)))": GPT-2's GELU exactly.
//! - The auxiliary matrix has the type of D, and its leading dimension (`EPILOGUE_AUX_LD`) "must be
//!   divisible by 8 and be no less than the number of rows in the output matrix".
//! - The bias has the type of D unless `BIAS_DATA_TYPE` says otherwise (only for int8 and fp8).
//! - f32 (compute `CUBLAS_COMPUTE_32F`, scale, A, B, C and bias `CUDA_R_32F`) and bf16 (compute
//!   `CUBLAS_COMPUTE_32F`, scale `CUDA_R_32F`, A, B, C and bias `CUDA_R_16BF`) support epilogues.
//! - The heuristic assumes 256-byte aligned matrices unless told otherwise
//!   (`CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES`), and "the algo will fail if, for example, the
//!   buffers are not correctly aligned": views into the flat parameter buffer often are not, so we
//!   tell it each matrix's real alignment. No preference covers the bias and auxiliary pointers,
//!   and other users of the epilogue report failures below 16-byte alignment (Marian NMT), so we
//!   do not ask for an epilogue with a bias or auxiliary output aligned to less than 16 bytes.
//! - The workspace must be 256-byte aligned (every device allocation is); NVIDIA recommends 32 MiB
//!   on Hopper and 4 MiB before it.

use super::{DType, Exclusive, driver_error};
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUdeviceptr;
use std::ffi::c_void;
use std::sync::Arc;

/// Bytes of the workspace kept for cuBLASLt: NVIDIA's recommendation for Hopper, and more than
/// enough before it.
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLASLt handle and the workspace its matmuls use, one per [`super::Gpu`], reached through
/// [`Exclusive`] only. The workspace is its own
/// allocation, not `Gpu::scratch`: an op that holds the scratch (attention backward) could then
/// not call a fused matmul without the two overwriting each other.
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CUdeviceptr,
    /// Keeps the context alive until the workspace is freed.
    ctx: Arc<cudarc::driver::CudaContext>,
}

// SAFETY: the handle is an opaque pointer, "not tied to any particular CUDA context" (cuBLAS
// documentation, cublasLtHandle_t); it is used, like the cuBLAS handle, from whichever thread runs
// an op. Not `Sync`: one thread at a time, the one whose turn (`Gpu::exclusive`) it is, uses the
// handle and the workspace, every matmul queued on the GPU's one stream.
unsafe impl Send for Lt {}

impl Lt {
    /// Creates the handle and allocates the workspace, with `ctx` current on this thread.
    pub fn new(ctx: &Arc<cudarc::driver::CudaContext>) -> Result<Lt, super::CudaError> {
        ctx.bind_to_thread().map_err(|e| driver_error("binding the context for cuBLASLt", e))?;
        let handle = lt::create_handle().map_err(|e| super::CudaError(format!("starting cuBLASLt: {e:?}")))?;
        // SAFETY: the context is current; the allocation is freed once, in drop.
        let workspace = match unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) } {
            Ok(ptr) => ptr,
            Err(e) => {
                // SAFETY: created just above, destroyed once.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(driver_error("allocating the cuBLASLt workspace", e));
            }
        };
        Ok(Lt { handle, workspace, ctx: ctx.clone() })
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // Errors here (the context torn down at exit) have nowhere to go.
        // SAFETY: the handle and the workspace were created in `new` and are released once, here;
        // cuMemFree waits for the queued work that may still use the workspace.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
            if self.ctx.bind_to_thread().is_ok() {
                let _ = cudarc::driver::result::free_sync(self.workspace);
            }
        }
    }
}

/// An error of the fused matmul, printed as it is (it becomes the message of the next sync).
struct LtError(String);

impl std::fmt::Debug for LtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn lt_error(what: &str) -> impl FnOnce(CublasError) -> LtError + '_ {
    move |e| LtError(format!("{what}: {e:?}"))
}

// The descriptors, destroyed on drop: whichever call fails, what was created is released.

struct MatmulDesc(sys::cublasLtMatmulDesc_t);
struct Layout(sys::cublasLtMatrixLayout_t);
struct Preference(sys::cublasLtMatmulPreference_t);

impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once, here.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once, here.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once, here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

impl MatmulDesc {
    /// Sets attribute `attr` to `value`, whose type must be the attribute's C type (cuBLASLt checks
    /// the size).
    fn set<T: Copy>(&self, attr: sys::cublasLtMatmulDescAttributes_t, value: T) -> Result<(), LtError> {
        // SAFETY: the descriptor is live; cuBLASLt copies `size_of::<T>()` bytes from `value`.
        let r =
            unsafe { lt::set_matmul_desc_attribute(self.0, attr, &value as *const T as *const c_void, size_of::<T>()) };
        r.map_err(lt_error(&format!("setting {attr:?}")))
    }
}

impl Preference {
    fn set<T: Copy>(&self, attr: sys::cublasLtMatmulPreferenceAttributes_t, value: T) -> Result<(), LtError> {
        // SAFETY: as for MatmulDesc::set.
        let r =
            unsafe { lt::set_matmul_pref_attribute(self.0, attr, &value as *const T as *const c_void, size_of::<T>()) };
        r.map_err(lt_error(&format!("setting {attr:?}")))
    }
}

fn lt_type(x: DType) -> sys::cudaDataType {
    match x {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::U32 => unreachable!("no matmul of token ids"),
    }
}

/// A column-major `rows x cols` matrix of type `x` with leading dimension `ld`.
fn layout(x: DType, rows: usize, cols: usize, ld: usize) -> Result<Layout, LtError> {
    let fits = |v: usize| i32::try_from(v).unwrap_or_else(|_| panic!("{v} does not fit a 32-bit int"));
    let (rows, cols, ld) = (fits(rows), fits(cols), fits(ld));
    let l = lt::create_matrix_layout(lt_type(x), rows as u64, cols as u64, ld as i64);
    l.map(Layout).map_err(lt_error("creating a cuBLASLt matrix layout"))
}

/// The alignment of a device address, in bytes, as far as cuBLASLt asks (256 at most).
fn alignment(ptr: CUdeviceptr) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

// ANCHOR: linear_epilogue
/// Row-major  out [m, n] = inp [m, k] · weight [k, n] + bias [n], every row getting the bias;
/// with `pre_gelu`, that sum is written to pre_gelu [m, n] and out = gelu(pre_gelu) (GPT-2's tanh
/// form). All of type `x`; the sums, the bias and GELU in f32, each output rounded once to `x`.
/// Queued on the GPU's stream, or `Queued::NoKernel` where cuBLASLt has no kernel for the case
/// (the heuristic finds none, or says NOT_SUPPORTED), and the caller computes it without an
/// epilogue; the error of a failed call is recorded and reported at the next sync.
///
/// The column-major mapping is `gemm`'s (see its comment): the memory of a row-major [r, c] matrix
/// with row stride c is the column-major [c, r] matrix of its transpose, leading dimension c. So
/// out's memory is outᵀ [n, m] (ld n), and we ask cuBLASLt for
///
///   D = outᵀ = weightᵀ · inpᵀ + bias        (cuBLASLt's m, n, k = our n, m, k)
///
/// - A = weight's memory: column-major weightᵀ [n, k], ld n, not transposed (OP_N, the default).
/// - B = inp's memory: column-major inpᵀ [k, m], ld k, not transposed.
/// - D = out's memory: [n, m], ld n. C is D with beta = 0: cuBLASLt does not read it.
/// - bias: one value per row of D, that is per column of out: [n], as the layer wants.
/// - pre_gelu has out's shape, so its column-major leading dimension is n too: the epilogue needs
///   n to be a multiple of 8 (the caller checks; this asserts).
#[allow(clippy::too_many_arguments)]
pub fn linear_epilogue(
    gpu: &Exclusive,
    x: DType,
    out: u64,
    pre_gelu: Option<u64>,
    inp: u64,
    weight: u64,
    bias: u64,
    m: usize,
    k: usize,
    n: usize,
) -> Queued {
    assert!(m > 0 && k > 0 && n > 0, "linear_epilogue of an empty matrix");
    if pre_gelu.is_some() {
        assert!(n.is_multiple_of(8), "linear_epilogue: GELU's auxiliary output needs n = {n} a multiple of 8");
    }
    let what = match pre_gelu {
        Some(_) => "a cuBLASLt matmul with bias and GELU",
        None => "a cuBLASLt matmul with bias",
    };
    let shape = format!("{m}x{k} · {k}x{n} in {x}");
    match queue(gpu, x, out, pre_gelu, inp, weight, bias, (m, k, n)) {
        Ok(queued) => queued,
        Err(LtError(e)) => {
            // Recorded, and reported at the next synchronisation; nothing for the caller to redo.
            gpu.record(what, Err::<(), _>(LtError(format!("{e} ({shape})"))));
            Queued::Yes
        }
    }
}

/// Whether `linear_epilogue` queued the matmul, or found no cuBLASLt kernel for these shapes,
/// types and alignments (a small model's tensors can sit at 2-byte offsets in the flat parameter
/// buffer), in which case the caller computes the same thing without an epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    Yes,
    NoKernel,
}

#[allow(clippy::too_many_arguments)]
fn queue(
    gpu: &Exclusive,
    x: DType,
    out: u64,
    pre_gelu: Option<u64>,
    inp: u64,
    weight: u64,
    bias: u64,
    (m, k, n): (usize, usize, usize),
) -> Result<Queued, LtError> {
    use sys::cublasLtMatmulDescAttributes_t as Attr;
    use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
    if alignment(bias) < 16 || pre_gelu.is_some_and(|aux| alignment(aux) < 16) {
        return Ok(Queued::NoKernel);
    }
    let lt_ = gpu.lt();
    // f32 sums and f32 alpha, beta, in both types (no TF32: as `gemm`).
    let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
        .map(MatmulDesc)
        .map_err(lt_error("creating a cuBLASLt matmul descriptor"))?;
    // The attributes' C types: EPILOGUE uint32_t, the pointers void*, EPILOGUE_AUX_LD int64_t.
    // TRANSA and TRANSB stay at their default, CUBLAS_OP_N.
    let epilogue = match pre_gelu {
        Some(_) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
        None => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
    };
    desc.set(Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue as u32)?;
    desc.set(Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias as *const c_void)?;
    if let Some(aux) = pre_gelu {
        desc.set(Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux as *mut c_void)?;
        desc.set(Attr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, n as i64)?;
    }
    let a = layout(x, n, k, n)?; // weight
    let b = layout(x, k, m, k)?; // inp
    let d = layout(x, n, m, n)?; // out (and C)

    let pref = lt::create_matmul_pref().map(Preference).map_err(lt_error("creating a cuBLASLt preference"))?;
    pref.set(Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, WORKSPACE_BYTES as u64)?;
    pref.set(Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(weight))?;
    pref.set(Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(inp))?;
    pref.set(Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(out))?;
    pref.set(Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(out))?;

    // The first (fastest) of the kernels the heuristic finds for this description.
    // SAFETY: `result` is a plain C struct that cuBLASLt fills when it returns a count > 0.
    let mut result: sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
    let mut count = 0;
    // SAFETY: every descriptor is live; room for 1 result is asked for and given.
    let status = unsafe {
        sys::cublasLtMatmulAlgoGetHeuristic(lt_.handle, desc.0, a.0, b.0, d.0, d.0, pref.0, 1, &mut result, &mut count)
    };
    let found = heuristic_found(status, count)
        .and_then(|found| match found {
            true => heuristic_found(result.state, 1),
            false => Ok(false),
        })
        .map_err(lt_error("asking cuBLASLt for a kernel (cublasLtMatmulAlgoGetHeuristic)"))?;
    if !found {
        return Ok(Queued::NoKernel);
    }

    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the caller checked that every pointer holds the matrix its layout describes (weight
    // k·n, inp m·k, out and pre_gelu m·n, bias n elements of x); alpha and beta are host f32 (the
    // default pointer mode; f32 for scale type CUDA_R_32F) read before the call returns; the
    // workspace is this GPU's, WORKSPACE_BYTES long, and used only by work on this one stream, so
    // the next matmul cannot overwrite it while this one runs.
    let r = unsafe {
        lt::matmul(
            lt_.handle,
            desc.0,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            weight as *const c_void,
            a.0,
            inp as *const c_void,
            b.0,
            out as *const c_void,
            d.0,
            out as *mut c_void,
            d.0,
            &result.algo,
            lt_.workspace as *mut c_void,
            WORKSPACE_BYTES,
            gpu.stream().cu_stream() as sys::cudaStream_t,
        )
    };
    match r {
        Ok(()) => Ok(Queued::Yes),
        // Refused before anything was queued: the caller computes it without an epilogue.
        Err(CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => Ok(Queued::NoKernel),
        Err(e) => Err(lt_error("queuing cublasLtMatmul")(e)),
    }
}
// ANCHOR_END: linear_epilogue

/// Whether the heuristic found a kernel: `count` of them with `status` SUCCESS. NOT_SUPPORTED
/// ("no algorithm" for this description: types, epilogue, alignments) is an answer, not an
/// error: the caller's path without an epilogue, as for a count of 0.
fn heuristic_found(status: sys::cublasStatus_t, count: i32) -> Result<bool, CublasError> {
    match status {
        sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => Ok(false),
        status => status.result().map(|()| count > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_algorithm_is_the_fallback_and_other_failures_are_errors() {
        use sys::cublasStatus_t as S;
        assert_eq!(heuristic_found(S::CUBLAS_STATUS_SUCCESS, 1), Ok(true));
        assert_eq!(heuristic_found(S::CUBLAS_STATUS_SUCCESS, 0), Ok(false), "a count of 0");
        assert_eq!(heuristic_found(S::CUBLAS_STATUS_NOT_SUPPORTED, 0), Ok(false), "NOT_SUPPORTED: the same");
        assert_eq!(
            heuristic_found(S::CUBLAS_STATUS_INVALID_VALUE, 0),
            Err(CublasError(S::CUBLAS_STATUS_INVALID_VALUE))
        );
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0100 + 4), 4);
        assert_eq!(alignment(0x7f00_0000_0100 + 2), 2);
        assert_eq!(alignment(0x7f00_0000_0100 + 48), 16);
    }
}
