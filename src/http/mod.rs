//! Writing local answers and reading request bodies on a pingora session.

pub mod json;
pub mod router;
pub mod routing;

use bytes::{Bytes, BytesMut};
use http::header;
use pingora::http::ResponseHeader;
use serde::Serialize;

use crate::error::ApiError;

/// The client's HTTP/1 session as every handler writes to it: pingora-core's own. pingora-proxy's
/// `Session` wrapped it with a response cache, compression and filter modules, all built and
/// dropped per request although ragway uses none of them (see `proxy::serve`).
pub type Session = pingora::protocols::http::ServerSession;

/// A complete local response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(header::HeaderName, String)>,
    pub body: Bytes,
}

impl Reply {
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: Bytes::from(serde_json::to_vec(value).expect("serialisable reply")),
        }
    }
    pub fn ok<T: Serialize + ?Sized>(value: &T) -> Reply {
        Self::json(200, value)
    }
    pub fn bytes(status: u16, content_type: &'static str, body: Bytes) -> Reply {
        Reply {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }
    pub fn with_header(mut self, name: header::HeaderName, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        Reply::bytes(e.status, "application/json", e.body())
    }
}

/// How long, and how much of, the unread rest of a request body is read and discarded after
/// an early answer: enough for any upload near the size limits, not a free sink.
const DRAIN_AFTER_EARLY_ANSWER: std::time::Duration = std::time::Duration::from_secs(5);
const DRAIN_MAX_BYTES: usize = 128 * 1024 * 1024;

/// Writes a whole response. HEAD requests get the headers only.
pub async fn send(session: &mut Session, reply: Reply) -> pingora::Result<()> {
    // An answer before the body ends (a 413 from Content-Length, a malformed upload) goes
    // out with `Connection: close` (pingora's rule), but closing a socket with unread bytes
    // sends a TCP reset that can destroy the answer before the client reads it: the rest of
    // the body is read and discarded first, bounded in time (a lingering close).
    let early = !session.is_body_done();
    // No case map: every name is a `HeaderName`, written in its usual case either way.
    let mut resp = ResponseHeader::build_no_case(reply.status, Some(4 + reply.headers.len()))?;
    resp.insert_header(header::CONTENT_TYPE, reply.content_type)?;
    resp.insert_header(header::CONTENT_LENGTH, reply.body.len().to_string())?;
    for (name, value) in reply.headers {
        resp.append_header(name, value)?;
    }
    let head = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(resp)).await?;
    if !head && !reply.body.is_empty() {
        session.write_response_body(reply.body, true).await?;
    }
    if early {
        let drain = async {
            let mut left = DRAIN_MAX_BYTES;
            while let Ok(Some(chunk)) = session.read_request_body().await {
                left = match left.checked_sub(chunk.len()) {
                    Some(l) => l,
                    None => break,
                };
            }
        };
        if tokio::time::timeout(DRAIN_AFTER_EARLY_ANSWER, drain)
            .await
            .is_err()
        {
            tracing::debug!("request body not fully drained after an early answer");
        }
    }
    Ok(())
}

/// Streams a file from disk in 64 KiB chunks, so large blobs never sit in memory whole.
pub async fn send_file(
    session: &mut Session,
    path: &std::path::Path,
    content_type: &str,
    disposition: &str,
) -> pingora::Result<u16> {
    use tokio::io::AsyncReadExt;
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "stored blob is missing");
            send(
                session,
                ApiError::not_found("The stored file is missing").into(),
            )
            .await?;
            return Ok(404);
        }
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let mut resp = ResponseHeader::build_no_case(200, Some(3))?;
    resp.insert_header(header::CONTENT_TYPE, content_type)?;
    resp.insert_header(header::CONTENT_LENGTH, len.to_string())?;
    resp.insert_header(header::CONTENT_DISPOSITION, disposition)?;
    session.write_response_header(Box::new(resp)).await?;
    let mut remaining = len;
    while remaining > 0 {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let n = file
            .read_buf(&mut buf)
            .await
            .map_err(|e| pingora::Error::because(pingora::ErrorType::FileReadError, "blob", e))?;
        if n == 0 {
            break;
        }
        remaining = remaining.saturating_sub(n as u64);
        session
            .write_response_body(buf.freeze(), remaining == 0)
            .await?;
    }
    Ok(200)
}

