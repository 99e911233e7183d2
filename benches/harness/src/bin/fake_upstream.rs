//! A fast fake Ollama + OpenAI-compatible upstream for the side-by-side benchmark
//! (`benches/side_by_side.py`): real wire formats and no model, so what is measured is the
//! proxy in front of it. Keep-alive HTTP/1.1; every streamed chunk is its own write, as
//! Ollama flushes every token.
//!
//! `fake_upstream PORT [CHUNKS] [DELAY_MS] [TOKEN_BYTES]` (defaults 200, 5, 4)
//!
//! The model named in the request picks the stream's shape, so one upstream (and one proxy
//! configuration) serves every scenario:
//! - `m:latest`: `CHUNKS` chunks, back to back;
//! - `slow:latest`: `CHUNKS` chunks, `DELAY_MS` before each;
//! - `ttfb:latest`: 5 chunks, `DELAY_MS` before each (time to first chunk, c=1).
//!
//! Each chunk carries `TOKEN_BYTES` bytes of text.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head or body read; a benchmark never comes close, and a bound keeps a
/// stray client from growing the buffer without end.
const MAX_REQUEST: usize = 1 << 20;

#[derive(Clone, Copy)]
struct Config {
    chunks: usize,
    delay: Duration,
    token_bytes: usize,
}

/// What one request asks for.
#[derive(Clone, Copy)]
struct Shape {
    chunks: usize,
    delay: Duration,
}

impl Config {
    fn shape(&self, body: &str) -> Shape {
        if body.contains("\"ttfb:") {
            Shape {
                chunks: 5,
                delay: self.delay,
            }
        } else if body.contains("\"slow:") {
            Shape {
                chunks: self.chunks,
                delay: self.delay,
            }
        } else {
            Shape {
                chunks: self.chunks,
                delay: Duration::ZERO,
            }
        }
    }
}

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port = u16::try_from(arg(1, 11500)).unwrap_or(11500);
    let config = Config {
        chunks: usize::try_from(arg(2, 200)).unwrap_or(200),
        delay: Duration::from_millis(arg(3, 5)),
        token_bytes: usize::try_from(arg(4, 4)).unwrap_or(4).max(1),
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = serve(s, config).await;
        });
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads more into `buf`; `false` at end of stream.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    if buf.len() > MAX_REQUEST {
        return Err(std::io::Error::other("request too large"));
    }
    buf.reserve(16384);
    let n = s.read_buf(buf).await?;
    Ok(n > 0)
}

