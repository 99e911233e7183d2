//! The release binary as a child process, for memory-bound tests: bounds are checked on what
//! users run (peak resident memory, `VmHWM` from `/proc/PID/status`), not assumed.
//!
//! `scripts/test.sh` builds the release binary before the tests; `RAGWAY_RELEASE_BIN`
//! overrides its path.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the release binary; panics with the command to build it when missing.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("RAGWAY_RELEASE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/ragway"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --locked` (scripts/test.sh does) or set \
         RAGWAY_RELEASE_BIN",
        path.display()
    );
    path
}

/// A `ragway serve` child on 127.0.0.1 with a temporary data dir. Killed when dropped.
pub struct Server {
    pub url: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Server {
    /// Starts `ragway serve` with `toml` appended to a generated config (listen address,
    /// data dir, no metrics listener) and waits until `/health` answers.
    pub async fn start(toml: &str, env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = super::gateway::free_port();
        let config = dir.path().join("ragway.toml");
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics-listen = \"\"\ndata-dir = {:?}\nshutdown-grace = \"1s\"\n{toml}\n",
            dir.path().join("data").display().to_string()
        );
        std::fs::write(&config, text).unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RAGWAY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("release binary starts");
        let server = Server {
            url: format!("http://127.0.0.1:{port}"),
            dir,
            child,
        };
        let client = super::fake::http_client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{}/health", server.url)).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "release binary did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// Signs up the first account (the admin) and returns its session token.
    pub async fn signup(&self, client: &reqwest::Client) -> String {
        Self::signup_at(client, &self.url).await
    }

    /// [`Server::signup`] on a server known by its URL.
    pub async fn signup_at(client: &reqwest::Client, url: &str) -> String {
        let r = client
            .post(format!("{url}/api/v1/auths/signup"))
            .json(&serde_json::json!({"name": "a", "email": "admin@example.com", "password": "pw-123456"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "sign-up on the release binary");
        r.json::<serde_json::Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_kib(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:")
    }

    /// Resident memory now (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:")
    }

    /// Context switches of all its threads so far (voluntary and not): how often it woke.
    pub fn context_switches(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .flat_map(|status| {
                status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Kills the process at once (SIGKILL: no clean-up, as in a crash) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} missing in /proc/{pid}/status"))
}
