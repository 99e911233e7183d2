//! Several ragway processes (the release binary) on one PostgreSQL: what one replica does,
//! the others see at once. Accounts and keys made on one work on another, a key deleted or a
//! session signed out on one is refused by the others on their next request, a file
//! uploaded to one is chatted with on another, a replica killed while it processes a file
//! leaves it to the others, and sign-in attempts are counted across replicas.
//!
//! PostgreSQL: a database per test on the cluster of `tests/common/postgres.rs`.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::fake::{FakeUpstream, http_client};
use common::postgres::{TestDb, connect};
use common::release::Server;

const SECRET: &str = "one-secret-shared-by-every-replica";

/// A replica: the release binary on `db`, in front of `upstream`.
async fn replica(db: &str, upstream: &str, extra: &str) -> Server {
    Server::start(
        &format!(
            "[[ollama]]\nurl = \"{upstream}\"\n[auth]\nsignin-attempts = 3\ndefault-user-role = \"user\"\n\
             [rag]\ningest-lease = \"3s\"\nworkers = 1\n{extra}"
        ),
        &[
            ("DATABASE_URL", db),
            ("WEBUI_SECRET_KEY", SECRET),
            ("RAGWAY_LOG", "warn"),
        ],
    )
    .await
}

async fn post(url: &str, path: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
    let mut r = http_client().post(format!("{url}{path}")).json(&body);
    if let Some(b) = bearer {
        r = r.bearer_auth(b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(url: &str, path: &str, bearer: &str) -> (u16, Value) {
    let r = http_client()
        .get(format!("{url}{path}"))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn signup(url: &str, email: &str) -> String {
    let (status, v) = post(
        url,
        "/api/v1/auths/signup",
        None,
        json!({"name": "n", "email": email, "password": "pw-123456"}),
    )
    .await;
    assert_eq!(status, 200, "sign-up {email}: {v}");
    v["token"].as_str().unwrap().to_string()
}

/// Uploads a text file for background processing; returns its id.
async fn upload(url: &str, token: &str, name: &str, text: &str) -> String {
    common::upload::upload_background(&http_client(), url, token, name, text).await
}

async fn status_of(url: &str, token: &str, id: &str) -> String {
    let (code, v) = get(url, &format!("/api/v1/files/{id}/process/status"), token).await;
    assert_eq!(code, 200, "{v}");
    v["status"].as_str().unwrap_or_default().to_string()
}

async fn chunk_count(pg: &tokio_postgres::Client, file: &str) -> i32 {
    pg.query_one(
        "SELECT count(*)::int FROM chunks WHERE file_id = $1",
        &[&file],
    )
    .await
    .unwrap()
    .get(0)
}

/// A few hundred KB of varied English-like text: several seconds of embedding.
fn long_text(words: usize) -> String {
    const VOCAB: &[&str] = &[
        "river", "stone", "lantern", "harbor", "meadow", "copper", "signal", "orchard", "engine",
        "window", "glacier", "market", "thunder", "velvet", "compass", "quarry", "ledger",
        "falcon", "garden", "timber", "canyon", "mirror", "saddle", "beacon",
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out = String::with_capacity(words * 8);
    for i in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(VOCAB[(x % VOCAB.len() as u64) as usize]);
        out.push(if i % 12 == 11 { '.' } else { ' ' });
        if i % 12 == 11 {
            out.push(' ');
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_accounts_keys_files_limits_and_the_queue() {
    let Some(testdb) = TestDb::create("replicas").await else {
        return;
    };
    let db = testdb.url.clone();
    let upstream = FakeUpstream::ollama(&["llama3:latest"]).await;
    let up = upstream.url.clone();

    // --- a replica killed while it processes a file: another one finishes it.
    let mut doomed = replica(&db, &up, "").await;
    let admin_token = signup(&doomed.url, "admin@example.com").await;
    let big = upload(&doomed.url, &admin_token, "big.txt", &long_text(60_000)).await;
    let pg = connect(&db).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = pg
            .query_opt(
                "SELECT attempts FROM jobs WHERE file_id = $1 AND lease_until > now()",
                &[&big],
            )
            .await
            .unwrap();
        if row.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first replica never claimed the file"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.kill();
    assert_eq!(
        chunk_count(&pg, &big).await,
        0,
        "nothing of the file is indexed after the crash"
    );

    let a = replica(&db, &up, "").await;
    let b = replica(&db, &up, "").await;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        match status_of(&b.url, &admin_token, &big).await.as_str() {
            "completed" => break,
            "pending" => {}
            other => panic!("the crashed replica's file ended {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "the crashed replica's file was never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let chunks = chunk_count(&pg, &big).await;
    assert!(chunks > 100, "the file is indexed, once: {chunks} chunks");

    // --- an account and a key made on A work on B.
    let alice = signup(&a.url, "alice@example.com").await;
    let (code, v) = post(&a.url, "/api/v1/auths/api_key", Some(&alice), json!({})).await;
    assert_eq!(code, 200, "{v}");
    let key = v["api_key"].as_str().unwrap().to_string();
    let (code, v) = get(&b.url, "/api/models", &key).await;
    assert_eq!(code, 200, "a key made on A works on B: {v}");
    assert!(v.to_string().contains("llama3"), "{v}");
    let (code, _) = get(&b.url, "/api/v1/auths/", &alice).await;
    assert_eq!(code, 200, "a session made on A works on B");

    // --- a file uploaded to A is chatted with on B.
    let marker = "The harbor master keeps the brass key under the ninth lantern.";
    let file = upload(
        &a.url,
        &alice,
        "notes.txt",
        &format!("{marker}\n\nNothing else of note happened that week."),
    )
    .await;
    let (code, v) = post(
        &b.url,
        "/api/chat/completions",
        Some(&key),
        json!({
            "model": "llama3:latest",
            "stream": false,
            "messages": [{"role": "user", "content": "Where is the brass key kept?"}],
            "files": [{"type": "file", "id": file}],
        }),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let sent = upstream
        .last_request()
        .expect("the chat reached the upstream");
    assert!(
        sent.text().contains("ninth lantern"),
        "B retrieved A's file (it waited for its processing): {}",
        sent.text()
    );

    // --- a key deleted on A is refused by B on its very next request.
    let r = http_client()
        .delete(format!("{}/api/v1/auths/api_key", a.url))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (code, v) = get(&b.url, "/api/models", &key).await;
    assert_eq!(code, 401, "a key deleted on A is refused on B at once: {v}");

    // --- a session signed out on A is refused by B (which has it cached) at once.
    let (code, _) = get(&b.url, "/api/v1/auths/", &alice).await;
    assert_eq!(code, 200);
    let (code, v) = post(&a.url, "/api/v1/auths/signout", Some(&alice), json!({})).await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = get(&b.url, "/api/v1/auths/", &alice).await;
    assert_eq!(
        code, 401,
        "a session signed out on A is refused on B at once: {v}"
    );

    // --- sign-in attempts count across replicas (3 per email).
    let wrong = json!({"email": "alice@example.com", "password": "wrong-password"});
    for url in [&a.url, &b.url, &a.url] {
        let (code, v) = post(url, "/api/v1/auths/signin", None, wrong.clone()).await;
        assert_eq!(code, 400, "{v}");
    }
    let (code, v) = post(&b.url, "/api/v1/auths/signin", None, wrong).await;
    assert_eq!(
        code, 429,
        "the fourth attempt, on B, is over the shared limit: {v}"
    );

    drop((pg, a, b));
    testdb.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_on_a_shared_blob_dir_are_read_by_every_replica() {
    let Some(testdb) = TestDb::create("replicas").await else {
        return;
    };
    let db = testdb.url.clone();
    let upstream = FakeUpstream::ollama(&["llama3:latest"]).await;
    let shared = tempfile::tempdir().unwrap();
    let extra = format!(
        "[storage]\nblob-dir = {:?}\n",
        shared.path().display().to_string()
    );
    let a = replica(&db, &upstream.url, &extra).await;
    let b = replica(&db, &upstream.url, &extra).await;
    let token = signup(&a.url, "admin@example.com").await;
    let text = "Blobs on shared storage stay files, readable by every replica.";
    let id = upload(&a.url, &token, "shared.txt", text).await;
    let names: Vec<String> = std::fs::read_dir(shared.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with(&id)),
        "the upload is a file in the shared directory: {names:?}"
    );
    let r = http_client()
        .get(format!("{}/api/v1/files/{id}/content", b.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), text, "B serves A's upload");
    let deadline = Instant::now() + Duration::from_secs(120);
    while status_of(&b.url, &token, &id).await != "completed" {
        assert!(Instant::now() < deadline, "the upload was never processed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((a, b));
    testdb.drop_db().await;
}

/// Replicas keep the stored model presets in memory; a preset created, changed or deleted
/// on one replica applies on the others at once (a signal drops their copies), well
/// before a copy would expire on its own (`presets::PRESET_CACHE_TTL`, 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_changed_on_one_replica_applies_on_another_at_once() {
    let Some(testdb) = TestDb::create("replicas").await else {
        return;
    };
    let db = testdb.url.clone();
    let upstream = FakeUpstream::ollama(&["llama3:latest"]).await;
    let a = replica(&db, &upstream.url, "").await;
    let b = replica(&db, &upstream.url, "").await;
    let token = signup(&a.url, "admin@example.com").await;
    let chat = json!({"model": "bot", "messages": [{"role": "user", "content": "hi"}]});
    let system_seen = || {
        upstream
            .requests_to("/v1/chat/completions")
            .pop()
            .map(|r| r.json()["messages"][0]["content"].clone())
    };
    // B answers for "bot" (loading its copy) before the preset exists...
    let (code, _) = post(&b.url, "/api/chat/completions", Some(&token), chat.clone()).await;
    assert_eq!(code, 400, "no such model yet");
    let form = |system: &str| {
        json!({"id": "bot", "name": "Bot", "base_model_id": "llama3:latest",
               "params": {"system": system}, "meta": {}})
    };
    let (code, v) = post(&a.url, "/api/v1/models/create", Some(&token), form("one")).await;
    assert_eq!(code, 200, "{v}");
    // ...so each step below is seen on B only through the signal: its copy is younger
    // than its TTL at every check.
    let within = |what: &'static str| {
        let deadline = Instant::now() + Duration::from_secs(2);
        move || {
            assert!(
                Instant::now() < deadline,
                "B still answers with its old copy: {what}"
            );
        }
    };
    let check = within("created");
    loop {
        let (code, _) = post(&b.url, "/api/chat/completions", Some(&token), chat.clone()).await;
        if code == 200 && system_seen() == Some(json!("one")) {
            break;
        }
        check();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, v) = post(
        &a.url,
        "/api/v1/models/model/update?id=bot",
        Some(&token),
        form("two"),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let check = within("updated");
    loop {
        let (code, v) = post(&b.url, "/api/chat/completions", Some(&token), chat.clone()).await;
        assert_eq!(code, 200, "{v}");
        if system_seen() == Some(json!("two")) {
            break;
        }
        check();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = http_client()
        .delete(format!("{}/api/v1/models/model/delete?id=bot", a.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let check = within("deleted");
    loop {
        let (code, _) = post(&b.url, "/api/chat/completions", Some(&token), chat.clone()).await;
        if code == 400 {
            break;
        }
        check();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((a, b));
    testdb.drop_db().await;
}
