//! Runs a [`Schedule`] with no devices: each stage walks its list, a receive waits for its
//! send, a collective waits for every stage that takes part, and compute costs time. It checks
//! what a run would get wrong silently or hang on, and measures the bubble:
//!
//! - a deadlock (no stage can move): every waiting stage, the instruction, and whom it waits for;
//! - a micro-batch backwarded before it is forwarded, or computed before its input arrived;
//! - sends that do not match receives: a receive that would take another micro-batch's message
//!   (thread ranks and NCCL deliver in order, with no tags), or a message nobody receives;
//! - the bubble fraction: the share of the stages' time spent idle within the step.

use crate::schedule::{Instr, Pipe, Schedule};
use kernels::Trace;
use std::collections::{HashMap, VecDeque};

/// What a micro-batch's forward and backward cost on one stage, in any unit. Communication and
/// the optimizer step are free here: the bubble is the schedule's, not the network's.
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    pub forward: f64,
    /// The whole backward...
    pub backward: f64,
    /// ...of which the weight gradients (W) take this much when a schedule splits it: its
    /// input-gradient half (B) costs `backward - weight`.
    pub weight: f64,
}

impl Costs {
    /// The textbook assumption: backward costs twice the forward, half of it the weight
    /// gradients (each of the two costs a matmul as large as the forward's): F = B = W = 1.
    pub const UNIT: Costs = Costs { forward: 1.0, backward: 2.0, weight: 1.0 };
}

/// One compute instruction as simulated: stage, what, when.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimSpan {
    pub stage: usize,
    pub instr: Instr,
    pub start: f64,
    pub end: f64,
}

/// A schedule that ran to the end.
#[derive(Clone, Debug)]
pub struct Simulation {
    pub spans: Vec<SimSpan>,
    /// When the last compute of the step ended.
    pub makespan: f64,
    /// Compute time of each stage.
    pub busy: Vec<f64>,
}

// ANCHOR: bubble
impl Simulation {
    /// The share of stage-time idle within the step: 1 - Σ busy / (N · makespan).
    pub fn bubble_fraction(&self) -> f64 {
        let total: f64 = self.busy.iter().sum();
        if self.makespan > 0.0 { 1.0 - total / (self.busy.len() as f64 * self.makespan) } else { 0.0 }
    }

    /// The simulated step as a trace (one lane per stage, one time unit drawn as a millisecond),
    /// to draw with [`Trace::to_svg`] like a measured one.
    pub fn to_trace(&self) -> Trace {
        let trace = Trace::enabled();
        for span in &self.spans {
            let lane = trace.lane(span.stage as u32, 0);
            lane.record(span.instr.to_string(), span.start * 1000.0, (span.end - span.start) * 1000.0);
        }
        trace
    }
}
// ANCHOR_END: bubble

/// A stage that cannot move: at which instruction, and the stage it waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wait {
    pub stage: usize,
    pub at: usize,
    pub instr: Instr,
    pub on: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("deadlock: {}", .0.iter().map(|w| format!("stage {} waits at instruction {} ({}) for stage {}", w.stage, w.at, w.instr, w.on)).collect::<Vec<_>>().join("; "))]
    Deadlock(Vec<Wait>),
    #[error("stage {stage}, instruction {at} ({instr}): {reason}")]
    Invalid { stage: usize, at: usize, instr: Instr, reason: String },
    #[error("stage {stage} sent {what} {micro} to stage {to}, which never receives it")]
    Unreceived { stage: usize, to: usize, what: &'static str, micro: usize },
    #[error("stage {stage} {what} micro-batch {micro} {times} times ({right} is right)")]
    NotOnce { stage: usize, what: &'static str, micro: usize, times: usize, right: usize },
}

/// A message in flight: which (micro-batch, chunk) it is for, at the receiver, and when it left.
type Channel = VecDeque<((usize, usize), f64)>;

/// Which wire a message travels on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Wire {
    Activation,
    Gradient,
}

