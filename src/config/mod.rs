//! Configuration: one validated [`Config`] built from, in increasing precedence,
//! built-in defaults → the TOML file → environment variables → command-line flags.
//!
//! The serde structs of the file format live in [`file`]; nothing outside this module sees
//! them. Environment variables use Open WebUI's names so ragway is a drop-in replacement.

pub mod cli;
pub mod duration;
pub mod file;
pub(crate) mod presets;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::limits::Limits;
use crate::store::Role;
use file::{FileConfig, OwuiApiConfig, UpstreamFile};

/// Open WebUI v0.10.2's default `RAG_TEMPLATE`, verbatim (ends with a newline). Kept with
/// the configuration, whose default it is, so configuration needs nothing from `rag`.
pub const DEFAULT_RAG_TEMPLATE: &str = include_str!("default_template.txt");

/// Settings of `[limits]`.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Defaults for every API key.
    pub key: Limits,
    /// Defaults for every user (all their traffic).
    pub user: Limits,
    /// Limiter buckets tracked at most.
    pub max_tracked: usize,
    /// How long hourly usage rows are kept.
    pub retention: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            key: Limits::default(),
            user: Limits::default(),
            max_tracked: crate::limits::DEFAULT_CAPACITY,
            retention: Duration::from_hours(400 * 24),
        }
    }
}

/// Which API family an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    Ollama,
    OpenAi,
}

/// One validated upstream connection.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub kind: UpstreamKind,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:11434` or `https://h/v1`.
    pub url: String,
    /// Key sent as `Authorization: Bearer` to this upstream (never the client's credential).
    pub key: Option<String>,
    /// Prepended as `"{prefix_id}.{model}"` to this upstream's model ids.
    pub prefix_id: Option<String>,
    /// Allow-list of upstream model ids; empty means all.
    pub model_ids: Vec<String>,
    /// Tags copied onto every model of this connection.
    pub tags: Vec<String>,
    /// `local` / `external`, reported on each model.
    pub connection_type: String,
    /// Context window (tokens) of this connection's models, for the context budget.
    pub context_length: Option<u32>,
    /// Per-model context windows (upstream model id → tokens); win over `context_length`.
    pub context_lengths: BTreeMap<String, u32>,
}

/// Authentication settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// HS256 secret; `None` means "use the one generated in the data dir".
    pub secret_key: Option<String>,
    /// JWT lifetime; `None` means tokens never expire.
    pub jwt_expires_in: Option<Duration>,
    pub enable_signup: bool,
    pub default_user_role: Role,
    pub enable_api_keys: bool,
    /// Header carrying a raw API key (lowercase).
    pub api_key_header: String,
    /// Headless bootstrap admin: (email, password, name).
    pub admin: Option<(String, String, String)>,
    pub signin_attempts: u32,
    pub signin_window: Duration,
    /// Sign-in and sign-up attempts allowed per client address within `signin_window`.
    pub signin_attempts_per_address: u32,
    /// Password hashes (argon2, ~19 MiB each) computed at once.
    pub password_hash_concurrency: usize,
    /// Attempts waiting for a hashing slot; beyond this they are refused with 503.
    pub password_hash_queue: usize,
    /// Lowercased email → model ids that user may see and use.
    pub model_access: HashMap<String, Vec<String>>,
}

/// Retrieval defaults, chosen with `ragway eval` (see the README's measured numbers).
pub const DEFAULT_HYBRID: bool = true;
pub const DEFAULT_BM25_WEIGHT: f32 = 0.5;
pub const DEFAULT_FUSION: &str = "convex";
/// `rag.title-in-chunks`: see the README's "Ranking beyond plain hybrid" for the measurement.
pub const DEFAULT_TITLE_IN_CHUNKS: bool = true;
/// `rag.bm25-k1` and `rag.bm25-b` (measured: README "Ranking beyond plain hybrid").
pub const DEFAULT_BM25_K1: f32 = 1.2;
pub const DEFAULT_BM25_B: f32 = 0.75;

/// Which engine computes embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingEngine {
    Onnx,
    Ollama,
    OpenAi,
}

impl EmbeddingEngine {
    pub fn as_str(self) -> &'static str {
        match self {
            EmbeddingEngine::Onnx => "onnx",
            EmbeddingEngine::Ollama => "ollama",
            EmbeddingEngine::OpenAi => "openai",
        }
    }
}

/// Embedding settings.
#[derive(Debug, Clone)]
pub struct EmbeddingConfig {
    pub engine: EmbeddingEngine,
    pub model: String,
    pub model_dir: PathBuf,
    pub onnxruntime: PathBuf,
    pub sessions: usize,
    /// Weight-only int8 models compute on the int8 kernels (`embedding.int8`).
    pub int8: bool,
    /// Remote engine base URL and key.
    pub url: Option<String>,
    pub key: Option<String>,
}

/// Files, chunking and index settings.
#[derive(Debug, Clone)]
pub struct RagConfig {
    pub chunk_size: usize,
    pub chunk_overlap: usize,
    /// Token-based splitting with the embedding model's tokenizer.
    pub token_splitter: bool,
    pub markdown_headers: bool,
    pub file_max_bytes: u64,
    /// Lowercase extensions without dot; empty = every supported type.
    pub allowed_extensions: Vec<String>,
    pub workers: usize,
    /// Uploads with `process_in_background=false` that may wait for their result at once;
    /// more get a 503.
    pub inline_queue: usize,
    /// How files are extracted: inflation limits, child process, memory and time limits.
    pub extraction: crate::extract::isolate::Options,
    pub file_add_wait: Duration,
    /// How long a processing claim holds a file without a heartbeat (`rag.ingest-lease`).
    pub ingest_lease: Duration,
    pub hnsw_threshold: usize,
    pub vector_index: crate::index::GraphKind,
    pub top_k: usize,
    pub relevance_threshold: f32,
    pub hybrid: bool,
    pub bm25_weight: f32,
    pub fusion: Fusion,
    /// The document's title (first line or file name) leads each chunk's embedded and
    /// indexed text (`rag.title-in-chunks`); the stored and injected text is unchanged.
    pub title_in_chunks: bool,
    /// BM25 parameters (`rag.bm25-k1`, `rag.bm25-b`).
    pub bm25_k1: f32,
    pub bm25_b: f32,
    pub template: String,
    pub system_context: bool,
    pub full_context: bool,
    pub query_generation: bool,
    /// Most `files` items in one chat request (after de-duplication).
    pub max_items: usize,
    /// Most bytes of context injected into one chat request.
    pub max_context_bytes: usize,
}

/// How dense and BM25 rankings are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fusion {
    /// Weighted reciprocal-rank fusion (Open WebUI's EnsembleRetriever).
    Rrf,
    /// Weighted sum of max-normalised scores.
    Convex,
    /// Weighted sum of min-max-normalised scores.
    MinMax,
    /// Weighted sum of z-scores.
    ZScore,
}

