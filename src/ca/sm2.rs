//! The SM2 path (GB/T 32918 / GM/T 0003 signatures with SM3, the GM/T 0015 certificate profile):
//! payra's second CA hierarchy, beside the P-256 one. rcgen cannot sign SM2, so certificates
//! and CRLs are built here with x509-cert and signed through the same [`CaSigner`] seam.
//!
//! Every SM2 signature payra makes or checks uses the default distinguishing id
//! `1234567812345678` (GB/T 35276), the one OpenSSL's `-sigopt distid:` and
//! `-vfyopt distid:` name. Signatures travel as DER `SEQUENCE { r INTEGER, s INTEGER }`
//! (GB/T 35275), as OpenSSL writes them.

use std::sync::Arc;
use std::time::Duration;

use const_oid::db::rfc5280::ID_KP_CLIENT_AUTH;
use const_oid::db::rfc5912::ID_EC_PUBLIC_KEY;
use const_oid::{AssociatedOid, ObjectIdentifier};
use der::asn1::{BitString, GeneralizedTime, Ia5String, OctetString, UintRef, UtcTime};
use der::{Decode, Encode};
use sha1::{Digest, Sha1};
use sm2::dsa::signature::{RandomizedSigner, Verifier};
use sm2::dsa::{Signature, SigningKey, VerifyingKey};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::ext::pkix::{
    AccessDescription, AuthorityInfoAccessSyntax, AuthorityKeyIdentifier, BasicConstraints,
    CrlDistributionPoints, CrlNumber, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
    SubjectKeyIdentifier,
};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, TbsCertificate, Version};

use super::signer::CaSigner;
use crate::error::{Error, Result};
use crate::model::{KeyAlgorithm, RevocationReason};

/// The distinguishing id of every SM2 signature payra makes or checks (GB/T 35276's default).
pub const DEFAULT_DISTID: &str = "1234567812345678";

/// The SM2 curve, as the parameter of an `id-ecPublicKey` key (GM/T 0006).
pub const OID_SM2_CURVE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.301");

/// The signature algorithm SM2-with-SM3 (GM/T 0006).
pub const OID_SM2_WITH_SM3: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.501");

/// The algorithm identifier of SM2-with-SM3 signatures: no parameters, as OpenSSL writes it.
pub fn sm2_with_sm3() -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: OID_SM2_WITH_SM3,
        parameters: None,
    }
}

/// An SM2 signature as DER: two unsigned integers.
#[derive(der::Sequence)]
struct DerSignature<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

/// The DER form of `signature`.
pub fn signature_to_der(signature: &Signature) -> Result<Vec<u8>> {
    let bytes = signature.to_bytes();
    let der_err = |e: der::Error| Error::internal(format!("encoding an SM2 signature: {e}"));
    DerSignature {
        r: UintRef::new(&bytes[..32]).map_err(der_err)?,
        s: UintRef::new(&bytes[32..]).map_err(der_err)?,
    }
    .to_der()
    .map_err(der_err)
}

/// Reads a DER SM2 signature (strict DER, nothing after it, r and s in 1..n-1).
pub fn signature_from_der(der: &[u8]) -> Option<Signature> {
    let parsed = DerSignature::from_der(der).ok()?;
    let (r, s) = (parsed.r.as_bytes(), parsed.s.as_bytes());
    if r.len() > 32 || s.len() > 32 {
        return None;
    }
    let mut bytes = [0u8; 64];
    bytes[32 - r.len()..32].copy_from_slice(r);
    bytes[64 - s.len()..].copy_from_slice(s);
    Signature::from_slice(&bytes).ok()
}

/// The SM2 verifying key of an uncompressed point, with the default distinguishing id.
pub fn verifying_key(point: &[u8]) -> Option<VerifyingKey> {
    if point.len() != 65 || point[0] != 0x04 {
        return None;
    }
    VerifyingKey::from_sec1_bytes(DEFAULT_DISTID, point).ok()
}

/// Whether `point` is an uncompressed point on the SM2 curve.
pub fn is_sm2_point(point: &[u8]) -> bool {
    verifying_key(point).is_some()
}

/// Whether `signature` (DER, or raw 64-byte r‖s) is `key`'s SM2 signature with SM3 over
/// `message`. A 64-byte signature is read as raw r‖s first, then as DER if it starts like a
/// SEQUENCE (a 64-byte DER signature exists: r and s of 30 bytes), as for P-256.
pub fn verify_with(key: &VerifyingKey, message: &[u8], signature: &[u8]) -> bool {
    let check = |parsed: Option<Signature>| parsed.is_some_and(|s| key.verify(message, &s).is_ok());
    if signature.len() == 64 && check(Signature::from_slice(signature).ok()) {
        return true;
    }
    signature.first() == Some(&0x30) && check(signature_from_der(signature))
}

