//! Per-key and per-user limits on `PostgreSQL`, through the HTTP API: two gateways on one
//! database share every bucket (requests counted on either, tokens charged on one refuse on
//! the other), and a database that cannot check a limit lets requests through, counted in
//! `ragway_rate_limit_store_failures_total`, rather than fail them.
//!
//! `PostgreSQL` comes from `RAGWAY_TEST_POSTGRES_URL` (scripts/test.sh starts a throwaway
//! cluster); under CI a missing URL fails the test.

mod common;

use common::fake::FakeUpstream;
use common::gateway::{Gateway, Setup};
use common::postgres::{TestDb, connect};
use serde_json::{Value, json};

const CHAT: &str = "/api/chat/completions";
const SECRET: &str = "one-secret-shared-by-both-gateways";

async fn gateway(db: &TestDb, upstream: &str) -> Gateway {
    Setup::new()
        .openai(upstream)
        .env("DATABASE_URL", &db.url)
        .env("WEBUI_SECRET_KEY", SECRET)
        .toml("[storage]\npool-size = 4")
        .start()
        .await
}

fn chat() -> Value {
    json!({"model": "gpt-x", "stream": false, "messages": [{"role": "user", "content": "hi"}]})
}

async fn new_key(gw: &Gateway, token: &str, limits: Value) -> String {
    let r = gw
        .post(
            "/api/v1/auths/api_key",
            Some(token),
            json!({ "limits": limits }),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn refused_for(r: reqwest::Response) -> String {
    let status = r.status();
    assert_eq!(status, 429, "{}", r.text().await.unwrap());
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    v["error"]["type"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_hold_across_two_gateways_on_one_database() {
    let Some(db) = TestDb::create("shared limits").await else {
        return;
    };
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let a = gateway(&db, &up.url).await;
    let b = gateway(&db, &up.url).await;
    let admin = a.admin().await;

    // Four a day on the key, requests alternating between the gateways: four in all pass.
    let alice = a.user(&admin, "alice@example.com").await;
    let key = new_key(&a, &alice, json!({"rpd": 4})).await;
    for gw in [&a, &b, &a, &b] {
        assert_eq!(gw.post(CHAT, Some(&key), chat()).await.status(), 200);
    }
    let before = up.request_count();
    for gw in [&a, &b] {
        let r = gw.post(CHAT, Some(&key), chat()).await;
        assert_eq!(refused_for(r).await, "requests");
    }
    assert_eq!(up.request_count(), before, "refused before the upstream");

    // Tokens of an answer on A are charged as it ends: B refuses the next request (60 tokens
    // against 50 a minute).
    up.set_usage(json!(30), json!(30));
    let bob = a.user(&admin, "bob@example.com").await;
    let key = new_key(&a, &bob, json!({"tpm": 50})).await;
    let r = a.post(CHAT, Some(&key), chat()).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // A whole answer with a Content-Length can reach the client just before the gateway
    // reaches its end and charges it: a request sent at once would race the charge.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let r = b.post(CHAT, Some(&key), chat()).await;
    assert_eq!(refused_for(r).await, "tokens");

    // Nothing is held in either process's memory.
    assert!(a.app().usage.limiter.is_empty() && b.app().usage.limiter.is_empty());
    drop((a, b));
    db.drop_db().await;
}

/// The database cannot answer the limit check (the function is gone, as after a botched
/// restore): limited requests pass, each counted in the failure metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_cannot_check_limits_lets_requests_through() {
    let Some(db) = TestDb::create("shared limits").await else {
        return;
    };
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let gw = gateway(&db, &up.url).await;
    let admin = gw.admin().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    let key = new_key(&gw, &alice, json!({"rpd": 1})).await;
    assert_eq!(gw.post(CHAT, Some(&key), chat()).await.status(), 200);
    let r = gw.post(CHAT, Some(&key), chat()).await;
    assert_eq!(refused_for(r).await, "requests", "the limit holds first");

    connect(&db.url)
        .await
        .batch_execute("DROP FUNCTION ragway_rate_admit")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            gw.post(CHAT, Some(&key), chat()).await.status(),
            200,
            "let through while limits cannot be checked"
        );
    }
    let metrics = gw.metrics().await;
    let failures: f64 = metrics
        .lines()
        .find(|l| l.starts_with("ragway_rate_limit_store_failures_total{op=\"admit\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("failure metric missing:\n{metrics}"));
    assert!(failures >= 3.0, "{failures}");
    drop(gw);
    db.drop_db().await;
}