impl Fusion {
    /// The configuration name (`rag.fusion`, `--fusion`).
    pub fn parse(name: &str) -> Option<Fusion> {
        match name {
            "rrf" => Some(Fusion::Rrf),
            "convex" => Some(Fusion::Convex),
            "minmax" => Some(Fusion::MinMax),
            "zscore" => Some(Fusion::ZScore),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fusion::Rrf => "rrf",
            Fusion::Convex => "convex",
            Fusion::MinMax => "minmax",
            Fusion::ZScore => "zscore",
        }
    }
}

/// The validated runtime configuration. Built once at start-up; shared read-only.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub metrics_listen: Option<String>,
    pub data_dir: PathBuf,
    /// `ENV=dev`: serve `/docs` and `/openapi.json`.
    pub dev: bool,
    pub threads: usize,
    /// `work-stealing`: one shared scheduler whose threads take each other's tasks (true),
    /// or one scheduler per thread, each keeping the connections it was given (false, the
    /// default): a request's reads, upstream exchange and writes then stay on one thread,
    /// as in nginx's workers, without the cross-thread wake-ups that cost more CPU per
    /// request than the proxying itself on small machines.
    pub work_stealing: bool,
    pub max_body_bytes: usize,
    /// Most JSON values in a parsed request body (see `http::json`).
    pub max_json_values: usize,
    pub shutdown_grace: Duration,
    pub auth: AuthConfig,
    pub ollama: Vec<UpstreamConfig>,
    pub openai: Vec<UpstreamConfig>,
    pub models_cache_ttl: Duration,
    pub models_list_timeout: Duration,
    pub connect_timeout: Duration,
    pub read_idle_timeout: Duration,
    pub embedding: EmbeddingConfig,
    pub rag: RagConfig,
    /// `[limits]`: per-key and per-user limits, usage retention.
    pub limits: LimitsConfig,
    pub presets: PresetsConfig,
    pub context: ContextConfig,
    pub storage: StorageConfig,
}

/// `[storage]`: which backend keeps users, keys, files, vectors and the queue.
#[derive(Clone, PartialEq, Eq)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// The PostgreSQL URL, checked (`postgres` only).
    pub url: Option<String>,
    /// Pooled connections per replica (`postgres` only).
    pub pool_size: usize,
    /// Uploaded files' bytes in this directory; `None`: `<data-dir>/uploads` embedded, the
    /// database on PostgreSQL.
    pub blob_dir: Option<std::path::PathBuf>,
}

/// Not derived: the URL may hold a password, and configs get logged.
impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("backend", &self.backend)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("blob_dir", &self.blob_dir)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageBackend {
    /// redb + in-process indexes in `data-dir`: one process.
    Embedded,
    /// PostgreSQL + pgvector, shared by replicas.
    Postgres,
}

/// Model presets: the bounds of stored ones, and those declared in the file.
#[derive(Debug, Clone)]
pub struct PresetsConfig {
    /// Presets one user may create through the API.
    pub max_per_user: usize,
    /// Presets stored in all.
    pub max_total: usize,
    /// `[[presets.declared]]`, validated; read-only through the API.
    pub declared: Vec<crate::store::PresetRecord>,
}

/// The context budget (`[context]`): fitting retrieved context into a model's window.
#[derive(Debug, Clone)]
pub struct ContextConfig {
    /// Fit RAG context into the model's context window (off: inject as retrieved).
    pub budget: bool,
    /// Ollama's runtime window for a model that sets no `num_ctx` (`OLLAMA_CONTEXT_LENGTH`).
    pub ollama_default_window: u32,
    /// Tokens kept free for the answer when a request states no `max_tokens`.
    pub answer_reserve: u32,
    /// The largest window ragway ever asks for or believes an upstream about.
    pub max_window: u32,
    /// Send Ollama RAG requests that need more than the runtime window to `/api/chat` with
    /// `options.num_ctx` (Ollama's `/v1` endpoint has no way to set it).
    pub native_num_ctx: bool,
    /// Models whose context window is remembered at once.
    pub cache_entries: usize,
}

/// A configuration problem, with the setting it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Most ONNX sessions (`embedding.sessions`): each keeps its own working memory, so a typo
/// must not allocate hundreds of them at start-up.
pub const MAX_SESSIONS: usize = 64;
/// Most files processed at once (`rag.workers`): each holds its text, chunks and vectors.
pub const MAX_WORKERS: usize = 256;

/// Cores this process may use (cgroup and affinity limits included), at least 1.
pub fn machine_cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// ONNX sessions when `embedding.sessions` is not set: one single-threaded session per core
/// (they scale better than one multi-threaded session on a busy machine), at most
/// [`DEFAULT_MAX_SESSIONS`] because every session running at once adds its working memory to
/// the peak.
pub fn default_sessions(cores: usize) -> usize {
    cores.clamp(1, DEFAULT_MAX_SESSIONS)
}

/// Most sessions [`default_sessions`] chooses (an explicit `embedding.sessions` may go up to
/// [`MAX_SESSIONS`]).
pub const DEFAULT_MAX_SESSIONS: usize = 4;

/// Files processed at once when `rag.workers` is not set: two per core, so that while one
/// file is embedded on every session the next ones are already extracted and chunked (and
/// small files, whose commit is a large share of their time, keep the sessions busy), but
/// at most 16 so a big machine does not hold many large files in memory at once.
pub fn default_workers(cores: usize) -> usize {
    (cores * 2).clamp(2, 16)
}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Reads environment variables; a seam so tests need not mutate the process environment.
pub trait EnvSource {
    /// The value, with empty values treated as unset (Open WebUI's convention).
    fn get(&self, name: &str) -> Option<String>;
    /// The value even when empty.
    fn get_raw(&self, name: &str) -> Option<String>;
}

/// The real process environment. Empty values count as unset, as in Open WebUI.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
    fn get_raw(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name)
            .cloned()
            .filter(|v| !v.trim().is_empty())
    }
    fn get_raw(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// Flags that override everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub ollama_urls: Vec<String>,
    pub openai_urls: Vec<String>,
}

impl From<&cli::ServeArgs> for Overrides {
    fn from(a: &cli::ServeArgs) -> Self {
        Overrides {
            config_file: a.common.config.clone(),
            data_dir: a.common.data_dir.clone(),
            listen: a.listen.clone(),
            metrics_listen: a.metrics_listen.clone(),
            ollama_urls: a.ollama_urls.clone(),
            openai_urls: a.openai_urls.clone(),
        }
    }
}

impl From<&cli::CommonArgs> for Overrides {
    fn from(a: &cli::CommonArgs) -> Self {
        Overrides {
            config_file: a.config.clone(),
            data_dir: a.data_dir.clone(),
            ..Overrides::default()
        }
    }
}

/// Parses a TOML file into the file format, with the file name in any error.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
}

/// `ragway check-config FILE`: the file parses and validates on its own (no env, no flags).
pub fn check_file(path: &Path) -> Result<Config, ConfigError> {
    let file = read_file(path)?;
    build(
        file,
        &HashMap::<String, String>::new(),
        &Overrides::default(),
    )
}

