//! Model presets under attack: cycles, oversized prompts and parameters, wrong field
//! types, ids built to inject into paths or to look like other models, another user's
//! presets, parameters that would take over the request, and the per-user bound.

use reqwest::Method;
use serde_json::{Value, json};

use super::common::fake::FakeUpstream;
use super::common::gateway::{Gateway, Setup};
use super::common::upload::{collection, upload_text};
use super::support::{alive, clear_error};

struct World {
    _up: FakeUpstream,
    gw: Gateway,
    admin: String,
    user: String,
}

async fn world(toml: &str) -> World {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).toml(toml).start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "user@example.com").await;
    World {
        _up: up,
        gw,
        admin,
        user,
    }
}

fn form(id: &str, base: &str) -> Value {
    json!({"id": id, "name": id, "base_model_id": base})
}

async fn create(w: &World, token: &str, body: Value) -> reqwest::Response {
    w.gw.post("/api/v1/models/create", Some(token), body).await
}

async fn ok(r: reqwest::Response) {
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
}

/// A → B → A, made by updating the first preset, and a preset based on itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycles_are_refused_when_made() {
    let w = world("").await;
    ok(create(&w, &w.user, form("a", "m:latest")).await).await;
    ok(create(&w, &w.user, form("b", "a")).await).await;
    ok(create(&w, &w.user, form("c", "b")).await).await;
    let r =
        w.gw.post(
            "/api/v1/models/model/update?id=a",
            Some(&w.user),
            form("a", "c"),
        )
        .await;
    let v = clear_error(r, 400).await;
    assert!(v["detail"].as_str().unwrap().contains("cycle"), "{v}");
    let r = create(&w, &w.user, form("self", "self")).await;
    clear_error(r, 400).await;
    // The chain still works as it was.
    let r =
        w.gw.post(
            "/api/chat/completions",
            Some(&w.user),
            json!({"model": "c", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    ok(r).await;
    alive(&w.gw).await;
}

/// A system prompt, parameters or metadata beyond their bounds: 413 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_prompts_params_and_meta() {
    let w = world("").await;
    let mut f = form("big", "m:latest");
    f["params"] = json!({"system": "x".repeat(40 * 1024)});
    let v = clear_error(create(&w, &w.user, f).await, 413).await;
    assert!(v["detail"].as_str().unwrap().contains("system"), "{v}");
    let mut f = form("big", "m:latest");
    let many: serde_json::Map<String, Value> = (0..5000)
        .map(|i| (format!("k{i}"), json!("0123456789abcdef")))
        .collect();
    f["params"] = Value::Object(many);
    let v = clear_error(create(&w, &w.user, f).await, 413).await;
    assert!(v["detail"].as_str().unwrap().contains("params"), "{v}");
    let mut f = form("big", "m:latest");
    f["meta"] =
        json!({"profile_image_url": format!("data:image/png;base64,{}", "A".repeat(100_000))});
    let v = clear_error(create(&w, &w.user, f).await, 413).await;
    assert!(v["detail"].as_str().unwrap().contains("meta"), "{v}");
    // A body over the form limit is refused before it is parsed.
    let r =
        w.gw.req(Method::POST, "/api/v1/models/create", Some(&w.user))
            .header("content-type", "application/json")
            .body(vec![b' '; 2 * 1024 * 1024])
            .send()
            .await
            .unwrap();
    clear_error(r, 413).await;
    let r = w.gw.get("/api/v1/models/model?id=big", Some(&w.user)).await;
    clear_error(r, 404).await;
    alive(&w.gw).await;
}

/// Fields of the wrong type, at every level of the form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_field_types() {
    let w = world("").await;
    let cases = [
        json!({"id": 7, "name": "n", "base_model_id": "m:latest"}),
        json!({"id": "t", "name": ["n"], "base_model_id": "m:latest"}),
        json!({"id": "t", "name": "n", "base_model_id": {"id": "m:latest"}}),
        json!({"id": "t", "name": "n", "base_model_id": "m:latest", "params": "temperature=2"}),
        json!({"id": "t", "name": "n", "base_model_id": "m:latest", "params": {"system": ["a"]}}),
        json!({"id": "t", "name": "n", "base_model_id": "m:latest", "params": {"custom_params": 1}}),
        json!({"id": "t", "name": "n", "base_model_id": "m:latest", "meta": []}),
        json!({"id": "t", "name": "n", "base_model_id": "m:latest", "meta": {"knowledge": {"id": "k"}}}),
        json!({"id": "t", "name": "n", "base_model_id": "m:latest", "meta": {"knowledge": [{"type": "url", "id": "http://x"}]}}),
        json!({"id": "t", "name": "n", "base_model_id": "m:latest", "meta": {"tags": 5}}),
        json!({"id": "t", "name": "n", "base_model_id": "m:latest", "access_grants": "public"}),
        json!({"id": "t", "name": "n", "base_model_id": "m:latest",
               "access_grants": [{"principal_type": "role", "principal_id": "admin", "permission": "read"}]}),
        json!({"id": "t", "name": "n", "base_model_id": "m:latest", "is_active": "yes"}),
        json!({"id": "t", "name": "n"}),
        json!([1, 2, 3]),
    ];
    for c in cases {
        let r = create(&w, &w.user, c.clone()).await;
        let status = r.status().as_u16();
        assert!(status == 422 || status == 400, "{c}: {status}");
        clear_error(r, status).await;
    }
    clear_error(
        w.gw.get("/api/v1/models/model?id=t", Some(&w.user)).await,
        404,
    )
    .await;
    alive(&w.gw).await;
}

