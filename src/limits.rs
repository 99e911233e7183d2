//! Per-key and per-user limits: requests and tokens per minute (and per day).
//!
//! Each limit is a bucket that refills continuously (`limit` per window, as OpenAI's limits
//! replenish): a request is admitted while its requests bucket has room for one more and its
//! tokens bucket is not exhausted. Tokens are known only when the answer ends (the
//! upstream's own counts), so they are charged afterwards and may run a bucket into debt;
//! the debt is capped at one window so a single huge (or lying) answer cannot block a key
//! for longer than that.
//!
//! Two subjects are limited: the API key a request used (one per user, so the key's bucket
//! is keyed by its user: replacing the key does not reset it) and the user behind any
//! credential. A request with no limit set on either subject touches no shared state.
//!
//! Where the buckets live is the storage's business ([`crate::storage::RateLimits`]): the
//! embedded backend keeps them in this process's [`Limiter`]; the PostgreSQL backend keeps
//! them in a table every replica shares, by the same rules ([`refuses`], [`Refused::by`]).
//!
//! The [`Limiter`]'s map is bounded: when full, buckets that have refilled completely carry
//! no information and go first, then the one idle longest (which forgives its debt).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::http::Reply;

/// Largest limit accepted (a trillion): anything above is a typo, not a budget.
pub const MAX_LIMIT: u64 = 1_000_000_000_000;

/// Buckets tracked at most (each is a user id and 56 bytes of state).
pub const DEFAULT_CAPACITY: usize = 100_000;

const MINUTE: Duration = Duration::from_mins(1);
const DAY: Duration = Duration::from_hours(24);

/// A set of limits; `None` fields are unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Limits {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests per day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpd: Option<u64>,
    /// Tokens per day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpd: Option<u64>,
}

/// The four limits, in bucket order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rpm,
    Tpm,
    Rpd,
    Tpd,
}

pub const KINDS: [Kind; 4] = [Kind::Rpm, Kind::Tpm, Kind::Rpd, Kind::Tpd];

impl Kind {
    /// The kind's number where a shared backend stores buckets (its place in [`KINDS`]).
    #[must_use]
    pub fn code(self) -> i16 {
        match self {
            Kind::Rpm => 0,
            Kind::Tpm => 1,
            Kind::Rpd => 2,
            Kind::Tpd => 3,
        }
    }

    #[must_use]
    pub fn from_code(code: i16) -> Option<Kind> {
        KINDS.get(usize::try_from(code).ok()?).copied()
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Kind::Rpm => "rpm",
            Kind::Tpm => "tpm",
            Kind::Rpd => "rpd",
            Kind::Tpd => "tpd",
        }
    }
    /// The time in which a bucket refills completely.
    #[must_use]
    pub fn window(self) -> Duration {
        match self {
            Kind::Rpm | Kind::Tpm => MINUTE,
            Kind::Rpd | Kind::Tpd => DAY,
        }
    }
    /// Whether the bucket counts tokens (charged after the answer) rather than requests.
    #[must_use]
    pub fn tokens(self) -> bool {
        matches!(self, Kind::Tpm | Kind::Tpd)
    }
    /// OpenAI's wording for the limit in its error message.
    fn label(self) -> &'static str {
        match self {
            Kind::Rpm => "requests per min (RPM)",
            Kind::Tpm => "tokens per min (TPM)",
            Kind::Rpd => "requests per day (RPD)",
            Kind::Tpd => "tokens per day (TPD)",
        }
    }
}

