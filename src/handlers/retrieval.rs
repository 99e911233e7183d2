//! `/api/v1/retrieval/*`: Open WebUI's retrieval API over ragway's files and collections.
//!
//! Collection names are Open WebUI's: `file-{file_id}` for one file, the knowledge id for a
//! collection. Access is checked per name (an unreadable or missing one is a 404, never an
//! empty result), and ranking is [`rag::search`], the function chat retrieval uses.

use crate::forms::{ProcessTextForm, QueryCollectionsForm, QueryDocForm};
use crate::http::Session;
use serde_json::{Value, json};

use super::knowledge::{add_one, writable};
use super::{HandlerResult, Outcome, identity};
use crate::app::App;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::http::{self, Reply};
use crate::library::{Content, NewFile};
use crate::rag::{self, Fuse, Limits, Mode, Scope, Source};
use crate::request::RequestCtx;
use crate::store::FileStatus;

/// Longest query: far beyond any question, and the embedder truncates long inputs anyway.
const MAX_QUERY_BYTES: usize = 16 * 1024;
/// Most results one query may ask for.
const MAX_K: usize = 100;
/// Longest collection name (ids are UUIDs; `file-` adds 5 bytes).
const MAX_NAME_BYTES: usize = 256;
/// Largest `content` of `process/text`.
const MAX_TEXT_BYTES: usize = 8 * 1024 * 1024;
/// Longest `name` of `process/text` (it becomes a file name).
const MAX_TEXT_NAME_BYTES: usize = 255;

/// The search settings of one request, checked.
struct Settings {
    mode: Mode,
    fuse: Fuse,
    limits: Limits,
}

fn settings(
    app: &App,
    query: &str,
    k: Option<usize>,
    r: Option<f32>,
    hybrid: Option<bool>,
    weight: Option<f32>,
) -> Result<Settings, ApiError> {
    let cfg = &app.config.rag;
    if query.trim().is_empty() {
        return Err(ApiError::new(422, "query must not be empty"));
    }
    if query.len() > MAX_QUERY_BYTES {
        return Err(ApiError::new(
            413,
            format!("query is longer than {} KiB", MAX_QUERY_BYTES / 1024),
        ));
    }
    let k = k.unwrap_or(cfg.top_k);
    if k == 0 || k > MAX_K {
        return Err(ApiError::new(
            422,
            format!("k must be between 1 and {MAX_K}, got {k}"),
        ));
    }
    let threshold = r.unwrap_or(cfg.relevance_threshold);
    if !threshold.is_finite() || !(-1.0..=1.0).contains(&threshold) {
        return Err(ApiError::new(422, "r must be a number between -1 and 1"));
    }
    let bm25_weight = weight.unwrap_or(cfg.bm25_weight);
    if !bm25_weight.is_finite() || !(0.0..=1.0).contains(&bm25_weight) {
        return Err(ApiError::new(
            422,
            "hybrid_bm25_weight must be a number between 0 and 1",
        ));
    }
    let mode = match hybrid {
        None => Mode::from_config(cfg),
        Some(true) => Mode::Hybrid,
        Some(false) => Mode::Dense,
    };
    Ok(Settings {
        mode,
        fuse: Fuse {
            bm25_weight,
            ..Fuse::from_config(cfg)
        },
        limits: Limits::new(k, threshold),
    })
}

/// What a collection name stands for, once access is checked.
enum Target {
    File(String),
    Collection(String),
}

/// Resolves an Open WebUI collection name; anything the caller cannot read is a 404.
async fn resolve(app: &App, id: &Identity, name: &str) -> Result<Target, ApiError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(ApiError::new(
            422,
            format!("collection names are 1 to {MAX_NAME_BYTES} bytes long"),
        ));
    }
    let retriever = app.retriever();
    if let Some(file_id) = name.strip_prefix("file-") {
        return Ok(Target::File(
            rag::usable_file(&retriever, id, file_id).await?.id,
        ));
    }
    match rag::readable_collection(&retriever, &id.user, name).await? {
        Some(kb) => Ok(Target::Collection(kb.id)),
        None => Err(ApiError::not_found(format!("Collection {name} not found"))),
    }
}

