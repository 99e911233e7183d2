//! The forward engine: sends a request to an upstream, with the body ragway has already read
//! (to find the model, or to rewrite it) or the client's as it arrives, and streams the answer
//! back.
//!
//! Why not pingora-proxy's phases: routing by model needs the body before `upstream_peer`,
//! and pingora can only replay a pre-read body up to its 64 KiB retry buffer. So requests go
//! out on pingora's connector with its timeouts, and the answer is read by [`super::answer`]:
//! each upstream chunk is copied once, out of the answer's read buffer into the write in hand,
//! and written as soon as nothing more has arrived. Idle connections wait in this thread's
//! list ([`super::idle`]), not in pingora's pool.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, header};
use pingora::ErrorType;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::Stream;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
use pingora::upstreams::peer::HttpPeer;

use super::answer::Answer;
use super::batch::{BATCH_START, COALESCE_MAX};
use crate::app::App;
use crate::error::ApiError;
use crate::http::Session;
use crate::request::{Body, Plan, RequestCtx};
use crate::upstream::Upstream;
pub use crate::upstream::upstream_failure;

/// Largest whole JSON answer buffered to add `sources` to it; a chat completion is a few KiB
/// to a few MiB, so more means a broken or hostile upstream, not an answer.
const MAX_JSON_ANSWER: usize = 32 * 1024 * 1024;

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the framing headers ragway sets itself.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    // The body is already read, so a 100-continue handshake upstream would only confuse.
    "expect",
];

/// Client headers that carry credentials or billing/identity claims meant for a provider or
/// for a trusted hop. Forwarded, they would let a client bill another organisation or project
/// on the upstream's account (`OpenAI-Organization`, `OpenAI-Project`), present its own key
/// to a provider (Azure `api-key`, Gemini `x-goog-api-key`, Azure APIM), or pose as the
/// user a trusted front end vouches for (`X-OpenWebUI-User-*`) or as another client address.
const PROVIDER_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    // The web page's CSRF token (src/auth/csrf.rs): proof meant for the gateway only.
    "x-csrf-token",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "openai-organization",
    "openai-project",
    "anthropic-organization",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// Header name prefixes stripped for the same reason as [`PROVIDER_HEADERS`].
const PROVIDER_PREFIXES: &[&str] = &["x-openwebui-"];

/// Names a message declares hop-by-hop in its `Connection` header (RFC 9110 §7.6.1): they
/// are meant for the gateway alone and must not travel on.
pub fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether a client header must not reach an upstream.
fn stripped(name: &str, api_key_header: &str, listed: &[String]) -> bool {
    HOP_BY_HOP.contains(&name)
        || PROVIDER_HEADERS.contains(&name)
        || PROVIDER_PREFIXES.iter().any(|p| name.starts_with(p))
        || name.eq_ignore_ascii_case(api_key_header)
        || listed.iter().any(|l| l == name)
}

/// Copies the client's headers minus hop-by-hop ones (fixed and `Connection`-declared) and
/// every credential: the client's token or key is never forwarded; the upstream's configured
/// key is sent instead.
pub fn upstream_headers(
    client: &HeaderMap,
    api_key_header: &str,
    up: &Upstream,
    req: &mut RequestHeader,
) -> pingora::Result<()> {
    let listed = connection_listed(client);
    for (name, value) in client {
        if stripped(name.as_str(), api_key_header, &listed) {
            continue;
        }
        req.append_header(name.clone(), value.clone())?;
    }
    req.insert_header(header::HOST, up.authority.as_str())?;
    if let Some(key) = &up.config.key {
        req.insert_header(header::AUTHORIZATION, format!("Bearer {key}"))?;
    }
    Ok(())
}

/// A request to `up` as pingora's writer takes it: the client's headers that may travel
/// ([`upstream_headers`]), no case map (standard names go out in their usual case).
fn built_request(
    method: Method,
    path: &str,
    client: &HeaderMap,
    api_key_header: &str,
    up: &Upstream,
) -> pingora::Result<RequestHeader> {
    let mut req = RequestHeader::build_no_case(method, path.as_bytes(), None)?;
    upstream_headers(client, api_key_header, up, &mut req)?;
    Ok(req)
}

