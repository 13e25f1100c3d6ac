//! End to end: the authorization matrix, cell by cell, and malformed input over gRPC.

mod common;

use common::*;
use payra::client::Client;
use payra::wire::auth::{Role, Rpc};
use payra::wire::proto;
use tonic::{Code, Status};

/// Calls `rpc` with a minimal request; the answer's code tells whether authorization let it
/// through.
async fn call(client: &Client, rpc: Rpc) -> Result<(), Status> {
    match rpc {
        Rpc::Enroll => client
            .enrollment()
            .enroll(proto::EnrollRequest::default())
            .await
            .map(|_| ()),
        Rpc::Renew => client
            .enrollment()
            .renew(proto::RenewRequest::default())
            .await
            .map(|_| ()),
        Rpc::CreateEnrollmentToken => client
            .registration()
            .create_enrollment_token(proto::CreateEnrollmentTokenRequest::default())
            .await
            .map(|_| ()),
        Rpc::VerifyPayment => client
            .verification()
            .verify_payment(proto::VerifyPaymentRequest::default())
            .await
            .map(|_| ()),
        Rpc::VerifyPayments => client
            .verification()
            .verify_payments(proto::VerifyPaymentsRequest::default())
            .await
            .map(|_| ()),
        Rpc::QualifyTransaction => client
            .verification()
            .qualify_transaction(proto::QualifyTransactionRequest::default())
            .await
            .map(|_| ()),
        Rpc::GetCertificateStatus => client
            .verification()
            .get_certificate_status(proto::GetCertificateStatusRequest::default())
            .await
            .map(|_| ()),
        Rpc::ReleaseReservation => client
            .verification()
            .release_reservation(proto::ReleaseReservationRequest::default())
            .await
            .map(|_| ()),
        Rpc::RevokeCertificate => client
            .admin()
            .revoke_certificate(proto::RevokeCertificateRequest::default())
            .await
            .map(|_| ()),
        Rpc::RevokeDevice => client
            .admin()
            .revoke_device(proto::RevokeDeviceRequest::default())
            .await
            .map(|_| ()),
        Rpc::RevokeCustomer => client
            .admin()
            .revoke_customer(proto::RevokeCustomerRequest::default())
            .await
            .map(|_| ()),
        Rpc::UnholdCertificate => client
            .admin()
            .unhold_certificate(proto::UnholdCertificateRequest::default())
            .await
            .map(|_| ()),
        Rpc::GetCertificate => client
            .admin()
            .get_certificate(proto::GetCertificateRequest::default())
            .await
            .map(|_| ()),
        Rpc::ListCertificates => client
            .admin()
            .list_certificates(proto::ListCertificatesRequest::default())
            .await
            .map(|_| ()),
        Rpc::SetAgreedLimit => client
            .admin()
            .set_agreed_limit(proto::SetAgreedLimitRequest::default())
            .await
            .map(|_| ()),
        Rpc::GetEvidence => client
            .admin()
            .get_evidence(proto::GetEvidenceRequest::default())
            .await
            .map(|_| ()),
        Rpc::IssueClientCertificate => client
            .admin()
            .issue_client_certificate(proto::IssueClientCertificateRequest::default())
            .await
            .map(|_| ()),
        Rpc::CreateBackup => client
            .admin()
            .create_backup(proto::CreateBackupRequest::default())
            .await
            .map(|_| ()),
        Rpc::GetLimits => client
            .admin()
            .get_limits(proto::GetLimitsRequest::default())
            .await
            .map(|_| ()),
        Rpc::RunRetention => client
            .admin()
            .run_retention(proto::RunRetentionRequest::default())
            .await
            .map(|_| ()),
        Rpc::ListUpstreamRevocations => client
            .admin()
            .list_upstream_revocations(proto::ListUpstreamRevocationsRequest::default())
            .await
            .map(|_| ()),
    }
}

fn denied_by_layer(status: &Status) -> bool {
    (status.code() == Code::Unauthenticated
        && status.message().contains("needs a client certificate"))
        || (status.code() == Code::PermissionDenied
            && status.message().contains("is not allowed for role"))
}

