//! Verifying device-signed payments and qualifying transactions (BRIEF flows 4 and 5): the
//! checks in their documented order, the tier, the daily limit ledger and the evidence.

use crate::sync::Unpoisoned;

use super::limits::{Assessment, TierLimits};
use super::signature::{verify_intent_signature_with, MAX_SIGNATURE_BYTES};
use super::Ra;
use crate::error::{Error, Result};
use crate::model::{CustomerId, Scene, Serial, Tier};
use crate::store::{
    ledger_key, Actor, AuditEvent, EvidenceRecord, NonceCheck, NonceClaim, ReleaseRejection,
};

use super::decision::{b64, Draft, Settled};
pub use super::decision::{
    validate_factors, Decision, LimitStatus, PaymentIntent, QualifyRequest, Transaction, Verdict,
    VerifyRequest, MAX_INTENT_BYTES, NONCE_LEN,
};

/// The most payments one VerifyPayments call carries.
pub const MAX_BATCH_PAYMENTS: usize = 100;

/// Refuses a VerifyPayments batch of no payments or more than [`MAX_BATCH_PAYMENTS`].
pub fn check_batch_size(count: usize) -> Result<()> {
    if count == 0 || count > MAX_BATCH_PAYMENTS {
        return Err(Error::invalid(
            "payments",
            format!("must hold 1 to {MAX_BATCH_PAYMENTS} payments; this batch holds {count}"),
        ));
    }
    Ok(())
}

/// The tasks of one VerifyPayments batch. Dropped before they finish (the call was dropped),
/// the unfinished ones are aborted at their next await: a payment not yet in the decision
/// log is not decided, and on PostgreSQL one queued for the decision writer is skipped, as
/// for a VerifyPayment whose caller left.
struct BatchTasks(Vec<tokio::task::JoinHandle<Result<Decision>>>);

impl Drop for BatchTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// How far the checks got.
struct Checked {
    verdict: Verdict,
    reason: String,
    customer: Option<CustomerId>,
    scene: Scene,
    nonce: Option<NonceClaim>,
    /// The certificate's attestation class (none when the certificate is unknown).
    attestation: crate::attestation::AttestationClass,
}

impl Ra {
    /// The customer's daily limits, with their agreed tier-A limit if they have one.
    fn limits_for(&self, customer: &CustomerId) -> TierLimits {
        self.policy.ledger.limits(self.agreed_limits.get(customer))
    }

