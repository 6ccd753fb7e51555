//! `--metrics FILE`: one JSON object per optimizer step.
//!
//! A fresh run creates the file anew. A resumed run continues the file: it keeps the lines of
//! the steps up to its checkpoint, drops any later ones (steps that were run after the
//! checkpoint was written, and are now run again, with the same results) and a line torn by a
//! kill, and appends. So the log of an interrupted and resumed run is the log of a run that
//! never stopped. A file that is not a log of step records is refused, untouched.
//!
//! A value that is not a finite number (a NaN loss) is written as the string `"NaN"`, `"inf"`
//! or `"-inf"`: JSON has no such numbers, and `null` would hide what happened.

use crate::checkpoint::{CheckpointError, free_bytes, is_disk_full};
use crate::train::{StepRecord, TrainError};
use serde::{Serialize, Serializer};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for a run that has already done `resumed` steps (0: a fresh run).
    pub fn open(path: &Path, resumed: u64) -> Result<MetricsLog, TrainError> {
        let fail = |e| write_error(path, e);
        let file = if resumed == 0 || !path.exists() {
            File::create(path).map_err(fail)?
        } else {
            let keep = bytes_to_keep(path, resumed)?;
            let file = OpenOptions::new().append(true).open(path).map_err(fail)?;
            file.set_len(keep).map_err(fail)?;
            file
        };
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    pub fn write(&mut self, record: &StepRecord) -> Result<(), TrainError> {
        self.line(record)
    }

    /// The line of a step that stopped the run, with what its loss and gradient norm were.
    pub fn write_stopped(&mut self, step: u64, loss: f32, grad_norm: f32) -> Result<(), TrainError> {
        #[derive(Serialize)]
        struct Stopped {
            step: u64,
            #[serde(serialize_with = "number")]
            loss: f32,
            #[serde(serialize_with = "number")]
            grad_norm: f32,
            stopped: &'static str,
        }
        self.line(&Stopped { step, loss, grad_norm, stopped: "not finite: the step changed nothing" })
    }

    fn line(&mut self, value: &impl Serialize) -> Result<(), TrainError> {
        let line = serde_json::to_string(value).unwrap_or_default();
        writeln!(self.file, "{line}").map_err(|e| write_error(&self.path, e))
    }
}

/// The length of the prefix of the log at `path` that a run resumed at step `resumed` keeps.
fn bytes_to_keep(path: &Path, resumed: u64) -> Result<u64, TrainError> {
    let text = std::fs::read(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
    let mut kept = 0;
    for (i, line) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        let torn = !line.ends_with(b"\n");
        let step = serde_json::from_slice::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64());
        match step {
            Some(step) if step > resumed => break,
            Some(_) if !torn => kept += line.len(),
            // The last line, cut short by a kill in the middle of writing it.
            _ if torn => break,
            _ if line.iter().all(u8::is_ascii_whitespace) => kept += line.len(),
            _ => return Err(TrainError::NotAMetricsLog { path: path.to_path_buf(), line: i + 1 }),
        }
    }
    Ok(kept as u64)
}

fn write_error(path: &Path, source: std::io::Error) -> TrainError {
    if is_disk_full(&source) {
        TrainError::Checkpoint(CheckpointError::DiskFull {
            path: path.to_path_buf(),
            needed: None,
            free: free_bytes(path).unwrap_or(0),
        })
    } else {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}

/// A float as a JSON number, or as the string "NaN", "inf" or "-inf".
pub fn number<S: Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
    match *x {
        x if x.is_finite() => s.serialize_f32(x),
        x if x.is_nan() => s.serialize_str("NaN"),
        x if x > 0.0 => s.serialize_str("inf"),
        _ => s.serialize_str("-inf"),
    }
}

pub fn optional_number<S: Serializer>(x: &Option<f32>, s: S) -> Result<S::Ok, S::Error> {
    match x {
        Some(x) => number(x, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, loss: f32) -> StepRecord {
        StepRecord { step, loss, lr: 0.1, grad_norm: 1.0, tokens_per_sec: 1.0, val_loss: None }
    }

    #[test]
    fn a_resumed_log_keeps_the_steps_up_to_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut log = MetricsLog::open(&path, 0).unwrap();
        (1..=5).for_each(|s| log.write(&record(s, s as f32)).unwrap());
        drop(log);
        // A kill in the middle of step 6's line.
        OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"step\":6,\"lo").unwrap();
        let mut log = MetricsLog::open(&path, 3).unwrap();
        log.write(&record(4, f32::NAN)).unwrap();
        let steps: Vec<serde_json::Value> =
            std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(steps.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(steps[3]["loss"], "NaN");
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("thesis.txt");
        std::fs::write(&path, "{\"step\":1}\nChapter one\n").unwrap();
        let err = MetricsLog::open(&path, 5).err().unwrap();
        assert!(err.to_string().contains("line 2 is not a step record"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\":1}\nChapter one\n");
    }
}
