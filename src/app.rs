//! The shared application state, built once at start-up and handed to every request.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use pingora::connectors::TransportConnector;

use crate::auth::Auth;
use crate::config::{Config, EmbeddingEngine, StorageBackend};
use crate::embed::Embedder;
use crate::ingest::Ingest;
use crate::models::ModelRegistry;
use crate::openapi::Docs;
use crate::store::{Role, Store, User};
use crate::upstream::Upstreams;

/// Everything a request handler may use.
pub struct App {
    pub config: Arc<Config>,
    /// The storage seams (`crate::storage`): every service and handler goes through them.
    pub storage: crate::storage::Storage,
    /// The embedded backend's own parts; `None` on PostgreSQL.
    embedded: Option<EmbeddedParts>,
    /// Where the PostgreSQL backend's connections and listener run; `None` when embedded.
    _storage_runtime: Option<StorageRuntime>,
    pub auth: Auth,
    pub upstreams: Arc<Upstreams>,
    pub models: ModelRegistry,
    /// Outbound client for calls that are not proxied (model lists, fan-outs).
    pub http: reqwest::Client,
    /// pingora's upstream connector (connect, TLS, timeouts), for the forward engine; idle
    /// connections wait in the forward engine's per-thread list, not in this connector's pool.
    pub connector: TransportConnector,
    /// API docs, present only with `ENV=dev`.
    pub docs: Option<Docs>,
    /// Files, chunks, embeddings and the vector index.
    pub ingest: Arc<Ingest>,
    pub started: Instant,
    /// Set while this process hands over to a new one (upgrade): every answer closes its
    /// connection, so clients reconnect to the new process instead of reusing this one.
    pub handing_over: std::sync::atomic::AtomicBool,
    /// Per-key and per-user limits and usage metering.
    pub usage: crate::usage::Usage,
    /// Token counting and model context windows for the context budget of RAG requests.
    pub context: crate::rag::budget::ContextBudget,
    /// The stored model presets, read once and again after a change.
    pub preset_cache: crate::presets::PresetCache,
}

/// The redb store and its in-process indexes behind the embedded [`crate::storage::Storage`].
struct EmbeddedParts {
    store: Arc<Store>,
    vectors: Arc<crate::storage::embedded::vectors::VectorStore>,
}

/// A runtime of its own for the PostgreSQL backend: its pooled connections and its LISTEN
/// task must outlive any one server runtime (and the start-up, which has none). Dropped
/// without waiting, so that an app dropped on an async thread (tests) does not panic.
struct StorageRuntime(Option<tokio::runtime::Runtime>);

impl Drop for StorageRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Start-up failures, with what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configured storage backend cannot be reached or prepared.
    #[error("{0}")]
    Storage(String),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the database {path}: {source} (is another ragway using this data dir?)")]
    Store {
        path: String,
        source: crate::store::StoreError,
    },
    #[error("cannot read or write the secret key file {path}: {source}")]
    Secret {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create the bootstrap admin: {0}")]
    Admin(String),
    #[error("cannot finish an interrupted user deletion: {0}")]
    UserDeletion(String),
    #[error("cannot load the vector index: {0}")]
    Index(crate::store::StoreError),
}

/// The configured embedding engine, or why it is unavailable, plus the tokenizer for
/// token-based chunking (ONNX engine only).
type EmbedderChoice = (
    Result<Arc<dyn Embedder>, String>,
    Option<Arc<tokenizers::Tokenizer>>,
);

