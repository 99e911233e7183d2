//! Who is calling: credential extraction, API keys, JWT sessions and role checks.
//!
//! A credential is taken from `Authorization: Bearer`, then the `token` cookie, then the
//! configured API-key header (Open WebUI's order). A credential starting with `sk-` is an
//! API key, anything else a JWT.

pub mod access;
pub mod accounts;
pub mod csrf;
mod error;
pub mod jwt;
pub mod password;
pub mod ratelimit;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

pub use error::AuthError;

use crate::config::AuthConfig;
use crate::http::router::Access;
use crate::metrics;
use crate::storage::{Metadata, Signal, Signals, Storage};
use crate::store::{ApiKeyRecord, Role, User};

/// How the caller proved who they are.
#[derive(Debug, Clone)]
pub enum Credential {
    Jwt { jti: String, exp: Option<u64> },
    ApiKey,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Shared with the API-key cache: a request holds the cached record, not a copy.
    pub user: Arc<User>,
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
///
/// # Panics
/// Never: a SHA-256 digest always fills the 64 hex digits, which are ASCII.
#[must_use]
pub fn hash_key(key: &str) -> String {
    // Through a fixed buffer: `hex::encode` builds the string a `char` at a time, which cost
    // as much as the digest itself on every authenticated request.
    let mut out = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(key.as_bytes()), &mut out)
        .expect("a SHA-256 digest is 32 bytes, 64 hex digits");
    std::str::from_utf8(&out)
        .expect("hex digits are ASCII")
        .to_owned()
}

/// How long a verified API key is trusted without re-reading the store.
const KEY_CACHE_TTL: Duration = Duration::from_secs(30);

/// Verified keys kept in the cache; past this it is emptied (keys are re-read on next use).
const KEY_CACHE_MAX: usize = 10_000;

/// Verified session tokens kept in the cache; past this it is emptied. Smaller than the key
/// cache's bound: a token is several times a key's length, and a user may hold many.
const SESSION_CACHE_MAX: usize = 4096;

/// Verified credentials → (the identity they give, verified at).
/// foldhash: only verified keys and tokens are cached, and every request looks one up.
type IdentityCache = RwLock<foldhash::HashMap<String, (Identity, Instant)>>;

/// A cached identity younger than the TTL that `valid` accepts.
fn cached(cache: &IdentityCache, key: &str, valid: impl Fn(&Identity) -> bool) -> Option<Identity> {
    cache
        .read()
        .expect("identity cache poisoned")
        .get(key)
        .filter(|(who, at)| at.elapsed() < KEY_CACHE_TTL && valid(who))
        .map(|(who, _)| who.clone())
}

/// Whether a cached session's token has not expired by `now` (epoch seconds).
fn unexpired(who: &Identity, now: u64) -> bool {
    match &who.credential {
        Credential::Jwt { exp, .. } => exp.is_none_or(|e| now < e),
        Credential::ApiKey => false,
    }
}

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
    meta: Arc<dyn Metadata>,
    signals: Arc<dyn Signals>,
    /// Sign-in attempts per email and per client address, shared by every replica.
    pub limits: ratelimit::SigninLimits,
    /// Bounds password hashing (sign-in, sign-up, add-user).
    pub hashing: password::HashGate,
    /// Verified API keys (by hash) → (the identity they give, verified at). A change to a
    /// key or its user is published as a [`Signal`]; every replica drops the entries it
    /// names before its next lookup, so a deleted key stops working everywhere at once.
    key_cache: IdentityCache,
    /// Verified session tokens → (the identity they give, verified at), under the same TTL,
    /// signals and generation as keys; a token signed out anywhere is dropped by its
    /// [`Signal::TokenRevoked`], and none is served past its own expiry. A hit skips the
    /// signature check, two JSON decodes and two store reads (+0.03 CPU ms a request, measured).
    session_cache: IdentityCache,
    /// Bumped by every invalidation. A lookup that read the store before an invalidation
    /// must not cache what it read after it: it would revive a deleted key for the TTL.
    key_generation: AtomicU64,
    /// Signals of every replica, this one's included, drained before each key lookup (no
    /// task to run: the receiver buffers [`crate::storage::SIGNAL_CAPACITY`] signals, and
    /// one that lagged behind drops the whole cache).
    signal_rx: Mutex<broadcast::Receiver<Signal>>,
}

