//! Retrieval-augmented generation for `/api/chat/completions` with `files`.
//!
//! One query embedding per request; each item (file, collection, inline text) is searched
//! on its own, by dense vectors, BM25, or both fused; identical chunk texts are collapsed;
//! the top `k` per item become a source. [`prompt`] turns sources into the context string
//! and injects it. The same search functions serve `ragway eval`, so the quality measured
//! there is the quality chat gets.

pub mod bm25;
pub mod budget;
pub mod prompt;

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde_json::{Value, json};

use crate::auth::Identity;
use crate::auth::access;
use crate::config::{Config, Fusion, RagConfig};
use crate::error::ApiError;
use crate::ingest::{Ingest, NotUsable};
use crate::store::{ChunkRecord, FileRecord, FileStatus, Store};

/// Open WebUI's source object (spec 4.4): returned to the client and injected.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    /// The request item, minus `data`.
    pub source: Value,
    pub document: Vec<String>,
    pub metadata: Vec<Value>,
    pub distances: Vec<f32>,
}

/// Which rankings to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Dense,
    Bm25,
    Hybrid,
}

impl Mode {
    pub fn from_config(cfg: &RagConfig) -> Mode {
        if cfg.hybrid {
            Mode::Hybrid
        } else {
            Mode::Dense
        }
    }
}

/// What to search.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    File(&'a str),
    Collection(&'a str),
}

/// Fusion settings.
#[derive(Debug, Clone, Copy)]
pub struct Fuse {
    pub fusion: Fusion,
    pub bm25_weight: f32,
}

/// Candidates fetched from each ranking before fusion and de-duplication.
fn candidates(k: usize) -> usize {
    (k * 4).max(20)
}

/// Weighted reciprocal-rank fusion (k = 60, as LangChain's EnsembleRetriever).
pub fn rrf(dense: &[(u64, f32)], lexical: &[(u64, f32)], bm25_weight: f32) -> Vec<(u64, f32)> {
    let mut scores: HashMap<u64, f32> = HashMap::new();
    for (rank, (id, _)) in dense.iter().enumerate() {
        *scores.entry(*id).or_default() += (1.0 - bm25_weight) / (60.0 + rank as f32 + 1.0);
    }
    for (rank, (id, _)) in lexical.iter().enumerate() {
        *scores.entry(*id).or_default() += bm25_weight / (60.0 + rank as f32 + 1.0);
    }
    sorted(scores)
}

/// Weighted sum of scores normalised to [0, 1] by each list's maximum (cosine is already
/// in range; BM25 is unbounded).
pub fn convex(dense: &[(u64, f32)], lexical: &[(u64, f32)], bm25_weight: f32) -> Vec<(u64, f32)> {
    let mut scores: HashMap<u64, f32> = HashMap::new();
    let dmax = dense.iter().map(|x| x.1).fold(f32::MIN, f32::max).max(1e-6);
    let lmax = lexical
        .iter()
        .map(|x| x.1)
        .fold(f32::MIN, f32::max)
        .max(1e-6);
    for (id, s) in dense {
        *scores.entry(*id).or_default() += (1.0 - bm25_weight) * (s / dmax).max(0.0);
    }
    for (id, s) in lexical {
        *scores.entry(*id).or_default() += bm25_weight * (s / lmax).max(0.0);
    }
    sorted(scores)
}

fn sorted(scores: HashMap<u64, f32>) -> Vec<(u64, f32)> {
    let mut v: Vec<(u64, f32)> = scores.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// What retrieval reads: the settings, the store (files, chunks) and the ingestion side
/// (vector index, embedder). Built by the wiring ([`crate::app::App::retriever`]), so
/// retrieval needs nothing above it.
#[derive(Clone, Copy)]
pub struct Retriever<'a> {
    pub config: &'a Config,
    pub store: &'a Store,
    pub ingest: &'a Ingest,
}

