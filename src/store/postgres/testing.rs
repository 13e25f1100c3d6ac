//! Fresh PostgreSQL databases for tests, on the cluster that `scripts/test-postgres.sh`
//! starts (`.ci/run` does; see the README). Without one, each PostgreSQL test returns early
//! and the test binary says once, on the terminal, which tests it skipped and why.

// Test support: a failure here is a failed test, said with its reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{Backend, StoreConfig};

/// The URL of a database on the test cluster whose user may create databases.
pub const URL_VARIABLE: &str = "PAYRA_TEST_POSTGRES_URL";
/// The test cluster's password.
pub const PASSWORD_VARIABLE: &str = "PAYRA_TEST_POSTGRES_PASSWORD";

static TOLD: AtomicBool = AtomicBool::new(false);

/// The test cluster's URL, or `None` after saying (once per test binary, past the test
/// harness's output capture) that `test` and the other PostgreSQL tests are skipped.
pub fn cluster_url(test: &str) -> Option<String> {
    match std::env::var(URL_VARIABLE) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let first = !TOLD.swap(true, Ordering::SeqCst);
            let mut stderr = std::io::stderr();
            if first {
                let _ = writeln!(
                    stderr,
                    "\nSKIPPED: the PostgreSQL tests (the `postgres` conformance cases and the \
                     replica tests): {URL_VARIABLE} is not set. Start a throwaway cluster with \
                     `eval \"$(scripts/test-postgres.sh start)\"` (README, Testing against \
                     PostgreSQL) to run them."
                );
            }
            let _ = writeln!(stderr, "skipped (no PostgreSQL): {test}");
            None
        }
    }
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// Creates an empty database named after `test` on the test cluster and returns a store
/// configuration for it (unmigrated), or `None` when there is no test cluster.
pub fn fresh_database(test: &str) -> Option<StoreConfig> {
    let url = cluster_url(test)?;
    let password = std::env::var(PASSWORD_VARIABLE).ok();
    Some(StoreConfig {
        backend: Backend::Postgres,
        url: Some(create_database(&url, password.as_deref(), test)),
        password_env: PASSWORD_VARIABLE.into(),
        pool_size: 8,
        ..StoreConfig::default()
    })
}

/// Creates an empty database named after `test` through `admin_url` (whose user may create
/// databases); returns its URL.
pub fn create_database(admin_url: &str, password: Option<&str>, test: &str) -> String {
    let mut name: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(40);
    let name = format!("t_{name}_{}", hex::encode(rand::random::<[u8; 6]>()));
    text_rows(admin_url, password, &[format!("CREATE DATABASE {name}")]);
    with_database(admin_url, &name)
}

/// Runs `statements` one by one on one connection to `url` (as the simple query protocol
/// runs them: `VACUUM` and `EXPLAIN` too) and returns the first column of every row they
/// return, as text. Panics, naming the statement, if one fails.
pub fn text_rows(url: &str, password: Option<&str>, statements: &[String]) -> Vec<String> {
    // On a thread of its own: the caller may be inside a runtime.
    let (url, statements) = (url.to_string(), statements.to_vec());
    let password = password.map(str::to_string);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the test cluster");
        runtime.block_on(async {
            let mut config: tokio_postgres::Config = url.parse().expect("the cluster's URL");
            if let Some(password) = password {
                config.password(password);
            }
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .expect("connecting to the test cluster");
            tokio::spawn(connection);
            let mut rows = Vec::new();
            for statement in &statements {
                let messages = client
                    .simple_query(statement)
                    .await
                    .unwrap_or_else(|e| panic!("{statement}: {e}"));
                for message in messages {
                    if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                        rows.push(row.get(0).unwrap_or_default().to_string());
                    }
                }
            }
            rows
        })
    })
    .join()
    .expect("running statements on the test cluster")
}

/// [`text_rows`] on the test database `store` is configured for, with the test cluster's
/// password.
pub fn on_database(store: &StoreConfig, statements: &[String]) -> Vec<String> {
    let url = store.url.as_deref().expect("a test database's URL");
    let password = std::env::var(PASSWORD_VARIABLE).ok();
    text_rows(url, password.as_deref(), statements)
}

/// A migrated store on a fresh database, or `None` when there is no test cluster.
pub fn fresh_store(test: &str) -> Option<super::PgStore> {
    fresh_store_and_config(test).map(|(store, _)| store)
}

/// [`fresh_store`] with its configuration (for a second store on it, or SQL of the test's).
pub fn fresh_store_and_config(test: &str) -> Option<(super::PgStore, StoreConfig)> {
    let config = fresh_database(test)?;
    super::PgStore::migrate(&config).expect("migrating the test database");
    let store = super::PgStore::connect(&config).expect("connecting to the test database");
    Some((store, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_of_a_url_is_replaced() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/postgres", "x"),
            "postgres://u@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:1/db?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }
}
