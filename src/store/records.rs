//! Stored records. Each carries a `version`; readers accept every version listed in
//! [`RECORD_VERSION`]'s history, and a golden-file test keeps old data readable.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{
    CustomerId, DeviceId, DeviceInfo, Factor, FactorCategory, RevocationReason, Serial, Tier,
};

/// The version written by this build.
pub const RECORD_VERSION: u32 = 1;

/// SHA-256 of an enrollment token; the token itself is never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Hashes the token as the caller presents it.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }
}

/// An enrollment token, stored under its [`TokenHash`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub version: u32,
    pub customer_id: CustomerId,
    pub created_at_s: i64,
    pub expires_at_s: i64,
    /// Set when the token was consumed, with the certificate it produced.
    pub used_at_s: Option<i64>,
    pub used_for_serial: Option<Serial>,
}

/// A revocation as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub revoked_at_s: i64,
    pub reason: RevocationReason,
}

/// The fields of a [`CertificateRecord`] that the verification cache keeps; decoding only
/// these (the certificate DER is skipped) makes loading a million records at start cheaper.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CertificateSummary {
    pub serial: Serial,
    pub customer_id: CustomerId,
    pub device_id: DeviceId,
    pub not_before_s: i64,
    pub not_after_s: i64,
    pub public_key_hex: String,
    pub revocation: Option<Revocation>,
}

/// A revoked certificate as the CRL needs it, kept in its own index so building a CRL reads
/// only revoked certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedEntry {
    pub serial: Serial,
    pub revocation: Revocation,
    pub not_after_s: i64,
}

/// A certificate payra issued, keyed by serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRecord {
    pub version: u32,
    pub serial: Serial,
    pub customer_id: CustomerId,
    pub device_id: DeviceId,
    pub device_info: DeviceInfo,
    pub subject: String,
    pub not_before_s: i64,
    pub not_after_s: i64,
    pub issued_at_s: i64,
    /// The uncompressed SEC1 public key, hex; kept so the verifier never parses the DER.
    pub public_key_hex: String,
    /// The certificate, base64 (standard alphabet) DER.
    pub certificate_b64: String,
    pub revocation: Option<Revocation>,
    pub renewed_from: Option<Serial>,
    pub superseded_by: Option<Serial>,
}

impl CertificateRecord {
    /// The certificate DER.
    pub fn certificate_der(&self) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&self.certificate_b64)
            .unwrap_or_default()
    }

    /// Base64 of a DER certificate, for [`CertificateRecord::certificate_b64`].
    pub fn encode_der(der: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(der)
    }
}

/// A client certificate of a payment service or an operator, keyed by serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificateRecord {
    pub version: u32,
    pub serial: Serial,
    /// `service` or `operator`.
    pub role: String,
    pub name: String,
    pub not_before_s: i64,
    pub not_after_s: i64,
    pub issued_at_s: i64,
    pub certificate_b64: String,
    pub revocation: Option<Revocation>,
}

/// What payra decided for one VerifyPayment or QualifyTransaction, kept for disputes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceRecord {
    pub version: u32,
    pub evidence_id: String,
    /// `verify_payment` or `qualify_transaction`.
    pub kind: String,
    pub recorded_at_ms: i64,
    pub certificate_serial: Option<Serial>,
    pub customer_id: Option<CustomerId>,
    /// The signed intent bytes and the signature exactly as received, base64.
    pub intent_b64: String,
    pub signature_b64: String,
    /// The verdict name (`VERIFIED`, `BAD_SIGNATURE`, ...) and its human-readable reason.
    pub verdict: String,
    pub reason: String,
    pub tier: Tier,
    pub categories: Vec<FactorCategory>,
    pub factors: Vec<Factor>,
    pub amount_fen: i64,
    /// What was added to the ledger (0 when nothing was reserved).
    pub reserved_fen: i64,
    /// The ledger day (YYYY-MM-DD in the configured time zone).
    pub day: String,
    pub released_at_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records written by version 1. If this test fails, a change broke reading stored data:
    /// add a migration instead of editing the golden text.
    #[test]
    fn golden_v1_records_still_parse() {
        let token = r#"{"version":1,"customer_id":"cust-1","created_at_s":1764000000,
            "expires_at_s":1764000600,"used_at_s":1764000100,
            "used_for_serial":"4a1b2c3d4e5f60718293a4b5c6d7e8f9"}"#;
        let token: TokenRecord = serde_json::from_str(token).unwrap();
        assert_eq!(token.customer_id.as_str(), "cust-1");
        assert_eq!(token.used_at_s, Some(1764000100));

        let cert = r#"{"version":1,"serial":"4a1b2c3d4e5f60718293a4b5c6d7e8f9",
            "customer_id":"cust-1","device_id":"dev-1",
            "device_info":{"platform":"android","model":"Pixel 8","os_version":"15","app_version":"1.0"},
            "subject":"CN=dev-1,UID=cust-1,O=payra device","not_before_s":1763999700,
            "not_after_s":1795536000,"issued_at_s":1764000000,"public_key_hex":"04",
            "certificate_b64":"AAEC","revocation":{"revoked_at_s":1764000500,"reason":"key_compromise"},
            "renewed_from":null,"superseded_by":null}"#;
        let cert: CertificateRecord = serde_json::from_str(cert).unwrap();
        assert_eq!(cert.serial.to_hex(), "4a1b2c3d4e5f60718293a4b5c6d7e8f9");
        assert_eq!(
            cert.revocation.unwrap().reason,
            RevocationReason::KeyCompromise
        );
        assert_eq!(cert.certificate_der(), vec![0, 1, 2]);

        let evidence = r#"{"version":1,"evidence_id":"ev_00","kind":"verify_payment",
            "recorded_at_ms":1764000000123,"certificate_serial":"4a1b2c3d4e5f60718293a4b5c6d7e8f9",
            "customer_id":"cust-1","intent_b64":"CgE=","signature_b64":"MEQ=","verdict":"VERIFIED",
            "reason":"","tier":"A","categories":["knowledge","possession"],
            "factors":[{"category":"knowledge","method":"payment_pin"}],"amount_fen":1234,
            "reserved_fen":1234,"day":"2025-11-25","released_at_ms":null}"#;
        let evidence: EvidenceRecord = serde_json::from_str(evidence).unwrap();
        assert_eq!(evidence.tier, Tier::A);
        assert_eq!(
            evidence.categories,
            vec![FactorCategory::Knowledge, FactorCategory::Possession]
        );
    }
}
