//! `--report`, `--plot`, `--plot-compare` and `--plot-memory`: the files a run writes about
//! itself, read back and checked against what the run printed and what the book claims.

use ch01_single_gpu::report::RunReport;
use ch01_single_gpu::{TrainConfig, train};
use kernels::device::DeviceRequest;
use kernels::memory::format_bytes;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// A tiny CPU run of 4 steps evaluated at steps 2 and 4; `extra` comes last.
fn tiny(extra: &[&str]) -> Output {
    let mut args = vec!["--model", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "16"];
    args.extend_from_slice(&["--eval-every", "2", "--val-batches", "1", "--sample-tokens", "0", "--quiet"]);
    args.extend_from_slice(&["--device", "cpu"]);
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_ch01-single-gpu")).args(&args).output().expect("the binary runs")
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().expect("a UTF-8 temporary path").to_string()
}

fn read_json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the report was written")).expect("the report is JSON")
}

fn assert_one_error_line(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains(expected), "{stderr:?} does not say {expected:?}");
}

/// Every parameter the model holds, the embedding's padding rows included (what the ledger counts).
fn stored_params(config: &Value) -> u64 {
    let (n_params, v, v_pad, c) =
        (&config["n_params"], &config["vocab_size"], &config["padded_vocab_size"], &config["n_embd"]);
    let [n_params, v, v_pad, c] = [n_params, v, v_pad, c].map(|x| x.as_u64().expect("an integer"));
    n_params + (v_pad - v) * c
}

#[test]
fn report_holds_the_run_its_steps_and_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (report, metrics) = (path(dir.path(), "run.json"), path(dir.path(), "metrics.jsonl"));
    let out = tiny(&["--report", &report, "--metrics", &metrics]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = read_json(&report);

    assert_eq!(r["chapter"], "ch01-single-gpu");
    let config = &r["config"];
    for (key, value) in
        [("n_layer", 2), ("n_head", 4), ("n_embd", 64), ("steps", 4), ("batch_size", 2), ("seq_len", 16)]
    {
        assert_eq!(config[key], value, "config.{key}");
    }
    assert_eq!(config["tokenizer"], "byte");
    assert_eq!(config["dtype"], "f32");
    assert!(config["device"].as_str().unwrap().starts_with("cpu"), "{config}");

    // The steps are the --metrics lines, number for number.
    let steps = r["steps"].as_array().unwrap();
    let lines: Vec<Value> =
        std::fs::read_to_string(&metrics).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.len(), 4);
    assert_eq!(steps, &lines);
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(step["step"], i as u64 + 1);
        for key in ["loss", "lr", "grad_norm", "tokens_per_sec"] {
            assert!(step[key].as_f64().is_some_and(|x| x.is_finite() && x > 0.0), "step {i}: {key} in {step}");
        }
    }
    let val: Vec<u64> = r["val_losses"].as_array().unwrap().iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(val, [2, 4]);
    assert_eq!(r["val_losses"][1]["loss"], steps[3]["val_loss"]);
    // The summary's val loss is the report's last one.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed = format!("val loss           {:.4}", r["val_losses"][1]["loss"].as_f64().unwrap());
    assert!(stdout.contains(&printed), "{printed:?} not in {stdout}");
    assert!(r["tokens_per_sec"].as_f64().unwrap() > 0.0);
    assert!(r["mfu"].is_null(), "no peak FLOP/s is known for a CPU");

    // One rank, no grid, no communication; the ledger as Memory derives it: parameters and
    // gradients 4 bytes each per stored parameter, AdamW's two moments twice that.
    let ranks = r["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 1);
    assert_eq!(ranks[0]["grid"], serde_json::json!({}));
    assert_eq!(ranks[0]["comm"], serde_json::json!({}));
    let memory = &ranks[0]["memory"];
    let param_bytes = 4 * stored_params(config);
    for kind in ["peak", "current", "at_peak"] {
        let by_category = memory[kind].as_object().unwrap();
        for category in ["parameters", "gradients", "optimizer_state", "activations", "communication", "other"] {
            assert!(by_category.contains_key(category), "memory.{kind} has no {category}");
        }
        assert_eq!(by_category["parameters"], param_bytes, "memory.{kind}");
        assert_eq!(by_category["gradients"], param_bytes, "memory.{kind}");
        assert_eq!(by_category["optimizer_state"], 2 * param_bytes, "memory.{kind}");
    }
    let at_peak: u64 = memory["at_peak"].as_object().unwrap().values().map(|b| b.as_u64().unwrap()).sum();
    assert_eq!(memory["peak_total"], at_peak);
}

