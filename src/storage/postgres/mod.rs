//! The PostgreSQL backend: every seam on one database that any number of ragway replicas
//! share. tokio-postgres with a deadpool pool (see README, "Storage backends", for why not
//! sqlx); vectors in pgvector with HNSW (cosine), lexical search by BM25 over term tables
//! (the embedded backend's terms and formula), the queue with `FOR UPDATE SKIP LOCKED` and leases, counters as upserts,
//! signals with `LISTEN/NOTIFY`, blobs in a `bytea` table.
//!
//! The schema is created and migrated at connect ([`migrate`]): versioned SQL files embedded
//! in the binary, applied in order under an advisory lock, so replicas starting together
//! apply each migration once.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, Json, ToSql, Type, to_sql_checked};
use tokio_postgres::{AsyncMessage, NoTls};

use super::{
    Blobs, ChunkRef, Chunks, Counters, Hit, Job, Metadata, RateLimits, Result, Retry,
    SIGNAL_CAPACITY, Scope, Signal, Signals, Storage, StorageError, UserChange, WorkQueue,
    check_key,
};
use crate::index::bm25::{Bm25Params, TermCounts};
use crate::limits::{Applied, Kind, Refused};
use crate::store::{
    ApiKeyRecord, ChunkRecord, FileRecord, KnowledgeRecord, PRIMARY_ADMIN, PresetRecord,
    PresetRefusal, Role, UsageCounts, UsageKey, User, now_secs,
};

/// Versioned migrations, applied in order; never edit one that shipped, add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("migrations/0001_init.sql")),
    (2, "presets", include_str!("migrations/0002_presets.sql")),
    (
        6,
        "bm25_terms",
        include_str!("migrations/0006_bm25_terms.sql"),
    ),
    (
        7,
        "rate_limits",
        include_str!("migrations/0007_rate_limits.sql"),
    ),
    (
        8,
        "inline_vectors",
        include_str!("migrations/0008_inline_vectors.sql"),
    ),
];

/// Advisory lock key serialising migrations (and index creation) across replicas:
/// "ragway" in ASCII.
const MIGRATION_LOCK: i64 = 0x7261_6777_6179;

/// The NOTIFY channel of [`Signal`]s.
const CHANNEL: &str = "ragway_signals";

/// NOTIFY payloads must stay under 8000 bytes.
const MAX_SIGNAL_BYTES: usize = 7900;

/// Distinct terms of a lexical query used (the rest is ignored): bounds the query PostgreSQL
/// plans.
const MAX_QUERY_TERMS: usize = 64;

/// Connection options.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Pool size per replica (connections = replicas × this, plus one listener each).
    pub pool_size: usize,
    /// Scopes with at most this many chunks are searched exactly (every chunk scored);
    /// larger ones go through the HNSW index, whose filter applies after the graph walk.
    pub exact_scan_limit: u64,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool_size: 16,
            exact_scan_limit: 20_000,
        }
    }
}

/// Parses and checks a PostgreSQL URL (`postgres://user:pass@host:port/db` or the
/// `key=value` form). Errors never repeat the URL: it may hold a password.
///
/// # Errors
/// A message saying what is wrong with the URL.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let url = url.trim();
    if url.is_empty() {
        return Err("the PostgreSQL URL is empty".into());
    }
    // A control character is a pasting accident or an attempt to smuggle something into
    // a log line; no real host, user or database name has one.
    if url.chars().any(char::is_control) {
        return Err("the PostgreSQL URL contains control characters".into());
    }
    let cfg = tokio_postgres::Config::from_str(url).map_err(|e| {
        format!("not a PostgreSQL URL ({e}); expected postgres://user:password@host:5432/database")
    })?;
    if cfg.get_hosts().is_empty() {
        return Err("the PostgreSQL URL names no host".into());
    }
    if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err("sslmode=require: TLS to PostgreSQL is not supported yet; connect over a private network or a local TLS proxy with sslmode=disable".into());
    }
    if cfg.get_dbname().is_none() {
        return Err("the PostgreSQL URL names no database (postgres://host/DATABASE)".into());
    }
    Ok(cfg)
}

fn pg_err(e: &tokio_postgres::Error) -> StorageError {
    // The database's own message (with its detail) says more than the driver's summary.
    match e.as_db_error() {
        Some(db) => StorageError::Postgres(match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        }),
        None => StorageError::Postgres(e.to_string()),
    }
}

impl From<tokio_postgres::Error> for StorageError {
    fn from(e: tokio_postgres::Error) -> Self {
        pg_err(&e)
    }
}

impl From<deadpool_postgres::PoolError> for StorageError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => pg_err(&e),
            other => StorageError::Postgres(format!("connection pool: {other}")),
        }
    }
}

fn is(e: &tokio_postgres::Error, state: &SqlState) -> bool {
    e.code() == Some(state)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A pgvector value in its binary form: dimension (i16), unused (i16), f32s big-endian.
#[derive(Debug)]
struct PgVector<'a>(&'a [f32]);

impl ToSql for PgVector<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        let dim = i16::try_from(self.0.len()).map_err(|_| "vector longer than 32767")?;
        out.put_i16(dim);
        out.put_i16(0);
        for x in self.0 {
            out.put_f32(*x);
        }
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        ty.name() == "vector"
    }
    to_sql_checked!();
}

/// A pgvector value read back.
struct OwnedVector(Vec<f32>);

impl<'a> FromSql<'a> for OwnedVector {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let dim = raw
            .get(..2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or("short vector")?;
        let body = raw.get(4..4 + dim * 4).ok_or("short vector")?;
        Ok(OwnedVector(
            body.chunks_exact(4)
                .map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }
    fn accepts(ty: &Type) -> bool {
        ty.name() == "vector"
    }
}

/// Applies the migrations this database lacks, under an advisory lock.
///
/// # Errors
/// A migration failed (it is rolled back), or the database was migrated by a newer ragway.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Vec<i32>> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply_migrations(client).await;
    // Unlock even after a failure: the session may live on in a pool.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let applied = result?;
    unlocked?;
    Ok(applied)
}

async fn apply_migrations(client: &mut tokio_postgres::Client) -> Result<Vec<i32>> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let done: HashSet<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(newer) = done.iter().copied().filter(|v| *v > known).max() {
        return Err(StorageError::Postgres(format!(
            "the database schema is at version {newer}, newer than this ragway knows ({known}): run a newer ragway"
        )));
    }
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let txn = client.transaction().await?;
        txn.batch_execute(sql).await.map_err(|e| {
            let e = pg_err(&e);
            StorageError::Postgres(format!("migration {version} ({name}) failed: {e}"))
        })?;
        txn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        txn.commit().await?;
        tracing::info!(version, name, "database migrated");
        applied.push(*version);
    }
    Ok(applied)
}

