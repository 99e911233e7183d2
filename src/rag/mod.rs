//! Retrieval-augmented generation for `/api/chat/completions` with `files`.
//!
//! One query embedding per request; each item (file, collection, inline text) is searched
//! on its own, by dense vectors, BM25, or both fused; identical chunk texts are collapsed;
//! the top `k` per item become a source. [`prompt`] turns sources into the context string
//! and injects it. The same search functions serve `ragway eval`, so the quality measured
//! there is the quality chat gets.

pub mod budget;
mod error;
pub mod prompt;

pub use error::RetrieveError;

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde_json::{Value, json};

use crate::auth::Identity;
use crate::auth::access;
use crate::config::{Config, Fusion, RagConfig};
use crate::ingest::{Ingest, NotUsable};
use crate::storage::{ChunkRef, Chunks, Metadata};
use crate::store::{ChunkRecord, FileRecord, FileStatus, KnowledgeRecord, User};

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

impl Scope<'_> {
    /// The storage seam's scope of this one file or collection.
    fn seam(self) -> crate::storage::Scope {
        match self {
            Scope::File(f) => crate::storage::Scope {
                collections: Vec::new(),
                files: vec![f.to_string()],
            },
            Scope::Collection(c) => crate::storage::Scope {
                collections: vec![c.to_string()],
                files: Vec::new(),
            },
        }
    }
}

/// Ranking settings.
#[derive(Debug, Clone, Copy)]
pub struct Fuse {
    pub fusion: Fusion,
    pub bm25_weight: f32,
    pub bm25: crate::index::bm25::Bm25Params,
    /// Weight of a file's other candidate chunks in each chunk's score (0: best chunk only).
    pub file_weight: f32,
    /// Weight of the top dense hits' mean vector added to the query vector for a second
    /// dense search (pseudo-relevance feedback; 0: off).
    pub prf: f32,
}

impl Fuse {
    pub fn from_config(cfg: &RagConfig) -> Fuse {
        Fuse {
            fusion: cfg.fusion,
            bm25_weight: cfg.bm25_weight,
            bm25: crate::index::bm25::Bm25Params {
                k1: cfg.bm25_k1,
                b: cfg.bm25_b,
            },
            ..Fuse::default()
        }
    }
}

impl Default for Fuse {
    fn default() -> Self {
        Fuse {
            fusion: Fusion::Convex,
            bm25_weight: 0.5,
            bm25: crate::index::bm25::Bm25Params::default(),
            file_weight: 0.0,
            prf: 0.0,
        }
    }
}

/// Hits the dense feedback vector is built from.
const PRF_DOCS: usize = 3;

