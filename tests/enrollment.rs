//! End to end: tokens, enrollment and certificate content, over real TLS against a real
//! server, cross-checked with OpenSSL.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use payra::client::DeviceKey;
use payra::clock::Clock;
use payra::wire::proto;
use tonic::Code;
use x509_parser::prelude::*;

fn write(dir: &std::path::Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test]
async fn ok_enrolled_certificate_verifies_with_openssl() {
    let server = TestServer::start().await;
    let (_, issued) = server.enroll("alice", "phone-1").await;
    assert_eq!(issued.chain_der.len(), 1, "chain is the issuing CA only");
    openssl_verifies(&server, &issued);
}

/// Asserts that `openssl verify` accepts the issued leaf for client auth, with the chain
/// from the answer and payra's root.
fn openssl_verifies(server: &TestServer, issued: &proto::EnrollResponse) {
    let dir = tempfile::tempdir().unwrap();
    let leaf = write(dir.path(), "leaf.pem", &pem(&issued.certificate_der));
    let chain = write(dir.path(), "chain.pem", &pem(&issued.chain_der[0]));
    let root = server.certs().join("root.pem");
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        path_str(&root),
        "-untrusted",
        &chain,
        "-purpose",
        "sslclient",
        &leaf,
    ]);
    assert!(ok, "openssl verify failed: {out}");
    assert!(out.contains(": OK"), "{out}");
}

