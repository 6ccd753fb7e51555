//! The CUDA backend: one device, one stream, cuBLAS for the matmuls (cuBLASLt for those with a
//! fused bias or GELU), and the other ops as CUDA C kernels (the `.cu` files next to this one)
//! compiled at run time by NVRTC.
//!
//! Nothing here is linked at build time: cudarc loads `libcuda`, `libnvrtc`, `libcublas` and
//! `libcublasLt` when first asked, and panics if one is missing. So every way in goes through [`Gpu::get`], which
//! checks that each library can be loaded and that the device exists before the first real call,
//! and turns what is missing into one sentence.
//!
//! Errors of a kernel launch are not returned by each op (on the CPU the ops cannot fail, and the
//! model code is the same for both): the first one is kept, and [`Gpu::synchronize`] (which every
//! read back to the host goes through) reports it. This is how CUDA itself reports the errors of
//! asynchronous work: at the next synchronisation. The errors are kept per thread, so a thread
//! hears of its own launches' errors (a fault inside a running kernel is the exception: CUDA
//! reports it to whoever synchronises next, and every later call on the GPU fails with it).
//!
//! A `Gpu` is shared by every thread of the process; what one op uses from its first launch to
//! its last (the scratch buffers, the cuBLAS and cuBLASLt handles) is reached only through
//! [`Gpu::exclusive`], which one thread at a time holds (see [`exclusive`]).

pub mod buffer;
pub mod exclusive;
pub mod lt;
pub mod modules;
pub mod ops;
pub mod timing;

pub use buffer::{DType, DevBuffer, DevView, DevViewMut};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdeviceptr, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};
use exclusive::{FirstErrors, Held, ReentrantLock, assert_not_impl};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct CudaError(pub String);

/// Whether the CUDA driver library (`libcuda`) can be loaded. Asked once per process.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: it tries to `dlopen` each name cudarc would load and closes it again; loading the
    // driver runs only its own initialisers.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

/// The file names cudarc tries for library `name`, once each: for error messages.
pub fn library_names(name: &str) -> String {
    let mut names = cudarc::get_lib_name_candidates(name);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names.join(", ")
}

/// The number of CUDA devices: an error (never a panic) where there is no driver, 0 where there
/// is a driver but no visible GPU.
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_present() {
        return Err(CudaError("no CUDA driver is installed (libcuda.so could not be loaded)".into()));
    }
    match CudaContext::device_count() {
        Ok(n) => Ok(usize::try_from(n).unwrap_or(0)),
        Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(0),
        Err(e) => Err(driver_error("starting the driver (cuInit, cuDeviceGetCount)", e)),
    }
}

/// The libraries beyond the driver that the backend needs: NVRTC (kernels), cuBLAS and cuBLASLt
/// (matmuls).
/// The driver comes with the GPU; these come with the CUDA toolkit (or the `nvidia-*-cu12`
/// Python wheels), so a machine can have the first without the second.
fn toolkit_libraries_present() -> Result<(), CudaError> {
    // SAFETY: as for `driver_present`: a dlopen and a dlclose.
    let missing: Vec<String> = [
        ("nvrtc", unsafe { cudarc::nvrtc::sys::is_culib_present() }),
        ("cublas", unsafe { cudarc::cublas::sys::is_culib_present() }),
        ("cublasLt", unsafe { cudarc::cublaslt::sys::is_culib_present() }),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(name, _)| format!("{name} (tried {})", library_names(name)))
    .collect();
    match missing.is_empty() {
        true => Ok(()),
        false => Err(CudaError(format!(
            "the CUDA driver is here but these libraries of the CUDA toolkit are not: {}; install the \
             toolkit, or add the directory that holds them to LD_LIBRARY_PATH",
            missing.join("; ")
        ))),
    }
}

pub(crate) fn driver_error(what: &str, e: DriverError) -> CudaError {
    CudaError(format!("CUDA error while {what}: {e:?}"))
}

// ANCHOR: gpu
/// One GPU, ready to run ops: its context, the one stream every op is queued on, the kernels
/// compiled for it, and (behind a lock) what one op at a time uses.
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor): 9.0 for an H100.
    pub capability: (i32, i32),
    pub total_memory: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    /// The first error of each thread's asynchronous work, reported at its next synchronisation.
    errors: FirstErrors,
    shared: ReentrantLock<Shared>,
}

/// What an op uses from its first launch to its last, one thread at a time: a cuBLAS handle bound
/// to the stream, a cuBLASLt handle and its workspace, and two kept device buffers. Not `Sync`
/// (the buffers are `Cell`s): only the thread holding [`Gpu::exclusive`] can reach it.
struct Shared {
    blas: CudaBlas,
    lt: lt::Lt,
    /// Device scratch for token ids, which the ops take from the host (see `upload_indices`).
    indices: Cell<Kept>,
    /// Working memory of the ops that need some (attention backward, the norm), kept and grown
    /// rather than allocated per call: freeing device memory waits for the whole GPU.
    scratch: Cell<Kept>,
}