fn build_embedder(config: &Config, http: &reqwest::Client) -> EmbedderChoice {
    let e = &config.embedding;
    match e.engine {
        EmbeddingEngine::Onnx => {
            match crate::embed::onnx::OnnxEmbedder::load_with(
                &e.model_dir,
                &e.onnxruntime,
                e.sessions,
                &e.model,
                e.int8,
            ) {
                Ok(onnx) => {
                    let tokenizer = Arc::new(onnx.tokenizer().clone());
                    (Ok(Arc::new(onnx)), Some(tokenizer))
                }
                Err(err) => {
                    tracing::warn!(error = %err, "embedding model unavailable; file processing will fail until it is provisioned");
                    (Err(err.to_string()), None)
                }
            }
        }
        EmbeddingEngine::Ollama => {
            let url = e.url.clone().unwrap_or_default();
            let engine = crate::embed::remote::OllamaEmbedder::new(
                http.clone(),
                &url,
                e.key.clone(),
                &e.model,
            );
            (Ok(Arc::new(engine)), None)
        }
        EmbeddingEngine::OpenAi => {
            let url = e.url.clone().unwrap_or_default();
            let engine = crate::embed::remote::OpenAiEmbedder::new(
                http.clone(),
                &url,
                e.key.clone(),
                &e.model,
            );
            (Ok(Arc::new(engine)), None)
        }
    }
}

/// Reads the JWT secret from the data dir, creating a random one on first start, so tokens
/// survive restarts without the user having to set `WEBUI_SECRET_KEY`.
fn load_or_create_secret(dir: &Path) -> Result<Vec<u8>, StartError> {
    let path = dir.join(".webui_secret_key");
    let err = |source| StartError::Secret {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().as_bytes().to_vec()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let tmp = dir.join(".webui_secret_key.tmp");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp).map_err(err)?;
        f.write_all(secret.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(secret.into_bytes())
}

/// Runs a start-up step on the storage seams (async) from `App::open`, which is sync and
/// runs before any server runtime: on the caller's runtime when it has one (tests open the
/// app on a blocking thread of theirs), on a runtime of its own otherwise.
fn start_up_wait<F: std::future::Future>(step: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(step),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime for start-up")
            .block_on(step),
    }
}

/// An opened backend with what must live as long as it does.
struct OpenedStorage {
    storage: crate::storage::Storage,
    embedded: Option<EmbeddedParts>,
    runtime: Option<StorageRuntime>,
}

/// Opens the configured backend: the redb store in the data dir (waiting up to
/// `store_wait` for a process handing it over) with its indexes, or PostgreSQL (connected,
/// migrated, listening) on a runtime of its own.
fn open_storage(
    config: &Config,
    store_wait: std::time::Duration,
) -> Result<OpenedStorage, StartError> {
    match config.storage.backend {
        StorageBackend::Embedded => {
            let db_path = config.data_dir.join("ragway.redb");
            let store = Arc::new(Store::open_waiting(&db_path, store_wait).map_err(|source| {
                StartError::Store {
                    path: db_path.display().to_string(),
                    source,
                }
            })?);
            let vectors = Arc::new(
                crate::storage::embedded::vectors::VectorStore::open(
                    config.rag.hnsw_threshold,
                    config.rag.vector_index,
                    config.data_dir.join("index"),
                    &store,
                )
                .map_err(StartError::Index)?,
            );
            let storage = crate::storage::embedded::storage(
                store.clone(),
                vectors.clone(),
                config
                    .storage
                    .blob_dir
                    .clone()
                    .unwrap_or_else(|| config.data_dir.join("uploads")),
                crate::auth::ratelimit::COUNTER_CAPACITY,
            );
            // Buckets in this process's memory, bounded as configured (`limits.max-tracked`).
            let storage = crate::storage::Storage {
                rate_limits: Arc::new(crate::limits::Limiter::new(config.limits.max_tracked)),
                ..storage
            };
            Ok(OpenedStorage {
                storage,
                embedded: Some(EmbeddedParts { store, vectors }),
                runtime: None,
            })
        }
        StorageBackend::Postgres => {
            if config.auth.secret_key.is_none() {
                return Err(StartError::Storage(
                    "replicas on PostgreSQL must sign sessions with one secret: set \
                     WEBUI_SECRET_KEY (or auth.secret-key) to the same value on every replica"
                        .into(),
                ));
            }
            let url = config.storage.url.clone().ok_or_else(|| {
                StartError::Storage("storage.backend = \"postgres\" needs a URL".into())
            })?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("ragway-storage")
                .enable_all()
                .build()
                .map_err(|e| {
                    StartError::Storage(format!("cannot start the storage runtime: {e}"))
                })?;
            let options = crate::storage::postgres::PgOptions {
                pool_size: config.storage.pool_size,
                ..crate::storage::postgres::PgOptions::default()
            };
            let (tx, rx) = std::sync::mpsc::channel();
            rt.spawn(async move {
                let _ = tx.send(crate::storage::postgres::connect(&url, options).await);
            });
            let mut storage = rx
                .recv()
                .map_err(|_| StartError::Storage("the storage runtime stopped".into()))?
                .map_err(|e| StartError::Storage(format!("cannot open PostgreSQL: {e}")))?;
            if let Some(dir) = &config.storage.blob_dir {
                storage.blobs = Arc::new(crate::storage::embedded::DirBlobs::new(dir.clone()));
            }
            Ok(OpenedStorage {
                storage,
                embedded: None,
                runtime: Some(StorageRuntime(Some(rt))),
            })
        }
    }
}

