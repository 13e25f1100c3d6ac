//! The device certificate profile. payra decides every field: the CSR contributes only the
//! public key (rcgen's defaults are unsafe for a CA, so nothing is left to them).

use der::asn1::Ia5String;
use der::Encode;
use rcgen::{
    CertificateParams, CrlDistributionPoint, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    SignatureAlgorithm, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{AccessDescription, AuthorityInfoAccessSyntax};

use super::csr::DevicePublicKey;
use super::pki::SharedSigner;
use super::ROLE_URI_PREFIX;
use crate::error::{Error, Result};
use crate::model::Serial;

/// OID of the `authorityInfoAccess` extension (RFC 5280 4.2.2.1).
const OID_AUTHORITY_INFO_ACCESS: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 1];

/// Role URI carried by every device certificate.
pub const DEVICE_ROLE: &str = "device";
/// Prefix of the URI SAN naming a device certificate's subscriber reference.
pub const SUBSCRIBER_URI_PREFIX: &str = "urn:payra:subscriber:";

/// The adjustable part of the device profile, from configuration.
#[derive(Debug, Clone)]
pub struct DeviceProfile {
    pub validity_s: i64,
    pub backdate_s: i64,
    pub crl_url: String,
    pub ocsp_url: String,
    /// The issuing CA certificate's notAfter: no certificate outlives its issuer.
    pub issuer_not_after_s: i64,
}

impl DeviceProfile {
    /// notAfter of a certificate issued at `now_s` for `validity_s`: clamped to the issuer's
    /// notAfter. Refuses when the issuer has expired (nothing it signs could be valid).
    fn not_after(&self, now_s: i64, validity_s: i64) -> Result<i64> {
        if now_s >= self.issuer_not_after_s {
            return Err(Error::FailedPrecondition(format!(
                "the issuing CA certificate expired at {}; install a new issuing CA before \
                 issuing certificates",
                crate::model::moment(self.issuer_not_after_s)
            )));
        }
        Ok(now_s
            .saturating_add(validity_s)
            .min(self.issuer_not_after_s))
    }
}

/// The opaque reference a device certificate names its subscriber by: 32 lowercase hex
/// digits (128 random bits). Certificates are shown to every TLS peer and relying party, so
/// they carry this instead of the customer and device ids; payra's record maps it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberRef(String);

impl SubscriberRef {
    /// A fresh random reference.
    pub fn random() -> SubscriberRef {
        SubscriberRef(hex::encode(rand::random::<[u8; 16]>()))
    }