/// The backend: a pool, a listener task and the HNSW indexes known to exist.
pub struct Pg {
    pool: Pool,
    options: PgOptions,
    signals: broadcast::Sender<Signal>,
    listener: tokio::task::JoinHandle<()>,
    /// Dimensions whose HNSW expression index exists.
    hnsw: Mutex<HashSet<usize>>,
    /// Counter increments since expired counters were last deleted.
    increments: AtomicU64,
    /// Rate-limit admissions since full buckets were last deleted.
    admissions: AtomicU64,
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Connects, migrates and starts listening for signals.
///
/// # Errors
/// The URL is invalid, the database is unreachable, or a migration failed.
pub async fn connect(url: &str, options: PgOptions) -> Result<Storage> {
    let pg = Arc::new(Pg::connect(url, options).await?);
    Ok(Storage {
        meta: pg.clone(),
        chunks: pg.clone(),
        queue: pg.clone(),
        blobs: pg.clone(),
        counters: pg.clone(),
        rate_limits: pg.clone(),
        signals: pg,
    })
}

impl Pg {
    /// See [`connect`].
    ///
    /// # Errors
    /// As [`connect`].
    pub async fn connect(url: &str, options: PgOptions) -> Result<Pg> {
        let cfg = parse_url(url).map_err(StorageError::Postgres)?;
        let manager = Manager::from_connect(
            cfg.clone(),
            ConnectOn(tokio::runtime::Handle::current()),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StorageError::Postgres(format!("connection pool: {e}")))?;
        {
            let mut client = pool.get().await?;
            migrate(&mut client).await?;
            let n = backfill_terms(&mut client).await?;
            if n > 0 {
                tracing::info!(
                    chunks = n,
                    "lexical index terms added to chunks stored before"
                );
            }
        }
        let (tx, _) = broadcast::channel(SIGNAL_CAPACITY);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen(cfg, tx.clone(), Some(ready_tx)));
        if !matches!(
            tokio::time::timeout(Duration::from_secs(30), ready_rx).await,
            Ok(Ok(()))
        ) {
            listener.abort();
            return Err(StorageError::Postgres(
                "the LISTEN connection for signals did not start".into(),
            ));
        }
        Ok(Pg {
            pool,
            options,
            signals: tx,
            listener,
            hnsw: Mutex::new(HashSet::new()),
            increments: AtomicU64::new(0),
            admissions: AtomicU64::new(0),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    /// Creates the HNSW index for vectors of `dim` once (per process; `IF NOT EXISTS` and
    /// the migration lock make it once per database).
    async fn ensure_hnsw(&self, dim: usize) -> Result<()> {
        if dim == 0
            || self
                .hnsw
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&dim)
        {
            return Ok(());
        }
        let client = self.client().await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        // `dim` is a number, never user text: safe to put in the statement (a type
        // modifier cannot be a parameter).
        let made = client
            .batch_execute(&format!(
                "CREATE INDEX IF NOT EXISTS chunks_hnsw_{dim} ON chunks \
                 USING hnsw ((embedding::vector({dim})) vector_cosine_ops) \
                 WHERE vector_dims(embedding) = {dim}"
            ))
            .await;
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await?;
        made?;
        self.hnsw
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(dim);
        Ok(())
    }
}

/// Opens pooled connections on the runtime the backend was connected on, whichever
/// runtime asks the pool for one. A connection belongs to the runtime that opened it (its
/// socket and its driver task): opened on a server thread's runtime it would die with that
/// runtime while the pool still holds it.
struct ConnectOn(tokio::runtime::Handle);

impl deadpool_postgres::Connect for ConnectOn {
    fn connect(
        &self,
        cfg: &tokio_postgres::Config,
    ) -> futures_util::future::BoxFuture<
        '_,
        std::result::Result<
            (tokio_postgres::Client, tokio::task::JoinHandle<()>),
            tokio_postgres::Error,
        >,
    > {
        let cfg = cfg.clone();
        let home = self.0.clone();
        Box::pin(async move {
            let spawner = home.clone();
            let opening = cfg.clone();
            let opened = home
                .spawn(async move {
                    let (client, conn) = opening.connect(NoTls).await?;
                    let driver = spawner.spawn(drive(conn));
                    Ok((client, driver))
                })
                .await;
            match opened {
                Ok(made) => made,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The home runtime is shutting down (the process ends): this caller's
                // runtime serves the little that is left.
                Err(_) => {
                    let (client, conn) = cfg.connect(NoTls).await?;
                    Ok((client, tokio::spawn(drive(conn))))
                }
            }
        })
    }
}

async fn drive(
    conn: tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
) {
    if let Err(e) = conn.await {
        tracing::warn!(error = %pg_err(&e), "PostgreSQL connection ended");
    }
}

/// Keeps a LISTEN connection open and forwards notifications; reconnects after a failure
/// (signals sent meanwhile are lost, so subscribers are told with a `Lagged`-like gap:
/// they must treat a reconnect as "drop every cache", see [`Signals::subscribe`]).
async fn listen(
    cfg: tokio_postgres::Config,
    tx: broadcast::Sender<Signal>,
    mut ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    loop {
        match cfg.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (msg_tx, mut msg_rx) = tokio::sync::mpsc::unbounded_channel();
                let stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                let driver = tokio::spawn(async move {
                    let mut stream = std::pin::pin!(stream);
                    while let Some(m) = stream.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) => {
                                if msg_tx.send(n.payload().to_string()).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %pg_err(&e), "signal listener connection failed");
                                break;
                            }
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    tracing::warn!(error = %e, "LISTEN failed");
                } else {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    while let Some(payload) = msg_rx.recv().await {
                        match serde_json::from_str::<Signal>(&payload) {
                            Ok(s) => {
                                let _ = tx.send(s);
                            }
                            Err(e) => tracing::warn!(error = %e, "unreadable signal ignored"),
                        }
                    }
                }
                driver.abort();
                drop(client);
            }
            Err(e) => tracing::warn!(error = %pg_err(&e), "signal listener cannot connect"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn corrupt(table: &'static str, e: &tokio_postgres::Error) -> StorageError {
    StorageError::Corrupt {
        table,
        message: e.to_string(),
    }
}

fn json_col<T: serde::de::DeserializeOwned>(
    row: &tokio_postgres::Row,
    idx: usize,
    table: &'static str,
) -> Result<T> {
    row.try_get::<_, Json<T>>(idx)
        .map(|j| j.0)
        .map_err(|e| corrupt(table, &e))
}

#[async_trait]
impl Metadata for Pg {
    async fn ping(&self) -> bool {
        match self.client().await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }

    async fn user_count(&self) -> Result<u64> {
        let row = self
            .client()
            .await?
            .query_one("SELECT count(*) FROM users", &[])
            .await?;
        Ok(to_u64(row.get(0)))
    }

    async fn create_user(&self, mut user: User, first_is_admin: bool) -> Result<User> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        // Two first sign-ups at once must not both become admin: serialise on a lock
        // taken before the count.
        txn.execute("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE", &[])
            .await?;
        let n: i64 = txn
            .query_one("SELECT count(*) FROM users", &[])
            .await?
            .get(0);
        if first_is_admin && n == 0 {
            user.role = Role::Admin;
            txn.execute(
                "INSERT INTO settings (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&PRIMARY_ADMIN, &user.id],
            )
            .await?;
        }
        let inserted = txn
            .execute(
                "INSERT INTO users (id, email, body, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (email) DO NOTHING",
                &[
                    &user.id,
                    &user.email,
                    &Json(&user),
                    &to_i64(user.created_at),
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(StorageError::EmailTaken);
        }
        txn.commit().await?;
        Ok(user)
    }

    async fn users(&self) -> Result<Vec<User>> {
        let rows = self
            .client()
            .await?
            .query("SELECT body FROM users ORDER BY id", &[])
            .await?;
        rows.iter().map(|r| json_col(r, 0, "users")).collect()
    }

    async fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT body FROM users WHERE id = $1", &[&id])
            .await?;
        row.map(|r| json_col(&r, 0, "users")).transpose()
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT body FROM users WHERE email = $1", &[&email])
            .await?;
        row.map(|r| json_col(&r, 0, "users")).transpose()
    }

    async fn update_user(&self, id: &str, change: UserChange) -> Result<Result<User, String>> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let Some(row) = txn
            .query_opt("SELECT body FROM users WHERE id = $1 FOR UPDATE", &[&id])
            .await?
        else {
            return Err(StorageError::NoSuchUser);
        };
        let old: User = json_col(&row, 0, "users")?;
        let mut user = old.clone();
        if let Err(e) = change(&mut user) {
            return Ok(Err(e));
        }
        user.id.clone_from(&old.id);
        user.updated_at = now_secs();
        let r = txn
            .execute(
                "UPDATE users SET email = $2, body = $3 WHERE id = $1",
                &[&id, &user.email, &Json(&user)],
            )
            .await;
        match r {
            Err(e) if is(&e, &SqlState::UNIQUE_VIOLATION) => return Err(StorageError::EmailTaken),
            r => r?,
        };
        txn.commit().await?;
        Ok(Ok(user))
    }

