//! Extraction in a memory-capped child process.
//!
//! Parsers of hostile files can do what no limit inside them catches: loop for ever, recurse
//! until the stack overflows, or allocate in a place nobody bounded. A thread that times out
//! cannot be stopped and keeps its CPU and memory; a child process can be killed. So the
//! gateway re-executes its own binary (`ragway extract-worker`, a hidden subcommand) for each
//! file: the child reads a JSON request on stdin, caps its own address space
//! (`RLIMIT_AS`) and CPU time (`RLIMIT_CPU`), extracts with the inflation [`Limits`] and writes
//! the document as JSON on stdout. The parent kills it at the wall-clock timeout and turns any
//! crash into a message for the file's `error`.
//!
//! Cost, measured on the release binary on the shared 2-core VM: 200 sequential
//! `ragway extract-worker` runs on a 2 KiB text file took 1.36 s, about 7 ms per file (spawn,
//! exec, dynamic loading, JSON both ways, and the shell loop that drove it), where extracting
//! the same file in a thread takes well under a millisecond. Against embedding (tens of
//! milliseconds per file at least) the child's cost does not show, so it is the default
//! whenever the extractor binary is known.
//!
//! Plain text and Markdown skip the child ([`super::needs_isolation`]): their loader only
//! decodes, in linear time, into the text the gateway holds and chunks anyway, so the child
//! guarded nothing while its spawn was the largest fixed cost of a small file (in the ingest
//! benchmark, 40 abstracts as separate `.txt` uploads; see README, "Ingestion").
//!
//! When no extractor binary is available (tests running the gateway in-process, whose
//! executable is the test binary, or `rag.extractor = "in-process"`), extraction runs in the
//! calling thread: still bounded by the inflation limits, but not by a memory cap, and a
//! runaway parser keeps its thread after the timeout.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Document, Limits, Page};

/// The hidden subcommand of the `ragway` binary that runs [`worker_main`].
pub const WORKER_SUBCOMMAND: &str = "extract-worker";

/// How files are extracted.
#[derive(Debug, Clone)]
pub struct Options {
    /// Inflation limits, in the child and in process alike.
    pub limits: Limits,
    /// The `ragway` binary to run as the child; `None` extracts in the calling thread.
    pub extractor: Option<PathBuf>,
    /// Address-space limit of the child, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock limit; the child also gets it (rounded up) as its CPU-time limit.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: Limits::default(),
            extractor: None,
            memory_bytes: 1024 * 1024 * 1024,
            timeout: Duration::from_secs(300),
        }
    }
}

/// The extractor binary by default: our own executable when it is the `ragway` binary (not a
/// test harness or another program embedding the library).
pub fn default_extractor() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    (exe.file_name()? == "ragway").then_some(exe)
}

/// What the parent sends the child.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    path: PathBuf,
    name: String,
    content_type: Option<String>,
    max_stream_bytes: u64,
    max_total_bytes: u64,
    memory_bytes: u64,
    cpu_secs: u64,
}

