//! Where a tensor lives and where its ops run.

use crate::cuda::{self, Gpu};
use std::fmt;
use std::str::FromStr;

/// A compute device: the CPU (always there), or a CUDA GPU by ordinal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("unknown device '{0}' (expected auto, cpu, cuda or cuda:N)")]
    Unknown(String),
    #[error("device '{device}' was requested, but {reason}; use --device cpu (or auto, which falls back to the CPU)")]
    CudaUnavailable { device: String, reason: String },
}

/// What the user asked for with `--device`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The best device present: a GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(DeviceRequest::Cuda(ordinal)),
                _ => Err(DeviceError::Unknown(s.to_string())),
            },
        }
    }
}

// ANCHOR: resolve
impl DeviceRequest {
    /// Resolves the request to a device that exists, or says why it cannot. A GPU is usable when
    /// the driver loads, the device exists, and NVRTC and cuBLAS load: all checked here, before
    /// anything else calls into CUDA (cudarc panics on a library it cannot load).
    pub fn resolve(&self) -> Result<Device, DeviceError> {
        self.resolve_explained().map(|(device, _)| device)
    }

    /// As [`DeviceRequest::resolve`], with a line that says what was picked and why (`auto`
    /// says why it fell back to the CPU).
    pub fn resolve_explained(&self) -> Result<(Device, String), DeviceError> {
        match self {
            DeviceRequest::Cpu => Ok((Device::Cpu, Device::Cpu.describe())),
            DeviceRequest::Cuda(ordinal) => match Gpu::get(*ordinal) {
                Ok(_) => Ok((Device::Cuda(*ordinal), Device::Cuda(*ordinal).describe())),
                Err(e) => Err(DeviceError::CudaUnavailable { device: format!("cuda:{ordinal}"), reason: e.0 }),
            },
            // Gpu::get checks the driver, the device count and the libraries, and says which failed.
            DeviceRequest::Auto => match Gpu::get(0) {
                Ok(_) => Ok((Device::Cuda(0), format!("{} (auto)", Device::Cuda(0).describe()))),
                Err(e) => Ok((Device::Cpu, format!("{} (auto: no usable GPU: {})", Device::Cpu.describe(), e.0))),
            },
        }
    }
}
// ANCHOR_END: resolve

impl Device {
    /// This device's peak dense matmul FLOP/s in `dtype`, where known (`cuda::peak_flops`): the
    /// denominator of MFU. None for the CPU.
    pub fn peak_flops(&self, dtype: cuda::DType) -> Option<f64> {
        match self {
            Device::Cpu => None,
            Device::Cuda(ordinal) => Gpu::get(*ordinal).ok().and_then(|gpu| cuda::peak_flops(&gpu.name, dtype)),
        }
    }

    /// The device and what it is: "cpu (2 threads)", "cuda:0 (NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB)".
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Device::Cuda(ordinal) => match Gpu::get(*ordinal) {
                Ok(gpu) => format!(
                    "cuda:{ordinal} ({}, sm_{}{}, {})",
                    gpu.name,
                    gpu.capability.0,
                    gpu.capability.1,
                    crate::memory::format_bytes(gpu.total_memory as u64)
                ),
                Err(e) => format!("cuda:{ordinal} (unavailable: {})", e.0),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
        assert!("tpu".parse::<DeviceRequest>().is_err());
    }

    // ANCHOR: no_gpu_tests
    /// On a machine without a usable GPU (CI's): `auto` falls back to the CPU and says why,
    /// `cuda` fails with one line. On a machine with one, the GPU is picked instead.
    #[test]
    fn auto_falls_back_to_cpu_and_cuda_errors_cleanly() {
        let (device, why) = DeviceRequest::Auto.resolve_explained().unwrap();
        if Gpu::get(0).is_ok() {
            // A machine with a usable GPU: auto picks it, and asking for it works.
            assert_eq!(device, Device::Cuda(0));
            assert_eq!(DeviceRequest::Cuda(0).resolve(), Ok(Device::Cuda(0)));
        } else {
            assert_eq!(device, Device::Cpu);
            assert!(why.contains("auto: no usable GPU"), "{why}");
            let err = DeviceRequest::Cuda(0).resolve().unwrap_err().to_string();
            assert!(err.starts_with("device 'cuda:0' was requested, but "), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn a_gpu_that_does_not_exist_is_an_error() {
        let err = DeviceRequest::Cuda(999).resolve().unwrap_err().to_string();
        assert!(err.contains("cuda:999"), "{err}");
    }
    // ANCHOR_END: no_gpu_tests
}
