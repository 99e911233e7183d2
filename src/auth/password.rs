//! Password hashing with argon2id (the `argon2` crate, RustCrypto): a memory-hard,
//! standard PHC format, with constant-time verification done by the crate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tokio::sync::Semaphore;

/// Hashes a password into a PHC string.
pub fn hash(password: &str) -> String {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters cannot fail")
        .to_string()
}

/// Checks a password against a PHC string. A malformed hash verifies as false.
pub fn verify(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A hash of a random password, verified against when the email is unknown so that
/// sign-in takes the same time whether or not the account exists.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash(&uuid::Uuid::new_v4().to_string()))
}

/// Why a hash could not be computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateError {
    /// Every hashing slot is busy and the queue is full: the caller should retry later.
    Busy,
    /// The hashing task panicked or the runtime is shutting down.
    Failed,
}

/// Bounds password hashing: each argon2 run takes ~19 MiB and tens of milliseconds of CPU,
/// so an unbounded flood of sign-ins (each on its own blocking thread) would take gigabytes
/// and starve every other request. At most `concurrency` hashes run at once; at most `queue`
/// more wait; anything beyond is refused at once instead of piling up.
///
/// Hashes run on `concurrency` threads of their own, not on tokio's blocking pool: that pool
/// starts a new thread whenever none is idle at the instant of a call, and each new thread
/// gets its own allocator arena that keeps its 19 MiB block afterwards (measured: +600 MiB
/// peak RSS for 34 sequential hashes). A fixed set of threads bounds that to one block each.
pub struct HashGate {
    permits: Arc<Semaphore>,
    jobs: mpsc::Sender<Job>,
    /// Attempts running or waiting.
    admitted: Arc<AtomicUsize>,
    capacity: usize,
}

/// One admitted attempt; releases its place when dropped (also when the client goes away
/// while waiting, or when the blocking task ends).
struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

type Job = Box<dyn FnOnce() + Send>;

impl HashGate {
    pub fn new(concurrency: usize, queue: usize) -> HashGate {
        let concurrency = concurrency.max(1);
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..concurrency {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("ragway-hash-{i}"))
                .spawn(move || {
                    loop {
                        // The guard is a temporary: released before the job runs.
                        let job = rx.lock().expect("hash queue poisoned").recv();
                        let Ok(job) = job else {
                            // The gate was dropped: no more work.
                            return;
                        };
                        // A panicking job must not take the thread down with it; its caller
                        // sees its answer channel closed.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })
                .expect("a password hashing thread starts");
        }
        HashGate {
            permits: Arc::new(Semaphore::new(concurrency)),
            jobs,
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity: concurrency.saturating_add(queue),
        }
    }

    /// Attempts running or waiting now.
    pub fn in_use(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    /// Runs `work` (a hash or a verification) on a hashing thread once a slot is free.
    pub async fn run<T, F>(&self, work: F) -> Result<T, GateError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let before = self.admitted.fetch_add(1, Ordering::AcqRel);
        let admission = Admission(self.admitted.clone());
        if before >= self.capacity {
            return Err(GateError::Busy);
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| GateError::Failed)?;
        // The permit and the admission move into the task: a client that hangs up does not
        // free the slot while its hash still runs.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let result = work();
            drop((permit, admission));
            let _ = tx.send(result);
        });
        self.jobs.send(job).map_err(|_| GateError::Failed)?;
        rx.await.map_err(|_| GateError::Failed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::{GateError, HashGate};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gate_bounds_running_and_waiting() {
        let gate = Arc::new(HashGate::new(2, 3));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (gate, running, peak, rx) = (
                gate.clone(),
                running.clone(),
                peak.clone(),
                release_rx.clone(),
            );
            tasks.push(tokio::spawn(async move {
                gate.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    rx.lock().unwrap().recv().unwrap();
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            }));
        }
        // Five admitted (two running, three waiting): the sixth is refused at once.
        while gate.in_use() < 5 || running.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(gate.run(|| ()).await, Err(GateError::Busy));
        assert_eq!(gate.in_use(), 5, "a refused attempt takes no place");
        for _ in 0..5 {
            release_tx.send(()).unwrap();
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(()));
        }
        assert_eq!(
            peak.load(Ordering::SeqCst),
            2,
            "never more than two at once"
        );
        assert_eq!(gate.in_use(), 0);
        assert_eq!(gate.run(|| 7).await, Ok(7), "free again");
    }

    #[test]
    fn round_trip() {
        let h = super::hash("correct horse");
        assert!(h.starts_with("$argon2id$"));
        assert!(super::verify("correct horse", &h));
        assert!(!super::verify("wrong", &h));
        assert!(!super::verify("x", "not a hash"));
    }
}
