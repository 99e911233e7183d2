//! Storage seams: what ragway needs of its storage, as traits a backend implements.
//!
//! Two backends implement every trait:
//! - [`embedded`]: the redb [`Store`](crate::store::Store), the in-process vector and BM25
//!   indexes ([`VectorStore`](crate::storage::embedded::vectors::VectorStore)) and in-memory leases,
//!   counters and signals. One process; the default.
//! - [`postgres`]: PostgreSQL + pgvector, shared by any number of replicas.
//!
//! Both pass one conformance suite (`tests/storage_conformance.rs`) unchanged. The traits
//! are async because a network backend needs it; the embedded backend answers without
//! awaiting anything, so it costs what the direct calls cost.
//!
//! [`Storage`] bundles one backend's implementations; `App::open` builds the configured
//! one, and services and handlers see nothing else.

pub mod embedded;
pub mod postgres;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::index::bm25::Bm25Params;
use crate::limits::{Applied, Refused};
use crate::store::{
    ApiKeyRecord, ChunkRecord, FileRecord, FileStatus, KnowledgeRecord, PresetRecord,
    PresetRefusal, StoreError, UsageCounts, UsageKey, User,
};

/// Failures of a storage backend. Messages say what failed; none of them is the user's
/// doing, except [`StorageError::EmailTaken`], [`StorageError::NoSuchUser`] and
/// [`StorageError::InvalidKey`], which handlers turn into 4xx replies.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("email already registered")]
    EmailTaken,
    #[error("no such user")]
    NoSuchUser,
    #[error("not found")]
    NotFound,
    /// A blob or counter key the backend refuses (empty, too long, or a path).
    #[error("invalid storage key: {0}")]
    InvalidKey(String),
    #[error(transparent)]
    Embedded(StoreError),
    #[error("blob storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("corrupt record in {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
}

impl From<StoreError> for StorageError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::EmailTaken => StorageError::EmailTaken,
            StoreError::NoSuchUser => StorageError::NoSuchUser,
            StoreError::NotFound => StorageError::NotFound,
            other => StorageError::Embedded(other),
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A change to a user, applied inside the backend's read-modify-write transaction. `Err`
/// leaves the user unchanged and is handed back to the caller.
pub type UserChange = Box<dyn FnOnce(&mut User) -> Result<(), String> + Send>;

/// Users, API keys, sessions, settings, files, collections and usage rows.
#[async_trait]
pub trait Metadata: Send + Sync {
    /// Whether the backend answers (the `/ready` probe).
    async fn ping(&self) -> bool;

    async fn user_count(&self) -> Result<u64>;
    /// Inserts a user; when `first_is_admin` and there is none yet, the user becomes the
    /// (primary) admin, decided atomically with the insert.
    async fn create_user(&self, user: User, first_is_admin: bool) -> Result<User>;
    async fn users(&self) -> Result<Vec<User>>;
    async fn user_by_id(&self, id: &str) -> Result<Option<User>>;
    async fn user_by_email(&self, email: &str) -> Result<Option<User>>;
    /// Read, `change`, write in one transaction; `Ok(Err(_))` is `change`'s refusal.
    async fn update_user(&self, id: &str, change: UserChange) -> Result<Result<User, String>>;
    /// Removes a user with their API key and records the deletion (their files and
    /// collections are removed afterwards, see [`Metadata::pending_user_deletions`]).
    async fn delete_user(&self, id: &str) -> Result<Option<User>>;
    async fn pending_user_deletions(&self) -> Result<Vec<String>>;
    async fn finish_user_deletion(&self, id: &str) -> Result<()>;
    async fn primary_admin(&self) -> Result<Option<String>>;

    /// Replaces the user's API key (one per user).
    async fn put_api_key(&self, hash: &str, record: &ApiKeyRecord) -> Result<()>;
    async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>>;
    async fn api_key_of_user(&self, user_id: &str) -> Result<Option<(String, ApiKeyRecord)>>;
    async fn delete_api_key_of_user(&self, user_id: &str) -> Result<Option<String>>;

    /// A signed-out JWT id, remembered until `exp` (epoch seconds; `None` = forever).
    async fn revoke_token(&self, jti: &str, exp: Option<u64>) -> Result<()>;
    async fn is_token_revoked(&self, jti: &str) -> Result<bool>;

    async fn setting(&self, key: &str) -> Result<Option<String>>;
    async fn set_setting(&self, key: &str, value: &str) -> Result<()>;

