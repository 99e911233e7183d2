//! `/api/v1/files/*`: uploads (multipart built by hand), every supported file type,
//! failures, limits, listing and isolation, deletion everywhere, real ONNX retrieval, and
//! consistency across a clean restart and a `kill -9`.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fake::{FakeUpstream, http_client};
use common::gateway::{Gateway, Setup, assert_error, free_port};
use common::upload::{BOUNDARY, Part, file_body, multipart};
use ragway::store::{FileStatus, Store};
use reqwest::{Method, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const NOT_FOUND: &str = "We could not find what you're looking for :/";
/// Upper bound for any wait on processing (slow embeddings pause 1.5 s per batch).
const PROCESS_LIMIT: Duration = Duration::from_secs(60);

/// POSTs a raw multipart body to `/api/v1/files/{query}`.
async fn send_upload(gw: &Gateway, token: &str, query: &str, body: Vec<u8>) -> Response {
    gw.req(Method::POST, &format!("/api/v1/files/{query}"), Some(token))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Uploads one file and returns the 200 answer.
async fn upload(
    gw: &Gateway,
    token: &str,
    filename: &str,
    content_type: &str,
    bytes: &[u8],
    query: &str,
) -> Value {
    let r = send_upload(
        gw,
        token,
        query,
        file_body(filename, content_type, bytes, None),
    )
    .await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "upload {filename}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Uploads and processes inline (`process_in_background=false`).
async fn upload_sync(
    gw: &Gateway,
    token: &str,
    filename: &str,
    content_type: &str,
    bytes: &[u8],
) -> Value {
    upload(
        gw,
        token,
        filename,
        content_type,
        bytes,
        "?process_in_background=false",
    )
    .await
}

async fn get_json(gw: &Gateway, path: &str, token: &str) -> Value {
    let r = gw.get(path, Some(token)).await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `/process/status` until the file is no longer pending (bounded).
async fn wait_final(gw: &Gateway, token: &str, id: &str) -> Value {
    let deadline = Instant::now() + PROCESS_LIMIT;
    loop {
        let v = get_json(gw, &format!("/api/v1/files/{id}/process/status"), token).await;
        if v["status"] != "pending" {
            return v;
        }
        assert!(Instant::now() < deadline, "file {id} still pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The id of the signed-in user.
async fn user_id(gw: &Gateway, token: &str) -> String {
    get_json(gw, "/api/v1/auths/", token).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn create_kb(gw: &Gateway, token: &str, name: &str) -> String {
    let r = gw
        .post(
            "/api/v1/knowledge/create",
            Some(token),
            json!({"name": name, "description": ""}),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn add_to_kb(gw: &Gateway, token: &str, kb: &str, file: &str) -> Value {
    let r = gw
        .post(
            &format!("/api/v1/knowledge/{kb}/file/add"),
            Some(token),
            json!({"file_id": file}),
        )
        .await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "file/add: {body}");
    serde_json::from_str(&body).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Entries of `<data dir>/uploads` (empty when the directory does not exist).
fn uploads(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir.join("uploads")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// `n` distinct paragraphs of 120–170 characters, separated by blank lines: with
/// `CHUNK_SIZE=200` and no overlap each paragraph becomes exactly one chunk.
fn paragraphs(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "Paragraph {i} describes item number {i} of the inventory, its colour code {}, \
                 its storage shelf {} and the supplier batch {}.",
                i * 7 % 13,
                i % 17,
                i * 31
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// A minimal PDF written by hand with a correct xref table: one page per entry of `pages`,
/// each line shown with the standard Helvetica font.
fn make_pdf(pages: &[&[&str]]) -> Vec<u8> {
    let n = pages.len();
    let page_id = |i: usize| 4 + 2 * i;
    let kids: Vec<String> = (0..n).map(|i| format!("{} 0 R", page_id(i))).collect();
    let mut objects: Vec<Vec<u8>> = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        format!("<< /Type /Pages /Kids [{}] /Count {n} >>", kids.join(" ")).into_bytes(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_vec(),
    ];
    for (i, lines) in pages.iter().enumerate() {
        let mut content = String::from("BT /F1 12 Tf 72 720 Td 16 TL\n");
        for line in *lines {
            content.push_str(&format!("({line}) Tj T*\n"));
        }
        content.push_str("ET");
        objects.push(
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] \
                 /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
                page_id(i) + 1
            )
            .into_bytes(),
        );
        let mut stream = format!("<< /Length {} >>\nstream\n", content.len()).into_bytes();
        stream.extend_from_slice(content.as_bytes());
        stream.extend_from_slice(b"\nendstream");
        objects.push(stream);
    }
    let mut pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        pdf.extend_from_slice(body);
        pdf.extend_from_slice(b"\nendobj\n");
    }
    let xref = pdf.len();
    pdf.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for offset in offsets {
        pdf.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    pdf.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    pdf
}

/// A minimal DOCX (ZIP with `[Content_Types].xml`, relationships and `word/document.xml`).
fn make_docx(paragraphs: &[&str]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut body = String::new();
    for p in paragraphs {
        body.push_str(&format!("<w:p><w:r><w:t>{p}</w:t></w:r></w:p>"));
    }
    let document = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\
         <w:document xmlns:w=\"http://schemas.openxmlformats.org/wordprocessingml/2006/main\">\
         <w:body>{body}</w:body></w:document>"
    );
    let content_types = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
        <Types xmlns=\"http://schemas.openxmlformats.org/package/2006/content-types\">\
        <Default Extension=\"rels\" ContentType=\"application/vnd.openxmlformats-package.relationships+xml\"/>\
        <Default Extension=\"xml\" ContentType=\"application/xml\"/>\
        <Override PartName=\"/word/document.xml\" \
        ContentType=\"application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml\"/>\
        </Types>";
    let rels = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
        <Relationships xmlns=\"http://schemas.openxmlformats.org/package/2006/relationships\">\
        <Relationship Id=\"rId1\" \
        Type=\"http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument\" \
        Target=\"word/document.xml\"/></Relationships>";
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default();
    for (name, text) in [
        ("[Content_Types].xml", content_types),
        ("_rels/.rels", rels),
        ("word/document.xml", document.as_str()),
    ] {
        zip.start_file(name, opts).unwrap();
        zip.write_all(text.as_bytes()).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn latin1(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| u8::try_from(u32::from(c)).expect("Latin-1 character"))
        .collect()
}

fn utf16le_with_bom(s: &str) -> Vec<u8> {
    let mut out = vec![0xFF, 0xFE];
    for u in s.encode_utf16() {
        out.extend_from_slice(&u.to_le_bytes());
    }
    out
}

/// Asserts the store and the index agree on a completed file; returns its chunk count.
fn assert_fully_indexed(gw: &Gateway, id: &str) -> usize {
    let app = gw.app();
    let rec = app.store().file(id).unwrap().expect("file record");
    assert_eq!(rec.status, Some(FileStatus::Completed), "{rec:?}");
    let ids = app.store().file_chunk_ids(id).unwrap();
    assert!(!ids.is_empty(), "no chunks");
    assert_eq!(rec.chunk_count, ids.len(), "chunk_count vs stored chunks");
    assert_eq!(app.vectors().file_len(id), ids.len(), "vectors");
    assert_eq!(app.store().chunks(&ids).unwrap().len(), ids.len());
    ids.len()
}

/// Asserts nothing of the file is searchable or stored as chunks.
fn assert_not_indexed(gw: &Gateway, id: &str) {
    let app = gw.app();
    assert!(app.store().file_chunk_ids(id).unwrap().is_empty(), "chunks");
    assert_eq!(app.vectors().file_len(id), 0, "vectors");
}

fn slow_setup(fake: &FakeUpstream, model: &str) -> Setup {
    Setup::new()
        .real_embedder()
        .env("RAG_EMBEDDING_ENGINE", "ollama")
        .env("RAG_OLLAMA_BASE_URL", &fake.url)
        .env("RAG_EMBEDDING_MODEL", model)
        .env("CHUNK_SIZE", "200")
        .env("CHUNK_OVERLAP", "0")
}

// ---------------------------------------------------------------------------
// Upload, shape and the per-file endpoints
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_upload_is_completed_and_has_open_webui_shape() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let admin_id = user_id(&gw, &admin).await;
    let text = "Ragway stores uploaded files.\n\nIt extracts, chunks and embeds them.";
    let r = send_upload(
        &gw,
        &admin,
        "?process_in_background=false",
        file_body(
            "notes.txt",
            "text/plain",
            text.as_bytes(),
            Some(r#"{"source":"unit-test","tags":["a"]}"#),
        ),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();

    // Open WebUI's FileModelResponse (+ status, path), but already completed.
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    for k in [
        "status",
        "id",
        "user_id",
        "hash",
        "filename",
        "path",
        "data",
        "meta",
        "created_at",
        "updated_at",
    ] {
        assert!(keys.contains(&k), "missing {k} in {v}");
    }
    assert_eq!(v["status"], true);
    assert_eq!(v["data"]["status"], "completed", "{v}");
    assert!(v["data"].get("error").is_none(), "{v}");
    assert_eq!(v["user_id"], admin_id.as_str());
    assert_eq!(v["filename"], "notes.txt");
    assert_eq!(v["hash"], sha256_hex(text.as_bytes()).as_str());
    // `path` is a storage key relative to the data dir: the server's layout stays private.
    let path = v["path"].as_str().unwrap();
    assert_eq!(path, format!("uploads/{id}_notes.txt"));
    let on_disk = gw.dir.path().join(path);
    assert_eq!(std::fs::read(on_disk).unwrap(), text.as_bytes());
    assert_eq!(v["meta"]["name"], "notes.txt");
    assert_eq!(v["meta"]["content_type"], "text/plain");
    assert_eq!(v["meta"]["size"], text.len());
    assert_eq!(v["meta"]["file_hash"], sha256_hex(text.as_bytes()).as_str());
    assert_eq!(
        v["meta"]["data"],
        json!({"source": "unit-test", "tags": ["a"]})
    );
    assert!(v["created_at"].as_u64().unwrap() > 1_700_000_000);
    assert!(v["updated_at"].as_u64().unwrap() >= v["created_at"].as_u64().unwrap());
    assert_fully_indexed(&gw, &id);

    // GET /files/{id}: the FileModel with the content and the collection name.
    let f = get_json(&gw, &format!("/api/v1/files/{id}"), &admin).await;
    assert_eq!(f["id"], id.as_str());
    assert_eq!(f["data"]["status"], "completed");
    assert_eq!(f["data"]["content"], text);
    assert_eq!(f["meta"]["collection_name"], format!("file-{id}").as_str());
    assert_eq!(f["meta"]["file_hash"], v["meta"]["file_hash"]);
    assert_eq!(f["hash"], v["hash"]);

    // /data/content
    let c = get_json(&gw, &format!("/api/v1/files/{id}/data/content"), &admin).await;
    assert_eq!(c, json!({"content": text}));

    // /content: the exact bytes, with a content-disposition naming the file.
    let r = gw
        .get(&format!("/api/v1/files/{id}/content"), Some(&admin))
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(disposition.contains("notes.txt"), "{disposition}");
    assert_eq!(r.bytes().await.unwrap().as_ref(), text.as_bytes());
    let r = gw
        .get(
            &format!("/api/v1/files/{id}/content?attachment=true"),
            Some(&admin),
        )
        .await;
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment"),
    );

    // /process/status
    let s = get_json(&gw, &format!("/api/v1/files/{id}/process/status"), &admin).await;
    assert_eq!(s, json!({"status": "completed"}));

    // Unknown ids are 404 everywhere.
    for path in [
        "/api/v1/files/nope",
        "/api/v1/files/nope/process/status",
        "/api/v1/files/nope/data/content",
        "/api/v1/files/nope/content",
    ] {
        assert_error(gw.get(path, Some(&admin)).await, 404, NOT_FOUND).await;
    }
    // Without credentials: 401.
    let r = gw.get(&format!("/api/v1/files/{id}"), None).await;
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_upload_is_pending_then_completed_with_sse_status() {
    let fake = FakeUpstream::ollama(&["slow-embed"]).await;
    let gw = slow_setup(&fake, "slow-embed").start().await;
    let admin = gw.admin().await;

    let v = upload(
        &gw,
        &admin,
        "bg.txt",
        "text/plain",
        b"Background processing of a small text.",
        "",
    )
    .await;
    assert_eq!(v["data"]["status"], "pending", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    // The slow model pauses 1.5 s: the file is still pending right after the upload.
    let s = get_json(&gw, &format!("/api/v1/files/{id}/process/status"), &admin).await;
    assert_eq!(s["status"], "pending");

    // SSE until completed.
    let r = tokio::time::timeout(
        PROCESS_LIMIT,
        gw.get(
            &format!("/api/v1/files/{id}/process/status?stream=true"),
            Some(&admin),
        ),
    )
    .await
    .expect("SSE headers in time");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = tokio::time::timeout(PROCESS_LIMIT, r.text())
        .await
        .expect("SSE ends once the file is final")
        .unwrap();
    let events: Vec<Value> = body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"));
            serde_json::from_str(data).unwrap()
        })
        .collect();
    assert!(events.len() >= 2, "{body}");
    assert_eq!(events[0], json!({"status": "pending"}), "{body}");
    assert_eq!(events.last().unwrap(), &json!({"status": "completed"}));
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e["status"] == "pending"),
        "{body}"
    );

    assert_eq!(wait_final(&gw, &admin, &id).await["status"], "completed");
    // The status is committed just before the in-memory index is installed (see
    // `completed_file_is_searchable_as_soon_as_reported`): wait for the worker to finish.
    gw.app().ingest.wait_done(&id, PROCESS_LIMIT).await.unwrap();
    assert_fully_indexed(&gw, &id);
    let f = get_json(&gw, &format!("/api/v1/files/{id}"), &admin).await;
    assert_eq!(
        f["data"]["content"],
        "Background processing of a small text."
    );
    assert!(!fake.requests_to("/api/embed").is_empty());

    // A final file's stream is a single event.
    let r = gw
        .get(
            &format!("/api/v1/files/{id}/process/status?stream=true"),
            Some(&admin),
        )
        .await;
    assert_eq!(
        r.text().await.unwrap(),
        "data: {\"status\":\"completed\"}\n\n"
    );
}

// ---------------------------------------------------------------------------
// Every supported type
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_supported_type_is_extracted() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;

    let html = "<!DOCTYPE html><html><head><title>Page title</title>\
        <style>.hidden { color: red; } body { margin: 0 }</style>\
        <script>var secretScriptValue = 42; console.log('tracking');</script></head>\
        <body><h1>Visible heading</h1><p>First visible paragraph.</p>\
        <script>alert('inline script text')</script><p>Second visible paragraph.</p></body></html>";
    let docx = make_docx(&[
        "First paragraph of the Word document.",
        "Second paragraph mentions invoices.",
    ]);
    let pdf = make_pdf(&[
        &["Alpha page one talks about apples."],
        &["Beta page two talks about bananas."],
    ]);
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, &str, Vec<u8>, Vec<&str>, Vec<&str>)> = vec![
        (
            "plain.txt",
            "text/plain",
            "UTF-8 text: naïve café, 東京, emoji 🚀."
                .as_bytes()
                .to_vec(),
            vec!["UTF-8 text: naïve café, 東京, emoji 🚀."],
            vec![],
        ),
        (
            "utf16.txt",
            "text/plain",
            utf16le_with_bom("Grüße aus Köln, UTF-16LE mit BOM."),
            vec!["Grüße aus Köln, UTF-16LE mit BOM."],
            vec!["\u{feff}"],
        ),
        (
            "latin1.txt",
            "text/plain",
            latin1("Le café crème était très apprécié à Genève, déjà en été."),
            vec!["Le café crème était très apprécié à Genève, déjà en été."],
            vec!["\u{fffd}"],
        ),
        (
            "readme.md",
            "text/markdown",
            b"# Title\n\nSome *markdown* text with a [link](http://x).\n".to_vec(),
            vec!["# Title", "Some *markdown* text with a [link](http://x)."],
            vec![],
        ),
        (
            "page.html",
            "text/html",
            html.as_bytes().to_vec(),
            vec![
                "Visible heading",
                "First visible paragraph.",
                "Second visible paragraph.",
            ],
            vec![
                "secretScriptValue",
                "tracking",
                "inline script text",
                "color: red",
                "margin",
            ],
        ),
        (
            "people.csv",
            "text/csv",
            b"name,city\nAlice,Paris\nBob,Berlin\n".to_vec(),
            vec!["name: Alice", "city: Paris", "Bob", "Berlin"],
            vec![],
        ),
        (
            "data.json",
            "application/json",
            br#"{"title":"Quarterly report","items":[{"sku":"A-113","qty":4}]}"#.to_vec(),
            vec!["Quarterly report", "A-113"],
            vec![],
        ),
        (
            "catalog.xml",
            "application/xml",
            b"<?xml version=\"1.0\"?><catalog><book id=\"b1\"><title>Rust in Action</title>\
              <author>Tim McNamara</author></book></catalog>"
                .to_vec(),
            vec!["Rust in Action", "Tim McNamara"],
            vec!["<title>", "<?xml"],
        ),
        (
            "letter.docx",
            // Browsers often send Office files as a generic type.
            "application/octet-stream",
            docx,
            vec![
                "First paragraph of the Word document.",
                "Second paragraph mentions invoices.",
            ],
            vec!["w:t", "<w:"],
        ),
        (
            "two-pages.pdf",
            "application/pdf",
            pdf,
            vec![
                "Alpha page one talks about apples.",
                "Beta page two talks about bananas.",
            ],
            vec![],
        ),
    ];

    for (name, ct, bytes, present, absent) in cases {
        let v = upload_sync(&gw, &admin, name, ct, &bytes).await;
        assert_eq!(v["data"]["status"], "completed", "{name}: {v}");
        let id = v["id"].as_str().unwrap().to_string();
        let f = get_json(&gw, &format!("/api/v1/files/{id}"), &admin).await;
        let content = f["data"]["content"].as_str().unwrap_or_else(|| {
            panic!("{name}: no content in {f}");
        });
        for p in present {
            assert!(
                content.contains(p),
                "{name}: {p:?} missing from {content:?}"
            );
        }
        for a in absent {
            assert!(!content.contains(a), "{name}: {a:?} present in {content:?}");
        }
        assert_fully_indexed(&gw, &id);
        // The bytes are served back unchanged.
        let r = gw
            .get(&format!("/api/v1/files/{id}/content"), Some(&admin))
            .await;
        assert_eq!(
            r.bytes().await.unwrap().as_ref(),
            bytes.as_slice(),
            "{name}"
        );

        if name.ends_with(".pdf") {
            let app = gw.app();
            let chunks = app
                .store()
                .chunks(&app.store().file_chunk_ids(&id).unwrap())
                .unwrap();
            let page_of = |needle: &str| {
                chunks
                    .iter()
                    .find(|(_, c)| c.text.contains(needle))
                    .unwrap_or_else(|| panic!("no chunk with {needle:?}: {chunks:?}"))
                    .1
                    .page
            };
            assert_eq!(page_of("apples"), Some(1));
            assert_eq!(page_of("bananas"), Some(2));
            // Chunks never straddle pages.
            assert!(
                chunks
                    .iter()
                    .all(|(_, c)| !(c.text.contains("apples") && c.text.contains("bananas")))
            );
            assert_eq!(f["meta"]["content_type"], "application/pdf");
            let r = gw
                .get(&format!("/api/v1/files/{id}/content"), Some(&admin))
                .await;
            assert!(
                r.headers()["content-disposition"]
                    .to_str()
                    .unwrap()
                    .starts_with("inline"),
                "PDFs are served inline"
            );
        }
        if name.ends_with(".docx") {
            // A generic content type is replaced by the one of the extension.
            assert_eq!(
                f["meta"]["content_type"],
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Unsupported and unreadable files
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_and_corrupt_files_fail_cleanly() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let binary: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 256) as u8).collect();
    let mut damaged = b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R".to_vec();
    damaged.extend_from_slice(&binary[..512]);
    let cases: Vec<(&str, &str, Vec<u8>, &str, bool)> = vec![
        (
            "firmware.bin",
            "application/octet-stream",
            binary.clone(),
            "unsupported file type .bin",
            true,
        ),
        (
            "setup.exe",
            "application/x-msdownload",
            b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff".to_vec(),
            "unsupported file type .exe",
            true,
        ),
        (
            "notes.txt",
            "text/plain",
            binary.clone(),
            ".txt file contains binary data, not text",
            true,
        ),
        (
            "fake.pdf",
            "application/pdf",
            b"this is not a PDF at all".to_vec(),
            "not a PDF file (no %PDF- header)",
            true,
        ),
        // Prefix only: the parser's own words follow.
        ("damaged.pdf", "application/pdf", damaged, "PDF", false),
        ("empty.txt", "text/plain", Vec::new(), "file is empty", true),
    ];
    for (background, query) in [(false, "?process_in_background=false"), (true, "")] {
        for (name, ct, bytes, error, exact) in &cases {
            let v = upload(&gw, &admin, name, ct, bytes, query).await;
            let id = v["id"].as_str().unwrap().to_string();
            let status = if background {
                wait_final(&gw, &admin, &id).await
            } else {
                assert_eq!(v["data"]["status"], "failed", "{name}: {v}");
                assert_eq!(v["hash"], Value::Null);
                get_json(&gw, &format!("/api/v1/files/{id}/process/status"), &admin).await
            };
            assert_eq!(status["status"], "failed", "{name}: {status}");
            let f = get_json(&gw, &format!("/api/v1/files/{id}"), &admin).await;
            assert_eq!(f["data"]["status"], "failed", "{name}");
            let msg = f["data"]["error"].as_str().unwrap_or_else(|| {
                panic!("{name}: no data.error in {f}");
            });
            if *exact {
                assert_eq!(msg, *error, "{name}");
            } else {
                assert!(msg.starts_with(error), "{name}: {msg}");
            }
            assert_eq!(status["error"], msg, "{name}: status carries the error");
            assert_eq!(f["hash"], Value::Null, "{name}");
            assert!(f["data"].get("content").is_none(), "{name}: {f}");
            assert_not_indexed(&gw, &id);
            // The upload itself is kept and downloadable.
            let r = gw
                .get(&format!("/api/v1/files/{id}/content"), Some(&admin))
                .await;
            assert_eq!(r.bytes().await.unwrap().as_ref(), bytes.as_slice());
        }
    }
    // A failed file cannot be added to a collection.
    let failed = upload_sync(&gw, &admin, "x.bin", "application/octet-stream", &binary).await;
    let kb = create_kb(&gw, &admin, "K").await;
    let r = gw
        .post(
            &format!("/api/v1/knowledge/{kb}/file/add"),
            Some(&admin),
            json!({"file_id": failed["id"]}),
        )
        .await;
    assert_error(r, 400, "unsupported file type .bin").await;
    assert_eq!(gw.app().vectors().collection_len(&kb), 0);
    // Still serving.
    assert_eq!(gw.get("/health", None).await.status(), 200);
    let ok = upload_sync(&gw, &admin, "ok.txt", "text/plain", b"still working").await;
    assert_eq!(ok["data"]["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_false_stores_without_processing() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let v = upload(
        &gw,
        &admin,
        "raw.txt",
        "text/plain",
        b"Stored only, never processed.",
        "?process=false",
    )
    .await;
    assert_eq!(v["data"], json!({}), "{v}");
    assert_eq!(v["hash"], Value::Null);
    let id = v["id"].as_str().unwrap().to_string();
    let app = gw.app();
    assert!(!app.store().queued_files().unwrap().contains(&id));
    let f = get_json(&gw, &format!("/api/v1/files/{id}"), &admin).await;
    assert_eq!(f["data"], json!({}), "{f}");
    assert!(f["meta"].get("collection_name").is_none());
    assert_not_indexed(&gw, &id);
    let c = get_json(&gw, &format!("/api/v1/files/{id}/data/content"), &admin).await;
    assert_eq!(c, json!({"content": ""}));
    let r = gw
        .get(&format!("/api/v1/files/{id}/content"), Some(&admin))
        .await;
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        b"Stored only, never processed."
    );
    // Even with the worker woken by another upload, it stays unprocessed.
    let other = upload(&gw, &admin, "b.txt", "text/plain", b"other file", "").await;
    wait_final(&gw, &admin, other["id"].as_str().unwrap()).await;
    let f = get_json(&gw, &format!("/api/v1/files/{id}"), &admin).await;
    assert_eq!(f["data"], json!({}));
    assert_not_indexed(&gw, &id);
    // process=false skips the extension allow-list too (checked only when processing).
    let gw2 = Setup::new()
        .toml("[rag]\nallowed-extensions = [\"txt\"]")
        .start()
        .await;
    let admin2 = gw2.admin().await;
    let v = upload(
        &gw2,
        &admin2,
        "x.md",
        "text/markdown",
        b"# md",
        "?process=false",
    )
    .await;
    assert_eq!(v["data"], json!({}));
}

// ---------------------------------------------------------------------------
// Limits and malformed requests
// ---------------------------------------------------------------------------

/// Sends an upload and returns (status, body), tolerating a server that answers before
/// reading the whole body (the connection may then be reset while sending).
async fn try_upload(gw: &Gateway, token: &str, body: Vec<u8>) -> Option<(u16, Value)> {
    let r = gw
        .req(Method::POST, "/api/v1/files/", Some(token))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await;
    match r {
        Ok(r) => {
            let status = r.status().as_u16();
            Some((status, r.json().await.unwrap_or(Value::Null)))
        }
        Err(e) => {
            eprintln!("upload send error: {e}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limit_rejects_with_413_and_leaves_nothing() {
    let gw = Setup::new()
        .toml("[rag]\nfile-max-size-mb = 1")
        .start()
        .await;
    let admin = gw.admin().await;
    let message = "Oops! The file you're trying to upload is too large. Please upload a file \
                   that is less than 1 MB.";
    // 2 MB: refused from Content-Length; 1.5 MB: refused while streaming.
    for size in [2 * 1024 * 1024, 3 * 512 * 1024] {
        let big = vec![b'a'; size];
        let (status, body) =
            try_upload(&gw, &admin, file_body("big.txt", "text/plain", &big, None))
                .await
                .unwrap_or_else(|| panic!("{size} bytes: no HTTP answer (connection reset)"));
        assert_eq!(status, 413, "{size}: {body}");
        assert_eq!(body["detail"], message, "{size}");
        assert!(
            gw.app().store().files().unwrap().is_empty(),
            "{size}: record"
        );
        assert!(
            uploads(gw.dir.path()).is_empty(),
            "{size}: {:?}",
            uploads(gw.dir.path())
        );
    }
    // Exactly at the limit is fine.
    let at_limit = vec![b'b'; 1024 * 1024];
    let v = upload(
        &gw,
        &admin,
        "ok.txt",
        "text/plain",
        &at_limit,
        "?process=false",
    )
    .await;
    assert_eq!(v["meta"]["size"], 1024 * 1024);
    assert_eq!(gw.app().store().files().unwrap().len(), 1);
    assert_eq!(uploads(gw.dir.path()).len(), 1);
}

/// A 413 sent before the body was read must reach the client: the gateway reads and
/// discards the rest of the body before closing, because closing over unread bytes sends a
/// TCP reset that can destroy the answer (seen as "error sending request" by reqwest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_413_is_followed_by_a_clean_close_not_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Setup::new()
        .toml("[rag]\nfile-max-size-mb = 1")
        .start()
        .await;
    let admin = gw.admin().await;
    let addr = gw.url.strip_prefix("http://").unwrap();
    // Larger than what the kernel buffers on loopback, so the server must really read it.
    let body = file_body("big.txt", "text/plain", &vec![b'a'; 24 * 1024 * 1024], None);
    let head = format!(
        "POST /api/v1/files/ HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {admin}\r\n\
         content-type: multipart/form-data; boundary={BOUNDARY}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rx, mut tx) = s.into_split();
    // The client sends everything it announced without waiting, as HTTP clients do.
    let writer = tokio::spawn(async move {
        tx.write_all(head.as_bytes()).await?;
        tx.write_all(&body).await?;
        Ok::<_, std::io::Error>(tx)
    });
    let mut received = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), rx.read_to_end(&mut received))
        .await
        .expect("the gateway closes after draining");
    let text = String::from_utf8_lossy(&received);
    assert!(
        end.is_ok(),
        "closed with {end:?} instead of a clean FIN; got {text}"
    );
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(text.contains("too large"), "{text}");
    writer
        .await
        .unwrap()
        .expect("the body is read, not refused");
    assert!(gw.app().store().files().unwrap().is_empty());
    assert!(uploads(gw.dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limit_from_env() {
    let gw = Setup::new().env("RAG_FILE_MAX_SIZE", "1").start().await;
    let admin = gw.admin().await;
    let big = vec![b'a'; 3 * 512 * 1024];
    let (status, body) = try_upload(&gw, &admin, file_body("big.txt", "text/plain", &big, None))
        .await
        .expect("an HTTP answer");
    assert_eq!(status, 413, "{body}");
    assert!(gw.app().store().files().unwrap().is_empty());
    assert!(uploads(gw.dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_allow_list_and_malformed_requests_are_400() {
    let gw = Setup::new()
        .toml("[rag]\nallowed-extensions = [\"txt\"]")
        .start()
        .await;
    let admin = gw.admin().await;
    let r = send_upload(
        &gw,
        &admin,
        "",
        file_body("doc.md", "text/markdown", b"# not allowed", None),
    )
    .await;
    assert_error(r, 400, "File type md is not allowed").await;
    // The message names the extension only.
    let r = send_upload(
        &gw,
        &admin,
        "",
        file_body("Doc.PDF", "application/pdf", b"%PDF-1.4", None),
    )
    .await;
    let v = assert_error(r, 400, "File type pdf is not allowed").await;
    assert_eq!(v["detail"], "File type pdf is not allowed");

    // Not multipart at all.
    let r = gw
        .post("/api/v1/files/", Some(&admin), json!({"file": "x"}))
        .await;
    assert_error(r, 400, "multipart").await;

    let file_part = Part {
        name: "file",
        filename: Some("a.txt"),
        content_type: Some("text/plain"),
        bytes: b"hello",
    };
    let meta_part = |bytes: &'static [u8]| Part {
        name: "metadata",
        filename: None,
        content_type: None,
        bytes,
    };
    // A file part, then a part whose headers are garbage.
    let mut file_then_garbage = multipart(&[file_part]);
    file_then_garbage.truncate(file_then_garbage.len() - format!("--{BOUNDARY}--\r\n").len());
    file_then_garbage.extend_from_slice(
        format!("--{BOUNDARY}\r\nthis is not a header line\r\n\r\nx\r\n--{BOUNDARY}--\r\n")
            .as_bytes(),
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated (no closing boundary)",
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nhello"
            )
            .into_bytes(),
            // How much arrived, so a cut body tells from a malformed one.
            "bytes of Content-Length received",
        ),
        (
            "garbage part headers",
            format!("--{BOUNDARY}\r\nthis is not a header line\r\n\r\nx\r\n--{BOUNDARY}--\r\n")
                .into_bytes(),
            "",
        ),
        ("file part then garbage part", file_then_garbage, ""),
        ("no file field", multipart(&[meta_part(b"{}")]), "file"),
        (
            "invalid metadata after the file",
            multipart(&[file_part, meta_part(b"{not json")]),
            "Invalid metadata format",
        ),
        (
            "invalid metadata before the file",
            multipart(&[meta_part(b"[broken"), file_part]),
            "Invalid metadata format",
        ),
    ];
    // Every case answers 400 and leaves no record and no blob (temporary files included).
    let mut leaks = Vec::new();
    for (label, body, detail) in cases {
        let r = send_upload(&gw, &admin, "", body).await;
        let v = assert_error(r, 400, detail).await;
        if detail == "Invalid metadata format" {
            assert_eq!(v["detail"], detail, "{label}");
        }
        assert!(
            gw.app().store().files().unwrap().is_empty(),
            "{label}: record"
        );
        let left = uploads(gw.dir.path());
        if !left.is_empty() {
            leaks.push(format!("{label}: {left:?}"));
            for name in left {
                std::fs::remove_file(gw.dir.path().join("uploads").join(name)).unwrap();
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "files left in uploads/ after a 400: {leaks:#?}"
    );

    // The server still works.
    let v = upload_sync(&gw, &admin, "fine.txt", "text/plain", b"allowed text").await;
    assert_eq!(v["data"]["status"], "completed");
    let ok = get_json(&gw, "/api/v1/files/", &admin).await;
    assert_eq!(ok["total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_from_env() {
    let gw = Setup::new()
        .env("RAG_ALLOWED_FILE_EXTENSIONS", "pdf, .TXT")
        .start()
        .await;
    let admin = gw.admin().await;
    let r = send_upload(
        &gw,
        &admin,
        "",
        file_body("x.md", "text/markdown", b"# x", None),
    )
    .await;
    assert_error(r, 400, "File type md is not allowed").await;
    let v = upload_sync(&gw, &admin, "x.txt", "text/plain", b"plain").await;
    assert_eq!(v["data"]["status"], "completed");
}

// ---------------------------------------------------------------------------
// Listing and isolation
// ---------------------------------------------------------------------------

/// Waits for the wall clock to enter a new second, so that timestamps differ.
async fn next_second() {
    let start = ragway::store::now_secs();
    while ragway::store::now_secs() == start {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_is_newest_first_and_isolated_per_user() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let a = gw.user(&admin, "a@example.com").await;
    let b = gw.user(&admin, "b@example.com").await;

    let a1 = upload_sync(&gw, &a, "a1.txt", "text/plain", b"first file of A").await;
    next_second().await;
    let a2 = upload_sync(&gw, &a, "a2.txt", "text/plain", b"second file of A").await;
    let b1 = upload_sync(&gw, &b, "b1.txt", "text/plain", b"file of B").await;
    let a1_id = a1["id"].as_str().unwrap();
    let a2_id = a2["id"].as_str().unwrap();
    let b1_id = b1["id"].as_str().unwrap();

    let list = get_json(&gw, "/api/v1/files/", &a).await;
    assert_eq!(
        list.as_object().unwrap().len(),
        2,
        "{{items,total}}: {list}"
    );
    assert_eq!(list["total"], 2);
    let items = list["items"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![a2_id, a1_id], "newest first");
    assert_eq!(items[0]["data"]["content"], "second file of A");
    assert_eq!(items[0]["data"]["status"], "completed");
    assert_eq!(items[0]["filename"], "a2.txt");

    let list = get_json(&gw, "/api/v1/files/?content=false", &a).await;
    for item in list["items"].as_array().unwrap() {
        assert!(item["data"].get("content").is_none(), "{item}");
        assert_eq!(item["data"]["status"], "completed");
    }
    // Pages of 50.
    let page2 = get_json(&gw, "/api/v1/files/?page=2", &a).await;
    assert_eq!(page2["items"], json!([]));
    assert_eq!(page2["total"], 2);

    // B sees only B's file.
    let list = get_json(&gw, "/api/v1/files/", &b).await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["items"][0]["id"], b1_id);

    // Every route on A's file is a 404 for B.
    for path in [
        format!("/api/v1/files/{a1_id}"),
        format!("/api/v1/files/{a1_id}/process/status"),
        format!("/api/v1/files/{a1_id}/process/status?stream=true"),
        format!("/api/v1/files/{a1_id}/data/content"),
        format!("/api/v1/files/{a1_id}/content"),
    ] {
        assert_error(gw.get(&path, Some(&b)).await, 404, NOT_FOUND).await;
    }
    let r = gw
        .req(Method::DELETE, &format!("/api/v1/files/{a1_id}"), Some(&b))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, NOT_FOUND).await;
    assert!(
        gw.app().store().file(a1_id).unwrap().is_some(),
        "not deleted"
    );

    // The admin sees and reads everything.
    let list = get_json(&gw, "/api/v1/files/", &admin).await;
    assert_eq!(list["total"], 3);
    let f = get_json(&gw, &format!("/api/v1/files/{b1_id}"), &admin).await;
    assert_eq!(f["data"]["content"], "file of B");
    let c = get_json(&gw, &format!("/api/v1/files/{a1_id}/data/content"), &admin).await;
    assert_eq!(c["content"], "first file of A");
}

// ---------------------------------------------------------------------------
// Deletion
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_blob_record_chunks_vectors_and_memberships() {
    let gw = Setup::new()
        .env("CHUNK_SIZE", "200")
        .env("CHUNK_OVERLAP", "0")
        .start()
        .await;
    let admin = gw.admin().await;
    let v = upload_sync(
        &gw,
        &admin,
        "doomed.txt",
        "text/plain",
        paragraphs(5).as_bytes(),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    let keep = upload_sync(&gw, &admin, "keep.txt", "text/plain", b"A file that stays.").await;
    let keep_id = keep["id"].as_str().unwrap().to_string();
    let n = assert_fully_indexed(&gw, &id);
    assert_eq!(n, 5);
    let kb1 = create_kb(&gw, &admin, "One").await;
    let kb2 = create_kb(&gw, &admin, "Two").await;
    add_to_kb(&gw, &admin, &kb1, &id).await;
    add_to_kb(&gw, &admin, &kb1, &keep_id).await;
    add_to_kb(&gw, &admin, &kb2, &id).await;
    let app = gw.app();
    assert_eq!(app.vectors().collection_len(&kb1), n + 1);
    assert_eq!(app.vectors().collection_len(&kb2), n);
    let chunk_ids = app.store().file_chunk_ids(&id).unwrap();
    let blob = gw.dir.path().join(v["path"].as_str().unwrap());
    assert!(Path::new(&blob).exists());

    let r = gw
        .req(Method::DELETE, &format!("/api/v1/files/{id}"), Some(&admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"message": "File deleted successfully"})
    );
    assert!(!Path::new(&blob).exists(), "blob removed");
    assert!(app.store().file(&id).unwrap().is_none(), "record removed");
    assert!(
        app.store().file_text(&id).unwrap().is_none(),
        "text removed"
    );
    assert!(app.store().file_chunk_ids(&id).unwrap().is_empty());
    assert!(
        app.store().chunks(&chunk_ids).unwrap().is_empty(),
        "chunks removed"
    );
    assert_eq!(app.vectors().file_len(&id), 0);
    assert!(app.store().file_knowledge(&id).unwrap().is_empty());
    assert_eq!(app.vectors().collection_len(&kb1), 1);
    assert_eq!(app.vectors().collection_len(&kb2), 0);
    // No search returns the deleted chunks.
    let q = ragway::embed::HashEmbedder::new(64).embed_one("Paragraph 3 describes item number 3");
    for (hit, _) in app.vectors().search_collection(&kb1, &q, 10) {
        assert!(!chunk_ids.contains(&hit));
    }
    let files = get_json(&gw, &format!("/api/v1/knowledge/{kb1}/files"), &admin).await;
    assert_eq!(files["total"], 1);
    assert_eq!(files["items"][0]["id"], keep_id.as_str());
    let files = get_json(&gw, &format!("/api/v1/knowledge/{kb2}/files"), &admin).await;
    assert_eq!(files["total"], 0);
    assert_eq!(files["items"], json!([]));
    assert_error(
        gw.get(&format!("/api/v1/files/{id}"), Some(&admin)).await,
        404,
        NOT_FOUND,
    )
    .await;
    // Deleting again: 404.
    let r = gw
        .req(Method::DELETE, &format!("/api/v1/files/{id}"), Some(&admin))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, NOT_FOUND).await;
    // The other file is untouched.
    assert_fully_indexed(&gw, &keep_id);
    let list = get_json(&gw, "/api/v1/files/", &admin).await;
    assert_eq!(list["total"], 1);
}

// ---------------------------------------------------------------------------
// Real ONNX retrieval
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnx_end_to_end_retrieves_the_right_paragraph() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2/model.onnx");
    assert!(
        model.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        model.display()
    );
    let gw = Setup::new()
        .real_embedder()
        .env("CHUNK_SIZE", "200")
        .env("CHUNK_OVERLAP", "0")
        .start()
        .await;
    let admin = gw.admin().await;
    let photosynthesis = "Photosynthesis lets green plants turn sunlight, water and carbon \
                          dioxide into glucose and oxygen inside their chloroplasts.";
    let bank = "The central bank raised interest rates by half a percentage point to fight \
                persistent inflation in consumer prices.";
    let football = "Our football team won the championship final after scoring a late goal in \
                    extra time in front of a cheering crowd.";
    let text = format!("{photosynthesis}\n\n{bank}\n\n{football}\n");
    let v = upload_sync(&gw, &admin, "topics.txt", "text/plain", text.as_bytes()).await;
    assert_eq!(v["data"]["status"], "completed", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(assert_fully_indexed(&gw, &id), 3, "one chunk per paragraph");
    let app = gw.app();
    let rec = app.store().file(&id).unwrap().unwrap();
    let info = rec.embedding.expect("embedding info");
    assert_eq!(info.engine, "onnx");
    assert_eq!(info.dim, 384);
    let kb = create_kb(&gw, &admin, "Topics").await;
    add_to_kb(&gw, &admin, &kb, &id).await;
    assert_eq!(app.vectors().collection_len(&kb), 3);

    let embedder = app.ingest.embedder.as_ref().expect("ONNX embedder loaded");
    for (query, expected) in [
        ("How do plants make food from light?", "Photosynthesis"),
        ("monetary policy against rising prices", "central bank"),
        ("Which soccer side won the cup match?", "football team"),
    ] {
        let q = embedder.embed(vec![query.to_string()]).await.unwrap();
        let hits = app.vectors().search_collection(&kb, &q[0], 3);
        assert_eq!(hits.len(), 3);
        let top = app.store().chunks(&[hits[0].0]).unwrap();
        assert!(
            top[0].1.text.contains(expected),
            "{query:?} → {:?} (scores {hits:?})",
            top[0].1.text
        );
        // The file's own index agrees.
        let file_hits = app.vectors().search_file(&id, &q[0], 1);
        assert_eq!(file_hits[0].0, hits[0].0);
    }
}

// ---------------------------------------------------------------------------
// Restart consistency
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_file_is_processed_again_after_restart() {
    let fake = FakeUpstream::ollama(&["slow-embed"]).await;
    let setup = slow_setup(&fake, "slow-embed");
    let gw = setup.clone().start().await;
    let admin = gw.admin().await;
    // 150 chunks: 3 embedding batches of 64, 1.5 s each.
    let n = 150;
    let v = upload(
        &gw,
        &admin,
        "inventory.txt",
        "text/plain",
        paragraphs(n).as_bytes(),
        "",
    )
    .await;
    assert_eq!(v["data"]["status"], "pending");
    let id = v["id"].as_str().unwrap().to_string();
    // Wait until the first batch is on its way, then stop.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.requests_to("/api/embed").is_empty() {
        assert!(Instant::now() < deadline, "processing never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = gw.stop().await;

    {
        let store = Store::open(&dir.path().join("ragway.redb"))
            .expect("database released by the stopped gateway");
        let rec = store.file(&id).unwrap().expect("record kept");
        assert_eq!(rec.status, Some(FileStatus::Pending), "{rec:?}");
        assert!(
            store.file_chunk_ids(&id).unwrap().is_empty(),
            "half indexed"
        );
        assert_eq!(store.queued_files().unwrap(), vec![id.clone()]);
    }

    fake.clear();
    let gw = setup.start_in(dir).await;
    let status = wait_final(&gw, &admin, &id).await;
    assert_eq!(status["status"], "completed", "{status}");
    gw.app().ingest.wait_done(&id, PROCESS_LIMIT).await.unwrap();
    assert_eq!(assert_fully_indexed(&gw, &id), n);
    let app = gw.app();
    assert_eq!(app.store().file(&id).unwrap().unwrap().chunk_count, n);
    assert!(app.store().queued_files().unwrap().is_empty());
    assert_eq!(
        fake.requests_to("/api/embed").len(),
        n.div_ceil(64),
        "re-embedded after the restart"
    );
    let f = get_json(&gw, &format!("/api/v1/files/{id}"), &admin).await;
    assert_eq!(f["data"]["content"], paragraphs(n));
}

/// A file reported `completed` must be searchable at that moment: clients poll
/// `/process/status` and then add the file to a collection, which copies the file's
/// in-memory vectors. The status is watched in a tight in-process loop so that the gap
/// between the commit and the index update, if any, is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_file_is_searchable_as_soon_as_reported() {
    let gw = Setup::new()
        .env("CHUNK_SIZE", "200")
        .env("CHUNK_OVERLAP", "0")
        .start()
        .await;
    let admin = gw.admin().await;
    let n = 1500;
    let v = upload(
        &gw,
        &admin,
        "many.txt",
        "text/plain",
        paragraphs(n).as_bytes(),
        "",
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    let app = gw.app();
    let deadline = Instant::now() + PROCESS_LIMIT;
    // Deliberately blocking: nothing on this runtime is needed while spinning.
    let indexed_when_completed = loop {
        let rec = app.store().file(&id).unwrap().unwrap();
        match rec.status {
            Some(FileStatus::Completed) => break app.vectors().file_len(&id),
            Some(FileStatus::Pending) => {}
            other => panic!("{other:?}: {rec:?}"),
        }
        assert!(Instant::now() < deadline, "never completed");
    };
    assert_eq!(
        indexed_when_completed, n,
        "status was `completed` while the file had {indexed_when_completed} of {n} vectors \
         searchable"
    );
}

fn ragway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ragway"));
    for v in [
        "OLLAMA_BASE_URL",
        "OLLAMA_BASE_URLS",
        "OPENAI_API_BASE_URL",
        "OPENAI_API_BASE_URLS",
        "WEBUI_SECRET_KEY",
        "ENV",
        "DATA_DIR",
        "PORT",
        "HOST",
        "RAGWAY_CONFIG",
        "RAG_EMBEDDING_ENGINE",
        "RAG_EMBEDDING_MODEL",
        "RAG_OLLAMA_BASE_URL",
        "CHUNK_SIZE",
        "CHUNK_OVERLAP",
        "RAG_FILE_MAX_SIZE",
        "RAG_ALLOWED_FILE_EXTENSIONS",
    ] {
        c.env_remove(v);
    }
    c
}

/// Runs a short CLI command to completion off the async threads; panics on failure.
async fn cli_ok(mut cmd: Command) -> String {
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A `ragway serve` child process, killed when dropped.
struct Child {
    child: std::process::Child,
    url: String,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(data: &str, fake: &FakeUpstream) -> Child {
    let port = free_port();
    let mport = free_port();
    let child = ragway()
        .args(["serve", "--data-dir", data, "--ollama-url", &fake.url])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
        ])
        .env("RAG_EMBEDDING_ENGINE", "ollama")
        .env("RAG_OLLAMA_BASE_URL", &fake.url)
        .env("RAG_EMBEDDING_MODEL", "slow-embed")
        .env("CHUNK_SIZE", "200")
        .env("CHUNK_OVERLAP", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Child {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{}/health", child.url))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "ragway serve did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_processing_leaves_the_file_pending_then_completes() {
    let fake = FakeUpstream::ollama(&["slow-embed"]).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let db = dir.path().join("ragway.redb");

    let mut add = ragway();
    add.args([
        "user",
        "add",
        "--data-dir",
        &data,
        "--email",
        "ops@example.com",
        "--role",
        "admin",
    ])
    .env("RAGWAY_PASSWORD", "very-secret-pw-42");
    cli_ok(add).await;
    let mut key = ragway();
    key.args([
        "key",
        "create",
        "--data-dir",
        &data,
        "--user",
        "ops@example.com",
    ]);
    let key = cli_ok(key).await.trim().to_string();
    assert!(key.starts_with("sk-"), "{key}");

    // 300 chunks: 5 batches of at most 64, 1.5 s each with the slow model.
    let n = 300;
    let text = paragraphs(n);
    let child = serve(&data, &fake).await;
    let client = http_client();
    let r = client
        .post(format!("{}/api/v1/files/", child.url))
        .bearer_auth(&key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(file_body("big.txt", "text/plain", text.as_bytes(), None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"]["status"], "pending");
    let id = v["id"].as_str().unwrap().to_string();
    // Mid-processing: some batches answered, more to come.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.requests_to("/api/embed").len() < 2 {
        assert!(Instant::now() < deadline, "processing did not progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut child = child;
    child.child.kill().unwrap(); // SIGKILL
    child.child.wait().unwrap();
    drop(child);

    {
        let store = Store::open(&db).expect("reopen after kill -9");
        let rec = store.file(&id).unwrap().expect("record survived");
        assert_eq!(rec.status, Some(FileStatus::Pending), "{rec:?}");
        assert_eq!(rec.chunk_count, 0);
        assert!(
            store.file_chunk_ids(&id).unwrap().is_empty(),
            "half indexed"
        );
        assert!(store.file_text(&id).unwrap().is_none());
        let mut vectors = 0;
        store
            .for_each_file_index(|_, data| vectors += data.ids.len())
            .unwrap();
        assert_eq!(vectors, 0, "no vectors before completion");
        assert_eq!(store.queued_files().unwrap(), vec![id.clone()]);
    }

    fake.clear();
    let child = serve(&data, &fake).await;
    let deadline = Instant::now() + PROCESS_LIMIT;
    loop {
        let s: Value = client
            .get(format!("{}/api/v1/files/{id}/process/status", child.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if s["status"] != "pending" {
            assert_eq!(s["status"], "completed", "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "not completed after restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let f: Value = client
        .get(format!("{}/api/v1/files/{id}", child.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(f["data"]["content"], text);
    assert_eq!(fake.requests_to("/api/embed").len(), n.div_ceil(64));
    drop(child); // kill -9 again: the completed state is durable

    let store = Store::open(&db).expect("reopen");
    let rec = store.file(&id).unwrap().unwrap();
    assert_eq!(rec.status, Some(FileStatus::Completed));
    let chunk_ids = store.file_chunk_ids(&id).unwrap();
    let mut vectors = 0;
    store
        .for_each_file_index(|f, data| {
            if f == id {
                assert_eq!(data.ids.len(), data.vectors.len());
                vectors += data.ids.len();
            }
        })
        .unwrap();
    assert_eq!(rec.chunk_count, n);
    assert_eq!(chunk_ids.len(), n);
    assert_eq!(vectors, n);
    assert_eq!(store.chunks(&chunk_ids).unwrap().len(), n);
    assert!(store.queued_files().unwrap().is_empty());
}

/// `content=true` (Open WebUI's default) listings share one text budget: a page of large
/// files is cut, and says so, instead of carrying every text whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_text_is_bounded_by_a_shared_budget() {
    let gw = Setup::new()
        .toml("[rag]\nchunk-size = 4000\nchunk-overlap = 0")
        .start()
        .await;
    let admin = gw.admin().await;
    // Three texts of ~900 KiB with a multi-byte character at every position mod 3.
    let text: String = "é word ".repeat(900 * 1024 / 8);
    let mut ids = Vec::new();
    for i in 0..3 {
        let v = upload_sync(
            &gw,
            &admin,
            &format!("big{i}.txt"),
            "text/plain",
            text.as_bytes(),
        )
        .await;
        assert_eq!(v["data"]["status"], "completed", "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let list = get_json(&gw, "/api/v1/files/", &admin).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let mut total = 0;
    let mut cut = 0;
    for item in items {
        let content = item["data"]["content"].as_str().unwrap();
        total += content.len();
        if item["data"]["content_truncated"] == true {
            cut += 1;
            let id = item["id"].as_str().unwrap();
            let whole = get_json(&gw, &format!("/api/v1/files/{id}/data/content"), &admin).await;
            let whole = whole["content"].as_str().unwrap().to_string();
            assert!(
                content.len() < whole.len() && whole.starts_with(content),
                "a prefix"
            );
        } else {
            assert!(item["data"].get("content_truncated").is_none());
        }
    }
    assert!(
        total <= 2 * 1024 * 1024,
        "{total} bytes of text in one page"
    );
    assert!(
        cut >= 1,
        "the page went over the budget, so something was cut"
    );
    // The whole text stays available per file.
    for id in &ids {
        let v = get_json(&gw, &format!("/api/v1/files/{id}/data/content"), &admin).await;
        assert!(v["content"].as_str().unwrap().len() > 800 * 1024);
    }
    // Without content, nothing to cut.
    let list = get_json(&gw, "/api/v1/files/?content=false", &admin).await;
    for item in list["items"].as_array().unwrap() {
        assert!(item["data"].get("content").is_none());
        assert!(item["data"].get("content_truncated").is_none());
    }
}