    async fn delete_user(&self, id: &str) -> Result<Option<User>> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        // The API key goes with the user (ON DELETE CASCADE).
        let Some(row) = txn
            .query_opt("DELETE FROM users WHERE id = $1 RETURNING body", &[&id])
            .await?
        else {
            return Ok(None);
        };
        let user: User = json_col(&row, 0, "users")?;
        txn.execute(
            "INSERT INTO user_deletions (id, deleted_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&id, &to_i64(now_secs())],
        )
        .await?;
        txn.commit().await?;
        Ok(Some(user))
    }

    async fn pending_user_deletions(&self) -> Result<Vec<String>> {
        let rows = self
            .client()
            .await?
            .query("SELECT id FROM user_deletions ORDER BY id", &[])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn finish_user_deletion(&self, id: &str) -> Result<()> {
        self.client()
            .await?
            .execute("DELETE FROM user_deletions WHERE id = $1", &[&id])
            .await?;
        Ok(())
    }

    async fn primary_admin(&self) -> Result<Option<String>> {
        if let Some(id) = self.setting(PRIMARY_ADMIN).await?
            && self.user_by_id(&id).await?.is_some()
        {
            return Ok(Some(id));
        }
        Ok(self
            .users()
            .await?
            .into_iter()
            .filter(|u| u.role == Role::Admin)
            .min_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)))
            .map(|u| u.id))
    }

    async fn put_api_key(&self, hash: &str, record: &ApiKeyRecord) -> Result<()> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        txn.execute(
            "DELETE FROM api_keys WHERE user_id = $1",
            &[&record.user_id],
        )
        .await?;
        let r = txn
            .execute(
                "INSERT INTO api_keys (hash, user_id, body) VALUES ($1, $2, $3)
                 ON CONFLICT (hash) DO UPDATE SET user_id = EXCLUDED.user_id, body = EXCLUDED.body",
                &[&hash, &record.user_id, &Json(record)],
            )
            .await;
        match r {
            Err(e) if is(&e, &SqlState::FOREIGN_KEY_VIOLATION) => {
                return Err(StorageError::NoSuchUser);
            }
            r => r?,
        };
        txn.commit().await?;
        Ok(())
    }

    async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT body FROM api_keys WHERE hash = $1", &[&hash])
            .await?;
        row.map(|r| json_col(&r, 0, "api_keys")).transpose()
    }

    async fn api_key_of_user(&self, user_id: &str) -> Result<Option<(String, ApiKeyRecord)>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT hash, body FROM api_keys WHERE user_id = $1",
                &[&user_id],
            )
            .await?;
        row.map(|r| Ok((r.get(0), json_col(&r, 1, "api_keys")?)))
            .transpose()
    }

    async fn delete_api_key_of_user(&self, user_id: &str) -> Result<Option<String>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "DELETE FROM api_keys WHERE user_id = $1 RETURNING hash",
                &[&user_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn revoke_token(&self, jti: &str, exp: Option<u64>) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM revoked_tokens WHERE expires_at <> 0 AND expires_at <= $1",
                &[&to_i64(now_secs())],
            )
            .await?;
        client
            .execute(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2)
                 ON CONFLICT (jti) DO UPDATE SET expires_at = EXCLUDED.expires_at",
                &[&jti, &to_i64(exp.unwrap_or(0))],
            )
            .await?;
        Ok(())
    }

    async fn is_token_revoked(&self, jti: &str) -> Result<bool> {
        Ok(self
            .client()
            .await?
            .query_opt("SELECT 1 FROM revoked_tokens WHERE jti = $1", &[&jti])
            .await?
            .is_some())
    }

    async fn setting(&self, key: &str) -> Result<Option<String>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT value FROM settings WHERE key = $1", &[&key])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO settings (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&key, &value],
            )
            .await?;
        Ok(())
    }

    async fn insert_file(&self, file: &FileRecord) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO files (id, user_id, body, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET user_id = EXCLUDED.user_id, body = EXCLUDED.body",
                &[
                    &file.id,
                    &file.user_id,
                    &Json(file),
                    &to_i64(file.created_at),
                ],
            )
            .await?;
        Ok(())
    }

    async fn file(&self, id: &str) -> Result<Option<FileRecord>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT body FROM files WHERE id = $1", &[&id])
            .await?;
        row.map(|r| json_col(&r, 0, "files")).transpose()
    }

    async fn files(&self) -> Result<Vec<FileRecord>> {
        let rows = self
            .client()
            .await?
            .query("SELECT body FROM files ORDER BY id", &[])
            .await?;
        rows.iter().map(|r| json_col(r, 0, "files")).collect()
    }

    async fn update_file(&self, file: &FileRecord) -> Result<()> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE files SET body = $2 WHERE id = $1",
                &[&file.id, &Json(file)],
            )
            .await?;
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        Ok(())
    }

    async fn file_text(&self, id: &str) -> Result<Option<String>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT content FROM files WHERE id = $1", &[&id])
            .await?;
        Ok(row.and_then(|r| r.get(0)))
    }

    async fn delete_file(&self, id: &str) -> Result<Option<(FileRecord, Vec<String>)>> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let kbs: Vec<String> = txn
            .query(
                "SELECT knowledge_id FROM knowledge_files WHERE file_id = $1 ORDER BY knowledge_id",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Chunks, memberships and the queue entry go with the file (ON DELETE CASCADE).
        let Some(row) = txn
            .query_opt("DELETE FROM files WHERE id = $1 RETURNING body", &[&id])
            .await?
        else {
            return Ok(None);
        };
        let rec: FileRecord = json_col(&row, 0, "files")?;
        txn.commit().await?;
        Ok(Some((rec, kbs)))
    }

    async fn put_knowledge(&self, kb: &KnowledgeRecord) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO knowledge (id, body, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                &[&kb.id, &Json(kb), &to_i64(kb.created_at)],
            )
            .await?;
        Ok(())
    }

    async fn knowledge(&self, id: &str) -> Result<Option<KnowledgeRecord>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT body FROM knowledge WHERE id = $1", &[&id])
            .await?;
        row.map(|r| json_col(&r, 0, "knowledge")).transpose()
    }

    async fn knowledges(&self) -> Result<Vec<KnowledgeRecord>> {
        let rows = self
            .client()
            .await?
            .query("SELECT body FROM knowledge ORDER BY id", &[])
            .await?;
        rows.iter().map(|r| json_col(r, 0, "knowledge")).collect()
    }

    async fn knowledge_files(&self, id: &str) -> Result<Vec<String>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT file_id FROM knowledge_files WHERE knowledge_id = $1 ORDER BY file_id",
                &[&id],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn file_knowledge(&self, file_id: &str) -> Result<Vec<String>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT knowledge_id FROM knowledge_files WHERE file_id = $1 ORDER BY knowledge_id",
                &[&file_id],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn link_file(&self, kb: &str, file_id: &str) -> Result<bool> {
        let r = self
            .client()
            .await?
            .execute(
                "INSERT INTO knowledge_files (knowledge_id, file_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
                &[&kb, &file_id],
            )
            .await;
        match r {
            Ok(n) => Ok(n == 1),
            Err(e) if is(&e, &SqlState::FOREIGN_KEY_VIOLATION) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn unlink_file(&self, kb: &str, file_id: &str) -> Result<bool> {
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM knowledge_files WHERE knowledge_id = $1 AND file_id = $2",
                &[&kb, &file_id],
            )
            .await?;
        Ok(n == 1)
    }

    async fn delete_knowledge(&self, kb: &str) -> Result<bool> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        txn.execute(
            "DELETE FROM knowledge_files WHERE knowledge_id = $1",
            &[&kb],
        )
        .await?;
        let n = txn
            .execute("DELETE FROM knowledge WHERE id = $1", &[&kb])
            .await?;
        txn.commit().await?;
        Ok(n == 1)
    }

    async fn add_usage(&self, rows: &[(UsageKey, UsageCounts)], keep_from_hour: u64) -> Result<()> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let stmt = txn
            .prepare(
                "INSERT INTO usage (hour, user_id, key_prefix, model, requests, prompt_tokens, completion_tokens)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (hour, user_id, key_prefix, model) DO UPDATE SET
                   requests = LEAST(usage.requests::numeric + EXCLUDED.requests, 9223372036854775807)::bigint,
                   prompt_tokens = LEAST(usage.prompt_tokens::numeric + EXCLUDED.prompt_tokens, 9223372036854775807)::bigint,
                   completion_tokens = LEAST(usage.completion_tokens::numeric + EXCLUDED.completion_tokens, 9223372036854775807)::bigint",
            )
            .await?;
        for (k, c) in rows {
            txn.execute(
                &stmt,
                &[
                    &to_i64(k.hour),
                    &k.user_id,
                    &k.key_prefix,
                    &k.model,
                    &to_i64(c.requests),
                    &to_i64(c.prompt_tokens),
                    &to_i64(c.completion_tokens),
                ],
            )
            .await?;
        }
        txn.execute(
            "DELETE FROM usage WHERE hour < $1",
            &[&to_i64(keep_from_hour)],
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    async fn scan_usage(
        &self,
        from_hour: u64,
        to_hour: u64,
        limit: usize,
    ) -> Result<Vec<(UsageKey, UsageCounts)>> {
        // Byte order of the text columns, as the embedded store's keys sort.
        let rows = self
            .client()
            .await?
            .query(
                r#"SELECT hour, user_id, key_prefix, model, requests, prompt_tokens, completion_tokens
                   FROM usage WHERE hour >= $1 AND hour < $2
                   ORDER BY hour, user_id COLLATE "C", key_prefix COLLATE "C", model COLLATE "C"
                   LIMIT $3"#,
                &[
                    &to_i64(from_hour),
                    &to_i64(to_hour),
                    &to_i64(limit as u64),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    UsageKey {
                        hour: to_u64(r.get(0)),
                        user_id: r.get(1),
                        key_prefix: r.get(2),
                        model: r.get(3),
                    },
                    UsageCounts {
                        requests: to_u64(r.get(4)),
                        prompt_tokens: to_u64(r.get(5)),
                        completion_tokens: to_u64(r.get(6)),
                    },
                )
            })
            .collect())
    }

    // --- migrate slice ---
    async fn all_settings(&self) -> Result<Vec<(String, String)>> {
        let rows = self
            .client()
            .await?
            .query(
                r#"SELECT key, value FROM settings ORDER BY key COLLATE "C""#,
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn revoked_tokens(&self) -> Result<Vec<(String, Option<u64>)>> {
        let rows = self
            .client()
            .await?
            .query(
                r#"SELECT jti, expires_at FROM revoked_tokens
                   WHERE expires_at = 0 OR expires_at > $1 ORDER BY jti COLLATE "C""#,
                &[&to_i64(now_secs())],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let exp = to_u64(r.get(1));
                (r.get(0), (exp != 0).then_some(exp))
            })
            .collect())
    }

    // --- accounts ---

    async fn set_api_key_limits(
        &self,
        user_id: &str,
        limits: crate::limits::Limits,
    ) -> Result<Option<ApiKeyRecord>> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        // The row lock keeps a key created meanwhile from being replaced by the old one.
        let Some(row) = txn
            .query_opt(
                "SELECT hash, body FROM api_keys WHERE user_id = $1 FOR UPDATE",
                &[&user_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let hash: String = row.get(0);
        let mut record: ApiKeyRecord = json_col(&row, 1, "api_keys")?;
        record.limits = limits;
        txn.execute(
            "UPDATE api_keys SET body = $2 WHERE hash = $1",
            &[&hash, &Json(&record)],
        )
        .await?;
        txn.commit().await?;
        Ok(Some(record))
    }

    // --- library: presets ---
    async fn preset(&self, id: &str) -> Result<Option<PresetRecord>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT body FROM presets WHERE id = $1", &[&id])
            .await?;
        row.map(|r| json_col(&r, 0, "presets")).transpose()
    }

    async fn presets(&self) -> Result<Vec<PresetRecord>> {
        // Byte order, as the embedded store's keys sort.
        let rows = self
            .client()
            .await?
            .query(r#"SELECT body FROM presets ORDER BY id COLLATE "C""#, &[])
            .await?;
        rows.iter().map(|r| json_col(r, 0, "presets")).collect()
    }

    async fn insert_preset(
        &self,
        rec: &PresetRecord,
        max_per_user: usize,
        max_total: usize,
    ) -> Result<Result<(), PresetRefusal>> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        // Creations on every replica serialise here, so none passes a bound together.
        txn.execute("LOCK TABLE presets IN SHARE ROW EXCLUSIVE MODE", &[])
            .await?;
        let row = txn
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM presets WHERE id = $1),
                        (SELECT count(*) FROM presets),
                        (SELECT count(*) FROM presets WHERE user_id = $2)",
                &[&rec.id, &rec.user_id],
            )
            .await?;
        let (taken, total, mine): (bool, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let refusal = if taken {
            Some(PresetRefusal::IdTaken)
        } else if usize::try_from(total).unwrap_or(usize::MAX) >= max_total {
            Some(PresetRefusal::TotalLimit)
        } else if usize::try_from(mine).unwrap_or(usize::MAX) >= max_per_user {
            Some(PresetRefusal::UserLimit)
        } else {
            None
        };
        if let Some(r) = refusal {
            return Ok(Err(r));
        }
        txn.execute(
            "INSERT INTO presets (id, user_id, body) VALUES ($1, $2, $3)",
            &[&rec.id, &rec.user_id, &Json(rec)],
        )
        .await?;
        txn.commit().await?;
        Ok(Ok(()))
    }

    async fn update_preset(&self, rec: &PresetRecord) -> Result<bool> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE presets SET user_id = $2, body = $3 WHERE id = $1",
                &[&rec.id, &rec.user_id, &Json(rec)],
            )
            .await?;
        Ok(n == 1)
    }

    async fn delete_preset(&self, id: &str) -> Result<bool> {
        let n = self
            .client()
            .await?
            .execute("DELETE FROM presets WHERE id = $1", &[&id])
            .await?;
        Ok(n == 1)
    }
}

