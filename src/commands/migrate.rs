//! `ragway migrate --to postgres://...`: copies a stopped embedded data dir (redb store,
//! its indexes, uploaded files) into PostgreSQL, through the storage seams on both sides:
//! the embedded [`Storage`] reads, the PostgreSQL one writes. Chunks move with their ids
//! and vectors ([`crate::storage::Chunks::import_file`]): nothing is re-embedded, and a
//! chunk id seen in a log or a retrieval answer still means the same chunk afterwards.
//!
//! The target must be empty unless `--resume` is given: then every row is upserted, so a
//! migration interrupted half-way is finished by running it again (usage rows are topped
//! up to the source's counts, never added twice). After copying, the counts of every kind
//! are read back from both sides and compared, with every chunk id list and the vectors
//! and blobs of a sample of files compared exactly.
//!
//! Not copied: what lives only in memory (leases, counters, signals), and the files and
//! collections of users whose deletion was still pending (the deleted user is gone from
//! the source already; the rest would be swept at the next start).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::index::GraphKind;
use crate::storage::embedded::vectors::VectorStore;
use crate::storage::postgres::{self, PgOptions};
use crate::storage::{Storage, StorageError, check_key, embedded};
use crate::store::{FileRecord, Store, StoreError, UsageCounts, UsageKey, User};

/// Files whose vectors and blobs are compared byte for byte after the copy.
const SAMPLE_FILES: usize = 64;

/// Connections to PostgreSQL: the copy is sequential, a few suffice.
const POOL_SIZE: usize = 4;

/// How many of each kind: copied, and read back from each side.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub users: u64,
    pub api_keys: u64,
    pub revoked_tokens: u64,
    pub settings: u64,
    pub presets: u64,
    pub collections: u64,
    pub files: u64,
    pub chunks: u64,
    pub memberships: u64,
    pub jobs: u64,
    pub usage_rows: u64,
    pub blobs: u64,
}

impl Counts {
    /// Kind names and counts, in report order.
    #[must_use]
    pub fn rows(&self) -> [(&'static str, u64); 12] {
        [
            ("users", self.users),
            ("api keys", self.api_keys),
            ("revoked tokens", self.revoked_tokens),
            ("settings", self.settings),
            ("model presets", self.presets),
            ("collections", self.collections),
            ("files", self.files),
            ("chunks (with vectors)", self.chunks),
            ("collection memberships", self.memberships),
            ("queued jobs", self.jobs),
            ("usage rows", self.usage_rows),
            ("blobs (uploads)", self.blobs),
        ]
    }
}

/// What a migration did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub copied: Counts,
    /// Files and collections of users whose deletion was pending, left behind.
    pub skipped_files: u64,
    pub skipped_collections: u64,
    /// Files whose vectors and blob were compared exactly.
    pub sampled_files: usize,
    /// Vectors compared exactly.
    pub sampled_vectors: usize,
}

/// Why a migration stopped. Messages say what to do; none repeats the URL (it may hold
/// a password).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    Target(String),
    #[error("{0}")]
    NotEmpty(String),
    #[error("copying {what} failed: {source}")]
    Copy { what: String, source: StorageError },
    #[error("verification failed: {0}")]
    Verify(String),
}

fn copy_err(what: impl Into<String>) -> impl FnOnce(StorageError) -> MigrateError {
    let what = what.into();
    move |source| MigrateError::Copy { what, source }
}

/// Opens a stopped data dir as the embedded [`Storage`], with its indexes loaded as
/// `serve` loads them (in memory only: no graph is built or saved, the dir is only read).
///
/// # Errors
/// No database in `data_dir`, the data dir is in use by a running ragway, or the store
/// cannot be read.
pub fn open_source(data_dir: &Path) -> Result<Storage, MigrateError> {
    let db = data_dir.join("ragway.redb");
    if !db.is_file() {
        return Err(MigrateError::Source(format!(
            "no ragway database at {} (set --data-dir or DATA_DIR to the data dir to migrate)",
            db.display()
        )));
    }
    let store = Store::open(&db).map_err(|e| match e {
        StoreError::Db(redb::Error::DatabaseAlreadyOpen) => MigrateError::Source(format!(
            "the data dir {} is in use by a running ragway: stop it first (migrate copies a \
             stopped data dir, so nothing changes during the copy)",
            data_dir.display()
        )),
        e => MigrateError::Source(format!("cannot open {}: {e}", db.display())),
    })?;
    let store = Arc::new(store);
    // No graph: a threshold no collection reaches keeps every search exact and nothing
    // is written next to the database.
    let index = Arc::new(VectorStore::new(usize::MAX, GraphKind::default(), None));
    index
        .load(&store)
        .map_err(|e| MigrateError::Source(format!("cannot load the indexes: {e}")))?;
    Ok(embedded::storage(
        store,
        index,
        data_dir.join("uploads"),
        16,
    ))
}