/// Loads the configuration the way `ragway serve` does.
pub fn load(env: &dyn EnvSource, overrides: &Overrides) -> Result<Config, ConfigError> {
    let file = match &overrides.config_file {
        Some(p) => read_file(p)?,
        None => FileConfig::default(),
    };
    build(file, env, overrides)
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => err(format!("{name}: expected true or false, got {v:?}")),
    }
}

fn duration(name: &str, v: &str) -> Result<Duration, ConfigError> {
    duration::parse_finite(v).map_err(|e| ConfigError(format!("{name}: {e}")))
}

fn split_list(v: &str) -> Vec<String> {
    v.split(';')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Applies the layers in precedence order: file, then env, then flags; then validates.
pub fn build(
    file: FileConfig,
    env: &dyn EnvSource,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let auth_file = file.auth.unwrap_or_default();

    // --- listen: flag > RAGWAY_LISTEN > HOST/PORT > file > default
    let mut listen = file.listen.unwrap_or_else(|| "127.0.0.1:3000".to_string());
    if env.get("HOST").is_some() || env.get("PORT").is_some() {
        let (fh, fp) = listen.rsplit_once(':').unwrap_or(("127.0.0.1", "3000"));
        let host = env.get("HOST").unwrap_or_else(|| fh.to_string());
        let port = env.get("PORT").unwrap_or_else(|| fp.to_string());
        listen = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
    }
    if let Some(v) = env.get("RAGWAY_LISTEN") {
        listen = v;
    }
    if let Some(v) = &overrides.listen {
        listen = v.clone();
    }
    if listen.parse::<std::net::SocketAddr>().is_err() {
        return err(format!(
            "listen: {listen:?} is not an address like 127.0.0.1:3000"
        ));
    }

    let mut metrics_listen = file
        .metrics_listen
        .unwrap_or_else(|| "127.0.0.1:9091".to_string());
    // An explicitly empty RAGWAY_METRICS_LISTEN disables the listener, so read it raw.
    if let Some(v) = env.get_raw("RAGWAY_METRICS_LISTEN") {
        metrics_listen = v;
    }
    if let Some(v) = &overrides.metrics_listen {
        metrics_listen = v.clone();
    }
    let metrics_listen = if metrics_listen.trim().is_empty() {
        None
    } else {
        if metrics_listen.parse::<std::net::SocketAddr>().is_err() {
            return err(format!(
                "metrics-listen: {metrics_listen:?} is not an address"
            ));
        }
        Some(metrics_listen)
    };

    let mut data_dir = PathBuf::from(file.data_dir.unwrap_or_else(|| "./data".to_string()));
    if let Some(v) = env.get("DATA_DIR") {
        data_dir = PathBuf::from(v);
    }
    if let Some(v) = &overrides.data_dir {
        data_dir = v.clone();
    }

    let mut env_name = file.env.unwrap_or_else(|| "prod".to_string());
    if let Some(v) = env.get("ENV") {
        env_name = v;
    }
    let dev = match env_name.as_str() {
        "dev" => true,
        "prod" | "production" => false,
        other => return err(format!("env: expected \"dev\" or \"prod\", got {other:?}")),
    };

    let threads = file.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    if threads == 0 {
        return err("threads: must be at least 1");
    }
    let max_body_mb = file.max_body_mb.unwrap_or(32);
    if max_body_mb == 0 {
        return err("max-body-mb: must be at least 1");
    }
    let max_json_values = file.max_json_values.unwrap_or(100_000);
    if max_json_values == 0 {
        return err("max-json-values: must be at least 1");
    }
    let shutdown_grace = match &file.shutdown_grace {
        Some(v) => duration("shutdown-grace", v)?,
        None => Duration::from_secs(10),
    };

    // --- auth
    let mut secret_key = auth_file.secret_key;
    if let Some(v) = env
        .get("WEBUI_SECRET_KEY")
        .or_else(|| env.get("WEBUI_JWT_SECRET_KEY"))
    {
        secret_key = Some(v);
    }
    let mut jwt = auth_file.jwt_expires_in.unwrap_or_else(|| "4w".to_string());
    if let Some(v) = env.get("JWT_EXPIRES_IN") {
        jwt = v;
    }
    let jwt_expires_in =
        duration::parse(&jwt).map_err(|e| ConfigError(format!("jwt-expires-in: {e}")))?;
    let mut enable_signup = auth_file.enable_signup.unwrap_or(true);
    if let Some(v) = env.get("ENABLE_SIGNUP") {
        enable_signup = parse_bool("ENABLE_SIGNUP", &v)?;
    }
    let mut role = auth_file
        .default_user_role
        .unwrap_or_else(|| "pending".to_string());
    if let Some(v) = env.get("DEFAULT_USER_ROLE") {
        role = v;
    }
    let default_user_role = Role::parse(&role).ok_or_else(|| {
        ConfigError(format!(
            "default-user-role: {role:?} is not admin, user or pending"
        ))
    })?;
    let mut enable_api_keys = auth_file.enable_api_keys.unwrap_or(true);
    if let Some(v) = env.get("ENABLE_API_KEYS") {
        enable_api_keys = parse_bool("ENABLE_API_KEYS", &v)?;
    }
    let mut api_key_header = auth_file
        .api_key_header
        .unwrap_or_else(|| "x-api-key".to_string());
    if let Some(v) = env.get("CUSTOM_API_KEY_HEADER") {
        api_key_header = v;
    }
    let api_key_header = api_key_header.trim().to_ascii_lowercase();
    if http::HeaderName::from_bytes(api_key_header.as_bytes()).is_err() {
        return err(format!(
            "api-key-header: {api_key_header:?} is not a valid header name"
        ));
    }
    let admin_email = env.get("WEBUI_ADMIN_EMAIL").or(auth_file.admin_email);
    let admin_password = env.get("WEBUI_ADMIN_PASSWORD").or(auth_file.admin_password);
    let admin_name = env
        .get("WEBUI_ADMIN_NAME")
        .or(auth_file.admin_name)
        .unwrap_or_else(|| "Admin".to_string());
    let admin = match (admin_email, admin_password) {
        (Some(e), Some(p)) => Some((e.trim().to_lowercase(), p, admin_name)),
        (None, None) => None,
        _ => {
            return err(
                "admin-email and admin-password (WEBUI_ADMIN_EMAIL/WEBUI_ADMIN_PASSWORD) must be set together",
            );
        }
    };
    let signin_attempts = auth_file.signin_attempts.unwrap_or(15);
    let signin_window = match &auth_file.signin_window {
        Some(v) => duration("signin-window", v)?,
        None => Duration::from_secs(180),
    };
    let signin_attempts_per_address = auth_file.signin_attempts_per_address.unwrap_or(60);
    if signin_attempts == 0 || signin_attempts_per_address == 0 {
        return err("signin-attempts and signin-attempts-per-address must be at least 1");
    }
    // 0 (the default) means one hash per core, at most 4: argon2 is CPU-bound, more only
    // queues, and each hashing thread keeps its own memory (see `password::HashGate`).
    let password_hash_concurrency = match auth_file.password_hash_concurrency.unwrap_or(0) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        n => n,
    };
    let password_hash_queue = auth_file.password_hash_queue.unwrap_or(32);
    let model_access = auth_file
        .model_access
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.trim().to_lowercase(), v))
        .collect();

    // --- upstreams
    let ollama = upstreams(
        UpstreamKind::Ollama,
        file.ollama.unwrap_or_default(),
        env,
        &overrides.ollama_urls,
    )?;
    let openai = upstreams(
        UpstreamKind::OpenAi,
        file.openai.unwrap_or_default(),
        env,
        &overrides.openai_urls,
    )?;

    // --- models and timeouts
    let models_file = file.models.unwrap_or_default();
    let models_cache_ttl = duration(
        "models.cache-ttl",
        models_file.cache_ttl.as_deref().unwrap_or("10s"),
    )?;
    let models_list_timeout = duration(
        "models.list-timeout",
        models_file.list_timeout.as_deref().unwrap_or("2s"),
    )?;
    let t = file.timeouts.unwrap_or_default();
    let connect_timeout = duration("timeouts.connect", t.connect.as_deref().unwrap_or("5s"))?;
    let mut read_idle = t.read_idle.unwrap_or_else(|| "300s".to_string());
    if let Some(v) = env.get("AIOHTTP_CLIENT_TIMEOUT") {
        read_idle = v;
    }
    let read_idle_timeout = duration("timeouts.read-idle (AIOHTTP_CLIENT_TIMEOUT)", &read_idle)?;

    let (embedding, rag) = rag_config(
        file.embedding.unwrap_or_default(),
        file.rag.unwrap_or_default(),
        env,
        &ollama,
        &openai,
        &data_dir,
    )?;
    let limits = limits_config(file.limits.unwrap_or_default())?;

    // --- model presets
    let presets_file = file.presets.unwrap_or_default();
    let presets = PresetsConfig {
        max_per_user: presets_file.max_per_user.unwrap_or(50),
        max_total: presets_file.max_total.unwrap_or(500),
        declared: presets::declared(presets_file.declared.unwrap_or_default(), rag.max_items)
            .map_err(|e| ConfigError(format!("presets.declared: {e}")))?,
    };
    let context = context_config(file.context.unwrap_or_default())?;
    let storage = storage_config(file.storage.unwrap_or_default(), env)?;

    Ok(Config {
        listen,
        metrics_listen,
        data_dir,
        dev,
        threads,
        work_stealing: file.work_stealing.unwrap_or(false),
        max_body_bytes: (max_body_mb * 1024 * 1024) as usize,
        max_json_values,
        shutdown_grace,
        auth: AuthConfig {
            secret_key,
            jwt_expires_in,
            enable_signup,
            default_user_role,
            enable_api_keys,
            api_key_header,
            admin,
            signin_attempts,
            signin_window,
            signin_attempts_per_address,
            password_hash_concurrency,
            password_hash_queue,
            model_access,
        },
        ollama,
        openai,
        models_cache_ttl,
        models_list_timeout,
        connect_timeout,
        read_idle_timeout,
        embedding,
        rag,
        limits,
        presets,
        context,
        storage,
    })
}

