//! The Rust client of payra: used by the CLI and the tests, and the reference for SDK authors.
//! [`DeviceKey`] is the device side (key generation, CSR, intent signatures); [`Client`]
//! speaks gRPC over mutual TLS, one typed method per RPC, every failure a [`ClientError`].
//!
//! A payment service verifies a payment:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use payra::client::{Client, Credential};
//! use payra::wire::proto;
//! let certs = std::path::Path::new("certs");
//! let service = Client::connect(
//!     "https://localhost:8443",
//!     &certs.join("root.pem"),
//!     &Credential::role(certs, "service"),
//! )
//! .await?;
//! # let (intent, signature, serial) = (Vec::new(), Vec::new(), String::new());
//! let answer = service
//!     .verify_payment(proto::VerifyPaymentRequest {
//!         intent,            // the bytes the phone signed
//!         signature,         // its ECDSA signature (DER or raw r||s)
//!         certificate_serial: serial,
//!         transaction: None, // or what the service is about to charge
//!         factors: vec![],
//!         reserve: true,
//!     })
//!     .await?;
//! println!("{:?} tier {:?}", answer.verdict(), answer.tier());
//! # Ok(()) }
//! ```
//!
//! An operator revokes a phone's certificates, and a device enrolls with a token:
//!
//! ```no_run
//! # async fn example(operator: payra::client::Client, phone: payra::client::Client, token: &str)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use payra::client::{DeviceKey, ProtoDeviceInfo};
//! use payra::wire::proto::RevocationReason;
//! let revoked = operator
//!     .revoke_device("phone-1", RevocationReason::KeyCompromise, false)
//!     .await?;
//! println!("{} certificates revoked", revoked.revoked_serials.len());
//! let key = DeviceKey::generate();
//! let issued = phone
//!     .enroll(token, key.csr_der("phone-2")?, "phone-2", ProtoDeviceInfo::default())
//!     .await?;
//! println!("certificate {}", issued.serial);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Status;

use crate::error::{Error, Result};
use crate::wire::proto;

mod device;
pub use device::{DeviceKey, Sm2DeviceKey};

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

/// A payra call that failed: the gRPC code, payra's message (it names the field or the rule),
/// and for a transport failure its cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    code: tonic::Code,
    message: String,
    cause: Option<String>,
}

impl ClientError {
    /// The gRPC status code.
    pub fn code(&self) -> tonic::Code {
        self.code
    }

