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

use crate::config::ModelConfig;
use crate::data::{BatchSampler, DataOrder};
use crate::params::{ParamLayout, ParamSpec};
use crate::schedule::LrSchedule;
use crate::tokenizer::TokenizerKind;
use kernels::ops::adamw::AdamWConfig;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid safetensors file ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("checkpoint {path} does not match the model: {reason}")]
    Mismatch { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
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
}

impl RunShape {
    /// Whether a run of shape `self` resumed from a checkpoint of shape `saved` takes exactly the
    /// steps the saved run would have taken. Everything must match, except the total number of
    /// steps under a constant schedule, which nothing depends on: such a run may be extended.
    pub fn continues(&self, saved: &RunShape) -> bool {
        let extendable = self.lr_schedule == LrSchedule::Constant;
        *self == RunShape { steps: if extendable { self.steps } else { saved.steps }, ..saved.clone() }
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
    safetensors::serialize_to_file(tensors, Some(metadata), path)
        .map_err(|e| CheckpointError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
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

// ANCHOR: save
/// Writes a checkpoint into `dir`, replacing what was there only once the new one is complete.
pub fn save(dir: &Path, contents: &CheckpointContents<'_>) -> Result<(), CheckpointError> {
    save_atomically(dir, |staging| write_files(staging, contents))
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
    let name = dir.file_name().ok_or_else(|| CheckpointError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other("a checkpoint path must name a directory"),
    })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io(&parent))?;
    let staging = parent.join(format!(".{}.staging", name.to_string_lossy()));
    if staging.exists() {
        // Left behind by a run killed mid-save: it never replaced anything, so drop it.
        fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    fs::create_dir(&staging).map_err(io(&staging))?;
    if let Err(e) = write(&staging).and_then(|()| sync_dir_and_files(&staging)) {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    if dir.exists() {
        swap_dirs(&staging, dir)?;
        // `staging` now holds the previous checkpoint.
        fs::remove_dir_all(&staging).map_err(io(&staging))?;
    } else {
        fs::rename(&staging, dir).map_err(io(dir))?;
    }
    sync_path(&parent)
}
// ANCHOR_END: save

fn sync_path(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

fn sync_dir_and_files(dir: &Path) -> Result<(), CheckpointError> {
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        sync_path(&entry.map_err(io(dir))?.path())?;
    }
    sync_path(dir)
}

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
    let old = b.with_extension("old");
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
    serde_json::from_str(&text).map_err(|e| CheckpointError::Json { path, reason: e.to_string() })
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
        fs::write(ckpt.join("stale.txt"), "from the old checkpoint").unwrap();
        params[0] = 42.0;
        save(&ckpt, &CheckpointContents { cfg: &cfg, layout: &layout, params: &params, optimizer: None }).unwrap();
        assert!(!ckpt.join("stale.txt").exists());
        let mut loaded = vec![0.0; layout.total];
        load_weights(&ckpt, &cfg, &layout, &mut loaded).unwrap();
        assert_eq!(loaded[0], 42.0);
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
