//! Ingestion throughput of the release binary, measured as a client sees it: upload → status
//! `completed` (extracted, chunked, embedded, indexed and committed), for
//!
//! - one 1 MB English text file (Debian's licence texts in `/usr/share/common-licenses`,
//!   concatenated in name order and repeated to 1,000,000 bytes: the same bytes on every
//!   Debian machine; its sha256 is printed), and
//! - a folder of small files uploaded as separate files, 4 in flight (the first `SMALL`
//!   abstracts of `../shared/datasets/nfcorpus`, else 1,200-byte pieces of the licence texts),
//!
//! with each configuration in its own `ragway serve` process, rounds interleaved (A, B, A, B)
//! so a busy machine slows both alike. Reports seconds, tokens/s (tokens actually embedded:
//! each chunk as the gateway splits it, truncated to the model's 256), CPU-seconds per chunk
//! (user + system of the server process), peak resident memory (`VmHWM`) and the time to add
//! the 1 MB file to a collection (must not re-embed).
//!
//! Run: `benches/ingest.sh` (builds the release binary, then `cargo bench --bench ingest`).
//! Environment: `ROUNDS` (default 1), `SMALL` (default 400 files), `STATUS` (`stream`, the
//! default: clients wait on the status event stream; `poll`: every 50 ms), `VARIANTS` (default
//! `before,after`: `before` is the former defaults, one float session and two workers; `after`
//! the machine-sized defaults; `base`: the defaults on the binary named by `RAGWAY_BASE_BIN`,
//! e.g. a build of an earlier commit, to compare two builds in one run; `model`: the model
//! alone, in this process, on the texts the server embeds for each case, to tell the per-file
//! cost from the model's cost on those texts), `RAGWAY_RELEASE_BIN`, `RAGWAY_LOG` (the
//! servers' log filter, default `warn`; `info` shows each file's "file processed" line with
//! the seconds its extraction, embedding and commit took).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const BOUNDARY: &str = "ragway-bench-boundary-d41d8cd98f00b204";
const ONE_MB: usize = 1_000_000;
/// The model's input limit (tokens, `[CLS]`/`[SEP]` included).
const MAX_TOKENS: usize = 256;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The licence texts, each file once (several names are symlinks to the same text).
fn licence_texts() -> Vec<String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir("/usr/share/common-licenses")
        .expect("/usr/share/common-licenses (Debian's base-files)")
        .map(|e| e.unwrap().path())
        .filter(|p| p.symlink_metadata().is_ok_and(|m| m.file_type().is_file()))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap().replace("\r\n", "\n"))
        .collect()
}

fn one_mb_text() -> String {
    let texts = licence_texts();
    let mut out = String::with_capacity(ONE_MB + 64 * 1024);
    let mut round = 0;
    while out.len() < ONE_MB {
        round += 1;
        for t in &texts {
            out.push_str(&format!("Part {round}.\n\n"));
            out.push_str(t);
            out.push_str("\n\n");
        }
    }
    let cut = out[..ONE_MB].rfind("\n\n").unwrap_or(ONE_MB);
    out.truncate(cut);
    out.push('\n');
    out
}

fn small_files(n: usize) -> Vec<(String, String)> {
    let corpus = root().join("../shared/datasets/nfcorpus/corpus.jsonl");
    if let Ok(text) = std::fs::read_to_string(&corpus) {
        return text
            .lines()
            .take(n)
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    format!("{}.txt", v["_id"].as_str().unwrap()),
                    format!(
                        "{}\n\n{}\n",
                        v["title"].as_str().unwrap(),
                        v["text"].as_str().unwrap()
                    ),
                )
            })
            .collect();
    }
    let all = licence_texts().join("\n\n");
    let mut out = Vec::new();
    let mut rest = all.as_str();
    while out.len() < n && rest.len() > 1200 {
        let mut cut = 1200;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push((
            format!("piece-{:04}.txt", out.len()),
            rest[..cut].to_string(),
        ));
        rest = &rest[cut..];
    }
    out
}

/// Token positions the model computes for chunks of `tokens` tokens in batches of 32 padded
/// to their longest, when ordered by `key`.
fn padded(tokens: &[(usize, usize)], key: impl Fn(&(usize, usize)) -> usize) -> usize {
    let mut sorted = tokens.to_vec();
    sorted.sort_by_key(key);
    sorted
        .chunks(32)
        .map(|b| b.len() * b.iter().map(|t| t.1).max().unwrap_or(0))
        .sum()
}

