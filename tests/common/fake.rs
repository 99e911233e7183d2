//! In-process fake upstream servers (Ollama and OpenAI-compatible) for
//! integration tests.
//!
//! A [`FakeUpstream`] listens on `127.0.0.1:<random port>`, records every
//! request it receives and answers in the wire formats of Ollama's
//! `docs/api.md` and of the OpenAI API. It is stateful where tests need it to
//! be: `/api/pull`, `/api/create` and `/api/copy` add models, `/api/delete`
//! removes them, and [`FakeUpstream::set_models`] replaces the list.
//!
//! # Model-name behaviours
//!
//! Inference endpoints (`/api/chat`, `/api/generate`, `/api/embed`,
//! `/api/embeddings`, and the OpenAI-style `chat/completions`, `completions`,
//! `embeddings`) look at the requested model's name prefix:
//!
//! | prefix            | streamed reply                                             | whole (non-streamed) reply                |
//! |-------------------|------------------------------------------------------------|-------------------------------------------|
//! | `slow`            | first chunk, pause [`SLOW_PAUSE`], the rest                | pause [`SLOW_PAUSE`], then the reply      |
//! | `hang`            | headers + first chunk, then nothing until the client leaves | headers + half the body, then nothing     |
//! | `midstream-error` | first chunk, an error line/event, end (status stays 200)   | 500 `something went wrong`                |
//! | `fail`            | 500 with the flavor's error body                           | same                                      |
//! | `stall`           | never sends headers                                        | same                                      |
//! | anything else     | `"Hello"`, `" from"`, `" <model>"`, final chunk            | `"Hello from <model>"`                    |
//!
//! The model must still be known to the fake (listed, pulled, created or
//! copied); unknown models get the flavor's 404. A name without a tag matches
//! the same name with `:latest` and vice versa, as in Ollama.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long a `slow*` model pauses after its first chunk (or before a whole reply).
pub const SLOW_PAUSE: Duration = Duration::from_millis(1500);

/// Length of the vectors returned by the embedding endpoints.
pub const EMBED_DIM: usize = 4;

/// Default `/api/version` answer.
pub const DEFAULT_VERSION: &str = "0.5.1";

/// Fixed timestamps keep responses byte-for-byte deterministic.
const CREATED_AT: &str = "2024-01-01T00:00:00Z";
const MODIFIED_AT: &str = "2025-05-04T17:37:44.706015396-07:00";
const EXPIRES_AT: &str = "2099-01-01T00:00:00Z";
const CREATED: u64 = 1_700_000_000;

const NDJSON: &str = "application/x-ndjson";
const JSON: &str = "application/json";
const SSE: &str = "text/event-stream";

/// Message of the error injected by `midstream-error*` models.
const MIDSTREAM_ERROR: &str = "something went wrong";
/// Message of the 500 returned for `fail*` models.
const INTERNAL_FAILURE: &str = "internal failure";

type Body = BoxBody<Bytes, Infallible>;

/// One request as received by a [`FakeUpstream`], body fully collected
/// (chunked request bodies are de-chunked).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `"POST"`.
    pub method: String,
    /// Path plus `?query` if any, e.g. `"/api/tags"`.
    pub path: String,
    /// All headers in arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The complete request body.
    pub body: Bytes,
    /// Which accepted connection carried it (numbered from 1 in accept order).
    pub connection: usize,
    /// TCP segments with data that connection had received once this request was read
    /// (Linux `tcpi_data_segs_in`; 0 where unknown): how the sender cut its writes.
    pub data_segments_in: u32,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics with the body in the message if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body of {} {} is not JSON ({e}): {:?}",
                self.method,
                self.path,
                self.text()
            )
        })
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Which kind of server a [`FakeUpstream`] imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Ollama: native `/api/*` endpoints plus the OpenAI-compatible `/v1/*` ones.
    Ollama,
    /// An OpenAI-compatible server: `/models`, `/chat/completions`,
    /// `/completions`, `/embeddings`, each also reachable under `/v1`.
    OpenAi,
}

/// Mutable state shared between the test and the server tasks.
struct State {
    models: Vec<String>,
    version: String,
    list_delay: Duration,
    api_key: Option<String>,
    requests: Vec<RecordedRequest>,
    /// Token counts reported by inference answers (prompt, completion), as JSON values so
    /// tests can make the fake lie; `None`: 1 and 2.
    usage: Option<(Value, Value)>,
    /// `/api/show` overrides per model: (`model_info`, `parameters`).
    show: std::collections::HashMap<String, (Value, String)>,
}

struct Shared {
    flavor: Flavor,
    state: Mutex<State>,
    open_connections: AtomicUsize,
    accepted_connections: AtomicUsize,
}

