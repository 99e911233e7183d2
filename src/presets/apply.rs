//! Applying a resolved preset to a request: system prompt, parameters and knowledge.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::Presets;
use super::clock;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::models::ModelEntry;
use crate::rag::{self, prompt};
use crate::store::{PresetRecord, User};

/// `params` keys that configure Open WebUI itself, not the model (never forwarded).
const UI_PARAMS: &[&str] = &[
    "stream_response",
    "stream_delta_chunk_size",
    "function_calling",
    "reasoning_tags",
    "compact_token_threshold",
    "model_controls",
    "system",
];

/// Keys Open WebUI moves to the root of an Ollama request instead of `options`.
const OLLAMA_ROOT: &[&str] = &["format", "keep_alive", "think"];

/// A preset resolved for one request: the chain from the named preset down to the last
/// preset, and the base model it runs on.
pub struct Resolved {
    /// The preset id the client named.
    pub id: String,
    /// Outermost first.
    chain: Vec<PresetRecord>,
    pub base: Arc<ModelEntry>,
}

/// Fills `{{CURRENT_DATE}}`, `{{CURRENT_TIME}}`, `{{CURRENT_DATETIME}}`,
/// `{{CURRENT_WEEKDAY}}`, `{{USER_NAME}}` and `{{USER_LOCATION}}` in one pass: substituted
/// text (a user name can contain a placeholder) is never scanned again.
pub fn substitute(system: &str, user_name: &str, epoch: u64) -> String {
    let now = clock::at(epoch);
    let datetime = format!("{} {}", now.date, now.time);
    let name = if user_name.is_empty() {
        "Unknown"
    } else {
        user_name
    };
    let vars: [(&str, &str); 6] = [
        ("{{CURRENT_DATE}}", &now.date),
        ("{{CURRENT_TIME}}", &now.time),
        ("{{CURRENT_DATETIME}}", &datetime),
        ("{{CURRENT_WEEKDAY}}", now.weekday),
        ("{{USER_NAME}}", name),
        ("{{USER_LOCATION}}", "Unknown"),
    ];
    let mut out = String::with_capacity(system.len());
    let mut rest = system;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some((p, v)) = vars.iter().find(|(p, _)| tail.starts_with(p)) {
            out.push_str(v);
            rest = &tail[p.len()..];
        } else {
            out.push_str("{{");
            rest = &tail[2..];
        }
    }
    out.push_str(rest);
    out
}

/// Open WebUI's `add_or_update_system_message`: the model's prompt goes before the
/// client's own system message (each text part of a multimodal one), or becomes a new
/// system message at index 0.
pub fn prepend_system(messages: &mut Vec<Value>, system: &str) {
    match messages.first_mut() {
        Some(first) if first.get("role").and_then(Value::as_str) == Some("system") => {
            match first.get_mut("content") {
                Some(Value::String(s)) => *s = format!("{system}\n{s}"),
                Some(Value::Array(parts)) => {
                    for p in parts.iter_mut() {
                        if p.get("type").and_then(Value::as_str) == Some("text")
                            && let Some(Value::String(t)) = p.get_mut("text")
                        {
                            *t = format!("{system}\n{t}");
                        }
                    }
                }
                _ => first["content"] = json!(system),
            }
        }
        _ => messages.insert(0, json!({"role": "system", "content": system})),
    }
}