    /// A reference read back from a record (checked: 32 lowercase hex digits).
    pub fn parse(value: &str) -> Option<SubscriberRef> {
        (value.len() == 32
            && value
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| SubscriberRef(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An issued device certificate and the facts payra records about it.
#[derive(Debug, Clone)]
pub struct DeviceCertificate {
    pub der: Vec<u8>,
    pub subject: String,
    pub not_before_s: i64,
    pub not_after_s: i64,
}

impl PublicKeyData for DevicePublicKey {
    fn der_bytes(&self) -> &[u8] {
        self.sec1()
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

fn time_from_unix(seconds: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(seconds)
        .map_err(|e| Error::internal(format!("time out of range: {e}")))
}

fn uri(value: String) -> Result<SanType> {
    let ia5 = value
        .try_into()
        .map_err(|e: rcgen::Error| Error::internal(format!("URI SAN: {e}")))?;
    Ok(SanType::URI(ia5))
}

/// The DER `authorityInfoAccess` value pointing at the OCSP responder.
fn authority_info_access(ocsp_url: &str) -> Result<Vec<u8>> {
    let location = Ia5String::new(ocsp_url)
        .map_err(|e| Error::internal(format!("OCSP URL is not IA5: {e}")))?;
    let aia = AuthorityInfoAccessSyntax(vec![AccessDescription {
        access_method: const_oid::db::rfc5280::ID_AD_OCSP,
        access_location: GeneralName::UniformResourceIdentifier(location),
    }]);
    aia.to_der()
        .map_err(|e| Error::internal(format!("encoding AIA: {e}")))
}

/// Signs a client certificate for a payment service or an operator: subject
/// `CN=<name>, OU=<role>, O=payra`, URI SAN `urn:payra:role:<role>`, KeyUsage
/// digitalSignature, EKU clientAuth, CA:false, SKI, AKI, CRL distribution point.
#[allow(clippy::too_many_arguments)]
pub fn issue_client_certificate(
    issuer: &Issuer<'static, SharedSigner>,
    profile: &DeviceProfile,
    key: &DevicePublicKey,
    serial: &Serial,
    role: &str,
    name: &str,
    now_s: i64,
    validity_s: i64,
) -> Result<DeviceCertificate> {
    let not_before_s = now_s - profile.backdate_s;
    let not_after_s = profile.not_after(now_s, validity_s)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "payra");
    dn.push(DnType::OrganizationalUnitName, role);
    dn.push(DnType::CommonName, name);
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
    params.not_before = time_from_unix(not_before_s)?;
    params.not_after = time_from_unix(not_after_s)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.subject_alt_names = vec![uri(format!("{ROLE_URI_PREFIX}{role}"))?];
    params.crl_distribution_points = vec![CrlDistributionPoint {
        uris: vec![profile.crl_url.clone()],
    }];
    let cert = params
        .signed_by(key, issuer)
        .map_err(|e| super::signer::signing_error("signing client certificate", e))?;
    Ok(DeviceCertificate {
        der: cert.der().to_vec(),
        subject: format!("CN={name},OU={role},O=payra"),
        not_before_s,
        not_after_s,
    })
}

/// Signs an SM2 device certificate for the SM2 `key` with the SM2 issuing CA: the profile of
/// [`issue_device_certificate`] (GM/T 0015 asks for nothing it lacks), signed SM2-with-SM3,
/// with `C=CN` in the subject and the SM2 CA's CRL in its distribution point.
pub fn issue_sm2_device_certificate(
    issuer: &super::sm2::Sm2Issuer,
    profile: &DeviceProfile,
    key: &DevicePublicKey,
    serial: &Serial,
    subscriber: &SubscriberRef,
    now_s: i64,
) -> Result<DeviceCertificate> {
    use x509_cert::ext::pkix::KeyUsages;
    if key.algorithm() != crate::model::KeyAlgorithm::Sm2 {
        return Err(Error::internal(
            "an SM2 certificate for a key that is not SM2",
        ));
    }
    let not_before_s = now_s - profile.backdate_s;
    let not_after_s = profile.not_after(now_s, profile.validity_s)?;
    let subject = format!("CN={},O=payra device,C=CN", subscriber.as_str());
    let der = issuer.sign_certificate(&super::sm2::CertificateSpec {
        serial: serial.as_bytes(),
        subject: super::sm2::name(&subject)?,
        not_before_s,
        not_after_s,
        subject_key: key.point(),
        ca_path_len: None,
        key_usage: &[KeyUsages::DigitalSignature],
        client_auth: true,
        uris: &[
            format!("{ROLE_URI_PREFIX}{DEVICE_ROLE}"),
            format!("{SUBSCRIBER_URI_PREFIX}{}", subscriber.as_str()),
        ],
        crl_url: Some(&profile.crl_url),
        ocsp_url: Some(&profile.ocsp_url),
    })?;
    Ok(DeviceCertificate {
        der,
        subject,
        not_before_s,
        not_after_s,
    })
}

/// Signs a device certificate for `key`, naming its subscriber by an opaque reference.
///
/// Subject `CN=<subscriber ref>, O=payra device`; URI SANs `urn:payra:role:device` and
/// `urn:payra:subscriber:<ref>` (no customer or device id: a certificate is shown to every
/// TLS peer and relying party); KeyUsage digitalSignature (critical), EKU clientAuth,
/// BasicConstraints CA:false (critical), SKI, AKI, CRL distribution point and OCSP AIA;
/// notBefore `now - backdate`, notAfter `now + validity` or the issuer's notAfter, whichever
/// comes first.
pub fn issue_device_certificate(
    issuer: &Issuer<'static, SharedSigner>,
    profile: &DeviceProfile,
    key: &DevicePublicKey,
    serial: &Serial,
    subscriber: &SubscriberRef,
    now_s: i64,
) -> Result<DeviceCertificate> {
    if key.algorithm() != crate::model::KeyAlgorithm::P256 {
        return Err(Error::internal(
            "a P-256 certificate for a key that is not P-256",
        ));
    }
    let not_before_s = now_s - profile.backdate_s;
    let not_after_s = profile.not_after(now_s, profile.validity_s)?;

    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "payra device");
    dn.push(DnType::CommonName, subscriber.as_str());

    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
    params.not_before = time_from_unix(not_before_s)?;
    params.not_after = time_from_unix(not_after_s)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.subject_alt_names = vec![
        uri(format!("{ROLE_URI_PREFIX}{DEVICE_ROLE}"))?,
        uri(format!("{SUBSCRIBER_URI_PREFIX}{}", subscriber.as_str()))?,
    ];
    params.crl_distribution_points = vec![CrlDistributionPoint {
        uris: vec![profile.crl_url.clone()],
    }];
    params.custom_extensions = vec![CustomExtension::from_oid_content(
        OID_AUTHORITY_INFO_ACCESS,
        authority_info_access(&profile.ocsp_url)?,
    )];

    let cert = params
        .signed_by(key, issuer)
        .map_err(|e| super::signer::signing_error("signing device certificate", e))?;
    Ok(DeviceCertificate {
        der: cert.der().to_vec(),
        subject: format!("CN={},O=payra device", subscriber.as_str()),
        not_before_s,
        not_after_s,
    })
}
