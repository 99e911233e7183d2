//! `/api/v1/files/*`: upload (streamed to disk), listing, status, content, delete.

use std::io;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{HandlerResult, Outcome, Req, Streamer, access, identity, query};
use crate::app::App;
use crate::error::{ApiError, msg};
use crate::http::{self, Reply, Session};
use crate::library::{Content, NewFile};
use crate::request::RequestCtx;
use crate::store::{FileRecord, FileStatus, Role};

const PAGE_SIZE: usize = 50;
/// Bytes of extracted text one listing page carries in total (`content=true`).
const LIST_CONTENT_BUDGET: usize = 2 * 1024 * 1024;
/// Longest a status stream stays open for a file that is still queued or processing.
const STATUS_STREAM_MAX: std::time::Duration = std::time::Duration::from_mins(15);

/// `data` of a file: status, error and (optionally) the extracted content.
fn data_json(f: &FileRecord, content: Option<String>) -> Value {
    let mut d = json!({});
    if let Some(s) = f.status {
        d["status"] = json!(s.as_str());
    }
    if let Some(e) = &f.error {
        d["error"] = json!(e);
    }
    if let Some(c) = content {
        d["content"] = json!(c);
    }
    d
}

/// The `path` clients see: a storage key relative to the data directory
/// (`uploads/{id}_{name}`). Open WebUI returns the server's absolute path here; that would
/// tell every user where the gateway keeps its data (its user name, mounts, layout), which
/// is useful only to an attacker, and no client can open it anyway. Clients treat the
/// field as opaque.
fn storage_key(f: &FileRecord) -> String {
    let name = std::path::Path::new(&f.path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("uploads/{name}")
}

/// Open WebUI's `FileModel` shape.
pub fn file_json(f: &FileRecord, content: Option<String>) -> Value {
    json!({
        "id": f.id,
        "user_id": f.user_id,
        "hash": f.hash,
        "filename": f.filename,
        "path": storage_key(f),
        "data": data_json(f, content),
        "meta": f.meta,
        "created_at": f.created_at,
        "updated_at": f.updated_at,
    })
}

/// A file the caller may read, or the 404 that hides whether it exists.
pub async fn readable_file(app: &App, ctx: &RequestCtx, id: &str) -> Result<FileRecord, ApiError> {
    let user = &identity(ctx)?.user;
    match app.library().file(id).await? {
        Some(f) if access::can_read_file(app.storage.meta.as_ref(), user, &f).await? => Ok(f),
        _ => Err(ApiError::not_found(msg::NOT_FOUND)),
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        413,
        format!(
            "Oops! The file you're trying to upload is too large. Please upload a file that is less than {} MB.",
            limit / (1024 * 1024)
        ),
    )
}

fn extension(name: &str) -> String {
    std::path::Path::new(name)
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Largest `metadata` field: a small JSON object (Open WebUI sends a few ids).
const METADATA_MAX: u64 = 64 * 1024;
/// Largest field of any other name; such fields are read and ignored, as Open WebUI's form
/// parser ignores them, but they cannot be used to make the gateway buffer or skip much.
const OTHER_FIELD_MAX: u64 = 1024;
/// Most parts in one upload.
const MAX_FIELDS: usize = 16;
/// Largest part header block (and preamble before the first boundary): multer keeps these
/// bytes in memory until the blank line that ends them, whatever their length.
const PART_HEADER_MAX: usize = 16 * 1024;
/// Longest file name, in bytes (what file systems allow for one name).
const FILENAME_MAX: usize = 255;

/// Largest whole multipart body for a file limit: the file plus everything else a valid
/// upload can hold. A chunked body (no `Content-Length`) is stopped there while streaming.
fn body_limit(file_limit: u64) -> u64 {
    file_limit
        + METADATA_MAX
        + (MAX_FIELDS * PART_HEADER_MAX) as u64
        + MAX_FIELDS as u64 * OTHER_FIELD_MAX
}

/// Why the request body stream stopped, as seen by multer.
#[derive(Debug)]
enum BodyError {
    /// The client's body could not be read (disconnect, bad chunked encoding).
    Read(String),
    /// A part header (or the preamble) grew past [`PART_HEADER_MAX`].
    PartHeaderTooLarge,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Read(e) => write!(f, "reading the request body failed: {e}"),
            BodyError::PartHeaderTooLarge => write!(f, "a part header is too large"),
        }
    }
}

