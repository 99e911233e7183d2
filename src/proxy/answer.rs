//! An upstream's HTTP/1 answer as the forward engine reads it: the head, then the body in
//! whatever framing it came in, and whether the connection can carry another request.
//!
//! Why not pingora's client session: a token stream is hundreds of small chunks, and its
//! body reader hands them back one per call, each copied through its own buffer and
//! reallocated batch: `callgrind` put it at a third of the instructions of a forwarded
//! 200-chunk stream. Here every chunk already in hand is decoded in one pass straight into
//! the batch that goes to the client. Its head reader also built two header maps per answer
//! (one only to remember the names' case, which nobody downstream reads).
//!
//! What it keeps from pingora's reader: interim 1xx answers skipped, `Transfer-Encoding`
//! over `Content-Length` (which is then dropped, RFC 9112 §6.3), conflicting lengths
//! refused, no body for HEAD, 204 and 304, a read timeout per read, and a connection reused
//! only when its answer ended cleanly with nothing unasked after it.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version, header};
use pingora::protocols::Stream;
use pingora::{Error, ErrorType, Result};
use tokio::io::AsyncReadExt;

/// Longest answer head (status line and header fields). A model server's is a few hundred
/// bytes; pingora accepted 1 MiB, which a broken upstream could make every request hold.
const MAX_HEAD: usize = 64 * 1024;

/// Most header fields in an answer head (pingora's bound was 256).
const MAX_FIELDS: usize = 128;

/// Longest chunk-size line (hex digits and any extensions).
const MAX_SIZE_LINE: usize = 4 * 1024;

/// Most bytes of trailer fields after the last chunk (they are read and dropped).
const MAX_TRAILERS: usize = 64 * 1024;

/// Free room made in the read buffer before each read.
const READ_ROOM: usize = 16 * 1024;

/// The answer's status line and header fields.
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
}

/// How the body's end is known.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
    /// The body has ended.
    Done,
}

/// Where a chunked body's decoder is.
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, at its CRLF.
    DataEnd,
    /// After the last chunk, in the trailer section; the bytes of it seen so far.
    Trailers(usize),
}

/// An upstream answer whose head has been read; its body is read with [`Answer::read_into`].
pub struct Answer {
    stream: Stream,
    /// Bytes read off the connection and not yet consumed.
    buf: BytesMut,
    pub head: Head,
    framing: Framing,
    /// Whether the answer lets the connection carry another request.
    keepalive: bool,
    read_timeout: Option<Duration>,
}

// Boxed because every pingora error travels boxed (`pingora::BError`).
#[allow(clippy::unnecessary_box_returns)]
fn invalid(why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::InvalidHTTPHeader, why)
}

/// Reads more of the answer into `buf`; the number of bytes read, 0 at the end of the stream.
async fn fill(
    stream: &mut Stream,
    buf: &mut BytesMut,
    timeout: Option<Duration>,
    what: &'static str,
) -> Result<usize> {
    if buf.capacity() - buf.len() < READ_ROOM / 4 {
        buf.reserve(READ_ROOM);
    }
    let read = stream.read_buf(buf);
    let read = match timeout {
        Some(t) => tokio::time::timeout(t, read)
            .await
            .map_err(|_| Error::explain(ErrorType::ReadTimedout, what))?,
        None => read.await,
    };
    read.map_err(|e| Error::because(ErrorType::ReadError, what, e))
}

/// The head at the start of `buf` and its length, `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Left uninitialised: httparse fills only as many as there are fields, and zeroing
    // all of them cost more than parsing a typical head.
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut []);
    let mut parser = httparse::ParserConfig::default();
    // Some servers write `Name : value`; pingora's reader accepted it too.
    parser.allow_spaces_after_header_name_in_responses(true);
    let len = match parser.parse_response_with_uninit_headers(&mut resp, buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(Error::because(
                ErrorType::InvalidHTTPHeader,
                "while parsing the upstream's answer head",
                e,
            ));
        }
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| invalid("the upstream's answer has no valid status"))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for f in &*resp.headers {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| invalid("the upstream sent an invalid header name"))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| invalid("the upstream sent an invalid header value"))?;
        headers.append(name, value);
    }
    Ok(Some((
        Head {
            status,
            version,
            headers,
        },
        len,
    )))
}

