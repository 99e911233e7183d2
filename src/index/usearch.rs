//! USearch's HNSW graph behind [`VectorIndex`], with the same crash-safe files as hora's.
//!
//! Built with `default-features = false`: its `numkong` SIMD kernels cost a ~6-minute C build
//! on two cores, and the portable kernels compiled at `-O3` are what the measurements in
//! the module docs used. Vectors are stored as F32 (USearch defaults to BF16, which would
//! change scores) under the inner-product metric, whose distance is `1 − dot`.
//!
//! USearch works on thread slots reserved up front: a search or insert that finds none free
//! fails instead of waiting. [`THREAD_SLOTS`] are reserved and a counting gate lets at most
//! that many searches in at once, so a burst waits briefly instead of failing.
//!
//! The filter closure is called from C++ through an `extern "C"` function, where a panic
//! aborts the process: filters passed here must not panic (the collection's are set
//! lookups).

use std::io;
use std::path::Path;
use std::sync::{Condvar, Mutex, PoisonError};

use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use super::persist::{self, invalid_data};
use super::{GraphKind, HnswParams, IndexError, VectorIndex, check_vector, query_usable};

/// Concurrent operations one graph serves before a search has to fall back.
pub const THREAD_SLOTS: usize = 64;

/// An HNSW graph over (id, vector) pairs, built in one go (in parallel) and never changed
/// afterwards: [`super::CollectionIndex`] keeps later changes beside it, as for hora.
pub struct UsearchIndex {
    dim: usize,
    params: HnswParams,
    /// Sorted, for [`UsearchIndex::ids`] (USearch cannot list its keys).
    ids: Vec<u64>,
    inner: Index,
    /// Free search slots (see the file header).
    free: Mutex<usize>,
    freed: Condvar,
}

impl std::fmt::Debug for UsearchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsearchIndex")
            .field("dim", &self.dim)
            .field("len", &self.ids.len())
            .field("params", &self.params)
            .finish()
    }
}

fn options(dim: usize, params: HnswParams) -> IndexOptions {
    IndexOptions {
        dimensions: dim,
        metric: MetricKind::IP,
        quantization: ScalarKind::F32,
        connectivity: params.m,
        expansion_add: params.ef_construction,
        expansion_search: params.ef_search,
        multi: false,
    }
}

fn build_error(e: impl std::fmt::Display) -> IndexError {
    IndexError::Build(format!("usearch: {e}"))
}

impl UsearchIndex {
    /// Builds the graph from every item (duplicate ids: the last one wins) on all cores.
    /// Seconds for tens of thousands of 384-dim vectors; still, call it off the request path.
    pub fn build<I>(dim: usize, items: I, params: HnswParams) -> Result<UsearchIndex, IndexError>
    where
        I: IntoIterator<Item = (u64, Vec<f32>)>,
    {
        if params.m < 2 || params.ef_construction == 0 || dim == 0 {
            return Err(IndexError::Build(format!(
                "invalid parameters {params:?} for {dim} dimensions: m must be ≥ 2, \
                 ef_construction ≥ 1, dimensions ≥ 1"
            )));
        }
        let mut items: Vec<(u64, Vec<f32>)> = items.into_iter().collect();
        for (_, v) in &items {
            check_vector(dim, v)?;
        }
        items.reverse();
        items.sort_by_key(|(id, _)| *id);
        items.dedup_by_key(|(id, _)| *id);
        let inner = Index::new(&options(dim, params)).map_err(build_error)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        inner
            .reserve_capacity_and_threads(items.len().max(1), THREAD_SLOTS.max(threads))
            .map_err(build_error)?;
        let chunk = items.len().div_ceil(threads).max(1);
        let failed = std::thread::scope(|s| {
            let workers: Vec<_> = items
                .chunks(chunk)
                .map(|part| {
                    let inner = &inner;
                    s.spawn(move || {
                        for (id, v) in part {
                            inner.add(*id, v.as_slice()).map_err(|e| e.to_string())?;
                        }
                        Ok::<(), String>(())
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join()).find_map(|r| match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("an insert thread panicked".to_string()),
            })
        });
        if let Some(e) = failed {
            return Err(build_error(e));
        }
        Ok(UsearchIndex {
            dim,
            params,
            ids: items.into_iter().map(|(id, _)| id).collect(),
            inner,
            free: Mutex::new(THREAD_SLOTS),
            freed: Condvar::new(),
        })
    }

    /// Vector length.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The construction parameters and the current search beam.
    pub fn params(&self) -> HnswParams {
        HnswParams {
            ef_search: self.inner.expansion_search(),
            ..self.params
        }
    }

    /// Changes the search beam width (takes effect for the next search). USearch stores it
    /// unsynchronised: call it while no search runs (benchmarks, set-up).
    pub fn set_ef_search(&self, ef: usize) {
        self.inner.change_expansion_search(ef);
    }

    /// True if the graph holds `id`.
    pub fn contains(&self, id: u64) -> bool {
        self.ids.binary_search(&id).is_ok()
    }

    /// Every id in the graph, ascending.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// Heap bytes held by USearch (vectors, links, thread contexts) plus the id list.
    pub fn memory_bytes(&self) -> usize {
        self.inner.memory_usage() + self.ids.len() * 8
    }

    /// Writes the graph under `path`, crash-safely (see [`super::persist`]).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let meta = persist::Meta {
            kind: GraphKind::Usearch,
            dim: self.dim,
            params: self.params(),
            ids: self.ids.clone(),
        };
        persist::save(path, &meta, |tmp| {
            self.inner
                .save(persist::path_str(tmp)?)
                .map_err(|e| io::Error::other(format!("usearch save: {e}")))
        })
    }

