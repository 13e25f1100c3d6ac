//! SM2/SM3 end to end: SM2 keys and CSRs made by OpenSSL 3's CLI (as a phone's GM/T crypto
//! library would make them), enrolled from the SM2 issuing CA, chains, CRLs and OCSP answers
//! checked by OpenSSL, payments signed by `openssl dgst -sm3 -sign`, renewal by proof,
//! revocation, and the key allow-list. Every SM2 signature uses the default distinguishing id
//! `1234567812345678`.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use payra::ca::sm2::{signature_from_der, signature_to_der, DEFAULT_DISTID};
use payra::client::encode_intent;
use payra::clock::Clock;
use payra::model::{KeyAlgorithm, Serial};
use payra::wire::proto;
use proto::{FactorCategory as Cat, Verdict};
use sm2::dsa::signature::{Signer, Verifier};
use sm2::dsa::{SigningKey, VerifyingKey};
use sm2::pkcs8::DecodePrivateKey;
use tonic::Code;

const DISTID_OPT: &str = "distid:1234567812345678";
/// The same id in hex, the other form `-vfyopt` takes.
const HEX_DISTID_OPT: &str = "hexdistid:31323334353637383132333435363738";

/// An SM2 phone: its key made by OpenSSL, its certificate and where OpenSSL finds both.
struct Sm2Phone {
    dir: PathBuf,
    key: PathBuf,
    issued: proto::EnrollResponse,
    customer: String,
    device: String,
}

impl Sm2Phone {
    fn leaf(&self) -> PathBuf {
        self.dir.join("leaf.pem")
    }
}

/// `openssl genpkey` an SM2 key into `dir/key.pem`.
fn openssl_sm2_key(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let key = dir.join("key.pem");
    let (ok, text) = openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:SM2",
        "-out",
        path_str(&key),
    ]);
    assert!(ok, "{text}");
    key
}

/// `openssl req -sm3` a CSR for `key`, signed with the distinguishing id `sigopt`.
fn openssl_sm2_csr(dir: &Path, key: &Path, sigopt: &str) -> Vec<u8> {
    let csr = dir.join(format!("csr-{}.der", rand_suffix()));
    let (ok, text) = openssl(&[
        "req",
        "-new",
        "-key",
        path_str(key),
        "-sm3",
        "-sigopt",
        sigopt,
        "-subj",
        "/CN=phone",
        "-outform",
        "DER",
        "-out",
        path_str(&csr),
    ]);
    assert!(ok, "{text}");
    std::fs::read(&csr).unwrap()
}

/// `openssl dgst -sm3 -sign` over `message`: a DER SM2 signature.
fn openssl_sm2_sign(dir: &Path, key: &Path, message: &[u8]) -> Vec<u8> {
    let suffix = rand_suffix();
    let input = dir.join(format!("message-{suffix}"));
    let output = dir.join(format!("signature-{suffix}"));
    std::fs::write(&input, message).unwrap();
    let (ok, text) = openssl(&[
        "dgst",
        "-sm3",
        "-sign",
        path_str(key),
        "-sigopt",
        DISTID_OPT,
        "-out",
        path_str(&output),
        path_str(&input),
    ]);
    assert!(ok, "{text}");
    std::fs::read(&output).unwrap()
}

async fn enroll_sm2(server: &TestServer, customer: &str, device: &str) -> Sm2Phone {
    let dir = server.dir.path().join(format!("sm2-{device}"));
    let key = openssl_sm2_key(&dir);
    let csr = openssl_sm2_csr(&dir, &key, DISTID_OPT);
    let issued = server
        .enroll_csr(customer, device, csr)
        .await
        .expect("an SM2 CSR enrolls");
    std::fs::write(dir.join("leaf.pem"), pem(&issued.certificate_der)).unwrap();
    Sm2Phone {
        dir,
        key,
        issued,
        customer: customer.into(),
        device: device.into(),
    }
}

/// A VerifyPayment request for a fresh intent of `amount_fen`, signed by OpenSSL with the
/// phone's SM2 key (DER, or raw r||s when `raw`).
fn sm2_payment(
    server: &TestServer,
    phone: &Sm2Phone,
    order: &str,
    amount_fen: i64,
    raw: bool,
) -> proto::VerifyPaymentRequest {
    let intent = payment_intent(
        &phone.customer,
        &phone.device,
        order,
        amount_fen,
        server.clock.now_ms(),
    );
    let bytes = encode_intent(&intent);
    let der = openssl_sm2_sign(
        &phone.dir,
        &phone.key,
        &payra::ra::signature::signed_message(&bytes),
    );
    let signature = if raw {
        signature_from_der(&der).unwrap().to_bytes().to_vec()
    } else {
        der
    };
    proto::VerifyPaymentRequest {
        intent: bytes,
        signature,
        certificate_serial: phone.issued.serial.clone(),
        transaction: Some(transaction_of(&intent)),
        factors: vec![proto::Factor {
            category: Cat::Knowledge as i32,
            method: "payment_pin".into(),
        }],
        reserve: true,
    }
}

