//! `ragway migrate`: an embedded data dir, filled through the HTTP API with the real ONNX
//! model, copied into PostgreSQL and read back through the PostgreSQL `Storage`: the same
//! users, keys, sessions, files, chunk ids and vectors, collections, queue, usage and
//! uploads, with searches finding the same top hits. A second copy is refused without
//! `--resume` and changes nothing with it. The binary's errors (bad URL, unreachable
//! database, data dir in use, no data dir) are clear and exit non-zero.
//!
//! PostgreSQL comes from `RAGWAY_TEST_POSTGRES_URL` (as in `tests/storage_conformance.rs`),
//! a fresh database per test.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fake::FakeUpstream;
use common::gateway::{Gateway, Setup};
use common::postgres::TestDb;
use common::upload::{collection, upload_text};
use ragway::commands::migrate::{self, MigrateError};
use ragway::storage::{Scope, Storage};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// A database per test
// ---------------------------------------------------------------------------

fn ragway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ragway"));
    for v in [
        "DATABASE_URL",
        "WEBUI_SECRET_KEY",
        "DATA_DIR",
        "RAGWAY_CONFIG",
    ] {
        c.env_remove(v);
    }
    c
}

fn bar() -> indicatif::ProgressBar {
    indicatif::ProgressBar::hidden()
}

// ---------------------------------------------------------------------------
// The whole data dir, copied and read back
// ---------------------------------------------------------------------------

const ROBOTS: &str = "Quasar maintenance robots polish the observatory mirrors every night.\n\n\
    The robots report mirror reflectivity to the control room before dawn.";
const GARDEN: &str = "Heirloom tomatoes need deep watering twice a week in July.\n\n\
    Mulch keeps the garden soil cool and stops weeds from sprouting.";
const TRAINS: &str = "The night train to Vienna leaves at ten from platform four.\n\n\
    Sleeper cabins have two berths and a small washbasin.";

/// What the embedded gateway left behind, for the checks.
struct Filled {
    dir: tempfile::TempDir,
    admin_id: String,
    alice_id: String,
    alice_key: String,
    kb: String,
    files: Vec<String>,
}

