//! Enrollment tokens and device enrollment (BRIEF flow 1).

use rand::RngCore;

use super::signing::Holder;
use super::Ra;
use crate::ca::SubscriberRef;
use crate::error::{Error, Result};
use crate::model::{CustomerId, DeviceId, DeviceInfo, KeyAlgorithm};
use crate::store::{Actor, AuditEvent, KeyRefusal};
use crate::store::{
    CertificateRecord, IssueOutcome, TokenHash, TokenRecord, TokenRejection, RECORD_VERSION,
};

/// Prefix of every enrollment token, so secret scanners and people can recognise one.
pub const TOKEN_PREFIX: &str = "payra_et_";
/// Longest token string accepted from a caller (a real one is 73 characters).
pub const MAX_TOKEN_LEN: usize = 128;

/// A freshly created token: shown to the caller once, stored only as a hash.
#[derive(Debug, Clone)]
pub struct EnrollmentToken {
    pub token: String,
    pub expires_at_s: i64,
}

/// A parsed `Enroll` request.
#[derive(Debug, Clone)]
pub struct EnrollRequest {
    /// The caller's address, for attempt accounting; `None` when unknown.
    pub peer: Option<std::net::IpAddr>,
    pub token: String,
    pub csr_der: Vec<u8>,
    pub device_id: DeviceId,
    pub device_info: DeviceInfo,
    /// The key's attestation, when the app sent one.
    pub attestation: Option<crate::attestation::Evidence>,
}

/// An issued certificate as returned to the phone.
#[derive(Debug, Clone)]
pub struct Issued {
    pub record: CertificateRecord,
    pub certificate_der: Vec<u8>,
    /// Issuing CA first, root excluded.
    pub chain_der: Vec<Vec<u8>>,
}

/// The platform label of an enrollment's evidence, for the metrics.
fn evidence_platform(evidence: Option<&crate::attestation::Evidence>) -> &'static str {
    match evidence {
        None => "none",
        Some(crate::attestation::Evidence::Android { .. }) => "android",
        Some(crate::attestation::Evidence::Apple { .. }) => "apple",
    }
}