/// The scope's file ids as a CTE over `$1` (files) and `$2` (collections).
const SCOPE_CTE: &str = "WITH scope AS (
    SELECT unnest($1::text[]) AS file_id
    UNION
    SELECT file_id FROM knowledge_files WHERE knowledge_id = ANY($2::text[])
)";

/// Stores the BM25 terms of chunks (their frequencies and each chunk's length) inside the
/// transaction that stores the chunks.
async fn index_terms(
    txn: &tokio_postgres::Transaction<'_>,
    ids: &[u64],
    texts: &[&str],
) -> Result<()> {
    let (mut chunk_ids, mut lens) = (Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
    let (mut t_ids, mut t_terms, mut t_tfs) = (Vec::new(), Vec::new(), Vec::new());
    for (id, text) in ids.iter().zip(texts) {
        let counts = TermCounts::of(text);
        chunk_ids.push(to_i64(*id));
        lens.push(i32::try_from(counts.len).unwrap_or(i32::MAX));
        for (term, tf) in counts.tf {
            t_ids.push(to_i64(*id));
            t_terms.push(without_nul(&term).into_owned());
            t_tfs.push(i32::try_from(tf).unwrap_or(i32::MAX));
        }
    }
    txn.execute(
        "UPDATE chunks SET term_len = x.len
         FROM unnest($1::bigint[], $2::int[]) AS x(id, len) WHERE chunks.id = x.id",
        &[&chunk_ids, &lens],
    )
    .await?;
    txn.execute(
        "INSERT INTO chunk_terms (chunk_id, term, tf)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[])
         ON CONFLICT (term, chunk_id) DO UPDATE SET tf = EXCLUDED.tf",
        &[&t_ids, &t_terms, &t_tfs],
    )
    .await?;
    Ok(())
}

/// Chunks indexed per transaction by [`backfill_terms`].
const BACKFILL_BATCH: i64 = 500;

/// Indexes the BM25 terms of chunks stored before migration 6, in batches. Replicas
/// starting together may index the same chunks: the writes are idempotent.
async fn backfill_terms(client: &mut tokio_postgres::Client) -> Result<u64> {
    let mut done = 0;
    loop {
        let rows = client
            .query(
                "SELECT id, body FROM chunks WHERE term_len IS NULL ORDER BY id LIMIT $1",
                &[&BACKFILL_BATCH],
            )
            .await?;
        if rows.is_empty() {
            return Ok(done);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut texts = Vec::with_capacity(rows.len());
        for r in &rows {
            ids.push(to_u64(r.get(0)));
            texts.push(
                json_col::<ChunkRecord>(r, 1, "chunks")?
                    .indexed_text()
                    .into_owned(),
            );
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let txn = client.transaction().await?;
        index_terms(&txn, &ids, &refs).await?;
        txn.commit().await?;
        done += ids.len() as u64;
    }
}

/// `s` with NUL (which PostgreSQL text cannot hold) replaced by U+FFFD.
fn without_nul(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

#[async_trait]
impl Chunks for Pg {
    async fn complete_file(
        &self,
        file: &FileRecord,
        text: &str,
        chunks: &[ChunkRecord],
        vectors: &[Vec<f32>],
    ) -> Result<Vec<u64>> {
        super::check_paired(chunks.len(), vectors.len())?;
        let dims: HashSet<usize> = vectors.iter().map(Vec::len).collect();
        for d in &dims {
            self.ensure_hnsw(*d).await?;
        }
        // PostgreSQL text cannot hold NUL; the record and chunk bodies (JSON) keep it escaped.
        let text = without_nul(text);
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let n = txn
            .execute(
                "UPDATE files SET body = $2, content = $3 WHERE id = $1",
                &[&file.id, &Json(file), &text.as_ref()],
            )
            .await?;
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        txn.execute("DELETE FROM chunks WHERE file_id = $1", &[&file.id])
            .await?;
        let stmt = txn
            .prepare(
                "INSERT INTO chunks (file_id, idx, body, embedding, tsv)
                 VALUES ($1, $2, $3, $4, to_tsvector('english', $5)) RETURNING id",
            )
            .await?;
        let mut ids = Vec::with_capacity(chunks.len());
        for (i, (c, v)) in chunks.iter().zip(vectors).enumerate() {
            let idx = i32::try_from(i).unwrap_or(i32::MAX);
            let row = txn
                .query_one(
                    &stmt,
                    &[
                        &file.id,
                        &idx,
                        &Json(c),
                        &PgVector(v),
                        &without_nul(&c.indexed_text()).as_ref(),
                    ],
                )
                .await?;
            ids.push(to_u64(row.get(0)));
        }
        let indexed: Vec<_> = chunks.iter().map(ChunkRecord::indexed_text).collect();
        let texts: Vec<&str> = indexed.iter().map(AsRef::as_ref).collect();
        index_terms(&txn, &ids, &texts).await?;
        txn.execute("DELETE FROM jobs WHERE file_id = $1", &[&file.id])
            .await?;
        txn.commit().await?;
        Ok(ids)
    }

    async fn fail_file(&self, file: &FileRecord) -> Result<()> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let n = txn
            .execute(
                "UPDATE files SET body = $2, content = NULL WHERE id = $1",
                &[&file.id, &Json(file)],
            )
            .await?;
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        txn.execute("DELETE FROM chunks WHERE file_id = $1", &[&file.id])
            .await?;
        txn.execute("DELETE FROM jobs WHERE file_id = $1", &[&file.id])
            .await?;
        txn.commit().await?;
        Ok(())
    }

    async fn file_chunk_ids(&self, file_id: &str) -> Result<Vec<u64>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id FROM chunks WHERE file_id = $1 ORDER BY idx",
                &[&file_id],
            )
            .await?;
        Ok(rows.iter().map(|r| to_u64(r.get(0))).collect())
    }

    async fn chunks(&self, ids: &[u64]) -> Result<Vec<(u64, ChunkRecord)>> {
        let wanted: Vec<i64> = ids.iter().map(|i| to_i64(*i)).collect();
        let rows = self
            .client()
            .await?
            .query("SELECT id, body FROM chunks WHERE id = ANY($1)", &[&wanted])
            .await?;
        let mut by_id = std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            by_id.insert(to_u64(r.get(0)), json_col::<ChunkRecord>(r, 1, "chunks")?);
        }
        // In the order asked, as the embedded store answers.
        Ok(ids
            .iter()
            .filter_map(|id| by_id.remove(id).map(|c| (*id, c)))
            .collect())
    }

    async fn dense_search(&self, scope: &Scope, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        if k == 0 || query.is_empty() || (scope.files.is_empty() && scope.collections.is_empty()) {
            return Ok(Vec::new());
        }
        let dim = query.len();
        let dim_i32 = i32::try_from(dim).unwrap_or(i32::MAX);
        let limit = to_i64(k as u64);
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let count: i64 = txn
            .query_one(
                &format!(
                    "{SCOPE_CTE} SELECT count(*) FROM chunks c JOIN scope s ON s.file_id = c.file_id"
                ),
                &[&scope.files, &scope.collections],
            )
            .await?
            .get(0);
        let rows = if to_u64(count) <= self.options.exact_scan_limit {
            // Every chunk of the scope scored: exact, and cheap at this size.
            txn.query(
                &format!(
                    "{SCOPE_CTE} SELECT c.id, (1 - (c.embedding <=> $3))::float4
                     FROM chunks c JOIN scope s ON s.file_id = c.file_id
                     WHERE vector_dims(c.embedding) = $4
                     ORDER BY c.embedding <=> $3, c.id LIMIT $5"
                ),
                &[
                    &scope.files,
                    &scope.collections,
                    &PgVector(query),
                    &dim_i32,
                    &limit,
                ],
            )
            .await?
        } else {
            // The HNSW walk returns ef_search candidates before the scope filter: widen it
            // with k so a filtered scope still fills k (pgvector 0.6 has no iterative scan).
            let ef = (k * 8).clamp(100, 1000);
            txn.batch_execute(&format!("SET LOCAL hnsw.ef_search = {ef}"))
                .await?;
            txn.query(
                &format!(
                    "{SCOPE_CTE} SELECT c.id, (1 - (c.embedding::vector({dim}) <=> $3::vector({dim})))::float4
                     FROM chunks c
                     WHERE vector_dims(c.embedding) = {dim} AND c.file_id IN (SELECT file_id FROM scope)
                     ORDER BY c.embedding::vector({dim}) <=> $3::vector({dim}) LIMIT $4"
                ),
                &[&scope.files, &scope.collections, &PgVector(query), &limit],
            )
            .await?
        };
        txn.commit().await?;
        Ok(rows.iter().map(|r| (to_u64(r.get(0)), r.get(1))).collect())
    }

    async fn lexical_search(&self, scope: &Scope, query: &str, k: usize) -> Result<Vec<Hit>> {
        self.bm25(scope, query, k, Bm25Params::default()).await
    }

    // Retrieval.
    async fn similarities(
        &self,
        query: &[f32],
        chunks: &[ChunkRef<'_>],
    ) -> Result<Vec<Option<f32>>> {
        if chunks.is_empty() || query.is_empty() {
            return Ok(vec![None; chunks.len()]);
        }
        let wanted: Vec<i64> = chunks.iter().map(|c| to_i64(c.0)).collect();
        let dim = i32::try_from(query.len()).unwrap_or(i32::MAX);
        // `<#>` is the negated inner product: the embedded backend's score exactly (cosine
        // for the unit vectors ragway stores). CASE keeps another dimension from erroring.
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, CASE WHEN vector_dims(embedding) = $3
                     THEN (-(embedding <#> $2))::float4 END
                 FROM chunks WHERE id = ANY($1)",
                &[&wanted, &PgVector(query), &dim],
            )
            .await?;
        let by_id: std::collections::HashMap<u64, Option<f32>> =
            rows.iter().map(|r| (to_u64(r.get(0)), r.get(1))).collect();
        Ok(chunks
            .iter()
            .map(|c| by_id.get(&c.0).copied().flatten())
            .collect())
    }

    async fn vectors(&self, chunks: &[ChunkRef<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: Vec<i64> = chunks.iter().map(|c| to_i64(c.0)).collect();
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, embedding FROM chunks WHERE id = ANY($1)",
                &[&wanted],
            )
            .await?;
        let by_id: std::collections::HashMap<u64, Vec<f32>> = rows
            .iter()
            .map(|r| (to_u64(r.get(0)), r.get::<_, OwnedVector>(1).0))
            .collect();
        // Cloned, not moved out: an id asked twice gets its vector twice.
        Ok(chunks.iter().map(|c| by_id.get(&c.0).cloned()).collect())
    }

    async fn lexical_search_with(
        &self,
        scope: &Scope,
        query: &str,
        k: usize,
        params: Bm25Params,
    ) -> Result<Option<Vec<Hit>>> {
        Ok(Some(self.bm25(scope, query, k, params).await?))
    }

    // --- migrate slice ---
    async fn file_vectors(&self, file_id: &str) -> Result<Vec<(u64, Vec<f32>)>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, embedding FROM chunks WHERE file_id = $1 ORDER BY idx",
                &[&file_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (to_u64(r.get(0)), r.get::<_, OwnedVector>(1).0))
            .collect())
    }

    async fn import_file(
        &self,
        file: &FileRecord,
        text: &str,
        chunks: &[(u64, ChunkRecord)],
        vectors: &[Vec<f32>],
    ) -> Result<()> {
        super::check_paired(chunks.len(), vectors.len())?;
        let dims: HashSet<usize> = vectors.iter().map(Vec::len).collect();
        for d in &dims {
            self.ensure_hnsw(*d).await?;
        }
        let text = without_nul(text);
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let n = txn
            .execute(
                "UPDATE files SET body = $2, content = $3 WHERE id = $1",
                &[&file.id, &Json(file), &text.as_ref()],
            )
            .await?;
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        txn.execute("DELETE FROM chunks WHERE file_id = $1", &[&file.id])
            .await?;
        let stmt = txn
            .prepare(
                "INSERT INTO chunks (id, file_id, idx, body, embedding, tsv)
                 VALUES ($1, $2, $3, $4, $5, to_tsvector('english', $6))",
            )
            .await?;
        for (i, ((id, c), v)) in chunks.iter().zip(vectors).enumerate() {
            let idx = i32::try_from(i).unwrap_or(i32::MAX);
            let r = txn
                .execute(
                    &stmt,
                    &[
                        &to_i64(*id),
                        &file.id,
                        &idx,
                        &Json(c),
                        &PgVector(v),
                        &without_nul(&c.indexed_text()).as_ref(),
                    ],
                )
                .await;
            match r {
                Err(e) if is(&e, &SqlState::UNIQUE_VIOLATION) => {
                    return Err(StorageError::Corrupt {
                        table: "chunks",
                        message: format!("chunk id {id} already belongs to another file"),
                    });
                }
                r => r?,
            };
        }
        let ids: Vec<u64> = chunks.iter().map(|c| c.0).collect();
        let indexed: Vec<_> = chunks.iter().map(|c| c.1.indexed_text()).collect();
        let texts: Vec<&str> = indexed.iter().map(AsRef::as_ref).collect();
        index_terms(&txn, &ids, &texts).await?;
        txn.execute("DELETE FROM jobs WHERE file_id = $1", &[&file.id])
            .await?;
        // The sequence moves past every imported id (never back: ids are not reused).
        // A fresh sequence reports last_value 1 before its first use; marking it used
        // at GREATEST(max, 1) only skips id 1.
        if let Some(max) = chunks.iter().map(|c| c.0).max() {
            txn.execute(
                "SELECT setval('chunks_id_seq', GREATEST($1, s.last_value), true) FROM chunks_id_seq s",
                &[&to_i64(max)],
            )
            .await?;
        }
        txn.commit().await?;
        Ok(())
    }
}