    /// Runs the checks of VerifyPayment in the BRIEF's order and says where they stopped.
    /// `certificate`: what the cache or store holds for the request's serial.
    fn check_payment(
        &self,
        request: &VerifyRequest,
        certificate: Option<super::cache::CachedCertificate>,
        now_ms: i64,
    ) -> Checked {
        let now_s = now_ms.div_euclid(1000);
        let fail = |verdict, reason: String, customer: Option<CustomerId>| Checked {
            verdict,
            reason,
            customer,
            scene: request
                .intent
                .as_ref()
                .ok()
                .and_then(|i| i.scene)
                .unwrap_or(Scene::InApp),
            nonce: None,
            attestation: crate::attestation::AttestationClass::NONE,
        };
        let Some(cert) = certificate else {
            return fail(
                Verdict::UnknownCertificate,
                format!(
                    "no certificate with serial {} was issued by payra",
                    request.serial
                ),
                None,
            );
        };
        let customer = Some(cert.customer.clone());
        if let Some(revocation) = cert.revocation {
            return fail(
                Verdict::CertificateRevoked,
                format!(
                    "certificate was revoked at {}, reason {}",
                    crate::model::moment(revocation.revoked_at_s),
                    revocation.reason.cli_name()
                ),
                customer,
            );
        }
        if now_s < cert.not_before_s || now_s >= cert.not_after_s {
            return fail(
                Verdict::CertificateExpired,
                format!(
                    "certificate is valid from {} to {}, not now",
                    crate::model::moment(cert.not_before_s),
                    crate::model::moment(cert.not_after_s)
                ),
                customer,
            );
        }
        if !verify_intent_signature_with(
            cert.key_algorithm,
            &cert.public_key,
            &request.intent_bytes,
            &request.signature,
        ) {
            return fail(
                Verdict::BadSignature,
                format!(
                    "signature does not verify with the certificate's key ({}) over \
                     \"payra.v1.PaymentIntent\\n\" || intent",
                    match cert.key_algorithm {
                        crate::model::KeyAlgorithm::P256 => "ECDSA P-256 with SHA-256",
                        crate::model::KeyAlgorithm::Sm2 =>
                            "SM2 with SM3, distinguishing id 1234567812345678",
                    }
                ),
                customer,
            );
        }
        let intent = match &request.intent {
            Ok(intent) => intent,
            Err(why) => {
                return fail(
                    Verdict::MalformedIntent,
                    format!("intent does not decode: {why}"),
                    customer,
                )
            }
        };
        if let Some(why) = intent_defect(intent) {
            return fail(Verdict::MalformedIntent, why, customer);
        }
        if intent.customer_id != cert.customer.as_str() || intent.device_id != cert.device.as_str()
        {
            return fail(
                Verdict::IdentityMismatch,
                format!(
                    "intent names customer {:?} / device {:?}; the certificate is for {} / {}",
                    intent.customer_id, intent.device_id, cert.customer, cert.device
                ),
                customer,
            );
        }
        let tx = &request.transaction;
        let mut differences = Vec::new();
        if intent.merchant_id != tx.merchant_id {
            differences.push("merchant_id");
        }
        if intent.order_id != tx.order_id {
            differences.push("order_id");
        }
        if intent.amount_fen != tx.amount_fen {
            differences.push("amount_fen");
        }
        if intent.currency != tx.currency {
            differences.push("currency");
        }
        if !differences.is_empty() {
            return fail(
                Verdict::TransactionMismatch,
                format!(
                    "the signed intent differs from the transaction in {}",
                    differences.join(", ")
                ),
                customer,
            );
        }
        let skew_ms = self.policy.ledger.skew_ms;
        if (intent.created_at_ms - now_ms).abs() > skew_ms {
            return fail(
                Verdict::StaleTimestamp,
                format!(
                    "created_at_ms {} is {} ms from the server's clock; at most {skew_ms} ms allowed",
                    intent.created_at_ms,
                    intent.created_at_ms - now_ms
                ),
                customer,
            );
        }
        let created_s = intent.created_at_ms.div_euclid(1000);
        if created_s < cert.not_before_s || created_s >= cert.not_after_s {
            return fail(
                Verdict::CertificateExpired,
                "certificate was not valid at the intent's created_at".into(),
                customer,
            );
        }
        Checked {
            verdict: Verdict::Verified,
            reason: String::new(),
            customer,
            scene: intent.scene.unwrap_or(Scene::InApp),
            nonce: Some(NonceClaim {
                public_key: cert.public_key,
                nonce: intent.nonce.clone(),
                // After created_at + skew the timestamp check refuses the intent anyway.
                expires_at_ms: intent.created_at_ms + skew_ms,
            }),
            attestation: cert.attestation,
        }
    }

    /// VerifyPayment: the verdict, tier, limit status and evidence for a device-signed
    /// intent. A failed verification is an `Ok` decision with a refusing verdict; it never
    /// counts the certificate factor and never reserves.
    pub async fn verify_payment(&self, actor: &Actor, request: VerifyRequest) -> Result<Decision> {
        request.transaction.validate()?;
        validate_factors(&request.factors)?;
        if request.intent_bytes.is_empty() || request.intent_bytes.len() > MAX_INTENT_BYTES {
            return Err(Error::invalid(
                "intent",
                format!("must be 1 to {MAX_INTENT_BYTES} bytes"),
            ));
        }
        if request.signature.is_empty() || request.signature.len() > MAX_SIGNATURE_BYTES {
            return Err(Error::invalid(
                "signature",
                format!("must be 1 to {MAX_SIGNATURE_BYTES} bytes (DER or raw r||s)"),
            ));
        }
        let now_ms = self.clock.now_ms();
        let certificate = self.certificate_facts(&request.serial).await?;
        let checked = self.check_payment(&request, certificate, now_ms);
        let draft = self.draft(actor, "verify_payment", now_ms, &checked, &request);
        let recheck = (checked.verdict == Verdict::Verified).then(|| request.serial.clone());
        self.decide(
            draft,
            checked.verdict,
            checked.reason,
            recheck,
            checked.nonce,
        )
        .await
    }