impl App {
    /// Opens the data dir and store, and prepares clients. Needs no running runtime.
    pub fn open(config: Config) -> Result<App, StartError> {
        Self::open_with(config, None)
    }

    /// Like [`App::open`], with an embedding engine chosen by the caller (tests use a
    /// deterministic one; `None` builds the configured engine).
    pub fn open_with(
        config: Config,
        embedder: Option<Arc<dyn Embedder>>,
    ) -> Result<App, StartError> {
        Self::open_staged(config, embedder, std::time::Duration::ZERO, || {})
    }

    /// Opens the app for `serve --upgrade`: everything that does not need the database
    /// (the embedding model above all) is loaded first, then `before_store` runs (it takes
    /// the listening sockets over from the running process, which then releases the
    /// database), then the database is opened, waiting up to `store_wait` for the release.
    pub fn open_upgrading(
        config: Config,
        store_wait: std::time::Duration,
        before_store: impl FnOnce(),
    ) -> Result<App, StartError> {
        Self::open_staged(config, None, store_wait, before_store)
    }

    fn open_staged(
        config: Config,
        embedder: Option<Arc<dyn Embedder>>,
        store_wait: std::time::Duration,
        before_store: impl FnOnce(),
    ) -> Result<App, StartError> {
        pingora::tls::install_default_crypto_provider();
        crate::metrics::init();
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(std::cmp::max(
                config.models_list_timeout * 5,
                std::time::Duration::from_secs(10),
            ))
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .expect("reqwest client with static settings");
        let (embedder, tokenizer) = match embedder {
            Some(e) => (Ok(e), None),
            None => build_embedder(&config, &http),
        };
        before_store();
        let opened = open_storage(&config, store_wait)?;
        let secret = match &config.auth.secret_key {
            Some(s) => s.as_bytes().to_vec(),
            None => load_or_create_secret(&config.data_dir)?,
        };
        let upstreams = Arc::new(Upstreams::new(&config));
        let models = ModelRegistry::new(
            upstreams.clone(),
            http.clone(),
            config.models_cache_ttl,
            config.models_list_timeout,
        );
        let docs = config.dev.then(crate::openapi::docs);
        let storage = opened.storage;
        let ingest = Arc::new(Ingest::new(&config, storage.clone(), embedder, tokenizer));
        let auth = Auth::new(config.auth.clone(), &secret, &storage);
        let usage = crate::usage::Usage::new(
            config.limits.clone(),
            storage.meta.clone(),
            storage.rate_limits.clone(),
        );
        let context = crate::rag::budget::ContextBudget::new(
            &config.embedding.model_dir,
            config.models_cache_ttl,
        );
        let preset_cache = crate::presets::PresetCache::new(storage.signals.as_ref());
        let app = App {
            preset_cache,
            storage,
            embedded: opened.embedded,
            _storage_runtime: opened.runtime,
            usage,
            config: Arc::new(config),
            auth,
            upstreams,
            models,
            http,
            connector: TransportConnector::new(None),
            docs,
            ingest,
            started: Instant::now(),
            handing_over: std::sync::atomic::AtomicBool::new(false),
            context,
        };
        start_up_wait(app.bootstrap_admin())?;
        // A user deletion interrupted by a crash leaves files and collections behind.
        start_up_wait(app.library().finish_deletions())
            .map_err(|e| StartError::UserDeletion(e.to_string()))?;
        Ok(app)
    }

