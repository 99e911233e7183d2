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
mod cache;
mod clock;

use std::collections::HashSet;

use serde_json::{Value, json};

pub use crate::forms::preset::*;
pub use apply::{Resolved, check_knowledge};
pub use cache::{PRESET_CACHE_TTL, PresetCache, StoredPresets};

use crate::auth::Identity;
use crate::config::Config;
use crate::error::ApiError;
use crate::models::ModelRegistry;
use crate::rag::Retriever;
use crate::storage::Metadata;
use crate::store::{PresetRecord, Role, User};

/// What presets read: the settings (declared presets), the metadata seam (stored presets,
/// owners) and its in-memory copy, the model registry (a preset's base model) and retrieval
/// (for presets that carry knowledge).
#[derive(Clone, Copy)]
pub struct Presets<'a> {
    pub config: &'a Config,
    pub meta: &'a dyn Metadata,
    pub cache: &'a PresetCache,
    pub models: &'a ModelRegistry,
    pub retriever: Retriever<'a>,
}

/// A preset by id: declared ones first (they shadow a stored preset of the same id), then
/// the in-memory copy of the stored ones.
///
/// # Errors
/// The store failed while the copy was (re)loaded.
pub async fn find(app: &Presets<'_>, id: &str) -> Result<Option<PresetRecord>, ApiError> {
    if let Some(p) = app.config.presets.declared.iter().find(|p| p.id == id) {
        return Ok(Some(p.clone()));
    }
    Ok(app.cache.stored(app.meta).await?.get(id).cloned())
}

/// A preset by id as [`find`], read from the store rather than its in-memory copy.
///
/// # Errors
/// The store failed.
pub async fn find_fresh(app: &Presets<'_>, id: &str) -> Result<Option<PresetRecord>, ApiError> {
    if let Some(p) = app.config.presets.declared.iter().find(|p| p.id == id) {
        return Ok(Some(p.clone()));
    }
    Ok(app.meta.preset(id).await?)
}

/// Every preset: declared ones, then stored ones not shadowed by them.
pub async fn all(app: &Presets<'_>) -> Result<Vec<PresetRecord>, ApiError> {
    let declared = &app.config.presets.declared;
    let mut out = declared.clone();
    out.extend(
        app.cache
            .stored(app.meta)
            .await?
            .all()
            .iter()
            .filter(|p| !declared.iter().any(|d| d.id == p.id))
            .cloned(),
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
    app: &Presets<'_>,
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
        match find(app, &current).await? {
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
///
/// # Errors
/// When the store fails (never shown as an owner-less preset).
pub async fn access_json(
    app: &Presets<'_>,
    user: &User,
    p: &PresetRecord,
) -> Result<Value, ApiError> {
    let mut v = model_json(p);
    v["user"] = match app.meta.user_by_id(&p.user_id).await? {
        Some(u) => json!({"id": u.id, "name": u.name, "role": u.role.as_str(), "email": u.email}),
        None => Value::Null,
    };
    v["write_access"] = json!(can_write(user, p));
    Ok(v)
}

/// `/api/models` entries of the presets `who` may use, as Open WebUI lists workspace
/// models: `owned_by` and `connection_type` of the base, `preset: true`, and `info` (the
/// row without `params`, and without the profile image, which `/api/models` drops).
pub async fn model_entries(
    app: &Presets<'_>,
    who: &Identity,
    catalog: &crate::models::Catalog,
) -> Result<Vec<Value>, ApiError> {
    let presets = all(app).await?;
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
pub async fn resolve(
    app: &Presets<'_>,
    who: &Identity,
    model: &str,
) -> Result<Option<Resolved>, ApiError> {
    let Some(top) = find(app, model).await? else {
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
        if let Some(inner) = find(app, &base_id).await? {
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
    resolved.check_knowledge(app, who).await?;
    Ok(Some(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::DeclaredPresetFile;
    use crate::config::presets::declared;

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
        let out = crate::config::presets::declared(declared, 32).unwrap();
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
