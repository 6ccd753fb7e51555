//! Ring collectives: every rank talks only to its two neighbours, and every link is busy at once.
//!
//! The n ranks of a group stand in a ring: rank r sends only to `next = (r + 1) % n` and receives
//! only from `prev = (r + n - 1) % n`. A buffer of L values is cut into n chunks,
//! chunk i = `[i·L/n, (i+1)·L/n)`, so when n does not divide L the chunks differ by at most one
//! value and still cover the buffer in order ([`chunk`]).
//!
//! ## Reduce-scatter: n - 1 steps
//! At step s = 0, 1, ..., n - 2, every rank at the same time
//! 1. sends its partial sum of chunk (r - s - 1) mod n to `next`, and
//! 2. receives `prev`'s partial sum of chunk (r - s - 2) mod n and adds its own values into it.
//!
//! Follow chunk c: rank c + 1 sends its copy at step 0, each rank on the way adds its own, and
//! after n - 1 hops it arrives at rank c, which adds the last term. With n = 3 and `xR` for rank
//! R's values of a chunk:
//!
//! ```text
//!                 rank 0              rank 1              rank 2
//! after step 0    chunk 1: x2+x0      chunk 2: x0+x1      chunk 0: x1+x2
//! after step 1    chunk 0: x1+x2+x0   chunk 1: x2+x0+x1   chunk 2: x0+x1+x2
//! ```
//!
//! Rank r ends owning the complete sum of chunk r.
//!
//! ## All-gather: n - 1 more steps
//! At step s, every rank sends chunk (r - s) mod n (at step 0: the one it owns) to `next`, and
//! receives chunk (r - s - 1) mod n from `prev`, which it stores. After n - 1 steps rank r has
//! received chunks r - 1, r - 2, ..., r - (n - 1): all of them.
//!
//! ## All-reduce = reduce-scatter, then all-gather
//! `ReduceOp::Avg` divides the owned chunk by n between the two halves, so each quotient is
//! computed once and copied everywhere.
//!
//! ## Max: the same ring, another combine
//! Nothing above needs the reduction to be a sum, only to combine two partial results into one:
//! `ReduceOp::Max` keeps the larger value where `Sum` adds ([`combine`]). Max is exact (no
//! rounding), and the all-gather copies each chunk's one result, so every rank has the same bits.
//!
//! ## What it costs
//! Each step sends one chunk and receives one chunk. Per rank, for a buffer of S bytes:
//!
//! | collective      | steps    | sent = received     |
//! |-----------------|----------|---------------------|
//! | reduce-scatter  | n - 1    | (n - 1)/n · S       |
//! | all-gather      | n - 1    | (n - 1)/n · S       |
//! | all-reduce      | 2(n - 1) | 2(n - 1)/n · S      |
//!
//! (S is the larger buffer: reduce-scatter's input, all-gather's output.) The all-reduce volume
//! tends to 2S however many ranks there are, and no algorithm does better: every rank must send
//! its (n - 1)/n · S values that others reduce, and receive the (n - 1)/n · S they reduced.
//! What grows with n is the number of steps, each paying a latency.
//!
//! ## Why the answer is the same on every rank, every run
//! The order of the additions for chunk c is fixed by the ring ((x_{c+1} + x_{c+2}) + ...) + x_c,
//! not by timing, and all-gather copies the one finished sum. It is not the left-to-right order
//! x0 + x1 + ... of a single device, so a data-parallel sum can differ from it in the last bits.
//!
//! ## Broadcast: the ring cut open at the root
//! The ranks form a chain root, root + 1, ..., root - 1. The buffer travels down it in pieces of
//! [`BROADCAST_PIECE`] values, each rank passing a piece on as soon as it has it, so the chain is
//! pipelined: time ≈ S/bandwidth + (n - 2) pieces, not (n - 1)·S/bandwidth. Every rank but the
//! root receives S bytes, every rank but the last sends S: (n - 1)·S on the wire in all.
//!
//! ## Barrier: an all-gather of nothing
//! n - 1 empty messages around the ring. The message rank r receives at step s left rank r - 1
//! after r - 1 had received step s - 1's, so the last one proves that ranks r - 1, ..., r - (n-1)
//! have all arrived.

use super::{Collective, CommError, CommStats, Communicator, Rank, ReduceOp};
use std::ops::Range;

