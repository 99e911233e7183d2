//! The web page's server side: the embedded assets and their headers, the session and CSRF
//! cookies the page relies on, and `/docs` without its trailing slash.

mod common;

use reqwest::{Method, Response};
use serde_json::{Value, json};

use common::fake::{FakeUpstream, dead_url};
use common::gateway::{Gateway, Setup, assert_error};

fn set_cookies(r: &Response) -> Vec<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

fn cookie_value(cookies: &[String], name: &str) -> Option<String> {
    cookies.iter().find_map(|c| {
        c.split(';')
            .next()?
            .strip_prefix(&format!("{name}="))
            .map(String::from)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_and_assets_are_embedded_with_a_strict_policy() {
    let gw = Setup::new().ollama(&dead_url()).start().await;
    let mut total = 0;
    for (path, ct) in [
        ("/", "text/html"),
        ("/ui", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/icon.svg", "image/svg+xml"),
    ] {
        let r = gw.get(path, None).await;
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(ct),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["x-frame-options"], "DENY");
        let body = r.bytes().await.unwrap();
        if path != "/ui" && path != "/ui/" {
            total += body.len();
        }
    }
    // The whole page (HTML, script, style, icon) stays small; README states the figure.
    assert!(total < 48 * 1024, "page is {total} bytes");
    assert_error(gw.get("/ui/nope.js", None).await, 404, "Not Found").await;
    // Writing to the page's paths is not a thing.
    let r = gw.req(Method::POST, "/", None).send().await.unwrap();
    assert_error(r, 405, "not allowed").await;
}

async fn signup(gw: &Gateway, email: &str) -> (Value, Vec<String>) {
    let r = gw
        .post(
            "/api/v1/auths/signup",
            None,
            json!({"name": "n", "email": email, "password": "pw-123456"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let cookies = set_cookies(&r);
    (r.json().await.unwrap(), cookies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_writes_with_the_cookie_and_its_csrf_token() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let (session, cookies) = signup(&gw, "admin@example.com").await;
    let token = cookie_value(&cookies, "token").expect("token cookie");
    assert_eq!(token, session["token"].as_str().unwrap());
    let csrf = cookie_value(&cookies, "csrf_token").expect("csrf cookie");
    let token_cookie = cookies.iter().find(|c| c.starts_with("token=")).unwrap();
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(token_cookie.contains(attr), "{token_cookie}");
    }
    let csrf_cookie = cookies
        .iter()
        .find(|c| c.starts_with("csrf_token="))
        .unwrap();
    assert!(
        !csrf_cookie.contains("HttpOnly"),
        "the page must read it: {csrf_cookie}"
    );

    let as_page = |m: Method, path: &str| {
        gw.req(m, path, None)
            .header("cookie", format!("token={token}; csrf_token={csrf}"))
            .header("x-csrf-token", &csrf)
            .header("origin", &gw.url)
            .header("sec-fetch-site", "same-origin")
    };
    let r = as_page(Method::POST, "/api/v1/auths/api_key")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = as_page(Method::DELETE, "/api/v1/auths/api_key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A page loaded with only the session cookie gets its CSRF token back.
    let r = gw
        .req(Method::GET, "/api/v1/auths/", None)
        .header("cookie", format!("token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        cookie_value(&set_cookies(&r), "csrf_token").as_deref(),
        Some(csrf.as_str())
    );
    // Bearer clients never get cookies they did not ask for, and need no CSRF token.
    let r = gw.get("/api/v1/auths/", Some(&token)).await;
    assert!(set_cookies(&r).is_empty());
    let r = gw
        .post("/api/v1/auths/api_key", Some(&token), json!({}))
        .await;
    assert_eq!(r.status(), 200);

    // An admin adding a user keeps their own session cookie.
    let r = gw
        .post(
            "/api/v1/auths/add",
            Some(&token),
            json!({"name": "u", "email": "u@example.com", "password": "pw-123456", "role": "user"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(set_cookies(&r).is_empty(), "add user sets no cookie");

    // Sign-out clears both cookies.
    let r = as_page(Method::POST, "/api/v1/auths/signout")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cleared = set_cookies(&r);
    for name in ["token", "csrf_token"] {
        let c = cleared
            .iter()
            .find(|c| c.starts_with(&format!("{name}=;")))
            .unwrap_or_else(|| panic!("{name} not cleared: {cleared:?}"));
        assert!(c.contains("Max-Age=0"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_without_trailing_slash_redirects_to_the_working_page() {
    let dev = Setup::new()
        .ollama(&dead_url())
        .env("ENV", "dev")
        .start()
        .await;
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects
        .get(format!("{}/docs", dev.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    // Relative, so it also works when a proxy mounts ragway under a prefix.
    assert_eq!(r.headers()["location"], "docs/");
    let r = no_redirects
        .get(format!("{}/docs/", dev.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("./swagger-ui.css"));
    // Where those relative URLs land from /docs/.
    assert_eq!(dev.get("/docs/swagger-ui.css", None).await.status(), 200);
    // Production: no docs, no redirect.
    let prod = Setup::new().ollama(&dead_url()).start().await;
    let r = no_redirects
        .get(format!("{}/docs", prod.url))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "Not Found").await;
}
