//! Open WebUI's retrieval API (`/api/v1/retrieval/*`) and batch adds to collections:
//! shapes, equality with what chat retrieves, access per name, process/text, batch outcomes.

mod common;

use common::fake::FakeUpstream;
use common::gateway::{Gateway, Setup, assert_error};
use common::upload::{collection, upload_text};
use reqwest::Response;
use serde_json::{Value, json};

async fn json_ok(r: Response) -> Value {
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

const TEXTS: [(&str, &str); 5] = [
    (
        "alpha.txt",
        "The alpha reactor uses liquid sodium coolant at high temperature.",
    ),
    (
        "beta.txt",
        "Beta reactor coolant is pressurised water, pumped in two loops.",
    ),
    (
        "gamma.txt",
        "Gardening tips: water tomatoes in the morning, not at noon.",
    ),
    (
        "delta.txt",
        "The delta team maintains the coolant pumps of every reactor.",
    ),
    (
        "eps.txt",
        "Epsilon notes: the cafeteria opens at eight and closes at two.",
    ),
];

async fn corpus(gw: &Gateway, token: &str) -> (Vec<String>, String) {
    let mut ids = Vec::new();
    for (name, text) in TEXTS {
        ids.push(
            upload_text(gw, token, name, text).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let kb = collection(gw, token, "Plant", &refs).await;
    (ids, kb)
}

async fn query_doc(gw: &Gateway, token: &str, body: Value) -> Response {
    gw.post("/api/v1/retrieval/query/doc", Some(token), body)
        .await
}

/// What chat retrieved for `item` and `question`: its single source.
async fn chat_source(gw: &Gateway, token: &str, item: Value, question: &str) -> Value {
    let v = json_ok(
        gw.post(
            "/api/chat/completions",
            Some(token),
            json!({"model": "m:latest", "stream": false, "files": [item],
                   "messages": [{"role": "user", "content": question}]}),
        )
        .await,
    )
    .await;
    v["sources"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_doc_returns_exactly_what_chat_retrieves() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    for hybrid in ["true", "false"] {
        let gw = Setup::new()
            .ollama(&up.url)
            .env("ENABLE_RAG_HYBRID_SEARCH", hybrid)
            .start()
            .await;
        let admin = gw.admin().await;
        let (ids, kb) = corpus(&gw, &admin).await;
        let q = "Which coolant does the reactor use?";

        let chat = chat_source(
            &gw,
            &admin,
            json!({"type": "collection", "id": kb, "name": "Plant"}),
            q,
        )
        .await;
        let api =
            json_ok(query_doc(&gw, &admin, json!({"collection_name": kb, "query": q})).await).await;
        assert_eq!(
            api["documents"],
            json!([chat["document"]]),
            "hybrid={hybrid}"
        );
        assert_eq!(
            api["distances"],
            json!([chat["distances"]]),
            "hybrid={hybrid}"
        );
        assert_eq!(
            api["metadatas"],
            json!([chat["metadata"]]),
            "hybrid={hybrid}"
        );
        assert_eq!(
            api["documents"][0].as_array().unwrap().len(),
            3,
            "RAG_TOP_K default"
        );

        // One file, by Open WebUI's `file-{id}` name.
        let chat = chat_source(
            &gw,
            &admin,
            json!({"type": "file", "id": ids[1], "name": "beta.txt"}),
            q,
        )
        .await;
        let api = json_ok(
            query_doc(
                &gw,
                &admin,
                json!({"collection_name": format!("file-{}", ids[1]), "query": q}),
            )
            .await,
        )
        .await;
        assert_eq!(api["documents"], json!([chat["document"]]));
        assert_eq!(api["distances"], json!([chat["distances"]]));
        assert_eq!(api["metadatas"][0][0]["file_id"], ids[1].as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_threshold_and_mode_are_honoured() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let (_, kb) = corpus(&gw, &admin).await;
    let q = "reactor coolant";
    let v = json_ok(
        query_doc(
            &gw,
            &admin,
            json!({"collection_name": kb, "query": q, "k": 5}),
        )
        .await,
    )
    .await;
    assert_eq!(v["documents"][0].as_array().unwrap().len(), 5);
    let d: Vec<f64> = v["distances"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let v = json_ok(
        query_doc(
            &gw,
            &admin,
            json!({"collection_name": kb, "query": q, "k": 1, "hybrid": false}),
        )
        .await,
    )
    .await;
    assert_eq!(v["documents"][0].as_array().unwrap().len(), 1);
    // Dense ranking puts the best cosine first.
    let best = d.iter().copied().fold(f64::MIN, f64::max);
    assert!((v["distances"][0][0].as_f64().unwrap() - best).abs() < 1e-6);
    // A threshold above every score leaves nothing.
    let v = json_ok(
        query_doc(
            &gw,
            &admin,
            json!({"collection_name": kb, "query": q, "k": 5, "r": 1.0}),
        )
        .await,
    )
    .await;
    assert!(v["documents"][0].as_array().unwrap().len() <= 1);
    let v = json_ok(
        query_doc(
            &gw,
            &admin,
            json!({"collection_name": kb, "query": q, "hybrid": true, "hybrid_bm25_weight": 1.0}),
        )
        .await,
    )
    .await;
    assert_eq!(v["documents"][0].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_collection_merges_names_best_first() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let (ids, kb) = corpus(&gw, &admin).await;
    let other = upload_text(
        &gw,
        &admin,
        "zeta.txt",
        "Zeta: reactor coolant audits happen yearly.",
    )
    .await;
    let zeta = other["id"].as_str().unwrap();
    let v = json_ok(
        gw.post(
            "/api/v1/retrieval/query/collection",
            Some(&admin),
            json!({"collection_names": [kb, format!("file-{zeta}"), format!("file-{}", ids[0])],
                   "query": "reactor coolant", "k": 4}),
        )
        .await,
    )
    .await;
    let docs = v["documents"][0].as_array().unwrap();
    assert_eq!(docs.len(), 4);
    let unique: std::collections::HashSet<&str> =
        docs.iter().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(
        unique.len(),
        4,
        "the alpha text is in two names but returned once"
    );
    let d: Vec<f64> = v["distances"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(d.windows(2).all(|w| w[0] >= w[1]), "best first: {d:?}");
    assert_eq!(v["metadatas"][0].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_name_is_access_checked_and_unreadable_is_404() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let alice = gw.user(&admin, "alice@example.com").await;
    let mallory = gw.user(&admin, "mallory@example.com").await;
    let (ids, kb) = corpus(&gw, &alice).await;
    let mine = upload_text(&gw, &mallory, "m.txt", "Mallory's own reactor notes.").await;
    let mine = format!("file-{}", mine["id"].as_str().unwrap());

    for name in [
        kb.clone(),
        format!("file-{}", ids[0]),
        "no-such-kb".into(),
        "file-nope".into(),
    ] {
        assert_error(
            query_doc(
                &gw,
                &mallory,
                json!({"collection_name": name, "query": "reactor"}),
            )
            .await,
            404,
            "not found",
        )
        .await;
    }
    // One unreadable name fails the whole query: never a partial or empty answer.
    assert_error(
        gw.post(
            "/api/v1/retrieval/query/collection",
            Some(&mallory),
            json!({"collection_names": [mine, kb], "query": "reactor"}),
        )
        .await,
        404,
        "not found",
    )
    .await;
    // The owner, and an admin, may.
    json_ok(
        query_doc(
            &gw,
            &alice,
            json!({"collection_name": kb, "query": "reactor"}),
        )
        .await,
    )
    .await;
    json_ok(
        query_doc(
            &gw,
            &admin,
            json!({"collection_name": kb, "query": "reactor"}),
        )
        .await,
    )
    .await;
    // Pending users and anonymous callers reach nothing.
    assert_error(
        gw.post(
            "/api/v1/retrieval/query/doc",
            None,
            json!({"collection_name": kb, "query": "x"}),
        )
        .await,
        401,
        "Not authenticated",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_text_stores_a_searchable_file_and_fills_a_collection() {
    let gw = Setup::new()
        .toml("[rag]\nfile-max-size-mb = 1")
        .start()
        .await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "writer@example.com").await;
    let other = gw.user(&admin, "other@example.com").await;
    let text = "The north turbine hall is closed on Sundays for inspection.";
    let v = json_ok(
        gw.post(
            "/api/v1/retrieval/process/text",
            Some(&user),
            json!({"name": "hall notes", "content": text}),
        )
        .await,
    )
    .await;
    assert_eq!(v["status"], true);
    assert_eq!(v["content"], text);
    let fid = v["file_id"].as_str().unwrap().to_string();
    assert_eq!(v["collection_name"], format!("file-{fid}"));
    let f = json_ok(gw.get(&format!("/api/v1/files/{fid}"), Some(&user)).await).await;
    assert_eq!(f["data"]["status"], "completed");
    assert_eq!(f["meta"]["name"], "hall notes");
    assert_eq!(f["data"]["content"], text);
    let hits = json_ok(
        query_doc(
            &gw,
            &user,
            json!({"collection_name": v["collection_name"], "query": "turbine hall"}),
        )
        .await,
    )
    .await;
    assert_eq!(hits["documents"][0][0], text);

    // Into a collection of the caller's.
    let kb = collection(&gw, &user, "Notes", &[]).await;
    let v = json_ok(
        gw.post(
            "/api/v1/retrieval/process/text",
            Some(&user),
            json!({"name": "pumps.md", "content": "Pump P-7 was replaced in May.", "collection_name": kb}),
        )
        .await,
    )
    .await;
    assert_eq!(v["collection_name"], kb.as_str());
    let files = json_ok(
        gw.get(&format!("/api/v1/knowledge/{kb}/files"), Some(&user))
            .await,
    )
    .await;
    assert_eq!(files["total"], 1);
    // Another user's collection is not there for them; nothing is stored then.
    let before = gw.app().store().files().unwrap().len();
    assert_error(
        gw.post(
            "/api/v1/retrieval/process/text",
            Some(&other),
            json!({"name": "x", "content": "y", "collection_name": kb}),
        )
        .await,
        404,
        "could not find",
    )
    .await;
    // Content beyond the upload limit (1 MiB here) is a 413.
    assert_error(
        gw.post(
            "/api/v1/retrieval/process/text",
            Some(&user),
            json!({"name": "big", "content": "a".repeat(1024 * 1024 + 1)}),
        )
        .await,
        413,
        "content is larger than",
    )
    .await;
    assert_eq!(gw.app().store().files().unwrap().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_add_reports_each_files_outcome() {
    let gw = Setup::new().start().await;
    let admin = gw.admin().await;
    let user = gw.user(&admin, "batch@example.com").await;
    let other = gw.user(&admin, "someone@example.com").await;
    let a = upload_text(&gw, &user, "a.txt", "First text of the batch.").await;
    let b = upload_text(&gw, &user, "b.txt", "Second text of the batch.").await;
    let dup = upload_text(&gw, &user, "a-copy.txt", "First text of the batch.").await;
    let foreign = upload_text(&gw, &other, "o.txt", "Someone else's text.").await;
    let (a, b, dup, foreign) = (
        a["id"].as_str().unwrap(),
        b["id"].as_str().unwrap(),
        dup["id"].as_str().unwrap(),
        foreign["id"].as_str().unwrap(),
    );
    let kb = collection(&gw, &user, "Batch", &[]).await;
    let v = json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/files/batch/add"),
            Some(&user),
            json!([{"file_id": a}, {"file_id": "missing"}, {"file_id": b}, {"file_id": foreign},
                   {"file_id": dup}, {"file_id": a}]),
        )
        .await,
    )
    .await;
    let results = v["results"].as_array().unwrap();
    let outcome: Vec<(&str, &str)> = results
        .iter()
        .map(|r| {
            (
                r["file_id"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcome,
        vec![
            (a, "added"),
            ("missing", "error"),
            (b, "added"),
            (foreign, "error"),
            (dup, "error"),
            (a, "already_added")
        ]
    );
    assert!(results[1]["error"].as_str().unwrap().contains("not found"));
    assert!(
        results[3]["error"].as_str().unwrap().contains("not found"),
        "another user's file is not revealed"
    );
    assert!(
        results[4]["error"]
            .as_str()
            .unwrap()
            .contains("Duplicate content")
    );
    assert_eq!(v["warnings"]["errors"].as_array().unwrap().len(), 3);
    let ids: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&a) && ids.contains(&b));
    // The added files are searchable in the collection at once.
    let hits = json_ok(
        query_doc(
            &gw,
            &user,
            json!({"collection_name": kb, "query": "second text", "k": 2}),
        )
        .await,
    )
    .await;
    assert_eq!(hits["documents"][0].as_array().unwrap().len(), 2);

    // All good: no warnings. Too many at once: refused before any is added.
    let c = upload_text(&gw, &user, "c.txt", "Third text.").await;
    let v = json_ok(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/files/batch/add"),
            Some(&user),
            json!([{"file_id": c["id"]}]),
        )
        .await,
    )
    .await;
    assert!(v["warnings"].is_null());
    let many: Vec<Value> = (0..257)
        .map(|i| json!({"file_id": format!("f{i}")}))
        .collect();
    assert_error(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/files/batch/add"),
            Some(&user),
            json!(many),
        )
        .await,
        413,
        "at most 256",
    )
    .await;
    // Another user cannot batch into this collection at all.
    assert_error(
        gw.post(
            &format!("/api/v1/knowledge/{kb}/files/batch/add"),
            Some(&other),
            json!([{"file_id": foreign}]),
        )
        .await,
        404,
        "could not find",
    )
    .await;
}