// ANCHOR: wire
/// What the ring algorithms need from a transport: ordered messages between ranks of one group.
///
/// Sends must not wait for the matching receive (every rank sends, then receives, at each step:
/// with sends that block until received, the whole ring would wait on itself). Messages between
/// two ranks arrive in the order they were sent.
pub trait Wire {
    /// This rank's position in the ring, `0..size()`.
    fn rank(&self) -> Rank;
    fn size(&self) -> usize;
    /// Sends a copy of `data` to rank `to`.
    fn send(&mut self, to: Rank, data: &[f32]) -> Result<(), CommError>;
    /// Receives the next message from rank `from`, which must have exactly `into.len()` values.
    fn recv(&mut self, from: Rank, into: &mut [f32]) -> Result<(), CommError>;
    /// Like [`Wire::recv`], but combines the message into `into`, value by value, with `op`
    /// ([`combine`]: adds, or keeps the larger).
    fn recv_reduce(&mut self, from: Rank, into: &mut [f32], op: ReduceOp) -> Result<(), CommError>;
}
// ANCHOR_END: wire

/// Values per broadcast message: 256 KiB, small enough to pipeline a large buffer down the
/// chain, large enough that a message's fixed cost is noise.
pub const BROADCAST_PIECE: usize = 1 << 16;

// ANCHOR: chunk
/// Chunk `i` of `n` of a buffer of `len` values: `[i·len/n, (i+1)·len/n)`.
pub fn chunk(len: usize, n: usize, i: usize) -> Range<usize> {
    len * i / n..len * (i + 1) / n
}
// ANCHOR_END: chunk

// ANCHOR: ring_halves
/// A rank's place in the ring.
struct Ring {
    rank: Rank,
    size: usize,
    next: Rank,
    prev: Rank,
}

impl Ring {
    fn of(wire: &impl Wire) -> Ring {
        let (rank, size) = (wire.rank(), wire.size());
        Ring { rank, size, next: (rank + 1) % size, prev: (rank + size - 1) % size }
    }
}

/// In place: afterwards rank r's `buf[chunk(len, n, r)]` holds the sum (or max) of that chunk
/// over all ranks; the rest of `buf` holds partial results.
fn reduce_scatter_in_place(wire: &mut impl Wire, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
    // EXERCISE(ch02-ring-reduce-scatter, points = 10): n - 1 steps; at step s send chunk (r - s - 1) mod n to next, then recv_reduce chunk (r - s - 2) mod n from prev (add n before taking mod)
    // TESTS: -p kernels --test comm_collectives -- all_reduce_matches_the_f64_sum_for_every_size all_reduce_is_bitwise_identical_on_every_rank_and_every_run
    let Ring { rank: r, size: n, next, prev } = Ring::of(wire);
    let len = buf.len();
    // s ≤ n - 2, so r + n - s - 2 ≥ r: the indices below never go negative.
    for s in 0..n - 1 {
        wire.send(next, &buf[chunk(len, n, (r + n - s - 1) % n)])?;
        // WRONG(sends the chunk it is about to receive into): `(r + n - s - 1) % n` -> `(r + n - s) % n`
        wire.recv_reduce(prev, &mut buf[chunk(len, n, (r + n - s - 2) % n)], op)?;
    }
    Ok(())
    // END EXERCISE
}

/// In place: rank r's `buf[chunk(len, n, r)]` is copied into every other rank's `buf`.
fn all_gather_in_place(wire: &mut impl Wire, buf: &mut [f32]) -> Result<(), CommError> {
    // EXERCISE(ch02-ring-all-gather, points = 5): n - 1 steps; at step s send chunk (r - s) mod n (first the one this rank owns) to next, then recv chunk (r - s - 1) mod n from prev
    // TESTS: -p kernels --test comm_collectives -- all_gather_concatenates_every_rank_in_rank_order ring_all_gather_moves_n_minus_1_over_n
    let Ring { rank: r, size: n, next, prev } = Ring::of(wire);
    let len = buf.len();
    for s in 0..n - 1 {
        // WRONG(one step too many: sends a finished chunk back to its owner): `0..n - 1` -> `0..n`
        wire.send(next, &buf[chunk(len, n, (r + n - s) % n)])?;
        wire.recv(prev, &mut buf[chunk(len, n, (r + n - s - 1) % n)])?;
    }
    Ok(())
    // END EXERCISE
}
// ANCHOR_END: ring_halves

/// `into[i] = into[i] ∘ values[i]`: `+` for `Sum` and `Avg` (Avg divides once, at the end), the
/// larger for `Max`, where a NaN on either side wins (a NaN logit must not vanish in a row max).
pub fn combine(into: &mut [f32], values: &[f32], op: ReduceOp) {
    let pairs = into.iter_mut().zip(values);
    match op {
        ReduceOp::Sum | ReduceOp::Avg => pairs.for_each(|(a, b)| *a += b),
        ReduceOp::Max => pairs.for_each(|(a, &b)| {
            if b > *a || b.is_nan() {
                *a = b;
            }
        }),
    }
}

