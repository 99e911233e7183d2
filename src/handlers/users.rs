//! `/api/v1/users/*`: user administration, shaped as Open WebUI's (admin only, except
//! `GET /users/{id}`, which any verified user may call for a name and picture).

use crate::forms::UserUpdateForm;
use pingora::proxy::Session;
use serde_json::{Value, json};

use super::auths::{self, Refusal};
use super::{HandlerResult, Outcome, Req, identity, query};
use crate::app::App;
use crate::auth::password;
use crate::error::{ApiError, msg};
use crate::http::{self, Reply};
use crate::request::RequestCtx;
use crate::store::{Role, StoreError, User};

/// Users per page of `GET /users/`, as Open WebUI.
const PAGE_SIZE: usize = 30;
/// Longest `query` of a listing: longer can match no name or email anyway.
const MAX_QUERY_BYTES: usize = 512;
/// Why the primary admin cannot be changed by others or demoted.
const PRIMARY_ADMIN_PROTECTED: &str =
    "The primary (first) admin cannot be demoted, deleted or changed by another admin";

/// Open WebUI's `UserModel`. Fields ragway does not keep are `null`; `last_active_at` is
/// the last change of the account (ragway writes nothing per request).
pub fn user_json(u: &User) -> Value {
    json!({
        "id": u.id,
        "name": u.name,
        "email": u.email,
        "username": null,
        "role": u.role.as_str(),
        "profile_image_url": u.profile_image_url,
        "bio": null,
        "gender": null,
        "date_of_birth": null,
        "info": null,
        "settings": null,
        "oauth_sub": null,
        "last_active_at": u.updated_at,
        "updated_at": u.updated_at,
        "created_at": u.created_at,
        "group_ids": [],
    })
}

/// Sort keys of a listing.
#[derive(Clone, Copy)]
enum OrderBy {
    Name,
    Email,
    Role,
    CreatedAt,
    UpdatedAt,
}

fn order_by(q: Option<&str>) -> Result<(OrderBy, bool), ApiError> {
    let by = match http::query_param(q, "order_by").as_deref() {
        None | Some("" | "created_at") => OrderBy::CreatedAt,
        Some("name") => OrderBy::Name,
        Some("email") => OrderBy::Email,
        Some("role") => OrderBy::Role,
        Some("updated_at" | "last_active_at") => OrderBy::UpdatedAt,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "order_by must be one of name, email, role, created_at, updated_at, \
                 last_active_at; got {:?}",
                other.chars().take(64).collect::<String>()
            )));
        }
    };
    let desc = match http::query_param(q, "direction").as_deref() {
        None | Some("") => matches!(by, OrderBy::CreatedAt | OrderBy::UpdatedAt),
        Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "direction must be asc or desc; got {:?}",
                other.chars().take(64).collect::<String>()
            )));
        }
    };
    Ok((by, desc))
}

fn sorted(mut users: Vec<User>, by: OrderBy, desc: bool) -> Vec<User> {
    users.sort_by(|a, b| {
        let o = match by {
            OrderBy::Name => a.name.to_lowercase().cmp(&b.name.to_lowercase()),
            OrderBy::Email => a.email.cmp(&b.email),
            OrderBy::Role => a.role.as_str().cmp(b.role.as_str()),
            OrderBy::CreatedAt => a.created_at.cmp(&b.created_at),
            OrderBy::UpdatedAt => a.updated_at.cmp(&b.updated_at),
        };
        let o = if desc { o.reverse() } else { o };
        o.then_with(|| a.id.cmp(&b.id))
    });
    users
}

/// `GET /users/?query=&order_by=&direction=&page=`: 30 per page, `query` matching name
/// or email (case-insensitive).
pub fn list(app: &App, session: &Session) -> HandlerResult {
    let q = query(session);
    let page = super::files::page_param(q.as_deref())?;
    let needle = http::query_param(q.as_deref(), "query").unwrap_or_default();
    if needle.len() > MAX_QUERY_BYTES {
        return Err(ApiError::bad_request(format!(
            "query is longer than {MAX_QUERY_BYTES} bytes"
        )));
    }
    let needle = needle.trim().to_lowercase();
    let (by, desc) = order_by(q.as_deref())?;
    let users: Vec<User> = app
        .store
        .users()?
        .into_iter()
        .filter(|u| {
            needle.is_empty()
                || u.name.to_lowercase().contains(&needle)
                || u.email.contains(&needle)
        })
        .collect();
    let users = sorted(users, by, desc);
    let total = users.len();
    let items: Vec<Value> = super::files::page_of(&users, page, PAGE_SIZE)
        .iter()
        .map(user_json)
        .collect();
    Ok(Outcome::Reply(Reply::ok(
        &json!({"users": items, "total": total}),
    )))
}

/// `GET /users/all`: every user, oldest first.
pub fn all(app: &App) -> HandlerResult {
    let users = sorted(app.store.users()?, OrderBy::CreatedAt, false);
    let total = users.len();
    let items: Vec<Value> = users.iter().map(user_json).collect();
    Ok(Outcome::Reply(Reply::ok(
        &json!({"users": items, "total": total}),
    )))
}

