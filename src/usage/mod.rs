//! Usage metering, per-key and per-user limits, and the gateway-overhead histogram.
//!
//! The gateway calls in at a few points only: [`admit`] right after authentication (before
//! the body is read or any upstream is contacted), [`note_model`] and [`ask_for_usage`] in
//! the model handlers, [`start_body`]/[`relay`]/[`relay_end`] as the forward engine streams
//! the answer, and [`finish`] when it ends. Counts come from the upstream's own reports,
//! read as they stream past ([`scan`]); rows are written through the storage's
//! [`Metadata`] at once, in the background, grouped when several wait ([`Recorder`]).

pub mod scan;
pub mod time;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, register_histogram_vec,
    register_int_counter_vec,
};
use serde_json::{Map, Value};

use crate::auth::Identity;
use crate::http::Reply;
use crate::http::router::Endpoint;
use crate::limits::Applied;
use crate::storage::{Metadata, RateLimits, StorageError};
use crate::store::{UsageCounts, UsageKey};

/// Buckets of the overhead histogram: ragway's own work is micro- to milliseconds; RAG
/// retrieval (embedding the query) can take longer.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

pub static OVERHEAD: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        HistogramOpts::new(
            "ragway_overhead_seconds",
            "Time spent in ragway itself, not waiting for an upstream, by phase (auth, routing, rag)"
        )
        .buckets(OVERHEAD_BUCKETS.to_vec()),
        &["phase"]
    )
    .expect("metric registers once")
});

/// `model` is a model id of the catalog (else `other`), `key` an API key prefix (else
/// `session` or `other`): both sets are capped, see [`Labels`].
pub static USAGE_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_usage_requests_total",
            "Successful model requests, by model and API key prefix"
        ),
        &["model", "key"]
    )
    .expect("metric registers once")
});

pub static USAGE_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_usage_tokens_total",
            "Tokens reported by upstreams, by model, API key prefix and type (prompt, completion)"
        ),
        &["model", "key", "type"]
    )
    .expect("metric registers once")
});

/// Failed usage writes (the rows wait for the next one): a store that keeps failing shows
/// here before [`MAX_PENDING`] rows are dropped.
pub static USAGE_WRITE_FAILURES: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    prometheus::register_int_counter!(
        "ragway_usage_write_failures_total",
        "Usage writes that failed; their rows wait for the next write"
    )
    .expect("metric registers once")
});

pub static RATE_LIMITED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_rate_limited_total",
            "Requests refused by a per-key or per-user limit, by limit type (requests, tokens)"
        ),
        &["type"]
    )
    .expect("metric registers once")
});

/// Limit checks and charges the storage failed to answer: the request was let through
/// unlimited (see [`admit`]).
pub static RATE_LIMIT_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "ragway_rate_limit_store_failures_total",
            "Rate-limit checks (admit) and token charges (charge) the storage failed; admitted requests were let through"
        ),
        &["op"]
    )
    .expect("metric registers once")
});

/// Registers the metrics so they show before the first request.
pub fn init_metrics() {
    LazyLock::force(&OVERHEAD);
    LazyLock::force(&RATE_LIMIT_FAILURES);
    LazyLock::force(&USAGE_REQUESTS);
    LazyLock::force(&USAGE_TOKENS);
    LazyLock::force(&RATE_LIMITED);
    LazyLock::force(&USAGE_WRITE_FAILURES);
}

/// The phases [`overhead`] is called with, each series looked up once (two of them are
/// observed on every request).
const PHASES: [&str; 3] = ["auth", "routing", "rag"];
static PHASE_SERIES: LazyLock<[prometheus::Histogram; 3]> =
    LazyLock::new(|| PHASES.map(|p| OVERHEAD.with_label_values(&[p])));

/// Records time spent in one phase of ragway's own work.
pub fn overhead(phase: &'static str, d: Duration) {
    match PHASES.iter().position(|p| *p == phase) {
        Some(i) => PHASE_SERIES[i].observe(d.as_secs_f64()),
        None => OVERHEAD
            .with_label_values(&[phase])
            .observe(d.as_secs_f64()),
    }
}

/// Distinct label values admitted to a metric; past the cap every new value is `other`.
struct Labels {
    cap: usize,
    seen: Mutex<HashSet<String, Fold>>,
}

/// The hasher of the maps a request looks into: their keys are catalog model ids, key
/// prefixes and user ids, not free text, and SipHash over three strings was ~1 % of a
/// forwarded request's instructions. foldhash is seeded per process.
type Fold = foldhash::fast::RandomState;

impl Labels {
    fn new(cap: usize) -> Labels {
        Labels {
            cap,
            seen: Mutex::new(HashSet::default()),
        }
    }

    /// `v` itself when admitted, else `other`; allocates only when `v` is first seen.
    fn get<'a>(&self, v: &'a str) -> &'a str {
        let mut seen = self.seen.lock().expect("labels poisoned");
        if seen.contains(v) {
            return v;
        }
        if seen.len() < self.cap {
            seen.insert(v.to_string());
            return v;
        }
        "other"
    }
}

