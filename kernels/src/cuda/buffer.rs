//! Device memory: an owned buffer, and the borrowed views the ops take.
//!
//! The views are a device pointer, a length and an element type, with a lifetime that ties them
//! to the buffer they came from, so that the borrow checker sees device memory as it sees slices:
//! many `DevView`s or one `DevViewMut` at a time, and `split_at_mut` to cut one buffer into
//! disjoint parts (the parameters' flat buffer into its tensors). Every op is queued on the one
//! stream, in program order, so a view that Rust allows is a view that is safe on the device.

use super::{CudaError, Gpu, driver_error};
use cudarc::driver::result;
use cudarc::driver::sys::CUdeviceptr;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

/// Element types on the device. The CPU computes in f32 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// bfloat16: f32's sign and 8-bit exponent with a 7-bit mantissa, so the same range as f32
    /// and about 3 significant digits.
    BF16,
    /// Token ids.
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
        })
    }
}

impl std::str::FromStr for DType {
    type Err = String;

    /// The element types a user can ask to compute in (`--dtype`).
    fn from_str(s: &str) -> Result<DType, String> {
        match s {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            _ => Err(format!("unknown dtype '{s}' (expected f32 or bf16)")),
        }
    }
}

/// `len` elements of `dtype` in device memory, freed on drop.
pub struct DevBuffer {
    gpu: Arc<Gpu>,
    ptr: CUdeviceptr,
    len: usize,
    dtype: DType,
}

impl std::fmt::Debug for DevBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuffer(cuda:{}, {} x {})", self.gpu.ordinal, self.len, self.dtype)
    }
}

impl DevBuffer {
    /// Uninitialised memory.
    pub fn uninit(gpu: &Arc<Gpu>, len: usize, dtype: DType) -> Result<DevBuffer, CudaError> {
        gpu.bind()?;
        let bytes = (len * dtype.size()).max(1);
        // SAFETY: the context is current on this thread; the pointer is freed once, on drop.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| match e.0 {
            cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => CudaError(format!(
                "out of GPU memory: {} more were asked for on cuda:{} ({} in all); use a smaller \
                 model, batch or sequence",
                crate::memory::format_bytes(bytes as u64),
                gpu.ordinal,
                crate::memory::format_bytes(gpu.total_memory as u64)
            )),
            _ => driver_error("allocating device memory", e),
        })?;
        Ok(DevBuffer { gpu: gpu.clone(), ptr, len, dtype })
    }

    /// Zeros.
    pub fn zeros(gpu: &Arc<Gpu>, len: usize, dtype: DType) -> Result<DevBuffer, CudaError> {
        let buf = DevBuffer::uninit(gpu, len, dtype)?;
        // SAFETY: the range is the buffer's own.
        let r = unsafe { result::memset_d8_async(buf.ptr, 0, len * dtype.size(), gpu.stream().cu_stream()) };
        r.map_err(|e| driver_error("zeroing device memory", e))?;
        Ok(buf)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn size_bytes(&self) -> u64 {
        (self.len * self.dtype.size()) as u64
    }

    pub fn view(&self) -> DevView<'_> {
        DevView::from_raw(&self.gpu, self.ptr, self.len, self.dtype)
    }

    pub fn view_mut(&mut self) -> DevViewMut<'_> {
        DevViewMut { gpu: &self.gpu, ptr: self.ptr, len: self.len, dtype: self.dtype, _borrow: PhantomData }
    }
}

impl Drop for DevBuffer {
    fn drop(&mut self) {
        // Kernels queued before the drop may still read the memory: cuMemFree waits for them.
        // Errors here (the context torn down at exit) have nowhere to go.
        if self.gpu.bind().is_ok() {
            // SAFETY: allocated by malloc_sync in `uninit`, freed only here.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

// ANCHOR: dev_views
/// A borrowed run of device memory: `&[T]` for the GPU.
#[derive(Clone, Copy)]
pub struct DevView<'a> {
    gpu: &'a Gpu,
    ptr: CUdeviceptr,
    len: usize,
    dtype: DType,
}

/// A mutably borrowed run of device memory: `&mut [T]` for the GPU.
pub struct DevViewMut<'a> {
    gpu: &'a Gpu,
    ptr: CUdeviceptr,
    len: usize,
    dtype: DType,
    _borrow: PhantomData<&'a mut ()>,
}
// ANCHOR_END: dev_views

impl std::fmt::Debug for DevView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevView({} x {})", self.len, self.dtype)
    }
}

impl std::fmt::Debug for DevViewMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevViewMut({} x {})", self.len, self.dtype)
    }
}

fn check_range(range: &Range<usize>, len: usize) {
    assert!(range.start <= range.end && range.end <= len, "range {range:?} out of a device view of {len}");
}

