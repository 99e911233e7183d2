//! `/api/v1/auths/*`: sign-up, sign-in, session, sign-out, users and API keys. The account
//! logic is `auth::accounts`; these handlers read the request and shape the answer.

use crate::forms::{
    AddUserForm, ApiKeyForm, SigninForm, SignupForm, UpdatePasswordForm, UpdateProfileForm,
};
use std::net::IpAddr;
use std::time::Duration;

use serde_json::{Value, json};

use super::{HandlerResult, Outcome, identity};
use crate::app::App;
use crate::auth::accounts::NewUser;
use crate::auth::{self, AuthError, Credential};
use crate::error::{ApiError, msg};
use crate::http::{self, Reply, Session};
use crate::store::{Role, User, now_secs};

/// A refusal, possibly with a `Retry-After` (rate limits, hashing overload).
pub(crate) enum Refusal {
    Error(ApiError),
    RetryAfter(ApiError, Duration),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal::Error(e)
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        match e.retry_after() {
            Some(wait) => Refusal::RetryAfter(e.into(), wait),
            None => Refusal::Error(e.into()),
        }
    }
}

/// A refusal with `Retry-After` is an answer of its own (the error type carries no headers).
pub(crate) fn answer(result: Result<Outcome, Refusal>) -> HandlerResult {
    match result {
        Ok(o) => Ok(o),
        Err(Refusal::Error(e)) => Err(e),
        Err(Refusal::RetryAfter(e, wait)) => {
            // Whole seconds, rounded up, at least 1: "0" would invite an immediate retry.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Ok(Outcome::Reply(Reply::from(e).with_header(
                ::http::header::RETRY_AFTER,
                secs.max(1).to_string(),
            )))
        }
    }
}

/// The client's address, for per-address sign-in limits. Unix-socket clients have none
/// (the per-email limit still holds).
fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(std::net::SocketAddr::ip)
}

/// Permissions object of the session response, shaped like Open WebUI's.
fn permissions(role: Role) -> Value {
    let admin = role == Role::Admin;
    json!({
        "workspace": {"models": admin, "knowledge": admin, "prompts": admin, "tools": admin},
        "sharing": {"public_models": admin, "public_knowledge": admin, "public_prompts": admin, "public_tools": admin},
        "chat": {"controls": true, "file_upload": true, "delete": true, "edit": true, "temporary": true},
        "features": {"api_keys": role != Role::Pending, "web_search": false, "image_generation": false, "code_interpreter": false},
        "settings": {"interface": true},
    })
}

/// Open WebUI's `SessionUserResponse`.
fn session_body(user: &User, token: Option<&str>, expires_at: Option<u64>) -> Value {
    json!({
        "token": token,
        "token_type": "Bearer",
        "expires_at": expires_at,
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "role": user.role.as_str(),
        "profile_image_url": user.profile_image_url,
        "permissions": permissions(user.role),
    })
}

fn token_cookie(token: &str, expires_at: Option<u64>) -> String {
    let mut c = format!("token={token}; Path=/; HttpOnly; SameSite=Lax");
    if let Some(exp) = expires_at {
        c.push_str(&format!("; Max-Age={}", exp.saturating_sub(now_secs())));
    }
    c
}

fn clear_cookie() -> String {
    "token=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0".to_string()
}

/// The CSRF token of a session, readable by the page (so not `HttpOnly`); it lives as long
/// as the session cookie.
fn csrf_cookie(app: &App, token: &str, expires_at: Option<u64>) -> String {
    let mut c = format!(
        "{}={}; Path=/; SameSite=Strict",
        auth::csrf::COOKIE,
        app.auth.csrf.token(token)
    );
    if let Some(exp) = expires_at {
        c.push_str(&format!("; Max-Age={}", exp.saturating_sub(now_secs())));
    }
    c
}

fn clear_csrf_cookie() -> String {
    format!(
        "{}=; Path=/; SameSite=Strict; Max-Age=0",
        auth::csrf::COOKIE
    )
}

/// A new session for `user`, without cookies (an admin creating a user must keep their own).
fn new_session(app: &App, user: &User) -> (Reply, String, Option<u64>) {
    let (token, exp) =
        app.auth
            .jwt
            .issue_in_epoch(&user.id, user.session_epoch, app.config.auth.jwt_expires_in);
    (
        Reply::ok(&session_body(user, Some(&token), exp)),
        token,
        exp,
    )
}

