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

mod bulk;
mod changes;
mod decisions;
mod issuance;
mod migrations;
#[doc(hidden)]
pub mod testing;

pub use decisions::PgDecisions;
pub use migrations::{SchemaState, SCHEMA_VERSION};

use crate::sync::Unpoisoned;
use std::sync::Arc;

use deadpool_postgres::Pool;

use super::audit::{AuditEntry, AuditEvent, ChainHead, GENESIS_HASH};
use super::records::{
    CertificateRecord, CertificateSummary, ClientCertificateRecord, Revocation, RevokedEntry,
    Standing, TokenHash, TokenRecord, UpstreamRevocation,
};
use issuance::IssueWork;

use super::{
    FrameSource, IssueOutcome, IssueReceiver, LedgerCheckpoint, OnIssued, RevokeRejection, Store,
};
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
    /// Verification cache misses for [`summaries::reader`].
    summary_reads: tokio::sync::mpsc::UnboundedSender<summaries::SummaryRead>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

mod connection;
mod sql;
mod summaries;

use sql::*;

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

    fn certificate_summary_async(&self, serial: &Serial) -> Option<super::SummaryReceiver> {
        Some(summaries::queue(&self.summary_reads, serial))
    }

    fn certificate_summary(&self, serial: &Serial) -> Result<Option<CertificateSummary>> {
        let serial = serial.clone();
        self.read(move |client| {
            Box::pin(async move {
                let row = client
                    .query_opt(
                        &prepared(client, summaries::SUMMARY_OF).await?,
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

    /// Counted in the database, grouped there, and shared by the replicas
    /// ([`summaries::count_by_standing`]): no summary crosses the network. A summary of
    /// another version is refused rather than read at version 1's offsets. One transaction:
    /// `stop` is looked at after it (a count it made is stored for the others all the same).
    fn count_by_standing(
        &self,
        now_s: i64,
        reuse_within_s: i64,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Option<Vec<(Standing, u64)>>> {
        let counts = self.block(summaries::count_by_standing(
            self.pool.clone(),
            now_s,
            reuse_within_s,
            summaries::COUNT_LOCK_WAIT_MS,
        ))?;
        Ok(counts.filter(|_| !stop.load(std::sync::atomic::Ordering::Relaxed)))
    }

    fn certificates_with_key(&self, public_key: &[u8; 65]) -> Result<Vec<CertificateSummary>> {
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

    fn for_each_certificate_summary(
        &self,
        each: &mut dyn FnMut(CertificateSummary) -> bool,
    ) -> Result<()> {
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
        // Returning drops the receiver: the stream stops at its next chunk.
        for chunk in rx {
            for summary in chunk? {
                if !each(summary) {
                    return Ok(());
                }
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
                if revocation.reason == RevocationReason::KeyCompromise {
                    issuance::lock_keys_of(tx, &changed).await?;
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

    fn upstream_revocations(&self) -> Result<Vec<UpstreamRevocation>> {
        self.read(|client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &prepared(
                            client,
                            "SELECT entry FROM upstream_revocations ORDER BY serial",
                        )
                        .await?,
                        &[],
                    )
                    .await
                    .map_err(db_error)?;
                rows.iter().map(|row| decode_json(row.get(0))).collect()
            })
        })
    }

    fn put_upstream_revocation(
        &self,
        entry: &UpstreamRevocation,
        audit: Option<&AuditEvent>,
    ) -> Result<()> {
        let (entry, audit) = (entry.clone(), audit.cloned());
        self.transaction(move |tx| {
            Box::pin(async move {
                tx.execute(
                    &prepared_tx(
                        tx,
                        "INSERT INTO upstream_revocations (serial, entry) VALUES ($1, $2) \
                     ON CONFLICT (serial) DO UPDATE SET entry = EXCLUDED.entry",
                    )
                    .await?,
                    &[&entry.serial.as_bytes(), &json(&entry)?],
                )
                .await
                .map_err(db_error)?;
                if let Some(audit) = &audit {
                    append_audit(tx, audit).await?;
                }
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
                    key_algorithm: crate::model::KeyAlgorithm::P256,
                    issued_upstream: false,
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
                         WHERE not_after_s < $1 \
                         AND CASE WHEN get_byte(summary, 0) <> $4 THEN false \
                             ELSE NOT (get_byte(summary, 82) = 1 AND get_byte(summary, 91) = $3) END \
                         ORDER BY serial LIMIT $2 FOR UPDATE) \
                         RETURNING serial").await?,
                        // Kept: a certificate revoked for keyCompromise refuses its key for
                        // ever (`CertificateSummary::key_compromised`; the summary's
                        // revocation flag and reason, as `count_by_standing` reads them).
                        // Only summaries of the layout those offsets are of.
                        &[
                            &before_s,
                            &count,
                            &i32::from(RevocationReason::KeyCompromise.code()),
                            &i32::from(crate::store::records::SUMMARY_VERSION),
                        ],
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
                // Their upstream revocation entries go with them (RA mode).
                tx.execute(&prepared_tx(tx, "DELETE FROM upstream_revocations WHERE serial = ANY($1)").await?, &[&serials])
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
        Ok(purged_page(keys, limit))
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
        Ok(purged_page(keys, limit))
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

/// How many keys one page of a purge deleted, and the key to go on after when the page was
/// full (the largest deleted; `None` when the purge is done).
fn purged_page(keys: Vec<Vec<u8>>, limit: usize) -> (usize, Option<Vec<u8>>) {
    let count = keys.len();
    let next = (count == limit).then(|| keys.into_iter().max()).flatten();
    (count, next)
}
