//! Connecting: the pool, TLS, the schema check, the durability check, migrations, the
//! change listener and the decision writers started; transactions with retries.

use crate::sync::Unpoisoned;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Transaction;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::model::Serial;
use crate::store::audit::AuditEvent;
use crate::store::{IssueOutcome, IssueReceiver, OnIssued};

use super::*;

impl PgStore {
    /// Checks every decision chain in the database; returns the number of decisions checked.
    pub fn verify_decision_chains(&self) -> Result<std::result::Result<u64, String>> {
        use crate::store::Decisions;
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
    pub(super) fn open_pool(config: &StoreConfig) -> Result<PgStore> {
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
        let (summary_reads, reads) = tokio::sync::mpsc::unbounded_channel();
        handle.spawn(super::summaries::reader(pool.clone(), reads));
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
            summary_reads,
        })
    }

    /// Runs `work` on the store's runtime and waits for its answer on this thread.
    pub(super) fn block<T, F>(&self, work: F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        block_on(&self.handle, work)
    }

    /// Runs `work` inside one transaction on a pooled connection, committing if it returns
    /// `Ok(Ok(_))` and rolling back otherwise.
    pub(super) fn transaction<T, F>(&self, work: F) -> Result<T>
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
    pub(super) fn read<T, F>(&self, work: F) -> Result<T>
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
    pub(super) fn record_by<T>(&self, sql: &'static str, key: Vec<u8>) -> Result<Option<T>>
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
    pub(super) fn records<T>(&self, sql: &'static str) -> Result<Vec<T>>
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
    pub(super) fn serials_where(&self, sql: &'static str, id: &str) -> Result<Vec<Serial>> {
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
    pub(super) fn check_durability(&self) -> Result<()> {
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
    pub(super) fn issue_async(
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
    pub(super) fn issue_blocking(
        &self,
        work: IssueWork,
        audit: &AuditEvent,
    ) -> Result<IssueOutcome> {
        let rx = self.issue_async(work, audit, None);
        self.block(async move {
            rx.await
                .map_err(|_| Error::Unavailable("the enrollment committer has stopped".into()))?
        })
    }

    /// Deletes what `select` picks (a `SELECT key ... LIMIT $n` over `table`'s `column`)
    /// with one audit entry saying how many; returns the keys deleted.
    pub(super) fn purge(
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
