//! The embedded metadata store (redb): users, API keys, revoked tokens and settings.
//!
//! Every table is declared here as a typed constant so the whole schema is visible in one
//! place. Values are JSON documents: the schema can grow fields without migrations, and a
//! record read back is exactly what the API returns.

mod files;
pub use files::FileIndexData;
mod knowledge;
mod presets;
mod queue;
pub use presets::{PresetRecord, PresetRefusal};
mod records;
mod users;
pub use users::PRIMARY_ADMIN;
mod usage;
pub use usage::{UsageCounts, UsageKey};

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{
    Database, MultimapTableDefinition, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, WriteTransaction,
};

pub use records::{
    ApiKeyRecord, ChunkRecord, EmbeddingInfo, FileRecord, FileStatus, Grant, KnowledgeRecord, Role,
    User, now_secs,
};

/// user id → `User` JSON.
const USERS: TableDefinition<&str, &str> = TableDefinition::new("users");
/// lowercased email → user id (uniqueness index).
const USER_EMAILS: TableDefinition<&str, &str> = TableDefinition::new("user_emails");
/// SHA-256 (hex) of an API key → `ApiKeyRecord` JSON. The plaintext key is never stored.
const API_KEYS: TableDefinition<&str, &str> = TableDefinition::new("api_keys");
/// user id → SHA-256 (hex) of that user's single API key.
const USER_API_KEY: TableDefinition<&str, &str> = TableDefinition::new("user_api_key");
/// JWT id → expiry (epoch seconds; 0 = never) of a signed-out token.
const REVOKED_TOKENS: TableDefinition<&str, u64> = TableDefinition::new("revoked_tokens");
/// Free-form settings changed at run time.
const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings");

/// file id → `FileRecord` JSON (metadata and processing status).
const FILES: TableDefinition<&str, &str> = TableDefinition::new("files");
/// file id → extracted text (`data.content`), kept apart so listings stay cheap.
const FILE_TEXT: TableDefinition<&str, &str> = TableDefinition::new("file_text");
/// file id → its chunk ids, little-endian u64s, in document order.
const FILE_CHUNKS: TableDefinition<&str, &[u8]> = TableDefinition::new("file_chunks");
/// chunk id → `ChunkRecord` JSON (text and loader metadata).
const CHUNKS: TableDefinition<u64, &str> = TableDefinition::new("chunks");
/// chunk id → embedding, little-endian f32s. The vector index is derived from this table.
const VECTORS: TableDefinition<u64, &[u8]> = TableDefinition::new("vectors");
/// chunk id → its BM25 term counts (JSON), computed once at ingestion.
const TERMS: TableDefinition<u64, &str> = TableDefinition::new("terms");
/// file id → enqueue time, for files waiting to be processed. Survives restarts: a file
/// still here at start-up is processed again.
const QUEUE: TableDefinition<&str, u64> = TableDefinition::new("queue");
/// knowledge id → `KnowledgeRecord` JSON.
const KNOWLEDGE: TableDefinition<&str, &str> = TableDefinition::new("knowledge");
/// knowledge id → file ids in it.
const KNOWLEDGE_FILES: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("knowledge_files");
/// file id → knowledge ids containing it (reverse of `KNOWLEDGE_FILES`).
const FILE_KNOWLEDGE: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("file_knowledge");
/// Named counters (`chunk_id`).
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// user id → deletion time, for deleted users whose files and collections are not all
/// removed yet. Written with the user's removal, so a crash mid-way is finished at start-up.
const USER_DELETIONS: TableDefinition<&str, u64> = TableDefinition::new("user_deletions");

/// Failures of the store. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt record in table {table}: {source}")]
    Corrupt {
        table: &'static str,
        source: serde_json::Error,
    },
    #[error("email already registered")]
    EmailTaken,
    #[error("no such user")]
    NoSuchUser,
    #[error("not found")]
    NotFound,
    /// This process handed the database over to its successor (graceful upgrade).
    #[error("the database was handed over to a newer ragway process")]
    Released,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The metadata database. Cheap to share behind an `Arc`; redb serialises writers itself.
pub struct Store {
    db: Db,
    /// The database's directory: usage rows that arrive after a hand-over wait here in a
    /// file for the process that owns the database (see `usage`).
    dir: std::path::PathBuf,
    /// Chunk ids reserved in the database and not handed out yet (see
    /// [`Store::reserve_chunk_ids`]).
    chunk_ids: Mutex<std::ops::Range<u64>>,
}

