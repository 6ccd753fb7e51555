// GELU, in the tanh form GPT-2 was trained with. Elementwise: one thread per element.

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_CUBIC 0.044715f

// ANCHOR: gelu_forward
// inp [N] -> out [N]:   out = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)
template <typename X>
__device__ __forceinline__ void gelu_forward(X* out, const X* inp, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_float(inp[i]);
    float u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    store(out, i, 0.5f * x * (1.0f + tanhf(u)));
}
// ANCHOR_END: gelu_forward

// ANCHOR: gelu_forward_instances
extern "C" __global__ void gelu_forward_f32(float* out, const float* inp, long n) { gelu_forward(out, inp, n); }
extern "C" __global__ void gelu_forward_bf16(bf16* out, const bf16* inp, long n) { gelu_forward(out, inp, n); }
// ANCHOR_END: gelu_forward_instances

// ANCHOR: gelu_backward
// dinp [N] += dout * d(out)/dx, where
//   d(out)/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
template <typename X>
__device__ __forceinline__ void gelu_backward(X* dinp, const X* inp, const X* dout, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_float(inp[i]);
    float u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    float t = tanhf(u);
    float du_dx = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * x * x);
    float local = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du_dx;
    store(dinp, i, to_float(dinp[i]) + to_float(dout[i]) * local);
}
// ANCHOR_END: gelu_backward

extern "C" __global__ void gelu_backward_f32(float* dinp, const float* inp, const float* dout, long n) {
    gelu_backward(dinp, inp, dout, n);
}
extern "C" __global__ void gelu_backward_bf16(bf16* dinp, const bf16* inp, const bf16* dout, long n) {
    gelu_backward(dinp, inp, dout, n);
}
