//! The one place where the domain errors of the layers below become HTTP answers
//! ([`ApiError`]): storage failures are 500 (503 while the process hands over), never a 404.

use crate::error::ApiError;
use crate::store::StoreError;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if matches!(e, StoreError::Released) {
            // Only a request still in flight in a process being upgraded gets here; the
            // new process (already accepting) answers the retry.
            return ApiError::new(503, "ragway is restarting; retry the request");
        }
        tracing::error!(error = %e, "store failure");
        ApiError::internal("Internal storage error; see the server log")
    }
}

// --- retrieval (chat with files, the retrieval API, presets' knowledge) ---

impl From<crate::rag::RetrieveError> for ApiError {
    fn from(e: crate::rag::RetrieveError) -> Self {
        use crate::rag::RetrieveError as E;
        use crate::storage::StorageError;
        let e = match e {
            // The redb store's own conversion: 503 while the process hands over.
            E::Storage(StorageError::Embedded(e)) => return e.into(),
            E::Storage(e) => {
                tracing::error!(error = %e, "storage failure during retrieval");
                return ApiError::internal("Internal storage error; see the server log");
            }
            e => e,
        };
        let status = match &e {
            E::FileNotFound(_) | E::CollectionNotFound(_) => 404,
            E::StillProcessing(_) => 409,
            E::FileFailed { .. }
            | E::NotProcessed(_)
            | E::UnsupportedType { .. }
            | E::TooManyItems { .. }
            | E::Bm25ParamsUnsupported => 400,
            E::MissingField { .. } => 422,
            E::TooMuchContext { .. } => 413,
            E::EmbedderUnavailable(_) => 503,
            E::EmbedFailed(_) => 502,
            E::Storage(_) => 500,
        };
        ApiError::new(status, e.to_string())
    }
}
