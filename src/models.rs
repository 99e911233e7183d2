//! The merged model list of every upstream, and model resolution.
//!
//! Model lists are fetched from all upstreams concurrently. A refresh waits at most the
//! configured bound (default 2 s): an upstream that has not answered by then is represented
//! by its last known list, and its answer still updates the cache when it arrives. So a dead
//! or slow upstream never holds `/api/models` hostage (Open WebUI issue #15549).
//!
//! Resolution lives here too, so every route that takes a model name (chat, Ollama routes,
//! later model presets) agrees on what a name means.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};

use crate::config::UpstreamKind;
use crate::metrics;
use crate::upstream::{Upstream, Upstreams};

/// A model as ragway routes it.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    /// Public id (with the connection's `prefix_id`).
    pub id: String,
    pub kind: UpstreamKind,
    /// The id the upstream knows (prefix stripped).
    pub upstream_id: String,
    /// Indices of the upstreams (of `kind`) hosting it.
    pub urls: Vec<usize>,
    /// The `/api/models` entry.
    pub json: Value,
}

/// One consistent view of all models.
#[derive(Debug)]
pub struct Catalog {
    /// `/api/models` order: sorted by name.
    pub list: Vec<Arc<ModelEntry>>,
    /// foldhash: looked up by every model request, keyed by catalog ids, built once.
    pub by_id: foldhash::HashMap<String, Arc<ModelEntry>>,
    /// Merged Ollama `/api/tags` entries (with `urls`), for `/ollama/api/tags`.
    pub ollama_tags: Vec<Value>,
    /// `{"models": ollama_tags}` as sent, built once with the catalog: a caller who may use
    /// every model gets these bytes instead of a fresh serialisation of the whole list.
    pub ollama_tags_body: Bytes,
    /// `{"data": list}` as sent, likewise: `/api/models` for a caller who may use every
    /// model and sees no preset.
    pub models_body: Bytes,
}

#[derive(Clone)]
struct Fetched {
    models: Vec<Value>,
}

struct State {
    ollama: Vec<Option<Fetched>>,
    openai: Vec<Option<Fetched>>,
    catalog: Arc<Catalog>,
    built_at: Option<Instant>,
}

struct Inner {
    upstreams: Arc<Upstreams>,
    client: reqwest::Client,
    state: RwLock<State>,
}

/// The shared model registry.
pub struct ModelRegistry {
    inner: Arc<Inner>,
    ttl: Duration,
    bound: Duration,
    /// Single flight: concurrent callers wait for one refresh instead of starting several.
    refreshing: tokio::sync::Mutex<()>,
}

