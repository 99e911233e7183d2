//! The web page in a real headless browser: Debian's `chromium`, driven through
//! `chromedriver` with a small `WebDriver` client (plain HTTP + JSON, no network beyond
//! 127.0.0.1). Runs the scenario a new team goes through: the first user signs up (admin),
//! a second signs up and waits for approval, the admin approves them, creates an API key,
//! uploads a file and waits for `completed`, makes a collection, asks a question and sees
//! the file as a source; `/docs` and `/docs/` both render Swagger UI.
//!
//! Screenshots of each page go to `$RAGWAY_SCREENSHOTS` when set (the README's come from
//! `RAGWAY_SCREENSHOTS=docs/screenshots`), else to a temporary directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use common::fake::FakeUpstream;
use common::gateway::{Setup, free_port};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Generous: CI runs many test binaries at once on two cores.
const WAIT: Duration = Duration::from_secs(90);
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One chromedriver process and one browser session; both end on drop.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Best effort: ends the browser, then the driver (only processes this test started).
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = common::fake::http_client()
                    .delete(url)
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await;
            });
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start() -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: install Debian's chromium and chromium-driver (scripts/setup.sh does)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = common::fake::http_client();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = http.get(format!("{base}/status")).send().await
                && r.status() == 200
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1100,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
            "timeouts": {"pageLoad": 60_000, "script": 60_000, "implicit": 0},
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .timeout(WAIT)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {r}"))
            .to_string();
        Browser {
            http,
            base,
            session,
            driver,
            _profile: profile,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, &url).timeout(WAIT);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(status.is_success(), "WebDriver {path}: {status} {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Runs a script in the page and returns its value.
    async fn js(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Waits until `script` returns a truthy value; returns it.
    async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.js(script).await;
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let err = self
                    .js("return document.getElementById('error') ? document.getElementById('error').textContent : ''")
                    .await;
                panic!("timed out waiting for {what} (page error: {err})");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// The first element matching a CSS selector, once it is there and visible.
    async fn find(&self, css: &str) -> String {
        let check = format!(
            "const e = document.querySelector({css:?}); return !!(e && e.offsetParent !== null);"
        );
        self.until(css, &check).await;
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("{css}: {v}"))
            .to_string()
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Types into an input, as a user would (key events, not a script setting the value).
    async fn type_in(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            Some(json!({})),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await;
        self.js(&format!(
            "return document.querySelector({css:?}).textContent.trim();"
        ))
        .await
        .as_str()
        .unwrap()
        .to_string()
    }

    async fn accept_alert(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let url = format!("{}/session/{}/alert/accept", self.base, self.session);
            let r = self.http.post(&url).json(&json!({})).send().await.unwrap();
            if r.status().is_success() {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "no dialog appeared");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn screenshot(&self, dir: &Path, name: &str) {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64_decode(v.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .expect("base64 character");
        acc = (acc << 6) | u32::try_from(v).unwrap();
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap());
        }
    }
    out
}

fn screenshot_dir(tmp: &tempfile::TempDir) -> PathBuf {
    match std::env::var_os("RAGWAY_SCREENSHOTS") {
        Some(d) => {
            // Relative to the repository, where the README's images live.
            let d = Path::new(env!("CARGO_MANIFEST_DIR")).join(d);
            std::fs::create_dir_all(&d).unwrap();
            d
        }
        None => tmp.path().to_path_buf(),
    }
}

async fn sign_up(b: &Browser, name: &str, email: &str) {
    b.type_in("#signup-name", name).await;
    b.type_in("#signup-email", email).await;
    b.type_in("#signup-password", "pw-123456").await;
    b.click("#signup-form button[type=submit]").await;
}

async fn sign_out(b: &Browser) {
    b.click("#signout").await;
    b.find("#signin-form").await;
}

// One scenario, in order: each step needs the state the previous ones made.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_uses_the_web_page_in_a_real_browser() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .ollama(&up.url)
        .env("ENV", "dev")
        .env("DEFAULT_USER_ROLE", "pending")
        .start()
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let shots = screenshot_dir(&tmp);
    let b = Browser::start().await;

    // 1. The first user signs up and is the admin.
    b.goto(&format!("{}/", gw.url)).await;
    b.find("#signin-form").await;
    b.screenshot(&shots, "signin").await;
    sign_up(&b, "Ada", "ada@example.com").await;
    assert_eq!(b.text("#me-role").await, "admin");

    // 2. A second user signs up and sees the waiting page.
    sign_out(&b).await;
    sign_up(&b, "Bob", "bob@example.com").await;
    let waiting = b.text("#view-pending").await;
    assert!(
        waiting.contains("waiting for an administrator"),
        "{waiting}"
    );
    assert!(
        b.js("return document.getElementById('nav-users').hidden")
            .await
            == json!(true)
    );
    b.screenshot(&shots, "pending").await;
    sign_out(&b).await;

    // 3. The admin signs in and approves Bob.
    b.type_in("#signin-email", "ada@example.com").await;
    b.type_in("#signin-password", "pw-123456").await;
    b.click("#signin-form button[type=submit]").await;
    b.find("#view-account").await;
    b.goto(&format!("{}/#users", gw.url)).await;
    let bob = "tr[data-user-email=\"bob@example.com\"]";
    b.find(&format!("{bob} button[data-action=approve]")).await;
    b.screenshot(&shots, "users").await;
    b.click(&format!("{bob} button[data-action=approve]")).await;
    b.until(
        "Bob approved",
        &format!("const s = document.querySelector('{bob} select'); return s && s.value === 'user' && !document.querySelector('{bob} button[data-action=approve]');"),
    )
    .await;
    let role = gw
        .app()
        .store()
        .user_by_email("bob@example.com")
        .unwrap()
        .unwrap()
        .role;
    assert_eq!(role.as_str(), "user", "the store agrees");

    // 4. An API key, shown once, that works.
    b.goto(&format!("{}/#account", gw.url)).await;
    b.click("#key-create").await;
    let key = b
        .until(
            "the new key",
            "return document.getElementById('key-value').value",
        )
        .await
        .as_str()
        .unwrap()
        .to_string();
    assert!(key.starts_with("sk-"), "{key}");
    assert_eq!(gw.get("/api/models", Some(&key)).await.status(), 200);
    b.until(
        "key info",
        "return document.getElementById('key-info').textContent.includes('sk-')",
    )
    .await;
    b.screenshot(&shots, "account").await;

    // 5. Upload a file and follow its processing to `completed`.
    let doc = tmp.path().join("handbook.txt");
    std::fs::write(
        &doc,
        "The reactor coolant is heavy water. Visitors sign in at the front desk.",
    )
    .unwrap();
    b.goto(&format!("{}/#files", gw.url)).await;
    let input = b.find("#upload-input").await;
    b.cmd(
        reqwest::Method::POST,
        &format!("/element/{input}/value"),
        Some(json!({"text": doc.display().to_string()})),
    )
    .await;
    b.click("#upload-form button[type=submit]").await;
    b.find("#uploads li[data-status=completed]").await;
    b.until(
        "the file listed as completed",
        "const r = document.querySelector('#file-rows tr[data-file-id]'); return r && r.textContent.includes('completed');",
    )
    .await;
    b.screenshot(&shots, "files").await;

    // 6. A collection with that file.
    b.goto(&format!("{}/#collections", gw.url)).await;
    b.type_in("#kb-name", "Handbook").await;
    b.type_in("#kb-description", "Site rules").await;
    b.click("#kb-form button[type=submit]").await;
    b.find("article[data-kb-id] form button[type=submit]:not([disabled])")
        .await;
    b.click("article[data-kb-id] form button[type=submit]")
        .await;
    b.until(
        "the file in the collection",
        "const a = document.querySelector('article[data-kb-id] ul'); return a && a.textContent.includes('handbook.txt');",
    )
    .await;
    b.screenshot(&shots, "collections").await;

    // 7. Ask a question against the collection and see the file as a source.
    b.goto(&format!("{}/#try", gw.url)).await;
    b.until(
        "models and collections",
        "return document.querySelectorAll('#ask-model option').length > 0 && document.querySelectorAll('#ask-collection option').length > 0;",
    )
    .await;
    b.type_in("#ask-question", "What is the reactor coolant?")
        .await;
    b.click("#ask-form button[type=submit]").await;
    b.find("#sources li.source").await;
    let sources = b.text("#sources").await;
    assert!(sources.contains("handbook.txt"), "{sources}");
    assert!(sources.contains("heavy water"), "{sources}");
    assert!(!b.text("#answer").await.is_empty());
    let sent = up.requests();
    assert!(
        sent.iter().any(|r| r.text().contains("heavy water")),
        "the upstream got the retrieved context"
    );
    b.screenshot(&shots, "try").await;

    // 8. Sign out from the page: the cookie session is revoked.
    sign_out(&b).await;
    b.goto(&format!("{}/#users", gw.url)).await;
    b.find("#signin-form").await;

    // 9. Swagger UI renders at /docs and /docs/ (assets and document served offline).
    for path in ["/docs", "/docs/"] {
        b.goto(&format!("{}{path}", gw.url)).await;
        b.until(
            &format!("Swagger UI at {path}"),
            "return document.querySelectorAll('.swagger-ui .opblock').length > 10 && document.querySelector('.swagger-ui .info .title') !== null;",
        )
        .await;
        let url = b.js("return location.pathname").await;
        assert_eq!(url, json!("/docs/"), "{path}");
        let title = b.text(".swagger-ui .info .title").await;
        assert!(title.contains("ragway"), "{title}");
    }
    b.screenshot(&shots, "docs").await;
    // The revoke path of the account page, once more signed in.
    b.goto(&format!("{}/", gw.url)).await;
    b.type_in("#signin-email", "ada@example.com").await;
    b.type_in("#signin-password", "pw-123456").await;
    b.click("#signin-form button[type=submit]").await;
    b.find("#view-account").await;
    b.click("#key-revoke").await;
    b.accept_alert().await;
    b.until(
        "the key revoked",
        "return document.getElementById('key-info').textContent === 'No API key.'",
    )
    .await;
    assert_eq!(gw.get("/api/models", Some(&key)).await.status(), 401);
}
