//! The check of what an upstream returns, against certificates made to differ from payra's
//! profile one way at a time; and [`LocalUpstream`], an upstream that signs in-process, for
//! the RA's tests of what happens around the upstream (the end-to-end tests use CFSSL).

use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, CrlDistributionPoint, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use super::*;
use crate::config::UpstreamConfig;

/// An upstream CA in-process: it signs what payra asks with rcgen, as a CFSSL profile for
/// devices would, with `adjust` applied to every certificate, and records revocations.
pub(crate) struct LocalUpstream {
    /// As configured by the last [`LocalUpstream::issuer`].
    status: Mutex<StatusSource>,
    issuer: Issuer<'static, KeyPair>,
    pub(crate) issuer_der: Vec<u8>,
    adjust: fn(&mut CertificateParams),
    pub(crate) revoked: Mutex<Vec<(Serial, RevocationReason)>>,
    /// While set, every call fails as an unreachable upstream's would.
    pub(crate) down: std::sync::atomic::AtomicBool,
    /// Run with each revocation request, before it is answered.
    pub(crate) on_revoke: Mutex<Option<RevokeHook>>,
}

impl LocalUpstream {
    pub(crate) fn new(adjust: fn(&mut CertificateParams)) -> LocalUpstream {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = organization_name("Licensed Device CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
        let issuer_der = params.self_signed(&key).unwrap().der().to_vec();
        LocalUpstream {
            status: Mutex::new(StatusSource::PayraView),
            issuer: Issuer::new(params, key),
            issuer_der,
            adjust,
            revoked: Mutex::new(Vec::new()),
            down: Default::default(),
            on_revoke: Mutex::new(None),
        }
    }

    /// An issuer around it, with `config`'s limits.
    pub(crate) fn issuer(self: &Arc<Self>, config: &UpstreamConfig) -> UpstreamIssuer {
        *self.status.lock().unwrap() = StatusSource::from_config(config);
        UpstreamIssuer::new(self.clone(), vec![self.issuer_der.clone()], config).unwrap()
    }

    /// The device profile a CFSSL profile for devices gives: the requested subject,
    /// digitalSignature, clientAuth, a year.
    fn sign_now(&self, request: &SigningRequest) -> Vec<u8> {
        let key = crate::ca::parse_device_csr(&request.csr_der).unwrap();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, request.organization.as_str());
        name.push(DnType::CommonName, request.common_name.as_str());
        params.distinguished_name = name;
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 20]>()[..19]));
        params.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
        params.not_after = params.not_before + Duration::seconds(request.validity_s);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        (self.adjust)(&mut params);
        params.signed_by(&key, &self.issuer).unwrap().der().to_vec()
    }
}

impl UpstreamCa for LocalUpstream {
    fn describe(&self) -> String {
        "an in-process test upstream".into()
    }

    fn status_source(&self) -> StatusSource {
        self.status.lock().unwrap().clone()
    }

    fn sign<'a>(
        &'a self,
        request: &'a SigningRequest,
    ) -> BoxFuture<'a, std::result::Result<Vec<u8>, UpstreamFailure>> {
        Box::pin(async move {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(UpstreamFailure::Unreachable("connection refused".into()));
            }
            Ok(self.sign_now(request))
        })
    }

    fn revoke<'a>(
        &'a self,
        request: &'a RevocationRequest,
    ) -> BoxFuture<'a, std::result::Result<(), UpstreamFailure>> {
        Box::pin(async move {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(UpstreamFailure::Unreachable("connection refused".into()));
            }
            if let Some(hook) = self.on_revoke.lock().unwrap().as_mut() {
                hook(&request.serial);
            }
            self.revoked
                .lock()
                .unwrap()
                .push((request.serial.clone(), request.reason));
            Ok(())
        })
    }
}

/// Run by [`LocalUpstream`] with each revocation request.
pub(crate) type RevokeHook = Box<dyn FnMut(&Serial) + Send>;

/// A change to a certificate's parameters before it is signed.
type Adjust = fn(&mut CertificateParams);

fn organization_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Licensed CA");
    name.push(DnType::CommonName, common_name);
    name
}

fn profile() -> DeviceProfile {
    DeviceProfile {
        validity_s: 365 * 86_400,
        backdate_s: 300,
        crl_url: "http://payra.example/crl".into(),
        ocsp_url: "http://payra.example/ocsp".into(),
        issuer_not_after_s: i64::MAX,
    }
}

