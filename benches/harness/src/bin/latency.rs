//! Latency at c=1 for the side-by-side benchmark: time to the first streamed chunk, or the
//! whole answer of a non-streamed call, over several targets on one keep-alive connection
//! each, interleaved request by request (the order rotates every request).
//!
//! `latency --mode ttfb|full --requests N [--warm W] --body JSON NAME,PORT,PATH[,TOKEN] ...`
//!
//! W requests per target (default N/10, at least 3) run first and are not recorded.
//!
//! Prints one line per target: `RESULT NAME P50_US P99_US SAMPLES`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest answer head accepted; the fake upstream and the proxies send a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// How long one request may take before the run is abandoned (a hung proxy).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

struct Target {
    name: String,
    port: u16,
    request: Vec<u8>,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
    samples: Vec<Duration>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Until the first non-empty chunk of a chunked body is in.
    FirstChunk,
    /// Until the whole answer is in.
    Full,
}

fn usage() -> ! {
    eprintln!(
        "usage: latency --mode ttfb|full --requests N [--warm W] --body JSON NAME,PORT,PATH[,TOKEN] ..."
    );
    std::process::exit(2)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn fill(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.reserve(16384);
    let n = conn.read_buf(buf).await?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed mid-answer",
        ));
    }
    Ok(())
}

/// Sends one request and reads its answer; returns the measured time and whether the
/// connection may be reused.
async fn one(t: &mut Target, mode: Mode) -> std::io::Result<(Duration, bool)> {
    if t.conn.is_none() {
        let c = TcpStream::connect(("127.0.0.1", t.port)).await?;
        c.set_nodelay(true)?;
        t.conn = Some(c);
        t.buf.clear();
    }
    let conn = t.conn.as_mut().expect("connected above");
    let buf = &mut t.buf;
    let started = Instant::now();
    conn.write_all(&t.request).await?;
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("answer head too long"));
        }
        fill(conn, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    buf.drain(..end + 4);
    if !head.starts_with("http/1.1 200") {
        let status = head.lines().next().unwrap_or_default().to_string();
        return Err(std::io::Error::other(format!(
            "{}: answered {status}",
            t.name
        )));
    }
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let reuse = header("connection").is_none_or(|v| v != "close");
    let mut first = None;
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let line = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                fill(conn, buf).await?;
            };
            let text = String::from_utf8_lossy(&buf[..line]).into_owned();
            let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            while buf.len() < line + 2 + size + 2 {
                fill(conn, buf).await?;
            }
            buf.drain(..line + 2 + size + 2);
            if size > 0 && first.is_none() {
                first = Some(started.elapsed());
            }
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while buf.len() < length {
            fill(conn, buf).await?;
        }
        buf.drain(..length);
    } else {
        return Err(std::io::Error::other(format!(
            "{}: answer without length or chunked framing",
            t.name
        )));
    }
    let whole = started.elapsed();
    let took = match mode {
        Mode::Full => whole,
        Mode::FirstChunk => first.ok_or_else(|| {
            std::io::Error::other(format!("{}: no streamed chunk in the answer", t.name))
        })?,
    };
    Ok((took, reuse))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank: the smallest sample with at least p of them at or below it.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut mode, mut requests, mut body) = (Mode::Full, 200usize, String::new());
    let mut warm = None;
    let mut targets = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => {
                mode = match args.next().as_deref() {
                    Some("ttfb") => Mode::FirstChunk,
                    Some("full") => Mode::Full,
                    _ => usage(),
                }
            }
            "--requests" => {
                requests = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage());
            }
            "--warm" => {
                warm = Some(
                    args.next()
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or_else(|| usage()),
                );
            }
            "--body" => body = args.next().unwrap_or_else(|| usage()),
            spec => {
                let parts: Vec<&str> = spec.split(',').collect();
                if parts.len() < 3 {
                    usage();
                }
                let port = parts[1].parse().unwrap_or_else(|_| usage());
                let auth = parts
                    .get(3)
                    .map(|t| format!("authorization: Bearer {t}\r\n"))
                    .unwrap_or_default();
                let request = format!(
                    "POST {} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\n\r\n{body}",
                    parts[2],
                    body.len()
                )
                .into_bytes();
                targets.push(Target {
                    name: parts[0].to_string(),
                    port,
                    request,
                    conn: None,
                    buf: Vec::new(),
                    samples: Vec::with_capacity(requests),
                });
            }
        }
    }
    if targets.is_empty() || requests == 0 {
        usage();
    }
    // Warm-up: connections open, caches (model list, key cache) filled; not recorded.
    let warm = warm.unwrap_or((requests / 10).max(3));
    for i in 0..warm + requests {
        let n = targets.len();
        for k in 0..n {
            let t = &mut targets[(i + k) % n];
            let (took, reuse) = match tokio::time::timeout(REQUEST_TIMEOUT, one(t, mode)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    eprintln!("latency: {}: {e}", t.name);
                    std::process::exit(1);
                }
                Err(_) => {
                    eprintln!("latency: {}: no answer in {REQUEST_TIMEOUT:?}", t.name);
                    std::process::exit(1);
                }
            };
            if !reuse {
                t.conn = None;
            }
            if i >= warm {
                t.samples.push(took);
            }
        }
    }
    for t in &mut targets {
        t.samples.sort_unstable();
        println!(
            "RESULT {} {} {} {}",
            t.name,
            percentile(&t.samples, 0.5).as_micros(),
            percentile(&t.samples, 0.99).as_micros(),
            t.samples.len()
        );
    }
}
