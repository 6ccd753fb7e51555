//! ch02's command line: chapter 1's flags plus --dp and --bucket-mb, one clear line for bad input.

use std::process::{Command, Output};

fn run(extra: &[&str]) -> Output {
    let mut args =
        vec!["--model", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--val-batches", "1"];
    args.extend_from_slice(&["--sample-tokens", "0", "--quiet"]);
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_ch02-data-parallel")).args(&args).output().expect("the binary runs")
}

fn assert_one_error_line(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains(expected), "{stderr:?} does not say {expected:?}");
}

#[test]
fn a_run_reports_ranks_bytes_and_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let timeline = dir.path().join("step.svg");
    let out = run(&["--dp", "2", "--bucket-mb", "0.05", "--timeline", timeline.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for text in ["val loss", "data parallel", "rank 1", "ring theory", "communication hidden by backward"] {
        assert!(stdout.contains(text), "no {text:?} in {stdout}");
    }
    let svg = std::fs::read_to_string(&timeline).unwrap();
    assert!(svg.contains("rank 1 communication") && svg.contains("all-reduce bucket"));
}

#[test]
fn bad_dp_gets_one_line() {
    assert_one_error_line(&run(&["--dp", "3"]), "global batch of 4 sequences is not divisible by --dp 3");
    assert_one_error_line(&run(&["--dp", "65"]), "more ranks than are available");
    assert_one_error_line(&run(&["--dp", "0"]), "--dp must be at least 1");
    assert_one_error_line(&run(&["--bucket-mb", "-1"]), "--bucket-mb must be");
    assert_one_error_line(&run(&["--model", "nope"]), "unknown model preset 'nope'");
}
