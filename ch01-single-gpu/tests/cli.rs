//! The command line as a user meets it: help, a short run, and one clear line for bad input.

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ch01-single-gpu")).args(args).output().expect("the binary runs")
}

/// A tiny, quick run; extra args come last and override.
fn tiny(extra: &[&str]) -> Output {
    let mut args = vec![
        "--model",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--val-batches",
        "1",
        "--sample-tokens",
        "0",
        "--quiet",
    ];
    // On the CPU unless a test asks otherwise: runs compared bit for bit (resume) must be
    // deterministic, which GPU runs are not (atomic adds).
    if !extra.contains(&"--device") {
        args.extend_from_slice(&["--device", "cpu"]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

/// Exit status non-zero, and stderr is exactly one line saying `expected`: no panic, no
/// backtrace, no usage dump.
fn assert_one_error_line(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains(expected), "{stderr:?} does not say {expected:?}");
}

#[test]
fn help_explains_every_flag() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model",
        "--n-layer",
        "--n-head",
        "--n-embd",
        "--block-size",
        "--tokenizer",
        "--data",
        "--data-order",
        "--steps",
        "--batch-size",
        "--seq-len",
        "--grad-accum",
        "--lr",
        "--lr-schedule",
        "--warmup-steps",
        "--weight-decay",
        "--grad-clip",
        "--seed",
        "--eval-every",
        "--val-batches",
        "--save",
        "--save-every",
        "--init",
        "--resume",
        "--metrics",
        "--trace",
        "--sample-tokens",
        "--temperature",
        "--top-k",
        "--device",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}

#[test]
fn a_short_run_prints_a_summary_and_writes_metrics_and_trace() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let trace = dir.path().join("trace.json");
    let out = tiny(&[
        "--steps",
        "3",
        "--eval-every",
        "2",
        "--sample-tokens",
        "20",
        "--metrics",
        path(&metrics),
        "--trace",
        path(&trace),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in ["train loss", "val loss", "tokens/s", "peak memory", "parameters", "activations", "sample"] {
        assert!(stdout.contains(line), "summary lacks {line}: {stdout}");
    }
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&metrics).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["step"], 3);
    for key in ["loss", "lr", "grad_norm", "tokens_per_sec"] {
        assert!(lines[0][key].is_number(), "{key} missing");
    }
    assert!(lines[1]["val_loss"].is_number() && lines[0].get("val_loss").is_none());
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let names: Vec<&str> = trace["traceEvents"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(names.contains(&"forward") && names.contains(&"backward") && names.contains(&"optimizer"));
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn bad_model_shapes_get_one_line() {
    assert_one_error_line(&tiny(&["--model", "gpt5"]), "unknown model preset 'gpt5'");
    assert_one_error_line(&tiny(&["--n-embd", "60", "--n-head", "8"]), "n_embd (60) is not divisible by n_head (8)");
    assert_one_error_line(&tiny(&["--seq-len", "65"]), "seq_len 65 exceeds the model's block size 64");
    assert_one_error_line(&tiny(&["--batch-size", "0"]), "batch size must be at least 1");
}

#[test]
fn bad_data_files_get_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt");
    assert_one_error_line(&tiny(&["--data", path(&missing)]), "cannot read data file");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    assert_one_error_line(&tiny(&["--data", path(&empty)]), "is empty");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "To be, or not to be.").unwrap();
    assert_one_error_line(&tiny(&["--data", path(&short)]), "too few for sequences of 16");
}

#[test]
fn bad_checkpoints_get_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    assert!(tiny(&["--save", path(&ckpt)]).status.success());
    assert_one_error_line(&tiny(&["--n-embd", "32", "--init", path(&ckpt)]), "does not match the model");
    let weights = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_one_error_line(&tiny(&["--init", path(&ckpt)]), "not a valid safetensors file");
    assert_one_error_line(&tiny(&["--init", path(&dir.path().join("absent"))]), "config.json");
}

#[test]
fn a_non_finite_loss_stops_with_the_step() {
    assert_one_error_line(
        &tiny(&["--steps", "5", "--lr", "1e30", "--lr-schedule", "constant"]),
        "at step 2: training stopped",
    );
}

#[test]
fn device_choice_follows_the_machine() {
    assert_one_error_line(&tiny(&["--device", "tpu"]), "unknown device 'tpu'");
    assert_one_error_line(&tiny(&["--device", "cuda:99"]), "device 'cuda:99' was requested, but ");
    assert_one_error_line(&tiny(&["--device", "cpu", "--dtype", "bf16"]), "the CPU computes in f32 only");
    let out = tiny(&["--device", "auto"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if kernels::cuda::Gpu::get(0).is_ok() {
        // A machine with a usable GPU: auto picks it, and --device cuda trains.
        assert!(stdout.contains("device             cuda:0"), "{stdout}");
        assert!(tiny(&["--device", "cuda"]).status.success());
    } else {
        // CI's machine: no driver. auto falls back to the CPU; cuda is one clear line.
        assert!(stdout.contains("device             cpu"), "{stdout}");
        assert_one_error_line(&tiny(&["--device", "cuda"]), "device 'cuda:0' was requested, but ");
    }
}
