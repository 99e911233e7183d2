//! The web page's trust boundary: a hostile site the victim visits while signed in to
//! ragway can make the browser send the `token` cookie with forged requests (form posts,
//! `fetch(..., {mode: "no-cors"})`), and anyone can ask for paths under `/ui/`.

use reqwest::Method;
use serde_json::{Value, json};

use super::common::fake::FakeUpstream;
use super::common::gateway::{Gateway, Setup};
use super::common::upload::upload_text;
use super::support::{alive, clear_error};

async fn gateway() -> (Gateway, FakeUpstream) {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    (gw, up)
}

/// A request as the victim's browser sends it: the session cookie, and nothing a page on
/// another site could not add.
fn browser(gw: &Gateway, method: Method, path: &str, token: &str) -> reqwest::RequestBuilder {
    gw.req(method, path, None)
        .header("cookie", format!("theme=dark; token={token}"))
}

async fn has_key(gw: &Gateway, token: &str) -> bool {
    gw.get("/api/v1/auths/api_key", Some(token)).await.status() == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_form_post_with_the_cookie_only_is_refused() {
    let (gw, _up) = gateway().await;
    let admin = gw.admin().await;
    // <form method=post action=".../api/v1/auths/api_key" enctype="text/plain">: the browser
    // attaches the cookie; the page cannot add a header.
    let r = browser(&gw, Method::POST, "/api/v1/auths/api_key", &admin)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    let v = clear_error(r, 403).await;
    assert!(v["detail"].as_str().unwrap().contains("CSRF token missing"));
    assert!(!has_key(&gw, &admin).await, "no key was minted");
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_origin_is_refused_even_with_a_valid_token() {
    let (gw, _up) = gateway().await;
    let admin = gw.admin().await;
    let csrf = gw.app().auth.csrf.token(&admin);
    for origin in [
        "https://evil.example",
        "null",
        // A look-alike host that merely starts with ours.
        &format!("{}.evil.example", gw.url),
    ] {
        let r = browser(&gw, Method::POST, "/api/v1/auths/api_key", &admin)
            .header("origin", origin)
            .header("x-csrf-token", &csrf)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let v = clear_error(r, 403).await;
        assert!(
            v["detail"].as_str().unwrap().contains("Cross-site"),
            "{origin}: {v}"
        );
    }
    assert!(!has_key(&gw, &admin).await);
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_with_a_bad_or_borrowed_csrf_token_is_refused() {
    let (gw, _up) = gateway().await;
    let admin = gw.admin().await;
    let other = gw.user(&admin, "mallory@example.com").await;
    // Guessed, empty, another session's (the attacker's own, which they can read), and the
    // right token for a different secret's derivation (the raw JWT itself).
    let borrowed = gw.app().auth.csrf.token(&other);
    for bad in [
        "0".repeat(64).as_str(),
        "",
        borrowed.as_str(),
        admin.as_str(),
    ] {
        let r = browser(&gw, Method::POST, "/api/v1/auths/api_key", &admin)
            .header("x-csrf-token", bad)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let v = clear_error(r, 403).await;
        assert!(
            v["detail"].as_str().unwrap().contains("does not match"),
            "{bad:?}: {v}"
        );
    }
    // The token in a query string or a second cookie is not the header.
    let csrf = gw.app().auth.csrf.token(&admin);
    let r = gw
        .req(
            Method::POST,
            &format!("/api/v1/auths/api_key?x-csrf-token={csrf}"),
            None,
        )
        .header("cookie", format!("token={admin}; csrf_token={csrf}"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    clear_error(r, 403).await;
    assert!(!has_key(&gw, &admin).await);
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_delete_leaves_the_file_in_place() {
    let (gw, _up) = gateway().await;
    let admin = gw.admin().await;
    let f = upload_text(&gw, &admin, "secret.txt", "quarterly numbers").await;
    let id = f["id"].as_str().unwrap();
    let r = browser(&gw, Method::DELETE, &format!("/api/v1/files/{id}"), &admin)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    clear_error(r, 403).await;
    let r = browser(&gw, Method::DELETE, &format!("/api/v1/files/{id}"), &admin)
        .send()
        .await
        .unwrap();
    clear_error(r, 403).await;
    assert_eq!(
        gw.get(&format!("/api/v1/files/{id}"), Some(&admin))
            .await
            .status(),
        200,
        "file still there"
    );
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_csrf_from_another_site_is_refused() {
    let (gw, _up) = gateway().await;
    gw.admin().await;
    // A hostile page signs the victim's browser in as the attacker (so the victim's uploads
    // land in the attacker's account): the browser marks it cross-site.
    for (name, value) in [
        ("sec-fetch-site", "cross-site"),
        ("origin", "https://evil.example"),
    ] {
        let r = gw
            .req(Method::POST, "/api/v1/auths/signin", None)
            .header(name, value)
            .header("content-type", "text/plain")
            .body(r#"{"email":"admin@example.com","password":"pw-123456"}"#)
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("set-cookie").is_none(), "no session issued");
        clear_error(r, 403).await;
    }
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_chat_completion_spends_nothing_upstream() {
    let (gw, up) = gateway().await;
    let admin = gw.admin().await;
    let r = browser(&gw, Method::POST, "/api/chat/completions", &admin)
        .header("content-type", "text/plain")
        .body(r#"{"model":"m:latest","messages":[{"role":"user","content":"spend"}]}"#)
        .send()
        .await
        .unwrap();
    clear_error(r, 403).await;
    assert!(up.requests_to("/api/chat").is_empty() && up.requests_to("/v1/chat").is_empty());
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_under_ui_finds_nothing() {
    use tokio::io::AsyncWriteExt;
    let (gw, _up) = gateway().await;
    for path in [
        "/ui/..%2f..%2fCargo.toml",
        "/ui/%2e%2e/%2e%2e/Cargo.toml",
        "/ui/mod.rs",
        "/ui/app.js/../../Cargo.toml",
        "/ui/%00app.js",
    ] {
        // Raw bytes: a client library would normalise the dots away before sending.
        let addr = gw.url.strip_prefix("http://").unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let a = super::common::raw::read_answer(&mut s)
            .await
            .unwrap_or_else(|| panic!("{path}: no answer"));
        assert!(
            a.status == 404 || a.status == 400,
            "{path}: {} {}",
            a.status,
            a.body
        );
        assert!(!a.body.contains("[package]"), "{path} leaked a file");
        let v: Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(v["error"]["message"], v["detail"], "{path}");
    }
    alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_session_cookie_cannot_write_with_its_old_token() {
    let (gw, _up) = gateway().await;
    let admin = gw.admin().await;
    let csrf = gw.app().auth.csrf.token(&admin);
    let r = browser(&gw, Method::POST, "/api/v1/auths/signout", &admin)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The token still matches the cookie, but the session behind it is gone.
    let r = browser(&gw, Method::POST, "/api/v1/auths/api_key", &admin)
        .header("x-csrf-token", &csrf)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    clear_error(r, 401).await;
    alive(&gw).await;
}