/// `GET /users/{id}`: the public face of a user (name and picture), for any verified user.
pub fn get(app: &App, req: &Req) -> HandlerResult {
    match app.store.user_by_id(req.id())? {
        Some(u) => Ok(Outcome::Reply(Reply::ok(
            &json!({"name": u.name, "profile_image_url": u.profile_image_url}),
        ))),
        None => Err(ApiError::not_found(msg::NOT_FOUND)),
    }
}

/// `POST /users/{id}/update`: approve, change role, rename, change email, reset password.
pub async fn update(
    app: &App,
    session: &mut Session,
    ctx: &RequestCtx,
    req: &Req,
) -> HandlerResult {
    auths::answer(update_inner(app, session, ctx, req).await)
}

async fn update_inner(
    app: &App,
    session: &mut Session,
    ctx: &RequestCtx,
    req: &Req,
) -> Result<Outcome, Refusal> {
    let caller = identity(ctx)?.user.clone();
    let body = http::read_body(session, 64 * 1024).await?;
    let form: UserUpdateForm = http::parse_json(&body)?;
    let target = app
        .store
        .user_by_id(req.id())?
        .ok_or_else(|| ApiError::not_found(msg::NOT_FOUND))?;
    let role = match form.role.as_deref() {
        None => None,
        Some(r) => Some(Role::parse(r).ok_or_else(|| {
            ApiError::bad_request(format!(
                "Invalid role {:?}: use admin, user or pending",
                r.chars().take(64).collect::<String>()
            ))
        })?),
    };
    let name = form.name.as_deref().map(auths::validate_name).transpose()?;
    let email = form
        .email
        .as_deref()
        .map(auths::validate_email)
        .transpose()?;
    if let Some(url) = &form.profile_image_url {
        auths::validate_image_url(url)?;
    }
    if let Some(p) = &form.password {
        auths::validate_password(p)?;
    }
    if app.store.primary_admin()?.as_deref() == Some(target.id.as_str()) {
        if caller.id != target.id {
            return Err(ApiError::forbidden(PRIMARY_ADMIN_PROTECTED).into());
        }
        if role.is_some_and(|r| r != Role::Admin) {
            return Err(ApiError::forbidden(PRIMARY_ADMIN_PROTECTED).into());
        }
    }
    if let Some(e) = &email
        && *e != target.email
        && app.store.user_by_email(e)?.is_some()
    {
        // Answered before hashing: a taken email costs no argon2 run.
        return Err(ApiError::bad_request(msg::EMAIL_TAKEN).into());
    }
    let new_hash = match form.password {
        Some(p) => Some(auths::hashed(app, move || password::hash(&p)).await?),
        None => None,
    };
    let result = app.store.update_user(&target.id, |u| {
        if let Some(r) = role {
            // Approving a pending user grants more, so their waiting session carries on;
            // any other role change ends every session (Open WebUI keeps them valid).
            if r != u.role && u.role != Role::Pending {
                u.revoke_sessions(None);
            }
            u.role = r;
        }
        if let Some(n) = name {
            u.name = n;
        }
        if let Some(e) = email {
            u.email = e;
        }
        if let Some(url) = form.profile_image_url {
            u.profile_image_url = url;
        }
        if let Some(h) = new_hash {
            u.password_hash = h;
            u.revoke_sessions(None);
        }
        Ok::<(), ApiError>(())
    });
    let user = match result {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => return Err(e.into()),
        Err(StoreError::EmailTaken) => return Err(ApiError::bad_request(msg::EMAIL_TAKEN).into()),
        Err(StoreError::NoSuchUser) => return Err(ApiError::not_found(msg::NOT_FOUND).into()),
        Err(e) => return Err(e.into()),
    };
    // Cached API keys carry the user record: the new role applies to the next request.
    app.auth.forget_cached_keys();
    tracing::info!(admin = %caller.id, user = %user.id, role = user.role.as_str(), "user updated");
    Ok(Outcome::Reply(Reply::ok(&user_json(&user))))
}

/// `DELETE /users/{id}`: not the primary admin, not oneself. Sign-in, sessions and the API
/// key stop at once (one transaction); files and collections follow, and a crash before
/// they are all gone is finished at the next start.
pub async fn delete(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let caller = &identity(ctx)?.user;
    let id = req.id();
    if caller.id == id {
        return Err(ApiError::forbidden(
            "You cannot delete your own account: ask another admin",
        ));
    }
    if app.store.primary_admin()?.as_deref() == Some(id) {
        return Err(ApiError::forbidden(PRIMARY_ADMIN_PROTECTED));
    }
    let Some(user) = app.store.delete_user(id)? else {
        return Err(ApiError::not_found(msg::NOT_FOUND));
    };
    app.auth.forget_cached_keys();
    tracing::info!(admin = %caller.id, user = %user.id, "user deleted");
    app.library().remove_user_data(id).await?;
    Ok(Outcome::Reply(Reply::ok(&true)))
}