/// `openssl verify` of `leaf` to the SM2 root under the distinguishing id `vfyopt`, one link
/// at a time: OpenSSL 3.0's `verify` applies `-vfyopt` to the certificate it is asked about
/// only (an intermediate's signature is checked under its own default, the empty id), so the
/// issuing CA is verified to the root, then the leaf to the issuing CA (`-partial_chain`),
/// the second with `extra` options.
fn openssl_verify_sm2(
    server: &TestServer,
    leaf: &Path,
    vfyopt: &str,
    extra: &[&str],
) -> (bool, String) {
    let certs = server.certs();
    let root = certs.join("sm2-root.pem");
    let issuing = certs.join("sm2-issuing.pem");
    let (ok, text) = openssl(&[
        "verify",
        "-vfyopt",
        vfyopt,
        "-CAfile",
        path_str(&root),
        path_str(&issuing),
    ]);
    if !ok {
        return (false, text);
    }
    let mut args = vec![
        "verify",
        "-vfyopt",
        vfyopt,
        "-partial_chain",
        "-CAfile",
        path_str(&issuing),
    ];
    args.extend_from_slice(extra);
    args.push(path_str(leaf));
    openssl(&args)
}

/// Whether `signature` over `signed` verifies with `openssl dgst -sm3` under the default
/// distinguishing id, with the public key of the certificate `signer_pem`.
fn openssl_sm2_signed(dir: &Path, signer_pem: &Path, signed: &[u8], signature: &[u8]) -> bool {
    let suffix = rand_suffix();
    let public = dir.join(format!("public-{suffix}.pem"));
    let (ok, text) = openssl(&[
        "x509",
        "-in",
        path_str(signer_pem),
        "-pubkey",
        "-noout",
        "-out",
        path_str(&public),
    ]);
    assert!(ok, "{text}");
    let data = dir.join(format!("signed-{suffix}"));
    let sig = dir.join(format!("sig-{suffix}"));
    std::fs::write(&data, signed).unwrap();
    std::fs::write(&sig, signature).unwrap();
    let (ok, text) = openssl(&[
        "dgst",
        "-sm3",
        "-verify",
        path_str(&public),
        "-sigopt",
        DISTID_OPT,
        "-signature",
        path_str(&sig),
        path_str(&data),
    ]);
    ok && text.contains("Verified OK")
}

/// The SM2 CRL: its DER, and `openssl crl -text` of it, after OpenSSL checked its SM2
/// signature with the SM2 issuing CA's key.
async fn sm2_crl(server: &TestServer) -> (Vec<u8>, String) {
    use der::{Decode, Encode};
    let (code, headers, der) = http_get(&server.http_url("/crl/sm2")).await;
    assert_eq!(code, 200, "{headers}");
    let crl = x509_cert::crl::CertificateList::from_der(&der).expect("a DER CRL");
    assert!(openssl_sm2_signed(
        server.dir.path(),
        &server.certs().join("sm2-issuing.pem"),
        &crl.tbs_cert_list.to_der().unwrap(),
        crl.signature.raw_bytes(),
    ));
    let (ok, text) = openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        &crl_file(server, &der),
        "-noout",
        "-text",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("SM2-with-SM3"), "{text}");
    (der, text)
}

/// `openssl ocsp` about `leaf` to the SM2 issuing CA: the status line it prints, after the
/// response's SM2 signature verified with OpenSSL under the default id.
fn openssl_ocsp_sm2(server: &TestServer, leaf: &Path) -> String {
    openssl_ocsp_sm2_to(server, leaf).0
}

