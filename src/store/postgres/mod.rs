//! The PostgreSQL backend of [`Store`]: one database shared by any number of payra processes.
//!
//! Every method runs one transaction and returns once PostgreSQL has committed it (with
//! `synchronous_commit` on, which [`PgStore::connect`] checks: committed means in the WAL on
//! disk). Rows that a change depends on are locked with `SELECT ... FOR UPDATE`, in serial
//! order, and every audited change locks the audit chain's head row last; so concurrent
//! changes from any number of processes serialise where they must and cannot deadlock.
//!
//! The store's methods are synchronous (the RA calls them off the async executor). The
//! connections live on a small runtime of the store's own; a call hands its transaction to
//! that runtime and waits for the answer, so it works from any thread, inside another
//! runtime or not.

mod changes;
mod decisions;
mod issuance;
mod migrations;
#[doc(hidden)]
pub mod testing;

pub use decisions::PgDecisions;
pub use migrations::{SchemaState, SCHEMA_VERSION};

use crate::sync::Unpoisoned;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Transaction;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use super::audit::{chain_hash, AuditBody, AuditEntry, AuditEvent, ChainHead, GENESIS_HASH};
use super::records::{
    CertificateRecord, CertificateSummary, ClientCertificateRecord, Revocation, RevokedEntry,
    TokenHash, TokenRecord,
};
use issuance::IssueWork;

use super::{
    FrameSource, IssueOutcome, IssueReceiver, LedgerCheckpoint, OnIssued, RevokeRejection, Store,
};
use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::model::{CustomerId, DeviceId, RevocationReason, Serial};

/// [`Store`] on a PostgreSQL database.
pub struct PgStore {
    pool: Pool,
    /// Runs the connections and the transactions; shut down (in the background) on drop.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    /// Held by this process's audited writes from before their commit until the caller's
    /// follow-up ([`OnIssued`]) ran: a certificate reaches the RA's memory before any later
    /// change to it made through this process does.
    write_turn: Arc<tokio::sync::Mutex<()>>,
    /// Decisions, nonces and the ledger (started by [`PgStore::connect`]).
    decisions: Option<Arc<PgDecisions>>,
    /// How to open a connection of our own (the change listener's).
    pg_config: tokio_postgres::Config,
    tls: Option<rustls::ClientConfig>,
    /// New tokens and enrollments for the committer ([`issuance`]).
    issue_queue: tokio::sync::mpsc::Sender<issuance::IssueJob>,
    /// Changes of other processes, until the RA takes the receiver.
    changes: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<super::StoreChange>>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The database password: from `password_file` (not readable by group or others), else from
/// the environment variable `password_env`, else none.
fn password(config: &StoreConfig) -> Result<Option<String>> {
    if let Some(path) = &config.password_file {
        let text = crate::ca::pki::read_private_key(path)?;
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
    }
    Ok(std::env::var(&config.password_env).ok())
}

/// The rustls client configuration that trusts the certificate authorities in `ca_file`.
fn tls_config(ca_file: &std::path::Path) -> Result<rustls::ClientConfig> {
    let text = std::fs::read_to_string(ca_file).map_err(|e| {
        Error::FailedPrecondition(format!("store.ca_file {}: {e}", ca_file.display()))
    })?;
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for block in pem::parse_many(&text).map_err(|e| {
        Error::FailedPrecondition(format!("store.ca_file {}: {e}", ca_file.display()))
    })? {
        if block.tag() == "CERTIFICATE" {
            roots
                .add(rustls_pki_types::CertificateDer::from(
                    block.into_contents(),
                ))
                .map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "store.ca_file {}: a certificate is not usable as a trust anchor: {e}",
                        ca_file.display()
                    ))
                })?;
            found += 1;
        }
    }
    if found == 0 {
        return Err(Error::FailedPrecondition(format!(
            "store.ca_file {} holds no PEM certificate",
            ca_file.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS to the database: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Turns a database error into ours: a lost or refused connection, a database shutting down
/// or starting, a timeout are `Unavailable` (the caller may retry, here or on another
/// replica); anything else is a fault inside payra.
fn db_error(e: tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    let unavailable = match e.code() {
        // The database said it cannot take this now: connection trouble (08), resources
        // (53: disk full, out of memory, too many connections), an operator or a crash
        // (57P), a system error (58), a lock or serialization conflict to retry (40, 55P03),
        // a standby or read-only database (25006), a cancelled statement (57014).
        Some(code) => {
            let class = code.code();
            ["08", "53", "57P", "58", "40"]
                .iter()
                .any(|prefix| class.starts_with(prefix))
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION
                || *code == SqlState::QUERY_CANCELED
        }
        // No SQLSTATE: a closed or failed connection is the database's absence; anything
        // else (a type that does not convert, a row count) is a fault in payra.
        None => {
            e.is_closed()
                || std::error::Error::source(&e).is_some_and(|cause| {
                    cause.is::<std::io::Error>() || cause.to_string().contains("timed out")
                })
                || e.to_string().contains("timeout")
                || e.to_string().contains("connecting")
        }
    };
    // The connection errors' Display leaves out their cause ("connection refused").
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    if unavailable {
        Error::Unavailable(format!("the database is unavailable: {text}"))
    } else {
        Error::internal(format!("database: {text}"))
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> Error {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_error(e),
        other => Error::Unavailable(format!("the database is unavailable: {other}")),
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::internal(format!("decoding record: {e}")))
}

fn json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| Error::internal(format!("encoding record: {e}")))
}

fn serial_of(bytes: &[u8]) -> Result<Serial> {
    Serial::from_bytes("serial", bytes)
        .map_err(|e| Error::internal(format!("a stored serial is malformed: {e}")))
}

fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::internal(format!("{what} {value} is out of range")))
}

fn limit(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Runs `work` on `handle` and waits for its answer on this thread, which may be any thread
/// (inside another runtime or not): the answer comes back over a plain channel.
fn block_on<T, F>(handle: &tokio::runtime::Handle, work: F) -> Result<T>
where
    F: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(work.await);
    });
    rx.recv()
        .map_err(|_| Error::Unavailable("the database runtime has stopped".into()))?
}