impl ModelRegistry {
    pub fn new(
        upstreams: Arc<Upstreams>,
        client: reqwest::Client,
        ttl: Duration,
        bound: Duration,
    ) -> Self {
        let state = State {
            ollama: vec![None; upstreams.ollama.len()],
            openai: vec![None; upstreams.openai.len()],
            catalog: Arc::new(Catalog::default()),
            built_at: None,
        };
        ModelRegistry {
            inner: Arc::new(Inner {
                upstreams,
                client,
                state: RwLock::new(state),
            }),
            ttl,
            bound,
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn fresh(&self) -> Option<Arc<Catalog>> {
        let s = self.inner.state.read().expect("models lock");
        s.built_at
            .filter(|t| t.elapsed() < self.ttl)
            .map(|_| s.catalog.clone())
    }

    /// The current catalog, refreshed when older than the TTL or when `force`d.
    pub async fn catalog(&self, force: bool) -> Arc<Catalog> {
        if !force && let Some(c) = self.fresh() {
            return c;
        }
        let started = Instant::now();
        let _guard = self.refreshing.lock().await;
        // Someone else may have refreshed while we waited for the lock.
        if let Some(c) = self.fresh() {
            let refreshed_after_us = self
                .inner
                .state
                .read()
                .expect("models lock")
                .built_at
                .is_some_and(|t| t >= started);
            if !force || refreshed_after_us {
                return c;
            }
        }
        let timer = metrics::MODEL_LIST_DURATION.start_timer();
        let deadline = tokio::time::Instant::now() + self.bound;
        let mut pending = Vec::new();
        for up in self.inner.upstreams.all() {
            let inner = self.inner.clone();
            let up = up.clone();
            // Spawned, so a late answer still lands in the cache after we stop waiting.
            pending.push(tokio::spawn(async move {
                let result = fetch(&inner.client, &up).await;
                inner.record(&up, result);
            }));
        }
        for handle in pending {
            let _ = tokio::time::timeout_at(deadline, handle).await;
        }
        timer.observe_duration();
        self.inner.rebuild()
    }

    /// Resolves a public model id, refreshing once when it is unknown (a model pulled a
    /// moment ago should work without waiting for the TTL).
    pub async fn resolve(&self, id: &str) -> Option<Arc<ModelEntry>> {
        if let Some(m) = self.catalog(false).await.by_id.get(id) {
            return Some(m.clone());
        }
        self.catalog(true).await.by_id.get(id).cloned()
    }
}

impl Inner {
    fn record(&self, up: &Upstream, result: Result<Vec<Value>, String>) {
        let mut s = self.state.write().expect("models lock");
        let slot = match up.kind() {
            UpstreamKind::Ollama => &mut s.ollama[up.idx],
            UpstreamKind::OpenAi => &mut s.openai[up.idx],
        };
        match result {
            Ok(models) => {
                *slot = Some(Fetched { models });
                up.mark_ok();
            }
            Err(e) => {
                tracing::warn!(upstream = %up.config.url, error = %e, "model list failed; keeping the last known list");
                up.mark_failed();
            }
        }
    }

    fn rebuild(&self) -> Arc<Catalog> {
        let mut s = self.state.write().expect("models lock");
        let catalog = Arc::new(build_catalog(&self.upstreams, &s.ollama, &s.openai));
        s.catalog = catalog.clone();
        s.built_at = Some(Instant::now());
        catalog
    }
}

/// Fetches one upstream's raw model list, filtered by its `model_ids` allow-list.
async fn fetch(client: &reqwest::Client, up: &Upstream) -> Result<Vec<Value>, String> {
    let (path, field, key) = match up.kind() {
        UpstreamKind::Ollama => ("/api/tags", "models", "model"),
        UpstreamKind::OpenAi => ("/models", "data", "id"),
    };
    let mut req = client.get(up.url(path));
    if let Some(k) = &up.config.key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    let list = body
        .get(field)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no `{field}` array in the answer"))?;
    Ok(list
        .iter()
        .filter(|m| m.get(key).and_then(Value::as_str).is_some())
        .filter(|m| {
            up.config.model_ids.is_empty()
                || up
                    .config
                    .model_ids
                    .iter()
                    .any(|id| m[key].as_str() == Some(id))
        })
        .cloned()
        .collect())
}

fn prefixed(prefix: &Option<String>, id: &str) -> String {
    match prefix {
        Some(p) => format!("{p}.{id}"),
        None => id.to_string(),
    }
}

fn tags_json(tags: &[String]) -> Value {
    Value::Array(tags.iter().map(|t| json!({ "name": t })).collect())
}

/// An Ollama model being merged across connections: raw entry, hosting indices, upstream
/// id, tags and connection type (the latter three from the first connection).
type OllamaMerge = (Value, Vec<usize>, String, Vec<String>, String);

fn build_catalog(
    ups: &Upstreams,
    ollama: &[Option<Fetched>],
    openai: &[Option<Fetched>],
) -> Catalog {
    let mut by_id: foldhash::HashMap<String, Arc<ModelEntry>> = foldhash::HashMap::default();

    // OpenAI-compatible: first connection wins for a duplicate id.
    for (idx, fetched) in openai.iter().enumerate() {
        let (Some(f), Some(up)) = (fetched, ups.openai.get(idx)) else {
            continue;
        };
        for raw in &f.models {
            let upstream_id = raw["id"].as_str().unwrap_or_default().to_string();
            let id = prefixed(&up.config.prefix_id, &upstream_id);
            if by_id.contains_key(&id) {
                continue;
            }
            let mut j = match raw {
                Value::Object(o) => Value::Object(o.clone()),
                _ => json!({}),
            };
            let name = raw
                .get("name")
                .and_then(Value::as_str)
                .map(String::from)
                .unwrap_or_else(|| id.clone());
            j["id"] = json!(id);
            j["name"] = json!(name);
            j["object"] = json!("model");
            if j.get("created").is_none() {
                j["created"] = json!(0);
            }
            j["owned_by"] = json!("openai");
            j["openai"] = raw.clone();
            j["connection_type"] = json!(up.config.connection_type);
            j["provider"] = json!("");
            j["urlIdx"] = json!(idx);
            j["urls"] = json!([idx]);
            j["tags"] = tags_json(&up.config.tags);
            by_id.insert(
                id.clone(),
                Arc::new(ModelEntry {
                    id,
                    kind: UpstreamKind::OpenAi,
                    upstream_id,
                    urls: vec![idx],
                    json: j,
                }),
            );
        }
    }

    // Ollama: the same id on several connections is one model with several `urls`.
    let mut order: Vec<String> = Vec::new();
    let mut merged: HashMap<String, OllamaMerge> = HashMap::new();
    for (idx, fetched) in ollama.iter().enumerate() {
        let (Some(f), Some(up)) = (fetched, ups.ollama.get(idx)) else {
            continue;
        };
        for raw in &f.models {
            let upstream_id = raw["model"].as_str().unwrap_or_default().to_string();
            let id = prefixed(&up.config.prefix_id, &upstream_id);
            match merged.get_mut(&id) {
                Some(e) => e.1.push(idx),
                None => {
                    order.push(id.clone());
                    merged.insert(
                        id,
                        (
                            raw.clone(),
                            vec![idx],
                            upstream_id,
                            up.config.tags.clone(),
                            up.config.connection_type.clone(),
                        ),
                    );
                }
            }
        }
    }
    let mut ollama_tags = Vec::new();
    for id in order {
        let (raw, urls, upstream_id, tags, connection_type) = merged.remove(&id).expect("ordered");
        let mut tag = raw.clone();
        tag["model"] = json!(id);
        tag["urls"] = json!(urls);
        tag["connection_type"] = json!(connection_type);
        ollama_tags.push(tag.clone());
        let name = raw
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(&upstream_id)
            .to_string();
        let j = json!({
            "id": id,
            "name": name,
            "object": "model",
            "created": 0,
            "owned_by": "ollama",
            "ollama": tag,
            "connection_type": connection_type,
            "urls": urls,
            "tags": tags_json(&tags),
        });
        // Ollama comes last and wins over an OpenAI model with the same id, as in Open WebUI.
        by_id.insert(
            id.clone(),
            Arc::new(ModelEntry {
                id,
                kind: UpstreamKind::Ollama,
                upstream_id,
                urls,
                json: j,
            }),
        );
    }

    let mut list: Vec<Arc<ModelEntry>> = by_id.values().cloned().collect();
    list.sort_by(|a, b| {
        let an = a.json["name"].as_str().unwrap_or_default();
        let bn = b.json["name"].as_str().unwrap_or_default();
        an.cmp(bn).then_with(|| a.id.cmp(&b.id))
    });
    let ollama_tags_body = tags_body(&ollama_tags.iter().collect::<Vec<_>>());
    let models_body = models_body(&list.iter().map(|m| &m.json).collect::<Vec<_>>());
    Catalog {
        list,
        by_id,
        ollama_tags,
        ollama_tags_body,
        models_body,
    }
}

/// The `/api/models` answer for these entries.
#[must_use]
pub fn models_body(data: &[&Value]) -> Bytes {
    list_body("data", data)
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            list: Vec::new(),
            by_id: foldhash::HashMap::default(),
            ollama_tags: Vec::new(),
            ollama_tags_body: tags_body(&[]),
            models_body: models_body(&[]),
        }
    }
}

/// Ollama's `/api/tags` answer for these entries.
#[must_use]
pub fn tags_body(models: &[&Value]) -> Bytes {
    list_body("models", models)
}

/// `{"<field>": [items…]}`, serialised from borrowed values (a `json!` tree would copy them).
fn list_body(field: &'static str, items: &[&Value]) -> Bytes {
    struct One<'a>(&'static str, &'a [&'a Value]);
    impl serde::Serialize for One<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(Some(1))?;
            m.serialize_entry(self.0, self.1)?;
            m.end()
        }
    }
    Bytes::from(serde_json::to_vec(&One(field, items)).expect("JSON values serialise"))
}
