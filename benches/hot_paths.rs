//! Micro-benchmarks of payra's hot functions: signature verification (ring, and p256 for
//! comparison), the tier engine, device-certificate issuance, the CRL build, the durable
//! decision write, the ledger's daily sweep, and the replay set's claim. Run: `cargo bench --bench hot_paths`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use payra::ca::{
    build_crl, init_dev_pki, issue_device_certificate, CaMaterial, CrlEntry, DeviceProfile,
};
use payra::client::DeviceKey;
use payra::model::{CustomerId, Factor, FactorCategory, RevocationReason, Scene, Serial, Tier};
use payra::ra::signature::{signed_message, verify_intent_signature};
use payra::ra::tiers::decide_tier;
use payra::store::sled::replay::{Claim, Moment, ReplayGuard};
use payra::store::{
    ledger_key, Actor, AuditEvent, Books, DecisionLog, EvidenceRecord, LedgerCheckpoint, LogRecord,
    RECORD_VERSION,
};

fn signatures(c: &mut Criterion) {
    let key = DeviceKey::generate();
    let public = key.secret().public_key().to_sec1_bytes().to_vec();
    let intent = vec![7u8; 120];
    let der = key.sign_intent(&intent);
    c.bench_function("verify_intent_signature (ring)", |b| {
        b.iter(|| {
            assert!(verify_intent_signature(
                black_box(&public),
                black_box(&intent),
                black_box(&der)
            ))
        })
    });
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&public).unwrap();
    let signature = p256::ecdsa::Signature::from_der(&der).unwrap();
    c.bench_function("verify (p256 crate, for comparison)", |b| {
        use p256::ecdsa::signature::Verifier;
        b.iter(|| {
            verifying
                .verify(&signed_message(black_box(&intent)), &signature)
                .unwrap()
        })
    });
}

/// SM2 with SM3 and the default distinguishing id (the `sm2` crate) beside P-256 (ring and
/// the `p256` crate), over the same prefixed 120-byte intent, in one run.
fn sm2_beside_p256(c: &mut Criterion) {
    use p256::ecdsa::signature::{Signer, Verifier};
    let message = signed_message(&[7u8; 120]);
    let p256_key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    c.bench_function("sign (p256 crate)", |b| {
        b.iter(|| -> p256::ecdsa::Signature { p256_key.sign(black_box(&message)) })
    });
    let secret = sm2::SecretKey::random(&mut rand::rngs::OsRng);
    let sm2_key = sm2::dsa::SigningKey::new("1234567812345678", &secret).unwrap();
    c.bench_function("SM2 sign (sm2 crate)", |b| {
        b.iter(|| -> sm2::dsa::Signature { sm2_key.sign(black_box(&message)) })
    });
    let signature: sm2::dsa::Signature = sm2_key.sign(&message);
    let verifying = sm2_key.verifying_key().clone();
    c.bench_function("SM2 verify (sm2 crate)", |b| {
        b.iter(|| verifying.verify(black_box(&message), &signature).unwrap())
    });
}

fn tiers(c: &mut Criterion) {
    let factors = vec![
        Factor {
            category: FactorCategory::Knowledge,
            method: "payment_pin".into(),
        },
        Factor {
            category: FactorCategory::Possession,
            method: "sms_otp".into(),
        },
    ];
    c.bench_function("decide_tier", |b| {
        b.iter(|| {
            decide_tier(
                black_box(payra::attestation::CertificateFactor::Certificate),
                black_box(&factors),
                black_box(Scene::InApp),
            )
        })
    });
}

