//! End to end on PostgreSQL: the real server with `[store] backend = "postgres"` on a fresh
//! database of the test cluster (`scripts/test-postgres.sh`; skipped, and said so, without
//! one).

mod common;

use std::sync::Arc;

use common::*;
use payra::client::{encode_intent, random_nonce};
use payra::clock::Clock;
use payra::config::StoreConfig;
use payra::store::postgres::testing;
use payra::store::{PgStore, Store};
use payra::wire::proto;

/// A migrated database for `test`, or `None` (skipped) without a test cluster.
fn database(test: &str) -> Option<StoreConfig> {
    let config = testing::fresh_database(test)?;
    PgStore::migrate(&config).expect("migrate");
    Some(config)
}

async fn pay(
    server: &TestServer,
    key: &payra::client::DeviceKey,
    issued: &proto::EnrollResponse,
    customer: &str,
    device: &str,
) -> proto::VerifyPaymentResponse {
    let intent = proto::PaymentIntent {
        customer_id: customer.into(),
        device_id: device.into(),
        merchant_id: "m-coffee".into(),
        order_id: format!("o-{}", hex::encode(rand::random::<[u8; 4]>())),
        amount_fen: 1_500,
        currency: "CNY".into(),
        created_at_ms: server.clock.now_ms(),
        nonce: random_nonce(),
        scene: proto::Scene::InApp as i32,
    };
    let bytes = encode_intent(&intent);
    server
        .service()
        .await
        .verification()
        .verify_payment(proto::VerifyPaymentRequest {
            signature: key.sign_intent(&bytes),
            intent: bytes,
            certificate_serial: issued.serial.clone(),
            transaction: Some(proto::Transaction {
                merchant_id: intent.merchant_id.clone(),
                order_id: intent.order_id.clone(),
                amount_fen: intent.amount_fen,
                currency: intent.currency.clone(),
            }),
            factors: vec![proto::Factor {
                category: proto::FactorCategory::Knowledge as i32,
                method: "payment_pin".into(),
            }],
            reserve: true,
        })
        .await
        .expect("VerifyPayment answers")
        .into_inner()
}

#[tokio::test]
async fn ok_enroll_pay_revoke_and_restart_on_postgres() {
    let Some(store) = database("postgres::ok_enroll_pay_revoke_and_restart_on_postgres") else {
        return;
    };
    let store_config = store.clone();
    let mut server = TestServer::start_with(move |config| config.store = store_config).await;

    let (key, issued) = server.enroll("c-pg", "phone-1").await;
    let paid = pay(&server, &key, &issued, "c-pg", "phone-1").await;
    assert_eq!(
        paid.verdict,
        proto::Verdict::Verified as i32,
        "{}",
        paid.reason
    );
    let (_, second) = server.enroll("c-pg", "phone-2").await;
    server
        .revoke(&second.serial, proto::RevocationReason::KeyCompromise)
        .await;

    // A restart loads the certificates from PostgreSQL: the revocation holds, the first
    // device still pays.
    server.restart().await;
    let status = server.status(&second.serial).await;
    assert_eq!(status.status, proto::CertificateStatus::Revoked as i32);
    let paid = pay(&server, &key, &issued, "c-pg", "phone-1").await;
    assert_eq!(
        paid.verdict,
        proto::Verdict::Verified as i32,
        "{}",
        paid.reason
    );

    // OpenSSL reads the CRL built from PostgreSQL's list and finds the revoked serial.
    let (_, _, crl) = http_get(&server.http_url("/crl")).await;
    let crl_path = server.dir.path().join("pg.crl");
    std::fs::write(&crl_path, &crl).unwrap();
    let (ok, text) = openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        path_str(&crl_path),
        "-noout",
        "-text",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.to_uppercase().contains(&second.serial.to_uppercase()),
        "the CRL lists {}: {text}",
        second.serial
    );

    // The change chain in PostgreSQL is intact while the server runs, and records every change.
    let reader = PgStore::connect(&store).unwrap();
    let check = payra::store::verify_audit_log(&reader).unwrap();
    let head = reader.audit_head().unwrap();
    assert_eq!(
        check,
        payra::store::AuditCheck::Intact { entries: head.seq }
    );
    assert!(
        head.seq >= 5,
        "tokens, enrollments and the revocation: {head:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn fail_an_unmigrated_database_is_refused_with_the_command_to_run() {
    let Some(store) = testing::fresh_database("postgres::fail_an_unmigrated_database_is_refused")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    payra::ca::init_dev_pki(&dir.path().join("certs"), false).unwrap();
    let config = payra::config::Config {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        certs_dir: dir.path().join("certs"),
        data_dir: dir.path().join("data"),
        store: store.clone(),
        ..payra::config::Config::default()
    };
    let clock = Arc::new(payra::clock::ManualClock::at_system_time());
    let refused = payra::server::start(config.clone(), clock.clone()).await;
    let message = refused
        .err()
        .expect("an unmigrated database is refused")
        .to_string();
    assert!(message.contains("payra db migrate"), "{message}");
    assert!(message.contains("version 0"), "{message}");

    assert_eq!(
        PgStore::migrate(&store).unwrap(),
        (1..=payra::store::postgres::SCHEMA_VERSION).collect::<Vec<_>>()
    );
    assert_eq!(
        PgStore::migrate(&store).unwrap(),
        Vec::<u32>::new(),
        "idempotent"
    );
    let server = payra::server::start(config, clock)
        .await
        .expect("starts once migrated");
    server.shutdown().await.unwrap();
}

#[test]
fn fail_a_password_in_the_url_is_refused() {
    let config = payra::config::Config::from_toml(
        "[store]\nbackend = \"postgres\"\nurl = \"postgres://payra:secret@db:5432/payra\"\n",
    );
    let message = config.expect_err("refused").to_string();
    assert!(message.contains("store.url"), "{message}");
    assert!(message.contains("password"), "{message}");
    assert!(
        !message.contains("secret"),
        "the password is not echoed: {message}"
    );
}