impl Pg {
    /// Okapi BM25 over the scope with the given `k1`/`b`.
    async fn bm25(
        &self,
        scope: &Scope,
        query: &str,
        k: usize,
        params: Bm25Params,
    ) -> Result<Vec<Hit>> {
        let mut terms = crate::index::bm25::terms(query);
        terms.sort();
        terms.dedup();
        terms.truncate(MAX_QUERY_TERMS);
        if terms.is_empty() || k == 0 || (scope.files.is_empty() && scope.collections.is_empty()) {
            return Ok(Vec::new());
        }
        // Okapi BM25 exactly as the embedded index scores (`Bm25Index::search_with`): the
        // same terms, statistics (chunk count, mean length, document frequency) over the
        // scope, the "plus one" IDF, and ties by id.
        let Bm25Params { k1, b } = params;
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "{SCOPE_CTE},
                     sc AS (SELECT c.id, c.term_len FROM chunks c JOIN scope s ON s.file_id = c.file_id
                            WHERE c.term_len IS NOT NULL),
                     stats AS (SELECT count(*)::float8 AS n,
                                      GREATEST(COALESCE(avg(term_len)::float8, 1), 1) AS avgdl FROM sc),
                     m AS (SELECT t.term, t.chunk_id, t.tf::float8 AS tf, sc.term_len::float8 AS dl
                           FROM chunk_terms t JOIN sc ON sc.id = t.chunk_id
                           WHERE t.term = ANY($3::text[])),
                     df AS (SELECT term, count(*)::float8 AS df FROM m GROUP BY term)
                     SELECT m.chunk_id, sum(
                         ln((stats.n - df.df + 0.5) / (df.df + 0.5) + 1)
                         * m.tf * ($5::float8 + 1)
                         / (m.tf + $5::float8 * (1 - $6::float8 + $6::float8 * m.dl / stats.avgdl))
                     )::float4 AS score
                     FROM m JOIN df ON df.term = m.term, stats
                     GROUP BY m.chunk_id
                     ORDER BY score DESC, m.chunk_id LIMIT $4"
                ),
                &[
                    &scope.files,
                    &scope.collections,
                    &terms,
                    &to_i64(k as u64),
                    &f64::from(k1),
                    &f64::from(b),
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| (to_u64(r.get(0)), r.get(1))).collect())
    }
}

