//! The decision log on disk: segment files of hash-linked frames, and how a torn end is told
//! from damage.

use super::*;

pub(super) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.log"))
}

/// The segment files of `dir`, by first sequence number.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut firsts = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(first) = stem.parse::<u64>() {
                firsts.push(first);
            }
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// `SHA-256(prev || seq LE || json)`.
pub(super) fn link_hash(prev: &[u8; 32], seq: u64, json: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(seq.to_le_bytes());
    hasher.update(json);
    hasher.finalize().into()
}

/// Appends the frame of `json` to `out`; returns its hash.
pub(super) fn put_frame(out: &mut Vec<u8>, prev: &[u8; 32], seq: u64, json: &[u8]) -> [u8; 32] {
    let hash = link_hash(prev, seq, json);
    let len = (FIXED + json.len()) as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&hash);
    out.extend_from_slice(json);
    let crc = crc32fast::hash(&out[start + PREFIX..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    hash
}

/// One frame read back.
pub struct Frame<'a> {
    pub seq: u64,
    pub hash: [u8; 32],
    pub json: &'a [u8],
    /// The whole frame, prefix included.
    pub raw: &'a [u8],
}

/// Parses the frame at `offset`; `None` if it is incomplete or damaged.
pub(super) fn frame_at(bytes: &[u8], offset: usize) -> Option<Frame<'_>> {
    let prefix = bytes.get(offset..offset + PREFIX)?;
    let len = u32::from_le_bytes(prefix[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(prefix[4..].try_into().ok()?);
    if !(FIXED..=FIXED + MAX_RECORD_BYTES).contains(&len) {
        return None;
    }
    let body = bytes.get(offset + PREFIX..offset + PREFIX + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some(Frame {
        seq: u64::from_le_bytes(body[..8].try_into().ok()?),
        hash: body[8..40].try_into().ok()?,
        json: &body[40..],
        raw: &bytes[offset..offset + PREFIX + len],
    })
}

/// Walks the frames of one segment's bytes; returns the length of the valid prefix.
pub(super) fn walk(bytes: &[u8], mut each: impl FnMut(&Frame<'_>) -> Result<()>) -> Result<usize> {
    let mut offset = 0;
    while let Some(frame) = frame_at(bytes, offset) {
        each(&frame)?;
        offset += frame.raw.len();
    }
    Ok(offset)
}

/// Whether `rest`, the bytes after the last intact frame (whose successor is `next_seq`), can
/// be what an interrupted write leaves: a frame cut short, or space the file system filled
/// with zeros. Damage, not a torn write: a length no writer produces, a complete frame that
/// fails its checksum, or an intact frame further on (a later record survived, so the bytes
/// before it were written whole and changed since).
pub(super) fn torn_write(rest: &[u8], next_seq: u64) -> bool {
    if rest.iter().all(|b| *b == 0) {
        return true;
    }
    // Zeros where the next frame's length belongs: space the file system allocated but never
    // wrote. A power cut during one batch's write can leave that before pages of the same
    // unsynced batch that did reach the disk, so later frames do not make it damage here.
    // What such a cut would remove is checked against the ledger checkpoint and the latest
    // signed audit head before anything is cut.
    if rest.len() >= 4 && rest[..4] == [0, 0, 0, 0] {
        return true;
    }
    if rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if !(FIXED..=FIXED + MAX_RECORD_BYTES).contains(&len) || PREFIX + len <= rest.len() {
            return false;
        }
    }
    !has_later_frame(rest, next_seq)
}

/// Whether an intact frame numbered `next_seq` or later starts anywhere after byte 0 of
/// `rest`. The length and number are checked before the checksum, so garbage costs little.
pub(super) fn has_later_frame(rest: &[u8], next_seq: u64) -> bool {
    let most = next_seq.saturating_add(rest.len() as u64);
    (1..rest.len().saturating_sub(PREFIX + FIXED - 1)).any(|offset| {
        let Some(header) = rest.get(offset..offset + PREFIX + 8) else {
            return false;
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let seq = u64::from_le_bytes(header[PREFIX..PREFIX + 8].try_into().unwrap_or([0; 8]));
        (FIXED..=FIXED + MAX_RECORD_BYTES).contains(&len)
            && (next_seq..=most).contains(&seq)
            && frame_at(rest, offset).is_some()
    })
}

/// A torn end of the newest segment, to be cut off once every check has passed.
pub(super) struct TornEnd {
    pub(super) path: PathBuf,
    pub(super) valid: usize,
    pub(super) cut: Vec<u8>,
}

impl TornEnd {
    /// Copies the cut bytes aside (`<segment>.log.cut-<unix ms>-<random>`, synced), then truncates the
    /// segment. Nothing is discarded: an operator can still look at what was cut.
    pub(super) fn apply(self, dir: &Path, now_ms: i64) -> Result<()> {
        let aside = self.path.with_extension(format!(
            "log.cut-{now_ms}-{}",
            hex::encode(rand::random::<[u8; 4]>())
        ));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&aside)?;
        file.write_all(&self.cut)?;
        file.sync_all()?;
        sync_dir(dir)?;
        let segment = OpenOptions::new().write(true).open(&self.path)?;
        segment.set_len(self.valid as u64)?;
        segment.sync_all()?;
        tracing::warn!(
            segment = %self.path.display(),
            kept = self.valid,
            cut = self.cut.len(),
            aside = %aside.display(),
            "cut a torn write off the decision log (it was never acknowledged); the cut bytes \
             are kept aside"
        );
        Ok(())
    }
}

pub(super) fn decode(json: &[u8], seq: u64) -> Result<LogRecord> {
    serde_json::from_slice(json)
        .map_err(|e| Error::internal(format!("decision log record {seq} does not decode: {e}")))
}

/// The whole of one segment file.
pub(super) fn read_segment(dir: &Path, first: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(segment_path(dir, first))?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}