impl std::error::Error for BodyError {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Region {
    Preamble,
    Headers,
    Body,
}

/// Watches the raw multipart bytes for the regions multer buffers without a limit of its
/// own: the preamble and each part's header block (it waits for the blank line that ends
/// them). Part bodies are bounded by the per-field limits instead.
struct HeaderGuard {
    first: Vec<u8>,
    delim: Vec<u8>,
    region: Region,
    counted: usize,
    /// Last bytes of the previous chunk (after the last match): a pattern split across
    /// two chunks is still found.
    tail: Vec<u8>,
}

fn find(hay: &[u8], pat: &[u8]) -> Option<usize> {
    let first = *pat.first()?;
    let mut from = 0;
    while let Some(i) = hay[from..].iter().position(|b| *b == first) {
        let at = from + i;
        if hay.len() - at < pat.len() {
            return None;
        }
        if &hay[at..at + pat.len()] == pat {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

impl HeaderGuard {
    fn new(boundary: &str) -> HeaderGuard {
        HeaderGuard {
            first: format!("--{boundary}").into_bytes(),
            delim: format!("\r\n--{boundary}").into_bytes(),
            region: Region::Preamble,
            counted: 0,
            tail: Vec::new(),
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        let mut data = std::mem::take(&mut self.tail);
        let old = data.len();
        data.extend_from_slice(chunk);
        let mut pos = 0;
        loop {
            let pat: &[u8] = match self.region {
                Region::Preamble => &self.first,
                Region::Headers => b"\r\n\r\n",
                Region::Body => &self.delim,
            };
            let found = find(&data[pos..], pat).map(|i| pos + i + pat.len());
            let upto = found.unwrap_or(data.len());
            if self.region != Region::Body {
                // Bytes before `old` were counted by the previous call.
                self.counted += upto.saturating_sub(pos.max(old));
                if self.counted > PART_HEADER_MAX {
                    return Err(BodyError::PartHeaderTooLarge);
                }
            }
            let Some(end) = found else {
                let keep = pos.max(data.len().saturating_sub(pat.len() - 1));
                self.tail = data[keep..].to_vec();
                return Ok(());
            };
            self.region = match self.region {
                Region::Preamble | Region::Body => Region::Headers,
                Region::Headers => Region::Body,
            };
            self.counted = 0;
            pos = end;
        }
    }
}

/// How much of a multipart body arrived: said in the error when it ends early, so a client
/// (or its operator) can tell a cut connection or wrong `Content-Length` from a bad body.
struct Progress {
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    declared: Option<u64>,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let got = self.received.load(std::sync::atomic::Ordering::Relaxed);
        match self.declared {
            Some(len) => write!(f, "{got} of the {len} bytes of Content-Length received"),
            None => write!(f, "{got} bytes received"),
        }
    }
}

/// A multer error as the client's error: over a limit → 413, anything else → 400.
fn multipart_error(e: multer::Error, file_limit: u64, progress: &Progress) -> ApiError {
    if matches!(
        e,
        multer::Error::IncompleteStream
            | multer::Error::IncompleteFieldData { .. }
            | multer::Error::IncompleteHeaders
    ) {
        tracing::warn!(error = %e, %progress, "multipart upload ended early");
        return ApiError::bad_request(format!("Malformed multipart body: {e} ({progress})"));
    }
    match e {
        multer::Error::FieldSizeExceeded { field_name, .. } => match field_name.as_deref() {
            Some("file") => too_large(file_limit),
            Some("metadata") => ApiError::new(
                413,
                format!(
                    "The metadata field is larger than {} KiB",
                    METADATA_MAX / 1024
                ),
            ),
            other => ApiError::new(
                413,
                format!(
                    "Form field {:?} is larger than {OTHER_FIELD_MAX} bytes: only `file` and `metadata` may carry data",
                    other.unwrap_or_default()
                ),
            ),
        },
        multer::Error::StreamSizeExceeded { .. } => too_large(file_limit),
        multer::Error::StreamReadFailed(err) => match err.downcast_ref::<BodyError>() {
            Some(BodyError::PartHeaderTooLarge) => ApiError::new(
                413,
                format!(
                    "A multipart part header is larger than {} KiB",
                    PART_HEADER_MAX / 1024
                ),
            ),
            _ => ApiError::bad_request(format!("Malformed multipart body: {err}")),
        },
        other => ApiError::bad_request(format!("Malformed multipart body: {other}")),
    }
}

/// The stored name of an upload: its last path component, as Open WebUI keeps it.
fn upload_filename(raw: Option<&str>) -> Result<String, ApiError> {
    let raw = raw.unwrap_or_default();
    if raw.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "The file name contains control characters",
        ));
    }
    if raw.len() > FILENAME_MAX {
        return Err(ApiError::bad_request(format!(
            "The file name is longer than {FILENAME_MAX} bytes"
        )));
    }
    let base = raw.rsplit(['/', '\\']).next().unwrap_or_default();
    Ok(match base {
        "" | "." | ".." => "file".to_string(),
        b => b.to_string(),
    })
}

/// What the multipart body contained.
struct Upload {
    filename: String,
    content_type: String,
    size: u64,
    sha256: String,
    tmp: std::path::PathBuf,
    metadata: Value,
}

/// Streams field `file` to `tmp` while hashing and counting it.
async fn store_field(
    field: &mut multer::Field<'_>,
    tmp: &std::path::Path,
    limit: u64,
    progress: &Progress,
) -> Result<(u64, String), ApiError> {
    let io_err = |e: io::Error| ApiError::internal(format!("cannot store the upload: {e}"));
    let mut out = tokio::fs::File::create(tmp).await.map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| multipart_error(e, limit, progress))?
    {
        size += chunk.len() as u64;
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(io_err)?;
    }
    out.flush().await.map_err(io_err)?;
    out.sync_all().await.map_err(io_err)?;
    Ok((size, hex::encode(hasher.finalize())))
}

