//! The communication thread: it owns the rank's communicator and runs the collectives the
//! compute thread queues, so that a bucket's all-reduce proceeds while backward computes the
//! gradients of the layers below it.
//!
//! Every rank queues the same jobs in the same order (the buckets of one model finish in the
//! same order everywhere), which is what makes the collectives match up across ranks.

use kernels::Trace;
use kernels::comm::{CommError, CommStats, Communicator, ReduceOp};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

pub enum Job {
    /// Sum this bucket of gradients across ranks.
    ReduceBucket { bucket: usize, data: Vec<f32> },
    /// Reduce a few numbers (losses) across ranks.
    ReduceScalars { values: Vec<f32>, op: ReduceOp },
    /// Report the byte counts and end.
    Stop,
}

pub enum Done {
    Bucket { bucket: usize, data: Vec<f32>, seconds: f64 },
    Scalars(Vec<f32>),
    Stopped(CommStats),
}

// ANCHOR: comm_worker
/// Runs on the communication thread until `Stop` (or until the compute thread hangs up).
pub fn comm_worker<C: Communicator>(
    mut comm: C,
    jobs: Receiver<Job>,
    done: Sender<Result<Done, CommError>>,
    trace: Trace,
) {
    for job in jobs {
        let result = match job {
            Job::ReduceBucket { bucket, mut data } => {
                let _span = trace.span(format!("all-reduce bucket {bucket}"));
                let started = Instant::now();
                comm.all_reduce(&mut data, ReduceOp::Sum).map(|()| Done::Bucket {
                    bucket,
                    data,
                    seconds: started.elapsed().as_secs_f64(),
                })
            }
            Job::ReduceScalars { mut values, op } => comm.all_reduce(&mut values, op).map(|()| Done::Scalars(values)),
            Job::Stop => {
                let _ = done.send(Ok(Done::Stopped(comm.stats())));
                return;
            }
        };
        let failed = result.is_err();
        if done.send(result).is_err() || failed {
            return;
        }
    }
}
// ANCHOR_END: comm_worker
