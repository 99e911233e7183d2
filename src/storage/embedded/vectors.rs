//! The in-memory search indexes, derived from redb (`vectors` and `terms` tables).
//!
//! Every processed file has its own exact vector index and BM25 index (a `file` item is
//! searched alone). Every knowledge collection has a [`CollectionIndex`] and a BM25 index
//! holding its files' chunks: adding a file to a collection copies its stored vectors and
//! term counts, it never re-embeds. Collections above the HNSW threshold get a graph built
//! off the request path, saved under the data dir (`index/{collection}.{kind}`) and loaded
//! from there at the next start instead of being rebuilt.
//!
//! A saved graph stays valid as its collection changes because chunk ids are never reused
//! and a chunk's vector never changes (re-embedding a file gives it new chunk ids): ids the
//! graph holds that are gone are filtered out, and chunks it lacks are searched exactly
//! beside it, until enough has changed to warrant a rebuild. The one thing that breaks it
//! is a database older than the graph (restored from a backup): a graph holding an id the
//! store never gave out is discarded.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::index::bm25::{Bm25Index, TermCounts};
use crate::index::{CollectionIndex, ExactIndex, Graph, GraphKind, VectorIndex};
use crate::store::Store;

/// One processed file's chunks.
struct FileEntry {
    vectors: ExactIndex,
    bm25: Bm25Index,
    terms: Vec<(u64, TermCounts)>,
}

/// One collection's chunks.
struct CollectionEntry {
    vectors: CollectionIndex,
    bm25: Bm25Index,
    /// Set when the collection is deleted or reset, so a build still running on this entry
    /// neither saves over the collection's path nor keeps working.
    dropped: AtomicBool,
}

/// All search indexes, by file and by collection.
pub struct VectorStore {
    threshold: usize,
    kind: GraphKind,
    /// Where graphs are saved; `None` keeps them in memory only.
    graph_dir: Option<PathBuf>,
    /// The store's next chunk id when it was loaded: a saved graph with an id at or above
    /// it comes from another (newer) database.
    id_ceiling: Arc<AtomicU64>,
    files: RwLock<HashMap<String, Arc<FileEntry>>>,
    collections: RwLock<HashMap<String, Arc<RwLock<CollectionEntry>>>>,
    /// Entries (by address) whose graph is being built, so only one build runs per
    /// collection; by entry, not id, so a reset collection does not wait for the old build.
    building: Arc<Mutex<HashSet<usize>>>,
}

