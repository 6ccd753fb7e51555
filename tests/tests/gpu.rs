//! Chapter 1 on a GPU against chapter 1 on the CPU. Every test needs a CUDA device: they are
//! ignored by default and run by `scripts/gpu-check`, which fails when there is no device.
//! Each one fails (never passes quietly) where no GPU can be opened. They train at once on as
//! many test threads as the runner has (one GPU, one process): each op takes the GPU's lock.

use ch01_single_gpu::checkpoint;
use ch01_single_gpu::params::ParamLayout;
use ch01_single_gpu::train::Trainer;
use ch01_single_gpu::{TrainConfig, train};
use kernels::device::DeviceRequest;
use kernels::{Category, DType};
use scale_tests::tiny_config;

fn gpu() -> DeviceRequest {
    if let Err(e) = kernels::cuda::Gpu::get(0) {
        panic!("this test needs a CUDA device: {e}");
    }
    DeviceRequest::Cuda(0)
}

/// max |a - b|, and max |b - start|: how far two runs ended apart, next to how far they moved.
fn drift(a: &[f32], b: &[f32], start: &[f32]) -> (f32, f32) {
    let apart = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    let moved = b.iter().zip(start).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    (apart, moved)
}

// ANCHOR: ten_steps
#[test]
#[ignore = "needs a CUDA device"]
fn ten_f32_steps_on_the_gpu_match_the_cpu() {
    let cpu_cfg = tiny_config(10);
    let start = Trainer::new(&cpu_cfg).unwrap().params().unwrap();
    let cpu = train(&cpu_cfg).unwrap();
    let gpu = train(&TrainConfig { device: gpu(), ..cpu_cfg }).unwrap();
    // The same math in another order (cuBLAS's blocking, atomic adds): rounding differences of
    // 1e-7 relative per op, which ten steps of AdamW amplify but do not make visible in the loss.
    scale_tests::assert_close("losses", &gpu.losses(), &cpu.losses(), 1e-4);
    let (apart, moved) = drift(&gpu.params, &cpu.params, &start);
    assert!(apart <= 1e-2 * moved, "parameters {apart:e} apart after moving {moved:e}");
    let val = (gpu.final_val_loss().unwrap(), cpu.final_val_loss().unwrap());
    assert!((val.0 - val.1).abs() <= 1e-4 * val.1, "val loss {val:?}");
}
// ANCHOR_END: ten_steps