/// The usage series of one model and key prefix, as a request carried them.
struct PairSeries {
    /// The labels the pair got (capped: `other` past the caps).
    model: String,
    key: String,
    requests: IntCounter,
    /// Filled at the first count of that type, so a pair that never reports one shows none.
    prompt: OnceLock<IntCounter>,
    completion: OnceLock<IntCounter>,
}

/// Usage series by model and key prefix, looked up once per pair: a request then finds its
/// counters with one lock and two look-ups, instead of capping two labels (a lock and a hash
/// each) and three label look-ups in the metric vectors. Past [`SERIES_KEPT`] pairs new ones
/// are looked up per request, capped the same way.
struct UsageSeries {
    models: Labels,
    keys: Labels,
    kept: Mutex<(usize, ByModel)>,
}

/// Kept series by model, then key prefix (looked up by `&str`, without building a pair).
type ByModel = HashMap<String, HashMap<String, PairSeries, Fold>, Fold>;

/// Pairs whose series are kept (each a few hundred bytes).
const SERIES_KEPT: usize = 4096;

impl UsageSeries {
    fn new() -> UsageSeries {
        UsageSeries {
            models: Labels::new(MODEL_LABELS),
            keys: Labels::new(KEY_LABELS),
            kept: Mutex::new((0, HashMap::default())),
        }
    }

    fn series(&self, model: &str, key_prefix: &str) -> PairSeries {
        let model_label = self.models.get(model);
        let key_label = if key_prefix.is_empty() {
            "session"
        } else {
            self.keys.get(key_prefix)
        };
        PairSeries {
            requests: USAGE_REQUESTS.with_label_values(&[model_label, key_label]),
            model: model_label.to_string(),
            key: key_label.to_string(),
            prompt: OnceLock::new(),
            completion: OnceLock::new(),
        }
    }

    /// Counts one successful request of `model` by `key_prefix` and its tokens.
    fn count(&self, model: &str, key_prefix: &str, counts: crate::usage::scan::Counts) {
        let mut kept = self.kept.lock().expect("usage series poisoned");
        let (len, map) = &mut *kept;
        let found = map.get(model).and_then(|m| m.get(key_prefix));
        let fresh;
        let s = match found {
            Some(s) => s,
            None if *len < SERIES_KEPT => {
                *len += 1;
                map.entry(model.to_string())
                    .or_default()
                    .entry(key_prefix.to_string())
                    .or_insert_with(|| self.series(model, key_prefix))
            }
            None => {
                fresh = self.series(model, key_prefix);
                &fresh
            }
        };
        s.requests.inc();
        for (cell, kind, n) in [
            (&s.prompt, "prompt", counts.prompt),
            (&s.completion, "completion", counts.completion),
        ] {
            if n > 0 {
                cell.get_or_init(|| USAGE_TOKENS.with_label_values(&[&s.model, &s.key, kind]))
                    .inc_by(n);
            }
        }
    }
}

/// Distinct models and keys labelled in the usage metrics.
const MODEL_LABELS: usize = 256;
const KEY_LABELS: usize = 1024;
/// Usage rows waiting for the store at most; beyond (a store failing for long) new rows are
/// dropped and logged rather than held without bound.
const MAX_PENDING: usize = 100_000;

pub use crate::config::LimitsConfig;

/// Limits and metering, shared by all requests.
pub struct Usage {
    pub config: LimitsConfig,
    /// The buckets, wherever the storage keeps them (replicas on one database share them).
    pub limiter: Arc<dyn RateLimits>,
    pub recorder: Arc<Recorder>,
    series: UsageSeries,
}

impl Usage {
    #[must_use]
    pub fn new(
        config: LimitsConfig,
        meta: Arc<dyn Metadata>,
        limiter: Arc<dyn RateLimits>,
    ) -> Usage {
        init_metrics();
        let retention_hours = (config.retention.as_secs() / 3600).max(1);
        Usage {
            limiter,
            recorder: Arc::new(Recorder {
                meta,
                pending: Mutex::new(HashMap::default()),
                flushing: AtomicBool::new(false),
                write: tokio::sync::Mutex::new(()),
                jobs: Arc::new(AtomicUsize::new(0)),
                writes: AtomicUsize::new(0),
                retention_hours,
            }),
            config,
            series: UsageSeries::new(),
        }
    }
}

/// Per-request metering state (in the request context).
#[derive(Default)]
pub struct Tracking {
    meter: Option<Meter>,
    /// Time spent retrieving RAG context, excluded from the routing phase.
    pub rag: Duration,
}

struct Meter {
    applied: Applied,
    key_prefix: String,
    model: Option<String>,
    /// ragway asked for a usage chunk the client did not: drop it from the answer.
    strip: bool,
    scanner: Option<scan::Scanner>,
}

