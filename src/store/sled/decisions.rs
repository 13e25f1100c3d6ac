//! The embedded store's [`Decisions`]: the decision log in the data directory (evidence,
//! reservations and releases, chained; the ledger's buckets in memory beside it, saved by
//! checkpoints) and the replay set of nonce claims, rebuilt from the log at start.
//!
//! A decision claims its nonce in the replay set first, outside the log's lock; the RA's
//! rules then run under the log's lock with the buckets as they stand, so concurrent
//! decisions for one customer see each other's reservations. The answer waits until the
//! group commit has made the record durable; a decision that never becomes durable gives its
//! claim back.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::decision_log::{ChainCheck, DecisionLog, LogRecord};
use super::replay::{Claim, Moment, ReplayGuard};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::store::records::EvidenceRecord;
use crate::store::{
    AuditEvent, ChainHead, DecisionContext, DecisionFuture, DecisionGauges, DecisionJob,
    DecisionSetup, Decisions, LedgerCheckpoint, NonceCheck, ReleaseRejection,
};

/// See the module documentation.
pub struct LocalDecisions {
    log: Arc<DecisionLog>,
    replay: Arc<ReplayGuard>,
    clock: Arc<dyn Clock>,
    dir: PathBuf,
    /// The store's certificate summaries, where a decision re-reads its certificate's
    /// revocation as it is appended ([`LocalDecisions::reading_summaries`]); `None` (tests
    /// of the log alone): every certificate counts as unrevoked.
    summaries: Option<sled::Tree>,
}

/// A nonce claim made for a decision: its key and expiry, given back if the decision is
/// never durable.
type HeldClaim = Option<(Vec<u8>, i64)>;

/// `ev_` + the decision's record number (16 hex digits) + 64 random bits (16 hex digits):
/// the number finds the record, the random part makes ids unguessable.
fn evidence_id_for(seq: u64, random: [u8; 8]) -> String {
    format!("ev_{seq:016x}{}", hex::encode(random))
}

/// The record number inside an evidence id, if it has the shape of one.
fn evidence_seq(evidence_id: &str) -> Option<u64> {
    let rest = evidence_id.strip_prefix("ev_")?;
    if rest.len() != 32 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(&rest[..16], 16).ok()
}

impl LocalDecisions {
    /// Opens the decision log in `data_dir/decisions`: refuses a log that ends before the
    /// last signed audit head, replays what the ledger `checkpoint` does not cover, and
    /// rebuilds the replay set from the claims inside the horizon. `public_key` finds a
    /// certificate's key, for claims recorded per certificate before claims were per key.
    pub(super) fn open(
        data_dir: &Path,
        setup: &DecisionSetup,
        checkpoint: LedgerCheckpoint,
        public_key: &dyn Fn(&crate::model::Serial) -> Result<Option<[u8; 65]>>,
    ) -> Result<LocalDecisions> {
        // The last decision record a signed audit head covers: it was durable when signed.
        let signed_through = super::audit_heads::read_all(data_dir)?
            .iter()
            .map(|head| head.statement.decision_seq)
            .max()
            .unwrap_or(0);
        let mut live_nonces = Vec::new();
        let mut lookup_failed = None;
        let log = DecisionLog::open_signed(
            &data_dir.join("decisions"),
            checkpoint,
            signed_through,
            setup.clock.now_ms(),
            setup.claim_horizon_ms,
            &mut |key, expires_at_ms| {
                let key = match crate::store::serial_claim_parts(&key) {
                    Some((serial, nonce)) => match public_key(&serial) {
                        Ok(Some(point)) => crate::store::nonce_key(&point, nonce),
                        Ok(None) => key,
                        Err(e) => {
                            lookup_failed.get_or_insert(e);
                            key
                        }
                    },
                    None => key,
                };
                live_nonces.push((key, expires_at_ms))
            },
        )?;
        if let Some(e) = lookup_failed {
            // A claim kept under the wrong key would let its nonce be used again.
            return Err(e);
        }
        // Older days that the replay brought back (releases of old decisions) leave before
        // the first checkpoint, which would otherwise save them as they stand in memory.
        log.forget_ledger_days_before(&setup.min_day);
        let replay = ReplayGuard::with(live_nonces, Moment::of(setup.clock.as_ref()));
        Ok(LocalDecisions {
            log: Arc::new(log),
            replay: Arc::new(replay),
            clock: setup.clock.clone(),
            dir: data_dir.join("decisions"),
            summaries: None,
        })
    }

