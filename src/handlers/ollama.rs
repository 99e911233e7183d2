//! `/ollama/*`: Open WebUI's Ollama proxy.
//!
//! Model routes read the body to find the model, check access, pick a hosting upstream and
//! forward; list routes are merged locally from the model catalog; admin routes that carry
//! no model (pull, create) stream straight through pingora's proxy path.

use std::cmp::Ordering;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{HandlerResult, Outcome, Req, identity, query};
use crate::app::App;
use crate::config::UpstreamKind;
use crate::error::{ApiError, msg};
use crate::http::Session;
use crate::http::router::Endpoint;
use crate::http::routing::{Routing, Shape};
use crate::http::{self, Reply};
use crate::models::ModelEntry;
use crate::request::{Body, Plan, RequestCtx};
use crate::store::Role;
use crate::upstream::Upstream;

/// Upstream path for a route (the `/ollama` prefix removed).
fn upstream_path(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::OllamaShow => "/api/show",
        Endpoint::OllamaEmbed => "/api/embed",
        Endpoint::OllamaEmbeddings => "/api/embeddings",
        Endpoint::OllamaGenerate => "/api/generate",
        Endpoint::OllamaChat => "/api/chat",
        Endpoint::OllamaV1Completions => "/v1/completions",
        Endpoint::OllamaV1ChatCompletions => "/v1/chat/completions",
        Endpoint::OllamaV1Messages => "/v1/messages",
        Endpoint::OllamaV1Responses => "/v1/responses",
        Endpoint::OllamaPull => "/api/pull",
        Endpoint::OllamaCreate => "/api/create",
        Endpoint::OllamaPush => "/api/push",
        Endpoint::OllamaCopy => "/api/copy",
        Endpoint::OllamaDelete => "/api/delete",
        Endpoint::OllamaTags => "/api/tags",
        Endpoint::OllamaVersion => "/api/version",
        _ => "/",
    }
}