/// The request line and headers of `req` as HTTP/1.1 puts them on the wire.
///
/// `RequestHeader::build_no_case` has parsed the path as a URI, which holds no space, CR, LF
/// or other control byte, so it cannot split the request line.
fn wire_head(req: &RequestHeader) -> Vec<u8> {
    let path = req.raw_path();
    let method = req.method.as_str();
    let size = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + method.len()
        + path.len()
        + 14;
    let mut head = Vec::with_capacity(size);
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(path);
    head.extend_from_slice(b" HTTP/1.1\r\n");
    // pingora's own header writer: standard names in their usual case, as before.
    req.header_to_h1_wire(&mut head);
    head.extend_from_slice(b"\r\n");
    head
}

/// Bytes a path is written with as it is: RFC 3986's unreserved and sub-delimiter characters,
/// `:`, `@`, `/`, `?` and `%`. Every one of them is accepted by the URI check of
/// `RequestHeader`, which a path with any other byte still goes through.
fn plain_path(path: &[u8]) -> bool {
    path.first() == Some(&b'/') && path.iter().all(|&b| PLAIN_PATH[usize::from(b)])
}

/// [`plain_path`]'s bytes as a table: one look-up per byte rather than a search of the set.
const PLAIN_PATH: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0u8;
    loop {
        table[b as usize] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
                    | b'/'
                    | b'?'
                    | b'%'
            );
        if b == u8::MAX {
            break table;
        }
        b += 1;
    }
};

