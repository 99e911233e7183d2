//! The embedded backend: every seam delegates to what one ragway process already has: the
//! redb [`Store`] (metadata, chunks, vectors, the queued set), the in-process search indexes
//! ([`VectorStore`]), files in a directory (blobs), and in-memory leases, counters, rate-limit
//! buckets and signals. What lives in memory only is what a restart may forget: a lease (its
//! holder died with the process), a counter or a bucket (forgetting sign-in attempts or
//! requests counted only helps users), a signal (every cache is empty after a restart).

pub mod vectors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{
    Blobs, ChunkRef, Chunks, Counters, Hit, Job, Metadata, RateLimits, Result, Retry,
    SIGNAL_CAPACITY, Scope, Signal, Signals, Storage, StorageError, UserChange, WorkQueue,
    check_key,
};
use crate::index::bm25::{Bm25Params, TermCounts};
use crate::limits::{Applied, Limiter, Refused};
use crate::storage::embedded::vectors::VectorStore;
use crate::store::{
    ApiKeyRecord, ChunkRecord, FileRecord, KnowledgeRecord, PresetRecord, PresetRefusal, Store,
    UsageCounts, UsageKey, User,
};

/// Builds the embedded [`Storage`] over an open store, its loaded indexes and the blob
/// directory. `counter_capacity` bounds the counters' keys; the rate-limit buckets are
/// bounded at [`crate::limits::DEFAULT_CAPACITY`] (replace `rate_limits` for another bound).
pub fn storage(
    store: Arc<Store>,
    index: Arc<VectorStore>,
    blob_dir: PathBuf,
    counter_capacity: usize,
) -> Storage {
    let data = Arc::new(Embedded::new(store, index));
    Storage {
        meta: data.clone(),
        chunks: data.clone(),
        queue: data,
        blobs: Arc::new(DirBlobs { dir: blob_dir }),
        counters: Arc::new(MemoryCounters::new(counter_capacity)),
        rate_limits: Arc::new(Limiter::new(crate::limits::DEFAULT_CAPACITY)),
        signals: Arc::new(LocalSignals::new()),
    }
}

/// Metadata, chunks and queue: one struct, because the indexes must follow every
/// membership change the metadata makes.
pub struct Embedded {
    store: Arc<Store>,
    index: Arc<VectorStore>,
    /// Live and expired leases by file id. Entries exist only for queued files (pruned at
    /// each claim), so the map is bounded by the queue.
    leases: Mutex<HashMap<String, Lease>>,
}

struct Lease {
    token: String,
    until: Instant,
    attempts: u32,
}

