//! End to end: metrics, health, reflection, readiness, request ids and configuration
//! precedence.

mod common;

use std::collections::HashMap;

use common::*;
use payra::wire::proto;

/// Parses Prometheus text exposition into `name{labels}` → value, failing on any line that is
/// not a comment, blank, or `series value`.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut series = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let metric = name.split('{').next().unwrap();
        assert!(
            metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        series.insert(name.to_string(), value);
    }
    series
}

async fn scrape(server: &TestServer) -> HashMap<String, f64> {
    let (code, headers, body) = http_get(&server.http_url("/metrics")).await;
    assert_eq!(code, 200);
    assert!(
        headers.to_ascii_lowercase().contains("text/plain"),
        "{headers}"
    );
    parse_metrics(&String::from_utf8(body).unwrap())
}

fn value(series: &HashMap<String, f64>, key: &str) -> f64 {
    series.get(key).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn ok_metrics_parse_and_move_with_traffic() {
    let server = TestServer::start().await;
    let before = scrape(&server).await;
    assert_eq!(value(&before, "payra_build_info{version=\"0.1.0\"}"), 1.0);

    let (key, issued) = server.enroll("metrics", "m-phone").await;
    let intent = payment_intent(
        "metrics",
        "m-phone",
        "o",
        100,
        payra::clock::Clock::now_ms(&server.clock),
    );
    server
        .service()
        .await
        .verify_payment(signed_payment(&key, &issued.serial, &intent, vec![], true))
        .await
        .unwrap();
    server
        .revoke(&issued.serial, proto::RevocationReason::KeyCompromise)
        .await;
    let _ = http_get(&server.http_url("/crl")).await;

    let after = scrape(&server).await;
    let delta = |key: &str| value(&after, key) - value(&before, key);
    assert_eq!(
        delta("payra_certificates_issued_total{kind=\"enroll\"}"),
        1.0
    );
    assert_eq!(
        delta("payra_rpc_requests_total{code=\"OK\",method=\"Enroll\"}"),
        1.0
    );
    assert_eq!(
        delta("payra_rpc_requests_total{code=\"OK\",method=\"VerifyPayment\"}"),
        1.0
    );
    assert_eq!(
        delta("payra_verifications_total{tier=\"C\",verdict=\"VERIFIED\"}"),
        1.0
    );
    assert_eq!(
        delta("payra_ledger_reservations_total{outcome=\"reserved\"}"),
        1.0
    );
    assert_eq!(
        delta("payra_certificates_revoked_total{reason=\"key-compromise\"}"),
        1.0
    );
    assert_eq!(
        delta("payra_certificate_cache_lookups_total{result=\"miss\"}"),
        1.0,
        "the first verification reads the certificate from the store"
    );
    assert_eq!(
        value(&after, "payra_certificate_cache_entries"),
        0.0,
        "the revocation emptied its slot"
    );
    assert!(value(&after, "payra_crl_number") >= 1.0);
    assert!(value(&after, "payra_storage_syncs") >= 1.0);
    assert_eq!(
        delta("payra_decision_log_records"),
        1.0,
        "the verification is one record"
    );
    assert!(value(&after, "payra_decision_log_bytes") > value(&before, "payra_decision_log_bytes"));
    assert_eq!(
        delta("payra_replay_nonces"),
        1.0,
        "the verification's nonce is held"
    );
    assert!(
        delta("payra_rpc_duration_seconds_count{code=\"OK\",method=\"Enroll\"}") == 1.0,
        "latency histogram counts the call"
    );
}

/// The certificate cache changes how often the store is read, never an answer: with the
/// default cache and with none (`cache_bytes = 0`) each verification of a valid certificate
/// passes and one of a revoked certificate is refused, cached before or not; the lookups
/// are counted as hits and misses.
#[tokio::test]
async fn ok_verification_answers_alike_with_and_without_a_cache() {
    for cache_bytes in [payra::config::DEFAULT_CACHE_BYTES, 0] {
        let server =
            TestServer::start_with(|config| config.verification.cache_bytes = cache_bytes).await;
        let mut phones = Vec::new();
        for device in ["c-1", "c-2"] {
            phones.push(server.enroll("cached", device).await);
        }
        let before = scrape(&server).await;
        let pay = |n: usize, order: &str| {
            let (key, issued) = &phones[n];
            let intent = payment_intent(
                "cached",
                &format!("c-{}", n + 1),
                order,
                100,
                payra::clock::Clock::now_ms(&server.clock),
            );
            signed_payment(key, &issued.serial, &intent, vec![], false)
        };
        let verdict = |answer: proto::VerifyPaymentResponse| answer.verdict;
        let service = server.service().await;
        for (n, order) in [(0, "o-1"), (0, "o-2"), (1, "o-3")] {
            let answer = service.verify_payment(pay(n, order)).await.unwrap();
            assert_eq!(
                verdict(answer),
                proto::Verdict::Verified as i32,
                "{cache_bytes}"
            );
        }
        let after = scrape(&server).await;
        let delta = |key: &str| value(&after, key) - value(&before, key);
        let lookups = |result: &str| {
            delta(&format!(
                "payra_certificate_cache_lookups_total{{result=\"{result}\"}}"
            ))
        };
        let cached = if cache_bytes == 0 { 0.0 } else { 1.0 };
        assert_eq!((lookups("hit"), lookups("miss")), (cached, 3.0 - cached));
        assert_eq!(
            value(&after, "payra_certificate_cache_entries"),
            2.0 * cached
        );

        // The first phone's certificate is cached (with a cache), the second's too; one is
        // revoked by serial, the other on hold.
        server
            .revoke(&phones[0].1.serial, proto::RevocationReason::KeyCompromise)
            .await;
        server
            .revoke(
                &phones[1].1.serial,
                proto::RevocationReason::CertificateHold,
            )
            .await;
        for (n, order) in [(0, "o-4"), (1, "o-5")] {
            let answer = service.verify_payment(pay(n, order)).await.unwrap();
            assert_eq!(
                verdict(answer),
                proto::Verdict::CertificateRevoked as i32,
                "{cache_bytes}"
            );
        }
        let status = server.status(&phones[1].1.serial).await;
        assert_eq!(status.status, proto::CertificateStatus::OnHold as i32);
    }
}

#[tokio::test]
async fn ok_health_readiness_reflection_and_request_ids() {
    let server = TestServer::start().await;
    let (code, _, body) = http_get(&server.http_url("/healthz")).await;
    assert_eq!((code, body.as_slice()), (200, &b"ok\n"[..]));
    let (code, _, body) = http_get(&server.http_url("/readyz")).await;
    assert_eq!((code, body.as_slice()), (200, &b"ready\n"[..]));

    let channel = server.anonymous().await.channel();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "payra.v1.Enrollment", "payra.v1.Admin"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "payra.v1.Enrollment",
        "payra.v1.Registration",
        "payra.v1.Verification",
        "payra.v1.Admin",
    ] {
        assert!(names.contains(&expected.to_string()), "{names:?}");
    }
    // The same through v1alpha, which many tools still speak.
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected v1alpha reflection answer");
        };
        let alpha: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            alpha.contains(&"payra.v1.Verification".to_string()),
            "{alpha:?}"
        );
    }

    let response = server
        .service()
        .await
        .registration()
        .create_enrollment_token(proto::CreateEnrollmentTokenRequest {
            customer_id: "x".into(),
            ttl_s: 0,
        })
        .await
        .unwrap();
    let id = response
        .metadata()
        .get("x-request-id")
        .expect("request id")
        .to_str()
        .unwrap();
    assert_eq!(id.len(), 16);
}

