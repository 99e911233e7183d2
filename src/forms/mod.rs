//! Request bodies (DTOs) of the HTTP API: read by the handlers and described by the OpenAPI
//! document. Plain data with no behaviour, so both can use them without importing each other.

pub mod preset;

use serde::Deserialize;
use serde_json::Value;

/// Body of `POST /auths/signup`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SignupForm {
    pub name: String,
    pub email: String,
    pub password: String,
    #[serde(default)]
    pub profile_image_url: Option<String>,
}

/// Body of `POST /auths/signin`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SigninForm {
    pub email: String,
    pub password: String,
}

/// Body of `POST /auths/add`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct AddUserForm {
    pub name: String,
    pub email: String,
    pub password: String,
    #[serde(default)]
    pub profile_image_url: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
}

/// Optional body of `POST /auths/api_key`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyForm {
    /// Restrict the key to these model ids.
    #[serde(default)]
    pub models: Vec<String>,
    /// The key's limits, e.g. `{"rpm": 60, "tpm": 100000}` (`rpd`, `tpd` too); a user who is
    /// not an admin may only set limits at or below the configured defaults.
    #[serde(default)]
    #[schema(value_type = Option<crate::limits::Limits>, inline)]
    pub limits: Option<Value>,
}

/// Body of `POST /auths/update/password`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePasswordForm {
    pub password: String,
    pub new_password: String,
}

/// Body of `POST /auths/update/profile`. Open WebUI's form also carries `bio`, `gender`
/// and `date_of_birth`, which ragway does not keep: other fields are ignored, not refused,
/// so its clients keep working.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct UpdateProfileForm {
    pub name: String,
    #[serde(default)]
    pub profile_image_url: Option<String>,
}

/// Body of `create` and `update` (Open WebUI's `KnowledgeForm`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct KnowledgeForm {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `null` or `[]`: private to the owner.
    #[serde(default)]
    pub access_grants: Option<Vec<GrantForm>>,
}

/// A grant as clients send it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantForm {
    /// `user` or `group`.
    pub principal_type: String,
    /// A user id, a group id, or `*` for everyone.
    pub principal_id: String,
    /// `read` or `write`.
    pub permission: String,
}

/// Body of `file/add` and `file/remove`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct FileIdForm {
    pub file_id: String,
}

/// Body of `POST /retrieval/query/doc` (Open WebUI's `QueryDocForm`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct QueryDocForm {
    pub collection_name: String,
    pub query: String,
    #[serde(default)]
    pub k: Option<usize>,
    /// Accepted for compatibility; ragway has no reranker.
    #[serde(default)]
    pub k_reranker: Option<usize>,
    /// Relevance threshold (cosine).
    #[serde(default)]
    pub r: Option<f32>,
    #[serde(default)]
    pub hybrid: Option<bool>,
    #[serde(default)]
    pub hybrid_bm25_weight: Option<f32>,
}

/// Body of `POST /retrieval/query/collection` (Open WebUI's `QueryCollectionsForm`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct QueryCollectionsForm {
    pub collection_names: Vec<String>,
    pub query: String,
    #[serde(default)]
    pub k: Option<usize>,
    #[serde(default)]
    pub k_reranker: Option<usize>,
    #[serde(default)]
    pub r: Option<f32>,
    #[serde(default)]
    pub hybrid: Option<bool>,
    #[serde(default)]
    pub hybrid_bm25_weight: Option<f32>,
}

/// Body of `POST /retrieval/process/text` (Open WebUI's `ProcessTextForm`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ProcessTextForm {
    pub name: String,
    pub content: String,
    #[serde(default)]
    pub collection_name: Option<String>,
}

/// Body of `POST /users/{id}/update` (Open WebUI's `UserUpdateForm`). A missing field
/// keeps its value; `password` resets the password when given.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserUpdateForm {
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub profile_image_url: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}
