//! The command line as a user meets it: help, a short run, and one clear line for bad input,
//! which touches nothing that was there before.

use ch01_single_gpu::testing::{Snapshot, assert_one_error_line, output_within};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

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

/// The arguments of [`tiny`] as a command, to spawn.
fn tiny_command(extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ch01-single-gpu"));
    command.args(["--model", "tiny", "--batch-size", "2", "--seq-len", "16", "--val-batches", "1"]);
    command.args(["--sample-tokens", "0", "--device", "cpu"]).args(extra);
    command
}

fn metrics_steps(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
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
fn a_non_finite_loss_stops_with_the_step_and_the_log_says_what_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let out = tiny(&["--steps", "5", "--lr", "1e30", "--lr-schedule", "constant", "--metrics", path(&metrics)]);
    assert_one_error_line(&out, "at step 2: training stopped, the weights are those of step 1");
    let lines = metrics_steps(&metrics);
    assert_eq!(lines.len(), 2);
    // JSON has no NaN: the log says it in words rather than writing null.
    assert!(lines[1]["loss"].is_string() || lines[1]["grad_norm"].is_string(), "{}", lines[1]);
    assert!(lines[1].as_object().unwrap().values().all(|v| !v.is_null()), "{}", lines[1]);
}

// Issue 9, item 1: a save replaces only a checkpoint of ours.
#[test]
fn a_save_never_replaces_what_is_not_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let thesis = dir.path().join("thesis");
    std::fs::create_dir_all(thesis.join("figures")).unwrap();
    std::fs::write(thesis.join("thesis.txt"), "three years").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "notes").unwrap();
    let before = Snapshot::of(dir.path());
    assert_one_error_line(&tiny(&["--save", path(&thesis)]), "it holds figures, which is not part of a checkpoint");
    assert_one_error_line(&tiny(&["--save", &format!("{}/", path(&thesis))]), "which is not part of a checkpoint");
    let notes = dir.path().join("notes.txt");
    assert_one_error_line(&tiny(&["--save", path(&notes)]), "it is a file, not a directory");
    before.assert_unchanged(dir.path());
    // A checkpoint of ours is replaced, as every --save-every does.
    let ckpt = dir.path().join("ckpt");
    assert!(tiny(&["--save", path(&ckpt)]).status.success());
    assert!(tiny(&["--save", path(&ckpt), "--seed", "2"]).status.success());
}

