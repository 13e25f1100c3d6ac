//! Reading a stopped server's database without changing it. sled has no read-only mode:
//! opening a database may recover its log, write a snapshot, and payra's open replays the
//! issuance journal and builds missing summaries. So the offline commands (`payra audit
//! verify`, `audit tail`) open a private copy, and the data directory is never written.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::SledStore;
use crate::error::{Error, Result};

/// A copy of a database, opened; the copy is deleted when this is dropped.
pub struct StoreCopy {
    store: Option<SledStore>,
    dir: PathBuf,
}

impl std::ops::Deref for StoreCopy {
    type Target = SledStore;
    fn deref(&self) -> &SledStore {
        // Set in `open_copy` and taken only in `drop`.
        self.store
            .as_ref()
            .unwrap_or_else(|| unreachable!("store taken before drop"))
    }
}

impl Drop for StoreCopy {
    fn drop(&mut self) {
        drop(self.store.take());
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove the database copy");
        }
    }
}

fn copy_tree(from: &Path, to: &Path, skip: &[&str]) -> Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &to.join(&name), &[])?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), to.join(&name))?;
        }
    }
    Ok(())
}

/// Opens a private copy of the database in `data` (the decision log is not copied: it is read
/// in place, read-only). Refuses a directory without a database.
pub fn open_copy(data: &Path) -> Result<StoreCopy> {
    if !data.join("db").exists() {
        return Err(Error::FailedPrecondition(format!(
            "{} holds no payra database",
            data.display()
        )));
    }
    let dir = std::env::temp_dir().join(format!(
        "payra-readonly-{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 8]>())
    ));
    if let Err(e) = copy_tree(data, &dir, &["decisions"]) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    match SledStore::open(&dir) {
        Ok(store) => Ok(StoreCopy {
            store: Some(store),
            dir,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}