struct Sim<'a> {
    lists: &'a [Vec<Instr>],
    /// Each stage's costs.
    costs: &'a [Costs],
    pc: Vec<usize>,
    clock: Vec<f64>,
    pipe: Pipe,
    /// (from, to, kind) -> messages in send order. Activations and gradients travel on wires of
    /// their own (two communicators), each in order.
    channels: HashMap<(usize, usize, Wire), Channel>,
    /// (stage, instruction) -> how many times it ran, for the checks.
    done: HashMap<(usize, Instr), usize>,
    out: Simulation,
}

enum Progress {
    Ran,
    Waits(usize),
}

// ANCHOR: simulate
/// Runs `schedule` to the end with `costs` on every stage, or says what is wrong with it.
pub fn simulate(schedule: &Schedule, costs: Costs) -> Result<Simulation, ScheduleError> {
    simulate_stages(schedule, &vec![costs; schedule.stages.len()])
}

/// As [`simulate`], with each stage's own costs (`costs[s]` for stage s): uneven stages.
pub fn simulate_stages(schedule: &Schedule, costs: &[Costs]) -> Result<Simulation, ScheduleError> {
    // EXERCISE(ch04-simulator-deadlock, points = 10): a Sim at pc 0 and clock 0 on every stage; sweep the stages, running each (try_run) until it waits, and collect the Waits; stop when no stage waits, report a Deadlock with the waits when a whole sweep moved nothing; then check_complete
    // TESTS: -p ch04-pipeline --lib -- simulate::tests::hand_written_
    let n = schedule.stages.len();
    assert_eq!(costs.len(), n, "one cost per stage");
    let out = Simulation { spans: Vec::new(), makespan: 0.0, busy: vec![0.0; n] };
    let mut sim = Sim {
        lists: &schedule.stages,
        costs,
        pipe: schedule.pipe(),
        pc: vec![0; n],
        clock: vec![0.0; n],
        channels: HashMap::new(),
        done: HashMap::new(),
        out,
    };
    // Sweep the stages, running each as far as it goes, until all finish or none can move.
    loop {
        let mut waits = Vec::new();
        let mut moved = false;
        for s in 0..n {
            while let Some(&instr) = sim.lists[s].get(sim.pc[s]) {
                match sim.try_run(s, instr)? {
                    Progress::Ran => moved = true,
                    Progress::Waits(on) => {
                        waits.push(Wait { stage: s, at: sim.pc[s], instr, on });
                        break;
                    }
                }
            }
        }
        if waits.is_empty() {
            break;
        }
        if !moved {
            // WRONG(a deadlock whenever every stage waits, though some moved in this sweep): `!moved` -> `waits.len() == n`
            return Err(ScheduleError::Deadlock(waits));
            // WRONG(stops at a deadlock as if the schedule were done): `return Err(ScheduleError::Deadlock(waits));` -> `break;`
        }
    }
    sim.check_complete()?;
    // WRONG(never checks that every message was received): `sim.check_complete()?;` -> ``
    Ok(sim.out)
    // END EXERCISE
}
// ANCHOR_END: simulate