fn with_query(path: &str, session: &Session) -> String {
    match query(session) {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

fn upstream_at(app: &App, idx: usize) -> Result<Arc<Upstream>, ApiError> {
    app.upstreams
        .ollama
        .get(idx)
        .cloned()
        .ok_or_else(|| ApiError::bad_request(format!("No Ollama connection with index {idx}")))
}

fn not_found_model(name: &str) -> ApiError {
    ApiError::bad_request(format!("Model '{name}' was not found"))
}

/// Reads a JSON object body.
async fn object_body(
    app: &App,
    session: &mut Session,
) -> Result<(bytes::Bytes, Map<String, Value>), ApiError> {
    let raw = http::read_body(session, app.config.max_body_bytes).await?;
    let obj: Map<String, Value> = http::parse_json_with(&raw, app.config.max_json_values)?;
    Ok((raw, obj))
}

/// Finds an Ollama-owned model by its public id.
async fn ollama_model(app: &App, name: &str) -> Option<Arc<ModelEntry>> {
    app.models
        .resolve(name)
        .await
        .filter(|m| m.kind == UpstreamKind::Ollama)
}

/// Replaces the model field when the public id carries a `prefix_id`; otherwise the client's
/// bytes are kept as they came.
fn rewrite_model(
    raw: bytes::Bytes,
    mut obj: Map<String, Value>,
    field: &str,
    entry: &ModelEntry,
) -> bytes::Bytes {
    if entry.upstream_id == entry.id {
        return raw;
    }
    obj.insert(field.to_string(), Value::String(entry.upstream_id.clone()));
    bytes::Bytes::from(serde_json::to_vec(&obj).expect("json"))
}

/// Chat, generate, embed, show and the `/v1/*` routes.
pub async fn model_route(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    req: &Req,
) -> HandlerResult {
    let raw = http::read_body(session, app.config.max_body_bytes).await?;
    if raw.is_empty() {
        return Err(ApiError::new(422, "Request body is required (JSON)"));
    }
    let routing = http::json::check_routed(&raw, app.config.max_json_values, &|_| false)?;
    if let Some(plan) = as_it_came(app, session, ctx, req, &raw, routing).await? {
        return Ok(Outcome::Forward(plan));
    }
    let mut obj: Map<String, Value> = http::parse_checked_json(&raw)?;
    let name = match obj.get("model").or_else(|| obj.get("name")) {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None => return Err(ApiError::bad_request("model is required")),
        Some(_) => return Err(ApiError::new(422, "model must be a string")),
    };
    let id = identity(ctx)?;
    // Model presets (src/presets) on `/api/chat` and `/api/generate`: the preset's base
    // model, with its defaults and knowledge applied to the body below.
    let endpoint = req.route.endpoint;
    let preset = match endpoint {
        Endpoint::OllamaChat | Endpoint::OllamaGenerate => {
            crate::presets::resolve(&app.presets(), id, &name).await?
        }
        _ => None,
    };
    if preset.is_none() && !id.may_use_model(&name) {
        return Err(ApiError::forbidden(msg::MODEL_NOT_FOUND));
    }
    let entry = match &preset {
        Some(p) if p.base.kind == UpstreamKind::Ollama => p.base.clone(),
        Some(p) => {
            return Err(ApiError::bad_request(format!(
                "Model preset '{name}' is based on '{}', which is not an Ollama model: use \
                 /api/chat/completions",
                p.base.id
            )));
        }
        None => ollama_model(app, &name)
            .await
            .ok_or_else(|| not_found_model(&name))?,
    };
    let candidates = match req.url_idx {
        Some(i) => {
            if id.user.role != Role::Admin && !entry.urls.contains(&i) {
                return Err(ApiError::forbidden(format!(
                    "Model '{name}' is not hosted by Ollama connection {i}"
                )));
            }
            vec![upstream_at(app, i)?]
        }
        None => app.upstreams.rank(UpstreamKind::Ollama, &entry.urls),
    };
    let field = if obj.contains_key("model") {
        "model"
    } else {
        "name"
    };
    let openai_style = matches!(
        req.route.endpoint,
        Endpoint::OllamaV1ChatCompletions | Endpoint::OllamaV1Completions
    );
    let body = match preset {
        Some(p) => {
            let generate = endpoint == Endpoint::OllamaGenerate;
            p.apply_ollama(&mut obj, generate, &id.user);
            p.inject_native(&app.presets(), id, &mut obj, generate)
                .await?;
            obj.insert(field.to_string(), Value::String(entry.upstream_id.clone()));
            bytes::Bytes::from(serde_json::to_vec(&obj).expect("json"))
        }
        None if openai_style && crate::usage::ask_for_usage(ctx, &mut obj) => {
            obj.insert(field.to_string(), Value::String(entry.upstream_id.clone()));
            bytes::Bytes::from(serde_json::to_vec(&obj).expect("json"))
        }
        None => rewrite_model(raw, obj, field, &entry),
    };
    crate::usage::note_model(ctx, &entry.id);
    Ok(Outcome::Forward(Plan {
        candidates,
        method: ::http::Method::POST,
        path: with_query(upstream_path(endpoint), session),
        body: Body::Read(body),
        replace_success_body: None,
        sources: None,
        convert: None,
        headers: Vec::new(),
    }))
}

/// The common request, which needs nothing changed: a base model under its upstream's own
/// name (no `prefix_id`), no preset, no connection index, and no usage chunk to ask for.
/// Routed from its top-level fields and forwarded as its bytes came, without building the
/// body (an `/api/embed` of many texts or a long `/api/chat` history is otherwise built
/// whole only to read its model). `None`: the full path decides, and words every refusal.
async fn as_it_came(
    app: &App,
    session: &Session,
    ctx: &mut RequestCtx,
    req: &Req,
    raw: &bytes::Bytes,
    routing: Option<Routing>,
) -> Result<Option<Plan>, ApiError> {
    let Some(fields) = routing else {
        return Ok(None);
    };
    let name = match (&fields.model, &fields.name) {
        (Shape::Str(m), _) | (Shape::Missing, Shape::Str(m)) if !m.is_empty() => m,
        _ => return Ok(None),
    };
    let endpoint = req.route.endpoint;
    let openai_style = matches!(
        endpoint,
        Endpoint::OllamaV1ChatCompletions | Endpoint::OllamaV1Completions
    );
    if req.url_idx.is_some() || (openai_style && fields.stream == Shape::True) {
        return Ok(None);
    }
    let id = identity(ctx)?;
    if matches!(endpoint, Endpoint::OllamaChat | Endpoint::OllamaGenerate)
        && crate::presets::resolve(&app.presets(), id, name)
            .await?
            .is_some()
    {
        return Ok(None);
    }
    if !id.may_use_model(name) {
        return Ok(None);
    }
    let Some(entry) = ollama_model(app, name).await else {
        return Ok(None);
    };
    if entry.upstream_id != entry.id {
        return Ok(None);
    }
    crate::usage::note_model(ctx, &entry.id);
    Ok(Some(Plan {
        candidates: app.upstreams.rank(UpstreamKind::Ollama, &entry.urls),
        method: ::http::Method::POST,
        path: with_query(upstream_path(endpoint), session),
        body: Body::Read(raw.clone()),
        replace_success_body: None,
        sources: None,
        convert: None,
        headers: Vec::new(),
    }))
}

/// Pull and create: no model to resolve, so the client's body streams as it comes to
/// connection `url_idx` (default 0, as Open WebUI).
pub fn admin_stream(app: &App, session: &Session, req: &Req) -> HandlerResult {
    let up = upstream_at(app, req.url_idx.unwrap_or(0))?;
    Ok(Outcome::Forward(Plan::pass_through(
        up,
        session.req_header().method.clone(),
        with_query(upstream_path(req.route.endpoint), session),
    )))
}

/// Push (Open WebUI exposes it as DELETE; Ollama takes POST), copy and delete: the target is
/// `url_idx` or the first upstream hosting the named model.
pub async fn admin_model_op(
    app: &App,
    session: &mut Session,
    ctx: &RequestCtx,
    req: &Req,
) -> HandlerResult {
    let (raw, obj) = object_body(app, session).await?;
    let endpoint = req.route.endpoint;
    let field = match endpoint {
        Endpoint::OllamaCopy => "source",
        _ if obj.contains_key("model") => "model",
        _ => "name",
    };
    let name = obj
        .get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("{field} is required")))?
        .to_string();
    // An admin limited to some models (model-access) may not act on the others either.
    if !identity(ctx)?.may_use_model(&name) {
        return Err(ApiError::forbidden(msg::MODEL_NOT_FOUND));
    }
    let (up, body) = match req.url_idx {
        Some(i) => (upstream_at(app, i)?, raw),
        None => {
            let entry = ollama_model(app, &name)
                .await
                .ok_or_else(|| not_found_model(&name))?;
            let up = upstream_at(app, entry.urls[0])?;
            (up, rewrite_model(raw, obj, field, &entry))
        }
    };
    let (method, replace) = match endpoint {
        Endpoint::OllamaPush => (::http::Method::POST, None),
        Endpoint::OllamaCopy => (::http::Method::POST, Some("true")),
        _ => (::http::Method::DELETE, Some("true")),
    };
    Ok(Outcome::Forward(Plan {
        candidates: vec![up],
        method,
        path: upstream_path(endpoint).to_string(),
        body: Body::Read(body),
        replace_success_body: replace,
        sources: None,
        convert: None,
        headers: Vec::new(),
    }))
}

