//! The OCSP responder's ASN.1 side (RFC 6960), with the RustCrypto `x509-ocsp` types: parse a
//! request, and sign a response with the issuing CA's key (the CA answers for itself, so no
//! delegated responder certificate is needed).

use std::sync::Arc;
use std::time::Duration;

use const_oid::db::rfc5912::{ECDSA_WITH_SHA_256, ID_SHA_1, ID_SHA_256};
use const_oid::db::rfc6960::ID_PKIX_OCSP_NONCE;
use der::asn1::{BitString, GeneralizedTime, OctetString};
use der::{Decode, Encode};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use spki::AlgorithmIdentifierOwned;
use x509_cert::ext::pkix::CrlReason;
use x509_cert::ext::Extension;
use x509_cert::Certificate;
use x509_ocsp::ext::Nonce;
use x509_ocsp::{
    BasicOcspResponse, CertId, CertStatus, OcspGeneralizedTime, OcspRequest, OcspResponse,
    ResponderId, ResponseData, RevokedInfo, SingleResponse,
};

use super::signer::CaSigner;
use crate::error::{Error, Result};
use crate::model::{KeyAlgorithm, RevocationReason, Serial};

/// Largest OCSP request accepted, in bytes.
pub const MAX_OCSP_REQUEST_BYTES: usize = 8 * 1024;
/// Most certificates one request may ask about.
pub const MAX_OCSP_CERTS_PER_REQUEST: usize = 16;
/// Accepted nonce lengths (RFC 9654 §2.1: 1 to 128 octets; others are refused).
pub const OCSP_NONCE_LEN: std::ops::RangeInclusive<usize> = 1..=128;

/// What the responder says about one certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OcspStatus {
    Good,
    Revoked {
        revoked_at_s: i64,
        reason: RevocationReason,
    },
    Unknown,
}

/// A parsed request: each certificate it asks about, with its serial when the request names
/// payra's issuing CA, and the nonce to echo.
#[derive(Debug, Clone)]
pub struct ParsedOcspRequest {
    pub items: Vec<(CertId, Option<Serial>)>,
    pub nonce: Option<Nonce>,
}

/// Signs OCSP responses for one issuing CA.
pub struct OcspResponder {
    signer: Arc<dyn CaSigner>,
    sha1_name: Vec<u8>,
    sha1_key: Vec<u8>,
    sha256_name: Vec<u8>,
    sha256_key: Vec<u8>,
    sm3_name: Vec<u8>,
    sm3_key: Vec<u8>,
}

/// SM3 (GM/T 0004) as a CertID hash algorithm, which GM/T OCSP clients use.
const ID_SM3: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.2.156.10197.1.401");

fn der_err(e: der::Error) -> Error {
    Error::internal(format!("OCSP encoding: {e}"))
}

fn generalized(seconds: i64) -> Result<OcspGeneralizedTime> {
    let seconds = u64::try_from(seconds).map_err(|_| Error::internal("time before 1970"))?;
    Ok(OcspGeneralizedTime(
        GeneralizedTime::from_unix_duration(Duration::from_secs(seconds)).map_err(der_err)?,
    ))
}

pub(crate) fn crl_reason(reason: RevocationReason) -> CrlReason {
    match reason {
        RevocationReason::Unspecified => CrlReason::Unspecified,
        RevocationReason::KeyCompromise => CrlReason::KeyCompromise,
        RevocationReason::AffiliationChanged => CrlReason::AffiliationChanged,
        RevocationReason::Superseded => CrlReason::Superseded,
        RevocationReason::CessationOfOperation => CrlReason::CessationOfOperation,
        RevocationReason::CertificateHold => CrlReason::CertificateHold,
        RevocationReason::PrivilegeWithdrawn => CrlReason::PrivilegeWithdrawn,
    }
}

impl OcspResponder {
    /// A responder for the CA whose certificate is `issuing_der`, signing with `signer`.
    pub fn new(issuing_der: &[u8], signer: Arc<dyn CaSigner>) -> Result<OcspResponder> {
        let cert = Certificate::from_der(issuing_der)
            .map_err(|e| Error::internal(format!("issuing certificate: {e}")))?;
        let name = cert.tbs_certificate.subject.to_der().map_err(der_err)?;
        let key = cert
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes()
            .to_vec();
        Ok(OcspResponder {
            signer,
            sha1_name: Sha1::digest(&name).to_vec(),
            sha1_key: Sha1::digest(&key).to_vec(),
            sha256_name: Sha256::digest(&name).to_vec(),
            sha256_key: Sha256::digest(&key).to_vec(),
            sm3_name: sm3::Sm3::digest(&name).to_vec(),
            sm3_key: sm3::Sm3::digest(&key).to_vec(),
        })
    }

