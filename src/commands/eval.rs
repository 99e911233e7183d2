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
use crate::rag::{Fuse, Limits, Mode, Scope, search};
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

/// The judgment file of a split: `qrels/<split>.tsv` (BEIR: test, dev, train).
pub fn qrels_path(dir: &Path, split: &str) -> Result<std::path::PathBuf, String> {
    if split.is_empty()
        || split.len() > 32
        || !split
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "--qrels {split:?}: name a split such as test or dev (qrels/<split>.tsv)"
        ));
    }
    Ok(dir.join("qrels").join(format!("{split}.tsv")))
}

impl Dataset {
    /// Loads the corpus, the queries and the judgments of `split`; only queries with
    /// judgments in that split are evaluated.
    pub fn load(dir: &Path, split: &str) -> Result<Dataset, String> {
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
        let qrels_path = qrels_path(dir, split)?;
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

/// One ranking configuration to measure.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Name in the report and of the run file (`<label>.run`).
    pub label: String,
    pub mode: Mode,
    pub fuse: Fuse,
    /// Candidates fetched from each ranking before fusion (default: chat's).
    pub candidates: Option<usize>,
}

/// Scores of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: String,
    pub ndcg_at_10: f64,
    pub recall_at_10: f64,
    pub recall_at_100: f64,
    pub queries: usize,
    pub search_ms_p50: f64,
    pub search_ms_p95: f64,
    /// Paired bootstrap of nDCG@10 against the first variant (absent for the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_first: Option<Paired>,
}

/// The whole evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub documents: usize,
    pub chunks: usize,
    pub ingest_secs: f64,
    /// The collection was already in the data dir: nothing was ingested.
    pub reused: bool,
    pub query_embed_ms_p50: f64,
    pub results: Vec<ModeResult>,
}

/// A paired comparison of per-query scores: mean difference `b - a` and its 95 %
/// bootstrap interval (queries resampled with replacement, the same sample for both).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Paired {
    pub delta: f64,
    pub low: f64,
    pub high: f64,
    /// Share of resamples where the difference is not above zero (one-sided p-value
    /// of "b is better"; near 1 when b is worse).
    pub p_not_better: f64,
}

impl Paired {
    /// The interval excludes zero.
    pub fn significant(&self) -> bool {
        self.low > 0.0 || self.high < 0.0
    }
}