/// Where a PostgreSQL URL points, without its password.
#[must_use]
pub fn describe_url(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => String::new(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or_default())
}

/// Connects to the target database and migrates its schema.
///
/// # Errors
/// A bad URL, an unreachable database, or a failed schema migration.
pub async fn connect_target(url: &str) -> Result<Storage, MigrateError> {
    let cfg = postgres::parse_url(url).map_err(|e| MigrateError::Target(format!("--to: {e}")))?;
    let at = describe_url(&cfg);
    postgres::connect(
        url,
        PgOptions {
            pool_size: POOL_SIZE,
            ..PgOptions::default()
        },
    )
    .await
    .map_err(|e| {
        MigrateError::Target(format!(
            "cannot use PostgreSQL at {at}: {e} (is it running and reachable, with the \
             pgvector extension available?)"
        ))
    })
}

/// What the target holds already (the refusal names it).
async fn target_contents(dst: &Storage) -> Result<Vec<String>, StorageError> {
    let mut held = Vec::new();
    let users = dst.meta.user_count().await?;
    if users > 0 {
        held.push(format!("{users} user(s)"));
    }
    let files = dst.meta.files().await?.len();
    if files > 0 {
        held.push(format!("{files} file(s)"));
    }
    let kbs = dst.meta.knowledges().await?.len();
    if kbs > 0 {
        held.push(format!("{kbs} collection(s)"));
    }
    let settings = dst.meta.all_settings().await?.len();
    if settings > 0 {
        held.push(format!("{settings} setting(s)"));
    }
    let presets = dst.meta.presets().await?.len();
    if presets > 0 {
        held.push(format!("{presets} model preset(s)"));
    }
    if !dst.queue.pending(1).await?.is_empty() {
        held.push("queued jobs".into());
    }
    if !dst.meta.scan_usage(0, u64::MAX, 1).await?.is_empty() {
        held.push("usage rows".into());
    }
    Ok(held)
}

/// The blob key of a file: the file name of its stored path (`{id}_{name}`).
fn blob_key(f: &FileRecord) -> Option<String> {
    let name = Path::new(&f.path)
        .file_name()?
        .to_string_lossy()
        .into_owned();
    check_key(&name).ok().map(|()| name)
}

/// Users whose deletion was pending: their files and collections are not copied.
async fn deleted_owners(src: &Storage) -> Result<HashSet<String>, MigrateError> {
    Ok(src
        .meta
        .pending_user_deletions()
        .await
        .map_err(copy_err("pending user deletions"))?
        .into_iter()
        .collect())
}