    /// The serial `id` asks about, if `id` names this responder's CA.
    fn serial_for(&self, id: &CertId) -> Option<Serial> {
        let (name, key) = if id.hash_algorithm.oid == ID_SHA_1 {
            (&self.sha1_name, &self.sha1_key)
        } else if id.hash_algorithm.oid == ID_SHA_256 {
            (&self.sha256_name, &self.sha256_key)
        } else if id.hash_algorithm.oid == ID_SM3 {
            (&self.sm3_name, &self.sm3_key)
        } else {
            return None;
        };
        if id.issuer_name_hash.as_bytes() != name.as_slice()
            || id.issuer_key_hash.as_bytes() != key.as_slice()
        {
            return None;
        }
        Serial::from_bytes("serial", id.serial_number.as_bytes()).ok()
    }

    /// Parses a DER OCSP request. `None` means a `malformedRequest` answer.
    pub fn parse_request(&self, der: &[u8]) -> Option<ParsedOcspRequest> {
        if der.is_empty() || der.len() > MAX_OCSP_REQUEST_BYTES {
            return None;
        }
        let request = OcspRequest::from_der(der).ok()?;
        let list = &request.tbs_request.request_list;
        if list.is_empty() || list.len() > MAX_OCSP_CERTS_PER_REQUEST {
            return None;
        }
        // RFC 9654: a nonce of 1 to 128 octets, at most one; anything else is malformed
        // rather than echoed (a 1,000-octet nonce would make every answer a reflector).
        let mut nonces = request
            .tbs_request
            .request_extensions
            .iter()
            .flatten()
            .filter(|e| e.extn_id == ID_PKIX_OCSP_NONCE);
        let nonce = match (nonces.next(), nonces.next()) {
            (None, _) => None,
            (Some(extension), None) => {
                let nonce = Nonce::from_der(extension.extn_value.as_bytes()).ok()?;
                if !OCSP_NONCE_LEN.contains(&nonce.0.as_bytes().len()) {
                    return None;
                }
                Some(nonce)
            }
            (Some(_), Some(_)) => return None,
        };
        let items = list
            .iter()
            .map(|r| (r.req_cert.clone(), self.serial_for(&r.req_cert)))
            .collect();
        Some(ParsedOcspRequest { items, nonce })
    }

    /// Signs a successful response: one SingleResponse per requested certificate with the
    /// given statuses, producedAt = thisUpdate = `now_s`, nextUpdate = `now_s + validity_s`,
    /// and the request's nonce echoed.
    pub fn respond(
        &self,
        request: &ParsedOcspRequest,
        statuses: &[OcspStatus],
        now_s: i64,
        validity_s: i64,
    ) -> Result<Vec<u8>> {
        let this_update = generalized(now_s)?;
        let next_update = generalized(now_s + validity_s)?;
        let mut responses = Vec::with_capacity(request.items.len());
        for ((cert_id, _), status) in request.items.iter().zip(statuses) {
            let cert_status = match *status {
                OcspStatus::Good => CertStatus::good(),
                OcspStatus::Unknown => CertStatus::unknown(),
                OcspStatus::Revoked {
                    revoked_at_s,
                    reason,
                } => CertStatus::revoked(RevokedInfo {
                    revocation_time: generalized(revoked_at_s)?,
                    // As in the CRL (RFC 5280 §5.3.1): `unspecified` is said by leaving the
                    // reason out.
                    revocation_reason: match reason {
                        RevocationReason::Unspecified => None,
                        reason => Some(crl_reason(reason)),
                    },
                }),
            };
            responses.push(SingleResponse {
                cert_id: cert_id.clone(),
                cert_status,
                this_update,
                next_update: Some(next_update),
                single_extensions: None,
            });
        }
        let response_extensions = match &request.nonce {
            Some(nonce) => Some(vec![Extension {
                extn_id: ID_PKIX_OCSP_NONCE,
                critical: false,
                extn_value: OctetString::new(nonce.to_der().map_err(der_err)?).map_err(der_err)?,
            }]),
            None => None,
        };
        let tbs = ResponseData {
            version: Default::default(),
            responder_id: ResponderId::ByKey(
                OctetString::new(self.sha1_key.clone()).map_err(der_err)?,
            ),
            produced_at: this_update,
            responses,
            response_extensions,
        };
        let tbs_der = tbs.to_der().map_err(der_err)?;
        let signature = self.signer.sign(&tbs_der)?;
        let basic = BasicOcspResponse {
            tbs_response_data: tbs,
            signature_algorithm: match self.signer.algorithm() {
                KeyAlgorithm::P256 => AlgorithmIdentifierOwned {
                    oid: ECDSA_WITH_SHA_256,
                    parameters: None,
                },
                KeyAlgorithm::Sm2 => super::sm2::sm2_with_sm3(),
            },
            signature: BitString::from_bytes(&signature).map_err(der_err)?,
            certs: None,
        };
        OcspResponse::successful(basic)
            .map_err(der_err)?
            .to_der()
            .map_err(der_err)
    }

