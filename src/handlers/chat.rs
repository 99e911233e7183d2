//! `POST /api/chat/completions`: OpenAI-compatible chat, routed by model.
//!
//! Ollama-owned models go to that upstream's OpenAI-compatible `/v1/chat/completions`,
//! OpenAI-owned ones to `{base}/chat/completions`; the answer (SSE or JSON) streams back
//! untouched. The body is rewritten only when something must change (a `prefix_id` to strip,
//! Open WebUI-only fields to remove, `params` to merge); otherwise the client's bytes are
//! forwarded as they came.

use pingora::proxy::Session;
use serde_json::{Map, Value};

use super::{HandlerResult, Outcome, identity};
use crate::app::App;
use crate::config::UpstreamKind;
use crate::error::{ApiError, msg};
use crate::http;
use crate::proxy::ctx::RequestCtx;
use crate::proxy::forward::Plan;

/// Request fields that only mean something to Open WebUI's UI and are never forwarded.
const OPEN_WEBUI_ONLY: &[&str] = &[
    "files",
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

pub async fn completions(app: &App, session: &mut Session, ctx: &mut RequestCtx) -> HandlerResult {
    let raw = http::read_body(session, app.config.max_body_bytes).await?;
    let mut body: Map<String, Value> = http::parse_json(&raw)?;
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
    if !id.may_use_model(&model) {
        return Err(ApiError::bad_request(msg::MODEL_NOT_FOUND));
    }
    let entry = app
        .models
        .resolve(&model)
        .await
        .ok_or_else(|| ApiError::bad_request(msg::MODEL_NOT_FOUND))?;

    let mut changed = entry.upstream_id != model;
    for field in OPEN_WEBUI_ONLY {
        if let Some(v) = body.remove(*field) {
            changed = true;
            if *field == "files" && v.as_array().is_some_and(|a| !a.is_empty()) {
                tracing::warn!("`files` (RAG) is not implemented yet; the items were not used");
            }
        }
    }
    if let Some(params) = body.remove("params") {
        changed = true;
        apply_params(&mut body, params)?;
    }
    let payload = if changed {
        body.insert("model".into(), Value::String(entry.upstream_id.clone()));
        bytes::Bytes::from(serde_json::to_vec(&body).expect("json"))
    } else {
        // Nothing to change: forward the client's bytes as they came.
        raw
    };
    let candidates = app.upstreams.rank(entry.kind, &entry.urls);
    let path = match entry.kind {
        UpstreamKind::Ollama => "/v1/chat/completions".to_string(),
        UpstreamKind::OpenAi => {
            let base = &candidates
                .first()
                .map(|u| u.base_path.clone())
                .unwrap_or_default();
            format!("{base}/chat/completions")
        }
    };
    Ok(Outcome::Forward(Plan {
        candidates,
        method: ::http::Method::POST,
        path,
        body: payload,
        replace_success_body: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
