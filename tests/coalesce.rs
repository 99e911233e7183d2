//! The forward engine's write coalescing: upstream chunks that are already in hand together go
//! to the client in one chunk (one write) instead of one per token, while a chunk that is
//! alone is sent at once. Checked on the wire: a raw upstream writes a whole stream in one
//! TCP write, and a raw client counts the chunk frames ragway sends.

mod common;

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::gateway::Setup;

const MODEL: &str = "m:latest";
/// Lines in the upstream's answer.
const LINES: usize = 100;

fn line(i: usize, done: bool) -> String {
    format!(
        "{{\"model\":\"{MODEL}\",\"message\":{{\"role\":\"assistant\",\"content\":\"t{i}\"}},\"done\":{done}{}}}\n",
        if done {
            ",\"prompt_eval_count\":3,\"eval_count\":100"
        } else {
            ""
        }
    )
}

/// The whole chat answer: a chunked head and `lines` chunks, one line each.
fn whole_answer(lines: usize) -> Vec<u8> {
    let mut out =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for i in 0..lines {
        let l = line(i, i + 1 == lines);
        out.extend_from_slice(format!("{:x}\r\n{l}\r\n", l.len()).as_bytes());
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Reads one request (head and `Content-Length` body); returns its request line.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            return head.lines().next().map(str::to_string);
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A raw Ollama: lists [`MODEL`] and answers every chat with a [`whole_answer`] of `lines`
/// lines in one write.
async fn upstream(lines: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(request_line) = read_request(&mut s, &mut buf).await {
                    let answer = if request_line.contains("/api/show") {
                        // A window large enough for a long prompt (the context budget's
                        // native route asks for it).
                        let body =
                            r#"{"parameters":"","model_info":{"llama.context_length":8192}}"#;
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes()
                    } else if request_line.contains("/api/tags") {
                        let body = format!(
                            "{{\"models\":[{{\"name\":\"{MODEL}\",\"model\":\"{MODEL}\",\"details\":{{}}}}]}}"
                        );
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes()
                    } else {
                        whole_answer(lines)
                    };
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// Sends a chat request on a raw connection and returns the chunk sizes of the answer's
/// body as framed on the wire (the terminating zero chunk excluded) and the body.
async fn chunk_frames(gw_url: &str, token: &str) -> (Vec<usize>, Vec<u8>) {
    let body = format!(
        "{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}"
    );
    chunk_frames_of(gw_url, token, "/ollama/api/chat", &body).await
}

/// [`chunk_frames`] of any POST.
async fn chunk_frames_of(
    gw_url: &str,
    token: &str,
    path: &str,
    body: &str,
) -> (Vec<usize>, Vec<u8>) {
    let (_, sizes, payload) = chunk_frames_with(gw_url, token, path, body, "").await;
    (sizes, payload)
}

/// [`chunk_frames_of`] with `extra` header lines (each ending in CRLF) in the request; also
/// returns the response head, lowercased.
async fn chunk_frames_with(
    gw_url: &str,
    token: &str,
    path: &str,
    body: &str,
    extra: &str,
) -> (String, Vec<usize>, Vec<u8>) {
    let addr = gw_url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n{extra}\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut wire = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut wire))
        .await
        .expect("the answer ends")
        .unwrap();
    let head_end = wire
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&wire[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut rest = &wire[head_end..];
    let mut sizes = Vec::new();
    let mut payload = Vec::new();
    loop {
        let nl = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
            .expect("a hexadecimal chunk size");
        rest = &rest[nl + 2..];
        if size == 0 {
            assert_eq!(rest, b"\r\n", "the body ends with the terminating chunk");
            break;
        }
        payload.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n");
        rest = &rest[size + 2..];
        sizes.push(size);
    }
    (head, sizes, payload)
}

/// A gateway in front of an [`upstream`] answering `lines` lines, with `toml` added to its
/// configuration and the model list loaded; returns it with an admin token.
async fn gateway(lines: usize, toml: &str) -> (common::gateway::Gateway, String) {
    let up = upstream(lines).await;
    let gw = Setup::new()
        .ollama(&up)
        .toml(&format!("{toml}[models]\ncache-ttl = \"1h\"\n"))
        .start()
        .await;
    let admin = gw.admin().await;
    let r = gw.get("/api/models?refresh=true", Some(&admin)).await;
    assert_eq!(r.status(), 200);
    (gw, admin)
}

/// The usage row of [`MODEL`].
async fn usage_row(gw: &common::gateway::Gateway, admin: &str) -> Value {
    let usage = gw.get("/api/v1/usage", Some(admin)).await;
    assert_eq!(usage.status(), 200);
    let v: Value = usage.json().await.unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == MODEL)
        .unwrap_or_else(|| panic!("a usage row for {MODEL}: {v}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_that_arrive_together_leave_together() {
    coalesced_on_the_wire("").await;
}

/// The same on one scheduler per thread (the release default; in-process test gateways
/// share one scheduler, see `tests/common/gateway.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_leave_together_with_per_thread_schedulers_too() {
    coalesced_on_the_wire("work-stealing = false\n").await;
}

async fn coalesced_on_the_wire(top: &str) {
    let (gw, admin) = gateway(LINES, top).await;
    let (sizes, payload) = chunk_frames(&gw.url, &admin).await;
    // Every line arrives, whole and in order.
    let expected: String = (0..LINES).map(|i| line(i, i + 1 == LINES)).collect();
    assert_eq!(String::from_utf8(payload).unwrap(), expected);
    for l in expected.lines() {
        let _: Value = serde_json::from_str(l).expect("each line is JSON");
    }
    // The upstream wrote all of them at once, so ragway had them in hand together: a few
    // writes at most (a TCP read may split them), never one per line.
    assert!(
        sizes.len() <= LINES / 10,
        "{} chunk frames for {LINES} lines that arrived in one write: {sizes:?}",
        sizes.len()
    );
    // The usage scan still sees the final line (it counts tokens from it).
    let row = usage_row(&gw, &admin).await;
    assert_eq!(row["prompt_tokens"], 3, "{row}");
    assert_eq!(row["completion_tokens"], 100, "{row}");
}

/// A client that accepts compressed answers still gets the stream as the upstream sent it:
/// ragway installs no compression module (pingora's default one, even switched off, ran on
/// every write), and a compressor would hold tokens back to fill its blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_never_compressed_whatever_the_client_accepts() {
    let (gw, admin) = gateway(LINES, "").await;
    let body = format!(
        "{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}"
    );
    let (head, sizes, payload) = chunk_frames_with(
        &gw.url,
        &admin,
        "/ollama/api/chat",
        &body,
        "accept-encoding: gzip, deflate, br, zstd\r\n",
    )
    .await;
    assert!(!head.contains("content-encoding"), "{head}");
    let expected: String = (0..LINES).map(|i| line(i, i + 1 == LINES)).collect();
    assert_eq!(String::from_utf8(payload).unwrap(), expected);
    assert!(sizes.len() <= LINES / 10, "{sizes:?}");
}

/// A burst larger than one client write: what ragway holds for a write is bounded (the
/// coalescing bound plus one read of pingora's 64 KiB body buffer), so the burst leaves in
/// several writes, every line whole and in order, and the usage scan still finds the counts
/// in the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_a_write_leaves_in_bounded_writes() {
    const BURST: usize = 6_000;
    let (gw, admin) = gateway(BURST, "").await;
    let (sizes, payload) = chunk_frames(&gw.url, &admin).await;
    let expected: String = (0..BURST).map(|i| line(i, i + 1 == BURST)).collect();
    assert!(expected.len() > 8 * ragway::proxy::batch::COALESCE_MAX);
    assert_eq!(String::from_utf8(payload).unwrap(), expected);
    let bound = ragway::proxy::batch::COALESCE_MAX + 64 * 1024;
    assert!(
        sizes.iter().all(|s| *s <= bound),
        "a write over {bound} bytes: {sizes:?}"
    );
    assert!(sizes.len() >= 8, "{sizes:?}");
    let row = usage_row(&gw, &admin).await;
    assert_eq!(row["completion_tokens"], 100, "{row}");
}

/// The same for an OpenAI stream that ragway converts from Ollama's native chat (a prompt
/// longer than Ollama's default window, so the context budget takes the native route): the
/// lines the upstream wrote at once are converted and leave together, and the stream still
/// ends as OpenAI's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_chunks_that_arrive_together_leave_together() {
    let (gw, admin) = gateway(LINES, "[context]\nollama-default-window = 512\n").await;
    let notes: String = (0..600).map(|i| format!("word{i} ")).collect();
    let body = serde_json::json!({"model": MODEL, "stream": true,
        "messages": [{"role": "user", "content": "What do the notes say?"}],
        "files": [{"type": "text", "content": notes, "name": "notes"}]});
    let (sizes, payload) =
        chunk_frames_of(&gw.url, &admin, "/api/chat/completions", &body.to_string()).await;
    let text = String::from_utf8(payload).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    // The sources event, one event per line, and the end.
    assert_eq!(events.len(), LINES + 2, "{text}");
    assert!(events[0].contains("\"sources\""), "{}", events[0]);
    for (i, e) in events[1..=LINES].iter().enumerate() {
        let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        let want = format!("t{i}");
        assert_eq!(v["choices"][0]["delta"]["content"], want.as_str(), "{e}");
    }
    assert_eq!(events[LINES + 1], "data: [DONE]");
    assert!(
        sizes.len() <= LINES / 10,
        "{} chunk frames for {LINES} lines that arrived in one write: {sizes:?}",
        sizes.len()
    );
}
