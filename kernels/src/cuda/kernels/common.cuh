// Prefixed to every .cu file of the CUDA backend. No #include: NVRTC compiles this with no
// include path, so a machine needs only the driver, libnvrtc and libcublas, not the toolkit's
// headers. bf16 is therefore done by hand: it is the top half of an f32.

typedef unsigned short bf16;  // raw bits
typedef unsigned int u32;

// ANCHOR: bf16
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((unsigned int)x) << 16); }

// f32 -> bf16, rounding to nearest, ties to even (what `half::bf16::from_f32` does); NaN stays NaN.
__device__ __forceinline__ bf16 bf16_from_float(float f) {
    unsigned int bits = __float_as_uint(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16)((bits >> 16) | 0x0040u);
    unsigned int rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (bf16)((bits + rounding) >> 16);
}

// Stores a float into either element type: `store(p, i, v)` is `p[i] = v`.
__device__ __forceinline__ void store(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, long i, float v) { p[i] = bf16_from_float(v); }
// ANCHOR_END: bf16

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// `shared` must hold 32 floats. Safe to call twice in a row (it syncs before reuse).
__device__ __forceinline__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : __int_as_float(0xff800000);  // -inf
    return warp_max(v);
}