#[cfg(feature = "bench")]
#[tokio::test]
async fn ok_invented_method_names_share_one_metrics_label() {
    let server = TestServer::start().await;
    let before = scrape(&server).await;
    // Anyone can connect without a certificate and send any path.
    let anonymous = payra::bench::GrpcConnection::connect(
        &server.url(),
        &server.certs().join("root.pem"),
        &payra::client::Credential::None,
    )
    .await
    .expect("anonymous connects");
    // The standard services answer UNIMPLEMENTED; payra's authorization refuses an unknown
    // payra method, and any path outside payra and the standard services, before routing.
    for (path, code) in [
        ("/grpc.health.v1.Health/Invented,le=9", 12),
        ("/grpc.reflection.v1.ServerReflection/Made-Up", 12),
        ("/payra.v1.Verification/NoSuchMethod", 7),
        ("/grpc.channelz.v1.Channelz/GetTopChannels", 7),
        ("/Invented/Path", 7),
    ] {
        let refused = anonymous
            .unary::<_, proto::GetCertificateStatusResponse>(
                path,
                &proto::GetCertificateStatusRequest::default(),
            )
            .await
            .expect_err("no such method");
        assert_eq!(refused.code, Some(code), "{path}: {refused}");
    }
    let after = scrape(&server).await;
    let delta = |key: &str| value(&after, key) - value(&before, key);
    assert_eq!(
        delta("payra_rpc_requests_total{code=\"UNIMPLEMENTED\",method=\"other\"}"),
        2.0
    );
    assert_eq!(
        delta("payra_rpc_requests_total{code=\"PERMISSION_DENIED\",method=\"other\"}"),
        3.0
    );
    for name in after.keys() {
        assert!(
            !name.contains("Invented") && !name.contains("Made-Up") && !name.contains("NoSuch"),
            "a client-chosen name became a label: {name}"
        );
    }
}

