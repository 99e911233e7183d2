//! Model presets (Open WebUI's workspace models): the `openai` SDK calling a preset by
//! name, access control, presets declared in the configuration, update/toggle/delete,
//! listings, nested presets, the native Ollama routes and missing dependencies.

mod common;

use std::process::Command;

use common::fake::FakeUpstream;
use common::gateway::{Gateway, Setup, assert_error};
use common::upload::{collection, upload_text};
use reqwest::Method;
use serde_json::{Value, json};

const DOC: &str = "The quarterly report is filed by Zorblax the archivist.";

async fn setup() -> (FakeUpstream, Gateway, String) {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let admin = gw.admin().await;
    (up, gw, admin)
}

async fn user_id(gw: &Gateway, token: &str) -> String {
    let v: Value = gw
        .get("/api/v1/auths/", Some(token))
        .await
        .json()
        .await
        .unwrap();
    v["id"].as_str().unwrap().to_string()
}

async fn create(gw: &Gateway, token: &str, form: Value) -> Value {
    let r = gw.post("/api/v1/models/create", Some(token), form).await;
    assert_eq!(r.status(), 200, "create preset");
    r.json().await.unwrap()
}

async fn chat(gw: &Gateway, token: &str, model: &str, question: &str) -> reqwest::Response {
    gw.post(
        "/api/chat/completions",
        Some(token),
        json!({"model": model, "messages": [{"role": "user", "content": question}]}),
    )
    .await
}

fn public() -> Value {
    json!([{"principal_type": "user", "principal_id": "*", "permission": "read"}])
}

fn python() -> String {
    if let Ok(p) = std::env::var("RAGWAY_TEST_PYTHON") {
        return p;
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the openai SDK: run scripts/python-env.sh (scripts/test.sh does)"
    );
    venv.display().to_string()
}

/// The last request the upstream got on `path`.
fn last_body(up: &FakeUpstream, path: &str) -> (Value, String) {
    let r = up.requests_to(path).pop().expect("upstream called");
    (r.json(), r.text())
}

fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%d"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A stock OpenAI client that can only choose a model name gets the preset's system
/// prompt, parameters and knowledge, stream and non-stream, and the upstream sees only the
/// base model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_calls_a_preset_by_name() {
    let (up, gw, admin) = setup().await;
    let f = upload_text(&gw, &admin, "report.txt", DOC).await;
    let kb = collection(&gw, &admin, "Reports", &[f["id"].as_str().unwrap()]).await;
    create(
        &gw,
        &admin,
        json!({"id": "reports-bot", "name": "Reports bot", "base_model_id": "m:latest",
               "params": {"system": "You help {{USER_NAME}} on {{CURRENT_DATE}}.", "temperature": 0.3, "top_p": 0.9},
               "meta": {"description": "Answers from the reports", "tags": ["reports"],
                        "knowledge": [{"type": "collection", "id": kb, "name": "Reports"}]},
               "access_grants": public()}),
    )
    .await;
    // The reader needs the collection too: a preset never lends its owner's access.
    let r = gw
        .post(
            &format!("/api/v1/knowledge/{kb}/update"),
            Some(&admin),
            json!({"name": "Reports", "access_grants": public()}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let user = gw.user(&admin, "reader@example.com").await;
    let key = gw.key(&user).await;
    let script = r#"
import json, sys
from openai import OpenAI
base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/api", api_key=key)
stream = client.chat.completions.create(
    model="reports-bot",
    messages=[{"role": "user", "content": "Who files the quarterly report?"}],
    stream=True,
)
text, sources = "", None
for chunk in stream:
    extra = chunk.model_extra or {}
    if "sources" in extra:
        sources = extra["sources"]
    for choice in chunk.choices:
        text += choice.delta.content or ""
resp = client.chat.completions.create(
    model="reports-bot",
    messages=[{"role": "system", "content": "Answer in French."},
              {"role": "user", "content": "Who files the quarterly report?"}],
    temperature=0.7,
    extra_body={"files": [{"type": "text", "content": "Extra note from the request.", "name": "note"}]},
)
print(json.dumps({"text": text, "sources": sources, "plain": resp.choices[0].message.content,
                  "plain_sources": (resp.model_extra or {}).get("sources")}))
"#;
    // The date is read before and after, so a run across midnight accepts either day.
    let day_before = today();
    let out = Command::new(python())
        .args(["-c", script, &gw.url, &key])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SDK failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The fake answers with the model name it was sent: the base model's.
    assert_eq!(v["text"], "Hello from m:latest");
    assert_eq!(v["plain"], "Hello from m:latest");
    assert_eq!(v["sources"][0]["document"][0], DOC);
    assert_eq!(
        v["sources"][0]["source"],
        json!({"type": "collection", "id": kb, "name": "Reports"})
    );
    assert_eq!(v["plain_sources"][0]["document"][0], DOC);
    assert_eq!(
        v["plain_sources"][1]["document"][0],
        "Extra note from the request."
    );

    let days = [day_before, today()];
    let calls = up.requests_to("/v1/chat/completions");
    assert_eq!(calls.len(), 2);
    for c in &calls {
        assert!(
            !c.text().contains("reports-bot"),
            "the upstream never sees the preset id: {}",
            c.text()
        );
    }
    let stream_body = calls[0].json();
    assert_eq!(stream_body["model"], "m:latest");
    assert_eq!(stream_body["messages"][0]["role"], "system");
    assert!(
        days.iter()
            .any(|d| stream_body["messages"][0]["content"] == format!("You help u on {d}.")),
        "{}",
        stream_body["messages"][0]
    );
    assert_eq!(stream_body["temperature"], 0.3);
    assert_eq!(stream_body["top_p"], 0.9);
    let last = stream_body["messages"][1]["content"].as_str().unwrap();
    assert!(
        last.contains(&format!(
            "<source id=\"1\" name=\"Reports\" resource-type=\"collection\" resource-id=\"{kb}\">{DOC}</source>"
        )),
        "{last}"
    );
    assert!(last.ends_with("\nWho files the quarterly report?"));
    assert!(last.starts_with("### Task:"), "Open WebUI's template");

    let plain = calls[1].json();
    // The preset's prompt goes before the client's, as Open WebUI merges them.
    assert!(
        days.iter()
            .any(|d| plain["messages"][0]["content"]
                == format!("You help u on {d}.\nAnswer in French.")),
        "{}",
        plain["messages"][0]
    );
    assert_eq!(plain["temperature"], 0.7, "the request wins");
    assert_eq!(plain["top_p"], 0.9);
    let last = plain["messages"][1]["content"].as_str().unwrap();
    assert!(last.contains(DOC) && last.contains("Extra note from the request."));
    assert!(plain.get("files").is_none() && plain.get("params").is_none());
}

/// Private by default; read grants let others use a preset, write grants change it; only
/// the owner or an admin re-shares, only an admin shares with everyone; restricted keys
/// cannot define presets; knowledge stays the caller's to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_on_presets() {
    let (_up, gw, admin) = setup().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    let bob = gw.user(&admin, "bob@example.com").await;
    let bob_id = user_id(&gw, &bob).await;
    let form = json!({"id": "alice-bot", "name": "Alice bot", "base_model_id": "m:latest",
                      "params": {"system": "Be Alice's bot."}});
    let made = create(&gw, &alice, form.clone()).await;
    assert_eq!(made["user_id"], user_id(&gw, &alice).await);
    assert_eq!(made["access_grants"], json!([]));

    // Bob: nothing to see.
    assert_error(
        gw.get("/api/v1/models/model?id=alice-bot", Some(&bob))
            .await,
        404,
        "not found",
    )
    .await;
    assert_error(
        chat(&gw, &bob, "alice-bot", "hi").await,
        400,
        "Model not found",
    )
    .await;
    let models: Value = gw
        .get("/api/models", Some(&bob))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        !models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "alice-bot")
    );
    let r = gw
        .post(
            "/api/v1/models/model/update?id=alice-bot",
            Some(&bob),
            form.clone(),
        )
        .await;
    assert_error(r, 404, "not found").await;
    let r = gw
        .req(
            Method::DELETE,
            "/api/v1/models/model/delete?id=alice-bot",
            Some(&bob),
        )
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not found").await;

    // Shared for reading: Bob uses it but cannot change it.
    let mut shared = form.clone();
    shared["access_grants"] =
        json!([{"principal_type": "user", "principal_id": bob_id, "permission": "read"}]);
    let r = gw
        .post(
            "/api/v1/models/model/update?id=alice-bot",
            Some(&alice),
            shared.clone(),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(chat(&gw, &bob, "alice-bot", "hi").await.status(), 200);
    let got: Value = gw
        .get("/api/v1/models/model?id=alice-bot", Some(&bob))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["write_access"], false);
    assert_eq!(got["user"]["email"], "alice@example.com");
    let r = gw
        .post(
            "/api/v1/models/model/update?id=alice-bot",
            Some(&bob),
            shared.clone(),
        )
        .await;
    assert_error(r, 400, "permission").await;
    let r = gw
        .post(
            "/api/v1/models/model/toggle?id=alice-bot",
            Some(&bob),
            json!({}),
        )
        .await;
    assert_error(r, 400, "permission").await;

    // Shared for writing: Bob edits, but cannot re-share.
    let mut writer = shared.clone();
    writer["access_grants"] = json!([
        {"principal_type": "user", "principal_id": bob_id, "permission": "read"},
        {"principal_type": "user", "principal_id": bob_id, "permission": "write"}]);
    let r = gw
        .post(
            "/api/v1/models/model/update?id=alice-bot",
            Some(&alice),
            writer.clone(),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut edit = writer.clone();
    edit["name"] = json!("Renamed by Bob");
    let r = gw
        .post(
            "/api/v1/models/model/update?id=alice-bot",
            Some(&bob),
            edit.clone(),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "Renamed by Bob");
    edit["access_grants"] = public();
    let r = gw
        .post("/api/v1/models/model/update?id=alice-bot", Some(&bob), edit)
        .await;
    assert_error(r, 403, "owner").await;

    // Only an admin shares with everyone.
    let mut open = form.clone();
    open["id"] = json!("alice-public");
    open["access_grants"] = public();
    let r = gw
        .post("/api/v1/models/create", Some(&alice), open.clone())
        .await;
    assert_error(r, 403, "Only an admin").await;
    open["id"] = json!("admin-public");
    create(&gw, &admin, open).await;
    assert_eq!(chat(&gw, &bob, "admin-public", "hi").await.status(), 200);

    // A key restricted to some models uses them but defines nothing.
    let r = gw
        .post(
            "/api/v1/auths/api_key",
            Some(&alice),
            json!({"models": ["admin-public"]}),
        )
        .await;
    let restricted = r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let mut other = form.clone();
    other["id"] = json!("from-restricted");
    let r = gw
        .post("/api/v1/models/create", Some(&restricted), other)
        .await;
    assert_error(r, 403, "restricted").await;
    assert_eq!(
        chat(&gw, &restricted, "admin-public", "hi").await.status(),
        200
    );
    assert_error(
        chat(&gw, &restricted, "alice-bot", "hi").await,
        400,
        "Model not found",
    )
    .await;

    // Knowledge: Alice cannot attach Bob's private collection, and a preset shared with
    // Bob does not lend him Alice's.
    let f = upload_text(&gw, &bob, "b.txt", "Bob's secret").await;
    let bob_kb = collection(&gw, &bob, "Bob's", &[f["id"].as_str().unwrap()]).await;
    let mut stolen = form.clone();
    stolen["id"] = json!("steal");
    stolen["meta"] = json!({"knowledge": [{"type": "collection", "id": bob_kb}]});
    let r = gw.post("/api/v1/models/create", Some(&alice), stolen).await;
    assert_error(r, 404, &bob_kb).await;
    let f = upload_text(&gw, &alice, "a.txt", "Alice's notes").await;
    let alice_kb = collection(&gw, &alice, "Alice's", &[f["id"].as_str().unwrap()]).await;
    let mut with_kb = shared.clone();
    with_kb["meta"] =
        json!({"knowledge": [{"type": "collection", "id": alice_kb, "name": "Alice's"}]});
    let r = gw
        .post(
            "/api/v1/models/model/update?id=alice-bot",
            Some(&alice),
            with_kb,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(chat(&gw, &alice, "alice-bot", "notes?").await.status(), 200);
    assert_error(chat(&gw, &bob, "alice-bot", "notes?").await, 404, &alice_kb).await;
}

/// Presets declared in the configuration: listed and usable, read-only through the API
/// (which says so), and their ids cannot be taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_declared_presets() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new()
        .ollama(&up.url)
        .toml(
            r#"[presets]
max-per-user = 5

[[presets.declared]]
id = "ops/helper"
name = "Ops helper"
base-model-id = "m:latest"
system = "You are the ops helper."
params = { temperature = 0.1, custom_params = { seed = 7 } }
description = "Declared in the file"
tags = ["ops"]
access-grants = [{ principal-type = "user", principal-id = "*", permission = "read" }]

[[presets.declared]]
id = "ops/strict"
base-model-id = "ops/helper"
params = { temperature = 0.0 }
is-active = true
"#,
        )
        .start()
        .await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "user@example.com").await;
    let got: Value = gw
        .get("/api/v1/models/model?id=ops/helper", Some(&user))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["read_only"], true);
    assert_eq!(got["write_access"], false);
    assert_eq!(got["params"]["system"], "You are the ops helper.");
    assert_eq!(got["meta"]["tags"], json!([{"name": "ops"}]));

    assert_eq!(
        chat(&gw, &user, "ops/helper", "restart?").await.status(),
        200
    );
    let (b, _) = last_body(&up, "/v1/chat/completions");
    assert_eq!(b["model"], "m:latest");
    assert_eq!(b["messages"][0]["content"], "You are the ops helper.");
    assert_eq!(
        (b["temperature"].clone(), b["seed"].clone()),
        (json!(0.1), json!(7))
    );
    // Declared without grants: admins only.
    assert_error(
        chat(&gw, &user, "ops/strict", "x").await,
        400,
        "Model not found",
    )
    .await;
    assert_eq!(chat(&gw, &admin, "ops/strict", "x").await.status(), 200);
    let (b, _) = last_body(&up, "/v1/chat/completions");
    assert_eq!(b["temperature"], 0.0, "the outer preset wins");
    assert_eq!(b["messages"][0]["content"], "You are the ops helper.");

    for (method, path) in [
        (Method::POST, "/api/v1/models/model/update?id=ops/helper"),
        (Method::POST, "/api/v1/models/model/toggle?id=ops/helper"),
        (Method::DELETE, "/api/v1/models/model/delete?id=ops/helper"),
    ] {
        let r = gw
            .req(method, path, Some(&admin))
            .json(&json!({"id": "ops/helper", "name": "x", "base_model_id": "m:latest"}))
            .send()
            .await
            .unwrap();
        assert_error(r, 403, "configuration file").await;
    }
    let r = gw
        .post(
            "/api/v1/models/create",
            Some(&admin),
            json!({"id": "ops/helper", "name": "x", "base_model_id": "m:latest"}),
        )
        .await;
    assert_error(r, 409, "already registered").await;
    let list: Value = gw
        .get("/api/v1/models/list", Some(&user))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 1);
    assert_eq!(list["items"][0]["id"], "ops/helper");
}

