//! Knowledge collections and their file memberships.

use redb::ReadableTable;

use super::{FILE_KNOWLEDGE, FILES, KNOWLEDGE, KNOWLEDGE_FILES, Result, Store, decode, encode};
use crate::store::KnowledgeRecord;

impl Store {
    /// Inserts or replaces a collection record.
    pub fn put_knowledge(&self, kb: &KnowledgeRecord) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(KNOWLEDGE)?
            .insert(kb.id.as_str(), encode(kb).as_str())?;
        txn.commit()?;
        Ok(())
    }

    pub fn knowledge(&self, id: &str) -> Result<Option<KnowledgeRecord>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(KNOWLEDGE)?;
        match t.get(id)? {
            Some(v) => Ok(Some(decode("knowledge", v.value())?)),
            None => Ok(None),
        }
    }

    pub fn knowledges(&self) -> Result<Vec<KnowledgeRecord>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(KNOWLEDGE)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("knowledge", v.value())?);
        }
        Ok(out)
    }

    /// File ids in a collection.
    pub fn knowledge_files(&self, id: &str) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_multimap_table(KNOWLEDGE_FILES)?;
        let mut out = Vec::new();
        for v in t.get(id)? {
            out.push(v?.value().to_string());
        }
        Ok(out)
    }

    /// Collections a file belongs to.
    pub fn file_knowledge(&self, file_id: &str) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_multimap_table(FILE_KNOWLEDGE)?;
        let mut out = Vec::new();
        for v in t.get(file_id)? {
            out.push(v?.value().to_string());
        }
        Ok(out)
    }

    /// Links a file to a collection; false when it was already linked or the file is gone.
    pub fn link_file(&self, kb: &str, file_id: &str) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let added = {
            if txn.open_table(FILES)?.get(file_id)?.is_none() {
                return Ok(false);
            }
            let fresh = !txn
                .open_multimap_table(KNOWLEDGE_FILES)?
                .insert(kb, file_id)?;
            txn.open_multimap_table(FILE_KNOWLEDGE)?
                .insert(file_id, kb)?;
            fresh
        };
        txn.commit()?;
        Ok(added)
    }

    /// Unlinks a file from a collection; false when it was not linked.
    pub fn unlink_file(&self, kb: &str, file_id: &str) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let removed = txn
            .open_multimap_table(KNOWLEDGE_FILES)?
            .remove(kb, file_id)?;
        txn.open_multimap_table(FILE_KNOWLEDGE)?
            .remove(file_id, kb)?;
        txn.commit()?;
        Ok(removed)
    }

    /// Unlinks every file; returns the file ids that were linked.
    pub fn reset_knowledge(&self, kb: &str) -> Result<Vec<String>> {
        let txn = self.db.begin_write()?;
        let files = {
            let mut kf = txn.open_multimap_table(KNOWLEDGE_FILES)?;
            let mut files = Vec::new();
            for v in kf.remove_all(kb)? {
                files.push(v?.value().to_string());
            }
            let mut fk = txn.open_multimap_table(FILE_KNOWLEDGE)?;
            for f in &files {
                fk.remove(f.as_str(), kb)?;
            }
            files
        };
        txn.commit()?;
        Ok(files)
    }

    /// Deletes a collection and its memberships (not the files); returns whether it existed.
    pub fn delete_knowledge(&self, kb: &str) -> Result<bool> {
        self.reset_knowledge(kb)?;
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(KNOWLEDGE)?.remove(kb)?.is_some();
        txn.commit()?;
        Ok(existed)
    }
}
