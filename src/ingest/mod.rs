//! Ingestion: uploaded file → extracted text → chunks → embeddings → the storage backend.
//!
//! Everything goes through the storage seams ([`Storage`]). The queue is the backend's
//! [`WorkQueue`](crate::storage::WorkQueue), shared by every replica on PostgreSQL: a worker
//! claims a file with a lease and renews it while it works, so the file of a worker that died
//! is claimed again once its lease runs out. A file's chunks, vectors, text and final status
//! are committed at once ([`Chunks::complete_file`](crate::storage::Chunks::complete_file)),
//! so a crash never leaves it half indexed. Every status change is published as
//! [`Signal::FileStatus`]: waiters (chat, knowledge add, inline uploads) on any replica wake
//! at once and workers wake on new work; both also re-read the store on a bounded tick, so a
//! lost signal costs latency, never a hang. Storage failures met in the background are
//! logged, counted (`ragway_ingest_storage_errors_total`) and retried, and a file that keeps
//! failing is recorded as failed: no file stays `pending` with nobody working on it.

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, Semaphore, broadcast, watch};

use crate::chunk::{self, ChunkConfig, Splitter};
use crate::config::{Config, EmbeddingEngine};
use crate::embed::Embedder;
use crate::storage::{Job, Retry, Signal, Storage, StorageError};
use crate::store::{ChunkRecord, EmbeddingInfo, FileRecord, FileStatus, now_secs};

/// Failures of the ingestion service: the storage backend's (converted to the HTTP error in
/// `handlers::errors`). A file's own problems are not errors here: they end up in its record.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Storage(#[from] StorageError),
}

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
    Store(IngestError),
}

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

/// How the queue is worked.
#[derive(Debug, Clone, Copy)]
pub struct QueueTiming {
    /// How long a claim holds a file without a heartbeat; a third of it between heartbeats.
    /// After a worker dies, its file waits this long before another worker takes it.
    pub lease: Duration,
    /// Longest an idle worker waits before looking at the queue again: another replica's
    /// crash frees a lease without any signal.
    pub poll: Duration,
    /// Claims of one file (storage failures and dead workers included) before it is
    /// recorded as failed.
    pub max_attempts: u32,
}

impl Default for QueueTiming {
    fn default() -> Self {
        QueueTiming {
            lease: Duration::from_mins(1),
            poll: Duration::from_secs(5),
            max_attempts: 3,
        }
    }
}

/// Longest a waiter trusts signals alone before reading the store again.
const WAIT_TICK: Duration = Duration::from_secs(2);

/// How long [`Ingest::process`] waits for a file another worker is processing.
const PROCESS_WAIT: Duration = Duration::from_secs(24 * 3600);

/// The ingestion service, shared by handlers, workers and the CLI.
pub struct Ingest {
    storage: Storage,
    /// `Err` holds why no embedder is available (e.g. the ONNX model is not provisioned):
    /// files then fail with that message instead of the gateway refusing to start.
    pub embedder: Result<Arc<dyn Embedder>, String>,
    pub engine: EmbeddingEngine,
    pub chunking: ChunkConfig,
    /// Inflation limits and process isolation of text extraction.
    pub extraction: crate::extract::isolate::Options,
    /// Where uploads are received and blobs named (and scratch files of extraction go).
    pub upload_dir: PathBuf,
    pub workers: usize,
    pub timing: QueueTiming,
    /// Bumped on every local status change; status streams and waiters watch it.
    status: watch::Sender<u64>,
    wake: Notify,
    /// Files being processed by this process right now (by a worker or inline).
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
        self.0
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.1);
        self.0.bump();
    }
}

/// Why processing a leased job ended without a record.
enum Stop {
    /// A storage failure with attempts left: the job goes back to the queue.
    Requeue(IngestError),
    /// Anything else: the job stays leased until its lease runs out.
    Error(IngestError),
}

impl From<IngestError> for Stop {
    fn from(e: IngestError) -> Self {
        Stop::Error(e)
    }
}

/// Where a file's bytes are read from.
enum Source {
    /// A blob the backend keeps as a local file: read (or handed to the extractor) in place.
    Path(PathBuf),
    /// A blob fetched from the backend.
    Bytes(Vec<u8>),
}

/// A file extracted, chunked and embedded, ready to commit; the seconds each step took go
/// into the "file processed" log line, which tells an operator where a slow file's time went.
struct Processed {
    text: String,
    chunks: Vec<ChunkRecord>,
    vecs: Vec<Vec<f32>>,
    info: EmbeddingInfo,
    /// Reading, extraction and chunking.
    extract_secs: f64,
    embed_secs: f64,
}

/// What a processing attempt ended with, when not with a result.
enum Failure {
    /// The file's own problem (or the embedding engine's): recorded in the file.
    File(String),
    /// The storage backend failed: retried.
    Storage(&'static str, StorageError),
}

/// Logs and counts a storage failure nobody else will see.
fn storage_failure(op: &'static str, file: Option<&str>, e: &dyn std::fmt::Display) {
    tracing::error!(op, file, error = %e, "ingestion: storage failure");
    crate::metrics::ingest_storage_error(op);
}

impl Ingest {
    pub fn new(
        config: &Config,
        storage: Storage,
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
            storage,
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
            timing: QueueTiming {
                lease: rag.ingest_lease,
                // An idle worker looks again at least once per lease, so that a crashed
                // replica's file is taken over soon after its lease runs out.
                poll: QueueTiming::default().poll.min(rag.ingest_lease),
                ..QueueTiming::default()
            },
            status,
            wake: Notify::new(),
            running: Mutex::new(HashSet::new()),
            permits: Arc::new(Semaphore::new(rag.workers)),
            inline_waiting: AtomicUsize::new(0),
            inline_queue: rag.inline_queue,
            title_in_chunks: rag.title_in_chunks,
        }
    }