/// Field `file`: its checked name, content type, size and SHA-256, the bytes in `tmp`.
async fn receive_file(
    app: &App,
    field: &mut multer::Field<'_>,
    process: bool,
    tmp: &std::path::Path,
    progress: &Progress,
) -> Result<(String, String, u64, String), ApiError> {
    let filename = upload_filename(field.file_name())?;
    let ext = extension(&filename);
    let allowed = &app.config.rag.allowed_extensions;
    if process && !allowed.is_empty() && !allowed.contains(&ext) {
        return Err(ApiError::bad_request(format!(
            "File type {ext} is not allowed"
        )));
    }
    let content_type = field
        .content_type()
        .map(|m| m.essence_str().to_string())
        .filter(|m| m != "application/octet-stream")
        .unwrap_or_else(|| crate::ingest::content_type_for(&ext).to_string());
    tokio::fs::create_dir_all(&app.ingest.upload_dir)
        .await
        .map_err(|e| ApiError::internal(format!("cannot create the upload dir: {e}")))?;
    let (size, sha256) = store_field(field, tmp, app.config.rag.file_max_bytes, progress).await?;
    Ok((filename, content_type, size, sha256))
}

/// The `metadata` field: a JSON object, or nothing.
fn metadata_value(text: &str) -> Result<Value, ApiError> {
    if text.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str::<Value>(text)
        .ok()
        .filter(Value::is_object)
        // Open WebUI's message, word for word.
        .ok_or_else(|| ApiError::bad_request("Invalid metadata format"))
}

/// multer's limits for an upload whose file may be `limit` bytes.
fn constraints(limit: u64) -> multer::Constraints {
    multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .whole_stream(body_limit(limit))
            .per_field(OTHER_FIELD_MAX)
            .for_field("file", limit)
            .for_field("metadata", METADATA_MAX),
    )
}

