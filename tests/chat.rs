//! `POST /api/chat/completions`: routing by model owner, credentials, streaming
//! passthrough, body rewriting, large bodies and errors.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{FakeUpstream, RecordedRequest, SLOW_PAUSE, http_client};
use common::gateway::{Gateway, Setup, assert_error};
use reqwest::{Method, Response};
use serde_json::{Value, json};

const CHAT: &str = "/api/chat/completions";

fn hi() -> Value {
    json!([{"role": "user", "content": "hi"}])
}

/// POSTs raw bytes as JSON to the chat route.
async fn post_raw(gw: &Gateway, token: &str, body: impl Into<Bytes>) -> Response {
    gw.req(Method::POST, CHAT, Some(token))
        .header("content-type", "application/json")
        .body(body.into())
        .send()
        .await
        .unwrap()
}

/// The single request the fake received on `path` (exact path, query included).
fn only_request(up: &FakeUpstream, path: &str) -> RecordedRequest {
    let rs: Vec<_> = up
        .requests()
        .into_iter()
        .filter(|r| r.path == path)
        .collect();
    assert_eq!(
        rs.len(),
        1,
        "expected one request to {path}, got {:?}",
        up.requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
    rs.into_iter().next().unwrap()
}

/// A forwarded request carries no client credential in any header, and a
/// `content-length`, when present, matches the body.
fn assert_clean(r: &RecordedRequest, secrets: &[&str]) {
    for h in ["cookie", "x-api-key"] {
        assert!(r.header(h).is_none(), "{h} forwarded: {:?}", r.headers);
    }
    for (name, value) in &r.headers {
        for s in secrets {
            assert!(
                !value.contains(s),
                "header {name} carries a client credential"
            );
        }
    }
    if let Some(len) = r.header("content-length") {
        assert_eq!(
            len.parse::<usize>().unwrap(),
            r.body.len(),
            "content-length matches the forwarded body"
        );
    }
}

fn content_type(r: &Response) -> String {
    r.headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_owner_with_the_upstream_key_only() {
    let ollama = FakeUpstream::ollama(&["llama3.2:latest"]).await;
    let openai = FakeUpstream::openai(&["gpt-4o"])
        .await
        .with_api_key("sk-upstream");
    let v1 = FakeUpstream::openai(&["v1-model"]).await;
    let gw = Setup::new()
        .ollama(&ollama.url)
        .toml(&format!(
            "[[openai]]\nurl = {:?}\nkey = \"sk-upstream\"\n[[openai]]\nurl = \"{}/v1\"",
            openai.url, v1.url
        ))
        .start()
        .await;
    let admin = gw.admin().await;
    let key = gw.key(&admin).await;

    // Every client credential at once: bearer JWT, token cookie and API-key header.
    let send = |model: &str| {
        gw.req(Method::POST, CHAT, Some(&admin))
            .header("cookie", format!("token={admin}; other=1"))
            .header("x-api-key", &key)
            .json(&json!({"model": model, "messages": hi()}))
            .send()
    };

    // Ollama-owned: Ollama's OpenAI-compatible endpoint.
    let r = send("llama3.2:latest").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from llama3.2:latest"
    );
    let up = only_request(&ollama, "/v1/chat/completions");
    assert_eq!(up.method, "POST");
    assert_eq!(up.json()["model"], "llama3.2:latest");
    assert_eq!(up.json()["messages"], hi());
    assert_eq!(
        up.header("authorization"),
        None,
        "no key configured, none sent"
    );
    assert_clean(&up, &[&admin, &key]);

    // OpenAI-owned: `{base}/chat/completions` with the configured key.
    let r = send("gpt-4o").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from gpt-4o");
    let up = only_request(&openai, "/chat/completions");
    assert_eq!(up.method, "POST");
    assert_eq!(up.json()["model"], "gpt-4o");
    assert_eq!(up.header("authorization"), Some("Bearer sk-upstream"));
    assert_clean(&up, &[&admin, &key]);

    // A base URL with a path keeps it.
    let r = send("v1-model").await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let up = only_request(&v1, "/v1/chat/completions");
    assert_eq!(up.json()["model"], "v1-model");
    assert_eq!(up.header("authorization"), None);
    assert_clean(&up, &[&admin, &key]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_pass_through_byte_for_byte() {
    let ollama = FakeUpstream::ollama(&["m:latest"]).await;
    let openai = FakeUpstream::openai(&["gpt-4o"]).await;
    let gw = Setup::new()
        .ollama(&ollama.url)
        .openai(&openai.url)
        .start()
        .await;
    let admin = gw.admin().await;
    let direct = http_client();

    for (model, direct_url) in [
        ("m:latest", format!("{}/v1/chat/completions", ollama.url)),
        ("gpt-4o", format!("{}/chat/completions", openai.url)),
    ] {
        for stream in [true, false] {
            let body = json!({
                "model": model,
                "messages": hi(),
                "stream": stream,
                "stream_options": {"include_usage": true},
            });
            let want = direct.post(&direct_url).json(&body).send().await.unwrap();
            assert_eq!(want.status(), 200);
            let want_type = content_type(&want);
            let want = want.bytes().await.unwrap();

            let got = gw.post(CHAT, Some(&admin), body.clone()).await;
            assert_eq!(got.status(), 200, "{model} stream={stream}");
            let got_type = content_type(&got);
            let got = got.bytes().await.unwrap();
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "{model} stream={stream}: the gateway's answer is the upstream's"
            );
            assert_eq!(got_type, want_type);
            if stream {
                assert!(got_type.starts_with("text/event-stream"), "{got_type}");
                assert!(got.ends_with(b"data: [DONE]\n\n"), "ends with [DONE]");
                assert!(got.starts_with(b"data: {"), "SSE events");
            } else {
                assert!(got_type.starts_with("application/json"), "{got_type}");
                let v: Value = serde_json::from_slice(&got).unwrap();
                assert_eq!(v["object"], "chat.completion");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_is_not_buffered() {
    let ollama = FakeUpstream::ollama(&["slow-m:latest"]).await;
    let openai = FakeUpstream::openai(&["slow-gpt"]).await;
    let gw = Setup::new()
        .ollama(&ollama.url)
        .openai(&openai.url)
        .start()
        .await;
    let admin = gw.admin().await;
    // Warm the model catalog so its fetch is not part of the timing.
    assert_eq!(gw.get("/api/models", Some(&admin)).await.status(), 200);

    for model in ["slow-m:latest", "slow-gpt"] {
        let t = Instant::now();
        let mut r = gw
            .post(
                CHAT,
                Some(&admin),
                json!({"model": model, "messages": hi(), "stream": true}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let first = r.chunk().await.unwrap().expect("a first chunk");
        let first_at = t.elapsed();
        assert!(
            first_at < SLOW_PAUSE - Duration::from_millis(300),
            "{model}: first chunk after {first_at:?}, held back until the pause ended"
        );
        assert!(
            String::from_utf8_lossy(&first).contains("Hello"),
            "{first:?}"
        );
        let mut rest = Vec::new();
        while let Some(c) = r.chunk().await.unwrap() {
            rest.extend_from_slice(&c);
        }
        assert!(
            t.elapsed() >= SLOW_PAUSE - Duration::from_millis(100),
            "the rest came after the pause"
        );
        assert!(rest.ends_with(b"data: [DONE]\n\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_is_rewritten_only_where_needed() {
    let ollama = FakeUpstream::ollama(&["m:latest"]).await;
    let openai = FakeUpstream::openai(&["m"]).await;
    let gw = Setup::new()
        .ollama(&ollama.url)
        .toml(&format!(
            "[[openai]]\nurl = {:?}\nprefix-id = \"p\"",
            openai.url
        ))
        .start()
        .await;
    let admin = gw.admin().await;

    // Prefix stripped, params merged, Open WebUI-only fields removed.
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({
                "model": "p.m",
                "messages": hi(),
                "max_tokens": 7,
                "params": {"temperature": 0.3, "function_calling": "native", "max_tokens": 99,
                           "stream_response": true},
                "files": [],
                "chat_id": "c-1",
                "session_id": "s-1",
                "tool_ids": ["t"],
                "metadata": {"a": 1},
            }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], "m");
    let up = only_request(&openai, "/chat/completions");
    assert_clean(&up, &[&admin]);
    assert_eq!(
        up.json(),
        json!({"model": "m", "messages": hi(), "max_tokens": 7, "temperature": 0.3}),
        "upstream body: {}",
        up.text()
    );

    // `system` and `custom_params`.
    openai.clear();
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({
                "model": "p.m",
                "messages": hi(),
                "params": {"system": "be brief", "custom_params": {"extra": {"a": 1}}},
            }),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let up = only_request(&openai, "/chat/completions");
    assert_clean(&up, &[&admin]);
    let body = up.json();
    assert_eq!(body["model"], "m");
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    );
    assert_eq!(body["extra"], json!({"a": 1}));
    assert!(body.get("params").is_none() && body.get("custom_params").is_none());

    // No prefix, but an Open WebUI field: still rewritten, model unchanged.
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({"model": "m:latest", "messages": hi(), "chat_id": "c", "stream": false}),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let up = only_request(&ollama, "/v1/chat/completions");
    assert_clean(&up, &[&admin]);
    assert_eq!(
        up.json(),
        json!({"model": "m:latest", "messages": hi(), "stream": false})
    );

    // Nothing to rewrite: the client's exact bytes.
    ollama.clear();
    let raw = "{ \"messages\" :[ {\"content\":\"hi  there\",\"role\":\"user\"} ],\n\t\"temperature\": 1.50,\
               \"model\":   \"m:latest\" , \"stream\":false   }\n";
    let r = post_raw(&gw, &admin, raw).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let up = only_request(&ollama, "/v1/chat/completions");
    assert_clean(&up, &[&admin]);
    assert_eq!(up.text(), raw, "forwarded as sent");

    // The routing pass reads keys and the model as the upstream's parser does: escapes
    // decoded, a UI-only field present as null still removed, an escaped `params` applied.
    ollama.clear();
    let raw = r#"{"model":"m\u003alatest","messages":[{"role":"user","content":"hi"}]}"#;
    let r = post_raw(&gw, &admin, raw).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert_eq!(
        only_request(&ollama, "/v1/chat/completions").text(),
        raw,
        "an escaped model name routes, and the body goes as sent"
    );
    for (raw, expected) in [
        (
            r#"{"model":"m:latest","messages":[],"chat_id":null}"#,
            json!({"model": "m:latest", "messages": []}),
        ),
        (
            r#"{"model":"m:latest","messages":[],"p\u0061rams":{"temperature":0.5}}"#,
            json!({"model": "m:latest", "messages": [], "temperature": 0.5}),
        ),
    ] {
        ollama.clear();
        let r = post_raw(&gw, &admin, raw).await;
        assert_eq!(r.status(), 200, "{raw}");
        r.bytes().await.unwrap();
        assert_eq!(
            only_request(&ollama, "/v1/chat/completions").json(),
            expected,
            "{raw}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_forwarded_intact() {
    let ollama = FakeUpstream::ollama(&["m:latest"]).await;
    let openai = FakeUpstream::openai(&["gpt-4o"]).await;
    let gw = Setup::new()
        .ollama(&ollama.url)
        .openai(&openai.url)
        .start()
        .await;
    let admin = gw.admin().await;
    // ~200 KB, far beyond pingora's 64 KiB retry buffer, with multi-byte characters.
    let text: String = (0..20_000).map(|i| format!("{i:05}é-ß ")).collect();
    assert!(text.len() > 200_000);
    let messages = json!([{"role": "user", "content": text}]);

    // Unchanged body, streamed answer (asking for usage itself, so ragway need not add it).
    let raw = serde_json::to_vec(
        &json!({"model": "m:latest", "messages": messages, "stream": true,
        "stream_options": {"include_usage": true}}),
    )
    .unwrap();
    let r = post_raw(&gw, &admin, raw.clone()).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().ends_with(b"data: [DONE]\n\n"));
    let up = only_request(&ollama, "/v1/chat/completions");
    assert_clean(&up, &[&admin]);
    assert_eq!(up.body.len(), raw.len());
    assert!(up.body == raw, "large body forwarded byte for byte");

    // Rewritten body.
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({"model": "gpt-4o", "messages": messages, "chat_id": "c"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from gpt-4o");
    let up = only_request(&openai, "/chat/completions");
    assert_clean(&up, &[&admin]);
    assert_eq!(up.json(), json!({"model": "gpt-4o", "messages": messages}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_then_still_serves() {
    let ollama = FakeUpstream::ollama(&["m:latest", "fail-m:latest"]).await;
    let doomed = FakeUpstream::ollama(&["gone:latest"]).await;
    let gw = Setup::new()
        .ollama(&ollama.url)
        .ollama(&doomed.url)
        .toml("max-body-mb = 1\n[models]\ncache-ttl = \"1h\"")
        .start()
        .await;
    let admin = gw.admin().await;
    let listed: Value = gw
        .get("/api/models", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 3);

    // Unknown and missing model.
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({"model": "nope", "messages": hi()}),
        )
        .await;
    let v = assert_error(r, 400, "Model not found").await;
    assert_eq!(v["detail"], "Model not found");
    let r = gw.post(CHAT, Some(&admin), json!({"messages": hi()})).await;
    assert_error(r, 400, "Model not found").await;
    let r = gw
        .post(CHAT, Some(&admin), json!({"model": "", "messages": hi()}))
        .await;
    assert_error(r, 400, "Model not found").await;

    // Malformed JSON; missing or mistyped fields.
    let r = post_raw(&gw, &admin, "{\"model\": \"m:latest\", \"messages\": [").await;
    assert_error(r, 400, "").await;
    let r = gw
        .post(CHAT, Some(&admin), json!({"model": "m:latest"}))
        .await;
    assert_error(r, 422, "messages").await;
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({"model": "m:latest", "messages": "hi"}),
        )
        .await;
    assert_error(r, 422, "messages").await;
    let r = post_raw(&gw, &admin, "[1, 2]").await;
    assert_error(r, 422, "").await;
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({"model": "m:latest", "messages": hi(), "params": [1]}),
        )
        .await;
    assert_error(r, 422, "params").await;

    // Over max-body-mb.
    let big = "x".repeat(1024 * 1024 + 512 * 1024);
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({"model": "m:latest", "messages": [{"role": "user", "content": big}]}),
        )
        .await;
    assert_error(r, 413, "too large").await;

    // An upstream error keeps its status and body (Open WebUI would answer 400).
    let body = json!({"model": "fail-m:latest", "messages": hi()});
    let want = http_client()
        .post(format!("{}/v1/chat/completions", ollama.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(want.status(), 500);
    let want = want.bytes().await.unwrap();
    let r = gw.post(CHAT, Some(&admin), body).await;
    assert_eq!(r.status(), 500);
    assert!(content_type(&r).starts_with("application/json"));
    let got = r.bytes().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );

    // A dead upstream: 502 with a JSON error.
    let addr = doomed.addr;
    drop(doomed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "fake upstream did not close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({"model": "gone:latest", "messages": hi()}),
        )
        .await;
    assert_error(r, 502, "").await;

    // The gateway (and the client's pooled connections) still work.
    for _ in 0..3 {
        let r = gw
            .post(
                CHAT,
                Some(&admin),
                json!({"model": "m:latest", "messages": hi()}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello from m:latest");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_authenticate_chat() {
    let ollama = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&ollama.url).start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "u@example.com").await;
    let key = gw.key(&user).await;
    assert!(key.starts_with("sk-"));
    let body = json!({"model": "m:latest", "messages": hi()});

    // Authorization: Bearer sk-...
    let r = gw.post(CHAT, Some(&key), body.clone()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from m:latest");

    // x-api-key: sk-...
    let r = gw
        .req(Method::POST, CHAT, None)
        .header("x-api-key", &key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();

    for up in ollama.requests_to("/v1/chat/completions") {
        assert_eq!(up.header("authorization"), None);
        assert_clean(&up, &[&key, &user]);
    }
    assert_eq!(ollama.requests_to("/v1/chat/completions").len(), 2);

    // A wrong key, and no credential.
    let r = gw.post(CHAT, Some("sk-0000"), body.clone()).await;
    assert_error(r, 401, "").await;
    let r = gw
        .req(Method::POST, CHAT, None)
        .header("x-api-key", "sk-0000")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "").await;
    let r = gw.post(CHAT, None, body).await;
    assert_error(r, 401, "Not authenticated").await;
    assert_eq!(ollama.requests_to("/v1/chat/completions").len(), 2);
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1, for request framings reqwest cannot produce here (chunked
// bodies, `Expect: 100-continue`).
// ---------------------------------------------------------------------------

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
struct RawResponse {
    /// Status codes of the interim (1xx) responses, in order.
    interim: Vec<u16>,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Position just after the first `\r\n\r\n` at or after `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| from + p + 4)
}

/// De-chunks a complete chunked body; `None` while incomplete.
fn dechunk(buf: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let line_end = i + buf.get(i..)?.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&buf[i..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        let data = line_end + 2;
        if size == 0 {
            // No trailers expected: the final CRLF must be there.
            return (buf.len() >= data + 2).then_some(out);
        }
        if buf.len() < data + size + 2 {
            return None;
        }
        out.extend_from_slice(&buf[data..data + size]);
        i = data + size + 2;
    }
}

/// Parses `buf` as interim responses plus one final response; `None` while incomplete.
fn parse_response(buf: &[u8], eof: bool) -> Option<RawResponse> {
    let mut interim = Vec::new();
    let mut start = 0;
    loop {
        let end = head_end(buf, start)?;
        let head = String::from_utf8_lossy(&buf[start..end - 4]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        if (100..200).contains(&status) {
            interim.push(status);
            start = end;
            continue;
        }
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let rest = &buf[end..];
        let body = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            dechunk(rest)?
        } else if let Some(len) = get("content-length") {
            let len: usize = len.parse().ok()?;
            rest.get(..len)?.to_vec()
        } else if status == 204 || status == 304 {
            Vec::new()
        } else if eof {
            rest.to_vec()
        } else {
            return None;
        };
        return Some(RawResponse {
            interim,
            status,
            headers,
            body,
        });
    }
}

/// Reads from `stream` until a whole response is in, the peer closes, or 10 s pass.
async fn read_response(stream: &mut tokio::net::tcp::OwnedReadHalf) -> RawResponse {
    read_response_after(stream, Vec::new()).await
}

/// [`read_response`], with `buf` already read from the stream.
async fn read_response_after(
    stream: &mut tokio::net::tcp::OwnedReadHalf,
    mut buf: Vec<u8>,
) -> RawResponse {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = parse_response(&buf, false) {
            return r;
        }
        let mut chunk = [0u8; 16 * 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "no complete response within 10 s; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return parse_response(&buf, true).unwrap_or_else(|| {
                    panic!(
                        "connection ended mid-response: {:?}",
                        String::from_utf8_lossy(&buf)
                    )
                });
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Request head for a POST to the chat route.
fn chat_head(gw: &Gateway, token: &str, framing: &str) -> String {
    let host = gw.url.trim_start_matches("http://");
    format!(
        "POST {CHAT} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\nconnection: close\r\n{framing}\r\n"
    )
}

/// Sends `body` with `Transfer-Encoding: chunked` in 16 KiB chunks; write errors are
/// ignored (the gateway may answer and close before reading everything).
async fn chunked_exchange(gw: &Gateway, token: &str, body: Vec<u8>) -> RawResponse {
    use tokio::io::AsyncWriteExt;
    let stream = tokio::net::TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = chat_head(gw, token, "transfer-encoding: chunked\r\n");
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        for piece in body.chunks(16 * 1024) {
            wr.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .await?;
            wr.write_all(piece).await?;
            wr.write_all(b"\r\n").await?;
        }
        wr.write_all(b"0\r\n\r\n").await?;
        wr.flush().await?;
        Ok::<_, std::io::Error>(wr)
    });
    let resp = read_response(&mut rd).await;
    let _ = writer.await;
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_bodies() {
    let ollama = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .ollama(&ollama.url)
        .toml("max-body-mb = 1")
        .start()
        .await;
    let admin = gw.admin().await;

    // ~200 KB without a content-length: forwarded intact, with a correct content-length.
    let text: String = (0..20_000).map(|i| format!("{i:05}é-ß ")).collect();
    let raw = serde_json::to_vec(
        &json!({"model": "m:latest", "messages": [{"role": "user", "content": text}]}),
    )
    .unwrap();
    let r = chunked_exchange(&gw, &admin, raw.clone()).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from m:latest");
    let up = only_request(&ollama, "/v1/chat/completions");
    assert_clean(&up, &[&admin]);
    assert!(up.body == raw, "chunked body forwarded byte for byte");
    assert_eq!(
        up.header("content-length"),
        Some(raw.len().to_string().as_str())
    );
    assert!(up.header("transfer-encoding").is_none());

    // Over the limit without a content-length: 413 once the limit is crossed.
    let big = serde_json::to_vec(&json!({"model": "m:latest",
        "messages": [{"role": "user", "content": "x".repeat(1536 * 1024)}]}))
    .unwrap();
    let r = chunked_exchange(&gw, &admin, big).await;
    assert_eq!(r.status, 413, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "JSON error"
    );
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert!(v["detail"].as_str().unwrap().contains("too large"), "{v}");
    assert_eq!(ollama.requests_to("/v1/chat/completions").len(), 1);

    // Still serving.
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({"model": "m:latest", "messages": hi()}),
        )
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_the_real_answer() {
    use tokio::io::AsyncWriteExt;
    let ollama = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&ollama.url).start().await;
    let admin = gw.admin().await;

    // As curl does for large bodies: send the head, wait (up to 1 s) for
    // `100 Continue`, then the body.
    let body = serde_json::to_vec(&json!({"model": "m:latest", "messages": hi()})).unwrap();
    let stream = tokio::net::TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = chat_head(
        &gw,
        &admin,
        &format!("content-length: {}\r\nexpect: 100-continue\r\n", body.len()),
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    let mut early = Vec::new();
    let wait_until = Instant::now() + Duration::from_secs(1);
    while head_end(&early, 0).is_none() {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 1024];
        let left = wait_until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut chunk)).await {
            Err(_) => break, // no 100 Continue: send the body anyway, as curl does
            Ok(Ok(0)) => panic!("gateway closed the connection before the body was sent"),
            Ok(Err(e)) => panic!("reading the interim response: {e}"),
            Ok(Ok(n)) => early.extend_from_slice(&chunk[..n]),
        }
    }
    let continued = head_end(&early, 0).is_some();
    if continued {
        assert!(
            early.starts_with(b"HTTP/1.1 100"),
            "only a 100 Continue may come before the body: {:?}",
            String::from_utf8_lossy(&early)
        );
    }
    wr.write_all(&body).await.unwrap();
    let r = read_response_after(&mut rd, early).await;
    assert_eq!(
        r.status,
        200,
        "final status (interim {:?}, 100 Continue before the body: {continued}): {:?}",
        r.interim,
        String::from_utf8_lossy(&r.body)
    );
    let expected_interim: Vec<u16> = if continued { vec![100] } else { vec![] };
    assert_eq!(
        r.interim, expected_interim,
        "no interim response after the body was sent"
    );
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from m:latest");
    // The gateway already has the body: the upstream is not asked to confirm it.
    let up = only_request(&ollama, "/v1/chat/completions");
    assert_eq!(up.header("expect"), None, "expect forwarded upstream");
    assert_eq!(up.body, Bytes::from(body));

    // And the gateway still serves.
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            json!({"model": "m:latest", "messages": hi()}),
        )
        .await;
    assert_eq!(r.status(), 200);
}

/// Two requests written back to back on one connection (HTTP/1.1 pipelining, or simply a
/// keep-alive client that sends its next request the moment it has a whole answer): both
/// are answered. The gateway watches the connection for a hang-up while the first answer
/// streams, and used to take the second request's first byte for an error and drop the
/// connection ("connection closed before message completed" in reqwest, now and then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_requests_on_one_connection_are_both_answered() {
    use tokio::io::AsyncWriteExt;
    let openai = FakeUpstream::openai(&["m"]).await;
    let gw = Setup::new()
        .toml(&format!("[[openai]]\nurl = {:?}", openai.url))
        .start()
        .await;
    let admin = gw.admin().await;
    let addr = gw.url.strip_prefix("http://").unwrap();
    let body = json!({"model": "m", "messages": hi()}).to_string();
    let one = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {admin}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{one}{one}").as_bytes()).await.unwrap();
    let answers = common::raw::read_answers(&mut s, 2).await;
    assert_eq!(
        answers.len(),
        2,
        "answers: {:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.body);
        let v: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["object"], "chat.completion", "{v}");
    }
    assert_eq!(openai.requests_to("/chat/completions").len(), 2);
}
