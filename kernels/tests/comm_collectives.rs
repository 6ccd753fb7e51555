//! The collectives' claims: what each computes, what it moves, and that sub-groups never mix.
//! Every test runs real thread ranks through `launch`.

use kernels::Rng;
use kernels::comm::ring::{BROADCAST_PIECE, chunk};
use kernels::comm::thread::{ThreadComm, launch};
use kernels::comm::{Collective, CommError, CommStats, Communicator, Rank, ReduceOp};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const F32: u64 = 4;

/// Rank `rank`'s input at step `step`: any rank can recompute any other's.
fn input(rank: Rank, step: usize, len: usize) -> Vec<f32> {
    let mut v = vec![0.0; len];
    Rng::new((rank * 1_000_003 + step * 7 + len) as u64).fill_normal(&mut v, 1.0);
    v
}

/// Runs `f` on every rank and returns each rank's result, panicking on a launch failure.
fn run<T: Send + 'static>(
    n: usize,
    f: impl Fn(&mut ThreadComm) -> Result<T, CommError> + Send + Sync + 'static,
) -> Vec<T> {
    launch(n, move |mut comm| f(&mut comm)).unwrap_or_else(|e| panic!("{e}"))
}

/// The f64 sum over ranks `ranks` of their step-`step` inputs, and the sum of magnitudes that
/// bounds the f32 rounding error.
fn reference(ranks: &[Rank], step: usize, len: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut sum, mut mag) = (vec![0.0; len], vec![0.0; len]);
    for &r in ranks {
        for (i, x) in input(r, step, len).into_iter().enumerate() {
            sum[i] += x as f64;
            mag[i] += x.abs() as f64;
        }
    }
    (sum, mag)
}

/// `got` equals `sum / divisor` up to f32 rounding of a sum of up to 8 terms.
fn assert_close(got: &[f32], (sum, mag): &(Vec<f64>, Vec<f64>), divisor: usize, what: &str) {
    assert_eq!(got.len(), sum.len(), "{what}");
    for (i, g) in got.iter().enumerate() {
        let (want, tol) = (sum[i] / divisor as f64, 1e-6 * mag[i] + 1e-30);
        assert!((*g as f64 - want).abs() <= tol, "{what}: [{i}] = {g}, want {want} ± {tol}");
    }
}

fn bytes(values: usize) -> u64 {
    values as u64 * F32
}

fn stats_after(
    n: usize,
    f: impl Fn(&mut ThreadComm) -> Result<(), CommError> + Send + Sync + 'static,
) -> Vec<CommStats> {
    run(n, move |comm| f(comm).map(|()| comm.stats()))
}

/// The largest buffer in the byte tests: 105 values per rank.
const M: usize = 105;

/// Runs one `collective` (through `f`) on n = 2, 3, 4, 8 ranks whose largest buffer is n·M values,
/// and checks that every rank sent and received exactly `fraction(n)` = (num, den) of it.
fn assert_every_rank_moves(
    collective: Collective,
    fraction: fn(usize) -> (usize, usize),
    f: fn(&mut ThreadComm, usize) -> Result<(), CommError>,
) {
    for n in [2, 3, 4, 8] {
        let stats = stats_after(n, move |comm| f(comm, n));
        let (num, den) = fraction(n);
        let want = bytes(n * M * num / den);
        for (r, s) in stats.iter().enumerate() {
            assert_eq!(s.sent[&collective], want, "n = {n}, rank {r} sent");
            assert_eq!(s.received[&collective], want, "n = {n}, rank {r} received");
            assert_eq!(s.calls[&collective], 1);
        }
    }
}

#[test]
fn ring_all_reduce_moves_2n_minus_1_over_n() {
    assert_every_rank_moves(
        Collective::AllReduce,
        |n| (2 * (n - 1), n),
        |comm, n| comm.all_reduce(&mut vec![1.0; n * M], ReduceOp::Sum),
    );
}

#[test]
fn ring_reduce_scatter_moves_n_minus_1_over_n() {
    assert_every_rank_moves(
        Collective::ReduceScatter,
        |n| (n - 1, n),
        |comm, n| comm.reduce_scatter(&vec![1.0; n * M], &mut [0.0; M], ReduceOp::Sum),
    );
}

#[test]
fn ring_all_gather_moves_n_minus_1_over_n() {
    assert_every_rank_moves(
        Collective::AllGather,
        |n| (n - 1, n),
        |comm, n| comm.all_gather(&[1.0; M], &mut vec![0.0; n * M]),
    );
}

