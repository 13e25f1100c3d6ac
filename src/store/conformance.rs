//! The behaviour every [`Store`] backend must show: each case is a test of its own against
//! each backend, on a fresh, empty store.

use std::sync::{Arc, Barrier};

use super::*;
use crate::model::{DeviceInfo, RevocationReason};

fn ev() -> AuditEvent {
    AuditEvent::new(0, &Actor::system(), "test", "t", "ok")
}

fn token(customer: &str, expires_at_s: i64) -> TokenRecord {
    TokenRecord {
        version: RECORD_VERSION,
        customer_id: CustomerId::parse("customer_id", customer).unwrap(),
        created_at_s: 0,
        expires_at_s,
        used_at_s: None,
        used_for_serial: None,
    }
}

fn certificate(customer: &str, device: &str) -> CertificateRecord {
    CertificateRecord {
        version: RECORD_VERSION,
        serial: Serial::random(),
        customer_id: CustomerId::parse("customer_id", customer).unwrap(),
        device_id: DeviceId::parse("device_id", device).unwrap(),
        device_info: DeviceInfo::default(),
        subject: format!("CN={device}"),
        not_before_s: 0,
        not_after_s: 1000,
        issued_at_s: 0,
        // A key of its own: a store shared by several processes refuses one key for two
        // devices.
        public_key_hex: format!("04{}", hex::encode(rand::random::<[u8; 32]>()).repeat(2)),
        key_algorithm: Default::default(),
        certificate_b64: String::new(),
        revocation: None,
        renewed_from: None,
        superseded_by: None,
        subscriber_ref: None,
        attestation: None,
        issued_upstream: false,
    }
}

/// Runs every case as its own test against each backend: `sled::<case>` on a fresh database
/// in a temporary directory, `postgres::<case>` on a fresh database of the test cluster
/// (skipped, and said so, without one: see `store::postgres::testing`).
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sled {
            $(
                #[test]
                fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$case(std::sync::Arc::new(super::SledStore::open(dir.path()).unwrap()));
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $case() {
                    let name = concat!("conformance::postgres::", stringify!($case));
                    if let Some(store) = crate::store::postgres::testing::fresh_store(name) {
                        super::$case(std::sync::Arc::new(store));
                    }
                }
            )*
        }
    };
}

conformance!(
    token_is_consumed_once,
    an_enrollment_of_a_key_reported_compromised_is_refused_as_it_commits,
    expired_and_unknown_tokens_write_nothing,
    concurrent_token_use_issues_exactly_once,
    indexes_list_by_customer_and_device,
    revoke_is_all_or_nothing,
    a_hold_made_permanent_keeps_the_hold_time,
    ledger_checkpoints_keep_recent_days_and_every_release,
    past_ledger_days_are_purged_in_batches,
    crl_numbers_grow,
    agreed_limits_are_listed_with_their_latest_value,
    audit_chain_links_every_change,
    renewal_supersedes_the_old_certificate_atomically,
    unhold_releases_only_a_held_certificate,
    client_certificates_are_stored_once_and_revoked_onto_the_crl,
    expired_tokens_and_certificates_are_purged_in_batches,
    summaries_and_pages_follow_every_change,
    concurrent_revocations_of_one_certificate_apply_once,
    an_attestation_is_kept_through_revocation_and_in_the_summaries,
    an_sm2_certificate_keeps_its_algorithm_in_record_summary_and_crl_index,
    upstream_certificates_are_marked_on_the_crl_index_and_their_revocations_tracked,
    every_certificate_of_a_key_is_found_by_the_key,
    certificates_are_counted_by_standing,
);

/// The count by status: where each certificate stands at a moment, counted by the store (in
/// the database, for PostgreSQL) as a walk of the summaries would count it.
fn certificates_are_counted_by_standing(store: Arc<dyn Store>) {
    let stored = |customer: &str, change: &dyn Fn(&mut CertificateRecord)| {
        let mut cert = certificate(customer, "d");
        change(&mut cert);
        issue_record(store.as_ref(), &cert);
        cert
    };
    stored("c-valid", &|c| c.not_before_s = -5);
    stored("c-early", &|c| c.not_before_s = 600);
    stored("c-expired", &|c| c.not_after_s = 400);
    let compromised = stored("c-compromised", &|c| c.not_after_s = 400);
    let held = stored("c-held", &|_| {});
    let old = stored("c-renewed", &|_| {});
    let revoke = |serial: &Serial, reason| {
        let revocation = Revocation {
            revoked_at_s: 10,
            reason,
        };
        store
            .revoke(std::slice::from_ref(serial), &revocation, &ev())
            .unwrap()
            .unwrap();
    };
    revoke(&compromised.serial, RevocationReason::KeyCompromise);
    revoke(&held.serial, RevocationReason::CertificateHold);
    let mut new = certificate("c-renewed", "d");
    new.renewed_from = Some(old.serial.clone());
    store.renew(&old.serial, &new, 20, &ev()).unwrap().unwrap();

    let now_s = 500;
    let standing = |revocation, not_yet_valid, expired| Standing {
        revocation,
        not_yet_valid,
        expired,
    };
    let expected: std::collections::HashMap<Standing, u64> = [
        (standing(None, false, false), 2),
        (standing(None, true, false), 1),
        (standing(None, false, true), 1),
        (
            standing(Some(RevocationReason::KeyCompromise), false, true),
            1,
        ),
        (
            standing(Some(RevocationReason::CertificateHold), false, false),
            1,
        ),
        (
            standing(Some(RevocationReason::Superseded), false, false),
            1,
        ),
    ]
    .into();
    let go_on = std::sync::atomic::AtomicBool::new(false);
    let counted = store.count_by_standing(now_s, 0, &go_on).unwrap().unwrap();
    assert_eq!(
        counted.len(),
        expected.len(),
        "one row per standing: {counted:?}"
    );
    assert_eq!(
        counted
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
        expected
    );
    let mut walked = std::collections::HashMap::<Standing, u64>::new();
    store
        .for_each_certificate_summary(&mut |summary| {
            *walked.entry(Standing::of(&summary, now_s)).or_default() += 1;
            true
        })
        .unwrap();
    assert_eq!(walked, expected);

    let stopped = std::sync::atomic::AtomicBool::new(true);
    assert_eq!(store.count_by_standing(now_s, 0, &stopped).unwrap(), None);
}

/// The key index finds every certificate of a device key (enrolled and renewed with it),
/// none of another key that shares its x coordinate and the parity of y, and none once
/// they are purged.
fn every_certificate_of_a_key_is_found_by_the_key(store: Arc<dyn Store>) {
    let key_of = |cert: &CertificateRecord| CertificateSummary::of(cert).unwrap().public_key;
    let first = issue(store.as_ref(), "c-key", "d-key");
    let key = key_of(&first);
    let mut renewed = certificate("c-key", "d-key");
    renewed.public_key_hex = first.public_key_hex.clone();
    renewed.renewed_from = Some(first.serial.clone());
    store
        .renew(&first.serial, &renewed, 40, &ev())
        .unwrap()
        .unwrap();
    // Same x, same parity of y (the last octet), another y.
    let mut twin_key = key;
    twin_key[33] ^= 0x80;
    let mut twin = certificate("c-twin", "d-twin");
    twin.public_key_hex = hex::encode(twin_key);
    issue_record(store.as_ref(), &twin);
    issue(store.as_ref(), "c-other", "d-other");

    let serials_of = |key: &[u8; 65]| {
        let mut serials: Vec<Serial> = store
            .certificates_with_key(key)
            .unwrap()
            .into_iter()
            .map(|summary| summary.serial)
            .collect();
        serials.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        serials
    };
    let mut expected = vec![first.serial.clone(), renewed.serial.clone()];
    expected.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(serials_of(&key), expected);
    let holders = store.certificates_with_key(&key).unwrap();
    let superseded = holders.iter().find(|h| h.serial == first.serial).unwrap();
    assert_eq!(
        superseded.revocation.map(|r| r.reason),
        Some(RevocationReason::Superseded),
        "the summaries are current"
    );
    assert_eq!(serials_of(&twin_key), vec![twin.serial.clone()]);
    let mut unknown = key;
    unknown[1] ^= 1;
    assert!(serials_of(&unknown).is_empty());

    let purged = store.purge_expired_certificates(2_000, 100, &ev()).unwrap();
    assert_eq!(purged.len(), 4);
    assert!(serials_of(&key).is_empty());
    assert!(serials_of(&twin_key).is_empty());
}

