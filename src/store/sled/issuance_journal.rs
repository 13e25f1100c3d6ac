//! The issuance journal: a redo log that makes a batch of enrollments durable with one
//! `fdatasync`, so that sled can take the batch's writes as plain inserts.
//!
//! A sled transaction seals sled's log buffer and hands it to sled's I/O threads, which write
//! it and wait for it with `sync_file_range`; a `flush` then waits for that write. Done once per
//! enrollment batch, that was most of Enroll's CPU (thread wake-ups and two waited writes). The
//! journal replaces both: under the store's write turn, a batch's writes are framed into one
//! record, appended here and synced, and only then applied to sled with plain inserts, the last
//! of which records the batch's number under `meta/issuance_applied_seq`.
//!
//! Recovery, when the store opens: every intact record numbered above the applied number is
//! applied again, in order. Applying is idempotent (it puts the same values under the same
//! keys). sled recovers a prefix of its own log, and the applied number is written after the
//! batch's inserts and before any later change, so a record at or below it is wholly in sled
//! and nothing later than a record above it is. A torn record at the end of the file (a crash
//! during the append) was never acknowledged and is ignored. Once sled has synced what the
//! journal holds, the file is emptied: at open, and whenever it outgrows
//! [`IssuanceJournal::RESET_BYTES`].
//!
//! Frame: `u32` LE payload length, `u32` LE CRC-32 of the payload, the payload. Payload: `u64`
//! LE batch number, `u32` LE count, then per write: tree `u8`, `u32` LE key length, key, `u32`
//! LE value length, value.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The trees an enrollment writes, as numbered in journal records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JournalTree {
    Tokens = 1,
    Certificates = 2,
    Summaries = 3,
    ByCustomer = 4,
    ByDevice = 5,
    Audit = 6,
    Meta = 7,
    ByKey = 8,
}

