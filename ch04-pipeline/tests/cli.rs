//! The `ch04-pipeline` command line: its report places every stage on the grid with the
//! schedule's figures, and bad input gets one line before any stage starts.

use ch01_single_gpu::testing::{assert_one_error_line, output_within};
use std::process::Command;
use std::time::Duration;

fn ch04() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ch04-pipeline"));
    cmd.args(["--model", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--val-batches", "1"]);
    cmd.args(["--eval-every", "0", "--sample-tokens", "0", "--quiet"]);
    cmd
}

#[test]
fn the_report_places_every_stage_on_the_pp_and_dp_axes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.json");
    let args = ["--pp", "2", "--dp", "2", "--microbatches", "2", "--schedule", "1f1b", "--report"];
    let out = output_within(ch04().args(args).arg(&path), Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!((report["chapter"].as_str(), report["schedule"].as_str()), (Some("ch04-pipeline"), Some("1f1b")));
    // (p - 1)/(m + p - 1) with p = 2 stages and m = 2 micro-batches.
    assert!((report["bubble_fraction"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12);
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    for (r, rank) in ranks.iter().enumerate() {
        // Stage s of pipe d is rank d + dp·s: data parallelism inside, the pipeline outermost.
        assert_eq!(rank["rank"].as_u64(), Some(r as u64));
        assert_eq!(
            (rank["grid"]["dp"].as_u64(), rank["grid"]["pp"].as_u64()),
            (Some(r as u64 % 2), Some(r as u64 / 2))
        );
        let sent = &rank["comm"]["pp"]["sent"];
        assert!(sent.as_object().is_some_and(|m| m.values().any(|b| b.as_u64() > Some(0))), "rank {r} sends on pp");
    }
}

#[test]
fn bad_input_is_one_line_before_any_stage_starts() {
    for (args, expected) in [
        (vec!["--pp", "9"], "more stages than the model has blocks"),
        (vec!["--lr", "-1"], "--lr must be a finite number, 0 or more (got -1)"),
    ] {
        let out = output_within(ch04().args(&args), Duration::from_secs(60));
        assert_one_error_line(&out, expected);
        assert!(!String::from_utf8_lossy(&out.stderr).contains("rank 0 failed"), "{args:?}: checked before launch");
    }
}

#[test]
fn zb_h1_runs_and_draws_its_weight_gradients_in_their_own_colour() {
    let dir = tempfile::tempdir().unwrap();
    let (report, sim, measured) = (dir.path().join("run.json"), dir.path().join("sim.svg"), dir.path().join("run.svg"));
    let out = output_within(
        ch04()
            .args(["--pp", "2", "--microbatches", "2", "--schedule", "zb-h1", "--report"])
            .arg(&report)
            .arg("--timeline-sim")
            .arg(&sim)
            .arg("--timeline")
            .arg(&measured),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["schedule"].as_str(), Some("zb-h1"));
    // F = B = W: a step of 2m + p - 1 + max(m, p) = 7 units, of which each stage works 3m = 6.
    assert!((report["bubble_fraction"].as_f64().unwrap() - 1.0 / 7.0).abs() < 1e-12);
    for svg in [sim, measured] {
        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(svg.contains("weight grads 1") && svg.contains("backward input 1"), "B and W spans");
        assert!(svg.contains(">weight gradients</text>"), "W in the legend");
    }
}
