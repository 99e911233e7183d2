//! `/api/v1/auths/*`: sign-up, sign-in, session, sign-out, users and API keys.

use crate::forms::{
    AddUserForm, ApiKeyForm, SigninForm, SignupForm, UpdatePasswordForm, UpdateProfileForm,
};
use std::time::Duration;

use pingora::proxy::Session;
use serde_json::{Value, json};

use super::{HandlerResult, Outcome, identity};
use crate::app::App;
use crate::auth::password::GateError;
use crate::auth::{self, Credential, password, ratelimit};
use crate::error::{ApiError, msg};
use crate::http::{self, Reply};
use crate::store::{ApiKeyRecord, Role, StoreError, User, now_secs};

/// Longest email accepted (RFC 5321's path limit).
const MAX_EMAIL_LEN: usize = 254;

/// Suggested wait when every password-hashing slot is taken.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(2);

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

impl From<crate::store::StoreError> for Refusal {
    fn from(e: crate::store::StoreError) -> Self {
        Refusal::Error(e.into())
    }
}

impl Refusal {
    fn error(self) -> ApiError {
        match self {
            Refusal::Error(e) | Refusal::RetryAfter(e, _) => e,
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

fn rate_limited(wait: Duration) -> Refusal {
    crate::metrics::auth_failure("rate_limited");
    Refusal::RetryAfter(ApiError::new(429, msg::RATE_LIMITED), wait)
}

/// Runs password work through the hashing gate.
pub(crate) async fn hashed<T, F>(app: &App, work: F) -> Result<T, Refusal>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match app.auth.hashing.run(work).await {
        Ok(v) => Ok(v),
        Err(GateError::Busy) => {
            crate::metrics::auth_failure("hashing_busy");
            tracing::debug!("password hashing queue full; attempt refused");
            Err(Refusal::RetryAfter(
                ApiError::new(
                    503,
                    "Too many sign-in attempts are being processed; retry shortly",
                ),
                BUSY_RETRY_AFTER,
            ))
        }
        Err(GateError::Failed) => Err(ApiError::internal("Password hashing failed").into()),
    }
}

/// Counts an attempt against the client address's budget (sign-in and sign-up share it).
fn check_address(app: &App, session: &Session) -> Result<(), Refusal> {
    let Some(ip) = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(std::net::SocketAddr::ip)
    else {
        // Unix-socket clients have no address to limit; the per-email limit still holds.
        return Ok(());
    };
    let key = ratelimit::address_key(ip);
    app.auth.address_limiter.allow(&key).map_err(|wait| {
        tracing::debug!(client = %key, "sign-in attempts over the per-address limit");
        rate_limited(wait)
    })
}

pub(crate) fn validate_email(email: &str) -> Result<String, ApiError> {
    let e = email.trim().to_lowercase();
    let valid = e.len() <= MAX_EMAIL_LEN
        && e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        })
        && !e.contains(char::is_whitespace);
    if valid {
        Ok(e)
    } else {
        Err(ApiError::bad_request("Invalid email format"))
    }
}

pub(crate) fn validate_password(p: &str) -> Result<(), ApiError> {
    if p.is_empty() {
        return Err(ApiError::bad_request("Password must not be empty"));
    }
    if p.len() > 1024 {
        return Err(ApiError::bad_request(
            "Password is too long (1024 bytes at most)",
        ));
    }
    Ok(())
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

/// Longest display name accepted.
const MAX_NAME_LEN: usize = 256;
/// Longest `profile_image_url` (Open WebUI's UI sends small data URLs).
const MAX_IMAGE_URL_LEN: usize = 16 * 1024;

/// A trimmed, non-empty display name of bounded size.
pub(crate) fn validate_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ApiError::bad_request("Name must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ApiError::bad_request(format!(
            "Name is too long ({MAX_NAME_LEN} bytes at most)"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "Name must not contain control characters",
        ));
    }
    Ok(name.to_string())
}

pub(crate) fn validate_image_url(url: &str) -> Result<(), ApiError> {
    if url.len() > MAX_IMAGE_URL_LEN {
        return Err(ApiError::bad_request(
            "profile_image_url is too long (16 KiB at most)",
        ));
    }
    Ok(())
}

/// Account commands of the command line (`ragway user add`, `ragway key create`): the same
/// checks as the HTTP routes, so they are defined here rather than in the wiring.
impl App {
    /// `ragway user add`: creates a user (the very first one becomes admin).
    pub async fn add_user(
        &self,
        email: &str,
        password: &str,
        name: &str,
        role: Role,
    ) -> Result<User, ApiError> {
        create_user(self, name, email, password, None, role, true).await
    }

    /// `ragway key create`: replaces the user's key and returns the plaintext.
    pub fn create_key(&self, email: &str, models: Vec<String>) -> Result<String, ApiError> {
        let user = self
            .store
            .user_by_email(&email.trim().to_lowercase())?
            .ok_or_else(|| ApiError::not_found(format!("No user with email {email}")))?;
        issue_key(self, &user.id, models, crate::limits::Limits::default())
    }
}

