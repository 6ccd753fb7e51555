//! The `ch03-tensor-parallel` command line: its report places every rank on the grid, and bad
//! input gets one line before any rank starts.

use ch01_single_gpu::testing::{assert_one_error_line, output_within};
use std::process::Command;
use std::time::Duration;

fn ch03() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ch03-tensor-parallel"));
    cmd.args(["--model", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--val-batches", "1"]);
    cmd.args(["--eval-every", "0", "--sample-tokens", "0", "--quiet"]);
    cmd
}

#[test]
fn the_report_places_every_rank_on_the_tp_and_dp_axes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.json");
    let out = output_within(ch03().args(["--tp", "2", "--dp", "2", "--report"]).arg(&path), Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(report["chapter"], "ch03-tensor-parallel");
    assert_eq!(report["steps"].as_array().map(Vec::len), Some(2));
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    for (r, rank) in ranks.iter().enumerate() {
        // rank = tp_rank + tp · dp_rank: tensor parallelism innermost.
        assert_eq!(
            (rank["grid"]["tp"].as_u64(), rank["grid"]["dp"].as_u64()),
            (Some(r as u64 % 2), Some(r as u64 / 2))
        );
        assert!(rank["comm"]["tp"]["sent"]["all_reduce"].as_u64().unwrap_or(0) > 0, "rank {r} all-reduces over tp");
    }
}

#[test]
fn bad_input_is_one_line_before_any_rank_starts() {
    for (args, expected) in [
        (vec!["--tp", "3"], "does not divide the model's 4 attention heads"),
        (vec!["--lr", "-1"], "--lr must be a finite number, 0 or more (got -1)"),
        (vec!["--tp", "0"], "--tp must be at least 1"),
        (
            vec!["--tp", "2", "--sequence-parallel", "--batch-size", "3", "--seq-len", "5"],
            "--sequence-parallel needs the 15 tokens of a micro-batch (batch 3 x seq_len 5, per replica) divisible by --tp 2",
        ),
    ] {
        let out = output_within(ch03().args(&args), Duration::from_secs(60));
        assert_one_error_line(&out, expected);
        assert!(!String::from_utf8_lossy(&out.stderr).contains("rank 0 failed"), "{args:?}: checked before launch");
    }
}