/// An upstream CA's certificate (RA mode) keeps its mark in its record and in the revoked
/// index (by revocation and by renewal), and the upstream revocation entries are kept, replaced
/// per serial, listed in serial order, and audited only when asked.
fn upstream_certificates_are_marked_on_the_crl_index_and_their_revocations_tracked(
    store: Arc<dyn Store>,
) {
    let mut upstream = certificate("c-up", "d-up");
    upstream.issued_upstream = true;
    issue_record(store.as_ref(), &upstream);
    let local = issue(store.as_ref(), "c-up", "d-local");
    assert_eq!(
        store.certificate(&upstream.serial).unwrap(),
        Some(upstream.clone())
    );
    let mut renewed = certificate("c-up", "d-up");
    renewed.issued_upstream = true;
    renewed.renewed_from = Some(upstream.serial.clone());
    store
        .renew(&upstream.serial, &renewed, 40, &ev())
        .unwrap()
        .unwrap();
    // Not keyCompromise: retention keeps those, and a purge is expected below.
    let revocation = Revocation {
        revoked_at_s: 41,
        reason: RevocationReason::AffiliationChanged,
    };
    store
        .revoke(
            &[renewed.serial.clone(), local.serial.clone()],
            &revocation,
            &ev(),
        )
        .unwrap()
        .unwrap();
    let entries = store.revoked_entries().unwrap();
    let marked = |serial: &Serial| {
        entries
            .iter()
            .find(|entry| entry.serial == *serial)
            .map(|entry| entry.issued_upstream)
    };
    assert_eq!(marked(&upstream.serial), Some(true));
    assert_eq!(marked(&renewed.serial), Some(true));
    assert_eq!(marked(&local.serial), Some(false));

    assert_eq!(store.upstream_revocations().unwrap(), vec![]);
    let mut first = UpstreamRevocation {
        serial: renewed.serial.clone(),
        revocation,
        authority_key_id_hex: "0a0b".into(),
        confirmed_at_s: None,
        attempts: 1,
        last_attempt_at_s: Some(42),
        last_error: Some("connection refused".into()),
        orphan: false,
    };
    let orphan = UpstreamRevocation {
        serial: Serial::random(),
        revocation: Revocation {
            revoked_at_s: 43,
            reason: RevocationReason::CessationOfOperation,
        },
        authority_key_id_hex: String::new(),
        confirmed_at_s: None,
        attempts: 0,
        last_attempt_at_s: None,
        last_error: None,
        orphan: true,
    };
    let head = store.audit_head().unwrap();
    store.put_upstream_revocation(&first, None).unwrap();
    assert_eq!(
        store.audit_head().unwrap(),
        head,
        "a failed attempt is not audited"
    );
    store.put_upstream_revocation(&orphan, Some(&ev())).unwrap();
    assert_eq!(store.audit_head().unwrap().seq, head.seq + 1);
    first.attempts = 2;
    first.confirmed_at_s = Some(50);
    first.last_error = None;
    store.put_upstream_revocation(&first, Some(&ev())).unwrap();
    let mut expected = vec![first, orphan.clone()];
    expected.sort_by(|a, b| a.serial.as_bytes().cmp(b.serial.as_bytes()));
    assert_eq!(store.upstream_revocations().unwrap(), expected);

    // Retention takes a purged certificate's entry with it; an orphan has no record to
    // purge and stays.
    let purged = store.purge_expired_certificates(2_000, 100, &ev()).unwrap();
    assert!(purged.contains(&renewed.serial));
    assert_eq!(store.upstream_revocations().unwrap(), vec![orphan]);
}

/// An SM2 certificate's algorithm is kept in its record and summary, and its revocation
/// (by an operator or by a renewal) is indexed for the SM2 CRL; a P-256 one's for the other.
fn an_sm2_certificate_keeps_its_algorithm_in_record_summary_and_crl_index(store: Arc<dyn Store>) {
    use crate::model::KeyAlgorithm;
    let mut sm2 = certificate("c-sm2", "d-sm2");
    sm2.key_algorithm = KeyAlgorithm::Sm2;
    issue_record(store.as_ref(), &sm2);
    let p256 = issue(store.as_ref(), "c-sm2", "d-p256");
    assert_eq!(store.certificate(&sm2.serial).unwrap(), Some(sm2.clone()));
    let algorithm_of = |serial: &Serial| {
        let mut found = None;
        store
            .for_each_certificate_summary(&mut |summary| {
                if summary.serial == *serial {
                    found = Some(summary.key_algorithm);
                }
                true
            })
            .unwrap();
        found.expect("summary")
    };
    assert_eq!(algorithm_of(&sm2.serial), KeyAlgorithm::Sm2);
    assert_eq!(algorithm_of(&p256.serial), KeyAlgorithm::P256);

    // Renewed to a new SM2 certificate: the superseded one is on the SM2 CRL's index.
    let mut renewed = certificate("c-sm2", "d-sm2");
    renewed.key_algorithm = KeyAlgorithm::Sm2;
    renewed.renewed_from = Some(sm2.serial.clone());
    store
        .renew(&sm2.serial, &renewed, 40, &ev())
        .unwrap()
        .unwrap();
    let revocation = Revocation {
        revoked_at_s: 41,
        reason: RevocationReason::KeyCompromise,
    };
    store
        .revoke(
            &[renewed.serial.clone(), p256.serial.clone()],
            &revocation,
            &ev(),
        )
        .unwrap()
        .unwrap();
    let entries = store.revoked_entries().unwrap();
    let algorithm_on_crl = |serial: &Serial| {
        entries
            .iter()
            .find(|entry| entry.serial == *serial)
            .map(|entry| entry.key_algorithm)
    };
    assert_eq!(algorithm_on_crl(&sm2.serial), Some(KeyAlgorithm::Sm2));
    assert_eq!(algorithm_on_crl(&renewed.serial), Some(KeyAlgorithm::Sm2));
    assert_eq!(algorithm_on_crl(&p256.serial), Some(KeyAlgorithm::P256));
    assert_eq!(algorithm_of(&renewed.serial), KeyAlgorithm::Sm2);
    let stored = store.certificate(&renewed.serial).unwrap().unwrap();
    assert_eq!(stored.key_algorithm, KeyAlgorithm::Sm2);
    assert_eq!(stored.revocation, Some(revocation));
}

/// A certificate whose key was attested keeps the attestation in its record and its class in
/// its summary, before and after a revocation changes both.
fn an_attestation_is_kept_through_revocation_and_in_the_summaries(store: Arc<dyn Store>) {
    use crate::attestation::{Attestation, AttestationClass, BootState, Platform, SecurityLevel};
    let mut cert = certificate("c-attested", "d-strongbox");
    cert.attestation = Some(Attestation {
        platform: Platform::Android,
        security_level: SecurityLevel::StrongBox,
        boot_state: Some(BootState::Verified),
        device_locked: Some(true),
        root: "google-hardware-ec-ca1".into(),
        root_key_sha256: "ab".repeat(32),
        apps: vec!["com.example.pay".into()],
        attested_at_s: 1_764_000_000,
        chain_serials: vec!["2c85cdc15c3042f25698906669c35137".into()],
    });
    issue_record(store.as_ref(), &cert);
    let plain = issue(store.as_ref(), "c-attested", "d-plain");
    let class = |serial: &Serial| {
        let mut found = None;
        store
            .for_each_certificate_summary(&mut |summary| {
                if summary.serial == *serial {
                    found = Some(summary.attestation);
                }
                true
            })
            .unwrap();
        found.expect("summary")
    };
    let strongbox = AttestationClass::new(Some(SecurityLevel::StrongBox), true);
    assert_eq!(class(&cert.serial), strongbox);
    assert_eq!(class(&plain.serial), AttestationClass::NONE);
    let revocation = Revocation {
        revoked_at_s: 9,
        reason: RevocationReason::KeyCompromise,
    };
    store
        .revoke(std::slice::from_ref(&cert.serial), &revocation, &ev())
        .unwrap()
        .unwrap();
    let stored = store.certificate(&cert.serial).unwrap().unwrap();
    assert_eq!(stored.attestation, cert.attestation);
    assert_eq!(stored.revocation, Some(revocation));
    assert_eq!(class(&cert.serial), strongbox);
}

/// Issues a certificate for `customer`/`device` through a new token.
fn issue(store: &dyn Store, customer: &str, device: &str) -> CertificateRecord {
    let cert = certificate(customer, device);
    issue_record(store, &cert);
    cert
}

/// Issues `cert` through a new token.
/// Revokes `serial` for `reason` at `revoked_at_s`, which must succeed.
fn revoke_one(store: &dyn Store, serial: &Serial, reason: RevocationReason, revoked_at_s: i64) {
    store
        .revoke(
            std::slice::from_ref(serial),
            &Revocation {
                revoked_at_s,
                reason,
            },
            &ev(),
        )
        .unwrap()
        .unwrap();
}

fn issue_record(store: &dyn Store, cert: &CertificateRecord) {
    let hash = TokenHash::of(&format!("t-{}", hex::encode(rand::random::<[u8; 8]>())));
    let customer = cert.customer_id.as_str();
    store
        .put_token(&hash, &token(customer, 100), &ev())
        .unwrap();
    assert_eq!(
        store.issue_with_token(&hash, 1, cert, &ev()).unwrap(),
        IssueOutcome::Issued
    );
}

