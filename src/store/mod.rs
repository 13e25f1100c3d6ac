//! Storage in domain words. [`Store`] is the seam a second backend (PostgreSQL) plugs into;
//! [`SledStore`] is the embedded default. Every mutating method returns only after its change
//! is on stable storage, and changes that belong together commit atomically.

pub mod audit;
mod compact;
#[cfg(test)]
mod conformance;
pub mod postgres;
mod records;
pub mod sled;

pub use sled::{audit_heads, backup, data_dir, decision_log, read_only};

pub use audit::{Actor, AuditCheck, AuditEntry, AuditEvent, ChainHead};
pub use decision_log::{Books, DecisionLog, ForgottenDays, LedgerCheckpoint, LogRecord};
pub use postgres::PgStore;
pub use records::{
    CertificateRecord, CertificateSummary, ClientCertificateRecord, EvidenceRecord, KeyRefusal,
    Revocation, RevokedEntry, Standing, TokenHash, TokenRecord, UpstreamRevocation, RECORD_VERSION,
};
pub use sled::GroupCommit;
pub use sled::{LocalDecisions, SledStore, TreeSize};

/// Hands each (record number, frame) of the decision log to its argument, in order (for
/// backups).
pub type FrameSource<'a> = dyn FnMut(&mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> + 'a;

/// The day in a ledger key: customer \0 day \0 tier, the day is the second field.
pub(crate) fn ledger_day(key: &[u8]) -> &[u8] {
    key.split(|b| *b == 0).nth(1).unwrap_or_default()
}

/// The key of a ledger bucket: customer, day and tier.
pub fn ledger_key(customer: &CustomerId, day: &str, tier: Tier) -> Vec<u8> {
    let mut key = customer.as_str().as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(day.as_bytes());
    key.push(0);
    key.extend_from_slice(tier.letter().as_bytes());
    key
}

use crate::error::Result;

/// Recomputes the whole audit chain of `store`, in pages.
pub fn verify_audit_log(store: &dyn Store) -> Result<AuditCheck> {
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let page = store.audit_entries(after, 4096)?;
        let Some(last) = page.last() else { break };
        after = last.body.seq;
        entries.extend(page);
    }
    Ok(audit::verify_chain(entries))
}
use crate::model::{CustomerId, DeviceId, Serial, Tier};

pub use crate::model::TokenRejection;

/// `token` if it can enroll a device at `now_s`: unused and unexpired.
pub(crate) fn token_usable(
    token: TokenRecord,
    now_s: i64,
) -> std::result::Result<TokenRecord, TokenRejection> {
    if let Some(used_at_s) = token.used_at_s {
        return Err(TokenRejection::AlreadyUsed { used_at_s });
    }
    if now_s >= token.expires_at_s {
        return Err(TokenRejection::Expired {
            expired_at_s: token.expires_at_s,
        });
    }
    Ok(token)
}

/// The outcome of [`Store::issue_with_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueOutcome {
    Issued,
    TokenRejected(TokenRejection),
    /// The serial exists already (a random collision); nothing was written.
    SerialTaken,
    /// The device key has a live certificate (unrevoked or on hold, unexpired) for another
    /// customer or device; nothing was written. Only a store shared by several payra
    /// processes checks this itself (the RA checks it in memory first).
    KeyHeldElsewhere,
    /// The device key was revoked for keyCompromise before; nothing was written (shared
    /// stores only, as above).
    KeyCompromised,
}

pub use crate::model::RevokeRejection;

/// A (device key, nonce) pair claimed by a verification, remembered until `expires_at_ms`.
/// Claimed per key, not per certificate: one key certified twice (a second enrollment, a
/// renewal that keeps the key) must not let one signed intent verify twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonceClaim {
    /// The device's public key, uncompressed SEC1.
    pub public_key: [u8; 65],
    pub nonce: Vec<u8>,
    pub expires_at_ms: i64,
}

impl NonceClaim {
    /// The storage key; see [`nonce_key`].
    pub fn key(&self) -> Vec<u8> {
        nonce_key(&self.public_key, &self.nonce)
    }
}

/// First byte of a (device key, nonce) claim key. Claim keys written before claims were
/// per key start with a serial length (at most 20).
const KEY_CLAIM_TAG: u8 = 0x80;

