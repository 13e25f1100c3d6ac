//! Checking a device's PKCS#10 request: it must parse, its self-signature must verify (proof
//! of possession) and its key must be EC P-256 or SM2. Only the public key is taken from it.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

use crate::error::{Error, Result};
use crate::model::KeyAlgorithm;

/// Largest CSR accepted, in bytes.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// A device's public key: its algorithm and its uncompressed SEC1 point, checked to be on
/// the algorithm's curve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePublicKey {
    algorithm: KeyAlgorithm,
    point: [u8; 65],
}

impl DevicePublicKey {
    /// Checks that `sec1` is a valid uncompressed P-256 point.
    pub fn from_sec1(sec1: &[u8]) -> Result<Self> {
        Self::new(KeyAlgorithm::P256, sec1)
    }

    /// Checks that `sec1` is a valid uncompressed point on `algorithm`'s curve.
    pub fn new(algorithm: KeyAlgorithm, sec1: &[u8]) -> Result<Self> {
        let curve = algorithm.display_name();
        if sec1.len() != 65 || sec1[0] != 0x04 {
            return Err(Error::invalid(
                "csr_der",
                format!("public key must be an uncompressed {curve} point"),
            ));
        }
        let on_curve = match algorithm {
            KeyAlgorithm::P256 => p256::PublicKey::from_sec1_bytes(sec1).is_ok(),
            KeyAlgorithm::Sm2 => super::sm2::is_sm2_point(sec1),
        };
        if !on_curve {
            return Err(Error::invalid(
                "csr_der",
                format!("public key is not a point on {curve}"),
            ));
        }
        let mut point = [0u8; 65];
        point.copy_from_slice(sec1);
        Ok(DevicePublicKey { algorithm, point })
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The 65-octet uncompressed point.
    pub fn sec1(&self) -> &[u8] {
        &self.point
    }

    /// The 65-octet uncompressed point, as an array.
    pub fn point(&self) -> &[u8; 65] {
        &self.point
    }
}

const ACCEPTED: &str = "only EC P-256 and SM2 keys are";

/// Parses a DER CSR, verifies its self-signature and returns its P-256 or SM2 key. An SM2
/// request is signed SM2-with-SM3 with the default distinguishing id `1234567812345678`
/// (what `openssl req -sm3 -sigopt distid:1234567812345678` makes).
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
            format!("key type {found} is not accepted; {ACCEPTED}"),
        ));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let algorithm = match curve {
        Some(oid) if oid == OID_EC_P256 => KeyAlgorithm::P256,
        Some(oid) if oid.as_bytes() == super::sm2::OID_SM2_CURVE.as_bytes() => KeyAlgorithm::Sm2,
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
                format!("key type {name} is not accepted; {ACCEPTED}"),
            ));
        }
        None => {
            return Err(Error::invalid(
                "csr_der",
                format!("EC key without a named curve is not accepted; {ACCEPTED}"),
            ))
        }
    };
    let key = DevicePublicKey::new(algorithm, &spki.subject_public_key.data)?;
    let no_possession = || {
        Error::invalid(
            "csr_der",
            "signature does not verify with the request's own key (no proof of possession)",
        )
    };
    match algorithm {
        KeyAlgorithm::P256 => csr.verify_signature().map_err(|_| no_possession())?,
        KeyAlgorithm::Sm2 => {
            let signed_with = csr.signature_algorithm.algorithm.as_bytes();
            if signed_with != super::sm2::OID_SM2_WITH_SM3.as_bytes() {
                return Err(Error::invalid(
                    "csr_der",
                    format!(
                        "an SM2 request must be signed SM2-with-SM3 (1.2.156.10197.1.501), not \
                         {}",
                        csr.signature_algorithm.algorithm
                    ),
                ));
            }
            if !super::sm2::verify_der(
                key.sec1(),
                csr.certification_request_info.raw,
                &csr.signature_value.data,
            ) {
                return Err(no_possession());
            }
        }
    }
    Ok(key)
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

    /// `csr` with the bytes at `flips` XORed and, if `truncate`, cut at `cut`.
    fn mutated(
        mut csr: Vec<u8>,
        flips: &[(prop::sample::Index, u8)],
        cut: prop::sample::Index,
        truncate: bool,
    ) -> Vec<u8> {
        for (index, byte) in flips {
            let i = index.index(csr.len());
            csr[i] ^= byte;
        }
        if truncate {
            let len = cut.index(csr.len());
            csr.truncate(len);
        }
        csr
    }

    fn valid_sm2_csr() -> Vec<u8> {
        crate::client::Sm2DeviceKey::generate()
            .csr_der("phone")
            .unwrap()
    }

    #[test]
    fn ok_an_sm2_csr_parses_as_sm2() {
        let key = parse_device_csr(&valid_sm2_csr()).unwrap();
        assert_eq!(key.algorithm(), KeyAlgorithm::Sm2);
        assert!(crate::ca::sm2::is_sm2_point(key.sec1()));
        // A P-256 point is not on SM2, nor the other way round.
        let p256 = parse_device_csr(&valid_csr()).unwrap();
        assert!(DevicePublicKey::new(KeyAlgorithm::Sm2, p256.sec1()).is_err());
        assert!(DevicePublicKey::new(KeyAlgorithm::P256, key.sec1()).is_err());
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
            let csr = mutated(valid_csr(), &flips, cut, truncate);
            if let Ok(key) = parse_device_csr(&csr) {
                prop_assert_eq!(key.sec1().len(), 65);
            }
        }
    }

    proptest! {
        // Each case that parses runs an SM2 check, slow in a debug build: fewer cases.
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The same for an SM2 request: refused or still an SM2 point, never a panic.
        #[test]
        fn mutated_sm2_csr_never_panics(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            static ORIGINAL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let csr = mutated(ORIGINAL.get_or_init(valid_sm2_csr).clone(), &flips, cut, truncate);
            if let Ok(key) = parse_device_csr(&csr) {
                prop_assert_eq!(key.algorithm(), KeyAlgorithm::Sm2);
                prop_assert!(crate::ca::sm2::is_sm2_point(key.sec1()));
            }
        }
    }
}
