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

/// A server on a fresh migrated database of the test cluster, and the database's config;
/// `None` (the test is skipped, and says so) without a cluster.
async fn server_on_fresh_database(test: &str) -> Option<(StoreConfig, TestServer)> {
    let store = database(test)?;
    let store_config = store.clone();
    let server = TestServer::start_with(move |config| config.store = store_config).await;
    Some((store, server))
}

async fn pay(
    server: &TestServer,
    key: &payra::client::DeviceKey,
    issued: &proto::EnrollResponse,
    customer: &str,
    device: &str,
) -> proto::VerifyPaymentResponse {
    server
        .service()
        .await
        .verify_payment(payment(server, key, issued, customer, device))
        .await
        .expect("VerifyPayment answers")
}

/// A reserving VerifyPayment of 15 CNY with a fresh intent, signed by `key`.
fn payment(
    server: &TestServer,
    key: &payra::client::DeviceKey,
    issued: &proto::EnrollResponse,
    customer: &str,
    device: &str,
) -> proto::VerifyPaymentRequest {
    let order = format!("o-{}", hex::encode(rand::random::<[u8; 4]>()));
    let intent = payment_intent(customer, device, &order, 1_500, server.clock.now_ms());
    let pin = proto::Factor {
        category: proto::FactorCategory::Knowledge as i32,
        method: "payment_pin".into(),
    };
    signed_payment(key, &issued.serial, &intent, vec![pin], true)
}

