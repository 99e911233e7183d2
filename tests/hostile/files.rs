//! `/api/v1/files/*`: malformed and oversized multipart uploads, hostile file names, ids and
//! query parameters.

use std::time::Duration;

use reqwest::{Method, Response};
use serde_json::Value;

use super::common::gateway::{Gateway, Setup};
use super::common::raw::chunked_upload;
use super::common::upload::{BOUNDARY, Part, file_body, multipart};
use super::support;

fn multipart_ct() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

async fn post_upload(gw: &Gateway, token: &str, query: &str, ct: &str, body: Vec<u8>) -> Response {
    gw.req(Method::POST, &format!("/api/v1/files/{query}"), Some(token))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Names left in the upload dir (finished blobs and temporary files).
fn uploads(gw: &Gateway) -> Vec<String> {
    match std::fs::read_dir(gw.dir.path().join("uploads")) {
        Ok(d) => d
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A gateway with a 1 MB file limit, and its admin token.
async fn gateway() -> (Gateway, String) {
    let gw = Setup::new()
        .toml("[rag]\nfile-max-size-mb = 1")
        .start()
        .await;
    let admin = gw.admin().await;
    (gw, admin)
}

fn file_head(filename: &str) -> Vec<u8> {
    format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: text/plain\r\n\r\n"
    )
    .into_bytes()
}

/// Asserts a 400 for an upload with content type `ct` and `body`, and that nothing stayed.
async fn refused_400(ct: &str, body: Vec<u8>) {
    let (gw, admin) = gateway().await;
    let r = post_upload(&gw, &admin, "", ct, body).await;
    support::clear_error(r, 400).await;
    assert!(
        uploads(&gw).is_empty(),
        "nothing stored: {:?}",
        uploads(&gw)
    );
    assert!(gw.app().store().files().unwrap().is_empty());
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_without_boundary_is_400() {
    refused_400(
        "multipart/form-data",
        file_body("a.txt", "text/plain", b"hello", None),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_that_is_not_multipart_is_400() {
    refused_400("application/json", b"{\"file\":1}".to_vec()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_multipart_is_400() {
    // The body stops inside the file, with no closing boundary.
    let body = file_body("a.txt", "text/plain", b"hello", None);
    let cut = body[..body.len() - BOUNDARY.len() - 10].to_vec();
    refused_400(&multipart_ct(), cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unterminated_part_headers_are_400() {
    let unterminated = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
    );
    refused_400(&multipart_ct(), unterminated.into_bytes()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_without_a_file_field_is_400() {
    let only_meta = multipart(&[Part {
        name: "metadata",
        filename: None,
        content_type: None,
        bytes: b"{}",
    }]);
    refused_400(&multipart_ct(), only_meta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_file_fields_are_refused() {
    let (gw, admin) = gateway().await;
    let part = Part {
        name: "file",
        filename: Some("a.txt"),
        content_type: Some("text/plain"),
        bytes: b"first",
    };
    let body = multipart(&[
        part,
        Part {
            bytes: b"second",
            ..part
        },
    ]);
    let v = support::clear_error(
        post_upload(&gw, &admin, "", &multipart_ct(), body).await,
        400,
    )
    .await;
    assert!(v["detail"].as_str().unwrap().contains("one file"), "{v}");
    assert!(
        uploads(&gw).is_empty(),
        "temp file removed: {:?}",
        uploads(&gw)
    );
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_part_headers_are_413() {
    let (gw, admin) = gateway().await;
    let long = "x".repeat(64 * 1024);
    let body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
         X-Padding: {long}\r\n\r\nhello\r\n--{BOUNDARY}--\r\n"
    );
    let r = post_upload(&gw, &admin, "", &multipart_ct(), body.into_bytes()).await;
    let v = support::clear_error(r, 413).await;
    assert!(v["detail"].as_str().unwrap().contains("header"), "{v}");
    // The same without Content-Length: the limit holds while streaming.
    let mut head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nX-Padding: "
    )
    .into_bytes();
    head.extend_from_slice(b"y");
    let (status, body) = chunked_upload(&gw.url, &admin, &head, 4 * 1024 * 1024).await;
    assert_eq!(status, 413, "{body}");
    // A preamble before the first boundary is bounded too.
    let mut pre = vec![b'p'; 64 * 1024];
    pre.extend_from_slice(&file_body("a.txt", "text/plain", b"hi", None));
    let r = post_upload(&gw, &admin, "", &multipart_ct(), pre).await;
    support::clear_error(r, 413).await;
    assert!(uploads(&gw).is_empty(), "{:?}", uploads(&gw));
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_is_413() {
    let (gw, admin) = gateway().await;
    // 100 KiB of metadata: over the 64 KiB limit.
    let big = format!("{{\"k\":\"{}\"}}", "m".repeat(100 * 1024));
    let body = file_body("a.txt", "text/plain", b"hello", Some(&big));
    let v = support::clear_error(
        post_upload(&gw, &admin, "", &multipart_ct(), body).await,
        413,
    )
    .await;
    assert!(v["detail"].as_str().unwrap().contains("metadata"), "{v}");
    // Chunked, metadata first, 8 MiB long: stopped while streaming.
    let head = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n");
    let (status, body) = chunked_upload(&gw.url, &admin, head.as_bytes(), 8 * 1024 * 1024).await;
    assert_eq!(status, 413, "{body}");
    assert!(uploads(&gw).is_empty(), "{:?}", uploads(&gw));
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_that_is_not_a_json_object_is_400() {
    let (gw, admin) = gateway().await;
    // Not JSON, and JSON that is not an object.
    for bad in ["not json", "[1,2,3]", "\"text\"", "42"] {
        let body = file_body("a.txt", "text/plain", b"hello", Some(bad));
        let v = support::clear_error(
            post_upload(&gw, &admin, "", &multipart_ct(), body).await,
            400,
        )
        .await;
        assert_eq!(v["detail"], "Invalid metadata format", "{bad}");
    }
    // Twice.
    let meta = Part {
        name: "metadata",
        filename: None,
        content_type: None,
        bytes: b"{}",
    };
    let file = Part {
        name: "file",
        filename: Some("a.txt"),
        content_type: Some("text/plain"),
        bytes: b"hello",
    };
    let body = multipart(&[meta, file, meta]);
    support::clear_error(
        post_upload(&gw, &admin, "", &multipart_ct(), body).await,
        400,
    )
    .await;
    assert!(uploads(&gw).is_empty(), "{:?}", uploads(&gw));
    assert!(gw.app().store().files().unwrap().is_empty());
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_file_is_413_with_and_without_content_length() {
    let (gw, admin) = gateway().await;
    let big = vec![b'z'; 3 * 1024 * 1024];
    let body = file_body("big.txt", "text/plain", &big, None);
    let v = support::clear_error(
        post_upload(&gw, &admin, "", &multipart_ct(), body).await,
        413,
    )
    .await;
    assert!(
        v["detail"].as_str().unwrap().contains("less than 1 MB"),
        "{v}"
    );
    // Chunked: nothing announces the size; the file field is stopped at the limit.
    let (status, body) =
        chunked_upload(&gw.url, &admin, &file_head("big.txt"), 3 * 1024 * 1024).await;
    assert_eq!(status, 413, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["detail"].as_str().unwrap().contains("less than 1 MB"),
        "{v}"
    );
    // A declared length far past the limit is refused before anything is read.
    let r = gw
        .req(Method::POST, "/api/v1/files/", Some(&admin))
        .header("content-type", multipart_ct())
        .body(vec![0u8; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    support::clear_error(r, 413).await;
    assert!(
        uploads(&gw).is_empty(),
        "temp files removed: {:?}",
        uploads(&gw)
    );
    assert!(gw.app().store().files().unwrap().is_empty());
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_small_and_few() {
    let (gw, admin) = gateway().await;
    let file = Part {
        name: "file",
        filename: Some("a.txt"),
        content_type: Some("text/plain"),
        bytes: b"hello world",
    };
    let junk = vec![b'j'; 8 * 1024];
    let extra = Part {
        name: "comment",
        filename: None,
        content_type: None,
        bytes: &junk,
    };
    let body = multipart(&[extra, file]);
    let v = support::clear_error(
        post_upload(&gw, &admin, "", &multipart_ct(), body).await,
        413,
    )
    .await;
    assert!(v["detail"].as_str().unwrap().contains("comment"), "{v}");
    // Many tiny fields.
    let tiny = Part {
        name: "x",
        filename: None,
        content_type: None,
        bytes: b"1",
    };
    let mut parts = vec![tiny; 40];
    parts.push(file);
    let v = support::clear_error(
        post_upload(&gw, &admin, "", &multipart_ct(), multipart(&parts)).await,
        400,
    )
    .await;
    assert!(v["detail"].as_str().unwrap().contains("Too many"), "{v}");
    // A small unknown field is ignored, as Open WebUI's form parser does.
    let small = Part {
        name: "note",
        filename: None,
        content_type: None,
        bytes: b"fine",
    };
    let r = post_upload(&gw, &admin, "", &multipart_ct(), multipart(&[small, file])).await;
    assert_eq!(r.status(), 200);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_names_with_control_characters_are_400() {
    let (gw, admin) = gateway().await;
    for name in ["a\u{0}b.txt", "a\u{1b}[31mred.txt", "line\u{7f}.txt"] {
        let body = file_body(name, "text/plain", b"hello", None);
        support::clear_error(
            post_upload(&gw, &admin, "", &multipart_ct(), body).await,
            400,
        )
        .await;
    }
    assert!(uploads(&gw).is_empty(), "{:?}", uploads(&gw));
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_kilobyte_file_name_is_400() {
    let (gw, admin) = gateway().await;
    let long = format!("{}.txt", "n".repeat(10 * 1024));
    let body = file_body(&long, "text/plain", b"hello", None);
    let v = support::clear_error(
        post_upload(&gw, &admin, "", &multipart_ct(), body).await,
        400,
    )
    .await;
    assert!(v["detail"].as_str().unwrap().contains("longer"), "{v}");
    assert!(uploads(&gw).is_empty(), "{:?}", uploads(&gw));
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_in_file_name_stays_in_the_upload_dir() {
    let (gw, admin) = gateway().await;
    // Only the last component is kept, and the blob stays in the upload dir.
    let body = file_body("../../etc/evil.txt", "text/plain", b"hello", None);
    let r = post_upload(&gw, &admin, "?process=false", &multipart_ct(), body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["filename"], "evil.txt");
    let path = v["path"].as_str().unwrap();
    assert!(
        path.starts_with("uploads/") && !path.contains(".."),
        "{path}"
    );
    assert!(
        !path.contains(&*gw.dir.path().to_string_lossy()),
        "no server path: {path}"
    );
    assert!(gw.dir.path().join(path).exists());
    assert!(!gw.dir.path().join("etc").exists());
    let body = file_body("..\\..\\win.txt", "text/plain", b"hello", None);
    let r = post_upload(&gw, &admin, "?process=false", &multipart_ct(), body).await;
    assert_eq!(r.json::<Value>().await.unwrap()["filename"], "win.txt");
    // A name that is only dots.
    let body = file_body("..", "text/plain", b"hello", None);
    let r = post_upload(&gw, &admin, "?process=false", &multipart_ct(), body).await;
    assert_eq!(r.json::<Value>().await.unwrap()["filename"], "file");
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_file_fails_processing_with_a_reason() {
    let (gw, admin) = gateway().await;
    let body = file_body("empty.txt", "text/plain", b"", None);
    let r = post_upload(
        &gw,
        &admin,
        "?process_in_background=false",
        &multipart_ct(),
        body,
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"]["status"], "failed", "{v}");
    assert!(
        v["data"]["error"].as_str().unwrap().contains("empty"),
        "{v}"
    );
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_ids_on_every_file_route_are_404() {
    let (gw, admin) = gateway().await;
    let long = "a".repeat(4096);
    let ids = [
        "..%2Fx",
        "..%2F..%2Fetc%2Fpasswd",
        long.as_str(),
        "%C3%A9t%C3%A9",
        "%00",
        "x%20y",
    ];
    for id in ids {
        for (method, path) in [
            (Method::GET, format!("/api/v1/files/{id}")),
            (Method::GET, format!("/api/v1/files/{id}/process/status")),
            (
                Method::GET,
                format!("/api/v1/files/{id}/process/status?stream=true"),
            ),
            (Method::GET, format!("/api/v1/files/{id}/data/content")),
            (Method::GET, format!("/api/v1/files/{id}/content")),
            (Method::DELETE, format!("/api/v1/files/{id}")),
        ] {
            let r = gw
                .req(method.clone(), &path, Some(&admin))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            assert!(status == 404 || status == 400, "{method} {path}: {status}");
            support::clear_error(r, status).await;
        }
    }
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_page_and_flags_are_422() {
    let (gw, admin) = gateway().await;
    for q in [
        "page=0",
        "page=-1",
        "page=99999999999999999999",
        "page=abc",
        "content=maybe",
    ] {
        let r = gw.get(&format!("/api/v1/files/?{q}"), Some(&admin)).await;
        support::clear_error(r, 422).await;
    }
    // The largest page number is simply past the end.
    let r = gw
        .get(&format!("/api/v1/files/?page={}", usize::MAX), Some(&admin))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["items"],
        serde_json::json!([])
    );
    let body = file_body("a.txt", "text/plain", b"hello", None);
    for q in ["?process=maybe", "?process_in_background=2"] {
        let r = post_upload(&gw, &admin, q, &multipart_ct(), body.clone()).await;
        support::clear_error(r, 422).await;
    }
    let r = post_upload(&gw, &admin, "?process=false", &multipart_ct(), body).await;
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = gw
        .get(
            &format!("/api/v1/files/{id}/process/status?stream=sometimes"),
            Some(&admin),
        )
        .await;
    support::clear_error(r, 422).await;
    assert!(uploads(&gw).len() == 1, "{:?}", uploads(&gw));
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_uploads_beyond_the_queue_get_503() {
    let gw = Setup::new().toml("[rag]\ninline-queue = 1").start().await;
    let admin = gw.admin().await;
    let body = file_body("a.txt", "text/plain", b"hello inline", None);
    // Hold the only place, as a slow inline upload would.
    let held = gw.app().ingest.inline_ticket().expect("a free place");
    assert!(gw.app().ingest.inline_ticket().is_none(), "bounded");
    let r = post_upload(
        &gw,
        &admin,
        "?process_in_background=false",
        &multipart_ct(),
        body.clone(),
    )
    .await;
    let v = support::clear_error(r, 503).await;
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("process_in_background"),
        "{v}"
    );
    assert!(
        uploads(&gw).is_empty(),
        "refused before storing: {:?}",
        uploads(&gw)
    );
    // Background uploads are not affected.
    let r = post_upload(&gw, &admin, "", &multipart_ct(), body.clone()).await;
    assert_eq!(r.status(), 200);
    drop(held);
    let r = post_upload(
        &gw,
        &admin,
        "?process_in_background=false",
        &multipart_ct(),
        body,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["data"]["status"],
        "completed"
    );
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_stream_of_an_unprocessed_file_ends() {
    let (gw, admin) = gateway().await;
    let body = file_body("a.txt", "text/plain", b"never processed", None);
    let r = post_upload(&gw, &admin, "?process=false", &multipart_ct(), body).await;
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = gw
        .get(
            &format!("/api/v1/files/{id}/process/status?stream=true"),
            Some(&admin),
        )
        .await;
    assert_eq!(r.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(60), r.text())
        .await
        .expect("the stream ends")
        .unwrap();
    let last: Value = serde_json::from_str(
        text.trim()
            .lines()
            .last()
            .unwrap()
            .strip_prefix("data: ")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["final"], true, "{text}");
    assert!(
        last["reason"].as_str().unwrap().contains("process=false"),
        "{last}"
    );
    // A pending record that nothing will ever process (not queued, not running) ends too.
    let app = gw.app();
    let mut f = app.store().file(&id).unwrap().unwrap();
    f.status = Some(ragway::store::FileStatus::Pending);
    app.store().update_file(&f).unwrap();
    let r = gw
        .get(
            &format!("/api/v1/files/{id}/process/status?stream=true"),
            Some(&admin),
        )
        .await;
    let text = tokio::time::timeout(Duration::from_secs(60), r.text())
        .await
        .expect("the stream ends")
        .unwrap();
    assert!(text.contains("neither queued"), "{text}");
    support::alive(&gw).await;
}
