//! Uploading files through the HTTP API (reqwest here has no multipart feature).

use serde_json::Value;

use super::gateway::Gateway;

/// A multipart/form-data body with field `file` (and `metadata` when given).
pub fn multipart(
    filename: &str,
    content_type: &str,
    bytes: &[u8],
    metadata: Option<&str>,
) -> (String, Vec<u8>) {
    let boundary = "ragway-test-boundary-7f3a";
    let mut body = Vec::new();
    if let Some(m) = metadata {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{m}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Uploads and processes a text file synchronously; returns the file JSON.
pub async fn upload_text(gw: &Gateway, token: &str, name: &str, text: &str) -> Value {
    let (ct, body) = multipart(name, "text/plain", text.as_bytes(), None);
    let r = gw
        .req(
            reqwest::Method::POST,
            "/api/v1/files/?process_in_background=false",
            Some(token),
        )
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "upload {name}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"]["status"], "completed", "{v}");
    v
}

/// Creates a collection holding `files`; returns its id.
pub async fn collection(gw: &Gateway, token: &str, name: &str, files: &[&str]) -> String {
    let r = gw
        .post(
            "/api/v1/knowledge/create",
            Some(token),
            serde_json::json!({"name": name, "description": ""}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for f in files {
        let r = gw
            .post(
                &format!("/api/v1/knowledge/{id}/file/add"),
                Some(token),
                serde_json::json!({"file_id": f}),
            )
            .await;
        assert_eq!(r.status(), 200, "add {f}");
    }
    id
}
