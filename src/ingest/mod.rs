//! Ingestion: uploaded file → extracted text → chunks → embeddings → redb + vector index.
//!
//! The queue is redb's `queue` table, so it survives restarts: a file still queued at
//! start-up is processed again. Workers are woken through a `Notify` and bounded by a
//! semaphore sized from the configuration. A file's chunks, vectors, text and final status
//! are committed in one transaction; the in-memory index is updated only after that commit,
//! so a crash can never leave a file half indexed.

pub mod vectors;

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore, watch};

use crate::chunk::{self, ChunkConfig, Splitter};
use crate::config::{Config, EmbeddingEngine};
use crate::embed::Embedder;
use crate::store::{ChunkRecord, EmbeddingInfo, FileRecord, FileStatus, Store, now_secs};
use vectors::VectorStore;

/// Why a file gives no content (yet).
#[derive(Debug)]
pub enum NotUsable {
    /// Deleted while waiting.
    Gone,
    /// Still pending after the wait.
    StillProcessing,
    /// Processing failed, with the file's error.
    Failed(String),
    /// Uploaded with `process=false`.
    NotProcessed,
    Store(crate::store::StoreError),
}

/// Longest client-chosen part of a blob's file name, in bytes (names are limited to 255).
const BLOB_NAME_MAX: usize = 128;

/// A content type for a file extension, for uploads that send none (or a generic one).
pub fn content_type_for(ext: &str) -> &'static str {
    match ext {
        "pdf" => "application/pdf",
        "txt" | "log" | "rst" => "text/plain",
        "md" | "markdown" => "text/markdown",
        "html" | "htm" => "text/html",
        "csv" => "text/csv",
        "json" => "application/json",
        "xml" => "application/xml",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        _ => "application/octet-stream",
    }
}

/// The ingestion service, shared by handlers, workers and the CLI.
pub struct Ingest {
    pub store: Arc<Store>,
    pub vectors: Arc<VectorStore>,
    /// `Err` holds why no embedder is available (e.g. the ONNX model is not provisioned):
    /// files then fail with that message instead of the gateway refusing to start.
    pub embedder: Result<Arc<dyn Embedder>, String>,
    pub engine: EmbeddingEngine,
    pub chunking: ChunkConfig,
    /// Inflation limits and process isolation of text extraction.
    pub extraction: crate::extract::isolate::Options,
    pub upload_dir: PathBuf,
    pub workers: usize,
    /// Bumped on every status change; status streams and waiters watch it.
    status: watch::Sender<u64>,
    wake: Notify,
    /// Files being processed right now (by a worker or inline).
    running: Mutex<HashSet<String>>,
    permits: Arc<Semaphore>,
    /// Uploads with `process_in_background=false` waiting for their own result.
    inline_waiting: AtomicUsize,
    /// Most such uploads at once (`rag.inline-queue`).
    pub inline_queue: usize,
    /// Embed and index each chunk with its document's title (`rag.title-in-chunks`).
    pub title_in_chunks: bool,
}

/// Longest an inline upload (`process_in_background=false`) waits for its file: after that
/// it answers with the status as it is (still pending) and the worker finishes later.
const INLINE_WAIT: Duration = Duration::from_mins(10);

/// A place among the uploads waiting for inline processing; released on drop.
pub struct InlineTicket<'a>(&'a Ingest);

impl Drop for InlineTicket<'_> {
    fn drop(&mut self) {
        self.0.inline_waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Removes a file from `running` when processing ends, however it ends.
struct Running<'a>(&'a Ingest, String);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.lock().expect("running lock").remove(&self.1);
        self.0.bump();
    }
}