#[test]
#[ignore = "needs a CUDA device"]
fn ten_bf16_steps_stay_close_to_f32() {
    // bf16 keeps 8 bits of mantissa: per-op errors of ~0.4%, which the f32 master weights and
    // optimizer state keep from accumulating. The losses track f32's to a couple of percent.
    let cpu = train(&tiny_config(10)).unwrap();
    let bf16 = train(&TrainConfig { device: gpu(), dtype: DType::BF16, ..tiny_config(10) }).unwrap();
    scale_tests::assert_close("losses", &bf16.losses(), &cpu.losses(), 2e-2);
    assert!(bf16.losses()[9] < bf16.losses()[0] - 0.5, "bf16 learns: {:?}", bf16.losses());
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_ledger_counts_device_memory() {
    let cfg = TrainConfig { device: gpu(), dtype: DType::BF16, ..tiny_config(1) };
    let trainer = Trainer::new(&cfg).unwrap();
    let current = trainer.ledger.report().current;
    let n = trainer.layout.total as u64;
    // f32 master weights and a bf16 copy; f32 gradients; two f32 moments.
    assert_eq!(current[&Category::Parameters], 4 * n + 2 * n);
    assert_eq!(current[&Category::Gradients], 4 * n);
    assert_eq!(current[&Category::OptimizerState], 8 * n);
    let (free, total) = kernels::cuda::Gpu::get(0).unwrap().context().mem_get_info().unwrap();
    assert!(total - free >= (current.values().sum::<u64>()) as usize, "the ledger counts more than is in use");
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_trace_has_gpu_spans() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.json");
    train(&TrainConfig { device: gpu(), trace: Some(path.clone()), ..tiny_config(2) }).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let events = json["traceEvents"].as_array().expect("a trace-event list");
    let on_gpu: Vec<_> = events.iter().filter(|e| e["tid"] == 1).collect();
    for name in ["forward", "backward", "optimizer"] {
        let spans: Vec<_> = on_gpu.iter().filter(|e| e["name"] == name).collect();
        assert_eq!(spans.len(), 2, "two steps, two GPU {name} spans");
        assert!(spans.iter().all(|e| e["dur"].as_f64().unwrap() > 0.0));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_checkpoint_written_on_the_gpu_holds_its_weights_and_resumes_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let gpu_run = train(&TrainConfig { device: gpu(), save: Some(ckpt.clone()), ..tiny_config(3) }).unwrap();
    let model = gpu_run.model.clone();
    let layout = ParamLayout::new(&model);
    let mut saved = vec![0.0; layout.total];
    checkpoint::load_weights(&ckpt, &model, &layout, &mut saved).unwrap();
    assert!(saved == gpu_run.params, "the checkpoint holds the GPU's final weights, bit for bit");
    let resumed = train(&TrainConfig { resume: Some(ckpt), ..tiny_config(4) }).unwrap();
    assert_eq!(resumed.steps.len(), 1, "step 4 of 4, on the CPU");
}

// ---------------------------------------------------------------------------------------------
// The harness, on any machine: scripts/gpu-check's library search, and --prebuilt on a bundle
// whose binaries find no GPU.

mod harness {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    fn scripts() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
    }

    /// Runs `call` (a function of scripts/lib/cuda-libs.bash and its arguments, `$1`...) in bash.
    fn library(call: &str, args: &[&Path]) -> Vec<String> {
        let lib = scripts().join("lib/cuda-libs.bash");
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("source '{}' && {call}", lib.display()))
            .arg("bash")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{call}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
    }

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    /// A site-packages folder as NVIDIA's wheels leave it: a lib/ per library, NCCL as .so.2 only.
    fn fake_wheels(site: &Path) {
        touch(&site.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12"));
        touch(&site.join("nvidia/cublas/lib/libcublas.so.12"));
        touch(&site.join("nvidia/cublas/lib/libcublasLt.so.12"));
        touch(&site.join("nvidia/nccl/lib/libnccl.so.2"));
        touch(&site.join("nvidia/cuda_nvrtc/include/nvrtc.h")); // not a lib/ folder
        touch(&site.join("numpy/lib/x.so")); // not NVIDIA's
    }

    #[test]
    fn gpu_check_finds_the_wheels_libraries_and_links_libnccl() {
        let tmp = tempfile::tempdir().unwrap();
        let site = tmp.path().join("site-packages");
        fake_wheels(&site);
        let mut dirs = library("wheel_lib_dirs \"$@\"", &[&site, &tmp.path().join("no-such-site")]);
        dirs.sort();
        let want: Vec<String> = ["cublas", "cuda_nvrtc", "nccl"]
            .iter()
            .map(|n| site.join("nvidia").join(n).join("lib").display().to_string())
            .collect();
        assert_eq!(dirs, want);

        let link_dir = tmp.path().join("links");
        let dirs: Vec<PathBuf> = want.iter().map(PathBuf::from).collect();
        let mut args: Vec<&Path> = vec![&link_dir];
        args.extend(dirs.iter().map(PathBuf::as_path));
        assert_eq!(library("nccl_link \"$@\"", &args), vec![link_dir.display().to_string()]);
        let target = std::fs::read_link(link_dir.join("libnccl.so")).unwrap();
        assert_eq!(target, site.join("nvidia/nccl/lib/libnccl.so.2"), "libnccl.so names the wheel's library");
        touch(&tmp.path().join("cu13/libcublas.so.13.0.2"));
        let cu13 = tmp.path().join("cu13");
        assert_eq!(library("cuda_majors \"$@\"", &[&dirs[0], &dirs[1], &cu13]), ["12", "13"], "CUDA 12 and 13 cuBLAS");
    }

    #[test]
    fn no_link_where_libnccl_so_exists_or_there_is_no_nccl() {
        let tmp = tempfile::tempdir().unwrap();
        let (with_so, without) = (tmp.path().join("dev"), tmp.path().join("none"));
        touch(&with_so.join("libnccl.so"));
        touch(&with_so.join("libnccl.so.2"));
        std::fs::create_dir_all(&without).unwrap();
        let link_dir = tmp.path().join("links");
        assert!(library("nccl_link \"$@\"", &[&link_dir, &without, &with_so]).is_empty());
        assert!(library("nccl_link \"$@\"", &[&link_dir, &without]).is_empty());
        assert!(!link_dir.exists(), "nothing made where nothing is needed");
    }

    /// An executable shell script at `path` that prints `output` and exits with `code`.
    fn fake_binary(path: &Path, output: &str, code: i32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("#!/usr/bin/env bash\ncat <<'OUT'\n{output}\nOUT\nexit {code}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn gpu_check_prebuilt(bundle: &Path) -> (Output, String, String) {
        let out = Command::new(scripts().join("gpu-check")).arg("--prebuilt").arg(bundle).output().unwrap();
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        (out, stdout, stderr)
    }

    fn row<'a>(stdout: &'a str, group: &str) -> Vec<&'a str> {
        let line = stdout.lines().find(|l| l.starts_with(group)).unwrap_or_else(|| panic!("no row {group}: {stdout}"));
        line.split_whitespace().collect()
    }

    const NO_DEVICE: &str = "running 3 tests
thread 'matmul' panicked at kernels/tests/cuda_ops.rs:27:5:
this test needs a CUDA device: the CUDA driver is installed but no GPU is visible
test result: FAILED. 0 passed; 3 failed; 0 ignored; 0 measured; 20 filtered out; finished in 0.01s";

    #[test]
    fn prebuilt_binaries_that_find_no_gpu_fail_the_check_and_say_why() {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path();
        fake_binary(&bundle.join("tests/cuda_ops"), NO_DEVICE, 101);
        fake_binary(&bundle.join("tests/empty"), "running 0 tests\ntest result: ok. 0 passed; 0 failed; 0 ignored", 0);
        fake_binary(&bundle.join("bench/gpu_step"), "no GPU run possible: device 'cuda:0' was requested", 101);
        let (out, stdout, stderr) = gpu_check_prebuilt(bundle);
        assert!(!out.status.success(), "a bundle that found no GPU passed:\n{stdout}");
        assert_eq!(row(&stdout, "cuda_ops")[1..5], ["0", "3", "0", "FAILED"], "{stdout}");
        assert_eq!(row(&stdout, "empty")[1..], ["0", "0", "0", "no", "test", "ran"], "zero tests is not a pass");
        assert_eq!(row(&stdout, "gpu_step")[2..4], ["0", "1"], "{stdout}");
        assert!(
            stderr.contains("gpu-check: no usable GPU: the CUDA driver is installed but no GPU is visible"),
            "{stderr}"
        );
        assert!(stderr.contains("gpu-check: FAILED"), "{stderr}");
    }

    #[test]
    fn prebuilt_binaries_that_pass_pass_the_check() {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path();
        let ok = "test result: ok. 22 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out";
        fake_binary(&bundle.join("tests/cuda_ops"), ok, 0);
        fake_binary(&bundle.join("bench/gpu_step"), " bf16:   100.0 ms/step  MFU 40.0%  on cuda:0", 0);
        let (out, stdout, stderr) = gpu_check_prebuilt(bundle);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert_eq!(row(&stdout, "cuda_ops")[1..], ["22", "0", "0", "ok"]);
        assert!(stdout.contains("bench:  bf16:   100.0 ms/step  MFU 40.0%"), "{stdout}");
        assert!(stdout.contains("gpu-check: passed"));
        let (out, _, stderr) = gpu_check_prebuilt(&bundle.join("tests"));
        assert!(!out.status.success() && stderr.contains("is not a bundle"), "{stderr}");
    }
}