impl Embedded {
    /// Metadata, chunks and queue over an open store and its loaded indexes.
    #[must_use]
    pub fn new(store: Arc<Store>, index: Arc<VectorStore>) -> Embedded {
        Embedded {
            store,
            index,
            leases: Mutex::new(HashMap::new()),
        }
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// BM25 over the scope's collections and files, merged.
    fn bm25(&self, scope: &Scope, query: &str, k: usize, params: Bm25Params) -> Vec<Hit> {
        let lists = scope
            .collections
            .iter()
            .map(|kb| self.index.bm25_collection(kb, query, k, params))
            .chain(
                scope
                    .files
                    .iter()
                    .map(|f| self.index.bm25_file(f, query, k, params)),
            );
        merge(lists.collect::<Vec<_>>(), k)
    }

    /// Whether `job` still holds its lease.
    fn holds(&self, job: &Job) -> bool {
        self.leases()
            .get(&job.file_id)
            .is_some_and(|l| l.token == job.token && l.until > Instant::now())
    }
}

#[async_trait]
impl Metadata for Embedded {
    async fn ping(&self) -> bool {
        self.store.ping()
    }
    async fn user_count(&self) -> Result<u64> {
        Ok(self.store.user_count()?)
    }
    async fn create_user(&self, user: User, first_is_admin: bool) -> Result<User> {
        Ok(self.store.create_user(user, first_is_admin)?)
    }
    async fn users(&self) -> Result<Vec<User>> {
        Ok(self.store.users()?)
    }
    async fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        Ok(self.store.user_by_id(id)?)
    }
    async fn user_by_email(&self, email: &str) -> Result<Option<User>> {
        Ok(self.store.user_by_email(email)?)
    }
    async fn update_user(&self, id: &str, change: UserChange) -> Result<Result<User, String>> {
        Ok(self.store.update_user(id, change)?)
    }
    async fn delete_user(&self, id: &str) -> Result<Option<User>> {
        Ok(self.store.delete_user(id)?)
    }
    async fn pending_user_deletions(&self) -> Result<Vec<String>> {
        Ok(self.store.pending_user_deletions()?)
    }
    async fn finish_user_deletion(&self, id: &str) -> Result<()> {
        Ok(self.store.finish_user_deletion(id)?)
    }
    async fn primary_admin(&self) -> Result<Option<String>> {
        Ok(self.store.primary_admin()?)
    }
    async fn put_api_key(&self, hash: &str, record: &ApiKeyRecord) -> Result<()> {
        Ok(self.store.put_api_key(hash, record)?)
    }
    async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>> {
        Ok(self.store.api_key_by_hash(hash)?)
    }
    async fn api_key_of_user(&self, user_id: &str) -> Result<Option<(String, ApiKeyRecord)>> {
        Ok(self.store.api_key_of_user(user_id)?)
    }
    async fn delete_api_key_of_user(&self, user_id: &str) -> Result<Option<String>> {
        Ok(self.store.delete_api_key_of_user(user_id)?)
    }
    async fn revoke_token(&self, jti: &str, exp: Option<u64>) -> Result<()> {
        Ok(self.store.revoke_token(jti, exp)?)
    }
    async fn is_token_revoked(&self, jti: &str) -> Result<bool> {
        Ok(self.store.is_token_revoked(jti)?)
    }
    async fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self.store.setting(key)?)
    }
    async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        Ok(self.store.set_setting(key, value)?)
    }
    async fn insert_file(&self, file: &FileRecord) -> Result<()> {
        Ok(self.store.insert_file(file, false)?)
    }
    async fn file(&self, id: &str) -> Result<Option<FileRecord>> {
        Ok(self.store.file(id)?)
    }
    async fn files(&self) -> Result<Vec<FileRecord>> {
        Ok(self.store.files()?)
    }
    async fn update_file(&self, file: &FileRecord) -> Result<()> {
        Ok(self.store.update_file(file)?)
    }
    async fn file_text(&self, id: &str) -> Result<Option<String>> {
        Ok(self.store.file_text(id)?)
    }
    async fn delete_file(&self, id: &str) -> Result<Option<(FileRecord, Vec<String>)>> {
        let Some((rec, chunk_ids, kbs)) = self.store.delete_file(id)? else {
            return Ok(None);
        };
        self.index.remove_file(id, &chunk_ids, &kbs);
        self.leases().remove(id);
        Ok(Some((rec, kbs)))
    }
    async fn put_knowledge(&self, kb: &KnowledgeRecord) -> Result<()> {
        Ok(self.store.put_knowledge(kb)?)
    }
    async fn knowledge(&self, id: &str) -> Result<Option<KnowledgeRecord>> {
        Ok(self.store.knowledge(id)?)
    }
    async fn knowledges(&self) -> Result<Vec<KnowledgeRecord>> {
        Ok(self.store.knowledges()?)
    }
    async fn knowledge_files(&self, id: &str) -> Result<Vec<String>> {
        Ok(self.store.knowledge_files(id)?)
    }
    async fn file_knowledge(&self, file_id: &str) -> Result<Vec<String>> {
        Ok(self.store.file_knowledge(file_id)?)
    }
    async fn link_file(&self, kb: &str, file_id: &str) -> Result<bool> {
        let linked = self.store.link_file(kb, file_id)?;
        if linked {
            self.index.link(kb, file_id);
        }
        Ok(linked)
    }
    async fn unlink_file(&self, kb: &str, file_id: &str) -> Result<bool> {
        let unlinked = self.store.unlink_file(kb, file_id)?;
        if unlinked {
            self.index.unlink(kb, file_id);
        }
        Ok(unlinked)
    }
    async fn delete_knowledge(&self, kb: &str) -> Result<bool> {
        let existed = self.store.delete_knowledge(kb)?;
        self.index.drop_collection(kb);
        Ok(existed)
    }
    async fn add_usage(&self, rows: &[(UsageKey, UsageCounts)], keep_from_hour: u64) -> Result<()> {
        Ok(self.store.add_usage(rows, keep_from_hour)?)
    }
    async fn scan_usage(
        &self,
        from_hour: u64,
        to_hour: u64,
        limit: usize,
    ) -> Result<Vec<(UsageKey, UsageCounts)>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.store.scan_usage(from_hour, to_hour, |k, c| {
            out.push((k, c));
            out.len() < limit
        })?;
        Ok(out)
    }

    // --- migrate slice ---
    async fn all_settings(&self) -> Result<Vec<(String, String)>> {
        Ok(self.store.settings()?)
    }
    async fn revoked_tokens(&self) -> Result<Vec<(String, Option<u64>)>> {
        Ok(self.store.revoked_tokens()?)
    }

    // --- accounts ---

    async fn set_api_key_limits(
        &self,
        user_id: &str,
        limits: crate::limits::Limits,
    ) -> Result<Option<ApiKeyRecord>> {
        Ok(self.store.set_api_key_limits(user_id, limits)?)
    }

    // --- library: presets ---
    async fn preset(&self, id: &str) -> Result<Option<PresetRecord>> {
        Ok(self.store.preset(id)?)
    }
    async fn presets(&self) -> Result<Vec<PresetRecord>> {
        Ok(self.store.presets()?)
    }
    async fn insert_preset(
        &self,
        rec: &PresetRecord,
        max_per_user: usize,
        max_total: usize,
    ) -> Result<Result<(), PresetRefusal>> {
        Ok(self.store.insert_preset(rec, max_per_user, max_total)?)
    }
    async fn update_preset(&self, rec: &PresetRecord) -> Result<bool> {
        Ok(self.store.update_preset(rec)?)
    }
    async fn delete_preset(&self, id: &str) -> Result<bool> {
        Ok(self.store.delete_preset(id)?)
    }
}

