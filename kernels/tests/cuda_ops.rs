//! The CUDA ops against the CPU ops they mirror.
//!
//! Two kinds of tests, both `#[ignore]`d because an ordinary machine has neither:
//! - `nvrtc_compiles_every_kernel` needs only libnvrtc (no GPU): every `.cu` file compiles for
//!   sm_80 and sm_90, to the cubin a GPU loads and to the PTX fallback, and defines every kernel
//!   its `Source` lists.
//!   `cargo test --release -p kernels --test cuda_ops -- --ignored nvrtc`
//! - the others need a GPU: each op, forward and backward, on random inputs, against the CPU, in
//!   f32 with tolerances tight enough that a wrong index fails, and in bf16 for a few ops.
//!   `cargo test --release -p kernels --test cuda_ops -- --ignored`
//!   They fail, never pass, where there is no GPU. They run on as many test threads as the
//!   runner likes: each op holds the GPU's lock (`Gpu::exclusive`) from its first launch to its
//!   last, and each thread hears only of its own launches' errors.
//!
//! Sizes are odd on purpose (T = 7, C = 12, V = 50 padded to 64): nothing is a multiple of 32,
//! so a missing bounds check or a wrong stride shows. Gradient buffers start nonzero on both
//! sides, so a backward op that overwrites instead of accumulating fails.

use kernels::Rng;
use kernels::cuda::ops as gpu_ops;
use kernels::cuda::{DType, DevBuffer, Gpu};
use kernels::ops;
use kernels::ops::matmul::{MatMut, MatRef};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Helpers.

fn gpu() -> Arc<Gpu> {
    Gpu::get(0).unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"))
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0.0; n];
    Rng::new(seed).fill_normal(&mut v, 1.0);
    v
}

/// `x` rounded to bf16 and back: what the GPU sees of a host f32 copied into a bf16 buffer.
fn bf16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

fn upload(gpu: &Arc<Gpu>, data: &[f32], dtype: DType) -> DevBuffer {
    let mut buf = DevBuffer::uninit(gpu, data.len(), dtype).unwrap_or_else(|e| panic!("{e}"));
    buf.view_mut().copy_from_f32(data).unwrap_or_else(|e| panic!("{e}"));
    buf
}

fn download(buf: &DevBuffer) -> Vec<f32> {
    buf.view().to_vec_f32().unwrap_or_else(|e| panic!("{e}"))
}

/// |got - want| <= abs + rel * |want| for every element; names the first that is not.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(err <= abs + rel * w.abs(), "{what}[{i}]: GPU {g}, CPU {w} (error {err:e})");
        assert!(g.is_finite() == w.is_finite(), "{what}[{i}]: GPU {g}, CPU {w}");
        worst = worst.max(err);
    }
    println!("{what}: {} elements agree, largest difference {worst:e}", got.len());
}

/// f32 tolerances: elementwise ops and short reductions.
const REL: f32 = 1e-5;
const ABS: f32 = 1e-6;
/// f32 tolerances for results of matmuls (cuBLAS sums in its own order).
const MM_REL: f32 = 1e-4;
const MM_ABS: f32 = 1e-5;
/// bf16 results: bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%).
const BF_REL: f32 = 2e-2;
const BF_ABS: f32 = 2e-2;

// ---------------------------------------------------------------------------------------------
// NVRTC, no GPU needed.

#[test]
#[ignore = "needs libnvrtc"]
fn nvrtc_compiles_every_kernel() {
    use kernels::cuda::modules::{self, Compiled, Target};
    // SAFETY: a dlopen and a dlclose of libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        panic!("libnvrtc not found (tried {})", kernels::cuda::library_names("nvrtc"));
    }
    let archs = modules::nvrtc_architectures().unwrap_or_else(|e| panic!("{e}"));
    println!("NVRTC {:?} writes code for {archs:?}", modules::nvrtc_version());
    for capability in [(8, 0), (9, 0)] {
        let arch = capability.0 * 10 + capability.1;
        // What a GPU of this architecture loads (its own code), and the PTX fallback.
        assert_eq!(Target::choose(capability, &archs), Some(Target::Cubin(arch)), "NVRTC knows sm_{arch}");
        for target in [Target::Cubin(arch), Target::Ptx(arch)] {
            for source in gpu_ops::sources() {
                let what = format!("{} for {}", source.file, target.name());
                let compiled = modules::compile(source, target).unwrap_or_else(|e| panic!("{e}"));
                for kernel in source.kernels {
                    assert!(compiled.defines(kernel), "{what}: no kernel {kernel}");
                }
                if let Compiled::Ptx(ptx) = &compiled {
                    let entries = ptx.matches(".entry ").count();
                    assert_eq!(entries, source.kernels.len(), "{what}: kernels its Source does not list");
                    if let Some(ptxas) = std::env::var_os("PTXAS") {
                        assemble(&ptxas, ptx, source.file, capability);
                    }
                }
            }
        }
    }
}

