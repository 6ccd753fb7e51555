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

    /// Microseconds since the trace began (`None` when disabled): for spans timed by another
    /// clock, such as a GPU's events, to be placed on this one.
    pub fn now_us(&self) -> Option<f64> {
        self.inner.as_ref().map(|inner| inner.origin.elapsed().as_secs_f64() * 1e6)
    }

    /// Adds a span measured elsewhere, in this lane.
    pub fn record(&self, name: impl Into<Cow<'static, str>>, start_us: f64, dur_us: f64) {
        if let Some(inner) = &self.inner {
            let event = TraceEvent { name: name.into(), pid: self.pid, tid: self.tid, start_us, dur_us };
            inner.events.lock().unwrap_or_else(|e| e.into_inner()).push(event);
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

    /// The time span of the last event called `name` in lane (pid, tid), if any.
    pub fn last_span(&self, name: &str, pid: u32, tid: u32) -> Option<(f64, f64)> {
        self.events()
            .iter()
            .filter(|e| e.name == name && e.pid == pid && e.tid == tid)
            .max_by(|a, b| a.start_us.total_cmp(&b.start_us))
            .map(|e| (e.start_us, e.start_us + e.dur_us))
    }

    /// A timeline of the events overlapping [from_us, to_us] as an SVG: one row per lane,
    /// one box per span (nested spans drawn inside their parents), the book's figures.
    pub fn to_svg(&self, from_us: f64, to_us: f64, lane_names: impl Fn(u32, u32) -> String) -> String {
        let mut events: Vec<TraceEvent> =
            self.events().into_iter().filter(|e| e.start_us < to_us && e.start_us + e.dur_us > from_us).collect();
        // Longer spans first, so that a span's children are drawn on top of it.
        events.sort_by(|a, b| b.dur_us.total_cmp(&a.dur_us));
        let mut lanes: Vec<(u32, u32)> = events.iter().map(|e| (e.pid, e.tid)).collect();
        lanes.sort();
        lanes.dedup();
        let (label_w, width, row_h) = (150.0, 900.0, 34.0);
        let x = |us: f64| {
            label_w + (us.clamp(from_us, to_us) - from_us) / (to_us - from_us).max(1e-9) * (width - label_w - 10.0)
        };
        let height = lanes.len() as f64 * row_h + 40.0;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n"
        );
        for (row, &(pid, tid)) in lanes.iter().enumerate() {
            let y = 10.0 + row as f64 * row_h;
            svg += &format!("<text x=\"4\" y=\"{:.1}\">{}</text>\n", y + row_h / 2.0, lane_names(pid, tid));
            for e in events.iter().filter(|e| (e.pid, e.tid) == (pid, tid)) {
                let (x0, x1) = (x(e.start_us), x(e.start_us + e.dur_us));
                // Depth by nesting: a span inside a longer one of the same lane is drawn thinner.
                let depth = events
                    .iter()
                    .filter(|o| (o.pid, o.tid) == (pid, tid) && o.dur_us > e.dur_us)
                    .filter(|o| o.start_us <= e.start_us && o.start_us + o.dur_us >= e.start_us + e.dur_us)
                    .count() as f64;
                let (top, h) = (y + 2.0 + 5.0 * depth, row_h - 6.0 - 10.0 * depth);
                let colour = match e.name.split(' ').next().unwrap_or("") {
                    "step" => "#e8e8e8",
                    "forward" => "#8ecae6",
                    "backward" => "#219ebc",
                    "optimizer" => "#ffb703",
                    "all-reduce" => "#fb8500",
                    _ => "#bbbbbb",
                };
                svg += &format!(
                    "<rect x=\"{x0:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\" stroke=\"#555\" stroke-width=\"0.5\"><title>{} ({:.2} ms)</title></rect>\n",
                    (x1 - x0).max(0.5),
                    h.max(4.0),
                    e.name,
                    e.dur_us / 1000.0
                );
                if x1 - x0 > 60.0 && depth <= 1.0 {
                    svg += &format!("<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n", x0 + 3.0, top + 12.0, e.name);
                }
            }
        }
        let axis_y = height - 12.0;
        svg += &format!(
            "<text x=\"{label_w}\" y=\"{axis_y}\">0 ms</text><text x=\"{:.1}\" y=\"{axis_y}\" text-anchor=\"end\">{:.1} ms</text>\n</svg>\n",
            width - 10.0,
            (to_us - from_us) / 1000.0
        );
        svg
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
    fn renders_the_window_as_svg() {
        let trace = Trace::enabled();
        {
            let _step = trace.span("step");
            drop(trace.span("forward"));
            let comm = trace.lane(0, 1);
            drop(comm.span("all-reduce bucket 0"));
        }
        let (from, to) = trace.last_span("step", 0, 0).unwrap();
        let svg = trace.to_svg(from, to, |pid, tid| format!("rank {pid} lane {tid}"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.contains("rank 0 lane 1") && svg.contains("all-reduce bucket 0"));
        assert!(trace.last_span("backward", 0, 0).is_none());
    }

    #[test]
    fn disabled_trace_records_nothing() {
        let trace = Trace::disabled();
        drop(trace.span("x"));
        assert!(trace.events().is_empty());
    }
}
