//! The decision log's tests: recovery, torn ends, checkpoints, segments, golden records.

use super::*;
use crate::model::{CustomerId, Tier};
use crate::store::{Actor, RECORD_VERSION};

fn decision(seq_time: i64, reserved_fen: i64, nonce: Option<(String, i64)>) -> Vec<u8> {
    let record = LogRecord::Decision {
        evidence: Box::new(EvidenceRecord {
            version: RECORD_VERSION,
            evidence_id: format!("ev_{seq_time}"),
            kind: "verify_payment".into(),
            recorded_at_ms: seq_time,
            certificate_serial: None,
            customer_id: Some(CustomerId::parse("customer_id", "alice").unwrap()),
            intent_b64: String::new(),
            signature_b64: String::new(),
            verdict: "VERIFIED".into(),
            reason: String::new(),
            tier: Tier::B,
            categories: vec![],
            factors: vec![],
            amount_fen: reserved_fen,
            reserved_fen,
            day: "2026-11-25".into(),
            released_at_ms: None,
            certificate_factor_note: None,
        }),
        nonce,
        audit: AuditEvent::new(seq_time, &Actor::system(), "payment.verified", "x", "ok"),
    };
    serde_json::to_vec(&record).unwrap()
}

fn key() -> Vec<u8> {
    crate::store::ledger_key(
        &CustomerId::parse("customer_id", "alice").unwrap(),
        "2026-11-25",
        Tier::B,
    )
}

fn open(dir: &Path, checkpoint: LedgerCheckpoint, now_ms: i64) -> (DecisionLog, Vec<Vec<u8>>) {
    let mut nonces = Vec::new();
    let log =
        DecisionLog::open(dir, checkpoint, now_ms, 1_000, &mut |k, _| nonces.push(k)).unwrap();
    (log, nonces)
}

fn reserve(log: &DecisionLog, at: i64, amount: i64) -> u64 {
    let seq = log
        .append(|_, books| {
            books.add_reservation(&key(), amount);
            Ok((decision(at, amount, None), ()))
        })
        .unwrap()
        .0;
    log.durable_blocking(seq).unwrap();
    seq
}

#[test]
fn records_survive_a_reopen_with_ledger_nonces_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    let first = reserve(&log, 10, 300);
    let (second, ()) = log
        .append(|_, _| Ok((decision(20, 0, Some(("abcd".into(), 5_000))), ())))
        .unwrap();
    log.durable_blocking(second).unwrap();
    assert_eq!((first, second), (1, 2));
    assert!(matches!(
        log.read(2).unwrap(),
        Some(LogRecord::Decision { .. })
    ));
    assert_eq!(log.read(3).unwrap(), None);
    log.close().unwrap();
    drop(log);

    let (log, nonces) = open(dir.path(), LedgerCheckpoint::default(), 100);
    assert_eq!(log.with_books(|b| b.used(&key())), 300);
    assert_eq!(nonces, vec![vec![0xab, 0xcd]]);
    assert_eq!(reserve(&log, 30, 100), 3);
    log.close().unwrap();
    assert_eq!(
        DecisionLog::verify(dir.path()).unwrap(),
        ChainCheck::Intact { records: 3 }
    );
}

#[test]
fn a_nonce_is_handed_over_through_the_millisecond_of_its_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    for (nonce, expires_at_ms) in [("aa", 499), ("bb", 500)] {
        let (seq, ()) = log
            .append(|_, _| Ok((decision(20, 0, Some((nonce.into(), expires_at_ms))), ())))
            .unwrap();
        log.durable_blocking(seq).unwrap();
    }
    log.close().unwrap();
    drop(log);
    // At 500 the timestamp check still accepts the second intent: its nonce must be held.
    let (log, nonces) = open(dir.path(), LedgerCheckpoint::default(), 500);
    assert_eq!(nonces, vec![vec![0xbb]]);
    log.close().unwrap();
}

