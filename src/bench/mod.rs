//! `payra bench`: the load generator. Drives a running server over real gRPC/TLS (and HTTP for
//! OCSP) from the same machine, reports throughput and latency percentiles, and measures in
//! the same run the raw single-core ECDSA P-256 verify and sign rates of this binary, so every
//! figure comes with its ratio to the crypto limit. Loopback only; bounded in time and count.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::client::{encode_intent, random_nonce, Client, Credential, DeviceIdentity, DeviceKey};
use crate::error::{Error, Result};
use crate::wire::proto;

mod grpc;

pub use grpc::{CallError, GrpcConnection};

/// Which gRPC client the load generator drives the server with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// The load generator's own HTTP/2 client (`bench::grpc`): the requests queued since the
    /// connection's last write go out in one write.
    Lean,
    /// tonic's channel, as the CLI and the tests use it.
    Tonic,
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// VerifyPayment with a fresh intent per call (evidence written durably).
    Verify,
    /// Enroll with pre-created tokens (a durable issuance per call).
    Enroll,
    /// CreateEnrollmentToken as the payment service's role (a durable token per call): a
    /// device cannot enroll faster than its payment service gets tokens.
    Token,
    /// GetCertificateStatus.
    Status,
    /// OCSP POST without a nonce (the cached path).
    Ocsp,
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub scenario: Scenario,
    pub server: String,
    pub http: String,
    pub certs: PathBuf,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub max_requests: u64,
    /// Open-loop mode: requests per second, spread evenly over the workers. Latency is then
    /// counted from each request's scheduled time whenever the worker was still busy with an
    /// earlier one, so a slow server cannot hide its queueing (no coordinated omission).
    /// `None`: closed loop, each worker sends as soon as its previous answer arrives.
    pub rate: Option<f64>,
    /// gRPC connections the workers share (HTTP/2 streams are multiplexed on each).
    pub connections: usize,
    pub client: ClientKind,
    pub progress: bool,
    /// Verify scenario: each payment asks to reserve 1 fen (tier C), so each takes the
    /// ledger path; otherwise 100 fen, a PIN factor, no reservation.
    pub reserve: bool,
}

/// Latency in microseconds at the usual percentiles.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// The result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub scenario: Scenario,
    pub client: ClientKind,
    pub concurrency: usize,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub throughput_per_s: f64,
    pub latency: Latency,
    /// Raw single-core ECDSA P-256 verifications per second (ring), measured in this run.
    pub raw_verify_per_s: f64,
    /// Raw single-core ECDSA P-256 signatures per second (ring), measured in this run.
    pub raw_sign_per_s: f64,
    pub ratio_to_raw_verify: f64,
    pub ratio_to_raw_sign: f64,
    /// CPU the server used per request while measuring, from its `/metrics`
    /// (`process_cpu_seconds_total` on the `--http` listener); `None` if it could not be read.
    pub server_cpu_us_per_request: Option<f64>,
    /// CPU this load generator used per request while measuring (it shares the machine).
    pub load_generator_cpu_us_per_request: Option<f64>,
    /// Share of one core the load generator used while measuring: it runs on one thread, so
    /// near 1.0 it, not the server, limits the run.
    pub load_generator_core_share: Option<f64>,
    /// The server's own latency for this scenario's RPC over the measured window, from the
    /// `payra_rpc_duration_seconds` histogram on its `/metrics`: the upper bound of the bucket
    /// that holds each percentile. It runs from the RPC's arrival at the service to its answer,
    /// so it leaves out HTTP/2 and TLS on both sides and the load generator's own delays; the
    /// difference from `latency` is the transport's and the generator's share. `None` for OCSP
    /// (plain HTTP) or if `/metrics` could not be read.
    pub server_latency_at_most: Option<ServerLatency>,
}

/// Percentiles of the server's histogram, in microseconds, each the upper bound of its bucket
/// (`None`: above the largest finite bucket).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ServerLatency {
    pub requests: u64,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
}

/// Refuses any server address that is not on this machine.
fn require_loopback(what: &str, address: &str) -> Result<SocketAddr> {
    Ok(loopback_addresses(what, address)?[0])
}

/// Every address `address` resolves to, all of them on this machine (never empty).
fn loopback_addresses(what: &str, address: &str) -> Result<Vec<SocketAddr>> {
    let host_port = address
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let addrs: Vec<SocketAddr> = host_port
        .to_socket_addrs()
        .map_err(|e| Error::invalid("server", format!("{what} {address}: {e}")))?
        .collect();
    if !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()) {
        Ok(addrs)
    } else {
        Err(Error::invalid(
            "server",
            format!(
                "{what} {address} is not a loopback address; payra bench only targets this machine"
            ),
        ))
    }
}

