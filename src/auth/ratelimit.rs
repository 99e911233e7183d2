//! Sign-in rate limiting: at most N attempts per key (an email, or a client address) within
//! a sliding window (Open WebUI: 15 per 180 s per email). In memory: a restart forgets
//! attempts, which only helps users.
//!
//! The map is capped: an attacker rotating emails or addresses must not grow it without
//! bound. When full, expired keys are dropped first, then the key idle the longest. Evicting
//! a key forgets its attempts, so the cap is set well above what a window sees in normal use;
//! the per-address limit bounds how fast one client can push others out.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys tracked per limiter by default: with at most `limit` instants each (16 bytes), plus
/// the key (at most 254 bytes, emails are checked first), this is a few MiB at most.
pub const DEFAULT_CAPACITY: usize = 10_000;

pub struct SigninLimiter {
    limit: usize,
    window: Duration,
    capacity: usize,
    /// A `std` mutex: the critical section is a few map operations, never an await.
    attempts: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl SigninLimiter {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self::with_capacity(limit, window, DEFAULT_CAPACITY)
    }

    pub fn with_capacity(limit: u32, window: Duration, capacity: usize) -> Self {
        SigninLimiter {
            limit: usize::try_from(limit).unwrap_or(usize::MAX).max(1),
            window,
            capacity: capacity.max(1),
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// Records an attempt. `Err(wait)` when `key` is over its budget: `wait` is how long until
    /// its oldest attempt leaves the window (for `Retry-After`).
    pub fn allow(&self, key: &str) -> Result<(), Duration> {
        self.allow_at(key, Instant::now())
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.attempts.lock().expect("limiter poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn allow_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut map = self.attempts.lock().expect("limiter poisoned");
        if !map.contains_key(key) && map.len() >= self.capacity {
            self.make_room(&mut map, now);
        }
        let q = map.entry(key.to_string()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            q.pop_front();
        }
        if q.len() >= self.limit {
            let oldest = *q.front().expect("a full queue has a front");
            return Err(self.window.saturating_sub(now.duration_since(oldest)));
        }
        q.push_back(now);
        Ok(())
    }

    /// Frees at least one slot: keys with no attempt left in the window go first (one pass,
    /// so a full map costs O(n) once per window at most); if every key is live, the one whose
    /// last attempt is oldest is evicted.
    fn make_room(&self, map: &mut HashMap<String, VecDeque<Instant>>, now: Instant) {
        map.retain(|_, q| {
            q.back()
                .is_some_and(|t| now.duration_since(*t) < self.window)
        });
        if map.len() < self.capacity {
            return;
        }
        let idlest = map
            .iter()
            .min_by_key(|(_, q)| q.back().copied())
            .map(|(k, _)| k.clone());
        if let Some(k) = idlest {
            map.remove(&k);
        }
    }
}

/// The limiter key of a client address: the IPv4 address, or the /64 prefix of an IPv6
/// address (one host usually owns a whole /64, so per-address limits would be void).
pub fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_slides() {
        let l = SigninLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(l.allow_at("a", t0).is_ok());
        assert!(l.allow_at("a", t0).is_ok());
        assert_eq!(
            l.allow_at("a", t0 + Duration::from_secs(1)),
            Err(Duration::from_secs(9)),
            "retry once the oldest attempt leaves the window"
        );
        assert!(l.allow_at("b", t0).is_ok());
        assert!(l.allow_at("a", t0 + Duration::from_secs(11)).is_ok());
    }

    #[test]
    fn map_is_capped_and_evicts_expired_then_idlest() {
        let l = SigninLimiter::with_capacity(3, Duration::from_secs(10), 4);
        let t0 = Instant::now();
        // Rotating keys never grow the map past its cap.
        for i in 0..1000u64 {
            assert!(
                l.allow_at(&format!("k{i}"), t0 + Duration::from_millis(i))
                    .is_ok()
            );
            assert!(l.len() <= 4, "{} keys tracked", l.len());
        }
        assert_eq!(l.len(), 4);

        // When full of live keys, the one idle longest goes; the others keep their counts.
        let l = SigninLimiter::with_capacity(2, Duration::from_secs(10), 2);
        assert!(l.allow_at("old", t0).is_ok());
        assert!(l.allow_at("busy", t0 + Duration::from_secs(1)).is_ok());
        assert!(l.allow_at("busy", t0 + Duration::from_secs(1)).is_ok());
        assert!(l.allow_at("new", t0 + Duration::from_secs(2)).is_ok());
        assert_eq!(l.len(), 2);
        assert!(
            l.allow_at("busy", t0 + Duration::from_secs(3)).is_err(),
            "busy kept its attempts"
        );

        // Expired keys are dropped before any live one.
        let l = SigninLimiter::with_capacity(1, Duration::from_secs(10), 2);
        assert!(l.allow_at("a", t0).is_ok());
        assert!(l.allow_at("b", t0 + Duration::from_secs(9)).is_ok());
        assert!(l.allow_at("c", t0 + Duration::from_secs(11)).is_ok());
        assert!(
            l.allow_at("b", t0 + Duration::from_secs(12)).is_err(),
            "b was live and kept"
        );
    }

    #[test]
    fn ipv6_hosts_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        assert_eq!(address_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(address_key("10.0.0.1".parse().unwrap()), "10.0.0.1");
    }
}
