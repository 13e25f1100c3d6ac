//! Verifying device-signed payments and qualifying transactions (BRIEF flows 4 and 5): the
//! checks in their documented order, the tier, the daily limit ledger and the evidence.

use crate::sync::Unpoisoned;
use base64::Engine;

use super::limits::{Assessment, CeilingStatus, TierLimits};
use super::signature::{verify_intent_signature, MAX_SIGNATURE_BYTES};
use super::tiers::{contradicting_factor, decide_tier};
use super::Ra;
use crate::error::{Error, Result};
use crate::model::{CustomerId, Factor, FactorCategory, Scene, Serial, Tier};
use crate::store::{
    ledger_key, Actor, AuditEvent, EvidenceRecord, LogRecord, NonceCheck, NonceClaim,
    ReleaseRejection, RECORD_VERSION,
};

/// Largest serialized intent accepted.
pub const MAX_INTENT_BYTES: usize = 4 * 1024;
/// Most factors one request may report.
pub const MAX_FACTORS: usize = 8;
/// Longest merchant / order id and factor method name.
pub const MAX_REFERENCE_LEN: usize = 128;
/// Accepted nonce lengths.
pub const NONCE_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// The intent as the app serialized it, decoded by the wire layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentIntent {
    pub customer_id: String,
    pub device_id: String,
    pub merchant_id: String,
    pub order_id: String,
    pub amount_fen: i64,
    pub currency: String,
    pub created_at_ms: i64,
    pub nonce: Vec<u8>,
    /// `None` when the app sent no scene or one payra does not know.
    pub scene: Option<Scene>,
}

/// The transaction the payment service is about to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub merchant_id: String,
    pub order_id: String,
    pub amount_fen: i64,
    pub currency: String,
}

impl Transaction {
    /// Checks the request shape: ids present and bounded, a positive amount, CNY.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("transaction.merchant_id", &self.merchant_id),
            ("transaction.order_id", &self.order_id),
        ] {
            if value.is_empty() {
                return Err(Error::invalid(field, "is required"));
            }
            if value.len() > MAX_REFERENCE_LEN {
                return Err(Error::invalid(
                    field,
                    format!("at most {MAX_REFERENCE_LEN} bytes allowed"),
                ));
            }
        }
        if self.amount_fen <= 0 {
            return Err(Error::invalid(
                "transaction.amount_fen",
                "must be a positive number of fen",
            ));
        }
        if self.currency != "CNY" {
            return Err(Error::invalid(
                "transaction.currency",
                format!(
                    "{:?} is not supported; the limits are kept in CNY",
                    self.currency
                ),
            ));
        }
        Ok(())
    }
}

/// Checks the factors the service reports: their number, their method names' length, and
/// that no well-known method comes with another category than its own.
pub fn validate_factors(factors: &[Factor]) -> Result<()> {
    if factors.len() > MAX_FACTORS {
        return Err(Error::invalid(
            "factors",
            format!("at most {MAX_FACTORS} factors allowed"),
        ));
    }
    for factor in factors {
        if factor.method.len() > MAX_REFERENCE_LEN {
            return Err(Error::invalid(
                "factors.method",
                format!("at most {MAX_REFERENCE_LEN} bytes allowed"),
            ));
        }
    }
    if let Some((factor, known)) = contradicting_factor(factors) {
        tracing::warn!(
            method = ?factor.method,
            reported = ?factor.category,
            known = ?known,
            "factor reported with a category that contradicts its method"
        );
        return Err(Error::invalid(
            "factors.category",
            format!(
                "method {:?} is a {} factor (43号 Art. 22), not {}; report it as {}",
                factor.method,
                known.name(),
                factor.category.name(),
                known.name()
            ),
        ));
    }
    Ok(())
}

/// A parsed VerifyPayment request.
#[derive(Debug, Clone)]
pub struct VerifyRequest {
    pub intent_bytes: Vec<u8>,
    /// The decoded intent, or why it did not decode. Decoding happens at the edge; whether a
    /// failure matters is decided here, after the signature check.
    pub intent: std::result::Result<PaymentIntent, String>,
    pub signature: Vec<u8>,
    pub serial: Serial,
    pub transaction: Transaction,
    pub factors: Vec<Factor>,
    pub reserve: bool,
}

/// A parsed QualifyTransaction request.
#[derive(Debug, Clone)]
pub struct QualifyRequest {
    pub customer: CustomerId,
    pub transaction: Transaction,
    pub factors: Vec<Factor>,
    pub scene: Scene,
    pub reserve: bool,
}

/// The business answer of a verification. Anything but `Verified` is a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Verified,
    UnknownCertificate,
    CertificateRevoked,
    CertificateExpired,
    BadSignature,
    MalformedIntent,
    IdentityMismatch,
    TransactionMismatch,
    StaleTimestamp,
    ReplayedNonce,
}