impl Auth {
    #[must_use]
    pub fn new(config: AuthConfig, secret: &[u8], storage: &Storage) -> Auth {
        Auth {
            limits: ratelimit::SigninLimits::new(
                storage.counters.clone(),
                config.signin_attempts,
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
            meta: storage.meta.clone(),
            signals: storage.signals.clone(),
            key_cache: RwLock::new(foldhash::HashMap::default()),
            session_cache: RwLock::new(foldhash::HashMap::default()),
            key_generation: AtomicU64::new(0),
            signal_rx: Mutex::new(storage.signals.subscribe()),
        }
    }

    /// Sign-up, sign-in, passwords, keys, users and their limits.
    #[must_use]
    pub fn accounts(&self) -> accounts::Accounts<'_> {
        accounts::Accounts::new(self)
    }

    /// Forgets every cached key (this replica only).
    ///
    /// # Panics
    /// A thread panicked while holding the key cache's lock.
    pub fn forget_cached_keys(&self) {
        let mut cache = self.key_cache.write().expect("key cache poisoned");
        let mut sessions = self.session_cache.write().expect("session cache poisoned");
        // Under the write locks, so no insert can slip between the bump and the clear.
        self.key_generation.fetch_add(1, Ordering::AcqRel);
        cache.clear();
        sessions.clear();
    }

