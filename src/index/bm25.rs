//! BM25 over chunks, updated incrementally as files are processed, linked and removed.
//!
//! Open WebUI rebuilds a BM25 retriever in memory from every chunk of a collection on each
//! query; here each chunk's term frequencies are computed once at ingestion, persisted in
//! redb with the chunk (so start-up does not re-tokenise), and merged into per-file and
//! per-collection inverted indexes.

use std::collections::HashMap;
use std::sync::LazyLock;

use rust_stemmers::{Algorithm, Stemmer};

/// Okapi BM25 parameters: `k1` saturates term frequency, `b` normalises by chunk length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bm25Params {
    pub k1: f32,
    pub b: f32,
}

impl Default for Bm25Params {
    /// The usual defaults, also LangChain's `BM25Retriever` (via `rank_bm25`).
    fn default() -> Self {
        Bm25Params { k1: 1.5, b: 0.75 }
    }
}

static STEMMER: LazyLock<Stemmer> = LazyLock::new(|| Stemmer::create(Algorithm::English));

/// English stop words: frequent words that only add noise to lexical scores.
const STOP_WORDS: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "am",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "could",
    "did",
    "do",
    "does",
    "doing",
    "down",
    "during",
    "each",
    "few",
    "for",
    "from",
    "further",
    "had",
    "has",
    "have",
    "having",
    "he",
    "her",
    "here",
    "hers",
    "herself",
    "him",
    "himself",
    "his",
    "how",
    "i",
    "if",
    "in",
    "into",
    "is",
    "it",
    "its",
    "itself",
    "just",
    "me",
    "more",
    "most",
    "my",
    "myself",
    "no",
    "nor",
    "not",
    "now",
    "of",
    "off",
    "on",
    "once",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "same",
    "she",
    "should",
    "so",
    "some",
    "such",
    "than",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "to",
    "too",
    "under",
    "until",
    "up",
    "very",
    "was",
    "we",
    "were",
    "what",
    "when",
    "where",
    "which",
    "while",
    "who",
    "whom",
    "why",
    "will",
    "with",
    "would",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
];

/// Lowercased, stemmed terms of a text, stop words removed. Numbers and identifiers are
/// kept whole (rare exact terms are where BM25 beats dense retrieval).
pub fn terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOP_WORDS.contains(&w.as_str()))
        .map(|w| {
            if w.chars().all(|c| c.is_ascii_alphabetic()) {
                STEMMER.stem(&w).into_owned()
            } else {
                w
            }
        })
        .collect()
}

/// Term frequencies of one chunk and its length in terms: what is persisted per chunk.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TermCounts {
    pub len: u32,
    pub tf: Vec<(String, u32)>,
}

impl TermCounts {
    pub fn of(text: &str) -> TermCounts {
        let ts = terms(text);
        let mut map: HashMap<String, u32> = HashMap::new();
        for t in &ts {
            *map.entry(t.clone()).or_default() += 1;
        }
        let mut tf: Vec<(String, u32)> = map.into_iter().collect();
        tf.sort();
        TermCounts {
            len: ts.len() as u32,
            tf,
        }
    }
}

/// An inverted index over a set of chunks.
#[derive(Debug, Default, Clone)]
pub struct Bm25Index {
    /// term → (chunk id → (term frequency, chunk length)); the length rides along so
    /// scoring needs no second lookup per posting.
    postings: HashMap<String, HashMap<u64, (u32, u32)>>,
    /// chunk id → length in terms
    lens: HashMap<u64, u32>,
    total_len: u64,
}

impl Bm25Index {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Adds (or replaces) a chunk.
    pub fn insert(&mut self, id: u64, counts: &TermCounts) {
        self.remove(id);
        for (t, f) in &counts.tf {
            self.postings
                .entry(t.clone())
                .or_default()
                .insert(id, (*f, counts.len));
        }
        self.lens.insert(id, counts.len);
        self.total_len += u64::from(counts.len);
    }

    /// Removes a chunk; its postings are found through the stored counts.
    pub fn remove_with(&mut self, id: u64, counts: &TermCounts) {
        if let Some(len) = self.lens.remove(&id) {
            self.total_len -= u64::from(len);
            for (t, _) in &counts.tf {
                if let Some(p) = self.postings.get_mut(t) {
                    p.remove(&id);
                    if p.is_empty() {
                        self.postings.remove(t);
                    }
                }
            }
        }
    }