/// Whether the DER signature `der` (nothing else accepted) is `point`'s over `message`: the
/// strict reading for what payra itself and CSRs carry.
pub fn verify_der(point: &[u8], message: &[u8], der: &[u8]) -> bool {
    match (verifying_key(point), signature_from_der(der)) {
        (Some(key), Some(signature)) => key.verify(message, &signature).is_ok(),
        _ => false,
    }
}

/// [`verify_with`] for the key at `point`; false for a point not on the curve.
pub fn verify(point: &[u8], message: &[u8], signature: &[u8]) -> bool {
    verifying_key(point).is_some_and(|key| verify_with(&key, message, signature))
}

/// An SM2 CA key from a PKCS#8 file (what OpenSSL's `genpkey -algorithm EC -pkeyopt
/// ec_paramgen_curve:SM2` writes), signing SM2-with-SM3 with the default distinguishing id.
pub struct Sm2KeyFileSigner {
    key: SigningKey,
    public: [u8; 65],
}

impl Sm2KeyFileSigner {
    /// The key in PKCS#8 DER `pkcs8_der`, refused unless it is an SM2 key.
    pub fn from_pkcs8_der(pkcs8_der: &[u8]) -> Result<Self> {
        use sm2::pkcs8::DecodePrivateKey;
        let secret = sm2::SecretKey::from_pkcs8_der(pkcs8_der).map_err(|e| {
            Error::FailedPrecondition(format!("the SM2 issuing key is not an SM2 key: {e}"))
        })?;
        Self::from_secret(&secret)
    }

    fn from_secret(secret: &sm2::SecretKey) -> Result<Self> {
        let key = SigningKey::new(DEFAULT_DISTID, secret)
            .map_err(|e| Error::internal(format!("SM2 key: {e}")))?;
        let point = sm2::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(
            &secret.public_key(),
            false,
        );
        let public: [u8; 65] = point
            .as_bytes()
            .try_into()
            .map_err(|_| Error::internal("SM2 public key is not 65 bytes"))?;
        Ok(Sm2KeyFileSigner { key, public })
    }

    /// A fresh key and its PKCS#8 PEM (what `payra init` writes).
    pub fn generate() -> Result<(Self, String)> {
        use sm2::pkcs8::EncodePrivateKey;
        let secret = sm2::SecretKey::random(&mut rand::rngs::OsRng);
        let pem = secret
            .to_pkcs8_pem(sm2::pkcs8::LineEnding::LF)
            .map_err(|e| Error::internal(format!("encoding an SM2 key: {e}")))?;
        Ok((Self::from_secret(&secret)?, pem.to_string()))
    }
}

impl CaSigner for Sm2KeyFileSigner {
    fn public_key_sec1(&self) -> &[u8] {
        &self.public
    }

    /// SM2 with SM3 over `message` (ZA || message), a fresh random nonce each time.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        let signature: Signature = self
            .key
            .try_sign_with_rng(&mut rand::rngs::OsRng, message)
            .map_err(|e| Error::internal(format!("SM2 signing failed: {e}")))?;
        signature_to_der(&signature)
    }

    fn algorithm(&self) -> KeyAlgorithm {
        KeyAlgorithm::Sm2
    }
}

fn der_err(e: der::Error) -> Error {
    Error::internal(format!("encoding an SM2 certificate: {e}"))
}

/// A time as RFC 5280 wants it: UTCTime through 2049, GeneralizedTime after.
pub fn x509_time(seconds: i64) -> Result<Time> {
    let seconds = u64::try_from(seconds).map_err(|_| Error::internal("time before 1970"))?;
    let since_epoch = Duration::from_secs(seconds);
    match UtcTime::from_unix_duration(since_epoch) {
        Ok(utc) => Ok(Time::UtcTime(utc)),
        Err(_) => Ok(Time::GeneralTime(
            GeneralizedTime::from_unix_duration(since_epoch).map_err(der_err)?,
        )),
    }
}

/// A name from RFC 4514 text (`CN=…,O=payra`: the most specific attribute first).
pub fn name(rfc4514: &str) -> Result<Name> {
    rfc4514
        .parse()
        .map_err(|e| Error::internal(format!("name {rfc4514:?}: {e}")))
}

/// The SubjectPublicKeyInfo of an SM2 point: `id-ecPublicKey` with the SM2 curve, as
/// OpenSSL 3 and GM/T 0015 write it.
pub fn sm2_public_key_info(point: &[u8; 65]) -> Result<SubjectPublicKeyInfoOwned> {
    Ok(SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: ID_EC_PUBLIC_KEY,
            parameters: Some(der::Any::encode_from(&OID_SM2_CURVE).map_err(der_err)?),
        },
        subject_public_key: BitString::from_bytes(point).map_err(der_err)?,
    })
}

