//! Starts a real ragway gateway in-process on 127.0.0.1 with a temporary data dir, plus
//! helpers to sign users up and make keys through the HTTP API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, Response};
use serde_json::{Value, json};

use ragway::config::{self, Overrides};

/// A running gateway. Stops (fast shutdown) when dropped.
pub struct Gateway {
    pub url: String,
    pub metrics_url: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    handle: Option<ragway::server::Handle>,
}

/// A free port on 127.0.0.1 for a listener the gateway binds later. Picked at random below the
/// kernel's ephemeral range: a port from that range (what binding port 0 returns) can be handed
/// to another process's fake upstream or outgoing connection before the gateway binds it, and
/// the test then talks to the wrong server. Below the range only another test's `free_port`
/// can collide: each test runs in its own process, and two of them picking the same port
/// before either binds it happened about once in a few CI runs (a test then signed up on
/// another test's metrics listener and got 404). So a pick is also reserved with a file that
/// only one process can create; reservations older than [`RESERVATION_AGE`] are stale (their
/// gateway has bound the port or is gone) and are taken over.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let dir = std::env::temp_dir().join("ragway-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    if low > 11_000 {
        for _ in 0..200 {
            let port = rand::random_range(10_000..low);
            if reserve(&dir.join(port.to_string()))
                && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How long a port reservation keeps other test processes off the port: far longer than a
/// gateway takes to bind it.
const RESERVATION_AGE: Duration = Duration::from_secs(600);

/// Whether this process now holds the reservation `file`.
fn reserve(file: &std::path::Path) -> bool {
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(file)
            .is_ok()
    };
    if create() {
        return true;
    }
    let stale = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > RESERVATION_AGE);
    stale && std::fs::remove_file(file).is_ok() && create()
}

/// Builder for a gateway under test.
#[derive(Default, Clone)]
pub struct Setup {
    /// Extra TOML (appended after the generated listen/data-dir lines).
    pub toml: String,
    pub env: Vec<(String, String)>,
    pub ollama: Vec<String>,
    pub openai: Vec<String>,
    /// Use the configured (real) embedding engine instead of the deterministic test one.
    pub real_embedder: bool,
}

impl Setup {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn ollama(mut self, url: &str) -> Self {
        self.ollama.push(url.to_string());
        self
    }
    pub fn openai(mut self, url: &str) -> Self {
        self.openai.push(url.to_string());
        self
    }
    pub fn toml(mut self, t: &str) -> Self {
        self.toml.push_str(t);
        self.toml.push('\n');
        self
    }
    /// Embeds with the configured engine (ONNX by default) instead of `HashEmbedder`.
    pub fn real_embedder(mut self) -> Self {
        self.real_embedder = true;
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Starts the gateway. Must be called from a multi-threaded tokio test.
    pub async fn start(self) -> Gateway {
        self.start_in(tempfile::tempdir().unwrap()).await
    }

    /// Starts the gateway with an existing data dir (restart tests).
    pub async fn start_in(self, dir: tempfile::TempDir) -> Gateway {
        super::fake::install_crypto_provider();
        let port = free_port();
        let mport = free_port();
        let mut text = format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics-listen = \"127.0.0.1:{mport}\"\ndata-dir = {:?}\nthreads = 2\nshutdown-grace = \"1s\"\n",
            dir.path().display().to_string()
        );
        // Top-level keys must precede tables in TOML.
        let (top, tables): (Vec<&str>, Vec<&str>) = {
            let mut seen_table = false;
            let mut top = Vec::new();
            let mut tables = Vec::new();
            for line in self.toml.lines() {
                if line.trim_start().starts_with('[') {
                    seen_table = true;
                }
                if seen_table {
                    tables.push(line)
                } else {
                    top.push(line)
                }
            }
            (top, tables)
        };
        // pingora 0.9.1's per-thread schedulers (`work-stealing = false`, the default) keep
        // their handles in a thread-local keyed by thread id, which a later server's threads
        // inherit when ids are reused: a second in-process gateway would hand connections to
        // the first one's stopped threads. Tests start many gateways in one process, so they
        // use the shared scheduler unless they choose (the release binary runs one server).
        if !top
            .iter()
            .any(|l| l.trim_start().starts_with("work-stealing"))
        {
            text.push_str("work-stealing = true\n");
        }
        for l in top {
            text.push_str(l);
            text.push('\n');
        }
        for u in &self.ollama {
            text.push_str(&format!("[[ollama]]\nurl = {u:?}\n"));
        }
        for u in &self.openai {
            text.push_str(&format!("[[openai]]\nurl = {u:?}\n"));
        }
        for l in tables {
            text.push_str(l);
            text.push('\n');
        }
        let file: config::file::FileConfig =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let env: HashMap<String, String> = self.env.into_iter().collect();
        let cfg = config::build(file, &env, &Overrides::default()).expect("valid test config");
        let embedder: Option<Arc<dyn ragway::embed::Embedder>> = if self.real_embedder {
            None
        } else {
            Some(Arc::new(ragway::embed::HashEmbedder::new(64)))
        };
        let app = tokio::task::spawn_blocking(move || ragway::app::App::open_with(cfg, embedder))
            .await
            .unwrap()
            .expect("app opens");
        let app = Arc::new(app);
        let handle = tokio::task::spawn_blocking(move || {
            ragway::server::spawn(app, Duration::from_secs(10)).expect("gateway starts")
        })
        .await
        .unwrap();
        Gateway {
            url: format!("http://127.0.0.1:{port}"),
            metrics_url: format!("http://127.0.0.1:{mport}/metrics"),
            client: super::fake::http_client(),
            dir,
            handle: Some(handle),
        }
    }
}

