//! Prometheus metrics of one running payra. Counters are updated where things happen (the
//! RPC layer, the RA); gauges that describe state (certificates by status, CRL age) are
//! computed when `/metrics` is scraped.

use crate::sync::Unpoisoned;
use prometheus::{
    Counter, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All of payra's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    pub rpc_requests: IntCounterVec,
    pub rpc_latency: HistogramVec,
    pub certificates_issued: IntCounterVec,
    pub certificates_revoked: IntCounterVec,
    pub verifications: IntCounterVec,
    /// Payments of VerifyPayments batches answered with an error instead of a decision, by
    /// gRPC code (the call itself is OK).
    pub batch_payment_errors: IntCounterVec,
    pub reservations: IntCounterVec,
    pub certificates: IntGaugeVec,
    pub crl_age_seconds: IntGauge,
    pub crl_number: IntGauge,
    pub storage_syncs: IntGauge,
    pub decision_log_records: IntGauge,
    pub decision_log_bytes: IntGauge,
    pub replay_nonces: IntGauge,
    pub build_info: IntGaugeVec,
    pub ocsp_responses: IntCounterVec,
    pub enroll_throttled: IntCounter,
    /// Certificate cache lookups by result (hit, miss), evictions, and what it holds.
    pub certificate_cache_lookups: IntCounterVec,
    pub certificate_cache_evictions: IntCounter,
    pub certificate_cache_entries: IntGauge,
    pub certificate_cache_bytes: IntGauge,
    /// Calls to the upstream CA (RA mode) by operation (sign, revoke) and outcome.
    pub upstream_requests: IntCounterVec,
    /// Revocations payra has made that the upstream CA has not confirmed yet.
    pub upstream_revocations_pending: IntGauge,
    /// Enrollment attestations by platform and outcome (a security level, or `refused`).
    pub attestations: IntCounterVec,
    pub attestation_status_entries: IntGauge,
    pub attestation_status_age_seconds: IntGauge,
    pub renewals_refused: IntCounter,
    pub connections_open: IntGaugeVec,
    pub ready: IntGauge,
    pub certificate_not_after: IntGaugeVec,
    pub data_dir_free_bytes: IntGauge,
    pub connections_refused: IntCounterVec,
    /// User plus system CPU time of this process, brought up to date at each scrape (under
    /// the lock, so that overlapping scrapes do not both add the same time).
    process_cpu_seconds: std::sync::Mutex<Counter>,
}

/// User plus system CPU time this process has used, from `/proc/self/stat` (Linux; `None`
/// elsewhere or if it cannot be read). The kernel reports it in ticks of `USER_HZ`, which is
/// 100 on every Linux architecture payra builds for.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain numbers.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_ascii_whitespace();
    // Fields 14 and 15 of the line are utime and stime: 11 and 12 after the command name.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    // Names are fixed and distinct, so registration cannot collide; a failure would be a
    // programming error caught by the metrics test.
    let _ = registry.register(Box::new(metric.clone()));
    metric
}