#[tokio::test]
async fn ok_certificate_content_is_decided_by_payra() {
    let server = TestServer::start().await;
    let (key, issued) = server.enroll("cust-7", "dev-7").await;
    let (_, cert) = X509Certificate::from_der(&issued.certificate_der).unwrap();

    assert_eq!(hex::encode(cert.raw_serial()), issued.serial);
    // The certificate names its subscriber by an opaque reference, never by the customer or
    // device id (every TLS peer and relying party sees it); the answer carries the ids.
    let subject = cert.subject().to_string();
    assert_eq!(issued.subscriber_ref.len(), 32);
    assert_eq!(
        subject,
        format!("O=payra device, CN={}", issued.subscriber_ref)
    );
    assert_eq!(
        (issued.customer_id.as_str(), issued.device_id.as_str()),
        ("cust-7", "dev-7")
    );
    let der_text = String::from_utf8_lossy(&issued.certificate_der);
    assert!(
        !der_text.contains("cust-7") && !der_text.contains("dev-7"),
        "ids in the DER"
    );
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.secret().public_key().to_sec1_bytes().as_ref()
    );

    let now = server.clock.now_s();
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    assert_eq!(not_before, issued.not_before_unix_s);
    assert_eq!(not_after, issued.not_after_unix_s);
    assert_eq!(not_before, now - 300, "backdated by the configured 300 s");
    assert_eq!(not_after, now + 365 * 86_400);

    let bc = cert.basic_constraints().unwrap().expect("basicConstraints");
    assert!(bc.critical && !bc.value.ca);
    let ku = cert.key_usage().unwrap().expect("keyUsage");
    assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().expect("EKU");
    assert!(eku.value.client_auth && !eku.value.server_auth);
    let mut have_ski = false;
    let mut have_aki = false;
    let mut crl_urls = Vec::new();
    let mut ocsp_urls = Vec::new();
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(_) => have_ski = true,
            ParsedExtension::AuthorityKeyIdentifier(_) => have_aki = true,
            ParsedExtension::CRLDistributionPoints(points) => {
                for point in points.iter() {
                    if let Some(DistributionPointName::FullName(names)) = &point.distribution_point
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
                for desc in &aia.accessdescs {
                    if let GeneralName::URI(uri) = desc.access_location {
                        ocsp_urls.push(uri.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    assert!(have_ski && have_aki);
    // The URLs follow the HTTP listener as bound (the config asked for port 0).
    assert_eq!(crl_urls, vec![server.http_url("/crl")]);
    assert_eq!(ocsp_urls, vec![server.http_url("/ocsp")]);
}

#[tokio::test]
async fn ok_long_device_id_keeps_the_common_name_within_64_characters() {
    let server = TestServer::start().await;
    let device = format!("dev-{}", "x".repeat(124));
    assert_eq!(device.len(), 128, "the longest device id accepted");
    let (_, issued) = server.enroll("cust-8", &device).await;
    let (_, cert) = X509Certificate::from_der(&issued.certificate_der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        cn, issued.subscriber_ref,
        "the CN is the 32-digit reference"
    );
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        sans,
        vec![
            "urn:payra:role:device".to_string(),
            format!("urn:payra:subscriber:{}", issued.subscriber_ref)
        ]
    );
    assert_eq!(issued.device_id, device, "the whole id is in the answer");
    openssl_verifies(&server, &issued);
}

#[tokio::test]
async fn ok_a_leaf_never_outlives_its_issuer() {
    let server = TestServer::start_with(|c| c.issuance.validity_days = 3650).await;
    let (_, issued) = server.enroll("cust-9", "dev-9").await;
    let (_, leaf) = X509Certificate::from_der(&issued.certificate_der).unwrap();
    let (_, issuer) = X509Certificate::from_der(&issued.chain_der[0]).unwrap();
    let issuer_end = issuer.validity().not_after.timestamp();
    assert!(
        server.clock.now_s() + 3650 * 86_400 > issuer_end,
        "the test needs a clamp"
    );
    assert_eq!(leaf.validity().not_after.timestamp(), issuer_end);
    assert_eq!(issued.not_after_unix_s, issuer_end);

    // Once the issuer has expired, nothing is issued.
    server.clock.set_ms((issuer_end + 1) * 1000);
    let token = server.token("cust-9").await;
    let key = DeviceKey::generate();
    let err = server
        .anonymous()
        .await
        .enroll(
            &token,
            key.csr_der("dev-10").unwrap(),
            "dev-10",
            device_info(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("issuing CA"), "{err:?}");
}

#[tokio::test]
async fn ok_openssl_made_csr_is_accepted_and_its_requests_ignored() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The CSR asks for a CA certificate, a server name and an evil subject: none may appear.
    let (_, csr) = openssl_key_and_csr(
        dir.path(),
        "/CN=evil.example.com/O=Attacker",
        &[
            "basicConstraints=critical,CA:TRUE",
            "subjectAltName=DNS:evil.example.com",
            "keyUsage=keyCertSign",
        ],
    );
    let issued = server
        .enroll_csr("bob", "bob-phone", csr)
        .await
        .expect("openssl CSR accepted");
    let (_, cert) = X509Certificate::from_der(&issued.certificate_der).unwrap();
    let text = format!("{:?}", cert.tbs_certificate);
    assert!(!cert.subject().to_string().contains("evil"));
    assert!(!cert.subject().to_string().contains("Attacker"));
    assert!(!text.contains("evil.example.com"));
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    assert!(!cert.key_usage().unwrap().unwrap().value.key_cert_sign());
}

async fn enroll_openssl_key(server: &TestServer, genkey: &[&str]) -> payra::client::ClientError {
    let dir = tempfile::tempdir().unwrap();
    let (_, csr) = openssl_csr(dir.path(), genkey, "/CN=x", &[]);
    server
        .enroll_csr("carol", "carol-phone", csr)
        .await
        .expect_err("must be refused")
}

#[tokio::test]
async fn fail_rsa_and_p384_keys_are_refused_naming_the_key_type() {
    let server = TestServer::start().await;
    let cases: [(&[&str], &str); 2] = [
        (
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            "RSA-2048",
        ),
        (
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
            ],
            "P-384",
        ),
    ];
    for (openssl_args, key_type) in cases {
        let status = enroll_openssl_key(&server, openssl_args).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{key_type}");
        let message = status.message();
        assert!(
            message.contains("csr_der") && message.contains(key_type),
            "{message}"
        );
    }
}

#[tokio::test]
async fn fail_csr_with_broken_signature_or_garbage() {
    let server = TestServer::start().await;
    let key = DeviceKey::generate();
    let mut csr = key.csr_der("d").unwrap();
    let last = csr.len() - 1;
    csr[last] ^= 0x01; // inside the signature's s value
    let token = server.token("dave").await;
    let client = server.anonymous().await;
    for (case, bytes) in [
        ("broken signature", csr),
        ("truncated", key.csr_der("d").unwrap()[..40].to_vec()),
        ("empty", Vec::new()),
        ("oversize", vec![0x30; 8 * 1024 + 1]),
    ] {
        let status = client
            .enroll(&token, bytes, "dave-phone", device_info())
            .await
            .expect_err(case);
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        assert!(
            status.message().starts_with("csr_der"),
            "{case}: {}",
            status.message()
        );
    }
    // The token was not consumed by any of the failures.
    client
        .enroll(
            &token,
            key.csr_der("d").unwrap(),
            "dave-phone",
            device_info(),
        )
        .await
        .expect("token still works after refused requests");
}

#[tokio::test]
async fn fail_token_reuse_unknown_and_expired() {
    let server = TestServer::start().await;
    let client = server.anonymous().await;
    let token = server.token("erin").await;
    let csr = || DeviceKey::generate().csr_der("d").unwrap();
    client
        .enroll(&token, csr(), "erin-1", device_info())
        .await
        .expect("first use");
    let reuse = client
        .enroll(&token, csr(), "erin-2", device_info())
        .await
        .unwrap_err();
    assert_eq!(reuse.code(), Code::FailedPrecondition);
    assert!(
        reuse.message().contains("already been used"),
        "{}",
        reuse.message()
    );

    let unknown = client
        .enroll("payra_et_00112233", csr(), "erin-3", device_info())
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);

    let expiring = server
        .service()
        .await
        .create_enrollment_token("erin", 60)
        .await
        .unwrap();
    server.clock.advance_ms(60_000);
    let expired = client
        .enroll(&expiring.token, csr(), "erin-4", device_info())
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::FailedPrecondition);
    assert!(
        expired.message().contains("expired"),
        "{}",
        expired.message()
    );
}