/// [`openssl_ocsp_sm2`], and the file holding the DER response.
fn openssl_ocsp_sm2_to(server: &TestServer, leaf: &Path) -> (String, PathBuf) {
    use der::{Decode, Encode};
    let certs = server.certs();
    let response = server
        .dir
        .path()
        .join(format!("ocsp-{}.der", rand_suffix()));
    let (ok, text) = openssl(&[
        "ocsp",
        "-issuer",
        path_str(&certs.join("sm2-issuing.pem")),
        "-cert",
        path_str(leaf),
        "-url",
        &server.http_url("/ocsp"),
        "-noverify",
        "-respout",
        path_str(&response),
    ]);
    assert!(ok, "{text}");
    let answer = x509_ocsp::OcspResponse::from_der(&std::fs::read(&response).unwrap()).unwrap();
    let bytes = answer.response_bytes.expect("a successful response");
    let basic = x509_ocsp::BasicOcspResponse::from_der(bytes.response.as_bytes()).unwrap();
    assert_eq!(
        basic.signature_algorithm.oid.to_string(),
        "1.2.156.10197.1.501"
    );
    assert!(openssl_sm2_signed(
        server.dir.path(),
        &certs.join("sm2-issuing.pem"),
        &basic.tbs_response_data.to_der().unwrap(),
        basic.signature.raw_bytes(),
    ));
    (text, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sm2_phone_enrolls_pays_and_is_revoked_as_openssl_sees_it() {
    let server = TestServer::start().await;
    let phone = enroll_sm2(&server, "mei", "mei-phone").await;
    let certs = server.certs();

    // Issued by the SM2 issuing CA, whose certificate is the chain payra answers with.
    let sm2_issuing = ::pem::parse(std::fs::read(certs.join("sm2-issuing.pem")).unwrap()).unwrap();
    assert_eq!(phone.issued.chain_der[0], sm2_issuing.contents());
    let (ok, text) = openssl(&["x509", "-in", path_str(&phone.leaf()), "-noout", "-text"]);
    assert!(ok, "{text}");
    assert!(text.contains("Signature Algorithm: SM2-with-SM3"), "{text}");
    assert!(text.contains("ASN1 OID: SM2"), "{text}");
    assert!(
        text.contains("Issuer: C = CN, O = payra, CN = payra development SM2 issuing CA"),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(
        text.contains(&format!(
            "urn:payra:subscriber:{}",
            phone.issued.subscriber_ref
        )),
        "{text}"
    );
    // The certified key is the phone's.
    let (_, leaf_key) = openssl(&["x509", "-in", path_str(&phone.leaf()), "-noout", "-pubkey"]);
    let (_, own_key) = openssl(&["pkey", "-in", path_str(&phone.key), "-pubout"]);
    assert_eq!(leaf_key, own_key);

    // OpenSSL verifies the chain to the SM2 root under the default id, named as text or hex.
    let (ok, text) = openssl_verify_sm2(&server, &phone.leaf(), DISTID_OPT, &[]);
    assert!(ok, "{text}");
    let (ok, text) = openssl_verify_sm2(&server, &phone.leaf(), HEX_DISTID_OPT, &[]);
    assert!(ok, "{text}");
    // Under another id the leaf's signature does not verify: it was made with the default one.
    let (ok, text) = openssl(&[
        "verify",
        "-vfyopt",
        "distid:1234567812345679",
        "-partial_chain",
        "-CAfile",
        path_str(&certs.join("sm2-issuing.pem")),
        path_str(&phone.leaf()),
    ]);
    assert!(!ok && text.contains("signature failure"), "{text}");
    // It names the SM2 issuing CA as its issuer, so it does not chain to the P-256 root.
    let (ok, _) = openssl(&[
        "verify",
        "-CAfile",
        path_str(&certs.join("root.pem")),
        "-untrusted",
        path_str(&certs.join("issuing.pem")),
        path_str(&phone.leaf()),
    ]);
    assert!(!ok);

    // The record says SM2.
    let record = server
        .operator()
        .await
        .certificate(&phone.issued.serial)
        .await
        .unwrap();
    assert_eq!(record.key_algorithm, "sm2");
    assert!(
        record.subject.ends_with(",O=payra device,C=CN"),
        "{}",
        record.subject
    );

    // Payments signed by OpenSSL verify, DER and raw r||s, with tiers and the ledger.
    let answer = verify(&server, sm2_payment(&server, &phone, "o-1", 1200, false)).await;
    assert_eq!(verdict(&answer), Verdict::Verified, "{}", answer.reason);
    assert_eq!(answer.tier, proto::Tier::A as i32);
    let answer = verify(&server, sm2_payment(&server, &phone, "o-2", 300, true)).await;
    assert_eq!(verdict(&answer), Verdict::Verified, "{}", answer.reason);
    assert_eq!(answer.limit.unwrap().used_fen, 1500);
    let evidence = server
        .operator()
        .await
        .evidence(&answer.evidence_id)
        .await
        .unwrap();
    assert_eq!(evidence.certificate_serial, phone.issued.serial);
    assert_eq!(evidence.verdict, "VERIFIED");

    // A signature over other bytes is BAD_SIGNATURE naming SM2.
    let mut forged = sm2_payment(&server, &phone, "o-3", 100, false);
    forged.intent = encode_intent(&payment_intent(
        &phone.customer,
        &phone.device,
        "o-3",
        99_999,
        server.clock.now_ms(),
    ));
    let answer = verify(&server, forged).await;
    assert_eq!(verdict(&answer), Verdict::BadSignature);
    assert!(answer.reason.contains("SM2 with SM3"), "{}", answer.reason);
    // So is an ECDSA P-256 signature over the right bytes (by a P-256 key with the same
    // point bytes it cannot have; any P-256 signature is refused for an SM2 certificate).
    let mut p256_signed = sm2_payment(&server, &phone, "o-3b", 100, false);
    p256_signed.signature = payra::client::DeviceKey::generate().sign_intent(&p256_signed.intent);
    let answer = verify(&server, p256_signed).await;
    assert_eq!(verdict(&answer), Verdict::BadSignature, "{}", answer.reason);

    // The SM2 CRL is signed by the SM2 issuing CA and lists nothing yet; OCSP says good.
    let (_, text) = sm2_crl(&server).await;
    assert!(text.contains("No Revoked Certificates"), "{text}");
    let text = openssl_ocsp_sm2(&server, &phone.leaf());
    assert!(text.contains(": good"), "{text}");
    // A GM/T client hashes its CertID with SM3: answered the same.
    let (ok, text) = openssl(&[
        "ocsp",
        "-sm3",
        "-issuer",
        path_str(&certs.join("sm2-issuing.pem")),
        "-cert",
        path_str(&phone.leaf()),
        "-url",
        &server.http_url("/ocsp"),
        "-noverify",
    ]);
    assert!(ok && text.contains(": good"), "{text}");

    // Revoked: the SM2 CRL lists it (the P-256 CRL does not), OCSP says revoked, and the
    // next payment fails.
    server
        .revoke(&phone.issued.serial, proto::RevocationReason::KeyCompromise)
        .await;
    let (_, text) = sm2_crl(&server).await;
    let serial_upper = phone.issued.serial.to_uppercase();
    assert!(text.contains(&serial_upper), "{text}");
    assert!(text.contains("Key Compromise"), "{text}");
    let p256_crl = fetch_crl(&server).await;
    let (_, p256_text) = openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        &crl_file(&server, &p256_crl),
        "-noout",
        "-text",
    ]);
    assert!(!p256_text.contains(&serial_upper), "{p256_text}");
    // (Not `openssl verify -crl_check`: OpenSSL 3.0 checks a CRL's SM2 signature under the
    // empty id, with no option to name another; `sm2_crl` checked it under the default id.)
    let text = openssl_ocsp_sm2(&server, &phone.leaf());
    assert!(text.contains(": revoked"), "{text}");
    let answer = verify(&server, sm2_payment(&server, &phone, "o-4", 100, false)).await;
    assert_eq!(verdict(&answer), Verdict::CertificateRevoked);

    // Asked of the P-256 issuer, the SM2 serial is unknown.
    let (ok, text) = openssl(&[
        "ocsp",
        "-issuer",
        path_str(&certs.join("issuing.pem")),
        "-serial",
        &format!("0x{}", phone.issued.serial),
        "-url",
        &server.http_url("/ocsp"),
        "-CAfile",
        path_str(&certs.join("root.pem")),
    ]);
    assert!(ok && text.contains(": unknown"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sm2_devices_are_revoked_by_device_and_customer_with_p256_ones() {
    let server = TestServer::start().await;
    let sm2 = enroll_sm2(&server, "lin", "lin-sm2").await;
    let (_, p256) = server.enroll("lin", "lin-p256").await;
    let other = enroll_sm2(&server, "zhou", "zhou-sm2").await;
    let operator = server.operator().await;
    let by_device = operator
        .revoke_device(
            "lin-sm2",
            proto::RevocationReason::CessationOfOperation,
            false,
        )
        .await
        .unwrap();
    assert_eq!(by_device.revoked_serials, vec![sm2.issued.serial.clone()]);
    let by_customer = operator
        .revoke_customer("lin", proto::RevocationReason::AffiliationChanged, false)
        .await
        .unwrap();
    assert_eq!(by_customer.revoked_serials, vec![p256.serial.clone()]);
    // Each CRL lists its own CA's certificates.
    let (_, sm2_text) = sm2_crl(&server).await;
    assert!(
        sm2_text.contains(&sm2.issued.serial.to_uppercase()),
        "{sm2_text}"
    );
    assert!(
        !sm2_text.contains(&p256.serial.to_uppercase()),
        "{sm2_text}"
    );
    assert!(
        !sm2_text.contains(&other.issued.serial.to_uppercase()),
        "{sm2_text}"
    );
    let p256_crl = fetch_crl(&server).await;
    let (_, p256_text) = openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        &crl_file(&server, &p256_crl),
        "-noout",
        "-text",
    ]);
    assert!(
        p256_text.contains(&p256.serial.to_uppercase()),
        "{p256_text}"
    );
    assert!(
        !p256_text.contains(&sm2.issued.serial.to_uppercase()),
        "{p256_text}"
    );
    let answer = verify(&server, sm2_payment(&server, &other, "z-1", 100, false)).await;
    assert_eq!(verdict(&answer), Verdict::Verified, "{}", answer.reason);
}

/// A renewal proof for `phone`'s certificate over `csr_der`, signed by OpenSSL at `at_s`.
fn renewal_proof(phone: &Sm2Phone, csr_der: &[u8], at_s: i64, key: &Path) -> proto::RenewalProof {
    let serial = Serial::parse("serial", &phone.issued.serial).unwrap();
    let message = payra::ra::renewal_proof_message(&serial, at_s, csr_der);
    proto::RenewalProof {
        current_serial: phone.issued.serial.clone(),
        signed_at_unix_s: at_s,
        signature: openssl_sm2_sign(&phone.dir, key, &message),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sm2_phone_renews_by_proof_once() {
    let server = TestServer::start().await;
    let phone = enroll_sm2(&server, "wang", "wang-phone").await;
    let now_s = server.clock.now_ms() / 1000;
    let new_dir = phone.dir.join("next");
    let new_key = openssl_sm2_key(&new_dir);
    let csr = openssl_sm2_csr(&new_dir, &new_key, DISTID_OPT);
    let anonymous = server.anonymous().await;

    // Refusals first: each leaves the certificate valid.
    let stale = renewal_proof(&phone, &csr, now_s - 3600, &phone.key);
    let refused = anonymous
        .renew_with_proof(csr.clone(), None, stale)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("sign it again"), "{refused}");
    let foreign = renewal_proof(&phone, &csr, now_s, &new_key);
    let refused = anonymous
        .renew_with_proof(csr.clone(), None, foreign)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("does not verify"), "{refused}");
    // A proof over another CSR does not carry over to this one.
    let other_csr = openssl_sm2_csr(&new_dir, &new_key, DISTID_OPT);
    let for_other = renewal_proof(&phone, &other_csr, now_s, &phone.key);
    let refused = anonymous
        .renew_with_proof(csr.clone(), None, for_other)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("does not verify"), "{refused}");
    // Device info is not covered by a proof: refused rather than taken from anyone.
    let proof = renewal_proof(&phone, &csr, now_s, &phone.key);
    let refused = anonymous
        .renew_with_proof(csr.clone(), Some(device_info()), proof)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().starts_with("device_info"), "{refused}");
    // Without any proof or certificate: unauthenticated, naming both ways.
    let refused = anonymous.renew(csr.clone(), None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("RenewalProof"), "{refused}");
    assert_eq!(
        server.status(&phone.issued.serial).await.status,
        proto::CertificateStatus::Valid as i32
    );

    // The proof renews: a new SM2 certificate, the old one superseded.
    let proof = renewal_proof(&phone, &csr, now_s, &phone.key);
    let renewed = anonymous
        .renew_with_proof(csr.clone(), None, proof.clone())
        .await
        .expect("renewal by proof");
    assert_eq!(renewed.customer_id, "wang");
    assert_eq!(renewed.device_id, "wang-phone");
    assert_eq!(renewed.subscriber_ref, phone.issued.subscriber_ref);
    let record = server
        .operator()
        .await
        .certificate(&renewed.serial)
        .await
        .unwrap();
    assert_eq!(record.key_algorithm, "sm2");
    assert_eq!(record.renewed_from_serial, phone.issued.serial);
    assert_eq!(
        server.status(&phone.issued.serial).await.status,
        proto::CertificateStatus::Superseded as i32
    );
    let leaf = new_dir.join("leaf.pem");
    std::fs::write(&leaf, pem(&renewed.certificate_der)).unwrap();
    let (ok, text) = openssl_verify_sm2(&server, &leaf, DISTID_OPT, &[]);
    assert!(ok, "{text}");

    // The same proof again: the certificate that signed it is superseded.
    let replay = anonymous
        .renew_with_proof(csr, None, proof)
        .await
        .unwrap_err();
    assert_eq!(replay.code(), Code::Unauthenticated);
    assert!(replay.message().contains("cannot renew"), "{replay}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p256_phone_cannot_renew_by_proof_and_sm2_keys_follow_the_allow_list() {
    let server = TestServer::start_with(|config| {
        config.issuance.key_algorithms = Some(vec![KeyAlgorithm::P256]);
    })
    .await;
    // SM2 not accepted here: refused naming the setting, the token still usable.
    let dir = server.dir.path().join("sm2-refused");
    let key = openssl_sm2_key(&dir);
    let csr = openssl_sm2_csr(&dir, &key, DISTID_OPT);
    let token = server.token("qian").await;
    let refused = server
        .anonymous()
        .await
        .enroll(&token, csr, "qian-phone", device_info())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("key type SM2 is not accepted here"),
        "{refused}"
    );
    assert!(refused.message().contains("key_algorithms"), "{refused}");
    let p256_csr = payra::client::DeviceKey::generate()
        .csr_der("qian-phone")
        .unwrap();
    server
        .anonymous()
        .await
        .enroll(&token, p256_csr, "qian-phone", device_info())
        .await
        .expect("the token was not used up");

    // A P-256 certificate renews over mutual TLS, never by proof.
    let (_, p256) = server.enroll("qian", "qian-2").await;
    let proof = proto::RenewalProof {
        current_serial: p256.serial.clone(),
        signed_at_unix_s: server.clock.now_ms() / 1000,
        signature: vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
    };
    let csr = payra::client::DeviceKey::generate()
        .csr_der("qian-2")
        .unwrap();
    let refused = server
        .anonymous()
        .await
        .renew_with_proof(csr, None, proof)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("mutual TLS"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sm2_csr_signed_under_another_id_or_altered_is_refused() {
    let server = TestServer::start().await;
    let dir = server.dir.path().join("sm2-bad");
    let key = openssl_sm2_key(&dir);
    // Signed with another distinguishing id: no proof of possession under the default one.
    let csr = openssl_sm2_csr(&dir, &key, "distid:1234567812345679");
    let refused = server.enroll_csr("sun", "sun-1", csr).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("proof of possession"),
        "{refused}"
    );
    // A request whose signed part was changed after signing: refused the same way.
    let mut csr = openssl_sm2_csr(&dir, &key, DISTID_OPT);
    let at = csr
        .windows(5)
        .position(|w| w == b"phone")
        .expect("the subject");
    csr[at] = b'P';
    let refused = server.enroll_csr("sun", "sun-2", csr).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("proof of possession"),
        "{refused}"
    );
}

