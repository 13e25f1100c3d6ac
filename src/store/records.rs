//! Stored records. Each carries a `version`; readers accept every version listed in
//! [`RECORD_VERSION`]'s history, and a golden-file test keeps old data readable.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::{
    CustomerId, DeviceId, DeviceInfo, Factor, FactorCategory, KeyAlgorithm, RevocationReason,
    Serial, Tier,
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

pub use crate::model::Revocation;

/// The fields of a [`CertificateRecord`] that the verification cache keeps, stored beside the
/// record in a compact binary form (the `cert_summaries` tree) so that loading a million of
/// them at start reads about 130 bytes each instead of the whole JSON record and DER.
///
/// Layout: version (1) | public key (65, uncompressed SEC1) | notBefore i64 BE | notAfter i64
/// BE | revoked flag (0/1) | revoked_at_s i64 BE | reason code u8 | customer length u8 |
/// customer | device length u8 | device | attestation class u8 | key algorithm u8. The last
/// two are optional: a summary that ends at the device id is of an unattested P-256 key, one
/// that ends at the attestation class of a P-256 key. The serial is the tree's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    pub serial: Serial,
    pub customer_id: CustomerId,
    pub device_id: DeviceId,
    pub not_before_s: i64,
    pub not_after_s: i64,
    pub public_key: [u8; 65],
    pub revocation: Option<Revocation>,
    /// What the enrollment's attestation proved, in one byte.
    pub attestation: crate::attestation::AttestationClass,
    pub key_algorithm: KeyAlgorithm,
}

/// The summary layout this build writes and reads (its first octet).
pub(crate) const SUMMARY_VERSION: u8 = 1;

impl CertificateSummary {
    /// Whether the certificate was revoked for keyCompromise. Retention keeps such a
    /// certificate when it expires: its record is what refuses its key for ever
    /// ([`KeyRefusal::Compromised`]).
    pub fn key_compromised(&self) -> bool {
        self.revocation.map(|r| r.reason) == Some(RevocationReason::KeyCompromise)
    }
}

/// Why a device key may not be certified for a holder now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRefusal {
    /// A certificate of the key was revoked for keyCompromise: it is never certified again.
    Compromised,
    /// A live certificate (valid or on hold, unexpired) of the key is another customer's or
    /// device's: this one.
    HeldElsewhere(Serial),
}

impl KeyRefusal {
    /// Whether `customer` / `device` may have a certificate of a key whose certificates are
    /// `holders` (every one the store has), at `now_s`.
    pub fn of(
        holders: &[CertificateSummary],
        customer: &CustomerId,
        device: &DeviceId,
        now_s: i64,
    ) -> Option<KeyRefusal> {
        let reasons = || holders.iter().map(|h| (h, h.revocation.map(|r| r.reason)));
        if reasons().any(|(_, reason)| reason == Some(RevocationReason::KeyCompromise)) {
            return Some(KeyRefusal::Compromised);
        }
        reasons()
            .find(|(holder, reason)| {
                matches!(reason, None | Some(RevocationReason::CertificateHold))
                    && holder.not_after_s > now_s
                    && (holder.customer_id != *customer || holder.device_id != *device)
            })
            .map(|(holder, _)| KeyRefusal::HeldElsewhere(holder.serial.clone()))
    }

    /// The answer to the request that asked for it.
    pub fn error(&self) -> Error {
        match self {
            KeyRefusal::Compromised => Self::compromised_error(),
            KeyRefusal::HeldElsewhere(_) => Self::held_elsewhere_error(),
        }
    }

    /// The answer to a request for a key reported compromised.
    pub fn compromised_error() -> Error {
        Error::AlreadyExists(
            "this device key was reported compromised; generate a new key pair".into(),
        )
    }

    /// The answer to a request for a key another customer or device holds.
    pub fn held_elsewhere_error() -> Error {
        Error::AlreadyExists(
            "this device key already has a live certificate for another customer or device; \
             generate a new key pair for this enrollment"
                .into(),
        )
    }
}

