//! `kernels`: the engine under every chapter.
//!
//! - [`Tensor`]: a shape and an f32 buffer on a [`Device`].
//! - [`ops`]: every operation GPT-2 training needs, each a forward/backward pair of plain
//!   functions over slices, with the shapes and the math in the comment on top (llm.c style).
//! - [`rng`]: a seeded generator that gives the same numbers on every platform.
//! - [`memory`]: a ledger of bytes by category (parameters, gradients, ...), current and peak.
//! - [`trace`]: named spans, written as Chrome trace-event JSON that Perfetto opens.
//!
//! The CPU backend lives here now; the CUDA backend dispatches from the same functions.

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