impl Gateway {
    pub fn app(&self) -> &ragway::app::App {
        &self.handle.as_ref().unwrap().app
    }

    /// Stops the gateway and returns its data dir (for restart tests).
    pub async fn stop(mut self) -> tempfile::TempDir {
        let h = self.handle.take().unwrap();
        tokio::task::spawn_blocking(move || h.stop()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub fn req(&self, method: Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let r = self.client.request(method, format!("{}{}", self.url, path));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        self.req(Method::GET, path, token).send().await.unwrap()
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Response {
        self.req(Method::POST, path, token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Signs a user up and returns the session JSON.
    pub async fn signup(&self, email: &str) -> Value {
        let r = self
            .post(
                "/api/v1/auths/signup",
                None,
                json!({"name": email.split('@').next().unwrap(), "email": email, "password": "pw-123456"}),
            )
            .await;
        assert_eq!(r.status(), 200, "signup {email}");
        r.json().await.unwrap()
    }

    /// Creates an API key for the session `token`.
    pub async fn key(&self, token: &str) -> String {
        let r = self
            .post("/api/v1/auths/api_key", Some(token), json!({}))
            .await;
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["api_key"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// An admin (first user) JWT.
    pub async fn admin(&self) -> String {
        self.signup("admin@example.com").await["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A verified `user` JWT, created by the admin.
    pub async fn user(&self, admin: &str, email: &str) -> String {
        let r = self
            .post(
                "/api/v1/auths/add",
                Some(admin),
                json!({"name": "u", "email": email, "password": "pw-123456", "role": "user"}),
            )
            .await;
        assert_eq!(r.status(), 200, "add user");
        r.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Scrapes the metrics listener.
    pub async fn metrics(&self) -> String {
        self.client
            .get(&self.metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }
}

/// Asserts a gateway-made error: status, `detail`, and the OpenAI-style `error` object.
pub async fn assert_error(r: Response, status: u16, detail_contains: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "status");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "JSON error"
    );
    let v: Value = r.json().await.unwrap();
    let detail = v["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {v}"));
    assert!(
        detail.contains(detail_contains),
        "detail {detail:?} lacks {detail_contains:?}"
    );
    assert_eq!(v["error"]["message"], v["detail"]);
    assert_eq!(v["error"]["code"], status);
    v
}
