//! Crash safety: the real `payra` binary is killed with SIGKILL in the middle of concurrent
//! enrollments, revocations and reservations, then restarted on the same data. Nothing that
//! was acknowledged may be lost, no serial may repeat, no token may work twice, and the audit
//! chain must verify.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;
use payra::client::{encode_intent, random_nonce, Client, Credential, DeviceKey};
use payra::wire::proto;
use tonic::Code;

/// Starts `payra serve` on ephemeral ports and waits for the line that names them.
fn spawn(certs: &std::path::Path, data: &std::path::Path) -> ServeProcess {
    spawn_with(certs, data, "text")
}

fn spawn_with(certs: &std::path::Path, data: &std::path::Path, log_format: &str) -> ServeProcess {
    spawn_serve(certs, data, &["--log-format", log_format], &[])
}

#[derive(Default)]
struct Acked {
    certificates: Vec<(String, String)>, // (serial, token)
    revocations: Vec<String>,
    reservations: Vec<(String, i64)>, // (evidence id, amount)
    /// The last acknowledged payment request, to replay after the restart.
    last_payment: Option<proto::VerifyPaymentRequest>,
}

async fn connect(url: &str, certs: &std::path::Path, credential: Credential) -> Option<Client> {
    Client::connect(url, &certs.join("root.pem"), &credential)
        .await
        .ok()
}

