//! End to end: enrollment with device key attestation, against a real server over real TLS.
//! The chains here are generated (the real samples, checked in the library's unit tests,
//! expired long ago and attest keys payra cannot sign CSRs with): a test "hardware root"
//! configured as an Android trust anchor, and a test "Apple root" in place of Apple's. Every
//! refusal the issue names is made by one of them.

mod common;

use common::*;
use payra::client::DeviceKey;
use payra::config::Config;
use payra::wire::proto;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, Issuer, KeyPair,
    SubjectPublicKeyInfo,
};
use sha2::{Digest, Sha256};
use tonic::Code;
use x509_parser::prelude::*;

// ---- DER, as much as a KeyDescription needs ----

fn tlv(tag: &[u8], content: &[u8]) -> Vec<u8> {
    let mut out = tag.to_vec();
    match content.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend_from_slice(&[0x81, n as u8]),
        n => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(content);
    out
}

fn int(tag: u8, value: i64) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let mut start = 0;
    while start < 7
        && ((bytes[start] == 0 && bytes[start + 1] & 0x80 == 0)
            || (bytes[start] == 0xff && bytes[start + 1] & 0x80 != 0))
    {
        start += 1;
    }
    tlv(&[tag], &bytes[start..])
}

/// `[n] EXPLICIT` with the tag number in one or more bytes.
fn explicit(number: u32, inner: Vec<u8>) -> Vec<u8> {
    let tag = if number < 31 {
        vec![0xa0 | number as u8]
    } else {
        vec![0xbf, 0x80 | (number >> 7) as u8, (number & 0x7f) as u8]
    };
    tlv(&tag, &inner)
}

/// What a generated KeyDescription says.
#[derive(Clone)]
struct Description {
    security_level: i64,
    keymint_level: i64,
    challenge: Vec<u8>,
    purposes: Vec<i64>,
    origin: i64,
    boot_state: i64,
    locked: bool,
}

impl Description {
    fn tee(challenge: [u8; 32]) -> Description {
        Description {
            security_level: 1,
            keymint_level: 1,
            challenge: challenge.to_vec(),
            purposes: vec![2, 3],
            origin: 0,
            boot_state: 0,
            locked: true,
        }
    }

    fn der(&self) -> Vec<u8> {
        let set: Vec<u8> = self.purposes.iter().flat_map(|p| int(0x02, *p)).collect();
        let root_of_trust = [
            tlv(&[0x04], &[7; 32]),
            tlv(&[0x01], &[if self.locked { 0xff } else { 0 }]),
            int(0x0a, self.boot_state),
            tlv(&[0x04], &[9; 32]),
        ]
        .concat();
        let enforced = tlv(
            &[0x30],
            &[
                explicit(1, tlv(&[0x31], &set)),
                explicit(702, int(0x02, self.origin)),
                explicit(704, tlv(&[0x30], &root_of_trust)),
            ]
            .concat(),
        );
        let application = tlv(
            &[0x30],
            &[
                tlv(
                    &[0x31],
                    &tlv(
                        &[0x30],
                        &[tlv(&[0x04], b"com.example.pay"), int(0x02, 7)].concat(),
                    ),
                ),
                tlv(&[0x31], &tlv(&[0x04], &[5; 32])),
            ]
            .concat(),
        );
        let software = tlv(&[0x30], &explicit(709, tlv(&[0x04], &application)));
        let (hardware, software) = if self.security_level == 0 {
            (tlv(&[0x30], &[]), [software, enforced].concat())
        } else {
            (enforced, software)
        };
        tlv(
            &[0x30],
            &[
                int(0x02, 300),
                int(0x0a, self.security_level),
                int(0x02, 300),
                int(0x0a, self.keymint_level),
                tlv(&[0x04], &self.challenge),
                tlv(&[0x04], &[]),
                software,
                hardware,
            ]
            .concat(),
        )
    }
}

// ---- generated chains ----