#[test]
fn uneven_ring_all_reduce_moves_2n_minus_1_buffers_in_all() {
    let len = 1001;
    for n in [3, 4, 8] {
        assert_ne!(len % n, 0);
        let stats = stats_after(n, move |comm| comm.all_reduce(&mut vec![1.0; len], ReduceOp::Sum));
        let total: u64 = stats.iter().map(|s| s.sent[&Collective::AllReduce]).sum();
        assert_eq!(total, bytes(2 * (n - 1) * len), "n = {n}: every chunk crosses n - 1 links, twice");
        let largest_chunk = len.div_ceil(n);
        assert!(stats.iter().all(|s| s.sent[&Collective::AllReduce] <= bytes(2 * (n - 1) * largest_chunk)));
    }
}

#[test]
fn chain_broadcast_sends_the_buffer_once_per_link() {
    let len = 2 * BROADCAST_PIECE + 5; // three pieces, the last one short
    for n in [2, 3, 4, 8] {
        let root = 1;
        let stats = stats_after(n, move |comm| comm.broadcast(&mut vec![1.0; len], root));
        for (r, s) in stats.iter().enumerate() {
            let (sent, received) = (s.sent[&Collective::Broadcast], s.received[&Collective::Broadcast]);
            let last = (root + n - 1) % n;
            assert_eq!(sent, if r == last { 0 } else { bytes(len) }, "n = {n}, rank {r} sent");
            assert_eq!(received, if r == root { 0 } else { bytes(len) }, "n = {n}, rank {r} received");
        }
    }
}

#[test]
fn all_reduce_matches_the_f64_sum_for_every_size() {
    for n in [1, 2, 3, 4, 8] {
        for len in [0, 1, 5, 64, 1001] {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                let out = run(n, move |comm| {
                    let mut buf = input(comm.rank(), 0, len);
                    comm.all_reduce(&mut buf, op).map(|()| buf)
                });
                let want = reference(&(0..n).collect::<Vec<_>>(), 0, len);
                let divisor = if op == ReduceOp::Avg { n } else { 1 };
                for (r, got) in out.iter().enumerate() {
                    assert_close(got, &want, divisor, &format!("n = {n}, len = {len}, {op:?}, rank {r}"));
                }
            }
        }
    }
}

#[test]
fn all_reduce_is_bitwise_identical_on_every_rank_and_every_run() {
    for n in [2, 3, 4, 8] {
        let once = || {
            run(n, move |comm| {
                let mut buf = input(comm.rank(), 1, 1003);
                comm.all_reduce(&mut buf, ReduceOp::Avg)?;
                Ok(buf.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            })
        };
        let (first, second) = (once(), once());
        assert!(first.iter().all(|bits| *bits == first[0]), "n = {n}: ranks disagree");
        assert_eq!(first, second, "n = {n}: two runs disagree");
    }
}

#[test]
fn reduce_scatter_gives_rank_r_the_reduced_chunk_r() {
    for n in [1, 2, 3, 4, 8] {
        for m in [0, 1, 7, 100] {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                let out = run(n, move |comm| {
                    let mut output = vec![0.0; m];
                    comm.reduce_scatter(&input(comm.rank(), 2, n * m), &mut output, op).map(|()| output)
                });
                let (sum, mag) = reference(&(0..n).collect::<Vec<_>>(), 2, n * m);
                let divisor = if op == ReduceOp::Avg { n } else { 1 };
                for (r, got) in out.iter().enumerate() {
                    let mine = r * m..(r + 1) * m;
                    let want = (sum[mine.clone()].to_vec(), mag[mine].to_vec());
                    assert_close(got, &want, divisor, &format!("n = {n}, m = {m}, {op:?}, rank {r}"));
                }
            }
        }
    }
}

