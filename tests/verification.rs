//! End to end: VerifyPayment verdicts, tiers, the daily ledger, evidence and replay, over
//! real TLS against a real server; signatures also made by OpenSSL.

mod common;

use std::sync::Arc;

use common::*;
use payra::client::{encode_intent, random_nonce, DeviceKey};
use payra::clock::Clock;
use payra::wire::proto;
use proto::{FactorCategory as Cat, Verdict};
use tonic::Code;

struct Phone {
    key: DeviceKey,
    serial: String,
    customer: String,
    device: String,
    dir: std::path::PathBuf,
}

async fn phone(server: &TestServer, customer: &str, device: &str) -> Phone {
    let (key, issued) = server.enroll(customer, device).await;
    let dir = write_device_dir(&server.dir.path().join(&issued.serial), &key, &issued);
    Phone {
        key,
        serial: issued.serial,
        customer: customer.into(),
        device: device.into(),
        dir,
    }
}

fn intent(
    server: &TestServer,
    phone: &Phone,
    order: &str,
    amount_fen: i64,
) -> proto::PaymentIntent {
    payment_intent(
        &phone.customer,
        &phone.device,
        order,
        amount_fen,
        server.clock.now_ms(),
    )
}

fn pin() -> proto::Factor {
    proto::Factor {
        category: Cat::Knowledge as i32,
        method: "payment_pin".into(),
    }
}

fn sms() -> proto::Factor {
    proto::Factor {
        category: Cat::Possession as i32,
        method: "sms_otp".into(),
    }
}

fn request(
    phone: &Phone,
    intent: &proto::PaymentIntent,
    factors: Vec<proto::Factor>,
    reserve: bool,
) -> proto::VerifyPaymentRequest {
    signed_payment(&phone.key, &phone.serial, intent, factors, reserve)
}

