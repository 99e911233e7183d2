//! Who is calling: credential extraction, API keys, JWT sessions and role checks.
//!
//! A credential is taken from `Authorization: Bearer`, then the `token` cookie, then the
//! configured API-key header (Open WebUI's order). A credential starting with `sk-` is an
//! API key, anything else a JWT.

pub mod access;
pub mod csrf;
pub mod jwt;
pub mod password;
pub mod ratelimit;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// An API key created with its own model list. Such a key may use those models and
    /// nothing that could widen its rights: no key management, no admin routes.
    pub restricted_key: bool,
    /// The API key used, when the credential is one (for limits and usage metering).
    pub key: Option<KeyMeta>,
}

/// What limits and metering need of an API key.
#[derive(Debug, Clone)]
pub struct KeyMeta {
    /// `sk-` and the first hex characters, as listed by `GET /auths/api_key`.
    pub prefix: String,
    pub limits: crate::limits::Limits,
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

/// Verified keys kept in the cache; past this it is emptied (keys are re-read on next use).
const KEY_CACHE_MAX: usize = 10_000;

/// Longest credential looked at. Real ones are far shorter (a key is 35 bytes, a session
/// token ~200); a longer one is refused before any decoding work.
pub const MAX_CREDENTIAL_LEN: usize = 4096;

/// Why a restricted key is refused outside model use.
pub const RESTRICTED_KEY: &str = "This API key is restricted to some models: it cannot manage keys or use admin routes. Use a session or an unrestricted key.";

/// A key as read from the store, with the cache generation current before the read.
pub struct LoadedKey {
    hash: String,
    generation: u64,
    record: ApiKeyRecord,
    user: User,
}

/// The first non-empty value of cookie `name`.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    for header in headers.get_all(http::header::COOKIE) {
        let Ok(header) = header.to_str() else {
            continue;
        };
        for pair in header.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=')
                && k.trim() == name
                && !v.trim().is_empty()
            {
                return Some(v.trim());
            }
        }
    }
    None
}

/// The authentication service, shared by all requests.
pub struct Auth {
    pub config: AuthConfig,
    pub jwt: jwt::JwtKeys,
    /// Tokens that prove a cookie-authenticated write came from the gateway's own page.
    pub csrf: csrf::Csrf,
    pub store: Arc<Store>,
    /// Sign-in attempts per email.
    pub limiter: ratelimit::SigninLimiter,
    /// Sign-in and sign-up attempts per client address.
    pub address_limiter: ratelimit::SigninLimiter,
    /// Bounds password hashing (sign-in, sign-up, add-user).
    pub hashing: password::HashGate,
    /// Verified API keys (by hash) → (record, user, verified at). Invalidated whenever a
    /// key is created or deleted, so a revoked key stops working at once.
    key_cache: RwLock<HashMap<String, (ApiKeyRecord, User, Instant)>>,
    /// Bumped by every invalidation. A lookup that read the store before an invalidation
    /// must not cache what it read after it: it would revive a deleted key for the TTL.
    key_generation: AtomicU64,
}

impl Auth {
    pub fn new(config: AuthConfig, secret: &[u8], store: Arc<Store>) -> Auth {
        Auth {
            limiter: ratelimit::SigninLimiter::new(config.signin_attempts, config.signin_window),
            address_limiter: ratelimit::SigninLimiter::new(
                config.signin_attempts_per_address,
                config.signin_window,
            ),
            hashing: password::HashGate::new(
                config.password_hash_concurrency,
                config.password_hash_queue,
            ),
            config,
            jwt: jwt::JwtKeys::new(secret),
            csrf: csrf::Csrf::new(secret),
            store,
            key_cache: RwLock::new(HashMap::new()),
            key_generation: AtomicU64::new(0),
        }
    }

    /// Call after a key was created or deleted in the store.
    pub fn forget_cached_keys(&self) {
        let mut cache = self.key_cache.write().expect("key cache poisoned");
        // Under the write lock, so no insert can slip between the bump and the clear.
        self.key_generation.fetch_add(1, Ordering::AcqRel);
        cache.clear();
    }

