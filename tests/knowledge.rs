//! `/api/v1/knowledge/*`: collections, their files (added without re-embedding), duplicate
//! detection, removal, reset, deletion, access grants and pagination.

mod common;

use std::time::{Duration, Instant};

use common::fake::FakeUpstream;
use common::gateway::{Gateway, Setup, assert_error};
use reqwest::{Method, Response};
use serde_json::{Value, json};

const BOUNDARY: &str = "ragway-knowledge-boundary-93f0d2";
const NOT_FOUND: &str = "We could not find what you're looking for :/";
const ACCESS_PROHIBITED: &str = "You do not have permission to access this resource.";
const DUPLICATE: &str = "Duplicate content detected";
const PROCESS_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn file_body(filename: &str, content_type: &str, bytes: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: {content_type}\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// Uploads a text file; returns the 200 answer.
async fn upload(gw: &Gateway, token: &str, name: &str, text: &str, query: &str) -> Value {
    let r = gw
        .req(Method::POST, &format!("/api/v1/files/{query}"), Some(token))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(file_body(name, "text/plain", text.as_bytes()))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "upload {name}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Uploads and processes inline; returns the file id.
async fn upload_done(gw: &Gateway, token: &str, name: &str, text: &str) -> String {
    let v = upload(gw, token, name, text, "?process_in_background=false").await;
    assert_eq!(v["data"]["status"], "completed", "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn json_ok(r: Response) -> Value {
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn get_json(gw: &Gateway, path: &str, token: &str) -> Value {
    json_ok(gw.get(path, Some(token)).await).await
}

async fn user_id(gw: &Gateway, token: &str) -> String {
    get_json(gw, "/api/v1/auths/", token).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn create(gw: &Gateway, token: &str, body: Value) -> Value {
    json_ok(gw.post("/api/v1/knowledge/create", Some(token), body).await).await
}

async fn create_kb(gw: &Gateway, token: &str, name: &str) -> String {
    create(gw, token, json!({"name": name, "description": "d"})).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn add(gw: &Gateway, token: &str, kb: &str, file: &str) -> Response {
    gw.post(
        &format!("/api/v1/knowledge/{kb}/file/add"),
        Some(token),
        json!({"file_id": file}),
    )
    .await
}

async fn remove(gw: &Gateway, token: &str, kb: &str, file: &str, query: &str) -> Response {
    gw.post(
        &format!("/api/v1/knowledge/{kb}/file/remove{query}"),
        Some(token),
        json!({"file_id": file}),
    )
    .await
}

async fn kb_file_ids(gw: &Gateway, token: &str, kb: &str) -> Vec<String> {
    let v = get_json(gw, &format!("/api/v1/knowledge/{kb}/files"), token).await;
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

fn chunk_count(gw: &Gateway, file: &str) -> usize {
    gw.app().store().file(file).unwrap().unwrap().chunk_count
}

fn embed_requests(fake: &FakeUpstream) -> usize {
    fake.requests_to("/api/embed").len()
}

/// A gateway embedding with `model` on a fake Ollama, one chunk per paragraph.
fn ollama_setup(fake: &FakeUpstream, model: &str) -> Setup {
    Setup::new()
        .real_embedder()
        .env("RAG_EMBEDDING_ENGINE", "ollama")
        .env("RAG_OLLAMA_BASE_URL", &fake.url)
        .env("RAG_EMBEDDING_MODEL", model)
        .env("CHUNK_SIZE", "200")
        .env("CHUNK_OVERLAP", "0")
}

/// `n` distinct paragraphs of 130–160 characters separated by blank lines: with
/// `CHUNK_SIZE=200` and no overlap each is exactly one chunk.
fn paragraphs(n: usize, topic: &str) -> String {
    (0..n)
        .map(|i| {
            format!(
                "Note {i} about {topic}: the reading on gauge {} was {} units at station {}. \
                 The technician logged it and scheduled the next inspection.",
                i % 11,
                i * 13,
                i * 7
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

// ---------------------------------------------------------------------------
// Create, list, get, files, update
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_get_files_and_update() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    let alice_id = user_id(&gw, &alice).await;

    // The name is required.
    for body in [
        json!({"name": "", "description": "x"}),
        json!({"name": "   "}),
        json!({"description": "no name"}),
        json!({}),
    ] {
        let r = gw
            .post("/api/v1/knowledge/create", Some(&alice), body.clone())
            .await;
        let status = r.status().as_u16();
        assert!(status == 400 || status == 422, "{body}: {status}");
        assert_error(r, status, "").await;
    }
    let r = gw
        .req(Method::POST, "/api/v1/knowledge/create", Some(&alice))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(gw.app().store().knowledges().unwrap().is_empty());

    let kb = create(
        &gw,
        &alice,
        json!({"name": "Docs", "description": "Product documentation"}),
    )
    .await;
    let id = kb["id"].as_str().unwrap().to_string();
    assert_eq!(kb["user_id"], alice_id.as_str());
    assert_eq!(kb["name"], "Docs");
    assert_eq!(kb["description"], "Product documentation");
    assert_eq!(kb["meta"], Value::Null);
    assert_eq!(kb["access_grants"], json!([]));
    assert_eq!(kb["files"], Value::Null);
    assert!(kb["created_at"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(kb["created_at"], kb["updated_at"]);

    let list = get_json(&gw, "/api/v1/knowledge/", &alice).await;
    assert_eq!(list["total"], 1);
    let item = &list["items"][0];
    assert_eq!(item["id"], id.as_str());
    assert_eq!(item["write_access"], true);
    assert_eq!(item["user"]["id"], alice_id.as_str());
    assert_eq!(item["user"]["email"], "alice@example.com");
    assert_eq!(item["user"]["role"], "user");
    assert!(item["user"]["name"].is_string());
    assert!(item["user"].get("password_hash").is_none());

    let got = get_json(&gw, &format!("/api/v1/knowledge/{id}"), &alice).await;
    assert_eq!(got["files"], Value::Null);
    assert_eq!(got["write_access"], true);
    assert_eq!(got["name"], "Docs");
    assert_error(
        gw.get("/api/v1/knowledge/does-not-exist", Some(&alice))
            .await,
        404,
        NOT_FOUND,
    )
    .await;

    let files = get_json(&gw, &format!("/api/v1/knowledge/{id}/files"), &alice).await;
    assert_eq!(
        files,
        json!({"items": [], "directories": [], "breadcrumbs": [], "total": 0})
    );
    let f = upload_done(&gw, &alice, "guide.txt", "How to install the product.").await;
    json_ok(add(&gw, &alice, &id, &f).await).await;
    let files = get_json(&gw, &format!("/api/v1/knowledge/{id}/files"), &alice).await;
    assert_eq!(files["total"], 1);
    assert_eq!(files["directories"], json!([]));
    assert_eq!(files["breadcrumbs"], json!([]));
    let item = &files["items"][0];
    assert_eq!(item["id"], f.as_str());
    assert_eq!(item["filename"], "guide.txt");
    assert_eq!(item["user"]["id"], alice_id.as_str());
    assert_eq!(item["data"]["status"], "completed");
    assert_eq!(item["meta"]["name"], "guide.txt");

    // Rename and describe; grants untouched when not given.
    let bob = gw.user(&admin, "bob@example.com").await;
    let bob_id = user_id(&gw, &bob).await;
    let r = gw
        .post(
            &format!("/api/v1/knowledge/{id}/update"),
            Some(&alice),
            json!({"name": "Manuals", "description": "Renamed"}),
        )
        .await;
    let v = json_ok(r).await;
    assert_eq!(v["name"], "Manuals");
    assert_eq!(v["description"], "Renamed");
    assert_eq!(v["write_access"], true);
    assert_eq!(v["files"].as_array().unwrap().len(), 1);
    assert_eq!(v["files"][0]["id"], f.as_str());
    assert_eq!(v["access_grants"], json!([]));
    let got = get_json(&gw, &format!("/api/v1/knowledge/{id}"), &alice).await;
    assert_eq!(got["name"], "Manuals");

    // Grants.
    let r = gw
        .post(
            &format!("/api/v1/knowledge/{id}/update"),
            Some(&alice),
            json!({"name": "Manuals", "description": "Renamed", "access_grants": [
                {"principal_type": "user", "principal_id": bob_id, "permission": "read"}
            ]}),
        )
        .await;
    let v = json_ok(r).await;
    let grants = v["access_grants"].as_array().unwrap();
    assert_eq!(grants.len(), 1);
    let g = &grants[0];
    assert_eq!(g["resource_type"], "knowledge");
    assert_eq!(g["resource_id"], id.as_str());
    assert_eq!(g["principal_type"], "user");
    assert_eq!(g["principal_id"], bob_id.as_str());
    assert_eq!(g["permission"], "read");
    assert!(g["id"].is_string());
    assert!(g["created_at"].is_u64());
    let got = get_json(&gw, &format!("/api/v1/knowledge/{id}"), &bob).await;
    assert_eq!(got["write_access"], false);

    // Invalid grants and an empty name are refused and change nothing.
    for body in [
        json!({"name": "X", "access_grants": [
            {"principal_type": "user", "principal_id": bob_id, "permission": "admin"}]}),
        json!({"name": "X", "access_grants": [
            {"principal_type": "robot", "principal_id": bob_id, "permission": "read"}]}),
        json!({"name": ""}),
    ] {
        let r = gw
            .post(
                &format!("/api/v1/knowledge/{id}/update"),
                Some(&alice),
                body.clone(),
            )
            .await;
        let status = r.status().as_u16();
        assert!(status == 400 || status == 422, "{body}: {status}");
    }
    let got = get_json(&gw, &format!("/api/v1/knowledge/{id}"), &alice).await;
    assert_eq!(got["name"], "Manuals");
    assert_eq!(got["access_grants"].as_array().unwrap().len(), 1);

    // `[]` makes it private again.
    let r = gw
        .post(
            &format!("/api/v1/knowledge/{id}/update"),
            Some(&alice),
            json!({"name": "Manuals", "access_grants": []}),
        )
        .await;
    assert_eq!(json_ok(r).await["access_grants"], json!([]));
    assert_error(
        gw.get(&format!("/api/v1/knowledge/{id}"), Some(&bob)).await,
        404,
        NOT_FOUND,
    )
    .await;
}

// ---------------------------------------------------------------------------
// Adding files
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_add_reuses_stored_vectors() {
    let fake = FakeUpstream::ollama(&["nomic-embed-text"]).await;
    let gw = ollama_setup(&fake, "nomic-embed-text").start().await;
    let admin = gw.admin().await;
    let text = paragraphs(5, "pumps");
    let f = upload_done(&gw, &admin, "pumps.txt", &text).await;
    let n = chunk_count(&gw, &f);
    assert_eq!(n, 5);
    let embeds = embed_requests(&fake);
    assert!(embeds >= 1, "processing embedded through the fake");
    let sent = fake.requests_to("/api/embed")[0].json();
    assert_eq!(sent["model"], "nomic-embed-text");
    assert_eq!(sent["input"].as_array().unwrap().len(), 5);

    let kb = create_kb(&gw, &admin, "Pumps").await;
    let kb2 = create_kb(&gw, &admin, "Everything").await;
    let v = json_ok(add(&gw, &admin, &kb, &f).await).await;
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 1);
    let entry = files[0].as_object().unwrap();
    let mut keys: Vec<&str> = entry.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["created_at", "hash", "id", "meta", "updated_at"]);
    assert_eq!(files[0]["id"], f.as_str());
    assert!(files[0]["hash"].as_str().unwrap().len() == 64);
    assert_eq!(files[0]["meta"]["name"], "pumps.txt");
    assert_eq!(v["id"], kb.as_str());
    assert_eq!(v["write_access"], true);
    json_ok(add(&gw, &admin, &kb2, &f).await).await;

    // Open WebUI re-embeds on file/add; ragway copies the stored vectors.
    assert_eq!(embed_requests(&fake), embeds, "file/add must not re-embed");
    let app = gw.app();
    assert_eq!(app.vectors().collection_len(&kb), n);
    assert_eq!(app.vectors().collection_len(&kb2), n);
    let chunk_ids = app.store().file_chunk_ids(&f).unwrap();
    // A chunk's own vector finds it in the collection: the vector of the text it was embedded
    // by (with titles in chunks, the document's first line, which stands alone, in front).
    let stored = app.store().chunks(&chunk_ids[2..3]).unwrap();
    assert!(stored[0].1.context.is_some());
    assert_eq!(stored[0].1.text, text.split("\n\n").nth(2).unwrap());
    let q = common::fake::embedding_for(&stored[0].1.indexed_text().replace('\n', " "));
    let hits = app.vectors().search_collection(&kb, &q, 1);
    assert_eq!(hits[0].0, chunk_ids[2], "{hits:?}");
    assert!(hits[0].1 > 0.999, "{hits:?}");
    assert_eq!(app.store().knowledge_files(&kb).unwrap(), vec![f.clone()]);
    assert_eq!(kb_file_ids(&gw, &admin, &kb).await, vec![f.clone()]);

    // Unknown file and unknown collection.
    let r = add(&gw, &admin, &kb, "no-such-file").await;
    assert_error(r, 400, "not found").await;
    let r = add(&gw, &admin, "no-such-kb", &f).await;
    assert_error(r, 404, NOT_FOUND).await;
    // A file uploaded without processing has no content to add.
    let raw = upload(&gw, &admin, "raw.txt", "raw text", "?process=false").await;
    let r = add(&gw, &admin, &kb, raw["id"].as_str().unwrap()).await;
    assert_error(r, 400, "Extracted content is not available").await;
    assert_eq!(app.vectors().collection_len(&kb), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_add_waits_for_a_file_still_processing() {
    let fake = FakeUpstream::ollama(&["slow-embed"]).await;
    let gw = ollama_setup(&fake, "slow-embed").start().await;
    let admin = gw.admin().await;
    let kb = create_kb(&gw, &admin, "Slow").await;
    let v = upload(&gw, &admin, "slow.txt", &paragraphs(3, "valves"), "").await;
    assert_eq!(v["data"]["status"], "pending");
    let f = v["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let r = add(&gw, &admin, &kb, &f).await;
    let v = json_ok(r).await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "answered before the slow embedding finished"
    );
    assert_eq!(v["files"][0]["id"], f.as_str());
    let s = get_json(&gw, &format!("/api/v1/files/{f}/process/status"), &admin).await;
    assert_eq!(s["status"], "completed");
    assert_eq!(chunk_count(&gw, &f), 3);
    assert_eq!(gw.app().vectors().collection_len(&kb), 3);
    assert_eq!(kb_file_ids(&gw, &admin, &kb).await, vec![f]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_add_gives_up_after_file_add_wait() {
    let fake = FakeUpstream::ollama(&["slow-embed"]).await;
    let gw = ollama_setup(&fake, "slow-embed")
        .toml("[rag]\nfile-add-wait = \"1s\"")
        .start()
        .await;
    let admin = gw.admin().await;
    let kb = create_kb(&gw, &admin, "Impatient").await;
    // 130 chunks: 3 batches of 1.5 s, far beyond the 1 s wait.
    let v = upload(&gw, &admin, "long.txt", &paragraphs(130, "boilers"), "").await;
    let f = v["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let r = add(&gw, &admin, &kb, &f).await;
    let waited = started.elapsed();
    let body = assert_error(r, 409, "still being processed").await;
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    assert!(body["detail"].as_str().unwrap().contains(&f), "{body}");
    // Nothing linked.
    let app = gw.app();
    assert!(app.store().knowledge_files(&kb).unwrap().is_empty());
    assert!(app.store().file_knowledge(&f).unwrap().is_empty());
    assert_eq!(app.vectors().collection_len(&kb), 0);
    assert!(kb_file_ids(&gw, &admin, &kb).await.is_empty());

    // Once processed, the same call succeeds.
    let deadline = Instant::now() + PROCESS_LIMIT;
    loop {
        let s = get_json(&gw, &format!("/api/v1/files/{f}/process/status"), &admin).await;
        if s["status"] == "completed" {
            break;
        }
        assert_eq!(s["status"], "pending");
        assert!(Instant::now() < deadline, "never completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    json_ok(add(&gw, &admin, &kb, &f).await).await;
    assert_eq!(app.vectors().collection_len(&kb), 130);
}

/// The documented client flow: poll `/process/status` until `completed`, then `file/add`.
/// The collection must then hold every chunk of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_add_right_after_completed_status_gets_every_vector() {
    let gw = Setup::new()
        .env("CHUNK_SIZE", "200")
        .env("CHUNK_OVERLAP", "0")
        .start()
        .await;
    let admin = gw.admin().await;
    let kb = create_kb(&gw, &admin, "Eager").await;
    let n = 1500;
    let v = upload(&gw, &admin, "many.txt", &paragraphs(n, "turbines"), "").await;
    let f = v["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + PROCESS_LIMIT;
    loop {
        let s = get_json(&gw, &format!("/api/v1/files/{f}/process/status"), &admin).await;
        if s["status"] == "completed" {
            break;
        }
        assert_eq!(s["status"], "pending", "{s}");
        assert!(Instant::now() < deadline, "never completed");
    }
    json_ok(add(&gw, &admin, &kb, &f).await).await;
    let app = gw.app();
    app.ingest.wait_done(&f, PROCESS_LIMIT).await.unwrap();
    assert_eq!(chunk_count(&gw, &f), n);
    assert_eq!(kb_file_ids(&gw, &admin, &kb).await, vec![f.clone()]);
    assert_eq!(
        app.vectors().collection_len(&kb),
        n,
        "the collection lists the file but searches only part of it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_content_is_refused_and_re_adding_is_idempotent() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let text = "Identical text in two different files.";
    let f1 = upload_done(&gw, &admin, "one.txt", text).await;
    let f2 = upload_done(&gw, &admin, "two.txt", text).await;
    let other = upload_done(&gw, &admin, "three.txt", "Different text.").await;
    let kb = create_kb(&gw, &admin, "Dups").await;
    json_ok(add(&gw, &admin, &kb, &f1).await).await;
    let n = gw.app().vectors().collection_len(&kb);
    assert_eq!(n, chunk_count(&gw, &f1));

    let r = add(&gw, &admin, &kb, &f2).await;
    let v = assert_error(r, 400, DUPLICATE).await;
    assert_eq!(
        v["detail"],
        "Duplicate content detected. Please provide unique content to proceed."
    );
    assert_eq!(gw.app().vectors().collection_len(&kb), n);
    assert_eq!(kb_file_ids(&gw, &admin, &kb).await, vec![f1.clone()]);

    // The same file again: fine, and nothing doubles.
    let v = json_ok(add(&gw, &admin, &kb, &f1).await).await;
    assert_eq!(v["files"].as_array().unwrap().len(), 1);
    assert_eq!(gw.app().vectors().collection_len(&kb), n);
    assert_eq!(kb_file_ids(&gw, &admin, &kb).await, vec![f1.clone()]);

    // Other content is fine; the duplicate is fine in another collection.
    json_ok(add(&gw, &admin, &kb, &other).await).await;
    let kb2 = create_kb(&gw, &admin, "Elsewhere").await;
    json_ok(add(&gw, &admin, &kb2, &f2).await).await;
    assert_eq!(kb_file_ids(&gw, &admin, &kb).await.len(), 2);
}

// ---------------------------------------------------------------------------
// Removing, resetting, deleting
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_remove_keeps_or_deletes_the_file() {
    let gw = Setup::new()
        .env("CHUNK_SIZE", "200")
        .env("CHUNK_OVERLAP", "0")
        .start()
        .await;
    let admin = gw.admin().await;
    let keep = upload_done(&gw, &admin, "keep.txt", &paragraphs(3, "fans")).await;
    let gone = upload_done(&gw, &admin, "gone.txt", &paragraphs(2, "belts")).await;
    let kb = create_kb(&gw, &admin, "Parts").await;
    json_ok(add(&gw, &admin, &kb, &keep).await).await;
    json_ok(add(&gw, &admin, &kb, &gone).await).await;
    let app = gw.app();
    assert_eq!(app.vectors().collection_len(&kb), 5);

    let v = json_ok(remove(&gw, &admin, &kb, &keep, "?delete_file=false").await).await;
    let ids: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![gone.as_str()]);
    assert_eq!(app.vectors().collection_len(&kb), 2);
    assert_eq!(kb_file_ids(&gw, &admin, &kb).await, vec![gone.clone()]);
    // The file itself is intact.
    let f = get_json(&gw, &format!("/api/v1/files/{keep}"), &admin).await;
    assert_eq!(f["data"]["status"], "completed");
    assert_eq!(app.vectors().file_len(&keep), 3);
    assert_eq!(app.store().file_chunk_ids(&keep).unwrap().len(), 3);
    assert!(app.store().file_knowledge(&keep).unwrap().is_empty());
    // Removing it again: it is not in the collection any more.
    let r = remove(&gw, &admin, &kb, &keep, "?delete_file=false").await;
    assert_error(r, 400, "").await;

    // Default: the file is deleted too.
    let path = app.store().file(&gone).unwrap().unwrap().path;
    let v = json_ok(remove(&gw, &admin, &kb, &gone, "").await).await;
    assert_eq!(v["files"], json!([]));
    assert_eq!(app.vectors().collection_len(&kb), 0);
    assert_error(
        gw.get(&format!("/api/v1/files/{gone}"), Some(&admin)).await,
        404,
        NOT_FOUND,
    )
    .await;
    assert_eq!(app.vectors().file_len(&gone), 0);
    assert!(app.store().file_chunk_ids(&gone).unwrap().is_empty());
    assert!(!std::path::Path::new(&path).exists());

    // Re-adding the kept file restores its vectors.
    json_ok(add(&gw, &admin, &kb, &keep).await).await;
    assert_eq!(app.vectors().collection_len(&kb), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_and_delete() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let f1 = upload_done(&gw, &admin, "a.txt", "alpha content").await;
    let f2 = upload_done(&gw, &admin, "b.txt", "beta content").await;
    let kb = create_kb(&gw, &admin, "Temp").await;
    json_ok(add(&gw, &admin, &kb, &f1).await).await;
    json_ok(add(&gw, &admin, &kb, &f2).await).await;
    let app = gw.app();
    assert!(app.vectors().collection_len(&kb) >= 2);

    let v = json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/reset"),
            Some(&admin),
            json!({}),
        )
        .await,
    )
    .await;
    assert_eq!(v["id"], kb.as_str());
    assert_eq!(v["files"], json!([]));
    assert_eq!(app.vectors().collection_len(&kb), 0);
    assert!(kb_file_ids(&gw, &admin, &kb).await.is_empty());
    assert!(app.store().file_knowledge(&f1).unwrap().is_empty());
    // The files survive a reset.
    for f in [&f1, &f2] {
        let v = get_json(&gw, &format!("/api/v1/files/{f}"), &admin).await;
        assert_eq!(v["data"]["status"], "completed");
        assert!(app.vectors().file_len(f) > 0);
    }
    // And can be added again.
    json_ok(add(&gw, &admin, &kb, &f1).await).await;
    assert_eq!(app.vectors().collection_len(&kb), chunk_count(&gw, &f1));

    let r = gw
        .req(
            Method::DELETE,
            &format!("/api/v1/knowledge/{kb}/delete"),
            Some(&admin),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r).await, json!(true));
    assert_error(
        gw.get(&format!("/api/v1/knowledge/{kb}"), Some(&admin))
            .await,
        404,
        NOT_FOUND,
    )
    .await;
    assert_eq!(app.vectors().collection_len(&kb), 0);
    assert!(app.store().file_knowledge(&f1).unwrap().is_empty());
    let list = get_json(&gw, "/api/v1/knowledge/", &admin).await;
    assert_eq!(list["total"], 0);
    // The files are kept.
    get_json(&gw, &format!("/api/v1/files/{f1}"), &admin).await;
    let r = gw
        .req(
            Method::DELETE,
            &format!("/api/v1/knowledge/{kb}/delete"),
            Some(&admin),
        )
        .send()
        .await
        .unwrap();
    assert_error(r, 404, NOT_FOUND).await;
}

// ---------------------------------------------------------------------------
// Access control
// ---------------------------------------------------------------------------

/// Every route on `kb` as `token`: returns the statuses in the order GET, files, add,
/// remove, reset, delete, update.
async fn statuses(gw: &Gateway, token: &str, kb: &str, file: &str) -> Vec<(String, u16, Value)> {
    let mut out = Vec::new();
    let mut push = |name: &str, status: u16, body: Value| {
        out.push((name.to_string(), status, body));
    };
    let r = gw
        .get(&format!("/api/v1/knowledge/{kb}"), Some(token))
        .await;
    let s = r.status().as_u16();
    push("get", s, r.json().await.unwrap());
    let r = gw
        .get(&format!("/api/v1/knowledge/{kb}/files"), Some(token))
        .await;
    let s = r.status().as_u16();
    push("files", s, r.json().await.unwrap());
    let r = add(gw, token, kb, file).await;
    let s = r.status().as_u16();
    push("add", s, r.json().await.unwrap());
    let r = remove(gw, token, kb, file, "?delete_file=false").await;
    let s = r.status().as_u16();
    push("remove", s, r.json().await.unwrap());
    let r = gw
        .post(
            &format!("/api/v1/knowledge/{kb}/reset"),
            Some(token),
            json!({}),
        )
        .await;
    let s = r.status().as_u16();
    push("reset", s, r.json().await.unwrap());
    let r = gw
        .req(
            Method::DELETE,
            &format!("/api/v1/knowledge/{kb}/delete"),
            Some(token),
        )
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    push("delete", s, r.json().await.unwrap());
    let r = gw
        .post(
            &format!("/api/v1/knowledge/{kb}/update"),
            Some(token),
            json!({"name": "hijacked"}),
        )
        .await;
    let s = r.status().as_u16();
    push("update", s, r.json().await.unwrap());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_grants_control_reading_and_writing() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let a = gw.user(&admin, "a@example.com").await;
    let b = gw.user(&admin, "b@example.com").await;
    let c = gw.user(&admin, "c@example.com").await;
    let b_id = user_id(&gw, &b).await;

    let a_file = upload_done(&gw, &a, "a.txt", "A's private file.").await;
    let b_file = upload_done(&gw, &b, "b.txt", "B's own file.").await;
    let kb = create_kb(&gw, &a, "A private").await;
    json_ok(add(&gw, &a, &kb, &a_file).await).await;
    let app = gw.app();
    let n = app.vectors().collection_len(&kb);

    // Private: every route is a 404 for B, and nothing changes.
    for (name, status, body) in statuses(&gw, &b, &kb, &b_file).await {
        assert_eq!(status, 404, "{name}: {body}");
        assert_eq!(body["detail"], NOT_FOUND, "{name}");
    }
    let list = get_json(&gw, "/api/v1/knowledge/", &b).await;
    assert_eq!(list["total"], 0);
    assert_eq!(
        app.store().knowledge(&kb).unwrap().unwrap().name,
        "A private"
    );
    assert_eq!(
        app.store().knowledge_files(&kb).unwrap(),
        vec![a_file.clone()]
    );
    assert_eq!(app.vectors().collection_len(&kb), n);
    // B cannot read A's file either.
    assert_error(
        gw.get(&format!("/api/v1/files/{a_file}"), Some(&b)).await,
        404,
        NOT_FOUND,
    )
    .await;

    // B cannot add A's private file to B's own collection.
    let b_kb = create_kb(&gw, &b, "B's").await;
    let r = add(&gw, &b, &b_kb, &a_file).await;
    let v = assert_error(r, 400, "not found").await;
    assert!(!v["detail"].as_str().unwrap().contains("A's private"));
    assert!(app.store().knowledge_files(&b_kb).unwrap().is_empty());
    assert_eq!(app.vectors().collection_len(&b_kb), 0);

    // Read grant: B reads, writes are 400 (Open WebUI's status for write denials).
    let grant = |perms: &[&str]| {
        let grants: Vec<Value> = perms
            .iter()
            .map(|p| json!({"principal_type": "user", "principal_id": b_id, "permission": p}))
            .collect();
        json!({"name": "A private", "description": "d", "access_grants": grants})
    };
    json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/update"),
            Some(&a),
            grant(&["read"]),
        )
        .await,
    )
    .await;
    for (name, status, body) in statuses(&gw, &b, &kb, &b_file).await {
        match name.as_str() {
            "get" => {
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["write_access"], false);
            }
            "files" => {
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["total"], 1);
            }
            _ => {
                assert_eq!(status, 400, "{name}: {body}");
                assert!(
                    body["detail"]
                        .as_str()
                        .unwrap()
                        .starts_with(ACCESS_PROHIBITED),
                    "{name}: {body}"
                );
            }
        }
    }
    let list = get_json(&gw, "/api/v1/knowledge/", &b).await;
    assert_eq!(list["total"], 2, "B's own and A's shared collection");
    let shared = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == kb.as_str())
        .expect("shared collection listed");
    assert_eq!(shared["write_access"], false);
    assert_eq!(
        app.store().knowledge(&kb).unwrap().unwrap().name,
        "A private"
    );
    assert_eq!(
        app.store().knowledge_files(&kb).unwrap(),
        vec![a_file.clone()]
    );
    assert_eq!(app.vectors().collection_len(&kb), n);
    // Through the collection, B can now read A's file.
    let f = get_json(&gw, &format!("/api/v1/files/{a_file}"), &b).await;
    assert_eq!(f["data"]["content"], "A's private file.");
    // C still sees nothing.
    assert_error(
        gw.get(&format!("/api/v1/knowledge/{kb}"), Some(&c)).await,
        404,
        NOT_FOUND,
    )
    .await;

    // Read and write grants: B adds its own file.
    json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/update"),
            Some(&a),
            grant(&["read", "write"]),
        )
        .await,
    )
    .await;
    let v = json_ok(add(&gw, &b, &kb, &b_file).await).await;
    assert_eq!(v["write_access"], true);
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
    assert_eq!(
        app.vectors().collection_len(&kb),
        n + chunk_count(&gw, &b_file)
    );
    let got = get_json(&gw, &format!("/api/v1/knowledge/{kb}"), &b).await;
    assert_eq!(got["write_access"], true);
    // Removing its file without deleting it is fine; A's file cannot be deleted by B.
    json_ok(remove(&gw, &b, &kb, &b_file, "?delete_file=false").await).await;
    json_ok(remove(&gw, &b, &kb, &a_file, "").await).await;
    assert!(
        app.store().file(&a_file).unwrap().is_some(),
        "only the owner or an admin deletes the file"
    );
    json_ok(add(&gw, &a, &kb, &a_file).await).await;

    // Public read (`user:*`) needs an admin; then everyone sees it, nobody else writes.
    let public = json!({"name": "Public", "access_grants": [
        {"principal_type": "user", "principal_id": "*", "permission": "read"}]});
    assert_error(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/update"),
            Some(&a),
            public.clone(),
        )
        .await,
        403,
        "Only an admin",
    )
    .await;
    json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/update"),
            Some(&admin),
            public,
        )
        .await,
    )
    .await;
    for token in [&b, &c] {
        let v = get_json(&gw, &format!("/api/v1/knowledge/{kb}"), token).await;
        assert_eq!(v["name"], "Public");
        assert_eq!(v["write_access"], false);
        let list = get_json(&gw, "/api/v1/knowledge/", token).await;
        assert!(
            list["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["id"] == kb.as_str())
        );
    }
    let c_file = upload_done(&gw, &c, "c.txt", "C's file.").await;
    assert_error(add(&gw, &c, &kb, &c_file).await, 400, ACCESS_PROHIBITED).await;

    // The admin can do everything on a private collection.
    json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/update"),
            Some(&a),
            json!({"name": "Private again", "access_grants": []}),
        )
        .await,
    )
    .await;
    let v = get_json(&gw, &format!("/api/v1/knowledge/{kb}"), &admin).await;
    assert_eq!(v["write_access"], true);
    let list = get_json(&gw, "/api/v1/knowledge/", &admin).await;
    assert_eq!(list["total"], 2, "admin lists every collection");
    get_json(&gw, &format!("/api/v1/knowledge/{kb}/files"), &admin).await;
    json_ok(add(&gw, &admin, &kb, &c_file).await).await;
    json_ok(remove(&gw, &admin, &kb, &c_file, "?delete_file=false").await).await;
    json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/update"),
            Some(&admin),
            json!({"name": "Renamed by admin"}),
        )
        .await,
    )
    .await;
    json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/reset"),
            Some(&admin),
            json!({}),
        )
        .await,
    )
    .await;
    let r = gw
        .req(
            Method::DELETE,
            &format!("/api/v1/knowledge/{kb}/delete"),
            Some(&admin),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r).await, json!(true));
}

