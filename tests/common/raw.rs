//! Reading HTTP/1.1 answers off raw TCP connections, for tests that control the wire
//! byte by byte (early answers, connection reuse, unread bodies).

use std::time::Duration;

/// One HTTP/1.1 answer read off a raw connection.
pub struct RawAnswer {
    pub status: u16,
    /// Header block, lowercased.
    pub head: String,
    pub body: String,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    }
}

/// Reads one answer that has a `Content-Length`. `None` when the connection closes (or is
/// reset) before a full answer arrived, or after 10 s.
pub async fn read_answer(s: &mut tokio::net::TcpStream) -> Option<RawAnswer> {
    read_answers(s, 1).await.into_iter().next()
}

/// Parses every complete answer (with `Content-Length`) at the start of `buf`.
pub fn parse_answers(buf: &[u8]) -> Vec<RawAnswer> {
    let mut out = Vec::new();
    let mut rest = buf;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
        let Some(len) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        else {
            break;
        };
        if rest.len() < end + 4 + len {
            break;
        }
        out.push(RawAnswer {
            status: head[9..12].parse().unwrap(),
            body: String::from_utf8_lossy(&rest[end + 4..end + 4 + len]).into_owned(),
            head,
        });
        rest = &rest[end + 4 + len..];
    }
    out
}

/// Reads until `n` complete answers arrived (then returns them), the connection closes, or
/// 10 s pass (then returns what arrived).
pub async fn read_answers(s: &mut tokio::net::TcpStream, n: usize) -> Vec<RawAnswer> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 8192];
    loop {
        let answers = parse_answers(&buf);
        if answers.len() >= n {
            return answers;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(read)) if read > 0 => buf.extend_from_slice(&chunk[..read]),
            _ => return answers,
        }
    }
}