/// The key identifier of a public key: SHA-1 of the point (RFC 5280 4.2.1.2, method 1).
pub fn key_id(point: &[u8]) -> Vec<u8> {
    Sha1::digest(point).to_vec()
}

/// An extension holding `value`'s DER.
fn extension<T: Encode + AssociatedOid>(value: &T, critical: bool) -> Result<Extension> {
    Ok(Extension {
        extn_id: T::OID,
        critical,
        extn_value: OctetString::new(value.to_der().map_err(der_err)?).map_err(der_err)?,
    })
}

fn uri(value: &str) -> Result<GeneralName> {
    Ok(GeneralName::UniformResourceIdentifier(
        Ia5String::new(value).map_err(|e| Error::internal(format!("URI {value:?}: {e}")))?,
    ))
}

/// What an SM2 certificate says, before it is signed.
pub struct CertificateSpec<'a> {
    pub serial: &'a [u8],
    pub subject: Name,
    pub not_before_s: i64,
    pub not_after_s: i64,
    pub subject_key: &'a [u8; 65],
    /// `Some(path length)` for a CA, `None` for an end entity.
    pub ca_path_len: Option<Option<u8>>,
    pub key_usage: &'a [KeyUsages],
    /// clientAuth, for end entities.
    pub client_auth: bool,
    pub uris: &'a [String],
    pub crl_url: Option<&'a str>,
    pub ocsp_url: Option<&'a str>,
}

/// The issuer of an SM2 certificate or CRL: its subject name, its key identifier (the AKI
/// of what it signs) and its signer.
#[derive(Clone)]
pub struct Sm2Issuer {
    pub name: Name,
    pub key_id: Vec<u8>,
    pub signer: Arc<dyn CaSigner>,
}

impl Sm2Issuer {
    /// The issuer whose certificate is `der`, signing with `signer` (whose key must be the
    /// certificate's).
    pub fn from_certificate(der: &[u8], signer: Arc<dyn CaSigner>) -> Result<Sm2Issuer> {
        let cert = Certificate::from_der(der)
            .map_err(|e| Error::FailedPrecondition(format!("SM2 issuing CA certificate: {e}")))?;
        let tbs = &cert.tbs_certificate;
        if tbs.subject_public_key_info.subject_public_key.raw_bytes() != signer.public_key_sec1() {
            return Err(Error::FailedPrecondition(
                "the SM2 issuing key does not match the SM2 issuing CA certificate".into(),
            ));
        }
        let key_id = tbs
            .extensions
            .iter()
            .flatten()
            .find(|ext| ext.extn_id == SubjectKeyIdentifier::OID)
            .and_then(|ext| SubjectKeyIdentifier::from_der(ext.extn_value.as_bytes()).ok())
            .map(|ski| ski.0.as_bytes().to_vec())
            .ok_or_else(|| {
                Error::FailedPrecondition(
                    "the SM2 issuing CA certificate has no subjectKeyIdentifier".into(),
                )
            })?;
        Ok(Sm2Issuer {
            name: tbs.subject.clone(),
            key_id,
            signer,
        })
    }