/// The texts the model embeds for `text`: the gateway's own chunks (default 1000/100
/// characters) under the document's title as the default `rag.title-in-chunks` embeds them,
/// newlines as spaces.
fn chunk_texts(name: &str, text: &str) -> Vec<String> {
    let doc = ragway::extract::extract(text.as_bytes(), name, Some("text/plain")).unwrap();
    let title = ragway::chunk::Title::of(&doc, name);
    let cfg = ragway::chunk::ChunkConfig {
        size: 1000,
        overlap: 100,
        markdown_headers: true,
        splitter: ragway::chunk::Splitter::Character,
    };
    ragway::chunk::split(&doc, &cfg)
        .iter()
        .map(|c| ragway::chunk::Title::apply(title.as_ref(), &c.text).replace('\n', " "))
        .collect()
}

/// (bytes, tokens) of each text the model embeds for `text` ([`chunk_texts`]), each
/// truncated to [`MAX_TOKENS`].
fn chunk_tokens(tokenizer: &tokenizers::Tokenizer, name: &str, text: &str) -> Vec<(usize, usize)> {
    chunk_texts(name, text)
        .iter()
        .map(|t| {
            let n = tokenizer.encode_fast(t.as_str(), true).unwrap().len();
            (t.len(), n.min(MAX_TOKENS))
        })
        .collect()
}

/// The model alone on `texts`, in this process: the embedder the server runs by default
/// (int8 kernels, a session per core) given every text in one call. What the API adds on
/// top of this is the per-file cost; what it leaves is the model's cost on these texts
/// (attention grows with the square of a text's length, so tokens/s depends on the texts).
fn model_only(
    embedder: &dyn ragway::embed::Embedder,
    texts: &[String],
    runtime: &tokio::runtime::Runtime,
) -> f64 {
    let start = Instant::now();
    let vectors = runtime
        .block_on(embedder.embed(texts.to_vec()))
        .expect("embedding");
    assert_eq!(vectors.len(), texts.len());
    start.elapsed().as_secs_f64()
}

/// How long the embedded texts are, in tokens: the model's cost per token grows with a
/// text's length (attention compares every token with every other), so two sets of texts
/// reach different tokens/s on the same model.
fn length_profile(chunks: &[(usize, usize)]) -> String {
    let mut lengths: Vec<usize> = chunks.iter().map(|c| c.1).collect();
    lengths.sort_unstable();
    let at = |q: f64| lengths[((lengths.len() - 1) as f64 * q) as usize];
    let sum: usize = lengths.iter().sum();
    let squares: usize = lengths.iter().map(|n| n * n).sum();
    format!(
        "tokens per text: mean {:.0}, p10 {}, median {}, p90 {}; length-weighted mean {:.0}",
        sum as f64 / lengths.len() as f64,
        at(0.1),
        at(0.5),
        at(0.9),
        squares as f64 / sum as f64
    )
}

/// (chunks, tokens) of `text`.
fn embedded_tokens(tokenizer: &tokenizers::Tokenizer, name: &str, text: &str) -> (usize, usize) {
    let t = chunk_tokens(tokenizer, name, text);
    (t.len(), t.iter().map(|x| x.1).sum())
}

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
    client: reqwest::Client,
    token: String,
}

