//! Added latency of a RAG chat request: the same `POST /api/chat/completions` with and
//! without `files` (a collection of 10,000 chunks), through a real in-process gateway with
//! the real ONNX query embedding, against a fake Ollama upstream on loopback.
//! `PER_FILE` (default 100) sets the chunks per file: 2 makes a collection of many small
//! documents, like a corpus of abstracts.
//!
//! Then each retrieval stage is timed on its own (query embedding, dense search, BM25,
//! fusion, the whole search with its store reads). The same measurement through the API of
//! the release binary, on a collection built by uploads: `benches/memory_rag.py latency`.
//!
//! Run: `cargo bench --bench rag_latency` (needs `scripts/fetch-model.sh`; env `CHUNKS`
//! and `REQUESTS` change the collection size and the number of measured requests).
//!
//! The corpus chunks get random unit vectors and generated texts (ingesting 10k chunks
//! through ONNX would take minutes and measure ingestion, not retrieval); the query is
//! embedded by the real model, so search and embedding cost what they cost in production.

#[path = "../tests/common/fake.rs"]
#[allow(dead_code)]
mod fake;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Deterministic pseudo-random numbers (no extra dependency).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

const WORDS: &[&str] = &[
    "reactor",
    "coolant",
    "pressure",
    "valve",
    "turbine",
    "sensor",
    "backup",
    "network",
    "latency",
    "gateway",
    "cluster",
    "storage",
    "replica",
    "index",
    "query",
    "vector",
    "policy",
    "audit",
    "billing",
    "invoice",
    "customer",
    "shipment",
    "warehouse",
    "forecast",
    "budget",
    "contract",
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let chunks = env_usize("CHUNKS", 10_000);
    let requests = env_usize("REQUESTS", 200);
    let per_file = env_usize("PER_FILE", 100).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        fake::install_crypto_provider();
        let up = fake::FakeUpstream::ollama(&["m:latest"]).await;
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let toml = format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics-listen = \"\"\ndata-dir = {:?}\nthreads = 1\n[[ollama]]\nurl = {:?}\n",
            dir.path().display().to_string(),
            up.url
        );
        let file: ragway::config::file::FileConfig = toml::from_str(&toml).unwrap();
        let env: std::collections::HashMap<String, String> = std::env::vars().collect();
        let cfg = ragway::config::build(file, &env, &Default::default()).unwrap();
        let app = Arc::new(tokio::task::spawn_blocking(move || ragway::app::App::open(cfg)).await.unwrap().unwrap());
        let embedder = app.ingest.embedder.clone().expect("ONNX model: run scripts/fetch-model.sh");
        let dim = embedder.dim();

        // A collection of `chunks` chunks in files of `per_file` chunks.
        let started = Instant::now();
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let kb = ragway::store::KnowledgeRecord {
            id: "bench".into(), user_id: "bench".into(), name: "bench".into(), description: String::new(),
            meta: serde_json::Value::Null, access_grants: vec![], created_at: 0, updated_at: 0,
        };
        app.store().put_knowledge(&kb).unwrap();
        let admin = app.add_user("bench@example.com", "pw-bench-1", "bench", ragway::store::Role::Admin).await.unwrap();
        for f in 0..chunks.div_ceil(per_file) {
            let n = per_file.min(chunks - f * per_file);
            let id = format!("file-{f}");
            let mut rec = ragway::store::FileRecord {
                id: id.clone(), user_id: admin.id.clone(), filename: format!("{id}.txt"), path: String::new(),
                hash: Some(id.clone()), status: Some(ragway::store::FileStatus::Completed), error: None,
                meta: json!({"name": format!("{id}.txt")}), embedding: None, chunk_count: n, created_at: 0, updated_at: 0,
            };
            rec.embedding = Some(ragway::store::EmbeddingInfo { engine: "onnx".into(), model: embedder.model().into(), dim });
            let mut recs = Vec::new();
            let mut vecs = Vec::new();
            let mut terms = Vec::new();
            for i in 0..n {
                // Mostly a long tail of rare words (as real text has), some domain words.
                let text: Vec<String> = (0..120)
                    .map(|_| {
                        let r = rng.next();
                        if r.is_multiple_of(10) {
                            WORDS[((r >> 8) % WORDS.len() as u64) as usize].to_string()
                        } else {
                            // Zipf-like: small word numbers are far more frequent.
                            let u = ((r >> 16) % 1_000_000) as f64 / 1_000_000.0;
                            format!("w{}", (20_000f64.powf(u)) as u64)
                        }
                    })
                    .collect();
                let text = text.join(" ");
                terms.push(serde_json::to_string(&ragway::index::bm25::TermCounts::of(&text)).unwrap());
                recs.push(ragway::store::ChunkRecord { file_id: id.clone(), index: i, text, start_index: 0, page: None, headers: vec![], context: None });
                let mut v: Vec<f32> = (0..dim).map(|_| rng.unit()).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter_mut().for_each(|x| *x /= norm);
                vecs.push(v);
            }
            app.store().insert_file(&rec, false).unwrap();
            let ids = app.store().reserve_chunk_ids(n).unwrap();
            app.store().complete_file(&rec, "", &ids, &recs, &vecs, &terms).unwrap();
            app.vectors().put_file(&id, &ids, &vecs, &terms);
            app.store().link_file("bench", &id).unwrap();
            app.vectors().link("bench", &id);
        }
        eprintln!("collection of {chunks} chunks built in {:.1}s", started.elapsed().as_secs_f64());

        let handle = {
            let app = app.clone();
            tokio::task::spawn_blocking(move || ragway::server::spawn(app, Duration::from_secs(10)).unwrap()).await.unwrap()
        };
        let client = fake::http_client();
        let url = format!("http://127.0.0.1:{port}");
        let token = client
            .post(format!("{url}/api/v1/auths/signin"))
            .json(&json!({"email": "bench@example.com", "password": "pw-bench-1"}))
            .send().await.unwrap().json::<serde_json::Value>().await.unwrap()["token"].as_str().unwrap().to_string();
        let plain = json!({"model": "m:latest", "stream": false, "messages": [{"role": "user", "content": "what is the coolant pressure of the backup reactor"}]});
        let mut rag = plain.clone();
        rag["files"] = json!([{"type": "collection", "id": "bench", "name": "bench"}]);

        let send = |body: serde_json::Value| {
            let client = client.clone();
            let url = url.clone();
            let token = token.clone();
            async move {
                let t = Instant::now();
                let r = client.post(format!("{url}/api/chat/completions")).bearer_auth(&token).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                t.elapsed().as_secs_f64() * 1000.0
            }
        };
        for _ in 0..20 {
            send(plain.clone()).await;
            send(rag.clone()).await;
        }
        // Interleaved, so both see the same machine state.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..requests {
            a.push(send(plain.clone()).await);
            b.push(send(rag.clone()).await);
        }
        let (ma, mb) = (median(a), median(b));
        println!("chunks {chunks} in files of {per_file}  requests {requests} each");
        println!("median without files: {ma:.3} ms");
        println!("median with files:    {mb:.3} ms");
        println!("added by RAG (median difference): {:.3} ms   ratio {:.2}x", mb - ma, mb / ma);

        // Where the added time goes: each stage of retrieval on its own, as chat runs it.
        let query = plain["messages"][0]["content"].as_str().unwrap();
        let cfg = &app.config.rag;
        let k = cfg.top_k;
        let n = (k * 4).max(20);
        let fuse = ragway::rag::Fuse::from_config(cfg);
        let limits = ragway::rag::Limits::new(k, cfg.relevance_threshold);
        let retriever = app.retriever();
        let scope_all = ragway::storage::Scope { collections: vec!["bench".into()], files: vec![] };
        let vector = ragway::rag::embed_query(&retriever, query).await.unwrap().unwrap();
        let mut stages: Vec<(&str, Vec<f64>)> = ["query embedding", "dense search", "BM25", "fusion", "search + store reads"]
            .into_iter()
            .map(|s| (s, Vec::new()))
            .collect();
        for _ in 0..requests {
            let t = Instant::now();
            ragway::rag::embed_query(&retriever, query).await.unwrap();
            stages[0].1.push(t.elapsed().as_secs_f64() * 1000.0);
            // Through the storage seams, as retrieval calls them.
            let t = Instant::now();
            let d = app.storage.chunks.dense_search(&scope_all, &vector, n).await.unwrap();
            stages[1].1.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            let l = app.storage.chunks.lexical_search(&scope_all, query, n).await.unwrap();
            stages[2].1.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            std::hint::black_box(ragway::rag::rrf(&d, &l, fuse.bm25_weight));
            stages[3].1.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            let mode = ragway::rag::Mode::from_config(cfg);
            let scope = ragway::rag::Scope::Collection("bench");
            std::hint::black_box(ragway::rag::search(&retriever, json!({}), scope, query, Some(&vector), mode, fuse, limits).await.unwrap());
            stages[4].1.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        println!("breakdown (median of {requests}, in-process):");
        for (name, times) in stages {
            println!("  {name:<22} {:.3} ms", median(times));
        }
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!("load average {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
        tokio::task::spawn_blocking(move || handle.stop()).await.unwrap();
    });
}