impl Sim<'_> {
    fn n(&self) -> usize {
        self.lists.len()
    }

    fn ran(&self, s: usize, instr: Instr) -> bool {
        self.done.contains_key(&(s, instr))
    }

    fn invalid(&self, s: usize, instr: Instr, reason: &str) -> ScheduleError {
        ScheduleError::Invalid { stage: s, at: self.pc[s], instr, reason: reason.into() }
    }

    /// Runs stage `s`'s next instruction if it can, checking it first.
    fn try_run(&mut self, s: usize, instr: Instr) -> Result<Progress, ScheduleError> {
        use Instr::*;
        let pipe = self.pipe;
        let need = |ok: bool, reason: &str| if ok { Ok(()) } else { Err(self.invalid(s, instr, reason)) };
        if let Some((_, chunk)) = instr.micro() {
            need(chunk < pipe.chunks, "no such model chunk on this stage")?;
        }
        match instr {
            RecvActivation { micro, chunk } => {
                need(!pipe.is_first(s, chunk), "the first stage has no previous stage")?;
                let (from, _) = pipe.prev(s, chunk);
                return self.receive(s, instr, from, Wire::Activation, (micro, chunk));
            }
            RecvGrad { micro, chunk } => {
                need(!pipe.is_last(s, chunk), "the last stage has no next stage")?;
                let (from, _) = pipe.next(s, chunk);
                return self.receive(s, instr, from, Wire::Gradient, (micro, chunk));
            }
            Forward { micro, chunk } => {
                let input = pipe.is_first(s, chunk) || self.ran(s, RecvActivation { micro, chunk });
                need(input, "forward before its input arrived")?;
                self.compute(s, instr, self.costs[s].forward / pipe.chunks as f64);
            }
            Backward { micro, chunk } => {
                need(self.ran(s, Forward { micro, chunk }), "backward of a micro-batch not yet forwarded")?;
                let grad = pipe.is_last(s, chunk) || self.ran(s, RecvGrad { micro, chunk });
                need(grad, "backward before its gradient arrived")?;
                self.compute(s, instr, self.costs[s].backward / pipe.chunks as f64);
            }
            BackwardInput { micro, chunk } => {
                need(self.ran(s, Forward { micro, chunk }), "backward of a micro-batch not yet forwarded")?;
                let grad = pipe.is_last(s, chunk) || self.ran(s, RecvGrad { micro, chunk });
                need(grad, "backward before its gradient arrived")?;
                let cost = self.costs[s].backward - self.costs[s].weight;
                self.compute(s, instr, cost / pipe.chunks as f64);
            }
            BackwardWeights { micro, chunk } => {
                let input = self.ran(s, BackwardInput { micro, chunk });
                need(input, "weight gradients before the input gradients (W needs what B saves)")?;
                self.compute(s, instr, self.costs[s].weight / pipe.chunks as f64);
            }
            SendActivation { micro, chunk } => {
                need(!pipe.is_last(s, chunk), "the last stage has no next stage")?;
                need(self.ran(s, Forward { micro, chunk }), "sends an activation not yet computed")?;
                let (to, their_chunk) = pipe.next(s, chunk);
                self.channels
                    .entry((s, to, Wire::Activation))
                    .or_default()
                    .push_back(((micro, their_chunk), self.clock[s]));
            }
            SendGrad { micro, chunk } => {
                need(!pipe.is_first(s, chunk), "the first stage has no previous stage")?;
                let computed = self.ran(s, Backward { micro, chunk }) || self.ran(s, BackwardInput { micro, chunk });
                need(computed, "sends a gradient not yet computed")?;
                let (to, their_chunk) = pipe.prev(s, chunk);
                self.channels
                    .entry((s, to, Wire::Gradient))
                    .or_default()
                    .push_back(((micro, their_chunk), self.clock[s]));
            }
            ReduceTiedGrads => {
                let n = self.n();
                return self.collective(s, instr, &[0, n - 1]);
            }
            OptimizerStep => {
                let all: Vec<usize> = (0..self.n()).collect();
                return self.collective(s, instr, &all);
            }
        }
        self.finish(s, instr);
        Ok(Progress::Ran)
    }

    fn finish(&mut self, s: usize, instr: Instr) {
        *self.done.entry((s, instr)).or_default() += 1;
        self.pc[s] += 1;
    }

    fn compute(&mut self, s: usize, instr: Instr, cost: f64) {
        let start = self.clock[s];
        self.clock[s] += cost;
        self.out.busy[s] += cost;
        self.out.makespan = self.out.makespan.max(self.clock[s]);
        self.out.spans.push(SimSpan { stage: s, instr, start, end: self.clock[s] });
    }

    /// A receive waits until its message was sent; it must then be the oldest one on the wire.
    fn receive(
        &mut self,
        s: usize,
        instr: Instr,
        from: usize,
        wire: Wire,
        key: (usize, usize),
    ) -> Result<Progress, ScheduleError> {
        let channel = self.channels.entry((from, s, wire)).or_default();
        let Some(pos) = channel.iter().position(|&(k, _)| k == key) else { return Ok(Progress::Waits(from)) };
        if pos != 0 {
            let reason = format!(
                "micro-batch {} was sent first, and an untagged wire delivers it first: the sends and receives are in different orders",
                channel[0].0.0
            );
            return Err(self.invalid(s, instr, &reason));
        }
        let (_, sent_at) = channel.pop_front().unwrap_or_default();
        self.clock[s] = self.clock[s].max(sent_at);
        self.finish(s, instr);
        Ok(Progress::Ran)
    }

    /// A collective runs when every member is at it, at the time the last one arrives.
    fn collective(&mut self, s: usize, instr: Instr, members: &[usize]) -> Result<Progress, ScheduleError> {
        if !members.contains(&s) {
            return Err(self.invalid(s, instr, "this stage does not hold the tied embedding"));
        }
        if let Some(&absent) = members.iter().find(|&&m| self.lists[m].get(self.pc[m]) != Some(&instr)) {
            return Ok(Progress::Waits(absent));
        }
        let at = members.iter().map(|&m| self.clock[m]).fold(0.0, f64::max);
        for &m in members {
            self.clock[m] = at;
            self.finish(m, instr);
        }
        Ok(Progress::Ran)
    }

    /// Every stage forwards every micro-batch once through each of its chunks, and backwards
    /// each once if the schedule trains (whole, or as a B and a W); every message was received.
    fn check_complete(&self) -> Result<(), ScheduleError> {
        use Instr::*;
        let micros = self.lists.iter().flatten().filter_map(Instr::micro).map(|m| m.0 + 1).max().unwrap_or(0);
        let trains = self.lists.iter().flatten().any(|i| matches!(i, Backward { .. } | BackwardInput { .. }));
        for s in 0..self.n() {
            for (micro, chunk) in (0..micros).flat_map(|m| (0..self.pipe.chunks).map(move |c| (m, c))) {
                let times = |instr| self.done.get(&(s, instr)).copied().unwrap_or(0);
                let split = times(BackwardInput { micro, chunk });
                let mut checks = vec![("forwards", times(Forward { micro, chunk }), 1)];
                if trains {
                    checks.push(("backwards", times(Backward { micro, chunk }) + split, 1));
                    checks.push(("computes the weight gradients of", times(BackwardWeights { micro, chunk }), split));
                }
                for (what, times, right) in checks {
                    if times != right {
                        return Err(ScheduleError::NotOnce { stage: s, what, micro, times, right });
                    }
                }
            }
        }
        let mut left: Vec<_> = self.channels.iter().filter(|(_, c)| !c.is_empty()).collect();
        left.sort_by_key(|(k, _)| **k);
        if let Some(&(&(from, to, wire), channel)) = left.first() {
            let what = if wire == Wire::Activation { "activation" } else { "gradient" };
            return Err(ScheduleError::Unreceived { stage: from, to, what, micro: channel[0].0.0 });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;

    // ANCHOR: bubble_test
    #[test]
    fn every_schedule_completes_with_the_bubble_the_formula_predicts() {
        for kind in [ScheduleKind::Gpipe, ScheduleKind::OneFOneB] {
            for n in 1..=8 {
                for m in 1..=16 {
                    let sim = simulate(&Schedule::new(kind, n, 1, m), Costs::UNIT).unwrap();
                    let (n_, m_) = (n as f64, m as f64);
                    let theory = (n_ - 1.0) / (m_ + n_ - 1.0);
                    let bubble = sim.bubble_fraction();
                    assert!((bubble - theory).abs() < 1e-12, "{kind} n {n} m {m}: {bubble} vs {theory}");
                }
            }
        }
    }

    #[test]
    fn interleaving_divides_the_bubble_by_the_chunks() {
        // V chunks per rank: each chunk's forward and backward cost 1/V of the stage's, and the
        // fill and drain take V times less: (N-1)/(V·M + N-1).
        for n in 1..=8 {
            for v in [1, 2, 3] {
                for m in (n..=16).step_by(n) {
                    let sim = simulate(&Schedule::new(ScheduleKind::Interleaved, n, v, m), Costs::UNIT).unwrap();
                    let (n_, v_, m_) = (n as f64, v as f64, m as f64);
                    let theory = (n_ - 1.0) / (v_ * m_ + n_ - 1.0);
                    let bubble = sim.bubble_fraction();
                    assert!((bubble - theory).abs() < 1e-12, "n {n} v {v} m {m}: {bubble} vs {theory}");
                }
            }
        }
    }
    // ANCHOR_END: bubble_test

    // ANCHOR: zb_h1_test
    #[test]
    fn zb_h1_has_a_third_of_1f1b_s_bubble() {
        // F = B = W = 1. 1F1B's step is 3(M + N - 1): each stage idles 3(N - 1). In ZB-H1 the
        // gradient returns through the B's alone and the W's fill the drain: the step is
        // 3M + N - 1 once M >= N (each stage idles N - 1, a third), and with fewer micro-batches
        // 2M + 2N - 1 (stage 0 cannot start its first B before 2N - 1, and then has 2M - 1 of
        // its B's and W's left). Both: 2M + N - 1 + max(M, N).
        for n in 1..=8 {
            for m in 1..=16 {
                let zb = simulate(&Schedule::new(ScheduleKind::ZbH1, n, 1, m), Costs::UNIT).unwrap();
                let one_f_one_b = simulate(&Schedule::new(ScheduleKind::OneFOneB, n, 1, m), Costs::UNIT).unwrap();
                assert_eq!(zb.makespan, (2 * m + n - 1 + m.max(n)) as f64, "n {n} m {m}");
                assert_eq!(zb.busy, one_f_one_b.busy, "the same work");
                let (n_, m_) = (n as f64, m as f64);
                if m >= n {
                    let theory = (n_ - 1.0) / (3.0 * m_ + n_ - 1.0);
                    let bubble = zb.bubble_fraction();
                    assert!((bubble - theory).abs() < 1e-12, "n {n} m {m}: {bubble} vs {theory}");
                }
                if n > 1 {
                    assert!(zb.bubble_fraction() < one_f_one_b.bubble_fraction(), "n {n} m {m}");
                }
            }
        }
    }
    // ANCHOR_END: zb_h1_test

    #[test]
    fn a_split_backward_out_of_order_is_caught() {
        let broken = |edit: &dyn Fn(&mut Vec<Instr>)| {
            let mut s = Schedule::new(ScheduleKind::ZbH1, 2, 1, 2);
            edit(&mut s.stages[1]);
            simulate(&s, Costs::UNIT).unwrap_err().to_string()
        };
        let w0 = Instr::BackwardWeights { micro: 0, chunk: 0 };
        let err = broken(&|l| {
            l.retain(|i| *i != w0);
            l.insert(0, w0);
        });
        assert!(err.contains("weight gradients before the input gradients"), "{err}");
        let err = broken(&|l| l.retain(|i| *i != w0));
        assert!(err.contains("stage 1 computes the weight gradients of micro-batch 0 0 times (1 is right)"), "{err}");
    }

    /// Two stages, one micro-batch each way round: hand-written, so that the simulator is graded
    /// apart from the generators.
    fn hand_written(stage0: Vec<Instr>, stage1: Vec<Instr>) -> Schedule {
        Schedule { stages: vec![stage0, stage1], chunks: 1 }
    }

    #[test]
    fn hand_written_1f1b_runs_with_both_stages_waiting_after_the_first_sweep() {
        use Instr::*;
        let (f, b) = (|micro| Forward { micro, chunk: 0 }, |micro| Backward { micro, chunk: 0 });
        let (sa, ra) = (|micro| SendActivation { micro, chunk: 0 }, |micro| RecvActivation { micro, chunk: 0 });
        let (sg, rg) = (|micro| SendGrad { micro, chunk: 0 }, |micro| RecvGrad { micro, chunk: 0 });
        // After one sweep stage 0 waits for gradient 0 and stage 1 at the step, for stage 0:
        // both wait, but the sweep moved, so the next one goes on.
        let schedule = hand_written(
            vec![f(0), sa(0), f(1), sa(1), rg(0), b(0), rg(1), b(1), OptimizerStep],
            vec![ra(0), f(0), b(0), sg(0), ra(1), f(1), b(1), sg(1), OptimizerStep],
        );
        let sim = simulate(&schedule, Costs::UNIT).unwrap();
        // Stage 1: forward 0 at 1..2, backward 0 at 2..4, forward 1 at 4..5, backward 1 at 5..7;
        // stage 0: forwards at 0..2, backward 0 at 4..6, backward 1 at 7..9.
        assert_eq!(sim.makespan, 9.0);
        assert_eq!(sim.busy, vec![6.0, 6.0]);
    }

    #[test]
    fn hand_written_receives_on_both_sides_deadlock() {
        use Instr::*;
        let schedule = hand_written(
            vec![
                RecvGrad { micro: 0, chunk: 0 },
                Forward { micro: 0, chunk: 0 },
                SendActivation { micro: 0, chunk: 0 },
                Backward { micro: 0, chunk: 0 },
                OptimizerStep,
            ],
            vec![
                RecvActivation { micro: 0, chunk: 0 },
                Forward { micro: 0, chunk: 0 },
                Backward { micro: 0, chunk: 0 },
                SendGrad { micro: 0, chunk: 0 },
                OptimizerStep,
            ],
        );
        let err = simulate(&schedule, Costs::UNIT).unwrap_err();
        assert_eq!(
            err,
            ScheduleError::Deadlock(vec![
                Wait { stage: 0, at: 0, instr: RecvGrad { micro: 0, chunk: 0 }, on: 1 },
                Wait { stage: 1, at: 0, instr: RecvActivation { micro: 0, chunk: 0 }, on: 0 },
            ])
        );
    }

    #[test]
    fn hand_written_send_twice_leaves_a_message_nobody_receives() {
        use Instr::*;
        let schedule = hand_written(
            vec![
                Forward { micro: 0, chunk: 0 },
                SendActivation { micro: 0, chunk: 0 },
                SendActivation { micro: 0, chunk: 0 },
                RecvGrad { micro: 0, chunk: 0 },
                Backward { micro: 0, chunk: 0 },
                OptimizerStep,
            ],
            vec![
                RecvActivation { micro: 0, chunk: 0 },
                Forward { micro: 0, chunk: 0 },
                Backward { micro: 0, chunk: 0 },
                SendGrad { micro: 0, chunk: 0 },
                OptimizerStep,
            ],
        );
        let err = simulate(&schedule, Costs::UNIT).unwrap_err();
        assert_eq!(err, ScheduleError::Unreceived { stage: 0, to: 1, what: "activation", micro: 0 });
    }

    // ANCHOR: deadlock_test
    #[test]
    fn swapping_two_receives_is_reported_as_a_deadlock() {
        // Stage 1 of 3 in 1F1B, two micro-batches: [recv act 0, forward 0, send act 0,
        // recv act 1, ...]. Asking for gradient 1 where activation 1 was due waits on stage 2,
        // which waits for that activation: a cycle.
        let mut schedule = Schedule::new(ScheduleKind::OneFOneB, 3, 1, 2);
        let list = &mut schedule.stages[1];
        let (a, b) = (
            list.iter().position(|i| *i == Instr::RecvActivation { micro: 1, chunk: 0 }).unwrap(),
            list.iter().position(|i| *i == Instr::RecvGrad { micro: 1, chunk: 0 }).unwrap(),
        );
        list.swap(a, b);
        let err = simulate(&schedule, Costs::UNIT).unwrap_err();
        let ScheduleError::Deadlock(waits) = &err else { panic!("{err}") };
        assert!(
            waits.contains(&Wait { stage: 1, at: 3, instr: Instr::RecvGrad { micro: 1, chunk: 0 }, on: 2 }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "deadlock: stage 0 waits at instruction 4 (recv gradient 0) for stage 1; \
             stage 1 waits at instruction 3 (recv gradient 1) for stage 2; \
             stage 2 waits at instruction 4 (recv activation 1) for stage 1"
        );
    }
    // ANCHOR_END: deadlock_test

    #[test]
    fn broken_schedules_are_caught() {
        let broken = |edit: &dyn Fn(&mut Schedule)| {
            let mut s = Schedule::new(ScheduleKind::Gpipe, 2, 1, 2);
            edit(&mut s);
            simulate(&s, Costs::UNIT).unwrap_err().to_string()
        };
        // Backward of micro-batch 0 moved before its forward on the last stage.
        let err = broken(&|s| s.stages[1].retain(|i| *i != Instr::Backward { micro: 0, chunk: 0 }));
        assert!(err.contains("sends a gradient not yet computed"), "{err}");
        let err = broken(&|s| s.stages[1].insert(0, Instr::Backward { micro: 1, chunk: 0 }));
        assert!(err.contains("backward of a micro-batch not yet forwarded"), "{err}");
        // The receives of the two activations in the other order: the wire delivers 0 first.
        let err = broken(&|s| s.stages[1].swap(0, 2));
        assert!(err.contains("micro-batch 0 was sent first"), "{err}");
        // The last stage forgets the tied sum: the first waits for it at its collective.
        let err = broken(&|s| s.stages[1].retain(|i| *i != Instr::ReduceTiedGrads));
        assert!(err.contains("deadlock: stage 0 waits at instruction 8 (reduce tied gradients) for stage 1"), "{err}");
        // A send nobody receives.
        let err = broken(&|s| {
            let flush = s.stages[0].len() - 2;
            s.stages[0].insert(flush, Instr::SendActivation { micro: 0, chunk: 0 });
        });
        assert!(err.contains("stage 0 sent activation 0 to stage 1, which never receives it"), "{err}");
    }

    #[test]
    fn a_slow_stage_sets_the_pace() {
        // Stage 1 of 2 twice as slow: the step is paced by it, and the fast stage idles.
        let (fast, slow) = (Costs::UNIT, Costs { forward: 2.0, backward: 4.0, weight: 2.0 });
        let sim = simulate_stages(&Schedule::new(ScheduleKind::OneFOneB, 2, 1, 4), &[fast, slow]).unwrap();
        // The slow stage's 4 x 6 units, after stage 0's first forward and before its last backward.
        assert_eq!(sim.makespan, 1.0 + 24.0 + 2.0);
        assert!(sim.bubble_fraction() > 1.0 / 5.0, "more than the even pipeline's bubble");
    }

    #[test]
    fn forward_only_runs_and_one_stage_has_no_bubble() {
        let sim = simulate(&Schedule::forward_only(4, 1, 8), Costs::UNIT).unwrap();
        assert!((sim.bubble_fraction() - 3.0 / 11.0).abs() < 1e-12);
        let one = simulate(&Schedule::new(ScheduleKind::OneFOneB, 1, 1, 4), Costs::UNIT).unwrap();
        assert_eq!(one.bubble_fraction(), 0.0);
    }
}
