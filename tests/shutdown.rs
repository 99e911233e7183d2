//! SIGTERM on the real binary: the gateway stops accepting connections at once, lets the
//! requests in flight finish, and exits as soon as none is left; `shutdown-grace` is the
//! most it waits, not a wait.

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
    _dir: tempfile::TempDir,
}

impl Serve {
    /// `extra` is appended to the generated config (tables only).
    async fn start(upstream: &str, grace: &str, extra: &str) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("ragway.toml");
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
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RAGWAY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ragway starts");
        let serve = Serve {
            child,
            url: format!("http://{addr}"),
            addr,
            _dir: dir,
        };
        let client = http_client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{}/health", serve.url)).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "ragway did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        serve
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

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
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
    let body = common::upload::file_body("notes.txt", "text/plain", b"some text to embed", None);
    let r = http_client()
        .post(format!("{}/api/v1/files/", serve.url))
        .bearer_auth(&token)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={}", common::upload::BOUNDARY),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
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
