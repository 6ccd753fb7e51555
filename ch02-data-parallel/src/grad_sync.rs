//! Gradient sync for a data-parallel group: the gradients of every replica summed, bucket by
//! bucket, on a communication thread, while backward computes the layers below.
//!
//! One piece, over any communicator (thread ranks here; NCCL or TCP ranks, or the data-parallel
//! sub-group of a 3D grid, in later chapters): a rank's trainer hands it each part's gradients
//! as backward finishes them ([`GradSync::on_ready`], from backward's `GradsReady` hook), and
//! [`GradSync::finish`] waits for the sums and writes them back into the gradient buffer.

use crate::buckets::{Bucket, plan_buckets};
use crate::overlap::{Done, Job, comm_worker};
use ch01_single_gpu::TrainError;
use ch01_single_gpu::params::{ParamLayout, Part};
use kernels::comm::{CommError, CommStats, Communicator, ReduceOp};
use kernels::memory::Allocation;
use kernels::{Category, MemoryLedger, Trace, View};
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

fn comm_failed() -> TrainError {
    TrainError::Comm(CommError::Backend("the communication thread stopped".into()))
}

/// A rank's side of the data-parallel gradient sum.
pub struct GradSync {
    layout: ParamLayout,
    buckets: Vec<Bucket>,
    /// For each tensor (index into the layout's specs), its bucket.
    bucket_of: Vec<usize>,
    /// Each bucket's communication buffer, while the compute thread holds it.
    buffers: Vec<Option<Vec<f32>>>,
    /// Per bucket, this step: tensors not yet copied in, and whether it was sent.
    remaining: Vec<usize>,
    launched: Vec<bool>,
    /// Launch buckets from backward's hook (true), or all after backward (false).
    overlap: bool,
    /// The first failure inside the hook, reported by `finish`.
    error: Option<TrainError>,
    _buffer_bytes: Allocation,
    jobs: Sender<Job>,
    done: Receiver<Result<Done, CommError>>,
    worker: Option<JoinHandle<()>>,
    /// Time the all-reduces took on the communication thread, and the part of it the compute
    /// thread waited for after backward (the part not hidden).
    pub comm_seconds: f64,
    pub exposed_seconds: f64,
}

