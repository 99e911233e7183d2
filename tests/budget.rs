//! The context budget: retrieved context is fitted into the model's window (fewer, then
//! shorter chunks; the user's messages untouched), what was cut is reported (sources,
//! `x-ragway-context`, metrics), and Ollama RAG prompts beyond the runtime window go to
//! `/api/chat` with `options.num_ctx`, converted back to OpenAI's format as they stream.

mod common;

use std::process::Command;
use std::time::Duration;

use common::fake::FakeUpstream;
use common::gateway::{Gateway, Setup};
use common::scripted::{Scripted, Step};
use common::upload::{collection, upload_text};
use serde_json::{Value, json};

/// Generous: CI runs many test binaries at once on two cores.
const WAIT: Duration = Duration::from_secs(60);

/// A paragraph of distinct pseudo-words, so chunks differ and rank differently.
fn paragraph(seed: u64, words: usize) -> String {
    const SYL: [&str; 12] = [
        "ka", "lo", "mi", "ren", "tu", "sa", "vor", "el", "qui", "dan", "po", "zi",
    ];
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut out = Vec::with_capacity(words);
    for i in 0..words {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let a = SYL[(x >> 33) as usize % SYL.len()];
        let b = SYL[(x >> 40) as usize % SYL.len()];
        out.push(if i % 9 == 0 {
            format!("reactor{a}{b}")
        } else {
            format!("{a}{b}")
        });
    }
    out.join(" ") + "."
}

fn chat(model: &str, question: &str, files: Value, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": question},
    ], "files": files})
}