/// The storage key of a (device key, nonce) pair: [`KEY_CLAIM_TAG`], the key in compressed
/// SEC1 form (33 bytes: a point has one compressed form), the nonce.
pub fn nonce_key(public_key: &[u8; 65], nonce: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + 33 + nonce.len());
    key.push(KEY_CLAIM_TAG);
    key.push(0x02 | (public_key[64] & 1));
    key.extend_from_slice(&public_key[1..33]);
    key.extend_from_slice(nonce);
    key
}

/// The (serial, nonce) of a claim key written before claims were per key, if `key` is one.
pub fn serial_claim_parts(key: &[u8]) -> Option<(Serial, &[u8])> {
    let len = usize::from(*key.first()?);
    if len > 20 || key.len() < 1 + len {
        return None;
    }
    let serial = Serial::from_bytes("serial", &key[1..1 + len]).ok()?;
    Some((serial, &key[1 + len..]))
}

/// Why a reservation could not be released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseRejection {
    NotFound,
    NothingReserved,
    AlreadyReleased {
        released_at_ms: i64,
    },
    /// The reservation's day is no longer kept (it counts for no limit any more).
    DayNotKept,
}

/// Where an async enrollment's outcome arrives (see [`Store::issue_with_token_async`]).
pub type IssueReceiver = tokio::sync::oneshot::Receiver<Result<IssueOutcome>>;

/// Run by [`Store::issue_with_token_async`] once the certificate is durable and stored, and
/// only if it was issued: before the outcome is sent, whether or not anyone still waits for
/// it, and before any later write can commit.
pub type OnIssued = Box<dyn FnOnce() + Send>;

/// What the decision store knows when it records one decision: the evidence id it gave
/// it, and the state of the store when the decision is recorded (inside the decision's
/// transaction, for a database).
#[derive(Debug, Clone)]
pub struct DecisionContext {
    pub evidence_id: String,
    /// When [`DecisionJob::recheck`] asked for it: the certificate's revocation as committed
    /// now (`Some(None)`: not revoked; `None`: no such certificate), read as the decision is
    /// recorded, so that a verification that looked its certificate up before a revocation
    /// was acknowledged, and is recorded after, is refused.
    pub certificate: Option<Option<Revocation>>,
    /// What became of [`DecisionJob::nonce`].
    pub nonce: NonceCheck,
    /// What the customer's buckets of [`DecisionJob::buckets`] hold, before this decision.
    pub used: Option<[i64; 4]>,
}

/// What became of a decision's nonce claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Claimed by this decision (or it had no nonce).
    Claimed,
    /// Claimed by an earlier decision (of any payra process).
    Replayed,
    /// Its claim would have expired by the store's clock (`now_ms`) when it was made: a
    /// claim that old may already have been forgotten, so it cannot be taken.
    TooLate { now_ms: i64 },
}

/// What the RA decided once it saw the [`DecisionContext`].
#[derive(Debug)]
pub struct Decided {
    /// The decision record to append (a [`LogRecord::Decision`]).
    pub record: LogRecord,
    /// The bucket (index into [`DecisionJob::buckets`]) and amount to reserve.
    pub reserve: Option<(usize, i64)>,
}

/// Decides a decision inside the store's transaction. Must be quick: it runs while the
/// customer's buckets are locked. It may run more than once (a transaction the database
/// aborted is tried again); the last run's answer is the one recorded.
pub type DecideFn = Box<dyn Fn(&DecisionContext) -> Result<Decided> + Send + Sync>;

/// One verification or qualification for the decision store to record atomically: the
/// nonce claimed, the certificate re-checked, the reservation added if the RA's rules say it
/// fits, the evidence appended.
pub struct DecisionJob {
    /// The RA's clock when it decided (a claim that expired before it may be taken again).
    pub now_ms: i64,
    pub recheck: Option<Serial>,
    /// The (device key, nonce) claim key and when it may be forgotten.
    pub nonce: Option<(Vec<u8>, i64)>,
    /// The customer's four buckets today (tiers A, B, C, D), to read and lock.
    pub buckets: Option<[Vec<u8>; 4]>,
    pub decide: DecideFn,
}

/// Resolves once a recorded decision is durable (or with the error that stopped it).
pub type DecisionFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'static>>;

