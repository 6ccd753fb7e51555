//! Checkpoints in Hugging Face's GPT-2 layout, written atomically.
//!
//! A checkpoint directory holds:
//! - `model.safetensors` + `config.json`: what `GPT2LMHeadModel.from_pretrained(dir)` loads
//!   (names like `h.0.attn.c_attn.weight`, Conv1D weights [in, out], the vocabulary unpadded);
//! - `optimizer.safetensors`: AdamW's two moments, in our padded layout;
//! - `trainer_state.json`: the step, the data sampler's position and generator state, and the
//!   run's shape, so that `--resume` continues bit for bit.
//!
//! Atomic: everything is written into a staging directory beside the target, flushed to disk,
//! and only then swapped in. A kill at any moment leaves either the old checkpoint or the new
//! one, never a mix.
//!
//! Safe: a save only ever replaces a checkpoint (a directory holding nothing but the four files
//! above) or an empty directory; anything else is refused before a byte is written. A run that
//! saves holds a lock beside the directory ([`SaveLock`]), so two runs never save to one place.

use crate::config::ModelConfig;
use crate::data::{BatchSampler, DataIdentity, DataOrder};
use crate::params::{ParamLayout, ParamSpec};
use crate::schedule::LrSchedule;
use crate::tokenizer::TokenizerKind;
use kernels::memory::format_bytes;
use kernels::ops::adamw::AdamWConfig;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: the disk is full{}", match .needed {
        Some(needed) => format!(" (the checkpoint needs {}, {} are free)", format_bytes(*needed), format_bytes(*free)),
        None => String::new(),
    })]
    DiskFull { path: PathBuf, needed: Option<u64>, free: u64 },
    #[error(
        "refusing to save to {path}: {reason}; a save replaces only a checkpoint directory (or an empty one), so choose another --save"
    )]
    NotACheckpoint { path: PathBuf, reason: String },
    #[error("{path} is in use: another run (process {pid}) is saving there (its lock is {lock})")]
    Locked { path: PathBuf, pid: String, lock: PathBuf },
    #[error("{path}: not a valid safetensors file ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("checkpoint {path} does not match the model: {reason}")]
    Mismatch { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| {
        if is_disk_full(&source) {
            CheckpointError::DiskFull { path: path.to_path_buf(), needed: None, free: free_bytes(path).unwrap_or(0) }
        } else {
            CheckpointError::Io { path: path.to_path_buf(), source }
        }
    }
}

/// No space left (ENOSPC), or over a quota (EDQUOT): either way, the disk is full for us.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        return true;
    }
    e.kind() == std::io::ErrorKind::StorageFull
}

/// Bytes free to us on the file system holding `path` (or its nearest existing ancestor), where
/// the system says.
pub fn free_bytes(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("."));
        let existing = if existing.as_os_str().is_empty() { Path::new(".") } else { existing };
        if let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_bytes()) {
            // SAFETY: `c` is a valid NUL-terminated path and `stat` a properly sized buffer.
            let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
            if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } == 0 {
                return Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64));
            }
        }
    }
    let _ = path;
    None
}

const LAYER_NORM_EPSILON: f64 = 1e-5;
const _: () = assert!(LAYER_NORM_EPSILON as f32 == kernels::ops::layernorm::EPS);

/// `config.json` as Hugging Face writes it for GPT-2.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub n_positions: usize,
    #[serde(default)]
    pub n_ctx: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub activation_function: String,
    #[serde(default)]
    pub resid_pdrop: f64,
    #[serde(default)]
    pub embd_pdrop: f64,
    #[serde(default)]
    pub attn_pdrop: f64,
    #[serde(default)]
    pub initializer_range: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<usize>,
    #[serde(default)]
    pub eos_token_id: Option<usize>,
}