/// Runs NVIDIA's PTX assembler on `ptx` (what the driver does at load time): catches what NVRTC
/// lets through, such as a kernel that needs more registers than its `__launch_bounds__` allow.
fn assemble(ptxas: &std::ffi::OsStr, ptx: &str, file: &str, (major, minor): (i32, i32)) {
    let dir = std::env::temp_dir().join(format!("ptx-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{file}.sm_{major}{minor}.ptx"));
    std::fs::write(&path, ptx).unwrap();
    let out = std::process::Command::new(ptxas)
        .arg(format!("-arch=sm_{major}{minor}"))
        .arg(&path)
        .args(["-o", "/dev/null"])
        .output()
        .unwrap_or_else(|e| panic!("running ptxas: {e}"));
    assert!(out.status.success(), "ptxas on {file} for sm_{major}{minor}: {}", String::from_utf8_lossy(&out.stderr));
}

// ---------------------------------------------------------------------------------------------
// Matmul and the linear layer.

/// The CPU's C (+)= op(A) op(B), with A stored [k, m] when a_t and B stored [n, k] when b_t.
#[allow(clippy::too_many_arguments)]
fn cpu_matmul(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, a_t: bool, b_t: bool, acc: bool) {
    let a = if a_t { MatRef::row_major(a, k, m).t() } else { MatRef::row_major(a, m, k) };
    let b = if b_t { MatRef::row_major(b, n, k).t() } else { MatRef::row_major(b, k, n) };
    ops::matmul::gemm(MatMut::row_major(c, m, n), a, b, acc);
}

