//! What enrollment and renewal share: the device key a CSR may carry, the signature (payra's
//! issuing CA, or the upstream CA in RA mode), the record of the certificate, the answer to
//! the phone.

use super::enrollment::Issued;
use super::Ra;
use crate::ca::{
    issue_device_certificate, issue_sm2_device_certificate, parse_device_csr, SubscriberRef,
};
use crate::error::{Error, Result};
use crate::model::{CustomerId, DeviceId, DeviceInfo, KeyAlgorithm, Serial};
use crate::store::{CertificateRecord, RECORD_VERSION};

/// Whom a device certificate is for: the ids go into payra's record, the reference into the
/// certificate.
pub(crate) struct Holder {
    pub(crate) customer: CustomerId,
    pub(crate) device: DeviceId,
    pub(crate) device_info: DeviceInfo,
    pub(crate) subscriber: SubscriberRef,
}

impl Ra {
    /// Signs a device certificate for `public_key` and builds its record (not yet stored).
    /// payra decides everything in it; see [`issue_device_certificate`].
    ///
    /// In RA mode the upstream CA signs (see [`Ra::sign_upstream`]; this then blocks its
    /// thread for the answer), and `csr_der` is what it is sent.
    pub(super) fn sign_device_certificate(
        &self,
        public_key: &crate::ca::DevicePublicKey,
        csr_der: &[u8],
        holder: Holder,
        renewed_from: Option<Serial>,
        now_s: i64,
    ) -> Result<(CertificateRecord, Vec<u8>)> {
        let Holder {
            customer,
            device,
            device_info,
            subscriber,
        } = holder;
        if let Some(upstream) = &self.policy.upstream {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                Error::internal("an upstream CA is called from outside the runtime")
            })?;
            return runtime.block_on(self.sign_upstream(
                upstream,
                public_key,
                csr_der,
                Holder {
                    customer,
                    device,
                    device_info,
                    subscriber,
                },
                renewed_from,
                now_s,
            ));
        }
        let serial = Serial::time_ordered(self.clock.now_ms());
        let certificate = match (
            public_key.algorithm(),
            &self.ca.sm2,
            &self.policy.sm2_profile,
        ) {
            (KeyAlgorithm::P256, _, _) => issue_device_certificate(
                &self.ca.issuer,
                &self.policy.profile,
                public_key,
                &serial,
                &subscriber,
                now_s,
            )?,
            (KeyAlgorithm::Sm2, Some(sm2), Some(profile)) => issue_sm2_device_certificate(
                &sm2.issuer,
                profile,
                public_key,
                &serial,
                &subscriber,
                now_s,
            )?,
            // `accepted_device_key` lets no SM2 key through without an SM2 CA.
            (KeyAlgorithm::Sm2, _, _) => {
                return Err(Error::FailedPrecondition(
                    "this payra has no SM2 issuing CA".into(),
                ))
            }
        };
        let record = self.device_record(
            serial,
            public_key,
            (customer, device, device_info, subscriber),
            &certificate,
            renewed_from,
            now_s,
        );
        Ok((record, certificate.der))
    }

    /// The record of a device certificate just signed.
    pub(super) fn device_record(
        &self,
        serial: Serial,
        public_key: &crate::ca::DevicePublicKey,
        (customer, device, device_info, subscriber): (
            CustomerId,
            DeviceId,
            DeviceInfo,
            SubscriberRef,
        ),
        certificate: &crate::ca::DeviceCertificate,
        renewed_from: Option<Serial>,
        now_s: i64,
    ) -> CertificateRecord {
        CertificateRecord {
            version: RECORD_VERSION,
            serial,
            customer_id: customer,
            device_id: device,
            device_info,
            subject: certificate.subject.clone(),
            not_before_s: certificate.not_before_s,
            not_after_s: certificate.not_after_s,
            issued_at_s: now_s,
            public_key_hex: hex::encode(public_key.sec1()),
            key_algorithm: public_key.algorithm(),
            certificate_b64: CertificateRecord::encode_der(&certificate.der),
            revocation: None,
            renewed_from,
            superseded_by: None,
            subscriber_ref: Some(subscriber.as_str().to_string()),
            attestation: None,
            issued_upstream: false,
        }
    }

    /// The answer to the phone: the certificate and the chain up to (not including) the root.
    pub(super) fn issued(&self, record: CertificateRecord, certificate_der: Vec<u8>) -> Issued {
        let chain_der = match (record.issued_upstream, &self.policy.upstream) {
            (true, Some(upstream)) => upstream.chain_der.clone(),
            _ => match (record.key_algorithm, &self.ca.sm2) {
                (KeyAlgorithm::Sm2, Some(sm2)) => vec![sm2.issuing_der.clone()],
                _ => vec![self.ca.issuing_der.clone()],
            },
        };
        Issued {
            certificate_der,
            chain_der,
            record,
        }
    }

    /// The device key of `csr_der` (see [`parse_device_csr`]), refused unless
    /// `issuance.key_algorithms` accepts its algorithm.
    pub(super) fn accepted_device_key(&self, csr_der: &[u8]) -> Result<crate::ca::DevicePublicKey> {
        let key = parse_device_csr(csr_der)?;
        if self.policy.upstream.is_some() {
            crate::ca::upstream::check_csr_for_upstream(csr_der)?;
        }
        let accepted = self.policy.key_algorithms.as_deref().unwrap_or(&[]);
        if !accepted.contains(&key.algorithm()) {
            let names: Vec<&str> = accepted.iter().map(|a| a.name()).collect();
            return Err(Error::invalid(
                "csr_der",
                format!(
                    "key type {} is not accepted here (issuance.key_algorithms = {names:?})",
                    key.algorithm()
                ),
            ));
        }
        Ok(key)
    }
}
