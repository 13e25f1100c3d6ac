//! RA mode: an external CA signs and revokes device certificates, payra stays the RA.
//!
//! [`UpstreamCa`] is the seam a connector implements (CFSSL's HTTP API here; a CMP or a
//! licensed CA's own HTTPS API would be another). [`UpstreamIssuer`] wraps one with what payra
//! does around every call: a deadline, a bound on calls in flight, and the check of what comes
//! back against the profile payra decided. A certificate that does not match is refused and
//! never stored.

pub mod cfssl;
pub mod config;
mod http;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::csr::DevicePublicKey;
use super::profile::{DeviceCertificate, DeviceProfile, SubscriberRef};
use crate::config::{UpstreamConfig, UpstreamKind};
use crate::error::{Error, Result};
use crate::model::{RevocationReason, Serial};

/// A future a connector returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The organisation device certificates name (as local ones do).
pub const DEVICE_ORGANIZATION: &str = "payra device";

/// How far an upstream's notBefore may lie ahead of payra's clock, and its notAfter beyond
/// payra's validity (upstreams backdate, and clocks differ).
const CLOCK_TOLERANCE_S: i64 = 600;

/// What payra asks an upstream to sign: the phone's CSR (proof of possession, checked by
/// payra already) and the profile payra decided.
#[derive(Debug, Clone)]
pub struct SigningRequest {
    pub csr_der: Vec<u8>,
    /// The subject: `CN=<subscriber reference>, O=payra device`.
    pub common_name: String,
    pub organization: String,
    /// How long the certificate should be valid, in seconds.
    pub validity_s: i64,
}

/// A certificate to revoke upstream.
#[derive(Debug, Clone)]
pub struct RevocationRequest {
    pub serial: Serial,
    /// The certificate's authorityKeyIdentifier, as some upstreams key their records by it.
    pub authority_key_id: Vec<u8>,
    pub reason: RevocationReason,
}

/// Why an upstream call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamFailure {
    /// No usable answer: connection refused or lost, a deadline passed, a server error, an
    /// answer that does not parse. Worth retrying.
    #[error("{0}")]
    Unreachable(String),
    /// The upstream answered and said no (bad request, authentication, unknown certificate).
    /// Retrying the same request will not help until someone changes something.
    #[error("{0}")]
    Refused(String),
}

impl UpstreamFailure {
    /// What kind of failure, in words fit for a phone (no address, no upstream text).
    pub fn brief(&self) -> &'static str {
        match self {
            UpstreamFailure::Refused(_) => "it refused the request",
            UpstreamFailure::Unreachable(detail) if detail.starts_with("no answer within") => {
                "it did not answer in time"
            }
            UpstreamFailure::Unreachable(detail) if detail.starts_with("too many requests") => {
                "too many requests are waiting for it"
            }
            UpstreamFailure::Unreachable(_) => "it could not be reached or gave no usable answer",
        }
    }
}

/// Where relying parties learn the status of an upstream's certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusSource {
    /// The upstream publishes it: its CRL and OCSP URLs (as its certificates carry them;
    /// payra checks that they do).
    Upstream {
        crl_url: Option<String>,
        ocsp_url: Option<String>,
    },
    /// The upstream publishes nothing payra knows of: payra's own view
    /// (`GetCertificateStatus`, `VerifyPayment`) is the status.
    PayraView,
}

impl StatusSource {
    /// What `ca.upstream.crl_url` and `ocsp_url` say: the upstream's URLs when either is set.
    pub fn from_config(config: &UpstreamConfig) -> StatusSource {
        match (&config.crl_url, &config.ocsp_url) {
            (None, None) => StatusSource::PayraView,
            (crl_url, ocsp_url) => StatusSource::Upstream {
                crl_url: crl_url.clone(),
                ocsp_url: ocsp_url.clone(),
            },
        }
    }
}

/// An external CA's signing and revocation interface.
pub trait UpstreamCa: Send + Sync {
    /// Names the upstream in messages and logs, e.g. `cfssl at http://ca.internal:8888`.
    fn describe(&self) -> String;

