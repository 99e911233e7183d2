//! `POST /api/chat/completions`: OpenAI-compatible chat, routed by model.
//!
//! Ollama-owned models go to that upstream's OpenAI-compatible `/v1/chat/completions`,
//! OpenAI-owned ones to `{base}/chat/completions`; the answer (SSE or JSON) streams back
//! untouched. The body is rewritten only when something must change (a `prefix_id` to strip,
//! Open WebUI-only fields to remove, `params` to merge); otherwise the client's bytes are
//! forwarded as they came.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{HandlerResult, Outcome, identity};
use crate::app::App;
use crate::config::UpstreamKind;
use crate::error::{ApiError, msg};
use crate::http;
use crate::http::Session;
use crate::http::routing::{Routing, Shape};
use crate::proxy::ndjson_sse;
use crate::rag::{self, prompt};
use crate::request::RequestCtx;
use crate::request::{Body, Convert, Plan, SourcesReply};
use crate::upstream::Upstream;

/// Request fields that only mean something to Open WebUI's UI and are never forwarded.
const OPEN_WEBUI_ONLY: &[&str] = &[
    "tool_ids",
    "features",
    "chat_id",
    "id",
    "message_ids",
    "parent_id",
    "user_message",
    "assistant_message_id",
    "session_id",
    "folder_id",
    "background_tasks",
    "model_item",
    "metadata",
    "filter_ids",
    "skill_ids",
    "terminal_id",
    "variables",
    "tool_servers",
];

/// `params` keys that configure Open WebUI itself, not the model.
const UI_PARAMS: &[&str] = &[
    "stream_response",
    "stream_delta_chunk_size",
    "function_calling",
    "reasoning_tags",
    "compact_token_threshold",
    "system",
];

fn deep_merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                deep_merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Applies `params` as Open WebUI does for OpenAI upstreams: model parameters are copied to
/// the top level (without overriding fields the client set explicitly), `system` becomes
/// the system message, `custom_params` is deep-merged.
fn apply_params(body: &mut Map<String, Value>, params: Value) -> Result<(), ApiError> {
    let Value::Object(params) = params else {
        if params.is_null() {
            return Ok(());
        }
        return Err(ApiError::new(422, "params must be an object"));
    };
    for (k, v) in params {
        match k.as_str() {
            "system" => {
                if let Value::String(system) = v
                    && !system.is_empty()
                {
                    set_system_message(body, system);
                }
            }
            "custom_params" => {
                let mut whole = Value::Object(std::mem::take(body));
                deep_merge(&mut whole, v);
                if let Value::Object(m) = whole {
                    *body = m;
                }
            }
            k if UI_PARAMS.contains(&k) => {}
            _ => {
                body.entry(k).or_insert(v);
            }
        }
    }
    Ok(())
}

fn set_system_message(body: &mut Map<String, Value>, system: String) {
    let Some(Value::Array(messages)) = body.get_mut("messages") else {
        return;
    };
    match messages.first_mut() {
        Some(Value::Object(first))
            if first.get("role").and_then(Value::as_str) == Some("system") =>
        {
            first.insert("content".into(), Value::String(system));
        }
        _ => messages.insert(0, serde_json::json!({"role": "system", "content": system})),
    }
}

/// Whether a top-level key makes ragway rebuild the body instead of forwarding its bytes.
fn needs_rewrite(key: &str) -> bool {
    key == "params" || key == "files" || OPEN_WEBUI_ONLY.contains(&key)
}

