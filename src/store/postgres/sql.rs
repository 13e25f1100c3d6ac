//! What every PostgreSQL statement of payra's uses: the password and TLS for connections,
//! error classification, JSON and integer conversions, prepared statements, running async
//! work from sync callers, the audit chain's append and the certificate rows' writes and
//! locks.

use std::future::Future;

use deadpool_postgres::Pool;
use deadpool_postgres::Transaction;

use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::model::Serial;
use crate::store::audit::{chain_hash, AuditBody, AuditEntry, AuditEvent, ChainHead};
use crate::store::records::{CertificateRecord, CertificateSummary, RevokedEntry};

/// The database password: from `password_file` (not readable by group or others), else from
/// the environment variable `password_env`, else none.
pub(super) fn password(config: &StoreConfig) -> Result<Option<String>> {
    if let Some(path) = &config.password_file {
        let text = crate::ca::pki::read_private_key(path)?;
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
    }
    Ok(std::env::var(&config.password_env).ok())
}

/// The rustls client configuration that trusts the certificate authorities in `ca_file`.
pub(super) fn tls_config(ca_file: &std::path::Path) -> Result<rustls::ClientConfig> {
    crate::ca::pki::tls_client_config("store.ca_file", ca_file)
}

/// Turns a database error into ours: a lost or refused connection, a database shutting down
/// or starting, a timeout are `Unavailable` (the caller may retry, here or on another
/// replica); anything else is a fault inside payra.
pub(super) fn db_error(e: tokio_postgres::Error) -> Error {
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

pub(super) fn pool_error(e: deadpool_postgres::PoolError) -> Error {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_error(e),
        other => Error::Unavailable(format!("the database is unavailable: {other}")),
    }
}

pub(super) fn decode_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::internal(format!("decoding record: {e}")))
}

pub(super) fn json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| Error::internal(format!("encoding record: {e}")))
}

pub(super) fn serial_of(bytes: &[u8]) -> Result<Serial> {
    Serial::from_bytes("serial", bytes)
        .map_err(|e| Error::internal(format!("a stored serial is malformed: {e}")))
}

pub(super) fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::internal(format!("{what} {value} is out of range")))
}

pub(super) fn limit(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Runs `work` on `handle` and waits for its answer on this thread, which may be any thread
/// (inside another runtime or not): the answer comes back over a plain channel.
pub(super) fn block_on<T, F>(handle: &tokio::runtime::Handle, work: F) -> Result<T>
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
pub(super) async fn prepared_tx(
    tx: &Transaction<'_>,
    sql: &str,
) -> Result<tokio_postgres::Statement> {
    tx.prepare_cached(sql).await.map_err(db_error)
}

/// [`prepared_tx`] on a pooled connection outside a transaction.
pub(super) async fn prepared(
    client: &deadpool_postgres::Client,
    sql: &str,
) -> Result<tokio_postgres::Statement> {
    client.prepare_cached(sql).await.map_err(db_error)
}

/// Appends `event` to the audit chain: locks the head row, links the entry to it and moves
/// it. Called last in a transaction (the head is the last lock every writer takes).
pub(super) async fn append_audit(tx: &Transaction<'_>, event: &AuditEvent) -> Result<ChainHead> {
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
pub(super) async fn put_certificate(
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
pub(super) async fn put_revoked(tx: &Transaction<'_>, record: &CertificateRecord) -> Result<()> {
    match record.revocation {
        Some(revocation) => {
            let entry = RevokedEntry {
                serial: record.serial.clone(),
                revocation,
                not_after_s: record.not_after_s,
                key_algorithm: record.key_algorithm,
                issued_upstream: record.issued_upstream,
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
pub(super) async fn lock_certificates(
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

pub(super) type Param = dyn tokio_postgres::types::ToSql + Sync;

/// The parameters of a purge statement.
pub(super) enum PurgeParams {
    Bytes(String, Vec<u8>, i64),
    Numbers(i64, i64, i64),
    Number(i64, i64),
}

/// What a transaction's work decided: commit and answer, or roll back and answer.
pub(super) enum Committed<T> {
    Yes(T),
    No(T),
}

/// Runs `work` in a transaction on a pooled connection; commits on [`Committed::Yes`].
pub(super) async fn in_transaction<T, F>(pool: &Pool, work: F) -> Result<T>
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