    /// Stores a new (or replaced) file record. Queueing it is the [`WorkQueue`]'s job.
    async fn insert_file(&self, file: &FileRecord) -> Result<()>;
    async fn file(&self, id: &str) -> Result<Option<FileRecord>>;
    async fn files(&self) -> Result<Vec<FileRecord>>;
    /// Replaces a record that exists ([`StorageError::NotFound`] otherwise).
    async fn update_file(&self, file: &FileRecord) -> Result<()>;
    async fn file_text(&self, id: &str) -> Result<Option<String>>;
    /// Deletes a file with its chunks, queue entry and memberships; returns the record
    /// and the collections it was in.
    async fn delete_file(&self, id: &str) -> Result<Option<(FileRecord, Vec<String>)>>;

    async fn put_knowledge(&self, kb: &KnowledgeRecord) -> Result<()>;
    async fn knowledge(&self, id: &str) -> Result<Option<KnowledgeRecord>>;
    async fn knowledges(&self) -> Result<Vec<KnowledgeRecord>>;
    async fn knowledge_files(&self, id: &str) -> Result<Vec<String>>;
    async fn file_knowledge(&self, file_id: &str) -> Result<Vec<String>>;
    /// False when already linked or the file does not exist.
    async fn link_file(&self, kb: &str, file_id: &str) -> Result<bool>;
    async fn unlink_file(&self, kb: &str, file_id: &str) -> Result<bool>;
    async fn delete_knowledge(&self, kb: &str) -> Result<bool>;

    /// Adds counts to usage rows and drops rows of hours before `keep_from_hour`.
    async fn add_usage(&self, rows: &[(UsageKey, UsageCounts)], keep_from_hour: u64) -> Result<()>;
    /// Rows with `from_hour <= hour < to_hour` in key order, at most `limit`.
    async fn scan_usage(
        &self,
        from_hour: u64,
        to_hour: u64,
        limit: usize,
    ) -> Result<Vec<(UsageKey, UsageCounts)>>;

    // --- migrate slice (`ragway migrate`): reading everything a copy needs ---
    /// Every setting, in key order.
    async fn all_settings(&self) -> Result<Vec<(String, String)>>;
    /// Revoked JWT ids not yet expired, with their expiry (`None` = never), in id order.
    async fn revoked_tokens(&self) -> Result<Vec<(String, Option<u64>)>>;
    // --- accounts (sign-in, keys, users, limits) ---

    /// Replaces the limits of the user's API key in one transaction (a key replaced at the
    /// same moment is never revived); `None` when the user has no key.
    async fn set_api_key_limits(
        &self,
        user_id: &str,
        limits: crate::limits::Limits,
    ) -> Result<Option<ApiKeyRecord>>;
    // --- library: model presets ---
    async fn preset(&self, id: &str) -> Result<Option<PresetRecord>>;
    /// Every stored preset, in id (byte) order.
    async fn presets(&self) -> Result<Vec<PresetRecord>>;
    /// Inserts a new preset unless its id is taken or a bound is reached, checked and
    /// inserted atomically (concurrent creations, on any replica, cannot pass a bound
    /// together). `Ok(Err(_))` says which refusal.
    async fn insert_preset(
        &self,
        rec: &PresetRecord,
        max_per_user: usize,
        max_total: usize,
    ) -> Result<Result<(), PresetRefusal>>;
    /// Replaces a preset that still exists; false when it was deleted meanwhile.
    async fn update_preset(&self, rec: &PresetRecord) -> Result<bool>;
    async fn delete_preset(&self, id: &str) -> Result<bool>;
}

/// Where a search looks: the chunks of these collections and these files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub collections: Vec<String>,
    pub files: Vec<String>,
}

/// A search hit: chunk id and score (higher is better; cosine similarity for dense search).
pub type Hit = (u64, f32);

/// Chunks, their vectors and their lexical index. Membership changes made through
/// [`Metadata`] (link, unlink, delete) are seen by the next search: a backend keeps its
/// indexes consistent with its metadata itself.
#[async_trait]
pub trait Chunks: Send + Sync {
    /// Commits a processed file at once: chunks (one vector each), text, the completed
    /// record, and takes it off the queue. Chunks of an earlier processing are replaced.
    /// Returns the new chunk ids, in order.
    async fn complete_file(
        &self,
        file: &FileRecord,
        text: &str,
        chunks: &[ChunkRecord],
        vectors: &[Vec<f32>],
    ) -> Result<Vec<u64>>;
    /// Records a failure: the record is written, earlier chunks removed, queue entry gone.
    async fn fail_file(&self, file: &FileRecord) -> Result<()>;
    async fn file_chunk_ids(&self, file_id: &str) -> Result<Vec<u64>>;
    /// Chunk records by id; missing ids are skipped.
    async fn chunks(&self, ids: &[u64]) -> Result<Vec<(u64, ChunkRecord)>>;
    /// The `k` chunks nearest to `query` (cosine) within `scope`, best first.
    async fn dense_search(&self, scope: &Scope, query: &[f32], k: usize) -> Result<Vec<Hit>>;
    /// The `k` best lexical matches for `query` within `scope`, best first.
    async fn lexical_search(&self, scope: &Scope, query: &str, k: usize) -> Result<Vec<Hit>>;

