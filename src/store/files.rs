//! Files, their chunks and vectors, and the processing queue.
//!
//! A file's chunks, vectors, text and final status are written in ONE transaction, so after
//! a crash a file is either completed with everything searchable, or still queued.

use redb::{ReadableTable, WriteTransaction};

use super::{
    CHUNKS, COUNTERS, FILE_CHUNKS, FILE_KNOWLEDGE, FILE_TEXT, FILES, KNOWLEDGE_FILES, QUEUE,
    Result, Store, StoreError, TERMS, VECTORS, decode, encode,
};

/// Chunk ids reserved in the database at a time (see [`Store::reserve_chunk_ids`]).
pub const CHUNK_ID_BLOCK: u64 = 1024;

/// A deleted file's record, its chunk ids and the collections it was in.
pub type DeletedFile = (FileRecord, Vec<u64>, Vec<String>);

/// What the index needs of one processed file: chunk ids, vectors and term counts (JSON).
pub struct FileIndexData {
    pub ids: Vec<u64>,
    pub vectors: Vec<Vec<f32>>,
    pub terms: Vec<String>,
}
use crate::store::{ChunkRecord, FileRecord, now_secs};

fn ids_to_bytes(ids: &[u64]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.to_le_bytes()).collect()
}

fn bytes_to_ids(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Little-endian f32 encoding of a vector.
pub fn vector_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_to_vector(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// Removes a file's chunks and vectors inside `txn`; returns the removed chunk ids.
fn remove_chunks(txn: &WriteTransaction, file_id: &str) -> Result<Vec<u64>> {
    let mut fc = txn.open_table(FILE_CHUNKS)?;
    let ids = fc
        .remove(file_id)?
        .map(|g| bytes_to_ids(g.value()))
        .unwrap_or_default();
    let mut chunks = txn.open_table(CHUNKS)?;
    let mut vectors = txn.open_table(VECTORS)?;
    let mut terms = txn.open_table(TERMS)?;
    for id in &ids {
        chunks.remove(*id)?;
        vectors.remove(*id)?;
        terms.remove(*id)?;
    }
    Ok(ids)
}

impl Store {
    /// Stores a new file record, queued for processing when `enqueue`.
    pub fn insert_file(&self, file: &FileRecord, enqueue: bool) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(FILES)?
            .insert(file.id.as_str(), encode(file).as_str())?;
        if enqueue {
            txn.open_table(QUEUE)?
                .insert(file.id.as_str(), now_secs())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn file(&self, id: &str) -> Result<Option<FileRecord>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FILES)?;
        match t.get(id)? {
            Some(v) => Ok(Some(decode("files", v.value())?)),
            None => Ok(None),
        }
    }

    pub fn files(&self) -> Result<Vec<FileRecord>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FILES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("files", v.value())?);
        }
        Ok(out)
    }

    /// Extracted text of a processed file.
    pub fn file_text(&self, id: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FILE_TEXT)?;
        Ok(t.get(id)?.map(|v| v.value().to_string()))
    }

    /// Files waiting for processing, oldest first.
    pub fn queued_files(&self) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(QUEUE)?;
        let mut rows = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            rows.push((v.value(), k.value().to_string()));
        }
        rows.sort();
        Ok(rows.into_iter().map(|(_, id)| id).collect())
    }

    /// Whether the file waits in the processing queue.
    pub fn is_queued(&self, id: &str) -> Result<bool> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(QUEUE)?.get(id)?.is_some())
    }

    /// Puts a file back in the queue (pending), e.g. to re-embed with another model.
    pub fn requeue_file(&self, file: &FileRecord) -> Result<()> {
        self.insert_file(file, true)
    }

    /// Allocates `n` fresh chunk ids. They come from a block of at least
    /// [`CHUNK_ID_BLOCK`] ids reserved in the database in a transaction of its own, before
    /// any of them is handed out, so an id is never given twice, even across a crash (ids of
    /// a block lost to a crash or a restart are simply never used). One small file used to
    /// pay that transaction's fsync for its own few ids.
    pub fn reserve_chunk_ids(&self, n: usize) -> Result<Vec<u64>> {
        let n = n as u64;
        let mut local = self
            .chunk_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if local.end - local.start < n {
            let block = n.max(CHUNK_ID_BLOCK);
            let txn = self.db.begin_write()?;
            let first = {
                let mut counters = txn.open_table(COUNTERS)?;
                let first = counters.get("chunk_id")?.map_or(1, |g| g.value());
                counters.insert("chunk_id", first + block)?;
                first
            };
            txn.commit()?;
            *local = first..first + block;
        }
        let ids = (local.start..local.start + n).collect();
        local.start += n;
        Ok(ids)
    }

    /// Every chunk id ever given out is below this one.
    pub fn next_chunk_id(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        let counters = txn.open_table(COUNTERS)?;
        Ok(counters.get("chunk_id")?.map(|g| g.value()).unwrap_or(1))
    }

    /// Makes every later reserved chunk id at least `next`: chunks copied in under their
    /// own ids (`ragway migrate`) must never be handed out again.
    pub fn raise_chunk_ids(&self, next: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut counters = txn.open_table(COUNTERS)?;
            let current = counters.get("chunk_id")?.map_or(1, |g| g.value());
            if next > current {
                counters.insert("chunk_id", next)?;
            }
        }
        txn.commit()?;
        // Ids of the reserved block below `next` may now belong to copied chunks.
        let mut local = self
            .chunk_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if next > local.start {
            *local = next.min(local.end)..local.end;
        }
        Ok(())
    }

    /// A processed file's chunk ids with their vectors, in chunk order.
    pub fn file_vectors(&self, file_id: &str) -> Result<Vec<(u64, Vec<f32>)>> {
        let txn = self.db.begin_read()?;
        let fc = txn.open_table(FILE_CHUNKS)?;
        let vt = txn.open_table(VECTORS)?;
        let ids = fc
            .get(file_id)?
            .map(|g| bytes_to_ids(g.value()))
            .unwrap_or_default();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(b) = vt.get(id)? {
                out.push((id, bytes_to_vector(b.value())));
            }
        }
        Ok(out)
    }

    /// Commits a successful processing: chunks (under ids from [`Store::reserve_chunk_ids`]),
    /// vectors, term counts, text and the completed record, and takes the file off the
    /// queue. Chunks of an earlier processing are replaced; their ids are returned.
    pub fn complete_file(
        &self,
        file: &FileRecord,
        text: &str,
        ids: &[u64],
        chunks: &[ChunkRecord],
        vectors: &[Vec<f32>],
        terms: &[String],
    ) -> Result<Vec<u64>> {
        assert_eq!(chunks.len(), ids.len(), "one id per chunk");
        assert_eq!(chunks.len(), vectors.len(), "one vector per chunk");
        assert_eq!(chunks.len(), terms.len(), "one term list per chunk");
        let txn = self.db.begin_write()?;
        let removed = remove_chunks(&txn, &file.id)?;
        {
            let mut ct = txn.open_table(CHUNKS)?;
            let mut vt = txn.open_table(VECTORS)?;
            let mut tt = txn.open_table(TERMS)?;
            for (((id, c), v), t) in ids.iter().zip(chunks).zip(vectors).zip(terms) {
                ct.insert(*id, encode(c).as_str())?;
                vt.insert(*id, vector_to_bytes(v).as_slice())?;
                tt.insert(*id, t.as_str())?;
            }
            txn.open_table(FILE_CHUNKS)?
                .insert(file.id.as_str(), ids_to_bytes(ids).as_slice())?;
            txn.open_table(FILE_TEXT)?.insert(file.id.as_str(), text)?;
            txn.open_table(FILES)?
                .insert(file.id.as_str(), encode(file).as_str())?;
            txn.open_table(QUEUE)?.remove(file.id.as_str())?;
        }
        txn.commit()?;
        Ok(removed)
    }

    /// Records a failed processing and takes the file off the queue; earlier chunks are
    /// removed so nothing stale stays searchable. Returns the removed chunk ids.
    pub fn fail_file(&self, file: &FileRecord) -> Result<Vec<u64>> {
        let txn = self.db.begin_write()?;
        let removed = remove_chunks(&txn, &file.id)?;
        txn.open_table(FILE_TEXT)?.remove(file.id.as_str())?;
        txn.open_table(FILES)?
            .insert(file.id.as_str(), encode(file).as_str())?;
        txn.open_table(QUEUE)?.remove(file.id.as_str())?;
        txn.commit()?;
        Ok(removed)
    }

    /// Updates only the record (status changes that touch no chunk).
    pub fn update_file(&self, file: &FileRecord) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(FILES)?;
            if t.get(file.id.as_str())?.is_none() {
                return Err(StoreError::NotFound);
            }
            t.insert(file.id.as_str(), encode(file).as_str())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Deletes a file everywhere: record, text, chunks, vectors, queue entry and
    /// collection memberships. Returns the record, its chunk ids and the collections it
    /// was in, or `None` when it did not exist.
    pub fn delete_file(&self, id: &str) -> Result<Option<DeletedFile>> {
        let txn = self.db.begin_write()?;
        let out = {
            let Some(rec) = txn
                .open_table(FILES)?
                .remove(id)?
                .map(|g| g.value().to_string())
            else {
                return Ok(None);
            };
            let rec: FileRecord = decode("files", &rec)?;
            let chunk_ids = remove_chunks(&txn, id)?;
            txn.open_table(FILE_TEXT)?.remove(id)?;
            txn.open_table(QUEUE)?.remove(id)?;
            let mut fk = txn.open_multimap_table(FILE_KNOWLEDGE)?;
            let mut kbs = Vec::new();
            for v in fk.remove_all(id)? {
                kbs.push(v?.value().to_string());
            }
            let mut kf = txn.open_multimap_table(KNOWLEDGE_FILES)?;
            for kb in &kbs {
                kf.remove(kb.as_str(), id)?;
            }
            (rec, chunk_ids, kbs)
        };
        txn.commit()?;
        Ok(Some(out))
    }

    pub fn file_chunk_ids(&self, id: &str) -> Result<Vec<u64>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FILE_CHUNKS)?;
        Ok(t.get(id)?
            .map(|g| bytes_to_ids(g.value()))
            .unwrap_or_default())
    }

    /// Chunk records by id (missing ids are skipped).
    pub fn chunks(&self, ids: &[u64]) -> Result<Vec<(u64, ChunkRecord)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CHUNKS)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = t.get(*id)? {
                out.push((*id, decode("chunks", v.value())?));
            }
        }
        Ok(out)
    }

    /// Visits every processed file's index data (index rebuild at start-up).
    pub fn for_each_file_index(&self, mut visit: impl FnMut(&str, FileIndexData)) -> Result<()> {
        let txn = self.db.begin_read()?;
        let fc = txn.open_table(FILE_CHUNKS)?;
        let vt = txn.open_table(VECTORS)?;
        let tt = txn.open_table(TERMS)?;
        for row in fc.iter()? {
            let (k, v) = row?;
            let all = bytes_to_ids(v.value());
            let mut data = FileIndexData {
                ids: Vec::with_capacity(all.len()),
                vectors: Vec::with_capacity(all.len()),
                terms: Vec::with_capacity(all.len()),
            };
            for id in all {
                if let Some(b) = vt.get(id)? {
                    data.vectors.push(bytes_to_vector(b.value()));
                    data.terms.push(
                        tt.get(id)?
                            .map(|t| t.value().to_string())
                            .unwrap_or_default(),
                    );
                    data.ids.push(id);
                }
            }
            visit(k.value(), data);
        }
        Ok(())
    }
}