/// Routes whose answers are model work: limited and metered.
#[must_use]
pub fn metered(endpoint: Endpoint) -> bool {
    matches!(
        endpoint,
        Endpoint::ChatCompletions
            | Endpoint::OllamaGenerate
            | Endpoint::OllamaChat
            | Endpoint::OllamaEmbed
            | Endpoint::OllamaEmbeddings
            | Endpoint::OllamaV1Completions
            | Endpoint::OllamaV1ChatCompletions
            | Endpoint::OllamaV1Messages
            | Endpoint::OllamaV1Responses
    )
}

/// What metering needs of a request. The gateway's per-request context implements it, so
/// metering depends on no layer above it.
pub trait Metered {
    fn identity(&self) -> Option<&Identity>;
    /// Status of the answer, once known.
    fn status(&self) -> Option<u16>;
    fn tracking(&self) -> &Tracking;
    fn tracking_mut(&mut self) -> &mut Tracking;
}

/// Checks the caller's limits for a model route and starts metering it. `Some` is the 429
/// to answer instead.
///
/// A storage that cannot answer (its database unreachable) lets the request through, counted
/// in `ragway_rate_limit_store_failures_total` and logged: limits share model capacity
/// fairly among callers already authenticated, they guard no data, so a database blip should
/// not become an outage of every limited key; the failure shows in the metric, where an
/// alert can catch it before anyone runs far past a limit.
pub async fn admit(usage: &Usage, ctx: &mut impl Metered, endpoint: Endpoint) -> Option<Reply> {
    if !metered(endpoint) {
        return None;
    }
    let id = ctx.identity()?;
    let cfg = &usage.config;
    let key = id
        .key
        .as_ref()
        .map(|k| k.limits.or(cfg.key))
        .filter(|l| !l.is_empty());
    let user = Some(id.user.limits.or(cfg.user)).filter(|l| !l.is_empty());
    let applied = Applied {
        user_id: id.user.id.clone(),
        key,
        user,
    };
    let key_prefix = id
        .key
        .as_ref()
        .map(|k| k.prefix.clone())
        .unwrap_or_default();
    let has_key = id.key.is_some();
    let answer = if applied.is_empty() {
        Ok(Ok(()))
    } else {
        usage.limiter.admit(&applied).await
    };
    if let Err(e) = &answer {
        store_failed("admit", e);
    }
    if let Ok(Err(refused)) = answer {
        let kind = if refused.kind_tokens {
            "tokens"
        } else {
            "requests"
        };
        RATE_LIMITED.with_label_values(&[kind]).inc();
        tracing::debug!(user = %applied.user_id, kind, "request over a limit");
        return Some(refused.reply(has_key.then_some(key_prefix.as_str())));
    }
    ctx.tracking_mut().meter = Some(Meter {
        applied,
        key_prefix,
        model: None,
        strip: false,
        scanner: None,
    });
    None
}

/// The model a metered request uses (its public id).
pub fn note_model(ctx: &mut impl Metered, model: &str) {
    if let Some(m) = ctx.tracking_mut().meter.as_mut() {
        m.model = Some(model.to_string());
    }
}

/// For an OpenAI-style streaming request: asks the upstream for the final usage chunk when
/// the client did not (`stream_options.include_usage`), and remembers to drop that chunk
/// from the answer. Returns whether the body changed.
pub fn ask_for_usage(ctx: &mut impl Metered, body: &mut Map<String, Value>) -> bool {
    let Some(m) = ctx.tracking_mut().meter.as_mut() else {
        return false;
    };
    if body.get("stream") != Some(&Value::Bool(true)) {
        return false;
    }
    let opts = body
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if !opts.is_object() {
        *opts = Value::Object(Map::new());
    }
    let opts = opts.as_object_mut().expect("made an object");
    if opts.get("include_usage") == Some(&Value::Bool(true)) {
        return false;
    }
    opts.insert("include_usage".into(), Value::Bool(true));
    m.strip = true;
    true
}

/// The upstream answered: meter a successful answer of a known format.
pub fn start_body(ctx: &mut impl Metered, status: u16, content_type: &str) {
    let Some(m) = ctx.tracking_mut().meter.as_mut() else {
        return;
    };
    if !(200..300).contains(&status) {
        return;
    }
    m.scanner = scan::Format::of(content_type).map(|f| scan::Scanner::new(f, m.strip));
}

/// Whether the answer sent on may differ in length from the upstream's.
pub fn rewrites_body(ctx: &impl Metered) -> bool {
    ctx.tracking()
        .meter
        .as_ref()
        .and_then(|m| m.scanner.as_ref())
        .is_some_and(scan::Scanner::rewrites)
}

/// One chunk of the answer; returns what to send on.
pub fn relay(ctx: &mut impl Metered, chunk: Bytes) -> Bytes {
    match ctx
        .tracking_mut()
        .meter
        .as_mut()
        .and_then(|m| m.scanner.as_mut())
    {
        Some(s) => s.relay(chunk),
        None => chunk,
    }
}

