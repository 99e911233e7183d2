//! Brute-force search over one contiguous row-major matrix.

use std::collections::HashMap;

use super::{IndexError, TopK, VectorIndex, check_vector, query_usable};

/// Exact cosine search: every search scores every allowed row. Perfect recall, no build step,
/// O(1) insert and delete; about 1 ms for 10k 384-dim vectors, then ~0.24 ms per 1,000 more
/// (memory-bandwidth-bound, see the module docs).
#[derive(Debug, Clone, Default)]
pub struct ExactIndex {
    /// 0 until the first insert fixes it (so an index can be created before any vector, e.g.
    /// for a file that produced no chunks).
    dim: usize,
    ids: Vec<u64>,
    /// Row `i` is `data[i * dim..(i + 1) * dim]` and belongs to `ids[i]`; one allocation keeps
    /// the scan sequential in memory.
    data: Vec<f32>,
    /// id → row, so that remove is O(1) (swap-remove) instead of a scan.
    rows: HashMap<u64, usize>,
}

impl ExactIndex {
    /// An empty index for vectors of `dim` components (0: taken from the first insert).
    pub fn new(dim: usize) -> ExactIndex {
        ExactIndex {
            dim,
            ..Default::default()
        }
    }

    /// An empty index with room for `n` vectors.
    pub fn with_capacity(dim: usize, n: usize) -> ExactIndex {
        ExactIndex {
            dim,
            ids: Vec::with_capacity(n),
            data: Vec::with_capacity(n * dim),
            rows: HashMap::with_capacity(n),
        }
    }

    /// Vector length (0 while empty and created with dimension 0).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Adds `v` under `id`, replacing the vector already stored under `id`.
    ///
    /// Refuses a vector of the wrong length or with a NaN/infinite component, leaving the
    /// index unchanged.
    pub fn insert(&mut self, id: u64, v: &[f32]) -> Result<(), IndexError> {
        if self.dim == 0 && self.ids.is_empty() && !v.is_empty() {
            self.dim = v.len();
        }
        check_vector(self.dim, v)?;
        match self.rows.get(&id) {
            Some(&row) => self.data[row * self.dim..(row + 1) * self.dim].copy_from_slice(v),
            None => {
                self.rows.insert(id, self.ids.len());
                self.ids.push(id);
                self.data.extend_from_slice(v);
            }
        }
        Ok(())
    }

    /// Inserts every item; stops at the first refused vector (the items before it stay).
    pub fn extend<I, V>(&mut self, items: I) -> Result<(), IndexError>
    where
        I: IntoIterator<Item = (u64, V)>,
        V: AsRef<[f32]>,
    {
        let items = items.into_iter();
        let (lower, _) = items.size_hint();
        self.ids.reserve(lower);
        self.data.reserve(lower * self.dim);
        self.rows.reserve(lower);
        for (id, v) in items {
            self.insert(id, v.as_ref())?;
        }
        Ok(())
    }

    /// Removes `id`; false if it was not there. O(1): the last row moves into the hole.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(row) = self.rows.remove(&id) else {
            return false;
        };
        let last = self.ids.len() - 1;
        if row != last {
            let moved = self.ids[last];
            self.ids[row] = moved;
            self.data
                .copy_within(last * self.dim..(last + 1) * self.dim, row * self.dim);
            self.rows.insert(moved, row);
        }
        self.ids.pop();
        self.data.truncate(last * self.dim);
        true
    }

    /// True if `id` is stored.
    pub fn contains(&self, id: u64) -> bool {
        self.rows.contains_key(&id)
    }

    /// The vector stored under `id`.
    pub fn get(&self, id: u64) -> Option<&[f32]> {
        let row = *self.rows.get(&id)?;
        Some(&self.data[row * self.dim..(row + 1) * self.dim])
    }

    /// Every (id, vector), in storage order (which changes on remove).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[f32])> + '_ {
        // `max(1)`: `chunks_exact(0)` panics; with dim 0 there are no rows anyway.
        self.ids
            .iter()
            .copied()
            .zip(self.data.chunks_exact(self.dim.max(1)))
    }

    /// Drops every vector, keeping the dimension.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.data.clear();
        self.rows.clear();
    }

    /// Approximate heap bytes held (vectors, ids and the id → row map).
    pub fn memory_bytes(&self) -> usize {
        // hashbrown: one (u64, usize) slot plus one control byte per bucket, buckets ≈ 8/7
        // of the capacity.
        let map = self.rows.capacity() * 8 / 7 * (16 + 1);
        self.data.capacity() * 4 + self.ids.capacity() * 8 + map
    }
}