/// A root and an intermediate CA, as a phone maker's attestation PKI has them.
struct TestAttestationCa {
    root_pem: String,
    intermediate_der: Vec<u8>,
    intermediate: Issuer<'static, KeyPair>,
    intermediate_serial_hex: String,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(vec![]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params
}

impl TestAttestationCa {
    fn new(name: &str, intermediate_not_after: Option<(i32, u8, u8)>) -> TestAttestationCa {
        Self::with_intermediate(name, |params| {
            if let Some((y, m, d)) = intermediate_not_after {
                params.not_before = rcgen::date_time_ymd(2019, 1, 1);
                params.not_after = rcgen::date_time_ymd(y, m, d);
            }
        })
    }

    /// A PKI whose intermediate `adjust` changes.
    fn with_intermediate(
        name: &str,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> TestAttestationCa {
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params(&format!("{name} Root"));
        let root_pem = root_params.self_signed(&root_key).unwrap().pem();
        let root = Issuer::new(root_params, root_key);
        let intermediate_key = KeyPair::generate().unwrap();
        let mut params = ca_params(&format!("{name} Intermediate"));
        // Random, with a nonzero first byte below 0x80: its hex is the status list's key.
        let mut serial: [u8; 8] = rand::random();
        serial[0] = serial[0] % 0x7f + 1;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        adjust(&mut params);
        let intermediate_der = params
            .signed_by(&intermediate_key, &root)
            .unwrap()
            .der()
            .to_vec();
        TestAttestationCa {
            root_pem,
            intermediate_der,
            intermediate: Issuer::new(params, intermediate_key),
            intermediate_serial_hex: hex::encode(serial).trim_start_matches('0').to_string(),
        }
    }

    /// A leaf certifying `spki_der` with `extension` (OID, value), then the intermediate.
    fn leaf_chain(&self, spki_der: &[u8], oid: &[u64], value: Vec<u8>) -> Vec<Vec<u8>> {
        let mut params = CertificateParams::new(vec![]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "Android Keystore Key");
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(oid, value));
        let spki = SubjectPublicKeyInfo::from_der(spki_der).unwrap();
        let leaf = params.signed_by(&spki, &self.intermediate).unwrap();
        vec![leaf.der().to_vec(), self.intermediate_der.clone()]
    }

    fn android(&self, spki_der: &[u8], description: &Description) -> Vec<Vec<u8>> {
        self.leaf_chain(
            spki_der,
            &[1, 3, 6, 1, 4, 1, 11129, 2, 1, 17],
            description.der(),
        )
    }
}

/// A chain [leaf, middle, `ca`'s intermediate]: `middle`, made from `params` with a fresh
/// key and issued by `ca`'s intermediate, signs a leaf certifying `spki` whose KeyDescription
/// is `description`.
fn chain_through(
    ca: &TestAttestationCa,
    params: CertificateParams,
    spki: &[u8],
    description: &Description,
) -> Vec<Vec<u8>> {
    let key = KeyPair::generate().unwrap();
    let middle = params.signed_by(&key, &ca.intermediate).unwrap();
    let issuer = Issuer::new(params, key);
    let mut leaf = CertificateParams::new(vec![]).unwrap();
    leaf.custom_extensions
        .push(CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 11129, 2, 1, 17],
            description.der(),
        ));
    let leaf = leaf
        .signed_by(&SubjectPublicKeyInfo::from_der(spki).unwrap(), &issuer)
        .unwrap();
    vec![
        leaf.der().to_vec(),
        middle.der().to_vec(),
        ca.intermediate_der.clone(),
    ]
}

fn spki_of_csr(csr: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (_, parsed) = X509CertificationRequest::from_der(csr).unwrap();
    let spki = &parsed.certification_request_info.subject_pki;
    (spki.raw.to_vec(), spki.subject_public_key.data.to_vec())
}

fn android_evidence(chain: Vec<Vec<u8>>) -> Option<proto::enroll_request::Attestation> {
    Some(proto::enroll_request::Attestation::Android(
        proto::AndroidKeyAttestation {
            certificate_chain_der: chain,
        },
    ))
}

const APP_ID: &str = "ABCDE12345.com.example.pay";

