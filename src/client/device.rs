//! The phone's side: a device key (P-256, or SM2), its CSR, and its signatures over payment
//! intents and renewal proofs (docs/payment-signature.md).

use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};

use crate::error::{Error, Result};
use crate::wire::proto;

/// A device's P-256 key, as a phone keeps it in its keystore.
pub struct DeviceKey {
    secret: p256::SecretKey,
}

impl DeviceKey {
    /// A fresh random key.
    pub fn generate() -> DeviceKey {
        DeviceKey {
            secret: p256::SecretKey::random(&mut rand::rngs::OsRng),
        }
    }

    /// Reads a PKCS#8 PEM key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<DeviceKey> {
        let secret = p256::SecretKey::from_pkcs8_pem(pem)
            .map_err(|e| Error::invalid("device key", format!("not a PKCS#8 P-256 key: {e}")))?;
        Ok(DeviceKey { secret })
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pkcs8_pem(&self) -> Result<String> {
        let pem = self
            .secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| Error::internal(format!("encoding key: {e}")))?;
        Ok(pem.to_string())
    }

    /// The p256 secret key (for signing).
    pub fn secret(&self) -> &p256::SecretKey {
        &self.secret
    }

    /// A PKCS#10 CSR (DER) for this key. Its subject is informational: payra ignores it.
    pub fn csr_der(&self, device_id: &str) -> Result<Vec<u8>> {
        let der = self
            .secret
            .to_pkcs8_der()
            .map_err(|e| Error::internal(format!("encoding key: {e}")))?;
        let key_pair = rcgen::KeyPair::try_from(der.as_bytes())
            .map_err(|e| Error::internal(format!("loading key: {e}")))?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, device_id);
        let csr = params
            .serialize_request(&key_pair)
            .map_err(|e| Error::internal(format!("building CSR: {e}")))?;
        Ok(csr.der().to_vec())
    }
}

/// Signing payment intents: the device side of docs/payment-signature.md.
impl DeviceKey {
    /// Signs `intent_bytes` as a device must: ECDSA P-256 / SHA-256 over
    /// `"payra.v1.PaymentIntent\n" || intent_bytes`. Returns the DER signature.
    pub fn sign_intent(&self, intent_bytes: &[u8]) -> Vec<u8> {
        use p256::ecdsa::signature::Signer;
        let key = p256::ecdsa::SigningKey::from(&self.secret);
        let signature: p256::ecdsa::Signature =
            key.sign(&crate::ra::signature::signed_message(intent_bytes));
        signature.to_der().as_bytes().to_vec()
    }

    /// The same signature as raw 64-byte r‖s (JOSE style).
    pub fn sign_intent_raw(&self, intent_bytes: &[u8]) -> Vec<u8> {
        use p256::ecdsa::signature::Signer;
        let key = p256::ecdsa::SigningKey::from(&self.secret);
        let signature: p256::ecdsa::Signature =
            key.sign(&crate::ra::signature::signed_message(intent_bytes));
        signature.to_bytes().to_vec()
    }

    /// A `RenewalProof` for renewing the certificate `current_serial` (hex) to `csr_der`,
    /// signed at `now_s` (Unix seconds): for a certificate an upstream CA issued (RA mode),
    /// which payra's TLS listener does not accept as a client certificate. ECDSA P-256 with
    /// SHA-256, DER.
    pub fn renewal_proof(
        &self,
        current_serial: &str,
        csr_der: &[u8],
        now_s: i64,
    ) -> Result<proto::RenewalProof> {
        use p256::ecdsa::signature::Signer;
        let key = p256::ecdsa::SigningKey::from(&self.secret);
        renewal_proof(current_serial, csr_der, now_s, |message| {
            let signature: p256::ecdsa::Signature = key.sign(message);
            signature.to_der().as_bytes().to_vec()
        })
    }
}

/// A device's SM2 key (GB/T 32918), for phones that use the national algorithms: it enrolls
/// from payra's SM2 issuing CA, signs payments with SM2/SM3 and renews by
/// [`Sm2DeviceKey::renewal_proof`]. Every signature uses the default distinguishing id
/// `1234567812345678`.
pub struct Sm2DeviceKey {
    secret: sm2::SecretKey,
    signing: sm2::dsa::SigningKey,
}

impl Sm2DeviceKey {
    /// A fresh random key.
    pub fn generate() -> Sm2DeviceKey {
        Self::from_secret(sm2::SecretKey::random(&mut rand::rngs::OsRng))
            .unwrap_or_else(|_| Self::generate())
    }

