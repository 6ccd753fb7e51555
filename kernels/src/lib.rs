//! `kernels`: the engine under every chapter.
//!
//! - [`Tensor`]: a shape and an f32 buffer on a [`Device`].
//! - [`ops`]: every operation GPT-2 training needs, each a forward/backward pair of plain
//!   functions over slices, with the shapes and the math in the comment on top (llm.c style).
//! - [`rng`]: a seeded generator that gives the same numbers on every platform.
//! - [`memory`]: a ledger of bytes by category (parameters, gradients, ...), current and peak.
//! - [`trace`]: named spans, written as Chrome trace-event JSON that Perfetto opens, or drawn as
//!   an SVG timeline.
//! - [`comm`]: the communicator every parallel chapter uses: ring collectives on thread ranks,
//!   NCCL for GPUs, a launcher that never hangs when a rank fails, a TCP rendezvous.
//!
//! The ops run on the CPU. The CUDA backend (a later piece of work) needs a dispatch layer above
//! them: device views that the model's buffers hand out, with these slice functions as the CPU arm.

pub mod comm;
pub mod device;
pub mod memory;
pub mod ops;
pub mod rng;
pub mod tensor;
pub mod trace;

pub use device::{Device, DeviceError};
pub use memory::{Category, MemoryLedger, MemoryReport};
pub use rng::Rng;
pub use tensor::{Tensor, TensorError};
pub use trace::Trace;
