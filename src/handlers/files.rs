//! `/api/v1/files/*`: upload (streamed to disk), listing, status, content, delete.

use std::io;

use bytes::Bytes;
use pingora::proxy::Session;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{HandlerResult, Outcome, Req, Streamer, access, identity, query};
use crate::app::App;
use crate::error::{ApiError, msg};
use crate::http::{self, Reply};
use crate::proxy::ctx::RequestCtx;
use crate::store::{FileRecord, FileStatus, Role, now_secs};

const PAGE_SIZE: usize = 50;

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

/// Open WebUI's `FileModel` shape.
pub fn file_json(f: &FileRecord, content: Option<String>) -> Value {
    json!({
        "id": f.id,
        "user_id": f.user_id,
        "hash": f.hash,
        "filename": f.filename,
        "path": f.path,
        "data": data_json(f, content),
        "meta": f.meta,
        "created_at": f.created_at,
        "updated_at": f.updated_at,
    })
}

/// A file the caller may read, or the 404 that hides whether it exists.
pub fn readable_file(app: &App, ctx: &RequestCtx, id: &str) -> Result<FileRecord, ApiError> {
    let user = &identity(ctx)?.user;
    match app.store.file(id)? {
        Some(f) if access::can_read_file(&app.store, user, &f) => Ok(f),
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

/// What the multipart body contained.
struct Upload {
    filename: String,
    content_type: String,
    size: u64,
    sha256: String,
    tmp: std::path::PathBuf,
    metadata: Value,
}

/// Reads the multipart body, streaming field `file` to a temporary file (one chunk in
/// memory at a time) while hashing and counting it.
async fn receive(
    app: &App,
    session: &mut Session,
    process: bool,
    id: &str,
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
    if let Some(len) = session
        .req_header()
        .headers
        .get(::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit + 1024 * 1024
    {
        return Err(too_large(limit));
    }
    http::expect_continue(session).await;
    let body = futures_util::stream::unfold(session, |s| async move {
        match s.read_request_body().await {
            Ok(Some(b)) => Some((Ok::<Bytes, io::Error>(b), s)),
            Ok(None) => None,
            Err(e) => Some((Err(io::Error::other(e.to_string())), s)),
        }
    });
    let mut multipart = multer::Multipart::new(body, boundary);
    let bad = |e: multer::Error| ApiError::bad_request(format!("Malformed multipart body: {e}"));
    let mut file: Option<(String, String, u64, String, std::path::PathBuf)> = None;
    let mut metadata = json!({});
    while let Some(mut field) = multipart.next_field().await.map_err(bad)? {
        match field.name() {
            Some("file") if file.is_none() => {
                let filename = field
                    .file_name()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("file")
                    .to_string();
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
                    .map_err(|e| {
                        ApiError::internal(format!("cannot create the upload dir: {e}"))
                    })?;
                let tmp = app.ingest.upload_dir.join(format!(".upload-{id}"));
                let mut out = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(|e| ApiError::internal(format!("cannot store the upload: {e}")))?;
                let mut hasher = Sha256::new();
                let mut size = 0u64;
                let written: Result<(), ApiError> = async {
                    while let Some(chunk) = field.chunk().await.map_err(bad)? {
                        size += chunk.len() as u64;
                        if size > limit {
                            return Err(too_large(limit));
                        }
                        hasher.update(&chunk);
                        out.write_all(&chunk).await.map_err(|e| {
                            ApiError::internal(format!("cannot store the upload: {e}"))
                        })?;
                    }
                    out.flush()
                        .await
                        .map_err(|e| ApiError::internal(format!("cannot store the upload: {e}")))?;
                    out.sync_all()
                        .await
                        .map_err(|e| ApiError::internal(format!("cannot store the upload: {e}")))
                }
                .await;
                if let Err(e) = written {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
                file = Some((
                    filename,
                    content_type,
                    size,
                    hex::encode(hasher.finalize()),
                    tmp,
                ));
            }
            Some("metadata") => {
                let text = field.text().await.map_err(bad)?;
                if !text.trim().is_empty() {
                    metadata = serde_json::from_str::<Value>(&text)
                        .ok()
                        .filter(Value::is_object)
                        .ok_or_else(|| ApiError::bad_request("Invalid metadata format"))?;
                }
            }
            _ => {}
        }
    }
    let Some((filename, content_type, size, sha256, tmp)) = file else {
        return Err(ApiError::bad_request(
            "No file uploaded: send it in the multipart field `file`",
        ));
    };
    Ok(Upload {
        filename,
        content_type,
        size,
        sha256,
        tmp,
        metadata,
    })
}

pub async fn upload(app: &App, session: &mut Session, ctx: &RequestCtx) -> HandlerResult {
    let user_id = identity(ctx)?.user.id.clone();
    let q = query(session);
    let process = http::query_bool(q.as_deref(), "process")?.unwrap_or(true);
    let background = http::query_bool(q.as_deref(), "process_in_background")?.unwrap_or(true);
    let id = uuid::Uuid::new_v4().to_string();
    let up = match receive(app, session, process, &id).await {
        Ok(u) => u,
        Err(e) => {
            // Whatever was written before the error must not stay behind.
            let tmp = app.ingest.upload_dir.join(format!(".upload-{id}"));
            let _ = tokio::fs::remove_file(tmp).await;
            return Err(e);
        }
    };
    let path = app.ingest.blob_path(&id, &up.filename);
    if let Err(e) = tokio::fs::rename(&up.tmp, &path).await {
        let _ = tokio::fs::remove_file(&up.tmp).await;
        return Err(ApiError::internal(format!("cannot store the upload: {e}")));
    }
    let now = now_secs();
    let record = FileRecord {
        id: id.clone(),
        user_id,
        filename: up.filename.clone(),
        path: path.display().to_string(),
        hash: None,
        status: process.then_some(FileStatus::Pending),
        error: None,
        meta: json!({
            "name": up.filename,
            "content_type": up.content_type,
            "size": up.size,
            "file_hash": up.sha256,
            "data": up.metadata,
        }),
        embedding: None,
        chunk_count: 0,
        created_at: now,
        updated_at: now,
    };
    if let Err(e) = app.store.insert_file(&record, process) {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(e.into());
    }
    let record = if process && !background {
        // Deliberate difference: the answer carries the real final status.
        app.ingest.process(&id).await.unwrap_or(record)
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

pub fn list(app: &App, session: &Session, ctx: &RequestCtx) -> HandlerResult {
    let user = &identity(ctx)?.user;
    let q = query(session);
    let page = page_param(q.as_deref())?;
    let with_content = http::query_bool(q.as_deref(), "content")?.unwrap_or(true);
    let mut files: Vec<FileRecord> = app
        .store
        .files()?
        .into_iter()
        .filter(|f| user.role == Role::Admin || f.user_id == user.id)
        .collect();
    files.sort_by(|a, b| {
        b.updated_at
            .cmp(&a.updated_at)
            .then_with(|| b.created_at.cmp(&a.created_at))
    });
    let total = files.len();
    let items: Vec<Value> = page_of(&files, page, PAGE_SIZE)
        .iter()
        .map(|f| {
            let content = if with_content {
                app.store.file_text(&f.id).ok().flatten()
            } else {
                None
            };
            file_json(f, content)
        })
        .collect();
    Ok(Outcome::Reply(Reply::ok(
        &json!({"items": items, "total": total}),
    )))
}

/// The items of 1-based page `page`.
pub fn page_of<T>(items: &[T], page: usize, size: usize) -> &[T] {
    let start = ((page - 1) * size).min(items.len());
    &items[start..(start + size).min(items.len())]
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

pub fn get(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let f = readable_file(app, ctx, req.id())?;
    let content = app.store.file_text(&f.id)?;
    Ok(Outcome::Reply(Reply::ok(&file_json(&f, content))))
}

pub fn status(app: &App, session: &Session, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let f = readable_file(app, ctx, req.id())?;
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
/// completed or failed, at most 2 hours, as Open WebUI does.
pub async fn stream_status(app: &App, session: &mut Session, id: &str) -> pingora::Result<u16> {
    let mut resp = pingora::http::ResponseHeader::build(200, Some(3))?;
    resp.insert_header(::http::header::CONTENT_TYPE, "text/event-stream")?;
    resp.insert_header(::http::header::CACHE_CONTROL, "no-cache")?;
    session.write_response_header(Box::new(resp), false).await?;
    let mut rx = app.ingest.watch();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2 * 3600);
    let mut last: Option<Value> = None;
    loop {
        let event = match app.store.file(id).ok().flatten() {
            Some(f) => status_json(&f),
            None => json!({"status": "not_found"}),
        };
        let done = event["status"] != "pending";
        if last.as_ref() != Some(&event) || done {
            let line = format!("data: {event}\n\n");
            session
                .write_response_body(Some(Bytes::from(line)), false)
                .await?;
            last = Some(event);
        }
        if done || tokio::time::Instant::now() > deadline {
            break;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rx.changed()).await;
    }
    session.write_response_body(None, true).await?;
    Ok(200)
}

pub fn data_content(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let f = readable_file(app, ctx, req.id())?;
    let content = app.store.file_text(&f.id)?.unwrap_or_default();
    Ok(Outcome::Reply(Reply::ok(&json!({"content": content}))))
}

pub fn content(app: &App, session: &Session, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let f = readable_file(app, ctx, req.id())?;
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
    Ok(Outcome::Stream(Streamer::File {
        path: f.path.into(),
        content_type,
        disposition,
    }))
}

pub fn delete(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let user = &identity(ctx)?.user;
    let f = readable_file(app, ctx, req.id())?;
    if !access::can_write_file(user, &f) {
        return Err(ApiError::forbidden(msg::ACCESS_PROHIBITED));
    }
    delete_everywhere(app, &f.id)?;
    Ok(Outcome::Reply(Reply::ok(
        &json!({"message": "File deleted successfully"}),
    )))
}

/// Removes a file's record, chunks, vectors, memberships and blob.
pub fn delete_everywhere(app: &App, id: &str) -> Result<(), ApiError> {
    if let Some((rec, chunk_ids, kbs)) = app.store.delete_file(id)? {
        app.ingest.vectors.remove_file(id, &chunk_ids, &kbs);
        if let Err(e) = std::fs::remove_file(&rec.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(file = id, error = %e, "could not remove the stored blob");
        }
    }
    Ok(())
}
