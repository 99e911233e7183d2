//! Sign-in rate limiting: at most N attempts per key (an email, or a client address) in a
//! window (Open WebUI: 15 per 180 s per email), counted with the storage's shared
//! [`Counters`], so every replica counts against one budget.
//!
//! The window is fixed, not sliding: it starts with a key's first attempt and ends
//! `window` later, when the count starts again at zero. A client over the limit is told to
//! retry when its window ends (`Retry-After`). At a window's edge a client can make up to
//! twice the limit in a short time; the limits are far above a person's typos and far below
//! what a password guesser needs, so that edge does not matter, and a fixed window is one
//! atomic increment on a shared database, where a sliding one would need every attempt's
//! time.
//!
//! Keys are SHA-256 digests of the email or address: the counters hold no emails, and any
//! email (even one with a `/`) makes a valid counter key. The embedded counters hold at most
//! [`COUNTER_CAPACITY`] keys (expired windows evicted first, then the window ending
//! soonest); the per-address limit bounds how fast one client can push others out.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::AuthError;
use crate::storage::Counters;

/// Keys the embedded counters hold: the per-email and per-address limits share them (each
/// had 10,000 when they were separate maps). An entry is a 76-byte key and a count: ~3 MiB.
pub const COUNTER_CAPACITY: usize = 20_000;

/// Sign-in attempt limits per email and per client address.
pub struct SigninLimits {
    counters: Arc<dyn Counters>,
    per_email: u64,
    per_address: u64,
    window: Duration,
}

impl SigninLimits {
    #[must_use]
    pub fn new(
        counters: Arc<dyn Counters>,
        per_email: u32,
        per_address: u32,
        window: Duration,
    ) -> SigninLimits {
        SigninLimits {
            counters,
            per_email: u64::from(per_email.max(1)),
            per_address: u64::from(per_address.max(1)),
            window,
        }
    }

    /// Counts an attempt for `email` (already trimmed and lowercased).
    ///
    /// # Errors
    /// [`AuthError::RateLimited`] over the limit; a counter store failure.
    pub async fn email(&self, email: &str) -> Result<(), AuthError> {
        self.attempt("signin-email", email, self.per_email).await
    }

    /// Counts a sign-in or sign-up attempt from a client address.
    ///
    /// # Errors
    /// [`AuthError::RateLimited`] over the limit; a counter store failure.
    pub async fn address(&self, ip: IpAddr) -> Result<(), AuthError> {
        let key = address_key(ip);
        self.attempt("signin-address", &key, self.per_address)
            .await
            .inspect_err(|e| {
                if matches!(e, AuthError::RateLimited(_)) {
                    tracing::debug!(client = %key, "sign-in attempts over the per-address limit");
                }
            })
    }

    async fn attempt(&self, kind: &str, key: &str, limit: u64) -> Result<(), AuthError> {
        let (count, left) = self
            .counters
            .increment(&counter_key(kind, key), self.window)
            .await?;
        if count > limit {
            crate::metrics::auth_failure("rate_limited");
            return Err(AuthError::RateLimited(left));
        }
        Ok(())
    }
}

/// `kind:` and the hex SHA-256 of `key`: bounded length, no character a backend refuses.
fn counter_key(kind: &str, key: &str) -> String {
    format!("{kind}:{}", hex::encode(Sha256::digest(key.as_bytes())))
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
    use crate::storage::embedded::MemoryCounters;

    #[tokio::test]
    async fn limits_count_per_key_in_a_fixed_window() {
        let counters = Arc::new(MemoryCounters::new(100));
        let l = SigninLimits::new(counters.clone(), 2, 3, Duration::from_secs(60));
        assert!(l.email("a@x.io").await.is_ok());
        assert!(l.email("a@x.io").await.is_ok());
        match l.email("a@x.io").await {
            Err(AuthError::RateLimited(wait)) => {
                assert!(wait > Duration::ZERO && wait <= Duration::from_secs(60));
            }
            other => panic!("third attempt: {other:?}"),
        }
        assert!(l.email("b@x.io").await.is_ok(), "other emails keep theirs");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.address(ip).await.is_ok());
        }
        assert!(l.address(ip).await.is_err());
        // Emails with characters a storage key may not hold are counted too.
        assert!(l.email("we/ird\u{1}@x.io").await.is_ok());
        assert_eq!(counters.len(), 4);
    }

    #[tokio::test]
    async fn a_new_window_starts_after_the_last_ends() {
        let l = SigninLimits::new(
            Arc::new(MemoryCounters::new(100)),
            1,
            1,
            Duration::from_millis(200),
        );
        assert!(l.email("a@x.io").await.is_ok());
        assert!(l.email("a@x.io").await.is_err());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(l.email("a@x.io").await.is_ok(), "the count started again");
    }

    #[test]
    fn counter_keys_are_bounded_and_plain() {
        let k = counter_key("signin-email", &"x/".repeat(1000));
        assert!(k.len() < 100);
        assert!(crate::storage::check_key(&k).is_ok());
        assert_ne!(
            counter_key("signin-email", "a"),
            counter_key("signin-address", "a")
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