/// Checks the shape of a token string before it is hashed and looked up.
pub fn check_token_shape(token: &str) -> Result<()> {
    if token.is_empty() {
        return Err(Error::invalid("token", "is required"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(Error::invalid(
            "token",
            format!("at most {MAX_TOKEN_LEN} characters allowed"),
        ));
    }
    Ok(())
}

impl Ra {
    /// Creates a single-use enrollment token for `customer`, valid for `ttl_s` seconds
    /// (0: the configured default). The token carries 256 random bits. Durable on return.
    pub fn create_enrollment_token(
        &self,
        actor: &Actor,
        customer: CustomerId,
        ttl_s: i64,
    ) -> Result<EnrollmentToken> {
        let (token, hash, record, audit) = self.new_enrollment_token(actor, customer, ttl_s)?;
        self.store.put_token(&hash, &record, &audit)?;
        Ok(token)
    }

    /// [`Ra::create_enrollment_token`] without holding a thread while the token is made
    /// durable: it joins the store's next journaled batch, with concurrent tokens and
    /// enrollments.
    pub async fn create_enrollment_token_async(
        &self,
        actor: &Actor,
        customer: CustomerId,
        ttl_s: i64,
    ) -> Result<EnrollmentToken> {
        let (token, hash, record, audit) = self.new_enrollment_token(actor, customer, ttl_s)?;
        match self
            .store
            .clone()
            .put_token_async(&hash, &record, &audit)?
            .await
            .map_err(|_| Error::internal("the token's batch ended without an answer"))??
        {
            IssueOutcome::Issued => Ok(token),
            other => Err(Error::internal(format!("storing a token: {other:?}"))),
        }
    }

    /// A new token and what the store keeps of it (its hash, record and audit entry).
    fn new_enrollment_token(
        &self,
        actor: &Actor,
        customer: CustomerId,
        ttl_s: i64,
    ) -> Result<(EnrollmentToken, TokenHash, TokenRecord, AuditEvent)> {
        let ttl_s = match ttl_s {
            0 => self.policy.token_default_ttl_s,
            t if t < 0 => return Err(Error::invalid("ttl_s", "must not be negative")),
            t if t > self.policy.token_max_ttl_s => {
                return Err(Error::invalid(
                    "ttl_s",
                    format!("at most {} seconds allowed", self.policy.token_max_ttl_s),
                ))
            }
            t => t,
        };
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
        let now_s = self.clock.now_s();
        let record = TokenRecord {
            version: RECORD_VERSION,
            customer_id: customer,
            created_at_s: now_s,
            expires_at_s: now_s + ttl_s,
            used_at_s: None,
            used_for_serial: None,
        };
        let audit = AuditEvent::new(
            self.clock.now_ms(),
            actor,
            "token.created",
            record.customer_id.as_str(),
            "ok",
        );
        let hash = TokenHash::of(&token);
        let expires_at_s = record.expires_at_s;
        Ok((
            EnrollmentToken {
                token,
                expires_at_s,
            },
            hash,
            record,
            audit,
        ))
    }

    /// Enrolls a device key: checks the CSR (proof of possession, P-256), consumes the token
    /// and issues a certificate for the token's customer and the given device.
    ///
    /// The certificate is signed before the token is consumed, and the consumption and the
    /// certificate record commit together (one journaled batch): a request that fails at any
    /// step changes nothing, and of concurrent uses of one token exactly one gets a
    /// certificate. A losing request's signed certificate is dropped unseen; it never leaves
    /// the process. (In RA mode the upstream holds it: it is revoked there as an orphan.)
    ///
    /// Two halves: [`Ra::prepare_enrollment`] checks and signs, on the calling task's thread
    /// (about 80 µs of CPU with the key-file signer, much as a payment verification);
    /// [`Ra::commit_enrollment`] hands the batch to the store's committer and waits for the
    /// durable write without holding a thread.
    pub async fn enroll(
        self: &std::sync::Arc<Self>,
        actor: &Actor,
        request: EnrollRequest,
    ) -> Result<Issued> {
        let Some(upstream) = self.policy.upstream.clone() else {
            let prepared = if self.store.summary_reads_are_quick() {
                self.prepare_enrollment(actor, request)?
            } else {
                // The token and the key's certificates are read over the network
                // (PostgreSQL): on a blocking thread, not an executor's.
                let (ra, actor, span) = (self.clone(), actor.clone(), tracing::Span::current());
                tokio::task::spawn_blocking(move || {
                    span.in_scope(|| ra.prepare_enrollment(&actor, request))
                })
                .await
                .map_err(|e| Error::internal(format!("preparing an enrollment: {e}")))??
            };
            return self.commit_enrollment(prepared).await;
        };
        // RA mode: the wait for the upstream's answer holds no thread, and runs as a task of
        // its own, so a caller that goes away (a cancelled RPC, a deadline) does not drop a
        // certificate the upstream issued: the enrollment still commits, or leaves an orphan
        // to be revoked upstream.
        let checked = self.check_enrollment(request)?;
        let claim = self
            .upstream_claims
            .claim(checked.hash.0.to_vec(), "this enrollment token")?;
        let (ra, actor) = (self.clone(), actor.clone());
        let enrollment = async move {
            let _claim = claim;
            let (record, certificate_der) = ra
                .sign_upstream(
                    &upstream,
                    &checked.public_key,
                    &checked.csr_der,
                    checked.holder(),
                    None,
                    checked.now_s,
                )
                .await?;
            let prepared = ra.prepared(&actor, checked, record, certificate_der);
            ra.commit_enrollment(prepared).await
        };
        tokio::spawn(tracing::Instrument::in_current_span(enrollment))
            .await
            .map_err(|e| Error::internal(format!("the enrollment task failed: {e}")))?
    }

    /// The first half of [`Ra::enroll`]: every check, then the signature. In RA mode it
    /// blocks its thread for the upstream's answer (see [`Ra::sign_device_certificate`]).
    pub fn prepare_enrollment(
        &self,
        actor: &Actor,
        request: EnrollRequest,
    ) -> Result<PreparedEnrollment> {
        let checked = self.check_enrollment(request)?;
        let (record, certificate_der) = self.sign_device_certificate(
            &checked.public_key,
            &checked.csr_der,
            checked.holder(),
            None,
            checked.now_s,
        )?;
        Ok(self.prepared(actor, checked, record, certificate_der))
    }

    /// Every check of an enrollment, in order, up to the claim of its key.
    fn check_enrollment(&self, request: EnrollRequest) -> Result<CheckedEnrollment> {
        check_token_shape(&request.token)?;
        request.device_info.validate()?;
        let hash = TokenHash::of(&request.token);
        let now_ms = self.clock.now_ms();
        let now_s = now_ms.div_euclid(1000);
        // The throttle refuses only unknown tokens: a phone with a real token behind a
        // carrier NAT is never locked out by another phone guessing from the same address.
        let Some(token) = self.store.token(&hash)? else {
            if let Some(peer) = request.peer {
                if let Some(until_ms) = self.enroll_throttle.blocked_until(peer, now_ms) {
                    self.metrics.enroll_throttled.inc();
                    return Err(Error::ResourceExhausted(format!(
                        "too many failed enrollment attempts from {peer}; retry after {}",
                        crate::model::moment_ms(until_ms)
                    )));
                }
                self.enroll_throttle.record_failure(peer, now_ms);
            }
            tracing::warn!(peer = ?request.peer, "enrollment with an unknown token");
            return Err(Error::Token(TokenRejection::Unknown));
        };
        if let Some(used_at_s) = token.used_at_s {
            return Err(Error::Token(TokenRejection::AlreadyUsed { used_at_s }));
        }
        if now_s >= token.expires_at_s {
            return Err(Error::Token(TokenRejection::Expired {
                expired_at_s: token.expires_at_s,
            }));
        }
        // The CSR's signature is checked with a token in hand: an SM2 check costs about
        // 0.4 ms, and a caller without a token is turned away (and throttled) before it.
        let public_key = self.accepted_device_key(&request.csr_der)?;
        if public_key.algorithm() != KeyAlgorithm::P256 && request.attestation.is_some() {
            return Err(Error::invalid(
                "attestation",
                "Android Key Attestation and App Attest certify P-256 keys; an SM2 key cannot \
                 carry one (enroll it without an attestation)",
            ));
        }

        // Checked with a usable token in hand and before anything is claimed: a refused
        // attestation leaves the token usable for a corrected attempt. A chain costs 1-2 ms
        // of signature checks, so refusals count toward the address's failure limit (the
        // same one unknown tokens count toward): one token cannot buy unlimited checks.
        if let (Some(peer), Some(_)) = (request.peer, &request.attestation) {
            if let Some(until_ms) = self.enroll_throttle.blocked_until(peer, now_ms) {
                self.metrics.enroll_throttled.inc();
                return Err(Error::ResourceExhausted(format!(
                    "too many failed enrollment attempts from {peer}; retry after {}",
                    crate::model::moment_ms(until_ms)
                )));
            }
        }
        let attestation = self
            .policy
            .attestation
            .enrollment(
                request.attestation.as_ref(),
                &request.token,
                public_key.point(),
                now_s,
            )
            .map_err(|refusal| {
                self.metrics
                    .attestations
                    .with_label_values(&[
                        evidence_platform(request.attestation.as_ref()),
                        "refused",
                    ])
                    .inc();
                tracing::warn!(%refusal, "enrollment attestation refused");
                if let Some(peer) = request.peer {
                    self.enroll_throttle.record_failure(peer, now_ms);
                }
                Error::Attestation(refusal)
            })?;
        if let Some(attestation) = &attestation {
            self.metrics
                .attestations
                .with_label_values(&[
                    evidence_platform(request.attestation.as_ref()),
                    attestation.security_level.name(),
                ])
                .inc();
        }
        let key_claim = self.keys_in_flight.claim(
            self.store.as_ref(),
            public_key.point(),
            &token.customer_id,
            &request.device_id,
            now_s,
        )?;
        Ok(CheckedEnrollment {
            hash,
            now_s,
            public_key,
            csr_der: request.csr_der,
            customer: token.customer_id,
            device: request.device_id,
            device_info: request.device_info,
            attestation,
            key_claim,
        })
    }

    /// An enrollment checked and signed, with its audit entry, ready to commit.
    fn prepared(
        &self,
        actor: &Actor,
        checked: CheckedEnrollment,
        mut record: CertificateRecord,
        certificate_der: Vec<u8>,
    ) -> PreparedEnrollment {
        let CheckedEnrollment {
            hash,
            now_s,
            attestation,
            key_claim,
            ..
        } = checked;
        let attested = match &attestation {
            Some(a) => format!("; key attested {} by {}", a.security_level.name(), a.root),
            None => String::new(),
        };
        record.attestation = attestation;
        let audit = AuditEvent::new(
            self.clock.now_ms(),
            actor,
            "certificate.issued",
            record.serial.to_hex(),
            format!(
                "token used; customer {} device {}{attested}",
                record.customer_id, record.device_id
            ),
        );
        PreparedEnrollment {
            hash,
            now_s,
            record,
            certificate_der,
            audit,
            key_claim,
        }
    }

    /// The second half of [`Ra::enroll`]: consumes the token and stores the certificate,
    /// answering once both are durable.
    ///
    /// The store runs [`Ra::on_enrollment_committed`] as soon as the certificate is stored,
    /// even if this future is dropped (a cancelled RPC, a deadline) once the batch is
    /// queued; the device key stays claimed until then.
    pub async fn commit_enrollment(
        self: &std::sync::Arc<Self>,
        prepared: PreparedEnrollment,
    ) -> Result<Issued> {
        let PreparedEnrollment {
            hash,
            now_s,
            record,
            certificate_der,
            audit,
            key_claim,
        } = prepared;
        let ra = self.clone();
        let committed = record.clone();
        let span = tracing::Span::current();
        let orphan = record.clone();
        let queued = self.store.clone().issue_with_token_async(
            &hash,
            now_s,
            &record,
            &audit,
            // The key stays claimed until the certificate is in the store (or the batch is
            // dropped).
            Box::new(move || {
                span.in_scope(|| ra.on_enrollment_committed(&committed));
                drop(key_claim);
            }),
        );
        let outcome = match queued {
            Ok(receiver) => receiver
                .await
                .map_err(|_| Error::internal("the enrollment batch ended without an answer"))
                .and_then(|outcome| outcome),
            Err(e) => Err(e),
        };
        if !matches!(outcome, Ok(IssueOutcome::Issued)) {
            // An upstream certificate no record holds is revoked upstream.
            self.uncommitted_upstream(&orphan).await;
        }
        match outcome? {
            IssueOutcome::Issued => Ok(self.issued(record, certificate_der)),
            IssueOutcome::TokenRejected(rejection) => Err(Error::Token(rejection)),
            IssueOutcome::KeyHeldElsewhere => Err(KeyRefusal::held_elsewhere_error()),
            IssueOutcome::KeyCompromised => Err(KeyRefusal::compromised_error()),
            IssueOutcome::SerialTaken => Err(Error::internal(
                "random serial collided with an existing one",
            )),
        }
    }

    /// Run by the store once an enrollment's certificate is stored: the metric and the log
    /// line. (The verification cache reads the certificate from the store when it is first
    /// verified.)
    fn on_enrollment_committed(&self, record: &CertificateRecord) {
        self.metrics
            .certificates_issued
            .with_label_values(&["enroll"])
            .inc();
        tracing::info!(
            serial = %record.serial,
            customer = %record.customer_id,
            device = %record.device_id,
            "certificate issued"
        );
    }
}

/// An enrollment checked, not yet signed: what signing and storing it need.
struct CheckedEnrollment {
    hash: TokenHash,
    now_s: i64,
    public_key: crate::ca::DevicePublicKey,
    csr_der: Vec<u8>,
    customer: CustomerId,
    device: DeviceId,
    device_info: DeviceInfo,
    attestation: Option<crate::attestation::Attestation>,
    key_claim: super::key_claims::KeyClaim,
}

impl CheckedEnrollment {
    /// Whom the certificate is for, under a fresh subscriber reference.
    fn holder(&self) -> Holder {
        Holder {
            customer: self.customer.clone(),
            device: self.device.clone(),
            device_info: self.device_info.clone(),
            subscriber: SubscriberRef::random(),
        }
    }
}

/// An enrollment checked and signed, not yet stored.
pub struct PreparedEnrollment {
    hash: TokenHash,
    now_s: i64,
    pub(super) record: CertificateRecord,
    certificate_der: Vec<u8>,
    audit: AuditEvent,
    key_claim: super::key_claims::KeyClaim,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RevocationReason, Serial};
    use crate::store::RevokeRejection;

    fn test_ra(dir: &tempfile::TempDir) -> std::sync::Arc<Ra> {
        std::sync::Arc::new(super::super::test_ra(dir.path()).0)
    }

    fn prepare(ra: &Ra, customer: &CustomerId, device: &str) -> PreparedEnrollment {
        prepare_with_key(ra, customer, device, &crate::client::DeviceKey::generate())
    }

    fn prepare_with_key(
        ra: &Ra,
        customer: &CustomerId,
        device: &str,
        key: &crate::client::DeviceKey,
    ) -> PreparedEnrollment {
        let actor = Actor::system();
        let token = ra
            .create_enrollment_token(&actor, customer.clone(), 0)
            .unwrap();
        let device = DeviceId::parse("device_id", device).unwrap();
        ra.prepare_enrollment(
            &actor,
            EnrollRequest {
                peer: None,
                token: token.token,
                csr_der: key.csr_der(device.as_str()).unwrap(),
                device_id: device,
                device_info: DeviceInfo::default(),
                attestation: None,
            },
        )
        .unwrap()
    }

    /// What the verifier finds for `serial` now.
    async fn facts(
        ra: &Ra,
        serial: &crate::model::Serial,
    ) -> super::super::cache::CachedCertificate {
        ra.certificate_facts(serial).await.unwrap().expect("issued")
    }

    /// The caller goes away right after queuing its enrollment's batch (a cancelled RPC):
    /// the certificate is still stored, the key claim given back, and a revocation after it
    /// refuses it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_enrollment_still_commits_and_a_later_revocation_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let ra = test_ra(&dir);
        let actor = Actor::system();
        let customer = CustomerId::parse("customer_id", "racer").unwrap();
        let prepared = prepare(&ra, &customer, "racer-phone");
        let serial = prepared.record.serial.clone();
        let mut commit = Box::pin(ra.commit_enrollment(prepared));
        // One poll queues the batch; then the caller is gone (a cancelled RPC).
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = std::future::Future::poll(commit.as_mut(), &mut cx);
        drop(commit);

        // A blocking enrollment commits whatever is still queued before its own returns.
        let second = prepare(&ra, &customer, "second-phone");
        let store = ra.store.clone();
        let (hash, now_s, record, audit) = (second.hash, second.now_s, second.record, second.audit);
        let outcome = tokio::task::spawn_blocking(move || {
            store.issue_with_token(&hash, now_s, &record, &audit)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(outcome, IssueOutcome::Issued);
        drop(second.key_claim);
        assert_eq!(facts(&ra, &serial).await.revocation, None);
        assert_eq!(
            ra.metrics
                .certificates_issued
                .with_label_values(&["enroll"])
                .get(),
            1
        );
        assert!(ra.keys_in_flight_is_empty(), "a key claim was kept");

        let revoked = ra
            .revoke_customer(&actor, &customer, RevocationReason::KeyCompromise, false)
            .unwrap();
        assert!(revoked.serials.contains(&serial));
        let cached = facts(&ra, &serial).await.revocation.expect("revoked");
        assert_eq!(cached.reason, RevocationReason::KeyCompromise);
        ra.close_decisions().unwrap();
    }

    /// Every change to a certificate's revocation is what the next lookup finds, whether
    /// the certificate was cached before the change or not.
    #[tokio::test]
    async fn each_revocation_change_is_what_the_next_lookup_finds_cached_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let ra = test_ra(&dir);
        let actor = Actor::system();
        let customer = CustomerId::parse("customer_id", "held").unwrap();
        let mut serials = Vec::new();
        for device in ["held-phone", "cold-phone"] {
            let issued = ra
                .commit_enrollment(prepare(&ra, &customer, device))
                .await
                .unwrap();
            assert_eq!(issued.chain_der, vec![ra.ca.issuing_der.clone()]);
            serials.push(issued.record.serial);
        }
        let (warm, cold) = (&serials[0], &serials[1]);
        assert_eq!(facts(&ra, warm).await.revocation, None);
        let reason_of =
            |facts: super::super::cache::CachedCertificate| facts.revocation.map(|r| r.reason);
        for serial in [warm, cold] {
            ra.revoke_certificate(&actor, serial, RevocationReason::CertificateHold)
                .unwrap();
        }
        assert_eq!(
            reason_of(facts(&ra, warm).await),
            Some(RevocationReason::CertificateHold)
        );
        ra.unhold_certificate(&actor, warm).unwrap();
        assert_eq!(reason_of(facts(&ra, warm).await), None);
        for serial in [warm, cold] {
            ra.revoke_certificate(&actor, serial, RevocationReason::KeyCompromise)
                .unwrap();
            assert_eq!(
                reason_of(facts(&ra, serial).await),
                Some(RevocationReason::KeyCompromise)
            );
        }
        ra.close_decisions().unwrap();
    }

    /// An RA in `dir` where customer "raced" has enrolled its "phone" with a fresh key once:
    /// the RA, the customer, the key and the certificate.
    async fn enrolled_once(
        dir: &tempfile::TempDir,
    ) -> (
        std::sync::Arc<Ra>,
        CustomerId,
        crate::client::DeviceKey,
        CertificateRecord,
    ) {
        let ra = test_ra(dir);
        let customer = CustomerId::parse("customer_id", "raced").unwrap();
        let key = crate::client::DeviceKey::generate();
        let first = ra
            .commit_enrollment(prepare_with_key(&ra, &customer, "phone", &key))
            .await
            .unwrap()
            .record;
        (ra, customer, key, first)
    }

    /// An enrollment whose key check ran before a keyCompromise revocation of the same key
    /// commits after it: the store refuses it as it commits.
    #[tokio::test]
    async fn an_enrollment_checked_before_its_key_was_reported_compromised_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ra, customer, key, first) = enrolled_once(&dir).await;
        // The same phone enrolls again with its key: checked, signed, not yet committed.
        let again = prepare_with_key(&ra, &customer, "phone", &key);
        let outcome = ra
            .revoke_certificate(
                &Actor::system(),
                &first.serial,
                RevocationReason::KeyCompromise,
            )
            .unwrap();
        assert_eq!(outcome.serials, vec![first.serial.clone()]);
        let refused = ra.commit_enrollment(again).await.unwrap_err();
        assert_eq!(
            refused.to_string(),
            crate::store::KeyRefusal::compromised_error().to_string()
        );
        let holders = ra
            .store
            .certificates_with_key(
                &crate::store::CertificateSummary::of(&first)
                    .unwrap()
                    .public_key,
            )
            .unwrap();
        assert_eq!(holders.len(), 1, "only the revoked certificate is stored");
        ra.close_decisions().unwrap();
    }

    /// An enrollment of a key commits after a keyCompromise revocation listed the key's
    /// certificates and before it committed: the revocation's second look revokes it.
    #[tokio::test]
    async fn a_certificate_stored_while_its_key_is_revoked_is_revoked_too() {
        let dir = tempfile::tempdir().unwrap();
        let (ra, customer, key, first) = enrolled_once(&dir).await;
        // The revocation has listed its targets (the first certificate only) when the
        // second enrollment commits.
        let targets = vec![first.serial.clone()];
        let second = ra
            .commit_enrollment(prepare_with_key(&ra, &customer, "phone", &key))
            .await
            .unwrap()
            .record;
        assert_eq!(facts(&ra, &second.serial).await.revocation, None);
        let outcome = ra
            .revoke_batch(
                &Actor::system(),
                targets,
                RevocationReason::KeyCompromise,
                false,
            )
            .unwrap();
        assert_eq!(
            outcome.serials,
            vec![first.serial.clone(), second.serial.clone()]
        );
        let note = outcome.note.unwrap_or_default();
        assert!(note.contains(&second.serial.to_hex()), "{note}");
        for serial in [&first.serial, &second.serial] {
            assert_eq!(
                facts(&ra, serial).await.revocation.map(|r| r.reason),
                Some(RevocationReason::KeyCompromise)
            );
        }
        // Another key's revocation reaches no further than its own certificates.
        let other = ra
            .commit_enrollment(prepare(&ra, &customer, "tablet"))
            .await
            .unwrap()
            .record;
        let outcome = ra
            .revoke_batch(
                &Actor::system(),
                vec![other.serial.clone()],
                RevocationReason::KeyCompromise,
                false,
            )
            .unwrap();
        assert_eq!(outcome.serials, vec![other.serial]);
        ra.close_decisions().unwrap();
    }

    #[tokio::test]
    async fn certificates_are_counted_by_status_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let ra = test_ra(&dir);
        let customer = CustomerId::parse("customer_id", "counted").unwrap();
        let mut serials = Vec::new();
        for device in ["one", "two", "three"] {
            let prepared = prepare(&ra, &customer, device);
            serials.push(ra.commit_enrollment(prepared).await.unwrap().record.serial);
        }
        let actor = Actor::system();
        ra.revoke_certificate(&actor, &serials[0], RevocationReason::KeyCompromise)
            .unwrap();
        ra.revoke_certificate(&actor, &serials[1], RevocationReason::CertificateHold)
            .unwrap();
        let gauge = |status: &str| ra.metrics.certificates.with_label_values(&[status]).get();
        ra.refresh_gauges(0);
        assert_eq!(
            gauge("valid"),
            0,
            "nothing is counted before the first pass"
        );
        ra.count_certificates(0, &Default::default()).unwrap();
        ra.refresh_gauges(0);
        assert_eq!(
            ["valid", "revoked", "on_hold", "expired", "superseded"].map(gauge),
            [1, 1, 1, 0, 0]
        );
        ra.close_decisions().unwrap();
    }

    #[tokio::test]
    async fn a_token_that_cannot_enroll_is_a_typed_error_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let ra = test_ra(&dir);
        let actor = Actor::system();
        let customer = CustomerId::parse("customer_id", "typed").unwrap();
        let token = ra
            .create_enrollment_token(&actor, customer.clone(), 0)
            .unwrap()
            .token;
        let request = |token: &str| EnrollRequest {
            peer: None,
            token: token.to_string(),
            csr_der: crate::client::DeviceKey::generate()
                .csr_der("typed-phone")
                .unwrap(),
            device_id: DeviceId::parse("device_id", "typed-phone").unwrap(),
            device_info: DeviceInfo::default(),
            attestation: None,
        };
        ra.enroll(&actor, request(&token)).await.unwrap();

        let again = ra.enroll(&actor, request(&token)).await.unwrap_err();
        assert!(
            matches!(again, Error::Token(TokenRejection::AlreadyUsed { .. })),
            "{again:?}"
        );
        assert_eq!(again.kind(), crate::error::ErrorKind::FailedPrecondition);

        // The same shape, one character changed: a token payra never issued.
        let first = if token.starts_with('A') { "B" } else { "A" };
        let never_issued = format!("{first}{}", &token[1..]);
        let unknown = ra.enroll(&actor, request(&never_issued)).await.unwrap_err();
        assert!(
            matches!(unknown, Error::Token(TokenRejection::Unknown)),
            "{unknown:?}"
        );
        assert_eq!(unknown.kind(), crate::error::ErrorKind::Unauthenticated);
        ra.close_decisions().unwrap();
    }

    #[tokio::test]
    async fn a_revocation_that_cannot_be_made_is_a_typed_error_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let ra = test_ra(&dir);
        let actor = Actor::system();
        let customer = CustomerId::parse("customer_id", "typed-revoke").unwrap();
        let issued = ra
            .commit_enrollment(prepare(&ra, &customer, "typed-phone"))
            .await
            .unwrap();
        let serial = issued.record.serial.clone();
        ra.revoke_certificate(&actor, &serial, RevocationReason::Superseded)
            .unwrap();

        let again = ra
            .revoke_certificate(&actor, &serial, RevocationReason::Superseded)
            .unwrap_err();
        assert!(
            matches!(&again, Error::Revoke(RevokeRejection::AlreadyRevoked(s, r))
                if *s == serial && r.reason == RevocationReason::Superseded),
            "{again:?}"
        );
        assert_eq!(again.kind(), crate::error::ErrorKind::FailedPrecondition);

        let not_held = ra.unhold_certificate(&actor, &serial).unwrap_err();
        assert!(
            matches!(&not_held, Error::Revoke(RevokeRejection::NotOnHold(s)) if *s == serial),
            "{not_held:?}"
        );

        let unknown = Serial::random();
        let missing = ra
            .revoke_certificate(&actor, &unknown, RevocationReason::Superseded)
            .unwrap_err();
        assert_eq!(
            missing.kind(),
            crate::error::ErrorKind::NotFound,
            "{missing:?}"
        );
        ra.close_decisions().unwrap();
    }
}
