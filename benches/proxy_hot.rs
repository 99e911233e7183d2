//! Micro-benchmarks (divan) of the pure functions every proxied request or streamed chunk
//! runs through: credential checks, route matching, the chat body rewrite and the per-chunk
//! work of a stream. The side-by-side run (`benches/side-by-side.sh`) measures the whole
//! proxy; these tell which piece a regression is in.
//!
//! `cargo bench --locked --bench proxy_hot` (add a name filter to run some: `-- auth`).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Method};
use ragway::auth::Auth;
use ragway::http::router::{self, Access};
use ragway::proxy::ndjson_sse::SseConverter;
use ragway::rag::prompt;
use ragway::store::{Role, Store, User};
use ragway::usage::scan::{Format, Scanner};
use serde_json::{Map, Value, json};

fn main() {
    divan::main();
}

/// Chunks of the side-by-side run's streams: 200 tokens, then the final line.
const CHUNKS: usize = 200;

struct Creds {
    auth: Auth,
    key: HeaderMap,
    jwt: HeaderMap,
    none: HeaderMap,
    // Holds the database file for as long as `auth` uses it.
    _dir: tempfile::TempDir,
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii token"),
    );
    h
}

static CREDS: LazyLock<Creds> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open(&dir.path().join("bench.redb")).expect("store"));
    let config = ragway::config::build(
        ragway::config::file::FileConfig::default(),
        &HashMap::new(),
        &ragway::config::Overrides::default(),
    )
    .expect("default config");
    let index = Arc::new(ragway::storage::embedded::vectors::VectorStore::new(
        10_000,
        ragway::index::GraphKind::Usearch,
        None,
    ));
    let storage = ragway::storage::embedded::storage(store, index, dir.path().join("uploads"), 100);
    let auth = Auth::new(config.auth, b"bench-secret", &storage);
    // The embedded backend answers without awaiting: its futures are ready at once.
    let user = storage
        .meta
        .create_user(
            User::new("bench@example.com", "bench", Role::User, "x".into()),
            false,
        )
        .now_or_never()
        .expect("ready")
        .expect("user");
    let key = auth
        .accounts()
        .create_key(&user.id, Vec::new(), ragway::limits::Limits::default())
        .now_or_never()
        .expect("ready")
        .expect("key");
    let (jwt, _) = auth.jwt.issue(&user.id, None);
    let creds = Creds {
        key: bearer(&key),
        jwt: bearer(&jwt),
        none: HeaderMap::new(),
        auth,
        _dir: dir,
    };
    // Both credentials must pass, or the benchmark would time the error path.
    for h in [&creds.key, &creds.jwt] {
        assert!(
            creds
                .auth
                .check(h, Access::Verified)
                .now_or_never()
                .expect("ready")
                .expect("valid credential")
                .is_some()
        );
    }
    creds
});

/// The embedded backend's checks never wait, so each is polled once, as the gateway's
/// first poll finishes them.
mod auth {
    use super::{Access, CREDS, FutureExt, black_box};

    /// An API key on an authenticated route: SHA-256 of the key, then the verified-key
    /// cache (a hit after the first request, as in a load run).
    #[divan::bench]
    fn api_key() {
        let c = &*CREDS;
        black_box(
            c.auth
                .check(black_box(&c.key), Access::Verified)
                .now_or_never(),
        )
        .expect("ready")
        .expect("ok");
    }

    /// A session JWT: signature check, then the revocation look-up in the store.
    #[divan::bench]
    fn jwt() {
        let c = &*CREDS;
        black_box(
            c.auth
                .check(black_box(&c.jwt), Access::Verified)
                .now_or_never(),
        )
        .expect("ready")
        .expect("ok");
    }

    /// A public route without a credential (the baseline of the auth-cost table).
    #[divan::bench]
    fn public_no_credential() {
        let c = &*CREDS;
        black_box(
            c.auth
                .check(black_box(&c.none), Access::Public)
                .now_or_never(),
        )
        .expect("ready")
        .expect("ok");
    }
}

mod route {
    use super::{Method, black_box, router};

    const PATHS: &[(&str, &str)] = &[
        ("POST", "/api/chat/completions"),
        ("POST", "/ollama/api/generate"),
        ("POST", "/ollama/api/chat"),
        ("GET", "/ollama/api/tags"),
        ("GET", "/api/models"),
        ("GET", "/ollama/api/version/0"),
        ("GET", "/api/v1/files/0b7c8f2e-1d2a-4c1e-9a51-3f0e8f6d2a11"),
        ("GET", "/no/such/route"),
    ];