/// Copies `src` into `dst` and verifies the copy.
///
/// # Errors
/// The target is not empty (without `resume`), a read or write failed, or the copy does
/// not match the source.
pub async fn migrate(
    src: &Storage,
    dst: &Storage,
    resume: bool,
    progress: &indicatif::ProgressBar,
) -> Result<Report, MigrateError> {
    if !resume {
        let held = target_contents(dst)
            .await
            .map_err(copy_err("reading the target"))?;
        if !held.is_empty() {
            return Err(MigrateError::NotEmpty(format!(
                "the target database is not empty (it holds {}): migrate into an empty \
                 database, or pass --resume to finish an interrupted migration of this same \
                 data dir (rows are overwritten with the source's)",
                held.join(", ")
            )));
        }
    }
    let skip = deleted_owners(src).await?;
    let mut copied = Counts::default();
    copy_accounts(src, dst, &mut copied).await?;

    let mut skipped_collections = 0;
    let mut kbs = HashSet::new();
    for kb in src
        .meta
        .knowledges()
        .await
        .map_err(copy_err("collections"))?
    {
        if skip.contains(&kb.user_id) {
            skipped_collections += 1;
            continue;
        }
        dst.meta
            .put_knowledge(&kb)
            .await
            .map_err(copy_err(format!("collection {}", kb.id)))?;
        kbs.insert(kb.id);
        copied.collections += 1;
    }

    copied.presets = copy_presets(src, dst, &skip).await?;

    let files = src.meta.files().await.map_err(copy_err("files"))?;
    progress.set_length(files.len() as u64);
    let mut skipped_files = 0;
    let mut copied_files = HashSet::new();
    for f in files {
        progress.inc(1);
        if skip.contains(&f.user_id) {
            skipped_files += 1;
            continue;
        }
        copied.chunks += copy_file(src, dst, &f).await?;
        if let Some(key) = blob_key(&f)
            && let Some(data) = src
                .blobs
                .get(&key)
                .await
                .map_err(copy_err(format!("the upload of file {}", f.id)))?
        {
            dst.blobs
                .put(&key, &data)
                .await
                .map_err(copy_err(format!("the upload of file {}", f.id)))?;
            copied.blobs += 1;
        }
        for kb in src
            .meta
            .file_knowledge(&f.id)
            .await
            .map_err(copy_err("memberships"))?
        {
            if kbs.contains(&kb) {
                dst.meta
                    .link_file(&kb, &f.id)
                    .await
                    .map_err(copy_err(format!("file {} in collection {kb}", f.id)))?;
                copied.memberships += 1;
            }
        }
        copied.files += 1;
        copied_files.insert(f.id);
    }

    // Queued last: a job must find its file complete.
    for id in src
        .queue
        .pending(usize::MAX)
        .await
        .map_err(copy_err("the queue"))?
    {
        if copied_files.contains(&id) {
            dst.queue
                .enqueue(&id)
                .await
                .map_err(copy_err(format!("the job of file {id}")))?;
            copied.jobs += 1;
        }
    }
    copied.usage_rows = copy_usage(src, dst).await?;

    let (sampled_files, sampled_vectors) = verify(src, dst, &skip).await?;
    Ok(Report {
        copied,
        skipped_files,
        skipped_collections,
        sampled_files,
        sampled_vectors,
    })
}

/// Model presets (but those of users whose deletion was pending), unbounded: the source's
/// bounds admitted them. With `--resume` a preset copied before is overwritten.
async fn copy_presets(
    src: &Storage,
    dst: &Storage,
    skip: &HashSet<String>,
) -> Result<u64, MigrateError> {
    let mut n = 0;
    for p in src
        .meta
        .presets()
        .await
        .map_err(copy_err("model presets"))?
    {
        if skip.contains(&p.user_id) {
            continue;
        }
        let what = || format!("model preset {}", p.id);
        match dst
            .meta
            .insert_preset(&p, usize::MAX, usize::MAX)
            .await
            .map_err(copy_err(what()))?
        {
            Ok(()) => {}
            Err(crate::store::PresetRefusal::IdTaken) => {
                dst.meta.update_preset(&p).await.map_err(copy_err(what()))?;
            }
            Err(refusal) => {
                return Err(MigrateError::Copy {
                    what: what(),
                    source: StorageError::Postgres(format!("refused: {refusal:?}")),
                });
            }
        }
        n += 1;
    }
    if n > 0 {
        // Replicas already serving from the target drop their copies of its presets now
        // rather than when the copies expire.
        dst.signals
            .publish(&crate::storage::Signal::ModelsChanged)
            .await
            .map_err(copy_err("model presets".to_string()))?;
    }
    Ok(n)
}

