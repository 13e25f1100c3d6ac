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

use crate::client::{Client, Credential};
use crate::error::{Error, Result};
use crate::wire::proto;

mod grpc;
pub mod population;
mod prepare;
mod server_side;

use prepare::prepare;
use server_side::{
    cpu_per_request, http_connect, ocsp_post, rpc_method, server_reading, ServerReading,
};

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
    /// Verify and enroll scenarios: the devices' key algorithm (P-256, or SM2 from the SM2
    /// issuing CA). The raw rates are then of the same algorithm.
    pub key_algorithm: crate::model::KeyAlgorithm,
    /// Verify and status scenarios: the devices of `payra bench populate` (this many, the
    /// first ones), instead of one enrolled per worker.
    pub population: Option<u64>,
    /// With `population`: 0 picks devices uniformly, otherwise by a Zipf law of this
    /// exponent.
    pub skew: f64,
    /// Verify scenario: payments per call. 1 sends VerifyPayment; 2 to 100 send
    /// VerifyPayments with this many payments each.
    pub batch: usize,
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
    /// The devices' key algorithm, and the raw rates' (`p256` or `sm2`).
    pub key_algorithm: &'static str,
    pub client: ClientKind,
    pub concurrency: usize,
    /// Payments per call (verify scenario; 1 for every other).
    pub batch: usize,
    pub seconds: f64,
    /// Requests answered in the measured window; with `batch` > 1, payments (each call
    /// counts its `batch` payments), so throughput and CPU per request are per payment.
    pub requests: u64,
    pub errors: u64,
    pub throughput_per_s: f64,
    /// Workers (verify, enroll) whose requests prepared before the run ran out before the
    /// window closed: the run then had fewer calls in flight than `concurrency`. Size the
    /// run with `--max-requests`, or shorten it.
    pub workers_ran_out: u64,
    /// Per call: with `batch` > 1, of a whole VerifyPayments call.
    pub latency: Latency,
    /// Raw single-core verifications per second, measured in this run: ECDSA P-256 (ring), or
    /// SM2 with SM3 (the sm2 crate, through the function VerifyPayment calls).
    pub raw_verify_per_s: f64,
    /// Raw single-core signatures per second of the same algorithm, measured in this run.
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
    /// The share of the server's certificate cache lookups during the run that hit.
    pub cache_hit_rate: Option<f64>,
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

/// Raw single-core (verify, sign) rates of this binary's implementation of `algorithm`, as
/// the server uses it, each measured for `window`.
pub fn raw_rates_of(algorithm: crate::model::KeyAlgorithm, window: Duration) -> (f64, f64) {
    match algorithm {
        crate::model::KeyAlgorithm::P256 => raw_crypto_rates(window),
        crate::model::KeyAlgorithm::Sm2 => raw_sm2_rates(window),
    }
}

