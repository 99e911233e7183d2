//! Records kept in the store, serialised as JSON.

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Open WebUI's three roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
    Pending,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s.trim().to_ascii_lowercase().as_str() {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            "pending" => Some(Role::Pending),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Pending => "pending",
        }
    }
}

/// A user account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    /// Lowercased, as Open WebUI compares emails.
    pub email: String,
    pub name: String,
    pub role: Role,
    /// PHC string (argon2id); never leaves the store.
    pub password_hash: String,
    pub profile_image_url: String,
    pub created_at: u64,
    pub updated_at: u64,
    /// Sessions (JWTs) carry the epoch they were issued under; bumping it revokes them all
    /// at once (role change, password reset) without listing every token ever issued.
    #[serde(default)]
    pub session_epoch: u64,
    /// One session kept across an epoch bump: the one that changed its own password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_session: Option<String>,
    /// Limits on all of this user's traffic, set by an admin; unset fields use the defaults.
    #[serde(default, skip_serializing_if = "crate::limits::Limits::is_empty")]
    pub limits: crate::limits::Limits,
}

impl User {
    pub fn new(email: &str, name: &str, role: Role, password_hash: String) -> User {
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_secs();
        User {
            profile_image_url: "/user.png".to_string(),
            id,
            email: email.trim().to_lowercase(),
            name: name.to_string(),
            role,
            password_hash,
            created_at: now,
            updated_at: now,
            session_epoch: 0,
            kept_session: None,
            limits: crate::limits::Limits::default(),
        }
    }

    /// Revokes every session of this user, except `keep` (a JWT id) when given.
    pub fn revoke_sessions(&mut self, keep: Option<String>) {
        self.session_epoch += 1;
        self.kept_session = keep;
    }

    /// Whether a session issued under `epoch` with id `jti` is still valid.
    pub fn session_valid(&self, epoch: u64, jti: &str) -> bool {
        epoch == self.session_epoch || self.kept_session.as_deref() == Some(jti)
    }
}

/// An API key, stored under the SHA-256 of its plaintext.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub user_id: String,
    /// The first characters of the key (`sk-1a2b…`), to recognise it in listings.
    pub prefix: String,
    pub created_at: u64,
    /// Models this key may use; empty means the user's own access applies.
    #[serde(default)]
    pub models: Vec<String>,
    /// This key's own limits; unset fields use the defaults.
    #[serde(default, skip_serializing_if = "crate::limits::Limits::is_empty")]
    pub limits: crate::limits::Limits,
}

/// Processing state of an uploaded file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileStatus {
    Pending,
    Completed,
    Failed,
}

impl FileStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FileStatus::Pending => "pending",
            FileStatus::Completed => "completed",
            FileStatus::Failed => "failed",
        }
    }
}

/// Which embedding model made a file's vectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingInfo {
    pub engine: String,
    pub model: String,
    pub dim: usize,
}

/// An uploaded file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRecord {
    pub id: String,
    pub user_id: String,
    pub filename: String,
    /// Where the blob is stored.
    pub path: String,
    /// SHA-256 of the extracted text once processed (Open WebUI's `hash`).
    pub hash: Option<String>,
    /// `None` when uploaded with `process=false`.
    pub status: Option<FileStatus>,
    pub error: Option<String>,
    /// Open WebUI's `meta`: name, content_type, size, file_hash, data, collection_name.
    pub meta: serde_json::Value,
    pub embedding: Option<EmbeddingInfo>,
    pub chunk_count: usize,
    pub created_at: u64,
    pub updated_at: u64,
}

/// One chunk of a processed file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub file_id: String,
    /// Position in the file's chunk list.
    pub index: usize,
    pub text: String,
    /// Character offset in its page's text (Open WebUI's `start_index`).
    pub start_index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// Its document's title when the chunk is embedded and indexed under it
    /// (`rag.title-in-chunks`) and does not begin with it. Kept with the chunk so that every
    /// index built from stored chunks (a restart, a migration, a backfill) sees the same terms;
    /// `text` stays the chunk's own, as stored, cited and injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

impl ChunkRecord {
    /// The text the chunk is embedded and lexically indexed by: the context line, then the
    /// chunk.
    #[must_use]
    pub fn indexed_text(&self) -> std::borrow::Cow<'_, str> {
        match &self.context {
            Some(c) => std::borrow::Cow::Owned(format!("{c}\n{}", self.text)),
            None => std::borrow::Cow::Borrowed(&self.text),
        }
    }
}

/// An access grant on a knowledge collection (Open WebUI's `access_grant` row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    /// `user` or `group`.
    pub principal_type: String,
    /// A user id, a group id, or `*` for everyone.
    pub principal_id: String,
    /// `read` or `write`.
    pub permission: String,
    pub created_at: u64,
}

/// A knowledge collection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnowledgeRecord {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub description: String,
    pub meta: serde_json::Value,
    pub access_grants: Vec<Grant>,
    pub created_at: u64,
    pub updated_at: u64,
}
