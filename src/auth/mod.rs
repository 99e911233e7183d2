//! Who is calling: credential extraction, API keys, JWT sessions and role checks.
//!
//! A credential is taken from `Authorization: Bearer`, then the `token` cookie, then the
//! configured API-key header (Open WebUI's order). A credential starting with `sk-` is an
//! API key, anything else a JWT.

pub mod jwt;
pub mod password;
pub mod ratelimit;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::AuthConfig;
use crate::error::{ApiError, msg};
use crate::http::router::Access;
use crate::metrics;
use crate::store::{ApiKeyRecord, Role, Store, User};

/// How the caller proved who they are.
#[derive(Debug, Clone)]
pub enum Credential {
    Jwt { jti: String, exp: Option<u64> },
    ApiKey,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: User,
    pub credential: Credential,
    /// Models this caller may use; `None` means all.
    pub allowed_models: Option<Arc<[String]>>,
}

impl Identity {
    pub fn may_use_model(&self, id: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|m| m.iter().any(|a| a == id))
    }
}

/// A freshly generated key: the plaintext (shown once) and what is stored.
pub struct NewKey {
    pub plaintext: String,
    pub hash: String,
}

/// `sk-` + 32 lowercase hex characters, Open WebUI's format.
pub fn generate_key() -> NewKey {
    let plaintext = format!("sk-{}", uuid::Uuid::new_v4().simple());
    let hash = hash_key(&plaintext);
    NewKey { plaintext, hash }
}

/// Keys are looked up by SHA-256: the key has 122 random bits, so a fast hash is safe, and
/// lookup by hash never compares secrets byte by byte.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// How long a verified API key is trusted without re-reading the store.
const KEY_CACHE_TTL: Duration = Duration::from_secs(30);

/// The authentication service, shared by all requests.
pub struct Auth {
    pub config: AuthConfig,
    pub jwt: jwt::JwtKeys,
    pub store: Arc<Store>,
    pub limiter: ratelimit::SigninLimiter,
    /// Verified API keys (by hash) → (record, user, verified at). Invalidated whenever a
    /// key is created or deleted, so a revoked key stops working at once.
    key_cache: RwLock<HashMap<String, (ApiKeyRecord, User, Instant)>>,
}

impl Auth {
    pub fn new(config: AuthConfig, secret: &[u8], store: Arc<Store>) -> Auth {
        Auth {
            limiter: ratelimit::SigninLimiter::new(config.signin_attempts, config.signin_window),
            config,
            jwt: jwt::JwtKeys::new(secret),
            store,
            key_cache: RwLock::new(HashMap::new()),
        }
    }

    pub fn forget_cached_keys(&self) {
        self.key_cache.write().expect("key cache poisoned").clear();
    }