    /// VerifyPayments: each payment decided as [`Ra::verify_payment`] decides it, independently
    /// of the others; the results in the payments' order. A payment whose request did not
    /// convert keeps its error, and the others are decided all the same.
    ///
    /// Each payment is a task of its own, so a batch spreads over the runtime's threads and
    /// other calls are served between its payments; their decisions reach the decision log
    /// together and share its syncs. If the batch is dropped (its caller went away, or its
    /// deadline passed), its unfinished tasks are aborted: each payment then ends as a
    /// VerifyPayment whose caller left at that moment would.
    pub async fn verify_payments(
        self: &std::sync::Arc<Self>,
        actor: &Actor,
        payments: Vec<Result<VerifyRequest>>,
    ) -> Result<Vec<Result<Decision>>> {
        check_batch_size(payments.len())?;
        let span = tracing::Span::current();
        let mut tasks = BatchTasks(
            payments
                .into_iter()
                .map(|payment| {
                    let (ra, actor) = (self.clone(), actor.clone());
                    tokio::spawn(tracing::Instrument::instrument(
                        async move { ra.verify_payment(&actor, payment?).await },
                        span.clone(),
                    ))
                })
                .collect(),
        );
        let mut results = Vec::with_capacity(tasks.0.len());
        for task in &mut tasks.0 {
            results.push(task.await.unwrap_or_else(|failed| {
                Err(Error::internal(format!(
                    "verifying a payment of the batch failed: {failed}"
                )))
            }));
        }
        Ok(results)
    }

    /// QualifyTransaction: the tier and limit from the service's factors alone (B, C or D).
    pub async fn qualify_transaction(
        &self,
        actor: &Actor,
        request: QualifyRequest,
    ) -> Result<Decision> {
        request.transaction.validate()?;
        validate_factors(&request.factors)?;
        let now_ms = self.clock.now_ms();
        let draft = Draft {
            kind: "qualify_transaction",
            actor: actor.clone(),
            now_ms,
            serial: None,
            intent_b64: String::new(),
            signature_b64: String::new(),
            factors: request.factors.clone(),
            scene: request.scene,
            certificate: (crate::attestation::CertificateFactor::NotCounted, None),
            amount_fen: request.transaction.amount_fen,
            reserve: request.reserve,
            day: self.policy.ledger.day(now_ms),
            accumulation: self.policy.ledger.accumulation,
            ledger: Some(self.ledger_of(&request.customer, now_ms)),
            customer: Some(request.customer),
            nonce: None,
        };
        self.decide(draft, Verdict::Verified, String::new(), None, None)
            .await
    }

    /// The customer's limits and the keys of their four buckets on the day of `now_ms`.
    fn ledger_of(&self, customer: &CustomerId, now_ms: i64) -> (TierLimits, [Vec<u8>; 4]) {
        let day = self.policy.ledger.day(now_ms);
        (
            self.limits_for(customer),
            Tier::ALL.map(|t| ledger_key(customer, &day, t)),
        )
    }

    /// What a VerifyPayment decision records, from its checks.
    fn draft(
        &self,
        actor: &Actor,
        kind: &'static str,
        now_ms: i64,
        checked: &Checked,
        request: &VerifyRequest,
    ) -> Draft {
        Draft {
            kind,
            actor: actor.clone(),
            now_ms,
            serial: Some(request.serial.clone()),
            intent_b64: b64(&request.intent_bytes),
            signature_b64: b64(&request.signature),
            factors: request.factors.clone(),
            scene: checked.scene,
            certificate: self.policy.attestation.factor(checked.attestation),
            amount_fen: request.transaction.amount_fen,
            reserve: request.reserve,
            day: self.policy.ledger.day(now_ms),
            accumulation: self.policy.ledger.accumulation,
            ledger: checked.customer.as_ref().map(|c| self.ledger_of(c, now_ms)),
            customer: checked.customer.clone(),
            nonce: checked
                .nonce
                .as_ref()
                .map(|n| (hex::encode(n.key()), n.expires_at_ms)),
        }
    }