/// `[storage]` with Open WebUI's `DATABASE_URL`, which overrides `url`. A PostgreSQL URL
/// selects the postgres backend unless `backend` says otherwise; a `sqlite:` one (Open
/// WebUI's default) is ignored: the embedded store is ragway's counterpart.
fn storage_config(f: file::StorageFile, env: &dyn EnvSource) -> Result<StorageConfig, ConfigError> {
    let (mut url, mut url_name) = (f.url, "storage.url");
    if let Some(v) = env.get("DATABASE_URL") {
        let scheme = v
            .split_once(':')
            .map_or("", |(s, _)| s)
            .to_ascii_lowercase();
        if !scheme.starts_with("sqlite") {
            url = Some(v);
            url_name = "DATABASE_URL";
        }
    }
    let backend = match f.backend.as_deref().map(str::trim) {
        None | Some("") if url.is_some() => StorageBackend::Postgres,
        None | Some("" | "embedded") => StorageBackend::Embedded,
        Some("postgres" | "postgresql") => StorageBackend::Postgres,
        Some(other) => {
            return err(format!(
                "storage.backend: {other:?} is not a backend; use \"embedded\" or \"postgres\""
            ));
        }
    };
    let pool_size = f.pool_size.unwrap_or(16);
    if !(1..=1000).contains(&pool_size) {
        return err(format!(
            "storage.pool-size: {pool_size} is out of range (1 to 1000)"
        ));
    }
    if f.blob_dir
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        return err("storage.blob-dir: empty; leave it out to use the default");
    }
    if backend == StorageBackend::Embedded {
        return Ok(StorageConfig {
            backend,
            url: None,
            pool_size,
            blob_dir: f.blob_dir,
        });
    }
    let Some(url) = url else {
        return err(
            "storage.backend = \"postgres\" needs storage.url or DATABASE_URL (postgres://user:password@host:5432/database)",
        );
    };
    crate::storage::postgres::parse_url(&url)
        .map_err(|e| ConfigError(format!("{url_name}: {e}")))?;
    Ok(StorageConfig {
        backend,
        url: Some(url),
        pool_size,
        blob_dir: f.blob_dir,
    })
}

/// `[limits]`. A limit of 0 means none; values are bounded like those set through the API.
fn limits_config(f: file::LimitsFile) -> Result<LimitsConfig, ConfigError> {
    use crate::limits::MAX_LIMIT;
    let one = |name: &str, v: Option<u64>| -> Result<Option<u64>, ConfigError> {
        match v {
            None | Some(0) => Ok(None),
            Some(n) if n > MAX_LIMIT => err(format!("limits.{name}: at most {MAX_LIMIT}")),
            Some(n) => Ok(Some(n)),
        }
    };
    let defaults = LimitsConfig::default();
    let max_tracked = f.max_tracked.unwrap_or(defaults.max_tracked);
    if max_tracked == 0 {
        return err("limits.max-tracked: must be at least 1");
    }
    let retention = match f.usage_retention {
        Some(v) => duration("limits.usage-retention", &v)?,
        None => defaults.retention,
    };
    if retention < std::time::Duration::from_secs(3600) {
        return err("limits.usage-retention: at least 1h (usage is kept per hour)");
    }
    Ok(LimitsConfig {
        key: Limits {
            rpm: one("key-rpm", f.key_rpm)?,
            tpm: one("key-tpm", f.key_tpm)?,
            rpd: one("key-rpd", f.key_rpd)?,
            tpd: one("key-tpd", f.key_tpd)?,
        },
        user: Limits {
            rpm: one("user-rpm", f.user_rpm)?,
            tpm: one("user-tpm", f.user_tpm)?,
            rpd: one("user-rpd", f.user_rpd)?,
            tpd: one("user-tpd", f.user_tpd)?,
        },
        max_tracked,
        retention,
    })
}

