//! Command-line interface. Flags given here win over the environment and the config file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ragway: an authenticated, observable, RAG-capable gateway speaking Open WebUI's API.
#[derive(Debug, Parser)]
#[command(name = "ragway", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every command that loads the configuration.
#[derive(Debug, Clone, Default, Args)]
pub struct CommonArgs {
    /// TOML configuration file (see conf/ragway.toml). Also `RAGWAY_CONFIG`.
    #[arg(long, short = 'c', env = "RAGWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (database, secret). Also `DATA_DIR`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Options of `ragway serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Client-facing address. Also `RAGWAY_LISTEN`, or Open WebUI's `HOST`/`PORT`.
    #[arg(long)]
    pub listen: Option<String>,
    /// Prometheus metrics address ("" disables). Also `RAGWAY_METRICS_LISTEN`.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Ollama base URL; repeat for several upstreams (replaces the configured list).
    #[arg(long = "ollama-url")]
    pub ollama_urls: Vec<String>,
    /// OpenAI-compatible base URL; repeat for several upstreams.
    #[arg(long = "openai-url")]
    pub openai_urls: Vec<String>,
    /// Take over from the ragway running on the same data dir without dropping a request:
    /// start this, then send SIGQUIT to the old process (see `deploy/systemd`).
    #[arg(long)]
    pub upgrade: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Validate a configuration file and exit (non-zero on error).
    CheckConfig {
        /// The file to validate.
        file: PathBuf,
    },
    /// Manage users.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Manage API keys.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Measure retrieval quality on a BEIR-layout dataset (corpus.jsonl, queries.jsonl,
    /// qrels/<split>.tsv) through ragway's own ingestion and retrieval, in a temporary data
    /// dir, or in --data-dir (kept, and reused by later runs on the same dataset).
    Eval {
        #[command(flatten)]
        common: CommonArgs,
        /// Dataset directory.
        #[arg(long)]
        dataset: PathBuf,
        /// Judgments to evaluate: qrels/<split>.tsv (tune on dev, report on test); queries
        /// without judgments there are skipped.
        #[arg(long, default_value = "test")]
        qrels: String,
        /// Modes to compare (dense, bm25, hybrid). The first variant is the baseline of
        /// the paired comparisons.
        #[arg(long, value_delimiter = ',', default_value = "dense,bm25,hybrid")]
        mode: Vec<String>,
        /// Weights of BM25 in hybrid mode (default: the configured one); several compare.
        #[arg(long, value_delimiter = ',')]
        bm25_weight: Vec<f32>,
        /// Fusions for hybrid mode: rrf, convex, minmax, zscore (default: the configured
        /// one); several compare.
        #[arg(long, value_delimiter = ',')]
        fusion: Vec<String>,
        /// Candidates per ranking before fusion (default: chat's); several compare.
        #[arg(long, value_delimiter = ',')]
        candidates: Vec<usize>,
        /// BM25 k1 values to compare (default: the configured one).
        #[arg(long, value_delimiter = ',')]
        bm25_k1: Vec<f32>,
        /// BM25 b values to compare (default: the configured one).
        #[arg(long, value_delimiter = ',')]
        bm25_b: Vec<f32>,
        /// Weights of a file's other candidate chunks in a chunk's score to compare.
        #[arg(long, value_delimiter = ',')]
        file_weight: Vec<f32>,
        /// Dense pseudo-relevance feedback weights to compare (0: off).
        #[arg(long, value_delimiter = ',')]
        prf: Vec<f32>,
        /// Chunks asked per query, as the retrieval API's `k`.
        #[arg(long, default_value_t = 100)]
        k: usize,
        /// Write `<variant>.run` files (TREC format) into this directory.
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Bulk-load files or folders through the ingestion pipeline (stop `ragway serve` on
    /// the same data dir first: the database is single-process).
    Ingest {
        #[command(flatten)]
        common: CommonArgs,
        /// Files or directories (recursed; hidden entries skipped).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Add every file to this knowledge collection (created when missing).
        #[arg(long)]
        knowledge: Option<String>,
        /// Owner of the files and the collection (default: the first admin).
        #[arg(long)]
        user: Option<String>,
    },
    /// Exit 0 when the gateway on this machine answers GET /health with 2xx, else 1 (for
    /// container HEALTHCHECKs and supervisors: no shell or curl needed).
    Probe {
        #[command(flatten)]
        common: CommonArgs,
        /// Address to probe (default: the configured listen address, from `--config`,
        /// `RAGWAY_LISTEN` or `HOST`/`PORT`; 0.0.0.0 and [::] are probed on loopback).
        #[arg(long)]
        listen: Option<String>,
        /// Path to request.
        #[arg(long, default_value = "/health")]
        path: String,
        /// Longest the whole check may take ("5s", "500ms", or seconds).
        #[arg(long, default_value = "5s")]
        timeout: String,
    },
    /// Copy a stopped data dir (users, keys, files, chunks with their vectors,
    /// collections, queue, usage, uploads) into PostgreSQL, then verify the copy. The
    /// target must be empty unless --resume is given.
    Migrate {
        #[command(flatten)]
        common: CommonArgs,
        /// Target database: postgres://user:password@host:5432/database.
        #[arg(long)]
        to: String,
        /// Continue an interrupted migration of this data dir into a non-empty target
        /// (rows are upserted, so running it again is harmless).
        #[arg(long)]
        resume: bool,
    },
    /// Internal: extracts one file in a memory-capped child process (a JSON request on
    /// stdin, the document as JSON on stdout). Started by the gateway itself.
    #[command(name = "extract-worker", hide = true)]
    ExtractWorker,
}

#[derive(Debug, Subcommand)]
pub enum UserAction {
    /// Create a user (the first user ever created is an admin).
    Add {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long)]
        email: String,
        /// Password; read from `RAGWAY_PASSWORD` when omitted.
        #[arg(long, env = "RAGWAY_PASSWORD", hide_env_values = true)]
        password: String,
        #[arg(long)]
        name: Option<String>,
        /// admin, user or pending.
        #[arg(long, default_value = "user")]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// Create (or replace) the API key of a user and print it once.
    Create {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long)]
        user: String,
        /// Restrict the key to these model ids (comma-separated).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
    },
}