impl GradSync {
    /// Starts the communication thread over `comm` (every rank of the group must do the same
    /// with the same layout and bucket size). `bucket_bytes` 0: one all-reduce of every gradient
    /// after backward. The buffers are counted in `ledger` as communication memory.
    pub fn new<C: Communicator + Send + 'static>(
        comm: C,
        layout: &ParamLayout,
        bucket_bytes: usize,
        ledger: &MemoryLedger,
        trace: Trace,
    ) -> GradSync {
        // One rank has nothing to all-reduce: no buckets, no communication buffers.
        let buckets = if comm.world_size() == 1 { Vec::new() } else { plan_buckets(layout, bucket_bytes) };
        let mut bucket_of = vec![0; layout.specs.len()];
        for (b, bucket) in buckets.iter().enumerate() {
            bucket.tensors.clone().for_each(|i| bucket_of[i] = b);
        }
        let bucketed: usize = buckets.iter().map(|b| b.range.len()).sum();
        let (jobs, job_queue) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let worker = std::thread::spawn(move || comm_worker(comm, job_queue, done_tx, trace));
        GradSync {
            layout: layout.clone(),
            buffers: buckets.iter().map(|b| Some(vec![0.0f32; b.range.len()])).collect(),
            remaining: vec![0; buckets.len()],
            launched: vec![false; buckets.len()],
            overlap: bucket_bytes > 0 && !buckets.is_empty(),
            buckets,
            bucket_of,
            error: None,
            _buffer_bytes: ledger.allocate(Category::Communication, (bucketed * 4) as u64),
            jobs,
            done,
            worker: Some(worker),
            comm_seconds: 0.0,
            exposed_seconds: 0.0,
        }
    }

    /// Readies the buckets for the backward pass whose gradients are the step's last (the
    /// earlier micro-batches of an accumulating step only add up locally, what PyTorch's DDP
    /// calls no_sync).
    pub fn begin(&mut self) {
        for (b, bucket) in self.buckets.iter().enumerate() {
            self.remaining[b] = bucket.tensors.len();
            self.launched[b] = false;
        }
    }

    // ANCHOR: on_ready
    /// Backward's hook: `part`'s gradients (its tensors, in layout order) are final. Copies
    /// them into their buckets, and sends each bucket whose last tensor this was.
    pub fn on_ready(&mut self, part: Part, grads: &[View<'_>]) {
        if !self.overlap || self.error.is_some() {
            return;
        }
        for (i, grad) in self.layout.part_tensors(part).zip(grads) {
            let b = self.bucket_of[i];
            let at = self.layout.specs[i].offset - self.buckets[b].range.start;
            match self.buffers[b].as_mut() {
                Some(data) => data[at..at + grad.len()].copy_from_slice(grad.cpu()),
                None => self.error = Some(comm_failed()),
            }
            self.remaining[b] -= 1;
            if self.remaining[b] == 0
                && let Err(e) = self.launch(b)
            {
                self.error = Some(e);
            }
        }
    }
    // ANCHOR_END: on_ready

    /// Queues bucket `b`'s all-reduce (its buffer must hold its gradients).
    fn launch(&mut self, b: usize) -> Result<(), TrainError> {
        let data = self.buffers[b].take().ok_or_else(comm_failed)?;
        self.launched[b] = true;
        self.jobs.send(Job::ReduceBucket { bucket: b, data }).map_err(|_| comm_failed())
    }

    // ANCHOR: finish
    /// After backward: sends the buckets the hook did not (all of them without overlap), waits
    /// for every sum and copies it into `grads` (the flat gradient buffer). The time spent here
    /// is communication that backward did not hide.
    pub fn finish(&mut self, grads: &mut [f32]) -> Result<(), TrainError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        for b in 0..self.buckets.len() {
            if !self.launched[b] {
                let range: Range<usize> = self.buckets[b].range.clone();
                let data = self.buffers[b].as_mut().ok_or_else(comm_failed)?;
                data.copy_from_slice(&grads[range]);
                self.launch(b)?;
            }
        }
        let waiting = Instant::now();
        for _ in 0..self.buckets.len() {
            match self.done.recv().map_err(|_| comm_failed())? {
                Ok(Done::Bucket { bucket, data, seconds }) => {
                    grads[self.buckets[bucket].range.clone()].copy_from_slice(&data);
                    self.buffers[bucket] = Some(data);
                    self.comm_seconds += seconds;
                }
                Ok(_) => return Err(comm_failed()),
                Err(e) => return Err(TrainError::Comm(e)),
            }
        }
        self.exposed_seconds += waiting.elapsed().as_secs_f64();
        Ok(())
    }
    // ANCHOR_END: finish

    /// Reduces a few numbers (losses) across the group, in order with the buckets.
    pub fn reduce_scalars(&mut self, values: Vec<f32>, op: ReduceOp) -> Result<Vec<f32>, TrainError> {
        self.jobs.send(Job::ReduceScalars { values, op }).map_err(|_| comm_failed())?;
        match self.done.recv().map_err(|_| comm_failed())? {
            Ok(Done::Scalars(values)) => Ok(values),
            Ok(_) => Err(comm_failed()),
            Err(e) => Err(TrainError::Comm(e)),
        }
    }

    /// Ends the communication thread and returns what it sent and received.
    pub fn stop(&mut self) -> Result<CommStats, TrainError> {
        self.jobs.send(Job::Stop).map_err(|_| comm_failed())?;
        let stats = match self.done.recv().map_err(|_| comm_failed())? {
            Ok(Done::Stopped(stats)) => stats,
            Ok(_) => return Err(comm_failed()),
            Err(e) => return Err(TrainError::Comm(e)),
        };
        if let Some(worker) = self.worker.take() {
            worker.join().map_err(|_| comm_failed())?;
        }
        Ok(stats)
    }
}
