//! `payra bench populate`: certificate records written straight into a data directory.

use std::path::Path;

use payra::clock::SystemClock;

use super::args::*;
use crate::CliResult;

pub(crate) fn populate(
    data: Option<&Path>,
    store_url: Option<String>,
    records: u64,
    compress: bool,
) -> CliResult {
    use payra::bench::population;
    let now = payra::clock::Clock::now_s(&SystemClock);
    let started = std::time::Instant::now();
    let certificates = population::StandIns::new(now).map_err(|e| e.to_string())?;
    let population = population::PublicKeys::from(0)
        .zip(0..records)
        .filter_map(|(key, i)| population::record(i, &certificates, &key));
    let count = match (data, store_url) {
        (_, Some(url)) => {
            let config = payra::config::StoreConfig {
                backend: payra::config::Backend::Postgres,
                url: Some(url),
                ..Default::default()
            };
            payra::store::PgStore::connect(&config)
                .and_then(|store| store.danger_bulk_insert_certificates(population))
        }
        (Some(data), None) => payra::store::SledStore::open_with(data, compress)
            .and_then(|store| store.danger_bulk_insert_certificates(population)),
        (None, None) => return Err("name --data or --store-url".into()),
    }
    .map_err(|e| e.to_string())?;
    println!(
        "inserted {count} synthetic certificate records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `payra bench sizes`: a table of the trees, largest first.
pub(crate) fn sizes(data: &Path) -> CliResult {
    let store = payra::store::SledStore::open(data).map_err(|e| e.to_string())?;
    let (mut trees, on_disk) = store.tree_sizes().map_err(|e| e.to_string())?;
    trees.sort_by_key(|t| std::cmp::Reverse(t.key_bytes + t.value_bytes));
    let certificates = trees
        .iter()
        .find(|t| t.name == "certificates")
        .map_or(0, |t| t.entries);
    let per = |bytes: u64| match certificates {
        0 => "-".to_string(),
        n => format!("{:.0}", bytes as f64 / n as f64),
    };
    println!(
        "{:<24} {:>12} {:>14} {:>14} {:>12}",
        "tree", "entries", "key bytes", "value bytes", "per record"
    );
    let mut logical = 0;
    for tree in &trees {
        let bytes = tree.key_bytes + tree.value_bytes;
        logical += bytes;
        println!(
            "{:<24} {:>12} {:>14} {:>14} {:>12}",
            tree.name,
            tree.entries,
            tree.key_bytes,
            tree.value_bytes,
            per(bytes)
        );
    }
    println!(
        "{:<24} {:>12} {:>14} {:>14} {:>12}",
        "all trees",
        "",
        "",
        logical,
        per(logical)
    );
    println!(
        "{:<24} {:>12} {:>14} {:>14} {:>12}",
        "on disk (sled)",
        "",
        "",
        on_disk,
        per(on_disk)
    );
    Ok(())
}

/// `payra bench`.
pub(crate) async fn bench(args: BenchArgs) -> CliResult {
    match args {
        BenchArgs {
            command:
                Some(BenchCommand::Populate {
                    data,
                    store_url,
                    records,
                    compress,
                }),
            ..
        } => populate(data.as_deref(), store_url, records, compress),
        BenchArgs {
            command: Some(BenchCommand::Sizes { data }),
            ..
        } => sizes(&data),
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
            population,
            skew,
            batch,
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
                population,
                skew,
                batch,
            })
            .await
            .map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| e.to_string())?
                );
            } else {
                if report.batch > 1 {
                    println!(
                        "batches      {} payments per VerifyPayments call: requests, throughput \
                         and CPU are per payment, latency per call",
                        report.batch
                    );
                }
                println!(
                    "scenario {:?}, concurrency {}, {:.1} s: {} requests, {} errors",
                    report.scenario,
                    report.concurrency,
                    report.seconds,
                    report.requests,
                    report.errors
                );
                println!("throughput   {:.0} per s", report.throughput_per_s);
                if report.workers_ran_out > 0 {
                    println!(
                        "note         {} of {} workers ran out of prepared requests before \
                         the window closed: fewer calls were in flight at the end",
                        report.workers_ran_out, report.concurrency
                    );
                }
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
                if let Some(hit_rate) = report.cache_hit_rate {
                    println!("cache        {:.1} % of lookups hit", hit_rate * 100.0);
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