/// Fills an embedded data dir through the HTTP API: an admin and a user with a key, three
/// files embedded by the real ONNX model, a collection, a signed-out session, usage rows.
async fn fill() -> Filled {
    let up = FakeUpstream::openai(&["gpt-x"]).await;
    let gw = Setup::new().real_embedder().openai(&up.url).start().await;
    let admin = gw.admin().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    let alice_key = gw.key(&alice).await;
    let mut files = Vec::new();
    for (name, text) in [
        ("robots.txt", ROBOTS),
        ("garden.txt", GARDEN),
        ("trains.txt", TRAINS),
    ] {
        let v = upload_text(&gw, &alice, name, text).await;
        files.push(v["id"].as_str().unwrap().to_string());
    }
    let kb = collection(&gw, &alice, "notes", &[&files[0], &files[1], &files[2]]).await;
    // A model preset over the collection: presets move too.
    let r = gw
        .post(
            "/api/v1/models/create",
            Some(&alice),
            json!({"id": "notes-bot", "name": "Notes bot", "base_model_id": "gpt-x",
                   "params": {"system": "Answer from the notes.", "temperature": 0.2},
                   "meta": {"knowledge": [{"type": "collection", "id": kb, "name": "notes"}]}}),
        )
        .await;
    assert_eq!(r.status(), 200, "create a preset");

    // Usage rows: written by the logging phase after the answer.
    up.set_usage(json!(7), json!(9));
    let r = gw
        .post(
            "/api/chat/completions",
            Some(&alice_key),
            json!({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw
        .app()
        .storage
        .meta
        .scan_usage(0, u64::MAX, 1)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "usage row never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A signed-out session: its token id is remembered as revoked.
    let session = gw.signup("bob@example.com").await;
    let r = gw
        .post(
            "/api/v1/auths/signout",
            session["token"].as_str(),
            json!({}),
        )
        .await;
    assert!(r.status().is_success(), "signout: {}", r.status());

    let admin_id = gw_json(&gw, "/api/v1/auths/", &admin).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let alice_id = gw_json(&gw, "/api/v1/auths/", &alice).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = gw.stop().await;
    Filled {
        dir,
        admin_id,
        alice_id,
        alice_key,
        kb,
        files,
    }
}

async fn gw_json(gw: &Gateway, path: &str, token: &str) -> Value {
    let r = gw.get(path, Some(token)).await;
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

/// Adds a queued (not yet processed) file straight to the stopped data dir: a running
/// gateway would process it at once.
async fn add_queued_file(src: &Storage, owner: &str) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let rec = ragway::store::FileRecord {
        id: id.clone(),
        user_id: owner.into(),
        filename: "later.txt".into(),
        path: format!("/nowhere/uploads/{id}_later.txt"),
        hash: None,
        status: Some(ragway::store::FileStatus::Pending),
        error: None,
        meta: json!({"name": "later.txt"}),
        embedding: None,
        chunk_count: 0,
        created_at: 1,
        updated_at: 1,
    };
    src.meta.insert_file(&rec).await.unwrap();
    src.blobs
        .put(&format!("{id}_later.txt"), b"to be processed")
        .await
        .unwrap();
    src.queue.enqueue(&id).await.unwrap();
    id
}

/// Everything a reader of either backend sees, for a before/after comparison.
async fn snapshot(s: &Storage, kb: &str) -> Value {
    let users: Vec<Value> = s
        .meta
        .users()
        .await
        .unwrap()
        .iter()
        .map(|u| json!([u.id, u.email, u.role, u.password_hash, u.session_epoch]))
        .collect();
    let mut keys = Vec::new();
    for u in s.meta.users().await.unwrap() {
        if let Some((hash, rec)) = s.meta.api_key_of_user(&u.id).await.unwrap() {
            keys.push(json!([hash, rec.user_id, rec.prefix, rec.created_at]));
        }
    }
    let mut files = Vec::new();
    for f in s.meta.files().await.unwrap() {
        let ids = s.chunks.file_chunk_ids(&f.id).await.unwrap();
        let chunks: Vec<Value> = s
            .chunks
            .chunks(&ids)
            .await
            .unwrap()
            .iter()
            .map(|(id, c)| json!([id, c.text, c.index, c.start_index]))
            .collect();
        files.push(json!({
            "record": serde_json::to_value(&f).unwrap(),
            "text": s.meta.file_text(&f.id).await.unwrap(),
            "chunks": chunks,
            "vectors": s.chunks.file_vectors(&f.id).await.unwrap(),
            "collections": s.meta.file_knowledge(&f.id).await.unwrap(),
        }));
    }
    json!({
        "users": users,
        "primary_admin": s.meta.primary_admin().await.unwrap(),
        "keys": keys,
        "revoked": s.meta.revoked_tokens().await.unwrap(),
        "settings": s.meta.all_settings().await.unwrap(),
        "presets": s.meta.presets().await.unwrap().iter()
            .map(|p| serde_json::to_value(p).unwrap()).collect::<Vec<_>>(),
        "collections": s.meta.knowledges().await.unwrap().iter()
            .map(|k| serde_json::to_value(k).unwrap()).collect::<Vec<_>>(),
        "members": s.meta.knowledge_files(kb).await.unwrap(),
        "files": files,
        "queue": s.queue.pending(100).await.unwrap(),
        "usage": s.meta.scan_usage(0, u64::MAX, 1000).await.unwrap().iter()
            .map(|(k, c)| json!([k.hour, k.user_id, k.key_prefix, k.model, c.requests, c.prompt_tokens, c.completion_tokens]))
            .collect::<Vec<_>>(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_moves_to_postgres_whole_and_searches_the_same() {
    let Some(db) = TestDb::create("migrate").await else {
        return;
    };
    let filled = fill().await;
    let src = migrate::open_source(filled.dir.path()).expect("source opens");
    let queued = add_queued_file(&src, &filled.alice_id).await;
    let dst = migrate::connect_target(&db.url).await.expect("target");

    let report = migrate::migrate(&src, &dst, false, &bar())
        .await
        .expect("migrates");
    let c = &report.copied;
    assert_eq!(c.users, 3, "{c:?}");
    assert_eq!(c.api_keys, 1, "{c:?}");
    assert_eq!(c.revoked_tokens, 1, "{c:?}");
    assert!(c.settings >= 1, "primary admin: {c:?}");
    assert_eq!(c.presets, 1, "{c:?}");
    assert_eq!(c.collections, 1, "{c:?}");
    assert_eq!(c.files, 4, "{c:?}");
    assert!(c.chunks >= 3, "a chunk per processed file at least: {c:?}");
    assert_eq!(c.memberships, 3, "{c:?}");
    assert_eq!(c.jobs, 1, "{c:?}");
    assert_eq!(c.usage_rows, 1, "{c:?}");
    assert_eq!(c.blobs, 4, "{c:?}");
    assert_eq!(report.sampled_files, 4, "few files: all compared");
    assert_eq!(report.sampled_vectors as u64, c.chunks);

    let before = snapshot(&src, &filled.kb).await;
    let after = snapshot(&dst, &filled.kb).await;
    assert_eq!(
        before, after,
        "PostgreSQL reads back what the data dir held"
    );
    assert_eq!(
        dst.meta.primary_admin().await.unwrap().as_deref(),
        Some(filled.admin_id.as_str())
    );

    // The key resolves by the hash of its plaintext, to its owner.
    let rec = dst
        .meta
        .api_key_by_hash(&ragway::auth::hash_key(&filled.alice_key))
        .await
        .unwrap()
        .expect("key resolves on PostgreSQL");
    assert_eq!(rec.user_id, filled.alice_id);
    assert!(dst.queue.is_queued(&queued).await.unwrap());

    // Real 384-dimension vectors, byte for byte.
    let vectors = dst.chunks.file_vectors(&filled.files[0]).await.unwrap();
    assert_eq!(vectors[0].1.len(), 384);
    assert_eq!(
        vectors,
        src.chunks.file_vectors(&filled.files[0]).await.unwrap()
    );

    // Searches in the collection find the same top hits on both backends.
    let scope = Scope {
        collections: vec![filled.kb.clone()],
        files: vec![],
    };
    for (i, f) in filled.files.iter().enumerate() {
        let own = src.chunks.file_vectors(f).await.unwrap();
        let (id, query) = &own[0];
        let a = src.chunks.dense_search(&scope, query, 3).await.unwrap();
        let b = dst.chunks.dense_search(&scope, query, 3).await.unwrap();
        assert_eq!(a[0].0, *id, "a chunk's own vector finds it first");
        let ids = |h: &[(u64, f32)]| h.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b), "dense top hits, file {i}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x.1 - y.1).abs() < 1e-4, "cosine {} vs {}", x.1, y.1);
        }
    }
    for (query, file) in [
        ("quasar observatory mirrors", &filled.files[0]),
        ("tomatoes watering", &filled.files[1]),
        ("sleeper cabins berths", &filled.files[2]),
    ] {
        let a = src.chunks.lexical_search(&scope, query, 3).await.unwrap();
        let b = dst.chunks.lexical_search(&scope, query, 3).await.unwrap();
        assert!(!a.is_empty() && !b.is_empty(), "{query}");
        assert_eq!(a[0].0, b[0].0, "lexical top hit for {query:?}");
        let top = dst.chunks.chunks(&[b[0].0]).await.unwrap();
        assert_eq!(&top[0].1.file_id, file, "{query}");
    }

    // Chunks made on PostgreSQL afterwards get ids above every copied one.
    let mut copied_ids = Vec::new();
    for f in &filled.files {
        copied_ids.extend(dst.chunks.file_chunk_ids(f).await.unwrap());
    }
    let rec = dst.meta.file(&queued).await.unwrap().unwrap();
    let chunk = ragway::store::ChunkRecord {
        file_id: queued.clone(),
        index: 0,
        text: "processed after the move".into(),
        start_index: 0,
        page: None,
        headers: vec![],
        context: None,
    };
    let new_ids = dst
        .chunks
        .complete_file(
            &rec,
            "processed after the move",
            &[chunk],
            &[vec![0.5; 384]],
        )
        .await
        .unwrap();
    assert!(
        copied_ids.iter().all(|id| *id < new_ids[0]),
        "{new_ids:?} vs {copied_ids:?}"
    );

    drop(dst);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_copy_is_refused_without_resume_and_changes_nothing_with_it() {
    let Some(db) = TestDb::create("migrate").await else {
        return;
    };
    let filled = fill().await;
    let src = migrate::open_source(filled.dir.path()).expect("source opens");
    let dst = migrate::connect_target(&db.url).await.expect("target");
    let first = migrate::migrate(&src, &dst, false, &bar()).await.unwrap();
    let after_first = snapshot(&dst, &filled.kb).await;

    let e = migrate::migrate(&src, &dst, false, &bar())
        .await
        .expect_err("a non-empty target is refused");
    assert!(matches!(e, MigrateError::NotEmpty(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("not empty") && msg.contains("--resume"),
        "{msg}"
    );
    assert!(msg.contains("3 user(s)"), "{msg}");
    assert_eq!(snapshot(&dst, &filled.kb).await, after_first);

    // Twice with --resume: the same rows, usage not counted twice.
    for _ in 0..2 {
        let again = migrate::migrate(&src, &dst, true, &bar()).await.unwrap();
        assert_eq!(again.copied, first.copied);
        assert_eq!(snapshot(&dst, &filled.kb).await, after_first);
    }

    // A migration interrupted half-way: rows missing in the target are filled in, rows
    // changed there are put back.
    dst.meta.delete_file(&filled.files[1]).await.unwrap();
    dst.meta.add_usage(&[], u64::MAX).await.unwrap();
    dst.meta
        .delete_api_key_of_user(&filled.alice_id)
        .await
        .unwrap();
    assert_ne!(snapshot(&dst, &filled.kb).await, after_first);
    let resumed = migrate::migrate(&src, &dst, true, &bar()).await.unwrap();
    assert_eq!(resumed.copied, first.copied);
    assert_eq!(snapshot(&dst, &filled.kb).await, after_first);

    drop(dst);
    db.drop_db().await;
}

// ---------------------------------------------------------------------------
// The binary's errors
// ---------------------------------------------------------------------------

/// Runs `ragway migrate` and returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = ragway().arg("migrate").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A data dir with an (empty) database.
fn empty_data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    drop(ragway::store::Store::open(&dir.path().join("ragway.redb")).unwrap());
    dir
}

#[test]
fn bad_urls_are_refused_without_echoing_the_password() {
    let dir = empty_data_dir();
    let d = dir.path().to_str().unwrap();
    for (url, says) in [
        ("mysql://root:hunter2@db/ragway", "not a PostgreSQL URL"),
        ("postgres://u:hunter2@db:5432", "names no database"),
        ("postgres://u:hunter2@db:notaport/x", "not a PostgreSQL URL"),
        ("", "empty"),
    ] {
        let (ok, _, err) = run(&["--data-dir", d, "--to", url]);
        assert!(!ok, "{url}");
        assert!(err.contains("--to") && err.contains(says), "{url}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[test]
fn an_unreachable_database_is_named_without_its_password() {
    let dir = empty_data_dir();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("postgres://u:hunter2@127.0.0.1:{port}/ragway");
    let (ok, _, err) = run(&["--data-dir", dir.path().to_str().unwrap(), "--to", &url]);
    assert!(!ok);
    assert!(
        err.contains(&format!("cannot use PostgreSQL at 127.0.0.1:{port}/ragway")),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn a_missing_data_dir_is_refused_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let (ok, _, err) = run(&[
        "--data-dir",
        missing.to_str().unwrap(),
        "--to",
        "postgres://u@127.0.0.1:1/x",
    ]);
    assert!(!ok);
    assert!(err.contains("no ragway database at"), "{err}");
    assert!(!missing.exists(), "migrate never creates a data dir");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_in_use_is_refused() {
    let gw = Setup::new().start().await;
    let d = gw.dir.path().to_str().unwrap().to_string();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        run(&["--data-dir", &d, "--to", "postgres://u@127.0.0.1:1/x"])
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(
        err.contains("in use by a running ragway") && err.contains("stop it first"),
        "{err}"
    );
    // The running gateway is unharmed.
    let r = gw.get("/health", None).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_copies_and_prints_counts_and_the_secret_note() {
    let Some(db) = TestDb::create("migrate").await else {
        return;
    };
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    gw.key(&admin).await;
    let dir = gw.stop().await;
    let d = dir.path().to_str().unwrap().to_string();
    let url = db.url.clone();
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || run(&["--data-dir", &d, "--to", &url]))
            .await
            .unwrap();
    assert!(ok, "{err}");
    let counts: HashMap<&str, &str> = out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.trim(), v))
        })
        .collect();
    assert_eq!(counts.get("users"), Some(&"1"), "{out}");
    assert_eq!(counts.get("api keys"), Some(&"1"), "{out}");
    assert!(out.contains(".webui_secret_key"), "{out}");
    assert!(out.contains("WEBUI_SECRET_KEY"), "{out}");
    // Run again: refused, non-zero, saying why.
    let d = dir.path().to_str().unwrap().to_string();
    let url = db.url.clone();
    let (ok, _, err) = tokio::task::spawn_blocking(move || run(&["--data-dir", &d, "--to", &url]))
        .await
        .unwrap();
    assert!(!ok);
    assert!(
        err.contains("not empty") && err.contains("--resume"),
        "{err}"
    );
    db.drop_db().await;
}
