//! `[storage]` and `DATABASE_URL`: hostile and mistaken values are refused at start-up with
//! a message naming the key and never echoing a password; `serve` on PostgreSQL needs the
//! shared JWT secret and stops, saying why, when the database cannot be reached.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ragway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ragway"));
    for v in [
        "DATABASE_URL",
        "OLLAMA_BASE_URL",
        "OLLAMA_BASE_URLS",
        "WEBUI_SECRET_KEY",
        "ENV",
        "DATA_DIR",
        "PORT",
        "HOST",
    ] {
        c.env_remove(v);
    }
    c
}

/// Validates `toml` with `DATABASE_URL` = `database_url`: (success, error). A file alone
/// goes through `ragway check-config` (which reads no environment); with the variable, the
/// configuration is built as `serve` builds it.
fn check(toml: &str, database_url: Option<&str>) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let Some(u) = database_url else {
        let out = ragway().arg("check-config").arg(&path).output().unwrap();
        return (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
    };
    let env: HashMap<String, String> = [("DATABASE_URL".to_string(), u.to_string())].into();
    let file = ragway::config::read_file(&path).unwrap();
    match ragway::config::build(file, &env, &Default::default()) {
        Ok(c) => {
            assert!(
                !format!("{c:?}").contains("pw@"),
                "URL in the config's Debug"
            );
            (true, String::new())
        }
        Err(e) => (false, e.to_string()),
    }
}

#[test]
fn hostile_storage_settings_are_refused_naming_the_key() {
    let cases: &[(&str, Option<&str>, &str)] = &[
        (
            "[storage]\nbackend = \"mongodb\"\n",
            None,
            "storage.backend",
        ),
        (
            "[storage]\nbackend = \"postgres\"\n",
            None,
            "needs storage.url or DATABASE_URL",
        ),
        (
            "[storage]\nurl = \"mysql://root:secret@db/app\"\n",
            None,
            "storage.url",
        ),
        (
            "[storage]\nurl = \"postgres://u:secret@db:99999999/app\"\n",
            None,
            "storage.url: not a PostgreSQL URL",
        ),
        (
            "[storage]\nurl = \"postgres://u:secret@db/app?sslmode=require\"\n",
            None,
            "TLS",
        ),
        (
            "[storage]\nurl = \"postgres://u:secret@db\"\n",
            None,
            "no database",
        ),
        ("[storage]\nurl = \"   \"\n", None, "storage.url"),
        ("[storage]\npool-size = 0\n", None, "storage.pool-size"),
        (
            "[storage]\npool-size = 100000000\n",
            None,
            "storage.pool-size",
        ),
        ("[storage]\npasword = \"x\"\n", None, "pasword"),
        ("[storage]\nblob-dir = \"\"\n", None, "storage.blob-dir"),
        ("[storage]\nblob-dir = 7\n", None, "blob-dir"),
        ("[rag]\ningest-lease = \"1s\"\n", None, "rag.ingest-lease"),
        ("[rag]\ningest-lease = \"2h\"\n", None, "rag.ingest-lease"),
        ("[rag]\ningest-lease = \"soon\"\n", None, "rag.ingest-lease"),
        ("[storage]\nbackend = 5\n", None, "backend"),
        (
            "",
            Some("postgres://u:secret@db:notaport/app"),
            "DATABASE_URL",
        ),
        (
            "",
            Some("postgres://u:secret@db/app?sslmode=require"),
            "DATABASE_URL",
        ),
        (
            "",
            Some("postgres://u:secret@db/app\u{1}x?options=%00"),
            "DATABASE_URL",
        ),
    ];
    for (toml, env, says) in cases {
        let (ok, err) = check(toml, *env);
        assert!(!ok, "accepted: {toml:?} {env:?}");
        assert!(err.contains(says), "{toml:?} {env:?}: {err}");
        assert!(!err.contains("secret"), "password echoed: {err}");
    }
}

#[test]
fn valid_storage_settings_pass_and_sqlite_database_url_is_left_to_open_webui() {
    for (toml, env) in [
        ("", None),
        ("[storage]\nbackend = \"embedded\"\npool-size = 4\n", None),
        ("", Some("sqlite:///app/backend/data/webui.db")),
        ("[storage]\nblob-dir = \"/srv/shared/uploads\"\n", None),
        ("[rag]\ningest-lease = \"10s\"\n", None),
        (
            "[storage]\nbackend = \"postgres\"\nurl = \"postgres://u:pw@127.0.0.1:5432/ragway\"\n",
            None,
        ),
        ("", Some("postgresql://u:pw@db.internal:5432/ragway")),
        (
            "[storage]\nbackend = \"embedded\"\n",
            Some("postgres://u:pw@db.internal:5432/ragway"),
        ),
    ] {
        let (ok, err) = check(toml, env);
        assert!(ok, "{toml:?} {env:?}: {err}");
    }
}

/// Runs `serve` on a PostgreSQL URL that nothing answers (port 1): it must stop, with its
/// error on stderr.
fn serve_fails(secret: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = ragway();
    cmd.args([
        "serve",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .env("DATABASE_URL", "postgres://u:hunter2pw@127.0.0.1:1/ragway")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if let Some(s) = secret {
        cmd.env("WEBUI_SECRET_KEY", s);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve on an unreachable database kept running");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(!err.contains("hunter2pw"), "the password leaked: {err}");
    err
}

#[test]
fn serve_on_postgres_needs_the_shared_secret() {
    let err = serve_fails(None);
    assert!(err.contains("WEBUI_SECRET_KEY"), "{err}");
}

#[test]
fn serve_on_an_unreachable_postgres_stops_saying_so() {
    let err = serve_fails(Some("a-shared-secret-for-every-replica"));
    assert!(err.contains("cannot open PostgreSQL"), "{err}");
}
