//! `GET /api/models`.

use serde_json::Value;

use super::{HandlerResult, Outcome, identity, query};
use crate::app::App;
use crate::http::Session;
use crate::http::{self, Reply};
use crate::request::RequestCtx;

pub async fn list(app: &App, session: &Session, ctx: &RequestCtx) -> HandlerResult {
    let refresh = http::query_bool(query(session).as_deref(), "refresh")?.unwrap_or(false);
    let id = identity(ctx)?;
    let catalog = app.models.catalog(refresh).await;
    // Model presets (src/presets) beside the base models; a preset shadows a base model
    // of the same id, as in Open WebUI.
    let presets = crate::presets::model_entries(&app.presets(), id, &catalog).await?;
    if presets.is_empty() && id.allowed_models.is_none() {
        return Ok(Outcome::Reply(Reply::bytes(
            200,
            "application/json",
            catalog.models_body.clone(),
        )));
    }
    let data: Vec<&Value> = catalog
        .list
        .iter()
        .filter(|m| id.may_use_model(&m.id))
        .filter(|m| !presets.iter().any(|p| p["id"] == m.id.as_str()))
        .map(|m| &m.json)
        .chain(presets.iter())
        .collect();
    // Serialised from the catalog's own values: building a `json!` tree first would copy
    // every model's JSON on each request.
    Ok(Outcome::Reply(Reply::bytes(
        200,
        "application/json",
        crate::models::models_body(&data),
    )))
}
