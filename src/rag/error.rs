//! What retrieval can refuse or fail at. The HTTP status of each is decided in one place,
//! `handlers/errors.rs`; the messages are the ones clients see.

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RetrieveError {
    /// Missing, or not readable by the caller (the two are not told apart).
    #[error("File {0} not found")]
    FileNotFound(String),
    /// Missing, or not readable by the caller.
    #[error("Knowledge collection {0} not found")]
    CollectionNotFound(String),
    /// Still pending after the bounded wait.
    #[error("File {0} is still being processed")]
    StillProcessing(String),
    #[error("File {id} could not be processed: {error}")]
    FileFailed { id: String, error: String },
    #[error("File {0} was uploaded with process=false and has no content")]
    NotProcessed(String),
    /// A `files` item lacks a field it needs.
    #[error("files[{index}]: {message}")]
    MissingField { index: usize, message: &'static str },
    #[error("files[{index}]: type {kind:?} is not supported (use file, collection or text)")]
    UnsupportedType { index: usize, kind: String },
    #[error("Too many files items: at most {max} distinct items per request (rag.max-items)")]
    TooManyItems { max: usize },
    /// The injected text would exceed `rag.max-context-kb` (`limit` is in bytes).
    #[error(
        "Too much context for one request: the limit is {} KiB (rag.max-context-kb); \
         attach fewer or smaller files, or use retrieval instead of full context",
        limit / 1024
    )]
    TooMuchContext { limit: usize },
    #[error("Embedding engine unavailable: {0}")]
    EmbedderUnavailable(String),
    #[error("Embedding the query failed: {0}")]
    EmbedFailed(String),
    /// BM25 `k1`/`b` other than the defaults, on a backend whose lexical ranking has none.
    #[error(
        "this storage backend's lexical ranking is not BM25: it has no k1 or b to set \
         (measure BM25 parameters on the embedded backend)"
    )]
    Bm25ParamsUnsupported,
    /// The storage backend failed; never a "not found".
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<crate::store::StoreError> for RetrieveError {
    fn from(e: crate::store::StoreError) -> Self {
        RetrieveError::Storage(e.into())
    }
}

impl From<crate::ingest::IngestError> for RetrieveError {
    fn from(e: crate::ingest::IngestError) -> Self {
        let crate::ingest::IngestError::Storage(e) = e;
        RetrieveError::Storage(e)
    }
}
