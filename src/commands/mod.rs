//! Commands of the `ragway` binary that drive a whole [`crate::app::App`] from outside the
//! HTTP API: bulk ingestion (`ragway ingest`), the retrieval evaluation (`ragway eval`) and
//! the copy of a data dir into PostgreSQL (`ragway migrate`).
//! They sit with the wiring, above the services they use.

pub mod bulk;
pub mod eval;
pub mod migrate;
