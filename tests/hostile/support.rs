//! Assertions shared by every hostile case.

use reqwest::Response;
use serde_json::Value;

use super::common::gateway::Gateway;

/// A clear gateway-made error: the status, JSON, `detail` and `error.message` equal.
pub async fn clear_error(r: Response, status: u16) -> Value {
    let got = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = r.text().await.unwrap_or_default();
    assert_eq!(got, status, "status (body: {text})");
    assert!(
        ct.starts_with("application/json"),
        "JSON error, got {ct:?}: {text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let detail = v["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {v}"));
    assert!(!detail.is_empty(), "empty detail");
    assert_eq!(v["error"]["message"], v["detail"], "error.message = detail");
    v
}

/// The gateway still answers a plain request.
pub async fn alive(gw: &Gateway) {
    let r = gw.get("/health", None).await;
    assert_eq!(r.status(), 200, "gateway still answers /health");
}
