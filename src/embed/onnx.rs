//! Local sentence embeddings with ONNX Runtime (all-MiniLM-L6-v2, int8).
//!
//! ONNX Runtime is a shared library loaded at run time (`ort`'s `load-dynamic`), so the binary
//! builds without it and the library can be provisioned from `PyPI` by `scripts/fetch-model.sh`.
//!
//! Concurrency: a session runs one inference at a time (`Session::run` takes `&mut self`), and
//! several single-threaded sessions scale better than one multi-threaded session on a small,
//! busy machine (intra-op thread pools collapse when oversubscribed). So the embedder owns a
//! pool of sessions, each with one intra-op thread; every batch checks one out.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use futures_util::StreamExt;
use ort::environment::Environment;
use ort::ep::CPU;
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};
use ort::session::{RunOptions, Session};
use ort::value::{Tensor, TensorElementType, ValueType};
use tokenizers::utils::truncation::{TruncationDirection, TruncationParams, TruncationStrategy};
use tokenizers::{Encoding, Tokenizer};
use tokio::sync::Semaphore;

use super::{EmbedError, Embedder, l2_normalize, quantize};

/// Texts per inference call. Larger batches amortise per-call overhead but pad every text to
/// the longest one in the batch; texts are sorted by length before batching, which keeps that
/// padding small.
pub const BATCH_SIZE: usize = 32;

/// Longest input in tokens (special tokens included); longer texts are truncated. This is the
/// model's own `max_seq_length` in sentence-transformers (trained on 128, positions up to
/// 512), so vectors match what sentence-transformers computes for the same text.
pub const MAX_TOKENS: usize = 256;

/// Bound on one inference's shape, in rows × tokens² (attention holds rows × heads × tokens²
/// scores per layer, and activations grow with rows × tokens): 2 texts of [`MAX_TOKENS`].
/// Measured on the release binary: 8 texts of ~230 tokens per run took the process to a
/// 384 MiB peak (~200 MiB of activations, heaptrack: all in `Session::run`), 32 per run (the
/// old batches) to 1 GB. Splitting costs little: the work per token is the same, and a run
/// of 2 × 256 tokens is still long enough to amortise the call. Batches of short texts
/// still run [`BATCH_SIZE`] at a time (32 × 64² is the bound).
pub const MAX_BATCH_CELLS: usize = 2 * MAX_TOKENS * MAX_TOKENS;

/// Tokens beyond [`MAX_TOKENS`] a prefix of a long text must yield to encode like the whole
/// text (see `Inner::encode_bounded`).
const PREFIX_MARGIN: usize = 100;
/// First prefix tried for a long text, in bytes: English averages ~4.5 bytes per token, so
/// this covers [`MAX_TOKENS`] + [`PREFIX_MARGIN`] tokens of ordinary prose in one step.
const PREFIX_START: usize = 4096;
/// Longest prefix tokenised for inference, in bytes.
const PREFIX_MAX: usize = 256 * 1024;

/// The ONNX Runtime library and environment of this process. ONNX Runtime can be loaded only
/// once per process and `ort` allows only one environment, which must stay alive for as long
/// as sessions are created, so both live here for the life of the process.
static RUNTIME: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// Loads ONNX Runtime from `library` (once per process) and returns the shared environment.
/// Asking again for the same library reuses it; asking for a different one is an error,
/// because `ort` would silently keep using the first.
fn runtime(library: &Path) -> Result<Environment, EmbedError> {
    let canonical = library
        .canonicalize()
        .map_err(|_| EmbedError::RuntimeMissing(library.to_path_buf()))?;
    let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((loaded, env)) = slot.as_ref() {
        if *loaded == canonical {
            return Ok(env.clone());
        }
        return Err(EmbedError::RuntimeConflict {
            loaded: loaded.clone(),
            requested: canonical,
        });
    }
    let load_err = |reason: String| EmbedError::RuntimeLoad {
        path: canonical.clone(),
        reason,
    };
    // `ort::init()` would panic when no library can be found; `init_from` returns an error.
    let env = ort::init_from(&canonical)
        .map_err(|e| load_err(e.to_string()))?
        .with_name("ragway")
        .with_telemetry(false)
        .build()
        .map_err(|e| load_err(e.to_string()))?;
    register_activation_arena(&env).map_err(load_err)?;
    *slot = Some((canonical, env.clone()));
    Ok(env)
}

/// Registers the process's one CPU arena for activations, shared by every session (they opt
/// in with `session.use_env_allocators`). Without an arena every run allocated its
/// activations from malloc, whose large blocks are mapped and unmapped each time: ingesting
/// faulted in ~25 MiB of fresh zeroed pages per chunk, a third of the CPU (`perf`). An arena
/// keeps them for the next run. Its regions stop doubling at [`ARENA_REGION_MAX`] (by
/// default they double up to 1 GiB, which with memory patterns left a 1 MB file's process
/// at 1.66 GB), and it gives its free regions back when embedding is quiet
/// ([`Inner::release`]).
fn register_activation_arena(env: &Environment) -> Result<(), String> {
    use ort::AsPointer;
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    // `kNextPowerOfTwo` (0): regions of 1, 2, 4, 8 MiB, then [`ARENA_REGION_MAX`] each.
    // `kSameAsRequested` measured 741 MiB on a 1 MB file: texts come shortest first, so
    // every run asked for a little more than any earlier region held.
    const NEXT_POWER_OF_TWO: usize = 0;
    let info = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Arena,
        MemoryType::Default,
    )
    .map_err(|e| format!("activation arena: {e}"))?;
    let keys = [
        c"arena_extend_strategy".as_ptr(),
        c"max_power_of_two_extend_bytes".as_ptr(),
    ];
    let values = [NEXT_POWER_OF_TWO, ARENA_REGION_MAX];
    let api = ort::api();
    let mut cfg: *mut ort::sys::OrtArenaCfg = std::ptr::null_mut();
    // SAFETY: the key and value arrays hold `keys.len()` entries and outlive the call; `cfg`
    // is released below whatever happens next.
    ort_status(unsafe {
        (api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &raw mut cfg)
    })
    .map_err(|e| format!("activation arena config: {e}"))?;
    // SAFETY: `env` and `info` are live ORT objects; ORT copies what it needs from `cfg`.
    let registered = ort_status(unsafe {
        (api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), info.ptr(), cfg)
    });
    // SAFETY: created above, used by no one else.
    unsafe { (api.ReleaseArenaCfg)(cfg) };
    registered.map_err(|e| format!("activation arena: {e}"))
}