    /// Re-reads a decision's certificate from `summaries` as the decision is appended: a
    /// verification that found its certificate valid in the cache, and is recorded after a
    /// revocation of it was acknowledged, is refused.
    pub(super) fn reading_summaries(mut self, summaries: sled::Tree) -> LocalDecisions {
        self.summaries = Some(summaries);
        self
    }

    /// `serial`'s revocation as stored now (`None`: no such certificate).
    fn stored_revocation(
        &self,
        serial: &crate::model::Serial,
    ) -> Result<Option<Option<crate::store::Revocation>>> {
        let Some(summaries) = &self.summaries else {
            return Ok(Some(None));
        };
        summaries
            .get(serial.as_bytes())?
            .map(|bytes| crate::store::CertificateSummary::revocation_in(&bytes))
            .transpose()
    }

    /// The decision recorded under `evidence_id` and its record number.
    fn decision(&self, evidence_id: &str) -> Result<Option<(u64, EvidenceRecord)>> {
        let Some(seq) = evidence_seq(evidence_id) else {
            return Ok(None);
        };
        Ok(match self.log.read(seq)? {
            Some(LogRecord::Decision { evidence, .. }) if evidence.evidence_id == evidence_id => {
                Some((seq, *evidence))
            }
            _ => None,
        })
    }

    /// Claims the job's nonce, runs its rules under the log's lock and appends the record;
    /// returns the record number and the claim to give back if it never becomes durable.
    fn append(&self, job: &DecisionJob) -> Result<(u64, HeldClaim)> {
        let mut claimed = None;
        let nonce = match &job.nonce {
            None => NonceCheck::Claimed,
            // The replay set reads the clocks again under its lock (see `replay.rs`).
            Some((key, expires_at_ms)) => match self
                .replay
                .claim(key, *expires_at_ms, || Moment::of(self.clock.as_ref()))
            {
                Claim::Claimed => {
                    claimed = Some((key.clone(), *expires_at_ms));
                    NonceCheck::Claimed
                }
                Claim::Replayed => NonceCheck::Replayed,
                Claim::TooLate { now_ms } => NonceCheck::TooLate { now_ms },
            },
        };
        // Drawn before the log's lock, from the thread's CSPRNG (ChaCha, seeded by the OS):
        // a system call per decision under the lock would serialise the request threads.
        let random: [u8; 8] = rand::random();
        let appended = self.log.append(|seq, books| {
            let buckets = job.buckets.as_ref();
            let context = DecisionContext {
                evidence_id: evidence_id_for(seq, random),
                certificate: match &job.recheck {
                    Some(serial) => self.stored_revocation(serial)?,
                    None => None,
                },
                nonce,
                used: buckets.map(|b| [0, 1, 2, 3].map(|t| books.used(&b[t]))),
            };
            let decided = (job.decide)(&context)?;
            if let (Some((tier, amount_fen)), Some(buckets)) = (decided.reserve, buckets) {
                let bucket = buckets.get(tier).ok_or_else(|| {
                    Error::internal(format!("a reservation names bucket {tier} of 4"))
                })?;
                books.add_reservation(bucket, amount_fen);
            }
            let json = serde_json::to_vec(&decided.record)
                .map_err(|e| Error::internal(format!("encoding a decision: {e}")))?;
            Ok((json, ()))
        });
        match appended {
            Ok((seq, ())) => Ok((seq, claimed)),
            Err(e) => {
                if let Some((key, expires_at_ms)) = claimed {
                    self.replay.unclaim(&key, expires_at_ms);
                }
                Err(e)
            }
        }
    }
}