impl HfConfig {
    pub fn from_model(cfg: &ModelConfig) -> HfConfig {
        // GPT-2's BPE has <|endoftext|> = 50256; the byte vocabulary has no special token.
        let eot = (cfg.vocab_size == 50257).then_some(50256);
        HfConfig {
            model_type: "gpt2".into(),
            architectures: vec!["GPT2LMHeadModel".into()],
            vocab_size: cfg.vocab_size,
            n_positions: cfg.block_size,
            n_ctx: cfg.block_size,
            n_embd: cfg.n_embd,
            n_layer: cfg.n_layer,
            n_head: cfg.n_head,
            // GPT-2's 1e-5, written as such (the f32 EPS widened would print 9.999999747e-6).
            layer_norm_epsilon: LAYER_NORM_EPSILON,
            activation_function: "gelu_new".into(), // the tanh approximation
            resid_pdrop: 0.0,
            embd_pdrop: 0.0,
            attn_pdrop: 0.0,
            initializer_range: 0.02,
            tie_word_embeddings: true,
            bos_token_id: eot,
            eos_token_id: eot,
        }
    }

    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_embd: self.n_embd,
            block_size: self.n_positions,
            vocab_size: self.vocab_size,
        }
    }
}

// ANCHOR: trainer_state
/// The run a checkpoint belongs to: `--resume` refuses a checkpoint whose run differs in any
/// way that would change the batches or the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunShape {
    pub model: ModelConfig,
    pub tokenizer: TokenizerKind,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub data_order: DataOrder,
    pub seed: u64,
    /// The optimizer's settings and the schedule's length: a resumed step must take exactly the
    /// update the uninterrupted run would have taken.
    pub steps: u64,
    pub lr: f32,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub grad_clip: f32,
    pub adam: AdamWConfig,
    /// The text trained on, as tokenized. Absent in checkpoints written before it was recorded:
    /// those resume without the check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataIdentity>,
}

impl RunShape {
    /// Whether a run of shape `self` resumed from a checkpoint of shape `saved` takes exactly the
    /// steps the saved run would have taken: `None` if so, else the first setting that differs
    /// and its two values. Everything must match, except the total number of steps under a
    /// constant schedule, which nothing depends on: such a run may be extended.
    pub fn difference(&self, saved: &RunShape) -> Option<String> {
        let extendable = self.lr_schedule == LrSchedule::Constant;
        let ours = RunShape {
            steps: if extendable { saved.steps } else { self.steps },
            data: if saved.data.is_none() { None } else { self.data.clone() },
            ..self.clone()
        };
        // The data last: a different tokenizer also changes the tokens, and is the cause.
        let settings = RunShape { data: saved.data.clone(), ..ours.clone() };
        let theirs = serde_json::to_value(saved).ok()?;
        let differ = |shape: &RunShape| first_difference("", &serde_json::to_value(shape).ok()?, &theirs);
        let (field, here, there) = differ(&settings).or_else(|| differ(&ours))?;
        let hint = match field.as_str() {
            f if f.starts_with("data.") => "--data is not the text that run trained on".to_string(),
            f => format!("resume with that run's flags ({})", flag_of(f)),
        };
        Some(format!("it was written by a different run: {field} is {there} in the checkpoint but {here} here; {hint}"))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed (AdamW's t).
    pub step: u64,
    pub sampler: BatchSampler,
    pub run: RunShape,
}
// ANCHOR_END: trainer_state

/// The first field (in a fixed order) where two JSON values differ, with both values.
fn first_difference(at: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<(String, String, String)> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                first_difference(&path, a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null))
            })
        }
        _ if a == b => None,
        _ => Some((at.to_string(), show(a), show(b))),
    }
}

