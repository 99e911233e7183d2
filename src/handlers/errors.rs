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

// Ingest slice (issue 11).
impl From<crate::ingest::IngestError> for ApiError {
    fn from(e: crate::ingest::IngestError) -> Self {
        use crate::storage::StorageError;
        let crate::ingest::IngestError::Storage(e) = e;
        match e {
            StorageError::Embedded(s) => s.into(),
            e => {
                tracing::error!(error = %e, "storage failure");
                ApiError::internal("Internal storage error; see the server log")
            }
        }
    }
}
