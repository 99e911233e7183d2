//! Model preset forms and their validation: what a client (or, through the configuration's
//! `[[presets.declared]]`, an operator) may declare. Needs nothing above the store, so the
//! configuration checks declared presets with the same rules as the API.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::store::{Grant, PresetRecord, now_secs};

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

/// Whether a preset was declared in the configuration file.
pub fn is_declared(p: &PresetRecord) -> bool {
    p.user_id == CONFIG_OWNER && p.created_at == 0
}
