//! One conformance suite for every storage backend (`ragway::storage`): each case runs
//! unchanged on the embedded backend (redb + in-process indexes) and on PostgreSQL +
//! pgvector, plus cases only a shared database has (two "replicas" on one database).
//!
//! PostgreSQL comes from `RAGWAY_TEST_POSTGRES_URL` (scripts/test.sh starts a throwaway
//! cluster with scripts/postgres.sh); each test gets a database of its own. Without the
//! URL the PostgreSQL cases fail under CI (CI=true) and are reported as not run elsewhere.

// Only the cluster URL and connections: this suite keeps its own databases (key=value URLs).
#[allow(dead_code)]
#[path = "common/postgres.rs"]
mod pg_test;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use pg_test::{cluster_url, connect as admin};
use ragway::index::GraphKind;
use ragway::library::{Added, Content, Library, LibraryError, NewFile};
use ragway::limits::{Applied, Limits};
use ragway::storage::embedded::vectors::VectorStore;
use ragway::storage::postgres::{self, PgOptions};
use ragway::storage::{Job, Retry, Scope, Signal, Storage, StorageError, embedded};
use ragway::store::{
    ApiKeyRecord, ChunkRecord, FileRecord, FileStatus, KnowledgeRecord, PresetRecord,
    PresetRefusal, Role, Store, UsageCounts, UsageKey, User,
};

/// A backend under test and what must outlive it.
struct Backend {
    storage: Storage,
    _dir: Option<tempfile::TempDir>,
    db: Option<TestDb>,
}

/// A database created for one test, dropped at the end.
struct TestDb {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDb {
    async fn create() -> Option<TestDb> {
        let admin_url = cluster_url("the PostgreSQL backend")?;
        let name = format!("ragway_t_{}", uuid::Uuid::new_v4().simple());
        admin(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let mut cfg: tokio_postgres::Config = admin_url.parse().expect("test URL parses");
        cfg.dbname(&name);
        let url = to_url(&cfg);
        Some(TestDb {
            admin_url,
            name,
            url,
        })
    }

    async fn drop_db(&self) {
        let _ = admin(&self.admin_url)
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// A key=value connection string for `cfg` (the URL form needs escaping).
fn to_url(cfg: &tokio_postgres::Config) -> String {
    let mut parts = Vec::new();
    if let Some(tokio_postgres::config::Host::Tcp(h)) = cfg.get_hosts().first() {
        parts.push(format!("host={h}"));
    }
    if let Some(p) = cfg.get_ports().first() {
        parts.push(format!("port={p}"));
    }
    if let Some(u) = cfg.get_user() {
        parts.push(format!("user={u}"));
    }
    if let Some(pw) = cfg.get_password() {
        parts.push(format!("password={}", String::from_utf8_lossy(pw)));
    }
    parts.push(format!("dbname={}", cfg.get_dbname().unwrap_or("postgres")));
    parts.join(" ")
}

impl Backend {
    fn embedded() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("ragway.redb")).unwrap());
        let index = Arc::new(VectorStore::new(10_000, GraphKind::Usearch, None));
        index.load(&store).unwrap();
        let storage = embedded::storage(store, index, dir.path().join("uploads"), 10_000);
        Backend {
            storage,
            _dir: Some(dir),
            db: None,
        }
    }

    async fn postgres() -> Option<Backend> {
        Self::postgres_with(PgOptions {
            pool_size: 4,
            ..PgOptions::default()
        })
        .await
    }

    async fn postgres_with(options: PgOptions) -> Option<Backend> {
        let db = TestDb::create().await?;
        let storage = postgres::connect(&db.url, options)
            .await
            .expect("connect and migrate");
        Some(Backend {
            storage,
            _dir: None,
            db: Some(db),
        })
    }

    async fn finish(self) {
        let Backend { storage, db, .. } = self;
        drop(storage);
        if let Some(db) = db {
            db.drop_db().await;
        }
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = super::Backend::embedded();
                    super::$case(&b.storage).await;
                    b.finish().await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(b) = super::Backend::postgres().await else { return };
                    super::$case(&b.storage).await;
                    b.finish().await;
                }
            )*
        }
    };
}

conformance!(
    users_first_admin_emails_and_updates,
    user_deletion_is_recorded_until_finished,
    api_keys_tokens_and_settings,
    files_and_collection_memberships,
    chunks_are_replaced_and_searched_in_scope,
    lexical_search_matches_word_forms_and_ignores_syntax,
    chunk_context_is_searched_but_never_stored_as_text,
    failed_and_deleted_files_leave_search,
    queue_claims_leases_retries_and_gives_up,
    expired_lease_is_claimed_again,
    blobs_round_trip_and_refuse_path_keys,
    counters_count_per_window,
    signals_reach_subscribers_in_order,
    usage_rows_add_prune_and_scan_in_order,
    // migrate slice
    whole_copy_reads_settings_and_revoked_tokens,
    imported_chunks_keep_their_ids_and_vectors,
    lexical_scores_are_okapi_bm25_over_the_scope,
    // accounts
    api_key_limits_are_set_in_place,
    // library
    presets_insert_within_bounds_update_and_delete,
    blobs_move_local_files_in,
    library_keeps_files_collections_and_blobs_as_one_unit,
    // Ingest slice (issue 11).
    queue_claims_a_named_file_once,
    local_blob_paths_hold_what_was_put,
    // retrieval
    similarities_and_vectors_answer_in_the_order_asked,
    tuned_bm25_is_bm25_or_refused,
    // rate limits
    rate_limits_admit_to_the_limit_then_refuse,
    rate_limits_charge_tokens_with_capped_debt,
    rate_limits_keep_key_and_user_apart,
    rate_limits_hold_under_concurrent_admits,
);

fn user(email: &str) -> User {
    User::new(email, "Name", Role::Pending, "phc".into())
}

fn file(user_id: &str, name: &str) -> FileRecord {
    FileRecord {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: user_id.into(),
        filename: name.into(),
        path: format!("/uploads/{name}"),
        hash: None,
        status: Some(FileStatus::Pending),
        error: None,
        meta: serde_json::json!({"name": name, "content_type": "text/plain", "size": 10}),
        embedding: None,
        chunk_count: 0,
        created_at: 1,
        updated_at: 1,
    }
}

fn knowledge(name: &str) -> KnowledgeRecord {
    KnowledgeRecord {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: "u".into(),
        name: name.into(),
        description: String::new(),
        meta: serde_json::json!({}),
        access_grants: vec![],
        created_at: 1,
        updated_at: 1,
    }
}

fn chunk(file_id: &str, index: usize, text: &str) -> ChunkRecord {
    ChunkRecord {
        file_id: file_id.into(),
        index,
        text: text.into(),
        start_index: index * 100,
        page: None,
        headers: vec![],
        context: None,
    }
}