/// What a header value may hold, as `HeaderValue` checks it: no control byte but the tab.
fn plain_value(v: &[u8]) -> bool {
    v.iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

/// The request line and headers of a request to `up`, as HTTP/1.1 puts them on the wire:
/// the client's headers that may travel ([`upstream_headers`]) under the names the client
/// wrote, then `Host`, the upstream's key and `length` as `Content-Length`. Written straight
/// from the client's header: building a `RequestHeader` only to serialise it (a URI parse, a
/// header map and its inserts, then their drops) was ~4,000 instructions of a forwarded
/// request. A path or key outside the plain forms takes that way still, with its checks.
fn upstream_head(
    method: &Method,
    path: &str,
    client: &RequestHeader,
    api_key_header: &str,
    up: &Upstream,
    length: Option<&[u8]>,
) -> pingora::Result<Vec<u8>> {
    let bearer = up.config.key.as_deref();
    if !plain_path(path.as_bytes()) || !bearer.is_none_or(|k| plain_value(k.as_bytes())) {
        let mut req = built_request(method.clone(), path, &client.headers, api_key_header, up)?;
        if let Some(v) = length {
            req.insert_header(header::CONTENT_LENGTH, v)?;
        }
        return Ok(wire_head(&req));
    }
    let listed = connection_listed(&client.headers);
    let mut head = Vec::with_capacity(256 + path.len());
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    // pingora keeps the names as the client wrote them in a second map, in the same order.
    let mut cases = client.case_header_iter();
    for (name, value) in &client.headers {
        let case = cases
            .next()
            .map(|(c, _)| c.as_slice())
            .filter(|c| c.eq_ignore_ascii_case(name.as_str().as_bytes()));
        if stripped(name.as_str(), api_key_header, &listed) {
            continue;
        }
        head.extend_from_slice(case.unwrap_or(name.as_str().as_bytes()));
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Host: ");
    head.extend_from_slice(up.authority.as_bytes());
    head.extend_from_slice(b"\r\n");
    if let Some(key) = bearer {
        head.extend_from_slice(b"authorization: Bearer ");
        head.extend_from_slice(key.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(v) = length {
        head.extend_from_slice(b"Content-Length: ");
        head.extend_from_slice(v);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Ok(head)
}

/// Writes all of `parts` and flushes: one `writev` when the socket takes them at once, so a
/// request leaves in one segment the way nginx sends it. Through pingora's session the header
/// was flushed on its own, and keeping header and body together that way took a `TCP_CORK`
/// on and off: three syscalls more per request, and the upstream woke twice without it.
async fn write_parts(stream: &mut Stream, mut parts: [&[u8]; 2]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    while parts.iter().any(|p| !p.is_empty()) {
        let slices = parts.map(std::io::IoSlice::new);
        let mut n = stream.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        for part in &mut parts {
            let taken = n.min(part.len());
            *part = &part[taken..];
            n -= taken;
        }
    }
    stream.flush().await
}

/// Sends `head` (a request line and headers, see [`upstream_head`]) and `body` on `stream`
/// and gives the stream back for the answer.
async fn send_request(
    mut stream: Stream,
    peer: &HttpPeer,
    head: &[u8],
    body: &Bytes,
) -> pingora::Result<Stream> {
    let write_timeout = peer.options.write_timeout;
    let written = write_parts(&mut stream, [head, body]);
    let written = match write_timeout {
        Some(t) => tokio::time::timeout(t, written)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
        None => written.await,
    };
    written.map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::TimedOut {
            ErrorType::WriteTimedout
        } else {
            ErrorType::WriteError
        };
        pingora::Error::because(kind, "while writing the request", e)
    })?;
    Ok(stream)
}

/// Why sending a request with the client's body failed.
enum SendFailure {
    /// The upstream could not take it: answered with a 502.
    Upstream(Box<pingora::Error>),
    /// The client's body could not be read: nothing to answer.
    Client(Box<pingora::Error>),
}

/// Sends `req` on `stream`, then the client's body as it arrives, in the client's own
/// framing (`req` carries its `Content-Length` or `Transfer-Encoding`).
async fn send_client_body(
    stream: Stream,
    peer: &HttpPeer,
    req: RequestHeader,
    session: &mut Session,
) -> Result<Stream, SendFailure> {
    let mut upstream = Http1Session::new_with_options(stream, peer);
    upstream.write_timeout = peer.options.write_timeout;
    upstream
        .write_request_header(Box::new(req))
        .await
        .map_err(SendFailure::Upstream)?;
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(SendFailure::Client)?
    {
        upstream
            .write_body(&chunk)
            .await
            .map_err(SendFailure::Upstream)?;
    }
    upstream
        .finish_body()
        .await
        .map_err(SendFailure::Upstream)?;
    Ok(upstream.into_inner())
}

fn is_connect_error(e: &pingora::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::HandshakeError
            | ErrorType::SocketError
    )
}

/// Forwards `plan` and streams the response to the client. On return a response has been
/// written (the upstream's, or a JSON error); `Err` means the client connection must close.
pub async fn forward(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    plan: Plan,
) -> pingora::Result<()> {
    // Treat a client's FIN as "gone" so a long generation stops when nobody is listening.
    session.set_abort_on_close(true);
    let connect = app.config.connect_timeout;
    let idle = app.config.read_idle_timeout;
    let mut last_error = ApiError::new(502, "No upstream hosts this model");
    // The client's body can be read only once, so it gets one upstream and a fresh
    // connection (a pooled one the upstream has closed would leave nothing to retry with).
    // Without a body (`GET /ollama/api/version/{idx}`) there is nothing to lose: the pool.
    let from_client = matches!(plan.body, Body::Client) && !session.is_body_empty();
    let attempts = if from_client {
        1
    } else {
        plan.candidates.len().min(2)
    };
    for up in plan.candidates.iter().take(attempts) {
        let peer = match up.peer(connect, idle).await {
            Ok(p) => p,
            Err(e) => {
                up.mark_failed();
                last_error = ApiError::new(502, format!("Upstream address: {e}"));
                continue;
            }
        };
        let pooled = if from_client {
            None
        } else {
            super::idle::take(&peer)
        };
        let stream = match pooled {
            Some(s) => Ok(s),
            None => app.connector.new_stream(&peer).await,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                if is_connect_error(&e) {
                    up.mark_failed();
                }
                tracing::warn!(upstream = %up.config.url, error = %e, "upstream connect failed");
                last_error = upstream_failure(&e);
                continue;
            }
        };
        let _in_flight = up.begin();

        let client = session.req_header();
        let api_key_header = &app.config.auth.api_key_header;
        let sent = match &plan.body {
            Body::Client if from_client => {
                let mut req = built_request(
                    plan.method.clone(),
                    &plan.path,
                    &client.headers,
                    api_key_header,
                    up,
                )?;
                for name in [header::CONTENT_LENGTH, header::TRANSFER_ENCODING] {
                    if let Some(v) = session.req_header().headers.get(&name) {
                        req.insert_header(name, v.clone())?;
                    }
                }
                match send_client_body(stream, &peer, req, session).await {
                    Ok(s) => Ok(s),
                    Err(SendFailure::Client(e)) => return Err(e),
                    Err(SendFailure::Upstream(e)) => {
                        // Part of the client's body may be unread: the connection cannot
                        // carry another request.
                        session.set_keepalive(None);
                        Err(e)
                    }
                }
            }
            Body::Client => {
                // No body: the request line and headers alone (a `Content-Length: 0` the
                // client sent is kept).
                let length = client
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .map(http::HeaderValue::as_bytes);
                let head =
                    upstream_head(&plan.method, &plan.path, client, api_key_header, up, length)?;
                send_request(stream, &peer, &head, &Bytes::new()).await
            }
            Body::Read(body) => {
                let length = body.len().to_string();
                let head = upstream_head(
                    &plan.method,
                    &plan.path,
                    client,
                    api_key_header,
                    up,
                    Some(length.as_bytes()),
                )?;
                send_request(stream, &peer, &head, body).await
            }
        };
        let sent = match sent {
            Ok(s) => s,
            Err(e) => {
                // A pooled connection the upstream had closed: the request never arrived, so
                // trying once more is safe.
                tracing::debug!(upstream = %up.config.url, error = %e, "sending to upstream failed");
                last_error = upstream_failure(&e);
                continue;
            }
        };
        up.mark_ok();

        // Wait for the answer, but notice a client that goes away meanwhile.
        let head_request = plan.method == Method::HEAD;
        let header_read = tokio::select! {
            r = Answer::read(sent, head_request, peer.options.read_timeout) => Some(r),
            r = session.read_body_or_idle(true) => {
                if r.is_err() { None } else { std::future::pending().await }
            }
        };
        let Some(header_read) = header_read else {
            tracing::info!(upstream = %up.config.url, "client left before the upstream answered");
            return Err(pingora::Error::new(ErrorType::ConnectionClosed));
        };
        let mut upstream = match header_read {
            Ok(a) => a,
            Err(e) => {
                let err = upstream_failure(&e);
                tracing::warn!(upstream = %up.config.url, error = %e, "upstream response failed");
                return send_error(session, ctx, err).await;
            }
        };
        ctx.first_byte = Some(ctx.start.elapsed());
        if let Some(convert) = &plan.convert {
            let reusable = super::ndjson_sse::relay(
                session,
                ctx,
                &mut upstream,
                convert,
                plan.sources.as_ref(),
                &plan.headers,
            )
            .await?;
            if reusable {
                super::idle::put(upstream, &peer);
            }
            return Ok(());
        }
        let head = &upstream.head;
        let head_status = head.status;
        let status = head_status.as_u16();
        ctx.status = Some(status);
        let content_type = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();

        if let Some(replacement) = plan
            .replace_success_body
            .filter(|_| head_status.is_success())
        {
            upstream.drain().await?;
            let reply =
                crate::http::Reply::bytes(status, "application/json", Bytes::from(replacement));
            super::idle::put(upstream, &peer);
            return crate::http::send(session, reply).await;
        }

        crate::usage::start_body(ctx, status, &content_type);
        let sources = plan.sources.filter(|_| head_status.is_success());
        if let Some(src) = &sources
            && content_type.starts_with("application/json")
        {
            // A whole JSON answer: add `sources` at the top level, as Open WebUI does.
            let mut body = bytes::BytesMut::new();
            while upstream.read_into(&mut body).await? {
                if body.len() > MAX_JSON_ANSWER {
                    tracing::warn!(upstream = %up.config.url, "upstream JSON answer over the buffering bound");
                    // Dropping `upstream` (not released to the pool) closes that connection.
                    let err = ApiError::new(
                        502,
                        format!(
                            "Upstream answer too large: over {} MiB",
                            MAX_JSON_ANSWER / (1024 * 1024)
                        ),
                    );
                    return send_error(session, ctx, err).await;
                }
            }
            crate::usage::scan_whole(ctx, &body);
            crate::usage::finish(&app.usage, ctx).await;
            let merged = match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(serde_json::Value::Object(mut o)) => {
                    o.insert("sources".into(), src.json.clone());
                    Bytes::from(serde_json::to_vec(&o).expect("json"))
                }
                _ => body.freeze(),
            };
            ctx.streamed_bytes += merged.len() as u64;
            super::idle::put(upstream, &peer);
            let mut reply = crate::http::Reply::bytes(status, "application/json", merged);
            for (n, v) in &plan.headers {
                reply = reply.with_header(n.clone(), v.clone());
            }
            return crate::http::send(session, reply).await;
        }
        let prelude = sources
            .filter(|_| content_type.starts_with("text/event-stream"))
            .map(|s| s.sse_event);
        let head = &upstream.head;
        let mut resp = ResponseHeader::build_no_case(head_status, Some(head.headers.len()))?;
        let listed = connection_listed(&head.headers);
        let rewritten = prelude.is_some() || crate::usage::rewrites_body(ctx);
        for (name, value) in &head.headers {
            // With a prelude (or a usage chunk dropped) the length changes, so framing falls
            // back to chunked.
            if HOP_BY_HOP.contains(&name.as_str()) && (name != header::CONTENT_LENGTH || rewritten)
            {
                continue;
            }
            if listed.iter().any(|l| l == name.as_str()) && name != header::CONTENT_LENGTH {
                continue;
            }
            resp.append_header(name.clone(), value.clone())?;
        }
        if head_status.is_success() {
            for (n, v) in &plan.headers {
                resp.append_header(n.clone(), v.as_str())?;
            }
        }
        let no_body = upstream.done();
        if !no_body && resp.headers.get(header::CONTENT_LENGTH).is_none() {
            // Chunked framing keeps the connection reusable and lets a stream cut short by
            // the upstream show up as incomplete instead of ending as if it were whole.
            resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
        session.write_response_header(Box::new(resp)).await?;
        if no_body {
            super::idle::put(upstream, &peer);
            return Ok(());
        }
        if let Some(event) = prelude {
            ctx.streamed_bytes += event.len() as u64;
            session.write_response_body(event, false).await?;
        }
        pump(session, ctx, &mut upstream, idle, &up.config.url).await?;
        let withheld = crate::usage::relay_end(ctx);
        if !withheld.is_empty() {
            ctx.streamed_bytes += withheld.len() as u64;
            session.write_response_body(withheld, false).await?;
        }
        // Recorded before the end is sent: a client that has the whole answer finds it in
        // its usage.
        crate::usage::finish(&app.usage, ctx).await;
        session.finish_body().await?;
        super::idle::put(upstream, &peer);
        return Ok(());
    }
    send_error(session, ctx, last_error).await
}

/// Sends what is in `batch` to the client, after the usage scanner has seen it (it may hold
/// back an incomplete event it could have to drop). The scanner looks at a whole write's
/// worth of chunks at once: its per-call work is paid per write, not per token.
async fn flush(
    session: &mut Session,
    ctx: &mut RequestCtx,
    batch: &mut bytes::BytesMut,
) -> pingora::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let out = crate::usage::relay(ctx, batch.split().freeze());
    if out.is_empty() {
        return Ok(());
    }
    ctx.streamed_bytes += out.len() as u64;
    session.write_response_body(out, false).await
}