    /// Loads a graph saved by [`UsearchIndex::save`]; a missing, truncated or corrupt file
    /// is an error.
    pub fn load(path: &Path) -> io::Result<UsearchIndex> {
        let (meta, graph_path) = persist::open(path, GraphKind::Usearch)?;
        let inner = Index::new(&options(meta.dim, meta.params))
            .map_err(|e| io::Error::other(format!("usearch: {e}")))?;
        inner
            .load(persist::path_str(&graph_path)?)
            .map_err(|e| invalid_data(format!("usearch load: {e}")))?;
        let consistent = inner.dimensions() == meta.dim
            && inner.size() == meta.ids.len()
            && meta.ids.iter().all(|id| inner.contains(*id));
        if !consistent {
            return Err(invalid_data("usearch graph does not match its header"));
        }
        inner
            .reserve_capacity_and_threads(meta.ids.len().max(1), THREAD_SLOTS)
            .map_err(|e| io::Error::other(format!("usearch: {e}")))?;
        inner.change_expansion_search(meta.params.ef_search);
        Ok(UsearchIndex {
            dim: meta.dim,
            params: meta.params,
            ids: meta.ids,
            inner,
            free: Mutex::new(THREAD_SLOTS),
            freed: Condvar::new(),
        })
    }
}

impl VectorIndex for UsearchIndex {
    /// Filters inside the graph walk (USearch's filtered search), so a selective filter
    /// costs a longer walk rather than a lost result; still, it may return fewer than `k`.
    fn search(&self, query: &[f32], k: usize, allow: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)> {
        if self.ids.is_empty() || k == 0 || !query_usable(self.dim, query) {
            return Vec::new();
        }
        {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            while *free == 0 {
                free = self
                    .freed
                    .wait(free)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            *free -= 1;
        }
        let found = self.inner.filtered_search(query, k, allow);
        *self.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.freed.notify_one();
        match found {
            Ok(m) => {
                let mut hits: Vec<(u64, f32)> = m
                    .keys
                    .into_iter()
                    .zip(m.distances)
                    .map(|(id, d)| (id, 1.0 - d))
                    .collect();
                // Same order as every other index: score, then ascending id.
                hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                hits
            }
            Err(e) => {
                tracing::warn!(error = %e, "usearch search failed");
                Vec::new()
            }
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{ExactIndex, testdata};

    const DIM: usize = 32;

    fn items(seed: u64, n: usize) -> Vec<(u64, Vec<f32>)> {
        testdata::keyed(seed, n, DIM, 20, 0.15, (1, 3))
    }

    fn params() -> HnswParams {
        HnswParams {
            m: 12,
            ef_construction: 100,
            ef_search: 64,
        }
    }

    #[test]
    fn recall_and_scores_match_exact_search() {
        let data = items(1, 3000);
        let g = UsearchIndex::build(DIM, data.clone(), params()).unwrap();
        assert_eq!(g.len(), 3000);
        let mut exact = ExactIndex::new(DIM);
        exact
            .extend(data.iter().map(|(id, v)| (*id, v.as_slice())))
            .unwrap();
        let mut found = 0;
        for q in testdata::clustered(2, 50, DIM, 20, 0.2) {
            let truth = exact.search(&q, 10, &|_| true);
            let got = g.search(&q, 10, &|_| true);
            found += got
                .iter()
                .filter(|h| truth.iter().any(|t| t.0 == h.0))
                .count();
            // Scores are cosines (F32 storage, not BF16).
            for (id, score) in &got {
                let v = &data.iter().find(|(i, _)| i == id).unwrap().1;
                let cos: f32 = v.iter().zip(&q).map(|(a, b)| a * b).sum();
                assert!((cos - score).abs() < 1e-4, "{cos} vs {score}");
            }
            assert!(got.windows(2).all(|w| w[0].1 >= w[1].1));
        }
        // Queries from other centroids: the hard case; hora is held to the same 0.9.
        assert!(found >= 450, "recall {found}/500");
    }

    #[test]
    fn filters_apply_inside_the_walk() {
        let data = items(3, 2000);
        let g = UsearchIndex::build(DIM, data.clone(), params()).unwrap();
        let q = &data[10].1;
        let odd = |id: u64| id % 2 == 1;
        let r = g.search(q, 10, &odd);
        assert_eq!(r.len(), 10);
        assert!(r.iter().all(|(id, _)| odd(*id)));
        let none = g.search(q, 10, &|_| false);
        assert!(none.is_empty());
    }

    #[test]
    fn duplicates_keep_the_last_vector_and_bad_input_is_refused() {
        let data = items(4, 50);
        let mut with_dup = data.clone();
        with_dup.push((data[0].0, data[7].1.clone()));
        let g = UsearchIndex::build(DIM, with_dup, params()).unwrap();
        assert_eq!(g.len(), 50);
        let r = g.search(&data[7].1, 2, &|_| true);
        assert!(r.iter().all(|(_, s)| (s - 1.0).abs() < 1e-4));
        assert!(matches!(
            UsearchIndex::build(DIM, vec![(1, vec![0.0; DIM - 1])], params()),
            Err(IndexError::WrongDimension { .. })
        ));
        assert!(matches!(
            UsearchIndex::build(DIM, vec![(1, vec![f32::NAN; DIM])], params()),
            Err(IndexError::NonFinite)
        ));
        assert!(g.search(&[f32::NAN; DIM], 3, &|_| true).is_empty());
    }

    #[test]
    fn save_load_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kb.usearch");
        let data = items(5, 1500);
        let g = UsearchIndex::build(DIM, data.clone(), params()).unwrap();
        g.save(&path).unwrap();
        let back = UsearchIndex::load(&path).unwrap();
        assert_eq!(back.ids(), g.ids());
        assert_eq!(back.params(), g.params());
        for (_, q) in data.iter().step_by(97) {
            assert_eq!(back.search(q, 5, &|_| true), g.search(q, 5, &|_| true));
        }
        // Another kind's loader refuses it; a flipped byte in the graph is an error.
        assert!(crate::index::HnswIndex::load(&path).is_err());
        let graph = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "graph"))
            .unwrap();
        let mut bytes = std::fs::read(&graph).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x10;
        std::fs::write(&graph, bytes).unwrap();
        assert_eq!(
            UsearchIndex::load(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert!(UsearchIndex::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn concurrent_searches_beyond_the_slots_all_answer() {
        let data = items(6, 500);
        let g = UsearchIndex::build(DIM, data.clone(), params()).unwrap();
        // What each query finds alone; a search must find exactly that however many run at
        // once (the graph is fixed, so any difference would be shared state between them).
        let alone: Vec<Vec<(u64, f32)>> = data
            .iter()
            .map(|(_, q)| g.search(q, 5, &|_| true))
            .collect();
        assert!(alone.iter().all(|r| r.len() == 5));
        std::thread::scope(|s| {
            for t in 0..(THREAD_SLOTS + 16) {
                let (g, data, alone) = (&g, &data, &alone);
                s.spawn(move || {
                    for i in 0..50 {
                        let n = (t * 50 + i) % data.len();
                        assert_eq!(g.search(&data[n].1, 5, &|_| true), alone[n]);
                    }
                });
            }
        });
    }
}