    /// The raw credential of a request, if any.
    pub fn credential<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        if let Some(v) = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            && let Some((scheme, cred)) = v.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
            && !cred.trim().is_empty()
        {
            return Some(cred.trim());
        }
        for cookie in headers.get_all(http::header::COOKIE) {
            let Ok(cookie) = cookie.to_str() else {
                continue;
            };
            for pair in cookie.split(';') {
                if let Some(v) = pair.trim().strip_prefix("token=")
                    && !v.is_empty()
                {
                    return Some(v);
                }
            }
        }
        headers
            .get(self.config.api_key_header.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// Authenticates a request and checks it against the route's access level.
    pub fn check(&self, headers: &HeaderMap, access: Access) -> Result<Option<Identity>, ApiError> {
        if access == Access::Public {
            // Public routes still learn who is calling when a valid credential is sent.
            return Ok(self.credential(headers).and_then(|c| self.identify(c).ok()));
        }
        let Some(cred) = self.credential(headers) else {
            metrics::auth_failure("missing");
            return Err(ApiError::unauthorized(msg::NOT_AUTHENTICATED));
        };
        let identity = self.identify(cred)?;
        let allowed = match access {
            Access::Public | Access::Session => true,
            Access::Verified => matches!(identity.user.role, Role::User | Role::Admin),
            Access::Admin => identity.user.role == Role::Admin,
        };
        if !allowed {
            metrics::auth_failure("role");
            // Open WebUI answers 401 (not 403) for an insufficient role.
            return Err(ApiError::unauthorized(msg::ACCESS_PROHIBITED));
        }
        Ok(Some(identity))
    }

    fn identify(&self, cred: &str) -> Result<Identity, ApiError> {
        if cred.starts_with("sk-") {
            self.identify_key(cred)
        } else {
            self.identify_jwt(cred)
        }
    }

    fn identify_key(&self, key: &str) -> Result<Identity, ApiError> {
        if !self.config.enable_api_keys {
            metrics::auth_failure("api_keys_disabled");
            return Err(ApiError::forbidden(msg::API_KEY_DISABLED));
        }
        let hash = hash_key(key);
        let cached = self
            .key_cache
            .read()
            .expect("key cache poisoned")
            .get(&hash)
            .filter(|(_, _, at)| at.elapsed() < KEY_CACHE_TTL)
            .map(|(r, u, _)| (r.clone(), u.clone()));
        let (record, user) = match cached {
            Some(hit) => hit,
            None => {
                let Some(record) = self.store.api_key_by_hash(&hash)? else {
                    metrics::auth_failure("invalid_api_key");
                    return Err(ApiError::unauthorized(msg::INVALID_TOKEN));
                };
                let Some(user) = self.store.user_by_id(&record.user_id)? else {
                    metrics::auth_failure("invalid_api_key");
                    return Err(ApiError::unauthorized(msg::INVALID_TOKEN));
                };
                let mut cache = self.key_cache.write().expect("key cache poisoned");
                if cache.len() > 10_000 {
                    cache.clear();
                }
                cache.insert(hash, (record.clone(), user.clone(), Instant::now()));
                (record, user)
            }
        };
        let allowed_models = self.allowed_models(&user, &record.models);
        Ok(Identity {
            user,
            credential: Credential::ApiKey,
            allowed_models,
        })
    }

    fn identify_jwt(&self, token: &str) -> Result<Identity, ApiError> {
        let Some(claims) = self.jwt.verify(token) else {
            metrics::auth_failure("invalid_token");
            return Err(ApiError::unauthorized(msg::INVALID_TOKEN));
        };
        if self.store.is_token_revoked(&claims.jti)? {
            metrics::auth_failure("revoked_token");
            return Err(ApiError::unauthorized("Invalid token"));
        }
        let Some(user) = self.store.user_by_id(&claims.id)? else {
            metrics::auth_failure("unknown_user");
            return Err(ApiError::unauthorized(msg::SESSION_EXPIRED));
        };
        let allowed_models = self.allowed_models(&user, &[]);
        Ok(Identity {
            user,
            credential: Credential::Jwt {
                jti: claims.jti,
                exp: claims.exp,
            },
            allowed_models,
        })
    }

    /// The intersection of the user's configured allow-list and the key's own list.
    fn allowed_models(&self, user: &User, key_models: &[String]) -> Option<Arc<[String]>> {
        let user_list = self.config.model_access.get(&user.email);
        match (user_list, key_models.is_empty()) {
            (None, true) => None,
            (Some(u), true) => Some(u.clone().into()),
            (None, false) => Some(key_models.to_vec().into()),
            (Some(u), false) => Some(
                key_models
                    .iter()
                    .filter(|m| u.contains(m))
                    .cloned()
                    .collect::<Vec<_>>()
                    .into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_format() {
        let k = generate_key();
        assert_eq!(k.plaintext.len(), 35);
        assert!(k.plaintext.starts_with("sk-"));
        assert!(
            k.plaintext[3..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(k.hash, hash_key(&k.plaintext));
        assert_ne!(k.hash, k.plaintext);
    }
}
