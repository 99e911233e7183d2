//! Model presets: Open WebUI's workspace models. A preset is a model defined inside the
//! gateway on top of a base model (or another preset): a system prompt, default
//! parameters and attached knowledge, shared by access grants.
//!
//! Presets are stored in Open WebUI's model-row shape (`params.system`, `meta.knowledge`),
//! so Open WebUI exports import as they are. A chat request naming a preset is resolved
//! here to its base model, and the preset's defaults are applied under the request's own
//! values; the upstream never sees the preset id. Presets declared in the configuration
//! file are read-only through the API.

mod apply;
mod clock;

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{Map, Value, json};

pub use apply::{Resolved, check_knowledge};

use crate::app::App;
use crate::auth::Identity;
use crate::config::file::DeclaredPresetFile;
use crate::error::ApiError;
use crate::store::{Grant, PresetRecord, Role, User, now_secs};

/// Owner recorded on presets declared in the configuration file.
pub const CONFIG_OWNER: &str = "config";

/// Bounds of one preset. A preset is read on every `/api/models` listing and every chat
/// request naming it, so it stays small; the per-user and total counts are configured.
pub const MAX_ID_BYTES: usize = 256;
pub const MAX_NAME_BYTES: usize = 256;
/// `params` as JSON, system prompt included.
pub const MAX_PARAMS_BYTES: usize = 64 * 1024;
pub const MAX_SYSTEM_BYTES: usize = 32 * 1024;
/// `meta` as JSON (description, tags, knowledge, profile image).
pub const MAX_META_BYTES: usize = 64 * 1024;
pub const MAX_TAGS: usize = 64;
pub const MAX_GRANTS: usize = 256;
/// Presets built on presets: deeper chains are refused.
pub const MAX_DEPTH: usize = 8;

/// Request fields a preset's `params` may not set: they belong to the client's request.
const RESERVED_PARAMS: &[&str] = &["model", "messages", "stream", "files", "params"];

/// A grant as clients send it. Open WebUI's exports carry the stored grant objects (with
/// `id`, `resource_type`, ...), so unknown keys are ignored here.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PresetGrantForm {
    pub principal_type: String,
    pub principal_id: String,
    pub permission: String,
}

/// Open WebUI's `ModelForm`. Unknown fields are ignored, as Open WebUI does
/// (`extra='ignore'`), so an exported model row is a valid form.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PresetForm {
    pub id: String,
    #[serde(default)]
    pub base_model_id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub meta: Option<Value>,
    #[serde(default)]
    pub params: Option<Value>,
    /// `null` or absent: private to the owner (on update: unchanged).
    #[serde(default)]
    pub access_grants: Option<Vec<PresetGrantForm>>,
    #[serde(default)]
    pub is_active: Option<bool>,
}

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::new(422, detail)
}

fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control() || is_invisible(c))
}

/// Bidirectional and zero-width format characters: an id that renders like another must
/// not be accepted.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// A preset id: 1 to 256 bytes of letters, digits and `. _ - : / @ +` (model names such
/// as `llama3.2:latest` or `team/support-bot`). Ids travel in query strings and JSON, so
/// nothing that needs escaping or renders invisibly is allowed.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(invalid(format!(
            "id must be 1 to {MAX_ID_BYTES} bytes long"
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_alphanumeric() || "._-:/@+".contains(*c)) || is_invisible(*c))
    {
        return Err(invalid(format!(
            "id may contain only letters, digits and . _ - : / @ + (found {c:?})"
        )));
    }
    if id
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(invalid(
            "id: `/` separates non-empty names, none of them `.` or `..`",
        ));
    }
    Ok(())
}

fn json_len(v: &impl serde::Serialize) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

fn system_fits(params: &Map<String, Value>) -> bool {
    params
        .get("system")
        .and_then(Value::as_str)
        .is_none_or(|s| s.len() <= MAX_SYSTEM_BYTES)
}

