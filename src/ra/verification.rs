//! Verifying device-signed payments and qualifying transactions (BRIEF flows 4 and 5): the
//! checks in their documented order, the tier, the daily limit ledger and the evidence.

use base64::Engine;
use rand::RngCore;

use super::signature::{verify_intent_signature, MAX_SIGNATURE_BYTES};
use super::tiers::decide_tier;
use super::Ra;
use crate::error::{Error, Result};
use crate::model::{CustomerId, Factor, FactorCategory, Scene, Serial, Tier};
use crate::store::{
    Actor, AuditEvent, DecisionOutcome, EvidenceRecord, NonceClaim, ReleaseRejection, Reservation,
    RECORD_VERSION,
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

/// Checks the factors the service reports.
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

/// Where the customer stands against a tier's daily limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    pub tier: Tier,
    pub limit_fen: i64,
    pub used_fen: i64,
    pub remaining_fen: i64,
    pub fits: bool,
    pub reserved: bool,
    pub day: String,
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

/// Ledger policy from configuration.
#[derive(Debug, Clone)]
pub struct LedgerPolicy {
    pub utc_offset_s: i32,
    pub default_agreed_limit_fen: i64,
    pub limit_b_fen: i64,
    pub limit_c_fen: i64,
    pub limit_d_fen: i64,
    pub skew_ms: i64,
}

impl LedgerPolicy {
    /// The ledger day of `now_ms`: the calendar date in the configured time zone.
    pub fn day(&self, now_ms: i64) -> String {
        let local_s = now_ms.div_euclid(1000) + i64::from(self.utc_offset_s);
        match time::OffsetDateTime::from_unix_timestamp(local_s) {
            Ok(t) => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
            Err(_) => "out-of-range".to_string(),
        }
    }
}

fn new_evidence_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("ev_{}", hex::encode(bytes))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
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
    fn limit_for(&self, customer: &CustomerId, tier: Tier) -> Result<i64> {
        let policy = &self.policy.ledger;
        Ok(match tier {
            Tier::A => self
                .store
                .agreed_limit(customer)?
                .unwrap_or(policy.default_agreed_limit_fen),
            Tier::B => policy.limit_b_fen,
            Tier::C => policy.limit_c_fen,
            Tier::D => policy.limit_d_fen,
        })
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
                    "certificate was revoked at {} (Unix seconds), reason {}",
                    revocation.revoked_at_s,
                    revocation.reason.cli_name()
                ),
                customer,
            );
        }
        if now_s < cert.not_before_s || now_s >= cert.not_after_s {
            return fail(
                Verdict::CertificateExpired,
                format!(
                    "certificate is valid from {} to {} (Unix seconds), not now",
                    cert.not_before_s, cert.not_after_s
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
                serial: request.serial.clone(),
                nonce: intent.nonce.clone(),
                // After created_at + skew the timestamp check refuses the intent anyway.
                expires_at_ms: intent.created_at_ms + skew_ms,
            }),
        }
    }

    /// VerifyPayment: the verdict, tier, limit status and evidence for a device-signed
    /// intent. A failed verification is an `Ok` decision with a refusing verdict; it never
    /// counts the certificate factor and never reserves.
    pub fn verify_payment(&self, actor: &Actor, request: VerifyRequest) -> Result<Decision> {
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
        let mut checked = self.check_payment(&request, now_ms);
        let mut claimed_key = None;
        if let Some(claim) = &checked.nonce {
            let key = claim.key();
            if self.replay.claim(key.clone(), claim.expires_at_ms) {
                claimed_key = Some(key);
            } else {
                checked.verdict = Verdict::ReplayedNonce;
                checked.reason = "this nonce was already used with this certificate".into();
                checked.nonce = None;
            }
        }
        let verified = checked.verdict == Verdict::Verified;
        let decision = decide_tier(verified, &request.factors, checked.scene);
        let result = self.decide(
            actor,
            "verify_payment",
            now_ms,
            checked.customer.clone(),
            Some(request.serial.clone()),
            &request.intent_bytes,
            &request.signature,
            checked.verdict,
            &checked.reason,
            checked.scene,
            decision.tier,
            decision.categories.iter().copied().collect(),
            &request.factors,
            request.transaction.amount_fen,
            request.reserve && verified,
            checked.nonce.as_ref(),
        );
        if result.is_err() {
            if let Some(key) = claimed_key {
                self.replay.unclaim(&key);
            }
        }
        result
    }

    /// QualifyTransaction: the tier and limit from the service's factors alone (B, C or D).
    pub fn qualify_transaction(&self, actor: &Actor, request: QualifyRequest) -> Result<Decision> {
        request.transaction.validate()?;
        validate_factors(&request.factors)?;
        let now_ms = self.clock.now_ms();
        let decision = decide_tier(false, &request.factors, request.scene);
        self.decide(
            actor,
            "qualify_transaction",
            now_ms,
            Some(request.customer),
            None,
            &[],
            &[],
            Verdict::Verified,
            "",
            request.scene,
            decision.tier,
            decision.categories.iter().copied().collect(),
            &request.factors,
            request.transaction.amount_fen,
            request.reserve,
            None,
        )
    }

    /// Records the evidence (and nonce and reservation) durably and builds the answer.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        actor: &Actor,
        kind: &str,
        now_ms: i64,
        customer: Option<CustomerId>,
        serial: Option<Serial>,
        intent: &[u8],
        signature: &[u8],
        verdict: Verdict,
        reason: &str,
        scene: Scene,
        tier: Tier,
        categories: Vec<FactorCategory>,
        factors: &[Factor],
        amount_fen: i64,
        reserve: bool,
        nonce: Option<&NonceClaim>,
    ) -> Result<Decision> {
        let day = self.policy.ledger.day(now_ms);
        let limit_fen = match &customer {
            Some(c) => Some(self.limit_for(c, tier)?),
            None => None,
        };
        let reservation = match (&customer, limit_fen, reserve) {
            (Some(c), Some(limit_fen), true) => Some(Reservation {
                customer: c.clone(),
                day: day.clone(),
                tier,
                amount_fen,
                limit_fen,
            }),
            _ => None,
        };
        let evidence = EvidenceRecord {
            version: RECORD_VERSION,
            evidence_id: new_evidence_id(),
            kind: kind.to_string(),
            recorded_at_ms: now_ms,
            certificate_serial: serial,
            customer_id: customer.clone(),
            intent_b64: b64(intent),
            signature_b64: b64(signature),
            verdict: verdict.name().to_string(),
            reason: reason.to_string(),
            tier,
            categories: categories.clone(),
            factors: factors.to_vec(),
            amount_fen,
            reserved_fen: 0,
            day: day.clone(),
            released_at_ms: None,
        };
        let reason = reason.to_string();
        let audit = |verdict: Verdict| {
            AuditEvent::new(
                now_ms,
                actor,
                if kind == "verify_payment" {
                    "payment.verified"
                } else {
                    "transaction.qualified"
                },
                evidence.evidence_id.clone(),
                format!("{} tier {}", verdict.name(), tier.letter()),
            )
        };
        let outcome =
            self.store
                .record_decision(&evidence, nonce, reservation.as_ref(), &audit(verdict))?;
        if outcome == DecisionOutcome::NonceReplayed {
            // Storage knew the nonce although memory did not: decide again as a replay, which
            // counts no certificate and reserves nothing.
            let without_certificate = decide_tier(false, factors, scene);
            return self.decide(
                actor,
                kind,
                now_ms,
                customer,
                evidence.certificate_serial.clone(),
                intent,
                signature,
                Verdict::ReplayedNonce,
                "this nonce was already used with this certificate",
                scene,
                without_certificate.tier,
                without_certificate.categories.into_iter().collect(),
                factors,
                amount_fen,
                false,
                None,
            );
        }
        self.metrics
            .verifications
            .with_label_values(&[verdict.name(), tier.letter()])
            .inc();
        if reservation.is_some() {
            let outcome_name = match outcome {
                DecisionOutcome::Recorded { reserved: true, .. } => "reserved",
                _ => "over_limit",
            };
            self.metrics
                .reservations
                .with_label_values(&[outcome_name])
                .inc();
        }
        let (reserved, used_after) = match outcome {
            DecisionOutcome::Recorded { reserved, used_fen } => (reserved, used_fen),
            DecisionOutcome::NonceReplayed => (false, 0),
        };
        let limit = match (&customer, limit_fen) {
            (Some(c), Some(limit_fen)) => {
                let used_fen = if reservation.is_some() {
                    used_after
                } else {
                    self.store.ledger_used(c, &day, tier)?
                };
                let before = if reserved {
                    used_fen - amount_fen
                } else {
                    used_fen
                };
                Some(LimitStatus {
                    tier,
                    limit_fen,
                    used_fen,
                    remaining_fen: (limit_fen - used_fen).max(0),
                    fits: before.saturating_add(amount_fen) <= limit_fen,
                    reserved,
                    day,
                })
            }
            _ => None,
        };
        Ok(Decision {
            verdict,
            reason,
            tier,
            categories,
            limit,
            evidence_id: evidence.evidence_id,
        })
    }

    /// Gives back the amount an evidence reserved, for a payment that failed downstream.
    /// Unknown id: `NotFound`; nothing reserved or already released: `FailedPrecondition`.
    pub fn release_reservation(&self, actor: &Actor, evidence_id: &str) -> Result<LimitStatus> {
        if evidence_id.is_empty() || evidence_id.len() > 64 {
            return Err(Error::invalid("evidence_id", "must be 1 to 64 characters"));
        }
        let now_ms = self.clock.now_ms();
        let (record, used_fen) = self
            .store
            .release_reservation(
                evidence_id,
                now_ms,
                &AuditEvent::new(now_ms, actor, "reservation.released", evidence_id, "ok"),
            )?
            .map_err(|rejection| match rejection {
                ReleaseRejection::NotFound => {
                    Error::NotFound(format!("no evidence with id {evidence_id}"))
                }
                ReleaseRejection::NothingReserved => {
                    Error::FailedPrecondition(format!("evidence {evidence_id} reserved nothing"))
                }
                ReleaseRejection::AlreadyReleased { released_at_ms } => {
                    Error::FailedPrecondition(format!(
                        "evidence {evidence_id} was already released at {released_at_ms} (Unix ms)"
                    ))
                }
            })?;
        let customer = record
            .customer_id
            .clone()
            .ok_or_else(|| Error::internal("released evidence without a customer"))?;
        let limit_fen = self.limit_for(&customer, record.tier)?;
        self.metrics
            .reservations
            .with_label_values(&["released"])
            .inc();
        tracing::info!(
            evidence = evidence_id,
            amount = record.reserved_fen,
            "reservation released"
        );
        Ok(LimitStatus {
            tier: record.tier,
            limit_fen,
            used_fen,
            remaining_fen: (limit_fen - used_fen).max(0),
            fits: true,
            reserved: false,
            day: record.day,
        })
    }

    /// Sets a customer's agreed tier-A daily limit.
    pub fn set_agreed_limit(
        &self,
        actor: &Actor,
        customer: &CustomerId,
        limit_fen: i64,
    ) -> Result<()> {
        if limit_fen < 0 {
            return Err(Error::invalid("daily_limit_fen", "must not be negative"));
        }
        let audit = AuditEvent::new(
            self.clock.now_ms(),
            actor,
            "limit.set",
            customer.as_str(),
            format!("{limit_fen} fen"),
        );
        self.store.set_agreed_limit(customer, limit_fen, &audit)?;
        tracing::info!(customer = %customer, limit_fen, "agreed tier-A limit set");
        Ok(())
    }

    /// The evidence stored under `evidence_id`.
    pub fn evidence(&self, evidence_id: &str) -> Result<EvidenceRecord> {
        if evidence_id.is_empty() || evidence_id.len() > 64 {
            return Err(Error::invalid("evidence_id", "must be 1 to 64 characters"));
        }
        self.store
            .evidence(evidence_id)?
            .ok_or_else(|| Error::NotFound(format!("no evidence with id {evidence_id}")))
    }

    /// Forgets expired nonces in memory and storage; returns how many were purged.
    pub fn purge_expired_nonces(&self) -> Result<usize> {
        let now_ms = self.clock.now_ms();
        self.replay.purge(now_ms);
        self.store.purge_nonces(now_ms)
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
