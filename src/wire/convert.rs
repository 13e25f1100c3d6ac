//! Conversions between the wire's proto messages and the domain types: requests parsed into
//! what the RA takes (with the field named on a bad value), answers built from what it gives.

use super::proto;
use crate::attestation::{Attestation, AttestationPolicy, CertificateFactor, Evidence};
use crate::error::{Error, Result};
use crate::model::{
    CustomerId, DeviceId, DeviceInfo, Factor, FactorCategory, RevocationReason, Scene, Serial, Tier,
};
use crate::ra::{
    CertificateStatus, Decision, EnrollRequest, LimitStatus, PaymentIntent, QualifyRequest,
    RevokeOutcome, StatusView, Transaction, Verdict, VerifyRequest,
};
use crate::store::CertificateRecord;
use tonic::Status;

impl From<proto::DeviceInfo> for DeviceInfo {
    fn from(info: proto::DeviceInfo) -> DeviceInfo {
        DeviceInfo {
            platform: info.platform,
            model: info.model,
            os_version: info.os_version,
            app_version: info.app_version,
        }
    }
}

impl From<DeviceInfo> for proto::DeviceInfo {
    fn from(info: DeviceInfo) -> proto::DeviceInfo {
        proto::DeviceInfo {
            platform: info.platform,
            model: info.model,
            os_version: info.os_version,
            app_version: info.app_version,
        }
    }
}

impl TryFrom<proto::EnrollRequest> for EnrollRequest {
    type Error = Error;
    fn try_from(request: proto::EnrollRequest) -> Result<EnrollRequest> {
        Ok(EnrollRequest {
            peer: None,
            token: request.token,
            csr_der: request.csr_der,
            device_id: DeviceId::parse("device_id", &request.device_id)?,
            device_info: request
                .device_info
                .map(DeviceInfo::from)
                .unwrap_or_default(),
            attestation: request.attestation.map(|evidence| match evidence {
                proto::enroll_request::Attestation::Android(android) => Evidence::Android {
                    chain: android.certificate_chain_der,
                },
                proto::enroll_request::Attestation::Apple(apple) => Evidence::Apple {
                    attestation_object: apple.attestation_object,
                },
            }),
        })
    }
}

/// An attestation as the API shows it, with what it counts for under `policy`.
pub(super) fn attestation_to_proto(
    attestation: &Attestation,
    policy: &AttestationPolicy,
) -> proto::DeviceAttestation {
    let (factor, note) = policy.factor(attestation.class());
    proto::DeviceAttestation {
        platform: attestation.platform.name().to_string(),
        security_level: attestation.security_level.name().to_string(),
        boot_state: attestation
            .boot_state
            .map(|b| b.name().to_string())
            .unwrap_or_default(),
        device_locked: attestation.device_locked.unwrap_or(false),
        root: attestation.root.clone(),
        root_key_sha256: attestation.root_key_sha256.clone(),
        apps: attestation.apps.clone(),
        attested_at_unix_s: attestation.attested_at_s,
        tier_a_eligible: factor == CertificateFactor::Certificate,
        policy_note: note.unwrap_or_default(),
        chain_serials: attestation.chain_serials.clone(),
    }
}

pub(super) fn reason_to_proto(reason: RevocationReason) -> proto::RevocationReason {
    use proto::RevocationReason as P;
    match reason {
        RevocationReason::Unspecified => P::Unspecified,
        RevocationReason::KeyCompromise => P::KeyCompromise,
        RevocationReason::AffiliationChanged => P::AffiliationChanged,
        RevocationReason::Superseded => P::Superseded,
        RevocationReason::CessationOfOperation => P::CessationOfOperation,
        RevocationReason::CertificateHold => P::CertificateHold,
        RevocationReason::PrivilegeWithdrawn => P::PrivilegeWithdrawn,
    }
}