    /// The `malformedRequest` answer.
    pub fn malformed() -> Vec<u8> {
        // A fixed, tiny structure: encoding it cannot fail, but fall back to its known bytes.
        OcspResponse::malformed_request()
            .to_der()
            .unwrap_or_else(|_| vec![0x30, 0x03, 0x0a, 0x01, 0x01])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use x509_ocsp::{Request, TbsRequest};

    fn responder() -> (OcspResponder, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        let cert = params.self_signed(&key).unwrap();
        let signer: Arc<dyn CaSigner> =
            Arc::new(crate::ca::KeyFileSigner::from_key_pair(key).unwrap());
        let responder = OcspResponder::new(cert.der(), signer).unwrap();
        let request = OcspRequest {
            tbs_request: TbsRequest {
                version: Default::default(),
                requestor_name: None,
                request_list: vec![Request {
                    req_cert: CertId {
                        hash_algorithm: AlgorithmIdentifierOwned {
                            oid: ID_SHA_1,
                            parameters: None,
                        },
                        issuer_name_hash: OctetString::new(responder.sha1_name.clone()).unwrap(),
                        issuer_key_hash: OctetString::new(responder.sha1_key.clone()).unwrap(),
                        serial_number: x509_cert::serial_number::SerialNumber::new(&[0x42, 1, 2])
                            .unwrap(),
                    },
                    single_request_extensions: None,
                }],
                request_extensions: None,
            },
            optional_signature: None,
        };
        (responder, request.to_der().unwrap())
    }

    #[test]
    fn ok_request_for_our_issuer_names_the_serial() {
        let (responder, der) = responder();
        let parsed = responder.parse_request(&der).unwrap();
        assert_eq!(parsed.items.len(), 1);
        assert_eq!(parsed.items[0].1.as_ref().unwrap().to_hex(), "420102");
        let response = responder
            .respond(&parsed, &[OcspStatus::Good], 1_800_000_000, 3600)
            .unwrap();
        let decoded = OcspResponse::from_der(&response).unwrap();
        assert_eq!(
            decoded.response_status,
            x509_ocsp::OcspResponseStatus::Successful
        );
    }

    /// The test request with `nonces` as its nonce extensions.
    fn request_with_nonces(nonces: &[Vec<u8>]) -> (OcspResponder, Vec<u8>) {
        let (responder, der) = responder();
        let mut request = OcspRequest::from_der(&der).unwrap();
        request.tbs_request.request_extensions = Some(
            nonces
                .iter()
                .map(|nonce| Extension {
                    extn_id: ID_PKIX_OCSP_NONCE,
                    critical: false,
                    extn_value: OctetString::new(
                        Nonce(OctetString::new(nonce.clone()).unwrap())
                            .to_der()
                            .unwrap(),
                    )
                    .unwrap(),
                })
                .collect(),
        );
        (responder, request.to_der().unwrap())
    }

    #[test]
    fn nonce_lengths_follow_rfc_9654() {
        for (len, accepted) in [(0, false), (1, true), (32, true), (128, true), (129, false)] {
            let (responder, der) = request_with_nonces(&[vec![7; len]]);
            let parsed = responder.parse_request(&der);
            assert_eq!(parsed.is_some(), accepted, "{len} octets");
            if let Some(parsed) = parsed {
                assert_eq!(parsed.nonce.unwrap().0.as_bytes().len(), len);
            }
        }
        let (responder, der) = request_with_nonces(&[vec![1; 1000]]);
        assert!(responder.parse_request(&der).is_none(), "1,000 octets");
        let (responder, der) = request_with_nonces(&[vec![1; 16], vec![2; 16]]);
        assert!(responder.parse_request(&der).is_none(), "two nonces");
    }

    #[test]
    fn unspecified_reason_is_left_out_as_in_the_crl() {
        let (responder, der) = responder();
        let parsed = responder.parse_request(&der).unwrap();
        for (reason, expected) in [
            (RevocationReason::Unspecified, None),
            (
                RevocationReason::KeyCompromise,
                Some(CrlReason::KeyCompromise),
            ),
        ] {
            let status = OcspStatus::Revoked {
                revoked_at_s: 1_800_000_000,
                reason,
            };
            let der = responder
                .respond(&parsed, &[status], 1_800_000_100, 3600)
                .unwrap();
            let response = OcspResponse::from_der(&der).unwrap();
            let basic =
                BasicOcspResponse::from_der(response.response_bytes.unwrap().response.as_bytes())
                    .unwrap();
            match &basic.tbs_response_data.responses[0].cert_status {
                CertStatus::Revoked(info) => assert_eq!(info.revocation_reason, expected),
                other => panic!("{other:?}"),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let (responder, _) = responder();
            let _ = responder.parse_request(&bytes);
        }

        #[test]
        fn mutated_request_never_panics(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let (responder, mut der) = responder();
            for (index, byte) in flips {
                let i = index.index(der.len());
                der[i] ^= byte;
            }
            if let Some(parsed) = responder.parse_request(&der) {
                let statuses = vec![OcspStatus::Unknown; parsed.items.len()];
                prop_assert!(responder.respond(&parsed, &statuses, 1_800_000_000, 3600).is_ok());
            }
        }
    }
}