impl Server {
    async fn start(bin: &Path, extra: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("ragway.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nmetrics-listen = \"\"\ndata-dir = {:?}\n\
                 [auth]\nadmin-email = \"bench@example.com\"\nadmin-password = \"pw-123456\"\n{extra}\n",
                dir.path().join("data").display().to_string()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin);
        for v in [
            "CHUNK_SIZE",
            "CHUNK_OVERLAP",
            "RAG_EMBEDDING_ENGINE",
            "DATA_DIR",
            "PORT",
        ] {
            cmd.env_remove(v);
        }
        let child = cmd
            .args(["serve", "--config"])
            .arg(&config)
            .current_dir(root())
            .env(
                "RAGWAY_LOG",
                std::env::var("RAGWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("release binary starts");
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = client.get(format!("{url}/health")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let v: Value = client
            .post(format!("{url}/api/v1/auths/signin"))
            .json(&json!({"email": "bench@example.com", "password": "pw-123456"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = v["token"].as_str().expect("sign-in").to_string();
        Server {
            child,
            url,
            _dir: dir,
            client,
            token,
        }
    }

    fn status_kib(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// User + system CPU seconds of the server process so far.
    fn cpu_secs(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let after = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split(' ').collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        // SAFETY: sysconf only reads a constant of the C library.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks / per_sec
    }

    async fn upload(&self, name: &str, text: &str) -> String {
        let mut body = Vec::new();
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
                 Content-Type: text/plain\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(text.as_bytes());
        body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        let r = self
            .client
            .post(format!("{}/api/v1/files/", self.url))
            .bearer_auth(&self.token)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "upload {name}");
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits for `completed`: on the status event stream (`?stream=true`, one event per
    /// change) when `stream`, else by polling every 50 ms, which adds up to 50 ms to every
    /// file (25 on average) and, with a fixed number of uploads in flight, leaves the server
    /// idle meanwhile.
    async fn wait_completed(&self, id: &str, stream: bool) {
        if stream {
            let mut r = self
                .client
                .get(format!(
                    "{}/api/v1/files/{id}/process/status?stream=true",
                    self.url
                ))
                .bearer_auth(&self.token)
                .send()
                .await
                .unwrap();
            let mut seen = String::new();
            while let Some(chunk) = r.chunk().await.unwrap() {
                seen.push_str(&String::from_utf8_lossy(&chunk));
                if seen.contains("\"completed\"") {
                    return;
                }
                assert!(!seen.contains("\"failed\""), "file {id}: {seen}");
            }
            panic!("file {id}: stream ended with {seen}");
        }
        loop {
            let v: Value = self
                .client
                .get(format!("{}/api/v1/files/{id}/process/status", self.url))
                .bearer_auth(&self.token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match v["status"].as_str() {
                Some("completed") => return,
                Some("pending") => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => panic!("file {id}: {v}"),
            }
        }
    }

    /// Seconds to create a collection and add the file to it.
    async fn knowledge_add(&self, id: &str) -> f64 {
        let start = Instant::now();
        let kb: Value = self
            .client
            .post(format!("{}/api/v1/knowledge/create", self.url))
            .bearer_auth(&self.token)
            .json(&json!({"name": "bench", "description": ""}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let kb = kb["id"].as_str().unwrap();
        let r = self
            .client
            .post(format!("{}/api/v1/knowledge/{kb}/file/add", self.url))
            .bearer_auth(&self.token)
            .json(&json!({"file_id": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        start.elapsed().as_secs_f64()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn variant_toml(name: &str) -> &'static str {
    match name {
        "before" => "[embedding]\nsessions = 1\nint8 = false\n[rag]\nworkers = 2",
        "after" | "base" => "",
        other => panic!("unknown variant {other:?} (before, after, base)"),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let bin = std::env::var_os("RAGWAY_RELEASE_BIN")
        .map_or_else(|| root().join("target/release/ragway"), PathBuf::from);
    assert!(
        bin.exists(),
        "{} missing: run benches/ingest.sh",
        bin.display()
    );
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let small_n: usize = std::env::var("SMALL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let variants: Vec<String> = std::env::var("VARIANTS")
        .unwrap_or_else(|_| "before,after".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(root().join("models/all-MiniLM-L6-v2/tokenizer.json"))
            .expect("tokenizer.json: run scripts/fetch-model.sh");
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).unwrap();

    let big = one_mb_text();
    let (big_chunks, big_tokens) = embedded_tokens(&tokenizer, "big.txt", &big);
    let per_chunk = chunk_tokens(&tokenizer, "big.txt", &big);
    println!(
        "1 MB file, token positions computed in batches of 32: sorted by bytes {} (+{:.1} % \
         padding), by tokens {} (+{:.1} %)",
        padded(&per_chunk, |t| t.0),
        (padded(&per_chunk, |t| t.0) as f64 / big_tokens as f64 - 1.0) * 100.0,
        padded(&per_chunk, |t| t.1),
        (padded(&per_chunk, |t| t.1) as f64 / big_tokens as f64 - 1.0) * 100.0,
    );
    let small = small_files(small_n);
    let (small_chunks, small_tokens) = small.iter().fold((0, 0), |(c, t), (n, text)| {
        let (c2, t2) = embedded_tokens(&tokenizer, n, text);
        (c + c2, t + t2)
    });
    println!(
        "1 MB file: {} bytes, sha256 {}, {big_chunks} chunks, {big_tokens} tokens",
        big.len(),
        hex::encode(Sha256::digest(big.as_bytes()))
    );
    println!(
        "small files: {} files, {small_chunks} chunks, {small_tokens} tokens; cores {}",
        small.len(),
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    );

    let small_per_chunk: Vec<(usize, usize)> = small
        .iter()
        .flat_map(|(n, text)| chunk_tokens(&tokenizer, n, text))
        .collect();
    for (what, chunks) in [("1 MB file", &per_chunk), ("small files", &small_per_chunk)] {
        println!("{what}: {}", length_profile(chunks));
    }

    pingora::tls::install_default_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stream = match std::env::var("STATUS").as_deref() {
        Ok("poll") => false,
        Ok("stream") | Err(_) => true,
        Ok(other) => panic!("STATUS={other:?}: poll or stream"),
    };
    println!(
        "clients wait for completion by {}",
        if stream {
            "the status event stream"
        } else {
            "polling every 50 ms"
        }
    );
    let base = std::env::var_os("RAGWAY_BASE_BIN").map(PathBuf::from);
    let bin_of = |v: &str| {
        if v == "base" {
            base.clone().expect("variant base needs RAGWAY_BASE_BIN")
        } else {
            bin.clone()
        }
    };
    let model = variants.iter().any(|v| v == "model").then(|| {
        // The allocator settings `ragway serve` runs with.
        ragway::heap::tune_for_proxy();
        let dir = root().join("models");
        let library = std::env::var_os("ORT_DYLIB_PATH")
            .map_or_else(|| dir.join("onnxruntime/libonnxruntime.so"), PathBuf::from);
        let sessions = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let embedder = ragway::embed::onnx::OnnxEmbedder::load(
            &dir.join("all-MiniLM-L6-v2"),
            &library,
            sessions,
            "all-MiniLM-L6-v2",
        )
        .expect("the model: run scripts/fetch-model.sh");
        let big_texts = chunk_texts("big.txt", &big);
        let small_texts: Vec<String> = small
            .iter()
            .flat_map(|(name, text)| chunk_texts(name, text))
            .collect();
        (embedder, big_texts, small_texts)
    });
    for round in 1..=rounds {
        for v in &variants {
            if v == "model" {
                let (embedder, big_texts, small_texts) = model.as_ref().expect("loaded above");
                for (what, texts, tokens) in [
                    ("1MB", big_texts, big_tokens),
                    ("small", small_texts, small_tokens),
                ] {
                    let secs = model_only(embedder, texts, &rt);
                    println!(
                        "round {round}  model {what}: {secs:6.1} s  {:7.0} tok/s  (the model \
                         alone on the same texts, in one call)  load {}",
                        tokens as f64 / secs,
                        loadavg()
                    );
                }
                continue;
            }
            rt.block_on(async {
                let bin = bin_of(v);
                let s = Server::start(&bin, variant_toml(v)).await;
                let idle = s.status_kib("VmRSS:");
                let cpu0 = s.cpu_secs();
                let start = Instant::now();
                let id = s.upload("big.txt", &big).await;
                s.wait_completed(&id, stream).await;
                let secs = start.elapsed().as_secs_f64();
                let cpu = s.cpu_secs() - cpu0;
                let add = s.knowledge_add(&id).await;
                println!(
                    "round {round} {v:>6} 1MB: {secs:6.1} s  {:7.0} tok/s  {:.4} CPU-s/chunk  \
                     {:.3} CPU-ms/token  {:.2} cores busy  \
                     peak {} MiB (idle {} MiB)  knowledge add {add:.3} s  load {}",
                    big_tokens as f64 / secs,
                    cpu / big_chunks as f64,
                    cpu * 1000.0 / big_tokens as f64,
                    cpu / secs,
                    s.status_kib("VmHWM:") / 1024,
                    idle / 1024,
                    loadavg()
                );
                drop(s);

                let s = Server::start(&bin, variant_toml(v)).await;
                let cpu0 = s.cpu_secs();
                let start = Instant::now();
                let s_ref = &s;
                use futures_util::StreamExt;
                futures_util::stream::iter(small.iter())
                    .map(|(name, text)| async move {
                        let id = s_ref.upload(name, text).await;
                        s_ref.wait_completed(&id, stream).await;
                    })
                    .buffer_unordered(4)
                    .collect::<Vec<()>>()
                    .await;
                let secs = start.elapsed().as_secs_f64();
                let cpu = s.cpu_secs() - cpu0;
                println!(
                    "round {round} {v:>6} small: {secs:6.1} s  {:7.0} tok/s  {:.4} CPU-s/chunk  \
                     {:.3} CPU-ms/token  {:.2} cores busy  {:.1} files/s  peak {} MiB  load {}",
                    small_tokens as f64 / secs,
                    cpu / small_chunks as f64,
                    cpu * 1000.0 / small_tokens as f64,
                    cpu / secs,
                    small.len() as f64 / secs,
                    s.status_kib("VmHWM:") / 1024,
                    loadavg()
                );
            });
        }
    }
}