/// Merged `/api/tags`, or one connection's models with `/{url_idx}`.
pub async fn tags(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let id = identity(ctx)?;
    if let Some(i) = req.url_idx {
        upstream_at(app, i)?;
    }
    let catalog = app.models.catalog(false).await;
    if req.url_idx.is_none() && id.allowed_models.is_none() {
        return Ok(Outcome::Reply(Reply::bytes(
            200,
            "application/json",
            catalog.ollama_tags_body.clone(),
        )));
    }
    let models: Vec<&Value> = catalog
        .ollama_tags
        .iter()
        .filter(|t| {
            req.url_idx.is_none_or(|i| {
                t["urls"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|x| x.as_u64() == Some(i as u64)))
            })
        })
        .filter(|t| t["model"].as_str().is_some_and(|m| id.may_use_model(m)))
        .collect();
    Ok(Outcome::Reply(Reply::bytes(
        200,
        "application/json",
        crate::models::tags_body(&models),
    )))
}

/// Ollama's models as an OpenAI list.
pub async fn v1_models(app: &App, ctx: &RequestCtx, req: &Req) -> HandlerResult {
    let id = identity(ctx)?;
    let created = crate::store::now_secs();
    let catalog = app.models.catalog(false).await;
    let data: Vec<Value> = catalog
        .list
        .iter()
        .filter(|m| m.kind == UpstreamKind::Ollama && id.may_use_model(&m.id))
        .filter(|m| req.url_idx.is_none_or(|i| m.urls.contains(&i)))
        .map(|m| json!({"id": m.id, "object": "model", "created": created, "owned_by": "openai"}))
        .collect();
    Ok(Outcome::Reply(Reply::ok(
        &json!({"data": data, "object": "list"}),
    )))
}