    // --- migrate slice (`ragway migrate`): exact copies between backends ---
    /// A processed file's chunk ids with their vectors, in chunk order.
    async fn file_vectors(&self, file_id: &str) -> Result<Vec<(u64, Vec<f32>)>>;
    /// Writes a processed file exactly as another backend holds it: the record, its text,
    /// and its chunks under the ids given (not new ones) with the vectors given, so ids
    /// and vectors survive a move unchanged (nothing is re-embedded). Otherwise as
    /// [`Chunks::complete_file`]: earlier chunks of the file are replaced and it leaves
    /// the queue. Ids this backend gives out later are above every id imported; an id
    /// held by another file is refused.
    async fn import_file(
        &self,
        file: &FileRecord,
        text: &str,
        chunks: &[(u64, ChunkRecord)],
        vectors: &[Vec<f32>],
    ) -> Result<()>;
    // Retrieval: what scoring and ranking variants read besides the searches.

    /// Cosine similarity of `query` to each chunk's vector, in the order asked; `None` for
    /// a chunk that has no vector (deleted meanwhile) or one of another dimension. Scores
    /// are computed where the vectors are, so no vector is copied out for it.
    async fn similarities(
        &self,
        query: &[f32],
        chunks: &[ChunkRef<'_>],
    ) -> Result<Vec<Option<f32>>>;
    /// The vectors of these chunks, in the order asked; `None` for a chunk without one.
    async fn vectors(&self, chunks: &[ChunkRef<'_>]) -> Result<Vec<Option<Vec<f32>>>>;
    /// [`Chunks::lexical_search`] with BM25's `k1` and `b` set (`ragway eval` compares
    /// them). `None` from a backend whose lexical ranking is not BM25 with these two
    /// parameters: the caller says so rather than measure the defaults.
    async fn lexical_search_with(
        &self,
        scope: &Scope,
        query: &str,
        k: usize,
        params: Bm25Params,
    ) -> Result<Option<Vec<Hit>>>;
}

/// A chunk id with the file it belongs to (its [`ChunkRecord::file_id`]): a backend that
/// keeps vectors per file finds them without another read; others need only the id.
pub type ChunkRef<'a> = (u64, &'a str);

/// A claimed job: the file to process, how many times it was claimed (this one included)
/// and the lease's token (a lease taken over by someone else no longer matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub file_id: String,
    pub attempts: u32,
    pub token: String,
}

/// What [`WorkQueue::fail`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Back in the queue for another attempt.
    Requeued,
    /// `max_attempts` reached: off the queue.
    GaveUp,
    /// The lease was lost (expired and taken over): nothing done.
    LeaseLost,
}

/// The processing queue, visible to every replica. A claim holds a lease; a job whose
/// lease expires (its worker died) is claimed again by anyone.
#[async_trait]
pub trait WorkQueue: Send + Sync {
    /// Queues a file (again); a file already queued keeps its place.
    async fn enqueue(&self, file_id: &str) -> Result<()>;
    /// The oldest job without a live lease, leased to the caller for `lease`.
    async fn claim(&self, lease: Duration) -> Result<Option<Job>>;
    /// Extends a lease; false when it was lost.
    async fn heartbeat(&self, job: &Job, lease: Duration) -> Result<bool>;
    /// Takes a finished job off the queue; false when the lease was lost.
    async fn complete(&self, job: &Job) -> Result<bool>;
    /// Releases a failed job for a retry, or drops it after `max_attempts` claims.
    async fn fail(&self, job: &Job, max_attempts: u32) -> Result<Retry>;
    /// Queued file ids (leased or not), oldest first, at most `limit`.
    async fn pending(&self, limit: usize) -> Result<Vec<String>>;
    async fn is_queued(&self, file_id: &str) -> Result<bool>;

    // Ingest slice (issue 11): processing one named file now (the CLI, inline callers).
    /// Claims `file_id`'s job when it is queued without a live lease (attempts counted as
    /// by [`WorkQueue::claim`]); `None` when it is not queued or someone holds it.
    async fn claim_file(&self, file_id: &str, lease: Duration) -> Result<Option<Job>>;
}

/// Uploaded file contents by key (ragway uses `{file_id}_{filename}`).
#[async_trait]
pub trait Blobs: Send + Sync {
    async fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Whether there was a blob.
    async fn delete(&self, key: &str) -> Result<bool>;