    fn from_secret(secret: sm2::SecretKey) -> Result<Sm2DeviceKey> {
        let signing = sm2::dsa::SigningKey::new(crate::ca::sm2::DEFAULT_DISTID, &secret)
            .map_err(|e| Error::invalid("device key", format!("not an SM2 signing key: {e}")))?;
        Ok(Sm2DeviceKey { secret, signing })
    }

    /// Reads a PKCS#8 PEM SM2 key (what `openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:SM2` writes).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Sm2DeviceKey> {
        use sm2::pkcs8::DecodePrivateKey;
        let secret = sm2::SecretKey::from_pkcs8_pem(pem)
            .map_err(|e| Error::invalid("device key", format!("not a PKCS#8 SM2 key: {e}")))?;
        Self::from_secret(secret)
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pkcs8_pem(&self) -> Result<String> {
        use sm2::pkcs8::EncodePrivateKey;
        let pem = self
            .secret
            .to_pkcs8_pem(sm2::pkcs8::LineEnding::LF)
            .map_err(|e| Error::internal(format!("encoding key: {e}")))?;
        Ok(pem.to_string())
    }

    /// The public key as an uncompressed point (65 bytes).
    pub fn public_point(&self) -> [u8; 65] {
        let point = sm2::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(
            &self.secret.public_key(),
            false,
        );
        let mut out = [0u8; 65];
        out.copy_from_slice(point.as_bytes());
        out
    }

    /// An SM2 signature (SM3, the default id) over `message`, DER.
    fn sign_der(&self, message: &[u8]) -> Vec<u8> {
        use sm2::dsa::signature::RandomizedSigner;
        let signature: sm2::dsa::Signature =
            self.signing.sign_with_rng(&mut rand::rngs::OsRng, message);
        crate::ca::sm2::signature_to_der(&signature).unwrap_or_default()
    }

    /// A PKCS#10 CSR (DER) for this key, signed SM2-with-SM3 as `openssl req -sm3 -sigopt
    /// distid:1234567812345678` signs one. Its subject is informational: payra ignores it.
    pub fn csr_der(&self, device_id: &str) -> Result<Vec<u8>> {
        use der::Encode;
        let internal = |e: der::Error| Error::internal(format!("building CSR: {e}"));
        let subject = crate::ca::sm2::name(&format!("CN={device_id}"))
            .map_err(|_| Error::invalid("device_id", "cannot be a certificate subject"))?;
        let info = x509_cert::request::CertReqInfo {
            version: x509_cert::request::Version::V1,
            subject,
            public_key: crate::ca::sm2::sm2_public_key_info(&self.public_point())?,
            attributes: Default::default(),
        };
        let signature = self.sign_der(&info.to_der().map_err(internal)?);
        x509_cert::request::CertReq {
            info,
            algorithm: crate::ca::sm2::sm2_with_sm3(),
            signature: der::asn1::BitString::from_bytes(&signature).map_err(internal)?,
        }
        .to_der()
        .map_err(internal)
    }

    /// Signs `intent_bytes` as an SM2 device must (docs/payment-signature.md): SM2 with SM3
    /// and the default id over `"payra.v1.PaymentIntent\n" || intent_bytes`. DER.
    pub fn sign_intent(&self, intent_bytes: &[u8]) -> Vec<u8> {
        self.sign_der(&crate::ra::signature::signed_message(intent_bytes))
    }

    /// A `RenewalProof` for renewing the certificate `current_serial` (hex) to `csr_der`,
    /// signed at `now_s` (Unix seconds).
    pub fn renewal_proof(
        &self,
        current_serial: &str,
        csr_der: &[u8],
        now_s: i64,
    ) -> Result<proto::RenewalProof> {
        renewal_proof(current_serial, csr_der, now_s, |message| {
            self.sign_der(message)
        })
    }
}

/// A `RenewalProof` of the certificate `current_serial` (hex) for `csr_der` at `now_s`, signed
/// by `sign` over [`crate::ra::renewal_proof_message`].
fn renewal_proof(
    current_serial: &str,
    csr_der: &[u8],
    now_s: i64,
    sign: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<proto::RenewalProof> {
    let serial = crate::model::Serial::parse("current_serial", current_serial)?;
    let message = crate::ra::renewal_proof_message(&serial, now_s, csr_der);
    Ok(proto::RenewalProof {
        current_serial: serial.to_hex(),
        signed_at_unix_s: now_s,
        signature: sign(&message),
    })
}