#[async_trait]
impl WorkQueue for Pg {
    async fn enqueue(&self, file_id: &str) -> Result<()> {
        let r = self
            .client()
            .await?
            .execute(
                "INSERT INTO jobs (file_id) VALUES ($1) ON CONFLICT (file_id) DO NOTHING",
                &[&file_id],
            )
            .await;
        match r {
            Err(e) if is(&e, &SqlState::FOREIGN_KEY_VIOLATION) => Err(StorageError::NotFound),
            r => r.map(|_| ()).map_err(Into::into),
        }
    }

    async fn claim(&self, lease: Duration) -> Result<Option<Job>> {
        let token = uuid::Uuid::new_v4().to_string();
        // SKIP LOCKED: replicas claiming at once each get a different row, none waits.
        let row = self
            .client()
            .await?
            .query_opt(
                "UPDATE jobs SET token = $1,
                        lease_until = clock_timestamp() + make_interval(secs => $2),
                        attempts = attempts + 1
                 WHERE file_id = (
                     SELECT file_id FROM jobs
                     WHERE lease_until IS NULL OR lease_until <= clock_timestamp()
                     ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING file_id, attempts",
                &[&token, &lease.as_secs_f64()],
            )
            .await?;
        Ok(row.map(|r| Job {
            file_id: r.get(0),
            attempts: u32::try_from(r.get::<_, i32>(1)).unwrap_or(0),
            token,
        }))
    }

    async fn heartbeat(&self, job: &Job, lease: Duration) -> Result<bool> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE jobs SET lease_until = clock_timestamp() + make_interval(secs => $3)
                 WHERE file_id = $1 AND token = $2 AND lease_until > clock_timestamp()",
                &[&job.file_id, &job.token, &lease.as_secs_f64()],
            )
            .await?;
        Ok(n == 1)
    }

    async fn complete(&self, job: &Job) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM jobs WHERE file_id = $1 AND token = $2 AND lease_until > clock_timestamp()",
                &[&job.file_id, &job.token],
            )
            .await?;
        if n == 1 {
            return Ok(true);
        }
        // Gone already (complete_file / fail_file take the job off with the result): done.
        Ok(client
            .query_opt("SELECT 1 FROM jobs WHERE file_id = $1", &[&job.file_id])
            .await?
            .is_none())
    }

    async fn fail(&self, job: &Job, max_attempts: u32) -> Result<Retry> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let Some(row) = txn
            .query_opt(
                "SELECT attempts FROM jobs
                 WHERE file_id = $1 AND token = $2 AND lease_until > clock_timestamp()
                 FOR UPDATE",
                &[&job.file_id, &job.token],
            )
            .await?
        else {
            return Ok(Retry::LeaseLost);
        };
        let attempts = u32::try_from(row.get::<_, i32>(0)).unwrap_or(0);
        let out = if attempts >= max_attempts {
            txn.execute("DELETE FROM jobs WHERE file_id = $1", &[&job.file_id])
                .await?;
            Retry::GaveUp
        } else {
            txn.execute(
                "UPDATE jobs SET token = NULL, lease_until = NULL WHERE file_id = $1",
                &[&job.file_id],
            )
            .await?;
            Retry::Requeued
        };
        txn.commit().await?;
        Ok(out)
    }

    async fn pending(&self, limit: usize) -> Result<Vec<String>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT file_id FROM jobs ORDER BY seq LIMIT $1",
                &[&to_i64(limit as u64)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn is_queued(&self, file_id: &str) -> Result<bool> {
        Ok(self
            .client()
            .await?
            .query_opt("SELECT 1 FROM jobs WHERE file_id = $1", &[&file_id])
            .await?
            .is_some())
    }

    // Ingest slice (issue 11).
    async fn claim_file(&self, file_id: &str, lease: Duration) -> Result<Option<Job>> {
        let token = uuid::Uuid::new_v4().to_string();
        // The row lock orders concurrent claims: the second sees the first's live lease.
        let row = self
            .client()
            .await?
            .query_opt(
                "UPDATE jobs SET token = $2,
                        lease_until = clock_timestamp() + make_interval(secs => $3),
                        attempts = attempts + 1
                 WHERE file_id = $1
                   AND (lease_until IS NULL OR lease_until <= clock_timestamp())
                 RETURNING attempts",
                &[&file_id, &token, &lease.as_secs_f64()],
            )
            .await?;
        Ok(row.map(|r| Job {
            file_id: file_id.to_string(),
            attempts: u32::try_from(r.get::<_, i32>(0)).unwrap_or(0),
            token,
        }))
    }
}