/// Creates a user with a hashed password. Hashing goes through the hashing gate: argon2 is
/// deliberately slow and memory-hard and must neither stall the event loop nor run unbounded.
pub(crate) async fn create_user(
    app: &App,
    name: &str,
    email: &str,
    password: &str,
    profile_image_url: Option<String>,
    role: Role,
    first_is_admin: bool,
) -> Result<User, ApiError> {
    create_user_gated(
        app,
        name,
        email,
        password,
        profile_image_url,
        role,
        first_is_admin,
    )
    .await
    .map_err(Refusal::error)
}

async fn create_user_gated(
    app: &App,
    name: &str,
    email: &str,
    password: &str,
    profile_image_url: Option<String>,
    role: Role,
    first_is_admin: bool,
) -> Result<User, Refusal> {
    let email = validate_email(email)?;
    validate_password(password)?;
    let name = validate_name(name)?;
    let name = name.as_str();
    if let Some(u) = &profile_image_url {
        validate_image_url(u)?;
    }
    if app.store.user_by_email(&email)?.is_some() {
        // Answered before hashing: a taken email costs no argon2 run.
        return Err(ApiError::bad_request(msg::EMAIL_TAKEN).into());
    }
    let pw = password.to_string();
    let hash = hashed(app, move || password::hash(&pw)).await?;
    let mut user = User::new(&email, name, role, hash);
    if let Some(url) = profile_image_url.filter(|u| !u.is_empty()) {
        user.profile_image_url = url;
    }
    match app.store.create_user(user, first_is_admin) {
        Ok(u) => Ok(u),
        Err(StoreError::EmailTaken) => Err(ApiError::bad_request(msg::EMAIL_TAKEN).into()),
        Err(e) => Err(e.into()),
    }
}

pub async fn signup(app: &App, session: &mut Session) -> HandlerResult {
    answer(signup_inner(app, session).await)
}

async fn signup_inner(app: &App, session: &mut Session) -> Result<Outcome, Refusal> {
    let body = http::read_body(session, 64 * 1024).await?;
    let form: SignupForm = http::parse_json(&body)?;
    if app.store.user_count()? > 0 && !app.config.auth.enable_signup {
        return Err(ApiError::forbidden(msg::ACCESS_PROHIBITED).into());
    }
    check_address(app, session)?;
    let user = create_user_gated(
        app,
        &form.name,
        &form.email,
        &form.password,
        form.profile_image_url,
        app.config.auth.default_user_role,
        true,
    )
    .await?;
    tracing::info!(user = %user.id, role = user.role.as_str(), "user signed up");
    Ok(Outcome::Reply(session_reply(app, &user)))
}

pub async fn signin(app: &App, session: &mut Session) -> HandlerResult {
    answer(signin_inner(app, session).await)
}