    /// Where the status of its certificates is published.
    fn status_source(&self) -> StatusSource;

    /// Has the upstream sign `request`; answers the certificate's DER.
    fn sign<'a>(
        &'a self,
        request: &'a SigningRequest,
    ) -> BoxFuture<'a, std::result::Result<Vec<u8>, UpstreamFailure>>;

    /// Has the upstream revoke a certificate it issued. Revoking one already revoked (with
    /// the same or another reason) must succeed: payra retries until it is confirmed.
    fn revoke<'a>(
        &'a self,
        request: &'a RevocationRequest,
    ) -> BoxFuture<'a, std::result::Result<(), UpstreamFailure>>;
}

/// The upstream and what payra knows of it: its issuing CA, the chain phones get, and the
/// limits on calls to it.
pub struct UpstreamIssuer {
    connector: Arc<dyn UpstreamCa>,
    /// The upstream's issuing CA certificate (DER).
    issuer_der: Vec<u8>,
    /// Issuing CA first, then intermediates: what phones get as their chain.
    pub chain_der: Vec<Vec<u8>>,
    pub issuer_not_after_s: i64,
    timeout: Duration,
    /// Signing calls in flight (a call past its deadline keeps its permit until it ends).
    in_flight: Arc<tokio::sync::Semaphore>,
    status: StatusSource,
}

impl std::fmt::Debug for UpstreamIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamIssuer")
            .field("upstream", &self.describe())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A signing call still running past its deadline.
pub type LateAnswer = tokio::task::JoinHandle<std::result::Result<Vec<u8>, UpstreamFailure>>;

/// How long a signing call past its deadline is still waited for, so that a certificate the
/// upstream issued late is revoked there rather than left valid with no record.
pub const LATE_ANSWER_WAIT: Duration = Duration::from_secs(120);

/// Why an upstream issuance failed; the certificate payra refused, if it got one (its serial
/// and authorityKeyIdentifier); and the call itself if it ran past its deadline.
#[derive(Debug)]
pub struct IssueFailure {
    pub error: Error,
    /// The metrics' word for it: `unreachable`, `refused` or `mismatch`.
    pub outcome: &'static str,
    pub refused: Option<(Serial, Vec<u8>)>,
    pub late: Option<LateAnswer>,
}

/// A certificate the upstream issued that matched the profile.
#[derive(Debug, Clone)]
pub struct UpstreamCertificate {
    pub serial: Serial,
    pub certificate: DeviceCertificate,
}