/// A device buffer kept for reuse: never freed but to grow, since a GPU, once opened, lives as
/// long as the process.
#[derive(Clone, Copy, Default)]
struct Kept {
    ptr: CUdeviceptr,
    bytes: usize,
}

/// This thread's turn on a GPU, from [`Gpu::exclusive`]: the only way to the cuBLAS handles and
/// the kept buffers, and a view of those buffers cannot outlive it. Dereferences to the [`Gpu`].
pub struct Exclusive<'g> {
    gpu: &'g Gpu,
    shared: Held<'g, Shared>,
}
// ANCHOR_END: gpu

// What the types promise: a Gpu is shared between threads (an `Arc<Gpu>` in every tensor); what
// it shares only through its lock cannot be shared any other way; and a turn stays on its thread.
const _: fn() = || {
    fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<Gpu>();
};
assert_not_impl!(Shared: Sync);
assert_not_impl!(Exclusive<'static>: Send);

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu(cuda:{} {})", self.ordinal, self.name)
    }
}

impl Gpu {
    /// The GPU with this ordinal, opened on first use and shared after that.
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>, CudaError> {
        static OPEN: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let mut open = OPEN.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(gpu) = open.get(&ordinal) {
            gpu.bind()?;
            return Ok(gpu.clone());
        }
        let gpu = Arc::new(Gpu::open(ordinal)?);
        open.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError(match count {
                0 => "the CUDA driver is installed but no GPU is visible".to_string(),
                n => format!("there is no cuda:{ordinal}: this machine has {n} GPU(s), cuda:0 to cuda:{}", n - 1),
            }));
        }
        toolkit_libraries_present()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error("creating a context", e))?;
        // One stream, so work is ordered by the order of the calls: the bookkeeping cudarc does to
        // order several streams (an event per buffer use) has nothing to do.
        // SAFETY: no buffer of this context exists yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| driver_error("creating a stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError(format!("starting cuBLAS: {e:?}")))?;
        let lt = lt::Lt::new(&ctx)?;
        let shared = Shared { blas, lt, indices: Cell::default(), scratch: Cell::default() };
        let gpu = Gpu {
            ordinal,
            name: ctx.name().unwrap_or_else(|_| "unknown GPU".into()),
            capability: ctx.compute_capability().map_err(|e| driver_error("asking the compute capability", e))?,
            total_memory: ctx.total_mem().unwrap_or(0),
            ctx,
            stream,
            functions: Mutex::new(HashMap::new()),
            errors: FirstErrors::default(),
            shared: ReentrantLock::new(shared),
        };
        for source in ops::sources() {
            gpu.load_kernels(source)?;
        }
        Ok(gpu)
    }

    /// Makes this GPU's context current on the calling thread (cuBLAS and raw driver calls act
    /// on the current context).
    pub fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(|e| driver_error("binding the context to this thread", e))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    // ANCHOR: exclusive
    /// This thread's turn on the GPU: waits while another thread has it, and is re-entrant (an op
    /// takes it, and so may an op it calls, or a caller around a sequence of ops). Every op holds
    /// it from its first launch to its last, so no other thread's launches come between them on
    /// the stream, and nothing it keeps in the scratch is overwritten or freed before its last
    /// kernel has read it.
    pub fn exclusive(&self) -> Exclusive<'_> {
        let shared = self.shared.lock();
        self.record("binding the context to this thread", self.bind());
        Exclusive { gpu: self, shared }
    }
    // ANCHOR_END: exclusive

    // ANCHOR: async_errors
    /// Keeps the first error of work queued on the stream, to report at the next sync.
    pub fn record<T, E: std::fmt::Debug>(&self, what: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.keep(|| format!("CUDA error while {what}: {e:?}"));
                None
            }
        }
    }

    /// Waits for everything queued so far; the first error of this thread's work since its last
    /// sync, if there was one.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        let sync = self.stream.synchronize();
        if let Some(first) = self.errors.take() {
            return Err(CudaError(first));
        }
        sync.map_err(|e| driver_error("running queued work", e))
    }
    // ANCHOR_END: async_errors

    // ANCHOR: function
    /// Compiles and loads every kernel of `source`.
    fn load_kernels(&self, source: &modules::Source) -> Result<(), CudaError> {
        let module = modules::load(self, source)?;
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        for &kernel in source.kernels {
            let f = module.load_function(kernel).map_err(|e| driver_error(&format!("loading kernel {kernel}"), e))?;
            functions.insert(kernel, f);
        }
        Ok(())
    }

    /// The kernel `name` of `source` (one of the `.cu` files). Every source is compiled and
    /// loaded when the GPU is opened, so that a machine that cannot run them (an NVRTC too old
    /// for this GPU, a driver too old for the NVRTC) is refused with one line up front.
    pub fn function(&self, source: &modules::Source, name: &'static str) -> CudaFunction {
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return f.clone();
        }
        // Only reachable for a source that `ops::sources` does not list: a bug.
        self.load_kernels(source).unwrap_or_else(|e| panic!("{e}"));
        let functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        functions.get(name).cloned().unwrap_or_else(|| panic!("{} does not list kernel {name}", source.file))
    }
    // ANCHOR_END: function
}