/// An App Attest object for the App Attest key `attest_key`, vouching for `client_data_hash`.
fn app_attest_object(ca: &TestAttestationCa, app_id: &str, client_data_hash: [u8; 32]) -> Vec<u8> {
    let attest_key = KeyPair::generate().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&attest_key);
    let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
    let key_id: [u8; 32] = Sha256::digest(&*parsed.subject_public_key.data).into();
    let mut auth_data = Sha256::digest(app_id.as_bytes()).to_vec();
    auth_data.push(0x40);
    auth_data.extend_from_slice(&0u32.to_be_bytes());
    auth_data.extend_from_slice(b"appattest\0\0\0\0\0\0\0");
    auth_data.extend_from_slice(&32u16.to_be_bytes());
    auth_data.extend_from_slice(&key_id);
    auth_data.extend_from_slice(&[0xa0]); // an (empty) COSE key map
    let mut nonce_input = auth_data.clone();
    nonce_input.extend_from_slice(&client_data_hash);
    let nonce = Sha256::digest(&nonce_input);
    let extension = tlv(&[0x30], &tlv(&[0xa1], &tlv(&[0x04], &nonce)));
    let x5c = ca.leaf_chain(&spki, &[1, 2, 840, 113635, 100, 8, 2], extension);
    use ciborium::Value;
    let object = Value::Map(vec![
        (
            Value::Text("fmt".into()),
            Value::Text("apple-appattest".into()),
        ),
        (
            Value::Text("attStmt".into()),
            Value::Map(vec![
                (
                    Value::Text("x5c".into()),
                    Value::Array(x5c.into_iter().map(Value::Bytes).collect()),
                ),
                (Value::Text("receipt".into()), Value::Bytes(vec![1, 2, 3])),
            ]),
        ),
        (Value::Text("authData".into()), Value::Bytes(auth_data)),
    ]);
    let mut out = Vec::new();
    ciborium::ser::into_writer(&object, &mut out).unwrap();
    out
}

