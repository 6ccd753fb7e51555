//! The `ch06-zero-checkpointing` command line: its report puts each rank's memory beside the
//! formula and its bytes per step, its checkpoints resume under another stage, and bad input gets
//! one line before any rank starts.

use ch01_single_gpu::testing::{assert_one_error_line, output_within};
use std::process::Command;
use std::time::Duration;

fn ch06() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ch06-zero-checkpointing"));
    cmd.args(["--model", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--val-batches", "1"]);
    cmd.args(["--eval-every", "0", "--sample-tokens", "0", "--quiet"]);
    cmd
}

#[test]
fn the_report_puts_each_ranks_memory_beside_the_formula() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.json");
    let args = ["--dp", "2", "--zero", "3", "--recompute", "selective", "--report"];
    let out = output_within(ch06().args(args).arg(&path), Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ZeRO stage 3, recompute selective"), "{stdout}");
    assert!(stdout.contains("at --zero 0 --recompute none: saves"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(report["chapter"], "ch06-zero-checkpointing");
    assert_eq!((report["zero"].as_u64(), report["recompute"].as_str()), (Some(3), Some("selective")));
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 2);
    for (r, rank) in ranks.iter().enumerate() {
        assert_eq!(rank["grid"]["dp"].as_u64(), Some(r as u64));
        for category in ["parameters", "gradients", "optimizer_state", "communication"] {
            let terms = rank["predicted_memory"]["terms"].as_array().unwrap();
            let formula: u64 =
                terms.iter().filter(|t| t["category"] == category).map(|t| t["bytes"].as_u64().unwrap()).sum();
            assert_eq!(rank["memory"]["peak"][category].as_u64(), Some(formula), "rank {r}: {category}");
        }
        let step = &rank["step_comm"]["sent"];
        assert!(step["all_gather"].as_u64().unwrap_or(0) > step["reduce_scatter"].as_u64().unwrap_or(0), "rank {r}");
    }
}

#[test]
fn a_checkpoint_saved_under_zero_3_resumes_under_zero_1_on_more_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let constant = ["--lr-schedule", "constant"];
    let out = output_within(
        ch06().args(constant).args(["--dp", "2", "--zero", "3", "--save"]).arg(&ckpt),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(ckpt.join("config.json").is_file(), "chapter 1's layout: config.json beside the weights");
    let resumed =
        ch06().args(constant).args(["--dp", "4", "--zero", "1", "--steps", "3", "--resume"]).arg(&ckpt).output();
    let out = resumed.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bad_input_is_one_line_before_any_rank_starts() {
    for (args, expected) in [
        (vec!["--zero", "4"], "--zero must be 0, 1, 2 or 3 (got 4)"),
        (vec!["--dp", "3"], "global batch of 4 sequences is not divisible by --dp 3"),
        (vec!["--dp", "0"], "--dp must be at least 1"),
        (vec!["--recompute", "sometimes"], "invalid value 'sometimes' for '--recompute"),
        (vec!["--zero", "three"], "invalid value 'three' for '--zero"),
        (vec!["--pp", "2", "--zero", "2"], "--zero 2 with --pp > 1 is refused, as DeepSpeed refuses it"),
        (vec!["--pp", "2", "--zero", "3", "--tp", "2"], "--zero 3 with --pp > 1 is refused"),
        (vec!["--pp", "2", "--recompute", "full"], "--recompute full with --pp > 1 is not built"),
        (vec!["--tp", "3"], "--tp 3 does not divide the model's 4 attention heads"),
        (vec!["--tp", "0"], "--tp must be at least 1"),
        (vec!["--pp", "9", "--zero", "1"], "--pp 9 is more stages than the model has blocks"),
        (vec!["--microbatches", "2"], "--microbatches must be 1 without --pp"),
        (vec!["--schedule", "sometimes"], "invalid value 'sometimes' for '--schedule"),
    ] {
        let out = output_within(ch06().args(&args), Duration::from_secs(60));
        assert_one_error_line(&out, expected);
        assert!(!String::from_utf8_lossy(&out.stderr).contains("rank 0 failed"), "{args:?}: checked before launch");
    }
}

#[test]
fn tensor_and_pipeline_ranks_compose_with_zero() {
    // dp 2 x tp 2 at ZeRO-2: four ranks, each at its grid point, its ledger at the formula.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.json");
    let out = output_within(
        ch06().args(["--dp", "2", "--tp", "2", "--zero", "2", "--report"]).arg(&path),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("of a tensor rank's shard, each sharded 2 ways"));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!((report["tp"].as_u64(), ranks.len()), (Some(2), 4));
    for (r, rank) in ranks.iter().enumerate() {
        assert_eq!(
            (rank["grid"]["tp"].as_u64(), rank["grid"]["dp"].as_u64()),
            (Some(r as u64 % 2), Some(r as u64 / 2))
        );
        let terms = rank["predicted_memory"]["terms"].as_array().unwrap();
        let formula: u64 =
            terms.iter().filter(|t| t["category"] == "gradients").map(|t| t["bytes"].as_u64().unwrap()).sum();
        assert_eq!(rank["memory"]["peak"]["gradients"].as_u64(), Some(formula), "rank {r}");
    }
    // dp 2 x pp 2 at ZeRO-1: chapter 5's pipeline, each replica keeping its shard's moments.
    let path = dir.path().join("pipelined.json");
    let out = output_within(
        ch06().args(["--dp", "2", "--pp", "2", "--microbatches", "2", "--zero", "1", "--report"]).arg(&path),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("dp 2 x tp 1 x pp 2, ZeRO stage 1 over each data-parallel group"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!((report["chapter"].as_str(), report["zero"].as_u64()), (Some("ch06-zero-checkpointing"), Some(1)));
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    for rank in ranks {
        assert!(rank["comm"]["dp"]["sent"]["reduce_scatter"].as_u64().unwrap_or(0) > 0, "ZeRO-1's reduce-scatter");
    }
}
