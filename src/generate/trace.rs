//! Chrome trace export (opens in Perfetto / `chrome://tracing`): each thread's lifetime as a
//! complete ("X") event on its own track, grouped by request, and the batch width and rows
//! of every step as counter ("C") events. Timestamps are real microseconds since the
//! generator started; every event also carries its step index.

use crate::error::{Result, SpindleError};
use crate::tree::{RequestId, ThreadId};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone)]
struct Span {
    request: RequestId,
    thread: ThreadId,
    name: String,
    start_us: u64,
    start_step: u64,
    end: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
struct Counter {
    ts_us: u64,
    step: u64,
    width: usize,
    rows: usize,
}

/// Collects thread spans and per-step counters.
#[derive(Debug, Clone)]
pub struct TraceRecorder {
    t0: Instant,
    spans: Vec<Span>,
    counters: Vec<Counter>,
}

impl Default for TraceRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceRecorder {
    /// An empty trace starting now.
    pub fn new() -> Self {
        Self {
            t0: Instant::now(),
            spans: Vec::new(),
            counters: Vec::new(),
        }
    }

    fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// A thread started at `step`.
    pub fn thread_start(&mut self, request: RequestId, thread: ThreadId, name: String, step: u64) {
        let start_us = self.now_us();
        self.spans.push(Span {
            request,
            thread,
            name,
            start_us,
            start_step: step,
            end: None,
        });
    }

    /// A thread ended at `step`.
    pub fn thread_end(&mut self, thread: ThreadId, step: u64) {
        let now = self.now_us();
        if let Some(s) = self
            .spans
            .iter_mut()
            .rev()
            .find(|s| s.thread == thread && s.end.is_none())
        {
            s.end = Some((now, step));
        }
    }

    /// Step `step` ran `width` threads in `rows` rows.
    pub fn step(&mut self, step: u64, width: usize, rows: usize) {
        let ts_us = self.now_us();
        self.counters.push(Counter {
            ts_us,
            step,
            width,
            rows,
        });
    }

    /// The trace as Chrome trace JSON (`{"traceEvents": [...]}`).
    pub fn to_json(&self) -> Value {
        let now = self.now_us();
        let mut events = Vec::new();
        for s in &self.spans {
            let (end_us, end_step) = s.end.unwrap_or((now, s.start_step));
            events.push(json!({
                "name": s.name, "cat": "thread", "ph": "X",
                "ts": s.start_us, "dur": end_us.saturating_sub(s.start_us).max(1),
                "pid": s.request, "tid": s.thread,
                "args": {"start_step": s.start_step, "end_step": end_step},
            }));
        }
        for c in &self.counters {
            events.push(json!({
                "name": "batch", "cat": "step", "ph": "C", "ts": c.ts_us, "pid": 0,
                "args": {"width": c.width, "rows": c.rows},
            }));
            events.push(json!({
                "name": "step", "cat": "step", "ph": "i", "s": "g", "ts": c.ts_us, "pid": 0,
                "tid": 0, "args": {"step": c.step},
            }));
        }
        json!({"traceEvents": events, "displayTimeUnit": "ms"})
    }

    /// Writes the trace to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(&self.to_json()).map_err(|source| SpindleError::Json {
            what: format!("trace {}", path.display()),
            source,
        })?;
        std::fs::write(path, text).map_err(|source| SpindleError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
