//! Versioned, embedded, forward-only schema migrations.
//!
//! `payra db migrate` applies each migration the database lacks, in order, in one
//! transaction under an advisory lock: running it twice, or from two hosts at once, applies
//! each migration once. `payra serve` refuses a database whose schema is older (it names the
//! command) or newer (an older payra must not write a schema it does not know).

use crate::error::{Error, Result};

use super::db_error;

/// The migrations, in order; version `i + 1` is `MIGRATIONS[i]`. Never edit one that has
/// shipped: add the next.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "initial schema",
        include_str!("migrations/0001_initial.sql"),
    ),
    (
        "shared decisions, nonces and ledger",
        include_str!("migrations/0002_decisions.sql"),
    ),
    (
        "upstream revocations (RA mode)",
        include_str!("migrations/0003_upstream.sql"),
    ),
    (
        "certificate summaries in the primary key",
        include_str!("migrations/0004_covered_summaries.sql"),
    ),
    (
        "the count by status shared by the replicas",
        include_str!("migrations/0005_shared_count.sql"),
    ),
];

/// The schema version this payra runs on.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// The key of the advisory lock `migrate` holds ("payra" in ASCII).
const MIGRATION_LOCK: i64 = 0x0070_6179_7261;

/// Where a database's schema stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaState {
    /// The newest migration applied (0: none, the database is empty to payra).
    pub applied: u32,
    /// The newest this payra knows.
    pub known: u32,
}

impl SchemaState {
    /// Refuses a schema this payra cannot run on, naming what to do.
    pub fn require_current(&self) -> Result<()> {
        if self.applied < self.known {
            return Err(Error::FailedPrecondition(format!(
                "the database schema is at version {} and this payra needs version {}: run \
                 `payra db migrate` (with the same configuration) first",
                self.applied, self.known
            )));
        }
        if self.applied > self.known {
            return Err(Error::FailedPrecondition(format!(
                "the database schema is at version {}, newer than this payra knows ({}): run \
                 the payra release that migrated it, or a later one",
                self.applied, self.known
            )));
        }
        Ok(())
    }
}

const CREATE_HISTORY: &str = "CREATE TABLE payra_schema (
    version     integer     PRIMARY KEY,
    description text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)";

/// The newest migration applied to the database `client` is connected to.
pub(super) async fn state(client: &deadpool_postgres::Client) -> Result<SchemaState> {
    let exists: bool = client
        .query_one("SELECT to_regclass('payra_schema') IS NOT NULL", &[])
        .await
        .map_err(db_error)?
        .get(0);
    let applied = if exists {
        let version: Option<i32> = client
            .query_one("SELECT max(version) FROM payra_schema", &[])
            .await
            .map_err(db_error)?
            .get(0);
        u32::try_from(version.unwrap_or(0)).unwrap_or(0)
    } else {
        0
    };
    Ok(SchemaState {
        applied,
        known: SCHEMA_VERSION,
    })
}

/// Applies the missing migrations; returns the versions applied (none when up to date).
pub(super) async fn migrate(client: &mut deadpool_postgres::Client) -> Result<Vec<u32>> {
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_error)?;
    let exists: bool = tx
        .query_one("SELECT to_regclass('payra_schema') IS NOT NULL", &[])
        .await
        .map_err(db_error)?
        .get(0);
    if !exists {
        tx.batch_execute(CREATE_HISTORY).await.map_err(db_error)?;
    }
    let current: Option<i32> = tx
        .query_one("SELECT max(version) FROM payra_schema", &[])
        .await
        .map_err(db_error)?
        .get(0);
    let current = u32::try_from(current.unwrap_or(0)).unwrap_or(0);
    if current > SCHEMA_VERSION {
        SchemaState {
            applied: current,
            known: SCHEMA_VERSION,
        }
        .require_current()?;
    }
    let mut applied = Vec::new();
    for (index, (description, sql)) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as u32 + 1;
        tx.batch_execute(sql).await.map_err(|e| {
            Error::internal(format!("migration {version} ({description}) failed: {e}"))
        })?;
        tx.execute(
            "INSERT INTO payra_schema (version, description) VALUES ($1, $2)",
            &[&(version as i32), description],
        )
        .await
        .map_err(db_error)?;
        applied.push(version);
    }
    tx.commit().await.map_err(db_error)?;
    Ok(applied)
}
