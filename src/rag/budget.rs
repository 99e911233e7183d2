//! The context budget: retrieved context is fitted into the model's context window, with
//! room for the answer, before a RAG request is forwarded.
//!
//! Why: an Ollama model runs with a small runtime window (`num_ctx`, 2048 or 4096 tokens by
//! default) and silently drops the start of a longer prompt, which is where the injected
//! context sits; the answer then ignores the documents and nobody is told. So ragway counts
//! the prompt with the embedding model's tokenizer (an estimate: see the README's "Context
//! budget" for how far off it is), keeps the best-ranked chunks that fit (then a shortened
//! one), never touches the user's messages, and for Ollama asks for a larger window through
//! the native API when the prompt needs it. What was cut is reported in the sources reply,
//! a response header and a metric; a conversation that does not fit even without context
//! is a 400.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::Source;
use super::prompt;
use crate::config::{Config, ContextConfig, UpstreamKind};
use crate::error::ApiError;
use crate::metrics;
use crate::models::ModelEntry;

/// Tokens a chat template adds around each message (role markers, separators). Llama 3's
/// template adds 4-5, ChatML 4-5, Gemma 5; the larger figure keeps the estimate on the safe side.
const PER_MESSAGE_TOKENS: usize = 6;
/// Kept free on top of the reserve: counting the parts of a message separately can differ
/// from counting it whole by a token or two at each seam.
const SLACK_TOKENS: usize = 16;
/// A chunk shorter than this after cutting is not worth injecting.
const MIN_SHORTENED_TOKENS: usize = 32;
/// Largest `/api/show` answer read: without `verbose` it is a few KiB; more is hostile.
const MAX_SHOW_BYTES: usize = 4 * 1024 * 1024;
/// `num_ctx` asked for is rounded up to this, so nearby prompts share one loaded runner
/// (Ollama reloads a model whenever `num_ctx` changes).
const NUM_CTX_STEP: u32 = 1024;
/// Text is tokenised in pieces of about this size: the memory of one encoding is ~100 bytes
/// a token, so a 4 MiB document counted whole would briefly take ~100 MiB.
const PIECE_BYTES: usize = 16 * 1024;
/// Whole name of the response header that reports what the budget did.
pub const HEADER: &str = "x-ragway-context";

/// A model's context window, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The window a request gets as forwarded unchanged (Ollama: the runtime `num_ctx`).
    pub runtime: u32,
    /// The most a request can get by asking (Ollama: the trained context length, through
    /// `/api/chat` with `options.num_ctx`); equal to `runtime` elsewhere.
    pub max: u32,
}

/// Token counting and the per-model window cache.
pub struct ContextBudget {
    /// Where `tokenizer.json` is looked for, on the first RAG request that counts tokens.
    model_dir: PathBuf,
    /// Loaded on first use: a tokenizer takes ~15 MiB resident, which a gateway that never
    /// answers a RAG request (or embeds through Ollama) should not pay for.
    tokenizer: OnceLock<Option<tokenizers::Tokenizer>>,
    /// `upstream url \n model id` → window and when it was learnt. Bounded by
    /// `context.cache-entries`; entries live as long as the model list (`models.cache-ttl`).
    cache: Mutex<HashMap<String, (Instant, Window)>>,
    ttl: Duration,
}

