//! Spans of GPU time. The host queues work and moves on, so a host-side span around a kernel
//! launch measures the launch, not the kernel. Instead, a CUDA event is recorded on the stream
//! at each end of the span; the GPU stamps it when it reaches it, and once both have happened
//! their difference is the time the GPU spent on the span's work.

use super::{CudaError, Gpu, driver_error};
use crate::trace::Trace;
use cudarc::driver::CudaEvent;
use cudarc::driver::sys::CUevent_flags;
use std::borrow::Cow;
use std::sync::Arc;

/// Records spans of one GPU's stream into a trace lane.
pub struct StreamTrace {
    gpu: Arc<Gpu>,
    lane: Trace,
    /// An event the GPU passed at a known host time: how GPU times are placed on the host clock.
    anchor: Option<(CudaEvent, f64)>,
    /// Spans whose events the GPU may not have reached yet.
    pending: Vec<(Cow<'static, str>, CudaEvent, CudaEvent)>,
}

/// A span begun by [`StreamTrace::start`]; hand it back to [`StreamTrace::end`].
pub struct StreamSpan(Option<(Cow<'static, str>, CudaEvent)>);

impl StreamTrace {
    /// Spans of `gpu`'s stream, into `lane` (a disabled trace records nothing and costs nothing).
    pub fn new(gpu: Arc<Gpu>, lane: Trace) -> StreamTrace {
        StreamTrace { gpu, lane, anchor: None, pending: Vec::new() }
    }

    // ANCHOR: stream_span
    fn event(&self) -> Option<CudaEvent> {
        let event = self.gpu.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let event = self.gpu.record("creating a timing event", event)?;
        self.gpu.record("recording a timing event", event.record(self.gpu.stream()))?;
        Some(event)
    }

    pub fn start(&mut self, name: impl Into<Cow<'static, str>>) -> StreamSpan {
        if !self.lane.is_enabled() {
            return StreamSpan(None);
        }
        if self.anchor.is_none() {
            // With the stream idle, the GPU reaches the anchor as soon as it is recorded.
            let _ = self.gpu.stream().synchronize();
            let now = self.lane.now_us().unwrap_or(0.0);
            self.anchor = self.event().map(|e| (e, now));
        }
        StreamSpan(self.event().map(|e| (name.into(), e)))
    }

    pub fn end(&mut self, span: StreamSpan) {
        if let Some((name, start)) = span.0
            && let Some(end) = self.event()
        {
            self.pending.push((name, start, end));
        }
    }
    // ANCHOR_END: stream_span

    /// Waits for the GPU to pass every pending span and writes them into the lane.
    pub fn flush(&mut self) -> Result<(), CudaError> {
        let Some((anchor, anchor_us)) = &self.anchor else { return Ok(()) };
        for (name, start, end) in self.pending.drain(..) {
            let ms = |a: &CudaEvent, b: &CudaEvent| a.elapsed_ms(b).map_err(|e| driver_error("timing a span", e));
            let (offset, duration) = (ms(anchor, &start)?, ms(&start, &end)?);
            self.lane.record(name, anchor_us + offset as f64 * 1e3, duration as f64 * 1e3);
        }
        Ok(())
    }
}