impl JournalTree {
    fn from_byte(byte: u8) -> Option<JournalTree> {
        Some(match byte {
            1 => JournalTree::Tokens,
            2 => JournalTree::Certificates,
            3 => JournalTree::Summaries,
            4 => JournalTree::ByCustomer,
            5 => JournalTree::ByDevice,
            6 => JournalTree::Audit,
            7 => JournalTree::Meta,
            8 => JournalTree::ByKey,
            _ => return None,
        })
    }
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Put {
    pub tree: JournalTree,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// One intact record read back: its batch number and writes.
pub(super) type JournalRecord = (u64, Vec<Put>);

/// Largest record accepted when reading (a batch of enrollments is tens of kilobytes).
const MAX_RECORD_BYTES: usize = 64 << 20;

/// The journal file of one store. Used only under the store's write turn.
pub(super) struct IssuanceJournal {
    path: PathBuf,
    file: File,
    length: u64,
    /// Set by the first failed append: after a failed `fdatasync` the file's state is unknown,
    /// so nothing more is acknowledged until a restart has recovered.
    failed: Option<String>,
}

fn encode_record(seq: u64, puts: &[Put]) -> Result<Vec<u8>> {
    let too_large = || Error::internal("issuance batch too large for the journal");
    let mut payload = Vec::with_capacity(
        12 + puts
            .iter()
            .map(|p| 9 + p.key.len() + p.value.len())
            .sum::<usize>(),
    );
    payload.extend_from_slice(&seq.to_le_bytes());
    payload.extend_from_slice(
        &u32::try_from(puts.len())
            .map_err(|_| too_large())?
            .to_le_bytes(),
    );
    for put in puts {
        payload.push(put.tree as u8);
        for part in [&put.key, &put.value] {
            let length = u32::try_from(part.len()).map_err(|_| too_large())?;
            payload.extend_from_slice(&length.to_le_bytes());
            payload.extend_from_slice(part);
        }
    }
    if payload.len() > MAX_RECORD_BYTES {
        return Err(too_large());
    }
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Reads `n` bytes at `*at`, advancing it; `None` past the end.
fn take<'a>(bytes: &'a [u8], at: &mut usize, n: usize) -> Option<&'a [u8]> {
    let end = at.checked_add(n)?;
    let part = bytes.get(*at..end)?;
    *at = end;
    Some(part)
}

fn take_u32(bytes: &[u8], at: &mut usize) -> Option<u32> {
    take(bytes, at, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn decode_payload(payload: &[u8]) -> Option<JournalRecord> {
    let mut at = 0;
    let seq = u64::from_le_bytes(take(payload, &mut at, 8)?.try_into().ok()?);
    let count = take_u32(payload, &mut at)? as usize;
    let mut puts = Vec::with_capacity(count.min(payload.len() / 9));
    for _ in 0..count {
        let tree = JournalTree::from_byte(take(payload, &mut at, 1)?[0])?;
        let key_len = take_u32(payload, &mut at)? as usize;
        let key = take(payload, &mut at, key_len)?.to_vec();
        let value_len = take_u32(payload, &mut at)? as usize;
        let value = take(payload, &mut at, value_len)?.to_vec();
        puts.push(Put { tree, key, value });
    }
    (at == payload.len()).then_some((seq, puts))
}

/// Whether the bytes from a bad frame to the end of the file are what an interrupted
/// append leaves: nothing but zeros (a file extended and not yet written), or a single frame
/// that ends at or past the end of the file. Anything else is damage.
fn torn_tail(rest: &[u8]) -> bool {
    if rest.len() < 8 || rest.iter().all(|b| *b == 0) {
        return true;
    }
    let length = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    8 + length >= rest.len()
}

/// The smallest payload: a batch number and a count.
const MIN_PAYLOAD: usize = 12;

/// The intact records of `bytes`, and how many bytes they span. Every append is synced
/// before the next, so only the last frame can be cut short or fail its checksum: that
/// tail is left out. A bad frame with more data after it, a frame whose checksum holds but
/// whose content does not parse, or batch numbers that do not follow one another are damage.
fn read_records(bytes: &[u8]) -> Result<(Vec<JournalRecord>, usize)> {
    let damaged = |at: usize, what: &str| {
        Error::internal(format!(
            "issuance journal damaged at byte {at}: {what}; restore the data directory from a backup"
        ))
    };
    let mut records: Vec<JournalRecord> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let start = at;
        let frame = (|| {
            let length = take_u32(bytes, &mut at)? as usize;
            let crc = take_u32(bytes, &mut at)?;
            if !(MIN_PAYLOAD..=MAX_RECORD_BYTES).contains(&length) {
                return None;
            }
            let payload = take(bytes, &mut at, length)?;
            (crc32fast::hash(payload) == crc).then_some(payload)
        })();
        let Some(payload) = frame else {
            if torn_tail(&bytes[start..]) {
                return Ok((records, start));
            }
            return Err(damaged(start, "a bad frame with more data after it"));
        };
        let record = decode_payload(payload).ok_or_else(|| {
            damaged(
                start,
                "a record that passes its checksum but does not parse",
            )
        })?;
        if let Some((previous, _)) = records.last() {
            if record.0 != previous + 1 {
                return Err(damaged(
                    start,
                    &format!("batch {} follows batch {previous}", record.0),
                ));
            }
        }
        records.push(record);
    }
    Ok((records, at))
}

impl IssuanceJournal {
    /// Past this size, the next batch first has sled sync and then empties the journal.
    pub const RESET_BYTES: u64 = 32 << 20;

    /// Opens (or creates) the journal at `path` and returns its intact records.
    pub fn open(path: &Path) -> Result<(IssuanceJournal, Vec<JournalRecord>)> {
        let opening =
            |e: std::io::Error| Error::internal(format!("opening {}: {e}", path.display()));
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(opening)?;
        if created {
            // The new name must survive a power cut along with the records synced into it.
            if let Some(dir) = path.parent() {
                File::open(dir)
                    .and_then(|dir| dir.sync_all())
                    .map_err(opening)?;
            }
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(opening)?;
        let (records, intact) = read_records(&bytes)?;
        if intact < bytes.len() {
            // Appends go to the end: cut the torn tail first, or later records would follow it
            // and be unreadable.
            file.set_len(intact as u64)
                .and_then(|()| file.sync_all())
                .map_err(opening)?;
            tracing::warn!(
                journal = %path.display(),
                bytes = bytes.len() - intact,
                "cut the torn end of the issuance journal (an append a crash interrupted)"
            );
        }
        Ok((
            IssuanceJournal {
                path: path.to_path_buf(),
                file,
                length: intact as u64,
                failed: None,
            },
            records,
        ))
    }

    /// An error once the journal stopped (a failed append or apply): nothing more is
    /// acknowledged until a restart.
    pub fn healthy(&self) -> Result<()> {
        match &self.failed {
            Some(failed) => Err(Error::Unavailable(format!(
                "the issuance journal stopped after a write error ({failed}); restart payra"
            ))),
            None => Ok(()),
        }
    }

    /// Appends one batch and waits until it is on stable storage.
    pub fn append(&mut self, seq: u64, puts: &[Put]) -> Result<()> {
        self.healthy()?;
        let frame = encode_record(seq, puts)?;
        let written = self
            .file
            .write_all(&frame)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.length += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                let message = format!("{}: {e}", self.path.display());
                tracing::error!(error = %message, "issuance journal write failed; refusing further enrollments");
                self.failed = Some(message.clone());
                Err(Error::internal(format!(
                    "writing the issuance journal: {message}"
                )))
            }
        }
    }

    /// Marks the journal unusable: a batch it holds could not be applied to the database.
    pub fn fail(&mut self, why: String) {
        self.failed.get_or_insert(why);
    }

    /// Empties the journal. Call only once the database has synced every record it holds.
    pub fn reset(&mut self) -> Result<()> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| Error::internal(format!("emptying {}: {e}", self.path.display())))?;
        self.length = 0;
        Ok(())
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: u8) -> Vec<Put> {
        vec![
            Put {
                tree: JournalTree::Certificates,
                key: vec![n; 16],
                value: b"{\"record\":1}".to_vec(),
            },
            Put {
                tree: JournalTree::ByDevice,
                key: b"device\0serial".to_vec(),
                value: Vec::new(),
            },
            Put {
                tree: JournalTree::Meta,
                key: b"audit_head".to_vec(),
                value: vec![n; 40],
            },
        ]
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut journal, records) = IssuanceJournal::open(&path).unwrap();
        assert!(records.is_empty());
        for seq in 1..=3u8 {
            journal.append(u64::from(seq), &batch(seq)).unwrap();
        }
        let full = std::fs::metadata(&path).unwrap().len();
        assert_eq!(journal.len(), full);
        drop(journal);
        let (_, records) = IssuanceJournal::open(&path).unwrap();
        assert_eq!(
            records,
            (1..=3u8)
                .map(|seq| (u64::from(seq), batch(seq)))
                .collect::<Vec<_>>()
        );

        // A crash in the middle of the third append leaves part of its frame.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(full - 5).unwrap();
        drop(file);
        let (journal, records) = IssuanceJournal::open(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1], (2, batch(2)));
        // The torn end is cut, so a later append is readable.
        assert_eq!(journal.len(), std::fs::metadata(&path).unwrap().len());
        drop(journal);

        // A flipped bit in the last frame fails its checksum: also a torn tail.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (mut journal, records) = IssuanceJournal::open(&path).unwrap();
        assert_eq!(records.len(), 1);

        journal.reset().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        journal.append(7, &batch(7)).unwrap();
        let (_, records) = IssuanceJournal::open(&path).unwrap();
        assert_eq!(records, vec![(7, batch(7))]);
    }

    #[test]
    fn a_stopped_journal_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = IssuanceJournal::open(&dir.path().join("journal")).unwrap();
        journal.append(1, &batch(1)).unwrap();
        assert!(journal.healthy().is_ok());
        journal.fail("applying batch 2: disk full".into());
        let refused = journal.append(2, &batch(2)).unwrap_err();
        assert!(matches!(refused, Error::Unavailable(_)), "{refused}");
        assert!(refused.to_string().contains("disk full"), "{refused}");
        assert!(journal.healthy().is_err());
        // The first reason stays.
        journal.fail("later".into());
        assert!(journal
            .healthy()
            .unwrap_err()
            .to_string()
            .contains("disk full"));
    }

    #[test]
    fn batches_out_of_order_or_damage_before_the_end_refuse_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut journal, _) = IssuanceJournal::open(&path).unwrap();
        journal.append(5, &batch(5)).unwrap();
        journal.append(7, &batch(7)).unwrap();
        drop(journal);
        let refused = IssuanceJournal::open(&path).err().expect("a gap");
        assert!(
            refused.to_string().contains("batch 7 follows batch 5"),
            "{refused}"
        );

        // A flipped bit in the first of two frames is damage, not a torn tail: the second
        // frame was acknowledged after the first was synced.
        std::fs::remove_file(&path).unwrap();
        let (mut journal, _) = IssuanceJournal::open(&path).unwrap();
        journal.append(1, &batch(1)).unwrap();
        journal.append(2, &batch(2)).unwrap();
        drop(journal);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let refused = IssuanceJournal::open(&path).err().expect("damage");
        assert!(
            refused.to_string().contains("damaged at byte 0"),
            "{refused}"
        );
    }

    #[test]
    fn a_zero_filled_end_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut journal, _) = IssuanceJournal::open(&path).unwrap();
        journal.append(1, &batch(1)).unwrap();
        drop(journal);
        let intact = std::fs::metadata(&path).unwrap().len();
        // A crash after the file grew but before the data reached it leaves zeros.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(intact + 4096).unwrap();
        drop(file);
        let (journal, records) = IssuanceJournal::open(&path).unwrap();
        assert_eq!(records, vec![(1, batch(1))]);
        assert_eq!(journal.len(), intact);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), intact);
    }
}
