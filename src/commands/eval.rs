//! `ragway eval --dataset DIR`: retrieval quality on a BEIR-layout dataset
//! (`corpus.jsonl`, `queries.jsonl`, `qrels/test.tsv`), through ragway's own ingestion
//! pipeline and the same ranking functions chat uses. Documents are ranked by their best
//! chunk. Prints nDCG@10, recall@10 and recall@100 per mode, with timings.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::rag::{Fuse, Mode, Scope, rank};
use crate::store::FileStatus;

/// A loaded BEIR dataset.
pub struct Dataset {
    /// doc id → (title, text)
    pub corpus: Vec<(String, String, String)>,
    /// query id → text
    pub queries: HashMap<String, String>,
    /// query id → (doc id → graded relevance)
    pub qrels: HashMap<String, HashMap<String, u32>>,
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

fn id_of(v: &Value) -> Option<String> {
    match v.get("_id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Dataset {
    pub fn load(dir: &Path) -> Result<Dataset, String> {
        let corpus = read_jsonl(&dir.join("corpus.jsonl"))?
            .iter()
            .map(|d| {
                let id = id_of(d).ok_or("corpus.jsonl: a document has no _id")?;
                let title = d
                    .get("title")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let text = d
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                Ok((id, title, text))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let queries = read_jsonl(&dir.join("queries.jsonl"))?
            .iter()
            .filter_map(|q| Some((id_of(q)?, q.get("text")?.as_str()?.to_string())))
            .collect();
        let qrels_path = dir.join("qrels").join("test.tsv");
        let text = std::fs::read_to_string(&qrels_path)
            .map_err(|e| format!("{}: {e}", qrels_path.display()))?;
        let mut qrels: HashMap<String, HashMap<String, u32>> = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let cols: Vec<&str> = line.split('\t').collect();
            if cols.len() < 3 {
                continue;
            }
            let Ok(score) = cols[2].trim().parse::<u32>() else {
                if i == 0 {
                    continue; // header
                }
                return Err(format!(
                    "{} line {}: bad score",
                    qrels_path.display(),
                    i + 1
                ));
            };
            if score > 0 {
                qrels
                    .entry(cols[0].to_string())
                    .or_default()
                    .insert(cols[1].to_string(), score);
            }
        }
        if corpus.is_empty() || qrels.is_empty() {
            return Err("the dataset has no documents or no relevance judgements".into());
        }
        Ok(Dataset {
            corpus,
            queries,
            qrels,
        })
    }
}

/// nDCG@k with graded gains (BEIR: gain = relevance, log2 discount).
pub fn ndcg(ranked: &[String], rel: &HashMap<String, u32>, k: usize) -> f64 {
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, d)| f64::from(*rel.get(d).unwrap_or(&0)) / ((i + 2) as f64).log2())
        .sum();
    let mut ideal: Vec<u32> = rel.values().copied().collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, g)| f64::from(*g) / ((i + 2) as f64).log2())
        .sum();
    if idcg == 0.0 { 0.0 } else { dcg / idcg }
}

/// Fraction of relevant documents in the top `k`.
pub fn recall(ranked: &[String], rel: &HashMap<String, u32>, k: usize) -> f64 {
    if rel.is_empty() {
        return 0.0;
    }
    let hits = ranked
        .iter()
        .take(k)
        .filter(|d| rel.contains_key(*d))
        .count();
    hits as f64 / rel.len() as f64
}

/// Scores of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: String,
    pub ndcg_at_10: f64,
    pub recall_at_10: f64,
    pub recall_at_100: f64,
    pub queries: usize,
    pub search_ms_p50: f64,
    pub search_ms_p95: f64,
}