fn renewal_supersedes_the_old_certificate_atomically(store: Arc<dyn Store>) {
    let old = issue(store.as_ref(), "c-renew", "d");
    let mut new = certificate("c-renew", "d");
    new.renewed_from = Some(old.serial.clone());
    store.renew(&old.serial, &new, 40, &ev()).unwrap().unwrap();
    let stored_old = store.certificate(&old.serial).unwrap().unwrap();
    assert_eq!(
        stored_old.revocation,
        Some(Revocation {
            revoked_at_s: 40,
            reason: RevocationReason::Superseded
        })
    );
    assert_eq!(stored_old.superseded_by, Some(new.serial.clone()));
    assert_eq!(store.certificate(&new.serial).unwrap(), Some(new.clone()));
    let device = DeviceId::parse("device_id", "d").unwrap();
    assert_eq!(store.serials_by_device(&device).unwrap().len(), 2);
    assert!(store
        .revoked_entries()
        .unwrap()
        .iter()
        .any(|entry| entry.serial == old.serial));
    // The old certificate is revoked now: a second renewal of it writes nothing.
    let third = certificate("c-renew", "d");
    assert_eq!(
        store.renew(&old.serial, &third, 41, &ev()).unwrap(),
        Err(RevokeRejection::AlreadyRevoked(
            old.serial.clone(),
            stored_old.revocation.unwrap()
        ))
    );
    assert!(store.certificate(&third.serial).unwrap().is_none());
    let unknown = Serial::random();
    assert_eq!(
        store.renew(&unknown, &third, 41, &ev()).unwrap(),
        Err(RevokeRejection::NotFound(unknown))
    );
    assert!(store.certificate(&third.serial).unwrap().is_none());
}

fn unhold_releases_only_a_held_certificate(store: Arc<dyn Store>) {
    let cert = issue(store.as_ref(), "c-unhold", "d");
    assert_eq!(
        store.unhold(&cert.serial, &ev()).unwrap(),
        Err(RevokeRejection::NotOnHold(cert.serial.clone()))
    );
    let hold = Revocation {
        revoked_at_s: 10,
        reason: RevocationReason::CertificateHold,
    };
    store
        .revoke(std::slice::from_ref(&cert.serial), &hold, &ev())
        .unwrap()
        .unwrap();
    assert_eq!(store.revoked_entries().unwrap().len(), 1);
    let released = store.unhold(&cert.serial, &ev()).unwrap().unwrap();
    assert_eq!(released.revocation, None);
    assert_eq!(store.revocation_state(&cert.serial).unwrap(), Some(None));
    assert!(store.revoked_entries().unwrap().is_empty(), "off the CRL");
    let compromise = Revocation {
        revoked_at_s: 20,
        reason: RevocationReason::KeyCompromise,
    };
    store
        .revoke(std::slice::from_ref(&cert.serial), &compromise, &ev())
        .unwrap()
        .unwrap();
    assert_eq!(
        store.unhold(&cert.serial, &ev()).unwrap(),
        Err(RevokeRejection::NotOnHold(cert.serial.clone())),
        "a revocation for good is not released"
    );
    let unknown = Serial::random();
    assert_eq!(
        store.unhold(&unknown, &ev()).unwrap(),
        Err(RevokeRejection::NotFound(unknown))
    );
}

fn client_certificates_are_stored_once_and_revoked_onto_the_crl(store: Arc<dyn Store>) {
    let record = ClientCertificateRecord {
        version: RECORD_VERSION,
        serial: Serial::random(),
        role: "service".into(),
        name: "checkout".into(),
        not_before_s: 0,
        not_after_s: 1000,
        issued_at_s: 0,
        certificate_b64: String::new(),
        revocation: None,
    };
    assert!(store.put_client_certificate(&record, &ev()).unwrap());
    let mut again = record.clone();
    again.name = "other".into();
    assert!(!store.put_client_certificate(&again, &ev()).unwrap());
    assert_eq!(
        store.client_certificate(&record.serial).unwrap(),
        Some(record.clone())
    );
    assert_eq!(store.client_certificates().unwrap(), vec![record.clone()]);
    let revocation = Revocation {
        revoked_at_s: 9,
        reason: RevocationReason::KeyCompromise,
    };
    store
        .revoke_client_certificate(&record.serial, &revocation, &ev())
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .revoke_client_certificate(&record.serial, &revocation, &ev())
            .unwrap(),
        Err(RevokeRejection::AlreadyRevoked(
            record.serial.clone(),
            revocation
        ))
    );
    let listed = store.revoked_entries().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].serial, record.serial);
    assert_eq!(listed[0].revocation, revocation);
    assert_eq!(
        store
            .client_certificate(&record.serial)
            .unwrap()
            .unwrap()
            .revocation,
        Some(revocation)
    );
    let unknown = Serial::random();
    assert_eq!(
        store
            .revoke_client_certificate(&unknown, &revocation, &ev())
            .unwrap(),
        Err(RevokeRejection::NotFound(unknown))
    );
}

fn expired_tokens_and_certificates_are_purged_in_batches(store: Arc<dyn Store>) {
    for i in 0..5 {
        let expires = if i < 3 { 50 } else { 500 };
        store
            .put_token(
                &TokenHash::of(&format!("t-purge-{i}")),
                &token("c-purge", expires),
                &ev(),
            )
            .unwrap();
    }
    let head = store.audit_head().unwrap().seq;
    assert_eq!(store.purge_expired_tokens(100, 2, &ev()).unwrap(), 2);
    assert_eq!(
        store.audit_head().unwrap().seq,
        head + 1,
        "one entry per batch"
    );
    assert_eq!(store.purge_expired_tokens(100, 2, &ev()).unwrap(), 1);
    assert_eq!(store.purge_expired_tokens(100, 2, &ev()).unwrap(), 0);
    assert_eq!(
        store.audit_head().unwrap().seq,
        head + 2,
        "an empty batch writes nothing"
    );
    assert!(store.token(&TokenHash::of("t-purge-3")).unwrap().is_some());
    assert!(store.token(&TokenHash::of("t-purge-0")).unwrap().is_none());

    let revoked = issue(store.as_ref(), "c-purge", "d0");
    let plain = issue(store.as_ref(), "c-purge", "d1");
    let mut lasting = certificate("c-purge", "d2");
    lasting.not_after_s = 5000;
    issue_record(store.as_ref(), &lasting);
    let compromised = issue(store.as_ref(), "c-purge", "d3");
    for (serial, reason) in [
        (&revoked.serial, RevocationReason::CessationOfOperation),
        (&compromised.serial, RevocationReason::KeyCompromise),
    ] {
        revoke_one(store.as_ref(), serial, reason, 5);
    }
    let mut purged = store.purge_expired_certificates(2000, 1, &ev()).unwrap();
    assert_eq!(purged.len(), 1, "at most the batch size");
    purged.extend(store.purge_expired_certificates(2000, 10, &ev()).unwrap());
    purged.sort();
    let mut expected = vec![revoked.serial.clone(), plain.serial.clone()];
    expected.sort();
    assert_eq!(
        purged, expected,
        "every record with notAfter before 2000, except the compromised one"
    );
    assert_eq!(
        store
            .revoked_entries()
            .unwrap()
            .iter()
            .map(|e| e.serial.clone())
            .collect::<Vec<_>>(),
        vec![compromised.serial.clone()],
        "CRL entries go with their records"
    );
    let customer = CustomerId::parse("customer_id", "c-purge").unwrap();
    let mut kept = vec![lasting.serial.clone(), compromised.serial.clone()];
    kept.sort();
    let mut listed = store.serials_by_customer(&customer).unwrap();
    listed.sort();
    assert_eq!(listed, kept);
    assert_eq!(store.revocation_state(&revoked.serial).unwrap(), None);
    assert!(store.certificate(&plain.serial).unwrap().is_none());
    // The compromised key stays refused, however long ago its certificate expired.
    let key = CertificateSummary::of(&compromised).unwrap().public_key;
    let holders = store.certificates_with_key(&key).unwrap();
    assert_eq!(
        KeyRefusal::of(&holders, &customer, &compromised.device_id, 1_000_000),
        Some(KeyRefusal::Compromised)
    );
    assert!(store
        .purge_expired_certificates(2000, 10, &ev())
        .unwrap()
        .is_empty());
}

fn summaries_and_pages_follow_every_change(store: Arc<dyn Store>) {
    let mut serials: Vec<Serial> = (0..5)
        .map(|i| issue(store.as_ref(), "c-pages", &format!("d{i}")).serial)
        .collect();
    serials.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let first = store.certificates_after(None, 2).unwrap();
    assert_eq!(
        first.iter().map(|c| c.serial.clone()).collect::<Vec<_>>(),
        serials[..2].to_vec()
    );
    let rest = store.certificates_after(Some(&serials[1]), 10).unwrap();
    assert_eq!(
        rest.iter().map(|c| c.serial.clone()).collect::<Vec<_>>(),
        serials[2..].to_vec()
    );
    let revocation = Revocation {
        revoked_at_s: 3,
        reason: RevocationReason::CessationOfOperation,
    };
    store
        .revoke(&serials[..1], &revocation, &ev())
        .unwrap()
        .unwrap();
    let mut summaries = Vec::new();
    store
        .for_each_certificate_summary(&mut |summary| {
            summaries.push(summary);
            true
        })
        .unwrap();
    assert_eq!(summaries.len(), 5);
    for summary in &summaries {
        let record = store.certificate(&summary.serial).unwrap().unwrap();
        assert_eq!(*summary, CertificateSummary::of(&record).unwrap());
    }
    assert_eq!(
        store.revocation_state(&serials[0]).unwrap(),
        Some(Some(revocation))
    );
    assert_eq!(store.revocation_state(&serials[1]).unwrap(), Some(None));
    assert_eq!(store.revocation_state(&Serial::random()).unwrap(), None);
}