impl UpstreamIssuer {
    /// The upstream `config` names, with its connector.
    pub fn from_config(config: &UpstreamConfig) -> Result<UpstreamIssuer> {
        let connector: Arc<dyn UpstreamCa> = match config.kind {
            UpstreamKind::Cfssl => Arc::new(cfssl::Cfssl::from_config(config)?),
        };
        let issuer_file = config.issuer_file.as_deref().ok_or_else(|| {
            Error::invalid("ca.upstream.issuer_file", "is required in upstream mode")
        })?;
        let text = std::fs::read_to_string(issuer_file).map_err(|e| {
            Error::FailedPrecondition(format!(
                "ca.upstream.issuer_file {}: {e}",
                issuer_file.display()
            ))
        })?;
        let chain_der: Vec<Vec<u8>> = pem::parse_many(&text)
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "ca.upstream.issuer_file {}: {e}",
                    issuer_file.display()
                ))
            })?
            .into_iter()
            .filter(|block| block.tag() == "CERTIFICATE")
            .map(|block| block.into_contents())
            .collect();
        UpstreamIssuer::new(connector, chain_der, config)
    }

    /// An issuer around `connector`, whose issuing CA is `chain_der[0]`.
    pub fn new(
        connector: Arc<dyn UpstreamCa>,
        chain_der: Vec<Vec<u8>>,
        config: &UpstreamConfig,
    ) -> Result<UpstreamIssuer> {
        let issuer_der = chain_der.first().cloned().ok_or_else(|| {
            Error::FailedPrecondition(
                "ca.upstream.issuer_file holds no PEM certificate: it must start with the \
                 upstream CA that signs device certificates"
                    .into(),
            )
        })?;
        let (_, issuer) = X509Certificate::from_der(&issuer_der).map_err(|e| {
            Error::FailedPrecondition(format!(
                "ca.upstream.issuer_file: the first certificate does not parse: {e}"
            ))
        })?;
        let is_ca = issuer
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(Error::FailedPrecondition(
                "ca.upstream.issuer_file: the first certificate is not a CA (basicConstraints \
                 CA:TRUE)"
                    .into(),
            ));
        }
        let issuer_not_after_s = issuer.validity().not_after.timestamp();
        Ok(UpstreamIssuer {
            connector: connector.clone(),
            issuer_not_after_s,
            issuer_der,
            chain_der,
            timeout: Duration::from_millis(u64::from(config.timeout_ms)),
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)),
            status: connector.status_source(),
        })
    }

    /// Names the upstream.
    pub fn describe(&self) -> String {
        self.connector.describe()
    }

    /// Where the status of its certificates is published.
    pub fn status_source(&self) -> &StatusSource {
        &self.status
    }

    /// The upstream's issuing CA certificate.
    pub fn issuer_der(&self) -> &[u8] {
        &self.issuer_der
    }

    /// Has the upstream certify `key` for `subscriber` and checks what comes back against
    /// the profile. Nothing is stored either way.
    ///
    /// The phone's message says what kind of failure it was, never the upstream's address or
    /// its own words (those go to the log): `UNAVAILABLE` when the upstream did not answer
    /// usefully (retry later), `FAILED_PRECONDITION` when it issued a certificate payra
    /// refuses (retrying would only have it issue another; an operator must fix its
    /// profile). A refused certificate, and one that arrives after the deadline, are named
    /// in the failure, to be revoked upstream.
    pub async fn issue(
        &self,
        profile: &DeviceProfile,
        key: &DevicePublicKey,
        csr_der: &[u8],
        subscriber: &SubscriberRef,
        now_s: i64,
    ) -> std::result::Result<UpstreamCertificate, IssueFailure> {
        let request = SigningRequest {
            csr_der: csr_der.to_vec(),
            common_name: subscriber.as_str().to_string(),
            organization: DEVICE_ORGANIZATION.to_string(),
            validity_s: profile.validity_s,
        };
        let der = self.sign(request).await.map_err(|(failure, late)| {
            tracing::warn!(upstream = %self.describe(), %failure, "the upstream CA did not issue a certificate");
            IssueFailure {
                error: Error::Unavailable(format!(
                    "the certificate authority did not issue the certificate ({}); nothing was \
                     stored and the enrollment token is still usable, retry later",
                    failure.brief()
                )),
                outcome: match failure {
                    UpstreamFailure::Refused(_) => "refused",
                    UpstreamFailure::Unreachable(_) => "unreachable",
                },
                refused: None,
                late,
            }
        })?;
        self.check(&der, profile, key, subscriber, now_s)
            .map_err(|mismatch| {
                tracing::error!(
                    upstream = %self.describe(),
                    %mismatch,
                    "the upstream CA returned a certificate outside payra's profile; refused, \
                     and to be revoked there"
                );
                IssueFailure {
                    error: Error::FailedPrecondition(
                        "the certificate authority issued a certificate outside payra's \
                         profile, which payra refused; nothing was stored and the enrollment \
                         token is still usable once an operator has corrected the authority's \
                         profile"
                            .into(),
                    ),
                    outcome: "mismatch",
                    refused: self.signed_by_upstream(&der),
                    late: None,
                }
            })
    }

    /// One signing call, run as a task of its own under the in-flight bound: past the
    /// deadline the caller gets the failure and the task, which the upstream may still
    /// answer (having issued a certificate).
    async fn sign(
        &self,
        request: SigningRequest,
    ) -> std::result::Result<Vec<u8>, (UpstreamFailure, Option<LateAnswer>)> {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return Err((
                UpstreamFailure::Unreachable(
                    "too many requests are waiting for it already (ca.upstream.max_in_flight)"
                        .into(),
                ),
                None,
            ));
        };
        let connector = self.connector.clone();
        let mut call = tokio::spawn(async move {
            let answer = connector.sign(&request).await;
            drop(permit);
            answer
        });
        match tokio::time::timeout(self.timeout, &mut call).await {
            Ok(Ok(answer)) => answer.map_err(|failure| (failure, None)),
            Ok(Err(join)) => Err((
                UpstreamFailure::Unreachable(format!("the signing call failed: {join}")),
                None,
            )),
            Err(_) => Err((
                UpstreamFailure::Unreachable(format!(
                    "no answer within {} ms (ca.upstream.timeout_ms)",
                    self.timeout.as_millis()
                )),
                Some(call),
            )),
        }
    }

    /// The certificate in a late answer, if the upstream's issuing CA signed it: waits for
    /// the call at most [`LATE_ANSWER_WAIT`], then gives up on it.
    pub async fn late_certificate(&self, late: LateAnswer) -> Option<(Serial, Vec<u8>)> {
        let mut late = late;
        match tokio::time::timeout(LATE_ANSWER_WAIT, &mut late).await {
            Ok(Ok(Ok(der))) => self.signed_by_upstream(&der),
            Ok(_) => None,
            Err(_) => {
                late.abort();
                None
            }
        }
    }

    /// The serial and authorityKeyIdentifier of `der` if the upstream's issuing CA signed it
    /// (a certificate it issued, which payra may have refused).
    fn signed_by_upstream(&self, der: &[u8]) -> Option<(Serial, Vec<u8>)> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let (_, issuer) = X509Certificate::from_der(&self.issuer_der).ok()?;
        cert.verify_signature(Some(issuer.public_key())).ok()?;
        let serial = Serial::from_bytes("serial", cert.raw_serial()).ok()?;
        Some((serial, authority_key_id(der)))
    }

    /// Has the upstream revoke a certificate, within the deadline. Revocations are sent one
    /// at a time by each process's sync, so they take no signing permit: a burst of
    /// enrollments does not hold them up.
    pub async fn revoke(
        &self,
        request: &RevocationRequest,
    ) -> std::result::Result<(), UpstreamFailure> {
        match tokio::time::timeout(self.timeout, self.connector.revoke(request)).await {
            Ok(answer) => answer,
            Err(_) => Err(UpstreamFailure::Unreachable(format!(
                "no answer within {} ms (ca.upstream.timeout_ms)",
                self.timeout.as_millis()
            ))),
        }
    }

    /// Checks a certificate the upstream returned against the profile payra decided: signed
    /// by the configured issuing CA; the device's key; the subject payra asked for and nothing
    /// more; valid from about now for at most the profile's validity and not past the
    /// issuer; an end entity for digitalSignature and clientAuth only; no names payra did not
    /// ask for; the expected CRL and OCSP URLs when configured; no unknown critical extension.
    pub fn check(
        &self,
        der: &[u8],
        profile: &DeviceProfile,
        key: &DevicePublicKey,
        subscriber: &SubscriberRef,
        now_s: i64,
    ) -> std::result::Result<UpstreamCertificate, String> {
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("the certificate does not parse: {e}"))?;
        if !rest.is_empty() {
            return Err("trailing bytes after the certificate".into());
        }
        let (_, issuer) = X509Certificate::from_der(&self.issuer_der)
            .map_err(|e| format!("the issuing CA does not parse: {e}"))?;
        if cert.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(format!(
                "issuer {} is not the configured upstream CA {}",
                cert.issuer(),
                issuer.subject()
            ));
        }
        cert.verify_signature(Some(issuer.public_key()))
            .map_err(|_| "its signature does not verify with the upstream CA's key".to_string())?;
        if cert.version() != x509_parser::x509::X509Version::V3 {
            return Err("not an X.509 v3 certificate".into());
        }
        let serial = Serial::from_bytes("serial", cert.raw_serial())
            .map_err(|e| format!("serial number: {e}"))?;
        if cert.raw_serial().first().is_some_and(|b| b & 0x80 != 0) {
            return Err("the serial number is negative".into());
        }
        let spki = cert.public_key();
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        if spki.algorithm.algorithm != x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
            || curve != Some(x509_parser::oid_registry::OID_EC_P256)
            || spki.subject_public_key.data.as_ref() != key.sec1()
        {
            return Err("it certifies another key than the CSR's".into());
        }
        check_subject(&cert, subscriber)?;
        let not_before_s = cert.validity().not_before.timestamp();
        let not_after_s = cert.validity().not_after.timestamp();
        if not_before_s > now_s + CLOCK_TOLERANCE_S {
            return Err(format!(
                "notBefore {} is in the future",
                crate::model::moment(not_before_s)
            ));
        }
        if not_before_s < now_s - profile.backdate_s.max(0) - CLOCK_TOLERANCE_S {
            return Err(format!(
                "notBefore {} lies further back than payra's backdating allows",
                crate::model::moment(not_before_s)
            ));
        }
        if not_after_s <= now_s {
            return Err(format!(
                "notAfter {} has passed",
                crate::model::moment(not_after_s)
            ));
        }
        if not_after_s > now_s + profile.validity_s + CLOCK_TOLERANCE_S {
            return Err(format!(
                "notAfter {} is beyond payra's validity of {} days",
                crate::model::moment(not_after_s),
                profile.validity_s / 86_400
            ));
        }
        if not_after_s > self.issuer_not_after_s {
            return Err("it outlives the upstream CA's certificate".into());
        }
        self.check_extensions(&cert)?;
        Ok(UpstreamCertificate {
            serial,
            certificate: DeviceCertificate {
                der: der.to_vec(),
                subject: format!("CN={},O={DEVICE_ORGANIZATION}", subscriber.as_str()),
                not_before_s,
                not_after_s,
            },
        })
    }

    fn check_extensions(&self, cert: &X509Certificate<'_>) -> std::result::Result<(), String> {
        let mut digital_signature = false;
        let mut client_auth = false;
        let mut crl_urls = Vec::new();
        let mut ocsp_urls = Vec::new();
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err("it is a CA certificate".into())
                }
                ParsedExtension::BasicConstraints(_) => {}
                ParsedExtension::KeyUsage(ku) => {
                    if ku.key_cert_sign() || ku.crl_sign() {
                        return Err("its key usage allows signing certificates or CRLs".into());
                    }
                    digital_signature = ku.digital_signature();
                    if !digital_signature {
                        return Err("its key usage lacks digitalSignature".into());
                    }
                    if ku.flags != 1 {
                        return Err(format!("its key usage ({ku}) goes beyond digitalSignature"));
                    }
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    if eku.any || eku.server_auth || eku.code_signing || eku.email_protection {
                        return Err("its extended key usage goes beyond clientAuth".to_string());
                    }
                    if eku.time_stamping || eku.ocsp_signing || !eku.other.is_empty() {
                        return Err("its extended key usage goes beyond clientAuth".to_string());
                    }
                    client_auth = eku.client_auth;
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    return Err(match san.general_names.first() {
                        Some(name) => format!("it names {name} payra did not ask for"),
                        None => "it carries an empty subjectAltName".into(),
                    });
                }
                ParsedExtension::ParseError { error } => {
                    return Err(format!("its extension {} does not parse: {error}", ext.oid))
                }
                ParsedExtension::CRLDistributionPoints(points) => {
                    for point in points.iter() {
                        if let Some(x509_parser::extensions::DistributionPointName::FullName(
                            names,
                        )) = &point.distribution_point
                        {
                            for name in names {
                                if let GeneralName::URI(uri) = name {
                                    crl_urls.push(uri.to_string());
                                }
                            }
                        }
                    }
                }
                ParsedExtension::AuthorityInfoAccess(aia) => {
                    for access in aia.iter() {
                        if access.access_method
                            == x509_parser::oid_registry::OID_PKIX_ACCESS_DESCRIPTOR_OCSP
                        {
                            if let GeneralName::URI(uri) = &access.access_location {
                                ocsp_urls.push(uri.to_string());
                            }
                        }
                    }
                }
                ParsedExtension::SubjectKeyIdentifier(_)
                | ParsedExtension::AuthorityKeyIdentifier(_)
                | ParsedExtension::CertificatePolicies(_) => {}
                // Whatever x509-parser does not decode: a subjectAltName payra did not ask
                // for all the same.
                _ if ext.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME => {
                    return Err("it carries a subjectAltName payra did not ask for".into())
                }
                _ if ext.critical => {
                    return Err(format!(
                        "it carries an unknown critical extension {}",
                        ext.oid
                    ))
                }
                _ => {}
            }
        }
        if !digital_signature {
            return Err("its key usage lacks digitalSignature".into());
        }
        if !client_auth {
            return Err("its extended key usage lacks clientAuth".into());
        }
        let (crl_url, ocsp_url) = match &self.status {
            StatusSource::Upstream { crl_url, ocsp_url } => (crl_url, ocsp_url),
            StatusSource::PayraView => (&None, &None),
        };
        for (what, expected, found) in [
            ("CRL distribution point", crl_url, &crl_urls),
            ("OCSP URL", ocsp_url, &ocsp_urls),
        ] {
            if let Some(expected) = expected {
                if found.as_slice() != std::slice::from_ref(expected) {
                    return Err(format!("its {what} is {found:?}, not {expected:?}"));
                }
            }
        }
        Ok(())
    }
}