impl CertificateSummary {
    /// The summary of `record`.
    pub fn of(record: &CertificateRecord) -> Result<CertificateSummary> {
        let mut public_key = [0u8; 65];
        hex::decode_to_slice(&record.public_key_hex, &mut public_key).map_err(|_| {
            Error::internal(format!(
                "certificate {}: stored public key is not an uncompressed point",
                record.serial
            ))
        })?;
        Ok(CertificateSummary {
            serial: record.serial.clone(),
            customer_id: record.customer_id.clone(),
            device_id: record.device_id.clone(),
            not_before_s: record.not_before_s,
            not_after_s: record.not_after_s,
            public_key,
            revocation: record.revocation,
            attestation: record
                .attestation
                .as_ref()
                .map_or(crate::attestation::AttestationClass::NONE, |a| a.class()),
            key_algorithm: record.key_algorithm,
        })
    }

    /// The binary form (see the type's documentation).
    pub fn encode(&self) -> Vec<u8> {
        let customer = self.customer_id.as_str().as_bytes();
        let device = self.device_id.as_str().as_bytes();
        let mut out = Vec::with_capacity(1 + 65 + 16 + 10 + 2 + customer.len() + device.len());
        out.push(SUMMARY_VERSION);
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.not_before_s.to_be_bytes());
        out.extend_from_slice(&self.not_after_s.to_be_bytes());
        let (flag, at, reason) = match self.revocation {
            Some(r) => (1u8, r.revoked_at_s, r.reason.code()),
            None => (0, 0, 0),
        };
        out.push(flag);
        out.extend_from_slice(&at.to_be_bytes());
        out.push(reason);
        // Identifiers are at most 128 bytes (validated when parsed), so a length fits a byte.
        out.push(customer.len() as u8);
        out.extend_from_slice(customer);
        out.push(device.len() as u8);
        out.extend_from_slice(device);
        // Last and optional: summaries written before attestation end at the device id, and
        // those written before SM2 at the attestation class.
        let sm2 = self.key_algorithm != KeyAlgorithm::P256;
        if sm2 || self.attestation != crate::attestation::AttestationClass::NONE {
            out.push(self.attestation.0);
        }
        if sm2 {
            out.push(self.key_algorithm.code());
        }
        out
    }

    /// The revocation alone from a binary form, without decoding (or allocating) the rest:
    /// what a decision re-reads under the decision log's lock.
    pub fn revocation_in(bytes: &[u8]) -> Result<Option<Revocation>> {
        const FLAG: usize = 1 + 65 + 8 + 8;
        let bad = |what: &str| Error::internal(format!("certificate summary: {what}"));
        if bytes.first() != Some(&SUMMARY_VERSION) {
            return Err(bad("unknown version"));
        }
        let Some(&[flag, a, b, c, d, e, f, g, h, code]) = bytes.get(FLAG..FLAG + 10) else {
            return Err(bad("truncated"));
        };
        match flag {
            0 => Ok(None),
            1 => Ok(Some(Revocation {
                revoked_at_s: i64::from_be_bytes([a, b, c, d, e, f, g, h]),
                reason: RevocationReason::from_code(code)
                    .ok_or_else(|| bad("unknown reason code"))?,
            })),
            _ => Err(bad("revocation flag")),
        }
    }

    /// Reads the binary form stored under `serial`.
    pub fn decode(serial: &[u8], bytes: &[u8]) -> Result<CertificateSummary> {
        let bad = |what: &str| Error::internal(format!("certificate summary: {what}"));
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8]> {
            if rest.len() < n {
                return Err(bad("truncated"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        if take(1)?[0] != SUMMARY_VERSION {
            return Err(bad("unknown version"));
        }
        let public_key: [u8; 65] = take(65)?.try_into().map_err(|_| bad("key"))?;
        let int = |b: &[u8]| -> Result<i64> {
            Ok(i64::from_be_bytes(
                b.try_into().map_err(|_| bad("integer"))?,
            ))
        };
        let not_before_s = int(take(8)?)?;
        let not_after_s = int(take(8)?)?;
        let flag = take(1)?[0];
        let revoked_at_s = int(take(8)?)?;
        let code = take(1)?[0];
        let revocation = match flag {
            0 => None,
            1 => Some(Revocation {
                revoked_at_s,
                reason: RevocationReason::from_code(code)
                    .ok_or_else(|| bad("unknown reason code"))?,
            }),
            _ => return Err(bad("revocation flag")),
        };
        let len = take(1)?[0] as usize;
        let customer = std::str::from_utf8(take(len)?).map_err(|_| bad("customer"))?;
        let customer_id = CustomerId::parse("customer_id", customer)?;
        let len = take(1)?[0] as usize;
        let device = std::str::from_utf8(take(len)?).map_err(|_| bad("device"))?;
        let device_id = DeviceId::parse("device_id", device)?;
        let (attestation, key_algorithm) = match rest {
            [] => (
                crate::attestation::AttestationClass::NONE,
                KeyAlgorithm::P256,
            ),
            [class] => (
                crate::attestation::AttestationClass(*class),
                KeyAlgorithm::P256,
            ),
            [class, algorithm] => (
                crate::attestation::AttestationClass(*class),
                KeyAlgorithm::from_code(*algorithm).ok_or_else(|| bad("unknown key algorithm"))?,
            ),
            _ => return Err(bad("bytes after the key algorithm")),
        };
        Ok(CertificateSummary {
            serial: Serial::from_bytes("serial", serial)?,
            customer_id,
            device_id,
            not_before_s,
            not_after_s,
            public_key,
            revocation,
            attestation,
            key_algorithm,
        })
    }
}

/// What a certificate's status depends on at a moment: its revocation's reason, and where the
/// moment falls in its validity. Certificates are counted by it (`Store::count_by_standing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Standing {
    pub revocation: Option<RevocationReason>,
    /// The moment is before notBefore.
    pub not_yet_valid: bool,
    /// The moment is at or after notAfter.
    pub expired: bool,
}

impl Standing {
    /// Where `summary` stands at `now_s`.
    pub fn of(summary: &CertificateSummary, now_s: i64) -> Standing {
        Standing {
            revocation: summary.revocation.map(|r| r.reason),
            not_yet_valid: now_s < summary.not_before_s,
            expired: now_s >= summary.not_after_s,
        }
    }
}

/// A revoked certificate as the CRL needs it, kept in its own index so building a CRL reads
/// only revoked certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedEntry {
    pub serial: Serial,
    pub revocation: Revocation,
    pub not_after_s: i64,
    /// Which hierarchy's CRL lists it: the SM2 CA's for SM2 device keys, else the P-256
    /// CA's (absent in entries written before SM2).
    #[serde(default, skip_serializing_if = "KeyAlgorithm::is_p256")]
    pub key_algorithm: KeyAlgorithm,
    /// An upstream CA issued it (RA mode): payra's own CRL does not list it, and the
    /// revocation is brought to the upstream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub issued_upstream: bool,
}

