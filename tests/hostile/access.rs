//! Escalation through grants: a user who may only read (or write) a collection must not
//! delete, move or re-share its owner's files, nor change who can see it.

use serde_json::{Value, json};

use super::common::gateway::{Gateway, Setup};
use super::common::upload::upload_text;
use super::support::{alive, clear_error};

async fn json_ok(r: reqwest::Response) -> Value {
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn user_id(gw: &Gateway, token: &str) -> String {
    json_ok(gw.get("/api/v1/auths/", Some(token)).await).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn create_kb(gw: &Gateway, token: &str, body: Value) -> reqwest::Response {
    gw.post("/api/v1/knowledge/create", Some(token), body).await
}

fn grant(id: &str, permission: &str) -> Value {
    json!({"principal_type": "user", "principal_id": id, "permission": permission})
}

struct World {
    gw: Gateway,
    admin: String,
    /// Owner of `kb` and `file`.
    a: String,
    /// Has read and write grants on `kb`.
    b: String,
    b_id: String,
    kb: String,
    file: String,
}

async fn world() -> World {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let a = gw.user(&admin, "a@example.com").await;
    let b = gw.user(&admin, "b@example.com").await;
    let b_id = user_id(&gw, &b).await;
    let file = upload_text(&gw, &a, "a.txt", "A's confidential text.").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let kb = json_ok(
        create_kb(
            &gw,
            &a,
            json!({"name": "A's", "access_grants": [grant(&b_id, "read"), grant(&b_id, "write")]}),
        )
        .await,
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/file/add"),
            Some(&a),
            json!({"file_id": file}),
        )
        .await,
    )
    .await;
    World {
        gw,
        admin,
        a,
        b,
        b_id,
        kb,
        file,
    }
}

/// Write access to a collection holding A's file does not let B delete the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_writer_cannot_delete_owners_file() {
    let w = world().await;
    let r =
        w.gw.req(
            reqwest::Method::DELETE,
            &format!("/api/v1/files/{}", w.file),
            Some(&w.b),
        )
        .send()
        .await
        .unwrap();
    clear_error(r, 403).await;
    let rec =
        w.gw.app()
            .store()
            .file(&w.file)
            .unwrap()
            .expect("file kept");
    assert!(std::path::Path::new(&rec.path).exists(), "blob kept");
    // B can still read it through the collection.
    json_ok(
        w.gw.get(&format!("/api/v1/files/{}", w.file), Some(&w.b))
            .await,
    )
    .await;
    alive(&w.gw).await;
}

/// A reader cannot move the owner's file into a collection of their own choosing (from
/// where they could delete or re-share it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_cannot_add_owners_file_to_own_collection() {
    let w = world().await;
    let own = json_ok(create_kb(&w.gw, &w.b, json!({"name": "B's"})).await).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r =
        w.gw.post(
            &format!("/api/v1/knowledge/{own}/file/add"),
            Some(&w.b),
            json!({"file_id": w.file}),
        )
        .await;
    let v = clear_error(r, 403).await;
    assert!(v["detail"].as_str().unwrap().contains("owner"), "{v}");
    assert!(w.gw.app().store().knowledge_files(&own).unwrap().is_empty());
    alive(&w.gw).await;
}

/// Only an admin makes a collection public; only the owner or an admin changes grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharing_is_the_owners_and_public_is_the_admins() {
    let w = world().await;
    let public = json!([{"principal_type": "user", "principal_id": "*", "permission": "read"}]);
    // A user cannot create a public collection…
    let v = clear_error(
        create_kb(&w.gw, &w.a, json!({"name": "P", "access_grants": public})).await,
        403,
    )
    .await;
    assert!(v["detail"].as_str().unwrap().contains("admin"), "{v}");
    // …nor make their own collection public…
    let path = format!("/api/v1/knowledge/{}/update", w.kb);
    let upd = |token: String, grants: Value| {
        let (gw, path) = (&w.gw, path.clone());
        async move {
            gw.post(
                &path,
                Some(&token),
                json!({"name": "A's", "access_grants": grants}),
            )
            .await
        }
    };
    clear_error(upd(w.a.clone(), public.clone()).await, 403).await;
    // …and a write grantee changes nobody's access, not even to widen their own.
    clear_error(
        upd(w.b.clone(), json!([grant(&w.b_id, "write")])).await,
        403,
    )
    .await;
    clear_error(upd(w.b.clone(), json!([])).await, 403).await;
    clear_error(upd(w.b.clone(), public.clone()).await, 403).await;
    let kb = w.gw.app().store().knowledge(&w.kb).unwrap().unwrap();
    assert_eq!(kb.access_grants.len(), 2, "grants unchanged");
    // Sending the same grants back (a rename) is not a sharing change.
    json_ok(
        upd(
            w.b.clone(),
            json!([grant(&w.b_id, "read"), grant(&w.b_id, "write")]),
        )
        .await,
    )
    .await;
    // The admin may.
    json_ok(upd(w.admin.clone(), public).await).await;
    alive(&w.gw).await;
}

/// Oversized collection fields are refused before they are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_collection_fields() {
    let w = world().await;
    let grants: Vec<Value> = (0..300).map(|i| grant(&format!("u{i}"), "read")).collect();
    let cases = [
        json!({"name": "x".repeat(600)}),
        json!({"name": "ok", "description": "d".repeat(70 * 1024)}),
        json!({"name": "ok", "access_grants": grants}),
        json!({"name": "ok", "access_grants": [grant(&"i".repeat(200), "read")]}),
        json!({"name": "ok", "access_grants": [grant("x", "admin")]}),
        json!({"name": "ok", "access_grants": [{"principal_type": "role", "principal_id": "x", "permission": "read"}]}),
        json!({"name": "   "}),
        json!({"name": 5}),
        json!({"description": "no name"}),
    ];
    for body in cases {
        let r = create_kb(&w.gw, &w.a, body.clone()).await;
        let status = r.status().as_u16();
        assert!(status == 400 || status == 422, "{body}: {status}");
        clear_error(r, status).await;
    }
    alive(&w.gw).await;
}

/// Ids that try to escape: always a JSON 404, never a file outside the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_and_odd_ids_on_knowledge_routes() {
    let w = world().await;
    for id in [
        "..%2F..%2Fetc%2Fpasswd",
        "x%00y",
        "%C3%A9t%C3%A9",
        &"a".repeat(4000),
    ] {
        for path in [
            format!("/api/v1/knowledge/{id}"),
            format!("/api/v1/knowledge/{id}/files"),
        ] {
            clear_error(w.gw.get(&path, Some(&w.b)).await, 404).await;
        }
        let r =
            w.gw.post(
                &format!("/api/v1/knowledge/{}/file/add", w.kb),
                Some(&w.a),
                json!({"file_id": id}),
            )
            .await;
        clear_error(r, 400).await;
    }
    alive(&w.gw).await;
}
