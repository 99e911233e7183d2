//! The on-disk TOML format (`conf/ragway.toml`). Every field is optional so that a file only
//! states what it changes; unknown keys are errors so that a typo never goes unnoticed.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Top level of a ragway TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileConfig {
    /// Client-facing listen address.
    pub listen: Option<String>,
    /// Prometheus listen address; `""` disables the metrics listener.
    pub metrics_listen: Option<String>,
    /// Directory for the database, secret and (later) uploads.
    pub data_dir: Option<String>,
    /// `dev` exposes `/docs` and `/openapi.json`, as Open WebUI's `ENV=dev` does.
    pub env: Option<String>,
    /// Worker threads of the HTTP service.
    pub threads: Option<usize>,
    /// Whether the HTTP service's threads steal each other's connections (see `Config`).
    pub work_stealing: Option<bool>,
    /// Largest request body accepted, in MiB.
    pub max_body_mb: Option<u64>,
    /// Most JSON values (objects, arrays, scalars) in a request body that ragway parses.
    pub max_json_values: Option<usize>,
    /// Seconds to keep serving in-flight requests after SIGTERM.
    pub shutdown_grace: Option<String>,
    /// Authentication settings.
    pub auth: Option<AuthFile>,
    /// Ollama connections, in index order (`url_idx`).
    pub ollama: Option<Vec<UpstreamFile>>,
    /// OpenAI-compatible connections, in index order.
    pub openai: Option<Vec<UpstreamFile>>,
    /// Model list behaviour.
    pub models: Option<ModelsFile>,
    /// Upstream timeouts.
    pub timeouts: Option<TimeoutsFile>,
    /// Embedding engine and model.
    pub embedding: Option<EmbeddingFile>,
    /// Files, chunking and the vector index.
    pub rag: Option<RagFile>,
    /// Per-key and per-user limits, usage retention.
    pub limits: Option<LimitsFile>,
    /// Model presets: bounds, and presets declared here (read-only through the API).
    pub presets: Option<PresetsFile>,
    /// The context budget of RAG requests.
    pub context: Option<ContextFile>,
    /// Where state is kept: the embedded store or PostgreSQL.
    pub storage: Option<StorageFile>,
}

/// `[storage]`
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StorageFile {
    /// "embedded" or "postgres".
    pub backend: Option<String>,
    /// PostgreSQL URL (env DATABASE_URL overrides).
    pub url: Option<String>,
    /// Connections per replica.
    pub pool_size: Option<usize>,
    /// Where uploaded files' bytes go: a directory (shared by every replica on
    /// PostgreSQL). Unset: `<data-dir>/uploads` embedded, the database on PostgreSQL.
    pub blob_dir: Option<std::path::PathBuf>,
}

/// `[limits]`: defaults for every API key (`key-*`) and every user (`user-*`); 0 or unset
/// means unlimited.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LimitsFile {
    pub key_rpm: Option<u64>,
    pub key_tpm: Option<u64>,
    pub key_rpd: Option<u64>,
    pub key_tpd: Option<u64>,
    pub user_rpm: Option<u64>,
    pub user_tpm: Option<u64>,
    pub user_rpd: Option<u64>,
    pub user_tpd: Option<u64>,
    /// Limiter buckets kept in memory at most.
    pub max_tracked: Option<usize>,
    /// How long hourly usage rows are kept.
    pub usage_retention: Option<String>,
}

/// `[presets]`
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PresetsFile {
    /// Presets one user may create through the API.
    pub max_per_user: Option<usize>,
    /// Presets stored in all (declared ones not counted).
    pub max_total: Option<usize>,
    /// `[[presets.declared]]`
    pub declared: Option<Vec<DeclaredPresetFile>>,
}

/// One `[[presets.declared]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeclaredPresetFile {
    pub id: String,
    pub name: Option<String>,
    pub base_model_id: String,
    /// System prompt (`params.system`).
    pub system: Option<String>,
    /// Default model parameters (`temperature`, `top_p`, `custom_params`, ...).
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
    pub description: Option<String>,
    pub tags: Option<Vec<String>>,
    /// `{ type = "collection" | "file", id = "...", name = "..." }`
    pub knowledge: Option<Vec<serde_json::Map<String, serde_json::Value>>>,
    pub access_grants: Option<Vec<DeclaredGrantFile>>,
    pub is_active: Option<bool>,
}

/// An access grant of a declared preset.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeclaredGrantFile {
    /// `user` or `group`.
    pub principal_type: String,
    /// A user id, or `*` for everyone.
    pub principal_id: String,
    /// `read` or `write` (declared presets are read-only through the API either way).
    pub permission: String,
}

/// `[context]`
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContextFile {
    pub budget: Option<bool>,
    pub ollama_default_window: Option<u32>,
    pub answer_reserve: Option<u32>,
    pub max_window: Option<u32>,
    pub native_num_ctx: Option<bool>,
    pub cache_entries: Option<usize>,
}

/// `[embedding]`
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EmbeddingFile {
    /// `onnx` (local, default), `ollama` or `openai`.
    pub engine: Option<String>,
    /// Model name recorded with every vector (and sent to remote engines).
    pub model: Option<String>,
    /// Directory with model.onnx and tokenizer.json (onnx engine).
    pub model_dir: Option<String>,
    /// Path of libonnxruntime.so (onnx engine).
    pub onnxruntime: Option<String>,
    /// Concurrent ONNX sessions (each single-threaded); unset = one per core (at most 4), 0 = one per core.
    pub sessions: Option<usize>,
    /// Run weight-only int8 models on the int8 kernels (default true).
    pub int8: Option<bool>,
    /// Base URL and key of the remote engine (defaults: first Ollama / OpenAI connection).
    pub url: Option<String>,
    pub key: Option<String>,
}