/// A unit vector along axis `i` of 8, tilted a little towards axis 7 (so no two are equal).
fn axis(i: usize, tilt: f32) -> Vec<f32> {
    let mut v = [0.0; 8];
    v[i] = 1.0;
    v[7] += tilt;
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn completed(mut f: FileRecord, n: usize) -> FileRecord {
    f.status = Some(FileStatus::Completed);
    f.chunk_count = n;
    f
}

/// Stores a processed file with one chunk per (text, vector).
async fn processed(s: &Storage, owner: &str, parts: &[(&str, Vec<f32>)]) -> (FileRecord, Vec<u64>) {
    let f = file(owner, "doc.txt");
    s.meta.insert_file(&f).await.unwrap();
    let chunks: Vec<ChunkRecord> = parts
        .iter()
        .enumerate()
        .map(|(i, (t, _))| chunk(&f.id, i, t))
        .collect();
    let vectors: Vec<Vec<f32>> = parts.iter().map(|(_, v)| v.clone()).collect();
    let text: String = parts.iter().map(|p| p.0).collect::<Vec<_>>().join("\n");
    let f = completed(f, parts.len());
    let ids = s
        .chunks
        .complete_file(&f, &text, &chunks, &vectors)
        .await
        .unwrap();
    (f, ids)
}

fn ids(hits: &[(u64, f32)]) -> Vec<u64> {
    hits.iter().map(|h| h.0).collect()
}

fn scope_files(files: &[&str]) -> Scope {
    Scope {
        files: files.iter().map(|s| (*s).to_string()).collect(),
        collections: vec![],
    }
}

async fn users_first_admin_emails_and_updates(s: &Storage) {
    let m = &s.meta;
    assert!(m.ping().await);
    assert_eq!(m.primary_admin().await.unwrap(), None);
    let a = m.create_user(user("a@x.io"), true).await.unwrap();
    assert_eq!(a.role, Role::Admin, "the first user becomes admin");
    let b = m.create_user(user("b@x.io"), true).await.unwrap();
    assert_eq!(b.role, Role::Pending);
    assert!(matches!(
        m.create_user(user("a@x.io"), true).await,
        Err(StorageError::EmailTaken)
    ));
    assert_eq!(m.user_count().await.unwrap(), 2);
    assert_eq!(
        m.primary_admin().await.unwrap().as_deref(),
        Some(a.id.as_str())
    );
    assert_eq!(m.user_by_email("b@x.io").await.unwrap().unwrap().id, b.id);
    assert!(m.user_by_email("nobody@x.io").await.unwrap().is_none());
    let mut listed: Vec<String> = m.users().await.unwrap().into_iter().map(|u| u.id).collect();
    listed.sort();
    let mut want = vec![a.id.clone(), b.id.clone()];
    want.sort();
    assert_eq!(listed, want);

    let changed = m
        .update_user(
            &b.id,
            Box::new(|u| {
                u.name = "Bea".into();
                u.email = "bea@x.io".into();
                u.revoke_sessions(Some("jti-keep".into()));
                Ok(())
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changed.name, "Bea");
    let read = m.user_by_id(&b.id).await.unwrap().unwrap();
    assert_eq!((read.email.as_str(), read.session_epoch), ("bea@x.io", 1));
    assert!(read.session_valid(0, "jti-keep") && !read.session_valid(0, "other"));
    assert!(
        m.user_by_email("b@x.io").await.unwrap().is_none(),
        "old email freed"
    );
    m.create_user(user("b@x.io"), false).await.unwrap();

    let refused = m
        .update_user(&b.id, Box::new(|_| Err("no".to_string())))
        .await
        .unwrap();
    assert_eq!(refused.unwrap_err(), "no");
    assert!(matches!(
        m.update_user(
            &b.id,
            Box::new(|u| {
                u.email = "a@x.io".into();
                Ok(())
            })
        )
        .await,
        Err(StorageError::EmailTaken)
    ));
    assert_eq!(
        m.user_by_id(&b.id).await.unwrap().unwrap().email,
        "bea@x.io"
    );
    assert!(matches!(
        m.update_user("missing", Box::new(|_| Ok(()))).await,
        Err(StorageError::NoSuchUser)
    ));
}

async fn user_deletion_is_recorded_until_finished(s: &Storage) {
    let m = &s.meta;
    let u = m.create_user(user("d@x.io"), false).await.unwrap();
    let rec = ApiKeyRecord {
        user_id: u.id.clone(),
        prefix: "sk-d".into(),
        created_at: 1,
        models: vec![],
        limits: Default::default(),
    };
    m.put_api_key("hash-d", &rec).await.unwrap();
    assert_eq!(m.delete_user(&u.id).await.unwrap().unwrap().email, "d@x.io");
    assert!(
        m.api_key_by_hash("hash-d").await.unwrap().is_none(),
        "key goes with the user"
    );
    assert!(m.user_by_email("d@x.io").await.unwrap().is_none());
    assert_eq!(
        m.pending_user_deletions().await.unwrap(),
        vec![u.id.clone()]
    );
    m.finish_user_deletion(&u.id).await.unwrap();
    assert!(m.pending_user_deletions().await.unwrap().is_empty());
    assert!(m.delete_user(&u.id).await.unwrap().is_none());
}

async fn api_keys_tokens_and_settings(s: &Storage) {
    let m = &s.meta;
    let u = m.create_user(user("k@x.io"), false).await.unwrap();
    let rec = |p: &str| ApiKeyRecord {
        user_id: u.id.clone(),
        prefix: p.into(),
        created_at: 1,
        models: vec!["llama3".into()],
        limits: Default::default(),
    };
    m.put_api_key("h1", &rec("sk-1")).await.unwrap();
    m.put_api_key("h2", &rec("sk-2")).await.unwrap();
    assert!(
        m.api_key_by_hash("h1").await.unwrap().is_none(),
        "one key per user"
    );
    let got = m.api_key_by_hash("h2").await.unwrap().unwrap();
    assert_eq!((got.prefix.as_str(), got.models.len()), ("sk-2", 1));
    let (hash, of_user) = m.api_key_of_user(&u.id).await.unwrap().unwrap();
    assert_eq!((hash.as_str(), of_user.prefix.as_str()), ("h2", "sk-2"));
    let orphan = ApiKeyRecord {
        user_id: "missing".into(),
        ..rec("sk-x")
    };
    assert!(matches!(
        m.put_api_key("hx", &orphan).await,
        Err(StorageError::NoSuchUser)
    ));
    assert_eq!(
        m.delete_api_key_of_user(&u.id).await.unwrap().as_deref(),
        Some("h2")
    );
    assert!(m.api_key_by_hash("h2").await.unwrap().is_none());
    assert!(m.delete_api_key_of_user(&u.id).await.unwrap().is_none());

    assert!(!m.is_token_revoked("jti-1").await.unwrap());
    m.revoke_token("jti-1", None).await.unwrap();
    m.revoke_token("jti-2", Some(ragway::store::now_secs() + 3600))
        .await
        .unwrap();
    m.revoke_token("jti-old", Some(1)).await.unwrap();
    // An expired entry is pruned by the next revocation.
    m.revoke_token("jti-3", None).await.unwrap();
    assert!(m.is_token_revoked("jti-1").await.unwrap());
    assert!(m.is_token_revoked("jti-2").await.unwrap());
    assert!(!m.is_token_revoked("jti-old").await.unwrap());

    assert!(m.setting("s").await.unwrap().is_none());
    m.set_setting("s", "1").await.unwrap();
    m.set_setting("s", "2").await.unwrap();
    assert_eq!(m.setting("s").await.unwrap().as_deref(), Some("2"));
}

async fn files_and_collection_memberships(s: &Storage) {
    let m = &s.meta;
    let f = file("u", "a.txt");
    let g = file("u", "b.txt");
    m.insert_file(&f).await.unwrap();
    m.insert_file(&g).await.unwrap();
    let read = m.file(&f.id).await.unwrap().unwrap();
    assert_eq!(read.meta, f.meta, "meta reads back as written");
    assert_eq!(m.files().await.unwrap().len(), 2);
    assert!(m.file_text(&f.id).await.unwrap().is_none());
    let mut f2 = f.clone();
    f2.error = Some("e".into());
    m.update_file(&f2).await.unwrap();
    assert_eq!(
        m.file(&f.id).await.unwrap().unwrap().error.as_deref(),
        Some("e")
    );
    assert!(matches!(
        m.update_file(&file("u", "ghost")).await,
        Err(StorageError::NotFound)
    ));

    let kb = knowledge("kb");
    let kb2 = knowledge("kb2");
    m.put_knowledge(&kb).await.unwrap();
    m.put_knowledge(&kb2).await.unwrap();
    let mut renamed = kb.clone();
    renamed.name = "renamed".into();
    m.put_knowledge(&renamed).await.unwrap();
    assert_eq!(m.knowledge(&kb.id).await.unwrap().unwrap().name, "renamed");
    assert_eq!(m.knowledges().await.unwrap().len(), 2);
    assert!(m.link_file(&kb.id, &f.id).await.unwrap());
    assert!(!m.link_file(&kb.id, &f.id).await.unwrap(), "already linked");
    assert!(!m.link_file(&kb.id, "no-such-file").await.unwrap());
    assert!(m.link_file(&kb.id, &g.id).await.unwrap());
    assert!(m.link_file(&kb2.id, &f.id).await.unwrap());
    let mut in_kb = m.knowledge_files(&kb.id).await.unwrap();
    in_kb.sort();
    let mut want = vec![f.id.clone(), g.id.clone()];
    want.sort();
    assert_eq!(in_kb, want);
    assert!(m.unlink_file(&kb.id, &g.id).await.unwrap());
    assert!(!m.unlink_file(&kb.id, &g.id).await.unwrap());
    let mut of_f = m.file_knowledge(&f.id).await.unwrap();
    of_f.sort();
    let mut want = vec![kb.id.clone(), kb2.id.clone()];
    want.sort();
    assert_eq!(of_f, want);

    assert!(m.delete_knowledge(&kb2.id).await.unwrap());
    assert!(!m.delete_knowledge(&kb2.id).await.unwrap());
    assert_eq!(m.file_knowledge(&f.id).await.unwrap(), vec![kb.id.clone()]);
    let (rec, kbs) = m.delete_file(&f.id).await.unwrap().unwrap();
    assert_eq!((rec.id.as_str(), kbs), (f.id.as_str(), vec![kb.id.clone()]));
    assert!(m.file(&f.id).await.unwrap().is_none());
    assert!(m.knowledge_files(&kb.id).await.unwrap().is_empty());
    assert!(m.delete_file(&f.id).await.unwrap().is_none());
}

async fn chunks_are_replaced_and_searched_in_scope(s: &Storage) {
    let (a, a_ids) = processed(
        s,
        "u",
        &[
            ("alpha one", axis(0, 0.1)),
            ("alpha two", axis(1, 0.1)),
            ("alpha three", axis(2, 0.1)),
        ],
    )
    .await;
    let (b, b_ids) = processed(s, "u", &[("beta", axis(0, 0.3)), ("beta2", axis(3, 0.0))]).await;
    assert_eq!(a_ids.len(), 3);
    assert_eq!(s.chunks.file_chunk_ids(&a.id).await.unwrap(), a_ids);
    let read = s.meta.file(&a.id).await.unwrap().unwrap();
    assert_eq!(read.status, Some(FileStatus::Completed));
    assert_eq!(
        s.meta.file_text(&a.id).await.unwrap().as_deref(),
        Some("alpha one\nalpha two\nalpha three")
    );
    let wanted = [a_ids[2], 999_999, a_ids[0]];
    let got = s.chunks.chunks(&wanted).await.unwrap();
    assert_eq!(
        ids_of(&got),
        vec![a_ids[2], a_ids[0]],
        "asked order, missing skipped"
    );
    assert_eq!(got[0].1.text, "alpha three");

    // Dense: within file a only, nearest to axis 1 first.
    let hits = s
        .chunks
        .dense_search(&scope_files(&[&a.id]), &axis(1, 0.0), 2)
        .await
        .unwrap();
    assert_eq!(hits[0].0, a_ids[1]);
    assert!(
        hits[0].1 > 0.9 && hits[0].1 <= 1.0001,
        "cosine similarity: {hits:?}"
    );
    assert_eq!(hits.len(), 2);
    assert!(ids(&hits).iter().all(|i| a_ids.contains(i)));

    // Through a collection: only its files.
    let kb = knowledge("kb");
    s.meta.put_knowledge(&kb).await.unwrap();
    assert!(s.meta.link_file(&kb.id, &b.id).await.unwrap());
    let in_kb = Scope {
        collections: vec![kb.id.clone()],
        files: vec![],
    };
    let hits = s
        .chunks
        .dense_search(&in_kb, &axis(0, 0.0), 10)
        .await
        .unwrap();
    let mut got = ids(&hits);
    got.sort_unstable();
    assert_eq!(got, b_ids);
    // Collection and file together, each chunk once.
    let both = Scope {
        collections: vec![kb.id.clone()],
        files: vec![a.id.clone(), b.id.clone()],
    };
    let hits = s
        .chunks
        .dense_search(&both, &axis(0, 0.0), 10)
        .await
        .unwrap();
    assert_eq!(hits.len(), 5);
    assert_eq!(ids(&hits)[..2], [a_ids[0], b_ids[0]]);
    assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1), "best first");

    // Re-processing replaces the chunks, in the file and in its collections.
    let new_chunks = vec![chunk(&b.id, 0, "gamma")];
    let new_ids = s
        .chunks
        .complete_file(
            &completed(b.clone(), 1),
            "gamma",
            &new_chunks,
            &[axis(5, 0.0)],
        )
        .await
        .unwrap();
    assert!(
        s.chunks.chunks(&b_ids).await.unwrap().is_empty(),
        "old chunks gone"
    );
    let hits = s
        .chunks
        .dense_search(&in_kb, &axis(5, 0.0), 10)
        .await
        .unwrap();
    assert_eq!(ids(&hits), new_ids);
    // Unlinked: out of the collection's results.
    assert!(s.meta.unlink_file(&kb.id, &b.id).await.unwrap());
    assert!(
        s.chunks
            .dense_search(&in_kb, &axis(5, 0.0), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.chunks
            .dense_search(&Scope::default(), &axis(5, 0.0), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Mismatched input is refused, not half-written.
    assert!(
        s.chunks
            .complete_file(&b, "x", &[chunk(&b.id, 0, "x")], &[])
            .await
            .is_err()
    );
}

fn ids_of(rows: &[(u64, ChunkRecord)]) -> Vec<u64> {
    rows.iter().map(|r| r.0).collect()
}

/// A chunk carried under its document's title (`rag.title-in-chunks`) is found by the
/// title's words, through a commit and through an import, while its text stays its own.
async fn chunk_context_is_searched_but_never_stored_as_text(s: &Storage) {
    let f = completed(file("u", "guide.txt"), 2);
    s.meta.insert_file(&f).await.unwrap();
    let mut titled = chunk(&f.id, 1, "Feed them twice a day.");
    titled.context = Some("Caring for axolotls".into());
    let chunks = vec![
        chunk(&f.id, 0, "Caring for axolotls\n\nKeep water cool."),
        titled,
    ];
    let stored_ids = s
        .chunks
        .complete_file(&f, "whole text", &chunks, &[axis(0, 0.0), axis(1, 0.0)])
        .await
        .unwrap();
    let scope = scope_files(&[&f.id]);
    let hits = s.chunks.lexical_search(&scope, "axolotl", 5).await.unwrap();
    let mut found = ids(&hits);
    found.sort_unstable();
    assert_eq!(found, stored_ids, "both chunks carry the title's words");
    let stored = s.chunks.chunks(&stored_ids[1..]).await.unwrap();
    assert_eq!(stored[0].1.text, "Feed them twice a day.");
    assert_eq!(stored[0].1.context.as_deref(), Some("Caring for axolotls"));
    // A chunk without a context is not found by words it does not hold.
    assert!(
        s.chunks
            .lexical_search(&scope, "twice", 5)
            .await
            .unwrap()
            .len()
            == 1
    );

    let moved = completed(file("u", "moved.txt"), 1);
    s.meta.insert_file(&moved).await.unwrap();
    s.queue.enqueue(&moved.id).await.unwrap();
    let mut imported = chunk(&moved.id, 0, "Chapter two begins.");
    imported.context = Some("Salamander almanac".into());
    let base = stored_ids[1] + 500;
    s.chunks
        .import_file(&moved, "moved", &[(base, imported)], &[axis(2, 0.0)])
        .await
        .unwrap();
    let hits = s
        .chunks
        .lexical_search(&scope_files(&[&moved.id]), "salamander", 5)
        .await
        .unwrap();
    assert_eq!(ids(&hits), vec![base]);
}

async fn lexical_search_matches_word_forms_and_ignores_syntax(s: &Storage) {
    let (a, a_ids) = processed(
        s,
        "u",
        &[
            ("The cats are running across the garden", axis(0, 0.0)),
            (
                "Quarterly revenue grew in the northern region",
                axis(1, 0.0),
            ),
            ("Nothing relevant here at all", axis(2, 0.0)),
        ],
    )
    .await;
    let (other, _) = processed(s, "u", &[("cat running everywhere", axis(0, 0.0))]).await;
    // Extracted text may hold NUL bytes (PostgreSQL text cannot): still stored and found.
    let (nul, nul_ids) = processed(s, "u", &[("nul\0byte zebra", axis(0, 0.0))]).await;
    let hits = s
        .chunks
        .lexical_search(&scope_files(&[&nul.id]), "zebra", 5)
        .await
        .unwrap();
    assert_eq!(ids(&hits), nul_ids);
    assert_eq!(
        s.chunks.chunks(&nul_ids).await.unwrap()[0].1.text,
        "nul\0byte zebra"
    );
    let scope = scope_files(&[&a.id]);
    let hits = s
        .chunks
        .lexical_search(&scope, "cat runs", 5)
        .await
        .unwrap();
    assert_eq!(
        ids(&hits),
        vec![a_ids[0]],
        "stemmed match, scoped: {hits:?}"
    );
    assert!(hits[0].1 > 0.0);
    let hits = s
        .chunks
        .lexical_search(&scope, "revenue of the garden", 5)
        .await
        .unwrap();
    let mut got = ids(&hits);
    got.sort_unstable();
    assert_eq!(got, vec![a_ids[0], a_ids[1]], "any word matches");
    for hostile in ["", "&|!():*", "' OR 1=1 --", "\\x00 \u{0}", "a:* & !b"] {
        let hits = s.chunks.lexical_search(&scope, hostile, 5).await.unwrap();
        assert!(hits.iter().all(|h| a_ids.contains(&h.0)), "{hostile:?}");
    }
    let long = "garden ".repeat(5000);
    let hits = s.chunks.lexical_search(&scope, &long, 5).await.unwrap();
    assert_eq!(ids(&hits), vec![a_ids[0]]);
    let both = scope_files(&[&a.id, &other.id]);
    assert_eq!(
        s.chunks
            .lexical_search(&both, "cats", 5)
            .await
            .unwrap()
            .len(),
        2
    );
}

async fn failed_and_deleted_files_leave_search(s: &Storage) {
    let (a, _) = processed(s, "u", &[("kept words", axis(0, 0.0))]).await;
    let (b, b_ids) = processed(s, "u", &[("kept too", axis(0, 0.1))]).await;
    let kb = knowledge("kb");
    s.meta.put_knowledge(&kb).await.unwrap();
    s.meta.link_file(&kb.id, &a.id).await.unwrap();
    s.meta.link_file(&kb.id, &b.id).await.unwrap();
    let in_kb = Scope {
        collections: vec![kb.id.clone()],
        files: vec![],
    };
    assert_eq!(
        s.chunks
            .lexical_search(&in_kb, "kept", 5)
            .await
            .unwrap()
            .len(),
        2
    );

    let mut failed = b.clone();
    failed.status = Some(FileStatus::Failed);
    failed.error = Some("bad".into());
    s.chunks.fail_file(&failed).await.unwrap();
    assert_eq!(
        s.meta.file(&b.id).await.unwrap().unwrap().status,
        Some(FileStatus::Failed)
    );
    assert!(s.meta.file_text(&b.id).await.unwrap().is_none());
    assert!(s.chunks.chunks(&b_ids).await.unwrap().is_empty());
    assert!(s.chunks.file_chunk_ids(&b.id).await.unwrap().is_empty());
    assert_eq!(
        s.chunks
            .lexical_search(&in_kb, "kept", 5)
            .await
            .unwrap()
            .len(),
        1
    );

    s.meta.delete_file(&a.id).await.unwrap().unwrap();
    assert!(
        s.chunks
            .lexical_search(&in_kb, "kept", 5)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.chunks
            .dense_search(&in_kb, &axis(0, 0.0), 5)
            .await
            .unwrap()
            .is_empty()
    );
    s.meta.delete_knowledge(&kb.id).await.unwrap();
    assert!(
        s.chunks
            .dense_search(&in_kb, &axis(0, 0.0), 5)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn queue_claims_leases_retries_and_gives_up(s: &Storage) {
    let q = &s.queue;
    let lease = Duration::from_secs(60);
    assert!(matches!(
        q.enqueue("no-such-file").await,
        Err(StorageError::NotFound)
    ));
    assert!(q.claim(lease).await.unwrap().is_none());
    let a = file("u", "a");
    let b = file("u", "b");
    s.meta.insert_file(&a).await.unwrap();
    s.meta.insert_file(&b).await.unwrap();
    q.enqueue(&a.id).await.unwrap();
    // Distinct enqueue times where the backend orders by second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    q.enqueue(&b.id).await.unwrap();
    q.enqueue(&a.id).await.unwrap(); // keeps its place
    assert_eq!(
        q.pending(10).await.unwrap(),
        vec![a.id.clone(), b.id.clone()]
    );
    assert_eq!(q.pending(1).await.unwrap(), vec![a.id.clone()]);
    assert!(q.is_queued(&a.id).await.unwrap());

    let ja = q.claim(lease).await.unwrap().unwrap();
    assert_eq!((ja.file_id.as_str(), ja.attempts), (a.id.as_str(), 1));
    let jb = q.claim(lease).await.unwrap().unwrap();
    assert_eq!(jb.file_id, b.id);
    assert!(q.claim(lease).await.unwrap().is_none(), "both leased");
    assert!(q.heartbeat(&ja, lease).await.unwrap());
    let forged = Job {
        token: "forged".into(),
        ..ja.clone()
    };
    assert!(!q.heartbeat(&forged, lease).await.unwrap());
    assert!(q.complete(&ja).await.unwrap());
    assert!(!q.is_queued(&a.id).await.unwrap());

    assert_eq!(q.fail(&jb, 2).await.unwrap(), Retry::Requeued);
    let jb2 = q.claim(lease).await.unwrap().unwrap();
    assert_eq!((jb2.file_id.as_str(), jb2.attempts), (b.id.as_str(), 2));
    assert_eq!(q.fail(&jb, 2).await.unwrap(), Retry::LeaseLost, "old lease");
    assert_eq!(q.fail(&jb2, 2).await.unwrap(), Retry::GaveUp);
    assert!(!q.is_queued(&b.id).await.unwrap());
    assert!(q.claim(lease).await.unwrap().is_none());

    // complete_file takes the job off the queue with the result.
    q.enqueue(&a.id).await.unwrap();
    let j = q.claim(lease).await.unwrap().unwrap();
    s.chunks
        .complete_file(
            &completed(a.clone(), 1),
            "t",
            &[chunk(&a.id, 0, "t")],
            &[axis(0, 0.0)],
        )
        .await
        .unwrap();
    assert!(!q.is_queued(&a.id).await.unwrap());
    assert!(q.complete(&j).await.unwrap());
    // A deleted file leaves the queue.
    q.enqueue(&b.id).await.unwrap();
    s.meta.delete_file(&b.id).await.unwrap();
    assert!(q.pending(10).await.unwrap().is_empty());
}

async fn expired_lease_is_claimed_again(s: &Storage) {
    let q = &s.queue;
    let f = file("u", "a");
    s.meta.insert_file(&f).await.unwrap();
    q.enqueue(&f.id).await.unwrap();
    let dead = q.claim(Duration::from_millis(300)).await.unwrap().unwrap();
    // The holder "dies": no heartbeat. Well past the lease, anyone may claim it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = q.claim(Duration::from_secs(60)).await.unwrap().unwrap();
    assert_eq!((again.file_id.as_str(), again.attempts), (f.id.as_str(), 2));
    assert!(!q.heartbeat(&dead, Duration::from_secs(60)).await.unwrap());
    assert!(
        !q.complete(&dead).await.unwrap(),
        "the dead holder cannot complete"
    );
    assert_eq!(q.fail(&dead, 5).await.unwrap(), Retry::LeaseLost);
    assert!(q.complete(&again).await.unwrap());
}

async fn blobs_round_trip_and_refuse_path_keys(s: &Storage) {
    let b = &s.blobs;
    assert!(b.get("k1").await.unwrap().is_none());
    b.put("k1", b"hello").await.unwrap();
    b.put("k1", b"hello again").await.unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    b.put("big", &big).await.unwrap();
    assert_eq!(b.get("k1").await.unwrap().unwrap(), b"hello again");
    assert_eq!(b.get("big").await.unwrap().unwrap(), big);
    assert!(b.delete("k1").await.unwrap());
    assert!(!b.delete("k1").await.unwrap());
    let long = "x".repeat(600);
    for bad in [
        "",
        "..",
        "../etc/passwd",
        "a/b",
        "a\\b",
        "a\0b",
        "a\nb",
        long.as_str(),
    ] {
        assert!(
            matches!(b.put(bad, b"x").await, Err(StorageError::InvalidKey(_))),
            "{bad:?}"
        );
        assert!(matches!(b.get(bad).await, Err(StorageError::InvalidKey(_))));
        assert!(matches!(
            b.delete(bad).await,
            Err(StorageError::InvalidKey(_))
        ));
    }
}

async fn counters_count_per_window(s: &Storage) {
    let c = &s.counters;
    let minute = Duration::from_secs(60);
    assert_eq!(c.get("signin:a").await.unwrap(), 0);
    for n in 1..=3 {
        let (count, left) = c.increment("signin:a", minute).await.unwrap();
        assert_eq!(count, n);
        assert!(left <= minute && left > Duration::from_secs(30), "{left:?}");
    }
    assert_eq!(c.increment("signin:b", minute).await.unwrap().0, 1);
    assert_eq!(c.get("signin:a").await.unwrap(), 3);
    assert_eq!(
        c.increment("short", Duration::from_millis(300))
            .await
            .unwrap()
            .0,
        1
    );
    assert_eq!(
        c.increment("short", Duration::from_millis(300))
            .await
            .unwrap()
            .0,
        2
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(c.get("short").await.unwrap(), 0, "window over");
    assert_eq!(
        c.increment("short", Duration::from_millis(300))
            .await
            .unwrap()
            .0,
        1
    );
    assert!(matches!(
        c.increment("", minute).await,
        Err(StorageError::InvalidKey(_))
    ));
}

async fn signals_reach_subscribers_in_order(s: &Storage) {
    let mut rx = s.signals.subscribe();
    let sent = vec![
        Signal::KeyDeleted { hash: "h".into() },
        Signal::ModelsChanged,
        Signal::FileStatus {
            id: "f".into(),
            status: FileStatus::Completed,
        },
        Signal::UserChanged { id: "u".into() },
    ];
    for sig in &sent {
        s.signals.publish(sig).await.unwrap();
    }
    for want in &sent {
        let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("signal delivered")
            .unwrap();
        assert_eq!(&got, want);
    }
}

async fn usage_rows_add_prune_and_scan_in_order(s: &Storage) {
    let m = &s.meta;
    let key = |hour, user: &str, model: &str| UsageKey {
        hour,
        user_id: user.into(),
        key_prefix: String::new(),
        model: model.into(),
    };
    let c = |r, p, q| UsageCounts {
        requests: r,
        prompt_tokens: p,
        completion_tokens: q,
    };
    m.add_usage(
        &[
            (key(10, "u2", "m"), c(1, 10, 20)),
            (key(10, "u1", "m"), c(1, 1, 1)),
            (key(11, "u1", "Z"), c(2, 2, 2)),
            (key(9, "u1", "m"), c(1, 1, 1)),
        ],
        0,
    )
    .await
    .unwrap();
    m.add_usage(&[(key(10, "u2", "m"), c(1, 5, u64::MAX))], 0)
        .await
        .unwrap();
    let rows = m.scan_usage(0, 100, 100).await.unwrap();
    let keys: Vec<(u64, &str)> = rows
        .iter()
        .map(|(k, _)| (k.hour, k.user_id.as_str()))
        .collect();
    assert_eq!(keys, vec![(9, "u1"), (10, "u1"), (10, "u2"), (11, "u1")]);
    assert_eq!(rows[2].1.requests, 2);
    assert_eq!(rows[2].1.prompt_tokens, 15);
    assert!(rows[2].1.completion_tokens >= i64::MAX as u64, "saturates");
    assert_eq!(m.scan_usage(10, 11, 100).await.unwrap().len(), 2);
    assert_eq!(m.scan_usage(0, 100, 1).await.unwrap().len(), 1);
    assert!(m.scan_usage(11, 10, 100).await.unwrap().is_empty());
    m.add_usage(&[], 10).await.unwrap();
    assert_eq!(
        m.scan_usage(0, 100, 100).await.unwrap().len(),
        3,
        "hour 9 pruned"
    );
}

// ---- PostgreSQL only: what a shared database adds -------------------------------------

/// Two "replicas": two pools (and listeners) on one database.
async fn two_replicas() -> Option<(Backend, Storage)> {
    let a = Backend::postgres().await?;
    let url = a.db.as_ref().unwrap().url.clone();
    let b = postgres::connect(
        &url,
        PgOptions {
            pool_size: 4,
            ..PgOptions::default()
        },
    )
    .await
    .unwrap();
    Some((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_never_claim_one_job_twice() {
    let Some((a, b)) = two_replicas().await else {
        return;
    };
    let mut want = HashSet::new();
    for i in 0..40 {
        let f = file("u", &format!("f{i}"));
        a.storage.meta.insert_file(&f).await.unwrap();
        a.storage.queue.enqueue(&f.id).await.unwrap();
        want.insert(f.id);
    }
    let mut tasks = Vec::new();
    for s in [a.storage.clone(), b.clone()] {
        for _ in 0..4 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(j) = s.queue.claim(Duration::from_secs(120)).await.unwrap() {
                    got.push(j.file_id);
                }
                got
            }));
        }
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), unique.len(), "a job was claimed twice");
    assert_eq!(unique, want, "every job claimed once");
    drop(b);
    a.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_leases_keys_counters_and_signals() {
    let Some((a, b)) = two_replicas().await else {
        return;
    };
    let sa = &a.storage;
    // A dead replica's job is retried by the other.
    let f = file("u", "f");
    sa.meta.insert_file(&f).await.unwrap();
    sa.queue.enqueue(&f.id).await.unwrap();
    let dead = sa
        .queue
        .claim(Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    assert!(
        b.queue
            .claim(Duration::from_secs(60))
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let taken = b
        .queue
        .claim(Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((taken.file_id.as_str(), taken.attempts), (f.id.as_str(), 2));
    assert!(!sa.queue.complete(&dead).await.unwrap());
    // A result committed on one replica is visible on the other at once.
    b.chunks
        .complete_file(
            &completed(f.clone(), 1),
            "t",
            &[chunk(&f.id, 0, "shared text")],
            &[axis(0, 0.0)],
        )
        .await
        .unwrap();
    assert_eq!(
        sa.meta.file(&f.id).await.unwrap().unwrap().status,
        Some(FileStatus::Completed)
    );
    assert_eq!(
        sa.chunks
            .lexical_search(&scope_files(&[&f.id]), "shared", 3)
            .await
            .unwrap()
            .len(),
        1
    );

    // A key deleted on A is gone on B, and B hears of it.
    let u = sa.meta.create_user(user("r@x.io"), false).await.unwrap();
    let rec = ApiKeyRecord {
        user_id: u.id.clone(),
        prefix: "sk-r".into(),
        created_at: 1,
        models: vec![],
        limits: Default::default(),
    };
    sa.meta.put_api_key("hr", &rec).await.unwrap();
    assert!(b.meta.api_key_by_hash("hr").await.unwrap().is_some());
    let mut heard = b.signals.subscribe();
    sa.meta.delete_api_key_of_user(&u.id).await.unwrap();
    sa.signals
        .publish(&Signal::KeyDeleted { hash: "hr".into() })
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), heard.recv())
        .await
        .expect("NOTIFY crossed to the other pool")
        .unwrap();
    assert_eq!(got, Signal::KeyDeleted { hash: "hr".into() });
    assert!(b.meta.api_key_by_hash("hr").await.unwrap().is_none());

    // Sign-in attempts counted across replicas.
    let w = Duration::from_secs(60);
    assert_eq!(
        sa.counters.increment("signin:r@x.io", w).await.unwrap().0,
        1
    );
    assert_eq!(b.counters.increment("signin:r@x.io", w).await.unwrap().0, 2);
    assert_eq!(sa.counters.get("signin:r@x.io").await.unwrap(), 2);
    drop(b);
    a.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_migrate_once_and_restarts_are_idempotent() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { postgres::Pg::connect(&url, PgOptions::default()).await })
        })
        .collect();
    let mut pgs = Vec::new();
    for s in starts {
        pgs.push(s.await.unwrap().expect("every replica starts"));
    }
    // Every migration this ragway knows, each once (1: init, 2: presets, 6: BM25 terms,
    // 7: rate limits).
    let versions = pgs[0].schema_versions().await.unwrap();
    assert_eq!(versions, vec![1, 2, 6, 7, 8]);
    drop(pgs);
    let again = postgres::Pg::connect(&db.url, PgOptions::default())
        .await
        .unwrap();
    assert_eq!(again.schema_versions().await.unwrap(), versions);
    drop(again);
    // A database migrated by a newer ragway is refused with a clear message.
    let c = admin(&db.url).await;
    c.batch_execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')")
        .await
        .unwrap();
    let Err(e) = postgres::Pg::connect(&db.url, PgOptions::default()).await else {
        panic!("a newer schema must be refused");
    };
    assert!(e.to_string().contains("newer than this ragway"), "{e}");
    drop(c);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hnsw_path_finds_the_same_neighbours_and_vectors_round_trip() {
    // exact_scan_limit 0: every search goes through the HNSW expression index.
    let Some(b) = Backend::postgres_with(PgOptions {
        pool_size: 2,
        exact_scan_limit: 0,
    })
    .await
    else {
        return;
    };
    let exact = postgres::connect(&b.db.as_ref().unwrap().url, PgOptions::default())
        .await
        .unwrap();
    // 60 pseudo-random unit vectors: no ties, so exact and approximate orders agree.
    let mut seed = 0x2545_f491_u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let parts: Vec<(String, Vec<f32>)> = (0..60)
        .map(|i| {
            let v: Vec<f32> = (0..8).map(|_| next()).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            (format!("part {i}"), v.iter().map(|x| x / n).collect())
        })
        .collect();
    let borrowed: Vec<(&str, Vec<f32>)> =
        parts.iter().map(|(t, v)| (t.as_str(), v.clone())).collect();
    let (f, ids_) = processed(&b.storage, "u", &borrowed).await;
    let scope = scope_files(&[&f.id]);
    for (i, want) in ids_.iter().enumerate().step_by(7) {
        let q = &parts[i].1;
        let approx = b.storage.chunks.dense_search(&scope, q, 3).await.unwrap();
        let exact_hits = exact.chunks.dense_search(&scope, q, 3).await.unwrap();
        assert_eq!(ids(&approx), ids(&exact_hits), "query {i}");
        assert_eq!(approx[0].0, *want, "a vector is its own nearest neighbour");
        assert!((approx[0].1 - 1.0).abs() < 1e-4, "{approx:?}");
    }
    // Vectors read back exactly as written.
    let pg = postgres::Pg::connect(&b.db.as_ref().unwrap().url, PgOptions::default())
        .await
        .unwrap();
    assert_eq!(pg.vector(ids_[3]).await.unwrap().unwrap(), parts[3].1);
    drop(pg);
    drop(exact);
    b.finish().await;
}

#[tokio::test]
async fn bad_urls_fail_with_a_clear_error_before_connecting() {
    for (url, says) in [
        ("", "empty"),
        ("postgres://u:secret@h:notaport/db", "not a PostgreSQL URL"),
        ("postgres://u:secret@h/db?sslmode=require", "TLS"),
        ("postgres://u:secret@h:5432", "no database"),
    ] {
        let Err(e) = postgres::connect(url, PgOptions::default()).await else {
            panic!("{url} accepted");
        };
        let e = e.to_string();
        assert!(e.contains(says), "{url}: {e}");
        assert!(!e.contains("secret"), "the password leaked: {e}");
    }
    // Nothing listens on port 1: a connection error, not a hang.
    let Err(e) = tokio::time::timeout(
        Duration::from_secs(60),
        postgres::connect("postgres://u@127.0.0.1:1/db", PgOptions::default()),
    )
    .await
    .expect("fails in time") else {
        panic!("connected to nothing");
    };
    assert!(e.to_string().contains("PostgreSQL"), "{e}");
}

// ---------------------------------------------------------------------------
// migrate slice: what `ragway migrate` reads and writes
// ---------------------------------------------------------------------------

async fn whole_copy_reads_settings_and_revoked_tokens(s: &Storage) {
    assert!(s.meta.all_settings().await.unwrap().is_empty());
    s.meta.set_setting("zeta", "1").await.unwrap();
    s.meta.set_setting("alpha", "2").await.unwrap();
    s.meta.set_setting("zeta", "3").await.unwrap();
    assert_eq!(
        s.meta.all_settings().await.unwrap(),
        vec![("alpha".into(), "2".into()), ("zeta".into(), "3".into())]
    );
    let future = ragway::store::now_secs() + 3600;
    s.meta.revoke_token("jti-forever", None).await.unwrap();
    s.meta
        .revoke_token("jti-later", Some(future))
        .await
        .unwrap();
    s.meta.revoke_token("jti-expired", Some(1)).await.unwrap();
    assert_eq!(
        s.meta.revoked_tokens().await.unwrap(),
        vec![
            ("jti-forever".to_string(), None),
            ("jti-later".to_string(), Some(future)),
        ],
        "expired ones are not worth copying"
    );
}

async fn imported_chunks_keep_their_ids_and_vectors(s: &Storage) {
    let (done, done_ids) = processed(s, "u", &[("alpha words", axis(0, 0.1))]).await;
    assert_eq!(
        s.chunks.file_vectors(&done.id).await.unwrap(),
        vec![(done_ids[0], axis(0, 0.1))]
    );
    let base = done_ids[0] + 1000;
    let f = completed(file("u", "moved.txt"), 2);
    s.meta.insert_file(&f).await.unwrap();
    s.queue.enqueue(&f.id).await.unwrap();
    let chunks = vec![
        (base, chunk(&f.id, 0, "heliotrope gardens bloom")),
        (base + 7, chunk(&f.id, 1, "copper kettles whistle")),
    ];
    let vectors = vec![axis(3, 0.2), axis(4, 0.3)];
    for _ in 0..2 {
        // Twice: a resumed copy writes the same file again.
        s.chunks
            .import_file(&f, "moved text", &chunks, &vectors)
            .await
            .unwrap();
    }
    assert_eq!(
        s.chunks.file_chunk_ids(&f.id).await.unwrap(),
        vec![base, base + 7]
    );
    assert_eq!(
        s.chunks.file_vectors(&f.id).await.unwrap(),
        vec![(base, axis(3, 0.2)), (base + 7, axis(4, 0.3))]
    );
    let rows = s.chunks.chunks(&[base + 7]).await.unwrap();
    assert_eq!(rows[0].1.text, "copper kettles whistle");
    assert_eq!(
        s.meta.file_text(&f.id).await.unwrap().as_deref(),
        Some("moved text")
    );
    assert_eq!(
        s.meta.file(&f.id).await.unwrap().unwrap().status,
        Some(FileStatus::Completed)
    );
    assert!(
        !s.queue.is_queued(&f.id).await.unwrap(),
        "off the queue, as complete_file"
    );

    // Searchable like any processed file, alone and in a collection.
    let kb = knowledge("moved");
    s.meta.put_knowledge(&kb).await.unwrap();
    assert!(s.meta.link_file(&kb.id, &f.id).await.unwrap());
    let in_kb = Scope {
        collections: vec![kb.id.clone()],
        files: vec![],
    };
    let hits = s
        .chunks
        .dense_search(&in_kb, &axis(4, 0.3), 2)
        .await
        .unwrap();
    assert_eq!(ids(&hits), vec![base + 7, base]);
    let hits = s
        .chunks
        .lexical_search(&scope_files(&[&f.id]), "kettles", 5)
        .await
        .unwrap();
    assert_eq!(ids(&hits), vec![base + 7]);

    // Ids given out afterwards are above every imported one.
    let (_, later) = processed(s, "u", &[("later words", axis(1, 0.1))]).await;
    assert!(later[0] > base + 7, "{later:?}");

    // An id held by another file is refused, and that file keeps its chunk.
    let other = completed(file("u", "other.txt"), 1);
    s.meta.insert_file(&other).await.unwrap();
    let clash = s
        .chunks
        .import_file(
            &other,
            "x",
            &[(base, chunk(&other.id, 0, "clash"))],
            &[axis(5, 0.1)],
        )
        .await;
    assert!(clash.is_err(), "{clash:?}");
    assert_eq!(
        s.chunks.file_chunk_ids(&f.id).await.unwrap(),
        vec![base, base + 7]
    );
    assert_eq!(s.chunks.chunks(&[base]).await.unwrap()[0].1.file_id, f.id);

    // A file that does not exist, or vectors that do not match the chunks.
    let ghost = file("u", "ghost.txt");
    let r = s
        .chunks
        .import_file(
            &ghost,
            "",
            &[(base + 100, chunk(&ghost.id, 0, "g"))],
            &[axis(2, 0.1)],
        )
        .await;
    assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    let r = s
        .chunks
        .import_file(&other, "", &[(base + 200, chunk(&other.id, 0, "g"))], &[])
        .await;
    assert!(r.is_err(), "{r:?}");
}

/// Both backends score lexical matches with the same BM25 (k1 1.5, b 0.75, "plus one" IDF,
/// statistics over the scope), so a data dir moved to PostgreSQL ranks as before.
async fn lexical_scores_are_okapi_bm25_over_the_scope(s: &Storage) {
    let (f, chunk_ids) = processed(
        s,
        "u",
        &[
            ("apple apple pear", axis(0, 0.1)),
            ("plum pear", axis(1, 0.1)),
        ],
    )
    .await;
    let hits = s
        .chunks
        .lexical_search(&scope_files(&[&f.id]), "apples", 5)
        .await
        .unwrap();
    // n = 2, df(appl) = 1: idf = ln((2 - 1 + 0.5) / 1.5 + 1) = ln 2; avgdl = 2.5, dl = 3.
    let (k1, b) = (1.5f32, 0.75f32);
    let want = 2f32.ln() * 2.0 * (k1 + 1.0) / (2.0 + k1 * (1.0 - b + b * 3.0 / 2.5));
    assert_eq!(ids(&hits), vec![chunk_ids[0]]);
    assert!((hits[0].1 - want).abs() < 1e-4, "{} vs {want}", hits[0].1);
    // Both chunks hold "pear": tf 1 each, the shorter chunk wins; ties of equal score go
    // by id.
    let hits = s
        .chunks
        .lexical_search(&scope_files(&[&f.id]), "pear", 5)
        .await
        .unwrap();
    assert_eq!(ids(&hits), vec![chunk_ids[1], chunk_ids[0]]);
    // Stop words alone match nothing.
    let hits = s
        .chunks
        .lexical_search(&scope_files(&[&f.id]), "the and of", 5)
        .await
        .unwrap();
    assert!(hits.is_empty(), "{hits:?}");
}

/// Chunks stored before migration 6 (no BM25 terms) are indexed when a replica connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_indexes_terms_of_chunks_stored_before_bm25() {
    let Some(b) = Backend::postgres().await else {
        return;
    };
    let (f, chunk_ids) =
        processed(&b.storage, "u", &[("quartz crystals glow", axis(0, 0.1))]).await;
    let url = b.db.as_ref().unwrap().url.clone();
    let c = admin(&url).await;
    c.batch_execute("DELETE FROM chunk_terms; UPDATE chunks SET term_len = NULL")
        .await
        .unwrap();
    let scope = scope_files(&[&f.id]);
    assert!(
        b.storage
            .chunks
            .lexical_search(&scope, "quartz", 5)
            .await
            .unwrap()
            .is_empty()
    );
    let again = postgres::connect(&url, PgOptions::default()).await.unwrap();
    let hits = again
        .chunks
        .lexical_search(&scope, "crystal", 5)
        .await
        .unwrap();
    assert_eq!(ids(&hits), chunk_ids);
    drop(again);
    drop(c);
    b.finish().await;
}
// ---- accounts: API-key limits, and the auth service across replicas -------------------

async fn api_key_limits_are_set_in_place(s: &Storage) {
    let m = &s.meta;
    let u = m.create_user(user("l@x.io"), false).await.unwrap();
    let limits = ragway::limits::Limits {
        rpm: Some(60),
        ..Default::default()
    };
    assert!(
        m.set_api_key_limits(&u.id, limits).await.unwrap().is_none(),
        "no key, nothing to limit"
    );
    assert!(
        m.set_api_key_limits("missing", limits)
            .await
            .unwrap()
            .is_none()
    );
    let rec = ApiKeyRecord {
        user_id: u.id.clone(),
        prefix: "sk-l".into(),
        created_at: 7,
        models: vec!["m".into()],
        limits: Default::default(),
    };
    m.put_api_key("hl", &rec).await.unwrap();
    let set = m.set_api_key_limits(&u.id, limits).await.unwrap().unwrap();
    assert_eq!(set.limits, limits);
    let (hash, stored) = m.api_key_of_user(&u.id).await.unwrap().unwrap();
    assert_eq!(hash, "hl", "the same key, limited");
    assert_eq!(
        (
            stored.prefix.as_str(),
            stored.created_at,
            stored.models.len()
        ),
        ("sk-l", 7, 1)
    );
    assert_eq!(
        m.api_key_by_hash("hl").await.unwrap().unwrap().limits,
        limits
    );
}

fn auth_config(signin_attempts: u32) -> ragway::config::AuthConfig {
    ragway::config::AuthConfig {
        secret_key: None,
        jwt_expires_in: None,
        enable_signup: true,
        default_user_role: Role::Pending,
        enable_api_keys: true,
        api_key_header: "x-api-key".into(),
        admin: None,
        signin_attempts,
        signin_window: Duration::from_secs(600),
        signin_attempts_per_address: 1000,
        password_hash_concurrency: 1,
        password_hash_queue: 16,
        model_access: std::collections::HashMap::new(),
    }
}

fn key_headers(key: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("x-api-key", key.parse().unwrap());
    h
}

/// The auth service of two replicas (`a`, `b`: one storage each, or the same one): a key
/// made on A works on B; a role change on A applies on B though B cached the key; a key
/// deleted on A is refused on B long before B's cache would expire (30 s); sign-in
/// attempts are counted once across both.
async fn accounts_across_replicas(sa: &Storage, sb: &Storage) {
    use ragway::auth::accounts::NewUser;
    use ragway::auth::{Auth, AuthError};
    use ragway::http::router::Access;
    let a = Auth::new(auth_config(3), b"shared secret", sa);
    let b = Auth::new(auth_config(3), b"shared secret", sb);
    let new = NewUser {
        name: "Rep".into(),
        email: "rep@x.io".into(),
        password: "pw-1".into(),
        profile_image_url: None,
    };
    let admin = a
        .accounts()
        .create_user(new, Role::Admin, true)
        .await
        .unwrap();
    let new = NewUser {
        name: "User".into(),
        email: "user@x.io".into(),
        password: "pw-2".into(),
        profile_image_url: None,
    };
    let u = a
        .accounts()
        .create_user(new, Role::User, false)
        .await
        .unwrap();
    let key = a
        .accounts()
        .create_key(&u.id, vec![], Default::default())
        .await
        .unwrap();
    let id = b
        .check(&key_headers(&key), Access::Verified)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id.user.id, u.id, "a key made on A works on B");
    // A's signal for the new key may reach B during that first lookup, which then does not
    // cache what it read: look again until B holds the key, as a busy replica would.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.cached_keys() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "B never cached the key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.check(&key_headers(&key), Access::Verified)
            .await
            .unwrap()
            .unwrap();
    }

    // A demotion on A reaches B's cached entry.
    let change = ragway::auth::accounts::UserUpdate {
        role: Some("pending".into()),
        ..Default::default()
    };
    a.accounts()
        .update_user(&admin, &u.id, change)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match b.check(&key_headers(&key), Access::Verified).await {
            Err(AuthError::RoleDenied) => break,
            Ok(_) => assert!(
                std::time::Instant::now() < deadline,
                "B still honours the old role"
            ),
            Err(e) => panic!("unexpected refusal {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A key deleted on A is refused on B.
    assert!(a.accounts().delete_key(&u.id).await.unwrap());
    assert!(matches!(
        a.check(&key_headers(&key), Access::Session).await,
        Err(AuthError::InvalidToken)
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match b.check(&key_headers(&key), Access::Session).await {
            Err(AuthError::InvalidToken) => break,
            Ok(_) => assert!(
                std::time::Instant::now() < deadline,
                "B still honours a key deleted on A"
            ),
            Err(e) => panic!("unexpected refusal {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.cached_keys(), 0);

    // Three attempts per email, whichever replica they reach.
    for (i, auth) in [&a, &b, &a].into_iter().enumerate() {
        let r = auth
            .accounts()
            .sign_in("user@x.io", format!("wrong-{i}"), None)
            .await;
        assert!(matches!(r, Err(AuthError::InvalidCredentials)), "{r:?}");
    }
    match b.accounts().sign_in("user@x.io", "pw-2".into(), None).await {
        Err(AuthError::RateLimited(wait)) => {
            assert!(wait > Duration::ZERO && wait <= Duration::from_secs(600));
        }
        other => panic!("fourth attempt across replicas: {other:?}"),
    }
    // Other emails keep their own budget.
    let signed = a
        .accounts()
        .sign_in("rep@x.io", "pw-1".into(), None)
        .await
        .unwrap();
    assert_eq!(signed.id, admin.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_across_replicas_embedded() {
    // One process: both services share the storage, its counters and its signals.
    let b = Backend::embedded();
    accounts_across_replicas(&b.storage, &b.storage).await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_across_replicas_postgres() {
    let Some((a, b)) = two_replicas().await else {
        return;
    };
    accounts_across_replicas(&a.storage, &b).await;
    drop(b);
    a.finish().await;
}

// --- library: presets, blobs moved in from local files, the library service itself ---

fn preset(id: &str, user_id: &str) -> PresetRecord {
    PresetRecord {
        id: id.into(),
        user_id: user_id.into(),
        base_model_id: "llama3".into(),
        name: format!("Preset {id}"),
        params: serde_json::Map::from_iter([(
            "system".to_string(),
            serde_json::json!("Be brief."),
        )]),
        meta: serde_json::Map::new(),
        access_grants: vec![],
        is_active: true,
        created_at: 1,
        updated_at: 1,
    }
}

async fn presets_insert_within_bounds_update_and_delete(s: &Storage) {
    let m = &s.meta;
    assert!(m.preset("p").await.unwrap().is_none());
    assert!(m.presets().await.unwrap().is_empty());
    for (id, user) in [("b/é", "u1"), ("a", "u1"), ("Z", "u2")] {
        m.insert_preset(&preset(id, user), 2, 4)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        m.insert_preset(&preset("a", "u3"), 2, 4).await.unwrap(),
        Err(PresetRefusal::IdTaken)
    );
    assert_eq!(
        m.insert_preset(&preset("c", "u1"), 2, 4).await.unwrap(),
        Err(PresetRefusal::UserLimit)
    );
    m.insert_preset(&preset("d", "u3"), 2, 4)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.insert_preset(&preset("e", "u4"), 2, 4).await.unwrap(),
        Err(PresetRefusal::TotalLimit)
    );
    let ids: Vec<String> = m
        .presets()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(ids, ["Z", "a", "b/é", "d"], "byte order of ids");
    let mut p = m.preset("a").await.unwrap().unwrap();
    assert_eq!(p.params["system"], "Be brief.");
    p.name = "Renamed".into();
    p.is_active = false;
    assert!(m.update_preset(&p).await.unwrap());
    let back = m.preset("a").await.unwrap().unwrap();
    assert_eq!((back.name.as_str(), back.is_active), ("Renamed", false));
    assert!(!m.update_preset(&preset("nope", "u1")).await.unwrap());
    assert!(m.preset("nope").await.unwrap().is_none());
    assert!(m.delete_preset("a").await.unwrap());
    assert!(!m.delete_preset("a").await.unwrap());
    // A deleted preset frees its owner's place.
    m.insert_preset(&preset("c", "u1"), 2, 4)
        .await
        .unwrap()
        .unwrap();
}

async fn blobs_move_local_files_in(s: &Storage) {
    let b = &s.blobs;
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let src = dir.path().join("upload.part");
    std::fs::write(&src, &data).unwrap();
    b.put_file("f1_a.pdf", &src).await.unwrap();
    assert!(!src.exists(), "the local file was moved in");
    assert_eq!(b.get("f1_a.pdf").await.unwrap().unwrap(), data);
    if let Some(path) = b.local_path("f1_a.pdf") {
        assert_eq!(std::fs::read(path).unwrap(), data);
    }
    // Replaces a blob of the same key.
    std::fs::write(&src, b"second").unwrap();
    b.put_file("f1_a.pdf", &src).await.unwrap();
    assert_eq!(b.get("f1_a.pdf").await.unwrap().unwrap(), b"second");
    // A refused key leaves the local file where it was.
    std::fs::write(&src, b"x").unwrap();
    assert!(matches!(
        b.put_file("../x", &src).await,
        Err(StorageError::InvalidKey(_))
    ));
    assert!(src.exists());
    assert!(b.local_path("../x").is_none());
    assert!(b.delete("f1_a.pdf").await.unwrap());
}

async fn library_keeps_files_collections_and_blobs_as_one_unit(s: &Storage) {
    let lib = Library::new(s);
    let new = |name: &str, sha: &str, process: bool| NewFile {
        user_id: "owner".into(),
        filename: name.into(),
        name: name.into(),
        content_type: "text/plain".into(),
        size: 5,
        sha256: sha.into(),
        data: serde_json::json!({"from": "test"}),
        process,
    };
    let a = lib
        .create_file(
            "fa".into(),
            new("a.txt", "h1", true),
            Content::Bytes(b"hello"),
        )
        .await
        .unwrap();
    assert_eq!(a.status, Some(FileStatus::Pending));
    assert_eq!(a.meta["file_hash"], "h1");
    assert_eq!(a.meta["data"]["from"], "test");
    assert!(s.queue.is_queued("fa").await.unwrap());
    let key = ragway::library::blob_key_of(&a);
    assert_eq!(key, "fa_a.txt");
    assert_eq!(s.blobs.get(&key).await.unwrap().unwrap(), b"hello");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("b.part");
    std::fs::write(&src, b"hello").unwrap();
    let b = lib
        .create_file(
            "fb".into(),
            new("../b.txt", "h1", false),
            Content::File(&src),
        )
        .await
        .unwrap();
    assert_eq!(b.status, None, "process=false files have no status");
    assert!(!s.queue.is_queued("fb").await.unwrap());
    assert_eq!(ragway::library::blob_key_of(&b), "fb_b.txt");
    // Both processed, with the same content.
    for f in [&a, &b] {
        let mut f = f.clone();
        f.status = Some(FileStatus::Completed);
        f.hash = Some("same".into());
        s.meta.update_file(&f).await.unwrap();
    }
    let (a, b) = (
        lib.file("fa").await.unwrap().unwrap(),
        lib.file("fb").await.unwrap().unwrap(),
    );
    let mut kb = lib
        .create_collection("owner", "Docs".into(), "d".into(), vec![])
        .await
        .unwrap();
    assert_eq!(lib.collection(&kb.id).await.unwrap().unwrap().name, "Docs");
    assert_eq!(lib.add_file(&kb.id, &a).await.unwrap(), Added::Added);
    assert_eq!(lib.add_file(&kb.id, &a).await.unwrap(), Added::AlreadyThere);
    assert_eq!(lib.add_file(&kb.id, &b).await.unwrap(), Added::Duplicate);
    let ids = |files: Vec<FileRecord>| files.into_iter().map(|f| f.id).collect::<Vec<_>>();
    assert_eq!(ids(lib.collection_files(&kb.id).await.unwrap()), ["fa"]);
    assert!(matches!(
        lib.unlink_file(&kb.id, "fb").await,
        Err(LibraryError::NotInCollection(_))
    ));
    assert!(
        lib.link_file(&kb.id, "fb").await.unwrap(),
        "no duplicate check"
    );
    lib.reset_collection(&kb.id).await.unwrap();
    assert!(lib.collection_files(&kb.id).await.unwrap().is_empty());
    assert!(s.meta.file("fa").await.unwrap().is_some(), "files stay");
    lib.add_file(&kb.id, &a).await.unwrap();
    kb.name = "Renamed".into();
    lib.save_collection(&mut kb).await.unwrap();
    assert_eq!(
        lib.collection(&kb.id).await.unwrap().unwrap().name,
        "Renamed"
    );
    // Deleting a file takes its record, membership, queue entry and blob.
    lib.delete_file("fa").await.unwrap();
    assert!(lib.file("fa").await.unwrap().is_none());
    assert!(s.blobs.get(&key).await.unwrap().is_none());
    assert!(!s.queue.is_queued("fa").await.unwrap());
    assert!(lib.collection_files(&kb.id).await.unwrap().is_empty());
    lib.delete_file("fa").await.unwrap();
    assert!(lib.delete_collection(&kb.id).await.unwrap());
    assert!(lib.collection(&kb.id).await.unwrap().is_none());
    // A deleted user's files and collections go with the deletion record.
    let u = s
        .meta
        .create_user(user("gone@example.com"), false)
        .await
        .unwrap();
    let mut f = new("c.txt", "h3", false);
    f.user_id.clone_from(&u.id);
    lib.create_file("fc".into(), f, Content::Bytes(b"bye"))
        .await
        .unwrap();
    let theirs = lib
        .create_collection(&u.id, "Theirs".into(), String::new(), vec![])
        .await
        .unwrap();
    s.meta.delete_user(&u.id).await.unwrap();
    assert_eq!(s.meta.pending_user_deletions().await.unwrap(), vec![u.id]);
    lib.finish_deletions().await.unwrap();
    assert!(lib.file("fc").await.unwrap().is_none());
    assert!(s.blobs.get("fc_c.txt").await.unwrap().is_none());
    assert!(lib.collection(&theirs.id).await.unwrap().is_none());
    assert!(s.meta.pending_user_deletions().await.unwrap().is_empty());
    assert!(
        lib.file("fb").await.unwrap().is_none(),
        "owner is no user: swept too"
    );
}

// Ingest slice (issue 11): claiming a named file, local blob paths.
// ---------------------------------------------------------------------------

async fn queue_claims_a_named_file_once(s: &Storage) {
    let q = &s.queue;
    let lease = Duration::from_secs(60);
    let a = file("u", "a");
    let b = file("u", "b");
    s.meta.insert_file(&a).await.unwrap();
    s.meta.insert_file(&b).await.unwrap();
    assert!(
        q.claim_file(&a.id, lease).await.unwrap().is_none(),
        "not queued"
    );
    assert!(q.claim_file("no-such-file", lease).await.unwrap().is_none());
    q.enqueue(&a.id).await.unwrap();
    q.enqueue(&b.id).await.unwrap();
    let jb = q.claim_file(&b.id, lease).await.unwrap().unwrap();
    assert_eq!((jb.file_id.as_str(), jb.attempts), (b.id.as_str(), 1));
    assert!(
        q.claim_file(&b.id, lease).await.unwrap().is_none(),
        "leased already"
    );
    let ja = q.claim(lease).await.unwrap().unwrap();
    assert_eq!(ja.file_id, a.id, "claim skips the named file's lease");
    assert!(q.claim_file(&a.id, lease).await.unwrap().is_none());
    assert!(q.heartbeat(&jb, lease).await.unwrap());
    assert_eq!(q.fail(&jb, 5).await.unwrap(), Retry::Requeued);
    let jb2 = q.claim_file(&b.id, lease).await.unwrap().unwrap();
    assert_eq!(jb2.attempts, 2, "attempts count across both kinds of claim");
    assert!(q.complete(&jb2).await.unwrap());
    assert!(q.claim_file(&b.id, lease).await.unwrap().is_none());
    // An expired lease on a named file is taken over like any other.
    let short = q.claim_file(&a.id, Duration::from_millis(1)).await.unwrap();
    assert!(short.is_none(), "a's lease from claim() is live");
    q.fail(&ja, 5).await.unwrap();
    let dead = q
        .claim_file(&a.id, Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = q.claim_file(&a.id, lease).await.unwrap().unwrap();
    assert_eq!(again.attempts, dead.attempts + 1);
    assert!(!q.complete(&dead).await.unwrap());
    assert!(q.complete(&again).await.unwrap());
}

async fn local_blob_paths_hold_what_was_put(s: &Storage) {
    let b = &s.blobs;
    b.put("f1_notes.txt", b"local bytes").await.unwrap();
    if let Some(path) = b.local_path("f1_notes.txt") {
        assert_eq!(std::fs::read(&path).unwrap(), b"local bytes");
        b.delete("f1_notes.txt").await.unwrap();
        assert!(!path.exists());
    } else {
        assert_eq!(
            b.get("f1_notes.txt").await.unwrap().as_deref(),
            Some(&b"local bytes"[..])
        );
    }
    for bad in ["", "..", "../etc/passwd", "a/b", "a\\b", "a\nb"] {
        assert!(b.local_path(bad).is_none(), "{bad:?}");
    }
}
// --- retrieval: scoring candidates and BM25 with parameters ---

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn close(got: Option<f32>, want: f32) {
    let got = got.expect("a score");
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

async fn similarities_and_vectors_answer_in_the_order_asked(s: &Storage) {
    let (a, a_ids) = processed(s, "u", &[("one", axis(0, 0.1)), ("two", axis(1, 0.1))]).await;
    let (b, b_ids) = processed(s, "u", &[("three", axis(2, 0.3))]).await;
    let q = axis(1, 0.0);
    let refs = [
        (a_ids[1], a.id.as_str()),
        (999_999, a.id.as_str()),
        (b_ids[0], b.id.as_str()),
        (a_ids[0], a.id.as_str()),
    ];
    let sims = s.chunks.similarities(&q, &refs).await.unwrap();
    assert_eq!(sims.len(), 4, "one answer per chunk asked");
    close(sims[0], dot(&q, &axis(1, 0.1)));
    assert_eq!(sims[1], None, "no such chunk");
    close(sims[2], dot(&q, &axis(2, 0.3)));
    close(sims[3], dot(&q, &axis(0, 0.1)));
    // The scores dense search ranks by.
    let hits = s
        .chunks
        .dense_search(&scope_files(&[&a.id]), &q, 2)
        .await
        .unwrap();
    assert_eq!(hits.len(), 2);
    for (id, score) in &hits {
        let i = refs.iter().position(|r| r.0 == *id).unwrap();
        close(sims[i], *score);
    }
    // A query of another dimension (another embedding model) scores nothing, and fails
    // nothing.
    let other = s
        .chunks
        .similarities(&[1.0, 0.0, 0.0], &refs)
        .await
        .unwrap();
    assert_eq!(other, vec![None; 4]);
    assert!(s.chunks.similarities(&q, &[]).await.unwrap().is_empty());

    let vectors = s
        .chunks
        .vectors(&[refs[2], refs[1], refs[3], refs[2]])
        .await
        .unwrap();
    assert_eq!(vectors.len(), 4);
    for (got, want) in [(&vectors[0], axis(2, 0.3)), (&vectors[2], axis(0, 0.1))] {
        let got = got.as_ref().expect("a vector");
        assert_eq!(got.len(), want.len());
        assert!(got.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-6));
    }
    assert_eq!(vectors[1], None);
    assert_eq!(vectors[3], vectors[0], "asked twice, answered twice");
    assert!(s.chunks.vectors(&[]).await.unwrap().is_empty());

    // A deleted file's chunks have neither.
    s.meta.delete_file(&b.id).await.unwrap().unwrap();
    assert_eq!(
        s.chunks.similarities(&q, &refs[2..3]).await.unwrap(),
        vec![None]
    );
    assert_eq!(s.chunks.vectors(&refs[2..3]).await.unwrap(), vec![None]);
}

async fn tuned_bm25_is_bm25_or_refused(s: &Storage) {
    use ragway::index::bm25::Bm25Params;
    let (a, a_ids) = processed(
        s,
        "u",
        &[
            ("cat cat cat cat dog", axis(0, 0.0)),
            ("cat dog bird fish horse cow pig hen", axis(1, 0.0)),
            ("nothing here", axis(2, 0.0)),
        ],
    )
    .await;
    let scope = scope_files(&[&a.id]);
    let plain = s.chunks.lexical_search(&scope, "cat", 5).await.unwrap();
    assert_eq!(ids(&plain), a_ids[..2], "term frequency counts by default");
    let flat = Bm25Params { k1: 0.0, b: 0.75 };
    let Some(defaults) = s
        .chunks
        .lexical_search_with(&scope, "cat", 5, Bm25Params::default())
        .await
        .unwrap()
    else {
        // Not BM25 (PostgreSQL's ts_rank_cd): refused for every setting, never answered
        // with another ranking.
        assert!(
            s.chunks
                .lexical_search_with(&scope, "cat", 5, flat)
                .await
                .unwrap()
                .is_none()
        );
        return;
    };
    assert_eq!(defaults, plain, "the defaults are the plain search");
    // k1 = 0: term frequency saturates at once, both chunks score the term's IDF.
    let hits = s
        .chunks
        .lexical_search_with(&scope, "cat", 5, flat)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hits.len(), 2);
    assert!((hits[0].1 - hits[1].1).abs() < 1e-6, "{hits:?}");
    assert!(plain[0].1 > plain[1].1 + 1e-3, "{plain:?}");
    // Scoped like the plain search: another file's matches stay out.
    let (other, _) = processed(s, "u", &[("cat", axis(3, 0.0))]).await;
    let hits = s
        .chunks
        .lexical_search_with(&scope, "cat", 5, flat)
        .await
        .unwrap()
        .unwrap();
    assert!(
        ids(&hits).iter().all(|i| a_ids.contains(i)),
        "{:?}",
        other.id
    );
}

// rate limits: the buckets of `ragway::limits`, wherever the backend keeps them. Windows are
// a minute or a day, so these cases use limits whose refill during a test is negligible or
// is what they measure.

fn limited(user: &str, key: Option<Limits>, own: Option<Limits>) -> Applied {
    Applied {
        user_id: user.into(),
        key,
        user: own,
    }
}

fn rpd(n: u64) -> Limits {
    Limits {
        rpd: Some(n),
        ..Limits::default()
    }
}

/// Asserts `d` is within `slack` below `want` (time passes while a test runs).
fn about(d: Duration, want: Duration, slack: Duration) {
    assert!(d <= want && d + slack >= want, "{d:?}, want about {want:?}");
}

async fn rate_limits_admit_to_the_limit_then_refuse(s: &Storage) {
    let r = &s.rate_limits;
    let a = limited("u1", Some(rpd(3)), None);
    for _ in 0..3 {
        assert!(r.admit(&a).await.unwrap().is_ok());
    }
    let no = r.admit(&a).await.unwrap().unwrap_err();
    assert!(!no.kind_tokens && no.key, "{no:?}");
    assert_eq!((no.limit, no.used), (3, 3));
    // One request of room comes back in a third of a day.
    let third = Duration::from_hours(8);
    about(no.retry_after, third, Duration::from_mins(1));
    // Refusals count nothing.
    for _ in 0..5 {
        assert!(r.admit(&a).await.unwrap().is_err());
    }
    assert_eq!(r.admit(&a).await.unwrap().unwrap_err().used, 3);
    // Another user's buckets are their own.
    assert!(
        r.admit(&limited("u2", Some(rpd(3)), None))
            .await
            .unwrap()
            .is_ok()
    );
    // No limit on either subject: admitted, nothing counted.
    for _ in 0..10 {
        assert!(r.admit(&limited("u3", None, None)).await.unwrap().is_ok());
    }
    assert!(
        r.admit(&limited("u3", Some(rpd(1)), None))
            .await
            .unwrap()
            .is_ok(),
        "unlimited requests left the bucket full"
    );
    // Per minute: two a minute, the third waits for half a minute.
    let rpm = Limits {
        rpm: Some(2),
        ..Limits::default()
    };
    let m = limited("u4", None, Some(rpm));
    assert!(r.admit(&m).await.unwrap().is_ok());
    assert!(r.admit(&m).await.unwrap().is_ok());
    let no = r.admit(&m).await.unwrap().unwrap_err();
    assert!(!no.key && no.label.contains("RPM"), "{no:?}");
    about(
        no.retry_after,
        Duration::from_secs(30),
        Duration::from_secs(10),
    );
}

async fn rate_limits_charge_tokens_with_capped_debt(s: &Storage) {
    let limits = &s.rate_limits;
    let tpm = Limits {
        tpm: Some(100),
        ..Limits::default()
    };
    let a = limited("t1", None, Some(tpm));
    assert!(limits.admit(&a).await.unwrap().is_ok());
    limits.charge(&a, 60).await.unwrap();
    // Not exhausted yet: admitted although the answer may take more than is left.
    assert!(limits.admit(&a).await.unwrap().is_ok());
    limits.charge(&a, 60).await.unwrap();
    let no = limits.admit(&a).await.unwrap().unwrap_err();
    assert!(no.kind_tokens && !no.key, "{no:?}");
    assert_eq!((no.limit, no.used), (100, 120));
    // 20 tokens over at 100 a minute.
    about(
        no.retry_after,
        Duration::from_secs(12),
        Duration::from_secs(5),
    );

    // A huge (or lying) answer runs the bucket at most one window into debt.
    let tpd = Limits {
        tpd: Some(1000),
        ..Limits::default()
    };
    let d = limited("t2", Some(tpd), None);
    assert!(limits.admit(&d).await.unwrap().is_ok());
    limits.charge(&d, u64::MAX).await.unwrap();
    let no = limits.admit(&d).await.unwrap().unwrap_err();
    assert!(no.kind_tokens && no.key, "{no:?}");
    assert_eq!(no.used, 2000, "debt capped at one window");
    about(
        no.retry_after,
        Duration::from_hours(24),
        Duration::from_mins(1),
    );

    // Tokens refill continuously: 600 a minute is 10 a second, 6 over is 0.6 s.
    let fast = Limits {
        tpm: Some(600),
        ..Limits::default()
    };
    let f = limited("t3", None, Some(fast));
    assert!(limits.admit(&f).await.unwrap().is_ok());
    limits.charge(&f, 606).await.unwrap();
    let no = limits.admit(&f).await.unwrap().unwrap_err();
    about(
        no.retry_after,
        Duration::from_millis(600),
        Duration::from_millis(500),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(limits.admit(&f).await.unwrap().is_ok(), "refilled");

    // Nothing to charge: no token limit, or no tokens.
    let req_only = limited("t4", Some(rpd(1)), None);
    assert!(limits.admit(&req_only).await.unwrap().is_ok());
    limits.charge(&req_only, 1_000_000).await.unwrap();
    limits.charge(&f, 0).await.unwrap();
    assert!(limits.admit(&f).await.unwrap().is_ok());
}

async fn rate_limits_keep_key_and_user_apart(s: &Storage) {
    let r = &s.rate_limits;
    // The key allows one a day, the user five: the key refuses the second.
    let both = limited("k1", Some(rpd(1)), Some(rpd(5)));
    assert!(r.admit(&both).await.unwrap().is_ok());
    let no = r.admit(&both).await.unwrap().unwrap_err();
    assert!(no.key && no.limit == 1, "{no:?}");
    // Without the key (a session), the user's bucket holds the one request counted: four
    // more pass and the refusals by the key counted nothing.
    let session = limited("k1", None, Some(rpd(5)));
    for _ in 0..4 {
        assert!(r.admit(&session).await.unwrap().is_ok());
    }
    let no = r.admit(&session).await.unwrap().unwrap_err();
    assert!(!no.key && no.limit == 5 && no.used == 5, "{no:?}");
    // Both refuse: the client is told the longer wait (the key's day, not the user's
    // minute).
    let rpm1 = Limits {
        rpm: Some(1),
        ..Limits::default()
    };
    let two = limited("k2", Some(rpd(1)), Some(rpm1));
    assert!(r.admit(&two).await.unwrap().is_ok());
    let no = r.admit(&two).await.unwrap().unwrap_err();
    assert!(no.key && no.label.contains("RPD"), "{no:?}");
    assert!(no.retry_after > Duration::from_hours(1), "{no:?}");
    // A refusal by one bucket counts nothing in the others: the user's minute bucket
    // still has its one request only, so a minute-old request would pass it.
    let user_only = limited("k2", None, Some(rpm1));
    let no = r.admit(&user_only).await.unwrap().unwrap_err();
    assert_eq!(no.used, 1);
}

async fn rate_limits_hold_under_concurrent_admits(s: &Storage) {
    let a = limited("c1", Some(rpd(7)), Some(rpd(100)));
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let r = s.rate_limits.clone();
            let a = a.clone();
            tokio::spawn(async move { r.admit(&a).await.unwrap().is_ok() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 7, "exactly the limit passes");
    // The user's bucket counted the admitted ones only.
    let no = s
        .rate_limits
        .admit(&limited("c1", None, Some(rpd(7))))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(no.used, 7);
}

/// Two replicas on one database share every bucket: concurrent admissions on both never
/// pass a limit together, and tokens charged on one refuse on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_rate_limits() {
    let Some((a, b)) = two_replicas().await else {
        return;
    };
    let limit = limited("r1", Some(rpd(10)), None);
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let r = if i % 2 == 0 {
                a.storage.rate_limits.clone()
            } else {
                b.rate_limits.clone()
            };
            let l = limit.clone();
            tokio::spawn(async move { r.admit(&l).await.unwrap().is_ok() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 10, "one limit across both replicas");
    assert!(b.rate_limits.admit(&limit).await.unwrap().is_err());

    let tpd = limited(
        "r2",
        None,
        Some(Limits {
            tpd: Some(1000),
            ..Limits::default()
        }),
    );
    assert!(a.storage.rate_limits.admit(&tpd).await.unwrap().is_ok());
    a.storage.rate_limits.charge(&tpd, 400).await.unwrap();
    assert!(b.rate_limits.admit(&tpd).await.unwrap().is_ok());
    b.rate_limits.charge(&tpd, 700).await.unwrap();
    let no = a
        .storage
        .rate_limits
        .admit(&tpd)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(no.used, 1100, "both replicas' tokens");
    assert_eq!(a.storage.rate_limits.len(), 0, "nothing held in memory");
    drop(b);
    a.finish().await;
}

/// Buckets full again are deleted, so the table holds the buckets used within their
/// window, not every user ever seen; live ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_rate_limit_buckets_are_swept() {
    let Some(b) = Backend::postgres().await else {
        return;
    };
    let url = b.db.as_ref().unwrap().url.clone();
    let pg = postgres::Pg::connect(&url, PgOptions::default())
        .await
        .unwrap();
    let r = &b.storage.rate_limits;
    for i in 0..20 {
        let a = limited(&format!("s{i}"), Some(rpd(5)), Some(rpd(5)));
        assert!(r.admit(&a).await.unwrap().is_ok());
    }
    // Unlimited requests write nothing.
    assert!(
        r.admit(&limited("s-none", None, None))
            .await
            .unwrap()
            .is_ok()
    );
    assert_eq!(pg.rate_limit_rows().await.unwrap(), 40);
    assert_eq!(pg.sweep_rate_limits().await.unwrap(), 0, "none full yet");
    // Half the users were last seen two days ago: their buckets are full again.
    admin(&url)
        .await
        .batch_execute(
            "UPDATE rate_limits SET at = at - interval '2 days', full_at = full_at - interval '2 days'
             WHERE user_id IN ('s0','s1','s2','s3','s4','s5','s6','s7','s8','s9')",
        )
        .await
        .unwrap();
    assert_eq!(pg.sweep_rate_limits().await.unwrap(), 20);
    assert_eq!(pg.rate_limit_rows().await.unwrap(), 20);
    // A swept bucket is a full one; a kept one still counts.
    let a = limited("s0", Some(rpd(1)), None);
    assert!(r.admit(&a).await.unwrap().is_ok());
    let kept = limited("s10", Some(rpd(1)), None);
    assert_eq!(r.admit(&kept).await.unwrap().unwrap_err().used, 1);
    drop(pg);
    b.finish().await;
}