#[tokio::test]
async fn ok_enroll_pay_revoke_and_restart_on_postgres() {
    let Some((store, mut server)) =
        server_on_fresh_database("postgres::ok_enroll_pay_revoke_and_restart_on_postgres").await
    else {
        return;
    };

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

/// A PostgreSQL cluster of one test's own, which it may stop and start
/// (`scripts/test-postgres.sh` in a temporary directory); removed when dropped.
struct OwnCluster {
    dir: tempfile::TempDir,
    url: String,
    password: String,
}

impl OwnCluster {
    fn script(dir: &std::path::Path, command: &str) -> std::process::Output {
        let output = std::process::Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/test-postgres.sh"
            ))
            .arg(command)
            .env("PAYRA_TEST_POSTGRES_DIR", dir.join("cluster"))
            .output()
            .expect("run scripts/test-postgres.sh");
        assert!(
            output.status.success(),
            "test-postgres.sh {command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Starts one, or returns `None` (skipped) where the PostgreSQL tests do not run.
    fn start(test: &str) -> Option<OwnCluster> {
        testing::cluster_url(test)?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let output = OwnCluster::script(dir.path(), "start");
        let exports = String::from_utf8(output.stdout).unwrap();
        let value = |name: &str| {
            exports
                .lines()
                .find_map(|line| line.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("{name} in {exports}"))
                .to_string()
        };
        Some(OwnCluster {
            url: value(testing::URL_VARIABLE),
            password: value(testing::PASSWORD_VARIABLE),
            dir,
        })
    }

    /// A fresh, migrated database whose password comes from a file.
    fn database(&self, test: &str) -> StoreConfig {
        let password_file = self.dir.path().join("db-password");
        std::fs::write(&password_file, &self.password).unwrap();
        std::fs::set_permissions(
            &password_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let config = StoreConfig {
            backend: payra::config::Backend::Postgres,
            url: Some(testing::create_database(
                &self.url,
                Some(&self.password),
                test,
            )),
            password_file: Some(password_file),
            password_env: "PAYRA_TEST_UNSET_PASSWORD".into(),
            pool_size: 4,
            ..StoreConfig::default()
        };
        PgStore::migrate(&config).expect("migrate");
        config
    }

    fn halt(&self) {
        OwnCluster::script(self.dir.path(), "halt");
    }

    fn resume(&self) {
        OwnCluster::script(self.dir.path(), "resume");
    }

    /// Adds a synchronous streaming standby; returns its port.
    fn standby(&self) -> u16 {
        let output = OwnCluster::script(self.dir.path(), "standby");
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .find_map(|line| line.strip_prefix("export PAYRA_TEST_POSTGRES_STANDBY_PORT="))
            .and_then(|port| port.parse().ok())
            .expect("the standby's port")
    }

    /// Crashes the primary and promotes the standby.
    fn failover(&self) {
        OwnCluster::script(self.dir.path(), "failover");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/test-postgres.sh"
            ))
            .arg("stop")
            .env("PAYRA_TEST_POSTGRES_DIR", self.dir.path().join("cluster"))
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_a_stopped_database_gives_unavailable_and_payra_recovers_on_its_own() {
    let name = "postgres::fail_a_stopped_database_gives_unavailable";
    let Some(cluster) = OwnCluster::start(name) else {
        return;
    };
    let store = cluster.database(name);
    let server = TestServer::start_with(move |config| config.store = store).await;
    let (key, issued) = server.enroll("c-down", "phone").await;
    let paid = pay(&server, &key, &issued, "c-down", "phone").await;
    assert_eq!(
        paid.verdict,
        proto::Verdict::Verified as i32,
        "{}",
        paid.reason
    );

    cluster.halt();
    let service = server.service().await;
    let refused = service.create_enrollment_token("c-down", 0).await;
    assert_eq!(
        refused.expect_err("no token without a database").code(),
        tonic::Code::Unavailable
    );
    let intent = proto::PaymentIntent {
        customer_id: "c-down".into(),
        device_id: "phone".into(),
        merchant_id: "m".into(),
        order_id: "o-down".into(),
        amount_fen: 100,
        currency: "CNY".into(),
        created_at_ms: server.clock.now_ms(),
        nonce: random_nonce(),
        scene: proto::Scene::InApp as i32,
    };
    let bytes = encode_intent(&intent);
    let request = proto::VerifyPaymentRequest {
        signature: key.sign_intent(&bytes),
        intent: bytes,
        certificate_serial: issued.serial.clone(),
        transaction: Some(proto::Transaction {
            merchant_id: "m".into(),
            order_id: "o-down".into(),
            amount_fen: 100,
            currency: "CNY".into(),
        }),
        factors: vec![],
        reserve: true,
    };
    let refused = service
        .verify_payment(request.clone())
        .await
        .expect_err("no verification without a database");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let (code, _, body) = http_get(&server.http_url("/readyz")).await;
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("database is unavailable"), "{body}");

    // Back again: the same request is answered without a restart (its nonce was never
    // claimed: the failed transaction wrote nothing).
    cluster.resume();
    let started = std::time::Instant::now();
    let answer = verify_when_back(&server, &request).await;
    assert_eq!(
        answer.verdict,
        proto::Verdict::Verified as i32,
        "{}",
        answer.reason
    );
    let (code, _, _) = http_get(&server.http_url("/readyz")).await;
    assert_eq!(code, 200);
    eprintln!(
        "recovered {:?} after the database came back",
        started.elapsed()
    );
    let reader = PgStore::connect(&server.config.store).unwrap();
    assert_eq!(
        reader.verify_decision_chains().unwrap(),
        Ok(2),
        "both decisions, chained"
    );
}

#[tokio::test]
async fn fail_a_changed_row_breaks_the_chains_and_audit_verify_names_it() {
    let Some((store, mut server)) =
        server_on_fresh_database("postgres::fail_a_changed_row_breaks_the_chains").await
    else {
        return;
    };
    let (key, issued) = server.enroll("c-tamper", "phone").await;
    for _ in 0..3 {
        let paid = pay(&server, &key, &issued, "c-tamper", "phone").await;
        assert_eq!(
            paid.verdict,
            proto::Verdict::Verified as i32,
            "{}",
            paid.reason
        );
    }
    let verify = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_payra"))
            .args([
                "audit",
                "verify",
                "--store-url",
                store.url.as_deref().unwrap(),
            ])
            .env(
                "PAYRA_DB_PASSWORD",
                std::env::var(testing::PASSWORD_VARIABLE).unwrap_or_default(),
            )
            .output()
            .unwrap()
    };
    let intact = verify();
    assert!(intact.status.success(), "{intact:?}");

    // Someone with write access lowers an amount in a recorded decision.
    let sql = "UPDATE decisions SET record = replace(record, '\"amount_fen\":1500', \
               '\"amount_fen\":15') WHERE seq = 2";
    psql(&store, sql);
    let broken = verify();
    let text = String::from_utf8_lossy(&broken.stderr);
    assert!(!broken.status.success());
    assert!(
        text.contains("decision 2 does not match its hash"),
        "{text}"
    );

    // Put back, the decision chains hold again; then an entry of the change chain is changed.
    psql(
        &store,
        "UPDATE decisions SET record = replace(record, '\"amount_fen\":15,', \
         '\"amount_fen\":1500,') WHERE seq = 2",
    );
    assert!(verify().status.success(), "restored");
    psql(
        &store,
        "UPDATE audit SET entry = jsonb_set(entry, '{body,event,outcome}', '\"forged\"') \
         WHERE seq = 1",
    );
    let broken = verify();
    let text = String::from_utf8_lossy(&broken.stderr);
    assert!(!broken.status.success());
    assert!(text.contains("change chain is broken"), "{text}");
    server.stop().await;
}

