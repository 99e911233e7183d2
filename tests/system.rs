//! Health, readiness, version, unknown routes, docs and metrics.

mod common;

use common::fake::{FakeUpstream, dead_url};
use common::gateway::{Setup, assert_error};
use reqwest::Method;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_version_and_ready() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let r = gw.get("/health", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        serde_json::json!({"status": true})
    );
    let v: Value = gw.get("/api/version", None).await.json().await.unwrap();
    assert_eq!(v["version"], "0.10.2");
    assert_eq!(gw.get("/ready", None).await.status(), 200);
    assert_eq!(gw.get("/health/db", None).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_without_a_reachable_upstream() {
    let gw = Setup::new().ollama(&dead_url()).start().await;
    assert_error(gw.get("/ready", None).await, 503, "No upstream reachable").await;
    // Liveness does not depend on upstreams.
    assert_eq!(gw.get("/health", None).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_wrong_methods_are_json_errors() {
    let gw = Setup::new().ollama(&dead_url()).start().await;
    assert_error(gw.get("/nope", None).await, 404, "Not Found").await;
    let r = gw.get("/api/chat/completions", None).await;
    assert_eq!(r.headers()["allow"], "POST");
    assert_error(r, 405, "not allowed").await;
    let r = gw
        .req(Method::PUT, "/api/v1/auths/signin", None)
        .send()
        .await
        .unwrap();
    assert_error(r, 405, "not allowed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_only_in_dev_and_served_offline() {
    let prod = Setup::new().ollama(&dead_url()).start().await;
    assert_error(prod.get("/docs", None).await, 404, "Not Found").await;
    assert_error(prod.get("/openapi.json", None).await, 404, "Not Found").await;

    let dev = Setup::new()
        .ollama(&dead_url())
        .env("ENV", "dev")
        .start()
        .await;
    let r = dev.get("/docs", None).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(r.text().await.unwrap().contains("swagger"));
    let r = dev.get("/docs/swagger-ui.css", None).await;
    assert_eq!(r.status(), 200);
    let init = dev
        .get("/docs/swagger-initializer.js", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(init.contains("/openapi.json"), "UI points at our document");
    let doc: Value = dev.get("/openapi.json", None).await.json().await.unwrap();
    for p in [
        "/api/chat/completions",
        "/api/models",
        "/ollama/api/chat",
        "/ollama/api/chat/{url_idx}",
        "/api/v1/auths/signin",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} documented");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exposed_on_their_own_listener() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    gw.get("/api/models", Some(&admin)).await;
    gw.get("/api/models", Some("bad-token")).await;
    let r = gw
        .post(
            "/ollama/api/chat",
            Some(&admin),
            serde_json::json!({"model": "m:latest", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // A request is counted in the gateway's logging phase, which runs just after the client
    // has the whole answer: scrape until the last one is in (bounded), then assert.
    let mut m = gw.metrics().await;
    for _ in 0..100 {
        if m.contains("ragway_http_request_duration_seconds_bucket{group=\"ollama\"")
            && m.contains("ragway_streamed_bytes_total{group=\"ollama\"}")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = gw.metrics().await;
    }
    for needle in [
        "ragway_http_requests_total{group=\"models\",method=\"GET\",status=\"200\"}",
        "ragway_http_requests_total{group=\"models\",method=\"GET\",status=\"401\"}",
        "ragway_http_request_duration_seconds_bucket{group=\"ollama\"",
        "ragway_upstream_first_byte_seconds_bucket{group=\"ollama\"",
        "ragway_http_requests_in_flight",
        &format!(
            "ragway_upstream_up{{kind=\"ollama\",upstream=\"{}\"}} 1",
            up.url
        ),
        "ragway_auth_failures_total{reason=\"invalid_token\"}",
        "ragway_streamed_bytes_total{group=\"ollama\"}",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
    // The main listener does not serve metrics.
    assert_eq!(gw.get("/metrics", None).await.status(), 404);
}