impl<'a> DevView<'a> {
    pub(crate) fn from_raw(gpu: &'a Gpu, ptr: CUdeviceptr, len: usize, dtype: DType) -> DevView<'a> {
        DevView { gpu, ptr, len, dtype }
    }

    pub fn gpu(&self) -> &'a Gpu {
        self.gpu
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device address, for a kernel argument or a cuBLAS call.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    pub fn slice(&self, range: Range<usize>) -> DevView<'a> {
        check_range(&range, self.len);
        DevView { ptr: self.ptr + (range.start * self.dtype.size()) as u64, len: range.len(), ..*self }
    }

    pub fn split_at(&self, mid: usize) -> (DevView<'a>, DevView<'a>) {
        (self.slice(0..mid), self.slice(mid..self.len))
    }

    /// Copies to the host, converting to f32, and waits for it (and so for all queued work).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>, CudaError> {
        let mut out = vec![0f32; self.len];
        match self.dtype {
            DType::F32 => self.copy_to_host(&mut out)?,
            DType::BF16 => {
                let mut raw = vec![half::bf16::ZERO; self.len];
                self.copy_to_host(&mut raw)?;
                for (o, r) in out.iter_mut().zip(raw) {
                    *o = r.to_f32();
                }
            }
            DType::U32 => panic!("to_vec_f32 of token ids"),
        }
        Ok(out)
    }

    fn copy_to_host<T>(&self, out: &mut [T]) -> Result<(), CudaError> {
        assert_eq!(std::mem::size_of_val(out), self.len * self.dtype.size());
        self.gpu.bind()?;
        // SAFETY: the view's range is valid device memory of exactly out's size; the copy is
        // queued after every op that writes it, and we wait for it before returning.
        let r = unsafe { result::memcpy_dtoh_async(out, self.ptr, self.gpu.stream().cu_stream()) };
        self.gpu.record("copying to the host", r);
        self.gpu.synchronize()
    }
}

impl<'a> DevViewMut<'a> {
    pub(crate) fn from_raw(gpu: &'a Gpu, ptr: CUdeviceptr, len: usize, dtype: DType) -> DevViewMut<'a> {
        DevViewMut { gpu, ptr, len, dtype, _borrow: PhantomData }
    }

    pub fn gpu(&self) -> &'a Gpu {
        self.gpu
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// A shorter-lived copy of this view, as `&mut *slice` gives for slices.
    pub fn reborrow(&mut self) -> DevViewMut<'_> {
        DevViewMut { _borrow: PhantomData, ..*self }
    }

    pub fn as_view(&self) -> DevView<'_> {
        DevView { gpu: self.gpu, ptr: self.ptr, len: self.len, dtype: self.dtype }
    }

    pub fn into_view(self) -> DevView<'a> {
        DevView { gpu: self.gpu, ptr: self.ptr, len: self.len, dtype: self.dtype }
    }

    pub fn slice_mut(&mut self, range: Range<usize>) -> DevViewMut<'_> {
        check_range(&range, self.len);
        DevViewMut { ptr: self.ptr + (range.start * self.dtype.size()) as u64, len: range.len(), ..self.reborrow() }
    }

    // ANCHOR: split_at_mut
    pub fn split_at_mut(self, mid: usize) -> (DevViewMut<'a>, DevViewMut<'a>) {
        check_range(&(0..mid), self.len);
        let tail = DevViewMut { ptr: self.ptr + (mid * self.dtype.size()) as u64, len: self.len - mid, ..self };
        (DevViewMut { len: mid, ..self }, tail)
    }
    // ANCHOR_END: split_at_mut

    /// Copies `src` (f32, from the host) in, converting to this view's type.
    pub fn copy_from_f32(&mut self, src: &[f32]) -> Result<(), CudaError> {
        assert_eq!(src.len(), self.len, "host and device lengths differ");
        self.gpu.bind()?;
        let stream = self.gpu.stream().cu_stream();
        // SAFETY: the view's range is valid device memory of exactly the source's size. A copy
        // from pageable host memory returns once the source has been read.
        let r = match self.dtype {
            DType::F32 => unsafe { result::memcpy_htod_async(self.ptr, src, stream) },
            DType::BF16 => {
                let raw: Vec<half::bf16> = src.iter().map(|&x| half::bf16::from_f32(x)).collect();
                let r = unsafe { result::memcpy_htod_async(self.ptr, &raw, stream) };
                // Wait before `raw` is dropped: the driver may still be reading it.
                self.gpu.record("copying to the GPU", r);
                return self.gpu.synchronize();
            }
            DType::U32 => panic!("copy_from_f32 into token ids"),
        };
        self.gpu.record("copying to the GPU", r);
        self.gpu.synchronize()
    }
}
