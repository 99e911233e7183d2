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

// --- accounts: authentication and account management ---

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError as E;
        use crate::error::msg;
        match e {
            E::NotAuthenticated => ApiError::unauthorized(msg::NOT_AUTHENTICATED),
            E::InvalidToken => ApiError::unauthorized(msg::INVALID_TOKEN),
            E::RevokedToken => ApiError::unauthorized("Invalid token"),
            E::SessionExpired => ApiError::unauthorized(msg::SESSION_EXPIRED),
            E::ApiKeysDisabled => ApiError::forbidden(msg::API_KEY_DISABLED),
            E::KeysNotAllowed => ApiError::forbidden(msg::API_KEY_NOT_ALLOWED),
            E::RestrictedKey => ApiError::forbidden(crate::auth::RESTRICTED_KEY),
            // Open WebUI answers 401 (not 403) for an insufficient role.
            E::RoleDenied => ApiError::unauthorized(msg::ACCESS_PROHIBITED),
            E::SignupDisabled => ApiError::forbidden(msg::ACCESS_PROHIBITED),
            E::InvalidCredentials => ApiError::bad_request(msg::INVALID_CRED),
            E::IncorrectPassword => ApiError::bad_request("Incorrect password"),
            E::EmailTaken => ApiError::bad_request(msg::EMAIL_TAKEN),
            E::Invalid(m) => ApiError::bad_request(m),
            E::Forbidden(m) => ApiError::forbidden(m),
            E::NotFound(m) => ApiError::not_found(m),
            E::RateLimited(_) => ApiError::new(429, msg::RATE_LIMITED),
            E::HashingBusy(_) => ApiError::new(
                503,
                "Too many sign-in attempts are being processed; retry shortly",
            ),
            E::HashingFailed => ApiError::internal("Password hashing failed"),
            E::Storage(e) => storage_answer(e),
        }
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

// Ingest slice (issue 11).
impl From<crate::ingest::IngestError> for ApiError {
    fn from(e: crate::ingest::IngestError) -> Self {
        let crate::ingest::IngestError::Storage(e) = e;
        e.into()
    }
}

/// A storage failure as an answer (the `From` impl above: 500, or 503 while the process
/// hands over, logged).
pub(crate) fn storage_answer(e: crate::storage::StorageError) -> ApiError {
    e.into()
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
