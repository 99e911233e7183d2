//! Memory bound of uploads on the release binary: a chunked multipart body (no
//! `Content-Length`, so nothing can be refused up front) far larger than the limits is
//! stopped while streaming, answered 413, leaves nothing on disk, and never makes the
//! process buffer it.

mod common;

use common::raw::chunked_upload;
use common::release::Server;
use common::upload::BOUNDARY;
use serde_json::Value;

const MIB: usize = 1024 * 1024;
/// Allowed growth of peak resident memory over the whole test, in KiB.
const PEAK_GROWTH_MAX_KIB: u64 = 64 * 1024;

/// Every name under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_oversized_uploads_stay_bounded_in_memory() {
    // `Server::start` builds a reqwest client, which needs the process-wide provider.
    common::fake::install_crypto_provider();
    let mut server = Server::start("[rag]\nfile-max-size-mb = 10\n", &[]).await;
    let client = common::fake::http_client();
    let token = server.signup(&client).await;
    let uploads = server.dir.path().join("data").join("uploads");
    let before: Vec<String> = files_under(&uploads);
    // Start-up (the embedding model) may have set a high-water mark far above the resident
    // memory now, which would hide any growth below it: reset it to the current RSS first.
    std::fs::write(format!("/proc/{}/clear_refs", server.pid()), "5").unwrap();
    let base = server.peak_kib();
    eprintln!("RSS {} KiB, peak after reset {base} KiB", server.rss_kib());

    // 300 MiB in field `file`, limit 10 MiB.
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.txt\"\r\n\
         Content-Type: text/plain\r\n\r\n"
    );
    let (status, body) = chunked_upload(&server.url, &token, head.as_bytes(), 300 * MIB).await;
    assert_eq!(status, 413, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["detail"].as_str().unwrap().contains("less than 10 MB"),
        "{v}"
    );
    assert!(server.alive(), "the gateway survived the 300 MiB upload");

    // 50 MiB in field `metadata` (limit 64 KiB).
    let head = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n");
    let (status, body) = chunked_upload(&server.url, &token, head.as_bytes(), 50 * MIB).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("metadata"), "{body}");

    // 50 MiB of one part header line.
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nX-Pad: "
    );
    let (status, body) = chunked_upload(&server.url, &token, head.as_bytes(), 50 * MIB).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("header"), "{body}");

    let grown = server.peak_kib().saturating_sub(base);
    eprintln!("peak RSS grew by {grown} KiB (base {base} KiB, bound {PEAK_GROWTH_MAX_KIB} KiB)");
    assert!(
        grown <= PEAK_GROWTH_MAX_KIB,
        "peak RSS grew by {grown} KiB, bound {PEAK_GROWTH_MAX_KIB} KiB"
    );
    assert!(server.alive());
    assert_eq!(
        files_under(&uploads),
        before,
        "no temporary file or blob left behind"
    );
    // Still serving.
    let r = client
        .get(format!("{}/api/v1/files/", server.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["total"], 0);
}
