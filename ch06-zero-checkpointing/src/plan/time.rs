//! Step time for one layout: compute from FLOPs, each collective by an alpha-beta model on the
//! link it uses, and the pipeline's bubble from chapter 4's simulator.
//!
//! A micro-batch's forward (backward) on a stage costs its FLOPs at the stated efficiency, plus
//! its tensor-parallel all-reduces (chapter 3's counts, on NVLink: Megatron's TP waits for
//! them), plus the activation (gradient) it sends to the next (previous) stage. Chapter 4's
//! simulator runs the schedule with those costs: its makespan is compute, TP and pipeline
//! communication, and the bubble. The data-parallel gradient sync overlaps backward as chapter
//! 2's buckets do; what does not fit under the compute is exposed.

use super::memory::{activation_floats, fullest_stages, in_flight, schedule, stage_chunks, stage_units};
use super::{Layout, Problem};
use crate::recompute::Recompute;
use ch01_single_gpu::config::ModelConfig;
use ch03_tensor_parallel::cost::{CollectiveFloats, backward_collectives, forward_collectives, ring_elements_sent};
use ch03_tensor_parallel::tp_comm::Stream;
use ch04_pipeline::simulate::{Costs, simulate_stages};
use ch04_pipeline::stage::PartCosts;
use serde::Serialize;
use std::cell::RefCell;
use std::collections::HashMap;

/// One link: seconds a message (alpha) and bytes a second (beta's inverse).
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub latency: f64,
    pub bandwidth: f64,
}

// ANCHOR: alpha_beta
impl Link {
    /// A ring all-reduce over `n` ranks of `bytes` each: 2(n-1) steps, each rank sending
    /// 2(n-1)/n of the buffer (chapter 2's ring, chapter 3's `ring_elements_sent`).
    pub fn all_reduce(&self, bytes: f64, n: usize) -> f64 {
        if n <= 1 { 0.0 } else { 2.0 * (n - 1) as f64 * (self.latency + bytes / n as f64 / self.bandwidth) }
    }
    /// A reduce-scatter or an all-gather: half an all-reduce.
    pub fn half_ring(&self, bytes: f64, n: usize) -> f64 {
        self.all_reduce(bytes, n) / 2.0
    }
    /// One point-to-point message.
    pub fn send(&self, bytes: f64) -> f64 {
        self.latency + bytes / self.bandwidth
    }
}
// ANCHOR_END: alpha_beta

/// Where the time of a step goes, seconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepTime {
    pub step_seconds: f64,
    /// The busiest stage's FLOPs at the stated efficiency, and its memory-bound ops at the HBM's
    /// bandwidth.
    pub compute_seconds: f64,
    /// Tensor-parallel and pipeline messages on the busiest stage, and the data-parallel sync
    /// that backward does not hide.
    pub exposed_comm_seconds: f64,
    /// The busiest stage's idle time within the step.
    pub bubble_seconds: f64,
    /// FLOPs of the step on all GPUs, recomputation counted (the hardware's count) and not
    /// (the model's: chapter 1's `flops_per_token`).
    pub hardware_flops: f64,
    pub model_flops: f64,
}

/// One stage's cost of one micro-batch, seconds.
#[derive(Clone, Copy, Debug, Default)]
struct StageCost {
    compute_forward: f64,
    compute_backward: f64,
    comm_forward: f64,
    comm_backward: f64,
}

// ANCHOR: flops
/// FLOPs per token of training, recomputation included: chapter 1's `flops_per_token` (forward
/// once, backward twice) plus what backward runs again: each block's forward (`full`, a third
/// of chapter 4's block cost) or its attention products (`selective`, a third of chapter 1's
/// 12·L·T·C term).
pub fn hardware_flops_per_token(model: &ModelConfig, seq: usize, mode: Recompute) -> f64 {
    model.flops_per_token(seq) + model.n_layer as f64 * recompute_flops_per_block(model, seq, mode)
}

fn recompute_flops_per_block(model: &ModelConfig, seq: usize, mode: Recompute) -> f64 {
    match mode {
        Recompute::None => 0.0,
        Recompute::Full => PartCosts::estimate(model, seq).block / 3.0,
        Recompute::Selective => (model.flops_per_token(seq) - model.flops_per_token(0)) / model.n_layer as f64 / 3.0,
    }
}
// ANCHOR_END: flops

/// A simulation's inputs: pp, chunks, micro-batches, each stage's costs (as bits).
type SimulationKey = (usize, usize, usize, Vec<(u64, u64)>);

