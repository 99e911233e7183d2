//! One collection's index: exact search while small, an HNSW graph plus an exact "pending"
//! side once large.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{ExactIndex, Graph, GraphKind, HnswParams, IndexError, VectorIndex, merge_top};

/// Collections smaller than this are searched exactly (see the module docs for the
/// measurements behind the number).
pub const DEFAULT_EXACT_THRESHOLD: usize = 20_000;

/// A collection's vectors, searchable while they change.
///
/// Below `threshold` vectors every search is exact. At or above it,
/// [`CollectionIndex::needs_rebuild`] asks for an HNSW graph, which the caller builds off
/// the request path ([`CollectionIndex::snapshot_for_build`], [`GraphSnapshot::build`],
/// [`CollectionIndex::install_graph`]). With a graph installed, a search merges
///
/// - the graph's hits, minus ids removed or replaced since its snapshot ("stale"), and
/// - an exact search over the items inserted since the snapshot ("pending"),
///
/// so an insert is searchable and a removal invisible immediately, whatever the graph's
/// age. Every change bumps a generation counter; each snapshot records the generation it
/// was taken at (its epoch), which is how an install tells what changed during the build.
#[derive(Debug)]
pub struct CollectionIndex {
    threshold: usize,
    kind: GraphKind,
    params: HnswParams,
    /// Every live vector: exact search while small, snapshots, and the fallback for filters
    /// too selective for the graph.
    all: ExactIndex,
    /// id → generation of its latest insert.
    generation: HashMap<u64, u64>,
    /// The generation the next insert gets.
    next_generation: u64,
    graph: Option<Arc<Graph>>,
    /// The epoch of the installed graph's snapshot.
    graph_epoch: u64,
    /// Live items the graph does not have (or has with an outdated vector).
    pending: ExactIndex,
    /// Graph ids that were removed or replaced: filtered out of graph results.
    stale: HashSet<u64>,
}

impl CollectionIndex {
    /// An empty collection of `dim`-component vectors (0: taken from the first insert),
    /// searched exactly below `threshold` vectors, with a graph of `kind` and the default
    /// HNSW parameters above.
    pub fn new(dim: usize, threshold: usize, kind: GraphKind) -> CollectionIndex {
        Self::with_params(dim, threshold, kind, HnswParams::default())
    }

    /// Like [`CollectionIndex::new`], with explicit HNSW parameters.
    pub fn with_params(
        dim: usize,
        threshold: usize,
        kind: GraphKind,
        params: HnswParams,
    ) -> CollectionIndex {
        CollectionIndex {
            threshold,
            kind,
            params,
            all: ExactIndex::new(dim),
            generation: HashMap::new(),
            next_generation: 0,
            graph: None,
            graph_epoch: 0,
            pending: ExactIndex::new(dim),
            stale: HashSet::new(),
        }
    }

    /// Vector length (0 until known).
    pub fn dim(&self) -> usize {
        self.all.dim()
    }

    /// The size from which the collection wants a graph.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Adds or replaces `id`'s vector; it is searchable as soon as this returns.
    pub fn insert(&mut self, id: u64, v: &[f32]) -> Result<(), IndexError> {
        self.all.insert(id, v)?;
        self.generation.insert(id, self.next_generation);
        self.next_generation += 1;
        if let Some(graph) = &self.graph {
            self.pending.insert(id, v)?;
            if graph.contains(id) {
                self.stale.insert(id);
            }
        }
        Ok(())
    }

    /// Removes `id`; false if it was not there. It is never returned after this.
    pub fn remove(&mut self, id: u64) -> bool {
        if !self.all.remove(id) {
            return false;
        }
        self.generation.remove(&id);
        if let Some(graph) = &self.graph {
            self.pending.remove(id);
            if graph.contains(id) {
                self.stale.insert(id);
            }
            // Well below the threshold exact search is faster, and the graph is dead weight.
            // Half, not the threshold itself, so a collection hovering around it does not
            // pay for a build each time it crosses.
            if self.all.len() < self.threshold / 2 {
                self.drop_graph();
            }
        }
        true
    }

    /// True if `id` is stored.
    pub fn contains(&self, id: u64) -> bool {
        self.all.contains(id)
    }

    /// True when a (re)build would pay off: at or above the threshold with no graph, or a
    /// graph that misses more than 10% of its size in new items, or carries more than 10%
    /// removed/replaced ones (each costs an exact scan or wasted beam slots per search).
    pub fn needs_rebuild(&self) -> bool {
        if self.all.len() < self.threshold {
            return false;
        }
        match &self.graph {
            None => true,
            Some(g) => self.pending.len() * 10 > g.len() || self.stale.len() * 10 > g.len(),
        }
    }