async fn set_agreed_limit(server: &TestServer, customer: &str, daily_limit_fen: i64) {
    server
        .operator()
        .await
        .admin()
        .set_agreed_limit(proto::SetAgreedLimitRequest {
            customer_id: customer.into(),
            daily_limit_fen,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn ok_verified_with_pin_is_tier_a_and_reserves() {
    let server = TestServer::start().await;
    let p = phone(&server, "alice", "a-1").await;
    let i = intent(&server, &p, "o-1", 1234);
    let answer = verify(&server, request(&p, &i, vec![pin()], true)).await;
    assert_eq!(verdict(&answer), Verdict::Verified, "{}", answer.reason);
    assert_eq!(answer.tier, proto::Tier::A as i32);
    assert_eq!(
        answer.categories,
        vec![Cat::Knowledge as i32, Cat::Possession as i32]
    );
    let limit = answer.limit.unwrap();
    // No agreement and no standard-terms figure configured: tier A gets the B ceiling.
    assert_eq!(limit.limit_fen, 500_000, "tier A without an agreement");
    assert_eq!(limit.binding_tier, proto::Tier::A as i32);
    assert_eq!(limit.used_fen, 1234);
    assert_eq!(limit.remaining_fen, 500_000 - 1234);
    assert!(limit.fits && limit.reserved);
    assert!(answer.evidence_id.starts_with("ev_"));

    // The evidence keeps the signed bytes for disputes.
    let evidence = server
        .operator()
        .await
        .evidence(&answer.evidence_id)
        .await
        .unwrap();
    assert_eq!(evidence.intent, encode_intent(&i));
    assert_eq!(evidence.verdict, "VERIFIED");
    assert_eq!(evidence.tier, "A");
    assert_eq!(evidence.reserved_fen, 1234);
    assert_eq!(evidence.certificate_serial, p.serial);

    // Certificate + SMS OTP is one category: tier C.
    let i2 = intent(&server, &p, "o-2", 100);
    let answer = verify(&server, request(&p, &i2, vec![sms()], false)).await;
    assert_eq!(verdict(&answer), Verdict::Verified);
    assert_eq!(answer.tier, proto::Tier::C as i32);
    assert_eq!(answer.categories, vec![Cat::Possession as i32]);
    assert_eq!(answer.limit.unwrap().limit_fen, 100_000);
}

#[tokio::test]
async fn fail_every_verdict_end_to_end() {
    let server = TestServer::start().await;
    let p = phone(&server, "bob", "b-1").await;
    let other = phone(&server, "carl", "c-1").await;

    // Unknown certificate.
    let i = intent(&server, &p, "o-unknown", 100);
    let mut r = request(&p, &i, vec![pin()], true);
    r.certificate_serial = "4ccccccccccccccccccccccccccccccc".into();
    let a = verify(&server, r).await;
    assert_eq!(verdict(&a), Verdict::UnknownCertificate);
    assert!(a.limit.is_none());

    // Bad signature: signed by another key.
    let i = intent(&server, &p, "o-badsig", 100);
    let mut r = request(&p, &i, vec![pin()], true);
    r.signature = other.key.sign_intent(&r.intent);
    let a = verify(&server, r).await;
    assert_eq!(verdict(&a), Verdict::BadSignature);
    assert_eq!(
        a.tier,
        proto::Tier::C as i32,
        "a refused signature never counts the certificate"
    );
    assert!(!a.limit.as_ref().unwrap().reserved);

    // Malformed intent: validly signed bytes that are not a PaymentIntent.
    let junk = vec![0xff, 0xff, 0xff];
    let r = proto::VerifyPaymentRequest {
        signature: p.key.sign_intent(&junk),
        intent: junk,
        certificate_serial: p.serial.clone(),
        transaction: Some(transaction_of(&i)),
        factors: vec![],
        reserve: false,
    };
    assert_eq!(verdict(&verify(&server, r).await), Verdict::MalformedIntent);

    // Malformed intent: a nonce that is too short.
    let mut i = intent(&server, &p, "o-short-nonce", 100);
    i.nonce = vec![1; 8];
    assert_eq!(
        verdict(&verify(&server, request(&p, &i, vec![], false)).await),
        Verdict::MalformedIntent
    );

    // Identity mismatch: the intent names another device.
    let mut i = intent(&server, &p, "o-identity", 100);
    i.device_id = "someone-else".into();
    assert_eq!(
        verdict(&verify(&server, request(&p, &i, vec![], false)).await),
        Verdict::IdentityMismatch
    );

    // Transaction mismatch: the service is about to charge more than was signed.
    let i = intent(&server, &p, "o-amount", 100);
    let mut r = request(&p, &i, vec![], true);
    r.transaction.as_mut().unwrap().amount_fen = 10_000;
    let a = verify(&server, r).await;
    assert_eq!(verdict(&a), Verdict::TransactionMismatch);
    assert!(a.reason.contains("amount_fen"), "{}", a.reason);

    // Stale and future timestamps (skew ±120 s).
    let mut i = intent(&server, &p, "o-stale", 100);
    i.created_at_ms -= 121_000;
    assert_eq!(
        verdict(&verify(&server, request(&p, &i, vec![], false)).await),
        Verdict::StaleTimestamp
    );
    let mut i = intent(&server, &p, "o-future", 100);
    i.created_at_ms += 121_000;
    assert_eq!(
        verdict(&verify(&server, request(&p, &i, vec![], false)).await),
        Verdict::StaleTimestamp
    );

    // Replayed nonce.
    let i = intent(&server, &p, "o-replay", 100);
    assert_eq!(
        verdict(&verify(&server, request(&p, &i, vec![], false)).await),
        Verdict::Verified
    );
    assert_eq!(
        verdict(&verify(&server, request(&p, &i, vec![], false)).await),
        Verdict::ReplayedNonce
    );

    // Expired: the server's clock moves past notAfter (the intent is fresh).
    server.clock.advance_ms(366 * 86_400 * 1000);
    let i = intent(&server, &p, "o-expired", 100);
    assert_eq!(
        verdict(&verify(&server, request(&p, &i, vec![], false)).await),
        Verdict::CertificateExpired
    );
    server.clock.advance_ms(-366 * 86_400 * 1000);

    // Revoked: refused on the first verification after the revocation is acknowledged.
    server
        .revoke(&p.serial, proto::RevocationReason::KeyCompromise)
        .await;
    let i = intent(&server, &p, "o-revoked", 100);
    let a = verify(&server, request(&p, &i, vec![pin()], true)).await;
    assert_eq!(verdict(&a), Verdict::CertificateRevoked);
    assert!(a.reason.contains("key-compromise"), "{}", a.reason);
}

#[tokio::test]
async fn fail_malformed_requests_are_invalid_argument() {
    let server = TestServer::start().await;
    let p = phone(&server, "dina", "d-1").await;
    let client = server.service().await;
    let i = intent(&server, &p, "o", 100);
    let base = request(&p, &i, vec![pin()], false);
    type Mutation = Box<dyn Fn(&mut proto::VerifyPaymentRequest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("transaction", Box::new(|r| r.transaction = None)),
        (
            "certificate_serial",
            Box::new(|r| r.certificate_serial = "xyz".into()),
        ),
        ("intent", Box::new(|r| r.intent = vec![0; 5000])),
        ("signature", Box::new(|r| r.signature = vec![])),
        (
            "transaction.amount_fen",
            Box::new(|r| r.transaction.as_mut().unwrap().amount_fen = 0),
        ),
        (
            "transaction.currency",
            Box::new(|r| r.transaction.as_mut().unwrap().currency = "USD".into()),
        ),
        (
            "factors.category",
            Box::new(|r| {
                r.factors = vec![proto::Factor {
                    category: 0,
                    method: "x".into(),
                }]
            }),
        ),
        ("factors", Box::new(|r| r.factors = vec![pin(); 9])),
        (
            // An SMS OTP reported as knowledge would make certificate + OTP tier A.
            "factors.category",
            Box::new(|r| {
                r.factors = vec![proto::Factor {
                    category: Cat::Knowledge as i32,
                    method: "sms_otp".into(),
                }]
            }),
        ),
    ];
    for (field, mutate) in cases {
        let mut r = base.clone();
        mutate(&mut r);
        let err = client.verify_payment(r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // Nothing was reserved or replay-marked by the refusals: the base request still works.
    let a = verify(&server, base).await;
    assert_eq!(verdict(&a), Verdict::Verified);
    let err = server
        .anonymous()
        .await
        .verify_payment(request(&p, &i, vec![], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = server
        .operator()
        .await
        .verify_payment(request(&p, &i, vec![], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_openssl_signatures_verify_in_both_encodings() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, csr) = openssl_key_and_csr(dir.path(), "/CN=x", &[]);
    let issued = server.enroll_csr("erin", "erin-phone", csr).await.unwrap();
    for (order, raw) in [("o-der", false), ("o-raw", true)] {
        let i = proto::PaymentIntent {
            customer_id: "erin".into(),
            device_id: "erin-phone".into(),
            merchant_id: "m-1".into(),
            order_id: order.into(),
            amount_fen: 500,
            currency: "CNY".into(),
            created_at_ms: server.clock.now_ms(),
            nonce: random_nonce(),
            scene: proto::Scene::DynamicBarcode as i32,
        };
        let bytes = encode_intent(&i);
        let message = dir.path().join(format!("{order}.bin"));
        let mut signed = b"payra.v1.PaymentIntent\n".to_vec();
        signed.extend_from_slice(&bytes);
        std::fs::write(&message, &signed).unwrap();
        let sig_path = dir.path().join(format!("{order}.sig"));
        let (ok, text) = openssl(&[
            "dgst",
            "-sha256",
            "-sign",
            path_str(&key),
            "-out",
            path_str(&sig_path),
            path_str(&message),
        ]);
        assert!(ok, "{text}");
        let der_sig = std::fs::read(&sig_path).unwrap();
        let signature = if raw {
            let sig = p256::ecdsa::Signature::from_der(&der_sig).unwrap();
            sig.to_bytes().to_vec()
        } else {
            der_sig
        };
        let answer = verify(
            &server,
            proto::VerifyPaymentRequest {
                intent: bytes,
                signature,
                certificate_serial: issued.serial.clone(),
                transaction: Some(transaction_of(&i)),
                factors: vec![pin()],
                reserve: false,
            },
        )
        .await;
        assert_eq!(
            verdict(&answer),
            Verdict::Verified,
            "{order}: {}",
            answer.reason
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_fifty_concurrent_reservations_of_a_fifth_never_overshoot() {
    let server = Arc::new(TestServer::start().await);
    let p = Arc::new(phone(&server, "fay", "f-1").await);
    // Tier C (certificate only): limit 100,000 fen; each payment is 20,000.
    let mut tasks = Vec::new();
    for n in 0..50 {
        let server = server.clone();
        let p = p.clone();
        let client = server.service().await;
        tasks.push(tokio::spawn(async move {
            let i = intent(&server, &p, &format!("o-{n}"), 20_000);
            client
                .verify_payment(request(&p, &i, vec![], true))
                .await
                .unwrap()
        }));
    }
    let mut reserved = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(verdict(&answer), Verdict::Verified);
        let limit = answer.limit.unwrap();
        if limit.reserved {
            reserved += 1;
        } else {
            assert!(!limit.fits);
        }
    }
    assert_eq!(reserved, 5);
    let q = server
        .service()
        .await
        .qualify_transaction(proto::QualifyTransactionRequest {
            reserve: false,
            ..qualify_request("fay", "q", 1, vec![], proto::Scene::InApp)
        })
        .await
        .unwrap();
    let limit = q.limit.unwrap();
    assert_eq!(limit.used_fen, 5 * 20_000);
    assert_eq!(limit.remaining_fen, 0);
    assert!(!limit.fits);
}

#[tokio::test]
async fn ok_day_rollover_resets_used_and_release_gives_back() {
    let server = TestServer::start().await;
    // 2026-11-25 15:59:00 UTC is 23:59 in Shanghai.
    server.clock.set_ms(1_795_622_340_000);
    let p = phone(&server, "gus", "g-1").await;
    let i = intent(&server, &p, "o-late", 30_000);
    let a = verify(&server, request(&p, &i, vec![], true)).await;
    let limit = a.limit.unwrap();
    assert_eq!((limit.used_fen, limit.day.as_str()), (30_000, "2026-11-25"));

    let i = intent(&server, &p, "o-late-2", 20_000);
    let second = verify(&server, request(&p, &i, vec![], true)).await;
    assert_eq!(second.limit.as_ref().unwrap().used_fen, 50_000);
    let released = server
        .service()
        .await
        .verification()
        .release_reservation(proto::ReleaseReservationRequest {
            evidence_id: second.evidence_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.limit.unwrap().used_fen, 30_000);
    let err = server
        .service()
        .await
        .verification()
        .release_reservation(proto::ReleaseReservationRequest {
            evidence_id: second.evidence_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "a reservation is released once"
    );

    server.clock.advance_ms(60_000); // 00:00 in Shanghai: a new day
    let i = intent(&server, &p, "o-early", 10_000);
    let a = verify(&server, request(&p, &i, vec![], true)).await;
    let limit = a.limit.unwrap();
    assert_eq!((limit.used_fen, limit.day.as_str()), (10_000, "2026-11-26"));
}

#[tokio::test]
async fn ok_agreed_limit_and_qualify_tiers() {
    let mut server = TestServer::start().await;
    let p = phone(&server, "hana", "h-1").await;
    set_agreed_limit(&server, "hana", 2_000_000).await;
    let i = intent(&server, &p, "o-1", 100);
    let a = verify(&server, request(&p, &i, vec![pin()], false)).await;
    assert_eq!(a.tier, proto::Tier::A as i32);
    assert_eq!(a.limit.unwrap().limit_fen, 2_000_000);

    let service = server.service().await;
    let qualify =
        |factors: Vec<proto::Factor>, scene: proto::Scene| proto::QualifyTransactionRequest {
            customer_id: "hana".into(),
            transaction: Some(proto::Transaction {
                merchant_id: "m".into(),
                order_id: "o".into(),
                amount_fen: 100,
                currency: "CNY".into(),
            }),
            factors,
            scene: scene as i32,
            reserve: false,
        };
    for (factors, scene, tier, limit) in [
        (
            vec![pin(), sms()],
            proto::Scene::InApp,
            proto::Tier::B,
            500_000,
        ),
        (vec![pin()], proto::Scene::Online, proto::Tier::C, 100_000),
        (
            vec![pin(), sms()],
            proto::Scene::StaticBarcode,
            proto::Tier::D,
            50_000,
        ),
    ] {
        let q = service
            .qualify_transaction(qualify(factors, scene))
            .await
            .unwrap();
        assert_eq!(q.tier, tier as i32);
        assert_eq!(q.limit.unwrap().limit_fen, limit);
    }
    let err = service
        .qualify_transaction(qualify(vec![], proto::Scene::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Verification reads agreed limits from memory; a restart loads them from the store.
    server.restart().await;
    let i = intent(&server, &p, "o-2", 100);
    let a = verify(&server, request(&p, &i, vec![pin()], false)).await;
    assert_eq!(a.tier, proto::Tier::A as i32);
    assert_eq!(a.limit.unwrap().limit_fen, 2_000_000);
}

#[tokio::test]
async fn fail_nonce_replayed_after_restart() {
    let mut server = TestServer::start().await;
    let p = phone(&server, "ivan", "i-1").await;
    let i = intent(&server, &p, "o-1", 100);
    assert_eq!(
        verdict(&verify(&server, request(&p, &i, vec![], false)).await),
        Verdict::Verified
    );
    server.restart().await;
    assert_eq!(
        verdict(&verify(&server, request(&p, &i, vec![], false)).await),
        Verdict::ReplayedNonce
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_device_pay_cli() {
    let server = TestServer::start().await;
    let p = phone(&server, "jill", "j-1").await;
    let (ok, stdout, stderr) = run_payra_at(
        &server,
        &[
            "device",
            "pay",
            "--device-dir",
            path_str(&p.dir),
            "--merchant",
            "m-1",
            "--order",
            "o-1",
            "--amount",
            "12.34",
            "--factor",
            "payment_pin",
            "--reserve",
            "--json",
        ],
    );
    assert!(ok, "{stdout} {stderr}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["verdict"], "VERIFIED");
    assert_eq!(answer["tier"], "A");
    assert_eq!(answer["used_fen"], 1234);
    assert_eq!(answer["reserved"], true);
}

#[tokio::test]
async fn fail_weaker_verifications_never_add_to_the_days_envelope() {
    let server = TestServer::start().await;
    let service = server.service().await;
    let qualify_with_evidence = |order: &str, amount: i64, factors: Vec<proto::Factor>, scene| {
        let request = qualify_request("nora", order, amount, factors, scene);
        let mut client = service.verification();
        async move {
            let answer = client
                .qualify_transaction(request)
                .await
                .unwrap()
                .into_inner();
            (answer.limit.unwrap(), answer.evidence_id)
        }
    };
    let qualify = |order: &str, amount: i64, factors: Vec<proto::Factor>, scene| {
        let answer = qualify_with_evidence(order, amount, factors, scene);
        async move { answer.await.0 }
    };
    use proto::Scene::{InApp, StaticBarcode};
    // The review's day: 500 (static code, D) + 1,000 (C) + 5,000 (B) = 6,500 CNY.
    let (d, d_evidence) = qualify_with_evidence("d-1", 50_000, vec![], StaticBarcode).await;
    assert!(d.reserved && d.fits);
    assert_eq!(
        d.ceilings.len(),
        3,
        "a D decision fits the D, C and B ceilings"
    );
    let c = qualify("c-1", 100_000, vec![pin()], InApp).await;
    assert!(!c.reserved && !c.fits, "C + D would be 1,500 CNY");
    assert_eq!(c.binding_tier, proto::Tier::C as i32);
    assert_eq!(
        (c.limit_fen, c.used_fen, c.remaining_fen),
        (100_000, 50_000, 50_000)
    );
    let c = qualify("c-2", 50_000, vec![pin()], InApp).await;
    assert!(c.reserved);
    let b = qualify("b-1", 500_000, vec![pin(), sms()], InApp).await;
    assert!(!b.reserved, "B + C + D would be 6,000 CNY");
    assert_eq!(b.binding_tier, proto::Tier::B as i32);
    assert_eq!(b.remaining_fen, 400_000);
    let b = qualify("b-2", 400_000, vec![pin(), sms()], InApp).await;
    assert!(b.reserved);
    assert_eq!((b.used_fen, b.remaining_fen), (500_000, 0));
    // Nothing without a certificate fits any more today.
    for (order, factors, scene) in [
        ("d-2", vec![], StaticBarcode),
        ("c-3", vec![], InApp),
        ("b-3", vec![pin(), sms()], InApp),
    ] {
        let status = qualify(order, 1, factors, scene).await;
        assert!(!status.reserved && !status.fits, "{order}");
        assert_eq!(status.remaining_fen, 0, "{order}");
    }
    // Releasing the D reservation gives back exactly its room in every ceiling it counted in.
    let released = service
        .verification()
        .release_reservation(proto::ReleaseReservationRequest {
            evidence_id: d_evidence,
        })
        .await
        .unwrap()
        .into_inner()
        .limit
        .unwrap();
    assert_eq!(released.remaining_fen, 50_000, "{released:?}");
    assert!(!qualify("c-4", 50_001, vec![pin()], InApp).await.reserved);
    assert!(qualify("c-5", 50_000, vec![pin()], InApp).await.reserved);

    // A certificate-backed payment counts against the agreed limit, with the day's weaker
    // payments in it, and takes nothing from B/C/D.
    set_agreed_limit(&server, "nora", 600_000).await;
    let p = phone(&server, "nora", "n-1").await;
    let i = intent(&server, &p, "a-1", 100_001);
    let a = verify(&server, request(&p, &i, vec![pin()], true)).await;
    assert_eq!(a.tier, proto::Tier::A as i32);
    let limit = a.limit.unwrap();
    assert!(!limit.reserved, "A + B + C + D would be 600,001 fen");
    assert_eq!(
        (limit.binding_tier, limit.remaining_fen),
        (proto::Tier::A as i32, 100_000)
    );
    let i = intent(&server, &p, "a-2", 100_000);
    let limit = verify(&server, request(&p, &i, vec![pin()], true))
        .await
        .limit
        .unwrap();
    assert!(limit.reserved);
    let b = qualify("b-4", 1, vec![pin(), sms()], InApp).await;
    assert_eq!(b.remaining_fen, 0, "the B ceiling is where it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_concurrent_c_and_d_reservations_never_pass_the_shared_ceiling() {
    let server = Arc::new(TestServer::start().await);
    let mut tasks = Vec::new();
    for n in 0..40 {
        let client = server.service().await;
        let scene = if n % 2 == 0 {
            proto::Scene::StaticBarcode
        } else {
            proto::Scene::InApp
        };
        let request = qualify_request("olga", &format!("o-{n}"), 10_000, vec![], scene);
        tasks.push(tokio::spawn(async move {
            let answer = client.qualify_transaction(request).await.unwrap();
            (answer.tier, answer.limit.unwrap().reserved)
        }));
    }
    let (mut c, mut d) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (tier, true) if tier == proto::Tier::D as i32 => d += 1,
            (tier, true) if tier == proto::Tier::C as i32 => c += 1,
            (_, false) => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(d <= 5, "D alone is capped at 500 CNY: {d} reserved");
    assert_eq!(c + d, 10, "C + D fill exactly 1,000 CNY (c={c}, d={d})");
}

/// Enrolls `key` (not a fresh one) for `customer` / `device` with a new token.
async fn enroll_key(
    server: &TestServer,
    key: &DeviceKey,
    customer: &str,
    device: &str,
) -> Result<proto::EnrollResponse, payra::client::ClientError> {
    let token = server.token(customer).await;
    server
        .anonymous()
        .await
        .enroll(&token, key.csr_der(device).unwrap(), device, device_info())
        .await
}

#[tokio::test]
async fn fail_one_intent_verifies_once_per_key_across_its_certificates() {
    let server = TestServer::start().await;
    let first = phone(&server, "quinn", "q-1").await;
    // The same key enrolled again for the same customer and device (allowed: a phone that
    // lost its certificate but not its key).
    let key = DeviceKey::from_pkcs8_pem(&first.key.to_pkcs8_pem().unwrap()).unwrap();
    let again = enroll_key(&server, &key, "quinn", "q-1").await.unwrap();
    assert_ne!(again.serial, first.serial);
    let second = Phone {
        key,
        serial: again.serial,
        customer: "quinn".into(),
        device: "q-1".into(),
        dir: first.dir.clone(),
    };
    let i = intent(&server, &first, "o-1", 40_000);
    let a = verify(&server, request(&first, &i, vec![pin()], true)).await;
    assert_eq!(verdict(&a), Verdict::Verified, "{}", a.reason);
    // The same signed intent under the other certificate of the same key.
    let b = verify(&server, request(&second, &i, vec![pin()], true)).await;
    assert_eq!(verdict(&b), Verdict::ReplayedNonce, "{}", b.reason);
    assert!(!b.limit.unwrap().reserved);
}

#[tokio::test]
async fn fail_a_key_is_not_certified_for_another_customer_or_device() {
    let server = TestServer::start().await;
    let first = phone(&server, "rosa", "r-1").await;
    let key = DeviceKey::from_pkcs8_pem(&first.key.to_pkcs8_pem().unwrap()).unwrap();
    for (customer, device) in [("mallory", "r-1"), ("rosa", "r-2")] {
        let err = enroll_key(&server, &key, customer, device)
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::AlreadyExists,
            "{customer}/{device}: {err:?}"
        );
        assert!(err.message().contains("generate a new key pair"), "{err:?}");
    }
    // Once the holder's certificate is revoked, the key is free again.
    server
        .revoke(&first.serial, proto::RevocationReason::CessationOfOperation)
        .await;
    enroll_key(&server, &key, "rosa", "r-2").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_concurrent_enrollments_of_one_key_for_two_customers_give_one_certificate() {
    let server = Arc::new(TestServer::start().await);
    let key = DeviceKey::generate();
    let mut tasks = Vec::new();
    for n in 0..8 {
        let server = server.clone();
        let key = DeviceKey::from_pkcs8_pem(&key.to_pkcs8_pem().unwrap()).unwrap();
        tasks.push(tokio::spawn(async move {
            let customer = format!("race-{}", n % 2);
            enroll_key(&server, &key, &customer, "race-phone")
                .await
                .map(|_| customer)
        }));
    }
    let mut holders = std::collections::HashSet::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(customer) => {
                holders.insert(customer);
            }
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
        }
    }
    assert_eq!(holders.len(), 1, "one key certified for {holders:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_limits_show_gives_every_tiers_ceilings_without_recording_anything() {
    let server = TestServer::start().await;
    let service = server.service().await;
    for (order, amount, factors, scene) in [
        ("d-1", 30_000, vec![], proto::Scene::StaticBarcode),
        ("c-1", 20_000, vec![pin()], proto::Scene::InApp),
    ] {
        let answer = service
            .qualify_transaction(qualify_request("pia", order, amount, factors, scene))
            .await
            .unwrap();
        assert!(answer.limit.unwrap().reserved);
    }
    let limits = server.operator().await.limits("pia").await.unwrap();
    assert!(!limits.has_agreement);
    let tiers: Vec<i32> = limits.tiers.iter().map(|t| t.tier).collect();
    assert_eq!(
        tiers,
        [
            proto::Tier::A,
            proto::Tier::B,
            proto::Tier::C,
            proto::Tier::D
        ]
        .map(|t| t as i32)
    );
    let d = &limits.tiers[3];
    assert_eq!(d.ceilings.len(), 3);
    assert_eq!(
        (d.binding_tier, d.remaining_fen),
        (proto::Tier::D as i32, 20_000),
        "D: 500 - 300 left; C: 1,000 - 500 = 500 left; B: 5,000 - 500"
    );
    let c = &limits.tiers[2];
    assert_eq!(
        (c.binding_tier, c.remaining_fen),
        (proto::Tier::C as i32, 50_000)
    );
    let a = &limits.tiers[0];
    assert_eq!(
        (a.limit_fen, a.used_fen),
        (500_000, 50_000),
        "the day counts toward A"
    );

    // The CLI prints the same for a person, in CNY.
    let (ok, stdout, stderr) = run_payra_at(&server, &["limits", "show", "--customer", "pia"]);
    assert!(ok, "{stdout} {stderr}");
    assert!(
        stdout.contains("C+D") && stdout.contains("500.00 CNY"),
        "{stdout}"
    );
    assert!(stdout.contains("<- binds"), "{stdout}");

    // Reading recorded nothing: the ledger stands where it stood.
    let again = server.service().await.limits("pia").await.unwrap();
    assert_eq!(again.tiers, limits.tiers);
}

#[tokio::test]
async fn fail_a_compromised_key_is_revoked_everywhere_and_never_certified_again() {
    let server = TestServer::start().await;
    let first = phone(&server, "uma", "u-1").await;
    let key = DeviceKey::from_pkcs8_pem(&first.key.to_pkcs8_pem().unwrap()).unwrap();
    // The same key again for the same phone (it kept its keystore key).
    let second = enroll_key(&server, &key, "uma", "u-1").await.unwrap();
    let response = server
        .operator()
        .await
        .revoke_certificate(&first.serial, proto::RevocationReason::KeyCompromise)
        .await
        .unwrap();
    let mut revoked = response.revoked_serials.clone();
    revoked.sort();
    let mut expected = vec![first.serial.clone(), second.serial.clone()];
    expected.sort();
    assert_eq!(revoked, expected, "every certificate of the key");
    assert!(response.note.contains("same key"), "{}", response.note);
    // Never again, for anyone.
    for (customer, device) in [("uma", "u-1"), ("vik", "v-1")] {
        let err = enroll_key(&server, &key, customer, device)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        assert!(err.message().contains("reported compromised"), "{err:?}");
    }
}

/// The decision of one payment of a VerifyPayments answer, or its error.
fn decided(result: &proto::VerifyPaymentResult) -> &proto::VerifyPaymentResponse {
    match &result.result {
        Some(proto::verify_payment_result::Result::Decision(d)) => d,
        other => panic!("expected a decision, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_a_batch_decides_each_payment_as_verify_payment_would() {
    let server = TestServer::start().await;
    let p = phone(&server, "kim", "k-1").await;
    let other = phone(&server, "lou", "l-1").await;
    let client = server.service().await;

    let paid = intent(&server, &p, "o-paid", 1234);
    let mut bad_signature = request(&p, &intent(&server, &p, "o-badsig", 100), vec![pin()], true);
    bad_signature.signature = other.key.sign_intent(&bad_signature.intent);
    let mut unknown = request(&p, &intent(&server, &p, "o-unknown", 100), vec![], false);
    unknown.certificate_serial = "4ccccccccccccccccccccccccccccccc".into();
    let mut malformed = request(&p, &intent(&server, &p, "o-malformed", 100), vec![], false);
    malformed.transaction = None;
    let mut stale = intent(&server, &p, "o-stale", 100);
    stale.created_at_ms -= 121_000;
    let batch = vec![
        request(&p, &paid, vec![pin()], true),
        bad_signature,
        unknown,
        malformed.clone(),
        request(&p, &stale, vec![], false),
        request(
            &other,
            &intent(&server, &other, "o-other", 500),
            vec![sms()],
            true,
        ),
    ];
    let results = client.verify_payments(batch).await.unwrap();
    assert_eq!(results.len(), 6, "one result per payment, in order");

    let a = decided(&results[0]);
    assert_eq!(verdict(a), Verdict::Verified, "{}", a.reason);
    assert_eq!(a.tier, proto::Tier::A as i32);
    assert!(a.limit.as_ref().unwrap().reserved);
    assert_eq!(verdict(decided(&results[1])), Verdict::BadSignature);
    assert_eq!(verdict(decided(&results[2])), Verdict::UnknownCertificate);
    // A request VerifyPayment refuses with a gRPC error: the same code and message, for this
    // payment alone.
    let single = client.verify_payment(malformed).await.unwrap_err();
    match &results[3].result {
        Some(proto::verify_payment_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert_eq!(e.message, single.message());
            assert!(e.message.starts_with("transaction"), "{}", e.message);
        }
        other => panic!("expected the payment's error, got {other:?}"),
    }
    assert_eq!(verdict(decided(&results[4])), Verdict::StaleTimestamp);
    let c = decided(&results[5]);
    assert_eq!(verdict(c), Verdict::Verified);
    assert_eq!(c.tier, proto::Tier::C as i32);
    assert_eq!(c.limit.as_ref().unwrap().used_fen, 500);

    // The ledger counted kim's one reservation (the refused payments reserved nothing) and
    // lou's; each decision is its own evidence, refusals included.
    let limits = server.service().await.limits("kim").await.unwrap();
    assert_eq!(limits.tiers[0].tier, proto::Tier::A as i32);
    assert_eq!(limits.tiers[0].used_fen, 1234, "{limits:?}");
    let limits = server.service().await.limits("lou").await.unwrap();
    assert_eq!(limits.tiers[2].tier, proto::Tier::C as i32);
    assert_eq!(limits.tiers[2].used_fen, 500, "{limits:?}");
    let operator = server.operator().await;
    let decisions: Vec<_> = [0, 1, 2, 4, 5].map(|i| decided(&results[i]).clone()).into();
    let mut ids: Vec<_> = decisions.iter().map(|d| d.evidence_id.clone()).collect();
    for (d, expected) in decisions.iter().zip([
        "VERIFIED",
        "BAD_SIGNATURE",
        "UNKNOWN_CERTIFICATE",
        "STALE_TIMESTAMP",
        "VERIFIED",
    ]) {
        assert_eq!(
            operator.evidence(&d.evidence_id).await.unwrap().verdict,
            expected
        );
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "five distinct evidence records");
    assert_eq!(
        operator.evidence(&a.evidence_id).await.unwrap().intent,
        encode_intent(&paid)
    );

    // The batch claimed the paid intent's nonce: sent again, alone or in a batch, it is a
    // replay.
    assert_eq!(
        verdict(&verify(&server, request(&p, &paid, vec![pin()], true)).await),
        Verdict::ReplayedNonce
    );
    let again = client
        .verify_payments(vec![request(&p, &paid, vec![pin()], true)])
        .await
        .unwrap();
    assert_eq!(verdict(decided(&again[0])), Verdict::ReplayedNonce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_a_nonce_twice_in_one_batch_verifies_once() {
    let server = TestServer::start().await;
    let p = phone(&server, "max", "m-1").await;
    let i = intent(&server, &p, "o-twice", 100);
    let results = server
        .service()
        .await
        .verify_payments(vec![request(&p, &i, vec![], true); 4])
        .await
        .unwrap();
    let mut verdicts: Vec<_> = results.iter().map(|r| verdict(decided(r))).collect();
    verdicts.sort_by_key(|v| *v as i32);
    assert_eq!(
        verdicts,
        [
            Verdict::Verified,
            Verdict::ReplayedNonce,
            Verdict::ReplayedNonce,
            Verdict::ReplayedNonce
        ]
    );
    let reserved: i64 = results
        .iter()
        .map(|r| decided(r).limit.as_ref().unwrap())
        .filter(|l| l.reserved)
        .count() as i64;
    assert_eq!(reserved, 1, "only the verified payment reserved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_reservations_in_one_batch_never_overshoot() {
    let server = TestServer::start().await;
    let p = phone(&server, "ned", "n-1").await;
    // Tier C (certificate only): limit 100,000 fen; each payment is 20,000.
    let batch: Vec<_> = (0..12)
        .map(|n| {
            request(
                &p,
                &intent(&server, &p, &format!("o-{n}"), 20_000),
                vec![],
                true,
            )
        })
        .collect();
    let results = server.service().await.verify_payments(batch).await.unwrap();
    let limits: Vec<_> = results
        .iter()
        .map(|r| {
            let d = decided(r);
            assert_eq!(verdict(d), Verdict::Verified, "{}", d.reason);
            d.limit.clone().unwrap()
        })
        .collect();
    assert_eq!(limits.iter().filter(|l| l.reserved).count(), 5);
    assert!(limits.iter().all(|l| l.reserved || !l.fits));
    let q = server
        .service()
        .await
        .qualify_transaction(proto::QualifyTransactionRequest {
            reserve: false,
            ..qualify_request("ned", "q", 1, vec![], proto::Scene::InApp)
        })
        .await
        .unwrap();
    assert_eq!(q.limit.unwrap().used_fen, 5 * 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_an_empty_oversized_or_too_large_batch_is_refused_whole() {
    let server = TestServer::start().await;
    let p = phone(&server, "ola", "o-1").await;
    let client = server.service().await;

    let err = client.verify_payments(vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "payments: must hold 1 to 100 payments; this batch holds 0"
    );

    let batch: Vec<_> = (0..101)
        .map(|n| {
            request(
                &p,
                &intent(&server, &p, &format!("o-{n}"), 100),
                vec![],
                true,
            )
        })
        .collect();
    let err = client.verify_payments(batch.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().ends_with("this batch holds 101"),
        "{}",
        err.message()
    );

    // Over the server's message limit (64 KiB): refused before it is decoded.
    let mut big = request(&p, &intent(&server, &p, "o-big", 100), vec![], false);
    big.intent = vec![7; 4000];
    let err = client.verify_payments(vec![big; 20]).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Nothing of the refused batches was recorded: no nonce claimed, nothing reserved.
    let first = verify(&server, batch[0].clone()).await;
    assert_eq!(verdict(&first), Verdict::Verified, "{}", first.reason);
    assert_eq!(first.limit.unwrap().used_fen, 100);
    // The server keeps serving batches.
    let results = client
        .verify_payments(batch[1..100].to_vec())
        .await
        .unwrap();
    assert_eq!(results.len(), 99);
    assert!(results
        .iter()
        .all(|r| verdict(decided(r)) == Verdict::Verified));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_batches_beyond_the_admission_limit_are_all_decided() {
    // Room for one full batch at a time: three sent at once are all decided, so each batch
    // gives its permits back (one that kept them would hold the others until their deadline).
    let server = Arc::new(TestServer::start_with(|c| c.limits.max_batched_payments = 100).await);
    let p = Arc::new(phone(&server, "pia", "p-1").await);
    let mut calls = Vec::new();
    for round in 0..3 {
        let (server, p) = (server.clone(), p.clone());
        let batch: Vec<_> = (0..100)
            .map(|n| {
                request(
                    &p,
                    &intent(&server, &p, &format!("o-{round}-{n}"), 1),
                    vec![],
                    false,
                )
            })
            .collect();
        let client = server.service().await;
        calls.push(tokio::spawn(
            async move { client.verify_payments(batch).await },
        ));
    }
    for call in calls {
        let results = call.await.unwrap().unwrap();
        assert_eq!(results.len(), 100);
        assert!(results
            .iter()
            .all(|r| verdict(decided(r)) == Verdict::Verified));
    }
}