    /// Signs the certificate `spec` describes (v3, SM2-with-SM3) and returns its DER.
    pub fn sign_certificate(&self, spec: &CertificateSpec<'_>) -> Result<Vec<u8>> {
        let mut extensions = Vec::new();
        if let Some(path_len) = spec.ca_path_len {
            extensions.push(extension(
                &BasicConstraints {
                    ca: true,
                    path_len_constraint: path_len,
                },
                true,
            )?);
        } else {
            extensions.push(extension(
                &BasicConstraints {
                    ca: false,
                    path_len_constraint: None,
                },
                true,
            )?);
        }
        let mut usage = flagset::FlagSet::<KeyUsages>::default();
        for flag in spec.key_usage {
            usage |= *flag;
        }
        extensions.push(extension(&KeyUsage(usage), true)?);
        if spec.client_auth {
            extensions.push(extension(
                &ExtendedKeyUsage(vec![ID_KP_CLIENT_AUTH]),
                false,
            )?);
        }
        extensions.push(extension(
            &SubjectKeyIdentifier(OctetString::new(key_id(spec.subject_key)).map_err(der_err)?),
            false,
        )?);
        extensions.push(extension(
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(self.key_id.clone()).map_err(der_err)?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
            false,
        )?);
        if !spec.uris.is_empty() {
            let names = spec
                .uris
                .iter()
                .map(|u| uri(u))
                .collect::<Result<Vec<_>>>()?;
            extensions.push(extension(&SubjectAltName(names), false)?);
        }
        if let Some(url) = spec.crl_url {
            extensions.push(extension(
                &CrlDistributionPoints(vec![DistributionPoint {
                    distribution_point: Some(DistributionPointName::FullName(vec![uri(url)?])),
                    reasons: None,
                    crl_issuer: None,
                }]),
                false,
            )?);
        }
        if let Some(url) = spec.ocsp_url {
            extensions.push(extension(
                &AuthorityInfoAccessSyntax(vec![AccessDescription {
                    access_method: const_oid::db::rfc5280::ID_AD_OCSP,
                    access_location: uri(url)?,
                }]),
                false,
            )?);
        }
        let tbs = TbsCertificate {
            version: Version::V3,
            serial_number: SerialNumber::new(spec.serial).map_err(der_err)?,
            signature: sm2_with_sm3(),
            issuer: self.name.clone(),
            validity: Validity {
                not_before: x509_time(spec.not_before_s)?,
                not_after: x509_time(spec.not_after_s)?,
            },
            subject: spec.subject.clone(),
            subject_public_key_info: sm2_public_key_info(spec.subject_key)?,
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: Some(extensions),
        };
        let tbs_der = tbs.to_der().map_err(der_err)?;
        let signature = self.signer.sign(&tbs_der)?;
        Certificate {
            tbs_certificate: tbs,
            signature_algorithm: sm2_with_sm3(),
            signature: BitString::from_bytes(&signature).map_err(der_err)?,
        }
        .to_der()
        .map_err(der_err)
    }

    /// Signs a CRL numbered `number` (RFC 5280 5, SM2-with-SM3), listing `entries`.
    pub fn sign_crl(
        &self,
        number: u64,
        this_update_s: i64,
        next_update_s: i64,
        entries: &[super::CrlEntry],
    ) -> Result<Vec<u8>> {
        let revoked = entries
            .iter()
            .map(|entry| {
                // RFC 5280 5.3.1: the unspecified reason code SHOULD be absent.
                let extensions = match entry.reason {
                    RevocationReason::Unspecified => None,
                    other => Some(vec![extension(&super::ocsp::crl_reason(other), false)?]),
                };
                Ok(RevokedCert {
                    serial_number: SerialNumber::new(entry.serial.as_bytes()).map_err(der_err)?,
                    revocation_date: x509_time(entry.revoked_at_s)?,
                    crl_entry_extensions: extensions,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let number_bytes = number.to_be_bytes();
        let tbs = TbsCertList {
            version: Version::V2,
            signature: sm2_with_sm3(),
            issuer: self.name.clone(),
            this_update: x509_time(this_update_s)?,
            next_update: Some(x509_time(next_update_s)?),
            // RFC 5280 5.1.2.6: absent, not empty, when nothing is revoked.
            revoked_certificates: (!revoked.is_empty()).then_some(revoked),
            crl_extensions: Some(vec![
                extension(
                    &AuthorityKeyIdentifier {
                        key_identifier: Some(
                            OctetString::new(self.key_id.clone()).map_err(der_err)?,
                        ),
                        authority_cert_issuer: None,
                        authority_cert_serial_number: None,
                    },
                    false,
                )?,
                extension(
                    &CrlNumber(der::asn1::Uint::new(&number_bytes).map_err(der_err)?),
                    false,
                )?,
            ]),
        };
        let tbs_der = tbs.to_der().map_err(der_err)?;
        let signature = self.signer.sign(&tbs_der)?;
        CertificateList {
            tbs_cert_list: tbs,
            signature_algorithm: sm2_with_sm3(),
            signature: BitString::from_bytes(&signature).map_err(der_err)?,
        }
        .to_der()
        .map_err(der_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_and_raw_signatures_verify_and_others_do_not() {
        let (signer, _) = Sm2KeyFileSigner::generate().unwrap();
        let message = b"payra.v1.PaymentIntent\nintent";
        let der = signer.sign(message).unwrap();
        let point = signer.public_key_sec1().to_vec();
        assert!(verify(&point, message, &der));
        let raw = signature_from_der(&der).unwrap().to_bytes();
        assert!(verify(&point, message, &raw));
        assert!(!verify(&point, b"other", &der));
        let mut flipped = raw.to_vec();
        flipped[10] ^= 1;
        assert!(!verify(&point, message, &flipped));
        // A P-256 point is not an SM2 key.
        let p256 = p256::SecretKey::random(&mut rand::rngs::OsRng)
            .public_key()
            .to_sec1_bytes();
        assert!(!verify(&p256, message, &der));
        assert!(!verify(&[], message, &der));
    }
}
