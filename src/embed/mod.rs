//! Text embeddings: the [`Embedder`] trait and its engines.
//!
//! - [`onnx::OnnxEmbedder`]: local all-MiniLM-L6-v2 (int8 ONNX) on ONNX Runtime, loaded at run
//!   time from the files `scripts/fetch-model.sh` provisions. The default engine.
//! - [`remote::OllamaEmbedder`] / [`remote::OpenAiEmbedder`]: an upstream's `/api/embed` or
//!   `/embeddings` endpoint.
//! - [`HashEmbedder`]: a deterministic, dependency-free fake for tests.
//!
//! Every engine returns L2-normalised vectors, so cosine similarity is a plain dot product
//! everywhere downstream.

pub mod onnx;
pub mod quantize;
pub mod remote;

use std::path::PathBuf;

pub use onnx::OnnxEmbedder;
pub use remote::{OllamaEmbedder, OpenAiEmbedder};

/// Why embedding failed. Messages say what to do about it where there is something to do.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The ONNX Runtime shared library is not where the configuration says.
    #[error(
        "ONNX Runtime library not found at {0}: run scripts/fetch-model.sh, or set ORT_DYLIB_PATH \
         (embedding.onnxruntime) to a libonnxruntime.so of version 1.22 or later"
    )]
    RuntimeMissing(PathBuf),
    /// The library exists but could not be loaded (wrong architecture, too old, not ONNX Runtime).
    #[error(
        "could not load ONNX Runtime from {path}: {reason}; run scripts/fetch-model.sh to install \
         ONNX Runtime 1.31.1, or set ORT_DYLIB_PATH to a libonnxruntime.so of version 1.22 or later"
    )]
    RuntimeLoad {
        /// The library that was tried.
        path: PathBuf,
        /// What ONNX Runtime or the dynamic loader said.
        reason: String,
    },
    /// ONNX Runtime is loaded once per process; a second, different library cannot be loaded.
    #[error(
        "ONNX Runtime is already loaded from {loaded} in this process and cannot be replaced by \
         {requested}; use the same library path everywhere in one process"
    )]
    RuntimeConflict {
        /// The library already loaded.
        loaded: PathBuf,
        /// The library asked for now.
        requested: PathBuf,
    },
    /// A model file (`model.onnx`, `tokenizer.json`) is missing.
    #[error(
        "embedding model file {0} not found: run scripts/fetch-model.sh, or set RAGWAY_MODEL_DIR \
         (embedding.model-dir) to a directory with model.onnx and tokenizer.json"
    )]
    ModelMissing(PathBuf),
    /// A model file exists but cannot be used.
    #[error(
        "cannot use embedding model {path}: {reason}; re-run scripts/fetch-model.sh to restore \
         the verified files"
    )]
    Model {
        /// The offending file or directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Tokenising or running the model failed on some input.
    #[error("embedding inference failed: {0}")]
    Inference(String),
    /// The remote embedding server could not be reached or did not answer in time.
    #[error("embedding request to {url} failed: {reason}")]
    Transport {
        /// The endpoint called.
        url: String,
        /// The client-side error.
        reason: String,
    },
    /// The remote embedding server answered with an error status.
    #[error("embedding server {url} answered HTTP {status}: {message}")]
    Upstream {
        /// The endpoint called.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The upstream's error message (or its raw body).
        message: String,
    },
    /// The remote embedding server answered 2xx with something that is not embeddings.
    #[error("unexpected answer from embedding server {url}: {reason}")]
    BadResponse {
        /// The endpoint called.
        url: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// The engine returned vectors of a length other than the one already recorded.
    #[error(
        "embedding model {model} returned {got}-dimensional vectors, expected {expected}; \
         vectors of different models cannot be mixed"
    )]
    DimMismatch {
        /// The model name.
        model: String,
        /// The dimension known so far.
        expected: usize,
        /// The dimension just returned.
        got: usize,
    },
}

