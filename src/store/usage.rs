//! Usage rows: requests and tokens per hour, user, API key and model.
//!
//! Hour buckets make `since`/`until` queries a key range and bound storage: rows older than
//! the retention are deleted as new ones are written.

use redb::{ReadableTable, TableDefinition};

use super::{Result, Store, StoreError};

/// `"{hour:012}\x1f{user_id}\x1f{key_prefix}\x1f{model}"` → requests, prompt and completion
/// tokens (three little-endian u64s). The hour is the epoch hour; the model is last so it
/// may contain any character.
pub(super) const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");

const SEP: char = '\x1f';

/// One usage row's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageKey {
    /// Hours since the epoch.
    pub hour: u64,
    pub user_id: String,
    /// Empty for session (JWT) traffic.
    pub key_prefix: String,
    pub model: String,
}

/// Counts of one row; additions saturate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl UsageCounts {
    pub fn add(&mut self, o: UsageCounts) {
        self.requests = self.requests.saturating_add(o.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
    }

    fn encode(self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.requests.to_le_bytes());
        b[8..16].copy_from_slice(&self.prompt_tokens.to_le_bytes());
        b[16..].copy_from_slice(&self.completion_tokens.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<UsageCounts> {
        let n = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
        };
        Some(UsageCounts {
            requests: n(0)?,
            prompt_tokens: n(8)?,
            completion_tokens: n(16)?,
        })
    }
}

/// Names of the usage hand-over files (see [`Store::add_usage`]).
const SPOOL_PREFIX: &str = "usage-handover-";

fn hour_key(hour: u64) -> String {
    format!("{hour:012}")
}

impl UsageKey {
    fn encode(&self) -> String {
        format!(
            "{}{SEP}{}{SEP}{}{SEP}{}",
            hour_key(self.hour),
            self.user_id,
            self.key_prefix,
            self.model
        )
    }

    fn decode(s: &str) -> Option<UsageKey> {
        let mut it = s.splitn(4, SEP);
        Some(UsageKey {
            hour: it.next()?.parse().ok()?,
            user_id: it.next()?.to_string(),
            key_prefix: it.next()?.to_string(),
            model: it.next()?.to_string(),
        })
    }
}

fn corrupt() -> StoreError {
    StoreError::Corrupt {
        table: "usage",
        source: <serde_json::Error as serde::de::Error>::custom("malformed usage row"),
    }
}

impl Store {
    /// Replaces a user's own limits; `None` when there is no such user.
    pub fn set_user_limits(
        &self,
        user_id: &str,
        limits: crate::limits::Limits,
    ) -> Result<Option<super::User>> {
        let txn = self.db.begin_write()?;
        let user = {
            let mut users = txn.open_table(super::USERS)?;
            let current = match users.get(user_id)? {
                Some(v) => Some(super::decode::<super::User>("users", v.value())?),
                None => None,
            };
            match current {
                Some(mut u) => {
                    u.limits = limits;
                    users.insert(user_id, super::encode(&u).as_str())?;
                    Some(u)
                }
                None => None,
            }
        };
        txn.commit()?;
        Ok(user)
    }

    /// Replaces the limits of a user's API key; `None` when the user has no key.
    pub fn set_api_key_limits(
        &self,
        user_id: &str,
        limits: crate::limits::Limits,
    ) -> Result<Option<super::ApiKeyRecord>> {
        let txn = self.db.begin_write()?;
        let record = {
            let by_user = txn.open_table(super::USER_API_KEY)?;
            let hash = by_user.get(user_id)?.map(|h| h.value().to_string());
            let mut keys = txn.open_table(super::API_KEYS)?;
            let current = match &hash {
                Some(h) => match keys.get(h.as_str())? {
                    Some(v) => Some(super::decode::<super::ApiKeyRecord>("api_keys", v.value())?),
                    None => None,
                },
                None => None,
            };
            match (hash, current) {
                (Some(h), Some(mut rec)) => {
                    rec.limits = limits;
                    keys.insert(h.as_str(), super::encode(&rec).as_str())?;
                    Some(rec)
                }
                _ => None,
            }
        };
        txn.commit()?;
        Ok(record)
    }

