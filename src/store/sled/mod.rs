//! The embedded sled backend of [`Store`], and what belongs to it: the group commit, the
//! issuance journal, the decision log (decisions and the ledger live in the process with
//! this backend), the signed audit heads, the backup format, the data directory.
//!
//! Trees: `certificates` (serial → compact record, `store::compact`; JSON as older versions
//! wrote it), `cert_summaries` (serial → binary summary), `tokens` (token hash → JSON record),
//! `by_customer` and `by_device` (`<id>\0<serial>` → empty), `by_key` (the device key,
//! compressed, then the serial → empty), `revoked` (serial → JSON
//! [`RevokedEntry`]) and `meta` (counters). Other records are JSON with a version field.

use crate::sync::Unpoisoned;
use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Db, Transactional, Tree};

pub mod audit_heads;
pub mod backup;
pub mod data_dir;
pub mod decision_log;
mod decisions;
mod group_commit;
mod issuance;
mod issuance_journal;
pub mod read_only;
pub mod replay;

pub use decisions::LocalDecisions;
pub use group_commit::GroupCommit;
pub(in crate::store) use issuance::IssueJob;
use issuance::IssueQueue;
pub use issuance::ISSUANCE_JOURNAL_FILE;

use crate::error::{Error, Result};
use crate::model::{CustomerId, DeviceId, RevocationReason, Serial};
use crate::store::audit::{chain_hash, AuditBody, AuditEntry, AuditEvent, GENESIS_HASH};
use crate::store::ledger_day;
use crate::store::records::{
    CertificateRecord, CertificateSummary, ClientCertificateRecord, Revocation, RevokedEntry,
    TokenHash, TokenRecord, UpstreamRevocation,
};
use crate::store::{
    FrameSource, IssueOutcome, LedgerCheckpoint, RevokeRejection, Store, TokenRejection,
};
use issuance_journal::{IssuanceJournal, JournalRecord, JournalTree, Put};

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::internal(format!("storage: {e}"))
    }
}

/// [`Store`] on an embedded sled database, with group-committed durability.
pub struct SledStore {
    db: Db,
    certificates: Tree,
    tokens: Tree,
    by_customer: Tree,
    by_device: Tree,
    /// Compressed device key ‖ serial → empty: every certificate of a key, for the
    /// one-key-one-device check and revocations for keyCompromise.
    by_key: Tree,
    revoked: Tree,
    meta: Tree,
    /// Held by every write transaction (not by the sync that follows) and by a backup.
    /// Every change appends to the audit chain, so transactions conflict on its head anyway;
    /// taking turns here spares sled's optimistic transactions their retries, and a backup
    /// never sees half of a change set.
    write_turn: std::sync::Mutex<()>,
    /// Enrollments waiting for the write turn; whoever gets the turn commits them all.
    issue_queue: std::sync::Mutex<IssueQueue>,
    ledger: Tree,
    releases: Tree,
    /// serial → [`CertificateSummary`] (binary): what a verification cache miss reads.
    summaries: Tree,
    agreed_limits: Tree,
    /// Serial → [`UpstreamRevocation`] (RA mode).
    upstream_revocations: Tree,
    audit: Tree,
    client_certificates: Tree,
    commit: GroupCommit,
    /// Enrollments' redo log (see `issuance_journal`); used only under the write turn.
    journal: std::sync::Mutex<IssuanceJournal>,
    /// Appends (each an fdatasync) to the journal since the store opened.
    journal_syncs: std::sync::atomic::AtomicU64,
    /// See [`SledStore::danger_skip_apply`].
    #[cfg(test)]
    skip_apply: std::sync::atomic::AtomicBool,
    /// Audited sled transactions committed under the write turn, counted; and how many of
    /// them a sync is known to cover (their writers sync after releasing the turn). See
    /// [`SledStore::issue_batch`].
    sled_changes: std::sync::atomic::AtomicU64,
    sled_changes_synced: std::sync::atomic::AtomicU64,
    /// The data directory (the decision log and signed audit heads live beside sled).
    dir: std::path::PathBuf,
    /// The decision log was opened ([`Store::open_decisions`]): it has one owner.
    decisions_opened: std::sync::atomic::AtomicBool,
    /// The journal's size past which a batch empties it ([`IssuanceJournal::RESET_BYTES`]).
    journal_reset_bytes: std::sync::atomic::AtomicU64,
}