/// One enrollment of a fresh key for `customer`/`device`: its serial and the token used, or
/// `None` once the server stops answering (the test kills it).
async fn enroll_once(
    service: &payra::client::Client,
    phone: &payra::client::Client,
    customer: &str,
    device: &str,
) -> Option<(String, String)> {
    let token = service.create_enrollment_token(customer, 0).await.ok()?;
    let csr = DeviceKey::generate().csr_der("d").unwrap();
    let issued = phone
        .enroll(&token.token, csr, device, device_info())
        .await
        .ok()?;
    Some((issued.serial, token.token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let data = dir.path().join("data");
    payra::ca::init_dev_pki(&certs, false).unwrap();
    let mut server = spawn(&certs, &data);

    // A paying device to reserve against.
    let service = connect(&server.url, &certs, Credential::role(&certs, "service"))
        .await
        .unwrap();
    let phone = connect(&server.url, &certs, Credential::None)
        .await
        .unwrap();
    let payer_key = DeviceKey::generate();
    let token = service
        .create_enrollment_token("payer", 0)
        .await
        .unwrap()
        .token;
    let payer = phone
        .enroll(
            &token,
            payer_key.csr_der("payer-phone").unwrap(),
            "payer-phone",
            device_info(),
        )
        .await
        .unwrap();

    let acked = Arc::new(Mutex::new(Acked::default()));
    let progress = Arc::new(tokio::sync::Notify::new());
    let mut workers = Vec::new();
    for worker in 0..6 {
        let acked = acked.clone();
        let progress = progress.clone();
        let url = server.url.clone();
        let certs = certs.clone();
        let payer_key = DeviceKey::from_pkcs8_pem(&payer_key.to_pkcs8_pem().unwrap()).unwrap();
        let payer_serial = payer.serial.clone();
        workers.push(tokio::spawn(async move {
            let Some(service) = connect(&url, &certs, Credential::role(&certs, "service")).await
            else {
                return;
            };
            let Some(operator) = connect(&url, &certs, Credential::role(&certs, "operator")).await
            else {
                return;
            };
            let Some(phone) = connect(&url, &certs, Credential::None).await else {
                return;
            };
            for i in 0..1000 {
                match worker % 3 {
                    0 | 1 => {
                        let customer = format!("c{worker}");
                        let device = format!("d{worker}-{i}");
                        let Some((serial, token)) =
                            enroll_once(&service, &phone, &customer, &device).await
                        else {
                            return;
                        };
                        acked
                            .lock()
                            .unwrap()
                            .certificates
                            .push((serial.clone(), token));
                        progress.notify_one();
                        if worker % 3 == 1 {
                            let revoked = operator
                                .revoke_certificate(&serial, proto::RevocationReason::KeyCompromise)
                                .await;
                            if revoked.is_err() {
                                return;
                            }
                            acked.lock().unwrap().revocations.push(serial);
                            progress.notify_one();
                        }
                    }
                    _ => {
                        let intent = proto::PaymentIntent {
                            customer_id: "payer".into(),
                            device_id: "payer-phone".into(),
                            merchant_id: "m".into(),
                            order_id: format!("o{worker}-{i}"),
                            amount_fen: 1,
                            currency: "CNY".into(),
                            created_at_ms: payra::clock::Clock::now_ms(&payra::clock::SystemClock),
                            nonce: random_nonce(),
                            scene: proto::Scene::InApp as i32,
                        };
                        let bytes = encode_intent(&intent);
                        let request = proto::VerifyPaymentRequest {
                            signature: payer_key.sign_intent(&bytes),
                            intent: bytes,
                            certificate_serial: payer_serial.clone(),
                            transaction: Some(proto::Transaction {
                                merchant_id: "m".into(),
                                order_id: format!("o{worker}-{i}"),
                                amount_fen: 1,
                                currency: "CNY".into(),
                            }),
                            factors: vec![],
                            reserve: true,
                        };
                        let answer = service.verify_payment(request.clone()).await;
                        let Ok(answer) = answer else { return };
                        assert!(answer.limit.as_ref().unwrap().reserved, "{}", answer.reason);
                        let mut acked = acked.lock().unwrap();
                        acked.reservations.push((answer.evidence_id, 1));
                        acked.last_payment = Some(request);
                        progress.notify_one();
                    }
                }
            }
        }));
    }

    // Kill once enough work was acknowledged, while the workers are mid-stream.
    loop {
        let done = {
            let a = acked.lock().unwrap();
            a.certificates.len() >= 60 && a.revocations.len() >= 15 && a.reservations.len() >= 30
        };
        if done {
            break;
        }
        progress.notified().await;
    }
    server.child.kill().expect("SIGKILL");
    server.child.wait().unwrap();
    for worker in workers {
        let _ = worker.await;
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    let mut server = spawn(&certs, &data);
    let operator = connect(&server.url, &certs, Credential::role(&certs, "operator"))
        .await
        .unwrap();
    let phone = connect(&server.url, &certs, Credential::None)
        .await
        .unwrap();
    let service = connect(&server.url, &certs, Credential::role(&certs, "service"))
        .await
        .unwrap();

    let mut lost = 0;
    let mut serials = HashSet::new();
    for (serial, token) in &acked.certificates {
        assert!(
            serials.insert(serial.clone()),
            "serial {serial} issued twice"
        );
        match operator.certificate(serial).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => lost += 1,
            Err(status) => panic!("{status:?}"),
        }
        let reuse = phone
            .enroll(
                token,
                DeviceKey::generate().csr_der("x").unwrap(),
                "reuse",
                device_info(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            reuse.code(),
            Code::FailedPrecondition,
            "token of {serial} worked twice"
        );
    }
    for serial in &acked.revocations {
        let status = service.certificate_status(serial).await.unwrap();
        if status.status != proto::CertificateStatus::Revoked as i32 {
            lost += 1;
        }
    }
    for (evidence_id, amount) in &acked.reservations {
        match operator.evidence(evidence_id).await {
            Ok(evidence) if evidence.reserved_fen == *amount => {}
            _ => lost += 1,
        }
    }
    // An acknowledged payment's nonce is still remembered: sent again, it is a replay.
    let replayed = service
        .verify_payment(
            acked
                .last_payment
                .clone()
                .expect("a payment was acknowledged"),
        )
        .await
        .unwrap();
    assert_eq!(replayed.verdict, proto::Verdict::ReplayedNonce as i32);
    // The ledger holds at least every acknowledged reservation (1 fen each).
    let probe = {
        let mut request = acked.last_payment.clone().unwrap();
        let mut intent: proto::PaymentIntent =
            prost::Message::decode(request.intent.as_slice()).unwrap();
        intent.nonce = random_nonce();
        intent.order_id = "probe".into();
        intent.created_at_ms = payra::clock::Clock::now_ms(&payra::clock::SystemClock);
        request.intent = encode_intent(&intent);
        request.signature = payer_key.sign_intent(&request.intent);
        request.transaction.as_mut().unwrap().order_id = "probe".into();
        request.reserve = false;
        request
    };
    let probe = service.verify_payment(probe).await.unwrap();
    assert_eq!(
        probe.verdict,
        proto::Verdict::Verified as i32,
        "{}",
        probe.reason
    );
    let used = probe.limit.unwrap().used_fen;
    assert!(
        used >= acked.reservations.len() as i64,
        "ledger shows {used} fen used, {} fen were acknowledged",
        acked.reservations.len()
    );
    // Every serial on record is distinct (the listing is keyed by serial).
    let listed = operator
        .list_certificates(proto::ListCertificatesRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let listed: HashSet<_> = listed.certificates.into_iter().map(|c| c.serial).collect();
    assert!(listed.is_superset(&serials));
    eprintln!(
        "crash check: {} certificates, {} revocations, {} reservations acknowledged; {lost} lost",
        acked.certificates.len(),
        acked.revocations.len(),
        acked.reservations.len()
    );
    assert_eq!(lost, 0, "acknowledged operations lost after SIGKILL");

    // Stop gracefully, then check the audit chain offline.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        server.child.wait().unwrap().success(),
        "graceful shutdown exits 0"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_payra"))
        .args([
            "audit",
            "verify",
            "--data",
            path_str(&data),
            "--certs",
            path_str(&certs),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("audit log intact"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_exits_zero_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let data = dir.path().join("data");
    payra::ca::init_dev_pki(&certs, false).unwrap();
    let mut server = spawn_with(&certs, &data, "json");

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let progress = Arc::new(tokio::sync::Notify::new());
    let mut workers = Vec::new();
    for worker in 0..4 {
        let acked = acked.clone();
        let progress = progress.clone();
        let url = server.url.clone();
        let certs = certs.clone();
        workers.push(tokio::spawn(async move {
            let Some(service) = connect(&url, &certs, Credential::role(&certs, "service")).await
            else {
                return;
            };
            let Some(phone) = connect(&url, &certs, Credential::None).await else {
                return;
            };
            for i in 0..1000 {
                let (customer, device) = (format!("t{worker}"), format!("d{worker}-{i}"));
                let Some((serial, _)) = enroll_once(&service, &phone, &customer, &device).await
                else {
                    return;
                };
                acked.lock().unwrap().push(serial);
                progress.notify_one();
            }
        }));
    }
    while acked.lock().unwrap().len() < 40 {
        progress.notified().await;
    }
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    for worker in workers {
        let _ = worker.await;
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    let mut server = spawn(&certs, &data);
    let operator = connect(&server.url, &certs, Credential::role(&certs, "operator"))
        .await
        .unwrap();
    let mut lost = 0;
    for serial in &acked {
        if operator.certificate(serial).await.is_err() {
            lost += 1;
        }
    }
    eprintln!(
        "sigterm check: {} enrollments acknowledged; {lost} lost",
        acked.len()
    );
    assert_eq!(lost, 0);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}
