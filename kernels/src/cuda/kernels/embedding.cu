// Token + position embedding (the "encoder" of llm.c). tokens are u32 ids, uploaded from the host.

// ANCHOR: embedding_forward
// tokens [B, T] (ids < V), wte [Vp, C], wpe [maxT, C] -> out [B, T, C]:
//   out[b, t] = wte[tokens[b, t]] + wpe[t]
// One thread per output element: i = (b T + t) C + c.
template <typename X>
__device__ __forceinline__ void embedding_forward(X* out, const u32* tokens, const X* wte, const X* wpe, long bt, int T,
                                                  int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= bt * C) return;
    long row = i / C;
    int c = (int)(i % C);
    int t = (int)(row % T);
    long token = tokens[row];
    store(out, i, to_float(wte[token * C + c]) + to_float(wpe[(long)t * C + c]));
}
// ANCHOR_END: embedding_forward

extern "C" __global__ void embedding_forward_f32(float* out, const u32* tokens, const float* wte, const float* wpe,
                                                 long bt, int T, int C) {
    embedding_forward(out, tokens, wte, wpe, bt, T, C);
}
extern "C" __global__ void embedding_forward_bf16(bf16* out, const u32* tokens, const bf16* wte, const bf16* wpe,
                                                  long bt, int T, int C) {
    embedding_forward(out, tokens, wte, wpe, bt, T, C);
}

// ANCHOR: embedding_backward
// The position gradient: dwpe[t] += sum over b of dout[b, t]. One thread per (t, c), looping
// over b in order: each element is summed by one thread in the CPU's order (deterministic).
template <typename X>
__device__ __forceinline__ void embedding_backward_wpe(float* dwpe, const X* dout, int B, int T, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;  // t C + c
    if (i >= (long)T * C) return;
    float sum = dwpe[i];
    for (int b = 0; b < B; b++) sum += to_float(dout[(long)b * T * C + i]);
    dwpe[i] = sum;
}

// The token gradient is a scatter-add: dwte[tokens[b, t]] += dout[b, t]. Two positions may hold
// the same token, so one thread per element of dout adds with atomicAdd: correct, but the order
// of the additions (and so the last bits of dwte) changes from run to run, unlike the CPU.
template <typename X>
__device__ __forceinline__ void embedding_backward_wte(float* dwte, const X* dout, const u32* tokens, long bt, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;  // (b T + t) C + c
    if (i >= bt * C) return;
    long row = i / C;
    int c = (int)(i % C);
    long token = tokens[row];
    atomicAdd(&dwte[token * C + c], to_float(dout[i]));
}
// ANCHOR_END: embedding_backward

extern "C" __global__ void embedding_backward_wpe_f32(float* dwpe, const float* dout, int B, int T, int C) {
    embedding_backward_wpe(dwpe, dout, B, T, C);
}
extern "C" __global__ void embedding_backward_wpe_bf16(float* dwpe, const bf16* dout, int B, int T, int C) {
    embedding_backward_wpe(dwpe, dout, B, T, C);
}
extern "C" __global__ void embedding_backward_wte_f32(float* dwte, const float* dout, const u32* tokens, long bt,
                                                      int C) {
    embedding_backward_wte(dwte, dout, tokens, bt, C);
}
extern "C" __global__ void embedding_backward_wte_bf16(float* dwte, const bf16* dout, const u32* tokens, long bt,
                                                       int C) {
    embedding_backward_wte(dwte, dout, tokens, bt, C);
}