#[async_trait]
impl Blobs for Pg {
    async fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        check_key(key)?;
        self.client()
            .await?
            .execute(
                "INSERT INTO blobs (key, data) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET data = EXCLUDED.data",
                &[&key, &data],
            )
            .await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        let row = self
            .client()
            .await?
            .query_opt("SELECT data FROM blobs WHERE key = $1", &[&key])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let n = self
            .client()
            .await?
            .execute("DELETE FROM blobs WHERE key = $1", &[&key])
            .await?;
        Ok(n == 1)
    }

    // --- library ---
    async fn put_file(&self, key: &str, from: &Path) -> Result<()> {
        check_key(key)?;
        // bytea takes the value whole; uploads are bounded by `rag.file-max-bytes`.
        let data = tokio::fs::read(from).await?;
        self.put(key, &data).await?;
        tokio::fs::remove_file(from).await?;
        Ok(())
    }
    // Ingest slice (issue 11): blobs are rows, never local files.
    fn local_path(&self, _key: &str) -> Option<std::path::PathBuf> {
        None
    }
}

/// Increments between sweeps of expired counters: keeps the table at about the keys live
/// in their windows without a sweep per request.
const COUNTER_SWEEP_EVERY: u64 = 1024;

#[async_trait]
impl Counters for Pg {
    async fn increment(&self, key: &str, window: Duration) -> Result<(u64, Duration)> {
        check_key(key)?;
        let client = self.client().await?;
        if self.increments.fetch_add(1, Ordering::Relaxed) % COUNTER_SWEEP_EVERY
            == COUNTER_SWEEP_EVERY - 1
        {
            client
                .execute(
                    "DELETE FROM counters WHERE window_end <= clock_timestamp()",
                    &[],
                )
                .await?;
        }
        let row = client
            .query_one(
                "INSERT INTO counters (key, count, window_end)
                 VALUES ($1, 1, clock_timestamp() + make_interval(secs => $2))
                 ON CONFLICT (key) DO UPDATE SET
                   count = CASE WHEN counters.window_end <= clock_timestamp() THEN 1
                                ELSE counters.count + 1 END,
                   window_end = CASE WHEN counters.window_end <= clock_timestamp()
                                THEN clock_timestamp() + make_interval(secs => $2)
                                ELSE counters.window_end END
                 RETURNING count, GREATEST(EXTRACT(EPOCH FROM (window_end - clock_timestamp())), 0)::float8",
                &[&key, &window.as_secs_f64()],
            )
            .await?;
        let left: f64 = row.get(1);
        Ok((
            to_u64(row.get(0)),
            Duration::try_from_secs_f64(left).unwrap_or_default(),
        ))
    }