/// A writer's hold on [`SledStore`]'s write turn. Writers that commit a sled transaction
/// sync only after releasing the turn; an issuance batch decided in between would chain its
/// audit entries after one that is not yet durable. So releasing the turn counts a change
/// (before the lock itself is released: `drop` runs before the fields are dropped), and
/// the next batch syncs sled first unless a sync has covered it (`SledStore::issue_batch`).
struct WriteTurn<'a> {
    store: &'a SledStore,
    _turn: std::sync::MutexGuard<'a, ()>,
}

impl Drop for WriteTurn<'_> {
    fn drop(&mut self) {
        self.store.sled_changed();
    }
}

const AUDIT_HEAD_KEY: &[u8] = b"audit_head";
/// The last decision-log record the saved ledger covers.
const LEDGER_THROUGH_KEY: &[u8] = b"ledger_through_seq";
const CRL_NUMBER_KEY: &[u8] = b"crl_number";
/// Present once the `by_key` tree holds every certificate's entry (see
/// `build_missing_key_index`).
const KEY_INDEX_COMPLETE_KEY: &[u8] = b"key_index_complete";
/// Present while the `cert_summaries` tree is being built (see `build_missing_summaries`).
const SUMMARIES_BUILDING_KEY: &[u8] = b"summaries_building";
/// The last issuance-journal batch whose writes are in the trees.
const ISSUANCE_APPLIED_KEY: &[u8] = b"issuance_applied_seq";

/// sled's page cache size. sled's default is 1 GiB; payra keeps what the hot path needs in
/// its own maps, so a small cache suffices and keeps the resident size down.
const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// The zstd level of a compressed database's pages (zstd's own default).
const SLED_COMPRESSION_LEVEL: i32 = 3;

/// sled's configuration for the database in `dir`. A new database compresses its pages with
/// zstd when `compress_if_new` (`store.sled_compression`): a page holds many records whose
/// certificates share their issuer, extensions and layout, and compression takes the disk
/// per certificate from 3.7 to 1.6 KB, for CPU on every page written and read, and a much
/// longer recovery after a crash (docs/performance.md, "Where the bytes go on sled"). sled
/// cannot change this for an existing database, so an existing one keeps what it was made
/// with; sled records that in its `conf` file, read here.
fn sled_config(dir: &Path, compress_if_new: bool) -> Result<sled::Config> {
    let unreadable = || {
        Error::internal(format!(
            "{} holds a sled database but not a readable conf file, which says whether its \
             pages are compressed; restore the data directory from a backup",
            dir.display()
        ))
    };
    let compressed = match std::fs::read(dir.join("conf")) {
        Ok(conf) => {
            let says = |value: &[u8]| conf.split(|b| *b == b'\n').any(|line| line == value);
            match (
                says(b"use_compression: true"),
                says(b"use_compression: false"),
            ) {
                (true, false) => true,
                (false, true) => false,
                // Empty or cut short (sled writes it in place): a guess could read every
                // page wrongly. sled takes an empty one for absent, so it is refused too.
                _ if dir.join("db").exists() => return Err(unreadable()),
                _ => compress_if_new,
            }
        }
        // Without its conf file sled would take a database for new and read it with the
        // wrong setting; refused rather than guessed.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.join("db").exists() => {
            return Err(unreadable())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => compress_if_new,
        Err(e) => {
            return Err(Error::internal(format!(
                "reading {}: {e}",
                dir.join("conf").display()
            )))
        }
    };
    Ok(sled::Config::new()
        .path(dir)
        .cache_capacity(SLED_CACHE_BYTES)
        .use_compression(compressed)
        .compression_factor(SLED_COMPRESSION_LEVEL))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::internal(format!("encoding record: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal(format!("decoding record: {e}")))
}

/// A certificate record in the form this store writes: compact binary, or JSON for a record
/// the compact form cannot hold (a damaged certificate, an over-long field), so that a
/// revocation never fails on a field it does not change.
fn encode_certificate(record: &CertificateRecord) -> Result<Vec<u8>> {
    record.to_compact().or_else(|_| encode(record))
}

/// A stored certificate record, compact or JSON (as stores before the compact form wrote).
fn decode_certificate(bytes: &[u8]) -> Result<CertificateRecord> {
    CertificateRecord::from_stored(bytes)
}

fn index_key(id: &str, serial: &Serial) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 1 + serial.as_bytes().len());
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key.extend_from_slice(serial.as_bytes());
    key
}