impl std::ops::Deref for Exclusive<'_> {
    type Target = Gpu;

    fn deref(&self) -> &Gpu {
        self.gpu
    }
}

impl<'g> Exclusive<'g> {
    /// The GPU, for as long as it lives (beyond this turn).
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.shared.blas
    }

    /// The cuBLASLt handle and its workspace (see [`lt`]).
    pub(crate) fn lt(&self) -> &lt::Lt {
        &self.shared.lt
    }

    /// Copies token ids to the device, into a scratch buffer the next upload reuses. Safe to
    /// reuse without waiting: the next copy is queued on the same stream, after every kernel
    /// queued before it, so it cannot overwrite ids a kernel has still to read.
    pub(crate) fn upload_indices(&self, ids: &[u32]) -> DevView<'_> {
        let ptr = self.grow(&self.shared.indices, ids.len() * 4, "token-id scratch");
        if ptr != 0 {
            // SAFETY: the scratch holds at least ids.len() u32s.
            let r = unsafe { cudarc::driver::result::memcpy_htod_async(ptr, ids, self.stream.cu_stream()) };
            self.record("copying token ids to the GPU", r);
        }
        DevView::from_raw(self.gpu, ptr, ids.len(), DType::U32)
    }

    /// `len` elements of working memory for one op. Reused by the next op that asks, which is
    /// safe for the same reason as in `upload_indices`: its work is queued after this op's, and
    /// this turn keeps other threads' work from coming between. (An op that holds the scratch
    /// must not call another op that takes it.)
    pub(crate) fn scratch(&self, len: usize, dtype: DType) -> DevViewMut<'_> {
        let ptr = self.grow(&self.shared.scratch, len * dtype.size(), "op scratch");
        DevViewMut::from_raw(self.gpu, ptr, len, dtype)
    }

    /// The address of a kept buffer of at least `bytes`, reallocated (never shrunk) when too
    /// small. 0 if allocation failed: the error is recorded and reported at the next sync.
    fn grow(&self, slot: &Cell<Kept>, bytes: usize, what: &str) -> CUdeviceptr {
        use cudarc::driver::result;
        let kept = slot.get();
        if kept.bytes >= bytes {
            return kept.ptr;
        }
        // The old buffer may still be read by queued kernels: wait before freeing it.
        let _ = self.stream.synchronize();
        let capacity = bytes.next_power_of_two().max(4096);
        // SAFETY: freed once (here, when replaced), allocated with this context current (bound
        // by `Gpu::exclusive`).
        unsafe {
            if kept.bytes > 0 {
                let _ = result::free_sync(kept.ptr);
            }
            let ptr = result::malloc_sync(capacity);
            let grown = match self.record(&format!("allocating {what}"), ptr) {
                Some(ptr) => Kept { ptr, bytes: capacity },
                None => Kept::default(),
            };
            slot.set(grown);
            grown.ptr
        }
    }
}

// ANCHOR: peak_flops
/// The GPU's peak dense throughput for matmuls in `dtype`, in FLOP/s, from NVIDIA's data
/// sheets (no sparsity); `None` for a GPU not in the table. f32 is the CUDA cores' rate: the f32
/// matmuls here ask cuBLAS for exact f32 (`CUBLAS_COMPUTE_32F`), not TF32 tensor cores.
pub fn peak_flops(name: &str, dtype: DType) -> Option<f64> {
    let name = name.to_ascii_uppercase();
    let (f32_tflops, bf16_tflops) = if name.contains("H100") && name.contains("PCIE") {
        (51.2, 756.0)
    } else if (name.contains("H100") || name.contains("H200")) && name.contains("NVL") {
        (60.0, 835.0)
    } else if name.contains("H100") || name.contains("H200") || name.contains("GH200") {
        (66.9, 989.4)
    } else if name.contains("A100") {
        (19.5, 312.0)
    } else if name.contains("L40S") {
        (91.6, 362.1)
    } else {
        return None;
    };
    match dtype {
        DType::F32 => Some(f32_tflops * 1e12),
        DType::BF16 => Some(bf16_tflops * 1e12),
        DType::U32 => None,
    }
}
// ANCHOR_END: peak_flops

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_flops_by_name() {
        assert_eq!(peak_flops("NVIDIA H100 80GB HBM3", DType::BF16), Some(989.4e12));
        assert_eq!(peak_flops("NVIDIA H100 PCIe", DType::F32), Some(51.2e12));
        assert_eq!(peak_flops("NVIDIA H100 NVL", DType::BF16), Some(835e12));
        assert_eq!(peak_flops("NVIDIA H200 NVL", DType::BF16), Some(835e12));
        assert_eq!(peak_flops("NVIDIA A100-SXM4-80GB", DType::BF16), Some(312e12));
        assert_eq!(peak_flops("Some Future GPU", DType::BF16), None);
    }
}