/// What a store needs to open its decisions: the RA's clock and ledger days.
pub struct DecisionSetup {
    pub clock: std::sync::Arc<dyn crate::clock::Clock>,
    /// The oldest ledger day the RA still checks limits against.
    pub min_day: String,
    /// How long a nonce claim can matter after its intent was created (twice the skew and a
    /// minute): claims older than that are not kept.
    pub claim_horizon_ms: i64,
}

/// Sizes of a decision store kept in this process, for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecisionGauges {
    pub records: u64,
    pub bytes: u64,
    pub nonces: usize,
    /// Ledger buckets held in memory.
    pub buckets: usize,
}

/// Decisions (evidence, reservations, releases), nonce claims and the daily ledger's
/// persistence: the embedded store's decision log and replay set
/// ([`sled::LocalDecisions`]), or tables a database shares between payra processes
/// ([`postgres::PgDecisions`]). The ledger's rules stay in the RA: a store applies "add
/// this reservation if the RA's rules, run with the buckets as stored, say it fits".
pub trait Decisions: Send + Sync {
    /// Records `job` atomically (with others, batched): the nonce claimed, the certificate
    /// re-read, `job.decide` run with what the store holds, the reservation added, the
    /// record appended. The future resolves once it is durable; `job.decide` has run by then.
    fn decide(&self, job: DecisionJob) -> DecisionFuture;

    /// Gives back the reservation of `evidence_id`, if it has one not yet given back, and
    /// returns the four buckets' amounts after. Durable on return.
    fn release(
        &self,
        evidence_id: &str,
        buckets: &[Vec<u8>; 4],
        now_ms: i64,
        audit: &AuditEvent,
    ) -> Result<std::result::Result<[i64; 4], ReleaseRejection>>;

    /// The evidence recorded under `evidence_id`, with its release time.
    fn evidence(&self, evidence_id: &str) -> Result<Option<EvidenceRecord>>;

    /// What `buckets` hold now.
    fn used(&self, buckets: &[Vec<u8>; 4]) -> Result<[i64; 4]>;

    /// Forgets nonce claims that can no longer matter at `now_ms` (the RA's clock; a store
    /// in this process reads its own wall and monotonic clocks); returns how many.
    fn purge_nonces(&self, now_ms: i64) -> Result<usize>;

    /// Checks every decision chain; returns the number of decisions checked.
    fn verify_chains(&self) -> Result<std::result::Result<u64, String>>;

    /// The decision chain's head as far as it is durable, for a signed audit head; `None`
    /// where the chains live in a database (several chains, read by `payra audit verify`).
    fn durable_head(&self) -> Option<ChainHead> {
        None
    }

    /// Saves the ledger as it stands in this process through `save` (the store's ledger
    /// checkpoint), then forgets buckets of days before `min_day`; returns how many it
    /// forgot. Nothing to do where the ledger lives in a database.
    fn checkpoint(
        &self,
        _min_day: &str,
        _save: &dyn Fn(&LedgerCheckpoint) -> Result<()>,
    ) -> Result<usize> {
        Ok(0)
    }

    /// The oldest day whose buckets this process holds in memory, if any.
    fn oldest_day(&self) -> Option<String> {
        None
    }

    /// Hands each (record number, frame) of a decision log in this process to `each` (for
    /// backups).
    fn for_each_frame(&self, _each: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        Ok(())
    }

    /// Sizes for the metrics, for a store kept in this process.
    fn gauges(&self) -> Option<DecisionGauges> {
        None
    }

    /// Syncs made by this process (0 where the database server makes them).
    fn syncs(&self) -> u64 {
        0
    }

    /// Whether decisions can be recorded now (for `/readyz`).
    fn healthy(&self) -> Result<()> {
        Ok(())
    }

    /// Writes what is queued and stops taking decisions.
    fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// A change another payra process made to state this process keeps in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChange {
    /// These device certificates were revoked, released, superseded or deleted.
    Certificates(Vec<Serial>),
    /// These client certificates were registered or revoked.
    ClientCertificates(Vec<Serial>),
    /// An agreed tier-A limit was set.
    AgreedLimits,
    /// Anything may have changed (notifications were lost): reload.
    Everything,
}

/// Persistent state of the RA and CA.
/// The answer to [`Store::certificate_summary_async`].
pub type SummaryReceiver = tokio::sync::oneshot::Receiver<Result<Option<CertificateSummary>>>;

