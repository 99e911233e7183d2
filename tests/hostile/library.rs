//! The library's collection changes under attack: removing files that are not members,
//! adding ids that name paths or other users' files, and sneaking a duplicate in under a
//! new id. Each refusal leaves the collection, its files and their blobs as they were.

use serde_json::{Value, json};

use super::common::gateway::{Gateway, Setup};
use super::common::upload::{collection, upload_text};
use super::support::{alive, clear_error};

async fn files_of(gw: &Gateway, token: &str, kb: &str) -> Vec<String> {
    let r = gw
        .get(&format!("/api/v1/knowledge/{kb}/files"), Some(token))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect()
}

fn blobs(gw: &Gateway) -> Vec<String> {
    // No upload yet: no uploads dir either.
    let Ok(dir) = std::fs::read_dir(gw.dir.path().join("uploads")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `file/remove` with ids that are not members (another collection's file, a path, the
/// database's name) with `delete_file=true`: a 400 naming the id, and nothing is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_files_that_are_not_members() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let inside = upload_text(&gw, &admin, "in.txt", "Member text.").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let outside = upload_text(&gw, &admin, "out.txt", "Other text.").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let kb = collection(&gw, &admin, "Docs", &[&inside]).await;
    let before = blobs(&gw);
    for id in [outside.as_str(), "../ragway.redb", "../../etc/passwd", "*"] {
        let r = gw
            .post(
                &format!("/api/v1/knowledge/{kb}/file/remove?delete_file=true"),
                Some(&admin),
                json!({"file_id": id}),
            )
            .await;
        let v = clear_error(r, 400).await;
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("not in this collection"),
            "{v}"
        );
    }
    assert_eq!(files_of(&gw, &admin, &kb).await, [inside]);
    let r = gw
        .get(&format!("/api/v1/files/{outside}"), Some(&admin))
        .await;
    assert_eq!(r.status(), 200, "the non-member file was not deleted");
    assert_eq!(blobs(&gw), before, "no blob removed");
    alive(&gw).await;
}

/// `file/add` with ids that name paths: a clear 400, no membership, no file created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_path_like_ids() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let kb = collection(&gw, &admin, "Docs", &[]).await;
    let before = blobs(&gw);
    for id in ["../ragway.redb", "uploads/x", "..", "%2e%2e%2fsecret"] {
        let r = gw
            .post(
                &format!("/api/v1/knowledge/{kb}/file/add"),
                Some(&admin),
                json!({"file_id": id}),
            )
            .await;
        let v = clear_error(r, 400).await;
        assert!(v["detail"].as_str().unwrap().contains("not found"), "{v}");
    }
    assert!(files_of(&gw, &admin, &kb).await.is_empty());
    assert_eq!(blobs(&gw), before);
    alive(&gw).await;
}

/// The same content uploaded again under a new name and added to the collection holding
/// the first copy: Open WebUI's duplicate error, and the collection keeps one copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_content_under_a_new_id() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let text = "The same words, uploaded twice to pad search results.";
    let first = upload_text(&gw, &admin, "a.txt", text).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let second = upload_text(&gw, &admin, "b.txt", text).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let kb = collection(&gw, &admin, "Docs", &[&first]).await;
    let r = gw
        .post(
            &format!("/api/v1/knowledge/{kb}/file/add"),
            Some(&admin),
            json!({"file_id": second}),
        )
        .await;
    let v = clear_error(r, 400).await;
    assert!(
        v["detail"].as_str().unwrap().contains("Duplicate content"),
        "{v}"
    );
    assert_eq!(files_of(&gw, &admin, &kb).await, [first]);
    alive(&gw).await;
}
