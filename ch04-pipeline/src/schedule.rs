//! A pipeline schedule is data: for each stage, the list of instructions it runs in one
//! optimizer step. A small pure function makes the lists of each schedule; one interpreter
//! (`pipeline.rs`) runs them, the simulator (`simulate.rs`) checks and times them, and the tests
//! assert on them. No schedule is written twice.
//!
//! A rank may hold several model chunks (the interleaved schedule): chunk c of rank s is virtual
//! stage c·N + s of the N·V in the pipe. A micro-batch's activation goes from virtual stage v to
//! v + 1 and its gradient back, so an instruction names its micro-batch and chunk, and the peer
//! follows ([`Pipe`]). With one chunk per rank (GPipe, 1F1B), the peers are the neighbours.

use std::fmt;

// ANCHOR: instr
/// One thing a stage does. Micro-batches are numbered 0..M within a step, a rank's model chunks
/// 0..V (V = 1 but for the interleaved schedule).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Instr {
    /// Receive micro-batch `micro`'s input activation [b, T, C] for chunk `chunk` from the
    /// previous (virtual) stage.
    RecvActivation { micro: usize, chunk: usize },
    /// Chunk `chunk`'s part of the forward pass of `micro` (the first stage starts from the
    /// tokens, the last ends with the loss).
    Forward { micro: usize, chunk: usize },
    /// Send the chunk's output activation of `micro` to the next stage.
    SendActivation { micro: usize, chunk: usize },
    /// Receive dL/d(the chunk's output) of `micro` from the next stage.
    RecvGrad { micro: usize, chunk: usize },
    /// The chunk's part of the backward pass of `micro`: accumulates its parameter gradients and
    /// leaves dL/d(its input).
    Backward { micro: usize, chunk: usize },
    /// Send dL/d(the chunk's input) of `micro` to the previous stage.
    SendGrad { micro: usize, chunk: usize },
    /// The first half of a split backward (B, zero-bubble schedules): dL/d(the chunk's input)
    /// of `micro`, what the previous stage waits for, and the gradients the weight-gradient
    /// half will need.
    BackwardInput { micro: usize, chunk: usize },
    /// The second half (W): the chunk's weight gradients of `micro`, accumulated. Nobody waits
    /// for it but the optimizer step, so a schedule runs it where the stage would idle.
    BackwardWeights { micro: usize, chunk: usize },
    /// Sum the tied embedding's gradient between the first stage (the embedding's use) and the
    /// last (the output projection's use).
    ReduceTiedGrads,
    /// All stages: the global gradient norm, then each stage's AdamW update of its own tensors.
    OptimizerStep,
}
// ANCHOR_END: instr

impl Instr {
    /// The micro-batch and the chunk this instruction works on, if any.
    pub fn micro(&self) -> Option<(usize, usize)> {
        match *self {
            Instr::RecvActivation { micro, chunk }
            | Instr::Forward { micro, chunk }
            | Instr::SendActivation { micro, chunk }
            | Instr::RecvGrad { micro, chunk }
            | Instr::Backward { micro, chunk }
            | Instr::SendGrad { micro, chunk }
            | Instr::BackwardInput { micro, chunk }
            | Instr::BackwardWeights { micro, chunk } => Some((micro, chunk)),
            Instr::ReduceTiedGrads | Instr::OptimizerStep => None,
        }
    }
}

