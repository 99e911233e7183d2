//! A fault-injecting fake Ollama upstream on raw TCP, for tests of what the gateway does when
//! an upstream misbehaves on the wire (hangs, stalls, resets, malformed answers) and of what
//! it does to the upstream when its own client goes away.
//!
//! The model list (`GET /api/tags`) is always answered properly with one model, `m:latest`,
//! so requests reach the forwarding paths; every other request gets the configured
//! [`Fault`]. The fake counts what it sees: requests, and connections the gateway closed
//! while the fake was still holding them (a failed write or an end of stream on read).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The model the fake lists.
pub const MODEL: &str = "m:latest";

/// One NDJSON line of an Ollama chat stream.
pub const LINE: &[u8] = b"{\"model\":\"m:latest\",\"message\":{\"role\":\"assistant\",\"content\":\"Hello\"},\"done\":false}\n";

/// How the body of an answer is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked` (a stream).
    Chunked,
    /// `Content-Length` announcing more than is sent (a whole JSON answer cut short).
    Length,
}

/// What the fake does with an inference request.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Reads the request and never answers (no status line).
    Hang,
    /// Sends the head and a first line, then goes silent without closing.
    Stall(Framing),
    /// Sends the head and a first line, then resets the connection (RST).
    Reset(Framing),
    /// Sends a chunked head and a chunk whose size is not hexadecimal.
    BadChunk,
    /// Sends a chunked head and a chunk whose data runs past its announced size.
    ChunkOverrun,
    /// Sends this head (status line, fields and the blank line), then nothing.
    Head(&'static [u8]),
    /// Sends a head of header fields over 64 KiB.
    HugeHead,
    /// Sends a status line that is not HTTP.
    BadStatusLine,
    /// Sends binary garbage instead of an answer.
    Garbage,
    /// Streams `chunks` lines, one every `every`, then ends properly.
    Slow { chunks: usize, every: Duration },
    /// Streams a line every `every` until the gateway closes the connection.
    Endless { every: Duration },
    /// Answers a whole JSON body with a different made-up status (200..=999) each time.
    Statuses,
    /// Answers a chunked `application/json` body of this many MiB (never valid JSON).
    HugeJson { mib: usize },
}

#[derive(Default)]
struct Counters {
    /// Lets `Reset`, `BadChunk` and `ChunkOverrun` go on once the test has seen the first line arrive, so
    /// the fault always comes after the first byte however slow the machine is.
    proceed: tokio::sync::Notify,
    requests: AtomicUsize,
    /// Connections the gateway closed while the fake held them open for a fault.
    closed_by_peer: AtomicUsize,
}

/// A running faulty upstream. Dropping it stops the listener and cuts its connections.
pub struct FaultyUpstream {
    pub url: String,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl FaultyUpstream {
    pub async fn start(fault: Fault) -> FaultyUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(serve(socket, fault, c.clone()));
            }
        });
        FaultyUpstream {
            url,
            counters,
            task,
        }
    }

    /// Inference requests received (model-list requests excluded).
    pub fn requests(&self) -> usize {
        self.counters.requests.load(Ordering::SeqCst)
    }

    /// Connections the gateway closed while the fake was holding or streaming on them.
    pub fn closed_by_peer(&self) -> usize {
        self.counters.closed_by_peer.load(Ordering::SeqCst)
    }

    /// Lets a `Reset` or `BadChunk` fault happen (the test saw the first line arrive).
    pub fn proceed(&self) {
        self.counters.proceed.notify_one();
    }

    /// Closes the listener and every connection: from now on connections are refused.
    pub fn refuse_from_now(&self) {
        self.task.abort();
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One parsed request head: method, path, and the body length.
struct Head {
    method: String,
    path: String,
}

/// Reads one request (head and `Content-Length` body). `None` when the peer closes first.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Head> {
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = s.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let mut line = head.lines().next()?.split(' ');
    let method = line.next()?.to_ascii_uppercase();
    let path = line.next()?.to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < end + 4 + len {
        let n = s.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..end + 4 + len);
    Some(Head { method, path })
}

/// Waits until the peer closes the connection (read returns end of stream or an error).
async fn until_closed(s: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
}

fn stream_head(framing: Framing) -> Vec<u8> {
    match framing {
        Framing::Chunked => b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
        Framing::Length => b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n".to_vec(),
    }
}

fn chunk(framing: Framing, data: &[u8]) -> Vec<u8> {
    match framing {
        Framing::Chunked => {
            let mut out = format!("{:x}\r\n", data.len()).into_bytes();
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
            out
        }
        Framing::Length => data.to_vec(),
    }
}