/// Records as version 1 wrote them. If this fails, old logs no longer read: add a new
/// record kind or an optional field instead of changing these.
#[test]
fn golden_v1_log_records_still_parse() {
    let decision = r#"{"kind":"decision","evidence":{"version":1,
        "evidence_id":"ev_000000000000002a0123456789abcdef","kind":"verify_payment",
        "recorded_at_ms":1764000000123,"certificate_serial":"4a1b2c3d4e5f60718293a4b5c6d7e8f9",
        "customer_id":"cust-1","intent_b64":"CgE=","signature_b64":"MEQ=","verdict":"VERIFIED",
        "reason":"","tier":"A","categories":["knowledge","possession"],
        "factors":[{"category":"knowledge","method":"payment_pin"}],"amount_fen":1234,
        "reserved_fen":1234,"day":"2025-11-25","released_at_ms":null},
        "nonce":["104a1b",1764000120123],
        "audit":{"at_ms":1764000000123,"actor":{"role":"service","fingerprint":"ab"},
        "action":"payment.verified","target":"ev_000000000000002a0123456789abcdef",
        "outcome":"VERIFIED tier A; reserved 1234 fen"}}"#;
    match serde_json::from_str::<LogRecord>(decision).unwrap() {
        LogRecord::Decision {
            evidence, nonce, ..
        } => {
            assert_eq!(evidence.reserved_fen, 1234);
            assert_eq!(nonce, Some(("104a1b".into(), 1_764_000_120_123)));
        }
        other => panic!("{other:?}"),
    }
    let release = r#"{"kind":"release","decision_seq":42,
        "evidence_id":"ev_000000000000002a0123456789abcdef","ledger_key_hex":"6300",
        "amount_fen":1234,"released_at_ms":1764000060000,
        "audit":{"at_ms":1764000060000,"actor":{"role":"service","fingerprint":"ab"},
        "action":"reservation.released","target":"ev_000000000000002a0123456789abcdef",
        "outcome":"ok"}}"#;
    assert!(matches!(
        serde_json::from_str::<LogRecord>(release).unwrap(),
        LogRecord::Release {
            decision_seq: 42,
            amount_fen: 1234,
            ..
        }
    ));
}

#[test]
fn a_log_behind_the_checkpoint_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    reserve(&log, 10, 300);
    log.close().unwrap();
    drop(log);
    let checkpoint = LedgerCheckpoint {
        through_seq: 5,
        ..LedgerCheckpoint::default()
    };
    let refused = DecisionLog::open(dir.path(), checkpoint, 0, 1, &mut |_, _| {});
    assert!(
        matches!(&refused, Err(Error::FailedPrecondition(m)) if m.contains("ends at record 1")),
        "{:?}",
        refused.err()
    );
}

#[test]
fn past_days_buckets_are_forgotten_but_never_the_two_newest_days() {
    let alice = CustomerId::parse("customer_id", "alice").unwrap();
    let bob = CustomerId::parse("customer_id", "bob.2026-11-30").unwrap();
    let bucket = |customer, day| crate::store::ledger_key(customer, day, Tier::B);
    let gone = |books: &mut Books, min_day| books.forget_days_before(min_day).bucket_count();
    let mut books = Books::default();
    for (customer, day) in [
        (&alice, "2026-11-20"),
        (&alice, "2026-11-24"),
        (&alice, "2026-11-25"),
        (&bob, "2026-11-23"),
        (&bob, "2026-11-25"),
    ] {
        books.add_reservation(&bucket(customer, day), 100);
    }
    assert_eq!(gone(&mut books, "2026-11-24"), 2);
    assert_eq!(books.bucket_count(), 3);
    assert_eq!(books.used(&bucket(&alice, "2026-11-20")), 0);
    assert_eq!(books.used(&bucket(&bob, "2026-11-23")), 0);
    assert_eq!(books.used(&bucket(&alice, "2026-11-24")), 100);
    assert_eq!(books.used(&bucket(&alice, "2026-11-25")), 100);
    assert_eq!(books.used(&bucket(&bob, "2026-11-25")), 100);
    // Kept days stay to be checkpointed; forgotten ones are not saved as zero.
    let dirty = books.take_dirty();
    assert_eq!(dirty.len(), 3);
    assert!(!dirty.contains(&bucket(&alice, "2026-11-20")));
    for key in dirty {
        books.mark_dirty(key);
    }
    assert_eq!(gone(&mut books, "2026-11-24"), 0, "nothing more to forget");

    // A clock days ahead: the two newest days with buckets stay all the same.
    assert_eq!(gone(&mut books, "2026-12-30"), 0);
    assert_eq!(books.bucket_count(), 3);
    books.add_reservation(&bucket(&alice, "2026-12-31"), 100);
    assert_eq!(gone(&mut books, "2026-12-30"), 1, "only 2026-11-24 goes");
    assert_eq!(books.used(&bucket(&bob, "2026-11-25")), 100);

    // A past day that comes back (a release replayed at start) goes again at the next
    // sweep. (The RA refuses new releases of days before yesterday.)
    books.release(1, &bucket(&alice, "2026-11-20"), 100, 0);
    assert_eq!(books.bucket_count(), 4);
    assert_eq!(gone(&mut books, "2026-11-25"), 1);
    assert_eq!(books.released_at(1), Some(0), "releases are all kept");
}