/// Users, settings (the primary admin among them), API keys and revoked sessions.
async fn copy_accounts(
    src: &Storage,
    dst: &Storage,
    copied: &mut Counts,
) -> Result<(), MigrateError> {
    // Users first: keys, collections and files refer to them.
    for user in src.meta.users().await.map_err(copy_err("users"))? {
        copy_user(dst, user).await?;
        copied.users += 1;
    }
    for (k, v) in src
        .meta
        .all_settings()
        .await
        .map_err(copy_err("settings"))?
    {
        dst.meta
            .set_setting(&k, &v)
            .await
            .map_err(copy_err(format!("setting {k}")))?;
        copied.settings += 1;
    }
    for user in src.meta.users().await.map_err(copy_err("users"))? {
        if let Some((hash, rec)) = src
            .meta
            .api_key_of_user(&user.id)
            .await
            .map_err(copy_err("api keys"))?
        {
            dst.meta
                .put_api_key(&hash, &rec)
                .await
                .map_err(copy_err(format!("the api key of user {}", user.id)))?;
            copied.api_keys += 1;
        }
    }
    for (jti, exp) in src
        .meta
        .revoked_tokens()
        .await
        .map_err(copy_err("revoked tokens"))?
    {
        dst.meta
            .revoke_token(&jti, exp)
            .await
            .map_err(copy_err("revoked tokens"))?;
        copied.revoked_tokens += 1;
    }
    Ok(())
}

/// `ragway migrate`: opens both sides, copies, verifies, and returns the printed summary.
///
/// # Errors
/// As [`open_source`], [`connect_target`] and [`migrate`].
pub async fn run(
    data_dir: &Path,
    to: &str,
    resume: bool,
    configured_secret: bool,
    progress: &indicatif::ProgressBar,
) -> Result<String, MigrateError> {
    // The URL is checked before the data dir is opened, so a typo costs no index load.
    postgres::parse_url(to).map_err(|e| MigrateError::Target(format!("--to: {e}")))?;
    let src = open_source(data_dir)?;
    let dst = connect_target(to).await?;
    let report = migrate(&src, &dst, resume, progress).await?;
    Ok(summary(&report, data_dir, configured_secret))
}

/// Inserts a user (role and id as they are), or on a resumed run brings an existing one
/// up to date.
async fn copy_user(dst: &Storage, user: User) -> Result<(), MigrateError> {
    let what = format!("user {}", user.id);
    if let Some(existing) = dst
        .meta
        .user_by_id(&user.id)
        .await
        .map_err(copy_err(what.clone()))?
    {
        if serde_json::to_value(&existing).ok() != serde_json::to_value(&user).ok() {
            let replacement = user.clone();
            dst.meta
                .update_user(
                    &user.id,
                    Box::new(move |u| {
                        *u = replacement;
                        Ok(())
                    }),
                )
                .await
                .map_err(copy_err(what.clone()))?
                .map_err(|e| MigrateError::Copy {
                    what,
                    source: StorageError::Postgres(e),
                })?;
        }
        return Ok(());
    }
    match dst.meta.create_user(user.clone(), false).await {
        Ok(_) => Ok(()),
        Err(StorageError::EmailTaken) => Err(MigrateError::NotEmpty(format!(
            "the target already has a user with the email of user {} under another id: it \
             holds other data; migrate into an empty database",
            user.id
        ))),
        Err(e) => Err(copy_err(what)(e)),
    }
}

/// Copies one file's record, text, chunks and vectors; returns its number of chunks.
async fn copy_file(src: &Storage, dst: &Storage, f: &FileRecord) -> Result<u64, MigrateError> {
    let what = || format!("file {}", f.id);
    let ids = src
        .chunks
        .file_chunk_ids(&f.id)
        .await
        .map_err(copy_err(what()))?;
    let text = src.meta.file_text(&f.id).await.map_err(copy_err(what()))?;
    dst.meta.insert_file(f).await.map_err(copy_err(what()))?;
    if ids.is_empty() && text.is_none() {
        return Ok(0);
    }
    let chunks = src.chunks.chunks(&ids).await.map_err(copy_err(what()))?;
    let mut by_id: HashMap<u64, Vec<f32>> = src
        .chunks
        .file_vectors(&f.id)
        .await
        .map_err(copy_err(what()))?
        .into_iter()
        .collect();
    let mut vectors = Vec::with_capacity(chunks.len());
    for (id, _) in &chunks {
        let v = by_id.remove(id).ok_or_else(|| MigrateError::Copy {
            what: what(),
            source: StorageError::Corrupt {
                table: "vectors",
                message: format!("chunk {id} has no vector"),
            },
        })?;
        vectors.push(v);
    }
    if chunks.len() != ids.len() {
        return Err(MigrateError::Copy {
            what: what(),
            source: StorageError::Corrupt {
                table: "chunks",
                message: format!("{} chunk ids but {} chunks", ids.len(), chunks.len()),
            },
        });
    }
    dst.chunks
        .import_file(f, text.as_deref().unwrap_or_default(), &chunks, &vectors)
        .await
        .map_err(copy_err(what()))?;
    Ok(chunks.len() as u64)
}