fn divide(values: &mut [f32], n: usize) {
    let n = n as f32;
    values.iter_mut().for_each(|v| *v /= n);
}

// ANCHOR: all_reduce
/// Ring all-reduce: reduce-scatter, then all-gather, over the same n chunks of `buf`.
pub fn all_reduce(wire: &mut impl Wire, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
    reduce_scatter_in_place(wire, buf, op)?;
    if op == ReduceOp::Avg {
        let (n, own) = (wire.size(), chunk(buf.len(), wire.size(), wire.rank()));
        divide(&mut buf[own], n);
    }
    all_gather_in_place(wire, buf)
}
// ANCHOR_END: all_reduce

fn invalid(collective: Collective, reason: String) -> CommError {
    CommError::InvalidArgument { collective, reason }
}

/// Ring reduce-scatter of `input` (n chunks of `output.len()` values) into `output`.
///
/// The same ring as the first half of all-reduce, but the partial sum travels in `output`, so
/// `input` is never written and no scratch copy of it is made (this is what lets ZeRO keep only
/// a shard).
pub fn reduce_scatter(wire: &mut impl Wire, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
    let Ring { rank: r, size: n, next, prev } = Ring::of(wire);
    let m = output.len();
    if input.len() != n * m {
        let reason = format!("input has {} values, not {n} ranks x {m} output values", input.len());
        return Err(invalid(Collective::ReduceScatter, reason));
    }
    let own = |i: usize| &input[chunk(n * m, n, i % n)];
    // Step 0 sends our own values of chunk r - 1; each later step sends the sum just received.
    output.copy_from_slice(own(r + n - 1));
    for s in 0..n - 1 {
        wire.send(next, output)?;
        output.copy_from_slice(own(r + n - s - 2));
        wire.recv_reduce(prev, output, op)?;
    }
    if op == ReduceOp::Avg {
        divide(output, n);
    }
    Ok(())
}

/// Ring all-gather: every rank's `input` lands in `output` at `[r·m, (r+1)·m)`, `m = input.len()`.
pub fn all_gather(wire: &mut impl Wire, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
    let (r, n, m) = (wire.rank(), wire.size(), input.len());
    if output.len() != n * m {
        let reason = format!("output has {} values, not {n} ranks x {m} input values", output.len());
        return Err(invalid(Collective::AllGather, reason));
    }
    output[chunk(n * m, n, r)].copy_from_slice(input);
    all_gather_in_place(wire, output)
}

/// Chain broadcast from `root`, pipelined in pieces of [`BROADCAST_PIECE`] values.
pub fn broadcast(wire: &mut impl Wire, buf: &mut [f32], root: Rank) -> Result<(), CommError> {
    let Ring { rank: r, size: n, next, prev } = Ring::of(wire);
    if root >= n {
        return Err(invalid(Collective::Broadcast, format!("root {root} is not a rank of a group of {n}")));
    }
    // This rank's place in the chain that starts at the root.
    let place = (r + n - root) % n;
    for piece in buf.chunks_mut(BROADCAST_PIECE) {
        if place > 0 {
            wire.recv(prev, piece)?;
        }
        if place < n - 1 {
            wire.send(next, piece)?;
        }
    }
    Ok(())
}

/// Returns once every rank of the group has called it.
pub fn barrier(wire: &mut impl Wire) -> Result<(), CommError> {
    let Ring { size: n, next, prev, .. } = Ring::of(wire);
    for _ in 0..n - 1 {
        wire.send(next, &[])?;
        wire.recv(prev, &mut [])?;
    }
    Ok(())
}

// ANCHOR: ring_transport
/// A transport whose collectives are the ring algorithms above: thread ranks and TCP ranks.
/// It says how to start a collective (check that no peer failed, hand out a [`Wire`] that counts
/// its bytes) and how to split; the [`Communicator`] below follows, the same for every transport.
pub trait RingTransport: Send {
    /// The wire of one collective, borrowing the transport while it runs.
    type Link<'a>: Wire
    where
        Self: 'a;
    /// What `split` makes.
    type Group: Communicator + 'static;
    /// This rank's position in the group, and the group's size.
    fn position(&self) -> Rank;
    fn members(&self) -> usize;
    /// Fails if a peer already failed: nothing would complete.
    fn check(&self) -> Result<(), CommError>;
    /// The wire for one call of `collective`.
    fn link(&mut self, collective: Collective) -> Self::Link<'_>;
    /// Told when a collective failed (a transport whose ring is then out of step remembers it).
    fn failed(&mut self, _error: &CommError) {}
    fn counts(&mut self) -> &mut CommStats;
    fn counted(&self) -> &CommStats;
    fn split_group(&mut self, ranks: &[Rank]) -> Result<Self::Group, CommError>;

