//! The approximate index a large collection uses: one of two HNSW libraries, chosen by
//! configuration (`rag.vector-index`), behind one type.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{HnswIndex, HnswParams, IndexError, UsearchIndex, VectorIndex};

/// Which HNSW library builds a collection's graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphKind {
    /// USearch 2 (C++ core): the default, measured faster to build, search and load.
    #[default]
    Usearch,
    /// hora 0.1.1 (pure Rust).
    Hora,
}

impl std::fmt::Display for GraphKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GraphKind::Usearch => "usearch",
            GraphKind::Hora => "hora",
        })
    }
}

impl std::str::FromStr for GraphKind {
    type Err = String;
    fn from_str(s: &str) -> Result<GraphKind, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "usearch" => Ok(GraphKind::Usearch),
            "hora" => Ok(GraphKind::Hora),
            other => Err(format!(
                "unknown vector index `{other}`: expected `usearch` or `hora`"
            )),
        }
    }
}

/// A built graph of either kind.
#[derive(Debug)]
pub enum Graph {
    /// Boxed: hora's index is several times the size of USearch's handle.
    Hora(Box<HnswIndex>),
    Usearch(UsearchIndex),
}

impl Graph {
    /// Builds a graph of `kind` (slow: off the request path).
    pub fn build(
        kind: GraphKind,
        dim: usize,
        items: Vec<(u64, Vec<f32>)>,
        params: HnswParams,
    ) -> Result<Graph, IndexError> {
        Ok(match kind {
            GraphKind::Hora => Graph::Hora(Box::new(HnswIndex::build(dim, items, params)?)),
            GraphKind::Usearch => Graph::Usearch(UsearchIndex::build(dim, items, params)?),
        })
    }

    /// Loads a graph of `kind` saved at `path`.
    pub fn load(kind: GraphKind, path: &Path) -> io::Result<Graph> {
        Ok(match kind {
            GraphKind::Hora => Graph::Hora(Box::new(HnswIndex::load(path)?)),
            GraphKind::Usearch => Graph::Usearch(UsearchIndex::load(path)?),
        })
    }

    /// Deletes a save made by [`Graph::save`] (of any kind); false if there was none.
    pub fn remove_saved(path: &Path) -> io::Result<bool> {
        super::persist::remove(path)
    }

    pub fn kind(&self) -> GraphKind {
        match self {
            Graph::Hora(_) => GraphKind::Hora,
            Graph::Usearch(_) => GraphKind::Usearch,
        }
    }

    /// Saves the graph crash-safely (see `persist`).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        match self {
            Graph::Hora(g) => g.save(path),
            Graph::Usearch(g) => g.save(path),
        }
    }

    pub fn dim(&self) -> usize {
        match self {
            Graph::Hora(g) => g.dim(),
            Graph::Usearch(g) => g.dim(),
        }
    }

    pub fn contains(&self, id: u64) -> bool {
        match self {
            Graph::Hora(g) => g.contains(id),
            Graph::Usearch(g) => g.contains(id),
        }
    }

    /// Every id in the graph, ascending.
    pub fn ids(&self) -> &[u64] {
        match self {
            Graph::Hora(g) => g.ids(),
            Graph::Usearch(g) => g.ids(),
        }
    }

    /// Approximate heap bytes.
    pub fn memory_bytes(&self) -> usize {
        match self {
            Graph::Hora(g) => g.memory_bytes(),
            Graph::Usearch(g) => g.memory_bytes(),
        }
    }

    /// Changes the search beam width.
    pub fn set_ef_search(&self, ef: usize) {
        match self {
            Graph::Hora(g) => g.set_ef_search(ef),
            Graph::Usearch(g) => g.set_ef_search(ef),
        }
    }
}

impl VectorIndex for Graph {
    fn search(&self, query: &[f32], k: usize, allow: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)> {
        match self {
            Graph::Hora(g) => g.search(query, k, allow),
            Graph::Usearch(g) => g.search(query, k, allow),
        }
    }

    fn len(&self) -> usize {
        match self {
            Graph::Hora(g) => g.len(),
            Graph::Usearch(g) => g.len(),
        }
    }
}