/// Raw single-core rates of this binary's ECDSA P-256 (ring, as the server uses), each
/// measured for `window`.
pub fn raw_crypto_rates(window: Duration) -> (f64, f64) {
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
        ECDSA_P256_SHA256_ASN1_SIGNING,
    };
    let rng = SystemRandom::new();
    let Ok(pkcs8) = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng) else {
        return (0.0, 0.0);
    };
    let Ok(key) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
    else {
        return (0.0, 0.0);
    };
    let message = b"payra.v1.PaymentIntent\nbenchmark message of a typical intent size, about a hundred bytes long";
    let start = Instant::now();
    let mut signs = 0u64;
    let mut signature = Vec::new();
    while start.elapsed() < window {
        if let Ok(sig) = key.sign(&rng, message) {
            signature = sig.as_ref().to_vec();
        }
        signs += 1;
    }
    let sign_rate = signs as f64 / start.elapsed().as_secs_f64();
    let public =
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
    let start = Instant::now();
    let mut verifies = 0u64;
    while start.elapsed() < window {
        let _ = public.verify(message, &signature);
        verifies += 1;
    }
    let verify_rate = verifies as f64 / start.elapsed().as_secs_f64();
    (verify_rate, sign_rate)
}

/// One worker's prepared state.
enum Work {
    Verify {
        client: Caller,
        /// Intents signed before the run, as devices sign them before the payment service
        /// forwards them: the load generator spends no CPU on signing while it measures.
        requests: Vec<proto::VerifyPaymentRequest>,
    },
    Enroll {
        client: Caller,
        tokens: Vec<String>,
        csrs: Arc<Vec<Vec<u8>>>,
    },
    Token {
        client: Caller,
    },
    Status {
        client: Caller,
        serials: Arc<Vec<String>>,
    },
    Ocsp {
        address: SocketAddr,
        requests: Arc<Vec<Vec<u8>>>,
    },
}

async fn connect(settings: &BenchSettings, credential: Credential) -> Result<Client> {
    Client::connect(
        &settings.server,
        &settings.certs.join("root.pem"),
        &credential,
    )
    .await
}

/// A measuring connection: either client, making the same three calls.
#[derive(Clone)]
enum Caller {
    Lean(GrpcConnection),
    Tonic(Client),
}

impl Caller {
    async fn connect(settings: &BenchSettings, credential: Credential) -> Result<Caller> {
        let root = settings.certs.join("root.pem");
        Ok(match settings.client {
            ClientKind::Lean => {
                Caller::Lean(GrpcConnection::connect(&settings.server, &root, &credential).await?)
            }
            ClientKind::Tonic => Caller::Tonic(connect(settings, credential).await?),
        })
    }

    async fn verify_payment(
        &self,
        request: proto::VerifyPaymentRequest,
    ) -> std::result::Result<proto::VerifyPaymentResponse, CallError> {
        match self {
            Caller::Lean(c) => {
                c.unary("/payra.v1.Verification/VerifyPayment", &request)
                    .await
            }
            Caller::Tonic(c) => tonic_answer(c.verification().verify_payment(request).await),
        }
    }

    async fn enroll(
        &self,
        request: proto::EnrollRequest,
    ) -> std::result::Result<proto::EnrollResponse, CallError> {
        match self {
            Caller::Lean(c) => c.unary("/payra.v1.Enrollment/Enroll", &request).await,
            Caller::Tonic(c) => tonic_answer(c.enrollment().enroll(request).await),
        }
    }

    async fn create_enrollment_token(
        &self,
        request: proto::CreateEnrollmentTokenRequest,
    ) -> std::result::Result<proto::CreateEnrollmentTokenResponse, CallError> {
        match self {
            Caller::Lean(c) => {
                c.unary("/payra.v1.Registration/CreateEnrollmentToken", &request)
                    .await
            }
            Caller::Tonic(c) => {
                tonic_answer(c.registration().create_enrollment_token(request).await)
            }
        }
    }

    async fn certificate_status(
        &self,
        request: proto::GetCertificateStatusRequest,
    ) -> std::result::Result<proto::GetCertificateStatusResponse, CallError> {
        match self {
            Caller::Lean(c) => {
                c.unary("/payra.v1.Verification/GetCertificateStatus", &request)
                    .await
            }
            Caller::Tonic(c) => {
                tonic_answer(c.verification().get_certificate_status(request).await)
            }
        }
    }
}

