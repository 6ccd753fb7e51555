//! The `.cu` sources, compiled by NVRTC for the GPU at hand when it is opened (`Gpu::get`).
//! Each source is prefixed with `common.cuh` (bf16 by hand, warp reductions), so NVRTC needs no
//! include path and no header of the CUDA toolkit.
//!
//! NVRTC writes the GPU's own machine code (a cubin for `sm_90`) when it knows the GPU, so the
//! driver loads code instead of compiling it; PTX for the newest architecture it knows otherwise,
//! which the driver compiles at load time, and can only if it is at least as new as that NVRTC.

use super::{CudaError, Gpu};
use cudarc::driver::CudaModule;
use cudarc::driver::sys::CUresult;
use cudarc::nvrtc::{Ptx, result, sys};
use std::ffi::{CString, c_int};
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

/// What NVRTC writes for a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `sm_XX` machine code: the driver loads it as it is.
    Cubin(i32),
    /// `compute_XX` PTX: the driver compiles it when loading it, for this GPU or a newer one.
    Ptx(i32),
}

impl Target {
    /// For a GPU of `capability` and the architectures an NVRTC supports (`supported`, as
    /// `nvrtcGetSupportedArchs` lists them: 90 for sm_90): the GPU's own code if NVRTC can write
    /// it, else PTX for the newest architecture before the GPU's. None for a GPU older than all.
    pub fn choose(capability: (i32, i32), supported: &[i32]) -> Option<Target> {
        let arch = capability.0 * 10 + capability.1;
        if supported.contains(&arch) {
            return Some(Target::Cubin(arch));
        }
        supported.iter().copied().filter(|&a| a < arch).max().map(Target::Ptx)
    }

    pub fn name(&self) -> String {
        match self {
            Target::Cubin(arch) => format!("sm_{arch}"),
            Target::Ptx(arch) => format!("compute_{arch}"),
        }
    }
}

/// NVRTC's options: the target architecture, and IEEE-exact division and square root so that
/// results stay close to the CPU's (the tests compare them with tight tolerances).
pub fn compile_options(target: Target) -> Vec<String> {
    vec![
        format!("--gpu-architecture={}", target.name()),
        "--std=c++17".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
    ]
}
// ANCHOR_END: compile

/// A `(major, minor)` version as CUDA prints it: 12.9.
fn dotted((major, minor): (i32, i32)) -> String {
    format!("{major}.{minor}")
}

/// The version of the loaded libnvrtc, (12, 9) for CUDA 12.9's.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: two out-parameters, written before it returns.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError(format!("asking NVRTC its version: {e:?}")))?;
    Ok((major, minor))
}

/// The CUDA version the installed driver supports, (12, 2) for a 535 driver.
pub fn driver_version() -> Result<(i32, i32), CudaError> {
    let mut version: c_int = 0;
    // SAFETY: one out-parameter; callable before cuInit.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| super::driver_error("asking the driver its version", e))?;
    Ok((version / 1000, version % 1000 / 10))
}

/// The architectures the loaded NVRTC can write code for (75, 80, 86, 89, 90, ...).
pub fn nvrtc_architectures() -> Result<Vec<i32>, CudaError> {
    let error = |e: result::NvrtcError| CudaError(format!("asking NVRTC its architectures: {e:?}"));
    let mut n: c_int = 0;
    // SAFETY: an out-parameter.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }.result().map_err(error)?;
    let mut archs = vec![0; usize::try_from(n).unwrap_or(0)];
    if !archs.is_empty() {
        // SAFETY: room for the `n` values.
        unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }.result().map_err(error)?;
    }
    Ok(archs)
}

/// An NVRTC program and the source text it may point into, destroyed together.
struct Program {
    prog: sys::nvrtcProgram,
    _text: CString,
    _name: CString,
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program, destroyed once, here.
        let _ = unsafe { result::destroy_program(self.prog) };
    }
}

/// What NVRTC wrote for a source.
#[derive(Clone, Debug)]
pub enum Compiled {
    Ptx(String),
    Cubin(Vec<u8>),
}

impl Compiled {
    /// Whether it defines kernel `name`: an `.entry` of the PTX, a symbol of the cubin.
    pub fn defines(&self, name: &str) -> bool {
        match self {
            Compiled::Ptx(ptx) => ptx.contains(&format!(".entry {name}(")),
            Compiled::Cubin(elf) => {
                let symbol = [name.as_bytes(), b"\0"].concat();
                elf.windows(symbol.len()).any(|w| w == symbol)
            }
        }
    }

    fn into_image(self) -> Ptx {
        match self {
            Compiled::Ptx(ptx) => Ptx::from_src(ptx),
            Compiled::Cubin(elf) => Ptx::from_binary(elf),
        }
    }
}

