//! The one error type every locally produced HTTP error goes through.
//!
//! Bodies carry both Open WebUI's `{"detail": ...}` and an OpenAI-style `error` object, so
//! Open WebUI clients and OpenAI SDKs can each read the message the way they expect.

use bytes::Bytes;
use serde_json::json;

/// An error answered by ragway itself (not relayed from an upstream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: u16, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(400, detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(401, detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(403, detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(404, detail)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(500, detail)
    }

    /// The OpenAI `error.type` that matches the status.
    fn openai_type(&self) -> &'static str {
        match self.status {
            400 | 405 | 411 | 413 | 414 | 415 | 422 | 431 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            502..=504 => "upstream_error",
            _ => "api_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v = json!({
            "detail": self.detail,
            "error": {
                "message": self.detail,
                "type": self.openai_type(),
                "code": self.status,
            }
        });
        Bytes::from(serde_json::to_vec(&v).expect("json"))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.detail)
    }
}

/// Messages shared with Open WebUI, so clients matching on text keep working.
pub mod msg {
    pub const NOT_AUTHENTICATED: &str = "Not authenticated";
    pub const INVALID_TOKEN: &str = "401 Unauthorized";
    pub const ACCESS_PROHIBITED: &str = "You do not have permission to access this resource. Please contact your administrator for assistance.";
    pub const MODEL_NOT_FOUND: &str = "Model not found";
    pub const NOT_FOUND: &str = "We could not find what you're looking for :/";
    pub const INVALID_CRED: &str = "The email or password provided is incorrect. Please check for typos and try logging in again.";
    pub const EMAIL_TAKEN: &str = "Uh-oh! This email is already registered. Sign in with your existing account or choose another email to start anew.";
    pub const RATE_LIMITED: &str = "API rate limit exceeded";
    pub const API_KEY_NOT_ALLOWED: &str = "API key creation is not allowed in the environment.";
    pub const API_KEY_DISABLED: &str = "Use of API key is not enabled in the environment.";
    pub const API_KEY_NOT_FOUND: &str = "API key not found";
    pub const SESSION_EXPIRED: &str =
        "Your session has expired or the token is invalid. Please sign in again.";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_both_shapes() {
        let v: serde_json::Value =
            serde_json::from_slice(&ApiError::bad_request("Model not found").body()).unwrap();
        assert_eq!(v["detail"], "Model not found");
        assert_eq!(v["error"]["message"], "Model not found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], 400);
    }

    #[test]
    fn oversized_requests_are_the_clients_error() {
        for status in [411, 413, 414, 431] {
            let e = ApiError::new(status, "too big");
            assert_eq!(e.openai_type(), "invalid_request_error", "{status}");
        }
        assert_eq!(ApiError::new(500, "x").openai_type(), "api_error");
    }
}
