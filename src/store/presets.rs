//! Model presets (see `crate::presets`): one JSON record per preset id.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Grant, Result, Store, decode, encode};

/// preset id → `PresetRecord` JSON.
pub(super) const PRESETS: TableDefinition<&str, &str> = TableDefinition::new("presets");

/// A model preset, stored in Open WebUI's model-row shape (`params.system` holds the system
/// prompt, `meta.knowledge` the attached knowledge).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresetRecord {
    pub id: String,
    /// The owner; `config` for presets declared in the configuration file.
    pub user_id: String,
    pub base_model_id: String,
    pub name: String,
    pub params: Map<String, Value>,
    pub meta: Map<String, Value>,
    pub access_grants: Vec<Grant>,
    pub is_active: bool,
    pub created_at: u64,
    pub updated_at: u64,
}

/// Why a preset was not inserted.
#[derive(Debug, PartialEq, Eq)]
pub enum PresetRefusal {
    IdTaken,
    UserLimit,
    TotalLimit,
}

/// Only the owner, to count a user's presets without keeping whole records.
#[derive(Deserialize)]
struct Owner {
    user_id: String,
}

impl Store {
    pub fn preset(&self, id: &str) -> Result<Option<PresetRecord>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PRESETS)?;
        match t.get(id)? {
            Some(v) => Ok(Some(decode("presets", v.value())?)),
            None => Ok(None),
        }
    }

    /// Every stored preset, in id order.
    pub fn presets(&self) -> Result<Vec<PresetRecord>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PRESETS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("presets", v.value())?);
        }
        Ok(out)
    }

    /// Inserts a new preset unless its id is taken or a bound is reached. The checks and
    /// the insert share one write transaction, so concurrent creations cannot pass a bound
    /// together.
    pub fn insert_preset(
        &self,
        rec: &PresetRecord,
        max_per_user: usize,
        max_total: usize,
    ) -> Result<std::result::Result<(), PresetRefusal>> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(PRESETS)?;
            if t.get(rec.id.as_str())?.is_some() {
                return Ok(Err(PresetRefusal::IdTaken));
            }
            if usize::try_from(t.len()?).unwrap_or(usize::MAX) >= max_total {
                return Ok(Err(PresetRefusal::TotalLimit));
            }
            let mut mine = 0usize;
            for row in t.iter()? {
                let (_, v) = row?;
                let owner: Owner = decode("presets", v.value())?;
                if owner.user_id == rec.user_id {
                    mine += 1;
                }
            }
            if mine >= max_per_user {
                return Ok(Err(PresetRefusal::UserLimit));
            }
            t.insert(rec.id.as_str(), encode(rec).as_str())?;
        }
        txn.commit()?;
        Ok(Ok(()))
    }

    /// Replaces a preset that still exists; false when it was deleted meanwhile.
    pub fn update_preset(&self, rec: &PresetRecord) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let existed = {
            let mut t = txn.open_table(PRESETS)?;
            let existed = t.get(rec.id.as_str())?.is_some();
            if existed {
                t.insert(rec.id.as_str(), encode(rec).as_str())?;
            }
            existed
        };
        txn.commit()?;
        Ok(existed)
    }

    pub fn delete_preset(&self, id: &str) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(PRESETS)?.remove(id)?.is_some();
        txn.commit()?;
        Ok(existed)
    }
}