impl Shared {
    /// A panicking test thread must not wedge the fake, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The listed model `requested` refers to, if any (`m` ≡ `m:latest`).
    fn find_model(&self, requested: &str) -> Option<String> {
        self.lock()
            .models
            .iter()
            .find(|m| same_model(m, requested))
            .cloned()
    }

    fn add_model(&self, name: &str) {
        let mut state = self.lock();
        if !state.models.iter().any(|m| same_model(m, name)) {
            state.models.push(name.to_owned());
        }
    }

    /// Wait out the configured list delay (imitates a slow upstream).
    async fn list_delay(&self) {
        let delay = self.lock().list_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// The token counts inference answers report.
    fn usage(&self) -> (Value, Value) {
        self.lock()
            .usage
            .clone()
            .unwrap_or_else(|| (json!(1), json!(2)))
    }

    /// Whether an API key is configured and the request does not carry it.
    fn unauthorized(&self, req: &RecordedRequest) -> bool {
        match &self.lock().api_key {
            None => false,
            Some(key) => req.header("authorization") != Some(format!("Bearer {key}").as_str()),
        }
    }
}

/// Counts a connection as open for as long as its task lives.
struct ConnectionGuard(Arc<Shared>);

impl ConnectionGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open_connections.fetch_add(1, Ordering::SeqCst);
        shared.accepted_connections.fetch_add(1, Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A fake upstream server running on the current tokio runtime.
///
/// Dropping it stops the server: the listener is closed and every open
/// connection is cut, which also lets tests simulate an upstream going away.
pub struct FakeUpstream {
    /// Address the server listens on.
    pub addr: SocketAddr,
    /// Base URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub url: String,
    /// What the server imitates.
    pub flavor: Flavor,
    shared: Arc<Shared>,
    /// Never sent on; dropping it tells every server task to stop.
    _shutdown: watch::Sender<()>,
}

impl FakeUpstream {
    /// Starts a fake Ollama server that knows `models`.
    pub async fn ollama(models: &[&str]) -> Self {
        Self::start(Flavor::Ollama, models).await
    }

    /// Starts a fake OpenAI-compatible server that knows `models`.
    pub async fn openai(models: &[&str]) -> Self {
        Self::start(Flavor::OpenAi, models).await
    }

    async fn start(flavor: Flavor, models: &[&str]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("fake upstream local addr");
        let shared = Arc::new(Shared {
            flavor,
            state: Mutex::new(State {
                models: models.iter().map(|m| m.to_string()).collect(),
                version: DEFAULT_VERSION.to_owned(),
                list_delay: Duration::ZERO,
                api_key: None,
                requests: Vec::new(),
                usage: None,
                show: std::collections::HashMap::new(),
            }),
            open_connections: AtomicUsize::new(0),
            accepted_connections: AtomicUsize::new(0),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        Self {
            addr,
            url: format!("http://{addr}"),
            flavor,
            shared,
            _shutdown: shutdown_tx,
        }
    }

    /// Requires `Authorization: Bearer <key>` on every request; others get 401
    /// (OpenAI `invalid_api_key` error object, or `{"error":"unauthorized"}` on
    /// Ollama's native endpoints).
    pub fn with_api_key(self, key: &str) -> Self {
        self.shared.lock().api_key = Some(key.to_owned());
        self
    }

    /// Sets the token counts inference answers report: OpenAI's `usage.prompt_tokens` and
    /// `usage.completion_tokens`, Ollama's `prompt_eval_count` and `eval_count`.
    pub fn set_usage(&self, prompt: Value, completion: Value) {
        self.shared.lock().usage = Some((prompt, completion));
    }

    /// Sets the version reported by Ollama's `/api/version`.
    pub fn set_version(&self, v: &str) {
        self.shared.lock().version = v.to_owned();
    }

    /// Makes `/api/show` for `model` report `model_info` and `parameters` (Ollama's text
    /// form, e.g. `"num_ctx 8192"`) instead of the empty defaults.
    pub fn set_show(&self, model: &str, model_info: Value, parameters: &str) {
        self.shared
            .lock()
            .show
            .insert(model.to_owned(), (model_info, parameters.to_owned()));
    }

    /// Delays the model-list endpoints (`/api/tags`, `/api/ps`, `/models`,
    /// `/v1/models`) by `d`, to imitate a slow upstream.
    pub fn set_list_delay(&self, d: Duration) {
        self.shared.lock().list_delay = d;
    }

    /// Replaces the list of known models.
    pub fn set_models(&self, models: &[&str]) {
        self.shared.lock().models = models.iter().map(|m| m.to_string()).collect();
    }

    /// The currently known models.
    pub fn models(&self) -> Vec<String> {
        self.shared.lock().models.clone()
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.lock().requests.last().cloned()
    }

    /// Requests whose path (including query) starts with `path_prefix`.
    pub fn requests_to(&self, path_prefix: &str) -> Vec<RecordedRequest> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.path.starts_with(path_prefix))
            .cloned()
            .collect()
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// Forgets all recorded requests.
    pub fn clear(&self) {
        self.shared.lock().requests.clear();
    }

    /// Number of TCP connections currently open to this server. A connection
    /// counts until the server notices the peer closed it, which hyper does
    /// promptly even while a response is hanging.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::SeqCst)
    }

    /// Number of TCP connections accepted since the server started.
    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted_connections.load(Ordering::SeqCst)
    }
}

/// A `http://127.0.0.1:PORT` URL where nothing listens (connections are refused).
pub fn dead_url() -> String {
    // Binding to port 0 and dropping the listener yields a port that is free
    // now; the OS does not hand out the same ephemeral port again right away.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind for dead_url");
    let port = listener.local_addr().expect("dead_url local addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// A server that accepts TCP connections and never reads or answers. Abort
/// the returned handle to close the listener and all accepted connections.
pub async fn blackhole() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind blackhole");
    let url = format!("http://{}", listener.local_addr().expect("blackhole addr"));
    let handle = tokio::spawn(async move {
        // Keep accepted sockets alive so the peer sees an open, silent connection.
        let mut held = Vec::new();
        loop {
            if let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        }
    });
    (url, handle)
}

/// A plain-HTTP reqwest client for tests.
///
/// reqwest is built with `rustls-no-provider`, so `reqwest::Client::new()`
/// panics unless a rustls crypto provider is installed; this installs
/// pingora's `ring` provider first. Proxies from the environment are ignored
/// so requests to 127.0.0.1 go straight to the fakes.
pub fn http_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("build reqwest client")
}

/// Installs the process-wide rustls crypto provider (idempotent).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(pingora::tls::install_default_crypto_provider);
}