/// Ranks chunk ids of `scope` for one query. `vector` is needed unless `mode` is BM25.
pub fn rank(
    app: &Retriever<'_>,
    scope: Scope,
    query: &str,
    vector: Option<&[f32]>,
    mode: Mode,
    fuse: Fuse,
    n: usize,
) -> Vec<(u64, f32)> {
    let vx = &app.ingest.vectors;
    let dense = || match (scope, vector) {
        (Scope::File(f), Some(v)) => vx.search_file(f, v, n),
        (Scope::Collection(c), Some(v)) => vx.search_collection(c, v, n),
        _ => Vec::new(),
    };
    let lexical = || match scope {
        Scope::File(f) => vx.bm25_file(f, query, n),
        Scope::Collection(c) => vx.bm25_collection(c, query, n),
    };
    match mode {
        Mode::Dense => dense(),
        Mode::Bm25 => lexical(),
        Mode::Hybrid => {
            let (d, l) = (dense(), lexical());
            let mut fused = match fuse.fusion {
                Fusion::Rrf => rrf(&d, &l, fuse.bm25_weight),
                Fusion::Convex => convex(&d, &l, fuse.bm25_weight),
            };
            fused.truncate(n);
            fused
        }
    }
}

fn item_str<'a>(item: &'a Value, key: &str) -> Option<&'a str> {
    item.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The item as echoed in `source` (without `data`, as Open WebUI strips it).
fn echo(item: &Value) -> Value {
    let mut v = item.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("data");
    }
    v
}

fn chunk_meta(app: &Retriever<'_>, file: &FileRecord, chunk: &ChunkRecord, score: f32) -> Value {
    let mut m = json!({
        "file_id": file.id,
        "name": file.meta.get("name").cloned().unwrap_or(json!(file.filename)),
        "source": file.filename,
        "created_by": file.user_id,
        "hash": file.hash,
        "embedding_config": {
            "engine": file.embedding.as_ref().map(|e| e.engine.clone()).unwrap_or_else(|| app.ingest.engine.as_str().to_string()),
            "model": file.embedding.as_ref().map(|e| e.model.clone()),
        },
        "start_index": chunk.start_index,
        "score": score,
    });
    if let Some(p) = chunk.page {
        m["page"] = json!(p);
    }
    if !chunk.headers.is_empty() {
        m["headers"] = json!(chunk.headers);
    }
    m
}

/// A file the caller may read and that is processed, waiting (bounded) for one still
/// being processed: asking right after an upload must not see an empty context.
pub async fn usable_file(
    app: &Retriever<'_>,
    identity: &Identity,
    id: &str,
) -> Result<FileRecord, ApiError> {
    let missing = || ApiError::not_found(format!("File {id} not found"));
    let f = app.store.file(id)?.ok_or_else(missing)?;
    if !access::can_read_file(app.store, &identity.user, &f)? {
        return Err(missing());
    }
    app.ingest
        .processed(f, app.config.rag.file_add_wait)
        .await
        .map_err(|e| match e {
            NotUsable::Gone => missing(),
            NotUsable::StillProcessing => {
                ApiError::new(409, format!("File {id} is still being processed"))
            }
            NotUsable::Failed(error) => {
                ApiError::bad_request(format!("File {id} could not be processed: {error}"))
            }
            NotUsable::NotProcessed => ApiError::bad_request(format!(
                "File {id} was uploaded with process=false and has no content"
            )),
            NotUsable::Store(e) => e.into(),
        })
}

/// The context a request may still inject: every document text counts against it as it is
/// loaded, so an oversized request fails before it holds more than the limit in memory.
pub struct Budget {
    left: usize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget { left: limit, limit }
    }

    /// Counts `bytes` of injected text; 413 beyond the limit.
    pub fn take(&mut self, bytes: usize) -> Result<(), ApiError> {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(too_much_context(self.limit)),
        }
    }
}

/// The 413 for a request whose context exceeds `limit` bytes.
pub fn too_much_context(limit: usize) -> ApiError {
    ApiError::new(
        413,
        format!(
            "Too much context for one request: the limit is {} KiB (rag.max-context-kb); \
             attach fewer or smaller files, or use retrieval instead of full context",
            limit / 1024
        ),
    )
}

/// Identical items (same type, id, context mode, or the same inline text) are searched and
/// injected once; more than `max` distinct items is a 400. Repeating one item must not
/// multiply the work or the injected text.
pub fn distinct_items(items: &[Value], max: usize) -> Result<Vec<Value>, ApiError> {
    use sha2::{Digest, Sha256};
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for item in items {
        let field = |k: &str| item.get(k).map(Value::to_string).unwrap_or_default();
        let content = item
            .get("content")
            .and_then(Value::as_str)
            .map(|c| hex::encode(Sha256::digest(c.as_bytes())))
            .unwrap_or_default();
        let key = format!(
            "{}\0{}\0{}\0{}\0{}",
            field("type"),
            field("id"),
            field("context"),
            field("name"),
            content
        );
        if seen.insert(key) {
            out.push(item.clone());
            if out.len() > max {
                return Err(ApiError::bad_request(format!(
                    "Too many files items: at most {max} distinct items per request \
                     (rag.max-items)"
                )));
            }
        }
    }
    Ok(out)
}