#[test]
fn the_crate_and_openssl_agree_on_sm2_signatures_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let key = openssl_sm2_key(dir.path());
    let public = dir.path().join("public.pem");
    let (ok, text) = openssl(&[
        "pkey",
        "-in",
        path_str(&key),
        "-pubout",
        "-out",
        path_str(&public),
    ]);
    assert!(ok, "{text}");
    let secret = sm2::SecretKey::from_pkcs8_pem(&std::fs::read_to_string(&key).unwrap())
        .expect("OpenSSL's SM2 PKCS#8 reads");
    let signing = SigningKey::new(DEFAULT_DISTID, &secret).unwrap();
    let message = b"payra.v1.PaymentIntent\n\x0a\x05alice";
    let message_file = dir.path().join("message");
    std::fs::write(&message_file, message).unwrap();

    // payra's DER form of the crate's signature verifies with OpenSSL under the same id...
    let signature_file = dir.path().join("crate.sig");
    std::fs::write(
        &signature_file,
        signature_to_der(&signing.sign(message)).unwrap(),
    )
    .unwrap();
    let verify_with = |sigopt: &str| {
        openssl(&[
            "dgst",
            "-sm3",
            "-verify",
            path_str(&public),
            "-sigopt",
            sigopt,
            "-signature",
            path_str(&signature_file),
            path_str(&message_file),
        ])
    };
    let (ok, text) = verify_with(DISTID_OPT);
    assert!(ok && text.contains("Verified OK"), "{text}");
    // ...and not under another: the id is part of what is signed.
    let (ok, text) = verify_with("distid:1234567812345679");
    assert!(!ok, "{text}");

    // OpenSSL's signature reads with payra's DER reader and verifies with the crate and with
    // payra's own check, DER and raw r||s.
    let der = openssl_sm2_sign(dir.path(), &key, message);
    let parsed = signature_from_der(&der).expect("OpenSSL's DER SM2 signature reads");
    let verifying: &VerifyingKey = signing.verifying_key();
    verifying.verify(message, &parsed).unwrap();
    let point = verifying.to_sec1_bytes();
    assert!(payra::ca::sm2::verify(&point, message, &der));
    assert!(payra::ca::sm2::verify(&point, message, &parsed.to_bytes()));
    assert!(!payra::ca::sm2::verify(
        &point,
        b"payra.v1.PaymentIntent\n",
        &der
    ));
    let other = VerifyingKey::from_sec1_bytes("1234567812345679", &point).unwrap();
    assert!(other.verify(message, &parsed).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_sdk_enrolls_pays_and_renews_with_an_sm2_key() {
    use payra::client::Sm2DeviceKey;
    let server = TestServer::start().await;
    let key = Sm2DeviceKey::generate();
    // Its PKCS#8 form is one OpenSSL reads as an SM2 key.
    let key_file = server.dir.path().join("sdk-sm2.pem");
    std::fs::write(&key_file, key.to_pkcs8_pem().unwrap()).unwrap();
    let (ok, text) = openssl(&["pkey", "-in", path_str(&key_file), "-noout", "-text"]);
    assert!(ok && text.contains("ASN1 OID: SM2"), "{text}");
    let again = Sm2DeviceKey::from_pkcs8_pem(&key.to_pkcs8_pem().unwrap()).unwrap();
    assert_eq!(again.public_point(), key.public_point());

    // OpenSSL checks the SDK's CSR signature under the default id.
    let csr = key.csr_der("sdk-phone").unwrap();
    let csr_file = server.dir.path().join("sdk.csr");
    std::fs::write(&csr_file, &csr).unwrap();
    let (ok, text) = openssl(&[
        "req",
        "-inform",
        "DER",
        "-in",
        path_str(&csr_file),
        "-verify",
        "-noout",
        "-vfyopt",
        DISTID_OPT,
    ]);
    assert!(ok && text.contains("verify OK"), "{text}");

    let issued = server
        .enroll_csr("hu", "sdk-phone", csr)
        .await
        .expect("the SDK's SM2 CSR enrolls");
    let intent = payment_intent("hu", "sdk-phone", "sdk-1", 500, server.clock.now_ms());
    let bytes = encode_intent(&intent);
    let answer = verify(
        &server,
        proto::VerifyPaymentRequest {
            signature: key.sign_intent(&bytes),
            intent: bytes,
            certificate_serial: issued.serial.clone(),
            transaction: Some(transaction_of(&intent)),
            factors: Vec::new(),
            reserve: false,
        },
    )
    .await;
    assert_eq!(verdict(&answer), Verdict::Verified, "{}", answer.reason);

    let next = Sm2DeviceKey::generate();
    let next_csr = next.csr_der("sdk-phone").unwrap();
    let proof = key
        .renewal_proof(&issued.serial, &next_csr, server.clock.now_ms() / 1000)
        .unwrap();
    let renewed = server
        .anonymous()
        .await
        .renew_with_proof(next_csr, None, proof)
        .await
        .expect("renewal by the SDK's proof");
    assert_ne!(renewed.serial, issued.serial);
}

/// The directory of pkilint's commands (`PAYRA_TEST_PKILINT`, which `.ci/run` sets after
/// installing pkilint into a virtualenv), or `None`: the test says it is skipped. Set but
/// without pkilint in it is a failure, not a skip.
fn pkilint() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("PAYRA_TEST_PKILINT")?);
    assert!(
        dir.join("lint_pkix_cert").exists(),
        "PAYRA_TEST_PKILINT={} holds no lint_pkix_cert",
        dir.display()
    );
    Some(dir)
}