fn concurrent_revocations_of_one_certificate_apply_once(store: Arc<dyn Store>) {
    let cert = issue(store.as_ref(), "c-revoke-race", "d");
    let head = store.audit_head().unwrap().seq;
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (store, barrier, serial) = (store.clone(), barrier.clone(), cert.serial.clone());
            std::thread::spawn(move || {
                let revocation = Revocation {
                    revoked_at_s: 100 + i as i64,
                    reason: RevocationReason::KeyCompromise,
                };
                barrier.wait();
                store.revoke(&[serial], &revocation, &ev()).unwrap()
            })
        })
        .collect();
    let applied = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|outcome| outcome.is_ok())
        .count();
    assert_eq!(applied, 1, "exactly one revocation applies");
    assert_eq!(store.audit_head().unwrap().seq, head + 1);
    assert_eq!(store.revoked_entries().unwrap().len(), 1);
}

fn agreed_limits_are_listed_with_their_latest_value(store: Arc<dyn Store>) {
    let (first, second) = (
        CustomerId::parse("customer_id", "c-limit-1").unwrap(),
        CustomerId::parse("customer_id", "c-limit-2").unwrap(),
    );
    assert!(store.agreed_limits().unwrap().is_empty());
    store.set_agreed_limit(&first, 100, &ev()).unwrap();
    store.set_agreed_limit(&second, 200, &ev()).unwrap();
    store.set_agreed_limit(&first, 150, &ev()).unwrap();
    let mut listed = store.agreed_limits().unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("c-limit-1".to_string(), 150),
            ("c-limit-2".to_string(), 200)
        ]
    );
}

fn ledger_checkpoints_keep_recent_days_and_every_release(store: Arc<dyn Store>) {
    let customer = CustomerId::parse("customer_id", "c-ledger").unwrap();
    let today = ledger_key(&customer, "2026-11-25", crate::model::Tier::C);
    let old = ledger_key(&customer, "2026-11-20", crate::model::Tier::C);
    assert_eq!(
        store.ledger_checkpoint("2026-11-24").unwrap(),
        LedgerCheckpoint::default()
    );
    store
        .save_ledger_checkpoint(&LedgerCheckpoint {
            through_seq: 7,
            buckets: vec![(today.clone(), 60), (old, 10)],
            released: vec![(3, 1_000)],
        })
        .unwrap();
    store
        .save_ledger_checkpoint(&LedgerCheckpoint {
            through_seq: 9,
            buckets: vec![(today.clone(), 80)],
            released: vec![(8, 2_000)],
        })
        .unwrap();
    let saved = store.ledger_checkpoint("2026-11-24").unwrap();
    assert_eq!(saved.through_seq, 9);
    assert_eq!(
        saved.buckets,
        vec![(today, 80)],
        "older days are not loaded"
    );
    assert_eq!(saved.released, vec![(3, 1_000), (8, 2_000)]);
}

fn past_ledger_days_are_purged_in_batches(store: Arc<dyn Store>) {
    let bucket = |customer: &str, day: &str| {
        ledger_key(
            &CustomerId::parse("customer_id", customer).unwrap(),
            day,
            crate::model::Tier::B,
        )
    };
    let old: Vec<_> = (0..5)
        .map(|i| (bucket(&format!("c-purge-{i}"), "2025-06-01"), 10))
        .collect();
    let kept = vec![
        (bucket("c-purge-0", "2025-06-02"), 20),
        (bucket("c-purge-9", "2025-06-02"), 30),
    ];
    store
        .save_ledger_checkpoint(&LedgerCheckpoint {
            through_seq: 10,
            buckets: old.iter().chain(&kept).cloned().collect(),
            released: vec![],
        })
        .unwrap();
    // Batches of 3 go on after the last key of the one before, until the end.
    let purge = |after: Option<&[u8]>| {
        store
            .purge_ledger_days_before("2025-06-02", after, 3, &ev())
            .unwrap()
    };
    let (first, next) = purge(None);
    assert_eq!(first, 3);
    let next = next.expect("more to look at");
    assert_eq!(purge(Some(&next)), (2, None));
    assert_eq!(purge(None), (0, None));
    let loaded = store.ledger_checkpoint("2025-01-01").unwrap();
    for (key, used) in &kept {
        assert!(
            loaded.buckets.contains(&(key.clone(), *used)),
            "{key:?} kept"
        );
    }
    for (key, _) in &old {
        assert!(
            !loaded.buckets.iter().any(|(k, _)| k == key),
            "{key:?} purged"
        );
    }
    assert_eq!(
        loaded.through_seq, 10,
        "the checkpoint's record number stays"
    );

    // Releases made before a time go the same way; later ones stay.
    let before = store.ledger_checkpoint("2025-01-01").unwrap().released;
    store
        .save_ledger_checkpoint(&LedgerCheckpoint {
            through_seq: 11,
            buckets: vec![],
            released: vec![(100, 5_000), (101, 6_000), (102, 9_000)],
        })
        .unwrap();
    let mut gone = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let (purged, next) = store
            .purge_releases_before(7_000, after.as_deref(), 1, &ev())
            .unwrap();
        gone += purged;
        match next {
            Some(key) => after = Some(key),
            None => break,
        }
    }
    // The earlier test's releases (at 1,000 and 2,000 ms) are before 7,000 ms too.
    assert_eq!(
        gone,
        2 + before.iter().filter(|(_, at)| *at < 7_000).count()
    );
    let left = store.ledger_checkpoint("2025-01-01").unwrap().released;
    assert!(left.contains(&(102, 9_000)));
    assert!(left.iter().all(|(_, at)| *at >= 7_000), "{left:?}");
}

fn crl_numbers_grow(store: Arc<dyn Store>) {
    let first = store.next_crl_number(0).unwrap();
    let second = store.next_crl_number(0).unwrap();
    assert!(second > first);
    assert_eq!(store.next_crl_number(1_000_000).unwrap(), 1_000_000);
    assert_eq!(
        store.next_crl_number(5).unwrap(),
        1_000_001,
        "never goes back"
    );
}

fn audit_chain_links_every_change(store: Arc<dyn Store>) {
    assert_eq!(store.audit_head().unwrap(), ChainHead::GENESIS);
    for i in 0..4 {
        let cert = issue(store.as_ref(), "c-audit", &format!("d{i}"));
        let customer = CustomerId::parse("customer_id", "c-audit").unwrap();
        store.set_agreed_limit(&customer, 100 + i, &ev()).unwrap();
        store
            .revoke(
                &[cert.serial],
                &Revocation {
                    revoked_at_s: 1,
                    reason: RevocationReason::Superseded,
                },
                &ev(),
            )
            .unwrap()
            .unwrap();
    }
    let head = store.audit_head().unwrap();
    assert_eq!(
        head.seq, 16,
        "every change above appended an entry ({head:?})"
    );
    assert!(
        head.seq > 10,
        "every change above appended an entry ({head:?})"
    );
    assert_eq!(
        verify_audit_log(store.as_ref()).unwrap(),
        AuditCheck::Intact { entries: head.seq }
    );
    let last = store.audit_entries(head.seq - 1, 1).unwrap();
    assert_eq!(
        last[0].hash,
        hex::encode(head.hash),
        "the head names the last entry"
    );
}

/// The RA checks a key before it signs; a keyCompromise revocation can commit between that
/// check and the enrollment's commit, so the store checks again as it commits.
fn an_enrollment_of_a_key_reported_compromised_is_refused_as_it_commits(store: Arc<dyn Store>) {
    let first = issue(store.as_ref(), "c-key", "d");
    revoke_one(
        store.as_ref(),
        &first.serial,
        RevocationReason::KeyCompromise,
        5,
    );
    let hash = TokenHash::of("t-after-compromise");
    store.put_token(&hash, &token("c-key", 100), &ev()).unwrap();
    let mut again = certificate("c-key", "d");
    again.public_key_hex = first.public_key_hex.clone();
    assert_eq!(
        store.issue_with_token(&hash, 10, &again, &ev()).unwrap(),
        IssueOutcome::KeyCompromised
    );
    assert!(store.certificate(&again.serial).unwrap().is_none());
    assert_eq!(store.token(&hash).unwrap().unwrap().used_at_s, None);
    // Another key is enrolled with the same token as usual.
    let other = certificate("c-key", "d");
    assert_eq!(
        store.issue_with_token(&hash, 11, &other, &ev()).unwrap(),
        IssueOutcome::Issued
    );
}

fn token_is_consumed_once(store: Arc<dyn Store>) {
    let hash = TokenHash::of("t-once");
    store
        .put_token(&hash, &token("c-once", 100), &ev())
        .unwrap();
    let first = certificate("c-once", "d1");
    assert_eq!(
        store.issue_with_token(&hash, 10, &first, &ev()).unwrap(),
        IssueOutcome::Issued
    );
    let second = certificate("c-once", "d2");
    assert_eq!(
        store.issue_with_token(&hash, 11, &second, &ev()).unwrap(),
        IssueOutcome::TokenRejected(TokenRejection::AlreadyUsed { used_at_s: 10 })
    );
    assert!(store.certificate(&second.serial).unwrap().is_none());
    let stored = store.token(&hash).unwrap().unwrap();
    assert_eq!(stored.used_for_serial, Some(first.serial.clone()));
    assert_eq!(store.certificate(&first.serial).unwrap(), Some(first));
}