/// Validates `params`: an object whose `system` (if any) is a string, within the bounds,
/// and without keys that belong to the request.
fn check_params(params: Option<Value>) -> Result<Map<String, Value>, ApiError> {
    let params = match params {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(invalid("params must be an object")),
    };
    if json_len(&params) > MAX_PARAMS_BYTES {
        return Err(ApiError::new(
            413,
            format!("params is larger than {} KiB", MAX_PARAMS_BYTES / 1024),
        ));
    }
    match params.get("system") {
        None | Some(Value::Null | Value::String(_)) if system_fits(&params) => {}
        None | Some(Value::Null | Value::String(_)) => {
            return Err(ApiError::new(
                413,
                format!(
                    "params.system (the system prompt) is longer than {} KiB",
                    MAX_SYSTEM_BYTES / 1024
                ),
            ));
        }
        Some(_) => return Err(invalid("params.system must be a string")),
    }
    match params.get("custom_params") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(_) => return Err(invalid("params.custom_params must be an object")),
    }
    let custom = params.get("custom_params").and_then(Value::as_object);
    for key in RESERVED_PARAMS {
        if params.contains_key(*key) || custom.is_some_and(|c| c.contains_key(*key)) {
            return Err(invalid(format!(
                "params.{key} cannot be set by a preset: it belongs to the chat request"
            )));
        }
    }
    Ok(params)
}

/// One attached knowledge item, checked: a collection or file id (Open WebUI's
/// `meta.knowledge` entries carry more keys, which are kept).
fn check_knowledge_item(i: usize, item: &Value) -> Result<(), ApiError> {
    let Value::Object(o) = item else {
        return Err(invalid(format!("meta.knowledge[{i}] must be an object")));
    };
    match o.get("type").and_then(Value::as_str) {
        Some("collection" | "file") => {}
        Some(other) => {
            return Err(invalid(format!(
                "meta.knowledge[{i}]: type {other:?} is not supported (use collection or file)"
            )));
        }
        None => {
            return Err(invalid(format!(
                "meta.knowledge[{i}]: `type` (collection or file) is required"
            )));
        }
    }
    match o.get("id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() && id.len() <= MAX_ID_BYTES && !has_control(id) => Ok(()),
        _ => Err(invalid(format!(
            "meta.knowledge[{i}]: `id` must be a string of 1 to {MAX_ID_BYTES} bytes"
        ))),
    }
}

/// Validates `meta` and normalises its tags to Open WebUI's `[{"name": …}]`.
fn check_meta(meta: Option<Value>, max_items: usize) -> Result<Map<String, Value>, ApiError> {
    let mut meta = match meta {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(invalid("meta must be an object")),
    };
    if json_len(&meta) > MAX_META_BYTES {
        return Err(ApiError::new(
            413,
            format!(
                "meta is larger than {} KiB (a profile image counts too)",
                MAX_META_BYTES / 1024
            ),
        ));
    }
    match meta.get("description") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(_) => return Err(invalid("meta.description must be a string")),
    }
    if let Some(tags) = meta.get("tags") {
        let tags = match tags {
            Value::Null => Vec::new(),
            Value::Array(t) => t.clone(),
            _ => return Err(invalid("meta.tags must be a list")),
        };
        if tags.len() > MAX_TAGS {
            return Err(invalid(format!("meta.tags: at most {MAX_TAGS} tags")));
        }
        let mut names = Vec::with_capacity(tags.len());
        for t in &tags {
            let name = match t {
                Value::String(s) => s.as_str(),
                Value::Object(o) => o.get("name").and_then(Value::as_str).unwrap_or_default(),
                _ => "",
            };
            let name = name.trim();
            if !name.is_empty() {
                names.push(json!({ "name": name }));
            }
        }
        meta.insert("tags".into(), Value::Array(names));
    }
    match meta.get("knowledge") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            if items.len() > max_items {
                return Err(invalid(format!(
                    "meta.knowledge: at most {max_items} items (rag.max-items)"
                )));
            }
            for (i, item) in items.iter().enumerate() {
                check_knowledge_item(i, item)?;
            }
        }
        Some(_) => return Err(invalid("meta.knowledge must be a list")),
    }
    Ok(meta)
}

