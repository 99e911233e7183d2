//! The configured upstreams: addresses, health, in-flight counts and the choice of one
//! upstream among those hosting a model.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use pingora::upstreams::peer::HttpPeer;

use crate::config::{Config, UpstreamConfig, UpstreamKind};
use crate::error::ApiError;
use crate::metrics;

/// After a failed connection, an upstream is tried last for this long.
const FAILURE_PENALTY: Duration = Duration::from_secs(10);

/// One upstream server.
pub struct Upstream {
    /// Index within its family (`url_idx`).
    pub idx: usize,
    pub config: UpstreamConfig,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix of the base URL (`""`, or `/v1` for `https://api.example.com/v1`).
    pub base_path: String,
    /// `Host` header value.
    pub authority: String,
    /// Resolved address; re-resolved after a connection failure.
    addr: RwLock<Option<SocketAddr>>,
    /// Requests currently open to this upstream (least-in-flight balancing).
    pub in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last connection failure; 0 = none.
    failed_at_ms: AtomicU64,
    epoch: Instant,
    /// Whether the last model-list fetch or connection attempt succeeded.
    up: AtomicBool,
    /// This upstream's series of `UPSTREAM_IN_FLIGHT` and `UPSTREAM_UP`, looked up once:
    /// every forwarded request moves both, and a label lookup hashes the URL each time.
    in_flight_gauge: prometheus::IntGauge,
    up_gauge: prometheus::IntGauge,
}

/// Decrements the in-flight count when the proxied request ends, however it ends.
pub struct InFlight(Arc<Upstream>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.in_flight_gauge.dec();
    }
}

impl Upstream {
    pub(crate) fn new(idx: usize, config: UpstreamConfig) -> Upstream {
        let uri: http::Uri = config.url.parse().expect("validated by config");
        let tls = uri.scheme_str() == Some("https");
        let host = uri.host().expect("validated by config").to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| host.clone());
        let base_path = uri.path().trim_end_matches('/').to_string();
        let u = Upstream {
            idx,
            tls,
            host,
            port,
            base_path,
            authority,
            addr: RwLock::new(None),
            in_flight: AtomicUsize::new(0),
            failed_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            up: AtomicBool::new(false),
            in_flight_gauge: metrics::UPSTREAM_IN_FLIGHT.with_label_values(&[config.url.as_str()]),
            up_gauge: metrics::UPSTREAM_UP.with_label_values(&[
                config.url.as_str(),
                match config.kind {
                    UpstreamKind::Ollama => "ollama",
                    UpstreamKind::OpenAi => "openai",
                },
            ]),
            config,
        };
        // Unknown until the first model list or connection says otherwise.
        u.set_up(false);
        u
    }

    pub fn kind(&self) -> UpstreamKind {
        self.config.kind
    }

    /// Absolute URL of `path` on this upstream (for reqwest calls).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.config.url, path)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        self.up_gauge.set(i64::from(up));
    }

    pub fn mark_failed(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.failed_at_ms.store(ms.max(1), Ordering::Relaxed);
        *self.addr.write().expect("addr lock") = None;
        self.set_up(false);
    }

    pub fn mark_ok(&self) {
        self.failed_at_ms.store(0, Ordering::Relaxed);
        self.set_up(true);
    }

    pub fn recently_failed(&self) -> bool {
        let at = self.failed_at_ms.load(Ordering::Relaxed);
        at != 0 && self.epoch.elapsed().as_millis() as u64 - at < FAILURE_PENALTY.as_millis() as u64
    }

    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight_gauge.inc();
        InFlight(self.clone())
    }

    /// A pingora peer for this upstream, resolving the host name when needed.
    pub async fn peer(&self, connect: Duration, read_idle: Duration) -> Result<HttpPeer, String> {
        let cached = *self.addr.read().expect("addr lock");
        let addr = match cached {
            Some(a) => a,
            None => {
                let a = tokio::net::lookup_host((self.host.as_str(), self.port))
                    .await
                    .map_err(|e| format!("cannot resolve {}: {e}", self.host))?
                    .next()
                    .ok_or_else(|| format!("{} resolves to no address", self.host))?;
                *self.addr.write().expect("addr lock") = Some(a);
                a
            }
        };
        let mut peer = HttpPeer::new(addr, self.tls, self.host.clone());
        peer.options.connection_timeout = Some(connect);
        peer.options.total_connection_timeout = Some(connect);
        peer.options.read_timeout = Some(read_idle);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer.options.write_timeout = Some(read_idle);
        Ok(peer)
    }
}

/// All upstreams, by family.
pub struct Upstreams {
    pub ollama: Vec<Arc<Upstream>>,
    pub openai: Vec<Arc<Upstream>>,
    round_robin: AtomicUsize,
}

impl Upstreams {
    pub fn new(config: &Config) -> Upstreams {
        Upstreams {
            ollama: config
                .ollama
                .iter()
                .enumerate()
                .map(|(i, c)| Arc::new(Upstream::new(i, c.clone())))
                .collect(),
            openai: config
                .openai
                .iter()
                .enumerate()
                .map(|(i, c)| Arc::new(Upstream::new(i, c.clone())))
                .collect(),
            round_robin: AtomicUsize::new(0),
        }
    }

    pub fn family(&self, kind: UpstreamKind) -> &[Arc<Upstream>] {
        match kind {
            UpstreamKind::Ollama => &self.ollama,
            UpstreamKind::OpenAi => &self.openai,
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.ollama.iter().chain(self.openai.iter())
    }

    /// Orders the hosting upstreams by preference: healthy before recently failed, then
    /// fewest requests in flight, ties broken round-robin. The caller tries the first and
    /// falls back to the second when nothing could be sent.
    pub fn rank(&self, kind: UpstreamKind, idxs: &[usize]) -> Vec<Arc<Upstream>> {
        let family = self.family(kind);
        let mut c: Vec<Arc<Upstream>> = idxs
            .iter()
            .filter_map(|i| family.get(*i).cloned())
            .collect();
        if c.len() > 1 {
            let start = self.round_robin.fetch_add(1, Ordering::Relaxed) % c.len();
            c.rotate_left(start);
            c.sort_by_key(|u| (u.recently_failed(), u.in_flight.load(Ordering::Relaxed)));
        }
        c
    }
}

/// Status and message for a failure to reach or hear from an upstream.
pub fn upstream_failure(e: &pingora::Error) -> ApiError {
    match e.etype() {
        pingora::ErrorType::ConnectTimedout | pingora::ErrorType::TLSHandshakeTimedout => {
            ApiError::new(504, "Upstream connection timed out")
        }
        pingora::ErrorType::ReadTimedout | pingora::ErrorType::WriteTimedout => {
            ApiError::new(504, "Upstream did not answer in time")
        }
        pingora::ErrorType::ConnectRefused => ApiError::new(502, "Upstream refused the connection"),
        pingora::ErrorType::ConnectNoRoute => ApiError::new(502, "Upstream is unreachable"),
        _ => ApiError::new(
            502,
            format!("Upstream connection failed: {}", e.etype().as_str()),
        ),
    }
}