fn expired_and_unknown_tokens_write_nothing(store: Arc<dyn Store>) {
    let hash = TokenHash::of("t-expired");
    store.put_token(&hash, &token("c-exp", 100), &ev()).unwrap();
    let cert = certificate("c-exp", "d1");
    assert_eq!(
        store.issue_with_token(&hash, 100, &cert, &ev()).unwrap(),
        IssueOutcome::TokenRejected(TokenRejection::Expired { expired_at_s: 100 })
    );
    assert_eq!(
        store
            .issue_with_token(&TokenHash::of("never-created"), 1, &cert, &ev())
            .unwrap(),
        IssueOutcome::TokenRejected(TokenRejection::Unknown)
    );
    assert!(store.certificate(&cert.serial).unwrap().is_none());
    assert_eq!(store.token(&hash).unwrap().unwrap().used_at_s, None);
}

fn concurrent_token_use_issues_exactly_once(store: Arc<dyn Store>) {
    let hash = TokenHash::of("t-race");
    store
        .put_token(&hash, &token("c-race", 100), &ev())
        .unwrap();
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let store = store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let cert = certificate("c-race", &format!("d{i}"));
                barrier.wait();
                store.issue_with_token(&hash, 1, &cert, &ev()).unwrap()
            })
        })
        .collect();
    let issued = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|o| *o == IssueOutcome::Issued)
        .count();
    assert_eq!(issued, 1);
    let customer = CustomerId::parse("customer_id", "c-race").unwrap();
    assert_eq!(store.serials_by_customer(&customer).unwrap().len(), 1);
}

fn indexes_list_by_customer_and_device(store: Arc<dyn Store>) {
    let mut serials = Vec::new();
    for (i, device) in ["dA", "dB", "dA"].iter().enumerate() {
        let hash = TokenHash::of(&format!("t-index-{i}"));
        store
            .put_token(&hash, &token("c-index", 100), &ev())
            .unwrap();
        let cert = certificate("c-index", device);
        serials.push(cert.serial.clone());
        store.issue_with_token(&hash, 1, &cert, &ev()).unwrap();
    }
    let customer = CustomerId::parse("customer_id", "c-index").unwrap();
    let mut expected = serials.clone();
    expected.sort();
    let mut listed = store.serials_by_customer(&customer).unwrap();
    listed.sort();
    assert_eq!(listed, expected);
    let device = DeviceId::parse("device_id", "dA").unwrap();
    let mut expected_a = vec![serials[0].clone(), serials[2].clone()];
    expected_a.sort();
    let mut listed_a = store.serials_by_device(&device).unwrap();
    listed_a.sort();
    assert_eq!(listed_a, expected_a);
    // A customer id that is a prefix of another must not see the other's certificates.
    let prefix = CustomerId::parse("customer_id", "c-inde").unwrap();
    assert!(store.serials_by_customer(&prefix).unwrap().is_empty());
}

fn revoke_is_all_or_nothing(store: Arc<dyn Store>) {
    let mut serials = Vec::new();
    for i in 0..2 {
        let hash = TokenHash::of(&format!("t-revoke-{i}"));
        store
            .put_token(&hash, &token("c-revoke", 100), &ev())
            .unwrap();
        let cert = certificate("c-revoke", "d");
        serials.push(cert.serial.clone());
        store.issue_with_token(&hash, 1, &cert, &ev()).unwrap();
    }
    let revocation = Revocation {
        revoked_at_s: 5,
        reason: RevocationReason::KeyCompromise,
    };
    let unknown = Serial::random();
    let batch = vec![serials[0].clone(), unknown.clone()];
    assert_eq!(
        store.revoke(&batch, &revocation, &ev()).unwrap(),
        Err(RevokeRejection::NotFound(unknown))
    );
    assert!(store
        .certificate(&serials[0])
        .unwrap()
        .unwrap()
        .revocation
        .is_none());
    store.revoke(&serials, &revocation, &ev()).unwrap().unwrap();
    assert_eq!(
        store.revoke(&serials[..1], &revocation, &ev()).unwrap(),
        Err(RevokeRejection::AlreadyRevoked(
            serials[0].clone(),
            revocation
        ))
    );
    assert_eq!(
        store.certificate(&serials[1]).unwrap().unwrap().revocation,
        Some(revocation)
    );
}

fn a_hold_made_permanent_keeps_the_hold_time(store: Arc<dyn Store>) {
    let hash = TokenHash::of("t-hold");
    store
        .put_token(&hash, &token("c-hold", 100), &ev())
        .unwrap();
    let cert = certificate("c-hold", "d");
    store.issue_with_token(&hash, 1, &cert, &ev()).unwrap();
    let serial = std::slice::from_ref(&cert.serial);
    let hold = Revocation {
        revoked_at_s: 10,
        reason: RevocationReason::CertificateHold,
    };
    store.revoke(serial, &hold, &ev()).unwrap().unwrap();
    let compromise = Revocation {
        revoked_at_s: 50,
        reason: RevocationReason::KeyCompromise,
    };
    store.revoke(serial, &compromise, &ev()).unwrap().unwrap();
    let kept = Revocation {
        revoked_at_s: 10,
        reason: RevocationReason::KeyCompromise,
    };
    assert_eq!(
        store.certificate(&cert.serial).unwrap().unwrap().revocation,
        Some(kept)
    );
    assert_eq!(
        store.revocation_state(&cert.serial).unwrap(),
        Some(Some(kept))
    );
    assert_eq!(
        store.revoke(serial, &hold, &ev()).unwrap(),
        Err(RevokeRejection::AlreadyRevoked(cert.serial.clone(), kept))
    );
}

