//! Chapter 1 on a GPU against chapter 1 on the CPU. Every test needs a CUDA device: they are
//! ignored by default and run by `scripts/gpu-check`, which fails when there is no device.
//! Each one fails (never passes quietly) where no GPU can be opened.

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
