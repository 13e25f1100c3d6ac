//! The backup file: a consistent snapshot of every sled tree, checksummed.
//!
//! Layout: the line `PAYRA-BACKUP-1`, a JSON header line, then records — `T` + u32 length +
//! tree name, `E` + u32 length + key + u32 length + value — and `Z`, then the SHA-256 of every
//! byte before it. Lengths are big-endian. Restore reads the file twice: once to check the
//! checksum (nothing is written if it fails), once to import.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::{RevocationReason, Serial};
use crate::store::FrameSource;

const MAGIC: &[u8] = b"PAYRA-BACKUP-1\n";
/// The section holding the decision log's frames (not a sled tree).
const DECISION_LOG_SECTION: &str = "payra:decision_log";
/// Largest key or value accepted when reading a backup (sled values here are small records).
const MAX_ITEM_BYTES: u32 = 64 * 1024 * 1024;

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSummary {
    pub created_at_ms: i64,
    pub trees: usize,
    pub entries: u64,
    /// Hex SHA-256 of the file up to the checksum.
    pub sha256: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    created_at_ms: i64,
}

struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    hasher: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        Ok(written)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_item(out: &mut impl Write, bytes: &[u8]) -> Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| Error::internal("item too large"))?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(bytes)?;
    Ok(())
}

/// Writes `trees`, then the decision log, to `out`. The caller holds writers off until
/// `trees_written` is called.
pub fn write_backup(
    out: &mut dyn Write,
    created_at_ms: i64,
    trees: &[(String, sled::Tree)],
    trees_written: &mut dyn FnMut(),
    decision_log: &mut FrameSource<'_>,
) -> Result<BackupSummary> {
    let mut out = HashingWriter {
        inner: out,
        hasher: Sha256::new(),
    };
    out.write_all(MAGIC)?;
    let header = serde_json::to_vec(&Header {
        version: 1,
        created_at_ms,
    })
    .map_err(|e| Error::internal(format!("backup header: {e}")))?;
    out.write_all(&header)?;
    out.write_all(b"\n")?;
    let mut entries = 0u64;
    for (name, tree) in trees {
        out.write_all(b"T")?;
        write_item(&mut out, name.as_bytes())?;
        for entry in tree.iter() {
            let (key, value) = entry?;
            out.write_all(b"E")?;
            write_item(&mut out, &key)?;
            write_item(&mut out, &value)?;
            entries += 1;
        }
    }
    trees_written();
    // The decision log follows as one more section: key = record number, value = frame.
    out.write_all(b"T")?;
    write_item(&mut out, DECISION_LOG_SECTION.as_bytes())?;
    decision_log(&mut |seq, frame| {
        out.write_all(b"E")?;
        write_item(&mut out, &seq.to_be_bytes())?;
        write_item(&mut out, frame)?;
        entries += 1;
        Ok(())
    })?;
    out.write_all(b"Z")?;
    let digest = out.hasher.finalize();
    out.inner.write_all(&digest)?;
    out.inner.flush()?;
    Ok(BackupSummary {
        created_at_ms,
        trees: trees.len(),
        entries,
        sha256: hex::encode(digest),
    })
}

/// One parsed record.
enum Record {
    Tree(String),
    Entry(Vec<u8>, Vec<u8>),
}

fn corrupt(what: &str) -> Error {
    Error::FailedPrecondition(format!("backup file is corrupted or truncated: {what}"))
}

fn read_exact(input: &mut impl Read, len: usize, what: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    input.read_exact(&mut buf).map_err(|_| corrupt(what))?;
    Ok(buf)
}

fn read_item(input: &mut impl Read) -> Result<Vec<u8>> {
    let len = u32::from_be_bytes(
        read_exact(input, 4, "length")?
            .try_into()
            .map_err(|_| corrupt("length"))?,
    );
    if len > MAX_ITEM_BYTES {
        return Err(corrupt("item length out of range"));
    }
    read_exact(input, len as usize, "item")
}

/// Reads the whole file, checking its structure and checksum, and calls `each` per record.
fn scan(path: &Path, mut each: impl FnMut(Record) -> Result<()>) -> Result<BackupSummary> {
    let file = File::open(path)
        .map_err(|e| Error::FailedPrecondition(format!("{}: {e}", path.display())))?;
    let total = file.metadata()?.len();
    if total < (MAGIC.len() + 32) as u64 {
        return Err(corrupt("too short"));
    }
    let body_len = total - 32;
    let mut input = BufReader::new(file);
    let mut hasher = Sha256::new();
    let mut body = (&mut input).take(body_len);
    let mut tee = TeeReader {
        inner: &mut body,
        hasher: &mut hasher,
    };
    if read_exact(&mut tee, MAGIC.len(), "magic")? != MAGIC {
        return Err(corrupt("not a payra backup"));
    }
    let mut header_line = Vec::new();
    loop {
        let byte = read_exact(&mut tee, 1, "header")?[0];
        if byte == b'\n' {
            break;
        }
        if header_line.len() > 4096 {
            return Err(corrupt("header too long"));
        }
        header_line.push(byte);
    }
    let header: Header = serde_json::from_slice(&header_line).map_err(|_| corrupt("header"))?;
    if header.version != 1 {
        return Err(corrupt("unknown version"));
    }
    let mut trees = 0;
    let mut entries = 0u64;
    loop {
        match read_exact(&mut tee, 1, "record tag")?[0] {
            b'T' => {
                let name = String::from_utf8(read_item(&mut tee)?).map_err(|_| corrupt("tree"))?;
                trees += 1;
                each(Record::Tree(name))?;
            }
            b'E' => {
                let key = read_item(&mut tee)?;
                let value = read_item(&mut tee)?;
                entries += 1;
                each(Record::Entry(key, value))?;
            }
            b'Z' => break,
            _ => return Err(corrupt("unknown record")),
        }
    }
    let expected = hasher.finalize();
    let mut stored = [0u8; 32];
    input
        .read_exact(&mut stored)
        .map_err(|_| corrupt("checksum"))?;
    if stored[..] != expected[..] {
        return Err(Error::FailedPrecondition(
            "backup file checksum does not match: the file is corrupted".into(),
        ));
    }
    Ok(BackupSummary {
        created_at_ms: header.created_at_ms,
        trees,
        entries,
        sha256: hex::encode(expected),
    })
}

