//! Limits and usage: absurd or mistyped limits, bad usage filters, reading someone else's
//! usage, non-admins setting limits, and an upstream reporting absurd token counts.

use serde_json::{Value, json};

use super::common::fake::FakeUpstream;
use super::common::gateway::{Gateway, Setup};
use super::support;

async fn setup() -> (FakeUpstream, Gateway, String, String) {
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let gw = Setup::new().openai(&up.url).start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "mallory@example.com").await;
    (up, gw, admin, user)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_and_negative_limits_at_key_creation() {
    let (_up, gw, _admin, user) = setup().await;
    for limits in [
        json!({"rpm": -1}),
        json!({"rpm": 0}),
        json!({"tpm": 1e30}),
        json!({"tpm": 18_446_744_073_709_551_615u64}),
        json!({"rpd": 2.5}),
    ] {
        let r = gw
            .post(
                "/api/v1/auths/api_key",
                Some(&user),
                json!({ "limits": limits }),
            )
            .await;
        let v = support::clear_error(r, 422).await;
        assert!(v["detail"].as_str().unwrap().contains("limits."), "{v}");
    }
    // Nothing was created by the refusals.
    assert_eq!(
        gw.get("/api/v1/auths/api_key", Some(&user)).await.status(),
        404
    );
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_fields_of_the_wrong_type_or_name() {
    let (_up, gw, _admin, user) = setup().await;
    for limits in [
        json!({"rpm": "60"}),
        json!({"rpm": [60]}),
        json!({"rpm": {"$gt": 1}}),
        json!({"burst": 10}),
        json!([60, 1000]),
        json!("unlimited"),
        json!(true),
    ] {
        let r = gw
            .post(
                "/api/v1/auths/api_key",
                Some(&user),
                json!({ "limits": limits }),
            )
            .await;
        support::clear_error(r, 422).await;
    }
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_filters_with_bad_dates_or_oversized_values() {
    let (_up, gw, admin, _user) = setup().await;
    for q in [
        "since=yesterday",
        "until=2024-02-30",
        "since=2024-01-01T25:61:00Z",
        "since=-100",
        "since=99999999999999999999999",
        "since=2025-01-01T00:00:00",
        "since=2025-01-02&until=2025-01-01",
        "since=%00%FF",
    ] {
        let r = gw.get(&format!("/api/v1/usage?{q}"), Some(&admin)).await;
        support::clear_error(r, 400).await;
    }
    let long = "k".repeat(600);
    let r = gw
        .get(&format!("/api/v1/usage?key_prefix={long}"), Some(&admin))
        .await;
    support::clear_error(r, 400).await;
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_reading_another_users_usage() {
    let (_up, gw, admin, user) = setup().await;
    let admin_id = user_id(&gw, &admin).await;
    let r = gw
        .get(&format!("/api/v1/usage?user_id={admin_id}"), Some(&user))
        .await;
    support::clear_error(r, 403).await;
    // Without a credential at all.
    let r = gw.get("/api/v1/usage", None).await;
    support::clear_error(r, 401).await;
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_lifting_their_own_limits() {
    let (_up, gw, admin, user) = setup().await;
    let uid = user_id(&gw, &user).await;
    // The limits route is the admin's.
    let r = gw
        .post(
            &format!("/api/v1/usage/limits/{uid}"),
            Some(&user),
            json!({"user": {"rpm": 1_000_000}}),
        )
        .await;
    support::clear_error(r, 401).await;
    // An admin's mistakes are refused clearly too.
    for body in [
        json!({"user": {"rpm": 0}}),
        json!({"everyone": {"rpm": 1}}),
        json!({}),
        json!({"user": "fast"}),
    ] {
        let r = gw
            .post(&format!("/api/v1/usage/limits/{uid}"), Some(&admin), body)
            .await;
        support::clear_error(r, 422).await;
    }
    let r = gw
        .post(
            "/api/v1/usage/limits/no-such-user",
            Some(&admin),
            json!({"user": {"rpm": 1}}),
        )
        .await;
    support::clear_error(r, 404).await;
    let r = gw
        .post(
            &format!("/api/v1/usage/limits/{uid}"),
            Some(&admin),
            json!({"api_key": {"rpm": 1}}),
        )
        .await;
    support::clear_error(r, 404).await;
    support::alive(&gw).await;
}

/// The usage rows an admin sees.
async fn usage(gw: &Gateway, admin: &str) -> Value {
    gw.get("/api/v1/usage", Some(admin))
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reporting_absurd_token_counts() {
    let (up, gw, admin, _user) = setup().await;
    let key = gw.key(&admin).await;
    let chat = |stream: bool| json!({"model": "gpt-x", "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    // u64::MAX and 1e300: clamped per answer, summed with saturation, never wrapped.
    up.set_usage(json!(u64::MAX), json!(1e300));
    for stream in [false, true, false] {
        let r = gw
            .post("/api/chat/completions", Some(&key), chat(stream))
            .await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    // Negative and textual counts are not counts.
    up.set_usage(json!(-5), json!("12"));
    let r = gw
        .post("/api/chat/completions", Some(&key), chat(false))
        .await;
    assert_eq!(r.status(), 200);
    let v = usage(&gw, &admin).await;
    let row = &v["data"][0];
    assert_eq!(row["requests"], 4);
    assert_eq!(row["prompt_tokens"], 3_000_000_000_000u64);
    assert_eq!(row["completion_tokens"], 3_000_000_000_000u64);
    // A limit hit by such an answer blocks for at most one window.
    let key = {
        let r = gw
            .post(
                "/api/v1/auths/api_key",
                Some(&admin),
                json!({"limits": {"tpm": 1000}}),
            )
            .await;
        r.json::<Value>().await.unwrap()["api_key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    up.set_usage(json!(u64::MAX), json!(u64::MAX));
    let r = gw
        .post("/api/chat/completions", Some(&key), chat(false))
        .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // The charge lands when the gateway finishes the request, which can be just after the
    // client has the whole answer; the usage row is written after the charge, so once it
    // shows the request the next one meets the spent budget.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v = usage(&gw, &admin).await;
        let requests: u64 = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["requests"].as_u64().unwrap())
            .sum();
        if requests == 5 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "usage rows: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = gw
        .post("/api/chat/completions", Some(&key), chat(false))
        .await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry <= 60, "{retry}");
    support::clear_error(r, 429).await;
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_key_reaching_for_the_limits_route() {
    let (_up, gw, admin, _user) = setup().await;
    let admin_id = user_id(&gw, &admin).await;
    // An admin's own key, restricted to one model: it may not act as the admin.
    let r = gw
        .post(
            "/api/v1/auths/api_key",
            Some(&admin),
            json!({"models": ["gpt-x"]}),
        )
        .await;
    let key = r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let r = gw
        .post(
            &format!("/api/v1/usage/limits/{admin_id}"),
            Some(&key),
            json!({"api_key": null}),
        )
        .await;
    support::clear_error(r, 403).await;
    let r = gw
        .get(&format!("/api/v1/usage/limits/{admin_id}"), Some(&key))
        .await;
    support::clear_error(r, 403).await;
    // Its own usage it may read.
    assert_eq!(gw.get("/api/v1/usage", Some(&key)).await.status(), 200);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_nested_or_repeated_to_confuse_the_parser() {
    let (_up, gw, admin, user) = setup().await;
    let uid = user_id(&gw, &user).await;
    for raw in [
        r#"{"limits": {"rpm": {"rpm": 1}}}"#,
        r#"{"limits": {"rpm": 5, "rpm": 1000000}}"#,
        r#"{"limits": {"rpm": 5}, "limits": null}"#,
        r#"{"limits": {"RPM": 5}}"#,
    ] {
        let r = gw
            .req(reqwest::Method::POST, "/api/v1/auths/api_key", Some(&user))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert!(status == 400 || status == 422, "{raw}: {status}");
        support::clear_error(r, status).await;
    }
    let r = gw
        .req(
            reqwest::Method::POST,
            &format!("/api/v1/usage/limits/{uid}"),
            Some(&admin),
        )
        .header("content-type", "application/json")
        .body(r#"{"user": {"tpm": 10}, "user": null}"#)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert!(status == 400 || status == 422, "{status}");
    support::clear_error(r, status).await;
    support::alive(&gw).await;
}
