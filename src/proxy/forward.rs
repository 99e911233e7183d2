//! The forward engine: sends a request whose body ragway has already read (to find the
//! model, or to rewrite it) to an upstream, and streams the answer back.
//!
//! Why not pingora's proxy phases for these routes: routing by model needs the body before
//! `upstream_peer`, and pingora can only replay a pre-read body up to its 64 KiB retry
//! buffer. So these requests use pingora's own connector and sessions directly: the same
//! timeouts and zero-copy `Bytes` chunks, with every upstream chunk written to the client as
//! soon as it arrives. Idle connections wait in this thread's list ([`super::idle`]), not in
//! pingora's pool.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, header};
use pingora::ErrorType;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;

use crate::app::App;
use crate::error::ApiError;
use crate::request::{Plan, RequestCtx};
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

/// `TCP_CORK` held on an upstream socket while a request is written: the kernel sends what
/// was written as full segments when the guard drops, not one segment per write.
struct Cork(std::os::fd::RawFd);

impl Cork {
    /// Corks a plain TCP stream (TLS and Unix sockets are left as they are).
    fn on(stream: &pingora::protocols::Stream) -> Option<Cork> {
        use std::os::fd::AsRawFd;
        let tcp = stream
            .as_any()
            .downcast_ref::<pingora::protocols::l4::stream::Stream>()?;
        let fd = tcp.as_raw_fd();
        set_cork(fd, true).then_some(Cork(fd))
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        // Uncorking pushes what waits; if it failed, the kernel still sends it within 200 ms.
        set_cork(self.0, false);
    }
}