impl VectorIndex for ExactIndex {
    fn search(&self, query: &[f32], k: usize, allow: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)> {
        if self.ids.is_empty() || k == 0 || !query_usable(self.dim, query) {
            return Vec::new();
        }
        let mut top = TopK::new(k);
        scan(self.dim, &self.data, &self.ids, query, allow, &mut top);
        top.into_sorted()
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Cosine score of two L2-normalised vectors of equal length.
///
/// `iter().zip().map().sum()` does not vectorise, because float addition is not associative
/// and the compiler must keep the sequential order; eight independent accumulators give it
/// the freedom to use SIMD lanes (stack.md measured ~5× on exact search).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<8, false>(a, b)
}

/// Dot product with `L` independent partial sums. `FMA` selects fused multiply-add, which is
/// only fast inside a function compiled with the `fma` target feature (elsewhere `mul_add`
/// is a libm call).
#[inline(always)]
fn dot_lanes<const L: usize, const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] = if FMA {
                x[i].mul_add(y[i], acc[i])
            } else {
                acc[i] + x[i] * y[i]
            };
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// Scores every allowed row into `top`, with AVX2+FMA when the CPU has them. Dispatching
/// once per scan (not per dot product) lets the whole loop be compiled for those features.
fn scan(
    dim: usize,
    data: &[f32],
    ids: &[u64],
    query: &[f32],
    allow: &dyn Fn(u64) -> bool,
    top: &mut TopK,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { scan_avx2_fma(dim, data, ids, query, allow, top) };
        return;
    }
    scan_lanes::<8, false>(dim, data, ids, query, allow, top);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scan_avx2_fma(
    dim: usize,
    data: &[f32],
    ids: &[u64],
    query: &[f32],
    allow: &dyn Fn(u64) -> bool,
    top: &mut TopK,
) {
    // 16 lanes = two 256-bit registers, two independent FMA chains.
    scan_lanes::<16, true>(dim, data, ids, query, allow, top);
}