/// `[context]`: the context budget.
fn context_config(c: file::ContextFile) -> Result<ContextConfig, ConfigError> {
    let max_window = c.max_window.unwrap_or(131_072);
    if max_window < 256 {
        return err("context.max-window: must be at least 256");
    }
    let ollama_default_window = c.ollama_default_window.unwrap_or(2048);
    if !(256..=max_window).contains(&ollama_default_window) {
        return err(format!(
            "context.ollama-default-window: must be between 256 and context.max-window ({max_window})"
        ));
    }
    let answer_reserve = c.answer_reserve.unwrap_or(512);
    if answer_reserve >= max_window {
        return err("context.answer-reserve: must be smaller than context.max-window");
    }
    let cache_entries = c.cache_entries.unwrap_or(1024);
    if cache_entries == 0 {
        return err("context.cache-entries: must be at least 1");
    }
    Ok(ContextConfig {
        budget: c.budget.unwrap_or(true),
        ollama_default_window,
        answer_reserve,
        max_window,
        native_num_ctx: c.native_num_ctx.unwrap_or(true),
        cache_entries,
    })
}

/// The `rag.extract-*` and `rag.extractor` settings of the file.
struct ExtractFile {
    inflate_ratio: Option<u64>,
    stream_max_mb: Option<u64>,
    memory_mb: Option<u64>,
    timeout: Option<String>,
    extractor: Option<String>,
}

/// `rag.extract-*` and `rag.extractor` (env `RAGWAY_EXTRACTOR`).
fn extraction_options(
    r: ExtractFile,
    env: &dyn EnvSource,
    file_max_bytes: u64,
) -> Result<crate::extract::isolate::Options, ConfigError> {
    const MB: u64 = 1024 * 1024;
    let ratio = r.inflate_ratio.unwrap_or(4);
    if ratio == 0 {
        return err("rag.extract-inflate-ratio: must be at least 1");
    }
    let stream = r
        .stream_max_mb
        .map_or(file_max_bytes, |mb| mb.saturating_mul(MB));
    if stream == 0 {
        return err("rag.extract-stream-max-mb: must be at least 1");
    }
    let memory_mb = r.memory_mb.unwrap_or(1024);
    if memory_mb < 64 {
        return err("rag.extract-memory-mb: must be at least 64");
    }
    let timeout = duration(
        "rag.extract-timeout",
        r.timeout.as_deref().unwrap_or("300s"),
    )?;
    if timeout.is_zero() {
        return err("rag.extract-timeout: must be positive");
    }
    let extractor = match env.get("RAGWAY_EXTRACTOR").or(r.extractor) {
        None => crate::extract::isolate::default_extractor(),
        Some(v) if v.trim() == "in-process" => None,
        Some(v) => {
            let path = PathBuf::from(v.trim());
            if !path.is_file() {
                return err(format!(
                    "rag.extractor (RAGWAY_EXTRACTOR): {} is not a file",
                    path.display()
                ));
            }
            Some(path)
        }
    };
    Ok(crate::extract::isolate::Options {
        limits: crate::extract::Limits {
            max_stream_bytes: stream,
            max_total_bytes: file_max_bytes.saturating_mul(ratio),
        },
        extractor,
        memory_bytes: memory_mb.saturating_mul(MB),
        timeout,
    })
}

fn parse_usize(name: &str, v: &str) -> Result<usize, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| ConfigError(format!("{name}: expected a whole number, got {v:?}")))
}