#[tokio::test]
async fn ok_concurrent_uses_of_one_token_give_exactly_one_certificate() {
    let server = Arc::new(TestServer::start().await);
    let token = server.token("frank").await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = server.anonymous().await;
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let csr = DeviceKey::generate().csr_der("d").unwrap();
            client
                .enroll(&token, csr, &format!("frank-{i}"), device_info())
                .await
        }));
    }
    let mut issued = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => issued += 1,
            Err(status) => assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}"),
        }
    }
    assert_eq!(issued, 1);
}

#[tokio::test]
async fn ok_thousand_issuances_have_distinct_positive_short_serials() {
    let server = Arc::new(TestServer::start().await);
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let service = server.service().await;
            let phone = server.anonymous().await;
            let mut serials = Vec::new();
            for i in 0..125 {
                let token = service
                    .create_enrollment_token(&format!("bulk-{worker}"), 0)
                    .await
                    .unwrap()
                    .token;
                let csr = DeviceKey::generate().csr_der("d").unwrap();
                let issued = phone
                    .enroll(&token, csr, &format!("bulk-{worker}-{i}"), device_info())
                    .await
                    .unwrap();
                serials.push(issued.certificate_der);
            }
            serials
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        for der in task.await.unwrap() {
            let (_, cert) = X509Certificate::from_der(&der).unwrap();
            let raw = cert.raw_serial().to_vec();
            assert!(raw.len() <= 20, "serial longer than 20 octets");
            assert_eq!(raw[0] & 0x80, 0, "serial must be positive");
            assert!(raw.iter().any(|b| *b != 0), "serial must not be zero");
            assert!(seen.insert(raw), "duplicate serial");
        }
    }
    assert_eq!(seen.len(), 1000);
}

#[tokio::test]
async fn ok_state_survives_restart() {
    let mut server = TestServer::start().await;
    let token = server.token("gina").await;
    let csr = DeviceKey::generate().csr_der("d").unwrap();
    let issued = server
        .anonymous()
        .await
        .enroll(&token, csr, "gina-phone", device_info())
        .await
        .unwrap();
    server.restart().await;

    let record = server
        .operator()
        .await
        .certificate(&issued.serial)
        .await
        .expect("certificate survives restart");
    assert_eq!(record.certificate_der, issued.certificate_der);
    assert_eq!(record.customer_id, "gina");
    assert_eq!(record.device_id, "gina-phone");
    assert_eq!(record.device_info.unwrap().model, "Pixel 8");

    let reuse = server
        .anonymous()
        .await
        .enroll(
            &token,
            DeviceKey::generate().csr_der("d").unwrap(),
            "gina-2",
            device_info(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        reuse.code(),
        Code::FailedPrecondition,
        "used token stays used"
    );
}

#[tokio::test]
async fn ok_status_and_record_for_issued_not_found_for_unknown() {
    let server = TestServer::start().await;
    let (_, issued) = server.enroll("hank", "hank-phone").await;
    let status = server
        .service()
        .await
        .certificate_status(&issued.serial)
        .await
        .unwrap();
    assert_eq!(status.status, proto::CertificateStatus::Valid as i32);
    assert_eq!(status.not_after_unix_s, issued.not_after_unix_s);

    let record = server
        .operator()
        .await
        .certificate(&issued.serial)
        .await
        .unwrap();
    assert_eq!(record.status, proto::CertificateStatus::Valid as i32);
    assert_eq!(record.issued_at_unix_s, server.clock.now_s());

    let unknown = "4aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_string();
    let err = server
        .service()
        .await
        .certificate_status(&unknown)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = server
        .operator()
        .await
        .certificate(&unknown)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = server
        .operator()
        .await
        .admin()
        .get_certificate(proto::GetCertificateRequest {
            serial: "zz".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("serial"), "{}", err.message());
}

#[tokio::test]
async fn fail_token_creation_needs_service_or_operator_and_valid_customer() {
    let server = TestServer::start().await;
    let err = server
        .anonymous()
        .await
        .create_enrollment_token("ivy", 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    server
        .operator()
        .await
        .create_enrollment_token("ivy", 0)
        .await
        .expect("operators may create tokens");
    let service = server.service().await;
    for (case, customer, ttl) in [
        ("bad alphabet", "ivy smith", 0),
        ("empty", "", 0),
        ("too long", &"x".repeat(65)[..], 0),
        ("ttl above max", "ivy", 86_401),
        ("negative ttl", "ivy", -1),
    ] {
        let err = service
            .create_enrollment_token(customer, ttl)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{case}");
    }
}