/// A JSON value as a user wrote it: strings unquoted, an f32 (widened to f64 on the way to
/// JSON) in its shortest form.
fn show(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() && (x as f32) as f64 == x => (x as f32).to_string(),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The flag that sets a field of [`RunShape`].
fn flag_of(field: &str) -> String {
    let name = match field {
        "model.vocab_size" | "tokenizer" => "tokenizer",
        "model.n_layer" | "model.n_head" | "model.n_embd" | "model.block_size" => &field[6..],
        "adam.beta1" | "adam.beta2" => &field[5..],
        "adam.eps" => "adam_eps",
        other => other,
    };
    format!("--{}", name.replace('_', "-"))
}

/// A tensor to write: shape + f32 data, little-endian on disk.
struct F32View<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// The tensor as Hugging Face stores it: the embedding without its padding rows.
fn hf_shape(spec: &ParamSpec, cfg: &ModelConfig) -> Vec<usize> {
    if spec.name == "wte.weight" { vec![cfg.vocab_size, cfg.n_embd] } else { spec.shape.clone() }
}

fn write_safetensors(path: &Path, tensors: Vec<(String, F32View<'_>)>) -> Result<(), CheckpointError> {
    // transformers refuses safetensors files without format = "pt" in their metadata.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => io(path)(source),
        e => CheckpointError::Corrupt { path: path.to_path_buf(), reason: e.to_string() },
    })?;
    // The safetensors writer goes through a private temporary file (mode 0600); give the
    // checkpoint the permissions of every other file we write.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(io(path))?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CheckpointError::Json { path: path.to_path_buf(), reason: e.to_string() })?;
    fs::write(path, text + "\n").map_err(io(path))
}

/// What a checkpoint holds.
pub struct CheckpointContents<'a> {
    pub cfg: &'a ModelConfig,
    pub layout: &'a ParamLayout,
    pub params: &'a [f32],
    /// AdamW's first and second moments, and the trainer state (absent for a weights-only save).
    pub optimizer: Option<(&'a [f32], &'a [f32], &'a TrainerState)>,
}

impl CheckpointContents<'_> {
    /// About what the checkpoint takes on disk: the tensors' bytes (headers and JSON are small).
    pub fn bytes(&self) -> u64 {
        let moments = if self.optimizer.is_some() { 2 * self.layout.total } else { 0 };
        (4 * (self.params.len() + moments)) as u64 + 64 * 1024
    }
}

// ANCHOR: save
/// Writes a checkpoint into `dir`, replacing what was there only once the new one is complete.
pub fn save(dir: &Path, contents: &CheckpointContents<'_>) -> Result<(), CheckpointError> {
    let needed = contents.bytes();
    let disk_full = |free| CheckpointError::DiskFull { path: dir.to_path_buf(), needed: Some(needed), free };
    // The new checkpoint is written beside the old one: it needs its whole size free. Refused
    // before writing, rather than filling the disk for everyone else first.
    if let Some(free) = free_bytes(dir)
        && free < needed
    {
        return Err(disk_full(free));
    }
    save_atomically(dir, |staging| write_files(staging, contents)).map_err(|e| match e {
        CheckpointError::DiskFull { .. } => disk_full(free_bytes(dir).unwrap_or(0)),
        e => e,
    })
}

fn write_files(dir: &Path, c: &CheckpointContents<'_>) -> Result<(), CheckpointError> {
    let model: Vec<(String, F32View<'_>)> = c
        .layout
        .specs
        .iter()
        .map(|spec| {
            let shape = hf_shape(spec, c.cfg);
            let n: usize = shape.iter().product();
            (spec.name.clone(), F32View { shape, data: &c.params[spec.offset..spec.offset + n] })
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), model)?;
    write_json(&dir.join("config.json"), &HfConfig::from_model(c.cfg))?;
    if let Some((m, v, state)) = c.optimizer {
        let mut moments = Vec::new();
        for spec in &c.layout.specs {
            for (prefix, buf) in [("exp_avg", m), ("exp_avg_sq", v)] {
                moments.push((
                    format!("{prefix}.{}", spec.name),
                    F32View { shape: spec.shape.clone(), data: &buf[spec.range()] },
                ));
            }
        }
        write_safetensors(&dir.join("optimizer.safetensors"), moments)?;
        write_json(&dir.join("trainer_state.json"), state)?;
    }
    Ok(())
}

/// Runs `write` into a fresh staging directory next to `dir`, flushes it to disk, then swaps it
/// in for `dir`. If `write` fails (or the process dies), `dir` is untouched.
pub fn save_atomically(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let staging = staging_dir(dir)?;
    let parent = parent_of(dir);
    // Refused before anything is written: a save replaces only a checkpoint of ours.
    check_replaceable(dir)?;
    fs::create_dir_all(&parent).map_err(io(&parent))?;
    // Left behind by a run killed mid-save: it never replaced anything, so drop it.
    remove_leftover_staging(dir)?;
    fs::create_dir(&staging).map_err(io(&staging))?;
    if let Err(e) = write(&staging).and_then(|()| sync_dir_and_files(&staging)) {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    if fs::symlink_metadata(dir).is_ok() {
        swap_dirs(&staging, dir)?;
        // `staging` now holds the previous checkpoint.
        fs::remove_dir_all(&staging).map_err(io(&staging))?;
    } else {
        fs::rename(&staging, dir).map_err(io(dir))?;
    }
    sync_path(&parent)
}
// ANCHOR_END: save

/// The files of a checkpoint: a directory holding anything else is not one of ours.
pub const CHECKPOINT_FILES: [&str; 4] =
    ["model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json"];

// ANCHOR: check_replaceable
/// Whether a save may replace what is at `dir`: nothing, an empty directory, or a checkpoint.
/// A file, or a directory holding anything but checkpoint files, is refused (and not touched).
pub fn check_replaceable(dir: &Path) -> Result<(), CheckpointError> {
    let refuse = |reason: String| CheckpointError::NotACheckpoint { path: dir.to_path_buf(), reason };
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    };
    if !meta.is_dir() {
        return Err(refuse("it is a file, not a directory".into()));
    }
    let mut entries: Vec<String> = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        entries.push(entry.map_err(io(dir))?.file_name().to_string_lossy().into_owned());
    }
    entries.sort();
    match entries.iter().find(|name| !CHECKPOINT_FILES.contains(&name.as_str())) {
        Some(name) => Err(refuse(format!("it holds {name}, which is not part of a checkpoint"))),
        None => Ok(()),
    }
}
// ANCHOR_END: check_replaceable

