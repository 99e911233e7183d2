//! Chat and forwarded JSON: malformed, ambiguous, oversized and amplifying bodies on
//! `/api/chat/completions` and the `/ollama/*` model routes.

use reqwest::Method;
use serde_json::{Value, json};

use super::common::fake::FakeUpstream;
use super::common::gateway::{Gateway, Setup};
use super::common::upload::upload_text;
use super::support::{alive, clear_error};

const MODEL: &str = "m:latest";

async fn setup_with(toml: &str) -> (FakeUpstream, Gateway, String) {
    let up = FakeUpstream::ollama(&[MODEL, "forbidden:latest"]).await;
    let gw = Setup::new().ollama(&up.url).toml(toml).start().await;
    let admin = gw.admin().await;
    (up, gw, admin)
}

async fn setup() -> (FakeUpstream, Gateway, String) {
    setup_with("").await
}

async fn raw(
    gw: &Gateway,
    path: &str,
    token: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    gw.req(Method::POST, path, Some(token))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

const CHAT: &str = "/api/chat/completions";
const ROUTES: [&str; 4] = [
    CHAT,
    "/ollama/api/chat",
    "/ollama/api/generate",
    "/ollama/v1/chat/completions",
];

/// Every malformed body is a 400/422 on every forwarded route, never reaching the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_on_every_forwarded_route() {
    let (up, gw, admin) = setup().await;
    let bodies: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "truncated",
            br#"{"model":"m:latest","messages":[{"role":"us"#.to_vec(),
            400,
        ),
        (
            "trailing garbage",
            br#"{"model":"m:latest","messages":[]} {"#.to_vec(),
            400,
        ),
        (
            "invalid utf-8",
            b"{\"model\":\"m\xff\xfe\",\"messages\":[]}".to_vec(),
            400,
        ),
        ("not an object", b"[1,2,3]".to_vec(), 422),
        ("a bare string", b"\"model\"".to_vec(), 422),
        ("nul byte", b"{\"model\":\"m:latest\"\0}".to_vec(), 400),
        ("trailing comma", br#"{"model":"m:latest",}"#.to_vec(), 400),
        (
            "deep nesting",
            format!(
                "{{\"model\":\"m:latest\",\"x\":{}{}}}",
                "[".repeat(5000),
                "]".repeat(5000)
            )
            .into_bytes(),
            400,
        ),
        (
            "lone surrogate",
            br#"{"model":"\ud800","messages":[]}"#.to_vec(),
            400,
        ),
        ("empty", Vec::new(), 422),
    ];
    for route in ROUTES {
        for (name, body, status) in &bodies {
            let r = raw(&gw, route, &admin, body.clone()).await;
            let v = clear_error(r, *status).await;
            assert!(v["detail"].is_string(), "{route} {name}");
        }
    }
    assert_eq!(
        up.requests_to("/api/chat").len() + up.requests_to("/v1/").len(),
        0
    );
    alive(&gw).await;
}

/// Wrong types and missing fields on chat: 422 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_and_missing_fields() {
    let (_up, gw, admin) = setup().await;
    let cases = [
        (json!({"messages": []}), 400),
        (json!({"model": 5, "messages": []}), 422),
        (json!({"model": MODEL}), 422),
        (json!({"model": MODEL, "messages": "hi"}), 422),
        (json!({"model": MODEL, "messages": [], "files": "f"}), 422),
        (
            json!({"model": MODEL, "messages": [], "files": [{"id": "x"}]}),
            422,
        ),
        (
            json!({"model": MODEL, "messages": [], "files": [{"type": "text"}]}),
            422,
        ),
        (
            json!({"model": MODEL, "messages": [], "files": [{"type": "bogus"}]}),
            400,
        ),
        (json!({"model": MODEL, "messages": [], "params": [1]}), 422),
        (json!({"model": "", "messages": []}), 400),
        (json!({"model": "nope:latest", "messages": []}), 400),
    ];
    for (body, status) in cases {
        clear_error(gw.post(CHAT, Some(&admin), body).await, status).await;
    }
    for route in &ROUTES[1..] {
        clear_error(gw.post(route, Some(&admin), json!({"model": 7})).await, 422).await;
    }
    alive(&gw).await;
}