fn tonic_answer<A>(
    answer: std::result::Result<tonic::Response<A>, tonic::Status>,
) -> std::result::Result<A, CallError> {
    answer
        .map(tonic::Response::into_inner)
        .map_err(|s| CallError {
            code: Some(s.code() as u32),
            message: s.message().to_string(),
        })
}

fn status_error(error: impl Into<crate::client::ClientError>) -> Error {
    Error::internal(error.into().to_string())
}

/// Enrolls a fresh device for `customer`; returns its key and identity.
async fn enroll_device(
    settings: &BenchSettings,
    service: &Client,
    customer: &str,
    device: &str,
) -> Result<(DeviceKey, DeviceIdentity, Vec<u8>)> {
    let token = service
        .create_enrollment_token(customer, 0)
        .await
        .map_err(status_error)?
        .token;
    let key = DeviceKey::generate();
    let phone = connect(settings, Credential::None).await?;
    let issued = phone
        .enroll(
            &token,
            key.csr_der(device)?,
            device,
            proto::DeviceInfo::default(),
        )
        .await
        .map_err(status_error)?;
    let identity = DeviceIdentity::from_enrollment(&issued);
    Ok((key, identity, issued.certificate_der))
}

/// A DER OCSP request (SHA-1 CertID, no nonce) for `certificate` issued by `issuer`.
fn ocsp_request(issuer_der: &[u8], certificate_der: &[u8]) -> Result<Vec<u8>> {
    use der::{Decode, Encode};
    use sha1::{Digest, Sha1};
    let issuer = x509_cert::Certificate::from_der(issuer_der)
        .map_err(|e| Error::internal(format!("issuer: {e}")))?;
    let cert = x509_cert::Certificate::from_der(certificate_der)
        .map_err(|e| Error::internal(format!("certificate: {e}")))?;
    let name = issuer
        .tbs_certificate
        .subject
        .to_der()
        .map_err(|e| Error::internal(format!("issuer name: {e}")))?;
    let key = issuer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    let request = x509_ocsp::OcspRequest {
        tbs_request: x509_ocsp::TbsRequest {
            version: Default::default(),
            requestor_name: None,
            request_list: vec![x509_ocsp::Request {
                req_cert: x509_ocsp::CertId {
                    hash_algorithm: spki::AlgorithmIdentifierOwned {
                        oid: const_oid::db::rfc5912::ID_SHA_1,
                        parameters: None,
                    },
                    issuer_name_hash: der::asn1::OctetString::new(Sha1::digest(&name).to_vec())
                        .map_err(|e| Error::internal(e.to_string()))?,
                    issuer_key_hash: der::asn1::OctetString::new(Sha1::digest(key).to_vec())
                        .map_err(|e| Error::internal(e.to_string()))?,
                    serial_number: cert.tbs_certificate.serial_number.clone(),
                },
                single_request_extensions: None,
            }],
            request_extensions: None,
        },
        optional_signature: None,
    };
    request
        .to_der()
        .map_err(|e| Error::internal(format!("OCSP request: {e}")))
}

/// Pre-signed intents are sized for at most this closed-loop rate (twice the raw verify rate of
/// a 2-core machine); `--rate` or `--max-requests` size them otherwise.
const MAX_CLOSED_LOOP_VERIFY_RATE: f64 = 40_000.0;
/// Upper bound on pre-signed intents (about 400 bytes each).
const MAX_PRESIGNED: u64 = 500_000;

/// Builds `count` VerifyPayment requests for one device, each a fresh intent with its own
/// nonce, signed with ring exactly as docs/payment-signature.md says a device signs.
fn presign(
    key: &DeviceKey,
    identity: &DeviceIdentity,
    count: usize,
    reserve: bool,
) -> Result<Vec<proto::VerifyPaymentRequest>> {
    let amount_fen = if reserve { 1 } else { 100 };
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let secret = key.secret();
    let public =
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false);
    let signer = EcdsaKeyPair::from_private_key_and_public_key(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &secret.to_bytes(),
        public.as_bytes(),
        &rng,
    )
    .map_err(|e| Error::internal(format!("loading the device key into ring: {e}")))?;
    let now_ms = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    (0..count)
        .map(|n| {
            let intent = proto::PaymentIntent {
                customer_id: identity.customer_id.clone(),
                device_id: identity.device_id.clone(),
                merchant_id: "bench-merchant".into(),
                order_id: format!("order-{n}"),
                amount_fen,
                currency: "CNY".into(),
                created_at_ms: now_ms,
                nonce: random_nonce(),
                scene: proto::Scene::InApp as i32,
            };
            let bytes = encode_intent(&intent);
            let signature = signer
                .sign(&rng, &crate::ra::signature::signed_message(&bytes))
                .map_err(|e| Error::internal(format!("signing: {e}")))?;
            Ok(proto::VerifyPaymentRequest {
                signature: signature.as_ref().to_vec(),
                intent: bytes,
                certificate_serial: identity.serial.clone(),
                transaction: Some(proto::Transaction {
                    merchant_id: intent.merchant_id,
                    order_id: intent.order_id,
                    amount_fen,
                    currency: "CNY".into(),
                }),
                factors: if reserve {
                    Vec::new()
                } else {
                    vec![proto::Factor {
                        category: proto::FactorCategory::Knowledge as i32,
                        method: "payment_pin".into(),
                    }]
                },
                reserve,
            })
        })
        .collect()
}

