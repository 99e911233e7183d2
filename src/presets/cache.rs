//! Stored presets held in memory: every chat request asks whether its model names a preset,
//! and presets change rarely, so the store is read once and again only after a change.
//!
//! A create, update or delete publishes [`Signal::ModelsChanged`]; every replica (this one
//! included) drops its copy before its next lookup. A listener that lost signals (a
//! `Lagged` receiver, a PostgreSQL LISTEN reconnect that drops notifications) is covered
//! by a short TTL: a copy is never older than [`PRESET_CACHE_TTL`]. The copy holds at most
//! what the store holds, which `presets.max-total` bounds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::storage::{Metadata, Signal, Signals, StorageError};
use crate::store::PresetRecord;

/// Longest a copy is used without a signal saying it changed.
pub const PRESET_CACHE_TTL: Duration = Duration::from_secs(5);

/// The stored presets, in id order, with an index by id.
#[derive(Default)]
pub struct StoredPresets {
    list: Vec<PresetRecord>,
    by_id: HashMap<String, usize>,
}

impl StoredPresets {
    fn new(list: Vec<PresetRecord>) -> StoredPresets {
        let by_id = list
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.clone(), i))
            .collect();
        StoredPresets { list, by_id }
    }

    #[must_use]
    pub fn get(&self, id: &str) -> Option<&PresetRecord> {
        self.by_id.get(id).map(|&i| &self.list[i])
    }

    #[must_use]
    pub fn all(&self) -> &[PresetRecord] {
        &self.list
    }
}

/// The in-memory copy of the stored presets, shared by all requests.
pub struct PresetCache {
    copy: RwLock<Option<(Arc<StoredPresets>, Instant)>>,
    /// Bumped by every invalidation: a load that read the store before one must not keep
    /// what it read, or a deleted preset would live on until the TTL.
    generation: AtomicU64,
    /// Signals of every replica, drained before each lookup (no task to run).
    signal_rx: Mutex<broadcast::Receiver<Signal>>,
}

impl PresetCache {
    #[must_use]
    pub fn new(signals: &dyn Signals) -> PresetCache {
        PresetCache {
            copy: RwLock::new(None),
            generation: AtomicU64::new(0),
            signal_rx: Mutex::new(signals.subscribe()),
        }
    }

    /// Drops the copy (this replica only); the next lookup reads the store.
    ///
    /// # Panics
    /// A thread panicked while holding the cache's lock.
    pub fn forget(&self) {
        let mut copy = self.copy.write().expect("preset cache poisoned");
        // Under the write lock, so no load can store between the bump and the clear.
        self.generation.fetch_add(1, Ordering::AcqRel);
        *copy = None;
    }

    fn apply_signals(&self) {
        let mut rx = self
            .signal_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut changed = false;
        loop {
            match rx.try_recv() {
                Ok(Signal::ModelsChanged) | Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    changed = true;
                }
                Ok(_) => {}
                Err(
                    broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed,
                ) => break,
            }
        }
        if changed {
            self.forget();
        }
    }

    /// The stored presets: the copy when it is fresh, else the store's.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// # Panics
    /// A thread panicked while holding the cache's lock.
    pub async fn stored(&self, meta: &dyn Metadata) -> Result<Arc<StoredPresets>, StorageError> {
        self.apply_signals();
        if let Some((copy, at)) = &*self.copy.read().expect("preset cache poisoned")
            && at.elapsed() < PRESET_CACHE_TTL
        {
            return Ok(copy.clone());
        }
        let generation = self.generation.load(Ordering::Acquire);
        let loaded = Arc::new(StoredPresets::new(meta.presets().await?));
        self.apply_signals();
        let mut copy = self.copy.write().expect("preset cache poisoned");
        if self.generation.load(Ordering::Acquire) == generation {
            *copy = Some((loaded.clone(), Instant::now()));
        }
        Ok(loaded)
    }

    /// Whether a copy is held (for tests of invalidation).
    ///
    /// # Panics
    /// A thread panicked while holding the cache's lock.
    #[must_use]
    pub fn is_loaded(&self) -> bool {
        self.copy.read().expect("preset cache poisoned").is_some()
    }
}