/// Refuses, in RA mode, a CSR the upstream would read more from than its key: a subject with
/// anything besides a CN (CFSSL copies C, ST, L, O and OU into the certificate where payra
/// sets none) or requested extensions. Such a certificate would fail payra's check after the
/// upstream had issued it; refusing first costs the upstream nothing.
pub fn check_csr_for_upstream(csr_der: &[u8]) -> Result<()> {
    use x509_parser::certification_request::X509CertificationRequest;
    let (_, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|_| Error::invalid("csr_der", "is not a DER PKCS#10 certification request"))?;
    let info = &csr.certification_request_info;
    let only_cn = info
        .subject
        .iter_attributes()
        .all(|attribute| *attribute.attr_type() == x509_parser::oid_registry::OID_X509_COMMON_NAME);
    if !only_cn {
        return Err(Error::invalid(
            "csr_der",
            format!(
                "its subject {} holds more than a CN; here the certificate authority would copy \
                 it into the certificate, so build the request with a CN only (payra sets the \
                 certificate's subject)",
                info.subject
            ),
        ));
    }
    let extension_request = x509_parser::oid_registry::OID_PKCS9_EXTENSION_REQUEST;
    if info
        .attributes()
        .iter()
        .any(|attribute| attribute.oid == extension_request)
    {
        return Err(Error::invalid(
            "csr_der",
            "requests extensions; here the certificate authority may copy them into the \
             certificate, so build the request without any (payra decides every extension)",
        ));
    }
    Ok(())
}

