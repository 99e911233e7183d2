//! `/api/v1/models/*`: model presets managed with Open WebUI's model API shapes.
//!
//! Admins manage every preset, users their own and those shared with them for writing.
//! Presets declared in the configuration file are listed and usable but read-only here.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::files::{page_of, page_param};
use super::{HandlerResult, Outcome, identity, query};
use crate::app::App;
use crate::auth::Identity;
use crate::error::{ApiError, msg};
use crate::http::Session;
use crate::http::{self, Reply};
use crate::presets::{self, PresetForm};
use crate::request::RequestCtx;
use crate::storage::Signal;
use crate::store::{Grant, PresetRecord, PresetRefusal, Role, User, now_secs};

const PAGE_SIZE: usize = 30;
/// A form is a few KiB; the record bounds are checked field by field after parsing.
const MAX_FORM_BYTES: usize = 1024 * 1024;

/// Open WebUI's `MODEL_ID_TAKEN`.
const ID_TAKEN: &str = "Uh-oh! This id is already registered. Please choose another id string.";

/// Keys restricted to some models may use them, not define new ones (which could be
/// shared or built on other models).
fn writer(ctx: &RequestCtx) -> Result<&Identity, ApiError> {
    let who = identity(ctx)?;
    if who.restricted_key {
        return Err(ApiError::forbidden(
            "This API key is restricted to some models and cannot manage model presets; \
             use a session or an unrestricted key",
        ));
    }
    Ok(who)
}

fn id_param(session: &Session) -> Result<String, ApiError> {
    match http::query_param(query(session).as_deref(), "id") {
        Some(id) if !id.is_empty() => Ok(id),
        _ => Err(ApiError::new(
            422,
            "The id query parameter is required (?id=<preset id>)",
        )),
    }
}

async fn form(app: &App, session: &mut Session) -> Result<PresetForm, ApiError> {
    let body = http::read_body(session, MAX_FORM_BYTES).await?;
    http::parse_json_with(&body, app.config.max_json_values)
}

/// Only the owner or an admin changes who can use a preset, and only an admin shares one
/// with everyone (`user:*`), as for collections.
fn may_set_grants(user: &User, owner_id: &str, grants: &[Grant]) -> Result<(), ApiError> {
    if user.role == Role::Admin {
        return Ok(());
    }
    if user.id != owner_id {
        return Err(ApiError::forbidden(
            "Only the owner of a model preset or an admin can change its access grants",
        ));
    }
    if grants.iter().any(|g| g.principal_id == "*") {
        return Err(ApiError::forbidden(
            "Only an admin can share a model preset with everyone (user:*)",
        ));
    }
    Ok(())
}

/// A preset the caller can read; otherwise a 404 that does not reveal it exists.
async fn readable(app: &App, user: &User, id: &str) -> Result<PresetRecord, ApiError> {
    only_readable(presets::find(&app.presets(), id).await?, user, id)
}

fn only_readable(
    found: Option<PresetRecord>,
    user: &User,
    id: &str,
) -> Result<PresetRecord, ApiError> {
    match found {
        Some(p) if presets::can_read(user, &p) => Ok(p),
        _ => Err(ApiError::not_found(format!(
            "Model preset {id:?} not found"
        ))),
    }
}

/// A preset the caller may change: 403 for declared ones (saying where to change them),
/// 400 (Open WebUI's status for write denials) when readable but not writable. Read from
/// the store, not the in-memory copy: a change must start from the latest version, which
/// another replica may have written a moment ago.
async fn writable(app: &App, user: &User, id: &str) -> Result<PresetRecord, ApiError> {
    let p = only_readable(presets::find_fresh(&app.presets(), id).await?, user, id)?;
    if presets::is_declared(&p) {
        return Err(ApiError::forbidden(format!(
            "Model preset {id:?} is declared in the configuration file and is read-only \
             through the API: change it in the [[presets.declared]] section"
        )));
    }
    if !presets::can_write(user, &p) {
        return Err(ApiError::bad_request(msg::ACCESS_PROHIBITED));
    }
    Ok(p)
}