/// What the child answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Document { kind: String, pages: Vec<WirePage> },
    Error(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct WirePage {
    text: String,
    page: Option<u32>,
}

/// Extracts the file at `path`. Blocking: run it on a blocking thread. The error is a message
/// for the file's `error` field.
pub fn extract_file(
    path: &Path,
    name: &str,
    content_type: Option<&str>,
    options: &Options,
) -> Result<Document, String> {
    match &options.extractor {
        Some(bin) if super::needs_isolation(name, content_type) => {
            run_child(bin, path, name, content_type, options)
        }
        _ => {
            let bytes =
                std::fs::read(path).map_err(|e| format!("cannot read the stored file: {e}"))?;
            super::extract_with(&bytes, name, content_type, &options.limits)
                .map_err(|e| e.to_string())
        }
    }
}

/// Largest answer read from a child: the text cannot be longer than what the file inflates
/// to, and JSON escaping at most sextuples it (`\u0001`).
fn reply_cap(limits: &Limits) -> u64 {
    limits
        .max_total_bytes
        .saturating_add(limits.max_stream_bytes)
        .saturating_mul(6)
        .saturating_add(1024 * 1024)
}

fn run_child(
    bin: &Path,
    path: &Path,
    name: &str,
    content_type: Option<&str>,
    options: &Options,
) -> Result<Document, String> {
    let request = Request {
        path: path.to_path_buf(),
        name: name.to_owned(),
        content_type: content_type.map(str::to_owned),
        max_stream_bytes: options.limits.max_stream_bytes,
        max_total_bytes: options.limits.max_total_bytes,
        memory_bytes: options.memory_bytes,
        cpu_secs: options.timeout.as_secs().max(1) + 1,
    };
    let mut child = Command::new(bin)
        .arg(WORKER_SUBCOMMAND)
        .env("RAGWAY_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the text extractor {}: {e}", bin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A child that dies before reading its request is reported by its exit status.
        let _ = stdin.write_all(&serde_json::to_vec(&request).expect("request serialises"));
    }
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let cap = reply_cap(&options.limits);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let read = stdout.take(cap + 1).read_to_end(&mut out);
        let _ = tx.send(read.map(|_| out));
    });
    // Keep the first KiBs of stderr for the diagnosis and drain the rest, so the child never
    // blocks on a full pipe.
    let errors = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut stderr = stderr;
        let _ = (&mut stderr).take(8 * 1024).read_to_end(&mut kept);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&kept).into_owned()
    });
    let answer = rx.recv_timeout(options.timeout);
    let timed_out = answer.is_err();
    let too_long = matches!(&answer, Ok(Ok(out)) if out.len() as u64 > cap);
    if timed_out || too_long {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| format!("text extractor failed: {e}"))?;
    let stderr = errors.join().unwrap_or_default();
    if timed_out {
        return Err(format!(
            "text extraction took longer than {}s",
            options.timeout.as_secs()
        ));
    }
    if too_long {
        return Err(format!(
            "extracted text is larger than {}",
            super::limits::size_label(cap)
        ));
    }
    let out = match answer {
        Ok(Ok(out)) => out,
        _ => Vec::new(),
    };
    if !status.success() {
        tracing::warn!(status = %status, stderr = %stderr.trim(), "text extractor failed");
        return Err(crash_message(status, &stderr, options));
    }
    match serde_json::from_slice::<Reply>(&out) {
        Ok(Reply::Document { kind, pages }) => Ok(Document {
            kind: static_kind(&kind).ok_or("text extractor answered an unknown kind")?,
            pages: pages
                .into_iter()
                .map(|p| Page {
                    text: p.text,
                    page: p.page,
                })
                .collect(),
        }),
        Ok(Reply::Error(message)) => Err(message),
        Err(e) => Err(format!("text extractor answered garbage: {e}")),
    }
}

/// Why a child ended badly, in words for the user.
fn crash_message(status: std::process::ExitStatus, stderr: &str, options: &Options) -> String {
    use std::os::unix::process::ExitStatusExt;
    let memory = || {
        format!(
            "text extraction exceeded its memory limit of {}",
            super::limits::size_label(options.memory_bytes)
        )
    };
    if stderr.contains("memory allocation") || stderr.contains("out of memory") {
        return memory();
    }
    match status.signal() {
        Some(libc::SIGXCPU) => format!(
            "text extraction used more than {}s of CPU",
            options.timeout.as_secs()
        ),
        // Rust aborts when an allocation fails; under RLIMIT_AS that is the usual cause.
        Some(libc::SIGABRT) => memory(),
        Some(libc::SIGSEGV | libc::SIGBUS) => {
            "text extraction crashed (stack overflow or bad memory access)".to_owned()
        }
        Some(sig) => format!("text extraction was killed by signal {sig}"),
        None => "text extraction crashed".to_owned(),
    }
}

fn static_kind(kind: &str) -> Option<&'static str> {
    [
        "pdf", "docx", "html", "markdown", "csv", "json", "xml", "text",
    ]
    .into_iter()
    .find(|k| *k == kind)
}

