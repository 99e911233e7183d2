//! The process heap: glibc's allocator settings, and when memory that work freed goes back
//! to the kernel. One owner, because the settings are process-wide and the work that frees
//! the most (embedding runs, ingestion commits, graph builds) lives in different modules.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

/// Large blocks (argon2's ~19 MiB, upload and embedding buffers) are mapped and unmapped
/// on their own rather than carved from per-thread heaps: glibc's dynamic threshold
/// otherwise moves large frees into arenas that keep them, and a sign-in flood on two
/// hashing threads left ~350 MiB resident (measured by `tests/memory_auth.rs`). Called once
/// by `main`, before other threads exist.
pub fn tune_for_proxy() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

const MMAP_THRESHOLD: i32 = 1024 * 1024;

/// Gives freed memory back to the kernel: first what caches registered with [`on_quiet`]
/// keep (ONNX Runtime's activation arena), then every malloc arena's free pages.
pub fn release_free_memory() {
    let caches: Vec<Arc<dyn Release>> = {
        let mut caches = lock_caches();
        caches.retain(|c| c.strong_count() > 0);
        caches.iter().filter_map(Weak::upgrade).collect()
    };
    for cache in caches {
        cache.release();
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A cache that keeps freed memory for reuse while work runs.
pub trait Release: Send + Sync {
    /// Gives what it keeps and does not use now back to the kernel.
    fn release(&self);
}

static CACHES: Mutex<Vec<Weak<dyn Release>>> = Mutex::new(Vec::new());

fn lock_caches() -> MutexGuard<'static, Vec<Weak<dyn Release>>> {
    CACHES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `cache` to be released once work is quiet, for as long as it lives. Dropped
/// caches leave the list here too, so it holds one entry per live cache however many come
/// and go (tests load many models).
pub fn on_quiet(cache: Weak<dyn Release>) {
    let mut caches = lock_caches();
    caches.retain(|c| c.strong_count() > 0);
    caches.push(cache);
}

/// How long memory-heavy work must be quiet before freed memory goes back: longer than the
/// gap between one file's batches and the next file's, short beside "after ingestion".
const QUIET_FOR: Duration = Duration::from_millis(500);

/// Memory-heavy work in flight (embedding batches, whole ingestion jobs up to their commit,
/// graph builds). When the last one ends and nothing starts for [`QUIET_FOR`], freed memory
/// goes back to the kernel: not after each batch, which made the next one fault its pages
/// in again, and not before the commit that follows the last batch, whose frees would
/// otherwise stay in the arenas.
#[derive(Default)]
struct Quiet {
    running: AtomicUsize,
    /// Bumped when work starts: a scheduled trim that sees another value stands down.
    epoch: AtomicU64,
}

/// The process's one tracker: the allocator it guards is process-wide too.
static QUIET: Quiet = Quiet {
    running: AtomicUsize::new(0),
    epoch: AtomicU64::new(0),
};

/// Marks memory-heavy work until the guard drops.
#[must_use = "the work counts as running only while the guard lives"]
pub fn busy() -> Busy {
    QUIET.begin()
}

impl Quiet {
    fn begin(&'static self) -> Busy {
        self.running.fetch_add(1, Ordering::AcqRel);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Busy(self)
    }

    /// Whether no work has run since `epoch` was read and none runs now.
    fn still_quiet(&self, epoch: u64) -> bool {
        self.running.load(Ordering::Acquire) == 0 && self.epoch.load(Ordering::Acquire) == epoch
    }
}

/// One piece of running memory-heavy work; the last one to end schedules the trim.
pub struct Busy(&'static Quiet);

impl Drop for Busy {
    fn drop(&mut self) {
        let quiet = self.0;
        if quiet.running.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let epoch = quiet.epoch.load(Ordering::Acquire);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // A plain thread (a graph build, a CLI embedding): trim now, on this thread.
            release_free_memory();
            return;
        };
        rt.spawn(async move {
            tokio::time::sleep(QUIET_FOR).await;
            if quiet.still_quiet(epoch) {
                // malloc_trim walks every arena: off the threads that serve requests.
                let _ = tokio::task::spawn_blocking(release_free_memory).await;
            }
        });
    }
}

/// Requests the gateway has taken (see [`note_request`]).
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// How long the gateway must see no new request before what its requests freed goes back.
pub const REQUESTS_QUIET_FOR: Duration = Duration::from_secs(1);

/// Counts a request. Proxy load leaves freed blocks in glibc's per-thread heaps (connection
/// and header buffers, per-request state): measured ~7 MiB of a 35 MiB gateway after a burst,
/// which [`trim_when_requests_stop`] gives back. One relaxed increment: nothing per request
/// waits for, or schedules, anything.
pub fn note_request() {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
}

/// Whether a look at the request count finds the end of a busy period.
#[derive(Default)]
struct RequestWatch {
    seen: u64,
    busy: bool,
}

impl RequestWatch {
    /// `count` is the request count now: true once per busy period, at the first look that
    /// finds no new request since the previous look.
    fn ended(&mut self, count: u64) -> bool {
        if count != self.seen {
            self.seen = count;
            self.busy = true;
            return false;
        }
        std::mem::take(&mut self.busy)
    }
}

/// Releases free memory ([`release_free_memory`]) each time requests stop for
/// [`REQUESTS_QUIET_FOR`]; runs until the future is dropped. A stream still in flight keeps
/// its blocks: a trim only gives back what is free.
pub async fn trim_when_requests_stop() {
    let mut watch = RequestWatch {
        seen: REQUESTS.load(Ordering::Relaxed),
        busy: false,
    };
    let mut tick = tokio::time::interval(REQUESTS_QUIET_FOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if watch.ended(REQUESTS.load(Ordering::Relaxed)) {
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(AtomicUsize);

    impl Release for Counting {
        fn release(&self) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }

    #[test]
    fn live_caches_are_released_and_dropped_ones_leave_the_list() {
        let live = Arc::new(Counting(AtomicUsize::new(0)));
        let weak: Weak<Counting> = Arc::downgrade(&live);
        on_quiet(weak);
        // Owners that come and go (a model per test app) must not grow the list.
        for _ in 0..100 {
            let gone = Arc::new(Counting(AtomicUsize::new(0)));
            let weak: Weak<Counting> = Arc::downgrade(&gone);
            on_quiet(weak);
        }
        // Other tests of this binary may hold a few live caches of their own.
        assert!(lock_caches().len() < 10, "dropped caches stayed registered");
        release_free_memory();
        assert!(
            live.0.load(Ordering::Acquire) >= 1,
            "the live cache was released"
        );
        let ours: Weak<dyn Release> = Arc::downgrade(&live) as Weak<Counting>;
        drop(live);
        release_free_memory();
        assert!(
            !lock_caches().iter().any(|c| Weak::ptr_eq(c, &ours)),
            "a release pass drops the caches whose owners are gone"
        );
    }

    #[test]
    fn a_busy_period_ends_once_at_the_first_look_without_a_new_request() {
        let mut w = RequestWatch::default();
        assert!(!w.ended(0), "nothing happened yet");
        assert!(!w.ended(5), "requests came in");
        assert!(!w.ended(9), "still coming");
        assert!(w.ended(9), "a look without a new request: the period ended");
        assert!(!w.ended(9), "once per period");
        assert!(!w.ended(9));
        assert!(!w.ended(10), "a new period");
        assert!(w.ended(10));
    }

    #[test]
    fn the_trim_waits_for_the_last_piece_of_work() {
        // A tracker of its own: other tests' work must not move its counts.
        let quiet: &'static Quiet = Box::leak(Box::default());
        let first = quiet.begin();
        let second = quiet.begin();
        let epoch = quiet.epoch.load(Ordering::Acquire);
        drop(first);
        assert!(!quiet.still_quiet(epoch), "one piece still runs");
        drop(second);
        assert!(quiet.still_quiet(epoch), "all work ended, nothing started");
        // Work that starts before the quiet period ends makes the scheduled trim stand down,
        // even once it has ended too (its own end schedules a later one).
        drop(quiet.begin());
        assert!(!quiet.still_quiet(epoch));
    }
}
