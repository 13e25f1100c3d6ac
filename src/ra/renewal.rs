//! Renewal (BRIEF flow 3): a device with a valid certificate gets a new one for a new CSR,
//! proven by that certificate over mutual TLS, or for an SM2 certificate by a renewal proof.

use super::status::{CertificateStatus, StatusView};
use super::Ra;
use crate::error::{Error, Result};
use crate::model::{DeviceInfo, KeyAlgorithm, Serial};
use crate::store::{Actor, AuditEvent, CertificateRecord, RevokeRejection};

use super::enrollment::Issued;
use super::signing::Holder;
use crate::ca::SubscriberRef;

/// A parsed `Renew` request; the current certificate comes from mutual TLS.
#[derive(Debug, Clone)]
pub struct RenewRequest {
    pub current: Serial,
    pub csr_der: Vec<u8>,
    /// `None` keeps the device info on record.
    pub device_info: Option<DeviceInfo>,
    /// For an SM2 certificate: the caller's proof that it holds the certificate's key (it
    /// cannot present the certificate over TLS). `None`: the caller presented `current` over
    /// mutual TLS.
    pub proof: Option<RenewalProof>,
    /// The caller's address: proofs that fail count toward its enrollment failure limit.
    pub peer: Option<std::net::IpAddr>,
}

/// The current SM2 certificate's signature over what a renewal asks for (proto
/// `RenewalProof`; see [`renewal_proof_message`]).
#[derive(Debug, Clone)]
pub struct RenewalProof {
    pub signed_at_s: i64,
    pub signature: Vec<u8>,
}

/// The upstream claim of a renewal of `serial` (never 32 octets long, so never a token hash).
fn renewal_claim_key(serial: &Serial) -> Vec<u8> {
    let mut key = b"renew:".to_vec();
    key.extend_from_slice(serial.as_bytes());
    key
}

/// The bytes a [`RenewalProof`] signs: `"payra.v1.RenewalProof\n" || serial (hex) || "\n" ||
/// signed_at_s (decimal) || "\n" || csr_der`.
pub fn renewal_proof_message(serial: &Serial, signed_at_s: i64, csr_der: &[u8]) -> Vec<u8> {
    let mut message = format!(
        "payra.v1.RenewalProof\n{}\n{signed_at_s}\n",
        serial.to_hex()
    )
    .into_bytes();
    message.extend_from_slice(csr_der);
    message
}

