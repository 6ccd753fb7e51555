//! The memory ledger: bytes by category on one device, current and peak.
//!
//! Every buffer the trainer allocates is registered here through an [`Allocation`] guard that
//! gives its bytes back when dropped, so the ledger cannot drift from the buffers. The book's
//! memory arithmetic (parameters + gradients + Adam state + activations) is checked against it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Parameters,
    Gradients,
    OptimizerState,
    /// What forward saves for backward.
    Activations,
    /// Buffers used only while collectives run (later chapters).
    Communication,
    /// Scratch: backward's activation gradients, logits of a sampling pass, ...
    Other,
}

impl Category {
    pub const ALL: [Category; 6] = [
        Category::Parameters,
        Category::Gradients,
        Category::OptimizerState,
        Category::Activations,
        Category::Communication,
        Category::Other,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Category::Parameters => "parameters",
            Category::Gradients => "gradients",
            Category::OptimizerState => "optimizer state",
            Category::Activations => "activations",
            Category::Communication => "communication",
            Category::Other => "other",
        };
        f.pad(name)
    }
}

#[derive(Default)]
struct State {
    current: [u64; 6],
    peak: [u64; 6],
    total: u64,
    peak_total: u64,
    /// The breakdown at the moment `peak_total` was reached.
    at_peak: [u64; 6],
}

/// A shared handle: clones count into the same ledger.
#[derive(Clone, Default)]
pub struct MemoryLedger {
    state: Arc<Mutex<State>>,
}

/// Bytes held in one category until dropped.
pub struct Allocation {
    ledger: MemoryLedger,
    category: Category,
    bytes: u64,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        let mut s = self.ledger.lock();
        s.current[self.category.index()] -= self.bytes;
        s.total -= self.bytes;
    }
}

impl fmt::Debug for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Allocation({} bytes of {})", self.bytes, self.category)
    }
}

/// A snapshot of the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    pub current: BTreeMap<Category, u64>,
    /// Each category's own peak.
    pub peak: BTreeMap<Category, u64>,
    /// The highest total, and each category's bytes at that moment.
    pub peak_total: u64,
    pub at_peak: BTreeMap<Category, u64>,
}

impl MemoryLedger {
    pub fn new() -> MemoryLedger {
        MemoryLedger::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counters half-updated (each update
        // is a few additions), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn allocate(&self, category: Category, bytes: u64) -> Allocation {
        let mut s = self.lock();
        let i = category.index();
        s.current[i] += bytes;
        s.peak[i] = s.peak[i].max(s.current[i]);
        s.total += bytes;
        if s.total > s.peak_total {
            s.peak_total = s.total;
            s.at_peak = s.current;
        }
        Allocation { ledger: self.clone(), category, bytes }
    }

    pub fn report(&self) -> MemoryReport {
        let s = self.lock();
        let map = |a: &[u64; 6]| Category::ALL.iter().map(|c| (*c, a[c.index()])).collect();
        MemoryReport {
            current: map(&s.current),
            peak: map(&s.peak),
            peak_total: s.peak_total,
            at_peak: map(&s.at_peak),
        }
    }
}

/// `1536` -> `"1.50 KiB"`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.2} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_current_and_peak_and_frees_on_drop() {
        let ledger = MemoryLedger::new();
        let params = ledger.allocate(Category::Parameters, 100);
        {
            let _acts = ledger.allocate(Category::Activations, 50);
            let r = ledger.report();
            assert_eq!(r.current[&Category::Activations], 50);
            assert_eq!(r.peak_total, 150);
        }
        let _grads = ledger.allocate(Category::Gradients, 20);
        let r = ledger.report();
        assert_eq!(r.current[&Category::Activations], 0);
        assert_eq!(r.peak[&Category::Activations], 50);
        assert_eq!(r.peak_total, 150);
        assert_eq!(r.at_peak[&Category::Activations], 50);
        assert_eq!(r.at_peak[&Category::Gradients], 0);
        drop(params);
        assert_eq!(ledger.report().current[&Category::Parameters], 0);
    }

    #[test]
    fn formats_bytes() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(3 << 30), "3.00 GiB");
    }
}