    /// The raw credential of a request, if any.
    pub fn credential<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        self.credential_source(headers).map(|(c, _)| c)
    }

    /// The raw credential and whether it came from the `token` cookie (which a browser
    /// attaches on its own, so writes authenticated by it need a CSRF token).
    pub fn credential_source<'a>(&self, headers: &'a HeaderMap) -> Option<(&'a str, bool)> {
        if let Some(v) = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            && let Some((scheme, cred)) = v.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
            && !cred.trim().is_empty()
        {
            return Some((cred.trim(), false));
        }
        if let Some(v) = cookie(headers, "token") {
            return Some((v, true));
        }
        headers
            .get(self.config.api_key_header.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| (v, false))
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
        if access == Access::Admin && identity.restricted_key {
            metrics::auth_failure("restricted_key");
            return Err(ApiError::forbidden(RESTRICTED_KEY));
        }
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
        if cred.len() > MAX_CREDENTIAL_LEN {
            metrics::auth_failure("invalid_token");
            return Err(ApiError::unauthorized(msg::INVALID_TOKEN));
        }
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
        // A SHA-256 and a map or store lookup: key checks never wait behind password hashing.
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
                let Some(loaded) = self.load_key(&hash)? else {
                    metrics::auth_failure("invalid_api_key");
                    return Err(ApiError::unauthorized(msg::INVALID_TOKEN));
                };
                self.remember_key(loaded)
            }
        };
        let allowed_models = self.allowed_models(&user, &record.models);
        Ok(Identity {
            user,
            credential: Credential::ApiKey,
            allowed_models,
            restricted_key: !record.models.is_empty(),
            key: Some(KeyMeta {
                prefix: record.prefix,
                limits: record.limits,
            }),
        })
    }

    /// Reads a key and its user from the store, noting the cache generation first.
    pub fn load_key(&self, hash: &str) -> Result<Option<LoadedKey>, ApiError> {
        let generation = self.key_generation.load(Ordering::Acquire);
        let Some(record) = self.store.api_key_by_hash(hash)? else {
            return Ok(None);
        };
        let Some(user) = self.store.user_by_id(&record.user_id)? else {
            return Ok(None);
        };
        Ok(Some(LoadedKey {
            hash: hash.to_string(),
            generation,
            record,
            user,
        }))
    }

    /// Caches a loaded key unless the cache was invalidated since it was read; returns it.
    pub fn remember_key(&self, loaded: LoadedKey) -> (ApiKeyRecord, User) {
        let mut cache = self.key_cache.write().expect("key cache poisoned");
        if self.key_generation.load(Ordering::Acquire) == loaded.generation {
            if cache.len() >= KEY_CACHE_MAX {
                cache.clear();
            }
            cache.insert(
                loaded.hash,
                (loaded.record.clone(), loaded.user.clone(), Instant::now()),
            );
        }
        (loaded.record, loaded.user)
    }

    /// Keys in the cache (for tests of its bound and invalidation).
    pub fn cached_keys(&self) -> usize {
        self.key_cache.read().expect("key cache poisoned").len()
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
        if !user.session_valid(claims.ep, &claims.jti) {
            metrics::auth_failure("revoked_session");
            return Err(ApiError::unauthorized(msg::SESSION_EXPIRED));
        }
        let allowed_models = self.allowed_models(&user, &[]);
        Ok(Identity {
            user,
            credential: Credential::Jwt {
                jti: claims.jti,
                exp: claims.exp,
            },
            allowed_models,
            restricted_key: false,
            key: None,
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

    fn auth(dir: &tempfile::TempDir) -> Auth {
        let store = Arc::new(Store::open(&dir.path().join("t.redb")).unwrap());
        let config = AuthConfig {
            secret_key: None,
            jwt_expires_in: None,
            enable_signup: true,
            default_user_role: Role::Pending,
            enable_api_keys: true,
            api_key_header: "x-api-key".into(),
            admin: None,
            signin_attempts: 15,
            signin_window: Duration::from_secs(180),
            signin_attempts_per_address: 60,
            password_hash_concurrency: 1,
            password_hash_queue: 1,
            model_access: HashMap::new(),
        };
        Auth::new(config, b"secret", store)
    }

    fn user_with_key(auth: &Auth, models: Vec<String>) -> (User, String) {
        let user = auth
            .store
            .create_user(
                User::new("a@example.com", "a", Role::User, "x".into()),
                false,
            )
            .unwrap();
        let key = generate_key();
        let record = ApiKeyRecord {
            user_id: user.id.clone(),
            prefix: key.plaintext[..11].to_string(),
            created_at: 0,
            models,
            limits: crate::limits::Limits::default(),
        };
        auth.store.put_api_key(&key.hash, &record).unwrap();
        auth.forget_cached_keys();
        (user, key.plaintext)
    }

    /// A lookup that read the key before it was deleted finishes after the delete: what it
    /// read must not be cached, or the deleted key would work for the cache's TTL.
    #[test]
    fn a_lookup_racing_a_delete_does_not_revive_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&dir);
        let (user, key) = user_with_key(&auth, Vec::new());
        assert!(auth.identify(&key).is_ok());
        auth.forget_cached_keys();

        // 1. A request misses the cache and reads the key from the store...
        let in_flight = auth.load_key(&hash_key(&key)).unwrap().expect("key exists");
        // 2. ...meanwhile the key is deleted and the cache invalidated...
        auth.store.delete_api_key_of_user(&user.id).unwrap();
        auth.forget_cached_keys();
        // 3. ...then the first request caches what it read.
        let _ = auth.remember_key(in_flight);

        assert_eq!(auth.cached_keys(), 0, "stale entry cached");
        let e = auth.identify(&key).unwrap_err();
        assert_eq!(e.status, 401, "deleted key refused at once");

        // Without a racing invalidation, a lookup is cached as before.
        let (_, key2) = {
            let k = generate_key();
            let record = ApiKeyRecord {
                user_id: user.id.clone(),
                prefix: k.plaintext[..11].to_string(),
                created_at: 0,
                models: Vec::new(),
                limits: crate::limits::Limits::default(),
            };
            auth.store.put_api_key(&k.hash, &record).unwrap();
            auth.forget_cached_keys();
            ((), k.plaintext)
        };
        assert!(auth.identify(&key2).is_ok());
        assert_eq!(auth.cached_keys(), 1);
    }

    #[test]
    fn restricted_keys_are_marked_and_refused_on_admin_routes() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&dir);
        let (_, key) = user_with_key(&auth, vec!["m1".into()]);
        let id = auth.identify(&key).unwrap();
        assert!(id.restricted_key);
        assert!(id.may_use_model("m1"));
        assert!(!id.may_use_model("m2"));
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", key.parse().unwrap());
        let e = auth.check(&headers, Access::Admin).unwrap_err();
        assert_eq!(e.status, 403);
        assert!(auth.check(&headers, Access::Verified).is_ok());
    }

    #[test]
    fn oversized_credentials_are_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&dir);
        let long = format!("sk-{}", "a".repeat(MAX_CREDENTIAL_LEN));
        assert_eq!(auth.identify(&long).unwrap_err().status, 401);
        let long_jwt = "e".repeat(MAX_CREDENTIAL_LEN + 1);
        assert_eq!(auth.identify(&long_jwt).unwrap_err().status, 401);
    }

    mod parsing {
        use super::*;
        use proptest::prelude::*;

        fn header_value() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                "(Bearer|bearer|BEARER|Basic|sk-|token=| |;|=|[a-zA-Z0-9._-]){0,40}"
                    .prop_map(String::into_bytes),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            /// Whatever the client puts in Authorization, Cookie or the key header, credential
            /// parsing and checking end in a clean answer: no panic, and a refusal is a 4xx.
            #[test]
            fn arbitrary_credential_headers(
                authz in header_value(),
                cookie in header_value(),
                key in header_value(),
            ) {
                static AUTH: std::sync::LazyLock<(tempfile::TempDir, Auth)> =
                    std::sync::LazyLock::new(|| {
                        let dir = tempfile::tempdir().unwrap();
                        let auth = auth(&dir);
                        (dir, auth)
                    });
                let auth = &AUTH.1;
                let mut headers = HeaderMap::new();
                for (name, v) in [("authorization", &authz), ("cookie", &cookie), ("x-api-key", &key)] {
                    // Bytes no header may carry (CR, LF, NUL...) never reach the gateway.
                    if let Ok(v) = http::HeaderValue::from_bytes(v) {
                        headers.insert(name, v);
                    }
                }
                if let Some(c) = auth.credential(&headers) {
                    prop_assert!(!c.is_empty());
                    prop_assert_eq!(c, c.trim());
                }
                for access in [Access::Public, Access::Session, Access::Verified, Access::Admin] {
                    match auth.check(&headers, access) {
                        Ok(id) => prop_assert!(access == Access::Public && id.is_none()),
                        Err(e) => prop_assert!((400..500).contains(&e.status), "{e}"),
                    }
                }
            }
        }
    }

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
