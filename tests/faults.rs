//! Upstream faults on every forwarding path, clients leaving mid-stream, the headers that
//! must never reach an upstream, and the bounded cardinality of the metric labels.
//!
//! Forwarding paths: `/ollama/api/chat` and `/api/chat/completions` go through the forward
//! engine (ragway reads the body to route by model); `/ollama/api/pull` streams through
//! pingora's proxy phases. Faults come from `common::faulty`: before the first byte the
//! client must get a clear 502/504 JSON error; after it, the stream must end as incomplete
//! (never hang, never look whole); and the in-flight gauges must return to 0.

mod common;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use common::fake::{FakeUpstream, http_client};
use common::faulty::{Fault, FaultyUpstream, Framing, MODEL};
use common::gateway::{Gateway, Setup, assert_error};

/// The in-flight gauges are process-wide; under `cargo test` the tests of this binary share
/// a process, so they take turns (nextest runs each in its own process anyway).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A forwarding path of the gateway.
#[derive(Clone, Copy, Debug)]
enum Route {
    /// Forward engine, Ollama's NDJSON chat.
    OllamaChat,
    /// Forward engine, OpenAI-compatible chat.
    ChatCompletions,
    /// pingora's proxy phases (admin-only pull).
    Pull,
}

const ROUTES: [Route; 3] = [Route::OllamaChat, Route::ChatCompletions, Route::Pull];

impl Route {
    fn request(
        self,
        gw: &Gateway,
        token: &str,
        client: &reqwest::Client,
    ) -> reqwest::RequestBuilder {
        let (path, body) = match self {
            Route::OllamaChat => (
                "/ollama/api/chat",
                json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
            ),
            Route::ChatCompletions => (
                "/api/chat/completions",
                json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
            ),
            Route::Pull => ("/ollama/api/pull", json!({"model": MODEL})),
        };
        client
            .post(format!("{}{path}", gw.url))
            .bearer_auth(token)
            .json(&body)
            .timeout(Duration::from_secs(60))
    }
}

/// A gateway in front of `upstream` with short timeouts and the model list cached.
async fn gateway(upstream: &str) -> (Gateway, String) {
    gateway_idle(upstream, "1s").await
}

/// Like [`gateway`], with the given `read-idle` timeout.
async fn gateway_idle(upstream: &str, read_idle: &str) -> (Gateway, String) {
    let gw = Setup::new()
        .ollama(upstream)
        .toml(&format!(
            "[models]\ncache-ttl = \"1h\"\n[timeouts]\nconnect = \"2s\"\nread-idle = \"{read_idle}\""
        ))
        .start()
        .await;
    let admin = gw.admin().await;
    let r = gw.get("/api/models?refresh=true", Some(&admin)).await;
    assert_eq!(r.status(), 200);
    let models: Value = r.json().await.unwrap();
    assert!(
        models.to_string().contains(MODEL),
        "the model is listed: {models}"
    );
    (gw, admin)
}