impl Verdict {
    /// The name used on the wire and in evidence.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Verified => "VERIFIED",
            Verdict::UnknownCertificate => "UNKNOWN_CERTIFICATE",
            Verdict::CertificateRevoked => "CERTIFICATE_REVOKED",
            Verdict::CertificateExpired => "CERTIFICATE_EXPIRED",
            Verdict::BadSignature => "BAD_SIGNATURE",
            Verdict::MalformedIntent => "MALFORMED_INTENT",
            Verdict::IdentityMismatch => "IDENTITY_MISMATCH",
            Verdict::TransactionMismatch => "TRANSACTION_MISMATCH",
            Verdict::StaleTimestamp => "STALE_TIMESTAMP",
            Verdict::ReplayedNonce => "REPLAYED_NONCE",
        }
    }
}

/// Where the customer stands against the daily ceilings of a decision's tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    /// The decided tier.
    pub tier: Tier,
    /// The ceiling with the least room left; `limit_fen`, `used_fen` and `remaining_fen` are
    /// its figures.
    pub binding_tier: Tier,
    pub limit_fen: i64,
    pub used_fen: i64,
    pub remaining_fen: i64,
    /// Every ceiling the decision had to fit, innermost first.
    pub ceilings: Vec<CeilingStatus>,
    pub fits: bool,
    pub reserved: bool,
    pub day: String,
}

impl LimitStatus {
    /// The status a decision of `tier` reports from its assessment (taken after any
    /// reservation was added).
    fn new(tier: Tier, assessment: Assessment, fits: bool, reserved: bool, day: String) -> Self {
        let binding = assessment.binding().clone();
        LimitStatus {
            tier,
            binding_tier: binding.tier,
            limit_fen: binding.limit_fen,
            used_fen: binding.used_fen,
            remaining_fen: binding.remaining_fen,
            ceilings: assessment.ceilings,
            fits,
            reserved,
            day,
        }
    }
}

/// The answer to VerifyPayment or QualifyTransaction.
#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: String,
    pub tier: Tier,
    pub categories: Vec<FactorCategory>,
    /// `None` only when the certificate is unknown (no customer to count for).
    pub limit: Option<LimitStatus>,
    pub evidence_id: String,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Everything a decision records, gathered before it is numbered and settled.
#[derive(Clone)]
struct Draft {
    kind: &'static str,
    actor: Actor,
    now_ms: i64,
    customer: Option<CustomerId>,
    serial: Option<Serial>,
    intent_b64: String,
    signature_b64: String,
    factors: Vec<Factor>,
    scene: Scene,
    /// A verified verdict counts the device certificate as a possession factor
    /// (VerifyPayment; QualifyTransaction has none).
    counts_certificate: bool,
    amount_fen: i64,
    /// The service asked for a reservation (only a verified decision makes one).
    reserve: bool,
    day: String,
    accumulation: crate::ra::limits::Accumulation,
    /// The customer's limits and buckets today (the buckets are handed to the store when
    /// the decision is recorded); `None` when the customer is unknown.
    ledger: Option<(TierLimits, [Vec<u8>; 4])>,
    /// The (device key, nonce) claim key, hex, and its expiry.
    nonce: Option<(String, i64)>,
}

/// A decision as recorded and answered.
struct Settled {
    decision: Decision,
    record: LogRecord,
    reserved: bool,
    /// A reservation was asked for (for the metrics).
    reserving: bool,
}

impl Draft {
    /// Settles the decision with `verdict` under `evidence_id`, given what the customer's
    /// four buckets hold (when the customer is known): the tier, whether the amount fits every
    /// ceiling, whether it is reserved, the evidence and the record to append.
    fn settle(
        &self,
        verdict: Verdict,
        reason: &str,
        evidence_id: String,
        used: Option<[i64; 4]>,
    ) -> Result<Settled> {
        let verified = verdict == Verdict::Verified;
        let tiered = decide_tier(
            self.counts_certificate && verified,
            &self.factors,
            self.scene,
        );
        let tier = tiered.tier;
        let categories: Vec<FactorCategory> = tiered.categories.iter().copied().collect();
        let assessment = match (&self.ledger, used) {
            (Some((limits, _)), Some(used)) => Some(Assessment::of(
                tier,
                self.amount_fen,
                self.accumulation,
                limits,
                |t| used[t.index()],
            )),
            _ => None,
        };
        let reserving = self.reserve && verified && self.ledger.is_some();
        let reserved = reserving && assessment.as_ref().is_some_and(|a| a.fits);
        let evidence = EvidenceRecord {
            version: RECORD_VERSION,
            evidence_id: evidence_id.clone(),
            kind: self.kind.to_string(),
            recorded_at_ms: self.now_ms,
            certificate_serial: self.serial.clone(),
            customer_id: self.customer.clone(),
            intent_b64: self.intent_b64.clone(),
            signature_b64: self.signature_b64.clone(),
            verdict: verdict.name().to_string(),
            reason: reason.to_string(),
            tier,
            categories: categories.clone(),
            factors: self.factors.clone(),
            amount_fen: self.amount_fen,
            reserved_fen: if reserved { self.amount_fen } else { 0 },
            day: self.day.clone(),
            released_at_ms: None,
        };
        let action = if self.kind == "verify_payment" {
            "payment.verified"
        } else {
            "transaction.qualified"
        };
        let mut outcome = format!("{} tier {}", verdict.name(), tier.letter());
        if reserving {
            let note = if reserved { "reserved" } else { "not reserved" };
            outcome = format!("{outcome}; {note} {} fen", self.amount_fen);
        }
        let record = LogRecord::Decision {
            audit: AuditEvent::new(
                self.now_ms,
                &self.actor,
                action,
                evidence_id.clone(),
                outcome,
            ),
            evidence: Box::new(evidence),
            // Only a verified decision holds its nonce's claim.
            nonce: self.nonce.clone().filter(|_| verified),
        };
        let limit = assessment.map(|assessment| {
            let fits = assessment.fits;
            let after = if reserved {
                assessment.after_adding(self.amount_fen)
            } else {
                assessment
            };
            LimitStatus::new(tier, after, fits, reserved, self.day.clone())
        });
        Ok(Settled {
            decision: Decision {
                verdict,
                reason: reason.to_string(),
                tier,
                categories,
                limit,
                evidence_id,
            },
            record,
            reserved,
            reserving,
        })
    }
}

