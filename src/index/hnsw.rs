//! hora 0.1.1's HNSW graph behind [`VectorIndex`], with crash-safe persistence.
//!
//! What this wrapper works around (hora facts from stack.md, confirmed in its source):
//! - hora's `ef_search` is fixed at creation, but its layer-0 beam is `max(ef_search, k)`.
//!   The graph is created with `ef_search = 1` and every search asks hora for
//!   `max(k, ef)` results, so the beam width is a run-time setting here
//!   ([`HnswIndex::set_ef_search`]).
//! - No delete, and items added after `build()` are invisible until the next `build()`: the
//!   graph is built once from a complete list and never mutated; [`super::CollectionIndex`]
//!   handles later changes around it.
//! - `dump`/`load` panic on I/O errors and `load` panics on a malformed file: both run under
//!   `catch_unwind` on paths this module controls, and a checksum is verified before hora
//!   ever parses a file, so a corrupt file is an `io::Error`, not a panic (nor, worse, a
//!   graph with out-of-range neighbour ids that would panic later, in a search).
//! - hora 0.1.1's `Metric::DotProduct` ranks the *least* similar first (its `dot` helper
//!   already negates, and the metric negates again) and `Metric::CosineSimilarity` takes the
//!   square root of a negative number. The graph uses `Metric::Euclidean` (squared L2),
//!   which for unit vectors orders exactly like cosine: d² = 2 − 2·cos.
//! - hora 0.1.1's upper-layer descent never moves (it re-measures the current node instead
//!   of the neighbour, `search_knn` in `hnsw_idx.rs`), so every search starts its layer-0
//!   beam at the first inserted node. The beam still finds its way on clustered data (see
//!   the measurements in the module docs), at the cost of some extra hops.
//! - `dump` leaves a full serialisation copy of the graph inside the index; [`HnswIndex::save`]
//!   reloads the written file and swaps it in, which drops that copy and proves the file
//!   readable.

use std::fs::File;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock};

use hora::core::ann_index::{ANNIndex, SerializableIndex};
use hora::core::metrics::Metric;
use hora::index::hnsw_idx::HNSWIndex;
use hora::index::hnsw_params::HNSWParams;

use super::persist::{self, invalid_data};
use super::{GraphKind, IndexError, VectorIndex, check_vector, query_usable};

/// How far a filtered search widens its beam (as a multiple of `max(k, ef)`) before giving up
/// and returning fewer than `k` results.
const WIDEN_LIMIT: usize = 16;

/// HNSW construction and search settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HnswParams {
    /// Links per node on the upper layers (layer 0 gets `2 * m`).
    pub m: usize,
    /// Beam width while inserting: higher builds a better graph, proportionally slower.
    pub ef_construction: usize,
    /// Beam width while searching (at least `k`): recall versus latency.
    pub ef_search: usize,
}

impl Default for HnswParams {
    /// M = 16, ef_construction = 200, ef_search = 256: the smallest beam measured to keep
    /// recall@10 ≥ 0.95 at one million vectors (0.964, p99 3.7 ms with USearch; see the module
    /// docs). Smaller collections get near-perfect recall from it for a millisecond or two.
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 200,
            ef_search: 256,
        }
    }
}

/// An immutable HNSW graph over (id, vector) pairs, built in one go.
pub struct HnswIndex {
    dim: usize,
    m: usize,
    ef_construction: usize,
    ef_search: AtomicUsize,
    /// Sorted, for [`HnswIndex::contains`]; hora keeps no id → node map.
    ids: Vec<u64>,
    /// A lock only because hora's `dump` takes `&mut self`: searches share the read side.
    inner: RwLock<HNSWIndex<f32, u64>>,
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex")
            .field("dim", &self.dim)
            .field("len", &self.ids.len())
            .field("params", &self.params())
            .finish()
    }
}

