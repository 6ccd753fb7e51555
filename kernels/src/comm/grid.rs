//! The process grid: how `dp × tp × pp` ranks are numbered, and who is in each group. The only
//! place a rank number is computed from coordinates, or coordinates from a rank.
//!
//! Tensor parallelism is innermost, then data, then pipeline outermost:
//!
//!   rank = tp + TP · (dp + DP · pp)
//!
//! so that a tensor-parallel group (which sums activations twice per block, forward and back)
//! is neighbouring ranks, the GPUs of one node on a cluster; the pipeline's stages, which send
//! least (one activation per micro-batch), are furthest apart and may cross nodes. Megatron,
//! torchtitan and DeepSpeed order their grids the same way.

use super::Rank;
use serde::{Deserialize, Serialize};
use std::fmt;

/// One rank's place in the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Coords {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
}

/// The three kinds of group a rank belongs to, one of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupKind {
    /// Ranks that hold one model's tensors between them: same pipeline stage, same replica.
    Tensor,
    /// Ranks that hold the same shard in different replicas: their gradients are summed.
    Data,
    /// The stages of one pipe: same tensor rank, same replica.
    Pipeline,
}

impl GroupKind {
    pub const ALL: [GroupKind; 3] = [GroupKind::Tensor, GroupKind::Data, GroupKind::Pipeline];

    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Tensor => "tensor",
            GroupKind::Data => "data",
            GroupKind::Pipeline => "pipeline",
        }
    }
}

// ANCHOR: grid
/// A `dp × tp × pp` grid of ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
}

impl Grid {
    /// Every size at least 1 (a size of 0 is a caller's bug: the flags are checked before).
    pub fn new(dp: usize, tp: usize, pp: usize) -> Grid {
        assert!(dp > 0 && tp > 0 && pp > 0, "a grid of {dp} x {tp} x {pp} ranks has an empty dimension");
        Grid { dp, tp, pp }
    }