/// Where a save into `dir` stages its files: `.NAME.staging` beside it.
pub fn staging_dir(dir: &Path) -> Result<PathBuf, CheckpointError> {
    let name = dir.file_name().ok_or_else(|| CheckpointError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other("a checkpoint path must name a directory"),
    })?;
    Ok(parent_of(dir).join(format!(".{}.staging", name.to_string_lossy())))
}

fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Deletes a staging directory that a run killed mid-save left beside `dir`: it never replaced
/// anything. Call it only while holding the [`SaveLock`] (a live run's staging is in use).
pub fn remove_leftover_staging(dir: &Path) -> Result<(), CheckpointError> {
    let staging = staging_dir(dir)?;
    if fs::symlink_metadata(&staging).is_ok() {
        fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    Ok(())
}

fn sync_path(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

fn sync_dir_and_files(dir: &Path) -> Result<(), CheckpointError> {
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        sync_path(&entry.map_err(io(dir))?.path())?;
    }
    sync_path(dir)
}

// ANCHOR: save_lock
/// A run's claim on its save directory, held from before its first step to its end:
/// `.NAME.lock` beside the directory (not inside it: each save swaps the directory out),
/// holding the process id. The lock is an `flock`, which the kernel releases when the process
/// ends, however it ends: a lock file left by a killed run never blocks the next one.
pub struct SaveLock {
    path: PathBuf,
    _file: fs::File,
}

impl SaveLock {
    pub fn take(dir: &Path) -> Result<SaveLock, CheckpointError> {
        let name = staging_dir(dir)?.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = parent_of(dir);
        fs::create_dir_all(&parent).map_err(io(&parent))?;
        let path = parent.join(name.replace(".staging", ".lock"));
        loop {
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io(&path))?;
            if !try_lock(&file).map_err(io(&path))? {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = if pid.trim().is_empty() { "unknown".to_string() } else { pid.trim().to_string() };
                return Err(CheckpointError::Locked { path: dir.to_path_buf(), pid, lock: path });
            }
            // Its last holder may have removed the file between our open and our lock: only the
            // file that is still at `path` counts.
            if same_file(&file, &path) {
                file.set_len(0).map_err(io(&path))?;
                file.rewind().map_err(io(&path))?;
                writeln!(file, "{}", std::process::id()).map_err(io(&path))?;
                return Ok(SaveLock { path, _file: file });
            }
        }
    }
}

impl Drop for SaveLock {
    fn drop(&mut self) {
        // Removed while still locked; closing the file then releases the lock.
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(unix)]
fn try_lock(file: &fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(false) } else { Err(e) }
}

