//! `kernels`: the engine under every chapter.
//!
//! - [`Tensor`]: a shape and a buffer on a [`Device`]: f32 on the CPU, f32 or bf16 on a GPU.
//! - [`ops`]: every operation GPT-2 training needs, each a forward/backward pair of plain
//!   functions over slices, with the shapes and the math in the comment on top (llm.c style).
//! - [`rng`]: a seeded generator that gives the same numbers on every platform.
//! - [`memory`]: a ledger of bytes by category (parameters, gradients, ...), current and peak.
//! - [`trace`]: named spans, written as Chrome trace-event JSON that Perfetto opens, or drawn as
//!   an SVG timeline.
//! - [`comm`]: the communicator every parallel chapter uses: ring collectives on thread ranks,
//!   NCCL for GPUs, a launcher that never hangs when a rank fails, a TCP rendezvous.
//!
//! - [`cuda`]: the same ops on an NVIDIA GPU (cuBLAS, and CUDA C kernels compiled at run time by
//!   NVRTC), loaded at run time, so this crate builds and runs where there is no CUDA at all.
//! - [`dispatch`]: the ops the model calls. They take [`View`]s of tensors, and run the CPU
//!   function or its CUDA twin according to where the tensors live.

pub mod comm;
pub mod cuda;
pub mod device;
pub mod dispatch;
pub mod memory;
pub mod ops;
pub mod rng;
pub mod tensor;
pub mod trace;

pub use cuda::{CudaError, DType};
pub use device::{Device, DeviceError};
pub use memory::{Category, MemoryLedger, MemoryReport};
pub use rng::Rng;
pub use tensor::{Tensor, TensorError, View, ViewMut};
pub use trace::Trace;
