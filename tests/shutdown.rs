//! SIGTERM on the real binary: the gateway stops accepting connections at once, lets the
//! requests in flight finish, and exits as soon as none is left; `shutdown-grace` is the
//! most it waits, not a wait. SIGQUIT with a `serve --upgrade` waiting: the sockets and
//! the database go to the new process without a failed request.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::fake::http_client;
use common::faulty::{Fault, FaultyUpstream, MODEL};
use common::gateway::free_port;

/// A `ragway serve` child (the test build of the binary). Killed when dropped.
struct Serve {
    child: Child,
    url: String,
    addr: String,
    config: std::path::PathBuf,
    data: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Serve {
    /// `extra` is appended to the generated config (tables only).
    async fn start(upstream: &str, grace: &str, extra: &str) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("ragway.toml");
        let data = dir.path().join("data");
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\nmetrics-listen = \"\"\ndata-dir = {:?}\nshutdown-grace = \"{grace}\"\n\
                 [auth]\nadmin-email = \"ops@example.com\"\nadmin-password = \"pw-123456\"\n\
                 [[ollama]]\nurl = \"{upstream}\"\n[timeouts]\nread-idle = \"60s\"\n{extra}\n",
                dir.path().join("data").display().to_string()
            ),
        )
        .unwrap();
        let child = Self::spawn(&config, false);
        let serve = Serve {
            child,
            url: format!("http://{addr}"),
            addr,
            config,
            data,
            _dir: Some(dir),
        };
        serve.wait_healthy().await;
        serve
    }

    fn spawn(config: &std::path::Path, upgrade: bool) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ragway"));
        for v in [
            "OLLAMA_BASE_URL",
            "OLLAMA_BASE_URLS",
            "WEBUI_SECRET_KEY",
            "ENV",
            "DATA_DIR",
            "PORT",
            "HOST",
        ] {
            cmd.env_remove(v);
        }
        cmd.arg("serve").arg("--config").arg(config);
        if upgrade {
            cmd.arg("--upgrade");
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RAGWAY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ragway starts")
    }

    /// Starts `serve --upgrade` on the same config and data, and waits until it listens on
    /// the upgrade socket (the old process is not signalled).
    async fn start_upgrade(&self) -> Serve {
        let sock = self.data.join("upgrade.sock");
        let _ = std::fs::remove_file(&sock);
        let child = Self::spawn(&self.config, true);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "no upgrade socket");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Serve {
            child,
            url: self.url.clone(),
            addr: self.addr.clone(),
            config: self.config.clone(),
            data: self.data.clone(),
            _dir: None,
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn wait_healthy(&self) {
        let client = http_client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{}/health", self.url)).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "ragway did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn token(&self) -> String {
        let r = http_client()
            .post(format!("{}/api/v1/auths/signin", self.url))
            .json(&json!({"email": "ops@example.com", "password": "pw-123456"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Uploads a small text file for background processing; returns its id.
    async fn upload(&self, token: &str) -> String {
        common::upload::upload_background(
            &http_client(),
            &self.url,
            token,
            "notes.txt",
            "some text to embed",
        )
        .await
    }

    fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Waits (at most `within`) for the process to exit; returns when it did.
    async fn exited(&mut self, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status:?}");
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "still running {within:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stream(&self, token: &str) -> reqwest::Response {
        let r = http_client()
            .post(format!("{}/ollama/api/chat", self.url))
            .bearer_auth(token)
            .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the rest of a body: `Ok` when it ended cleanly, `Err` when it was cut.
async fn rest(mut r: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut all = Vec::new();
    loop {
        match r.chunk().await {
            Ok(Some(c)) => all.extend_from_slice(&c),
            Ok(None) => return Ok(all),
            Err(e) => return Err(e),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_exits_at_once_on_sigterm_not_after_the_grace() {
    let up = FaultyUpstream::start(Fault::Hang).await;
    let mut serve = Serve::start(&up.url, "30s", "").await;
    // A keep-alive connection left idle must not hold the exit back either.
    let client = http_client();
    assert_eq!(
        client
            .get(format!("{}/health", serve.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let sent = Instant::now();
    serve.sigterm();
    // Well under the 30 s grace: the process does not wait the grace out.
    let at = serve.exited(Duration::from_secs(10)).await;
    assert!(at - sent < Duration::from_secs(10));
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_flight_finishes_then_the_process_exits() {
    let up = FaultyUpstream::start(Fault::Slow {
        chunks: 8,
        every: Duration::from_millis(400),
    })
    .await;
    let mut serve = Serve::start(&up.url, "60s", "").await;
    let token = serve.token().await;
    let mut r = serve.stream(&token).await;
    let first = r.chunk().await.unwrap().expect("a first chunk");
    assert!(!first.is_empty());
    let sent = Instant::now();
    serve.sigterm();
    // New connections are refused while the stream goes on.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&serve.addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = tokio::time::timeout(Duration::from_secs(60), rest(r))
        .await
        .expect("the stream ends")
        .expect("the stream in flight finishes whole");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("\"done\":true"), "complete stream: {text}");
    // The process exits once the stream is done, long before the 60 s grace.
    let at = serve.exited(Duration::from_secs(20)).await;
    assert!(
        at - sent < Duration::from_secs(40),
        "exit {:?} after SIGTERM",
        at - sent
    );
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_grace_is_cut_when_the_grace_ends() {
    let up = FaultyUpstream::start(Fault::Endless {
        every: Duration::from_millis(200),
    })
    .await;
    let mut serve = Serve::start(&up.url, "2s", "").await;
    let token = serve.token().await;
    let mut r = serve.stream(&token).await;
    r.chunk().await.unwrap().expect("a first chunk");
    let sent = Instant::now();
    serve.sigterm();
    let body = tokio::time::timeout(Duration::from_secs(60), rest(r))
        .await
        .expect("the stream ends");
    assert!(
        body.is_err(),
        "a stream cut by shutdown must not look whole"
    );
    let at = serve.exited(Duration::from_secs(30)).await;
    let took = at - sent;
    // The grace is honoured (the stream ran on for it), then the process exits.
    assert!(took >= Duration::from_millis(1500), "exited after {took:?}");
    assert!(took < Duration::from_secs(30), "exited after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_file_processing_does_not_hold_the_exit_back() {
    // The embedding engine is an upstream that never answers: the upload's background
    // processing is stuck on it when SIGTERM arrives. It is not a request in flight, so it
    // must not keep the process alive (it is processed again at the next start).
    let up = FaultyUpstream::start(Fault::Hang).await;
    let extra = format!(
        "[embedding]\nengine = \"ollama\"\nurl = \"{}\"\nmodel = \"m\"",
        up.url
    );
    let mut serve = Serve::start(&up.url, "30s", &extra).await;
    let token = serve.token().await;
    serve.upload(&token).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while up.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the embedding request never came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = Instant::now();
    serve.sigterm();
    let at = serve.exited(Duration::from_secs(10)).await;
    assert!(at - sent < Duration::from_secs(10));
}

/// What the load generator saw.
#[derive(Default)]
struct Tally {
    ok: std::sync::atomic::AtomicUsize,
    failed: std::sync::Mutex<Vec<String>>,
    /// Requests whose connection was closed under them at the switch (see the upgrade test).
    dropped: std::sync::atomic::AtomicUsize,
}

/// Non-streaming authenticated calls in a loop until `stop`: the session (JWT, read from the
/// database) and the model list (API key), on keep-alive connections and on fresh ones.
async fn load(
    url: String,
    token: String,
    key: String,
    fresh: bool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tally: std::sync::Arc<Tally>,
) {
    use std::sync::atomic::Ordering;
    let mut client = http_client();
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        if fresh {
            client = http_client();
        }
        let (path, cred) = if i.is_multiple_of(2) {
            ("/api/v1/auths/", &token)
        } else {
            ("/api/models", &key)
        };
        i += 1;
        match client
            .get(format!("{url}{path}"))
            .bearer_auth(cred)
            .timeout(Duration::from_secs(30))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => match r.bytes().await {
                Ok(_) => {
                    tally.ok.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => tally
                    .failed
                    .lock()
                    .unwrap()
                    .push(format!("{path}: body {e}")),
            },
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                tally
                    .failed
                    .lock()
                    .unwrap()
                    .push(format!("{path}: {status} {body}"));
            }
            // A connection closed under a request: counted apart to report it, and must
            // not happen (see `DeferredCleanup` in src/server.rs).
            Err(e) if e.is_request() && !e.is_timeout() => {
                tally.dropped.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => tally.failed.lock().unwrap().push(format!("{path}: {e:?}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_under_load_fails_no_request_and_finishes_every_stream() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let up = FaultyUpstream::start(Fault::Slow {
        chunks: 10,
        every: Duration::from_millis(300),
    })
    .await;
    let mut old = Serve::start(&up.url, "60s", "").await;
    let token = old.token().await;
    let r = http_client()
        .post(format!("{}/api/v1/auths/api_key", old.url))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let key = r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    for fresh in [false, false, true, true] {
        workers.push(tokio::spawn(load(
            old.url.clone(),
            token.clone(),
            key.clone(),
            fresh,
            stop.clone(),
            tally.clone(),
        )));
    }
    // Long streams in flight across the hand-over (3 s each).
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut r = old.stream(&key).await;
        let first = r.chunk().await.unwrap().expect("a first chunk");
        assert!(!first.is_empty());
        streams.push(tokio::spawn(rest(r)));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut new = old.start_upgrade().await;
    let before = tally.ok.load(Ordering::Acquire);
    // The marker exists from the moment the new process holds the sockets (the old one
    // then stops accepting) until it serves: watched every millisecond from another thread.
    let marker = new.data.join("upgrade.taken");
    let watcher = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut appeared = None;
        while Instant::now() < deadline {
            match (appeared, marker.exists()) {
                (None, true) => appeared = Some(Instant::now()),
                (Some(a), false) => return Some((a, Instant::now())),
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    });
    let sent = Instant::now();
    old.signal("-QUIT");
    // The first answer from a fresh connection after the signal: the new process serves.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    // Probes on fresh connections all along: every one is answered, first by the old
    // process (until the new one holds the sockets: the marker appears), then, after a
    // pause in which connections wait in the shared accept queue while the database
    // changes hands, by the new one (the marker is gone).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut probe_dropped = 0;
    while !watcher.is_finished() {
        assert!(Instant::now() < deadline, "the upgrade did not finish");
        match fresh
            .get(format!("{}/api/v1/auths/", new.url))
            .bearer_auth(&token)
            .send()
            .await
        {
            Ok(r) => assert_eq!(r.status(), 200, "request during the upgrade"),
            Err(e) if e.is_request() => probe_dropped += 1,
            Err(e) => panic!("request during the upgrade: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (taken, serving) = watcher
        .join()
        .unwrap()
        .expect("the new process took the sockets and then served");
    eprintln!(
        "upgrade: sockets taken {:?} after SIGQUIT, new process serving {:?} after SIGQUIT \
         (nobody accepting for {:?})",
        taken - sent,
        serving - sent,
        serving - taken
    );
    // Seconds, not milliseconds: a bound that holds on a loaded machine, not a benchmark.
    assert!(
        serving - sent < Duration::from_secs(10),
        "the new process was slow to serve"
    );

    for s in streams {
        let body = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("the stream ends")
            .unwrap()
            .expect("a stream in flight finishes whole across the upgrade");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("\"done\":true"), "complete stream: {text}");
    }
    // The old process exits by itself once its streams are done.
    old.exited(Duration::from_secs(60)).await;
    // Load goes on against the new process alone.
    let at_exit = tally.ok.load(Ordering::Acquire);
    let deadline = Instant::now() + Duration::from_secs(60);
    while tally.ok.load(Ordering::Acquire) < at_exit + 50 {
        assert!(
            Instant::now() < deadline,
            "no answers after the old process exited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Release);
    for w in workers {
        w.await.unwrap();
    }
    let failed = tally.failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let dropped = tally.dropped.load(Ordering::Acquire) + probe_dropped;
    eprintln!(
        "upgrade: {} answered, {dropped} requests met a connection closed at the switch",
        tally.ok.load(Ordering::Acquire)
    );
    assert_eq!(
        dropped, 0,
        "requests failed on a closed connection at the switch"
    );
    assert!(tally.ok.load(Ordering::Acquire) > before);
    // A stream through the new process, and the new process still serves the same data.
    let r = new.stream(&key).await;
    let body = rest(r).await.expect("a stream through the new process");
    assert!(String::from_utf8_lossy(&body).contains("\"done\":true"));
    // Usage of the streams that ended in the old process, after it had released the
    // database, reached the new one: 3 streams there, 1 here.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http_client()
            .get(format!("{}/api/v1/usage", new.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let rows = r.json::<Value>().await.unwrap();
        let requests: u64 = rows["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|row| row["requests"].as_u64())
            .sum();
        if requests == 4 {
            break;
        }
        assert!(
            requests < 4 && Instant::now() < deadline,
            "metered requests across the upgrade: {rows}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(new.child.try_wait().unwrap().is_none(), "new process alive");
}

/// An Ollama embedding endpoint whose first request never gets an answer (the file is being
/// processed when the upgrade comes) and whose later ones are answered.
async fn embed_once_stuck() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head_end, length) = loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (i + 4, length);
                        }
                    };
                    while buf.len() < head_end + length {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    if seen.fetch_add(1, std::sync::atomic::Ordering::AcqRel) == 0 {
                        // Hold the connection open without answering.
                        std::future::pending::<()>().await;
                    }
                    let body: Value = serde_json::from_slice(&buf[head_end..head_end + length])
                        .unwrap_or_default();
                    let inputs = match &body["input"] {
                        Value::Array(a) => a.len(),
                        _ => 1,
                    };
                    let answer = json!({
                        "model": "m",
                        "embeddings": vec![vec![0.5_f32, 0.25, 0.125, 0.0625]; inputs],
                    })
                    .to_string();
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_being_processed_at_an_upgrade_is_completed_by_the_new_process() {
    let up = FaultyUpstream::start(Fault::Hang).await;
    let embed = embed_once_stuck().await;
    let extra = format!("[embedding]\nengine = \"ollama\"\nurl = \"{embed}\"\nmodel = \"m\"");
    let mut old = Serve::start(&up.url, "30s", &extra).await;
    let token = old.token().await;
    let id = old.upload(&token).await;
    // Give the old process's worker time to get stuck on the first embedding request.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = old.start_upgrade().await;
    old.signal("-QUIT");
    old.exited(Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http_client()
            .get(format!("{}/api/v1/files/{id}/process/status", new.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let status = r.json::<Value>().await.unwrap()["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if status == "completed" {
            break;
        }
        assert_ne!(status, "failed", "the file failed in the new process");
        assert!(
            Instant::now() < deadline,
            "file still {status} after the upgrade"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