/// One request: its path and body. Bodies come with `content-length` or chunked (nginx may
/// forward either).
async fn read_request(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if !fill(s, buf).await? {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 4);
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let line = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if !fill(s, buf).await? {
                    return Ok(None);
                }
            };
            let size_text = String::from_utf8_lossy(&buf[..line]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            while buf.len() < line + 2 + size + 2 {
                if !fill(s, buf).await? {
                    return Ok(None);
                }
            }
            body.extend_from_slice(&buf[line + 2..line + 2 + size]);
            buf.drain(..line + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else {
        let length = header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if length > MAX_REQUEST {
            return Err(std::io::Error::other("request too large"));
        }
        while buf.len() < length {
            if !fill(s, buf).await? {
                return Ok(None);
            }
        }
        body = buf.drain(..length).collect();
    }
    let path = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    Ok(Some((path, body)))
}

async fn json(s: &mut TcpStream, body: &str) -> std::io::Result<()> {
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(reply.as_bytes()).await
}

async fn stream(
    s: &mut TcpStream,
    content_type: &str,
    parts: impl Iterator<Item = String>,
    delay: Duration,
) -> std::io::Result<()> {
    s.write_all(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    for p in parts {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        s.write_all(format!("{:x}\r\n{p}\r\n", p.len()).as_bytes())
            .await?;
    }
    s.write_all(b"0\r\n\r\n").await
}

const TAGS: &str = r#"{"models":[{"name":"m:latest","model":"m:latest","modified_at":"2024-01-01T00:00:00Z","size":1,"digest":"d1","details":{"format":"gguf","family":"llama"}},{"name":"slow:latest","model":"slow:latest","modified_at":"2024-01-01T00:00:00Z","size":1,"digest":"d2","details":{"format":"gguf","family":"llama"}},{"name":"ttfb:latest","model":"ttfb:latest","modified_at":"2024-01-01T00:00:00Z","size":1,"digest":"d3","details":{"format":"gguf","family":"llama"}}]}"#;

const V1_MODELS: &str = r#"{"object":"list","data":[{"id":"m:latest","object":"model","created":0,"owned_by":"library"},{"id":"slow:latest","object":"model","created":0,"owned_by":"library"},{"id":"ttfb:latest","object":"model","created":0,"owned_by":"library"}]}"#;

/// Ollama's native NDJSON (`/api/generate`, `/api/chat`).
async fn native(
    s: &mut TcpStream,
    chat: bool,
    streamed: bool,
    shape: Shape,
    token: &str,
) -> std::io::Result<()> {
    let piece = |t: &str, done: bool| {
        let content = if chat {
            format!(r#""message":{{"role":"assistant","content":"{t}"}}"#)
        } else {
            format!(r#""response":"{t}""#)
        };
        if done {
            format!(
                r#"{{"model":"m:latest","created_at":"2024-01-01T00:00:00Z",{content},"done":true,"done_reason":"stop","prompt_eval_count":10,"eval_count":{}}}"#,
                shape.chunks
            ) + "\n"
        } else {
            format!(
                r#"{{"model":"m:latest","created_at":"2024-01-01T00:00:00Z",{content},"done":false}}"#
            ) + "\n"
        }
    };
    if streamed {
        let parts = (0..shape.chunks)
            .map(|_| piece(token, false))
            .chain(std::iter::once(piece("", true)));
        stream(s, "application/x-ndjson", parts, shape.delay).await
    } else {
        json(s, piece(&token.repeat(shape.chunks), true).trim_end()).await
    }
}

/// OpenAI-compatible chat (`/v1/chat/completions`): SSE when asked to stream, else JSON.
async fn openai_chat(
    s: &mut TcpStream,
    body: &str,
    shape: Shape,
    token: &str,
) -> std::io::Result<()> {
    let chunk = |delta: &str, finish: &str| {
        format!(
            r#"data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":"m:latest","system_fingerprint":"fp_ollama","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]}}"#
        ) + "\n\n"
    };
    let (prompt, completion) = (10, shape.chunks);
    let usage = format!(
        r#""usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}"#,
        prompt + completion
    );
    if body.contains("\"stream\":true") || body.contains("\"stream\": true") {
        let with_usage =
            body.contains("\"include_usage\":true") || body.contains("\"include_usage\": true");
        let content = format!(r#"{{"role":"assistant","content":"{token}"}}"#);
        let parts = (0..shape.chunks)
            .map(|_| chunk(&content, "null"))
            .chain(std::iter::once(chunk("{}", "\"stop\"")))
            .chain(with_usage.then(|| {
                format!(
                    r#"data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":"m:latest","choices":[],{usage}}}"#
                ) + "\n\n"
            }))
            .chain(std::iter::once("data: [DONE]\n\n".to_string()));
        stream(s, "text/event-stream", parts, shape.delay).await
    } else {
        let text = token.repeat(shape.chunks);
        json(
            s,
            &format!(
                r#"{{"id":"chatcmpl-1","object":"chat.completion","created":0,"model":"m:latest","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},"finish_reason":"stop"}}],{usage}}}"#
            ),
        )
        .await
    }
}

async fn serve(mut s: TcpStream, config: Config) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let token = "x".repeat(config.token_bytes);
    while let Some((path, body)) = read_request(&mut s, &mut buf).await? {
        let body = String::from_utf8_lossy(&body);
        let shape = config.shape(&body);
        // Ollama streams unless told not to.
        let streamed = !body.contains("\"stream\":false") && !body.contains("\"stream\": false");
        match path.as_str() {
            "/api/tags" => json(&mut s, TAGS).await?,
            "/api/version" => json(&mut s, r#"{"version":"0.6.0"}"#).await?,
            "/api/ps" => json(&mut s, r#"{"models":[]}"#).await?,
            "/api/show" => {
                json(
                    &mut s,
                    r#"{"license":"","modelfile":"FROM m","parameters":"stop \"<|eot_id|>\"","template":"{{ .Prompt }}","details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],"parameter_size":"3.2B","quantization_level":"Q4_K_M"},"model_info":{"general.architecture":"llama","llama.context_length":8192},"capabilities":["completion"]}"#,
                )
                .await?;
            }
            "/api/embed" => {
                json(
                    &mut s,
                    r#"{"model":"m:latest","embeddings":[[0.1,0.2,0.3,0.4]],"total_duration":1000,"load_duration":10,"prompt_eval_count":4}"#,
                )
                .await?;
            }
            "/v1/models" => json(&mut s, V1_MODELS).await?,
            "/api/generate" => native(&mut s, false, streamed, shape, &token).await?,
            "/api/chat" => native(&mut s, true, streamed, shape, &token).await?,
            "/v1/chat/completions" => openai_chat(&mut s, &body, shape, &token).await?,
            _ => {
                s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 22\r\n\r\n{\"error\":\"not found\"}\n").await?;
            }
        }
    }
    Ok(())
}