    /// Adds `rows` to the stored counts in one durable transaction, and deletes rows from
    /// hours before `keep_from_hour`.
    ///
    /// After [`Store::release`] (a graceful upgrade), the rows of the streams this process
    /// still finishes go to a hand-over file next to the database instead; the process that
    /// owns the database adds them with its next rows.
    pub fn add_usage(&self, rows: &[(UsageKey, UsageCounts)], keep_from_hour: u64) -> Result<()> {
        let txn = match self.db.begin_write() {
            Err(StoreError::Released) => return self.spool_usage(rows),
            other => other?,
        };
        let spooled = self.spooled_usage();
        {
            let mut t = txn.open_table(USAGE)?;
            for (k, c) in rows
                .iter()
                .chain(spooled.iter().flat_map(|(_, r)| r.iter()))
            {
                let key = k.encode();
                let mut total = match t.get(key.as_str())? {
                    Some(v) => UsageCounts::decode(v.value()).unwrap_or_default(),
                    None => UsageCounts::default(),
                };
                total.add(*c);
                t.insert(key.as_str(), total.encode().as_slice())?;
            }
            let cutoff = hour_key(keep_from_hour);
            t.retain_in(..cutoff.as_str(), |_, _| false)?;
        }
        txn.commit()?;
        // A crash between the commit and the removal would count a hand-over file twice:
        // a window of one `unlink`, once per upgrade.
        for (path, _) in spooled {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    /// Writes rows to a new hand-over file (one line per row: key, then the three counts).
    fn spool_usage(&self, rows: &[(UsageKey, UsageCounts)]) -> Result<()> {
        use std::fmt::Write as _;
        let mut text = String::new();
        for (k, c) in rows {
            let _ = writeln!(
                text,
                "{}\t{}\t{}\t{}",
                k.encode(),
                c.requests,
                c.prompt_tokens,
                c.completion_tokens
            );
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("{SPOOL_PREFIX}{}-{nanos}", std::process::id());
        let tmp = self.dir.join(format!(".{name}"));
        let io = |e: std::io::Error| StoreError::Db(redb::Error::Io(e));
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, self.dir.join(name)).map_err(io)?;
        Ok(())
    }

    /// Whether a previous process left usage rows in hand-over files.
    #[must_use]
    pub fn usage_spooled(&self) -> bool {
        std::fs::read_dir(&self.dir).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(SPOOL_PREFIX))
        })
    }

    /// Hand-over files left by a previous process, with their rows (unreadable lines skipped).
    fn spooled_usage(&self) -> Vec<(std::path::PathBuf, Vec<(UsageKey, UsageCounts)>)> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with(SPOOL_PREFIX)
            {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let rows = text
                .lines()
                .filter_map(|l| {
                    let mut f = l.split('\t');
                    let key = UsageKey::decode(f.next()?)?;
                    let mut n = || f.next()?.parse::<u64>().ok();
                    Some((
                        key,
                        UsageCounts {
                            requests: n()?,
                            prompt_tokens: n()?,
                            completion_tokens: n()?,
                        },
                    ))
                })
                .collect();
            out.push((entry.path(), rows));
        }
        out
    }

    /// Rows with `from_hour <= hour < to_hour`, in key order, passed to `visit` until it
    /// returns `false`.
    pub fn scan_usage(
        &self,
        from_hour: u64,
        to_hour: u64,
        mut visit: impl FnMut(UsageKey, UsageCounts) -> bool,
    ) -> Result<()> {
        if from_hour >= to_hour {
            return Ok(());
        }
        let txn = self.db.begin_read()?;
        let t = txn.open_table(USAGE)?;
        let (from, to) = (hour_key(from_hour), hour_key(to_hour));
        for row in t.range(from.as_str()..to.as_str())? {
            let (k, v) = row?;
            let key = UsageKey::decode(k.value()).ok_or_else(corrupt)?;
            let counts = UsageCounts::decode(v.value()).ok_or_else(corrupt)?;
            if !visit(key, counts) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_add_saturate_prune_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let key = |hour: u64, model: &str| UsageKey {
            hour,
            user_id: "u1".into(),
            key_prefix: "sk-12345678".into(),
            model: model.into(),
        };
        let c = |r, p, q| UsageCounts {
            requests: r,
            prompt_tokens: p,
            completion_tokens: q,
        };
        {
            let s = Store::open(&path).unwrap();
            s.add_usage(&[(key(10, "m\x1fodd"), c(1, 5, 7))], 0)
                .unwrap();
            s.add_usage(&[(key(10, "m\x1fodd"), c(1, u64::MAX, 1))], 0)
                .unwrap();
            s.add_usage(&[(key(12, "n"), c(2, 0, 0))], 0).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let mut seen = Vec::new();
        s.scan_usage(0, 100, |k, v| {
            seen.push((k, v));
            true
        })
        .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0.model, "m\x1fodd");
        assert_eq!(seen[0].1, c(2, u64::MAX, 8));
        let mut n = 0;
        s.scan_usage(11, 12, |_, _| {
            n += 1;
            true
        })
        .unwrap();
        assert_eq!(n, 0, "until is exclusive");
        s.add_usage(&[], 11).unwrap();
        let mut left = Vec::new();
        s.scan_usage(0, 100, |k, _| {
            left.push(k.hour);
            true
        })
        .unwrap();
        assert_eq!(left, vec![12], "old hours pruned");
    }
}