/// `{"model":"allowed","MODEL":"forbidden"}`: checked as one model, run as another by Go's
/// case-insensitive decoder. Refused on every route, for a restricted key and for an admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_keys_never_reach_the_upstream() {
    let (up, gw, admin) = setup().await;
    let r = gw
        .post(
            "/api/v1/auths/api_key",
            Some(&admin),
            json!({"models": [MODEL]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let restricted = r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let bodies = [
        r#"{"model":"m:latest","MODEL":"forbidden:latest","messages":[],"prompt":"x"}"#,
        r#"{"model":"m:latest","Model":"forbidden:latest","messages":[],"prompt":"x"}"#,
        r#"{"model":"m:latest","model":"forbidden:latest","messages":[],"prompt":"x"}"#,
        r#"{"model":"m:latest","mod\u0065l":"forbidden:latest","messages":[],"prompt":"x"}"#,
        r#"{"model":"m:latest","messages":[],"prompt":"x","options":{"a":1,"a":2}}"#,
        r#"{"model":"m:latest","messages":[],"\u017ftream":true,"stream":false}"#,
    ];
    for token in [&restricted, &admin] {
        for route in ROUTES {
            for body in bodies {
                let v = clear_error(raw(&gw, route, token, body).await, 400).await;
                assert!(
                    v["detail"].as_str().unwrap().contains("Ambiguous JSON"),
                    "{route} {body}: {v}"
                );
            }
        }
    }
    assert!(
        up.requests()
            .iter()
            .all(|r| !r.text().contains("forbidden")),
        "the forbidden model never reached the upstream"
    );
    // Unambiguous nested case variants (tool schemas) still pass.
    let ok = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters":
        {"type": "object", "properties": {"id": {"type": "string"}, "ID": {"type": "string"}}}}}]});
    assert_eq!(gw.post(CHAT, Some(&restricted), ok).await.status(), 200);
    alive(&gw).await;
}

/// A body of tiny objects costs far more parsed than as text: refused before parsing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_json_values_is_413() {
    let (up, gw, admin) = setup_with("max-json-values = 1000").await;
    let items: Vec<Value> = (0..2000).map(|i| json!({"a": i})).collect();
    for route in ROUTES {
        let body = json!({"model": MODEL, "messages": [], "prompt": "x", "x": items});
        let v = clear_error(gw.post(route, Some(&admin), body).await, 413).await;
        assert!(
            v["detail"].as_str().unwrap().contains("max-json-values"),
            "{v}"
        );
    }
    assert_eq!(up.request_count(), up.requests_to("/api/tags").len());
    alive(&gw).await;
}

/// Placeholders inside user text are never expanded again: a 36 KB text item of
/// `[context]` used to become a 144 MB upstream body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_placeholders_in_user_text_stay_literal() {
    let (up, gw, admin) = setup().await;
    // A window that holds the bomb, so the context budget lets it through to be checked.
    up.set_show(MODEL, json!({}), "num_ctx 131072");
    let bomb = "[context]{{CONTEXT}}[query]{{QUERY}}".repeat(1000);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": bomb}],
        "files": [{"type": "text", "content": bomb}]});
    let r = gw.post(CHAT, Some(&admin), body).await;
    assert_eq!(r.status(), 200);
    let sent = up.requests_to("/v1/chat/completions").pop().unwrap();
    assert!(
        sent.text().len() < 8 * bomb.len(),
        "upstream body {} bytes for {} bytes of user text",
        sent.text().len(),
        bomb.len()
    );
    alive(&gw).await;
}

