//! ch02's command line: chapter 1's flags plus --dp and --bucket-mb, one clear line for bad input.

use ch01_single_gpu::testing::{Snapshot, assert_one_error_line};
use std::process::{Command, Output};

fn run(extra: &[&str]) -> Output {
    let mut args =
        vec!["--model", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--val-batches", "1"];
    args.extend_from_slice(&["--sample-tokens", "0", "--quiet"]);
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_ch02-data-parallel")).args(&args).output().expect("the binary runs")
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

// Issue 9: chapter 1's checks hold for every rank's run, and ch02's own paths are checked too,
// all before the ranks start.
#[test]
fn bad_settings_and_paths_get_one_line_before_the_ranks_start() {
    let dir = tempfile::tempdir().unwrap();
    let thesis = dir.path().join("thesis");
    std::fs::create_dir(&thesis).unwrap();
    std::fs::write(thesis.join("thesis.txt"), "three years").unwrap();
    let before = Snapshot::of(dir.path());
    let metrics = dir.path().join("m.jsonl");
    let m = metrics.to_str().unwrap();
    assert_one_error_line(&run(&["--dp", "2", "--save", thesis.to_str().unwrap()]), "not part of a checkpoint");
    assert_one_error_line(&run(&["--dp", "2", "--lr", "-0.01"]), "--lr must be a finite number, 0 or more (got -0.01)");
    assert_one_error_line(
        &run(&["--dp", "2", "--metrics", m, "--timeline", "/proc/step.svg"]),
        "--timeline /proc/step.svg",
    );
    assert_one_error_line(&run(&["--dp", "2", "--metrics", m, "--trace", "/proc/t.json"]), "--trace /proc/t.json");
    assert_one_error_line(&run(&["--dp", "4", "--batch-size", "400000000"]), "on 4 ranks");
    before.assert_unchanged(dir.path());
}

// Item 3 and 4 through the ranks: resume continues the log, and refuses other data in one line.
#[test]
fn a_resumed_data_parallel_run_continues_its_log_and_refuses_other_data() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, metrics) = (dir.path().join("ckpt"), dir.path().join("m.jsonl"));
    let (c, m) = (ckpt.to_str().unwrap(), metrics.to_str().unwrap());
    let common = ["--dp", "2", "--lr-schedule", "constant", "--eval-every", "0"];
    assert!(run(&[&common[..], &["--save", c, "--metrics", m]].concat()).status.success());
    let out = run(&[&common[..], &["--steps", "3", "--resume", c, "--metrics", m]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3]);
    let other = dir.path().join("other.txt");
    std::fs::write(&other, "Now is the winter of our discontent. ".repeat(40)).unwrap();
    let out = run(&[&common[..], &["--steps", "4", "--resume", c, "--data", other.to_str().unwrap()]].concat());
    assert_one_error_line(&out, "--data is not the text that run trained on");
}
