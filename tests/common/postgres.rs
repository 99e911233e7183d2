//! A throwaway PostgreSQL database per test, on the cluster that `RAGWAY_TEST_POSTGRES_URL`
//! names (scripts/test.sh starts a pgvector cluster with scripts/postgres.sh). Under CI a
//! missing URL fails the test, since the PostgreSQL cases must run there; elsewhere the test
//! says it did not run.

/// The cluster's URL; `what` names the cases in the messages.
pub fn cluster_url(what: &str) -> Option<String> {
    match std::env::var("RAGWAY_TEST_POSTGRES_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "RAGWAY_TEST_POSTGRES_URL is not set under CI: {what} must be tested \
                 (scripts/test.sh starts PostgreSQL with scripts/postgres.sh)"
            );
            eprintln!(
                "RAGWAY_TEST_POSTGRES_URL not set: {what} NOT RUN (start PostgreSQL with \
                 `eval \"$(scripts/postgres.sh start)\"`)"
            );
            None
        }
    }
}

/// A plain connection, its driver spawned on the caller's runtime.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test PostgreSQL");
    tokio::spawn(conn);
    client
}

/// A database created for one test; [`TestDb::drop_db`] removes it.
pub struct TestDb {
    admin_url: String,
    pub name: String,
    /// A `postgres://` URL, as an operator types it.
    pub url: String,
}

impl TestDb {
    /// `None` (outside CI) when no cluster is configured.
    pub async fn create(what: &str) -> Option<TestDb> {
        let admin_url = cluster_url(what)?;
        let name = format!("ragway_t_{}", uuid::Uuid::new_v4().simple());
        connect(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let cfg: tokio_postgres::Config = admin_url.parse().expect("test URL parses");
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().unwrap_or("postgres");
        let auth = match cfg.get_password() {
            Some(pw) => format!("{user}:{}", String::from_utf8_lossy(pw)),
            None => user.to_string(),
        };
        let url = format!("postgres://{auth}@{host}:{port}/{name}");
        Some(TestDb {
            admin_url,
            name,
            url,
        })
    }

    /// Drops the database, closing what is still connected to it.
    pub async fn drop_db(&self) {
        let _ = connect(&self.admin_url)
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}