impl Limits {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.rpd.is_none() && self.tpd.is_none()
    }

    #[must_use]
    pub fn get(&self, k: Kind) -> Option<u64> {
        match k {
            Kind::Rpm => self.rpm,
            Kind::Tpm => self.tpm,
            Kind::Rpd => self.rpd,
            Kind::Tpd => self.tpd,
        }
    }

    fn slot(&mut self, k: Kind) -> &mut Option<u64> {
        match k {
            Kind::Rpm => &mut self.rpm,
            Kind::Tpm => &mut self.tpm,
            Kind::Rpd => &mut self.rpd,
            Kind::Tpd => &mut self.tpd,
        }
    }

    /// Each field of `self`, else the default's.
    #[must_use]
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            rpm: self.rpm.or(defaults.rpm),
            tpm: self.tpm.or(defaults.tpm),
            rpd: self.rpd.or(defaults.rpd),
            tpd: self.tpd.or(defaults.tpd),
        }
    }

    /// Parses a client's `limits` object strictly: only `rpm`, `tpm`, `rpd`, `tpd`, each a
    /// whole number from 1 to [`MAX_LIMIT`] or `null` (unlimited). `null` for the whole
    /// object means no limits.
    pub fn parse(v: &Value) -> Result<Limits, ApiError> {
        let obj = match v {
            Value::Null => return Ok(Limits::default()),
            Value::Object(o) => o,
            _ => {
                return Err(ApiError::new(
                    422,
                    "limits must be an object like {\"rpm\": 60, \"tpm\": 100000}",
                ));
            }
        };
        let mut out = Limits::default();
        for (k, val) in obj {
            let Some(kind) = KINDS.iter().copied().find(|x| x.name() == k) else {
                return Err(ApiError::new(
                    422,
                    format!(
                        "limits.{}: unknown limit; use rpm, tpm, rpd or tpd",
                        truncated(k)
                    ),
                ));
            };
            *out.slot(kind) = match val {
                Value::Null => None,
                Value::Number(n) => match n.as_u64() {
                    Some(x) if (1..=MAX_LIMIT).contains(&x) => Some(x),
                    _ => {
                        return Err(ApiError::new(
                            422,
                            format!(
                                "limits.{k} must be a whole number from 1 to {MAX_LIMIT} (null for no limit), got {n}"
                            ),
                        ));
                    }
                },
                _ => {
                    return Err(ApiError::new(
                        422,
                        format!("limits.{k} must be a number (null for no limit)"),
                    ));
                }
            };
        }
        Ok(out)
    }

    /// `Err` names the first field of `self` above `ceiling`'s (unset fields of the ceiling
    /// allow anything).
    pub fn within(&self, ceiling: &Limits) -> Result<(), ApiError> {
        for k in KINDS {
            if let (Some(want), Some(max)) = (self.get(k), ceiling.get(k))
                && want > max
            {
                return Err(ApiError::forbidden(format!(
                    "limits.{} may not exceed the configured default of {max}; ask an administrator for more",
                    k.name()
                )));
            }
        }
        Ok(())
    }
}

/// A client-supplied name, cut for an error message.
fn truncated(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Who a bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Subject {
    user_id: String,
    /// The user's API key rather than the user.
    key: bool,
}

/// The state of one subject: how much of each limit is used (0 = full bucket).
#[derive(Debug)]
struct Buckets {
    used: [f64; 4],
    /// The limits last applied, to refill and cap between requests.
    limits: Limits,
    at: Instant,
}

impl Buckets {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        for (i, k) in KINDS.iter().enumerate() {
            let Some(limit) = self.limits.get(*k) else {
                self.used[i] = 0.0;
                continue;
            };
            #[allow(clippy::cast_precision_loss)] // limits are ≤ 10^12, exact in f64
            let rate = limit as f64 / k.window().as_secs_f64();
            self.used[i] = (self.used[i] - rate * dt).max(0.0);
        }
    }

    fn idle(&self) -> bool {
        self.used.iter().all(|u| *u <= 0.0)
    }
}

/// What a refused request is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub kind_tokens: bool,
    pub key: bool,
    pub limit: u64,
    pub used: u64,
    pub label: &'static str,
    pub retry_after: Duration,
}

/// Whether a bucket of `limit` per `kind`'s window, `used` as refilled now, refuses a
/// request. A request needs one whole request of room; tokens only a bucket not yet
/// exhausted (their count is unknown until the answer ends). Every backend decides by this
/// rule (the shared backend's SQL function `ragway_rate_admit` spells it too).
#[must_use]
pub fn refuses(kind: Kind, limit: u64, used: f64) -> bool {
    #[allow(clippy::cast_precision_loss)] // limits are ≤ 10^12, exact in f64
    let cap = limit as f64;
    if kind.tokens() {
        used >= cap
    } else {
        used + 1.0 > cap
    }
}