    /// Puts files back in the queue that must be processed (again): files embedded with
    /// another model (a collection must never mix models), and pending files that are not
    /// queued (a crash between storing a record and queueing it).
    ///
    /// # Errors
    /// The storage backend failed.
    pub async fn recover(&self) -> Result<(), IngestError> {
        let model = self.embedder.as_ref().ok().map(|e| e.model());
        for mut f in self.storage.meta.files().await? {
            let stale = model.is_some_and(|m| {
                f.status == Some(FileStatus::Completed)
                    && f.embedding.as_ref().is_some_and(|i| i.model != m)
            });
            if stale {
                tracing::info!(file = %f.id, "embedding model changed; re-embedding");
                // Its old vectors leave every index now: a collection never mixes models,
                // and the file is searchable again once re-embedded. A crash before the
                // enqueue leaves it pending and unqueued, which the next start re-queues.
                f.status = Some(FileStatus::Pending);
                f.updated_at = now_secs();
                self.storage.chunks.fail_file(&f).await?;
                self.storage.queue.enqueue(&f.id).await?;
            } else if f.status == Some(FileStatus::Pending)
                && !self.storage.queue.is_queued(&f.id).await?
            {
                tracing::warn!(file = %f.id, "pending file was not queued; queueing it");
                self.storage.queue.enqueue(&f.id).await?;
            }
        }
        Ok(())
    }

    /// Stores a new file record and queues it (the caller has stored its blob), then wakes
    /// the workers of every replica.
    ///
    /// # Errors
    /// The storage backend failed (the record may exist unqueued: [`Ingest::recover`]
    /// queues it at the next start).
    pub async fn submit(&self, file: &FileRecord) -> Result<(), IngestError> {
        self.storage.meta.insert_file(file).await?;
        if file.status == Some(FileStatus::Pending) {
            self.storage.queue.enqueue(&file.id).await?;
            self.publish(file).await;
        }
        Ok(())
    }

    fn bump(&self) {
        self.status.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever a file's status changes in this process.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.status.subscribe()
    }

    /// Wakes this process's workers (after an upload).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Tells every replica (this one included) that a file's status changed. A signal that
    /// cannot be sent costs waiters at most a [`WAIT_TICK`]: logged, not fatal.
    async fn publish(&self, file: &FileRecord) {
        let Some(status) = file.status else {
            return;
        };
        let signal = Signal::FileStatus {
            id: file.id.clone(),
            status,
        };
        if let Err(e) = self.storage.signals.publish(&signal).await {
            storage_failure("publish status", Some(&file.id), &e);
        }
    }

    /// Stops picking queued files (the database goes to a new process at an upgrade). Files
    /// being processed stay queued, so the process that owns the database next takes them.
    pub fn stop(&self) {
        self.permits.close();
        self.wake.notify_one();
    }

    /// Worker loop: runs until the process stops or [`Ingest::stop`]. Claims queued files,
    /// at most `workers` at a time; idles until woken (an upload here, a signal from another
    /// replica) or for at most [`QueueTiming::poll`].
    pub async fn run_workers(self: Arc<Self>) {
        let mut signals = self.storage.signals.subscribe();
        if let Err(e) = self.recover().await {
            storage_failure("recover queue", None, &e);
        }
        loop {
            if self.permits.is_closed() {
                return;
            }
            // A slot first, then a claim: no lease is held by a file waiting for a worker.
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                return;
            };
            match self.storage.queue.claim(self.timing.lease).await {
                Ok(Some(job)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        // Failures are logged where they happen; nobody waits on this one.
                        let _ = me.run_job(job).await;
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => storage_failure("claim", None, &e),
            }
            drop(permit);
            self.idle(&mut signals).await;
        }
    }