    /// Retrieval over the library (chat with files, the retrieval API).
    #[must_use]
    pub fn retriever(&self) -> crate::rag::Retriever<'_> {
        crate::rag::Retriever {
            config: &self.config,
            meta: &*self.storage.meta,
            chunks: &*self.storage.chunks,
            ingest: &self.ingest,
        }
    }

    /// The embedded backend's redb store, for tests and tools that look inside it.
    ///
    /// # Panics
    /// On the PostgreSQL backend, which has none.
    #[must_use]
    pub fn store(&self) -> &Arc<Store> {
        &self.embedded_parts().store
    }

    /// The embedded backend's in-process search indexes, for tests and tools that look
    /// inside them.
    ///
    /// # Panics
    /// On the PostgreSQL backend, which has none.
    #[must_use]
    pub fn vectors(&self) -> &Arc<crate::storage::embedded::vectors::VectorStore> {
        &self.embedded_parts().vectors
    }

    fn embedded_parts(&self) -> &EmbeddedParts {
        self.embedded
            .as_ref()
            .expect("the embedded backend's parts, asked of an app on PostgreSQL")
    }

    /// Lets a new process (`serve --upgrade`) open the embedded database. Replicas on
    /// PostgreSQL share theirs: there is nothing to release.
    pub fn release_storage(&self) {
        if let Some(parts) = &self.embedded {
            parts.store.release();
        }
    }

    /// The context budget of RAG requests.
    #[must_use]
    pub fn budgeter(&self) -> crate::rag::budget::Budgeter<'_> {
        crate::rag::budget::Budgeter {
            config: &self.config,
            upstreams: &self.upstreams,
            http: &self.http,
            context: &self.context,
        }
    }

    /// Model presets: lookup, access and how chat applies them.
    #[must_use]
    pub fn presets(&self) -> crate::presets::Presets<'_> {
        crate::presets::Presets {
            config: &self.config,
            meta: self.storage.meta.as_ref(),
            cache: &self.preset_cache,
            models: &self.models,
            retriever: self.retriever(),
        }
    }

    /// Files and collections with their index entries, changed as one unit.
    #[must_use]
    pub fn library(&self) -> crate::library::Library {
        crate::library::Library::new(&self.storage)
    }

    /// `WEBUI_ADMIN_EMAIL`/`WEBUI_ADMIN_PASSWORD`: create the admin when no user exists.
    async fn bootstrap_admin(&self) -> Result<(), StartError> {
        let Some((email, password, name)) = &self.config.auth.admin else {
            return Ok(());
        };
        let created = self
            .auth
            .accounts()
            .bootstrap_admin(email, password, name)
            .await
            .map_err(|e| StartError::Admin(e.to_string()))?;
        if created.is_some() {
            tracing::info!(email = %email, "created the bootstrap admin");
        }
        Ok(())
    }

    /// `ragway user add`: creates a user (the very first one becomes admin), with the same
    /// checks as the HTTP routes.
    ///
    /// # Errors
    /// The refusal or failure, as the HTTP API would answer it.
    pub async fn add_user(
        &self,
        email: &str,
        password: &str,
        name: &str,
        role: Role,
    ) -> Result<User, crate::error::ApiError> {
        let new = crate::auth::accounts::NewUser {
            name: name.to_string(),
            email: email.to_string(),
            password: password.to_string(),
            profile_image_url: None,
        };
        Ok(self.auth.accounts().create_user(new, role, true).await?)
    }

    /// `ragway key create`: replaces the user's key and returns the plaintext.
    ///
    /// # Errors
    /// No such user, or a store failure, as the HTTP API would answer it.
    pub async fn create_key(
        &self,
        email: &str,
        models: Vec<String>,
    ) -> Result<String, crate::error::ApiError> {
        Ok(self
            .auth
            .accounts()
            .create_key_for_email(email, models)
            .await?)
    }
}