/// Reads the multipart body, streaming field `file` to a temporary file (one chunk in
/// memory at a time) while hashing and counting it. Every field has a size limit enforced
/// while streaming (a chunked body has no `Content-Length` to check first), and so have
/// part headers and the number of parts. On error the caller removes the temporary file.
async fn receive(
    app: &App,
    session: &mut Session,
    process: bool,
    tmp: &std::path::Path,
) -> Result<Upload, ApiError> {
    let limit = app.config.rag.file_max_bytes;
    let ct = session
        .req_header()
        .headers
        .get(::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let boundary = multer::parse_boundary(&ct).map_err(|_| {
        ApiError::bad_request("Expected a multipart/form-data body with a boundary")
    })?;
    let declared = session
        .req_header()
        .headers
        .get(::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > body_limit(limit)) {
        return Err(too_large(limit));
    }
    http::expect_continue(session).await;
    let progress = Progress {
        received: std::sync::Arc::default(),
        declared,
    };
    let received = progress.received.clone();
    let mut guard = HeaderGuard::new(&boundary);
    let body = futures_util::stream::unfold(session, |s| async move {
        match s.read_request_body().await {
            Ok(Some(b)) => Some((Ok::<Bytes, BodyError>(b), s)),
            Ok(None) => None,
            Err(e) => Some((Err(BodyError::Read(e.to_string())), s)),
        }
    })
    .map(move |item| {
        let b = item?;
        received.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
        guard.feed(&b)?;
        Ok::<Bytes, BodyError>(b)
    });
    let mut multipart = multer::Multipart::with_constraints(body, boundary, constraints(limit));
    let mut file: Option<(String, String, u64, String)> = None;
    let mut metadata: Option<Value> = None;
    let mut fields = 0;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit, &progress))?
    {
        fields += 1;
        if fields > MAX_FIELDS {
            return Err(ApiError::bad_request(format!(
                "Too many form fields: an upload has at most {MAX_FIELDS}"
            )));
        }
        match field.name() {
            Some("file") => {
                if file.is_some() {
                    return Err(ApiError::bad_request(
                        "Only one file per upload: the field `file` appears twice",
                    ));
                }
                file = Some(receive_file(app, &mut field, process, tmp, &progress).await?);
            }
            Some("metadata") => {
                if metadata.is_some() {
                    return Err(ApiError::bad_request("The field `metadata` appears twice"));
                }
                let text = field
                    .text()
                    .await
                    .map_err(|e| multipart_error(e, limit, &progress))?;
                metadata = Some(metadata_value(&text)?);
            }
            _ => {
                // Read (bounded by OTHER_FIELD_MAX) and ignored.
                while field
                    .chunk()
                    .await
                    .map_err(|e| multipart_error(e, limit, &progress))?
                    .is_some()
                {}
            }
        }
    }
    let Some((filename, content_type, size, sha256)) = file else {
        return Err(ApiError::bad_request(
            "No file uploaded: send it in the multipart field `file`",
        ));
    };
    Ok(Upload {
        filename,
        content_type,
        size,
        sha256,
        tmp: tmp.to_path_buf(),
        metadata: metadata.unwrap_or_else(|| json!({})),
    })
}

pub async fn upload(app: &App, session: &mut Session, ctx: &RequestCtx) -> HandlerResult {
    let user_id = identity(ctx)?.user.id.clone();
    let q = query(session);
    let process = http::query_bool(q.as_deref(), "process")?.unwrap_or(true);
    let background = http::query_bool(q.as_deref(), "process_in_background")?.unwrap_or(true);
    // Taken before the body is read: a refused inline upload costs no disk and no work.
    let ticket = if process && !background {
        Some(app.ingest.inline_ticket().ok_or_else(|| {
            ApiError::new(
                503,
                format!(
                    "Too many uploads are waiting for inline processing (at most {}); retry later or use process_in_background=true",
                    app.ingest.inline_queue
                ),
            )
        })?)
    } else {
        None
    };
    let id = uuid::Uuid::new_v4().to_string();
    let tmp = app.ingest.upload_dir.join(format!(".upload-{id}"));
    let up = match receive(app, session, process, &tmp).await {
        Ok(u) => u,
        Err(e) => {
            // Whatever was written before the error must not stay behind.
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let new = NewFile {
        user_id,
        filename: up.filename.clone(),
        name: up.filename,
        content_type: up.content_type,
        size: up.size,
        sha256: up.sha256,
        data: up.metadata,
        process,
    };
    let record = match app
        .library()
        .create_file(id.clone(), new, Content::File(&up.tmp))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            // Moved in only on success: otherwise the received bytes are still here.
            let _ = tokio::fs::remove_file(&up.tmp).await;
            return Err(e.into());
        }
    };
    // Deliberate difference: an inline answer carries the real final status.
    let record = if let Some(t) = &ticket {
        app.ingest.process_inline(t, &id).await.unwrap_or(record)
    } else {
        if process {
            app.ingest.notify();
        }
        record
    };
    let mut body = file_json(&record, None);
    body["status"] = json!(true);
    Ok(Outcome::Reply(Reply::ok(&body)))
}