/// Paired bootstrap of `b - a` over queries, `rounds` resamples from a fixed seed so
/// reports are reproducible. `a` and `b` hold one score per query, in the same order.
pub fn paired_bootstrap(a: &[f64], b: &[f64], rounds: usize, seed: u64) -> Paired {
    let n = a.len().min(b.len());
    if n == 0 || rounds == 0 {
        return Paired {
            delta: 0.0,
            low: 0.0,
            high: 0.0,
            p_not_better: 1.0,
        };
    }
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let delta = diff.iter().sum::<f64>() / n as f64;
    // xorshift64*: deterministic and dependency-free; quality is ample for resampling.
    let mut state = seed.max(1);
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut means: Vec<f64> = (0..rounds)
        .map(|_| {
            (0..n)
                .map(|_| diff[(next() % n as u64) as usize])
                .sum::<f64>()
                / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |p: f64| means[((rounds - 1) as f64 * p).round() as usize];
    Paired {
        delta,
        low: at(0.025),
        high: at(0.975),
        p_not_better: means.iter().filter(|m| **m <= 0.0).count() as f64 / rounds as f64,
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The account that owns the evaluation's files. A real user: the start-up sweep removes
/// files whose owner has no account, which would make a kept data dir useless.
const EVAL_EMAIL: &str = "eval@ragway.invalid";

async fn owner(app: &App) -> Result<String, String> {
    if let Some(u) = app
        .storage
        .meta
        .user_by_email(EVAL_EMAIL)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(u.id);
    }
    // Nobody signs in as this account: its password is random and never shown.
    let password = uuid::Uuid::new_v4().to_string();
    app.add_user(
        EVAL_EMAIL,
        &password,
        "ragway eval",
        crate::store::Role::User,
    )
    .await
    .map(|u| u.id)
    .map_err(|e| e.detail.clone())
}

/// An ingested collection: its id, file id → document id, and its number of chunks.
type Ingested = (String, HashMap<String, String>, usize);

/// The collection an earlier run left in this data dir, with its file → document map,
/// when every document in it belongs to `ds` (a data dir is reused only for its dataset).
async fn existing(app: &App, ds: &Dataset, owner: &str) -> Result<Option<Ingested>, String> {
    let meta = &app.storage.meta;
    let Some(kb) = meta
        .knowledges()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|k| k.user_id == owner && k.name == "eval")
    else {
        return Ok(None);
    };
    let ids: HashSet<&str> = ds.corpus.iter().map(|d| d.0.as_str()).collect();
    let mut file_to_doc = HashMap::new();
    let mut chunks = 0;
    for f in meta
        .knowledge_files(&kb.id)
        .await
        .map_err(|e| e.to_string())?
    {
        let Some(rec) = meta.file(&f).await.map_err(|e| e.to_string())? else {
            continue;
        };
        let doc = rec.meta["data"]["doc_id"].as_str().unwrap_or_default();
        if !ids.contains(doc) {
            return Err(format!(
                "the data dir holds an evaluation of another dataset (document {doc:?}); \
                 use a fresh --data-dir"
            ));
        }
        chunks += rec.chunk_count;
        file_to_doc.insert(rec.id, doc.to_string());
    }
    // An interrupted ingest leaves part of the corpus: measuring it would be meaningless.
    let expected = ds
        .corpus
        .iter()
        .filter(|(_, t, x)| !t.trim().is_empty() || !x.trim().is_empty())
        .count();
    if file_to_doc.len() < expected {
        return Err(format!(
            "the data dir holds {} of the dataset's {expected} documents (an interrupted \
             ingest?); use a fresh --data-dir",
            file_to_doc.len()
        ));
    }
    Ok(Some((kb.id, file_to_doc, chunks)))
}

/// Ingests the corpus into a fresh collection of `app` (one file per document).
async fn ingest(
    app: &App,
    ds: &Dataset,
    owner: &str,
    progress: &indicatif::ProgressBar,
) -> Result<(String, HashMap<String, String>, usize), String> {
    let owner = owner.to_string();
    let kb = app
        .library()
        .create_collection(&owner, "eval".into(), String::new(), Vec::new())
        .await
        .map_err(|e| e.to_string())?;
    let mut file_to_doc = HashMap::new();
    let mut ids = Vec::new();
    for (doc_id, title, text) in &ds.corpus {
        let id = uuid::Uuid::new_v4().to_string();
        let name = format!("{doc_id}.txt");
        let body = if title.is_empty() {
            text.clone()
        } else {
            format!("{title}\n\n{text}")
        };
        let new = crate::library::NewFile {
            user_id: owner.clone(),
            filename: name.clone(),
            name,
            content_type: "text/plain".into(),
            size: body.len() as u64,
            sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes())),
            data: json!({"doc_id": doc_id}),
            process: true,
        };
        app.library()
            .create_file(
                id.clone(),
                new,
                crate::library::Content::Bytes(body.as_bytes()),
            )
            .await
            .map_err(|e| e.to_string())?;
        file_to_doc.insert(id.clone(), doc_id.clone());
        ids.push(id);
    }
    let mut chunks = 0;
    let mut done = futures_util::stream::iter(ids.iter().map(|id| app.ingest.process(id)))
        .buffer_unordered(app.ingest.workers.max(1) * 2);
    while let Some(f) = done.next().await {
        progress.inc(1);
        let f = f
            .map_err(|e| e.to_string())?
            .ok_or("a document disappeared while processing")?;
        match f.status {
            Some(FileStatus::Completed) => {
                chunks += f.chunk_count;
                app.library()
                    .link_file(&kb.id, &f.id)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            // Empty documents exist in public datasets; they simply cannot be retrieved.
            _ => tracing::debug!(file = %f.id, error = ?f.error, "document not indexed"),
        }
    }
    Ok((kb.id, file_to_doc, chunks))
}

/// Runs the evaluation; writes a TREC run file per variant when `run_dir` is given
/// (`<label>.run`: `qid Q0 docid rank score ragway`). The corpus is ingested once per data
/// dir: a data dir that already holds this dataset's collection is searched as it is, so
/// ranking changes are measured without re-embedding. Each query is searched as the
/// retrieval API does (`k` chunks, chat's candidates and de-duplication); documents are
/// ranked by their best chunk.
pub async fn run(
    app: &App,
    ds: &Dataset,
    variants: &[Variant],
    k: usize,
    run_dir: Option<&Path>,
    progress: &indicatif::ProgressBar,
) -> Result<Report, String> {
    let embedder = app
        .ingest
        .embedder
        .clone()
        .map_err(|e| format!("embedding engine unavailable: {e}"))?;
    // Before minutes of ingestion, not after: a run dir that cannot be made fails at once.
    if let Some(d) = run_dir {
        std::fs::create_dir_all(d)
            .map_err(|e| format!("--run-dir: cannot create {}: {e}", d.display()))?;
    }
    progress.set_length(ds.corpus.len() as u64);
    let started = Instant::now();
    let owner = owner(app).await?;
    let (kb, file_to_doc, chunks, reused) = match existing(app, ds, &owner).await? {
        Some((kb, map, chunks)) => (kb, map, chunks, true),
        None => {
            let (kb, map, chunks) = ingest(app, ds, &owner, progress).await?;
            (kb, map, chunks, false)
        }
    };
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
        // The query lane chat uses, so the reported embedding time is chat's.
        let v = embedder
            .embed_query(ds.queries[*q].clone())
            .await
            .map_err(|e| e.to_string())?;
        embed_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        vectors.insert(q, v);
    }

    let mut results: Vec<ModeResult> = Vec::new();
    let mut first: Option<Vec<f64>> = None;
    for v in variants {
        let mut run_file = match run_dir {
            Some(d) => {
                let path = d.join(format!("{}.run", v.label));
                std::fs::File::create(&path)
                    .map(Some)
                    .map_err(|e| format!("--run-dir: cannot write {}: {e}", path.display()))?
            }
            None => None,
        };
        let (mut per_query, mut r10, mut r100, mut times) = (Vec::new(), 0.0, 0.0, Vec::new());
        for q in &qids {
            let t = Instant::now();
            let mut limits = Limits::new(k, app.config.rag.relevance_threshold);
            if let Some(c) = v.candidates {
                limits.candidates = c.max(k);
            }
            let source = search(
                &app.retriever(),
                Value::Null,
                Scope::Collection(&kb),
                &ds.queries[*q],
                Some(&vectors[q]),
                v.mode,
                v.fuse,
                limits,
            )
            .await
            .map_err(|e| e.to_string())?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            // Documents by their best chunk: the first time a document appears.
            let mut seen = HashSet::new();
            let mut docs: Vec<(String, f32)> = Vec::new();
            for (m, score) in source.metadata.iter().zip(&source.distances) {
                if let Some(d) = m["file_id"].as_str().and_then(|f| file_to_doc.get(f))
                    && seen.insert(d.clone())
                {
                    docs.push((d.clone(), *score));
                }
            }
            docs.truncate(100);
            let ranked_docs: Vec<String> = docs.iter().map(|d| d.0.clone()).collect();
            let rel = &ds.qrels[*q];
            per_query.push(ndcg(&ranked_docs, rel, 10));
            r10 += recall(&ranked_docs, rel, 10);
            r100 += recall(&ranked_docs, rel, 100);
            if let Some(f) = run_file.as_mut() {
                // Scores in a run file must fall with rank (trec_eval re-sorts by score).
                let n = docs.len();
                for (i, (d, _)) in docs.iter().enumerate() {
                    writeln!(f, "{q} Q0 {d} {} {} ragway", i + 1, n - i)
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        let n = qids.len().max(1) as f64;
        let vs_first = first
            .as_ref()
            .map(|a| paired_bootstrap(a, &per_query, 10_000, 0x5eed));
        results.push(ModeResult {
            mode: v.label.clone(),
            ndcg_at_10: per_query.iter().sum::<f64>() / n,
            recall_at_10: r10 / n,
            recall_at_100: r100 / n,
            queries: qids.len(),
            search_ms_p50: percentile(times.clone(), 0.5),
            search_ms_p95: percentile(times, 0.95),
            vs_first,
        });
        if first.is_none() {
            first = Some(per_query);
        }
    }
    Ok(Report {
        documents: ds.corpus.len(),
        chunks,
        ingest_secs,
        reused,
        query_embed_ms_p50: percentile(embed_ms, 0.5),
        results,
    })
}

/// Values to compare per ranking setting; an empty list means the configured value.
#[derive(Debug, Clone, Default)]
pub struct Grid {
    pub fusions: Vec<crate::config::Fusion>,
    pub weights: Vec<f32>,
    pub candidates: Vec<usize>,
    pub k1: Vec<f32>,
    pub b: Vec<f32>,
    pub file_weights: Vec<f32>,
    pub prf: Vec<f32>,
}

fn or_one<T: Copy>(list: &[T], default: T) -> Vec<T> {
    if list.is_empty() {
        vec![default]
    } else {
        list.to_vec()
    }
}

/// The variants of a comparison: one per mode and combination of the grid's values (BM25
/// settings only matter to bm25 and hybrid, fusion settings only to hybrid). Labels name
/// the settings that take several values, so a plain run keeps `dense`, `bm25`, `hybrid`.
pub fn variants(modes: &[Mode], grid: &Grid, configured: Fuse) -> Vec<Variant> {
    let fusions = or_one(&grid.fusions, configured.fusion);
    let weights = or_one(&grid.weights, configured.bm25_weight);
    let cands: Vec<Option<usize>> = if grid.candidates.is_empty() {
        vec![None]
    } else {
        grid.candidates.iter().copied().map(Some).collect()
    };
    let k1s = or_one(&grid.k1, configured.bm25.k1);
    let bs = or_one(&grid.b, configured.bm25.b);
    let fws = or_one(&grid.file_weights, configured.file_weight);
    let prfs = or_one(&grid.prf, configured.prf);
    let mut out = Vec::new();
    for &mode in modes {
        let hybrid = mode == Mode::Hybrid;
        let lexical = mode != Mode::Dense;
        let dense = mode != Mode::Bm25;
        let one = |v: &[f32]| v[..1].to_vec();
        let fusions = if hybrid {
            fusions.clone()
        } else {
            vec![fusions[0]]
        };
        let weights = if hybrid {
            weights.clone()
        } else {
            one(&weights)
        };
        let k1s = if lexical { k1s.clone() } else { one(&k1s) };
        let bs = if lexical { bs.clone() } else { one(&bs) };
        let prfs = if dense { prfs.clone() } else { one(&prfs) };
        for &fusion in &fusions {
            for &bm25_weight in &weights {
                for &k1 in &k1s {
                    for &b in &bs {
                        for &file_weight in &fws {
                            for &prf in &prfs {
                                for &c in &cands {
                                    let mut label = mode_name(mode).to_string();
                                    if fusions.len() > 1 {
                                        label += &format!("-{}", fusion.name());
                                    }
                                    if weights.len() > 1 {
                                        label += &format!("-w{bm25_weight}");
                                    }
                                    if k1s.len() > 1 {
                                        label += &format!("-k1_{k1}");
                                    }
                                    if bs.len() > 1 {
                                        label += &format!("-b{b}");
                                    }
                                    if fws.len() > 1 {
                                        label += &format!("-fw{file_weight}");
                                    }
                                    if prfs.len() > 1 {
                                        label += &format!("-prf{prf}");
                                    }
                                    if let (true, Some(c)) = (cands.len() > 1, c) {
                                        label += &format!("-c{c}");
                                    }
                                    out.push(Variant {
                                        label,
                                        mode,
                                        fuse: Fuse {
                                            fusion,
                                            bm25_weight,
                                            bm25: crate::index::bm25::Bm25Params { k1, b },
                                            file_weight,
                                            prf,
                                        },
                                        candidates: c,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
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
        "documents {}  chunks {}  {}  query embedding p50 {:.2} ms\n\n{:<28} {:>9} {:>10} {:>11} {:>9} {:>9}  {}\n",
        r.documents,
        r.chunks,
        if r.reused {
            "reused the data dir's collection".to_string()
        } else {
            format!("ingest {:.1}s", r.ingest_secs)
        },
        r.query_embed_ms_p50,
        "variant",
        "nDCG@10",
        "recall@10",
        "recall@100",
        "p50 ms",
        "p95 ms",
        "nDCG@10 vs first (paired bootstrap, 95 %)"
    );
    for m in &r.results {
        let cmp = m.vs_first.map_or(String::new(), |p| {
            format!(
                "{:+.4} [{:+.4}, {:+.4}]{}",
                p.delta,
                p.low,
                p.high,
                if p.significant() { " *" } else { "" }
            )
        });
        s.push_str(&format!(
            "{:<28} {:>9.4} {:>10.4} {:>11.4} {:>9.3} {:>9.3}  {}\n",
            m.mode,
            m.ndcg_at_10,
            m.recall_at_10,
            m.recall_at_100,
            m.search_ms_p50,
            m.search_ms_p95,
            cmp
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

    #[test]
    fn paired_bootstrap_of_a_constant_difference_is_that_difference() {
        let a = [0.1, 0.5, 0.9, 0.3];
        let b: Vec<f64> = a.iter().map(|x| x + 0.25).collect();
        let p = paired_bootstrap(&a, &b, 500, 7);
        assert!((p.delta - 0.25).abs() < 1e-12);
        assert!((p.low - 0.25).abs() < 1e-12 && (p.high - 0.25).abs() < 1e-12);
        assert!(p.significant());
        assert_eq!(p.p_not_better, 0.0);
        let same = paired_bootstrap(&a, &a, 500, 7);
        assert_eq!((same.delta, same.low, same.high), (0.0, 0.0, 0.0));
        assert!(!same.significant());
        assert_eq!(same.p_not_better, 1.0);
    }

    #[test]
    fn paired_bootstrap_interval_brackets_a_mixed_difference() {
        // Differences +1, -1, +1, +1: mean +0.5; resamples range over [-1, +1].
        let a = [0.0, 1.0, 0.0, 0.0];
        let b = [1.0, 0.0, 1.0, 1.0];
        let p = paired_bootstrap(&a, &b, 2000, 11);
        assert!((p.delta - 0.5).abs() < 1e-12);
        assert!(p.low < 0.5 && p.high > 0.4 && p.low >= -1.0 && p.high <= 1.0);
        // P(all four resampled differences are -1 or the mean is <= 0) is well above 0.
        assert!(p.p_not_better > 0.0 && p.p_not_better < 0.5);
        assert_eq!(
            p,
            paired_bootstrap(&a, &b, 2000, 11),
            "seeded: reproducible"
        );
    }

    #[test]
    fn qrels_split_names_are_plain() {
        let d = Path::new("/data/nf");
        assert_eq!(
            qrels_path(d, "dev").unwrap(),
            Path::new("/data/nf/qrels/dev.tsv")
        );
        for bad in ["", "../../etc/passwd", "test.tsv/x", "a b", &"x".repeat(40)] {
            assert!(qrels_path(d, bad).is_err(), "{bad:?}");
        }
    }
}