    async fn get(&self, key: &str) -> Result<u64> {
        check_key(key)?;
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT count FROM counters WHERE key = $1 AND window_end > clock_timestamp()",
                &[&key],
            )
            .await?;
        Ok(row.map_or(0, |r| to_u64(r.get(0))))
    }
}

/// Admissions between sweeps of full rate-limit buckets (see `0007_rate_limits.sql`).
const RATE_SWEEP_EVERY: u64 = 1024;

/// A request's buckets as the `ragway_rate_*` functions take them: one array per column.
#[derive(Default)]
struct BucketArrays {
    key: Vec<bool>,
    kind: Vec<i16>,
    limit: Vec<f64>,
    window: Vec<f64>,
    tokens: Vec<bool>,
    /// The limits, by (key, kind code), to read refusals back.
    limits: Vec<(bool, Kind, u64)>,
}

impl BucketArrays {
    /// The buckets of `applied` that `keep` accepts.
    fn of(applied: &Applied, keep: impl Fn(Kind) -> bool) -> BucketArrays {
        let mut a = BucketArrays::default();
        for (key, kind, limit) in applied.buckets().filter(|b| keep(b.1)) {
            a.key.push(key);
            a.kind.push(kind.code());
            #[allow(clippy::cast_precision_loss)] // limits are ≤ 10^12, exact in f64
            a.limit.push(limit as f64);
            a.window.push(kind.window().as_secs_f64());
            a.tokens.push(kind.tokens());
            a.limits.push((key, kind, limit));
        }
        a
    }
}

/// Buckets live in the `rate_limits` table; admission and charge are one call each to a
/// function that locks the user's buckets, so replicas share them exactly.
#[async_trait]
impl RateLimits for Pg {
    async fn admit(&self, applied: &Applied) -> Result<Result<(), Refused>> {
        let b = BucketArrays::of(applied, |_| true);
        if b.kind.is_empty() {
            return Ok(Ok(()));
        }
        let client = self.client().await?;
        if self.admissions.fetch_add(1, Ordering::Relaxed) % RATE_SWEEP_EVERY
            == RATE_SWEEP_EVERY - 1
        {
            sweep_rate_limits(&client).await?;
        }
        let stmt = client
            .prepare_cached(
                "SELECT r_key, r_kind, r_used FROM ragway_rate_admit($1, $2, $3, $4, $5, $6)",
            )
            .await?;
        let rows = client
            .query(
                &stmt,
                &[
                    &applied.user_id,
                    &b.key,
                    &b.kind,
                    &b.limit,
                    &b.window,
                    &b.tokens,
                ],
            )
            .await?;
        // In the request's bucket order, which breaks ties between equal waits.
        let mut refusals: Vec<(usize, Refused)> = rows
            .iter()
            .filter_map(|r| {
                let (key, code, used): (bool, i16, f64) = (r.get(0), r.get(1), r.get(2));
                let kind = Kind::from_code(code)?;
                let at = b.limits.iter().position(|l| l.0 == key && l.1 == kind)?;
                Some((at, Refused::by(kind, key, b.limits[at].2, used)))
            })
            .collect();
        refusals.sort_by_key(|r| r.0);
        Ok(Refused::worst(refusals.into_iter().map(|r| r.1)).map_or(Ok(()), Err))
    }

    async fn charge(&self, applied: &Applied, tokens: u64) -> Result<()> {
        let b = BucketArrays::of(applied, Kind::tokens);
        if tokens == 0 || b.kind.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT ragway_rate_charge($1, $2, $3, $4, $5, $6, $7)")
            .await?;
        #[allow(clippy::cast_precision_loss)] // the charge is capped at twice a limit anyway
        let amount = tokens as f64;
        client
            .execute(
                &stmt,
                &[
                    &applied.user_id,
                    &b.key,
                    &b.kind,
                    &b.limit,
                    &b.window,
                    &b.tokens,
                    &amount,
                ],
            )
            .await?;
        Ok(())
    }

    fn len(&self) -> usize {
        0
    }
}

/// Deletes the rate-limit buckets that are full again: they carry nothing (a missing row
/// is a full bucket).
async fn sweep_rate_limits(client: &tokio_postgres::Client) -> Result<u64> {
    Ok(client
        .execute(
            "DELETE FROM rate_limits WHERE full_at <= clock_timestamp()",
            &[],
        )
        .await?)
}

#[async_trait]
impl Signals for Pg {
    async fn publish(&self, signal: &Signal) -> Result<()> {
        let payload = serde_json::to_string(signal).expect("signals serialise");
        if payload.len() > MAX_SIGNAL_BYTES {
            return Err(StorageError::InvalidKey(format!(
                "signal of {} bytes (at most {MAX_SIGNAL_BYTES})",
                payload.len()
            )));
        }
        self.client()
            .await?
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
            .await?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }
}

impl Pg {
    /// A stored vector, for tests and `ragway migrate` checks.
    ///
    /// # Errors
    /// The database failed.
    pub async fn vector(&self, chunk: u64) -> Result<Option<Vec<f32>>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT embedding FROM chunks WHERE id = $1",
                &[&to_i64(chunk)],
            )
            .await?;
        Ok(row.map(|r| r.get::<_, OwnedVector>(0).0))
    }

    /// Deletes the rate-limit buckets that are full again now (done every
    /// [`RATE_SWEEP_EVERY`] admissions); returns how many.
    ///
    /// # Errors
    /// The database failed.
    pub async fn sweep_rate_limits(&self) -> Result<u64> {
        sweep_rate_limits(&*self.client().await?).await
    }

    /// Rate-limit buckets stored (tests check the sweep).
    ///
    /// # Errors
    /// The database failed.
    pub async fn rate_limit_rows(&self) -> Result<u64> {
        let row = self
            .client()
            .await?
            .query_one("SELECT count(*) FROM rate_limits", &[])
            .await?;
        Ok(to_u64(row.get(0)))
    }

    /// Applied migration versions, in order.
    ///
    /// # Errors
    /// The database failed.
    pub async fn schema_versions(&self) -> Result<Vec<i32>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT version FROM schema_migrations ORDER BY version",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_echoing_them() {
        assert!(parse_url("postgres://u:secret@127.0.0.1:5432/db").is_ok());
        assert!(parse_url("host=127.0.0.1 dbname=db user=u").is_ok());
        for bad in [
            "",
            "   ",
            "mysql://u:secret@h/db",
            "postgres://u:secret@h:notaport/db",
            "postgres://u:secret@h/db?sslmode=require",
            "postgres://u:secret@h:5432",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
    }
}
