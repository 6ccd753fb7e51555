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
pub fn plan_buckets(layout: &ParamLayout, bucket_bytes: usize) -> Vec<Bucket> {
    let n = layout.specs.len();
    if bucket_bytes == 0 {
        return vec![Bucket { tensors: 0..n, range: 0..layout.total }];
    }
    let mut buckets = Vec::new();
    let mut end = n;
    while end > 0 {
        // Grow the bucket downwards until it reaches the size (a single tensor larger than the
        // size gets a bucket of its own).
        let mut start = end - 1;
        let mut bytes = layout.specs[start].numel() * 4;
        while start > 0 && bytes + layout.specs[start - 1].numel() * 4 <= bucket_bytes {
            start -= 1;
            bytes += layout.specs[start].numel() * 4;
        }
        let range = layout.specs[start].offset..layout.specs[end - 1].range().end;
        buckets.push(Bucket { tensors: start..end, range });
        end = start;
    }
    buckets
}
// ANCHOR_END: plan_buckets

#[cfg(test)]
mod tests {
    use super::*;
    use ch01_single_gpu::config::ModelConfig;

    #[test]
    fn buckets_tile_the_buffer_backwards_at_tensor_boundaries() {
        let layout = ParamLayout::new(&ModelConfig::preset("small", 256).unwrap());
        let buckets = plan_buckets(&layout, 256 * 1024);
        assert!(buckets.len() > 4);
        assert_eq!(buckets[0].range.end, layout.total, "the first bucket ends the buffer");
        assert_eq!(buckets.last().map(|b| b.range.start), Some(0));
        for pair in buckets.windows(2) {
            assert_eq!(pair[1].range.end, pair[0].range.start);
            assert_eq!(pair[1].tensors.end, pair[0].tensors.start);
        }
        for b in &buckets {
            let single = b.tensors.len() == 1;
            assert!(single || b.range.len() * 4 <= 256 * 1024, "{b:?} is over the size");
        }
        assert_eq!(plan_buckets(&layout, 0), vec![Bucket { tensors: 0..layout.specs.len(), range: 0..layout.total }]);
    }
}