impl EmbedError {
    /// Whether trying again later may succeed (network trouble, rate limits, overloaded or
    /// restarting upstreams), as opposed to configuration or input errors.
    pub fn is_transient(&self) -> bool {
        match self {
            EmbedError::Transport { .. } => true,
            EmbedError::Upstream { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// Something that turns texts into vectors.
#[async_trait::async_trait]
pub trait Embedder: Send + Sync {
    /// Name recorded with every vector (e.g. "sentence-transformers/all-MiniLM-L6-v2").
    fn model(&self) -> &str;
    /// Vector length. Remote engines that were not told it return 0 until their first answer.
    fn dim(&self) -> usize;
    /// Embeds texts, L2-normalised, in input order. Batches internally.
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError>;
    /// Embeds one search query. An engine that queues work serves it ahead of bulk batches
    /// (chat waits on it; an upload can wait a little longer).
    async fn embed_query(&self, text: String) -> Result<Vec<f32>, EmbedError> {
        Ok(self.embed(vec![text]).await?.pop().unwrap_or_default())
    }
}

/// Scales `v` to unit length in place. A zero vector stays zero (rather than becoming NaN).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Deterministic fake embedder for tests: each lowercase alphanumeric word is hashed (FNV-1a,
/// stable across platforms and releases) to one of `dim` buckets with a sign, and the sum is
/// L2-normalised. Texts sharing words therefore get a high cosine, unrelated texts a low one,
/// with no model files and no network.
#[derive(Debug, Clone)]
pub struct HashEmbedder {
    dim: usize,
    name: String,
}

impl HashEmbedder {
    /// A hash embedder producing `dim`-dimensional vectors; `dim` must be at least 1.
    pub fn new(dim: usize) -> Self {
        assert!(dim > 0, "HashEmbedder dimension must be at least 1");
        Self {
            dim,
            name: format!("hash-{dim}"),
        }
    }

    /// The vector of one text, computed synchronously.
    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dim];
        let lower = text.to_lowercase();
        let mut words = lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .peekable();
        if words.peek().is_none() {
            // Texts without words still get a unit vector (all the same one), as real models
            // give every input a vector; a zero vector would break cosine downstream.
            add_word(&mut v, "");
        }
        for w in words {
            add_word(&mut v, w);
        }
        l2_normalize(&mut v);
        v
    }
}

fn add_word(v: &mut [f32], word: &str) {
    let h = fnv1a(word.as_bytes());
    let bucket = (h % v.len() as u64) as usize;
    // The top bit is independent of the low bits used for the bucket.
    let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
    v[bucket] += sign;
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[async_trait::async_trait]
impl Embedder for HashEmbedder {
    fn model(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> usize {
        self.dim
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| self.embed_one(t)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn norm(a: &[f32]) -> f32 {
        dot(a, a).sqrt()
    }

    #[tokio::test]
    async fn hash_embedder_is_deterministic_normalised_and_ordered() {
        let e = HashEmbedder::new(64);
        assert_eq!(e.model(), "hash-64");
        assert_eq!(e.dim(), 64);
        let texts = vec!["alpha beta".to_owned(), "".to_owned(), "gamma".to_owned()];
        let a = e.embed(texts.clone()).await.unwrap();
        let b = e.embed(texts).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        for v in &a {
            assert_eq!(v.len(), 64);
            assert!((norm(v) - 1.0).abs() < 1e-6, "norm {}", norm(v));
        }
        assert_eq!(a[2], e.embed_one("gamma"));
        assert!(e.embed(Vec::new()).await.unwrap().is_empty());
    }

    #[test]
    fn hash_embedder_is_case_and_punctuation_insensitive() {
        let e = HashEmbedder::new(128);
        let a = e.embed_one("Hello, World!");
        let b = e.embed_one("hello world");
        assert!((dot(&a, &b) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn shared_words_give_higher_cosine() {
        let e = HashEmbedder::new(256);
        let q = e.embed_one("how to reset my password");
        let related = e.embed_one("reset your password from the settings page");
        let unrelated = e.embed_one("quarterly revenue grew in europe");
        let (r, u) = (dot(&q, &related), dot(&q, &unrelated));
        assert!(r > 0.3, "related cosine {r}");
        assert!(r > u + 0.2, "related {r} vs unrelated {u}");
    }

    #[test]
    fn hash_values_are_stable() {
        // Pinned so that fixtures built from HashEmbedder vectors stay valid across releases.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let v = HashEmbedder::new(8).embed_one("a");
        assert_eq!(v.iter().filter(|x| **x != 0.0).count(), 1);
    }

    #[test]
    fn l2_normalize_handles_zero() {
        let mut z = vec![0.0; 3];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
    }

    #[test]
    fn transient_errors() {
        let up = |status| EmbedError::Upstream {
            url: "u".into(),
            status,
            message: "m".into(),
        };
        assert!(up(503).is_transient());
        assert!(up(429).is_transient());
        assert!(!up(404).is_transient());
        assert!(!EmbedError::ModelMissing("x".into()).is_transient());
    }
}