impl VectorStore {
    pub fn new(threshold: usize, kind: GraphKind, graph_dir: Option<PathBuf>) -> VectorStore {
        VectorStore {
            threshold,
            kind,
            graph_dir,
            id_ceiling: Arc::new(AtomicU64::new(u64::MAX)),
            files: RwLock::new(HashMap::new()),
            collections: RwLock::new(HashMap::new()),
            building: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// The embedded backend's index, loaded from the store: collections of more than
    /// `hnsw_threshold` vectors get a `kind` graph, saved under `graph_dir`. Built once at
    /// start-up and handed to [`crate::storage::embedded::storage`].
    ///
    /// # Errors
    /// The store failed.
    pub fn open(
        hnsw_threshold: usize,
        kind: GraphKind,
        graph_dir: std::path::PathBuf,
        store: &Store,
    ) -> crate::store::Result<VectorStore> {
        let index = VectorStore::new(hnsw_threshold, kind, Some(graph_dir));
        let n = index.load(store)?;
        tracing::info!(vectors = n, "vector index loaded");
        Ok(index)
    }

    /// Rebuilds everything from the store (start-up). Returns the number of chunks. Large
    /// collections get their saved graphs back in the background (or a build when there is
    /// none or it is too stale); exact search serves them meanwhile.
    pub fn load(&self, store: &Store) -> crate::store::Result<usize> {
        self.id_ceiling
            .store(store.next_chunk_id()?, Ordering::Relaxed);
        let mut n = 0;
        store.for_each_file_index(|file_id, data| {
            n += data.ids.len();
            self.put_file(file_id, &data.ids, &data.vectors, &data.terms);
        })?;
        let kbs = store.knowledges()?;
        for kb in &kbs {
            for f in store.knowledge_files(&kb.id)? {
                // No graph work until the collection is complete: a graph loaded or built
                // half-way would count every later chunk as a change.
                self.copy_into(&kb.id, &f);
            }
        }
        for kb in &kbs {
            if let Some(c) = self.collection(&kb.id) {
                self.maybe_build(&kb.id, c);
            }
        }
        Ok(n)
    }

    /// Where the graph of collection `kb` is saved.
    fn graph_path(&self, kb: &str) -> Option<PathBuf> {
        self.graph_path_of(kb, self.kind)
    }

    fn graph_path_of(&self, kb: &str, kind: GraphKind) -> Option<PathBuf> {
        let dir = self.graph_dir.as_ref()?;
        // Collection ids are UUIDs; anything else is hex-encoded to stay a plain file name.
        let safe = kb
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !kb.is_empty();
        let name = if safe {
            kb.to_string()
        } else {
            hex::encode(kb)
        };
        Some(dir.join(format!("{name}.{kind}")))
    }

    /// Installs (or replaces) a file's chunks: ids, vectors and term counts (JSON).
    pub fn put_file(&self, file_id: &str, ids: &[u64], vecs: &[Vec<f32>], term_json: &[String]) {
        let dim = vecs.first().map_or(0, Vec::len);
        let mut vectors = ExactIndex::with_capacity(dim, ids.len());
        let mut bm25 = Bm25Index::new();
        let mut terms = Vec::with_capacity(ids.len());
        for ((id, v), t) in ids.iter().zip(vecs).zip(term_json) {
            if let Err(e) = vectors.insert(*id, v) {
                tracing::error!(file = file_id, error = %e, "vector not indexed");
            }
            let counts: TermCounts = serde_json::from_str(t).unwrap_or_default();
            bm25.insert(*id, &counts);
            terms.push((*id, counts));
        }
        self.files.write().expect("index lock").insert(
            file_id.to_string(),
            Arc::new(FileEntry {
                vectors,
                bm25,
                terms,
            }),
        );
    }

    fn file(&self, file_id: &str) -> Option<Arc<FileEntry>> {
        self.files.read().expect("index lock").get(file_id).cloned()
    }

    fn collection(&self, kb: &str) -> Option<Arc<RwLock<CollectionEntry>>> {
        self.collections
            .read()
            .expect("index lock")
            .get(kb)
            .cloned()
    }

    /// Replaces the chunks of a re-processed file inside `collections`.
    pub fn refresh_in_collections(&self, file_id: &str, removed: &[u64], collections: &[String]) {
        for kb in collections {
            if let Some(c) = self.collection(kb) {
                let mut c = c.write().expect("collection lock");
                for id in removed {
                    c.vectors.remove(*id);
                    c.bm25.remove(*id);
                }
            }
            self.link(kb, file_id);
        }
    }

    /// Copies a file's vectors and term counts into a collection (no re-embedding).
    pub fn link(&self, kb: &str, file_id: &str) {
        if let Some(c) = self.copy_into(kb, file_id) {
            self.maybe_build(kb, c);
        }
    }

    fn copy_into(&self, kb: &str, file_id: &str) -> Option<Arc<RwLock<CollectionEntry>>> {
        let file = self.file(file_id)?;
        let c = {
            let mut map = self.collections.write().expect("index lock");
            map.entry(kb.to_string())
                .or_insert_with(|| {
                    Arc::new(RwLock::new(CollectionEntry {
                        vectors: CollectionIndex::new(
                            file.vectors.dim(),
                            self.threshold,
                            self.kind,
                        ),
                        bm25: Bm25Index::new(),
                        dropped: AtomicBool::new(false),
                    }))
                })
                .clone()
        };
        {
            let mut c = c.write().expect("collection lock");
            for (id, v) in file.vectors.iter() {
                if let Err(e) = c.vectors.insert(id, v) {
                    tracing::error!(collection = kb, error = %e, "vector not indexed");
                }
            }
            for (id, t) in &file.terms {
                c.bm25.insert(*id, t);
            }
        }
        Some(c)
    }

    /// Removes a file's chunks from a collection.
    pub fn unlink(&self, kb: &str, file_id: &str) {
        let (Some(file), Some(c)) = (self.file(file_id), self.collection(kb)) else {
            return;
        };
        {
            let mut c = c.write().expect("collection lock");
            for (id, t) in &file.terms {
                c.vectors.remove(*id);
                c.bm25.remove_with(*id, t);
            }
        }
        // Enough removals make filtering the graph wasteful: rebuild.
        self.maybe_build(kb, c);
    }

    /// Forgets a deleted or failed file everywhere.
    pub fn remove_file(&self, file_id: &str, chunk_ids: &[u64], collections: &[String]) {
        let file = self.file(file_id);
        for kb in collections {
            if let Some(entry) = self.collection(kb) {
                {
                    let mut c = entry.write().expect("collection lock");
                    for id in chunk_ids {
                        c.vectors.remove(*id);
                    }
                    match &file {
                        Some(f) => f
                            .terms
                            .iter()
                            .for_each(|(id, t)| c.bm25.remove_with(*id, t)),
                        None => chunk_ids.iter().for_each(|id| c.bm25.remove(*id)),
                    }
                }
                self.maybe_build(kb, entry);
            }
        }
        self.files.write().expect("index lock").remove(file_id);
    }

    /// Forgets a deleted or reset collection, and its saved graph.
    pub fn drop_collection(&self, kb: &str) {
        if let Some(c) = self.collections.write().expect("index lock").remove(kb) {
            c.read()
                .expect("collection lock")
                .dropped
                .store(true, Ordering::Relaxed);
        }
        // Both kinds: the configured one may have changed since a graph was saved.
        for kind in [GraphKind::Usearch, GraphKind::Hora] {
            if let Some(path) = self.graph_path_of(kb, kind)
                && let Err(e) = Graph::remove_saved(&path)
            {
                tracing::warn!(collection = kb, error = %e, "saved graph not deleted");
            }
        }
    }

    /// Best `k` chunks of one file by cosine.
    pub fn search_file(&self, file_id: &str, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        self.file(file_id)
            .map(|f| f.vectors.search(query, k, &|_| true))
            .unwrap_or_default()
    }

    /// Best `k` chunks of a collection by cosine.
    pub fn search_collection(&self, kb: &str, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        match self.collection(kb) {
            Some(c) => c
                .read()
                .expect("collection lock")
                .vectors
                .search(query, k, &|_| true),
            None => Vec::new(),
        }
    }

    /// Best `k` chunks of one file by BM25.
    pub fn bm25_file(
        &self,
        file_id: &str,
        query: &str,
        k: usize,
        params: crate::index::bm25::Bm25Params,
    ) -> Vec<(u64, f32)> {
        self.file(file_id)
            .map(|f| f.bm25.search_with(query, k, params))
            .unwrap_or_default()
    }

    /// Best `k` chunks of a collection by BM25.
    pub fn bm25_collection(
        &self,
        kb: &str,
        query: &str,
        k: usize,
        params: crate::index::bm25::Bm25Params,
    ) -> Vec<(u64, f32)> {
        match self.collection(kb) {
            Some(c) => c
                .read()
                .expect("collection lock")
                .bm25
                .search_with(query, k, params),
            None => Vec::new(),
        }
    }

    /// The stored vector of a chunk of `file_id` (to score lexical hits by cosine).
    pub fn vector(&self, file_id: &str, chunk: u64) -> Option<Vec<f32>> {
        self.file(file_id)
            .and_then(|f| f.vectors.get(chunk).map(<[f32]>::to_vec))
    }

    /// Cosine of `query` to a chunk of `file_id`, computed in place (no copy of the
    /// vector); `None` when the chunk is gone or its vector has another dimension.
    pub fn similarity(&self, file_id: &str, chunk: u64, query: &[f32]) -> Option<f32> {
        let f = self.file(file_id)?;
        let v = f.vectors.get(chunk)?;
        (v.len() == query.len()).then(|| crate::index::dot(query, v))
    }

    /// Number of vectors of a collection.
    pub fn collection_len(&self, kb: &str) -> usize {
        self.collection(kb)
            .map(|c| c.read().expect("collection lock").vectors.len())
            .unwrap_or(0)
    }

    /// The kind and size of a collection's installed graph (`None`: searched exactly).
    pub fn graph_info(&self, kb: &str) -> Option<(GraphKind, usize)> {
        let c = self.collection(kb)?;
        let g = c.read().expect("collection lock").vectors.graph()?;
        Some((g.kind(), g.len()))
    }

    /// Number of vectors of a file.
    pub fn file_len(&self, file_id: &str) -> usize {
        self.file(file_id).map_or(0, |f| f.vectors.len())
    }

    /// Starts background graph work when the collection outgrew exact search: the saved
    /// graph is loaded if the collection has none yet and one was saved, and a new graph is
    /// built from a snapshot when there is still none or it is too stale, saved, and swapped
    /// in. Changes made meanwhile stay visible through the collection's exact side (see
    /// `CollectionIndex`).
    fn maybe_build(&self, kb: &str, c: Arc<RwLock<CollectionEntry>>) {
        if !c.read().expect("collection lock").vectors.needs_rebuild() {
            return;
        }
        let key = Arc::as_ptr(&c) as usize;
        if !self.building.lock().expect("building lock").insert(key) {
            return;
        }
        let slot = BuildSlot {
            building: self.building.clone(),
            key,
        };
        let kb = kb.to_string();
        let path = self.graph_path(&kb);
        let kind = self.kind;
        let ceiling = self.id_ceiling.clone();
        // A plain thread, not tokio's blocking pool: start-up (`load`) runs before any
        // runtime exists, and a build is minutes of CPU that must not hold a pool thread.
        let spawned = std::thread::Builder::new()
            .name("ragway-graph".into())
            .spawn(move || {
                // A build frees its scratch (and the graph it replaces) when it ends.
                let _busy = crate::heap::busy();
                let has_graph = c.read().expect("collection lock").vectors.graph().is_some();
                if !has_graph && let Some(path) = path.as_deref() {
                    restore(&kb, &c, path, kind, ceiling.load(Ordering::Relaxed));
                }
                loop {
                    // Changes that arrive during a build cannot start another one (this one
                    // holds the slot), so look again after each install; the last look and
                    // the release happen under the slot lock, so none is missed.
                    {
                        let mut building = slot.building.lock().expect("building lock");
                        let entry = c.read().expect("collection lock");
                        if entry.dropped.load(Ordering::Relaxed) || !entry.vectors.needs_rebuild() {
                            building.remove(&slot.key);
                            return;
                        }
                    }
                    if !build(&kb, &c, path.as_deref(), &ceiling) {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a graph build thread; exact search continues");
        }
    }
}

/// A collection's claim on building its graph, released however the build ends (a panic
/// included), so the collection can build again.
struct BuildSlot {
    building: Arc<Mutex<HashSet<usize>>>,
    key: usize,
}

impl Drop for BuildSlot {
    fn drop(&mut self) {
        self.building
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// Installs the saved graph of `kb`, if there is a usable one.
fn restore(
    kb: &str,
    c: &RwLock<CollectionEntry>,
    path: &std::path::Path,
    kind: GraphKind,
    ceiling: u64,
) {
    if !path.exists() {
        return;
    }
    let started = std::time::Instant::now();
    match Graph::load(kind, path) {
        Ok(graph) if graph.ids().last().is_some_and(|max| *max >= ceiling) => {
            tracing::warn!(
                collection = kb,
                "saved graph is newer than the database; rebuilding"
            );
        }
        Ok(graph) => {
            let size = graph.len();
            let mut c = c.write().expect("collection lock");
            if c.vectors.install_loaded_graph(graph) {
                tracing::info!(
                    collection = kb,
                    vectors = size,
                    pending = c.vectors.pending_len(),
                    stale = c.vectors.stale_len(),
                    secs = started.elapsed().as_secs_f64(),
                    "HNSW graph loaded"
                );
            }
        }
        Err(e) => {
            tracing::warn!(collection = kb, error = %e, "saved graph not usable; rebuilding");
        }
    }
}

/// Builds a graph of `kb` from a snapshot, saves it (before installing: a save may block
/// searches on it), and installs it. False when no graph could be built.
fn build(
    kb: &str,
    c: &RwLock<CollectionEntry>,
    path: Option<&std::path::Path>,
    ceiling: &AtomicU64,
) -> bool {
    let snapshot = c
        .read()
        .expect("collection lock")
        .vectors
        .snapshot_for_build();
    let started = std::time::Instant::now();
    let built = match snapshot.build() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(collection = kb, error = %e, "HNSW build failed; exact search continues");
            return false;
        }
    };
    let build_secs = started.elapsed().as_secs_f64();
    // Ids this process built from are the store's own, whatever the ceiling read at start.
    if let Some(max) = built.graph().ids().last() {
        ceiling.fetch_max(max + 1, Ordering::Relaxed);
    }
    let dropped = c
        .read()
        .expect("collection lock")
        .dropped
        .load(Ordering::Relaxed);
    if dropped {
        return false;
    }
    if let Some(path) = path {
        let saved = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| built.graph().save(path));
        if let Err(e) = saved {
            tracing::warn!(collection = kb, error = %e, "HNSW graph not saved; it will be rebuilt at the next start");
        }
    }
    let size = built.graph().len();
    let installed = c
        .write()
        .expect("collection lock")
        .vectors
        .install_graph(built);
    if installed {
        tracing::info!(
            collection = kb,
            vectors = size,
            secs = build_secs,
            "HNSW graph built"
        );
    }
    installed
}