/// Raw single-core rates of SM2 with SM3 (the sm2 crate): signing as
/// [`crate::client::Sm2DeviceKey`] signs, verifying with [`crate::ca::sm2::verify`], the
/// function VerifyPayment calls (it parses the point and computes Z_A each time, as the
/// server does).
pub fn raw_sm2_rates(window: Duration) -> (f64, f64) {
    let key = crate::client::Sm2DeviceKey::generate();
    let message = b"payra.v1.PaymentIntent\nbenchmark message of a typical intent size, about a hundred bytes long";
    let start = Instant::now();
    let mut signs = 0u64;
    let mut signature = Vec::new();
    while start.elapsed() < window {
        signature = key.sign_intent(message);
        signs += 1;
    }
    let sign_rate = signs as f64 / start.elapsed().as_secs_f64();
    let signed = crate::ra::signature::signed_message(message);
    let point = key.public_point();
    let start = Instant::now();
    let mut verifies = 0u64;
    while start.elapsed() < window {
        let _ = crate::ca::sm2::verify(&point, &signed, &signature);
        verifies += 1;
    }
    let verify_rate = verifies as f64 / start.elapsed().as_secs_f64();
    (verify_rate, sign_rate)
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
        /// Payments per call: 1 sends VerifyPayment, more send VerifyPayments.
        batch: usize,
    },
    Enroll {
        client: Caller,
        /// One per enrollment, as phones enroll: a token, and a CSR of a key of its own for
        /// a device of its own (both made before the run).
        enrollments: Vec<(String, Vec<u8>, String)>,
    },
    Token {
        client: Caller,
    },
    Status {
        client: Caller,
        serials: Arc<Vec<String>>,
        /// Devices of `payra bench populate` to pick from instead of `serials`.
        population: Option<Arc<population::Chooser>>,
    },
    Ocsp {
        address: SocketAddr,
        requests: Arc<Vec<bytes::Bytes>>,
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

    async fn verify_payments(
        &self,
        request: proto::VerifyPaymentsRequest,
    ) -> std::result::Result<proto::VerifyPaymentsResponse, CallError> {
        match self {
            Caller::Lean(c) => {
                c.unary("/payra.v1.Verification/VerifyPayments", &request)
                    .await
            }
            Caller::Tonic(c) => tonic_answer(c.verification().verify_payments(request).await),
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

/// Shared counters of a run.
struct Counters {
    started: AtomicBool,
    stop: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
    budget: AtomicU64,
    /// Workers whose prepared requests ran out before the run ended.
    ran_out: AtomicU64,
}

impl Counters {
    /// Counts a worker that ended because its prepared requests ran out (`ran_out`) while
    /// the run went on.
    fn note_ran_out(&self, ran_out: bool) {
        if ran_out && !self.stop.load(Ordering::Relaxed) {
            self.ran_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes one request from the budget; false when the run must end.
    fn take(&self) -> bool {
        self.take_many(1)
    }

    /// Takes `n` requests (a batch's payments) from the budget; false when the run must end.
    fn take_many(&self, n: u64) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(n)
            })
            .is_ok()
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
    // One latency per call; `answered` requests (a batch's payments) of which `failed` failed.
    let mut record_many = |started: Instant, answered: u64, failed: u64, counters: &Counters| {
        if counters.started.load(Ordering::Relaxed) {
            latencies.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
            counters.requests.fetch_add(answered, Ordering::Relaxed);
            counters.errors.fetch_add(failed, Ordering::Relaxed);
        }
    };
    let mut record = |started: Instant, ok: bool, counters: &Counters| {
        record_many(started, 1, u64::from(!ok), counters)
    };
    match work {
        Work::Verify {
            client,
            requests,
            batch,
        } => {
            let began = Instant::now() + pace.map_or(Duration::ZERO, |p| p.phase);
            let mut requests = requests.into_iter();
            let mut ran_out = true;
            for n in 0.. {
                let mut payments: Vec<_> = requests.by_ref().take(batch).collect();
                if payments.is_empty() {
                    break;
                }
                if !counters.take_many(payments.len() as u64) {
                    ran_out = false;
                    break;
                }
                let started = match pace {
                    Some(Pace { every, .. }) => {
                        let scheduled = began + every * n;
                        if Instant::now() < scheduled {
                            tokio::time::sleep_until(scheduled.into()).await;
                            Instant::now()
                        } else {
                            scheduled
                        }
                    }
                    None => Instant::now(),
                };
                let verified =
                    |a: &proto::VerifyPaymentResponse| a.verdict == proto::Verdict::Verified as i32;
                let sent = payments.len() as u64;
                let failed = if batch == 1 {
                    let Some(payment) = payments.pop() else {
                        break;
                    };
                    let answer = client.verify_payment(payment).await;
                    u64::from(!matches!(&answer, Ok(a) if verified(a)))
                } else {
                    let answer = client
                        .verify_payments(proto::VerifyPaymentsRequest { payments })
                        .await;
                    let ok = answer.map_or(0, |a| {
                        a.results
                            .iter()
                            .filter(|r| {
                                matches!(
                                    &r.result,
                                    Some(proto::verify_payment_result::Result::Decision(d))
                                        if verified(d)
                                )
                            })
                            .count() as u64
                    });
                    sent - ok.min(sent)
                };
                record_many(started, sent, failed, &counters);
            }
            counters.note_ran_out(ran_out);
        }
        Work::Enroll {
            client,
            enrollments,
        } => {
            let mut ran_out = true;
            for (token, csr_der, device_id) in enrollments {
                if !counters.take() {
                    ran_out = false;
                    break;
                }
                let request = proto::EnrollRequest {
                    token,
                    csr_der,
                    device_id,
                    device_info: None,
                    attestation: None,
                };
                let started = Instant::now();
                let ok = client.enroll(request).await.is_ok();
                record(started, ok, &counters);
            }
            counters.note_ran_out(ran_out);
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
        Work::Status {
            client,
            serials,
            population,
        } => {
            let mut i = 0;
            while counters.take() {
                i += 1;
                let serial = match &population {
                    Some(chooser) => {
                        population::serial(chooser.pick(&mut rand::thread_rng())).to_hex()
                    }
                    None => serials[i % serials.len()].clone(),
                };
                let request = proto::GetCertificateStatusRequest { serial };
                let started = Instant::now();
                let ok = client.certificate_status(request).await.is_ok();
                record(started, ok, &counters);
            }
        }
        Work::Ocsp { address, requests } => {
            let Ok(mut connection) = http_connect(address).await else {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                return latencies;
            };
            let mut i = 0;
            while counters.take() {
                i += 1;
                let started = Instant::now();
                let ok = ocsp_post(&mut connection, requests[i % requests.len()].clone())
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
    if !(1..=crate::ra::MAX_BATCH_PAYMENTS).contains(&settings.batch)
        || (settings.batch > 1 && settings.scenario != Scenario::Verify)
    {
        return Err(Error::invalid(
            "batch",
            format!(
                "must be 1 to {} payments per call, and above 1 only for the verify scenario",
                crate::ra::MAX_BATCH_PAYMENTS
            ),
        ));
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
        ran_out: AtomicU64::new(0),
    });
    // Each worker's calls carry `batch` requests, so it calls `batch` times less often.
    let every = settings.rate.map(|rate| {
        Duration::from_secs_f64(settings.concurrency as f64 * settings.batch as f64 / rate)
    });
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
    let method = rpc_method(settings.scenario, settings.batch);
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
    // Both read when the window closes: calls answered later are in neither.
    let requests = counters.requests.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    let workers_ran_out = counters.ran_out.load(Ordering::Relaxed);
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
    let cache_hit_rate = match (&server_before, &server_after) {
        (Some(before), Some(after)) => after.cache_hit_rate_since(before),
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
    let algorithm = settings.key_algorithm;
    let (raw_verify_per_s, raw_sign_per_s) =
        tokio::task::spawn_blocking(move || raw_rates_of(algorithm, Duration::from_secs(1)))
            .await
            .unwrap_or((0.0, 0.0));
    let throughput_per_s = requests as f64 / seconds;
    Ok(BenchReport {
        scenario: settings.scenario,
        key_algorithm: settings.key_algorithm.name(),
        client: settings.client,
        concurrency: settings.concurrency,
        batch: settings.batch,
        seconds,
        requests,
        errors,
        workers_ran_out,
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
        cache_hit_rate,
    })
}