/// Sum of every series of metric `name` in a Prometheus text answer.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn eventually<F: Fn() -> bool>(what: &str, within: Duration, f: F) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until no request is in flight, to the gateway or to any upstream.
async fn no_leak(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = gw.metrics().await;
        let http = metric_sum(&m, "ragway_http_requests_in_flight");
        let up = metric_sum(&m, "ragway_upstream_requests_in_flight");
        if http == 0.0 && up == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in flight after the request ended: http {http}, upstream {up}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the rest of a streamed body; `Ok` when it ended cleanly, `Err` when it was cut.
/// Panics if it neither ends nor fails within 30 s (a hang).
async fn drain_body(mut r: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut all = Vec::new();
        loop {
            match r.chunk().await {
                Ok(Some(c)) => all.extend_from_slice(&c),
                Ok(None) => return Ok(all),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the response ends (it must not hang)")
}

// ---------------------------------------------------------------------------
// Before the first byte: a clear JSON error
// ---------------------------------------------------------------------------

async fn error_before_first_byte(fault: Fault, status: u16) {
    for route in ROUTES {
        let up = FaultyUpstream::start(fault).await;
        let (gw, admin) = gateway(&up.url).await;
        let r = route
            .request(&gw, &admin, &http_client())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{route:?} {fault:?}");
        assert_error(r, status, "Upstream").await;
        no_leak(&gw).await;
        assert!(
            up.requests() >= 1,
            "{route:?}: the upstream got the request"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_give_502_on_every_path() {
    let _serial = SERIAL.lock().await;
    for route in ROUTES {
        let up = FaultyUpstream::start(Fault::Hang).await;
        let (gw, admin) = gateway(&up.url).await;
        up.refuse_from_now();
        // The listener closes asynchronously; wait until connecting fails.
        let addr = up.url.strip_prefix("http://").unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&addr).await.is_ok() {
            assert!(Instant::now() < deadline, "listener still open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = route
            .request(&gw, &admin, &http_client())
            .send()
            .await
            .unwrap();
        assert_error(r, 502, "Upstream").await;
        no_leak(&gw).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_gives_504_on_every_path() {
    let _serial = SERIAL.lock().await;
    error_before_first_byte(Fault::Hang, 504).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_status_line_gives_502_on_every_path() {
    let _serial = SERIAL.lock().await;
    error_before_first_byte(Fault::BadStatusLine, 502).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_an_answer_gives_502_on_every_path() {
    let _serial = SERIAL.lock().await;
    error_before_first_byte(Fault::Garbage, 502).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_framing_cannot_be_trusted_gives_502_on_every_path() {
    let _serial = SERIAL.lock().await;
    // Two lengths: which one frames the body is anyone's guess (RFC 9110 §8.6).
    error_before_first_byte(
        Fault::Head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 30\r\n\r\n"),
        502,
    )
    .await;
    error_before_first_byte(
        Fault::Head(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n"),
        502,
    )
    .await;
    // A folded header line would carry a line break into the client's answer.
    error_before_first_byte(
        Fault::Head(b"HTTP/1.1 200 OK\r\nX-A: a\r\n X-Injected: 1\r\nContent-Length: 0\r\n\r\n"),
        502,
    )
    .await;
    error_before_first_byte(Fault::HugeHead, 502).await;
}

// ---------------------------------------------------------------------------
// After the first byte: the stream ends as incomplete
// ---------------------------------------------------------------------------

async fn cut_after_first_byte(fault: Fault) {
    for route in ROUTES {
        let up = FaultyUpstream::start(fault).await;
        // Only a stall needs the idle timeout; for the others a long one proves the fault
        // itself, not a timeout, ends the stream.
        let idle = if matches!(fault, Fault::Stall(_)) {
            "1s"
        } else {
            "60s"
        };
        let (gw, admin) = gateway_idle(&up.url, idle).await;
        // The start of a `Content-Length` body (and with it the head) may be held back until
        // more of it arrives, so the client cannot tell the fake when it has it: the reset
        // comes right after the first bytes, and ragway may see it before or after them.
        let whole = matches!(fault, Fault::Reset(Framing::Length));
        if whole {
            up.proceed();
        }
        let mut r = route
            .request(&gw, &admin, &http_client())
            .send()
            .await
            .unwrap();
        if whole && r.status() == 502 {
            assert_error(r, 502, "Upstream").await;
            no_leak(&gw).await;
            continue;
        }
        assert_eq!(r.status(), 200, "{route:?} {fault:?}");
        // The head has reached the client: the fault now comes after the first byte.
        if !matches!(
            fault,
            Fault::Stall(Framing::Length) | Fault::Reset(Framing::Length)
        ) {
            let first = tokio::time::timeout(Duration::from_secs(30), r.chunk())
                .await
                .expect("the first line arrives")
                .expect("the first line arrives whole");
            assert!(first.is_some_and(|c| !c.is_empty()), "{route:?} {fault:?}");
        }
        up.proceed();
        let body = drain_body(r).await;
        assert!(
            body.is_err(),
            "{route:?} {fault:?}: a cut stream ended as if whole: {:?}",
            body.map(|b| String::from_utf8_lossy(&b).into_owned())
        );
        no_leak(&gw).await;
        if matches!(fault, Fault::Stall(_)) {
            // The idle timeout fired: ragway must have closed its upstream connection.
            eventually(
                "the stalled upstream connection to be closed",
                Duration::from_secs(20),
                || up.closed_by_peer() >= 1,
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stalling_mid_way_is_cut_after_the_idle_timeout() {
    let _serial = SERIAL.lock().await;
    cut_after_first_byte(Fault::Stall(Framing::Chunked)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_json_answer_stalling_mid_way_is_cut_after_the_idle_timeout() {
    let _serial = SERIAL.lock().await;
    cut_after_first_byte(Fault::Stall(Framing::Length)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_mid_way_ends_as_incomplete() {
    let _serial = SERIAL.lock().await;
    cut_after_first_byte(Fault::Reset(Framing::Chunked)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_json_answer_reset_mid_way_ends_as_incomplete() {
    let _serial = SERIAL.lock().await;
    cut_after_first_byte(Fault::Reset(Framing::Length)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunk_ends_the_stream_as_incomplete() {
    let _serial = SERIAL.lock().await;
    cut_after_first_byte(Fault::BadChunk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_longer_than_its_size_ends_the_stream_as_incomplete() {
    let _serial = SERIAL.lock().await;
    cut_after_first_byte(Fault::ChunkOverrun).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_json_answer_buffered_for_sources_is_a_502_not_unbounded_memory() {
    let _serial = SERIAL.lock().await;
    let up = FaultyUpstream::start(Fault::HugeJson { mib: 48 }).await;
    let (gw, admin) = gateway(&up.url).await;
    // `files` makes ragway add `sources` to a whole JSON answer, which it must buffer.
    let r = http_client()
        .post(format!("{}/api/chat/completions", gw.url))
        .bearer_auth(&admin)
        .json(&json!({
            "model": MODEL,
            "stream": false,
            "messages": [{"role": "user", "content": "hi"}],
            "files": [{"type": "text", "name": "notes", "content": "some context"}],
        }))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_error(r, 502, "too large").await;
    no_leak(&gw).await;
    eventually(
        "the oversized upstream answer's connection to be closed",
        Duration::from_secs(20),
        || up.closed_by_peer() >= 1,
    )
    .await;
}

// ---------------------------------------------------------------------------
// The client leaves: the upstream connection is closed
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_closes_the_upstream_connection_on_every_path() {
    let _serial = SERIAL.lock().await;
    for route in ROUTES {
        let up = FaultyUpstream::start(Fault::Endless {
            every: Duration::from_millis(100),
        })
        .await;
        let (gw, admin) = gateway(&up.url).await;
        let client = http_client();
        let mut r = route.request(&gw, &admin, &client).send().await.unwrap();
        assert_eq!(r.status(), 200, "{route:?}");
        let first = r.chunk().await.unwrap().expect("a first chunk");
        assert!(!first.is_empty());
        drop(r);
        drop(client);
        eventually(
            &format!("{route:?}: the upstream to see its connection closed"),
            Duration::from_secs(20),
            || up.closed_by_peer() >= 1,
        )
        .await;
        no_leak(&gw).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_the_answer_closes_the_upstream_connection_on_every_path() {
    let _serial = SERIAL.lock().await;
    for route in ROUTES {
        let up = FaultyUpstream::start(Fault::Hang).await;
        let gw = Setup::new()
            .ollama(&up.url)
            .toml("[models]\ncache-ttl = \"1h\"\n[timeouts]\nread-idle = \"60s\"")
            .start()
            .await;
        let admin = gw.admin().await;
        assert_eq!(
            gw.get("/api/models?refresh=true", Some(&admin))
                .await
                .status(),
            200
        );
        let client = http_client();
        let task = tokio::spawn(route.request(&gw, &admin, &client).send());
        eventually(
            &format!("{route:?}: the upstream to get the request"),
            Duration::from_secs(20),
            || up.requests() >= 1,
        )
        .await;
        task.abort();
        let _ = task.await;
        drop(client);
        eventually(
            &format!("{route:?}: the upstream to see its connection closed"),
            Duration::from_secs(20),
            || up.closed_by_peer() >= 1,
        )
        .await;
        no_leak(&gw).await;
    }
}

// ---------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------

/// Sends `POST path` over a raw connection with extra header lines.
async fn raw_post(gw: &Gateway, path: &str, token: &str, extra: &str, body: &Value) {
    use tokio::io::AsyncWriteExt;
    let addr = gw.url.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // Read the answer head so the request is complete before the connection closes.
    let _ = common::raw::read_answer(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_listed_and_provider_headers_never_reach_an_upstream() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    assert_eq!(
        gw.get("/api/models?refresh=true", Some(&admin))
            .await
            .status(),
        200
    );
    let extra = "connection: keep-alive, X-Hop-Secret, x-other-hop\r\n\
                 x-hop-secret: s3cret\r\n\
                 x-other-hop: 1\r\n\
                 openai-organization: org-victim\r\n\
                 openai-project: proj-victim\r\n\
                 api-key: azure-key\r\n\
                 x-goog-api-key: gemini-key\r\n\
                 ocp-apim-subscription-key: apim-key\r\n\
                 x-api-key: sk-client\r\n\
                 cookie: token=abc\r\n\
                 x-openwebui-user-id: someone-else\r\n\
                 x-openwebui-user-role: admin\r\n\
                 x-forwarded-for: 10.0.0.1\r\n\
                 forwarded: for=10.0.0.1\r\n\
                 x-real-ip: 10.0.0.1\r\n\
                 x-request-id: req-42\r\n\
                 user-agent: fault-test/1.0\r\n\
                 x-custom-ordinary: kept\r\n";
    let stripped = [
        "x-hop-secret",
        "x-other-hop",
        "openai-organization",
        "openai-project",
        "api-key",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
        "x-api-key",
        "cookie",
        "x-openwebui-user-id",
        "x-openwebui-user-role",
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
    ];
    let kept = [
        ("x-request-id", "req-42"),
        ("user-agent", "fault-test/1.0"),
        ("x-custom-ordinary", "kept"),
    ];
    // Forward engine (chat) and pingora's proxy phases (pull).
    for (path, upstream_path, body) in [
        (
            "/ollama/api/chat",
            "/api/chat",
            json!({"model": "m:latest", "stream": false, "messages": []}),
        ),
        (
            "/ollama/api/pull",
            "/api/pull",
            json!({"model": "m:latest", "stream": false}),
        ),
    ] {
        up.clear();
        raw_post(&gw, path, &admin, extra, &body).await;
        eventually(
            &format!("{path} to reach the upstream"),
            Duration::from_secs(20),
            || !up.requests_to(upstream_path).is_empty(),
        )
        .await;
        let got = up.requests_to(upstream_path).remove(0);
        for h in stripped {
            assert!(
                got.header(h).is_none(),
                "{path}: {h} reached the upstream: {:?}",
                got.headers
            );
        }
        for (h, v) in kept {
            assert_eq!(got.header(h), Some(v), "{path}: {h} was not forwarded");
        }
        assert!(
            got.header("authorization").is_none(),
            "{path}: the client's token reached the upstream"
        );
        if let Some(c) = got.header("connection") {
            let c = c.to_ascii_lowercase();
            assert!(
                !c.contains("hop"),
                "{path}: connection tokens forwarded: {c}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Metric cardinality
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_methods_paths_and_statuses_mint_a_bounded_number_of_series() {
    let _serial = SERIAL.lock().await;
    let up = FaultyUpstream::start(Fault::Statuses).await;
    let (gw, admin) = gateway(&up.url).await;
    let client = http_client();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..200u64 {
        let n = next();
        let r = match i % 3 {
            // An unauthenticated client inventing methods.
            0 => {
                let method = Method::from_bytes(format!("RND{n:X}").as_bytes()).unwrap();
                let path = if n % 2 == 0 { "/api/models" } else { "/health" };
                client.request(method, format!("{}{path}", gw.url))
            }
            // Paths no route knows.
            1 => client.get(format!("{}/r{n:x}/{i}", gw.url)),
            // Whatever status an upstream makes up.
            _ => Route::OllamaChat.request(&gw, &admin, &client),
        };
        let r = r.timeout(Duration::from_secs(30)).send().await.unwrap();
        let _ = r.bytes().await;
    }
    assert!(up.requests() >= 60, "the upstream answered the chats");
    let m = gw.metrics().await;
    let requests: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("ragway_http_requests_total{"))
        .collect();
    // Fixed label sets: 8 groups x 10 methods x ~38 statuses in theory; these requests use
    // a handful of groups and methods, so a few dozen series at most.
    assert!(
        requests.len() <= 50,
        "{} request series:\n{}",
        requests.len(),
        requests.join("\n")
    );
    assert!(
        requests.iter().any(|l| l.contains("method=\"other\"")),
        "invented methods are counted as other:\n{}",
        requests.join("\n")
    );
    let series = m.lines().filter(|l| !l.starts_with('#')).count();
    assert!(series < 400, "{series} series in total");
    for l in m.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !l.contains("RND"),
            "a client-chosen method became a label: {l}"
        );
        assert!(
            !l.contains("/r"),
            "a client-chosen path became a label: {l}"
        );
    }
    // Every status label is from the fixed set.
    for l in &requests {
        let status = l
            .split("status=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert!(
            (status.len() == 3 && (status.ends_with("xx") || status.parse::<u16>().is_ok()))
                || status == "none",
            "status label {status:?}"
        );
    }
}