impl fmt::Display for Instr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Instr::RecvActivation { .. } => "recv activation",
            Instr::Forward { .. } => "forward",
            Instr::SendActivation { .. } => "send activation",
            Instr::RecvGrad { .. } => "recv gradient",
            Instr::Backward { .. } => "backward",
            Instr::SendGrad { .. } => "send gradient",
            // The timeline colours a span by its first word: B is a backward, W its own.
            Instr::BackwardInput { .. } => "backward input",
            Instr::BackwardWeights { .. } => "weight grads",
            Instr::ReduceTiedGrads => "reduce tied gradients",
            Instr::OptimizerStep => "optimizer step",
        };
        match self.micro() {
            None => f.write_str(what),
            Some((micro, 0)) => write!(f, "{what} {micro}"),
            Some((micro, chunk)) => write!(f, "{what} {micro} (chunk {chunk})"),
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
    /// 1F1B over V model chunks per rank (Narayanan et al. 2021): the bubble shrinks V times,
    /// for V times the messages. M must be a multiple of N.
    Interleaved,
    /// 1F1B with each backward split into B (input gradient) and W (weight gradients), W
    /// deferred into the drain's idle time (Qi et al. 2023, ZB-H1): the same peak in flight as
    /// 1F1B's first stage, a third of its bubble.
    #[value(name = "zb-h1")]
    ZbH1,
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::Gpipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Interleaved => "interleaved",
            ScheduleKind::ZbH1 => "zb-h1",
        })
    }
}

/// Every stage's instructions for one step: `stages[s]` is stage s's list, in order, over
/// `chunks` model chunks per stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub stages: Vec<Vec<Instr>>,
    pub chunks: usize,
}

// ANCHOR: pipe
/// The shape of the pipe: N ranks of V chunks each, N·V virtual stages. Chunk c of rank s is
/// virtual stage c·N + s, so a micro-batch visits every rank V times, in rank order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pipe {
    pub ranks: usize,
    pub chunks: usize,
}

impl Pipe {
    pub fn virtual_stage(&self, rank: usize, chunk: usize) -> usize {
        chunk * self.ranks + rank
    }
    /// Whether (rank, chunk) is the first virtual stage (it embeds the tokens)...
    pub fn is_first(&self, rank: usize, chunk: usize) -> bool {
        self.virtual_stage(rank, chunk) == 0
    }
    /// ...or the last (it runs the head and the loss).
    pub fn is_last(&self, rank: usize, chunk: usize) -> bool {
        self.virtual_stage(rank, chunk) + 1 == self.ranks * self.chunks
    }
    /// The rank that holds the virtual stage after (rank, chunk), and its chunk there.
    pub fn next(&self, rank: usize, chunk: usize) -> (usize, usize) {
        let v = self.virtual_stage(rank, chunk) + 1;
        (v % self.ranks, v / self.ranks)
    }
    /// The rank that holds the virtual stage before (rank, chunk), and its chunk there.
    pub fn prev(&self, rank: usize, chunk: usize) -> (usize, usize) {
        let v = self.virtual_stage(rank, chunk) - 1;
        (v % self.ranks, v / self.ranks)
    }
}
// ANCHOR_END: pipe

impl Schedule {
    /// `kind` over `n` stages (of `chunks` model chunks each: more than 1 for the interleaved
    /// schedule only) and `m` micro-batches.
    pub fn new(kind: ScheduleKind, n: usize, chunks: usize, m: usize) -> Schedule {
        let pipe = Pipe { ranks: n, chunks: if kind == ScheduleKind::Interleaved { chunks } else { 1 } };
        let stages = (0..n)
            .map(|s| match kind {
                ScheduleKind::Gpipe => gpipe(s, n, m),
                ScheduleKind::OneFOneB => one_f_one_b(s, n, m),
                ScheduleKind::Interleaved => interleaved(s, pipe, m),
                ScheduleKind::ZbH1 => zb_h1(s, n, m),
            })
            .collect();
        Schedule { stages, chunks: pipe.chunks }
    }

    /// The forward passes alone, in order (evaluation: no gradients, no step), over `chunks`.
    pub fn forward_only(n: usize, chunks: usize, m: usize) -> Schedule {
        let pipe = Pipe { ranks: n, chunks };
        // Micro-batch by micro-batch, chunk by chunk: every rank sees its chunks in order.
        let stages = (0..n)
            .map(|s| (0..m).flat_map(|i| (0..chunks).flat_map(move |c| forward_chunk(s, pipe, i, c))).collect())
            .collect();
        Schedule { stages, chunks }
    }

