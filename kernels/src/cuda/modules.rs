//! The `.cu` sources, compiled by NVRTC for the GPU at hand the first time one of their kernels
//! is launched. Each source is prefixed with `common.cuh` (bf16 by hand, warp reductions), so
//! NVRTC needs no include path and no header of the CUDA toolkit.

use super::Gpu;
use cudarc::driver::CudaModule;
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use std::sync::Arc;

/// One `.cu` file and the `extern "C"` kernels it defines.
pub struct Source {
    pub file: &'static str,
    pub code: &'static str,
    pub kernels: &'static [&'static str],
}

pub const COMMON: &str = include_str!("kernels/common.cuh");

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

pub(super) fn load(gpu: &Gpu, source: &Source) -> Arc<CudaModule> {
    let ptx = compile_ptx_with_opts(full_text(source), compile_options(gpu.capability))
        .unwrap_or_else(|e| panic!("NVRTC could not compile {}: {e}", source.file));
    gpu.context().load_module(ptx).unwrap_or_else(|e| panic!("loading {} on cuda:{}: {e:?}", source.file, gpu.ordinal))
}