/// `sql` prepared on the transaction's connection, once per connection (the pool keeps the
/// statements): a statement then costs one round trip instead of two.
async fn prepared_tx(tx: &Transaction<'_>, sql: &str) -> Result<tokio_postgres::Statement> {
    tx.prepare_cached(sql).await.map_err(db_error)
}

/// [`prepared_tx`] on a pooled connection outside a transaction.
async fn prepared(
    client: &deadpool_postgres::Client,
    sql: &str,
) -> Result<tokio_postgres::Statement> {
    client.prepare_cached(sql).await.map_err(db_error)
}

/// Appends `event` to the audit chain: locks the head row, links the entry to it and moves
/// it. Called last in a transaction (the head is the last lock every writer takes).
async fn append_audit(tx: &Transaction<'_>, event: &AuditEvent) -> Result<ChainHead> {
    let row = tx
        .query_one(
            &prepared_tx(
                tx,
                "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
            )
            .await?,
            &[],
        )
        .await
        .map_err(db_error)?;
    let seq: i64 = row.get(0);
    let hash: Vec<u8> = row.get(1);
    let body = AuditBody {
        version: 1,
        seq: u64::try_from(seq).map_err(|_| Error::internal("negative audit sequence"))? + 1,
        prev_hash: hex::encode(&hash),
        event: event.clone(),
    };
    let new_hash = chain_hash(&hash, &body);
    let entry = AuditEntry {
        body,
        hash: hex::encode(new_hash),
    };
    tx.execute(
        &prepared_tx(tx, "INSERT INTO audit (seq, entry) VALUES ($1, $2)").await?,
        &[&(seq + 1), &json(&entry)?],
    )
    .await
    .map_err(db_error)?;
    tx.execute(
        &prepared_tx(tx, "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1").await?,
        &[&(seq + 1), &new_hash.as_slice()],
    )
    .await
    .map_err(db_error)?;
    Ok(ChainHead {
        seq: entry.body.seq,
        hash: new_hash,
    })
}

/// Stores a certificate record with its summary. `insert` fails on an existing serial
/// (reported as `false`); otherwise the row is replaced.
async fn put_certificate(
    tx: &Transaction<'_>,
    record: &CertificateRecord,
    insert: bool,
) -> Result<bool> {
    let parsed = CertificateSummary::of(record)?;
    let summary = parsed.encode();
    let sql = if insert {
        "INSERT INTO certificates (serial, customer_id, device_id, not_after_s, summary, record, \
         public_key) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (serial) DO NOTHING"
    } else {
        "UPDATE certificates SET customer_id = $2, device_id = $3, not_after_s = $4, \
         summary = $5, record = $6, public_key = $7 WHERE serial = $1"
    };
    let rows = tx
        .execute(
            sql,
            &[
                &record.serial.as_bytes(),
                &record.customer_id.as_str(),
                &record.device_id.as_str(),
                &record.not_after_s,
                &summary,
                &json(record)?,
                &parsed.public_key.as_slice(),
            ],
        )
        .await
        .map_err(db_error)?;
    Ok(rows == 1)
}

/// Puts `record`'s revocation on the CRL's list (or takes it off when it has none).
async fn put_revoked(tx: &Transaction<'_>, record: &CertificateRecord) -> Result<()> {
    match record.revocation {
        Some(revocation) => {
            let entry = RevokedEntry {
                serial: record.serial.clone(),
                revocation,
                not_after_s: record.not_after_s,
            };
            tx.execute(
                &prepared_tx(
                    tx,
                    "INSERT INTO revoked (serial, entry) VALUES ($1, $2) \
                 ON CONFLICT (serial) DO UPDATE SET entry = EXCLUDED.entry",
                )
                .await?,
                &[&record.serial.as_bytes(), &json(&entry)?],
            )
            .await
        }
        None => {
            tx.execute(
                &prepared_tx(tx, "DELETE FROM revoked WHERE serial = $1").await?,
                &[&record.serial.as_bytes()],
            )
            .await
        }
    }
    .map_err(db_error)?;
    Ok(())
}

/// The certificate records with `serials`, locked for update, in serial order.
async fn lock_certificates(
    tx: &Transaction<'_>,
    serials: &[&[u8]],
) -> Result<std::collections::HashMap<Vec<u8>, CertificateRecord>> {
    let rows = tx
        .query(
            &prepared_tx(
                tx,
                "SELECT serial, record FROM certificates WHERE serial = ANY($1) \
             ORDER BY serial FOR UPDATE",
            )
            .await?,
            &[&serials],
        )
        .await
        .map_err(db_error)?;
    rows.into_iter()
        .map(|row| {
            let serial: Vec<u8> = row.get(0);
            let record: serde_json::Value = row.get(1);
            Ok((serial, decode_json(record)?))
        })
        .collect()
}

impl PgStore {
    /// Checks every decision chain in the database; returns the number of decisions checked.
    pub fn verify_decision_chains(&self) -> Result<std::result::Result<u64, String>> {
        use super::Decisions;
        match &self.decisions {
            Some(decisions) => decisions.verify_chains(),
            None => Err(Error::internal(
                "this connection to the database records no decisions",
            )),
        }
    }

    /// Connects to the configured database and checks that its schema is this payra's and
    /// that it commits durably. An unmigrated or newer schema is refused with the command
    /// to run.
    pub fn connect(config: &StoreConfig) -> Result<PgStore> {
        let mut store = PgStore::open_pool(config)?;
        let state = store.schema_state()?;
        state.require_current()?;
        store.check_durability()?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        // Listening before the RA loads anything: no change committed after the load is
        // missed.
        let (changes, receiver) = tokio::sync::mpsc::unbounded_channel();
        let (listening, listened) = std::sync::mpsc::sync_channel(1);
        store.handle.spawn(changes::listen(
            store.pg_config.clone(),
            store.tls.clone(),
            changes,
            listening,
        ));
        listened
            .recv()
            .map_err(|_| Error::Unavailable("the change listener stopped".into()))??;
        *store.changes.lock().unpoisoned() = Some(receiver);
        store.decisions = Some(Arc::new(PgDecisions::start(
            store.pool.clone(),
            store.handle.clone(),
            store.write_turn.clone(),
            now_ms,
            config.decision_writers,
        )));
        Ok(store)
    }