impl Metrics {
    /// A fresh set of metrics.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // These constructors fail only on invalid names or label sets, which are constants.
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let gauge = |name: &str, help: &str| {
            IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        Metrics {
            rpc_requests: register(
                &registry,
                counter_vec(
                    "payra_rpc_requests_total",
                    "gRPC requests by method and status code",
                    &["method", "code"],
                ),
            ),
            rpc_latency: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new("payra_rpc_duration_seconds", "gRPC latency by method")
                        // Fine below 10 ms, where the latency targets are.
                        .buckets(vec![
                            0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005,
                            0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        ]),
                    &["method", "code"],
                )
                .unwrap_or_else(|e| panic!("metric payra_rpc_duration_seconds: {e}")),
            ),
            certificates_issued: register(
                &registry,
                counter_vec(
                    "payra_certificates_issued_total",
                    "certificates issued, by kind (enroll, renew, client)",
                    &["kind"],
                ),
            ),
            certificates_revoked: register(
                &registry,
                counter_vec(
                    "payra_certificates_revoked_total",
                    "certificates revoked, by reason",
                    &["reason"],
                ),
            ),
            verifications: register(
                &registry,
                counter_vec(
                    "payra_verifications_total",
                    "VerifyPayment (alone or in VerifyPayments batches) and QualifyTransaction \
                     decisions by verdict and tier",
                    &["verdict", "tier"],
                ),
            ),
            batch_payment_errors: register(
                &registry,
                counter_vec(
                    "payra_batch_payment_errors_total",
                    "payments of VerifyPayments batches answered with an error instead of a \
                     decision, by gRPC code",
                    &["code"],
                ),
            ),
            upstream_requests: register(
                &registry,
                counter_vec(
                    "payra_upstream_requests_total",
                    "calls to the upstream CA (RA mode) by operation (sign, revoke) and outcome \
                     (ok, unreachable, refused, mismatch)",
                    &["operation", "outcome"],
                ),
            ),
            upstream_revocations_pending: register(
                &registry,
                gauge(
                    "payra_upstream_revocations_pending",
                    "revocations (and orphaned certificates) the upstream CA has not confirmed yet",
                ),
            ),
            attestations: register(
                &registry,
                counter_vec(
                    "payra_enrollment_attestations_total",
                    "enrollment key attestations by platform and outcome (security level or refused)",
                    &["platform", "outcome"],
                ),
            ),
            attestation_status_entries: register(
                &registry,
                gauge(
                    "payra_attestation_status_entries",
                    "entries in the attestation status list in use (absent without a status file)",
                ),
            ),
            attestation_status_age_seconds: register(
                &registry,
                gauge(
                    "payra_attestation_status_age_seconds",
                    "seconds since the attestation status file in use was modified",
                ),
            ),
            reservations: register(
                &registry,
                counter_vec(
                    "payra_ledger_reservations_total",
                    "ledger reservations by outcome (reserved, over_limit, released)",
                    &["outcome"],
                ),
            ),
            certificates: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("payra_certificates", "device certificates by status"),
                    &["status"],
                )
                .unwrap_or_else(|e| panic!("metric payra_certificates: {e}")),
            ),
            crl_age_seconds: register(
                &registry,
                gauge(
                    "payra_crl_age_seconds",
                    "seconds since the current CRL was signed (the older one, with an SM2 CRL)",
                ),
            ),
            crl_number: register(
                &registry,
                gauge("payra_crl_number", "number of the current CRL"),
            ),
            storage_syncs: register(
                &registry,
                gauge(
                    "payra_storage_syncs",
                    "durable syncs since start (group commit: fewer than writes under load)",
                ),
            ),
            decision_log_records: register(
                &registry,
                gauge(
                    "payra_decision_log_records",
                    "records in the decision log (the last record number)",
                ),
            ),
            decision_log_bytes: register(
                &registry,
                gauge(
                    "payra_decision_log_bytes",
                    "bytes of the decision log's segment files (never pruned yet: watch the disk)",
                ),
            ),
            replay_nonces: register(
                &registry,
                gauge(
                    "payra_replay_nonces",
                    "claimed (certificate, nonce) pairs held in memory to refuse replays",
                ),
            ),
            build_info: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("payra_build_info", "build information; the value is 1"),
                    &["version"],
                )
                .unwrap_or_else(|e| panic!("metric payra_build_info: {e}")),
            ),
            ocsp_responses: register(
                &registry,
                counter_vec(
                    "payra_ocsp_responses_total",
                    "OCSP answers by source (cache, signed, error)",
                    &["source"],
                ),
            ),
            certificate_cache_lookups: register(
                &registry,
                counter_vec(
                    "payra_certificate_cache_lookups_total",
                    "certificate cache lookups (VerifyPayment, GetCertificateStatus) by result: \
                     hit, or miss (read from the store)",
                    &["result"],
                ),
            ),
            certificate_cache_evictions: register(
                &registry,
                IntCounter::new(
                    "payra_certificate_cache_evictions_total",
                    "certificates evicted from the cache to keep it within verification.cache_bytes",
                )
                .unwrap_or_else(|e| panic!("metric payra_certificate_cache_evictions_total: {e}")),
            ),
            certificate_cache_entries: register(
                &registry,
                gauge(
                    "payra_certificate_cache_entries",
                    "certificates in the cache",
                ),
            ),
            certificate_cache_bytes: register(
                &registry,
                gauge(
                    "payra_certificate_cache_bytes",
                    "bytes the cached certificates take, as verification.cache_bytes counts them",
                ),
            ),
            enroll_throttled: register(
                &registry,
                IntCounter::new(
                    "payra_enroll_throttled_total",
                    "Enroll calls refused by the per-peer failure limit",
                )
                .unwrap_or_else(|e| panic!("metric payra_enroll_throttled_total: {e}")),
            ),
            connections_open: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "payra_connections_open",
                        "connections admitted and not yet closed, by listener",
                    ),
                    &["listener"],
                )
                .unwrap_or_else(|e| panic!("metric payra_connections_open: {e}")),
            ),
            ready: register(
                &registry,
                gauge(
                    "payra_ready",
                    "1 when the store takes a durable write and the CA key signs (as /readyz), \
                     else 0; checked at each scrape",
                ),
            ),
            certificate_not_after: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "payra_certificate_not_after_seconds",
                        "notAfter (Unix seconds) of payra's own certificates: root, issuing, server",
                    ),
                    &["certificate"],
                )
                .unwrap_or_else(|e| panic!("metric payra_certificate_not_after_seconds: {e}")),
            ),
            data_dir_free_bytes: register(
                &registry,
                gauge(
                    "payra_data_dir_free_bytes",
                    "bytes available to payra on the data directory's file system",
                ),
            ),
            renewals_refused: register(
                &registry,
                IntCounter::new(
                    "payra_renewals_refused_total",
                    "Renew calls refused by the per-lineage daily limit",
                )
                .unwrap_or_else(|e| panic!("metric payra_renewals_refused_total: {e}")),
            ),
            connections_refused: register(
                &registry,
                counter_vec(
                    "payra_connections_refused_total",
                    "Connections closed before serving, by listener and reason \
                     (per_address_limit, handshake_timeout, handshake_failed)",
                    &["listener", "reason"],
                ),
            ),
            process_cpu_seconds: std::sync::Mutex::new(register(
                &registry,
                Counter::new(
                    "process_cpu_seconds_total",
                    "User and system CPU time of the payra process",
                )
                .unwrap_or_else(|e| panic!("metric process_cpu_seconds_total: {e}")),
            )),
            registry,
        }
        .with_build_info()
        .with_upstream_outcomes()
    }

    /// Every upstream call outcome starts at zero, so rates and alerts work from the first
    /// scrape (and the families are there in local mode too).
    fn with_upstream_outcomes(self) -> Metrics {
        for (operation, outcomes) in [
            ("sign", &["ok", "unreachable", "mismatch"][..]),
            ("revoke", &["ok", "unreachable", "refused"][..]),
        ] {
            for outcome in outcomes {
                self.upstream_requests
                    .with_label_values(&[operation, outcome]);
            }
        }
        self
    }

    fn with_build_info(self) -> Metrics {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        self
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        {
            let counter = self.process_cpu_seconds.lock().unpoisoned();
            if let Some(total) = process_cpu_seconds() {
                let behind = total - counter.get();
                if behind > 0.0 {
                    counter.inc_by(behind);
                }
            }
        }
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