/// Issues a session for `user` with its cookies (the session and its CSRF token).
fn session_reply(app: &App, user: &User) -> Reply {
    let (reply, token, exp) = new_session(app, user);
    reply
        .with_header(::http::header::SET_COOKIE, token_cookie(&token, exp))
        .with_header(::http::header::SET_COOKIE, csrf_cookie(app, &token, exp))
}

pub async fn signup(app: &App, session: &mut Session) -> HandlerResult {
    answer(signup_inner(app, session).await)
}

async fn signup_inner(app: &App, session: &mut Session) -> Result<Outcome, Refusal> {
    let body = http::read_body(session, 64 * 1024).await?;
    let form: SignupForm = http::parse_json(&body)?;
    let new = NewUser {
        name: form.name,
        email: form.email,
        password: form.password,
        profile_image_url: form.profile_image_url,
    };
    let user = app.auth.accounts().sign_up(new, client_ip(session)).await?;
    Ok(Outcome::Reply(session_reply(app, &user)))
}

pub async fn signin(app: &App, session: &mut Session) -> HandlerResult {
    answer(signin_inner(app, session).await)
}

async fn signin_inner(app: &App, session: &mut Session) -> Result<Outcome, Refusal> {
    let body = http::read_body(session, 64 * 1024).await?;
    let form: SigninForm = http::parse_json(&body)?;
    let user = app
        .auth
        .accounts()
        .sign_in(&form.email, form.password, client_ip(session))
        .await?;
    Ok(Outcome::Reply(session_reply(app, &user)))
}

pub fn session_user(
    app: &App,
    session: &Session,
    ctx: &crate::request::RequestCtx,
) -> HandlerResult {
    let id = identity(ctx)?;
    let (token, exp) = match &id.credential {
        // The session's own JWT is echoed back, as Open WebUI does; an API key is not.
        Credential::Jwt { exp, .. } => (
            app.auth
                .credential(&session.req_header().headers)
                .filter(|t| !t.starts_with("sk-")),
            *exp,
        ),
        Credential::ApiKey => (None, None),
    };
    let mut body = session_body(&id.user, token, exp);
    // A page loaded with a session cookie gets its CSRF token (again), so a session made
    // before the token existed, or whose token cookie was lost, can still write.
    let csrf = match (
        &id.credential,
        app.auth.credential_source(&session.req_header().headers),
    ) {
        (Credential::Jwt { exp, .. }, Some((cred, true))) => Some(csrf_cookie(app, cred, *exp)),
        _ => None,
    };
    for k in [
        "bio",
        "gender",
        "date_of_birth",
        "status_emoji",
        "status_message",
        "status_expires_at",
    ] {
        body[k] = Value::Null;
    }
    let reply = Reply::ok(&body);
    Ok(Outcome::Reply(match csrf {
        Some(c) => reply.with_header(::http::header::SET_COOKIE, c),
        None => reply,
    }))
}

pub async fn signout(app: &App, ctx: &crate::request::RequestCtx) -> HandlerResult {
    let id = identity(ctx)?;
    app.auth.accounts().sign_out(&id.credential).await?;
    Ok(Outcome::Reply(
        Reply::ok(&json!({"status": true}))
            .with_header(::http::header::SET_COOKIE, clear_cookie())
            .with_header(::http::header::SET_COOKIE, clear_csrf_cookie()),
    ))
}

pub async fn add_user(app: &App, session: &mut Session) -> HandlerResult {
    answer(add_user_inner(app, session).await)
}

async fn add_user_inner(app: &App, session: &mut Session) -> Result<Outcome, Refusal> {
    let body = http::read_body(session, 64 * 1024).await?;
    let form: AddUserForm = http::parse_json(&body)?;
    let role = match form.role.as_deref() {
        None => Role::Pending,
        Some(r) => auth::accounts::parse_role(r)?,
    };
    let new = NewUser {
        name: form.name,
        email: form.email,
        password: form.password,
        profile_image_url: form.profile_image_url,
    };
    let user = app.auth.accounts().create_user(new, role, false).await?;
    Ok(Outcome::Reply(new_session(app, &user).0))
}

