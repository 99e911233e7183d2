//! What authentication and account management can refuse, or fail at. The HTTP answer of
//! each (status, Open WebUI's message, `Retry-After`) is decided in one place,
//! `handlers::errors`.

use std::time::Duration;

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential on a route that needs one.
    #[error("not authenticated")]
    NotAuthenticated,
    /// A credential that is malformed, forged, expired or unknown.
    #[error("invalid credential")]
    InvalidToken,
    /// A signed-out session token.
    #[error("revoked session token")]
    RevokedToken,
    /// A session whose user is gone, or whose sessions were ended (password or role change).
    #[error("session expired")]
    SessionExpired,
    #[error("API keys are disabled")]
    ApiKeysDisabled,
    /// Key management by a pending user, or with API keys disabled.
    #[error("API key management is not allowed")]
    KeysNotAllowed,
    /// A key restricted to some models, outside model use.
    #[error("restricted API key")]
    RestrictedKey,
    /// The caller's role is below the route's.
    #[error("role not allowed")]
    RoleDenied,
    #[error("sign-up is disabled")]
    SignupDisabled,
    #[error("wrong email or password")]
    InvalidCredentials,
    #[error("wrong current password")]
    IncorrectPassword,
    #[error("email already registered")]
    EmailTaken,
    /// A field the caller sent is not acceptable; the message says which and why.
    #[error("{0}")]
    Invalid(String),
    /// An account rule forbids the change; the message says which.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The user (or their key) named by the caller does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Too many sign-in attempts; retry after the duration.
    #[error("too many sign-in attempts")]
    RateLimited(Duration),
    /// Every password-hashing slot and queue place is taken; retry after the duration.
    #[error("password hashing is busy")]
    HashingBusy(Duration),
    #[error("password hashing failed")]
    HashingFailed,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl AuthError {
    /// How long the client should wait before retrying, when the refusal is temporary.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AuthError::RateLimited(d) | AuthError::HashingBusy(d) => Some(*d),
            _ => None,
        }
    }
}

impl From<crate::store::StoreError> for AuthError {
    fn from(e: crate::store::StoreError) -> Self {
        AuthError::Storage(e.into())
    }
}