pub async fn create(app: &App, session: &mut Session, ctx: &RequestCtx) -> HandlerResult {
    let who = writer(ctx)?;
    let user = who.user.clone();
    let mut form = form(app, session).await?;
    let grants = presets::parse_grants(form.access_grants.take().unwrap_or_default())?;
    may_set_grants(&user, &user.id, &grants)?;
    let c = presets::check_form(form, app.config.rag.max_items)?;
    if app.config.presets.declared.iter().any(|p| p.id == c.id) {
        return Err(ApiError::new(409, ID_TAKEN));
    }
    if app.models.catalog(false).await.by_id.contains_key(&c.id) {
        return Err(ApiError::new(
            409,
            format!(
                "{ID_TAKEN} ({:?} is the name of a model an upstream serves)",
                c.id
            ),
        ));
    }
    presets::check_base_usable(&app.presets(), who, &c.id, &c.base_model_id).await?;
    presets::check_knowledge(&app.presets(), &user, &c.id, &c.meta).await?;
    let now = now_secs();
    let rec = PresetRecord {
        id: c.id,
        user_id: user.id.clone(),
        base_model_id: c.base_model_id,
        name: c.name,
        params: c.params,
        meta: c.meta,
        access_grants: grants,
        is_active: c.is_active.unwrap_or(true),
        created_at: now,
        updated_at: now,
    };
    let limits = &app.config.presets;
    match app
        .storage
        .meta
        .insert_preset(&rec, limits.max_per_user, limits.max_total)
        .await?
    {
        Ok(()) => {
            changed(app).await;
            Ok(Outcome::Reply(Reply::ok(&presets::model_json(&rec))))
        }
        Err(PresetRefusal::IdTaken) => Err(ApiError::new(409, ID_TAKEN)),
        Err(PresetRefusal::UserLimit) => Err(ApiError::forbidden(format!(
            "You have reached the limit of {} model presets per user (presets.max-per-user); \
             delete one first",
            limits.max_per_user
        ))),
        Err(PresetRefusal::TotalLimit) => Err(ApiError::forbidden(format!(
            "The gateway holds its limit of {} model presets (presets.max-total)",
            limits.max_total
        ))),
    }
}

