//! The decision log: every VerifyPayment and QualifyTransaction decision, and every release of
//! a reservation, appended to segment files and made durable by one `fdatasync` per batch.
//!
//! Why a log and not sled: a decision touches the nonce set, the evidence, the ledger and the
//! audit chain. In sled that is a multi-tree transaction of four B-tree inserts, each copying
//! the node it changes, and it cost about 300 µs of CPU per payment. Here a decision is one
//! JSON record appended to a buffer under a short lock; a dedicated writer thread frames,
//! hash-chains and writes every queued record with one `write` and one `fdatasync`, then wakes
//! the callers. Nothing is acknowledged before the `fdatasync` that covers it returns.
//!
//! What lives where:
//! - **Nonces**: the in-memory replay set is authoritative while running; at start it is
//!   rebuilt from the records still inside the nonce horizon.
//! - **Ledger** ([`Books`]): in memory, changed under the same lock that assigns the record's
//!   sequence number, so reservations apply in log order. A checkpoint (buckets, releases and
//!   the sequence number they cover) is saved to sled every few seconds and at shutdown; at
//!   start the records after it are replayed.
//! - **Evidence**: the decision record itself. Its id carries its sequence number
//!   (`ev_<16 hex seq><16 hex random>`), so a lookup goes straight to the segment.
//! - **Audit**: the records form their own SHA-256 chain (the decision chain), checked by
//!   `payra audit verify` beside the change chain in sled.
//!
//! Files: `<data>/decisions/<first seq, 20 digits>.log`, a new one after 16 MiB. A frame is
//! `len u32 LE | crc32 u32 LE | seq u64 LE | hash [32] | JSON`, where `len` counts everything
//! after the crc, the crc covers the same bytes, and `hash = SHA-256(prev_hash || seq LE ||
//! JSON)` with the genesis hash of 32 zero bytes. A torn frame at the end of the newest
//! segment (a crash during a write, never acknowledged) is cut off at start; damage anywhere
//! else refuses the start with the segment and offset named.

use crate::sync::Unpoisoned;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::audit::{AuditEvent, GENESIS_HASH};
use crate::store::records::EvidenceRecord;

/// A segment is closed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Under load the writer waits up to [`LINGER`] for this many records before it syncs.
const BATCH_TARGET: usize = 128;
/// How long the writer may wait for a fuller batch once load is high.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
/// Load counts as high when the previous batch held at least this many records; below it,
/// each batch is synced at once (the latency at moderate rates stays one sync).
const LINGER_AFTER_BATCH: usize = 16;
/// Largest record accepted (an intent is at most 4 KiB; a record is a few KiB at most).
const MAX_RECORD_BYTES: usize = 256 * 1024;
/// `len` + `crc`.
const PREFIX: usize = 8;
/// `seq` + `hash`.
const FIXED: usize = 8 + 32;

/// One entry of the decision log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogRecord {
    /// A verification or qualification, with what it claimed and reserved.
    Decision {
        evidence: Box<EvidenceRecord>,
        /// The (certificate, nonce) key claimed, hex, and when it may be forgotten.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<(String, i64)>,
        audit: AuditEvent,
    },
    /// A reservation given back.
    Release {
        decision_seq: u64,
        evidence_id: String,
        ledger_key_hex: String,
        amount_fen: i64,
        released_at_ms: i64,
        audit: AuditEvent,
    },
}

mod books;
mod frames;
mod offline;
pub use offline::LogImporter;

pub use books::{Books, ForgottenDays, LedgerCheckpoint};
use frames::*;

/// How far the log is on stable storage, or why it stopped.
#[derive(Debug, Default)]
struct Durable {
    through: u64,
    /// The hash of record `through` (the genesis hash for an empty log).
    head_hash: [u8; 32],
    failed: Option<String>,
    /// Async callers waiting for a record beyond `through`. The writer wakes exactly those
    /// its sync covered; a dropped sender (write failure, shutdown) wakes the rest.
    waiters: Vec<(u64, tokio::sync::oneshot::Sender<()>)>,
}

