//! The library: files and knowledge collections together with their index entries (chunks,
//! vectors, memberships, blobs), changed as one unit so the store and the vector index never
//! disagree. Handlers and start-up go through here instead of writing both by hand.
//!
//! Failures are the store's own ([`StoreError`]): a failing store is never mistaken for a
//! missing file or collection.

use std::io;
use std::path::Path;

use serde_json::Value;

use crate::ingest::vectors::VectorStore;
use crate::store::{FileRecord, FileStatus, Grant, KnowledgeRecord, Store, StoreError, now_secs};

/// A new file's record, before any processing: the one place a `FileRecord` is made.
/// `process` false: uploaded with `process=false`, never queued (no status).
#[must_use]
pub fn new_file(
    id: String,
    user_id: String,
    filename: String,
    path: &Path,
    meta: Value,
    process: bool,
) -> FileRecord {
    let now = now_secs();
    FileRecord {
        id,
        user_id,
        filename,
        path: path.display().to_string(),
        hash: None,
        status: process.then_some(FileStatus::Pending),
        error: None,
        meta,
        embedding: None,
        chunk_count: 0,
        created_at: now,
        updated_at: now,
    }
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

/// A view of the library over the shared store and vector index.
#[derive(Clone, Copy)]
pub struct Library<'a> {
    store: &'a Store,
    vectors: &'a VectorStore,
}

impl<'a> Library<'a> {
    #[must_use]
    pub fn new(store: &'a Store, vectors: &'a VectorStore) -> Self {
        Library { store, vectors }
    }

    /// Creates and stores an empty collection.
    ///
    /// # Errors
    /// When the store fails.
    pub fn create_collection(
        &self,
        user_id: &str,
        name: String,
        description: String,
        access_grants: Vec<Grant>,
    ) -> Result<KnowledgeRecord, StoreError> {
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
        self.store.put_knowledge(&kb)?;
        Ok(kb)
    }

    /// Adds a processed file to a collection, in the store and then in the collection's
    /// index, unless another file of the collection has the same content.
    ///
    /// # Errors
    /// When the store fails.
    pub fn add_file(&self, kb: &str, file: &FileRecord) -> Result<Added, StoreError> {
        for other in self.store.knowledge_files(kb)? {
            if other != file.id
                && let Some(o) = self.store.file(&other)?
                && o.hash.is_some()
                && o.hash == file.hash
            {
                return Ok(Added::Duplicate);
            }
        }
        self.link_file(kb, &file.id).map(|added| {
            if added {
                Added::Added
            } else {
                Added::AlreadyThere
            }
        })
    }

    /// Puts a file into a collection: the store first, then the index (a crash between
    /// leaves a membership the index rebuild picks up, never vectors without a record).
    /// Returns false when it was there already.
    ///
    /// # Errors
    /// When the store fails.
    pub fn link_file(&self, kb: &str, file_id: &str) -> Result<bool, StoreError> {
        let added = self.store.link_file(kb, file_id)?;
        if added {
            self.vectors.link(kb, file_id);
        }
        Ok(added)
    }

    /// Takes a file out of a collection: out of the index first, so no search finds a file
    /// the store no longer lists.
    ///
    /// # Errors
    /// When the store fails.
    pub fn unlink_file(&self, kb: &str, file_id: &str) -> Result<(), StoreError> {
        self.vectors.unlink(kb, file_id);
        self.store.unlink_file(kb, file_id)?;
        Ok(())
    }

    /// Removes a file's record, chunks, vectors, memberships and blob.
    ///
    /// # Errors
    /// When the store fails.
    pub fn delete_file(&self, id: &str) -> Result<(), StoreError> {
        if let Some((rec, chunk_ids, kbs)) = self.store.delete_file(id)? {
            self.vectors.remove_file(id, &chunk_ids, &kbs);
            if let Err(e) = std::fs::remove_file(&rec.path)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(file = id, error = %e, "could not remove the stored blob");
            }
        }
        Ok(())
    }

    /// Removes a collection and its index; its files stay. Returns whether it existed.
    ///
    /// # Errors
    /// When the store fails.
    pub fn delete_collection(&self, kb: &str) -> Result<bool, StoreError> {
        let existed = self.store.delete_knowledge(kb)?;
        self.vectors.drop_collection(kb);
        Ok(existed)
    }

    /// Removes a deleted user's files (with chunks, vectors and blobs) and collections
    /// (which leaves every other user's list with them), then clears the deletion record.
    /// Safe to run again after a crash.
    ///
    /// # Errors
    /// When the store fails.
    pub fn remove_user_data(&self, user_id: &str) -> Result<(), StoreError> {
        for f in self.store.files()? {
            if f.user_id == user_id {
                self.delete_file(&f.id)?;
            }
        }
        for mut kb in self.store.knowledges()? {
            if kb.user_id == user_id {
                self.delete_collection(&kb.id)?;
            } else if kb.access_grants.iter().any(|g| g.principal_id == user_id) {
                // Grants to a user who no longer exists would only clutter the sharing lists.
                kb.access_grants.retain(|g| g.principal_id != user_id);
                self.store.put_knowledge(&kb)?;
            }
        }
        self.store.finish_user_deletion(user_id)
    }

    /// Finishes deletions a crash interrupted, then removes files and collections whose owner
    /// no longer exists: a request already past its access check when its user was deleted
    /// (an upload, a collection being created) can store them after the deletion's sweep.
    /// Called at start-up.
    ///
    /// # Errors
    /// When the store fails.
    pub fn finish_deletions(&self) -> Result<(), StoreError> {
        for id in self.store.pending_user_deletions()? {
            tracing::info!(user = %id, "finishing an interrupted user deletion");
            self.remove_user_data(&id)?;
        }
        let users: std::collections::HashSet<String> =
            self.store.users()?.into_iter().map(|u| u.id).collect();
        for f in self.store.files()? {
            if !users.contains(&f.user_id) {
                tracing::warn!(file = %f.id, user = %f.user_id, "removing a file of a deleted user");
                self.delete_file(&f.id)?;
            }
        }
        for kb in self.store.knowledges()? {
            if !users.contains(&kb.user_id) {
                tracing::warn!(knowledge = %kb.id, user = %kb.user_id, "removing a collection of a deleted user");
                self.delete_collection(&kb.id)?;
            }
        }
        Ok(())
    }
}
