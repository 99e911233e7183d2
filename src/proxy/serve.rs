//! The client-facing HTTP/1 server loop: one connection, its requests one after another.
//!
//! Why not pingora-proxy's `HttpProxy`: every ragway route ends in `Gateway::request_filter`
//! (a local answer, or the [`super::forward`] engine), so none of `HttpProxy`'s own phases
//! (cache, modules, retries, its upstream peer selection) ever ran, yet each request paid for
//! them: its per-request futures are several KiB and were moved a handful of times per
//! request, which `callgrind` put at a fifth of the instructions of a forwarded JSON call.
//! This loop keeps what `HttpProxy` did that ragway relies on — keep-alive with pipelined
//! bytes carried over, closing waiting connections when the listener stops, the 400 to an
//! unparsable head, refusing `CONNECT` — on pingora's own HTTP/1 sessions.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::ErrorType;
use pingora::apps::{HttpPersistentSettings, ReusedHttpStream, ServerApp};
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use super::{Gateway, conn};
use crate::error::ApiError;
use crate::http::Session;
use crate::request::RequestCtx;

/// How long a keep-alive connection may sit between requests (pingora's default).
const KEEPALIVE_SECS: u64 = 60;

/// How long a stopped listener's waiting connections may still bring a request: waiting a
/// moment lets a request already on its way be answered (with `Connection: close`) instead of
/// meeting a reset.
pub const CLEANUP_DELAY: Duration = Duration::from_millis(150);

/// The gateway as pingora's listening service runs it.
pub struct Front {
    pub gateway: Gateway,
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut next = Some((conn::rehome(stream), None));
        while let Some((stream, settings)) = next {
            // Boxed: the session is large, and a boxed one is moved as a pointer.
            let session = Box::new(Session::new_http1(stream));
            next = self
                .serve_one(session, settings, shutdown)
                .await
                .map(ReusedHttpStream::consume);
        }
        None
    }
}

impl Front {
    /// Reads one request and answers it; the connection back when it can carry another.
    async fn serve_one(
        &self,
        mut session: Box<Session>,
        settings: Option<HttpPersistentSettings>,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match settings {
            Some(s) => s.apply_to_session(&mut session),
            None if *shutdown.borrow() => session.set_keepalive(None),
            None => session.set_keepalive(Some(KEEPALIVE_SECS)),
        }
        let mut stop = shutdown.clone();
        let read = tokio::select! {
            // A request already buffered is served before a stop is looked at.
            biased;
            r = session.read_request() => r,
            () = async {
                let _ = stop.wait_for(|stopped| *stopped).await;
                tokio::time::sleep(CLEANUP_DELAY).await;
            } => return None,
        };
        match read {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
                    tracing::debug!(error = %e, "unparsable request head");
                    let refusal = head_refusal(&e);
                    let _ = reject_head(&mut session, &refusal).await;
                }
                session.shutdown().await;
                return None;
            }
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        if session.req_header().method == http::Method::CONNECT {
            // A tunnel changes the message framing; no ragway route is one. The connection
            // closes: a client that asked for a tunnel may already be sending tunnel bytes.
            session.set_keepalive(None);
            let refusal = ApiError::new(405, "CONNECT is not supported");
            let _ = crate::http::send(&mut session, refusal.into()).await;
            session.shutdown().await;
            return None;
        }
        let mut ctx = RequestCtx::new();
        let outcome = self.gateway.request_filter(&mut session, &mut ctx).await;
        if let Err(e) = outcome {
            self.gateway.fail(&mut session, &e, &mut ctx).await;
            self.gateway.logging(&session, Some(&e), &mut ctx).await;
            return None;
        }
        self.gateway.logging(&session, None, &mut ctx).await;
        let persistent = HttpPersistentSettings::for_session(&session);
        session
            .finish()
            .await
            .ok()
            .flatten()
            .map(|s| ReusedHttpStream::from_reusable_stream(s, persistent))
    }
}

/// The clear error for a head pingora's parser refused. pingora's own answer is a bare 400
/// with no body; clients and SDKs that read `detail` or `error.message` get one here too, with
/// 431 where the head was only too big (RFC 6585), so a client can tell "trim your cookies"
/// from "your bytes are not HTTP".
fn head_refusal(e: &pingora::Error) -> ApiError {
    let cause = e
        .cause
        .as_deref()
        .and_then(|c| c.downcast_ref::<httparse::Error>());
    if matches!(cause, Some(httparse::Error::TooManyHeaders)) {
        return ApiError::new(431, "Too many request header fields");
    }
    // pingora's only other size refusal; its wording is the one stable mark it leaves.
    if e.context
        .as_ref()
        .is_some_and(|c| c.as_str().starts_with("Request header larger than"))
    {
        return ApiError::new(431, "Request header fields too large");
    }
    let why = match cause {
        Some(c) => format!("Malformed HTTP request: {c}"),
        None => "Malformed HTTP request".to_owned(),
    };
    ApiError::bad_request(why)
}

/// Answers a refused head and closes: its message boundaries are unknown, so nothing after it
/// on this connection can be trusted as a request.
async fn reject_head(session: &mut Session, refusal: &ApiError) -> pingora::Result<()> {
    let body = refusal.body();
    let mut resp = pingora::http::ResponseHeader::build_no_case(refusal.status, Some(3))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(http::header::CONNECTION, "close")?;
    session.write_error_response(resp, body).await
}
