//! Roles from verified client certificates, and the authorization matrix: which role may call
//! which RPC, enforced in one place, [`AuthLayer`], before any handler runs. The TLS layer has
//! already checked that a presented certificate chains to payra's CA, so a role URI in it was
//! put there by payra.

use crate::sync::Unpoisoned;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::ROLE_URI_PREFIX;
use crate::error::{Error, Result};
use std::sync::Arc;

use crate::model::Serial;
use crate::ra::{ClientStanding, Ra};
use crate::store::Actor;

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
    VerifyPayments,
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
    GetLimits,
    GetEvidence,
    IssueClientCertificate,
    CreateBackup,
    RunRetention,
    ListUpstreamRevocations,
}

impl Rpc {
    /// The RPC a gRPC path names; `None` for paths outside payra's services.
    pub fn from_path(path: &str) -> Option<Rpc> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        Some(match (service, method) {
            ("payra.v1.Enrollment", "Enroll") => Rpc::Enroll,
            ("payra.v1.Enrollment", "Renew") => Rpc::Renew,
            ("payra.v1.Registration", "CreateEnrollmentToken") => Rpc::CreateEnrollmentToken,
            ("payra.v1.Verification", "VerifyPayment") => Rpc::VerifyPayment,
            ("payra.v1.Verification", "VerifyPayments") => Rpc::VerifyPayments,
            ("payra.v1.Verification", "QualifyTransaction") => Rpc::QualifyTransaction,
            ("payra.v1.Verification", "GetCertificateStatus") => Rpc::GetCertificateStatus,
            ("payra.v1.Verification", "ReleaseReservation") => Rpc::ReleaseReservation,
            ("payra.v1.Admin", "RevokeCertificate") => Rpc::RevokeCertificate,
            ("payra.v1.Admin", "RevokeDevice") => Rpc::RevokeDevice,
            ("payra.v1.Admin", "RevokeCustomer") => Rpc::RevokeCustomer,
            ("payra.v1.Admin", "UnholdCertificate") => Rpc::UnholdCertificate,
            ("payra.v1.Admin", "GetCertificate") => Rpc::GetCertificate,
            ("payra.v1.Admin", "ListCertificates") => Rpc::ListCertificates,
            ("payra.v1.Admin", "SetAgreedLimit") => Rpc::SetAgreedLimit,
            ("payra.v1.Admin", "GetLimits") => Rpc::GetLimits,
            ("payra.v1.Admin", "GetEvidence") => Rpc::GetEvidence,
            ("payra.v1.Admin", "IssueClientCertificate") => Rpc::IssueClientCertificate,
            ("payra.v1.Admin", "CreateBackup") => Rpc::CreateBackup,
            ("payra.v1.Admin", "RunRetention") => Rpc::RunRetention,
            ("payra.v1.Admin", "ListUpstreamRevocations") => Rpc::ListUpstreamRevocations,
            _ => return None,
        })
    }

    /// All RPCs, for tests that walk the whole matrix.
    pub const ALL: [Rpc; 21] = [
        Rpc::Enroll,
        Rpc::Renew,
        Rpc::CreateEnrollmentToken,
        Rpc::VerifyPayment,
        Rpc::VerifyPayments,
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
        Rpc::GetLimits,
        Rpc::GetEvidence,
        Rpc::IssueClientCertificate,
        Rpc::CreateBackup,
        Rpc::RunRetention,
        Rpc::ListUpstreamRevocations,
    ];

    /// The authorization matrix (docs/security.md shows it as a table). Least privilege:
    /// phones enroll and renew, services create tokens and verify, operators administer.
    pub fn allowed_roles(self) -> &'static [Role] {
        use Role::*;
        match self {
            Rpc::Enroll => &[Anonymous, Device],
            // Anonymous: an SM2 device, or one whose certificate an upstream CA issued, which
            // proves its certificate by a RenewalProof.
            Rpc::Renew => &[Anonymous, Device],
            Rpc::CreateEnrollmentToken => &[Service, Operator],
            Rpc::VerifyPayment
            | Rpc::VerifyPayments
            | Rpc::QualifyTransaction
            | Rpc::ReleaseReservation => &[Service],
            Rpc::GetCertificateStatus | Rpc::GetLimits => &[Service, Operator],
            Rpc::RevokeCertificate
            | Rpc::RevokeDevice
            | Rpc::RevokeCustomer
            | Rpc::UnholdCertificate
            | Rpc::GetCertificate
            | Rpc::ListCertificates
            | Rpc::SetAgreedLimit
            | Rpc::GetEvidence
            | Rpc::IssueClientCertificate
            | Rpc::CreateBackup
            | Rpc::RunRetention
            | Rpc::ListUpstreamRevocations => &[Operator],
        }
    }
}

/// The caller named by a verified client certificate (DER), and the certificate's serial.
pub fn caller_from_certificate(der: &[u8]) -> Result<(Caller, Serial)> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| Error::Unauthenticated("client certificate does not parse".into()))?;
    let serial = Serial::from_bytes("serial", cert.raw_serial())
        .map_err(|_| Error::Unauthenticated("client certificate serial".into()))?;
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
        Some("operator") => Ok((Caller::Operator, serial)),
        Some("service") => Ok((Caller::Service, serial)),
        Some("device") => Ok((Caller::Device(serial.clone()), serial)),
        _ => Err(Error::PermissionDenied(
            "client certificate carries no payra role".into(),
        )),
    }
}