    pub fn pipe(&self) -> Pipe {
        Pipe { ranks: self.stages.len(), chunks: self.chunks }
    }
}

// ANCHOR: generators
/// Micro-batch i's forward of chunk c on stage s, with its communication.
fn forward_chunk(s: usize, pipe: Pipe, i: usize, c: usize) -> Vec<Instr> {
    let mut out = Vec::with_capacity(3);
    if !pipe.is_first(s, c) {
        out.push(Instr::RecvActivation { micro: i, chunk: c });
    }
    out.push(Instr::Forward { micro: i, chunk: c });
    if !pipe.is_last(s, c) {
        out.push(Instr::SendActivation { micro: i, chunk: c });
    }
    out
}

/// Micro-batch i's backward of chunk c on stage s, with its communication.
fn backward_chunk(s: usize, pipe: Pipe, i: usize, c: usize) -> Vec<Instr> {
    let mut out = Vec::with_capacity(3);
    if !pipe.is_last(s, c) {
        out.push(Instr::RecvGrad { micro: i, chunk: c });
    }
    out.push(Instr::Backward { micro: i, chunk: c });
    if !pipe.is_first(s, c) {
        out.push(Instr::SendGrad { micro: i, chunk: c });
    }
    out
}

/// With one chunk per stage.
fn forward(s: usize, n: usize, i: usize) -> Vec<Instr> {
    forward_chunk(s, Pipe { ranks: n, chunks: 1 }, i, 0)
}

fn backward(s: usize, n: usize, i: usize) -> Vec<Instr> {
    backward_chunk(s, Pipe { ranks: n, chunks: 1 }, i, 0)
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
    // EXERCISE(ch04-gpipe, points = 5): the M micro-batches' forwards (forward(s, n, i): with their receive and send), then their M backwards, then flush(s, n)
    // TESTS: -p ch04-pipeline --lib -- schedule::tests::gpipe_runs_every_forward_then_every_backward_then_steps
    let forwards = (0..m).flat_map(|i| forward(s, n, i));
    // WRONG(computes without its messages: no receive, no send): `forward(s, n, i)` -> `vec![Instr::Forward { micro: i, chunk: 0 }]`
    let backwards = (0..m).flat_map(|i| backward(s, n, i));
    forwards.chain(backwards).chain(flush(s, n)).collect()
    // WRONG(never steps: no flush): `flush(s, n)` -> `Vec::new()`
    // END EXERCISE
}

/// 1F1B: stage s runs N-s-1 warm-up forwards, then alternates one forward and one backward,
/// then drains the remaining backwards. A micro-batch's backward starts as soon as it can, so
/// at most N-s are in flight on stage s, whatever M is; the bubble is GPipe's.
pub fn one_f_one_b(s: usize, n: usize, m: usize) -> Vec<Instr> {
    // EXERCISE(ch04-one-f-one-b, points = 10): N - s - 1 warm-up forwards (at most M), then one forward and one backward (the oldest in flight) until every forward is done, then the remaining backwards, then flush(s, n)
    // TESTS: -p ch04-pipeline --lib -- schedule::tests::one_f_one_b_on_two_stages_reads_as_in_the_book schedule::tests::one_f_one_b_holds_n_minus_s_micro_batches_at_most
    let warmup = (n - s - 1).min(m);
    // WRONG(one warm-up forward too many): `(n - s - 1)` -> `(n - s)`
    // WRONG(every stage warms up as long as the first): `(n - s - 1)` -> `(n - 1)`
    let mut out: Vec<Instr> = (0..warmup).flat_map(|i| forward(s, n, i)).collect();
    for i in warmup..m {
        out.extend(forward(s, n, i));
        out.extend(backward(s, n, i - warmup));
    }
    out.extend((m - warmup..m).flat_map(|i| backward(s, n, i)));
    out.extend(flush(s, n));
    out
    // END EXERCISE
}

