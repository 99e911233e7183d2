//! Health, readiness, version and (in dev mode) the API docs.

use bytes::Bytes;
use serde_json::json;

use super::{HandlerResult, Outcome};
use crate::app::App;
use crate::error::ApiError;
use crate::http::Reply;

/// The Open WebUI API version ragway implements.
pub const OPEN_WEBUI_VERSION: &str = "0.10.2";

pub fn health() -> HandlerResult {
    Ok(Outcome::Reply(Reply::ok(&json!({"status": true}))))
}

pub async fn health_db(app: &App) -> HandlerResult {
    if app.storage.meta.ping().await {
        Ok(Outcome::Reply(Reply::ok(&json!({"status": true}))))
    } else {
        Err(ApiError::new(503, "Database not ready"))
    }
}

pub async fn ready(app: &App) -> HandlerResult {
    if !app.storage.meta.ping().await {
        return Err(ApiError::new(503, "Database not ready"));
    }
    app.models.catalog(false).await;
    if !app.upstreams.all().any(|u| u.is_up()) {
        return Err(ApiError::new(503, "No upstream reachable"));
    }
    Ok(Outcome::Reply(Reply::ok(&json!({"status": true}))))
}

pub fn version() -> HandlerResult {
    Ok(Outcome::Reply(Reply::ok(&json!({
        "version": OPEN_WEBUI_VERSION,
        "deployment_id": "",
        "ragway": env!("CARGO_PKG_VERSION"),
    }))))
}

pub fn docs(app: &App, session: &crate::http::Session, tail: &str) -> HandlerResult {
    let Some(docs) = &app.docs else {
        return Err(ApiError::not_found("Not Found"));
    };
    if tail.is_empty() && !session.req_header().uri.path().ends_with('/') {
        // Swagger UI's page loads its assets by relative URLs (`./swagger-ui.css`), which
        // from `/docs` resolve to `/swagger-ui.css`: send browsers to `/docs/`. The
        // relative target keeps working behind a proxy that mounts ragway under a prefix.
        return Ok(Outcome::Reply(
            Reply::bytes(
                308,
                "text/plain; charset=utf-8",
                Bytes::from_static(b"See docs/\n"),
            )
            .with_header(::http::header::LOCATION, "docs/".to_string()),
        ));
    }
    match utoipa_swagger_ui::serve(tail, docs.swagger.clone()) {
        Ok(Some(file)) => {
            let ct = match file.content_type.as_str() {
                "text/html" => "text/html; charset=utf-8",
                "text/css" => "text/css",
                "application/javascript" | "text/javascript" => "application/javascript",
                "image/png" => "image/png",
                _ => "application/octet-stream",
            };
            Ok(Outcome::Reply(Reply::bytes(
                200,
                ct,
                Bytes::from(file.bytes.into_owned()),
            )))
        }
        Ok(None) => Err(ApiError::not_found("Not Found")),
        Err(e) => Err(ApiError::internal(format!("Swagger UI: {e}"))),
    }
}

pub fn openapi(app: &App) -> HandlerResult {
    let Some(docs) = &app.docs else {
        return Err(ApiError::not_found("Not Found"));
    };
    Ok(Outcome::Reply(Reply::bytes(
        200,
        "application/json",
        docs.openapi_json.clone(),
    )))
}
