//! Usage metering: token counts taken from the upstreams' own reports (OpenAI JSON `usage`,
//! the final SSE usage chunk, Ollama's final NDJSON object), the `include_usage` request and
//! the stripping of the chunk the client did not ask for, `GET /api/v1/usage` (own usage,
//! admins everyone's, filters), persistence across a restart, and the Prometheus series.

mod common;

use common::fake::FakeUpstream;
use common::gateway::{Gateway, Setup};
use common::upload::upload_text;
use serde_json::{Value, json};

const CHAT: &str = "/api/chat/completions";

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// The caller's user id.
async fn user_id(gw: &Gateway, token: &str) -> String {
    let v: Value = gw
        .get("/api/v1/auths/", Some(token))
        .await
        .json()
        .await
        .unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// `GET /api/v1/usage?{query}` as `token`: the rows.
async fn usage(gw: &Gateway, token: &str, query: &str) -> Vec<Value> {
    let r = gw.get(&format!("/api/v1/usage?{query}"), Some(token)).await;
    assert_eq!(r.status(), 200, "usage query {query}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["truncated"], false);
    v["data"].as_array().unwrap().clone()
}

fn row<'a>(rows: &'a [Value], model: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["model"] == model)
        .unwrap_or_else(|| panic!("no row for {model} in {rows:?}"))
}