    /// Copies every live vector for a build on another thread; changes made after this are
    /// reconciled by [`CollectionIndex::install_graph`].
    pub fn snapshot_for_build(&self) -> GraphSnapshot {
        GraphSnapshot {
            dim: self.all.dim(),
            kind: self.kind,
            params: self.params,
            epoch: self.next_generation,
            items: self.all.iter().map(|(id, v)| (id, v.to_vec())).collect(),
        }
    }

    /// Swaps in a graph built from [`CollectionIndex::snapshot_for_build`]. Items inserted
    /// or removed since that snapshot stay correct (pending and stale sets are recomputed).
    /// Returns false, leaving everything as it was, if the graph is older than the installed
    /// one, does not belong to this collection (dimension, kind or epoch out of range), or is
    /// no longer wanted (the collection shrank below half the threshold during the build).
    pub fn install_graph(&mut self, built: BuiltGraph) -> bool {
        let BuiltGraph { graph, epoch } = built;
        let older = self.graph.is_some() && epoch < self.graph_epoch;
        let foreign = epoch > self.next_generation
            || graph.kind() != self.kind
            || (graph.dim() != self.all.dim() && !graph.is_empty());
        let unwanted = self.all.len() < self.threshold / 2;
        if older || foreign || unwanted {
            return false;
        }
        let current = |id: &u64| self.generation.get(id).is_some_and(|g| *g < epoch);
        let stale: HashSet<u64> = graph
            .ids()
            .iter()
            .copied()
            .filter(|id| !current(id))
            .collect();
        let mut pending = ExactIndex::new(self.all.dim());
        for (id, v) in self.all.iter() {
            if !current(&id) || !graph.contains(id) {
                pending.insert(id, v).expect("vector already validated");
            }
        }
        self.graph = Some(Arc::new(graph));
        self.graph_epoch = epoch;
        self.pending = pending;
        self.stale = stale;
        true
    }

    /// Installs a graph loaded from disk as if built from the current contents: its ids
    /// that are gone are filtered out, live ids it lacks are searched exactly beside it.
    ///
    /// Only correct when every id the graph holds that is still live has the vector it was
    /// built with. Chunk ids are never reused and a chunk's vector never changes (a
    /// re-embedded file gets new chunk ids), which makes that true for ids from one store.
    pub fn install_loaded_graph(&mut self, graph: Graph) -> bool {
        let epoch = self.next_generation;
        self.install_graph(BuiltGraph { graph, epoch })
    }

    /// The installed graph, e.g. to save it.
    pub fn graph(&self) -> Option<Arc<Graph>> {
        self.graph.clone()
    }

    /// Items searched exactly beside the graph (0 without a graph).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Graph ids filtered out because they were removed or replaced (0 without a graph).
    pub fn stale_len(&self) -> usize {
        self.stale.len()
    }

    fn drop_graph(&mut self) {
        self.graph = None;
        self.pending.clear();
        self.stale.clear();
    }
}

impl VectorIndex for CollectionIndex {
    fn search(&self, query: &[f32], k: usize, allow: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)> {
        let Some(graph) = &self.graph else {
            return self.all.search(query, k, allow);
        };
        let stale = &self.stale;
        let from_graph = graph.search(query, k, &|id| !stale.contains(&id) && allow(id));
        // Fewer than k hits while the graph holds more live items means the filter rejected
        // most of the beam; only a full scan can tell what the best allowed items are.
        let live_in_graph = graph.len() - stale.len();
        if from_graph.len() < k && live_in_graph > from_graph.len() {
            return self.all.search(query, k, allow);
        }
        let from_pending = self.pending.search(query, k, allow);
        merge_top([from_graph, from_pending], k)
    }

    fn len(&self) -> usize {
        self.all.len()
    }
}

/// Every live vector of a collection at one moment, ready to be built into a graph on any
/// thread.
#[derive(Debug, Clone)]
pub struct GraphSnapshot {
    dim: usize,
    kind: GraphKind,
    params: HnswParams,
    epoch: u64,
    items: Vec<(u64, Vec<f32>)>,
}

impl GraphSnapshot {
    /// Number of vectors to build from.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there is nothing to build.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The collection's generation when the snapshot was taken.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Builds the HNSW graph (slow: run it off the request path).
    pub fn build(self) -> Result<BuiltGraph, IndexError> {
        let graph = Graph::build(self.kind, self.dim, self.items, self.params)?;
        Ok(BuiltGraph {
            graph,
            epoch: self.epoch,
        })
    }
}

/// A graph and the epoch of the snapshot it was built from, for
/// [`CollectionIndex::install_graph`].
#[derive(Debug)]
pub struct BuiltGraph {
    graph: Graph,
    epoch: u64,
}

impl BuiltGraph {
    /// The graph, e.g. to save it before installing.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The epoch of the snapshot it was built from.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testdata;