/// Largest region the activation arena adds at once. A run's largest tensor is ~12 MiB
/// (the feed-forward activations of 32 texts × 64 tokens, the most [`MAX_BATCH_CELLS`]
/// allows; a text on the int8 kernels needs at most 3 MiB), so every tensor fits one region
/// and freed space is reused rather than outgrown.
const ARENA_REGION_MAX: usize = 16 * 1024 * 1024;

/// An ORT C API status as a result (and the status released).
fn ort_status(status: ort::sys::OrtStatusPtr) -> Result<(), String> {
    let Some(ptr) = std::ptr::NonNull::new(status.0) else {
        return Ok(());
    };
    let api = ort::api();
    // SAFETY: a non-null status from the API; its message lives until ReleaseStatus.
    let message = unsafe {
        let raw = (api.GetErrorMessage)(ptr.as_ptr());
        let text = if raw.is_null() {
            "unknown error".to_owned()
        } else {
            std::ffi::CStr::from_ptr(raw).to_string_lossy().into_owned()
        };
        (api.ReleaseStatus)(ptr.as_ptr());
        text
    };
    Err(message)
}

/// Names of the model's inputs and of the output that is pooled.
#[derive(Debug, Clone)]
struct ModelIo {
    input_ids: String,
    attention_mask: String,
    /// Some exports drop `token_type_ids` (always zero for single sentences).
    token_type_ids: Option<String>,
    /// `last_hidden_state`, or the first rank-3 f32 output.
    hidden: String,
}

impl ModelIo {
    fn inspect(session: &Session, path: &Path) -> Result<Self, EmbedError> {
        let bad = |reason: String| EmbedError::Model {
            path: path.to_path_buf(),
            reason,
        };
        let inputs: Vec<&str> = session
            .inputs()
            .iter()
            .map(ort::value::Outlet::name)
            .collect();
        for input in session.inputs() {
            if input.dtype().tensor_type() != Some(TensorElementType::Int64) {
                return Err(bad(format!(
                    "input {} is {:?}, expected an int64 tensor",
                    input.name(),
                    input.dtype()
                )));
            }
        }
        let find = |name: &str| inputs.iter().find(|i| **i == name).map(ToString::to_string);
        let input_ids = find("input_ids")
            .ok_or_else(|| bad(format!("no input_ids input (inputs: {inputs:?})")))?;
        let attention_mask = find("attention_mask")
            .ok_or_else(|| bad(format!("no attention_mask input (inputs: {inputs:?})")))?;
        let token_type_ids = find("token_type_ids");
        let known = 2 + usize::from(token_type_ids.is_some());
        if inputs.len() != known {
            return Err(bad(format!(
                "unexpected inputs {inputs:?}; expected input_ids, attention_mask and optionally \
                 token_type_ids"
            )));
        }

        let is_hidden = |ty: &ValueType| {
            ty.tensor_type() == Some(TensorElementType::Float32)
                && ty.tensor_shape().is_some_and(|s| s.len() == 3)
        };
        let outputs = session.outputs();
        let hidden = outputs
            .iter()
            .find(|o| o.name() == "last_hidden_state" && is_hidden(o.dtype()))
            .or_else(|| outputs.iter().find(|o| is_hidden(o.dtype())))
            .map(|o| o.name().to_owned())
            .ok_or_else(|| {
                let names: Vec<&str> = outputs.iter().map(ort::value::Outlet::name).collect();
                bad(format!(
                    "no rank-3 float32 output to pool (outputs: {names:?}); a token-level \
                     sentence-transformers export is required"
                ))
            })?;
        Ok(Self {
            input_ids,
            attention_mask,
            token_type_ids,
            hidden,
        })
    }
}

/// A fixed set of sessions handed out one at a time; waits (blocking) when all are busy.
/// Queries go first: a batch leaves a returned session to a waiting query, so a chat query
/// waits for the inference running now (at most [`MAX_BATCH_CELLS`] of work), not for the
/// rest of an upload's batch.
struct SessionPool {
    idle: Mutex<Vec<Session>>,
    returned: Condvar,
    /// Queries waiting in [`SessionPool::checkout`]; changed only under the `idle` lock.
    queries_waiting: AtomicUsize,
}