    /// Runs one collective: fails at once if a peer already failed, counts the call, and hands
    /// the algorithm a wire that counts its bytes under `collective`.
    fn run(
        &mut self,
        collective: Collective,
        algorithm: impl FnOnce(&mut Self::Link<'_>) -> Result<(), CommError>,
    ) -> Result<(), CommError>
    where
        Self: Sized,
    {
        self.check()?;
        let stats = self.counts();
        *stats.calls.entry(collective).or_default() += 1;
        // A collective that was called has byte counts, zero ones included (a broadcast's last
        // rank sends nothing): readers can index the maps by every collective they called.
        stats.sent.entry(collective).or_default();
        stats.received.entry(collective).or_default();
        let result = algorithm(&mut self.link(collective));
        if let Err(e) = &result {
            self.failed(e);
        }
        result
    }

    /// `peer` names a rank of this group, or the call is refused.
    fn check_peer(&self, peer: Rank, collective: Collective) -> Result<(), CommError> {
        let n = self.members();
        if peer >= n {
            let reason = format!("rank {peer} is not in a group of {n}");
            return Err(CommError::InvalidArgument { collective, reason });
        }
        Ok(())
    }
}

impl<T: RingTransport> Communicator for T {
    fn rank(&self) -> Rank {
        self.position()
    }

    fn world_size(&self) -> usize {
        self.members()
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.run(Collective::AllReduce, |link| all_reduce(link, buf, op))
    }

    fn reduce_scatter(&mut self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.run(Collective::ReduceScatter, |link| reduce_scatter(link, input, output, op))
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        self.run(Collective::AllGather, |link| all_gather(link, input, output))
    }

    fn broadcast(&mut self, buf: &mut [f32], root: Rank) -> Result<(), CommError> {
        self.run(Collective::Broadcast, |link| broadcast(link, buf, root))
    }

    fn send(&mut self, buf: &[f32], to: Rank) -> Result<(), CommError> {
        self.check_peer(to, Collective::SendRecv)?;
        self.run(Collective::SendRecv, |link| Wire::send(link, to, buf))
    }

    fn recv(&mut self, buf: &mut [f32], from: Rank) -> Result<(), CommError> {
        self.check_peer(from, Collective::SendRecv)?;
        self.run(Collective::SendRecv, |link| Wire::recv(link, from, buf))
    }

    /// A ring transport's sends never wait for their receive (the [`Wire`] contract), so
    /// sending and then receiving is already both at once, however large the messages.
    fn sendrecv(&mut self, send: &[f32], to: Rank, recv: &mut [f32], from: Rank) -> Result<(), CommError> {
        self.check_peer(to, Collective::SendRecv)?;
        self.check_peer(from, Collective::SendRecv)?;
        self.run(Collective::SendRecv, |link| {
            Wire::send(link, to, send)?;
            Wire::recv(link, from, recv)
        })
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.run(Collective::Barrier, |link| barrier(link))
    }

    fn split(&mut self, ranks: &[Rank]) -> Result<Box<dyn Communicator>, CommError> {
        Ok(Box::new(self.split_group(ranks)?))
    }

    fn stats(&self) -> CommStats {
        self.counted().clone()
    }
}
// ANCHOR_END: ring_transport

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_adds_or_keeps_the_larger_and_a_nan_always_wins() {
        let (into, values) = ([1.0, 5.0, f32::NAN, 2.0, -1.0], [3.0, 4.0, 1.0, f32::NAN, -2.0]);
        let mut sum = into;
        combine(&mut sum, &values, ReduceOp::Sum);
        assert_eq!(sum.map(f32::is_nan), [false, false, true, true, false]);
        assert_eq!((sum[0], sum[1], sum[4]), (4.0, 9.0, -3.0));
        let mut max = into;
        combine(&mut max, &values, ReduceOp::Max);
        assert_eq!(max.map(f32::is_nan), [false, false, true, true, false], "NaN on either side");
        assert_eq!((max[0], max[1], max[4]), (3.0, 5.0, -1.0));
    }

    #[test]
    fn chunks_cover_the_buffer_in_order_and_differ_by_at_most_one() {
        for (len, n) in [(0, 3), (2, 3), (10, 3), (12, 4), (1003, 8)] {
            let chunks: Vec<_> = (0..n).map(|i| chunk(len, n, i)).collect();
            assert_eq!(chunks[0].start, 0);
            assert_eq!(chunks[n - 1].end, len);
            assert!(chunks.windows(2).all(|w| w[0].end == w[1].start));
            let sizes: Vec<_> = chunks.iter().map(|c| c.len()).collect();
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{len}/{n}: {sizes:?}");
        }
    }
}
