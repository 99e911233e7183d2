//! The `ragway` binary: config validation, user and key commands, and `serve` with a clean
//! SIGTERM shutdown and logs free of secrets.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fake::{FakeUpstream, http_client};
use common::gateway::free_port;

fn ragway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ragway"));
    // Keep the process environment from leaking Open WebUI variables into the test.
    for v in [
        "DATABASE_URL",
        "OLLAMA_BASE_URL",
        "OLLAMA_BASE_URLS",
        "WEBUI_SECRET_KEY",
        "ENV",
        "DATA_DIR",
        "PORT",
        "HOST",
    ] {
        c.env_remove(v);
    }
    c
}

#[test]
fn every_shipped_config_file_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = ragway().arg("check-config").arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn invalid_config_is_rejected_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[timeouts]\nconect = \"5s\"\n").unwrap();
    let out = ragway().arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("conect"), "{err}");
    std::fs::write(&bad, "[[ollama]]\nurl = \"localhost:11434\"\n").unwrap();
    let out = ragway().arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ollama[0]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_key_serve_and_graceful_shutdown() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let password = "very-secret-pw-42";

    let out = ragway()
        .args([
            "user",
            "add",
            "--data-dir",
            &data,
            "--email",
            "ops@example.com",
            "--role",
            "admin",
        ])
        .env("RAGWAY_PASSWORD", password)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ragway()
        .args([
            "key",
            "create",
            "--data-dir",
            &data,
            "--user",
            "ops@example.com",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("sk-"), "{key}");
    let out = ragway()
        .args([
            "key",
            "create",
            "--data-dir",
            &data,
            "--user",
            "nobody@example.com",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let port = free_port();
    let mport = free_port();
    let mut child = ragway()
        .args(["serve", "--data-dir", &data, "--ollama-url", &up.url])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
        ])
        .env("RAGWAY_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = http_client();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("{url}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client
        .get(format!("{url}/api/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let signin = client
        .post(format!("{url}/api/v1/auths/signin"))
        .json(&serde_json::json!({"email": "ops@example.com", "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(signin.status(), 200);
    let jwt = signin.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = client
        .post(format!("{url}/ollama/api/chat"))
        .header("x-api-key", &key)
        .json(&serde_json::json!({"model": "m:latest", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();

    // SIGTERM: graceful shutdown, exit status 0, in bounded time.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "exit status {exit:?}");
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("request"), "access log present:\n{logs}");
    for secret in [key.as_str(), &key[3..], password, jwt.as_str()] {
        assert!(
            !logs.contains(secret),
            "secret {secret:?} leaked into logs:\n{logs}"
        );
    }
}