/// The whole evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub documents: usize,
    pub chunks: usize,
    pub ingest_secs: f64,
    pub query_embed_ms_p50: f64,
    pub results: Vec<ModeResult>,
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Ingests the corpus into a fresh collection of `app` (one file per document).
async fn ingest(
    app: &App,
    ds: &Dataset,
    progress: &indicatif::ProgressBar,
) -> Result<(String, HashMap<String, String>, usize), String> {
    let owner = "eval".to_string();
    let kb = app
        .library()
        .create_collection(&owner, "eval".into(), String::new(), Vec::new())
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&app.ingest.upload_dir).map_err(|e| e.to_string())?;
    let mut file_to_doc = HashMap::new();
    let mut ids = Vec::new();
    for (doc_id, title, text) in &ds.corpus {
        let id = uuid::Uuid::new_v4().to_string();
        let name = format!("{doc_id}.txt");
        let path = app.ingest.blob_path(&id, &name);
        let body = if title.is_empty() {
            text.clone()
        } else {
            format!("{title}\n\n{text}")
        };
        std::fs::write(&path, body.as_bytes()).map_err(|e| e.to_string())?;
        let rec = crate::library::new_file(
            id.clone(),
            owner.clone(),
            name.clone(),
            &path,
            json!({"name": name, "content_type": "text/plain", "size": body.len(), "data": {"doc_id": doc_id}}),
            true,
        );
        app.store
            .insert_file(&rec, true)
            .map_err(|e| e.to_string())?;
        file_to_doc.insert(id.clone(), doc_id.clone());
        ids.push(id);
    }
    let mut chunks = 0;
    let mut done = futures_util::stream::iter(ids.iter().map(|id| app.ingest.process(id)))
        .buffer_unordered(app.ingest.workers.max(1) * 2);
    while let Some(f) = done.next().await {
        progress.inc(1);
        let f = f.ok_or("a document disappeared while processing")?;
        match f.status {
            Some(FileStatus::Completed) => {
                chunks += f.chunk_count;
                app.library()
                    .link_file(&kb.id, &f.id)
                    .map_err(|e| e.to_string())?;
            }
            // Empty documents exist in public datasets; they simply cannot be retrieved.
            _ => tracing::debug!(file = %f.id, error = ?f.error, "document not indexed"),
        }
    }
    Ok((kb.id, file_to_doc, chunks))
}

