//! The ops the model calls, on either device: each takes [`View`]s and [`ViewMut`]s and runs the
//! CPU function of `crate::ops` or its GPU twin in `crate::cuda::ops`, as the first argument's
//! variant says (all arguments of one call are on one device; anything else is a bug and
//! panics). The shapes and the math are on the CPU functions.
//!
//! This is the whole of the "backend": the model is written once, against these functions, and
//! never says which device runs it.

use crate::cuda::{self, CudaError};
use crate::ops;
use crate::ops::adamw::AdamWConfig;
use crate::ops::matmul::{MatMut, MatRef};
use crate::tensor::{View, ViewMut};

// ANCHOR: dispatch_example
/// out = inp @ weight + bias. See [`ops::matmul::linear_forward`].
pub fn linear_forward(
    out: ViewMut<'_>,
    inp: View<'_>,
    weight: View<'_>,
    bias: Option<View<'_>>,
    m: usize,
    k: usize,
    n: usize,
) {
    match out {
        ViewMut::Cpu(out) => ops::matmul::linear_forward(out, inp.cpu(), weight.cpu(), bias.map(View::cpu), m, k, n),
        ViewMut::Cuda(out) => cuda::ops::linear_forward(out, inp.cuda(), weight.cuda(), bias.map(View::cuda), m, k, n),
    }
}
// ANCHOR_END: dispatch_example

/// pre_gelu = inp @ weight + bias, out = gelu(pre_gelu): the MLP's first half, one fused matmul on
/// a GPU. See [`ops::matmul::linear_forward`] and [`ops::gelu::gelu_forward`].
#[allow(clippy::too_many_arguments)]
pub fn linear_gelu_forward(
    out: ViewMut<'_>,
    pre_gelu: ViewMut<'_>,
    inp: View<'_>,
    weight: View<'_>,
    bias: View<'_>,
    m: usize,
    k: usize,
    n: usize,
) {
    match out {
        ViewMut::Cpu(out) => {
            let pre_gelu = pre_gelu.cpu();
            ops::matmul::linear_forward(pre_gelu, inp.cpu(), weight.cpu(), Some(bias.cpu()), m, k, n);
            ops::gelu::gelu_forward(out, pre_gelu);
        }
        ViewMut::Cuda(out) => {
            cuda::ops::linear_gelu_forward(out, pre_gelu.cuda(), inp.cuda(), weight.cuda(), bias.cuda(), m, k, n)
        }
    }
}

/// See [`ops::matmul::linear_backward`].
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dinp: Option<ViewMut<'_>>,
    dweight: ViewMut<'_>,
    dbias: Option<ViewMut<'_>>,
    dout: View<'_>,
    inp: View<'_>,
    weight: View<'_>,
    m: usize,
    k: usize,
    n: usize,
) {
    match dweight {
        ViewMut::Cpu(dw) => ops::matmul::linear_backward(
            dinp.map(ViewMut::cpu),
            dw,
            dbias.map(ViewMut::cpu),
            dout.cpu(),
            inp.cpu(),
            weight.cpu(),
            m,
            k,
            n,
        ),
        ViewMut::Cuda(dw) => cuda::ops::linear_backward(
            dinp.map(ViewMut::cuda),
            dw,
            dbias.map(ViewMut::cuda),
            dout.cuda(),
            inp.cuda(),
            weight.cuda(),
            m,
            k,
            n,
        ),
    }
}

/// c [m, n] (+)= op(a) [m, k] · op(b) [k, n], row-major; `a_t`: a is stored [k, m] and used
/// transposed, `b_t`: b is stored [n, k] and used transposed.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: ViewMut<'_>,
    a: View<'_>,
    b: View<'_>,
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
    accumulate: bool,
) {
    match c {
        ViewMut::Cpu(c) => {
            let a = if a_t { MatRef::row_major(a.cpu(), k, m).t() } else { MatRef::row_major(a.cpu(), m, k) };
            let b = if b_t { MatRef::row_major(b.cpu(), n, k).t() } else { MatRef::row_major(b.cpu(), k, n) };
            ops::matmul::gemm(MatMut::row_major(c, m, n), a, b, accumulate);
        }
        ViewMut::Cuda(c) => cuda::ops::matmul(c, a.cuda(), b.cuda(), m, k, n, a_t, b_t, accumulate),
    }
}