/// The caller a request was authorized as, put into its extensions by [`AuthLayer`].
pub fn caller<T>(request: &Request<T>) -> Result<Caller> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Error::internal("request reached a handler without authorization"))
}

/// Who made `request`, for the audit log: the client certificate's fingerprint and role.
pub fn actor<T>(request: &Request<T>) -> Actor {
    request
        .extensions()
        .get::<Actor>()
        .cloned()
        .unwrap_or_else(Actor::anonymous)
}

/// Checks the matrix for `rpc` and `caller`: no certificate where one is needed is
/// `Unauthenticated`, a role that may not call it is `PermissionDenied`.
pub fn check(rpc: Rpc, caller: &Caller) -> Result<()> {
    let allowed = rpc.allowed_roles();
    if allowed.contains(&caller.role()) {
        return Ok(());
    }
    if *caller == Caller::Anonymous {
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

/// What a client certificate says about its holder, parsed once per certificate.
struct Identity {
    caller: Caller,
    serial: Serial,
    actor: Actor,
}

/// Parsed client certificates by their DER, so the hot path does not parse X.509 and hash
/// the certificate on every call. Bounded: emptied when full.
#[derive(Default)]
struct Identities {
    parsed: std::sync::RwLock<std::collections::HashMap<Vec<u8>, Arc<Identity>>>,
}

/// Most certificates remembered; a service fleet and its operators fit many times over.
const MAX_IDENTITIES: usize = 10_000;

impl Identities {
    fn of(&self, der: &[u8]) -> Result<Arc<Identity>> {
        if let Some(known) = self.parsed.read().unpoisoned().get(der) {
            return Ok(known.clone());
        }
        let (caller, serial) = caller_from_certificate(der)?;
        let role = format!("{:?}", caller.role()).to_lowercase();
        let identity = Arc::new(Identity {
            caller,
            serial,
            actor: Actor::with_certificate(&role, der),
        });
        let mut parsed = self.parsed.write().unpoisoned();
        if parsed.len() >= MAX_IDENTITIES {
            parsed.clear();
        }
        parsed.insert(der.to_vec(), identity.clone());
        Ok(identity)
    }
}

/// The caller named by the client certificate of an HTTP/2 request, if any.
fn caller_of<B>(
    request: &http::Request<B>,
    ra: &Ra,
    identities: &Identities,
) -> Result<(Caller, Actor)> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs());
    match certs {
        Some(certs) if !certs.is_empty() => {
            let identity = identities.of(certs[0].as_ref())?;
            let (caller, serial) = (&identity.caller, &identity.serial);
            // Device certificates are checked by the RPCs that use them (Renew); a service or
            // operator credential must be registered and unrevoked, for every RPC.
            if matches!(caller, Caller::Service | Caller::Operator) {
                match ra.clients().standing(serial) {
                    ClientStanding::Active => {}
                    ClientStanding::Revoked => {
                        return Err(Error::Unauthenticated(format!(
                            "client certificate {serial} is revoked"
                        )))
                    }
                    ClientStanding::Unknown => {
                        return Err(Error::Unauthenticated(format!(
                            "client certificate {serial} is not registered with payra; \
                             issue credentials with payra issue-client"
                        )))
                    }
                }
            }
            Ok((identity.caller.clone(), identity.actor.clone()))
        }
        _ => Ok((Caller::Anonymous, Actor::anonymous())),
    }
}

/// The standard services anyone may call: health and server reflection (both versions).
const OPEN_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Decides a request before routing: `Ok(Some(caller))` for an allowed payra RPC,
/// `Ok(None)` for the standard services (health, reflection), which anyone may call. Any
/// other path is refused here, so no service added later is reachable before it is put in
/// the authorization matrix.
fn authorize_request<B>(
    request: &http::Request<B>,
    ra: &Ra,
    identities: &Identities,
) -> Result<Option<(Caller, Actor)>> {
    let path = request.uri().path();
    let Some(rpc) = Rpc::from_path(path) else {
        if OPEN_SERVICES.iter().any(|open| path.starts_with(open)) {
            return Ok(None);
        }
        return Err(Error::PermissionDenied(format!("unknown method {path}")));
    };
    let (caller, actor) = caller_of(request, ra, identities)?;
    check(rpc, &caller)?;
    Ok(Some((caller, actor)))
}

/// The tower layer that enforces the authorization matrix for every gRPC request.
#[derive(Clone)]
pub struct AuthLayer {
    ra: Arc<Ra>,
    identities: Arc<Identities>,
}

impl AuthLayer {
    /// Checks callers against the matrix and `ra`'s revoked client certificates.
    pub fn new(ra: Arc<Ra>) -> AuthLayer {
        AuthLayer {
            ra,
            identities: Arc::default(),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            ra: self.ra.clone(),
            identities: self.identities.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    ra: Arc<Ra>,
    identities: Arc<Identities>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = std::result::Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match authorize_request(&request, &self.ra, &self.identities) {
            Ok(caller) => {
                if let Some((caller, actor)) = caller {
                    request.extensions_mut().insert(caller);
                    request.extensions_mut().insert(actor);
                }
                Box::pin(self.inner.call(request))
            }
            Err(error) => {
                let response = Status::from(error).into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
