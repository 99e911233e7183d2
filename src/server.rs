//! Assembling and running the pingora server: the gateway service on the client-facing
//! listener and the metrics service on its own listener.
//!
//! Shutdown: pingora's own SIGTERM handling sleeps the whole grace period however idle the
//! server is, then waits as long again for blocking tasks. ragway drains instead: on SIGTERM
//! the gateway stops accepting connections and closes idle keep-alive ones at once
//! ([`Drained`]), the requests in flight run to completion, and the process exits as soon as
//! none is left — or when `shutdown-grace` runs out, whichever comes first. Background work
//! (file processing, graph builds, model-list refreshes) never holds the exit back: it is
//! resumed or redone at the next start.
//!
//! Upgrade without downtime (pingora's socket hand-over): `ragway serve --upgrade` starts,
//! waits on the upgrade socket in the data directory, and the running process is sent
//! SIGQUIT. The old process then hands its listening sockets over, stops accepting (the
//! kernel queues new connections on the shared sockets for the new process), waits until
//! none of its requests can still touch the database — requests already streaming from an
//! upstream never do — and releases the database, which the new process opens before it
//! accepts. Its streams in flight finish; queued files are processed by the new process.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{
    ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora::services::listening::Service;
use tokio::sync::watch;

use crate::app::App;
use crate::config::Config;
use crate::proxy::Gateway;
use crate::proxy::serve::{CLEANUP_DELAY, Front};

/// Serves the Prometheus text format of the default registry.
struct MetricsApp;

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        if path != "/metrics" {
            return http::Response::builder()
                .status(404)
                .header("content-type", "text/plain")
                .body(b"only /metrics here\n".to_vec())
                .expect("static response");
        }
        let mut body = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = prometheus::Encoder::encode(&encoder, &prometheus::gather(), &mut body) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        http::Response::builder()
            .status(200)
            .header("content-type", prometheus::TEXT_FORMAT)
            .header("content-length", body.len().to_string())
            .body(body)
            .expect("static response")
    }
}

/// Runs the ingestion workers inside pingora's runtime until shutdown.
struct IngestWorkers(Arc<crate::ingest::Ingest>);

