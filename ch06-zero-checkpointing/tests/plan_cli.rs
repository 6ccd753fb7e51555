//! `ch06-zero-checkpointing plan`: bad input is one line and a non-zero exit; good input is a
//! table, JSON with the promised fields, and an SVG.

use ch01_single_gpu::testing::assert_one_error_line;
use std::process::{Command, Output};

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ch06-zero-checkpointing")).arg("plan").args(args).output().unwrap()
}

#[test]
fn bad_input_is_one_line_and_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let not_json = dir.path().join("config.json");
    std::fs::write(&not_json, "{ not json").unwrap();
    let no_layers = dir.path().join("partial.json");
    std::fs::write(&no_layers, r#"{"n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}"#).unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--model".into(), "gpt5".into()], "unknown model 'gpt5'"),
        (vec!["--gpu".into(), "tpu-v4".into()], "unknown GPU 'tpu-v4'"),
        (vec!["--gpus".into(), "0".into()], "not a positive number or a range"),
        (vec!["--gpus".into(), "16..8".into()], "is empty"),
        (vec!["--layout".into(), "2,5,1".into()], "tp 5 does not divide the 12 heads"),
        (vec!["--layout".into(), "2,x,1".into()], "not three positive numbers"),
        (vec!["--layout".into(), "1,1,13".into()], "pp 13 is more stages than the 12 layers"),
        (vec!["--layout".into(), "3,1,1".into()], "dp 3 does not divide --global-batch 512"),
        (vec!["--zero".into(), "4".into()], "the stages are 0, 1, 2, 3"),
        (vec!["--global-batch".into(), "0".into()], "--global-batch must be at least 1"),
        (vec!["--microbatch-size".into(), "0".into()], "--microbatch-size must be at least 1"),
        (vec!["--memory-gb=-3".into()], "--memory-gb must be a positive number"),
        (vec!["--efficiency=1.5".into()], "--efficiency must be in (0, 1]"),
        (vec!["--heads".into(), "7".into()], "not divisible by n_head"),
        (vec!["--config".into(), path(&missing)], "cannot read"),
        (vec!["--config".into(), path(&not_json)], "is not JSON"),
        (vec!["--config".into(), path(&no_layers)], "has no n_layer or num_hidden_layers"),
        (vec!["--recompute".into(), "half".into()], "invalid value 'half'"),
        (vec!["--layout".into(), "1,1,1".into(), "--microbatch-size".into(), "3".into()], "no layout of"),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_error_line(&plan(&args), expected);
    }
}

#[test]
fn json_has_the_fields_and_the_fastest_layout_first() {
    let out = plan(&["--model", "gpt2-xl", "--gpus", "8", "--global-batch", "64", "--json", "--top", "5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plans: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plans = plans.as_array().unwrap();
    assert!(!plans.is_empty());
    for p in plans {
        for key in ["dp", "tp", "pp", "microbatches", "zero", "recompute", "memory_per_rank_bytes", "step_seconds"] {
            assert!(p.get(key).is_some(), "{key} missing in {p}");
        }
        for key in ["tflops_per_gpu", "mfu", "fits"] {
            assert!(p.get(key).is_some(), "{key} missing in {p}");
        }
        let gpus = p["dp"].as_u64().unwrap() * p["tp"].as_u64().unwrap() * p["pp"].as_u64().unwrap();
        assert_eq!(gpus, 8);
    }
    let fitting: Vec<f64> =
        plans.iter().filter(|p| p["fits"] == true).map(|p| p["step_seconds"].as_f64().unwrap()).collect();
    assert!(!fitting.is_empty(), "1.5B fits on 8 x 80 GB");
    assert!(fitting.windows(2).all(|w| w[0] <= w[1] * (1.0 + 1e-9)), "fastest first: {fitting:?}");
    let mfu = plans[0]["mfu"].as_f64().unwrap();
    assert!(mfu > 0.0 && mfu < 1.0, "{mfu}");
}

#[test]
fn a_layout_that_does_not_fit_says_why_and_what_to_try() {
    let out = plan(&["--model", "70b", "--layout", "8,1,1", "--recompute", "none", "--zero", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("none of the"), "nothing fits: {stdout}");
    assert!(stdout.contains("> 80.0 GB: try --zero 1 or tp 2 or pp 2"), "{stdout}");
}

#[test]
fn a_range_of_gpus_finds_the_fewest_that_fit_and_the_svg_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("plan.svg");
    let out = plan(&["--model", "7b", "--gpus", "1..16", "--global-batch", "64", "--svg", svg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // 7B of model state alone is 16 bytes x 6.9B = 110 GB: one or two 80 GB GPUs cannot hold it
    // unless ZeRO shards it over more.
    assert!(stdout.contains("    1  nothing fits"), "{stdout}");
    assert!(stdout.contains("fewest GPUs that fit:"), "{stdout}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("memory per rank") && text.contains("bubble"));
}

#[test]
fn a_hugging_face_config_is_the_preset_of_that_shape() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let gpt2 = r#"{"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}"#;
    std::fs::write(&config, gpt2).unwrap();
    let args = ["--gpus", "2", "--global-batch", "16", "--json", "--top", "3"];
    let from_file = plan(&[&["--config", config.to_str().unwrap()][..], &args[..]].concat());
    let from_preset = plan(&[&["--model", "gpt2"][..], &args[..]].concat());
    assert!(from_file.status.success(), "{}", String::from_utf8_lossy(&from_file.stderr));
    assert_eq!(from_file.stdout, from_preset.stdout);
    // The Llama family's key names, at another shape: another plan.
    let llama = r#"{"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 512, "max_position_embeddings": 256, "vocab_size": 32000}"#;
    std::fs::write(&config, llama).unwrap();
    let other = plan(&[&["--config", config.to_str().unwrap()][..], &args[..]].concat());
    assert!(other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
    assert_ne!(other.stdout, from_preset.stdout);
}
