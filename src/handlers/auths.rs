//! `/api/v1/auths/*`: sign-up, sign-in, session, sign-out, users and API keys.

use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{HandlerResult, Outcome, identity};
use crate::app::App;
use crate::auth::{self, Credential, password};
use crate::error::{ApiError, msg};
use crate::http::{self, Reply};
use crate::store::{ApiKeyRecord, Role, StoreError, User, now_secs};

/// Body of `POST /auths/signup`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SignupForm {
    pub name: String,
    pub email: String,
    pub password: String,
    #[serde(default)]
    pub profile_image_url: Option<String>,
}

/// Body of `POST /auths/signin`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SigninForm {
    pub email: String,
    pub password: String,
}

/// Body of `POST /auths/add`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct AddUserForm {
    pub name: String,
    pub email: String,
    pub password: String,
    #[serde(default)]
    pub profile_image_url: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
}

/// Optional body of `POST /auths/api_key`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyForm {
    /// Restrict the key to these model ids.
    #[serde(default)]
    pub models: Vec<String>,
}

fn validate_email(email: &str) -> Result<String, ApiError> {
    let e = email.trim().to_lowercase();
    let valid = e.len() <= 254
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

fn validate_password(p: &str) -> Result<(), ApiError> {
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

/// Issues a session for `user` with its cookie.
fn session_reply(app: &App, user: &User) -> Reply {
    let (token, exp) = app.auth.jwt.issue(&user.id, app.config.auth.jwt_expires_in);
    Reply::ok(&session_body(user, Some(&token), exp))
        .with_header(::http::header::SET_COOKIE, token_cookie(&token, exp))
}

/// Creates a user with a hashed password. Hashing runs on the blocking pool: argon2 is
/// deliberately slow and must not stall the proxy's event loop.
pub(crate) async fn create_user(
    app: &App,
    name: &str,
    email: &str,
    password: &str,
    profile_image_url: Option<String>,
    role: Role,
    first_is_admin: bool,
) -> Result<User, ApiError> {
    let email = validate_email(email)?;
    validate_password(password)?;
    let name = name.trim();
    if name.is_empty() {
        return Err(ApiError::bad_request("Name must not be empty"));
    }
    let pw = password.to_string();
    let hash = tokio::task::spawn_blocking(move || password::hash(&pw))
        .await
        .map_err(|_| ApiError::internal("Password hashing failed"))?;
    let mut user = User::new(&email, name, role, hash);
    if let Some(url) = profile_image_url.filter(|u| !u.is_empty()) {
        user.profile_image_url = url;
    }
    match app.store.create_user(user, first_is_admin) {
        Ok(u) => Ok(u),
        Err(StoreError::EmailTaken) => Err(ApiError::bad_request(msg::EMAIL_TAKEN)),
        Err(e) => Err(e.into()),
    }
}

pub async fn signup(app: &App, session: &mut Session) -> HandlerResult {
    let body = http::read_body(session, 64 * 1024).await?;
    let form: SignupForm = http::parse_json(&body)?;
    if app.store.user_count()? > 0 && !app.config.auth.enable_signup {
        return Err(ApiError::forbidden(msg::ACCESS_PROHIBITED));
    }
    let user = create_user(
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
    let body = http::read_body(session, 64 * 1024).await?;
    let form: SigninForm = http::parse_json(&body)?;
    let email = form.email.trim().to_lowercase();
    if !app.auth.limiter.allow(&email) {
        crate::metrics::auth_failure("rate_limited");
        return Err(ApiError::new(429, msg::RATE_LIMITED));
    }
    let user = app.store.user_by_email(&email)?;
    let phc = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| password::dummy_hash().to_string());
    let pw = form.password;
    let ok = tokio::task::spawn_blocking(move || password::verify(&pw, &phc))
        .await
        .unwrap_or(false);
    match user {
        Some(u) if ok => Ok(Outcome::Reply(session_reply(app, &u))),
        _ => {
            crate::metrics::auth_failure("bad_password");
            Err(ApiError::bad_request(msg::INVALID_CRED))
        }
    }
}

pub fn session_user(
    _app: &App,
    session: &Session,
    ctx: &crate::proxy::ctx::RequestCtx,
) -> HandlerResult {
    let id = identity(ctx)?;
    let (token, exp) = match &id.credential {
        // The session's own JWT is echoed back, as Open WebUI does; an API key is not.
        Credential::Jwt { exp, .. } => (app_token(session), *exp),
        Credential::ApiKey => (None, None),
    };
    let mut body = session_body(&id.user, token.as_deref(), exp);
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
    Ok(Outcome::Reply(Reply::ok(&body)))
}

/// The JWT the request was authenticated with.
fn app_token(session: &Session) -> Option<String> {
    let h = &session.req_header().headers;
    if let Some(v) = h
        .get(::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some((_, t)) = v.split_once(' ')
        && !t.starts_with("sk-")
    {
        return Some(t.trim().to_string());
    }
    h.get_all(::http::header::COOKIE)
        .iter()
        .filter_map(|c| c.to_str().ok())
        .flat_map(|c| c.split(';'))
        .find_map(|p| p.trim().strip_prefix("token=").map(String::from))
}

pub fn signout(app: &App, ctx: &crate::proxy::ctx::RequestCtx) -> HandlerResult {
    let id = identity(ctx)?;
    if let Credential::Jwt { jti, exp } = &id.credential {
        app.store.revoke_token(jti, *exp)?;
    }
    Ok(Outcome::Reply(
        Reply::ok(&json!({"status": true})).with_header(::http::header::SET_COOKIE, clear_cookie()),
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
    Ok(Outcome::Reply(session_reply(app, &user)))
}

fn may_manage_keys(app: &App, ctx: &crate::proxy::ctx::RequestCtx) -> Result<(), ApiError> {
    let id = identity(ctx)?;
    if !app.config.auth.enable_api_keys || id.user.role == Role::Pending {
        return Err(ApiError::forbidden(msg::API_KEY_NOT_ALLOWED));
    }
    Ok(())
}

/// Creates (or replaces) the caller's key. The plaintext is in this response only.
pub async fn create_api_key(
    app: &App,
    session: &mut Session,
    ctx: &crate::proxy::ctx::RequestCtx,
) -> HandlerResult {
    may_manage_keys(app, ctx)?;
    let body = http::read_body(session, 64 * 1024).await?;
    let form: ApiKeyForm = if body.iter().all(u8::is_ascii_whitespace) {
        ApiKeyForm::default()
    } else {
        http::parse_json(&body)?
    };
    let id = identity(ctx)?;
    let key = issue_key(app, &id.user.id, form.models)?;
    Ok(Outcome::Reply(Reply::ok(&json!({"api_key": key}))))
}

/// Stores a new key for `user_id` and returns its plaintext.
pub fn issue_key(app: &App, user_id: &str, models: Vec<String>) -> Result<String, ApiError> {
    let key = auth::generate_key();
    let record = ApiKeyRecord {
        user_id: user_id.to_string(),
        prefix: key.plaintext[..11].to_string(),
        created_at: now_secs(),
        models,
    };
    app.store.put_api_key(&key.hash, &record)?;
    app.auth.forget_cached_keys();
    Ok(key.plaintext)
}

/// The key's prefix and metadata; the secret itself is not stored and cannot be shown.
pub fn get_api_key(app: &App, ctx: &crate::proxy::ctx::RequestCtx) -> HandlerResult {
    may_manage_keys(app, ctx)?;
    let id = identity(ctx)?;
    match app.store.api_key_of_user(&id.user.id)? {
        Some((_, rec)) => Ok(Outcome::Reply(Reply::ok(&json!({
            "api_key": format!("{}…", rec.prefix),
            "prefix": rec.prefix,
            "created_at": rec.created_at,
            "models": rec.models,
        })))),
        None => Err(ApiError::not_found(msg::API_KEY_NOT_FOUND)),
    }
}

pub fn delete_api_key(app: &App, ctx: &crate::proxy::ctx::RequestCtx) -> HandlerResult {
    may_manage_keys(app, ctx)?;
    let id = identity(ctx)?;
    let removed = app.store.delete_api_key_of_user(&id.user.id)?.is_some();
    app.auth.forget_cached_keys();
    Ok(Outcome::Reply(Reply::ok(&removed)))
}
