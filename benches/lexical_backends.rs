//! Lexical ranking quality of the PostgreSQL backend against the embedded one (BM25), on
//! the same chunks: an evaluation data dir kept by `ragway eval --data-dir D` is copied into
//! a fresh database with `ragway migrate`'s code, then every judged query runs through
//! `Chunks::lexical_search` on both backends (the collection `eval`, 100 chunks), documents
//! ranked by their best chunk, and nDCG@10 compared per query (paired bootstrap). Dense
//! search needs no such check: the vectors are copied bit for bit and both backends search
//! them exactly at these sizes (`tests/migrate.rs` compares the hits).
//!
//! Run, with a PostgreSQL from `scripts/postgres.sh start` (`--profile dev` builds in a
//! minute; the measurement does not depend on the profile):
//!
//! ```sh
//! RAGWAY_TEST_POSTGRES_URL=postgres://... cargo bench --profile dev --bench lexical_backends -- \
//!     DATASET_DIR DATA_DIR [SPLIT]
//! ```
//!
//! `DATA_DIR` is only read: its database is copied to a temporary directory first (uploads
//! are not needed). The database created for the run is dropped at the end.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use ragway::commands::eval::{Dataset, ndcg, paired_bootstrap, recall};
use ragway::commands::migrate;
use ragway::storage::{Scope, Storage};

/// Chunks asked per query: the retrieval API's default `k` in `ragway eval`.
const K: usize = 100;

/// Mean nDCG@10 and recall@100 per query of one backend.
async fn rank(
    s: &Storage,
    kb: &str,
    ds: &Dataset,
    qids: &[&String],
    file_to_doc: &HashMap<String, String>,
) -> (Vec<f64>, f64) {
    let scope = Scope {
        collections: vec![kb.to_string()],
        files: vec![],
    };
    let mut per_query = Vec::with_capacity(qids.len());
    let mut r100 = 0.0;
    for q in qids {
        let hits = s
            .chunks
            .lexical_search(&scope, &ds.queries[*q], K)
            .await
            .expect("lexical search");
        let ids: Vec<u64> = hits.iter().map(|h| h.0).collect();
        let chunks = s.chunks.chunks(&ids).await.expect("chunks");
        let mut seen = HashSet::new();
        let docs: Vec<String> = chunks
            .iter()
            .filter_map(|(_, c)| file_to_doc.get(&c.file_id))
            .filter(|d| seen.insert((*d).clone()))
            .cloned()
            .collect();
        per_query.push(ndcg(&docs, &ds.qrels[*q], 10));
        r100 += recall(&docs, &ds.qrels[*q], 100);
    }
    let n = qids.len().max(1) as f64;
    (per_query, r100 / n)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (Some(dataset), Some(data_dir)) = (args.first(), args.get(1)) else {
        eprintln!("usage: cargo bench --bench lexical_backends -- DATASET_DIR DATA_DIR [SPLIT]");
        std::process::exit(2);
    };
    let split = args.get(2).map_or("test", String::as_str);
    let admin_url =
        std::env::var("RAGWAY_TEST_POSTGRES_URL").expect("set RAGWAY_TEST_POSTGRES_URL");
    let ds = Dataset::load(Path::new(dataset), split).expect("dataset");

    let copy = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        Path::new(data_dir).join("ragway.redb"),
        copy.path().join("ragway.redb"),
    )
    .expect("copy the data dir's database");
    let src = migrate::open_source(copy.path()).expect("source");

    let name = format!("ragway_lex_{}", uuid::Uuid::new_v4().simple());
    let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let mut cfg: tokio_postgres::Config = admin_url.parse().expect("URL");
    cfg.dbname(&name);
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let url = format!("postgres://{user}@{host}:{port}/{name}");
    let dst = migrate::connect_target(&url).await.expect("target");
    let t = std::time::Instant::now();
    let report = migrate::migrate(&src, &dst, false, &indicatif::ProgressBar::hidden())
        .await
        .expect("migrate");
    eprintln!(
        "migrated {} files, {} chunks in {:.1}s",
        report.copied.files,
        report.copied.chunks,
        t.elapsed().as_secs_f64()
    );

    let kb = src
        .meta
        .knowledges()
        .await
        .expect("collections")
        .into_iter()
        .find(|k| k.name == "eval")
        .expect("an evaluation collection (ragway eval --data-dir)")
        .id;
    let file_to_doc: HashMap<String, String> = src
        .meta
        .files()
        .await
        .expect("files")
        .into_iter()
        .filter_map(|f| {
            let doc = f.meta["data"]["doc_id"].as_str()?.to_string();
            Some((f.id, doc))
        })
        .collect();
    let mut qids: Vec<&String> = ds
        .qrels
        .keys()
        .filter(|q| ds.queries.contains_key(*q))
        .collect();
    qids.sort();

    let (embedded, r_e) = rank(&src, &kb, &ds, &qids, &file_to_doc).await;
    let (postgres, r_p) = rank(&dst, &kb, &ds, &qids, &file_to_doc).await;
    let p = paired_bootstrap(&embedded, &postgres, 10_000, 0x5eed);
    let worse = embedded
        .iter()
        .zip(&postgres)
        .filter(|(a, b)| *b < *a)
        .count();
    let better = embedded
        .iter()
        .zip(&postgres)
        .filter(|(a, b)| *b > *a)
        .count();
    println!(
        "dataset {} ({} queries, {} chunks)",
        dataset,
        qids.len(),
        report.copied.chunks
    );
    println!("backend     lexical nDCG@10  recall@100");
    println!(
        "embedded    {:>15.4}  {:>10.4}   (BM25)",
        mean(&embedded),
        r_e
    );
    println!(
        "postgres    {:>15.4}  {:>10.4}   (BM25 over term tables)",
        mean(&postgres),
        r_p
    );
    println!(
        "postgres - embedded: {:+.4} [{:+.4}, {:+.4}] (95 % paired bootstrap); queries worse {worse}, better {better}",
        p.delta, p.low, p.high
    );

    drop(dst);
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}