/// GETs one JSON document from each Ollama upstream concurrently (bounded like the model
/// list), keeping the upstream index with each answer.
async fn fan_out(app: &App, path: &str) -> Vec<(usize, Value)> {
    let bound = app.config.models_list_timeout;
    let calls = app.upstreams.ollama.iter().map(|up| {
        let mut r = app.http.get(up.url(path)).timeout(bound);
        if let Some(k) = &up.config.key {
            r = r.bearer_auth(k);
        }
        let idx = up.idx;
        async move {
            let resp = r.send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            Some((idx, resp.json::<Value>().await.ok()?))
        }
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Merged `/api/ps`.
pub async fn ps(app: &App) -> HandlerResult {
    let mut merged: Vec<Value> = Vec::new();
    for (idx, v) in fan_out(app, "/api/ps").await {
        let prefix = &app.upstreams.ollama[idx].config.prefix_id;
        for m in v["models"].as_array().into_iter().flatten() {
            let mut m = m.clone();
            if let (Some(p), Some(name)) = (prefix, m["model"].as_str()) {
                m["model"] = json!(format!("{p}.{name}"));
            }
            match merged.iter_mut().find(|e| e["model"] == m["model"]) {
                Some(e) => {
                    if let Some(urls) = e["urls"].as_array_mut() {
                        urls.push(json!(idx));
                    }
                }
                None => {
                    m["urls"] = json!([idx]);
                    merged.push(m);
                }
            }
        }
    }
    Ok(Outcome::Reply(Reply::ok(&json!({ "models": merged }))))
}

fn version_cmp(a: &str, b: &str) -> Ordering {
    let parse = |s: &str| -> Vec<u64> {
        s.trim_start_matches('v')
            .split(['.', '-'])
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    parse(a).cmp(&parse(b))
}

/// Lowest version across upstreams, or one upstream's with `/{url_idx}`.
pub async fn version(app: &App, session: &Session, req: &Req) -> HandlerResult {
    if let Some(i) = req.url_idx {
        let up = upstream_at(app, i)?;
        return Ok(Outcome::Forward(Plan::pass_through(
            up,
            session.req_header().method.clone(),
            "/api/version".to_string(),
        )));
    }
    let lowest = fan_out(app, "/api/version")
        .await
        .into_iter()
        .filter_map(|(_, v)| v["version"].as_str().map(String::from))
        .min_by(|a, b| version_cmp(a, b));
    match lowest {
        Some(v) => Ok(Outcome::Reply(Reply::ok(&json!({ "version": v })))),
        None => Err(ApiError::internal(
            "Ollama: no upstream answered /api/version",
        )),
    }
}

/// Unloads a model on every upstream hosting it (`keep_alive: 0`).
pub async fn unload(app: &App, session: &mut Session, ctx: &RequestCtx) -> HandlerResult {
    let (_, obj) = object_body(app, session).await?;
    let name = obj
        .get("model")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("model is required"))?
        .to_string();
    if !identity(ctx)?.may_use_model(&name) {
        return Err(ApiError::forbidden(msg::MODEL_NOT_FOUND));
    }
    let entry = ollama_model(app, &name)
        .await
        .ok_or_else(|| not_found_model(&name))?;
    for idx in &entry.urls {
        let up = upstream_at(app, *idx)?;
        let mut r = app
            .http
            .post(up.url("/api/generate"))
            .json(&json!({"model": entry.upstream_id, "keep_alive": 0, "prompt": "", "stream": false}))
            .timeout(app.config.read_idle_timeout);
        if let Some(k) = &up.config.key {
            r = r.bearer_auth(k);
        }
        let resp = r
            .send()
            .await
            .map_err(|e| ApiError::new(502, format!("Ollama: {e}")))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let detail = resp
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or_else(|| "unload failed".into());
            return Err(ApiError::new(status, detail));
        }
    }
    Ok(Outcome::Reply(Reply::ok(&json!({"status": true}))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(version_cmp("0.5.10", "0.5.9"), Ordering::Greater);
        assert_eq!(version_cmp("v0.6.0", "0.5.1"), Ordering::Greater);
        assert_eq!(version_cmp("0.5.1", "0.5.1"), Ordering::Equal);
    }
}
