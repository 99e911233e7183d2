//! A failing store surfaces as a server error (503 while the store is released, as in an
//! upgrade's hand-over), never as a 404 telling the client a file or collection is gone,
//! and never as an empty or owner-less answer.

mod common;

use common::gateway::{Setup, assert_error};
use common::upload::{BOUNDARY, file_body};
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_is_a_server_error_not_a_404() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    let key = gw.key(&alice).await;

    let r = gw
        .req(Method::POST, "/api/v1/files/?process=false", Some(&key))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(file_body("a.txt", "text/plain", b"hello", None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let file: Value = r.json().await.unwrap();
    let file_id = file["id"].as_str().unwrap().to_string();
    let r = gw
        .post(
            "/api/v1/knowledge/create",
            Some(&key),
            json!({"name": "kb", "description": "d"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let kb: Value = r.json().await.unwrap();
    let kb_id = kb["id"].as_str().unwrap().to_string();

    gw.app().store().release();
    for path in [
        format!("/api/v1/files/{file_id}"),
        format!("/api/v1/files/{file_id}/data/content"),
        "/api/v1/files/?content=true".to_string(),
        format!("/api/v1/knowledge/{kb_id}"),
        format!("/api/v1/knowledge/{kb_id}/files"),
        "/api/v1/knowledge/".to_string(),
    ] {
        let r = gw.get(&path, Some(&key)).await;
        assert_eq!(r.status(), 503, "{path}");
        assert_error(r, 503, "restarting").await;
    }
    let r = gw
        .post(
            "/api/v1/retrieval/query/doc",
            Some(&key),
            json!({"collection_name": kb_id, "query": "hello"}),
        )
        .await;
    assert_error(r, 503, "restarting").await;
}
