//! Contextual chunk headers (`rag.title-in-chunks`): a document's first line and file name
//! now shape how every chunk is indexed, so hostile ones must stay bounded and must never
//! leak into the stored or injected text; queries keep their limits on the query lane.

use serde_json::{Value, json};

use super::common::gateway::{Gateway, Setup};
use super::common::upload::upload_text;
use super::support;

async fn titled() -> (Gateway, String) {
    let gw = Setup::new()
        .toml("[rag]\ntitle-in-chunks = true\nchunk-size = 200\nchunk-overlap = 0")
        .start()
        .await;
    let admin = gw.admin().await;
    (gw, admin)
}

async fn search(gw: &Gateway, token: &str, file: &str, query: &str) -> reqwest::Response {
    gw.post(
        "/api/v1/retrieval/query/doc",
        Some(token),
        json!({"collection_name": format!("file-{file}"), "query": query, "k": 100}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_first_line_is_no_title_and_an_oversized_query_is_413() {
    let (gw, admin) = titled().await;
    // 250 KB without a line break, then a blank line: far too long to be a title, and the
    // title search must not scan it whole.
    let text = format!(
        "{}\n\nreactor coolant pressure notes\n",
        "spam ".repeat(50_000)
    );
    let f = upload_text(&gw, &admin, "MED-77.txt", &text).await;
    let id = f["id"].as_str().unwrap();
    let r = search(&gw, &admin, id, "reactor coolant pressure").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let docs = v["documents"][0].as_array().unwrap();
    assert!(!docs.is_empty());
    // Stored chunks are slices of the text: neither a title nor the file name is added.
    for d in docs {
        let d = d.as_str().unwrap();
        assert!(text.contains(d), "chunk not from the text: {:.80}", d);
        assert!(!d.starts_with("MED"), "{d:.80}");
    }
    let long = "pressure ".repeat(3_000);
    support::clear_error(search(&gw, &admin, id, &long).await, 413).await;
    support::alive(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyword_stuffed_first_line_is_no_title_and_k_out_of_range_is_422() {
    let (gw, admin) = titled().await;
    // A first line of 10,000 keywords is longer than a title may be, so it is not carried
    // into every chunk (the file name is, and only into the index).
    let stuffed = "reactor ".repeat(10_000);
    let body = "unrelated filler sentence about gardens. ".repeat(100);
    let text = format!("{stuffed}\n\n{body}");
    let f = upload_text(&gw, &admin, "notes.txt", &text).await;
    let id = f["id"].as_str().unwrap();
    let r = search(&gw, &admin, id, "gardens filler").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let docs = v["documents"][0].as_array().unwrap();
    assert!(!docs.is_empty());
    for d in docs {
        let d = d.as_str().unwrap();
        assert!(text.contains(d), "chunk not from the text: {d:.80}");
        assert!(!d.starts_with("notes"), "{d:.80}");
    }
    let r = gw
        .post(
            "/api/v1/retrieval/query/doc",
            Some(&admin),
            json!({"collection_name": format!("file-{id}"), "query": "gardens", "k": 100_000}),
        )
        .await;
    support::clear_error(r, 422).await;
    support::alive(&gw).await;
}