#[test]
#[ignore = "needs a CUDA device"]
fn matmul_matches_cpu_for_every_transpose_and_accumulate() {
    let gpu = gpu();
    let (m, k, n) = (7, 13, 5); // all different, so a swapped dimension fails
    for a_t in [false, true] {
        for b_t in [false, true] {
            for accumulate in [false, true] {
                let what = format!("matmul a_t={a_t} b_t={b_t} accumulate={accumulate}");
                let a = random(m * k, 1);
                let b = random(k * n, 2);
                let mut want = random(m * n, 3);
                let mut c_dev = upload(&gpu, &want, DType::F32);
                let (a_dev, b_dev) = (upload(&gpu, &a, DType::F32), upload(&gpu, &b, DType::F32));
                gpu_ops::matmul(c_dev.view_mut(), a_dev.view(), b_dev.view(), m, k, n, a_t, b_t, accumulate);
                cpu_matmul(&mut want, &a, &b, m, k, n, a_t, b_t, accumulate);
                assert_close(&what, &download(&c_dev), &want, MM_REL, MM_ABS);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn matmul_bf16_inputs_into_f32_and_bf16() {
    let gpu = gpu();
    let (m, k, n) = (9, 40, 11);
    for (a_t, b_t) in [(false, false), (true, false), (false, true)] {
        let a = bf16_round(&random(m * k, 4));
        let b = bf16_round(&random(k * n, 5));
        let c0 = bf16_round(&random(m * n, 6));
        let mut want = c0.clone();
        cpu_matmul(&mut want, &a, &b, m, k, n, a_t, b_t, true);
        let (a_dev, b_dev) = (upload(&gpu, &a, DType::BF16), upload(&gpu, &b, DType::BF16));
        // f32 output: only the inputs are rounded, the sum is f32.
        let mut c32 = upload(&gpu, &c0, DType::F32);
        gpu_ops::matmul(c32.view_mut(), a_dev.view(), b_dev.view(), m, k, n, a_t, b_t, true);
        assert_close(&format!("bf16 matmul into f32 a_t={a_t} b_t={b_t}"), &download(&c32), &want, MM_REL, 1e-4);
        // bf16 output: rounded once more.
        let mut c16 = upload(&gpu, &c0, DType::BF16);
        gpu_ops::matmul(c16.view_mut(), a_dev.view(), b_dev.view(), m, k, n, a_t, b_t, true);
        assert_close(&format!("bf16 matmul into bf16 a_t={a_t} b_t={b_t}"), &download(&c16), &want, BF_REL, BF_ABS);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn linear_forward_and_backward_match_cpu() {
    let gpu = gpu();
    let (bt, c_in, c_out) = (14, 12, 36);
    let inp = random(bt * c_in, 1);
    let weight = random(c_in * c_out, 2);
    let bias = random(c_out, 3);
    let dout = random(bt * c_out, 4);
    let (inp_d, weight_d, bias_d, dout_d) = (
        upload(&gpu, &inp, DType::F32),
        upload(&gpu, &weight, DType::F32),
        upload(&gpu, &bias, DType::F32),
        upload(&gpu, &dout, DType::F32),
    );
    for with_bias in [true, false] {
        let bias_cpu = with_bias.then_some(&bias[..]);
        let mut want = vec![0.0; bt * c_out];
        ops::matmul::linear_forward(&mut want, &inp, &weight, bias_cpu, bt, c_in, c_out);
        // Start from garbage: forward overwrites.
        let mut out_d = upload(&gpu, &random(bt * c_out, 9), DType::F32);
        let bias_gpu = with_bias.then(|| bias_d.view());
        gpu_ops::linear_forward(out_d.view_mut(), inp_d.view(), weight_d.view(), bias_gpu, bt, c_in, c_out);
        assert_close(&format!("linear_forward bias={with_bias}"), &download(&out_d), &want, MM_REL, MM_ABS);
    }
    for with_dinp_and_bias in [true, false] {
        let (mut dinp, mut dweight, mut dbias) = (random(bt * c_in, 5), random(c_in * c_out, 6), random(c_out, 7));
        let mut dinp_d = upload(&gpu, &dinp, DType::F32);
        let mut dweight_d = upload(&gpu, &dweight, DType::F32);
        let mut dbias_d = upload(&gpu, &dbias, DType::F32);
        let dinp_before = dinp.clone();
        let dbias_before = dbias.clone();
        if with_dinp_and_bias {
            ops::matmul::linear_backward(
                Some(&mut dinp),
                &mut dweight,
                Some(&mut dbias),
                &dout,
                &inp,
                &weight,
                bt,
                c_in,
                c_out,
            );
            gpu_ops::linear_backward(
                Some(dinp_d.view_mut()),
                dweight_d.view_mut(),
                Some(dbias_d.view_mut()),
                dout_d.view(),
                inp_d.view(),
                weight_d.view(),
                bt,
                c_in,
                c_out,
            );
        } else {
            ops::matmul::linear_backward(None, &mut dweight, None, &dout, &inp, &weight, bt, c_in, c_out);
            gpu_ops::linear_backward(
                None,
                dweight_d.view_mut(),
                None,
                dout_d.view(),
                inp_d.view(),
                weight_d.view(),
                bt,
                c_in,
                c_out,
            );
            assert_eq!(download(&dinp_d), dinp_before, "dinp untouched when not asked for");
            assert_eq!(download(&dbias_d), dbias_before, "dbias untouched when not asked for");
        }
        let what = |name: &str| format!("linear_backward {name} (dinp and dbias: {with_dinp_and_bias})");
        assert_close(&what("dinp"), &download(&dinp_d), &dinp, MM_REL, MM_ABS);
        assert_close(&what("dweight"), &download(&dweight_d), &dweight, MM_REL, MM_ABS);
        assert_close(&what("dbias"), &download(&dbias_d), &dbias, REL, 1e-5);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn linear_bf16_matches_cpu_on_rounded_inputs() {
    let gpu = gpu();
    let (bt, c_in, c_out) = (14, 12, 36);
    let inp = bf16_round(&random(bt * c_in, 1));
    let weight = bf16_round(&random(c_in * c_out, 2));
    let bias = bf16_round(&random(c_out, 3));
    let dout = bf16_round(&random(bt * c_out, 4));
    let x = DType::BF16;
    let (inp_d, weight_d, bias_d, dout_d) =
        (upload(&gpu, &inp, x), upload(&gpu, &weight, x), upload(&gpu, &bias, x), upload(&gpu, &dout, x));
    let mut want = vec![0.0; bt * c_out];
    ops::matmul::linear_forward(&mut want, &inp, &weight, Some(&bias), bt, c_in, c_out);
    let mut out_d = DevBuffer::zeros(&gpu, bt * c_out, x).unwrap();
    gpu_ops::linear_forward(out_d.view_mut(), inp_d.view(), weight_d.view(), Some(bias_d.view()), bt, c_in, c_out);
    assert_close("bf16 linear_forward", &download(&out_d), &want, BF_REL, BF_ABS);

    let dinp0 = bf16_round(&random(bt * c_in, 5));
    let (mut dinp, mut dweight, mut dbias) = (dinp0.clone(), random(c_in * c_out, 6), random(c_out, 7));
    let mut dinp_d = upload(&gpu, &dinp, x);
    let mut dweight_d = upload(&gpu, &dweight, DType::F32);
    let mut dbias_d = upload(&gpu, &dbias, DType::F32);
    ops::matmul::linear_backward(
        Some(&mut dinp),
        &mut dweight,
        Some(&mut dbias),
        &dout,
        &inp,
        &weight,
        bt,
        c_in,
        c_out,
    );
    gpu_ops::linear_backward(
        Some(dinp_d.view_mut()),
        dweight_d.view_mut(),
        Some(dbias_d.view_mut()),
        dout_d.view(),
        inp_d.view(),
        weight_d.view(),
        bt,
        c_in,
        c_out,
    );
    assert_close("bf16 linear_backward dinp", &download(&dinp_d), &dinp, BF_REL, BF_ABS);
    // f32 gradients of bf16 inputs: only the inputs were rounded, identically on both sides.
    assert_close("bf16 linear_backward dweight", &download(&dweight_d), &dweight, MM_REL, 1e-4);
    assert_close("bf16 linear_backward dbias", &download(&dbias_d), &dbias, MM_REL, 1e-5);
}

/// linear_gelu_forward against the CPU's linear_forward then gelu_forward, both outputs; `x` is
/// the activation type (inputs rounded to it on both sides in bf16).
fn linear_gelu_check(bt: usize, c_in: usize, c_out: usize, x: DType) {
    let gpu = gpu();
    let bf = x == DType::BF16;
    let r = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
    let inp = r(random(bt * c_in, 1));
    let weight = r(random(c_in * c_out, 2));
    let bias = r(random(c_out, 3));
    let (mut pre_gelu, mut out) = (vec![0.0; bt * c_out], vec![0.0; bt * c_out]);
    ops::matmul::linear_forward(&mut pre_gelu, &inp, &weight, Some(&bias), bt, c_in, c_out);
    ops::gelu::gelu_forward(&mut out, &pre_gelu);
    let (inp_d, weight_d, bias_d) = (upload(&gpu, &inp, x), upload(&gpu, &weight, x), upload(&gpu, &bias, x));
    // Garbage in both outputs: forward overwrites.
    let mut out_d = upload(&gpu, &random(bt * c_out, 8), x);
    let mut pre_d = upload(&gpu, &random(bt * c_out, 9), x);
    gpu_ops::linear_gelu_forward(
        out_d.view_mut(),
        pre_d.view_mut(),
        inp_d.view(),
        weight_d.view(),
        bias_d.view(),
        bt,
        c_in,
        c_out,
    );
    let path = if bf && c_out.is_multiple_of(8) { "fused" } else { "unfused" };
    let what = |name: &str| format!("{x} linear_gelu_forward {name} ({path}, C_out = {c_out})");
    // f32: short sums (C_in terms) in cuBLAS's order, then GELU; bf16: each output rounded once.
    let (rel, abs) = if bf { (BF_REL, BF_ABS) } else { (MM_REL, MM_ABS) };
    assert_close(&what("pre_gelu"), &download(&pre_d), &pre_gelu, rel, abs);
    assert_close(&what("out"), &download(&out_d), &out, rel, abs);
}

#[test]
#[ignore = "needs a CUDA device"]
fn linear_gelu_forward_matches_cpu_in_f32() {
    // In f32 never fused (see linear_gelu_forward): linear_forward (the BIAS epilogue), then the
    // GELU kernel, whatever C_out.
    linear_gelu_check(14, 13, 40, DType::F32);
    linear_gelu_check(14, 13, 36, DType::F32);
    // Wider than one tile of any kernel, so that more than one block writes the outputs.
    linear_gelu_check(70, 48, 264, DType::F32);
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_bias_at_an_odd_offset_takes_the_path_without_an_epilogue() {
    // Biases are views into the flat parameter buffer, at any element offset: one element in,
    // 2 (bf16) or 4 (f32) bytes from an aligned address, too little for cuBLASLt's epilogue.
    let gpu = gpu();
    let (bt, c_in, c_out) = (6, 5, 24);
    for x in [DType::F32, DType::BF16] {
        let bf = x == DType::BF16;
        let r = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
        let (inp, weight, padded) = (r(random(bt * c_in, 1)), r(random(c_in * c_out, 2)), r(random(c_out + 1, 3)));
        let bias = &padded[1..];
        let mut want = vec![0.0; bt * c_out];
        ops::matmul::linear_forward(&mut want, &inp, &weight, Some(bias), bt, c_in, c_out);
        let (inp_d, weight_d, padded_d) = (upload(&gpu, &inp, x), upload(&gpu, &weight, x), upload(&gpu, &padded, x));
        let mut out_d = upload(&gpu, &random(bt * c_out, 8), x);
        let bias_d = padded_d.view().slice(1..c_out + 1);
        gpu_ops::linear_forward(out_d.view_mut(), inp_d.view(), weight_d.view(), Some(bias_d), bt, c_in, c_out);
        let (rel, abs) = if bf { (BF_REL, BF_ABS) } else { (MM_REL, MM_ABS) };
        assert_close(&format!("{x} linear_forward, bias at offset 1"), &download(&out_d), &want, rel, abs);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn linear_gelu_bf16_matches_cpu_on_rounded_inputs() {
    // C_out = 40, a multiple of 8: cuBLASLt's GELU_AUX_BIAS epilogue, in one matmul.
    linear_gelu_check(14, 13, 40, DType::BF16);
    // C_out = 36 is not: linear_forward, then the GELU kernel.
    linear_gelu_check(14, 13, 36, DType::BF16);
    linear_gelu_check(70, 48, 264, DType::BF16);
}

// ---------------------------------------------------------------------------------------------
// Embedding.

/// B = 3 rows of T = 7 tokens from V = 50 (Vp = 64), with repeats (the scatter-add must add).
fn tokens() -> Vec<u32> {
    let mut rng = Rng::new(11);
    let mut tokens: Vec<u32> = (0..21).map(|_| rng.below(50) as u32).collect();
    tokens[5] = tokens[0];
    tokens[12] = tokens[0];
    tokens[20] = 49;
    tokens
}

#[test]
#[ignore = "needs a CUDA device"]
fn embedding_forward_and_backward_match_cpu() {
    let gpu = gpu();
    let (vp, t_max, t_len, c) = (64, 9, 7, 12);
    let tokens = tokens();
    let bt = tokens.len();
    let (wte, wpe) = (random(vp * c, 1), random(t_max * c, 2));
    let mut want = vec![0.0; bt * c];
    ops::embedding::embedding_forward(&mut want, &tokens, &wte, &wpe, t_len, c);
    let mut out_d = upload(&gpu, &random(bt * c, 3), DType::F32);
    let (wte_d, wpe_d) = (upload(&gpu, &wte, DType::F32), upload(&gpu, &wpe, DType::F32));
    gpu_ops::embedding_forward(out_d.view_mut(), &tokens, wte_d.view(), wpe_d.view(), t_len, c);
    assert_close("embedding_forward", &download(&out_d), &want, 0.0, 0.0);

    let dout = random(bt * c, 4);
    let (mut dwte, mut dwpe) = (random(vp * c, 5), random(t_max * c, 6));
    let mut dwte_d = upload(&gpu, &dwte, DType::F32);
    let mut dwpe_d = upload(&gpu, &dwpe, DType::F32);
    ops::embedding::embedding_backward(&mut dwte, &mut dwpe, &dout, &tokens, t_len, c);
    let dout_d = upload(&gpu, &dout, DType::F32);
    gpu_ops::embedding_backward(dwte_d.view_mut(), dwpe_d.view_mut(), dout_d.view(), &tokens, t_len, c);
    assert_close("embedding_backward dwte", &download(&dwte_d), &dwte, REL, ABS);
    // One thread per element, summing over b in the CPU's order: bit for bit.
    assert_close("embedding_backward dwpe", &download(&dwpe_d), &dwpe, 0.0, 0.0);
}

#[test]
#[ignore = "needs a CUDA device"]
fn embedding_bf16_matches_cpu() {
    let gpu = gpu();
    let (vp, t_len, c) = (64, 7, 12);
    let tokens = tokens();
    let bt = tokens.len();
    let (wte, wpe) = (bf16_round(&random(vp * c, 1)), bf16_round(&random(t_len * c, 2)));
    let mut want = vec![0.0; bt * c];
    ops::embedding::embedding_forward(&mut want, &tokens, &wte, &wpe, t_len, c);
    let mut out_d = DevBuffer::zeros(&gpu, bt * c, DType::BF16).unwrap();
    let (wte_d, wpe_d) = (upload(&gpu, &wte, DType::BF16), upload(&gpu, &wpe, DType::BF16));
    gpu_ops::embedding_forward(out_d.view_mut(), &tokens, wte_d.view(), wpe_d.view(), t_len, c);
    // The sum of two bf16 values, rounded to bf16 once.
    assert_close("bf16 embedding_forward", &download(&out_d), &bf16_round(&want), 0.0, 0.0);

    let dout = bf16_round(&random(bt * c, 4));
    let (mut dwte, mut dwpe) = (random(vp * c, 5), random(t_len * c, 6));
    let mut dwte_d = upload(&gpu, &dwte, DType::F32);
    let mut dwpe_d = upload(&gpu, &dwpe, DType::F32);
    ops::embedding::embedding_backward(&mut dwte, &mut dwpe, &dout, &tokens, t_len, c);
    let dout_d = upload(&gpu, &dout, DType::BF16);
    gpu_ops::embedding_backward(dwte_d.view_mut(), dwpe_d.view_mut(), dout_d.view(), &tokens, t_len, c);
    assert_close("bf16 embedding_backward dwte", &download(&dwte_d), &dwte, REL, ABS);
    assert_close("bf16 embedding_backward dwpe", &download(&dwpe_d), &dwpe, 0.0, 0.0);
}

// ---------------------------------------------------------------------------------------------
// LayerNorm.

struct LayerNormCase {
    inp: Vec<f32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    dout: Vec<f32>,
}

fn layernorm_case(rows: usize, c: usize, round: bool) -> LayerNormCase {
    let r = |v: Vec<f32>| if round { bf16_round(&v) } else { v };
    // An offset mean, so that a one-pass variance would lose digits.
    let inp: Vec<f32> = random(rows * c, 1).iter().map(|x| 3.0 + 2.0 * x).collect();
    LayerNormCase { inp: r(inp), weight: r(random(c, 2)), bias: r(random(c, 3)), dout: r(random(rows * c, 4)) }
}

fn layernorm_check(rows: usize, c: usize, x: DType) {
    let gpu = gpu();
    let bf = x == DType::BF16;
    let (rel, abs) = if bf { (BF_REL, BF_ABS) } else { (REL, 1e-5) };
    let case = layernorm_case(rows, c, bf);
    let (mut out, mut mean, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
    ops::layernorm::layernorm_forward(&mut out, &mut mean, &mut rstd, &case.inp, &case.weight, &case.bias, c);
    let (inp_d, weight_d, bias_d) =
        (upload(&gpu, &case.inp, x), upload(&gpu, &case.weight, x), upload(&gpu, &case.bias, x));
    let mut out_d = upload(&gpu, &random(rows * c, 9), x);
    let mut mean_d = upload(&gpu, &random(rows, 10), DType::F32);
    let mut rstd_d = upload(&gpu, &random(rows, 11), DType::F32);
    gpu_ops::layernorm_forward(
        out_d.view_mut(),
        mean_d.view_mut(),
        rstd_d.view_mut(),
        inp_d.view(),
        weight_d.view(),
        bias_d.view(),
        c,
    );
    assert_close(&format!("{x} layernorm_forward out"), &download(&out_d), &out, rel, abs);
    // The statistics are f32 of (possibly rounded) inputs: tight in both types.
    assert_close(&format!("{x} layernorm_forward mean"), &download(&mean_d), &mean, REL, 1e-5);
    assert_close(&format!("{x} layernorm_forward rstd"), &download(&rstd_d), &rstd, REL, 1e-5);

    // Backward from the CPU's statistics on both sides, so that only backward is compared.
    let dinp0 = if bf { bf16_round(&random(rows * c, 5)) } else { random(rows * c, 5) };
    let (mut dinp, mut dweight, mut dbias) = (dinp0.clone(), random(c, 6), random(c, 7));
    let mut dinp_d = upload(&gpu, &dinp, x);
    let mut dweight_d = upload(&gpu, &dweight, DType::F32);
    let mut dbias_d = upload(&gpu, &dbias, DType::F32);
    let (mean_d, rstd_d) = (upload(&gpu, &mean, DType::F32), upload(&gpu, &rstd, DType::F32));
    let dout_d = upload(&gpu, &case.dout, x);
    ops::layernorm::layernorm_backward(
        &mut dinp,
        &mut dweight,
        &mut dbias,
        &case.dout,
        &case.inp,
        &case.weight,
        &mean,
        &rstd,
        c,
    );
    gpu_ops::layernorm_backward(
        dinp_d.view_mut(),
        dweight_d.view_mut(),
        dbias_d.view_mut(),
        dout_d.view(),
        inp_d.view(),
        weight_d.view(),
        mean_d.view(),
        rstd_d.view(),
        c,
    );
    assert_close(&format!("{x} layernorm_backward dinp"), &download(&dinp_d), &dinp, rel, abs);
    // Sums over the rows, in another order than the CPU's.
    assert_close(&format!("{x} layernorm_backward dweight"), &download(&dweight_d), &dweight, MM_REL, 5e-5);
    assert_close(&format!("{x} layernorm_backward dbias"), &download(&dbias_d), &dbias, MM_REL, 5e-5);
}

#[test]
#[ignore = "needs a CUDA device"]
fn layernorm_forward_and_backward_match_cpu() {
    layernorm_check(21, 12, DType::F32);
    // More rows than one block of the column sums covers, and more channels than a warp's lanes.
    layernorm_check(70, 100, DType::F32);
}

#[test]
#[ignore = "needs a CUDA device"]
fn layernorm_bf16_matches_cpu() {
    layernorm_check(21, 12, DType::BF16);
}

// ---------------------------------------------------------------------------------------------
// Attention.

fn attention_check(b: usize, t: usize, c: usize, h: usize, x: DType) {
    let gpu = gpu();
    let bf = x == DType::BF16;
    let r = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
    let qkv = r(random(b * t * 3 * c, 1));
    let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * h * t * t]);
    ops::attention::attention_forward(&mut out, &mut att, &qkv, t, c, h);
    let qkv_d = upload(&gpu, &qkv, x);
    // Garbage in the outputs: forward overwrites, the masked half included.
    let mut out_d = upload(&gpu, &random(b * t * c, 8), x);
    let mut att_d = upload(&gpu, &random(b * h * t * t, 9), x);
    gpu_ops::attention_forward(out_d.view_mut(), att_d.view_mut(), qkv_d.view(), t, c, h);
    let (rel, abs) = if bf { (BF_REL, BF_ABS) } else { (MM_REL, MM_ABS) };
    let att_got = download(&att_d);
    assert_close(&format!("{x} attention_forward att"), &att_got, &att, rel, abs);
    assert_close(&format!("{x} attention_forward out"), &download(&out_d), &out, rel, abs);
    for (i, &p) in att_got.iter().enumerate() {
        let (row, u) = (i / t, i % t);
        if u > row % t {
            assert_eq!(p, 0.0, "att[{i}] is above the diagonal: must be exactly 0");
        }
    }

    // Backward from the CPU's att on both sides.
    let dout = r(random(b * t * c, 2));
    let mut dqkv = r(random(b * t * 3 * c, 3));
    let mut dqkv_d = upload(&gpu, &dqkv, x);
    let (dout_d, att_cpu_d) = (upload(&gpu, &dout, x), upload(&gpu, &att, x));
    let att_used = if bf { bf16_round(&att) } else { att.clone() };
    ops::attention::attention_backward(&mut dqkv, &dout, &qkv, &att_used, t, c, h);
    gpu_ops::attention_backward(dqkv_d.view_mut(), dout_d.view(), qkv_d.view(), att_cpu_d.view(), t, c, h);
    let (rel, abs) = if bf { (BF_REL, 5e-2) } else { (MM_REL, 1e-4) };
    assert_close(&format!("{x} attention_backward dqkv"), &download(&dqkv_d), &dqkv, rel, abs);
}

#[test]
#[ignore = "needs a CUDA device"]
fn attention_forward_and_backward_match_cpu() {
    attention_check(2, 7, 12, 3, DType::F32);
    // T beyond a warp's 32 lanes: each lane loops over several columns of a row.
    attention_check(1, 37, 16, 2, DType::F32);
}

#[test]
#[ignore = "needs a CUDA device"]
fn attention_bf16_matches_cpu() {
    attention_check(2, 7, 12, 3, DType::BF16);
}

// ---------------------------------------------------------------------------------------------
// Elementwise.

#[test]
#[ignore = "needs a CUDA device"]
fn gelu_forward_and_backward_match_cpu() {
    let gpu = gpu();
    let n = 1000; // not a multiple of the block
    let mut inp = random(n, 1);
    inp[0] = 0.0;
    inp[1] = -30.0;
    inp[2] = 12.0;
    let mut want = vec![0.0; n];
    ops::gelu::gelu_forward(&mut want, &inp);
    let inp_d = upload(&gpu, &inp, DType::F32);
    let mut out_d = upload(&gpu, &random(n, 2), DType::F32);
    gpu_ops::gelu_forward(out_d.view_mut(), inp_d.view());
    assert_close("gelu_forward", &download(&out_d), &want, REL, ABS);

    let dout = random(n, 3);
    let mut dinp = random(n, 4);
    let mut dinp_d = upload(&gpu, &dinp, DType::F32);
    ops::gelu::gelu_backward(&mut dinp, &inp, &dout);
    let dout_d = upload(&gpu, &dout, DType::F32);
    gpu_ops::gelu_backward(dinp_d.view_mut(), inp_d.view(), dout_d.view());
    assert_close("gelu_backward", &download(&dinp_d), &dinp, REL, ABS);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gelu_bf16_matches_cpu() {
    let gpu = gpu();
    let n = 1000;
    let inp = bf16_round(&random(n, 1));
    let mut want = vec![0.0; n];
    ops::gelu::gelu_forward(&mut want, &inp);
    let inp_d = upload(&gpu, &inp, DType::BF16);
    let mut out_d = DevBuffer::zeros(&gpu, n, DType::BF16).unwrap();
    gpu_ops::gelu_forward(out_d.view_mut(), inp_d.view());
    assert_close("bf16 gelu_forward", &download(&out_d), &want, BF_REL, 1e-2);

    let dout = bf16_round(&random(n, 3));
    let mut dinp = bf16_round(&random(n, 4));
    let mut dinp_d = upload(&gpu, &dinp, DType::BF16);
    ops::gelu::gelu_backward(&mut dinp, &inp, &dout);
    let dout_d = upload(&gpu, &dout, DType::BF16);
    gpu_ops::gelu_backward(dinp_d.view_mut(), inp_d.view(), dout_d.view());
    assert_close("bf16 gelu_backward", &download(&dinp_d), &dinp, BF_REL, BF_ABS);
}

#[test]
#[ignore = "needs a CUDA device"]
fn residual_forward_matches_cpu() {
    let gpu = gpu();
    let n = 777;
    let (a, b) = (random(n, 1), random(n, 2));
    let mut want = vec![0.0; n];
    ops::residual::residual_forward(&mut want, &a, &b);
    for x in [DType::F32, DType::BF16] {
        let (a, b, want) = if x == DType::BF16 {
            let (a, b) = (bf16_round(&a), bf16_round(&b));
            let mut want = vec![0.0; n];
            ops::residual::residual_forward(&mut want, &a, &b);
            (a, b, bf16_round(&want))
        } else {
            (a.clone(), b.clone(), want.clone())
        };
        let (a_d, b_d) = (upload(&gpu, &a, x), upload(&gpu, &b, x));
        let mut out_d = upload(&gpu, &random(n, 3), x);
        gpu_ops::residual_forward(out_d.view_mut(), a_d.view(), b_d.view());
        // One f32 addition, rounded once to X: bit for bit.
        assert_close(&format!("{x} residual_forward"), &download(&out_d), &want, 0.0, 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Loss.

fn softmax_cross_entropy_check(x: DType) {
    let gpu = gpu();
    let bf = x == DType::BF16;
    let (v, vp) = (50, 64);
    let targets = tokens();
    let n = targets.len();
    let mut logits = random(n * vp, 1);
    for (i, z) in logits.iter_mut().enumerate() {
        *z *= 3.0;
        if i % vp >= v {
            *z = 1e3; // padding: must be ignored, however large
        }
    }
    if bf {
        logits = bf16_round(&logits);
    }
    let mut probs = logits.clone();
    let mut losses = vec![0.0; n];
    ops::softmax_cross_entropy::softmax_cross_entropy_forward(&mut probs, &mut losses, &targets, v, vp);
    let mut probs_d = upload(&gpu, &logits, x);
    let mut losses_d = upload(&gpu, &random(n, 2), DType::F32);
    gpu_ops::softmax_cross_entropy_forward(probs_d.view_mut(), losses_d.view_mut(), &targets, v, vp);
    let probs_got = download(&probs_d);
    let (rel, abs) = if bf { (BF_REL, 1e-3) } else { (REL, ABS) };
    assert_close(&format!("{x} softmax_cross_entropy_forward probs"), &probs_got, &probs, rel, abs);
    assert_close(&format!("{x} softmax_cross_entropy_forward losses"), &download(&losses_d), &losses, REL, 1e-5);
    assert!(probs_got.chunks(vp).all(|row| row[v..].iter().all(|&p| p == 0.0)), "padding columns must be 0");

    // Backward from the CPU's probabilities (rounded to X) on both sides.
    let dloss = 1.0 / n as f32;
    let mut dlogits = if bf { bf16_round(&probs) } else { probs.clone() };
    let mut dlogits_d = upload(&gpu, &dlogits, x);
    ops::softmax_cross_entropy::softmax_cross_entropy_backward(&mut dlogits, &targets, dloss, vp);
    gpu_ops::softmax_cross_entropy_backward(dlogits_d.view_mut(), &targets, dloss, vp);
    let (rel, abs) = if bf { (BF_REL, 1e-4) } else { (REL, ABS) };
    assert_close(&format!("{x} softmax_cross_entropy_backward"), &download(&dlogits_d), &dlogits, rel, abs);
}

#[test]
#[ignore = "needs a CUDA device"]
fn softmax_cross_entropy_matches_cpu() {
    softmax_cross_entropy_check(DType::F32);
}

#[test]
#[ignore = "needs a CUDA device"]
fn softmax_cross_entropy_bf16_matches_cpu() {
    softmax_cross_entropy_check(DType::BF16);
}

// ---------------------------------------------------------------------------------------------
// Optimizer.

#[test]
#[ignore = "needs a CUDA device"]
fn adamw_matches_cpu_with_and_without_a_bf16_copy() {
    let gpu = gpu();
    let n = 1001;
    let cfg = ops::adamw::AdamWConfig::default();
    let (lr, wd, scale) = (1e-3, 0.1, 0.7);
    let mut params = random(n, 1);
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let mut params_d = upload(&gpu, &params, DType::F32);
    let mut m_d = upload(&gpu, &m, DType::F32);
    let mut v_d = upload(&gpu, &v, DType::F32);
    let mut copy_d = DevBuffer::zeros(&gpu, n, DType::BF16).unwrap();
    for step in 1..=3u64 {
        let grads = random(n, 10 + step);
        ops::adamw::adamw_update(&mut params, &grads, &mut m, &mut v, cfg, lr, wd, scale, step);
        let grads_d = upload(&gpu, &grads, DType::F32);
        let copy = (step == 3).then(|| copy_d.view_mut());
        gpu_ops::adamw_update(
            params_d.view_mut(),
            copy,
            grads_d.view(),
            m_d.view_mut(),
            v_d.view_mut(),
            cfg,
            lr,
            wd,
            scale,
            step,
        );
        assert_close(&format!("adamw step {step} params"), &download(&params_d), &params, REL, ABS);
        assert_close(&format!("adamw step {step} m"), &download(&m_d), &m, REL, 1e-7);
        assert_close(&format!("adamw step {step} v"), &download(&v_d), &v, REL, 1e-8);
        if step < 3 {
            assert!(download(&copy_d).iter().all(|&p| p == 0.0), "no copy asked for at step {step}");
        }
    }
    // The bf16 copy is the f32 parameters, rounded to nearest even as the host rounds.
    assert_close("adamw bf16 copy", &download(&copy_d), &bf16_round(&download(&params_d)), 0.0, 0.0);
}

#[test]
#[ignore = "needs a CUDA device"]
fn global_norm_matches_cpu() {
    let gpu = gpu();
    for n in [1, 1000, 3 * 512 * 256 + 17] {
        let g = random(n, n as u64);
        let want = ops::grad_norm::global_norm(&g);
        let got = gpu_ops::global_norm(upload(&gpu, &g, DType::F32).view()).unwrap_or_else(|e| panic!("{e}"));
        assert!((got - want).abs() <= 1e-6 * want, "global_norm of {n}: GPU {got}, CPU {want}");
    }
    let empty = DevBuffer::zeros(&gpu, 0, DType::F32).unwrap();
    assert_eq!(gpu_ops::global_norm(empty.view()).unwrap(), 0.0);
}

// ---------------------------------------------------------------------------------------------
// Utilities.

#[test]
#[ignore = "needs a CUDA device"]
fn convert_round_trips_and_rounds_as_the_host_does() {
    let gpu = gpu();
    let n = 1234;
    let mut data = random(n, 1);
    data[0] = 1.0 + 1.0 / 256.0; // halfway between two bf16: ties to even
    data[1] = f32::MAX; // rounds to infinity in bf16, as on the host
    data[2] = -0.0;
    let src = upload(&gpu, &data, DType::F32);
    let mut bf = DevBuffer::zeros(&gpu, n, DType::BF16).unwrap();
    gpu_ops::convert(bf.view_mut(), src.view());
    let rounded = bf16_round(&data);
    let got = download(&bf);
    assert_close("convert f32 -> bf16", &got[2..], &rounded[2..], 0.0, 0.0);
    assert_eq!(got[0], rounded[0], "ties to even");
    assert_eq!(got[1], rounded[1], "overflow");
    let mut back = DevBuffer::zeros(&gpu, n, DType::F32).unwrap();
    gpu_ops::convert(back.view_mut(), bf.view());
    assert_eq!(download(&back), rounded, "bf16 -> f32 is exact");
    let mut same = DevBuffer::zeros(&gpu, n, DType::F32).unwrap();
    gpu_ops::convert(same.view_mut(), src.view());
    assert_eq!(download(&same), data, "f32 -> f32 copies");
    let mut same_bf = DevBuffer::zeros(&gpu, n, DType::BF16).unwrap();
    gpu_ops::convert(same_bf.view_mut(), bf.view());
    assert_eq!(download(&same_bf), rounded, "bf16 -> bf16 copies");
}

#[test]
#[ignore = "needs a CUDA device"]
fn zero_zeroes_a_slice_and_nothing_else() {
    let gpu = gpu();
    for x in [DType::F32, DType::BF16] {
        let mut buf = upload(&gpu, &[1.0, 2.0, 3.0, 4.0, 5.0], x);
        gpu_ops::zero(buf.view_mut().slice_mut(1..4));
        assert_eq!(download(&buf), vec![1.0, 0.0, 0.0, 0.0, 5.0], "{x}");
    }
}