    /// payra's message, as the server sent it.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What to do about it, where the code alone says it (for people at a terminal).
    pub fn hint(&self) -> Option<&'static str> {
        use tonic::Code;
        Some(match self.code {
            Code::PermissionDenied => {
                "this command needs another role. The credential is read from --certs DIR \
                 (operator.pem and operator.key for operator commands, service.pem and \
                 service.key for service ones); an operator issues one with `payra \
                 issue-client --role operator|service --name NAME`"
            }
            Code::Unauthenticated => {
                "the server did not accept this client certificate: it may have expired, been \
                 revoked, or come from another payra's CA. Check --certs, and have an operator \
                 issue a new one with `payra issue-client`"
            }
            Code::Unavailable => {
                "the server, or the database behind it, cannot take requests now; retry in a \
                 moment. Its readiness says why: curl http://HOST:8080/readyz"
            }
            Code::DeadlineExceeded => {
                "the server did not answer in time (limits.request_timeout_s); retry, and check \
                 its load and its database"
            }
            Code::ResourceExhausted => "a rate or size limit was reached; wait and retry",
            _ => return None,
        })
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)?;
        match &self.cause {
            Some(cause) => write!(f, ": {cause}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<Status> for ClientError {
    fn from(status: Status) -> ClientError {
        // A transport failure's cause is in the error chain, not the message.
        let mut causes = Vec::new();
        let mut source = std::error::Error::source(&status);
        while let Some(cause) = source {
            causes.push(cause.to_string());
            source = cause.source();
        }
        ClientError {
            code: status.code(),
            message: status.message().to_string(),
            cause: (!causes.is_empty() && status.message().contains("transport error"))
                .then(|| causes.join(": ")),
        }
    }
}

impl From<ClientError> for Status {
    /// Back to a status, for a service that passes payra's answer on over gRPC.
    fn from(error: ClientError) -> Status {
        Status::new(error.code, error.message)
    }
}

/// What a [`Client`] call returns.
pub type CallResult<T> = std::result::Result<T, ClientError>;

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

    /// `Registration.CreateEnrollmentToken` (as the payment service): a token for one
    /// enrollment of `customer_id`, valid `ttl_s` seconds (0: the server's default).
    pub async fn create_enrollment_token(
        &self,
        customer_id: &str,
        ttl_s: i64,
    ) -> CallResult<proto::CreateEnrollmentTokenResponse> {
        let request = proto::CreateEnrollmentTokenRequest {
            customer_id: customer_id.to_string(),
            ttl_s,
        };
        Ok(self
            .registration()
            .create_enrollment_token(request)
            .await?
            .into_inner())
    }

    /// `Enrollment.Enroll` (as the phone, with no certificate yet): a certificate for the
    /// key in `csr_der`.
    pub async fn enroll(
        &self,
        token: &str,
        csr_der: Vec<u8>,
        device_id: &str,
        device_info: proto::DeviceInfo,
    ) -> CallResult<proto::EnrollResponse> {
        self.enroll_attested(token, csr_der, device_id, device_info, None)
            .await
    }

    /// `Enrollment.Enroll` with the key's attestation: an Android Key Attestation chain or
    /// an Apple App Attest object made over [`crate::attestation::challenge`] of `token`
    /// (docs/attestation.md). The answer's `attestation` says what the server made of it.
    pub async fn enroll_attested(
        &self,
        token: &str,
        csr_der: Vec<u8>,
        device_id: &str,
        device_info: proto::DeviceInfo,
        attestation: Option<proto::enroll_request::Attestation>,
    ) -> CallResult<proto::EnrollResponse> {
        let request = proto::EnrollRequest {
            token: token.to_string(),
            csr_der,
            device_id: device_id.to_string(),
            device_info: Some(device_info),
            attestation,
        };
        Ok(self.enrollment().enroll(request).await?.into_inner())
    }

    /// `Enrollment.Renew` (as the phone, presenting its current certificate): a certificate
    /// for the key in `csr_der` that supersedes it.
    pub async fn renew(
        &self,
        csr_der: Vec<u8>,
        device_info: Option<proto::DeviceInfo>,
    ) -> CallResult<proto::EnrollResponse> {
        let request = proto::RenewRequest {
            csr_der,
            device_info,
            proof: None,
        };
        Ok(self.enrollment().renew(request).await?.into_inner())
    }

    /// `Enrollment.Renew` for an SM2 certificate, on a connection without a client
    /// certificate: `proof` is the current certificate's SM2 signature over
    /// [`crate::ra::renewal_proof_message`] of its serial, the time and `csr_der`.
    pub async fn renew_with_proof(
        &self,
        csr_der: Vec<u8>,
        device_info: Option<proto::DeviceInfo>,
        proof: proto::RenewalProof,
    ) -> CallResult<proto::EnrollResponse> {
        let request = proto::RenewRequest {
            csr_der,
            device_info,
            proof: Some(proof),
        };
        Ok(self.enrollment().renew(request).await?.into_inner())
    }

    /// `Verification.VerifyPayment` (as the payment service).
    pub async fn verify_payment(
        &self,
        request: proto::VerifyPaymentRequest,
    ) -> CallResult<proto::VerifyPaymentResponse> {
        Ok(self
            .verification()
            .verify_payment(request)
            .await?
            .into_inner())
    }

    /// `Verification.VerifyPayments` (as the payment service): 1 to 100 payments, each
    /// decided as `verify_payment` decides it; one result per payment, in order.
    pub async fn verify_payments(
        &self,
        payments: Vec<proto::VerifyPaymentRequest>,
    ) -> CallResult<Vec<proto::VerifyPaymentResult>> {
        Ok(self
            .verification()
            .verify_payments(proto::VerifyPaymentsRequest { payments })
            .await?
            .into_inner()
            .results)
    }

    /// `Verification.QualifyTransaction` (as the payment service).
    pub async fn qualify_transaction(
        &self,
        request: proto::QualifyTransactionRequest,
    ) -> CallResult<proto::QualifyTransactionResponse> {
        Ok(self
            .verification()
            .qualify_transaction(request)
            .await?
            .into_inner())
    }

    /// `Verification.GetCertificateStatus`.
    pub async fn certificate_status(
        &self,
        serial: &str,
    ) -> CallResult<proto::GetCertificateStatusResponse> {
        let request = proto::GetCertificateStatusRequest {
            serial: serial.to_string(),
        };
        Ok(self
            .verification()
            .get_certificate_status(request)
            .await?
            .into_inner())
    }

    /// `Verification.ReleaseReservation` (as the payment service): gives back what
    /// `evidence_id` reserved, for a payment that failed downstream.
    pub async fn release_reservation(
        &self,
        evidence_id: &str,
    ) -> CallResult<proto::ReleaseReservationResponse> {
        let request = proto::ReleaseReservationRequest {
            evidence_id: evidence_id.to_string(),
        };
        Ok(self
            .verification()
            .release_reservation(request)
            .await?
            .into_inner())
    }

    /// `Admin.RevokeCertificate` (as an operator).
    pub async fn revoke_certificate(
        &self,
        serial: &str,
        reason: proto::RevocationReason,
    ) -> CallResult<proto::RevokeResponse> {
        let request = proto::RevokeCertificateRequest {
            serial: serial.to_string(),
            reason: reason as i32,
        };
        Ok(self.admin().revoke_certificate(request).await?.into_inner())
    }

    /// `Admin.RevokeDevice` (as an operator): every live certificate of the device; with
    /// `dry_run`, only which ones it would revoke.
    pub async fn revoke_device(
        &self,
        device_id: &str,
        reason: proto::RevocationReason,
        dry_run: bool,
    ) -> CallResult<proto::RevokeResponse> {
        let request = proto::RevokeDeviceRequest {
            device_id: device_id.to_string(),
            reason: reason as i32,
            dry_run,
        };
        Ok(self.admin().revoke_device(request).await?.into_inner())
    }

    /// `Admin.RevokeCustomer` (as an operator): every live certificate of the customer;
    /// with `dry_run`, only which ones it would revoke.
    pub async fn revoke_customer(
        &self,
        customer_id: &str,
        reason: proto::RevocationReason,
        dry_run: bool,
    ) -> CallResult<proto::RevokeResponse> {
        let request = proto::RevokeCustomerRequest {
            customer_id: customer_id.to_string(),
            reason: reason as i32,
            dry_run,
        };
        Ok(self.admin().revoke_customer(request).await?.into_inner())
    }

    /// `Admin.UnholdCertificate` (as an operator): releases a certificate from hold.
    pub async fn unhold_certificate(&self, serial: &str) -> CallResult<proto::CertificateRecord> {
        let request = proto::UnholdCertificateRequest {
            serial: serial.to_string(),
        };
        Ok(self.admin().unhold_certificate(request).await?.into_inner())
    }

    /// `Admin.GetCertificate` (as an operator).
    pub async fn certificate(&self, serial: &str) -> CallResult<proto::CertificateRecord> {
        let request = proto::GetCertificateRequest {
            serial: serial.to_string(),
        };
        Ok(self.admin().get_certificate(request).await?.into_inner())
    }

    /// `Admin.ListUpstreamRevocations` (as an operator): revocations the upstream CA has not
    /// confirmed yet (RA mode), after sending them once more when `retry_now`.
    pub async fn list_upstream_revocations(
        &self,
        retry_now: bool,
    ) -> CallResult<proto::ListUpstreamRevocationsResponse> {
        let request = proto::ListUpstreamRevocationsRequest { retry_now };
        Ok(self
            .admin()
            .list_upstream_revocations(request)
            .await?
            .into_inner())
    }

    /// `Admin.ListCertificates` (as an operator): one page.
    pub async fn list_certificates(
        &self,
        request: proto::ListCertificatesRequest,
    ) -> CallResult<proto::ListCertificatesResponse> {
        Ok(self.admin().list_certificates(request).await?.into_inner())
    }

    /// `Admin.SetAgreedLimit` (as an operator): the customer's agreed tier-A daily limit.
    pub async fn set_agreed_limit(
        &self,
        customer_id: &str,
        daily_limit_fen: i64,
    ) -> CallResult<()> {
        let request = proto::SetAgreedLimitRequest {
            customer_id: customer_id.to_string(),
            daily_limit_fen,
        };
        self.admin().set_agreed_limit(request).await?;
        Ok(())
    }

    /// `Admin.GetLimits` (as an operator): where the customer stands today.
    pub async fn limits(&self, customer_id: &str) -> CallResult<proto::GetLimitsResponse> {
        let request = proto::GetLimitsRequest {
            customer_id: customer_id.to_string(),
        };
        Ok(self.admin().get_limits(request).await?.into_inner())
    }

    /// `Admin.GetEvidence` (as an operator).
    pub async fn evidence(&self, evidence_id: &str) -> CallResult<proto::Evidence> {
        let request = proto::GetEvidenceRequest {
            evidence_id: evidence_id.to_string(),
        };
        Ok(self.admin().get_evidence(request).await?.into_inner())
    }

    /// `Admin.IssueClientCertificate` (as an operator): a service or operator credential
    /// for the key in `csr_der`.
    pub async fn issue_client_certificate(
        &self,
        role: &str,
        name: &str,
        csr_der: Vec<u8>,
    ) -> CallResult<proto::IssueClientCertificateResponse> {
        let request = proto::IssueClientCertificateRequest {
            role: role.to_string(),
            name: name.to_string(),
            csr_der,
        };
        Ok(self
            .admin()
            .issue_client_certificate(request)
            .await?
            .into_inner())
    }

    /// `Admin.CreateBackup` (as an operator): the backup's chunks, in order.
    pub async fn create_backup(&self) -> CallResult<tonic::Streaming<proto::BackupChunk>> {
        let request = proto::CreateBackupRequest {};
        Ok(self.admin().create_backup(request).await?.into_inner())
    }

    /// `Admin.RunRetention` (as an operator): its progress, until `done`.
    pub async fn run_retention(&self) -> CallResult<tonic::Streaming<proto::RetentionProgress>> {
        let request = proto::RunRetentionRequest {};
        Ok(self.admin().run_retention(request).await?.into_inner())
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
