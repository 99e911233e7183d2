//! Embeddings computed by an upstream server: Ollama's `/api/embed` or an OpenAI-compatible
//! `/embeddings` endpoint (Open WebUI's `RAG_EMBEDDING_ENGINE=ollama|openai`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{EmbedError, Embedder, l2_normalize};

/// Texts per upstream request by default: large enough to amortise the round trip, small
/// enough that one request does not run into upstream body limits or timeouts.
pub const DEFAULT_BATCH_SIZE: usize = 64;

/// Default limit for one upstream request. Embedding 64 chunks on a CPU-only Ollama can take
/// tens of seconds; a hung upstream must still not stall ingestion forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// What the Ollama and OpenAI flavours share: where to send, how to authenticate, and the
/// dimension learned from the first answer.
#[derive(Debug)]
struct Remote {
    client: reqwest::Client,
    url: String,
    key: Option<String>,
    model: String,
    /// 0 until known (given at construction or learned from the first answer).
    dim: AtomicUsize,
    batch_size: usize,
    timeout: Duration,
}

impl Remote {
    fn new(
        client: reqwest::Client,
        base_url: &str,
        path: &str,
        key: Option<String>,
        model: &str,
    ) -> Self {
        Self {
            client,
            url: format!("{}{path}", base_url.trim_end_matches('/')),
            key: key.filter(|k| !k.is_empty()),
            model: model.to_owned(),
            dim: AtomicUsize::new(0),
            batch_size: DEFAULT_BATCH_SIZE,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// POSTs `body` and returns the 2xx response body; errors carry the upstream's message.
    async fn post(&self, body: &Value) -> Result<bytes::Bytes, EmbedError> {
        let mut request = self.client.post(&self.url).timeout(self.timeout).json(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let transport = |e: reqwest::Error| EmbedError::Transport {
            url: self.url.clone(),
            reason: error_chain(&e),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(transport)?;
        if !status.is_success() {
            return Err(EmbedError::Upstream {
                url: self.url.clone(),
                status: status.as_u16(),
                message: upstream_message(&bytes),
            });
        }
        Ok(bytes)
    }

    fn bad(&self, reason: impl Into<String>) -> EmbedError {
        EmbedError::BadResponse {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    /// Checks count and dimension of one answer (learning the dimension from the first one)
    /// and normalises the vectors.
    fn accept(&self, sent: usize, mut vectors: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, EmbedError> {
        if vectors.len() != sent {
            return Err(self.bad(format!("{} embeddings for {sent} inputs", vectors.len())));
        }
        for v in &mut vectors {
            let got = v.len();
            if got == 0 {
                return Err(self.bad("empty embedding"));
            }
            match self
                .dim
                .compare_exchange(0, got, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {}
                Err(expected) if expected == got => {}
                Err(expected) => {
                    return Err(EmbedError::DimMismatch {
                        model: self.model.clone(),
                        expected,
                        got,
                    });
                }
            }
            l2_normalize(v);
        }
        Ok(vectors)
    }
}

/// The whole `source()` chain: reqwest's own message ("error sending request") hides the cause
/// (connection refused, DNS, TLS, timeout).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The message of an error body: Ollama's `{"error": "..."}`, OpenAI's
/// `{"error": {"message": "..."}}`, or else the (shortened) raw body.
fn upstream_message(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        let error = value.get("error").unwrap_or(&value);
        if let Some(s) = error.as_str() {
            return s.to_owned();
        }
        if let Some(s) = error.get("message").and_then(Value::as_str) {
            return s.to_owned();
        }
        if let Some(s) = value.get("detail").and_then(Value::as_str) {
            return s.to_owned();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".to_owned();
    }
    text.chars().take(500).collect()
}

/// Embeddings from Ollama: `POST {base}/api/embed {"model", "input": [...]}` → `embeddings`.
#[derive(Debug)]
pub struct OllamaEmbedder {
    remote: Remote,
}

impl OllamaEmbedder {
    /// An embedder for `model` on the Ollama at `base_url` (e.g. `http://localhost:11434`).
    /// `key` is sent as a bearer token (for Ollama behind an authenticating proxy).
    pub fn new(client: reqwest::Client, base_url: &str, key: Option<String>, model: &str) -> Self {
        Self {
            remote: Remote::new(client, base_url, "/api/embed", key, model),
        }
    }

    /// Declares the vector length: [`Embedder::dim`] reports it before the first answer, and
    /// answers of another length are refused. Without it the length is learned from the first
    /// answer.
    pub fn with_dim(self, dim: usize) -> Self {
        self.remote.dim.store(dim, Ordering::SeqCst);
        self
    }

    /// Texts per request (default [`DEFAULT_BATCH_SIZE`], at least 1).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.remote.batch_size = n.max(1);
        self
    }

    /// Limit for one request (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.remote.timeout = timeout;
        self
    }
}

#[derive(Deserialize)]
struct OllamaAnswer {
    embeddings: Vec<Vec<f32>>,
}

#[async_trait::async_trait]
impl Embedder for OllamaEmbedder {
    fn model(&self) -> &str {
        &self.remote.model
    }

    fn dim(&self) -> usize {
        self.remote.dim.load(Ordering::SeqCst)
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let r = &self.remote;
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(r.batch_size) {
            let body = r.post(&json!({ "model": r.model, "input": batch })).await?;
            let answer: OllamaAnswer = serde_json::from_slice(&body)
                .map_err(|e| r.bad(format!("no `embeddings` array of numbers ({e})")))?;
            out.extend(r.accept(batch.len(), answer.embeddings)?);
        }
        Ok(out)
    }
}

/// Embeddings from an OpenAI-compatible server: `POST {base}/embeddings {"model", "input": [...]}`
/// → `data[i].embedding`, put back in input order by `data[i].index`.
#[derive(Debug)]
pub struct OpenAiEmbedder {
    remote: Remote,
}

impl OpenAiEmbedder {
    /// An embedder for `model` at `base_url` (including any `/v1`, as in Open WebUI's
    /// `RAG_OPENAI_API_BASE_URL`, e.g. `https://api.openai.com/v1`). `key` is sent as a bearer
    /// token.
    pub fn new(client: reqwest::Client, base_url: &str, key: Option<String>, model: &str) -> Self {
        Self {
            remote: Remote::new(client, base_url, "/embeddings", key, model),
        }
    }

    /// Declares the vector length: [`Embedder::dim`] reports it before the first answer, and
    /// answers of another length are refused. Without it the length is learned from the first
    /// answer.
    pub fn with_dim(self, dim: usize) -> Self {
        self.remote.dim.store(dim, Ordering::SeqCst);
        self
    }

    /// Texts per request (default [`DEFAULT_BATCH_SIZE`], at least 1).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.remote.batch_size = n.max(1);
        self
    }

    /// Limit for one request (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.remote.timeout = timeout;
        self
    }
}

#[derive(Deserialize)]
struct OpenAiAnswer {
    data: Vec<OpenAiItem>,
}

#[derive(Deserialize)]
struct OpenAiItem {
    index: usize,
    embedding: Vec<f32>,
}

#[async_trait::async_trait]
impl Embedder for OpenAiEmbedder {
    fn model(&self) -> &str {
        &self.remote.model
    }

    fn dim(&self) -> usize {
        self.remote.dim.load(Ordering::SeqCst)
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let r = &self.remote;
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(r.batch_size) {
            // `encoding_format` explicitly: some servers default to base64 (as the OpenAI SDKs
            // request), which would not parse as numbers.
            let body = r
                .post(&json!({ "model": r.model, "input": batch, "encoding_format": "float" }))
                .await?;
            let mut answer: OpenAiAnswer = serde_json::from_slice(&body)
                .map_err(|e| r.bad(format!("no `data` array of {{index, embedding}} ({e})")))?;
            answer.data.sort_by_key(|item| item.index);
            if answer
                .data
                .iter()
                .enumerate()
                .any(|(i, item)| item.index != i)
            {
                return Err(r.bad(format!("indices of `data` are not 0..{}", batch.len())));
            }
            let vectors = answer.data.into_iter().map(|item| item.embedding).collect();
            out.extend(r.accept(batch.len(), vectors)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_messages() {
        assert_eq!(
            upstream_message(br#"{"error":"model 'x' not found"}"#),
            "model 'x' not found"
        );
        assert_eq!(
            upstream_message(
                br#"{"error":{"message":"Incorrect API key","type":"invalid_request_error"}}"#
            ),
            "Incorrect API key"
        );
        assert_eq!(upstream_message(b"Bad Gateway\n"), "Bad Gateway");
        assert_eq!(upstream_message(b""), "(empty body)");
    }
}