#[cfg(not(unix))]
fn try_lock(_file: &fs::File) -> std::io::Result<bool> {
    Ok(true)
}

#[cfg(unix)]
fn same_file(file: &fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &fs::File, path: &Path) -> bool {
    path.exists()
}
// ANCHOR_END: save_lock

// ANCHOR: swap_dirs
/// Exchanges two directories in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); where that
/// is unavailable, two renames (a crash between them leaves the old checkpoint at `dir.old`).
fn swap_dirs(a: &Path, b: &Path) -> Result<(), CheckpointError> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let ca = CString::new(a.as_os_str().as_bytes()).map_err(|e| io(a)(std::io::Error::other(e)))?;
        let cb = CString::new(b.as_os_str().as_bytes()).map_err(|e| io(b)(std::io::Error::other(e)))?;
        // SAFETY: both pointers are valid NUL-terminated paths for the duration of the call.
        let rc =
            unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
        if rc == 0 {
            return Ok(());
        }
    }
    let old = PathBuf::from(format!("{}.old", b.display()));
    fs::rename(b, &old).map_err(io(b))?;
    fs::rename(a, b).map_err(io(b))?;
    fs::rename(&old, a).map_err(io(a))
}
// ANCHOR_END: swap_dirs

fn read_bytes(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    fs::read(path).map_err(io(path))
}

pub fn read_hf_config(dir: &Path) -> Result<HfConfig, CheckpointError> {
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Json { path, reason: e.to_string() })
}

pub fn read_trainer_state(dir: &Path) -> Result<TrainerState, CheckpointError> {
    let path = dir.join("trainer_state.json");
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| CheckpointError::Json { path: path.clone(), reason: e.to_string() })?;
    state.sampler.check().map_err(|e| CheckpointError::Json { path: path.clone(), reason: e.to_string() })?;
    if state.sampler.order != state.run.data_order {
        let reason = format!(
            "the sampler's order ({:?}) is not the run's ({:?}) (a corrupt file)",
            state.sampler.order, state.run.data_order
        );
        return Err(CheckpointError::Json { path, reason });
    }
    Ok(state)
}

/// Copies tensor `name` (looked up as is, or under `prefix`) into `out`, checking dtype and shape.
fn read_tensor(
    st: &SafeTensors<'_>,
    path: &Path,
    name: &str,
    shape: &[usize],
    out: &mut [f32],
) -> Result<(), CheckpointError> {
    let mismatch = |reason: String| CheckpointError::Mismatch { path: path.to_path_buf(), reason };
    let view = st
        .tensor(name)
        .or_else(|_| st.tensor(&format!("transformer.{name}")))
        .map_err(|_| mismatch(format!("tensor {name} is missing")))?;
    if view.dtype() != Dtype::F32 {
        return Err(mismatch(format!("tensor {name} is {:?}; only F32 checkpoints are supported", view.dtype())));
    }
    if view.shape() != shape {
        return Err(mismatch(format!("tensor {name} has shape {:?}, the model expects {shape:?}", view.shape())));
    }
    for (o, b) in out.iter_mut().zip(view.data().chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, CheckpointError> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| CheckpointError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })
}

// ANCHOR: load
/// Loads the weights of a checkpoint in `dir` into `params` (our layout, padding rows zeroed).
/// The checkpoint's config.json must describe the same model.
pub fn load_weights(
    dir: &Path,
    cfg: &ModelConfig,
    layout: &ParamLayout,
    params: &mut [f32],
) -> Result<(), CheckpointError> {
    let hf = read_hf_config(dir)?;
    let theirs = hf.model_config();
    if theirs != *cfg {
        return Err(CheckpointError::Mismatch {
            path: dir.to_path_buf(),
            reason: format!(
                "it holds n_layer={} n_head={} n_embd={} block_size={} vocab={}, the model is n_layer={} n_head={} n_embd={} block_size={} vocab={} (pass the matching --model/--n-layer/--n-head/--n-embd/--block-size/--tokenizer)",
                theirs.n_layer,
                theirs.n_head,
                theirs.n_embd,
                theirs.block_size,
                theirs.vocab_size,
                cfg.n_layer,
                cfg.n_head,
                cfg.n_embd,
                cfg.block_size,
                cfg.vocab_size
            ),
        });
    }
    let path = dir.join("model.safetensors");
    let bytes = read_bytes(&path)?;
    let st = parse(&path, &bytes)?;
    params.fill(0.0);
    for spec in &layout.specs {
        let shape = hf_shape(spec, cfg);
        let n: usize = shape.iter().product();
        read_tensor(&st, &path, &spec.name, &shape, &mut params[spec.offset..spec.offset + n])?;
    }
    Ok(())
}
// ANCHOR_END: load

