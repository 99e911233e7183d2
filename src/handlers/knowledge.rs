//! `/api/v1/knowledge/*`: collections of files, shaped as Open WebUI's.

use crate::forms::{FileIdForm, GrantForm, KnowledgeForm};
use crate::http::Session;
use serde_json::{Value, json};

use super::files::{file_json, page_of, page_param};
use super::{HandlerResult, Outcome, Req, access, identity, query};
use crate::app::App;
use crate::error::{ApiError, msg};
use crate::http::{self, Reply};
use crate::ingest::NotUsable;
use crate::library::Added;
use crate::request::RequestCtx;
use crate::store::{Grant, KnowledgeRecord, Role, User, now_secs};

const PAGE_SIZE: usize = 30;

/// Bounds of a collection's stored fields: a form is at most 1 MiB, but a record is read on
/// every access check and listing, so it stays small.
const MAX_NAME_BYTES: usize = 512;
const MAX_DESCRIPTION_BYTES: usize = 64 * 1024;
const MAX_GRANTS: usize = 256;

/// Checks a form's name and description against the bounds above.
fn check_form(form: &KnowledgeForm) -> Result<(), ApiError> {
    if form.name.trim().is_empty() {
        return Err(ApiError::bad_request("name must not be empty"));
    }
    if form.name.len() > MAX_NAME_BYTES {
        return Err(ApiError::new(
            422,
            format!("name is longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    if form.description.len() > MAX_DESCRIPTION_BYTES {
        return Err(ApiError::new(
            422,
            format!(
                "description is longer than {} KiB",
                MAX_DESCRIPTION_BYTES / 1024
            ),
        ));
    }
    Ok(())
}

/// Validates grants and checks that `user` may set them on a collection of `owner_id`.
fn grants(
    form: Option<Vec<GrantForm>>,
    user: &User,
    owner_id: &str,
) -> Result<Vec<Grant>, ApiError> {
    let grants = parse_grants(form)?;
    access::may_set_grants(user, owner_id, &grants).map_err(ApiError::forbidden)?;
    Ok(grants)
}

fn parse_grants(form: Option<Vec<GrantForm>>) -> Result<Vec<Grant>, ApiError> {
    let now = now_secs();
    let form = form.unwrap_or_default();
    if form.len() > MAX_GRANTS {
        return Err(ApiError::new(
            422,
            format!("access_grants: at most {MAX_GRANTS} grants per collection"),
        ));
    }
    form.into_iter()
        .map(|g| {
            if g.principal_type != "user" && g.principal_type != "group" {
                return Err(ApiError::new(
                    422,
                    format!(
                        "principal_type must be user or group, got {:?}",
                        g.principal_type
                    ),
                ));
            }
            if g.permission != "read" && g.permission != "write" {
                return Err(ApiError::new(
                    422,
                    format!("permission must be read or write, got {:?}", g.permission),
                ));
            }
            if g.principal_id.is_empty() || g.principal_id.len() > 128 {
                return Err(ApiError::new(
                    422,
                    "principal_id must be 1 to 128 bytes long",
                ));
            }
            Ok(Grant {
                id: uuid::Uuid::new_v4().to_string(),
                principal_type: g.principal_type,
                principal_id: g.principal_id,
                permission: g.permission,
                created_at: now,
            })
        })
        .collect()
}

/// Open WebUI's `KnowledgeModel` (grants carry their resource).
fn kb_json(kb: &KnowledgeRecord) -> Value {
    let grants: Vec<Value> = kb
        .access_grants
        .iter()
        .map(|g| {
            json!({"id": g.id, "resource_type": "knowledge", "resource_id": kb.id,
                   "principal_type": g.principal_type, "principal_id": g.principal_id,
                   "permission": g.permission, "created_at": g.created_at})
        })
        .collect();
    json!({
        "id": kb.id,
        "user_id": kb.user_id,
        "name": kb.name,
        "description": kb.description,
        "meta": kb.meta,
        "access_grants": grants,
        "created_at": kb.created_at,
        "updated_at": kb.updated_at,
    })
}

async fn user_json(app: &App, id: &str) -> Result<Value, ApiError> {
    Ok(match app.storage.meta.user_by_id(id).await? {
        Some(u) => json!({"id": u.id, "name": u.name, "role": u.role.as_str(), "email": u.email}),
        None => Value::Null,
    })
}

/// The `files` list of `KnowledgeFilesResponse`.
async fn kb_files_json(app: &App, kb: &str) -> Result<Vec<Value>, ApiError> {
    Ok(app
        .library()
        .collection_files(kb)
        .await?
        .into_iter()
        .map(|f| {
            json!({"id": f.id, "hash": f.hash, "meta": f.meta,
                   "created_at": f.created_at, "updated_at": f.updated_at})
        })
        .collect())
}

async fn with_files(app: &App, kb: &KnowledgeRecord, user: &User) -> Result<Value, ApiError> {
    let mut v = kb_json(kb);
    v["write_access"] = json!(access::can_write_kb(user, kb));
    v["files"] = json!(kb_files_json(app, &kb.id).await?);
    Ok(v)
}

/// A collection the caller can read; otherwise a 404 that does not reveal it exists.
pub(crate) async fn readable(
    app: &App,
    user: &User,
    id: &str,
) -> Result<KnowledgeRecord, ApiError> {
    match app.library().collection(id).await? {
        Some(kb) if access::can_read_kb(user, &kb) => Ok(kb),
        _ => Err(ApiError::not_found(msg::NOT_FOUND)),
    }
}

/// A collection the caller can write: 404 when they cannot even read it, 400 (Open
/// WebUI's status for write denials) when they can read but not write.
pub(crate) async fn writable(
    app: &App,
    user: &User,
    id: &str,
) -> Result<KnowledgeRecord, ApiError> {
    match app.library().collection(id).await? {
        // Write is checked on its own: a write grant suffices without a read grant.
        Some(kb) if access::can_write_kb(user, &kb) => Ok(kb),
        Some(kb) if access::can_read_kb(user, &kb) => {
            Err(ApiError::bad_request(msg::ACCESS_PROHIBITED))
        }
        _ => Err(ApiError::not_found(msg::NOT_FOUND)),
    }
}

pub async fn create(app: &App, session: &mut Session, ctx: &RequestCtx) -> HandlerResult {
    let user = identity(ctx)?.user.clone();
    let body = http::read_body(session, 1024 * 1024).await?;
    let form: KnowledgeForm = http::parse_json(&body)?;
    check_form(&form)?;
    let access_grants = grants(form.access_grants, &user, &user.id)?;
    let kb = app
        .library()
        .create_collection(
            &user.id,
            form.name.trim().to_string(),
            form.description,
            access_grants,
        )
        .await?;
    let mut v = kb_json(&kb);
    v["files"] = Value::Null;
    Ok(Outcome::Reply(Reply::ok(&v)))
}

pub async fn list(app: &App, session: &Session, ctx: &RequestCtx) -> HandlerResult {
    let user = &identity(ctx)?.user;
    let page = page_param(query(session).as_deref())?;
    let mut kbs: Vec<KnowledgeRecord> = app
        .library()
        .collections()
        .await?
        .into_iter()
        .filter(|kb| access::can_read_kb(user, kb))
        .collect();
    kbs.sort_by(|a, b| {
        b.updated_at
            .cmp(&a.updated_at)
            .then_with(|| a.name.cmp(&b.name))
    });
    let total = kbs.len();
    let mut items: Vec<Value> = Vec::new();
    for kb in page_of(&kbs, page, PAGE_SIZE) {
        let mut v = kb_json(kb);
        v["user"] = user_json(app, &kb.user_id).await?;
        v["write_access"] = json!(access::can_write_kb(user, kb));
        items.push(v);
    }
    Ok(Outcome::Reply(Reply::ok(
        &json!({"items": items, "total": total}),
    )))
}

pub async fn get(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let user = &identity(ctx)?.user;
    let kb = readable(app, user, req.id()).await?;
    let mut v = kb_json(&kb);
    v["write_access"] = json!(access::can_write_kb(user, &kb));
    v["files"] = Value::Null;
    Ok(Outcome::Reply(Reply::ok(&v)))
}

pub async fn files(app: &App, session: &Session, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let user = &identity(ctx)?.user;
    let kb = readable(app, user, req.id()).await?;
    let page = page_param(query(session).as_deref())?;
    let mut files = app.library().collection_files(&kb.id).await?;
    files.sort_by(|a, b| {
        b.updated_at
            .cmp(&a.updated_at)
            .then_with(|| a.filename.cmp(&b.filename))
    });
    let total = files.len();
    let mut items: Vec<Value> = Vec::new();
    for f in page_of(&files, page, PAGE_SIZE) {
        let mut v = file_json(f, None);
        v["user"] = user_json(app, &f.user_id).await?;
        items.push(v);
    }
    Ok(Outcome::Reply(Reply::ok(
        &json!({"items": items, "directories": [], "breadcrumbs": [], "total": total}),
    )))
}

pub async fn update(
    app: &App,
    session: &mut Session,
    ctx: &RequestCtx,
    req: &Req,
) -> HandlerResult {
    let user = identity(ctx)?.user.clone();
    let mut kb = writable(app, &user, req.id()).await?;
    let body = http::read_body(session, 1024 * 1024).await?;
    let form: KnowledgeForm = http::parse_json(&body)?;
    check_form(&form)?;
    if form.access_grants.is_some() {
        // Clients send the whole form back: unchanged grants are not a change of sharing,
        // so a write grantee may still rename the collection.
        let new = parse_grants(form.access_grants)?;
        let key = |g: &Grant| {
            (
                g.principal_type.clone(),
                g.principal_id.clone(),
                g.permission.clone(),
            )
        };
        let old: std::collections::BTreeSet<_> = kb.access_grants.iter().map(key).collect();
        if new
            .iter()
            .map(key)
            .collect::<std::collections::BTreeSet<_>>()
            != old
        {
            access::may_set_grants(&user, &kb.user_id, &new).map_err(ApiError::forbidden)?;
            kb.access_grants = new;
        }
    }
    kb.name = form.name.trim().to_string();
    kb.description = form.description;
    app.library().save_collection(&mut kb).await?;
    Ok(Outcome::Reply(Reply::ok(
        &with_files(app, &kb, &user).await?,
    )))
}

async fn file_id_form(session: &mut Session) -> Result<String, ApiError> {
    let body = http::read_body(session, 64 * 1024).await?;
    let form: FileIdForm = http::parse_json(&body)?;
    Ok(form.file_id)
}

/// Adds a processed file. Its stored vectors are reused (Open WebUI re-embeds). A file
/// still processing is waited for (bounded by `rag.file-add-wait`).
pub async fn add_file(
    app: &App,
    session: &mut Session,
    ctx: &RequestCtx,
    req: &Req,
) -> HandlerResult {
    let user = identity(ctx)?.user.clone();
    let mut kb = writable(app, &user, req.id()).await?;
    let file_id = file_id_form(session).await?;
    add_one(app, &user, &kb, &file_id, app.config.rag.file_add_wait).await?;
    app.library().save_collection(&mut kb).await?;
    Ok(Outcome::Reply(Reply::ok(
        &with_files(app, &kb, &user).await?,
    )))
}

/// Adds one file to a collection the caller may write: the checks of `file/add`, shared
/// by the batch and by `retrieval/process/text`. Waits at most `wait` for a file still
/// being processed. Returns false when the file was already in the collection.
pub(crate) async fn add_one(
    app: &App,
    user: &User,
    kb: &KnowledgeRecord,
    file_id: &str,
    wait: std::time::Duration,
) -> Result<bool, ApiError> {
    let not_found = || ApiError::bad_request(format!("File {file_id} not found"));
    let file = app.library().file(file_id).await?.ok_or_else(not_found)?;
    if !access::can_read_file(app.storage.meta.as_ref(), user, &file).await? {
        return Err(not_found());
    }
    if !access::can_add_file_to(app.storage.meta.as_ref(), user, &file, kb).await? {
        return Err(ApiError::forbidden(format!(
            "File {file_id} belongs to another user who cannot write this collection: only \
             its owner or an admin can add it here"
        )));
    }
    let file = app
        .ingest
        .processed(file, wait)
        .await
        .map_err(|e| match e {
            NotUsable::Gone => not_found(),
            NotUsable::StillProcessing => ApiError::new(
                409,
                format!(
                    "File {file_id} is still being processed after {}s; try again later",
                    app.config.rag.file_add_wait.as_secs()
                ),
            ),
            NotUsable::Failed(error) => {
                ApiError::bad_request(format!("File {file_id} could not be processed: {error}"))
            }
            NotUsable::NotProcessed => ApiError::bad_request(
                "Extracted content is not available for this file: it was uploaded with process=false",
            ),
            NotUsable::Store(e) => e.into(),
        })?;
    match app.library().add_file(&kb.id, &file).await? {
        Added::Added => Ok(true),
        Added::AlreadyThere => Ok(false),
        // Same content under another file id → Open WebUI's duplicate error.
        Added::Duplicate => Err(ApiError::bad_request(
            "Duplicate content detected. Please provide unique content to proceed.",
        )),
    }
}

/// Most files in one `files/batch/add`.
pub const MAX_BATCH: usize = 256;

/// `POST /knowledge/{id}/files/batch/add` with `[{"file_id"}, ...]`: adds each file as
/// `file/add` would and answers once, with each file's outcome in `results` (and Open
/// WebUI's `warnings` when some failed). Waiting for files still processing shares one
/// `rag.file-add-wait` for the whole batch.
pub async fn batch_add(
    app: &App,
    session: &mut Session,
    ctx: &RequestCtx,
    req: &Req,
) -> HandlerResult {
    let user = identity(ctx)?.user.clone();
    let mut kb = writable(app, &user, req.id()).await?;
    let body = http::read_body(session, 256 * 1024).await?;
    let form: Vec<FileIdForm> = http::parse_json(&body)?;
    if form.is_empty() {
        return Err(ApiError::new(422, "The list of files is empty"));
    }
    if form.len() > MAX_BATCH {
        return Err(ApiError::new(
            413,
            format!("Too many files: at most {MAX_BATCH} per batch"),
        ));
    }
    let deadline = tokio::time::Instant::now() + app.config.rag.file_add_wait;
    let mut results = Vec::with_capacity(form.len());
    let mut errors = Vec::new();
    for item in form {
        let id = item.file_id;
        if id.is_empty() || id.len() > 128 {
            let e = ApiError::new(422, "file_id must be 1 to 128 bytes long");
            results.push(
                json!({"file_id": null, "status": "error", "code": e.status, "error": e.detail}),
            );
            errors.push(e.detail);
            continue;
        }
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match add_one(app, &user, &kb, &id, wait).await {
            Ok(added) => results.push(json!({
                "file_id": id,
                "status": if added { "added" } else { "already_added" },
            })),
            Err(e) => {
                errors.push(format!("{id}: {}", e.detail));
                results.push(
                    json!({"file_id": id, "status": "error", "code": e.status, "error": e.detail}),
                );
            }
        }
    }
    app.library().save_collection(&mut kb).await?;
    let mut v = with_files(app, &kb, &user).await?;
    v["results"] = json!(results);
    v["warnings"] = if errors.is_empty() {
        Value::Null
    } else {
        json!({"message": "Some files failed to add", "errors": errors})
    };
    Ok(Outcome::Reply(Reply::ok(&v)))
}

pub async fn remove_file(
    app: &App,
    session: &mut Session,
    ctx: &RequestCtx,
    req: &Req,
) -> HandlerResult {
    let user = identity(ctx)?.user.clone();
    let mut kb = writable(app, &user, req.id()).await?;
    let delete_file = http::query_bool(query(session).as_deref(), "delete_file")?.unwrap_or(true);
    let file_id = file_id_form(session).await?;
    let library = app.library();
    library.unlink_file(&kb.id, &file_id).await?;
    if delete_file
        && let Some(f) = library.file(&file_id).await?
        && (user.role == Role::Admin || f.user_id == user.id)
    {
        library.delete_file(&file_id).await?;
    }
    library.save_collection(&mut kb).await?;
    Ok(Outcome::Reply(Reply::ok(
        &with_files(app, &kb, &user).await?,
    )))
}

pub async fn reset(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let user = identity(ctx)?.user.clone();
    let mut kb = writable(app, &user, req.id()).await?;
    let library = app.library();
    library.reset_collection(&kb.id).await?;
    library.save_collection(&mut kb).await?;
    let mut v = kb_json(&kb);
    v["files"] = json!([]);
    Ok(Outcome::Reply(Reply::ok(&v)))
}

pub async fn delete(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let user = identity(ctx)?.user.clone();
    let kb = writable(app, &user, req.id()).await?;
    let existed = app.library().delete_collection(&kb.id).await?;
    Ok(Outcome::Reply(Reply::ok(&existed)))
}