/// Retrieves sources for the `files` items of a chat request. Access is checked per item;
/// an unreadable item is an error naming it, never silently skipped. Items must already be
/// distinct ([`distinct_items`]); the injected text is bounded by `budget`.
pub async fn retrieve(
    app: &Retriever<'_>,
    identity: &Identity,
    items: &[Value],
    query: &str,
    budget: &mut Budget,
) -> Result<Vec<Source>, ApiError> {
    let cfg = &app.config.rag;
    let mode = Mode::from_config(cfg);
    let fuse = Fuse {
        fusion: cfg.fusion,
        bm25_weight: cfg.bm25_weight,
    };
    // Validate and resolve every item first, so nothing is embedded for a request that
    // will be refused.
    enum Target {
        File(FileRecord),
        Collection(crate::store::KnowledgeRecord, Vec<FileRecord>),
        Text(String),
    }
    let mut targets = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let kind = item_str(item, "type")
            .ok_or_else(|| ApiError::new(422, format!("files[{i}]: `type` is required")))?;
        let target = match kind {
            "file" => {
                let id = item_str(item, "id")
                    .ok_or_else(|| ApiError::new(422, format!("files[{i}]: `id` is required")))?;
                Target::File(usable_file(app, identity, id).await?)
            }
            "collection" => {
                let id = item_str(item, "id")
                    .ok_or_else(|| ApiError::new(422, format!("files[{i}]: `id` is required")))?;
                let kb = app
                    .store
                    .knowledge(id)?
                    .filter(|kb| access::can_read_kb(&identity.user, kb))
                    .ok_or_else(|| {
                        ApiError::not_found(format!("Knowledge collection {id} not found"))
                    })?;
                let mut files = Vec::new();
                for f in app.store.knowledge_files(&kb.id)? {
                    if let Some(rec) = app.store.file(&f)? {
                        files.push(rec);
                    }
                }
                Target::Collection(kb, files)
            }
            "text" => {
                let content = item.get("content").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::new(422, format!("files[{i}]: a text item needs `content`"))
                })?;
                budget.take(content.len())?;
                Target::Text(content.to_string())
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "files[{i}]: type {other:?} is not supported (use file, collection or text)"
                )));
            }
        };
        targets.push(target);
    }

    let full = |item: &Value| cfg.full_context || item_str(item, "context") == Some("full");
    let needs_vector = mode != Mode::Bm25
        && !query.trim().is_empty()
        && items
            .iter()
            .zip(&targets)
            .any(|(item, t)| !full(item) && !matches!(t, Target::Text(_)));
    let vector = if needs_vector {
        embed_query(app, query).await?
    } else {
        None
    };

    let search = |item: &Value, scope: Scope| {
        let limits = Limits {
            k: cfg.top_k,
            threshold: cfg.relevance_threshold,
        };
        search(
            app,
            echo(item),
            scope,
            query,
            vector.as_deref(),
            mode,
            fuse,
            limits,
        )
    };
    let mut sources = Vec::with_capacity(targets.len());
    for (item, target) in items.iter().zip(&targets) {
        let source = match (target, full(item)) {
            (Target::Text(content), _) => Source {
                source: echo(item),
                document: vec![content.clone()],
                metadata: vec![json!({
                    "source": item_str(item, "name").unwrap_or("text"),
                    "name": item_str(item, "name").unwrap_or("text"),
                })],
                distances: vec![1.0],
            },
            (Target::File(f), true) => whole_files(app, item, std::slice::from_ref(f), budget)?,
            (Target::Collection(_, files), true) => whole_files(app, item, files, budget)?,
            (Target::File(f), false) => search(item, Scope::File(&f.id))?,
            (Target::Collection(kb, _), false) => search(item, Scope::Collection(&kb.id))?,
        };
        if !matches!(target, Target::Text(_)) && !full(item) {
            budget.take(source.document.iter().map(String::len).sum())?;
        }
        sources.push(source);
    }
    Ok(sources)
}

