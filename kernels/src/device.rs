//! Where a tensor lives and where its ops run.

use std::fmt;
use std::str::FromStr;

/// A compute device. The CPU is always there; the CUDA backend is a later chapter's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("unknown device '{0}' (expected auto, cpu, cuda or cuda:N)")]
    Unknown(String),
    #[error("device '{0}' was requested, but this build has no CUDA backend yet; use --device cpu or auto")]
    CudaUnavailable(String),
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

impl DeviceRequest {
    /// Resolves the request to a device that exists, or says why it cannot.
    pub fn resolve(&self) -> Result<Device, DeviceError> {
        match self {
            DeviceRequest::Auto | DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Cuda(ordinal) => Err(DeviceError::CudaUnavailable(format!("cuda:{ordinal}"))),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu ({} threads)", rayon::current_num_threads()),
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

    #[test]
    fn auto_falls_back_to_cpu_and_cuda_errors_cleanly() {
        assert_eq!(DeviceRequest::Auto.resolve(), Ok(Device::Cpu));
        let err = DeviceRequest::Cuda(0).resolve().unwrap_err();
        assert!(err.to_string().contains("no CUDA backend"), "{err}");
    }
}