impl Ingest {
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        embedder: Result<Arc<dyn Embedder>, String>,
        tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    ) -> Ingest {
        let rag = &config.rag;
        let splitter = match (rag.token_splitter, tokenizer) {
            (true, Some(t)) => Splitter::Token(t),
            (true, None) => {
                tracing::warn!("token text splitter needs the ONNX tokenizer; using characters");
                Splitter::Character
            }
            _ => Splitter::Character,
        };
        let (status, _) = watch::channel(0);
        Ingest {
            store,
            vectors: Arc::new(VectorStore::new(
                rag.hnsw_threshold,
                rag.vector_index,
                Some(config.data_dir.join("index")),
            )),
            embedder,
            engine: config.embedding.engine,
            chunking: ChunkConfig {
                size: rag.chunk_size,
                overlap: rag.chunk_overlap,
                markdown_headers: rag.markdown_headers,
                splitter,
            },
            extraction: rag.extraction.clone(),
            upload_dir: config.data_dir.join("uploads"),
            workers: rag.workers,
            status,
            wake: Notify::new(),
            running: Mutex::new(HashSet::new()),
            permits: Arc::new(Semaphore::new(rag.workers)),
            inline_waiting: AtomicUsize::new(0),
            inline_queue: rag.inline_queue,
            title_in_chunks: rag.title_in_chunks,
        }
    }

    /// Loads the vector index from redb and re-queues files embedded with another model
    /// (a collection must never mix models).
    pub fn start_up(&self) -> crate::store::Result<()> {
        let n = self.vectors.load(&self.store)?;
        tracing::info!(vectors = n, "vector index loaded");
        if let Ok(e) = &self.embedder {
            for mut f in self.store.files()? {
                let stale = f.status == Some(FileStatus::Completed)
                    && f.embedding.as_ref().is_some_and(|i| i.model != e.model());
                if stale {
                    tracing::info!(file = %f.id, "embedding model changed; re-embedding");
                    // Its old vectors leave every index now: a collection never mixes
                    // models, and the file is searchable again once re-embedded.
                    let ids = self.store.file_chunk_ids(&f.id)?;
                    let kbs = self.store.file_knowledge(&f.id)?;
                    self.vectors.remove_file(&f.id, &ids, &kbs);
                    f.status = Some(FileStatus::Pending);
                    self.store.requeue_file(&f)?;
                }
            }
        }
        Ok(())
    }

    fn bump(&self) {
        self.status.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever any file's status changes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.status.subscribe()
    }

    /// Wakes the workers (after an upload).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Stops picking queued files (the database goes to a new process at an upgrade). Files
    /// being processed stay queued, so the process that owns the database next takes them.
    pub fn stop(&self) {
        self.permits.close();
        self.wake.notify_one();
    }

    /// Worker loop: runs until the process stops or [`Ingest::stop`]. Picks queued files
    /// that nobody is processing, at most `workers` at a time.
    pub async fn run_workers(self: Arc<Self>) {
        loop {
            if self.permits.is_closed() {
                return;
            }
            let queued = match self.store.queued_files() {
                Ok(q) => q,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the processing queue");
                    Vec::new()
                }
            };
            for id in queued {
                let Ok(permit) = self.permits.clone().acquire_owned().await else {
                    return;
                };
                // Claim before spawning so the next scan does not start it twice.
                if !self
                    .running
                    .lock()
                    .expect("running lock")
                    .insert(id.clone())
                {
                    continue;
                }
                let me = self.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    // A panic anywhere in the pipeline (an embedder, a parser) would
                    // otherwise leave the file pending and queued: retried for ever, its
                    // status never recorded.
                    let run = AssertUnwindSafe(me.process_claimed(&id))
                        .catch_unwind()
                        .await;
                    if run.is_err() {
                        me.fail_after_panic(&id);
                    }
                });
            }
            // Wake on a new upload, or re-scan periodically as a safety net.
            let _ = tokio::time::timeout(Duration::from_secs(5), self.wake.notified()).await;
        }
    }

    /// A place among the inline uploads, or `None` when `inline_queue` are already waiting.
    /// Taken before the body is read, so a refused upload stores nothing.
    pub fn inline_ticket(&self) -> Option<InlineTicket<'_>> {
        self.inline_waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.inline_queue).then_some(n + 1)
            })
            .ok()
            .map(|_| InlineTicket(self))
    }

    /// Inline processing of a queued upload: the file goes through the same worker pool as
    /// background uploads (so at most `workers` files are processed at once, however many
    /// clients ask for inline processing) and the caller waits for its result.
    pub async fn process_inline(&self, _ticket: &InlineTicket<'_>, id: &str) -> Option<FileRecord> {
        self.notify();
        self.wait_done(id, INLINE_WAIT).await
    }

    /// Whether a worker (or an inline call) is processing the file right now.
    pub fn is_running(&self, id: &str) -> bool {
        self.running.lock().expect("running lock").contains(id)
    }

    /// Processes a file now (inline upload or a worker). Returns the final record; when
    /// another task is already processing it, waits for that one instead.
    pub async fn process(&self, id: &str) -> Option<FileRecord> {
        let claimed = self
            .running
            .lock()
            .expect("running lock")
            .insert(id.to_string());
        if !claimed {
            return self.wait_done(id, Duration::from_secs(24 * 3600)).await;
        }
        self.process_claimed(id).await
    }

    /// Processes a file already marked as running by the caller.
    async fn process_claimed(&self, id: &str) -> Option<FileRecord> {
        let _running = Running(self, id.to_string());
        let file = match self.store.file(id) {
            Ok(Some(f)) => f,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(file = id, error = %e, "cannot read file record");
                return None;
            }
        };
        if file.status != Some(FileStatus::Pending) {
            return Some(file);
        }
        let started = std::time::Instant::now();
        let result = self.pipeline(&file).await;
        let mut file = file;
        file.updated_at = now_secs();
        match result {
            Ok((text, chunks, vecs, info, title)) => {
                file.status = Some(FileStatus::Completed);
                file.error = None;
                file.hash = Some(hex::encode(Sha256::digest(text.as_bytes())));
                file.embedding = Some(info);
                file.chunk_count = chunks.len();
                file.meta["collection_name"] = serde_json::json!(format!("file-{}", file.id));
                let terms: Vec<String> = chunks
                    .iter()
                    .map(|c| {
                        let indexed = chunk::Title::apply(title.as_ref(), &c.text);
                        serde_json::to_string(&crate::rag::bm25::TermCounts::of(&indexed))
                            .expect("json")
                    })
                    .collect();
                let chunk_count = chunks.len();
                let committed = self
                    .commit_off_runtime(&file, text, chunks, vecs, terms)
                    .await;
                if let Err(e) = committed {
                    tracing::error!(file = %file.id, error = %e, "cannot store processed file");
                    file.status = Some(FileStatus::Failed);
                    file.error = Some(format!("storage error: {e}"));
                    file.hash = None;
                    let _ = self.store.fail_file(&file);
                } else {
                    tracing::info!(file = %file.id, chunks = chunk_count, secs = started.elapsed().as_secs_f64(), "file processed");
                    self.auto_link(&file);
                }
            }
            Err(msg) => {
                tracing::warn!(file = %file.id, error = %msg, "file processing failed");
                file.status = Some(FileStatus::Failed);
                file.error = Some(msg);
                file.hash = None;
                match self.store.fail_file(&file) {
                    Ok(removed) => {
                        let kbs = self.store.file_knowledge(&file.id).unwrap_or_default();
                        self.vectors.remove_file(&file.id, &removed, &kbs);
                    }
                    Err(e) => tracing::error!(file = %file.id, error = %e, "cannot record failure"),
                }
            }
        }
        Some(file)
    }

    /// Records a file whose processing panicked as failed (and off the queue).
    fn fail_after_panic(&self, id: &str) {
        tracing::error!(file = id, "file processing panicked");
        if let Ok(Some(mut f)) = self.store.file(id)
            && f.status == Some(FileStatus::Pending)
        {
            f.status = Some(FileStatus::Failed);
            f.error = Some("internal error while processing the file".into());
            f.hash = None;
            f.updated_at = now_secs();
            match self.store.fail_file(&f) {
                Ok(removed) => {
                    let kbs = self.store.file_knowledge(id).unwrap_or_default();
                    self.vectors.remove_file(id, &removed, &kbs);
                }
                Err(e) => tracing::error!(file = id, error = %e, "cannot record failure"),
            }
        }
        self.bump();
    }

    /// [`commit`] on the blocking pool: indexing a large file and the database's fsync take
    /// long enough to stall the runtime threads that serve requests and drive the other
    /// files' embedding batches.
    async fn commit_off_runtime(
        &self,
        file: &FileRecord,
        text: String,
        chunks: Vec<ChunkRecord>,
        vecs: Vec<Vec<f32>>,
        terms: Vec<String>,
    ) -> Result<(), String> {
        let (store, vectors, file) = (self.store.clone(), self.vectors.clone(), file.clone());
        tokio::task::spawn_blocking(move || {
            commit(&store, &vectors, &file, &text, &chunks, &vecs, &terms)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("commit task failed: {e}"))?
    }

    /// Open WebUI adds a processed upload to the collection named in its metadata
    /// (`knowledge_id`) when the uploader may write to it.
    fn auto_link(&self, file: &FileRecord) {
        let Some(kb_id) = file.meta["data"]["knowledge_id"].as_str() else {
            return;
        };
        let (Ok(Some(kb)), Ok(Some(user))) = (
            self.store.knowledge(kb_id),
            self.store.user_by_id(&file.user_id),
        ) else {
            return;
        };
        if !crate::auth::access::can_write_kb(&user, &kb) {
            tracing::info!(file = %file.id, knowledge = kb_id, "no write access; not added");
            return;
        }
        match crate::library::Library::new(&self.store, &self.vectors).add_file(kb_id, file) {
            Ok(crate::library::Added::Duplicate) => {
                tracing::info!(file = %file.id, knowledge = kb_id, "duplicate content; not added");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(file = %file.id, knowledge = kb_id, error = %e, "store failure; not added");
            }
        }
    }

    /// Extract → chunk → embed. Any error is a message for the file's `error` field.
    async fn pipeline(
        &self,
        file: &FileRecord,
    ) -> Result<
        (
            String,
            Vec<ChunkRecord>,
            Vec<Vec<f32>>,
            EmbeddingInfo,
            Option<chunk::Title>,
        ),
        String,
    > {
        let embedder = self.embedder.clone()?;
        let path = PathBuf::from(&file.path);
        let name = file.filename.clone();
        let content_type = file.meta["content_type"].as_str().map(String::from);
        let cfg = self.chunking.clone();
        let options = self.extraction.clone();
        let timeout = options.timeout;
        let titles = self.title_in_chunks;
        // With an extractor binary the child is killed at the timeout and this thread returns
        // with it; in process, a stuck parser keeps its thread, but the file fails and the
        // worker moves on (the extra second lets the child's own timeout answer first).
        let work = tokio::task::spawn_blocking(move || {
            let doc = crate::extract::isolate::extract_file(
                &path,
                &name,
                content_type.as_deref(),
                &options,
            )?;
            let text = doc.full_text();
            let chunks = chunk::split(&doc, &cfg);
            let title = titles.then(|| chunk::Title::of(&doc, &name)).flatten();
            Ok::<_, String>((text, chunks, title))
        });
        let (text, chunks, title) = tokio::time::timeout(timeout + Duration::from_secs(1), work)
            .await
            .map_err(|_| format!("text extraction took longer than {}s", timeout.as_secs()))?
            .map_err(|_| "text extraction crashed".to_string())??;
        if chunks.is_empty() {
            return Err("the file contains no text".into());
        }
        // Open WebUI embeds chunk text with newlines replaced by spaces.
        let inputs: Vec<String> = chunks
            .iter()
            .map(|c| chunk::Title::apply(title.as_ref(), &c.text).replace('\n', " "))
            .collect();
        let vecs = embedder.embed(inputs).await.map_err(|e| e.to_string())?;
        if vecs.len() != chunks.len() {
            return Err(format!(
                "the embedding engine returned {} vectors for {} chunks",
                vecs.len(),
                chunks.len()
            ));
        }
        let records = chunks
            .into_iter()
            .enumerate()
            .map(|(index, c)| ChunkRecord {
                file_id: file.id.clone(),
                index,
                text: c.text,
                start_index: c.start_index,
                page: c.page,
                headers: c.headers,
            })
            .collect();
        let info = EmbeddingInfo {
            engine: self.engine.as_str().to_string(),
            model: embedder.model().to_string(),
            dim: embedder.dim(),
        };
        Ok((text, records, vecs, info, title))
    }

    /// Waits until the file is no longer pending (or gone), at most `limit`.
    pub async fn wait_done(&self, id: &str, limit: Duration) -> Option<FileRecord> {
        let mut rx = self.watch();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let f = self.store.file(id).ok().flatten()?;
            let running = self.running.lock().expect("running lock").contains(id);
            if f.status != Some(FileStatus::Pending) && !running {
                return Some(f);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Some(f),
                Err(_) => return Some(f),
            }
        }
    }

    /// `file` once processed, waiting at most `wait` for one still pending: the check that
    /// chat retrieval and adding to a collection share (each words the refusal its way).
    ///
    /// # Errors
    /// Why the file gives no content; a failing store is [`NotUsable::Store`].
    pub async fn processed(
        &self,
        file: FileRecord,
        wait: Duration,
    ) -> Result<FileRecord, NotUsable> {
        let file = if file.status == Some(FileStatus::Pending) {
            match self.wait_done(&file.id, wait).await {
                Some(f) => f,
                // `wait_done` reads no failure: ask again so a failing store is not "gone".
                None => match self.store.file(&file.id) {
                    Err(e) => return Err(NotUsable::Store(e)),
                    Ok(_) => return Err(NotUsable::Gone),
                },
            }
        } else {
            file
        };
        match file.status {
            Some(FileStatus::Completed) => Ok(file),
            Some(FileStatus::Pending) => Err(NotUsable::StillProcessing),
            Some(FileStatus::Failed) => Err(NotUsable::Failed(
                file.error.unwrap_or_else(|| "unknown error".into()),
            )),
            None => Err(NotUsable::NotProcessed),
        }
    }

    /// Stores an uploaded file's blob path for `id` and `filename`: `{uuid}_{basename}` under
    /// the upload dir, as Open WebUI names them. The name part is only a hint for humans
    /// looking at the directory (the id makes it unique): separators and control characters
    /// become `_` and it is cut to [`BLOB_NAME_MAX`] bytes, so no client-chosen name can
    /// leave the directory or exceed the file system's name limit.
    pub fn blob_path(&self, id: &str, filename: &str) -> PathBuf {
        let base = Path::new(filename)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let mut safe = String::new();
        for c in base.chars() {
            let c = if c.is_control() || c == '/' || c == '\\' {
                '_'
            } else {
                c
            };
            if safe.len() + c.len_utf8() > BLOB_NAME_MAX {
                break;
            }
            safe.push(c);
        }
        self.upload_dir.join(format!("{id}_{safe}"))
    }
}