/// Merges `from` into `into` without replacing anything `into` already has: the
/// request's own values win at every depth.
fn merge_under(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge_under(a, b),
            (Some(_), _) => {}
            (None, v) => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Checks that each `meta.knowledge` item of preset `id` exists and that `user` can read
/// it; the error names the missing item.
///
/// # Errors
/// A 404 naming the first missing or unreadable item; a storage failure.
pub async fn check_knowledge(
    app: &Presets<'_>,
    user: &User,
    id: &str,
    meta: &Map<String, Value>,
) -> Result<(), ApiError> {
    for item in meta
        .get("knowledge")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let item_id = item["id"].as_str().unwrap_or_default();
        let label = match item.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => format!("{n:?} ({item_id})"),
            _ => item_id.to_string(),
        };
        let r = &app.retriever;
        let (kind, ok) = if item["type"] == "collection" {
            (
                "knowledge collection",
                rag::readable_collection(r, user, item_id).await?.is_some(),
            )
        } else {
            (
                "file",
                rag::readable_file(r, user, item_id).await?.is_some(),
            )
        };
        if !ok {
            return Err(ApiError::not_found(format!(
                "Model preset {id:?} uses the {kind} {label}, which was deleted or which you \
                 cannot read"
            )));
        }
    }
    Ok(())
}

impl Resolved {
    pub(super) fn new(id: &str, chain: Vec<PresetRecord>, base: Arc<ModelEntry>) -> Self {
        Resolved {
            id: id.to_string(),
            chain,
            base,
        }
    }

    /// The system prompt: the outermost preset that has one (as a parameter, an outer
    /// preset's value wins over the one it is built on).
    fn system(&self) -> Option<&str> {
        self.chain.iter().find_map(|p| {
            p.params
                .get("system")
                .and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
        })
    }

    /// Parameters of the whole chain, outer presets winning, minus the system prompt and
    /// Open WebUI's UI-only keys.
    fn params(&self) -> Map<String, Value> {
        let mut out = Map::new();
        for p in &self.chain {
            let own: Map<String, Value> = p
                .params
                .iter()
                .filter(|(k, _)| !UI_PARAMS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            merge_under(&mut out, &own);
        }
        out
    }

    /// The knowledge of every preset in the chain, as `files` items (type, id, name).
    pub fn knowledge(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for p in &self.chain {
            for item in p
                .meta
                .get("knowledge")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let mut i = json!({"type": item["type"], "id": item["id"]});
                if let Some(n) = item.get("name").and_then(Value::as_str) {
                    i["name"] = json!(n);
                }
                out.push(i);
            }
        }
        out
    }

    /// Every attached collection and file must exist and be readable by the caller: a
    /// preset never lends its owner's access, and never silently loses knowledge.
    pub(super) async fn check_knowledge(
        &self,
        app: &Presets<'_>,
        who: &Identity,
    ) -> Result<(), ApiError> {
        for p in &self.chain {
            check_knowledge(app, &who.user, &p.id, &p.meta).await?;
        }
        Ok(())
    }

    fn filled_system(&self, user: &User) -> Option<String> {
        self.system()
            .map(|s| substitute(s, &user.name, crate::store::now_secs()))
    }

    /// Applies the preset to an OpenAI chat body after the request's own `params`: the
    /// preset's parameters go under the request's values, and its system prompt before
    /// the client's system message, unless the request set `params.system` itself.
    pub fn apply_openai(&self, body: &mut Map<String, Value>, request_system: bool, user: &User) {
        for (k, v) in self.params() {
            match (k.as_str(), v) {
                ("custom_params", Value::Object(c)) => merge_under(body, &c),
                ("custom_params", _) => {}
                (_, v) => {
                    body.entry(k).or_insert(v);
                }
            }
        }
        if !request_system
            && let Some(system) = self.filled_system(user)
            && let Some(Value::Array(messages)) = body.get_mut("messages")
        {
            prepend_system(messages, &system);
        }
    }