/// Has `upstream` sign for a fresh device key and checks the answer, with `config`.
fn checked(
    adjust: fn(&mut CertificateParams),
    config: &UpstreamConfig,
) -> std::result::Result<UpstreamCertificate, String> {
    let upstream = Arc::new(LocalUpstream::new(adjust));
    let issuer = upstream.issuer(config);
    let device = crate::client::DeviceKey::generate();
    let csr = device.csr_der("phone").unwrap();
    let key = crate::ca::parse_device_csr(&csr).unwrap();
    let subscriber = SubscriberRef::random();
    let der = upstream.sign_now(&SigningRequest {
        csr_der: csr,
        common_name: subscriber.as_str().into(),
        organization: DEVICE_ORGANIZATION.into(),
        validity_s: profile().validity_s,
    });
    issuer.check(
        &der,
        &profile(),
        &key,
        &subscriber,
        crate::clock::Clock::now_s(&crate::clock::SystemClock),
    )
}

#[test]
fn a_certificate_in_the_profile_is_accepted_with_its_serial_and_dates() {
    let accepted = checked(|_| {}, &UpstreamConfig::default()).unwrap();
    assert_eq!(accepted.serial.as_bytes().len(), 19);
    assert!(accepted.certificate.subject.ends_with(",O=payra device"));
    assert!(accepted.certificate.not_after_s > accepted.certificate.not_before_s);
}

#[test]
fn a_certificate_outside_the_profile_is_refused_naming_what_differs() {
    let cases: [(&str, Adjust); 13] = [
        ("goes beyond digitalSignature", |p| {
            p.key_usages.push(KeyUsagePurpose::ContentCommitment)
        }),
        ("lies further back", |p| {
            p.not_before = OffsetDateTime::now_utc() - Duration::days(3)
        }),
        ("payra did not ask for", |p| {
            p.subject_alt_names = vec![SanType::URI("urn:x".try_into().unwrap())]
        }),
        ("beyond clientAuth", |p| {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth)
        }),
        ("lacks clientAuth", |p| p.extended_key_usages.clear()),
        ("lacks digitalSignature", |p| {
            p.key_usages = vec![KeyUsagePurpose::KeyAgreement]
        }),
        ("a CA certificate", |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
        }),
        ("signing certificates", |p| {
            p.key_usages.push(KeyUsagePurpose::KeyCertSign)
        }),
        ("is not the CN=", |p| {
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, "extra")
        }),
        ("payra did not ask for", |p| {
            p.subject_alt_names = vec![SanType::DnsName("phone.example".try_into().unwrap())]
        }),
        ("beyond payra's validity", |p| {
            p.not_after = p.not_before + Duration::days(800)
        }),
        ("in the future", |p| {
            p.not_before = OffsetDateTime::now_utc() + Duration::days(2)
        }),
        ("has passed", |p| {
            p.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
            p.not_after = OffsetDateTime::now_utc() - Duration::minutes(1);
        }),
    ];
    for (expected, adjust) in cases {
        let refused = checked(adjust, &UpstreamConfig::default()).unwrap_err();
        assert!(refused.contains(expected), "{expected}: {refused}");
    }
}

#[test]
fn a_certificate_from_another_ca_or_for_another_key_is_refused() {
    let upstream = Arc::new(LocalUpstream::new(|_| {}));
    // Same name, another key: an impostor's CA.
    let impostor = Arc::new(LocalUpstream::new(|_| {}));
    let issuer = upstream.issuer(&UpstreamConfig::default());
    let device = crate::client::DeviceKey::generate();
    let csr = device.csr_der("phone").unwrap();
    let key = crate::ca::parse_device_csr(&csr).unwrap();
    let subscriber = SubscriberRef::random();
    let request = SigningRequest {
        csr_der: csr,
        common_name: subscriber.as_str().into(),
        organization: DEVICE_ORGANIZATION.into(),
        validity_s: profile().validity_s,
    };
    let now_s = crate::clock::Clock::now_s(&crate::clock::SystemClock);
    let forged = impostor.sign_now(&request);
    let refused = issuer
        .check(&forged, &profile(), &key, &subscriber, now_s)
        .unwrap_err();
    assert!(refused.contains("signature does not verify"), "{refused}");
    assert_eq!(
        issuer.signed_by_upstream(&forged),
        None,
        "not the upstream's to revoke"
    );

    let other = crate::client::DeviceKey::generate()
        .csr_der("phone")
        .unwrap();
    let other_key = crate::ca::parse_device_csr(&other).unwrap();
    let genuine = upstream.sign_now(&request);
    let refused = issuer
        .check(&genuine, &profile(), &other_key, &subscriber, now_s)
        .unwrap_err();
    assert!(refused.contains("another key"), "{refused}");
    assert!(issuer.signed_by_upstream(&genuine).is_some());
    let refused = issuer
        .check(&genuine, &profile(), &key, &SubscriberRef::random(), now_s)
        .unwrap_err();
    assert!(refused.contains("subject"), "{refused}");
    let refused = issuer
        .check(
            b"\x30\x03\x02\x01\x01",
            &profile(),
            &key,
            &subscriber,
            now_s,
        )
        .unwrap_err();
    assert!(refused.contains("does not parse"), "{refused}");
}

