//! AdamW over the flat buffers, in two parts, so that every layout takes the same step:
//!
//! 1. [`squared_norm`]: a rank's part of the squared global gradient norm. Ranks that hold
//!    different parts of the model (tensor or pipeline shards) add their parts up (an
//!    all-reduce) so that every layout clips with the global norm, as chapter 1 does.
//! 2. [`Optimizer::update`]: the clipped AdamW update of the range of parameters a rank owns.
//!    Adam's moments exist only for that range: all of the buffer in chapter 1, a ZeRO rank's
//!    shard in chapter 6.

use crate::params::ParamLayout;
use kernels::dispatch::{adamw_update, squared_norm as squared_norm_of};
use kernels::ops::adamw::AdamWConfig;
use kernels::{Category, CudaError, DType, Device, MemoryLedger, Tensor, TensorError, View, ViewMut};
use std::ops::Range;

// ANCHOR: squared_norm
/// Part one: the sum of g² over `range` of the gradient buffer, in f64. The global norm is the
/// square root of the sum of every rank's part.
pub fn squared_norm(grads: View<'_>, range: Range<usize>) -> Result<f64, CudaError> {
    squared_norm_of(grads.slice(range))
}
// ANCHOR_END: squared_norm

/// AdamW's state for the parameters one rank updates.
pub struct Optimizer {
    /// The range of the flat parameter buffer this optimizer updates.
    pub owned: Range<usize>,
    /// Adam's first and second moments, one f32 per owned parameter, on the device.
    pub adam_m: Tensor,
    pub adam_v: Tensor,
    /// The owned range cut where the weight-decay setting changes: one AdamW call each.
    decay_groups: Vec<(Range<usize>, f32)>,
    adam: AdamWConfig,
}

// ANCHOR: decay_groups
/// Consecutive tensors that share a weight-decay setting, merged into one AdamW call each, and
/// cut to `owned` (a shard's boundary can fall inside a tensor).
pub fn decay_groups(layout: &ParamLayout, weight_decay: f32, owned: &Range<usize>) -> Vec<(Range<usize>, f32)> {
    let mut groups: Vec<(Range<usize>, f32)> = Vec::new();
    for spec in &layout.specs {
        let wd = if spec.weight_decay { weight_decay } else { 0.0 };
        let range = spec.range().start.max(owned.start)..spec.range().end.min(owned.end);
        if range.is_empty() {
            continue;
        }
        match groups.last_mut() {
            Some((last, last_wd)) if *last_wd == wd && last.end == range.start => last.end = range.end,
            _ => groups.push((range, wd)),
        }
    }
    groups
}
// ANCHOR_END: decay_groups

impl Optimizer {
    /// Zeroed moments for `owned` (a range of `layout`'s buffer), on `device`.
    pub fn new(
        layout: &ParamLayout,
        owned: Range<usize>,
        weight_decay: f32,
        adam: AdamWConfig,
        device: Device,
        ledger: &MemoryLedger,
    ) -> Result<Optimizer, TensorError> {
        assert!(owned.end <= layout.total, "owned range {owned:?} outside the layout");
        let moments = || Tensor::zeros_on(&[owned.len()], device, DType::F32, Category::OptimizerState, ledger);
        let (adam_m, adam_v) = (moments()?, moments()?);
        let decay_groups = decay_groups(layout, weight_decay, &owned);
        Ok(Optimizer { owned, adam_m, adam_v, decay_groups, adam })
    }

    // ANCHOR: update
    /// Part two: the AdamW step `step` (1-based) on the owned range of `params`, from the same
    /// range of `grads` scaled by `clip_scale` (computed from the global norm). `params_copy` is
    /// a bf16 run's compute copy of the parameters, rewritten as the master weights change.
    pub fn update(
        &mut self,
        params: &mut Tensor,
        mut params_copy: Option<&mut Tensor>,
        grads: &Tensor,
        lr: f32,
        clip_scale: f32,
        step: u64,
    ) {
        let at = self.owned.start;
        for (range, wd) in &self.decay_groups {
            let local = range.start - at..range.end - at;
            let p = params.view_mut().slice_into(range.clone());
            let p_copy = params_copy.as_mut().map(|c| c.view_mut().slice_into(range.clone()));
            let g = grads.view().slice(range.clone());
            let (m, v) = (self.adam_m.view_mut().slice_into(local.clone()), self.adam_v.view_mut().slice_into(local));
            adamw_update(p, p_copy, g, m, v, self.adam, lr, *wd, clip_scale, step);
        }
    }
    // ANCHOR_END: update