impl Durable {
    /// Marks everything through `seq` durable; returns the waiters that covers.
    fn advance(&mut self, seq: u64) -> Vec<tokio::sync::oneshot::Sender<()>> {
        self.through = seq;
        let (done, waiting) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition::<Vec<_>, _>(|(wanted, _)| *wanted <= seq);
        self.waiters = waiting;
        done.into_iter().map(|(_, sender)| sender).collect()
    }
}

struct Append {
    next_seq: u64,
    pending: Vec<(u64, Vec<u8>)>,
    books: Books,
    failed: Option<String>,
    closing: bool,
}

struct Shared {
    dir: PathBuf,
    append: Mutex<Append>,
    work: Condvar,
    durable: Mutex<Durable>,
    durable_changed: Condvar,
    /// First sequence number of each segment file, ascending.
    segments: Mutex<Vec<u64>>,
    syncs: std::sync::atomic::AtomicU64,
}

/// The decision log; see the module documentation.
pub struct DecisionLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The error every caller gets once a write or sync of the log failed.
fn write_failed(failed: &str) -> Error {
    Error::internal(format!("writing the decision log: {failed}"))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unpoisoned()
}

/// The outcome of checking the whole decision chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainCheck {
    Intact { records: u64 },
    Broken { seq: u64, reason: String },
}

impl DecisionLog {
    /// Opens (or creates) the log in `dir`, replays what the checkpoint does not cover into
    /// the books, and hands every nonce that is still live at `now_ms` to `claim`. Records
    /// older than `nonce_horizon_ms` hold no live nonce.
    pub fn open(
        dir: &Path,
        checkpoint: LedgerCheckpoint,
        now_ms: i64,
        nonce_horizon_ms: i64,
        claim: &mut dyn FnMut(Vec<u8>, i64),
    ) -> Result<DecisionLog> {
        Self::open_signed(dir, checkpoint, 0, now_ms, nonce_horizon_ms, claim)
    }