/// Open WebUI checks `write` on its own ("grant both when both are intended"), so a
/// write-only grant must be enough for the write routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_only_grant_allows_writes() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let a = gw.user(&admin, "a@example.com").await;
    let b = gw.user(&admin, "b@example.com").await;
    let b_id = user_id(&gw, &b).await;
    let b_file = upload_done(&gw, &b, "b.txt", "B writes here.").await;
    let kb = create(
        &gw,
        &a,
        json!({"name": "Drop box", "access_grants": [
            {"principal_type": "user", "principal_id": b_id, "permission": "write"}]}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = add(&gw, &b, &kb, &b_file).await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "file/add with a write grant: {body}");
    assert_eq!(
        gw.app().store().knowledge_files(&kb).unwrap(),
        vec![b_file.clone()]
    );
}

// ---------------------------------------------------------------------------
// Pagination
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_is_paginated_by_30() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "u@example.com").await;
    for i in 0..35 {
        create_kb(&gw, &user, &format!("kb-{i:02}")).await;
    }
    let p1 = get_json(&gw, "/api/v1/knowledge/", &user).await;
    let p1b = get_json(&gw, "/api/v1/knowledge/?page=1", &user).await;
    let p2 = get_json(&gw, "/api/v1/knowledge/?page=2", &user).await;
    let p3 = get_json(&gw, "/api/v1/knowledge/?page=3", &user).await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 30);
    assert_eq!(p1["items"], p1b["items"]);
    assert_eq!(p2["items"].as_array().unwrap().len(), 5);
    assert_eq!(p3["items"], json!([]));
    for p in [&p1, &p2, &p3] {
        assert_eq!(p["total"], 35);
    }
    // Pages do not overlap and cover everything.
    let mut names: Vec<String> = p1["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(p2["items"].as_array().unwrap())
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 35);
    let r = gw.get("/api/v1/knowledge/?page=0", Some(&user)).await;
    assert_eq!(r.status(), 422);
    // Another user sees none of them.
    let other = gw.user(&admin, "o@example.com").await;
    let v = get_json(&gw, "/api/v1/knowledge/", &other).await;
    assert_eq!(v["total"], 0);
}