/// Update, toggle and delete, and what chat and listings see after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_toggle_and_delete() {
    let (up, gw, admin) = setup().await;
    let user = gw.user(&admin, "user@example.com").await;
    let form = json!({"id": "bot", "name": "Bot", "base_model_id": "m:latest",
                      "params": {"system": "First prompt."}, "access_grants": public()});
    create(&gw, &admin, form.clone()).await;
    assert_eq!(chat(&gw, &user, "bot", "hi").await.status(), 200);
    let (b, _) = last_body(&up, "/v1/chat/completions");
    assert_eq!(b["messages"][0]["content"], "First prompt.");

    let mut changed = form.clone();
    changed["params"] = json!({"system": "Second prompt.", "max_tokens": 64});
    changed["id"] = json!("ignored-form-id");
    let r = gw
        .post("/api/v1/models/model/update?id=bot", Some(&admin), changed)
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], "bot", "the query's id, not the form's");
    assert_eq!(chat(&gw, &user, "bot", "hi").await.status(), 200);
    let (b, _) = last_body(&up, "/v1/chat/completions");
    assert_eq!(b["messages"][0]["content"], "Second prompt.");
    assert_eq!(b["max_tokens"], 64);

    // Off: hidden from users, a clear error for its owner.
    let r = gw
        .post(
            "/api/v1/models/model/toggle?id=bot",
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["is_active"], false);
    assert_error(chat(&gw, &user, "bot", "hi").await, 400, "Model not found").await;
    assert_error(chat(&gw, &admin, "bot", "hi").await, 400, "inactive").await;
    let ids = |v: Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let seen = ids(gw
        .get("/api/models", Some(&user))
        .await
        .json()
        .await
        .unwrap());
    assert!(!seen.contains(&"bot".to_string()));
    let seen = ids(gw
        .get("/api/models", Some(&admin))
        .await
        .json()
        .await
        .unwrap());
    assert!(seen.contains(&"bot".to_string()), "admins still see it");
    // Back on.
    let r = gw
        .post(
            "/api/v1/models/model/toggle?id=bot",
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["is_active"], true);
    assert_eq!(chat(&gw, &user, "bot", "hi").await.status(), 200);

    let r = gw
        .req(
            Method::DELETE,
            "/api/v1/models/model/delete?id=bot",
            Some(&admin),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!(true));
    assert_error(chat(&gw, &user, "bot", "hi").await, 400, "Model not found").await;
    assert_error(
        gw.get("/api/v1/models/model?id=bot", Some(&admin)).await,
        404,
        "not found",
    )
    .await;
}

