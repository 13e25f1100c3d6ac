//! Google's attestation status list: parsed, and kept current from its file.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::chain;
use crate::error::{Error, Result};

/// Where the status list comes from: a file re-read when it changes (looked at, at most,
/// every [`StatusSource::RECHECK`]), or a fixed list.
///
/// One caller at a time looks at the file, without holding the lock: the others go on with
/// the list they have. A file's identity is its modification time and length; a file
/// modified within the last two seconds is looked at again next time, so that a second write
/// within one tick of a coarse clock is not missed.
#[derive(Debug)]
pub struct StatusSource {
    path: Option<PathBuf>,
    state: std::sync::RwLock<StatusState>,
    looking: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct StatusState {
    list: std::sync::Arc<StatusList>,
    /// (modification time, length) of the file the list came from; `None` to read it again.
    stamp: Option<(std::time::SystemTime, u64)>,
    /// The modification time of the file the list came from.
    modified: Option<std::time::SystemTime>,
    checked: std::time::Instant,
}

type Stamp = Option<(std::time::SystemTime, u64)>;

impl StatusSource {
    pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

    fn with(path: Option<PathBuf>, list: StatusList, stamp: Stamp) -> StatusSource {
        let modified = path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        StatusSource {
            path,
            state: std::sync::RwLock::new(StatusState {
                list: std::sync::Arc::new(list),
                stamp,
                modified,
                checked: std::time::Instant::now(),
            }),
            looking: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn fixed(list: StatusList) -> StatusSource {
        Self::with(None, list, None)
    }

    /// Reads `path`; an unreadable or invalid file is an error here (at start).
    pub fn file(path: &std::path::Path) -> Result<StatusSource> {
        let (list, stamp) = Self::read(path).map_err(|e| {
            Error::invalid(
                "attestation.android_status_file",
                format!("{}: {e}", path.display()),
            )
        })?;
        tracing::info!(path = %path.display(), entries = list.len(), "attestation status list loaded");
        Ok(Self::with(Some(path.to_path_buf()), list, stamp))
    }

    /// The file's stamp, `None` when it changed too recently to tell a later write apart.
    fn stamp(path: &std::path::Path) -> std::io::Result<Stamp> {
        let meta = std::fs::metadata(path)?;
        let modified = meta.modified()?;
        let settled = modified
            .elapsed()
            .is_ok_and(|age| age > std::time::Duration::from_secs(2));
        Ok(settled.then_some((modified, meta.len())))
    }

    fn read(path: &std::path::Path) -> std::result::Result<(StatusList, Stamp), String> {
        // The stamp first: a write after it makes the next look read again.
        let stamp = Self::stamp(path).map_err(|e| e.to_string())?;
        let text = std::fs::read(path).map_err(|e| e.to_string())?;
        Ok((StatusList::parse(&text)?, stamp))
    }

    /// How old the list in use is: seconds since its file was last modified (`None` for a
    /// fixed list). For the operator's alert on a list nobody refreshes.
    pub fn age_s(&self) -> Option<i64> {
        use crate::sync::Unpoisoned;
        let modified = self.state.read().unpoisoned().modified?;
        let age = std::time::SystemTime::now().duration_since(modified).ok()?;
        i64::try_from(age.as_secs()).ok()
    }

    /// The list now, re-read first when the file changed.
    pub fn current(&self) -> std::sync::Arc<StatusList> {
        self.current_within(Self::RECHECK)
    }

    /// [`StatusSource::current`], looking at the file if it was last looked at `recheck` ago.
    pub fn current_within(&self, recheck: std::time::Duration) -> std::sync::Arc<StatusList> {
        use crate::sync::Unpoisoned;
        use std::sync::atomic::Ordering;
        let (list, stamp) = {
            let state = self.state.read().unpoisoned();
            if self.path.is_none() || state.checked.elapsed() < recheck {
                return state.list.clone();
            }
            (state.list.clone(), state.stamp)
        };
        let (Some(path), false) = (&self.path, self.looking.swap(true, Ordering::AcqRel)) else {
            return list;
        };
        let fresh = match Self::stamp(path) {
            Ok(now) if now.is_some() && now == stamp => None,
            Ok(_) => match Self::read(path) {
                Ok(read) => Some(read),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e,
                        "attestation status list unreadable; keeping the last one read");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "attestation status list file is gone or unreadable; keeping the last one read");
                None
            }
        };
        let mut state = self.state.write().unpoisoned();
        state.checked = std::time::Instant::now();
        if let Some((list, stamp)) = fresh {
            tracing::info!(path = %path.display(), entries = list.len(), "attestation status list reloaded");
            state.list = std::sync::Arc::new(list);
            state.stamp = stamp;
            state.modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        }
        let list = state.list.clone();
        drop(state);
        self.looking.store(false, Ordering::Release);
        list
    }
}

/// The status list: lowercase hex serial → status (`REVOKED`, `SUSPENDED`).
#[derive(Debug, Clone, Default)]
pub struct StatusList(HashMap<String, String>);

impl StatusList {
    /// Parses Google's JSON status format: `{"entries": {"<hex serial>": {"status": ...}}}`.
    pub fn parse(text: &[u8]) -> std::result::Result<StatusList, String> {
        #[derive(Deserialize)]
        struct Entry {
            status: String,
        }
        #[derive(Deserialize)]
        struct File {
            entries: HashMap<String, Entry>,
        }
        let file: File = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        Ok(StatusList(
            file.entries
                .into_iter()
                .map(|(serial, entry)| (chain::normalise_status_key(&serial), entry.status))
                .collect(),
        ))
    }

    pub fn get(&self, serial_hex: &str) -> Option<&str> {
        self.0.get(serial_hex).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
