//! The registration authority: the whole story of each operation, in one place per RPC.
//! Every method reads the same way: parse → ask policy → sign and store → answer. Methods
//! block on storage sync; the wire layer runs them off the async executor.

mod agreed_limits;
mod cache;
mod clients;
mod decision;
mod enrollment;
mod key_claims;
pub mod limits;
mod publication;
mod renewal;

mod retention;
mod revocation;
pub mod signature;
mod signing;
mod status;
mod throttle;
pub mod tiers;
mod upstream;
mod verification;

pub use clients::{ClientRegistry, ClientStanding, CLIENT_ROLES};
pub use enrollment::{EnrollRequest, EnrollmentToken, Issued};
pub use limits::LedgerPolicy;
pub use publication::{OcspAnswer, OcspFreshness, Publication, PublishedCrl};
pub use renewal::{renewal_proof_message, RenewRequest, RenewalProof};
pub use retention::RetentionProgress;
pub use revocation::{CertificatePage, CertificateQuery, RevokeOutcome, MAX_PAGE_SIZE};
pub use status::{CertificateStatus, StatusView};
pub use verification::{
    check_batch_size, Decision, LimitStatus, PaymentIntent, QualifyRequest, Transaction, Verdict,
    VerifyRequest, MAX_BATCH_PAYMENTS, MAX_INTENT_BYTES,
};

use crate::sync::Unpoisoned;
use cache::{CachedCertificate, CertificateCache};
use throttle::FailureThrottle;

use std::sync::Arc;

use crate::ca::{CaMaterial, DeviceProfile, OcspResponder};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::{KeyAlgorithm, Serial};
use crate::store::Actor;
use crate::store::{CertificateRecord, Decisions, Store};

/// Policy numbers the RA needs from configuration.
#[derive(Debug, Clone)]
pub struct RaPolicy {
    pub token_default_ttl_s: i64,
    pub token_max_ttl_s: i64,
    pub profile: DeviceProfile,
    pub crl_validity_s: i64,
    pub ocsp_validity_s: i64,
    pub ledger: LedgerPolicy,
    pub enroll_failures_per_minute: u32,
    /// Where temporary backup files are written (the data directory).
    pub scratch_dir: std::path::PathBuf,
    /// Expired certificate records older than this many seconds past notAfter are deleted;
    /// 0 keeps them.
    pub certificate_retention_s: i64,
    /// Most renewals of one lineage in any 24 hours.
    pub renewals_per_day: u32,
    /// Checks enrollments' attestations and says what a certificate counts for.
    pub attestation: std::sync::Arc<crate::attestation::Attestor>,
    /// The device key algorithms enrollment accepts (`None`: P-256, and SM2 when the CA
    /// material has an SM2 hierarchy; resolved by `Ra::new`).
    pub key_algorithms: Option<Vec<KeyAlgorithm>>,
    /// The SM2 device profile: the P-256 one with the SM2 CA's CRL and notAfter (set by
    /// `Ra::new` when the CA material has an SM2 hierarchy).
    pub sm2_profile: Option<DeviceProfile>,
    /// Where SM2 certificates point for their CRL.
    pub sm2_crl_url: String,
    /// RA mode: the external CA that signs and revokes device certificates (`None`: payra's
    /// own issuing CA signs them).
    pub upstream: Option<Arc<crate::ca::upstream::UpstreamIssuer>>,
    /// The certificate cache's size in bytes.
    pub cache_bytes: u64,
}