async fn search_all(
    app: &App,
    id: &Identity,
    names: &[String],
    query: &str,
    s: &Settings,
) -> Result<Vec<Source>, ApiError> {
    // Every name is checked before anything is embedded.
    let mut targets = Vec::with_capacity(names.len());
    for name in names {
        targets.push(resolve(app, id, name).await?);
    }
    let retriever = app.retriever();
    let vector = if s.mode == Mode::Bm25 {
        None
    } else {
        rag::embed_query(&retriever, query).await?
    };
    let mut out = Vec::with_capacity(targets.len());
    for (name, target) in names.iter().zip(&targets) {
        let scope = match target {
            Target::File(f) => Scope::File(f),
            Target::Collection(kb) => Scope::Collection(kb),
        };
        out.push(
            rag::search(
                &retriever,
                json!({"collection_name": name}),
                scope,
                query,
                vector.as_deref(),
                s.mode,
                s.fuse,
                s.limits,
            )
            .await?,
        );
    }
    Ok(out)
}

/// Open WebUI's query result: one list per query (ragway answers one query).
fn result_json(documents: &[String], metadatas: &[Value], distances: &[f32]) -> Value {
    json!({
        "distances": [distances],
        "documents": [documents],
        "metadatas": [metadatas],
    })
}

pub async fn query_doc(app: &App, session: &mut Session, ctx: &RequestCtx) -> HandlerResult {
    let id = identity(ctx)?;
    let body = http::read_body(session, 64 * 1024).await?;
    let form: QueryDocForm = http::parse_json(&body)?;
    let _ = form.k_reranker;
    let s = settings(
        app,
        &form.query,
        form.k,
        form.r,
        form.hybrid,
        form.hybrid_bm25_weight,
    )?;
    let mut sources = search_all(
        app,
        id,
        std::slice::from_ref(&form.collection_name),
        &form.query,
        &s,
    )
    .await?;
    let src = sources.pop().expect("one name, one source");
    Ok(Outcome::Reply(Reply::ok(&result_json(
        &src.document,
        &src.metadata,
        &src.distances,
    ))))
}

/// Several names: each searched as `query/doc` would, then merged by score (best first),
/// identical texts once, the top `k` kept (Open WebUI's `query_collection`).
pub async fn query_collection(app: &App, session: &mut Session, ctx: &RequestCtx) -> HandlerResult {
    let id = identity(ctx)?;
    let body = http::read_body(session, 256 * 1024).await?;
    let form: QueryCollectionsForm = http::parse_json(&body)?;
    let _ = form.k_reranker;
    let s = settings(
        app,
        &form.query,
        form.k,
        form.r,
        form.hybrid,
        form.hybrid_bm25_weight,
    )?;
    if form.collection_names.is_empty() {
        return Err(ApiError::new(422, "collection_names must not be empty"));
    }
    let max = app.config.rag.max_items;
    let mut names: Vec<String> = Vec::new();
    for n in form.collection_names {
        if !names.contains(&n) {
            names.push(n);
        }
        if names.len() > max {
            return Err(ApiError::new(
                413,
                format!("Too many collection_names: at most {max} (rag.max-items)"),
            ));
        }
    }
    let sources = search_all(app, id, &names, &form.query, &s).await?;
    let mut hits: Vec<(f32, String, Value)> = sources
        .into_iter()
        .flat_map(|src| {
            src.distances
                .into_iter()
                .zip(src.document)
                .zip(src.metadata)
                .map(|((d, t), m)| (d, t, m))
        })
        .collect();
    hits.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut seen = std::collections::HashSet::new();
    let (mut documents, mut metadatas, mut distances) = (Vec::new(), Vec::new(), Vec::new());
    for (d, t, m) in hits {
        if documents.len() >= s.limits.k {
            break;
        }
        if seen.insert(t.clone()) {
            documents.push(t);
            metadatas.push(m);
            distances.push(d);
        }
    }
    Ok(Outcome::Reply(Reply::ok(&result_json(
        &documents, &metadatas, &distances,
    ))))
}

