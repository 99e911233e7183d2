//! # ragway
//!
//! An authenticated, observable, RAG-capable gateway that speaks Open WebUI's HTTP API in
//! front of Ollama and OpenAI-compatible servers, in one binary with embedded storage.
//!
//! # Layout
//!
//! Layered: a module uses only modules below it (see the README's "Code layout").
//!
//! - Wiring: [`app`] (builds the services and hands each the parts it needs), [`server`],
//!   [`commands`] (bulk ingestion and evaluation over a whole `App`).
//! - Edge: [`proxy`]: the HTTP/1 server loop ([`proxy::serve`]), the gateway
//!   ([`proxy::Gateway`]) and the [`proxy::forward`] engine.
//! - HTTP: [`handlers`] (one module per API family, domain errors → HTTP errors in one place),
//!   [`request`] (per-request state and the forward plan), [`openapi`], [`ui`].
//! - Services: [`library`] (files + collections + index entries as one unit), [`rag`]
//!   (the `Retriever`, context budget), [`presets`], [`ingest`], [`usage`], [`auth`]
//!   (credentials and access rules), [`models`], [`upstream`].
//! - Leaves: [`config`], [`store`] and [`storage`] (the storage seams and their embedded and
//!   PostgreSQL backends), [`forms`] (request bodies), [`limits`], [`http`],
//!   [`extract`], [`chunk`], [`embed`], [`heap`], [`index`], [`metrics`], [`error`], [`probe`],
//!   [`upgrade`].
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
pub mod commands;
pub mod config;
pub mod embed;
pub mod error;
pub mod extract;
pub mod forms;
pub mod handlers;
pub mod heap;
pub mod http;
pub mod index;
pub mod ingest;
pub mod library;
pub mod limits;
pub mod metrics;
pub mod models;
pub mod openapi;
pub mod presets;
pub mod probe;
pub mod proxy;
pub mod rag;
pub mod request;
pub mod server;
pub mod storage;
pub mod store;
pub mod ui;
pub mod upgrade;
pub mod upstream;
pub mod usage;
