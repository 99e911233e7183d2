//! The gateway: what every request goes through.
//!
//! [`serve`] reads each request off the connection and hands it to `request_filter`, which
//! finds the route, authenticates, and hands the request to its handler. A handler either
//! answers locally or forwards through the [`forward`] engine (routing by model, rewriting,
//! or the client's body streamed through as it comes). `fail` and `logging` end every
//! request, errors included.

mod answer;
pub mod batch;
mod conn;
pub mod forward;
mod idle;
pub mod ndjson_sse;
pub mod serve;

use std::sync::Arc;

use pingora::http::RequestHeader;
use pingora::{Error, ErrorType};

use crate::app::App;
use crate::error::ApiError;
use crate::handlers::{self, Outcome};
use crate::http::Session;
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
    ) -> pingora::Result<()> {
        ctx.status = Some(e.status);
        crate::http::send(session, e.into()).await
    }

    /// Routes, authenticates and runs the handler. `Ok`: a response was written (a local
    /// answer or a forwarded one). `Err`: the connection cannot carry another request; a
    /// response may or may not have been started ([`Gateway::fail`] answers if not).
    pub async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        crate::heap::note_request();
        // While an answer streams, the client connection is watched for a hang-up. A keep-alive
        // client that already has its whole answer may send its next request before the
        // upstream's end arrives; without pipelining pingora reads a byte of it, calls it an
        // error and drops the connection (the client sees "connection closed before message
        // completed"). With it, those bytes are kept for the next request.
        session.set_pipelining_enabled(true);
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
                return crate::http::send(session, reply).await;
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
            return crate::http::send(session, refusal).await;
        }
        let handler_started = std::time::Instant::now();
        let req = handlers::Req {
            route,
            url_idx,
            tail,
            params,
        };
        let outcome = handlers::handle(&self.app, session, ctx, &req).await;
        if matches!(outcome, Ok(Outcome::Forward(_))) {
            // Routing: the handler's own work before the upstream is contacted (body read
            // and parse, model resolution, rewriting), RAG retrieval excluded.
            let routing = handler_started.elapsed().saturating_sub(ctx.usage.rag);
            crate::usage::overhead("routing", routing);
        }
        match outcome {
            Ok(Outcome::Reply(reply)) => {
                ctx.status = Some(reply.status);
                crate::http::send(session, reply).await
            }
            Ok(Outcome::Forward(plan)) => {
                ctx.leave_store_phase();
                forward::forward(&self.app, session, ctx, plan).await
            }
            Ok(Outcome::Stream(streamer)) => {
                // A status stream reads the database again; during an upgrade it ends and
                // the client reconnects to the new process.
                ctx.leave_store_phase();
                ctx.status = Some(streamer.write(&self.app, session).await?);
                Ok(())
            }
            Err(e) => self.answer_error(session, ctx, e).await,
        }
    }

    /// Answers a request that ended in a pingora-level failure (connect refused, timeouts, a
    /// malformed body) with a JSON error, unless a response had already begun. The
    /// connection is never reused after one: what is left of the request on it is unknown.
    pub async fn fail(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) {
        let api = match e.etype() {
            ErrorType::HTTPStatus(code) => ApiError::new(*code, "Request failed"),
            _ => match e.esource() {
                pingora::ErrorSource::Upstream => forward::upstream_failure(e),
                pingora::ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        return;
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
    }

    /// Metrics and the access log, for every request, errors included. Never logs
    /// credentials: only method, path (no query), status, user id and timings.
    pub async fn logging(&self, session: &Session, e: Option<&Error>, ctx: &mut RequestCtx) {
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
        metrics::request_done(
            ctx.group,
            &session.req_header().method,
            status,
            elapsed,
            ctx.first_byte,
            ctx.streamed_bytes,
        );
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
