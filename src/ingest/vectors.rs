//! The in-memory search indexes, derived from redb (`vectors` and `terms` tables).
//!
//! Every processed file has its own exact vector index and BM25 index (a `file` item is
//! searched alone). Every knowledge collection has a [`CollectionIndex`] and a BM25 index
//! holding its files' chunks: adding a file to a collection copies its stored vectors and
//! term counts, it never re-embeds. Collections above the HNSW threshold get a graph built
//! off the request path.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::index::{CollectionIndex, ExactIndex, VectorIndex};
use crate::rag::bm25::{Bm25Index, TermCounts};
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
}

/// All search indexes, by file and by collection.
pub struct VectorStore {
    threshold: usize,
    files: RwLock<HashMap<String, Arc<FileEntry>>>,
    collections: RwLock<HashMap<String, Arc<RwLock<CollectionEntry>>>>,
    /// Collections whose graph is being built, so only one build runs per collection.
    building: Arc<Mutex<HashSet<String>>>,
}

impl VectorStore {
    pub fn new(threshold: usize) -> VectorStore {
        VectorStore {
            threshold,
            files: RwLock::new(HashMap::new()),
            collections: RwLock::new(HashMap::new()),
            building: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Rebuilds everything from the store (start-up). Returns the number of chunks.
    pub fn load(&self, store: &Store) -> crate::store::Result<usize> {
        let mut n = 0;
        store.for_each_file_index(|file_id, data| {
            n += data.ids.len();
            self.put_file(file_id, &data.ids, &data.vectors, &data.terms);
        })?;
        for kb in store.knowledges()? {
            for f in store.knowledge_files(&kb.id)? {
                self.link(&kb.id, &f);
            }
        }
        Ok(n)
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
        let Some(file) = self.file(file_id) else {
            return;
        };
        let c = {
            let mut map = self.collections.write().expect("index lock");
            map.entry(kb.to_string())
                .or_insert_with(|| {
                    Arc::new(RwLock::new(CollectionEntry {
                        vectors: CollectionIndex::new(file.vectors.dim(), self.threshold),
                        bm25: Bm25Index::new(),
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
        self.maybe_build(kb, c);
    }

    /// Removes a file's chunks from a collection.
    pub fn unlink(&self, kb: &str, file_id: &str) {
        let (Some(file), Some(c)) = (self.file(file_id), self.collection(kb)) else {
            return;
        };
        let mut c = c.write().expect("collection lock");
        for (id, t) in &file.terms {
            c.vectors.remove(*id);
            c.bm25.remove_with(*id, t);
        }
    }

    /// Forgets a deleted or failed file everywhere.
    pub fn remove_file(&self, file_id: &str, chunk_ids: &[u64], collections: &[String]) {
        let file = self.file(file_id);
        for kb in collections {
            if let Some(c) = self.collection(kb) {
                let mut c = c.write().expect("collection lock");
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
        }
        self.files.write().expect("index lock").remove(file_id);
    }

    pub fn drop_collection(&self, kb: &str) {
        self.collections.write().expect("index lock").remove(kb);
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
    pub fn bm25_file(&self, file_id: &str, query: &str, k: usize) -> Vec<(u64, f32)> {
        self.file(file_id)
            .map(|f| f.bm25.search(query, k))
            .unwrap_or_default()
    }

    /// Best `k` chunks of a collection by BM25.
    pub fn bm25_collection(&self, kb: &str, query: &str, k: usize) -> Vec<(u64, f32)> {
        match self.collection(kb) {
            Some(c) => c.read().expect("collection lock").bm25.search(query, k),
            None => Vec::new(),
        }
    }

    /// The stored vector of a chunk of `file_id` (to score lexical hits by cosine).
    pub fn vector(&self, file_id: &str, chunk: u64) -> Option<Vec<f32>> {
        self.file(file_id)
            .and_then(|f| f.vectors.get(chunk).map(<[f32]>::to_vec))
    }

    /// Number of vectors of a collection.
    pub fn collection_len(&self, kb: &str) -> usize {
        self.collection(kb)
            .map(|c| c.read().expect("collection lock").vectors.len())
            .unwrap_or(0)
    }

    /// Number of vectors of a file.
    pub fn file_len(&self, file_id: &str) -> usize {
        self.file(file_id).map_or(0, |f| f.vectors.len())
    }

    /// Starts a background HNSW build when the collection outgrew exact search. The graph
    /// is built from a snapshot on a blocking thread and swapped in; changes made meanwhile
    /// stay visible through the collection's exact side (see `CollectionIndex`).
    fn maybe_build(&self, kb: &str, c: Arc<RwLock<CollectionEntry>>) {
        if !c.read().expect("collection lock").vectors.needs_rebuild() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self
            .building
            .lock()
            .expect("building lock")
            .insert(kb.to_string())
        {
            return;
        }
        let snapshot = c
            .read()
            .expect("collection lock")
            .vectors
            .snapshot_for_build();
        let building = self.building.clone();
        let kb = kb.to_string();
        handle.spawn_blocking(move || {
            let started = std::time::Instant::now();
            match snapshot.build() {
                Ok(graph) => {
                    c.write().expect("collection lock").vectors.install_graph(graph);
                    tracing::info!(collection = %kb, secs = started.elapsed().as_secs_f64(), "HNSW graph built");
                }
                Err(e) => {
                    tracing::error!(collection = %kb, error = %e, "HNSW build failed; exact search continues")
                }
            }
            building.lock().expect("building lock").remove(&kb);
        });
    }
}