/// The body length `Content-Length` gives: identical repeats (also comma-joined) count once,
/// anything else that is not one decimal number is refused (RFC 9110 §8.6).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            let n = (!part.is_empty() && part.len() <= 19 && part.iter().all(u8::is_ascii_digit))
                .then(|| part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
                .ok_or_else(|| invalid("the upstream sent an invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid(
                    "the upstream sent conflicting Content-Length values",
                ));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Whether the last transfer coding is `chunked` (RFC 9112 §6.3).
fn chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether the `Connection` header lists `token`.
fn connection_has(headers: &HeaderMap, token: &[u8]) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// The value of an ASCII hex digit.
fn hex_digit(b: u8) -> u64 {
    u64::from(match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => (b | 0x20).wrapping_sub(b'a').wrapping_add(10),
    })
}

/// The size a chunk-size line gives (the line without its `\n`); extensions are ignored.
fn chunk_size(line: &[u8]) -> Result<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // Over 15 digits the size could overflow; no real chunk is anywhere near 2^60 bytes.
    if digits == 0 || digits > 15 {
        return Err(invalid("the upstream sent an invalid chunk size"));
    }
    let rest = line[digits..]
        .strip_suffix(b"\r")
        .unwrap_or(&line[digits..]);
    match rest.trim_ascii_start().first() {
        None | Some(b';') => Ok(line[..digits]
            .iter()
            .fold(0, |n, &b| (n << 4) | hex_digit(b))),
        Some(_) => Err(invalid("the upstream sent an invalid chunk size")),
    }
}