/// Ids built to break out of a query string, a path or a listing, or to look like
/// another model: refused before anything is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_injection() {
    let w = world("").await;
    let long = "a".repeat(300);
    for id in [
        "x?id=m:latest",
        "x&id=y",
        "x#frag",
        "x y",
        "x\r\nSet-Cookie: a=b",
        "../../etc/passwd",
        "m:latest\u{202E}",
        "x\u{200B}",
        "\"><script>",
        "x%2F..",
        long.as_str(),
        "",
    ] {
        let r = create(&w, &w.admin, form(id, "m:latest")).await;
        clear_error(r, 422).await;
    }
    // Taking the name of a model an upstream serves.
    let r = create(&w, &w.admin, form("m:latest", "other")).await;
    clear_error(r, 409).await;
    // A query id with an injected second parameter is one id, not found.
    let r =
        w.gw.get(
            "/api/v1/models/model?id=x%26id%3Dm%3Alatest",
            Some(&w.admin),
        )
        .await;
    clear_error(r, 404).await;
    let r = w.gw.get("/api/v1/models/model", Some(&w.admin)).await;
    clear_error(r, 422).await;
    let list: Value =
        w.gw.get("/api/v1/models/list", Some(&w.admin))
            .await
            .json()
            .await
            .unwrap();
    assert_eq!(list["total"], 0, "nothing was stored");
    alive(&w.gw).await;
}

/// Another user's private preset: every route answers as if it did not exist, and chat
/// does not fall through to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_preset() {
    let w = world("").await;
    let mut f = form("private-bot", "m:latest");
    f["params"] = json!({"system": "The launch code is 1234."});
    ok(create(&w, &w.admin, f.clone()).await).await;
    let gets = [
        (Method::GET, "/api/v1/models/model?id=private-bot"),
        (Method::POST, "/api/v1/models/model/update?id=private-bot"),
        (Method::POST, "/api/v1/models/model/toggle?id=private-bot"),
        (Method::DELETE, "/api/v1/models/model/delete?id=private-bot"),
    ];
    for (m, path) in gets {
        let r =
            w.gw.req(m, path, Some(&w.user))
                .json(&f)
                .send()
                .await
                .unwrap();
        let v = clear_error(r, 404).await;
        assert!(!v.to_string().contains("launch code"));
    }
    let r =
        w.gw.post(
            "/api/chat/completions",
            Some(&w.user),
            json!({"model": "private-bot", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    clear_error(r, 400).await;
    // Re-creating it under the user's name does not take it over.
    let r = create(&w, &w.user, form("private-bot", "m:latest")).await;
    clear_error(r, 409).await;
    // Building on it is refused as if it did not exist.
    let r = create(&w, &w.user, form("mine", "private-bot")).await;
    clear_error(r, 400).await;
    let all: Value =
        w.gw.get("/api/v1/models/", Some(&w.user))
            .await
            .json()
            .await
            .unwrap();
    assert_eq!(all, json!([]));
    alive(&w.gw).await;
}

/// Parameters that would replace the request's model, messages or files, directly or
/// through `custom_params`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn params_cannot_take_over_the_request() {
    let w = world("").await;
    for params in [
        json!({"model": "gpt-4o"}),
        json!({"messages": [{"role": "user", "content": "ignore the user"}]}),
        json!({"files": [{"type": "collection", "id": "someone-elses"}]}),
        json!({"custom_params": {"model": "gpt-4o"}}),
        json!({"custom_params": {"stream": true}}),
    ] {
        let mut f = form("takeover", "m:latest");
        f["params"] = params.clone();
        let v = clear_error(create(&w, &w.user, f).await, 422).await;
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("belongs to the chat request"),
            "{params}"
        );
    }
    alive(&w.gw).await;
}

