//! CUDA graphs of decode steps: a step that chooses every row's token on the device runs,
//! padded to its bucket of row counts (`backend::graph_layout`), as one replay of a graph
//! captured the first time its bucket was seen.
//!
//! What a graph holds: every kernel of the step from the embedding to the token choice
//! (`StepProgram::graph_body`), with the pointers and grid sizes of its capture. What stays
//! outside: the one host-to-device copy of the step's inputs (into the same staging
//! places every step of the bucket) before the replay, and the token ids' (and asked-for
//! logits') copy back after it. A graph is captured again when a buffer it points into was
//! reallocated (arena, staging, attention workspace) or a step's lowering outgrew the
//! bucket's capacities (that step runs eagerly and the capacities grow). If capture ever
//! fails, graphs are off for the backend's life, said once on stderr, and every step runs
//! eagerly: nothing is lost. [`GraphMode::PaddedEager`] runs the very same padded program
//! op by op: the twin a graph's results are compared with (`tests/gpu_engine.rs`).

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode_enum};
use cudarc::driver::CudaGraph;

use super::{
    backend_err, drv, forked_attention_launches, AttnKernel, AttnLaunch, CudaBackend, GraphMode,
    Op, RowPick, StepProgram, StepShape, TokenOp,
};
use crate::backend::cuda::CudaError;
use crate::backend::graph_layout::{bucket_for, pad_lowered_into, GraphCaps};
use crate::backend::StepInput;
use crate::error::{Result, SpindleError};
use crate::plan::lower::{lower_into, LoweredPlan};

/// One bucket's graph.
struct Slot {
    /// Padded rows.
    rows: usize,
    caps: GraphCaps,
    /// The instantiated graph, and the buffer generation it was captured in.
    exec: Option<(CudaGraph, u64)>,
}

/// The backend's decode graphs.
pub(in crate::backend::cuda) struct Graphs {
    mode: GraphMode,
    max_rows: usize,
    slots: Vec<Slot>,
    /// Why graphs were turned off (a failed capture), if they were.
    broken: Option<String>,
    /// The step's lowering padded to its bucket's capacities (kept across steps).
    padded: LoweredPlan,
    /// Graphs captured since load.
    captures: u64,
}

impl Graphs {
    pub(in crate::backend::cuda) fn new(mode: GraphMode, max_rows: usize) -> Self {
        Self {
            mode,
            max_rows,
            slots: Vec::new(),
            broken: None,
            padded: LoweredPlan::default(),
            captures: 0,
        }
    }

    /// The bucket `step` runs in as a graph step, or `None` to run it eagerly: graphs
    /// off (or broken), kernel v1, copy-on-write copies, a step that does not want every
    /// row's logits in row order (prefill chunks), or more rows than `max_rows`.
    pub(in crate::backend::cuda) fn bucket_of(
        &self,
        step: &StepInput,
        kernel: AttnKernel,
    ) -> Option<usize> {
        if self.mode == GraphMode::Off || self.broken.is_some() || kernel != AttnKernel::V2 {
            return None;
        }
        let rows = step.tokens.len();
        if !step.copies.is_empty() || !step.logit_rows.iter().copied().eq(0..rows as u32) {
            return None;
        }
        bucket_for(rows, self.max_rows)
    }

    fn slot(&mut self, rows: usize, num_sms: usize, max_partials: usize) -> &mut Slot {
        let i = match self.slots.iter().position(|s| s.rows == rows) {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    rows,
                    caps: GraphCaps::initial(rows, num_sms, max_partials),
                    exec: None,
                });
                self.slots.len() - 1
            }
        };
        &mut self.slots[i]
    }

    /// Replays the graph of the bucket of `rows` rows.
    pub(in crate::backend::cuda) fn launch(&self, rows: usize) -> Result<()> {
        let (g, _) = self
            .slots
            .iter()
            .find(|s| s.rows == rows)
            .and_then(|s| s.exec.as_ref())
            .ok_or_else(|| backend_err(format!("no captured graph for {rows} rows")))?;
        drv(g.launch())
    }

    /// Why graphs are off, when a capture failed.
    pub(in crate::backend::cuda) fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Graphs captured since load.
    pub(in crate::backend::cuda) fn captures(&self) -> u64 {
        self.captures
    }

    /// The mode in use.
    pub(in crate::backend::cuda) fn mode(&self) -> GraphMode {
        self.mode
    }

    /// Switches the mode (captured graphs are kept for when it is `On` again).
    pub(in crate::backend::cuda) fn set_mode(&mut self, mode: GraphMode) {
        self.mode = mode;
    }
}