#[async_trait]
impl pingora::services::background::BackgroundService for IngestWorkers {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        tokio::select! {
            _ = self.0.clone().run_workers() => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Gives back what proxied requests freed once they stop for a moment (see
/// [`crate::heap::trim_when_requests_stop`]).
struct TrimWhenQuiet;

#[async_trait]
impl pingora::services::background::BackgroundService for TrimWhenQuiet {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        tokio::select! {
            () = crate::heap::trim_when_requests_stop() => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// A service that stops listening when ragway says so (`stop` turns `true`), not when pingora
/// broadcasts its shutdown: pingora broadcasts only once it has decided to end the process,
/// too late to let the requests in flight finish on their own schedule.
struct Drained<S> {
    inner: S,
    stop: watch::Receiver<bool>,
    /// Where pingora's table of listening sockets is shared, for the upgrade hand-over.
    fds: Arc<Mutex<Option<ListenFds>>>,
}

#[async_trait]
impl<S: pingora::services::Service> pingora::services::Service for Drained<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        _pingora_shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        (*self.fds.lock().expect("fds lock")).clone_from(&fds);
        // After `serve --upgrade`, the services listen on the sockets taken over. Every
        // wrapped service adds them all before its listeners are built, so none binds anew.
        if let Some(table) = &fds {
            let mut table = table.lock();
            for (bind, fd) in crate::upgrade::inherited() {
                table.add(bind.clone(), *fd);
            }
        }
        pingora::services::Service::start_service(
            &mut self.inner,
            fds,
            self.stop.clone(),
            listeners_per_fd,
        )
        .await;
    }

    fn name(&self) -> &str {
        pingora::services::Service::name(&self.inner)
    }

    fn threads(&self) -> Option<usize> {
        pingora::services::Service::threads(&self.inner)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        pingora::services::Service::listen_addresses(&self.inner)
    }
}

/// Tells the gateway to stop accepting connections. Must outlive the server: dropping it
/// would end the listeners as if with an error.
pub struct Drain {
    stop: watch::Sender<bool>,
    fds: Arc<Mutex<Option<ListenFds>>>,
}

impl Drain {
    fn start(&self) {
        self.stop.send_replace(true);
    }

    /// Sends the listening sockets to a process waiting on `path` (`serve --upgrade`).
    async fn hand_over(&self, path: &Path) -> Result<(), String> {
        let fds = self
            .fds
            .lock()
            .expect("fds lock")
            .clone()
            .ok_or("no listening sockets to hand over")?;
        let path = path.display().to_string();
        tokio::task::spawn_blocking(move || {
            fds.lock()
                .send_to_sock(path.as_str())
                .map(|_| ())
                .map_err(|e| format!("cannot send the listening sockets to {path}: {e}"))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// The socket a new process (`serve --upgrade`) waits on for the listening sockets: in the
/// data directory, so that only processes sharing the data can take them.
#[must_use]
pub fn upgrade_socket(config: &Config) -> PathBuf {
    config.data_dir.join("upgrade.sock")
}

/// Written by the new process once it holds the sockets: until then the old one keeps
/// accepting (pingora's receiver polls once a second, and nobody would accept meanwhile).
#[must_use]
pub fn upgrade_marker(config: &Config) -> PathBuf {
    config.data_dir.join("upgrade.taken")
}

/// How long a process started with `--upgrade` waits for the old one: for its sockets, and
/// then for its database.
pub const UPGRADE_WAIT: Duration = Duration::from_secs(30);

/// Waits until no request is in flight, for at most `grace`. `false` when the grace ran out.
async fn drained(grace: Duration) -> bool {
    settled(grace, || crate::metrics::IN_FLIGHT.get() <= 0).await
}

/// Polls `done` until it holds, for at most `grace`. `false` when the grace ran out.
async fn settled(grace: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The binary's signals: SIGTERM drains, SIGQUIT hands the sockets and the database over to
/// a new process (`serve --upgrade`) and drains, SIGINT — or a second SIGINT while draining —
/// stops at once.
struct Signals {
    app: Arc<App>,
    drain: Drain,
    grace: Duration,
}

impl Signals {
    /// The old half of an upgrade. `false` when the sockets could not be handed over: the
    /// process keeps serving.
    async fn upgrade(&self) -> bool {
        let path = upgrade_socket(&self.app.config);
        let marker = upgrade_marker(&self.app.config);
        let _ = std::fs::remove_file(&marker);
        if let Err(e) = self.drain.hand_over(&path).await {
            tracing::error!(error = %e, "upgrade failed; still serving (start `ragway serve --upgrade` first)");
            return false;
        }
        if !settled(UPGRADE_WAIT, || marker.exists()).await {
            tracing::error!("the new process did not take the sockets; still serving");
            return false;
        }
        // Busy keep-alive connections close after their answer in progress; the clients
        // reconnect, and the new process accepts them.
        self.app
            .handing_over
            .store(true, std::sync::atomic::Ordering::Release);
        self.drain.start();
        tracing::info!(
            in_flight = crate::metrics::IN_FLIGHT.get(),
            "listening sockets handed over; releasing the database"
        );
        // Connections waiting for a request may still bring one for `CLEANUP_DELAY` after the
        // stop (`proxy::serve`); such a request counts itself a moment after it is read.
        tokio::time::sleep(CLEANUP_DELAY + Duration::from_millis(50)).await;
        // Requests still in a phase that can touch the database finish first (authentication,
        // handlers: milliseconds); streams already relaying an upstream never touch it again.
        if !settled(self.grace, || {
            crate::request::requests_in_store_phase() <= 0
        })
        .await
        {
            tracing::warn!("requests still using the database at the end of the grace period");
        }
        self.app.ingest.stop();
        // Rows of streams that end later go to a hand-over file (`Store::add_usage`).
        self.app.usage.recorder.flush().await;
        self.app.release_storage();
        tracing::info!("database released to the new process");
        true
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        loop {
            tokio::select! {
                _ = int.recv() => {
                    tracing::info!("SIGINT: stopping now");
                    return ShutdownSignal::FastShutdown;
                }
                _ = term.recv() => break,
                _ = quit.recv() => {
                    if self.upgrade().await {
                        break;
                    }
                }
            }
        }
        tracing::info!(
            in_flight = crate::metrics::IN_FLIGHT.get(),
            grace_s = self.grace.as_secs_f64(),
            "shutting down: no new connections; finishing the requests in flight"
        );
        self.drain.start();
        tokio::select! {
            done = drained(self.grace) => {
                if done {
                    tracing::info!("every request finished; exiting");
                } else {
                    tracing::warn!(
                        in_flight = crate::metrics::IN_FLIGHT.get(),
                        "shutdown grace period over; cutting the remaining requests"
                    );
                }
            }
            _ = int.recv() => tracing::info!("SIGINT while draining: stopping now"),
        }
        // Nothing is left to wait for, so pingora's grace sleep is 0 (see `build`).
        ShutdownSignal::GracefulTerminate
    }
}

/// A bootstrapped pingora server for `config`. With `upgrade`, first waits (up to
/// [`UPGRADE_WAIT`]) for a running ragway to hand its listening sockets over.
///
/// # Errors
/// With `upgrade`: no sockets arrived.
pub fn new_server(config: &Config, upgrade: bool) -> Result<Server, String> {
    let conf = ServerConf {
        threads: config.threads,
        work_stealing: config.work_stealing,
        // ragway has drained before it tells pingora to shut down (`Signals`), so pingora
        // must not sleep on top of that; blocking tasks (file extraction, embedding) get a
        // second before the process leaves them behind.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: upgrade_socket(config).display().to_string(),
        // pingora's own timer ("fast timeout") wakes a thread every 10 ms for the life of
        // the process once any timeout has used it: an idle sidecar woke 100 times a second,
        // and a one-second token stream paid ~3 ms of CPU for it. Every timeout of a second
        // or more goes to tokio's timer instead (ragway's are seconds).
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    };
    if upgrade {
        // pingora's receiver polls once a second; ragway's takes the sockets at once.
        let n = crate::upgrade::take_over(&upgrade_socket(config), UPGRADE_WAIT)
            .map_err(|e| format!("upgrade: {e}"))?;
        tracing::info!(sockets = n, "listening sockets taken over");
    }
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
    Ok(server)
}

/// Adds ragway's services to a bootstrapped server; returns the switch that makes its gateway
/// stop accepting.
pub fn add_services(server: &mut Server, app: Arc<App>) -> Drain {
    let config = app.config.clone();
    let workers = pingora::services::background::background_service(
        "ingest workers",
        IngestWorkers(app.ingest.clone()),
    );
    server.add_service(workers);
    server.add_service(pingora::services::background::background_service(
        "memory trim",
        TrimWhenQuiet,
    ));
    let mut gateway = Service::new(
        "ragway gateway".to_string(),
        Front {
            gateway: Gateway { app },
        },
    );
    gateway.add_tcp(&config.listen);
    let (stop_tx, stop_rx) = watch::channel(false);
    let fds = Arc::new(Mutex::new(None));
    server.add_service(Drained {
        inner: gateway,
        stop: stop_rx,
        fds: fds.clone(),
    });
    if let Some(addr) = &config.metrics_listen {
        let mut metrics = Service::new("ragway metrics".to_string(), MetricsApp);
        metrics.threads = Some(1);
        metrics.add_tcp(addr);
        // Wrapped for the sockets taken over at an upgrade; it stops with the gateway.
        server.add_service(Drained {
            inner: metrics,
            stop: stop_tx.subscribe(),
            fds: Arc::new(Mutex::new(None)),
        });
    }
    Drain { stop: stop_tx, fds }
}

/// Builds the pingora server for `app`, and the switch that makes its gateway stop accepting.
pub fn build(app: Arc<App>) -> (Server, Drain) {
    let mut server = new_server(&app.config, false).expect("no upgrade, nothing to wait for");
    let drain = add_services(&mut server, app);
    (server, drain)
}

/// Stops a server started with [`spawn`].
struct ChannelShutdown {
    rx: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    drain: Drain,
}

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let rx = self.rx.lock().expect("shutdown lock").take();
        if let Some(rx) = rx {
            let _ = rx.await;
        }
        // Stop the listeners before this watch (and with it the switch) is dropped.
        self.drain.start();
        ShutdownSignal::FastShutdown
    }
}

/// A gateway running on background threads (tests, embedding). Stops when dropped.
pub struct Handle {
    pub app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            // A fast shutdown drops the runtimes' tasks in the background; wait (bounded)
            // until they have released the app, so the database can be reopened at once.
            let deadline = Instant::now() + Duration::from_secs(5);
            // In-flight file processing holds the ingest service (and so the database).
            while (Arc::strong_count(&self.app) > 1 || Arc::strong_count(&self.app.ingest) > 1)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the gateway on background threads and waits until its listener accepts
/// connections (at most `wait`).
pub fn spawn(app: Arc<App>, wait: Duration) -> std::io::Result<Handle> {
    let listen = app.config.listen.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (server, drain) = build(app.clone());
    let thread = std::thread::Builder::new()
        .name("ragway-server".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(ChannelShutdown {
                    rx: Mutex::new(Some(rx)),
                    drain,
                }),
            });
        })?;
    let handle = Handle {
        app,
        stop: Some(tx),
        thread: Some(thread),
    };
    let deadline = Instant::now() + wait;
    loop {
        if TcpStream::connect(&listen).is_ok() {
            return Ok(handle);
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("gateway did not start listening on {listen}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs in the foreground until SIGTERM (drain, then exit), SIGQUIT (hand over to a process
/// started with `serve --upgrade`, drain, exit) or SIGINT (exit now).
pub fn run_forever(app: Arc<App>) {
    let server = new_server(&app.config, false).expect("no upgrade, nothing to wait for");
    run_on(server, app);
}

/// Runs an app on a bootstrapped server (see [`new_server`]) until a signal ends it.
pub fn run_on(mut server: Server, app: Arc<App>) {
    let grace = app.config.shutdown_grace;
    let drain = add_services(&mut server, app.clone());
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals { app, drain, grace }),
    });
}