impl HnswIndex {
    /// Builds the graph from every item (duplicate ids: the last one wins). Slow — minutes
    /// for tens of thousands of 384-dim vectors, using every core through rayon — so call it
    /// off the request path.
    pub fn build<I>(dim: usize, items: I, params: HnswParams) -> Result<HnswIndex, IndexError>
    where
        I: IntoIterator<Item = (u64, Vec<f32>)>,
    {
        if params.m < 2 || params.ef_construction == 0 {
            return Err(IndexError::Build(format!(
                "invalid parameters {params:?}: m must be ≥ 2 and ef_construction ≥ 1"
            )));
        }
        let mut items: Vec<(u64, Vec<f32>)> = items.into_iter().collect();
        for (_, v) in &items {
            check_vector(dim, v)?;
        }
        // Stable sort of the reversed list puts the last occurrence of each id first.
        items.reverse();
        items.sort_by_key(|(id, _)| *id);
        items.dedup_by_key(|(id, _)| *id);

        let hora_params = HNSWParams::<f32>::default()
            .max_item(items.len().max(1))
            .n_neighbor(params.m)
            .n_neighbor0(2 * params.m)
            .ef_build(params.ef_construction)
            // The beam is chosen per search through k (see the file header).
            .ef_search(1)
            .has_deletion(false);
        let mut inner = HNSWIndex::<f32, u64>::new(dim, &hora_params);
        let mut ids = Vec::with_capacity(items.len());
        for (id, v) in items {
            inner
                .add(&v, id)
                .map_err(|e| IndexError::Build(e.to_string()))?;
            ids.push(id);
        }
        match catch_unwind(AssertUnwindSafe(|| inner.build(Metric::Euclidean))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(IndexError::Build(e.to_string())),
            Err(panic) => return Err(IndexError::Build(panic_message(&*panic))),
        }
        Ok(HnswIndex {
            dim,
            m: params.m,
            ef_construction: params.ef_construction,
            ef_search: AtomicUsize::new(params.ef_search),
            ids,
            inner: RwLock::new(inner),
        })
    }

    /// Vector length.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The construction parameters and the current search beam.
    pub fn params(&self) -> HnswParams {
        HnswParams {
            m: self.m,
            ef_construction: self.ef_construction,
            ef_search: self.ef_search.load(Ordering::Relaxed),
        }
    }

    /// Changes the search beam width (takes effect for the next search).
    pub fn set_ef_search(&self, ef: usize) {
        self.ef_search.store(ef, Ordering::Relaxed);
    }

    /// True if the graph holds `id`.
    pub fn contains(&self, id: u64) -> bool {
        self.ids.binary_search(&id).is_ok()
    }

    /// Every id in the graph, ascending.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// hora's approximate best `n`, unfiltered, best first, with a layer-0 beam of `n`.
    ///
    /// # Panics
    ///
    /// If `query.len()` is not the graph's dimension.
    pub fn candidates(&self, query: &[f32], n: usize) -> Vec<(u64, f32)> {
        if self.ids.is_empty() || n == 0 || !query_usable(self.dim, query) {
            return Vec::new();
        }
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner
            .search_nodes(query, n)
            .into_iter()
            // Squared L2 distance of unit vectors: d² = 2 - 2·cos.
            .filter_map(|(node, d2)| node.idx().map(|id| (id, 1.0 - d2 / 2.0)))
            .collect()
    }

    /// Approximate heap bytes: hora's nodes (a boxed copy of every vector), its neighbour
    /// lists (2M slots on layer 0, on average one upper layer of M slots per node with its
    /// level-promotion probability of 1/2) and the id list.
    pub fn memory_bytes(&self) -> usize {
        // Per node: Box<Node> (40) + its vector + pointer in _nodes (8); layer 0: a
        // RwLock<Vec> (32) + 2M usizes; upper layers: the Vec of them (24) + one
        // RwLock<Vec> (32) + M usizes; level (8); our id (8); ~16 bytes of malloc overhead
        // for each of the ~5 allocations.
        let per_node = 40 + self.dim * 4 + 8 + 32 + 16 * self.m + 24 + 32 + 8 * self.m + 16 + 80;
        self.ids.len() * per_node
    }

    /// What a save of this graph declares (see [`super::persist`]).
    fn meta(&self) -> persist::Meta {
        persist::Meta {
            kind: GraphKind::Hora,
            dim: self.dim,
            params: self.params(),
            ids: self.ids.clone(),
        }
    }

    /// Writes the graph under `path` so that a crash at any point leaves either the previous
    /// save or this one loadable (see [`super::persist`]).
    ///
    /// Searches on this graph wait while it saves (hora's `dump` needs exclusive access), so
    /// save a freshly built graph before installing it.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        persist::save(path, &self.meta(), |tmp| {
            let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
            let p = persist::path_str(tmp)?;
            match catch_unwind(AssertUnwindSafe(|| inner.dump(p))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(io::Error::other(format!("hora dump: {e}"))),
                Err(panic) => {
                    return Err(io::Error::other(format!(
                        "hora dump panicked: {}",
                        panic_message(&*panic)
                    )));
                }
            }
            // Swapping in the reloaded graph frees the copy `dump` left behind.
            *inner = load_hora(tmp)?;
            Ok(())
        })
    }

    /// Loads a graph saved by [`HnswIndex::save`]. A missing, truncated or corrupt file is an
    /// error (never a panic).
    pub fn load(path: &Path) -> io::Result<HnswIndex> {
        let (meta, graph_path) = persist::open(path, GraphKind::Hora)?;
        let inner = load_hora(&graph_path)?;
        if inner.dimension() != meta.dim {
            return Err(invalid_data("graph dimension does not match its header"));
        }
        Ok(HnswIndex {
            dim: meta.dim,
            m: meta.params.m,
            ef_construction: meta.params.ef_construction,
            ef_search: AtomicUsize::new(meta.params.ef_search),
            ids: meta.ids,
            inner: RwLock::new(inner),
        })
    }
}