pub(super) fn reason_from_proto(value: i32) -> Result<RevocationReason> {
    use proto::RevocationReason as P;
    match P::try_from(value) {
        Ok(P::Unspecified) => Ok(RevocationReason::Unspecified),
        Ok(P::KeyCompromise) => Ok(RevocationReason::KeyCompromise),
        Ok(P::AffiliationChanged) => Ok(RevocationReason::AffiliationChanged),
        Ok(P::Superseded) => Ok(RevocationReason::Superseded),
        Ok(P::CessationOfOperation) => Ok(RevocationReason::CessationOfOperation),
        Ok(P::CertificateHold) => Ok(RevocationReason::CertificateHold),
        Ok(P::PrivilegeWithdrawn) => Ok(RevocationReason::PrivilegeWithdrawn),
        Err(_) => Err(Error::invalid(
            "reason",
            format!("{value} is not a revocation reason payra accepts"),
        )),
    }
}

pub(super) fn status_from_proto(value: i32) -> Result<Option<CertificateStatus>> {
    use proto::CertificateStatus as P;
    Ok(match P::try_from(value) {
        Ok(P::Unspecified) => None,
        Ok(P::Valid) => Some(CertificateStatus::Valid),
        Ok(P::Revoked) => Some(CertificateStatus::Revoked),
        Ok(P::Expired) => Some(CertificateStatus::Expired),
        Ok(P::Superseded) => Some(CertificateStatus::Superseded),
        Ok(P::OnHold) => Some(CertificateStatus::OnHold),
        Ok(P::NotYetValid) => Some(CertificateStatus::NotYetValid),
        Err(_) => return Err(Error::invalid("status", format!("{value} is not a status"))),
    })
}

pub(super) fn revoke_response(outcome: RevokeOutcome) -> proto::RevokeResponse {
    proto::RevokeResponse {
        revoked_serials: outcome.serials.iter().map(Serial::to_hex).collect(),
        revoked_at_unix_s: outcome.revoked_at_s,
        dry_run: outcome.dry_run,
        note: outcome.note.unwrap_or_default(),
    }
}

pub(super) fn issued_response(
    issued: crate::ra::Issued,
    policy: &AttestationPolicy,
) -> proto::EnrollResponse {
    proto::EnrollResponse {
        attestation: issued
            .record
            .attestation
            .as_ref()
            .map(|a| attestation_to_proto(a, policy)),
        certificate_der: issued.certificate_der,
        chain_der: issued.chain_der,
        serial: issued.record.serial.to_hex(),
        not_before_unix_s: issued.record.not_before_s,
        not_after_unix_s: issued.record.not_after_s,
        customer_id: issued.record.customer_id.to_string(),
        device_id: issued.record.device_id.to_string(),
        subscriber_ref: issued.record.subscriber_ref.unwrap_or_default(),
    }
}

pub(super) fn status_to_proto(status: CertificateStatus) -> proto::CertificateStatus {
    use proto::CertificateStatus as P;
    match status {
        CertificateStatus::Valid => P::Valid,
        CertificateStatus::NotYetValid => P::NotYetValid,
        CertificateStatus::Expired => P::Expired,
        CertificateStatus::Revoked => P::Revoked,
        CertificateStatus::Superseded => P::Superseded,
        CertificateStatus::OnHold => P::OnHold,
    }
}

pub(super) fn record_to_proto(
    record: CertificateRecord,
    view: &StatusView,
    policy: &AttestationPolicy,
) -> Result<proto::CertificateRecord, Status> {
    let certificate_der = record.certificate_der().map_err(Status::from)?;
    Ok(proto::CertificateRecord {
        attestation: record
            .attestation
            .as_ref()
            .map(|a| attestation_to_proto(a, policy)),
        serial: record.serial.to_hex(),
        customer_id: record.customer_id.to_string(),
        device_id: record.device_id.to_string(),
        subject: record.subject,
        not_before_unix_s: record.not_before_s,
        not_after_unix_s: record.not_after_s,
        issued_at_unix_s: record.issued_at_s,
        status: status_to_proto(view.status) as i32,
        revoked_at_unix_s: record.revocation.map_or(0, |r| r.revoked_at_s),
        revocation_reason: record
            .revocation
            .map_or(proto::RevocationReason::Unspecified, |r| {
                reason_to_proto(r.reason)
            }) as i32,
        device_info: Some(record.device_info.into()),
        certificate_der,
        renewed_from_serial: record.renewed_from.map(|s| s.to_hex()).unwrap_or_default(),
        superseded_by_serial: record.superseded_by.map(|s| s.to_hex()).unwrap_or_default(),
        subscriber_ref: record.subscriber_ref.unwrap_or_default(),
        key_algorithm: record.key_algorithm.name().to_string(),
        issued_upstream: record.issued_upstream,
    })
}