pub async fn list(app: &App, session: &Session, ctx: &RequestCtx) -> HandlerResult {
    let user = &identity(ctx)?.user;
    let q = query(session);
    let page = page_param(q.as_deref())?;
    let with_content = http::query_bool(q.as_deref(), "content")?.unwrap_or(true);
    let meta = &app.storage.meta;
    let mut files: Vec<FileRecord> = meta
        .files()
        .await?
        .into_iter()
        .filter(|f| user.role == Role::Admin || f.user_id == user.id)
        .collect();
    files.sort_by(|a, b| {
        b.updated_at
            .cmp(&a.updated_at)
            .then_with(|| b.created_at.cmp(&a.created_at))
    });
    let total = files.len();
    // Open WebUI includes every file's text by default; a page of 50 large files would be
    // gigabytes. The texts share one budget: past it, `data.content` is cut (at a character
    // boundary) and `data.content_truncated` says so; the whole text stays available from
    // `/files/{id}` and `/files/{id}/data/content`.
    let mut budget = LIST_CONTENT_BUDGET;
    let mut items: Vec<Value> = Vec::new();
    for f in page_of(&files, page, PAGE_SIZE) {
        let mut content = if with_content {
            meta.file_text(&f.id).await?
        } else {
            None
        };
        let mut truncated = false;
        if let Some(c) = &mut content {
            if c.len() > budget {
                let mut cut = budget;
                while !c.is_char_boundary(cut) {
                    cut -= 1;
                }
                c.truncate(cut);
                truncated = true;
            }
            budget -= c.len();
        }
        let mut item = file_json(f, content);
        if truncated {
            item["data"]["content_truncated"] = json!(true);
        }
        items.push(item);
    }
    Ok(Outcome::Reply(Reply::ok(
        &json!({"items": items, "total": total}),
    )))
}

/// The items of 1-based page `page` (a page past the end, however far, is empty).
pub fn page_of<T>(items: &[T], page: usize, size: usize) -> &[T] {
    let start = page.saturating_sub(1).saturating_mul(size).min(items.len());
    &items[start..start.saturating_add(size).min(items.len())]
}

/// `?page=N`, 1-based.
pub fn page_param(q: Option<&str>) -> Result<usize, ApiError> {
    match http::query_param(q, "page") {
        None => Ok(1),
        Some(p) => p.parse::<usize>().ok().filter(|p| *p >= 1).ok_or_else(|| {
            ApiError::new(422, format!("page must be a whole number ≥ 1, got {p:?}"))
        }),
    }
}

pub async fn get(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let f = readable_file(app, ctx, req.id()).await?;
    let content = app.storage.meta.file_text(&f.id).await?;
    Ok(Outcome::Reply(Reply::ok(&file_json(&f, content))))
}

pub async fn status(app: &App, session: &Session, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let f = readable_file(app, ctx, req.id()).await?;
    if http::query_bool(query(session).as_deref(), "stream")?.unwrap_or(false) {
        return Ok(Outcome::Stream(Streamer::FileStatus(f.id)));
    }
    Ok(Outcome::Reply(Reply::ok(&status_json(&f))))
}