/// pkilint's findings of warnings and worse, as `code: node path` lines, from its JSON
/// report, but for one false positive. pkilint checks a URI general name with the
/// `validators` package's URL check, which needs a host, so it calls every URN invalid;
/// `urn:payra:role:device` and `urn:payra:subscriber:<ref>` are URIs as RFC 3986 and RFC 5280
/// 4.2.1.6 define them (a scheme and a scheme-specific part), and every other finding counts.
fn lint(dir: &Path, command: &str, args: &[&str]) -> Vec<String> {
    lint_all(dir, command, args)
        .into_iter()
        .filter(|finding| !finding.starts_with("pkix.invalid_uri_syntax: "))
        .collect()
}

/// Every finding of warnings and worse.
fn lint_all(dir: &Path, command: &str, args: &[&str]) -> Vec<String> {
    let output = std::process::Command::new(dir.join(command))
        .arg("lint")
        .args(["-s", "WARNING", "-f", "JSON"])
        .args(args)
        .output()
        .expect("pkilint runs");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{command} did not print a JSON report ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let results = report["results"].as_array().expect("a results array");
    let mut findings = Vec::new();
    for result in results {
        for finding in result["finding_descriptions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            findings.push(format!(
                "{}: {} {}",
                finding["code"].as_str().unwrap_or("?"),
                result["node_path"].as_str().unwrap_or("?"),
                finding["message"].as_str().unwrap_or("")
            ));
        }
    }
    // pkilint exits non-zero exactly when it reports findings.
    assert_eq!(
        output.status.success(),
        findings.is_empty(),
        "{command}: exit {:?} with {findings:?}",
        output.status
    );
    findings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkilint_finds_no_warning_in_the_sm2_hierarchy_crl_and_ocsp_answers() {
    let Some(pkilint) = pkilint() else {
        eprintln!("skipped: PAYRA_TEST_PKILINT is not set (.ci/run installs pkilint)");
        return;
    };
    let server = TestServer::start().await;
    let phone = enroll_sm2(&server, "lint", "lint-phone").await;
    server
        .revoke(&phone.issued.serial, proto::RevocationReason::KeyCompromise)
        .await;
    let certs = server.certs();
    for cert in [
        certs.join("sm2-root.pem"),
        certs.join("sm2-issuing.pem"),
        phone.leaf(),
    ] {
        let findings = lint(&pkilint, "lint_pkix_cert", &[path_str(&cert)]);
        assert!(findings.is_empty(), "{}: {findings:?}", cert.display());
    }
    // The only findings on the device certificate are the two URNs, which `lint` leaves out.
    let report = lint_all(&pkilint, "lint_pkix_cert", &[path_str(&phone.leaf())]);
    assert_eq!(report.len(), 2, "{report:?}");
    assert!(
        report
            .iter()
            .all(|f| f.starts_with("pkix.invalid_uri_syntax: ")
                && f.contains("uniformResourceIdentifier")),
        "{report:?}"
    );
    let (_, headers, crl) = http_get(&server.http_url("/crl/sm2")).await;
    assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");
    let crl_path = crl_file(&server, &crl);
    let findings = lint(
        &pkilint,
        "lint_crl",
        &["-t", "CRL", "-p", "PKIX", &crl_path],
    );
    assert!(findings.is_empty(), "SM2 CRL: {findings:?}");
    let (text, response) = openssl_ocsp_sm2_to(&server, &phone.leaf());
    assert!(text.contains(": revoked"), "{text}");
    let findings = lint(&pkilint, "lint_ocsp_response", &[path_str(&response)]);
    assert!(findings.is_empty(), "SM2 OCSP response: {findings:?}");

    // The P-256 hierarchy and its device certificates, for comparison: the same.
    let p256 = enrolled(&server, "lint", "lint-p256").await;
    for cert in [
        certs.join("root.pem"),
        certs.join("issuing.pem"),
        p256.dir.join("leaf.pem"),
    ] {
        let findings = lint(&pkilint, "lint_pkix_cert", &[path_str(&cert)]);
        assert!(findings.is_empty(), "{}: {findings:?}", cert.display());
    }
    let crl = fetch_crl(&server).await;
    let findings = lint(
        &pkilint,
        "lint_crl",
        &["-t", "CRL", "-p", "PKIX", &crl_file(&server, &crl)],
    );
    assert!(findings.is_empty(), "P-256 CRL: {findings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_renewal_proofs_count_toward_the_address_limit() {
    let server = TestServer::start_with(|config| {
        config.limits.enroll_failures_per_minute = 2;
    })
    .await;
    let phone = enroll_sm2(&server, "zhao", "zhao-phone").await;
    let now_s = server.clock.now_ms() / 1000;
    let csr = openssl_sm2_csr(&phone.dir, &phone.key, DISTID_OPT);
    let mut forged = renewal_proof(&phone, &csr, now_s, &phone.key);
    forged.signed_at_unix_s += 1;
    let mut unknown = forged.clone();
    unknown.current_serial = payra::model::Serial::random().to_hex();
    let anonymous = server.anonymous().await;
    // A forged proof, and a proof for a serial payra never issued: both count.
    for proof in [forged.clone(), unknown] {
        let refused = anonymous
            .renew_with_proof(csr.clone(), None, proof)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    }
    // The third is turned away before its signature is checked; so is a good proof, until
    // the window passes.
    let refused = anonymous
        .renew_with_proof(csr.clone(), None, forged)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    let good = renewal_proof(&phone, &csr, now_s, &phone.key);
    let refused = anonymous
        .renew_with_proof(csr.clone(), None, good.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    server.clock.advance_ms(61_000);
    let good = renewal_proof(&phone, &csr, now_s + 61, &phone.key);
    anonymous
        .renew_with_proof(csr, None, good)
        .await
        .expect("a good proof renews once the window has passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sm2_keys_stay_on_their_own_paths() {
    use payra::client::Sm2DeviceKey;
    let server = TestServer::start().await;
    let certs = server.certs();
    // An SM2 key with an attestation: refused before the attestation is even read.
    let token = server.token("wu").await;
    let refused = server
        .anonymous()
        .await
        .enrollment()
        .enroll(proto::EnrollRequest {
            token: token.clone(),
            csr_der: Sm2DeviceKey::generate().csr_der("wu-1").unwrap(),
            device_id: "wu-1".into(),
            device_info: None,
            attestation: Some(proto::enroll_request::Attestation::Android(
                proto::AndroidKeyAttestation {
                    certificate_chain_der: vec![vec![0x30, 0x00]],
                },
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().starts_with("attestation"), "{refused:?}");

    // An SM2 key cannot have a client certificate: payra's TLS speaks P-256.
    let refused = server
        .operator()
        .await
        .issue_client_certificate(
            "service",
            "sm2-svc",
            Sm2DeviceKey::generate().csr_der("s").unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("not accepted for a client certificate"),
        "{refused}"
    );

    // Asked of the SM2 issuer, a P-256 device's serial is unknown.
    let (_, p256) = server.enroll("wu", "wu-p256").await;
    let (ok, text) = openssl(&[
        "ocsp",
        "-issuer",
        path_str(&certs.join("sm2-issuing.pem")),
        "-serial",
        &format!("0x{}", p256.serial),
        "-url",
        &server.http_url("/ocsp"),
        "-noverify",
    ]);
    assert!(ok && text.contains(": unknown"), "{text}");

    // An SM2 phone renewing by proof to a P-256 key gets a P-256 certificate from the P-256
    // issuing CA; the lineage stays one.
    let phone = enroll_sm2(&server, "wu", "wu-sm2").await;
    let p256_key = payra::client::DeviceKey::generate();
    let csr = p256_key.csr_der("wu-sm2").unwrap();
    let proof = renewal_proof(&phone, &csr, server.clock.now_ms() / 1000, &phone.key);
    let renewed = server
        .anonymous()
        .await
        .renew_with_proof(csr, None, proof)
        .await
        .expect("renewal to a P-256 key");
    let issuing = ::pem::parse(std::fs::read(certs.join("issuing.pem")).unwrap()).unwrap();
    assert_eq!(renewed.chain_der[0], issuing.contents());
    let record = server
        .operator()
        .await
        .certificate(&renewed.serial)
        .await
        .unwrap();
    assert_eq!(record.key_algorithm, "p256");
    assert_eq!(record.renewed_from_serial, phone.issued.serial);
    let (_, text) = sm2_crl(&server).await;
    assert!(
        text.contains(&phone.issued.serial.to_uppercase()),
        "superseded SM2 serial: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_enrolls_pays_and_renews_an_sm2_device() {
    let server = TestServer::start().await;
    let token = server.token("liu").await;
    let dir = server.dir.path().join("cli-sm2");
    let (ok, stdout, stderr) = run_payra_at(
        &server,
        &[
            "device",
            "enroll",
            "--token",
            &token,
            "--device",
            "liu-phone",
            "--out",
            path_str(&dir),
            "--key-algorithm",
            "sm2",
        ],
    );
    assert!(ok, "{stderr}");
    let serial = stdout.trim().to_string();
    // OpenSSL reads the key as SM2, and its certificate as the SM2 issuing CA's.
    let (ok, text) = openssl(&[
        "pkey",
        "-in",
        path_str(&dir.join("device.key")),
        "-noout",
        "-text",
    ]);
    assert!(ok && text.contains("ASN1 OID: SM2"), "{text}");
    let (ok, text) = openssl_verify_sm2(&server, &dir.join("device.pem"), DISTID_OPT, &[]);
    assert!(ok, "{text}");

    assert_eq!(cli_pay(&server, &dir, "o-1")["verdict"], "VERIFIED");

    // Renewal by proof, from the directory; it then holds a new SM2 key and certificate.
    let (ok, stdout, stderr) = run_payra_at(
        &server,
        &["device", "renew", "--device-dir", path_str(&dir)],
    );
    assert!(ok, "{stderr}");
    let renewed = stdout.trim().to_string();
    assert_ne!(renewed, serial);
    let record = server.operator().await.certificate(&renewed).await.unwrap();
    assert_eq!(record.key_algorithm, "sm2");
    assert_eq!(record.renewed_from_serial, serial);
    assert_eq!(cli_pay(&server, &dir, "o-2")["verdict"], "VERIFIED");
}