/// A device key as the key index starts its entries: SEC1 compressed (the parity of y, then
/// x), 33 octets. Two keys with one prefix are told apart by the summaries' full keys.
fn key_index_prefix(public_key: &[u8; 65]) -> [u8; 33] {
    let mut prefix = [0u8; 33];
    prefix[0] = 2 | (public_key[64] & 1);
    prefix[1..].copy_from_slice(&public_key[1..33]);
    prefix
}

pub(in crate::store) fn key_index_key(public_key: &[u8; 65], serial: &Serial) -> Vec<u8> {
    let mut key = key_index_prefix(public_key).to_vec();
    key.extend_from_slice(serial.as_bytes());
    key
}

fn index_prefix(id: &str) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.push(0);
    key
}

/// Turns a transaction's outcome into ours: aborts carry a domain answer.
fn finish<T>(result: std::result::Result<T, TransactionError<Error>>) -> Result<T> {
    match result {
        Ok(value) => Ok(value),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(e.into()),
    }
}

fn abort(e: Error) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(e)
}

/// Whether sled's open failed on the database's file lock. sled 0.34 reports it as an
/// `Other` error whose text names the lock and the operating system's `WouldBlock`.
fn lock_held(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
        || e.to_string().starts_with("could not acquire lock on ")
}

/// How long [`SledStore::open`] tries a database whose file lock is held.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

mod chain;
mod database;
pub use database::TreeSize;

use chain::*;

/// Whether a stored token (`None`: unknown) can be used at `now_s`.
fn token_usable(
    stored: Option<&[u8]>,
    now_s: i64,
) -> Result<std::result::Result<TokenRecord, TokenRejection>> {
    let Some(bytes) = stored else {
        return Ok(Err(TokenRejection::Unknown));
    };
    Ok(crate::store::token_usable(decode(bytes)?, now_s))
}

impl Store for SledStore {
    fn put_token(&self, hash: &TokenHash, token: &TokenRecord, audit: &AuditEvent) -> Result<()> {
        // One journaled batch with whatever else is queued: concurrent token requests (and
        // enrollments) share a sync.
        match self.commit_blocking(IssueJob::token(hash, token, audit)?)? {
            IssueOutcome::Issued => Ok(()),
            other => Err(Error::internal(format!("storing a token: {other:?}"))),
        }
    }