/// A revocation payra brings to the upstream CA (RA mode), and how far it got. The
/// revocation itself is in payra's records and effective there at once; this is the upstream's
/// side of it, retried until confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamRevocation {
    pub serial: Serial,
    /// The revocation as payra recorded it (the reason sent upstream).
    pub revocation: Revocation,
    /// The certificate's authorityKeyIdentifier, hex (some upstreams key records by it).
    pub authority_key_id_hex: String,
    /// When the upstream confirmed it; `None` while pending.
    pub confirmed_at_s: Option<i64>,
    /// Attempts so far, the last one's time and, if it failed, why.
    pub attempts: u32,
    pub last_attempt_at_s: Option<i64>,
    pub last_error: Option<String>,
    /// A certificate the upstream issued for an enrollment that did not complete (its token
    /// went to a concurrent request, or the store failed): payra has no record of it and
    /// revokes it upstream as cessationOfOperation.
    #[serde(default)]
    pub orphan: bool,
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
    /// The key's algorithm, and so the hierarchy that signed the certificate (absent: P-256,
    /// as in every record written before SM2).
    #[serde(default, skip_serializing_if = "KeyAlgorithm::is_p256")]
    pub key_algorithm: KeyAlgorithm,
    /// The certificate, base64 (standard alphabet) DER.
    pub certificate_b64: String,
    pub revocation: Option<Revocation>,
    pub renewed_from: Option<Serial>,
    pub superseded_by: Option<Serial>,
    /// The opaque reference the certificate carries instead of the customer and device ids
    /// (32 hex digits, random per enrollment, kept by renewals). `None` for certificates
    /// issued before payra stopped putting ids into certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_ref: Option<String>,
    /// What the enrollment's attestation proved about the key; `None` when it carried none
    /// (or was issued before payra checked attestations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<crate::attestation::Attestation>,
    /// An upstream CA issued it (RA mode, `[ca] mode = "upstream"`); payra's own CA otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub issued_upstream: bool,
}

