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

// --- library (files, collections, presets) and the storage seams beneath it ---

impl From<crate::storage::StorageError> for ApiError {
    fn from(e: crate::storage::StorageError) -> Self {
        match e {
            crate::storage::StorageError::Embedded(e) => e.into(),
            other => {
                tracing::error!(error = %other, "storage failure");
                ApiError::internal("Internal storage error; see the server log")
            }
        }
    }
}

impl From<crate::library::LibraryError> for ApiError {
    fn from(e: crate::library::LibraryError) -> Self {
        use crate::library::LibraryError;
        match e {
            LibraryError::NotInCollection(_) => ApiError::bad_request(e.to_string()),
            LibraryError::Storage(e) => e.into(),
        }
    }
}
