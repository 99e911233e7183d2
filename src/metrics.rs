//! Every Prometheus metric, registered once in the default registry and served on the
//! dedicated metrics listener. Requests are counted in the proxy's `logging` phase, so
//! error paths are counted too.
//!
//! Label rules: every label value comes from a set fixed by the code or the configuration,
//! never from the request, so a client cannot mint new series. `group` is the route family
//! (system, auth, models, chat, ollama, files, knowledge, none), never a raw path; `method` is
//! one of the standard methods or `other` ([`method_label`]); `status` is one of the codes
//! ragway or common upstreams answer, else its class ([`status_label`]); `upstream` is a
//! configured base URL; `reason` is a literal in the code (`&'static str`).

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    register_histogram_vec, register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
};

use crate::http::router::Group;

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_http_requests_total",
            "HTTP requests served, by route group, method and status"
        ),
        &["group", "method", "status"]
    )
    .expect("metric registers once")
});

pub static REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        HistogramOpts::new(
            "ragway_http_request_duration_seconds",
            "Time from request to the end of the response"
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
        &["group"]
    )
    .expect("metric registers once")
});

pub static FIRST_BYTE: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        HistogramOpts::new(
            "ragway_upstream_first_byte_seconds",
            "Time from request to the first upstream response byte, for proxied requests"
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
        &["group"]
    )
    .expect("metric registers once")
});

pub static IN_FLIGHT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "ragway_http_requests_in_flight",
        "Requests being served now"
    )
    .expect("metric registers once")
});

pub static UPSTREAM_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "ragway_upstream_up",
        "1 when the upstream answered its last model-list or connection attempt, else 0",
        &["upstream", "kind"]
    )
    .expect("metric registers once")
});

pub static UPSTREAM_IN_FLIGHT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "ragway_upstream_requests_in_flight",
        "Proxied requests currently open to each upstream",
        &["upstream"]
    )
    .expect("metric registers once")
});

pub static AUTH_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_auth_failures_total",
            "Rejected credentials, by reason"
        ),
        &["reason"]
    )
    .expect("metric registers once")
});

pub static STREAMED_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_streamed_bytes_total",
            "Response body bytes relayed from upstreams to clients"
        ),
        &["group"]
    )
    .expect("metric registers once")
});

pub static MODEL_LIST_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    prometheus::register_histogram!(
        HistogramOpts::new(
            "ragway_model_list_refresh_seconds",
            "Time to refresh the merged model list"
        )
        .buckets(LATENCY_BUCKETS.to_vec())
    )
    .expect("metric registers once")
});

// Context budget (RAG requests fitted into a model's window).
pub static CONTEXT_BUDGET: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_context_budget_requests_total",
            "RAG requests by what the context budget did: fit (all context kept), trimmed \
             (chunks dropped or shortened), refused (too long even without context), \
             unknown_window (no window known: injected as retrieved)"
        ),
        &["outcome"]
    )
    .expect("metric registers once")
});

pub static CONTEXT_CHUNKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_context_budget_chunks_total",
            "Retrieved chunks (or whole documents) of RAG requests: kept, shortened or dropped \
             to fit the model's window"
        ),
        &["action"]
    )
    .expect("metric registers once")
});

pub static CONTEXT_NUM_CTX: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_context_native_requests_total",
            "RAG requests sent to Ollama's /api/chat with a larger num_ctx, by stream mode"
        ),
        &["mode"]
    )
    .expect("metric registers once")
});

// Ingestion (issue 11, ingest on the storage seams).
pub static INGEST_STORAGE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_ingest_storage_errors_total",
            "Storage failures met by background ingestion (no request to answer), by operation"
        ),
        &["op"]
    )
    .expect("metric registers once")
});

/// Counts a storage failure of background ingestion; `op` is a literal of the code.
pub fn ingest_storage_error(op: &'static str) {
    INGEST_STORAGE_ERRORS.with_label_values(&[op]).inc();
}

/// `reason` is a literal: a failure reason must never carry request data into a label.
pub fn auth_failure(reason: &'static str) {
    AUTH_FAILURES.with_label_values(&[reason]).inc();
}

