//! Large collections: above `rag.hnsw-threshold` a collection gets an HNSW graph (usearch by
//! default, hora on request) built in the background, saved under `data/index/`, and loaded
//! at the next start instead of rebuilt; deleted chunks never come back, a corrupt save is
//! rebuilt, and deleting the collection deletes its graph.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::gateway::{Gateway, Setup};
use common::upload::{collection, upload_text};
use ragway::index::GraphKind;
use reqwest::Method;

/// Six chunks per file (chunk size 200): 6 files cross a threshold of 30, 5 still do.
fn document(n: usize) -> String {
    (0..12)
        .map(|p| {
            format!(
                "Document {n} paragraph {p}: the {} of the {} is measured in {} units near {}.",
                [
                    "harbour", "orchard", "glacier", "library", "foundry", "meadow"
                ][(n + p) % 6],
                ["north", "south", "east", "west", "centre"][(n * 7 + p) % 5],
                ["copper", "amber", "cobalt", "ivory"][(n + 3 * p) % 4],
                [
                    "lighthouse",
                    "windmill",
                    "quarry",
                    "observatory",
                    "canal",
                    "bridge",
                    "mill"
                ][p % 7],
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn index_files(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("index"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits until the saved files differ from `old` (a new save: header plus one graph file).
async fn wait_for_new_files(data: &Path, old: &[PathBuf]) -> Vec<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = index_files(data);
        if now != old && now.len() == 2 {
            return now;
        }
        assert!(Instant::now() < deadline, "no new save: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_graph(gw: &Gateway, kb: &str, len: usize) -> GraphKind {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((kind, n)) = gw.app().vectors().graph_info(kb)
            && n == len
        {
            return kind;
        }
        assert!(
            Instant::now() < deadline,
            "no graph of {len} vectors for {kb}: {:?}",
            gw.app().vectors().graph_info(kb)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The collection's best 5 for each of a few stored chunk vectors.
fn results(gw: &Gateway, kb: &str, probes: &[(String, u64)]) -> Vec<Vec<u64>> {
    let v = &gw.app().vectors();
    probes
        .iter()
        .map(|(file, chunk)| {
            let q = v.vector(file, *chunk).expect("stored vector");
            v.search_collection(kb, &q, 5)
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        })
        .collect()
}

async fn graph_survives_restarts(kind: &str, expected: GraphKind) {
    let toml = format!(
        "[rag]\nhnsw-threshold = 30\nchunk-size = 200\nchunk-overlap = 0\nvector-index = \"{kind}\""
    );
    let gw = Setup::new().toml(&toml).start().await;
    let admin = gw.admin().await;
    let mut files = Vec::new();
    for n in 0..6 {
        let v = upload_text(&gw, &admin, &format!("doc{n}.txt"), &document(n)).await;
        files.push(v["id"].as_str().unwrap().to_string());
    }
    let names: Vec<&str> = files.iter().map(String::as_str).collect();
    let kb = collection(&gw, &admin, "big", &names).await;
    let store = &gw.app().store();
    let chunks: Vec<Vec<u64>> = files
        .iter()
        .map(|f| store.file_chunk_ids(f).unwrap())
        .collect();
    let total: usize = chunks.iter().map(Vec::len).sum();
    assert!(total >= 36, "only {total} chunks");
    assert_eq!(wait_for_graph(&gw, &kb, total).await, expected);

    // Saved beside the database: a header and one graph file, under the collection's id.
    let saved = index_files(gw.dir.path());
    assert_eq!(saved.len(), 2, "{saved:?}");
    assert!(
        saved
            .iter()
            .any(|p| p.file_name().unwrap().to_str() == Some(&format!("{kb}.{kind}")))
    );
    let probes: Vec<(String, u64)> = files
        .iter()
        .zip(&chunks)
        .map(|(f, c)| (f.clone(), c[c.len() / 2]))
        .collect();
    let before = results(&gw, &kb, &probes);
    // Retrieval quality is the libraries' own tests' business; this only guards against a
    // graph wired to the wrong vectors. hora 0.1.1 can miss even a vector's own entry (its
    // upper-layer descent never moves, see src/index/hnsw.rs), so only USearch is held to it.
    let own_first = |results: &[Vec<u64>], probes: &[(String, u64)]| {
        if expected == GraphKind::Usearch {
            for (r, (_, chunk)) in results.iter().zip(probes) {
                assert_eq!(r[0], *chunk, "a chunk's own vector finds it first");
            }
        }
    };
    own_first(&before, &probes);

    // Restart: the saved graph is loaded, not rebuilt (a build would save new files).
    let dir = gw.stop().await;
    let gw = Setup::new().toml(&toml).start_in(dir).await;
    assert_eq!(wait_for_graph(&gw, &kb, total).await, expected);
    assert_eq!(
        index_files(gw.dir.path()),
        saved,
        "rebuilt instead of loaded"
    );
    assert_eq!(results(&gw, &kb, &probes), before);

    // A file removed from the collection: its chunks never come back, even from the graph
    // that still holds them, and across a restart.
    let r = gw
        .post(
            &format!("/api/v1/knowledge/{kb}/file/remove"),
            Some(&admin),
            serde_json::json!({"file_id": files[0]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let gone = |gw: &Gateway| {
        for (file, chunk) in &probes[1..] {
            let q = gw.app().vectors().vector(file, *chunk).unwrap();
            let hits = gw.app().vectors().search_collection(&kb, &q, total);
            assert!(hits.iter().all(|(id, _)| !chunks[0].contains(id)));
            assert_eq!(hits.len(), total - chunks[0].len());
        }
    };
    gone(&gw);
    // A sixth of the graph gone is past the 10% that filtering tolerates: it is rebuilt
    // (and saved again) without those chunks.
    let remaining = total - chunks[0].len();
    assert_eq!(wait_for_graph(&gw, &kb, remaining).await, expected);
    let saved = wait_for_new_files(gw.dir.path(), &saved).await;
    gone(&gw);
    let after_removal = results(&gw, &kb, &probes[1..]);
    let dir = gw.stop().await;
    let gw = Setup::new().toml(&toml).start_in(dir).await;
    assert_eq!(wait_for_graph(&gw, &kb, remaining).await, expected);
    assert_eq!(
        index_files(gw.dir.path()),
        saved,
        "rebuilt instead of loaded"
    );
    gone(&gw);
    // The same graph, loaded: the same answers.
    assert_eq!(results(&gw, &kb, &probes[1..]), after_removal);

    // A corrupt save is rebuilt from redb (new files), and search is right again.
    let graph_file = saved
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "graph"))
        .unwrap()
        .clone();
    let dir = gw.stop().await;
    let mut bytes = std::fs::read(&graph_file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&graph_file, bytes).unwrap();
    let gw = Setup::new().toml(&toml).start_in(dir).await;
    assert_eq!(wait_for_graph(&gw, &kb, remaining).await, expected);
    wait_for_new_files(gw.dir.path(), &saved).await;
    gone(&gw);
    // A rebuilt graph is another approximate graph: answers may differ from the old one's.
    own_first(&results(&gw, &kb, &probes[1..]), &probes[1..]);

    // `ragway serve` loads the store before any async runtime exists: the saved graph must
    // be installed from there too (no tokio context on this thread).
    let dir = gw.stop().await;
    let files_now = index_files(dir.path());
    let (path, kb2) = (dir.path().to_path_buf(), kb.clone());
    let loaded = std::thread::spawn(move || {
        let store = ragway::store::Store::open(&path.join("ragway.redb")).unwrap();
        let vs = ragway::storage::embedded::vectors::VectorStore::new(
            30,
            expected,
            Some(path.join("index")),
        );
        vs.load(&store).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while vs.graph_info(&kb2).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        vs.graph_info(&kb2)
    })
    .join()
    .unwrap();
    assert_eq!(loaded, Some((expected, remaining)));
    assert_eq!(
        index_files(dir.path()),
        files_now,
        "rebuilt instead of loaded"
    );
    let gw = Setup::new().toml(&toml).start_in(dir).await;

    // Deleting the collection deletes its graph.
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
    assert!(index_files(gw.dir.path()).is_empty());
    assert!(gw.app().vectors().graph_info(&kb).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usearch_graph_is_saved_reloaded_and_rebuilt_when_corrupt() {
    graph_survives_restarts("usearch", GraphKind::Usearch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hora_graph_is_saved_reloaded_and_rebuilt_when_corrupt() {
    graph_survives_restarts("hora", GraphKind::Hora).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vector_index_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[rag]\nvector-index = \"faiss\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ragway"))
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rag.vector-index: unknown vector index `faiss`"),
        "{err}"
    );
}