/// Streams the upstream's body to the client until its end. `Err`: the client connection
/// must close (the client left, or the upstream failed or stalled mid-stream, which the
/// missing terminating chunk tells the client).
///
/// Costs per chunk are what limit a token stream, so: the upstream is read without waiting
/// as long as it has data, and only when it has none does the loop wait on it and on the
/// client's socket (for a hang-up) together; the idle bound is one timer for the whole
/// stream, re-armed only when it fires, not one per read.
async fn pump(
    session: &mut Session,
    ctx: &mut RequestCtx,
    upstream: &mut Answer,
    idle: Duration,
    url: &str,
) -> pingora::Result<()> {
    use futures_util::FutureExt;

    upstream.set_read_timeout(None);
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let mut batch = bytes::BytesMut::with_capacity(BATCH_START);
    loop {
        let read = if let Some(r) = upstream.read_into(&mut batch).now_or_never() {
            r
        } else {
            // Nothing more has arrived: what is in hand goes out before waiting.
            flush(session, ctx, &mut batch).await?;
            let waiting_since = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    biased;
                    r = upstream.read_into(&mut batch) => break r,
                    r = session.read_body_or_idle(true) => {
                        if r.is_err() {
                            tracing::info!(upstream = %url, "client disconnected mid-stream; dropping the upstream request");
                            return Err(pingora::Error::new(ErrorType::ConnectionClosed));
                        }
                    }
                    () = &mut timer => {
                        let due = waiting_since + idle;
                        if tokio::time::Instant::now() >= due {
                            tracing::warn!(upstream = %url, "upstream went silent mid-stream");
                            return Err(pingora::Error::explain(
                                ErrorType::ReadTimedout,
                                format!("upstream sent nothing for {idle:?}"),
                            ));
                        }
                        timer.as_mut().reset(due);
                    }
                }
            }
        };
        match read {
            Ok(true) => {
                if batch.len() >= COALESCE_MAX {
                    // Dropping `upstream` on error closes that connection, which is how
                    // the upstream learns the client is gone.
                    flush(session, ctx, &mut batch).await?;
                }
            }
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(upstream = %url, error = %e, "upstream failed mid-stream");
                // What arrived before the failure is the client's; ending without the
                // terminating chunk then tells it the body is incomplete (a clean end
                // would pass a truncated answer off as whole).
                flush(session, ctx, &mut batch).await?;
                return Err(e);
            }
        }
    }
    flush(session, ctx, &mut batch).await
}

