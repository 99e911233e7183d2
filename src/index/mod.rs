//! Vector search: exact below a size threshold, a hora HNSW graph above it.
//!
//! THRESHOLD_DOC_PLACEHOLDER

mod collection;
mod exact;
mod hnsw;

use std::cmp::Ordering;
use std::collections::BinaryHeap;

pub use collection::{BuiltGraph, CollectionIndex, DEFAULT_EXACT_THRESHOLD, GraphSnapshot};
pub use exact::{ExactIndex, dot};
pub use hnsw::{HnswIndex, HnswParams};

/// Search interface shared by every implementation.
///
/// Vectors are expected to be L2-normalised, so the score is the cosine similarity (computed
/// as a plain dot product).
pub trait VectorIndex: Send + Sync {
    /// Best `k` ids by cosine score, highest first, skipping ids for which `allow` is false.
    ///
    /// Equal scores are ordered by ascending id, so results are deterministic. A query with a
    /// non-finite component returns nothing.
    ///
    /// # Panics
    ///
    /// If `query.len()` differs from the index's (non-zero) dimension: that is a bug in the
    /// caller, not a data problem.
    fn search(&self, query: &[f32], k: usize, allow: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)>;

    /// Number of searchable vectors.
    fn len(&self) -> usize;

    /// True when nothing can be found.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a vector or an index was refused.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The vector's length is not the index's dimension.
    #[error("vector has {got} dimensions, the index has {expected}")]
    WrongDimension {
        /// The index's dimension.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
    /// NaN or infinity: such a vector would rank above (or below) everything.
    #[error("vector has a non-finite component")]
    NonFinite,
    /// hora returned an error or panicked while building the graph.
    #[error("HNSW build failed: {0}")]
    Build(String),
}

/// Checks a vector about to be stored in an index of dimension `dim`.
pub(crate) fn check_vector(dim: usize, v: &[f32]) -> Result<(), IndexError> {
    if v.len() != dim {
        return Err(IndexError::WrongDimension {
            expected: dim,
            got: v.len(),
        });
    }
    if !v.iter().all(|x| x.is_finite()) {
        return Err(IndexError::NonFinite);
    }
    Ok(())
}

/// Panics on a query of the wrong dimension (a caller bug); false for a non-finite query,
/// which can only produce a meaningless ranking.
pub(crate) fn query_usable(dim: usize, query: &[f32]) -> bool {
    assert_eq!(
        query.len(),
        dim,
        "query has {} dimensions, the index has {dim}",
        query.len()
    );
    query.iter().all(|x| x.is_finite())
}

/// One candidate in [`TopK`]. Ordered worst-first so the `BinaryHeap` (a max-heap) keeps the
/// worst of the current best `k` on top, ready to be evicted.
#[derive(Clone, Copy)]
struct Worst {
    score: f32,
    id: u64,
}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        // Lower score is "greater" (worse); on equal scores the larger id is worse.
        other
            .score
            .total_cmp(&self.score)
            .then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Worst {}

/// The best `k` (id, score) pairs seen so far, in a bounded min-heap: O(log k) per accepted
/// candidate and one comparison per rejected one, instead of sorting all N scores.
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> TopK {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k.min(4096) + 1),
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, id: u64, score: f32) {
        if self.k == 0 || score.is_nan() {
            return;
        }
        let cand = Worst { score, id };
        if self.heap.len() < self.k {
            self.heap.push(cand);
        } else if let Some(mut worst) = self.heap.peek_mut()
            && cand < *worst
        {
            *worst = cand;
        }
    }

    /// Best first.
    pub(crate) fn into_sorted(self) -> Vec<(u64, f32)> {
        // Ascending in `Worst` order is best first.
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|w| (w.id, w.score))
            .collect()
    }
}

/// Merges lists that are each sorted best first and share no id into the best `k`.
pub(crate) fn merge_top(
    lists: impl IntoIterator<Item = Vec<(u64, f32)>>,
    k: usize,
) -> Vec<(u64, f32)> {
    let mut top = TopK::new(k);
    for list in lists {
        for (id, score) in list {
            top.push(id, score);
        }
    }
    top.into_sorted()
}

/// Deterministic clustered, L2-normalised vectors for the unit tests (a small version of the
/// generator in `benches/index.rs`).
#[cfg(test)]
pub(crate) mod testdata {
    /// splitmix64: tiny, seedable, good enough for test data.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed)
        }
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        /// Uniform in [0, 1).
        pub fn unit(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
        }
        /// Standard normal (Box-Muller).
        pub fn gauss(&mut self) -> f32 {
            let u1 = self.unit().max(1e-7);
            let u2 = self.unit();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        }
    }

    pub fn normalize(mut v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    }

    /// `n` points around `clusters` random unit centroids (noise `sigma` per component),
    /// normalised.
    pub fn clustered(
        seed: u64,
        n: usize,
        dim: usize,
        clusters: usize,
        sigma: f32,
    ) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(seed);
        let centroids: Vec<Vec<f32>> = (0..clusters)
            .map(|_| normalize((0..dim).map(|_| rng.gauss()).collect()))
            .collect();
        (0..n)
            .map(|_| {
                let c = &centroids[(rng.next_u64() % clusters as u64) as usize];
                normalize(c.iter().map(|x| x + sigma * rng.gauss()).collect())
            })
            .collect()
    }

    /// Ground truth: best `k` ids by brute force, with a plain sum (independent of the
    /// optimised kernel under test).
    pub fn brute_force(data: &[(u64, Vec<f32>)], q: &[f32], k: usize) -> Vec<u64> {
        let mut scored: Vec<(u64, f32)> = data
            .iter()
            .map(|(id, v)| (*id, v.iter().zip(q).map(|(a, b)| a * b).sum()))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.into_iter().take(k).map(|(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_keeps_best_in_order_with_id_tiebreak() {
        let mut t = TopK::new(3);
        for (id, s) in [
            (1, 0.1),
            (2, 0.9),
            (3, 0.5),
            (4, 0.9),
            (5, f32::NAN),
            (6, 0.7),
        ] {
            t.push(id, s);
        }
        assert_eq!(t.into_sorted(), vec![(2, 0.9), (4, 0.9), (6, 0.7)]);
        let mut t = TopK::new(0);
        t.push(1, 1.0);
        assert!(t.into_sorted().is_empty());
    }

    #[test]
    fn merge_top_interleaves() {
        let a = vec![(1, 0.9), (2, 0.5)];
        let b = vec![(3, 0.8), (4, 0.1)];
        assert_eq!(merge_top([a, b], 3), vec![(1, 0.9), (3, 0.8), (2, 0.5)]);
    }

    #[test]
    fn check_vector_rejects_bad_input() {
        assert!(check_vector(2, &[0.6, 0.8]).is_ok());
        assert!(matches!(
            check_vector(3, &[0.6, 0.8]),
            Err(IndexError::WrongDimension {
                expected: 3,
                got: 2
            })
        ));
        assert!(matches!(
            check_vector(2, &[f32::NAN, 0.0]),
            Err(IndexError::NonFinite)
        ));
    }
}
