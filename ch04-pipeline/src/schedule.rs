//! A pipeline schedule is data: for each stage, the list of instructions it runs in one
//! optimizer step. A small pure function makes the lists of each schedule; one interpreter
//! (`pipeline.rs`) runs them, the simulator (`simulate.rs`) checks and times them, and the tests
//! assert on them. No schedule is written twice.
//!
//! Stage s receives activations from stage s-1 and gradients from stage s+1 and sends the other
//! way, so an instruction names only its micro-batch: the peer is always the neighbour.

use std::fmt;

// ANCHOR: instr
/// One thing a stage does. Micro-batches are numbered 0..M within a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Instr {
    /// Receive micro-batch `micro`'s input activation [b, T, C] from the previous stage.
    RecvActivation { micro: usize },
    /// This stage's part of the forward pass of `micro` (the first stage starts from the tokens,
    /// the last ends with the loss).
    Forward { micro: usize },
    /// Send `micro`'s output activation to the next stage.
    SendActivation { micro: usize },
    /// Receive dL/d(output) of `micro` from the next stage.
    RecvGrad { micro: usize },
    /// This stage's part of the backward pass of `micro`: accumulates its parameter gradients
    /// and leaves dL/d(input).
    Backward { micro: usize },
    /// Send dL/d(input) of `micro` to the previous stage.
    SendGrad { micro: usize },
    /// Sum the tied embedding's gradient between the first stage (the embedding's use) and the
    /// last (the output projection's use).
    ReduceTiedGrads,
    /// All stages: the global gradient norm, then each stage's AdamW update of its own tensors.
    OptimizerStep,
}
// ANCHOR_END: instr

impl Instr {
    /// The micro-batch this instruction works on, if any.
    pub fn micro(&self) -> Option<usize> {
        match *self {
            Instr::RecvActivation { micro }
            | Instr::Forward { micro }
            | Instr::SendActivation { micro }
            | Instr::RecvGrad { micro }
            | Instr::Backward { micro }
            | Instr::SendGrad { micro } => Some(micro),
            Instr::ReduceTiedGrads | Instr::OptimizerStep => None,
        }
    }
}

impl fmt::Display for Instr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Instr::RecvActivation { micro } => write!(f, "recv activation {micro}"),
            Instr::Forward { micro } => write!(f, "forward {micro}"),
            Instr::SendActivation { micro } => write!(f, "send activation {micro}"),
            Instr::RecvGrad { micro } => write!(f, "recv gradient {micro}"),
            Instr::Backward { micro } => write!(f, "backward {micro}"),
            Instr::SendGrad { micro } => write!(f, "send gradient {micro}"),
            Instr::ReduceTiedGrads => write!(f, "reduce tied gradients"),
            Instr::OptimizerStep => write!(f, "optimizer step"),
        }
    }
}

/// The schedules this chapter implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleKind {
    /// All forwards, then all backwards (Huang et al. 2019).
    Gpipe,
    /// One forward, one backward: at most N - s micro-batches in flight on stage s.
    #[value(name = "1f1b")]
    OneFOneB,
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::Gpipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
        })
    }
}

/// Every stage's instructions for one step: `stages[s]` is stage s's list, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub stages: Vec<Vec<Instr>>,
}

impl Schedule {
    /// `kind` over `n` stages and `m` micro-batches.
    pub fn new(kind: ScheduleKind, n: usize, m: usize) -> Schedule {
        let stages = (0..n)
            .map(|s| match kind {
                ScheduleKind::Gpipe => gpipe(s, n, m),
                ScheduleKind::OneFOneB => one_f_one_b(s, n, m),
            })
            .collect();
        Schedule { stages }
    }

    /// The forward passes alone, in order (evaluation: no gradients, no step).
    pub fn forward_only(n: usize, m: usize) -> Schedule {
        Schedule { stages: (0..n).map(|s| (0..m).flat_map(|i| forward(s, n, i)).collect()).collect() }
    }
}

// ANCHOR: generators
/// Micro-batch i's forward on stage s of n, with its communication.
fn forward(s: usize, n: usize, i: usize) -> Vec<Instr> {
    let mut out = Vec::with_capacity(3);
    if s > 0 {
        out.push(Instr::RecvActivation { micro: i });
    }
    out.push(Instr::Forward { micro: i });
    if s + 1 < n {
        out.push(Instr::SendActivation { micro: i });
    }
    out
}

