//! The gateway: the one `ProxyHttp` implementation.
//!
//! Every request enters `request_filter`, which finds the route, authenticates, and hands
//! the request to its handler. A handler either answers locally, forwards through the
//! [`forward`] engine (requests whose body ragway reads: model routing, rewriting), or
//! returns a [`crate::request::ProxyTarget`] so that pingora's proxy phases stream the request and
//! response through untouched. The phases below stay thin and only delegate.

pub mod forward;
mod idle;
pub mod ndjson_sse;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};

use crate::app::App;
use crate::error::ApiError;
use crate::handlers::{self, Outcome};
use crate::http::router::{self, Match};
use crate::metrics;
use crate::request::RequestCtx;

/// Largest request head ragway serves (request line and headers). pingora itself accepts
/// up to 1 MiB and 256 headers; no client of this API needs a fraction of that, and every
/// byte of it is copied into each forwarded request.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header lines in a request.
const MAX_HEADERS: usize = 100;
/// Longest request target.
const MAX_URI_BYTES: usize = 8 * 1024;

/// A 414/431 for a request head over ragway's limits.
fn oversized_head(req: &RequestHeader) -> Option<ApiError> {
    let uri = req.uri.to_string().len();
    if uri > MAX_URI_BYTES {
        return Some(ApiError::new(
            414,
            format!("Request URI too long: the limit is {MAX_URI_BYTES} bytes"),
        ));
    }
    if req.headers.len() > MAX_HEADERS {
        return Some(ApiError::new(
            431,
            format!("Too many request headers: the limit is {MAX_HEADERS}"),
        ));
    }
    let bytes = uri
        + req
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    (bytes > MAX_HEAD_BYTES).then(|| {
        ApiError::new(
            431,
            format!(
                "Request header fields too large: the limit is {} KiB",
                MAX_HEAD_BYTES / 1024
            ),
        )
    })
}

/// The gateway service.
pub struct Gateway {
    pub app: Arc<App>,
}

