//! The context budget and the NDJSON→SSE conversion under hostile input: absurd token
//! counts from clients, an upstream lying about its context length, and broken, endless or
//! failing NDJSON streams.

use serde_json::{Value, json};

use super::common::fake::FakeUpstream;
use super::common::gateway::{Gateway, Setup};
use super::common::scripted::{Scripted, Step};
use super::support::{alive, clear_error};

const CHAT: &str = "/api/chat/completions";
const MODEL: &str = "m:latest";

async fn setup() -> (FakeUpstream, Gateway, String) {
    let up = FakeUpstream::ollama(&[MODEL]).await;
    up.set_show(MODEL, json!({"llama.context_length": 8192}), "");
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    (up, gw, admin)
}

/// A RAG request with a small text item, plus `extra` fields.
fn rag(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Which port?"}],
        "files": [{"type": "text", "content": "Ragway listens on port 3000.", "name": "n"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Text that needs more than the 2048-token runtime window, so the request goes native.
fn long_rag(stream: bool) -> Value {
    let words: Vec<String> = (0..1500).map(|i| format!("w{i}x")).collect();
    json!({"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "Summarise"}],
        "files": [{"type": "text", "content": words.join(" "), "name": "n"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_max_tokens_are_refused_before_anything_is_sent() {
    let (up, gw, admin) = setup().await;
    for bad in [
        json!(1_000_000_000_000_u64),
        json!(-1),
        json!(0),
        json!(2.5),
        json!("512"),
    ] {
        let r = gw
            .post(CHAT, Some(&admin), rag(json!({"max_tokens": bad})))
            .await;
        let v = clear_error(r, 400).await;
        assert!(v["detail"].as_str().unwrap().contains("max_tokens"), "{v}");
    }
    // A reserve as large as the whole window leaves no room for the conversation.
    let r = gw
        .post(CHAT, Some(&admin), rag(json!({"max_tokens": 8192})))
        .await;
    let v = clear_error(r, 400).await;
    assert!(
        v["detail"].as_str().unwrap().contains("does not fit"),
        "{v}"
    );
    assert!(up.requests_to("/v1/chat").is_empty() && up.requests_to("/api/chat").is_empty());
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_or_absurd_num_ctx_is_refused() {
    let (up, gw, admin) = setup().await;
    for extra in [
        json!({"params": {"num_ctx": -4096}}),
        json!({"params": {"num_ctx": 1_000_000_000_000_u64}}),
        json!({"num_ctx": "lots"}),
        json!({"options": {"num_ctx": 0}}),
        json!({"options": {"num_ctx": 4_294_967_296_u64}}),
    ] {
        let r = gw.post(CHAT, Some(&admin), rag(extra)).await;
        let v = clear_error(r, 400).await;
        assert!(v["detail"].as_str().unwrap().contains("num_ctx"), "{v}");
    }
    assert!(up.requests_to("/v1/chat").is_empty() && up.requests_to("/api/chat").is_empty());
    // A sane window the client asks for is honoured through the native API.
    let r = gw
        .post(
            CHAT,
            Some(&admin),
            rag(json!({"params": {"num_ctx": 3000}})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let sent = up.requests_to("/api/chat").pop().unwrap().json();
    assert_eq!(sent["options"]["num_ctx"], 3000);
    assert!(sent.get("num_ctx").is_none());
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_lying_about_its_context_length_is_capped() {
    let up = FakeUpstream::ollama(&[MODEL]).await;
    up.set_show(
        MODEL,
        json!({"llama.context_length": 1_000_000_000_000_000_u64, "bert.context_length": -5}),
        "num_ctx -7\nnum_ctx banana",
    );
    let gw = Setup::new()
        .ollama(&up.url)
        .toml("[context]\nmax-window = 16384")
        .start()
        .await;
    let admin = gw.admin().await;
    let r = gw.post(CHAT, Some(&admin), long_rag(false)).await;
    assert_eq!(r.status(), 200);
    let sent = up.requests_to("/api/chat").pop().unwrap().json();
    let n = sent["options"]["num_ctx"].as_u64().unwrap();
    assert!(
        n > 2048 && n <= 16384,
        "num_ctx {n} within context.max-window"
    );
    // A request that needs more than the cap is still refused, not sent on.
    let words: Vec<String> = (0..40_000).map(|i| format!("w{i}x")).collect();
    let huge = json!({"model": MODEL, "messages": [{"role": "user", "content": words.join(" ")}],
        "files": [{"type": "text", "content": "x", "name": "n"}]});
    let v = clear_error(gw.post(CHAT, Some(&admin), huge).await, 400).await;
    assert!(v["detail"].as_str().unwrap().contains("16384"), "{v}");
    alive(&gw).await;
}

async fn scripted(status: u16, script: Vec<Step>) -> (Scripted, Gateway, String) {
    let up = Scripted::start(
        MODEL,
        json!({"parameters": "", "model_info": {"llama.context_length": 8192}}),
        status,
        script,
    )
    .await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    (up, gw, admin)
}

fn token(content: &str) -> Step {
    Step::line(
        &json!({"model": MODEL, "message": {"role": "assistant", "content": content}, "done": false}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_ndjson_before_any_token_is_a_502() {
    for script in [
        vec![Step::raw(b"<html>oops</html>\n")],
        vec![Step::raw(b"[1,2,3]\n")],
        vec![Step::raw(b"{\"model\": \"m\", \"message\": \n")],
        vec![Step::line(&json!({"error": "model runner crashed"}))],
        // Ends before the done line.
        vec![],
    ] {
        let (_up, gw, admin) = scripted(200, script).await;
        for stream in [true, false] {
            let v = clear_error(gw.post(CHAT, Some(&admin), long_rag(stream)).await, 502).await;
            assert!(v["detail"].as_str().unwrap().starts_with("Upstream"), "{v}");
        }
        alive(&gw).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_ndjson_line_is_cut_at_the_bound() {
    // 3 MiB without a newline, after one good token.
    let blob = vec![b'a'; 3 * 1024 * 1024];
    let (_up, gw, admin) = scripted(200, vec![token("Hi"), Step::raw(&blob)]).await;
    let r = gw.post(CHAT, Some(&admin), long_rag(true)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("\"Hi\""));
    assert!(
        text.contains("invalid stream line") && text.contains("KiB"),
        "{text}"
    );
    assert!(!text.contains("[DONE]"));
    assert!(
        text.len() < 64 * 1024,
        "the line was not relayed: {} bytes",
        text.len()
    );
    // Before any token, the same line is a clear 502.
    let (_up, gw, admin) = scripted(200, vec![Step::raw(&blob)]).await;
    let v = clear_error(gw.post(CHAT, Some(&admin), long_rag(true)).await, 502).await;
    assert!(v["detail"].as_str().unwrap().contains("KiB"), "{v}");
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_line_mid_stream_ends_with_an_error_event() {
    let (_up, gw, admin) = scripted(
        200,
        vec![token("Hel"), Step::raw(b"{\"done\": tru\n"), token("never")],
    )
    .await;
    let r = gw.post(CHAT, Some(&admin), long_rag(true)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events: Vec<Value> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    assert_eq!(
        events.last().unwrap()["error"]["type"],
        "upstream_error",
        "{text}"
    );
    assert!(!text.contains("never") && !text.contains("[DONE]"));
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_status_keeps_its_status_and_message() {
    let (_up, gw, admin) = scripted(
        404,
        vec![Step::line(
            &json!({"error": "model \"m:latest\" not found, try pulling it first"}),
        )],
    )
    .await;
    let v = clear_error(gw.post(CHAT, Some(&admin), long_rag(true)).await, 404).await;
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("try pulling it first"),
        "{v}"
    );
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_whole_answer_is_a_502_not_unbounded_memory() {
    // 33 MiB of JSON-ish bytes for a non-streamed answer (the bound is 32 MiB).
    let blob = vec![b' '; 1024 * 1024];
    let mut script = vec![Step::raw(b"{\"message\": {\"content\": \"")];
    script.extend((0..33).map(|_| Step::raw(&blob)));
    let (_up, gw, admin) = scripted(200, script).await;
    let v = clear_error(gw.post(CHAT, Some(&admin), long_rag(false)).await, 502).await;
    assert!(v["detail"].as_str().unwrap().contains("too large"), "{v}");
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_model_description_is_not_believed() {
    // A 5 MiB /api/show answer claiming a huge window: over the 4 MiB bound, so ragway
    // assumes the default runtime window and fits the context into it instead.
    let up = Scripted::start(
        MODEL,
        json!({"model_info": {"llama.context_length": 131_072}, "license": "x".repeat(5 << 20)}),
        200,
        vec![],
    )
    .await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    // A 2048-token window, and more than that asked for the answer: refused.
    let v = clear_error(
        gw.post(CHAT, Some(&admin), rag(json!({"max_tokens": 4096})))
            .await,
        400,
    )
    .await;
    assert!(v["detail"].as_str().unwrap().contains("2048"), "{v}");
    assert!(up.chats().is_empty());
    alive(&gw).await;
}