/// See [`ops::embedding::embedding_forward`].
pub fn embedding_forward(out: ViewMut<'_>, tokens: &[u32], wte: View<'_>, wpe: View<'_>, t_len: usize, c: usize) {
    match out {
        ViewMut::Cpu(out) => ops::embedding::embedding_forward(out, tokens, wte.cpu(), wpe.cpu(), t_len, c),
        ViewMut::Cuda(out) => cuda::ops::embedding_forward(out, tokens, wte.cuda(), wpe.cuda(), t_len, c),
    }
}

/// See [`ops::embedding::embedding_backward`].
pub fn embedding_backward(
    dwte: ViewMut<'_>,
    dwpe: ViewMut<'_>,
    dout: View<'_>,
    tokens: &[u32],
    t_len: usize,
    c: usize,
) {
    match dwte {
        ViewMut::Cpu(dwte) => ops::embedding::embedding_backward(dwte, dwpe.cpu(), dout.cpu(), tokens, t_len, c),
        ViewMut::Cuda(dwte) => cuda::ops::embedding_backward(dwte, dwpe.cuda(), dout.cuda(), tokens, t_len, c),
    }
}

/// See [`ops::layernorm::layernorm_forward`].
pub fn layernorm_forward(
    out: ViewMut<'_>,
    mean: ViewMut<'_>,
    rstd: ViewMut<'_>,
    inp: View<'_>,
    weight: View<'_>,
    bias: View<'_>,
    c: usize,
) {
    match out {
        ViewMut::Cpu(out) => {
            ops::layernorm::layernorm_forward(out, mean.cpu(), rstd.cpu(), inp.cpu(), weight.cpu(), bias.cpu(), c)
        }
        ViewMut::Cuda(out) => {
            cuda::ops::layernorm_forward(out, mean.cuda(), rstd.cuda(), inp.cuda(), weight.cuda(), bias.cuda(), c)
        }
    }
}

/// See [`ops::layernorm::layernorm_backward`].
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: ViewMut<'_>,
    dweight: ViewMut<'_>,
    dbias: ViewMut<'_>,
    dout: View<'_>,
    inp: View<'_>,
    weight: View<'_>,
    mean: View<'_>,
    rstd: View<'_>,
    c: usize,
) {
    match dinp {
        ViewMut::Cpu(dinp) => ops::layernorm::layernorm_backward(
            dinp,
            dweight.cpu(),
            dbias.cpu(),
            dout.cpu(),
            inp.cpu(),
            weight.cpu(),
            mean.cpu(),
            rstd.cpu(),
            c,
        ),
        ViewMut::Cuda(dinp) => cuda::ops::layernorm_backward(
            dinp,
            dweight.cuda(),
            dbias.cuda(),
            dout.cuda(),
            inp.cuda(),
            weight.cuda(),
            mean.cuda(),
            rstd.cuda(),
            c,
        ),
    }
}

/// See [`ops::attention::attention_forward`].
pub fn attention_forward(out: ViewMut<'_>, att: ViewMut<'_>, qkv: View<'_>, t_len: usize, c: usize, n_head: usize) {
    match out {
        ViewMut::Cpu(out) => ops::attention::attention_forward(out, att.cpu(), qkv.cpu(), t_len, c, n_head),
        ViewMut::Cuda(out) => cuda::ops::attention_forward(out, att.cuda(), qkv.cuda(), t_len, c, n_head),
    }
}

/// See [`ops::attention::attention_backward`].
pub fn attention_backward(
    dqkv: ViewMut<'_>,
    dout: View<'_>,
    qkv: View<'_>,
    att: View<'_>,
    t_len: usize,
    c: usize,
    n_head: usize,
) {
    match dqkv {
        ViewMut::Cpu(dqkv) => {
            ops::attention::attention_backward(dqkv, dout.cpu(), qkv.cpu(), att.cpu(), t_len, c, n_head)
        }
        ViewMut::Cuda(dqkv) => {
            cuda::ops::attention_backward(dqkv, dout.cuda(), qkv.cuda(), att.cuda(), t_len, c, n_head)
        }
    }
}

/// See [`ops::gelu::gelu_forward`].
pub fn gelu_forward(out: ViewMut<'_>, inp: View<'_>) {
    match out {
        ViewMut::Cpu(out) => ops::gelu::gelu_forward(out, inp.cpu()),
        ViewMut::Cuda(out) => cuda::ops::gelu_forward(out, inp.cuda()),
    }
}

