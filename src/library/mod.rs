//! The library: files and knowledge collections together with their index entries (chunks,
//! vectors, memberships, blobs), changed as one unit so metadata, search indexes and blobs
//! never disagree. Handlers, commands and start-up go through here instead of writing each
//! part by hand.
//!
//! It works on the storage seams ([`Metadata`], [`WorkQueue`], [`Blobs`]) only, so it runs
//! unchanged on every backend. Failures are [`LibraryError`]s: a failing store is never
//! mistaken for a missing file or collection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::storage::{Blobs, Metadata, Storage, StorageError, WorkQueue};
use crate::store::{FileRecord, FileStatus, Grant, KnowledgeRecord, now_secs};

/// What the library refuses, or the storage failure that stopped it.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("File {0} is not in this collection")]
    NotInCollection(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub type Result<T, E = LibraryError> = std::result::Result<T, E>;

/// Longest client-chosen part of a blob key, in bytes (file names are limited to 255).
const BLOB_NAME_MAX: usize = 128;

/// The blob key of an upload: `{id}_{basename}`, as Open WebUI names its upload files (the
/// embedded backend keeps that layout on disk). The name part is only a hint for humans
/// looking at the directory (the id makes it unique): separators and control characters
/// become `_` and it is cut to [`BLOB_NAME_MAX`] bytes, so no client-chosen name can leave
/// the directory or exceed the file system's name limit.
#[must_use]
pub fn blob_key(id: &str, filename: &str) -> String {
    let base = Path::new(filename)
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
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
    format!("{id}_{safe}")
}

/// The blob key of a stored file: the last component of its recorded path.
#[must_use]
pub fn blob_key_of(file: &FileRecord) -> String {
    Path::new(&file.path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A new file's description; [`Library::create_file`] makes the record.
pub struct NewFile {
    pub user_id: String,
    /// The stored name (the blob key's hint, the download's name).
    pub filename: String,
    /// `meta.name`, the name clients show.
    pub name: String,
    pub content_type: String,
    pub size: u64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// `meta.data`: what the client sent along (Open WebUI's upload metadata).
    pub data: Value,
    /// Queued for processing; false for `process=false` uploads (no status, never queued).
    pub process: bool,
}

/// Where a new file's bytes are.
pub enum Content<'a> {
    Bytes(&'a [u8]),
    /// A local file, moved in (it is gone once the file is created).
    File(&'a Path),
}

/// What adding a processed file to a collection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Added,
    /// The file was in the collection already.
    AlreadyThere,
    /// Another file of the collection has the same content (Open WebUI refuses these).
    Duplicate,
}

/// Adds a processed file to a collection unless another file of the collection has the
/// same content: the one duplicate check, shared by the library and by the ingestion's
/// automatic add (which has only the metadata at hand).
///
/// # Errors
/// When the store fails.
pub async fn add_to_collection(
    meta: &dyn Metadata,
    kb: &str,
    file: &FileRecord,
) -> Result<Added, StorageError> {
    for other in meta.knowledge_files(kb).await? {
        if other != file.id
            && let Some(o) = meta.file(&other).await?
            && o.hash.is_some()
            && o.hash == file.hash
        {
            return Ok(Added::Duplicate);
        }
    }
    // The backend links metadata and index together (store first, so a crash leaves a
    // membership the index rebuild picks up, never vectors without a record).
    Ok(if meta.link_file(kb, &file.id).await? {
        Added::Added
    } else {
        Added::AlreadyThere
    })
}

/// The library over one backend's seams.
#[derive(Clone)]
pub struct Library {
    meta: Arc<dyn Metadata>,
    queue: Arc<dyn WorkQueue>,
    blobs: Arc<dyn Blobs>,
}

impl Library {
    #[must_use]
    pub fn new(storage: &Storage) -> Library {
        Library {
            meta: storage.meta.clone(),
            queue: storage.queue.clone(),
            blobs: storage.blobs.clone(),
        }
    }

    /// The file's record, or `None` when there is none.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn file(&self, id: &str) -> Result<Option<FileRecord>> {
        Ok(self.meta.file(id).await?)
    }

    /// Stores a new file: its bytes as a blob, then its record, then (with `process`) its
    /// place in the queue; the caller wakes the workers. The one place a `FileRecord` is
    /// made. Nothing stays behind when a step fails.
    ///
    /// # Errors
    /// When the blob or the record cannot be stored.
    pub async fn create_file(
        &self,
        id: String,
        new: NewFile,
        content: Content<'_>,
    ) -> Result<FileRecord> {
        let key = blob_key(&id, &new.filename);
        match content {
            Content::Bytes(b) => self.blobs.put(&key, b).await?,
            Content::File(p) => self.blobs.put_file(&key, p).await?,
        }
        // The record keeps the blob's place on disk where there is one: the embedded
        // backend's uploads dir, as before the seams, so existing data dirs keep working.
        let path = self
            .blobs
            .local_path(&key)
            .unwrap_or_else(|| PathBuf::from("uploads").join(&key));
        let now = now_secs();
        let record = FileRecord {
            id,
            user_id: new.user_id,
            filename: new.filename,
            path: path.display().to_string(),
            hash: None,
            status: new.process.then_some(FileStatus::Pending),
            error: None,
            meta: json!({
                "name": new.name,
                "content_type": new.content_type,
                "size": new.size,
                "file_hash": new.sha256,
                "data": new.data,
            }),
            embedding: None,
            chunk_count: 0,
            created_at: now,
            updated_at: now,
        };
        let stored = async {
            self.meta.insert_file(&record).await?;
            if new.process {
                self.queue.enqueue(&record.id).await?;
            }
            Ok::<_, StorageError>(())
        }
        .await;
        if let Err(e) = stored {
            // Best effort: the record may not exist; the blob must not outlive it.
            if let Err(e) = self.meta.delete_file(&record.id).await {
                tracing::error!(file = %record.id, error = %e, "cannot remove a file whose creation failed");
            }
            self.remove_blob(&record.id, &key).await;
            return Err(e.into());
        }
        Ok(record)
    }

    /// Creates and stores an empty collection: the one place a `KnowledgeRecord` is made.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn create_collection(
        &self,
        user_id: &str,
        name: String,
        description: String,
        access_grants: Vec<Grant>,
    ) -> Result<KnowledgeRecord> {
        let now = now_secs();
        let kb = KnowledgeRecord {
            id: uuid::Uuid::new_v4().to_string(),
            user_id: user_id.to_string(),
            name,
            description,
            meta: Value::Null,
            access_grants,
            created_at: now,
            updated_at: now,
        };
        self.meta.put_knowledge(&kb).await?;
        Ok(kb)
    }

    /// Stores a changed collection, stamped with the time of the change.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn save_collection(&self, kb: &mut KnowledgeRecord) -> Result<()> {
        kb.updated_at = now_secs();
        self.meta.put_knowledge(kb).await?;
        Ok(())
    }

    /// The collection's record, or `None` when there is none.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn collection(&self, id: &str) -> Result<Option<KnowledgeRecord>> {
        Ok(self.meta.knowledge(id).await?)
    }

    /// Every collection.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn collections(&self) -> Result<Vec<KnowledgeRecord>> {
        Ok(self.meta.knowledges().await?)
    }

    /// The records of a collection's files (a membership whose file is gone is skipped).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn collection_files(&self, kb: &str) -> Result<Vec<FileRecord>> {
        let mut out = Vec::new();
        for id in self.meta.knowledge_files(kb).await? {
            if let Some(f) = self.meta.file(&id).await? {
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Adds a processed file to a collection unless another file of it has the same content.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn add_file(&self, kb: &str, file: &FileRecord) -> Result<Added> {
        Ok(add_to_collection(self.meta.as_ref(), kb, file).await?)
    }

    /// Puts a file into a collection without the duplicate check (the evaluation keeps
    /// every document of its corpus). False when it was there already.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn link_file(&self, kb: &str, file_id: &str) -> Result<bool> {
        Ok(self.meta.link_file(kb, file_id).await?)
    }

    /// Takes a file out of a collection (out of its index too).
    ///
    /// # Errors
    /// [`LibraryError::NotInCollection`] when it was not in it; when the store fails.
    pub async fn unlink_file(&self, kb: &str, file_id: &str) -> Result<()> {
        if self.meta.unlink_file(kb, file_id).await? {
            Ok(())
        } else {
            Err(LibraryError::NotInCollection(file_id.to_string()))
        }
    }

    /// Takes every file out of a collection; the files stay.
    ///
    /// # Errors
    /// When the store fails (some files may be out already; running it again finishes).
    pub async fn reset_collection(&self, kb: &str) -> Result<()> {
        for id in self.meta.knowledge_files(kb).await? {
            self.meta.unlink_file(kb, &id).await?;
        }
        Ok(())
    }

    /// Removes a file's record, chunks, vectors, memberships, queue entry and blob.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn delete_file(&self, id: &str) -> Result<()> {
        if let Some((rec, _kbs)) = self.meta.delete_file(id).await? {
            self.remove_blob(id, &blob_key_of(&rec)).await;
        }
        Ok(())
    }

    /// A blob whose record is gone only wastes space: its removal failing is logged, the
    /// caller's change (already made) stands.
    async fn remove_blob(&self, id: &str, key: &str) {
        if let Err(e) = self.blobs.delete(key).await {
            tracing::warn!(file = id, error = %e, "could not remove the stored blob");
        }
    }

    /// Removes a collection and its index; its files stay. Returns whether it existed.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn delete_collection(&self, kb: &str) -> Result<bool> {
        Ok(self.meta.delete_knowledge(kb).await?)
    }

    /// Removes a deleted user's files (with chunks, vectors and blobs) and collections
    /// (which leaves every other user's list with them), then clears the deletion record.
    /// Safe to run again after a crash.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn remove_user_data(&self, user_id: &str) -> Result<()> {
        for f in self.meta.files().await? {
            if f.user_id == user_id {
                self.delete_file(&f.id).await?;
            }
        }
        for mut kb in self.meta.knowledges().await? {
            if kb.user_id == user_id {
                self.delete_collection(&kb.id).await?;
            } else if kb.access_grants.iter().any(|g| g.principal_id == user_id) {
                // Grants to a user who no longer exists would only clutter the sharing lists.
                kb.access_grants.retain(|g| g.principal_id != user_id);
                self.meta.put_knowledge(&kb).await?;
            }
        }
        Ok(self.meta.finish_user_deletion(user_id).await?)
    }

    /// Finishes deletions a crash interrupted, then removes files and collections whose owner
    /// no longer exists: a request already past its access check when its user was deleted
    /// (an upload, a collection being created) can store them after the deletion's sweep.
    /// Called at start-up.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn finish_deletions(&self) -> Result<()> {
        for id in self.meta.pending_user_deletions().await? {
            tracing::info!(user = %id, "finishing an interrupted user deletion");
            self.remove_user_data(&id).await?;
        }
        let users: std::collections::HashSet<String> =
            self.meta.users().await?.into_iter().map(|u| u.id).collect();
        for f in self.meta.files().await? {
            if !users.contains(&f.user_id) {
                tracing::warn!(file = %f.id, user = %f.user_id, "removing a file of a deleted user");
                self.delete_file(&f.id).await?;
            }
        }
        for kb in self.meta.knowledges().await? {
            if !users.contains(&kb.user_id) {
                tracing::warn!(knowledge = %kb.id, user = %kb.user_id, "removing a collection of a deleted user");
                self.delete_collection(&kb.id).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_keys_stay_inside_and_short() {
        assert_eq!(blob_key("id", "a.txt"), "id_a.txt");
        assert_eq!(blob_key("id", "../../etc/passwd"), "id_passwd");
        assert_eq!(blob_key("id", "a\nb"), "id_a_b");
        let long = blob_key("id", &"é".repeat(200));
        assert!(long.len() <= 3 + BLOB_NAME_MAX);
        assert!(crate::storage::check_key(&long).is_ok());
    }
}