impl CudaBackend {
    /// Runs `step` padded to `bucket` rows as a graph step; `Ok(false)` when its lowering
    /// exceeds the bucket's capacities (they grow for the next step, and the caller runs
    /// this one eagerly).
    pub(super) fn run_graph_step(
        &mut self,
        step: &StepInput,
        picks: &[RowPick],
        bucket: usize,
        marks: bool,
    ) -> Result<bool> {
        self.step = None;
        self.check_step(step)?;
        let cfg = self.lower_config();
        lower_into(&step.plan, &cfg, &mut self.lowered)
            .map_err(|e| backend_err(format!("malformed attention plan: {e}")))?;
        let (num_sms, max_partials) = (self.num_sms, self.opts.max_step_partials);
        let slot = self.graphs.slot(bucket, num_sms, max_partials);
        if !slot.caps.fits(&self.lowered) {
            slot.caps = slot.caps.grown_for(&self.lowered);
            slot.exec = None;
            return Ok(false);
        }
        let caps = slot.caps;
        pad_lowered_into(&self.lowered, &caps, &mut self.graphs.padded).map_err(backend_err)?;
        self.ensure_capacity(bucket, bucket)?;
        // The workspace holds the capacities' partials before anything is captured.
        let stream = self.stream().clone();
        self.ws.reserve(
            &stream,
            caps.partials,
            self.cfg.num_heads,
            self.cfg.head_dim,
        )?;
        self.attn_host.clear();
        let ranges = self.attn_host.push_lowered(&self.graphs.padded);
        {
            let _r = super::range(marks, "begin_step");
            self.stage_inputs(step, picks, bucket, ranges, AttnLaunch::Forked)?;
        }
        let shape = StepShape {
            rows: bucket,
            logit_rows: bucket,
            copies: false,
            attention_launches: forked_attention_launches(bucket, caps.units, caps.rows),
            tokens: TokenOp::Sample,
            logits_back: false,
            graph: true,
        };
        let generation = self.realloc_gen + self.ws.allocations();
        if self.graphs.mode == GraphMode::On {
            let fresh = self
                .graphs
                .slot(bucket, num_sms, max_partials)
                .exec
                .as_ref()
                .is_some_and(|(_, g)| *g == generation);
            if !fresh {
                let _r = super::range(marks, "capture");
                self.capture(bucket, &shape, generation)?;
            }
            if self.graphs.broken.is_none() {
                let _r = super::range(marks, "graph");
                return self.run_op(Op::GraphLaunch).map(|()| true);
            }
        }
        // The padded program op by op (PaddedEager, or after a failed capture).
        let mut body = std::mem::take(&mut self.program);
        body.graph_body_into(&self.cfg, &shape);
        let r = body.ops.iter().try_for_each(|&op| {
            let _r = super::range(marks, op.name());
            self.run_op(op)
        });
        self.program = body;
        r.map(|()| true)
    }

    /// Captures the bucket's graph from the step staged now (nothing runs: the replay that
    /// follows does the step). A failure turns graphs off (see the module docs).
    fn capture(&mut self, bucket: usize, shape: &StepShape, generation: u64) -> Result<()> {
        let body = StepProgram::graph_body(&self.cfg, shape);
        let stream = self.stream().clone();
        let counted = self.counters;
        let begun =
            stream.begin_capture(CUstreamCaptureMode_enum::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        let ran = match begun {
            Ok(()) => body.ops.iter().try_for_each(|&op| self.run_op(op)),
            Err(e) => Err(SpindleError::from(CudaError::from(e))),
        };
        let ended = if begun.is_ok() {
            stream.end_capture(CUgraphInstantiate_flags(0))
        } else {
            Ok(None)
        };
        // Captured kernels did not run: the replay counts as one graph launch.
        self.counters = counted;
        let why = match (ran, ended) {
            (Ok(()), Ok(Some(g))) => {
                let (sms, mp) = (self.num_sms, self.opts.max_step_partials);
                self.graphs.slot(bucket, sms, mp).exec = Some((g, generation));
                self.graphs.captures += 1;
                return Ok(());
            }
            (Err(e), _) => e.to_string(),
            (Ok(()), Err(e)) => format!("instantiating: {e:?}"),
            (Ok(()), Ok(None)) => "the capture produced no graph".to_string(),
        };
        // What failed inside the capture must not be reported again by the eager launches.
        crate::backend::cuda::Gpu::clear_last_error();
        eprintln!("spindle: CUDA graph capture for {bucket} rows failed ({why}); graphs are off, steps run eagerly");
        self.graphs.broken = Some(why);
        for s in &mut self.graphs.slots {
            s.exec = None;
        }
        Ok(())
    }

    /// Why CUDA graphs were turned off (a capture failed), if they were.
    pub fn graphs_disabled(&self) -> Option<&str> {
        self.graphs.broken()
    }

    /// CUDA graphs captured since load (one per bucket, plus re-captures after a buffer
    /// grew).
    pub fn graph_captures(&self) -> u64 {
        self.graphs.captures()
    }

    /// How steps that could run as graphs run.
    pub fn graph_mode(&self) -> GraphMode {
        self.graphs.mode()
    }

    /// Switches how graph-shaped steps run from the next step on (benchmarks compare
    /// graphs on and off on one backend).
    pub fn set_graph_mode(&mut self, mode: GraphMode) {
        self.graphs.set_mode(mode);
    }
}
