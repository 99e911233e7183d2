//! Queue entries by file id, for the storage seam's work queue (`storage::embedded`), which
//! keeps leases in memory and the queued set here so that it survives restarts.

use redb::ReadableTable;

use super::{FILES, QUEUE, Result, Store};
use crate::store::now_secs;

impl Store {
    /// Queues an existing file, keeping the place of one already queued. False when there
    /// is no such file.
    ///
    /// # Errors
    /// The database failed.
    pub fn enqueue_file_id(&self, id: &str) -> Result<bool> {
        let txn = self.db.begin_write()?;
        {
            if txn.open_table(FILES)?.get(id)?.is_none() {
                return Ok(false);
            }
            let mut q = txn.open_table(QUEUE)?;
            if q.get(id)?.is_none() {
                q.insert(id, now_secs())?;
            }
        }
        txn.commit()?;
        Ok(true)
    }

    /// Takes a file off the queue; false when it was not queued.
    ///
    /// # Errors
    /// The database failed.
    pub fn dequeue_file_id(&self, id: &str) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let removed = txn.open_table(QUEUE)?.remove(id)?.is_some();
        txn.commit()?;
        Ok(removed)
    }
}