#[test]
fn a_release_is_replayed_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    let decision = reserve(&log, 10, 300);
    let (seq, used) = log
        .append(|_, books| {
            let used = books.release(decision, &key(), 300, 20);
            let record = LogRecord::Release {
                decision_seq: decision,
                evidence_id: "ev_10".into(),
                ledger_key_hex: hex::encode(key()),
                amount_fen: 300,
                released_at_ms: 20,
                audit: AuditEvent::new(20, &Actor::system(), "reservation.released", "x", "ok"),
            };
            Ok((serde_json::to_vec(&record).unwrap(), used))
        })
        .unwrap();
    log.durable_blocking(seq).unwrap();
    assert_eq!(used, 0);
    log.close().unwrap();
    drop(log);
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 100);
    assert_eq!(log.with_books(|b| b.used(&key())), 0);
    assert_eq!(log.with_books(|b| b.released_at(decision)), Some(20));
}

#[test]
fn a_checkpoint_is_not_replayed_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    reserve(&log, 10, 300);
    let checkpoint = log.take_checkpoint().unwrap();
    assert_eq!(checkpoint.through_seq, 1);
    assert_eq!(checkpoint.buckets, vec![(key(), 300)]);
    reserve(&log, 20, 200);
    log.close().unwrap();
    drop(log);
    let (log, _) = open(dir.path(), checkpoint, 100);
    assert_eq!(log.with_books(|b| b.used(&key())), 500);
}

#[test]
fn a_torn_tail_is_cut_and_damage_elsewhere_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    reserve(&log, 10, 300);
    reserve(&log, 20, 200);
    log.close().unwrap();
    drop(log);
    let path = segment_path(dir.path(), 1);
    let full = std::fs::read(&path).unwrap();
    // A crash in the middle of the second frame's write.
    std::fs::write(&path, &full[..full.len() - 7]).unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 100);
    assert_eq!(log.with_books(|b| b.used(&key())), 300);
    assert_eq!(reserve(&log, 30, 50), 2);
    log.close().unwrap();
    drop(log);
    assert_eq!(
        DecisionLog::verify(dir.path()).unwrap(),
        ChainCheck::Intact { records: 2 }
    );

    // A flipped byte inside the first record is damage, not a torn write: the start is
    // refused, and the check names where the damage starts.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[60] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        DecisionLog::verify(dir.path()).unwrap(),
        ChainCheck::Broken { seq: 1, .. }
    ));
    let refused = DecisionLog::open(
        dir.path(),
        LedgerCheckpoint::default(),
        0,
        1,
        &mut |_, _| {},
    );
    assert!(
        matches!(&refused, Err(Error::FailedPrecondition(m)) if m.contains("has changed nothing")),
        "{:?}",
        refused.err()
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");

    // Zeros after the last record (space the file system never filled) are cut.
    bytes[60] ^= 1;
    bytes.extend_from_slice(&[0; 4096]);
    std::fs::write(&path, &bytes).unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 100);
    assert_eq!(log.with_books(|b| b.used(&key())), 350);
}

/// Byte offsets of every frame in `bytes`.
fn frame_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut offset = 0;
    while let Some(frame) = frame_at(bytes, offset) {
        offsets.push(offset);
        offset += frame.raw.len();
    }
    offsets
}

fn refused(dir: &Path, checkpoint: LedgerCheckpoint) -> String {
    match DecisionLog::open(dir, checkpoint, 0, 1, &mut |_, _| {}) {
        Err(Error::FailedPrecondition(message)) => message,
        Err(other) => panic!("refused with {other:?}"),
        Ok(_) => panic!("opened a damaged log"),
    }
}

#[test]
fn a_flipped_length_mid_segment_is_damage_and_nothing_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    for n in 0..30 {
        reserve(&log, n, 10);
    }
    log.close().unwrap();
    drop(log);
    let path = segment_path(dir.path(), 1);
    let intact = std::fs::read(&path).unwrap();
    let tenth = frame_offsets(&intact)[9];
    // A length no writer produces (over the largest record), and one that is plausible
    // but runs past the end: both leave intact later records, so both are damage.
    for flip in [(tenth + 3, 0x40u8), (tenth + 2, 0x01u8)] {
        let mut bytes = intact.clone();
        bytes[flip.0] ^= flip.1;
        std::fs::write(&path, &bytes).unwrap();
        let message = refused(dir.path(), LedgerCheckpoint::default());
        assert!(message.contains("damaged"), "{message}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");
        assert!(matches!(
            DecisionLog::verify(dir.path()).unwrap(),
            ChainCheck::Broken { seq: 10, .. }
        ));
    }
    std::fs::write(&path, &intact).unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 100);
    assert_eq!(
        log.with_books(|b| b.used(&key())),
        300,
        "all 30 records kept"
    );
}