/// The end of the answer; returns what was held back.
pub fn relay_end(ctx: &mut impl Metered) -> Bytes {
    match ctx
        .tracking_mut()
        .meter
        .as_mut()
        .and_then(|m| m.scanner.as_mut())
    {
        Some(s) => s.finish(),
        None => Bytes::new(),
    }
}

/// A whole answer the forward engine buffered anyway (JSON with RAG sources): its end is
/// where the usage is.
pub fn scan_whole(ctx: &mut impl Metered, body: &[u8]) {
    let tail = &body[body.len().saturating_sub(64 * 1024)..];
    let _ = relay(ctx, Bytes::copy_from_slice(tail));
    let _ = relay_end(ctx);
}

/// A rate-limit storage failure: counted, and logged at most once a
/// [`FAILURE_LOG_EVERY`] so an outage does not flood the log with one line per request.
fn store_failed(op: &'static str, e: &StorageError) {
    static LAST_LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    RATE_LIMIT_FAILURES.with_label_values(&[op]).inc();
    let now = crate::store::now_secs();
    let last = LAST_LOGGED.load(Ordering::Relaxed);
    if now >= last + FAILURE_LOG_EVERY.as_secs()
        && LAST_LOGGED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(op, error = %e, "rate limits unavailable: requests pass unlimited until the storage answers (see ragway_rate_limit_store_failures_total)");
    }
}

/// Rate-limit storage failures are logged at most once in this time.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// The request is over: records it (once) when it was a successful model answer, and charges
/// its tokens to the limits that admitted it.
///
/// The charge is awaited here, where the answer ends (before the end of a chunked answer is
/// sent), so the buckets of every replica hold it from then on.
pub async fn finish(usage: &Usage, ctx: &mut impl Metered) {
    let Some(m) = ctx.tracking_mut().meter.take() else {
        return;
    };
    let (Some(model), Some(status)) = (m.model, ctx.status()) else {
        return;
    };
    if !(200..300).contains(&status) {
        return;
    }
    let counts = m.scanner.map(|s| s.counts()).unwrap_or_default();
    let tokens = counts.prompt.saturating_add(counts.completion);
    if tokens > 0
        && m.applied.limits_tokens()
        && let Err(e) = usage.limiter.charge(&m.applied, tokens).await
    {
        store_failed("charge", &e);
    }
    usage.series.count(&model, &m.key_prefix, counts);
    let key = UsageKey {
        hour: crate::store::now_secs() / 3600,
        user_id: m.applied.user_id,
        key_prefix: m.key_prefix,
        model,
    };
    usage.recorder.record(
        key,
        UsageCounts {
            requests: 1,
            prompt_tokens: counts.prompt,
            completion_tokens: counts.completion,
        },
    );
}

/// Usage totals by (user id, key prefix, model).
pub type Totals = BTreeMap<(String, String, String), UsageCounts>;

/// Rows read from the store at once by [`Recorder::totals`].
const SCAN_PAGE: usize = 10_000;

impl Recorder {
    /// Sums the stored rows of `[from_hour, to_hour)` that `keep` accepts by (user, key
    /// prefix, model), at most `max_groups` groups; `true` when more would have matched.
    ///
    /// Rows are read a page at a time in key order (hour first). A full page ends inside
    /// an hour, so its last hour is read again with the next page; an hour with more rows
    /// than a page holds is summed from its first page and reported truncated.
    ///
    /// # Errors
    /// The store failed.
    pub async fn totals(
        &self,
        from_hour: u64,
        to_hour: u64,
        keep: impl Fn(&UsageKey) -> bool,
        max_groups: usize,
    ) -> Result<(Totals, bool), StorageError> {
        let mut groups = Totals::new();
        let mut from = from_hour;
        loop {
            let rows = self.meta.scan_usage(from, to_hour, SCAN_PAGE).await?;
            let full = rows.len() == SCAN_PAGE;
            let last_hour = rows.last().map_or(from, |(k, _)| k.hour);
            // A full page of one hour cannot make progress: sum it and say so.
            let one_hour = full && rows.first().is_some_and(|(k, _)| k.hour == last_hour);
            for (k, c) in rows {
                if full && !one_hour && k.hour == last_hour {
                    break;
                }
                if !keep(&k) {
                    continue;
                }
                let g = (k.user_id, k.key_prefix, k.model);
                if !groups.contains_key(&g) && groups.len() >= max_groups {
                    return Ok((groups, true));
                }
                groups.entry(g).or_default().add(c);
            }
            if !full || one_hour {
                return Ok((groups, one_hour));
            }
            from = last_hour;
        }
    }
}

/// How long a usage row waits for others before they are written together. Readers of the
/// usage (the API, the hand-over at an upgrade, shutdown) write what is waiting first, so
/// this only bounds what a crash can lose.
const FLUSH_DELAY: Duration = Duration::from_millis(250);