    /// Opens the pool without checking the schema (for `payra db migrate`).
    fn open_pool(config: &StoreConfig) -> Result<PgStore> {
        let url = config
            .url
            .as_deref()
            .ok_or_else(|| Error::invalid("store.url", "is not set"))?;
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::invalid("store.url", format!("is not a PostgreSQL URL: {e}")))?;
        if let Some(password) = password(config)? {
            pg.password(password);
        }
        let timeout = Duration::from_secs(u64::from(config.connect_timeout_s));
        pg.connect_timeout(timeout);
        pg.application_name("payra");
        // A database host that vanished (a failover that resets nothing) is noticed in
        // seconds, not after the kernel's two-hour default: TCP keepalives, and unacknowledged
        // data gives up after 30 s.
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(10));
        pg.keepalives_interval(Duration::from_secs(5));
        pg.keepalives_retries(3);
        pg.tcp_user_timeout(Duration::from_secs(30));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("payra-db")
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("starting the database runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls = config.ca_file.as_deref().map(tls_config).transpose()?;
        let pg_config = pg.clone();
        let manager = match &tls {
            Some(tls) => Manager::from_config(
                pg,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone()),
                manager_config,
            ),
            None => Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
        };
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(config.pool_size)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(timeout))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .build()
                .map_err(|e| Error::internal(format!("database pool: {e}")))?
        };
        let write_turn = Arc::new(tokio::sync::Mutex::new(()));
        let (issue_queue, jobs) = tokio::sync::mpsc::channel(issuance::MAX_WAITING);
        handle.spawn(issuance::committer(pool.clone(), write_turn.clone(), jobs));
        Ok(PgStore {
            issue_queue,
            pool,
            runtime: Some(runtime),
            handle,
            write_turn,
            decisions: None,
            pg_config,
            tls,
            changes: std::sync::Mutex::new(None),
        })
    }

    /// Runs `work` on the store's runtime and waits for its answer on this thread.
    fn block<T, F>(&self, work: F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        block_on(&self.handle, work)
    }

    /// Runs `work` inside one transaction on a pooled connection, committing if it returns
    /// `Ok(Ok(_))` and rolling back otherwise.
    fn transaction<T, F>(&self, work: F) -> Result<T>
    where
        F: for<'t> FnOnce(
                &'t Transaction<'t>,
            ) -> std::pin::Pin<
                Box<dyn Future<Output = Result<Committed<T>>> + Send + 't>,
            > + Send
            + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        let turn = self.write_turn.clone();
        self.block(async move {
            let _turn = turn.lock().await;
            in_transaction(&pool, work).await
        })
    }

    /// Reads with one statement on a pooled connection.
    fn read<T, F>(&self, work: F) -> Result<T>
    where
        F: for<'c> FnOnce(
                &'c deadpool_postgres::Client,
            )
                -> std::pin::Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        self.block(async move {
            let client = pool.get().await.map_err(pool_error)?;
            work(&client).await
        })
    }

    /// The JSON record `sql` selects by one key, decoded.
    fn record_by<T>(&self, sql: &'static str, key: Vec<u8>) -> Result<Option<T>>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        self.read(move |client| {
            Box::pin(async move {
                let row = client
                    .query_opt(&prepared(client, sql).await?, &[&key])
                    .await
                    .map_err(db_error)?;
                row.map(|row| decode_json(row.get(0))).transpose()
            })
        })
    }

    /// Every JSON record `sql` selects (no parameters), decoded.
    fn records<T>(&self, sql: &'static str) -> Result<Vec<T>>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(&prepared(client, sql).await?, &[])
                    .await
                    .map_err(db_error)?;
                rows.into_iter()
                    .map(|row| decode_json(row.get(0)))
                    .collect()
            })
        })
    }

    /// The serials `sql` selects for one id.
    fn serials_where(&self, sql: &'static str, id: &str) -> Result<Vec<Serial>> {
        let id = id.to_string();
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(&prepared(client, sql).await?, &[&id])
                    .await
                    .map_err(db_error)?;
                rows.iter().map(|row| serial_of(row.get(0))).collect()
            })
        })
    }

    /// Where the database's schema stands against this payra's.
    pub fn schema_state(&self) -> Result<SchemaState> {
        self.read(|client| Box::pin(migrations::state(client)))
    }

    /// Refuses a database that may acknowledge a commit before it is on disk.
    fn check_durability(&self) -> Result<()> {
        let (fsync, synchronous_commit) = self.read(|client| {
            Box::pin(async move {
                let fsync: String = client
                    .query_one(&prepared(client, "SHOW fsync").await?, &[])
                    .await
                    .map_err(db_error)?
                    .get(0);
                let commit: String = client
                    .query_one(&prepared(client, "SHOW synchronous_commit").await?, &[])
                    .await
                    .map_err(db_error)?
                    .get(0);
                Ok((fsync, commit))
            })
        })?;
        if fsync != "on" {
            return Err(Error::FailedPrecondition(
                "the database runs with fsync = off: a crash could lose changes payra \
                 acknowledged; turn fsync on"
                    .into(),
            ));
        }
        if synchronous_commit == "off" {
            return Err(Error::FailedPrecondition(
                "the database runs with synchronous_commit = off: a crash could lose \
                 changes payra acknowledged; set it to on (or remote_apply with a standby)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Applies every migration the database lacks (see [`migrations`]); safe to run again
    /// and from several processes at once. Returns the versions applied.
    pub fn migrate(config: &StoreConfig) -> Result<Vec<u32>> {
        let store = PgStore::open_pool(config)?;
        let pool = store.pool.clone();
        store.block(async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            migrations::migrate(&mut client).await
        })
    }

    /// Where the configured database's schema stands, without refusing anything.
    pub fn inspect(config: &StoreConfig) -> Result<SchemaState> {
        PgStore::open_pool(config)?.schema_state()
    }

    /// Queues `work` for the committer (see [`issuance`]); the receiver gets the outcome.
    fn issue_async(
        &self,
        work: IssueWork,
        audit: &AuditEvent,
        on_issued: Option<OnIssued>,
    ) -> IssueReceiver {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = issuance::IssueJob {
            work,
            audit: audit.clone(),
            on_issued,
            reply,
        };
        use tokio::sync::mpsc::error::TrySendError;
        match self.issue_queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(refused)) => {
                let _ = refused.reply.send(Err(Error::Unavailable(format!(
                    "{} enrollments are waiting for the database; retry",
                    issuance::MAX_WAITING
                ))));
            }
            Err(TrySendError::Closed(refused)) => {
                let _ = refused.reply.send(Err(Error::Unavailable(
                    "the enrollment committer has stopped".into(),
                )));
            }
        }
        rx
    }

    /// [`PgStore::issue_async`], waiting for the outcome on this thread.
    fn issue_blocking(&self, work: IssueWork, audit: &AuditEvent) -> Result<IssueOutcome> {
        let rx = self.issue_async(work, audit, None);
        self.block(async move {
            rx.await
                .map_err(|_| Error::Unavailable("the enrollment committer has stopped".into()))?
        })
    }

    /// Deletes what `select` picks (a `SELECT key ... LIMIT $n` over `table`'s `column`)
    /// with one audit entry saying how many; returns the keys deleted.
    fn purge(
        &self,
        sql: &'static str,
        params: PurgeParams,
        audit: &AuditEvent,
        outcome: impl FnOnce(usize) -> String + Send + 'static,
    ) -> Result<Vec<Vec<u8>>> {
        let audit = audit.clone();
        self.transaction(move |tx| {
            Box::pin(async move {
                let rows = match &params {
                    PurgeParams::Bytes(a, b, n) => tx.query(sql, &[a as &Param, b, n]).await,
                    PurgeParams::Numbers(a, b, n) => tx.query(sql, &[a as &Param, b, n]).await,
                    PurgeParams::Number(a, n) => tx.query(sql, &[a as &Param, n]).await,
                }
                .map_err(db_error)?;
                let keys: Vec<Vec<u8>> = rows.iter().map(|row| row.get(0)).collect();
                if keys.is_empty() {
                    return Ok(Committed::No(keys));
                }
                let mut event = audit;
                event.outcome = outcome(keys.len());
                append_audit(tx, &event).await?;
                Ok(Committed::Yes(keys))
            })
        })
    }
}