#[inline(always)]
fn scan_lanes<const L: usize, const FMA: bool>(
    dim: usize,
    data: &[f32],
    ids: &[u64],
    query: &[f32],
    allow: &dyn Fn(u64) -> bool,
    top: &mut TopK,
) {
    for (row, &id) in data.chunks_exact(dim).zip(ids) {
        // The filter first: it is much cheaper than a dot product.
        if allow(id) {
            top.push(id, dot_lanes::<L, FMA>(row, query));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testdata;

    fn unit(v: &[f32]) -> Vec<f32> {
        testdata::normalize(v.to_vec())
    }

    fn small() -> ExactIndex {
        let mut idx = ExactIndex::new(2);
        idx.insert(10, &unit(&[1.0, 0.0])).unwrap();
        idx.insert(11, &unit(&[1.0, 1.0])).unwrap();
        idx.insert(12, &unit(&[0.0, 1.0])).unwrap();
        idx.insert(13, &unit(&[-1.0, 0.2])).unwrap();
        idx
    }

    fn ids(r: &[(u64, f32)]) -> Vec<u64> {
        r.iter().map(|(id, _)| *id).collect()
    }

    #[test]
    fn dot_matches_naive_for_all_remainders() {
        let mut rng = testdata::Rng::new(7);
        for len in 0..70 {
            let a: Vec<f32> = (0..len).map(|_| rng.gauss()).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.gauss()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-4, "len {len}");
            let fused = dot_lanes::<16, true>(&a, &b);
            assert!((fused - naive).abs() < 1e-4, "len {len}");
        }
    }

    #[test]
    fn search_orders_by_score_and_truncates() {
        let idx = small();
        let q = unit(&[1.0, 0.1]);
        let r = idx.search(&q, 3, &|_| true);
        assert_eq!(ids(&r), vec![10, 11, 12]);
        assert!(r.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!((r[0].1 - dot(&q, idx.get(10).unwrap())).abs() < 1e-6);
        // k larger than the index: everything, still ordered.
        assert_eq!(ids(&idx.search(&q, 10, &|_| true)), vec![10, 11, 12, 13]);
        assert!(idx.search(&q, 0, &|_| true).is_empty());
    }

    #[test]
    fn allow_filter_skips_ids() {
        let idx = small();
        let q = unit(&[1.0, 0.1]);
        let r = idx.search(&q, 2, &|id| id % 2 == 1);
        assert_eq!(ids(&r), vec![11, 13]);
        assert!(idx.search(&q, 2, &|_| false).is_empty());
    }

    #[test]
    fn remove_swaps_last_row_in_and_keeps_mapping() {
        let mut idx = small();
        assert!(idx.remove(10));
        assert!(!idx.remove(10));
        assert_eq!(idx.len(), 3);
        // Row 0 now holds id 13's vector; both the map and the scan must agree.
        assert_eq!(idx.get(13).unwrap(), unit(&[-1.0, 0.2]).as_slice());
        let r = idx.search(&unit(&[-1.0, 0.2]), 1, &|_| true);
        assert_eq!(r[0].0, 13);
        assert!((r[0].1 - 1.0).abs() < 1e-6);
        assert!(!ids(&idx.search(&unit(&[1.0, 0.0]), 10, &|_| true)).contains(&10));
        // Remove the last row too, then everything.
        assert!(idx.remove(12));
        assert!(idx.remove(11));
        assert!(idx.remove(13));
        assert!(idx.is_empty());
        assert!(idx.search(&unit(&[1.0, 0.0]), 3, &|_| true).is_empty());
    }

    #[test]
    fn insert_replaces_existing_id() {
        let mut idx = small();
        idx.insert(10, &unit(&[0.0, -1.0])).unwrap();
        assert_eq!(idx.len(), 4);
        let r = idx.search(&unit(&[0.0, -1.0]), 1, &|_| true);
        assert_eq!(r[0].0, 10);
    }

    #[test]
    fn refuses_bad_vectors_and_takes_dim_from_first_insert() {
        let mut idx = ExactIndex::new(0);
        assert_eq!(idx.iter().count(), 0);
        idx.insert(1, &[0.6, 0.8, 0.0]).unwrap();
        assert_eq!(idx.dim(), 3);
        assert!(idx.insert(2, &[1.0, 0.0]).is_err());
        assert!(idx.insert(3, &[f32::NAN, 0.0, 0.0]).is_err());
        assert!(idx.insert(4, &[f32::INFINITY, 0.0, 0.0]).is_err());
        assert_eq!(idx.len(), 1);
        // A non-finite query finds nothing rather than a meaningless ranking.
        assert!(idx.search(&[f32::NAN, 0.0, 0.0], 1, &|_| true).is_empty());
    }

    #[test]
    #[should_panic(expected = "query has 2 dimensions")]
    fn wrong_query_dimension_panics() {
        let mut idx = ExactIndex::new(3);
        idx.insert(1, &[1.0, 0.0, 0.0]).unwrap();
        idx.search(&[1.0, 0.0], 1, &|_| true);
    }

    #[test]
    fn matches_brute_force_on_clustered_data() {
        let vecs = testdata::clustered(3, 2000, 48, 20, 0.1);
        let data: Vec<(u64, Vec<f32>)> = vecs
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as u64 * 3, v))
            .collect();
        let mut idx = ExactIndex::with_capacity(48, data.len());
        idx.extend(data.iter().map(|(id, v)| (*id, v))).unwrap();
        let queries = testdata::clustered(4, 20, 48, 20, 0.1);
        for q in &queries {
            let got = idx.search(q, 10, &|_| true);
            let want = testdata::brute_force(&data, q, 10);
            assert_eq!(got.len(), 10);
            // Compare scores, not ids: two rows whose scores differ by float rounding may
            // legitimately swap places between summation orders.
            for ((_, score), want_id) in got.iter().zip(&want) {
                let want_score: f32 = idx
                    .get(*want_id)
                    .unwrap()
                    .iter()
                    .zip(q)
                    .map(|(a, b)| a * b)
                    .sum();
                assert!((score - want_score).abs() < 1e-5);
            }
        }
    }
}