// Item 2: a step whose gradient norm is not finite changes nothing, and the run points at the
// last good checkpoint, which resumes and trains on.
#[test]
fn a_non_finite_gradient_norm_updates_nothing_and_the_last_checkpoint_resumes() {
    use ch01_single_gpu::train::{StepRecord, TrainSteps, Trainer, drive};
    use ch01_single_gpu::{TrainConfig, TrainError, checkpoint};

    /// Chapter 1's step, with an infinite gradient planted at step `poison_at`.
    struct Poisoned {
        trainer: Trainer,
        poison_at: u64,
    }
    impl TrainSteps for Poisoned {
        fn step(&mut self) -> Result<StepRecord, TrainError> {
            let t = &mut self.trainer;
            t.zero_grads();
            let batch = t.next_micro_batch();
            let dloss = t.dloss();
            let loss = t.forward_backward(&batch.inputs, &batch.targets, dloss, &mut |_, _| {})?;
            if t.step + 1 == self.poison_at {
                t.grads_mut()[7] = f32::INFINITY;
            }
            t.apply_gradients(loss, std::time::Instant::now())
        }
        fn evaluate(&mut self) -> Result<f32, TrainError> {
            self.trainer.evaluate()
        }
        fn save(&self, dir: &Path) -> Result<(), TrainError> {
            self.trainer.save(dir)
        }
        fn steps_done(&self) -> u64 {
            self.trainer.step
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let cfg = TrainConfig {
        model: "tiny".into(),
        device: kernels::device::DeviceRequest::Cpu,
        batch_size: 2,
        seq_len: Some(16),
        val_batches: 1,
        steps: 5,
        save: Some(ckpt.clone()),
        save_every: 2,
        ..TrainConfig::default()
    };
    let mut run = Poisoned { trainer: Trainer::new(&cfg).unwrap(), poison_at: 3 };
    let err = drive(&cfg, &mut run, true, "").err().expect("the poisoned step stops the run");
    match &err {
        TrainError::NonFiniteLoss { step: 3, grad_norm, last_checkpoint, .. } => {
            assert!(grad_norm.is_infinite(), "{err}");
            assert_eq!(last_checkpoint, &Some((ckpt.clone(), 2)), "{err}");
        }
        other => panic!("expected the step-3 stop, got {other}"),
    }
    assert_eq!(run.trainer.step, 2, "the step did not count");
    let t = &run.trainer;
    let mut saved = vec![0.0; t.layout.total];
    checkpoint::load_weights(&ckpt, &t.model, &t.layout, &mut saved).unwrap();
    assert_eq!(t.params().unwrap(), saved, "and changed no weight: they are the checkpoint's");
    assert_eq!(checkpoint::read_trainer_state(&ckpt).unwrap().step, 2);
    // The checkpoint is good: a resumed run trains on to the end.
    let resumed = ch01_single_gpu::train(&TrainConfig { resume: Some(ckpt.clone()), ..cfg.clone() }).unwrap();
    assert_eq!(resumed.steps.iter().map(|s| s.step).collect::<Vec<_>>(), [3, 4, 5]);
    assert!(resumed.params.iter().all(|p| p.is_finite()) && resumed.losses().iter().all(|l| l.is_finite()));
}

// Item 3, and issue 10: a resumed run says what it resumed, and continues its --metrics log
// (dropping the steps after the checkpoint, which it runs again).
#[test]
fn a_resumed_run_says_so_and_continues_its_metrics_log() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, metrics, straight) = (dir.path().join("ckpt"), dir.path().join("m.jsonl"), dir.path().join("s.jsonl"));
    let constant = ["--lr-schedule", "constant", "--eval-every", "0"];
    let first = tiny(&[&constant[..], &["--steps", "4", "--metrics", path(&straight)]].concat());
    assert!(first.status.success());
    let out = tiny(&[&constant[..], &["--steps", "2", "--save", path(&ckpt), "--metrics", path(&metrics)]].concat());
    assert!(out.status.success());
    // As if the run had gone on to step 3 and been killed in the middle of writing step 4.
    let lines: Vec<String> = std::fs::read_to_string(&straight).unwrap().lines().map(String::from).collect();
    let torn = format!(
        "{}
{}",
        lines[2],
        &lines[3][..10]
    );
    std::fs::write(&metrics, std::fs::read_to_string(&metrics).unwrap() + &torn).unwrap();
    let args = [&constant[..], &["--steps", "4", "--resume", path(&ckpt), "--metrics", path(&metrics)]].concat();
    let out = output_within(tiny_command(&args).arg("--eval-every").arg("0"), Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first_line = String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or_default().to_string();
    assert_eq!(first_line, format!("resuming from step 2 of 4 ({})", ckpt.display()));
    let (resumed, straight) = (metrics_steps(&metrics), metrics_steps(&straight));
    let steps: Vec<u64> = resumed.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4], "every step once, in order");
    for (a, b) in resumed.iter().zip(&straight) {
        assert_eq!((&a["loss"], &a["grad_norm"]), (&b["loss"], &b["grad_norm"]), "the log of an unbroken run");
    }
}

// Item 4: resuming with other data, or other flags, is one line naming what differs.
#[test]
fn resume_refuses_other_data_naming_the_field_and_both_values() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let constant = ["--lr-schedule", "constant"];
    assert!(tiny(&[&constant[..], &["--steps", "1", "--save", path(&ckpt)]].concat()).status.success());
    let other = dir.path().join("other.txt");
    std::fs::write(&other, "All the world's a stage, and all the men and women merely players. ".repeat(40)).unwrap();
    let before = Snapshot::of(dir.path());
    let out = tiny(&[&constant[..], &["--resume", path(&ckpt), "--data", path(&other)]].concat());
    assert_one_error_line(&out, "data.fingerprint is ");
    assert_one_error_line(&out, "--data is not the text that run trained on");
    let out = tiny(&[&constant[..], &["--resume", path(&ckpt), "--lr", "0.001"]].concat());
    assert_one_error_line(&out, "lr is 0.003 in the checkpoint but 0.001 here");
    assert!(out.stderr.len() < 200, "short: {}", String::from_utf8_lossy(&out.stderr));
    before.assert_unchanged(dir.path());
}

// Item 5: a corrupt generator state is refused, not looped on forever.
#[test]
fn an_all_zero_generator_state_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    assert!(tiny(&["--steps", "1", "--save", path(&ckpt)]).status.success());
    let state_path = ckpt.join("trainer_state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["sampler"]["rng"]["state"] = serde_json::json!([0, 0, 0, 0]);
    std::fs::write(&state_path, state.to_string()).unwrap();
    let out = output_within(&mut tiny_command(&["--steps", "3", "--resume", path(&ckpt)]), Duration::from_secs(60));
    assert_one_error_line(&out, "random generator state is all zeros");
}

