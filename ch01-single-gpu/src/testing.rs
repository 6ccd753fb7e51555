//! Helpers for every chapter's command-line tests: a bad input must fail with one line, and
//! touch nothing that was there before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `command` to completion, or kills it and panics after `limit`: a test of "nothing
/// hangs" must not hang itself.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the command starts");
    let started = Instant::now();
    while child.try_wait().expect("the child can be waited for").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("the output can be read")
}

/// Exit status non-zero (and not a panic's 101 or a signal's abort), no panic message, and
/// stderr exactly one line that starts with `error: ` and says `expected`: no backtrace, no
/// usage dump.
pub fn assert_one_error_line(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(out.status.code().is_some_and(|c| c != 101), "a panic or a signal ({:?}): {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "a panic: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains(expected), "{stderr:?} does not say {expected:?}");
}

/// Every file and folder under a directory, with each file's bytes: take one before a command
/// and compare after, to show that it touched nothing.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot(BTreeMap<PathBuf, Option<Vec<u8>>>);

impl Snapshot {
    pub fn of(root: &Path) -> Snapshot {
        let mut entries = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(read) = std::fs::read_dir(&dir) else { continue };
            for entry in read.flatten() {
                let path = entry.path();
                let relative = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                if path.is_dir() {
                    stack.push(path);
                    entries.insert(relative, None);
                } else {
                    entries.insert(relative, Some(std::fs::read(&path).unwrap_or_default()));
                }
            }
        }
        Snapshot(entries)
    }

    /// Panics, naming a path, if `root` no longer holds exactly what this snapshot saw.
    pub fn assert_unchanged(&self, root: &Path) {
        let now = Snapshot::of(root);
        for (path, before) in &self.0 {
            assert!(now.0.get(path) == Some(before), "{} was changed or removed", path.display());
        }
        for path in now.0.keys() {
            assert!(self.0.contains_key(path), "{} appeared", path.display());
        }
    }
}
