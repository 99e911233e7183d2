//! Authentication: sign-up/sign-in, sessions, API keys, roles and rate limits.

mod common;

use common::fake::{FakeUpstream, dead_url};
use common::gateway::{Setup, assert_error};
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_user_is_admin_then_default_role() {
    let gw = Setup::new().ollama(&dead_url()).start().await;
    let admin = gw.signup("Boss@Example.com").await;
    assert_eq!(admin["role"], "admin");
    assert_eq!(admin["email"], "boss@example.com", "emails are lowercased");
    assert_eq!(admin["token_type"], "Bearer");
    for k in [
        "token",
        "expires_at",
        "id",
        "name",
        "profile_image_url",
        "permissions",
    ] {
        assert!(!admin[k].is_null(), "{k} in session response");
    }
    let second = gw.signup("second@example.com").await;
    assert_eq!(second["role"], "pending");
    let r = gw
        .post(
            "/api/v1/auths/signup",
            None,
            json!({"name": "x", "email": "SECOND@example.com", "password": "p"}),
        )
        .await;
    assert_error(r, 400, "already registered").await;
    let r = gw
        .post(
            "/api/v1/auths/signup",
            None,
            json!({"name": "x", "email": "not-an-email", "password": "p"}),
        )
        .await;
    assert_error(r, 400, "Invalid email").await;
    let r = gw
        .post("/api/v1/auths/signup", None, json!({"name": "x"}))
        .await;
    assert_error(r, 422, "Invalid JSON body").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_closed_and_default_role_user() {
    let gw = Setup::new()
        .ollama(&dead_url())
        .env("ENABLE_SIGNUP", "false")
        .env("DEFAULT_USER_ROLE", "user")
        .start()
        .await;
    // The very first account is always possible (it becomes the admin).
    assert_eq!(gw.signup("a@example.com").await["role"], "admin");
    let r = gw
        .post(
            "/api/v1/auths/signup",
            None,
            json!({"name": "b", "email": "b@example.com", "password": "p"}),
        )
        .await;
    assert_error(r, 403, "permission").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signin_session_signout() {
    let gw = Setup::new().ollama(&dead_url()).start().await;
    gw.signup("a@example.com").await;
    let r = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "A@example.com", "password": "pw-123456"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("token=") && cookie.contains("HttpOnly"));
    let s: Value = r.json().await.unwrap();
    let token = s["token"].as_str().unwrap().to_string();

    let r = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "a@example.com", "password": "wrong"}),
        )
        .await;
    assert_error(r, 400, "incorrect").await;
    let r = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "nobody@example.com", "password": "x"}),
        )
        .await;
    assert_error(r, 400, "incorrect").await;

    // The session works from the header and from the cookie.
    let me: Value = gw
        .get("/api/v1/auths/", Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["email"], "a@example.com");
    assert_eq!(me["token"], token.as_str());
    let r = gw
        .req(Method::GET, "/api/v1/auths/", None)
        .header("cookie", format!("other=1; token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Sign-out revokes this token.
    let r = gw
        .post("/api/v1/auths/signout", Some(&token), json!({}))
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert_error(
        gw.get("/api/v1/auths/", Some(&token)).await,
        401,
        "Invalid token",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_missing_credentials() {
    let gw = Setup::new().ollama(&dead_url()).start().await;
    assert_error(gw.get("/api/models", None).await, 401, "Not authenticated").await;
    assert_error(
        gw.get("/api/models", Some("garbage")).await,
        401,
        "401 Unauthorized",
    )
    .await;
    assert_error(
        gw.get("/api/models", Some("sk-00000000000000000000000000000000"))
            .await,
        401,
        "",
    )
    .await;
    let r = gw
        .req(Method::GET, "/api/models", None)
        .header("authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "Not authenticated").await;
    // A token signed with another secret is refused.
    let other = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"id": "x", "jti": "j", "iat": 0}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-our-secret"),
    )
    .unwrap();
    assert_error(
        gw.get("/api/models", Some(&other)).await,
        401,
        "401 Unauthorized",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_matrix() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "u@example.com").await;
    let pending = gw.signup("p@example.com").await["token"]
        .as_str()
        .unwrap()
        .to_string();

    // Session-level routes accept pending users.
    assert_eq!(gw.get("/api/v1/auths/", Some(&pending)).await.status(), 200);
    // Verified routes: 401 for pending (Open WebUI's status), 200 for user and admin.
    assert_error(
        gw.get("/api/models", Some(&pending)).await,
        401,
        "permission",
    )
    .await;
    assert_eq!(gw.get("/api/models", Some(&user)).await.status(), 200);
    assert_eq!(gw.get("/api/models", Some(&admin)).await.status(), 200);
    // Admin routes: 401 for user.
    let add = json!({"name": "n", "email": "n@example.com", "password": "pw"});
    assert_error(
        gw.post("/api/v1/auths/add", Some(&user), add.clone()).await,
        401,
        "permission",
    )
    .await;
    assert_error(
        gw.post("/api/v1/auths/add", Some(&pending), add.clone())
            .await,
        401,
        "permission",
    )
    .await;
    let r = gw.post("/api/v1/auths/add", Some(&admin), add).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["role"],
        "pending",
        "add defaults to pending"
    );
    // Pending users may not create keys.
    assert_error(
        gw.post("/api/v1/auths/api_key", Some(&pending), json!({}))
            .await,
        403,
        "not allowed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_hashed_shown_once_and_revocable() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .ollama(&up.url)
        .env("CUSTOM_API_KEY_HEADER", "X-My-Key")
        .start()
        .await;
    let admin = gw.admin().await;
    let key = gw.key(&admin).await;
    assert!(key.starts_with("sk-") && key.len() == 35);

    // The key works through Bearer, the custom header, and the cookie.
    assert_eq!(gw.get("/api/models", Some(&key)).await.status(), 200);
    let r = gw
        .req(Method::GET, "/api/models", None)
        .header("x-my-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = gw
        .req(Method::GET, "/api/models", None)
        .header("cookie", format!("token={key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // GET shows the prefix, never the secret.
    let got: Value = gw
        .get("/api/v1/auths/api_key", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    let shown = got["api_key"].as_str().unwrap();
    assert!(key.starts_with(got["prefix"].as_str().unwrap()));
    assert_ne!(shown, key);
    assert!(
        !got.to_string().contains(&key[11..]),
        "no secret part in {got}"
    );

    // The database file holds no plaintext key.
    let db = std::fs::read(gw.dir.path().join("ragway.redb")).unwrap();
    assert!(
        !db.windows(key.len()).any(|w| w == key.as_bytes()),
        "plaintext key in redb"
    );

    // A new key replaces the old one at once.
    let key2 = gw.key(&admin).await;
    assert_error(gw.get("/api/models", Some(&key)).await, 401, "").await;
    assert_eq!(gw.get("/api/models", Some(&key2)).await.status(), 200);

    // Delete: true, then false; the key stops working.
    let r = gw
        .req(Method::DELETE, "/api/v1/auths/api_key", Some(&admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!(true));
    let r = gw
        .req(Method::DELETE, "/api/v1/auths/api_key", Some(&admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!(false));
    assert_error(gw.get("/api/models", Some(&key2)).await, 401, "").await;
    assert_error(
        gw.get("/api/v1/auths/api_key", Some(&admin)).await,
        404,
        "not found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_can_be_disabled() {
    let gw = Setup::new().ollama(&dead_url()).start().await;
    let admin = gw.admin().await;
    let key = gw.key(&admin).await;
    let dir = gw.stop().await;
    let gw = Setup::new()
        .ollama(&dead_url())
        .env("ENABLE_API_KEYS", "false")
        .start_in(dir)
        .await;
    assert_error(gw.get("/api/models", Some(&key)).await, 403, "not enabled").await;
    // Sessions survive the restart (same generated secret in the data dir).
    assert_eq!(gw.get("/api/models", Some(&admin)).await.status(), 200);
    assert_error(
        gw.post("/api/v1/auths/api_key", Some(&admin), json!({}))
            .await,
        403,
        "not allowed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signin_is_rate_limited_per_email() {
    let gw = Setup::new()
        .ollama(&dead_url())
        .toml("[auth]\nsignin-attempts = 3")
        .start()
        .await;
    gw.signup("a@example.com").await;
    let bad = json!({"email": "a@example.com", "password": "wrong"});
    for _ in 0..3 {
        assert_eq!(
            gw.post("/api/v1/auths/signin", None, bad.clone())
                .await
                .status(),
            400
        );
    }
    let r = gw.post("/api/v1/auths/signin", None, bad).await;
    assert!(
        r.headers().contains_key("retry-after"),
        "429 says when to retry"
    );
    assert_error(r, 429, "rate limit").await;
    // Another email is not affected.
    let other = json!({"email": "b@example.com", "password": "x"});
    assert_eq!(
        gw.post("/api/v1/auths/signin", None, other).await.status(),
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_admin_and_expiring_tokens() {
    let gw = Setup::new()
        .ollama(&dead_url())
        .env("WEBUI_ADMIN_EMAIL", "root@example.com")
        .env("WEBUI_ADMIN_PASSWORD", "s3cret")
        .env("JWT_EXPIRES_IN", "-1")
        .start()
        .await;
    let r = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "root@example.com", "password": "s3cret"}),
        )
        .await;
    let s: Value = r.json().await.unwrap();
    assert_eq!(s["role"], "admin");
    assert!(
        s["expires_at"].is_null(),
        "JWT_EXPIRES_IN=-1 means no expiry"
    );
    // Signup of the "first" user is now a normal pending signup.
    assert_eq!(gw.signup("late@example.com").await["role"], "pending");
}

/// A key restricted to some models must not widen its rights anywhere: no key management
/// (it would mint itself an unrestricted key), no admin routes, no other model on any
/// model-taking route, and model lists filtered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_key_cannot_escalate() {
    let up = FakeUpstream::ollama(&["a:latest", "b:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    let r = gw
        .post(
            "/api/v1/auths/api_key",
            Some(&admin),
            json!({"models": ["a:latest"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let key = r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();

    // Key management: refused for every method and body, through every credential slot.
    for body in [
        json!({}),
        json!({"models": []}),
        json!({"models": ["b:latest"]}),
    ] {
        assert_error(
            gw.post("/api/v1/auths/api_key", Some(&key), body).await,
            403,
            "restricted",
        )
        .await;
    }
    let r = gw
        .req(Method::POST, "/api/v1/auths/api_key", None)
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "restricted").await;
    let r = gw
        .req(Method::POST, "/api/v1/auths/api_key", None)
        .header("cookie", format!("token={key}"))
        .header("x-csrf-token", gw.app().auth.csrf.token(&key))
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "restricted").await;
    assert_error(
        gw.get("/api/v1/auths/api_key", Some(&key)).await,
        403,
        "restricted",
    )
    .await;
    let r = gw
        .req(Method::DELETE, "/api/v1/auths/api_key", Some(&key))
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "restricted").await;

    // Admin routes, although the key belongs to an admin.
    let add =
        json!({"name": "n", "email": "evil@example.com", "password": "pw-123456", "role": "admin"});
    assert_error(
        gw.post("/api/v1/auths/add", Some(&key), add).await,
        403,
        "restricted",
    )
    .await;
    for (method, path, body) in [
        (
            Method::POST,
            "/ollama/api/pull",
            json!({"model": "c:latest"}),
        ),
        (Method::POST, "/ollama/api/create", json!({"model": "c"})),
        (
            Method::DELETE,
            "/ollama/api/delete",
            json!({"model": "b:latest"}),
        ),
        (
            Method::POST,
            "/ollama/api/copy",
            json!({"source": "b:latest", "destination": "a2"}),
        ),
        (
            Method::POST,
            "/ollama/api/unload",
            json!({"model": "b:latest"}),
        ),
        (Method::GET, "/ollama/api/ps", Value::Null),
    ] {
        let mut r = gw.req(method.clone(), path, Some(&key));
        if !body.is_null() {
            r = r.json(&body);
        }
        assert_error(r.send().await.unwrap(), 403, "restricted").await;
    }

    // Model-taking routes: the other model is refused, the allowed one works.
    let chat = |m: &str| json!({"model": m, "messages": [{"role": "user", "content": "hi"}], "stream": false});
    let generate = |m: &str| json!({"model": m, "prompt": "hi", "stream": false});
    for (path, body, status) in [
        ("/ollama/api/chat", chat("b:latest"), 403),
        ("/ollama/api/chat/0", chat("b:latest"), 403),
        ("/ollama/api/generate", generate("b:latest"), 403),
        (
            "/ollama/api/embed",
            json!({"model": "b:latest", "input": "x"}),
            403,
        ),
        (
            "/ollama/api/embeddings",
            json!({"model": "b:latest", "prompt": "x"}),
            403,
        ),
        ("/ollama/api/show", json!({"name": "b:latest"}), 403),
        ("/ollama/v1/chat/completions", chat("b:latest"), 403),
        ("/ollama/v1/completions", generate("b:latest"), 403),
        ("/api/chat/completions", chat("b:latest"), 400),
        ("/api/v1/chat/completions", chat("b:latest"), 400),
    ] {
        assert_error(gw.post(path, Some(&key), body).await, status, "not found").await;
    }
    assert!(
        up.requests().iter().all(|r| !r.text().contains("b:latest")),
        "the other model never reached the upstream"
    );
    for path in [
        "/ollama/api/chat",
        "/ollama/v1/chat/completions",
        "/api/chat/completions",
    ] {
        let r = gw.post(path, Some(&key), chat("a:latest")).await;
        assert_eq!(r.status(), 200, "{path} with the allowed model");
    }
    let r = gw
        .post("/ollama/api/generate", Some(&key), generate("a:latest"))
        .await;
    assert_eq!(r.status(), 200);

    // Lists show the allowed model only.
    for (path, field, id) in [
        ("/api/models", "data", "id"),
        ("/api/v1/models", "data", "id"),
        ("/ollama/api/tags", "models", "model"),
        ("/ollama/v1/models", "data", "id"),
    ] {
        let v: Value = gw.get(path, Some(&key)).await.json().await.unwrap();
        let ids: Vec<&str> = v[field]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: {v}"))
            .iter()
            .map(|m| m[id].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a:latest"], "{path}");
    }

    // The key still works, and a session or an unrestricted key manage keys as before.
    assert_eq!(gw.get("/api/v1/auths/", Some(&key)).await.status(), 200);
    let open = gw.key(&admin).await;
    assert_eq!(
        gw.key(&open).await.len(),
        35,
        "an unrestricted key may replace itself"
    );
}

/// Sign-in and sign-up share a budget per client address (all test clients are 127.0.0.1):
/// rotating emails does not get around it, and the refusal says when to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signin_is_rate_limited_per_address() {
    let gw = Setup::new()
        .ollama(&dead_url())
        .toml("[auth]\nsignin-attempts-per-address = 4")
        .start()
        .await;
    let admin = gw.admin().await; // attempt 1 (sign-up)
    let key = gw.key(&admin).await;
    for i in 2..=4 {
        let r = gw
            .post(
                "/api/v1/auths/signin",
                None,
                json!({"email": format!("e{i}@example.com"), "password": "x"}),
            )
            .await;
        assert_eq!(r.status(), 400, "attempt {i}");
    }
    let r = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "admin@example.com", "password": "pw-123456"}),
        )
        .await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=180).contains(&retry), "Retry-After {retry}");
    assert_error(r, 429, "rate limit").await;
    let r = gw
        .post(
            "/api/v1/auths/signup",
            None,
            json!({"name": "x", "email": "new@example.com", "password": "pw-123456"}),
        )
        .await;
    assert!(r.headers().contains_key("retry-after"));
    assert_error(r, 429, "rate limit").await;
    // Authenticated traffic is not affected.
    assert_eq!(gw.get("/api/v1/auths/", Some(&admin)).await.status(), 200);
    assert_eq!(gw.get("/api/v1/auths/", Some(&key)).await.status(), 200);
    assert!(gw.metrics().await.contains("reason=\"rate_limited\""));
}

/// A key deleted (or replaced) while requests keep using it is refused from the moment the
/// delete answered, every time (see the unit test in `auth` for the interleaving itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_key_refused_at_once_under_concurrent_use() {
    let gw = std::sync::Arc::new(Setup::new().ollama(&dead_url()).start().await);
    let admin = gw.admin().await;
    for _ in 0..10 {
        let key = gw.key(&admin).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hammers: Vec<_> = (0..4)
            .map(|_| {
                let (gw, key, stop) = (gw.clone(), key.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = gw.get("/api/v1/auths/", Some(&key)).await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let r = gw
            .req(Method::DELETE, "/api/v1/auths/api_key", Some(&admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.json::<Value>().await.unwrap(), json!(true));
        for _ in 0..3 {
            assert_error(
                gw.get("/api/v1/auths/", Some(&key)).await,
                401,
                "Unauthorized",
            )
            .await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for h in hammers {
            h.await.unwrap();
        }
        assert_error(
            gw.get("/api/v1/auths/", Some(&key)).await,
            401,
            "Unauthorized",
        )
        .await;
    }
}
