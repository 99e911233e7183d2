//! Parallel ingestion with the real ONNX model: many uploads in flight at once end exactly as
//! a one-at-a-time run does (same chunks, same vectors, every file searchable), and a crash in
//! the middle of parallel embedding leaves every file either completed or queued again, never
//! half indexed.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use common::fake::http_client;
use common::gateway::{Gateway, Setup, free_port};
use common::upload::{BOUNDARY, file_body};
use ragway::store::{FileStatus, Store};

/// Generous: CI runs many test binaries on two cores.
const LIMIT: Duration = Duration::from_secs(600);

/// Deterministic English-like text: `paragraphs` paragraphs of 800–900 characters, each
/// unique to (`doc`, paragraph). With `CHUNK_SIZE=1000` and no overlap the character
/// splitter keeps each paragraph as one chunk (two never fit together).
fn document(doc: usize, paragraphs: usize) -> String {
    const WORDS: &[&str] = &[
        "river", "engine", "garden", "signal", "harbor", "lantern", "protein", "market", "glacier",
        "violin", "orbit", "ledger", "meadow", "circuit", "thunder", "pepper", "archive",
        "compass", "velvet", "quarry", "canyon", "beacon", "turbine", "saddle", "mosaic", "falcon",
        "cobalt", "harvest", "tundra", "sonata", "pixel", "walnut",
    ];
    let mut state = (doc as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = String::new();
    for p in 0..paragraphs {
        let mut para = format!("Document {doc} part {p} describes");
        let target = 800 + (next() % 100) as usize;
        while para.len() < target {
            para.push(' ');
            para.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
            if next() % 9 == 0 {
                para.push('.');
            }
        }
        para.push('.');
        out.push_str(&para);
        out.push_str("\n\n");
    }
    out
}

async fn upload(gw: &Gateway, token: &str, name: &str, text: &str, query: &str) -> Value {
    let r = gw
        .req(Method::POST, &format!("/api/v1/files/{query}"), Some(token))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(file_body(name, "text/plain", text.as_bytes(), None))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "upload {name}: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn wait_completed(gw: &Gateway, token: &str, id: &str) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let v: Value = gw
            .get(&format!("/api/v1/files/{id}/process/status"), Some(token))
            .await
            .json()
            .await
            .unwrap();
        if v["status"] != "pending" {
            assert_eq!(v["status"], "completed", "{id}: {v}");
            return;
        }
        assert!(Instant::now() < deadline, "file {id} still pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every stored chunk of the file with its vector, in chunk order.
fn indexed(gw: &Gateway, id: &str) -> Vec<(String, Vec<f32>)> {
    let app = gw.app();
    let rec = app.store().file(id).unwrap().expect("file record");
    assert_eq!(rec.status, Some(FileStatus::Completed), "{rec:?}");
    let ids = app.store().file_chunk_ids(id).unwrap();
    assert_eq!(rec.chunk_count, ids.len(), "chunk_count vs stored chunks");
    assert_eq!(app.vectors().file_len(id), ids.len(), "index vs store");
    let mut chunks = app.store().chunks(&ids).unwrap();
    chunks.sort_by_key(|(_, c)| c.index);
    chunks
        .into_iter()
        .map(|(cid, c)| {
            let v = app.vectors().vector(id, cid).expect("vector indexed");
            (c.text, v)
        })
        .collect()
}

fn onnx_setup() -> Setup {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2/model.onnx");
    assert!(
        model.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        model.display()
    );
    Setup::new()
        .real_embedder()
        .env("CHUNK_SIZE", "1000")
        .env("CHUNK_OVERLAP", "0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_uploads_in_flight_end_like_a_sequential_run_and_are_all_searchable() {
    let docs: Vec<(String, String)> = (0..20)
        .map(|i| (format!("doc-{i:02}.txt"), document(i, i % 7 + 1)))
        .collect();

    // One at a time: one session, one worker, each upload processed before the next.
    let sequential = onnx_setup()
        .toml("[embedding]\nsessions = 1\n[rag]\nworkers = 1")
        .start()
        .await;
    let admin = sequential.admin().await;
    let mut expected: HashMap<String, Vec<(String, Vec<f32>)>> = HashMap::new();
    for (name, text) in &docs {
        let v = upload(
            &sequential,
            &admin,
            name,
            text,
            "?process_in_background=false",
        )
        .await;
        assert_eq!(v["data"]["status"], "completed", "{v}");
        let id = v["id"].as_str().unwrap();
        expected.insert(name.clone(), indexed(&sequential, id));
    }
    drop(sequential);

    // All twenty at once on the default (machine-sized) sessions and workers, with the
    // smallest and largest files interleaved so batches of several files run side by side.
    let gw = onnx_setup().start().await;
    let admin = gw.admin().await;
    let uploads = docs
        .iter()
        .map(|(name, text)| upload(&gw, &admin, name, text, ""));
    let answers = futures_util::future::join_all(uploads).await;
    let ids: Vec<(String, String)> = answers
        .iter()
        .map(|v| {
            (
                v["filename"].as_str().unwrap().to_string(),
                v["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    futures_util::future::join_all(ids.iter().map(|(_, id)| wait_completed(&gw, &admin, id))).await;

    let kb = {
        let r = gw
            .post(
                "/api/v1/knowledge/create",
                Some(&admin),
                json!({"name": "parallel", "description": ""}),
            )
            .await;
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let app = gw.app();
    let embedder = app.ingest.embedder.as_ref().expect("ONNX embedder loaded");
    let mut total = 0;
    for ((name, id), (_, text)) in ids.iter().zip(&docs) {
        let got = indexed(&gw, id);
        let want = &expected[name];
        assert_eq!(
            got.len(),
            text.matches("\n\n").count(),
            "{name}: a chunk per paragraph"
        );
        assert_eq!(
            got.len(),
            want.len(),
            "{name}: chunk count as in the sequential run"
        );
        for ((gt, gv), (wt, wv)) in got.iter().zip(want) {
            assert_eq!(gt, wt, "{name}: same chunk text");
            // Batches of other lengths pad differently; masked padding changes nothing
            // beyond float rounding.
            let diff = gv
                .iter()
                .zip(wv)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "{name}: vector differs by {diff}");
        }
        let r = gw
            .post(
                &format!("/api/v1/knowledge/{kb}/file/add"),
                Some(&admin),
                json!({"file_id": id}),
            )
            .await;
        assert_eq!(r.status(), 200, "{name}: {}", r.text().await.unwrap());
        total += got.len();
    }
    assert_eq!(app.vectors().collection_len(&kb), total);
    // Each file is found by its own text in the collection of all twenty.
    for ((name, id), (_, text)) in ids.iter().zip(&docs) {
        let last = text.trim_end().rsplit("\n\n").next().unwrap().to_string();
        let q = embedder.embed(vec![last.clone()]).await.unwrap();
        let hits = app.vectors().search_collection(&kb, &q[0], 1);
        let top = app.store().chunks(&[hits[0].0]).unwrap();
        assert_eq!(
            &top[0].1.file_id, id,
            "{name}: its last paragraph is its own top hit"
        );
        assert_eq!(top[0].1.text.trim(), last.trim());
    }
}

/// A `ragway serve` child (the test build) with the ONNX engine. Killed when dropped.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn config(dir: &Path) -> std::path::PathBuf {
        let config = dir.join("ragway.toml");
        if !config.exists() {
            std::fs::write(
                &config,
                format!(
                    "listen = \"127.0.0.1:{}\"\nmetrics-listen = \"\"\ndata-dir = {:?}\n\
                     shutdown-grace = \"1s\"\n[auth]\nadmin-email = \"ops@example.com\"\n\
                     admin-password = \"pw-123456\"\n[rag]\nchunk-size = 1000\nchunk-overlap = 0\n",
                    free_port(),
                    dir.join("data").display().to_string()
                ),
            )
            .unwrap();
        }
        config
    }

    async fn start(dir: &Path) -> Serve {
        let config = Self::config(dir);
        let text = std::fs::read_to_string(&config).unwrap();
        let addr = text
            .lines()
            .find_map(|l| l.strip_prefix("listen = "))
            .unwrap()
            .trim_matches('"')
            .to_string();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ragway"));
        for v in [
            "OLLAMA_BASE_URL",
            "OLLAMA_BASE_URLS",
            "WEBUI_SECRET_KEY",
            "ENV",
            "DATA_DIR",
            "PORT",
            "HOST",
            "CHUNK_SIZE",
            "CHUNK_OVERLAP",
            "RAG_EMBEDDING_ENGINE",
        ] {
            cmd.env_remove(v);
        }
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RAGWAY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ragway starts");
        let serve = Serve {
            child,
            url: format!("http://{addr}"),
        };
        let client = http_client();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = client.get(format!("{}/health", serve.url)).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "ragway did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        serve
    }

    async fn token(&self) -> String {
        let r = http_client()
            .post(format!("{}/api/v1/auths/signin", self.url))
            .json(&json!({"email": "ops@example.com", "password": "pw-123456"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn upload(&self, token: &str, name: &str, text: &str) -> String {
        let r = http_client()
            .post(format!("{}/api/v1/files/", self.url))
            .bearer_auth(token)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(file_body(name, "text/plain", text.as_bytes(), None))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn status(&self, token: &str, id: &str) -> String {
        let r = http_client()
            .get(format!("{}/api/v1/files/{id}/process/status", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for a clean exit (the database is closed after that).
    async fn stop(&mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_parallel_embedding_leaves_every_file_completed_or_requeued() {
    const FILES: usize = 10;
    const PARAGRAPHS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(dir.path()).await;
    let token = serve.token().await;
    let mut ids = Vec::new();
    for i in 0..FILES {
        ids.push(
            serve
                .upload(&token, &format!("f{i}.txt"), &document(100 + i, PARAGRAPHS))
                .await,
        );
    }
    // Killed once the first files are committed while others are still being embedded (the
    // default pool runs several files' batches at once).
    let deadline = Instant::now() + LIMIT;
    let pending_at_kill = loop {
        let mut done = 0;
        let mut pending = 0;
        for id in &ids {
            match serve.status(&token, id).await.as_str() {
                "completed" => done += 1,
                "pending" => pending += 1,
                other => panic!("file {id} is {other}"),
            }
        }
        if done > 0 {
            serve.kill_9();
            break pending;
        }
        assert!(Instant::now() < deadline, "no file completed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(pending_at_kill > 0, "the crash must interrupt some files");

    // The restarted process picks the unfinished files up again and completes them.
    let mut serve = Serve::start(dir.path()).await;
    let token = serve.token().await;
    let deadline = Instant::now() + LIMIT;
    for id in &ids {
        loop {
            match serve.status(&token, id).await.as_str() {
                "completed" => break,
                "pending" => {}
                other => panic!("file {id} is {other} after the restart"),
            }
            assert!(Instant::now() < deadline, "file {id} still pending");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    serve.stop().await;

    // Store and index agree on every file: all chunks, each once, with its vector.
    let store = Store::open(&dir.path().join("data/ragway.redb")).unwrap();
    let vectors = ragway::storage::embedded::vectors::VectorStore::new(
        usize::MAX,
        ragway::index::GraphKind::default(),
        None,
    );
    vectors.load(&store).unwrap();
    assert!(
        store.queued_files().unwrap().is_empty(),
        "nothing left queued"
    );
    for id in &ids {
        let rec = store.file(id).unwrap().unwrap();
        assert_eq!(rec.status, Some(FileStatus::Completed));
        let chunk_ids = store.file_chunk_ids(id).unwrap();
        assert_eq!(chunk_ids.len(), PARAGRAPHS, "{id}: one chunk per paragraph");
        assert_eq!(rec.chunk_count, PARAGRAPHS);
        assert_eq!(vectors.file_len(id), PARAGRAPHS, "{id}: index");
        let mut chunks = store.chunks(&chunk_ids).unwrap();
        chunks.sort_by_key(|(_, c)| c.index);
        let indexes: Vec<usize> = chunks.iter().map(|(_, c)| c.index).collect();
        assert_eq!(
            indexes,
            (0..PARAGRAPHS).collect::<Vec<_>>(),
            "{id}: no chunk twice"
        );
    }
}
