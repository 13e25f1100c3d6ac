//! The decision log read offline, from a stopped server's data directory (`payra audit`),
//! and written by a restore ([`LogImporter`]).

use super::*;

impl DecisionLog {
    /// The last `count` intact records of the log in `dir`, oldest first (offline).
    pub fn tail(dir: &Path, count: usize) -> Result<Vec<(u64, LogRecord)>> {
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut records = Vec::new();
        for first in list_segments(dir)?.into_iter().rev() {
            let bytes = read_segment(dir, first)?;
            let mut segment = Vec::new();
            walk(&bytes, |frame| {
                segment.push((frame.seq, decode(frame.json, frame.seq)?));
                Ok(())
            })?;
            segment.append(&mut records);
            records = segment;
            if records.len() >= count {
                break;
            }
        }
        let skip = records.len().saturating_sub(count);
        Ok(records.split_off(skip))
    }

    /// Checks the whole chain of the log in `dir` (offline): numbering, checksums and links.
    pub fn verify(dir: &Path) -> Result<ChainCheck> {
        Self::verify_with(dir, &mut |_, _| {})
    }

    /// [`DecisionLog::verify`], handing each intact record's number and hash to `each`.
    pub fn verify_with(dir: &Path, each: &mut dyn FnMut(u64, &[u8; 32])) -> Result<ChainCheck> {
        if !dir.exists() {
            return Ok(ChainCheck::Intact { records: 0 });
        }
        let firsts = list_segments(dir)?;
        let mut prev = GENESIS_HASH;
        let mut expected = 1u64;
        let last = firsts.last().copied();
        for first in firsts {
            if first != expected {
                return Ok(ChainCheck::Broken {
                    seq: expected,
                    reason: format!("segment {first:020} starts where record {expected} belongs"),
                });
            }
            let bytes = read_segment(dir, first)?;
            let mut broken = None;
            let valid = walk(&bytes, |frame| {
                if broken.is_some() {
                    return Ok(());
                }
                if frame.seq != expected {
                    broken = Some((expected, format!("found record {} instead", frame.seq)));
                } else if link_hash(&prev, frame.seq, frame.json) != frame.hash {
                    broken = Some((
                        frame.seq,
                        "its hash does not chain to the record before".into(),
                    ));
                } else if let Err(e) = decode(frame.json, frame.seq) {
                    broken = Some((frame.seq, e.to_string()));
                } else {
                    each(frame.seq, &frame.hash);
                    prev = frame.hash;
                    expected += 1;
                }
                Ok(())
            })?;
            if let Some((seq, reason)) = broken {
                return Ok(ChainCheck::Broken { seq, reason });
            }
            if valid < bytes.len() {
                let hint = if Some(first) == last {
                    " (if payra was killed while writing, the next start cuts this torn write off)"
                } else {
                    ""
                };
                return Ok(ChainCheck::Broken {
                    seq: expected,
                    reason: format!(
                        "segment {first:020}: {} bytes from byte {valid} are not an intact record{hint}",
                        bytes.len() - valid
                    ),
                });
            }
        }
        Ok(ChainCheck::Intact {
            records: expected - 1,
        })
    }
}

/// Writes backed-up frames into a fresh log (restore). Frames must come in order from record
/// 1; each is checked as it is written.
pub struct LogImporter {
    dir: PathBuf,
    file: File,
    length: u64,
    expected: u64,
    prev: [u8; 32],
}

impl LogImporter {
    /// Starts a log in `dir`, which must not hold one.
    pub fn new(dir: &Path) -> Result<LogImporter> {
        std::fs::create_dir_all(dir)?;
        if !list_segments(dir)?.is_empty() {
            return Err(Error::AlreadyExists(format!(
                "{} already holds a decision log",
                dir.display()
            )));
        }
        Ok(LogImporter {
            dir: dir.to_path_buf(),
            file: File::create(segment_path(dir, 1))?,
            length: 0,
            expected: 1,
            prev: GENESIS_HASH,
        })
    }

    /// Appends one frame.
    pub fn push(&mut self, raw: &[u8]) -> Result<()> {
        let expected = self.expected;
        let frame = frame_at(raw, 0)
            .filter(|f| f.raw.len() == raw.len())
            .ok_or_else(|| {
                Error::invalid("backup", format!("decision record {expected} is damaged"))
            })?;
        if frame.seq != expected || link_hash(&self.prev, frame.seq, frame.json) != frame.hash {
            return Err(Error::invalid(
                "backup",
                format!("decision record {expected} is out of order or does not chain"),
            ));
        }
        if self.length >= SEGMENT_BYTES {
            self.file.sync_all()?;
            self.file = File::create(segment_path(&self.dir, expected))?;
            self.length = 0;
        }
        self.file.write_all(raw)?;
        self.length += raw.len() as u64;
        self.prev = frame.hash;
        self.expected += 1;
        Ok(())
    }

    /// Syncs the log; returns how many records it holds.
    pub fn finish(self) -> Result<u64> {
        self.file.sync_all()?;
        sync_dir(&self.dir)?;
        Ok(self.expected - 1)
    }
}