fn counts(r: &Value) -> (u64, u64, u64) {
    (
        r["requests"].as_u64().unwrap(),
        r["prompt_tokens"].as_u64().unwrap(),
        r["completion_tokens"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_sse_usage_equal_what_the_upstream_reported() {
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let gw = Setup::new().openai(&up.url).start().await;
    let admin = gw.admin().await;
    let key = gw.key(&admin).await;
    let prefix = &key[..11];

    up.set_usage(json!(11), json!(22));
    let r = gw.post(CHAT, Some(&key), chat("gpt-x", false)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 11, "answer untouched");

    // A stream whose client did not ask for usage: ragway asks, and drops the extra chunk.
    up.set_usage(json!(100), json!(200));
    let r = gw.post(CHAT, Some(&key), chat("gpt-x", true)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let sent = up.requests_to("/chat/completions").pop().unwrap().json();
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "usage asked for"
    );
    assert!(
        !text.contains("\"prompt_tokens\""),
        "usage chunk stripped: {text}"
    );
    assert!(
        text.contains("Hello") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
    let events = text.matches("data: ").count();
    assert_eq!(events, 5, "3 content chunks, the final one, [DONE]: {text}");

    // A client that asked keeps its chunk, and its stream_options as sent.
    up.set_usage(json!(1000), json!(2000));
    let mut body = chat("gpt-x", true);
    body["stream_options"] = json!({"include_usage": true});
    let text = gw.post(CHAT, Some(&key), body).await.text().await.unwrap();
    assert!(text.contains("\"prompt_tokens\":1000"), "{text}");

    let rows = usage(&gw, &admin, "").await;
    let r = row(&rows, "gpt-x");
    assert_eq!(r["key_prefix"], prefix);
    assert_eq!(r["user_id"], user_id(&gw, &admin).await);
    assert_eq!(counts(r), (3, 1111, 2222));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_ndjson_json_and_openai_routes_are_metered() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    up.set_usage(json!(3), json!(4));
    let msgs = json!([{"role": "user", "content": "hi"}]);

    // NDJSON stream and a whole JSON answer on the native API.
    let r = gw
        .post(
            "/ollama/api/chat",
            Some(&admin),
            json!({"model": "m:latest", "messages": msgs}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("\"eval_count\":4"),
        "NDJSON untouched: {text}"
    );
    let r = gw
        .post(
            "/ollama/api/generate",
            Some(&admin),
            json!({"model": "m:latest", "prompt": "hi", "stream": false}),
        )
        .await;
    assert_eq!(r.status(), 200);
    // The OpenAI-compatible route streams SSE: usage asked for and stripped there too.
    let r = gw
        .post(
            "/ollama/v1/chat/completions",
            Some(&admin),
            json!({"model": "m:latest", "messages": msgs, "stream": true}),
        )
        .await;
    let text = r.text().await.unwrap();
    assert!(!text.contains("prompt_tokens"), "{text}");
    let sent = up.requests_to("/v1/chat/completions").pop().unwrap().json();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["model"], "m:latest");

    let rows = usage(&gw, &admin, "model=m:latest").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["key_prefix"], Value::Null, "session traffic");
    assert_eq!(counts(&rows[0]), (3, 9, 12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rag_chat_is_metered() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    let f = upload_text(&gw, &admin, "notes.txt", "Ragway listens on port 3000.").await;
    up.set_usage(json!(40), json!(2));
    for stream in [false, true] {
        let mut body = chat("m:latest", stream);
        body["files"] = json!([{"type": "file", "id": f["id"], "name": "notes.txt"}]);
        let r = gw.post(CHAT, Some(&admin), body).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("sources"), "{text}");
    }
    let rows = usage(&gw, &admin, "").await;
    assert_eq!(counts(row(&rows, "m:latest")), (2, 80, 4));
    let m = gw.metrics().await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("ragway_overhead_seconds_count{phase=\"rag\"}")),
        "rag phase observed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_read_their_own_usage_admins_everyones_with_filters() {
    let up = FakeUpstream::openai(&["gpt-x", "gpt-y"]).await;
    let gw = Setup::new().openai(&up.url).start().await;
    let admin = gw.admin().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    let bob = gw.user(&admin, "bob@example.com").await;
    let alice_key = gw.key(&alice).await;
    let (alice_id, bob_id) = (user_id(&gw, &alice).await, user_id(&gw, &bob).await);
    for (token, model) in [(&alice_key, "gpt-x"), (&alice, "gpt-y"), (&bob, "gpt-x")] {
        let r = gw.post(CHAT, Some(token), chat(model, false)).await;
        assert_eq!(r.status(), 200);
    }

    let own = usage(&gw, &alice, "").await;
    assert_eq!(own.len(), 2, "{own:?}");
    assert!(own.iter().all(|r| r["user_id"] == alice_id.as_str()));
    assert_eq!(usage(&gw, &bob, "").await.len(), 1);
    let all = usage(&gw, &admin, "").await;
    assert_eq!(all.len(), 3);
    let by_model = usage(&gw, &admin, "model=gpt-x").await;
    assert_eq!(by_model.len(), 2);
    let by_key = usage(&gw, &admin, &format!("key_prefix={}", &alice_key[..11])).await;
    assert_eq!(by_key.len(), 1);
    assert_eq!(by_key[0]["model"], "gpt-x");
    let by_user = usage(&gw, &admin, &format!("user_id={bob_id}")).await;
    assert_eq!(by_user.len(), 1);
    assert_eq!(
        usage(&gw, &alice, &format!("user_id={alice_id}"))
            .await
            .len(),
        2
    );

    // Time windows: a past window is empty, one around now has everything; both forms.
    assert!(
        usage(&gw, &admin, "since=2001-01-01&until=2001-01-02T00:00:00Z")
            .await
            .is_empty()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let around = format!("since={}&until={}", now - 7200, now + 7200);
    assert_eq!(usage(&gw, &admin, &around).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_usage_survives_a_restart() {
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let setup = Setup::new().openai(&up.url);
    let gw = setup.clone().start().await;
    let admin = gw.admin().await;
    let key = gw.key(&admin).await;
    up.set_usage(json!(5), json!(6));
    for stream in [false, true, false] {
        let r = gw.post(CHAT, Some(&key), chat("gpt-x", stream)).await;
        assert_eq!(r.status(), 200);
        // The whole answer read: the request is acknowledged.
        r.bytes().await.unwrap();
    }
    // Stopped without anyone reading the usage first.
    let dir = gw.stop().await;
    let gw = setup.start_in(dir).await;
    let rows = usage(&gw, &admin, "").await;
    assert_eq!(counts(row(&rows, "gpt-x")), (3, 15, 18));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_series_have_bounded_labels_and_the_overhead_histogram() {
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let gw = Setup::new().openai(&up.url).start().await;
    let admin = gw.admin().await;
    let key = gw.key(&admin).await;
    up.set_usage(json!(7), json!(8));
    let r = gw.post(CHAT, Some(&key), chat("gpt-x", false)).await;
    assert_eq!(r.status(), 200);
    let prefix = &key[..11];
    // The request is metered when pingora logs it, which may come just after the client has
    // the whole answer: wait (bounded) for its series rather than race it.
    let series = format!("ragway_usage_requests_total{{key=\"{prefix}\",model=\"gpt-x\"}}");
    let mut m = gw.metrics().await;
    for _ in 0..100 {
        if m.contains(&series) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = gw.metrics().await;
    }
    let line = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
            .to_string()
    };
    // Other tests in this binary share the registry: look for this key's own series.
    assert!(
        line(&format!(
            "ragway_usage_requests_total{{key=\"{prefix}\",model=\"gpt-x\"}}"
        ))
        .ends_with(" 1")
    );
    assert!(
        line(&format!(
            "ragway_usage_tokens_total{{key=\"{prefix}\",model=\"gpt-x\",type=\"completion\"}}"
        ))
        .ends_with(" 8")
    );
    for phase in ["auth", "routing"] {
        line(&format!(
            "ragway_overhead_seconds_count{{phase=\"{phase}\"}}"
        ));
    }
    assert!(!m.contains(&key), "never a whole key in metrics");
}