#[cfg(target_os = "linux")]
fn set_cork(fd: std::os::fd::RawFd, on: bool) -> bool {
    let value = libc::c_int::from(on);
    // SAFETY: `fd` is a socket the caller's stream owns for the whole call, and the option
    // value is a live `c_int` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&raw const value).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn set_cork(_: std::os::fd::RawFd, _: bool) -> bool {
    false
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
    session.as_mut().set_abort_on_close(true);
    let connect = app.config.connect_timeout;
    let idle = app.config.read_idle_timeout;
    let mut last_error = ApiError::new(502, "No upstream hosts this model");
    let attempts = plan.candidates.len().min(2);
    for up in plan.candidates.iter().take(attempts) {
        let peer = match up.peer(connect, idle).await {
            Ok(p) => p,
            Err(e) => {
                up.mark_failed();
                last_error = ApiError::new(502, format!("Upstream address: {e}"));
                continue;
            }
        };
        let session_for_peer = match super::idle::take(&peer) {
            Some(s) => Ok(s),
            None => app.connector.get_http_session(&peer).await.map(|(s, _)| s),
        };
        let mut upstream = match session_for_peer {
            Ok(mut s) => {
                // The connector does not apply the peer's I/O timeouts to the session
                // (pingora's proxy does that itself), so set them here.
                s.set_read_timeout(peer.options.read_timeout);
                s.set_write_timeout(peer.options.write_timeout);
                s
            }
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

        let mut req = RequestHeader::build(plan.method.clone(), plan.path.as_bytes(), None)?;
        upstream_headers(
            &session.req_header().headers,
            &app.config.auth.api_key_header,
            up,
            &mut req,
        )?;
        req.insert_header(header::CONTENT_LENGTH, plan.body.len().to_string())?;
        // One segment for the header and the body, as nginx's `writev` sends them: pingora
        // flushes the header on its own, which cost a second send per request and woke the
        // upstream twice (once for a header it cannot act on without the body).
        let cork = (!plan.body.is_empty())
            .then(|| upstream.stream().and_then(Cork::on))
            .flatten();
        let sent = async {
            upstream.write_request_header(Box::new(req)).await?;
            if !plan.body.is_empty() {
                upstream.write_request_body(plan.body.clone(), true).await?;
            }
            upstream.finish_request_body().await
        }
        .await;
        drop(cork);
        if let Err(e) = sent {
            // A pooled connection the upstream had closed: the request never arrived, so
            // trying once more is safe.
            tracing::debug!(upstream = %up.config.url, error = %e, "sending to upstream failed");
            last_error = upstream_failure(&e);
            continue;
        }
        up.mark_ok();

        // Wait for the answer, but notice a client that goes away meanwhile.
        let header_read = tokio::select! {
            r = read_final_header(&mut upstream) => Some(r),
            r = session.as_mut().read_body_or_idle(true) => {
                if r.is_err() { None } else { std::future::pending().await }
            }
        };
        let Some(header_read) = header_read else {
            tracing::info!(upstream = %up.config.url, "client left before the upstream answered");
            return Err(pingora::Error::new(ErrorType::ConnectionClosed));
        };
        if let Err(e) = header_read {
            let err = upstream_failure(&e);
            tracing::warn!(upstream = %up.config.url, error = %e, "upstream response failed");
            return send_error(session, ctx, err).await;
        }
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
                super::idle::put(&app.connector, upstream, &peer).await;
            }
            return Ok(());
        }
        let head = upstream.response_header().expect("header was read").clone();
        let status = head.status.as_u16();
        ctx.status = Some(status);

        if let Some(replacement) = plan
            .replace_success_body
            .filter(|_| head.status.is_success())
        {
            while upstream.read_response_body().await?.is_some() {}
            let reply =
                crate::http::Reply::bytes(status, "application/json", Bytes::from(replacement));
            super::idle::put(&app.connector, upstream, &peer).await;
            return crate::http::send(session, reply).await;
        }

        let content_type = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        crate::usage::start_body(ctx, status, &content_type);
        let sources = plan.sources.filter(|_| head.status.is_success());
        if let Some(src) = &sources
            && content_type.starts_with("application/json")
        {
            // A whole JSON answer: add `sources` at the top level, as Open WebUI does.
            let mut body = bytes::BytesMut::new();
            while let Some(chunk) = upstream.read_response_body().await? {
                if body.len() + chunk.len() > MAX_JSON_ANSWER {
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
                body.extend_from_slice(&chunk);
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
            super::idle::put(&app.connector, upstream, &peer).await;
            let mut reply = crate::http::Reply::bytes(status, "application/json", merged);
            for (n, v) in &plan.headers {
                reply = reply.with_header(n.clone(), v.clone());
            }
            return crate::http::send(session, reply).await;
        }
        let prelude = sources
            .filter(|_| content_type.starts_with("text/event-stream"))
            .map(|s| s.sse_event);
        let mut resp = ResponseHeader::build(head.status, Some(head.headers.len()))?;
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
        if head.status.is_success() {
            for (n, v) in &plan.headers {
                resp.append_header(n.clone(), v.as_str())?;
            }
        }
        let no_body = upstream.response_done() || plan.method == Method::HEAD;
        if !no_body && resp.headers.get(header::CONTENT_LENGTH).is_none() {
            // Chunked framing keeps the connection reusable and lets a stream cut short by
            // the upstream show up as incomplete instead of ending as if it were whole.
            resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
        session
            .write_response_header(Box::new(resp), no_body)
            .await?;
        if no_body {
            return Ok(());
        }
        if let Some(event) = prelude {
            ctx.streamed_bytes += event.len() as u64;
            session.write_response_body(Some(event), false).await?;
        }
        pump(session, ctx, &mut upstream, idle, &up.config.url).await?;
        let held = crate::usage::relay_end(ctx);
        if !held.is_empty() {
            ctx.streamed_bytes += held.len() as u64;
            session.write_response_body(Some(held), false).await?;
        }
        // Recorded before the end is sent: a client that has the whole answer finds it in
        // its usage.
        crate::usage::finish(&app.usage, ctx).await;
        session.write_response_body(None, true).await?;
        super::idle::put(&app.connector, upstream, &peer).await;
        return Ok(());
    }
    send_error(session, ctx, last_error).await
}

/// Most bytes of upstream chunks, already in hand together, written to the client at once.
/// A chunk is never held back to wait for another: only what the upstream has already
/// delivered is joined, so a token stream stays unbuffered while a burst of tokens costs
/// one write instead of one per token.
pub const COALESCE_MAX: usize = 16 * 1024;

/// Upstream chunks received but not yet written to the client.
#[derive(Default)]
pub struct Batch {
    /// The only chunk so far, passed on without a copy.
    first: Option<Bytes>,
    /// Several chunks, joined.
    joined: bytes::BytesMut,
}

impl Batch {
    /// Adds a chunk after the ones in hand.
    pub fn push(&mut self, chunk: Bytes) {
        if self.first.is_none() && self.joined.is_empty() {
            self.first = Some(chunk);
            return;
        }
        if let Some(first) = self.first.take() {
            self.joined.reserve(first.len() + chunk.len());
            self.joined.extend_from_slice(&first);
        }
        self.joined.extend_from_slice(&chunk);
    }

    /// Bytes in hand.
    #[must_use]
    pub fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.joined.len()
    }

    /// Whether nothing is in hand.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything in hand, as one chunk.
    pub fn take(&mut self) -> Option<Bytes> {
        self.first
            .take()
            .or_else(|| (!self.joined.is_empty()).then(|| self.joined.split().freeze()))
    }
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
    upstream: &mut pingora::protocols::http::client::HttpSession,
    idle: Duration,
    url: &str,
) -> pingora::Result<()> {
    use futures_util::FutureExt;

    upstream.set_read_timeout(None);
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let mut batch = Batch::default();
    loop {
        let read = if let Some(r) = upstream.read_response_body().now_or_never() {
            r
        } else {
            // Nothing more has arrived: what is in hand goes out before waiting.
            if let Some(out) = batch.take() {
                session.write_response_body(Some(out), false).await?;
            }
            let waiting_since = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    biased;
                    r = upstream.read_response_body() => break r,
                    r = session.as_mut().read_body_or_idle(true) => {
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
            Ok(Some(bytes)) => {
                let bytes = crate::usage::relay(ctx, bytes);
                if bytes.is_empty() {
                    continue;
                }
                ctx.streamed_bytes += bytes.len() as u64;
                batch.push(bytes);
                if batch.len() >= COALESCE_MAX
                    && let Some(out) = batch.take()
                {
                    // Dropping `upstream` on error closes that connection, which is how
                    // the upstream learns the client is gone.
                    session.write_response_body(Some(out), false).await?;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(upstream = %url, error = %e, "upstream failed mid-stream");
                // What arrived before the failure is the client's; ending without the
                // terminating chunk then tells it the body is incomplete (a clean end
                // would pass a truncated answer off as whole).
                if let Some(out) = batch.take() {
                    session.write_response_body(Some(out), false).await?;
                }
                return Err(e);
            }
        }
    }
    if let Some(out) = batch.take() {
        session.write_response_body(Some(out), false).await?;
    }
    Ok(())
}

/// Reads response headers, skipping interim 1xx answers (other than 101).
async fn read_final_header(
    upstream: &mut pingora::protocols::http::client::HttpSession,
) -> pingora::Result<()> {
    loop {
        upstream.read_response_header().await?;
        let interim = upstream.response_header().is_some_and(|h| {
            h.status.is_informational() && h.status != http::StatusCode::SWITCHING_PROTOCOLS
        });
        if !interim {
            return Ok(());
        }
    }
}

async fn send_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: ApiError,
) -> pingora::Result<()> {
    ctx.status = Some(err.status);
    crate::http::send(session, err.into()).await
}
