//! What a payment decision is made of: the requests (intent, transaction, factors), the
//! verdicts, the answer with its limit status, and the draft every decision is settled from
//! (`Draft::settle`, the RA's rules run inside the store's `Decisions::decide`).

use base64::Engine;

use super::limits::{Assessment, CeilingStatus, TierLimits};
use super::tiers::{contradicting_factor, decide_tier};
use crate::attestation::CertificateFactor;
use crate::error::{Error, Result};
use crate::model::{CustomerId, Factor, FactorCategory, Scene, Serial, Tier};
use crate::store::{Actor, AuditEvent, EvidenceRecord, LogRecord, RECORD_VERSION};

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
    pub(super) fn new(
        tier: Tier,
        assessment: Assessment,
        fits: bool,
        reserved: bool,
        day: String,
    ) -> Self {
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
    /// What the verified device signature counted for; `None` when not verified or for
    /// QualifyTransaction.
    pub certificate_factor: Option<CertificateFactor>,
    /// Why it counted for less than tier A's certificate.
    pub certificate_factor_note: Option<String>,
}

pub(super) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Everything a decision records, gathered before it is numbered and settled.
#[derive(Clone)]
pub(super) struct Draft {
    pub(super) kind: &'static str,
    pub(super) actor: Actor,
    pub(super) now_ms: i64,
    pub(super) customer: Option<CustomerId>,
    pub(super) serial: Option<Serial>,
    pub(super) intent_b64: String,
    pub(super) signature_b64: String,
    pub(super) factors: Vec<Factor>,
    pub(super) scene: Scene,
    /// What a verified signature under the device certificate counts for, by its key's
    /// attestation and the policy, and why less than tier A's certificate (VerifyPayment;
    /// QualifyTransaction has no certificate: `NotCounted`).
    pub(super) certificate: (CertificateFactor, Option<std::sync::Arc<str>>),
    pub(super) amount_fen: i64,
    /// The service asked for a reservation (only a verified decision makes one).
    pub(super) reserve: bool,
    pub(super) day: String,
    pub(super) accumulation: crate::ra::limits::Accumulation,
    /// The customer's limits and buckets today (the buckets are handed to the store when
    /// the decision is recorded); `None` when the customer is unknown.
    pub(super) ledger: Option<(TierLimits, [Vec<u8>; 4])>,
    /// The (device key, nonce) claim key, hex, and its expiry.
    pub(super) nonce: Option<(String, i64)>,
}

/// A decision as recorded and answered.
pub(super) struct Settled {
    pub(super) decision: Decision,
    pub(super) record: LogRecord,
    pub(super) reserved: bool,
    /// A reservation was asked for (for the metrics).
    pub(super) reserving: bool,
}

impl Draft {
    /// Settles the decision with `verdict` under `evidence_id`, given what the customer's
    /// four buckets hold (when the customer is known): the tier, whether the amount fits every
    /// ceiling, whether it is reserved, the evidence and the record to append.
    pub(super) fn settle(
        &self,
        verdict: Verdict,
        reason: &str,
        evidence_id: String,
        used: Option<[i64; 4]>,
    ) -> Result<Settled> {
        let verified = verdict == Verdict::Verified;
        let (factor, note) = match (&self.certificate, verified) {
            ((factor, note), true) => (*factor, note.as_deref().map(str::to_string)),
            (_, false) => (CertificateFactor::NotCounted, None),
        };
        let tiered = decide_tier(factor, &self.factors, self.scene);
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
            certificate_factor_note: note.clone(),
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
        if verified && factor != CertificateFactor::Certificate && self.kind == "verify_payment" {
            outcome = format!("{outcome}; certificate counted as {}", factor.name());
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
                certificate_factor: (verified && self.kind == "verify_payment").then_some(factor),
                certificate_factor_note: note,
            },
            record,
            reserved,
            reserving,
        })
    }
}
