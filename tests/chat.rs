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

    // Unchanged body, streamed answer.
    let raw =
        serde_json::to_vec(&json!({"model": "m:latest", "messages": messages, "stream": true}))
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