/// Runs the evaluation; writes a TREC run file per mode when `run_dir` is given
/// (`<mode>.run`: `qid Q0 docid rank score ragway`).
pub async fn run(
    app: &App,
    ds: &Dataset,
    modes: &[Mode],
    fuse: Fuse,
    run_dir: Option<&Path>,
    progress: &indicatif::ProgressBar,
) -> Result<Report, String> {
    let embedder = app
        .ingest
        .embedder
        .clone()
        .map_err(|e| format!("embedding engine unavailable: {e}"))?;
    progress.set_length(ds.corpus.len() as u64);
    let started = Instant::now();
    let (kb, file_to_doc, chunks) = ingest(app, ds, progress).await?;
    let ingest_secs = started.elapsed().as_secs_f64();

    let mut qids: Vec<&String> = ds
        .qrels
        .keys()
        .filter(|q| ds.queries.contains_key(*q))
        .collect();
    qids.sort();
    let mut embed_ms = Vec::new();
    let mut vectors: HashMap<&String, Vec<f32>> = HashMap::new();
    for q in &qids {
        let t = Instant::now();
        let mut v = embedder
            .embed(vec![ds.queries[*q].clone()])
            .await
            .map_err(|e| e.to_string())?;
        embed_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        vectors.insert(q, v.pop().unwrap_or_default());
    }

    let mut results = Vec::new();
    for mode in modes {
        let mut run_file = match run_dir {
            Some(d) => Some(
                std::fs::File::create(d.join(format!("{}.run", mode_name(*mode))))
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let (mut n10, mut r10, mut r100, mut times) = (0.0, 0.0, 0.0, Vec::new());
        for q in &qids {
            let t = Instant::now();
            let ranked = rank(
                &app.retriever(),
                Scope::Collection(&kb),
                &ds.queries[*q],
                Some(&vectors[q]),
                *mode,
                fuse,
                300,
            );
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            let ids: Vec<u64> = ranked.iter().map(|r| r.0).collect();
            let chunks = app.store.chunks(&ids).map_err(|e| e.to_string())?;
            let score: HashMap<u64, f32> = ranked.iter().copied().collect();
            // Documents by their best chunk: the first time a document appears.
            let mut seen = HashSet::new();
            let mut docs: Vec<(String, f32)> = Vec::new();
            for (id, c) in chunks {
                if let Some(d) = file_to_doc.get(&c.file_id)
                    && seen.insert(d.clone())
                {
                    docs.push((d.clone(), score[&id]));
                }
            }
            docs.truncate(100);
            let ranked_docs: Vec<String> = docs.iter().map(|d| d.0.clone()).collect();
            let rel = &ds.qrels[*q];
            n10 += ndcg(&ranked_docs, rel, 10);
            r10 += recall(&ranked_docs, rel, 10);
            r100 += recall(&ranked_docs, rel, 100);
            if let Some(f) = run_file.as_mut() {
                for (i, (d, s)) in docs.iter().enumerate() {
                    writeln!(f, "{q} Q0 {d} {} {s} ragway", i + 1).map_err(|e| e.to_string())?;
                }
            }
        }
        let n = qids.len().max(1) as f64;
        results.push(ModeResult {
            mode: mode_name(*mode).to_string(),
            ndcg_at_10: n10 / n,
            recall_at_10: r10 / n,
            recall_at_100: r100 / n,
            queries: qids.len(),
            search_ms_p50: percentile(times.clone(), 0.5),
            search_ms_p95: percentile(times, 0.95),
        });
    }
    Ok(Report {
        documents: ds.corpus.len(),
        chunks,
        ingest_secs,
        query_embed_ms_p50: percentile(embed_ms, 0.5),
        results,
    })
}

pub fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Dense => "dense",
        Mode::Bm25 => "bm25",
        Mode::Hybrid => "hybrid",
    }
}

pub fn parse_mode(s: &str) -> Option<Mode> {
    match s {
        "dense" => Some(Mode::Dense),
        "bm25" => Some(Mode::Bm25),
        "hybrid" => Some(Mode::Hybrid),
        _ => None,
    }
}

/// A plain-text table of a report.
pub fn table(r: &Report) -> String {
    let mut s = format!(
        "documents {}  chunks {}  ingest {:.1}s  query embedding p50 {:.2} ms\n\n{:<8} {:>9} {:>10} {:>11} {:>9} {:>9}\n",
        r.documents,
        r.chunks,
        r.ingest_secs,
        r.query_embed_ms_p50,
        "mode",
        "nDCG@10",
        "recall@10",
        "recall@100",
        "p50 ms",
        "p95 ms"
    );
    for m in &r.results {
        s.push_str(&format!(
            "{:<8} {:>9.4} {:>10.4} {:>11.4} {:>9.3} {:>9.3}\n",
            m.mode, m.ndcg_at_10, m.recall_at_10, m.recall_at_100, m.search_ms_p50, m.search_ms_p95
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_match_hand_computation() {
        let rel: HashMap<String, u32> = [("a".to_string(), 2), ("b".to_string(), 1)].into();
        let ranked: Vec<String> = ["x", "a", "b"].iter().map(|s| s.to_string()).collect();
        let dcg = 2.0 / 3f64.log2() + 1.0 / 4f64.log2();
        let idcg = 2.0 / 2f64.log2() + 1.0 / 3f64.log2();
        assert!((ndcg(&ranked, &rel, 10) - dcg / idcg).abs() < 1e-12);
        assert_eq!(recall(&ranked, &rel, 2), 0.5);
        assert_eq!(recall(&ranked, &rel, 10), 1.0);
    }
}