/// See [`ops::gelu::gelu_backward`].
pub fn gelu_backward(dinp: ViewMut<'_>, inp: View<'_>, dout: View<'_>) {
    match dinp {
        ViewMut::Cpu(dinp) => ops::gelu::gelu_backward(dinp, inp.cpu(), dout.cpu()),
        ViewMut::Cuda(dinp) => cuda::ops::gelu_backward(dinp, inp.cuda(), dout.cuda()),
    }
}

/// See [`ops::residual::residual_forward`].
pub fn residual_forward(out: ViewMut<'_>, a: View<'_>, b: View<'_>) {
    match out {
        ViewMut::Cpu(out) => ops::residual::residual_forward(out, a.cpu(), b.cpu()),
        ViewMut::Cuda(out) => cuda::ops::residual_forward(out, a.cuda(), b.cuda()),
    }
}

/// See [`ops::softmax_cross_entropy::softmax_cross_entropy_forward`].
pub fn softmax_cross_entropy_forward(
    logits_to_probs: ViewMut<'_>,
    losses: ViewMut<'_>,
    targets: &[u32],
    v: usize,
    vp: usize,
) {
    match logits_to_probs {
        ViewMut::Cpu(l) => ops::softmax_cross_entropy::softmax_cross_entropy_forward(l, losses.cpu(), targets, v, vp),
        ViewMut::Cuda(l) => cuda::ops::softmax_cross_entropy_forward(l, losses.cuda(), targets, v, vp),
    }
}

/// See [`ops::softmax_cross_entropy::softmax_cross_entropy_backward`].
pub fn softmax_cross_entropy_backward(probs_to_dlogits: ViewMut<'_>, targets: &[u32], dloss: f32, vp: usize) {
    match probs_to_dlogits {
        ViewMut::Cpu(p) => ops::softmax_cross_entropy::softmax_cross_entropy_backward(p, targets, dloss, vp),
        ViewMut::Cuda(p) => cuda::ops::softmax_cross_entropy_backward(p, targets, dloss, vp),
    }
}

/// See [`ops::adamw::adamw_update`]. `params_copy`: the bf16 copy of the parameters that a
/// mixed-precision run computes with, rewritten from the updated f32 master weights.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    params: ViewMut<'_>,
    params_copy: Option<ViewMut<'_>>,
    grads: View<'_>,
    m: ViewMut<'_>,
    v: ViewMut<'_>,
    cfg: AdamWConfig,
    lr: f32,
    weight_decay: f32,
    grad_scale: f32,
    t: u64,
) {
    match params {
        ViewMut::Cpu(p) => {
            assert!(params_copy.is_none(), "the CPU keeps no bf16 copy");
            ops::adamw::adamw_update(p, grads.cpu(), m.cpu(), v.cpu(), cfg, lr, weight_decay, grad_scale, t)
        }
        ViewMut::Cuda(p) => cuda::ops::adamw_update(
            p,
            params_copy.map(ViewMut::cuda),
            grads.cuda(),
            m.cuda(),
            v.cuda(),
            cfg,
            lr,
            weight_decay,
            grad_scale,
            t,
        ),
    }
}

/// See [`ops::grad_norm::global_norm`]. On a GPU it reads the result back, and so waits for
/// the queued work (and reports its first error).
pub fn global_norm(grads: View<'_>) -> Result<f32, CudaError> {
    match grads {
        View::Cpu(g) => Ok(ops::grad_norm::global_norm(g)),
        View::Cuda(g) => cuda::ops::global_norm(g),
    }
}

/// See [`ops::grad_norm::squared_norm`]. On a GPU: the square of the device's norm (exact to f32,
/// which is all a GPU run's norm promises).
pub fn squared_norm(grads: View<'_>) -> Result<f64, CudaError> {
    match grads {
        View::Cpu(g) => Ok(ops::grad_norm::squared_norm(g)),
        View::Cuda(g) => Ok((cuda::ops::global_norm(g)? as f64).powi(2)),
    }
}

/// dst = src (on a GPU, converting between f32 and bf16 if their types differ).
pub fn copy(dst: ViewMut<'_>, src: View<'_>) {
    match dst {
        ViewMut::Cpu(dst) => dst.copy_from_slice(src.cpu()),
        ViewMut::Cuda(dst) => cuda::ops::convert(dst, src.cuda()),
    }
}

/// dst = 0.
pub fn zero(dst: ViewMut<'_>) {
    match dst {
        ViewMut::Cpu(dst) => dst.fill(0.0),
        ViewMut::Cuda(dst) => cuda::ops::zero(dst),
    }
}
