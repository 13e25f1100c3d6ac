//! The Rust client of payra: used by the CLI and the tests, and the reference for SDK authors.
//! [`DeviceKey`] is the device side (key generation, CSR); [`Client`] speaks gRPC over TLS.

use std::path::{Path, PathBuf};

use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Status;

use crate::error::{Error, Result};
use crate::wire::proto;

pub use crate::wire::proto::DeviceInfo as ProtoDeviceInfo;

/// Which certificate the client presents.
#[derive(Debug, Clone)]
pub enum Credential {
    /// No client certificate (a phone before enrollment).
    None,
    /// A PEM certificate and its PKCS#8 PEM key.
    Files { certificate: PathBuf, key: PathBuf },
}

impl Credential {
    /// The `operator` or `service` credential that `payra init` wrote into `certs_dir`.
    pub fn role(certs_dir: &Path, role: &str) -> Credential {
        Credential::Files {
            certificate: certs_dir.join(format!("{role}.pem")),
            key: certs_dir.join(format!("{role}.key")),
        }
    }

    /// The credential `payra device enroll` wrote into `device_dir`.
    pub fn device(device_dir: &Path) -> Credential {
        Credential::Files {
            certificate: device_dir.join("device.pem"),
            key: device_dir.join("device.key"),
        }
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::FailedPrecondition(format!("{}: {e}", path.display())))
}

/// A connection to a payra server.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
}

impl Client {
    /// Connects to `server` (`https://host:port`), trusting `root_ca` (PEM), presenting
    /// `credential`. The server certificate must be valid for `localhost` or the host given.
    pub async fn connect(server: &str, root_ca: &Path, credential: &Credential) -> Result<Client> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(root_ca)?));
        let host = server
            .trim_start_matches("https://")
            .rsplit_once(':')
            .map(|(host, _)| host.trim_matches(['[', ']']))
            .unwrap_or("localhost")
            .to_string();
        tls = tls.domain_name(host);
        if let Credential::Files { certificate, key } = credential {
            tls = tls.identity(Identity::from_pem(read(certificate)?, read(key)?));
        }
        let channel = Channel::from_shared(server.to_string())
            .map_err(|e| Error::invalid("server", e))?
            .tls_config(tls)
            .map_err(|e| Error::invalid("server", e))?
            .connect()
            .await
            .map_err(|e| Error::FailedPrecondition(format!("cannot connect to {server}: {e}")))?;
        Ok(Client { channel })
    }

    /// The underlying channel, for other gRPC services (health, reflection).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn registration(&self) -> proto::registration_client::RegistrationClient<Channel> {
        proto::registration_client::RegistrationClient::new(self.channel.clone())
    }

    pub fn enrollment(&self) -> proto::enrollment_client::EnrollmentClient<Channel> {
        proto::enrollment_client::EnrollmentClient::new(self.channel.clone())
    }

    pub fn verification(&self) -> proto::verification_client::VerificationClient<Channel> {
        proto::verification_client::VerificationClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> proto::admin_client::AdminClient<Channel> {
        proto::admin_client::AdminClient::new(self.channel.clone())
    }

    /// `Registration.CreateEnrollmentToken`.
    pub async fn create_enrollment_token(
        &self,
        customer_id: &str,
        ttl_s: i64,
    ) -> Result<proto::CreateEnrollmentTokenResponse, Status> {
        let response = self
            .registration()
            .create_enrollment_token(proto::CreateEnrollmentTokenRequest {
                customer_id: customer_id.to_string(),
                ttl_s,
            })
            .await?;
        Ok(response.into_inner())
    }

    /// `Enrollment.Enroll`.
    pub async fn enroll(
        &self,
        token: &str,
        csr_der: Vec<u8>,
        device_id: &str,
        device_info: proto::DeviceInfo,
    ) -> Result<proto::EnrollResponse, Status> {
        let response = self
            .enrollment()
            .enroll(proto::EnrollRequest {
                token: token.to_string(),
                csr_der,
                device_id: device_id.to_string(),
                device_info: Some(device_info),
            })
            .await?;
        Ok(response.into_inner())
    }
}

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
}