pub async fn completions(app: &App, session: &mut Session, ctx: &mut RequestCtx) -> HandlerResult {
    let raw = http::read_body(session, app.config.max_body_bytes).await?;
    if raw.is_empty() {
        return Err(ApiError::new(422, "Request body is required (JSON)"));
    }
    let routing = http::json::check_routed(&raw, app.config.max_json_values, &needs_rewrite)?;
    if let Some(plan) = as_it_came(app, ctx, &raw, routing).await? {
        return Ok(Outcome::Forward(plan));
    }
    let mut body: Map<String, Value> = http::parse_checked_json(&raw)?;
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None => return Err(ApiError::bad_request(msg::MODEL_NOT_FOUND)),
        Some(_) => return Err(ApiError::new(422, "model must be a string")),
    };
    match body.get("messages") {
        Some(Value::Array(_)) => {}
        None => {
            return Err(ApiError::new(
                422,
                "messages is required (a list of chat messages)",
            ));
        }
        Some(_) => return Err(ApiError::new(422, "messages must be a list")),
    }
    let id = identity(ctx)?;
    // Model presets (src/presets): a preset name runs on its base model, with the preset's
    // defaults applied under the request's own values below.
    let preset = crate::presets::resolve(&app.presets(), id, &model).await?;
    if preset.is_none() && !id.may_use_model(&model) {
        return Err(ApiError::bad_request(msg::MODEL_NOT_FOUND));
    }
    let entry = match &preset {
        Some(p) => p.base.clone(),
        None => app
            .models
            .resolve(&model)
            .await
            .ok_or_else(|| ApiError::bad_request(msg::MODEL_NOT_FOUND))?,
    };

    let mut changed = entry.upstream_id != model || preset.is_some();
    for field in OPEN_WEBUI_ONLY {
        if body.remove(*field).is_some() {
            changed = true;
        }
    }
    let request_system = body
        .get("params")
        .and_then(|p| p.get("system"))
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    if let Some(params) = body.remove("params") {
        changed = true;
        apply_params(&mut body, params)?;
    }
    // The preset's knowledge comes first, then the request's own `files`.
    let mut items = match &preset {
        Some(p) => {
            p.apply_openai(&mut body, request_system, &id.user);
            p.knowledge()
        }
        None => Vec::new(),
    };
    crate::usage::note_model(ctx, &entry.id);
    let mut sources = None;
    let mut budget = None;
    match body.remove("files") {
        None | Some(Value::Null) => {}
        Some(Value::Array(files)) => {
            changed = true;
            items.extend(files);
        }
        Some(_) => return Err(ApiError::new(422, "files must be a list")),
    }
    if !items.is_empty() {
        let items = rag::distinct_items(&items, app.config.rag.max_items)?;
        if !items.is_empty() {
            let started = std::time::Instant::now();
            sources = augment(app, ctx, &mut body, &items, &model, &entry, &mut budget).await?;
            ctx.usage.rag = started.elapsed();
            crate::usage::overhead("rag", ctx.usage.rag);
        }
    }
    // Context budget: a window larger than Ollama's runtime one is only reachable through
    // its native API (its /v1 endpoint ignores num_ctx).
    let num_ctx = budget
        .as_ref()
        .and_then(|d: &rag::budget::Decision| d.num_ctx);
    let headers = budget.map_or_else(Vec::new, |d| {
        vec![(
            ::http::HeaderName::from_static(rag::budget::HEADER),
            d.header(),
        )]
    });
    if let Some(n) = num_ctx {
        body.insert("model".into(), Value::String(entry.upstream_id.clone()));
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let native = ndjson_sse::native_body(&body, n)?;
        crate::metrics::CONTEXT_NUM_CTX
            .with_label_values(&[if stream { "stream" } else { "json" }])
            .inc();
        return Ok(Outcome::Forward(Plan {
            candidates: app.upstreams.rank(entry.kind, &entry.urls),
            method: ::http::Method::POST,
            path: "/api/chat".to_string(),
            body: Body::Read(bytes::Bytes::from(
                serde_json::to_vec(&native).expect("json"),
            )),
            replace_success_body: None,
            sources,
            convert: Some(Convert {
                stream,
                include_usage,
            }),
            headers,
        }));
    }
    if crate::usage::ask_for_usage(ctx, &mut body) {
        changed = true;
    }
    let payload = if changed {
        body.insert("model".into(), Value::String(entry.upstream_id.clone()));
        bytes::Bytes::from(serde_json::to_vec(&body).expect("json"))
    } else {
        // Nothing to change: forward the client's bytes as they came.
        raw
    };
    let candidates = app.upstreams.rank(entry.kind, &entry.urls);
    let path = upstream_path(&entry, &candidates);
    Ok(Outcome::Forward(Plan {
        candidates,
        method: ::http::Method::POST,
        path,
        body: Body::Read(payload),
        replace_success_body: None,
        sources,
        convert: None,
        headers,
    }))
}

/// Where an upstream of `entry`'s kind takes chat completions.
fn upstream_path(entry: &crate::models::ModelEntry, candidates: &[Arc<Upstream>]) -> String {
    match entry.kind {
        UpstreamKind::Ollama => "/v1/chat/completions".to_string(),
        UpstreamKind::OpenAi => {
            let base = candidates
                .first()
                .map(|u| u.base_path.as_str())
                .unwrap_or_default();
            format!("{base}/chat/completions")
        }
    }
}

