//! ch02's `--report`: a rank per replica on the "dp" axis, and the bytes each one moved, checked
//! against the ring all-reduce's 2(n-1)/n · buffer per step that the book derives.

use serde_json::Value;
use std::process::{Command, Output};

const STEPS: u64 = 3;

/// A tiny run of STEPS steps of 4 sequences, evaluated once (after the last step).
fn run(extra: &[&str]) -> Output {
    let steps = STEPS.to_string();
    let mut args = vec!["--model", "tiny", "--steps", &steps, "--batch-size", "4", "--seq-len", "16"];
    args.extend_from_slice(&["--eval-every", "0", "--val-batches", "1", "--sample-tokens", "0", "--quiet"]);
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_ch02-data-parallel")).args(&args).output().expect("the binary runs")
}

fn report_of(dp: usize, dir: &std::path::Path) -> Value {
    let path = dir.join(format!("dp{dp}.json"));
    let out = run(&["--dp", &dp.to_string(), "--bucket-mb", "0.05", "--report", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn int(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not an integer"))
}

#[test]
fn report_bytes_are_the_ring_all_reduce_formula() {
    let dir = tempfile::tempdir().unwrap();
    for dp in [2u64, 4] {
        let r = report_of(dp as usize, dir.path());
        assert_eq!(r["chapter"], "ch02-data-parallel");
        assert_eq!(r["dp"], dp);
        let ranks = r["ranks"].as_array().unwrap();
        assert_eq!(ranks.len() as u64, dp);

        // The gradient buffer: every stored parameter (the embedding's padding rows included), f32.
        let c = &r["config"];
        let padding = (int(&c["padded_vocab_size"]) - int(&c["vocab_size"])) * int(&c["n_embd"]);
        let grad_values = int(&c["n_params"]) + padding;
        assert_eq!(int(&r["gradient_bytes"]), 4 * grad_values);

        // Each step all-reduces the gradients and the loss (1 value); the evaluation, the sum of
        // the validation losses (1 value). A ring all-reduce of L values moves 2(n-1)/n · L per
        // rank: 2(n-1) · L over all n ranks, exactly, however the chunks are cut.
        let values = STEPS * (grad_values + 1) + 1;
        let mut total = (0, 0);
        for (i, rank) in ranks.iter().enumerate() {
            assert_eq!(rank["rank"], i as u64);
            assert_eq!(rank["grid"], serde_json::json!({ "dp": i }));
            let dp_group = &rank["comm"]["dp"];
            let (sent, received) = (int(&dp_group["sent"]["all_reduce"]), int(&dp_group["received"]["all_reduce"]));
            if dp == 2 {
                // Two ranks: each sends the chunk the other owns (reduce-scatter) and its own
                // (all-gather): L values, exactly, and receives as many.
                assert_eq!((sent, received), (4 * values, 4 * values), "rank {i}");
            }
            total = (total.0 + sent, total.1 + received);
            let memory = &rank["memory"]["peak"];
            for category in ["parameters", "gradients", "optimizer_state", "activations", "communication", "other"] {
                assert!(memory[category].is_u64(), "rank {i} memory.peak has no {category}");
            }
            assert!(int(&memory["communication"]) > 0, "rank {i}: the bucket buffers are on the ledger");
            assert_eq!(int(&memory["gradients"]), 4 * grad_values);
        }
        assert_eq!(total.0, 2 * (dp - 1) * 4 * values, "dp {dp}: bytes sent by all ranks");
        assert_eq!(total.1, total.0, "dp {dp}: bytes received by all ranks");
    }
}

#[test]
fn plots_show_this_run_on_another_and_every_rank_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (single, loss, memory) = (path("one-rank.jsonl"), path("loss.svg"), path("memory.svg"));
    let out = run(&["--dp", "1", "--metrics", &single]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["--dp", "2", "--plot", &loss, "--plot-compare", &single, "--plot-memory", &memory]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = std::fs::read_to_string(&loss).unwrap();
    for legend in ["ch02-data-parallel train", "ch02-data-parallel validation", "one-rank train"] {
        assert!(svg.contains(legend), "no {legend:?} in the loss plot");
    }
    let svg = std::fs::read_to_string(&memory).unwrap();
    for label in ["rank 0", "rank 1", "communication", "optimizer state"] {
        assert!(svg.contains(label), "no {label:?} in the memory plot");
    }
}

#[test]
fn bad_plot_compare_gets_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let not_metrics = dir.path().join("run.json");
    std::fs::write(&not_metrics, "{\"chapter\": \"ch01-single-gpu\"}\n").unwrap();
    let plot = dir.path().join("loss.svg");
    let out = run(&["--plot", plot.to_str().unwrap(), "--plot-compare", not_metrics.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("error: --plot-compare: ") && stderr.contains("run.json line 1"), "{stderr}");
}