impl ContextBudget {
    /// Token counting with the embedding model's `tokenizer.json` from `model_dir` (the
    /// same counting whatever engine embeds), loaded when first needed; without it, tokens
    /// are estimated from bytes.
    pub fn new(model_dir: &Path, ttl: Duration) -> ContextBudget {
        ContextBudget {
            model_dir: model_dir.to_path_buf(),
            tokenizer: OnceLock::new(),
            cache: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn tokenizer(&self) -> Option<&tokenizers::Tokenizer> {
        self.tokenizer
            .get_or_init(|| load_tokenizer(&self.model_dir))
            .as_ref()
    }

    /// Tokens of one piece (at most [`PIECE_BYTES`]). Without a tokenizer: one per 3 bytes,
    /// which over-counts English and code for chat models' BPE tokenizers (~4 bytes a token).
    fn count_piece(&self, piece: &str) -> usize {
        if piece.is_empty() {
            return 0;
        }
        match self.tokenizer() {
            Some(t) => t
                .encode_fast(piece, false)
                .map_or_else(|_| piece.len().div_ceil(3), |e| e.len()),
            None => piece.len().div_ceil(3),
        }
    }

    /// Tokens of `text`, counted piece by piece so memory stays bounded whatever its size.
    pub fn count(&self, text: &str) -> usize {
        pieces(text).map(|r| self.count_piece(&text[r])).sum()
    }

    /// Tokens of `text` when at most `limit`, else `None`: counting stops at the first piece
    /// past the limit, so a huge document is not tokenised whole to learn it does not fit.
    pub fn count_upto(&self, text: &str, limit: usize) -> Option<usize> {
        let mut n = 0;
        for r in pieces(text) {
            n += self.count_piece(&text[r]);
            if n > limit {
                return None;
            }
        }
        Some(n)
    }

    /// The longest prefix of `text` with at most `tokens` tokens, cut on a char boundary.
    fn prefix<'a>(&self, text: &'a str, tokens: usize) -> &'a str {
        let mut used = 0;
        for r in pieces(text) {
            let piece = &text[r.clone()];
            let n = self.count_piece(piece);
            if used + n <= tokens {
                used += n;
                continue;
            }
            let want = tokens - used;
            let cut = match self.tokenizer().and_then(|t| t.encode(piece, false).ok()) {
                Some(e) => e.get_offsets().get(want).map_or(piece.len(), |o| o.0),
                None => want.saturating_mul(3),
            };
            return &text[..floor_char(text, r.start + cut.min(piece.len()))];
        }
        text
    }

    fn cached(&self, key: &str) -> Option<Window> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, w)| *w)
    }

    fn remember(&self, key: String, window: Window, cap: usize) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= cap && !cache.contains_key(&key) {
            cache.retain(|_, (at, _)| at.elapsed() < self.ttl);
            while cache.len() >= cap {
                let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                cache.remove(&oldest);
            }
        }
        cache.insert(key, (Instant::now(), window));
    }

    /// Entries held now (for tests of the bound).
    pub fn cache_len(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The largest char boundary at or before `i`.
fn floor_char(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Consecutive byte ranges covering `text`, each at most [`PIECE_BYTES`], cut after the last
/// whitespace in a piece's second half when there is one (tokenisers split words at
/// whitespace, so the sum of the pieces' counts is the count of the whole, or within a
/// token per cut).
fn pieces(text: &str) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= text.len() {
            return None;
        }
        let mut end = floor_char(text, start + PIECE_BYTES);
        if end < text.len() {
            let half = floor_char(text, start + PIECE_BYTES / 2);
            if let Some(ws) = text[half..end].rfind(char::is_whitespace) {
                end = half + ws + 1;
            }
            if end <= start {
                // A single char longer than the piece size cannot happen (4 bytes at most),
                // but never loop forever.
                end = text.ceil_char_boundary(start + 1);
            }
        }
        let r = start..end;
        start = end;
        Some(r)
    })
}

/// An upstream's claim about a token count, believed only when it is a positive integer;
/// capped at `max_window` (an upstream can lie, and a window is memory on the GPU).
fn sane(v: Option<&Value>, max_window: u32) -> Option<u32> {
    let n = v?.as_u64().filter(|n| *n > 0)?;
    Some(u32::try_from(n).unwrap_or(u32::MAX).min(max_window))
}

/// `num_ctx` from Ollama's `parameters` text (`"num_ctx 8192\nstop ..."`).
fn num_ctx_parameter(parameters: &str, max_window: u32) -> Option<u32> {
    parameters.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some("num_ctx"))
            .then(|| it.next()?.parse::<u64>().ok())
            .flatten()
            .filter(|n| *n > 0)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX).min(max_window))
    })
}