async fn serve(mut s: TcpStream, fault: Fault, counters: Arc<Counters>) {
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_request(&mut s, &mut buf).await else {
            return;
        };
        if head.method == "GET" && head.path.starts_with("/api/tags") {
            let body = format!(
                "{{\"models\":[{{\"name\":\"{MODEL}\",\"model\":\"{MODEL}\",\"size\":1,\"digest\":\"d\",\"details\":{{}}}}]}}"
            );
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        let n = counters.requests.fetch_add(1, Ordering::SeqCst);
        let closed = |c: &Counters| c.closed_by_peer.fetch_add(1, Ordering::SeqCst);
        match fault {
            Fault::Hang => {
                until_closed(&mut s).await;
                closed(&counters);
            }
            Fault::Stall(framing) => {
                let mut out = stream_head(framing);
                out.extend(chunk(framing, LINE));
                if s.write_all(&out).await.is_ok() {
                    until_closed(&mut s).await;
                }
                closed(&counters);
            }
            Fault::Reset(framing) => {
                let mut out = stream_head(framing);
                out.extend(chunk(framing, LINE));
                let _ = s.write_all(&out).await;
                let _ = s.flush().await;
                let _ = tokio::time::timeout(Duration::from_secs(30), counters.proceed.notified())
                    .await;
                // Linger 0: closing sends RST instead of FIN. (Deprecated because a non-zero
                // linger blocks on drop; zero resets at once.)
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
                drop(s);
            }
            Fault::BadChunk => {
                let mut out = stream_head(Framing::Chunked);
                out.extend(chunk(Framing::Chunked, LINE));
                let _ = s.write_all(&out).await;
                let _ = tokio::time::timeout(Duration::from_secs(30), counters.proceed.notified())
                    .await;
                let _ = s.write_all(b"zz-not-hex\r\nhello\r\n").await;
                until_closed(&mut s).await;
            }
            Fault::ChunkOverrun => {
                let mut out = stream_head(Framing::Chunked);
                out.extend(chunk(Framing::Chunked, LINE));
                let _ = s.write_all(&out).await;
                let _ = tokio::time::timeout(Duration::from_secs(30), counters.proceed.notified())
                    .await;
                let _ = s
                    .write_all(b"5\r\nhello, and more than five\r\n0\r\n\r\n")
                    .await;
                until_closed(&mut s).await;
            }
            Fault::Head(head) => {
                let _ = s.write_all(head).await;
                until_closed(&mut s).await;
            }
            Fault::HugeHead => {
                let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
                while head.len() < 80 * 1024 {
                    head.extend_from_slice(
                        b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
                    );
                }
                head.extend_from_slice(b"Content-Length: 0\r\n\r\n");
                let _ = s.write_all(&head).await;
                until_closed(&mut s).await;
            }
            Fault::BadStatusLine => {
                let _ = s.write_all(b"HTTP/1.1 two-hundred OK\r\n\r\n").await;
                until_closed(&mut s).await;
            }
            Fault::Garbage => {
                let _ = s
                    .write_all(b"\x00\x01\x02\xff\xfe garbage \x00\r\n\r\n\x7f\x7f")
                    .await;
                until_closed(&mut s).await;
            }
            Fault::Slow { chunks, every } => {
                if s.write_all(&stream_head(Framing::Chunked)).await.is_err() {
                    closed(&counters);
                    return;
                }
                for _ in 0..chunks {
                    tokio::time::sleep(every).await;
                    if s.write_all(&chunk(Framing::Chunked, LINE)).await.is_err() {
                        closed(&counters);
                        return;
                    }
                }
                let done = b"{\"model\":\"m:latest\",\"done\":true}\n";
                let mut out = chunk(Framing::Chunked, done);
                out.extend_from_slice(b"0\r\n\r\n");
                if s.write_all(&out).await.is_err() {
                    closed(&counters);
                    return;
                }
                continue;
            }
            Fault::Statuses => {
                // Bodiless statuses would leave the body on the wire; skip them.
                let mut status = 200 + (n * 7919) % 800;
                if matches!(status, 204 | 205 | 304) {
                    status += 1;
                }
                let body = b"{\"done\":true}";
                let answer = format!(
                    "HTTP/1.1 {status} Whatever\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let mut out = answer.into_bytes();
                out.extend_from_slice(body);
                if s.write_all(&out).await.is_err() {
                    return;
                }
                continue;
            }
            Fault::HugeJson { mib } => {
                let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(head).await.is_err() {
                    closed(&counters);
                    return;
                }
                let mib_chunk = chunk(Framing::Chunked, &vec![b'a'; 1024 * 1024]);
                for _ in 0..mib {
                    if s.write_all(&mib_chunk).await.is_err() {
                        closed(&counters);
                        return;
                    }
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
                until_closed(&mut s).await;
            }
            Fault::Endless { every } => {
                if s.write_all(&stream_head(Framing::Chunked)).await.is_err() {
                    closed(&counters);
                    return;
                }
                loop {
                    let mut probe = [0u8; 64];
                    tokio::select! {
                        () = tokio::time::sleep(every) => {
                            if s.write_all(&chunk(Framing::Chunked, LINE)).await.is_err() {
                                break;
                            }
                        }
                        r = s.read(&mut probe) => {
                            if matches!(r, Ok(0) | Err(_)) {
                                break;
                            }
                        }
                    }
                }
                closed(&counters);
            }
        }
        return;
    }
}