/// Every usage row (the store keeps them for the retention period only).
async fn all_usage(s: &Storage) -> Result<Vec<(UsageKey, UsageCounts)>, StorageError> {
    s.meta.scan_usage(0, u64::MAX, usize::MAX).await
}

/// Tops the target's usage rows up to the source's counts: rows are added to, so a
/// resumed run adds only what is missing.
async fn copy_usage(src: &Storage, dst: &Storage) -> Result<u64, MigrateError> {
    let rows = all_usage(src).await.map_err(copy_err("usage"))?;
    let have: HashMap<UsageKey, UsageCounts> = all_usage(dst)
        .await
        .map_err(copy_err("usage"))?
        .into_iter()
        .collect();
    let missing: Vec<(UsageKey, UsageCounts)> = rows
        .iter()
        .map(|(k, c)| {
            let t = have.get(k).copied().unwrap_or_default();
            (
                k.clone(),
                UsageCounts {
                    requests: c.requests.saturating_sub(t.requests),
                    prompt_tokens: c.prompt_tokens.saturating_sub(t.prompt_tokens),
                    completion_tokens: c.completion_tokens.saturating_sub(t.completion_tokens),
                },
            )
        })
        .filter(|(k, c)| *c != UsageCounts::default() || !have.contains_key(k))
        .collect();
    dst.meta
        .add_usage(&missing, 0)
        .await
        .map_err(copy_err("usage"))?;
    Ok(rows.len() as u64)
}

/// Counts of every kind in `s`, without the files and collections of `skip`'s users.
/// Blobs are not counted (reading every one back would double the copy's traffic): the
/// sample compares them.
async fn census(s: &Storage, skip: &HashSet<String>) -> Result<Counts, StorageError> {
    let mut c = Counts::default();
    let users = s.meta.users().await?;
    c.users = users.len() as u64;
    for u in &users {
        if s.meta.api_key_of_user(&u.id).await?.is_some() {
            c.api_keys += 1;
        }
    }
    c.revoked_tokens = s.meta.revoked_tokens().await?.len() as u64;
    c.settings = s.meta.all_settings().await?.len() as u64;
    c.presets = s
        .meta
        .presets()
        .await?
        .iter()
        .filter(|p| !skip.contains(&p.user_id))
        .count() as u64;
    let files: HashSet<String> = s
        .meta
        .files()
        .await?
        .into_iter()
        .filter(|f| !skip.contains(&f.user_id))
        .map(|f| f.id)
        .collect();
    c.files = files.len() as u64;
    for f in &files {
        c.chunks += s.chunks.file_chunk_ids(f).await?.len() as u64;
    }
    for kb in s.meta.knowledges().await? {
        if skip.contains(&kb.user_id) {
            continue;
        }
        c.collections += 1;
        c.memberships += s
            .meta
            .knowledge_files(&kb.id)
            .await?
            .iter()
            .filter(|f| files.contains(*f))
            .count() as u64;
    }
    c.jobs = s
        .queue
        .pending(usize::MAX)
        .await?
        .iter()
        .filter(|f| files.contains(*f))
        .count() as u64;
    c.usage_rows = s.meta.scan_usage(0, u64::MAX, usize::MAX).await?.len() as u64;
    Ok(c)
}