/// Writes usage rows to the store shortly after they come, in the background, one durable
/// transaction for all the rows waiting.
pub struct Recorder {
    meta: Arc<dyn Metadata>,
    pending: Mutex<HashMap<UsageKey, UsageCounts, Fold>>,
    /// A background write is scheduled or running.
    flushing: AtomicBool,
    /// Held while writing, so a reader that flushes sees every earlier row committed.
    write: tokio::sync::Mutex<()>,
    /// Background writes that still hold the recorder (and so the store).
    jobs: Arc<AtomicUsize>,
    /// Writes to the store so far (tests of the spacing).
    writes: AtomicUsize,
    retention_hours: u64,
}

/// A background write's hold on the recorder. Released (run or not: a runtime shutting down
/// drops queued jobs) before it stops counting, so once none counts, nothing but the owner
/// holds the store and it can be reopened at once.
struct FlushJob {
    recorder: Option<Arc<Recorder>>,
    jobs: Arc<AtomicUsize>,
}

impl FlushJob {
    fn new(r: &Arc<Recorder>) -> FlushJob {
        r.jobs.fetch_add(1, Ordering::AcqRel);
        FlushJob {
            recorder: Some(r.clone()),
            jobs: r.jobs.clone(),
        }
    }

    fn recorder(&self) -> &Recorder {
        self.arc()
    }

    fn arc(&self) -> &Arc<Recorder> {
        self.recorder.as_ref().expect("held until dropped")
    }
}

impl Drop for FlushJob {
    fn drop(&mut self) {
        self.recorder.take();
        self.jobs.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Recorder {
    fn record(self: &Arc<Self>, key: UsageKey, counts: UsageCounts) {
        {
            let mut p = self.pending.lock().expect("usage poisoned");
            let full = p.len() >= MAX_PENDING;
            match p.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut row) => row.get_mut().add(counts),
                std::collections::hash_map::Entry::Vacant(_) if full => {
                    tracing::error!("usage rows are not reaching the store; dropping one");
                    return;
                }
                std::collections::hash_map::Entry::Vacant(row) => {
                    row.insert(UsageCounts::default()).add(counts);
                }
            }
        }
        if self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(h) = tokio::runtime::Handle::try_current() else {
            // No runtime (command-line tools): a backend that answers at once is written to
            // now; another keeps the rows for the next flush.
            if self.flush().now_or_never().is_none() {
                tracing::warn!("usage rows wait: the store cannot be written without a runtime");
            }
            self.flushing.store(false, Ordering::Release);
            return;
        };
        self.schedule(&h);
    }

    /// Writes what waits after [`FLUSH_DELAY`], and again after each delay for as long as
    /// rows keep coming. Rows of the requests that end meanwhile join a write: a durable
    /// commit per request or two (what an immediate write came to under load) cost more than
    /// the requests themselves, and so did commits back to back under steady traffic. The
    /// write runs on a blocking thread: the embedded store commits synchronously, and must not
    /// hold up a worker.
    fn schedule(self: &Arc<Self>, h: &tokio::runtime::Handle) {
        let job = FlushJob::new(self);
        let handle = h.clone();
        h.spawn(async move {
            tokio::time::sleep(FLUSH_DELAY).await;
            drop(tokio::task::spawn_blocking(move || {
                let me = job.recorder();
                handle.block_on(me.flush());
                me.flushing.store(false, Ordering::Release);
                // Rows that came during the write (or after the last take but before the
                // flag cleared) wait for the next delay, unless a new request scheduled it.
                let more = !me.pending.lock().expect("usage poisoned").is_empty();
                if more && !me.flushing.swap(true, Ordering::AcqRel) {
                    // Scheduled before `job` drops, so the count of jobs never reads zero
                    // while a write is still due.
                    job.arc().schedule(&handle);
                }
            }));
        });
    }

    /// Writes every waiting row now. On a store failure the rows go back to wait (logged,
    /// and retried with the next write).
    ///
    /// # Panics
    /// A thread panicked while holding the waiting rows.
    pub async fn flush(&self) {
        let _w = self.write.lock().await;
        self.writes.fetch_add(1, Ordering::Relaxed);
        let rows: Vec<(UsageKey, UsageCounts)> =
            std::mem::take(&mut *self.pending.lock().expect("usage poisoned"))
                .into_iter()
                .collect();
        // Called with no rows too: a backend may hold rows a previous process handed over
        // (an upgrade), merged by this write before a reader reads.
        let keep_from = (crate::store::now_secs() / 3600).saturating_sub(self.retention_hours);
        if let Err(e) = self.meta.add_usage(&rows, keep_from).await {
            tracing::error!(error = %e, rows = rows.len(), "cannot write usage rows; keeping them to retry");
            USAGE_WRITE_FAILURES.inc();
            let mut p = self.pending.lock().expect("usage poisoned");
            for (k, c) in rows {
                if p.len() < MAX_PENDING || p.contains_key(&k) {
                    p.entry(k).or_default().add(c);
                }
            }
        }
    }

