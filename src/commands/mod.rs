//! Commands of the `ragway` binary that drive a whole [`crate::app::App`] from outside the
//! HTTP API: bulk ingestion (`ragway ingest`) and the retrieval evaluation (`ragway eval`).
//! They sit with the wiring, above the services they use.

pub mod bulk;
pub mod eval;
