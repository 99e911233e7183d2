//! `[[presets.declared]]`: model presets declared in the configuration file, checked with
//! the API's rules.

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use super::file::DeclaredPresetFile;
use crate::forms::preset::{
    CONFIG_OWNER, MAX_DEPTH, PresetForm, PresetGrantForm, check_form, parse_grants,
};
use crate::store::PresetRecord;

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
