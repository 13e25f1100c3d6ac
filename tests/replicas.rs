//! Three `payra serve` processes on one PostgreSQL database, behind no load balancer: the
//! tests spread requests over them by hand. Each guarantee of the shared store is checked
//! across processes: one token enrolls once, one signed intent verifies once, reservations
//! never pass a daily limit, a revocation acknowledged by one replica is honoured by the next
//! verification on every other. Skipped, and said so, without a test cluster
//! (`scripts/test-postgres.sh`).

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use payra::client::{Client, Credential, DeviceKey};
use payra::store::postgres::testing;
use payra::store::PgStore;
use payra::wire::proto;
use proto::Verdict;

/// Three replicas sharing one PKI and one fresh, migrated database.
struct Replicas {
    dir: tempfile::TempDir,
    url: String,
    certs: std::path::PathBuf,
    replicas: Vec<ServeProcess>,
}

impl Replicas {
    /// Starts three replicas, or returns `None` (skipped) without a test cluster.
    fn start(test: &str) -> Option<Replicas> {
        let store = testing::fresh_database(test)?;
        PgStore::migrate(&store).expect("migrate");
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        payra::ca::init_dev_pki(&certs, false).unwrap();
        let url = store.url.clone().unwrap();
        let replicas = (0..3)
            .map(|i| spawn(&certs, &dir.path().join(format!("data-{i}")), &url))
            .collect();
        Some(Replicas {
            dir,
            url,
            certs,
            replicas,
        })
    }

    async fn client(&self, replica: usize, credential: Credential) -> Client {
        Client::connect(
            &self.replicas[replica].url,
            &self.certs.join("root.pem"),
            &credential,
        )
        .await
        .expect("client connects")
    }

    async fn service(&self, replica: usize) -> Client {
        self.client(replica, Credential::role(&self.certs, "service"))
            .await
    }

    async fn operator(&self, replica: usize) -> Client {
        self.client(replica, Credential::role(&self.certs, "operator"))
            .await
    }

    /// Enrolls a fresh key for `customer`/`device` through `replica`.
    async fn enroll(
        &self,
        replica: usize,
        customer: &str,
        device: &str,
    ) -> (DeviceKey, proto::EnrollResponse) {
        let token = self
            .service(replica)
            .await
            .create_enrollment_token(customer, 0)
            .await
            .unwrap()
            .token;
        let key = DeviceKey::generate();
        let issued = self
            .client(replica, Credential::None)
            .await
            .enroll(&token, key.csr_der(device).unwrap(), device, device_info())
            .await
            .expect("enroll");
        (key, issued)
    }
}

/// Starts `payra serve` on the database at `url` and waits for the line naming its ports.
fn spawn(certs: &std::path::Path, data: &std::path::Path, url: &str) -> ServeProcess {
    spawn_serve(
        certs,
        data,
        &["--store-url", url],
        &[(
            "PAYRA_DB_PASSWORD",
            std::env::var(testing::PASSWORD_VARIABLE).unwrap_or_default(),
        )],
    )
}