    // ANCHOR: update_owned
    /// [`Optimizer::update`] on buffers that hold only the owned range (a ZeRO rank's shard of
    /// the parameters and of the reduced gradient): index 0 of `params` and `grads` is
    /// `owned.start` of the layout. f32 master weights only (no compute copy).
    pub fn update_owned(&mut self, mut params: ViewMut<'_>, grads: View<'_>, lr: f32, clip_scale: f32, step: u64) {
        let at = self.owned.start;
        for (range, wd) in &self.decay_groups {
            let local = range.start - at..range.end - at;
            let p = params.slice_mut(local.clone());
            let g = grads.slice(local.clone());
            let (m, v) = (self.adam_m.view_mut().slice_into(local.clone()), self.adam_v.view_mut().slice_into(local));
            adamw_update(p, None, g, m, v, self.adam, lr, *wd, clip_scale, step);
        }
    }
    // ANCHOR_END: update_owned

    /// Sets the moments of the owned range from full-buffer moments (a checkpoint's).
    pub fn load_moments(&mut self, m: &[f32], v: &[f32]) -> Result<(), TensorError> {
        self.adam_m.copy_from(&m[self.owned.clone()])?;
        Ok(self.adam_v.copy_from(&v[self.owned.clone()])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn decay_groups_merge_neighbours_and_respect_the_owned_range() {
        let model = ModelConfig::preset("tiny", 256).unwrap();
        let layout = ParamLayout::new(&model);
        let groups = decay_groups(&layout, 0.1, &(0..layout.total));
        assert_eq!(groups.iter().map(|g| g.0.len()).sum::<usize>(), layout.total);
        assert_eq!(groups[0], (0..layout.get("h.0.ln_1.weight").unwrap().offset, 0.1), "wte and wpe together");
        assert!(groups.windows(2).all(|w| w[0].1 != w[1].1 && w[0].0.end == w[1].0.start));
        // A shard that starts inside wpe and ends inside h.0.attn.c_attn.weight.
        let wpe = layout.get("wpe.weight").unwrap().offset;
        let c_attn = layout.get("h.0.attn.c_attn.weight").unwrap().offset;
        let owned = wpe + 5..c_attn + 7;
        let groups = decay_groups(&layout, 0.1, &owned);
        assert_eq!(groups.first().map(|g| g.0.start), Some(owned.start));
        assert_eq!(groups.last(), Some(&(c_attn..owned.end, 0.1)));
        assert_eq!(groups.iter().map(|g| g.0.len()).sum::<usize>(), owned.len());
    }

    #[test]
    fn squared_norms_of_parts_add_up_to_the_whole() {
        let g: Vec<f32> = (0..50_000).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        let whole = squared_norm(View::Cpu(&g), 0..g.len()).unwrap();
        let parts =
            squared_norm(View::Cpu(&g), 0..20_000).unwrap() + squared_norm(View::Cpu(&g), 20_000..50_000).unwrap();
        assert!((whole - parts).abs() <= 1e-12 * whole, "{whole} vs {parts}");
        assert_eq!(whole.sqrt() as f32, kernels::ops::grad_norm::global_norm(&g), "chapter 1's norm, bit for bit");
    }

    #[test]
    fn update_touches_only_the_owned_range() {
        let model = ModelConfig::preset("tiny", 256).unwrap();
        let layout = ParamLayout::new(&model);
        let ledger = MemoryLedger::new();
        let owned = 1000..3000;
        let mut opt =
            Optimizer::new(&layout, owned.clone(), 0.1, AdamWConfig::default(), Device::Cpu, &ledger).unwrap();
        assert_eq!(ledger.report().current[&Category::OptimizerState], 2 * 4 * owned.len() as u64);
        let mut params = Tensor::zeros(&[layout.total]);
        params.fill(1.0);
        let mut grads = Tensor::zeros(&[layout.total]);
        grads.fill(0.5);
        opt.update(&mut params, None, &grads, 1e-2, 1.0, 1);
        let p = params.as_slice();
        assert!(p[..owned.start].iter().chain(&p[owned.end..]).all(|&x| x == 1.0), "outside untouched");
        assert!(p[owned].iter().all(|&x| x < 1.0), "inside updated");
    }
}
