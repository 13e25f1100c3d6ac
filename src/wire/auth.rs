//! Roles from verified client certificates, and the authorization matrix: which role may call
//! which RPC. The TLS layer has already checked that a presented certificate chains to payra's
//! CA, so a role URI in it was put there by payra.

use tonic::Request;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::ROLE_URI_PREFIX;
use crate::error::{Error, Result};
use crate::model::Serial;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No client certificate (a phone before enrollment).
    Anonymous,
    /// A device certificate, with its serial.
    Device(Serial),
    Service,
    Operator,
}

/// A role as named in the authorization matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Anonymous,
    Device,
    Service,
    Operator,
}

impl Caller {
    pub fn role(&self) -> Role {
        match self {
            Caller::Anonymous => Role::Anonymous,
            Caller::Device(_) => Role::Device,
            Caller::Service => Role::Service,
            Caller::Operator => Role::Operator,
        }
    }
}

/// Every RPC payra serves, for the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Enroll,
    Renew,
    CreateEnrollmentToken,
    VerifyPayment,
    QualifyTransaction,
    GetCertificateStatus,
    ReleaseReservation,
    RevokeCertificate,
    RevokeDevice,
    RevokeCustomer,
    UnholdCertificate,
    GetCertificate,
    ListCertificates,
    SetAgreedLimit,
    GetEvidence,
}

impl Rpc {
    /// All RPCs, for tests that walk the whole matrix.
    pub const ALL: [Rpc; 15] = [
        Rpc::Enroll,
        Rpc::Renew,
        Rpc::CreateEnrollmentToken,
        Rpc::VerifyPayment,
        Rpc::QualifyTransaction,
        Rpc::GetCertificateStatus,
        Rpc::ReleaseReservation,
        Rpc::RevokeCertificate,
        Rpc::RevokeDevice,
        Rpc::RevokeCustomer,
        Rpc::UnholdCertificate,
        Rpc::GetCertificate,
        Rpc::ListCertificates,
        Rpc::SetAgreedLimit,
        Rpc::GetEvidence,
    ];

    /// The authorization matrix (docs/security.md shows it as a table). Least privilege:
    /// phones enroll and renew, services create tokens and verify, operators administer.
    pub fn allowed_roles(self) -> &'static [Role] {
        use Role::*;
        match self {
            Rpc::Enroll => &[Anonymous, Device],
            Rpc::Renew => &[Device],
            Rpc::CreateEnrollmentToken => &[Service, Operator],
            Rpc::VerifyPayment | Rpc::QualifyTransaction | Rpc::ReleaseReservation => &[Service],
            Rpc::GetCertificateStatus => &[Service, Operator],
            Rpc::RevokeCertificate
            | Rpc::RevokeDevice
            | Rpc::RevokeCustomer
            | Rpc::UnholdCertificate
            | Rpc::GetCertificate
            | Rpc::ListCertificates
            | Rpc::SetAgreedLimit
            | Rpc::GetEvidence => &[Operator],
        }
    }
}

/// The caller named by a verified client certificate (DER).
pub fn caller_from_certificate(der: &[u8]) -> Result<Caller> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| Error::Unauthenticated("client certificate does not parse".into()))?;
    let mut role = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(found) = uri.strip_prefix(ROLE_URI_PREFIX) {
                    role = Some(found.to_string());
                }
            }
        }
    }
    match role.as_deref() {
        Some("operator") => Ok(Caller::Operator),
        Some("service") => Ok(Caller::Service),
        Some("device") => Ok(Caller::Device(
            Serial::from_bytes("serial", cert.raw_serial())
                .map_err(|_| Error::Unauthenticated("client certificate serial".into()))?,
        )),
        _ => Err(Error::PermissionDenied(
            "client certificate carries no payra role".into(),
        )),
    }
}

/// The caller of `request`, from the certificate the TLS layer verified.
pub fn caller<T>(request: &Request<T>) -> Result<Caller> {
    match request.peer_certs() {
        Some(certs) if !certs.is_empty() => caller_from_certificate(certs[0].as_ref()),
        _ => Ok(Caller::Anonymous),
    }
}

/// Checks the matrix for `rpc`: no certificate where one is needed is `Unauthenticated`, a
/// role that may not call it is `PermissionDenied`.
pub fn authorize<T>(request: &Request<T>, rpc: Rpc) -> Result<Caller> {
    let caller = caller(request)?;
    let allowed = rpc.allowed_roles();
    if allowed.contains(&caller.role()) {
        return Ok(caller);
    }
    if caller == Caller::Anonymous {
        return Err(Error::Unauthenticated(format!(
            "{rpc:?} needs a client certificate of role {}",
            role_list(allowed)
        )));
    }
    Err(Error::PermissionDenied(format!(
        "{rpc:?} is not allowed for role {:?}; allowed: {}",
        caller.role(),
        role_list(allowed)
    )))
}

fn role_list(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| format!("{r:?}").to_lowercase())
        .collect::<Vec<_>>()
        .join(", ")
}