async fn send_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: ApiError,
) -> pingora::Result<()> {
    ctx.status = Some(err.status);
    crate::http::send(session, err.into()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected client `Stream` with its peer, and the server side of the connection.
    async fn connected() -> (Stream, HttpPeer, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(
            client.unwrap(),
        ));
        (
            client,
            HttpPeer::new(addr, false, String::new()),
            server.unwrap().0,
        )
    }

    fn request(method: Method, path: &[u8], body: &[u8]) -> RequestHeader {
        let mut req = RequestHeader::build_no_case(method, path, None).unwrap();
        req.insert_header(header::HOST, "up:11434").unwrap();
        req.insert_header(header::CONTENT_LENGTH, body.len().to_string())
            .unwrap();
        req
    }

    /// Reads what the client sent until `len` bytes arrived.
    async fn received(server: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        server.read_exact(&mut got).await.unwrap();
        got
    }

    /// Checks the request the server got is exactly `request`, answers with `response` and
    /// reads the answer's head off `stream`.
    async fn answer(
        server: &mut TcpStream,
        stream: Stream,
        head_request: bool,
        request: &[u8],
        response: &[u8],
    ) -> Answer {
        assert_eq!(received(server, request.len()).await, request);
        server.write_all(response).await.unwrap();
        Answer::read(stream, head_request, None).await.unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_goes_out_whole_and_its_answer_is_read() {
        let (stream, peer, mut server) = connected().await;
        let body = Bytes::from_static(b"{\"model\":\"m\"}");
        let req = request(Method::POST, b"/api/chat?x=1", &body);
        let head = wire_head(&req);
        let stream = send_request(stream, &peer, &head, &body).await.unwrap();
        let mut answer = answer(
            &mut server,
            stream,
            false,
            b"POST /api/chat?x=1 HTTP/1.1\r\nHost: up:11434\r\nContent-Length: 13\r\n\r\n{\"model\":\"m\"}",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )
        .await;
        assert_eq!(answer.head.status, 200);
        let mut body = bytes::BytesMut::new();
        assert!(answer.read_into(&mut body).await.unwrap());
        assert_eq!(&body[..], b"ok");
        assert!(!answer.read_into(&mut body).await.unwrap());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_body_larger_than_a_socket_write_arrives_entire() {
        let (stream, peer, mut server) = connected().await;
        // Larger than the loopback socket takes at once, so the write resumes part-way.
        let body = Bytes::from(vec![b'x'; 8 * 1024 * 1024]);
        let req = request(Method::POST, b"/api/embed", &body);
        let head = wire_head(&req);
        let reader = tokio::spawn(async move {
            let got = received(&mut server, head.len() + 8 * 1024 * 1024).await;
            (got, head)
        });
        send_request(stream, &peer, &wire_head(&req), &body)
            .await
            .unwrap();
        let (got, head) = reader.await.unwrap();
        assert_eq!(&got[..head.len()], &head[..]);
        assert!(got[head.len()..].iter().all(|b| *b == b'x'));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_upstream_that_stops_reading_times_the_write_out() {
        let (stream, mut peer, _server) = connected().await;
        peer.options.write_timeout = Some(Duration::from_millis(200));
        // Far more than the loopback socket buffers hold, and the server never reads.
        let body = Bytes::from(vec![b'x'; 64 * 1024 * 1024]);
        let req = request(Method::POST, b"/api/embed", &body);
        let started = std::time::Instant::now();
        let err = send_request(stream, &peer, &wire_head(&req), &body)
            .await
            .expect_err("the write cannot finish");
        assert_eq!(err.etype(), &ErrorType::WriteTimedout);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_to_head_has_no_body_whatever_its_length_says() {
        let (stream, peer, mut server) = connected().await;
        let req = request(Method::HEAD, b"/", b"");
        let stream = send_request(stream, &peer, &wire_head(&req), &Bytes::new())
            .await
            .unwrap();
        let mut answer = answer(
            &mut server,
            stream,
            true,
            b"HEAD / HTTP/1.1\r\nHost: up:11434\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
        )
        .await;
        // Read as a GET's answer, this would wait for ten bytes that never come.
        let mut body = bytes::BytesMut::new();
        let more = tokio::time::timeout(Duration::from_secs(5), answer.read_into(&mut body))
            .await
            .expect("no body is awaited");
        assert!(!more.unwrap());
    }

    fn upstream(key: Option<&str>) -> Upstream {
        Upstream::new(
            0,
            crate::config::UpstreamConfig {
                kind: crate::config::UpstreamKind::Ollama,
                url: "http://127.0.0.1:11434".into(),
                key: key.map(Into::into),
                prefix_id: None,
                model_ids: Vec::new(),
                tags: Vec::new(),
                connection_type: "local".into(),
                context_length: None,
                context_lengths: std::collections::BTreeMap::new(),
            },
        )
    }

    /// A client's header as pingora's parser builds it: names kept as the client wrote them.
    fn client(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(Method::POST, b"/ollama/api/chat", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        req
    }

    /// The head the slow way: a `RequestHeader` built and serialised.
    fn built_head(path: &str, client: &RequestHeader, up: &Upstream, length: &[u8]) -> Vec<u8> {
        let mut req = built_request(Method::POST, path, &client.headers, "x-api-key", up).unwrap();
        req.insert_header(header::CONTENT_LENGTH, length).unwrap();
        wire_head(&req)
    }

    /// The head's header lines, lower-cased and sorted: what an HTTP server reads from it.
    fn lines(head: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(head).unwrap().to_ascii_lowercase();
        let mut lines: Vec<String> = text.split("\r\n").map(str::to_string).collect();
        lines.sort();
        lines
    }

    #[test]
    fn the_written_head_carries_what_the_built_one_does_under_the_clients_names() {
        let c = client(&[
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            ("accept", "application/json"),
            ("Authorization", "Bearer sk-client"),
            ("X-Api-Key", "sk-other"),
            ("Cookie", "token=x"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("X-OpenWebUI-User-Id", "admin"),
            ("Host", "gateway:8080"),
            ("Content-Length", "999"),
            ("Transfer-Encoding", "chunked"),
            ("X-Trace", "abc"),
        ]);
        for key in [None, Some("sk-upstream")] {
            let up = upstream(key);
            let head = upstream_head(
                &Method::POST,
                "/api/chat?x=1",
                &c,
                "x-api-key",
                &up,
                Some(b"13"),
            )
            .unwrap();
            assert_eq!(
                lines(&head),
                lines(&built_head("/api/chat?x=1", &c, &up, b"13"))
            );
            let text = String::from_utf8(head).unwrap();
            assert!(
                text.starts_with("POST /api/chat?x=1 HTTP/1.1\r\n"),
                "{text}"
            );
            assert!(text.ends_with("\r\n\r\n"), "{text}");
            // The client's spelling, as nginx forwards it.
            assert!(
                text.contains("\r\nContent-Type: application/json\r\n"),
                "{text}"
            );
            assert!(text.contains("\r\nX-Trace: abc\r\n"), "{text}");
            assert!(
                !text.contains("sk-client") && !text.contains("sk-other"),
                "{text}"
            );
            assert!(!text.to_ascii_lowercase().contains("x-hop"), "{text}");
            assert_eq!(text.matches("Content-Length").count(), 1, "{text}");
        }
    }

    #[test]
    fn the_plain_path_table_holds_the_plain_bytes_and_the_uri_check_takes_them() {
        for b in 0..=u8::MAX {
            let plain = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b);
            assert_eq!(PLAIN_PATH[usize::from(b)], plain, "{b:#x}");
            if plain {
                let path = [b'/', b'a', b];
                assert!(
                    RequestHeader::build_no_case(Method::POST, &path, None).is_ok(),
                    "{b:#x}"
                );
            }
        }
    }

    #[test]
    fn paths_and_keys_outside_the_plain_forms_get_the_uri_check() {
        let c = client(&[("Content-Type", "application/json")]);
        let up = upstream(None);
        // Printable, but not in the plain set: the URI check decides, as before.
        for path in ["/api/chat?q=\"x\"", "/a{b}", "/a|b"] {
            let fast = upstream_head(&Method::POST, path, &c, "x-api-key", &up, Some(b"2"));
            let slow = RequestHeader::build_no_case(Method::POST, path.as_bytes(), None);
            assert_eq!(fast.is_ok(), slow.is_ok(), "{path}");
        }
        for path in ["/a b", "/a\r\nx: y", "/a\tb", "/a\u{7f}"] {
            assert!(
                upstream_head(&Method::POST, path, &c, "x-api-key", &up, None).is_err(),
                "{path:?}"
            );
        }
        // A configured key that no header value may hold is refused, not written.
        let bad = upstream(Some("sk\r\nx-injected: 1"));
        assert!(upstream_head(&Method::POST, "/api/chat", &c, "x-api-key", &bad, None).is_err());
    }

    #[test]
    fn a_path_that_would_split_the_request_line_never_reaches_the_writer() {
        // `wire_head` relies on the header's own URI check.
        for path in [&b"/a b"[..], b"/a\r\nx: y", b"/a\tb", b"/a\x7f"] {
            assert!(
                RequestHeader::build_no_case(Method::POST, path, None).is_err(),
                "{path:?}"
            );
        }
    }
}
