//! The `.cu` sources, compiled by NVRTC for the GPU at hand when it is opened (`Gpu::get`).
//! Each source is prefixed with `common.cuh` (bf16 by hand, warp reductions), so NVRTC needs no
//! include path and no header of the CUDA toolkit.

use super::{CudaError, Gpu};
use cudarc::driver::CudaModule;
use cudarc::driver::sys::CUresult;
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use std::sync::Arc;

/// One `.cu` file and the `extern "C"` kernels it defines.
pub struct Source {
    pub file: &'static str,
    pub code: &'static str,
    pub kernels: &'static [&'static str],
}

pub const COMMON: &str = include_str!("kernels/common.cuh");

// ANCHOR: compile
/// The full text NVRTC compiles for `source`.
pub fn full_text(source: &Source) -> String {
    format!("{COMMON}\n#line 1 \"{}\"\n{}", source.file, source.code)
}

/// NVRTC's options: the GPU's own architecture, and IEEE-exact division and square root so that
/// results stay close to the CPU's (the tests compare them with tight tolerances).
pub fn compile_options(capability: (i32, i32)) -> CompileOptions {
    CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{}{}", capability.0, capability.1), "--std=c++17".into()],
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(true),
        ..Default::default()
    }
}
// ANCHOR_END: compile

/// Compiles `source` for `gpu` and loads it. Errors are the machine's, not the code's (the
/// sources compile: a test checks it): an NVRTC that does not know this GPU, or a driver older
/// than the NVRTC that wrote the PTX.
pub(super) fn load(gpu: &Gpu, source: &Source) -> Result<Arc<CudaModule>, CudaError> {
    let ptx = compile_ptx_with_opts(full_text(source), compile_options(gpu.capability)).map_err(|e| {
        CudaError(format!(
            "NVRTC could not compile {} for sm_{}{}: {e}",
            source.file, gpu.capability.0, gpu.capability.1
        ))
    })?;
    gpu.context().load_module(ptx).map_err(|e| {
        let hint = match e.0 {
            CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
                " (libnvrtc is newer than the driver: use the NVRTC of a CUDA version the driver supports)"
            }
            _ => "",
        };
        CudaError(format!("the driver could not load the kernels of {}: {e:?}{hint}", source.file))
    })
}