impl VectorIndex for HnswIndex {
    /// Post-filters hora's candidates; when `allow` rejects too many of them the beam widens
    /// (×4 per round, up to 16 × `max(k, ef)`), so a search may return fewer than `k` hits
    /// when allowed ids are rare (see the module docs on one index per collection).
    fn search(&self, query: &[f32], k: usize, allow: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)> {
        if self.ids.is_empty() || k == 0 || !query_usable(self.dim, query) {
            return Vec::new();
        }
        let base = k.max(self.ef_search.load(Ordering::Relaxed));
        let limit = (base * WIDEN_LIMIT).min(self.ids.len());
        let mut n = base.min(self.ids.len());
        loop {
            let candidates = self.candidates(query, n);
            let exhausted = n >= limit || candidates.len() < n;
            let hits: Vec<(u64, f32)> = candidates
                .into_iter()
                .filter(|(id, _)| allow(*id))
                .take(k)
                .collect();
            if hits.len() >= k || exhausted {
                return hits;
            }
            n = (n * 4).min(limit);
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// hora's `load`, which panics on a missing or malformed file, as an `io::Result`.
fn load_hora(path: &Path) -> io::Result<HNSWIndex<f32, u64>> {
    let p = persist::path_str(path)?;
    // hora opens the file with a panic on failure: report a missing file as NotFound.
    File::open(path)?;
    match catch_unwind(|| HNSWIndex::<f32, u64>::load(p)) {
        Ok(Ok(index)) => Ok(index),
        Ok(Err(e)) => Err(invalid_data(format!("hora load: {e}"))),
        Err(panic) => Err(invalid_data(format!(
            "hora load panicked: {}",
            panic_message(&*panic)
        ))),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{ExactIndex, testdata};
    use std::fs;
    use std::path::PathBuf;

    /// Small but clustered: debug builds run hora unoptimised, so tests use 32 dimensions.
    const DIM: usize = 32;

    fn items(seed: u64, n: usize) -> Vec<(u64, Vec<f32>)> {
        testdata::keyed(seed, n, DIM, 50, 0.12, (1000, 7))
    }

    fn params() -> HnswParams {
        HnswParams {
            m: 16,
            ef_construction: 100,
            ef_search: 64,
        }
    }

    fn recall_at_10(graph: &HnswIndex, data: &[(u64, Vec<f32>)], queries: &[Vec<f32>]) -> f64 {
        let mut exact = ExactIndex::new(DIM);
        exact.extend(data.iter().map(|(id, v)| (*id, v))).unwrap();
        let mut found = 0;
        for q in queries {
            let truth: Vec<u64> = exact.search(q, 10, &|_| true).iter().map(|r| r.0).collect();
            let got = graph.search(q, 10, &|_| true);
            found += got.iter().filter(|(id, _)| truth.contains(id)).count();
        }
        found as f64 / (10 * queries.len()) as f64
    }

    #[test]
    fn recall_on_clustered_data() {
        let data = items(1, 5000);
        let graph = HnswIndex::build(DIM, data.clone(), params()).unwrap();
        assert_eq!(graph.len(), 5000);
        let queries = testdata::clustered(2, 100, DIM, 50, 0.12);
        let recall = recall_at_10(&graph, &data, &queries);
        assert!(recall >= 0.9, "recall@10 = {recall}");
        // Scores are cosines, best first.
        let r = graph.search(&data[0].1, 10, &|_| true);
        assert_eq!(r[0].0, data[0].0);
        assert!((r[0].1 - 1.0).abs() < 1e-5);
        assert!(r.windows(2).all(|w| w[0].1 >= w[1].1));
        // A filter is honoured (and widening still fills k when half the ids are allowed).
        let r = graph.search(&queries[0], 10, &|id| id % 2 == 0);
        assert_eq!(r.len(), 10);
        assert!(r.iter().all(|(id, _)| id % 2 == 0));
    }

    #[test]
    fn duplicates_keep_the_last_vector_and_bad_input_is_refused() {
        let mut data = items(3, 50);
        let replacement = data[1].1.clone();
        data.push((data[0].0, replacement.clone()));
        let graph = HnswIndex::build(DIM, data.clone(), params()).unwrap();
        assert_eq!(graph.len(), 50);
        let top = graph.search(&replacement, 2, &|_| true);
        assert!(top.iter().all(|(_, s)| (s - 1.0).abs() < 1e-5));
        assert!(matches!(
            HnswIndex::build(DIM, vec![(1, vec![0.0; DIM - 1])], params()),
            Err(IndexError::WrongDimension { .. })
        ));
        assert!(matches!(
            HnswIndex::build(DIM, vec![(1, vec![f32::NAN; DIM])], params()),
            Err(IndexError::NonFinite)
        ));
        let bad = HnswParams { m: 0, ..params() };
        assert!(HnswIndex::build(DIM, data, bad).is_err());
    }

    #[test]
    fn empty_graph_searches_saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let graph = HnswIndex::build(DIM, Vec::new(), params()).unwrap();
        assert!(graph.is_empty());
        assert!(graph.search(&[0.1; DIM], 5, &|_| true).is_empty());
        let path = dir.path().join("empty.hnsw");
        graph.save(&path).unwrap();
        let loaded = HnswIndex::load(&path).unwrap();
        assert!(loaded.is_empty());
        assert!(loaded.search(&[0.1; DIM], 5, &|_| true).is_empty());
    }

    #[test]
    fn save_load_round_trip_gives_identical_results() {
        let dir = tempfile::tempdir().unwrap();
        let data = items(5, 800);
        let graph = HnswIndex::build(DIM, data, params()).unwrap();
        graph.set_ef_search(40);
        let queries = testdata::clustered(6, 30, DIM, 50, 0.12);
        let before: Vec<_> = queries
            .iter()
            .map(|q| graph.search(q, 10, &|_| true))
            .collect();
        let path = dir.path().join("kb.hnsw");
        graph.save(&path).unwrap();
        // save swapped in the reloaded graph: results must not change for the saver either.
        let after_save: Vec<_> = queries
            .iter()
            .map(|q| graph.search(q, 10, &|_| true))
            .collect();
        assert_eq!(before, after_save);
        let loaded = HnswIndex::load(&path).unwrap();
        assert_eq!(loaded.params(), graph.params());
        assert_eq!(loaded.ids(), graph.ids());
        let after_load: Vec<_> = queries
            .iter()
            .map(|q| loaded.search(q, 10, &|_| true))
            .collect();
        assert_eq!(before, after_load);

        // A second save replaces the first and removes its graph file.
        graph.save(&path).unwrap();
        let graphs = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".graph")
            })
            .count();
        assert_eq!(graphs, 1);
        assert_eq!(HnswIndex::load(&path).unwrap().ids(), graph.ids());
    }