fn check_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(invalid("name must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES || has_control(name) {
        return Err(invalid(format!(
            "name must be at most {MAX_NAME_BYTES} bytes, without control characters"
        )));
    }
    Ok(name.to_string())
}

fn check_base(id: &str, base: Option<&str>) -> Result<String, ApiError> {
    let base = base.map(str::trim).unwrap_or_default();
    if base.is_empty() {
        return Err(invalid(
            "base_model_id is required: a preset is built on a model ragway serves \
             (overriding a base model's own entry is not supported)",
        ));
    }
    if base.len() > MAX_ID_BYTES || has_control(base) {
        return Err(invalid(format!(
            "base_model_id must be at most {MAX_ID_BYTES} bytes, without control characters"
        )));
    }
    if base == id {
        return Err(ApiError::bad_request(format!(
            "Model preset {id:?} cannot be based on itself"
        )));
    }
    Ok(base.to_string())
}

/// Validates grants (Open WebUI's rules: `user` or `group`, `read` or `write`).
pub fn parse_grants(form: Vec<PresetGrantForm>) -> Result<Vec<Grant>, ApiError> {
    if form.len() > MAX_GRANTS {
        return Err(invalid(format!(
            "access_grants: at most {MAX_GRANTS} grants per preset"
        )));
    }
    let now = now_secs();
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(form.len());
    for g in form {
        if g.principal_type != "user" && g.principal_type != "group" {
            return Err(invalid(format!(
                "principal_type must be user or group, got {:?}",
                g.principal_type
            )));
        }
        if g.permission != "read" && g.permission != "write" {
            return Err(invalid(format!(
                "permission must be read or write, got {:?}",
                g.permission
            )));
        }
        if g.principal_id.is_empty() || g.principal_id.len() > 128 || has_control(&g.principal_id) {
            return Err(invalid("principal_id must be 1 to 128 bytes long"));
        }
        if seen.insert((
            g.principal_type.clone(),
            g.principal_id.clone(),
            g.permission.clone(),
        )) {
            out.push(Grant {
                id: uuid::Uuid::new_v4().to_string(),
                principal_type: g.principal_type,
                principal_id: g.principal_id,
                permission: g.permission,
                created_at: now,
            });
        }
    }
    Ok(out)
}

/// The validated fields of a form (grants are handled by the caller, who knows the owner).
pub struct Checked {
    pub id: String,
    pub name: String,
    pub base_model_id: String,
    pub params: Map<String, Value>,
    pub meta: Map<String, Value>,
    pub is_active: Option<bool>,
}

pub fn check_form(form: PresetForm, max_items: usize) -> Result<Checked, ApiError> {
    let id = form.id.trim().to_string();
    check_id(&id)?;
    Ok(Checked {
        name: check_name(&form.name)?,
        base_model_id: check_base(&id, form.base_model_id.as_deref())?,
        params: check_params(form.params)?,
        meta: check_meta(form.meta, max_items)?,
        is_active: form.is_active,
        id,
    })
}

