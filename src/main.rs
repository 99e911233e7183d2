//! The `ragway` binary: parses the command line and calls into the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use ragway::config::cli::{Cli, Command, CommonArgs, KeyAction, UserAction};
use ragway::config::{self, Overrides, ProcessEnv};
use ragway::store::Role;

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RAGWAY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pingora=warn"));
    let json = std::env::var("RAGWAY_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ragway: {msg}");
    ExitCode::FAILURE
}

fn open_app(overrides: &Overrides) -> Result<ragway::app::App, String> {
    let config = config::load(&ProcessEnv, overrides).map_err(|e| e.to_string())?;
    ragway::app::App::open(config).map_err(|e| e.to_string())
}

/// `serve --upgrade`: takes the listening sockets, then the database, over from the ragway
/// running on the same data dir (it is sent SIGQUIT once this one waits), then serves.
fn serve_upgrading(overrides: &Overrides) -> ExitCode {
    let config = match config::load(&ProcessEnv, overrides) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let socket = ragway::server::upgrade_socket(&config);
    let mut server = None;
    let app = ragway::app::App::open_upgrading(
        config.clone(),
        ragway::server::UPGRADE_WAIT,
        || {
            tracing::info!(socket = %socket.display(), "waiting for the running ragway's sockets (send it SIGQUIT)");
            match ragway::server::new_server(&config, true) {
                Ok(s) => server = Some(s),
                // Nothing was handed over: the running process keeps serving.
                Err(e) => {
                    eprintln!("ragway: {e}");
                    std::process::exit(1);
                }
            }
            let marker = ragway::server::upgrade_marker(&config);
            if let Err(e) = std::fs::write(&marker, std::process::id().to_string()) {
                tracing::error!(error = %e, path = %marker.display(), "cannot tell the old process the sockets arrived");
            }
            tracing::info!("sockets taken over; waiting for the database");
        },
    );
    let (app, server) = match (app, server) {
        (Ok(app), Some(server)) => (app, server),
        (Err(e), _) => return fail(e),
        (Ok(_), None) => return fail("the upgrade hand-over did not run"),
    };
    let _ = std::fs::remove_file(ragway::server::upgrade_marker(&app.config));
    tracing::info!(listen = %app.config.listen, "ragway took over; serving");
    ragway::server::run_on(server, Arc::new(app));
    ExitCode::SUCCESS
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `ragway probe`: the address comes from the same layers `serve` reads, so a HEALTHCHECK
/// in an image configured through the environment needs no arguments.
fn probe(common: &CommonArgs, listen: Option<String>, path: &str, timeout: &str) -> ExitCode {
    let timeout = match config::duration::parse_finite(timeout) {
        Ok(t) => t,
        Err(e) => return fail(format!("--timeout: {e}")),
    };
    let listen = match listen {
        Some(l) => l,
        None => match config::load(&ProcessEnv, &Overrides::from(common)) {
            Ok(c) => c.listen,
            Err(e) => return fail(e),
        },
    };
    let addr = match ragway::probe::target(&listen) {
        Ok(a) => a,
        Err(e) => return fail(format!("--listen: {e}")),
    };
    match ragway::probe::check(addr, path, timeout) {
        Ok(code) => {
            println!("GET {path} on {addr}: {code}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn main() -> ExitCode {
    ragway::heap::tune_for_proxy();
    let cli = Cli::parse();
    if matches!(cli.command, Command::ExtractWorker) {
        // No logging set-up: the child's stdout is its answer, stderr its crash report.
        return ragway::extract::isolate::worker_main();
    }
    init_logging();
    match cli.command {
        Command::ExtractWorker => unreachable!("handled above"),
        Command::Serve(args) if args.upgrade => serve_upgrading(&Overrides::from(&args)),
        Command::Serve(args) => {
            let app = match open_app(&Overrides::from(&args)) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            tracing::info!(
                listen = %app.config.listen,
                metrics = app.config.metrics_listen.as_deref().unwrap_or("off"),
                data_dir = %app.config.data_dir.display(),
                ollama = app.config.ollama.len(),
                openai = app.config.openai.len(),
                "ragway starting"
            );
            ragway::server::run_forever(Arc::new(app));
            ExitCode::SUCCESS
        }
        Command::Probe {
            common,
            listen,
            path,
            timeout,
        } => probe(&common, listen, &path, &timeout),
        Command::Migrate { common, to, resume } => {
            let config = match config::load(&ProcessEnv, &Overrides::from(&common)) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("files {bar:40} {pos}/{len} {elapsed}")
                    .expect("static template"),
            );
            let result = runtime().block_on(ragway::commands::migrate::run(
                &config.data_dir,
                &to,
                resume,
                config.auth.secret_key.is_some(),
                &bar,
            ));
            bar.finish_and_clear();
            match result {
                Ok(summary) => {
                    print!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::CheckConfig { file } => match config::check_file(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::User {
            action:
                UserAction::Add {
                    common,
                    email,
                    password,
                    name,
                    role,
                },
        } => {
            let Some(role) = Role::parse(&role) else {
                return fail(format!("--role {role:?}: use admin, user or pending"));
            };
            let app = match open_app(&Overrides::from(&common)) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let name =
                name.unwrap_or_else(|| email.split('@').next().unwrap_or("user").to_string());
            match runtime().block_on(app.add_user(&email, &password, &name, role)) {
                Ok(u) => {
                    println!("created {} ({}) id={}", u.email, u.role.as_str(), u.id);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.detail),
            }
        }
        Command::Eval {
            common,
            dataset,
            qrels,
            mode,
            bm25_weight,
            fusion,
            candidates,
            bm25_k1,
            bm25_b,
            file_weight,
            prf,
            k,
            run_dir,
            json,
        } => {
            let modes: Option<Vec<_>> = mode
                .iter()
                .map(|m| ragway::commands::eval::parse_mode(m.trim()))
                .collect();
            let Some(modes) = modes else {
                return fail("--mode: use dense, bm25 and/or hybrid");
            };
            if k == 0 || k > 1000 {
                return fail("--k: between 1 and 1000");
            }
            for (name, list, max) in [
                ("--bm25-weight", &bm25_weight, 1.0),
                ("--bm25-k1", &bm25_k1, 10.0),
                ("--bm25-b", &bm25_b, 1.0),
                ("--file-weight", &file_weight, 10.0),
                ("--prf", &prf, 10.0),
            ] {
                if let Some(w) = list.iter().find(|w| !(0.0..=max).contains(*w)) {
                    return fail(format!("{name} {w}: between 0 and {max}"));
                }
            }
            let ds = match ragway::commands::eval::Dataset::load(&dataset, &qrels) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            // A throwaway data dir unless one is given: evaluation must not touch real data.
            let tmp = std::env::temp_dir().join(format!("ragway-eval-{}", std::process::id()));
            let mut overrides = Overrides::from(&common);
            if overrides.data_dir.is_none() {
                overrides.data_dir = Some(tmp.clone());
            }
            let app = match open_app(&overrides) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let mut fusions = Vec::new();
            for f in &fusion {
                match ragway::config::Fusion::parse(f.trim()) {
                    Some(f) => fusions.push(f),
                    None => {
                        return fail(format!("--fusion {f:?}: use rrf, convex, minmax or zscore"));
                    }
                }
            }
            let grid = ragway::commands::eval::Grid {
                fusions,
                weights: bm25_weight,
                candidates,
                k1: bm25_k1,
                b: bm25_b,
                file_weights: file_weight,
                prf,
            };
            let variants = ragway::commands::eval::variants(
                &modes,
                &grid,
                ragway::rag::Fuse::from_config(&app.config.rag),
            );
            let bar = indicatif::ProgressBar::new(0);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            let report = rt.block_on(ragway::commands::eval::run(
                &app,
                &ds,
                &variants,
                k,
                run_dir.as_deref(),
                &bar,
            ));
            bar.finish_and_clear();
            drop(app);
            let _ = std::fs::remove_dir_all(&tmp);
            match report {
                Ok(r) if json => {
                    println!("{}", serde_json::to_string_pretty(&r).expect("json"));
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    print!("{}", ragway::commands::eval::table(&r));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Ingest {
            common,
            paths,
            knowledge,
            user,
        } => {
            let files = match ragway::commands::bulk::collect(&paths) {
                Ok(f) => f,
                Err(e) => return fail(e),
            };
            let app = match open_app(&Overrides::from(&common)) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let bar = indicatif::ProgressBar::new(files.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} {elapsed} {wide_msg}",
                )
                .expect("static template"),
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            let result = rt.block_on(ragway::commands::bulk::run(
                &app,
                files,
                knowledge.as_deref(),
                user.as_deref(),
                &bar,
            ));
            bar.finish_and_clear();
            match result {
                Ok(s) => {
                    println!(
                        "ingested {} file(s), {} failed, {} duplicate(s) skipped{}",
                        s.completed,
                        s.failed.len(),
                        s.duplicates,
                        s.knowledge_id
                            .map(|k| format!("; knowledge id {k}"))
                            .unwrap_or_default()
                    );
                    for (p, e) in &s.failed {
                        eprintln!("failed: {}: {e}", p.display());
                    }
                    if s.failed.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => fail(e),
            }
        }
        Command::Key {
            action:
                KeyAction::Create {
                    common,
                    user,
                    models,
                },
        } => {
            let app = match open_app(&Overrides::from(&common)) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            match runtime().block_on(app.create_key(&user, models)) {
                Ok(key) => {
                    println!("{key}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e.detail),
            }
        }
    }
}
