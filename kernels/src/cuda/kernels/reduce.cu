// Reductions: the column sums of a linear layer's bias gradient, and the sum of squares of the
// global gradient norm. Both in a fixed order, so the results are the same run to run.

// ANCHOR: column_sum
// inp [N, C] -> out [C] (f32):   out_c += sum over rows of inp[row, c]
//
// In two passes, so that enough blocks share the work (one block per 32 columns would leave most
// of a GPU idle: 24 blocks for C = 768 on an H100's 132 SMs). Pass 1: the rows are cut into
// gridDim.y chunks of `chunk` rows; a block of 32 x 32 threads sums 32 columns over one chunk:
// thread (x, y) sums column x over rows y, y + 32, ... of the chunk (a warp reads 32 consecutive
// columns: coalesced), then row 0 of threads adds the 32 partials of its column in order, into
// partials[chunk index, c]. Pass 2 (add_column_partials) adds the chunks' partials in order.
// The same order every time: deterministic.
template <typename X>
__device__ __forceinline__ void column_sum_partial(float* partials, const X* inp, int N, int C, int chunk) {
    __shared__ float partial[32][33];  // 33: no bank conflicts when row 0 reads a column
    int c = blockIdx.x * 32 + threadIdx.x;
    long first = (long)blockIdx.y * chunk, end = min((long)N, first + chunk);
    float sum = 0.0f;
    if (c < C) {
        for (long row = first + threadIdx.y; row < end; row += 32) sum += to_float(inp[row * C + c]);
    }
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float total = 0.0f;
        for (int y = 0; y < 32; y++) total += partial[y][threadIdx.x];
        partials[(long)blockIdx.y * C + c] = total;
    }
}
// ANCHOR_END: column_sum

// __launch_bounds__: the caller launches blocks of 32 x 32 = 1024 threads; this tells the
// compiler, so that it keeps to the registers that many threads can have.
extern "C" __global__ void __launch_bounds__(1024)
column_sum_partial_f32(float* partials, const float* inp, int N, int C, int chunk) {
    column_sum_partial(partials, inp, N, C, chunk);
}
extern "C" __global__ void __launch_bounds__(1024)
column_sum_partial_bf16(float* partials, const bf16* inp, int N, int C, int chunk) {
    column_sum_partial(partials, inp, N, C, chunk);
}

// Pass 2 of the column sums: out_c += sum over chunks k, in order, of partials[k, c]. One thread
// per column.
extern "C" __global__ void add_column_partials(float* out, const float* partials, int chunks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float total = 0.0f;
    for (int k = 0; k < chunks; k++) total += partials[(long)k * C + c];
    out[c] += total;
}

// Sum over the whole block in f64 (blockDim.x a multiple of 32, at most 1024); every thread gets
// it. `shared` must hold 32 doubles. As `block_sum` in common.cuh, in double.
__device__ __forceinline__ double block_sum_f64(double v, double* shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// ANCHOR: global_norm
// The global gradient norm, sqrt(sum_i g_i^2) over g [N] (f32), summed in f64, in two passes:
//
//   sum_squares_partial: block b sums g_i^2 over i = b * blockDim + thread, stepping by
//                        gridDim * blockDim, into partial[b]
//   sum_partials_sqrt:   one block sums partial[0 .. n) and writes the square root, as f32
//
// The grid size is fixed by the caller (not by the GPU at hand), so the order is too. Launch
// bounds: the block sizes the caller uses.
extern "C" __global__ void __launch_bounds__(512) sum_squares_partial(double* partial, const float* g, long n) {
    __shared__ double shared[32];
    double sum = 0.0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double x = g[i];
        sum += x * x;
    }
    sum = block_sum_f64(sum, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

extern "C" __global__ void __launch_bounds__(256) sum_partials_sqrt(float* norm, const double* partial, int n) {
    __shared__ double shared[32];
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += partial[i];
    sum = block_sum_f64(sum, shared);
    if (threadIdx.x == 0) norm[0] = (float)sqrt(sum);
}
// ANCHOR_END: global_norm
