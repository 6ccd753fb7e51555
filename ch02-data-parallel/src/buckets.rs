//! Gradient buckets: which ranges of the flat gradient buffer are all-reduced together.
//!
//! One all-reduce per tensor would pay a collective's fixed cost ~150 times a step; one
//! all-reduce of everything after backward hides nothing. Buckets sit between: contiguous
//! ranges of about `--bucket-mb`, cut at tensor boundaries, planned from the END of the layout,
//! because that is the order in which backward finishes gradients (ln_f, the last block, ...,
//! the first block, the embeddings). A bucket is launched the moment its last tensor is final,
//! while backward carries on with the layers below.

use ch01_single_gpu::params::ParamLayout;
use std::ops::Range;

/// A range of the gradient buffer reduced by one collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Indices into `ParamLayout::specs`.
    pub tensors: Range<usize>,
    /// Offsets into the flat gradient buffer.
    pub range: Range<usize>,
}

// ANCHOR: plan_buckets
/// Buckets in launch order (the reverse of the layout). `bucket_bytes == 0` means one bucket
/// holding everything, launched after backward: no overlap.
///
/// Backward finishes gradients a unit at a time (`ParamLayout::backward_units`: ln_f, one block,
/// ..., the embeddings), so buckets are made of whole units: a bucket that took even one small
/// tensor of the next block down would wait for that whole block. Units are added while the
/// bucket stays within `bucket_bytes`; a unit larger than that on its own is cut at tensor
/// boundaries into buckets that all go out the moment it is done.
pub fn plan_buckets(layout: &ParamLayout, bucket_bytes: usize) -> Vec<Bucket> {
    // EXERCISE(ch02-bucket-plan, points = 10): walk layout.backward_units() and grow one open bucket downwards while it stays within bucket_bytes; cut a unit that is too big alone at tensor boundaries, from its end
    // TESTS: -p ch02-data-parallel --lib -- buckets::tests::
    let bytes = |tensors: &Range<usize>| tensors.clone().map(|i| layout.specs[i].numel() * 4).sum::<usize>();
    let bucket = |tensors: Range<usize>| {
        let range = layout.specs[tensors.start].offset..layout.specs[tensors.end - 1].range().end;
        Bucket { tensors, range }
    };
    if bucket_bytes == 0 {
        return vec![bucket(0..layout.specs.len())];
    }
    let mut buckets = Vec::new();
    let mut open: Option<Range<usize>> = None; // the bucket being filled, growing downwards
    for unit in layout.backward_units() {
        match open.take() {
            Some(current) if bytes(&current) + bytes(&unit) <= bucket_bytes => open = Some(unit.start..current.end),
            Some(current) => {
                buckets.push(bucket(current));
                open = Some(unit);
            }
            None => open = Some(unit),
        }
        let current = open.clone().unwrap_or_default();
        if bytes(&current) > bucket_bytes {
            // A unit too large for one bucket: cut it at tensor boundaries, from its end.
            let mut end = current.end;
            while end > current.start {
                let mut start = end - 1;
                while start > current.start && bytes(&(start - 1..end)) <= bucket_bytes {
                    start -= 1;
                }
                buckets.push(bucket(start..end));
                end = start;
            }
            open = None;
        }
    }
    buckets.extend(open.map(bucket));
    // WRONG(never closes the last bucket, the embeddings'): `buckets.extend(open.map(bucket));` -> ``
    buckets
    // END EXERCISE
}
// ANCHOR_END: plan_buckets

#[cfg(test)]
mod tests {
    use super::*;
    use ch01_single_gpu::config::ModelConfig;

    #[test]
    fn buckets_hold_whole_backward_units_when_they_fit() {
        let layout = ParamLayout::new(&ModelConfig::preset("small", 256).unwrap());
        let units = layout.backward_units();
        for size in [64 * 1024, 1024 * 1024, 3 * 1024 * 1024] {
            for b in plan_buckets(&layout, size) {
                // Each bucket either is a run of whole units, or lies inside one unit too big
                // for a bucket: it never straddles the boundary between two units partly.
                let whole = units.iter().filter(|u| u.start >= b.tensors.start && u.end <= b.tensors.end);
                let covered: usize = whole.map(|u| u.len()).sum();
                let inside_one = units.iter().any(|u| u.start <= b.tensors.start && b.tensors.end <= u.end);
                assert!(covered == b.tensors.len() || inside_one, "{b:?} at {size}");
            }
        }
        // The small model's blocks are 774 KiB: with 1 MiB buckets each bucket is one block, the
        // first with ln_f, the last with the embeddings (192 KiB): each goes out as soon as its
        // block's backward ends.
        let one_mib = plan_buckets(&layout, 1024 * 1024);
        assert_eq!(one_mib.len(), 4, "1 MiB buckets of the small model: one per block");
        assert_eq!(one_mib[0].tensors, units[1].start..units[0].end, "the first bucket: ln_f and the last block");
        assert_eq!(one_mib[1].tensors, units[2], "the second bucket: the block below");
        assert_eq!(one_mib[3].tensors, 0..units[4].end, "the last bucket: the first block and the embeddings");
    }

    #[test]
    fn buckets_tile_the_buffer_backwards_at_tensor_boundaries() {
        let layout = ParamLayout::new(&ModelConfig::preset("small", 256).unwrap());
        let buckets = plan_buckets(&layout, 256 * 1024);
        assert!(buckets.len() > 4);
        assert_eq!(buckets[0].range.end, layout.total, "the first bucket ends the buffer");
        assert_eq!(buckets.last().map(|b| b.range.start), Some(0), "the last bucket starts the buffer");
        for pair in buckets.windows(2) {
            assert_eq!(pair[1].range.end, pair[0].range.start, "buckets {pair:?} leave a gap or overlap");
            assert_eq!(pair[1].tensors.end, pair[0].tensors.start, "buckets {pair:?} skip or repeat a tensor");
        }
        for b in &buckets {
            let single = b.tensors.len() == 1;
            assert!(single || b.range.len() * 4 <= 256 * 1024, "{b:?} is over the size");
        }
        assert_eq!(
            plan_buckets(&layout, 0),
            vec![Bucket { tensors: 0..layout.specs.len(), range: 0..layout.total }],
            "bucket_bytes 0: one bucket of everything"
        );
    }
}