    pub fn world_size(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    /// rank = tp + TP · (dp + DP · pp)
    pub fn rank(&self, at: Coords) -> Rank {
        at.tp + self.tp * (at.dp + self.dp * at.pp)
    }

    pub fn coords(&self, rank: Rank) -> Coords {
        // EXERCISE(ch05-grid-coords, points = 5): the inverse of rank = tp + TP·(dp + DP·pp): tp the fastest-changing digit, pp the slowest
        // TESTS: -p kernels --lib -- comm::grid::tests
        Coords { tp: rank % self.tp, dp: rank / self.tp % self.dp, pp: rank / (self.tp * self.dp) }
        // WRONG(data parallelism innermost, as if rank were dp + DP·tp + DP·TP·pp): `Coords { tp: rank % self.tp, dp: rank / self.tp % self.dp, pp: rank / (self.tp * self.dp) }` -> `Coords { dp: rank % self.dp, tp: rank / self.dp % self.tp, pp: rank / (self.tp * self.dp) }`
        // WRONG(forgets that dp wraps around before pp starts): `rank / self.tp % self.dp` -> `rank / self.tp`
        // END EXERCISE
    }

    /// The members of `rank`'s group of `kind`, in the order of their rank within it (their
    /// coordinate along that dimension).
    pub fn group(&self, kind: GroupKind, rank: Rank) -> Vec<Rank> {
        let at = self.coords(rank);
        match kind {
            GroupKind::Tensor => (0..self.tp).map(|tp| self.rank(Coords { tp, ..at })).collect(),
            GroupKind::Data => (0..self.dp).map(|dp| self.rank(Coords { dp, ..at })).collect(),
            GroupKind::Pipeline => (0..self.pp).map(|pp| self.rank(Coords { pp, ..at })).collect(),
        }
    }

    /// Every group of `kind`, each once, in the order of its lowest rank (the member at
    /// coordinate 0 along that dimension).
    pub fn groups(&self, kind: GroupKind) -> Vec<Vec<Rank>> {
        let first = |at: Coords| match kind {
            GroupKind::Tensor => at.tp == 0,
            GroupKind::Data => at.dp == 0,
            GroupKind::Pipeline => at.pp == 0,
        };
        (0..self.world_size()).filter(|&r| first(self.coords(r))).map(|r| self.group(kind, r)).collect()
    }
}
// ANCHOR_END: grid

/// The grid and its groups, a line per kind: what the binaries print before they start.
impl fmt::Display for Grid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "grid: dp {} x tp {} x pp {} = {} ranks (rank = tp + {}·(dp + {}·pp))",
            self.dp,
            self.tp,
            self.pp,
            self.world_size(),
            self.tp,
            self.dp
        )?;
        for kind in GroupKind::ALL {
            let groups: Vec<String> = self
                .groups(kind)
                .iter()
                .map(|g| format!("[{}]", g.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" ")))
                .collect();
            write!(f, "\n  {:<8} groups: {}", kind.name(), groups.join(" "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_coordinates_are_inverse_and_tensor_parallel_is_innermost() {
        for (dp, tp, pp) in [(1, 1, 1), (2, 2, 2), (3, 2, 4), (1, 4, 2), (2, 1, 3)] {
            let grid = Grid::new(dp, tp, pp);
            for rank in 0..grid.world_size() {
                assert_eq!(grid.rank(grid.coords(rank)), rank, "{grid:?} rank {rank}");
            }
            if tp > 1 {
                assert_eq!(grid.coords(1), Coords { dp: 0, tp: 1, pp: 0 }, "rank 1 is the next tensor rank");
            }
        }
    }

    // ANCHOR: grid_table
    #[test]
    fn groups_of_a_2x2x2_grid_are_the_hand_written_table() {
        // rank: (dp, tp, pp)   0: (0,0,0)  1: (0,1,0)  2: (1,0,0)  3: (1,1,0)
        //                      4: (0,0,1)  5: (0,1,1)  6: (1,0,1)  7: (1,1,1)
        let grid = Grid::new(2, 2, 2);
        assert_eq!(grid.coords(6), Coords { dp: 1, tp: 0, pp: 1 });
        assert_eq!(grid.groups(GroupKind::Tensor), vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(grid.groups(GroupKind::Data), vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
        assert_eq!(grid.groups(GroupKind::Pipeline), vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
        assert_eq!(grid.group(GroupKind::Pipeline, 7), vec![3, 7]);
    }

    #[test]
    fn groups_of_uneven_grids_are_the_hand_written_table() {
        // dp 1 x tp 2 x pp 2: two pipes of two stages, each stage a tensor pair.
        let grid = Grid::new(1, 2, 2);
        assert_eq!(grid.groups(GroupKind::Tensor), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(grid.groups(GroupKind::Data), vec![vec![0], vec![1], vec![2], vec![3]]);
        assert_eq!(grid.groups(GroupKind::Pipeline), vec![vec![0, 2], vec![1, 3]]);
        // dp 2 x tp 4 x pp 1 (chapter 3's grid): rank = tp + 4·dp.
        let grid = Grid::new(2, 4, 1);
        assert_eq!(grid.groups(GroupKind::Tensor), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(grid.groups(GroupKind::Data), vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
        // dp 3 x tp 1 x pp 2 (chapter 4's grid): stage s of pipe d is rank d + 3·s.
        let grid = Grid::new(3, 1, 2);
        assert_eq!(grid.groups(GroupKind::Pipeline), vec![vec![0, 3], vec![1, 4], vec![2, 5]]);
        assert_eq!(grid.groups(GroupKind::Data), vec![vec![0, 1, 2], vec![3, 4, 5]]);
        assert_eq!(grid.coords(4), Coords { dp: 1, tp: 0, pp: 1 });
    }
    // ANCHOR_END: grid_table

    #[test]
    fn every_rank_is_in_exactly_one_group_of_each_kind() {
        let grid = Grid::new(2, 2, 3);
        for kind in GroupKind::ALL {
            let mut seen: Vec<Rank> = grid.groups(kind).concat();
            seen.sort_unstable();
            assert_eq!(seen, (0..12).collect::<Vec<_>>(), "{kind:?}");
        }
    }

    #[test]
    fn the_grid_prints_its_groups() {
        let text = Grid::new(1, 2, 2).to_string();
        assert!(text.contains("tensor   groups: [0 1] [2 3]"), "{text}");
        assert!(text.contains("pipeline groups: [0 2] [1 3]"), "{text}");
    }
}