fn status_json(f: &FileRecord) -> Value {
    let mut v = json!({"status": f.status.map_or("pending", FileStatus::as_str)});
    if let Some(e) = &f.error {
        v["error"] = json!(e);
    }
    v
}

/// SSE: one event per status change (and at least one per second) until the file is
/// completed or failed, as Open WebUI does. Open WebUI keeps the stream open for 2 hours
/// whatever happens; here it also ends, with a last event carrying `"final": true` and a
/// `reason`, when the status can never change (the file was uploaded with `process=false`,
/// or is pending but neither queued nor being processed) and after [`STATUS_STREAM_MAX`].
pub async fn stream_status(app: &App, session: &mut Session, id: &str) -> pingora::Result<u16> {
    let mut resp = pingora::http::ResponseHeader::build_no_case(200, Some(3))?;
    resp.insert_header(::http::header::CONTENT_TYPE, "text/event-stream")?;
    resp.insert_header(::http::header::CACHE_CONTROL, "no-cache")?;
    session.write_response_header(Box::new(resp)).await?;
    let mut rx = app.ingest.watch();
    let deadline = tokio::time::Instant::now() + STATUS_STREAM_MAX;
    let mut last: Option<Value> = None;
    loop {
        // A failing store ends the stream with an error event: it must not read as a
        // deleted file ("not_found").
        let (record, failed) = match app.storage.meta.file(id).await {
            Ok(r) => (r, false),
            Err(e) => {
                tracing::error!(file = id, error = %e, "store failure while streaming a file status");
                (None, true)
            }
        };
        let (mut event, done) = match &record {
            Some(f) => {
                let e = status_json(f);
                let done = e["status"] != "pending";
                (e, done)
            }
            None if failed => (
                json!({"status": "error", "error": "Internal storage error; see the server log"}),
                true,
            ),
            None => (json!({"status": "not_found"}), true),
        };
        let stuck = match &record {
            Some(f) if !done && f.status.is_none() => {
                Some("the file was uploaded with process=false and is not processed")
            }
            Some(f) if !done && !app.ingest.is_running(&f.id) => {
                match app.storage.queue.is_queued(&f.id).await {
                    Ok(false)
                        if app
                            .storage
                            .meta
                            .file(id)
                            .await
                            .ok()
                            .flatten()
                            .map(|g| g.status)
                            == Some(f.status) =>
                    {
                        Some("the file is neither queued nor being processed")
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let timed_out = !done && tokio::time::Instant::now() > deadline;
        if let Some(reason) =
            stuck.or(timed_out.then_some("the status did not change in time; poll it again later"))
        {
            event["final"] = json!(true);
            event["reason"] = json!(reason);
        }
        let end = done || event.get("final").is_some();
        if last.as_ref() != Some(&event) || end {
            let line = format!("data: {event}\n\n");
            session
                .write_response_body(Bytes::from(line), false)
                .await?;
            last = Some(event);
        }
        if end {
            break;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rx.changed()).await;
    }
    session.finish_body().await?;
    Ok(200)
}

pub async fn data_content(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let f = readable_file(app, ctx, req.id()).await?;
    let content = app.storage.meta.file_text(&f.id).await?.unwrap_or_default();
    Ok(Outcome::Reply(Reply::ok(&json!({"content": content}))))
}

pub async fn content(app: &App, session: &Session, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let f = readable_file(app, ctx, req.id()).await?;
    let attachment = http::query_bool(query(session).as_deref(), "attachment")?.unwrap_or(false);
    let content_type = f.meta["content_type"]
        .as_str()
        .unwrap_or("application/octet-stream")
        .to_string();
    let encoded: String = f
        .filename
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    // PDFs are shown inline (browser viewer), other non-text types are downloads.
    let disposition = if attachment
        || (content_type != "application/pdf" && !content_type.starts_with("text/plain"))
    {
        format!("attachment; filename*=UTF-8''{encoded}")
    } else {
        format!("inline; filename*=UTF-8''{encoded}")
    };
    let key = crate::library::blob_key_of(&f);
    if let Some(path) = app.storage.blobs.local_path(&key) {
        return Ok(Outcome::Stream(Streamer::File {
            path,
            content_type,
            disposition,
        }));
    }
    // A backend without local blobs (PostgreSQL) hands the bytes over whole; its blobs
    // are bounded by `rag.file-max-bytes`.
    let Some(bytes) = app.storage.blobs.get(&key).await? else {
        return Err(ApiError::not_found("The stored file is missing"));
    };
    Ok(Outcome::Reply(
        Reply::bytes(200, "application/octet-stream", bytes.into())
            .with_header(::http::header::CONTENT_DISPOSITION, disposition),
    ))
}

pub async fn delete(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let user = &identity(ctx)?.user;
    let f = readable_file(app, ctx, req.id()).await?;
    if !access::can_write_file(user, &f) {
        return Err(ApiError::forbidden(msg::ACCESS_PROHIBITED));
    }
    app.library().delete_file(&f.id).await?;
    Ok(Outcome::Reply(Reply::ok(
        &json!({"message": "File deleted successfully"}),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(headers: &str, body: &[u8]) -> Vec<u8> {
        let mut v = format!("--b\r\n{headers}\r\n\r\n").into_bytes();
        v.extend_from_slice(body);
        v.extend_from_slice(b"\r\n");
        v
    }

    fn feed_in(guard: &mut HeaderGuard, data: &[u8], piece: usize) -> Result<(), BodyError> {
        data.chunks(piece).try_for_each(|c| guard.feed(c))
    }

    #[test]
    fn header_guard_counts_headers_not_bodies_across_chunk_edges() {
        let mut body = part(
            "Content-Disposition: form-data; name=\"file\"",
            &[b'x'; 100_000],
        );
        body.extend(part(
            "Content-Disposition: form-data; name=\"metadata\"",
            b"{}",
        ));
        body.extend_from_slice(b"--b--\r\n");
        for piece in [1, 2, 3, 7, 64, 4096, body.len()] {
            let mut g = HeaderGuard::new("b");
            assert!(feed_in(&mut g, &body, piece).is_ok(), "piece {piece}");
        }
        let long = format!("X-Pad: {}", "y".repeat(PART_HEADER_MAX));
        let bad = part(&long, b"data");
        for piece in [1, 5, 4096, bad.len()] {
            let mut g = HeaderGuard::new("b");
            assert!(
                matches!(
                    feed_in(&mut g, &bad, piece),
                    Err(BodyError::PartHeaderTooLarge)
                ),
                "piece {piece}"
            );
        }
        // A long preamble before the first boundary.
        let mut pre = vec![b'p'; PART_HEADER_MAX + 1];
        pre.extend(part("Content-Disposition: form-data; name=\"file\"", b"x"));
        assert!(feed_in(&mut HeaderGuard::new("b"), &pre, 1000).is_err());
        // Headers that only look ended inside the preamble do not reset the count.
        let mut tricky = b"\r\n\r\n".to_vec();
        tricky.extend(vec![b'q'; PART_HEADER_MAX]);
        assert!(feed_in(&mut HeaderGuard::new("b"), &tricky, 3).is_err());
    }

    #[test]
    fn pages_never_overflow() {
        let items = [1, 2, 3, 4, 5];
        assert_eq!(page_of(&items, 1, 2), &[1, 2]);
        assert_eq!(page_of(&items, 3, 2), &[5]);
        assert!(page_of(&items, usize::MAX, 50).is_empty());
        assert!(page_of(&items, 2, usize::MAX).is_empty());
        assert_eq!(page_of(&items, 0, 2), &[1, 2]);
        assert!(page_param(Some("page=99999999999999999999")).is_err());
        assert!(page_param(Some("page=0")).is_err());
    }

    #[test]
    fn upload_names() {
        assert_eq!(upload_filename(Some("../../a.txt")).unwrap(), "a.txt");
        assert_eq!(upload_filename(Some("c:\\x\\b.pdf")).unwrap(), "b.pdf");
        assert_eq!(upload_filename(Some("dir/")).unwrap(), "file");
        assert_eq!(upload_filename(None).unwrap(), "file");
        assert!(upload_filename(Some("a\0b")).is_err());
        assert!(upload_filename(Some(&"n".repeat(256))).is_err());
    }
}
