//! The request as it passes from the edge (`proxy`) through the handlers and back: its
//! per-request state (pingora's `CTX`) and what a handler hands the forward engine. Both
//! sides use these types, so they live below both.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;

use crate::auth::Identity;
use crate::http::router::Group;
use crate::metrics;
use crate::upstream::Upstream;
use crate::usage::{Metered, Tracking};

/// A request ready to be forwarded.
pub struct Plan {
    /// Upstreams to try, best first. A second one is tried only when the first could not
    /// be reached and nothing was sent.
    pub candidates: Vec<Arc<Upstream>>,
    pub method: Method,
    /// Path and query on the upstream, base path included.
    pub path: String,
    pub body: Body,
    /// Answer a 2xx upstream response with this body instead (Open WebUI returns `true` for
    /// copy and delete, where Ollama answers an empty body).
    pub replace_success_body: Option<&'static str>,
    /// RAG sources to return with a successful answer: as a first SSE event for streams,
    /// as a top-level `sources` key for JSON.
    pub sources: Option<SourcesReply>,
    /// Context budget: the upstream answers in Ollama's native NDJSON/JSON, converted back
    /// to OpenAI's format (see `proxy::ndjson_sse`).
    pub convert: Option<Convert>,
    /// Headers added to a successful answer (the context budget's report).
    pub headers: Vec<(http::HeaderName, String)>,
}

/// What a forwarded request carries.
pub enum Body {
    /// A body ragway has read (and may have rewritten): sent with its length, and sent again
    /// to a second upstream when the first could not be reached.
    Read(Bytes),
    /// The client's body, streamed to the upstream as it arrives, in the client's framing
    /// (pull and create: nothing in it needs reading, and a create may be large), or none
    /// (the per-connection version).
    Client,
}

impl Plan {
    /// The request as the client sent it, its body streamed through, to `upstream` at
    /// `path`: nothing to rewrite and no answer to reshape.
    #[must_use]
    pub fn pass_through(upstream: Arc<Upstream>, method: Method, path: String) -> Plan {
        Plan {
            candidates: vec![upstream],
            method,
            path,
            body: Body::Client,
            replace_success_body: None,
            sources: None,
            convert: None,
            headers: Vec::new(),
        }
    }
}

/// How sources reach the client.
pub struct SourcesReply {
    /// The first SSE event: a valid `chat.completion.chunk` with no choices and `sources`.
    pub sse_event: Bytes,
    /// The `sources` value for a JSON answer.
    pub json: serde_json::Value,
}

/// How the answer of a converted request is shaped.
#[derive(Debug, Clone)]
pub struct Convert {
    pub stream: bool,
    /// `stream_options.include_usage`: a final usage chunk before `[DONE]`.
    pub include_usage: bool,
}

/// Requests that may still touch the database: from their start until they relay an
/// upstream (or end). A process handing its database over at an upgrade waits for none.
static STORE_PHASE: AtomicI64 = AtomicI64::new(0);

/// How many requests may still touch the database.
pub fn requests_in_store_phase() -> i64 {
    STORE_PHASE.load(Ordering::Acquire)
}

/// Counts the request in [`STORE_PHASE`] until dropped.
struct StorePhase;

impl StorePhase {
    fn new() -> Self {
        STORE_PHASE.fetch_add(1, Ordering::AcqRel);
        StorePhase
    }
}

impl Drop for StorePhase {
    fn drop(&mut self) {
        STORE_PHASE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts the request in the in-flight gauge until it is dropped.
pub struct InFlightRequest;

impl InFlightRequest {
    fn new() -> Self {
        metrics::IN_FLIGHT.inc();
        InFlightRequest
    }
}

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        metrics::IN_FLIGHT.dec();
    }
}

/// Request context (pingora's `CTX`).
pub struct RequestCtx {
    pub start: Instant,
    /// Route family for metrics; `None` for unknown routes.
    pub group: Option<Group>,
    pub identity: Option<Identity>,
    /// Time to the first upstream response byte, for proxied requests.
    pub first_byte: Option<Duration>,
    /// Body bytes relayed from an upstream.
    pub streamed_bytes: u64,
    /// Status of a response written by the forward engine or a local handler.
    pub status: Option<u16>,
    store_phase: Option<StorePhase>,
    /// Limits and usage metering of a model request.
    pub usage: Tracking,
    _in_flight: InFlightRequest,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            start: Instant::now(),
            group: None,
            identity: None,
            first_byte: None,
            streamed_bytes: 0,
            status: None,
            store_phase: Some(StorePhase::new()),
            usage: Tracking::default(),
            _in_flight: InFlightRequest::new(),
        }
    }

    /// The request is past every database access (it relays an upstream or streams a blob).
    pub fn leave_store_phase(&mut self) {
        self.store_phase = None;
    }

    pub fn group_label(&self) -> &'static str {
        self.group.map_or("none", Group::as_str)
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

impl Metered for RequestCtx {
    fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }
    fn status(&self) -> Option<u16> {
        self.status
    }
    fn tracking(&self) -> &Tracking {
        &self.usage
    }
    fn tracking_mut(&mut self) -> &mut Tracking {
        &mut self.usage
    }
}
