//! `ragway ingest PATH... [--knowledge NAME]`: bulk loading through the same pipeline as
//! uploads (same extraction, chunking, embedding and atomic commit), with a progress bar.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::app::App;
use crate::store::{FileRecord, FileStatus, KnowledgeRecord, Role, User};

/// What a bulk run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub completed: usize,
    pub failed: Vec<(PathBuf, String)>,
    pub duplicates: usize,
    pub knowledge_id: Option<String>,
}

/// Every regular file under `paths` (directories recursed, hidden entries skipped), sorted.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
        let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.is_file() {
            out.push(p.to_path_buf());
        } else if meta.is_dir() {
            let entries = std::fs::read_dir(p).map_err(|e| format!("{}: {e}", p.display()))?;
            for entry in entries {
                let entry = entry.map_err(|e| format!("{}: {e}", p.display()))?;
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                walk(&entry.path(), out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        walk(p, &mut out)?;
    }
    out.sort();
    Ok(out)
}

async fn owner(app: &App, email: Option<&str>) -> Result<User, String> {
    let meta = &app.storage.meta;
    match email {
        Some(e) => meta
            .user_by_email(&e.trim().to_lowercase())
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no user with email {e}")),
        None => meta
            .users()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|u| u.role == Role::Admin)
            .min_by_key(|u| u.created_at)
            .ok_or_else(|| {
                "no admin exists yet: create one with `ragway user add` or pass --user".into()
            }),
    }
}

async fn knowledge(app: &App, user: &User, name: &str) -> Result<KnowledgeRecord, String> {
    let existing = app
        .storage
        .meta
        .knowledges()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|k| k.name == name && k.user_id == user.id);
    if let Some(k) = existing {
        return Ok(k);
    }
    app.library()
        .create_collection(&user.id, name.to_string(), String::new(), Vec::new())
        .await
        .map_err(|e| e.to_string())
}

/// Copies one file into the upload dir, registers it, processes it and returns the record.
async fn one(app: &App, user: &User, path: &Path) -> Result<FileRecord, String> {
    let filename = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let id = uuid::Uuid::new_v4().to_string();
    tokio::fs::create_dir_all(&app.ingest.upload_dir)
        .await
        .map_err(|e| e.to_string())?;
    // Copied next to the blobs first (so the blob store can move it in), hashed in chunks:
    // bulk loads may contain large files.
    let blob = app.ingest.upload_dir.join(format!(".bulk-{id}"));
    tokio::fs::copy(path, &blob)
        .await
        .map_err(|e| format!("cannot copy: {e}"))?;
    let mut f = tokio::fs::File::open(&blob)
        .await
        .map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let new = crate::library::NewFile {
        user_id: user.id.clone(),
        filename: filename.clone(),
        name: filename,
        content_type: crate::ingest::content_type_for(&ext).to_string(),
        size,
        sha256: hex::encode(hasher.finalize()),
        data: json!({"source": path.display().to_string()}),
        process: true,
    };
    if let Err(e) = app
        .library()
        .create_file(id.clone(), new, crate::library::Content::File(&blob))
        .await
    {
        let _ = tokio::fs::remove_file(&blob).await;
        return Err(e.to_string());
    }
    app.ingest
        .process(&id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the file disappeared while processing".to_string())
}

/// Ingests `files`, `concurrency` at a time, optionally into collection `knowledge_name`.
pub async fn run(
    app: &App,
    files: Vec<PathBuf>,
    knowledge_name: Option<&str>,
    user_email: Option<&str>,
    progress: &indicatif::ProgressBar,
) -> Result<Summary, String> {
    if let Err(e) = &app.ingest.embedder {
        return Err(format!("embedding engine unavailable: {e}"));
    }
    let user = owner(app, user_email).await?;
    let kb = match knowledge_name {
        Some(n) => Some(knowledge(app, &user, n).await?),
        None => None,
    };
    let mut summary = Summary {
        knowledge_id: kb.as_ref().map(|k| k.id.clone()),
        ..Summary::default()
    };
    let concurrency = app.ingest.workers.max(1);
    let mut results = futures_util::stream::iter(files.into_iter().map(|p| {
        let user = &user;
        async move {
            let r = one(app, user, &p).await;
            (p, r)
        }
    }))
    .buffer_unordered(concurrency);
    while let Some((path, result)) = results.next().await {
        progress.inc(1);
        progress.set_message(path.display().to_string());
        match result {
            Ok(f) if f.status == Some(FileStatus::Completed) => {
                summary.completed += 1;
                if let Some(kb) = &kb {
                    let added = app
                        .library()
                        .add_file(&kb.id, &f)
                        .await
                        .map_err(|e| e.to_string())?;
                    if added == crate::library::Added::Duplicate {
                        summary.duplicates += 1;
                        continue;
                    }
                }
            }
            Ok(f) => summary
                .failed
                .push((path, f.error.unwrap_or_else(|| "not processed".into()))),
            Err(e) => summary.failed.push((path, e)),
        }
    }
    Ok(summary)
}