/// The `method` labels: the standard methods, then `other` for any extension token.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];

fn method_index(method: &http::Method) -> usize {
    let m = method.as_str();
    METHODS[..METHODS.len() - 1]
        .iter()
        .position(|k| *k == m)
        .unwrap_or(METHODS.len() - 1)
}

/// The `method` label: a standard method, or `other` for any extension token a client sends.
#[must_use]
pub fn method_label(method: &http::Method) -> &'static str {
    METHODS[method_index(method)]
}

/// Codes that keep their own `status` label: those ragway answers and common upstream ones.
const KNOWN_STATUSES: [u16; 32] = [
    100, 101, 200, 201, 202, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409,
    411, 413, 414, 415, 422, 429, 431, 499, 500, 501, 502, 503, 504,
];

/// The `status` labels: [`KNOWN_STATUSES`] in order, then the classes and `none`.
const STATUSES: [&str; 38] = [
    "100", "101", "200", "201", "202", "204", "206", "301", "302", "304", "307", "308", "400",
    "401", "403", "404", "405", "408", "409", "411", "413", "414", "415", "422", "429", "431",
    "499", "500", "501", "502", "503", "504", "1xx", "2xx", "3xx", "4xx", "5xx", "none",
];

fn status_index(status: u16) -> usize {
    if let Some(i) = KNOWN_STATUSES.iter().position(|k| *k == status) {
        return i;
    }
    let classes = KNOWN_STATUSES.len();
    match status / 100 {
        c @ 1..=5 => classes + usize::from(c) - 1,
        _ => STATUSES.len() - 1,
    }
}

/// The `status` label: codes ragway itself answers and those common upstreams send keep their
/// number; any other code an upstream sends is folded into its class (`2xx` ... `5xx`), and
/// `0` (no response was written: the client left) or an out-of-range code becomes `none`.
#[must_use]
pub fn status_label(status: u16) -> &'static str {
    STATUSES[status_index(status)]
}

/// The `group` labels, indexed like [`Group::index`], then `none` (no route matched).
const GROUP_COUNT: usize = Group::ALL.len() + 1;

fn group_index(group: Option<Group>) -> usize {
    group.map_or(GROUP_COUNT - 1, Group::index)
}

fn group_label(i: usize) -> &'static str {
    Group::ALL.get(i).map_or("none", |g| g.as_str())
}

/// Series looked up once per label combination and then kept, so a request's metrics cost
/// no label hashing: every label comes from a fixed set (above), so each combination has a
/// cell, filled the first time it is used, as `with_label_values` would create it.
struct Cells<T> {
    cells: Box<[OnceLock<T>]>,
}

