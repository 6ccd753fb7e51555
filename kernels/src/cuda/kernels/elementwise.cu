// Elementwise utilities: type conversion, and the bias broadcast that starts a linear layer.
// One thread per element; n is a `long` because a tensor may pass 2^31 elements.

// dst [N] = src [N], converted through f32 (bf16 -> f32 is exact; f32 -> bf16 rounds to nearest
// even, as `half::bf16::from_f32` does on the host).
template <typename Dst, typename Src>
__device__ __forceinline__ void convert(Dst* dst, const Src* src, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    store(dst, i, to_float(src[i]));
}

extern "C" __global__ void convert_f32_to_f32(float* dst, const float* src, long n) { convert(dst, src, n); }
extern "C" __global__ void convert_f32_to_bf16(bf16* dst, const float* src, long n) { convert(dst, src, n); }
extern "C" __global__ void convert_bf16_to_f32(float* dst, const bf16* src, long n) { convert(dst, src, n); }
extern "C" __global__ void convert_bf16_to_bf16(bf16* dst, const bf16* src, long n) { convert(dst, src, n); }

// out [rows, cols]: every row = bias [cols]. The linear layer's forward starts from this and lets
// the matmul accumulate into it (out = bias + inp @ weight, as the CPU does), so the sum is
// rounded once, not twice.
template <typename X>
__device__ __forceinline__ void broadcast_rows(X* out, const X* bias, long rows, int cols) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    out[i] = bias[i % cols];
}

extern "C" __global__ void broadcast_rows_f32(float* out, const float* bias, long rows, int cols) {
    broadcast_rows(out, bias, rows, cols);
}
extern "C" __global__ void broadcast_rows_bf16(bf16* out, const bf16* bias, long rows, int cols) {
    broadcast_rows(out, bias, rows, cols);
}
