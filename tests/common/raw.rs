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
/// reset) before a full answer arrived; panics after 5 s.
pub async fn read_answer(s: &mut tokio::net::TcpStream) -> Option<RawAnswer> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or_else(|| panic!("no content-length in {head}"));
                if buf.len() >= end + 4 + len {
                    return Some(RawAnswer {
                        status: head[9..12].parse().unwrap(),
                        body: String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned(),
                        head,
                    });
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an answer (or a close) within 5 s")
}
