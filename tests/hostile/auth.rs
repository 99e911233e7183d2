//! Attacks on authentication: forged, expired, revoked and malformed session tokens,
//! garbage credentials (invalid UTF-8 included), oversized credentials, hostile sign-up and
//! sign-in bodies, and restricted API keys trying to widen their rights.

use reqwest::Method;
use serde_json::{Value, json};

use super::common::fake::FakeUpstream;
use super::common::gateway::{Gateway, Setup};
use super::common::raw;
use super::support;

const SECRET: &str = "hostile-auth-secret";

/// A gateway with a known JWT secret (so tokens can be forged) and two models.
async fn gateway() -> (Gateway, FakeUpstream) {
    let up = FakeUpstream::ollama(&["a:latest", "b:latest"]).await;
    let gw = Setup::new()
        .ollama(&up.url)
        .env("WEBUI_SECRET_KEY", SECRET)
        .start()
        .await;
    (gw, up)
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token signed with `alg` and `secret`.
fn sign(alg: jsonwebtoken::Algorithm, secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// The user id inside a session token we were given.
fn user_id(gw_session: &Value) -> String {
    gw_session["id"].as_str().unwrap().to_string()
}

async fn refused(gw: &Gateway, token: &str) {
    support::clear_error(gw.get("/api/v1/auths/", Some(token)).await, 401).await;
    support::clear_error(gw.get("/api/models", Some(token)).await, 401).await;
    support::alive(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_signed_with_another_secret() {
    let (gw, _up) = gateway().await;
    let admin = gw.signup("admin@example.com").await;
    let claims = json!({"id": user_id(&admin), "jti": "x", "iat": now()});
    refused(
        &gw,
        &sign(jsonwebtoken::Algorithm::HS256, b"guess", &claims),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_expired() {
    let (gw, _up) = gateway().await;
    let admin = gw.signup("admin@example.com").await;
    let claims = json!({"id": user_id(&admin), "jti": "x", "iat": 0, "exp": now() - 5});
    let token = sign(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), &claims);
    refused(&gw, &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_alg_none() {
    let (gw, _up) = gateway().await;
    let admin = gw.signup("admin@example.com").await;
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = b64url(
        json!({"id": user_id(&admin), "jti": "x", "iat": now()})
            .to_string()
            .as_bytes(),
    );
    refused(&gw, &format!("{header}.{claims}.")).await;
    refused(&gw, &format!("{header}.{claims}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_other_algorithms() {
    let (gw, _up) = gateway().await;
    let admin = gw.signup("admin@example.com").await;
    let claims = json!({"id": user_id(&admin), "jti": "x", "iat": now()});
    // Right secret, stronger HMAC: still not the algorithm we issue.
    refused(
        &gw,
        &sign(jsonwebtoken::Algorithm::HS512, SECRET.as_bytes(), &claims),
    )
    .await;
    // Algorithm confusion: an RS256 header over an HMAC signature.
    let hs = sign(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), &claims);
    let (_, rest) = hs.split_once('.').unwrap();
    let rs_header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
    refused(&gw, &format!("{rs_header}.{rest}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_signed_out_is_refused_in_header_and_cookie() {
    let (gw, _up) = gateway().await;
    let token = gw.admin().await;
    let r = gw
        .post("/api/v1/auths/signout", Some(&token), json!({}))
        .await;
    assert_eq!(r.status(), 200);
    refused(&gw, &token).await;
    let r = gw
        .req(Method::GET, "/api/v1/auths/", None)
        .header("cookie", format!("token={token}"))
        .send()
        .await
        .unwrap();
    support::clear_error(r, 401).await;
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_for_a_user_that_does_not_exist() {
    let (gw, _up) = gateway().await;
    gw.admin().await;
    let claims = json!({"id": "deleted-user-id", "jti": "x", "iat": now()});
    let token = sign(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), &claims);
    refused(&gw, &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_with_claims_of_the_wrong_type() {
    let (gw, _up) = gateway().await;
    let admin = gw.signup("admin@example.com").await;
    for claims in [
        json!({"id": 42, "jti": "x"}),
        json!({"id": user_id(&admin), "jti": "x", "exp": "tomorrow"}),
        json!({"id": user_id(&admin), "jti": "x", "exp": -1}),
        json!({"id": user_id(&admin)}),
        json!(["not", "an", "object"]),
    ] {
        refused(
            &gw,
            &sign(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), &claims),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_role_claim_is_not_trusted() {
    let (gw, _up) = gateway().await;
    let admin = gw.admin().await;
    gw.user(&admin, "u@example.com").await;
    let r = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "u@example.com", "password": "pw-123456"}),
        )
        .await;
    let s: Value = r.json().await.unwrap();
    // A valid session for a plain user, re-signed with an extra admin role claim (as if the
    // secret leaked to a user): the role comes from the store, not the token.
    let claims = json!({"id": s["id"], "jti": "x", "iat": now(), "role": "admin"});
    let token = sign(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), &claims);
    let r = gw
        .post(
            "/api/v1/auths/add",
            Some(&token),
            json!({"name": "n", "email": "n@example.com", "password": "pw-123456", "role": "admin"}),
        )
        .await;
    support::clear_error(r, 401).await;
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_malformed() {
    let (gw, _up) = gateway().await;
    for token in [
        "abc.def.ghi",
        "!!!.@@@.###",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9..",
        "....",
        "a.b.c.d.e",
        "eyJ%%%%.eyJ%%%%.sig",
    ] {
        refused(&gw, token).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_credentials() {
    let (gw, _up) = gateway().await;
    let admin = gw.signup("admin@example.com").await;
    // Under the 64 KiB request-head limit (so the credential check itself answers), far
    // over the 4 KiB credential cap.
    let padding = "A".repeat(16 * 1024);
    let claims = json!({"id": user_id(&admin), "jti": "x", "iat": now(), "pad": padding});
    // Validly signed, but far longer than any credential ragway issues.
    let token = sign(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), &claims);
    refused(&gw, &token).await;
    refused(&gw, &format!("sk-{}", "f".repeat(32 * 1024))).await;
    let r = gw
        .req(Method::GET, "/api/models", None)
        .header("cookie", format!("token={}", "x".repeat(30 * 1024)))
        .send()
        .await
        .unwrap();
    support::clear_error(r, 401).await;
    // Beyond the head limit the edge answers first: 431, before any credential is read.
    let r = gw
        .req(Method::GET, "/api/models", None)
        .bearer_auth(format!("sk-{}", "f".repeat(200 * 1024)))
        .send()
        .await
        .unwrap();
    support::clear_error(r, 431).await;
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_authorization_headers() {
    let (gw, _up) = gateway().await;
    for value in [
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "Basic YWRtaW46YWRtaW4=",
        "Bearer a b c",
        "Bearer sk-",
        "Bearer sk-zzzz",
        "Digest username=admin",
        "bearer\tsk-00000000000000000000000000000000",
        "Token sk-00000000000000000000000000000000",
    ] {
        let r = gw
            .req(Method::GET, "/api/models", None)
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        support::clear_error(r, 401).await;
    }
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_wins_over_a_valid_cookie() {
    let (gw, _up) = gateway().await;
    let token = gw.admin().await;
    // An attacker-controlled Authorization header does not fall back to the victim's cookie.
    let r = gw
        .req(Method::GET, "/api/models", Some("forged.token.here"))
        .header("cookie", format!("token={token}"))
        .send()
        .await
        .unwrap();
    support::clear_error(r, 401).await;
    support::alive(&gw).await;
}

/// Raw bytes that reqwest would refuse to send: invalid UTF-8 in credential headers.
async fn raw_get(gw: &Gateway, header: &[u8]) -> raw::RawAnswer {
    use tokio::io::AsyncWriteExt;
    let addr = gw.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = b"GET /api/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
    req.extend_from_slice(header);
    req.extend_from_slice(b"\r\n\r\n");
    s.write_all(&req).await.unwrap();
    raw::read_answer(&mut s).await.expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_credentials() {
    let (gw, _up) = gateway().await;
    for header in [
        &b"Authorization: Bearer \xff\xfe\xfd"[..],
        b"Authorization: Bearer sk-\xc3\x28\xa0\xa1",
        b"Cookie: token=\xff\xff; other=\x80",
        b"X-Api-Key: sk-\xe2\x82",
    ] {
        let a = raw_get(&gw, header).await;
        assert_eq!(a.status, 401, "{}", a.body);
        assert!(
            a.header("content-type")
                .unwrap()
                .starts_with("application/json")
        );
        let v: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["detail"], "Not authenticated");
        assert_eq!(v["error"]["message"], v["detail"]);
    }
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_api_keys() {
    let (gw, _up) = gateway().await;
    gw.admin().await;
    for key in [
        "sk-00000000000000000000000000000000",
        "sk-' OR '1'='1",
        "sk-../../etc/passwd",
        "sk-\u{202e}evil",
    ] {
        let r = gw
            .req(Method::GET, "/api/models", None)
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
        support::clear_error(r, 401).await;
    }
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_with_wrong_types_and_missing_fields() {
    let (gw, _up) = gateway().await;
    for body in [
        json!({"name": 1, "email": "a@example.com", "password": "pw"}),
        json!({"name": "a", "email": ["a@example.com"], "password": "pw"}),
        json!({"name": "a", "email": "a@example.com", "password": {"$ne": null}}),
        json!({"name": "a", "email": "a@example.com"}),
        json!({}),
        json!(null),
        json!("signup"),
    ] {
        support::clear_error(gw.post("/api/v1/auths/signup", None, body).await, 422).await;
    }
    let r = gw
        .req(Method::POST, "/api/v1/auths/signup", None)
        .header("content-type", "application/json")
        .body("{\"name\": \"a\", \"email\": ")
        .send()
        .await
        .unwrap();
    support::clear_error(r, 400).await;
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_with_huge_fields() {
    let (gw, _up) = gateway().await;
    let big = "x".repeat(30 * 1024);
    for body in [
        json!({"name": big, "email": "a@example.com", "password": "pw"}),
        json!({"name": "a", "email": format!("{big}@example.com"), "password": "pw"}),
        json!({"name": "a", "email": "a@example.com", "password": big}),
        json!({"name": "a", "email": "a@example.com", "password": "pw", "profile_image_url": format!("data:{big}")}),
    ] {
        support::clear_error(gw.post("/api/v1/auths/signup", None, body).await, 400).await;
    }
    // Over the 64 KiB body bound.
    let r = gw
        .post(
            "/api/v1/auths/signup",
            None,
            json!({"name": "x".repeat(100 * 1024), "email": "a@example.com", "password": "pw"}),
        )
        .await;
    support::clear_error(r, 413).await;
    support::alive(&gw).await;
    // Nothing was created by any of these.
    assert_eq!(gw.signup("first@example.com").await["role"], "admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_with_invalid_emails() {
    let (gw, _up) = gateway().await;
    for email in [
        "",
        "plain",
        "a@",
        "@example.com",
        "a b@example.com",
        "a@.example.com",
        "a@example.com.",
        "a@exa mple.com",
    ] {
        let r = gw
            .post(
                "/api/v1/auths/signup",
                None,
                json!({"name": "a", "email": email, "password": "pw-123456"}),
            )
            .await;
        let v = support::clear_error(r, 400).await;
        assert!(
            v["detail"].as_str().unwrap().contains("email"),
            "{email:?}: {v}"
        );
    }
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signin_with_hostile_bodies() {
    let (gw, _up) = gateway().await;
    gw.admin().await;
    for (body, status) in [
        (
            json!({"email": "admin@example.com", "password": {"$gt": ""}}),
            422,
        ),
        (
            json!({"email": ["admin@example.com"], "password": "x"}),
            422,
        ),
        (json!({"email": "admin@example.com"}), 422),
        (
            json!({"email": "x".repeat(10 * 1024), "password": "x"}),
            400,
        ),
        (
            json!({"email": "admin@example.com", "password": "x".repeat(2048)}),
            400,
        ),
        (json!({"email": "admin@example.com", "password": ""}), 400),
        (
            json!({"email": "admin@example.com", "password": "wrong"}),
            400,
        ),
    ] {
        support::clear_error(gw.post("/api/v1/auths/signin", None, body).await, status).await;
    }
    let r = gw
        .req(Method::POST, "/api/v1/auths/signin", None)
        .header("content-type", "application/json")
        .body("email=admin@example.com&password=x")
        .send()
        .await
        .unwrap();
    support::clear_error(r, 400).await;
    support::alive(&gw).await;
}

/// A restricted key of an admin: every attempt to widen it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_key_escalation_attempts() {
    let (gw, up) = gateway().await;
    let admin = gw.admin().await;
    let r = gw
        .post(
            "/api/v1/auths/api_key",
            Some(&admin),
            json!({"models": ["a:latest"]}),
        )
        .await;
    let key = r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    // Mint an unrestricted key (in each credential slot).
    support::clear_error(
        gw.post("/api/v1/auths/api_key", Some(&key), json!({}))
            .await,
        403,
    )
    .await;
    let r = gw
        .req(Method::POST, "/api/v1/auths/api_key", None)
        .header("x-api-key", &key)
        .json(&json!({"models": []}))
        .send()
        .await
        .unwrap();
    support::clear_error(r, 403).await;
    // Create an admin account, then sign in as it.
    let r = gw
        .post(
            "/api/v1/auths/add",
            Some(&key),
            json!({"name": "e", "email": "evil@example.com", "password": "pw-123456", "role": "admin"}),
        )
        .await;
    support::clear_error(r, 403).await;
    // Reach the other model through `name` instead of `model`, or an explicit connection.
    support::clear_error(
        gw.post("/ollama/api/show", Some(&key), json!({"name": "b:latest"}))
            .await,
        403,
    )
    .await;
    support::clear_error(
        gw.post(
            "/ollama/api/chat/0",
            Some(&key),
            json!({"model": "b:latest", "messages": []}),
        )
        .await,
        403,
    )
    .await;
    // Delete or pull models.
    let r = gw
        .req(Method::DELETE, "/ollama/api/delete", Some(&key))
        .json(&json!({"model": "a:latest"}))
        .send()
        .await
        .unwrap();
    support::clear_error(r, 403).await;
    assert!(up.requests().iter().all(|r| !r.text().contains("b:latest")));
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_form_with_unknown_or_wrong_fields() {
    let (gw, _up) = gateway().await;
    let admin = gw.admin().await;
    for body in [
        json!({"models": ["a:latest"], "admin": true}),
        json!({"models": "a:latest"}),
        json!({"models": [1, 2]}),
        json!({"user_id": "someone-else"}),
    ] {
        support::clear_error(
            gw.post("/api/v1/auths/api_key", Some(&admin), body).await,
            422,
        )
        .await;
    }
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_user_cannot_reach_verified_routes_or_keys() {
    let (gw, _up) = gateway().await;
    gw.admin().await;
    let pending = gw.signup("p@example.com").await["token"]
        .as_str()
        .unwrap()
        .to_string();
    support::clear_error(
        gw.post("/api/v1/auths/api_key", Some(&pending), json!({}))
            .await,
        403,
    )
    .await;
    support::clear_error(gw.get("/api/models", Some(&pending)).await, 401).await;
    support::clear_error(
        gw.post(
            "/ollama/api/chat",
            Some(&pending),
            json!({"model": "a:latest", "messages": []}),
        )
        .await,
        401,
    )
    .await;
    support::alive(&gw).await;
}