/// Prices layouts; remembers the pipeline simulations it ran (many layouts share one): the
/// makespan and each stage's busy time.
#[derive(Default)]
pub struct Timer {
    simulations: RefCell<HashMap<SimulationKey, (f64, Vec<f64>)>>,
    flights: RefCell<HashMap<(usize, usize, usize), Vec<usize>>>,
}

impl Timer {
    /// Micro-batch-chunks in flight on each of [`fullest_stages`] (others: 0), from the schedule.
    pub fn in_flight(&self, layout: &Layout, microbatches: usize) -> Vec<usize> {
        if layout.pp == 1 {
            return vec![1];
        }
        let key = (layout.pp, layout.chunks, microbatches);
        if let Some(hit) = self.flights.borrow().get(&key) {
            return hit.clone();
        }
        let schedule = schedule(layout, microbatches);
        let mut flights = vec![0; layout.pp];
        for s in fullest_stages(layout.pp) {
            flights[s] = in_flight(&schedule, s);
        }
        self.flights.borrow_mut().insert(key, flights.clone());
        flights
    }

    /// The step time of `layout` with `microbatches` per data-parallel rank.
    pub fn step(&self, problem: &Problem, layout: &Layout, microbatches: usize) -> StepTime {
        let (model, gpu, a) = (&problem.model, &problem.gpu, &problem.assumptions);
        let nvlink = Link { latency: a.nvlink_latency, bandwidth: gpu.nvlink_bandwidth };
        let network = Link { latency: a.network_latency, bandwidth: gpu.network_bandwidth };
        let link = |group_span: usize| if group_span <= gpu.gpus_per_node { nvlink } else { network };
        // Ranks are tp innermost, then dp, then pp (DESIGN.md's grid).
        let (tp_link, dp_link) = (link(layout.tp), link(layout.tp * layout.dp));
        let pp_link = if layout.tp * layout.dp >= gpu.gpus_per_node { network } else { nvlink };
        let bt = layout.microbatch_size * problem.seq;
        let bytes = problem.sizes.activation;
        let flop_rate = gpu.peak_flops * a.efficiency;
        let part = PartCosts::estimate(model, problem.seq);
        let recompute = recompute_flops_per_block(model, problem.seq, layout.recompute);

        // Chapter 3's collectives of `blocks` blocks (and the head's, on the last stage).
        let tp_seconds = |f: fn(&ModelConfig, usize, usize, Stream) -> CollectiveFloats, blocks: usize, last: bool| {
            if layout.tp == 1 {
                return 0.0;
            }
            let of = |n_layer| f(&ModelConfig { n_layer, ..model.clone() }, bt, layout.tp, Stream::Replicated);
            let (all, none) = (of(blocks), of(0));
            let floats = if last {
                all
            } else {
                CollectiveFloats {
                    all_reduced: all.all_reduced - none.all_reduced,
                    all_gathered: 0,
                    reduce_scattered: 0,
                }
            };
            let sent = ring_elements_sent(floats, layout.tp).total();
            let steps = 2 * (layout.tp - 1) * 2 * (blocks + usize::from(last));
            steps as f64 * tp_link.latency + sent as f64 * bytes / tp_link.bandwidth
        };
        // A stage's output is the same on its tp ranks: each sends 1/tp of it and the next
        // stage's ranks all-gather it on NVLink (Megatron-LM's scatter/gather, Narayanan et al.
        // 2021 section 4.1).
        let message = bt as f64 * model.n_embd as f64 * bytes;
        let p2p = match layout.pp {
            1 => 0.0,
            _ => pp_link.send(message / layout.tp as f64) + tp_link.half_ring(message, layout.tp),
        };
        let costs: Vec<StageCost> = (0..layout.pp)
            .map(|s| {
                let blocks: usize =
                    stage_chunks(model.n_layer, layout.pp, layout.chunks, s).iter().map(|c| c.len()).sum();
                let last = s + 1 == layout.pp;
                let forward = (blocks as f64 * part.block + if last { part.head } else { 0.0 }) / 3.0;
                let flops = |per_token: f64| per_token * bt as f64 / layout.tp as f64 / flop_rate;
                // The memory-bound ops: each activation a block saves is written once by forward
                // and read once by backward, which writes and reads its gradient (3 passes);
                // recomputation writes again what it recomputes.
                let traffic = |floats: usize| blocks as f64 * floats as f64 * bt as f64 * bytes / gpu.memory_bandwidth;
                let saved = activation_floats(model, problem.seq, layout.tp, Recompute::None).per_block;
                let recomputed = activation_floats(model, problem.seq, layout.tp, layout.recompute).recompute;
                let recomputed = if layout.recompute == Recompute::Full { saved } else { recomputed };
                let mut comm_backward = tp_seconds(backward_collectives, blocks, last);
                if layout.recompute == Recompute::Full {
                    comm_backward += tp_seconds(forward_collectives, blocks, false);
                }
                // Every chunk sends its activation on and its gradient back (the two ends do not:
                // counted anyway, at most one message too many).
                let messages = layout.chunks as f64;
                StageCost {
                    compute_forward: flops(forward) + traffic(saved),
                    compute_backward: flops(2.0 * forward + blocks as f64 * recompute)
                        + 3.0 * traffic(saved)
                        + traffic(recomputed),
                    comm_forward: tp_seconds(forward_collectives, blocks, last) + messages * p2p,
                    comm_backward: comm_backward + messages * p2p,
                }
            })
            .collect();
        let (makespan, busy) = self.simulate(layout, microbatches, &costs);
        let slowest = (0..layout.pp).max_by(|&a, &b| busy[a].total_cmp(&busy[b])).unwrap_or(0);
        let c = costs[slowest];
        let m = microbatches as f64;

        // Data parallelism over the parameters of the stage that holds the most.
        let floats = fullest_stages(layout.pp)
            .into_iter()
            .map(|s| stage_units(model, layout, s).iter().map(|u| u.len()).sum::<usize>())
            .max()
            .unwrap_or(0) as f64;
        let (grads, params) = (floats * problem.sizes.state.gradient, floats * problem.sizes.state.parameter);
        let dp = layout.dp;
        let backward = c.compute_backward + c.comm_backward;
        let exposed_dp = match layout.zero.number() {
            // One all-reduce (stage 1: a reduce-scatter and an all-gather, the same bytes) after
            // the last micro-batch; its backward hides what it can.
            0 | 1 if a.overlap_data_parallel => (dp_link.all_reduce(grads, dp) - backward).max(0.0),
            0 | 1 => dp_link.all_reduce(grads, dp),
            // Stage 2: each micro-batch's gradients reduce-scattered under its backward, the
            // updated parameters all-gathered after the step.
            2 => m * (dp_link.half_ring(grads, dp) - backward).max(0.0) + dp_link.half_ring(params, dp),
            // Stage 3: each micro-batch gathers the parameters twice and reduce-scatters the
            // gradients (chapter 6: 1.5 times an all-reduce), under its compute.
            _ => {
                let per_micro = 2.0 * dp_link.half_ring(params, dp) + dp_link.half_ring(grads, dp);
                m * (per_micro - backward - c.compute_forward - c.comm_forward).max(0.0)
            }
        };
        let compute = m * (c.compute_forward + c.compute_backward);
        let comm = m * (c.comm_forward + c.comm_backward);
        let tokens = (problem.global_batch * problem.seq) as f64;
        StepTime {
            step_seconds: makespan + exposed_dp,
            compute_seconds: compute,
            exposed_comm_seconds: comm + exposed_dp,
            bubble_seconds: (makespan - busy[slowest]).max(0.0),
            hardware_flops: tokens * hardware_flops_per_token(model, problem.seq, layout.recompute),
            model_flops: tokens * model.flops_per_token(problem.seq),
        }
    }