/// Compares both sides: counts of every kind, each file's chunk ids, and for a sample
/// of files their vectors and blobs byte for byte. Returns (files, vectors) sampled.
async fn verify(
    src: &Storage,
    dst: &Storage,
    skip: &HashSet<String>,
) -> Result<(usize, usize), MigrateError> {
    let read = |side: &'static str| {
        move |e: StorageError| MigrateError::Verify(format!("reading the {side} back: {e}"))
    };
    let want = census(src, skip).await.map_err(read("source"))?;
    let got = census(dst, skip).await.map_err(read("target"))?;
    if want != got {
        let diff: Vec<String> = want
            .rows()
            .iter()
            .zip(got.rows())
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| format!("{}: source {}, target {}", a.0, a.1, b.1))
            .collect();
        return Err(MigrateError::Verify(format!(
            "counts differ ({})",
            diff.join("; ")
        )));
    }
    let presets = |s: &'static str, v: Vec<crate::store::PresetRecord>| {
        v.into_iter()
            .filter(|p| !skip.contains(&p.user_id))
            .map(|p| {
                serde_json::to_value(&p).map_err(|e| MigrateError::Verify(format!("{s}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let want = presets("source", src.meta.presets().await.map_err(read("source"))?)?;
    let got = presets("target", dst.meta.presets().await.map_err(read("target"))?)?;
    if want != got {
        return Err(MigrateError::Verify("model presets differ".into()));
    }
    let files: Vec<FileRecord> = src
        .meta
        .files()
        .await
        .map_err(read("source"))?
        .into_iter()
        .filter(|f| !skip.contains(&f.user_id))
        .collect();
    let stride = files.len().div_ceil(SAMPLE_FILES).max(1);
    let (mut sampled, mut vectors) = (0, 0);
    for (i, f) in files.iter().enumerate() {
        let a = src
            .chunks
            .file_chunk_ids(&f.id)
            .await
            .map_err(read("source"))?;
        let b = dst
            .chunks
            .file_chunk_ids(&f.id)
            .await
            .map_err(read("target"))?;
        if a != b {
            return Err(MigrateError::Verify(format!(
                "file {}: chunk ids differ",
                f.id
            )));
        }
        if i % stride != 0 {
            continue;
        }
        let va = src
            .chunks
            .file_vectors(&f.id)
            .await
            .map_err(read("source"))?;
        let vb = dst
            .chunks
            .file_vectors(&f.id)
            .await
            .map_err(read("target"))?;
        if va != vb {
            return Err(MigrateError::Verify(format!(
                "file {}: vectors differ",
                f.id
            )));
        }
        if let Some(key) = blob_key(f) {
            let ba = src.blobs.get(&key).await.map_err(read("source"))?;
            let bb = dst.blobs.get(&key).await.map_err(read("target"))?;
            if ba.is_some() && ba != bb {
                return Err(MigrateError::Verify(format!(
                    "file {}: upload differs",
                    f.id
                )));
            }
        }
        sampled += 1;
        vectors += va.len();
    }
    Ok((sampled, vectors))
}

/// The report printed after a migration, with what the operator must do about the JWT
/// secret.
#[must_use]
pub fn summary(r: &Report, data_dir: &Path, configured_secret: bool) -> String {
    use std::fmt::Write;
    let mut out = String::from("copied and verified:\n");
    for (kind, n) in r.copied.rows() {
        let _ = writeln!(out, "  {kind:<24} {n:>10}");
    }
    if r.skipped_files + r.skipped_collections > 0 {
        let _ = writeln!(
            out,
            "not copied: {} file(s) and {} collection(s) of deleted users (their deletion was pending)",
            r.skipped_files, r.skipped_collections
        );
    }
    let _ = writeln!(
        out,
        "compared exactly: vectors and uploads of {} file(s) ({} vectors), chunk ids of every file",
        r.sampled_files, r.sampled_vectors
    );
    out.push_str(&secret_note(data_dir, configured_secret));
    out
}

/// Sessions (JWTs) are signed with a secret that is not in the database: every replica
/// must use the one this data dir used, or every session signed so far is refused, and
/// replicas refuse each other's.
#[must_use]
pub fn secret_note(data_dir: &Path, configured_secret: bool) -> String {
    let file: PathBuf = data_dir.join(".webui_secret_key");
    if configured_secret {
        "JWT secret: this ragway has WEBUI_SECRET_KEY (or [auth] secret-key) configured; give \
         every replica the same value, or sessions signed by one are refused by the others.\n"
            .to_string()
    } else if file.is_file() {
        format!(
            "JWT secret: this data dir's secret is in {}; give every replica that same secret \
             (WEBUI_SECRET_KEY=\"$(cat {})\" or [auth] secret-key), never let replicas \
             generate their own: sessions signed so far stay valid only with it.\n",
            file.display(),
            file.display()
        )
    } else {
        "JWT secret: this data dir has none (no session was ever signed here); set one \
         shared WEBUI_SECRET_KEY on every replica.\n"
            .to_string()
    }
}