    const DIM: usize = 24;
    const KINDS: [GraphKind; 2] = [GraphKind::Usearch, GraphKind::Hora];

    fn params() -> HnswParams {
        HnswParams {
            m: 8,
            ef_construction: 60,
            ef_search: 50,
        }
    }

    fn vectors(seed: u64, n: usize) -> Vec<Vec<f32>> {
        testdata::clustered(seed, n, DIM, 20, 0.15)
    }

    #[test]
    fn indexes_are_shareable_between_threads() {
        fn is<T: Send + Sync>() {}
        is::<CollectionIndex>();
        is::<Graph>();
        is::<ExactIndex>();
        is::<GraphSnapshot>();
        is::<BuiltGraph>();
    }

    fn ids(r: &[(u64, f32)]) -> Vec<u64> {
        r.iter().map(|(id, _)| *id).collect()
    }

    fn build_and_install(c: &mut CollectionIndex) {
        let built = c.snapshot_for_build().build().unwrap();
        assert!(c.install_graph(built));
    }

    #[test]
    fn below_threshold_is_exact_and_wants_no_graph() {
        for kind in KINDS {
            let mut c = CollectionIndex::with_params(DIM, 100, kind, params());
            let vs = vectors(1, 99);
            let mut exact = ExactIndex::new(DIM);
            for (i, v) in vs.iter().enumerate() {
                c.insert(i as u64, v).unwrap();
                exact.insert(i as u64, v).unwrap();
            }
            assert!(!c.needs_rebuild());
            assert!(c.graph().is_none());
            for q in vectors(2, 10) {
                assert_eq!(c.search(&q, 5, &|_| true), exact.search(&q, 5, &|_| true));
            }
            c.insert(99, &vs[0]).unwrap();
            assert!(c.needs_rebuild());
            // Still exact (and correct) until a graph arrives.
            assert_eq!(c.search(&vs[0], 2, &|_| true).len(), 2);
        }
    }

    #[test]
    fn graph_install_reconciles_changes_made_during_the_build() {
        for kind in KINDS {
            let mut c = CollectionIndex::with_params(0, 300, kind, params());
            let vs = vectors(3, 600);
            for (i, v) in vs[..400].iter().enumerate() {
                c.insert(i as u64, v).unwrap();
            }
            assert_eq!(c.dim(), DIM);
            assert!(c.needs_rebuild());
            let snapshot = c.snapshot_for_build();
            assert_eq!(snapshot.len(), 400);

            // While the "background" build runs: new items, removals, and an update.
            for (i, v) in vs[400..450].iter().enumerate() {
                c.insert(400 + i as u64, v).unwrap();
            }
            for id in [3, 17, 42, 410] {
                assert!(c.remove(id));
            }
            c.insert(5, &vs[599]).unwrap();

            let built = snapshot.build().unwrap();
            assert!(c.install_graph(built));
            assert!(c.graph().is_some());
            assert_eq!(c.len(), 446);
            // Pending: 49 surviving new items + the updated id 5.
            assert_eq!(c.pending_len(), 50);
            // Stale: the 3 removed graph ids + the replaced id 5.
            assert_eq!(c.stale_len(), 4);

            // Items inserted after the snapshot are found by their own vector.
            for i in [400u64, 425, 449] {
                let r = c.search(&vs[i as usize], 1, &|_| true);
                assert_eq!(r[0].0, i);
                assert!((r[0].1 - 1.0).abs() < 1e-5);
            }
            // The updated item is found under its new vector and scored with it.
            let r = c.search(&vs[599], 3, &|_| true);
            assert_eq!(r[0].0, 5);
            assert!((r[0].1 - 1.0).abs() < 1e-5);
            assert_eq!(ids(&r).iter().filter(|&&id| id == 5).count(), 1);

            // Removed items never come back, even when asked for by their own vector.
            for id in [3u64, 17, 42, 410] {
                let r = c.search(&vs[id as usize], 50, &|_| true);
                assert!(!ids(&r).contains(&id), "removed {id} returned");
            }
            // Removing graph items after install: also never returned.
            assert!(c.remove(100));
            assert!(c.remove(401));
            for id in [100u64, 401] {
                assert!(!ids(&c.search(&vs[id as usize], 50, &|_| true)).contains(&id));
            }
            assert!(!c.remove(100));
        }
    }