/// `[embedding]` and `[rag]` with Open WebUI's variables (`RAG_EMBEDDING_ENGINE`,
/// `RAG_EMBEDDING_MODEL`, `CHUNK_SIZE`, `CHUNK_OVERLAP`, `RAG_TEXT_SPLITTER`,
/// `RAG_FILE_MAX_SIZE`, `RAG_ALLOWED_FILE_EXTENSIONS`, ...).
fn rag_config(
    e: file::EmbeddingFile,
    r: file::RagFile,
    env: &dyn EnvSource,
    ollama: &[UpstreamConfig],
    openai: &[UpstreamConfig],
    data_dir: &Path,
) -> Result<(EmbeddingConfig, RagConfig), ConfigError> {
    let mut engine = e.engine.unwrap_or_else(|| "onnx".into());
    if let Some(v) = env.get_raw("RAG_EMBEDDING_ENGINE") {
        engine = v;
    }
    let engine = match engine.trim().to_ascii_lowercase().as_str() {
        "" | "onnx" | "local" => EmbeddingEngine::Onnx,
        "ollama" => EmbeddingEngine::Ollama,
        "openai" => EmbeddingEngine::OpenAi,
        other => {
            return err(format!(
                "embedding.engine (RAG_EMBEDDING_ENGINE): {other:?} is not onnx, ollama or openai"
            ));
        }
    };
    let model = env
        .get("RAG_EMBEDDING_MODEL")
        .or(e.model)
        .unwrap_or_else(|| "sentence-transformers/all-MiniLM-L6-v2".into());
    let model_dir = PathBuf::from(
        env.get("RAGWAY_MODEL_DIR")
            .or(e.model_dir)
            .unwrap_or_else(|| "./models/all-MiniLM-L6-v2".into()),
    );
    let onnxruntime = PathBuf::from(
        env.get("ORT_DYLIB_PATH")
            .or(e.onnxruntime)
            .unwrap_or_else(|| "./models/onnxruntime/libonnxruntime.so".into()),
    );
    // Sized from the machine by default: on the int8 kernels a session costs a few MiB (the
    // int8 weights are prepacked once and shared), not a float copy of the model.
    let int8 = e.int8.unwrap_or(true);
    let sessions = match e.sessions {
        None if int8 => default_sessions(machine_cores()),
        // A float session holds its own ~90 MiB copy of the weights: two would break the
        // 200 MB idle bound.
        None => 1,
        Some(0) => machine_cores(),
        Some(n) if n > MAX_SESSIONS => {
            return err(format!(
                "embedding.sessions: at most {MAX_SESSIONS} (each session is a copy of the \
                 model's working memory); 0 means one per core"
            ));
        }
        Some(n) => n,
    };
    let (url, key) = match engine {
        EmbeddingEngine::Onnx => (None, None),
        EmbeddingEngine::Ollama => (
            env.get("RAG_OLLAMA_BASE_URL")
                .or(e.url)
                .or_else(|| ollama.first().map(|u| u.url.clone())),
            env.get("RAG_OLLAMA_API_KEY")
                .or(e.key)
                .or_else(|| ollama.first().and_then(|u| u.key.clone())),
        ),
        EmbeddingEngine::OpenAi => (
            env.get("RAG_OPENAI_API_BASE_URL")
                .or(e.url)
                .or_else(|| openai.first().map(|u| u.url.clone())),
            env.get("RAG_OPENAI_API_KEY")
                .or(e.key)
                .or_else(|| openai.first().and_then(|u| u.key.clone())),
        ),
    };
    if engine != EmbeddingEngine::Onnx && url.is_none() {
        return err(format!(
            "embedding.url: the {} engine needs a base URL (or a configured connection)",
            engine.as_str()
        ));
    }

    let mut chunk_size = r.chunk_size.unwrap_or(1000);
    if let Some(v) = env.get("CHUNK_SIZE") {
        chunk_size = parse_usize("CHUNK_SIZE", &v)?;
    }
    let mut chunk_overlap = r.chunk_overlap.unwrap_or(100);
    if let Some(v) = env.get("CHUNK_OVERLAP") {
        chunk_overlap = parse_usize("CHUNK_OVERLAP", &v)?;
    }
    if chunk_size == 0 || chunk_overlap >= chunk_size {
        return err("rag.chunk-size must be > 0 and rag.chunk-overlap smaller than it");
    }
    let mut splitter = r.text_splitter.unwrap_or_else(|| "character".into());
    if let Some(v) = env.get_raw("RAG_TEXT_SPLITTER") {
        splitter = v;
    }
    let token_splitter = match splitter.trim() {
        "" | "character" => false,
        "token" | "token_transformers" => true,
        other => {
            return err(format!(
                "rag.text-splitter: {other:?} is not character or token"
            ));
        }
    };
    let mut markdown_headers = r.markdown_header_splitter.unwrap_or(true);
    if let Some(v) = env.get("ENABLE_MARKDOWN_HEADER_TEXT_SPLITTER") {
        markdown_headers = parse_bool("ENABLE_MARKDOWN_HEADER_TEXT_SPLITTER", &v)?;
    }
    let mut max_mb = r.file_max_size_mb.unwrap_or(100);
    if let Some(v) = env.get("RAG_FILE_MAX_SIZE") {
        max_mb = parse_usize("RAG_FILE_MAX_SIZE", &v)? as u64;
    }
    if max_mb == 0 {
        return err("rag.file-max-size-mb: must be at least 1");
    }
    let extraction = extraction_options(
        ExtractFile {
            inflate_ratio: r.extract_inflate_ratio,
            stream_max_mb: r.extract_stream_max_mb,
            memory_mb: r.extract_memory_mb,
            timeout: r.extract_timeout,
            extractor: r.extractor,
        },
        env,
        max_mb * 1024 * 1024,
    )?;
    let mut allowed = r.allowed_extensions.unwrap_or_default();
    if let Some(v) = env.get("RAG_ALLOWED_FILE_EXTENSIONS") {
        allowed = v.split(',').map(String::from).collect();
    }
    let allowed_extensions = allowed
        .iter()
        .map(|x| x.trim().trim_start_matches('.').to_ascii_lowercase())
        .filter(|x| !x.is_empty())
        .collect();
    let workers = match r.workers.unwrap_or(0) {
        0 => default_workers(machine_cores()),
        n if n > MAX_WORKERS => {
            return err(format!(
                "rag.workers: at most {MAX_WORKERS} files at once (each holds its text, chunks \
                 and vectors in memory); 0 means sized from the cores"
            ));
        }
        n => n,
    };
    let inline_queue = r.inline_queue.unwrap_or(32);
    if inline_queue == 0 {
        return err("rag.inline-queue: must be at least 1");
    }
    let ingest_lease = duration(
        "rag.ingest-lease",
        r.ingest_lease.as_deref().unwrap_or("60s"),
    )?;
    if !(Duration::from_secs(3)..=Duration::from_hours(1)).contains(&ingest_lease) {
        return err(
            "rag.ingest-lease: from 3s (heartbeats every third of it) to 1h (a crashed \
             worker's file waits this long)",
        );
    }
    let file_add_wait = duration(
        "rag.file-add-wait",
        r.file_add_wait.as_deref().unwrap_or("60s"),
    )?;
    let hnsw_threshold = r
        .hnsw_threshold
        .unwrap_or(crate::index::DEFAULT_EXACT_THRESHOLD);
    let vector_index = match env.get("RAGWAY_VECTOR_INDEX").or(r.vector_index.clone()) {
        Some(v) => v
            .parse()
            .or_else(|e: String| err(format!("rag.vector-index: {e}")))?,
        None => crate::index::GraphKind::default(),
    };
    let mut top_k = r.top_k.unwrap_or(3);
    if let Some(v) = env.get("RAG_TOP_K") {
        top_k = parse_usize("RAG_TOP_K", &v)?;
    }
    if top_k == 0 {
        return err("rag.top-k (RAG_TOP_K): must be at least 1");
    }
    let parse_f32 = |name: &str, v: &str| -> Result<f32, ConfigError> {
        v.trim()
            .parse::<f32>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| ConfigError(format!("{name}: expected a number, got {v:?}")))
    };
    let mut relevance_threshold = r.relevance_threshold.unwrap_or(0.0);
    if let Some(v) = env.get("RAG_RELEVANCE_THRESHOLD") {
        relevance_threshold = parse_f32("RAG_RELEVANCE_THRESHOLD", &v)?;
    }
    let mut hybrid = r.hybrid_search.unwrap_or(DEFAULT_HYBRID);
    if let Some(v) = env.get("ENABLE_RAG_HYBRID_SEARCH") {
        hybrid = parse_bool("ENABLE_RAG_HYBRID_SEARCH", &v)?;
    }
    let mut bm25_weight = r.bm25_weight.unwrap_or(DEFAULT_BM25_WEIGHT);
    if let Some(v) = env.get("RAG_HYBRID_BM25_WEIGHT") {
        bm25_weight = parse_f32("RAG_HYBRID_BM25_WEIGHT", &v)?;
    }
    if !(0.0..=1.0).contains(&bm25_weight) {
        return err("rag.bm25-weight (RAG_HYBRID_BM25_WEIGHT): must be between 0 and 1");
    }
    let fusion_name = r.fusion.as_deref().unwrap_or(DEFAULT_FUSION);
    let Some(fusion) = Fusion::parse(fusion_name) else {
        return err(format!(
            "rag.fusion: {fusion_name:?} is not rrf, convex, minmax or zscore"
        ));
    };
    let title_in_chunks = r.title_in_chunks.unwrap_or(DEFAULT_TITLE_IN_CHUNKS);
    let bm25_k1 = r.bm25_k1.unwrap_or(DEFAULT_BM25_K1);
    if !(0.0..=10.0).contains(&bm25_k1) {
        return err("rag.bm25-k1: must be between 0 and 10");
    }
    let bm25_b = r.bm25_b.unwrap_or(DEFAULT_BM25_B);
    if !(0.0..=1.0).contains(&bm25_b) {
        return err("rag.bm25-b: must be between 0 and 1");
    }
    let mut template = r
        .template
        .unwrap_or_else(|| DEFAULT_RAG_TEMPLATE.to_string());
    if let Some(v) = env.get("RAG_TEMPLATE") {
        template = v;
    }
    let mut system_context = r.system_context.unwrap_or(false);
    if let Some(v) = env.get("RAG_SYSTEM_CONTEXT") {
        system_context = parse_bool("RAG_SYSTEM_CONTEXT", &v)?;
    }
    let mut full_context = r.full_context.unwrap_or(false);
    if let Some(v) = env.get("RAG_FULL_CONTEXT") {
        full_context = parse_bool("RAG_FULL_CONTEXT", &v)?;
    }
    let mut query_generation = r.query_generation.unwrap_or(false);
    if let Some(v) = env.get("ENABLE_RETRIEVAL_QUERY_GENERATION") {
        query_generation = parse_bool("ENABLE_RETRIEVAL_QUERY_GENERATION", &v)?;
    }
    let max_items = r.max_items.unwrap_or(32);
    if max_items == 0 {
        return err("rag.max-items: must be at least 1");
    }
    let max_context_kb = r.max_context_kb.unwrap_or(4096);
    if max_context_kb == 0 {
        return err("rag.max-context-kb: must be at least 1");
    }
    // Relative model paths are relative to the working directory, not the data dir; the
    // data dir is only used for uploads and the index.
    let _ = data_dir;
    Ok((
        EmbeddingConfig {
            engine,
            model,
            model_dir,
            onnxruntime,
            sessions,
            int8,
            url,
            key,
        },
        RagConfig {
            chunk_size,
            chunk_overlap,
            token_splitter,
            markdown_headers,
            file_max_bytes: max_mb * 1024 * 1024,
            allowed_extensions,
            workers,
            inline_queue,
            extraction,
            file_add_wait,
            ingest_lease,
            hnsw_threshold,
            vector_index,
            top_k,
            relevance_threshold,
            hybrid,
            bm25_weight,
            fusion,
            title_in_chunks,
            bm25_k1,
            bm25_b,
            template,
            system_context,
            full_context,
            query_generation,
            max_items,
            max_context_bytes: max_context_kb * 1024,
        },
    ))
}

