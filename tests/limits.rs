//! Per-key and per-user limits: the 429 (OpenAI's `rate_limit_exceeded` shape with
//! `Retry-After`), refusal before any upstream work, the reset once the bucket refills,
//! per-key values at key creation and by an admin over the configured defaults, and token
//! limits charged from JSON, SSE and NDJSON answers.

mod common;

use std::time::Duration;

use common::fake::FakeUpstream;
use common::gateway::{Gateway, Setup};
use reqwest::Response;
use serde_json::{Value, json};

const CHAT: &str = "/api/chat/completions";

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

async fn key_with(gw: &Gateway, token: &str, body: Value) -> Response {
    gw.post("/api/v1/auths/api_key", Some(token), body).await
}

async fn new_key(gw: &Gateway, token: &str, limits: Value) -> String {
    let r = key_with(gw, token, json!({ "limits": limits })).await;
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn user_id(gw: &Gateway, token: &str) -> String {
    let v: Value = gw
        .get("/api/v1/auths/", Some(token))
        .await
        .json()
        .await
        .unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// Asserts a rate-limit refusal of `kind` (`requests` or `tokens`); returns `Retry-After`.
/// Tokens are charged when pingora logs a request, which can come just after the client has
/// read the whole answer; a test that sends the next request at once would race the charge.
async fn charged() {
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

async fn assert_429(r: Response, kind: &str) -> u64 {
    assert_eq!(r.status(), 429);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("whole seconds");
    assert!(retry >= 1);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["param"].is_null());
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("Rate limit reached for"), "{msg}");
    assert_eq!(v["detail"], v["error"]["message"]);
    retry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_429_before_the_upstream_then_reset() {
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let gw = Setup::new().openai(&up.url).start().await;
    let admin = gw.admin().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    // 60 a minute refills one a second: the reset is observable without waiting a minute.
    let key = new_key(&gw, &alice, json!({"rpm": 60})).await;
    let shown: Value = gw
        .get("/api/v1/auths/api_key", Some(&alice))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["limits"], json!({"rpm": 60}));

    let mut refused = None;
    for _ in 0..600 {
        let r = gw.post(CHAT, Some(&key), chat("gpt-x", false)).await;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
    }
    let sent_before = up.requests_to("/chat/completions").len();
    assert!(sent_before >= 60, "the first 60 pass ({sent_before})");
    let retry = assert_429(refused.expect("refused within 600 requests"), "requests").await;
    assert_eq!(retry, 1);
    // Refused again at once, and never forwarded.
    let r = gw.post(CHAT, Some(&key), chat("gpt-x", false)).await;
    if r.status() == 429 {
        assert_429(r, "requests").await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = gw.post(CHAT, Some(&key), chat("gpt-x", false)).await;
    assert_eq!(r.status(), 200, "room again after Retry-After");
    assert!(up.requests_to("/chat/completions").len() <= sent_before + 2);

    // Another user's traffic is not limited by alice's key.
    let bob = gw.user(&admin, "bob@example.com").await;
    let r = gw.post(CHAT, Some(&bob), chat("gpt-x", false)).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_are_charged_from_json_and_sse_answers() {
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let gw = Setup::new().openai(&up.url).start().await;
    let admin = gw.admin().await;
    // 60 tokens against 50 a minute: still over for 12 s after the answer.
    up.set_usage(json!(30), json!(30));
    for (stream, email) in [(false, "json@example.com"), (true, "sse@example.com")] {
        // One user each: a user's key bucket outlives the key (replacing it resets nothing).
        let user = gw.user(&admin, email).await;
        let key = new_key(&gw, &user, json!({"tpm": 50})).await;
        let r = gw.post(CHAT, Some(&key), chat("gpt-x", stream)).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        charged().await;
        let before = up.request_count();
        let r = gw.post(CHAT, Some(&key), chat("gpt-x", stream)).await;
        let retry = assert_429(r, "tokens").await;
        assert!(retry <= 60, "{retry}");
        assert_eq!(up.request_count(), before, "refused before the upstream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_tokens_count_against_a_user_limit_set_by_an_admin() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    let uid = user_id(&gw, &alice).await;
    let r = gw
        .post(
            &format!("/api/v1/usage/limits/{uid}"),
            Some(&admin),
            json!({"user": {"tpm": 10, "rpd": 1000}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["user"], json!({"tpm": 10, "rpd": 1000}));
    assert_eq!(v["api_key"], Value::Null);

    up.set_usage(json!(6), json!(6));
    let body = json!({"model": "m:latest", "messages": [{"role": "user", "content": "hi"}]});
    let r = gw
        .post("/ollama/api/chat", Some(&alice), body.clone())
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("\"done\":true"));
    charged().await;
    // The user limit holds whatever credential the user presents.
    let key = gw.key(&alice).await;
    let r = gw.post("/ollama/api/chat", Some(&key), body.clone()).await;
    assert_429(r, "tokens").await;

    // Cleared by the admin: the user is free again.
    let r = gw
        .post(
            &format!("/api/v1/usage/limits/{uid}"),
            Some(&admin),
            json!({"user": null}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = gw.post("/ollama/api/chat", Some(&key), body).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_defaults_and_per_key_overrides() {
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let gw = Setup::new()
        .openai(&up.url)
        .toml("[limits]\nkey-rpm = 2\nuser-rpd = 1000")
        .start()
        .await;
    let admin = gw.admin().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    let uid = user_id(&gw, &alice).await;

    // A user may not lift their own key above the defaults, only lower it.
    let r = key_with(&gw, &alice, json!({"limits": {"rpm": 100}})).await;
    assert_eq!(r.status(), 403);
    let key = gw.key(&alice).await;
    for _ in 0..2 {
        assert_eq!(
            gw.post(CHAT, Some(&key), chat("gpt-x", false))
                .await
                .status(),
            200
        );
    }
    assert_429(
        gw.post(CHAT, Some(&key), chat("gpt-x", false)).await,
        "requests",
    )
    .await;
    // Sessions are not API keys: the key default does not apply to them.
    assert_eq!(
        gw.post(CHAT, Some(&alice), chat("gpt-x", false))
            .await
            .status(),
        200
    );

    // The admin raises this key's limit.
    let r = gw
        .post(
            &format!("/api/v1/usage/limits/{uid}"),
            Some(&admin),
            json!({"api_key": {"rpm": 1000}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["effective"]["api_key"], json!({"rpm": 1000}));
    assert_eq!(v["effective"]["user"], json!({"rpd": 1000}));
    let got: Value = gw
        .get(&format!("/api/v1/usage/limits/{uid}"), Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["api_key"]["limits"], json!({"rpm": 1000}));
    assert_eq!(
        gw.post(CHAT, Some(&key), chat("gpt-x", false))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_limits_no_state() {
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let gw = Setup::new().openai(&up.url).start().await;
    let admin = gw.admin().await;
    let key = gw.key(&admin).await;
    for _ in 0..20 {
        assert_eq!(
            gw.post(CHAT, Some(&key), chat("gpt-x", false))
                .await
                .status(),
            200
        );
    }
    assert!(
        gw.app().usage.limiter.is_empty(),
        "unset limits touch no bucket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_state_is_capped() {
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let gw = Setup::new()
        .openai(&up.url)
        .toml("[limits]\nuser-rpd = 100\nmax-tracked = 3")
        .start()
        .await;
    let admin = gw.admin().await;
    for i in 0..8 {
        let u = gw.user(&admin, &format!("u{i}@example.com")).await;
        assert_eq!(
            gw.post(CHAT, Some(&u), chat("gpt-x", false)).await.status(),
            200
        );
        assert!(
            gw.app().usage.limiter.len() <= 3,
            "{}",
            gw.app().usage.limiter.len()
        );
    }
    assert_eq!(gw.app().usage.limiter.len(), 3);
}
