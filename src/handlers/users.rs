//! `/api/v1/users/*`: user administration, shaped as Open WebUI's (admin only, except
//! `GET /users/{id}`, which any verified user may call for a name and picture).

use crate::forms::UserUpdateForm;
use crate::http::Session;
use serde_json::{Value, json};

use super::auths::{self, Refusal};
use super::{HandlerResult, Outcome, Req, identity, query};
use crate::app::App;
use crate::auth::accounts::UserUpdate;
use crate::error::{ApiError, msg};
use crate::http::{self, Reply};
use crate::request::RequestCtx;
use crate::store::User;

/// Users per page of `GET /users/`, as Open WebUI.
const PAGE_SIZE: usize = 30;
/// Longest `query` of a listing: longer can match no name or email anyway.
const MAX_QUERY_BYTES: usize = 512;

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
pub async fn list(app: &App, session: &Session) -> HandlerResult {
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
        .auth
        .accounts()
        .users()
        .await?
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
pub async fn all(app: &App) -> HandlerResult {
    let users = sorted(
        app.auth.accounts().users().await?,
        OrderBy::CreatedAt,
        false,
    );
    let total = users.len();
    let items: Vec<Value> = users.iter().map(user_json).collect();
    Ok(Outcome::Reply(Reply::ok(
        &json!({"users": items, "total": total}),
    )))
}

/// `GET /users/{id}`: the public face of a user (name and picture), for any verified user.
pub async fn get(app: &App, req: &Req) -> HandlerResult {
    match app.auth.accounts().user(req.id()).await? {
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
    let change = UserUpdate {
        role: form.role,
        name: form.name,
        email: form.email,
        profile_image_url: form.profile_image_url,
        password: form.password,
    };
    let user = app
        .auth
        .accounts()
        .update_user(&caller, req.id(), change)
        .await?;
    Ok(Outcome::Reply(Reply::ok(&user_json(&user))))
}

/// `DELETE /users/{id}`: not the primary admin, not oneself. Sign-in, sessions and the API
/// key stop at once (one transaction); files and collections follow, and a crash before
/// they are all gone is finished at the next start.
pub async fn delete(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let caller = &identity(ctx)?.user;
    let id = req.id();
    app.auth.accounts().delete_user(caller, id).await?;
    app.library().remove_user_data(id).await?;
    Ok(Outcome::Reply(Reply::ok(&true)))
}