/// Key management needs a session or an unrestricted key: a key limited to some models
/// must not mint, read or delete keys (it would mint itself an unrestricted one).
fn may_manage_keys(app: &App, ctx: &crate::request::RequestCtx) -> Result<(), AuthError> {
    let id = identity(ctx).map_err(|_| AuthError::NotAuthenticated)?;
    if id.restricted_key {
        crate::metrics::auth_failure("restricted_key");
        return Err(AuthError::RestrictedKey);
    }
    if !app.config.auth.enable_api_keys || id.user.role == Role::Pending {
        return Err(AuthError::KeysNotAllowed);
    }
    Ok(())
}

/// Creates (or replaces) the caller's key. The plaintext is in this response only.
pub async fn create_api_key(
    app: &App,
    session: &mut Session,
    ctx: &crate::request::RequestCtx,
) -> HandlerResult {
    may_manage_keys(app, ctx)?;
    let body = http::read_body(session, 64 * 1024).await?;
    let form: ApiKeyForm = if body.iter().all(u8::is_ascii_whitespace) {
        ApiKeyForm::default()
    } else {
        http::parse_json(&body)?
    };
    let id = identity(ctx)?;
    let limits = crate::limits::Limits::parse(form.limits.as_ref().unwrap_or(&Value::Null))?;
    if id.user.role != Role::Admin {
        limits.within(&app.usage.config.key)?;
    }
    let key = app
        .auth
        .accounts()
        .create_key(&id.user.id, form.models, limits)
        .await?;
    Ok(Outcome::Reply(Reply::ok(&json!({"api_key": key}))))
}

/// The key's prefix and metadata; the secret itself is not stored and cannot be shown.
pub async fn get_api_key(app: &App, ctx: &crate::request::RequestCtx) -> HandlerResult {
    may_manage_keys(app, ctx)?;
    let id = identity(ctx)?;
    match app.auth.accounts().key_of(&id.user.id).await? {
        Some(rec) => Ok(Outcome::Reply(Reply::ok(&json!({
            "api_key": format!("{}…", rec.prefix),
            "prefix": rec.prefix,
            "created_at": rec.created_at,
            "models": rec.models,
            "limits": rec.limits,
        })))),
        None => Err(ApiError::not_found(msg::API_KEY_NOT_FOUND)),
    }
}

pub async fn delete_api_key(app: &App, ctx: &crate::request::RequestCtx) -> HandlerResult {
    may_manage_keys(app, ctx)?;
    let id = identity(ctx)?;
    let removed = app.auth.accounts().delete_key(&id.user.id).await?;
    Ok(Outcome::Reply(Reply::ok(&removed)))
}

/// Profile and password changes need a session or an unrestricted key: a key limited to
/// some models must not take over the account it belongs to.
fn may_change_account(ctx: &crate::request::RequestCtx) -> Result<&auth::Identity, ApiError> {
    let id = identity(ctx)?;
    if id.restricted_key {
        crate::metrics::auth_failure("restricted_key");
        return Err(AuthError::RestrictedKey.into());
    }
    Ok(id)
}

/// `POST /auths/update/password`: checks the current password (limited and hashed as a
/// sign-in is), sets the new one and ends every other session of the user.
pub async fn update_password(
    app: &App,
    session: &mut Session,
    ctx: &crate::request::RequestCtx,
) -> HandlerResult {
    answer(update_password_inner(app, session, ctx).await)
}

async fn update_password_inner(
    app: &App,
    session: &mut Session,
    ctx: &crate::request::RequestCtx,
) -> Result<Outcome, Refusal> {
    let id = may_change_account(ctx)?.clone();
    let body = http::read_body(session, 64 * 1024).await?;
    let form: UpdatePasswordForm = http::parse_json(&body)?;
    app.auth
        .accounts()
        .change_password(&id, form.password, form.new_password, client_ip(session))
        .await?;
    Ok(Outcome::Reply(Reply::ok(&true)))
}

/// `POST /auths/update/profile`: name and picture; returns the user.
pub async fn update_profile(
    app: &App,
    session: &mut Session,
    ctx: &crate::request::RequestCtx,
) -> HandlerResult {
    let id = may_change_account(ctx)?.clone();
    let body = http::read_body(session, 64 * 1024).await?;
    let form: UpdateProfileForm = http::parse_json(&body)?;
    let user = app
        .auth
        .accounts()
        .update_profile(&id.user.id, &form.name, form.profile_image_url)
        .await?;
    Ok(Outcome::Reply(Reply::ok(&json!({
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "role": user.role.as_str(),
        "profile_image_url": user.profile_image_url,
    }))))
}
