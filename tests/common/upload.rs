//! Uploading files through the HTTP API (reqwest here has no multipart feature).

use serde_json::Value;

use super::gateway::Gateway;

pub const BOUNDARY: &str = "ragway-test-boundary-7MA4YWxkTrZu0gW";

/// One part of a multipart/form-data body.
#[derive(Clone, Copy)]
pub struct Part<'a> {
    pub name: &'a str,
    pub filename: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub bytes: &'a [u8],
}

/// A multipart/form-data body (RFC 7578) with [`BOUNDARY`].
pub fn multipart(parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for p in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{}\"", p.name);
        if let Some(f) = p.filename {
            disposition.push_str(&format!("; filename=\"{f}\""));
        }
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"\r\n");
        if let Some(ct) = p.content_type {
            body.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(p.bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// The body of an upload: field `file`, and `metadata` when given.
pub fn file_body(
    filename: &str,
    content_type: &str,
    bytes: &[u8],
    metadata: Option<&str>,
) -> Vec<u8> {
    let mut parts = vec![Part {
        name: "file",
        filename: Some(filename),
        content_type: Some(content_type),
        bytes,
    }];
    if let Some(m) = metadata {
        parts.push(Part {
            name: "metadata",
            filename: None,
            content_type: None,
            bytes: m.as_bytes(),
        });
    }
    multipart(&parts)
}

/// A text upload body and its content-type header.
fn text_upload(filename: &str, text: &str) -> (String, Vec<u8>) {
    (
        format!("multipart/form-data; boundary={BOUNDARY}"),
        file_body(filename, "text/plain", text.as_bytes(), None),
    )
}

/// Uploads and processes a text file synchronously; returns the file JSON.
pub async fn upload_text(gw: &Gateway, token: &str, name: &str, text: &str) -> Value {
    let (ct, body) = text_upload(name, text);
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

/// Uploads a text file to the gateway at `url` for background processing (a child process or
/// another replica, where there is no [`Gateway`]); returns its id.
pub async fn upload_background(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    name: &str,
    text: &str,
) -> String {
    let r = client
        .post(format!("{url}/api/v1/files/"))
        .bearer_auth(token)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(file_body(name, "text/plain", text.as_bytes(), None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "upload {name}");
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}