/// `/api/models` lists presets beside base models with Open WebUI's fields; the preset
/// listings have Open WebUI's shapes; `/api/v1/models` stays the model list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings() {
    let (_up, gw, admin) = setup().await;
    let user = gw.user(&admin, "user@example.com").await;
    create(
        &gw,
        &admin,
        json!({"id": "shared-bot", "name": "Shared bot", "base_model_id": "m:latest",
               "params": {"system": "secret-ish prompt"},
               "meta": {"description": "d", "tags": [{"name": "t1"}], "profile_image_url": "data:image/png;base64,AAAA"},
               "access_grants": public()}),
    )
    .await;
    create(
        &gw,
        &user,
        json!({"id": "my-bot", "name": "My bot", "base_model_id": "shared-bot"}),
    )
    .await;
    let models: Value = gw
        .get("/api/models", Some(&user))
        .await
        .json()
        .await
        .unwrap();
    let data = models["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        vec!["m:latest", "my-bot", "shared-bot"],
        "presets by name after the base models"
    );
    let shared = &data[2];
    assert_eq!(shared["preset"], true);
    assert_eq!(shared["owned_by"], "ollama", "the base's owner");
    assert_eq!(shared["object"], "model");
    assert_eq!(shared["name"], "Shared bot");
    assert!(
        shared["info"].get("params").is_none(),
        "info is the row minus params"
    );
    assert_eq!(shared["info"]["base_model_id"], "m:latest");
    assert!(shared["info"]["meta"].get("profile_image_url").is_none());
    assert_eq!(shared["tags"], json!([{"name": "t1"}]));
    assert_eq!(
        data[2]["owned_by"], "ollama",
        "nested: the final base's owner"
    );
    // The OpenAI-style alias is unchanged.
    let alias: Value = gw
        .get("/api/v1/models", Some(&user))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(alias, models);

    // Open WebUI ≤0.6: `/api/v1/models/` is the workspace-model array.
    let all: Value = gw
        .get("/api/v1/models/", Some(&user))
        .await
        .json()
        .await
        .unwrap();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 2);
    let mine = all.iter().find(|m| m["id"] == "my-bot").unwrap();
    assert_eq!(mine["write_access"], true);
    assert_eq!(mine["user"]["email"], "user@example.com");
    // Open WebUI 0.10: `/list`, paginated, with filters.
    let list: Value = gw
        .get("/api/v1/models/list", Some(&user))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 2);
    let list: Value = gw
        .get("/api/v1/models/list?view_option=created", Some(&user))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 1);
    assert_eq!(list["items"][0]["id"], "my-bot");
    let list: Value = gw
        .get("/api/v1/models/list?query=SHARED&tag=t1", Some(&user))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 1);
    assert_eq!(list["items"][0]["params"]["system"], "secret-ish prompt");
    let list: Value = gw
        .get("/api/v1/models/list?page=2", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (list["total"].clone(), list["items"].clone()),
        (json!(2), json!([]))
    );
}