pub trait Store: Send + Sync {
    /// Stores a new enrollment token under its hash. Durable on return.
    fn put_token(&self, hash: &TokenHash, token: &TokenRecord, audit: &AuditEvent) -> Result<()>;

    /// [`Store::put_token`] for async callers: returns at once, and the receiver gets
    /// `Issued` once the token is durable (or the error). No thread waits for it.
    fn put_token_async(
        self: std::sync::Arc<Self>,
        hash: &TokenHash,
        token: &TokenRecord,
        audit: &AuditEvent,
    ) -> Result<IssueReceiver>;

    /// The token stored under `hash`, if any.
    fn token(&self, hash: &TokenHash) -> Result<Option<TokenRecord>>;

    /// Atomically checks that the token is known, unexpired at `now_s` and unused, marks it
    /// used by `certificate`, and stores `certificate` with its indexes. Exactly one of any
    /// number of concurrent calls with one token returns `Issued`. Durable on return; on any
    /// other outcome nothing was written.
    fn issue_with_token(
        &self,
        hash: &TokenHash,
        now_s: i64,
        certificate: &CertificateRecord,
        audit: &AuditEvent,
    ) -> Result<IssueOutcome>;

    /// [`Store::issue_with_token`] for async callers: returns at once, and the receiver gets
    /// the outcome once it is durable. A backend that batches enrollments commits this one
    /// with others without a thread waiting for it; the default runs the call here.
    ///
    /// `on_issued` runs once the certificate is stored, before the outcome is sent and before
    /// any later write (a revocation of the certificate, say) commits: the caller's in-memory
    /// view gets the certificate before any change to it, and gets it even if the caller has
    /// stopped waiting. It must be quick and must not call back into the store's writes.
    fn issue_with_token_async(
        self: std::sync::Arc<Self>,
        hash: &TokenHash,
        now_s: i64,
        certificate: &CertificateRecord,
        audit: &AuditEvent,
        on_issued: OnIssued,
    ) -> Result<IssueReceiver>;

    /// The certificate with `serial`, if payra issued it.
    fn certificate(&self, serial: &Serial) -> Result<Option<CertificateRecord>>;

    /// The revocation state of the certificate with `serial` (`None` if there is no such
    /// certificate), read from its summary rather than the full record.
    fn revocation_state(&self, serial: &Serial) -> Result<Option<Option<Revocation>>>;

    /// Serials of the certificates issued to `customer`, in serial order.
    fn serials_by_customer(&self, customer: &CustomerId) -> Result<Vec<Serial>>;

    /// Serials of the certificates issued to `device`, in serial order.
    fn serials_by_device(&self, device: &DeviceId) -> Result<Vec<Serial>>;

