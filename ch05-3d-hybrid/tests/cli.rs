//! The `ch05-3d-hybrid` command line: with no grid flags it says which grid it picked, its
//! report places every rank on the grid, and bad input gets one line before any rank starts.

use ch01_single_gpu::testing::{assert_one_error_line, output_within};
use std::process::Command;
use std::time::Duration;

fn ch05() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ch05-3d-hybrid"));
    cmd.args(["--model", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--val-batches", "1"]);
    cmd.args(["--eval-every", "0", "--sample-tokens", "0", "--quiet", "--microbatches", "2"]);
    cmd
}

#[test]
fn with_no_grid_flags_it_says_which_grid_it_runs_and_prints_its_groups() {
    let out = output_within(&mut ch05(), Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap_or_default();
    assert!(first.contains("dp 1 x tp 2 x pp 2"), "first line: {first}");
    assert!(stdout.contains("tensor   groups: [0 1] [2 3]"), "{stdout}");
    assert!(stdout.contains("pipeline groups: [0 2] [1 3]"), "{stdout}");
}

#[test]
fn the_report_places_every_rank_on_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.json");
    let args = ["--dp", "2", "--tp", "2", "--pp", "2", "--microbatches", "1", "--report"];
    let out = output_within(ch05().args(args).arg(&path), Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(report["chapter"], "ch05-3d-hybrid");
    assert_eq!((report["dp"].as_u64(), report["tp"].as_u64(), report["pp"].as_u64()), (Some(2), Some(2), Some(2)));
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 8);
    for (r, rank) in ranks.iter().enumerate() {
        // rank = tp + 2·(dp + 2·pp): tensor parallelism innermost, the pipeline outermost.
        let at = |axis: &str| rank["grid"][axis].as_u64().unwrap() as usize;
        assert_eq!(at("tp") + 2 * (at("dp") + 2 * at("pp")), r);
        for group in ["tp", "pp", "dp"] {
            assert!(rank["comm"][group]["sent"].as_object().is_some_and(|m| !m.is_empty()), "rank {r}: {group}");
        }
    }
}

#[test]
fn bad_input_is_one_line_before_any_rank_starts() {
    for (args, expected) in [
        (vec!["--tp", "3"], "does not divide the model's 4 attention heads"),
        (vec!["--pp", "3"], "--pp 3 is more stages than the model has blocks (2)"),
        (vec!["--dp", "0"], "--dp must be at least 1"),
        (vec!["--tp", "0"], "--tp must be at least 1"),
        (vec!["--pp", "0"], "--pp must be at least 1"),
        (
            vec!["--dp", "40", "--tp", "2", "--microbatches", "1", "--batch-size", "40"],
            "is 80 ranks, more than are available",
        ),
        (vec!["--dp", "2", "--microbatches", "4"], "does not divide the batch of 4 sequences"),
        // The message names the real --dp (the pipe's own checks run first, with dp 1).
        (vec!["--dp", "2", "--microbatches", "3"], "--microbatches 3 x --dp 2 does not divide the batch of 4"),
        (vec!["--schedule", "zb-h1"], "--schedule zb-h1 is chapter 4's"),
        (vec!["--virtual-stages", "2"], "needs --schedule interleaved"),
        (vec!["--device", "cuda"], "--device cuda"),
    ] {
        let out = output_within(ch05().args(&args), Duration::from_secs(60));
        assert_one_error_line(&out, expected);
        assert!(!String::from_utf8_lossy(&out.stderr).contains("rank 0 failed"), "{args:?}: checked before launch");
    }
}
