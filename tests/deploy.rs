//! `ragway probe`, the health check the container image and the deploy artefacts rely on:
//! its exit code follows `/health` and `/ready` of a real gateway, and it finds the address
//! through the same environment the image sets for `ragway serve`.
//! The artefacts themselves (deploy/) are validated by `deploy/check.sh`.

mod common;

use std::process::{Command, Output};

use common::fake::FakeUpstream;
use common::gateway::{Setup, free_port};

/// The probe as a child process, with no configuration variables leaking in from the test's own
/// environment (they would change the address it derives).
fn probe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ragway"));
    for v in [
        "RAGWAY_LISTEN",
        "RAGWAY_CONFIG",
        "HOST",
        "PORT",
        "DATA_DIR",
        "OLLAMA_BASE_URL",
        "OLLAMA_BASE_URLS",
    ] {
        c.env_remove(v);
    }
    c.arg("probe").args(args).envs(env.iter().copied());
    c.output().expect("ragway probe runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exit_code_follows_health_and_readiness() {
    let up = FakeUpstream::ollama(&["m:latest"]).await;
    let gw = Setup::new().ollama(&up.url).start().await;
    let addr = host_port(&gw.url);

    let ok = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            (
                probe(&["--listen", &addr], &[]),
                probe(&["--listen", &addr, "--path", "/ready"], &[]),
            )
        }
    })
    .await
    .unwrap();
    assert!(ok.0.status.success(), "{}", stderr(&ok.0));
    assert!(
        String::from_utf8_lossy(&ok.0.stdout).contains("200"),
        "{:?}",
        ok.0
    );
    assert!(ok.1.status.success(), "{}", stderr(&ok.1));

    // The image sets RAGWAY_LISTEN=0.0.0.0:PORT and runs `ragway probe` with no arguments:
    // the wildcard address is probed on loopback.
    let port = addr.rsplit_once(':').unwrap().1.to_string();
    let wildcard = format!("0.0.0.0:{port}");
    let from_env =
        tokio::task::spawn_blocking(move || probe(&[], &[("RAGWAY_LISTEN", wildcard.as_str())]))
            .await
            .unwrap();
    assert!(from_env.status.success(), "{}", stderr(&from_env));
    // …and through Open WebUI's PORT, the other way an operator sets it.
    let via_port = tokio::task::spawn_blocking(move || {
        probe(&[], &[("HOST", "0.0.0.0"), ("PORT", port.as_str())])
    })
    .await
    .unwrap();
    assert!(via_port.status.success(), "{}", stderr(&via_port));

    // A 404 is not healthy.
    let missing = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || probe(&["--listen", &addr, "--path", "/no-such-page"], &[])
    })
    .await
    .unwrap();
    assert_eq!(missing.status.code(), Some(1), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("404"), "{}", stderr(&missing));

    // Stopped: nothing listens any more.
    gw.stop().await;
    let down = tokio::task::spawn_blocking(move || probe(&["--listen", &addr], &[]))
        .await
        .unwrap();
    assert_eq!(down.status.code(), Some(1), "{}", stderr(&down));
    assert!(
        stderr(&down).contains("cannot connect"),
        "{}",
        stderr(&down)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_of_ready_fails_while_no_upstream_is_reachable() {
    // An upstream port where nothing listens: alive (/health) but not ready (/ready → 503).
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gw = Setup::new().ollama(&dead).start().await;
    let addr = host_port(&gw.url);
    let (live, ready) = tokio::task::spawn_blocking(move || {
        (
            probe(&["--listen", &addr], &[]),
            probe(&["--listen", &addr, "--path", "/ready"], &[]),
        )
    })
    .await
    .unwrap();
    assert!(live.status.success(), "{}", stderr(&live));
    assert_eq!(ready.status.code(), Some(1), "{}", stderr(&ready));
    assert!(stderr(&ready).contains("503"), "{}", stderr(&ready));
}

#[test]
fn probe_refuses_bad_arguments_clearly() {
    let bad_timeout = probe(&["--listen", "127.0.0.1:9", "--timeout", "soon"], &[]);
    assert_eq!(bad_timeout.status.code(), Some(1));
    assert!(
        stderr(&bad_timeout).contains("--timeout"),
        "{}",
        stderr(&bad_timeout)
    );
    let bad_addr = probe(&["--listen", "localhost:3000"], &[]);
    assert_eq!(bad_addr.status.code(), Some(1));
    assert!(
        stderr(&bad_addr).contains("--listen"),
        "{}",
        stderr(&bad_addr)
    );
    let bad_env = probe(&[], &[("RAGWAY_LISTEN", "not an address")]);
    assert_eq!(bad_env.status.code(), Some(1));
    assert!(stderr(&bad_env).contains("listen"), "{}", stderr(&bad_env));
}