/// The stored file name of a text: its name, made a `.txt` unless it already names text,
/// so extraction reads it as text whatever the name suggests.
fn text_filename(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    if [".txt", ".md", ".markdown"]
        .iter()
        .any(|e| lower.ends_with(e))
    {
        name.to_string()
    } else {
        format!("{name}.txt")
    }
}

/// Checks `process/text`'s name and content; returns the trimmed name.
fn check_text(form: &ProcessTextForm, limit: usize) -> Result<&str, ApiError> {
    let name = form.name.trim();
    if name.is_empty() || name.len() > MAX_TEXT_NAME_BYTES {
        return Err(ApiError::new(
            422,
            format!("name must be 1 to {MAX_TEXT_NAME_BYTES} bytes long"),
        ));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == '/' || c == '\\')
    {
        return Err(ApiError::bad_request(
            "name must not contain control characters or path separators",
        ));
    }
    if form.content.trim().is_empty() {
        return Err(ApiError::new(422, "content must not be empty"));
    }
    if form.content.len() > limit {
        return Err(ApiError::new(
            413,
            format!("content is larger than {} KiB", limit / 1024),
        ));
    }
    Ok(name)
}

/// `POST /retrieval/process/text`: stores `content` as a text file owned by the caller,
/// processes it through the upload pipeline (inline, bounded like inline uploads), and
/// adds it to `collection_name` (a collection the caller can write) when given.
pub async fn process_text(app: &App, session: &mut Session, ctx: &RequestCtx) -> HandlerResult {
    let id = identity(ctx)?.clone();
    let limit =
        MAX_TEXT_BYTES.min(usize::try_from(app.config.rag.file_max_bytes).unwrap_or(usize::MAX));
    // JSON escaping can double the text; the content itself is checked after parsing.
    let body = http::read_body(session, limit * 2 + 64 * 1024).await?;
    let form: ProcessTextForm = http::parse_json(&body)?;
    drop(body);
    let name = check_text(&form, limit)?;
    let kb = match form.collection_name.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => Some(writable(app, &id.user, c).await?),
        None => None,
    };
    let ticket = app.ingest.inline_ticket().ok_or_else(|| {
        ApiError::new(
            503,
            format!(
                "Too many uploads are waiting for inline processing (at most {}); retry later",
                app.ingest.inline_queue
            ),
        )
    })?;
    let file_id = uuid::Uuid::new_v4().to_string();
    let filename = text_filename(name);
    let hash = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(form.content.as_bytes()))
    };
    let new = NewFile {
        user_id: id.user.id.clone(),
        filename: filename.clone(),
        name: name.to_string(),
        content_type: "text/plain".into(),
        size: form.content.len() as u64,
        sha256: hash,
        data: json!({}),
        process: true,
    };
    let library = app.library();
    let record = library
        .create_file(
            file_id.clone(),
            new,
            Content::Bytes(form.content.as_bytes()),
        )
        .await?;
    let record = app
        .ingest
        .process_inline(&ticket, &file_id)
        .await
        .unwrap_or(record);
    drop(ticket);
    if record.status == Some(FileStatus::Failed) {
        // Nothing searchable came of it: the failed file is not kept.
        library.delete_file(&file_id).await?;
        return Err(ApiError::bad_request(format!(
            "The text could not be processed: {}",
            record.error.as_deref().unwrap_or("unknown error")
        )));
    }
    let collection_name = match kb {
        Some(mut kb) => {
            add_one(app, &id.user, &kb, &file_id, app.config.rag.file_add_wait).await?;
            library.save_collection(&mut kb).await?;
            kb.id
        }
        None => format!("file-{file_id}"),
    };
    Ok(Outcome::Reply(Reply::ok(&json!({
        "status": true,
        "collection_name": collection_name,
        "file_id": file_id,
        "filename": filename,
        "content": form.content,
    }))))
}
