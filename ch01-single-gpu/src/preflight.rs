//! What is checked before a run allocates anything or takes its first step, so that a mistake
//! costs a second and one line, not an hour of training (or a panic after it): every setting in
//! its range, every output path writable, and the memory the run needs available.

use crate::checkpoint;
use crate::config::ModelConfig;
use crate::train::{TrainConfig, TrainError};
use kernels::memory::format_bytes;
use kernels::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

// ANCHOR: validate
impl TrainConfig {
    /// Every setting in the range where it means something, and every output path writable.
    /// `Trainer::with_shard` calls it, so library callers get the same checks as the CLI.
    pub fn validate(&self) -> Result<(), TrainError> {
        let range = |flag, expected, value: f32, ok: bool| match ok {
            true => Ok(()),
            false => Err(TrainError::OutOfRange { flag, expected, value: value.to_string() }),
        };
        let positive = |flag, x: f32| range(flag, "a finite number above 0", x, x.is_finite() && x > 0.0);
        let non_negative = |flag, x: f32| range(flag, "a finite number, 0 or more", x, x.is_finite() && x >= 0.0);
        let beta = |flag, x: f32| range(flag, "at least 0 and below 1", x, (0.0..1.0).contains(&x));
        // 0 is allowed: it trains nothing, which evaluating a checkpoint's weights may want.
        non_negative("--lr", self.lr)?;
        non_negative("--weight-decay", self.weight_decay)?;
        beta("--beta1", self.adam.beta1)?;
        beta("--beta2", self.adam.beta2)?;
        positive("--adam-eps", self.adam.eps)?;
        // Clipping to 0 would zero every step; a negative clip would reverse the gradient.
        positive("--grad-clip", self.grad_clip)?;
        non_negative("--temperature", self.temperature)?;
        if self.sample_tokens > 0 && self.prompt.is_empty() {
            return Err(TrainError::OutOfRange {
                flag: "--prompt",
                expected: "some text for the sample to continue (or --sample-tokens 0)",
                value: "\"\"".into(),
            });
        }
        if let Some(dir) = &self.save {
            check_save_dir(dir)?;
        }
        for (flag, path) in [("--metrics", &self.metrics), ("--trace", &self.trace)] {
            if let Some(path) = path {
                check_output_file(flag, path)?;
            }
        }
        Ok(())
    }
}
// ANCHOR_END: validate

/// `--save DIR`: nothing there, an empty directory or a checkpoint of ours (nothing else is
/// ever replaced), somewhere we can create the staging directory beside it.
pub fn check_save_dir(dir: &Path) -> Result<(), TrainError> {
    checkpoint::check_replaceable(dir)?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The save creates missing folders: the nearest one that exists must take new entries.
    let existing = parent.ancestors().find(|p| p.exists()).unwrap_or(Path::new("."));
    let existing = if existing.as_os_str().is_empty() { Path::new(".") } else { existing };
    probe_folder(existing).map_err(|reason| TrainError::Output { flag: "--save", path: dir.to_path_buf(), reason })
}

/// A file a run will write (`--metrics`, `--trace`, `--timeline`, ...): an existing file we may
/// write, or a new name in an existing folder where we may create files. Nothing is changed.
pub fn check_output_file(flag: &'static str, path: &Path) -> Result<(), TrainError> {
    let fail = |reason: String| TrainError::Output { flag, path: path.to_path_buf(), reason };
    if path.is_dir() {
        return Err(fail("is a directory".into()));
    }
    if path.exists() {
        // Opened for writing, neither truncated nor written: its contents and times stay.
        return std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map(drop)
            .map_err(|e| fail(format!("cannot be written ({})", strip_os_code(&e))));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(fail(format!("the folder {} does not exist", parent.display())));
    }
    probe_folder(parent).map_err(fail)
}

