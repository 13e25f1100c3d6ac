//! An attestation certificate chain checked against configured trust anchors: names chain,
//! every signature verifies under the next certificate's key, the top certificate is an
//! anchor's key or is signed by one, every certificate is valid at the given time, and none
//! is listed in the status list.

use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use super::{AttestationRefusal, StatusList};

/// The most certificates an attestation chain may hold (Android RKP chains have five).
pub const MAX_CHAIN: usize = 8;
/// The largest certificate accepted in a chain.
pub const MAX_CERTIFICATE: usize = 8 * 1024;

/// A root an attestation chain may end at, known by its public key (Google reissues its
/// roots under one key, so the key is what is trusted, not one certificate).
#[derive(Debug, Clone)]
pub struct TrustAnchor {
    /// Where it came from: `google-hardware-ec-ca1`, a configured file's name, ...
    pub name: String,
    pub subject_der: Vec<u8>,
    pub spki_der: Vec<u8>,
    /// Trusted for software-level attestations only: its private key is public (AOSP's
    /// software attestation roots), so a chain to it proves nothing beyond software.
    pub software_only: bool,
}

impl TrustAnchor {
    /// The anchor of one PEM or DER certificate.
    pub fn from_certificate(name: &str, der: &[u8]) -> Result<TrustAnchor, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("{name}: {e}"))?;
        Ok(TrustAnchor {
            name: name.to_string(),
            subject_der: cert.subject().as_raw().to_vec(),
            spki_der: cert.public_key().raw.to_vec(),
            software_only: false,
        })
    }

    /// Every certificate in a PEM text, as anchors named `name` (with `#n` after the first).
    pub fn from_pem(name: &str, text: &[u8]) -> Result<Vec<TrustAnchor>, String> {
        let blocks = pem::parse_many(text).map_err(|e| format!("{name}: {e}"))?;
        if blocks.is_empty() {
            return Err(format!("{name}: no PEM certificate"));
        }
        blocks
            .iter()
            .enumerate()
            .map(|(i, block)| {
                let label = if i == 0 {
                    name.to_string()
                } else {
                    format!("{name}#{}", i + 1)
                };
                TrustAnchor::from_certificate(&label, block.contents())
            })
            .collect()
    }

    /// SHA-256 of the anchor's SubjectPublicKeyInfo, hex: what a record keeps.
    pub fn key_sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(&self.spki_der))
    }
}

/// Parses a chain, leaf first, within the size limits.
pub fn parse(ders: &[Vec<u8>]) -> Result<Vec<X509Certificate<'_>>, AttestationRefusal> {
    if ders.is_empty() || ders.len() > MAX_CHAIN {
        return Err(AttestationRefusal::Malformed(format!(
            "a chain holds 1 to {MAX_CHAIN} certificates, not {}",
            ders.len()
        )));
    }
    ders.iter()
        .enumerate()
        .map(|(i, der)| {
            if der.len() > MAX_CERTIFICATE {
                return Err(AttestationRefusal::Malformed(format!(
                    "certificate {i} is {} bytes; at most {MAX_CERTIFICATE}",
                    der.len()
                )));
            }
            match X509Certificate::from_der(der) {
                Ok(([], cert)) => Ok(cert),
                Ok(_) => Err(AttestationRefusal::Malformed(format!(
                    "certificate {i} has bytes after its end"
                ))),
                Err(e) => Err(AttestationRefusal::Malformed(format!(
                    "certificate {i} is not an X.509 certificate: {e}"
                ))),
            }
        })
        .collect()
}

/// The serial as Google's status list keys it: Java's `BigInteger.toString(16)`, lowercase
/// hex without leading zeros, `-` before the magnitude of a negative serial.
pub fn status_key(cert: &X509Certificate<'_>) -> String {
    serial_status_key(cert.raw_serial())
}

/// [`status_key`] of a serial's DER content bytes (two's complement, big-endian).
pub fn serial_status_key(raw: &[u8]) -> String {
    let negative = raw.first().is_some_and(|b| b & 0x80 != 0);
    let magnitude: Vec<u8> = if negative {
        // Two's complement: invert and add one.
        let mut bytes: Vec<u8> = raw.iter().map(|b| !b).collect();
        for byte in bytes.iter_mut().rev() {
            let (sum, carry) = byte.overflowing_add(1);
            *byte = sum;
            if !carry {
                break;
            }
        }
        bytes
    } else {
        raw.to_vec()
    };
    let key = normalise_status_key(&hex::encode(magnitude));
    if negative && key != "0" {
        format!("-{key}")
    } else {
        key
    }
}

/// A status list key as payra compares them: lowercase, no leading zeros.
pub fn normalise_status_key(key: &str) -> String {
    let (sign, digits) = match key.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", key),
    };
    let digits = digits.to_ascii_lowercase();
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_string()
    } else {
        format!("{sign}{trimmed}")
    }
}