    /// [`DecisionLog::open`], also refusing a log that ends before `signed_through`, the last
    /// record a signed audit head covers (it was durable when the head was signed).
    pub fn open_signed(
        dir: &Path,
        checkpoint: LedgerCheckpoint,
        signed_through: u64,
        now_ms: i64,
        nonce_horizon_ms: i64,
        claim: &mut dyn FnMut(Vec<u8>, i64),
    ) -> Result<DecisionLog> {
        let started = std::time::Instant::now();
        std::fs::create_dir_all(dir)?;
        let mut firsts = list_segments(dir)?;
        if firsts.is_empty() {
            File::create(segment_path(dir, 1))?.sync_all()?;
            sync_dir(dir)?;
            firsts.push(1);
        }
        let mut books = Books::default();
        for (key, used) in &checkpoint.buckets {
            books.set(key, *used);
        }
        books.released.extend(checkpoint.released.iter().copied());

        // Scan back from the newest segment until the ledger checkpoint and the nonce horizon
        // are both covered, then apply forward in log order.
        let newest = *firsts.last().unwrap_or(&1);
        let mut scanned: Vec<(u64, Vec<u8>)> = Vec::new();
        // Nothing is written until every check below has passed.
        let mut torn_end = None;
        for &first in firsts.iter().rev() {
            let path = segment_path(dir, first);
            let mut bytes = read_segment(dir, first)?;
            let mut last_seq = None;
            let valid = walk(&bytes, |frame| {
                last_seq = Some(frame.seq);
                Ok(())
            })?;
            if valid < bytes.len() {
                let next_seq = last_seq.map_or(first, |seq| seq + 1);
                if first != newest || !torn_write(&bytes[valid..], next_seq) {
                    return Err(Error::FailedPrecondition(format!(
                        "decision log segment {}: {} bytes from byte {valid} are damaged, and \
                         they are not the torn end of an interrupted write; payra will not \
                         start over acknowledged records it cannot read, and has changed \
                         nothing. Restore the data directory from a backup (database and \
                         decisions/ together); `payra audit verify` names the first broken \
                         record",
                        path.display(),
                        bytes.len() - valid
                    )));
                }
                torn_end = Some(TornEnd {
                    path: path.clone(),
                    valid,
                    cut: bytes.split_off(valid),
                });
            }
            let oldest_time = match frame_at(&bytes, 0) {
                Some(frame) => Some(record_time(&decode(frame.json, frame.seq)?)),
                None => None,
            };
            scanned.push((first, bytes));
            let ledger_covered = first <= checkpoint.through_seq + 1;
            let nonces_covered = oldest_time.is_some_and(|t| t < now_ms - nonce_horizon_ms);
            let has_tail = scanned.iter().any(|(_, b)| !b.is_empty());
            if ledger_covered && (nonces_covered || first == firsts[0]) && has_tail {
                break;
            }
            if first == firsts[0] {
                break;
            }
        }
        scanned.reverse();

        let mut prev: Option<[u8; 32]> = None;
        let mut last_seq = 0u64;
        for (first, bytes) in &scanned {
            let mut expected = *first;
            walk(bytes, |frame| {
                if frame.seq != expected {
                    return Err(Error::internal(format!(
                        "decision log segment {first:020}: expected record {expected}, found {}",
                        frame.seq
                    )));
                }
                if let Some(prev) = &prev {
                    if link_hash(prev, frame.seq, frame.json) != frame.hash {
                        return Err(Error::internal(format!(
                            "decision log record {} does not chain to the one before it",
                            frame.seq
                        )));
                    }
                }
                let record = decode(frame.json, frame.seq)?;
                if frame.seq > checkpoint.through_seq {
                    books.apply(frame.seq, &record)?;
                }
                if let LogRecord::Decision {
                    nonce: Some((key, expires_at_ms)),
                    ..
                } = &record
                {
                    // Live through the millisecond of its expiry, as in the replay set.
                    if *expires_at_ms >= now_ms {
                        if let Ok(key) = hex::decode(key) {
                            claim(key, *expires_at_ms);
                        }
                    }
                }
                prev = Some(frame.hash);
                last_seq = frame.seq;
                expected += 1;
                Ok(())
            })?;
        }
        // The chain's head: the last record's hash, or genesis for an empty log. An empty log
        // whose segment does not start at 1 lost its records: refuse rather than fork.
        let prev = match prev {
            Some(hash) => hash,
            None if firsts == [1] => GENESIS_HASH,
            None => {
                return Err(Error::internal(
                    "the decision log's newest segments are empty but older ones exist",
                ))
            }
        };
        let next_seq = if last_seq == 0 { newest } else { last_seq + 1 };
        // The ledger checkpoint covers records the log must hold. A log that ends before it
        // lost records (a deleted or replaced directory): numbering again from there would
        // reuse evidence ids and skip reservations at the next replay.
        if next_seq <= checkpoint.through_seq {
            return Err(Error::FailedPrecondition(format!(
                "the decision log in {} ends at record {}, but the ledger checkpoint in the \
                 database covers records up to {}: decision records are missing. Restore \
                 the data directory (database and decisions/ together) from a backup",
                dir.display(),
                next_seq - 1,
                checkpoint.through_seq
            )));
        }
        if next_seq <= signed_through {
            return Err(Error::FailedPrecondition(format!(
                "the decision log in {} ends at record {}, but a signed audit head covers \
                 records up to {signed_through}: decision records are missing or damaged. \
                 Nothing was changed; restore the data directory from a backup",
                dir.display(),
                next_seq - 1
            )));
        }
        if let Some(torn_end) = torn_end {
            torn_end.apply(dir, now_ms)?;
        }
        books.dirty = books
            .buckets
            .iter()
            .map(|(day, buckets)| (day.clone(), buckets.keys().cloned().collect()))
            .collect();

        tracing::info!(
            segments = scanned.len(),
            last_record = next_seq - 1,
            checkpoint = checkpoint.through_seq,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "decision log opened: replayed the records after the ledger checkpoint and the nonce horizon"
        );
        let path = segment_path(dir, newest);
        let file = OpenOptions::new().append(true).open(&path)?;
        let length = file.metadata()?.len();
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            append: Mutex::new(Append {
                next_seq,
                pending: Vec::new(),
                books,
                failed: None,
                closing: false,
            }),
            work: Condvar::new(),
            durable: Mutex::new(Durable {
                through: next_seq - 1,
                head_hash: prev,
                ..Durable::default()
            }),
            durable_changed: Condvar::new(),
            segments: Mutex::new(firsts),
            syncs: std::sync::atomic::AtomicU64::new(0),
        });
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("payra-decision-log".into())
            .spawn(move || {
                Writer {
                    shared: writer_shared,
                    file,
                    length,
                    prev,
                }
                .run()
            })?;
        Ok(DecisionLog {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The decision chain's head as far as it is on stable storage.
    pub fn durable_head(&self) -> crate::store::ChainHead {
        let durable = lock(&self.shared.durable);
        crate::store::ChainHead {
            seq: durable.through,
            hash: durable.head_hash,
        }
    }

    /// Appends one record. `build` gets the record's sequence number and the books, under the
    /// lock that orders the log, and returns the record's JSON and a value for the caller.
    /// The record is not durable until [`DecisionLog::durable`] for its number returns.
    pub fn append<T>(
        &self,
        build: impl FnOnce(u64, &mut Books) -> Result<(Vec<u8>, T)>,
    ) -> Result<(u64, T)> {
        let mut append = lock(&self.shared.append);
        if let Some(failed) = &append.failed {
            return Err(Error::Unavailable(format!(
                "the decision log stopped after a write error ({failed}); restart payra"
            )));
        }
        if append.closing {
            return Err(Error::Unavailable("payra is shutting down".into()));
        }
        let seq = append.next_seq;
        let (json, value) = build(seq, &mut append.books)?;
        if json.len() > MAX_RECORD_BYTES {
            return Err(Error::internal("decision record too large"));
        }
        append.next_seq += 1;
        append.pending.push((seq, json));
        // The writer waits for the first record of a batch, or lingers for a full one.
        let wake = matches!(append.pending.len(), 1 | BATCH_TARGET);
        drop(append);
        if wake {
            self.shared.work.notify_one();
        }
        Ok((seq, value))
    }

    /// Reads the books under the log's lock.
    pub fn with_books<T>(&self, read: impl FnOnce(&Books) -> T) -> T {
        read(&lock(&self.shared.append).books)
    }

    /// Waits until record `seq` is on stable storage. The writer wakes this caller once, when
    /// a sync covers `seq`.
    pub async fn durable(&self, seq: u64) -> Result<()> {
        let woken = {
            let mut durable = lock(&self.shared.durable);
            if let Some(failed) = &durable.failed {
                return Err(write_failed(failed));
            }
            if durable.through >= seq {
                return Ok(());
            }
            let (sender, woken) = tokio::sync::oneshot::channel();
            durable.waiters.push((seq, sender));
            woken
        };
        if woken.await.is_ok() {
            return Ok(());
        }
        // The writer stopped without covering `seq`.
        match &lock(&self.shared.durable).failed {
            Some(failed) => Err(write_failed(failed)),
            None => Err(Error::Unavailable("the decision log is closed".into())),
        }
    }

    /// [`DecisionLog::durable`] for callers off the async executor.
    pub fn durable_blocking(&self, seq: u64) -> Result<()> {
        let mut durable = lock(&self.shared.durable);
        loop {
            if let Some(failed) = &durable.failed {
                return Err(write_failed(failed));
            }
            if durable.through >= seq {
                return Ok(());
            }
            durable = self.shared.durable_changed.wait(durable).unpoisoned();
        }
    }

    /// Whether the log takes records: an error if a write failed or it is closing.
    pub fn healthy(&self) -> Result<()> {
        let append = lock(&self.shared.append);
        if let Some(failed) = &append.failed {
            return Err(Error::Unavailable(format!(
                "the decision log stopped after a write error ({failed})"
            )));
        }
        if append.closing {
            return Err(Error::Unavailable("the decision log is closed".into()));
        }
        Ok(())
    }

    /// The last record number handed out, and the bytes of all segment files.
    pub fn size(&self) -> (u64, u64) {
        let records = lock(&self.shared.append).next_seq - 1;
        let firsts = lock(&self.shared.segments).clone();
        let bytes = firsts
            .iter()
            .filter_map(|first| std::fs::metadata(segment_path(&self.shared.dir, *first)).ok())
            .map(|m| m.len())
            .sum();
        (records, bytes)
    }

    /// How many `fdatasync` calls the writer has made.
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads record `seq`, if the log has it: finds its segment by number, then steps from
    /// frame header to frame header (reading 16 bytes of each) to the record.
    pub fn read(&self, seq: u64) -> Result<Option<LogRecord>> {
        use std::io::BufReader;
        let first = {
            let segments = lock(&self.shared.segments);
            match segments.iter().rev().find(|&&first| first <= seq) {
                Some(first) => *first,
                None => return Ok(None),
            }
        };
        let file = File::open(segment_path(&self.shared.dir, first))?;
        let length = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let mut offset = 0u64;
        let mut head = [0u8; PREFIX + 8];
        while offset + (PREFIX + 8) as u64 <= length {
            reader.read_exact(&mut head)?;
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let found = u64::from_le_bytes(head[PREFIX..].try_into().unwrap_or_default());
            if !(FIXED..=FIXED + MAX_RECORD_BYTES).contains(&len) {
                return Err(Error::internal(format!(
                    "decision log segment {first:020} is damaged at byte {offset}"
                )));
            }
            if found == seq {
                let mut frame = head.to_vec();
                frame.resize(PREFIX + len, 0);
                reader.read_exact(&mut frame[PREFIX + 8..])?;
                let frame = frame_at(&frame, 0).ok_or_else(|| {
                    Error::internal(format!("decision log record {seq} fails its checksum"))
                })?;
                return decode(frame.json, seq).map(Some);
            }
            if found > seq {
                break;
            }
            reader.seek_relative((len - 8) as i64)?;
            offset += (PREFIX + len) as u64;
        }
        Ok(None)
    }

    /// The books' changes since the last checkpoint, once every record they reflect is
    /// durable. Hand the result to the store; if saving fails, give it back with
    /// [`DecisionLog::checkpoint_failed`].
    pub fn take_checkpoint(&self) -> Result<LedgerCheckpoint> {
        let checkpoint = {
            let mut append = lock(&self.shared.append);
            let books = &mut append.books;
            let buckets = books
                .take_dirty()
                .into_iter()
                .map(|key| {
                    let used = books.used(&key);
                    (key, used)
                })
                .collect::<Vec<_>>();
            LedgerCheckpoint {
                through_seq: append.next_seq - 1,
                buckets,
                released: std::mem::take(&mut append.books.fresh_releases),
            }
        };
        self.durable_blocking(checkpoint.through_seq)?;
        Ok(checkpoint)
    }

    /// Drops the ledger buckets of days before `min_day` from memory
    /// ([`Books::forget_days_before`]); returns how many went.
    pub fn forget_ledger_days_before(&self, min_day: &str) -> usize {
        let gone = lock(&self.shared.append).books.forget_days_before(min_day);
        // Freed here, after the lock is released.
        gone.bucket_count()
    }

    /// Marks a checkpoint that could not be saved as still to be saved.
    pub fn checkpoint_failed(&self, checkpoint: LedgerCheckpoint) {
        let mut append = lock(&self.shared.append);
        for (key, _) in checkpoint.buckets {
            append.books.mark_dirty(key);
        }
        append.books.fresh_releases.extend(checkpoint.released);
    }

    /// Every durable frame, in order (for backups).
    pub fn for_each_frame(&self, each: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let through = lock(&self.shared.durable).through;
        let firsts = lock(&self.shared.segments).clone();
        for first in firsts {
            if first > through {
                break;
            }
            let bytes = read_segment(&self.shared.dir, first)?;
            walk(&bytes, |frame| {
                if frame.seq <= through {
                    each(frame.seq, frame.raw)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Stops taking records, writes and syncs what is queued, and stops the writer.
    pub fn close(&self) -> Result<()> {
        lock(&self.shared.append).closing = true;
        self.shared.work.notify_all();
        if let Some(writer) = lock(&self.writer).take() {
            writer
                .join()
                .map_err(|_| Error::internal("the decision log writer panicked"))?;
        }
        match &lock(&self.shared.durable).failed {
            Some(failed) => Err(write_failed(failed)),
            None => Ok(()),
        }
    }
}

impl Drop for DecisionLog {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn record_time(record: &LogRecord) -> i64 {
    match record {
        LogRecord::Decision { evidence, .. } => evidence.recorded_at_ms,
        LogRecord::Release { released_at_ms, .. } => *released_at_ms,
    }
}

/// The writer thread: frames, chains, writes and syncs batches.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    length: u64,
    prev: [u8; 32],
}

impl Writer {
    fn run(mut self) {
        let mut buffer = Vec::with_capacity(1 << 20);
        let mut last_batch = 0usize;
        loop {
            let batch = {
                let mut append = lock(&self.shared.append);
                while append.pending.is_empty() && !append.closing {
                    append = self.shared.work.wait(append).unpoisoned();
                }
                if append.pending.is_empty() {
                    // Closing, and everything appended is durable: any waiter left is told
                    // the log is closed.
                    drop(std::mem::take(&mut lock(&self.shared.durable).waiters));
                    return;
                }
                // Under heavy load, gather a fuller batch: each fdatasync costs the kernel and
                // the wake-ups far more CPU than a record does. At moderate load nobody waits.
                if last_batch >= LINGER_AFTER_BATCH {
                    let deadline = std::time::Instant::now() + LINGER;
                    while append.pending.len() < BATCH_TARGET && !append.closing {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        append = self.shared.work.wait_timeout(append, left).unpoisoned().0;
                    }
                }
                std::mem::take(&mut append.pending)
            };
            let Some(&(first_seq, _)) = batch.first() else {
                continue;
            };
            let last_seq = batch.last().map_or(first_seq, |(seq, _)| *seq);
            last_batch = batch.len();
            buffer.clear();
            let mut prev = self.prev;
            for (seq, json) in &batch {
                prev = put_frame(&mut buffer, &prev, *seq, json);
            }
            match self.write(first_seq, &buffer) {
                Ok(()) => {
                    self.prev = prev;
                    self.shared
                        .syncs
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let covered = {
                        let mut durable = lock(&self.shared.durable);
                        durable.head_hash = prev;
                        durable.advance(last_seq)
                    };
                    for waiter in covered {
                        // A caller that gave up waiting has dropped its receiver.
                        let _ = waiter.send(());
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "decision log write failed; refusing further decisions");
                    lock(&self.shared.append).failed = Some(e.to_string());
                    let waiters = {
                        let mut durable = lock(&self.shared.durable);
                        durable.failed = Some(e.to_string());
                        std::mem::take(&mut durable.waiters)
                    };
                    // Dropping the senders wakes every waiter to read `failed`.
                    drop(waiters);
                    self.shared.durable_changed.notify_all();
                    return;
                }
            }
            self.shared.durable_changed.notify_all();
        }
    }

    fn write(&mut self, first_seq: u64, buffer: &[u8]) -> Result<()> {
        if self.length >= SEGMENT_BYTES {
            let path = segment_path(&self.shared.dir, first_seq);
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)?;
            sync_dir(&self.shared.dir)?;
            self.file = file;
            self.length = 0;
            lock(&self.shared.segments).push(first_seq);
        }
        self.file.write_all(buffer)?;
        self.file.sync_data()?;
        self.length += buffer.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
