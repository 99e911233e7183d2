//! Sign-in rate limiting: at most N attempts per email within a sliding window (Open
//! WebUI: 15 per 180 s). In memory: a restart forgets attempts, which only helps users.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct SigninLimiter {
    limit: u32,
    window: Duration,
    /// A `std` mutex: the critical section is a few vector operations, never an await.
    attempts: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl SigninLimiter {
    pub fn new(limit: u32, window: Duration) -> Self {
        SigninLimiter {
            limit,
            window,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// Records an attempt; false when the email is over its budget.
    pub fn allow(&self, email: &str) -> bool {
        self.allow_at(email, Instant::now())
    }

    fn allow_at(&self, email: &str, now: Instant) -> bool {
        let mut map = self.attempts.lock().expect("limiter poisoned");
        if map.len() > 10_000 {
            map.retain(|_, q| {
                q.back()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
        }
        let q = map.entry(email.to_string()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            q.pop_front();
        }
        if q.len() as u32 >= self.limit {
            return false;
        }
        q.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_slides() {
        let l = SigninLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(l.allow_at("a", t0));
        assert!(l.allow_at("a", t0));
        assert!(!l.allow_at("a", t0 + Duration::from_secs(1)));
        assert!(l.allow_at("b", t0));
        assert!(l.allow_at("a", t0 + Duration::from_secs(11)));
    }
}