async fn signin_inner(app: &App, session: &mut Session) -> Result<Outcome, Refusal> {
    let body = http::read_body(session, 64 * 1024).await?;
    let form: SigninForm = http::parse_json(&body)?;
    let email = form.email.trim().to_lowercase();
    // Bounds the limiter's keys too: no email longer than this can exist.
    if email.is_empty() || email.len() > MAX_EMAIL_LEN {
        return Err(ApiError::bad_request("Invalid email format").into());
    }
    validate_password(&form.password)?;
    check_address(app, session)?;
    app.auth.limiter.allow(&email).map_err(rate_limited)?;
    let user = app.store.user_by_email(&email)?;
    let phc = user.as_ref().map(|u| u.password_hash.clone());
    let pw = form.password;
    // An unknown email is verified against a dummy hash, so the answer takes as long either
    // way; the dummy is made on the blocking pool too (the first time it is needed).
    let ok = hashed(app, move || match &phc {
        Some(phc) => password::verify(&pw, phc),
        None => password::verify(&pw, password::dummy_hash()),
    })
    .await?;
    match user {
        Some(u) if ok => {
            tracing::info!(user = %u.id, "user signed in");
            Ok(Outcome::Reply(session_reply(app, &u)))
        }
        _ => {
            crate::metrics::auth_failure("bad_password");
            Err(ApiError::bad_request(msg::INVALID_CRED).into())
        }
    }
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

pub fn signout(app: &App, ctx: &crate::request::RequestCtx) -> HandlerResult {
    let id = identity(ctx)?;
    if let Credential::Jwt { jti, exp } = &id.credential {
        app.store.revoke_token(jti, *exp)?;
    }
    Ok(Outcome::Reply(
        Reply::ok(&json!({"status": true}))
            .with_header(::http::header::SET_COOKIE, clear_cookie())
            .with_header(::http::header::SET_COOKIE, clear_csrf_cookie()),
    ))
}

pub async fn add_user(app: &App, session: &mut Session) -> HandlerResult {
    let body = http::read_body(session, 64 * 1024).await?;
    let form: AddUserForm = http::parse_json(&body)?;
    let role = match form.role.as_deref() {
        None => Role::Pending,
        Some(r) => Role::parse(r).ok_or_else(|| {
            ApiError::bad_request(format!("Invalid role {r:?}: use admin, user or pending"))
        })?,
    };
    let user = create_user(
        app,
        &form.name,
        &form.email,
        &form.password,
        form.profile_image_url,
        role,
        false,
    )
    .await?;
    Ok(Outcome::Reply(new_session(app, &user).0))
}

/// Key management needs a session or an unrestricted key: a key limited to some models
/// must not mint, read or delete keys (it would mint itself an unrestricted one).
fn may_manage_keys(app: &App, ctx: &crate::request::RequestCtx) -> Result<(), ApiError> {
    let id = identity(ctx)?;
    if id.restricted_key {
        crate::metrics::auth_failure("restricted_key");
        return Err(ApiError::forbidden(auth::RESTRICTED_KEY));
    }
    if !app.config.auth.enable_api_keys || id.user.role == Role::Pending {
        return Err(ApiError::forbidden(msg::API_KEY_NOT_ALLOWED));
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
    let key = issue_key(app, &id.user.id, form.models, limits)?;
    Ok(Outcome::Reply(Reply::ok(&json!({"api_key": key}))))
}

/// Stores a new key for `user_id` and returns its plaintext.
pub fn issue_key(
    app: &App,
    user_id: &str,
    models: Vec<String>,
    limits: crate::limits::Limits,
) -> Result<String, ApiError> {
    let key = auth::generate_key();
    let record = ApiKeyRecord {
        user_id: user_id.to_string(),
        prefix: key.plaintext[..11].to_string(),
        created_at: now_secs(),
        models,
        limits,
    };
    app.store.put_api_key(&key.hash, &record)?;
    app.auth.forget_cached_keys();
    Ok(key.plaintext)
}

/// The key's prefix and metadata; the secret itself is not stored and cannot be shown.
pub fn get_api_key(app: &App, ctx: &crate::request::RequestCtx) -> HandlerResult {
    may_manage_keys(app, ctx)?;
    let id = identity(ctx)?;
    match app.store.api_key_of_user(&id.user.id)? {
        Some((_, rec)) => Ok(Outcome::Reply(Reply::ok(&json!({
            "api_key": format!("{}…", rec.prefix),
            "prefix": rec.prefix,
            "created_at": rec.created_at,
            "models": rec.models,
            "limits": rec.limits,
        })))),
        None => Err(ApiError::not_found(msg::API_KEY_NOT_FOUND)),
    }
}

pub fn delete_api_key(app: &App, ctx: &crate::request::RequestCtx) -> HandlerResult {
    may_manage_keys(app, ctx)?;
    let id = identity(ctx)?;
    let removed = app.store.delete_api_key_of_user(&id.user.id)?.is_some();
    app.auth.forget_cached_keys();
    Ok(Outcome::Reply(Reply::ok(&removed)))
}

/// Profile and password changes need a session or an unrestricted key: a key limited to
/// some models must not take over the account it belongs to.
fn may_change_account(ctx: &crate::request::RequestCtx) -> Result<&auth::Identity, ApiError> {
    let id = identity(ctx)?;
    if id.restricted_key {
        crate::metrics::auth_failure("restricted_key");
        return Err(ApiError::forbidden(auth::RESTRICTED_KEY));
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
    validate_password(&form.password)?;
    validate_password(&form.new_password)?;
    check_address(app, session)?;
    app.auth
        .limiter
        .allow(&id.user.email)
        .map_err(rate_limited)?;
    let phc = id.user.password_hash.clone();
    let (old, new) = (form.password, form.new_password);
    let hash = hashed(app, move || {
        password::verify(&old, &phc).then(|| password::hash(&new))
    })
    .await?;
    let Some(hash) = hash else {
        crate::metrics::auth_failure("bad_password");
        return Err(ApiError::bad_request("Incorrect password").into());
    };
    let keep = match &id.credential {
        Credential::Jwt { jti, .. } => Some(jti.clone()),
        Credential::ApiKey => None,
    };
    match app.store.update_user(&id.user.id, |u| {
        u.password_hash = hash;
        u.revoke_sessions(keep);
        Ok::<(), ApiError>(())
    }) {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(StoreError::NoSuchUser) => {
            return Err(ApiError::unauthorized(msg::SESSION_EXPIRED).into());
        }
        Err(e) => return Err(e.into()),
    }
    app.auth.forget_cached_keys();
    tracing::info!(user = %id.user.id, "password changed; other sessions revoked");
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
    let name = validate_name(&form.name)?;
    if let Some(u) = &form.profile_image_url {
        validate_image_url(u)?;
    }
    let user = match app.store.update_user(&id.user.id, |u| {
        u.name = name;
        if let Some(url) = form.profile_image_url.filter(|u| !u.is_empty()) {
            u.profile_image_url = url;
        }
        Ok::<(), ApiError>(())
    }) {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => return Err(e),
        Err(StoreError::NoSuchUser) => return Err(ApiError::unauthorized(msg::SESSION_EXPIRED)),
        Err(e) => return Err(e.into()),
    };
    app.auth.forget_cached_keys();
    Ok(Outcome::Reply(Reply::ok(&json!({
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "role": user.role.as_str(),
        "profile_image_url": user.profile_image_url,
    }))))
}
