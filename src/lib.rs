//! # ragway
//!
//! An authenticated, observable, RAG-capable gateway that speaks Open WebUI's HTTP API in
//! front of Ollama and OpenAI-compatible servers, in one binary with embedded storage.
//!
//! # Layout
//!
//! - [`config`]: file → env (Open WebUI's names) → CLI, validated into one `Config`.
//! - [`server`]: the pingora server: gateway service + metrics service.
//! - [`proxy`]: the one `ProxyHttp` ([`proxy::Gateway`]) and the [`proxy::forward`] engine.
//! - [`http`]: the route table ([`http::router`]), local replies, body reading.
//! - [`handlers`]: one module per API family (auths, models, chat, ollama, system).
//! - [`auth`]: credentials, JWT, API keys, passwords, sign-in rate limit.
//! - [`models`]: the merged model catalog and model resolution.
//! - [`presets`]: model presets (Open WebUI's workspace models) and how chat applies them.
//! - [`upstream`]: upstream addresses, health and balancing.
//! - [`store`]: redb schema and records.
//! - [`storage`]: the storage seams (traits) and their embedded and PostgreSQL backends.
//! - [`ingest`]: the file pipeline (queue, workers) and the in-memory vector index.
//! - [`extract`], [`chunk`], [`embed`], [`index`]: text extraction, chunking, embedding
//!   engines (ONNX, Ollama, OpenAI) and vector search (exact, HNSW).
//! - [`metrics`], [`openapi`], [`error`]: cross-cutting pieces, each in one place.
//! - [`probe`]: `ragway probe`, the health check a distroless image can run.
//!
//! ```
//! let config = ragway::config::build(
//!     Default::default(),
//!     &std::collections::HashMap::<String, String>::new(),
//!     &Default::default(),
//! )
//! .unwrap();
//! assert_eq!(config.listen, "127.0.0.1:3000");
//! ```

pub mod app;
pub mod auth;
pub mod chunk;
pub mod config;
pub mod embed;
pub mod error;
pub mod extract;
pub mod handlers;
pub mod http;
pub mod index;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod models;
pub mod openapi;
pub mod presets;
pub mod probe;
pub mod proxy;
pub mod rag;
pub mod server;
pub mod storage;
pub mod store;
pub mod ui;
pub mod upgrade;
pub mod upstream;
pub mod usage;