impl Ra {
    /// Renews a device certificate: the device proves its current certificate over mutual TLS
    /// and sends a new CSR (a new key is allowed). The new certificate names the same customer
    /// and device; the old one is revoked as superseded in the same transaction. Only a valid
    /// (unexpired, unrevoked) certificate can renew; anything else enrolls again.
    pub fn renew(&self, actor: &Actor, request: RenewRequest) -> Result<Issued> {
        if let Some(info) = &request.device_info {
            info.validate()?;
        }
        if request.proof.is_some() && request.device_info.is_some() {
            return Err(Error::invalid(
                "device_info",
                "is not covered by a RenewalProof, so a renewal by proof keeps the device info \
                 on record; leave it out",
            ));
        }
        let now_s = self.clock.now_s();
        let now_ms = self.clock.now_ms();
        // A caller with a proof has shown nothing yet: each proof costs an SM2 check (about
        // 0.4 ms), so an address whose proofs keep failing is turned away before any check,
        // as one guessing enrollment tokens is, and every failure below counts.
        let by_proof = request.proof.is_some();
        let failed = |refusal: Error| {
            if let (true, Some(peer)) = (by_proof, request.peer) {
                self.enroll_throttle.record_failure(peer, now_ms);
            }
            refusal
        };
        if let (true, Some(peer)) = (by_proof, request.peer) {
            if let Some(until_ms) = self.enroll_throttle.blocked_until(peer, now_ms) {
                self.metrics.enroll_throttled.inc();
                return Err(Error::ResourceExhausted(format!(
                    "too many failed enrollment and renewal attempts from {peer}; retry after {}",
                    crate::model::moment_ms(until_ms)
                )));
            }
        }
        let current = self.store.certificate(&request.current)?.ok_or_else(|| {
            failed(Error::Unauthenticated(format!(
                "certificate {} is not a payra device certificate on record",
                request.current
            )))
        })?;
        match (&request.proof, current.key_algorithm) {
            (None, _) => {}
            (Some(proof), KeyAlgorithm::Sm2) => self
                .check_renewal_proof(&current, &request.csr_der, proof, now_s)
                .map_err(failed)?,
            // An upstream certificate is not one payra's TLS listener trusts, so its device
            // proves it by a proof as an SM2 one does.
            (Some(proof), KeyAlgorithm::P256) if current.issued_upstream => self
                .check_renewal_proof(&current, &request.csr_der, proof, now_s)
                .map_err(failed)?,
            (Some(_), KeyAlgorithm::P256) => {
                return Err(failed(Error::Unauthenticated(format!(
                    "certificate {} is an EC P-256 certificate: renew by presenting it over \
                     mutual TLS (a RenewalProof is for SM2 certificates)",
                    current.serial
                ))))
            }
        }
        match StatusView::of(&current, now_s).status {
            CertificateStatus::Valid => {}
            CertificateStatus::Expired => {
                return Err(Error::Unauthenticated(format!(
                    "certificate {} expired at {}; enroll again with a new token",
                    current.serial,
                    crate::model::moment(current.not_after_s)
                )))
            }
            CertificateStatus::NotYetValid => {
                return Err(Error::Unauthenticated(format!(
                    "certificate {} is not valid yet",
                    current.serial
                )))
            }
            other => {
                return Err(Error::Unauthenticated(format!(
                    "certificate {} is {:?} and cannot renew; enroll again with a new token",
                    current.serial, other
                )))
            }
        }
        self.check_renewal_rate(&current, now_s)?;
        // The CSR's own signature is checked once the caller has proven the certificate.
        let public_key = self.accepted_device_key(&request.csr_der)?;
        // RA mode: one renewal of a certificate at a time goes upstream.
        let _upstream_claim = match self.policy.upstream {
            Some(_) => Some(self.upstream_claims.claim(
                renewal_claim_key(&current.serial),
                "this certificate's renewal",
            )?),
            None => None,
        };
        // A renewal may keep its key; a new key must not be another holder's.
        let _key_claim = self.keys_in_flight.claim(
            self.store.as_ref(),
            public_key.point(),
            &current.customer_id,
            &current.device_id,
            now_s,
        )?;
        let holder = Holder {
            customer: current.customer_id.clone(),
            device: current.device_id.clone(),
            device_info: request
                .device_info
                .unwrap_or_else(|| current.device_info.clone()),
            // A renewal keeps the lineage's reference (a certificate from before references
            // gets its first one).
            subscriber: current
                .subscriber_ref
                .as_deref()
                .and_then(SubscriberRef::parse)
                .unwrap_or_else(SubscriberRef::random),
        };
        let (mut record, certificate_der) = self.sign_device_certificate(
            &public_key,
            &request.csr_der,
            holder,
            Some(current.serial.clone()),
            now_s,
        )?;
        // An attestation proves where one key lives: it carries over only to the same key. A
        // new key is unattested until a new enrollment (with a token) attests it.
        let same_key = record.public_key_hex == current.public_key_hex
            && record.key_algorithm == current.key_algorithm;
        if same_key {
            record.attestation = current.attestation.clone();
        }
        let audit = AuditEvent::new(
            self.clock.now_ms(),
            actor,
            "certificate.renewed",
            record.serial.to_hex(),
            match (&current.attestation, same_key) {
                (Some(_), false) => format!(
                    "supersedes {}; new key, so the old key's attestation does not carry over",
                    current.serial
                ),
                _ if by_proof => format!(
                    "supersedes {}; proven by a renewal proof signed with its key",
                    current.serial
                ),
                _ => format!("supersedes {}", current.serial),
            },
        );
        let renewed = self.store.renew(&current.serial, &record, now_s, &audit);
        // The renewed certificate is superseded, or was revoked meanwhile, or the change
        // committed and failed its sync: whichever, no verification may find it cached valid.
        self.cache.invalidate(std::slice::from_ref(&current.serial));
        if !matches!(renewed, Ok(Ok(()))) && record.issued_upstream {
            // An upstream certificate no record holds is revoked upstream. (Its signing ran
            // on this blocking thread in the runtime, as this does.)
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.block_on(self.uncommitted_upstream(&record));
            }
        }
        match renewed? {
            Ok(()) => {}
            Err(RevokeRejection::AlreadyRevoked(serial, _)) => {
                return Err(Error::Unauthenticated(format!(
                    "certificate {serial} was revoked meanwhile; enroll again with a new token"
                )))
            }
            Err(other) => return Err(Error::internal(format!("renew: {other:?}"))),
        }
        self.revocations_stored();
        self.metrics
            .certificates_issued
            .with_label_values(&["renew"])
            .inc();
        tracing::info!(
            old = %current.serial,
            new = %record.serial,
            device = %record.device_id,
            "certificate renewed"
        );
        Ok(self.issued(record, certificate_der))
    }
}