/// The subject must be exactly `CN=<subscriber>, O=payra device` (in either order).
fn check_subject(
    cert: &X509Certificate<'_>,
    subscriber: &SubscriberRef,
) -> std::result::Result<(), String> {
    let mut common_name = None;
    let mut organization = None;
    let mut others = 0;
    for attribute in cert.subject().iter_attributes() {
        let value = attribute.as_str().ok();
        let oid = attribute.attr_type();
        if *oid == x509_parser::oid_registry::OID_X509_COMMON_NAME && common_name.is_none() {
            common_name = value;
        } else if *oid == x509_parser::oid_registry::OID_X509_ORGANIZATION_NAME
            && organization.is_none()
        {
            organization = value;
        } else {
            others += 1;
        }
    }
    if common_name != Some(subscriber.as_str())
        || organization != Some(DEVICE_ORGANIZATION)
        || others > 0
    {
        return Err(format!(
            "subject {} is not the CN={},O={DEVICE_ORGANIZATION} payra asked for",
            cert.subject(),
            subscriber.as_str()
        ));
    }
    Ok(())
}

/// The authorityKeyIdentifier of a certificate (empty when it has none).
pub fn authority_key_id(der: &[u8]) -> Vec<u8> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| id.0.to_vec())
            }
            _ => None,
        })
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests;