    /// Records the decision: atomically, the nonce is claimed (across every payra process,
    /// with a shared store), the certificate's revocation re-read (`recheck`), and the
    /// reservation checked against the buckets as stored. Answers once durable.
    async fn decide(
        &self,
        draft: Draft,
        verdict: Verdict,
        reason: String,
        recheck: Option<Serial>,
        nonce: Option<NonceClaim>,
    ) -> Result<Decision> {
        let mut draft = draft;
        let slot: std::sync::Arc<std::sync::Mutex<Option<(Decision, bool)>>> = Default::default();
        let skew_ms = self.policy.ledger.skew_ms;
        // The store reads (and locks) the buckets; the draft keeps the customer's limits.
        let buckets = draft
            .ledger
            .as_mut()
            .map(|(_, buckets)| std::mem::take(buckets));
        let job = crate::store::DecisionJob {
            now_ms: draft.now_ms,
            recheck: recheck.clone(),
            nonce: nonce.as_ref().map(|n| (n.key(), n.expires_at_ms)),
            buckets,
            decide: {
                let slot = slot.clone();
                Box::new(move |context: &crate::store::DecisionContext| {
                    let (mut verdict, mut reason) = (verdict, reason.clone());
                    if let Some(serial) = recheck.as_ref().filter(|_| verdict == Verdict::Verified)
                    {
                        match context.certificate {
                            None => {
                                verdict = Verdict::UnknownCertificate;
                                reason = format!(
                                    "no certificate with serial {serial} was issued by payra"
                                );
                            }
                            Some(Some(revocation)) => {
                                verdict = Verdict::CertificateRevoked;
                                reason = format!(
                                    "certificate was revoked at {}, reason {}",
                                    crate::model::moment(revocation.revoked_at_s),
                                    revocation.reason.cli_name()
                                );
                            }
                            Some(None) => {}
                        }
                    }
                    if verdict == Verdict::Verified {
                        match context.nonce {
                            NonceCheck::Claimed => {}
                            NonceCheck::Replayed => {
                                verdict = Verdict::ReplayedNonce;
                                reason = "this nonce was already used with this device key".into();
                            }
                            NonceCheck::TooLate { now_ms } => {
                                verdict = Verdict::StaleTimestamp;
                                reason = format!(
                                    "created_at_ms is more than {skew_ms} ms before the server's \
                                     clock ({now_ms}) when its nonce was claimed; sign a new intent"
                                );
                            }
                        }
                    }
                    let settled = draft.settle(
                        verdict,
                        &reason,
                        context.evidence_id.clone(),
                        context.used,
                    )?;
                    let Settled {
                        decision,
                        record,
                        reserved,
                        reserving,
                    } = settled;
                    let decided = crate::store::Decided {
                        record,
                        reserve: reserved.then(|| (decision.tier.index(), draft.amount_fen)),
                    };
                    *slot.lock().unpoisoned() = Some((decision, reserving));
                    Ok(decided)
                })
            },
        };
        self.decisions.decide(job).await?;
        let (decision, reserving) = slot
            .lock()
            .unpoisoned()
            .take()
            .ok_or_else(|| Error::internal("a committed decision left no answer"))?;
        self.count(&decision, reserving);
        Ok(decision)
    }

    /// Counts a decision in the metrics, once it is durable.
    fn count(&self, decision: &Decision, reserving: bool) {
        self.metrics
            .verifications
            .with_label_values(&[decision.verdict.name(), decision.tier.letter()])
            .inc();
        if let Some(limit) = decision.limit.as_ref().filter(|_| reserving) {
            let outcome = if limit.reserved {
                "reserved"
            } else {
                "over_limit"
            };
            self.metrics
                .reservations
                .with_label_values(&[outcome])
                .inc();
        }
    }

    /// The evidence stored under `evidence_id`, with its release time if it was released.
    pub fn evidence(&self, evidence_id: &str) -> Result<EvidenceRecord> {
        if evidence_id.is_empty() || evidence_id.len() > 64 {
            return Err(Error::invalid("evidence_id", "must be 1 to 64 characters"));
        }
        self.decisions
            .evidence(evidence_id)?
            .ok_or_else(|| Error::NotFound(format!("no evidence with id {evidence_id}")))
    }