    /// `router::find` for the paths of the side-by-side run, plus a parameterised route
    /// and a miss (the whole table is scanned).
    #[divan::bench(args = PATHS)]
    fn find(route: &(&str, &str)) {
        let method = Method::from_bytes(route.0.as_bytes()).expect("method");
        black_box(router::find(&method, black_box(route.1)));
    }
}

mod chat_body {
    use std::fmt::Write as _;

    use super::{Map, Value, black_box, json, prompt};

    fn short() -> Vec<u8> {
        serde_json::to_vec(&json!({"model": "llama3.2:latest", "stream": true,
            "messages": [{"role": "user", "content": "Why is the sky blue?"}]}))
        .expect("json")
    }

    /// What Open WebUI's own UI sends: UI-only fields and `params` that ragway removes or
    /// applies before forwarding, over a 20-turn conversation.
    fn from_ui() -> Vec<u8> {
        let turns: Vec<Value> = (0..20)
            .map(|i| {
                json!({"role": if i % 2 == 0 {"user"} else {"assistant"},
                "content": "A sentence of ordinary chat text that goes on for a while. ".repeat(8)})
            })
            .collect();
        serde_json::to_vec(
            &json!({"model": "llama3.2:latest", "stream": true, "messages": turns,
            "chat_id": "c1", "id": "m1", "session_id": "s1", "features": {"web_search": false},
            "params": {"temperature": 0.2, "stream_response": true}, "background_tasks": {}}),
        )
        .expect("json")
    }

    /// The JSON guard plus parsing into a map: what every chat request pays to be routed
    /// by its model.
    #[divan::bench(args = ["short", "ui"])]
    fn guard_and_parse(bencher: divan::Bencher, which: &str) {
        let body = if which == "short" { short() } else { from_ui() };
        bencher.bench(|| {
            let m: Map<String, Value> =
                ragway::http::parse_json_with(black_box(&body), 100_000).expect("valid");
            black_box(m)
        });
    }

    /// The guard reading the routing fields (model, messages, stream, keys that force a
    /// rewrite) in the same pass: what a chat request that is forwarded as it came pays,
    /// against `guard_and_parse` above.
    #[divan::bench(args = ["short", "ui"])]
    fn guard_and_route(bencher: divan::Bencher, which: &str) {
        let body = if which == "short" { short() } else { from_ui() };
        bencher.bench(|| {
            let r = ragway::http::json::check_routed(black_box(&body), 100_000, &|k| {
                k == "params" || k == "files" || k == "chat_id"
            })
            .expect("valid")
            .expect("an object");
            black_box(r)
        });
    }

    /// Guard, parse, drop the UI-only fields, apply `params`, set the upstream model and
    /// serialise again: a body that must change on its way.
    #[divan::bench]
    fn rewrite(bencher: divan::Bencher) {
        let body = from_ui();
        bencher.bench(|| {
            let mut m: Map<String, Value> =
                ragway::http::parse_json_with(black_box(&body), 100_000).expect("valid");
            for field in [
                "chat_id",
                "id",
                "session_id",
                "features",
                "background_tasks",
            ] {
                m.remove(field);
            }
            if let Some(Value::Object(params)) = m.remove("params") {
                for (k, v) in params {
                    if k != "stream_response" {
                        m.entry(k).or_insert(v);
                    }
                }
            }
            m.insert("model".into(), Value::String("llama3.2:latest".into()));
            black_box(serde_json::to_vec(&m).expect("json"))
        });
    }

    /// RAG injection: five 1000-character chunks filled into Open WebUI's template and
    /// prepended to the last user message, then the body serialised for the upstream.
    #[divan::bench]
    fn rag_inject(bencher: divan::Bencher) {
        let mut context = String::new();
        for i in 1..=5 {
            let text = "Retrieved text of a document chunk. ".repeat(28);
            let _ = writeln!(
                context,
                "<source id=\"{i}\" name=\"doc{i}.md\">{text}</source>"
            );
        }
        let body = short();
        bencher.bench(|| {
            let mut m: Map<String, Value> =
                ragway::http::parse_json_with(black_box(&body), 100_000).expect("valid");
            let Some(Value::Array(messages)) = m.get_mut("messages") else {
                unreachable!("the body has messages")
            };
            let query = prompt::last_user_query(messages);
            let filled = prompt::fill(prompt::DEFAULT_TEMPLATE, &context, &query);
            prompt::inject(messages, &filled, false);
            black_box(serde_json::to_vec(&m).expect("json"))
        });
    }
}