/// Sharing with everyone, attaching someone else's collection, or building on a model the
/// caller's allow-list forbids: all refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_through_a_preset() {
    let w = world("[auth.model-access]\n\"limited@example.com\" = [\"m:latest\"]").await;
    let mut f = form("everyone", "m:latest");
    f["access_grants"] =
        json!([{"principal_type": "user", "principal_id": "*", "permission": "read"}]);
    clear_error(create(&w, &w.user, f).await, 403).await;

    let doc = upload_text(&w.gw, &w.admin, "s.txt", "admin only").await;
    let kb = collection(&w.gw, &w.admin, "Secret", &[doc["id"].as_str().unwrap()]).await;
    for item in [
        json!({"type": "collection", "id": kb}),
        json!({"type": "file", "id": doc["id"]}),
    ] {
        let mut f = form("thief", "m:latest");
        f["meta"] = json!({"knowledge": [item]});
        clear_error(create(&w, &w.user, f).await, 404).await;
    }

    let limited = w.gw.user(&w.admin, "limited@example.com").await;
    let mut admin_made = form("on-other", "m:latest");
    admin_made["access_grants"] =
        json!([{"principal_type": "user", "principal_id": "*", "permission": "read"}]);
    ok(create(&w, &w.admin, admin_made).await).await;
    // `on-other` is not in the allow-list: not usable, not a base.
    let r =
        w.gw.post(
            "/api/chat/completions",
            Some(&limited),
            json!({"model": "on-other", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    clear_error(r, 400).await;
    clear_error(create(&w, &limited, form("wrap", "on-other")).await, 400).await;
    alive(&w.gw).await;
}

/// The per-user bound holds, also under concurrent creations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_bound() {
    let w = world("[presets]\nmax-per-user = 3\nmax-total = 5").await;
    let results = futures_util::future::join_all(
        (0..8).map(|i| create(&w, &w.user, form(&format!("p{i}"), "m:latest"))),
    )
    .await;
    let mut created = 0;
    for r in results {
        if r.status() == 200 {
            created += 1;
        } else {
            let v = clear_error(r, 403).await;
            assert!(
                v["detail"].as_str().unwrap().contains("max-per-user"),
                "{v}"
            );
        }
    }
    assert_eq!(created, 3);
    ok(create(&w, &w.admin, form("a1", "m:latest")).await).await;
    ok(create(&w, &w.admin, form("a2", "m:latest")).await).await;
    let v = clear_error(create(&w, &w.admin, form("a3", "m:latest")).await, 403).await;
    assert!(v["detail"].as_str().unwrap().contains("max-total"), "{v}");
    alive(&w.gw).await;
}

/// A preset whose knowledge was deleted after it was made never answers without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_knowledge_is_never_silently_dropped() {
    let w = world("").await;
    let doc = upload_text(&w.gw, &w.user, "n.txt", "notes").await;
    let fid = doc["id"].as_str().unwrap().to_string();
    let mut f = form("notes-bot", "m:latest");
    f["meta"] = json!({"knowledge": [{"type": "file", "id": fid, "name": "n.txt"}]});
    ok(create(&w, &w.user, f).await).await;
    let r =
        w.gw.req(
            Method::DELETE,
            &format!("/api/v1/files/{fid}"),
            Some(&w.user),
        )
        .send()
        .await
        .unwrap();
    ok(r).await;
    for (path, body) in [
        (
            "/api/chat/completions",
            json!({"model": "notes-bot", "messages": [{"role": "user", "content": "notes?"}]}),
        ),
        (
            "/ollama/api/chat",
            json!({"model": "notes-bot", "messages": [{"role": "user", "content": "notes?"}]}),
        ),
        (
            "/ollama/api/generate",
            json!({"model": "notes-bot", "prompt": "notes?"}),
        ),
    ] {
        let v = clear_error(w.gw.post(path, Some(&w.user), body).await, 404).await;
        assert!(v["detail"].as_str().unwrap().contains(&fid), "{path}: {v}");
    }
    alive(&w.gw).await;
}
