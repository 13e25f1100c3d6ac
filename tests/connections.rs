//! End to end: connections that never speak, speak too slowly or stay idle cannot starve the
//! clients payra serves, on the gRPC port and on the HTTP port; the gRPC port speaks TLS 1.3
//! only. The attacks come from other loopback addresses (127.0.0.2, 127.0.0.3) than the
//! honest clients (127.0.0.1), as they would from other hosts.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long an honest call may take before the test calls it starved.
const PATIENCE: Duration = Duration::from_secs(15);

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closes `stream` within `within` (a read ends or fails).
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn health_check(server: &TestServer) -> bool {
    let call = async {
        let channel = server.anonymous().await.channel();
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok()
    };
    tokio::time::timeout(PATIENCE, call).await.unwrap_or(false)
}

async fn metric(server: &TestServer, line_start: &str) -> f64 {
    let (_, _, body) = http_get(&server.http_url("/metrics")).await;
    String::from_utf8(body)
        .unwrap()
        .lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_sockets_that_never_start_tls_cannot_hold_every_slot() {
    let server = TestServer::start_with(|c| {
        c.limits.max_connections = 4;
        c.limits.max_handshaking = 4;
        c.limits.handshake_timeout_s = 1;
    })
    .await;
    // Twice the whole capacity, from two addresses, silent.
    let mut silent = Vec::new();
    for n in 0..8 {
        let from = if n % 2 == 0 { "127.0.0.2" } else { "127.0.0.3" };
        silent.push(connect_from(from, server.grpc_addr()).await);
    }
    assert!(
        health_check(&server).await,
        "an honest client was starved by silent sockets"
    );
    // The server closed the silent ones once their handshake deadline passed.
    for stream in &mut silent[..4] {
        assert!(closed_by_server(stream, PATIENCE).await);
    }
    let refused = metric(
        &server,
        "payra_connections_refused_total{listener=\"grpc\",reason=\"handshake_timeout\"}",
    )
    .await;
    assert!(refused >= 4.0, "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_one_address_cannot_take_more_than_its_share() {
    let server = TestServer::start_with(|c| c.limits.max_connections_per_address = 2).await;
    let mut held = vec![
        connect_from("127.0.0.2", server.grpc_addr()).await,
        connect_from("127.0.0.2", server.grpc_addr()).await,
    ];
    let mut third = connect_from("127.0.0.2", server.grpc_addr()).await;
    assert!(
        closed_by_server(&mut third, PATIENCE).await,
        "the third connection from one address is closed at once"
    );
    assert!(health_check(&server).await, "another address is served");
    let refused = metric(
        &server,
        "payra_connections_refused_total{listener=\"grpc\",reason=\"per_address_limit\"}",
    )
    .await;
    assert_eq!(refused, 1.0);
    held.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_an_idle_watch_does_not_hold_its_connection() {
    let server = TestServer::start_with(|c| {
        c.limits.request_timeout_s = 1;
        c.limits.idle_timeout_s = 2;
        // Pings every second, which the client answers: they must not count as activity.
        c.limits.keepalive_interval_s = 1;
        c.limits.keepalive_timeout_s = 1;
    })
    .await;
    let channel = server.anonymous().await.channel();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().expect("the current status");
    assert_eq!(
        first.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The status does not change, the client sends nothing: the connection goes.
    let ended = tokio::time::timeout(PATIENCE, watch.message()).await;
    assert!(
        matches!(ended, Ok(Err(_)) | Ok(Ok(None))),
        "an idle Watch kept its connection: {ended:?}"
    );
    assert!(health_check(&server).await, "a new connection is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_tls_1_2_is_refused_on_the_grpc_port() {
    let server = TestServer::start().await;
    let addr = format!("127.0.0.1:{}", server.grpc_addr().port());
    let s_client = |version: &'static str| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let output = std::process::Command::new("openssl")
                .args(["s_client", "-connect", &addr, version, "-alpn", "h2"])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&output.stdout).to_string()
                + &String::from_utf8_lossy(&output.stderr);
            (output.status.success(), text)
        })
    };
    let (ok, text) = s_client("-tls1_2").await.unwrap();
    assert!(!ok, "TLS 1.2 accepted: {text}");
    let (_, text) = s_client("-tls1_3").await.unwrap();
    assert!(text.contains("TLSv1.3"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_silent_and_slow_http_clients_cannot_starve_relying_parties() {
    let server = TestServer::start_with(|c| {
        c.limits.http_max_connections = 4;
        c.limits.http_max_connections_per_address = 2;
        c.limits.http_idle_timeout_s = 1;
        c.limits.http_max_connection_age_s = 3;
    })
    .await;
    let http = server.http_addr();
    // The whole capacity, silent.
    let mut silent = Vec::new();
    for from in ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"] {
        silent.push(connect_from(from, http).await);
    }
    let mut over = connect_from("127.0.0.2", http).await;
    let health = tokio::time::timeout(PATIENCE, http_get(&server.http_url("/healthz"))).await;
    assert_eq!(health.expect("starved by silent HTTP connections").0, 200);
    for stream in &mut silent {
        assert!(
            closed_by_server(stream, PATIENCE).await,
            "idle connection kept"
        );
    }
    assert!(closed_by_server(&mut over, PATIENCE).await);

    // A header trickled a byte at a time never looks idle, but ends at the connection's age.
    let mut slow = connect_from("127.0.0.2", http).await;
    let started = tokio::time::Instant::now();
    let mut closed = false;
    for byte in b"GET /crl HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 16];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(300), slow.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickled header held its connection");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_a_stopped_server_closes_its_grpc_port() {
    let mut server = TestServer::start().await;
    let grpc = server.grpc_addr();
    assert!(health_check(&server).await);
    server.stop().await;
    assert!(
        TcpStream::connect(grpc).await.is_err(),
        "the gRPC port still accepts after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_one_address_cannot_hold_every_handshake_turn() {
    let server = TestServer::start_with(|c| {
        c.limits.max_handshaking = 4;
        c.limits.max_handshaking_per_address = 2;
        c.limits.handshake_timeout_s = 30;
    })
    .await;
    // As many silent sockets from one address as there are turns in all: only two of them
    // get a turn, the others wait for their address's turns.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect_from("127.0.0.2", server.grpc_addr()).await);
    }
    // Two turns are left for everyone else: an honest client is served at once, long before
    // the silent ones' 30 s deadline.
    assert!(
        health_check(&server).await,
        "one address held every handshake turn"
    );
    silent.clear();
}