/// The common request, which needs nothing changed: a base model served under its own
/// name, no preset, no files, nothing Open WebUI-only, no `params`, not a stream (a
/// metered stream gets `stream_options` added). Routed from its top-level fields and
/// forwarded as its bytes came, without building the body. `None`: the full path decides
/// (it also words every refusal of a malformed body).
async fn as_it_came(
    app: &App,
    ctx: &mut RequestCtx,
    raw: &bytes::Bytes,
    routing: Option<Routing>,
) -> Result<Option<Plan>, ApiError> {
    let Some(fields) = routing else {
        return Ok(None);
    };
    let (Shape::Str(model), Shape::Array) = (&fields.model, &fields.messages) else {
        return Ok(None);
    };
    if fields.needs_rewrite || fields.stream == Shape::True || model.is_empty() {
        return Ok(None);
    }
    let id = identity(ctx)?;
    if crate::presets::resolve(&app.presets(), id, model)
        .await?
        .is_some()
    {
        return Ok(None);
    }
    if !id.may_use_model(model) {
        return Err(ApiError::bad_request(msg::MODEL_NOT_FOUND));
    }
    let entry = app
        .models
        .resolve(model)
        .await
        .ok_or_else(|| ApiError::bad_request(msg::MODEL_NOT_FOUND))?;
    if entry.upstream_id != *model {
        return Ok(None);
    }
    crate::usage::note_model(ctx, &entry.id);
    let candidates = app.upstreams.rank(entry.kind, &entry.urls);
    let path = upstream_path(&entry, &candidates);
    Ok(Some(Plan {
        candidates,
        method: ::http::Method::POST,
        path,
        body: Body::Read(raw.clone()),
        replace_success_body: None,
        sources: None,
        convert: None,
        headers: Vec::new(),
    }))
}

/// Retrieves context for `items`, injects it into the messages, and prepares the sources
/// for the client. Only requests with `files` pay for any of this.
async fn augment(
    app: &App,
    ctx: &RequestCtx,
    body: &mut Map<String, Value>,
    items: &[Value],
    model: &str,
    entry: &crate::models::ModelEntry,
    decision: &mut Option<rag::budget::Decision>,
) -> Result<Option<SourcesReply>, ApiError> {
    let id = identity(ctx)?;
    let cfg = &app.config.rag;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let query = prompt::last_user_query(&messages);
    let retrieval_query = if cfg.query_generation && !query.trim().is_empty() {
        match generate_queries(app, entry, &messages).await {
            // Generated queries widen the search; the user's words stay in it.
            Some(q) if !q.is_empty() => format!(
                "{query}
{}",
                q.join(
                    "
"
                )
            ),
            _ => query.clone(),
        }
    } else {
        query.clone()
    };
    let mut budget = rag::Budget::new(cfg.max_context_bytes);
    let mut sources =
        rag::retrieve(&app.retriever(), id, items, &retrieval_query, &mut budget).await?;
    if sources.iter().any(|s| !s.document.is_empty()) && !query.trim().is_empty() {
        // Context budget: fewer or shorter chunks rather than a prompt the model truncates.
        *decision = rag::budget::fit(&app.budgeter(), entry, body, &mut sources, &query).await?;
    }
    if sources.iter().any(|s| !s.document.is_empty()) && !query.trim().is_empty() {
        let context = prompt::context_string(&sources);
        let filled = prompt::fill(&cfg.template, &context, &query);
        if let Some(Value::Array(m)) = body.get_mut("messages") {
            // The filled template is prepended to every text part of the last message (as
            // Open WebUI does): thousands of tiny parts would multiply it, so what the
            // injection adds is bounded by the context limit plus the body limit.
            let copies = prompt::injection_count(m, cfg.system_context);
            if filled.len().saturating_mul(copies)
                > cfg.max_context_bytes + app.config.max_body_bytes
            {
                return Err(rag::too_much_context(cfg.max_context_bytes).into());
            }
            prompt::inject(m, &filled, cfg.system_context);
        }
    }
    // Open WebUI returns the sources that carry a name or an id.
    let visible: Vec<&rag::Source> = sources
        .iter()
        .filter(|s| {
            ["name", "id"].iter().any(|k| {
                s.source
                    .get(*k)
                    .and_then(Value::as_str)
                    .is_some_and(|v| !v.is_empty())
            })
        })
        .collect();
    if visible.is_empty() {
        return Ok(None);
    }
    let json = serde_json::to_value(&visible).expect("sources serialise");
    let event = serde_json::json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4()),
        "object": "chat.completion.chunk",
        "created": crate::store::now_secs(),
        "model": model,
        "choices": [],
        "sources": json,
    });
    Ok(Some(SourcesReply {
        sse_event: bytes::Bytes::from(format!("data: {event}\n\n")),
        json,
    }))
}