fn write_pem(server_dir: &std::path::Path, name: &str, pem: &str) -> std::path::PathBuf {
    let path = server_dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

/// A phone maker's and a test "Apple" attestation PKI, and a server that trusts both (the
/// maker's root as an Android anchor, the other as Apple's root), with `tier_a = "hardware"`
/// and `adjust` applied last.
struct Fixture {
    maker: TestAttestationCa,
    apple: TestAttestationCa,
    server: TestServer,
}

async fn fixture(adjust: impl FnOnce(&mut Config)) -> Fixture {
    let maker = TestAttestationCa::new("Maker", None);
    let apple = TestAttestationCa::new("Apple Test", None);
    let roots = tempfile::tempdir().unwrap().keep();
    let android_root = write_pem(&roots, "maker-root.pem", &maker.root_pem);
    let apple_root = write_pem(&roots, "apple-root.pem", &apple.root_pem);
    let server = TestServer::start_with(move |config| {
        config.attestation.android_roots = vec![android_root];
        config.attestation.apple_root = Some(apple_root);
        config.attestation.apple_app_ids = vec![APP_ID.into()];
        config.attestation.tier_a = payra::attestation::Requirement::Hardware;
        adjust(config);
    })
    .await;
    Fixture {
        maker,
        apple,
        server,
    }
}

/// A phone about to enroll: its token, payment key, CSR, and the CSR's SPKI and point.
struct Phone {
    token: String,
    key: DeviceKey,
    csr: Vec<u8>,
    spki: Vec<u8>,
    point: Vec<u8>,
}

async fn phone(server: &TestServer, customer: &str, device: &str) -> Phone {
    let token = server.token(customer).await;
    let key = DeviceKey::generate();
    let csr = key.csr_der(device).unwrap();
    let (spki, point) = spki_of_csr(&csr);
    Phone {
        token,
        key,
        csr,
        spki,
        point,
    }
}

fn pin() -> proto::Factor {
    proto::Factor {
        category: proto::FactorCategory::Knowledge as i32,
        method: "payment_pin".into(),
    }
}

async fn pay(
    server: &TestServer,
    key: &DeviceKey,
    issued: &proto::EnrollResponse,
    customer: &str,
    device: &str,
) -> proto::VerifyPaymentResponse {
    let intent = payment_intent(customer, device, &rand_suffix(), 1_500, server.clock_ms());
    server
        .service()
        .await
        .verify_payment(signed_payment(
            key,
            &issued.serial,
            &intent,
            vec![pin()],
            false,
        ))
        .await
        .expect("verify")
}

trait ClockMs {
    fn clock_ms(&self) -> i64;
}

impl ClockMs for TestServer {
    fn clock_ms(&self) -> i64 {
        use payra::clock::Clock;
        self.clock.now_ms()
    }
}

#[tokio::test]
async fn an_attested_key_counts_for_tier_a_and_an_unattested_one_only_for_b() {
    let Fixture { maker, server, .. } = fixture(|_| {}).await;

    // Android: the key generated in the TEE with the enrollment's challenge.
    let Phone {
        token,
        key,
        csr,
        spki,
        ..
    } = phone(&server, "c-attested", "phone-tee").await;
    let chain = maker.android(
        &spki,
        &Description::tee(payra::attestation::challenge(&token)),
    );
    let attested = server
        .anonymous()
        .await
        .enroll_attested(
            &token,
            csr,
            "phone-tee",
            device_info(),
            android_evidence(chain),
        )
        .await
        .expect("attested enrollment");
    let attestation = attested
        .attestation
        .clone()
        .expect("attestation in the answer");
    assert_eq!(
        (
            attestation.platform.as_str(),
            attestation.security_level.as_str()
        ),
        ("android", "tee")
    );
    assert_eq!(
        (attestation.boot_state.as_str(), attestation.device_locked),
        ("verified", true)
    );
    assert!(attestation.tier_a_eligible, "{}", attestation.policy_note);
    assert_eq!(attestation.apps, vec!["com.example.pay".to_string()]);
    assert_eq!(
        attestation.chain_serials.len(),
        2,
        "the leaf's and the intermediate's serials: {:?}",
        attestation.chain_serials
    );
    assert!(attestation
        .chain_serials
        .contains(&maker.intermediate_serial_hex));

    // The same customer's second phone, with no attestation.
    let (plain_key, plain) = server.enroll("c-attested", "phone-plain").await;
    let note = plain.attestation.as_ref().map(|a| a.policy_note.clone());
    assert_eq!(note, None, "an unattested enrollment has no attestation");

    let strong = pay(&server, &key, &attested, "c-attested", "phone-tee").await;
    assert_eq!(strong.verdict(), proto::Verdict::Verified);
    assert_eq!(strong.tier(), proto::Tier::A);
    assert_eq!(
        strong.certificate_factor(),
        proto::CertificateFactor::Certificate
    );
    assert_eq!(strong.certificate_factor_reason, "");

    let weak = pay(&server, &plain_key, &plain, "c-attested", "phone-plain").await;
    assert_eq!(weak.verdict(), proto::Verdict::Verified);
    assert_eq!(
        weak.tier(),
        proto::Tier::B,
        "certificate + PIN without attestation"
    );
    assert_eq!(
        weak.certificate_factor(),
        proto::CertificateFactor::Possession
    );
    assert!(
        weak.certificate_factor_reason.contains("not attested")
            && weak.certificate_factor_reason.contains("hardware"),
        "{}",
        weak.certificate_factor_reason
    );

    // Operators list devices by attestation class.
    let operator = server.operator().await;
    let list = |class: &str| proto::ListCertificatesRequest {
        customer_id: "c-attested".into(),
        attestation: class.into(),
        ..Default::default()
    };
    let hardware = operator.list_certificates(list("hardware")).await.unwrap();
    let serials: Vec<_> = hardware
        .certificates
        .iter()
        .map(|c| c.serial.clone())
        .collect();
    assert_eq!(serials, vec![attested.serial.clone()]);
    let none = operator.list_certificates(list("none")).await.unwrap();
    let serials: Vec<_> = none.certificates.iter().map(|c| c.serial.clone()).collect();
    assert_eq!(serials, vec![plain.serial.clone()]);
    let bad = operator.list_certificates(list("tee")).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    // What an attestation key vouched for, found by its serial (as the status list writes it).
    let vouched = operator
        .list_certificates(proto::ListCertificatesRequest {
            attested_by_serial: maker.intermediate_serial_hex.to_uppercase(),
            ..Default::default()
        })
        .await
        .unwrap();
    let serials: Vec<_> = vouched
        .certificates
        .iter()
        .map(|c| c.serial.clone())
        .collect();
    assert_eq!(serials, vec![attested.serial.clone()]);
    let bad = operator
        .list_certificates(proto::ListCertificatesRequest {
            attested_by_serial: "not-hex".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // The attestation survives a restart, and a renewal with the same key keeps it.
    let mut server = server;
    server.restart().await;
    let again = pay(&server, &key, &attested, "c-attested", "phone-tee").await;
    assert_eq!(again.tier(), proto::Tier::A);
    let device_dir = write_device_dir(server.dir.path(), &key, &attested);
    let renewed = renew_as(&server, &device_dir, &key, "phone-tee")
        .await
        .expect("renew");
    assert_eq!(
        renewed.attestation.map(|a| a.security_level),
        Some("tee".to_string())
    );
}

#[tokio::test]
async fn app_attest_binds_the_payment_key_and_counts_as_hardware() {
    let Fixture { apple, server, .. } = fixture(|_| {}).await;
    let Phone {
        token,
        key,
        csr,
        point,
        ..
    } = phone(&server, "c-iphone", "iphone").await;
    let client_data = payra::attestation::apple_client_data(&token, &point);
    let evidence = |object: Vec<u8>| {
        Some(proto::enroll_request::Attestation::Apple(
            proto::AppleAppAttest {
                attestation_object: object,
            },
        ))
    };

    // Made for another payment key: refused, and the token still works.
    let other = DeviceKey::generate();
    let (_, other_point) = spki_of_csr(&other.csr_der("x").unwrap());
    let wrong = payra::attestation::apple_client_data(&token, &other_point);
    let refused = server
        .anonymous()
        .await
        .enroll_attested(
            &token,
            csr.clone(),
            "iphone",
            device_info(),
            evidence(app_attest_object(
                &apple,
                APP_ID,
                Sha256::digest(&wrong).into(),
            )),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("challenge"), "{refused}");

    let issued = server
        .anonymous()
        .await
        .enroll_attested(
            &token,
            csr,
            "iphone",
            device_info(),
            evidence(app_attest_object(
                &apple,
                APP_ID,
                Sha256::digest(&client_data).into(),
            )),
        )
        .await
        .expect("App Attest enrollment");
    let attestation = issued.attestation.clone().unwrap();
    assert_eq!(
        (
            attestation.platform.as_str(),
            attestation.security_level.as_str()
        ),
        ("apple", "secure_enclave")
    );
    assert_eq!(attestation.apps, vec![APP_ID.to_string()]);
    assert!(attestation.tier_a_eligible);
    let paid = pay(&server, &key, &issued, "c-iphone", "iphone").await;
    assert_eq!(paid.tier(), proto::Tier::A);
}

#[tokio::test]
async fn every_refused_attestation_names_its_reason_and_leaves_the_token_usable() {
    let stranger = TestAttestationCa::new("Stranger", None);
    let expired = TestAttestationCa::new("Expired", Some((2021, 1, 1)));
    let listed = TestAttestationCa::new("Listed", None);
    let narrow = TestAttestationCa::with_intermediate("Narrow", |params| {
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    });
    let status_dir = tempfile::tempdir().unwrap().keep();
    let status_file = status_dir.join("status.json");
    std::fs::write(
        &status_file,
        format!(
            r#"{{"entries": {{"{}": {{"status": "REVOKED", "reason": "KEY_COMPROMISE"}}}}}}"#,
            listed.intermediate_serial_hex
        ),
    )
    .unwrap();
    let extra_roots = status_dir.join("more-roots.pem");
    std::fs::write(
        &extra_roots,
        format!("{}{}{}", expired.root_pem, listed.root_pem, narrow.root_pem),
    )
    .unwrap();
    let Fixture { maker, server, .. } = fixture(|config| {
        config.attestation.android_roots.push(extra_roots);
        config.attestation.android_status_file = Some(status_file);
    })
    .await;
    let Phone {
        token, csr, spki, ..
    } = phone(&server, "c-refused", "phone").await;
    let other = DeviceKey::generate();
    let (other_spki, _) = spki_of_csr(&other.csr_der("other").unwrap());
    let good = Description::tee(payra::attestation::challenge(&token));
    let with = |change: fn(&mut Description)| {
        let mut d = good.clone();
        change(&mut d);
        d
    };
    let mut garbage_leaf = maker.leaf_chain(
        &spki,
        &[1, 3, 6, 1, 4, 1, 11129, 2, 1, 17],
        vec![0x30, 0x03, 0x02, 0x01],
    );
    garbage_leaf.truncate(2);

    let mut cases: Vec<(&str, Vec<Vec<u8>>, Code, &str)> = vec![
        (
            "wrong challenge",
            maker.android(
                &spki,
                &Description::tee(payra::attestation::challenge("another token")),
            ),
            Code::PermissionDenied,
            "challenge",
        ),
        (
            "key mismatch",
            maker.android(&other_spki, &good),
            Code::PermissionDenied,
            "not the CSR's key",
        ),
        (
            "unknown root",
            stranger.android(&spki, &good),
            Code::PermissionDenied,
            "not a configured trust anchor",
        ),
        (
            "revoked attestation certificate",
            listed.android(&spki, &good),
            Code::PermissionDenied,
            "REVOKED in the attestation status list",
        ),
        (
            "expired chain",
            expired.android(&spki, &good),
            Code::PermissionDenied,
            "expired or not yet valid",
        ),
        (
            "imported key",
            maker.android(&spki, &with(|d| d.origin = 2)),
            Code::PermissionDenied,
            "imported",
        ),
        (
            "no SIGN purpose",
            maker.android(&spki, &with(|d| d.purposes = vec![3])),
            Code::PermissionDenied,
            "SIGN",
        ),
        (
            "malformed extension",
            garbage_leaf,
            Code::InvalidArgument,
            "KeyDescription",
        ),
        (
            "a leaf alone",
            maker.android(&spki, &good)[..1].to_vec(),
            Code::InvalidArgument,
            "at least its issuer",
        ),
    ];
    // An attested key certifying a forged leaf below itself: a device key signs whatever its
    // owner asks, so a chain through it proves nothing.
    let mut attested = CertificateParams::new(vec![]).unwrap();
    attested
        .distinguished_name
        .push(DnType::CommonName, "Android Keystore Key");
    attested
        .custom_extensions
        .push(CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 11129, 2, 1, 17],
            Description::tee([0; 32]).der(),
        ));
    let below_attested_key =
        chain_through(&maker, attested, &spki, &with(|d| d.security_level = 2));
    // The same through a certificate that is no CA and carries no KeyDescription.
    let mut end_entity = CertificateParams::new(vec![]).unwrap();
    end_entity
        .distinguished_name
        .push(DnType::CommonName, "some device");
    let through_end_entity = chain_through(&maker, end_entity, &spki, &good);
    // A CA below an intermediate whose pathLenConstraint is 0.
    let too_deep = chain_through(&narrow, ca_params("Sub CA"), &spki, &good);
    cases.push((
        "a CA below an intermediate's path length",
        too_deep,
        Code::PermissionDenied,
        "allows fewer CA certificates",
    ));
    cases.push((
        "a leaf certified by a certificate that is no CA",
        through_end_entity,
        Code::PermissionDenied,
        "is not a CA",
    ));
    cases.push((
        "a leaf certified by an attested device key",
        below_attested_key,
        Code::PermissionDenied,
        "only the leaf may",
    ));
    let anonymous = server.anonymous().await;
    for (name, chain, code, words) in cases {
        let refused = anonymous
            .enroll_attested(
                &token,
                csr.clone(),
                "phone",
                device_info(),
                android_evidence(chain),
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code(), code, "{name}: {refused}");
        assert!(refused.message().contains(words), "{name}: {refused}");
    }
    // Nothing was consumed or issued: the token enrolls now, without attestation.
    let operator = server.operator().await;
    let before = operator
        .list_certificates(proto::ListCertificatesRequest {
            customer_id: "c-refused".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(before.certificates.is_empty());
    let issued = anonymous
        .enroll_attested(&token, csr, "phone", device_info(), None)
        .await
        .expect("the token is still usable");
    assert!(issued.attestation.is_none());

    // The status list in use is on /metrics, with its age to alert on.
    let (_, _, page) = http_get(&server.http_url("/metrics")).await;
    let page = String::from_utf8(page).unwrap();
    assert!(
        page.contains("payra_attestation_status_entries 1\n"),
        "{page}"
    );
    assert!(
        page.contains("payra_attestation_status_age_seconds "),
        "{page}"
    );
}

#[tokio::test]
async fn the_refuse_policy_turns_away_software_and_unattested_keys_but_not_hardware() {
    let Fixture { maker, server, .. } = fixture(|config| {
        config.attestation.below_policy = payra::attestation::BelowPolicy::Refuse;
    })
    .await;
    let Phone {
        token, csr, spki, ..
    } = phone(&server, "c-strict", "phone").await;
    let challenge = payra::attestation::challenge(&token);
    let anonymous = server.anonymous().await;

    let mut software = Description::tee(challenge);
    software.security_level = 0;
    // Attested by the TEE, but the key itself is held by the software keymaster.
    let mut software_keymint = Description::tee(challenge);
    software_keymint.keymint_level = 0;
    let mut unlocked = Description::tee(challenge);
    (unlocked.boot_state, unlocked.locked) = (2, false);
    let cases = [
        ("unattested", None, "not attested"),
        ("software", Some(software), "software; hardware is required"),
        (
            "software keymint",
            Some(software_keymint),
            "software; hardware is required",
        ),
        ("unlocked", Some(unlocked), "verified, locked"),
    ];
    for (name, description, words) in cases {
        let evidence = description.and_then(|d| android_evidence(maker.android(&spki, &d)));
        let refused = anonymous
            .enroll_attested(&token, csr.clone(), "phone", device_info(), evidence)
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::FailedPrecondition,
            "{name}: {refused}"
        );
        assert!(refused.message().contains(words), "{name}: {refused}");
    }

    let issued = anonymous
        .enroll_attested(
            &token,
            csr,
            "phone",
            device_info(),
            android_evidence(maker.android(&spki, &Description::tee(challenge))),
        )
        .await
        .expect("a TEE key enrolls");
    assert!(issued.attestation.unwrap().tier_a_eligible);
}

#[tokio::test]
async fn refused_attestations_count_toward_the_addresss_failure_limit() {
    // A chain costs 1-2 ms of signature checks: one token must not buy unlimited checks.
    let Fixture { maker, server, .. } = fixture(|config| {
        config.limits.enroll_failures_per_minute = 3;
    })
    .await;
    let Phone {
        token, csr, spki, ..
    } = phone(&server, "c-throttled", "phone").await;
    let wrong = Description::tee(payra::attestation::challenge("another token"));
    let anonymous = server.anonymous().await;
    let attempt =
        |evidence| anonymous.enroll_attested(&token, csr.clone(), "phone", device_info(), evidence);
    for _ in 0..3 {
        let refused = attempt(android_evidence(maker.android(&spki, &wrong)))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    }
    let throttled = attempt(android_evidence(maker.android(&spki, &wrong)))
        .await
        .unwrap_err();
    assert_eq!(throttled.code(), Code::ResourceExhausted, "{throttled}");
    assert!(
        throttled
            .message()
            .contains("too many failed enrollment attempts"),
        "{throttled}"
    );
    // Another phone behind the same address still enrolls without attestation (a known
    // token is never locked out), and a minute later attestations are checked again.
    let (_, plain) = server.enroll("c-throttled", "other-phone").await;
    assert!(plain.attestation.is_none());
    server.clock.advance_ms(61_000);
    let good = Description::tee(payra::attestation::challenge(&token));
    let issued = attempt(android_evidence(maker.android(&spki, &good)))
        .await
        .expect("checked again after the window");
    assert!(issued.attestation.is_some());
}