fn issuance_and_crl(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    init_dev_pki(dir.path(), false).unwrap();
    let ca = CaMaterial::load(dir.path(), None).unwrap();
    let profile = DeviceProfile {
        validity_s: 365 * 86_400,
        backdate_s: 300,
        crl_url: "http://127.0.0.1:8080/crl".into(),
        ocsp_url: "http://127.0.0.1:8080/ocsp".into(),
        issuer_not_after_s: ca.issuing_not_after_s,
    };
    let csr = DeviceKey::generate().csr_der("d").unwrap();
    let subscriber = payra::ca::SubscriberRef::random();
    c.bench_function("parse CSR + issue device certificate", |b| {
        b.iter(|| {
            let key = payra::ca::parse_device_csr(black_box(&csr)).unwrap();
            issue_device_certificate(
                &ca.issuer,
                &profile,
                &key,
                &Serial::random(),
                &subscriber,
                1_800_000_000,
            )
            .unwrap()
        })
    });
    let entries: Vec<CrlEntry> = (0..100_000)
        .map(|_| CrlEntry {
            serial: Serial::random(),
            revoked_at_s: 1_800_000_000,
            reason: RevocationReason::KeyCompromise,
        })
        .collect();
    let mut group = c.benchmark_group("crl");
    group.sample_size(10);
    group.bench_function("build CRL with 100,000 entries", |b| {
        b.iter(|| {
            build_crl(
                &ca.issuer,
                &ca.issuing_key_id,
                1,
                1_800_000_000,
                1_800_086_400,
                black_box(&entries),
            )
            .unwrap()
        })
    });
    group.finish();
}

/// A typical decision record: a 120-byte intent, a DER signature, a nonce and the audit line.
fn decision_json(id: String) -> Vec<u8> {
    let evidence = EvidenceRecord {
        version: RECORD_VERSION,
        evidence_id: id.clone(),
        kind: "verify_payment".into(),
        recorded_at_ms: 0,
        certificate_serial: Some(Serial::random()),
        customer_id: None,
        intent_b64: "A".repeat(160),
        signature_b64: "B".repeat(96),
        verdict: "VERIFIED".into(),
        reason: String::new(),
        tier: Tier::A,
        categories: vec![FactorCategory::Knowledge, FactorCategory::Possession],
        factors: vec![],
        amount_fen: 100,
        reserved_fen: 0,
        day: "2026-11-25".into(),
        released_at_ms: None,
        certificate_factor_note: None,
    };
    let record = LogRecord::Decision {
        audit: AuditEvent::new(0, &Actor::system(), "payment.verified", id, "VERIFIED"),
        evidence: Box::new(evidence),
        nonce: Some((hex::encode([7u8; 40]), 1)),
    };
    serde_json::to_vec(&record).unwrap()
}

fn open_log(dir: &std::path::Path) -> DecisionLog {
    DecisionLog::open(dir, LedgerCheckpoint::default(), 0, 1, &mut |_, _| {}).unwrap()
}

/// One decision appended and made durable, alone: the full cost of one fdatasync.
fn durable_decision(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let mut n = 0u64;
    c.bench_function("decision log append + fdatasync, 1 writer", |b| {
        b.iter(|| {
            n += 1;
            let (seq, ()) = log
                .append(|_, _| Ok((decision_json(format!("ev_{n}")), ())))
                .unwrap();
            log.durable_blocking(seq).unwrap()
        })
    });
}