impl<T> Cells<T> {
    fn new(n: usize) -> Self {
        Cells {
            cells: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }
}

static REQUEST_CELLS: LazyLock<Cells<IntCounter>> =
    LazyLock::new(|| Cells::new(GROUP_COUNT * METHODS.len() * STATUSES.len()));
static DURATION_CELLS: LazyLock<Cells<Histogram>> = LazyLock::new(|| Cells::new(GROUP_COUNT));
static FIRST_BYTE_CELLS: LazyLock<Cells<Histogram>> = LazyLock::new(|| Cells::new(GROUP_COUNT));
static STREAMED_CELLS: LazyLock<Cells<IntCounter>> = LazyLock::new(|| Cells::new(GROUP_COUNT));

/// Counts one finished request: by group, method and status, its duration, its time to the
/// upstream's first byte and the bytes it relayed.
pub fn request_done(
    group: Option<Group>,
    method: &http::Method,
    status: u16,
    elapsed: Duration,
    first_byte: Option<Duration>,
    streamed: u64,
) {
    let g = group_index(group);
    let (m, s) = (method_index(method), status_index(status));
    REQUEST_CELLS.cells[(g * METHODS.len() + m) * STATUSES.len() + s]
        .get_or_init(|| REQUESTS.with_label_values(&[group_label(g), METHODS[m], STATUSES[s]]))
        .inc();
    DURATION_CELLS.cells[g]
        .get_or_init(|| REQUEST_DURATION.with_label_values(&[group_label(g)]))
        .observe(elapsed.as_secs_f64());
    if let Some(fb) = first_byte {
        FIRST_BYTE_CELLS.cells[g]
            .get_or_init(|| FIRST_BYTE.with_label_values(&[group_label(g)]))
            .observe(fb.as_secs_f64());
    }
    if streamed > 0 {
        STREAMED_CELLS.cells[g]
            .get_or_init(|| STREAMED_BYTES.with_label_values(&[group_label(g)]))
            .inc_by(streamed);
    }
}

/// Registers every metric so that `/metrics` lists them before the first request.
pub fn init() {
    LazyLock::force(&REQUESTS);
    LazyLock::force(&REQUEST_DURATION);
    LazyLock::force(&FIRST_BYTE);
    LazyLock::force(&IN_FLIGHT);
    LazyLock::force(&UPSTREAM_UP);
    LazyLock::force(&UPSTREAM_IN_FLIGHT);
    LazyLock::force(&AUTH_FAILURES);
    LazyLock::force(&STREAMED_BYTES);
    LazyLock::force(&MODEL_LIST_DURATION);
    LazyLock::force(&CONTEXT_BUDGET);
    LazyLock::force(&CONTEXT_CHUNKS);
    LazyLock::force(&CONTEXT_NUM_CTX);
    LazyLock::force(&INGEST_STORAGE_ERRORS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_fixed_sets() {
        let mut statuses: Vec<&str> = (0..=u16::MAX).map(status_label).collect();
        statuses.sort_unstable();
        statuses.dedup();
        assert!(statuses.len() < 40, "{statuses:?}");
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(299), "2xx");
        assert_eq!(status_label(0), "none");
        assert_eq!(status_label(999), "none");
        let weird = http::Method::from_bytes(b"X-RANDOM-42").unwrap();
        assert_eq!(method_label(&weird), "other");
        assert_eq!(method_label(&http::Method::PATCH), "PATCH");
        for (i, code) in KNOWN_STATUSES.iter().enumerate() {
            assert_eq!(STATUSES[i], code.to_string());
        }
        assert_eq!(status_label(599), "5xx");
        assert_eq!(status_label(100), "100");
        assert_eq!(status_label(150), "1xx");
    }

    /// The kept series are the ones the labels name: a request lands in the series of its
    /// group, method and status, whichever cell it went through.
    #[test]
    fn kept_series_are_the_labelled_ones() {
        for (i, g) in Group::ALL.iter().enumerate() {
            assert_eq!(g.index(), i, "{g:?}");
            assert_eq!(group_label(i), g.as_str());
        }
        assert_eq!(group_label(GROUP_COUNT - 1), "none");
        let weird = http::Method::from_bytes(b"BREW").unwrap();
        for (group, method, status) in [
            (Some(Group::Knowledge), http::Method::DELETE, 409),
            (None, weird, 418),
            (Some(Group::Usage), http::Method::TRACE, 0),
        ] {
            let label = group.map_or("none", Group::as_str);
            let counter =
                REQUESTS.with_label_values(&[label, method_label(&method), status_label(status)]);
            let duration = REQUEST_DURATION.with_label_values(&[label]);
            let first = FIRST_BYTE.with_label_values(&[label]);
            let streamed = STREAMED_BYTES.with_label_values(&[label]);
            let before = (
                counter.get(),
                duration.get_sample_count(),
                first.get_sample_count(),
                streamed.get(),
            );
            for _ in 0..2 {
                request_done(
                    group,
                    &method,
                    status,
                    Duration::from_millis(3),
                    Some(Duration::from_millis(1)),
                    5,
                );
            }
            request_done(group, &method, status, Duration::ZERO, None, 0);
            assert_eq!(counter.get(), before.0 + 3);
            assert_eq!(duration.get_sample_count(), before.1 + 3);
            assert_eq!(first.get_sample_count(), before.2 + 2);
            assert_eq!(streamed.get(), before.3 + 10);
        }
    }
}