/// Deterministic embedding of `text`: [`EMBED_DIM`] values derived from a hash
/// of its bytes, each an exact multiple of 1/256 in (-1, 1) and never zero.
pub fn embedding_for(text: &str) -> Vec<f32> {
    (0..EMBED_DIM)
        .map(|i| {
            let h = fnv1a(&[&[i as u8], text.as_bytes()]);
            ((h & 0xff) as f32 - 127.5) / 128.0
        })
        .collect()
}

/// The 64-hex-digit digest the fake reports for model `name`.
pub fn digest_for(name: &str) -> String {
    (0u8..4)
        .map(|i| format!("{:016x}", fnv1a(&[&[i], name.as_bytes()])))
        .collect()
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Ollama treats `name` and `name:latest` as the same model.
fn same_model(listed: &str, requested: &str) -> bool {
    let canonical = |s: &str| {
        if s.contains(':') {
            s.to_owned()
        } else {
            format!("{s}:latest")
        }
    };
    listed == requested || canonical(listed) == canonical(requested)
}

// ---------------------------------------------------------------------------
// Server plumbing
// ---------------------------------------------------------------------------

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            // The sender is never used to send, so this only fires when the
            // FakeUpstream is dropped.
            _ = shutdown.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((socket, _)) = accepted else {
            // E.g. EMFILE; back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // Without TCP_NODELAY, Nagle's algorithm plus delayed ACKs hold back
        // small streamed chunks by ~40 ms, which distorts streaming tests.
        let _ = socket.set_nodelay(true);
        // Count the connection before spawning so a test that has just
        // connected always sees it.
        let guard = ConnectionGuard::new(&shared);
        let connection = shared.accepted_connections.load(Ordering::SeqCst);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let service = service_fn(move |req| handle(shared.clone(), req, (connection, fd)));
            let connection = http1::Builder::new().serve_connection(TokioIo::new(socket), service);
            tokio::select! {
                _ = connection => {}
                _ = shutdown.changed() => {}
            }
        });
    }
}