#[test]
fn config_precedence_is_flags_then_environment_then_file_then_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payra.toml");
    std::fs::write(&file, "grpc_addr = \"127.0.0.1:1111\"\nhttp_addr = \"127.0.0.1:2222\"\n[ledger]\nlimit_d_fen = 123\n").unwrap();
    let check = |env: &[(&str, &str)], flags: &[&str]| -> serde_json::Value {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_payra"));
        command
            .args(["config", "check", path_str(&file)])
            .args(flags);
        command
            .env_remove("PAYRA_GRPC_ADDR")
            .env_remove("PAYRA_HTTP_ADDR");
        for (key, value) in env {
            command.env(key, value);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let file_only = check(&[], &[]);
    assert_eq!(
        file_only["grpc_addr"], "127.0.0.1:1111",
        "file over defaults"
    );
    assert_eq!(file_only["ledger"]["limit_d_fen"], 123);
    assert_eq!(
        file_only["ledger"]["limit_c_fen"], 100000,
        "defaults where the file is silent"
    );
    let env = check(&[("PAYRA_GRPC_ADDR", "127.0.0.1:3333")], &[]);
    assert_eq!(env["grpc_addr"], "127.0.0.1:3333", "environment over file");
    assert_eq!(env["http_addr"], "127.0.0.1:2222");
    let flag = check(
        &[("PAYRA_GRPC_ADDR", "127.0.0.1:3333")],
        &["--grpc-addr", "127.0.0.1:4444"],
    );
    assert_eq!(flag["grpc_addr"], "127.0.0.1:4444", "flag over environment");

    std::fs::write(&file, "[ledger]\nlimit_bb_fen = 1\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_payra"))
        .args(["config", "check", path_str(&file)])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("limit_bb_fen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_retention_purges_expired_nonces_tokens_and_old_certificates() {
    let server = TestServer::start_with(|c| c.retention.expired_certificate_days = 1).await;
    let (key, issued) = server.enroll("ret", "ret-phone").await;
    server
        .service()
        .await
        .create_enrollment_token("ret", 60)
        .await
        .unwrap();
    let intent = payment_intent(
        "ret",
        "ret-phone",
        "o",
        1,
        payra::clock::Clock::now_ms(&server.clock),
    );
    server
        .service()
        .await
        .verify_payment(signed_payment(&key, &issued.serial, &intent, vec![], false))
        .await
        .unwrap();
    // Past notAfter (365 days) plus the one-day retention.
    server.clock.advance_ms((365 + 2) * 86_400 * 1000);
    let (ok, stdout, stderr) = run_payra_at(&server, &["retention", "run"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["nonces_purged"], 1);
    assert_eq!(report["tokens_purged"], 2, "the used and the unused token");
    assert_eq!(report["certificates_purged"], 1);
    // No reservation was made, so no ledger bucket or release was stored.
    assert_eq!(report["ledger_buckets_purged"], 0);
    assert_eq!(report["releases_purged"], 0);
    assert!(stderr.contains("purged:"), "progress shown");
    let err = server
        .operator()
        .await
        .certificate(&issued.serial)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// The metric names a dashboard or rule file mentions.
fn metric_names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for prefix in ["payra_", "process_cpu_seconds_total"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            let mut name = tail[..end].to_string();
            for suffix in ["_bucket", "_sum", "_count"] {
                if name == format!("payra_rpc_duration_seconds{suffix}") {
                    name = "payra_rpc_duration_seconds".into();
                }
            }
            names.insert(name);
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_the_dashboard_and_alert_rules_name_only_metrics_that_exist() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules_path = root.join("deploy/prometheus/payra-rules.yml");
    let rules = std::fs::read_to_string(&rules_path).unwrap();
    let dashboard =
        std::fs::read_to_string(root.join("deploy/grafana/payra-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(parsed["panels"].as_array().unwrap().len() >= 10);
    let mut named = metric_names_in(&rules);
    named.extend(metric_names_in(&dashboard));

    // Traffic that makes every labelled family appear.
    let server = TestServer::start_with(|c| c.limits.max_connections_per_address = 4).await;
    let (_, issued) = server.enroll("mia", "m-1").await;
    server
        .service()
        .await
        .qualify_transaction(qualify_request(
            "mia",
            "o",
            100,
            vec![],
            proto::Scene::InApp,
        ))
        .await
        .unwrap();
    // A batch whose one payment has no shape: its error is counted by code.
    let results = server
        .service()
        .await
        .verify_payments(vec![proto::VerifyPaymentRequest::default()])
        .await
        .unwrap();
    assert!(matches!(
        &results[0].result,
        Some(proto::verify_payment_result::Result::Error(e)) if e.code == tonic::Code::InvalidArgument as i32
    ));
    server
        .revoke(&issued.serial, proto::RevocationReason::Superseded)
        .await;
    let (code, _, _) = http_get(&server.http_url("/crl")).await;
    assert_eq!(code, 200);
    let leaf = server.dir.path().join("leaf.pem");
    std::fs::write(&leaf, pem(&issued.certificate_der)).unwrap();
    let request = server.dir.path().join("ocsp.der");
    let (ok, text) = openssl(&[
        "ocsp",
        "-issuer",
        path_str(&server.certs().join("issuing.pem")),
        "-cert",
        path_str(&leaf),
        "-no_nonce",
        "-reqout",
        path_str(&request),
    ]);
    assert!(ok, "{text}");
    let (code, _, _) = http_request(
        "POST",
        &server.http_url("/ocsp"),
        &std::fs::read(&request).unwrap(),
    )
    .await;
    assert_eq!(code, 200);
    let mut held = Vec::new();
    for _ in 0..5 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        held.push(socket.connect(server.grpc_addr()).await.unwrap());
    }
    let mut scrapes = 0;
    let page = loop {
        // The fifth connection from 127.0.0.2 is refused; scrape until it is counted.
        scrapes += 1;
        assert!(scrapes < 10_000, "the refused connection was never counted");
        let (_, _, body) = http_get(&server.http_url("/metrics")).await;
        let page = String::from_utf8(body).unwrap();
        if page.contains("payra_connections_refused_total{") {
            break page;
        }
        tokio::task::yield_now().await;
    };
    let exposed: std::collections::BTreeSet<String> = page
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = named.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "named but not on /metrics: {missing:?}");
    assert!(named.len() >= 15, "{named:?}");
    drop(held);

    // The rules load in Prometheus's own checker, where it is installed (.ci/run installs it).
    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_path)
        .output()
    {
        Ok(output) => assert!(
            output.status.success(),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(_) => eprintln!(
            "SKIPPED promtool check rules: promtool is not installed (Debian package prometheus)"
        ),
    }
}