/// Interleaved 1F1B (Megatron-LM's order): the k-th forward of a stage is micro-batch
/// (k / NV)·N + k mod N of chunk (k mod NV) / N, so micro-batches go through a chunk in groups of
/// N; the k-th backward takes the chunks the other way round. Stage s warms up with
/// 2(N-s-1) + (V-1)N forwards, then alternates, then drains. M must be a multiple of N.
pub fn interleaved(s: usize, pipe: Pipe, m: usize) -> Vec<Instr> {
    let (n, v) = (pipe.ranks, pipe.chunks);
    let total = m * v;
    let at = |k: usize, backward: bool| {
        let chunk = k % (n * v) / n;
        ((k / (n * v)) * n + k % n, if backward { v - 1 - chunk } else { chunk })
    };
    let fwd = |k: usize| {
        let (i, c) = at(k, false);
        forward_chunk(s, pipe, i, c)
    };
    let bwd = |k: usize| {
        let (i, c) = at(k, true);
        backward_chunk(s, pipe, i, c)
    };
    let warmup = (2 * (n - s - 1) + (v - 1) * n).min(total);
    let mut out: Vec<Instr> = (0..warmup).flat_map(fwd).collect();
    for k in warmup..total {
        out.extend(fwd(k));
        out.extend(bwd(k - warmup));
    }
    out.extend((total - warmup..total).flat_map(bwd));
    out.extend(flush(s, n));
    out
}
// ANCHOR_END: generators

// ANCHOR: zb_h1
/// Micro-batch i's input-gradient half (B) on stage s of n, with its communication: a backward
/// whose W comes later.
fn backward_input(s: usize, n: usize, i: usize) -> Vec<Instr> {
    let mut out = Vec::with_capacity(3);
    if s + 1 < n {
        out.push(Instr::RecvGrad { micro: i, chunk: 0 });
    }
    out.push(Instr::BackwardInput { micro: i, chunk: 0 });
    if s > 0 {
        out.push(Instr::SendGrad { micro: i, chunk: 0 });
    }
    out
}

/// ZB-H1: 1F1B's warm-up, its steady phase with each backward split in two, B then W, and
/// stage s running its W's s micro-batches late; in the drain, each B is followed by one W
/// that was put off, and the rest come last. A micro-batch is in flight from its forward to
/// its W, so stage s holds N - s + s = N at most: what 1F1B's first stage holds, on every
/// stage. The gradient comes back through the B's alone, and the W's fill what was 1F1B's
/// drain bubble.
pub fn zb_h1(s: usize, n: usize, m: usize) -> Vec<Instr> {
    // EXERCISE(ch04-zb-h1, points = 10): 1F1B's warm-up; then each remaining forward, followed by the oldest B (backward_input(s, n, k)) and, from the (s+1)-th of them on, the oldest W not yet run; in the drain, each B followed by the oldest W left; then the W's still left, then flush(s, n)
    // TESTS: -p ch04-pipeline --lib -- schedule::tests::zb_h1_splits_every_backward_and_holds_what_1f1b_s_first_stage_holds simulate::tests::zb_h1_has_a_third_of_1f1b_s_bubble
    // NEEDS: ch04-one-f-one-b ch04-simulator-deadlock
    let warmup = (n - s - 1).min(m);
    let weights = |i| Instr::BackwardWeights { micro: i, chunk: 0 };
    let mut deferred = 0..m; // the micro-batches whose W is still to run, in order
    let mut out: Vec<Instr> = (0..warmup).flat_map(|i| forward(s, n, i)).collect();
    for k in 0..m - warmup {
        out.extend(forward(s, n, warmup + k));
        out.extend(backward_input(s, n, k));
        if k >= s {
            // WRONG(no W put off: each follows its B, and later stages hold only 1F1B's N - s): `k >= s` -> `true`
            out.extend(deferred.next().map(weights));
        }
    }
    for k in m - warmup..m {
        out.extend(backward_input(s, n, k));
        out.extend(deferred.next().map(weights));
        // WRONG(the put-off W's all wait for the end of the drain: its idle time stays): `out.extend(deferred.next().map(weights));` -> ``
    }
    out.extend(deferred.map(weights));
    out.extend(flush(s, n));
    out
    // END EXERCISE
}
// ANCHOR_END: zb_h1

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