pub(super) fn upstream_revocation_to_proto(
    entry: crate::store::UpstreamRevocation,
) -> proto::UpstreamRevocation {
    proto::UpstreamRevocation {
        serial: entry.serial.to_hex(),
        reason: reason_to_proto(entry.revocation.reason) as i32,
        revoked_at_unix_s: entry.revocation.revoked_at_s,
        attempts: entry.attempts,
        last_attempt_unix_s: entry.last_attempt_at_s.unwrap_or(0),
        last_error: entry.last_error.unwrap_or_default(),
        orphan: entry.orphan,
    }
}

pub(super) fn scene_from_proto(value: i32) -> Option<Scene> {
    use proto::Scene as P;
    match P::try_from(value) {
        Ok(P::InApp) => Some(Scene::InApp),
        Ok(P::DynamicBarcode) => Some(Scene::DynamicBarcode),
        Ok(P::StaticBarcode) => Some(Scene::StaticBarcode),
        Ok(P::Online) => Some(Scene::Online),
        Ok(P::Unspecified) | Err(_) => None,
    }
}

pub(super) fn category_from_proto(value: i32) -> Result<FactorCategory> {
    use proto::FactorCategory as P;
    match P::try_from(value) {
        Ok(P::Knowledge) => Ok(FactorCategory::Knowledge),
        Ok(P::Possession) => Ok(FactorCategory::Possession),
        Ok(P::Inherence) => Ok(FactorCategory::Inherence),
        Ok(P::Unspecified) | Err(_) => Err(Error::invalid(
            "factors.category",
            "must be KNOWLEDGE, POSSESSION or INHERENCE",
        )),
    }
}

pub(super) fn category_to_proto(category: FactorCategory) -> i32 {
    use proto::FactorCategory as P;
    (match category {
        FactorCategory::Knowledge => P::Knowledge,
        FactorCategory::Possession => P::Possession,
        FactorCategory::Inherence => P::Inherence,
    }) as i32
}

pub(super) fn tier_to_proto(tier: Tier) -> i32 {
    use proto::Tier as P;
    (match tier {
        Tier::A => P::A,
        Tier::B => P::B,
        Tier::C => P::C,
        Tier::D => P::D,
    }) as i32
}

pub(super) fn verdict_to_proto(verdict: Verdict) -> i32 {
    use proto::Verdict as P;
    (match verdict {
        Verdict::Verified => P::Verified,
        Verdict::UnknownCertificate => P::UnknownCertificate,
        Verdict::CertificateRevoked => P::CertificateRevoked,
        Verdict::CertificateExpired => P::CertificateExpired,
        Verdict::BadSignature => P::BadSignature,
        Verdict::MalformedIntent => P::MalformedIntent,
        Verdict::IdentityMismatch => P::IdentityMismatch,
        Verdict::TransactionMismatch => P::TransactionMismatch,
        Verdict::StaleTimestamp => P::StaleTimestamp,
        Verdict::ReplayedNonce => P::ReplayedNonce,
    }) as i32
}

/// The parts VerifyPayment and QualifyTransaction answer alike: tier, factor categories,
/// limit status and evidence id.
pub(super) fn decision_to_proto(
    decision: Decision,
) -> (i32, Vec<i32>, Option<proto::LimitStatus>, String) {
    (
        tier_to_proto(decision.tier),
        decision
            .categories
            .into_iter()
            .map(category_to_proto)
            .collect(),
        decision.limit.map(limit_to_proto),
        decision.evidence_id,
    )
}

