//! `Tensor`: a shape and a buffer on a device (f32 on the CPU; f32 or bf16 on a GPU), optionally
//! counted in a memory ledger; and [`View`]/[`ViewMut`], the borrowed runs of a tensor that the
//! ops take, which say by their variant which backend runs the op.

use crate::cuda::{CudaError, DType, DevBuffer, DevView, DevViewMut, Gpu};
use crate::device::Device;
use crate::memory::{Allocation, Category, MemoryLedger};
use rayon::prelude::*;
use std::ops::Range;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("shape {shape:?} holds {expected} elements, but {actual} were given")]
    ShapeMismatch { shape: Vec<usize>, expected: usize, actual: usize },
    #[error("the CPU computes in f32 only; {0} runs on a GPU (use --device cuda, or --dtype f32)")]
    CpuDType(DType),
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

#[derive(Debug)]
enum Storage {
    Cpu(Vec<f32>),
    Cuda(DevBuffer),
}

#[derive(Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
    device: Device,
    /// Gives the bytes back to the ledger when the tensor is dropped.
    _allocation: Option<Allocation>,
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(vec![0.0; shape.iter().product()]),
            device: Device::Cpu,
            _allocation: None,
        }
    }

    /// Zeros on the CPU, counted under `category` in `ledger` for as long as the tensor lives.
    pub fn zeros_in(shape: &[usize], category: Category, ledger: &MemoryLedger) -> Tensor {
        let mut t = Tensor::zeros(shape);
        t._allocation = Some(ledger.allocate(category, t.size_bytes()));
        t
    }

    // ANCHOR: zeros_on
    /// Zeros of `dtype` on `device`, counted in `ledger`: a GPU run's ledger counts device memory.
    pub fn zeros_on(
        shape: &[usize],
        device: Device,
        dtype: DType,
        category: Category,
        ledger: &MemoryLedger,
    ) -> Result<Tensor, TensorError> {
        let mut t = match device {
            Device::Cpu if dtype == DType::F32 => Tensor::zeros(shape),
            Device::Cpu => return Err(TensorError::CpuDType(dtype)),
            Device::Cuda(ordinal) => {
                let buf = DevBuffer::zeros(&Gpu::get(ordinal)?, shape.iter().product(), dtype)?;
                Tensor { shape: shape.to_vec(), storage: Storage::Cuda(buf), device, _allocation: None }
            }
        };
        t._allocation = Some(ledger.allocate(category, t.size_bytes()));
        Ok(t)
    }
    // ANCHOR_END: zeros_on

    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor, TensorError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(TensorError::ShapeMismatch { shape: shape.to_vec(), expected, actual: data.len() });
        }
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cpu(data), device: Device::Cpu, _allocation: None })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(_) => DType::F32,
            Storage::Cuda(buf) => buf.dtype(),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        (self.numel() * self.dtype().size()) as u64
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The elements, for a tensor on the CPU. Code that runs on either device uses
    /// [`Tensor::view`] or [`Tensor::to_vec`]; asking a GPU tensor for a slice is a bug.
    pub fn as_slice(&self) -> &[f32] {
        match &self.storage {
            Storage::Cpu(data) => data,
            Storage::Cuda(_) => panic!("as_slice of a tensor on {}: use view() or to_vec()", self.device),
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::Cpu(data) => data,
            Storage::Cuda(_) => panic!("as_mut_slice of a tensor on {}: use view_mut()", self.device),
        }
    }

    pub fn view(&self) -> View<'_> {
        match &self.storage {
            Storage::Cpu(data) => View::Cpu(data),
            Storage::Cuda(buf) => View::Cuda(buf.view()),
        }
    }

    pub fn view_mut(&mut self) -> ViewMut<'_> {
        match &mut self.storage {
            Storage::Cpu(data) => ViewMut::Cpu(data),
            Storage::Cuda(buf) => ViewMut::Cuda(buf.view_mut()),
        }
    }

    /// The first `n` elements: a pass over a batch smaller than the buffer's capacity.
    pub fn prefix(&self, n: usize) -> View<'_> {
        self.view().slice(0..n)
    }

    pub fn prefix_mut(&mut self, n: usize) -> ViewMut<'_> {
        self.view_mut().slice_into(0..n)
    }

    /// A copy on the host, in f32 (waiting for the GPU's queued work first).
    pub fn to_vec(&self) -> Result<Vec<f32>, CudaError> {
        self.view().to_vec()
    }

    /// Overwrites every element with `src` (from the host).
    pub fn copy_from(&mut self, src: &[f32]) -> Result<(), CudaError> {
        assert_eq!(src.len(), self.numel(), "copy_from: lengths differ");
        match &mut self.storage {
            Storage::Cpu(data) => {
                data.copy_from_slice(src);
                Ok(())
            }
            Storage::Cuda(buf) => buf.view_mut().copy_from_f32(src),
        }
    }

    /// Sets every element, on all threads (one thread cannot saturate memory bandwidth: zeroing
    /// GPT-2's 124M gradients took 50 ms on one core of our 2-core machine).
    pub fn fill(&mut self, value: f32) {
        match &mut self.storage {
            Storage::Cpu(data) => data.par_chunks_mut(1 << 16).for_each(|c| c.fill(value)),
            Storage::Cuda(buf) if value == 0.0 => crate::cuda::ops::zero(buf.view_mut()),
            Storage::Cuda(_) => panic!("fill of a GPU tensor with {value}: only zero is supported"),
        }
    }
}