impl Refused {
    /// What a bucket that [`refuses`] a request says: the wait until it has room again.
    #[must_use]
    pub fn by(kind: Kind, key: bool, limit: u64, used: f64) -> Refused {
        #[allow(clippy::cast_precision_loss)]
        let cap = limit as f64;
        let over = if kind.tokens() {
            used - cap
        } else {
            used + 1.0 - cap
        };
        let wait = Duration::try_from_secs_f64(over.max(0.0) * kind.window().as_secs_f64() / cap)
            .unwrap_or(kind.window() * 2);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let used = used.ceil().max(0.0) as u64;
        Refused {
            kind_tokens: kind.tokens(),
            key,
            limit,
            used: used.min(limit.saturating_mul(2)),
            label: kind.label(),
            retry_after: wait,
        }
    }

    /// The refusal a client is told of among several: the longest wait, the first of equal
    /// ones (key before user, then [`KINDS`] order).
    pub fn worst(refusals: impl IntoIterator<Item = Refused>) -> Option<Refused> {
        refusals.into_iter().fold(None, |worst, r| match worst {
            Some(w) if r.retry_after <= w.retry_after => Some(w),
            _ => Some(r),
        })
    }

    /// 429 with `Retry-After` and OpenAI's rate-limit error shape (`type` is `requests` or
    /// `tokens`, `code` is `rate_limit_exceeded`), plus Open WebUI's `detail`.
    pub fn reply(&self, key_prefix: Option<&str>) -> Reply {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        let secs = secs.max(1);
        let who = match (self.key, key_prefix) {
            (true, Some(p)) => format!("API key {p}…"),
            (true, None) => "this API key".to_string(),
            (false, _) => "this user".to_string(),
        };
        let message = format!(
            "Rate limit reached for {who} on {}: Limit {}, Used {}. Please try again in {secs}s.",
            self.label, self.limit, self.used
        );
        let kind = if self.kind_tokens {
            "tokens"
        } else {
            "requests"
        };
        let body = json!({
            "detail": message,
            "error": {
                "message": message,
                "type": kind,
                "param": null,
                "code": "rate_limit_exceeded",
            }
        });
        let header = if self.kind_tokens {
            "x-ratelimit-limit-tokens"
        } else {
            "x-ratelimit-limit-requests"
        };
        Reply::json(429, &body)
            .with_header(::http::header::RETRY_AFTER, secs.to_string())
            .with_header(
                ::http::header::HeaderName::from_static(header),
                self.limit.to_string(),
            )
    }
}

/// The limits that apply to one request.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub user_id: String,
    /// Limits of the API key used, if one was and it has any.
    pub key: Option<Limits>,
    /// Limits of the user, if any.
    pub user: Option<Limits>,
}

impl Applied {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.key.is_none() && self.user.is_none()
    }

    /// Every limited bucket the request draws on: (the key's rather than the user's, kind,
    /// limit), key first, kinds in [`KINDS`] order.
    pub fn buckets(&self) -> impl Iterator<Item = (bool, Kind, u64)> + '_ {
        [(true, self.key), (false, self.user)]
            .into_iter()
            .filter_map(|(key, limits)| limits.map(|l| (key, l)))
            .flat_map(|(key, l)| {
                KINDS
                    .into_iter()
                    .filter_map(move |k| l.get(k).map(|limit| (key, k, limit)))
            })
    }

    /// Whether any bucket counts tokens (else an answer's tokens need not be charged).
    #[must_use]
    pub fn limits_tokens(&self) -> bool {
        self.buckets().any(|(_, k, _)| k.tokens())
    }
}

/// The bucket map.
pub struct Limiter {
    capacity: usize,
    /// A `std` mutex: the critical section is a few float operations, never an await.
    buckets: Mutex<HashMap<Subject, Buckets>>,
}