/// `[rag]`
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RagFile {
    pub chunk_size: Option<usize>,
    pub chunk_overlap: Option<usize>,
    /// `character` (default) or `token`.
    pub text_splitter: Option<String>,
    pub markdown_header_splitter: Option<bool>,
    /// Largest upload, in MB.
    pub file_max_size_mb: Option<u64>,
    /// Allowed extensions (without dot); empty = all supported.
    pub allowed_extensions: Option<Vec<String>>,
    /// Files processed concurrently; 0 or unset = two per core (2 to 16).
    pub workers: Option<usize>,
    /// Inline-processing uploads waiting at once.
    pub inline_queue: Option<usize>,
    /// Total bytes one file may inflate to, as a multiple of the upload limit.
    pub extract_inflate_ratio: Option<u64>,
    /// Largest inflated PDF stream or DOCX member, in MB (default: the upload limit).
    pub extract_stream_max_mb: Option<u64>,
    /// Address-space limit of the extraction child process, in MB.
    pub extract_memory_mb: Option<u64>,
    /// Wall-clock (and CPU-time) limit of extracting one file.
    pub extract_timeout: Option<String>,
    /// The `ragway` binary run as the extraction child, `in-process`, or unset (our own
    /// executable when it is `ragway`).
    pub extractor: Option<String>,
    /// How long `file/add` waits for a file that is still processing.
    pub file_add_wait: Option<String>,
    /// How long a processing claim holds a file without a heartbeat: after a crash, the
    /// file waits this long for another worker (or replica).
    pub ingest_lease: Option<String>,
    /// Collections with more vectors than this get an HNSW graph; smaller ones are searched
    /// exactly.
    pub hnsw_threshold: Option<usize>,
    /// The HNSW library of large collections: `usearch` or `hora`.
    pub vector_index: Option<String>,
    /// Chunks injected per `files` item.
    pub top_k: Option<usize>,
    /// Minimum cosine similarity of an injected chunk.
    pub relevance_threshold: Option<f32>,
    /// Fuse BM25 with dense retrieval.
    pub hybrid_search: Option<bool>,
    /// Weight of BM25 in the fusion (0..1).
    pub bm25_weight: Option<f32>,
    /// `rrf` (reciprocal rank) or `convex` (weighted normalised scores).
    pub fusion: Option<String>,
    /// Carry each document's title into its chunks' embedded and BM25-indexed text.
    pub title_in_chunks: Option<bool>,
    /// BM25 term-frequency saturation (k1) and length normalisation (b).
    pub bm25_k1: Option<f32>,
    pub bm25_b: Option<f32>,
    /// Prompt template with `{{CONTEXT}}` and `{{QUERY}}`.
    pub template: Option<String>,
    /// Put the context in the system message instead of the last user message.
    pub system_context: Option<bool>,
    /// Use whole documents instead of retrieval.
    pub full_context: Option<bool>,
    /// Ask the chat model for search queries before retrieving.
    pub query_generation: Option<bool>,
    /// Most `files` items in one chat request.
    pub max_items: Option<usize>,
    /// Most context injected into one chat request, in KiB.
    pub max_context_kb: Option<usize>,
}

/// `[auth]`
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AuthFile {
    pub secret_key: Option<String>,
    pub jwt_expires_in: Option<String>,
    pub enable_signup: Option<bool>,
    pub default_user_role: Option<String>,
    pub enable_api_keys: Option<bool>,
    pub api_key_header: Option<String>,
    pub admin_email: Option<String>,
    pub admin_password: Option<String>,
    pub admin_name: Option<String>,
    /// Sign-in attempts allowed per email within `signin-window`.
    pub signin_attempts: Option<u32>,
    pub signin_window: Option<String>,
    /// Sign-in and sign-up attempts allowed per client address within `signin-window`.
    pub signin_attempts_per_address: Option<u32>,
    /// Password hashes computed at once; 0 means one per core.
    pub password_hash_concurrency: Option<usize>,
    /// Attempts waiting for a hashing slot before 503.
    pub password_hash_queue: Option<usize>,
    /// Per-user model allow-lists: email → model ids. Users not listed see every model.
    pub model_access: Option<BTreeMap<String, Vec<String>>>,
}

/// One `[[ollama]]` or `[[openai]]` connection.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UpstreamFile {
    pub url: Option<String>,
    pub key: Option<String>,
    pub prefix_id: Option<String>,
    pub model_ids: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
    pub connection_type: Option<String>,
    pub enable: Option<bool>,
    /// Context window of this connection's models, in tokens.
    pub context_length: Option<u32>,
    /// Per-model context windows: upstream model id → tokens.
    pub context_lengths: Option<BTreeMap<String, u32>>,
}

/// `[models]`
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ModelsFile {
    pub cache_ttl: Option<String>,
    pub list_timeout: Option<String>,
}

/// `[timeouts]`
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TimeoutsFile {
    pub connect: Option<String>,
    pub read_idle: Option<String>,
}

/// Open WebUI's per-connection config object (`OLLAMA_API_CONFIGS` / `OPENAI_API_CONFIGS`
/// values), which uses snake_case names.
#[derive(Debug, Default, Deserialize)]
pub struct OwuiApiConfig {
    pub enable: Option<bool>,
    pub key: Option<String>,
    pub prefix_id: Option<String>,
    pub model_ids: Option<Vec<String>>,
    pub tags: Option<Vec<serde_json::Value>>,
    pub connection_type: Option<String>,
}