/// Runs `sql` on the database of `store`.
fn psql(store: &StoreConfig, sql: &str) {
    testing::on_database(store, &[sql.to_string()]);
}

/// Retries `request` while payra answers `UNAVAILABLE` (the database is switching), for up
/// to 30 s; returns the first answer.
async fn verify_when_back(
    server: &TestServer,
    request: &proto::VerifyPaymentRequest,
) -> proto::VerifyPaymentResponse {
    let service = server.service().await;
    let started = std::time::Instant::now();
    loop {
        match service.verify_payment(request.clone()).await {
            Ok(answer) => return answer,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(30),
                    "payra did not recover within 30 s: {status:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_the_primary_fails_over_to_a_synchronous_standby_and_nothing_acknowledged_is_lost() {
    let name = "postgres::fail_failover_to_a_standby";
    let Some(cluster) = OwnCluster::start(name) else {
        return;
    };
    let mut store = cluster.database(name);
    let standby_port = cluster.standby();
    // Both hosts in the URL, the writable one chosen (libpq's multi-host form): what a
    // deployment without a stable leader address (Patroni's HAProxy, a DNS name) writes.
    let url = store.url.clone().unwrap();
    let (head, database) = url.rsplit_once('/').unwrap();
    store.url = Some(format!(
        "{head},127.0.0.1:{standby_port}/{database}?target_session_attrs=read-write"
    ));
    let store_config = store.clone();
    let mut server = TestServer::start_with(move |config| config.store = store_config).await;

    let (key, issued) = server.enroll("c-fo", "phone").await;
    let (_, second) = server.enroll("c-fo", "tablet").await;
    // Twenty reservations at once, each acknowledged, and one revocation.
    let first = payment(&server, &key, &issued, "c-fo", "phone");
    let mut requests = vec![first.clone()];
    for _ in 1..20 {
        requests.push(payment(&server, &key, &issued, "c-fo", "phone"));
    }
    let service = server.service().await;
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let service = service.clone();
            tokio::spawn(async move {
                service
                    .verify_payment(request)
                    .await
                    .expect("VerifyPayment answers")
            })
        })
        .collect();
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(
            answer.verdict,
            proto::Verdict::Verified as i32,
            "{}",
            answer.reason
        );
        assert!(answer.limit.as_ref().unwrap().reserved);
    }
    server
        .revoke(&second.serial, proto::RevocationReason::KeyCompromise)
        .await;

    cluster.failover();

    // The first intent again, on the promoted standby: its nonce's claim survived.
    let replayed = verify_when_back(&server, &first).await;
    assert_eq!(
        replayed.verdict,
        proto::Verdict::ReplayedNonce as i32,
        "{}",
        replayed.reason
    );
    // A new payment counts all twenty reservations before it.
    let next = verify_when_back(&server, &payment(&server, &key, &issued, "c-fo", "phone")).await;
    assert_eq!(
        next.verdict,
        proto::Verdict::Verified as i32,
        "{}",
        next.reason
    );
    assert_eq!(next.limit.as_ref().unwrap().used_fen, 21 * 1_500);

    // A restart loads everything from the new primary: the revocation holds there.
    server.restart().await;
    let status = server.status(&second.serial).await;
    assert_eq!(status.status, proto::CertificateStatus::Revoked as i32);
    let reader = PgStore::connect(&store).unwrap();
    assert_eq!(
        reader.verify_decision_chains().unwrap(),
        Ok(22),
        "twenty decisions, the replay and the last one, chained"
    );
    server.stop().await;
}