/// The window from an `/api/show` answer: the model's `num_ctx` (else `runtime_default`) as
/// it runs, its trained `*.context_length` as the most it can be given.
pub fn window_from_show(show: &Value, runtime_default: u32, cfg: &ContextConfig) -> Window {
    let runtime = show
        .get("parameters")
        .and_then(Value::as_str)
        .and_then(|p| num_ctx_parameter(p, cfg.max_window))
        .unwrap_or(runtime_default);
    let trained = show
        .get("model_info")
        .and_then(Value::as_object)
        .and_then(|info| {
            info.iter()
                .filter(|(k, _)| k.ends_with(".context_length"))
                .find_map(|(_, v)| sane(Some(v), cfg.max_window))
        });
    let max = if cfg.native_num_ctx {
        trained.unwrap_or(runtime).max(runtime)
    } else {
        runtime
    };
    Window { runtime, max }
}

/// The embedding model's tokenizer without padding or truncation, or `None` (then tokens
/// are estimated from bytes).
fn load_tokenizer(model_dir: &Path) -> Option<tokenizers::Tokenizer> {
    match tokenizers::Tokenizer::from_file(model_dir.join("tokenizer.json")) {
        Ok(mut t) => {
            t.with_padding(None);
            match t.with_truncation(None) {
                Ok(_) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "tokenizer without truncation failed; estimating tokens from bytes");
                    None
                }
            }
        }
        Err(e) => {
            tracing::info!(error = %e, "no embedding tokenizer for the context budget; estimating tokens from bytes");
            None
        }
    }
}

/// What the context budget reads: the settings, the upstreams (and a client to ask Ollama
/// for a model's window) and the token counter with its cache of windows.
#[derive(Clone, Copy)]
pub struct Budgeter<'a> {
    pub config: &'a Config,
    pub upstreams: &'a crate::upstream::Upstreams,
    pub http: &'a reqwest::Client,
    pub context: &'a ContextBudget,
}

/// The context window of `entry` on its preferred upstream, or `None` when unknown (an
/// OpenAI-compatible connection without `context-length`).
pub async fn window(app: &Budgeter<'_>, entry: &ModelEntry) -> Option<Window> {
    let cfg = &app.config.context;
    // The first healthy host (not `rank`, which would advance the round-robin).
    let family = app.upstreams.family(entry.kind);
    let hosts: Vec<_> = entry.urls.iter().filter_map(|i| family.get(*i)).collect();
    let up = hosts
        .iter()
        .find(|u| !u.recently_failed())
        .or(hosts.first())
        .map(|u| (*u).clone())?;
    let configured = up
        .config
        .context_lengths
        .get(&entry.upstream_id)
        .copied()
        .or(up.config.context_length)
        .map(|n| n.clamp(1, cfg.max_window));
    match entry.kind {
        UpstreamKind::OpenAi => configured.map(|n| Window { runtime: n, max: n }),
        UpstreamKind::Ollama => {
            let key = format!("{}\n{}", up.config.url, entry.upstream_id);
            if let Some(w) = app.context.cached(&key) {
                return Some(w);
            }
            let runtime_default = configured.unwrap_or(cfg.ollama_default_window);
            let w = match show(app, &up, &entry.upstream_id).await {
                Ok(v) => window_from_show(&v, runtime_default, cfg),
                Err(e) => {
                    tracing::warn!(upstream = %up.config.url, model = %entry.upstream_id, error = %e, "model details unavailable; assuming the default window");
                    Window {
                        runtime: runtime_default,
                        max: runtime_default,
                    }
                }
            };
            app.context.remember(key, w, cfg.cache_entries);
            Some(w)
        }
    }
}