/// `tcpi_data_segs_in` of a socket (0 where the kernel does not tell).
fn data_segments_in(fd: std::os::fd::RawFd) -> u32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `fd` is the connection's socket, open while its handler runs; the kernel
        // writes at most `len` bytes into `info`, which is plain data.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).unwrap();
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &raw mut len,
            )
        };
        if rc == 0 { info.tcpi_data_segs_in } else { 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        0
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    (connection, fd): (usize, std::os::fd::RawFd),
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    // `collect` de-chunks Transfer-Encoding: chunked bodies. A read error means
    // the client is gone; record what we have and carry on.
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect(),
        body,
        connection,
        data_segments_in: data_segments_in(fd),
    };
    // Recorded before answering, so even stalled or hanging requests show up.
    shared.lock().requests.push(recorded.clone());

    let path = parts.uri.path();
    let response = match shared.flavor {
        Flavor::Ollama => match strip_v1(path) {
            Some(rest) => openai_route(&shared, &recorded, rest, "library").await,
            None => ollama_route(&shared, &recorded, path).await,
        },
        Flavor::OpenAi => {
            let rest = strip_v1(path).unwrap_or(path);
            openai_route(&shared, &recorded, rest, "openai").await
        }
    };
    Ok(response)
}

/// `/v1/x` → `/x`; `None` if the path is not under `/v1`.
fn strip_v1(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1")?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).boxed())
        .expect("valid response")
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    full(status, JSON, value.to_string())
}

fn empty(status: StatusCode) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Empty::new().boxed())
        .expect("valid response")
}

/// One step of a streamed reply.
enum Step {
    /// Send these bytes as one body frame (hyper flushes each frame).
    Send(Bytes),
    /// Wait before the next step.
    Pause(Duration),
    /// Send nothing more, but keep the response open until the client leaves.
    Hang,
}

/// A 200 response whose body is produced step by step by a background task.
fn streamed(content_type: &str, steps: Vec<Step>) -> Response<Body> {
    let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
    tokio::spawn(async move {
        for step in steps {
            match step {
                Step::Send(bytes) => {
                    if tx.send(Ok(Frame::data(bytes))).await.is_err() {
                        return; // client gone
                    }
                }
                Step::Pause(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = tx.closed() => return,
                    }
                }
                Step::Hang => {
                    // Holding `tx` keeps the body open; hyper drops the body
                    // (closing the channel) once it sees the client hang up.
                    tx.closed().await;
                    return;
                }
            }
        }
    });
    let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, content_type)
        .body(StreamBody::new(frames).boxed())
        .expect("valid response")
}

/// Never answers; the future is dropped when the client disconnects.
async fn stall() -> Response<Body> {
    std::future::pending().await
}

/// Special behaviour selected by a model-name prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Normal,
    Slow,
    Hang,
    MidstreamError,
    Fail,
    Stall,
}

impl Behaviour {
    fn of(model: &str) -> Self {
        const PREFIXES: [(&str, Behaviour); 5] = [
            ("slow", Behaviour::Slow),
            ("hang", Behaviour::Hang),
            ("midstream-error", Behaviour::MidstreamError),
            ("fail", Behaviour::Fail),
            ("stall", Behaviour::Stall),
        ];
        PREFIXES
            .iter()
            .find(|(prefix, _)| model.starts_with(prefix))
            .map_or(Behaviour::Normal, |(_, b)| *b)
    }
}

/// The chunks of a streamed reply, already framed (NDJSON lines or SSE events).
struct StreamPlan {
    content_type: &'static str,
    /// Chunks carrying content; the first one is always sent.
    chunks: Vec<Bytes>,
    /// Final chunk(s) after the content (done line, `data: [DONE]`, ...).
    trailer: Vec<Bytes>,
    /// Sent instead of the rest for `midstream-error` models.
    error: Bytes,
}

/// Applies `behaviour` to a streamed reply (`fail`/`stall` are handled earlier).
fn stream_reply(behaviour: Behaviour, plan: StreamPlan) -> Response<Body> {
    let mut chunks = plan.chunks.into_iter().map(Step::Send);
    let mut steps: Vec<Step> = chunks.next().into_iter().collect();
    match behaviour {
        Behaviour::Hang => steps.push(Step::Hang),
        Behaviour::MidstreamError => steps.push(Step::Send(plan.error)),
        _ => {
            if behaviour == Behaviour::Slow {
                steps.push(Step::Pause(SLOW_PAUSE));
            }
            steps.extend(chunks);
            steps.extend(plan.trailer.into_iter().map(Step::Send));
        }
    }
    streamed(plan.content_type, steps)
}

/// Applies `behaviour` to a whole JSON reply. `error` builds the flavor's
/// error response for a status and message.
async fn whole_reply(
    behaviour: Behaviour,
    value: Value,
    error: fn(StatusCode, &str) -> Response<Body>,
) -> Response<Body> {
    match behaviour {
        Behaviour::Normal => json_response(StatusCode::OK, &value),
        Behaviour::Slow => {
            tokio::time::sleep(SLOW_PAUSE).await;
            json_response(StatusCode::OK, &value)
        }
        Behaviour::Hang => {
            let body = value.to_string().into_bytes();
            let half = Bytes::from(body[..body.len() / 2].to_vec());
            streamed(JSON, vec![Step::Send(half), Step::Hang])
        }
        Behaviour::MidstreamError => error(StatusCode::INTERNAL_SERVER_ERROR, MIDSTREAM_ERROR),
        Behaviour::Fail => error(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL_FAILURE),
        Behaviour::Stall => stall().await,
    }
}