type Param = dyn tokio_postgres::types::ToSql + Sync;

/// The parameters of a purge statement.
enum PurgeParams {
    Bytes(String, Vec<u8>, i64),
    Numbers(i64, i64, i64),
    Number(i64, i64),
}

/// What a transaction's work decided: commit and answer, or roll back and answer.
pub enum Committed<T> {
    Yes(T),
    No(T),
}

/// Runs `work` in a transaction on a pooled connection; commits on [`Committed::Yes`].
async fn in_transaction<T, F>(pool: &Pool, work: F) -> Result<T>
where
    F: for<'t> FnOnce(
        &'t Transaction<'t>,
    )
        -> std::pin::Pin<Box<dyn Future<Output = Result<Committed<T>>> + Send + 't>>,
{
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    match work(&tx).await? {
        Committed::Yes(value) => {
            tx.commit().await.map_err(db_error)?;
            Ok(value)
        }
        Committed::No(value) => {
            tx.rollback().await.map_err(db_error)?;
            Ok(value)
        }
    }
}

impl Store for PgStore {
    fn put_token(&self, hash: &TokenHash, token: &TokenRecord, audit: &AuditEvent) -> Result<()> {
        let work = IssueWork::Token {
            hash: *hash,
            token: token.clone(),
        };
        match self.issue_blocking(work, audit)? {
            IssueOutcome::Issued => Ok(()),
            other => Err(Error::internal(format!("storing a token: {other:?}"))),
        }
    }

    fn put_token_async(
        self: Arc<Self>,
        hash: &TokenHash,
        token: &TokenRecord,
        audit: &AuditEvent,
    ) -> Result<IssueReceiver> {
        let work = IssueWork::Token {
            hash: *hash,
            token: token.clone(),
        };
        Ok(self.issue_async(work, audit, None))
    }

    fn token(&self, hash: &TokenHash) -> Result<Option<TokenRecord>> {
        self.record_by("SELECT record FROM tokens WHERE hash = $1", hash.0.to_vec())
    }

    fn issue_with_token(
        &self,
        hash: &TokenHash,
        now_s: i64,
        certificate: &CertificateRecord,
        audit: &AuditEvent,
    ) -> Result<IssueOutcome> {
        let work = IssueWork::Enroll {
            hash: *hash,
            now_s,
            certificate: Box::new(certificate.clone()),
        };
        self.issue_blocking(work, audit)
    }

    fn issue_with_token_async(
        self: Arc<Self>,
        hash: &TokenHash,
        now_s: i64,
        certificate: &CertificateRecord,
        audit: &AuditEvent,
        on_issued: OnIssued,
    ) -> Result<IssueReceiver> {
        let work = IssueWork::Enroll {
            hash: *hash,
            now_s,
            certificate: Box::new(certificate.clone()),
        };
        Ok(self.issue_async(work, audit, Some(on_issued)))
    }

    fn certificate(&self, serial: &Serial) -> Result<Option<CertificateRecord>> {
        self.record_by(
            "SELECT record FROM certificates WHERE serial = $1",
            serial.as_bytes().to_vec(),
        )
    }