/// A preset whose collection was deleted, or whose base model is gone, answers a clear
/// 4xx naming what is missing; a cycle is refused when it would be made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_dependencies_and_cycles() {
    let (up, gw, admin) = setup().await;
    let f = upload_text(&gw, &admin, "r.txt", DOC).await;
    let kb = collection(&gw, &admin, "Gone soon", &[f["id"].as_str().unwrap()]).await;
    create(
        &gw,
        &admin,
        json!({"id": "kb-bot", "name": "KB bot", "base_model_id": "m:latest",
               "meta": {"knowledge": [{"type": "collection", "id": kb, "name": "Gone soon"}]}}),
    )
    .await;
    assert_eq!(chat(&gw, &admin, "kb-bot", "report?").await.status(), 200);
    let r = gw
        .req(
            Method::DELETE,
            &format!("/api/v1/knowledge/{kb}/delete"),
            Some(&admin),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = assert_error(chat(&gw, &admin, "kb-bot", "report?").await, 404, &kb).await;
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains("kb-bot") && detail.contains("\"Gone soon\""),
        "{detail}"
    );

    // Nested presets and cycles.
    create(
        &gw,
        &admin,
        json!({"id": "a", "name": "A", "base_model_id": "m:latest"}),
    )
    .await;
    create(
        &gw,
        &admin,
        json!({"id": "b", "name": "B", "base_model_id": "a"}),
    )
    .await;
    let r = gw
        .post(
            "/api/v1/models/model/update?id=a",
            Some(&admin),
            json!({"id": "a", "name": "A", "base_model_id": "b"}),
        )
        .await;
    assert_error(r, 400, "cycle").await;
    let r = gw
        .post(
            "/api/v1/models/create",
            Some(&admin),
            json!({"id": "c", "name": "C", "base_model_id": "no-such-model"}),
        )
        .await;
    assert_error(r, 400, "no-such-model").await;

    // The base model disappears upstream.
    up.set_models(&[]);
    assert_eq!(
        gw.get("/api/models?refresh=true", Some(&admin))
            .await
            .status(),
        200
    );
    let v = assert_error(chat(&gw, &admin, "b", "hi").await, 400, "m:latest").await;
    assert!(v["detail"].as_str().unwrap().contains("\"a\""), "{v}");
}

