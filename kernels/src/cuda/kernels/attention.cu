// Causal self-attention: the softmax over each row of scores, and its backward. The products
// around them (scores = q k^T, out = att v, and the four of backward) are cuBLAS calls, batched
// over the heads (see attention_forward in ops.rs).
//
// att [B, H, T, T] is one row per (b, h, t): row r has t = r % T, and only the columns u <= t are
// visible (causal). The matmuls compute the whole T x T square, masked half included; the
// kernels here zero that half. (A fused "flash" kernel would skip it, and never store att.)
// One warp per row; a block of 256 threads handles 8 rows. Each lane reads and writes only its
// own columns u = lane, lane + 32, ..., so working in place needs no synchronisation.

// ANCHOR: attention_softmax
// In place, on the scores s = q . k / sqrt(hs) (the scale was the matmul's alpha):
//
//   att[t, u] = exp(s[t, u] - max_u' s[t, u']) / sum_u' exp(s[t, u'] - max)     for u <= t
//   att[t, u] = 0                                                              for u > t
//
// exp is computed again for the output rather than stored between passes: in bf16 that would
// round it twice.
template <typename X>
__device__ __forceinline__ void attention_softmax(X* att, long rows, int T) {
    int lane = threadIdx.x % 32;
    long r = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;  // the whole warp leaves together, so the shuffles below stay full
    int t = (int)(r % T);
    X* row = att + r * T;

    float max = __int_as_float(0xff800000);  // -inf
    for (int u = lane; u <= t; u += 32) max = fmaxf(max, to_float(row[u]));
    max = warp_max(max);

    float sum = 0.0f;
    for (int u = lane; u <= t; u += 32) sum += expf(to_float(row[u]) - max);
    float inv = 1.0f / warp_sum(sum);

    for (int u = lane; u < T; u += 32) store(row, u, u <= t ? expf(to_float(row[u]) - max) * inv : 0.0f);
}
// ANCHOR_END: attention_softmax

extern "C" __global__ void attention_softmax_f32(float* att, long rows, int T) { attention_softmax(att, rows, T); }
extern "C" __global__ void attention_softmax_bf16(bf16* att, long rows, int T) { attention_softmax(att, rows, T); }

// ANCHOR: attention_softmax_backward
// In place, datt -> dscores, given the probabilities att (same shape, rows of T):
//
//   ds[t, u] = att[t, u] (datt[t, u] - sum_u' att[t, u'] datt[t, u'])     for u <= t
//   ds[t, u] = 0                                                         for u > t
//
// (The 1/sqrt(hs) of the scores is applied by the matmuls that use ds, as their alpha.)
template <typename X>
__device__ __forceinline__ void attention_softmax_backward(X* datt, const X* att, long rows, int T) {
    int lane = threadIdx.x % 32;
    long r = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    int t = (int)(r % T);
    X* d = datt + r * T;
    const X* p = att + r * T;

    float weighted = 0.0f;
    for (int u = lane; u <= t; u += 32) weighted += to_float(p[u]) * to_float(d[u]);
    weighted = warp_sum(weighted);

    for (int u = lane; u < T; u += 32) store(d, u, u <= t ? to_float(p[u]) * (to_float(d[u]) - weighted) : 0.0f);
}
// ANCHOR_END: attention_softmax_backward

extern "C" __global__ void attention_softmax_backward_f32(float* datt, const float* att, long rows, int T) {
    attention_softmax_backward(datt, att, rows, T);
}
extern "C" __global__ void attention_softmax_backward_bf16(bf16* datt, const bf16* att, long rows, int T) {
    attention_softmax_backward(datt, att, rows, T);
}