fn sha1_signed(cert: &X509Certificate<'_>) -> bool {
    use x509_parser::oid_registry::{OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA};
    let oid = &cert.signature_algorithm.algorithm;
    *oid == OID_PKCS1_SHA1WITHRSA || *oid == OID_SHA1_WITH_RSA
}

/// Checks `chain` (leaf first) at `now_s`; returns the anchor it ends at.
///
/// The chain may end with the anchor's own certificate (matched by key) or with a
/// certificate an anchor signed. A certificate matched by key only lends its key: its other
/// fields are not trusted or checked, and it is never the leaf (a one-certificate "chain"
/// bearing an anchor's key proves nothing, since anyone can write such a certificate).
pub fn verify<'a>(
    chain: &[X509Certificate<'_>],
    anchors: &'a [TrustAnchor],
    now_s: i64,
    status: Option<&StatusList>,
) -> Result<&'a TrustAnchor, AttestationRefusal> {
    let at = ASN1Time::from_timestamp(now_s)
        .map_err(|_| AttestationRefusal::Malformed("verification time out of range".into()))?;
    let top = chain
        .last()
        .ok_or_else(|| AttestationRefusal::Malformed("empty chain".into()))?;
    let presented_anchor = anchors.iter().find(|a| a.spki_der == top.public_key().raw);
    let certified = match presented_anchor {
        Some(_) => &chain[..chain.len() - 1],
        None => chain,
    };
    if certified.is_empty() {
        return Err(AttestationRefusal::Malformed(
            "the chain holds only a certificate bearing a trust anchor's key; the attested \
             leaf and its issuers are missing"
                .into(),
        ));
    }
    for (i, cert) in certified.iter().enumerate() {
        let validity = cert.validity();
        if !validity.is_valid_at(at) {
            return Err(AttestationRefusal::Expired(format!(
                "certificate {i} ({}) is valid from {} to {}, not at {}",
                cert.subject(),
                validity.not_before,
                validity.not_after,
                at
            )));
        }
        if let Some(status) = status {
            let key = status_key(cert);
            if let Some(entry) = status.get(&key) {
                return Err(AttestationRefusal::Revoked {
                    serial: key,
                    status: entry.to_string(),
                });
            }
        }
        if sha1_signed(cert) {
            return Err(AttestationRefusal::BadChain(format!(
                "certificate {i} is signed with SHA-1"
            )));
        }
        if cert.signature_algorithm != cert.tbs_certificate.signature {
            return Err(AttestationRefusal::BadChain(format!(
                "certificate {i} names two different signature algorithms"
            )));
        }
    }
    for (i, pair) in chain.windows(2).enumerate() {
        let (cert, issuer) = (&pair[0], &pair[1]);
        if cert.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(AttestationRefusal::BadChain(format!(
                "certificate {i} names issuer {}, but certificate {} is {}",
                cert.issuer(),
                i + 1,
                issuer.subject()
            )));
        }
        // An issuer must be a CA: otherwise any attested device key (which signs whatever
        // its owner asks) could certify a forged leaf below itself. The anchor's own
        // certificate lends only its key.
        let is_anchor = presented_anchor.is_some() && i + 2 == chain.len();
        let constraints = issuer.basic_constraints().ok().flatten().map(|bc| bc.value);
        let is_ca = constraints.is_some_and(|bc| bc.ca);
        // pathLenConstraint: how many CA certificates may follow this issuer toward the
        // leaf (here, certificates 1 to i).
        let path_len_exceeded = constraints
            .and_then(|bc| bc.path_len_constraint)
            .is_some_and(|limit| i as u64 > u64::from(limit));
        let may_sign_certificates = match issuer.key_usage() {
            Ok(Some(usage)) => usage.value.key_cert_sign(),
            Ok(None) => true,
            Err(_) => false,
        };
        if !is_anchor && path_len_exceeded {
            return Err(AttestationRefusal::BadChain(format!(
                "certificate {} ({}) allows fewer CA certificates below it than the chain has",
                i + 1,
                issuer.subject()
            )));
        }
        if !is_anchor && (!is_ca || !may_sign_certificates) {
            return Err(AttestationRefusal::BadChain(format!(
                "certificate {} ({}) issues certificate {i} but is not a CA (basicConstraints \
                 CA and keyCertSign)",
                i + 1,
                issuer.subject()
            )));
        }
        cert.verify_signature(Some(issuer.public_key()))
            .map_err(|e| {
                AttestationRefusal::BadChain(format!(
                    "certificate {i} is not signed by certificate {}: {e}",
                    i + 1
                ))
            })?;
    }
    if let Some(anchor) = presented_anchor {
        return Ok(anchor);
    }
    for anchor in anchors
        .iter()
        .filter(|a| a.subject_der == top.issuer().as_raw())
    {
        let Ok((_, spki)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&anchor.spki_der)
        else {
            continue;
        };
        if top.verify_signature(Some(&spki)).is_ok() {
            return Ok(anchor);
        }
    }
    Err(AttestationRefusal::UnknownRoot(top.issuer().to_string()))
}