struct TeeReader<'a, R> {
    inner: &'a mut R,
    hasher: &'a mut Sha256,
}

impl<R: Read> Read for TeeReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Checks a backup file and returns its summary and the revocations it holds.
pub fn verify_backup(path: &Path) -> Result<(BackupSummary, HashMap<Serial, RevocationReason>)> {
    let mut current_tree = String::new();
    let mut revoked = HashMap::new();
    let summary = scan(path, |record| {
        match record {
            Record::Tree(name) => current_tree = name,
            Record::Entry(key, value) if current_tree == "revoked" => {
                let serial = Serial::from_bytes("serial", &key);
                let entry: std::result::Result<crate::store::RevokedEntry, _> =
                    serde_json::from_slice(&value);
                if let (Ok(serial), Ok(entry)) = (serial, entry) {
                    revoked.insert(serial, entry.revocation.reason);
                }
            }
            Record::Entry(..) => {}
        }
        Ok(())
    })?;
    Ok((summary, revoked))
}

/// Writes the backup's trees into a new database at `dir` (which must not hold one) and
/// syncs it.
/// A revocation the data directory holds that restoring a backup would lose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRevocation {
    pub serial: Serial,
    pub reason: RevocationReason,
    pub revoked_at_s: i64,
}

/// What restoring a backup into a data directory would do: the backup's summary, and the
/// revocations the directory's current database has that the backup lacks (revoked after
/// the backup, or revoked for good after being on hold in it: restoring would make such a
/// certificate valid, or releasable, again).
#[derive(Debug)]
pub struct RestorePlan {
    pub summary: BackupSummary,
    /// Whether `dir` holds a database now (it is set aside before the restore).
    pub replaces_database: bool,
    pub would_unrevoke: Vec<LostRevocation>,
}

/// Checks the backup at `path` and compares its revocations with the database in `dir`, if
/// there is one (which must not be open: stop the server first).
pub fn plan_restore(path: &Path, dir: &Path) -> Result<RestorePlan> {
    use crate::store::Store;
    let (summary, backup_revoked) = verify_backup(path)?;
    if !dir.join("db").exists() {
        return Ok(RestorePlan {
            summary,
            replaces_database: false,
            would_unrevoke: Vec::new(),
        });
    }
    let current = super::SledStore::open(dir).map_err(|e| {
        Error::FailedPrecondition(format!(
            "{e} (is the server still running? stop it before restoring)"
        ))
    })?;
    let would_unrevoke = current
        .revoked_entries()?
        .into_iter()
        .filter(|entry| match backup_revoked.get(&entry.serial) {
            None => true,
            Some(reason) => {
                *reason == RevocationReason::CertificateHold
                    && entry.revocation.reason != RevocationReason::CertificateHold
            }
        })
        .map(|entry| LostRevocation {
            serial: entry.serial,
            reason: entry.revocation.reason,
            revoked_at_s: entry.revocation.revoked_at_s,
        })
        .collect();
    Ok(RestorePlan {
        summary,
        replaces_database: true,
        would_unrevoke,
    })
}

/// Writes the backup at `path` into a new database in `dir` (its pages compressed if
/// `compress`) and a new decision log beside it.
pub fn import_backup(path: &Path, dir: &Path, compress: bool) -> Result<BackupSummary> {
    if dir.join("db").exists() || dir.join(super::ISSUANCE_JOURNAL_FILE).exists() {
        return Err(Error::AlreadyExists(format!(
            "{} already holds a database",
            dir.display()
        )));
    }
    verify_backup(path)?;
    std::fs::create_dir_all(dir)?;
    // Refuses a directory that already holds a decision log, before anything is created.
    let mut log = super::decision_log::LogImporter::new(&dir.join("decisions"))?;
    let db = super::sled_config(dir, compress)?
        .open()
        .map_err(|e| Error::internal(format!("opening {}: {e}", dir.display())))?;
    let mut tree: Option<sled::Tree> = None;
    let mut in_log = false;
    let summary = scan(path, |record| {
        match record {
            Record::Tree(name) if name == DECISION_LOG_SECTION => in_log = true,
            Record::Tree(name) => {
                in_log = false;
                tree = Some(db.open_tree(name.as_bytes())?)
            }
            Record::Entry(_, frame) if in_log => log.push(&frame)?,
            Record::Entry(key, value) => {
                let tree = tree.as_ref().ok_or_else(|| corrupt("entry before tree"))?;
                tree.insert(key, value)?;
            }
        }
        Ok(())
    })?;
    log.finish()?;
    db.flush()?;
    File::open(dir.join("db"))?.sync_all()?;
    Ok(summary)
}
