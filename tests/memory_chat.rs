//! Memory bounds of chat amplification attacks, on the release binary: peak resident memory
//! (`VmHWM`) before and after each bomb. Before the fixes, the template bomb below needed
//! ~22 GB and the repeated-items bomb ~5 GB; the bounds here are what one request may cost.

mod common;

use common::fake::FakeUpstream;
use common::release::Server;
use serde_json::{Value, json};

const MIB: u64 = 1024;

async fn server(up: &FakeUpstream) -> (Server, String, reqwest::Client) {
    // Embeddings from the fake's /api/embed: the bombs are about chat, not the model.
    // A window large enough for the bombs, so the context budget counts every token of
    // them (its memory is part of what is measured) and lets them through.
    up.set_show("m:latest", json!({}), "num_ctx 4194304");
    let toml = format!(
        "[[ollama]]\nurl = {:?}\n[embedding]\nengine = \"ollama\"\nmodel = \"m:latest\"\n\
         [context]\nmax-window = 4194304\n",
        up.url
    );
    let server = Server::start(&toml, &[]).await;
    let client = common::fake::http_client();
    let token = server.signup(&client).await;
    (server, token, client)
}

async fn chat(s: &Server, client: &reqwest::Client, token: &str, body: &Value) -> u16 {
    client
        .post(format!("{}/api/chat/completions", s.url))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// 450 KB of placeholders as both context and query: one pass, so the upstream body is
/// a few times the input. Bound: 32 MiB over the peak before the bombs, for 4 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_bomb_stays_linear() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let (mut s, token, client) = server(&up).await;
    let bomb = "[context]".repeat(50_000);
    let body = json!({"model": "m:latest", "messages": [{"role": "user", "content": bomb}],
        "files": [{"type": "text", "content": bomb}]});
    // Warm up allocator and caches with a small request first.
    let small = json!({"model": "m:latest", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(chat(&s, &client, &token, &small).await, 200);
    let before = s.peak_kib();
    for _ in 0..4 {
        assert_eq!(chat(&s, &client, &token, &body).await, 200);
    }
    let grew = s.peak_kib().saturating_sub(before);
    eprintln!("peak {} MiB before, grew by {} KiB", before / MIB, grew);
    assert!(s.alive());
    assert!(grew < 32 * MIB, "peak grew by {} MiB", grew / MIB);
}

/// One 1 MB file asked for 5,000 times with `context: "full"`: de-duplicated, injected
/// once. Bound: 48 MiB over the peak after the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_items_bomb_is_bounded() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let (mut s, token, client) = server(&up).await;
    let text = "All work and no play makes a dull gateway. ".repeat(24_000);
    let boundary = "b0undary";
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.txt\"\r\nContent-Type: text/plain\r\n\r\n"
    )
    .into_bytes();
    form.extend_from_slice(text.as_bytes());
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let r = client
        .post(format!(
            "{}/api/v1/files/?process_in_background=false",
            s.url
        ))
        .bearer_auth(&token)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(form)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["status"], "completed", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let item = json!({"type": "file", "id": id, "context": "full"});
    let body = json!({"model": "m:latest", "messages": [{"role": "user", "content": "q"}],
        "files": vec![item; 5000]});
    let small = json!({"model": "m:latest", "messages": [{"role": "user", "content": "q"}],
        "files": [{"type": "file", "id": id, "context": "full"}]});
    assert_eq!(chat(&s, &client, &token, &small).await, 200);
    let before = s.peak_kib();
    for _ in 0..2 {
        assert_eq!(chat(&s, &client, &token, &body).await, 200);
    }
    let grew = s.peak_kib().saturating_sub(before);
    eprintln!("peak {} MiB before, grew by {} KiB", before / MIB, grew);
    assert!(s.alive());
    assert!(grew < 48 * MIB, "peak grew by {} MiB", grew / MIB);
}