/// Runs `f`, which blocks (indexing a large file, the database's fsync), without stalling
/// the runtime thread's other tasks where the runtime can hand them to another thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Merges per-collection and per-file hit lists: best score per chunk, best first.
fn merge(mut lists: Vec<Vec<Hit>>, k: usize) -> Vec<Hit> {
    // One file or one collection (every chat and retrieval-API search): the index's list
    // is already best first and holds each chunk once.
    if lists.len() == 1 {
        let mut hits = lists.pop().unwrap_or_default();
        hits.truncate(k);
        return hits;
    }
    let mut best: HashMap<u64, f32> = HashMap::new();
    for (id, score) in lists.into_iter().flatten() {
        let e = best.entry(id).or_insert(score);
        if score > *e {
            *e = score;
        }
    }
    let mut hits: Vec<Hit> = best.into_iter().collect();
    hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    hits.truncate(k);
    hits
}

#[async_trait]
impl Chunks for Embedded {
    async fn complete_file(
        &self,
        file: &FileRecord,
        text: &str,
        chunks: &[ChunkRecord],
        vectors: &[Vec<f32>],
    ) -> Result<Vec<u64>> {
        super::check_paired(chunks.len(), vectors.len())?;
        let terms: Vec<String> = chunks
            .iter()
            .map(|c| serde_json::to_string(&TermCounts::of(&c.indexed_text())).expect("json"))
            .collect();
        // Searchable in memory first, then committed: once the store says "completed",
        // every chunk can already be found (clients poll the status, then search or add
        // the file to a collection). A failed commit rolls the memory back.
        blocking(|| {
            let ids = self.store.reserve_chunk_ids(chunks.len())?;
            let old = self.store.file_chunk_ids(&file.id)?;
            let kbs = self.store.file_knowledge(&file.id)?;
            self.index.put_file(&file.id, &ids, vectors, &terms);
            self.index.refresh_in_collections(&file.id, &old, &kbs);
            match self
                .store
                .complete_file(file, text, &ids, chunks, vectors, &terms)
            {
                Ok(_) => Ok(ids),
                Err(e) => {
                    self.index.remove_file(&file.id, &ids, &kbs);
                    Err(e.into())
                }
            }
        })
    }
    async fn fail_file(&self, file: &FileRecord) -> Result<()> {
        let removed = self.store.fail_file(file)?;
        let kbs = self.store.file_knowledge(&file.id)?;
        self.index.remove_file(&file.id, &removed, &kbs);
        Ok(())
    }
    async fn file_chunk_ids(&self, file_id: &str) -> Result<Vec<u64>> {
        Ok(self.store.file_chunk_ids(file_id)?)
    }
    async fn chunks(&self, ids: &[u64]) -> Result<Vec<(u64, ChunkRecord)>> {
        Ok(self.store.chunks(ids)?)
    }
    async fn dense_search(&self, scope: &Scope, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        let lists = scope
            .collections
            .iter()
            .map(|kb| self.index.search_collection(kb, query, k))
            .chain(
                scope
                    .files
                    .iter()
                    .map(|f| self.index.search_file(f, query, k)),
            );
        Ok(merge(lists.collect::<Vec<_>>(), k))
    }
    async fn lexical_search(&self, scope: &Scope, query: &str, k: usize) -> Result<Vec<Hit>> {
        Ok(self.bm25(scope, query, k, Bm25Params::default()))
    }