#[test]
fn sled_store_batches_concurrent_syncs() {
    // Writes through sled's own log (here: agreed limits) share the group commit's syncs.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let writers = 16;
    let per_writer = 20;
    let barrier = Arc::new(Barrier::new(writers));
    let before = store.group_commit().syncs();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..per_writer {
                    let customer = CustomerId::parse("customer_id", &format!("c-{w}-{i}")).unwrap();
                    store.set_agreed_limit(&customer, 100, &ev()).unwrap();
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    let syncs = store.group_commit().syncs() - before;
    assert!(syncs > 0, "agreed limits were not synced");
    assert!(
        syncs < (writers * per_writer) as u64,
        "{syncs} syncs for {} writes: no batching",
        writers * per_writer
    );
    assert_eq!(store.agreed_limits().unwrap().len(), writers * per_writer);
}

#[test]
fn sled_store_journals_concurrent_new_tokens_in_shared_batches() {
    let dir = tempfile::tempdir().unwrap();
    let writers = 16;
    let per_writer = 20;
    {
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let barrier = Arc::new(Barrier::new(writers));
        let (group_before, all_before) = (store.group_commit().syncs(), store.syncs());
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    for i in 0..per_writer {
                        let hash = TokenHash::of(&format!("batch-{w}-{i}"));
                        store
                            .put_token(&hash, &token("c-batch", 100), &ev())
                            .unwrap();
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        // Each token is durable through the issuance journal, not sled's log.
        assert_eq!(store.group_commit().syncs(), group_before);
        let journal_syncs = store.syncs() - all_before;
        assert!(journal_syncs > 0, "tokens were not journaled");
        assert!(
            journal_syncs < (writers * per_writer) as u64,
            "{journal_syncs} journal syncs for {} tokens: no batching",
            writers * per_writer
        );
        // A repeated hash is refused and writes nothing.
        let err = store
            .put_token(&TokenHash::of("batch-0-0"), &token("c-other", 100), &ev())
            .unwrap_err();
        assert!(err.to_string().contains("token hash collision"), "{err}");
        assert_eq!(
            verify_audit_log(store.as_ref()).unwrap(),
            AuditCheck::Intact {
                entries: (writers * per_writer) as u64
            }
        );
    }
    // Every token is there after a reopen, with the audit chain.
    let store = SledStore::open(dir.path()).unwrap();
    for w in 0..writers {
        for i in 0..per_writer {
            let stored = store
                .token(&TokenHash::of(&format!("batch-{w}-{i}")))
                .unwrap()
                .expect("token kept");
            assert_eq!(stored.customer_id.as_str(), "c-batch");
        }
    }
    assert_eq!(
        store
            .token(&TokenHash::of("batch-0-0"))
            .unwrap()
            .unwrap()
            .customer_id
            .as_str(),
        "c-batch"
    );
}

#[test]
fn sled_store_commits_queued_enrollments_in_order_in_one_journal_record() {
    use super::sled::IssueJob;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let (shared, own) = (TokenHash::of("t-queue-a"), TokenHash::of("t-queue-b"));
    store
        .put_token(&shared, &token("c-queue", 100), &ev())
        .unwrap();
    store
        .put_token(&own, &token("c-queue", 100), &ev())
        .unwrap();
    let certs: Vec<_> = ["d1", "d2", "d3"]
        .iter()
        .map(|device| certificate("c-queue", device))
        .collect();
    let jobs: Vec<_> = [
        (&shared, &certs[0]),
        (&shared, &certs[1]),
        (&own, &certs[2]),
    ]
    .into_iter()
    .map(|(hash, cert)| Arc::new(IssueJob::new(hash, 7, cert, &ev()).unwrap()))
    .collect();
    assert!(jobs.iter().all(|job| job.outcome().unwrap().is_none()));

    store.commit_issue_batch(&jobs);

    let outcomes: Vec<_> = jobs.iter().map(|j| j.outcome().unwrap().unwrap()).collect();
    assert_eq!(
        outcomes,
        vec![
            IssueOutcome::Issued,
            // The second use of a token in the same batch sees the first one's write.
            IssueOutcome::TokenRejected(TokenRejection::AlreadyUsed { used_at_s: 7 }),
            IssueOutcome::Issued,
        ]
    );
    assert!(store.certificate(&certs[0].serial).unwrap().is_some());
    assert!(store.certificate(&certs[1].serial).unwrap().is_none());
    assert!(store.certificate(&certs[2].serial).unwrap().is_some());
    let used = store.token(&shared).unwrap().unwrap();
    assert_eq!(used.used_for_serial, Some(certs[0].serial.clone()));
    // Two tokens and two certificates, chained in order.
    assert_eq!(
        verify_audit_log(&store).unwrap(),
        AuditCheck::Intact { entries: 4 }
    );
}

#[test]
fn sled_store_applies_journaled_enrollments_the_database_lacks_when_it_opens() {
    use super::sled::ISSUANCE_JOURNAL_FILE;
    let dir = tempfile::tempdir().unwrap();
    let (first_hash, hash) = (TokenHash::of("t-journal-1"), TokenHash::of("t-journal-2"));
    let (first, cert) = (
        certificate("c-journal", "d1"),
        certificate("c-journal", "d2"),
    );
    {
        let store = SledStore::open(dir.path()).unwrap();
        for h in [&first_hash, &hash] {
            store.put_token(h, &token("c-journal", 100), &ev()).unwrap();
        }
        store
            .issue_with_token(&first_hash, 1, &first, &ev())
            .unwrap();
        // The second enrollment reaches the journal, then the process dies before the
        // inserts: the trees do not have it.
        store.danger_skip_apply();
        assert_eq!(
            store.issue_with_token(&hash, 2, &cert, &ev()).unwrap(),
            IssueOutcome::Issued
        );
        assert!(store.certificate(&cert.serial).unwrap().is_none());
        assert!(store.token(&hash).unwrap().unwrap().used_at_s.is_none());
        assert_eq!(
            verify_audit_log(&store).unwrap(),
            AuditCheck::Intact { entries: 3 }
        );
    }
    // A new token journaled but not applied, in a journal of its own.
    let late_token = TokenHash::of("t-journal-late");
    {
        let dir2 = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir2.path()).unwrap();
            store.danger_skip_apply();
            store
                .put_token(&late_token, &token("c-late", 100), &ev())
                .unwrap();
            assert_eq!(store.token(&late_token).unwrap(), None);
        }
        let store = SledStore::open(dir2.path()).unwrap();
        assert_eq!(
            store
                .token(&late_token)
                .unwrap()
                .unwrap()
                .customer_id
                .as_str(),
            "c-late"
        );
        assert_eq!(
            verify_audit_log(&store).unwrap(),
            AuditCheck::Intact { entries: 1 }
        );
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.certificate(&cert.serial).unwrap(), Some(cert.clone()));
    assert_eq!(
        store.token(&hash).unwrap().unwrap().used_for_serial,
        Some(cert.serial.clone())
    );
    assert_eq!(
        store.serials_by_device(&cert.device_id).unwrap(),
        vec![cert.serial.clone()]
    );
    let mut summaries = Vec::new();
    store
        .for_each_certificate_summary(&mut |s| {
            summaries.push(s);
            true
        })
        .unwrap();
    assert_eq!(summaries.len(), 2);
    assert_eq!(
        verify_audit_log(&store).unwrap(),
        AuditCheck::Intact { entries: 4 }
    );
    // Once sled has synced the batch, the journal starts over.
    let journal = dir.path().join(ISSUANCE_JOURNAL_FILE);
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);

    // A later enrollment continues the chain, and opening again applies nothing twice.
    let (later_hash, later) = (TokenHash::of("t-journal-3"), certificate("c-journal", "d3"));
    store
        .put_token(&later_hash, &token("c-journal", 100), &ev())
        .unwrap();
    assert_eq!(
        store
            .issue_with_token(&later_hash, 3, &later, &ev())
            .unwrap(),
        IssueOutcome::Issued
    );
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert!(store.certificate(&later.serial).unwrap().is_some());
    assert_eq!(
        verify_audit_log(&store).unwrap(),
        AuditCheck::Intact { entries: 6 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_async_and_blocking_enrollments_share_the_queue_and_a_token_still_works_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let (shared, own) = (
        TokenHash::of("t-mixed-shared"),
        TokenHash::of("t-mixed-own"),
    );
    for hash in [&shared, &own] {
        store
            .put_token(hash, &token("c-mixed", 100), &ev())
            .unwrap();
    }
    // Eight async and eight blocking callers race for one token.
    let certs: Vec<_> = (0..16)
        .map(|i| certificate("c-mixed", &format!("d{i}")))
        .collect();
    // Each async caller's hook says whether the write turn was held while it ran.
    let (hooks, hooks_ran) = std::sync::mpsc::channel();
    let hook = |tag: String| -> OnIssued {
        let (store, hooks) = (store.clone(), hooks.clone());
        Box::new(move || hooks.send((tag, store.write_turn_is_free())).unwrap())
    };
    let mut receivers = Vec::new();
    for cert in &certs[..8] {
        receivers.push(
            store
                .clone()
                .issue_with_token_async(&shared, 5, cert, &ev(), hook(cert.device_id.to_string()))
                .unwrap(),
        );
    }
    let blocking: Vec<_> = certs[8..]
        .iter()
        .cloned()
        .map(|cert| {
            let store = store.clone();
            std::thread::spawn(move || store.issue_with_token(&shared, 5, &cert, &ev()).unwrap())
        })
        .collect();
    let mut outcomes = Vec::new();
    for receiver in receivers {
        outcomes.push(receiver.await.expect("answered").unwrap());
    }
    // The hook ran for the async winner only (if the winner was async), under the turn.
    let async_winner = outcomes.iter().position(|o| *o == IssueOutcome::Issued);
    let ran: Vec<_> = hooks_ran.try_iter().collect();
    match async_winner {
        Some(i) => assert_eq!(ran, vec![(certs[i].device_id.to_string(), false)]),
        None => assert_eq!(ran, vec![]),
    }
    for thread in blocking {
        outcomes.push(thread.join().unwrap());
    }
    let issued = outcomes
        .iter()
        .filter(|o| **o == IssueOutcome::Issued)
        .count();
    assert_eq!(issued, 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| *o == IssueOutcome::Issued
        || matches!(
            o,
            IssueOutcome::TokenRejected(TokenRejection::AlreadyUsed { .. })
        )));

    // An async enrollment after them is answered too, durable and in the chain.
    // Its hook ran before the answer was sent, with the certificate stored.
    let last = certificate("c-mixed", "d-last");
    let outcome = store
        .clone()
        .issue_with_token_async(&own, 6, &last, &ev(), hook("d-last".into()))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, IssueOutcome::Issued);
    assert_eq!(
        hooks_ran.try_iter().collect::<Vec<_>>(),
        vec![("d-last".to_string(), false)]
    );
    assert!(store.certificate(&last.serial).unwrap().is_some());
    assert_eq!(
        verify_audit_log(store.as_ref()).unwrap(),
        AuditCheck::Intact { entries: 4 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_runs_an_async_enrollments_hook_even_when_nobody_waits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let hash = TokenHash::of("t-gone");
    store
        .put_token(&hash, &token("c-gone", 100), &ev())
        .unwrap();
    let cert = certificate("c-gone", "d-gone");
    let (ran, hook_ran) = std::sync::mpsc::channel();
    let hook_store = store.clone();
    let serial = cert.serial.clone();
    let receiver = store
        .clone()
        .issue_with_token_async(
            &hash,
            5,
            &cert,
            &ev(),
            Box::new(move || {
                // The certificate is in the trees when the hook runs.
                let stored = hook_store.certificate(&serial).unwrap().is_some();
                ran.send(stored).unwrap();
            }),
        )
        .unwrap();
    // The caller goes away (a cancelled RPC): the batch still commits and the hook runs.
    drop(receiver);
    let stored = tokio::task::spawn_blocking(move || {
        hook_ran.recv_timeout(std::time::Duration::from_secs(30))
    })
    .await
    .unwrap()
    .expect("the hook ran");
    assert!(stored);
    assert!(store.token(&hash).unwrap().unwrap().used_at_s.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_stores_async_tokens_that_enrollments_can_use() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let hashes: Vec<_> = (0..8)
        .map(|i| TokenHash::of(&format!("t-async-{i}")))
        .collect();
    let receivers: Vec<_> = hashes
        .iter()
        .map(|hash| {
            store
                .clone()
                .put_token_async(hash, &token("c-async", 100), &ev())
                .unwrap()
        })
        .collect();
    for receiver in receivers {
        assert_eq!(receiver.await.unwrap().unwrap(), IssueOutcome::Issued);
    }
    for hash in &hashes {
        assert!(store.token(hash).unwrap().is_some());
    }
    // A repeated hash is answered with the error, and the others stand.
    let repeated = store
        .clone()
        .put_token_async(&hashes[0], &token("c-other", 100), &ev())
        .unwrap()
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        repeated.to_string().contains("token hash collision"),
        "{repeated}"
    );
    let cert = certificate("c-async", "d-async");
    let outcome = store
        .clone()
        .issue_with_token_async(&hashes[3], 5, &cert, &ev(), Box::new(|| {}))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, IssueOutcome::Issued);
    assert_eq!(
        verify_audit_log(store.as_ref()).unwrap(),
        AuditCheck::Intact { entries: 9 }
    );
}