/// `POST /api/show`, bounded in time and size.
async fn show(
    app: &Budgeter<'_>,
    up: &crate::upstream::Upstream,
    model: &str,
) -> Result<Value, String> {
    let mut req = app
        .http
        .post(up.url("/api/show"))
        .json(&json!({ "model": model }))
        .timeout(app.config.models_list_timeout.max(Duration::from_secs(2)));
    if let Some(k) = &up.config.key {
        req = req.bearer_auth(k);
    }
    let mut resp = req.send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_SHOW_BYTES {
            return Err(format!(
                "answer over {} MiB",
                MAX_SHOW_BYTES / (1024 * 1024)
            ));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// A token count a client sent (`max_tokens`, `num_ctx`): absent, or a positive integer no
/// larger than `limit`; anything else is a clear 400.
fn client_tokens(
    body: &Map<String, Value>,
    key: &str,
    limit: u32,
) -> Result<Option<u32>, ApiError> {
    let v = match key.split_once('.') {
        Some((outer, inner)) => body.get(outer).and_then(|o| o.get(inner)),
        None => body.get(key),
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 && n <= u64::from(limit) => Ok(u32::try_from(n).ok()),
            _ => Err(ApiError::bad_request(format!(
                "{key} must be a whole number of tokens between 1 and {limit} (this model's \
                 context window), got {v}"
            ))),
        },
    }
}

/// What the budget decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub window: Window,
    /// Tokens of the prompt as forwarded (messages plus the context kept).
    pub prompt_tokens: usize,
    /// Tokens kept free for the answer.
    pub reserve: u32,
    pub kept: usize,
    pub dropped: usize,
    pub shortened: usize,
    /// Ollama: the `num_ctx` to run with, when the runtime window is not enough (or the
    /// client asked for a window); the request then goes to `/api/chat`.
    pub num_ctx: Option<u32>,
}

impl Decision {
    /// The `x-ragway-context` header value.
    #[must_use]
    pub fn header(&self) -> String {
        let mut s = format!(
            "window={}; prompt-tokens={}; reserve={}; chunks-kept={}; chunks-dropped={}; chunks-shortened={}",
            self.window.runtime,
            self.prompt_tokens,
            self.reserve,
            self.kept,
            self.dropped,
            self.shortened
        );
        if let Some(n) = self.num_ctx {
            let _ = write!(s, "; num-ctx={n}");
        }
        s
    }
}

/// Tokens of the messages as an upstream template renders them (approximately), when at
/// most `limit`.
fn messages_tokens(budget: &ContextBudget, messages: &[Value], limit: usize) -> Option<usize> {
    let mut n = 0;
    for m in messages {
        let text = prompt::content_text(m.get("content").unwrap_or(&Value::Null));
        n += PER_MESSAGE_TOKENS + budget.count_upto(&text, limit.saturating_sub(n))?;
        if n > limit {
            return None;
        }
    }
    Some(n)
}