    /// Gives back the amount an evidence reserved, for a payment that failed downstream.
    /// Unknown id: `NotFound`; nothing reserved, already released, or reserved before
    /// yesterday (it counts for no limit any more): `FailedPrecondition`.
    pub fn release_reservation(&self, actor: &Actor, evidence_id: &str) -> Result<LimitStatus> {
        use crate::model::ReleaseRefusal;
        let refused = |refusal| Error::Release {
            evidence_id: evidence_id.to_string(),
            refusal,
        };
        let record = match self.evidence(evidence_id) {
            Err(Error::NotFound(_)) => return Err(refused(ReleaseRefusal::NotFound)),
            other => other?,
        };
        let customer = match (&record.customer_id, record.reserved_fen) {
            (Some(customer), reserved) if reserved > 0 => customer.clone(),
            _ => return Err(refused(ReleaseRefusal::NothingReserved)),
        };
        let now_ms = self.clock.now_ms();
        let first_day = self.policy.ledger.first_tracked_day(now_ms);
        let day_not_kept = || ReleaseRefusal::DayNotKept {
            day: record.day.clone(),
            kept_from: first_day.clone(),
        };
        if record.day < first_day {
            return Err(refused(day_not_kept()));
        }
        let buckets = Tier::ALL.map(|t| ledger_key(&customer, &record.day, t));
        let limits = self.limits_for(&customer);
        let accumulation = self.policy.ledger.accumulation;
        let audit = AuditEvent::new(now_ms, actor, "reservation.released", evidence_id, "ok");
        let used = match self
            .decisions
            .release(evidence_id, &buckets, now_ms, &audit)?
        {
            Ok(used) => used,
            Err(ReleaseRejection::NotFound) => return Err(refused(ReleaseRefusal::NotFound)),
            Err(ReleaseRejection::NothingReserved) => {
                return Err(refused(ReleaseRefusal::NothingReserved))
            }
            Err(ReleaseRejection::AlreadyReleased { released_at_ms }) => {
                return Err(refused(ReleaseRefusal::AlreadyReleased { released_at_ms }))
            }
            Err(ReleaseRejection::DayNotKept) => return Err(refused(day_not_kept())),
        };
        self.metrics
            .reservations
            .with_label_values(&["released"])
            .inc();
        tracing::info!(
            evidence = evidence_id,
            amount = record.reserved_fen,
            "reservation released"
        );
        let assessment = Assessment::of(record.tier, 0, accumulation, &limits, |t| used[t.index()]);
        Ok(LimitStatus::new(
            record.tier,
            assessment,
            true,
            false,
            record.day,
        ))
    }

    /// Where `customer` stands today against the ceilings of each tier (A, B, C, D), and
    /// whether they have an agreed limit. Reads only: no evidence, no reservation.
    pub fn limits_today(&self, customer: &CustomerId) -> Result<(String, bool, Vec<LimitStatus>)> {
        let day = self.policy.ledger.day(self.clock.now_ms());
        let agreed = self.agreed_limits.get(customer);
        let limits = self.policy.ledger.limits(agreed);
        let accumulation = self.policy.ledger.accumulation;
        let buckets = Tier::ALL.map(|t| ledger_key(customer, &day, t));
        let used = self.decisions.used(&buckets)?;
        let statuses = Tier::ALL.map(|tier| {
            let assessment = Assessment::of(tier, 1, accumulation, &limits, |t| used[t.index()]);
            let fits = assessment.fits;
            LimitStatus::new(tier, assessment, fits, false, day.clone())
        });
        Ok((day, agreed.is_some(), statuses.into()))
    }

    /// Sets a customer's agreed tier-A daily limit.
    pub fn set_agreed_limit(
        &self,
        actor: &Actor,
        customer: &CustomerId,
        limit_fen: i64,
    ) -> Result<()> {
        let max = self.policy.ledger.max_agreed_limit_fen;
        if !(0..=max).contains(&limit_fen) {
            return Err(Error::invalid(
                "daily_limit_fen",
                format!("must be between 0 and {max} fen (ledger.max_agreed_limit_fen)"),
            ));
        }
        let audit = AuditEvent::new(
            self.clock.now_ms(),
            actor,
            "limit.set",
            customer.as_str(),
            format!("{limit_fen} fen"),
        );
        self.agreed_limits
            .set(self.store.as_ref(), customer, limit_fen, &audit)?;
        tracing::info!(customer = %customer, limit_fen, "agreed tier-A limit set");
        Ok(())
    }

    /// Forgets nonce claims that can no longer matter (the records keep them); returns how
    /// many were purged.
    pub fn purge_expired_nonces(&self) -> Result<usize> {
        self.decisions.purge_nonces(self.clock.now_ms())
    }
}

/// What is wrong with a decoded intent's fields, if anything.
fn intent_defect(intent: &PaymentIntent) -> Option<String> {
    if !NONCE_LEN.contains(&intent.nonce.len()) {
        return Some(format!(
            "nonce is {} bytes; 16 to 64 random bytes required",
            intent.nonce.len()
        ));
    }
    if intent.scene.is_none() {
        return Some("scene is missing or unknown".into());
    }
    if intent.amount_fen <= 0 {
        return Some("amount_fen must be positive".into());
    }
    if intent.created_at_ms <= 0 {
        return Some("created_at_ms is missing".into());
    }
    for (field, value) in [
        ("customer_id", &intent.customer_id),
        ("device_id", &intent.device_id),
        ("merchant_id", &intent.merchant_id),
        ("order_id", &intent.order_id),
        ("currency", &intent.currency),
    ] {
        if value.is_empty() {
            return Some(format!("{field} is missing"));
        }
    }
    None
}