/// The query's embedding, as every search of chat and the retrieval API gets it.
pub async fn embed_query(app: &Retriever<'_>, query: &str) -> Result<Option<Vec<f32>>, ApiError> {
    let embedder = app
        .ingest
        .embedder
        .as_ref()
        .map_err(|e| ApiError::new(503, format!("Embedding engine unavailable: {e}")))?;
    let mut v = embedder
        .embed(vec![query.to_string()])
        .await
        .map_err(|e| ApiError::new(502, format!("Embedding the query failed: {e}")))?;
    Ok(v.pop())
}

/// Whole documents for `context: "full"`.
fn whole_files(
    app: &Retriever<'_>,
    item: &Value,
    files: &[FileRecord],
    budget: &mut Budget,
) -> Result<Source, ApiError> {
    let mut s = Source {
        source: echo(item),
        document: Vec::new(),
        metadata: Vec::new(),
        distances: Vec::new(),
    };
    for f in files
        .iter()
        .filter(|f| f.status == Some(FileStatus::Completed))
    {
        if let Some(text) = app.store.file_text(&f.id)? {
            budget.take(text.len())?;
            s.document.push(text);
            s.metadata.push(json!({
                "file_id": f.id, "name": f.meta.get("name").cloned().unwrap_or(json!(f.filename)),
                "source": f.filename, "created_by": f.user_id, "hash": f.hash,
            }));
            s.distances.push(1.0);
        }
    }
    Ok(s)
}

/// How many chunks one search keeps, and the least relevance (cosine) they need.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub k: usize,
    pub threshold: f32,
}

/// Searches one file or collection: the ranking, de-duplication and scoring of chat's
/// retrieval, and of the retrieval API, which calls this same function.
#[allow(clippy::too_many_arguments)]
pub fn search(
    app: &Retriever<'_>,
    source: Value,
    scope: Scope,
    query: &str,
    vector: Option<&[f32]>,
    mode: Mode,
    fuse: Fuse,
    limits: Limits,
) -> Result<Source, ApiError> {
    let ranked = rank(app, scope, query, vector, mode, fuse, candidates(limits.k));
    select(app, source, ranked, vector, limits)
}

/// Top `k` distinct chunk texts of a ranking, scored by cosine to the query when known,
/// filtered by the relevance threshold.
fn select(
    app: &Retriever<'_>,
    source: Value,
    ranked: Vec<(u64, f32)>,
    vector: Option<&[f32]>,
    limits: Limits,
) -> Result<Source, ApiError> {
    let ids: Vec<u64> = ranked.iter().map(|r| r.0).collect();
    let chunks = app.store.chunks(&ids)?;
    let mut files: HashMap<String, Option<FileRecord>> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut s = Source {
        source,
        document: Vec::new(),
        metadata: Vec::new(),
        distances: Vec::new(),
    };
    for (id, chunk) in chunks {
        if s.document.len() >= limits.k {
            break;
        }
        let score = match vector {
            Some(q) => app
                .ingest
                .vectors
                .vector(&chunk.file_id, id)
                .map(|v| crate::index::dot(q, &v))
                .unwrap_or(0.0),
            None => ranked.iter().find(|r| r.0 == id).map_or(0.0, |r| r.1),
        };
        if vector.is_some() && score < limits.threshold {
            continue;
        }
        if !seen.insert(chunk.text.clone()) {
            continue;
        }
        let file = match files.entry(chunk.file_id.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            // A failing store is an error, not a file deleted meanwhile.
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(app.store.file(&chunk.file_id)?)
            }
        };
        let Some(file) = file else { continue };
        s.metadata.push(chunk_meta(app, file, &chunk, score));
        s.document.push(chunk.text);
        s.distances.push(score);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_rewards_agreement() {
        let dense = vec![(1, 0.9), (2, 0.8), (3, 0.1)];
        let lexical = vec![(2, 12.0), (3, 5.0)];
        let r = rrf(&dense, &lexical, 0.5);
        assert_eq!(r[0].0, 2, "in both lists");
        let c = convex(&dense, &lexical, 0.5);
        assert_eq!(c.len(), 3);
        assert_eq!(rrf(&dense, &[], 0.0)[0].0, 1);
        assert_eq!(convex(&[], &lexical, 1.0)[0].0, 2);
    }
}