async fn prepare(settings: &BenchSettings) -> Result<Vec<Work>> {
    let service = connect(settings, Credential::role(&settings.certs, "service")).await?;
    let mut work = Vec::with_capacity(settings.concurrency);
    match settings.scenario {
        Scenario::Verify => {
            // Enough signed intents for the whole run at the expected pace (or the request
            // budget, if smaller); a worker that runs out stops, which the report shows.
            let seconds = (settings.duration + settings.warmup).as_secs_f64();
            let pace = settings.rate.unwrap_or(MAX_CLOSED_LOOP_VERIFY_RATE);
            let total = ((pace * seconds * 1.1) as u64)
                .min(settings.max_requests)
                .min(MAX_PRESIGNED);
            let per_worker = (total / settings.concurrency as u64).max(1) as usize;
            let mut devices = Vec::with_capacity(settings.concurrency);
            for worker in 0..settings.concurrency {
                let customer = format!("bench-{}-{worker}", random_suffix());
                let (key, identity, _) =
                    enroll_device(settings, &service, &customer, &format!("{customer}-phone"))
                        .await?;
                devices.push((key, identity));
            }
            // Signed on two threads; the server is idle meanwhile.
            let reserve = settings.reserve;
            let signed = tokio::task::spawn_blocking(move || {
                let half = devices.len().div_ceil(2);
                std::thread::scope(|scope| {
                    let parts: Vec<_> = devices
                        .chunks(half.max(1))
                        .map(|part| {
                            scope.spawn(move || {
                                part.iter()
                                    .map(|(key, identity)| {
                                        presign(key, identity, per_worker, reserve)
                                    })
                                    .collect::<Result<Vec<_>>>()
                            })
                        })
                        .collect();
                    let mut all = Vec::new();
                    for part in parts {
                        all.extend(
                            part.join()
                                .map_err(|_| Error::internal("signing thread panicked"))??,
                        );
                    }
                    Ok::<_, Error>(all)
                })
            })
            .await
            .map_err(|e| Error::internal(format!("signing intents: {e}")))??;
            // A payment service multiplexes its calls over a few HTTP/2 connections.
            let mut clients = Vec::new();
            for _ in 0..settings.connections.clamp(1, settings.concurrency) {
                clients.push(
                    Caller::connect(settings, Credential::role(&settings.certs, "service")).await?,
                );
            }
            for (i, requests) in signed.into_iter().enumerate() {
                work.push(Work::Verify {
                    client: clients[i % clients.len()].clone(),
                    requests,
                });
            }
        }
        Scenario::Enroll => {
            let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
                (0..64)
                    .map(|i| DeviceKey::generate().csr_der(&format!("bench-{i}")))
                    .collect::<Result<_>>()?,
            );
            let per_worker = (settings.max_requests / settings.concurrency as u64).clamp(1, 20_000);
            // The workers' tokens are created concurrently, as many calls in flight as the
            // run will have, so that a large run does not spend minutes on its set-up.
            let mut minting = tokio::task::JoinSet::new();
            for _ in 0..settings.concurrency {
                let service = service.clone();
                minting.spawn(async move {
                    let mut tokens = Vec::with_capacity(per_worker as usize);
                    for _ in 0..per_worker {
                        tokens.push(
                            service
                                .create_enrollment_token("bench-enroll", 0)
                                .await
                                .map_err(status_error)?
                                .token,
                        );
                    }
                    Ok::<_, Error>(tokens)
                });
            }
            let mut minted = Vec::with_capacity(settings.concurrency);
            while let Some(tokens) = minting.join_next().await {
                minted.push(
                    tokens.map_err(|e| Error::internal(format!("token task failed: {e}")))??,
                );
            }
            for tokens in minted {
                work.push(Work::Enroll {
                    client: Caller::connect(settings, Credential::None).await?,
                    tokens,
                    csrs: csrs.clone(),
                });
            }
        }
        Scenario::Token => {
            for _ in 0..settings.concurrency {
                work.push(Work::Token {
                    client: Caller::connect(settings, Credential::role(&settings.certs, "service"))
                        .await?,
                });
            }
        }
        Scenario::Status | Scenario::Ocsp => {
            let issuer = crate::ca::pki::read_certificate_der(&settings.certs.join("issuing.pem"))?;
            let mut serials = Vec::new();
            let mut requests = Vec::new();
            for i in 0..16 {
                let customer = format!("bench-{}-{i}", random_suffix());
                let (_, identity, der) =
                    enroll_device(settings, &service, &customer, &format!("{customer}-phone"))
                        .await?;
                serials.push(identity.serial);
                requests.push(ocsp_request(&issuer, &der)?);
            }
            let serials = Arc::new(serials);
            let requests = Arc::new(requests);
            let address = require_loopback("HTTP address", &settings.http)?;
            for _ in 0..settings.concurrency {
                work.push(match settings.scenario {
                    Scenario::Status => Work::Status {
                        client: Caller::connect(
                            settings,
                            Credential::role(&settings.certs, "service"),
                        )
                        .await?,
                        serials: serials.clone(),
                    },
                    _ => Work::Ocsp {
                        address,
                        requests: requests.clone(),
                    },
                });
            }
        }
    }
    Ok(work)
}