/// How far the checks got.
struct Checked {
    verdict: Verdict,
    reason: String,
    customer: Option<CustomerId>,
    scene: Scene,
    nonce: Option<NonceClaim>,
}

impl Ra {
    /// The customer's daily limits, with their agreed tier-A limit if they have one.
    fn limits_for(&self, customer: &CustomerId) -> TierLimits {
        self.policy.ledger.limits(self.agreed_limits.get(customer))
    }

    /// Runs the checks of VerifyPayment in the BRIEF's order and says where they stopped.
    fn check_payment(&self, request: &VerifyRequest, now_ms: i64) -> Checked {
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
        };
        let Some(cert) = self.cache.get(&request.serial) else {
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
        if !verify_intent_signature(&cert.public_key, &request.intent_bytes, &request.signature) {
            return fail(
                Verdict::BadSignature,
                "signature does not verify with the certificate's key over \
                 \"payra.v1.PaymentIntent\\n\" || intent"
                    .into(),
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
        self.cache_from_store(&request.serial).await?;
        let checked = self.check_payment(&request, now_ms);
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
            counts_certificate: false,
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
            counts_certificate: true,
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

    /// With a store other processes write too, puts the certificate with `serial` into the
    /// cache from the store when the cache does not have it (another process issued it). A
    /// store only this process writes has every certificate in the cache already: an unknown
    /// serial costs no read.
    pub async fn cache_from_store(&self, serial: &Serial) -> Result<()> {
        if !self.store.shared() || self.cache.standing(serial).is_some() {
            return Ok(());
        }
        let store = self.store.clone();
        let serial = serial.clone();
        let summary = tokio::task::spawn_blocking(move || store.certificate_summary(&serial))
            .await
            .map_err(|e| Error::internal(format!("reading a certificate: {e}")))??;
        if let Some(summary) = summary {
            // A notification may have put a newer state meanwhile: keep it.
            self.cache.put_summary_if_absent(&summary);
        }
        Ok(())
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
        let record = self.evidence(evidence_id)?;
        let customer = match (&record.customer_id, record.reserved_fen) {
            (Some(customer), reserved) if reserved > 0 => customer.clone(),
            _ => {
                return Err(Error::FailedPrecondition(format!(
                    "evidence {evidence_id} reserved nothing"
                )))
            }
        };
        let now_ms = self.clock.now_ms();
        let first_day = self.policy.ledger.first_tracked_day(now_ms);
        if record.day < first_day {
            return Err(Error::FailedPrecondition(format!(
                "evidence {evidence_id} reserved on {}; daily limits are kept from {first_day} \
                 on, so there is nothing left to give back",
                record.day
            )));
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
            Err(ReleaseRejection::NotFound) => {
                return Err(Error::NotFound(format!(
                    "no evidence with id {evidence_id}"
                )))
            }
            Err(ReleaseRejection::NothingReserved) => {
                return Err(Error::FailedPrecondition(format!(
                    "evidence {evidence_id} reserved nothing"
                )))
            }
            Err(ReleaseRejection::AlreadyReleased { released_at_ms }) => {
                return Err(Error::FailedPrecondition(format!(
                    "evidence {evidence_id} was already released at {}",
                    crate::model::moment_ms(released_at_ms)
                )))
            }
            Err(ReleaseRejection::DayNotKept) => {
                return Err(Error::FailedPrecondition(format!(
                    "evidence {evidence_id} reserved on {}; daily limits are kept from \
                     {first_day} on, so there is nothing left to give back",
                    record.day
                )))
            }
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