    // Retrieval.
    async fn similarities(
        &self,
        query: &[f32],
        chunks: &[ChunkRef<'_>],
    ) -> Result<Vec<Option<f32>>> {
        Ok(chunks
            .iter()
            .map(|(id, file)| self.index.similarity(file, *id, query))
            .collect())
    }
    async fn vectors(&self, chunks: &[ChunkRef<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        Ok(chunks
            .iter()
            .map(|(id, file)| self.index.vector(file, *id))
            .collect())
    }
    async fn lexical_search_with(
        &self,
        scope: &Scope,
        query: &str,
        k: usize,
        params: Bm25Params,
    ) -> Result<Option<Vec<Hit>>> {
        Ok(Some(self.bm25(scope, query, k, params)))
    }

    // --- migrate slice ---
    async fn file_vectors(&self, file_id: &str) -> Result<Vec<(u64, Vec<f32>)>> {
        Ok(self.store.file_vectors(file_id)?)
    }
    async fn import_file(
        &self,
        file: &FileRecord,
        text: &str,
        chunks: &[(u64, ChunkRecord)],
        vectors: &[Vec<f32>],
    ) -> Result<()> {
        super::check_paired(chunks.len(), vectors.len())?;
        if self.store.file(&file.id)?.is_none() {
            return Err(StorageError::NotFound);
        }
        let ids: Vec<u64> = chunks.iter().map(|c| c.0).collect();
        let records: Vec<ChunkRecord> = chunks.iter().map(|c| c.1.clone()).collect();
        // An id already held by another file would make two chunks one.
        let taken = self
            .store
            .chunks(&ids)?
            .into_iter()
            .find(|(_, c)| c.file_id != file.id);
        if let Some((id, c)) = taken {
            return Err(StorageError::Corrupt {
                table: "chunks",
                message: format!("chunk id {id} already belongs to file {}", c.file_id),
            });
        }
        if let Some(max) = ids.iter().max() {
            self.store.raise_chunk_ids(max.saturating_add(1))?;
        }
        let terms: Vec<String> = records
            .iter()
            .map(|c| serde_json::to_string(&TermCounts::of(&c.indexed_text())).expect("json"))
            .collect();
        let removed = self
            .store
            .complete_file(file, text, &ids, &records, vectors, &terms)?;
        self.index.put_file(&file.id, &ids, vectors, &terms);
        let kbs = self.store.file_knowledge(&file.id)?;
        self.index.refresh_in_collections(&file.id, &removed, &kbs);
        Ok(())
    }
}

#[async_trait]
impl WorkQueue for Embedded {
    async fn enqueue(&self, file_id: &str) -> Result<()> {
        if self.store.enqueue_file_id(file_id)? {
            Ok(())
        } else {
            Err(StorageError::NotFound)
        }
    }
    async fn claim(&self, lease: Duration) -> Result<Option<Job>> {
        let queued = self.store.queued_files()?;
        let now = Instant::now();
        let mut leases = self.leases();
        leases.retain(|id, _| queued.contains(id));
        for id in queued {
            let attempts = match leases.get(&id) {
                Some(l) if l.until > now => continue,
                Some(l) => l.attempts + 1,
                None => 1,
            };
            let token = uuid::Uuid::new_v4().to_string();
            leases.insert(
                id.clone(),
                Lease {
                    token: token.clone(),
                    until: now + lease,
                    attempts,
                },
            );
            return Ok(Some(Job {
                file_id: id,
                attempts,
                token,
            }));
        }
        Ok(None)
    }
    async fn heartbeat(&self, job: &Job, lease: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut leases = self.leases();
        match leases.get_mut(&job.file_id) {
            Some(l) if l.token == job.token && l.until > now => {
                l.until = now + lease;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
    async fn complete(&self, job: &Job) -> Result<bool> {
        if !self.holds(job) {
            return Ok(false);
        }
        self.leases().remove(&job.file_id);
        self.store.dequeue_file_id(&job.file_id)?;
        Ok(true)
    }
    async fn fail(&self, job: &Job, max_attempts: u32) -> Result<Retry> {
        if !self.holds(job) {
            return Ok(Retry::LeaseLost);
        }
        if job.attempts >= max_attempts {
            self.leases().remove(&job.file_id);
            self.store.dequeue_file_id(&job.file_id)?;
            return Ok(Retry::GaveUp);
        }
        // Expire the lease but keep the attempt count for the next claim.
        if let Some(l) = self.leases().get_mut(&job.file_id) {
            l.until = Instant::now();
        }
        Ok(Retry::Requeued)
    }
    async fn pending(&self, limit: usize) -> Result<Vec<String>> {
        let mut q = self.store.queued_files()?;
        q.truncate(limit);
        Ok(q)
    }
    async fn is_queued(&self, file_id: &str) -> Result<bool> {
        Ok(self.store.is_queued(file_id)?)
    }

    // Ingest slice (issue 11).
    async fn claim_file(&self, file_id: &str, lease: Duration) -> Result<Option<Job>> {
        if !self.store.is_queued(file_id)? {
            return Ok(None);
        }
        let now = Instant::now();
        let mut leases = self.leases();
        let attempts = match leases.get(file_id) {
            Some(l) if l.until > now => return Ok(None),
            Some(l) => l.attempts + 1,
            None => 1,
        };
        let token = uuid::Uuid::new_v4().to_string();
        leases.insert(
            file_id.to_string(),
            Lease {
                token: token.clone(),
                until: now + lease,
                attempts,
            },
        );
        Ok(Some(Job {
            file_id: file_id.to_string(),
            attempts,
            token,
        }))
    }
}

/// Blobs as files in one directory, written to a temporary name and renamed, so a reader
/// never sees half a blob.
pub struct DirBlobs {
    dir: PathBuf,
}

impl DirBlobs {
    #[must_use]
    pub fn new(dir: PathBuf) -> DirBlobs {
        DirBlobs { dir }
    }
}

#[async_trait]
impl Blobs for DirBlobs {
    async fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        check_key(key)?;
        tokio::fs::create_dir_all(&self.dir).await?;
        let tmp = self
            .dir
            .join(format!(".{key}.{}.tmp", uuid::Uuid::new_v4().simple()));
        tokio::fs::write(&tmp, data).await?;
        if let Err(e) = tokio::fs::rename(&tmp, self.dir.join(key)).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.into());
        }
        Ok(())
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        match tokio::fs::read(self.dir.join(key)).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        match tokio::fs::remove_file(self.dir.join(key)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    // --- library ---
    async fn put_file(&self, key: &str, from: &Path) -> Result<()> {
        check_key(key)?;
        tokio::fs::create_dir_all(&self.dir).await?;
        let to = self.dir.join(key);
        // A rename when `from` is on the blob dir's file system (uploads are received in
        // the blob dir), a copy otherwise: readers never see half a blob either way.
        if tokio::fs::rename(from, &to).await.is_ok() {
            return Ok(());
        }
        let tmp = self
            .dir
            .join(format!(".{key}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let copied = async {
            tokio::fs::copy(from, &tmp).await?;
            tokio::fs::File::open(&tmp).await?.sync_all().await?;
            tokio::fs::rename(&tmp, &to).await
        }
        .await;
        if let Err(e) = copied {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.into());
        }
        tokio::fs::remove_file(from).await?;
        Ok(())
    }
    // Ingest slice (issue 11).
    fn local_path(&self, key: &str) -> Option<PathBuf> {
        check_key(key).ok()?;
        Some(self.dir.join(key))
    }
}

/// Fixed-window counters in memory, at most `capacity` keys: when full, expired windows
/// go first, then the window ending soonest (it has the least left to count).
pub struct MemoryCounters {
    capacity: usize,
    map: Mutex<HashMap<String, (u64, Instant)>>,
}

impl MemoryCounters {
    #[must_use]
    pub fn new(capacity: usize) -> MemoryCounters {
        MemoryCounters {
            capacity: capacity.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Keys currently held.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl Counters for MemoryCounters {
    async fn increment(&self, key: &str, window: Duration) -> Result<(u64, Duration)> {
        check_key(key)?;
        let now = Instant::now();
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !map.contains_key(key) && map.len() >= self.capacity {
            map.retain(|_, (_, end)| *end > now);
            if map.len() >= self.capacity
                && let Some(victim) = map
                    .iter()
                    .min_by_key(|(_, (_, end))| *end)
                    .map(|(k, _)| k.clone())
            {
                map.remove(&victim);
            }
        }
        let entry = map.entry(key.to_string()).or_insert((0, now + window));
        if entry.1 <= now {
            *entry = (0, now + window);
        }
        entry.0 = entry.0.saturating_add(1);
        Ok((entry.0, entry.1 - now))
    }
    async fn get(&self, key: &str) -> Result<u64> {
        check_key(key)?;
        let map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(map
            .get(key)
            .filter(|(_, end)| *end > Instant::now())
            .map_or(0, |(n, _)| *n))
    }
}

/// Signals within one process.
pub struct LocalSignals {
    tx: broadcast::Sender<Signal>,
}

impl LocalSignals {
    #[must_use]
    pub fn new() -> LocalSignals {
        LocalSignals {
            tx: broadcast::channel(SIGNAL_CAPACITY).0,
        }
    }
}

impl Default for LocalSignals {
    fn default() -> Self {
        Self::new()
    }
}

/// The buckets in this process's memory ([`Limiter`]): answered without awaiting anything,
/// so the seam costs what the direct call costs, and never failing.
#[async_trait]
impl RateLimits for Limiter {
    async fn admit(&self, applied: &Applied) -> Result<Result<(), Refused>> {
        Ok(Limiter::admit(self, applied))
    }
    async fn charge(&self, applied: &Applied, tokens: u64) -> Result<()> {
        Limiter::charge(self, applied, tokens);
        Ok(())
    }
    fn len(&self) -> usize {
        Limiter::len(self)
    }
}

#[async_trait]
impl Signals for LocalSignals {
    async fn publish(&self, signal: &Signal) -> Result<()> {
        // No subscriber is not an error: nothing caches yet.
        let _ = self.tx.send(signal.clone());
        Ok(())
    }
    fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counters_stay_within_capacity_and_evict_the_soonest_ending_window() {
        let c = MemoryCounters::new(3);
        let long = Duration::from_secs(3600);
        c.increment("a", Duration::from_secs(60)).await.unwrap();
        c.increment("b", long).await.unwrap();
        c.increment("c", long).await.unwrap();
        c.increment("d", long).await.unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.get("a").await.unwrap(),
            0,
            "the soonest-ending window went"
        );
        assert_eq!(c.get("d").await.unwrap(), 1);
        for _ in 0..10_000 {
            c.increment(&format!("k{}", uuid::Uuid::new_v4()), long)
                .await
                .unwrap();
        }
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn merge_keeps_the_best_score_per_chunk() {
        let hits = merge(vec![vec![(1, 0.5), (2, 0.9)], vec![(1, 0.7), (3, 0.1)]], 2);
        assert_eq!(hits, vec![(2, 0.9), (1, 0.7)]);
    }
}