/// For each (micro-batch, chunk), the index of its last instruction in `instrs`: where its
/// buffers free.
pub fn last_use(instrs: &[Instr]) -> std::collections::HashMap<(usize, usize), usize> {
    instrs.iter().enumerate().filter_map(|(at, i)| i.micro().map(|m| (m, at))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_f_one_b_on_two_stages_reads_as_in_the_book() {
        use Instr::*;
        let s = Schedule::new(ScheduleKind::OneFOneB, 2, 1, 3);
        assert_eq!(
            s.stages[0],
            vec![
                Forward { micro: 0, chunk: 0 },
                SendActivation { micro: 0, chunk: 0 },
                Forward { micro: 1, chunk: 0 },
                SendActivation { micro: 1, chunk: 0 },
                RecvGrad { micro: 0, chunk: 0 },
                Backward { micro: 0, chunk: 0 },
                Forward { micro: 2, chunk: 0 },
                SendActivation { micro: 2, chunk: 0 },
                RecvGrad { micro: 1, chunk: 0 },
                Backward { micro: 1, chunk: 0 },
                RecvGrad { micro: 2, chunk: 0 },
                Backward { micro: 2, chunk: 0 },
                ReduceTiedGrads,
                OptimizerStep,
            ]
        );
        assert_eq!(
            s.stages[1][..4],
            [
                RecvActivation { micro: 0, chunk: 0 },
                Forward { micro: 0, chunk: 0 },
                Backward { micro: 0, chunk: 0 },
                SendGrad { micro: 0, chunk: 0 }
            ]
        );
    }

    /// Each micro-batch's instructions on stage `s` of `n`, in the order the list runs them, with
    /// the list's end: what a correct generator must produce, however it orders micro-batches.
    fn check_messages(list: &[Instr], s: usize, n: usize, m: usize) {
        use Instr::*;
        for micro in 0..m {
            let mine: Vec<Instr> = list.iter().copied().filter(|i| i.micro() == Some((micro, 0))).collect();
            let mut want = Vec::new();
            want.extend((s > 0).then_some(RecvActivation { micro, chunk: 0 }));
            want.push(Forward { micro, chunk: 0 });
            want.extend((s + 1 < n).then_some(SendActivation { micro, chunk: 0 }));
            want.extend((s + 1 < n).then_some(RecvGrad { micro, chunk: 0 }));
            want.push(Backward { micro, chunk: 0 });
            want.extend((s > 0).then_some(SendGrad { micro, chunk: 0 }));
            assert_eq!(mine, want, "stage {s} of {n}, micro-batch {micro} of {m}");
        }
        let tail: Vec<Instr> = list.iter().copied().filter(|i| i.micro().is_none()).collect();
        let tied = n > 1 && (s == 0 || s + 1 == n);
        let want: Vec<Instr> = tied.then_some(ReduceTiedGrads).into_iter().chain([OptimizerStep]).collect();
        assert_eq!(tail, want, "stage {s} of {n}: the flush");
        assert_eq!(list.last(), Some(&OptimizerStep), "stage {s} of {n}: the step comes last");
    }

    #[test]
    fn gpipe_runs_every_forward_then_every_backward_then_steps() {
        for n in 1..=4 {
            for m in 1..=5 {
                for s in 0..n {
                    let list = gpipe(s, n, m);
                    check_messages(&list, s, n, m);
                    let first_backward = list.iter().position(|i| matches!(i, Instr::Backward { .. }));
                    let last_forward = list.iter().rposition(|i| matches!(i, Instr::Forward { .. }));
                    assert!(last_forward < first_backward, "stage {s} of {n}, m {m}: a backward before a forward");
                    assert_eq!(peak_in_flight(&list), m, "stage {s} of {n}, m {m}");
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_holds_n_minus_s_micro_batches_at_most() {
        for n in 1..=6 {
            for m in 1..=9 {
                for s in 0..n {
                    let list = one_f_one_b(s, n, m);
                    check_messages(&list, s, n, m);
                    assert_eq!(peak_in_flight(&list), m.min(n - s), "stage {s} of {n}, m {m}");
                    // Backwards in micro-batch order (the next stage sends the gradients so).
                    let order: Vec<usize> = list
                        .iter()
                        .filter_map(|i| if let Instr::Backward { micro, .. } = i { Some(*micro) } else { None })
                        .collect();
                    assert_eq!(order, (0..m).collect::<Vec<_>>(), "stage {s} of {n}, m {m}");
                }
            }
        }
    }

    #[test]
    fn zb_h1_splits_every_backward_and_holds_what_1f1b_s_first_stage_holds() {
        use Instr::*;
        for n in 1..=8 {
            for m in 1..=16 {
                let one_f_one_b = Schedule::new(ScheduleKind::OneFOneB, n, 1, m);
                let zb = Schedule::new(ScheduleKind::ZbH1, n, 1, m);
                for (s, list) in zb.stages.iter().enumerate() {
                    for micro in 0..m {
                        let mine: Vec<Instr> = list.iter().copied().filter(|i| i.micro() == Some((micro, 0))).collect();
                        let mut want = Vec::new();
                        want.extend((s > 0).then_some(RecvActivation { micro, chunk: 0 }));
                        want.push(Forward { micro, chunk: 0 });
                        want.extend((s + 1 < n).then_some(SendActivation { micro, chunk: 0 }));
                        want.extend((s + 1 < n).then_some(RecvGrad { micro, chunk: 0 }));
                        want.push(BackwardInput { micro, chunk: 0 });
                        want.extend((s > 0).then_some(SendGrad { micro, chunk: 0 }));
                        want.push(BackwardWeights { micro, chunk: 0 });
                        assert_eq!(mine, want, "stage {s} of {n}, micro-batch {micro} of {m}");
                    }
                    assert_eq!(list.last(), Some(&OptimizerStep));
                    // W's in micro-batch order, as 1F1B's backwards: the same sums, in the same
                    // order, so the same gradients bit for bit.
                    let order: Vec<usize> = list
                        .iter()
                        .filter_map(|i| if let BackwardWeights { micro, .. } = i { Some(*micro) } else { None })
                        .collect();
                    assert_eq!(order, (0..m).collect::<Vec<_>>(), "stage {s} of {n}, m {m}");
                    // Up to N in flight on every stage: 1F1B's bound on its first stage.
                    assert_eq!(peak_in_flight(list), m.min(n), "stage {s} of {n}, m {m}");
                }
                let peak = |sched: &Schedule| sched.stages.iter().map(|l| peak_in_flight(l)).max();
                assert_eq!(peak(&zb), peak(&one_f_one_b), "n {n} m {m}: the same memory bound");
            }
        }
    }

    #[test]
    fn peak_in_flight_is_m_for_gpipe_and_n_minus_s_for_1f1b() {
        for n in 1..=8 {
            for m in 1..=16 {
                let (g, f) =
                    (Schedule::new(ScheduleKind::Gpipe, n, 1, m), Schedule::new(ScheduleKind::OneFOneB, n, 1, m));
                for s in 0..n {
                    assert_eq!(peak_in_flight(&g.stages[s]), m, "gpipe n {n} m {m} stage {s}");
                    assert_eq!(peak_in_flight(&f.stages[s]), m.min(n - s), "1f1b n {n} m {m} stage {s}");
                }
            }
        }
    }
}