/// The elementwise max over ranks `ranks` of their step-`step` inputs.
fn max_of(ranks: &[Rank], step: usize, len: usize) -> Vec<f32> {
    let mut max = vec![f32::NEG_INFINITY; len];
    for &r in ranks {
        max.iter_mut().zip(input(r, step, len)).for_each(|(m, x)| *m = m.max(x));
    }
    max
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn all_reduce_max_is_the_elementwise_max_bit_for_bit_on_every_rank() {
    for n in [1, 2, 3, 4, 8] {
        for len in [0, 1, 5, 64, 1001] {
            let out = run(n, move |comm| {
                let mut buf = input(comm.rank(), 4, len);
                comm.all_reduce(&mut buf, ReduceOp::Max).map(|()| buf)
            });
            let want = bits(&max_of(&(0..n).collect::<Vec<_>>(), 4, len));
            for (r, got) in out.iter().enumerate() {
                assert_eq!(bits(got), want, "n = {n}, len = {len}, rank {r}");
            }
        }
    }
}

#[test]
fn reduce_scatter_max_gives_rank_r_the_max_of_chunk_r() {
    for n in [1, 2, 3, 4, 8] {
        for m in [0, 1, 7, 100] {
            let out = run(n, move |comm| {
                let mut output = vec![0.0; m];
                comm.reduce_scatter(&input(comm.rank(), 5, n * m), &mut output, ReduceOp::Max).map(|()| output)
            });
            let max = max_of(&(0..n).collect::<Vec<_>>(), 5, n * m);
            for (r, got) in out.iter().enumerate() {
                assert_eq!(bits(got), bits(&max[r * m..(r + 1) * m]), "n = {n}, m = {m}, rank {r}");
            }
        }
    }
}

#[test]
fn a_nan_on_one_rank_makes_the_max_nan_everywhere() {
    // Rank 2's value 3 is NaN; every other value is finite. Whichever rank's copy of chunk 0
    // (values 0..4 of 12 on 3 ranks) starts the ring, the NaN must survive it.
    let out = run(3, move |comm| {
        let mut buf = input(comm.rank(), 6, 12);
        if comm.rank() == 2 {
            buf[3] = f32::NAN;
        }
        comm.all_reduce(&mut buf, ReduceOp::Max).map(|()| buf)
    });
    let mut want = max_of(&[0, 1, 2], 6, 12);
    want[3] = f32::NAN;
    for (r, got) in out.iter().enumerate() {
        assert!(got[3].is_nan(), "rank {r}: {got:?}");
        assert_eq!(bits(got), bits(&out[0]), "rank {r} differs from rank 0");
        assert_eq!(bits(&got[4..]), bits(&want[4..]), "rank {r}");
    }
}

#[test]
fn all_gather_concatenates_every_rank_in_rank_order() {
    for n in [1, 2, 3, 4, 8] {
        for m in [0, 1, 7, 100] {
            let out = run(n, move |comm| {
                let mut output = vec![0.0; n * m];
                comm.all_gather(&input(comm.rank(), 3, m), &mut output).map(|()| output)
            });
            let want: Vec<f32> = (0..n).flat_map(|r| input(r, 3, m)).collect();
            assert!(out.iter().all(|got| *got == want), "n = {n}, m = {m}");
        }
    }
}

#[test]
fn broadcast_copies_the_root_to_every_rank() {
    for n in [1, 2, 3, 4, 8] {
        for len in [0, 3, BROADCAST_PIECE + 1] {
            for root in 0..n {
                let out = run(n, move |comm| {
                    let mut buf = input(comm.rank(), 4, len);
                    comm.broadcast(&mut buf, root).map(|()| buf)
                });
                assert!(out.iter().all(|got| *got == input(root, 4, len)), "n = {n}, len = {len}, root {root}");
            }
        }
    }
}

#[test]
fn send_and_recv_deliver_in_order_and_count_bytes() {
    let n = 4;
    let out = run(n, move |comm| {
        let (r, next, prev) = (comm.rank(), (comm.rank() + 1) % n, (comm.rank() + n - 1) % n);
        for k in 0..3 {
            comm.send(&[r as f32, k as f32], next)?;
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut buf = [0.0; 2];
            comm.recv(&mut buf, prev)?;
            got.push(buf);
        }
        let s = comm.stats();
        assert_eq!((s.sent[&Collective::SendRecv], s.received[&Collective::SendRecv]), (3 * 2 * F32, 3 * 2 * F32));
        Ok(got)
    });
    for (r, got) in out.iter().enumerate() {
        let prev = ((r + n - 1) % n) as f32;
        assert_eq!(got, &[[prev, 0.0], [prev, 1.0], [prev, 2.0]], "rank {r}");
    }
}

#[test]
fn two_ranks_that_send_to_each_other_at_once_both_receive() {
    // 1F1B's steady state: stage 0 sends an activation forward while stage 1 sends a gradient
    // back, both before either receives.
    let out = run(2, move |comm| {
        let (r, peer) = (comm.rank(), 1 - comm.rank());
        let mut got = vec![0.0; 300];
        comm.sendrecv(&input(r, 7, 300), peer, &mut got, peer)?;
        Ok((got, comm.stats()))
    });
    let send_recv = Collective::SendRecv;
    for (r, (got, stats)) in out.iter().enumerate() {
        assert_eq!(*got, input(1 - r, 7, 300), "rank {r}");
        assert_eq!((stats.sent[&send_recv], stats.received[&send_recv]), (bytes(300), bytes(300)), "rank {r}");
        assert_eq!(stats.calls[&send_recv], 1);
    }
}

#[test]
fn a_ring_shift_moves_every_buffer_one_rank_right() {
    // On 1 rank the shift is an exchange with itself.
    for n in [1, 3, 4] {
        let out = run(n, move |comm| {
            let (r, next, prev) = (comm.rank(), (comm.rank() + 1) % n, (comm.rank() + n - 1) % n);
            let mut shifted = Vec::new();
            let mut buf = input(r, 8, 501);
            // n shifts bring every buffer home: after shift k, rank r holds rank r - k's.
            for _ in 0..n {
                let mut got = vec![0.0; buf.len()];
                comm.sendrecv(&buf, next, &mut got, prev)?;
                buf = got;
                shifted.push(buf.clone());
            }
            Ok((shifted, comm.stats()))
        });
        for (r, (shifted, stats)) in out.iter().enumerate() {
            for (k, got) in shifted.iter().enumerate() {
                assert_eq!(*got, input((r + n - (k + 1) % n) % n, 8, 501), "n = {n}, rank {r}, shift {}", k + 1);
            }
            assert_eq!(stats.sent[&Collective::SendRecv], bytes(n * 501), "n = {n}");
            assert_eq!(stats.received[&Collective::SendRecv], bytes(n * 501), "n = {n}");
        }
    }
}

#[test]
fn a_sub_group_communicator_moves_to_another_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Box<dyn Communicator>>();
    // Each rank's pair communicator runs on a thread of its own, while the rank's own thread
    // runs world all-reduces at the same time (chapter 2's compute and communication threads).
    let out = run(4, move |comm| {
        let r = comm.rank();
        let pair: Vec<Rank> = vec![r / 2 * 2, r / 2 * 2 + 1];
        let mut pair_comm: Box<dyn Communicator> = comm.split(&pair)?;
        let worker = std::thread::spawn(move || -> Result<Vec<f32>, CommError> {
            let mut sums = Vec::new();
            for step in 0..10 {
                let mut buf = [(r * 10 + step) as f32];
                pair_comm.all_reduce(&mut buf, ReduceOp::Sum)?;
                sums.push(buf[0]);
            }
            Ok(sums)
        });
        let mut world = [r as f32];
        for _ in 0..10 {
            world = [r as f32];
            comm.all_reduce(&mut world, ReduceOp::Sum)?;
        }
        let sums = worker.join().unwrap_or_else(|e| std::panic::resume_unwind(e))?;
        Ok((sums, world[0]))
    });
    for (r, (sums, world)) in out.iter().enumerate() {
        let first = r / 2 * 2;
        let want: Vec<f32> = (0..10).map(|step| ((first * 10 + step) + ((first + 1) * 10 + step)) as f32).collect();
        assert_eq!(*sums, want, "rank {r}'s pair, on its own thread");
        assert_eq!(*world, 6.0, "rank {r}'s world");
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    let n = 4;
    let arrived = AtomicUsize::new(0);
    let seen = run(n, move |comm| {
        // The last rank arrives late: a barrier that let anyone through early would see fewer.
        std::thread::sleep(Duration::from_millis(20 * comm.rank() as u64));
        arrived.fetch_add(1, Ordering::SeqCst);
        comm.barrier()?;
        assert_eq!(comm.stats().total_sent(), 0);
        Ok(arrived.load(Ordering::SeqCst))
    });
    assert_eq!(seen, vec![n; n]);
}

#[test]
fn split_groups_of_4_and_2_run_concurrently_without_mixing() {
    let (steps, quad_len, pair_len) = (20, 1001, 37);
    run(8, move |comm| {
        let r = comm.rank();
        let quad: Vec<Rank> = (r / 4 * 4..r / 4 * 4 + 4).collect();
        let pair: Vec<Rank> = vec![r / 2 * 2, r / 2 * 2 + 1];
        // Ranks 0 and 1 (and 2 and 3, ...) are in a quad and a pair at once: the same two ranks
        // exchange messages in two groups, from two threads, at the same time.
        let (mut quad_comm, mut pair_comm) = (comm.split_group(&quad)?, comm.split_group(&pair)?);
        assert_eq!((quad_comm.world_size(), pair_comm.world_size()), (4, 2));
        std::thread::scope(|s| {
            let quad_thread = s.spawn(|| -> Result<(), CommError> {
                for step in 0..steps {
                    let mut buf = input(r, step, quad_len);
                    quad_comm.all_reduce(&mut buf, ReduceOp::Sum)?;
                    assert_close(&buf, &reference(&quad, step, quad_len), 1, &format!("quad, rank {r}, step {step}"));
                }
                Ok(())
            });
            for step in 0..steps {
                let mut buf = input(r, 100 + step, pair_len);
                pair_comm.all_reduce(&mut buf, ReduceOp::Avg)?;
                assert_close(&buf, &reference(&pair, 100 + step, pair_len), 2, &format!("pair, rank {r}, step {step}"));
            }
            quad_thread.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
        })?;
        // Uneven chunks: rank q sends every chunk but its own in the reduce-scatter, and every
        // chunk but the next rank's in the all-gather.
        let (q, size) = (quad_comm.rank(), |i: usize| chunk(quad_len, 4, i % 4).len());
        let quad_bytes = bytes(steps * (2 * quad_len - size(q) - size(q + 1)));
        assert_eq!(quad_comm.stats().sent[&Collective::AllReduce], quad_bytes);
        assert_eq!(pair_comm.stats().sent[&Collective::AllReduce], bytes(steps * pair_len), "2(n-1)/n = 1");
        assert_eq!(comm.stats().total_sent(), 0, "the parent moved nothing itself");
        Ok(())
    });
}

#[test]
fn split_orders_ranks_by_the_list_and_nests() {
    let out = run(4, move |comm| {
        let mut reversed = comm.split_group(&[3, 2, 1, 0])?;
        assert_eq!(reversed.rank(), 3 - comm.rank());
        let mut order = vec![0.0; 4];
        reversed.all_gather(&[comm.rank() as f32], &mut order)?;
        // Group ranks 0, 1 of `reversed` are world ranks 3, 2.
        let half: Vec<Rank> = if reversed.rank() < 2 { vec![0, 1] } else { vec![2, 3] };
        let mut nested = reversed.split_group(&half)?;
        assert_eq!(nested.world_rank(), comm.rank());
        let mut sum = [comm.rank() as f32];
        nested.all_reduce(&mut sum, ReduceOp::Sum)?;
        Ok((order, sum[0]))
    });
    for (r, (order, sum)) in out.iter().enumerate() {
        assert_eq!(order, &[3.0, 2.0, 1.0, 0.0], "rank {r}");
        assert_eq!(*sum, if r >= 2 { 5.0 } else { 1.0 }, "rank {r}");
    }
}

#[test]
fn two_splits_of_the_same_ranks_are_two_groups() {
    let out = run(2, move |comm| {
        let (mut a, mut b) = (comm.split_group(&[0, 1])?, comm.split_group(&[0, 1])?);
        if comm.rank() == 0 {
            a.send(&[1.0], 1)?;
            b.send(&[2.0], 1)?;
            return Ok(vec![]);
        }
        // Receiving in the other order: one shared queue would hand b's receive a's message.
        let (mut from_b, mut from_a) = ([0.0], [0.0]);
        b.recv(&mut from_b, 0)?;
        a.recv(&mut from_a, 0)?;
        Ok(vec![from_a[0], from_b[0]])
    });
    assert_eq!(out[1], vec![1.0, 2.0]);
}

#[test]
fn the_trait_split_boxes_the_same_group() {
    let out = run(4, move |comm| {
        let r = comm.rank();
        let mut group: Box<dyn Communicator> = comm.split(&[r % 2, r % 2 + 2])?;
        let mut buf = [r as f32];
        group.all_reduce(&mut buf, ReduceOp::Sum)?;
        Ok(buf[0])
    });
    assert_eq!(out, vec![2.0, 4.0, 2.0, 4.0]);
}