#[test]
fn configured_crl_and_ocsp_urls_must_be_the_certificates() {
    let config = UpstreamConfig {
        crl_url: Some("http://ca.example/crl".into()),
        ..UpstreamConfig::default()
    };
    let refused = checked(|_| {}, &config).unwrap_err();
    assert!(refused.contains("CRL distribution point"), "{refused}");
    checked(
        |p| {
            p.crl_distribution_points = vec![CrlDistributionPoint {
                uris: vec!["http://ca.example/crl".into()],
            }]
        },
        &config,
    )
    .unwrap();
}

#[test]
fn an_issuer_file_must_start_with_a_ca_certificate() {
    let upstream = Arc::new(LocalUpstream::new(|_| {}));
    let config = UpstreamConfig::default();
    let empty = UpstreamIssuer::new(upstream.clone(), vec![], &config).unwrap_err();
    assert!(empty.to_string().contains("no PEM certificate"), "{empty}");
    let device = crate::client::DeviceKey::generate();
    let leaf = upstream.sign_now(&SigningRequest {
        csr_der: device.csr_der("phone").unwrap(),
        common_name: "x".into(),
        organization: DEVICE_ORGANIZATION.into(),
        validity_s: 86_400,
    });
    let not_ca = UpstreamIssuer::new(upstream, vec![leaf], &config).unwrap_err();
    assert!(not_ca.to_string().contains("not a CA"), "{not_ca}");
}

#[tokio::test]
async fn a_call_past_its_deadline_or_beyond_the_in_flight_bound_is_unreachable_and_handed_back() {
    struct Silent;
    impl UpstreamCa for Silent {
        fn describe(&self) -> String {
            "silent".into()
        }
        fn status_source(&self) -> StatusSource {
            StatusSource::PayraView
        }
        fn sign<'a>(
            &'a self,
            _: &'a SigningRequest,
        ) -> BoxFuture<'a, std::result::Result<Vec<u8>, UpstreamFailure>> {
            Box::pin(std::future::pending())
        }
        fn revoke<'a>(
            &'a self,
            _: &'a RevocationRequest,
        ) -> BoxFuture<'a, std::result::Result<(), UpstreamFailure>> {
            Box::pin(std::future::pending())
        }
    }
    let ca = LocalUpstream::new(|_| {});
    let config = UpstreamConfig {
        timeout_ms: 50,
        max_in_flight: 1,
        ..UpstreamConfig::default()
    };
    let issuer =
        Arc::new(UpstreamIssuer::new(Arc::new(Silent), vec![ca.issuer_der], &config).unwrap());
    let request = RevocationRequest {
        serial: Serial::random(),
        authority_key_id: vec![],
        reason: RevocationReason::KeyCompromise,
    };
    let signing = SigningRequest {
        csr_der: vec![],
        common_name: "x".into(),
        organization: DEVICE_ORGANIZATION.into(),
        validity_s: 86_400,
    };
    let first = tokio::spawn({
        let issuer = issuer.clone();
        let signing = signing.clone();
        async move { issuer.sign(signing).await }
    });
    tokio::task::yield_now().await;
    // The first call holds the only signing permit, past its deadline too.
    let (busy, late) = issuer.sign(signing.clone()).await.unwrap_err();
    assert_eq!(busy.brief(), "too many requests are waiting for it");
    assert!(late.is_none());
    let (timed_out, late) = first.await.unwrap().unwrap_err();
    assert!(
        timed_out.to_string().contains("no answer within 50 ms"),
        "{timed_out}"
    );
    assert_eq!(timed_out.brief(), "it did not answer in time");
    let late = late.expect("the call is handed back");
    assert!(!late.is_finished());
    let (still_busy, _) = issuer.sign(signing).await.unwrap_err();
    assert_eq!(still_busy.brief(), "too many requests are waiting for it");
    late.abort();
    // Revocations take no signing permit; each has the deadline.
    let late_revoke = issuer.revoke(&request).await.unwrap_err();
    assert!(
        late_revoke.to_string().contains("no answer within 50 ms"),
        "{late_revoke}"
    );
}