/// `"Hello"`, `" from"`, `" <model>"`.
fn content_pieces(model: &str) -> [String; 3] {
    ["Hello".to_owned(), " from".to_owned(), format!(" {model}")]
}

fn full_content(model: &str) -> String {
    content_pieces(model).concat()
}

/// The request body as a JSON object, or a message for the 400.
fn parse_object(req: &RecordedRequest) -> Result<Value, String> {
    if req.body.is_empty() {
        return Err("missing request body".to_owned());
    }
    let value: Value =
        serde_json::from_slice(&req.body).map_err(|e| format!("invalid JSON body: {e}"))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err("request body must be a JSON object".to_owned())
    }
}

/// Embedding inputs: a string or an array of strings (missing → none).
fn embedding_inputs(input: Option<&Value>) -> Result<Vec<String>, String> {
    match input {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "invalid input type".to_owned()),
        Some(_) => Err("invalid input type".to_owned()),
    }
}

fn ndjson_line(value: &Value) -> Bytes {
    Bytes::from(format!("{value}\n"))
}

fn sse_event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

// ---------------------------------------------------------------------------
// Ollama native API
// ---------------------------------------------------------------------------

fn ollama_error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": message }))
}

fn ollama_not_found(model: &str) -> Response<Body> {
    ollama_error(StatusCode::NOT_FOUND, &format!("model '{model}' not found"))
}

fn ollama_model_entry(name: &str) -> Value {
    json!({
        "name": name,
        "model": name,
        "modified_at": MODIFIED_AT,
        "size": 2_019_393_189u64,
        "digest": digest_for(name),
        "details": ollama_details(),
    })
}

fn ollama_details() -> Value {
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M",
    })
}