#[test]
fn a_journaled_batch_after_an_audited_sled_change_syncs_that_change_first() {
    // A batch chains its audit entries after the head a sled transaction may just have
    // written; that transaction must be durable before the batch is, or a crash could keep
    // the batch (journal) and lose the entry it links to (sled).
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let new_token = |name: &str| {
        store
            .put_token(&TokenHash::of(name), &token("c-chain", 100), &ev())
            .unwrap()
    };
    new_token("t-chain-0");
    let syncs = || store.group_commit().syncs();
    let before = syncs();
    new_token("t-chain-1");
    assert_eq!(syncs(), before, "a batch alone needs no sled sync");
    // An audited change whose writer synced before returning needs no second sync.
    let customer = CustomerId::parse("customer_id", "c-chain").unwrap();
    store.set_agreed_limit(&customer, 100, &ev()).unwrap();
    let after_limit = syncs();
    new_token("t-chain-2");
    assert_eq!(syncs(), after_limit, "the change was synced by its writer");
    // One committed under the turn whose writer has not synced yet: the batch syncs it
    // first, once.
    store.danger_note_unsynced_change();
    new_token("t-chain-3");
    assert_eq!(syncs(), after_limit + 1, "the batch synced sled first");
    new_token("t-chain-4");
    assert_eq!(syncs(), after_limit + 1, "only once");
    assert_eq!(
        verify_audit_log(&store).unwrap(),
        AuditCheck::Intact { entries: 6 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_commit_hook_leaves_the_enrollment_issued_and_the_journal_working() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let (first, second) = (TokenHash::of("t-panic-1"), TokenHash::of("t-panic-2"));
    for hash in [&first, &second] {
        store
            .put_token(hash, &token("c-panic", 100), &ev())
            .unwrap();
    }
    let cert = certificate("c-panic", "d1");
    let outcome = store
        .clone()
        .issue_with_token_async(&first, 5, &cert, &ev(), Box::new(|| panic!("hook failed")))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, IssueOutcome::Issued);
    assert!(store.certificate(&cert.serial).unwrap().is_some());
    // The journal did not stop: the next enrollment commits.
    let next = certificate("c-panic", "d2");
    let outcome = store
        .clone()
        .issue_with_token_async(&second, 5, &next, &ev(), Box::new(|| {}))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, IssueOutcome::Issued);
}

#[test]
fn sled_store_commits_a_long_queue_in_bounded_batches() {
    use super::sled::IssueJob;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let queued = 1_100;
    for i in 0..queued {
        let hash = TokenHash::of(&format!("t-backlog-{i}"));
        store.danger_queue(IssueJob::token(&hash, &token("c-backlog", 100), &ev()).unwrap());
    }
    // The blocking caller queues behind the backlog and commits it in batches of at most
    // 1,024 jobs: two journal records, its own token in the second.
    let before = store.syncs();
    let last = TokenHash::of("t-backlog-last");
    store
        .put_token(&last, &token("c-backlog", 100), &ev())
        .unwrap();
    assert_eq!(store.syncs() - before, 2);
    for i in 0..queued {
        assert!(store
            .token(&TokenHash::of(&format!("t-backlog-{i}")))
            .unwrap()
            .is_some());
    }
    assert!(store.token(&last).unwrap().is_some());
    assert_eq!(
        verify_audit_log(&store).unwrap(),
        AuditCheck::Intact {
            entries: queued as u64 + 1
        }
    );
}

#[test]
fn sled_store_empties_a_full_journal_and_keeps_every_batch() {
    use super::sled::ISSUANCE_JOURNAL_FILE;
    let dir = tempfile::tempdir().unwrap();
    let certs: Vec<_> = (0..3)
        .map(|i| certificate("c-reset", &format!("d{i}")))
        .collect();
    {
        let store = SledStore::open(dir.path()).unwrap();
        // Every batch passes the limit, so each one empties the journal after sled's sync.
        store.danger_reset_journal_past(0);
        for (i, cert) in certs.iter().enumerate() {
            let hash = TokenHash::of(&format!("t-reset-{i}"));
            store
                .put_token(&hash, &token("c-reset", 100), &ev())
                .unwrap();
            assert_eq!(store.journal_len(), 0);
            assert_eq!(
                store.issue_with_token(&hash, 1, cert, &ev()).unwrap(),
                IssueOutcome::Issued
            );
            assert_eq!(store.journal_len(), 0);
            assert_eq!(
                std::fs::metadata(dir.path().join(ISSUANCE_JOURNAL_FILE))
                    .unwrap()
                    .len(),
                0
            );
        }
    }
    let store = SledStore::open(dir.path()).unwrap();
    for cert in &certs {
        assert_eq!(store.certificate(&cert.serial).unwrap(), Some(cert.clone()));
    }
    assert_eq!(
        verify_audit_log(&store).unwrap(),
        AuditCheck::Intact { entries: 6 }
    );
}

#[test]
fn a_database_another_handle_holds_is_refused_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let _held = SledStore::open(dir.path()).unwrap();
    let started = std::time::Instant::now();
    let err = SledStore::open(dir.path()).err().expect("the lock is held");
    let message = err.to_string();
    assert!(message.contains("could not acquire lock"), "{message}");
    // The lock was tried again for the whole wait before the error.
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "{message}"
    );
}

#[test]
fn sled_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cert = certificate("c-reopen", "d");
    let hash = TokenHash::of("t-reopen");
    {
        let store = SledStore::open(dir.path()).unwrap();
        store
            .put_token(&hash, &token("c-reopen", 100), &ev())
            .unwrap();
        store.issue_with_token(&hash, 1, &cert, &ev()).unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.certificate(&cert.serial).unwrap(), Some(cert.clone()));
    assert!(store.token(&hash).unwrap().unwrap().used_at_s.is_some());

    // The verifier's summaries follow the records: issued, then revoked, then purged.
    let summaries = |store: &SledStore| {
        let mut all = Vec::new();
        store
            .for_each_certificate_summary(&mut |s| {
                all.push(s);
                true
            })
            .unwrap();
        all
    };
    assert_eq!(
        summaries(&store),
        vec![CertificateSummary::of(&cert).unwrap()]
    );
    let revocation = Revocation {
        revoked_at_s: 5,
        reason: RevocationReason::AffiliationChanged,
    };
    store
        .revoke(std::slice::from_ref(&cert.serial), &revocation, &ev())
        .unwrap()
        .unwrap();
    assert_eq!(summaries(&store)[0].revocation, Some(revocation));
    store.purge_expired_certificates(2_000, 10, &ev()).unwrap();
    assert!(summaries(&store).is_empty());
}

#[test]
fn the_key_index_is_built_for_a_database_that_lacks_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = [certificate("c-migrate", "d"), certificate("c-migrate", "e")];
    let key = |cert: &CertificateRecord| CertificateSummary::of(cert).unwrap().public_key;
    // Opens the database and checks that the index finds each certificate by its key.
    let reopened_and_indexed = || {
        let store = SledStore::open(dir.path()).unwrap();
        for cert in &certs {
            assert_eq!(
                store.certificates_with_key(&key(cert)).unwrap(),
                vec![CertificateSummary::of(cert).unwrap()]
            );
        }
        store
    };
    {
        let store = SledStore::open(dir.path()).unwrap();
        for cert in &certs {
            issue_record(&store, cert);
        }
        store.danger_clear_key_index(None).unwrap();
        assert!(store
            .certificates_with_key(&key(&certs[0]))
            .unwrap()
            .is_empty());
    }
    {
        let store = reopened_and_indexed();
        // A build a crash interrupted: the first certificate's entry is there, the second's
        // is not, and the index is not marked complete.
        let first = super::sled::key_index_key(&key(&certs[0]), &certs[0].serial);
        store.danger_clear_key_index(Some(&first)).unwrap();
        assert!(store
            .certificates_with_key(&key(&certs[1]))
            .unwrap()
            .is_empty());
    }
    // The partial index is built again.
    reopened_and_indexed();
}