fn random_suffix() -> String {
    crate::model::Serial::random().to_hex()[..8].to_string()
}

/// Shared counters of a run.
struct Counters {
    started: AtomicBool,
    stop: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
    budget: AtomicU64,
}

impl Counters {
    /// Takes one request from the budget; false when the run must end.
    fn take(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    }
}

/// A keep-alive HTTP/1.1 POST of an OCSP request; returns true on a 200 answer.
async fn ocsp_post(
    stream: &mut BufReader<tokio::net::TcpStream>,
    body: &[u8],
) -> std::io::Result<bool> {
    let head = format!(
        "POST /ocsp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/ocsp-request\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.get_mut().write_all(head.as_bytes()).await?;
    stream.get_mut().write_all(body).await?;
    let mut status_line = String::new();
    stream.read_line(&mut status_line).await?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(status_line.starts_with("HTTP/1.1 200"))
}

/// What the bench reads from the server's `/metrics` before and after the measured window.
#[derive(Debug, Clone, Default, PartialEq)]
struct ServerReading {
    /// `process_cpu_seconds_total`.
    cpu_seconds: Option<f64>,
    /// Cumulative `payra_rpc_duration_seconds` buckets of one method, summed over its status
    /// codes: (upper bound in seconds, count), in the page's order (ascending, `+Inf` last).
    buckets: Vec<(f64, u64)>,
}

impl ServerReading {
    /// Parses a Prometheus text page for `method`'s latency buckets and the CPU counter.
    fn parse(page: &str, method: Option<&str>) -> ServerReading {
        let mut reading = ServerReading::default();
        for line in page.lines() {
            if let Some(value) = line.strip_prefix("process_cpu_seconds_total ") {
                reading.cpu_seconds = value.trim().parse().ok();
                continue;
            }
            let (Some(method), Some(rest)) = (
                method,
                line.strip_prefix("payra_rpc_duration_seconds_bucket{"),
            ) else {
                continue;
            };
            let Some((labels, count)) = parse_labels(rest) else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| value.as_str())
            };
            if label("method") != Some(method) {
                continue;
            }
            let (Some(le), Ok(count)) = (label("le"), count.trim().parse::<f64>()) else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(le) => le,
                    Err(_) => continue,
                }
            };
            match reading.buckets.iter_mut().find(|(bound, _)| *bound == le) {
                Some((_, total)) => *total += count as u64,
                None => reading.buckets.push((le, count as u64)),
            }
        }
        reading
            .buckets
            .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
        reading
    }

    /// The percentiles of what was observed between `before` and `self`.
    fn latency_since(&self, before: &ServerReading) -> Option<ServerLatency> {
        let counts: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .map(|&(le, after)| {
                let earlier = before
                    .buckets
                    .iter()
                    .find(|(bound, _)| *bound == le)
                    .map_or(0, |&(_, count)| count);
                (le, after.saturating_sub(earlier))
            })
            .collect();
        let requests = counts.last().map_or(0, |&(_, count)| count);
        if requests == 0 {
            return None;
        }
        let at_most = |p: f64| {
            let rank = (p * requests as f64).ceil().max(1.0) as u64;
            counts
                .iter()
                .find(|&&(_, count)| count >= rank)
                .and_then(|&(le, _)| le.is_finite().then(|| (le * 1e6).round() as u64))
        };
        Some(ServerLatency {
            requests,
            p50_us: at_most(0.50),
            p90_us: at_most(0.90),
            p99_us: at_most(0.99),
        })
    }
}

