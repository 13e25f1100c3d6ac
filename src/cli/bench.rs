//! `payra bench populate`: certificate records written straight into a data directory.

use std::path::Path;

use payra::clock::SystemClock;

use super::args::*;
use crate::CliResult;

pub(crate) fn populate(data: &Path, records: u64) -> CliResult {
    use payra::model::{CustomerId, DeviceId};
    use payra::store::{CertificateRecord, RECORD_VERSION};
    let store = payra::store::SledStore::open(data).map_err(|e| e.to_string())?;
    // One real-looking record, varied in serial, customer, device and key.
    let certificate_b64 = CertificateRecord::encode_der(&[0x30; 620]);
    let now = payra::clock::Clock::now_s(&SystemClock);
    let started = std::time::Instant::now();
    let make = |i: u64| -> Option<CertificateRecord> {
        Some(CertificateRecord {
            version: RECORD_VERSION,
            serial: ascending_serial(i),
            customer_id: CustomerId::parse("customer_id", &format!("cust-{}", i / 2)).ok()?,
            device_id: DeviceId::parse("device_id", &format!("dev-{i}")).ok()?,
            device_info: Default::default(),
            subject: format!("CN={:032x},O=payra device", i),
            not_before_s: now - 300,
            not_after_s: now + 365 * 86_400,
            issued_at_s: now,
            public_key_hex: synthetic_key_hex(i),
            key_algorithm: Default::default(),
            certificate_b64: certificate_b64.clone(),
            revocation: None,
            renewed_from: None,
            superseded_by: None,
            subscriber_ref: Some(format!("{i:032x}")),
            attestation: None,
            issued_upstream: false,
        })
    };
    let count = store
        .danger_bulk_insert_certificates((0..records).filter_map(make))
        .map_err(|e| e.to_string())?;
    println!(
        "inserted {count} synthetic certificate records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A distinct 65-octet uncompressed key for record `i` (not a curve point: no payment is
/// verified against a populated record). One key for every record would make the cache's
/// index of key holders one list of millions, which production never sees: a key belongs to
/// one device.
fn synthetic_key_hex(i: u64) -> String {
    use sha2::Digest;
    let x = sha2::Sha256::digest(i.to_be_bytes());
    let y = sha2::Sha256::digest(x);
    format!("04{}{}", hex::encode(x), hex::encode(y))
}

/// The `i`th of a run of ascending serials, as `Serial::time_ordered` makes them in
/// production: 16 octets, `0x40` first, then `i` big-endian. Random serials made sled take
/// the inserts at random places in its trees: 1M records then took 77 s, 3.5 GB of peak RSS
/// and 5.7 GB of disk, against 35 s, 0.57 GB and 3.0 GB in order.
fn ascending_serial(i: u64) -> payra::model::Serial {
    let mut bytes = [0u8; 16];
    bytes[0] = 0x40;
    bytes[8..].copy_from_slice(&i.to_be_bytes());
    payra::model::Serial::from_bytes("serial", &bytes)
        .unwrap_or_else(|_| payra::model::Serial::random())
}

/// `payra bench`.
pub(crate) async fn bench(args: BenchArgs) -> CliResult {
    match args {
        BenchArgs {
            command: Some(BenchCommand::Populate { data, records }),
            ..
        } => populate(&data, records),
        BenchArgs {
            command: None,
            scenario: None,
            ..
        } => Err("name a --scenario, or the populate command".into()),
        BenchArgs {
            command: None,
            scenario: Some(scenario),
            concurrency,
            duration_s,
            warmup_s,
            max_requests,
            rate,
            connections,
            client,
            reserve,
            key_algorithm,
            http,
            json,
            connection,
        } => {
            use payra::bench::{run as run_bench, BenchSettings, ClientKind, Scenario};
            let report = run_bench(BenchSettings {
                scenario: match scenario {
                    BenchScenario::Verify => Scenario::Verify,
                    BenchScenario::Enroll => Scenario::Enroll,
                    BenchScenario::Token => Scenario::Token,
                    BenchScenario::Status => Scenario::Status,
                    BenchScenario::Ocsp => Scenario::Ocsp,
                },
                server: connection.server.clone(),
                http,
                certs: connection.certs.clone(),
                concurrency,
                duration: std::time::Duration::from_secs(duration_s),
                warmup: std::time::Duration::from_secs(warmup_s),
                max_requests,
                rate,
                connections,
                client: match client {
                    BenchClient::Lean => ClientKind::Lean,
                    BenchClient::Tonic => ClientKind::Tonic,
                },
                progress: !json,
                reserve,
                key_algorithm: match key_algorithm {
                    BenchKeyAlgorithm::P256 => payra::model::KeyAlgorithm::P256,
                    BenchKeyAlgorithm::Sm2 => payra::model::KeyAlgorithm::Sm2,
                },
            })
            .await
            .map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "scenario {:?}, concurrency {}, {:.1} s: {} requests, {} errors",
                    report.scenario,
                    report.concurrency,
                    report.seconds,
                    report.requests,
                    report.errors
                );
                println!("throughput   {:.0} per s", report.throughput_per_s);
                println!(
                    "latency      p50 {} us, p90 {} us, p99 {} us, max {} us",
                    report.latency.p50_us,
                    report.latency.p90_us,
                    report.latency.p99_us,
                    report.latency.max_us
                );
                println!(
                    "raw {:<8} verify {:.0} per s, sign {:.0} per s (one core, {})",
                    report.key_algorithm,
                    report.raw_verify_per_s,
                    report.raw_sign_per_s,
                    match report.key_algorithm {
                        "sm2" => "the sm2 crate",
                        _ => "ring",
                    }
                );
                println!(
                    "ratio        {:.2} x raw verify, {:.2} x raw sign",
                    report.ratio_to_raw_verify, report.ratio_to_raw_sign
                );
                let per_request = |cpu: Option<f64>| {
                    cpu.map_or("unknown".to_string(), |us| format!("{us:.1} us"))
                };
                println!(
                    "CPU/request  server {}, load generator {}",
                    per_request(report.server_cpu_us_per_request),
                    per_request(report.load_generator_cpu_us_per_request)
                );
                if let Some(share) = report.load_generator_core_share {
                    let note = if share >= 0.9 {
                        " (near a full core: the generator may be what limits this run)"
                    } else {
                        ""
                    };
                    println!("generator    {:.0} % of one core{note}", share * 100.0);
                }
                if let Some(server) = &report.server_latency_at_most {
                    let bound = |us: Option<u64>| {
                        us.map_or("above the last bucket".to_string(), |us| {
                            format!("<= {us} us")
                        })
                    };
                    println!(
                        "server side  p50 {}, p90 {}, p99 {} (its histogram's buckets; {} RPCs)",
                        bound(server.p50_us),
                        bound(server.p90_us),
                        bound(server.p99_us),
                        server.requests
                    );
                }
            }
            Ok(())
        }
    }
}