/// Asks the chat model itself for search queries (`ENABLE_RETRIEVAL_QUERY_GENERATION`).
/// Any failure falls back to the user's message, as in Open WebUI.
async fn generate_queries(
    app: &App,
    entry: &crate::models::ModelEntry,
    messages: &[Value],
) -> Option<Vec<String>> {
    let up = app
        .upstreams
        .rank(entry.kind, &entry.urls)
        .into_iter()
        .next()?;
    let url = match entry.kind {
        UpstreamKind::Ollama => up.url("/v1/chat/completions"),
        UpstreamKind::OpenAi => up.url("/chat/completions"),
    };
    let recent: Vec<String> = messages
        .iter()
        .rev()
        .take(6)
        .rev()
        .map(|m| {
            format!(
                "{}: {}",
                m.get("role").and_then(Value::as_str).unwrap_or("user"),
                prompt::content_text(m.get("content").unwrap_or(&Value::Null))
            )
        })
        .collect();
    let instruction = format!(
        "Write up to three short search queries that would find documents answering the \
         user's last message. Answer only with JSON: {{\"queries\": [\"...\"]}}\n\n{}",
        recent.join("\n")
    );
    let mut req = app.http.post(url).json(&serde_json::json!({
        "model": entry.upstream_id,
        "messages": [{"role": "user", "content": instruction}],
        "stream": false,
    }));
    if let Some(k) = &up.config.key {
        req = req.bearer_auth(k);
    }
    let reply: Value = req.send().await.ok()?.json().await.ok()?;
    let text = reply["choices"][0]["message"]["content"].as_str()?;
    let parsed: Value = serde_json::from_str(json_object_in(text)?).ok()?;
    Some(
        parsed["queries"]
            .as_array()?
            .iter()
            .filter_map(|q| q.as_str().map(String::from))
            .filter(|q| !q.trim().is_empty())
            .collect(),
    )
}

/// The text from the first `{` to the last `}`, if that is a well-ordered span. Model
/// output is untrusted: a `}` before the first `{` (or none at all) must not panic.
fn json_object_in(text: &str) -> Option<&str> {
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    (end > start).then(|| &text[start..=end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn model_output_never_panics_the_query_parser() {
        assert_eq!(json_object_in("} nothing {"), None);
        assert_eq!(json_object_in("}{"), None);
        assert_eq!(json_object_in("no braces"), None);
        assert_eq!(json_object_in("x {\"a\":1} y"), Some("{\"a\":1}"));
        assert_eq!(json_object_in("é{}é"), Some("{}"));
    }

    /// Arbitrary JSON values, a few levels deep.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z{}\\[\\] ]{0,12}".prop_map(Value::from),
            prop_oneof![
                Just("system"),
                Just("custom_params"),
                Just("messages"),
                Just("user")
            ]
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("system".to_string()),
                        Just("custom_params".to_string()),
                        Just("messages".to_string()),
                        Just("role".to_string()),
                        Just("content".to_string()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Rewriting a body (params merged, context injected) never panics, and its output
        /// is linear in its inputs.
        #[test]
        fn body_rewrite_is_total_and_linear(body in any_json(), params in any_json(), filled in "[a-z\\[\\]{} ]{0,40}", system in proptest::prelude::any::<bool>()) {
            let Value::Object(mut body) = body else { return Ok(()) };
            let size = |v: &Value| serde_json::to_vec(v).unwrap().len();
            let input = size(&Value::Object(body.clone())) + size(&params);
            if apply_params(&mut body, params).is_ok() {
                let after = size(&Value::Object(body.clone()));
                proptest::prop_assert!(after <= 2 * input + 64, "{after} > 2×{input}");
            }
            if let Some(Value::Array(m)) = body.get_mut("messages") {
                let copies = prompt::injection_count(m, system);
                let before = size(&Value::Array(m.clone()));
                prompt::inject(m, &filled, system);
                let after = size(&Value::Array(m.clone()));
                proptest::prop_assert!(after <= before + copies * (filled.len() + 64) + 64);
            }
        }
    }

    #[test]
    fn params_merge_like_open_webui() {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.1})
            .as_object()
            .unwrap()
            .clone();
        apply_params(
            &mut body,
            json!({"temperature": 0.9, "top_p": 0.5, "function_calling": "native", "system": "be brief",
                   "custom_params": {"extra": {"a": 1}}}),
        )
        .unwrap();
        assert_eq!(body["temperature"], 0.1, "explicit fields win");
        assert_eq!(body["top_p"], 0.5);
        assert!(body.get("function_calling").is_none());
        assert_eq!(
            body["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        assert_eq!(body["extra"], json!({"a": 1}));
        assert!(apply_params(&mut body, json!([1])).is_err());
    }
}