#[test]
fn report_is_a_library_function_too() {
    let cfg = TrainConfig {
        model: "tiny".into(),
        steps: 2,
        batch_size: 2,
        seq_len: Some(16),
        eval_every: 0,
        val_batches: 1,
        device: DeviceRequest::Cpu,
        ..TrainConfig::default()
    };
    let report = train(&cfg).unwrap();
    let run = RunReport::single_device(&cfg, &report);
    let json: Value = serde_json::from_str(&run.to_json().unwrap()).unwrap();
    // f32s written as their shortest decimal read back to the same f32.
    let losses: Vec<f32> =
        json["steps"].as_array().unwrap().iter().map(|s| s["loss"].as_f64().unwrap() as f32).collect();
    assert_eq!(losses, report.losses());
    assert_eq!(json["val_losses"][0]["step"], 2);
    assert_eq!(json["ranks"][0]["rank"], 0);
}

#[test]
fn plots_draw_the_curves_of_this_run_and_the_compared_one() {
    let dir = tempfile::tempdir().unwrap();
    let earlier = path(dir.path(), "earlier-run.jsonl");
    let out = tiny(&["--metrics", &earlier]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (loss, memory, report) =
        (path(dir.path(), "loss.svg"), path(dir.path(), "memory.svg"), path(dir.path(), "r.json"));
    let out = tiny(&["--plot", &loss, "--plot-compare", &earlier, "--plot-memory", &memory, "--report", &report]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let svg = std::fs::read_to_string(&loss).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for legend in
        ["ch01-single-gpu train", "ch01-single-gpu validation", "earlier-run train", "earlier-run validation", "step"]
    {
        assert!(svg.contains(legend), "no {legend:?} in the loss plot");
    }
    let svg = std::fs::read_to_string(&memory).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<rect"));
    let param_bytes = format_bytes(4 * stored_params(&read_json(&report)["config"]));
    for label in ["parameters", "gradients", "optimizer state", "activations", &param_bytes] {
        assert!(svg.contains(label), "no {label:?} in the memory plot");
    }
    assert!(!svg.contains("communication"), "a category with no bytes is left out");
}

#[test]
fn bad_plot_and_report_paths_get_one_line_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let (plot, metrics) = (path(dir.path(), "loss.svg"), path(dir.path(), "metrics.jsonl"));
    let not_metrics = path(dir.path(), "notes.txt");
    std::fs::write(&not_metrics, "step 1: loss 5.5\n").unwrap();
    let missing = path(dir.path(), "missing.jsonl");
    let no_dir = path(&dir.path().join("no-such-dir"), "run.json");
    let empty = path(dir.path(), "empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    for (args, expected) in [
        (vec!["--plot", &plot, "--plot-compare", &missing], "--plot-compare: cannot read"),
        (vec!["--plot", &plot, "--plot-compare", &not_metrics], "notes.txt line 1: not a --metrics line"),
        (vec!["--plot", &plot, "--plot-compare", &empty], "holds no steps"),
        (vec!["--plot-compare", &not_metrics], "--plot-compare draws onto --plot"),
        (vec!["--report", &no_dir], "--report"),
    ] {
        let out = tiny(&[args.as_slice(), &["--metrics", &metrics]].concat());
        assert_one_error_line(&out, expected);
        // It failed before the first step: no metrics, no plot.
        assert!(!Path::new(&metrics).exists() && !Path::new(&plot).exists(), "{args:?} trained first");
    }
}

#[test]
fn help_lists_the_report_and_plot_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_ch01-single-gpu")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--report <PATH>", "--plot <PATH.svg>", "--plot-compare <FILE>", "--plot-memory <PATH.svg>"] {
        assert!(help.contains(flag), "--help does not list {flag}");
    }
}