    /// Chapter 4's simulator over the layout's schedule: the makespan and each stage's busy time.
    fn simulate(&self, layout: &Layout, microbatches: usize, costs: &[StageCost]) -> (f64, Vec<f64>) {
        // A stage's whole cost: the simulator charges each of its chunks 1/v of it.
        let per_chunk: Vec<Costs> = costs
            .iter()
            .map(|c| Costs {
                forward: c.compute_forward + c.comm_forward,
                backward: c.compute_backward + c.comm_backward,
                // Half the backward's matmuls are weight gradients; read only by zb-h1, which
                // the planner does not search.
                weight: c.compute_backward / 2.0,
            })
            .collect();
        let key = (
            layout.pp,
            layout.chunks,
            microbatches,
            per_chunk.iter().map(|c| (c.forward.to_bits(), c.backward.to_bits())).collect::<Vec<_>>(),
        );
        if let Some(hit) = self.simulations.borrow().get(&key) {
            return hit.clone();
        }
        let result = match simulate_stages(&schedule(layout, microbatches), &per_chunk) {
            Ok(sim) => (sim.makespan, sim.busy),
            // Chapter 4's schedules never deadlock (its tests); if one did, price it as serial.
            Err(_) => {
                let serial: f64 = per_chunk.iter().map(|c| (c.forward + c.backward) * microbatches as f64).sum();
                (serial, vec![serial / layout.pp as f64; layout.pp])
            }
        };
        self.simulations.borrow_mut().insert(key, result.clone());
        result
    }
}
