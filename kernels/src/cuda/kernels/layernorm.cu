// Layer normalisation over the last dimension. One warp (32 threads) per row: the row's sums are
// warp reductions, and a block of 256 threads handles 8 rows.

#define LAYERNORM_EPS 1e-5f

// ANCHOR: layernorm_forward
// inp [N, C], weight [C], bias [C] -> out [N, C]; saves mean [N] and rstd [N] (f32) for backward.
//
//   mean = (1/C) sum_c x_c        var = (1/C) sum_c (x_c - mean)^2      rstd = 1/sqrt(var + eps)
//   out_c = (x_c - mean) * rstd * weight_c + bias_c
template <typename X>
__device__ __forceinline__ void layernorm_forward(X* out, float* mean, float* rstd, const X* inp, const X* weight,
                                                  const X* bias, int N, int C) {
    int lane = threadIdx.x % 32;
    long row = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;  // the whole warp leaves together, so the shuffles below stay full
    const X* x = inp + row * C;

    float sum = 0.0f;
    for (int i = lane; i < C; i += 32) sum += to_float(x[i]);
    float m = warp_sum(sum) / C;

    float squares = 0.0f;  // the variance in two passes, as the CPU does: no cancellation
    for (int i = lane; i < C; i += 32) {
        float d = to_float(x[i]) - m;
        squares += d * d;
    }
    float s = 1.0f / sqrtf(warp_sum(squares) / C + LAYERNORM_EPS);

    X* o = out + row * C;
    for (int i = lane; i < C; i += 32) {
        store(o, i, (to_float(x[i]) - m) * s * to_float(weight[i]) + to_float(bias[i]));
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}
// ANCHOR_END: layernorm_forward

extern "C" __global__ void layernorm_forward_f32(float* out, float* mean, float* rstd, const float* inp,
                                                 const float* weight, const float* bias, int N, int C) {
    layernorm_forward(out, mean, rstd, inp, weight, bias, N, C);
}
extern "C" __global__ void layernorm_forward_bf16(bf16* out, float* mean, float* rstd, const bf16* inp,
                                                  const bf16* weight, const bf16* bias, int N, int C) {
    layernorm_forward(out, mean, rstd, inp, weight, bias, N, C);
}

// ANCHOR: layernorm_backward
// Backward of layernorm_forward, input gradient. With norm = (x - mean) * rstd and
// dnorm = dout * weight, per row (one warp):
//
//   dinp += rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm * norm))
template <typename X>
__device__ __forceinline__ void layernorm_backward_input(X* dinp, const X* dout, const X* inp, const X* weight,
                                                         const float* mean, const float* rstd, int N, int C) {
    int lane = threadIdx.x % 32;
    long row = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const X* x = inp + row * C;
    const X* dy = dout + row * C;
    X* dx = dinp + row * C;
    float m = mean[row], s = rstd[row];

    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
    for (int i = lane; i < C; i += 32) {
        float norm = (to_float(x[i]) - m) * s;
        float dnorm = to_float(dy[i]) * to_float(weight[i]);
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * norm;
    }
    dnorm_mean = warp_sum(dnorm_mean) / C;
    dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;

    for (int i = lane; i < C; i += 32) {
        float norm = (to_float(x[i]) - m) * s;
        float dnorm = to_float(dy[i]) * to_float(weight[i]);
        store(dx, i, to_float(dx[i]) + s * (dnorm - dnorm_mean - norm * dnorm_norm_mean));
    }
}

// The parameter gradients are sums over rows, one per column c:
//
//   dbias_c   += sum over rows of dout_c
//   dweight_c += sum over rows of dout_c * norm_c
//
// Pass 1 of two, as column_sum in reduce.cu: the rows are cut into gridDim.y chunks of `chunk`
// rows, and a block of 32 x 32 threads sums 32 columns over one chunk (thread (x, y): column x,
// rows y, y + 32, ... of the chunk, coalesced), then row 0 of threads adds the 32 partials of its
// column in order into partials: [2, chunks, C], dweight's then dbias's. Pass 2 is
// add_column_partials (reduce.cu), once for each. Fixed order everywhere: deterministic.
template <typename X>
__device__ __forceinline__ void layernorm_backward_params_partial(float* partials, const X* dout, const X* inp,
                                                                  const float* mean, const float* rstd, int N, int C,
                                                                  int chunk) {
    __shared__ float dweight_part[32][33];  // 33: no bank conflicts when row 0 reads a column
    __shared__ float dbias_part[32][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    long first = (long)blockIdx.y * chunk, end = min((long)N, first + chunk);
    float dw = 0.0f, db = 0.0f;
    if (c < C) {
        for (long row = first + threadIdx.y; row < end; row += 32) {
            float dy = to_float(dout[row * C + c]);
            db += dy;
            dw += dy * (to_float(inp[row * C + c]) - mean[row]) * rstd[row];
        }
    }
    dweight_part[threadIdx.y][threadIdx.x] = dw;
    dbias_part[threadIdx.y][threadIdx.x] = db;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float dw_sum = 0.0f, db_sum = 0.0f;
        for (int y = 0; y < 32; y++) {
            dw_sum += dweight_part[y][threadIdx.x];
            db_sum += dbias_part[y][threadIdx.x];
        }
        long chunks = gridDim.y;
        partials[(long)blockIdx.y * C + c] = dw_sum;
        partials[(chunks + blockIdx.y) * C + c] = db_sum;
    }
}
// ANCHOR_END: layernorm_backward

extern "C" __global__ void layernorm_backward_input_f32(float* dinp, const float* dout, const float* inp,
                                                        const float* weight, const float* mean, const float* rstd,
                                                        int N, int C) {
    layernorm_backward_input(dinp, dout, inp, weight, mean, rstd, N, C);
}
extern "C" __global__ void layernorm_backward_input_bf16(bf16* dinp, const bf16* dout, const bf16* inp,
                                                         const bf16* weight, const float* mean, const float* rstd,
                                                         int N, int C) {
    layernorm_backward_input(dinp, dout, inp, weight, mean, rstd, N, C);
}
// __launch_bounds__: blocks of 32 x 32 = 1024 threads (see column_chunks in ops.rs).
extern "C" __global__ void __launch_bounds__(1024)
layernorm_backward_params_partial_f32(float* partials, const float* dout, const float* inp, const float* mean,
                                      const float* rstd, int N, int C, int chunk) {
    layernorm_backward_params_partial(partials, dout, inp, mean, rstd, N, C, chunk);
}
extern "C" __global__ void __launch_bounds__(1024)
layernorm_backward_params_partial_bf16(float* partials, const bf16* dout, const bf16* inp, const float* mean,
                                       const float* rstd, int N, int C, int chunk) {
    layernorm_backward_params_partial(partials, dout, inp, mean, rstd, N, C, chunk);
}