/// Reads the whole request body, refusing more than `limit` bytes with a 413 before
/// buffering them (from `Content-Length` when present, while reading otherwise).
pub async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        // Small forms have KiB limits: "0 MiB" would say nothing.
        let shown = if limit >= 1024 * 1024 {
            format!("{} MiB", limit / (1024 * 1024))
        } else {
            format!("{} KiB", limit / 1024)
        };
        ApiError::new(413, format!("Request body too large: the limit is {shown}"))
    };
    if let Some(len) = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(too_large());
    }
    expect_continue(session).await;
    let mut buf = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "Could not read the request body: {}",
                    e.etype().as_str()
                )));
            }
        }
    }
    Ok(buf.freeze())
}

/// Answers `Expect: 100-continue` (curl sends it for large bodies) so the client sends
/// the body at once instead of waiting a second for a response that never comes.
pub async fn expect_continue(session: &mut Session) {
    let wants = session
        .req_header()
        .headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if wants && let Err(e) = session.write_continue_response().await {
        tracing::debug!(error = %e, "could not send 100 Continue");
    }
}

/// Parses a JSON body into `T`, with serde's message (field and position) in the 400.
/// The body first passes [`json::check`] (unambiguous, at most
/// [`json::DEFAULT_MAX_VALUES`] values).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    parse_json_with(body, json::DEFAULT_MAX_VALUES)
}

/// [`parse_json`] with a configured value budget (bodies that are forwarded upstream).
pub fn parse_json_with<T: serde::de::DeserializeOwned>(
    body: &[u8],
    max_values: usize,
) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(422, "Request body is required (JSON)"));
    }
    json::check(body, max_values)?;
    parse_checked_json(body)
}

/// Parses a body that already passed the guard ([`json::check`]).
///
/// # Errors
/// 422 when the JSON does not have the expected shape, 400 when it is malformed.
pub fn parse_checked_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let kind = if e.is_data() { 422 } else { 400 };
        ApiError::new(kind, format!("Invalid JSON body: {e}"))
    })
}

/// Value of a query parameter (first occurrence), percent-decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' {
            out.push(b' ');
        } else if b == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 2;
        } else {
            out.push(b);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A boolean query flag: `true/1/yes` → true, `false/0/no` → false.
pub fn query_bool(query: Option<&str>, name: &str) -> Result<Option<bool>, ApiError> {
    match query_param(query, name).as_deref() {
        None => Ok(None),
        Some("true" | "1" | "yes" | "on" | "True") => Ok(Some(true)),
        Some("false" | "0" | "no" | "off" | "False") => Ok(Some(false)),
        Some(other) => Err(ApiError::new(
            422,
            format!("Query parameter {name}: expected a boolean, got {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        assert_eq!(
            query_param(Some("a=1&refresh=true"), "refresh").as_deref(),
            Some("true")
        );
        assert_eq!(
            query_param(Some("q=a%20b+c"), "q").as_deref(),
            Some("a b c")
        );
        assert_eq!(query_param(Some("q=%zz"), "q").as_deref(), Some("%zz"));
        assert_eq!(query_param(Some("q=%4"), "q").as_deref(), Some("%4"));
        assert_eq!(query_param(None, "q"), None);
        assert_eq!(
            query_bool(Some("refresh=1"), "refresh").unwrap(),
            Some(true)
        );
        assert!(query_bool(Some("refresh=maybe"), "refresh").is_err());
    }
}