    /// Applies the preset to a native Ollama body (`/api/chat` or `/api/generate`):
    /// parameters become `options` (`max_tokens` → `num_predict`; `format`, `keep_alive`
    /// and `think` at the root) under the request's values, and the system prompt goes
    /// before the client's (`system` for generate, the first message for chat).
    pub fn apply_ollama(&self, body: &mut Map<String, Value>, generate: bool, user: &User) {
        let mut options = Map::new();
        for (k, v) in self.params() {
            match k.as_str() {
                "custom_params" => {
                    if let Value::Object(c) = v {
                        merge_under(body, &c);
                    }
                }
                "max_tokens" => {
                    options.insert("num_predict".into(), v);
                }
                k if OLLAMA_ROOT.contains(&k) => {
                    body.entry(k).or_insert(v);
                }
                _ => {
                    options.insert(k, v);
                }
            }
        }
        if !options.is_empty() {
            match body.get_mut("options") {
                Some(Value::Object(o)) => merge_under(o, &options),
                Some(_) => {}
                None => {
                    body.insert("options".into(), Value::Object(options));
                }
            }
        }
        let Some(system) = self.filled_system(user) else {
            return;
        };
        if generate {
            let merged = match body.get("system").and_then(Value::as_str) {
                Some(own) if !own.is_empty() => format!("{system}\n{own}"),
                _ => system,
            };
            body.insert("system".into(), Value::String(merged));
        } else if let Some(Value::Array(messages)) = body.get_mut("messages") {
            prepend_system(messages, &system);
        }
    }

    /// Retrieves the preset's knowledge for a native Ollama request and injects it as chat
    /// completions do (same template, same retrieval); Ollama's format has no place for
    /// the sources, so none are returned.
    pub async fn inject_native(
        &self,
        app: &Presets<'_>,
        who: &Identity,
        body: &mut Map<String, Value>,
        generate: bool,
    ) -> Result<(), ApiError> {
        let cfg = &app.config.rag;
        let items = rag::distinct_items(&self.knowledge(), cfg.max_items)?;
        if items.is_empty() {
            return Ok(());
        }
        let query = if generate {
            body.get("prompt")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        } else {
            let messages = body
                .get("messages")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            prompt::last_user_query(messages)
        };
        if query.trim().is_empty() {
            return Ok(());
        }
        let mut budget = rag::Budget::new(cfg.max_context_bytes);
        let sources = rag::retrieve(&app.retriever, who, &items, &query, &mut budget).await?;
        if sources.iter().all(|s| s.document.is_empty()) {
            return Ok(());
        }
        let filled = prompt::fill(&cfg.template, &prompt::context_string(&sources), &query);
        if generate {
            body.insert("prompt".into(), Value::String(format!("{filled}\n{query}")));
        } else if let Some(Value::Array(messages)) = body.get_mut("messages") {
            prompt::inject(messages, &filled, cfg.system_context);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_once() {
        let out = substitute(
            "{{USER_NAME}} on {{CURRENT_DATE}} at {{CURRENT_TIME}} ({{CURRENT_WEEKDAY}}) {{X}} {{",
            "{{CURRENT_DATE}}",
            1_709_211_909,
        );
        assert_eq!(
            out,
            "{{CURRENT_DATE}} on 2024-02-29 at 01:05:09 PM (Thursday) {{X}} {{"
        );
        assert_eq!(substitute("{{USER_NAME}}", "", 0), "Unknown");
    }

    #[test]
    fn system_prompt_goes_first_like_open_webui() {
        let mut m = vec![json!({"role": "user", "content": "q"})];
        prepend_system(&mut m, "P");
        assert_eq!(m[0], json!({"role": "system", "content": "P"}));
        let mut m = vec![
            json!({"role": "system", "content": "mine"}),
            json!({"role": "user", "content": "q"}),
        ];
        prepend_system(&mut m, "P");
        assert_eq!(m[0]["content"], "P\nmine");
        let mut m = vec![json!({"role": "system", "content": [{"type": "text", "text": "a"}]})];
        prepend_system(&mut m, "P");
        assert_eq!(m[0]["content"][0]["text"], "P\na");
    }

    #[test]
    fn request_values_win_at_every_depth() {
        let mut body = json!({"a": 1, "o": {"x": 1}}).as_object().unwrap().clone();
        merge_under(
            &mut body,
            json!({"a": 2, "b": 3, "o": {"x": 2, "y": 3}})
                .as_object()
                .unwrap(),
        );
        assert_eq!(
            Value::Object(body),
            json!({"a": 1, "b": 3, "o": {"x": 1, "y": 3}})
        );
    }
}