impl SessionPool {
    fn checkout(&self, query: bool) -> PooledSession<'_> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if query {
            self.queries_waiting.fetch_add(1, Ordering::Relaxed);
        }
        loop {
            if (query || self.queries_waiting.load(Ordering::Relaxed) == 0)
                && let Some(session) = idle.pop()
            {
                if query {
                    self.queries_waiting.fetch_sub(1, Ordering::Relaxed);
                    // Batches held back for this query may take the sessions left idle.
                    self.returned.notify_all();
                }
                return PooledSession {
                    pool: self,
                    session: Some(session),
                };
            }
            idle = self
                .returned
                .wait(idle)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// An idle session, if there is one and no query waits for it.
    fn try_checkout(&self) -> Option<PooledSession<'_>> {
        let mut idle = self.lock();
        if self.queries_waiting.load(Ordering::Relaxed) > 0 {
            return None;
        }
        idle.pop().map(|session| PooledSession {
            pool: self,
            session: Some(session),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Session>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A checked-out session; goes back to the pool when dropped, even if inference panicked.
struct PooledSession<'p> {
    pool: &'p SessionPool,
    session: Option<Session>,
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.pool.lock().push(session);
            // All: a batch woken while a query waits would go back to sleep with the session
            // unclaimed.
            self.pool.returned.notify_all();
        }
    }
}

struct Inner {
    model: String,
    dim: usize,
    io: ModelIo,
    /// For callers (token counting, chunking): no truncation, no padding.
    tokenizer: Tokenizer,
    /// For inference: truncates to [`MAX_TOKENS`]; padding is done per batch in [`Inner::run`].
    infer_tokenizer: Tokenizer,
    pool: SessionPool,
    sessions: usize,
    /// The model runs on the int8 kernels: one text per run (see [`OnnxEmbedder::load_with`]).
    int8: bool,
}

/// Sentence embeddings computed locally by ONNX Runtime: tokenise, run the transformer, mean-pool
/// `last_hidden_state` over the attention mask, L2-normalise (the sentence-transformers recipe).
///
/// Cheap to clone; clones share the sessions.
#[derive(Clone)]
pub struct OnnxEmbedder {
    inner: Arc<Inner>,
    /// Bounds in-flight async batches to the number of sessions so that waiting happens here,
    /// asynchronously and in FIFO order, instead of in blocked threads of the blocking pool.
    permits: Arc<Semaphore>,
    /// The same bound for queries, which have their own lane (see [`SessionPool`]).
    query_permits: Arc<Semaphore>,
}

impl std::fmt::Debug for OnnxEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxEmbedder")
            .field("model", &self.inner.model)
            .field("dim", &self.inner.dim)
            .field("sessions", &self.inner.sessions)
            .finish_non_exhaustive()
    }
}

impl OnnxEmbedder {
    /// Loads `model.onnx` and `tokenizer.json` from `model_dir` into `sessions` single-threaded
    /// sessions (at least one), loading ONNX Runtime from `ort_library` first if this process
    /// has not yet. `model_name` is what [`Embedder::model`] reports. Blocks (hundreds of ms per
    /// session); call it from `spawn_blocking` inside a runtime. Weight-only int8 models run
    /// on the int8 kernels ([`OnnxEmbedder::load_with`] with `int8 = true`).
    ///
    /// # Errors
    /// A missing model or tokenizer file, an ONNX Runtime library that does not load, or a
    /// model that does not load or fails its test inference.
    pub fn load(
        model_dir: &Path,
        ort_library: &Path,
        sessions: usize,
        model_name: &str,
    ) -> Result<Self, EmbedError> {
        Self::load_with(model_dir, ort_library, sessions, model_name, true)
    }

