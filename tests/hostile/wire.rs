//! Hostile bytes on the wire: request smuggling, conflicting framing, malformed chunks,
//! oversized or too many headers, invalid method tokens, traversal in the request target,
//! NUL bytes, foreign protocols on the HTTP/1 port, pipelined garbage.
//!
//! Two layers refuse these. Malformed framing and unparsable heads fail in pingora's HTTP/1
//! parser before a route sees a request: the serving loop answers a JSON `400` (`431` when the
//! head is only too big) and closes the connection, the only safe thing to do with a
//! connection whose message boundaries are unknown. Everything that parses reaches the routes,
//! which answer a JSON error. Either way the gateway keeps serving other clients.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::common::gateway::{Gateway, Setup};
use super::common::raw::{RawAnswer, parse_answers};
use super::support;

async fn gateway() -> Gateway {
    Setup::new()
        .ollama(&super::common::fake::dead_url())
        .start()
        .await
}

/// What came back for some raw bytes.
struct Exchange {
    answers: Vec<RawAnswer>,
    /// The gateway closed the connection (end of stream or reset) within the time allowed.
    closed: bool,
}

/// Writes `bytes` (write errors ignored: the gateway may close before reading them all), then
/// reads until the connection closes, or — unless `until_close` — until `want` answers have
/// arrived, the last of them JSON; 15 s at most.
async fn exchange(gw: &Gateway, bytes: &[u8], want: usize, until_close: bool) -> Exchange {
    let addr = gw.url.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut closed = false;
    loop {
        let answers = parse_answers(&buf);
        if !until_close
            && answers.len() >= want
            && answers[want - 1]
                .header("content-type")
                .is_some_and(|c| c.contains("json"))
        {
            break;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => {
                closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    Exchange {
        answers: parse_answers(&buf),
        closed,
    }
}

/// ragway's own clear error: the status, JSON with `detail` and `error.message`.
fn json_error(a: &RawAnswer, status: u16) {
    assert_eq!(a.status, status, "status; body {}", a.body);
    assert!(
        a.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "JSON error: {}",
        a.head
    );
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    let detail = v["detail"].as_str().expect("detail");
    assert!(!detail.is_empty());
    assert_eq!(v["error"]["message"], v["detail"]);
    if matches!(status, 400 | 413 | 414 | 431) {
        // The client sent something wrong: OpenAI's SDKs key their exception class on this.
        assert_eq!(v["error"]["type"], "invalid_request_error", "{}", a.body);
    }
}

/// Refused as a head that does not parse: one JSON answer with `status`, `Connection: close`,
/// then the close.
fn parser_rejection(x: &Exchange, status: u16) {
    assert!(x.closed, "the connection is closed after a malformed head");
    assert_eq!(x.answers.len(), 1, "one answer");
    let a = &x.answers[0];
    json_error(a, status);
    assert_eq!(a.header("connection"), Some("close"), "{}", a.head);
}

/// Refused by either layer, always with a JSON 4xx.
fn rejected(x: &Exchange) {
    let a = x.answers.first().expect("an answer");
    assert!((400..500).contains(&a.status), "{}", a.head);
    json_error(a, a.status);
}

async fn one(gw: &Gateway, bytes: &[u8]) -> RawAnswer {
    let mut x = exchange(gw, bytes, 1, false).await;
    assert!(!x.answers.is_empty(), "no answer (closed: {})", x.closed);
    x.answers.remove(0)
}

// --- Framing / smuggling -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_read_as_chunked_and_never_reused() {
    let gw = gateway().await;
    // CL.TE smuggling: a front end trusting Content-Length would see the GET as body; one
    // trusting Transfer-Encoding would see it as a second request. ragway must do neither
    // harmfully: read as chunked (RFC 9112 §6.3), answer, and close.
    let smuggled = "GET /api/v1/auths/ HTTP/1.1\r\nhost: x\r\n\r\n";
    let body = format!("0\r\n\r\n{smuggled}");
    let req = format!(
        "POST /api/v1/auths/signin HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let x = exchange(&gw, req.as_bytes(), 1, true).await;
    assert!(x.closed, "connection closed after an ambiguous framing");
    assert_eq!(x.answers.len(), 1, "the smuggled request was not answered");
    json_error(&x.answers[0], 422);
    support::alive(&gw).await;
}

/// A tunnel request is refused with a JSON 405 and the connection closed: bytes after it may
/// be the tunnel's, never a request to serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_with_json_and_the_connection_closed() {
    let gw = gateway().await;
    let req = b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nhost: 127.0.0.1:22\r\n\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n";
    let x = exchange(&gw, req, 1, true).await;
    assert!(x.closed, "connection closed after CONNECT");
    assert_eq!(x.answers.len(), 1, "nothing after CONNECT was served");
    json_error(&x.answers[0], 405);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_not_ending_in_chunked_is_rejected() {
    let gw = gateway().await;
    let req = b"POST /api/v1/auths/signin HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    parser_rejection(&exchange(&gw, req, 1, true).await, 400);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_on_http_1_0_is_rejected() {
    let gw = gateway().await;
    let req = b"POST /api/v1/auths/signin HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    parser_rejection(&exchange(&gw, req, 1, true).await, 400);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_content_lengths_are_rejected() {
    let gw = gateway().await;
    let req = b"POST /api/v1/auths/signin HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 40\r\n\r\n{}";
    parser_rejection(&exchange(&gw, req, 1, true).await, 400);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_list_that_disagrees_is_rejected() {
    let gw = gateway().await;
    let req = b"POST /api/v1/auths/signin HTTP/1.1\r\nhost: x\r\ncontent-length: 2, 3\r\n\r\n{}x";
    parser_rejection(&exchange(&gw, req, 1, true).await, 400);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_content_length_is_rejected() {
    let gw = gateway().await;
    let req = b"POST /api/v1/auths/signin HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n{}";
    parser_rejection(&exchange(&gw, req, 1, true).await, 400);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_size_that_is_not_hexadecimal_is_a_json_400() {
    let gw = gateway().await;
    let req = b"POST /api/v1/auths/signin HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
    let x = exchange(&gw, req, 1, false).await;
    rejected(&x);
    assert!(
        !x.answers.is_empty(),
        "ragway answers a body it cannot read"
    );
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_chunk_size_is_rejected() {
    let gw = gateway().await;
    let req = b"POST /api/v1/auths/signin HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffffffff\r\n{}\r\n0\r\n\r\n";
    rejected(&exchange(&gw, req, 1, false).await);
    support::alive(&gw).await;
}

// --- Header sizes and counts -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_over_a_mebibyte_is_rejected_by_the_parser() {
    let gw = gateway().await;
    let mut req = b"GET /health HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..20 {
        req.extend_from_slice(format!("x-pad-{i}: {}\r\n", "a".repeat(60 * 1024)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    parser_rejection(&exchange(&gw, &req, 1, true).await, 431);
    support::alive(&gw).await;
}

/// A client that is still writing its oversized head after the gateway refused it and closed
/// still reads the answer, then the end of the connection (the gateway keeps serving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_head_is_answered_while_the_client_is_still_writing() {
    let gw = gateway().await;
    let addr = gw.url.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = b"GET /health HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..18 {
        head.extend_from_slice(format!("x-pad-{i}: {}\r\n", "a".repeat(60 * 1024)).as_bytes());
    }
    let _ = s.write_all(&head).await;
    // The gateway has refused the head by now; the client has not noticed and goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..4 {
        let line = format!("x-more-{i}: {}\r\n", "b".repeat(60 * 1024));
        let _ = s.write_all(line.as_bytes()).await;
    }
    let _ = s.write_all(b"\r\n").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection ends within the time allowed");
    let answers = parse_answers(&buf);
    assert_eq!(answers.len(), 1, "{}", String::from_utf8_lossy(&buf));
    json_error(&answers[0], 431);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_huge_header_is_a_json_431() {
    let gw = gateway().await;
    let req = format!(
        "GET /health HTTP/1.1\r\nhost: x\r\ncookie: {}\r\n\r\n",
        "c".repeat(200 * 1024)
    );
    json_error(&one(&gw, req.as_bytes()).await, 431);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_headers_are_rejected_by_the_parser() {
    let gw = gateway().await;
    let mut req = b"GET /health HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..5000 {
        req.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    // 5,000 headers are ~60 KiB, read whole before the parser counts them.
    parser_rejection(&exchange(&gw, &req, 1, true).await, 431);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_and_fifty_headers_are_a_json_431() {
    let gw = gateway().await;
    let mut req = b"GET /health HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..150 {
        req.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    json_error(&one(&gw, &req).await, 431);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_very_long_request_target_is_a_json_414() {
    let gw = gateway().await;
    let req = format!(
        "GET /api/models?q={} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    json_error(&one(&gw, req.as_bytes()).await, 414);
    support::alive(&gw).await;
}

// --- Request line ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_method_token_is_rejected_by_the_parser() {
    let gw = gateway().await;
    let req = b"G(E)T /health HTTP/1.1\r\nhost: x\r\n\r\n";
    parser_rejection(&exchange(&gw, req, 1, true).await, 400);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_method_is_a_json_405_or_404() {
    let gw = gateway().await;
    let brew = reqwest::Method::from_bytes(b"BREW").unwrap();
    let r = gw.req(brew, "/api/models", None).send().await.unwrap();
    support::clear_error(r, 405).await;
    let a = one(&gw, b"BREW /coffee HTTP/1.1\r\nhost: x\r\n\r\n").await;
    json_error(&a, 404);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_is_not_an_open_proxy() {
    let gw = gateway().await;
    // An absolute URI must not make ragway fetch from the named host: either the authority
    // conflict is rejected, or the path is routed locally like any other (401: no token).
    let req = b"GET http://169.254.169.254/api/models HTTP/1.1\r\nhost: 169.254.169.254\r\n\r\n";
    let x = exchange(&gw, req, 1, false).await;
    rejected(&x);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_dot_segments_in_the_path_match_no_route() {
    let gw = gateway().await;
    let a = one(
        &gw,
        b"GET /api/v1/files/../../../../etc/passwd HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    json_error(&a, 404);
    let a = one(
        &gw,
        b"GET /ollama/api/version/../../../api/v1/auths/ HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    json_error(&a, 404);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_dot_dot_segments_match_no_route() {
    let gw = gateway().await;
    let a = one(
        &gw,
        b"GET /ollama/api/version/%2e%2e%2f%2e%2e%2fapi%2fps HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    json_error(&a, 404);
    let a = one(
        &gw,
        b"GET /api/v1/files/%2E%2E/%2E%2E/etc/passwd HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    json_error(&a, 404);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_byte_in_the_path_is_rejected() {
    let gw = gateway().await;
    rejected(
        &exchange(
            &gw,
            b"GET /health\x00/admin HTTP/1.1\r\nhost: x\r\n\r\n",
            1,
            false,
        )
        .await,
    );
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_byte_in_a_header_value_is_rejected() {
    let gw = gateway().await;
    let req = b"GET /api/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer a\x00b\r\n\r\n";
    rejected(&exchange(&gw, req, 1, false).await);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_obsolete_folded_header_is_rejected() {
    let gw = gateway().await;
    let req = b"GET /api/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer a\r\n  folded-continuation\r\n\r\n";
    rejected(&exchange(&gw, req, 1, false).await);
    support::alive(&gw).await;
}

// --- Other protocols and trailing garbage ------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_0_9_request_is_rejected() {
    let gw = gateway().await;
    rejected(&exchange(&gw, b"GET /health\r\n\r\n", 1, false).await);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_preface_on_the_http1_port_is_rejected() {
    let gw = gateway().await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    parser_rejection(&exchange(&gw, preface, 1, true).await, 400);
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_garbage_after_a_valid_request_is_answered_then_rejected() {
    let gw = gateway().await;
    let req = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n\x16\x03\x01\x02\x00garbage\x00\xff\r\n\r\n";
    let x = exchange(&gw, req, 2, true).await;
    assert!(x.closed, "the connection is closed after the garbage");
    assert!(!x.answers.is_empty(), "the valid request is answered");
    assert_eq!(x.answers[0].status, 200);
    assert_eq!(x.answers.len(), 2, "the garbage is answered too");
    json_error(&x.answers[1], 400);
    support::alive(&gw).await;
}