// ANCHOR: views
/// A borrowed run of a tensor's elements: `&[f32]` on the CPU, a device view on a GPU.
#[derive(Clone, Copy, Debug)]
pub enum View<'a> {
    Cpu(&'a [f32]),
    Cuda(DevView<'a>),
}

/// A mutably borrowed run: `&mut [f32]` on the CPU, a mutable device view on a GPU.
#[derive(Debug)]
pub enum ViewMut<'a> {
    Cpu(&'a mut [f32]),
    Cuda(DevViewMut<'a>),
}
// ANCHOR_END: views

/// An op was handed views on two different devices: a bug in the caller.
#[track_caller]
fn mixed() -> ! {
    panic!("an op was given views on different devices")
}

impl<'a> View<'a> {
    pub fn len(&self) -> usize {
        match self {
            View::Cpu(s) => s.len(),
            View::Cuda(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn slice(&self, range: Range<usize>) -> View<'a> {
        match self {
            View::Cpu(s) => View::Cpu(&s[range]),
            View::Cuda(v) => View::Cuda(v.slice(range)),
        }
    }

    pub fn split_at(&self, mid: usize) -> (View<'a>, View<'a>) {
        (self.slice(0..mid), self.slice(mid..self.len()))
    }

    /// The slice of a CPU view; panics on a GPU view (ops check that all their views agree).
    #[track_caller]
    pub fn cpu(self) -> &'a [f32] {
        match self {
            View::Cpu(s) => s,
            View::Cuda(_) => mixed(),
        }
    }

    #[track_caller]
    pub fn cuda(self) -> DevView<'a> {
        match self {
            View::Cuda(v) => v,
            View::Cpu(_) => mixed(),
        }
    }

    /// A copy on the host, in f32.
    pub fn to_vec(&self) -> Result<Vec<f32>, CudaError> {
        match self {
            View::Cpu(s) => Ok(s.to_vec()),
            View::Cuda(v) => v.to_vec_f32(),
        }
    }
}

impl<'a> ViewMut<'a> {
    pub fn len(&self) -> usize {
        match self {
            ViewMut::Cpu(s) => s.len(),
            ViewMut::Cuda(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A shorter-lived view of the same elements, as `&mut *slice` is for slices: lets a view
    /// be passed to an op and used again afterwards.
    pub fn reborrow(&mut self) -> ViewMut<'_> {
        match self {
            ViewMut::Cpu(s) => ViewMut::Cpu(s),
            ViewMut::Cuda(v) => ViewMut::Cuda(v.reborrow()),
        }
    }

    pub fn as_view(&self) -> View<'_> {
        match self {
            ViewMut::Cpu(s) => View::Cpu(s),
            ViewMut::Cuda(v) => View::Cuda(v.as_view()),
        }
    }

    pub fn slice_mut(&mut self, range: Range<usize>) -> ViewMut<'_> {
        self.reborrow().slice_into(range)
    }

    /// This view narrowed to `range`, for as long as this view would have lived.
    pub fn slice_into(self, range: Range<usize>) -> ViewMut<'a> {
        match self {
            ViewMut::Cpu(s) => ViewMut::Cpu(&mut s[range]),
            ViewMut::Cuda(v) => {
                let (_, tail) = v.split_at_mut(range.start);
                ViewMut::Cuda(tail.split_at_mut(range.len()).0)
            }
        }
    }

    pub fn split_at_mut(self, mid: usize) -> (ViewMut<'a>, ViewMut<'a>) {
        match self {
            ViewMut::Cpu(s) => {
                let (a, b) = s.split_at_mut(mid);
                (ViewMut::Cpu(a), ViewMut::Cpu(b))
            }
            ViewMut::Cuda(v) => {
                let (a, b) = v.split_at_mut(mid);
                (ViewMut::Cuda(a), ViewMut::Cuda(b))
            }
        }
    }

    #[track_caller]
    pub fn cpu(self) -> &'a mut [f32] {
        match self {
            ViewMut::Cpu(s) => s,
            ViewMut::Cuda(_) => mixed(),
        }
    }

    #[track_caller]
    pub fn cuda(self) -> DevViewMut<'a> {
        match self {
            ViewMut::Cuda(v) => v,
            ViewMut::Cpu(_) => mixed(),
        }
    }

    /// The elements of a CPU view, read-only; panics on a GPU view. For CPU-only code paths.
    #[track_caller]
    pub fn as_slice(&self) -> &[f32] {
        self.as_view().cpu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_shape_and_counts_bytes() {
        assert!(Tensor::from_vec(&[2, 3], vec![0.0; 5]).is_err());
        let ledger = MemoryLedger::new();
        let t = Tensor::zeros_in(&[4, 8], Category::Gradients, &ledger);
        assert_eq!(t.size_bytes(), 128);
        assert_eq!(ledger.report().current[&Category::Gradients], 128);
        drop(t);
        assert_eq!(ledger.report().current[&Category::Gradients], 0);
    }

    #[test]
    fn bf16_on_the_cpu_is_refused() {
        let err = Tensor::zeros_on(&[4], Device::Cpu, DType::BF16, Category::Activations, &MemoryLedger::new());
        assert_eq!(err.unwrap_err(), TensorError::CpuDType(DType::BF16));
    }

    #[test]
    fn views_split_and_narrow_like_slices() {
        let mut t = Tensor::from_vec(&[6], (0..6).map(|i| i as f32).collect()).unwrap();
        let (a, mut b) = t.view_mut().split_at_mut(2);
        assert_eq!(a.as_slice(), &[0.0, 1.0]);
        assert_eq!(b.slice_mut(1..3).as_slice(), &[3.0, 4.0]);
        assert_eq!(t.prefix(3).to_vec().unwrap(), vec![0.0, 1.0, 2.0]);
    }
}
