//! The side-by-side benchmark still works: a short run (one round of one second per target,
//! a few scenarios, each table) of `benches/side_by_side.py` against the release binary must
//! produce its tables with numbers. No timing goal is asserted: CI shares two cores with
//! other test binaries, so only the harness itself is checked.
//!
//! Needs the release binary (`scripts/test.sh` builds it), Debian's nginx and wrk
//! (`scripts/setup.sh` installs them) and python3; builds `benches/harness` itself.

mod common;

use std::path::Path;
use std::process::Command;

/// The numeric cells of the Markdown row starting with `| {label}`: thousands separators
/// and `×` removed, dashes skipped.
fn row(table: &str, label: &str) -> Vec<f64> {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {label}")))
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{table}"));
    line.split('|')
        .skip(2)
        .map(|c| {
            c.trim()
                .trim_start_matches('+')
                .trim_end_matches('×')
                .replace(',', "")
        })
        .filter(|c| !c.is_empty() && !c.starts_with('—'))
        .map(|c| {
            c.parse::<f64>()
                .unwrap_or_else(|_| panic!("{c:?} in row {label:?} is not a number:\n{table}"))
        })
        .collect()
}

#[test]
fn quick_run_produces_the_tables() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ragway = common::release::binary();
    for tool in ["nginx", "wrk", "python3"] {
        let found = Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
            ])
            .status()
            .expect("sh runs")
            .success();
        assert!(found, "{tool} is missing: run scripts/setup.sh");
    }
    let built = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--locked",
            "--manifest-path",
            "benches/harness/Cargo.toml",
            "--target-dir",
            "target/bench-harness",
        ])
        .status()
        .expect("cargo runs");
    assert!(built.success(), "benches/harness does not build");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("side-by-side.md");
    let run = Command::new("python3")
        .current_dir(root)
        .env(
            "PATH",
            format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()),
        )
        .arg("benches/side_by_side.py")
        .args(["--rounds", "1", "--seconds", "1", "--slow-requests", "1"])
        .args(["--ttfb-requests", "10", "--json-requests", "50"])
        .args(["--only", "generate` stream, c=16", "--only", "JSON, c=16"])
        .args(["--only", "5 ms", "--only", "auth", "--only", "latency"])
        .arg("--ragway")
        .arg(&ragway)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "side_by_side.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let table = std::fs::read_to_string(&out).expect("the table file is written");
    assert_eq!(
        table,
        stdout.trim_end().to_string() + "\n",
        "stdout carries the table"
    );

    // Throughput: direct, nginx, ragway req/s, two ratios, CPU ms per request and its ratio.
    for label in [
        "`/ollama/api/generate` stream, c=16",
        "`/api/chat/completions` JSON, c=16",
    ] {
        let cells = row(&table, label);
        assert_eq!(cells.len(), 8, "{label}: {cells:?}");
        assert!(cells.iter().all(|v| *v > 0.0), "{label}: {cells:?}");
    }
    // 5 ms between chunks: CPU per request of both proxies (whole streams were timed).
    let slow = row(&table, "`/ollama/api/generate` stream, 5 ms between chunks");
    assert!(slow.len() >= 3 && slow.iter().all(|v| *v > 0.0), "{slow:?}");
    // Latency: direct/nginx/ragway, then what each proxy adds (may be ~0 or below on a
    // busy machine, so only present and numeric).
    let ttfb = row(&table, "time to first chunk");
    assert_eq!(ttfb.len(), 5, "{ttfb:?}");
    assert!(
        ttfb[..3].iter().all(|v| *v >= 4.0),
        "5 ms before the first chunk: {ttfb:?}"
    );
    for label in [
        "`/api/chat/completions` JSON, p50",
        "`/api/chat/completions` JSON, p99",
    ] {
        let cells = row(&table, label);
        assert_eq!(cells.len(), 5, "{label}: {cells:?}");
        assert!(cells[..3].iter().all(|v| *v > 0.0), "{label}: {cells:?}");
    }
    // Auth cost: the same route without a credential, with a key, with a JWT.
    for label in ["none", "API key", "JWT"] {
        let cells = row(&table, label);
        assert_eq!(cells.len(), 3, "{label}: {cells:?}");
        assert!(cells.iter().all(|v| *v > 0.0), "{label}: {cells:?}");
    }
    assert!(
        table.contains("MiB idle after start-up") && table.contains("at the end of the load run"),
        "memory line missing:\n{table}"
    );
    assert!(!table.contains("Errors"), "requests failed:\n{table}");
}
