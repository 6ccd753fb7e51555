// Fused softmax + cross-entropy over the vocabulary. One block per row of logits: the row's max
// and sum are block reductions. Forward turns logits into probabilities in place, backward turns
// the probabilities into dlogits in place.

// ANCHOR: softmax_cross_entropy_forward
// logits [N, Vp] (overwritten with probs), targets [N] -> losses [N] (f32). Only the first V
// columns are real tokens; the padding columns get probability 0.
//
//   probs_i = exp(z_i - max z) / sum_j exp(z_j - max z)
//   loss    = -ln probs_target = ln sum_j exp(z_j - max z) - (z_target - max z)
//
// exp is computed twice per element (for the sum, then for the output) rather than stored in
// between: in bf16 that would round it twice.
template <typename X>
__device__ __forceinline__ void softmax_cross_entropy_forward(X* logits, float* losses, const u32* targets, int V,
                                                              int Vp) {
    __shared__ float shared[32];
    X* z = logits + (long)blockIdx.x * Vp;
    float target_logit = to_float(z[targets[blockIdx.x]]);  // read before any thread writes z

    float max = __int_as_float(0xff800000);  // -inf
    for (int i = threadIdx.x; i < V; i += blockDim.x) max = fmaxf(max, to_float(z[i]));
    max = block_max(max, shared);

    float sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(to_float(z[i]) - max);
    sum = block_sum(sum, shared);  // block_sum syncs: every read of z above is done after it

    float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        store(z, i, i < V ? expf(to_float(z[i]) - max) * inv : 0.0f);
    }
    if (threadIdx.x == 0) losses[blockIdx.x] = logf(sum) - (target_logit - max);
}
// ANCHOR_END: softmax_cross_entropy_forward

// __launch_bounds__: blocks of 512 threads (SOFTMAX_BLOCK in ops.rs).
extern "C" __global__ void __launch_bounds__(512)
softmax_cross_entropy_forward_f32(float* logits, float* losses, const u32* targets, int V, int Vp) {
    softmax_cross_entropy_forward(logits, losses, targets, V, Vp);
}
extern "C" __global__ void __launch_bounds__(512)
softmax_cross_entropy_forward_bf16(bf16* logits, float* losses, const u32* targets, int V, int Vp) {
    softmax_cross_entropy_forward(logits, losses, targets, V, Vp);
}

// ANCHOR: softmax_cross_entropy_backward
// probs [N, Vp] (overwritten with dlogits). For a loss L = sum_n dloss * loss_n:
//
//   dlogits_i = dloss * (probs_i - [i == target])
//
// One thread per element: i = n Vp + j.
template <typename X>
__device__ __forceinline__ void softmax_cross_entropy_backward(X* probs, const u32* targets, float dloss, long N,
                                                               int Vp) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * Vp) return;
    long n = i / Vp;
    int j = (int)(i % Vp);
    float indicator = j == (int)targets[n] ? 1.0f : 0.0f;
    store(probs, i, (to_float(probs[i]) - indicator) * dloss);
}
// ANCHOR_END: softmax_cross_entropy_backward

extern "C" __global__ void softmax_cross_entropy_backward_f32(float* probs, const u32* targets, float dloss, long N,
                                                              int Vp) {
    softmax_cross_entropy_backward(probs, targets, dloss, N, Vp);
}
extern "C" __global__ void softmax_cross_entropy_backward_bf16(bf16* probs, const u32* targets, float dloss, long N,
                                                               int Vp) {
    softmax_cross_entropy_backward(probs, targets, dloss, N, Vp);
}
