//! `/ollama/*`: access levels, streaming passthrough, credentials, routing across several
//! upstreams, `prefix-id`, admin routes, timeouts, client disconnects and bad input.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{FakeUpstream, SLOW_PAUSE, blackhole, dead_url, http_client};
use common::gateway::{Gateway, Setup, assert_error};
use common::raw::read_answer;
use reqwest::{Method, Response};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

fn content_type(r: &Response) -> String {
    r.headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Status, content type and body of a request sent straight to a fake upstream.
async fn direct(
    up: &FakeUpstream,
    method: Method,
    path: &str,
    body: &Value,
) -> (u16, String, Bytes) {
    let r = http_client()
        .request(method, format!("{}{path}", up.url))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = content_type(&r);
    (status, ct, r.bytes().await.unwrap())
}

/// Status, content type and body of a gateway request.
async fn via(
    gw: &Gateway,
    method: Method,
    path: &str,
    token: &str,
    body: &Value,
) -> (u16, String, Bytes) {
    let r = gw
        .req(method, path, Some(token))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = content_type(&r);
    (status, ct, r.bytes().await.unwrap())
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Parses an NDJSON body into its lines.
fn ndjson(body: &[u8]) -> Vec<Value> {
    std::str::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l:?}: {e}")))
        .collect()
}

/// Model names of a `{"models":[...]}` list, with their `urls`.
fn names_and_urls(v: &Value) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = v["models"]
        .as_array()
        .unwrap_or_else(|| panic!("no models in {v}"))
        .iter()
        .map(|m| (m["model"].as_str().unwrap().to_string(), m["urls"].clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A streamed response, with when its first complete line arrived and when it ended
/// (both measured from `t0`, taken before the request was sent).
struct Timed {
    status: u16,
    content_type: String,
    body: Vec<u8>,
    first_line: Duration,
    total: Duration,
}

async fn timed(req: reqwest::RequestBuilder) -> Timed {
    let t0 = Instant::now();
    let mut r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let content_type = content_type(&r);
    let mut body = Vec::new();
    let mut first_line = None;
    while let Some(c) = r.chunk().await.unwrap() {
        body.extend_from_slice(&c);
        if first_line.is_none() && body.contains(&b'\n') {
            first_line = Some(t0.elapsed());
        }
    }
    Timed {
        status,
        content_type,
        body,
        first_line: first_line.expect("at least one line"),
        total: t0.elapsed(),
    }
}

/// POSTs with a client-side bound, so a gateway that never answers fails the test
/// instead of hanging it.
async fn post_bounded(gw: &Gateway, path: &str, token: &str, body: Value) -> Response {
    let bound = Duration::from_secs(10);
    match gw
        .req(Method::POST, path, Some(token))
        .json(&body)
        .timeout(bound)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) if e.is_timeout() => panic!("POST {path}: no answer within {bound:?}"),
        Err(e) => panic!("POST {path}: {e}"),
    }
}

fn toml_upstream(url: &str, extra: &str) -> String {
    format!("[[ollama]]\nurl = {url:?}\n{extra}")
}

// ---------------------------------------------------------------------------
// 1. Access levels of every /ollama route
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Public,
    Verified,
    Admin,
}

struct Row {
    method: Method,
    path: &'static str,
    level: Level,
    body: Option<Value>,
    /// Status when access is granted (404 rows: the fake has no such endpoint and the
    /// upstream's 404 passes through).
    ok: u16,
}

fn rows() -> Vec<Row> {
    use Level::*;
    let row =
        |method: Method, path: &'static str, level: Level, body: Option<Value>, ok: u16| Row {
            method,
            path,
            level,
            body,
            ok,
        };
    let m = "m:latest";
    let copy = json!({"source": m, "destination": "d:latest"});
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let mut rows = vec![
        row(Method::GET, "/ollama/", Public, None, 200),
        row(Method::HEAD, "/ollama/", Public, None, 200),
        row(Method::GET, "/ollama/api/version", Public, None, 200),
        row(Method::GET, "/ollama/api/version/0", Public, None, 200),
        row(Method::GET, "/ollama/api/tags", Verified, None, 200),
        row(Method::GET, "/ollama/api/tags/0", Verified, None, 200),
        row(Method::GET, "/ollama/api/ps", Admin, None, 200),
        row(
            Method::POST,
            "/ollama/api/unload",
            Admin,
            Some(json!({"model": m})),
            200,
        ),
        row(
            Method::POST,
            "/ollama/api/pull",
            Admin,
            Some(json!({"model": "pulled:latest"})),
            200,
        ),
        row(
            Method::POST,
            "/ollama/api/pull/0",
            Admin,
            Some(json!({"model": "pulled:latest"})),
            200,
        ),
        row(
            Method::DELETE,
            "/ollama/api/push",
            Admin,
            Some(json!({"model": m})),
            200,
        ),
        row(
            Method::DELETE,
            "/ollama/api/push/0",
            Admin,
            Some(json!({"model": m})),
            200,
        ),
        row(
            Method::POST,
            "/ollama/api/create",
            Admin,
            Some(json!({"model": "created:latest"})),
            200,
        ),
        row(
            Method::POST,
            "/ollama/api/create/0",
            Admin,
            Some(json!({"model": "created:latest"})),
            200,
        ),
        // Copy makes d:latest, delete removes it again, with and without url_idx.
        row(
            Method::POST,
            "/ollama/api/copy",
            Admin,
            Some(copy.clone()),
            200,
        ),
        row(
            Method::DELETE,
            "/ollama/api/delete",
            Admin,
            Some(json!({"model": "d:latest"})),
            200,
        ),
        row(Method::POST, "/ollama/api/copy/0", Admin, Some(copy), 200),
        row(
            Method::DELETE,
            "/ollama/api/delete/0",
            Admin,
            Some(json!({"model": "d:latest"})),
            200,
        ),
        row(
            Method::POST,
            "/ollama/api/show",
            Verified,
            Some(json!({"model": m})),
            200,
        ),
        row(Method::GET, "/ollama/v1/models", Verified, None, 200),
        row(Method::GET, "/ollama/v1/models/0", Verified, None, 200),
    ];
    let model_routes: [(&'static str, &'static str, Value, u16); 8] = [
        (
            "/ollama/api/embed",
            "/ollama/api/embed/0",
            json!({"model": m, "input": "hi"}),
            200,
        ),
        (
            "/ollama/api/embeddings",
            "/ollama/api/embeddings/0",
            json!({"model": m, "prompt": "hi"}),
            200,
        ),
        (
            "/ollama/api/generate",
            "/ollama/api/generate/0",
            json!({"model": m, "prompt": "hi"}),
            200,
        ),
        (
            "/ollama/api/chat",
            "/ollama/api/chat/0",
            json!({"model": m, "messages": msgs}),
            200,
        ),
        (
            "/ollama/v1/completions",
            "/ollama/v1/completions/0",
            json!({"model": m, "prompt": "hi"}),
            200,
        ),
        (
            "/ollama/v1/chat/completions",
            "/ollama/v1/chat/completions/0",
            json!({"model": m, "messages": msgs}),
            200,
        ),
        (
            "/ollama/v1/messages",
            "/ollama/v1/messages/0",
            json!({"model": m, "max_tokens": 8, "messages": msgs}),
            404,
        ),
        (
            "/ollama/v1/responses",
            "/ollama/v1/responses/0",
            json!({"model": m, "input": "hi"}),
            404,
        ),
    ];
    for (path, idx_path, body, ok) in model_routes {
        rows.push(row(Method::POST, path, Verified, Some(body.clone()), ok));
        rows.push(row(Method::POST, idx_path, Verified, Some(body), ok));
    }
    rows
}