/// `q + weight * mean(hits)`, unit length again (cosine search expects unit vectors).
pub fn feedback_vector(query: &[f32], hits: &[Vec<f32>], weight: f32) -> Vec<f32> {
    let mut v = query.to_vec();
    if !hits.is_empty() {
        let w = weight / hits.len() as f32;
        for h in hits {
            for (x, y) in v.iter_mut().zip(h) {
                *x += w * y;
            }
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Each chunk's score plus `weight` times the (positive) scores of the other candidate
/// chunks of its file, re-sorted: a file that matches in several places ranks above one
/// that matches once as strongly.
pub fn with_file_evidence(
    ranked: &[(u64, f32)],
    file_of: &HashMap<u64, String>,
    weight: f32,
) -> Vec<(u64, f32)> {
    let mut per_file: HashMap<&str, f32> = HashMap::new();
    for (id, s) in ranked {
        if let Some(f) = file_of.get(id) {
            *per_file.entry(f).or_default() += s.max(0.0);
        }
    }
    let scores: HashMap<u64, f32> = ranked
        .iter()
        .map(|(id, s)| {
            let others = file_of
                .get(id)
                .map_or(0.0, |f| per_file[f.as_str()] - s.max(0.0));
            (*id, s + weight * others)
        })
        .collect();
    sorted(scores)
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
    weighted(
        &normalised(dense, Norm::Max),
        &normalised(lexical, Norm::Max),
        bm25_weight,
    )
}

/// How a list's scores are put on a common scale before a weighted sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// `s / max`: keeps cosine's offset, so dense scores bunch near 1 and BM25 decides.
    Max,
    /// `(s - min) / (max - min)` over the candidates: both lists span [0, 1].
    MinMax,
    /// `(s - mean) / sd` over the candidates.
    ZScore,
}

/// Scores of one candidate list on the scale of `norm`. An empty or constant list maps to
/// 1.0 for every entry (each is as good as the best).
pub fn normalised(list: &[(u64, f32)], norm: Norm) -> Vec<(u64, f32)> {
    if list.is_empty() {
        return Vec::new();
    }
    let n = list.len() as f32;
    let max = list.iter().map(|x| x.1).fold(f32::MIN, f32::max);
    let min = list.iter().map(|x| x.1).fold(f32::MAX, f32::min);
    let scale = |s: f32| -> f32 {
        match norm {
            Norm::Max => (s / max.max(1e-6)).max(0.0),
            Norm::MinMax if max - min > 1e-9 => (s - min) / (max - min),
            Norm::ZScore => {
                let mean = list.iter().map(|x| x.1).sum::<f32>() / n;
                let var = list.iter().map(|x| (x.1 - mean).powi(2)).sum::<f32>() / n;
                if var > 1e-12 {
                    (s - mean) / var.sqrt()
                } else {
                    1.0
                }
            }
            Norm::MinMax => 1.0,
        }
    };
    list.iter().map(|(id, s)| (*id, scale(*s))).collect()
}

/// `(1 - w) * dense + w * lexical` over normalised lists; an id missing from one list gets
/// that list's lowest normalised score (it ranked below every candidate there), or 0 when
/// that is higher (max normalisation: absence is no evidence).
pub fn weighted(dense: &[(u64, f32)], lexical: &[(u64, f32)], bm25_weight: f32) -> Vec<(u64, f32)> {
    let floor = |l: &[(u64, f32)]| l.iter().map(|x| x.1).fold(0.0f32, f32::min);
    let (dfloor, lfloor) = (floor(dense), floor(lexical));
    let d: HashMap<u64, f32> = dense.iter().copied().collect();
    let l: HashMap<u64, f32> = lexical.iter().copied().collect();
    let mut scores: HashMap<u64, f32> = HashMap::with_capacity(d.len() + l.len());
    for id in d.keys().chain(l.keys()) {
        let ds = d.get(id).copied().unwrap_or(dfloor);
        let ls = l.get(id).copied().unwrap_or(lfloor);
        scores.insert(*id, (1.0 - bm25_weight) * ds + bm25_weight * ls);
    }
    sorted(scores)
}

fn sorted(scores: HashMap<u64, f32>) -> Vec<(u64, f32)> {
    let mut v: Vec<(u64, f32)> = scores.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// What retrieval reads: the settings, the storage seams (files, collections, chunks and
/// their searches) and the ingestion side (processing waits, the embedder). Built by the
/// wiring ([`crate::app::App::retriever`]), so retrieval needs nothing above it.
#[derive(Clone, Copy)]
pub struct Retriever<'a> {
    pub config: &'a Config,
    pub meta: &'a dyn Metadata,
    pub chunks: &'a dyn Chunks,
    pub ingest: &'a Ingest,
}

/// Ranks chunk ids of `scope` for one query. `vector` is needed unless `mode` is BM25.
///
/// # Errors
/// The storage backend failed, or BM25 parameters were set on a backend without them.
pub async fn rank(
    app: &Retriever<'_>,
    scope: Scope<'_>,
    query: &str,
    vector: Option<&[f32]>,
    mode: Mode,
    fuse: Fuse,
    n: usize,
) -> Result<Vec<(u64, f32)>, RetrieveError> {
    let chunks = app.chunks;
    let within = scope.seam();
    let within = &within;
    let dense = async {
        let Some(v) = vector else {
            return Ok(Vec::new());
        };
        let first = chunks.dense_search(within, v, n).await?;
        if fuse.prf <= 0.0 {
            return Ok(first);
        }
        let top: Vec<u64> = first.iter().take(PRF_DOCS).map(|r| r.0).collect();
        let records = chunks.chunks(&top).await?;
        let refs: Vec<ChunkRef<'_>> = records
            .iter()
            .map(|(id, c)| (*id, c.file_id.as_str()))
            .collect();
        let hits: Vec<Vec<f32>> = chunks.vectors(&refs).await?.into_iter().flatten().collect();
        Ok::<_, RetrieveError>(
            chunks
                .dense_search(within, &feedback_vector(v, &hits, fuse.prf), n)
                .await?,
        )
    };
    let lexical = async {
        // The defaults go through the plain search, which every backend has.
        if fuse.bm25 == crate::index::bm25::Bm25Params::default() {
            return Ok(chunks.lexical_search(within, query, n).await?);
        }
        chunks
            .lexical_search_with(within, query, n, fuse.bm25)
            .await?
            .ok_or(RetrieveError::Bm25ParamsUnsupported)
    };
    Ok(match mode {
        Mode::Dense => dense.await?,
        Mode::Bm25 => lexical.await?,
        Mode::Hybrid => {
            // Together: on a networked backend the two searches overlap.
            let (d, l) = tokio::try_join!(dense, lexical)?;
            let mut fused = match fuse.fusion {
                Fusion::Rrf => rrf(&d, &l, fuse.bm25_weight),
                Fusion::Convex => convex(&d, &l, fuse.bm25_weight),
                Fusion::MinMax => weighted(
                    &normalised(&d, Norm::MinMax),
                    &normalised(&l, Norm::MinMax),
                    fuse.bm25_weight,
                ),
                Fusion::ZScore => weighted(
                    &normalised(&d, Norm::ZScore),
                    &normalised(&l, Norm::ZScore),
                    fuse.bm25_weight,
                ),
            };
            fused.truncate(n);
            fused
        }
    })
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

/// File `id` when `user` may read it; `None` when it is missing or not theirs to read (the
/// two are not told apart).
///
/// # Errors
/// The storage backend failed.
pub async fn readable_file(
    app: &Retriever<'_>,
    user: &User,
    id: &str,
) -> Result<Option<FileRecord>, RetrieveError> {
    let Some(f) = app.meta.file(id).await? else {
        return Ok(None);
    };
    Ok(access::can_read_file(app.meta, user, &f)
        .await?
        .then_some(f))
}

/// Collection `id` when `user` may read it; `None` when it is missing or not theirs to read.
///
/// # Errors
/// The storage backend failed.
pub async fn readable_collection(
    app: &Retriever<'_>,
    user: &User,
    id: &str,
) -> Result<Option<KnowledgeRecord>, RetrieveError> {
    Ok(app
        .meta
        .knowledge(id)
        .await?
        .filter(|kb| access::can_read_kb(user, kb)))
}

/// A file the caller may read and that is processed, waiting (bounded) for one still
/// being processed: asking right after an upload must not see an empty context.
///
/// # Errors
/// Missing or unreadable, still processing, failed or never processed; or the storage
/// backend failed.
pub async fn usable_file(
    app: &Retriever<'_>,
    identity: &Identity,
    id: &str,
) -> Result<FileRecord, RetrieveError> {
    let missing = || RetrieveError::FileNotFound(id.to_string());
    let f = readable_file(app, &identity.user, id)
        .await?
        .ok_or_else(missing)?;
    app.ingest
        .processed(f, app.config.rag.file_add_wait)
        .await
        .map_err(|e| match e {
            NotUsable::Gone => missing(),
            NotUsable::StillProcessing => RetrieveError::StillProcessing(id.to_string()),
            NotUsable::Failed(error) => RetrieveError::FileFailed {
                id: id.to_string(),
                error,
            },
            NotUsable::NotProcessed => RetrieveError::NotProcessed(id.to_string()),
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

    /// Counts `bytes` of injected text.
    ///
    /// # Errors
    /// [`RetrieveError::TooMuchContext`] beyond the limit.
    pub fn take(&mut self, bytes: usize) -> Result<(), RetrieveError> {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(too_much_context(self.limit)),
        }
    }
}

/// The refusal of a request whose context exceeds `limit` bytes (a 413).
#[must_use]
pub fn too_much_context(limit: usize) -> RetrieveError {
    RetrieveError::TooMuchContext { limit }
}

/// Identical items (same type, id, context mode, or the same inline text) are searched and
/// injected once; more than `max` distinct items is a 400. Repeating one item must not
/// multiply the work or the injected text.
///
/// # Errors
/// [`RetrieveError::TooManyItems`].
pub fn distinct_items(items: &[Value], max: usize) -> Result<Vec<Value>, RetrieveError> {
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
                return Err(RetrieveError::TooManyItems { max });
            }
        }
    }
    Ok(out)
}

/// Retrieves sources for the `files` items of a chat request. Access is checked per item;
/// an unreadable item is an error naming it, never silently skipped. Items must already be
/// distinct ([`distinct_items`]); the injected text is bounded by `budget`.
///
/// # Errors
/// An item is malformed, missing or unreadable, the context is over budget, the query
/// cannot be embedded, or the storage backend failed.
pub async fn retrieve(
    app: &Retriever<'_>,
    identity: &Identity,
    items: &[Value],
    query: &str,
    budget: &mut Budget,
) -> Result<Vec<Source>, RetrieveError> {
    let cfg = &app.config.rag;
    let mode = Mode::from_config(cfg);
    let fuse = Fuse::from_config(cfg);
    // Validate and resolve every item first, so nothing is embedded for a request that
    // will be refused.
    enum Target {
        File(FileRecord),
        Collection(KnowledgeRecord, Vec<FileRecord>),
        Text(String),
    }
    let full = |item: &Value| cfg.full_context || item_str(item, "context") == Some("full");
    let mut targets = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let missing = |message| RetrieveError::MissingField { index: i, message };
        let kind = item_str(item, "type").ok_or_else(|| missing("`type` is required"))?;
        let target = match kind {
            "file" => {
                let id = item_str(item, "id").ok_or_else(|| missing("`id` is required"))?;
                Target::File(usable_file(app, identity, id).await?)
            }
            "collection" => {
                let id = item_str(item, "id").ok_or_else(|| missing("`id` is required"))?;
                let kb = readable_collection(app, &identity.user, id)
                    .await?
                    .ok_or_else(|| RetrieveError::CollectionNotFound(id.to_string()))?;
                // Only full context needs the collection's file records: reading them for a
                // search cost one store read per file (5,000 abstracts: several ms per request).
                let mut files = Vec::new();
                if full(item) {
                    for f in app.meta.knowledge_files(&kb.id).await? {
                        if let Some(rec) = app.meta.file(&f).await? {
                            files.push(rec);
                        }
                    }
                }
                Target::Collection(kb, files)
            }
            "text" => {
                let content = item
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| missing("a text item needs `content`"))?;
                budget.take(content.len())?;
                Target::Text(content.to_string())
            }
            other => {
                return Err(RetrieveError::UnsupportedType {
                    index: i,
                    kind: other.to_string(),
                });
            }
        };
        targets.push(target);
    }

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

    let limits = Limits::new(cfg.top_k, cfg.relevance_threshold);
    let vector = vector.as_deref();
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
            (Target::File(f), true) => {
                whole_files(app, item, std::slice::from_ref(f), budget).await?
            }
            (Target::Collection(_, files), true) => whole_files(app, item, files, budget).await?,
            (Target::File(f), false) => {
                let scope = Scope::File(&f.id);
                search(app, echo(item), scope, query, vector, mode, fuse, limits).await?
            }
            (Target::Collection(kb, _), false) => {
                let scope = Scope::Collection(&kb.id);
                search(app, echo(item), scope, query, vector, mode, fuse, limits).await?
            }
        };
        if !matches!(target, Target::Text(_)) && !full(item) {
            budget.take(source.document.iter().map(String::len).sum())?;
        }
        sources.push(source);
    }
    Ok(sources)
}

