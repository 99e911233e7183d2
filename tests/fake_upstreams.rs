//! Self-tests for the fake upstream servers in `tests/common/fake.rs`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads a response body chunk by chunk, as the client received it.
async fn chunks(mut resp: reqwest::Response) -> Vec<Bytes> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("read body chunk") {
        out.push(chunk);
    }
    out
}

/// Parses NDJSON text into its lines' values.
fn ndjson(text: &str) -> Vec<Value> {
    assert!(
        text.ends_with('\n'),
        "NDJSON must end with a newline: {text:?}"
    );
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}")))
        .collect()
}

fn content_type(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Polls `cond` until it holds or `limit` passes.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_tags_ps_and_version() {
    let up = FakeUpstream::ollama(&["llama3.2:latest", "m"]).await;
    let client = http_client();

    let tags: Value = client
        .get(format!("{}/api/tags", up.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let models = tags["models"].as_array().expect("models array");
    assert_eq!(models.len(), 2);
    let first = &models[0];
    assert_eq!(first["name"], "llama3.2:latest");
    assert_eq!(first["model"], "llama3.2:latest");
    assert_eq!(first["size"], 2_019_393_189u64);
    let digest = first["digest"].as_str().unwrap();
    assert_eq!(digest.len(), 64);
    assert!(digest.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(first["details"]["format"], "gguf");
    assert_eq!(first["details"]["families"], json!(["llama"]));

    let ps: Value = client
        .get(format!("{}/api/ps", up.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ps["models"][1]["name"], "m");
    assert_eq!(ps["models"][1]["size_vram"], 1);

    let version = |client: reqwest::Client| {
        let url = format!("{}/api/version", up.url);
        async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(version(client.clone()).await, json!({ "version": "0.5.1" }));
    up.set_version("0.9.0");
    assert_eq!(version(client.clone()).await["version"], "0.9.0");

    up.set_models(&["other"]);
    let tags: Value = client
        .get(format!("{}/api/tags", up.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["models"][0]["name"], "other");
    assert_eq!(tags["models"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_chat_streams_ndjson() {
    let up = FakeUpstream::ollama(&["m"]).await;
    // No "stream" field: Ollama streams by default.
    let resp = http_client()
        .post(format!("{}/api/chat", up.url))
        .json(&json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(content_type(&resp), "application/x-ndjson");
    let body: Vec<u8> = chunks(resp).await.concat();
    let lines = ndjson(std::str::from_utf8(&body).unwrap());
    assert_eq!(lines.len(), 4, "{lines:?}");
    let (last, content_lines) = lines.split_last().unwrap();
    assert!(content_lines.iter().all(|l| l["done"] == false));
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["eval_count"], 2);
    let content: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content, "Hello from m");
    assert!(
        lines
            .iter()
            .all(|l| l["model"] == "m" && l["message"]["role"] == "assistant")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_stream_false_returns_one_json_object() {
    let up = FakeUpstream::ollama(&["m"]).await;
    let client = http_client();

    let resp = client
        .post(format!("{}/api/chat", up.url))
        .json(&json!({ "model": "m", "stream": false, "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(content_type(&resp), "application/json");
    let chat: Value = resp.json().await.unwrap();
    assert_eq!(chat["message"]["content"], "Hello from m");
    assert_eq!(chat["done"], true);

    // Generate, with the implicit ":latest" tag.
    let gen_resp: Value = client
        .post(format!("{}/api/generate", up.url))
        .json(&json!({ "model": "m:latest", "prompt": "hi", "stream": false }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(gen_resp["response"], "Hello from m:latest");
    assert_eq!(gen_resp["context"], json!([1, 2, 3]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_errors() {
    let up = FakeUpstream::ollama(&["m", "fail-m", "midstream-error-m"]).await;
    let client = http_client();
    let chat = |body: Value| {
        client
            .post(format!("{}/api/chat", up.url))
            .json(&body)
            .send()
    };

    let resp = chat(json!({ "model": "nope" })).await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({ "error": "model 'nope' not found" })
    );

    let resp = client
        .post(format!("{}/api/chat", up.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.json::<Value>().await.unwrap()["error"].is_string());

    let resp = chat(json!({ "model": "fail-m" })).await.unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({ "error": "internal failure" })
    );

    let resp = chat(json!({ "model": "midstream-error-m" })).await.unwrap();
    assert_eq!(resp.status(), 200);
    let lines = ndjson(&resp.text().await.unwrap());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["message"]["content"], "Hello");
    assert_eq!(lines[1], json!({ "error": "something went wrong" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_embeddings_are_deterministic() {
    let up = FakeUpstream::ollama(&["nomic-embed-text"]).await;
    let client = http_client();
    let embed: Value = client
        .post(format!("{}/api/embed", up.url))
        .json(&json!({ "model": "nomic-embed-text", "input": ["a", "b"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vectors: Vec<Vec<f32>> = serde_json::from_value(embed["embeddings"].clone()).unwrap();
    assert_eq!(vectors, vec![embedding_for("a"), embedding_for("b")]);
    assert_eq!(vectors[0].len(), EMBED_DIM);
    assert_ne!(vectors[0], vectors[1]);

    let legacy: Value = client
        .post(format!("{}/api/embeddings", up.url))
        .json(&json!({ "model": "nomic-embed-text", "prompt": "a" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vector: Vec<f32> = serde_json::from_value(legacy["embedding"].clone()).unwrap();
    assert_eq!(vector, embedding_for("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_model_management() {
    let up = FakeUpstream::ollama(&["m"]).await;
    let client = http_client();
    let post =
        |path: &str, body: Value| client.post(format!("{}{path}", up.url)).json(&body).send();

    let resp = post("/api/pull", json!({ "model": "new" })).await.unwrap();
    assert_eq!(content_type(&resp), "application/x-ndjson");
    let lines = ndjson(&resp.text().await.unwrap());
    assert_eq!(lines[0]["status"], "pulling manifest");
    assert_eq!(lines.last().unwrap(), &json!({ "status": "success" }));

    let resp = post(
        "/api/copy",
        json!({ "source": "new", "destination": "copy" }),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = post(
        "/api/copy",
        json!({ "source": "missing", "destination": "x" }),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 404);

    let show: Value = post("/api/show", json!({ "model": "copy" }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(show["capabilities"], json!(["completion"]));
    assert_eq!(show["details"]["family"], "llama");

    let delete = |model: &str| {
        client
            .delete(format!("{}/api/delete", up.url))
            .json(&json!({ "model": model }))
            .send()
    };
    assert_eq!(delete("m").await.unwrap().status(), 200);
    assert_eq!(delete("m").await.unwrap().status(), 404);
    assert_eq!(up.models(), vec!["new", "copy"]);

    let resp = post(
        "/api/create",
        json!({ "model": "made", "from": "new", "stream": false }),
    )
    .await
    .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({ "status": "success" })
    );
    assert!(up.models().contains(&"made".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_streams_sse() {
    let up = FakeUpstream::openai(&["gpt-4o"]).await;
    let resp = http_client()
        .post(format!("{}/v1/chat/completions", up.url))
        .json(&json!({ "model": "gpt-4o", "stream": true, "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(content_type(&resp), "text/event-stream");
    let body = String::from_utf8(chunks(resp).await.concat()).unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body:?}");
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data event"))
        .collect();
    let (done, json_events) = events.split_last().unwrap();
    assert_eq!(*done, "[DONE]");
    let chunks: Vec<Value> = json_events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello from gpt-4o");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_non_stream_models_and_errors() {
    let up = FakeUpstream::openai(&["gpt-4o"]).await;
    let client = http_client();

    let models: Value = client
        .get(format!("{}/models", up.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        models,
        json!({ "object": "list", "data": [
            { "id": "gpt-4o", "object": "model", "created": 1_700_000_000, "owned_by": "openai" }
        ] })
    );

    let completion: Value = client
        .post(format!("{}/chat/completions", up.url))
        .json(&json!({ "model": "gpt-4o", "messages": [] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "Hello from gpt-4o"
    );
    assert_eq!(completion["usage"]["total_tokens"], 3);

    let resp = client
        .post(format!("{}/chat/completions", up.url))
        .json(&json!({ "model": "nope", "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "model_not_found");
    assert_eq!(err["error"]["message"], "The model `nope` does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_api_key_is_enforced() {
    let up = FakeUpstream::openai(&["gpt-4o"])
        .await
        .with_api_key("sk-test");
    let client = http_client();
    let models = |auth: Option<&str>| {
        let mut req = client.get(format!("{}/v1/models", up.url));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        req.send()
    };

    for auth in [None, Some("Bearer wrong")] {
        let resp = models(auth).await.unwrap();
        assert_eq!(resp.status(), 401);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_api_key");
        assert_eq!(err["error"]["message"], "Incorrect API key provided");
    }
    let resp = models(Some("Bearer sk-test")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.last_request().unwrap().header("Authorization"),
        Some("Bearer sk-test")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_model_sends_first_chunk_before_pausing() {
    let up = FakeUpstream::ollama(&["slow-m"]).await;
    let start = Instant::now();
    let mut resp = http_client()
        .post(format!("{}/api/chat", up.url))
        .json(&json!({ "model": "slow-m", "messages": [] }))
        .send()
        .await
        .unwrap();
    let first = resp.chunk().await.unwrap().expect("first chunk");
    // The only timing assertion: generous, since the pause is 1.5 s.
    assert!(
        start.elapsed() < SLOW_PAUSE,
        "first chunk took {:?}",
        start.elapsed()
    );
    let first = ndjson(std::str::from_utf8(&first).unwrap());
    assert_eq!(first.len(), 1, "only the first line precedes the pause");
    assert_eq!(first[0]["message"]["content"], "Hello");

    let rest = String::from_utf8(chunks(resp).await.concat()).unwrap();
    let rest = ndjson(&rest);
    assert_eq!(rest.last().unwrap()["done"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_model_keeps_connection_until_client_leaves() {
    let up = FakeUpstream::ollama(&["hang-m"]).await;
    let client = http_client();
    let mut resp = client
        .post(format!("{}/api/generate", up.url))
        .json(&json!({ "model": "hang-m", "prompt": "hi" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("first chunk");
    assert_eq!(
        ndjson(std::str::from_utf8(&first).unwrap())[0]["response"],
        "Hello"
    );
    assert_eq!(up.open_connections(), 1);

    drop(resp);
    drop(client);
    assert!(
        eventually(Duration::from_secs(5), || up.open_connections() == 0).await,
        "server did not notice the client hanging up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_model_and_blackhole_time_out() {
    let up = FakeUpstream::openai(&["stall-m"]).await;
    install_crypto_provider();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = client
        .post(format!("{}/chat/completions", up.url))
        .json(&json!({ "model": "stall-m", "messages": [] }))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(
        up.requests_to("/chat/completions").len(),
        1,
        "stalled request is recorded"
    );

    let (url, handle) = blackhole().await;
    let err = client
        .get(format!("{url}/api/tags"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    handle.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_chunked_request_bodies() {
    let up = FakeUpstream::ollama(&["m"]).await;
    let body =
        json!({ "model": "m", "stream": false, "messages": [{ "role": "user", "content": "hi" }] })
            .to_string();

    // reqwest lacks its "stream" feature here, so write a chunked request by hand.
    let mut socket = TcpStream::connect(up.addr).await.unwrap();
    let mut request = format!(
        "POST /api/chat?trace=1 HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         X-Test: yes\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        up.addr
    );
    for part in body.as_bytes().chunks(10) {
        request.push_str(&format!(
            "{:x}\r\n{}\r\n",
            part.len(),
            std::str::from_utf8(part).unwrap()
        ));
    }
    request.push_str("0\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("Hello from m"), "{response}");

    let recorded = up.last_request().unwrap();
    assert_eq!(recorded.method, "POST");
    assert_eq!(recorded.path, "/api/chat?trace=1");
    assert_eq!(recorded.header("x-test"), Some("yes"));
    assert_eq!(recorded.header("Transfer-Encoding"), Some("chunked"));
    assert!(
        recorded.headers.iter().any(|(name, _)| name == "x-test"),
        "names are lowercase"
    );
    assert_eq!(recorded.body, body.as_bytes());
    assert_eq!(recorded.json()["messages"][0]["content"], "hi");

    // Ordinary requests are recorded too, in order.
    let client = http_client();
    client
        .get(format!("{}/api/tags", up.url))
        .send()
        .await
        .unwrap();
    client
        .get(format!("{}/api/version", up.url))
        .send()
        .await
        .unwrap();
    assert_eq!(up.request_count(), 3);
    assert_eq!(up.requests()[1].path, "/api/tags");
    assert_eq!(up.requests_to("/api/").len(), 3);
    assert_eq!(up.requests_to("/api/tags").len(), 1);
    up.clear();
    assert_eq!(up.request_count(), 0);
    assert!(up.last_request().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_url_and_dropped_upstream_refuse_connections() {
    let client = http_client();
    let err = client
        .get(format!("{}/api/tags", dead_url()))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");

    let up = FakeUpstream::ollama(&["m"]).await;
    let url = format!("{}/api/tags", up.url);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    drop(up);
    // A fresh client, so no pooled connection is reused.
    let client = http_client();
    let mut refused = false;
    for _ in 0..50 {
        if let Err(err) = client.get(&url).send().await {
            refused = err.is_connect();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "dropped upstream still accepts connections");
}
