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
    assert_error(
        gw.post("/api/v1/auths/signin", None, bad).await,
        429,
        "rate limit",
    )
    .await;
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