/// The redb handle. redb locks its file for one process, so at a graceful upgrade the old
/// process gives the handle up ([`Store::release`]) for the new one to open the file, while
/// its own streams in flight finish without it.
struct Db(RwLock<Option<Arc<Database>>>);

impl Db {
    fn get(&self) -> Result<Arc<Database>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(StoreError::Released)
    }

    fn begin_read(&self) -> Result<ReadTransaction> {
        Ok(self.get()?.begin_read()?)
    }

    fn begin_write(&self) -> Result<WriteTransaction> {
        Ok(self.get()?.begin_write()?)
    }
}

fn decode<T: serde::de::DeserializeOwned>(table: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|source| StoreError::Corrupt { table, source })
}

fn encode<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records always serialise")
}

impl Store {
    /// Opens (or creates) the database file and makes sure every table exists, so that read
    /// transactions never meet a missing table.
    pub fn open(path: &Path) -> Result<Store> {
        Self::open_waiting(path, Duration::ZERO)
    }

    /// Like [`Store::open`], but while another process holds the file (the one being
    /// upgraded, which releases it once it stops accepting), retries for up to `wait`.
    ///
    /// # Errors
    /// The database cannot be created or opened, or is still held after `wait`.
    pub fn open_waiting(path: &Path, wait: Duration) -> Result<Store> {
        let deadline = Instant::now() + wait;
        let db = loop {
            match Database::create(path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let txn = db.begin_write()?;
        txn.open_table(USERS)?;
        txn.open_table(USER_EMAILS)?;
        txn.open_table(API_KEYS)?;
        txn.open_table(USER_API_KEY)?;
        txn.open_table(REVOKED_TOKENS)?;
        txn.open_table(SETTINGS)?;
        txn.open_table(FILES)?;
        txn.open_table(FILE_TEXT)?;
        txn.open_table(FILE_CHUNKS)?;
        txn.open_table(CHUNKS)?;
        txn.open_table(VECTORS)?;
        txn.open_table(TERMS)?;
        txn.open_table(QUEUE)?;
        txn.open_table(KNOWLEDGE)?;
        txn.open_multimap_table(KNOWLEDGE_FILES)?;
        txn.open_multimap_table(FILE_KNOWLEDGE)?;
        txn.open_table(COUNTERS)?;
        txn.open_table(USER_DELETIONS)?;
        txn.open_table(usage::USAGE)?;
        txn.open_table(presets::PRESETS)?;
        txn.commit()?;
        Ok(Store {
            db: Db(RwLock::new(Some(Arc::new(db)))),
            dir: path
                .parent()
                .map_or_else(std::path::PathBuf::new, Path::to_path_buf),
            chunk_ids: Mutex::new(0..0),
        })
    }

    /// Gives the database up so that another process can open it. Later calls fail with
    /// [`StoreError::Released`]; the file is unlocked once a write transaction in progress
    /// ends.
    pub fn release(&self) {
        let db = self
            .db
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(db) = db.and_then(|db| Arc::try_unwrap(db).ok())
            && let Err(e) = db.close()
        {
            tracing::info!(error = %e, "database closes when its last write ends");
        }
    }

    /// Whether [`Store::release`] was called.
    pub fn released(&self) -> bool {
        self.db
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
    }

    /// Whether a read transaction can be opened: the `/ready` probe.
    pub fn ping(&self) -> bool {
        self.db
            .begin_read()
            .map(|t| t.open_table(USERS).is_ok())
            .unwrap_or(false)
    }

    pub fn user_count(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(USERS)?.len()?)
    }

    /// Inserts a user. When `first_is_admin` and the table is empty, the user becomes admin
    /// (Open WebUI's rule); the check and the insert happen in one transaction so two
    /// concurrent first sign-ups cannot both become admin.
    pub fn create_user(&self, mut user: User, first_is_admin: bool) -> Result<User> {
        let txn = self.db.begin_write()?;
        {
            let mut emails = txn.open_table(USER_EMAILS)?;
            if emails.get(user.email.as_str())?.is_some() {
                return Err(StoreError::EmailTaken);
            }
            let mut users = txn.open_table(USERS)?;
            if first_is_admin && users.len()? == 0 {
                user.role = Role::Admin;
                txn.open_table(SETTINGS)?
                    .insert(PRIMARY_ADMIN, user.id.as_str())?;
            }
            emails.insert(user.email.as_str(), user.id.as_str())?;
            users.insert(user.id.as_str(), encode(&user).as_str())?;
        }
        txn.commit()?;
        Ok(user)
    }

    /// All users (for listings and user-name lookups).
    pub fn users(&self) -> Result<Vec<User>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(USERS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("users", v.value())?);
        }
        Ok(out)
    }

    pub fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        let txn = self.db.begin_read()?;
        let users = txn.open_table(USERS)?;
        match users.get(id)? {
            Some(v) => Ok(Some(decode("users", v.value())?)),
            None => Ok(None),
        }
    }

    pub fn user_by_email(&self, email: &str) -> Result<Option<User>> {
        let txn = self.db.begin_read()?;
        let emails = txn.open_table(USER_EMAILS)?;
        let Some(id) = emails.get(email)? else {
            return Ok(None);
        };
        let users = txn.open_table(USERS)?;
        match users.get(id.value())? {
            Some(v) => Ok(Some(decode("users", v.value())?)),
            None => Ok(None),
        }
    }

    /// Replaces the API key of a user (each user has at most one, as in Open WebUI).
    pub fn put_api_key(&self, hash: &str, record: &ApiKeyRecord) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            if txn
                .open_table(USERS)?
                .get(record.user_id.as_str())?
                .is_none()
            {
                return Err(StoreError::NoSuchUser);
            }
            let mut by_user = txn.open_table(USER_API_KEY)?;
            let mut keys = txn.open_table(API_KEYS)?;
            let old = by_user
                .insert(record.user_id.as_str(), hash)?
                .map(|g| g.value().to_string());
            if let Some(old) = old {
                keys.remove(old.as_str())?;
            }
            keys.insert(hash, encode(record).as_str())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>> {
        let txn = self.db.begin_read()?;
        let keys = txn.open_table(API_KEYS)?;
        match keys.get(hash)? {
            Some(v) => Ok(Some(decode("api_keys", v.value())?)),
            None => Ok(None),
        }
    }

    /// The key hash and record of a user's key, if any.
    pub fn api_key_of_user(&self, user_id: &str) -> Result<Option<(String, ApiKeyRecord)>> {
        let txn = self.db.begin_read()?;
        let by_user = txn.open_table(USER_API_KEY)?;
        let Some(hash) = by_user.get(user_id)? else {
            return Ok(None);
        };
        let hash = hash.value().to_string();
        let keys = txn.open_table(API_KEYS)?;
        match keys.get(hash.as_str())? {
            Some(v) => Ok(Some((hash, decode("api_keys", v.value())?))),
            None => Ok(None),
        }
    }

    /// Deletes a user's key; returns the hash that was removed.
    pub fn delete_api_key_of_user(&self, user_id: &str) -> Result<Option<String>> {
        let txn = self.db.begin_write()?;
        let removed = {
            let mut by_user = txn.open_table(USER_API_KEY)?;
            let hash = by_user.remove(user_id)?.map(|g| g.value().to_string());
            if let Some(h) = &hash {
                txn.open_table(API_KEYS)?.remove(h.as_str())?;
            }
            hash
        };
        txn.commit()?;
        Ok(removed)
    }

    /// Records that a JWT was signed out. Expired entries are pruned on the way.
    pub fn revoke_token(&self, jti: &str, exp: Option<u64>) -> Result<()> {
        let now = now_secs();
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(REVOKED_TOKENS)?;
            t.retain(|_, e| e == 0 || e > now)?;
            t.insert(jti, exp.unwrap_or(0))?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn is_token_revoked(&self, jti: &str) -> Result<bool> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(REVOKED_TOKENS)?.get(jti)?.is_some())
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SETTINGS)?;
        Ok(t.get(key)?.map(|v| v.value().to_string()))
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(SETTINGS)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    /// Every setting, in key order (`ragway migrate` copies them all).
    pub fn settings(&self) -> Result<Vec<(String, String)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SETTINGS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), v.value().to_string()));
        }
        Ok(out)
    }

    /// Revoked JWT ids not yet expired, with their expiry (`None` = never), in id order.
    pub fn revoked_tokens(&self) -> Result<Vec<(String, Option<u64>)>> {
        let now = now_secs();
        let txn = self.db.begin_read()?;
        let t = txn.open_table(REVOKED_TOKENS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, e) = row?;
            match e.value() {
                0 => out.push((k.value().to_string(), None)),
                e if e > now => out.push((k.value().to_string(), Some(e))),
                _ => {}
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.redb")).unwrap();
        (dir, s)
    }

    #[test]
    fn first_user_is_admin_and_emails_are_unique() {
        let (_d, s) = store();
        let a = s
            .create_user(User::new("a@x.io", "A", Role::Pending, "h".into()), true)
            .unwrap();
        assert_eq!(a.role, Role::Admin);
        let b = s
            .create_user(User::new("b@x.io", "B", Role::Pending, "h".into()), true)
            .unwrap();
        assert_eq!(b.role, Role::Pending);
        assert!(matches!(
            s.create_user(User::new("a@x.io", "A2", Role::User, "h".into()), true),
            Err(StoreError::EmailTaken)
        ));
        assert_eq!(s.user_by_email("b@x.io").unwrap().unwrap().id, b.id);
        assert_eq!(s.user_count().unwrap(), 2);
    }

    #[test]
    fn chunk_ids_are_never_given_twice_across_blocks_reopens_and_imports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let mut seen = std::collections::HashSet::new();
        let mut take = |ids: Vec<u64>| {
            for id in ids {
                assert!(seen.insert(id), "id {id} given twice");
            }
            seen.iter().copied().max().unwrap_or(0)
        };
        let mut highest = 0;
        let before_reopen;
        {
            let s = Store::open(&path).unwrap();
            // Many small files: one block; a file larger than a block: a block of its own.
            for _ in 0..600 {
                highest = take(s.reserve_chunk_ids(2).unwrap());
            }
            let big = s
                .reserve_chunk_ids(files::CHUNK_ID_BLOCK as usize + 5)
                .unwrap();
            assert_eq!(big.len(), files::CHUNK_ID_BLOCK as usize + 5);
            assert!(big.windows(2).all(|w| w[1] == w[0] + 1), "consecutive");
            take(big);
            highest = highest.max(take(s.reserve_chunk_ids(3).unwrap()));
            before_reopen = s.next_chunk_id().unwrap();
            assert!(highest < before_reopen, "{highest} >= {before_reopen}");
        }
        // A restart (or a crash) loses the rest of the block: the next ids come after it.
        let s = Store::open(&path).unwrap();
        let after = s.reserve_chunk_ids(1).unwrap();
        assert!(after[0] >= before_reopen, "{after:?} < {before_reopen}");
        take(after.clone());
        // Chunks copied in under their own ids inside the reserved block: never given again.
        s.raise_chunk_ids(after[0] + 10).unwrap();
        let next = s.reserve_chunk_ids(1).unwrap();
        assert!(next[0] >= after[0] + 10, "{next:?}");
        take(next);
        assert_eq!(s.reserve_chunk_ids(0).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn one_key_per_user_and_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let uid;
        {
            let s = Store::open(&path).unwrap();
            let u = s
                .create_user(User::new("a@x.io", "A", Role::User, "h".into()), false)
                .unwrap();
            uid = u.id.clone();
            let rec = |p: &str| ApiKeyRecord {
                user_id: u.id.clone(),
                prefix: p.into(),
                created_at: 1,
                models: vec![],
                limits: crate::limits::Limits::default(),
            };
            s.put_api_key("h1", &rec("sk-1")).unwrap();
            s.put_api_key("h2", &rec("sk-2")).unwrap();
            assert!(s.api_key_by_hash("h1").unwrap().is_none());
            s.revoke_token("jti-1", None).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let (hash, rec) = s.api_key_of_user(&uid).unwrap().unwrap();
        assert_eq!((hash.as_str(), rec.prefix.as_str()), ("h2", "sk-2"));
        assert!(s.is_token_revoked("jti-1").unwrap());
        assert_eq!(
            s.delete_api_key_of_user(&uid).unwrap().as_deref(),
            Some("h2")
        );
        assert!(s.api_key_by_hash("h2").unwrap().is_none());
    }
}
