//! `payra bench` against a real server (TLS, sled, loopback): both gRPC clients drive every
//! scenario without errors and report CPU per request; the load generator's own client reports
//! gRPC status codes as the server sends them.

#![cfg(feature = "bench")]

mod common;

use std::time::Duration;

use common::TestServer;
use payra::bench::{run, BenchSettings, ClientKind, GrpcConnection, Scenario};
use payra::client::Credential;
use payra::wire::proto;

fn settings(server: &TestServer, scenario: Scenario, client: ClientKind) -> BenchSettings {
    BenchSettings {
        reserve: false,
        scenario,
        server: server.url(),
        http: format!("http://{}", server.http_addr()),
        certs: server.certs(),
        concurrency: 4,
        duration: Duration::from_millis(500),
        warmup: Duration::ZERO,
        // Enroll creates its tokens before the run; the others have no request budget to
        // use up during the warm-up.
        max_requests: if scenario == Scenario::Enroll {
            400
        } else {
            1_000_000
        },
        rate: None,
        connections: 1,
        client,
        progress: false,
        key_algorithm: payra::model::KeyAlgorithm::P256,
        population: None,
        skew: 0.0,
        batch: 1,
    }
}

/// The first `size` population devices pay (every payment VERIFIED) and are asked about,
/// uniformly and with a Zipf skew, and the reports give the server's cache hit rate.
async fn assert_populated_devices_pay(server: &TestServer, size: u64) {
    for skew in [0.0, 1.0] {
        for scenario in [Scenario::Verify, Scenario::Status] {
            let mut populated = settings(server, scenario, ClientKind::Lean);
            populated.population = Some(size);
            populated.skew = skew;
            populated.max_requests = 300;
            let report = run(populated)
                .await
                .unwrap_or_else(|e| panic!("{scenario:?} {skew}: {e}"));
            assert!(report.requests > 0, "{scenario:?} {skew}: no requests");
            assert_eq!(
                report.errors, 0,
                "{scenario:?} {skew}: not every answer was good"
            );
            // 300 choices among at most 300 devices repeat some: those are hits (and the
            // runs before this one cached devices too).
            let hit_rate = report
                .cache_hit_rate
                .expect("the server's lookups were read");
            assert!(
                hit_rate > 0.0 && hit_rate <= 1.0,
                "{scenario:?} {skew}: {hit_rate}"
            );
        }
    }
}

/// On PostgreSQL, `payra bench populate --store-url` writes the population with COPY (here
/// while a server runs on the database) and its devices pay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populated_devices_on_postgresql_verify() {
    let name = "bench::populated_devices_on_postgresql_verify";
    let Some(store) = payra::store::postgres::testing::fresh_database(name) else {
        return;
    };
    payra::store::PgStore::migrate(&store).unwrap();
    let store_config = store.clone();
    let server = TestServer::start_with(move |config| config.store = store_config).await;
    let url = store.url.clone().unwrap();
    let mut populate = std::process::Command::new(env!("CARGO_BIN_EXE_payra"));
    populate.args(["bench", "populate", "--store-url", &url, "--records", "250"]);
    if let Ok(password) = std::env::var(payra::store::postgres::testing::PASSWORD_VARIABLE) {
        populate.env("PAYRA_DB_PASSWORD", password);
    }
    let output = populate.output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{out}{err}");
    assert!(
        out.contains("inserted 250 synthetic certificate records"),
        "{out}"
    );
    assert_populated_devices_pay(&server, 250).await;
}