/// Sets a resource limit of this process (soft and hard).
fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `setrlimit` only reads the struct we pass; it has no other memory effects.
    if unsafe { libc::setrlimit(resource, &raw const limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The child: `ragway extract-worker`. Reads a request on stdin, limits itself, extracts,
/// answers on stdout. Exit code 0 whenever it could answer (even with an extraction error).
pub fn worker_main() -> ExitCode {
    let mut input = Vec::new();
    if std::io::stdin()
        .take(1024 * 1024)
        .read_to_end(&mut input)
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    let Ok(req) = serde_json::from_slice::<Request>(&input) else {
        eprintln!("ragway extract-worker: expected a JSON request on stdin");
        return ExitCode::FAILURE;
    };
    if let Err(e) = set_limit(libc::RLIMIT_AS, req.memory_bytes)
        .and_then(|()| set_limit(libc::RLIMIT_CPU, req.cpu_secs))
    {
        eprintln!("ragway extract-worker: cannot set resource limits: {e}");
        return ExitCode::FAILURE;
    }
    let limits = Limits {
        max_stream_bytes: req.max_stream_bytes,
        max_total_bytes: req.max_total_bytes,
    };
    let reply = match std::fs::read(&req.path) {
        Err(e) => Reply::Error(format!("cannot read the stored file: {e}")),
        Ok(bytes) => {
            match super::extract_with(&bytes, &req.name, req.content_type.as_deref(), &limits) {
                Ok(doc) => Reply::Document {
                    kind: doc.kind.to_owned(),
                    pages: doc
                        .pages
                        .into_iter()
                        .map(|p| WirePage {
                            text: p.text,
                            page: p.page,
                        })
                        .collect(),
                },
                Err(e) => Reply::Error(e.to_string()),
            }
        }
    };
    let mut out = std::io::stdout().lock();
    if serde_json::to_writer(&mut out, &reply).is_err() || out.flush().is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_without_extractor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, "hello").unwrap();
        let doc = extract_file(&path, "a.txt", None, &Options::default()).unwrap();
        assert_eq!(doc.full_text(), "hello");
        let err =
            extract_file(&dir.path().join("gone"), "a.txt", None, &Options::default()).unwrap_err();
        assert!(err.starts_with("cannot read the stored file"), "{err}");
    }

    #[test]
    fn test_binary_is_not_an_extractor() {
        assert_eq!(default_extractor(), None);
    }

    #[test]
    fn a_missing_extractor_is_a_clear_error() {
        let options = Options {
            extractor: Some(PathBuf::from("/nonexistent/ragway")),
            ..Options::default()
        };
        let err = extract_file(Path::new("/dev/null"), "a.pdf", None, &options).unwrap_err();
        assert!(err.starts_with("cannot start the text extractor"), "{err}");
    }

    #[test]
    fn plain_text_and_markdown_skip_the_child_other_formats_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "# Pumps\r\nvalves").unwrap();
        // An extractor that cannot start: whatever reaches it fails.
        let options = Options {
            extractor: Some(PathBuf::from("/nonexistent/ragway")),
            ..Options::default()
        };
        for (name, content_type) in [
            ("a.txt", None),
            ("notes.md", None),
            ("Makefile", None),
            ("upload", Some("text/plain")),
        ] {
            let doc = extract_file(&path, name, content_type, &options)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(doc.full_text(), "# Pumps\nvalves", "{name}");
        }
        for name in ["a.pdf", "a.docx", "a.html", "a.csv", "a.json", "a.xml"] {
            let err = extract_file(&path, name, None, &options).unwrap_err();
            assert!(
                err.starts_with("cannot start the text extractor"),
                "{name}: {err}"
            );
        }
        // Refused by name before any byte is read, child or not.
        let err = extract_file(&path, "a.exe", None, &options).unwrap_err();
        assert!(err.contains(".exe"), "{err}");
    }

    #[test]
    fn child_that_hangs_is_killed_at_the_timeout() {
        use std::os::unix::fs::PermissionsExt;
        // A child that never answers: the parent must kill it, not wait for it.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hang");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let options = Options {
            extractor: Some(script),
            timeout: Duration::from_secs(1),
            ..Options::default()
        };
        let err = extract_file(Path::new("/dev/null"), "a.pdf", None, &options).unwrap_err();
        assert_eq!(err, "text extraction took longer than 1s");
    }

    #[test]
    fn child_garbage_and_crashes_are_reported() {
        let options = Options {
            extractor: Some(PathBuf::from("/bin/echo")),
            ..Options::default()
        };
        let err = extract_file(Path::new("/dev/null"), "a.pdf", None, &options).unwrap_err();
        assert!(err.starts_with("text extractor answered garbage"), "{err}");
        let options = Options {
            extractor: Some(PathBuf::from("/bin/false")),
            ..Options::default()
        };
        let err = extract_file(Path::new("/dev/null"), "a.pdf", None, &options).unwrap_err();
        assert_eq!(err, "text extraction crashed");
    }

    #[test]
    fn replies_round_trip() {
        let reply = Reply::Document {
            kind: "pdf".into(),
            pages: vec![WirePage {
                text: "x\u{1}y".into(),
                page: Some(2),
            }],
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert!(matches!(
            serde_json::from_str::<Reply>(&json).unwrap(),
            Reply::Document { .. }
        ));
        assert_eq!(static_kind("markdown"), Some("markdown"));
        assert_eq!(static_kind("exe"), None);
    }
}