impl Limiter {
    #[must_use]
    pub fn new(capacity: usize) -> Limiter {
        Limiter {
            capacity: capacity.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Buckets tracked now.
    pub fn len(&self) -> usize {
        self.buckets.lock().expect("limiter poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits one request, counting it, or says which limit refuses it (nothing is counted
    /// then).
    pub fn admit(&self, applied: &Applied) -> Result<(), Refused> {
        self.admit_at(applied, Instant::now())
    }

    fn subjects(applied: &Applied) -> impl Iterator<Item = (Subject, Limits)> + '_ {
        let key = applied.key.map(|l| {
            (
                Subject {
                    user_id: applied.user_id.clone(),
                    key: true,
                },
                l,
            )
        });
        let user = applied.user.map(|l| {
            (
                Subject {
                    user_id: applied.user_id.clone(),
                    key: false,
                },
                l,
            )
        });
        key.into_iter().chain(user)
    }

    fn admit_at(&self, applied: &Applied, now: Instant) -> Result<(), Refused> {
        let mut map = self.buckets.lock().expect("limiter poisoned");
        let mut refusals = Vec::new();
        for (subject, limits) in Self::subjects(applied) {
            let Some(b) = map.get_mut(&subject) else {
                continue;
            };
            b.limits = limits;
            b.refill(now);
            for (i, k) in KINDS.iter().enumerate() {
                if let Some(limit) = limits.get(*k)
                    && refuses(*k, limit, b.used[i])
                {
                    refusals.push(Refused::by(*k, subject.key, limit, b.used[i]));
                }
            }
        }
        if let Some(w) = Refused::worst(refusals) {
            return Err(w);
        }
        for (subject, limits) in Self::subjects(applied) {
            if !map.contains_key(&subject) && map.len() >= self.capacity {
                self.make_room(&mut map, now);
            }
            let b = map.entry(subject).or_insert_with(|| Buckets {
                used: [0.0; 4],
                limits,
                at: now,
            });
            b.limits = limits;
            for (i, k) in KINDS.iter().enumerate() {
                if !k.tokens() && limits.get(*k).is_some() {
                    b.used[i] += 1.0;
                }
            }
        }
        Ok(())
    }

    /// Charges the tokens of a finished answer to the buckets that admitted it.
    pub fn charge(&self, applied: &Applied, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let now = Instant::now();
        let mut map = self.buckets.lock().expect("limiter poisoned");
        for (subject, limits) in Self::subjects(applied) {
            let Some(b) = map.get_mut(&subject) else {
                continue;
            };
            b.limits = limits;
            b.refill(now);
            for (i, k) in KINDS.iter().enumerate() {
                if let (true, Some(limit)) = (k.tokens(), limits.get(*k)) {
                    #[allow(clippy::cast_precision_loss)]
                    let (cap, t) = (limit as f64, tokens as f64);
                    // At most one window of debt (see the module docs).
                    b.used[i] = (b.used[i] + t).min(2.0 * cap);
                }
            }
        }
    }

    /// Frees at least one slot: refilled buckets first, else the one idle longest.
    fn make_room(&self, map: &mut HashMap<Subject, Buckets>, now: Instant) {
        map.retain(|_, b| {
            b.refill(now);
            !b.idle()
        });
        if map.len() < self.capacity {
            return;
        }
        let idlest = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone());
        if let Some(k) = idlest {
            map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(user: &str, key: Option<Limits>, u: Option<Limits>) -> Applied {
        Applied {
            user_id: user.into(),
            key,
            user: u,
        }
    }

    #[test]
    fn requests_refill_continuously() {
        let l = Limiter::new(10);
        let a = applied(
            "u",
            Some(Limits {
                rpm: Some(2),
                ..Limits::default()
            }),
            None,
        );
        let t0 = Instant::now();
        assert!(l.admit_at(&a, t0).is_ok());
        assert!(l.admit_at(&a, t0).is_ok());
        let r = l.admit_at(&a, t0).unwrap_err();
        assert!(!r.kind_tokens && r.key);
        assert_eq!((r.limit, r.used), (2, 2));
        assert_eq!(r.retry_after, Duration::from_secs(30));
        assert!(l.admit_at(&a, t0 + Duration::from_secs(29)).is_err());
        assert!(l.admit_at(&a, t0 + Duration::from_secs(31)).is_ok());
    }

    #[test]
    fn tokens_are_charged_after_and_debt_is_capped() {
        let l = Limiter::new(10);
        let lim = Limits {
            tpm: Some(100),
            ..Limits::default()
        };
        let a = applied("u", None, Some(lim));
        let t0 = Instant::now();
        assert!(l.admit_at(&a, t0).is_ok());
        l.charge(&a, u64::MAX);
        let r = l.admit(&a).unwrap_err();
        assert!(r.kind_tokens && !r.key);
        assert_eq!(r.used, 200, "debt capped at one window");
        assert!(r.retry_after <= Duration::from_secs(60));
    }

    #[test]
    fn a_refusal_counts_nothing_and_unlimited_touches_nothing() {
        let l = Limiter::new(10);
        let none = applied("u", None, None);
        for _ in 0..100 {
            assert!(l.admit(&none).is_ok());
        }
        assert!(l.is_empty(), "no limits, no state");
        let one = Limits {
            rpm: Some(1),
            ..Limits::default()
        };
        let many = Limits {
            rpm: Some(100),
            ..Limits::default()
        };
        let a = applied("u", Some(one), Some(many));
        assert!(l.admit(&a).is_ok());
        for _ in 0..5 {
            assert!(l.admit(&a).is_err());
        }
        let map = l.buckets.lock().unwrap();
        let user = map
            .get(&Subject {
                user_id: "u".into(),
                key: false,
            })
            .unwrap();
        assert!((user.used[0] - 1.0).abs() < 0.01, "refusals not counted");
    }

    /// Kind codes are stored in the shared table: they round-trip and never move.
    #[test]
    fn kind_codes_are_stable_and_buckets_come_key_first() {
        for (i, k) in KINDS.into_iter().enumerate() {
            assert_eq!(usize::try_from(k.code()).unwrap(), i);
            assert_eq!(Kind::from_code(k.code()), Some(k));
        }
        assert_eq!(Kind::from_code(-1), None);
        assert_eq!(Kind::from_code(4), None);
        let a = applied(
            "u",
            Some(Limits {
                tpd: Some(9),
                rpm: Some(1),
                ..Limits::default()
            }),
            Some(Limits {
                rpd: Some(5),
                ..Limits::default()
            }),
        );
        let got: Vec<_> = a.buckets().collect();
        assert_eq!(
            got,
            vec![
                (true, Kind::Rpm, 1),
                (true, Kind::Tpd, 9),
                (false, Kind::Rpd, 5)
            ]
        );
        assert!(a.limits_tokens());
        assert!(!applied("u", None, Some(Limits::default())).limits_tokens());
    }

    #[test]
    fn map_is_capped() {
        let l = Limiter::new(8);
        let lim = Limits {
            rpd: Some(5),
            ..Limits::default()
        };
        let t0 = Instant::now();
        for i in 0..1000 {
            let a = applied(&format!("u{i}"), Some(lim), Some(lim));
            assert!(l.admit_at(&a, t0).is_ok());
            assert!(l.len() <= 8);
        }
    }

    #[test]
    fn parsing_is_strict() {
        let ok = Limits::parse(&json!({"rpm": 60, "tpm": 100_000, "rpd": null})).unwrap();
        assert_eq!(ok.rpm, Some(60));
        assert_eq!(ok.tpm, Some(100_000));
        assert_eq!(ok.rpd, None);
        for bad in [
            json!({"rpm": -1}),
            json!({"rpm": 0}),
            json!({"rpm": 1.5}),
            json!({"rpm": "60"}),
            json!({"rpm": 1e300}),
            json!({"rpm": MAX_LIMIT + 1}),
            json!({"burst": 1}),
            json!([60]),
            json!("60"),
        ] {
            let e = Limits::parse(&bad).unwrap_err();
            assert_eq!(e.status, 422, "{bad}");
        }
        let ceiling = Limits {
            rpm: Some(10),
            ..Limits::default()
        };
        assert!(ok.within(&ceiling).is_err());
        assert!(Limits::default().within(&ceiling).is_ok());
    }
}

#[cfg(test)]
mod docs {
    /// The key-creation form documents its limits inline (no dangling schema reference).
    #[test]
    fn api_key_form_documents_limits() {
        let doc = serde_json::to_string(&crate::openapi::document()).unwrap();
        assert!(!doc.contains("#/components/schemas/Limits"), "dangling ref");
        let form = doc.find("\"ApiKeyForm\"").expect("form documented");
        assert!(doc[form..].contains("\"rpm\""), "limits fields documented");
    }
}