/// Whether files can be created in `folder`: creates and removes an empty, hidden file.
fn probe_folder(folder: &Path) -> Result<(), String> {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let n = PROBES.fetch_add(1, Ordering::Relaxed);
    let probe: PathBuf = folder.join(format!(".scale-probe-{}-{n}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("cannot create files in {} ({})", folder.display(), strip_os_code(&e))),
    }
}

/// "Permission denied (os error 13)" -> "Permission denied".
fn strip_os_code(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

// ANCHOR: memory_needed
/// Bytes a trainer of `rows` rows of `t` tokens allocates on its device: what its memory
/// ledger will count. The four f32 buffers of the parameters (parameters, gradients, AdamW's
/// two moments; in bf16 also the parameters' bf16 copy), the activations forward saves
/// ([`crate::model::Activations::floats_per_token`] per token, LayerNorm statistics and losses
/// in f32) and backward's scratch (16·C per token). `None` if the sizes overflow 64 bits.
pub fn memory_needed(model: &ModelConfig, rows: usize, t: usize, dtype: DType) -> Option<u64> {
    let n = |x: usize| x as u64;
    let (c, l, h, vp) = (n(model.n_embd), n(model.n_layer), n(model.n_head), n(model.padded_vocab_size()));
    let s = n(dtype.size());
    let mul = |a: u64, b: u64| a.checked_mul(b);
    let add = |a: u64, b: u64| a.checked_add(b);
    // Parameters: V·C + T_max·C + L·(12·C² + 13·C) + 2·C.
    let per_block = add(mul(12, mul(c, c)?)?, mul(13, c)?)?;
    let params = add(add(mul(vp, c)?, mul(n(model.block_size), c)?)?, add(mul(l, per_block)?, mul(2, c)?)?)?;
    let mut bytes = mul(16, params)?;
    if dtype != DType::F32 {
        bytes = add(bytes, mul(s, params)?)?;
    }
    // Per token: in `dtype`, per block 16·C + H·T (attention's row), then 3·C (embedding, ln_f,
    // a projection) and V; in f32, 4 statistics per block, 2 for ln_f and the loss.
    let wide = add(mul(l, add(mul(16, c)?, mul(h, n(t))?)?)?, add(mul(3, c)?, vp)?)?;
    let stats = add(mul(4, l)?, 3)?;
    let scratch = mul(16, c)?;
    let per_token = add(mul(s, add(wide, scratch)?)?, mul(4, stats)?)?;
    add(bytes, mul(mul(n(rows), n(t))?, per_token)?)
}
// ANCHOR_END: memory_needed

/// Refuses a run whose `ranks` trainers of `rows` rows each (plus, if the run ends with a
/// sample, the sample's activations) need more memory than the device has available.
pub fn check_memory(
    cfg: &TrainConfig,
    model: &ModelConfig,
    rows: usize,
    t: usize,
    device: Device,
    ranks: usize,
) -> Result<(), TrainError> {
    let sample = if cfg.sample_tokens > 0 { memory_needed(model, 1, model.block_size, cfg.dtype) } else { Some(0) };
    let needed = memory_needed(model, rows, t, cfg.dtype)
        .and_then(|per_rank| per_rank.checked_mul(ranks as u64))
        .and_then(|total| total.checked_add(sample?));
    let what = "for parameters, gradients, AdamW's moments and activations";
    let Some(needed) = needed else {
        return Err(TrainError::OutOfMemory(format!(
            "the run would need more than 16 EiB {what} (its sizes overflow 64 bits): check --n-layer, --n-embd, --block-size, --batch-size and --seq-len"
        )));
    };
    let (available, of) = match device {
        Device::Cpu => match host_memory_available() {
            Some(bytes) => (bytes, "memory available on this machine".to_string()),
            None => return Ok(()),
        },
        Device::Cuda(ordinal) => match kernels::cuda::Gpu::get(ordinal) {
            Ok(gpu) if gpu.total_memory > 0 => (gpu.total_memory as u64, format!("memory on cuda:{ordinal}")),
            _ => return Ok(()),
        },
    };
    if needed > available {
        let ranks = if ranks > 1 { format!(" on {ranks} ranks") } else { String::new() };
        return Err(TrainError::OutOfMemory(format!(
            "the run needs {} {what}{ranks}, but there is {} of {of}: use a smaller --batch-size, --seq-len or model",
            format_bytes(needed),
            format_bytes(available)
        )));
    }
    Ok(())
}

/// What this process may still allocate: Linux's MemAvailable, or less where a cgroup (a
/// container's limit) allows less. `None` where neither can be read.
pub fn host_memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    let mut available = kib.saturating_mul(1024);
    let read = |name: &str| std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(name)).ok();
    if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current"))
        && let (Ok(max), Ok(current)) = (max.trim().parse::<u64>(), current.trim().parse::<u64>())
    {
        available = available.min(max.saturating_sub(current));
    }
    Some(available)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Trainer;

    #[test]
    fn memory_needed_is_what_the_ledger_counts() {
        let cfg = TrainConfig {
            model: "tiny".into(),
            batch_size: 3,
            seq_len: Some(16),
            device: kernels::device::DeviceRequest::Cpu,
            ..TrainConfig::default()
        };
        let trainer = Trainer::new(&cfg).unwrap();
        let counted: u64 = trainer.ledger.report().current.values().sum();
        assert_eq!(memory_needed(&trainer.model, 3, 16, DType::F32), Some(counted));
    }

    #[test]
    fn sizes_that_overflow_or_do_not_fit_are_refused() {
        let cfg = TrainConfig::default();
        let huge = ModelConfig { n_embd: usize::MAX / 2, ..ModelConfig::preset("tiny", 256).unwrap() };
        assert_eq!(memory_needed(&huge, 1, 1, DType::F32), None);
        let err = check_memory(&cfg, &huge, 1, 1, Device::Cpu, 1).unwrap_err();
        assert!(err.to_string().contains("overflow"), "{err}");
        let big = ModelConfig::preset("gpt2-xl", 50257).unwrap();
        if host_memory_available().is_some() {
            let err = check_memory(&cfg, &big, 1 << 20, 1024, Device::Cpu, 1).unwrap_err();
            assert!(err.to_string().contains("TiB for parameters, gradients"), "{err}");
        }
    }

    #[test]
    fn ranges_are_checked_up_front() {
        let ok = TrainConfig::default();
        assert!(ok.validate().is_ok());
        for (bad, says) in [
            (TrainConfig { lr: -0.01, ..ok.clone() }, "--lr must be a finite number, 0 or more (got -0.01)"),
            (TrainConfig { lr: f32::NAN, ..ok.clone() }, "--lr must be a finite number, 0 or more (got NaN)"),
            (TrainConfig { grad_clip: 0.0, ..ok.clone() }, "--grad-clip must be a finite number above 0 (got 0)"),
            (TrainConfig { weight_decay: f32::NAN, ..ok.clone() }, "--weight-decay must be"),
            (TrainConfig { temperature: -1.0, ..ok.clone() }, "--temperature must be"),
            (TrainConfig { sample_tokens: 5, prompt: String::new(), ..ok.clone() }, "--prompt must be"),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(says), "{err:?} does not say {says:?}");
        }
    }
}
