//! Assembling and running the pingora server: the gateway service on the client-facing
//! listener and the metrics service on its own listener.

use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;

use crate::app::App;
use crate::proxy::Gateway;

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

/// Builds the pingora server for `app`.
pub fn build(app: Arc<App>) -> Server {
    let config = app.config.clone();
    let conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(config.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(config.shutdown_grace.as_secs().max(1)),
        ..ServerConf::default()
    };
    let mut server =
        Server::new_with_opt_and_conf(None::<pingora::server::configuration::Opt>, conf);
    server.bootstrap();
    let workers = pingora::services::background::background_service(
        "ingest workers",
        IngestWorkers(app.ingest.clone()),
    );
    server.add_service(workers);
    let mut gateway =
        http_proxy_service_with_name(&server.configuration, Gateway { app }, "ragway gateway");
    gateway.add_tcp(&config.listen);
    server.add_service(gateway);
    if let Some(addr) = &config.metrics_listen {
        let mut metrics = Service::new("ragway metrics".to_string(), MetricsApp);
        metrics.threads = Some(1);
        metrics.add_tcp(addr);
        server.add_service(metrics);
    }
    server
}

/// Stops a server started with [`spawn`].
struct ChannelShutdown(Mutex<Option<tokio::sync::oneshot::Receiver<()>>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let rx = self.0.lock().expect("shutdown lock").take();
        if let Some(rx) = rx {
            let _ = rx.await;
        }
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
    let server = build(app.clone());
    let thread = std::thread::Builder::new()
        .name("ragway-server".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(ChannelShutdown(Mutex::new(Some(rx)))),
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

/// Runs in the foreground until SIGTERM (graceful) or SIGINT (fast).
pub fn run_forever(app: Arc<App>) {
    let server = build(app);
    server.run(RunArgs::default());
}