/// Many concurrent writers share one fdatasync (group commit): the per-decision cost falls
/// with concurrency.
fn durable_decision_concurrent(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open_log(dir.path()));
    let mut group = c.benchmark_group("group commit");
    group.sample_size(10);
    group.bench_function("decision log, 32 writers (time per decision)", |b| {
        b.iter_custom(|iterations| {
            let per_thread = iterations.div_ceil(32).max(1);
            let started = std::time::Instant::now();
            let threads: Vec<_> = (0..32)
                .map(|t| {
                    let log = log.clone();
                    std::thread::spawn(move || {
                        for i in 0..per_thread {
                            let json = decision_json(format!("ev_{t}_{i}"));
                            let (seq, ()) = log.append(|_, _| Ok((json, ()))).unwrap();
                            log.durable_blocking(seq).unwrap();
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            // Time for `iterations` decisions, at the rate the 32 writers achieved together.
            started
                .elapsed()
                .mul_f64(iterations as f64 / (per_thread * 32) as f64)
        })
    });
    group.finish();
    println!("syncs: {}", log.syncs());
}

/// The sweep of past days' ledger buckets, a million of them (333,334 customers, three days):
/// the oldest day's go. What is timed is the work under the decision log's lock (every bucket
/// also still to be checkpointed, the worst case); the taken days are freed afterwards.
fn ledger_sweep(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..333_334)
        .flat_map(|i| {
            let customer = CustomerId::parse("customer_id", &format!("customer-{i:07}")).unwrap();
            ["2026-11-22", "2026-11-23", "2026-11-24"]
                .map(|day| ledger_key(&customer, day, Tier::B))
                .into_iter()
        })
        .collect();
    let mut group = c.benchmark_group("ledger");
    group.sample_size(10);
    group.bench_function("forget past days, 1M buckets", |b| {
        b.iter_batched(
            || {
                let mut books = Books::default();
                for key in &keys {
                    books.add_reservation(key, 100);
                }
                books
            },
            |mut books| {
                let gone = books.forget_days_before("2026-11-23");
                assert_eq!(gone.bucket_count(), 333_334);
                (books, gone)
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// A claim in the replay set at a payment peak's steady state: 1.8M claims held (120 s of
/// 15,000 verifications a second), each new claim dropping the expired ones in front of it.
fn replay_claim(c: &mut Criterion) {
    const PER_MS: i64 = 15;
    const WINDOW_MS: i64 = 120_000;
    let key = |i: u64| {
        let mut key = vec![16];
        key.extend_from_slice(&[7; 16]);
        key.extend_from_slice(&i.to_be_bytes());
        key
    };
    let at = |ms: i64| Moment {
        wall_ms: ms,
        monotonic_ms: ms,
    };
    let guard = ReplayGuard::default();
    let mut i = 0u64;
    for now_ms in 0..WINDOW_MS {
        for _ in 0..PER_MS {
            guard.claim(&key(i), now_ms + WINDOW_MS, || at(now_ms));
            i += 1;
        }
    }
    let mut now_ms = WINDOW_MS;
    let mut in_this_ms = 0;
    c.bench_function("replay set claim, 1.8M held", |b| {
        b.iter(|| {
            assert_eq!(
                guard.claim(&key(i), now_ms + WINDOW_MS, || at(now_ms)),
                Claim::Claimed
            );
            i += 1;
            in_this_ms += 1;
            if in_this_ms == PER_MS {
                in_this_ms = 0;
                now_ms += 1;
            }
        })
    });
    println!("claims held: {}", guard.held());
}

/// Checking an enrollment's attestation: the real samples of tests/data/attestation at a
/// time inside their windows (a TEE chain to Google's RSA-4096 root, a StrongBox chain to the
/// P-384 root, an App Attest object).
fn attestation(c: &mut Criterion) {
    use payra::attestation::{AttestationConfig, Attestor};
    let data = |path: &str| {
        std::fs::read(format!(
            "{}/tests/data/attestation/{path}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let unix = |text: &str| {
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp()
    };
    let android = Attestor::from_config(&AttestationConfig::default()).unwrap();
    for (sample, at, challenge) in [
        (
            "tee-ec-2",
            "2025-09-30T00:00:00Z",
            "d688d763-6118-4ca6-94b2-e6cd9ed7e4e4",
        ),
        (
            "strongbox-ec-1",
            "2026-03-01T00:00:00Z",
            "90578e1d-f5bf-4ccf-a27f-a4f4d89ee21f",
        ),
    ] {
        let chain: Vec<Vec<u8>> = pem::parse_many(data(&format!("android/{sample}/chain.pem")))
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents())
            .collect();
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let point = leaf.public_key().subject_public_key.data.to_vec();
        let at = unix(at);
        c.bench_function(&format!("attestation: Android {sample}"), |b| {
            b.iter(|| {
                android
                    .android(black_box(&chain), challenge.as_bytes(), &point, at)
                    .unwrap()
            })
        });
    }
    let apple = Attestor::from_config(&AttestationConfig {
        apple_app_ids: vec!["V8H6LQ9448.io.uebelacker.AppAttestExample".into()],
        ..AttestationConfig::default()
    })
    .unwrap();
    let object = data("apple/sample-2/attestation.cbor");
    let hash: [u8; 32] =
        hex::decode("3e9ef50b7ff0f985304f7b660895c4c2da034e43dafb385b7152898d226c0037")
            .unwrap()
            .try_into()
            .unwrap();
    let at = unix("2024-06-01T00:00:00Z");
    c.bench_function("attestation: App Attest", |b| {
        b.iter(|| apple.apple(black_box(&object), &hash, at).unwrap())
    });
}

criterion_group!(
    benches,
    attestation,
    sm2_beside_p256,
    replay_claim,
    ledger_sweep,
    signatures,
    tiers,
    issuance_and_crl,
    durable_decision,
    durable_decision_concurrent
);
criterion_main!(benches);
