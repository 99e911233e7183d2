//! Soak: thousands of small uploads, several at a time, with chat traffic (some of it with
//! RAG over the uploaded files) alongside. Every request must succeed and every file must
//! end `completed`: an upload that is lost, a status that is never recorded, a temporary
//! file left behind or a storage error under concurrency fails the test.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::fake::FakeUpstream;
use common::gateway::{Gateway, Setup};
use common::upload::{BOUNDARY, file_body};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Mutex;

const TOPICS: [&str; 8] = [
    "protein folding",
    "graph neural networks",
    "ocean acidification",
    "quantum error correction",
    "urban heat islands",
    "antibiotic resistance",
    "sparse retrieval",
    "glacier dynamics",
];

/// A benchmark-like abstract: a few hundred bytes to a few KB, distinct per index.
fn abstract_text(i: usize) -> String {
    let topic = TOPICS[i % TOPICS.len()];
    let mut s = format!(
        "Abstract {i}. We study {topic} using a new method. Our results on dataset {} show an \
         improvement of {}.{} points over the previous state of the art. ",
        i * 7 % 101,
        i % 13,
        i % 10
    );
    for k in 0..(i % 6) {
        s.push_str(&format!(
            "In experiment {k} the effect of parameter p{} on {topic} was measured across {} \
             samples, and the variance stayed below {}. ",
            i + k,
            100 + i % 900,
            k + 1
        ));
    }
    s
}

#[derive(Default)]
struct Failures(std::sync::Mutex<Vec<String>>);

impl Failures {
    fn push(&self, what: String) {
        self.0.lock().unwrap().push(what);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Uploads one file; background unless `inline`. Returns its id.
async fn upload(gw: &Gateway, token: &str, i: usize, inline: bool) -> Result<String, String> {
    let body = file_body(
        &format!("abstract-{i}.txt"),
        "text/plain",
        abstract_text(i).as_bytes(),
        Some(&format!("{{\"n\": {i}}}")),
    );
    let query = if inline {
        "?process_in_background=false"
    } else {
        ""
    };
    let r = gw
        .req(Method::POST, &format!("/api/v1/files/{query}"), Some(token))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .map_err(|e| format!("upload {i}: {e}"))?;
    let status = r.status();
    let text = r.text().await.map_err(|e| format!("upload {i}: {e}"))?;
    if status != 200 {
        return Err(format!("upload {i}: {status} {text}"));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("upload {i}: {e}: {text}"))?;
    if inline && v["data"]["status"] != "completed" {
        return Err(format!("inline upload {i} not completed: {v}"));
    }
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

async fn chat(gw: &Gateway, token: &str, n: usize, file: Option<&str>) -> Result<(), String> {
    let mut body = json!({
        "model": "m:latest",
        "stream": n.is_multiple_of(2),
        "messages": [{"role": "user", "content": format!("question {n} about {}", TOPICS[n % TOPICS.len()])}],
    });
    if let Some(f) = file {
        body["files"] = json!([{"type": "file", "id": f}]);
    }
    let r = gw
        .req(Method::POST, "/api/chat/completions", Some(token))
        .json(&body)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .map_err(|e| format!("chat {n}: {e}"))?;
    let status = r.status();
    let text = r.text().await.map_err(|e| format!("chat {n}: {e}"))?;
    if status != 200 {
        return Err(format!("chat {n}: {status} {text}"));
    }
    Ok(())
}

/// Runs `total` uploads `parallel` at a time (every `inline_every`-th inline) and chat
/// requests alongside until the uploads are done; then waits for every file to be
/// processed and checks the end state.
async fn soak(gw: &Arc<Gateway>, token: &str, total: usize, parallel: usize, inline_every: usize) {
    let failures = Arc::new(Failures::default());
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let completed = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let chats = Arc::new(AtomicUsize::new(0));
    let mut uploaders = Vec::new();
    for _ in 0..parallel {
        let (gw, token) = (gw.clone(), token.to_string());
        let (failures, next, ids, completed) = (
            failures.clone(),
            next.clone(),
            ids.clone(),
            completed.clone(),
        );
        uploaders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let inline = i.is_multiple_of(inline_every);
                match upload(&gw, &token, i, inline).await {
                    Ok(id) => {
                        if inline {
                            completed.lock().await.push(id.clone());
                        }
                        ids.lock().await.push(id);
                    }
                    Err(e) => failures.push(e),
                }
            }
        }));
    }
    let mut chatters = Vec::new();
    for c in 0..2usize {
        let (gw, token) = (gw.clone(), token.to_string());
        let (failures, completed, done, chats) = (
            failures.clone(),
            completed.clone(),
            done.clone(),
            chats.clone(),
        );
        chatters.push(tokio::spawn(async move {
            let mut n = c;
            while !done.load(Ordering::Relaxed) {
                let file = if n.is_multiple_of(3) {
                    let c = completed.lock().await;
                    (!c.is_empty()).then(|| c[n % c.len()].clone())
                } else {
                    None
                };
                if let Err(e) = chat(&gw, &token, n, file.as_deref()).await {
                    failures.push(e);
                }
                chats.fetch_add(1, Ordering::Relaxed);
                n += 2;
            }
        }));
    }
    for u in uploaders {
        u.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for c in chatters {
        c.await.unwrap();
    }
    let failed = failures.take();
    assert!(
        failed.is_empty(),
        "{} failed requests, first ones: {:#?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    assert!(chats.load(Ordering::Relaxed) > 0, "chat traffic ran");
    let ids = ids.lock().await.clone();
    assert_eq!(ids.len(), total, "every upload answered with an id");

    // Every file ends completed (the workers may still be busy with the last ones).
    let app = gw.app();
    let mut rx = app.ingest.watch();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let files = app.store().files().unwrap();
        let pending = files
            .iter()
            .filter(|f| f.status == Some(ragway::store::FileStatus::Pending))
            .count();
        if pending == 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
    }
    let files = app.store().files().unwrap();
    assert_eq!(files.len(), total, "one record per upload");
    let not_done: Vec<String> = files
        .iter()
        .filter(|f| f.status != Some(ragway::store::FileStatus::Completed))
        .map(|f| format!("{} {:?} {:?}", f.filename, f.status, f.error))
        .collect();
    assert!(
        not_done.is_empty(),
        "{} files not completed: {:?}",
        not_done.len(),
        &not_done[..not_done.len().min(10)]
    );
    assert!(
        app.store().queued_files().unwrap().is_empty(),
        "queue drained"
    );
    let mut names: Vec<String> = std::fs::read_dir(gw.dir.path().join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        names.iter().all(|n| !n.starts_with(".upload-")),
        "no temporary file left"
    );
    assert_eq!(names.len(), total, "one blob per file");
    // Each file's status, through the API, agrees.
    for id in ids.iter().step_by(97) {
        let r = gw
            .get(&format!("/api/v1/files/{id}/process/status"), Some(token))
            .await;
        assert_eq!(r.json::<Value>().await.unwrap()["status"], "completed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_uploads_with_chat_alongside() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .ollama(&up.url)
        .toml("[rag]\nworkers = 2")
        .start()
        .await;
    let admin = gw.admin().await;
    let token = gw.key(&admin).await;
    soak(&Arc::new(gw), &token, 1500, 6, 25).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_with_the_real_embedder() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).real_embedder().start().await;
    let admin = gw.admin().await;
    soak(&Arc::new(gw), &admin, 200, 4, 10).await;
}