impl RaPolicy {
    /// Takes the RA's part of `config`.
    /// Fails when a file the attestation section names cannot be read.
    pub fn from_config(config: &Config) -> Result<RaPolicy> {
        Ok(RaPolicy {
            token_default_ttl_s: i64::from(config.tokens.default_ttl_s),
            token_max_ttl_s: i64::from(config.tokens.max_ttl_s),
            profile: DeviceProfile {
                validity_s: i64::from(config.issuance.validity_days) * 86_400,
                backdate_s: i64::from(config.issuance.backdate_s),
                crl_url: config.crl_url(),
                ocsp_url: config.ocsp_url(),
                // Set from the issuing certificate in `Ra::new`.
                issuer_not_after_s: i64::MAX,
            },
            crl_validity_s: i64::from(config.revocation.crl_validity_s),
            ocsp_validity_s: i64::from(config.revocation.ocsp_validity_s),
            ledger: LedgerPolicy {
                utc_offset_s: config.ledger.utc_offset_s,
                accumulation: config.ledger.accumulation,
                standard_agreed_limit_fen: config.ledger.default_agreed_limit_fen,
                max_agreed_limit_fen: config.ledger.max_agreed_limit_fen,
                limit_b_fen: config.ledger.limit_b_fen,
                limit_c_fen: config.ledger.limit_c_fen,
                limit_d_fen: config.ledger.limit_d_fen,
                skew_ms: i64::from(config.verification.skew_s) * 1000,
            },
            enroll_failures_per_minute: config.limits.enroll_failures_per_minute,
            scratch_dir: config.data_dir.clone(),
            certificate_retention_s: i64::from(config.retention.expired_certificate_days) * 86_400,
            renewals_per_day: config.issuance.renewals_per_day,
            attestation: std::sync::Arc::new(crate::attestation::Attestor::from_config(
                &config.attestation,
            )?),
            key_algorithms: config.issuance.key_algorithms.clone(),
            sm2_profile: None,
            sm2_crl_url: config.sm2_crl_url(),
            upstream: match config.ca.mode {
                crate::config::CaMode::Local => None,
                crate::config::CaMode::Upstream => Some(Arc::new(
                    crate::ca::upstream::UpstreamIssuer::from_config(&config.ca.upstream)?,
                )),
            },
            cache_bytes: config.verification.cache_bytes,
        })
    }
}

