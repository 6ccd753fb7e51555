//! A trace of named spans, written as Chrome trace-event JSON (open it in Perfetto).
//!
//! `let _s = trace.span("forward");` records from now until `_s` is dropped. A disabled trace
//! (the default) records nothing and costs one branch per span.

use serde::Serialize;
use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct TraceEvent {
    pub name: Cow<'static, str>,
    /// Process lane in the viewer: one per rank/device.
    pub pid: u32,
    /// Thread lane: the compute stream, a communication thread, ...
    pub tid: u32,
    pub start_us: f64,
    pub dur_us: f64,
}

struct Inner {
    origin: Instant,
    events: Mutex<Vec<TraceEvent>>,
}

#[derive(Clone, Default)]
pub struct Trace {
    inner: Option<Arc<Inner>>,
    pid: u32,
    tid: u32,
}

/// Records a span when dropped.
pub struct Span<'a> {
    trace: &'a Trace,
    name: Cow<'static, str>,
    start: Option<Instant>,
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        if let (Some(inner), Some(start)) = (&self.trace.inner, self.start) {
            let event = TraceEvent {
                name: std::mem::take(&mut self.name),
                pid: self.trace.pid,
                tid: self.trace.tid,
                start_us: start.duration_since(inner.origin).as_secs_f64() * 1e6,
                dur_us: start.elapsed().as_secs_f64() * 1e6,
            };
            inner.events.lock().unwrap_or_else(|e| e.into_inner()).push(event);
        }
    }
}

impl Trace {
    /// A trace that records nothing.
    pub fn disabled() -> Trace {
        Trace::default()
    }

    pub fn enabled() -> Trace {
        Trace {
            inner: Some(Arc::new(Inner { origin: Instant::now(), events: Mutex::new(Vec::new()) })),
            pid: 0,
            tid: 0,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The same trace (same clock, same event list), recording into another lane.
    pub fn lane(&self, pid: u32, tid: u32) -> Trace {
        Trace { inner: self.inner.clone(), pid, tid }
    }

    pub fn span(&self, name: impl Into<Cow<'static, str>>) -> Span<'_> {
        match self.inner {
            Some(_) => Span { trace: self, name: name.into(), start: Some(Instant::now()) },
            None => Span { trace: self, name: Cow::Borrowed(""), start: None },
        }
    }

    pub fn events(&self) -> Vec<TraceEvent> {
        match &self.inner {
            Some(inner) => inner.events.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            None => Vec::new(),
        }
    }

    /// Chrome trace-event format: complete events (`"ph": "X"`) with microsecond times.
    pub fn to_chrome_json(&self) -> String {
        let events: Vec<serde_json::Value> = self
            .events()
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name, "ph": "X", "pid": e.pid, "tid": e.tid,
                    "ts": e.start_us, "dur": e.dur_us,
                })
            })
            .collect();
        serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" }).to_string()
    }

    pub fn write_chrome_json(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_chrome_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_nested_spans_in_lanes() {
        let trace = Trace::enabled();
        {
            let _outer = trace.span("step");
            let comm = trace.lane(0, 1);
            let _inner = comm.span(format!("layer {}", 3));
        }
        let events = trace.events();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].name, "layer 3");
        assert_eq!(events[0].tid, 1);
        assert!(events[1].dur_us >= events[0].dur_us);
        let json: serde_json::Value = serde_json::from_str(&trace.to_chrome_json()).unwrap();
        assert_eq!(json["traceEvents"][1]["name"], "step");
        assert_eq!(json["traceEvents"][1]["ph"], "X");
    }

    #[test]
    fn disabled_trace_records_nothing() {
        let trace = Trace::disabled();
        drop(trace.span("x"));
        assert!(trace.events().is_empty());
    }
}
