//! Per-request state carried through the proxy phases.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::Identity;
use crate::http::router::Group;
use crate::metrics;
use crate::upstream::{InFlight, Upstream};

/// Where the pingora proxy path sends a request that needs no body inspection.
pub struct ProxyTarget {
    pub upstream: Arc<Upstream>,
    /// Path and query on the upstream (base path included).
    pub path: String,
    /// Held for the life of the request.
    pub _in_flight: InFlight,
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
    pub proxy: Option<ProxyTarget>,
    /// Time to the first upstream response byte, for proxied requests.
    pub first_byte: Option<Duration>,
    /// Body bytes relayed from an upstream.
    pub streamed_bytes: u64,
    /// Status of a response written by the forward engine or a local handler.
    pub status: Option<u16>,
    /// Limits and usage metering of a model request.
    pub usage: crate::usage::Tracking,
    _in_flight: InFlightRequest,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            start: Instant::now(),
            group: None,
            identity: None,
            proxy: None,
            first_byte: None,
            streamed_bytes: 0,
            status: None,
            usage: crate::usage::Tracking::default(),
            _in_flight: InFlightRequest::new(),
        }
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