impl Decisions for LocalDecisions {
    fn decide(&self, job: DecisionJob) -> DecisionFuture {
        let (seq, claimed) = match self.append(&job) {
            Ok(appended) => appended,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let (log, replay) = (self.log.clone(), self.replay.clone());
        Box::pin(async move {
            let durable = log.durable(seq).await;
            if durable.is_err() {
                if let Some((key, expires_at_ms)) = claimed {
                    replay.unclaim(&key, expires_at_ms);
                }
            }
            durable
        })
    }

    fn release(
        &self,
        evidence_id: &str,
        buckets: &[Vec<u8>; 4],
        now_ms: i64,
        audit: &AuditEvent,
    ) -> Result<std::result::Result<[i64; 4], ReleaseRejection>> {
        let Some((decision_seq, record)) = self.decision(evidence_id)? else {
            return Ok(Err(ReleaseRejection::NotFound));
        };
        if record.reserved_fen <= 0 || record.customer_id.is_none() {
            return Ok(Err(ReleaseRejection::NothingReserved));
        }
        let bucket = &buckets[record.tier.index()];
        let mut rejected = None;
        let appended = self.log.append(|_, books| {
            // Under the log's lock: a checkpoint may have let the day go, or another release
            // have given the amount back, since the caller looked.
            if !books.has_day(&record.day) {
                rejected = Some(ReleaseRejection::DayNotKept);
            } else if let Some(released_at_ms) = books.released_at(decision_seq) {
                rejected = Some(ReleaseRejection::AlreadyReleased { released_at_ms });
            }
            if rejected.is_some() {
                return Err(Error::FailedPrecondition("not released".into()));
            }
            books.release(decision_seq, bucket, record.reserved_fen, now_ms);
            let used = buckets.clone().map(|b| books.used(&b));
            let release = LogRecord::Release {
                decision_seq,
                evidence_id: evidence_id.to_string(),
                ledger_key_hex: hex::encode(bucket),
                amount_fen: record.reserved_fen,
                released_at_ms: now_ms,
                audit: audit.clone(),
            };
            let json = serde_json::to_vec(&release)
                .map_err(|e| Error::internal(format!("encoding a release: {e}")))?;
            Ok((json, used))
        });
        if let Some(rejection) = rejected {
            return Ok(Err(rejection));
        }
        let (seq, used) = appended?;
        self.log.durable_blocking(seq)?;
        Ok(Ok(used))
    }

    fn evidence(&self, evidence_id: &str) -> Result<Option<EvidenceRecord>> {
        Ok(self.decision(evidence_id)?.map(|(seq, mut record)| {
            record.released_at_ms = self.log.with_books(|books| books.released_at(seq));
            record
        }))
    }

    fn used(&self, buckets: &[Vec<u8>; 4]) -> Result<[i64; 4]> {
        Ok(self
            .log
            .with_books(|books| buckets.clone().map(|bucket| books.used(&bucket))))
    }

    fn purge_nonces(&self, _now_ms: i64) -> Result<usize> {
        // Both clocks (see `replay.rs`), read now: not the caller's wall clock alone.
        Ok(self.replay.purge(Moment::of(self.clock.as_ref())))
    }

    fn verify_chains(&self) -> Result<std::result::Result<u64, String>> {
        Ok(match DecisionLog::verify(&self.dir)? {
            ChainCheck::Intact { records } => Ok(records),
            ChainCheck::Broken { seq, reason } => Err(format!("record {seq}: {reason}")),
        })
    }

    fn durable_head(&self) -> Option<ChainHead> {
        Some(self.log.durable_head())
    }

    fn checkpoint(
        &self,
        min_day: &str,
        save: &dyn Fn(&LedgerCheckpoint) -> Result<()>,
    ) -> Result<usize> {
        let checkpoint = self.log.take_checkpoint()?;
        if let Err(e) = save(&checkpoint) {
            self.log.checkpoint_failed(checkpoint);
            return Err(e);
        }
        Ok(self.log.forget_ledger_days_before(min_day))
    }

    fn oldest_day(&self) -> Option<String> {
        self.log.with_books(|books| books.oldest_day())
    }

    fn for_each_frame(&self, each: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        self.log.for_each_frame(each)
    }

    fn gauges(&self) -> Option<DecisionGauges> {
        let (records, bytes) = self.log.size();
        Some(DecisionGauges {
            records,
            bytes,
            nonces: self.replay.held(),
            buckets: self.log.with_books(|books| books.bucket_count()),
        })
    }

    fn syncs(&self) -> u64 {
        self.log.syncs()
    }

    fn healthy(&self) -> Result<()> {
        self.log.healthy()
    }

    fn close(&self) -> Result<()> {
        self.log.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_ids_carry_their_record_number_and_nothing_else_parses() {
        let id = evidence_id_for(0x2a, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(id, "ev_000000000000002a0102030405060708");
        assert_eq!(evidence_seq(&id), Some(0x2a));
        for bad in [
            "",
            "ev_",
            "ev_2a0102030405060708",
            "ev_000000000000002a",
            "ev-000000000000002a0102030405060708",
            "ev_00000000000000zz0102030405060708",
            "ev_000000000000002a01020304050607080",
        ] {
            assert_eq!(evidence_seq(bad), None, "{bad:?}");
        }
    }

    /// What the decide closure saw of the job's nonce; the closure then refuses, so nothing
    /// is appended.
    fn nonce_seen(decisions: &LocalDecisions, key: &[u8], expires_at_ms: i64) -> NonceCheck {
        context_seen(decisions, None, Some((key.to_vec(), expires_at_ms))).nonce
    }

    /// The context the decide closure saw for a job with `recheck` and `nonce`; the closure
    /// then refuses, so nothing is appended.
    fn context_seen(
        decisions: &LocalDecisions,
        recheck: Option<crate::model::Serial>,
        nonce: Option<(Vec<u8>, i64)>,
    ) -> DecisionContext {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let job = DecisionJob {
            now_ms: 0,
            recheck,
            nonce,
            buckets: None,
            decide: {
                let seen = seen.clone();
                Box::new(move |context: &DecisionContext| {
                    *seen.lock().unwrap() = Some(context.clone());
                    Err(Error::internal("the test stops here"))
                })
            },
        };
        assert!(decisions.append(&job).is_err());
        let seen = seen.lock().unwrap().take();
        seen.expect("the closure ran")
    }

    /// A decision re-reads its certificate's revocation from the summaries as it is
    /// appended: revoked, unrevoked and unknown are what the store holds then.
    #[test]
    fn a_decision_sees_its_certificates_revocation_as_stored_when_appended() {
        use crate::store::CertificateSummary;
        let dir = tempfile::tempdir().unwrap();
        let setup = DecisionSetup {
            clock: Arc::new(crate::clock::ManualClock::new(1_800_000_000_000)),
            min_day: "2027-01-01".into(),
            claim_horizon_ms: 660_000,
        };
        let db = sled::Config::new().temporary(true).open().unwrap();
        let summaries = db.open_tree("cert_summaries").unwrap();
        let decisions =
            LocalDecisions::open(dir.path(), &setup, LedgerCheckpoint::default(), &|_| {
                Ok(None)
            })
            .unwrap()
            .reading_summaries(summaries.clone());
        let serial = crate::model::Serial::random();
        let mut summary = CertificateSummary {
            serial: serial.clone(),
            customer_id: crate::model::CustomerId::parse("c", "cust").unwrap(),
            device_id: crate::model::DeviceId::parse("d", "dev").unwrap(),
            not_before_s: 0,
            not_after_s: 10,
            public_key: [4; 65],
            revocation: None,
            attestation: crate::attestation::AttestationClass::NONE,
            key_algorithm: Default::default(),
        };
        let seen = |serial: &crate::model::Serial| {
            context_seen(&decisions, Some(serial.clone()), None).certificate
        };
        assert_eq!(seen(&serial), None, "no such certificate");
        summaries
            .insert(serial.as_bytes(), summary.encode())
            .unwrap();
        assert_eq!(seen(&serial), Some(None), "stored, unrevoked");
        let revocation = crate::store::Revocation {
            revoked_at_s: 5,
            reason: crate::model::RevocationReason::KeyCompromise,
        };
        summary.revocation = Some(revocation);
        summaries
            .insert(serial.as_bytes(), summary.encode())
            .unwrap();
        assert_eq!(seen(&serial), Some(Some(revocation)), "revoked since");
    }

    #[test]
    fn a_claim_past_its_expiry_is_too_late_and_a_refused_decision_gives_its_claim_back() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(crate::clock::ManualClock::new(1_800_000_000_000));
        let setup = DecisionSetup {
            clock: clock.clone(),
            min_day: "2027-01-01".into(),
            claim_horizon_ms: 660_000,
        };
        let decisions =
            LocalDecisions::open(dir.path(), &setup, LedgerCheckpoint::default(), &|_| {
                Ok(None)
            })
            .unwrap();
        let now_ms = clock.now_ms();
        assert_eq!(
            nonce_seen(&decisions, b"key-1", now_ms - 1_000),
            NonceCheck::TooLate { now_ms },
            "a claim that would have expired when made"
        );
        assert_eq!(
            nonce_seen(&decisions, b"key-2", now_ms + 60_000),
            NonceCheck::Claimed
        );
        assert_eq!(
            nonce_seen(&decisions, b"key-2", now_ms + 60_000),
            NonceCheck::Claimed,
            "the refused decision gave its claim back"
        );
        assert_eq!(
            decisions.gauges().unwrap().records,
            0,
            "nothing was appended"
        );
        decisions.close().unwrap();
    }
}