/// Compiles `source` for `target` with libnvrtc alone (no GPU, no driver).
pub fn compile(source: &Source, target: Target) -> Result<Compiled, CudaError> {
    let fail = |what: &str, e: result::NvrtcError| {
        CudaError(format!("NVRTC could not {what} {} for {}: {e:?}", source.file, target.name()))
    };
    let text = CString::new(full_text(source)).map_err(|_| CudaError(format!("{}: a NUL byte", source.file)))?;
    let name = CString::new(source.file).map_err(|_| CudaError(format!("{}: a NUL byte", source.file)))?;
    let prog = result::create_program(&text, Some(&name)).map_err(|e| fail("start compiling", e))?;
    let program = Program { prog, _text: text, _name: name };
    // SAFETY (all calls below): `prog` is live until `program` drops; each size is asked for
    // before the buffer that receives that many bytes is handed over.
    if let Err(e) = unsafe { result::compile_program(prog, &compile_options(target)) } {
        let log = unsafe { result::get_program_log(prog) }.unwrap_or_default();
        let log: Vec<u8> = log.into_iter().map(|c| c as u8).take_while(|&c| c != 0).collect();
        return Err(CudaError(format!(
            "NVRTC could not compile {} for {}: {e:?}: {}",
            source.file,
            target.name(),
            String::from_utf8_lossy(&log).trim()
        )));
    }
    let image = match target {
        Target::Ptx(_) => {
            let ptx = unsafe { result::get_ptx(prog) }.map_err(|e| fail("write the PTX of", e))?;
            let ptx: Vec<u8> = ptx.into_iter().map(|c| c as u8).take_while(|&c| c != 0).collect();
            Compiled::Ptx(String::from_utf8_lossy(&ptx).into_owned())
        }
        Target::Cubin(_) => {
            let mut size = 0usize;
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| fail("size the cubin of", e))?;
            let mut cubin = vec![0u8; size];
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
                .result()
                .map_err(|e| fail("write the cubin of", e))?;
            Compiled::Cubin(cubin)
        }
    };
    drop(program);
    Ok(image)
}

/// The one line for a driver that cannot load what NVRTC wrote. PTX from NVRTC 12.9 is PTX 8.8,
/// which drivers before CUDA 12.9's (R575) cannot compile.
pub fn load_error(file: &str, target: Target, error: CUresult, driver: (i32, i32), nvrtc: (i32, i32)) -> String {
    let versions = format!("the driver supports CUDA {}, NVRTC is CUDA {}'s", dotted(driver), dotted(nvrtc));
    let hint = match error {
        CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
            format!(": the PTX is newer than the driver; use NVRTC {} or older, or a newer driver", dotted(driver))
        }
        _ if driver < nvrtc => format!(": NVRTC is newer than the driver; use NVRTC {} or older", dotted(driver)),
        _ => String::new(),
    };
    format!("the driver could not load the kernels of {file} ({}): {error:?} ({versions}){hint}", target.name())
}

/// Compiles `source` for `gpu` and loads it. Errors are the machine's, not the code's (the
/// sources compile: a test checks it): an NVRTC that does not know this GPU, or a driver older
/// than the NVRTC that wrote the code.
pub(super) fn load(gpu: &Gpu, source: &Source) -> Result<Arc<CudaModule>, CudaError> {
    let target = gpu_target(gpu.capability)?;
    let image = compile(source, target)?;
    gpu.context().load_module(image.into_image()).map_err(|e| {
        let versions = driver_version().and_then(|d| nvrtc_version().map(|n| (d, n)));
        CudaError(match versions {
            Ok((driver, nvrtc)) => load_error(source.file, target, e.0, driver, nvrtc),
            Err(_) => format!("the driver could not load the kernels of {} ({}): {e:?}", source.file, target.name()),
        })
    })
}

/// What to compile for a GPU of `capability` with the loaded NVRTC.
fn gpu_target(capability: (i32, i32)) -> Result<Target, CudaError> {
    let archs = nvrtc_architectures()?;
    Target::choose(capability, &archs).ok_or_else(|| {
        let nvrtc = nvrtc_version().map(dotted).unwrap_or_else(|_| "?".into());
        let known = archs.iter().map(|a| format!("sm_{a}")).collect::<Vec<_>>().join(", ");
        CudaError(format!(
            "NVRTC {nvrtc} cannot compile for this GPU (sm_{}{}): it knows {known}; use an older CUDA's NVRTC",
            capability.0, capability.1
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An NVRTC that knows sm_80 and sm_90, but not sm_86 or sm_100.
    const SOME_NVRTC: [i32; 11] = [50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 90];

    #[test]
    fn a_gpu_nvrtc_knows_gets_its_own_code_and_a_newer_one_ptx() {
        assert_eq!(Target::choose((9, 0), &SOME_NVRTC), Some(Target::Cubin(90)));
        assert_eq!(Target::choose((8, 0), &SOME_NVRTC), Some(Target::Cubin(80)));
        // A GPU newer than the NVRTC: the newest PTX before it, which the driver compiles.
        assert_eq!(Target::choose((10, 0), &SOME_NVRTC), Some(Target::Ptx(90)));
        assert_eq!(Target::choose((8, 6), &SOME_NVRTC), Some(Target::Ptx(80)));
        assert_eq!(Target::choose((3, 5), &SOME_NVRTC), None, "older than every architecture it knows");
        assert_eq!(compile_options(Target::Cubin(90))[0], "--gpu-architecture=sm_90");
        assert_eq!(compile_options(Target::Ptx(90))[0], "--gpu-architecture=compute_90");
    }

    #[test]
    fn a_driver_older_than_nvrtc_is_named_in_one_line() {
        let e = CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION;
        let line = load_error("gelu.cu", Target::Ptx(90), e, (12, 2), (12, 9));
        assert!(line.contains("the driver supports CUDA 12.2, NVRTC is CUDA 12.9's"), "{line}");
        assert!(line.contains("use NVRTC 12.2 or older"), "{line}");
        assert!(line.contains("gelu.cu (compute_90)"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        let other = load_error("gelu.cu", Target::Cubin(90), CUresult::CUDA_ERROR_INVALID_IMAGE, (12, 9), (12, 9));
        assert!(other.ends_with("(the driver supports CUDA 12.9, NVRTC is CUDA 12.9's)"), "{other}");
    }
}