    #[test]
    fn graph_results_match_exact_closely_and_honour_filters() {
        for kind in KINDS {
            let mut c = CollectionIndex::with_params(DIM, 200, kind, params());
            let vs = vectors(4, 500);
            for (i, v) in vs.iter().enumerate() {
                c.insert(i as u64, v).unwrap();
            }
            build_and_install(&mut c);
            assert_eq!(c.pending_len(), 0);
            let mut exact = ExactIndex::new(DIM);
            exact
                .extend(vs.iter().enumerate().map(|(i, v)| (i as u64, v)))
                .unwrap();
            let mut found = 0;
            let queries = vectors(5, 20);
            for q in &queries {
                let truth = ids(&exact.search(q, 10, &|_| true));
                found += ids(&c.search(q, 10, &|_| true))
                    .iter()
                    .filter(|id| truth.contains(id))
                    .count();
            }
            assert!(found >= 180, "recall {found}/200");

            // A filter that allows 3 items: the graph's beam cannot be trusted to hold them, the
            // exact fallback must return exactly those 3, best first.
            let allowed = [7u64, 250, 499];
            let r = c.search(&queries[0], 10, &|id| allowed.contains(&id));
            assert_eq!(
                r,
                exact.search(&queries[0], 10, &|id| allowed.contains(&id))
            );
            assert_eq!(r.len(), 3);
        }
    }

    #[test]
    fn rebuild_triggers_and_stale_installs() {
        for kind in KINDS {
            let mut c = CollectionIndex::with_params(DIM, 100, kind, params());
            let vs = vectors(6, 400);
            for (i, v) in vs[..200].iter().enumerate() {
                c.insert(i as u64, v).unwrap();
            }
            let old = c.snapshot_for_build();
            build_and_install(&mut c);
            assert!(!c.needs_rebuild());
            // 21 new items > 10% of a 200-item graph.
            for (i, v) in vs[200..221].iter().enumerate() {
                c.insert(200 + i as u64, v).unwrap();
            }
            assert!(c.needs_rebuild());
            build_and_install(&mut c);
            assert!(!c.needs_rebuild());
            // A graph from an older snapshot is refused and changes nothing.
            assert!(!c.install_graph(old.build().unwrap()));
            assert_eq!(c.graph().unwrap().len(), 221);
            // 23 removals > 10% of 221.
            for id in 0..23 {
                c.remove(id);
            }
            assert!(c.needs_rebuild());
            // A graph of another dimension is refused.
            let foreign =
                Graph::build(kind, DIM + 1, vec![(1, vec![0.1; DIM + 1])], params()).unwrap();
            assert!(!c.install_loaded_graph(foreign));
            // So is a graph of the other library.
            let other = if kind == GraphKind::Hora {
                GraphKind::Usearch
            } else {
                GraphKind::Hora
            };
            let foreign = Graph::build(other, DIM, vec![(1, vs[1].clone())], params()).unwrap();
            assert!(!c.install_loaded_graph(foreign));
            assert_eq!(c.graph().unwrap().dim(), DIM);
        }
    }

    #[test]
    fn shrinking_well_below_threshold_drops_the_graph() {
        for kind in KINDS {
            let mut c = CollectionIndex::with_params(DIM, 100, kind, params());
            let vs = vectors(7, 120);
            for (i, v) in vs.iter().enumerate() {
                c.insert(i as u64, v).unwrap();
            }
            build_and_install(&mut c);
            for id in 0..70 {
                c.remove(id);
            }
            // 50 left: exactly half the threshold still keeps the graph.
            assert!(c.graph().is_some());
            let late = c.snapshot_for_build().build().unwrap();
            c.remove(70);
            assert!(c.graph().is_none());
            assert_eq!(c.pending_len(), 0);
            assert!(!c.needs_rebuild());
            let r = c.search(&vs[80], 1, &|_| true);
            assert_eq!(r[0].0, 80);
            // A build that finishes after the shrink is not installed.
            assert!(!c.install_graph(late));
            assert!(c.graph().is_none());
        }
    }

    #[test]
    fn loaded_graph_installs_as_current() {
        for kind in KINDS {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("kb.hnsw");
            let vs = vectors(8, 150);
            let mut c = CollectionIndex::with_params(DIM, 100, kind, params());
            for (i, v) in vs.iter().enumerate() {
                c.insert(i as u64, v).unwrap();
            }
            let built = c.snapshot_for_build().build().unwrap();
            built.graph().save(&path).unwrap();

            // "Restart": a fresh collection from the store, one item gone meanwhile.
            let mut fresh = CollectionIndex::with_params(DIM, 100, kind, params());
            for (i, v) in vs.iter().enumerate().skip(1) {
                fresh.insert(i as u64, v).unwrap();
            }
            assert!(fresh.install_loaded_graph(Graph::load(kind, &path).unwrap()));
            assert_eq!(fresh.pending_len(), 0);
            assert_eq!(fresh.stale_len(), 1);
            assert!(!ids(&fresh.search(&vs[0], 20, &|_| true)).contains(&0));
            assert_eq!(fresh.search(&vs[9], 1, &|_| true)[0].0, 9);
        }
    }
}