mod chunk {
    use super::{Bytes, CHUNKS, Format, Scanner, SseConverter, black_box};

    fn ndjson_lines() -> Vec<Bytes> {
        let line = r#"{"model":"m:latest","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":"xxxx"},"done":false}"#;
        let last = r#"{"model":"m:latest","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":10,"eval_count":200}"#;
        (0..CHUNKS)
            .map(|_| Bytes::from(format!("{line}\n")))
            .chain(std::iter::once(Bytes::from(format!("{last}\n"))))
            .collect()
    }

    fn sse_events() -> Vec<Bytes> {
        let event = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":"m:latest","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"xxxx"},"finish_reason":null}]}"#;
        let usage = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":"m:latest","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":200,"total_tokens":210}}"#;
        (0..CHUNKS)
            .map(|_| Bytes::from(format!("{event}\n\n")))
            .chain([
                Bytes::from(format!("{usage}\n\n")),
                Bytes::from_static(b"data: [DONE]\n\n"),
            ])
            .collect()
    }

    /// Relays a whole stream through a scanner chunk by chunk, as the forward engine does
    /// when each chunk is its own write.
    fn meter(chunks: &[Bytes], format: Format, strip: bool) -> ragway::usage::scan::Counts {
        let mut s = Scanner::new(format, strip);
        for c in chunks {
            black_box(s.relay(c.clone()));
        }
        black_box(s.finish());
        s.counts()
    }

    /// `OpenAI`'s own stream with `include_usage`: `"usage":null` in every chunk.
    fn sse_events_null_usage() -> Vec<Bytes> {
        let event = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"xxxx"},"logprobs":null,"finish_reason":null}],"usage":null}"#;
        let mut events = sse_events();
        for e in events.iter_mut().take(CHUNKS) {
            *e = Bytes::from(format!("{event}\n\n"));
        }
        events
    }

    /// Usage metering of `OpenAI`'s stream, `"usage":null` in every chunk, stripping the
    /// usage event ragway asked for. Per whole stream, chunk by chunk.
    #[divan::bench]
    fn meter_sse_stream_null_usage_strip(bencher: divan::Bencher) {
        let chunks = sse_events_null_usage();
        bencher.bench(|| meter(&chunks, Format::Sse, true));
    }

    /// Usage metering of an Ollama NDJSON stream (`/ollama/api/chat`): every chunk passes
    /// the scanner, which reads the counts of the final line. Per whole 201-chunk stream.
    #[divan::bench]
    fn meter_ndjson_stream(bencher: divan::Bencher) {
        let chunks = ndjson_lines();
        bencher.bench(|| meter(&chunks, Format::Ndjson, false));
    }

    /// Usage metering of an OpenAI SSE stream where ragway asked for `include_usage` and
    /// strips that event again (the client did not ask). Per whole stream.
    #[divan::bench]
    fn meter_sse_stream_strip_usage(bencher: divan::Bencher) {
        let chunks = sse_events();
        bencher.bench(|| meter(&chunks, Format::Sse, true));
    }

    /// The same two streams arriving in one burst: the forward engine hands the scanner
    /// everything one client write carries, so this is its cost per burst of 201 chunks.
    #[divan::bench(args = [false, true])]
    fn meter_stream_one_write(bencher: divan::Bencher, sse: bool) {
        let chunks = if sse { sse_events() } else { ndjson_lines() };
        let joined = Bytes::from(chunks.concat());
        let format = if sse { Format::Sse } else { Format::Ndjson };
        bencher.bench(|| {
            let mut s = Scanner::new(format, sse);
            black_box(s.relay(joined.clone()));
            black_box(s.finish());
            s.counts()
        });
    }

    /// NDJSON → OpenAI SSE (a RAG request that needed Ollama's native API for its window).
    /// Per whole stream.
    #[divan::bench]
    fn ndjson_to_sse_stream(bencher: divan::Bencher) {
        let chunks = ndjson_lines();
        bencher.bench(|| {
            let mut c = SseConverter::new("chatcmpl-bench".into(), true);
            for chunk in &chunks {
                black_box(c.feed(chunk).expect("valid line"));
            }
            black_box(c.finish().expect("complete"))
        });
    }
}