/// The `[[presets.declared]]` entries of the configuration, validated like API forms, with
/// no id twice and no cycle among them.
pub fn declared(
    files: Vec<DeclaredPresetFile>,
    max_items: usize,
) -> Result<Vec<PresetRecord>, String> {
    let mut out: Vec<PresetRecord> = Vec::with_capacity(files.len());
    for f in files {
        let id = f.id.clone();
        let mut params = f.params.unwrap_or_default();
        if let Some(system) = f.system {
            params.insert("system".into(), Value::String(system));
        }
        let mut meta = Map::new();
        if let Some(d) = f.description {
            meta.insert("description".into(), Value::String(d));
        }
        if let Some(t) = f.tags {
            meta.insert("tags".into(), json!(t));
        }
        if let Some(k) = f.knowledge {
            meta.insert("knowledge".into(), json!(k));
        }
        let form = PresetForm {
            name: f.name.unwrap_or_else(|| f.id.clone()),
            id: f.id,
            base_model_id: Some(f.base_model_id),
            meta: Some(Value::Object(meta)),
            params: Some(Value::Object(params)),
            access_grants: None,
            is_active: f.is_active,
        };
        let c = check_form(form, max_items).map_err(|e| format!("{id}: {}", e.detail))?;
        let grants = f
            .access_grants
            .unwrap_or_default()
            .into_iter()
            .map(|g| PresetGrantForm {
                principal_type: g.principal_type,
                principal_id: g.principal_id,
                permission: g.permission,
            })
            .collect();
        let access_grants = parse_grants(grants).map_err(|e| format!("{id}: {}", e.detail))?;
        if out.iter().any(|p| p.id == c.id) {
            return Err(format!("{id}: declared twice"));
        }
        out.push(PresetRecord {
            id: c.id,
            user_id: CONFIG_OWNER.to_string(),
            base_model_id: c.base_model_id,
            name: c.name,
            params: c.params,
            meta: c.meta,
            access_grants,
            is_active: c.is_active.unwrap_or(true),
            created_at: 0,
            updated_at: 0,
        });
    }
    for p in &out {
        let mut seen = HashSet::from([p.id.as_str()]);
        let mut base = p.base_model_id.as_str();
        while let Some(next) = out.iter().find(|q| q.id == base) {
            if !seen.insert(next.id.as_str()) {
                return Err(format!("{}: its base models form a cycle", p.id));
            }
            base = next.base_model_id.as_str();
        }
        if seen.len() > MAX_DEPTH {
            return Err(format!(
                "{}: presets nested more than {MAX_DEPTH} deep",
                p.id
            ));
        }
    }
    Ok(out)
}

/// Whether a preset was declared in the configuration file.
pub fn is_declared(p: &PresetRecord) -> bool {
    p.user_id == CONFIG_OWNER && p.created_at == 0
}

/// A preset by id: declared ones first (they shadow a stored preset of the same id).
pub fn find(app: &App, id: &str) -> Result<Option<PresetRecord>, ApiError> {
    if let Some(p) = app.config.presets.declared.iter().find(|p| p.id == id) {
        return Ok(Some(p.clone()));
    }
    Ok(app.store.preset(id)?)
}

/// Every preset: declared ones, then stored ones not shadowed by them.
pub fn all(app: &App) -> Result<Vec<PresetRecord>, ApiError> {
    let declared = &app.config.presets.declared;
    let mut out = declared.clone();
    out.extend(
        app.store
            .presets()?
            .into_iter()
            .filter(|p| !declared.iter().any(|d| d.id == p.id)),
    );
    Ok(out)
}

fn granted(p: &PresetRecord, user: &User, permission: &str) -> bool {
    p.access_grants.iter().any(|g| {
        g.permission == permission
            && g.principal_type == "user"
            && (g.principal_id == "*" || g.principal_id == user.id)
    })
}

/// Open WebUI's rule (the same as for collections): owner, admin, or a `read` grant.
pub fn can_read(user: &User, p: &PresetRecord) -> bool {
    user.role == Role::Admin || p.user_id == user.id || granted(p, user, "read")
}

/// Owner, admin, or a `write` grant; declared presets are never writable through the API.
pub fn can_write(user: &User, p: &PresetRecord) -> bool {
    !is_declared(p)
        && (user.role == Role::Admin || p.user_id == user.id || granted(p, user, "write"))
}