    /// Up to `limit` certificates in serial order, starting after `after`.
    fn certificates_after(
        &self,
        after: Option<&Serial>,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>>;

    /// Hands `each` the summary of every certificate (the count by status), without holding
    /// them all in memory at once, until `each` returns false.
    fn for_each_certificate_summary(
        &self,
        each: &mut dyn FnMut(CertificateSummary) -> bool,
    ) -> Result<()>;

    /// How many certificates there are of each [`Standing`] at `now_s` (the count by status),
    /// or `None` if `stop` was set before the count was done. This walks every summary; a
    /// store that can count where the data is counts there instead. A store shared by several
    /// processes may answer with a count another one made less than `reuse_within_s` seconds
    /// from `now_s`, or wait (for a while) for one another process is making, and after that
    /// wait answer with the count stored before it (`None` if there is none yet); with 0 it
    /// counts afresh, after the count under way elsewhere.
    fn count_by_standing(
        &self,
        now_s: i64,
        reuse_within_s: i64,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Option<Vec<(Standing, u64)>>> {
        let _ = reuse_within_s;
        let mut counts = std::collections::HashMap::<Standing, u64>::new();
        let mut stopped = false;
        self.for_each_certificate_summary(&mut |summary| {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                stopped = true;
                return false;
            }
            *counts.entry(Standing::of(&summary, now_s)).or_default() += 1;
            true
        })?;
        Ok((!stopped).then(|| counts.into_iter().collect()))
    }

    /// Revokes every serial in `serials` with `revocation`, all or none: if any is unknown or
    /// already revoked, nothing is written and the first such serial is reported. A
    /// certificate on hold may be revoked for good (RFC 5280 5.3.1): its entry is replaced.
    /// Durable on return.
    /// One audit entry is appended per serial, `audit` with its target set to the serial.
    fn revoke(
        &self,
        serials: &[Serial],
        revocation: &Revocation,
        audit: &AuditEvent,
    ) -> Result<Result<(), RevokeRejection>>;

    /// Releases a certificate from certificateHold. Durable on return.
    fn unhold(
        &self,
        serial: &Serial,
        audit: &AuditEvent,
    ) -> Result<Result<CertificateRecord, RevokeRejection>>;

    /// Atomically marks `old` superseded by `new` (revocation reason superseded at
    /// `revoked_at_s`) and stores `new` with its indexes. `old` must be unrevoked. Durable on
    /// return.
    fn renew(
        &self,
        old: &Serial,
        new: &CertificateRecord,
        revoked_at_s: i64,
        audit: &AuditEvent,
    ) -> Result<Result<(), RevokeRejection>>;

    /// Every revoked certificate (including those on hold), for the CRL.
    fn revoked_entries(&self) -> Result<Vec<RevokedEntry>>;

    /// Every upstream revocation entry (RA mode), confirmed or pending, in serial order.
    fn upstream_revocations(&self) -> Result<Vec<UpstreamRevocation>>;

    /// Stores `entry`, replacing the serial's previous one, and appends `audit` when given
    /// (a confirmation is audited; a failed attempt is not). Durable on return.
    fn put_upstream_revocation(
        &self,
        entry: &UpstreamRevocation,
        audit: Option<&AuditEvent>,
    ) -> Result<()>;

    /// The last saved ledger checkpoint of the decision log: buckets of `min_day` or later
    /// (`YYYY-MM-DD`), every release, and the record number they cover (0: none saved).
    fn ledger_checkpoint(&self, min_day: &str) -> Result<LedgerCheckpoint>;

    /// Saves a ledger checkpoint's changed buckets and new releases and the record number
    /// they cover, atomically. Durable on return.
    fn save_ledger_checkpoint(&self, checkpoint: &LedgerCheckpoint) -> Result<()>;

    /// Every agreed tier-A daily limit that was set, by customer id (the RA keeps them in
    /// memory, so verification reads no storage).
    fn agreed_limits(&self) -> Result<Vec<(String, i64)>>;

    /// Sets the customer's agreed tier-A daily limit. Durable on return.
    fn set_agreed_limit(
        &self,
        customer: &CustomerId,
        limit_fen: i64,
        audit: &AuditEvent,
    ) -> Result<()>;

    /// Stores a client certificate unless its serial is known. Returns false (writing
    /// nothing) when it is. Durable on return.
    fn put_client_certificate(
        &self,
        record: &ClientCertificateRecord,
        audit: &AuditEvent,
    ) -> Result<bool>;

    /// The client certificate with `serial`.
    fn client_certificate(&self, serial: &Serial) -> Result<Option<ClientCertificateRecord>>;

    /// Every client certificate.
    fn client_certificates(&self) -> Result<Vec<ClientCertificateRecord>>;

    /// Revokes a client certificate (it also goes on the CRL). Durable on return.
    fn revoke_client_certificate(
        &self,
        serial: &Serial,
        revocation: &Revocation,
        audit: &AuditEvent,
    ) -> Result<Result<(), RevokeRejection>>;

    /// Deletes up to `limit` tokens that expired before `before_s` (used or not: an expired
    /// token can never be used again). Returns how many.
    fn purge_expired_tokens(
        &self,
        before_s: i64,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<usize>;

    /// Deletes up to `limit` certificate records (with their indexes and CRL entries) whose
    /// notAfter is before `before_s`. Returns the serials deleted.
    fn purge_expired_certificates(
        &self,
        before_s: i64,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<Vec<Serial>>;

    /// Deletes up to `limit` stored ledger buckets of days before `min_day` (`YYYY-MM-DD`),
    /// looking at keys after `after` only: no start loads them and no limit counts them.
    /// Returns how many, and the key to go on after (`None`: the end was reached).
    fn purge_ledger_days_before(
        &self,
        min_day: &str,
        after: Option<&[u8]>,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<(usize, Option<Vec<u8>>)>;

    /// Deletes up to `limit` stored releases made before `before_ms`, looking at keys after
    /// `after` only. Returns how many, and the key to go on after (`None`: the end).
    fn purge_releases_before(
        &self,
        before_ms: i64,
        after: Option<&[u8]>,
        limit: usize,
        audit: &AuditEvent,
    ) -> Result<(usize, Option<Vec<u8>>)>;

    /// Writes a consistent, checksummed snapshot of all data to `out` (see [`backup`]),
    /// followed by the decision log's frames, which `decision_log` hands to its argument.
    fn export(
        &self,
        out: &mut dyn std::io::Write,
        created_at_ms: i64,
        decision_log: &mut FrameSource<'_>,
    ) -> Result<backup::BackupSummary>;

    /// Writes and syncs a probe record; fails if storage cannot take a durable write.
    fn probe_write(&self) -> Result<()>;

    /// Up to `limit` audit entries with sequence numbers above `after_seq`, in order.
    fn audit_entries(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>>;

    /// The change chain's recorded head: the last entry's number and hash (0 and the genesis
    /// hash when the log is empty).
    fn audit_head(&self) -> Result<ChainHead>;

    /// Takes the next CRL number: strictly greater than every number taken before, across
    /// restarts, and at least `at_least`. Durable on return.
    fn next_crl_number(&self, at_least: u64) -> Result<u64>;

    /// The summary of the certificate with `serial`, if payra issued it (a verification cache
    /// miss: the certificate may have been issued by another payra process).
    fn certificate_summary(&self, serial: &Serial) -> Result<Option<CertificateSummary>>;

    /// [`Store::certificate_summary`] for an async caller, where the store reads without
    /// holding a thread of the caller's: PostgreSQL reads on its own runtime, and reads the
    /// misses that arrive while others are being read in one statement. `None` where the
    /// store has no such path: the caller then uses `certificate_summary`.
    fn certificate_summary_async(&self, _serial: &Serial) -> Option<SummaryReceiver> {
        None
    }

    /// Whether [`Store::certificate_summary`] (and the store's other point reads: a token, a
    /// key's certificates) answers in microseconds without waiting on a network (an embedded
    /// database whose file the operating system caches), so that an async caller may call
    /// it on its own thread rather than hand it to a blocking one.
    fn summary_reads_are_quick(&self) -> bool {
        false
    }

    /// Every certificate of the device key `public_key` (the one-key-one-device check, and
    /// revocations for keyCompromise).
    fn certificates_with_key(&self, public_key: &[u8; 65]) -> Result<Vec<CertificateSummary>>;

    /// Opens the store's decisions (once per store): where verifications, reservations,
    /// releases and nonce claims are recorded.
    fn open_decisions(&self, setup: &DecisionSetup) -> Result<std::sync::Arc<dyn Decisions>>;

    /// Whether other payra processes write this store too (a shared database): then state this
    /// process does not hold in memory may exist, and a certificate the cache lacks is looked
    /// up. A store only this process writes has all of it in the cache.
    fn shared(&self) -> bool {
        false
    }

    /// Changes other payra processes make, for a store several processes share; `None` for
    /// a store only this process writes. The receiver can be taken once.
    fn watch_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<StoreChange>> {
        None
    }

    /// Storage syncs this process made since the store opened, for the metrics (0 where the
    /// database server makes them).
    fn syncs(&self) -> u64 {
        0
    }

    /// Makes everything durable and lets the storage go; nothing may be written after.
    fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_keys_are_per_device_key_and_old_ones_are_recognised() {
        let mut point = [7u8; 65];
        point[0] = 4;
        let key = nonce_key(&point, b"nonce");
        assert_eq!(key.len(), 1 + 33 + 5);
        assert_eq!(key[0], KEY_CLAIM_TAG);
        assert!(
            serial_claim_parts(&key).is_none(),
            "a key claim is not a serial claim"
        );
        let mut odd = point;
        odd[64] = 8;
        assert_ne!(
            nonce_key(&odd, b"nonce"),
            key,
            "the y parity is part of the key"
        );

        let serial = Serial::from_bytes("serial", &[0x42, 1, 2]).unwrap();
        let mut old = vec![3, 0x42, 1, 2];
        old.extend_from_slice(b"nonce");
        let (parsed, nonce) = serial_claim_parts(&old).unwrap();
        assert_eq!((parsed, nonce), (serial, &b"nonce"[..]));
    }
}