    /// Writes what waits without awaiting: the rows are written when the backend answers at
    /// once (the embedded one does), otherwise logged as lost. For drops, where nothing can
    /// be awaited; a server awaits [`Recorder::flush`] before it stops.
    fn flush_now(&self) {
        if self.pending() == 0 {
            return;
        }
        if self.flush().now_or_never().is_none() {
            tracing::error!(
                rows = self.pending(),
                "usage rows not written at exit: the store did not answer at once"
            );
        }
    }

    /// Rows waiting to be written (tests of the bound).
    pub fn pending(&self) -> usize {
        self.pending.lock().expect("usage poisoned").len()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush_now();
    }
}

impl Drop for Usage {
    /// Waits (bounded) for background writes, then writes what is left: a gateway that
    /// stops loses no acknowledged row, and its store can be reopened at once.
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.recorder.jobs.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.recorder.flush_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> Arc<dyn RateLimits> {
        Arc::new(crate::limits::Limiter::new(10))
    }

    /// A rate-limit storage that cannot answer (a database down).
    struct Down;

    #[async_trait::async_trait]
    impl RateLimits for Down {
        async fn admit(
            &self,
            _: &Applied,
        ) -> Result<Result<(), crate::limits::Refused>, StorageError> {
            Err(StorageError::Postgres("connection refused".into()))
        }
        async fn charge(&self, _: &Applied, _: u64) -> Result<(), StorageError> {
            Err(StorageError::Postgres("connection refused".into()))
        }
        fn len(&self) -> usize {
            0
        }
    }

    #[derive(Default)]
    struct Ctx {
        identity: Option<Identity>,
        status: Option<u16>,
        tracking: Tracking,
    }

    impl Metered for Ctx {
        fn identity(&self) -> Option<&Identity> {
            self.identity.as_ref()
        }
        fn status(&self) -> Option<u16> {
            self.status
        }
        fn tracking(&self) -> &Tracking {
            &self.tracking
        }
        fn tracking_mut(&mut self) -> &mut Tracking {
            &mut self.tracking
        }
    }

    fn limited_caller() -> Ctx {
        let mut user =
            crate::store::User::new("a@example.com", "A", crate::store::Role::User, "phc".into());
        "u".clone_into(&mut user.id);
        user.limits = crate::limits::Limits {
            rpm: Some(1),
            tpm: Some(10),
            ..crate::limits::Limits::default()
        };
        Ctx {
            identity: Some(Identity {
                user: std::sync::Arc::new(user),
                credential: crate::auth::Credential::ApiKey,
                allowed_models: None,
                restricted_key: false,
                key: None,
            }),
            ..Ctx::default()
        }
    }