    /// Removes a chunk without its counts (scans postings; used rarely).
    pub fn remove(&mut self, id: u64) {
        if let Some(len) = self.lens.remove(&id) {
            self.total_len -= u64::from(len);
            self.postings.retain(|_, p| {
                p.remove(&id);
                !p.is_empty()
            });
        }
    }

    /// Best `k` chunks for `query` by BM25 with the default parameters.
    pub fn search(&self, query: &str, k: usize) -> Vec<(u64, f32)> {
        self.search_with(query, k, Bm25Params::default())
    }

    /// Best `k` chunks for `query` by BM25 (ties by id for determinism).
    pub fn search_with(&self, query: &str, k: usize, params: Bm25Params) -> Vec<(u64, f32)> {
        let Bm25Params { k1, b } = params;
        let n = self.lens.len() as f32;
        if n == 0.0 || k == 0 {
            return Vec::new();
        }
        let avgdl = (self.total_len as f32 / n).max(1.0);
        let mut q = terms(query);
        q.sort();
        q.dedup();
        let lists: Vec<&HashMap<u64, (u32, u32)>> =
            q.iter().filter_map(|t| self.postings.get(t)).collect();
        let mut scores: HashMap<u64, f32> =
            HashMap::with_capacity(lists.iter().map(|p| p.len()).max().unwrap_or(0));
        for p in lists {
            let df = p.len() as f32;
            // The "plus one" IDF keeps scores positive for very common terms.
            let idf = ((n - df + 0.5) / (df + 0.5) + 1.0).ln();
            for (id, (tf, dl)) in p {
                let tf = *tf as f32;
                let norm = k1 * (1.0 - b + b * *dl as f32 / avgdl);
                *scores.entry(*id).or_default() += idf * tf * (k1 + 1.0) / (tf + norm);
            }
        }
        let mut out: Vec<(u64, f32)> = scores.into_iter().collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(k);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_are_stemmed_and_stopped() {
        assert_eq!(terms("The running dogs ran"), vec!["run", "dog", "ran"]);
        assert_eq!(
            terms("Error E-4521 in v2.3"),
            vec!["error", "e", "4521", "v2", "3"]
        );
    }

    #[test]
    fn rare_terms_rank_first_and_removal_works() {
        let mut idx = Bm25Index::new();
        let docs = [
            (1, "the cat sat on the mat"),
            (2, "dogs and cats are pets"),
            (3, "the zyxquartz protocol uses port 4521"),
        ];
        let counts: Vec<TermCounts> = docs.iter().map(|(_, t)| TermCounts::of(t)).collect();
        for ((id, _), c) in docs.iter().zip(&counts) {
            idx.insert(*id, c);
        }
        let r = idx.search("which port does zyxquartz use", 2);
        assert_eq!(r[0].0, 3);
        let r = idx.search("cats", 3);
        assert_eq!(r.len(), 2);
        idx.remove_with(3, &counts[2]);
        assert!(idx.search("zyxquartz", 3).is_empty());
        assert_eq!(idx.len(), 2);
        idx.remove(1);
        assert_eq!(
            idx.search("cat", 3).iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![2]
        );
    }

    #[test]
    fn parameters_match_hand_computation() {
        let mut idx = Bm25Index::new();
        idx.insert(1, &TermCounts::of("apple apple pear"));
        idx.insert(2, &TermCounts::of("pear plum"));
        // n = 2, df(appl) = 1: idf = ln((2 - 1 + 0.5) / 1.5 + 1) = ln 2; avgdl = 2.5.
        let idf = 2f32.ln();
        for (k1, b) in [(1.5, 0.75), (0.9, 0.4), (1.2, 0.0)] {
            let p = Bm25Params { k1, b };
            let norm = k1 * (1.0 - b + b * 3.0 / 2.5);
            let want = idf * 2.0 * (k1 + 1.0) / (2.0 + norm);
            let got = idx.search_with("apple", 5, p);
            assert_eq!(got.len(), 1);
            assert!((got[0].1 - want).abs() < 1e-5, "k1 {k1} b {b}");
        }
        assert_eq!(
            idx.search("apple", 5),
            idx.search_with("apple", 5, Bm25Params::default())
        );
    }
}