    fn token(&self, hash: &TokenHash) -> Result<Option<TokenRecord>> {
        self.tokens
            .get(hash.0)?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    /// Enrollments are flat-combined: each queues its job, then waits for the write turn;
    /// whoever gets the turn commits every queued job as one journaled batch (one append and
    /// one fdatasync, then plain inserts), so under load one sync serves many enrollments.
    fn issue_with_token(
        &self,
        hash: &TokenHash,
        now_s: i64,
        certificate: &CertificateRecord,
        audit: &AuditEvent,
    ) -> Result<IssueOutcome> {
        self.commit_blocking(IssueJob::new(hash, now_s, certificate, audit)?)
    }

    /// Queues the enrollment for a blocking task that commits batches until the queue is
    /// empty (one is started when none runs), so no thread waits for this one.
    fn issue_with_token_async(
        self: std::sync::Arc<Self>,
        hash: &TokenHash,
        now_s: i64,
        certificate: &CertificateRecord,
        audit: &AuditEvent,
        on_issued: crate::store::OnIssued,
    ) -> Result<crate::store::IssueReceiver> {
        let job = IssueJob::new(hash, now_s, certificate, audit)?;
        *job.on_issued.lock().unpoisoned() = Some(on_issued);
        Ok(self.queue_async(job))
    }

    /// Queues the token like an async enrollment: it shares the committer's next batch.
    fn put_token_async(
        self: std::sync::Arc<Self>,
        hash: &TokenHash,
        token: &TokenRecord,
        audit: &AuditEvent,
    ) -> Result<crate::store::IssueReceiver> {
        let job = IssueJob::token(hash, token, audit)?;
        Ok(self.queue_async(job))
    }

    fn open_decisions(
        &self,
        setup: &crate::store::DecisionSetup,
    ) -> Result<std::sync::Arc<dyn crate::store::Decisions>> {
        use std::sync::atomic::Ordering;
        let checkpoint = self.ledger_checkpoint(&setup.min_day)?;
        if self.decisions_opened.swap(true, Ordering::SeqCst) {
            return Err(Error::internal("the decision log is open already"));
        }
        let opened = LocalDecisions::open(&self.dir, setup, checkpoint, &|serial| {
            Ok(self.certificate_summary(serial)?.map(|s| s.public_key))
        })
        .map(|decisions| decisions.reading_summaries(self.summaries.clone()));
        match opened {
            Ok(decisions) => Ok(std::sync::Arc::new(decisions)),
            Err(e) => {
                self.decisions_opened.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn certificate_summary(&self, serial: &Serial) -> Result<Option<CertificateSummary>> {
        self.summaries
            .get(serial.as_bytes())?
            .map(|bytes| CertificateSummary::decode(serial.as_bytes(), &bytes))
            .transpose()
    }

    fn revocation_state(&self, serial: &Serial) -> Result<Option<Option<Revocation>>> {
        self.summaries
            .get(serial.as_bytes())?
            .map(|bytes| {
                CertificateSummary::decode(serial.as_bytes(), &bytes).map(|s| s.revocation)
            })
            .transpose()
    }

    fn summary_reads_are_quick(&self) -> bool {
        true
    }

    fn certificates_with_key(&self, public_key: &[u8; 65]) -> Result<Vec<CertificateSummary>> {
        let prefix = key_index_prefix(public_key);
        let mut holders = Vec::new();
        for entry in self.by_key.scan_prefix(prefix) {
            let (key, _) = entry?;
            let serial = &key[prefix.len()..];
            // An entry whose summary is gone (purged between the two reads) is skipped.
            if let Some(bytes) = self.summaries.get(serial)? {
                let summary = CertificateSummary::decode(serial, &bytes)?;
                if summary.public_key == *public_key {
                    holders.push(summary);
                }
            }
        }
        Ok(holders)
    }

    fn certificate(&self, serial: &Serial) -> Result<Option<CertificateRecord>> {
        self.certificates
            .get(serial.as_bytes())?
            .map(|bytes| decode_certificate(&bytes))
            .transpose()
    }

    fn serials_by_customer(&self, customer: &CustomerId) -> Result<Vec<Serial>> {
        Self::serials_under(&self.by_customer, customer.as_str())
    }

    fn serials_by_device(&self, device: &DeviceId) -> Result<Vec<Serial>> {
        Self::serials_under(&self.by_device, device.as_str())
    }

    fn certificates_after(
        &self,
        after: Option<&Serial>,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>> {
        // Serials are compared as big-endian magnitudes of up to 20 octets; sled orders keys
        // bytewise, which agrees for equal lengths and is a stable order otherwise.
        let iter = match after {
            Some(serial) => self.certificates.range::<&[u8], _>((
                std::ops::Bound::Excluded(serial.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.certificates.iter(),
        };
        iter.values()
            .take(limit)
            .map(|value| decode_certificate(&value?))
            .collect()
    }

    fn for_each_certificate_summary(
        &self,
        each: &mut dyn FnMut(CertificateSummary) -> bool,
    ) -> Result<()> {
        for entry in self.summaries.iter() {
            let (serial, value) = entry?;
            if !each(CertificateSummary::decode(&serial, &value)?) {
                break;
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
        let writing = self.writing();
        // sled commits a transaction's writes whenever the closure returns Ok, so every check
        // runs before the first write: a rejected batch writes nothing.
        let outcome =
            self.revocation_trees()
                .transaction(|(certificates, revoked, log, meta, summaries)| {
                    let mut records = Vec::with_capacity(serials.len());
                    for serial in serials {
                        let Some(bytes) = certificates.get(serial.as_bytes())? else {
                            return Ok(Err(RevokeRejection::NotFound(serial.clone())));
                        };
                        let mut record = decode_certificate(&bytes).map_err(abort)?;
                        match revocation.applied_over(record.revocation) {
                            Some(applied) => record.revocation = Some(applied),
                            None => {
                                return Ok(Err(RevokeRejection::AlreadyRevoked(
                                    serial.clone(),
                                    record.revocation.unwrap_or(*revocation),
                                )))
                            }
                        }
                        records.push(record);
                    }
                    for record in records {
                        put_revoked(revoked, &record).map_err(abort)?;
                        certificates.insert(
                            record.serial.as_bytes(),
                            encode_certificate(&record).map_err(abort)?,
                        )?;
                        put_summary(summaries, &record)?;
                        let mut event = audit.clone();
                        event.target = record.serial.to_hex();
                        append_audit(log, meta, &event)?;
                    }
                    Ok(Ok(()))
                });
        self.synced_if_changed(writing, outcome)
    }

    fn unhold(
        &self,
        serial: &Serial,
        audit: &AuditEvent,
    ) -> Result<std::result::Result<CertificateRecord, RevokeRejection>> {
        let writing = self.writing();
        let outcome =
            self.revocation_trees()
                .transaction(|(certificates, revoked, log, meta, summaries)| {
                    let Some(bytes) = certificates.get(serial.as_bytes())? else {
                        return Ok(Err(RevokeRejection::NotFound(serial.clone())));
                    };
                    let mut record = decode_certificate(&bytes).map_err(abort)?;
                    match record.revocation {
                        Some(r) if r.reason == RevocationReason::CertificateHold => {}
                        _ => return Ok(Err(RevokeRejection::NotOnHold(serial.clone()))),
                    }
                    record.revocation = None;
                    revoked.remove(serial.as_bytes())?;
                    certificates.insert(
                        serial.as_bytes(),
                        encode_certificate(&record).map_err(abort)?,
                    )?;
                    put_summary(summaries, &record)?;
                    append_audit(log, meta, audit)?;
                    Ok(Ok(record))
                });
        self.synced_if_changed(writing, outcome)
    }

    fn renew(
        &self,
        old: &Serial,
        new: &CertificateRecord,
        revoked_at_s: i64,
        audit: &AuditEvent,
    ) -> Result<std::result::Result<(), RevokeRejection>> {
        let writing = self.writing();
        let new_value = encode_certificate(new)?;
        let new_summary = CertificateSummary::of(new)?;
        let new_key_entry = key_index_key(&new_summary.public_key, &new.serial);
        let new_summary = new_summary.encode();
        let outcome = (
            &self.certificates,
            &self.revoked,
            &self.by_customer,
            &self.by_device,
            &self.by_key,
            &self.audit,
            &self.meta,
            &self.summaries,
        )
            .transaction(
                |(certificates, revoked, by_customer, by_device, by_key, log, meta, summaries)| {
                    let Some(bytes) = certificates.get(old.as_bytes())? else {
                        return Ok(Err(RevokeRejection::NotFound(old.clone())));
                    };
                    let mut record = decode_certificate(&bytes).map_err(abort)?;
                    if let Some(existing) = record.revocation {
                        return Ok(Err(RevokeRejection::AlreadyRevoked(old.clone(), existing)));
                    }
                    if certificates.get(new.serial.as_bytes())?.is_some() {
                        return Err(abort(Error::internal("random serial collided")));
                    }
                    record.revocation = Some(Revocation {
                        revoked_at_s,
                        reason: RevocationReason::Superseded,
                    });
                    record.superseded_by = Some(new.serial.clone());
                    put_revoked(revoked, &record).map_err(abort)?;
                    certificates
                        .insert(old.as_bytes(), encode_certificate(&record).map_err(abort)?)?;
                    put_summary(summaries, &record)?;
                    certificates.insert(new.serial.as_bytes(), new_value.as_slice())?;
                    summaries.insert(new.serial.as_bytes(), new_summary.as_slice())?;
                    by_customer.insert(
                        index_key(new.customer_id.as_str(), &new.serial),
                        &[] as &[u8],
                    )?;
                    by_device
                        .insert(index_key(new.device_id.as_str(), &new.serial), &[] as &[u8])?;
                    by_key.insert(new_key_entry.as_slice(), &[] as &[u8])?;
                    append_audit(log, meta, audit)?;
                    Ok(Ok(()))
                },
            );
        self.synced_if_changed(writing, outcome)
    }

    fn revoked_entries(&self) -> Result<Vec<RevokedEntry>> {
        self.revoked
            .iter()
            .values()
            .map(|value| decode(&value?))
            .collect()
    }

    fn purge_ledger_days_before(
        &self,
        min_day: &str,
        after: Option<&[u8]>,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<(usize, Option<Vec<u8>>)> {
        self.purge_where(
            &self.ledger,
            after,
            limit,
            audit,
            |key, _| Ok(ledger_day(key) < min_day.as_bytes()),
            |count| format!("{count} ledger buckets before {min_day}"),
        )
    }

    fn purge_releases_before(
        &self,
        before_ms: i64,
        after: Option<&[u8]>,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<(usize, Option<Vec<u8>>)> {
        self.purge_where(
            &self.releases,
            after,
            limit,
            audit,
            |_, value| Ok(read_i64(Some(value.into())) < before_ms),
            |count| format!("{count} releases"),
        )
    }

    fn ledger_checkpoint(&self, min_day: &str) -> Result<LedgerCheckpoint> {
        let through_seq = self
            .meta
            .get(LEDGER_THROUGH_KEY)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let mut buckets = Vec::new();
        for entry in self.ledger.iter() {
            let (key, value) = entry?;
            if ledger_day(&key) >= min_day.as_bytes() {
                buckets.push((key.to_vec(), read_i64(Some(value))));
            }
        }
        let mut released = Vec::new();
        for entry in self.releases.iter() {
            let (key, value) = entry?;
            let seq = <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| Error::internal("bad release key"))?;
            released.push((seq, read_i64(Some(value))));
        }
        Ok(LedgerCheckpoint {
            through_seq,
            buckets,
            released,
        })
    }

    fn save_ledger_checkpoint(&self, checkpoint: &LedgerCheckpoint) -> Result<()> {
        let writing = self.writing();
        let outcome =
            (&self.ledger, &self.releases, &self.meta).transaction(|(ledger, releases, meta)| {
                for (key, used) in &checkpoint.buckets {
                    ledger.insert(key.as_slice(), &used.to_be_bytes())?;
                }
                for (seq, at_ms) in &checkpoint.released {
                    releases.insert(&seq.to_be_bytes(), &at_ms.to_be_bytes())?;
                }
                meta.insert(LEDGER_THROUGH_KEY, &checkpoint.through_seq.to_be_bytes())?;
                Ok(())
            });
        // No audit entry: an issuance batch does not chain after anything written here, and
        // a lost checkpoint is rebuilt from the decision log.
        finish(outcome)?;
        drop(writing);
        self.sync_sled()
    }

    fn upstream_revocations(&self) -> Result<Vec<UpstreamRevocation>> {
        self.upstream_revocations
            .iter()
            .map(|entry| decode(&entry?.1))
            .collect()
    }

    fn put_upstream_revocation(
        &self,
        entry: &UpstreamRevocation,
        audit: Option<&AuditEvent>,
    ) -> Result<()> {
        let writing = self.writing();
        let value = encode(entry)?;
        let outcome = (&self.upstream_revocations, &self.audit, &self.meta).transaction(
            |(upstream, log, meta)| {
                upstream.insert(entry.serial.as_bytes(), value.as_slice())?;
                if let Some(audit) = audit {
                    append_audit(log, meta, audit)?;
                }
                Ok(())
            },
        );
        finish(outcome)?;
        drop(writing);
        self.sync_sled()
    }

    fn agreed_limits(&self) -> Result<Vec<(String, i64)>> {
        self.agreed_limits
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                let customer = String::from_utf8(key.to_vec()).map_err(|_| {
                    Error::internal("an agreed limit is stored under a key that is not UTF-8")
                })?;
                Ok((customer, read_i64(Some(value))))
            })
            .collect()
    }

    fn set_agreed_limit(
        &self,
        customer: &CustomerId,
        limit_fen: i64,
        audit: &AuditEvent,
    ) -> Result<()> {
        let writing = self.writing();
        let outcome =
            (&self.agreed_limits, &self.audit, &self.meta).transaction(|(limits, log, meta)| {
                limits.insert(customer.as_str().as_bytes(), &limit_fen.to_be_bytes())?;
                append_audit(log, meta, audit)?;
                Ok(())
            });
        finish(outcome)?;
        {
            drop(writing);
            self.sync_sled()
        }
    }

    fn put_client_certificate(
        &self,
        record: &ClientCertificateRecord,
        audit: &AuditEvent,
    ) -> Result<bool> {
        let writing = self.writing();
        let value = encode(record)?;
        let outcome = (&self.client_certificates, &self.audit, &self.meta).transaction(
            |(clients, log, meta)| {
                if clients.get(record.serial.as_bytes())?.is_some() {
                    return Ok(false);
                }
                clients.insert(record.serial.as_bytes(), value.as_slice())?;
                append_audit(log, meta, audit)?;
                Ok(true)
            },
        );
        let stored = finish(outcome)?;
        if stored {
            {
                drop(writing);
                self.sync_sled()
            }?;
        }
        Ok(stored)
    }

    fn client_certificate(&self, serial: &Serial) -> Result<Option<ClientCertificateRecord>> {
        self.client_certificates
            .get(serial.as_bytes())?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    fn client_certificates(&self) -> Result<Vec<ClientCertificateRecord>> {
        self.client_certificates
            .iter()
            .values()
            .map(|value| decode(&value?))
            .collect()
    }

    fn revoke_client_certificate(
        &self,
        serial: &Serial,
        revocation: &Revocation,
        audit: &AuditEvent,
    ) -> Result<std::result::Result<(), RevokeRejection>> {
        let writing = self.writing();
        let outcome = (
            &self.client_certificates,
            &self.revoked,
            &self.audit,
            &self.meta,
        )
            .transaction(|(clients, revoked, log, meta)| {
                let Some(bytes) = clients.get(serial.as_bytes())? else {
                    return Ok(Err(RevokeRejection::NotFound(serial.clone())));
                };
                let mut record: ClientCertificateRecord = decode(&bytes).map_err(abort)?;
                if let Some(existing) = record.revocation {
                    return Ok(Err(RevokeRejection::AlreadyRevoked(
                        serial.clone(),
                        existing,
                    )));
                }
                record.revocation = Some(*revocation);
                let entry = RevokedEntry {
                    serial: serial.clone(),
                    revocation: *revocation,
                    not_after_s: record.not_after_s,
                    key_algorithm: crate::model::KeyAlgorithm::P256,
                    issued_upstream: false,
                };
                revoked.insert(serial.as_bytes(), encode(&entry).map_err(abort)?)?;
                clients.insert(serial.as_bytes(), encode(&record).map_err(abort)?)?;
                append_audit(log, meta, audit)?;
                Ok(Ok(()))
            });
        self.synced_if_changed(writing, outcome)
    }

    fn export(
        &self,
        out: &mut dyn std::io::Write,
        created_at_ms: i64,
        decision_log: &mut FrameSource<'_>,
    ) -> Result<backup::BackupSummary> {
        self.export_trees(out, created_at_ms, decision_log)
    }

    fn purge_expired_tokens(
        &self,
        before_s: i64,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<usize> {
        // Few tokens are kept (they expire in days), so each batch scans from the start.
        self.purge_where(
            &self.tokens,
            None,
            limit,
            audit,
            |_, value| Ok(decode::<TokenRecord>(value)?.expires_at_s < before_s),
            |count| format!("{count} tokens"),
        )
        .map(|(purged, _)| purged)
    }

    fn purge_expired_certificates(
        &self,
        before_s: i64,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<Vec<Serial>> {
        // The walk runs before the write turn is taken: at tens of millions of records it
        // would otherwise hold up every enrollment and revocation for its whole length.
        let candidates = self.expired_candidates(before_s, limit)?;
        self.purge_candidates(candidates, audit)
    }

    fn probe_write(&self) -> Result<()> {
        let writing = self.writing();
        self.lock_journal().healthy()?;
        self.meta.insert(b"ready_probe", &[1u8] as &[u8])?;
        {
            drop(writing);
            self.sync_sled()
        }
    }

    fn audit_entries(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        self.audit
            .range((after_seq.saturating_add(1)).to_be_bytes()..)
            .values()
            .take(limit)
            .map(|value| decode(&value?))
            .collect()
    }

    fn audit_head(&self) -> Result<crate::store::ChainHead> {
        let head = audit_head(self.meta.get(AUDIT_HEAD_KEY)?.as_deref());
        let hash = <[u8; 32]>::try_from(head.hash.as_slice())
            .map_err(|_| Error::internal("the recorded audit head's hash is not 32 bytes"))?;
        Ok(crate::store::ChainHead {
            seq: head.seq,
            hash,
        })
    }

    fn syncs(&self) -> u64 {
        SledStore::syncs(self)
    }

    fn close(&self) -> Result<()> {
        SledStore::close(self)
    }

    fn next_crl_number(&self, at_least: u64) -> Result<u64> {
        let writing = self.writing();
        let updated = self.meta.update_and_fetch(CRL_NUMBER_KEY, |old| {
            let current = old
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map_or(0, u64::from_be_bytes);
            Some((current + 1).max(at_least).to_be_bytes().to_vec())
        })?;
        let number = updated
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| Error::internal("CRL number missing after update"))?;
        {
            drop(writing);
            self.sync_sled()
        }?;
        Ok(number)
    }
}
