//! Memory bounds of extraction on the release binary: decompression bombs and a 20 MB
//! Markdown header line, uploaded through the HTTP API, must fail the file with a precise
//! error while the gateway's peak resident memory (`VmHWM`) grows by less than a stated bound.
//!
//! The embedding engine is Ollama at a dead address (no ONNX model is loaded, so the process
//! stays light and the numbers are about extraction): bombs fail before embedding, and the
//! header file fails at embedding, after extraction and chunking.
//!
//! Measured on the loaded 2-core VM (growth of the peak over the pre-upload peak, all five
//! files in sequence): 91 MiB with child-process extraction (the 20 MB text comes back as
//! JSON and is chunked in the gateway; the bombs cost the gateway nothing) and 80 MiB with
//! in-process extraction (the same text, plus 16 MiB capped inflation buffers). Before the
//! limits, the 20 MB header file aborted the process and each bomb inflated to 512 MiB or
//! more.

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::bombs::pdf;
use common::release::Server;
use common::upload::{BOUNDARY, file_body};
use serde_json::Value;

const MIB: usize = 1024 * 1024;
/// Largest growth of the gateway's peak RSS over the whole sequence of hostile uploads.
const PEAK_GROWTH_BOUND_KIB: u64 = 150 * 1024;

const CONFIG: &str = "[embedding]
engine = \"ollama\"
url = \"http://127.0.0.1:9\"
model = \"dead\"
[rag]
file-max-size-mb = 32
extract-stream-max-mb = 16
";

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Zlib data inflating to `n` zero bytes, made 1 MiB at a time so the test itself stays small.
fn zlib_zeros(n: usize) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let block = vec![0u8; MIB];
    for _ in 0..n / MIB {
        e.write_all(&block).unwrap();
    }
    e.finish().unwrap()
}

fn docx_bomb() -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    w.start_file("word/document.xml", options).unwrap();
    w.write_all(b"<w:document xmlns:w=\"urn:w\"><w:body><w:p><w:r><w:t>")
        .unwrap();
    let block = vec![b'a'; MIB];
    for _ in 0..256 {
        w.write_all(&block).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn many_members() -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..200_000 {
        w.start_file(format!("{i}"), options).unwrap();
    }
    w.finish().unwrap().into_inner()
}

struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Client {
    async fn new(server: &Server) -> Client {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap();
        let token = server.signup(&http).await;
        Client {
            http,
            url: server.url.clone(),
            token,
        }
    }

    /// Uploads (background processing) and polls the status until it is final.
    async fn process(&self, name: &str, bytes: &[u8]) -> Value {
        let r = self
            .http
            .post(format!("{}/api/v1/files/", self.url))
            .bearer_auth(&self.token)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(file_body(name, "application/octet-stream", bytes, None))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "upload {name}: {text}");
        let id = serde_json::from_str::<Value>(&text).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let v: Value = self
                .http
                .get(format!("{}/api/v1/files/{id}/process/status", self.url))
                .bearer_auth(&self.token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["status"] != "pending" {
                return v;
            }
            assert!(Instant::now() < deadline, "{name} still pending");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Every hostile file, with the start of the error it must fail with.
fn hostile_files() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let header = format!("# {}\n\nbody\n", "x".repeat(20 * MIB));
    let zeros = zlib_zeros(512 * MIB);
    vec![
        (
            "bomb.pdf",
            pdf("/Filter /FlateDecode", &zeros),
            "PDF stream inflates beyond the limit of 16 MiB",
        ),
        (
            "stacked.pdf",
            pdf("/Filter [/FlateDecode /FlateDecode]", &zlib(&zeros)),
            "PDF stream inflates beyond the limit of 16 MiB",
        ),
        (
            "bomb.docx",
            docx_bomb(),
            "DOCX word/document.xml inflates beyond the limit of 16 MiB",
        ),
        (
            "members.docx",
            many_members(),
            "DOCX has more than 10000 ZIP members",
        ),
        // Extraction and chunking succeed; the dead embedding engine fails the file.
        ("header.md", header.into_bytes(), "embedding"),
    ]
}

async fn run(extractor: &str) {
    common::fake::install_crypto_provider();
    let files = hostile_files();
    let mut server = Server::start(CONFIG, &[("RAGWAY_EXTRACTOR", extractor)]).await;
    let client = Client::new(&server).await;
    // Warm up the upload and processing paths so the baseline includes their buffers.
    let v = client.process("warm.txt", b"warm up").await;
    assert_eq!(v["status"], "failed", "{v}");
    let before = server.peak_kib();
    for (name, bytes, error) in &files {
        let v = client.process(name, bytes).await;
        assert_eq!(v["status"], "failed", "{name}: {v}");
        let got = v["error"].as_str().unwrap_or_default();
        assert!(got.contains(error), "{name}: {got:?} lacks {error:?}");
        assert!(server.alive(), "gateway died on {name}");
    }
    let growth = server.peak_kib().saturating_sub(before);
    eprintln!(
        "extractor {extractor:?}: peak RSS grew by {} MiB",
        growth / 1024
    );
    assert!(
        growth < PEAK_GROWTH_BOUND_KIB,
        "peak RSS grew by {growth} KiB (bound {PEAK_GROWTH_BOUND_KIB} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bombs_in_the_child_process_leave_the_gateway_small() {
    let bin = common::release::binary();
    run(bin.to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bombs_in_process_are_bounded_by_the_inflation_limits() {
    run("in-process").await;
}