/// Makes the chunks searchable in memory first, then commits: once the database says
/// "completed", every chunk can already be found. On failure the memory is rolled back.
fn commit(
    store: &Store,
    vectors: &VectorStore,
    file: &FileRecord,
    text: &str,
    chunks: &[ChunkRecord],
    vecs: &[Vec<f32>],
    terms: &[String],
) -> crate::store::Result<()> {
    let ids = store.reserve_chunk_ids(chunks.len())?;
    let old = store.file_chunk_ids(&file.id)?;
    let kbs = store.file_knowledge(&file.id)?;
    vectors.put_file(&file.id, &ids, vecs, terms);
    vectors.refresh_in_collections(&file.id, &old, &kbs);
    match store.complete_file(file, text, &ids, chunks, vecs, terms) {
        Ok(_) => Ok(()),
        Err(e) => {
            vectors.remove_file(&file.id, &ids, &kbs);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct PanickingEmbedder;

    #[async_trait::async_trait]
    impl Embedder for PanickingEmbedder {
        fn model(&self) -> &'static str {
            "panics"
        }
        fn dim(&self) -> usize {
            4
        }
        async fn embed(
            &self,
            _texts: Vec<String>,
        ) -> Result<Vec<Vec<f32>>, crate::embed::EmbedError> {
            panic!("embedder bug");
        }
    }

    fn record(id: &str, path: &Path) -> FileRecord {
        FileRecord {
            id: id.into(),
            user_id: "u".into(),
            filename: "a.txt".into(),
            path: path.display().to_string(),
            hash: None,
            status: Some(FileStatus::Pending),
            error: None,
            meta: serde_json::json!({"content_type": "text/plain"}),
            embedding: None,
            chunk_count: 0,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_pipeline_fails_the_file_instead_of_leaving_it_queued() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::build(
            crate::config::file::FileConfig::default(),
            &std::collections::HashMap::<String, String>::new(),
            &crate::config::Overrides::default(),
        )
        .unwrap();
        config.data_dir = dir.path().to_path_buf();
        let store = Arc::new(Store::open(&dir.path().join("t.redb")).unwrap());
        let ingest = Arc::new(Ingest::new(
            &config,
            store.clone(),
            Ok(Arc::new(PanickingEmbedder)),
            None,
        ));
        let blob = dir.path().join("a.txt");
        std::fs::write(&blob, "some text to embed").unwrap();
        store.insert_file(&record("f1", &blob), true).unwrap();
        tokio::spawn(ingest.clone().run_workers());
        let f = ingest
            .wait_done("f1", Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(f.status, Some(FileStatus::Failed), "{f:?}");
        assert!(f.error.unwrap().contains("internal error"));
        assert!(store.queued_files().unwrap().is_empty(), "off the queue");
        // The pool is still usable: its permit came back.
        store.insert_file(&record("f2", &blob), true).unwrap();
        ingest.notify();
        let f = ingest
            .wait_done("f2", Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(f.status, Some(FileStatus::Failed));
    }

    /// Counts embedding calls in flight (one per file) and remembers the most at once.
    struct CountingEmbedder {
        now: AtomicUsize,
        most: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Embedder for CountingEmbedder {
        fn model(&self) -> &'static str {
            "counting"
        }
        fn dim(&self) -> usize {
            4
        }
        async fn embed(
            &self,
            texts: Vec<String>,
        ) -> Result<Vec<Vec<f32>>, crate::embed::EmbedError> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            // Stays in flight until the pool is full (or a while has passed), so the most
            // seen at once does not depend on how fast extraction is on a busy machine.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while self.now.load(Ordering::SeqCst) < 3 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.most
                .fetch_max(self.now.load(Ordering::SeqCst), Ordering::SeqCst);
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(texts.iter().map(|_| vec![0.5; 4]).collect())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_workers_files_are_processed_at_once_and_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::build(
            crate::config::file::FileConfig::default(),
            &std::collections::HashMap::<String, String>::new(),
            &crate::config::Overrides::default(),
        )
        .unwrap();
        config.data_dir = dir.path().to_path_buf();
        config.rag.workers = 3;
        let store = Arc::new(Store::open(&dir.path().join("t.redb")).unwrap());
        let embedder = Arc::new(CountingEmbedder {
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        let ingest = Arc::new(Ingest::new(
            &config,
            store.clone(),
            Ok(embedder.clone()),
            None,
        ));
        let blob = dir.path().join("a.txt");
        std::fs::write(&blob, "some text to embed").unwrap();
        let ids: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
        for id in &ids {
            store.insert_file(&record(id, &blob), true).unwrap();
        }
        tokio::spawn(ingest.clone().run_workers());
        for id in &ids {
            let f = ingest
                .wait_done(id, Duration::from_secs(120))
                .await
                .unwrap();
            assert_eq!(f.status, Some(FileStatus::Completed), "{f:?}");
            assert_eq!(f.chunk_count, 1);
        }
        assert!(store.queued_files().unwrap().is_empty());
        // Twelve files on three workers: the pool fills up, and never beyond.
        assert_eq!(embedder.most.load(Ordering::SeqCst), 3);
    }
}