#[test]
fn a_torn_tail_is_kept_aside_and_only_cut_after_the_checkpoint_check() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    for n in 0..3 {
        reserve(&log, n, 10);
    }
    log.close().unwrap();
    drop(log);
    let path = segment_path(dir.path(), 1);
    let full = std::fs::read(&path).unwrap();
    let torn = &full[..full.len() - 5];
    std::fs::write(&path, torn).unwrap();

    // A checkpoint past the log's end refuses the start before anything is cut.
    let ahead = LedgerCheckpoint {
        through_seq: 5,
        ..LedgerCheckpoint::default()
    };
    let message = refused(dir.path(), ahead);
    assert!(message.contains("ledger checkpoint"), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), torn, "untouched");

    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 100);
    assert_eq!(log.with_books(|b| b.used(&key())), 20);
    drop(log);
    let third = frame_offsets(&full)[2];
    assert_eq!(std::fs::read(&path).unwrap(), &full[..third]);
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".log.cut-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), &torn[third..]);
}

#[test]
fn zeros_before_surviving_pages_of_a_batch_are_torn_unless_a_signed_head_covers_them() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    for n in 0..5 {
        reserve(&log, n, 10);
    }
    log.close().unwrap();
    drop(log);
    let path = segment_path(dir.path(), 1);
    let intact = std::fs::read(&path).unwrap();
    let offsets = frame_offsets(&intact);
    // Record 3's page never reached the disk (zeros); records 4 and 5 did.
    let mut bytes = intact.clone();
    bytes[offsets[2]..offsets[3]].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    // A signed head covering record 4 says it was durable: refused, untouched.
    let refused = DecisionLog::open_signed(
        dir.path(),
        LedgerCheckpoint::default(),
        4,
        0,
        1,
        &mut |_, _| {},
    );
    assert!(
        matches!(&refused, Err(Error::FailedPrecondition(m)) if m.contains("signed audit head")),
        "{:?}",
        refused.err()
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");
    // Covered by nothing: the torn batch is cut (and kept aside).
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 100);
    assert_eq!(log.with_books(|b| b.used(&key())), 20);
    drop(log);
    assert_eq!(std::fs::read(&path).unwrap(), &intact[..offsets[2]]);
}

#[test]
fn segments_roll_over_and_lookups_find_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    let padding = "x".repeat(200 * 1024);
    let mut last = 0;
    for i in 0..100 {
        let mut record = decision(i, 0, None);
        if let LogRecord::Decision { evidence, .. } = &mut decode(&record, 0).unwrap() {
            evidence.reason = padding.clone();
            record = serde_json::to_vec(&LogRecord::Decision {
                evidence: evidence.clone(),
                nonce: None,
                audit: AuditEvent::new(i, &Actor::system(), "a", "t", "o"),
            })
            .unwrap();
        }
        let (seq, ()) = log.append(|_, _| Ok((record, ()))).unwrap();
        log.durable_blocking(seq).unwrap();
        last = seq;
    }
    assert!(list_segments(dir.path()).unwrap().len() > 1);
    for seq in [1, 50, last] {
        match log.read(seq).unwrap() {
            Some(LogRecord::Decision { evidence, .. }) => {
                assert_eq!(evidence.recorded_at_ms, (seq - 1) as i64)
            }
            other => panic!("record {seq}: {other:?}"),
        }
    }
    log.close().unwrap();
    assert_eq!(
        DecisionLog::verify(dir.path()).unwrap(),
        ChainCheck::Intact { records: 100 }
    );
    let mut frames = Vec::new();
    let (log, _) = open(dir.path(), LedgerCheckpoint::default(), 0);
    log.for_each_frame(&mut |_, raw| {
        frames.push(raw.to_vec());
        Ok(())
    })
    .unwrap();
    let copy = tempfile::tempdir().unwrap();
    let mut importer = LogImporter::new(copy.path()).unwrap();
    for frame in &frames {
        importer.push(frame).unwrap();
    }
    assert_eq!(importer.finish().unwrap(), 100);
    assert_eq!(
        DecisionLog::verify(copy.path()).unwrap(),
        ChainCheck::Intact { records: 100 }
    );
}