impl Gateway {
    async fn answer_error(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        e: ApiError,
    ) -> pingora::Result<bool> {
        ctx.status = Some(e.status);
        crate::http::send(session, e.into()).await?;
        // A response was sent: stop here.
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    /// No downstream modules. pingora's default adds its response compression at level 0
    /// (off), which still builds a module context per request and runs its filters on every
    /// response header and body write; ragway never compresses (token streams must leave
    /// unbuffered), so that is pure cost on every chunk.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// Routes, authenticates and runs the handler. `Ok(true)`: a response was written
    /// (local answer or forwarded stream). `Ok(false)`: `ctx.proxy` is set and pingora
    /// proxies the request.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        crate::heap::note_request();
        // While an answer streams, the client connection is watched for a hang-up. A keep-alive
        // client that already has its whole answer may send its next request before the
        // upstream's end arrives; without pipelining pingora reads a byte of it, calls it an
        // error and drops the connection (the client sees "connection closed before message
        // completed"). With it, those bytes are kept for the next request.
        session.downstream_session.set_pipelining_enabled(true);
        if self
            .app
            .handing_over
            .load(std::sync::atomic::Ordering::Acquire)
        {
            session.set_keepalive(None);
        }
        if let Some(e) = oversized_head(session.req_header()) {
            // The body was not read: do not try to find the next request after it.
            session.set_keepalive(None);
            return self.answer_error(session, ctx, e).await;
        }
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let (route, url_idx, tail, params) = match router::find(&method, &path) {
            Match::Found {
                route,
                url_idx,
                tail,
                params,
            } => (route, url_idx, tail, params),
            Match::MethodNotAllowed(allowed) => {
                let e = ApiError::new(
                    405,
                    format!("Method {method} not allowed; use {}", allowed.join(", ")),
                );
                ctx.status = Some(405);
                let reply = crate::http::Reply::from(e)
                    .with_header(http::header::ALLOW, allowed.join(", "));
                crate::http::send(session, reply).await?;
                return Ok(true);
            }
            Match::NotFound => {
                return self
                    .answer_error(session, ctx, ApiError::not_found("Not Found"))
                    .await;
            }
        };
        ctx.group = Some(route.group);
        // Before authentication: a forged write is refused without any store work.
        {
            let headers = &session.req_header().headers;
            let cookie_credential = self
                .app
                .auth
                .credential_source(headers)
                .and_then(|(cred, from_cookie)| from_cookie.then_some(cred));
            if let Err(e) = self.app.auth.csrf.check(
                &method,
                headers,
                cookie_credential,
                route.access == router::Access::Public,
            ) {
                return self.answer_error(session, ctx, e).await;
            }
        }
        let auth_started = std::time::Instant::now();
        let checked = self
            .app
            .auth
            .check(&session.req_header().headers, route.access)
            .await
            .map_err(ApiError::from);
        crate::usage::overhead("auth", auth_started.elapsed());
        match checked {
            Ok(identity) => ctx.identity = identity,
            Err(e) => return self.answer_error(session, ctx, e).await,
        }
        // Limits are checked before the body is read or any upstream is contacted.
        if let Some(refusal) = crate::usage::admit(&self.app.usage, ctx, route.endpoint).await {
            ctx.status = Some(refusal.status);
            crate::http::send(session, refusal).await?;
            return Ok(true);
        }
        let handler_started = std::time::Instant::now();
        let req = handlers::Req {
            route,
            url_idx,
            tail,
            params,
        };
        let outcome = handlers::handle(&self.app, session, ctx, &req).await;
        if matches!(outcome, Ok(Outcome::Forward(_) | Outcome::Proxy(_))) {
            // Routing: the handler's own work before the upstream is contacted (body read
            // and parse, model resolution, rewriting), RAG retrieval excluded.
            let routing = handler_started.elapsed().saturating_sub(ctx.usage.rag);
            crate::usage::overhead("routing", routing);
        }
        match outcome {
            Ok(Outcome::Reply(reply)) => {
                ctx.status = Some(reply.status);
                crate::http::send(session, reply).await?;
                Ok(true)
            }
            Ok(Outcome::Forward(plan)) => {
                ctx.leave_store_phase();
                forward::forward(&self.app, session, ctx, plan).await?;
                Ok(true)
            }
            Ok(Outcome::Stream(streamer)) => {
                // A status stream reads the database again; during an upgrade it ends and
                // the client reconnects to the new process.
                ctx.leave_store_phase();
                ctx.status = Some(streamer.write(&self.app, session).await?);
                Ok(true)
            }
            Ok(Outcome::Proxy(target)) => {
                ctx.leave_store_phase();
                ctx.proxy = Some(target);
                Ok(false)
            }
            Err(e) => self.answer_error(session, ctx, e).await,
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let Some(target) = &ctx.proxy else {
            return Error::e_explain(ErrorType::InternalError, "no proxy target for this request");
        };
        let peer = target
            .upstream
            .peer(
                self.app.config.connect_timeout,
                self.app.config.read_idle_timeout,
            )
            .await
            .map_err(|e| Error::explain(ErrorType::ConnectNoRoute, e))?;
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(target) = &ctx.proxy else {
            return Error::e_explain(ErrorType::InternalError, "no proxy target for this request");
        };
        upstream_request.set_uri(
            target
                .path
                .parse()
                .map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream path"))?,
        );
        // Rebuild the headers from the client's, minus credentials and hop-by-hop ones;
        // keep the client's framing so pingora streams the body as it came.
        let framing: Vec<_> = ["content-length", "transfer-encoding"]
            .iter()
            .filter_map(|h| {
                session
                    .req_header()
                    .headers
                    .get(*h)
                    .map(|v| (*h, v.clone()))
            })
            .collect();
        let client = session.req_header().headers.clone();
        for name in client.keys() {
            upstream_request.remove_header(name);
        }
        forward::upstream_headers(
            &client,
            &self.app.config.auth.api_key_header,
            &target.upstream,
            upstream_request,
        )?;
        for (name, value) in framing {
            upstream_request.insert_header(name, value)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if ctx.first_byte.is_none() {
            ctx.first_byte = Some(ctx.start.elapsed());
        }
        ctx.status = Some(upstream_response.status.as_u16());
        if let Some(t) = &ctx.proxy {
            t.upstream.mark_ok();
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<std::time::Duration>> {
        if let Some(b) = body {
            ctx.streamed_bytes += b.len() as u64;
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        if let Some(t) = &ctx.proxy {
            t.upstream.mark_failed();
        }
        e
    }

    /// Writes pingora-level failures (connect refused, timeouts) as JSON errors.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let api = match e.etype() {
            ErrorType::HTTPStatus(code) => ApiError::new(*code, "Request failed"),
            _ => match e.esource() {
                pingora::ErrorSource::Upstream => forward::upstream_failure(e),
                pingora::ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        return FailToProxy {
                            error_code: 0,
                            can_reuse_downstream: false,
                        };
                    }
                    _ => ApiError::bad_request("Malformed request"),
                },
                _ if matches!(
                    e.etype(),
                    ErrorType::ConnectTimedout
                        | ErrorType::ConnectRefused
                        | ErrorType::ConnectNoRoute
                        | ErrorType::ReadTimedout
                ) =>
                {
                    forward::upstream_failure(e)
                }
                _ => ApiError::internal("Internal error"),
            },
        };
        let code = api.status;
        if session.response_written().is_none() {
            ctx.status = Some(code);
            // The connection is closed after this error, so say so.
            session.set_keepalive(None);
            if let Err(err) = crate::http::send(session, api.into()).await {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Metrics and the access log, for every request, errors included. Never logs
    /// credentials: only method, path (no query), status, user id and timings.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // Usage of an answer that did not end normally (the forward engine records the rest).
        crate::usage::finish(&self.app.usage, ctx).await;
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.status)
            .unwrap_or(0);
        let group = ctx.group_label();
        let method = session.req_header().method.as_str();
        let elapsed = ctx.start.elapsed();
        metrics::REQUESTS
            .with_label_values(&[
                group,
                metrics::method_label(&session.req_header().method),
                metrics::status_label(status),
            ])
            .inc();
        metrics::REQUEST_DURATION
            .with_label_values(&[group])
            .observe(elapsed.as_secs_f64());
        if let Some(fb) = ctx.first_byte {
            metrics::FIRST_BYTE
                .with_label_values(&[group])
                .observe(fb.as_secs_f64());
        }
        if ctx.streamed_bytes > 0 {
            metrics::STREAMED_BYTES
                .with_label_values(&[group])
                .inc_by(ctx.streamed_bytes);
        }
        tracing::info!(
            target: "ragway::access",
            method = %method,
            path = %session.req_header().uri.path(),
            status,
            group,
            user = ctx.identity.as_ref().map(|i| i.user.id.as_str()).unwrap_or("-"),
            ms = elapsed.as_secs_f64() * 1000.0,
            first_byte_ms = ctx.first_byte.map(|d| d.as_secs_f64() * 1000.0),
            bytes = ctx.streamed_bytes,
            error = e.map(|e| e.etype().as_str()),
            "request"
        );
    }
}
