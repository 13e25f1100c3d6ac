//! Checking a device's PKCS#10 request: it must parse, its self-signature must verify (proof
//! of possession) and its key must be EC P-256. Only the public key is taken from it.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

use crate::error::{Error, Result};

/// Largest CSR accepted, in bytes.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// A device's P-256 public key as an uncompressed SEC1 point, checked to be on the curve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePublicKey([u8; 65]);

impl DevicePublicKey {
    /// Checks that `sec1` is a valid uncompressed P-256 point.
    pub fn from_sec1(sec1: &[u8]) -> Result<Self> {
        if sec1.len() != 65 || sec1[0] != 0x04 {
            return Err(Error::invalid(
                "csr_der",
                "public key must be an uncompressed P-256 point",
            ));
        }
        p256::PublicKey::from_sec1_bytes(sec1)
            .map_err(|_| Error::invalid("csr_der", "public key is not a point on P-256"))?;
        let mut point = [0u8; 65];
        point.copy_from_slice(sec1);
        Ok(DevicePublicKey(point))
    }

    /// The 65-octet uncompressed point.
    pub fn sec1(&self) -> &[u8] {
        &self.0
    }

    /// The 65-octet uncompressed point, as an array.
    pub fn point(&self) -> &[u8; 65] {
        &self.0
    }
}

/// Parses a DER CSR, verifies its self-signature and returns its P-256 key.
///
/// Fails with `InvalidArgument` on field `csr_der` naming what is wrong: size, encoding,
/// signature, or the key type found.
pub fn parse_device_csr(der: &[u8]) -> Result<DevicePublicKey> {
    if der.is_empty() {
        return Err(Error::invalid("csr_der", "is required"));
    }
    if der.len() > MAX_CSR_BYTES {
        return Err(Error::invalid(
            "csr_der",
            format!("is {} bytes; at most {MAX_CSR_BYTES} allowed", der.len()),
        ));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|_| Error::invalid("csr_der", "is not a DER PKCS#10 certification request"))?;
    if !rest.is_empty() {
        return Err(Error::invalid(
            "csr_der",
            "has trailing bytes after the request",
        ));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        let found = if *algorithm == OID_PKCS1_RSAENCRYPTION {
            let bits = match spki.parsed() {
                Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa.key_size().to_string(),
                _ => "?".to_string(),
            };
            format!("RSA-{bits}")
        } else if *algorithm == OID_SIG_ED25519 {
            "Ed25519".to_string()
        } else {
            format!("algorithm {algorithm}")
        };
        return Err(Error::invalid(
            "csr_der",
            format!("key type {found} is not accepted; only EC P-256 keys are"),
        ));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    match curve {
        Some(oid) if oid == OID_EC_P256 => {}
        Some(oid) => {
            let name = if oid == OID_NIST_EC_P384 {
                "EC P-384".to_string()
            } else if oid == OID_NIST_EC_P521 {
                "EC P-521".to_string()
            } else {
                format!("EC curve {oid}")
            };
            return Err(Error::invalid(
                "csr_der",
                format!("key type {name} is not accepted; only EC P-256 keys are"),
            ));
        }
        None => {
            return Err(Error::invalid(
                "csr_der",
                "EC key without a named curve is not accepted; only EC P-256 keys are",
            ))
        }
    }
    csr.verify_signature().map_err(|_| {
        Error::invalid(
            "csr_der",
            "signature does not verify with the request's own key (no proof of possession)",
        )
    })?;
    DevicePublicKey::from_sec1(&spki.subject_public_key.data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn valid_csr() -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn ok_valid_csr_parses() {
        assert_eq!(parse_device_csr(&valid_csr()).unwrap().sec1().len(), 65);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the parser; they are refused naming the field.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
            if let Err(e) = parse_device_csr(&bytes) {
                prop_assert!(e.to_string().starts_with("csr_der"));
            }
        }

        /// A valid request with bytes flipped or cut off is refused or (if the flip missed
        /// everything that matters) still yields a valid P-256 point; never a panic.
        #[test]
        fn mutated_csr_never_panics(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut csr = valid_csr();
            for (index, byte) in flips {
                let i = index.index(csr.len());
                csr[i] ^= byte;
            }
            if truncate {
                let len = cut.index(csr.len());
                csr.truncate(len);
            }
            if let Ok(key) = parse_device_csr(&csr) {
                prop_assert_eq!(key.sec1().len(), 65);
            }
        }
    }
}
