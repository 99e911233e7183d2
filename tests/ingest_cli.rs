//! `ragway ingest DIR --knowledge NAME`: bulk loading through the ingestion pipeline, with
//! embeddings from a fake Ollama (no ONNX model needed).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::fake::FakeUpstream;
use ragway::store::{FileStatus, Role, Store};

fn ragway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ragway"));
    for v in [
        "OLLAMA_BASE_URL",
        "OLLAMA_BASE_URLS",
        "OPENAI_API_BASE_URL",
        "OPENAI_API_BASE_URLS",
        "WEBUI_SECRET_KEY",
        "ENV",
        "DATA_DIR",
        "RAGWAY_CONFIG",
        "RAG_EMBEDDING_ENGINE",
        "RAG_EMBEDDING_MODEL",
        "RAG_OLLAMA_BASE_URL",
        "CHUNK_SIZE",
        "CHUNK_OVERLAP",
    ] {
        c.env_remove(v);
    }
    c
}

/// Runs a command off the async worker threads (the fake upstream needs them).
async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn ingest(data: &str, folder: &Path, fake: &FakeUpstream) -> Command {
    let mut c = ragway();
    c.arg("ingest")
        .arg(folder)
        .args(["--knowledge", "Docs", "--data-dir", data])
        .env("RAG_EMBEDDING_ENGINE", "ollama")
        .env("RAG_OLLAMA_BASE_URL", &fake.url)
        .env("RAG_EMBEDDING_MODEL", "nomic-embed-text")
        .env("CHUNK_SIZE", "200")
        .env("CHUNK_OVERLAP", "0");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_folder_into_a_collection() {
    let fake = FakeUpstream::ollama(&["nomic-embed-text"]).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_string();

    let mut add = ragway();
    add.args([
        "user",
        "add",
        "--data-dir",
        &data_s,
        "--email",
        "admin@example.com",
        "--role",
        "admin",
    ])
    .env("RAGWAY_PASSWORD", "very-secret-pw-42");
    let out = run(add).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let folder = dir.path().join("docs");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    std::fs::create_dir_all(folder.join(".git")).unwrap();
    std::fs::write(
        folder.join("intro.txt"),
        "Welcome to the product.\n\nIt does many things.",
    )
    .unwrap();
    std::fs::write(
        folder.join("guide.md"),
        "# Guide\n\nInstall it.\n\n## Usage\n\nRun it.",
    )
    .unwrap();
    std::fs::write(folder.join("sub/faq.txt"), "Q: Why? A: Because.").unwrap();
    std::fs::write(folder.join(".hidden.txt"), "must be skipped").unwrap();
    std::fs::write(folder.join(".git/config"), "[core]\nbare = false").unwrap();
    let binary: Vec<u8> = (0..2048u32).map(|i| (i * 7919 % 256) as u8).collect();
    std::fs::write(folder.join("blob.bin"), &binary).unwrap();

    let out = run(ingest(&data_s, &folder, &fake)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failed file must give a non-zero exit code\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("ingested 3 file(s), 1 failed"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("blob.bin: unsupported file type .bin"),
        "{stderr}"
    );
    assert!(!stderr.contains(".hidden"), "{stderr}");
    assert!(!fake.requests_to("/api/embed").is_empty());
    let embeds_after_first_run = fake.requests_to("/api/embed").len();

    {
        let store = Store::open(&data.join("ragway.redb")).unwrap();
        let admin = store.user_by_email("admin@example.com").unwrap().unwrap();
        assert_eq!(admin.role, Role::Admin);
        let kbs = store.knowledges().unwrap();
        assert_eq!(kbs.len(), 1);
        let kb = &kbs[0];
        assert_eq!(kb.name, "Docs");
        assert_eq!(kb.user_id, admin.id);
        assert!(kb.access_grants.is_empty(), "private");
        assert!(stdout.contains(&kb.id), "{stdout}");

        let mut names = Vec::new();
        for id in store.knowledge_files(&kb.id).unwrap() {
            let f = store.file(&id).unwrap().unwrap();
            assert_eq!(f.status, Some(FileStatus::Completed), "{f:?}");
            assert_eq!(f.user_id, admin.id);
            assert!(f.hash.is_some());
            assert!(f.chunk_count > 0);
            assert_eq!(store.file_chunk_ids(&id).unwrap().len(), f.chunk_count);
            assert!(Path::new(&f.path).exists(), "blob copied into the data dir");
            assert!(f.path.starts_with(data.join("uploads").to_str().unwrap()));
            let info = f.embedding.clone().unwrap();
            assert_eq!(info.engine, "ollama");
            assert_eq!(info.model, "nomic-embed-text");
            assert_eq!(info.dim, common::fake::EMBED_DIM);
            names.push(f.filename.clone());
        }
        names.sort();
        assert_eq!(names, ["faq.txt", "guide.md", "intro.txt"]);
        assert_eq!(
            store
                .file_text(
                    &store
                        .files()
                        .unwrap()
                        .iter()
                        .find(|f| f.filename == "faq.txt")
                        .unwrap()
                        .id
                )
                .unwrap()
                .as_deref(),
            Some("Q: Why? A: Because.")
        );

        // The failed file is recorded as failed and is not in the collection.
        let files = store.files().unwrap();
        assert_eq!(files.len(), 4, "hidden entries are never read");
        let blob = files.iter().find(|f| f.filename == "blob.bin").unwrap();
        assert_eq!(blob.status, Some(FileStatus::Failed));
        assert_eq!(blob.error.as_deref(), Some("unsupported file type .bin"));
        assert!(store.file_chunk_ids(&blob.id).unwrap().is_empty());
        assert!(store.queued_files().unwrap().is_empty());
        let mut vectors = 0;
        store
            .for_each_file_index(|_, d| vectors += d.ids.len())
            .unwrap();
        let chunks: usize = files.iter().map(|f| f.chunk_count).sum();
        assert_eq!(vectors, chunks);
    }

    // A second run into the same collection skips the duplicates and keeps the collection.
    std::fs::remove_file(folder.join("blob.bin")).unwrap();
    let out = run(ingest(&data_s, &folder, &fake)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 duplicate(s) skipped"), "{stdout}");
    assert!(fake.requests_to("/api/embed").len() > embeds_after_first_run);
    let store = Store::open(&data.join("ragway.redb")).unwrap();
    let kbs = store.knowledges().unwrap();
    assert_eq!(kbs.len(), 1, "the existing collection is reused");
    assert_eq!(store.knowledge_files(&kbs[0].id).unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_without_an_admin_fails_clearly() {
    let fake = FakeUpstream::ollama(&["nomic-embed-text"]).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let folder = dir.path().join("docs");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("a.txt"), "text").unwrap();
    let out = run(ingest(data.to_str().unwrap(), &folder, &fake)).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no admin exists yet"), "{stderr}");
    assert!(fake.requests_to("/api/embed").is_empty());
}