fn header(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-ragway-context")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// `key=value` from the `x-ragway-context` header.
fn field(h: &str, key: &str) -> Option<u64> {
    h.split("; ")
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(|v| v.parse().unwrap())
}

/// A metric's value (summed over series whose line contains `selector`).
fn metric(text: &str, selector: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(selector))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Tokens of the forwarded messages, counted as the gateway counts them.
fn prompt_tokens(gw: &Gateway, messages: &Value) -> usize {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            6 + gw
                .app()
                .context
                .count(m["content"].as_str().unwrap_or_default())
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_window_keeps_the_best_chunks_and_reports_what_was_cut() {
    let up = FakeUpstream::ollama(&["m:latest", "big:latest"]).await;
    up.set_show("m:latest", json!({"llama.context_length": 1536}), "");
    up.set_show(
        "big:latest",
        json!({"llama.context_length": 131_072}),
        "num_ctx 65536",
    );
    let gw = Setup::new()
        .ollama(&up.url)
        .toml("[rag]\ntop-k = 20\nrelevance-threshold = -1.0\n[context]\nollama-default-window = 512\nanswer-reserve = 128")
        .start()
        .await;
    let admin = gw.admin().await;
    let mut ids = Vec::new();
    for i in 0..8 {
        let text = (0..3)
            .map(|j| paragraph(i * 10 + j, 150))
            .collect::<Vec<_>>()
            .join("\n\n");
        let f = upload_text(&gw, &admin, &format!("doc{i}.txt"), &text).await;
        ids.push(f["id"].as_str().unwrap().to_string());
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let kb = collection(&gw, &admin, "Large", &refs).await;
    let files = json!([{"type": "collection", "id": kb, "name": "Large"}]);
    let question = "what does the reactorkalo say";

    // A model with a large runtime window: everything fits, the /v1 passthrough is kept.
    let r = gw
        .post(
            "/api/chat/completions",
            Some(&admin),
            chat("big:latest", question, files.clone(), false),
        )
        .await;
    assert_eq!(r.status(), 200);
    let h = header(&r);
    assert_eq!(field(&h, "chunks-dropped"), Some(0), "{h}");
    assert_eq!(field(&h, "num-ctx"), None, "{h}");
    let full: Value = r.json().await.unwrap();
    let full_docs = full["sources"][0]["document"].as_array().unwrap().clone();
    assert!(
        full_docs.len() >= 8,
        "a large retrieval: {}",
        full_docs.len()
    );
    assert_eq!(up.requests_to("/api/chat").len(), 0);

    // A 512-token runtime window (1536 trained): most chunks cannot fit.
    let before = gw.metrics().await;
    let r = gw
        .post(
            "/api/chat/completions",
            Some(&admin),
            chat("m:latest", question, files.clone(), false),
        )
        .await;
    assert_eq!(r.status(), 200);
    let h = header(&r);
    let v: Value = r.json().await.unwrap();
    eprintln!("budget header: {h}");
    let kept = field(&h, "chunks-kept").unwrap() as usize;
    let dropped = field(&h, "chunks-dropped").unwrap() as usize;
    let shortened = field(&h, "chunks-shortened").unwrap() as usize;
    assert!(dropped > 0 && kept > 0, "{h}");
    assert_eq!(kept + dropped + shortened, full_docs.len(), "{h}");
    // The best-ranked chunks were kept, in order; a shortened one is a prefix of the next.
    let docs = v["sources"][0]["document"].as_array().unwrap();
    assert_eq!(docs.len(), kept + shortened);
    assert_eq!(docs[..kept], full_docs[..kept]);
    if shortened == 1 {
        let cut = docs[kept].as_str().unwrap();
        assert!(full_docs[kept].as_str().unwrap().starts_with(cut));
        assert!(cut.len() < full_docs[kept].as_str().unwrap().len());
        assert_eq!(
            v["sources"][0]["metadata"][kept]["context_budget"],
            "shortened"
        );
    }
    // The answer came through /api/chat with a larger num_ctx, converted to OpenAI's JSON.
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from m:latest");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    );
    let sent = up
        .requests_to("/api/chat")
        .pop()
        .expect("native call")
        .json();
    let num_ctx = sent["options"]["num_ctx"].as_u64().unwrap();
    assert_eq!(Some(num_ctx), field(&h, "num-ctx"));
    assert!(num_ctx > 512 && num_ctx <= 1536, "{num_ctx}");
    assert_eq!(sent["stream"], false);
    assert_eq!(sent["model"], "m:latest");
    // The forwarded prompt fits with room for the answer, and the user's messages are whole.
    let tokens = prompt_tokens(&gw, &sent["messages"]);
    assert!(
        tokens + 128 <= num_ctx as usize,
        "{tokens} tokens in {num_ctx}"
    );
    let reported = field(&h, "prompt-tokens").unwrap() as i64;
    assert!(
        (reported - tokens as i64).abs() <= 16,
        "reported {reported}, counted {tokens}"
    );
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "You answer briefly."})
    );
    let last = sent["messages"][1]["content"].as_str().unwrap();
    assert!(last.ends_with(&format!("\n{question}")));
    for d in docs {
        assert!(last.contains(d.as_str().unwrap()));
    }
    assert!(!last.contains(full_docs.last().unwrap().as_str().unwrap()));
    // The metrics say what was cut.
    let after = gw.metrics().await;
    let delta = |sel: &str| metric(&after, sel) - metric(&before, sel);
    assert!(delta("ragway_context_budget_chunks_total{action=\"dropped\"}") >= dropped as f64);
    assert!(delta("ragway_context_budget_requests_total{outcome=\"trimmed\"}") >= 1.0);
    assert!(delta("ragway_context_native_requests_total{mode=\"json\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_that_fit_keep_the_v1_passthrough() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    up.set_show("m:latest", json!({"llama.context_length": 8192}), "");
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    let files = json!([{"type": "text", "content": "Ragway listens on port 3000.", "name": "n"}]);
    let r = gw
        .post(
            "/api/chat/completions",
            Some(&admin),
            chat("m:latest", "Which port?", files, true),
        )
        .await;
    assert_eq!(r.status(), 200);
    let h = header(&r);
    assert!(h.starts_with("window=2048; "), "{h}");
    assert_eq!(field(&h, "chunks-kept"), Some(1));
    assert_eq!(field(&h, "chunks-dropped"), Some(0));
    assert_eq!(field(&h, "num-ctx"), None);
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(up.requests_to("/v1/chat/completions").len(), 1);
    assert_eq!(up.requests_to("/api/chat").len(), 0);
    // A chat without files is not touched by the budget at all.
    let r = gw
        .post(
            "/api/chat/completions",
            Some(&admin),
            json!({"model": "m:latest", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ragway-context").is_none());
}

/// A long text item: more than 512 tokens with the template, well under 8192.
fn long_text() -> Value {
    let content = (0..4)
        .map(|i| paragraph(100 + i, 120))
        .collect::<Vec<_>>()
        .join("\n");
    json!([{"type": "text", "content": content, "name": "notes"}])
}

fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or(e).to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_stream_is_converted_line_by_line_and_unbuffered() {
    let line = |content: &str, done: bool| {
        let mut v = json!({"model": "m:latest", "created_at": "2024-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": content}, "done": done});
        if done {
            v["done_reason"] = json!("stop");
            v["prompt_eval_count"] = json!(11);
            v["eval_count"] = json!(2);
        }
        Step::line(&v)
    };
    let up = Scripted::start(
        "m:latest",
        json!({"parameters": "", "model_info": {"llama.context_length": 8192}}),
        200,
        vec![
            line("Hel", false),
            Step::Gate,
            line("lo", false),
            line("", true),
        ],
    )
    .await;
    let gw = Setup::new()
        .ollama(&up.url)
        .toml("[context]\nollama-default-window = 512")
        .start()
        .await;
    let admin = gw.admin().await;
    let mut body = chat("m:latest", "What do the notes say?", long_text(), true);
    body["stream_options"] = json!({"include_usage": true});
    let mut r = tokio::time::timeout(WAIT, gw.post("/api/chat/completions", Some(&admin), body))
        .await
        .expect("response head before the upstream finished");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let h = header(&r);
    let num_ctx = field(&h, "num-ctx").unwrap_or_else(|| panic!("native route: {h}"));
    assert_eq!(num_ctx % 1024, 0, "{h}");
    // The first token reaches the client while the upstream is still held back.
    let mut got = String::new();
    while !got.contains("\"Hel\"") {
        let chunk = tokio::time::timeout(WAIT, r.chunk())
            .await
            .expect("first converted chunk while the upstream is held")
            .unwrap()
            .expect("stream still open");
        got.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(!got.contains("[DONE]") && !got.contains("\"lo\""));
    up.release();
    while let Some(chunk) = tokio::time::timeout(WAIT, r.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        got.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let events = sse_events(&got);
    assert_eq!(events.len(), 6, "{got}");
    let sources: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(sources["sources"][0]["source"]["name"], "notes");
    let chunks: Vec<Value> = events[1..5]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for (c, (content, reason)) in chunks[..3].iter().zip([
        ("Hel", Value::Null),
        ("lo", Value::Null),
        ("", json!("stop")),
    ]) {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "m:latest");
        assert_eq!(c["system_fingerprint"], "fp_ollama");
        assert_eq!(
            c["choices"],
            json!([{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": reason}])
        );
    }
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(
        chunks[3]["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13})
    );
    assert_eq!(events[5], "[DONE]");
    // What the upstream was asked.
    let sent = up.chats().pop().unwrap();
    assert_eq!(sent["options"]["num_ctx"], num_ctx);
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["options"]["temperature"], 1.0);
    assert!(sent.get("files").is_none() && sent.get("stream_options").is_none());
    let tokens = prompt_tokens(&gw, &sent["messages"]);
    assert!(
        tokens > 512 && tokens + 512 <= num_ctx as usize,
        "{tokens} in {num_ctx}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_connections_use_the_configured_context_length() {
    let up = FakeUpstream::openai(&["gpt-x", "gpt-y"]).await;
    let gw = Setup::new()
        .toml(&format!(
            "[[openai]]\nurl = {u:?}\nmodel-ids = [\"gpt-x\"]\ncontext-length = 100000\n\
             context-lengths = {{ \"gpt-x\" = 1500 }}\n\
             [[openai]]\nurl = {u:?}\nmodel-ids = [\"gpt-y\"]",
            u = up.url
        ))
        .start()
        .await;
    let admin = gw.admin().await;
    let original = long_text()[0]["content"].as_str().unwrap().to_string();
    let r = gw
        .post(
            "/api/chat/completions",
            Some(&admin),
            chat("gpt-x", "Summarise", long_text(), false),
        )
        .await;
    assert_eq!(r.status(), 200);
    let h = header(&r);
    assert!(h.starts_with("window=1500; "), "{h}");
    assert_eq!(field(&h, "chunks-shortened"), Some(1), "{h}");
    assert_eq!(
        field(&h, "num-ctx"),
        None,
        "no num_ctx for OpenAI upstreams"
    );
    let sent = up.requests_to("/chat/completions").pop().unwrap().json();
    let last = sent["messages"][1]["content"].as_str().unwrap().to_string();
    assert!(!last.contains(&original));
    assert!(prompt_tokens(&gw, &sent["messages"]) + 512 <= 1500);
    // Without a configured window the context goes in as retrieved.
    let r = gw
        .post(
            "/api/chat/completions",
            Some(&admin),
            chat("gpt-y", "Summarise", long_text(), false),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ragway-context").is_none());
    let sent = up.requests_to("/chat/completions").pop().unwrap().json();
    assert!(
        sent["messages"][1]["content"]
            .as_str()
            .unwrap()
            .contains(&original)
    );
}

fn python() -> Option<String> {
    if let Ok(p) = std::env::var("RAGWAY_TEST_PYTHON") {
        return Some(p);
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/venv/bin/python");
    venv.exists().then(|| venv.display().to_string())
}

/// The official `openai` SDK reads the converted stream and JSON answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_reads_the_converted_answers() {
    let py = python()
        .expect("no Python with the openai SDK: run scripts/python-env.sh (scripts/test.sh does)");
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    up.set_show("m:latest", json!({"llama.context_length": 8192}), "");
    let gw = Setup::new()
        .ollama(&up.url)
        .toml("[context]\nollama-default-window = 512")
        .start()
        .await;
    let admin = gw.admin().await;
    let key = gw.key(&admin).await;
    let script = r#"
import json, sys
from openai import OpenAI
base, key, files = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = OpenAI(base_url=base + "/api", api_key=key)
stream = client.chat.completions.create(
    model="m:latest",
    messages=[{"role": "user", "content": "What do the notes say?"}],
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"files": files},
)
text, sources, usage, reasons = "", None, None, []
for chunk in stream:
    extra = chunk.model_extra or {}
    if "sources" in extra:
        sources = extra["sources"]
    if chunk.usage:
        usage = chunk.usage.total_tokens
    for choice in chunk.choices:
        text += choice.delta.content or ""
        reasons.append(choice.finish_reason)
resp = client.chat.completions.with_raw_response.create(
    model="m:latest",
    messages=[{"role": "user", "content": "What do the notes say?"}],
    extra_body={"files": files},
)
plain = resp.parse()
print(json.dumps({"text": text, "sources": sources, "usage": usage, "reasons": reasons,
                  "plain": plain.choices[0].message.content, "finish": plain.choices[0].finish_reason,
                  "plain_usage": plain.usage.total_tokens,
                  "plain_sources": (plain.model_extra or {}).get("sources"),
                  "header": resp.headers.get("x-ragway-context")}))
"#;
    let out = Command::new(py)
        .args(["-c", script, &gw.url, &key, &long_text().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SDK failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["text"], "Hello from m:latest");
    assert_eq!(v["reasons"], json!([null, null, null, "stop"]));
    assert_eq!(v["usage"], 3);
    assert_eq!(v["plain"], "Hello from m:latest");
    assert_eq!(v["finish"], "stop");
    assert_eq!(v["plain_usage"], 3);
    assert_eq!(v["sources"][0]["source"]["name"], "notes");
    assert_eq!(v["plain_sources"][0]["source"]["name"], "notes");
    assert!(
        v["header"].as_str().unwrap().contains("num-ctx="),
        "{}",
        v["header"]
    );
    let natives = up.requests_to("/api/chat");
    assert_eq!(natives.len(), 2, "both answers came through /api/chat");
    assert_eq!(up.requests_to("/v1/chat/completions").len(), 0);
}