    /// Waits for a reason to look at the queue again.
    async fn idle(&self, signals: &mut broadcast::Receiver<Signal>) {
        let tick = tokio::time::sleep(self.timing.poll);
        tokio::pin!(tick);
        let mut open = true;
        loop {
            tokio::select! {
                () = self.wake.notified() => return,
                () = &mut tick => return,
                s = signals.recv(), if open => match s {
                    // New work (anywhere), or signals were missed: look.
                    Ok(Signal::FileStatus { status: FileStatus::Pending, .. })
                    | Err(RecvError::Lagged(_)) => return,
                    Ok(_) => {}
                    Err(RecvError::Closed) => open = false,
                },
            }
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
    /// clients ask for inline processing) and the caller waits for its result. `None` when
    /// the file is gone, or when the wait failed on storage (logged and counted; the caller
    /// answers with the record it has, still pending, and the worker finishes later).
    pub async fn process_inline(&self, _ticket: &InlineTicket<'_>, id: &str) -> Option<FileRecord> {
        self.notify();
        match self.wait_done(id, INLINE_WAIT).await {
            Ok(f) => f,
            Err(e) => {
                storage_failure("wait for an inline upload", Some(id), &e);
                None
            }
        }
    }

    /// Whether a worker (or an inline call) of this process is processing the file now.
    pub fn is_running(&self, id: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(id)
    }

    /// Processes a queued file now (the CLI). Returns the final record; when another worker
    /// holds the file, waits for it instead. A file that is not queued is returned as it is.
    ///
    /// # Errors
    /// The storage backend failed.
    pub async fn process(&self, id: &str) -> Result<Option<FileRecord>, IngestError> {
        if !self.is_running(id)
            && let Some(job) = self.storage.queue.claim_file(id, self.timing.lease).await?
        {
            return self.run_job(job).await;
        }
        let Some(f) = self.storage.meta.file(id).await? else {
            return Ok(None);
        };
        if f.status == Some(FileStatus::Pending)
            && (self.is_running(id) || self.storage.queue.is_queued(id).await?)
        {
            return self.wait_done(id, PROCESS_WAIT).await;
        }
        Ok(Some(f))
    }

    /// Runs a claimed job to its end: marks it running here, keeps its lease alive, and
    /// records a panic as the file's failure.
    async fn run_job(&self, job: Job) -> Result<Option<FileRecord>, IngestError> {
        let fresh = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(job.file_id.clone());
        if !fresh {
            // This process is on it already (its lease ran out while it worked, and the
            // queue handed it out again): that run finishes it.
            return self.wait_done(&job.file_id, PROCESS_WAIT).await;
        }
        // A panic anywhere in the pipeline (an embedder, a parser) would otherwise leave the
        // file pending and leased until its lease ran out, to panic again.
        let run = AssertUnwindSafe(self.process_job(&job))
            .catch_unwind()
            .await;
        if let Ok(out) = run {
            return out;
        }
        self.fail_after_panic(&job).await;
        Ok(self.storage.meta.file(&job.file_id).await?)
    }

    async fn process_job(&self, job: &Job) -> Result<Option<FileRecord>, IngestError> {
        let out = {
            let _running = Running(self, job.file_id.clone());
            // Through the commit: what it frees after the last embedding batch goes back to
            // the kernel with the batches' memory once ingestion is quiet.
            let _busy = crate::heap::busy();
            self.keep_leased(job, self.process_leased(job)).await
        };
        // Both after `running` is cleared: a waiter woken by it finds the file done here
        // too, and a worker of this process that claims the requeued job processes it
        // instead of taking it for a run still under way (and leaving it leased, unworked,
        // for a whole lease).
        match out {
            Ok(Some(f)) => {
                self.publish(&f).await;
                Ok(Some(f))
            }
            Ok(None) => Ok(None),
            Err(Stop::Requeue(e)) => {
                self.requeue(job).await;
                Err(e)
            }
            Err(Stop::Error(e)) => Err(e),
        }
    }

    /// Drives `work` while renewing the job's lease every third of it.
    async fn keep_leased<T>(&self, job: &Job, work: impl Future<Output = T>) -> T {
        let every = self.timing.lease / 3;
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held = true;
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = beat.tick(), if held => {
                    match self.storage.queue.heartbeat(job, self.timing.lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            // Another worker may process the file too; whichever commits
                            // last replaces the other's chunks whole, so nothing is mixed.
                            tracing::warn!(file = %job.file_id, "processing lease lost");
                            crate::metrics::ingest_storage_error("lease lost");
                            held = false;
                        }
                        Err(e) => storage_failure("heartbeat", Some(&job.file_id), &e),
                    }
                }
            }
        }
    }

    /// Processes a leased file: the final record, `None` when the file was deleted.
    async fn process_leased(&self, job: &Job) -> Result<Option<FileRecord>, Stop> {
        let id = job.file_id.as_str();
        let file = match self.storage.meta.file(id).await {
            Ok(Some(f)) => f,
            // Its queue entry went with it.
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.retry_later(job, None, "read file record", e).await),
        };
        if file.status != Some(FileStatus::Pending) {
            // Queued but decided already (processed by a worker whose lease had run out):
            // only the queue entry is left to take off.
            if let Err(e) = self.storage.queue.complete(job).await {
                storage_failure("complete job", Some(id), &e);
            }
            return Ok(Some(file));
        }
        if job.attempts > self.timing.max_attempts {
            let msg = format!(
                "processing did not finish after {} attempts (storage failures or a stopped worker)",
                job.attempts - 1
            );
            return Ok(self.record_failure(file, msg).await?);
        }
        let started = std::time::Instant::now();
        let source = match self.read_blob(&file).await {
            Ok(s) => s,
            Err(Failure::File(msg)) => return Ok(self.record_failure(file, msg).await?),
            Err(Failure::Storage(op, e)) => {
                return Err(self.retry_later(job, Some(file), op, e).await);
            }
        };
        match self.pipeline(&file, source).await {
            Ok(done) => self.commit(job, file, done, started).await,
            Err(msg) => {
                tracing::warn!(file = %file.id, error = %msg, "file processing failed");
                Ok(self.record_failure(file, msg).await?)
            }
        }
    }

    /// The file's bytes: in place when the backend keeps blobs as local files, else fetched.
    async fn read_blob(&self, file: &FileRecord) -> Result<Source, Failure> {
        let missing = || Failure::File("cannot read the stored file: it is missing".into());
        let key = Path::new(&file.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(missing)?;
        if let Some(path) = self.storage.blobs.local_path(&key) {
            return Ok(Source::Path(path));
        }
        match self.storage.blobs.get(&key).await {
            Ok(Some(bytes)) => Ok(Source::Bytes(bytes)),
            Ok(None) => Err(missing()),
            Err(e) => Err(Failure::Storage("read blob", e)),
        }
    }

    /// Commits a processed file, then adds it to the collection its upload named.
    async fn commit(
        &self,
        job: &Job,
        mut file: FileRecord,
        done: Processed,
        started: std::time::Instant,
    ) -> Result<Option<FileRecord>, Stop> {
        let Processed {
            text,
            chunks,
            vecs,
            info,
            extract_secs,
            embed_secs,
        } = done;
        let committing = std::time::Instant::now();
        let pending = file.clone();
        file.updated_at = now_secs();
        file.status = Some(FileStatus::Completed);
        file.error = None;
        file.hash = Some(hex::encode(Sha256::digest(text.as_bytes())));
        file.embedding = Some(info);
        file.chunk_count = chunks.len();
        file.meta["collection_name"] = serde_json::json!(format!("file-{}", file.id));
        match self
            .storage
            .chunks
            .complete_file(&file, &text, &chunks, &vecs)
            .await
        {
            Ok(_) => {
                tracing::info!(
                    file = %file.id,
                    chunks = chunks.len(),
                    secs = started.elapsed().as_secs_f64(),
                    extract_secs,
                    embed_secs,
                    commit_secs = committing.elapsed().as_secs_f64(),
                    "file processed"
                );
                self.auto_link(&file).await;
                Ok(Some(file))
            }
            // Deleted while it was processed.
            Err(StorageError::NotFound) => Ok(None),
            Err(e) => Err(self
                .retry_later(job, Some(pending), "commit processed file", e)
                .await),
        }
    }

    /// Records the file as failed with `msg` (its chunks removed, off the queue).
    async fn record_failure(
        &self,
        mut file: FileRecord,
        msg: String,
    ) -> Result<Option<FileRecord>, IngestError> {
        file.status = Some(FileStatus::Failed);
        file.error = Some(msg);
        file.hash = None;
        file.updated_at = now_secs();
        match self.storage.chunks.fail_file(&file).await {
            Ok(()) => Ok(Some(file)),
            Err(StorageError::NotFound) => Ok(None),
            Err(e) => {
                // The job stays leased: when its lease runs out it is claimed again, and
                // recorded then (its attempts are used up).
                storage_failure("record failure", Some(&file.id), &e);
                Err(e.into())
            }
        }
    }

    /// A storage failure while processing: logged and counted. With attempts left the job
    /// goes back to the queue (once this run has ended, see [`Ingest::process_job`]); its
    /// attempts used up, the file is recorded as failed.
    async fn retry_later(
        &self,
        job: &Job,
        file: Option<FileRecord>,
        op: &'static str,
        e: StorageError,
    ) -> Stop {
        storage_failure(op, Some(&job.file_id), &e);
        if job.attempts >= self.timing.max_attempts {
            if let Some(f) = file {
                // When this fails too, the lease runs out and the next claim records it.
                let _ = self.record_failure(f, format!("storage error: {e}")).await;
            }
            return Stop::Error(e.into());
        }
        Stop::Requeue(e.into())
    }

    /// Puts a job whose run hit a storage failure back on the queue, after a pause.
    async fn requeue(&self, job: &Job) {
        // A storage hiccup is likely to last a moment: do not claim it back at once.
        tokio::time::sleep(Duration::from_millis(500) * job.attempts).await;
        match self.storage.queue.fail(job, self.timing.max_attempts).await {
            // Claimable again: a worker of this process may be idle.
            Ok(Retry::Requeued) => self.notify(),
            Ok(Retry::LeaseLost) => {}
            Ok(Retry::GaveUp) => {
                tracing::error!(file = %job.file_id, "queue gave the file up before its attempts were used");
            }
            // The lease runs out and the job is claimed again anyway.
            Err(e) => storage_failure("release job", Some(&job.file_id), &e),
        }
    }

    /// Records a file whose processing panicked as failed (and off the queue).
    async fn fail_after_panic(&self, job: &Job) {
        let id = job.file_id.as_str();
        tracing::error!(file = id, "file processing panicked");
        match self.storage.meta.file(id).await {
            Ok(Some(f)) if f.status == Some(FileStatus::Pending) => {
                if let Ok(Some(f)) = self
                    .record_failure(f, "internal error while processing the file".into())
                    .await
                {
                    self.publish(&f).await;
                }
            }
            Ok(_) => {}
            // Claimed again when the lease runs out; failed for good after max_attempts.
            Err(e) => storage_failure("read file record", Some(id), &e),
        }
        self.bump();
    }

    /// Open WebUI adds a processed upload to the collection named in its metadata
    /// (`knowledge_id`) when the uploader may write to it.
    async fn auto_link(&self, file: &FileRecord) {
        let Some(kb_id) = file.meta["data"]["knowledge_id"].as_str() else {
            return;
        };
        let meta = &self.storage.meta;
        let (kb, user) = match (
            meta.knowledge(kb_id).await,
            meta.user_by_id(&file.user_id).await,
        ) {
            (Ok(Some(kb)), Ok(Some(user))) => (kb, user),
            (Ok(_), Ok(_)) => return,
            (Err(e), _) | (_, Err(e)) => {
                storage_failure("add to collection", Some(&file.id), &e);
                return;
            }
        };
        if !crate::auth::access::can_write_kb(&user, &kb) {
            tracing::info!(file = %file.id, knowledge = kb_id, "no write access; not added");
            return;
        }
        match self.add_to_collection(kb_id, file).await {
            Ok(false) => {
                tracing::info!(file = %file.id, knowledge = kb_id, "duplicate content; not added");
            }
            Ok(true) => {}
            Err(e) => storage_failure("add to collection", Some(&file.id), &e),
        }
    }

    /// Links a processed file into a collection unless another of its files has the same
    /// content (Open WebUI's rule, as `Library::add_file` applies it); false for a duplicate.
    async fn add_to_collection(&self, kb: &str, file: &FileRecord) -> Result<bool, StorageError> {
        let meta = &self.storage.meta;
        for other in meta.knowledge_files(kb).await? {
            if other != file.id
                && let Some(o) = meta.file(&other).await?
                && o.hash.is_some()
                && o.hash == file.hash
            {
                return Ok(false);
            }
        }
        meta.link_file(kb, &file.id).await?;
        Ok(true)
    }

    /// Extract → chunk → embed. Any error is a message for the file's `error` field.
    async fn pipeline(&self, file: &FileRecord, source: Source) -> Result<Processed, String> {
        let started = std::time::Instant::now();
        let embedder = self.embedder.clone()?;
        let scratch = self.upload_dir.clone();
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
            let doc = extract_source(source, &scratch, &name, content_type.as_deref(), &options)?;
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
        let extract_secs = started.elapsed().as_secs_f64();
        let records: Vec<ChunkRecord> = chunks
            .into_iter()
            .enumerate()
            .map(|(index, c)| ChunkRecord {
                context: chunk::Title::context_for(title.as_ref(), &c.text),
                file_id: file.id.clone(),
                index,
                text: c.text,
                start_index: c.start_index,
                page: c.page,
                headers: c.headers,
            })
            .collect();
        // Embedded by the text the lexical index holds; Open WebUI embeds chunk text with
        // newlines replaced by spaces.
        let inputs: Vec<String> = records
            .iter()
            .map(|r| r.indexed_text().replace('\n', " "))
            .collect();
        let embedding = std::time::Instant::now();
        let vecs = embedder.embed(inputs).await.map_err(|e| e.to_string())?;
        let embed_secs = embedding.elapsed().as_secs_f64();
        if vecs.len() != records.len() {
            return Err(format!(
                "the embedding engine returned {} vectors for {} chunks",
                vecs.len(),
                records.len()
            ));
        }
        let info = EmbeddingInfo {
            engine: self.engine.as_str().to_string(),
            model: embedder.model().to_string(),
            dim: embedder.dim(),
        };
        Ok(Processed {
            text,
            chunks: records,
            vecs,
            info,
            extract_secs,
            embed_secs,
        })
    }

    /// Waits until the file is no longer pending (or gone: `None`), at most `limit`. Wakes
    /// on the file's status signal from any replica; the store is the truth, read again on
    /// every signal for the file, after missed signals and at least every [`WAIT_TICK`].
    ///
    /// # Errors
    /// The storage backend failed: never mistaken for a deleted file.
    pub async fn wait_done(
        &self,
        id: &str,
        limit: Duration,
    ) -> Result<Option<FileRecord>, IngestError> {
        // Subscribed before the first read: a change between the read and the wait wakes it.
        let mut signals = self.storage.signals.subscribe();
        let mut local = self.watch();
        let deadline = tokio::time::Instant::now() + limit;
        let mut open = true;
        loop {
            let Some(f) = self.storage.meta.file(id).await? else {
                return Ok(None);
            };
            if f.status != Some(FileStatus::Pending) && !self.is_running(id) {
                return Ok(Some(f));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Some(f));
            }
            let tick = tokio::time::sleep_until(deadline.min(now + WAIT_TICK));
            tokio::pin!(tick);
            loop {
                tokio::select! {
                    () = &mut tick => break,
                    Ok(()) = local.changed() => break,
                    s = signals.recv(), if open => match s {
                        Ok(Signal::FileStatus { id: changed, .. }) if changed == id => break,
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => open = false,
                    },
                }
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
                Ok(Some(f)) => f,
                Ok(None) => return Err(NotUsable::Gone),
                Err(e) => return Err(NotUsable::Store(e)),
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

    /// The blob key of an upload (the library names blobs; see [`crate::library::blob_key`]).
    #[must_use]
    pub fn blob_key(id: &str, filename: &str) -> String {
        crate::library::blob_key(id, filename)
    }

    /// Where an upload's blob lives on the embedded backend (`upload_dir/`[`Ingest::blob_key`]).
    pub fn blob_path(&self, id: &str, filename: &str) -> PathBuf {
        self.upload_dir.join(Self::blob_key(id, filename))
    }
}

/// Extracts a file's document on a blocking thread. Bytes fetched from the backend go to the
/// extractor child through a scratch file (it reads a path; its memory limit must cover
/// the parsing, not the parent's copy), removed afterwards.
fn extract_source(
    source: Source,
    scratch: &Path,
    name: &str,
    content_type: Option<&str>,
    options: &crate::extract::isolate::Options,
) -> Result<crate::extract::Document, String> {
    match source {
        Source::Path(path) => {
            crate::extract::isolate::extract_file(&path, name, content_type, options)
        }
        Source::Bytes(bytes)
            if options.extractor.is_none()
                || !crate::extract::needs_isolation(name, content_type) =>
        {
            crate::extract::extract_with(&bytes, name, content_type, &options.limits)
                .map_err(|e| e.to_string())
        }
        Source::Bytes(bytes) => {
            let tmp = scratch.join(format!(".extract-{}", uuid::Uuid::new_v4().simple()));
            let written =
                std::fs::create_dir_all(scratch).and_then(|()| std::fs::write(&tmp, &bytes));
            drop(bytes);
            let out = written
                .map_err(|e| format!("cannot stage the stored file for extraction: {e}"))
                .and_then(|()| {
                    crate::extract::isolate::extract_file(&tmp, name, content_type, options)
                });
            let _ = std::fs::remove_file(&tmp);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Chunks, Hit, Scope};
    use crate::store::Store;
    use std::sync::atomic::AtomicU32;

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

    /// Embeds anything as one fixed vector and counts its calls.
    #[derive(Default)]
    struct FixedEmbedder {
        calls: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Embedder for FixedEmbedder {
        fn model(&self) -> &'static str {
            "fixed"
        }
        fn dim(&self) -> usize {
            4
        }
        async fn embed(
            &self,
            texts: Vec<String>,
        ) -> Result<Vec<Vec<f32>>, crate::embed::EmbedError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(texts.iter().map(|_| vec![0.5; 4]).collect())
        }
    }

    /// A store, its embedded storage and a config, in a temp dir.
    struct Env {
        dir: tempfile::TempDir,
        config: Config,
        store: Arc<Store>,
        storage: Storage,
    }

    fn env(workers: usize) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::build(
            crate::config::file::FileConfig::default(),
            &std::collections::HashMap::<String, String>::new(),
            &crate::config::Overrides::default(),
        )
        .unwrap();
        config.data_dir = dir.path().to_path_buf();
        config.rag.workers = workers;
        let store = Arc::new(Store::open(&dir.path().join("t.redb")).unwrap());
        let index = Arc::new(crate::storage::embedded::vectors::VectorStore::new(
            10_000,
            crate::index::GraphKind::Usearch,
            None,
        ));
        index.load(&store).unwrap();
        let storage = crate::storage::embedded::storage(
            store.clone(),
            index,
            dir.path().join("uploads"),
            100,
        );
        Env {
            dir,
            config,
            store,
            storage,
        }
    }

    impl Env {
        fn ingest(&self, storage: Storage, embedder: Arc<dyn Embedder>) -> Ingest {
            Ingest::new(&self.config, storage, Ok(embedder), None)
        }

        /// A pending file with a blob, stored and queued.
        async fn queued(&self, id: &str) -> FileRecord {
            let uploads = self.dir.path().join("uploads");
            std::fs::create_dir_all(&uploads).unwrap();
            let blob = uploads.join(Ingest::blob_key(id, "a.txt"));
            std::fs::write(&blob, "some text to embed").unwrap();
            let f = record(id, &blob);
            self.storage.meta.insert_file(&f).await.unwrap();
            self.storage.queue.enqueue(id).await.unwrap();
            f
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

    const LIMIT: Duration = Duration::from_secs(120);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_pipeline_fails_the_file_instead_of_leaving_it_queued() {
        let e = env(4);
        let ingest = Arc::new(e.ingest(e.storage.clone(), Arc::new(PanickingEmbedder)));
        e.queued("f1").await;
        tokio::spawn(ingest.clone().run_workers());
        let f = ingest.wait_done("f1", LIMIT).await.unwrap().unwrap();
        assert_eq!(f.status, Some(FileStatus::Failed), "{f:?}");
        assert!(f.error.unwrap().contains("internal error"));
        assert!(e.store.queued_files().unwrap().is_empty(), "off the queue");
        // The pool is still usable: its permit came back.
        e.queued("f2").await;
        ingest.notify();
        let f = ingest.wait_done("f2", LIMIT).await.unwrap().unwrap();
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
        let e = env(3);
        let embedder = Arc::new(CountingEmbedder {
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        let ingest = Arc::new(e.ingest(e.storage.clone(), embedder.clone()));
        let ids: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
        for id in &ids {
            e.queued(id).await;
        }
        tokio::spawn(ingest.clone().run_workers());
        for id in &ids {
            let f = ingest.wait_done(id, LIMIT).await.unwrap().unwrap();
            assert_eq!(f.status, Some(FileStatus::Completed), "{f:?}");
            assert_eq!(f.chunk_count, 1);
        }
        assert!(e.store.queued_files().unwrap().is_empty());
        // Twelve files on three workers: the pool fills up, and never beyond.
        assert_eq!(embedder.most.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_workers_file_is_claimed_again_after_its_lease_and_completed() {
        let e = env(2);
        let embedder = Arc::new(FixedEmbedder::default());
        let mut ingest = e.ingest(e.storage.clone(), embedder.clone());
        ingest.timing = QueueTiming {
            lease: Duration::from_millis(600),
            poll: Duration::from_millis(200),
            max_attempts: 3,
        };
        let ingest = Arc::new(ingest);
        e.queued("f1").await;
        // A worker of another replica claims the file and dies: no heartbeat, no result.
        let dead = e
            .storage
            .queue
            .claim(Duration::from_millis(600))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(dead.file_id, "f1");
        tokio::spawn(ingest.clone().run_workers());
        let f = ingest.wait_done("f1", LIMIT).await.unwrap().unwrap();
        assert_eq!(f.status, Some(FileStatus::Completed), "{f:?}");
        assert_eq!(embedder.calls.load(Ordering::SeqCst), 1);
        assert!(e.store.queued_files().unwrap().is_empty());
        assert!(
            !e.storage.queue.complete(&dead).await.unwrap(),
            "the dead worker's lease is gone"
        );
    }

    /// Embedded chunks whose commits fail while `failures` is above zero.
    struct FlakyChunks {
        inner: Arc<dyn Chunks>,
        failures: AtomicU32,
    }

    #[async_trait::async_trait]
    impl Chunks for FlakyChunks {
        async fn complete_file(
            &self,
            file: &FileRecord,
            text: &str,
            chunks: &[ChunkRecord],
            vectors: &[Vec<f32>],
        ) -> crate::storage::Result<Vec<u64>> {
            let left = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if left.is_ok() {
                return Err(StorageError::Postgres("connection reset".into()));
            }
            self.inner.complete_file(file, text, chunks, vectors).await
        }
        async fn fail_file(&self, file: &FileRecord) -> crate::storage::Result<()> {
            self.inner.fail_file(file).await
        }
        async fn file_chunk_ids(&self, file_id: &str) -> crate::storage::Result<Vec<u64>> {
            self.inner.file_chunk_ids(file_id).await
        }
        async fn chunks(&self, ids: &[u64]) -> crate::storage::Result<Vec<(u64, ChunkRecord)>> {
            self.inner.chunks(ids).await
        }
        async fn dense_search(
            &self,
            scope: &Scope,
            query: &[f32],
            k: usize,
        ) -> crate::storage::Result<Vec<Hit>> {
            self.inner.dense_search(scope, query, k).await
        }
        async fn lexical_search(
            &self,
            scope: &Scope,
            query: &str,
            k: usize,
        ) -> crate::storage::Result<Vec<Hit>> {
            self.inner.lexical_search(scope, query, k).await
        }
        async fn file_vectors(
            &self,
            file_id: &str,
        ) -> crate::storage::Result<Vec<(u64, Vec<f32>)>> {
            self.inner.file_vectors(file_id).await
        }
        async fn import_file(
            &self,
            file: &FileRecord,
            text: &str,
            chunks: &[(u64, ChunkRecord)],
            vectors: &[Vec<f32>],
        ) -> crate::storage::Result<()> {
            self.inner.import_file(file, text, chunks, vectors).await
        }
        async fn similarities(
            &self,
            query: &[f32],
            chunks: &[crate::storage::ChunkRef<'_>],
        ) -> crate::storage::Result<Vec<Option<f32>>> {
            self.inner.similarities(query, chunks).await
        }
        async fn vectors(
            &self,
            chunks: &[crate::storage::ChunkRef<'_>],
        ) -> crate::storage::Result<Vec<Option<Vec<f32>>>> {
            self.inner.vectors(chunks).await
        }
        async fn lexical_search_with(
            &self,
            scope: &Scope,
            query: &str,
            k: usize,
            params: crate::index::bm25::Bm25Params,
        ) -> crate::storage::Result<Option<Vec<Hit>>> {
            self.inner
                .lexical_search_with(scope, query, k, params)
                .await
        }
    }

    fn flaky(e: &Env, failures: u32) -> Storage {
        let mut storage = e.storage.clone();
        storage.chunks = Arc::new(FlakyChunks {
            inner: e.storage.chunks.clone(),
            failures: AtomicU32::new(failures),
        });
        storage
    }

    fn storage_errors(op: &str) -> u64 {
        crate::metrics::INGEST_STORAGE_ERRORS
            .with_label_values(&[op])
            .get()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_is_counted_and_retried_until_the_file_completes() {
        let e = env(2);
        let embedder = Arc::new(FixedEmbedder::default());
        let ingest = Arc::new(e.ingest(flaky(&e, 1), embedder.clone()));
        let before = storage_errors("commit processed file");
        e.queued("f1").await;
        tokio::spawn(ingest.clone().run_workers());
        let f = ingest.wait_done("f1", LIMIT).await.unwrap().unwrap();
        assert_eq!(f.status, Some(FileStatus::Completed), "{f:?}");
        assert_eq!(embedder.calls.load(Ordering::SeqCst), 2, "processed twice");
        assert!(storage_errors("commit processed file") > before);
        assert!(e.store.queued_files().unwrap().is_empty());
        assert_eq!(e.store.file_chunk_ids("f1").unwrap().len(), 1);
    }

    /// A queue that records, at each `fail`, whether the file was still marked as being
    /// processed by this process.
    struct WatchedQueue {
        inner: Arc<dyn crate::storage::WorkQueue>,
        ingest: std::sync::OnceLock<std::sync::Weak<Ingest>>,
        running_at_fail: Mutex<Vec<bool>>,
    }

    #[async_trait::async_trait]
    impl crate::storage::WorkQueue for WatchedQueue {
        async fn enqueue(&self, file_id: &str) -> crate::storage::Result<()> {
            self.inner.enqueue(file_id).await
        }
        async fn claim(&self, lease: Duration) -> crate::storage::Result<Option<Job>> {
            self.inner.claim(lease).await
        }
        async fn heartbeat(&self, job: &Job, lease: Duration) -> crate::storage::Result<bool> {
            self.inner.heartbeat(job, lease).await
        }
        async fn complete(&self, job: &Job) -> crate::storage::Result<bool> {
            self.inner.complete(job).await
        }
        async fn fail(&self, job: &Job, max_attempts: u32) -> crate::storage::Result<Retry> {
            let ingest = self
                .ingest
                .get()
                .and_then(std::sync::Weak::upgrade)
                .unwrap();
            self.running_at_fail
                .lock()
                .unwrap()
                .push(ingest.is_running(&job.file_id));
            self.inner.fail(job, max_attempts).await
        }
        async fn pending(&self, limit: usize) -> crate::storage::Result<Vec<String>> {
            self.inner.pending(limit).await
        }
        async fn is_queued(&self, file_id: &str) -> crate::storage::Result<bool> {
            self.inner.is_queued(file_id).await
        }
        async fn claim_file(
            &self,
            file_id: &str,
            lease: Duration,
        ) -> crate::storage::Result<Option<Job>> {
            self.inner.claim_file(file_id, lease).await
        }
    }

    /// A worker of this process that claimed a requeued job while the failed run was still
    /// marked running took it for that run, and left it leased and unworked for a whole
    /// lease (a file stalled for a minute, and one attempt lost).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_is_requeued_only_after_its_run_has_ended() {
        let e = env(2);
        let embedder = Arc::new(FixedEmbedder::default());
        let mut storage = flaky(&e, 2);
        let queue = Arc::new(WatchedQueue {
            inner: e.storage.queue.clone(),
            ingest: std::sync::OnceLock::new(),
            running_at_fail: Mutex::new(Vec::new()),
        });
        storage.queue = queue.clone();
        let ingest = Arc::new(e.ingest(storage, embedder.clone()));
        queue.ingest.set(Arc::downgrade(&ingest)).unwrap();
        e.queued("f1").await;
        tokio::spawn(ingest.clone().run_workers());
        let f = ingest.wait_done("f1", LIMIT).await.unwrap().unwrap();
        assert_eq!(f.status, Some(FileStatus::Completed), "{f:?}");
        assert_eq!(
            embedder.calls.load(Ordering::SeqCst),
            3,
            "one run per attempt"
        );
        assert_eq!(*queue.running_at_fail.lock().unwrap(), [false, false]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_that_keeps_failing_ends_failed_never_pending() {
        let e = env(2);
        let embedder = Arc::new(FixedEmbedder::default());
        let ingest = Arc::new(e.ingest(flaky(&e, u32::MAX), embedder.clone()));
        e.queued("f1").await;
        tokio::spawn(ingest.clone().run_workers());
        let f = ingest.wait_done("f1", LIMIT).await.unwrap().unwrap();
        assert_eq!(f.status, Some(FileStatus::Failed), "{f:?}");
        assert!(
            f.error.as_deref().unwrap().contains("storage error"),
            "{f:?}"
        );
        assert_eq!(
            embedder.calls.load(Ordering::SeqCst),
            QueueTiming::default().max_attempts as usize
        );
        assert!(e.store.queued_files().unwrap().is_empty());
        assert!(e.store.file_chunk_ids("f1").unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn process_claims_the_file_itself_and_a_second_caller_waits_for_it() {
        let e = env(2);
        let embedder = Arc::new(FixedEmbedder::default());
        let ingest = e.ingest(e.storage.clone(), embedder.clone());
        e.queued("f1").await;
        // No workers run (the CLI): the callers claim it; one processes, one waits.
        let (a, b) = tokio::join!(ingest.process("f1"), ingest.process("f1"));
        for f in [a.unwrap().unwrap(), b.unwrap().unwrap()] {
            assert_eq!(f.status, Some(FileStatus::Completed), "{f:?}");
        }
        assert_eq!(embedder.calls.load(Ordering::SeqCst), 1);
        assert!(e.store.queued_files().unwrap().is_empty());
        // Not queued any more: returned as it is, not processed again.
        let f = ingest.process("f1").await.unwrap().unwrap();
        assert_eq!(f.status, Some(FileStatus::Completed));
        assert_eq!(embedder.calls.load(Ordering::SeqCst), 1);
        assert!(ingest.process("nope").await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_sees_a_change_that_sent_no_signal() {
        let e = env(2);
        let ingest = Arc::new(e.ingest(e.storage.clone(), Arc::new(FixedEmbedder::default())));
        let mut f = e.queued("f1").await;
        let waiter = {
            let ingest = ingest.clone();
            tokio::spawn(async move { ingest.wait_done("f1", LIMIT).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Another replica completed it and its signal was lost.
        f.status = Some(FileStatus::Failed);
        e.storage.chunks.fail_file(&f).await.unwrap();
        let got = waiter.await.unwrap().unwrap().unwrap();
        assert_eq!(got.status, Some(FileStatus::Failed), "woke on the re-read");
        // And a deleted file is gone, not an error.
        e.storage.meta.delete_file("f1").await.unwrap();
        assert!(ingest.wait_done("f1", LIMIT).await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recover_requeues_stale_embeddings_and_unqueued_pending_files() {
        let e = env(2);
        let ingest = e.ingest(e.storage.clone(), Arc::new(FixedEmbedder::default()));
        let mut old = e.queued("old").await;
        old.status = Some(FileStatus::Completed);
        old.embedding = Some(EmbeddingInfo {
            engine: "ollama".into(),
            model: "another-model".into(),
            dim: 4,
        });
        e.storage
            .chunks
            .complete_file(&old, "t", &[], &[])
            .await
            .unwrap();
        let lost = e.queued("lost").await;
        e.store.dequeue_file_id(&lost.id).unwrap();
        assert!(e.store.queued_files().unwrap().is_empty());
        ingest.recover().await.unwrap();
        let mut queued = e.store.queued_files().unwrap();
        queued.sort();
        assert_eq!(queued, vec!["lost".to_string(), "old".to_string()]);
        let old = e.store.file("old").unwrap().unwrap();
        assert_eq!(old.status, Some(FileStatus::Pending));
    }

    #[test]
    fn fetched_bytes_are_staged_for_the_extractor_and_the_scratch_file_removed() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("scratch");
        let mut options = crate::extract::isolate::Options {
            extractor: None,
            ..Default::default()
        };
        let doc = extract_source(
            Source::Bytes(b"plain words".to_vec()),
            &scratch,
            "a.txt",
            Some("text/plain"),
            &options,
        )
        .unwrap();
        assert_eq!(doc.full_text().trim(), "plain words");
        // With an extractor binary (one that cannot start here), plain text is still decoded
        // in process, staging nothing ...
        options.extractor = Some(dir.path().join("no-such-extractor"));
        let doc = extract_source(
            Source::Bytes(b"plain words".to_vec()),
            &scratch,
            "a.txt",
            Some("text/plain"),
            &options,
        )
        .unwrap();
        assert_eq!(doc.full_text().trim(), "plain words");
        assert!(!scratch.exists());
        // ... while a format with a real parser goes to the child through a scratch file,
        // which is gone afterwards whatever the outcome.
        let err = extract_source(
            Source::Bytes(b"PK\x03\x04 not really a zip".to_vec()),
            &scratch,
            "a.docx",
            None,
            &options,
        )
        .unwrap_err();
        assert!(err.contains("cannot start the text extractor"), "{err}");
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
    }

    /// A key=value connection string for `cfg` with another database.
    fn pg_url(admin: &str, db: &str) -> String {
        let cfg: tokio_postgres::Config = admin.parse().expect("test URL parses");
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
        parts.push(format!("dbname={db}"));
        parts.join(" ")
    }

    /// Two replicas on one PostgreSQL database (`RAGWAY_TEST_POSTGRES_URL`, see
    /// scripts/postgres.sh; required under CI): replica A takes an upload and its worker dies
    /// holding the job; replica B's worker claims it once the lease runs out, reads the blob
    /// from the database and commits; A's waiter wakes on B's status signal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_postgres_a_dead_replicas_file_completes_on_another_and_wakes_the_first() {
        let Some(admin_url) = std::env::var("RAGWAY_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
        else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "RAGWAY_TEST_POSTGRES_URL is not set under CI"
            );
            eprintln!("RAGWAY_TEST_POSTGRES_URL not set: PostgreSQL case NOT RUN");
            return;
        };
        let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let db = format!("ragway_i_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        let url = pg_url(&admin_url, &db);
        let options = crate::storage::postgres::PgOptions {
            pool_size: 4,
            ..Default::default()
        };
        let a = crate::storage::postgres::connect(&url, options.clone())
            .await
            .unwrap();
        let b = crate::storage::postgres::connect(&url, options)
            .await
            .unwrap();
        let e = env(2);
        let timing = QueueTiming {
            lease: Duration::from_millis(900),
            poll: Duration::from_millis(300),
            max_attempts: 3,
        };
        let embedder_a = Arc::new(FixedEmbedder::default());
        let embedder_b = Arc::new(FixedEmbedder::default());
        let mut replica_a = e.ingest(a.clone(), embedder_a.clone());
        replica_a.timing = timing;
        let mut replica_b = e.ingest(b.clone(), embedder_b.clone());
        replica_b.timing = timing;
        let replica_b = Arc::new(replica_b);

        let key = Ingest::blob_key("f1", "notes.txt");
        assert!(a.blobs.local_path(&key).is_none());
        a.blobs.put(&key, b"pumps and valves").await.unwrap();
        let f = record("f1", &replica_a.blob_path("f1", "notes.txt"));
        replica_a.submit(&f).await.unwrap();
        let dead = a
            .queue
            .claim(Duration::from_millis(900))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(dead.file_id, "f1");
        let workers = tokio::spawn(replica_b.clone().run_workers());
        let done = replica_a.wait_done("f1", LIMIT).await.unwrap().unwrap();
        assert_eq!(done.status, Some(FileStatus::Completed), "{done:?}");
        assert_eq!(embedder_a.calls.load(Ordering::SeqCst), 0);
        assert_eq!(embedder_b.calls.load(Ordering::SeqCst), 1);
        assert!(!a.queue.is_queued("f1").await.unwrap());
        assert_eq!(a.chunks.file_chunk_ids("f1").await.unwrap().len(), 1);
        let text = a.meta.file_text("f1").await.unwrap().unwrap();
        assert_eq!(
            text.trim(),
            "pumps and valves",
            "read from the database's blob"
        );
        workers.abort();
        drop((a, b, replica_a, replica_b));
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
    }
}
