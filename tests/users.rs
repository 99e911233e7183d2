//! User administration (`/api/v1/users/*`) and self-service accounts
//! (`/api/v1/auths/update/*`): shapes, the primary-admin rules, roles taking effect on the
//! next request, session revocation, and deleted users' keys and data gone at once.

mod common;

use common::gateway::{Gateway, Setup, assert_error};
use common::upload::{collection, upload_text};
use reqwest::{Method, Response};
use serde_json::{Value, json};

const NOT_FOUND: &str = "We could not find what you're looking for :/";
const PROHIBITED: &str = "You do not have permission";
const PRIMARY: &str = "primary (first) admin";
const EXPIRED: &str = "Your session has expired";
const EMAIL_TAKEN: &str = "This email is already registered";

async fn json_ok(r: Response) -> Value {
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn me(gw: &Gateway, token: &str) -> Value {
    json_ok(gw.get("/api/v1/auths/", Some(token)).await).await
}

async fn id_of(gw: &Gateway, token: &str) -> String {
    me(gw, token).await["id"].as_str().unwrap().to_string()
}

async fn add(gw: &Gateway, admin: &str, name: &str, email: &str, role: &str) -> Value {
    json_ok(
        gw.post(
            "/api/v1/auths/add",
            Some(admin),
            json!({"name": name, "email": email, "password": "pw-123456", "role": role}),
        )
        .await,
    )
    .await
}

async fn signin(gw: &Gateway, email: &str, password: &str) -> Response {
    gw.post(
        "/api/v1/auths/signin",
        None,
        json!({"email": email, "password": password}),
    )
    .await
}

async fn update(gw: &Gateway, token: &str, id: &str, body: Value) -> Response {
    gw.post(&format!("/api/v1/users/{id}/update"), Some(token), body)
        .await
}

async fn delete(gw: &Gateway, token: &str, id: &str) -> Response {
    gw.req(Method::DELETE, &format!("/api/v1/users/{id}"), Some(token))
        .send()
        .await
        .unwrap()
}

fn emails(v: &Value) -> Vec<String> {
    v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["email"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_has_open_webui_shapes_search_order_and_pages() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    for i in 0..30 {
        add(
            &gw,
            &admin,
            &format!("User {i:02}"),
            &format!("u{i:02}@example.com"),
            "user",
        )
        .await;
    }
    add(
        &gw,
        &admin,
        "Alice Liddell",
        "wonder@land.example",
        "pending",
    )
    .await;

    let v = json_ok(gw.get("/api/v1/users/", Some(&admin)).await).await;
    assert_eq!(v["total"], 32);
    assert_eq!(v["users"].as_array().unwrap().len(), 30, "30 per page");
    let u = &v["users"][0];
    for field in [
        "id",
        "name",
        "email",
        "role",
        "profile_image_url",
        "last_active_at",
        "updated_at",
        "created_at",
    ] {
        assert!(!u[field].is_null(), "{field} in {u}");
    }
    for field in [
        "username",
        "bio",
        "gender",
        "date_of_birth",
        "info",
        "settings",
        "oauth_sub",
    ] {
        assert!(u.get(field).is_some(), "{field} present in {u}");
    }
    assert!(u.get("password_hash").is_none() && u.get("session_epoch").is_none());
    let p2 = json_ok(gw.get("/api/v1/users/?page=2", Some(&admin)).await).await;
    assert_eq!(p2["users"].as_array().unwrap().len(), 2);
    assert_eq!(p2["total"], 32);

    // `query` matches names and emails, case-insensitively.
    let by_name = json_ok(gw.get("/api/v1/users/?query=aLiCe", Some(&admin)).await).await;
    assert_eq!(emails(&by_name), vec!["wonder@land.example"]);
    assert_eq!(by_name["users"][0]["role"], "pending");
    let by_email = json_ok(
        gw.get("/api/v1/users/?query=land.example", Some(&admin))
            .await,
    )
    .await;
    assert_eq!(by_email["total"], 1);

    let asc = json_ok(
        gw.get("/api/v1/users/?order_by=email&direction=asc", Some(&admin))
            .await,
    )
    .await;
    let got = emails(&asc);
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(got, sorted);
    assert_eq!(got[0], "admin@example.com");
    let desc = json_ok(
        gw.get("/api/v1/users/?order_by=email&direction=desc", Some(&admin))
            .await,
    )
    .await;
    assert_eq!(emails(&desc)[0], "wonder@land.example");
    assert_error(
        gw.get("/api/v1/users/?order_by=password_hash", Some(&admin))
            .await,
        400,
        "order_by must be one of",
    )
    .await;

    let all = json_ok(gw.get("/api/v1/users/all", Some(&admin)).await).await;
    assert_eq!(all["total"], 32);
    assert_eq!(all["users"].as_array().unwrap().len(), 32);

    // Any verified user sees another user's name and picture, and nothing else.
    let user = gw.user(&admin, "plain@example.com").await;
    let admin_id = id_of(&gw, &admin).await;
    let face = json_ok(
        gw.get(&format!("/api/v1/users/{admin_id}"), Some(&user))
            .await,
    )
    .await;
    assert_eq!(
        face,
        json!({"name": "admin", "profile_image_url": "/user.png"})
    );
    assert_error(
        gw.get("/api/v1/users/nope", Some(&user)).await,
        404,
        NOT_FOUND,
    )
    .await;
    // The listings are for admins only (401, as Open WebUI answers an insufficient role).
    assert_error(gw.get("/api/v1/users/", Some(&user)).await, 401, PROHIBITED).await;
    assert_error(
        gw.get("/api/v1/users/all", Some(&user)).await,
        401,
        PROHIBITED,
    )
    .await;
    assert_error(
        gw.get("/api/v1/users/", None).await,
        401,
        "Not authenticated",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approving_a_pending_user_takes_effect_on_their_next_request() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let pending = gw.signup("new@example.com").await;
    assert_eq!(pending["role"], "pending");
    let token = pending["token"].as_str().unwrap();
    let id = pending["id"].as_str().unwrap();
    assert_error(
        gw.get("/api/v1/knowledge/", Some(token)).await,
        401,
        PROHIBITED,
    )
    .await;

    let v = json_ok(update(&gw, &admin, id, json!({"role": "user"})).await).await;
    assert_eq!(v["role"], "user");
    assert_eq!(v["email"], "new@example.com", "other fields kept");
    // The waiting session carries on, now verified.
    json_ok(gw.get("/api/v1/knowledge/", Some(token)).await).await;
    assert_eq!(me(&gw, token).await["role"], "user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_changes_revoke_sessions_and_apply_to_keys_on_the_next_request() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let token = gw.user(&admin, "bob@example.com").await;
    let id = id_of(&gw, &token).await;
    let key = gw.key(&token).await;
    // The key is verified and cached.
    assert_error(gw.get("/api/v1/users/", Some(&key)).await, 401, PROHIBITED).await;
    json_ok(gw.get("/api/v1/knowledge/", Some(&key)).await).await;

    json_ok(update(&gw, &admin, &id, json!({"role": "admin"})).await).await;
    // The old session is gone; the key now carries the new role at once.
    assert_error(gw.get("/api/v1/auths/", Some(&token)).await, 401, EXPIRED).await;
    json_ok(gw.get("/api/v1/users/", Some(&key)).await).await;

    json_ok(update(&gw, &admin, &id, json!({"role": "user"})).await).await;
    assert_error(gw.get("/api/v1/users/", Some(&key)).await, 401, PROHIBITED).await;
    json_ok(update(&gw, &admin, &id, json!({"role": "pending"})).await).await;
    assert_error(
        gw.get("/api/v1/knowledge/", Some(&key)).await,
        401,
        PROHIBITED,
    )
    .await;

    // A new sign-in works under the new epoch.
    let fresh = json_ok(signin(&gw, "bob@example.com", "pw-123456").await).await;
    assert_eq!(fresh["role"], "pending");
    me(&gw, fresh["token"].as_str().unwrap()).await;

    // Renaming is not a role change: sessions stay.
    let other = gw.user(&admin, "carol@example.com").await;
    let other_id = id_of(&gw, &other).await;
    let v = json_ok(
        update(
            &gw,
            &admin,
            &other_id,
            json!({"name": "Carol", "email": "CAROL2@example.com"}),
        )
        .await,
    )
    .await;
    assert_eq!(v["email"], "carol2@example.com");
    assert_eq!(me(&gw, &other).await["name"], "Carol");
    json_ok(signin(&gw, "carol2@example.com", "pw-123456").await).await;
    assert_eq!(
        signin(&gw, "carol@example.com", "pw-123456").await.status(),
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_admin_is_protected_and_emails_stay_unique() {
    let gw = Setup::new().start().await;
    let primary = gw.admin().await;
    let primary_id = id_of(&gw, &primary).await;
    let second = add(&gw, &primary, "Second", "second@example.com", "admin").await;
    let second_tok = second["token"].as_str().unwrap().to_string();
    let second_id = second["id"].as_str().unwrap().to_string();

    // Another admin can neither change, demote nor delete the primary admin.
    for body in [
        json!({"role": "user"}),
        json!({"name": "pwned"}),
        json!({"password": "x-123456"}),
    ] {
        assert_error(
            update(&gw, &second_tok, &primary_id, body).await,
            403,
            PRIMARY,
        )
        .await;
    }
    assert_error(delete(&gw, &second_tok, &primary_id).await, 403, PRIMARY).await;
    // The primary admin cannot demote themselves either, but may rename themselves.
    assert_error(
        update(&gw, &primary, &primary_id, json!({"role": "pending"})).await,
        403,
        PRIMARY,
    )
    .await;
    let v = json_ok(
        update(
            &gw,
            &primary,
            &primary_id,
            json!({"name": "Boss", "role": "admin"}),
        )
        .await,
    )
    .await;
    assert_eq!(v["name"], "Boss");
    json_ok(gw.get("/api/v1/users/", Some(&primary)).await).await;
    // Nobody deletes themselves.
    assert_error(
        delete(&gw, &second_tok, &second_id).await,
        403,
        "your own account",
    )
    .await;

    // Emails are unique (case-insensitively); roles are the three of Open WebUI.
    assert_error(
        update(
            &gw,
            &primary,
            &second_id,
            json!({"email": "ADMIN@example.com"}),
        )
        .await,
        400,
        EMAIL_TAKEN,
    )
    .await;
    assert_error(
        update(&gw, &primary, &second_id, json!({"role": "owner"})).await,
        400,
        "Invalid role",
    )
    .await;
    assert_error(
        update(&gw, &primary, "no-such-user", json!({"role": "user"})).await,
        404,
        NOT_FOUND,
    )
    .await;

    // The primary admin may demote another admin; that admin's routes close at once.
    json_ok(update(&gw, &primary, &second_id, json!({"role": "user"})).await).await;
    assert_error(
        gw.get("/api/v1/users/", Some(&second_tok)).await,
        401,
        EXPIRED,
    )
    .await;
    let after = json_ok(signin(&gw, "second@example.com", "pw-123456").await).await;
    assert_error(
        gw.get("/api/v1/users/", after["token"].as_str()).await,
        401,
        PROHIBITED,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_reset_by_an_admin_ends_every_session() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let token = gw.user(&admin, "dave@example.com").await;
    let id = id_of(&gw, &token).await;
    let second = json_ok(signin(&gw, "dave@example.com", "pw-123456").await).await;
    json_ok(update(&gw, &admin, &id, json!({"password": "reset-7890"})).await).await;
    assert_error(gw.get("/api/v1/auths/", Some(&token)).await, 401, EXPIRED).await;
    assert_error(
        gw.get("/api/v1/auths/", second["token"].as_str()).await,
        401,
        EXPIRED,
    )
    .await;
    assert_eq!(
        signin(&gw, "dave@example.com", "pw-123456").await.status(),
        400
    );
    let fresh = json_ok(signin(&gw, "dave@example.com", "reset-7890").await).await;
    me(&gw, fresh["token"].as_str().unwrap()).await;
}

fn blobs(gw: &Gateway) -> usize {
    std::fs::read_dir(gw.dir.path().join("uploads"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_user_is_locked_out_at_once_and_their_data_is_gone() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let eve = gw.user(&admin, "eve@example.com").await;
    let eve_id = id_of(&gw, &eve).await;
    let friend = gw.user(&admin, "friend@example.com").await;
    let friend_id = id_of(&gw, &friend).await;
    let key = gw.key(&eve).await;
    json_ok(gw.get("/api/v1/knowledge/", Some(&key)).await).await; // cached now

    let kept = upload_text(&gw, &friend, "friend.txt", "The friend's own notes stay.").await;
    // The friend shares a collection with Eve: that grant goes with her.
    let friends_kb = collection(&gw, &friend, "Friend's", &[]).await;
    json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{friends_kb}/update"),
            Some(&friend),
            json!({"name": "Friend's", "access_grants": [
                {"principal_type": "user", "principal_id": eve_id, "permission": "write"}]}),
        )
        .await,
    )
    .await;
    let kept_id = kept["id"].as_str().unwrap();
    let f = upload_text(&gw, &eve, "eve.txt", "Eve's secret plans for the weekend.").await;
    let fid = f["id"].as_str().unwrap().to_string();
    let kb = collection(&gw, &eve, "Eve's shared", &[&fid]).await;
    json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/update"),
            Some(&eve),
            json!({"name": "Eve's shared", "access_grants": [
                {"principal_type": "user", "principal_id": friend_id, "permission": "read"}]}),
        )
        .await,
    )
    .await;
    let listed = json_ok(gw.get("/api/v1/knowledge/", Some(&friend)).await).await;
    assert_eq!(listed["total"], 2, "shared with the friend, and their own");
    assert_eq!(blobs(&gw), 2);
    let chunks = gw.app().store().file_chunk_ids(&fid).unwrap();
    assert!(!chunks.is_empty());

    assert_eq!(
        json_ok(delete(&gw, &admin, &eve_id).await).await,
        json!(true)
    );

    // Key (even cached), session and password stop at once.
    assert_error(
        gw.get("/api/v1/knowledge/", Some(&key)).await,
        401,
        "401 Unauthorized",
    )
    .await;
    assert_error(gw.get("/api/v1/auths/", Some(&eve)).await, 401, EXPIRED).await;
    assert_eq!(
        signin(&gw, "eve@example.com", "pw-123456").await.status(),
        400
    );
    // Their file, its chunks, vectors and blob, and their collection are gone.
    assert_error(
        gw.get(&format!("/api/v1/files/{fid}"), Some(&admin)).await,
        404,
        NOT_FOUND,
    )
    .await;
    assert!(gw.app().store().file_chunk_ids(&fid).unwrap().is_empty());
    assert!(gw.app().store().chunks(&chunks).unwrap().is_empty());
    assert_eq!(gw.app().vectors().file_len(&fid), 0);
    assert_eq!(blobs(&gw), 1, "only the friend's blob is left");
    assert_error(
        gw.get(&format!("/api/v1/knowledge/{kb}"), Some(&admin))
            .await,
        404,
        NOT_FOUND,
    )
    .await;
    let listed = json_ok(gw.get("/api/v1/knowledge/", Some(&friend)).await).await;
    assert_eq!(
        listed["total"], 1,
        "the shared collection left the friend's list"
    );
    json_ok(
        gw.get(&format!("/api/v1/files/{kept_id}"), Some(&friend))
            .await,
    )
    .await;
    assert!(
        gw.app()
            .store()
            .pending_user_deletions()
            .unwrap()
            .is_empty()
    );
    let fk = json_ok(
        gw.get(&format!("/api/v1/knowledge/{friends_kb}"), Some(&friend))
            .await,
    )
    .await;
    assert_eq!(
        fk["access_grants"],
        json!([]),
        "grants to the deleted user removed"
    );
    // Deleting again is a 404; the email is free again.
    assert_error(delete(&gw, &admin, &eve_id).await, 404, NOT_FOUND).await;
    gw.user(&admin, "eve@example.com").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_interrupted_by_a_crash_is_finished_at_the_next_start() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let token = gw.user(&admin, "gone@example.com").await;
    let id = id_of(&gw, &token).await;
    let f = upload_text(&gw, &token, "gone.txt", "Soon nobody owns this text.").await;
    let fid = f["id"].as_str().unwrap().to_string();
    let kb = collection(&gw, &token, "Gone's", &[&fid]).await;
    // The crash: the user's row is removed (and the deletion recorded), nothing else yet.
    gw.app().store().delete_user(&id).unwrap().unwrap();
    // Another user's upload lands after their deletion's sweep already finished.
    let late = gw.user(&admin, "late@example.com").await;
    let late_id = id_of(&gw, &late).await;
    let lf = upload_text(
        &gw,
        &late,
        "late.txt",
        "Stored by a request already admitted.",
    )
    .await;
    let lf = lf["id"].as_str().unwrap().to_string();
    gw.app().store().delete_user(&late_id).unwrap().unwrap();
    gw.app().store().finish_user_deletion(&late_id).unwrap();
    let survivor = upload_text(&gw, &admin, "admin.txt", "The admin's text stays.").await;
    let survivor = survivor["id"].as_str().unwrap().to_string();
    let dir = gw.stop().await;

    let gw = Setup::new().start_in(dir).await;
    let store = &gw.app().store();
    assert!(store.file(&fid).unwrap().is_none(), "file removed at start");
    assert!(
        store.knowledge(&kb).unwrap().is_none(),
        "collection removed"
    );
    assert!(store.file(&lf).unwrap().is_none(), "late orphan removed");
    assert!(
        store.file(&survivor).unwrap().is_some(),
        "others' files kept"
    );
    assert!(store.pending_user_deletions().unwrap().is_empty());
    assert_eq!(blobs(&gw), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_ones_password_checks_the_old_one_and_ends_other_sessions() {
    let gw = Setup::new()
        .toml("[auth]\nsignin-attempts = 4")
        .start()
        .await;
    let admin = gw.admin().await;
    let a = gw.user(&admin, "frank@example.com").await;
    let b = json_ok(signin(&gw, "frank@example.com", "pw-123456").await).await;
    let b = b["token"].as_str().unwrap();
    let change = |token: String, old: &str, new: &str| {
        let body = json!({"password": old, "new_password": new});
        let gw = &gw;
        async move {
            gw.post("/api/v1/auths/update/password", Some(&token), body)
                .await
        }
    };

    assert_error(
        change(a.clone(), "wrong-pass", "new-pass-1").await,
        400,
        "Incorrect password",
    )
    .await;
    me(&gw, b).await; // a failed attempt revokes nothing
    assert_eq!(
        json_ok(change(a.clone(), "pw-123456", "new-pass-1").await).await,
        json!(true)
    );
    // This session stays; the other one ends; only the new password signs in.
    me(&gw, &a).await;
    assert_error(gw.get("/api/v1/auths/", Some(b)).await, 401, EXPIRED).await;
    assert_eq!(
        signin(&gw, "frank@example.com", "pw-123456").await.status(),
        400
    );

    // Changes count against the account's sign-in limit (4 here: one sign-in, two changes
    // and one wrong sign-in so far): the next attempt is refused with Retry-After.
    let r = change(a.clone(), "new-pass-1", "new-pass-2").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    assert_error(r, 429, "rate limit").await;
    me(&gw, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_updates_are_bounded_and_return_the_user() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let token = gw.user(&admin, "gina@example.com").await;
    let v = json_ok(
        gw.post(
            "/api/v1/auths/update/profile",
            Some(&token),
            // Open WebUI's client also sends fields ragway does not keep.
            json!({"name": "  Gina G  ", "profile_image_url": "data:image/png;base64,AAAA",
                   "bio": null, "gender": null, "date_of_birth": null}),
        )
        .await,
    )
    .await;
    assert_eq!(v["name"], "Gina G");
    assert_eq!(v["profile_image_url"], "data:image/png;base64,AAAA");
    assert_eq!(v["email"], "gina@example.com");
    assert_eq!(v["role"], "user");
    assert_eq!(me(&gw, &token).await["name"], "Gina G");
    assert_error(
        gw.post(
            "/api/v1/auths/update/profile",
            Some(&token),
            json!({"name": ""}),
        )
        .await,
        400,
        "Name must not be empty",
    )
    .await;
    assert_error(
        gw.post(
            "/api/v1/auths/update/profile",
            Some(&token),
            json!({"name": "x", "profile_image_url": "y".repeat(17 * 1024)}),
        )
        .await,
        400,
        "16 KiB",
    )
    .await;
}
