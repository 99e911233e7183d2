//! Every Prometheus metric, registered once in the default registry and served on the
//! dedicated metrics listener. Requests are counted in the proxy's `logging` phase, so
//! error paths are counted too.
//!
//! Label rules: `group` is the route family (system, auth, models, chat, ollama, none),
//! never a raw path, so cardinality stays bounded; `upstream` is the configured base URL.

use std::sync::LazyLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    register_histogram_vec, register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
};

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

pub fn auth_failure(reason: &str) {
    AUTH_FAILURES.with_label_values(&[reason]).inc();
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
}