impl Answer {
    /// Reads the answer's head off `stream`, past any interim 1xx answers. `head_request`:
    /// the request was HEAD, so the answer has no body whatever its length says.
    ///
    /// # Errors
    /// The upstream closed, timed out, or sent something that is not an HTTP/1 answer head.
    pub async fn read(
        mut stream: Stream,
        head_request: bool,
        read_timeout: Option<Duration>,
    ) -> Result<Answer> {
        let mut buf = BytesMut::with_capacity(READ_ROOM);
        let mut head = loop {
            if let Some((head, len)) = parse_head(&buf)? {
                buf.advance(len);
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    continue;
                }
                break head;
            }
            if buf.len() >= MAX_HEAD {
                return Err(invalid("the upstream's answer head is over 64 KiB"));
            }
            let what = "while reading the upstream's answer head";
            if fill(&mut stream, &mut buf, read_timeout, what).await? == 0 {
                return Err(Error::explain(ErrorType::ConnectionClosed, what));
            }
        };
        let te = head.headers.contains_key(header::TRANSFER_ENCODING);
        if te {
            // The coding frames the body; a length beside it is meaningless and must not
            // reach the client next to ragway's own framing.
            head.headers.remove(header::CONTENT_LENGTH);
        }
        let status = head.status.as_u16();
        let framing = if head_request || matches!(status, 204 | 304) {
            Framing::Done
        } else if status == 101 {
            Framing::Close
        } else if te {
            if chunked(&head.headers) {
                Framing::Chunked(Chunk::Size)
            } else {
                Framing::Close
            }
        } else {
            match content_length(&head.headers)? {
                Some(0) => Framing::Done,
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            }
        };
        let keepalive = framing != Framing::Close
            && !(te && head.version == Version::HTTP_10)
            && if connection_has(&head.headers, b"close") {
                false
            } else {
                head.version == Version::HTTP_11 || connection_has(&head.headers, b"keep-alive")
            };
        Ok(Answer {
            stream,
            buf,
            head,
            framing,
            keepalive,
            read_timeout,
        })
    }

    /// Bounds each later read of the body (`None`: unbounded).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.read_timeout = timeout;
    }

    /// Whether the whole body has been read (at once for an answer without one).
    #[must_use]
    pub fn done(&self) -> bool {
        self.framing == Framing::Done
    }

    /// Appends the next body bytes to `out`: all of the body already in hand, or what the
    /// next read brings. `Ok(false)` once the body has ended and nothing was appended.
    /// Cancel-safe: bytes are only decoded from what a completed read put in hand.
    ///
    /// # Errors
    /// The upstream closed before the body's end, timed out, or broke the chunked framing;
    /// bytes decoded before the fault are in `out`.
    pub async fn read_into(&mut self, out: &mut BytesMut) -> Result<bool> {
        loop {
            let before = out.len();
            self.decode(out)?;
            if out.len() > before {
                return Ok(true);
            }
            if self.framing == Framing::Done {
                return Ok(false);
            }
            let what = "while reading the upstream's answer body";
            if fill(&mut self.stream, &mut self.buf, self.read_timeout, what).await? == 0 {
                if self.framing == Framing::Close {
                    self.framing = Framing::Done;
                    return Ok(false);
                }
                return Err(Error::explain(
                    ErrorType::ConnectionClosed,
                    "the upstream closed before the end of its answer's body",
                ));
            }
        }
    }

    /// Reads the rest of the body and drops it.
    ///
    /// # Errors
    /// As [`Answer::read_into`].
    pub async fn drain(&mut self) -> Result<()> {
        let mut sink = BytesMut::new();
        while self.read_into(&mut sink).await? {
            sink.clear();
        }
        Ok(())
    }

    /// The connection, when the answer ended cleanly and left it able to carry another
    /// request; otherwise it is closed.
    #[must_use]
    pub fn reuse(self) -> Option<Stream> {
        (self.keepalive && self.framing == Framing::Done && self.buf.is_empty())
            .then_some(self.stream)
    }

    /// Moves the body bytes in hand into `out`, as far as the framing allows.
    fn decode(&mut self, out: &mut BytesMut) -> Result<()> {
        // Room for all of it at once: a burst of chunks appended one by one would regrow the
        // batch several times.
        out.reserve(self.buf.len());
        let (used, decoded) = decode(&mut self.framing, &self.buf, out);
        // Consumed once at the end: per chunk, three `advance`s cost more than the decoding.
        if used == self.buf.len() {
            self.buf.clear();
        } else {
            self.buf.advance(used);
        }
        decoded
    }
}

/// Decodes the body bytes at the start of `bytes` into `out` as `framing` allows; how many
/// bytes it consumed, and whether the framing held.
fn decode(framing: &mut Framing, bytes: &[u8], out: &mut BytesMut) -> (usize, Result<()>) {
    match framing {
        Framing::Done => (0, Ok(())),
        Framing::Close => {
            out.extend_from_slice(bytes);
            (bytes.len(), Ok(()))
        }
        Framing::Length(left) => {
            let n = usize::try_from(*left).map_or(bytes.len(), |l| l.min(bytes.len()));
            out.extend_from_slice(&bytes[..n]);
            *left -= n as u64;
            if *left == 0 {
                *framing = Framing::Done;
            }
            (n, Ok(()))
        }
        Framing::Chunked(state) => {
            let mut at = 0;
            loop {
                match chunk_step(state, &bytes[at..], out) {
                    Ok(Step::Took(n)) => at += n,
                    Ok(Step::Wait) => return (at, Ok(())),
                    Ok(Step::End(n)) => {
                        *framing = Framing::Done;
                        return (at + n, Ok(()));
                    }
                    Err(e) => return (at, Err(e)),
                }
            }
        }
    }
}

