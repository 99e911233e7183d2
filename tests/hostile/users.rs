//! Attacks on user administration, self-service accounts and the retrieval API: oversized
//! and malformed fields, invented roles, ambiguous JSON, taking over the primary admin,
//! reviving revoked sessions, reading other users' collections, and huge lists.

use reqwest::Method;
use serde_json::{Value, json};

use super::common::gateway::{Gateway, Setup};
use super::common::upload::{collection, upload_text};
use super::support::{alive, clear_error};

async fn id_of(gw: &Gateway, token: &str) -> String {
    let r = gw.get("/api/v1/auths/", Some(token)).await;
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn update_raw(gw: &Gateway, token: &str, id: &str, body: &str) -> reqwest::Response {
    gw.req(
        Method::POST,
        &format!("/api/v1/users/{id}/update"),
        Some(token),
    )
    .header("content-type", "application/json")
    .body(body.to_string())
    .send()
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_user_updates_are_refused_and_change_nothing() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "victim@example.com").await;
    let id = id_of(&gw, &user).await;
    let cases: Vec<(String, u16)> = vec![
        // A body of 100 KiB, a name past 256 bytes, an email past RFC 5321's limit, an
        // email with a space.
        (json!({"name": "n".repeat(100 * 1024)}).to_string(), 413),
        (json!({"name": "n".repeat(300)}).to_string(), 400),
        (
            json!({"email": format!("{}@example.com", "e".repeat(300))}).to_string(),
            400,
        ),
        (json!({"email": "a b@example.com"}).to_string(), 400),
        // Roles that do not exist, and a role smuggled in another type.
        (json!({"role": "superadmin"}).to_string(), 400),
        (json!({"role": ["admin"]}).to_string(), 422),
        // Fields Open WebUI's form does not have.
        (json!({"role": "user", "is_admin": true}).to_string(), 422),
        // Duplicate keys: which one would win depends on the parser.
        (r#"{"role":"user","role":"admin"}"#.to_string(), 400),
        // A 2 KiB password (argon2 must not be fed unbounded input).
        (json!({"password": "p".repeat(2048)}).to_string(), 400),
        (
            json!({"name": "x", "profile_image_url": "u".repeat(20 * 1024)}).to_string(),
            400,
        ),
        (json!({"name": "bell\u{7}"}).to_string(), 400),
    ];
    for (body, status) in cases {
        clear_error(update_raw(&gw, &admin, &id, &body).await, status).await;
        alive(&gw).await;
    }
    let r = gw.get("/api/v1/auths/", Some(&user)).await;
    assert_eq!(r.status(), 200, "the session survived every refused update");
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["role"].as_str(), v["name"].as_str()),
        (Some("user"), Some("u"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_admin_cannot_be_taken_over() {
    let gw = Setup::new().start().await;
    let primary = gw.admin().await;
    let primary_id = id_of(&gw, &primary).await;
    let r = gw
        .post(
            "/api/v1/auths/add",
            Some(&primary),
            json!({"name": "rogue", "email": "rogue@example.com", "password": "pw-123456", "role": "admin"}),
        )
        .await;
    let rogue = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let rogue_id = id_of(&gw, &rogue).await;
    // Taking the primary admin's email (then signing in with a reset password), demoting
    // them, resetting their password, deleting them, and deleting oneself.
    for body in [
        json!({"email": "rogue2@example.com"}),
        json!({"role": "pending"}),
        json!({"password": "owned-123"}),
    ] {
        clear_error(
            gw.post(
                &format!("/api/v1/users/{primary_id}/update"),
                Some(&rogue),
                body,
            )
            .await,
            403,
        )
        .await;
        alive(&gw).await;
    }
    for target in [&primary_id, &rogue_id] {
        clear_error(
            gw.req(
                Method::DELETE,
                &format!("/api/v1/users/{target}"),
                Some(&rogue),
            )
            .send()
            .await
            .unwrap(),
            403,
        )
        .await;
        alive(&gw).await;
    }
    // Taking someone else's email for oneself.
    clear_error(
        gw.post(
            &format!("/api/v1/users/{rogue_id}/update"),
            Some(&rogue),
            json!({"email": "admin@example.com"}),
        )
        .await,
        400,
    )
    .await;
    let r = gw.get("/api/v1/users/", Some(&primary)).await;
    assert_eq!(r.status(), 200, "the primary admin is intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_sessions_stay_revoked_and_restricted_keys_cannot_take_the_account() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "demoted@example.com").await;
    let id = id_of(&gw, &user).await;
    // Demote then restore: the session from before must not come back.
    for role in ["pending", "user"] {
        let r = gw
            .post(
                &format!("/api/v1/users/{id}/update"),
                Some(&admin),
                json!({"role": role}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    clear_error(gw.get("/api/v1/auths/", Some(&user)).await, 401).await;
    alive(&gw).await;

    // A key restricted to one model must not change the account's password or profile.
    let fresh = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "demoted@example.com", "password": "pw-123456"}),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    let token = fresh["token"].as_str().unwrap();
    let r = gw
        .post(
            "/api/v1/auths/api_key",
            Some(token),
            json!({"models": ["m:latest"]}),
        )
        .await;
    let key = r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    clear_error(
        gw.post(
            "/api/v1/auths/update/password",
            Some(&key),
            json!({"password": "pw-123456", "new_password": "stolen-123"}),
        )
        .await,
        403,
    )
    .await;
    clear_error(
        gw.post(
            "/api/v1/auths/update/profile",
            Some(&key),
            json!({"name": "pwned"}),
        )
        .await,
        403,
    )
    .await;
    // An empty or huge new password, and a body with both fields twice.
    for body in [
        json!({"password": "pw-123456", "new_password": ""}).to_string(),
        json!({"password": "pw-123456", "new_password": "n".repeat(4096)}).to_string(),
        r#"{"password":"x","password":"pw-123456","new_password":"y"}"#.to_string(),
    ] {
        clear_error(
            gw.req(Method::POST, "/api/v1/auths/update/password", Some(token))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap(),
            400,
        )
        .await;
        alive(&gw).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_listing_parameters_are_refused() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let long = "q".repeat(4096);
    for (path, status) in [
        (format!("/api/v1/users/?query={long}"), 400),
        ("/api/v1/users/?order_by=password_hash".to_string(), 400),
        (
            "/api/v1/users/?order_by=name%3B%20DROP%20TABLE%20users".to_string(),
            400,
        ),
        ("/api/v1/users/?direction=sideways".to_string(), 400),
        ("/api/v1/users/?page=0".to_string(), 422),
        ("/api/v1/users/?page=18446744073709551616".to_string(), 422),
    ] {
        clear_error(gw.get(&path, Some(&admin)).await, status).await;
        alive(&gw).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_retrieval_requests_are_refused() {
    let gw = Setup::new()
        .toml("[rag]\nfile-max-size-mb = 1")
        .start()
        .await;
    let admin = gw.admin().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    let mallory = gw.user(&admin, "mallory@example.com").await;
    let f = upload_text(&gw, &alice, "a.txt", "Alice's payroll numbers.").await;
    let fid = f["id"].as_str().unwrap().to_string();
    let kb = collection(&gw, &alice, "HR", &[&fid]).await;
    let doc = "/api/v1/retrieval/query/doc";
    let cases: Vec<(&str, Value, u16)> = vec![
        // Another user's collection and file: not found, never an empty result.
        (doc, json!({"collection_name": kb, "query": "payroll"}), 404),
        (
            doc,
            json!({"collection_name": format!("file-{fid}"), "query": "payroll"}),
            404,
        ),
        (
            doc,
            json!({"collection_name": "../../etc/passwd", "query": "x"}),
            404,
        ),
        // Absurd k, thresholds and weights.
        (
            doc,
            json!({"collection_name": kb, "query": "x", "k": 1_000_000}),
            422,
        ),
        (
            doc,
            json!({"collection_name": kb, "query": "x", "k": 0}),
            422,
        ),
        (
            doc,
            json!({"collection_name": kb, "query": "x", "k": -1}),
            422,
        ),
        (
            doc,
            json!({"collection_name": kb, "query": "x", "r": 5.0}),
            422,
        ),
        (
            doc,
            json!({"collection_name": kb, "query": "x", "hybrid_bm25_weight": -3}),
            422,
        ),
        // A 20 KiB query, an empty one, a 1 KiB name.
        (
            doc,
            json!({"collection_name": kb, "query": "w".repeat(20 * 1024)}),
            413,
        ),
        (doc, json!({"collection_name": kb, "query": "   "}), 422),
        (
            doc,
            json!({"collection_name": "n".repeat(1024), "query": "x"}),
            422,
        ),
        // Thousands of names in one query.
        (
            "/api/v1/retrieval/query/collection",
            json!({"collection_names": (0..1000).map(|i| format!("kb-{i}")).collect::<Vec<_>>(), "query": "x"}),
            413,
        ),
        (
            "/api/v1/retrieval/query/collection",
            json!({"collection_names": [], "query": "x"}),
            422,
        ),
        // process/text: oversized content, a path for a name, into someone else's collection.
        (
            "/api/v1/retrieval/process/text",
            json!({"name": "big", "content": "b".repeat(1024 * 1024 + 10)}),
            413,
        ),
        (
            "/api/v1/retrieval/process/text",
            json!({"name": "../../../../tmp/x", "content": "y"}),
            400,
        ),
        (
            "/api/v1/retrieval/process/text",
            json!({"name": "x", "content": "y", "collection_name": kb}),
            404,
        ),
    ];
    for (path, body, status) in cases {
        clear_error(gw.post(path, Some(&mallory), body.clone()).await, status).await;
        alive(&gw).await;
    }
    assert_eq!(
        gw.app().store().files().unwrap().len(),
        1,
        "no refused request stored a file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_batch_adds_are_refused() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "owner@example.com").await;
    let kb = collection(&gw, &user, "Mine", &[]).await;
    let path = format!("/api/v1/knowledge/{kb}/files/batch/add");
    let huge: Vec<Value> = (0..10_000)
        .map(|i| json!({"file_id": i.to_string()}))
        .collect();
    let cases: Vec<(String, u16)> = vec![
        (Value::Array(huge).to_string(), 413),
        // 300 KiB body: past the batch body limit.
        (
            json!([{"file_id": "x".repeat(300 * 1024)}]).to_string(),
            413,
        ),
        ("[]".to_string(), 422),
        (r#"{"file_id":"a"}"#.to_string(), 422),
        (r#"[{"file_id":"a","file_id":"b"}]"#.to_string(), 400),
    ];
    for (body, status) in cases {
        clear_error(
            gw.req(Method::POST, &path, Some(&user))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap(),
            status,
        )
        .await;
        alive(&gw).await;
    }
    // An over-long id inside a good batch is that item's error, not the batch's.
    let r = gw
        .post(&path, Some(&user), json!([{"file_id": "i".repeat(1000)}]))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["results"][0]["status"], "error");
    assert_eq!(v["results"][0]["code"], 422);
}
