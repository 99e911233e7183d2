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
        }
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
}