impl CertificateRecord {
    /// The certificate DER; an error (never an empty certificate) if the stored base64 is
    /// damaged.
    pub fn certificate_der(&self) -> crate::error::Result<Vec<u8>> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&self.certificate_b64)
            .map_err(|e| {
                crate::error::Error::internal(format!(
                    "the stored certificate of serial {} is not base64: {e}",
                    self.serial
                ))
            })
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
    /// Why a verified device signature counted for less than tier A's certificate (its key's
    /// attestation did not meet the policy then in force); absent when it counted fully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_factor_note: Option<String>,
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
        assert_eq!(cert.certificate_der().unwrap(), vec![0, 1, 2]);
        let damaged = CertificateRecord {
            certificate_b64: "AA!C".into(),
            ..cert.clone()
        };
        let refused = damaged.certificate_der().unwrap_err().to_string();
        assert!(
            refused.contains("internal"),
            "a damaged record is an error, never an empty certificate: {refused}"
        );

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

    /// The binary summary of version 1, byte for byte. If this fails, stored summaries no
    /// longer read: bump the summary version and read both.
    #[test]
    fn golden_v1_summary_round_trips() {
        let summary = CertificateSummary {
            serial: Serial::parse("serial", "4a1b2c3d4e5f60718293a4b5c6d7e8f9").unwrap(),
            customer_id: CustomerId::parse("customer_id", "cust-1").unwrap(),
            device_id: DeviceId::parse("device_id", "dev-1").unwrap(),
            not_before_s: 1_763_999_700,
            not_after_s: 1_795_536_000,
            public_key: [4; 65],
            revocation: Some(Revocation {
                revoked_at_s: 1_764_000_500,
                reason: RevocationReason::CertificateHold,
            }),
            attestation: crate::attestation::AttestationClass::NONE,
            key_algorithm: KeyAlgorithm::P256,
        };
        let golden = format!(
            "01{}{}{}01{}06{}{}",
            "04".repeat(65),
            "0000000069247fd4",
            "000000006b05b480",
            "00000000692482f4",
            "06637573742d31",
            "056465762d31"
        );
        assert_eq!(hex::encode(summary.encode()), golden);
        let bytes = hex::decode(&golden).unwrap();
        assert_eq!(
            CertificateSummary::decode(summary.serial.as_bytes(), &bytes).unwrap(),
            summary
        );
        assert_eq!(
            CertificateSummary::revocation_in(&bytes).unwrap(),
            summary.revocation
        );
        let mut unrevoked = summary.clone();
        unrevoked.revocation = None;
        let encoded = unrevoked.encode();
        assert_eq!(CertificateSummary::revocation_in(&encoded).unwrap(), None);
        assert!(CertificateSummary::revocation_in(&encoded[..91]).is_err());
        assert_eq!(
            CertificateSummary::decode(unrevoked.serial.as_bytes(), &encoded).unwrap(),
            unrevoked
        );
        assert!(CertificateSummary::decode(unrevoked.serial.as_bytes(), &encoded[..40]).is_err());

        // An attested key adds its class as one last byte; the golden form above stays.
        let mut attested = summary.clone();
        attested.attestation = crate::attestation::AttestationClass::new(
            Some(crate::attestation::SecurityLevel::StrongBox),
            true,
        );
        let encoded = attested.encode();
        assert_eq!(hex::encode(&encoded), format!("{golden}86"));
        assert_eq!(
            CertificateSummary::decode(attested.serial.as_bytes(), &encoded).unwrap(),
            attested
        );

        // An SM2 key adds its algorithm after the class (0 when unattested).
        let mut sm2 = summary.clone();
        sm2.key_algorithm = KeyAlgorithm::Sm2;
        let encoded = sm2.encode();
        assert_eq!(hex::encode(&encoded), format!("{golden}0001"));
        assert_eq!(
            CertificateSummary::decode(sm2.serial.as_bytes(), &encoded).unwrap(),
            sm2
        );
        let mut attested_sm2 = attested.clone();
        attested_sm2.key_algorithm = KeyAlgorithm::Sm2;
        let encoded = attested_sm2.encode();
        assert_eq!(hex::encode(&encoded), format!("{golden}8601"));
        assert_eq!(
            CertificateSummary::decode(sm2.serial.as_bytes(), &encoded).unwrap(),
            attested_sm2
        );
        let mut unknown = encoded.clone();
        unknown[encoded.len() - 1] = 7;
        assert!(CertificateSummary::decode(sm2.serial.as_bytes(), &unknown).is_err());
        let mut longer = encoded.clone();
        longer.push(0);
        assert!(CertificateSummary::decode(sm2.serial.as_bytes(), &longer).is_err());
    }
}