/// `/ollama/api/chat` and `/ollama/api/generate` take a preset name: the base model,
/// options, system prompt and knowledge reach Ollama in its own format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_ollama_routes_take_a_preset() {
    let (up, gw, admin) = setup().await;
    let f = upload_text(&gw, &admin, "r.txt", DOC).await;
    let fid = f["id"].as_str().unwrap();
    create(
        &gw,
        &admin,
        json!({"id": "native", "name": "Native", "base_model_id": "m:latest",
               "params": {"system": "Preset prompt.", "temperature": 0.2, "max_tokens": 32, "keep_alive": "1m"},
               "meta": {"knowledge": [{"type": "file", "id": fid, "name": "r.txt"}]}}),
    )
    .await;
    let r = gw
        .post(
            "/ollama/api/chat",
            Some(&admin),
            json!({"model": "native", "stream": false, "options": {"temperature": 0.9},
                   "messages": [{"role": "user", "content": "Who files it?"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["message"]["content"], "Hello from m:latest");
    let (b, text) = last_body(&up, "/api/chat");
    assert!(!text.contains("native"), "{text}");
    assert_eq!(b["model"], "m:latest");
    assert_eq!(b["options"]["temperature"], 0.9, "the request wins");
    assert_eq!(b["options"]["num_predict"], 32);
    assert_eq!(b["keep_alive"], "1m");
    assert_eq!(
        b["messages"][0],
        json!({"role": "system", "content": "Preset prompt."})
    );
    let last = b["messages"][1]["content"].as_str().unwrap();
    assert!(
        last.contains(DOC) && last.ends_with("\nWho files it?"),
        "{last}"
    );

    let r = gw
        .post(
            "/ollama/api/generate",
            Some(&admin),
            json!({"model": "native", "stream": false, "system": "Mine.", "prompt": "Who files it?"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let (b, _) = last_body(&up, "/api/generate");
    assert_eq!(b["model"], "m:latest");
    assert_eq!(b["system"], "Preset prompt.\nMine.");
    assert_eq!(b["options"]["temperature"], 0.2);
    let prompt = b["prompt"].as_str().unwrap();
    assert!(
        prompt.contains(DOC) && prompt.ends_with("\nWho files it?"),
        "{prompt}"
    );
}

/// Presets live in the store: a restart keeps them, with their grants and state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presets_survive_a_restart() {
    let (up, gw, admin) = setup().await;
    let mut f = json!({"id": "kept", "name": "Kept", "base_model_id": "m:latest",
                       "params": {"system": "Still here."}, "access_grants": public()});
    create(&gw, &admin, f.clone()).await;
    f["id"] = json!("off");
    create(&gw, &admin, f).await;
    let r = gw
        .post(
            "/api/v1/models/model/toggle?id=off",
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let dir = gw.stop().await;
    let gw = Setup::new().ollama(&up.url).start_in(dir).await;
    let r = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "admin@example.com", "password": "pw-123456"}),
        )
        .await;
    let admin = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let got: Value = gw
        .get("/api/v1/models/model?id=kept", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["params"]["system"], "Still here.");
    assert_eq!(got["access_grants"][0]["principal_id"], "*");
    let off: Value = gw
        .get("/api/v1/models/model?id=off", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(off["is_active"], false);
    assert_eq!(chat(&gw, &admin, "kept", "hi").await.status(), 200);
    let (b, _) = last_body(&up, "/v1/chat/completions");
    assert_eq!(b["messages"][0]["content"], "Still here.");
}