    fn graph_file(dir: &Path) -> PathBuf {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "graph"))
            .unwrap()
    }

    #[test]
    fn missing_or_corrupt_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kb.hnsw");
        let err = HnswIndex::load(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);

        let graph = HnswIndex::build(DIM, items(7, 200), params()).unwrap();
        graph.save(&path).unwrap();

        // Flipped byte in the graph file.
        let gpath = graph_file(dir.path());
        let original = fs::read(&gpath).unwrap();
        let mut flipped = original.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        fs::write(&gpath, &flipped).unwrap();
        assert_eq!(
            HnswIndex::load(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // Truncated graph file.
        fs::write(&gpath, &original[..original.len() / 3]).unwrap();
        assert_eq!(
            HnswIndex::load(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // Graph file gone.
        fs::remove_file(&gpath).unwrap();
        assert_eq!(
            HnswIndex::load(&path).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        fs::write(&gpath, &original).unwrap();
        assert!(HnswIndex::load(&path).is_ok());

        // Corrupt and truncated headers, and a file that is not a header at all.
        let header = fs::read(&path).unwrap();
        let mut bad = header.clone();
        bad[20] ^= 1;
        fs::write(&path, &bad).unwrap();
        assert_eq!(
            HnswIndex::load(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        fs::write(&path, &header[..header.len() - 3]).unwrap();
        assert!(HnswIndex::load(&path).is_err());
        fs::write(&path, b"").unwrap();
        assert!(HnswIndex::load(&path).is_err());

        // Garbage handed straight to hora: its panic becomes an error.
        let junk = dir.path().join("junk.graph");
        fs::write(&junk, [0xffu8; 100]).unwrap();
        assert!(load_hora(&junk).is_err());
    }

    #[test]
    fn save_into_missing_directory_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let graph = HnswIndex::build(DIM, items(8, 20), params()).unwrap();
        let path = dir.path().join("no/such/dir/kb.hnsw");
        assert!(graph.save(&path).is_err());
        // The graph still works after a failed save.
        assert_eq!(
            graph.search(&items(8, 20)[3].1, 1, &|_| true)[0].0,
            items(8, 20)[3].0
        );
    }
}