/// Presets the caller can read, newest change first.
async fn readable_all(app: &App, user: &User) -> Result<Vec<PresetRecord>, ApiError> {
    let mut all: Vec<PresetRecord> = presets::all(&app.presets())
        .await?
        .into_iter()
        .filter(|p| presets::can_read(user, p))
        .collect();
    all.sort_by(|a, b| {
        b.updated_at
            .cmp(&a.updated_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    Ok(all)
}

/// `GET /api/v1/models/`: Open WebUI ≤0.6's list of workspace models (a JSON array).
pub async fn list_all(app: &App, ctx: &RequestCtx) -> HandlerResult {
    let user = &identity(ctx)?.user;
    let mut items: Vec<Value> = Vec::new();
    for p in readable_all(app, user).await? {
        items.push(presets::access_json(&app.presets(), user, &p).await?);
    }
    Ok(Outcome::Reply(Reply::ok(&items)))
}

/// `GET /api/v1/models/list`: Open WebUI 0.10's paginated list, with its filters
/// (`query`, `view_option=created|shared`, `tag`, `order_by`, `direction`, `page`).
pub async fn list(app: &App, session: &Session, ctx: &RequestCtx) -> HandlerResult {
    let user = &identity(ctx)?.user;
    let q = query(session);
    let page = page_param(q.as_deref())?;
    let text = http::query_param(q.as_deref(), "query").map(|s| s.to_lowercase());
    let view = http::query_param(q.as_deref(), "view_option");
    let tag = http::query_param(q.as_deref(), "tag").map(|s| s.to_lowercase());
    let mut items: Vec<PresetRecord> = readable_all(app, user)
        .await?
        .into_iter()
        .filter(|p| {
            text.as_ref().is_none_or(|t| {
                p.name.to_lowercase().contains(t.as_str())
                    || p.id.to_lowercase().contains(t.as_str())
            })
        })
        .filter(|p| match view.as_deref() {
            Some("created") => p.user_id == user.id,
            Some("shared") => p.user_id != user.id,
            _ => true,
        })
        .filter(|p| {
            tag.as_ref().is_none_or(|t| {
                p.meta
                    .get("tags")
                    .and_then(Value::as_array)
                    .is_some_and(|tags| {
                        tags.iter()
                            .any(|x| x["name"].as_str().is_some_and(|n| n.to_lowercase() == *t))
                    })
            })
        })
        .collect();
    match http::query_param(q.as_deref(), "order_by").as_deref() {
        Some("name") => items.sort_by(|a, b| a.name.cmp(&b.name)),
        Some("created_at") => items.sort_by_key(|p| p.created_at),
        Some("updated_at") => items.sort_by_key(|p| p.updated_at),
        _ => {}
    }
    if http::query_param(q.as_deref(), "direction").as_deref() == Some("desc")
        && http::query_param(q.as_deref(), "order_by").is_some()
    {
        items.reverse();
    }
    let total = items.len();
    let mut page_items: Vec<Value> = Vec::new();
    for p in page_of(&items, page, PAGE_SIZE) {
        page_items.push(presets::access_json(&app.presets(), user, p).await?);
    }
    Ok(Outcome::Reply(Reply::ok(
        &json!({"items": page_items, "total": total}),
    )))
}

pub async fn get(app: &App, session: &Session, ctx: &RequestCtx) -> HandlerResult {
    let user = &identity(ctx)?.user;
    let p = readable(app, user, &id_param(session)?).await?;
    Ok(Outcome::Reply(Reply::ok(
        &presets::access_json(&app.presets(), user, &p).await?,
    )))
}

pub async fn update(app: &App, session: &mut Session, ctx: &RequestCtx) -> HandlerResult {
    let who = writer(ctx)?;
    let user = who.user.clone();
    let id = id_param(session)?;
    let mut p = writable(app, &user, &id).await?;
    let mut form = form(app, session).await?;
    let grants = form.access_grants.take();
    // The id is the query's; a form's own id (exports carry one) does not rename.
    form.id.clone_from(&p.id);
    let c = presets::check_form(form, app.config.rag.max_items)?;
    if let Some(g) = grants {
        // Clients send the whole form back: unchanged grants are not a change of sharing,
        // so a write grantee may still edit the preset.
        let new = presets::parse_grants(g)?;
        let key = |g: &Grant| {
            (
                g.principal_type.clone(),
                g.principal_id.clone(),
                g.permission.clone(),
            )
        };
        let old: BTreeSet<_> = p.access_grants.iter().map(key).collect();
        if new.iter().map(key).collect::<BTreeSet<_>>() != old {
            may_set_grants(&user, &p.user_id, &new)?;
            p.access_grants = new;
        }
    }
    if c.base_model_id != p.base_model_id {
        presets::check_base_usable(&app.presets(), who, &p.id, &c.base_model_id).await?;
    }
    presets::check_knowledge(&app.presets(), &user, &p.id, &c.meta).await?;
    p.base_model_id = c.base_model_id;
    p.name = c.name;
    p.params = c.params;
    p.meta = c.meta;
    if let Some(active) = c.is_active {
        p.is_active = active;
    }
    p.updated_at = now_secs();
    let updated = app.storage.meta.update_preset(&p).await?;
    changed(app).await;
    if !updated {
        return Err(ApiError::not_found(format!(
            "Model preset {id:?} not found"
        )));
    }
    Ok(Outcome::Reply(Reply::ok(&presets::model_json(&p))))
}

pub async fn toggle(app: &App, session: &Session, ctx: &RequestCtx) -> HandlerResult {
    let user = writer(ctx)?.user.clone();
    let id = id_param(session)?;
    let mut p = writable(app, &user, &id).await?;
    p.is_active = !p.is_active;
    p.updated_at = now_secs();
    let updated = app.storage.meta.update_preset(&p).await?;
    changed(app).await;
    if !updated {
        return Err(ApiError::not_found(format!(
            "Model preset {id:?} not found"
        )));
    }
    Ok(Outcome::Reply(Reply::ok(
        &presets::access_json(&app.presets(), &user, &p).await?,
    )))
}

pub async fn delete(app: &App, session: &Session, ctx: &RequestCtx) -> HandlerResult {
    let user = writer(ctx)?.user.clone();
    let id = id_param(session)?;
    let p = writable(app, &user, &id).await?;
    let deleted = app.storage.meta.delete_preset(&p.id).await?;
    changed(app).await;
    Ok(Outcome::Reply(Reply::ok(&deleted)))
}

/// A preset was written: this replica's copy goes at once, the other replicas' when the
/// signal reaches them (or within the copy's TTL if it cannot be sent).
async fn changed(app: &App) {
    app.preset_cache.forget();
    if let Err(e) = app.storage.signals.publish(&Signal::ModelsChanged).await {
        tracing::warn!(
            error = %e,
            ttl = ?presets::PRESET_CACHE_TTL,
            "cannot tell other replicas that a model preset changed; their copies expire within the TTL"
        );
    }
}