/// Serializes an intent once, as the app must before signing.
pub fn encode_intent(intent: &proto::PaymentIntent) -> Vec<u8> {
    prost::Message::encode_to_vec(intent)
}

/// A fresh random 32-byte nonce.
pub fn random_nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut nonce = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

/// Customer, device and serial of an enrolled phone's certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceIdentity {
    pub customer_id: String,
    pub device_id: String,
    pub serial: String,
}

impl DeviceIdentity {
    /// What an enrollment or renewal answered: the certificate names neither id (only an
    /// opaque subscriber reference), so the phone keeps them from the answer.
    pub fn from_enrollment(issued: &proto::EnrollResponse) -> DeviceIdentity {
        DeviceIdentity {
            customer_id: issued.customer_id.clone(),
            device_id: issued.device_id.clone(),
            serial: issued.serial.clone(),
        }
    }

    /// Reads the URI SANs `urn:payra:customer:<id>` and `urn:payra:device:<id>` of a
    /// certificate issued before certificates stopped carrying ids.
    pub fn from_certificate(der: &[u8]) -> Result<DeviceIdentity> {
        use x509_parser::extensions::GeneralName;
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|_| Error::invalid("certificate", "does not parse"))?;
        let mut customer = None;
        let mut device = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    if let Some(id) = uri.strip_prefix("urn:payra:customer:") {
                        customer = Some(id.to_string());
                    }
                    if let Some(id) = uri.strip_prefix("urn:payra:device:") {
                        device = Some(id.to_string());
                    }
                }
            }
        }
        match (customer, device) {
            (Some(customer_id), Some(device_id)) => Ok(DeviceIdentity {
                customer_id,
                device_id,
                serial: hex::encode(cert.raw_serial())
                    .trim_start_matches("00")
                    .to_string(),
            }),
            _ => Err(Error::invalid(
                "certificate",
                "is not a payra device certificate (no customer/device URIs)",
            )),
        }
    }
}

/// Parses a CNY amount such as `12.34` into fen, exactly (no floating point).
pub fn parse_amount_fen(text: &str) -> Result<i64> {
    let bad = || Error::invalid("amount", format!("{text:?} is not an amount like 12.34"));
    let (yuan, fen) = match text.split_once('.') {
        Some((yuan, fen)) => (yuan, fen),
        None => (text, ""),
    };
    if yuan.is_empty() || fen.len() > 2 || !yuan.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    if !fen.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let yuan: i64 = yuan.parse().map_err(|_| bad())?;
    let fen: i64 = format!("{fen:0<2}").parse().map_err(|_| bad())?;
    yuan.checked_mul(100)
        .and_then(|v| v.checked_add(fen))
        .ok_or_else(bad)
}

/// The factor category of a well-known method name (`payment_pin`, `sms_otp`, ...), as the
/// server checks it (docs/tiers.md lists the names).
pub fn factor_category(method: &str) -> Option<proto::FactorCategory> {
    use crate::model::FactorCategory as Domain;
    use proto::FactorCategory as C;
    crate::ra::tiers::known_method_category(method).map(|category| match category {
        Domain::Knowledge => C::Knowledge,
        Domain::Possession => C::Possession,
        Domain::Inherence => C::Inherence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly() {
        for (text, fen) in [
            ("12.34", 1234),
            ("0.01", 1),
            ("5", 500),
            ("5.5", 550),
            ("1000.00", 100_000),
        ] {
            assert_eq!(parse_amount_fen(text).unwrap(), fen, "{text}");
        }
        for text in ["", ".5", "1.234", "-1", "1e3", "12,34", "abc"] {
            assert!(parse_amount_fen(text).is_err(), "{text}");
        }
    }
}