    // --- library: uploads arrive as local files and large blobs are streamed out ---
    /// Moves the local file at `from` in as blob `key` (replacing one of that key); `from`
    /// is gone on success. Uploads are streamed to a local file first, so no backend needs
    /// a whole upload in memory to receive it.
    async fn put_file(&self, key: &str, from: &Path) -> Result<()>;
    /// Where blob `key` is on this machine's disk, when the backend keeps blobs there
    /// (whether or not it exists): readers then stream it instead of loading it whole.
    fn local_path(&self, key: &str) -> Option<PathBuf>;
}

/// Fixed-window counters shared by every replica (sign-in attempts).
#[async_trait]
pub trait Counters: Send + Sync {
    /// Adds one to `key`'s count in its current window (a new window of length `window`
    /// starts when the last one ended). Returns the count including this one and the time
    /// until the window ends.
    async fn increment(&self, key: &str, window: Duration) -> Result<(u64, Duration)>;
    /// The count in the current window (0 when none).
    async fn get(&self, key: &str) -> Result<u64>;
}

/// Per-key and per-user rate limits ([`crate::limits`]): continuous token buckets, shared
/// by every replica on a shared backend. Both answers follow the rules of
/// [`crate::limits`] (a request needs room for one; a refusal counts nothing; tokens charged
/// afterwards may run a bucket into at most one window of debt), whichever backend keeps
/// the buckets. A request with no limit set on either subject touches no state.
#[async_trait]
pub trait RateLimits: Send + Sync {
    /// Admits one request, counting it in every bucket it draws on, or says which limit
    /// refuses it (nothing is counted then). Checked and counted atomically: concurrent
    /// requests, on any replica, never pass a limit together.
    async fn admit(&self, applied: &Applied) -> Result<Result<(), Refused>>;
    /// Charges the tokens of a finished answer to the token buckets that admitted it.
    async fn charge(&self, applied: &Applied, tokens: u64) -> Result<()>;
    /// Buckets held in this process's memory (a backend that keeps them elsewhere holds
    /// none here): what the process-local bound applies to.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a cache elsewhere must forget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Signal {
    /// An API key (by hash) was deleted or replaced.
    KeyDeleted { hash: String },
    /// A user changed (role, sessions, limits) or was deleted.
    UserChanged { id: String },
    /// A session token (by its `jti`) was signed out.
    TokenRevoked { jti: String },
    /// The model list changed (presets, access).
    ModelsChanged,
    /// A file's processing status changed.
    FileStatus { id: String, status: FileStatus },
}

/// Publish/subscribe for [`Signal`]s, across every replica (the publisher's own
/// subscribers included).
#[async_trait]
pub trait Signals: Send + Sync {
    async fn publish(&self, signal: &Signal) -> Result<()>;
    /// A receiver of every signal published from now on. A receiver that falls behind
    /// by more than the channel's capacity gets `Lagged` and must drop its whole cache.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Signal>;
}

/// One backend's implementations of every seam.
#[derive(Clone)]
pub struct Storage {
    pub meta: Arc<dyn Metadata>,
    pub chunks: Arc<dyn Chunks>,
    pub queue: Arc<dyn WorkQueue>,
    pub blobs: Arc<dyn Blobs>,
    pub counters: Arc<dyn Counters>,
    pub rate_limits: Arc<dyn RateLimits>,
    pub signals: Arc<dyn Signals>,
}

/// Refuses a commit whose chunks and vectors do not pair up: no backend may store a chunk
/// without its vector.
///
/// # Errors
/// [`StorageError::Corrupt`] with both counts.
pub(crate) fn check_paired(chunks: usize, vectors: usize) -> Result<()> {
    if chunks == vectors {
        return Ok(());
    }
    Err(StorageError::Corrupt {
        table: "chunks",
        message: format!("{chunks} chunks but {vectors} vectors"),
    })
}

/// Signals buffered per subscriber before it lags.
pub const SIGNAL_CAPACITY: usize = 1024;

/// Longest blob or counter key accepted.
pub const MAX_KEY_LEN: usize = 512;

/// Refuses keys that are empty, too long, or could address something else (a path,
/// control characters).
///
/// # Errors
/// [`StorageError::InvalidKey`], saying what keys may be.
pub fn check_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.len() > MAX_KEY_LEN
        || key == "."
        || key == ".."
        || key.contains('/')
        || key.contains('\\')
        || key.chars().any(char::is_control);
    if bad {
        let shown: String = key.chars().take(64).collect();
        return Err(StorageError::InvalidKey(format!(
            "{shown:?}: keys are 1 to {MAX_KEY_LEN} bytes, without '/', '\\' or control characters"
        )));
    }
    Ok(())
}