/// Who calls, and the error expected where access is denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Anonymous,
    BadToken,
    Pending,
    User,
    UserKey,
    Admin,
}

impl Caller {
    fn allowed(self, level: Level) -> bool {
        match level {
            Level::Public => true,
            Level::Verified => matches!(self, Caller::User | Caller::UserKey | Caller::Admin),
            Level::Admin => self == Caller::Admin,
        }
    }
    /// Part of the 401's detail.
    fn denial(self) -> &'static str {
        match self {
            Caller::Anonymous => "Not authenticated",
            Caller::BadToken => "",
            _ => "You do not have permission to access this resource",
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ollama_route_enforces_its_access_level() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "user@example.com").await;
    let user_key = gw.key(&user).await;
    let pending_session = gw.signup("pending@example.com").await;
    assert_eq!(
        pending_session["role"], "pending",
        "second signup is pending"
    );
    let pending = pending_session["token"].as_str().unwrap().to_string();

    let rows = rows();
    // The table covers every /ollama route the gateway has (and so every new one too).
    for r in ragway::http::router::ROUTES
        .iter()
        .filter(|r| r.path.starts_with("/ollama"))
    {
        assert!(
            rows.iter()
                .any(|row| row.method == r.method && row.path == r.path),
            "route {} {} is missing from this test's table",
            r.method,
            r.path
        );
    }

    for caller in [
        Caller::Anonymous,
        Caller::BadToken,
        Caller::Pending,
        Caller::User,
        Caller::UserKey,
        Caller::Admin,
    ] {
        for row in &rows {
            let mut req = gw
                .client
                .request(row.method.clone(), format!("{}{}", gw.url, row.path));
            req = match caller {
                Caller::Anonymous => req,
                Caller::BadToken => req.bearer_auth("not-a-valid-token"),
                Caller::Pending => req.bearer_auth(&pending),
                Caller::User => req.bearer_auth(&user),
                Caller::UserKey => req.header("x-api-key", &user_key),
                Caller::Admin => req.bearer_auth(&admin),
            };
            if let Some(b) = &row.body {
                req = req.json(b);
            }
            let before = up.request_count();
            let r = req.send().await.unwrap();
            let what = format!("{caller:?} {} {}", row.method, row.path);
            if caller.allowed(row.level) {
                let status = r.status().as_u16();
                let body = r.text().await.unwrap();
                assert_eq!(status, row.ok, "{what}: {body}");
                if row.ok == 404 {
                    assert!(
                        body.contains("Invalid URL (POST /v1/"),
                        "{what}: upstream's 404 expected, got {body}"
                    );
                }
            } else {
                assert_eq!(r.status(), 401, "{what}");
                let v = assert_error(r, 401, caller.denial()).await;
                assert_eq!(
                    up.request_count(),
                    before,
                    "{what} reached the upstream: {v}"
                );
            }
        }
    }

