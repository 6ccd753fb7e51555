// AdamW, one thread per parameter. Parameters, gradients and moments are f32; when the model
// runs in bf16 the kernel also writes the bf16 copy of the updated parameters that forward and
// backward read, in the same pass.

// ANCHOR: adamw
// One step over params, grads, m, v [N], with g = grad_scale * grads (gradient clipping for free):
//
//   m = b1 m + (1 - b1) g              v = b2 v + (1 - b2) g^2
//   m^ = m / (1 - b1^t)                v^ = v / (1 - b2^t)            (bias correction)
//   p = p - lr (m^ / (sqrt(v^) + eps) + weight_decay p)
//
// correction1 = 1 - b1^t and correction2 = 1 - b2^t come from the host (computed in f64, as the
// CPU does). params_copy is a bf16 [N] that gets the new p too, or null.
extern "C" __global__ void adamw_update(float* params, bf16* params_copy, const float* grads, float* m, float* v,
                                        long n, float beta1, float beta2, float eps, float lr, float weight_decay,
                                        float grad_scale, float correction1, float correction2) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grad_scale * grads[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float m_hat = mi / correction1;
    float v_hat = vi / correction2;
    float p = params[i];
    p -= lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
    params[i] = p;
    if (params_copy != nullptr) params_copy[i] = bf16_from_float(p);
}
// ANCHOR_END: adamw