    fn certificate_summary(&self, serial: &Serial) -> Result<Option<CertificateSummary>> {
        let serial = serial.clone();
        self.read(move |client| {
            Box::pin(async move {
                let row = client
                    .query_opt(
                        &prepared(client, "SELECT summary FROM certificates WHERE serial = $1")
                            .await?,
                        &[&serial.as_bytes()],
                    )
                    .await
                    .map_err(db_error)?;
                row.map(|row| {
                    let bytes: Vec<u8> = row.get(0);
                    CertificateSummary::decode(serial.as_bytes(), &bytes)
                })
                .transpose()
            })
        })
    }

    fn certificates_with_key(
        &self,
        public_key: &[u8; 65],
    ) -> Result<Option<Vec<CertificateSummary>>> {
        let key = public_key.to_vec();
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &prepared(
                            client,
                            "SELECT serial, summary FROM certificates WHERE public_key = $1 \
                             ORDER BY serial",
                        )
                        .await?,
                        &[&key],
                    )
                    .await
                    .map_err(db_error)?;
                rows.iter()
                    .map(|row| {
                        let serial: Vec<u8> = row.get(0);
                        let summary: Vec<u8> = row.get(1);
                        CertificateSummary::decode(&serial, &summary)
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            })
        })
    }

    fn watch_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<super::StoreChange>> {
        self.changes.lock().unpoisoned().take()
    }

    fn shared(&self) -> bool {
        true
    }

    fn open_decisions(&self, setup: &super::DecisionSetup) -> Result<Arc<dyn super::Decisions>> {
        let decisions = self.decisions.clone().ok_or_else(|| {
            Error::internal("this connection to the database records no decisions")
        })?;
        decisions
            .claim_horizon_ms
            .store(setup.claim_horizon_ms, std::sync::atomic::Ordering::Relaxed);
        Ok(decisions)
    }

    fn revocation_state(&self, serial: &Serial) -> Result<Option<Option<Revocation>>> {
        Ok(self.certificate_summary(serial)?.map(|s| s.revocation))
    }

    fn serials_by_customer(&self, customer: &CustomerId) -> Result<Vec<Serial>> {
        self.serials_where(
            "SELECT serial FROM certificates WHERE customer_id = $1 ORDER BY serial",
            customer.as_str(),
        )
    }

    fn serials_by_device(&self, device: &DeviceId) -> Result<Vec<Serial>> {
        self.serials_where(
            "SELECT serial FROM certificates WHERE device_id = $1 ORDER BY serial",
            device.as_str(),
        )
    }

    fn certificates_after(
        &self,
        after: Option<&Serial>,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>> {
        let after = after.map(|s| s.as_bytes().to_vec()).unwrap_or_default();
        let count = self::limit(limit);
        self.read(move |client| {
            Box::pin(async move {
                let rows = client.query(&prepared(client, "SELECT record FROM certificates WHERE serial > $1 ORDER BY serial LIMIT $2").await?,
                        &[&after, &count],
                    )
                    .await
                    .map_err(db_error)?;
                rows.into_iter().map(|row| decode_json(row.get(0))).collect()
            })
        })
    }

    fn for_each_certificate_summary(&self, each: &mut dyn FnMut(CertificateSummary)) -> Result<()> {
        // The rows stream from the store's runtime in chunks through a bounded channel:
        // memory stays bounded however many certificates there are.
        const CHUNK: usize = 4096;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<CertificateSummary>>>(4);
        let pool = self.pool.clone();
        self.handle.spawn(async move {
            use tokio_stream::StreamExt;
            // Waits for the reader off the runtime's workers; false once it is gone.
            let send = |chunk: Result<Vec<CertificateSummary>>| {
                let tx = tx.clone();
                async move {
                    tokio::task::spawn_blocking(move || tx.send(chunk).is_ok())
                        .await
                        .unwrap_or(false)
                }
            };
            let stream = async {
                let client = pool.get().await.map_err(pool_error)?;
                let rows = client
                    .query_raw(
                        &prepared(&client, "SELECT serial, summary FROM certificates").await?,
                        std::iter::empty::<&str>(),
                    )
                    .await
                    .map_err(db_error)?;
                Ok::<_, Error>((client, rows))
            };
            let (_client, rows) = match stream.await {
                Ok(stream) => stream,
                Err(e) => {
                    send(Err(e)).await;
                    return;
                }
            };
            tokio::pin!(rows);
            let mut chunk = Vec::with_capacity(CHUNK);
            while let Some(row) = rows.next().await {
                let summary = row.map_err(db_error).and_then(|row| {
                    let serial: &[u8] = row.get(0);
                    let bytes: &[u8] = row.get(1);
                    CertificateSummary::decode(serial, bytes)
                });
                match summary {
                    Ok(summary) => chunk.push(summary),
                    Err(e) => {
                        send(Err(e)).await;
                        return;
                    }
                }
                if chunk.len() == CHUNK
                    && !send(Ok(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)))).await
                {
                    return;
                }
            }
            if !chunk.is_empty() {
                send(Ok(chunk)).await;
            }
        });
        for chunk in rx {
            for summary in chunk? {
                each(summary);
            }
        }
        Ok(())
    }

    fn revoke(
        &self,
        serials: &[Serial],
        revocation: &Revocation,
        audit: &AuditEvent,
    ) -> Result<std::result::Result<(), RevokeRejection>> {
        let (serials, revocation, audit) = (serials.to_vec(), *revocation, audit.clone());
        self.transaction(move |tx| {
            Box::pin(async move {
                let keys: Vec<&[u8]> = serials.iter().map(Serial::as_bytes).collect();
                let mut records = lock_certificates(tx, &keys).await?;
                let mut changed = Vec::with_capacity(serials.len());
                for serial in &serials {
                    let Some(mut record) = records.remove(serial.as_bytes()) else {
                        return Ok(Committed::No(Err(RevokeRejection::NotFound(
                            serial.clone(),
                        ))));
                    };
                    match revocation.applied_over(record.revocation) {
                        Some(applied) => record.revocation = Some(applied),
                        None => {
                            return Ok(Committed::No(Err(RevokeRejection::AlreadyRevoked(
                                serial.clone(),
                                record.revocation.unwrap_or(revocation),
                            ))))
                        }
                    }
                    changed.push(record);
                }
                for record in &changed {
                    put_certificate(tx, record, false).await?;
                    put_revoked(tx, record).await?;
                }
                let serials: Vec<&Serial> = changed.iter().map(|r| &r.serial).collect();
                changes::notify(tx, &serials, false).await?;
                for record in &changed {
                    let mut event = audit.clone();
                    event.target = record.serial.to_hex();
                    append_audit(tx, &event).await?;
                }
                Ok(Committed::Yes(Ok(())))
            })
        })
    }

    fn unhold(
        &self,
        serial: &Serial,
        audit: &AuditEvent,
    ) -> Result<std::result::Result<CertificateRecord, RevokeRejection>> {
        let (serial, audit) = (serial.clone(), audit.clone());
        self.transaction(move |tx| {
            Box::pin(async move {
                let mut records = lock_certificates(tx, &[serial.as_bytes()]).await?;
                let Some(mut record) = records.remove(serial.as_bytes()) else {
                    return Ok(Committed::No(Err(RevokeRejection::NotFound(serial))));
                };
                match record.revocation {
                    Some(r) if r.reason == RevocationReason::CertificateHold => {}
                    _ => return Ok(Committed::No(Err(RevokeRejection::NotOnHold(serial)))),
                }
                record.revocation = None;
                put_certificate(tx, &record, false).await?;
                put_revoked(tx, &record).await?;
                changes::notify(tx, &[&record.serial], false).await?;
                append_audit(tx, &audit).await?;
                Ok(Committed::Yes(Ok(record)))
            })
        })
    }

    fn renew(
        &self,
        old: &Serial,
        new: &CertificateRecord,
        revoked_at_s: i64,
        audit: &AuditEvent,
    ) -> Result<std::result::Result<(), RevokeRejection>> {
        let (old, new, audit) = (old.clone(), new.clone(), audit.clone());
        self.transaction(move |tx| {
            Box::pin(async move {
                let mut records = lock_certificates(tx, &[old.as_bytes()]).await?;
                let Some(mut record) = records.remove(old.as_bytes()) else {
                    return Ok(Committed::No(Err(RevokeRejection::NotFound(old))));
                };
                if let Some(existing) = record.revocation {
                    return Ok(Committed::No(Err(RevokeRejection::AlreadyRevoked(
                        old, existing,
                    ))));
                }
                record.revocation = Some(Revocation {
                    revoked_at_s,
                    reason: RevocationReason::Superseded,
                });
                record.superseded_by = Some(new.serial.clone());
                // A renewal with a new key: the key must be free across every process.
                if let Some(refused) = issuance::key_refusal(tx, &new, revoked_at_s).await? {
                    return Err(refused);
                }
                put_certificate(tx, &record, false).await?;
                put_revoked(tx, &record).await?;
                if !put_certificate(tx, &new, true).await? {
                    return Err(Error::internal("random serial collided"));
                }
                changes::notify(tx, &[&record.serial], false).await?;
                append_audit(tx, &audit).await?;
                Ok(Committed::Yes(Ok(())))
            })
        })
    }

    fn revoked_entries(&self) -> Result<Vec<RevokedEntry>> {
        self.records("SELECT entry FROM revoked ORDER BY serial")
    }

    fn ledger_checkpoint(&self, min_day: &str) -> Result<LedgerCheckpoint> {
        let min_day = min_day.to_string();
        self.read(move |client| {
            Box::pin(async move {
                let through: i64 = client.query_one(&prepared(client, "SELECT value FROM counters WHERE name = 'ledger_through_seq'").await?,
                        &[],
                    )
                    .await
                    .map_err(db_error)?
                    .get(0);
                let buckets = client.query(&prepared(client, "SELECT bucket, used_fen FROM ledger WHERE day >= $1 ORDER BY bucket").await?,
                        &[&min_day],
                    )
                    .await
                    .map_err(db_error)?
                    .iter()
                    .map(|row| (row.get::<_, Vec<u8>>(0), row.get::<_, i64>(1)))
                    .collect();
                let released = client.query(&prepared(client, "SELECT decision_seq, released_at_ms FROM releases ORDER BY decision_seq").await?,
                        &[],
                    )
                    .await
                    .map_err(db_error)?
                    .iter()
                    .map(|row| {
                        let seq: i64 = row.get(0);
                        Ok((
                            u64::try_from(seq)
                                .map_err(|_| Error::internal("negative decision number"))?,
                            row.get::<_, i64>(1),
                        ))
                    })
                    .collect::<Result<_>>()?;
                Ok(LedgerCheckpoint {
                    through_seq: u64::try_from(through)
                        .map_err(|_| Error::internal("negative ledger checkpoint"))?,
                    buckets,
                    released,
                })
            })
        })
    }

    fn save_ledger_checkpoint(&self, checkpoint: &LedgerCheckpoint) -> Result<()> {
        let checkpoint = checkpoint.clone();
        self.transaction(move |tx| {
            Box::pin(async move {
                let keys: Vec<&[u8]> = checkpoint.buckets.iter().map(|(k, _)| k.as_slice()).collect();
                let days: Vec<String> = checkpoint
                    .buckets
                    .iter()
                    .map(|(k, _)| String::from_utf8_lossy(super::ledger_day(k)).into_owned())
                    .collect();
                let used: Vec<i64> = checkpoint.buckets.iter().map(|(_, u)| *u).collect();
                tx.execute(&prepared_tx(tx, "INSERT INTO ledger (bucket, day, used_fen) \
                     SELECT * FROM UNNEST($1::bytea[], $2::text[], $3::bigint[]) \
                     ON CONFLICT (bucket) DO UPDATE SET used_fen = EXCLUDED.used_fen").await?,
                    &[&keys, &days, &used],
                )
                .await
                .map_err(db_error)?;
                let seqs = checkpoint
                    .released
                    .iter()
                    .map(|(seq, _)| to_i64(*seq, "decision number"))
                    .collect::<Result<Vec<i64>>>()?;
                let at: Vec<i64> = checkpoint.released.iter().map(|(_, at)| *at).collect();
                tx.execute(&prepared_tx(tx, "INSERT INTO releases (decision_seq, released_at_ms) \
                     SELECT * FROM UNNEST($1::bigint[], $2::bigint[]) \
                     ON CONFLICT (decision_seq) DO UPDATE SET released_at_ms = EXCLUDED.released_at_ms").await?,
                    &[&seqs, &at],
                )
                .await
                .map_err(db_error)?;
                tx.execute(&prepared_tx(tx, "UPDATE counters SET value = $1 WHERE name = 'ledger_through_seq'").await?,
                    &[&to_i64(checkpoint.through_seq, "decision number")?],
                )
                .await
                .map_err(db_error)?;
                Ok(Committed::Yes(()))
            })
        })
    }

    fn agreed_limits(&self) -> Result<Vec<(String, i64)>> {
        self.read(|client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &prepared(
                            client,
                            "SELECT customer_id, limit_fen FROM agreed_limits ORDER BY customer_id",
                        )
                        .await?,
                        &[],
                    )
                    .await
                    .map_err(db_error)?;
                Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
            })
        })
    }

    fn set_agreed_limit(
        &self,
        customer: &CustomerId,
        limit_fen: i64,
        audit: &AuditEvent,
    ) -> Result<()> {
        let (customer, audit) = (customer.as_str().to_string(), audit.clone());
        self.transaction(move |tx| {
            Box::pin(async move {
                tx.execute(
                    &prepared_tx(
                        tx,
                        "INSERT INTO agreed_limits (customer_id, limit_fen) VALUES ($1, $2) \
                     ON CONFLICT (customer_id) DO UPDATE SET limit_fen = EXCLUDED.limit_fen",
                    )
                    .await?,
                    &[&customer, &limit_fen],
                )
                .await
                .map_err(db_error)?;
                changes::notify_limits(tx).await?;
                append_audit(tx, &audit).await?;
                Ok(Committed::Yes(()))
            })
        })
    }

    fn put_client_certificate(
        &self,
        record: &ClientCertificateRecord,
        audit: &AuditEvent,
    ) -> Result<bool> {
        let (record, audit) = (record.clone(), audit.clone());
        self.transaction(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .execute(
                        &prepared_tx(
                            tx,
                            "INSERT INTO client_certificates (serial, record) VALUES ($1, $2) \
                         ON CONFLICT (serial) DO NOTHING",
                        )
                        .await?,
                        &[&record.serial.as_bytes(), &json(&record)?],
                    )
                    .await
                    .map_err(db_error)?;
                if rows == 0 {
                    return Ok(Committed::No(false));
                }
                changes::notify(tx, &[&record.serial], true).await?;
                append_audit(tx, &audit).await?;
                Ok(Committed::Yes(true))
            })
        })
    }

    fn client_certificate(&self, serial: &Serial) -> Result<Option<ClientCertificateRecord>> {
        self.record_by(
            "SELECT record FROM client_certificates WHERE serial = $1",
            serial.as_bytes().to_vec(),
        )
    }

    fn client_certificates(&self) -> Result<Vec<ClientCertificateRecord>> {
        self.records("SELECT record FROM client_certificates ORDER BY serial")
    }

    fn revoke_client_certificate(
        &self,
        serial: &Serial,
        revocation: &Revocation,
        audit: &AuditEvent,
    ) -> Result<std::result::Result<(), RevokeRejection>> {
        let (serial, revocation, audit) = (serial.clone(), *revocation, audit.clone());
        self.transaction(move |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        &prepared_tx(
                            tx,
                            "SELECT record FROM client_certificates WHERE serial = $1 FOR UPDATE",
                        )
                        .await?,
                        &[&serial.as_bytes()],
                    )
                    .await
                    .map_err(db_error)?;
                let Some(row) = row else {
                    return Ok(Committed::No(Err(RevokeRejection::NotFound(serial))));
                };
                let mut record: ClientCertificateRecord = decode_json(row.get(0))?;
                if let Some(existing) = record.revocation {
                    return Ok(Committed::No(Err(RevokeRejection::AlreadyRevoked(
                        serial, existing,
                    ))));
                }
                record.revocation = Some(revocation);
                let entry = RevokedEntry {
                    serial: serial.clone(),
                    revocation,
                    not_after_s: record.not_after_s,
                };
                tx.execute(
                    &prepared_tx(
                        tx,
                        "UPDATE client_certificates SET record = $2 WHERE serial = $1",
                    )
                    .await?,
                    &[&serial.as_bytes(), &json(&record)?],
                )
                .await
                .map_err(db_error)?;
                tx.execute(
                    &prepared_tx(
                        tx,
                        "INSERT INTO revoked (serial, entry) VALUES ($1, $2) \
                     ON CONFLICT (serial) DO UPDATE SET entry = EXCLUDED.entry",
                    )
                    .await?,
                    &[&serial.as_bytes(), &json(&entry)?],
                )
                .await
                .map_err(db_error)?;
                changes::notify(tx, &[&serial], true).await?;
                append_audit(tx, &audit).await?;
                Ok(Committed::Yes(Ok(())))
            })
        })
    }

    fn purge_expired_tokens(
        &self,
        before_s: i64,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<usize> {
        self.purge(
            "DELETE FROM tokens WHERE hash IN (SELECT hash FROM tokens WHERE expires_at_s < $1 \
             ORDER BY hash LIMIT $2 FOR UPDATE) RETURNING hash",
            PurgeParams::Number(before_s, self::limit(limit)),
            audit,
            |count| format!("{count} tokens"),
        )
        .map(|keys| keys.len())
    }

    fn purge_expired_certificates(
        &self,
        before_s: i64,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<Vec<Serial>> {
        let audit = audit.clone();
        let count = self::limit(limit);
        let serials = self.transaction(move |tx| {
            Box::pin(async move {
                let rows = tx.query(&prepared_tx(tx, "DELETE FROM certificates WHERE serial IN (SELECT serial FROM certificates \
                         WHERE not_after_s < $1 ORDER BY serial LIMIT $2 FOR UPDATE) \
                         RETURNING serial").await?,
                        &[&before_s, &count],
                    )
                    .await
                    .map_err(db_error)?;
                let serials: Vec<Vec<u8>> = rows.iter().map(|row| row.get(0)).collect();
                if serials.is_empty() {
                    return Ok(Committed::No(serials));
                }
                tx.execute(&prepared_tx(tx, "DELETE FROM revoked WHERE serial = ANY($1)").await?, &[&serials])
                    .await
                    .map_err(db_error)?;
                let parsed = serials
                    .iter()
                    .map(|bytes| serial_of(bytes))
                    .collect::<Result<Vec<_>>>()?;
                changes::notify(tx, &parsed.iter().collect::<Vec<_>>(), false).await?;
                let mut event = audit;
                event.outcome = format!("{} certificate records", serials.len());
                append_audit(tx, &event).await?;
                Ok(Committed::Yes(serials))
            })
        })?;
        let mut serials = serials
            .iter()
            .map(|bytes| serial_of(bytes))
            .collect::<Result<Vec<_>>>()?;
        serials.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(serials)
    }

    fn purge_ledger_days_before(
        &self,
        min_day: &str,
        after: Option<&[u8]>,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<(usize, Option<Vec<u8>>)> {
        let min_day_owned = min_day.to_string();
        let keys = self.purge(
            "DELETE FROM ledger WHERE bucket IN (SELECT bucket FROM ledger WHERE day < $1 \
             AND bucket > $2 ORDER BY bucket LIMIT $3 FOR UPDATE) RETURNING bucket",
            PurgeParams::Bytes(
                min_day.to_string(),
                after.unwrap_or_default().to_vec(),
                self::limit(limit),
            ),
            audit,
            move |count| format!("{count} ledger buckets before {min_day_owned}"),
        )?;
        let count = keys.len();
        let next = (count == limit).then(|| keys.into_iter().max()).flatten();
        Ok((count, next))
    }

    fn purge_releases_before(
        &self,
        before_ms: i64,
        after: Option<&[u8]>,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<(usize, Option<Vec<u8>>)> {
        let after = match after {
            Some(key) => {
                let key = <[u8; 8]>::try_from(key)
                    .map_err(|_| Error::internal("a release key is 8 bytes"))?;
                to_i64(u64::from_be_bytes(key), "decision number")?
            }
            None => -1,
        };
        let keys = self.purge(
            "DELETE FROM releases WHERE decision_seq IN (SELECT decision_seq FROM releases \
             WHERE released_at_ms < $1 AND decision_seq > $2 ORDER BY decision_seq LIMIT $3 \
             FOR UPDATE) RETURNING int8send(decision_seq)",
            PurgeParams::Numbers(before_ms, after, self::limit(limit)),
            audit,
            |count| format!("{count} releases"),
        )?;
        let count = keys.len();
        let next = (count == limit).then(|| keys.into_iter().max()).flatten();
        Ok((count, next))
    }

    fn export(
        &self,
        _out: &mut dyn std::io::Write,
        _created_at_ms: i64,
        _decision_log: &mut FrameSource<'_>,
    ) -> Result<super::backup::BackupSummary> {
        Err(Error::FailedPrecondition(
            "payra backup writes a snapshot of the embedded database; with PostgreSQL, back up \
             the database itself (pg_dump, or a base backup with WAL archiving: see \
             docs/operations.md)"
                .into(),
        ))
    }

    fn probe_write(&self) -> Result<()> {
        self.transaction(|tx| {
            Box::pin(async move {
                tx.execute(
                    &prepared_tx(
                        tx,
                        "UPDATE counters SET value = value + 1 WHERE name = 'ready_probe'",
                    )
                    .await?,
                    &[],
                )
                .await
                .map_err(db_error)?;
                Ok(Committed::Yes(()))
            })
        })
    }

    fn audit_entries(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let after = to_i64(after_seq, "audit sequence")?;
        let count = self::limit(limit);
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &prepared(
                            client,
                            "SELECT entry FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                        )
                        .await?,
                        &[&after, &count],
                    )
                    .await
                    .map_err(db_error)?;
                rows.into_iter()
                    .map(|row| decode_json(row.get(0)))
                    .collect()
            })
        })
    }

    fn audit_head(&self) -> Result<ChainHead> {
        self.read(|client| {
            Box::pin(async move {
                let row = client
                    .query_one(
                        &prepared(client, "SELECT seq, hash FROM audit_head WHERE id = 1").await?,
                        &[],
                    )
                    .await
                    .map_err(db_error)?;
                let seq: i64 = row.get(0);
                let hash: Vec<u8> = row.get(1);
                Ok(ChainHead {
                    seq: u64::try_from(seq).map_err(|_| Error::internal("negative audit seq"))?,
                    hash: <[u8; 32]>::try_from(hash.as_slice()).unwrap_or(GENESIS_HASH),
                })
            })
        })
    }

    fn next_crl_number(&self, at_least: u64) -> Result<u64> {
        let at_least = to_i64(at_least, "CRL number")?;
        self.transaction(move |tx| {
            Box::pin(async move {
                let number: i64 = tx
                    .query_one(
                        &prepared_tx(
                            tx,
                            "UPDATE counters SET value = GREATEST(value + 1, $1) \
                         WHERE name = 'crl_number' RETURNING value",
                        )
                        .await?,
                        &[&at_least],
                    )
                    .await
                    .map_err(db_error)?
                    .get(0);
                Ok(Committed::Yes(
                    u64::try_from(number).map_err(|_| Error::internal("negative CRL number"))?,
                ))
            })
        })
    }
}