/// Splits `name="value",...} rest` (the part of a Prometheus text line after `{`) into its
/// labels, unescaping `\\`, `\"` and `\n` in values, and the rest of the line.
fn parse_labels(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// The RPC whose server-side latency a scenario reports.
fn rpc_method(scenario: Scenario) -> Option<&'static str> {
    match scenario {
        Scenario::Verify => Some("VerifyPayment"),
        Scenario::Enroll => Some("Enroll"),
        Scenario::Token => Some("CreateEnrollmentToken"),
        Scenario::Status => Some("GetCertificateStatus"),
        Scenario::Ocsp => None,
    }
}

/// Reads the server's `/metrics` page (at most 4 MiB, within 2 s).
async fn server_reading(http: SocketAddr, method: Option<&str>) -> Option<ServerReading> {
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(http).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut page = Vec::new();
        stream.take(4 << 20).read_to_end(&mut page).await.ok()?;
        Some(ServerReading::parse(
            &String::from_utf8_lossy(&page),
            method,
        ))
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

/// CPU used between two readings, in microseconds per request.
fn cpu_per_request(before: Option<f64>, after: Option<f64>, requests: u64) -> Option<f64> {
    match (before, after) {
        (Some(before), Some(after)) if requests > 0 && after >= before => {
            Some((after - before) * 1e6 / requests as f64)
        }
        _ => None,
    }
}

/// Open-loop pacing of one worker: its share of the rate, and its phase, so that the workers
/// send evenly spread requests rather than bursts in step.
#[derive(Clone, Copy)]
struct Pace {
    every: Duration,
    phase: Duration,
}

async fn run_worker(work: Work, counters: Arc<Counters>, pace: Option<Pace>) -> Vec<u32> {
    let mut latencies = Vec::new();
    let mut record = |started: Instant, ok: bool, counters: &Counters| {
        if counters.started.load(Ordering::Relaxed) {
            latencies.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
            counters.requests.fetch_add(1, Ordering::Relaxed);
            if !ok {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    match work {
        Work::Verify { client, requests } => {
            let began = Instant::now() + pace.map_or(Duration::ZERO, |p| p.phase);
            for (n, request) in requests.into_iter().enumerate() {
                if !counters.take() {
                    break;
                }
                let started = match pace {
                    Some(Pace { every, .. }) => {
                        let scheduled = began + every * n as u32;
                        if Instant::now() < scheduled {
                            tokio::time::sleep_until(scheduled.into()).await;
                            Instant::now()
                        } else {
                            scheduled
                        }
                    }
                    None => Instant::now(),
                };
                let answer = client.verify_payment(request).await;
                let ok = matches!(&answer, Ok(a) if a.verdict == proto::Verdict::Verified as i32);
                record(started, ok, &counters);
            }
        }
        Work::Enroll {
            client,
            tokens,
            csrs,
        } => {
            for (i, token) in tokens.into_iter().enumerate() {
                if !counters.take() {
                    break;
                }
                let request = proto::EnrollRequest {
                    token,
                    csr_der: csrs[i % csrs.len()].clone(),
                    // One key, one device: each reused CSR always enrolls its own device.
                    device_id: format!("bench-device-{}", i % csrs.len()),
                    device_info: None,
                };
                let started = Instant::now();
                let ok = client.enroll(request).await.is_ok();
                record(started, ok, &counters);
            }
        }
        Work::Token { client } => {
            while counters.take() {
                let request = proto::CreateEnrollmentTokenRequest {
                    customer_id: "bench-token".into(),
                    ttl_s: 0,
                };
                let started = Instant::now();
                let ok = client.create_enrollment_token(request).await.is_ok();
                record(started, ok, &counters);
            }
        }
        Work::Status { client, serials } => {
            let mut i = 0;
            while counters.take() {
                i += 1;
                let request = proto::GetCertificateStatusRequest {
                    serial: serials[i % serials.len()].clone(),
                };
                let started = Instant::now();
                let ok = client.certificate_status(request).await.is_ok();
                record(started, ok, &counters);
            }
        }
        Work::Ocsp { address, requests } => {
            let Ok(stream) = tokio::net::TcpStream::connect(address).await else {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                return latencies;
            };
            let _ = stream.set_nodelay(true);
            let mut stream = BufReader::new(stream);
            let mut i = 0;
            while counters.take() {
                i += 1;
                let started = Instant::now();
                let ok = ocsp_post(&mut stream, &requests[i % requests.len()])
                    .await
                    .unwrap_or(false);
                record(started, ok, &counters);
                if !ok {
                    break;
                }
            }
        }
    }
    latencies
}

fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    u64::from(sorted[index.min(sorted.len() - 1)])
}

/// Runs one benchmark.
pub async fn run(settings: BenchSettings) -> Result<BenchReport> {
    require_loopback("gRPC server", &settings.server)?;
    if settings.concurrency == 0 || settings.concurrency > 1024 {
        return Err(Error::invalid("concurrency", "must be 1 to 1024"));
    }
    if let Some(rate) = settings.rate {
        if settings.scenario != Scenario::Verify {
            return Err(Error::invalid(
                "rate",
                "open loop is offered for the verify scenario",
            ));
        }
        if !(1.0..=1_000_000.0).contains(&rate) {
            return Err(Error::invalid(
                "rate",
                "must be 1 to 1,000,000 requests per second",
            ));
        }
    }
    if settings.scenario == Scenario::Verify
        && settings.duration + settings.warmup > Duration::from_secs(100)
    {
        return Err(Error::invalid(
            "duration",
            "a verify run lasts at most 100 s with its warm-up: its intents are signed before \
             it starts and must stay inside the server's skew window (120 s by default)",
        ));
    }
    if settings.duration > Duration::from_secs(600) {
        return Err(Error::invalid("duration", "at most 600 s"));
    }
    let work = prepare(&settings).await?;
    let counters = Arc::new(Counters {
        started: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        budget: AtomicU64::new(settings.max_requests),
    });
    let every = settings
        .rate
        .map(|rate| Duration::from_secs_f64(settings.concurrency as f64 / rate));
    let handles: Vec<_> = work
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let pace = every.map(|every| Pace {
                every,
                phase: every.mul_f64(i as f64 / settings.concurrency as f64),
            });
            tokio::spawn(run_worker(w, counters.clone(), pace))
        })
        .collect();
    tokio::time::sleep(settings.warmup).await;
    let server_http = require_loopback("HTTP address", &settings.http).ok();
    let method = rpc_method(settings.scenario);
    let server_before = match server_http {
        Some(http) => server_reading(http, method).await,
        None => None,
    };
    let own_cpu_before = crate::metrics::process_cpu_seconds();
    counters.started.store(true, Ordering::Relaxed);
    let measured = Instant::now();
    let tick = Duration::from_millis(250);
    while measured.elapsed() < settings.duration
        && counters.budget.load(Ordering::Relaxed) > 0
        && !handles.iter().all(|h| h.is_finished())
    {
        tokio::time::sleep(tick.min(settings.duration.saturating_sub(measured.elapsed()))).await;
        if settings.progress {
            let done = measured.elapsed().as_secs_f64() / settings.duration.as_secs_f64();
            let filled = ((done.min(1.0)) * 30.0) as usize;
            eprint!(
                "\r[{}{}] {:>5.1}/{:.0} s {:>9} requests {:>6} errors",
                "#".repeat(filled),
                "-".repeat(30 - filled),
                measured.elapsed().as_secs_f64(),
                settings.duration.as_secs_f64(),
                counters.requests.load(Ordering::Relaxed),
                counters.errors.load(Ordering::Relaxed)
            );
        }
    }
    counters.stop.store(true, Ordering::Relaxed);
    let seconds = measured.elapsed().as_secs_f64();
    let requests = counters.requests.load(Ordering::Relaxed);
    let own_cpu_after = crate::metrics::process_cpu_seconds();
    let server_after = match server_http {
        Some(http) => server_reading(http, method).await,
        None => None,
    };
    let server_cpu = |reading: &Option<ServerReading>| reading.as_ref()?.cpu_seconds;
    let server_latency_at_most = match (&server_before, &server_after) {
        (Some(before), Some(after)) if method.is_some() => after.latency_since(before),
        _ => None,
    };
    if settings.progress {
        eprintln!();
    }
    let mut latencies = Vec::new();
    for handle in handles {
        if let Ok(mut l) = handle.await {
            latencies.append(&mut l);
        }
    }
    latencies.sort_unstable();
    // The raw rates are measured after the load, on an otherwise idle core of this machine.
    let (raw_verify_per_s, raw_sign_per_s) =
        tokio::task::spawn_blocking(|| raw_crypto_rates(Duration::from_secs(1)))
            .await
            .unwrap_or((0.0, 0.0));
    let throughput_per_s = requests as f64 / seconds;
    Ok(BenchReport {
        scenario: settings.scenario,
        client: settings.client,
        concurrency: settings.concurrency,
        seconds,
        requests,
        errors: counters.errors.load(Ordering::Relaxed),
        throughput_per_s,
        latency: Latency {
            p50_us: percentile(&latencies, 0.50),
            p90_us: percentile(&latencies, 0.90),
            p99_us: percentile(&latencies, 0.99),
            max_us: latencies.last().copied().map_or(0, u64::from),
        },
        raw_verify_per_s,
        raw_sign_per_s,
        ratio_to_raw_verify: if raw_verify_per_s > 0.0 {
            throughput_per_s / raw_verify_per_s
        } else {
            0.0
        },
        ratio_to_raw_sign: if raw_sign_per_s > 0.0 {
            throughput_per_s / raw_sign_per_s
        } else {
            0.0
        },
        server_cpu_us_per_request: cpu_per_request(
            server_cpu(&server_before),
            server_cpu(&server_after),
            requests,
        ),
        load_generator_cpu_us_per_request: cpu_per_request(own_cpu_before, own_cpu_after, requests),
        load_generator_core_share: match (own_cpu_before, own_cpu_after) {
            (Some(before), Some(after)) if seconds > 0.0 && after >= before => {
                Some((after - before) / seconds)
            }
            _ => None,
        },
        server_latency_at_most,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(verify: &[(&str, u64)], cpu: f64) -> String {
        let mut page =
            format!("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n");
        for (le, count) in verify {
            // Two status codes of one method are summed; another method is ignored.
            page.push_str(&format!(
                "payra_rpc_duration_seconds_bucket{{code=\"OK\",method=\"VerifyPayment\",le=\"{le}\"}} {count}\n\
                 payra_rpc_duration_seconds_bucket{{code=\"UNAVAILABLE\",method=\"VerifyPayment\",le=\"{le}\"}} 1\n\
                 payra_rpc_duration_seconds_bucket{{code=\"OK\",method=\"VerifyPayment,le=\\\"9\\\"\",le=\"{le}\"}} 7\n\
                 payra_rpc_duration_seconds_bucket{{code=\"OK\",method=\"Enroll\",le=\"{le}\"}} 999\n"
            ));
        }
        page
    }

    #[test]
    fn server_latency_comes_from_the_histogram_difference() {
        let before = ServerReading::parse(
            &page(
                &[("0.001", 10), ("0.005", 10), ("0.01", 10), ("+Inf", 10)],
                1.5,
            ),
            Some("VerifyPayment"),
        );
        assert_eq!(before.cpu_seconds, Some(1.5));
        assert_eq!(
            before.buckets,
            vec![(0.001, 11), (0.005, 11), (0.01, 11), (f64::INFINITY, 11)]
        );
        // 100 more: 50 within 1 ms, 40 more within 5 ms, 9 more within 10 ms, 1 beyond.
        let after = ServerReading::parse(
            &page(
                &[("0.001", 60), ("0.005", 100), ("0.01", 109), ("+Inf", 110)],
                2.0,
            ),
            Some("VerifyPayment"),
        );
        assert_eq!(
            after.latency_since(&before),
            Some(ServerLatency {
                requests: 100,
                p50_us: Some(1000),
                p90_us: Some(5000),
                p99_us: Some(10_000),
            })
        );
        // Past the largest finite bucket there is no bound to give.
        let slow = ServerReading::parse(
            &page(
                &[("0.001", 10), ("0.005", 10), ("0.01", 10), ("+Inf", 20)],
                2.0,
            ),
            Some("VerifyPayment"),
        );
        let latency = slow.latency_since(&before).unwrap();
        assert_eq!((latency.requests, latency.p50_us), (10, None));
        // Nothing observed in the window, or no method asked for: no latency.
        assert_eq!(before.latency_since(&before), None);
        let ocsp = ServerReading::parse(&page(&[("+Inf", 5)], 3.0), None);
        assert_eq!((ocsp.cpu_seconds, ocsp.buckets.len()), (Some(3.0), 0));
    }
}
