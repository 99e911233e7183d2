//! Embedding throughput: batches of 32 with one and with two ONNX sessions, for
//! sentence-sized and chunk-sized texts, with the tokenizer's share.
//!
//! Run: `cargo bench --bench embed` (needs `scripts/fetch-model.sh`; `RAGWAY_MODEL_DIR` and
//! `ORT_DYLIB_PATH` override the model paths).

use std::path::PathBuf;
use std::time::Instant;

use ragway::embed::Embedder;
use ragway::embed::onnx::{BATCH_SIZE, MAX_TOKENS, OnnxEmbedder};

const MODEL_NAME: &str = "sentence-transformers/all-MiniLM-L6-v2";

fn path_from_env(var: &str, default: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(default),
    }
}

fn main() {
    let dir = path_from_env("RAGWAY_MODEL_DIR", "models/all-MiniLM-L6-v2");
    let lib = path_from_env("ORT_DYLIB_PATH", "models/onnxruntime/libonnxruntime.so");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sentence = "Retrieval-augmented generation answers questions from documents: the \
                    gateway splits every upload into chunks, embeds them and stores the vectors \
                    so that the most similar chunks can be added to the prompt.";
    let short: Vec<String> = (0..256).map(|i| format!("{i}. {sentence}")).collect();
    let chunk: Vec<String> = (0..128)
        .map(|i| format!("{i}. {}", [sentence; 5].join(" ")))
        .collect();
    rt.block_on(async {
        for texts in [short, chunk] {
            for sessions in [1, 2] {
                let e = OnnxEmbedder::load(&dir, &lib, sessions, MODEL_NAME)
                    .unwrap_or_else(|e| panic!("{e}"));
                let tokens = e.tokenizer().encode(texts[0].as_str(), true).unwrap().len();
                let start = Instant::now();
                for t in &texts {
                    e.tokenizer().encode_fast(t.as_str(), true).unwrap();
                }
                let tokenize = start.elapsed().as_secs_f64();
                e.embed(texts[..BATCH_SIZE].to_vec()).await.unwrap(); // warm-up
                let start = Instant::now();
                e.embed(texts.clone()).await.unwrap();
                let secs = start.elapsed().as_secs_f64();
                println!(
                    "{sessions} session(s): {:6.1} texts/s  ({} texts of {} tokens, batches of \
                     {BATCH_SIZE}; tokenising alone {:.0} texts/s)",
                    texts.len() as f64 / secs,
                    texts.len(),
                    tokens.min(MAX_TOKENS),
                    texts.len() as f64 / tokenize,
                );
            }
        }
    });
}