async fn ollama_route(shared: &Shared, req: &RecordedRequest, path: &str) -> Response<Body> {
    if shared.unauthorized(req) {
        return ollama_error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    match (req.method.as_str(), path) {
        ("GET" | "HEAD", "/") => full(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "Ollama is running",
        ),
        ("GET" | "HEAD", "/api/version") => {
            let version = shared.lock().version.clone();
            json_response(StatusCode::OK, &json!({ "version": version }))
        }
        ("GET", "/api/tags") => {
            shared.list_delay().await;
            let models: Vec<Value> = shared
                .lock()
                .models
                .iter()
                .map(|m| ollama_model_entry(m))
                .collect();
            json_response(StatusCode::OK, &json!({ "models": models }))
        }
        ("GET", "/api/ps") => {
            shared.list_delay().await;
            let models: Vec<Value> = shared
                .lock()
                .models
                .iter()
                .map(|m| {
                    let mut entry = ollama_model_entry(m);
                    entry["expires_at"] = json!(EXPIRES_AT);
                    entry["size_vram"] = json!(1);
                    entry
                })
                .collect();
            json_response(StatusCode::OK, &json!({ "models": models }))
        }
        ("POST", "/api/chat") => ollama_infer(shared, req, true).await,
        ("POST", "/api/generate") => ollama_infer(shared, req, false).await,
        ("POST", "/api/embed") => ollama_embed(shared, req).await,
        ("POST", "/api/embeddings") => ollama_embeddings(shared, req).await,
        ("POST", "/api/show") => ollama_show(shared, req),
        ("POST", "/api/pull") => ollama_pull(shared, req),
        ("POST", "/api/push") => ollama_push(shared, req),
        ("POST", "/api/create") => ollama_create(shared, req),
        ("POST", "/api/copy") => ollama_copy(shared, req),
        ("DELETE", "/api/delete") => ollama_delete(shared, req),
        // Ollama (gin) answers unknown routes, and known routes with the
        // wrong method, with a plain-text 404.
        _ => full(StatusCode::NOT_FOUND, "text/plain", "404 page not found"),
    }
}

/// Parses the body and resolves the (known) model named by `model` (or the
/// legacy `name`) field, or returns the error response.
#[allow(clippy::result_large_err)] // the Err is the reply itself; boxing it adds nothing here
fn ollama_model_request(
    shared: &Shared,
    req: &RecordedRequest,
) -> Result<(Value, String), Response<Body>> {
    let (body, model) = ollama_new_model_request(req)?;
    if shared.find_model(&model).is_none() {
        return Err(ollama_not_found(&model));
    }
    Ok((body, model))
}

/// Whether the request asks for streaming; Ollama streams unless `stream: false`.
fn ollama_wants_stream(body: &Value) -> bool {
    body.get("stream").and_then(Value::as_bool).unwrap_or(true)
}

/// `/api/chat` (`chat == true`) and `/api/generate`.
async fn ollama_infer(shared: &Shared, req: &RecordedRequest, chat: bool) -> Response<Body> {
    let (body, model) = match ollama_model_request(shared, req) {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let behaviour = Behaviour::of(&model);
    match behaviour {
        Behaviour::Stall => return stall().await,
        Behaviour::Fail => {
            return ollama_error(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL_FAILURE);
        }
        _ => {}
    }

    // Chunk carrying `content`, or the final chunk when `done`.
    let chunk = |content: &str, done: bool| {
        let mut value = json!({ "model": model, "created_at": CREATED_AT, "done": done });
        if chat {
            value["message"] = json!({ "role": "assistant", "content": content });
        } else {
            value["response"] = json!(content);
        }
        if done {
            let (prompt, completion) = shared.usage();
            let stats = json!({
                "done_reason": "stop",
                "total_duration": 1,
                "load_duration": 1,
                "prompt_eval_count": prompt,
                "prompt_eval_duration": 1,
                "eval_count": completion,
                "eval_duration": 1,
            });
            for (k, v) in stats.as_object().expect("object") {
                value[k] = v.clone();
            }
            if !chat {
                value["context"] = json!([1, 2, 3]);
            }
        }
        value
    };

    if !ollama_wants_stream(&body) {
        return whole_reply(behaviour, chunk(&full_content(&model), true), ollama_error).await;
    }
    let plan = StreamPlan {
        content_type: NDJSON,
        chunks: content_pieces(&model)
            .iter()
            .map(|piece| ndjson_line(&chunk(piece, false)))
            .collect(),
        trailer: vec![ndjson_line(&chunk("", true))],
        error: ndjson_line(&json!({ "error": MIDSTREAM_ERROR })),
    };
    stream_reply(behaviour, plan)
}

async fn ollama_embed(shared: &Shared, req: &RecordedRequest) -> Response<Body> {
    let (body, model) = match ollama_model_request(shared, req) {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let inputs = match embedding_inputs(body.get("input")) {
        Ok(inputs) => inputs,
        Err(msg) => return ollama_error(StatusCode::BAD_REQUEST, &msg),
    };
    let embeddings: Vec<Vec<f32>> = inputs.iter().map(|t| embedding_for(t)).collect();
    let value = json!({
        "model": model,
        "embeddings": embeddings,
        "total_duration": 1,
        "load_duration": 1,
        "prompt_eval_count": 1,
    });
    whole_reply(Behaviour::of(&model), value, ollama_error).await
}

/// Legacy `/api/embeddings` (`prompt` → one `embedding`).
async fn ollama_embeddings(shared: &Shared, req: &RecordedRequest) -> Response<Body> {
    let (body, model) = match ollama_model_request(shared, req) {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let embedding = match body.get("prompt").and_then(Value::as_str) {
        Some(prompt) if !prompt.is_empty() => embedding_for(prompt),
        _ => Vec::new(),
    };
    whole_reply(
        Behaviour::of(&model),
        json!({ "embedding": embedding }),
        ollama_error,
    )
    .await
}

fn ollama_show(shared: &Shared, req: &RecordedRequest) -> Response<Body> {
    let (_, model) = match ollama_model_request(shared, req) {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    // Lets RAG code tell embedding models apart by capability.
    let capability = if model.contains("embed") {
        "embedding"
    } else {
        "completion"
    };
    let (model_info, parameters) = shared
        .lock()
        .show
        .get(&model)
        .cloned()
        .unwrap_or_else(|| (json!({}), String::new()));
    json_response(
        StatusCode::OK,
        &json!({
            "modelfile": format!("# Modelfile generated by \"ollama show\"\nFROM {model}\n"),
            "parameters": parameters,
            "template": "",
            "details": ollama_details(),
            "model_info": model_info,
            "capabilities": [capability],
        }),
    )
}

/// Status lines of a pull/push/create; streamed unless `stream: false`, in
/// which case only the final `{"status":"success"}` is returned.
fn ollama_status_reply(body: &Value, statuses: Vec<Value>) -> Response<Body> {
    if !ollama_wants_stream(body) {
        return json_response(StatusCode::OK, &json!({ "status": "success" }));
    }
    let steps = statuses
        .iter()
        .chain(std::iter::once(&json!({ "status": "success" })))
        .map(|s| Step::Send(ndjson_line(s)))
        .collect();
    streamed(NDJSON, steps)
}

/// Parses the body and takes the model name from the `model` (or legacy
/// `name`) field; the model need not be known.
#[allow(clippy::result_large_err)] // the Err is the reply itself; boxing it adds nothing here
fn ollama_new_model_request(req: &RecordedRequest) -> Result<(Value, String), Response<Body>> {
    let body = parse_object(req).map_err(|msg| ollama_error(StatusCode::BAD_REQUEST, &msg))?;
    let model = body
        .get("model")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ollama_error(StatusCode::BAD_REQUEST, "model is required"))?
        .to_owned();
    Ok((body, model))
}

/// Always succeeds and adds the model to the list.
fn ollama_pull(shared: &Shared, req: &RecordedRequest) -> Response<Body> {
    let (body, model) = match ollama_new_model_request(req) {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    shared.add_model(&model);
    let digest = format!("sha256:{}", digest_for(&model));
    ollama_status_reply(
        &body,
        vec![
            json!({ "status": "pulling manifest" }),
            json!({ "status": "downloading", "digest": digest, "total": 10, "completed": 5 }),
        ],
    )
}

/// Requires a known model.
fn ollama_push(shared: &Shared, req: &RecordedRequest) -> Response<Body> {
    let (body, model) = match ollama_model_request(shared, req) {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let digest = format!("sha256:{}", digest_for(&model));
    ollama_status_reply(
        &body,
        vec![
            json!({ "status": "retrieving manifest" }),
            json!({ "status": "starting upload", "digest": digest, "total": 10 }),
            json!({ "status": "pushing manifest" }),
        ],
    )
}

/// Always succeeds and adds the model to the list.
fn ollama_create(shared: &Shared, req: &RecordedRequest) -> Response<Body> {
    let (body, model) = match ollama_new_model_request(req) {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    shared.add_model(&model);
    ollama_status_reply(
        &body,
        vec![
            json!({ "status": "reading model metadata" }),
            json!({ "status": "creating system layer" }),
            json!({ "status": "writing manifest" }),
        ],
    )
}

fn ollama_copy(shared: &Shared, req: &RecordedRequest) -> Response<Body> {
    let body = match parse_object(req) {
        Ok(body) => body,
        Err(msg) => return ollama_error(StatusCode::BAD_REQUEST, &msg),
    };
    let field = |name: &str| {
        body.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let (Some(source), Some(destination)) = (field("source"), field("destination")) else {
        return ollama_error(
            StatusCode::BAD_REQUEST,
            "source and destination are required",
        );
    };
    if shared.find_model(source).is_none() {
        return ollama_not_found(source);
    }
    shared.add_model(destination);
    empty(StatusCode::OK)
}

fn ollama_delete(shared: &Shared, req: &RecordedRequest) -> Response<Body> {
    let (_, model) = match ollama_model_request(shared, req) {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    shared.lock().models.retain(|m| !same_model(m, &model));
    empty(StatusCode::OK)
}

// ---------------------------------------------------------------------------
// OpenAI API (also Ollama's /v1 compatibility layer)
// ---------------------------------------------------------------------------

fn openai_error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": code } })
}

/// Generic OpenAI error; the type follows the status class.
fn openai_error(status: StatusCode, message: &str) -> Response<Body> {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    json_response(status, &openai_error_body(message, kind, None))
}

fn openai_model_object(id: &str, owned_by: &str) -> Value {
    json!({ "id": id, "object": "model", "created": CREATED, "owned_by": owned_by })
}

async fn openai_route(
    shared: &Shared,
    req: &RecordedRequest,
    path: &str,
    owned_by: &str,
) -> Response<Body> {
    if shared.unauthorized(req) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            &openai_error_body(
                "Incorrect API key provided",
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
        );
    }
    match (req.method.as_str(), path) {
        ("GET", "/models") => {
            shared.list_delay().await;
            let data: Vec<Value> = shared
                .lock()
                .models
                .iter()
                .map(|m| openai_model_object(m, owned_by))
                .collect();
            json_response(StatusCode::OK, &json!({ "object": "list", "data": data }))
        }
        ("GET", p) if p.starts_with("/models/") => {
            let id = &p["/models/".len()..];
            match shared.find_model(id) {
                Some(_) => json_response(StatusCode::OK, &openai_model_object(id, owned_by)),
                None => openai_model_not_found(id),
            }
        }
        ("POST", "/chat/completions") => openai_infer(shared, req, true).await,
        ("POST", "/completions") => openai_infer(shared, req, false).await,
        ("POST", "/embeddings") => openai_embeddings(shared, req).await,
        _ => openai_error(
            StatusCode::NOT_FOUND,
            &format!("Invalid URL ({} {})", req.method, req.path),
        ),
    }
}

fn openai_model_not_found(model: &str) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &openai_error_body(
            &format!("The model `{model}` does not exist"),
            "invalid_request_error",
            Some("model_not_found"),
        ),
    )
}

/// Parses the body and resolves the known `model`, or returns the error response.
#[allow(clippy::result_large_err)] // the Err is the reply itself; boxing it adds nothing here
fn openai_model_request(
    shared: &Shared,
    req: &RecordedRequest,
) -> Result<(Value, String), Response<Body>> {
    let body = parse_object(req).map_err(|msg| {
        openai_error(
            StatusCode::BAD_REQUEST,
            &format!("We could not parse the JSON body of your request: {msg}"),
        )
    })?;
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            openai_error(
                StatusCode::BAD_REQUEST,
                "you must provide a model parameter",
            )
        })?
        .to_owned();
    if shared.find_model(&model).is_none() {
        return Err(openai_model_not_found(&model));
    }
    Ok((body, model))
}

fn openai_usage(shared: &Shared) -> Value {
    let (prompt, completion) = shared.usage();
    let total = match (prompt.as_u64(), completion.as_u64()) {
        (Some(p), Some(c)) => json!(p.saturating_add(c)),
        _ => Value::Null,
    };
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total })
}

/// `/chat/completions` (`chat == true`) and legacy `/completions`.
async fn openai_infer(shared: &Shared, req: &RecordedRequest, chat: bool) -> Response<Body> {
    let (body, model) = match openai_model_request(shared, req) {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let behaviour = Behaviour::of(&model);
    match behaviour {
        Behaviour::Stall => return stall().await,
        Behaviour::Fail => {
            return openai_error(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL_FAILURE);
        }
        _ => {}
    }
    let (id, object) = if chat {
        ("chatcmpl-1", "chat.completion")
    } else {
        ("cmpl-1", "text_completion")
    };

    // OpenAI streams only when asked to.
    if !body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let content = full_content(&model);
        let choice = if chat {
            json!({
                "index": 0,
                "message": { "role": "assistant", "content": content },
                "finish_reason": "stop",
                "logprobs": null,
            })
        } else {
            json!({ "index": 0, "text": content, "finish_reason": "stop", "logprobs": null })
        };
        let value = json!({
            "id": id,
            "object": object,
            "created": CREATED,
            "model": model,
            "choices": [choice],
            "usage": openai_usage(shared),
        });
        return whole_reply(behaviour, value, openai_error).await;
    }

    let chunk_object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = |choices: Value| {
        json!({
            "id": id,
            "object": chunk_object,
            "created": CREATED,
            "model": model,
            "choices": choices,
        })
    };
    let chunks = content_pieces(&model)
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let choice = if chat {
                // Only the first delta carries the role, as OpenAI does.
                let delta = if i == 0 {
                    json!({ "role": "assistant", "content": piece })
                } else {
                    json!({ "content": piece })
                };
                json!({ "index": 0, "delta": delta, "finish_reason": null })
            } else {
                json!({ "index": 0, "text": piece, "finish_reason": null, "logprobs": null })
            };
            sse_event(&chunk(json!([choice])))
        })
        .collect();
    let final_choice = if chat {
        json!({ "index": 0, "delta": {}, "finish_reason": "stop" })
    } else {
        json!({ "index": 0, "text": "", "finish_reason": "stop", "logprobs": null })
    };
    let mut trailer = vec![sse_event(&chunk(json!([final_choice])))];
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if include_usage {
        let mut usage_chunk = chunk(json!([]));
        usage_chunk["usage"] = openai_usage(shared);
        trailer.push(sse_event(&usage_chunk));
    }
    trailer.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let plan = StreamPlan {
        content_type: SSE,
        chunks,
        trailer,
        error: sse_event(&openai_error_body(MIDSTREAM_ERROR, "server_error", None)),
    };
    stream_reply(behaviour, plan)
}

async fn openai_embeddings(shared: &Shared, req: &RecordedRequest) -> Response<Body> {
    let (body, model) = match openai_model_request(shared, req) {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let inputs = match embedding_inputs(body.get("input")) {
        Ok(inputs) if !inputs.is_empty() => inputs,
        _ => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "'input' must be a string or an array of strings",
            );
        }
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            json!({ "object": "embedding", "index": index, "embedding": embedding_for(text) })
        })
        .collect();
    let value = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": 1, "total_tokens": 1 },
    });
    whole_reply(Behaviour::of(&model), value, openai_error).await
}