/// Micro-batch i's backward on stage s of n, with its communication.
fn backward(s: usize, n: usize, i: usize) -> Vec<Instr> {
    let mut out = Vec::with_capacity(3);
    if s + 1 < n {
        out.push(Instr::RecvGrad { micro: i });
    }
    out.push(Instr::Backward { micro: i });
    if s > 0 {
        out.push(Instr::SendGrad { micro: i });
    }
    out
}

/// After the last backward: the tied embedding's two halves meet (first and last stage, when
/// they differ), then every stage steps.
fn flush(s: usize, n: usize) -> Vec<Instr> {
    let tied = n > 1 && (s == 0 || s + 1 == n);
    tied.then_some(Instr::ReduceTiedGrads).into_iter().chain([Instr::OptimizerStep]).collect()
}

/// GPipe: all M forwards, then all M backwards. Every micro-batch's activations are alive at
/// the turn: M in flight on every stage.
pub fn gpipe(s: usize, n: usize, m: usize) -> Vec<Instr> {
    let forwards = (0..m).flat_map(|i| forward(s, n, i));
    let backwards = (0..m).flat_map(|i| backward(s, n, i));
    forwards.chain(backwards).chain(flush(s, n)).collect()
}

/// 1F1B: stage s runs N-s-1 warm-up forwards, then alternates one forward and one backward,
/// then drains the remaining backwards. A micro-batch's backward starts as soon as it can, so
/// at most N-s are in flight on stage s, whatever M is; the bubble is GPipe's.
pub fn one_f_one_b(s: usize, n: usize, m: usize) -> Vec<Instr> {
    let warmup = (n - s - 1).min(m);
    let mut out: Vec<Instr> = (0..warmup).flat_map(|i| forward(s, n, i)).collect();
    for i in warmup..m {
        out.extend(forward(s, n, i));
        out.extend(backward(s, n, i - warmup));
    }
    out.extend((m - warmup..m).flat_map(|i| backward(s, n, i)));
    out.extend(flush(s, n));
    out
}
// ANCHOR_END: generators

/// The most micro-batches whose buffers a stage holds at once: a micro-batch holds them from
/// its first instruction on the stage to its last (its input arrives, ..., its gradient leaves).
pub fn peak_in_flight(instrs: &[Instr]) -> usize {
    let last = last_use(instrs);
    let mut held = std::collections::HashSet::new();
    let mut peak = 0;
    for (at, instr) in instrs.iter().enumerate() {
        if let Some(m) = instr.micro() {
            held.insert(m);
            peak = peak.max(held.len());
            if last.get(&m) == Some(&at) {
                held.remove(&m);
            }
        }
    }
    peak
}

/// For each micro-batch, the index of its last instruction in `instrs`: where its buffers free.
pub fn last_use(instrs: &[Instr]) -> std::collections::HashMap<usize, usize> {
    instrs.iter().enumerate().filter_map(|(at, i)| i.micro().map(|m| (m, at))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_f_one_b_on_two_stages_reads_as_in_the_book() {
        use Instr::*;
        let s = Schedule::new(ScheduleKind::OneFOneB, 2, 3);
        assert_eq!(
            s.stages[0],
            vec![
                Forward { micro: 0 },
                SendActivation { micro: 0 },
                Forward { micro: 1 },
                SendActivation { micro: 1 },
                RecvGrad { micro: 0 },
                Backward { micro: 0 },
                Forward { micro: 2 },
                SendActivation { micro: 2 },
                RecvGrad { micro: 1 },
                Backward { micro: 1 },
                RecvGrad { micro: 2 },
                Backward { micro: 2 },
                ReduceTiedGrads,
                OptimizerStep,
            ]
        );
        assert_eq!(
            s.stages[1][..4],
            [RecvActivation { micro: 0 }, Forward { micro: 0 }, Backward { micro: 0 }, SendGrad { micro: 0 }]
        );
    }

    #[test]
    fn peak_in_flight_is_m_for_gpipe_and_n_minus_s_for_1f1b() {
        for n in 1..=8 {
            for m in 1..=16 {
                let (g, f) = (Schedule::new(ScheduleKind::Gpipe, n, m), Schedule::new(ScheduleKind::OneFOneB, n, m));
                for s in 0..n {
                    assert_eq!(peak_in_flight(&g.stages[s]), m, "gpipe n {n} m {m} stage {s}");
                    assert_eq!(peak_in_flight(&f.stages[s]), m.min(n - s), "1f1b n {n} m {m} stage {s}");
                }
            }
        }
    }
}