/// The query's embedding, as every search of chat and the retrieval API gets it.
///
/// # Errors
/// The embedding engine is unavailable or failed.
pub async fn embed_query(
    app: &Retriever<'_>,
    query: &str,
) -> Result<Option<Vec<f32>>, RetrieveError> {
    let embedder = app
        .ingest
        .embedder
        .as_ref()
        .map_err(|e| RetrieveError::EmbedderUnavailable(e.to_string()))?;
    let v = embedder
        .embed_query(query.to_string())
        .await
        .map_err(|e| RetrieveError::EmbedFailed(e.to_string()))?;
    Ok(Some(v))
}

/// Whole documents for `context: "full"`.
async fn whole_files(
    app: &Retriever<'_>,
    item: &Value,
    files: &[FileRecord],
    budget: &mut Budget,
) -> Result<Source, RetrieveError> {
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
        if let Some(text) = app.meta.file_text(&f.id).await? {
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
    /// Chunks fetched from each ranking before fusion and de-duplication (>= `k`).
    pub candidates: usize,
}

impl Limits {
    /// `k` chunks from chat's number of candidates.
    pub fn new(k: usize, threshold: f32) -> Limits {
        Limits {
            k,
            threshold,
            candidates: candidates(k),
        }
    }
}

/// Searches one file or collection: the ranking, de-duplication and scoring of chat's
/// retrieval, and of the retrieval API, which calls this same function.
///
/// # Errors
/// See [`rank`]; or the storage backend failed reading the chunks.
#[allow(clippy::too_many_arguments)]
pub async fn search(
    app: &Retriever<'_>,
    source: Value,
    scope: Scope<'_>,
    query: &str,
    vector: Option<&[f32]>,
    mode: Mode,
    fuse: Fuse,
    limits: Limits,
) -> Result<Source, RetrieveError> {
    let ranked = rank(app, scope, query, vector, mode, fuse, limits.candidates).await?;
    select(app, source, ranked, vector, limits, fuse.file_weight).await
}

/// Top `k` distinct chunk texts of a ranking, scored by cosine to the query when known,
/// filtered by the relevance threshold.
async fn select(
    app: &Retriever<'_>,
    source: Value,
    ranked: Vec<(u64, f32)>,
    vector: Option<&[f32]>,
    limits: Limits,
    file_weight: f32,
) -> Result<Source, RetrieveError> {
    let ids: Vec<u64> = ranked.iter().map(|r| r.0).collect();
    let mut chunks = app.chunks.chunks(&ids).await?;
    let ranked = if file_weight > 0.0 {
        let file_of: HashMap<u64, String> = chunks
            .iter()
            .map(|(id, c)| (*id, c.file_id.clone()))
            .collect();
        let ranked = with_file_evidence(&ranked, &file_of, file_weight);
        let order: HashMap<u64, usize> = ranked.iter().enumerate().map(|(i, r)| (r.0, i)).collect();
        chunks.sort_by_key(|(id, _)| order[id]);
        ranked
    } else {
        ranked
    };
    // Every candidate's cosine in one call: a networked backend answers in one round trip,
    // the embedded one scores in place.
    let cosines = match vector {
        Some(q) => {
            let refs: Vec<ChunkRef<'_>> = chunks
                .iter()
                .map(|(id, c)| (*id, c.file_id.as_str()))
                .collect();
            app.chunks.similarities(q, &refs).await?
        }
        None => Vec::new(),
    };
    let mut files: HashMap<String, Option<FileRecord>> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut s = Source {
        source,
        document: Vec::new(),
        metadata: Vec::new(),
        distances: Vec::new(),
    };
    for (i, (id, chunk)) in chunks.into_iter().enumerate() {
        if s.document.len() >= limits.k {
            break;
        }
        let score = match vector {
            Some(_) => cosines.get(i).copied().flatten().unwrap_or(0.0),
            None => ranked.iter().find(|r| r.0 == id).map_or(0.0, |r| r.1),
        };
        if vector.is_some() && score < limits.threshold {
            continue;
        }
        if !seen.insert(chunk.text.clone()) {
            continue;
        }
        if !files.contains_key(&chunk.file_id) {
            // A failing store is an error, not a file deleted meanwhile.
            let record = app.meta.file(&chunk.file_id).await?;
            files.insert(chunk.file_id.clone(), record);
        }
        let Some(Some(file)) = files.get(&chunk.file_id) else {
            continue;
        };
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

    #[test]
    fn normalisations_match_hand_computation() {
        let l = vec![(1, 4.0), (2, 2.0), (3, 0.0)];
        assert_eq!(
            normalised(&l, Norm::Max),
            vec![(1, 1.0), (2, 0.5), (3, 0.0)]
        );
        let m = normalised(&[(1, 0.8), (2, 0.6), (3, 0.4)], Norm::MinMax);
        assert!((m[0].1 - 1.0).abs() < 1e-6 && (m[1].1 - 0.5).abs() < 1e-6 && m[2].1.abs() < 1e-6);
        // mean 2, population sd sqrt(8/3)
        let z = normalised(&l, Norm::ZScore);
        let sd = (8.0f32 / 3.0).sqrt();
        assert!((z[0].1 - 2.0 / sd).abs() < 1e-6 && z[1].1.abs() < 1e-6);
        assert!((z[2].1 + 2.0 / sd).abs() < 1e-6);
        // A single candidate (or equal scores) is as good as the best.
        assert_eq!(normalised(&[(9, 0.3)], Norm::MinMax), vec![(9, 1.0)]);
        assert_eq!(normalised(&[(9, 0.3), (8, 0.3)], Norm::ZScore)[1].1, 1.0);
        assert!(normalised(&[], Norm::MinMax).is_empty());
    }

    #[test]
    fn weighted_sum_gives_a_missing_entry_the_lists_floor() {
        let dense = vec![(1, 1.0), (2, 0.0)];
        let lexical = vec![(2, 1.0), (3, 0.5)];
        let r = weighted(&dense, &lexical, 0.25);
        let get = |id| r.iter().find(|x| x.0 == id).unwrap().1;
        assert!(
            (get(1) - 0.75).abs() < 1e-6,
            "absent from BM25: its floor 0"
        );
        assert!((get(2) - 0.25).abs() < 1e-6);
        assert!((get(3) - 0.125).abs() < 1e-6);
        assert_eq!(r[0].0, 1);
        // z-scores go below zero: absence counts as the lowest candidate, not as 0.
        let z = weighted(&[(1, 1.0), (2, -1.0)], &[(2, 1.0), (3, -1.0)], 0.5);
        let get = |id| z.iter().find(|x| x.0 == id).unwrap().1;
        assert!((get(1) - 0.0).abs() < 1e-6 && (get(2) - 0.0).abs() < 1e-6);
        assert!((get(3) + 1.0).abs() < 1e-6);
        // Convex with max normalisation is unchanged: 0.5 * 1 + 0.5 * (5 / 12).
        let c = convex(&[(1, 0.9), (2, 0.45)], &[(2, 12.0), (3, 5.0)], 0.5);
        assert!((c.iter().find(|x| x.0 == 3).unwrap().1 - 0.5 * 5.0 / 12.0).abs() < 1e-6);
        assert!((c.iter().find(|x| x.0 == 2).unwrap().1 - 0.75).abs() < 1e-6);
    }

    #[test]
    fn file_evidence_lifts_files_that_match_in_several_chunks() {
        let ranked = vec![(1, 0.9), (2, 0.8), (3, 0.5), (4, -0.2)];
        let file_of: HashMap<u64, String> = [(1, "a"), (2, "b"), (3, "b"), (4, "b")]
            .iter()
            .map(|(i, f)| (*i, (*f).to_string()))
            .collect();
        let r = with_file_evidence(&ranked, &file_of, 0.6);
        // b's chunks gain 0.6 × the others' positive scores (b's total is 1.3); a has none.
        let want = [
            (2, 0.8 + 0.6 * 0.5),
            (3, 0.5 + 0.6 * 0.8),
            (1, 0.9),
            (4, -0.2 + 0.6 * 1.3),
        ];
        assert_eq!(r.len(), want.len());
        for (got, want) in r.iter().zip(want) {
            assert_eq!(got.0, want.0, "{r:?}");
            assert!((got.1 - want.1).abs() < 1e-5, "{r:?}");
        }
        assert_eq!(with_file_evidence(&ranked, &file_of, 0.0), ranked);
    }

    #[test]
    fn feedback_moves_the_query_toward_the_hits_and_stays_unit() {
        let q = [1.0, 0.0];
        let v = feedback_vector(&q, &[vec![0.0, 1.0], vec![0.0, 1.0]], 1.0);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((v[0] - h).abs() < 1e-6 && (v[1] - h).abs() < 1e-6);
        assert_eq!(feedback_vector(&q, &[], 1.0), vec![1.0, 0.0]);
    }
}