/// The registration authority and its collaborators.
pub struct Ra {
    store: Arc<dyn Store>,
    /// Where decisions, nonce claims and the ledger are recorded (opened from `store`).
    decisions: Arc<dyn Decisions>,
    ca: Arc<CaMaterial>,
    clock: Arc<dyn Clock>,
    policy: RaPolicy,
    publication: Publication,
    cache: CertificateCache,
    agreed_limits: agreed_limits::AgreedLimits,
    enroll_throttle: FailureThrottle,
    /// Device keys being certified right now (one key, one device).
    keys_in_flight: std::sync::Arc<key_claims::KeysInFlight>,
    clients: ClientRegistry,
    metrics: Arc<Metrics>,
    /// Certificates by status, as last counted ([`Ra::count_certificates`]).
    certificate_counts: std::sync::Mutex<Option<Vec<(&'static str, u64)>>>,
    /// The chain heads last signed ([`Ra::sign_audit_head`]); held while one is signed.
    last_signed_heads: std::sync::Mutex<Option<(crate::store::ChainHead, crate::store::ChainHead)>>,
    /// Woken when a revocation (or an orphaned upstream certificate) is stored, so the
    /// upstream hears of it at once rather than at the next retry (RA mode).
    upstream_wake: Arc<tokio::sync::Notify>,
    /// Held by a pass of [`Ra::sync_upstream`].
    upstream_pass: tokio::sync::Mutex<()>,
    /// Tokens and renewing certificates with a signing request upstream right now.
    upstream_claims: upstream::UpstreamClaims,
}

impl Ra {
    pub fn new(
        store: Arc<dyn Store>,
        ca: Arc<CaMaterial>,
        clock: Arc<dyn Clock>,
        mut policy: RaPolicy,
        metrics: Arc<Metrics>,
    ) -> Result<Ra> {
        policy.profile.issuer_not_after_s = ca.issuing_not_after_s;
        policy.sm2_profile = ca.sm2.as_ref().map(|sm2| DeviceProfile {
            crl_url: policy.sm2_crl_url.clone(),
            issuer_not_after_s: sm2.issuing_not_after_s,
            ..policy.profile.clone()
        });
        let accepted = match policy.key_algorithms.take() {
            Some(list) => list,
            // An upstream CA signs P-256 device keys only.
            None if ca.sm2.is_some() && policy.upstream.is_none() => {
                vec![KeyAlgorithm::P256, KeyAlgorithm::Sm2]
            }
            None => vec![KeyAlgorithm::P256],
        };
        if accepted.contains(&KeyAlgorithm::Sm2) && ca.sm2.is_none() {
            return Err(Error::FailedPrecondition(
                "issuance.key_algorithms lists \"sm2\" but the certs directory has no SM2 \
                 hierarchy (sm2-issuing.pem, sm2-issuing.key); create one with `payra ca \
                 init-sm2`"
                    .into(),
            ));
        }
        tracing::info!(
            key_algorithms = ?accepted.iter().map(|a| a.name()).collect::<Vec<_>>(),
            "device key algorithms accepted"
        );
        policy.key_algorithms = Some(accepted);
        let server_der = pem::parse(&ca.server_chain_pem).map(|p| p.into_contents());
        for (name, not_after) in [
            ("issuing", Some(ca.issuing_not_after_s)),
            ("root", crate::ca::pki::not_after_s(&ca.root_der)),
            (
                "sm2-issuing",
                ca.sm2.as_ref().map(|sm2| sm2.issuing_not_after_s),
            ),
            (
                "sm2-root",
                ca.sm2
                    .as_ref()
                    .and_then(|sm2| crate::ca::pki::not_after_s(&sm2.root_der)),
            ),
            (
                "server",
                server_der
                    .ok()
                    .and_then(|der| crate::ca::pki::not_after_s(&der)),
            ),
        ] {
            if let Some(not_after) = not_after {
                metrics
                    .certificate_not_after
                    .with_label_values(&[name])
                    .set(not_after);
            }
        }
        let now_s = clock.now_s();
        if now_s.saturating_add(policy.profile.validity_s) > ca.issuing_not_after_s {
            tracing::warn!(
                issuer_not_after_s = ca.issuing_not_after_s,
                validity_s = policy.profile.validity_s,
                "the issuing CA expires before a certificate issued now would: certificates \
                 end at the issuer's notAfter; plan a new issuing CA"
            );
        }
        if let Some(sm2) = &ca.sm2 {
            if now_s.saturating_add(policy.profile.validity_s) > sm2.issuing_not_after_s {
                tracing::warn!(
                    issuer_not_after_s = sm2.issuing_not_after_s,
                    validity_s = policy.profile.validity_s,
                    "the SM2 issuing CA expires before a certificate issued now would: SM2 \
                     certificates end at the issuer's notAfter; plan a new SM2 issuing CA"
                );
            }
        }
        let policy_failures = policy.enroll_failures_per_minute;
        let cache = CertificateCache::new(
            policy.cache_bytes,
            cache::CacheCounters {
                hits: metrics
                    .certificate_cache_lookups
                    .with_label_values(&["hit"]),
                misses: metrics
                    .certificate_cache_lookups
                    .with_label_values(&["miss"]),
                evictions: metrics.certificate_cache_evictions.clone(),
            },
        );
        let clients = ClientRegistry::load(store.as_ref())?;
        let agreed_limits =
            agreed_limits::AgreedLimits::load(store.as_ref(), policy.ledger.max_agreed_limit_fen)?;
        let now_ms = clock.now_ms();
        // The ledger keeps today's and yesterday's buckets in memory (the day of a request
        // near midnight may be either, by its clock).
        let min_day = policy.ledger.first_tracked_day(now_ms);
        let decisions = store.open_decisions(&crate::store::DecisionSetup {
            clock: clock.clone(),
            min_day,
            claim_horizon_ms: 2 * policy.ledger.skew_ms + 60_000,
        })?;
        tracing::info!(
            cache_bytes = policy.cache_bytes,
            agreed_limits = agreed_limits.len(),
            "agreed limits loaded; certificates are read from the store as they are verified"
        );
        let ledger = &policy.ledger;
        tracing::info!(
            accumulation = ledger.accumulation.name(),
            limit_b_fen = ledger.limit_b_fen,
            limit_c_fen = ledger.limit_c_fen,
            limit_d_fen = ledger.limit_d_fen,
            "daily ceilings"
        );
        let responder = OcspResponder::new(&ca.issuing_der, ca.signer.clone())?;
        let sm2_responder = match &ca.sm2 {
            Some(sm2) => Some(OcspResponder::new(
                &sm2.issuing_der,
                sm2.issuer.signer.clone(),
            )?),
            None => None,
        };
        let publication = Publication::new(
            responder,
            sm2_responder,
            policy.crl_validity_s,
            policy.ocsp_validity_s,
        );
        Ok(Ra {
            store,
            decisions,
            ca,
            clock,
            policy,
            publication,
            cache,
            agreed_limits,
            enroll_throttle: FailureThrottle::new(policy_failures, 60_000),
            keys_in_flight: Default::default(),
            clients,
            metrics,
            certificate_counts: std::sync::Mutex::new(None),
            last_signed_heads: std::sync::Mutex::new(None),
            upstream_wake: Arc::new(tokio::sync::Notify::new()),
            upstream_pass: tokio::sync::Mutex::new(()),
            upstream_claims: Default::default(),
        })
    }