    /// [`OnnxEmbedder::load`], choosing how weight-only int8 models compute: `int8` rewrites
    /// their products onto ONNX Runtime's int8 kernels (see [`super::quantize`]; ~1.4x less
    /// CPU per token and no float copy of the weights per session) and embeds every text in
    /// its own run, so that a text's vector never depends on the texts batched with it (the
    /// int8 kernels quantise each run's activations with one scale). `false` computes in
    /// float as the model file is written.
    ///
    /// # Errors
    /// As [`OnnxEmbedder::load`].
    pub fn load_with(
        model_dir: &Path,
        ort_library: &Path,
        sessions: usize,
        model_name: &str,
        int8: bool,
    ) -> Result<Self, EmbedError> {
        let model_path = model_dir.join("model.onnx");
        let tokenizer_path = model_dir.join("tokenizer.json");
        for file in [&model_path, &tokenizer_path] {
            if !file.is_file() {
                return Err(EmbedError::ModelMissing(file.clone()));
            }
        }
        let env = runtime(ort_library)?;

        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| EmbedError::Model {
                path: tokenizer_path.clone(),
                reason: e.to_string(),
            })?;
        // The shipped tokenizer.json pads every input to a fixed 128 tokens and truncates at
        // 128: both off for counting, and padding is done per batch (to the longest text).
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| EmbedError::Model {
                path: tokenizer_path.clone(),
                reason: e.to_string(),
            })?;
        let mut infer_tokenizer = tokenizer.clone();
        infer_tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| EmbedError::Model {
                path: tokenizer_path.clone(),
                reason: e.to_string(),
            })?;

        let sessions = sessions.max(1);
        let bad = |reason: String| EmbedError::Model {
            path: model_path.clone(),
            reason,
        };
        let original = std::fs::read(&model_path).map_err(|e| bad(e.to_string()))?;
        let (bytes, int8) = if int8 {
            match quantize::rewrite(&original).map_err(|e| bad(e.to_string()))? {
                Some((bytes, done)) => {
                    tracing::debug!(
                        matmuls = done.matmuls,
                        gathers = done.gathers,
                        nan_guards = done.nan_guards,
                        gelus = done.gelus,
                        attentions = done.attentions,
                        "int8 weights computed on the int8 kernels"
                    );
                    (bytes, true)
                }
                None => (original, false),
            }
        } else {
            (original, false)
        };
        // Sessions of the pool share their prepacked (GEMM-ready) weights instead of each
        // holding a copy.
        let prepacked = PrepackedWeights::new();
        let mut pool = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            pool.push(build_session(&env, &model_path, &bytes, &prepacked)?);
        }
        drop(bytes);
        let io = ModelIo::inspect(&pool[0], &model_path)?;

        let mut inner = Inner {
            model: model_name.to_owned(),
            dim: 0,
            io,
            tokenizer,
            infer_tokenizer,
            pool: SessionPool {
                idle: Mutex::new(pool),
                returned: Condvar::new(),
                queries_waiting: AtomicUsize::new(0),
            },
            sessions,
            int8,
        };
        // One real inference learns the dimension (the declared output shape may be symbolic)
        // and proves the model runs before the gateway starts serving.
        let probe = inner
            .run(&["ragway"], false)
            .map_err(|e| EmbedError::Model {
                path: model_path.clone(),
                reason: format!("test inference failed: {e}"),
            })?;
        inner.dim = probe[0].len();
        if inner.dim == 0 {
            return Err(EmbedError::Model {
                path: model_path,
                reason: "the model returns empty vectors".into(),
            });
        }
        Ok(Self {
            inner: {
                let inner = Arc::new(inner);
                let weak: std::sync::Weak<Inner> = Arc::downgrade(&inner);
                crate::heap::on_quiet(weak);
                inner
            },
            permits: Arc::new(Semaphore::new(sessions)),
            query_permits: Arc::new(Semaphore::new(sessions)),
        })
    }

    /// The model's tokenizer, without truncation or padding, for counting tokens (token-based
    /// chunking). Inference additionally truncates to [`MAX_TOKENS`] tokens, counting the
    /// `[CLS]`/`[SEP]` that `encode(text, true)` adds.
    #[must_use]
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// Embeds `texts` on the calling thread (batches of [`BATCH_SIZE`], one session at a time),
    /// for CLIs and benchmarks. Blocks while all sessions are busy; inside an async runtime use
    /// [`Embedder::embed`] instead.
    ///
    /// # Errors
    /// The first text the tokenizer or the model fails on.
    pub fn embed_blocking(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let order = self.inner.token_order(texts);
        let mut out = vec![Vec::new(); texts.len()];
        for batch in order.chunks(BATCH_SIZE) {
            let batch_texts: Vec<&str> = batch.iter().map(|&i| texts[i]).collect();
            for (&i, v) in batch.iter().zip(self.inner.run(&batch_texts, false)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}

fn build_session(
    env: &Environment,
    model_path: &Path,
    model: &[u8],
    prepacked: &PrepackedWeights,
) -> Result<Session, EmbedError> {
    let bad = |reason: String| EmbedError::Model {
        path: model_path.to_path_buf(),
        reason,
    };
    // Memory: with its defaults ONNX Runtime kept every activation it ever needed. Its CPU
    // arena grows by powers of two and never gives memory back, and memory-pattern planning
    // pre-allocates one block per distinct input shape; embedding a 1 MB file left the
    // process at 1 to 1.66 GB (heaptrack: blocks of 128 and 84 MiB allocated inside
    // `Session::run` and never freed). So no memory patterns, and instead of the execution
    // provider's arena the environment's ([`register_activation_arena`]): its regions stop
    // doubling at 16 MiB and go back once embedding is quiet, so the peak is about one run's
    // working set per session, which [`MAX_BATCH_CELLS`] bounds.
    Session::builder(env)
        .map_err(|e| bad(e.to_string()))?
        .with_execution_providers([CPU::default().with_arena_allocator(false).build()])
        .map_err(|e| bad(e.to_string()))?
        .with_memory_pattern(false)
        .map_err(|e| bad(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| bad(e.to_string()))?
        // Its fused residual + layer norm costs more than the two operations apart on this
        // model (~6 % of a run through the API, measured in `benches/ingest.rs`); retrieval
        // quality tied on every evaluation set (README, "Ingestion throughput").
        .with_config_entry(
            "optimization.disable_specified_optimizers",
            "SkipLayerNormFusion",
        )
        .map_err(|e| bad(e.to_string()))?
        .with_intra_threads(1)
        .map_err(|e| bad(e.to_string()))?
        .with_inter_threads(1)
        .map_err(|e| bad(e.to_string()))?
        .with_prepacked_weights(prepacked)
        .map_err(|e| bad(e.to_string()))?
        .with_env_allocators()
        .map_err(|e| bad(e.to_string()))?
        // Weights live as long as the session: outside the activation arena, whose regions
        // they would pin.
        .with_device_allocated_initializers()
        .map_err(|e| bad(e.to_string()))?
        .commit_from_memory(model)
        .map_err(|e| bad(e.to_string()))
}

/// Indices of the texts, shortest first: batching texts of similar length wastes less work on
/// padding. Stable, so equal lengths keep their order.
fn length_order(lengths: impl Iterator<Item = usize>) -> Vec<usize> {
    indices_by(lengths, |len| len)
}

/// Indices of `lengths` in the order of `key` of each length, stable among equal keys.
fn indices_by<K: Ord>(
    lengths: impl Iterator<Item = usize>,
    key: impl Fn(usize) -> K,
) -> Vec<usize> {
    let mut order: Vec<(usize, usize)> = lengths.enumerate().collect();
    order.sort_by_key(|&(_, len)| key(len));
    order.into_iter().map(|(i, _)| i).collect()
}

/// Indices of the texts longest first (stable among equals). With one text per run nothing
/// pads, so order only decides how the work spreads over the sessions: the longest runs go
/// first and the short ones fill in at the end, instead of one session finishing the longest
/// texts alone while the others idle (the longest-processing-time rule). Bytes are a good
/// enough measure for that, and need no tokenising pass before the first run.
fn longest_first(lengths: impl Iterator<Item = usize>) -> Vec<usize> {
    indices_by(lengths, std::cmp::Reverse)
}

/// Texts per batch for a request of `texts` texts on `sessions` sessions: [`BATCH_SIZE`], or
/// fewer so that every session gets a batch. A small file (an abstract is one or two chunks)
/// then runs on all sessions at once instead of one text after another on one session while
/// the others idle; its vectors do not change (each text is pooled on its own, see
/// [`OnnxEmbedder::load_with`]).
fn batch_len(texts: usize, sessions: usize) -> usize {
    texts.div_ceil(sessions.max(1)).clamp(1, BATCH_SIZE)
}

/// Texts per batch on the int8 kernels, which run one text per run anyway: small batches let
/// every session take the next texts as soon as it is free, so at the end of a file the
/// sessions finish together (a batch of 32 chunk-sized texts is over a second of one core).
const INT8_BATCH: usize = 4;

/// The batches of a request on the int8 kernels, texts of `lengths` bytes: longest first
/// ([`longest_first`]), at most [`INT8_BATCH`] texts each and spread over every session.
fn int8_batches(lengths: impl Iterator<Item = usize>, sessions: usize) -> Vec<Vec<usize>> {
    let order = longest_first(lengths);
    let per_batch = batch_len(order.len(), sessions).min(INT8_BATCH);
    order.chunks(per_batch).map(<[usize]>::to_vec).collect()
}

/// Splits a batch (texts of `lengths` tokens, in order) into consecutive ranges whose padded
/// shape, rows × longest², stays within `cells`; a single text is always its own range.
fn shape_groups(lengths: impl Iterator<Item = usize>, cells: usize) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut end, mut longest) = (0, 0, 0);
    for len in lengths {
        let wider = longest.max(len);
        if end > start && (end - start + 1) * wider * wider > cells {
            groups.push(start..end);
            start = end;
            longest = len;
        } else {
            longest = wider;
        }
        end += 1;
    }
    if end > start {
        groups.push(start..end);
    }
    groups
}

/// What a run is for: which session it may take, and how.
#[derive(Clone, Copy)]
enum Use {
    /// A chat query: goes before batches (see [`SessionPool`]).
    Query,
    /// An ingestion batch.
    Batch,
    /// Ends by giving the activation arena's free regions back ([`Inner::release`]).
    Release,
}

impl Use {
    fn of(query: bool) -> Self {
        if query { Self::Query } else { Self::Batch }
    }
}

impl crate::heap::Release for Inner {
    fn release(&self) {
        if let Err(e) = self.release_arena() {
            tracing::warn!(error = %e, "cannot release the activation arena");
        }
    }
}

impl Inner {
    /// Gives the activation arena's free regions back. The arena does so at the end of a run
    /// that asks for it, so a one-token run on an idle session does; the arena is the
    /// process's, so one run releases what every session left. `Ok(false)`: every session
    /// was busy, so embedding is not quiet after all and nothing was released.
    fn release_arena(&self) -> Result<bool, EmbedError> {
        let probe = self
            .encode_bounded("ragway")
            .map_err(|e| EmbedError::Inference(e.to_string()))?;
        Ok(!self
            .run_encoded(std::slice::from_ref(&probe), Use::Release)?
            .is_empty())
    }

    /// Indices of the texts by the number of tokens the model will see, shortest first, so
    /// each batch pads to little more than its own texts. Byte length is a poor proxy: on
    /// 1,000-character chunks of English prose, batches of 32 ordered by bytes computed
    /// 16.9 % more token positions than the texts have, ordered by tokens 1.7 % (the
    /// benchmark `benches/ingest.rs` prints both). Tokenising twice costs far less than that.
    fn token_order<T: AsRef<str>>(&self, texts: &[T]) -> Vec<usize> {
        length_order(texts.iter().map(|t| {
            self.infer_tokenizer
                .encode_fast(t.as_ref(), true)
                // A text the tokenizer rejects fails in its batch, with the error.
                .map_or(MAX_TOKENS, |e| e.len())
        }))
    }

    /// Embeds one batch on a pooled session. Blocking.
    fn run(&self, texts: &[&str], query: bool) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let fail = |e: &dyn std::fmt::Display| EmbedError::Inference(e.to_string());
        let encodings = texts
            .iter()
            .map(|t| self.encode_bounded(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(&e))?;
        // The arena keeps what a run frees for the next one until embedding goes quiet
        // (`heap::Quiet`), queries included: their first run may grow it too.
        let _busy = crate::heap::busy();
        let mut vectors = Vec::with_capacity(encodings.len());
        // Int8 runs one text at a time (a bound of 0 cells makes every text its own group):
        // no padding either, and measured per token as cheap as batches from ~64 tokens up.
        let cells = if self.int8 { 0 } else { MAX_BATCH_CELLS };
        for group in shape_groups(encodings.iter().map(Encoding::len), cells) {
            vectors.extend(self.run_encoded(&encodings[group], Use::of(query))?);
        }
        Ok(vectors)
    }

    /// The inference encoding of `text`, tokenising only a prefix of a long text. The
    /// tokenizer truncates only after encoding everything, and keeps ~100 bytes per input
    /// byte while it does (alignments, offsets, token strings): a 32 MB chat message as the
    /// query would have cost gigabytes. A prefix is enough once it yields
    /// [`PREFIX_MARGIN`] tokens beyond [`MAX_TOKENS`]: only the last word of a cut prefix
    /// can tokenise differently from the whole text, and a word yields at most 100 tokens
    /// (longer ones are one `[UNK]`). Texts with fewer tokens than that in their first
    /// [`PREFIX_MAX`] bytes (mostly whitespace, or giant words) are embedded from that
    /// prefix.
    fn encode_bounded(&self, text: &str) -> tokenizers::Result<Encoding> {
        let mut cut = PREFIX_START;
        while cut < text.len() {
            let mut end = cut;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let prefix = &text[..end];
            if cut >= PREFIX_MAX
                || self.tokenizer.encode_fast(prefix, true)?.len() >= MAX_TOKENS + PREFIX_MARGIN
            {
                return self.infer_tokenizer.encode_fast(prefix, true);
            }
            cut *= 4;
        }
        self.infer_tokenizer.encode_fast(text, true)
    }

    /// Runs one inference on already tokenised texts.
    fn run_encoded(&self, encodings: &[Encoding], role: Use) -> Result<Vec<Vec<f32>>, EmbedError> {
        let fail = |e: &dyn std::fmt::Display| EmbedError::Inference(e.to_string());
        // Pad to the longest text of this batch (zeros: [PAD] id, mask 0, type 0).
        let rows = encodings.len();
        // The int8 graph's attention has no padding mask (`quantize::Rewritten::attentions`):
        // padded keys would be attended. `run` gives it one text per run.
        if self.int8 && rows > 1 {
            return Err(fail(&"the int8 model embeds one text per run"));
        }
        let len = encodings
            .iter()
            .map(Encoding::len)
            .max()
            .unwrap_or(0)
            .max(1);
        let mut ids = vec![0i64; rows * len];
        let mut mask = vec![0i64; rows * len];
        let mut types = vec![0i64; rows * len];
        for (r, enc) in encodings.iter().enumerate() {
            let base = r * len;
            for (j, ((&id, &m), &t)) in enc
                .get_ids()
                .iter()
                .zip(enc.get_attention_mask())
                .zip(enc.get_type_ids())
                .enumerate()
            {
                ids[base + j] = i64::from(id);
                mask[base + j] = i64::from(m);
                types[base + j] = i64::from(t);
            }
        }

        let shape = [rows, len];
        let tensor = |data: Vec<i64>| Tensor::from_array((shape, data)).map_err(|e| fail(&e));
        let mut inputs = ort::inputs! {
            self.io.input_ids.as_str() => tensor(ids)?,
            self.io.attention_mask.as_str() => tensor(mask.clone())?,
        };
        if let Some(name) = &self.io.token_type_ids {
            inputs.push((name.as_str().into(), tensor(types)?.into()));
        }

        let release = if matches!(role, Use::Release) {
            let mut options = RunOptions::new().map_err(|e| fail(&e))?;
            options
                .set("memory.enable_memory_arena_shrinkage", "cpu:0")
                .map_err(|e| fail(&e))?;
            Some(options)
        } else {
            None
        };
        let mut pooled = match role {
            Use::Query => self.pool.checkout(true),
            Use::Batch => self.pool.checkout(false),
            // Never waits: a busy session means work is not quiet after all.
            Use::Release => match self.pool.try_checkout() {
                Some(p) => p,
                None => return Ok(Vec::new()),
            },
        };
        let session = pooled.session.as_mut().expect("checked-out session");
        let outputs = match &release {
            Some(options) => session.run_with_options(inputs, options),
            None => session.run(inputs),
        }
        .map_err(|e| fail(&e))?;
        let (out_shape, hidden) = outputs[self.io.hidden.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| fail(&e))?;
        let dims: &[i64] = out_shape;
        // A malformed model's output shape is refused here, not met as an out-of-range slice
        // below (a negative dimension does not convert).
        let size = |d: i64| usize::try_from(d).ok();
        let dim = match dims {
            &[r, l, d] if size(r) == Some(rows) && size(l) == Some(len) => size(d).filter(|&d| {
                d > 0 && len.checked_mul(d).and_then(|n| n.checked_mul(rows)) == Some(hidden.len())
            }),
            _ => None,
        };
        let Some(dim) = dim else {
            return Err(EmbedError::Inference(format!(
                "output {} has shape {dims:?}, expected [{rows}, {len}, dim]",
                self.io.hidden
            )));
        };

        // Mean over the tokens the attention mask keeps (padding excluded), then unit length.
        let mut vectors = Vec::with_capacity(rows);
        for r in 0..rows {
            let mut acc = vec![0f32; dim];
            let mut count = 0f32;
            for j in 0..len {
                if mask[r * len + j] == 0 {
                    continue;
                }
                count += 1.0;
                let start = (r * len + j) * dim;
                for (a, h) in acc.iter_mut().zip(&hidden[start..start + dim]) {
                    *a += h;
                }
            }
            let count = count.max(1.0);
            for a in &mut acc {
                *a /= count;
            }
            l2_normalize(&mut acc);
            vectors.push(acc);
        }
        Ok(vectors)
    }
}

#[async_trait::async_trait]
impl Embedder for OnnxEmbedder {
    fn model(&self) -> &str {
        &self.inner.model
    }

    fn dim(&self) -> usize {
        self.inner.dim
    }

    async fn embed_query(&self, text: String) -> Result<Vec<f32>, EmbedError> {
        let permit = self
            .query_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| EmbedError::Inference(e.to_string()))?;
        let inner = self.inner.clone();
        let mut vectors = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            inner.run(&[text.as_str()], true)
        })
        .await
        .map_err(|e| EmbedError::Inference(format!("embedding task failed: {e}")))??;
        Ok(vectors.pop().unwrap_or_default())
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let texts = Arc::new(texts);
        let batches = if self.inner.int8 {
            int8_batches(texts.iter().map(String::len), self.inner.sessions)
        } else {
            // One text (a query) needs no ordering: tokenising it on another thread first
            // would add a thread hop and a second tokenisation to every RAG request.
            let order = if texts.len() == 1 {
                vec![0]
            } else {
                let (inner, texts) = (self.inner.clone(), texts.clone());
                tokio::task::spawn_blocking(move || inner.token_order(&texts))
                    .await
                    .map_err(|e| EmbedError::Inference(format!("tokenizing failed: {e}")))?
            };
            let per_batch = batch_len(texts.len(), self.inner.sessions);
            order.chunks(per_batch).map(<[usize]>::to_vec).collect()
        };
        // At most one batch per session of this request is in flight, and each batch takes
        // its own permit: the semaphore is FIFO, so a short query queued behind a large upload
        // waits for one batch, not for the whole upload.
        let results: Vec<Result<(Vec<usize>, Vec<Vec<f32>>), EmbedError>> =
            futures_util::stream::iter(batches)
                .map(|batch| {
                    let inner = self.inner.clone();
                    let permits = self.permits.clone();
                    let texts = texts.clone();
                    async move {
                        let permit = permits
                            .acquire_owned()
                            .await
                            .map_err(|e| EmbedError::Inference(e.to_string()))?;
                        tokio::task::spawn_blocking(move || {
                            // Held until the session is free again, even if the caller stops
                            // waiting (a dropped request cannot oversubscribe the pool).
                            let _permit = permit;
                            let batch_texts: Vec<&str> =
                                batch.iter().map(|&i| texts[i].as_str()).collect();
                            let vectors = inner.run(&batch_texts, false)?;
                            Ok((batch, vectors))
                        })
                        .await
                        .map_err(|e| EmbedError::Inference(format!("embedding task failed: {e}")))?
                    }
                })
                // Unordered: a session that finishes a batch takes the next at once, even
                // while an earlier batch still runs.
                .buffer_unordered(self.inner.sessions)
                .collect()
                .await;

        let mut out = vec![Vec::new(); texts.len()];
        for result in results {
            let (batch, vectors) = result?;
            for (i, v) in batch.into_iter().zip(vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The provisioned model (`scripts/fetch-model.sh`) on `sessions` sessions.
    fn real_model(sessions: usize) -> OnnxEmbedder {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        OnnxEmbedder::load(
            &root.join("all-MiniLM-L6-v2"),
            &root.join("onnxruntime/libonnxruntime.so"),
            sessions,
            "m",
        )
        .expect("run scripts/fetch-model.sh")
    }

    /// The int8 graph's fused attention has no padding mask, so a padded run would attend to
    /// padding: it is refused, and a batch is embedded text by text, each vector the same as
    /// the text's own.
    #[test]
    fn the_int8_model_embeds_one_text_per_run() {
        let e = real_model(1);
        assert!(e.inner.int8);
        let texts = ["short", "a somewhat longer text that pads the short one"];
        let encodings: Vec<Encoding> = texts
            .iter()
            .map(|t| e.inner.encode_bounded(t).unwrap())
            .collect();
        let err = e.inner.run_encoded(&encodings, Use::Batch).unwrap_err();
        assert!(err.to_string().contains("one text per run"), "{err}");
        let together = e.inner.run(&texts, false).unwrap();
        for (text, vector) in texts.iter().zip(&together) {
            assert_eq!(&e.inner.run(&[text], false).unwrap()[0], vector);
        }
    }

    #[test]
    fn length_order_is_stable_shortest_first() {
        assert_eq!(length_order([3, 1, 2, 1].into_iter()), vec![1, 3, 2, 0]);
        assert!(length_order(std::iter::empty()).is_empty());
    }

    #[test]
    fn longest_first_is_stable() {
        assert_eq!(
            longest_first([3, 1, 2, 1, 3].into_iter()),
            vec![0, 4, 2, 1, 3]
        );
        assert!(longest_first(std::iter::empty()).is_empty());
    }

    #[test]
    fn int8_batches_are_small_longest_first_and_spread() {
        let lens = [10, 50, 20, 40, 30, 60, 5, 15, 25, 35];
        assert_eq!(
            int8_batches(lens.into_iter(), 2),
            vec![vec![5, 1, 3, 9], vec![4, 8, 2, 7], vec![0, 6]]
        );
        // A two-chunk file still takes both sessions at once.
        assert_eq!(int8_batches([7, 9].into_iter(), 2), vec![vec![1], vec![0]]);
        assert_eq!(int8_batches([7].into_iter(), 2), vec![vec![0]]);
        assert!(int8_batches(std::iter::empty(), 2).is_empty());
    }

    #[test]
    fn batches_are_ordered_by_tokens_not_bytes() {
        let e = real_model(1);
        // Fewest bytes, most tokens (every character its own token) first in byte order;
        // long ordinary words are few tokens for many bytes.
        let texts = ["1 2 3 4 5 6 7 8 9", "internationalization", "a"];
        assert_eq!(length_order(texts.iter().map(|t| t.len())), vec![2, 0, 1]);
        assert_eq!(e.inner.token_order(&texts), vec![2, 1, 0]);
    }

    #[test]
    fn releasing_the_activation_arena_changes_no_vector() {
        let e = real_model(1);
        let texts: Vec<String> = (0..4)
            .map(|i| format!("text {i} ") + &"reactor coolant pressure valve ".repeat(40))
            .collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let before = e.embed_blocking(&texts).unwrap();
        // ONNX Runtime accepts the shrink request only for an arena allocator: `Ok(true)`
        // proves the sessions run on the registered arena.
        assert!(
            e.inner.release_arena().unwrap(),
            "the idle session released"
        );
        assert_eq!(e.embed_blocking(&texts).unwrap(), before);
        // With every session busy nothing waits: the release stands down.
        let busy = e.inner.pool.checkout(false);
        assert!(!e.inner.release_arena().unwrap());
        drop(busy);
        assert!(e.inner.release_arena().unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_waits_for_one_inference_not_for_a_whole_upload_batch() {
        let e = real_model(1);
        // One batch of 32 full-length texts: 16 inferences of 2 texts on the only session.
        let long: Vec<String> = (0..BATCH_SIZE)
            .map(|i| format!("chunk {i} ") + &"reactor coolant pressure valve ".repeat(80))
            .collect();
        let upload = tokio::spawn({
            let e = e.clone();
            async move { e.embed(long).await }
        });
        // Let the upload take the session first (if it has not, the query simply goes first).
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let q = e
            .embed_query("backup reactor pressure".into())
            .await
            .unwrap();
        assert!(
            !upload.is_finished(),
            "the query was served after the whole upload batch"
        );
        assert_eq!(q.len(), e.dim());
        let alone = e
            .embed(vec!["backup reactor pressure".into()])
            .await
            .unwrap();
        let cos: f32 = q.iter().zip(&alone[0]).map(|(a, b)| a * b).sum();
        assert!(
            cos > 0.9999,
            "the query lane embeds like the batch lane: {cos}"
        );
        assert_eq!(upload.await.unwrap().unwrap().len(), BATCH_SIZE);
    }

    #[test]
    fn a_small_request_is_spread_over_every_session() {
        assert_eq!(batch_len(2, 2), 1);
        assert_eq!(batch_len(3, 2), 2);
        assert_eq!(batch_len(5, 4), 2);
        assert_eq!(batch_len(1, 8), 1);
        assert_eq!(batch_len(64, 2), BATCH_SIZE);
        assert_eq!(batch_len(1000, 1), BATCH_SIZE);
        assert_eq!(batch_len(7, 0), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_two_chunk_file_takes_both_sessions_at_once() {
        let e = real_model(2);
        let texts: Vec<String> = (0..2)
            .map(|i| format!("chunk {i} ") + &"reactor coolant pressure valve ".repeat(60))
            .collect();
        // Both sessions checked out by this one request at some moment: watched from the
        // pool, whose idle list empties only when two inferences run together.
        let watch = {
            let inner = e.inner.clone();
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while std::time::Instant::now() < deadline {
                    if inner.pool.lock().is_empty() {
                        return true;
                    }
                    std::thread::yield_now();
                }
                false
            })
        };
        for _ in 0..20 {
            let v = e.embed(texts.clone()).await.unwrap();
            assert_eq!(v.len(), 2);
            if watch.is_finished() {
                break;
            }
        }
        assert!(watch.join().unwrap(), "the two chunks never ran at once");
    }

    #[test]
    fn shape_groups_bound_rows_times_longest_squared() {
        let groups = |lens: &[usize], cells| shape_groups(lens.iter().copied(), cells);
        assert!(groups(&[], 100).is_empty());
        // 4 × 5² = 100 fits; a fifth row does not.
        assert_eq!(groups(&[5, 5, 5, 5, 5], 100), vec![0..4, 4..5]);
        // A longer text narrows the group it joins: 2 × 7² ≤ 100 but 3 × 7² is not.
        assert_eq!(groups(&[1, 7, 2, 3], 100), vec![0..2, 2..4]);
        // A text wider than the bound alone still runs, alone.
        assert_eq!(groups(&[3, 20, 3], 100), vec![0..1, 1..2, 2..3]);
        // The real bound: 32 texts of 64 tokens stay one batch, 32 of 256 become 16 runs.
        assert_eq!(groups(&[64; 32], MAX_BATCH_CELLS), vec![0..32]);
        let full = groups(&[MAX_TOKENS; 32], MAX_BATCH_CELLS);
        assert_eq!(full.len(), 16);
        assert!(
            full.iter()
                .all(|g| g.len() * MAX_TOKENS * MAX_TOKENS <= MAX_BATCH_CELLS)
        );
    }

    #[test]
    fn missing_files_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = OnnxEmbedder::load(
            dir.path(),
            Path::new("/nonexistent/libonnxruntime.so"),
            1,
            "m",
        )
        .unwrap_err();
        assert!(matches!(err, EmbedError::ModelMissing(_)), "{err}");
        assert!(err.to_string().contains("scripts/fetch-model.sh"), "{err}");

        std::fs::write(dir.path().join("model.onnx"), b"x").unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), b"{}").unwrap();
        let err = OnnxEmbedder::load(
            dir.path(),
            Path::new("/nonexistent/libonnxruntime.so"),
            1,
            "m",
        )
        .unwrap_err();
        assert!(matches!(err, EmbedError::RuntimeMissing(_)), "{err}");
        assert!(err.to_string().contains("ORT_DYLIB_PATH"), "{err}");
    }
}
