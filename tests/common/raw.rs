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

/// Sends `head` then `filler` bytes (generated 64 KiB at a time, never held whole) as one
/// chunked request body, reading the answer meanwhile: the gateway answers early and stops
/// reading. Returns the answer's status and body.
pub async fn chunked_upload(url: &str, token: &str, head: &[u8], filler: usize) -> (u16, String) {
    let addr = url.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(a) = parse_answers(&buf).into_iter().next() {
                return Some((a.status, a.body));
            }
            match tokio::time::timeout(Duration::from_secs(120), rd.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    });
    let request = format!(
        "POST /api/v1/files/ HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary={}\r\nTransfer-Encoding: chunked\r\n\r\n",
        super::upload::BOUNDARY
    );
    use tokio::io::AsyncWriteExt;
    let mut piece = vec![0u8; 64 * 1024];
    let write = async {
        wr.write_all(request.as_bytes()).await?;
        wr.write_all(format!("{:x}\r\n", head.len()).as_bytes())
            .await?;
        wr.write_all(head).await?;
        wr.write_all(b"\r\n").await?;
        let mut sent = 0usize;
        while sent < filler {
            let n = (filler - sent).min(piece.len());
            // Printable, varied bytes that never contain the boundary.
            for (k, b) in piece[..n].iter_mut().enumerate() {
                *b = b'a' + ((sent + k) % 26) as u8;
            }
            wr.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            wr.write_all(&piece[..n]).await?;
            wr.write_all(b"\r\n").await?;
            sent += n;
        }
        wr.write_all(b"0\r\n\r\n").await
    };
    // The gateway closes its side once it has answered and drained what it will: a failed
    // write is the expected end.
    let _ = write.await;
    let answer = reader
        .await
        .unwrap()
        .expect("an answer before the connection closed");
    drop(wr);
    answer
}
