//! End to end: renewal, revocation by serial / device / customer, hold and release, the
//! inventory, and publication through the CRL and OCSP, cross-checked with OpenSSL.

mod common;

use common::*;
use payra::client::DeviceKey;
use payra::clock::Clock;
use payra::wire::proto;
use proto::RevocationReason as Reason;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_crl_and_ocsp_follow_revocation_in_openssl() {
    let server = TestServer::start().await;
    let good = enrolled(&server, "alice", "a-1").await;
    let bad = enrolled(&server, "alice", "a-2").await;

    let (ok, text) = openssl_verify_with_crl(&server, &bad.dir.join("leaf.pem")).await;
    assert!(ok, "before revocation: {text}");
    let (ok, text) = openssl_ocsp(&server, &bad.dir.join("leaf.pem"));
    assert!(ok, "{text}");
    assert!(text.contains("Response verify OK"), "{text}");
    assert!(text.contains(": good"), "{text}");

    server
        .revoke(&bad.issued.serial, Reason::KeyCompromise)
        .await;

    let (ok, text) = openssl_verify_with_crl(&server, &bad.dir.join("leaf.pem")).await;
    assert!(!ok, "revoked certificate must fail -crl_check: {text}");
    assert!(text.contains("certificate revoked"), "{text}");
    let (ok, text) = openssl_verify_with_crl(&server, &good.dir.join("leaf.pem")).await;
    assert!(ok, "good certificate must pass -crl_check: {text}");

    let (ok, text) = openssl_ocsp(&server, &bad.dir.join("leaf.pem"));
    assert!(ok, "{text}");
    assert!(text.contains("Response verify OK"), "{text}");
    assert!(text.contains(": revoked"), "{text}");
    assert!(text.contains("Reason: keyCompromise"), "{text}");

    // The CRL itself: signed by the issuing CA, entry with reason, AKI, number, nextUpdate.
    let crl = fetch_crl(&server).await;
    let crl_path = crl_file(&server, &crl);
    let (ok, text) = openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        &crl_path,
        "-noout",
        "-text",
        "-CAfile",
        path_str(&server.certs().join("issuing.pem")),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("verify OK"), "{text}");
    assert!(text.contains("Key Compromise"), "{text}");
    assert!(text.contains("Authority Key Identifier"), "{text}");
    assert!(text.contains("CRL Number"), "{text}");
    assert!(text.contains("Next Update"), "{text}");
    assert!(
        text.to_uppercase()
            .contains(&bad.issued.serial.to_uppercase()),
        "{text}"
    );
    assert!(
        !text
            .to_uppercase()
            .contains(&good.issued.serial.to_uppercase()),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_hold_then_unhold_is_good_again_in_ocsp_and_crl() {
    let server = TestServer::start().await;
    let phone = enrolled(&server, "bob", "b-1").await;
    server
        .revoke(&phone.issued.serial, Reason::CertificateHold)
        .await;
    assert_eq!(
        server.status(&phone.issued.serial).await.status,
        proto::CertificateStatus::OnHold as i32
    );
    let (_, text) = openssl_ocsp(&server, &phone.dir.join("leaf.pem"));
    assert!(text.contains("Reason: certificateHold"), "{text}");
    let (ok, _) = openssl_verify_with_crl(&server, &phone.dir.join("leaf.pem")).await;
    assert!(!ok, "held certificate is on the CRL");

    let record = server
        .operator()
        .await
        .unhold_certificate(&phone.issued.serial)
        .await
        .unwrap();
    assert_eq!(record.status, proto::CertificateStatus::Valid as i32);
    let (_, text) = openssl_ocsp(&server, &phone.dir.join("leaf.pem"));
    assert!(text.contains(": good"), "{text}");
    let (ok, text) = openssl_verify_with_crl(&server, &phone.dir.join("leaf.pem")).await;
    assert!(ok, "released certificate is off the CRL: {text}");

    // Unhold of a certificate that is not on hold is refused.
    let err = server
        .operator()
        .await
        .unhold_certificate(&phone.issued.serial)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn fail_revocation_rules_not_found_already_revoked_and_service_role() {
    let server = TestServer::start().await;
    let phone = enrolled(&server, "carol", "c-1").await;
    let admin = server.operator().await;

    let err = server
        .service()
        .await
        .revoke_certificate(&phone.issued.serial, Reason::KeyCompromise)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "a service cannot revoke"
    );
    assert_eq!(
        server.status(&phone.issued.serial).await.status,
        proto::CertificateStatus::Valid as i32
    );

    let err = admin
        .admin()
        .revoke_certificate(proto::RevokeCertificateRequest {
            serial: "4bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb".into(),
            reason: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let first = server
        .revoke(&phone.issued.serial, Reason::KeyCompromise)
        .await;
    server.clock.advance_ms(5_000);
    let err = admin
        .revoke_certificate(&phone.issued.serial, Reason::CessationOfOperation)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(&first.revoked_at_unix_s.to_string()),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("key-compromise"),
        "{}",
        err.message()
    );
    let status = server.status(&phone.issued.serial).await;
    assert_eq!(
        status.revoked_at_unix_s, first.revoked_at_unix_s,
        "original time kept"
    );
    assert_eq!(
        status.revocation_reason,
        Reason::KeyCompromise as i32,
        "original reason kept"
    );

    let err = admin
        .admin()
        .revoke_certificate(proto::RevokeCertificateRequest {
            serial: phone.issued.serial.clone(),
            reason: 7,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("reason"), "{}", err.message());
}

#[tokio::test]
async fn ok_bulk_revocation_dry_run_changes_nothing_then_revokes_atomically() {
    let server = TestServer::start().await;
    let d1 = enrolled(&server, "dave", "dave-phone").await;
    let d2 = enrolled(&server, "dave", "dave-phone").await;
    let d3 = enrolled(&server, "dave", "dave-tablet").await;
    let other = enrolled(&server, "erin", "erin-phone").await;
    let admin = server.operator().await;

    let dry = admin
        .revoke_customer("dave", Reason::AffiliationChanged, true)
        .await
        .unwrap();
    assert!(dry.dry_run);
    let mut expected = vec![
        d1.issued.serial.clone(),
        d2.issued.serial.clone(),
        d3.issued.serial.clone(),
    ];
    expected.sort();
    let mut listed = dry.revoked_serials.clone();
    listed.sort();
    assert_eq!(listed, expected);
    for serial in &expected {
        assert_eq!(
            server.status(serial).await.status,
            proto::CertificateStatus::Valid as i32,
            "dry run changed {serial}"
        );
    }

    let by_device = admin
        .revoke_device("dave-phone", Reason::CertificateHold, false)
        .await
        .unwrap();
    assert_eq!(by_device.revoked_serials.len(), 2);
    assert_eq!(
        server.status(&d3.issued.serial).await.status,
        proto::CertificateStatus::Valid as i32
    );

    // The customer revocation makes the held ones permanent and revokes the tablet.
    let by_customer = admin
        .revoke_customer("dave", Reason::AffiliationChanged, false)
        .await
        .unwrap();
    assert_eq!(by_customer.revoked_serials.len(), 3);
    for serial in &expected {
        let status = server.status(serial).await;
        assert_eq!(status.status, proto::CertificateStatus::Revoked as i32);
        assert_eq!(status.revocation_reason, Reason::AffiliationChanged as i32);
    }
    assert_eq!(
        server.status(&other.issued.serial).await.status,
        proto::CertificateStatus::Valid as i32
    );

    let err = admin
        .revoke_device("nobody", Reason::Unspecified, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn ok_revocation_and_crl_number_survive_restart() {
    let mut server = TestServer::start().await;
    let phone = enrolled(&server, "frank", "f-1").await;
    server
        .revoke(&phone.issued.serial, Reason::KeyCompromise)
        .await;
    let before = fetch_crl(&server).await;
    let number_before = crl_number(&before);
    server.restart().await;
    let status = server.status(&phone.issued.serial).await;
    assert_eq!(status.status, proto::CertificateStatus::Revoked as i32);
    let after = fetch_crl(&server).await;
    assert!(
        crl_number(&after) > number_before,
        "CRL number must grow across restarts"
    );
}

fn crl_number(der: &[u8]) -> u64 {
    use x509_parser::prelude::*;
    let (_, crl) = CertificateRevocationList::from_der(der).unwrap();
    let number = crl.crl_number().expect("CRL number");
    number.to_u64_digits().first().copied().unwrap_or(0)
}

#[tokio::test]
async fn ok_renew_supersedes_and_refuses_revoked_or_expired() {
    let server = TestServer::start().await;
    let phone = enrolled(&server, "gina", "g-1").await;
    // One connection for both renewals: the second comes on the same TLS session, after the
    // certificate that opened it was superseded.
    let device = server.device(&phone.dir).await;
    let new_key = DeviceKey::generate();
    let renewed = device
        .renew(new_key.csr_der("g-1").unwrap(), None)
        .await
        .expect("renew with a valid certificate");
    assert_ne!(renewed.serial, phone.issued.serial);
    assert_eq!(
        renewed.subscriber_ref, phone.issued.subscriber_ref,
        "a renewal keeps the lineage's subscriber reference"
    );
    assert_eq!(
        (renewed.customer_id.as_str(), renewed.device_id.as_str()),
        ("gina", "g-1")
    );
    let old = server.status(&phone.issued.serial).await;
    assert_eq!(old.status, proto::CertificateStatus::Superseded as i32);
    assert_eq!(old.revocation_reason, Reason::Superseded as i32);
    let record = server
        .operator()
        .await
        .certificate(&renewed.serial)
        .await
        .unwrap();
    assert_eq!(record.customer_id, "gina");
    assert_eq!(record.device_id, "g-1");
    assert_eq!(record.renewed_from_serial, phone.issued.serial);

    // The superseded certificate cannot renew again, even on its open connection.
    let err = device
        .renew(new_key.csr_der("g-1").unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // A revoked certificate cannot renew.
    let revoked = enrolled(&server, "gina", "g-2").await;
    server
        .revoke(&revoked.issued.serial, Reason::KeyCompromise)
        .await;
    let err = renew_as(&server, &revoked.dir, &revoked.key, "g-2")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // An expired certificate cannot renew (the server's clock moves past notAfter).
    let expiring = enrolled(&server, "gina", "g-3").await;
    server.clock.advance_ms(366 * 86_400 * 1000);
    let err = renew_as(&server, &expiring.dir, &expiring.key, "g-3")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());

    // Anonymous callers cannot renew at all.
    let err = server
        .anonymous()
        .await
        .renew(new_key.csr_der("x").unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn ok_list_filters_and_pages() {
    let server = TestServer::start().await;
    let mut hank = Vec::new();
    for i in 0..5 {
        hank.push(
            enrolled(&server, "hank", &format!("h-{i}"))
                .await
                .issued
                .serial,
        );
    }
    enrolled(&server, "ivy", "i-0").await;
    server.revoke(&hank[0], Reason::KeyCompromise).await;
    let admin = server.operator().await;

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_certificates(proto::ListCertificatesRequest {
                customer_id: "hank".into(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.certificates.len() <= 2);
        seen.extend(page.certificates.into_iter().map(|c| c.serial));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected = hank.clone();
    expected.sort();
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "pages cover every certificate once");

    let revoked = admin
        .list_certificates(proto::ListCertificatesRequest {
            status: proto::CertificateStatus::Revoked as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(revoked.certificates.len(), 1);
    assert_eq!(revoked.certificates[0].serial, hank[0]);
    assert_eq!(
        revoked.certificates[0].revocation_reason,
        Reason::KeyCompromise as i32
    );

    let by_device = admin
        .list_certificates(proto::ListCertificatesRequest {
            device_id: "i-0".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_device.certificates.len(), 1);
    assert_eq!(by_device.certificates[0].customer_id, "ivy");

    let soon = admin
        .list_certificates(proto::ListCertificatesRequest {
            expiring_before_unix_s: server.clock.now_s() + 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(soon.certificates.is_empty());

    let err = admin
        .list_certificates(proto::ListCertificatesRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn fail_malformed_ocsp_gets_malformed_request_and_server_keeps_serving() {
    let server = TestServer::start().await;
    for body in [
        &b""[..],
        b"\x30\x03\x02\x01",
        b"garbage that is not DER",
        &[0x30; 9000][..],
    ] {
        let (code, _, response) = http_request("POST", &server.http_url("/ocsp"), body).await;
        if body.len() > 8192 {
            assert_eq!(code, 413, "oversize body refused");
            continue;
        }
        assert_eq!(code, 200);
        // OCSPResponse { responseStatus malformedRequest(1) }
        assert_eq!(response, vec![0x30, 0x03, 0x0a, 0x01, 0x01]);
    }
    let (code, _, _) = http_get(&server.http_url("/ocsp/%%%not-base64")).await;
    assert!(code == 200 || code == 400, "{code}");
    let (code, _, body) = http_get(&server.http_url("/healthz")).await;
    assert_eq!((code, body), (200, b"ok\n".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_ocsp_get_form_and_nonce_echo() {
    let server = TestServer::start().await;
    let phone = enrolled(&server, "jack", "j-1").await;
    let certs = server.certs();
    let req = server.dir.path().join("req.der");
    let (ok, text) = openssl(&[
        "ocsp",
        "-issuer",
        path_str(&certs.join("issuing.pem")),
        "-cert",
        path_str(&phone.dir.join("leaf.pem")),
        "-reqout",
        path_str(&req),
    ]);
    assert!(ok, "{text}");
    let url = ocsp_get_url(&server, &std::fs::read(&req).unwrap());
    let (code, _, body) = http_get(&url).await;
    assert_eq!(code, 200);
    let resp = server.dir.path().join("resp.der");
    std::fs::write(&resp, body).unwrap();
    let (ok, text) = openssl(&[
        "ocsp",
        "-respin",
        path_str(&resp),
        "-reqin",
        path_str(&req),
        "-verify_other",
        path_str(&certs.join("issuing.pem")),
        "-CAfile",
        path_str(&certs.join("root.pem")),
        "-resp_text",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("Response verify OK"), "{text}");
    assert!(text.contains("OCSP Nonce"), "nonce echoed: {text}");
    assert!(!text.contains("WARNING: no nonce"), "{text}");
    assert!(text.contains("Next Update"), "{text}");
}

/// The GET URL of a DER OCSP request.
fn ocsp_get_url(server: &TestServer, request: &[u8]) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(request);
    server.http_url(&format!(
        "/ocsp/{}",
        encoded
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_ocsp_get_carries_rfc_5019_cache_headers() {
    let server = TestServer::start().await;
    let phone = enrolled(&server, "kate", "k-1").await;
    let certs = server.certs();
    let request_for = |name: &str, nonce: &str| {
        let req = server.dir.path().join(name);
        let (ok, text) = openssl(&[
            "ocsp",
            nonce,
            "-issuer",
            path_str(&certs.join("issuing.pem")),
            "-cert",
            path_str(&phone.dir.join("leaf.pem")),
            "-reqout",
            path_str(&req),
        ]);
        assert!(ok, "{text}");
        std::fs::read(&req).unwrap()
    };
    let (code, headers, body) =
        http_get(&ocsp_get_url(&server, &request_for("a.der", "-no_nonce"))).await;
    assert_eq!(code, 200);
    let headers = headers.to_ascii_lowercase();
    // Validity 3,600 s: payra re-signs after half of it, and a cache keeps it no longer.
    assert!(
        headers.contains("cache-control: max-age=1800, public, no-transform, must-revalidate"),
        "{headers}"
    );
    let now = server.clock.now_s();
    let date = |s: i64| {
        let format = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        time::OffsetDateTime::from_unix_timestamp(s)
            .unwrap()
            .format(&format)
            .unwrap()
            .to_ascii_lowercase()
    };
    assert!(
        headers.contains(&format!("last-modified: {}", date(now))),
        "{headers}"
    );
    assert!(
        headers.contains(&format!("expires: {}", date(now + 3600))),
        "{headers}"
    );
    assert!(headers.contains("etag: \""), "{headers}");
    assert!(!body.is_empty());

    // An answer to a request with a nonce is for that request only.
    let (code, headers, _) =
        http_get(&ocsp_get_url(&server, &request_for("b.der", "-nonce"))).await;
    assert_eq!(code, 200);
    let headers = headers.to_ascii_lowercase();
    assert!(headers.contains("cache-control: no-store"), "{headers}");
    assert!(!headers.contains("etag"), "{headers}");
}

/// The serials (lowercase hex) a DER CRL lists.
fn crl_serials(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der).unwrap();
    crl.iter_revoked_certificates()
        .map(|entry| hex::encode(entry.raw_serial()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_a_revoked_certificate_stays_on_a_crl_issued_after_its_not_after() {
    let server = TestServer::start().await;
    let phone = enrolled(&server, "lena", "l-1").await;
    let serial = phone.issued.serial.clone();
    server.revoke(&serial, Reason::KeyCompromise).await;
    assert!(crl_serials(&fetch_crl(&server).await).contains(&serial));

    // Just past notAfter: the next scheduled CRL is issued after notAfter and must list it.
    let not_after = phone.issued.not_after_unix_s;
    server.clock.set_ms((not_after + 1) * 1000);
    let crl = fetch_crl(&server).await;
    assert!(crl_serials(&crl).contains(&serial), "dropped at notAfter");
    let crl_path = crl_file(&server, &crl);
    let (ok, text) = openssl(&["crl", "-inform", "DER", "-in", &crl_path, "-noout", "-text"]);
    assert!(ok && text.contains("Key Compromise"), "{text}");

    // Half a CRL validity later (a scheduled re-signing): still there.
    let validity = i64::from(server.config.revocation.crl_validity_s);
    server.clock.set_ms((not_after + validity / 2 + 1) * 1000);
    assert!(crl_serials(&fetch_crl(&server).await).contains(&serial));

    // A whole validity past notAfter, after CRLs issued past notAfter listed it: gone.
    server.clock.set_ms((not_after + validity + 1) * 1000);
    assert!(!crl_serials(&fetch_crl(&server).await).contains(&serial));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_a_lineage_renews_at_most_its_daily_limit() {
    let server = TestServer::start_with(|c| c.issuance.renewals_per_day = 3).await;
    let mut current = enrolled(&server, "hugo", "h-1").await;
    for _ in 0..3 {
        current = renewed(&server, &current, "h-1")
            .await
            .expect("within the limit");
    }
    let Err(err) = renewed(&server, &current, "h-1").await else {
        panic!("a fourth renewal in a day was allowed");
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("renewals_per_day"), "{err:?}");
    let (_, _, body) = http_get(&server.http_url("/metrics")).await;
    assert!(
        String::from_utf8(body)
            .unwrap()
            .contains("payra_renewals_refused_total 1"),
        "counted"
    );
    // A day later the lineage may renew again.
    server.clock.advance_ms(86_401 * 1000);
    renewed(&server, &current, "h-1")
        .await
        .expect("after 24 hours");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_a_compromise_of_a_superseded_certificate_reaches_its_successor() {
    let server = TestServer::start().await;
    let first = enrolled(&server, "ines", "i-1").await;
    let second = renewed(&server, &first, "i-1").await.unwrap();
    let third = renewed(&server, &second, "i-1").await.unwrap();
    let response = server
        .operator()
        .await
        .revoke_certificate(&first.issued.serial, Reason::KeyCompromise)
        .await
        .expect("not refused as already revoked");
    assert_eq!(response.revoked_serials, vec![third.issued.serial.clone()]);
    assert!(response.note.contains("successor"), "{}", response.note);
    let live = server.status(&third.issued.serial).await;
    assert_eq!(live.status, proto::CertificateStatus::Revoked as i32);
    assert_eq!(live.revocation_reason, Reason::KeyCompromise as i32);
    // The superseded ones keep their state.
    let middle = server.status(&second.issued.serial).await;
    assert_eq!(middle.revocation_reason, Reason::Superseded as i32);
}