/// Fits `sources` into the window of `entry` for the request `body` (before injection).
/// Drops and shortens chunks in place; the best-ranked chunks of every item are kept first,
/// round-robin across items. `None`: the window is unknown or the budget is off.
pub async fn fit(
    app: &Budgeter<'_>,
    entry: &ModelEntry,
    body: &Map<String, Value>,
    sources: &mut [Source],
    query: &str,
) -> Result<Option<Decision>, ApiError> {
    let cfg = &app.config.context;
    if !cfg.budget {
        return Ok(None);
    }
    let Some(mut window) = window(app, entry).await else {
        metrics::CONTEXT_BUDGET
            .with_label_values(&["unknown_window"])
            .inc();
        return Ok(None);
    };
    // A window the client asks for (Open WebUI's `num_ctx` param) is honoured for Ollama.
    let mut asked = None;
    if entry.kind == UpstreamKind::Ollama {
        asked = client_tokens(body, "num_ctx", cfg.max_window)?;
        if asked.is_none() {
            asked = client_tokens(body, "options.num_ctx", cfg.max_window)?;
        }
        if let Some(n) = asked {
            window = Window {
                runtime: window.runtime,
                max: n,
            };
        }
    }
    let capacity = window.max;
    let mut reserve = None;
    for key in ["max_completion_tokens", "max_tokens"] {
        if let Some(n) = client_tokens(body, key, capacity)? {
            reserve = Some(n);
            break;
        }
    }
    let reserve = reserve.unwrap_or(cfg.answer_reserve.min(capacity / 2));
    let rag = &app.config.rag;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let copies = prompt::injection_count(messages, rag.system_context).max(1);
    let budget = &app.context;
    let limit = capacity as usize;
    // What must fit whatever the context: the messages, and the template around an empty
    // context (plus the message it may add) once per copy, with the answer's reserve.
    let must = limit.saturating_sub(reserve as usize + SLACK_TOKENS);
    let base = messages_tokens(budget, messages, must).and_then(|m| {
        let frame = budget.count_upto(&prompt::fill(&rag.template, "", query), must)?;
        Some(m + (frame + PER_MESSAGE_TOKENS) * copies).filter(|b| *b <= must)
    });
    let Some(base) = base else {
        metrics::CONTEXT_BUDGET
            .with_label_values(&["refused"])
            .inc();
        return Err(ApiError::bad_request(format!(
            "The conversation does not fit model {}'s context window even without retrieved \
             context: the window is {limit} tokens and {reserve} are reserved for the answer \
             (max_tokens, or context.answer-reserve). Shorten the conversation or lower \
             max_tokens",
            entry.id
        )));
    };
    let mut left = must - base;
    let room = left;
    let (kept, dropped, shortened) = select(budget, sources, &mut left, copies);
    let prompt_tokens = base + (room - left);
    let need = u32::try_from(prompt_tokens + reserve as usize).unwrap_or(u32::MAX);
    let num_ctx = match (entry.kind, asked) {
        (UpstreamKind::Ollama, Some(n)) => Some(n),
        (UpstreamKind::Ollama, None) if need > window.runtime => Some(
            need.div_ceil(NUM_CTX_STEP)
                .saturating_mul(NUM_CTX_STEP)
                .min(capacity),
        ),
        _ => None,
    };
    let outcome = if dropped + shortened > 0 {
        "trimmed"
    } else {
        "fit"
    };
    metrics::CONTEXT_BUDGET.with_label_values(&[outcome]).inc();
    for (action, n) in [
        ("kept", kept),
        ("dropped", dropped),
        ("shortened", shortened),
    ] {
        if n > 0 {
            metrics::CONTEXT_CHUNKS
                .with_label_values(&[action])
                .inc_by(n as u64);
        }
    }
    Ok(Some(Decision {
        window,
        prompt_tokens,
        reserve,
        kept,
        dropped,
        shortened,
        num_ctx,
    }))
}