/// Whether `who` may see (and so use) the preset: readable, allowed by the caller's model
/// allow-list, and active unless the caller is an admin.
pub fn visible(who: &Identity, p: &PresetRecord) -> bool {
    can_read(&who.user, p)
        && who.may_use_model(&p.id)
        && (p.is_active || who.user.role == Role::Admin)
}

/// Checks that `base` is something the creator of a preset may build on: an active
/// preset they can read (without forming a cycle back to `id`), or a model ragway serves
/// that they may use.
pub async fn check_base_usable(
    app: &App,
    who: &Identity,
    id: &str,
    base: &str,
) -> Result<(), ApiError> {
    let mut seen = HashSet::from([id.to_string()]);
    let mut current = base.to_string();
    for _ in 0..MAX_DEPTH {
        if !seen.insert(current.clone()) {
            return Err(ApiError::bad_request(format!(
                "Model preset {id:?} cannot be based on {base:?}: their base models would \
                 form a cycle"
            )));
        }
        match find(app, &current)? {
            Some(p) if visible(who, &p) => current = p.base_model_id,
            _ => {
                if current == base && !who.may_use_model(base) {
                    return Err(ApiError::bad_request(format!(
                        "base_model_id {base:?} is not a model you may use"
                    )));
                }
                return if app.models.resolve(&current).await.is_some() {
                    Ok(())
                } else if current == base {
                    Err(ApiError::bad_request(format!(
                        "base_model_id {base:?} is not a model ragway serves (nor a preset \
                         you can use)"
                    )))
                } else {
                    Err(ApiError::bad_request(format!(
                        "base_model_id {base:?} is a preset built on {current:?}, which is \
                         not available"
                    )))
                };
            }
        }
    }
    Err(ApiError::bad_request(format!(
        "base_model_id {base:?}: presets may be nested at most {MAX_DEPTH} deep"
    )))
}

/// Open WebUI's `ModelModel` (grants carry their resource).
pub fn model_json(p: &PresetRecord) -> Value {
    let grants: Vec<Value> = p
        .access_grants
        .iter()
        .map(|g| {
            json!({"id": g.id, "resource_type": "model", "resource_id": p.id,
                   "principal_type": g.principal_type, "principal_id": g.principal_id,
                   "permission": g.permission, "created_at": g.created_at})
        })
        .collect();
    let mut v = json!({
        "id": p.id,
        "user_id": p.user_id,
        "base_model_id": p.base_model_id,
        "name": p.name,
        "params": p.params,
        "meta": p.meta,
        "access_grants": grants,
        "is_active": p.is_active,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    });
    if is_declared(p) {
        v["read_only"] = json!(true);
        v["read_only_reason"] =
            json!("declared in the configuration file: change it there, not through the API");
    }
    v
}

/// `ModelAccessResponse`: the model, its owner and whether the caller may change it.
pub fn access_json(app: &App, user: &User, p: &PresetRecord) -> Value {
    let mut v = model_json(p);
    v["user"] = match app.store.user_by_id(&p.user_id).ok().flatten() {
        Some(u) => json!({"id": u.id, "name": u.name, "role": u.role.as_str(), "email": u.email}),
        None => Value::Null,
    };
    v["write_access"] = json!(can_write(user, p));
    v
}

/// `/api/models` entries of the presets `who` may use, as Open WebUI lists workspace
/// models: `owned_by` and `connection_type` of the base, `preset: true`, and `info` (the
/// row without `params`, and without the profile image, which `/api/models` drops).
pub fn model_entries(
    app: &App,
    who: &Identity,
    catalog: &crate::models::Catalog,
) -> Result<Vec<Value>, ApiError> {
    let presets = all(app)?;
    let mut shown: Vec<&PresetRecord> = presets.iter().filter(|p| visible(who, p)).collect();
    shown.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    let mut out = Vec::new();
    for p in shown {
        let base = final_base(&presets, p);
        let base_entry = catalog.by_id.get(base);
        let mut info = model_json(p);
        if let Some(o) = info.as_object_mut() {
            o.remove("params");
        }
        if let Some(m) = info["meta"].as_object_mut() {
            m.remove("profile_image_url");
        }
        let tags = p.meta.get("tags").cloned().unwrap_or_else(|| json!([]));
        out.push(json!({
            "id": p.id,
            "name": p.name,
            "object": "model",
            "created": p.created_at,
            "owned_by": base_entry.map_or(json!("openai"), |b| b.json["owned_by"].clone()),
            "connection_type": base_entry.map_or(json!("local"), |b| b.json["connection_type"].clone()),
            "preset": true,
            "info": info,
            "tags": tags,
        }));
    }
    Ok(out)
}