/// VerifyPayments on PostgreSQL: the payments of one batch reach the decision writer together
/// and may share one transaction. A nonce sent four times verifies once; reservations of the
/// batch stop at the tier's ceiling; every decision is chained, and a restart keeps the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_a_batch_on_postgres_claims_each_nonce_once_and_never_overshoots() {
    let Some((store, mut server)) = server_on_fresh_database(
        "postgres::ok_a_batch_on_postgres_claims_each_nonce_once_and_never_overshoots",
    )
    .await
    else {
        return;
    };
    let (key, issued) = server.enroll("c-batch", "phone").await;
    let intent_of = |order: &str, amount_fen| {
        payment_intent("c-batch", "phone", order, amount_fen, server.clock.now_ms())
    };
    let twice = signed_payment(
        &key,
        &issued.serial,
        &intent_of("o-twice", 100),
        vec![],
        true,
    );
    // Tier C (the certificate alone): 100,000 fen a day; 100 fen, then twelve of 20,000.
    let mut batch = vec![twice.clone(); 4];
    for n in 0..12 {
        batch.push(signed_payment(
            &key,
            &issued.serial,
            &intent_of(&format!("o-{n}"), 20_000),
            vec![],
            true,
        ));
    }
    let results = server
        .service()
        .await
        .verify_payments(batch)
        .await
        .expect("VerifyPayments answers");
    let decisions: Vec<_> = results
        .iter()
        .map(|r| match &r.result {
            Some(proto::verify_payment_result::Result::Decision(d)) => d.clone(),
            other => panic!("expected a decision, got {other:?}"),
        })
        .collect();
    let verified = |d: &&proto::VerifyPaymentResponse| d.verdict == proto::Verdict::Verified as i32;
    assert_eq!(
        decisions[..4].iter().filter(verified).count(),
        1,
        "{decisions:?}"
    );
    assert!(decisions[..4]
        .iter()
        .all(|d| verified(&d) || d.verdict == proto::Verdict::ReplayedNonce as i32));
    assert!(decisions[4..].iter().all(|d| verified(&d)), "{decisions:?}");
    let reserved = decisions
        .iter()
        .filter(|d| d.limit.as_ref().is_some_and(|l| l.reserved))
        .count();
    // The 100 fen fit with four of the 20,000 (80,100); a fifth would pass 100,000.
    assert_eq!(reserved, 1 + 4, "{decisions:?}");

    server.restart().await;
    let again = server
        .service()
        .await
        .verify_payment(twice)
        .await
        .expect("VerifyPayment answers");
    assert_eq!(again.verdict, proto::Verdict::ReplayedNonce as i32);
    let reader = PgStore::connect(&store).unwrap();
    assert_eq!(reader.verify_decision_chains().unwrap(), Ok(17));
    server.stop().await;
}