    /// The metrics this RA updates.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What `/readyz` checks: the store takes a durable write and the CA key signs.
    pub fn readiness(&self) -> Result<()> {
        self.storage_writable()?;
        self.ca.signer.sign(b"payra readiness probe")?;
        if let Some(sm2) = &self.ca.sm2 {
            sm2.issuer.signer.sign(b"payra readiness probe")?;
        }
        Ok(())
    }

    /// Brings the state gauges (certificates by status as last counted, the cache's size, CRL
    /// age, syncs) up to date; called when `/metrics` is scraped.
    pub fn refresh_gauges(&self, storage_syncs: u64) {
        if let Ok(stat) = rustix::fs::statvfs(&self.policy.scratch_dir) {
            let free = stat.f_bavail.saturating_mul(stat.f_frsize);
            self.metrics
                .data_dir_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        let now_s = self.clock.now_s();
        if let Some(counts) = self.certificate_counts.lock().unpoisoned().as_ref() {
            for (status, count) in counts {
                self.metrics
                    .certificates
                    .with_label_values(&[status])
                    .set(i64::try_from(*count).unwrap_or(i64::MAX));
            }
        }
        let (entries, bytes) = self.cache.usage();
        self.metrics
            .certificate_cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.metrics
            .certificate_cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        // A scrape also looks for a new status file, so a list nobody enrolls against is
        // still read, and its age is there to alert on.
        if let Some(status) = &self.policy.attestation.status {
            let entries = status.current().len();
            self.metrics
                .attestation_status_entries
                .set(i64::try_from(entries).unwrap_or(i64::MAX));
            if let Some(age) = status.age_s() {
                self.metrics.attestation_status_age_seconds.set(age);
            }
        }
        if let Some(crl) = self.publication.last_crl() {
            // The age of the older CRL: a stale SM2 CRL alerts as a stale P-256 one does.
            let this_update_s = match self.publication.last_sm2_crl() {
                Some(sm2) => sm2.this_update_s.min(crl.this_update_s),
                None => crl.this_update_s,
            };
            self.metrics.crl_age_seconds.set(now_s - this_update_s);
            self.metrics
                .crl_number
                .set(i64::try_from(crl.number).unwrap_or(i64::MAX));
        }
        self.metrics
            .storage_syncs
            .set(i64::try_from(storage_syncs).unwrap_or(i64::MAX));
        if let Some(gauges) = self.decisions.gauges() {
            self.metrics
                .decision_log_records
                .set(i64::try_from(gauges.records).unwrap_or(i64::MAX));
            self.metrics
                .decision_log_bytes
                .set(i64::try_from(gauges.bytes).unwrap_or(i64::MAX));
            self.metrics
                .replay_nonces
                .set(i64::try_from(gauges.nonces).unwrap_or(i64::MAX));
        }
    }

    /// Writes a consistent backup to a temporary file in the data directory and returns its
    /// path; the caller streams and removes it.
    pub fn backup_to_file(&self, actor: &Actor) -> Result<std::path::PathBuf> {
        let now_ms = self.clock.now_ms();
        let path = self
            .policy
            .scratch_dir
            .join(format!("backup-{now_ms}-{}.tmp", Serial::random().to_hex()));
        let summary = {
            let file = std::fs::File::create(&path)?;
            let mut out = std::io::BufWriter::new(file);
            let summary = self.store.export(&mut out, now_ms, &mut |each| {
                self.decisions.for_each_frame(each)
            })?;
            std::io::Write::flush(&mut out)?;
            summary
        };
        tracing::info!(
            actor = %actor.role,
            entries = summary.entries,
            sha256 = %summary.sha256,
            "backup taken"
        );
        Ok(path)
    }

    /// Signs the heads of both audit chains with the issuing CA key and appends the signed
    /// head to the data directory's head file (synced), if either chain moved since the last
    /// signed head. Called every `audit.head_interval_s` and at shutdown (after the decision
    /// log is closed). Returns the head signed, if any.
    pub fn sign_audit_head(&self) -> Result<Option<crate::store::audit_heads::SignedHead>> {
        use crate::store::audit_heads::{self, HeadStatement, SignedHead};
        let mut last = self.last_signed_heads.lock().unpoisoned();
        let change = self.store.audit_head()?;
        // Where the decision chains live in a database, `payra audit verify` reads them there.
        let decision = self
            .decisions
            .durable_head()
            .unwrap_or(crate::store::ChainHead::GENESIS);
        if *last == Some((change, decision)) {
            return Ok(None);
        }
        // The recorded change head can name an entry whose group commit has not synced yet;
        // a sync now covers it, so a head is never signed over something a crash could lose.
        // (The decision head is the log's durable one already.)
        self.store.probe_write()?;
        let statement = HeadStatement::of(change, decision, self.clock.now_ms());
        let signed = SignedHead::sign(statement, |message| self.ca.signer.sign(message))?;
        audit_heads::append(&self.policy.scratch_dir, &signed)?;
        *last = Some((change, decision));
        tracing::debug!(
            change = change.seq,
            decision = decision.seq,
            "audit chain heads signed"
        );
        Ok(Some(signed))
    }

    /// Saves the ledger's changes since the last checkpoint, so a restart replays only the
    /// decisions after it. Called every few seconds and at shutdown.
    pub fn save_ledger_checkpoint(&self) -> Result<()> {
        // A running server keeps the days a start loads (see `Ra::new`), and the two newest
        // days that have buckets: the buckets of older days go.
        let min_day = self.policy.ledger.first_tracked_day(self.clock.now_ms());
        let forgotten = self.decisions.checkpoint(&min_day, &|checkpoint| {
            self.store.save_ledger_checkpoint(checkpoint)
        })?;
        if forgotten > 0 {
            tracing::info!(buckets = forgotten, before = %min_day, "forgot past days' ledger buckets");
        }
        Ok(())
    }

    /// Stops recording decisions: writes what is queued, saves the ledger, stops the writer.
    /// The log is closed even if the checkpoint cannot be saved (the next start replays from
    /// the previous checkpoint).
    pub fn close_decisions(&self) -> Result<()> {
        let saved = self.save_ledger_checkpoint();
        let closed = self.decisions.close();
        saved.and(closed)
    }

    /// How many syncs the decision log has made.
    pub fn decision_log_syncs(&self) -> u64 {
        self.decisions.syncs()
    }

    /// Whether storage accepts a durable write now (for `/readyz`).
    pub fn storage_writable(&self) -> Result<()> {
        self.decisions.healthy()?;
        self.store.probe_write()
    }

    /// CRL and OCSP state (for the background CRL task).
    pub fn publication(&self) -> &Publication {
        &self.publication
    }

    /// The CA material (for the chain in responses and the TLS setup).
    pub fn ca(&self) -> &CaMaterial {
        &self.ca
    }

    /// The full record of a certificate payra issued; `NotFound` otherwise.
    pub fn certificate(&self, serial: &Serial) -> Result<CertificateRecord> {
        self.store
            .certificate(serial)?
            .ok_or_else(|| Error::NotFound(format!("no certificate with serial {serial}")))
    }

    /// Brings this process's memory (certificate cache, client registry, OCSP and CRL) up to
    /// date with a change another payra process made in the shared store.
    pub fn apply_store_change(&self, change: crate::store::StoreChange) -> Result<()> {
        let applied = self.apply_change(change);
        // Whatever part was applied, published answers may have changed.
        self.publication.revocation_changed();
        applied
    }

    fn apply_change(&self, change: crate::store::StoreChange) -> Result<()> {
        use crate::store::StoreChange;
        match change {
            StoreChange::Certificates(serials) => self.cache.invalidate(&serials),
            StoreChange::ClientCertificates(serials) => {
                for serial in &serials {
                    if let Some(record) = self.store.client_certificate(serial)? {
                        self.clients.refresh(&record);
                    }
                }
            }
            StoreChange::AgreedLimits => {
                self.agreed_limits.reload(self.store.as_ref())?;
            }
            StoreChange::Everything => {
                // First, so that a failed reload below does not leave old states cached.
                self.cache.clear();
                self.agreed_limits.reload(self.store.as_ref())?;
                for record in self.store.client_certificates()? {
                    self.clients.refresh(&record);
                }
                tracing::info!("emptied the certificate cache after lost notifications");
            }
        }
        Ok(())
    }

    /// The attestation policy in force: what a certificate counts for in the tier engine.
    pub fn attestation_policy(&self) -> crate::attestation::AttestationPolicy {
        self.policy.attestation.policy
    }

    /// Where the certificate of `record` stands now.
    pub fn status_of(&self, record: &CertificateRecord) -> StatusView {
        StatusView::of(record, self.clock.now_s())
    }

    /// Where a certificate stands now: from the cache, or the store's summary.
    pub async fn certificate_status(&self, serial: &Serial) -> Result<StatusView> {
        let (not_before_s, not_after_s, revocation) = self
            .read_through(serial, CertificateCache::standing, |summary| {
                (
                    summary.not_before_s,
                    summary.not_after_s,
                    summary.revocation,
                )
            })
            .await?
            .ok_or_else(|| Error::NotFound(format!("no certificate with serial {serial}")))?;
        Ok(StatusView::at(
            not_before_s,
            not_after_s,
            revocation,
            self.clock.now_s(),
        ))
    }

    /// Whether no device key is claimed by a request in flight (tests).
    #[cfg(test)]
    pub(crate) fn keys_in_flight_is_empty(&self) -> bool {
        self.keys_in_flight.is_empty()
    }

    /// What the verifier needs of `serial`'s certificate: from the cache, or read from the
    /// store (and cached) on a miss. `None`: payra issued no certificate with this serial.
    pub async fn certificate_facts(&self, serial: &Serial) -> Result<Option<CachedCertificate>> {
        self.read_through(serial, CertificateCache::get, CachedCertificate::of)
            .await
    }

    /// `lookup` in the cache; on a miss, the store's summary (read by the store's async path
    /// where it has one, else in place if quick, else on a blocking thread), which fills the
    /// cache, taken apart by `from`.
    async fn read_through<T>(
        &self,
        serial: &Serial,
        lookup: impl Fn(&CertificateCache, &Serial) -> cache::Lookup<T>,
        from: impl Fn(&crate::store::CertificateSummary) -> T,
    ) -> Result<Option<T>> {
        let ticket = match lookup(&self.cache, serial) {
            cache::Lookup::Hit(found) => return Ok(Some(found)),
            cache::Lookup::Miss(ticket) => ticket,
        };
        let summary = if let Some(reading) = self.store.certificate_summary_async(serial) {
            reading.await.map_err(|_| {
                Error::Unavailable("the database's reader stopped (shutting down)".into())
            })??
        } else if self.store.summary_reads_are_quick() {
            self.store.certificate_summary(serial)?
        } else {
            let store = self.store.clone();
            let wanted = serial.clone();
            tokio::task::spawn_blocking(move || store.certificate_summary(&wanted))
                .await
                .map_err(|e| Error::internal(format!("reading a certificate: {e}")))??
        };
        Ok(summary.map(|summary| {
            self.cache.fill(ticket, &summary);
            from(&summary)
        }))
    }

    /// Counts the certificates by status (`Store::count_by_standing`: where the store can,
    /// in the store) for the `payra_certificates` gauge; run now and then by a background
    /// task, never by a scrape. A count that sees `stop` set ends early and leaves the gauge
    /// as it was.
    /// On a store shared by replicas, a count another one made less than `reuse_within_s`
    /// seconds ago is taken instead of counting again.
    pub fn count_certificates(
        &self,
        reuse_within_s: i64,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<()> {
        use status::CertificateStatus;
        let Some(standings) =
            self.store
                .count_by_standing(self.clock.now_s(), reuse_within_s, stop)?
        else {
            return Ok(());
        };
        let mut counts = [0u64; 6];
        for (standing, count) in standings {
            let index = match CertificateStatus::of(standing) {
                CertificateStatus::Valid => 0,
                CertificateStatus::Revoked => 1,
                CertificateStatus::Expired => 2,
                CertificateStatus::Superseded => 3,
                CertificateStatus::OnHold => 4,
                CertificateStatus::NotYetValid => 5,
            };
            counts[index] += count;
        }
        let names = [
            "valid",
            "revoked",
            "expired",
            "superseded",
            "on_hold",
            "not_yet_valid",
        ];
        *self.certificate_counts.lock().unpoisoned() =
            Some(names.into_iter().zip(counts).collect());
        Ok(())
    }
}

/// An `Ra` on a fresh development PKI and sled store in `dir`, with a clock the test moves.
#[cfg(test)]
pub(crate) fn test_ra(dir: &std::path::Path) -> (Ra, crate::clock::ManualClock) {
    let certs = dir.join("certs");
    crate::ca::pki::init_dev_pki(&certs, false).unwrap();
    let config = Config {
        data_dir: dir.join("data"),
        ..Config::default()
    };
    let clock = crate::clock::ManualClock::at_system_time();
    let ra = Ra::new(
        Arc::new(crate::store::SledStore::open(&config.data_dir).unwrap()),
        Arc::new(CaMaterial::load(&certs, None).unwrap()),
        Arc::new(clock.clone()),
        RaPolicy::from_config(&config).unwrap(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    (ra, clock)
}

#[cfg(test)]
mod tests {
    use crate::model::KeyAlgorithm;

    /// An RA over a development PKI with (`sm2`) or without an SM2 hierarchy, and
    /// `issuance.key_algorithms` set to `listed`.
    fn ra_with(dir: &std::path::Path, sm2: bool, listed: Option<Vec<KeyAlgorithm>>) -> Result<Ra> {
        let certs = dir.join("certs");
        crate::ca::pki::init_dev_pki(&certs, false).unwrap();
        if !sm2 {
            for file in [
                "sm2-root.pem",
                "sm2-root.key",
                "sm2-issuing.pem",
                "sm2-issuing.key",
            ] {
                std::fs::remove_file(certs.join(file)).unwrap();
            }
        }
        let mut config = Config {
            data_dir: dir.join("data"),
            ..Config::default()
        };
        config.issuance.key_algorithms = listed;
        Ra::new(
            Arc::new(crate::store::SledStore::open(&config.data_dir).unwrap()),
            Arc::new(CaMaterial::load(&certs, None).unwrap()),
            Arc::new(crate::clock::ManualClock::at_system_time()),
            RaPolicy::from_config(&config).unwrap(),
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn key_algorithms_follow_the_hierarchies_present_and_the_list() {
        use KeyAlgorithm::{Sm2, P256};
        let accepted = |ra: &Ra| ra.policy.key_algorithms.clone().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ra = ra_with(&dir.path().join("both"), true, None).unwrap();
        assert_eq!(accepted(&ra), vec![P256, Sm2]);
        assert!(ra.current_crl_of(Sm2).is_ok());
        let ra = ra_with(&dir.path().join("p256"), false, None).unwrap();
        assert_eq!(accepted(&ra), vec![P256]);
        // Without an SM2 CA there is no SM2 CRL: NotFound, which /crl/sm2 answers with 404.
        let err = ra.current_crl_of(Sm2).err().unwrap();
        assert_eq!(err.kind(), crate::error::ErrorKind::NotFound, "{err}");
        assert!(ra.readiness().is_ok());
        let err = ra_with(&dir.path().join("missing"), false, Some(vec![Sm2]))
            .err()
            .unwrap();
        assert!(err.to_string().contains("no SM2 hierarchy"), "{err}");
        assert!(err.to_string().contains("payra ca init-sm2"), "{err}");
        let ra = ra_with(&dir.path().join("sm2-only"), true, Some(vec![Sm2])).unwrap();
        assert_eq!(accepted(&ra), vec![Sm2]);
        let p256_csr = crate::client::DeviceKey::generate().csr_der("d").unwrap();
        let err = ra.accepted_device_key(&p256_csr).unwrap_err();
        assert!(
            err.to_string()
                .contains("key type EC P-256 is not accepted here"),
            "{err}"
        );
        // The SM2 key signs readiness probes too.
        assert!(ra.readiness().is_ok());
    }

    use super::*;
    use crate::model::{CustomerId, Factor, FactorCategory, Scene};
    use verification::{QualifyRequest, Transaction};

    #[tokio::test]
    async fn a_checkpoint_forgets_the_ledger_buckets_of_past_days() {
        let dir = tempfile::tempdir().unwrap();
        let (ra, clock) = test_ra(dir.path());
        let reserve = |customer: &str, order: &str| QualifyRequest {
            customer: CustomerId::parse("customer_id", customer).unwrap(),
            transaction: Transaction {
                merchant_id: "m-1".into(),
                order_id: order.into(),
                amount_fen: 100,
                currency: "CNY".into(),
            },
            factors: vec![Factor {
                category: FactorCategory::Knowledge,
                method: "payment_pin".into(),
            }],
            scene: Scene::InApp,
            reserve: true,
        };
        let buckets = || ra.decisions.gauges().unwrap().buckets;
        for customer in ["alice", "bob"] {
            let decision = ra
                .qualify_transaction(&Actor::system(), reserve(customer, "o-1"))
                .await
                .unwrap();
            assert!(decision.limit.unwrap().reserved);
        }
        ra.save_ledger_checkpoint().unwrap();
        assert_eq!(buckets(), 2, "today's buckets stay");

        // A day later the buckets are yesterday's, which a start would still load.
        clock.advance_ms(86_400_000);
        ra.qualify_transaction(&Actor::system(), reserve("alice", "o-2"))
            .await
            .unwrap();
        ra.save_ledger_checkpoint().unwrap();
        assert_eq!(buckets(), 3);

        // A day's reservation can be given back the next day, not later: by then it counts
        // for no limit, and its bucket is about to go.
        let first = ra
            .qualify_transaction(&Actor::system(), reserve("carol", "o-1"))
            .await
            .unwrap();
        clock.advance_ms(-86_400_000);
        let old = ra
            .qualify_transaction(&Actor::system(), reserve("carol", "o-0"))
            .await
            .unwrap();
        clock.advance_ms(86_400_000);
        // (carol's two reservations: a bucket today and one yesterday.)
        assert_eq!(buckets(), 5);

        // Two days on, the first day's buckets go once the new day has one of its own (the
        // two newest days with buckets always stay).
        clock.advance_ms(86_400_000);
        let released = ra
            .release_reservation(&Actor::system(), &first.evidence_id)
            .unwrap();
        assert_eq!((released.used_fen, released.reserved), (0, false));
        let refused = ra
            .release_reservation(&Actor::system(), &old.evidence_id)
            .unwrap_err();
        assert!(
            matches!(
                &refused,
                Error::Release {
                    refusal: crate::model::ReleaseRefusal::DayNotKept { .. },
                    ..
                }
            ),
            "{refused:?}"
        );
        ra.save_ledger_checkpoint().unwrap();
        assert_eq!(buckets(), 5);
        ra.qualify_transaction(&Actor::system(), reserve("bob", "o-3"))
            .await
            .unwrap();
        ra.save_ledger_checkpoint().unwrap();
        // alice's and carol's of yesterday, bob's of today.
        assert_eq!(buckets(), 3);

        // Retention deletes the stored buckets of the first day (all three were saved).
        let purged = ra.run_retention(&Actor::system(), &mut |_| {}).unwrap();
        assert_eq!(purged.ledger_buckets, 3);
        let again = ra.run_retention(&Actor::system(), &mut |_| {}).unwrap();
        assert_eq!(again.ledger_buckets, 0);

        // A clock five days ahead: the days still held in memory keep their stored buckets,
        // which are what a restart would load once the clock is back.
        clock.advance_ms(5 * 86_400_000);
        let jumped = ra.run_retention(&Actor::system(), &mut |_| {}).unwrap();
        assert_eq!(jumped.ledger_buckets, 0);
        clock.advance_ms(-5 * 86_400_000);
        let stored = ra
            .store
            .ledger_checkpoint(&ra.policy.ledger.first_tracked_day(clock.now_ms()))
            .unwrap();
        assert_eq!(
            stored.buckets.len(),
            3,
            "alice's and carol's of yesterday, bob's"
        );
        assert_eq!(stored.released.len(), 1, "carol's release is kept");

        // Days later carol's release is more than two days old. While the books still hold
        // the day it was made (the two newest days with buckets stay), it is kept; once two
        // newer days have buckets, retention deletes it, and a repeat is still refused, by
        // the decision's day.
        clock.advance_ms(3 * 86_400_000);
        ra.qualify_transaction(&Actor::system(), reserve("dave", "o-5"))
            .await
            .unwrap();
        ra.save_ledger_checkpoint().unwrap();
        let held = ra.run_retention(&Actor::system(), &mut |_| {}).unwrap();
        assert_eq!(held.releases, 0, "the books still hold the day it was made");
        clock.advance_ms(86_400_000);
        ra.qualify_transaction(&Actor::system(), reserve("dave", "o-6"))
            .await
            .unwrap();
        ra.save_ledger_checkpoint().unwrap();
        let later = ra.run_retention(&Actor::system(), &mut |_| {}).unwrap();
        assert_eq!(later.releases, 1);
        let day = ra.policy.ledger.first_tracked_day(clock.now_ms());
        assert!(ra
            .store
            .ledger_checkpoint(&day)
            .unwrap()
            .released
            .is_empty());
        let repeat = ra
            .release_reservation(&Actor::system(), &first.evidence_id)
            .unwrap_err();
        // Its day is no longer counted: a repeat is refused by that rule, not given back.
        assert!(
            matches!(
                repeat,
                Error::Release {
                    refusal: crate::model::ReleaseRefusal::DayNotKept { .. },
                    ..
                }
            ),
            "{repeat:?}"
        );
        assert_eq!(repeat.kind(), crate::error::ErrorKind::FailedPrecondition);
        ra.close_decisions().unwrap();
    }
}