    // The public status route answers {"status":true}; HEAD has no body.
    let r = gw.get("/ollama/", None).await;
    assert_eq!(content_type(&r), "application/json");
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": true}));
    let r = gw.req(Method::HEAD, "/ollama/", None).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// 2. Streaming is unbuffered and byte-exact
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_relayed_unbuffered_and_byte_exact() {
    let up = FakeUpstream::ollama(&["slow:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    // Build the catalog first so the timed requests measure streaming only.
    assert_eq!(
        gw.get("/api/models?refresh=true", Some(&admin))
            .await
            .status(),
        200
    );

    let nd_body = chat("slow:latest");
    let sse_body = json!({"model": "slow:latest", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let (nd, sse, nd_direct, sse_direct) = tokio::join!(
        timed(
            gw.req(Method::POST, "/ollama/api/chat", Some(&admin))
                .json(&nd_body)
        ),
        timed(
            gw.req(Method::POST, "/ollama/v1/chat/completions", Some(&admin))
                .json(&sse_body)
        ),
        direct(&up, Method::POST, "/api/chat", &nd_body),
        direct(&up, Method::POST, "/v1/chat/completions", &sse_body),
    );
    for (name, t, want_ct, reference) in [
        ("ndjson", &nd, "application/x-ndjson", &nd_direct),
        ("sse", &sse, "text/event-stream", &sse_direct),
    ] {
        assert_eq!(t.status, 200, "{name}");
        assert_eq!(t.content_type, want_ct, "{name}");
        assert_eq!(reference.0, 200);
        assert_eq!(
            String::from_utf8_lossy(&t.body),
            String::from_utf8_lossy(&reference.2),
            "{name}: body differs from the upstream's"
        );
        assert!(
            t.first_line < SLOW_PAUSE - Duration::from_millis(300),
            "{name}: first line after {:?}; the upstream sent it before a {SLOW_PAUSE:?} pause",
            t.first_line
        );
        assert!(t.total >= SLOW_PAUSE, "{name}: ended after {:?}", t.total);
    }
    let lines = ndjson(&nd.body);
    assert_eq!(lines[0]["message"]["content"], "Hello");
    assert_eq!(lines.last().unwrap()["done"], true);
}

/// A streamed answer of unknown length must be chunked: close-delimited framing gives up
/// keep-alive and makes a truncated stream indistinguishable from a complete one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_responses_are_chunked_and_keep_the_connection() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    for (path, body) in [
        ("/ollama/api/pull", json!({"model": "n:latest"})),
        ("/ollama/api/chat", chat("m:latest")),
        (
            "/ollama/api/generate",
            json!({"model": "m:latest", "prompt": "hi"}),
        ),
    ] {
        let r = gw.post(path, Some(&admin), body).await;
        assert_eq!(r.status(), 200, "{path}");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        };
        assert_eq!(
            header("transfer-encoding").as_deref(),
            Some("chunked"),
            "{path}"
        );
        assert_ne!(header("connection").as_deref(), Some("close"), "{path}");
        r.bytes().await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// 3. Statuses and bodies pass through
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_statuses_and_bodies_pass_through() {
    let up = FakeUpstream::ollama(&[
        "m:latest",
        "fail:latest",
        "midstream-error:latest",
        "gone:latest",
    ])
    .await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;

    // An upstream 500 keeps its status and its exact body.
    let body = chat("fail:latest");
    let (status, ct, bytes) = via(&gw, Method::POST, "/ollama/api/chat", &admin, &body).await;
    let reference = direct(&up, Method::POST, "/api/chat", &body).await;
    assert_eq!(status, 500);
    assert_eq!(reference.0, 500);
    assert_eq!(ct, "application/json");
    assert_eq!(bytes, reference.2);
    assert_eq!(
        bytes,
        Bytes::from_static(br#"{"error":"internal failure"}"#)
    );

    // An error line in the middle of a stream passes through; the status stays 200.
    let body = chat("midstream-error:latest");
    let (status, ct, bytes) = via(&gw, Method::POST, "/ollama/api/chat", &admin, &body).await;
    let reference = direct(&up, Method::POST, "/api/chat", &body).await;
    assert_eq!(status, 200);
    assert_eq!(ct, "application/x-ndjson");
    assert_eq!(bytes, reference.2);
    let lines = ndjson(&bytes);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1], json!({"error": "something went wrong"}));

    // stream:false: the upstream's JSON document, unchanged.
    for (path, body) in [
        (
            "/api/chat",
            json!({"model": "m:latest", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/api/generate",
            json!({"model": "m:latest", "stream": false, "prompt": "hi"}),
        ),
        (
            "/api/embed",
            json!({"model": "m:latest", "input": ["a", "b"]}),
        ),
        ("/api/show", json!({"model": "m:latest"})),
    ] {
        let (status, ct, bytes) =
            via(&gw, Method::POST, &format!("/ollama{path}"), &admin, &body).await;
        let reference = direct(&up, Method::POST, path, &body).await;
        assert_eq!((status, ct.as_str()), (200, "application/json"), "{path}");
        assert_eq!(bytes, reference.2, "{path}");
    }
    let (_, _, bytes) = via(
        &gw,
        Method::POST,
        "/ollama/api/chat",
        &admin,
        &json!({"model": "m:latest", "stream": false, "messages": []}),
    )
    .await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["message"]["content"], "Hello from m:latest");

    // A model the gateway lists but the upstream no longer has: the upstream's 404.
    up.set_models(&["m:latest", "fail:latest", "midstream-error:latest"]);
    let (status, _, bytes) = via(
        &gw,
        Method::POST,
        "/ollama/api/chat",
        &admin,
        &chat("gone:latest"),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        bytes,
        Bytes::from_static(br#"{"error":"model 'gone:latest' not found"}"#)
    );

    // A model nobody has: the gateway's 400, and the upstream is not asked.
    up.clear();
    let r = gw.post("/ollama/api/chat", Some(&admin), chat("x")).await;
    assert_error(r, 400, "Model 'x' was not found").await;
    assert!(up.requests_to("/api/chat").is_empty());
}

// ---------------------------------------------------------------------------
// 4. Credentials
// ---------------------------------------------------------------------------

const CLIENT_HEADERS: [&str; 5] = [
    "cookie",
    "x-api-key",
    "x-ragway-key",
    "proxy-authorization",
    "x-csrf-token",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_never_reach_the_upstream_and_the_configured_key_does() {
    // Upstream 0 demands the configured key (the fake answers 401 otherwise); upstream 1
    // has no key configured.
    let keyed = FakeUpstream::ollama(&["m:latest"])
        .await
        .with_api_key("upstream-secret");
    let open = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .toml("[auth]\napi-key-header = \"x-ragway-key\"")
        .toml(&toml_upstream(&keyed.url, "key = \"upstream-secret\""))
        .toml(&toml_upstream(&open.url, ""))
        .start()
        .await;
    let admin = gw.admin().await;
    let key = gw.key(&admin).await;
    let csrf = gw.app().auth.csrf.token(&admin);

    // Every way a client can authenticate, plus credential-looking extras.
    let callers: Vec<Box<dyn Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder>> = vec![
        Box::new(|r| {
            r.bearer_auth(&admin)
                .header("cookie", "token=abc; theme=dark")
                .header("x-api-key", "sk-client-extra")
                .header("proxy-authorization", "Basic dXNlcjpwdw==")
        }),
        // The web page's way: the session cookie plus its CSRF token.
        Box::new(|r| {
            r.header("cookie", format!("theme=dark; token={admin}"))
                .header("x-csrf-token", &csrf)
        }),
        Box::new(|r| r.header("x-ragway-key", &key)),
        Box::new(|r| r.bearer_auth(&key)),
    ];
    let calls: [(Method, &str, Value); 8] = [
        (Method::POST, "/ollama/api/chat", chat("m:latest")),
        (Method::POST, "/ollama/api/chat/1", chat("m:latest")),
        (
            Method::POST,
            "/ollama/api/pull",
            json!({"model": "p:latest"}),
        ),
        (
            Method::POST,
            "/ollama/api/pull/1",
            json!({"model": "p:latest"}),
        ),
        (
            Method::POST,
            "/ollama/api/copy/0",
            json!({"source": "m:latest", "destination": "c:latest"}),
        ),
        (
            Method::POST,
            "/ollama/api/copy/1",
            json!({"source": "m:latest", "destination": "c:latest"}),
        ),
        (
            Method::POST,
            "/ollama/api/unload",
            json!({"model": "m:latest"}),
        ),
        (Method::GET, "/ollama/api/version/1", Value::Null),
    ];
    for (i, caller) in callers.iter().enumerate() {
        for (method, path, body) in &calls {
            let mut req = caller(
                gw.client
                    .request(method.clone(), format!("{}{path}", gw.url)),
            );
            if !body.is_null() {
                req = req.json(body);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            assert_eq!(status, 200, "caller {i} {method} {path}: {text}");
        }
        for (method, path) in [
            (Method::GET, "/ollama/api/ps"),
            (Method::GET, "/ollama/api/version/0"),
        ] {
            let r = caller(
                gw.client
                    .request(method.clone(), format!("{}{path}", gw.url)),
            )
            .send()
            .await
            .unwrap();
            assert_eq!(r.status(), 200, "caller {i} {method} {path}");
        }
    }

    let keyed_reqs = keyed.requests();
    let open_reqs = open.requests();
    for p in [
        "/api/chat",
        "/api/pull",
        "/api/copy",
        "/api/generate",
        "/api/tags",
        "/api/ps",
        "/api/version",
    ] {
        assert!(
            keyed_reqs.iter().any(|r| r.path == p),
            "upstream 0 never got {p}"
        );
        assert!(
            open_reqs.iter().any(|r| r.path == p),
            "upstream 1 never got {p}"
        );
    }
    for r in &keyed_reqs {
        assert_eq!(
            r.header("authorization"),
            Some("Bearer upstream-secret"),
            "{} {} to the keyed upstream",
            r.method,
            r.path
        );
    }
    for r in &open_reqs {
        assert_eq!(
            r.header("authorization"),
            None,
            "{} {} to the keyless upstream",
            r.method,
            r.path
        );
    }
    for r in keyed_reqs.iter().chain(&open_reqs) {
        for h in CLIENT_HEADERS {
            assert_eq!(
                r.header(h),
                None,
                "{h} forwarded on {} {}",
                r.method,
                r.path
            );
        }
        let all = format!("{:?}", r.headers);
        assert!(
            !all.contains(&admin),
            "JWT forwarded on {} {}",
            r.method,
            r.path
        );
        assert!(
            !all.contains(&key),
            "API key forwarded on {} {}",
            r.method,
            r.path
        );
        assert!(
            !all.contains("sk-client-extra"),
            "x-api-key forwarded on {} {}",
            r.method,
            r.path
        );
    }
}

// ---------------------------------------------------------------------------
// 5. Several upstreams
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_routed_to_the_upstreams_hosting_them() {
    let a = FakeUpstream::ollama(&["a:latest", "both:latest"]).await;
    let b = FakeUpstream::ollama(&["b:latest", "both:latest"]).await;
    let gw = Setup::new().ollama(&a.url).ollama(&b.url).start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "user@example.com").await;

    // Only on B → B.
    for _ in 0..3 {
        let (status, _, body) = via(
            &gw,
            Method::POST,
            "/ollama/api/chat",
            &user,
            &chat("b:latest"),
        )
        .await;
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).contains("\" b:latest\""));
    }
    assert_eq!(b.requests_to("/api/chat").len(), 3);
    assert_eq!(a.requests_to("/api/chat").len(), 0);

    // On both → spread over both.
    a.clear();
    b.clear();
    for _ in 0..8 {
        let (status, _, _) = via(
            &gw,
            Method::POST,
            "/ollama/api/chat",
            &user,
            &chat("both:latest"),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (na, nb) = (
        a.requests_to("/api/chat").len(),
        b.requests_to("/api/chat").len(),
    );
    assert_eq!(na + nb, 8);
    assert!(na > 0 && nb > 0, "not spread: {na} to A, {nb} to B");

    // url_idx picks the upstream.
    a.clear();
    b.clear();
    for _ in 0..3 {
        let (status, _, _) = via(
            &gw,
            Method::POST,
            "/ollama/api/chat/1",
            &user,
            &chat("both:latest"),
        )
        .await;
        assert_eq!(status, 200);
        let (status, _, _) = via(
            &gw,
            Method::POST,
            "/ollama/api/generate/0",
            &user,
            &json!({"model": "both:latest", "prompt": "x"}),
        )
        .await;
        assert_eq!(status, 200);
    }
    assert_eq!(b.requests_to("/api/chat").len(), 3);
    assert_eq!(a.requests_to("/api/chat").len(), 0);
    assert_eq!(a.requests_to("/api/generate").len(), 3);
    assert_eq!(b.requests_to("/api/generate").len(), 0);

    // A user may not point a model at an upstream that does not host it.
    a.clear();
    let r = gw
        .post("/ollama/api/chat/0", Some(&user), chat("b:latest"))
        .await;
    assert_error(r, 403, "").await;
    let r = gw
        .post("/ollama/api/chat/7", Some(&user), chat("b:latest"))
        .await;
    assert_error(r, 403, "").await;
    assert!(a.requests().is_empty());
    // An admin may; upstream 0 then answers for itself (it has no b:latest).
    let (status, _, body) = via(
        &gw,
        Method::POST,
        "/ollama/api/chat/0",
        &admin,
        &chat("b:latest"),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        Bytes::from_static(br#"{"error":"model 'b:latest' not found"}"#)
    );
    assert_eq!(a.requests_to("/api/chat").len(), 1);
    // A connection index that does not exist.
    let r = gw
        .post("/ollama/api/chat/7", Some(&admin), chat("b:latest"))
        .await;
    assert_error(r, 400, "No Ollama connection with index 7").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_over_when_an_upstream_goes_away() {
    let a = FakeUpstream::ollama(&["m:latest"]).await;
    let b = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .ollama(&a.url)
        .ollama(&b.url)
        .toml("[models]\ncache-ttl = \"1h\"")
        .start()
        .await;
    let admin = gw.admin().await;
    let models: Value = gw
        .get("/api/models?refresh=true", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    let m = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "m:latest")
        .unwrap_or_else(|| panic!("m:latest listed: {models}"));
    assert_eq!(m["urls"], json!([0, 1]));

    // Warm pooled connections to both, then take B away.
    for _ in 0..4 {
        let (status, _, _) = via(
            &gw,
            Method::POST,
            "/ollama/api/chat",
            &admin,
            &chat("m:latest"),
        )
        .await;
        assert_eq!(status, 200);
    }
    assert!(
        !b.requests_to("/api/chat").is_empty(),
        "B served nothing before it went away"
    );
    drop(b);
    a.clear();
    for i in 0..8 {
        let (status, ct, body) = via(
            &gw,
            Method::POST,
            "/ollama/api/chat",
            &admin,
            &chat("m:latest"),
        )
        .await;
        assert_eq!(
            status,
            200,
            "request {i} after B went away: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(ct, "application/x-ndjson");
        assert_eq!(ndjson(&body).last().unwrap()["done"], true);
    }
    assert_eq!(a.requests_to("/api/chat").len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_live_upstream_without_pooled_connections() {
    let a = FakeUpstream::ollama(&["m:latest"]).await;
    let b = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .ollama(&a.url)
        .ollama(&b.url)
        .toml("[models]\ncache-ttl = \"1h\"")
        .start()
        .await;
    let admin = gw.admin().await;
    assert_eq!(
        gw.get("/api/models?refresh=true", Some(&admin))
            .await
            .status(),
        200
    );
    let dead = a.addr;
    drop(a);
    // The fake's accept loop ends asynchronously: until its port refuses, a request could
    // still be accepted there and cut, which is not the failover this test is about.
    wait_until(
        "the first upstream's port to close",
        Duration::from_secs(10),
        || std::net::TcpStream::connect(dead).is_err(),
    )
    .await;
    for i in 0..6 {
        let (status, _, body) = via(
            &gw,
            Method::POST,
            "/ollama/api/chat",
            &admin,
            &chat("m:latest"),
        )
        .await;
        assert_eq!(
            status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(b.requests_to("/api/chat").len(), 6);
}

/// `[auth] model-access` and model-scoped API keys limit what a caller sees and uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_access_limits_lists_and_use() {
    let a = FakeUpstream::ollama(&["a:latest", "both:latest"]).await;
    let b = FakeUpstream::ollama(&["b:latest", "both:latest"]).await;
    let gw = Setup::new()
        .ollama(&a.url)
        .ollama(&b.url)
        .toml("[auth.model-access]\n\"limited@example.com\" = [\"a:latest\", \"both:latest\"]")
        .start()
        .await;
    let admin = gw.admin().await;
    let limited = gw.user(&admin, "limited@example.com").await;

    let tags: Value = gw
        .get("/ollama/api/tags", Some(&limited))
        .await
        .json()
        .await
        .unwrap();
    let names: Vec<String> = names_and_urls(&tags).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["a:latest", "both:latest"]);
    let v1: Value = gw
        .get("/ollama/v1/models", Some(&limited))
        .await
        .json()
        .await
        .unwrap();
    let mut ids: Vec<&str> = v1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["a:latest", "both:latest"]);
    // The admin is not limited.
    let tags: Value = gw
        .get("/ollama/api/tags", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(names_and_urls(&tags).len(), 3);

    a.clear();
    b.clear();
    for path in [
        "/ollama/api/chat",
        "/ollama/api/chat/1",
        "/ollama/v1/chat/completions",
    ] {
        let r = gw.post(path, Some(&limited), chat("b:latest")).await;
        assert_error(r, 403, "Model not found").await;
    }
    let r = gw
        .post(
            "/ollama/api/show",
            Some(&limited),
            json!({"model": "b:latest"}),
        )
        .await;
    assert_error(r, 403, "Model not found").await;
    assert_eq!(
        a.request_count() + b.request_count(),
        0,
        "denied requests reached an upstream"
    );
    let (status, _, _) = via(
        &gw,
        Method::POST,
        "/ollama/api/chat",
        &limited,
        &chat("a:latest"),
    )
    .await;
    assert_eq!(status, 200);

    // A key scoped to one model narrows its owner's access further.
    let r = gw
        .post(
            "/api/v1/auths/api_key",
            Some(&limited),
            json!({"models": ["both:latest"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let key = r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let tags: Value = gw
        .get("/ollama/api/tags", Some(&key))
        .await
        .json()
        .await
        .unwrap();
    let names: Vec<String> = names_and_urls(&tags).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["both:latest"]);
    let r = gw
        .post("/ollama/api/chat", Some(&key), chat("a:latest"))
        .await;
    assert_error(r, 403, "Model not found").await;
    let (status, _, _) = via(
        &gw,
        Method::POST,
        "/ollama/api/chat",
        &key,
        &chat("both:latest"),
    )
    .await;
    assert_eq!(status, 200);
}

/// A body that needs nothing changed reaches the upstream as the client wrote it, whitespace,
/// key order and escapes included, on every model route; the model is read as Ollama reads
/// it (escapes decoded, `name` when there is no `model`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_bodies_without_changes_are_forwarded_byte_exact() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    for (path, upstream, raw) in [
        (
            "/ollama/api/chat",
            "/api/chat",
            "{ \"messages\" :[ {\"content\":\"hi  there\",\"role\":\"user\"} ],\n\t\"model\":   \"m:latest\" , \"stream\":false, \"options\":{\"model\":\"x\"} }\n",
        ),
        (
            "/ollama/api/embed",
            "/api/embed",
            r#"{"input":["a","b",  "c"],"model":"m\u003alatest"}"#,
        ),
        ("/ollama/api/show", "/api/show", r#"{"name" : "m:latest"}"#),
        (
            "/ollama/v1/chat/completions",
            "/v1/chat/completions",
            r#"{"model":"m:latest","messages":[{"role":"user","content":"hi"}],"stream":false}"#,
        ),
    ] {
        up.clear();
        let r = gw
            .req(Method::POST, path, Some(&admin))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.bytes().await.unwrap();
        let sent = up.requests_to(upstream);
        assert_eq!(sent.len(), 1, "{path}");
        assert_eq!(sent[0].text(), raw, "{path}: forwarded as sent");
    }
    // What the fast reading refuses still gets the full path's own answers.
    for (body, status) in [
        (r#"{"model":null}"#, 422),
        (r#"{"model":""}"#, 400),
        (r#"{"Model":"m:latest"}"#, 400),
        (r#"{"model":"nope:latest"}"#, 400),
    ] {
        let r = gw
            .req(Method::POST, "/ollama/api/embed", Some(&admin))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
    }
}

// ---------------------------------------------------------------------------
// 6. prefix-id
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_id_is_public_and_stripped_upstream() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .toml(&toml_upstream(&up.url, "prefix-id = \"p\""))
        .start()
        .await;
    let admin = gw.admin().await;

    let tags: Value = gw
        .get("/ollama/api/tags", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        names_and_urls(&tags),
        vec![("p.m:latest".to_string(), json!([0]))]
    );
    let v1: Value = gw
        .get("/ollama/v1/models", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v1["data"][0]["id"], "p.m:latest");

    let body = json!({"model": "p.m:latest", "messages": [{"role": "user", "content": "hi"}], "options": {"seed": 7}});
    let (status, ct, bytes) = via(&gw, Method::POST, "/ollama/api/chat", &admin, &body).await;
    assert_eq!((status, ct.as_str()), (200, "application/x-ndjson"));
    let sent = up.last_request().unwrap().json();
    assert_eq!(sent["model"], "m:latest");
    assert_eq!(
        sent["options"],
        json!({"seed": 7}),
        "the rest of the body is kept"
    );
    assert_eq!(sent["messages"], body["messages"]);
    // The answer is the upstream's, as it sent it.
    let reference = direct(&up, Method::POST, "/api/chat", &chat("m:latest")).await;
    assert_eq!(bytes, reference.2);

    // Legacy `name` field (show) and the OpenAI-compatible route are rewritten too.
    let (status, _, _) = via(
        &gw,
        Method::POST,
        "/ollama/api/show",
        &admin,
        &json!({"name": "p.m:latest"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(up.last_request().unwrap().json()["name"], "m:latest");
    let (status, _, _) = via(
        &gw,
        Method::POST,
        "/ollama/v1/chat/completions",
        &admin,
        &chat("p.m:latest"),
    )
    .await;
    assert_eq!(status, 200);
    let last = up.last_request().unwrap();
    assert_eq!(
        (last.path.as_str(), last.json()["model"].clone()),
        ("/v1/chat/completions", json!("m:latest"))
    );
    // Unload and copy resolve the public id.
    up.clear();
    let r = gw
        .post(
            "/ollama/api/unload",
            Some(&admin),
            json!({"model": "p.m:latest"}),
        )
        .await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": true}));
    assert_eq!(
        up.requests_to("/api/generate")[0].json()["model"],
        "m:latest"
    );
    let (status, _, bytes) = via(
        &gw,
        Method::POST,
        "/ollama/api/copy",
        &admin,
        &json!({"source": "p.m:latest", "destination": "n:latest"}),
    )
    .await;
    assert_eq!((status, bytes.as_ref()), (200, b"true".as_ref()));
    assert_eq!(up.requests_to("/api/copy")[0].json()["source"], "m:latest");

    // The unprefixed name is not a public id.
    up.clear();
    let r = gw
        .post("/ollama/api/chat", Some(&admin), chat("m:latest"))
        .await;
    assert_error(r, 400, "Model 'm:latest' was not found").await;
    assert!(up.requests_to("/api/chat").is_empty());
}

// ---------------------------------------------------------------------------
// 7. Admin routes and merged lists
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_delete_and_push_are_translated() {
    let a = FakeUpstream::ollama(&["m:latest"]).await;
    let b = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&a.url).ollama(&b.url).start().await;
    let admin = gw.admin().await;

    // Copy → POST /api/copy, answered `true`.
    let copy = json!({"source": "m:latest", "destination": "m2:latest"});
    let (status, ct, bytes) = via(&gw, Method::POST, "/ollama/api/copy", &admin, &copy).await;
    assert_eq!(
        (status, ct.as_str(), bytes.as_ref()),
        (200, "application/json", b"true".as_ref())
    );
    let reqs = a.requests_to("/api/copy");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].json(), copy);
    assert!(b.requests_to("/api/copy").is_empty());

    // Delete → DELETE /api/delete, answered `true`.
    let del = json!({"model": "m2:latest"});
    let (status, ct, bytes) = via(&gw, Method::DELETE, "/ollama/api/delete", &admin, &del).await;
    assert_eq!(
        (status, ct.as_str(), bytes.as_ref()),
        (200, "application/json", b"true".as_ref())
    );
    let reqs = a.requests_to("/api/delete");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "DELETE");
    assert_eq!(reqs[0].json(), del);
    assert_eq!(a.models(), vec!["m:latest".to_string()]);

    // With url_idx they go to that upstream.
    let (status, _, bytes) = via(&gw, Method::POST, "/ollama/api/copy/1", &admin, &copy).await;
    assert_eq!((status, bytes.as_ref()), (200, b"true".as_ref()));
    let (status, _, bytes) = via(&gw, Method::DELETE, "/ollama/api/delete/1", &admin, &del).await;
    assert_eq!((status, bytes.as_ref()), (200, b"true".as_ref()));
    assert_eq!(b.requests_to("/api/copy").len(), 1);
    assert_eq!(b.requests_to("/api/delete")[0].method, "DELETE");
    assert_eq!(a.requests_to("/api/copy").len(), 1);

    // An upstream failure is not turned into `true`.
    let (status, _, bytes) = via(&gw, Method::DELETE, "/ollama/api/delete/1", &admin, &del).await;
    assert_eq!(status, 404);
    assert_eq!(
        bytes,
        Bytes::from_static(br#"{"error":"model 'm2:latest' not found"}"#)
    );
    // Unknown model without url_idx: the gateway's 400.
    let r = gw
        .req(Method::DELETE, "/ollama/api/delete", Some(&admin))
        .json(&json!({"model": "nope:latest"}))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "Model 'nope:latest' was not found").await;

    // Push: DELETE here, POST upstream, streamed through.
    let push = json!({"model": "m:latest"});
    let (status, ct, bytes) = via(&gw, Method::DELETE, "/ollama/api/push", &admin, &push).await;
    let reference = direct(&a, Method::POST, "/api/push", &push).await;
    assert_eq!((status, ct.as_str()), (200, "application/x-ndjson"));
    assert_eq!(bytes, reference.2);
    let pushes = a.requests_to("/api/push");
    assert_eq!(pushes.len(), 2, "the gateway's push and the reference one");
    assert_eq!(pushes[0].method, "POST");
    assert_eq!(pushes[0].json(), push);
    let (status, _, _) = via(&gw, Method::DELETE, "/ollama/api/push/1", &admin, &push).await;
    assert_eq!(status, 200);
    assert_eq!(b.requests_to("/api/push")[0].method, "POST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_and_create_stream_to_upstream_zero_or_url_idx() {
    let a = FakeUpstream::ollama(&["m:latest"]).await;
    let b = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&a.url).ollama(&b.url).start().await;
    let admin = gw.admin().await;

    let pull = json!({"model": "new:latest"});
    let reference = direct(
        &FakeUpstream::ollama(&[]).await,
        Method::POST,
        "/api/pull",
        &pull,
    )
    .await;
    let (status, ct, bytes) = via(&gw, Method::POST, "/ollama/api/pull", &admin, &pull).await;
    assert_eq!((status, ct.as_str()), (200, "application/x-ndjson"));
    assert_eq!(bytes, reference.2);
    assert_eq!(ndjson(&bytes).last().unwrap()["status"], "success");
    assert_eq!(a.requests_to("/api/pull").len(), 1);
    assert_eq!(a.requests_to("/api/pull")[0].json(), pull);
    assert!(b.requests_to("/api/pull").is_empty());
    assert!(a.models().contains(&"new:latest".to_string()));

    let (status, _, bytes) = via(&gw, Method::POST, "/ollama/api/pull/1", &admin, &pull).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, reference.2);
    assert_eq!(b.requests_to("/api/pull").len(), 1);
    assert_eq!(a.requests_to("/api/pull").len(), 1);

    // The pulled model is usable right away (resolution refreshes on an unknown name).
    let (status, _, _) = via(
        &gw,
        Method::POST,
        "/ollama/api/chat",
        &admin,
        &chat("new:latest"),
    )
    .await;
    assert_eq!(status, 200);

    let create = json!({"model": "made:latest", "from": "m:latest"});
    let (status, ct, bytes) = via(&gw, Method::POST, "/ollama/api/create", &admin, &create).await;
    assert_eq!((status, ct.as_str()), (200, "application/x-ndjson"));
    assert_eq!(ndjson(&bytes).last().unwrap()["status"], "success");
    assert_eq!(a.requests_to("/api/create").len(), 1);
    let (status, _, _) = via(&gw, Method::POST, "/ollama/api/create/1", &admin, &create).await;
    assert_eq!(status, 200);
    assert_eq!(b.requests_to("/api/create").len(), 1);

    // stream:false is passed through as the upstream's single JSON document.
    let (status, ct, bytes) = via(
        &gw,
        Method::POST,
        "/ollama/api/pull",
        &admin,
        &json!({"model": "x:latest", "stream": false}),
    )
    .await;
    assert_eq!((status, ct.as_str()), (200, "application/json"));
    assert_eq!(bytes, Bytes::from_static(br#"{"status":"success"}"#));

    // A bad index is an error, not a panic.
    let r = gw.post("/ollama/api/pull/9", Some(&admin), pull).await;
    assert_error(r, 400, "No Ollama connection with index 9").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_ps_version_and_v1_models_are_merged() {
    let a = FakeUpstream::ollama(&["a:latest", "both:latest"]).await;
    let b = FakeUpstream::ollama(&["b:latest", "both:latest"]).await;
    a.set_version("0.10.0");
    b.set_version("0.9.3");
    let gw = Setup::new().ollama(&a.url).ollama(&b.url).start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "user@example.com").await;

    let r = gw.get("/ollama/api/tags", Some(&user)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(content_type(&r), "application/json");
    let tags: Value = r.json().await.unwrap();
    assert_eq!(
        names_and_urls(&tags),
        vec![
            ("a:latest".to_string(), json!([0])),
            ("b:latest".to_string(), json!([1])),
            ("both:latest".to_string(), json!([0, 1])),
        ]
    );
    let entry = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "a:latest")
        .unwrap();
    assert_eq!(entry["name"], "a:latest");
    assert_eq!(entry["digest"], common::fake::digest_for("a:latest"));
    assert!(entry["details"].is_object());

    let one: Value = gw
        .get("/ollama/api/tags/1", Some(&user))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        names_and_urls(&one),
        vec![
            ("b:latest".to_string(), json!([1])),
            ("both:latest".to_string(), json!([0, 1]))
        ]
    );
    let r = gw.get("/ollama/api/tags/5", Some(&user)).await;
    assert_error(r, 400, "No Ollama connection with index 5").await;

    // Lowest version (numerically: 0.9.3 < 0.10.0), or one upstream's.
    let v: Value = gw
        .get("/ollama/api/version", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"version": "0.9.3"}));
    let v: Value = gw
        .get("/ollama/api/version/0", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"version": "0.10.0"}));
    let v: Value = gw
        .get("/ollama/api/version/1", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"version": "0.9.3"}));

    let ps: Value = gw
        .get("/ollama/api/ps", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        names_and_urls(&ps),
        vec![
            ("a:latest".to_string(), json!([0])),
            ("b:latest".to_string(), json!([1])),
            ("both:latest".to_string(), json!([0, 1])),
        ]
    );
    assert!(ps["models"][0]["expires_at"].is_string());
    assert!(ps["models"][0]["size_vram"].is_number());

    let r = gw.get("/ollama/v1/models", Some(&user)).await;
    assert_eq!(content_type(&r), "application/json");
    let v1: Value = r.json().await.unwrap();
    assert_eq!(v1["object"], "list");
    let mut ids: Vec<&str> = v1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["a:latest", "b:latest", "both:latest"]);
    for m in v1["data"].as_array().unwrap() {
        let keys: Vec<&String> = m.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 4, "{m}");
        assert_eq!(m["object"], "model");
        assert_eq!(m["owned_by"], "openai");
        assert!(m["created"].as_u64().unwrap() > 1_700_000_000);
    }
    let one: Value = gw
        .get("/ollama/v1/models/0", Some(&user))
        .await
        .json()
        .await
        .unwrap();
    let mut ids: Vec<&str> = one["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["a:latest", "both:latest"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_reaches_every_hosting_upstream() {
    let a = FakeUpstream::ollama(&["a:latest", "both:latest"]).await;
    let b = FakeUpstream::ollama(&["b:latest", "both:latest"]).await;
    let gw = Setup::new().ollama(&a.url).ollama(&b.url).start().await;
    let admin = gw.admin().await;

    let r = gw
        .post(
            "/ollama/api/unload",
            Some(&admin),
            json!({"model": "both:latest"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(content_type(&r), "application/json");
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": true}));
    for up in [&a, &b] {
        let reqs = up.requests_to("/api/generate");
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].method, "POST");
        let sent = reqs[0].json();
        assert_eq!(sent["model"], "both:latest");
        assert_eq!(sent["keep_alive"], 0);
    }
    a.clear();
    b.clear();
    let r = gw
        .post(
            "/ollama/api/unload",
            Some(&admin),
            json!({"model": "b:latest"}),
        )
        .await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": true}));
    assert!(a.requests_to("/api/generate").is_empty());
    assert_eq!(b.requests_to("/api/generate").len(), 1);

    let r = gw
        .post("/ollama/api/unload", Some(&admin), json!({"model": "zzz"}))
        .await;
    assert_error(r, 400, "Model 'zzz' was not found").await;
    let r = gw.post("/ollama/api/unload", Some(&admin), json!({})).await;
    assert_error(r, 400, "model is required").await;
}

// ---------------------------------------------------------------------------
// 8. Timeouts and unreachable upstreams
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_times_out_with_504() {
    let up = FakeUpstream::ollama(&["stall:latest", "m:latest"]).await;
    let gw = Setup::new()
        .ollama(&up.url)
        .toml("[timeouts]\nread-idle = \"1s\"")
        .start()
        .await;
    let admin = gw.admin().await;
    assert_eq!(
        gw.get("/api/models?refresh=true", Some(&admin))
            .await
            .status(),
        200
    );
    let t0 = Instant::now();
    let r = post_bounded(&gw, "/ollama/api/chat", &admin, chat("stall:latest")).await;
    let took = t0.elapsed();
    assert_error(r, 504, "").await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "504 after {took:?}"
    );
    // The gateway still serves that upstream afterwards.
    let (status, _, _) = via(
        &gw,
        Method::POST,
        "/ollama/api/chat",
        &admin,
        &chat("m:latest"),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstreams_give_json_errors() {
    let gw = Setup::new().ollama(&dead_url()).start().await;
    let admin = gw.admin().await;
    // Refused on the proxy path (pull, one upstream's version). Each on its own connection:
    // whether the connection survives such an error is the subject of
    // `proxy_path_errors_keep_or_announce_closing_the_connection`.
    let r = http_client()
        .post(format!("{}/ollama/api/pull", gw.url))
        .bearer_auth(&admin)
        .json(&json!({"model": "m:latest"}))
        .send()
        .await
        .unwrap();
    assert_error(r, 502, "").await;
    let r = http_client()
        .get(format!("{}/ollama/api/version/0", gw.url))
        .send()
        .await
        .unwrap();
    assert_error(r, 502, "").await;
    // No upstream answers /api/version → 500 (Open WebUI's status).
    let r = gw.get("/ollama/api/version", None).await;
    assert_error(r, 500, "").await;
    let r = gw.get("/ollama/api/tags", Some(&admin)).await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"models": []}));
}

/// A gateway whose upstream 0 accepts connections and never answers, and whose upstream 1
/// is a live fake hosting `m:latest`.
async fn black_hole_gateway() -> (Gateway, String, FakeUpstream, tokio::task::JoinHandle<()>) {
    let (hole, hole_task) = blackhole().await;
    let live = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .ollama(&hole)
        .ollama(&live.url)
        .toml(
            "[models]\nlist-timeout = \"300ms\"\n[timeouts]\nconnect = \"1s\"\nread-idle = \"1s\"",
        )
        .start()
        .await;
    let admin = gw.admin().await;
    (gw, admin, live, hole_task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_upstream_times_out_on_the_proxy_path() {
    let (gw, admin, _live, hole_task) = black_hole_gateway().await;
    // Pull streams through pingora's proxy path to upstream 0.
    let t0 = Instant::now();
    let r = post_bounded(
        &gw,
        "/ollama/api/pull",
        &admin,
        json!({"model": "m:latest"}),
    )
    .await;
    let took = t0.elapsed();
    assert_error(r, 504, "").await;
    assert!(took < Duration::from_secs(5), "504 after {took:?}");
    hole_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_upstream_times_out_on_the_forward_path() {
    let (gw, admin, _live, hole_task) = black_hole_gateway().await;
    // An admin aims a chat at the black hole (the forward engine's path).
    let t0 = Instant::now();
    let r = post_bounded(&gw, "/ollama/api/chat/0", &admin, chat("m:latest")).await;
    let took = t0.elapsed();
    assert_error(r, 504, "").await;
    assert!(took < Duration::from_secs(5), "504 after {took:?}");
    // The live upstream is unaffected.
    let r = post_bounded(&gw, "/ollama/api/chat", &admin, chat("m:latest")).await;
    assert_eq!(r.status(), 200);
    hole_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_dying_mid_stream_does_not_end_the_response_cleanly() {
    let up = FakeUpstream::ollama(&["hang:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    let mut r = gw
        .post("/ollama/api/chat", Some(&admin), chat("hang:latest"))
        .await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("first chunk");
    assert!(first.ends_with(b"\n"));
    drop(up);
    // The client must see an error, not a clean end of a truncated answer.
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match r.chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the response ends within 5 s");
    assert!(rest.is_err(), "a truncated stream ended cleanly");
}

// ---------------------------------------------------------------------------
// 9. Client disconnects
// ---------------------------------------------------------------------------

/// Sets up a gateway whose model list is built and cached, so the only connections to
/// `up` that come and go are those of proxied requests. The registry's own keep-alive
/// connection (from the model-list fetch) stays open and is part of the returned baseline.
async fn quiet_gateway(up: &FakeUpstream) -> (Gateway, String, usize) {
    let gw = Setup::new()
        .ollama(&up.url)
        .toml("[models]\ncache-ttl = \"1h\"")
        .start()
        .await;
    let admin = gw.admin().await;
    assert_eq!(
        gw.get("/api/models?refresh=true", Some(&admin))
            .await
            .status(),
        200
    );
    let baseline = up.open_connections();
    (gw, admin, baseline)
}

/// Forwarded requests go out on the connection the previous one left idle (kept by the
/// gateway thread that used it), streamed or not. (That a connection the upstream closed
/// while idle is not reused: `proxy::idle`'s unit tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_reuse_idle_upstream_connections() {
    let up = FakeUpstream::ollama(&["llama3:latest"]).await;
    let (gw, admin, _) = quiet_gateway(&up).await;
    let before = up.accepted_connections();
    let client = http_client();
    for i in 0..20 {
        let mut body = chat("llama3:latest");
        body["stream"] = json!(i % 2 == 0);
        let r = client
            .post(format!("{}/ollama/api/chat", gw.url))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(!r.bytes().await.unwrap().is_empty());
    }
    // One connection per gateway thread at most (`threads = 2` in the test gateways).
    let opened = up.accepted_connections() - before;
    assert!(
        (1..=2).contains(&opened),
        "20 sequential requests opened {opened} upstream connections"
    );
}

/// A request passed through as it comes but without a body (`/ollama/api/version/{idx}`)
/// also goes out on idle upstream connections: only a client body that streams needs a
/// fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_pass_through_requests_reuse_idle_upstream_connections() {
    let up = FakeUpstream::ollama(&["llama3:latest"]).await;
    let (gw, _admin, _) = quiet_gateway(&up).await;
    let before = up.accepted_connections();
    let client = http_client();
    for _ in 0..20 {
        let r = client
            .get(format!("{}/ollama/api/version/0", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(v["version"].is_string(), "{v}");
    }
    let opened = up.accepted_connections() - before;
    assert!(
        (1..=2).contains(&opened),
        "20 sequential version requests opened {opened} upstream connections"
    );
}

/// A forwarded request's header and body reach the upstream as one TCP segment (as nginx
/// sends them), not a header segment the upstream wakes up for and then the body.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_reaches_the_upstream_in_one_segment() {
    let up = FakeUpstream::ollama(&["llama3:latest"]).await;
    let (gw, admin, _) = quiet_gateway(&up).await;
    let client = http_client();
    for _ in 0..8 {
        let r = client
            .post(format!("{}/api/chat/completions", gw.url))
            .bearer_auth(&admin)
            .json(&json!({"model": "llama3:latest", "stream": false,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let chats: Vec<_> = up
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .collect();
    assert_eq!(chats.len(), 8);
    // A connection's first request also counts the segments before it, so compare each
    // request with the one before it on the same connection.
    let mut compared = 0;
    for pair in chats.windows(2) {
        if pair[0].connection == pair[1].connection && pair[1].data_segments_in > 0 {
            assert_eq!(
                pair[1].data_segments_in - pair[0].data_segments_in,
                1,
                "a {}-byte body and its header came in more than one segment",
                pair[1].body.len()
            );
            compared += 1;
        }
    }
    assert!(
        compared >= 5,
        "only {compared} requests shared a connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_drops_the_upstream_request() {
    let up = FakeUpstream::ollama(&["hang:latest"]).await;
    let (gw, admin, baseline) = quiet_gateway(&up).await;

    let client = http_client();
    let mut r = client
        .post(format!("{}/ollama/api/chat", gw.url))
        .bearer_auth(&admin)
        .json(&chat("hang:latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("first chunk");
    assert_eq!(ndjson(&first)[0]["message"]["content"], "Hello");
    assert_eq!(
        up.open_connections(),
        baseline + 1,
        "one upstream connection for the chat"
    );
    drop(r);
    drop(client);
    wait_until(
        "the upstream connection to close",
        Duration::from_secs(5),
        || up.open_connections() == baseline,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_the_answer_drops_the_upstream_request() {
    let up = FakeUpstream::ollama(&["stall:latest"]).await;
    let (gw, admin, baseline) = quiet_gateway(&up).await;

    let client = http_client();
    let send = client
        .post(format!("{}/ollama/api/chat", gw.url))
        .bearer_auth(&admin)
        .json(&chat("stall:latest"))
        .send();
    let task = tokio::spawn(send);
    wait_until(
        "the upstream to get the chat",
        Duration::from_secs(5),
        || !up.requests_to("/api/chat").is_empty(),
    )
    .await;
    assert_eq!(up.open_connections(), baseline + 1);
    task.abort();
    let _ = task.await;
    drop(client);
    wait_until(
        "the upstream connection to close",
        Duration::from_secs(5),
        || up.open_connections() == baseline,
    )
    .await;
}

// ---------------------------------------------------------------------------
// 10. Bad input
// ---------------------------------------------------------------------------

/// POSTs `body` with `Transfer-Encoding: chunked` over a raw connection (reqwest here has no
/// streaming bodies) and returns the status and body of the answer. Write errors are
/// ignored: the gateway may answer and close before it has read everything.
async fn chunked_post(gw: &Gateway, path: &str, token: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::AsyncWriteExt;
    let addr = gw.url.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for c in body.chunks(64 * 1024) {
        let mut frame = format!("{:x}\r\n", c.len()).into_bytes();
        frame.extend_from_slice(c);
        frame.extend_from_slice(b"\r\n");
        if s.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let answer = read_answer(&mut s).await.expect("a full answer");
    (answer.status, answer.body)
}

/// After an error answer from the proxy path, the connection either is announced as closing
/// (`Connection: close`) or stays usable. Closing a connection that was announced as
/// keep-alive makes pooling clients fail their next request at random.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_path_errors_keep_or_announce_closing_the_connection() {
    use tokio::io::AsyncWriteExt;
    let gw = Setup::new().ollama(&dead_url()).start().await;
    let admin = gw.admin().await;
    let addr = gw.url.strip_prefix("http://").unwrap();
    let body = r#"{"model":"m:latest"}"#;
    for first in [
        format!("GET /ollama/api/version/0 HTTP/1.1\r\nhost: {addr}\r\n\r\n"),
        format!(
            "POST /ollama/api/pull HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {admin}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(first.as_bytes()).await.unwrap();
        let answer = read_answer(&mut s)
            .await
            .expect("an answer to the first request");
        let line = first.lines().next().unwrap();
        assert_eq!(answer.status, 502, "{line}: {}", answer.body);
        if answer.header("connection") == Some("close") {
            continue;
        }
        let second = format!("GET /ollama/ HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        let _ = s.write_all(second.as_bytes()).await;
        let again = read_answer(&mut s).await;
        assert!(
            again.as_ref().is_some_and(|a| a.status == 200),
            "after `{line}` the 502 said `connection: {}` but the connection was closed",
            answer.header("connection").unwrap_or("(none)")
        );
    }
}

/// Pull and create stream the client's body to the upstream in the client's own framing:
/// a chunked body arrives whole, and the connection then carries the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_pull_body_streams_through_and_keeps_the_connection() {
    use tokio::io::AsyncWriteExt;
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    let addr = gw.url.strip_prefix("http://").unwrap();
    let pull = json!({"model": "chunked:latest", "stream": false});
    let body = pull.to_string().into_bytes();
    let (a, b) = body.split_at(7);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /ollama/api/pull HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {admin}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for part in [a, b] {
        let mut frame = format!("{:x}\r\n", part.len()).into_bytes();
        frame.extend_from_slice(part);
        frame.extend_from_slice(b"\r\n");
        s.write_all(&frame).await.unwrap();
        // Two reads on the gateway's side, not one buffered body.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let answer = read_answer(&mut s).await.expect("an answer to the pull");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        serde_json::from_str::<Value>(&answer.body).unwrap()["status"],
        "success"
    );
    let seen = up.requests_to("/api/pull");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].json(), pull);
    assert!(up.models().contains(&"chunked:latest".to_string()));
    assert_ne!(
        answer.header("connection"),
        Some("close"),
        "{}",
        answer.head
    );

    // The same connection serves the next request.
    let create = json!({"model": "made:latest", "from": "m:latest", "stream": false}).to_string();
    let next = format!(
        "POST /ollama/api/create HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {admin}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{create}",
        create.len()
    );
    s.write_all(next.as_bytes()).await.unwrap();
    let answer = read_answer(&mut s).await.expect("an answer to the create");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(up.requests_to("/api/create").len(), 1);
    assert!(up.models().contains(&"made:latest".to_string()));
}
/// A 413 answered before the body was read: the unread body makes the connection unusable,
/// so the answer must say `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_announces_closing_the_connection() {
    use tokio::io::AsyncWriteExt;
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .ollama(&up.url)
        .toml("max-body-mb = 1")
        .start()
        .await;
    let admin = gw.admin().await;
    let addr = gw.url.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /ollama/api/chat HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {admin}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_answer(&mut s)
        .await
        .expect("an answer before the body");
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert_eq!(
        answer.header("connection"),
        Some("close"),
        "{}",
        answer.head
    );
    // The server goes on serving new connections.
    let (status, _, _) = via(
        &gw,
        Method::POST,
        "/ollama/api/chat",
        &admin,
        &chat("m:latest"),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_without_wedging_the_server() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .ollama(&up.url)
        .toml("max-body-mb = 1")
        .start()
        .await;
    let admin = gw.admin().await;
    let send_raw = |path: &str, body: Vec<u8>| {
        gw.req(Method::POST, path, Some(&admin))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    for path in [
        "/ollama/api/chat",
        "/ollama/api/generate",
        "/ollama/v1/chat/completions",
        "/ollama/api/unload",
        "/ollama/api/copy",
    ] {
        let r = send_raw(path, br#"{"model": "m:latest", "messages": ["#.to_vec())
            .await
            .unwrap();
        assert_error(r, 400, "Invalid JSON body").await;
        let r = send_raw(path, b"not json at all".to_vec()).await.unwrap();
        assert_error(r, 400, "Invalid JSON body").await;
    }
    for path in [
        "/ollama/api/chat",
        "/ollama/api/embed",
        "/ollama/v1/completions",
        "/ollama/api/show",
    ] {
        let r = gw.post(path, Some(&admin), json!({"messages": []})).await;
        assert_error(r, 400, "model is required").await;
        let r = gw.post(path, Some(&admin), json!({"model": ""})).await;
        assert_error(r, 400, "model is required").await;
    }
    let r = gw
        .post("/ollama/api/chat", Some(&admin), json!({"model": 5}))
        .await;
    assert_error(r, 422, "model must be a string").await;

    // Over the 1 MiB limit, announced by Content-Length...
    let big = format!(
        r#"{{"model":"m:latest","prompt":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    )
    .into_bytes();
    let r = send_raw("/ollama/api/generate", big.clone()).await.unwrap();
    assert_error(r, 413, "Request body too large").await;
    // ...or only discovered while reading a chunked body.
    let (status, body) = chunked_post(&gw, "/ollama/api/generate", &admin, &big).await;
    assert_eq!(status, 413, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("Request body too large"),
        "{v}"
    );
    assert!(
        up.requests_to("/api/generate").is_empty(),
        "nothing bad reached the upstream"
    );

    // The server still works, on new and on reused connections.
    for _ in 0..3 {
        let (status, ct, body) = via(
            &gw,
            Method::POST,
            "/ollama/api/chat",
            &admin,
            &chat("m:latest"),
        )
        .await;
        assert_eq!((status, ct.as_str()), (200, "application/x-ndjson"));
        assert_eq!(ndjson(&body).last().unwrap()["done"], true);
    }
    let fresh = http_client();
    let r = fresh
        .post(format!("{}/ollama/api/chat", gw.url))
        .bearer_auth(&admin)
        .json(&chat("m:latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
}