impl Ra {
    /// Refuses a renewal when `current`'s lineage was renewed `renewals_per_day` times in
    /// the last 24 hours. Walks back along `renewed_from`, reading at most the limit plus one
    /// records; an operator who must let a device through gives it an enrollment token (a
    /// new enrollment starts a new lineage).
    fn check_renewal_rate(&self, current: &CertificateRecord, now_s: i64) -> Result<()> {
        let limit = self.policy.renewals_per_day as usize;
        let window_start = now_s - 86_400;
        let mut renewals = Vec::new();
        let mut cursor = current.clone();
        while cursor.issued_at_s > window_start && renewals.len() < limit {
            let Some(previous) = cursor.renewed_from.clone() else {
                break;
            };
            renewals.push(cursor.issued_at_s);
            match self.store.certificate(&previous)? {
                Some(record) => cursor = record,
                None => break,
            }
        }
        if renewals.len() < limit {
            return Ok(());
        }
        self.metrics.renewals_refused.inc();
        // The oldest counted renewal leaves the window first.
        let retry_at_s = renewals.last().copied().unwrap_or(now_s) + 86_400;
        tracing::warn!(serial = %current.serial, device = %current.device_id, "renewal refused: daily limit");
        Err(Error::ResourceExhausted(format!(
            "this device's certificate was renewed {limit} times in the last 24 hours, the most \
             allowed (issuance.renewals_per_day); retry after {}, or enroll again with a new \
             enrollment token",
            crate::model::moment(retry_at_s)
        )))
    }

    /// Checks an SM2 certificate's renewal proof: signed within the verification skew of
    /// now, by `current`'s key, over the serial, the time and the CSR.
    fn check_renewal_proof(
        &self,
        current: &CertificateRecord,
        csr_der: &[u8],
        proof: &RenewalProof,
        now_s: i64,
    ) -> Result<()> {
        let skew_s = self.policy.ledger.skew_ms / 1000;
        if proof.signed_at_s.abs_diff(now_s) > skew_s.unsigned_abs() {
            return Err(Error::Unauthenticated(format!(
                "the renewal proof was signed at {}, more than {skew_s} s from payra's clock ({}); \
                 sign it again with the current time",
                crate::model::moment(proof.signed_at_s),
                crate::model::moment(now_s)
            )));
        }
        let message = renewal_proof_message(&current.serial, proof.signed_at_s, csr_der);
        let key = hex::decode(&current.public_key_hex).unwrap_or_default();
        if proof.signature.len() > super::signature::MAX_SIGNATURE_BYTES
            || !super::signature::verify_message(
                current.key_algorithm,
                &key,
                &message,
                &proof.signature,
            )
        {
            tracing::warn!(serial = %current.serial, "renewal proof does not verify");
            let algorithm = match current.key_algorithm {
                KeyAlgorithm::Sm2 => "SM2 with SM3, distinguishing id 1234567812345678",
                KeyAlgorithm::P256 => "ECDSA P-256 with SHA-256",
            };
            return Err(Error::Unauthenticated(format!(
                "the renewal proof does not verify with the key of certificate {} ({algorithm}, \
                 over \"payra.v1.RenewalProof\\n\" || serial || \"\\n\" || signed_at || \"\\n\" \
                 || csr_der)",
                current.serial
            )));
        }
        Ok(())
    }
}