#[tokio::test]
async fn every_cell_of_the_authorization_matrix() {
    let server = TestServer::start().await;
    let (key, issued) = server.enroll("matrix", "matrix-phone").await;
    let device_dir = write_device_dir(&server.dir.path().join("device"), &key, &issued);
    let clients = [
        (Role::Anonymous, server.anonymous().await),
        (Role::Device, server.device(&device_dir).await),
        (Role::Service, server.service().await),
        (Role::Operator, server.operator().await),
    ];
    let mut cells = 0;
    for rpc in Rpc::ALL {
        for (role, client) in &clients {
            let allowed = rpc.allowed_roles().contains(role);
            let result = call(client, rpc).await;
            match (&result, allowed) {
                (Ok(()), true) => {}
                (Err(status), true) => assert!(
                    !denied_by_layer(status),
                    "{rpc:?} as {role:?} must be allowed: {status:?}"
                ),
                (Ok(()), false) => panic!("{rpc:?} as {role:?} must be denied"),
                (Err(status), false) => {
                    let expected = if *role == Role::Anonymous {
                        Code::Unauthenticated
                    } else {
                        Code::PermissionDenied
                    };
                    assert_eq!(status.code(), expected, "{rpc:?} as {role:?}: {status:?}");
                    assert!(denied_by_layer(status), "{rpc:?} as {role:?}: {status:?}");
                }
            }
            cells += 1;
        }
    }
    assert_eq!(cells, 21 * 4);
    // Health is open to everyone, so load balancers need no certificate.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(server.anonymous().await.channel());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "payra.v1.Verification".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn fail_malformed_input_gets_clear_codes_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let phone = server.anonymous().await;
    let service = server.service().await;
    let operator = server.operator().await;
    let token = server.token("malformed").await;

    // Empty messages: every field missing.
    let err = phone
        .enrollment()
        .enroll(proto::EnrollRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = service
        .registration()
        .create_enrollment_token(proto::CreateEnrollmentTokenRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "customer_id: is required")
    );

    // Truncated DER and huge fields.
    let csr = payra::client::DeviceKey::generate().csr_der("d").unwrap();
    for (case, request) in [
        (
            "truncated CSR",
            proto::EnrollRequest {
                token: token.clone(),
                csr_der: csr[..csr.len() / 2].to_vec(),
                device_id: "d".into(),
                device_info: None,
                attestation: None,
            },
        ),
        (
            "huge token",
            proto::EnrollRequest {
                token: "x".repeat(10_000),
                csr_der: csr.clone(),
                device_id: "d".into(),
                device_info: None,
                attestation: None,
            },
        ),
        (
            "huge device id",
            proto::EnrollRequest {
                token: token.clone(),
                csr_der: csr.clone(),
                device_id: "d".repeat(200),
                device_info: None,
                attestation: None,
            },
        ),
        (
            "control chars in device info",
            proto::EnrollRequest {
                token: token.clone(),
                csr_der: csr.clone(),
                device_id: "d".into(),
                device_info: Some(proto::DeviceInfo {
                    platform: "and\u{0}roid".into(),
                    ..Default::default()
                }),
                attestation: None,
            },
        ),
    ] {
        let err = phone.enrollment().enroll(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{case}: {err:?}");
    }

    // A message over the gRPC size limit is refused before decoding (tonic answers
    // OUT_OF_RANGE naming the limit).
    let err = phone
        .enrollment()
        .enroll(proto::EnrollRequest {
            token: token.clone(),
            csr_der: vec![0; 200_000],
            device_id: "d".into(),
            device_info: None,
            attestation: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("the limit is: 65536"), "{err:?}");

    // Wrong enum values.
    let err = operator
        .admin()
        .list_certificates(proto::ListCertificatesRequest {
            status: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = operator
        .admin()
        .list_certificates(proto::ListCertificatesRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Still serving, and the token the refused requests carried still works.
    phone
        .enroll(&token, csr, "d", device_info())
        .await
        .expect("server still serves and the token is unused");
}

#[tokio::test]
async fn fail_token_guessing_is_throttled_per_peer() {
    let server = TestServer::start_with(|c| c.limits.enroll_failures_per_minute = 3).await;
    let phone = server.anonymous().await;
    let csr = || payra::client::DeviceKey::generate().csr_der("d").unwrap();
    for i in 0..3 {
        let err = phone
            .enroll(&format!("payra_et_guess{i}"), csr(), "d", device_info())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "guess {i}");
    }
    let err = phone
        .enroll("payra_et_guess3", csr(), "d", device_info())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("too many failed enrollment attempts"),
        "{err:?}"
    );
    // Another phone behind the same address (a carrier NAT) with a real token is not locked
    // out by the guesser.
    let good = server.token("guessed").await;
    phone
        .enroll(&good, csr(), "d", device_info())
        .await
        .expect("a real token enrolls from a throttled address");
    server.clock.advance_ms(60_000);
    let err = phone
        .enroll("payra_et_guess4", csr(), "d", device_info())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "a new window: {err:?}");
}

#[tokio::test]
async fn ok_connection_limit_queues_extra_clients() {
    let server = TestServer::start_with(|c| c.limits.max_connections = 2).await;
    let first = server.service().await;
    let second = server.service().await;
    first.create_enrollment_token("c1", 0).await.unwrap();
    second.create_enrollment_token("c2", 0).await.unwrap();
    // A third connection waits in the accept queue: its TLS handshake cannot finish.
    let third = tokio::time::timeout(std::time::Duration::from_millis(500), server.service()).await;
    assert!(
        third.is_err(),
        "a third connection must wait while two are open"
    );
    drop(first);
    // Once a connection closes, a new client gets in.
    let third = tokio::time::timeout(std::time::Duration::from_secs(10), server.service())
        .await
        .expect("admitted after a connection closed");
    third.create_enrollment_token("c3", 0).await.unwrap();
    drop(second);
}

/// Encrypts `certs/issuing.key` with OpenSSL (PBES2, AES-256-CBC, PBKDF2-SHA256) and writes the passphrase
/// file; returns its path.
fn encrypt_issuing_key(certs: &std::path::Path, passphrase: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let key = certs.join("issuing.key");
    let encrypted = certs.join("issuing.key.enc");
    let (ok, text) = openssl(&[
        "pkcs8",
        "-topk8",
        "-v2",
        "aes-256-cbc",
        "-v2prf",
        "hmacWithSHA256",
        // The fewest iterations payra accepts (OpenSSL's default of 2048 is refused).
        "-iter",
        "100000",
        "-in",
        path_str(&key),
        "-out",
        path_str(&encrypted),
        "-passout",
        &format!("pass:{passphrase}"),
    ]);
    assert!(ok, "{text}");
    std::fs::rename(&encrypted, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file = certs.join("passphrase");
    std::fs::write(&file, format!("{passphrase}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    file
}

#[tokio::test]
async fn ok_encrypted_issuing_key_with_a_passphrase_file() {
    let server = TestServer::start_with(|config| {
        let file = encrypt_issuing_key(&config.certs_dir, "s3cret passphrase");
        config.ca_key_passphrase_file = Some(file);
    })
    .await;
    assert!(std::fs::read_to_string(server.certs().join("issuing.key"))
        .unwrap()
        .contains("ENCRYPTED PRIVATE KEY"));
    let (_, issued) = server.enroll("enc", "enc-phone").await;
    let dir = server.dir.path().join("check");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("leaf.pem"), pem(&issued.certificate_der)).unwrap();
    let certs = server.certs();
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        path_str(&certs.join("root.pem")),
        "-untrusted",
        path_str(&certs.join("issuing.pem")),
        path_str(&dir.join("leaf.pem")),
    ]);
    assert!(ok, "{text}");

    // A wrong passphrase refuses to start, and says why.
    let mut config = server.config.clone();
    config.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.http_addr = "127.0.0.1:0".parse().unwrap();
    let wrong = server.dir.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    config.ca_key_passphrase_file = Some(wrong);
    config.data_dir = server.dir.path().join("other-data");
    let err = payra::server::start(config, std::sync::Arc::new(payra::clock::SystemClock))
        .await
        .err()
        .expect("a wrong passphrase must not start");
    assert!(err.to_string().contains("wrong passphrase"), "{err}");
}

#[tokio::test]
async fn ok_issued_client_credentials_work_until_revoked() {
    let server = TestServer::start().await;
    let operator = server.operator().await;
    let key = payra::client::DeviceKey::generate();
    let issued = operator
        .admin()
        .issue_client_certificate(proto::IssueClientCertificateRequest {
            role: "service".into(),
            name: "billing".into(),
            csr_der: key.csr_der("billing").unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    let dir = server.dir.path().join("billing");
    std::fs::create_dir_all(&dir).unwrap();
    let mut chain = pem(&issued.certificate_der);
    chain.push_str(&pem(&issued.chain_der[0]));
    std::fs::write(dir.join("billing.pem"), chain).unwrap();
    std::fs::write(dir.join("billing.key"), key.to_pkcs8_pem().unwrap()).unwrap();
    let billing = server
        .client(payra::client::Credential::Files {
            certificate: dir.join("billing.pem"),
            key: dir.join("billing.key"),
        })
        .await;
    billing
        .create_enrollment_token("c-1", 0)
        .await
        .expect("a new service credential works");
    let err = billing
        .admin()
        .list_certificates(proto::ListCertificatesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "a service is not an operator"
    );

    // Revoked: locked out at once, on the same connection.
    server
        .revoke(&issued.serial, proto::RevocationReason::KeyCompromise)
        .await;
    let err = billing.create_enrollment_token("c-2", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{err:?}");

    // The bootstrap operator credential is registered too: revoking it locks it out.
    let pem_text = std::fs::read_to_string(server.certs().join("operator.pem")).unwrap();
    let der = ::pem::parse(pem_text).unwrap().into_contents();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let serial = hex::encode(cert.raw_serial());
    let response = operator
        .admin()
        .revoke_certificate(proto::RevokeCertificateRequest {
            serial: serial.clone(),
            reason: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.revoked_serials,
        vec![serial.trim_start_matches("00").to_string()]
    );
    let err = operator
        .admin()
        .list_certificates(proto::ListCertificatesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Issuing needs the operator role and a known role name.
    let err = billing
        .admin()
        .issue_client_certificate(proto::IssueClientCertificateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn fail_unregistered_client_certificates_are_refused() {
    let server = TestServer::start().await;
    // A service certificate signed with payra's issuing key, but not through payra: it
    // chains, yet payra has no record of it, so it could never be revoked. Refused.
    let ca = payra::ca::CaMaterial::load(&server.certs(), None).unwrap();
    let key = payra::client::DeviceKey::generate();
    let public = payra::ca::parse_device_csr(&key.csr_der("rogue").unwrap()).unwrap();
    let profile = payra::ca::DeviceProfile {
        validity_s: 86_400,
        backdate_s: 60,
        crl_url: server.http_url("/crl"),
        ocsp_url: server.http_url("/ocsp"),
        issuer_not_after_s: ca.issuing_not_after_s,
    };
    let now = payra::clock::Clock::now_s(&server.clock);
    let cert = payra::ca::issue_client_certificate(
        &ca.issuer,
        &profile,
        &public,
        &payra::model::Serial::random(),
        "service",
        "rogue",
        now,
        86_400,
    )
    .unwrap();
    let dir = server.dir.path().join("rogue");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rogue.pem"), pem(&cert.der)).unwrap();
    std::fs::write(dir.join("rogue.key"), key.to_pkcs8_pem().unwrap()).unwrap();
    let rogue = server
        .client(payra::client::Credential::Files {
            certificate: dir.join("rogue.pem"),
            key: dir.join("rogue.key"),
        })
        .await;
    let err = rogue.create_enrollment_token("c", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("not registered"), "{err:?}");
}

/// Every path below `dir` with a group or other permission bit.
fn open_to_others(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.permissions().mode() & 0o077 != 0 {
            found.push(format!(
                "{} {:o}",
                path.display(),
                meta.permissions().mode()
            ));
        }
        if meta.is_dir() {
            found.extend(open_to_others(&path));
        }
    }
    found
}

#[tokio::test]
async fn fail_data_readable_by_other_users_refuses_the_start() {
    let mut server = TestServer::start().await;
    let p = server.enroll("vera", "v-1").await;
    assert!(!p.1.serial.is_empty());
    server.stop().await;
    let data = server.config.data_dir.clone();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the data directory is private");
    assert_eq!(
        open_to_others(&data),
        Vec::<String>::new(),
        "every file is private"
    );

    // Another user's process (or a careless chmod) opened a file up: refused, with the fix.
    let log = std::fs::read_dir(data.join("decisions"))
        .map(|mut entries| entries.next().unwrap().unwrap().path())
        .unwrap_or_else(|_| data.join("db"));
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = match payra::server::start(
        server.config.clone(),
        std::sync::Arc::new(server.clock.clone()),
    )
    .await
    {
        Ok(_) => panic!("started with a readable data file"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("chmod -R go-rwx"), "{err}");
    // The operator may insist; the start is then a warning.
    server.config.allow_readable_data = true;
    server.start_again().await;
}