    /// Drops what `signal` says changed from this replica's cache.
    fn forget(&self, signal: &Signal) {
        let mut cache = self.key_cache.write().expect("key cache poisoned");
        let mut sessions = self.session_cache.write().expect("session cache poisoned");
        match signal {
            Signal::KeyDeleted { hash } => {
                cache.remove(hash);
            }
            // Entries carry the user (role, limits, session epoch): any change to them
            // applies at once.
            Signal::UserChanged { id } => {
                cache.retain(|_, (who, _)| who.user.id != *id);
                sessions.retain(|_, (who, _)| who.user.id != *id);
            }
            Signal::TokenRevoked { jti } => sessions.retain(
                |_, (who, _)| !matches!(&who.credential, Credential::Jwt { jti: j, .. } if j == jti),
            ),
            Signal::ModelsChanged | Signal::FileStatus { .. } => return,
        }
        self.key_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Applies a change to keys or users here at once, and tells every other replica.
    ///
    /// # Errors
    /// The signal could not be published: the change is stored, but other replicas may
    /// honour their cached entry for up to the cache's TTL; the caller must not report
    /// success (a retry is safe and publishes again).
    pub(crate) async fn invalidate(&self, signal: Signal) -> Result<(), AuthError> {
        self.forget(&signal);
        self.signals.publish(&signal).await.map_err(|e| {
            metrics::auth_failure("signal_failed");
            tracing::error!(error = %e, ?signal, "cannot tell other replicas about an account change");
            AuthError::Storage(e)
        })
    }

    /// Applies the signals received since the last lookup.
    fn apply_signals(&self) {
        let mut rx = self
            .signal_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            match rx.try_recv() {
                Ok(signal) => self.forget(&signal),
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "account signals lagged; API-key cache dropped");
                    self.forget_cached_keys();
                }
                Err(
                    broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed,
                ) => break,
            }
        }
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
    ///
    /// # Errors
    /// The refusal (no or bad credential, role too low, restricted key), or a store failure.
    pub async fn check(
        &self,
        headers: &HeaderMap,
        access: Access,
    ) -> Result<Option<Identity>, AuthError> {
        if access == Access::Public {
            // Public routes still learn who is calling when a valid credential is sent.
            return Ok(match self.credential(headers) {
                Some(c) => self.identify(c).await.ok(),
                None => None,
            });
        }
        let Some(cred) = self.credential(headers) else {
            metrics::auth_failure("missing");
            return Err(AuthError::NotAuthenticated);
        };
        let identity = self.identify(cred).await?;
        if access == Access::Admin && identity.restricted_key {
            metrics::auth_failure("restricted_key");
            return Err(AuthError::RestrictedKey);
        }
        let allowed = match access {
            Access::Public | Access::Session => true,
            Access::Verified => matches!(identity.user.role, Role::User | Role::Admin),
            Access::Admin => identity.user.role == Role::Admin,
        };
        if !allowed {
            metrics::auth_failure("role");
            return Err(AuthError::RoleDenied);
        }
        Ok(Some(identity))
    }

    async fn identify(&self, cred: &str) -> Result<Identity, AuthError> {
        if cred.len() > MAX_CREDENTIAL_LEN {
            metrics::auth_failure("invalid_token");
            return Err(AuthError::InvalidToken);
        }
        if cred.starts_with("sk-") {
            self.identify_key(cred).await
        } else {
            self.identify_jwt(cred).await
        }
    }

    async fn identify_key(&self, key: &str) -> Result<Identity, AuthError> {
        if !self.config.enable_api_keys {
            metrics::auth_failure("api_keys_disabled");
            return Err(AuthError::ApiKeysDisabled);
        }
        // A SHA-256 and a map or store lookup: key checks never wait behind password hashing.
        let hash = hash_key(key);
        self.apply_signals();
        if let Some(hit) = cached(&self.key_cache, &hash, |_| true) {
            return Ok(hit);
        }
        let Some(loaded) = self.load_key(&hash).await? else {
            metrics::auth_failure("invalid_api_key");
            return Err(AuthError::InvalidToken);
        };
        Ok(self.remember_key(loaded))
    }

    /// The identity an API key gives: the same for every request that sends it, so the
    /// cache holds it whole and a hit costs a few reference counts.
    fn key_identity(&self, record: ApiKeyRecord, user: User) -> Identity {
        let allowed_models = self.allowed_models(&user, &record.models);
        Identity {
            user: Arc::new(user),
            credential: Credential::ApiKey,
            allowed_models,
            restricted_key: !record.models.is_empty(),
            key: Some(KeyMeta {
                prefix: record.prefix,
                limits: record.limits,
            }),
        }
    }

    /// Reads a key and its user from the store, noting the cache generation first.
    ///
    /// # Errors
    /// The store failed.
    pub async fn load_key(&self, hash: &str) -> Result<Option<LoadedKey>, AuthError> {
        let generation = self.key_generation.load(Ordering::Acquire);
        let Some(record) = self.meta.api_key_by_hash(hash).await? else {
            return Ok(None);
        };
        let Some(user) = self.meta.user_by_id(&record.user_id).await? else {
            return Ok(None);
        };
        Ok(Some(LoadedKey {
            hash: hash.to_string(),
            generation,
            record,
            user,
        }))
    }

    /// Caches a loaded key unless the cache was invalidated since it was read (by this
    /// replica or a signal received meanwhile); returns it.
    ///
    /// # Panics
    /// A thread panicked while holding the key cache's lock.
    pub fn remember_key(&self, loaded: LoadedKey) -> Identity {
        let who = self.key_identity(loaded.record, loaded.user);
        self.remember(
            &self.key_cache,
            KEY_CACHE_MAX,
            loaded.hash,
            loaded.generation,
            &who,
        );
        who
    }

    /// Caches what was read at `generation` unless the caches were invalidated since (by this
    /// replica or a signal received meanwhile); past `max` entries the cache starts again.
    fn remember(
        &self,
        cache: &IdentityCache,
        max: usize,
        key: String,
        generation: u64,
        who: &Identity,
    ) {
        self.apply_signals();
        let mut cache = cache.write().expect("identity cache poisoned");
        if self.key_generation.load(Ordering::Acquire) == generation {
            if cache.len() >= max {
                cache.clear();
            }
            cache.insert(key, (who.clone(), Instant::now()));
        }
    }

    /// Keys in the cache (for tests of its bound and invalidation).
    ///
    /// # Panics
    /// A thread panicked while holding the key cache's lock.
    #[must_use]
    pub fn cached_keys(&self) -> usize {
        self.key_cache.read().expect("key cache poisoned").len()
    }

    /// Sessions in the cache (for tests of its bound and invalidation).
    ///
    /// # Panics
    /// A thread panicked while holding the session cache's lock.
    #[must_use]
    pub fn cached_sessions(&self) -> usize {
        self.session_cache
            .read()
            .expect("session cache poisoned")
            .len()
    }

    async fn identify_jwt(&self, token: &str) -> Result<Identity, AuthError> {
        self.apply_signals();
        let now = crate::store::now_secs();
        if let Some(hit) = cached(&self.session_cache, token, |who| unexpired(who, now)) {
            return Ok(hit);
        }
        let generation = self.key_generation.load(Ordering::Acquire);
        let who = self.verify_session(token).await?;
        self.remember(
            &self.session_cache,
            SESSION_CACHE_MAX,
            token.to_string(),
            generation,
            &who,
        );
        Ok(who)
    }

    /// Checks a session token in full: signature and expiry, revocation, its user and the
    /// user's current session epoch.
    async fn verify_session(&self, token: &str) -> Result<Identity, AuthError> {
        let Some(claims) = self.jwt.verify(token) else {
            metrics::auth_failure("invalid_token");
            return Err(AuthError::InvalidToken);
        };
        if self.meta.is_token_revoked(&claims.jti).await? {
            metrics::auth_failure("revoked_token");
            return Err(AuthError::RevokedToken);
        }
        let Some(user) = self.meta.user_by_id(&claims.id).await? else {
            metrics::auth_failure("unknown_user");
            return Err(AuthError::SessionExpired);
        };
        if !user.session_valid(claims.ep, &claims.jti) {
            metrics::auth_failure("revoked_session");
            return Err(AuthError::SessionExpired);
        }
        let allowed_models = self.allowed_models(&user, &[]);
        Ok(Identity {
            user: Arc::new(user),
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

    fn config() -> AuthConfig {
        AuthConfig {
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
            model_access: std::collections::HashMap::new(),
        }
    }

    /// An embedded storage in `dir`.
    pub(crate) fn storage(dir: &tempfile::TempDir) -> Storage {
        let store = Arc::new(crate::store::Store::open(&dir.path().join("t.redb")).unwrap());
        let index = Arc::new(crate::storage::embedded::vectors::VectorStore::new(
            10_000,
            crate::index::GraphKind::Usearch,
            None,
        ));
        crate::storage::embedded::storage(store, index, dir.path().join("uploads"), 100)
    }

    fn auth(dir: &tempfile::TempDir) -> Auth {
        Auth::new(config(), b"secret", &storage(dir))
    }

    /// Two services on one storage: two replicas of the gateway.
    fn replicas(dir: &tempfile::TempDir) -> (Auth, Auth) {
        let storage = storage(dir);
        (
            Auth::new(config(), b"secret", &storage),
            Auth::new(config(), b"secret", &storage),
        )
    }

    async fn user_with_key(auth: &Auth, models: Vec<String>) -> (User, String) {
        let user = auth
            .meta
            .create_user(
                User::new("a@example.com", "a", Role::User, "x".into()),
                false,
            )
            .await
            .unwrap();
        let key = auth
            .accounts()
            .create_key(&user.id, models, crate::limits::Limits::default())
            .await
            .unwrap();
        (user, key)
    }

    /// Changes a user's requests-per-minute limit (a user change that is signalled).
    async fn set_rpm(auth: &Auth, user_id: &str, rpm: u64) {
        auth.accounts()
            .set_limits(
                user_id,
                Some(crate::limits::Limits {
                    rpm: Some(rpm),
                    ..crate::limits::Limits::default()
                }),
                None,
            )
            .await
            .unwrap();
    }

    /// A lookup that read the key before it was deleted finishes after the delete: what it
    /// read must not be cached, or the deleted key would work for the cache's TTL.
    #[tokio::test]
    async fn a_lookup_racing_a_delete_does_not_revive_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&dir);
        let (user, key) = user_with_key(&auth, Vec::new()).await;
        assert!(auth.identify(&key).await.is_ok());
        auth.forget_cached_keys();

        // 1. A request misses the cache and reads the key from the store...
        let in_flight = auth
            .load_key(&hash_key(&key))
            .await
            .unwrap()
            .expect("key exists");
        // 2. ...meanwhile the key is deleted (and the deletion signalled)...
        assert!(auth.accounts().delete_key(&user.id).await.unwrap());
        // 3. ...then the first request caches what it read.
        let _ = auth.remember_key(in_flight);

        assert_eq!(auth.cached_keys(), 0, "stale entry cached");
        let e = auth.identify(&key).await.unwrap_err();
        assert!(matches!(e, AuthError::InvalidToken), "{e:?}");

        // Without a racing invalidation, a lookup is cached as before.
        let key2 = auth
            .accounts()
            .create_key(&user.id, Vec::new(), crate::limits::Limits::default())
            .await
            .unwrap();
        assert!(auth.identify(&key2).await.is_ok());
        assert_eq!(auth.cached_keys(), 1);
    }

    /// Two services on one storage stand for two replicas: a key deleted, or a user
    /// changed, through one is refused or changed on the other at its next request, though
    /// the other had it cached.
    #[tokio::test]
    async fn signals_invalidate_another_services_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = replicas(&dir);
        let (user, key) = user_with_key(&a, Vec::new()).await;
        assert_eq!(b.identify(&key).await.unwrap().user.role, Role::User);
        assert_eq!(b.cached_keys(), 1);

        // A role change through `a` reaches `b`'s cached entry.
        set_rpm(&a, &user.id, 7).await;
        let id = b.identify(&key).await.unwrap();
        assert_eq!(id.user.limits.rpm, Some(7), "b read the user afresh");

        assert!(a.accounts().delete_key(&user.id).await.unwrap());
        assert!(matches!(
            b.identify(&key).await,
            Err(AuthError::InvalidToken)
        ));
        assert_eq!(b.cached_keys(), 0);
    }

    /// A session token is verified once and then served from the cache, on each replica;
    /// a change to its user, a sign-out through another replica and the token's own expiry
    /// all end the cached entry, and the cache keeps to its bound.
    #[tokio::test]
    async fn sessions_are_cached_until_changed_signed_out_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = replicas(&dir);
        let (user, _) = user_with_key(&a, Vec::new()).await;
        let (token, _) =
            a.jwt
                .issue_in_epoch(&user.id, user.session_epoch, Some(Duration::from_secs(600)));
        assert_eq!(b.identify(&token).await.unwrap().user.limits.rpm, None);
        assert_eq!(b.cached_sessions(), 1);
        assert!(b.identify(&token).await.is_ok());
        assert_eq!(b.cached_sessions(), 1, "the second request is a hit");

        // A change to the user through `a` reaches `b`'s cached session.
        set_rpm(&a, &user.id, 9).await;
        let id = b.identify(&token).await.unwrap();
        assert_eq!(id.user.limits.rpm, Some(9), "b read the user afresh");

        // Signed out through `a`: refused by `b` at its next request.
        a.accounts().sign_out(&id.credential).await.unwrap();
        assert!(matches!(
            b.identify(&token).await,
            Err(AuthError::RevokedToken)
        ));
        assert_eq!(b.cached_sessions(), 0);

        // A cached token is not served past its expiry.
        let (short, exp) =
            a.jwt
                .issue_in_epoch(&user.id, user.session_epoch, Some(Duration::from_secs(1)));
        assert!(b.identify(&short).await.is_ok());
        assert_eq!(b.cached_sessions(), 1);
        // The verifier accepts a token through its `exp` second; the cache stops before.
        let exp = exp.unwrap();
        while crate::store::now_secs() <= exp {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(matches!(
            b.identify(&short).await,
            Err(AuthError::InvalidToken)
        ));

        // The bound: past it the cache starts again.
        for _ in 0..=SESSION_CACHE_MAX {
            let (t, _) = a.jwt.issue_in_epoch(&user.id, user.session_epoch, None);
            assert!(b.identify(&t).await.is_ok());
            assert!(b.cached_sessions() <= SESSION_CACHE_MAX);
        }
    }

    /// A receiver that fell behind drops the whole cache rather than keep what a lost
    /// signal named.
    #[tokio::test]
    async fn a_lagged_receiver_drops_the_whole_cache() {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage(&dir);
        let a = Auth::new(config(), b"secret", &storage);
        let (_, key) = user_with_key(&a, Vec::new()).await;
        assert!(a.identify(&key).await.is_ok());
        assert_eq!(a.cached_keys(), 1);
        for i in 0..=crate::storage::SIGNAL_CAPACITY {
            storage
                .signals
                .publish(&Signal::UserChanged {
                    id: format!("other-{i}"),
                })
                .await
                .unwrap();
        }
        a.apply_signals();
        assert_eq!(a.cached_keys(), 0);
        assert!(a.identify(&key).await.is_ok(), "the key is read again");
    }

    #[tokio::test]
    async fn restricted_keys_are_marked_and_refused_on_admin_routes() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&dir);
        let (_, key) = user_with_key(&auth, vec!["m1".into()]).await;
        let id = auth.identify(&key).await.unwrap();
        assert!(id.restricted_key);
        assert!(id.may_use_model("m1"));
        assert!(!id.may_use_model("m2"));
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", key.parse().unwrap());
        let e = auth.check(&headers, Access::Admin).await.unwrap_err();
        assert!(matches!(e, AuthError::RestrictedKey));
        assert!(auth.check(&headers, Access::Verified).await.is_ok());
    }

    #[tokio::test]
    async fn oversized_credentials_are_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&dir);
        let long = format!("sk-{}", "a".repeat(MAX_CREDENTIAL_LEN));
        assert!(matches!(
            auth.identify(&long).await,
            Err(AuthError::InvalidToken)
        ));
        let long_jwt = "e".repeat(MAX_CREDENTIAL_LEN + 1);
        assert!(matches!(
            auth.identify(&long_jwt).await,
            Err(AuthError::InvalidToken)
        ));
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
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                for access in [Access::Public, Access::Session, Access::Verified, Access::Admin] {
                    match rt.block_on(auth.check(&headers, access)) {
                        Ok(id) => prop_assert!(access == Access::Public && id.is_none()),
                        Err(e) => {
                            let status = crate::error::ApiError::from(e).status;
                            prop_assert!((400..500).contains(&status), "{status}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn key_hash_is_lowercase_hex_sha256() {
        // FIPS 180-2's test vector: stored hashes must keep matching after a rewrite.
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
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