/// Repeating one item thousands of times: de-duplicated, so the document is injected once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_items_are_injected_once() {
    let (up, gw, admin) = setup().await;
    let f = upload_text(
        &gw,
        &admin,
        "doc.txt",
        "The unique marker sentence lives here.",
    )
    .await;
    let id = f["id"].as_str().unwrap();
    let item = json!({"type": "file", "id": id, "context": "full"});
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "q"}],
        "files": vec![item; 5000]});
    let r = gw.post(CHAT, Some(&admin), body).await;
    assert_eq!(r.status(), 200);
    let sent = up.requests_to("/v1/chat/completions").pop().unwrap().text();
    assert_eq!(sent.matches("unique marker sentence").count(), 1, "{sent}");
    alive(&gw).await;
}

/// More distinct items than `rag.max-items`: 400 naming the limit, nothing forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_distinct_items_is_400() {
    let (up, gw, admin) = setup_with("[rag]\nmax-items = 4").await;
    let items: Vec<Value> = (0..5)
        .map(|i| json!({"type": "text", "content": format!("text {i}")}))
        .collect();
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "q"}], "files": items});
    let v = clear_error(gw.post(CHAT, Some(&admin), body).await, 400).await;
    assert!(
        v["detail"].as_str().unwrap().contains("rag.max-items"),
        "{v}"
    );
    assert!(up.requests_to("/v1/chat/completions").is_empty());
    alive(&gw).await;
}

/// Context beyond `rag.max-context-kb` (full documents, text items, or a template multiplied
/// over many text parts): 413 naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_budget_is_enforced() {
    let (up, gw, admin) = setup_with("[rag]\nmax-context-kb = 16").await;
    let big = "word ".repeat(5000);
    let f = upload_text(&gw, &admin, "big.txt", &big).await;
    let id = f["id"].as_str().unwrap();
    let user = |content: Value| json!({"role": "user", "content": content});
    let cases = [
        json!([{"type": "file", "id": id, "context": "full"}]),
        json!([{"type": "text", "content": big}]),
        json!([{"type": "text", "content": "a".repeat(9000)}, {"type": "text", "content": "b".repeat(9000)}]),
    ];
    for files in cases {
        let body = json!({"model": MODEL, "messages": [user(json!("q"))], "files": files});
        let v = clear_error(gw.post(CHAT, Some(&admin), body).await, 413).await;
        assert!(
            v["detail"].as_str().unwrap().contains("rag.max-context-kb"),
            "{v}"
        );
    }
    // A small context prepended to 100,000 empty text parts would add gigabytes.
    let parts: Vec<Value> = (0..100_000)
        .map(|_| json!({"type": "text", "text": ""}))
        .collect();
    let body = json!({"model": MODEL, "messages": [user(json!(parts))],
        "files": [{"type": "text", "content": "short context ".repeat(100)}]});
    let mut parts_body = body.clone();
    parts_body["messages"][0]["content"][0]["text"] = json!("question");
    clear_error(gw.post(CHAT, Some(&admin), parts_body).await, 413).await;
    assert!(up.requests_to("/v1/chat/completions").is_empty());
    // Within the budget it works.
    let body = json!({"model": MODEL, "messages": [user(json!("q"))],
        "files": [{"type": "text", "content": "fits"}]});
    assert_eq!(gw.post(CHAT, Some(&admin), body).await.status(), 200);
    alive(&gw).await;
}

/// Model output is untrusted: query generation whose reply has a `}` before its `{` (the
/// fake answers "Hello from <model>", so the model name shapes it) must not panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_model_output_in_query_generation() {
    let models = ["x}{y", "}{", "é}{é", "{\"queries\": 5}"];
    let up = FakeUpstream::openai(&models).await;
    let gw = Setup::new()
        .openai(&up.url)
        .env("ENABLE_RETRIEVAL_QUERY_GENERATION", "true")
        .start()
        .await;
    let admin = gw.admin().await;
    for model in models {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "question"}],
            "files": [{"type": "text", "content": "context text"}]});
        let r = gw.post(CHAT, Some(&admin), body).await;
        assert_eq!(r.status(), 200, "{model}");
    }
    assert!(up.requests_to("/chat/completions").len() >= 2 * models.len());
    alive(&gw).await;
}