// Item 7: what used to panic or abort is one line, before any training.
#[test]
fn impossible_sizes_and_an_empty_prompt_get_one_line() {
    assert_one_error_line(&tiny(&["--prompt", "", "--sample-tokens", "5"]), "--prompt must be some text");
    assert_one_error_line(&tiny(&["--n-embd", "18446744073709551615", "--n-head", "1"]), "overflow 64 bits");
    assert_one_error_line(&tiny(&["--block-size", "18446744073709551615"]), "overflow 64 bits");
    assert_one_error_line(&tiny(&["--batch-size", "1000000000"]), "the run needs ");
    assert_one_error_line(&tiny(&["--grad-accum", "18446744073709551615"]), "fit in 64 bits");
    assert_one_error_line(&tiny(&["--val-batches", "18446744073709551615"]), "fit in 64 bits");
}

// Item 8: values outside their range, negative ones included, are refused before training.
#[test]
fn settings_out_of_range_get_one_line() {
    for (flag, value) in [
        ("--lr", "-0.01"),
        ("--lr", "NaN"),
        ("--lr", "inf"),
        ("--beta1", "2"),
        ("--beta2", "-0.5"),
        ("--grad-clip", "-1"),
        ("--grad-clip", "0"),
        ("--adam-eps", "NaN"),
        ("--weight-decay", "NaN"),
        ("--temperature", "-1"),
    ] {
        assert_one_error_line(&tiny(&[flag, value]), &format!("{flag} must be "));
    }
    // A malformed number is clap's one line, not its usage block.
    assert_one_error_line(&tiny(&["--steps", "-1"]), "invalid value '-1' for '--steps");
}

// Item 9: every output path is checked before the first step.
#[test]
fn unwritable_output_paths_are_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let missing = dir.path().join("missing").join("trace.json");
    for (flag, bad, says) in [
        ("--trace", "/proc/trace.json", "cannot create files in /proc"),
        ("--save", "/proc/ckpt", "cannot create files in /proc"),
        ("--trace", path(&missing), "does not exist"),
        ("--metrics", path(dir.path()), "is a directory"),
    ] {
        let out = tiny(&["--steps", "50", "--metrics", path(&metrics), flag, bad]);
        assert_one_error_line(&out, says);
        assert!(!metrics.exists() || flag == "--metrics", "{flag} {bad}: refused before the first step");
    }
}

// Item 10: an OS error is said once, and a full disk says so.
#[test]
fn errors_say_each_cause_once_and_a_full_disk_is_named() {
    let out = tiny(&["--init", "/nonexistent/ckpt"]);
    assert_one_error_line(&out, "config.json");
    assert_eq!(String::from_utf8_lossy(&out.stderr).matches("No such file").count(), 1);
    if Path::new("/dev/full").exists() {
        assert_one_error_line(&tiny(&["--metrics", "/dev/full"]), "the disk is full");
    }
}

// Item 11 and issue 10: a second run saving to the same place is refused, naming the first;
// Ctrl-C stops the first between steps, saying where its last checkpoint is.
#[cfg(unix)]
#[test]
fn a_second_run_is_locked_out_and_ctrl_c_names_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let constant = ["--lr-schedule", "constant"];
    assert!(tiny(&[&constant[..], &["--steps", "2", "--save", path(&ckpt)]].concat()).status.success());
    // A staging directory left by a run killed mid-save: ours, and cleaned up at the start.
    std::fs::create_dir(dir.path().join(".ckpt.staging")).unwrap();
    let metrics = dir.path().join("m.jsonl");
    let long = ["--steps", "1000000", "--quiet", "--resume", path(&ckpt), "--save", path(&ckpt)];
    let first = tiny_command(&[&constant[..], &long[..], &["--metrics", path(&metrics)]].concat())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 2 {
        assert!(started.elapsed() < Duration::from_secs(60), "the first run did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.path().join(".ckpt.staging").exists(), "the leftover staging directory is gone");
    let second = tiny(&["--save", path(&ckpt)]);
    assert_one_error_line(&second, &format!("another run (process {}) is saving there", first.id()));
    // SAFETY: signals a child this test started.
    unsafe { libc::kill(first.id() as i32, libc::SIGINT) };
    let out = first.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: interrupted after step "), "{stderr}");
    let says = format!("the last good checkpoint, from step 2, is in {} (continue with --resume", ckpt.display());
    assert!(last.contains(&says), "{stderr}");
    assert!(!stderr.contains("panicked"));
    assert!(!dir.path().join(".ckpt.lock").exists(), "the lock is released");
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