pub(super) fn limit_to_proto(limit: LimitStatus) -> proto::LimitStatus {
    proto::LimitStatus {
        tier: tier_to_proto(limit.tier),
        limit_fen: limit.limit_fen,
        used_fen: limit.used_fen,
        remaining_fen: limit.remaining_fen,
        fits: limit.fits,
        reserved: limit.reserved,
        day: limit.day,
        binding_tier: tier_to_proto(limit.binding_tier),
        ceilings: limit
            .ceilings
            .into_iter()
            .map(|ceiling| proto::LimitCeiling {
                tier: tier_to_proto(ceiling.tier),
                counts: ceiling.counts.iter().map(|t| tier_to_proto(*t)).collect(),
                limit_fen: ceiling.limit_fen,
                used_fen: ceiling.used_fen,
                remaining_fen: ceiling.remaining_fen,
            })
            .collect(),
    }
}

pub(super) fn factors_from_proto(factors: Vec<proto::Factor>) -> Result<Vec<Factor>> {
    factors
        .into_iter()
        .map(|f| {
            Ok(Factor {
                category: category_from_proto(f.category)?,
                method: f.method,
            })
        })
        .collect()
}

pub(super) fn transaction_from_proto(tx: Option<proto::Transaction>) -> Result<Transaction> {
    let tx = tx.ok_or_else(|| Error::invalid("transaction", "is required"))?;
    Ok(Transaction {
        merchant_id: tx.merchant_id,
        order_id: tx.order_id,
        amount_fen: tx.amount_fen,
        currency: tx.currency,
    })
}

/// Decodes the signed intent bytes; the verdict for a failure is decided after the
/// signature check.
pub(super) fn decode_intent(bytes: &[u8]) -> std::result::Result<PaymentIntent, String> {
    let intent = <proto::PaymentIntent as prost::Message>::decode(bytes)
        .map_err(|e| format!("not a payra.v1.PaymentIntent: {e}"))?;
    Ok(PaymentIntent {
        customer_id: intent.customer_id,
        device_id: intent.device_id,
        merchant_id: intent.merchant_id,
        order_id: intent.order_id,
        amount_fen: intent.amount_fen,
        currency: intent.currency,
        created_at_ms: intent.created_at_ms,
        nonce: intent.nonce,
        scene: scene_from_proto(intent.scene),
    })
}

impl TryFrom<proto::VerifyPaymentRequest> for VerifyRequest {
    type Error = Error;
    fn try_from(request: proto::VerifyPaymentRequest) -> Result<VerifyRequest> {
        Ok(VerifyRequest {
            intent: decode_intent(&request.intent),
            intent_bytes: request.intent,
            signature: request.signature,
            serial: Serial::parse("certificate_serial", &request.certificate_serial)?,
            transaction: transaction_from_proto(request.transaction)?,
            factors: factors_from_proto(request.factors)?,
            reserve: request.reserve,
        })
    }
}

impl TryFrom<proto::QualifyTransactionRequest> for QualifyRequest {
    type Error = Error;
    fn try_from(request: proto::QualifyTransactionRequest) -> Result<QualifyRequest> {
        Ok(QualifyRequest {
            customer: CustomerId::parse("customer_id", &request.customer_id)?,
            transaction: transaction_from_proto(request.transaction)?,
            factors: factors_from_proto(request.factors)?,
            scene: scene_from_proto(request.scene).ok_or_else(|| {
                Error::invalid(
                    "scene",
                    "must be IN_APP, DYNAMIC_BARCODE, STATIC_BARCODE or ONLINE",
                )
            })?,
            reserve: request.reserve,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary intent bytes decode or give a reason; never a panic.
        #[test]
        fn intent_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Err(reason) = decode_intent(&bytes) {
                prop_assert!(reason.starts_with("not a payra.v1.PaymentIntent"));
            }
        }

        /// A valid intent with bytes flipped decodes to something or is refused.
        #[test]
        fn mutated_intent_never_panics(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let intent = proto::PaymentIntent {
                customer_id: "c".into(),
                device_id: "d".into(),
                merchant_id: "m".into(),
                order_id: "o".into(),
                amount_fen: 1234,
                currency: "CNY".into(),
                created_at_ms: 1_800_000_000_000,
                nonce: vec![9; 32],
                scene: proto::Scene::InApp as i32,
            };
            let mut bytes = prost::Message::encode_to_vec(&intent);
            for (index, byte) in flips {
                let i = index.index(bytes.len());
                bytes[i] ^= byte;
            }
            let _ = decode_intent(&bytes);
        }
    }
}