/// The non-preset model at the end of a preset's chain (bounded, cycle-safe).
fn final_base<'a>(presets: &'a [PresetRecord], p: &'a PresetRecord) -> &'a str {
    let mut base = p.base_model_id.as_str();
    for _ in 0..MAX_DEPTH {
        match presets.iter().find(|q| q.id == base) {
            Some(q) => base = q.base_model_id.as_str(),
            None => break,
        }
    }
    base
}

/// Resolves a model name for a chat request: `Ok(None)` when the name is not a preset
/// the caller may use (it is then a base model name, or unknown); the resolved chain
/// otherwise, or a clear error naming what is missing.
pub async fn resolve(app: &App, who: &Identity, model: &str) -> Result<Option<Resolved>, ApiError> {
    let Some(top) = find(app, model)? else {
        return Ok(None);
    };
    if !can_read(&who.user, &top) || !who.may_use_model(&top.id) {
        return Ok(None);
    }
    if !top.is_active {
        if who.user.role == Role::Admin || top.user_id == who.user.id {
            return Err(ApiError::bad_request(format!(
                "Model preset {model:?} is inactive (turn it on with POST \
                 /api/v1/models/model/toggle?id={model})"
            )));
        }
        return Ok(None);
    }
    let mut chain = vec![top];
    let mut seen = HashSet::from([model.to_string()]);
    let base = loop {
        let current = chain.last().expect("chain starts with the preset");
        let base_id = current.base_model_id.clone();
        let parent = current.id.clone();
        if let Some(inner) = find(app, &base_id)? {
            if !seen.insert(base_id.clone()) || chain.len() >= MAX_DEPTH {
                return Err(ApiError::bad_request(format!(
                    "Model preset {model:?}: its base models form a cycle or are nested \
                     more than {MAX_DEPTH} deep"
                )));
            }
            if !inner.is_active || !can_read(&who.user, &inner) {
                return Err(ApiError::bad_request(format!(
                    "Model preset {parent:?} is based on the preset {base_id:?}, which is \
                     inactive or not shared with you"
                )));
            }
            chain.push(inner);
            continue;
        }
        match app.models.resolve(&base_id).await {
            Some(entry) => break entry,
            None => {
                return Err(ApiError::bad_request(format!(
                    "Model preset {parent:?} is based on the model {base_id:?}, which no \
                     connected upstream serves any more"
                )));
            }
        }
    };
    let resolved = Resolved::new(model, chain, base);
    resolved.check_knowledge(app, who)?;
    Ok(Some(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(v: Value) -> Result<Checked, ApiError> {
        check_form(serde_json::from_value(v).unwrap(), 32)
    }

    #[test]
    fn ids_are_model_names_and_nothing_else() {
        for ok in [
            "support",
            "team/bot-1",
            "llama3.2:latest",
            "a@b+c_d",
            "modèle",
        ] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a?b",
            "a&id=x",
            "a#b",
            "a%2Fb",
            "a\"b",
            "a\nb",
            "a\u{202E}b",
            "a\u{200B}b",
            "<script>",
            "../x",
            "/x",
            "x//y",
            "x/",
        ] {
            assert_eq!(check_id(bad).unwrap_err().status, 422, "{bad:?}");
        }
        assert!(check_id(&"a".repeat(MAX_ID_BYTES)).is_ok());
        assert!(check_id(&"a".repeat(MAX_ID_BYTES + 1)).is_err());
    }

    #[test]
    fn forms_are_checked_and_tags_normalised() {
        let c = form(json!({"id": "p", "name": " P ", "base_model_id": "m",
            "params": {"system": "s", "temperature": 0.2},
            "meta": {"tags": ["a", {"name": "b"}, " ", 3], "knowledge": [{"type": "collection", "id": "k", "name": "K"}]}}))
        .unwrap();
        assert_eq!(c.name, "P");
        assert_eq!(c.meta["tags"], json!([{"name": "a"}, {"name": "b"}]));
        let bad = [
            json!({"id": "p", "name": "P"}),
            json!({"id": "p", "name": "P", "base_model_id": "p"}),
            json!({"id": "p", "name": "", "base_model_id": "m"}),
            json!({"id": "p", "name": "P", "base_model_id": "m", "params": [1]}),
            json!({"id": "p", "name": "P", "base_model_id": "m", "params": {"system": 1}}),
            json!({"id": "p", "name": "P", "base_model_id": "m", "params": {"model": "x"}}),
            json!({"id": "p", "name": "P", "base_model_id": "m", "params": {"custom_params": {"messages": []}}}),
            json!({"id": "p", "name": "P", "base_model_id": "m", "meta": {"knowledge": [{"type": "web", "id": "x"}]}}),
            json!({"id": "p", "name": "P", "base_model_id": "m", "meta": {"knowledge": [{"type": "file"}]}}),
            json!({"id": "p", "name": "P", "base_model_id": "m", "meta": {"tags": "x"}}),
            json!({"id": "p", "name": "P", "base_model_id": "m", "params": {"system": "x".repeat(MAX_SYSTEM_BYTES + 1)}}),
            json!({"id": "p", "name": "P", "base_model_id": "m", "meta": {"description": "x".repeat(MAX_META_BYTES)}}),
        ];
        for b in bad {
            assert!(form(b.clone()).is_err(), "{b}");
        }
        let many: Vec<Value> = (0..33)
            .map(|i| json!({"type": "file", "id": format!("f{i}")}))
            .collect();
        assert!(
            form(
                json!({"id": "p", "name": "P", "base_model_id": "m", "meta": {"knowledge": many}})
            )
            .is_err()
        );
    }

    /// The commented example in `conf/ragway.toml` is a valid declaration.
    #[test]
    fn documented_example_parses() {
        let conf = include_str!("../../conf/ragway.toml");
        let start = conf
            .find("# [[presets.declared]]")
            .expect("example present");
        let example: String = conf[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter(|l| !l.starts_with("# #"))
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        let file: crate::config::file::FileConfig = toml::from_str(&example).unwrap();
        let declared = file.presets.unwrap().declared.unwrap();
        let out = super::declared(declared, 32).unwrap();
        assert_eq!(out[0].id, "docs-assistant");
        assert_eq!(out[0].access_grants[0].principal_id, "*");
        assert!(
            out[0].params["system"]
                .as_str()
                .unwrap()
                .contains("{{USER_NAME}}")
        );
    }

    #[test]
    fn declared_presets_refuse_duplicates_and_cycles() {
        let p = |id: &str, base: &str| DeclaredPresetFile {
            id: id.into(),
            base_model_id: base.into(),
            ..DeclaredPresetFile::default()
        };
        let ok = declared(vec![p("a", "m"), p("b", "a")], 32).unwrap();
        assert_eq!(ok.len(), 2);
        assert!(ok.iter().all(is_declared));
        assert!(declared(vec![p("a", "m"), p("a", "m")], 32).is_err());
        let cycle = declared(vec![p("a", "b"), p("b", "a")], 32).unwrap_err();
        assert!(cycle.contains("cycle"), "{cycle}");
        assert!(declared(vec![p("a b", "m")], 32).is_err());
    }
}