/// Keeps chunks in rank order, round-robin across sources, while they fit in `left`
/// tokens (each costs its text plus its `<source>` tag, `copies` times); the first that
/// does not fit is shortened when enough room is left, the rest are dropped.
/// Returns (kept, dropped, shortened); `left` is what remains.
// One rank indexes every source's list at once; no single iterator expresses that.
#[allow(clippy::needless_range_loop)]
fn select(
    budget: &ContextBudget,
    sources: &mut [Source],
    left: &mut usize,
    copies: usize,
) -> (usize, usize, usize) {
    // The `<source id=".." name=".." ...></source>` tag around each chunk.
    let tags: Vec<usize> = sources
        .iter()
        .map(|s| {
            let probe = Source {
                source: s.source.clone(),
                document: vec![String::new()],
                metadata: vec![s.metadata.first().cloned().unwrap_or(Value::Null)],
                distances: vec![0.0],
            };
            budget.count(&prompt::context_string(std::slice::from_ref(&probe))) + 1
        })
        .collect();
    let mut keep: Vec<Vec<bool>> = sources
        .iter()
        .map(|s| vec![false; s.document.len()])
        .collect();
    let mut shortened_at: Option<(usize, usize, usize)> = None;
    let depth = sources.iter().map(|s| s.document.len()).max().unwrap_or(0);
    let mut full = false;
    'ranks: for rank in 0..depth {
        for (si, s) in sources.iter().enumerate() {
            let Some(doc) = s.document.get(rank) else {
                continue;
            };
            if full {
                break 'ranks;
            }
            let room = (*left / copies).saturating_sub(tags[si]);
            if let Some(n) = budget.count_upto(doc, room) {
                *left -= (n + tags[si]) * copies;
                keep[si][rank] = true;
                continue;
            }
            // Room for part of it: a shortened chunk beats none (its start usually
            // carries the heading and the sentence that matched).
            if room >= MIN_SHORTENED_TOKENS {
                shortened_at = Some((si, rank, room));
                keep[si][rank] = true;
                *left -= (room + tags[si]) * copies;
            }
            full = true;
        }
    }
    let (mut kept, mut dropped) = (0, 0);
    for (si, s) in sources.iter_mut().enumerate() {
        if let Some((ssi, rank, room)) = shortened_at
            && ssi == si
        {
            let cut = budget.prefix(&s.document[rank], room).to_string();
            s.document[rank] = cut;
            if let Some(Value::Object(m)) = s.metadata.get_mut(rank) {
                m.insert("context_budget".into(), json!("shortened"));
            }
        }
        let flags = &keep[si];
        let mut i = 0;
        s.document.retain(|_| {
            i += 1;
            flags[i - 1]
        });
        let mut i = 0;
        s.metadata.retain(|_| {
            i += 1;
            flags[i - 1]
        });
        let mut i = 0;
        s.distances.retain(|_| {
            i += 1;
            flags[i - 1]
        });
        let k = flags.iter().filter(|f| **f).count();
        kept += k;
        dropped += flags.len() - k;
    }
    let shortened = usize::from(shortened_at.is_some());
    (kept - shortened, dropped, shortened)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ContextConfig {
        ContextConfig {
            budget: true,
            ollama_default_window: 2048,
            answer_reserve: 512,
            max_window: 131_072,
            native_num_ctx: true,
            cache_entries: 4,
        }
    }

    #[test]
    fn show_answers_are_believed_only_when_sane() {
        let w = window_from_show(
            &json!({"parameters": "stop \"x\"\nnum_ctx 8192", "model_info": {"llama.context_length": 131072}}),
            2048,
            &cfg(),
        );
        assert_eq!(
            w,
            Window {
                runtime: 8192,
                max: 131_072
            }
        );
        // A lying upstream: absurd, negative, textual or missing lengths.
        let w = window_from_show(
            &json!({"parameters": "num_ctx -5", "model_info": {"x.context_length": 1_000_000_000_000_u64}}),
            2048,
            &cfg(),
        );
        assert_eq!(
            w,
            Window {
                runtime: 2048,
                max: 131_072
            }
        );
        let w = window_from_show(
            &json!({"parameters": 7, "model_info": {"x.context_length": -1, "y.context_length": "9"}}),
            2048,
            &cfg(),
        );
        assert_eq!(
            w,
            Window {
                runtime: 2048,
                max: 2048
            }
        );
        let w = window_from_show(&json!([]), 4096, &cfg());
        assert_eq!(
            w,
            Window {
                runtime: 4096,
                max: 4096
            }
        );
        let mut off = cfg();
        off.native_num_ctx = false;
        let w = window_from_show(
            &json!({"model_info": {"a.context_length": 32768}}),
            2048,
            &off,
        );
        assert_eq!(
            w,
            Window {
                runtime: 2048,
                max: 2048
            }
        );
    }

    #[test]
    fn the_window_cache_is_bounded() {
        let b = ContextBudget::new(Path::new("/nonexistent"), Duration::from_secs(60));
        for i in 0..20 {
            b.remember(format!("k{i}"), Window { runtime: 1, max: 1 }, 4);
            assert!(b.cache_len() <= 4);
        }
        assert!(b.cached("k19").is_some());
        assert!(b.cached("k0").is_none(), "the oldest entries went first");
    }

    fn src(name: &str, docs: &[&str]) -> Source {
        Source {
            source: json!({"type": "collection", "id": name, "name": name}),
            document: docs.iter().map(|d| (*d).to_string()).collect(),
            metadata: docs.iter().map(|_| json!({"source": name})).collect(),
            distances: (0..docs.len()).map(|i| 1.0 - i as f32 / 10.0).collect(),
        }
    }

    #[test]
    fn best_ranks_are_kept_round_robin_and_one_is_shortened() {
        // Without a tokenizer a token is 3 bytes: each 300-byte chunk costs 100 + its tag.
        let b = ContextBudget::new(Path::new("/nonexistent"), Duration::from_secs(60));
        let chunk = "a".repeat(300);
        let mut s = vec![
            src("A", &[&chunk, &chunk, &chunk]),
            src("B", &[&chunk, &chunk]),
        ];
        let tag = b.count(&prompt::context_string(&[Source {
            document: vec![String::new()],
            ..src("A", &[""])
        }])) + 1;
        // Room for three whole chunks and 40 tokens of a fourth.
        let mut left = 3 * (100 + tag) + tag + 40;
        let (kept, dropped, shortened) = select(&b, &mut s, &mut left, 1);
        assert_eq!((kept, dropped, shortened), (3, 1, 1));
        // Rank 0 of A and B, rank 1 of A, then B's rank 1 shortened; A's rank 2 dropped.
        assert_eq!(s[0].document.len(), 2);
        assert_eq!(s[1].document.len(), 2);
        assert_eq!(s[1].document[1].len(), 120);
        assert_eq!(s[1].metadata[1]["context_budget"], "shortened");
        assert_eq!(s[0].distances, vec![1.0, 0.9]);
        assert_eq!(left, 0);
        // Nothing fits: everything goes, nothing is shortened below the minimum.
        let mut s = vec![src("A", &[&chunk])];
        let mut left = 10;
        assert_eq!(select(&b, &mut s, &mut left, 1), (0, 1, 0));
        assert!(s[0].document.is_empty() && s[0].metadata.is_empty());
    }

    /// The provisioned embedding tokenizer (`scripts/` fetch it, as for the ONNX tests).
    fn real() -> ContextBudget {
        let dir = std::env::var("RAGWAY_MODEL_DIR").map_or_else(
            |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"),
            std::path::PathBuf::from,
        );
        let b = ContextBudget::new(&dir, Duration::from_secs(60));
        assert!(
            b.tokenizer().is_some(),
            "no tokenizer.json in {}",
            dir.display()
        );
        b
    }

    #[test]
    fn counting_in_pieces_matches_counting_whole() {
        let b = real();
        let text = "The gateway counts tokens in pieces, so a large document never costs \
                    more memory than one piece. Überraschung: naïve café! "
            .repeat(1100);
        assert!(text.len() > 8 * PIECE_BYTES);
        let whole = b
            .tokenizer()
            .unwrap()
            .encode_fast(text.as_str(), false)
            .unwrap()
            .len();
        assert_eq!(b.count(&text), whole);
        let covered: usize = pieces(&text).map(|r| r.len()).sum();
        assert_eq!(covered, text.len());
        assert!(pieces(&text).all(|r| r.len() <= PIECE_BYTES));
        assert_eq!(b.count_upto(&text, whole), Some(whole));
        assert_eq!(b.count_upto(&text, whole - 1), None);
        // A prefix of n tokens has n tokens (give or take the word split at the cut).
        for n in [1, 100, 5000, whole - 3] {
            let p = b.prefix(&text, n);
            let got = b.count(p);
            assert!(got <= n && got + 2 >= n, "{got} for {n}");
        }
        assert_eq!(b.prefix(&text, whole + 10), text);
        // Without a tokenizer: 3 bytes a token, cut on char boundaries.
        let est = ContextBudget::new(Path::new("/nonexistent"), Duration::from_secs(60));
        assert_eq!(est.count("ééé"), 2);
        assert_eq!(est.prefix("ééé", 1), "é");
        assert_eq!(pieces("").count(), 0);
    }

    #[test]
    fn client_token_counts_are_checked() {
        let body = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(client_tokens(&body(json!({})), "max_tokens", 100), Ok(None));
        assert_eq!(
            client_tokens(&body(json!({"max_tokens": 50})), "max_tokens", 100),
            Ok(Some(50))
        );
        for bad in [
            json!(0),
            json!(-1),
            json!(101),
            json!(1.5),
            json!("9"),
            json!(u64::MAX),
        ] {
            assert!(client_tokens(&body(json!({"max_tokens": bad})), "max_tokens", 100).is_err());
        }
        assert_eq!(
            client_tokens(
                &body(json!({"options": {"num_ctx": 64}})),
                "options.num_ctx",
                100
            ),
            Ok(Some(64))
        );
    }
}