#[test]
fn sled_purge_skips_what_another_run_purged_after_its_walk() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let first = issue(&store, "c-walk", "d0");
    let second = issue(&store, "c-walk", "d1");
    // This run walks (without the write turn) and finds both.
    let mut found = store.expired_candidates(2_000, 10).unwrap();
    found.sort_by(|a, b| a.serial.as_bytes().cmp(b.serial.as_bytes()));
    let mut both = vec![first.serial.clone(), second.serial.clone()];
    both.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(
        found.iter().map(|s| s.serial.clone()).collect::<Vec<_>>(),
        both
    );
    assert_eq!(store.expired_candidates(2_000, 1).unwrap().len(), 1);
    assert!(store.expired_candidates(2_000, 0).unwrap().is_empty());
    // Another run purges one of them before this one gets the turn.
    let other = store
        .purge_candidates(
            found
                .iter()
                .filter(|s| s.serial == first.serial)
                .cloned()
                .collect(),
            &ev(),
        )
        .unwrap();
    assert_eq!(other, vec![first.serial.clone()]);
    let entries = store.audit_entries(0, 1_000).unwrap().len();
    // This run deletes only what is left, and says so in its audit entry.
    assert_eq!(
        store.purge_candidates(found.clone(), &ev()).unwrap(),
        vec![second.serial.clone()]
    );
    let log = store.audit_entries(0, 1_000).unwrap();
    assert_eq!(log.len(), entries + 1);
    assert_eq!(
        log.last().unwrap().body.event.outcome,
        "1 certificate records"
    );
    assert!(store.certificate(&second.serial).unwrap().is_none());
    // Nothing left: no deletion and no audit entry.
    assert!(store.purge_candidates(found, &ev()).unwrap().is_empty());
    assert_eq!(store.audit_entries(0, 1_000).unwrap().len(), entries + 1);

    // Revoked for keyCompromise after the walk found it: kept, since it refuses its key.
    let third = issue(&store, "c-walk", "d2");
    let found = store.expired_candidates(2_000, 10).unwrap();
    assert_eq!(found.len(), 1);
    revoke_one(&store, &third.serial, RevocationReason::KeyCompromise, 5);
    assert!(store.purge_candidates(found, &ev()).unwrap().is_empty());
    assert!(store.certificate(&third.serial).unwrap().is_some());
}

#[test]
fn sled_databases_are_compressed_when_created_so_and_keep_what_they_were_made_with() {
    let compression = |dir: &std::path::Path| {
        // Lines of text, then sled's CRC.
        let conf = std::fs::read(dir.join("conf")).unwrap();
        String::from_utf8_lossy(&conf)
            .lines()
            .find_map(|line| line.strip_prefix("use_compression: "))
            .map(str::to_string)
    };
    let cert = certificate("c-zstd", "d");
    // Created compressed (store.sled_compression); opened later with the setting off, it
    // stays compressed.
    let compressed = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open_with(compressed.path(), true).unwrap();
        issue_record(&store, &cert);
    }
    assert_eq!(compression(compressed.path()).as_deref(), Some("true"));
    let store = SledStore::open(compressed.path()).unwrap();
    assert_eq!(store.certificate(&cert.serial).unwrap(), Some(cert.clone()));
    drop(store);
    assert_eq!(compression(compressed.path()).as_deref(), Some("true"));

    // Created plain (the default, and what payra made before), then opened with the setting
    // on: it stays plain, since sled refuses to change it.
    let old = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(old.path()).unwrap();
        issue_record(&store, &cert);
    }
    assert_eq!(compression(old.path()).as_deref(), Some("false"));
    let store = SledStore::open_with(old.path(), true).unwrap();
    assert_eq!(store.certificate(&cert.serial).unwrap(), Some(cert));
    assert_eq!(compression(old.path()).as_deref(), Some("false"));
    drop(store);

    // A database whose conf file is empty, cut short or gone is refused, not opened with a
    // guess.
    let conf = std::fs::read(old.path().join("conf")).unwrap();
    for damaged in [Some(Vec::new()), Some(conf[..20].to_vec()), None] {
        match &damaged {
            Some(bytes) => std::fs::write(old.path().join("conf"), bytes).unwrap(),
            None => std::fs::remove_file(old.path().join("conf")).unwrap(),
        }
        let refused = SledStore::open_with(old.path(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(refused.contains("conf file"), "{refused}");
        assert_eq!(
            std::fs::read(old.path().join("conf")).ok(),
            damaged,
            "left as it was"
        );
    }
}

#[test]
fn summaries_are_built_for_a_database_that_lacks_them() {
    let dir = tempfile::tempdir().unwrap();
    let certs = [certificate("c-migrate", "d"), certificate("c-migrate", "e")];
    let summaries = |store: &SledStore| {
        let mut all = Vec::new();
        store
            .for_each_certificate_summary(&mut |s| {
                all.push(s);
                true
            })
            .unwrap();
        all.sort_by(|a, b| a.serial.as_bytes().cmp(b.serial.as_bytes()));
        all
    };
    let mut expected: Vec<_> = certs
        .iter()
        .map(|c| CertificateSummary::of(c).unwrap())
        .collect();
    expected.sort_by(|a, b| a.serial.as_bytes().cmp(b.serial.as_bytes()));
    {
        let store = SledStore::open(dir.path()).unwrap();
        for cert in &certs {
            issue_record(&store, cert);
        }
        store.danger_clear_summaries().unwrap();
    }
    {
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(summaries(&store), expected);
        // A build a crash interrupted: one summary on disk, the build still marked.
        store
            .danger_interrupt_summaries_build(&certs[0].serial)
            .unwrap();
        assert_eq!(summaries(&store).len(), 1);
    }
    // The partial tree is built again, whole.
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(summaries(&store), expected);
}

#[test]
fn records_stored_as_json_still_read_and_are_rewritten_compact() {
    let dir = tempfile::tempdir().unwrap();
    let mut old = certificate("c-json", "d");
    old.certificate_b64 = CertificateRecord::encode_der(&[0x30, 0x03, 0x02, 0x01, 0x07]);
    old.subscriber_ref = Some("00112233445566778899aabbccddeeff".into());
    let mut held = certificate("c-json", "e");
    held.certificate_b64 = old.certificate_b64.clone();
    {
        let store = SledStore::open(dir.path()).unwrap();
        issue_record(&store, &old);
        issue_record(&store, &held);
        store.danger_store_as_json(&old.serial).unwrap();
        store.danger_store_as_json(&held.serial).unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.danger_stored_form(&old.serial).unwrap(), b'{');
    assert_eq!(store.certificate(&old.serial).unwrap(), Some(old.clone()));
    let listed = store.certificates_after(None, 10).unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&old) && listed.contains(&held));

    // A renewal and a revocation rewrite the records they change, in the compact form.
    let mut new = certificate("c-json", "d");
    new.public_key_hex = old.public_key_hex.clone();
    new.renewed_from = Some(old.serial.clone());
    store.renew(&old.serial, &new, 7, &ev()).unwrap().unwrap();
    let renewed = store.certificate(&old.serial).unwrap().unwrap();
    assert_eq!(renewed.superseded_by, Some(new.serial.clone()));
    assert_eq!(renewed.certificate_b64, old.certificate_b64);
    let hold = Revocation {
        revoked_at_s: 8,
        reason: RevocationReason::CertificateHold,
    };
    store
        .revoke(std::slice::from_ref(&held.serial), &hold, &ev())
        .unwrap()
        .unwrap();
    assert_eq!(
        store.certificate(&held.serial).unwrap().unwrap(),
        CertificateRecord {
            revocation: Some(hold),
            ..held.clone()
        }
    );
    assert_eq!(store.certificate(&new.serial).unwrap(), Some(new.clone()));
    for serial in [&old.serial, &held.serial, &new.serial] {
        assert_eq!(store.danger_stored_form(serial).unwrap(), 0xC2);
    }
}

#[test]
fn a_record_the_compact_form_cannot_hold_is_stored_as_json_and_still_revocable() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut damaged = certificate("c-damaged", "d");
    damaged.certificate_b64 = "AA!C".into();
    issue_record(&store, &damaged);
    assert_eq!(store.danger_stored_form(&damaged.serial).unwrap(), b'{');
    let revocation = Revocation {
        revoked_at_s: 9,
        reason: RevocationReason::KeyCompromise,
    };
    store
        .revoke(std::slice::from_ref(&damaged.serial), &revocation, &ev())
        .unwrap()
        .unwrap();
    assert_eq!(
        store.certificate(&damaged.serial).unwrap().unwrap(),
        CertificateRecord {
            revocation: Some(revocation),
            ..damaged
        }
    );
}

/// PostgreSQL reads the summary's octets in SQL (the count, retention's keyCompromise
/// filter). A summary of a layout this build does not know is refused by the count, not read
/// at the wrong offsets, and retention leaves its certificate alone.
#[test]
fn postgres_summaries_of_another_version_are_neither_counted_nor_purged() {
    let name = "conformance::postgres_summaries_of_another_version";
    let Some((store, config)) = crate::store::postgres::testing::fresh_store_and_config(name)
    else {
        return;
    };
    let known = issue(&store, "c-v1", "d-v1");
    let unknown = issue(&store, "c-v2", "d-v2");
    // Version 2, and shorter than any offset version 1 has past its key.
    let sql = format!(
        "UPDATE certificates SET summary = set_byte(substring(summary FROM 1 FOR 40), 0, 2) \
         WHERE serial = '\\x{}'",
        hex::encode(unknown.serial.as_bytes())
    );
    crate::store::postgres::testing::on_database(&config, &[sql]);

    let go_on = std::sync::atomic::AtomicBool::new(false);
    let refused = store.count_by_standing(500, 0, &go_on).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("certificate summary of version 2"),
        "{refused}"
    );
    // Both expired long ago; only the one whose summary this build reads is purged.
    let purged = store.purge_expired_certificates(2_000, 100, &ev()).unwrap();
    assert_eq!(purged, vec![known.serial.clone()]);
    assert!(store.certificate(&unknown.serial).unwrap().is_some());
}
