//! `GET /api/v1/usage` and the admin's `GET`/`POST /api/v1/usage/limits/{user_id}`.

use serde_json::{Value, json};

use super::{HandlerResult, Outcome};
use crate::app::App;
use crate::error::ApiError;
use crate::http::Session;
use crate::http::{self, Reply};
use crate::limits::Limits;
use crate::request::RequestCtx;
use crate::store::Role;

/// Most rows in one answer; a query matching more says `"truncated": true`.
pub const MAX_ROWS: usize = 10_000;
/// Longest filter value (ids, prefixes and model names are far shorter).
const MAX_FILTER: usize = 512;

fn identity(ctx: &RequestCtx) -> Result<&crate::auth::Identity, ApiError> {
    ctx.identity
        .as_ref()
        .ok_or_else(|| ApiError::unauthorized(crate::error::msg::NOT_AUTHENTICATED))
}

fn filter(query: Option<&str>, name: &str) -> Result<Option<String>, ApiError> {
    match http::query_param(query, name) {
        Some(v) if v.len() > MAX_FILTER => Err(ApiError::bad_request(format!(
            "{name} is too long ({MAX_FILTER} bytes at most)"
        ))),
        Some(v) if v.is_empty() => Ok(None),
        other => Ok(other),
    }
}

fn instant(query: Option<&str>, name: &str) -> Result<Option<u64>, ApiError> {
    filter(query, name)?
        .map(|v| {
            crate::usage::time::parse_instant(&v).map_err(|e| {
                ApiError::bad_request(format!(
                    "{name}: {e}; use Unix seconds or an RFC 3339 date such as 2025-01-31T00:00:00Z"
                ))
            })
        })
        .transpose()
}

/// Usage grouped by user, key and model over `[since, until)` (whole hours). Users see their
/// own; admins everyone's.
pub async fn list(app: &App, session: &Session, ctx: &RequestCtx) -> HandlerResult {
    let id = identity(ctx)?;
    let q = session.req_header().uri.query().map(String::from);
    let q = q.as_deref();
    let mut user_id = filter(q, "user_id")?;
    if id.user.role != Role::Admin {
        match &user_id {
            Some(u) if *u != id.user.id => {
                return Err(ApiError::forbidden(
                    "You may only read your own usage; only admins can read other users'",
                ));
            }
            _ => user_id = Some(id.user.id.clone()),
        }
    }
    let key_prefix = filter(q, "key_prefix")?;
    let model = filter(q, "model")?;
    let now = crate::store::now_secs();
    let since = instant(q, "since")?.unwrap_or(0);
    // Past `now`, so the current hour is included even on its first second.
    let until = instant(q, "until")?.unwrap_or(now + 1);
    if since > until {
        return Err(ApiError::bad_request("since must not be after until"));
    }
    let from_hour = since / 3600;
    let to_hour = until.div_ceil(3600).max(from_hour + 1);

    // Whatever was recorded before this request is committed before it is read.
    app.usage.recorder.flush().await;
    let keep = |k: &crate::store::UsageKey| {
        user_id.as_ref().is_none_or(|u| *u == k.user_id)
            && key_prefix.as_ref().is_none_or(|p| *p == k.key_prefix)
            && model.as_ref().is_none_or(|m| *m == k.model)
    };
    let (groups, truncated) = app
        .usage
        .recorder
        .totals(from_hour, to_hour, keep, MAX_ROWS)
        .await
        .map_err(super::errors::storage_answer)?;
    let data: Vec<Value> = groups
        .into_iter()
        .map(|((user_id, key_prefix, model), c)| {
            json!({
                "user_id": user_id,
                "key_prefix": if key_prefix.is_empty() { Value::Null } else { Value::String(key_prefix) },
                "model": model,
                "requests": c.requests,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
            })
        })
        .collect();
    Ok(Outcome::Reply(Reply::ok(&json!({
        "data": data,
        "since": from_hour * 3600,
        "until": to_hour * 3600,
        "truncated": truncated,
    }))))
}

async fn limits_body(app: &App, user_id: &str) -> Result<Value, ApiError> {
    let (user, key) = app.auth.accounts().limits_of(user_id).await?;
    let cfg = &app.usage.config;
    Ok(json!({
        "user_id": user.id,
        "user": user.limits,
        "api_key": key.as_ref().map(|r| json!({"prefix": r.prefix, "limits": r.limits})),
        "effective": {
            "user": user.limits.or(cfg.user),
            "api_key": key.as_ref().map(|r| r.limits.or(cfg.key)),
        },
        "defaults": {"user": cfg.user, "api_key": cfg.key},
    }))
}

/// A user's limits, their key's, and what applies.
pub async fn get_limits(app: &App, user_id: &str) -> HandlerResult {
    Ok(Outcome::Reply(Reply::ok(&limits_body(app, user_id).await?)))
}

/// Sets a user's limits (`"user"`) and/or their API key's (`"api_key"`); `null` clears them.
pub async fn set_limits(app: &App, session: &mut Session, user_id: &str) -> HandlerResult {
    let raw = http::read_body(session, 64 * 1024).await?;
    let body: serde_json::Map<String, Value> = http::parse_json(&raw)?;
    let mut user = None;
    let mut key = None;
    for (k, v) in &body {
        match k.as_str() {
            "user" => user = Some(Limits::parse(v)?),
            "api_key" => key = Some(Limits::parse(v)?),
            other => {
                return Err(ApiError::new(
                    422,
                    format!(
                        "unknown field {:?}: send \"user\" and/or \"api_key\" limits",
                        other.chars().take(40).collect::<String>()
                    ),
                ));
            }
        }
    }
    if user.is_none() && key.is_none() {
        return Err(ApiError::new(
            422,
            "send \"user\" and/or \"api_key\" limits, e.g. {\"api_key\": {\"rpm\": 60}}",
        ));
    }
    app.auth.accounts().set_limits(user_id, user, key).await?;
    get_limits(app, user_id).await
}
