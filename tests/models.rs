//! `GET /api/models`: the merged model list, its bounded fan-out, its cache and who sees what.

mod common;

use std::time::{Duration, Instant};

use common::fake::{FakeUpstream, dead_url};
use common::gateway::{Gateway, Setup, assert_error};
use serde_json::{Value, json};

/// `GET path` as `token`; asserts 200 and returns the JSON body.
async fn get_json(gw: &Gateway, path: &str, token: &str) -> Value {
    let r = gw.get(path, Some(token)).await;
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

/// The `data` array of `/api/models` (optionally `?refresh=true`).
async fn models(gw: &Gateway, token: &str, refresh: bool) -> Vec<Value> {
    let path = if refresh {
        "/api/models?refresh=true"
    } else {
        "/api/models"
    };
    let v = get_json(gw, path, token).await;
    v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data array in {v}"))
        .clone()
}

fn ids(data: &[Value]) -> Vec<String> {
    data.iter()
        .map(|m| m["id"].as_str().expect("string id").to_string())
        .collect()
}

fn find<'a>(data: &'a [Value], id: &str) -> &'a Value {
    data.iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {:?}", ids(data)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_list_from_ollama_and_openai() {
    let ollama = FakeUpstream::ollama(&["llama3.2:latest"]).await;
    let openai = FakeUpstream::openai(&["gpt-4o"])
        .await
        .with_api_key("sk-upstream");
    let gw = Setup::new()
        .toml(&format!(
            "[[ollama]]\nurl = {:?}\ntags = [\"home\"]\n[[openai]]\nurl = {:?}\nkey = \"sk-upstream\"\ntags = [\"cloud\", \"paid\"]",
            ollama.url, openai.url
        ))
        .start()
        .await;
    let admin = gw.admin().await;

    let body = get_json(&gw, "/api/models", &admin).await;
    let top: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(top, vec!["data"], "top level is {{\"data\": [...]}} only");
    let data = body["data"].as_array().unwrap();
    assert_eq!(
        ids(data),
        vec!["gpt-4o", "llama3.2:latest"],
        "both upstreams, sorted by name"
    );

    // The OpenAI-compatible model.
    let g = find(data, "gpt-4o");
    assert_eq!(g["name"], "gpt-4o");
    assert_eq!(g["object"], "model");
    assert_eq!(g["created"], 1_700_000_000u64, "upstream's created kept");
    assert_eq!(g["owned_by"], "openai");
    assert_eq!(
        g["openai"],
        json!({"id": "gpt-4o", "object": "model", "created": 1_700_000_000u64, "owned_by": "openai"}),
        "raw upstream object"
    );
    assert_eq!(g["urls"], json!([0]));
    assert_eq!(g["connection_type"], "external");
    assert_eq!(g["tags"], json!([{"name": "cloud"}, {"name": "paid"}]));

    // The Ollama model.
    let l = find(data, "llama3.2:latest");
    assert_eq!(l["name"], "llama3.2:latest");
    assert_eq!(l["object"], "model");
    assert!(l["created"].is_u64(), "created is a number: {l}");
    assert_eq!(l["owned_by"], "ollama");
    assert_eq!(l["urls"], json!([0]));
    assert_eq!(l["connection_type"], "local");
    assert_eq!(l["tags"], json!([{"name": "home"}]));
    let raw = &l["ollama"];
    assert_eq!(raw["name"], "llama3.2:latest");
    assert_eq!(raw["model"], "llama3.2:latest");
    assert_eq!(raw["size"], 2_019_393_189u64);
    assert_eq!(raw["details"]["family"], "llama");
    assert_eq!(raw["urls"], json!([0]));
    assert_eq!(raw["connection_type"], "local");
    assert_eq!(
        raw["digest"].as_str().unwrap().len(),
        64,
        "raw /api/tags entry"
    );
    assert!(l.get("openai").is_none() && g.get("ollama").is_none());

    // The OpenAI upstream got its configured key; Ollama got no credential at all.
    let lists = openai.requests_to("/models");
    assert!(
        !lists.is_empty(),
        "OpenAI upstream was asked for its models"
    );
    for r in &lists {
        assert_eq!(r.method, "GET");
        assert_eq!(r.header("authorization"), Some("Bearer sk-upstream"));
    }
    let tags = ollama.requests_to("/api/tags");
    assert!(!tags.is_empty(), "Ollama upstream was asked for its tags");
    for r in &tags {
        assert_eq!(r.header("authorization"), None);
    }

    // The alias answers the same.
    let alias = get_json(&gw, "/api/v1/models", &admin).await;
    assert_eq!(alias, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_ollama_model_on_two_upstreams_is_one_entry() {
    let a = FakeUpstream::ollama(&["shared:latest", "only-a:latest"]).await;
    let b = FakeUpstream::ollama(&["shared:latest", "only-b:latest"]).await;
    let gw = Setup::new().ollama(&a.url).ollama(&b.url).start().await;
    let admin = gw.admin().await;
    let data = models(&gw, &admin, false).await;
    assert_eq!(
        ids(&data),
        vec!["only-a:latest", "only-b:latest", "shared:latest"]
    );
    let shared = find(&data, "shared:latest");
    assert_eq!(shared["urls"], json!([0, 1]));
    assert_eq!(shared["ollama"]["urls"], json!([0, 1]));
    assert_eq!(find(&data, "only-a:latest")["urls"], json!([0]));
    assert_eq!(find(&data, "only-b:latest")["urls"], json!([1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_id_and_model_ids_per_connection() {
    let ollama = FakeUpstream::ollama(&["m:latest", "hidden:latest"]).await;
    let openai = FakeUpstream::openai(&["gpt-4o", "gpt-3.5", "o1"]).await;
    let plain = FakeUpstream::openai(&["a", "b"]).await;
    let gw = Setup::new()
        .toml(&format!(
            "[[ollama]]\nurl = {:?}\nprefix-id = \"q\"\nmodel-ids = [\"m:latest\"]\n\
             [[openai]]\nurl = {:?}\nprefix-id = \"p\"\n\
             [[openai]]\nurl = {:?}\nmodel-ids = [\"b\"]",
            ollama.url, openai.url, plain.url
        ))
        .start()
        .await;
    let admin = gw.admin().await;
    let data = models(&gw, &admin, false).await;
    let mut got = ids(&data);
    got.sort();
    assert_eq!(
        got,
        vec!["b", "p.gpt-3.5", "p.gpt-4o", "p.o1", "q.m:latest"]
    );

    let p = find(&data, "p.gpt-4o");
    assert_eq!(p["name"], "p.gpt-4o", "OpenAI name falls back to the id");
    assert_eq!(
        p["openai"]["id"], "gpt-4o",
        "raw object keeps the upstream id"
    );
    assert_eq!(p["urls"], json!([0]));

    let q = find(&data, "q.m:latest");
    assert_eq!(q["name"], "m:latest", "Ollama name is the raw name");
    assert_eq!(q["ollama"]["model"], "q.m:latest");

    let b = find(&data, "b");
    assert_eq!(b["urls"], json!([1]), "second OpenAI connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_slow_upstreams_do_not_hold_the_list_hostage() {
    let healthy = FakeUpstream::ollama(&["h1:latest"]).await;
    let slow = FakeUpstream::ollama(&["s1:latest"]).await;
    slow.set_list_delay(Duration::from_secs(5));
    let gw = Setup::new()
        .ollama(&healthy.url)
        .ollama(&dead_url())
        .ollama(&slow.url)
        .toml("[models]\nlist-timeout = \"500ms\"")
        .start()
        .await;
    let admin = gw.admin().await;

    let t = Instant::now();
    let data = models(&gw, &admin, false).await;
    let elapsed = t.elapsed();
    assert!(
        elapsed < Duration::from_millis(2500),
        "answered in {elapsed:?}"
    );
    assert_eq!(
        ids(&data),
        vec!["h1:latest"],
        "healthy upstream's models only"
    );
    assert_eq!(find(&data, "h1:latest")["urls"], json!([0]));

    // The slow upstream's answer still lands in the cache once it arrives: every refresh
    // from now on gives up on it after the bound, so its models can only come from an answer
    // that arrived after the request that asked for it had returned.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = Instant::now();
        let data = models(&gw, &admin, true).await;
        assert!(
            t.elapsed() < Duration::from_millis(2500),
            "refresh answered in {:?}",
            t.elapsed()
        );
        if ids(&data).contains(&"s1:latest".to_string()) {
            assert_eq!(find(&data, "s1:latest")["urls"], json!([2]));
            assert!(ids(&data).contains(&"h1:latest".to_string()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow upstream's late answer never reached the cache: {:?}",
            ids(&data)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_represented_by_its_last_known_list() {
    let healthy = FakeUpstream::ollama(&["h1:latest"]).await;
    let slow = FakeUpstream::ollama(&["s1:latest"]).await;
    let gw = Setup::new()
        .ollama(&healthy.url)
        .ollama(&dead_url())
        .ollama(&slow.url)
        .toml("[models]\nlist-timeout = \"500ms\"")
        .start()
        .await;
    let admin = gw.admin().await;

    // Fast at first, so its list is known.
    let data = models(&gw, &admin, true).await;
    assert_eq!(ids(&data), vec!["h1:latest", "s1:latest"]);

    // Now slow, with a different list it will only report after 5 s.
    slow.set_list_delay(Duration::from_secs(5));
    slow.set_models(&["s2:latest"]);
    let before = slow.requests_to("/api/tags").len();
    let t = Instant::now();
    let data = models(&gw, &admin, true).await;
    let elapsed = t.elapsed();
    assert!(
        elapsed < Duration::from_millis(2500),
        "answered in {elapsed:?}"
    );
    assert!(
        slow.requests_to("/api/tags").len() > before,
        "the refresh did ask the slow upstream"
    );
    assert_eq!(
        ids(&data),
        vec!["h1:latest", "s1:latest"],
        "last known list of the slow upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_until_ttl_or_refresh() {
    let ollama = FakeUpstream::ollama(&["old:latest"]).await;
    let openai = FakeUpstream::openai(&["old-gpt"]).await;
    let gw = Setup::new()
        .ollama(&ollama.url)
        .openai(&openai.url)
        .toml("[models]\ncache-ttl = \"1h\"")
        .start()
        .await;
    let admin = gw.admin().await;
    assert_eq!(
        ids(&models(&gw, &admin, false).await),
        vec!["old-gpt", "old:latest"]
    );

    ollama.set_models(&["new:latest"]);
    openai.set_models(&["new-gpt"]);
    let asked = ollama.requests_to("/api/tags").len() + openai.requests_to("/models").len();
    assert_eq!(
        ids(&models(&gw, &admin, false).await),
        vec!["old-gpt", "old:latest"],
        "served from the cache"
    );
    assert_eq!(
        ollama.requests_to("/api/tags").len() + openai.requests_to("/models").len(),
        asked,
        "a cached answer does not touch the upstreams"
    );

    assert_eq!(
        ids(&models(&gw, &admin, true).await),
        vec!["new-gpt", "new:latest"],
        "refresh=true fetches again"
    );
    assert_eq!(
        ids(&models(&gw, &admin, false).await),
        vec!["new-gpt", "new:latest"],
        "and the refreshed list is cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lists_of_users_and_keys() {
    let ollama = FakeUpstream::ollama(&["x:latest", "y:latest", "z:latest"]).await;
    let gw = Setup::new()
        .ollama(&ollama.url)
        .toml("[auth]\nmodel-access = { \"Limited@Example.com\" = [\"x:latest\", \"y:latest\"] }")
        .start()
        .await;
    let admin = gw.admin().await;
    let all = vec!["x:latest", "y:latest", "z:latest"];
    assert_eq!(ids(&models(&gw, &admin, false).await), all);

    // A user with a configured allow-list (emails compare case-insensitively).
    let limited = gw.user(&admin, "limited@example.com").await;
    assert_eq!(
        ids(&models(&gw, &limited, false).await),
        vec!["x:latest", "y:latest"]
    );

    // A user without one sees everything...
    let free = gw.user(&admin, "free@example.com").await;
    assert_eq!(ids(&models(&gw, &free, false).await), all);

    // ...but an API key restricted to one model sees only that one,
    let r = gw
        .post(
            "/api/v1/auths/api_key",
            Some(&free),
            json!({"models": ["x:latest"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let key = r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(ids(&models(&gw, &key, false).await), vec!["x:latest"]);
    // and may chat with it only.
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let r = gw
        .post("/api/chat/completions", Some(&key), chat("y:latest"))
        .await;
    let v = assert_error(r, 400, "Model not found").await;
    assert_eq!(v["detail"], "Model not found");
    let r = gw
        .post("/api/chat/completions", Some(&key), chat("x:latest"))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from x:latest");
    // The session of the same user is not restricted by the key's list.
    let r = gw
        .post("/api/chat/completions", Some(&free), chat("y:latest"))
        .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();

    // A key of the limited user gets the intersection of both lists.
    let r = gw
        .post(
            "/api/v1/auths/api_key",
            Some(&limited),
            json!({"models": ["x:latest", "z:latest"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let limited_key = r.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        ids(&models(&gw, &limited_key, false).await),
        vec!["x:latest"]
    );
    let r = gw
        .post(
            "/api/chat/completions",
            Some(&limited_key),
            chat("z:latest"),
        )
        .await;
    assert_error(r, 400, "Model not found").await;
    let r = gw
        .post("/api/chat/completions", Some(&limited), chat("z:latest"))
        .await;
    assert_error(r, 400, "Model not found").await;

    // Pending users and anonymous callers get 401.
    let pending = gw.signup("pending@example.com").await;
    assert_eq!(pending["role"], "pending");
    let pending = pending["token"].as_str().unwrap();
    assert_error(gw.get("/api/models", Some(pending)).await, 401, "").await;
    assert_error(gw.get("/api/v1/models", Some(pending)).await, 401, "").await;
    let r = gw
        .post("/api/chat/completions", Some(pending), chat("x:latest"))
        .await;
    assert_error(r, 401, "").await;
    assert_error(gw.get("/api/models", None).await, 401, "Not authenticated").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_and_rejected_keys() {
    let ollama = FakeUpstream::ollama(&["dup", "o-only"]).await;
    let first = FakeUpstream::openai(&["dup", "same"]).await;
    let second = FakeUpstream::openai(&["same", "second-only"]).await;
    let locked = FakeUpstream::openai(&["locked"])
        .await
        .with_api_key("sk-right");
    let gw = Setup::new()
        .ollama(&ollama.url)
        .openai(&first.url)
        .openai(&second.url)
        .toml(&format!(
            "[[openai]]\nurl = {:?}\nkey = \"sk-wrong\"",
            locked.url
        ))
        .start()
        .await;
    let admin = gw.admin().await;
    let data = models(&gw, &admin, false).await;
    assert_eq!(ids(&data), vec!["dup", "o-only", "same", "second-only"]);
    // Ollama comes last and wins over an OpenAI model with the same id.
    assert_eq!(find(&data, "dup")["owned_by"], "ollama");
    // Between OpenAI connections, the first wins.
    assert_eq!(find(&data, "same")["urls"], json!([0]));
    assert_eq!(find(&data, "second-only")["urls"], json!([1]));
    // The connection whose key was refused is skipped, but was asked with its key.
    assert!(
        locked
            .requests_to("/models")
            .iter()
            .all(|r| r.header("authorization") == Some("Bearer sk-wrong"))
    );

    // Chat follows the list: `dup` goes to Ollama.
    let r = gw
        .post(
            "/api/chat/completions",
            Some(&admin),
            json!({"model": "dup", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert_eq!(ollama.requests_to("/v1/chat/completions").len(), 1);
    assert!(first.requests_to("/chat/completions").is_empty());
}