/// Loads AdamW's moments written by [`save`].
pub fn load_optimizer(dir: &Path, layout: &ParamLayout, m: &mut [f32], v: &mut [f32]) -> Result<(), CheckpointError> {
    let path = dir.join("optimizer.safetensors");
    let bytes = read_bytes(&path)?;
    let st = parse(&path, &bytes)?;
    for spec in &layout.specs {
        read_tensor(&st, &path, &format!("exp_avg.{}", spec.name), &spec.shape, &mut m[spec.range()])?;
        read_tensor(&st, &path, &format!("exp_avg_sq.{}", spec.name), &spec.shape, &mut v[spec.range()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (ModelConfig, ParamLayout, Vec<f32>) {
        let cfg = ModelConfig::preset("tiny", 256).unwrap();
        let layout = ParamLayout::new(&cfg);
        let params = (0..layout.total).map(|i| (i as f32 * 0.37).sin()).collect();
        (cfg, layout, params)
    }

    #[test]
    fn weights_round_trip_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, layout, params) = tiny();
        let ckpt = dir.path().join("ckpt");
        save(&ckpt, &CheckpointContents { cfg: &cfg, layout: &layout, params: &params, optimizer: None }).unwrap();
        let mut loaded = vec![0.0; layout.total];
        load_weights(&ckpt, &cfg, &layout, &mut loaded).unwrap();
        assert_eq!(loaded, params);
        let hf = read_hf_config(&ckpt).unwrap();
        assert_eq!((hf.model_type.as_str(), hf.n_layer, hf.activation_function.as_str()), ("gpt2", 2, "gelu_new"));
    }

    #[test]
    fn a_failed_save_leaves_the_previous_checkpoint_intact() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, layout, params) = tiny();
        let ckpt = dir.path().join("ckpt");
        save(&ckpt, &CheckpointContents { cfg: &cfg, layout: &layout, params: &params, optimizer: None }).unwrap();
        let before = fs::read(ckpt.join("model.safetensors")).unwrap();
        // A save that dies halfway: one file half-written, then an error.
        let result = save_atomically(&ckpt, |staging| {
            fs::write(staging.join("model.safetensors"), &before[..before.len() / 2]).unwrap();
            Err(CheckpointError::Io { path: staging.into(), source: std::io::Error::other("killed") })
        });
        assert!(result.is_err());
        assert_eq!(fs::read(ckpt.join("model.safetensors")).unwrap(), before);
        assert!(!dir.path().join(".ckpt.staging").exists());
    }

    #[test]
    fn a_second_save_replaces_the_whole_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, layout, mut params) = tiny();
        let ckpt = dir.path().join("ckpt");
        save(&ckpt, &CheckpointContents { cfg: &cfg, layout: &layout, params: &params, optimizer: None }).unwrap();
        // A stale file of ours (as if from a full save) does not survive a weights-only save.
        fs::write(ckpt.join("trainer_state.json"), "{}").unwrap();
        params[0] = 42.0;
        save(&ckpt, &CheckpointContents { cfg: &cfg, layout: &layout, params: &params, optimizer: None }).unwrap();
        assert!(!ckpt.join("trainer_state.json").exists());
        let mut loaded = vec![0.0; layout.total];
        load_weights(&ckpt, &cfg, &layout, &mut loaded).unwrap();
        assert_eq!(loaded[0], 42.0);
    }

    #[test]
    fn resume_names_the_first_difference_and_accepts_checkpoints_without_data() {
        let shape = RunShape {
            model: ModelConfig::preset("tiny", 256).unwrap(),
            tokenizer: TokenizerKind::Byte,
            batch_size: 4,
            seq_len: 16,
            grad_accum: 1,
            data_order: DataOrder::Random,
            seed: 1,
            steps: 10,
            lr: 3e-3,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            weight_decay: 0.1,
            grad_clip: 1.0,
            adam: AdamWConfig::default(),
            data: Some(DataIdentity { tokens: 100, fingerprint: "00000000000000aa".into() }),
        };
        assert_eq!(shape.difference(&RunShape { steps: 5, ..shape.clone() }), None, "a constant schedule extends");
        assert_eq!(shape.difference(&RunShape { data: None, ..shape.clone() }), None, "older checkpoints resume");
        let other = RunShape {
            seed: 2,
            data: Some(DataIdentity { tokens: 7, ..shape.data.clone().unwrap() }),
            ..shape.clone()
        };
        let reason = shape.difference(&other).unwrap();
        assert!(
            reason.contains("seed is 2 in the checkpoint but 1 here; resume with that run's flags (--seed)"),
            "{reason}"
        );
        let reason = shape.difference(&RunShape { seed: 1, ..other }).unwrap();
        assert!(reason.contains("data.tokens is 7 in the checkpoint but 100 here"), "{reason}");
    }

    #[test]
    fn a_save_replaces_nothing_but_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, layout, params) = tiny();
        let contents = CheckpointContents { cfg: &cfg, layout: &layout, params: &params, optimizer: None };
        let thesis = dir.path().join("thesis");
        fs::create_dir_all(thesis.join("chapters")).unwrap();
        fs::write(thesis.join("thesis.txt"), "years of work").unwrap();
        let err = save(&thesis, &contents).unwrap_err();
        assert!(err.to_string().contains("it holds chapters, which is not part of a checkpoint"), "{err}");
        assert_eq!(fs::read_to_string(thesis.join("thesis.txt")).unwrap(), "years of work");
        let file = dir.path().join("notes.txt");
        fs::write(&file, "notes").unwrap();
        let err = save(&file, &contents).unwrap_err();
        assert!(err.to_string().contains("it is a file, not a directory"), "{err}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "notes");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "nothing staged or moved aside: {names:?}");
        // An empty directory is fine, and so is a leftover staging directory, which is ours.
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        fs::create_dir(dir.path().join(".empty.staging")).unwrap();
        save(&empty, &contents).unwrap();
        assert!(empty.join("model.safetensors").exists() && !dir.path().join(".empty.staging").exists());
    }

    #[test]
    fn a_second_lock_names_the_first_holder_and_a_dropped_lock_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let lock = SaveLock::take(&ckpt).unwrap();
        let err = SaveLock::take(&ckpt).err().expect("the second lock is refused");
        assert!(err.to_string().contains(&format!("another run (process {})", std::process::id())), "{err}");
        drop(lock);
        assert!(!dir.path().join(".ckpt.lock").exists());
        let _again = SaveLock::take(&ckpt).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_full_disk_says_so() {
        let err = io(Path::new("/tmp/x"))(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(err.to_string().starts_with("cannot write /tmp/x: the disk is full"), "{err}");
    }

    #[test]
    fn truncated_and_mismatched_checkpoints_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, layout, params) = tiny();
        let ckpt = dir.path().join("ckpt");
        save(&ckpt, &CheckpointContents { cfg: &cfg, layout: &layout, params: &params, optimizer: None }).unwrap();
        let mut loaded = vec![0.0; layout.total];

        let bigger = ModelConfig { n_embd: 128, ..cfg.clone() };
        let err =
            load_weights(&ckpt, &bigger, &ParamLayout::new(&bigger), &mut vec![0.0; ParamLayout::new(&bigger).total])
                .unwrap_err();
        assert!(err.to_string().contains("does not match the model"), "{err}");

        let file = ckpt.join("model.safetensors");
        let bytes = fs::read(&file).unwrap();
        fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
        let err = load_weights(&ckpt, &cfg, &layout, &mut loaded).unwrap_err();
        assert!(err.to_string().contains("not a valid safetensors file"), "{err}");
    }
}