/// Devices written by `payra bench populate` pay and are asked about: every payment signed
/// with a population key verifies against its record, uniformly and with a Zipf skew, and
/// the report gives the server's cache hit rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populated_devices_verify_and_answer_status_with_and_without_skew() {
    let mut server = TestServer::start().await;
    server.stop().await;
    {
        use payra::bench::population;
        let store = payra::store::SledStore::open(&server.config.data_dir).unwrap();
        let now = payra::clock::Clock::now_s(&server.clock);
        let certificates = population::StandIns::new(now).unwrap();
        let records = population::PublicKeys::from(0)
            .zip(0..300)
            .filter_map(|(key, i)| population::record(i, &certificates, &key));
        assert_eq!(store.danger_bulk_insert_certificates(records).unwrap(), 300);
        store.close().unwrap();
    }
    server.start_again().await;
    assert_populated_devices_pay(&server, 300).await;
    // A device the population does not have is unknown: the bench counts it as an error.
    let mut beyond = settings(&server, Scenario::Status, ClientKind::Lean);
    beyond.population = Some(1_000);
    beyond.max_requests = 200;
    let report = run(beyond).await.unwrap();
    assert!(
        report.errors > 0,
        "devices past the populated ones were found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verify_and_enroll_scenarios_run_with_sm2_devices() {
    let server = TestServer::start().await;
    for scenario in [Scenario::Verify, Scenario::Enroll] {
        let mut sm2 = settings(&server, scenario, ClientKind::Lean);
        sm2.key_algorithm = payra::model::KeyAlgorithm::Sm2;
        // Presigned SM2 intents are slow to make in a debug build: a few hundred do.
        sm2.max_requests = 400;
        let report = run(sm2)
            .await
            .unwrap_or_else(|e| panic!("{scenario:?}: {e}"));
        assert!(report.requests > 0, "{scenario:?}: no requests");
        assert_eq!(report.errors, 0, "{scenario:?}: errors");
        assert_eq!(report.key_algorithm, "sm2");
        assert!(report.raw_verify_per_s > 0.0 && report.raw_sign_per_s > 0.0);
    }
    // The certificates those runs enrolled (the first page of them) are SM2 certificates.
    let page = server
        .operator()
        .await
        .list_certificates(proto::ListCertificatesRequest::default())
        .await
        .unwrap();
    assert!(!page.certificates.is_empty());
    assert!(page.certificates.iter().all(|c| c.key_algorithm == "sm2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_clients_drive_every_scenario_without_errors() {
    let server = TestServer::start().await;
    for client in [ClientKind::Lean, ClientKind::Tonic] {
        for scenario in [
            Scenario::Verify,
            Scenario::Enroll,
            Scenario::Token,
            Scenario::Status,
            Scenario::Ocsp,
        ] {
            let report = run(settings(&server, scenario, client))
                .await
                .unwrap_or_else(|e| panic!("{scenario:?} with {client:?}: {e}"));
            assert!(
                report.requests > 0,
                "{scenario:?} with {client:?}: no requests"
            );
            assert_eq!(report.errors, 0, "{scenario:?} with {client:?}: errors");
            assert_eq!(report.client, client);
            // The server's CPU comes from its /metrics, the load generator's from /proc.
            assert!(
                report.server_cpu_us_per_request.is_some(),
                "{scenario:?} with {client:?}: server CPU not read"
            );
            assert!(report.load_generator_cpu_us_per_request.is_some());
            assert!(report.load_generator_core_share.is_some());
            // The server's own latency comes from its histogram for the scenario's RPC.
            match (scenario, &report.server_latency_at_most) {
                (Scenario::Ocsp, server) => assert_eq!(server, &None),
                (_, Some(server)) => {
                    assert!(server.requests > 0, "{scenario:?}: {server:?}");
                    let bound = |us: Option<u64>| us.unwrap_or(u64::MAX);
                    assert!(bound(server.p50_us) <= bound(server.p90_us), "{server:?}");
                    assert!(bound(server.p90_us) <= bound(server.p99_us), "{server:?}");
                }
                (_, None) => panic!("{scenario:?} with {client:?}: server latency not read"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lean_client_reports_the_servers_status_codes() {
    let server = TestServer::start().await;
    let root = server.certs().join("root.pem");
    let service = GrpcConnection::connect(
        &server.url(),
        &root,
        &Credential::role(&server.certs(), "service"),
    )
    .await
    .expect("service connects");

    // A status lookup of a serial payra never issued: NOT_FOUND (5).
    let unknown = service
        .unary::<_, proto::GetCertificateStatusResponse>(
            "/payra.v1.Verification/GetCertificateStatus",
            &proto::GetCertificateStatusRequest {
                serial: "7f".repeat(16),
            },
        )
        .await
        .expect_err("unknown serial");
    assert_eq!(unknown.code, Some(5), "{unknown}");

    // A malformed serial: INVALID_ARGUMENT (3), with the server's message.
    let malformed = service
        .unary::<_, proto::GetCertificateStatusResponse>(
            "/payra.v1.Verification/GetCertificateStatus",
            &proto::GetCertificateStatusRequest {
                serial: "not hex".into(),
            },
        )
        .await
        .expect_err("malformed serial");
    assert_eq!(malformed.code, Some(3), "{malformed}");
    assert!(malformed.message.contains("serial"), "{malformed}");
    // grpc-message arrives percent-encoded; the client decodes it.
    assert!(
        malformed.message.contains(' ') && !malformed.message.contains("%20"),
        "{malformed}"
    );

    // A known serial answers with its record.
    let (_, issued) = server.enroll("lean-client", "phone-1").await;
    let status = service
        .unary::<_, proto::GetCertificateStatusResponse>(
            "/payra.v1.Verification/GetCertificateStatus",
            &proto::GetCertificateStatusRequest {
                serial: issued.serial.clone(),
            },
        )
        .await
        .expect("status of an issued certificate");
    assert_eq!(status.status, proto::CertificateStatus::Valid as i32);

    // Without a client certificate the service role's method is refused.
    let anonymous = GrpcConnection::connect(&server.url(), &root, &Credential::None)
        .await
        .expect("anonymous connects");
    let refused = anonymous
        .unary::<_, proto::GetCertificateStatusResponse>(
            "/payra.v1.Verification/GetCertificateStatus",
            &proto::GetCertificateStatusRequest {
                serial: issued.serial,
            },
        )
        .await
        .expect_err("no role");
    assert!(
        matches!(refused.code, Some(7) | Some(16)),
        "PERMISSION_DENIED or UNAUTHENTICATED, got {refused}"
    );
}

/// `--batch` sends VerifyPayments: every payment of every call VERIFIED, counted one by one,
/// and the server's latency read from VerifyPayments' own histogram; a batch above 100 or
/// outside the verify scenario is refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verify_scenario_sends_batches() {
    let server = TestServer::start().await;
    for client in [ClientKind::Lean, ClientKind::Tonic] {
        let mut batched = settings(&server, Scenario::Verify, client);
        batched.batch = 8;
        let report = run(batched.clone())
            .await
            .unwrap_or_else(|e| panic!("{client:?}: {e}"));
        assert_eq!(report.batch, 8);
        assert!(report.requests >= 8, "{client:?}: {report:?}");
        assert_eq!(report.errors, 0, "{client:?}: {report:?}");
        let server_side = report
            .server_latency_at_most
            .expect("VerifyPayments latency");
        // The server counts calls, the generator payments: about eight per call.
        assert!(
            server_side.requests * 4 <= report.requests
                && report.requests <= (server_side.requests + 64) * 8,
            "{client:?}: {} calls for {} payments",
            server_side.requests,
            report.requests
        );
    }
    for (scenario, batch) in [
        (Scenario::Verify, 101),
        (Scenario::Verify, 0),
        (Scenario::Status, 2),
    ] {
        let mut refused = settings(&server, scenario, ClientKind::Lean);
        refused.batch = batch;
        let err = run(refused).await.unwrap_err();
        assert!(
            err.to_string().starts_with("batch:"),
            "{scenario:?} {batch}: {err}"
        );
    }
}

/// A run whose workers use up their prepared requests while it goes on says how many did:
/// the calls in flight fell below `concurrency`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_prepared_requests_run_out_says_so() {
    let server = TestServer::start().await;
    let mut short = settings(&server, Scenario::Verify, ClientKind::Lean);
    // A budget of 10 prepares two signed intents for each of the 4 workers: all four run out
    // with budget left, before the 5-second window could end (the run ends when they have).
    short.max_requests = 10;
    short.duration = Duration::from_secs(5);
    let report = run(short).await.unwrap();
    assert!(report.requests <= 8, "{report:?}");
    assert_eq!(report.workers_ran_out, 4, "{report:?}");
}
