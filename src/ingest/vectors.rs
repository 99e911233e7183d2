//! The in-memory vector index, derived from redb's `vectors` table.
//!
//! Every processed file has its own exact index (a file is searched alone for `files`
//! items of type `file`). Every knowledge collection has a [`CollectionIndex`] holding the
//! vectors of its files: adding a file to a collection copies its stored vectors, it never
//! re-embeds. Collections above the HNSW threshold get a graph built off the request path.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::index::{CollectionIndex, ExactIndex, VectorIndex};
use crate::store::Store;

/// All vectors, by file and by collection.
pub struct VectorStore {
    threshold: usize,
    files: RwLock<HashMap<String, Arc<ExactIndex>>>,
    collections: RwLock<HashMap<String, Arc<RwLock<CollectionIndex>>>>,
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

    /// Rebuilds everything from the store (start-up).
    pub fn load(&self, store: &Store) -> crate::store::Result<usize> {
        let mut n = 0;
        store.for_each_file_vectors(|file_id, ids, vecs| {
            n += ids.len();
            self.put_file(file_id, &ids, &vecs);
        })?;
        for kb in store.knowledges()? {
            for f in store.knowledge_files(&kb.id)? {
                self.link(&kb.id, &f);
            }
        }
        Ok(n)
    }

    fn dim_of(vecs: &[Vec<f32>]) -> usize {
        vecs.first().map_or(0, Vec::len)
    }

    /// Installs (or replaces) a file's vectors, updating the collections it belongs to.
    pub fn put_file(&self, file_id: &str, ids: &[u64], vecs: &[Vec<f32>]) {
        let mut idx = ExactIndex::new(Self::dim_of(vecs));
        for (id, v) in ids.iter().zip(vecs) {
            if let Err(e) = idx.insert(*id, v) {
                tracing::error!(file = file_id, error = %e, "vector not indexed");
            }
        }
        self.files
            .write()
            .expect("vectors lock")
            .insert(file_id.to_string(), Arc::new(idx));
    }

    /// Replaces the vectors of a re-processed file inside `collections`.
    pub fn refresh_in_collections(&self, file_id: &str, removed: &[u64], collections: &[String]) {
        for kb in collections {
            if let Some(c) = self.collection(kb) {
                let mut c = c.write().expect("collection lock");
                for id in removed {
                    c.remove(*id);
                }
            }
            self.link(kb, file_id);
        }
    }

    fn collection(&self, kb: &str) -> Option<Arc<RwLock<CollectionIndex>>> {
        self.collections
            .read()
            .expect("vectors lock")
            .get(kb)
            .cloned()
    }

    /// Copies a file's vectors into a collection (no re-embedding).
    pub fn link(&self, kb: &str, file_id: &str) {
        let Some(file) = self
            .files
            .read()
            .expect("vectors lock")
            .get(file_id)
            .cloned()
        else {
            return;
        };
        let c = {
            let mut map = self.collections.write().expect("vectors lock");
            map.entry(kb.to_string())
                .or_insert_with(|| {
                    Arc::new(RwLock::new(CollectionIndex::new(
                        file.dim(),
                        self.threshold,
                    )))
                })
                .clone()
        };
        {
            let mut c = c.write().expect("collection lock");
            for (id, v) in file.iter() {
                if let Err(e) = c.insert(id, v) {
                    tracing::error!(collection = kb, error = %e, "vector not indexed");
                }
            }
        }
        self.maybe_build(kb, c);
    }

    /// Removes a file's vectors from a collection.
    pub fn unlink(&self, kb: &str, file_id: &str) {
        let Some(file) = self
            .files
            .read()
            .expect("vectors lock")
            .get(file_id)
            .cloned()
        else {
            return;
        };
        if let Some(c) = self.collection(kb) {
            let mut c = c.write().expect("collection lock");
            for (id, _) in file.iter() {
                c.remove(id);
            }
        }
    }

    /// Forgets a deleted file everywhere.
    pub fn remove_file(&self, file_id: &str, chunk_ids: &[u64], collections: &[String]) {
        for kb in collections {
            if let Some(c) = self.collection(kb) {
                let mut c = c.write().expect("collection lock");
                for id in chunk_ids {
                    c.remove(*id);
                }
            }
        }
        self.files.write().expect("vectors lock").remove(file_id);
    }

    pub fn drop_collection(&self, kb: &str) {
        self.collections.write().expect("vectors lock").remove(kb);
    }

    /// Best `k` chunks of one file.
    pub fn search_file(&self, file_id: &str, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        let file = self
            .files
            .read()
            .expect("vectors lock")
            .get(file_id)
            .cloned();
        file.map(|f| f.search(query, k, &|_| true))
            .unwrap_or_default()
    }

    /// Best `k` chunks of a collection.
    pub fn search_collection(&self, kb: &str, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        match self.collection(kb) {
            Some(c) => c
                .read()
                .expect("collection lock")
                .search(query, k, &|_| true),
            None => Vec::new(),
        }
    }

    /// Number of vectors of a collection (for tests and metrics).
    pub fn collection_len(&self, kb: &str) -> usize {
        self.collection(kb)
            .map(|c| c.read().expect("collection lock").len())
            .unwrap_or(0)
    }

    /// Number of vectors of a file.
    pub fn file_len(&self, file_id: &str) -> usize {
        self.files
            .read()
            .expect("vectors lock")
            .get(file_id)
            .map_or(0, |f| f.len())
    }

    /// Starts a background HNSW build when the collection outgrew exact search. The graph
    /// is built from a snapshot on a blocking thread and swapped in; changes made meanwhile
    /// stay visible through the collection's exact side (see `CollectionIndex`).
    fn maybe_build(&self, kb: &str, c: Arc<RwLock<CollectionIndex>>) {
        if !c.read().expect("collection lock").needs_rebuild() {
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
        let snapshot = c.read().expect("collection lock").snapshot_for_build();
        let building = self.building.clone();
        let kb = kb.to_string();
        handle.spawn_blocking(move || {
            let started = std::time::Instant::now();
            match snapshot.build() {
                Ok(graph) => {
                    c.write().expect("collection lock").install_graph(graph);
                    tracing::info!(collection = %kb, secs = started.elapsed().as_secs_f64(), "HNSW graph built");
                }
                Err(e) => tracing::error!(collection = %kb, error = %e, "HNSW build failed; exact search continues"),
            }
            building.lock().expect("building lock").remove(&kb);
        });
    }
}