/// Merges one upstream family: file entries, then Open WebUI's env vars (URLs, keys, and
/// the per-index JSON config), then `--*-url` flags. Env and flag URL lists replace the
/// URLs index by index and keep the file's other settings for the same index.
fn upstreams(
    kind: UpstreamKind,
    mut entries: Vec<UpstreamFile>,
    env: &dyn EnvSource,
    flag_urls: &[String],
) -> Result<Vec<UpstreamConfig>, ConfigError> {
    let (urls_var, url_var, configs_var, label) = match kind {
        UpstreamKind::Ollama => (
            "OLLAMA_BASE_URLS",
            "OLLAMA_BASE_URL",
            "OLLAMA_API_CONFIGS",
            "ollama",
        ),
        UpstreamKind::OpenAi => (
            "OPENAI_API_BASE_URLS",
            "OPENAI_API_BASE_URL",
            "OPENAI_API_CONFIGS",
            "openai",
        ),
    };
    let replace_urls = |entries: &mut Vec<UpstreamFile>, urls: Vec<String>| {
        entries.resize_with(urls.len(), UpstreamFile::default);
        for (e, u) in entries.iter_mut().zip(urls) {
            e.url = Some(u);
        }
    };
    if let Some(v) = env.get(urls_var).or_else(|| env.get(url_var)) {
        replace_urls(&mut entries, split_list(&v));
    }
    if kind == UpstreamKind::OpenAi
        && let Some(v) = env
            .get("OPENAI_API_KEYS")
            .or_else(|| env.get("OPENAI_API_KEY"))
    {
        for (e, k) in entries.iter_mut().zip(v.split(';')) {
            if !k.trim().is_empty() {
                e.key = Some(k.trim().to_string());
            }
        }
    }
    if let Some(v) = env.get(configs_var) {
        let map: BTreeMap<String, OwuiApiConfig> = serde_json::from_str(&v)
            .map_err(|e| ConfigError(format!("{configs_var}: invalid JSON: {e}")))?;
        for (idx, c) in map {
            let i: usize = idx
                .parse()
                .map_err(|_| ConfigError(format!("{configs_var}: key {idx:?} is not an index")))?;
            let Some(e) = entries.get_mut(i) else {
                return err(format!("{configs_var}: index {i} has no {label} URL"));
            };
            e.enable = c.enable.or(e.enable);
            e.key = c.key.filter(|k| !k.is_empty()).or(e.key.take());
            e.prefix_id = c.prefix_id.filter(|p| !p.is_empty()).or(e.prefix_id.take());
            e.model_ids = c.model_ids.or(e.model_ids.take());
            e.connection_type = c.connection_type.or(e.connection_type.take());
            if let Some(tags) = c.tags {
                e.tags = Some(
                    tags.into_iter()
                        .filter_map(|t| match t {
                            serde_json::Value::String(s) => Some(s),
                            serde_json::Value::Object(o) => {
                                o.get("name").and_then(|n| n.as_str()).map(String::from)
                            }
                            _ => None,
                        })
                        .collect(),
                );
            }
        }
    }
    if !flag_urls.is_empty() {
        replace_urls(&mut entries, flag_urls.to_vec());
    }
    // With nothing configured at all, ragway fronts a local Ollama, like Open WebUI.
    if entries.is_empty() && kind == UpstreamKind::Ollama {
        entries.push(UpstreamFile {
            url: Some("http://127.0.0.1:11434".into()),
            ..UpstreamFile::default()
        });
    }
    let mut out = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        if e.enable == Some(false) {
            continue;
        }
        let Some(url) = e.url else {
            return err(format!("{label}[{i}]: url is required"));
        };
        let url = url.trim().trim_end_matches('/').to_string();
        let uri: http::Uri = url
            .parse()
            .map_err(|_| ConfigError(format!("{label}[{i}]: {url:?} is not a URL")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return err(format!(
                    "{label}[{i}]: {url:?} must start with http:// or https://"
                ));
            }
        }
        if uri.host().is_none() {
            return err(format!("{label}[{i}]: {url:?} has no host"));
        }
        let default_type = match kind {
            UpstreamKind::Ollama => "local",
            UpstreamKind::OpenAi => "external",
        };
        out.push(UpstreamConfig {
            kind,
            url,
            key: e.key.filter(|k| !k.is_empty()),
            prefix_id: e.prefix_id.filter(|p| !p.is_empty()),
            model_ids: e.model_ids.unwrap_or_default(),
            tags: e.tags.unwrap_or_default(),
            connection_type: e
                .connection_type
                .unwrap_or_else(|| default_type.to_string()),
            context_length: e.context_length,
            context_lengths: e.context_lengths.unwrap_or_default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> FileConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_front_a_local_ollama() {
        let c = build(FileConfig::default(), &env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:3000");
        assert_eq!(c.metrics_listen.as_deref(), Some("127.0.0.1:9091"));
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.ollama.len(), 1);
        assert_eq!(c.ollama[0].url, "http://127.0.0.1:11434");
        assert!(c.openai.is_empty());
        assert!(c.auth.enable_api_keys);
        assert_eq!(c.auth.default_user_role, Role::Pending);
        assert!(!c.dev);
    }

    #[test]
    fn precedence_is_flag_over_env_over_file() {
        let f = || file("listen = \"127.0.0.1:1111\"\n[auth]\nenable-signup = false\n");
        let c = build(f(), &env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:1111");
        assert!(!c.auth.enable_signup);

        let e = env(&[
            ("RAGWAY_LISTEN", "127.0.0.1:2222"),
            ("ENABLE_SIGNUP", "true"),
        ]);
        let c = build(f(), &e, &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:2222");
        assert!(c.auth.enable_signup);

        let o = Overrides {
            listen: Some("127.0.0.1:3333".into()),
            ..Overrides::default()
        };
        let c = build(f(), &e, &o).unwrap();
        assert_eq!(c.listen, "127.0.0.1:3333");
    }

    #[test]
    fn host_and_port_like_open_webui() {
        let c = build(
            FileConfig::default(),
            &env(&[("HOST", "0.0.0.0"), ("PORT", "8080")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080");
    }

    #[test]
    fn open_webui_upstream_variables() {
        let e = env(&[
            ("OLLAMA_BASE_URLS", "http://a:11434;http://b:11434/"),
            (
                "OLLAMA_API_CONFIGS",
                r#"{"1":{"prefix_id":"b","model_ids":["x"]}}"#,
            ),
            ("OPENAI_API_BASE_URLS", "https://api.example.com/v1"),
            ("OPENAI_API_KEYS", "sk-upstream"),
        ]);
        let c = build(FileConfig::default(), &e, &Overrides::default()).unwrap();
        assert_eq!(c.ollama.len(), 2);
        assert_eq!(c.ollama[1].url, "http://b:11434");
        assert_eq!(c.ollama[1].prefix_id.as_deref(), Some("b"));
        assert_eq!(c.ollama[1].model_ids, vec!["x".to_string()]);
        assert_eq!(c.openai[0].key.as_deref(), Some("sk-upstream"));
        assert_eq!(c.openai[0].connection_type, "external");
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |f: &str, e: &[(&str, &str)]| {
            build(file(f), &env(e), &Overrides::default())
                .unwrap_err()
                .to_string()
        };
        assert!(bad("", &[("ENABLE_SIGNUP", "maybe")]).contains("ENABLE_SIGNUP"));
        assert!(bad("listen = \"nope\"", &[]).contains("listen"));
        assert!(bad("[[ollama]]\nurl = \"ftp://x\"", &[]).contains("ollama[0]"));
        assert!(bad("[timeouts]\nconnect = \"5 parsecs\"", &[]).contains("timeouts.connect"));
        assert!(bad("", &[("DEFAULT_USER_ROLE", "god")]).contains("default-user-role"));
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
    }

    #[test]
    fn context_budget_keys() {
        let c = build(FileConfig::default(), &env(&[]), &Overrides::default()).unwrap();
        assert!(c.context.budget && c.context.native_num_ctx);
        assert_eq!(
            (
                c.context.ollama_default_window,
                c.context.answer_reserve,
                c.context.max_window
            ),
            (2048, 512, 131_072)
        );
        let c = build(
            file("[[openai]]\nurl = \"http://x/v1\"\ncontext-length = 8000\ncontext-lengths = { \"a\" = 9000 }\n\
                  [context]\nbudget = false\nmax-window = 9000"),
            &env(&[]),
            &Overrides::default(),
        )
        .unwrap();
        assert!(!c.context.budget);
        assert_eq!(c.openai[0].context_length, Some(8000));
        assert_eq!(c.openai[0].context_lengths["a"], 9000);
        let bad = |f: &str| {
            build(file(f), &env(&[]), &Overrides::default())
                .unwrap_err()
                .to_string()
        };
        assert!(bad("[context]\nmax-window = 10").contains("context.max-window"));
        assert!(
            bad("[context]\nollama-default-window = 9999999").contains("ollama-default-window")
        );
        assert!(bad("[context]\nanswer-reserve = 200000").contains("answer-reserve"));
        assert!(bad("[context]\ncache-entries = 0").contains("cache-entries"));
        assert!(toml::from_str::<FileConfig>("[context]\nbudgett = true").is_err());
    }

    #[test]
    fn ingestion_parallelism_is_sized_from_the_machine_unless_set() {
        let c = build(FileConfig::default(), &env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.embedding.sessions, default_sessions(machine_cores()));
        assert!(c.embedding.int8, "int8 kernels by default");
        assert_eq!(default_sessions(1), 1);
        assert_eq!(default_sessions(2), 2, "every core embeds");
        assert_eq!(
            default_sessions(64),
            DEFAULT_MAX_SESSIONS,
            "peak memory stays bounded"
        );
        assert_eq!(c.rag.workers, default_workers(machine_cores()));
        assert_eq!(default_workers(1), 2, "extraction overlaps embedding");
        assert_eq!(default_workers(2), 4);
        assert_eq!(default_workers(64), 16, "bounded on big machines");

        let c = build(
            file("[embedding]\nsessions = 3\n[rag]\nworkers = 5\n"),
            &env(&[]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!((c.embedding.sessions, c.rag.workers), (3, 5));
        let c = build(
            file("[embedding]\nsessions = 0\n[rag]\nworkers = 0\n"),
            &env(&[]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.embedding.sessions, machine_cores(), "0 means per core");
        let c = build(
            file("[embedding]\nint8 = false\n"),
            &env(&[]),
            &Overrides::default(),
        )
        .unwrap();
        assert!(!c.embedding.int8);
        assert_eq!(
            c.embedding.sessions, 1,
            "one float copy of the weights unless asked"
        );

        let bad = |f: &str| {
            build(file(f), &env(&[]), &Overrides::default())
                .unwrap_err()
                .to_string()
        };
        let e = bad("[embedding]\nsessions = 65\n");
        assert!(e.contains("embedding.sessions") && e.contains("64"), "{e}");
        let e = bad("[rag]\nworkers = 100000\n");
        assert!(e.contains("rag.workers") && e.contains("256"), "{e}");
    }

    #[test]
    fn ranking_keys_have_measured_defaults_and_bounds() {
        let c = build(file(""), &env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.rag.title_in_chunks, DEFAULT_TITLE_IN_CHUNKS);
        assert_eq!(
            (c.rag.bm25_k1, c.rag.bm25_b),
            (DEFAULT_BM25_K1, DEFAULT_BM25_B)
        );
        let c = build(
            file("[rag]\ntitle-in-chunks = true\nbm25-k1 = 0.9\nbm25-b = 0.4\n"),
            &env(&[]),
            &Overrides::default(),
        )
        .unwrap();
        assert!(c.rag.title_in_chunks);
        assert_eq!((c.rag.bm25_k1, c.rag.bm25_b), (0.9, 0.4));
        let bad = |f: &str| {
            build(file(f), &env(&[]), &Overrides::default())
                .unwrap_err()
                .to_string()
        };
        for (f, key) in [
            ("[rag]\nbm25-k1 = 11.0\n", "rag.bm25-k1"),
            ("[rag]\nbm25-k1 = nan\n", "rag.bm25-k1"),
            ("[rag]\nbm25-b = -0.1\n", "rag.bm25-b"),
            ("[rag]\nbm25-b = 1.5\n", "rag.bm25-b"),
        ] {
            let e = bad(f);
            assert!(e.contains(key), "{f}: {e}");
        }
    }
}