/// Where `customer` stands today against `tier`'s ceilings, as `operator`'s replica says.
async fn tier_limit(operator: &Client, customer: &str, tier: proto::Tier) -> proto::LimitStatus {
    operator
        .admin()
        .get_limits(proto::GetLimitsRequest {
            customer_id: customer.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tiers
        .into_iter()
        .find(|t| t.tier == tier as i32)
        .unwrap()
}

/// Revokes `serial` through `replica` as the operator.
async fn revoke(cluster: &Replicas, replica: usize, serial: &str, reason: proto::RevocationReason) {
    cluster
        .operator(replica)
        .await
        .admin()
        .revoke_certificate(proto::RevokeCertificateRequest {
            serial: serial.into(),
            reason: reason as i32,
        })
        .await
        .unwrap();
}

fn intent(customer: &str, device: &str, order: &str, amount_fen: i64) -> proto::PaymentIntent {
    payment_intent(customer, device, order, amount_fen, now_ms())
}

fn request(
    key: &DeviceKey,
    serial: &str,
    intent: &proto::PaymentIntent,
    reserve: bool,
) -> proto::VerifyPaymentRequest {
    signed_payment(key, serial, intent, vec![], reserve)
}

async fn verify(
    client: &Client,
    request: proto::VerifyPaymentRequest,
) -> proto::VerifyPaymentResponse {
    client
        .verify_payment(request)
        .await
        .expect("VerifyPayment answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_enrolls_once_across_replicas() {
    let Some(cluster) = Replicas::start("replicas::one_token_enrolls_once") else {
        return;
    };
    let token = cluster
        .service(0)
        .await
        .create_enrollment_token("c-token", 0)
        .await
        .unwrap()
        .token;
    let mut tasks = Vec::new();
    for attempt in 0..9 {
        let client = cluster.client(attempt % 3, Credential::None).await;
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let key = DeviceKey::generate();
            let device = format!("phone-{attempt}");
            client
                .enroll(
                    &token,
                    key.csr_der(&device).unwrap(),
                    &device,
                    device_info(),
                )
                .await
        }));
    }
    let mut issued = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => issued.push(response.serial),
            Err(status) => assert_eq!(
                status.code(),
                tonic::Code::FailedPrecondition,
                "a used token is refused: {status:?}"
            ),
        }
    }
    assert_eq!(issued.len(), 1, "exactly one certificate: {issued:?}");
    // Every replica knows the one certificate.
    for replica in 0..3 {
        let listed = cluster
            .operator(replica)
            .await
            .list_certificates(proto::ListCertificatesRequest {
                customer_id: "c-token".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.certificates.len(), 1);
        assert_eq!(listed.certificates[0].serial, issued[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_intent_verifies_once_across_replicas() {
    let Some(cluster) = Replicas::start("replicas::one_intent_verifies_once") else {
        return;
    };
    let (key, issued) = cluster.enroll(0, "c-replay", "phone").await;
    let signed = request(
        &key,
        &issued.serial,
        &intent("c-replay", "phone", "o-1", 500),
        false,
    );
    let mut tasks = Vec::new();
    for attempt in 0..12 {
        let client = cluster.service(attempt % 3).await;
        let signed = signed.clone();
        tasks.push(tokio::spawn(async move { verify(&client, signed).await }));
    }
    let mut verdicts = Vec::new();
    for task in tasks {
        verdicts.push(Verdict::try_from(task.await.unwrap().verdict).unwrap());
    }
    let verified = verdicts.iter().filter(|v| **v == Verdict::Verified).count();
    assert_eq!(verified, 1, "{verdicts:?}");
    assert!(
        verdicts
            .iter()
            .all(|v| *v == Verdict::Verified || *v == Verdict::ReplayedNonce),
        "{verdicts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_across_replicas_never_pass_the_daily_limit() {
    let Some(cluster) = Replicas::start("replicas::reservations_never_pass") else {
        return;
    };
    let (key, issued) = cluster.enroll(0, "c-limit", "phone").await;
    let key = Arc::new(key);
    // Tier C (certificate only): 100,000 fen a day; 30 payments of 20,000 over 3 replicas.
    let mut tasks = Vec::new();
    for n in 0..30 {
        let client = cluster.service(n % 3).await;
        let (key, serial) = (key.clone(), issued.serial.clone());
        tasks.push(tokio::spawn(async move {
            let i = intent("c-limit", "phone", &format!("o-{n}"), 20_000);
            verify(&client, request(&key, &serial, &i, true)).await
        }));
    }
    let mut reserved = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(
            answer.verdict,
            Verdict::Verified as i32,
            "{}",
            answer.reason
        );
        let limit = answer.limit.unwrap();
        if limit.reserved {
            reserved += 1;
        } else {
            assert!(!limit.fits, "refused only when it does not fit");
        }
    }
    assert_eq!(reserved, 5, "exactly the limit");
    // Every replica sees the same ledger.
    for replica in 0..3 {
        let c = tier_limit(&cluster.operator(replica).await, "c-limit", proto::Tier::C).await;
        assert_eq!(c.used_fen, 100_000, "replica {replica}");
    }
    // The chains in the database check out while the three replicas run.
    let output = Command::new(env!("CARGO_BIN_EXE_payra"))
        .args(["audit", "verify", "--store-url", &cluster.url])
        .env(
            "PAYRA_DB_PASSWORD",
            std::env::var(testing::PASSWORD_VARIABLE).unwrap_or_default(),
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("decision chains: 30 decisions intact"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_honoured_by_the_next_verification_on_every_replica() {
    let Some(cluster) = Replicas::start("replicas::a_revocation_is_honoured") else {
        return;
    };
    let (key, issued) = cluster.enroll(0, "c-revoke", "phone").await;
    // Every replica has verified with the certificate: it is in each one's memory.
    for replica in 0..3 {
        let i = intent("c-revoke", "phone", &format!("warm-{replica}"), 100);
        let answer = verify(
            &cluster.service(replica).await,
            request(&key, &issued.serial, &i, false),
        )
        .await;
        assert_eq!(
            answer.verdict,
            Verdict::Verified as i32,
            "{}",
            answer.reason
        );
    }
    revoke(
        &cluster,
        0,
        &issued.serial,
        proto::RevocationReason::KeyCompromise,
    )
    .await;
    for replica in 0..3 {
        let i = intent("c-revoke", "phone", &format!("after-{replica}"), 100);
        let answer = verify(
            &cluster.service(replica).await,
            request(&key, &issued.serial, &i, true),
        )
        .await;
        assert_eq!(
            answer.verdict,
            Verdict::CertificateRevoked as i32,
            "replica {replica}: {}",
            answer.reason
        );
        assert!(
            !answer.limit.is_some_and(|l| l.reserved),
            "a revoked certificate reserves nothing"
        );
    }
}

/// Polls `check` until it holds, for at most 5 s; returns how long it took. What it waits for
/// is a notification between processes: the delay this test measures.
async fn converge<F, Fut>(what: &str, mut check: F) -> std::time::Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{what} did not happen within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn crl_of(der: &[u8]) -> (u64, Vec<String>) {
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der).unwrap();
    let number = crl.crl_number().expect("CRL number");
    let serials = crl
        .iter_revoked_certificates()
        .map(|entry| hex::encode(entry.raw_serial()))
        .collect();
    (
        number.to_u64_digits().first().copied().unwrap_or(0),
        serials,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_ocsp_and_crl_agree_across_replicas_after_a_change() {
    let Some(cluster) = Replicas::start("replicas::status_ocsp_and_crl_agree") else {
        return;
    };
    let (key, issued) = cluster.enroll(0, "c-agree", "phone").await;
    let device_dir = write_device_dir(&cluster.dir.path().join("phone"), &key, &issued);
    let leaf = device_dir.join("leaf.pem");
    let status = |replica: usize| {
        let serial = issued.serial.clone();
        let client = cluster.service(replica);
        async move {
            client
                .await
                .verification()
                .get_certificate_status(proto::GetCertificateStatusRequest { serial })
                .await
                .unwrap()
                .into_inner()
                .status
        }
    };
    // Replicas 1 and 2 never saw the enrollment: they read the certificate from the database.
    for replica in 0..3 {
        assert_eq!(
            status(replica).await,
            proto::CertificateStatus::Valid as i32
        );
    }
    let mut numbers_before = Vec::new();
    for replica in &cluster.replicas {
        let (code, _, der) = http_get(&format!("{}/crl", replica.http)).await;
        assert_eq!(code, 200);
        numbers_before.push(crl_of(&der).0);
    }
    revoke(
        &cluster,
        0,
        &issued.serial,
        proto::RevocationReason::KeyCompromise,
    )
    .await;
    for replica in 1..3 {
        let lag = converge("the status change", || async {
            status(replica).await == proto::CertificateStatus::Revoked as i32
        })
        .await;
        eprintln!("replica {replica}: status revoked {lag:?} after the revocation's answer");
    }
    let mut numbers_after = Vec::new();
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let url = format!("{}/crl", replica.http);
        let lag = converge("the CRL change", || {
            let url = url.clone();
            let serial = issued.serial.to_lowercase();
            async move {
                let (_, _, der) = http_get(&url).await;
                crl_of(&der).1.contains(&serial)
            }
        })
        .await;
        eprintln!("replica {i}: CRL lists the serial {lag:?} after the revocation's answer");
        let (_, _, der) = http_get(&url).await;
        numbers_after.push(crl_of(&der).0);
        let (ok, text) = openssl(&[
            "ocsp",
            "-issuer",
            path_str(&cluster.certs.join("issuing.pem")),
            "-cert",
            path_str(&leaf),
            "-url",
            &format!("{}/ocsp", replica.http),
            "-CAfile",
            path_str(&cluster.certs.join("root.pem")),
        ]);
        assert!(ok, "{text}");
        assert!(text.contains(": revoked"), "replica {i}: {text}");
    }
    // CRL numbers come from one counter in the database: no two CRLs share one, and every
    // CRL made after the change is numbered above every CRL made before it.
    let mut all = numbers_before.clone();
    all.extend(&numbers_after);
    let mut distinct = all.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), all.len(), "CRL numbers repeat: {all:?}");
    assert!(
        numbers_after.iter().min() > numbers_before.iter().max(),
        "{numbers_before:?} then {numbers_after:?}"
    );
}

#[derive(Default)]
struct Acked {
    certificates: Vec<(String, String)>, // (serial, token)
    revocations: Vec<String>,
    reservations: Vec<String>, // evidence ids of 1-fen reservations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_replica_loses_nothing_and_the_others_keep_serving() {
    let Some(mut cluster) = Replicas::start("replicas::sigkill_of_one_replica") else {
        return;
    };
    let (payer_key, payer) = cluster.enroll(1, "payer", "payer-phone").await;
    let payer_key = Arc::new(payer_key);
    let acked = Arc::new(std::sync::Mutex::new(Acked::default()));
    let progress = Arc::new(tokio::sync::Notify::new());
    let mut workers = Vec::new();
    // Nine workers, three per replica: enroll, enroll and revoke, pay with a reservation.
    for worker in 0..9usize {
        let replica = worker % 3;
        let service = cluster.service(replica).await;
        let operator = cluster.operator(replica).await;
        let phone = cluster.client(replica, Credential::None).await;
        let (acked, progress) = (acked.clone(), progress.clone());
        let (payer_key, payer_serial) = (payer_key.clone(), payer.serial.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = 0;
            for i in 0..40 {
                let done: Result<(), tonic::Status> = async {
                    match worker / 3 {
                        0 | 1 => {
                            let token = service
                                .create_enrollment_token(&format!("c{worker}"), 0)
                                .await?
                                .token;
                            let device = format!("d{worker}-{i}");
                            let key = DeviceKey::generate();
                            let issued = phone
                                .enroll(
                                    &token,
                                    key.csr_der(&device).unwrap(),
                                    &device,
                                    device_info(),
                                )
                                .await?;
                            acked
                                .lock()
                                .unwrap()
                                .certificates
                                .push((issued.serial.clone(), token));
                            if worker / 3 == 1 {
                                operator
                                    .revoke_certificate(
                                        &issued.serial,
                                        proto::RevocationReason::KeyCompromise,
                                    )
                                    .await?;
                                acked.lock().unwrap().revocations.push(issued.serial);
                            }
                        }
                        _ => {
                            let i = intent("payer", "payer-phone", &format!("o{worker}-{i}"), 1);
                            let answer = service
                                .verify_payment(request(&payer_key, &payer_serial, &i, true))
                                .await?;
                            assert!(answer.limit.as_ref().unwrap().reserved, "{}", answer.reason);
                            acked.lock().unwrap().reservations.push(answer.evidence_id);
                        }
                    }
                    Ok(())
                }
                .await;
                progress.notify_one();
                if let Err(status) = done {
                    assert_eq!(replica, 0, "replica {replica} failed: {status:?}");
                    failures += 1;
                    if failures > 3 {
                        return;
                    }
                }
            }
        }));
    }
    loop {
        let enough = {
            let a = acked.lock().unwrap();
            a.certificates.len() >= 30 && a.revocations.len() >= 10 && a.reservations.len() >= 20
        };
        if enough {
            break;
        }
        progress.notified().await;
    }
    cluster.replicas[0].child.kill().expect("SIGKILL");
    cluster.replicas[0].child.wait().unwrap();
    for worker in workers {
        worker.await.expect("the replicas that live keep serving");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    // Everything any replica acknowledged, the dead one included, is there on the others.
    let operator = cluster.operator(2).await;
    let phone = cluster.client(1, Credential::None).await;
    let service = cluster.service(2).await;
    let mut serials = std::collections::HashSet::new();
    for (serial, token) in &acked.certificates {
        assert!(
            serials.insert(serial.clone()),
            "serial {serial} issued twice"
        );
        operator
            .certificate(serial)
            .await
            .unwrap_or_else(|status| panic!("certificate {serial} lost: {status:?}"));
        let reuse = phone
            .enroll(
                token,
                DeviceKey::generate().csr_der("x").unwrap(),
                "reuse",
                device_info(),
            )
            .await
            .expect_err("a used token works twice");
        assert_eq!(reuse.code(), tonic::Code::FailedPrecondition);
    }
    for serial in &acked.revocations {
        let status = service.certificate_status(serial).await.unwrap();
        assert_eq!(
            status.status,
            proto::CertificateStatus::Revoked as i32,
            "{serial}"
        );
    }
    for evidence_id in &acked.reservations {
        let evidence = operator
            .evidence(evidence_id)
            .await
            .unwrap_or_else(|status| panic!("evidence {evidence_id} lost: {status:?}"));
        assert_eq!(evidence.reserved_fen, 1);
    }
    let c = tier_limit(&operator, "payer", proto::Tier::C).await;
    assert!(
        c.used_fen >= acked.reservations.len() as i64,
        "the ledger holds every acknowledged reservation: {} < {}",
        c.used_fen,
        acked.reservations.len()
    );
    eprintln!(
        "acknowledged: {} certificates, {} revocations, {} reservations; none lost",
        acked.certificates.len(),
        acked.revocations.len(),
        acked.reservations.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_is_certified_for_one_device_across_replicas() {
    let Some(cluster) = Replicas::start("replicas::one_key_one_device") else {
        return;
    };
    let enroll_key = |replica: usize, key: Arc<DeviceKey>, customer: &str, device: &str| {
        let (customer, device) = (customer.to_string(), device.to_string());
        let service = cluster.service(replica);
        let phone = cluster.client(replica, Credential::None);
        async move {
            let token = service
                .await
                .create_enrollment_token(&customer, 0)
                .await
                .unwrap()
                .token;
            phone
                .await
                .enroll(
                    &token,
                    key.csr_der(&device).unwrap(),
                    &device,
                    device_info(),
                )
                .await
        }
    };
    // Certified on one replica, refused for someone else on another.
    let key = Arc::new(DeviceKey::generate());
    let first = enroll_key(0, key.clone(), "c-key-1", "phone")
        .await
        .unwrap();
    let refused = enroll_key(1, key.clone(), "c-key-2", "phone")
        .await
        .expect_err("another customer may not certify the key");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");

    // The same fresh key enrolled for two customers at once, on two replicas: one wins.
    for round in 0..5 {
        let key = Arc::new(DeviceKey::generate());
        let (a, b) = tokio::join!(
            enroll_key(1, key.clone(), &format!("c-race-a{round}"), "phone"),
            enroll_key(2, key.clone(), &format!("c-race-b{round}"), "phone"),
        );
        let wins = [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count();
        assert_eq!(wins, 1, "round {round}: {a:?} / {b:?}");
    }

    // The same device enrolls the key again on another replica (allowed: same device).
    let second = enroll_key(1, key.clone(), "c-key-1", "phone")
        .await
        .unwrap();
    // A compromise reported on a third replica, which issued neither, revokes both and
    // closes the key on every replica.
    revoke(
        &cluster,
        2,
        &first.serial,
        proto::RevocationReason::KeyCompromise,
    )
    .await;
    let other = cluster
        .operator(0)
        .await
        .certificate(&second.serial)
        .await
        .unwrap();
    assert_eq!(
        other.status,
        proto::CertificateStatus::Revoked as i32,
        "every certificate of a compromised key is revoked"
    );
    let refused = enroll_key(1, key.clone(), "c-key-1", "phone")
        .await
        .expect_err("a compromised key is not certified again");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists);
    assert!(refused.message().contains("compromised"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agreed_limit_set_on_one_replica_applies_on_every_other() {
    let Some(cluster) = Replicas::start("replicas::an_agreed_limit_applies") else {
        return;
    };
    cluster
        .operator(0)
        .await
        .admin()
        .set_agreed_limit(proto::SetAgreedLimitRequest {
            customer_id: "c-agreed".into(),
            daily_limit_fen: 1_234_500,
        })
        .await
        .unwrap();
    for replica in 1..3 {
        let operator = cluster.operator(replica).await;
        let lag = converge("the agreed limit", || {
            let operator = operator.clone();
            async move {
                let limits = operator.limits("c-agreed").await.unwrap();
                limits.has_agreement
                    && limits
                        .tiers
                        .iter()
                        .find(|t| t.tier == proto::Tier::A as i32)
                        .is_some_and(|a| a.limit_fen == 1_234_500)
            }
        })
        .await;
        eprintln!("replica {replica}: the agreed limit applies {lag:?} after it was set");
    }
}