/// What one step of the chunked decoder did.
enum Step {
    /// Consumed this many bytes; go on.
    Took(usize),
    /// Needs more bytes than are in hand.
    Wait,
    /// The body ended after this many bytes.
    End(usize),
}

/// One step of the chunked decoder over the bytes in hand, `rest`.
fn chunk_step(state: &mut Chunk, rest: &[u8], out: &mut BytesMut) -> Result<Step> {
    match state {
        Chunk::Size => {
            // The usual line is hex digits and CRLF, read here without a search for its end.
            let digits = rest.iter().take_while(|b| b.is_ascii_hexdigit()).count();
            if (1..=15).contains(&digits) && rest.get(digits..digits + 2) == Some(b"\r\n") {
                let size = rest[..digits]
                    .iter()
                    .fold(0, |n, &b| (n << 4) | hex_digit(b));
                *state = if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                };
                return Ok(Step::Took(digits + 2));
            }
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                if rest.len() > MAX_SIZE_LINE {
                    return Err(invalid("the upstream sent an over-long chunk-size line"));
                }
                return Ok(Step::Wait);
            };
            if nl > MAX_SIZE_LINE {
                return Err(invalid("the upstream sent an over-long chunk-size line"));
            }
            let size = chunk_size(&rest[..nl])?;
            *state = if size == 0 {
                Chunk::Trailers(0)
            } else {
                Chunk::Data(size)
            };
            Ok(Step::Took(nl + 1))
        }
        Chunk::Data(left) => {
            if rest.is_empty() {
                return Ok(Step::Wait);
            }
            let n = usize::try_from(*left).map_or(rest.len(), |l| l.min(rest.len()));
            out.extend_from_slice(&rest[..n]);
            *left -= n as u64;
            if *left == 0 {
                *state = Chunk::DataEnd;
            }
            Ok(Step::Took(n))
        }
        Chunk::DataEnd => {
            let n = match rest {
                [] | [b'\r'] => return Ok(Step::Wait),
                [b'\n', ..] => 1,
                [b'\r', b'\n', ..] => 2,
                _ => return Err(invalid("the upstream's chunk is longer than its size")),
            };
            *state = Chunk::Size;
            Ok(Step::Took(n))
        }
        Chunk::Trailers(seen) => {
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                if *seen + rest.len() > MAX_TRAILERS {
                    return Err(invalid("the upstream sent over 64 KiB of trailers"));
                }
                return Ok(Step::Wait);
            };
            *seen += nl + 1;
            if *seen > MAX_TRAILERS {
                return Err(invalid("the upstream sent over 64 KiB of trailers"));
            }
            if nl == 0 || (nl == 1 && rest[0] == b'\r') {
                Ok(Step::End(nl + 1))
            } else {
                Ok(Step::Took(nl + 1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A client stream whose server side writes `parts` one write at a time (with a pause
    /// between, so each lands in its own read) and then keeps the connection open, or closes
    /// it when `close`.
    async fn upstream(parts: Vec<Vec<u8>>, close: bool) -> (Stream, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for p in parts {
                s.write_all(&p).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if close {
                drop(s);
            } else {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        let client = TcpStream::connect(addr).await.unwrap();
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(client));
        (stream, server)
    }

    async fn body(answer: &mut Answer) -> Result<Vec<u8>> {
        let mut out = BytesMut::new();
        while answer.read_into(&mut out).await? {}
        Ok(out.to_vec())
    }

    fn split(whole: &[u8], at: &[usize]) -> Vec<Vec<u8>> {
        let mut parts = Vec::new();
        let mut from = 0;
        for &to in at {
            parts.push(whole[from..to].to_vec());
            from = to;
        }
        parts.push(whole[from..].to_vec());
        parts
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/x-ndjson\r\n\r\n5\r\nhello\r\n1;ext=1\r\n,\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";

    #[tokio::test]
    async fn a_chunked_body_is_decoded_whole_however_its_bytes_are_split() {
        let split_points: Vec<Vec<usize>> = vec![
            vec![],
            (1..CHUNKED.len()).collect(),
            vec![20, 84, 87, 90, 91, 100, 110, 120],
        ];
        for at in split_points {
            let (stream, _server) = upstream(split(CHUNKED, &at), false).await;
            let mut a = Answer::read(stream, false, Some(Duration::from_secs(5)))
                .await
                .unwrap();
            assert_eq!(a.head.status, 200);
            assert_eq!(a.head.headers["content-type"], "application/x-ndjson");
            assert_eq!(
                body(&mut a).await.unwrap(),
                b"hello, world",
                "split at {at:?}"
            );
            assert!(a.done());
            assert!(
                a.reuse().is_some(),
                "a cleanly ended answer leaves the connection reusable"
            );
        }
    }

    #[tokio::test]
    async fn a_length_framed_body_stops_at_its_length() {
        let (stream, _server) = upstream(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhel".to_vec(),
                b"lo".to_vec(),
            ],
            false,
        )
        .await;
        let mut a = Answer::read(stream, false, None).await.unwrap();
        assert_eq!(body(&mut a).await.unwrap(), b"hello");
        assert!(a.reuse().is_some());
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_head_204_and_304_have_no_body() {
        let (stream, _server) = upstream(
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    .to_vec(),
            ],
            false,
        )
        .await;
        let mut a = Answer::read(stream, false, None).await.unwrap();
        assert_eq!(a.head.status, 200);
        assert_eq!(body(&mut a).await.unwrap(), b"ok");

        let (stream, _server) = upstream(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".to_vec()],
            false,
        )
        .await;
        let a = Answer::read(stream, true, None).await.unwrap();
        assert!(a.done(), "an answer to HEAD has no body");
        assert!(a.reuse().is_some());

        for status in [204, 304] {
            let head = format!("HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n");
            let (stream, _server) = upstream(vec![head.into_bytes()], false).await;
            let a = Answer::read(stream, false, None).await.unwrap();
            assert!(a.done(), "{status} has no body");
        }
    }

    #[tokio::test]
    async fn transfer_encoding_wins_over_a_length_which_is_dropped() {
        let whole = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let (stream, _server) = upstream(vec![whole.to_vec()], false).await;
        let mut a = Answer::read(stream, false, None).await.unwrap();
        assert!(a.head.headers.get("content-length").is_none());
        assert_eq!(body(&mut a).await.unwrap(), b"ok");
    }

    #[tokio::test]
    async fn a_body_until_close_ends_at_the_close_and_the_connection_is_not_kept() {
        let (stream, _server) = upstream(
            vec![b"HTTP/1.1 200 OK\r\n\r\nsome".to_vec(), b" bytes".to_vec()],
            true,
        )
        .await;
        let mut a = Answer::read(stream, false, None).await.unwrap();
        assert_eq!(body(&mut a).await.unwrap(), b"some bytes");
        assert!(a.reuse().is_none());
    }

    #[tokio::test]
    async fn connection_close_http_1_0_and_unasked_bytes_stop_reuse() {
        for (whole, kept) in [
            (
                &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"[..],
                false,
            ),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
            (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
                false,
            ),
        ] {
            let (stream, _server) = upstream(vec![whole.to_vec()], false).await;
            let mut a = Answer::read(stream, false, None).await.unwrap();
            assert_eq!(body(&mut a).await.unwrap(), b"ok");
            assert_eq!(
                a.reuse().is_some(),
                kept,
                "{}",
                String::from_utf8_lossy(whole)
            );
        }
    }

    #[tokio::test]
    async fn broken_framing_is_an_error_after_the_bytes_before_it() {
        for (whole, before) in [
            // Chunk data longer than its size.
            (
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n"[..],
                &b"ok"[..],
            ),
            // A size that is not hex.
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n",
                b"ok",
            ),
            // A size over 15 hex digits.
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
                b"",
            ),
        ] {
            let (stream, _server) = upstream(vec![whole.to_vec()], false).await;
            let mut a = Answer::read(stream, false, Some(Duration::from_secs(5)))
                .await
                .unwrap();
            let mut out = BytesMut::new();
            let e = loop {
                match a.read_into(&mut out).await {
                    Ok(true) => {}
                    Ok(false) => panic!("ended cleanly: {}", String::from_utf8_lossy(whole)),
                    Err(e) => break e,
                }
            };
            assert_eq!(e.etype(), &ErrorType::InvalidHTTPHeader);
            assert_eq!(&out[..], before);
        }
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_not_an_end() {
        for whole in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        ] {
            let (stream, _server) = upstream(vec![whole.to_vec()], true).await;
            let mut a = Answer::read(stream, false, None).await.unwrap();
            let e = body(&mut a).await.unwrap_err();
            assert_eq!(e.etype(), &ErrorType::ConnectionClosed);
        }
    }

    #[tokio::test]
    async fn bad_heads_are_refused() {
        for whole in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
            // Folded header lines (obsolete, and a response-splitting vector downstream).
            b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        ] {
            let (stream, _server) = upstream(vec![whole.to_vec()], false).await;
            let e = Answer::read(stream, false, None)
                .await
                .err()
                .expect("refused");
            assert_eq!(
                e.etype(),
                &ErrorType::InvalidHTTPHeader,
                "{}",
                String::from_utf8_lossy(whole)
            );
        }
        let (stream, _server) = upstream(vec![b"HTTP/1.1 200 OK\r\n".to_vec()], true).await;
        let e = Answer::read(stream, false, None)
            .await
            .err()
            .expect("closed");
        assert_eq!(e.etype(), &ErrorType::ConnectionClosed);
    }

    #[tokio::test]
    async fn an_over_long_head_trailers_or_size_line_is_refused_at_its_bound() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        while head.len() <= MAX_HEAD {
            head.extend_from_slice(
                b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        let (stream, _server) = upstream(vec![head], false).await;
        let e = Answer::read(stream, false, None)
            .await
            .err()
            .expect("refused");
        assert_eq!(e.etype(), &ErrorType::InvalidHTTPHeader);

        let mut trailers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
        while trailers.len() <= MAX_TRAILERS + 100 {
            trailers.extend_from_slice(
                b"X-T: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        let mut size_line = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
        size_line.resize(size_line.len() + MAX_SIZE_LINE + 10, b'a');
        for whole in [trailers, size_line] {
            let (stream, _server) = upstream(vec![whole], false).await;
            let mut a = Answer::read(stream, false, Some(Duration::from_secs(5)))
                .await
                .unwrap();
            let e = body(&mut a).await.unwrap_err();
            assert_eq!(e.etype(), &ErrorType::InvalidHTTPHeader);
        }
    }

    #[tokio::test]
    async fn a_silent_upstream_times_the_read_out() {
        let (stream, _server) = upstream(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec()],
            false,
        )
        .await;
        let mut a = Answer::read(stream, false, Some(Duration::from_millis(100)))
            .await
            .unwrap();
        let e = body(&mut a).await.unwrap_err();
        assert_eq!(e.etype(), &ErrorType::ReadTimedout);
    }

    #[test]
    fn chunk_sizes_read_as_hex_with_extensions_ignored() {
        assert_eq!(chunk_size(b"1a\r").unwrap(), 26);
        assert_eq!(chunk_size(b"FF").unwrap(), 255);
        assert_eq!(chunk_size(b"10 ; name=value\r").unwrap(), 16);
        assert_eq!(
            chunk_size(b"fffffffffffffff\r").unwrap(),
            0x0fff_ffff_ffff_ffff
        );
        for bad in [&b"\r"[..], b"x\r", b"1 x\r", b"-1\r", b"0x10\r"] {
            assert!(chunk_size(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