    /// A storage that fails lets limited requests through, counted in the failure metric,
    /// and their charge fails without harm; a working one refuses the second request.
    #[tokio::test]
    async fn limits_fail_open_when_the_storage_fails() {
        let dir = tempfile::tempdir().unwrap();
        let down = Usage::new(LimitsConfig::default(), meta(&dir), Arc::new(Down));
        let admits = RATE_LIMIT_FAILURES.with_label_values(&["admit"]).get();
        let charges = RATE_LIMIT_FAILURES.with_label_values(&["charge"]).get();
        for _ in 0..3 {
            let mut ctx = limited_caller();
            assert!(
                admit(&down, &mut ctx, Endpoint::ChatCompletions)
                    .await
                    .is_none(),
                "admitted"
            );
            assert!(ctx.tracking.meter.is_some(), "metered all the same");
            note_model(&mut ctx, "m");
            start_body(&mut ctx, 200, "application/json");
            let _ = relay(
                &mut ctx,
                Bytes::from_static(br#"{"usage":{"prompt_tokens":5,"completion_tokens":7}}"#),
            );
            let _ = relay_end(&mut ctx);
            ctx.status = Some(200);
            finish(&down, &mut ctx).await;
        }
        assert!(RATE_LIMIT_FAILURES.with_label_values(&["admit"]).get() >= admits + 3);
        assert!(RATE_LIMIT_FAILURES.with_label_values(&["charge"]).get() >= charges + 3);

        let dir = tempfile::tempdir().unwrap();
        let up = Usage::new(LimitsConfig::default(), meta(&dir), limiter());
        let mut ctx = limited_caller();
        assert!(
            admit(&up, &mut ctx, Endpoint::ChatCompletions)
                .await
                .is_none()
        );
        let refusal = admit(&up, &mut limited_caller(), Endpoint::ChatCompletions)
            .await
            .expect("over rpm 1");
        assert_eq!(refusal.status, 429);
    }

    /// The value of the `ragway_usage_tokens_total` series with these labels, if it exists.
    fn tokens(model: &str, key: &str, kind: &str) -> Option<u64> {
        use prometheus::core::Collector;
        let families = USAGE_TOKENS.collect();
        families[0].get_metric().iter().find_map(|m| {
            let labels: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            let wanted = [("key", key), ("model", model), ("type", kind)];
            wanted
                .iter()
                .all(|w| labels.contains(w))
                .then(|| m.get_counter().get_value() as u64)
        })
    }

    #[test]
    fn kept_usage_series_count_under_the_capped_labels() {
        let s = UsageSeries {
            models: Labels::new(1),
            keys: Labels::new(1),
            kept: Mutex::new((0, HashMap::default())),
        };
        let n = |prompt, completion| crate::usage::scan::Counts { prompt, completion };
        for _ in 0..3 {
            s.count("series-m1", "series-k1", n(5, 0));
        }
        s.count("series-m2", "series-k1", n(1, 2));
        s.count("series-m1", "", n(0, 0));
        let requests = |m, k| USAGE_REQUESTS.with_label_values(&[m, k]).get();
        assert_eq!(requests("series-m1", "series-k1"), 3);
        // Past the model cap: `other`, with the key's own label.
        assert_eq!(requests("other", "series-k1"), 1);
        assert_eq!(requests("series-m1", "session"), 1);
        assert_eq!(tokens("series-m1", "series-k1", "prompt"), Some(15));
        assert_eq!(tokens("other", "series-k1", "completion"), Some(2));
        // A type never reported has no series, as before the series were kept.
        assert_eq!(tokens("series-m1", "series-k1", "completion"), None);
        assert_eq!(tokens("series-m1", "session", "prompt"), None);

        // The pairs kept are bounded; past the bound a pair is still counted.
        for i in 0..SERIES_KEPT + 10 {
            s.count(&format!("series-cap-{i}"), "series-cap-key", n(0, 0));
        }
        let kept = s.kept.lock().unwrap();
        assert_eq!(kept.0, SERIES_KEPT);
        let pairs: usize = kept.1.values().map(HashMap::len).sum();
        assert_eq!(pairs, SERIES_KEPT);
        drop(kept);
        // Both caps are full (one model, one key each): every new pair counts as other/other.
        assert_eq!(requests("other", "other"), (SERIES_KEPT + 10) as u64);
    }

    #[test]
    fn metric_labels_are_capped() {
        let l = Labels::new(2);
        assert_eq!(l.get("a"), "a");
        assert_eq!(l.get("b"), "b");
        assert_eq!(l.get("c"), "other");
        assert_eq!(l.get("a"), "a", "admitted values stay");
        assert_eq!(l.seen.lock().unwrap().len(), 2);
    }

    fn config(toml: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let file: crate::config::file::FileConfig = toml::from_str(toml).unwrap();
        crate::config::build(
            file,
            &HashMap::<String, String>::new(),
            &crate::config::Overrides::default(),
        )
    }

    #[test]
    fn limits_configuration() {
        let c =
            config("[limits]\nkey-rpm = 60\nkey-tpm = 0\nuser-tpd = 5\nusage-retention = \"30d\"")
                .unwrap();
        assert_eq!(c.limits.key.rpm, Some(60));
        assert_eq!(c.limits.key.tpm, None, "0 is no limit");
        assert_eq!(c.limits.user.tpd, Some(5));
        assert_eq!(c.limits.retention, Duration::from_hours(30 * 24));
        let d = config("").unwrap();
        assert!(d.limits.key.is_empty() && d.limits.user.is_empty());
        for bad in [
            "[limits]\nkey-rpm = 1000000000001",
            "[limits]\nusage-retention = \"10m\"",
            "[limits]\nmax-tracked = 0",
        ] {
            assert!(config(bad).is_err(), "{bad}");
        }
    }

    fn meta(dir: &tempfile::TempDir) -> Arc<dyn Metadata> {
        let store = Arc::new(crate::store::Store::open(&dir.path().join("t.redb")).unwrap());
        let index = Arc::new(crate::storage::embedded::vectors::VectorStore::new(
            10_000,
            crate::index::GraphKind::Usearch,
            None,
        ));
        crate::storage::embedded::storage(store, index, dir.path().join("uploads"), 10).meta
    }

    fn rows(meta: &Arc<dyn Metadata>) -> Vec<(UsageKey, UsageCounts)> {
        meta.scan_usage(0, u64::MAX / 2, 1000)
            .now_or_never()
            .expect("the embedded store answers at once")
            .unwrap()
    }

    /// A usage row of user `u`, model `m`, this hour.
    fn this_hour() -> UsageKey {
        UsageKey {
            hour: crate::store::now_secs() / 3600,
            user_id: "u".into(),
            key_prefix: String::new(),
            model: "m".into(),
        }
    }

    /// Waits (bounded) until the background writes have taken every waiting row.
    async fn written(usage: &Usage) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while usage.recorder.pending() > 0 || usage.recorder.jobs.load(Ordering::Acquire) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the rows are written without a reader asking"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Inside a runtime, rows wait a moment for each other and are then written together.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_are_written_together_shortly_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = meta(&dir);
        let usage = Usage::new(LimitsConfig::default(), store.clone(), limiter());
        let key = this_hour();
        for _ in 0..3 {
            usage.recorder.record(
                key.clone(),
                UsageCounts {
                    requests: 1,
                    prompt_tokens: 2,
                    completion_tokens: 3,
                },
            );
        }
        assert_eq!(usage.recorder.pending(), 1, "the rows wait, summed");
        written(&usage).await;
        let rows = rows(&store);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1.requests, 3, "one write for the three rows");
    }

    /// Under steady traffic the writes stay [`FLUSH_DELAY`] apart instead of following each
    /// other back to back, and every row still arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn steady_traffic_is_written_once_per_delay() {
        let dir = tempfile::tempdir().unwrap();
        let store = meta(&dir);
        let usage = Usage::new(LimitsConfig::default(), store.clone(), limiter());
        let key = this_hour();
        let one = UsageCounts {
            requests: 1,
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        let start = std::time::Instant::now();
        let mut recorded = 0;
        while start.elapsed() < FLUSH_DELAY * 4 {
            usage.recorder.record(key.clone(), one);
            recorded += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        written(&usage).await;
        let elapsed = start.elapsed();
        let writes = usage.recorder.writes.load(Ordering::Relaxed);
        let most = usize::try_from(elapsed.as_millis() / FLUSH_DELAY.as_millis()).unwrap() + 1;
        assert!(
            (1..=most).contains(&writes),
            "{writes} writes in {elapsed:?} for {recorded} rows"
        );
        assert_eq!(rows(&store)[0].1.requests, recorded, "every row arrives");
    }

    /// Rows recorded without a runtime are written at once; the store sums them.
    #[test]
    fn recorded_rows_reach_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = meta(&dir);
        let usage = Usage::new(LimitsConfig::default(), store.clone(), limiter());
        let key = this_hour();
        for _ in 0..3 {
            usage.recorder.record(
                key.clone(),
                UsageCounts {
                    requests: 1,
                    prompt_tokens: 2,
                    completion_tokens: 3,
                },
            );
        }
        assert_eq!(usage.recorder.pending(), 0);
        drop(usage);
        let rows = rows(&store);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].1,
            UsageCounts {
                requests: 3,
                prompt_tokens: 6,
                completion_tokens: 9
            }
        );
    }

    /// Totals page through the rows: an hour split across pages is summed once, groups are
    /// capped, and filters apply.
    #[tokio::test]
    async fn totals_page_through_hours_and_cap_groups() {
        let dir = tempfile::tempdir().unwrap();
        let store = meta(&dir);
        let usage = Usage::new(LimitsConfig::default(), store.clone(), limiter());
        let one = UsageCounts {
            requests: 1,
            prompt_tokens: 1,
            completion_tokens: 0,
        };
        let now = crate::store::now_secs() / 3600;
        // Two hours of 6,000 rows each: the first page ends inside the second hour.
        let mut rows = Vec::new();
        for hour in [now - 1, now] {
            for i in 0..6_000 {
                rows.push((
                    UsageKey {
                        hour,
                        user_id: format!("u{i:05}"),
                        key_prefix: String::new(),
                        model: "m".into(),
                    },
                    one,
                ));
            }
        }
        store.add_usage(&rows, 0).await.unwrap();
        let (totals, truncated) = usage
            .recorder
            .totals(now - 1, now + 1, |_| true, 100_000)
            .await
            .unwrap();
        assert!(!truncated);
        assert_eq!(totals.len(), 6_000);
        assert!(
            totals.values().all(|c| c.requests == 2),
            "each hour counted once"
        );

        let (totals, truncated) = usage
            .recorder
            .totals(now - 1, now + 1, |k| k.user_id.ends_with('7'), 100_000)
            .await
            .unwrap();
        assert!(!truncated);
        assert_eq!(totals.len(), 600);

        let (totals, truncated) = usage
            .recorder
            .totals(now - 1, now + 1, |_| true, 10)
            .await
            .unwrap();
        assert!(truncated);
        assert_eq!(totals.len(), 10);
    }

    /// An hour with more rows than a page is summed from its first page and said truncated,
    /// never read forever.
    #[tokio::test]
    async fn an_hour_larger_than_a_page_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let store = meta(&dir);
        let usage = Usage::new(LimitsConfig::default(), store.clone(), limiter());
        let hour = crate::store::now_secs() / 3600;
        let rows: Vec<_> = (0..SCAN_PAGE + 5)
            .map(|i| {
                (
                    UsageKey {
                        hour,
                        user_id: format!("u{i:06}"),
                        key_prefix: String::new(),
                        model: "m".into(),
                    },
                    UsageCounts {
                        requests: 1,
                        prompt_tokens: 0,
                        completion_tokens: 0,
                    },
                )
            })
            .collect();
        store.add_usage(&rows, 0).await.unwrap();
        let (totals, truncated) = usage
            .recorder
            .totals(hour, hour + 1, |_| true, usize::MAX)
            .await
            .unwrap();
        assert!(truncated);
        assert_eq!(totals.len(), SCAN_PAGE);
    }
}
