//! The data directory holds intents, customer ids and the ledger: it is created 0700, every
//! file payra writes is 0600 (the process's umask is set to 077 at start), and a directory or
//! file that other local users can read refuses the start unless the operator insists.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How deep the check looks below the data directory (sled's blobs, the decision log).
const CHECK_DEPTH: usize = 2;

/// Makes files and directories this process creates from now on private to its user.
pub fn restrict_new_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Creates `dir` (mode 0700) if it is missing, and checks that nothing in it is open to the
/// group or others. With `allow_readable`, such a finding is a warning instead of a refusal.
pub fn prepare(dir: &Path, allow_readable: bool) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        return Ok(());
    }
    let Some((path, mode)) = first_open_to_others(dir, CHECK_DEPTH)? else {
        return Ok(());
    };
    let message = format!(
        "{} has mode {mode:o}: the data directory holds payment intents and customer ids, and \
         other local users can read this. Run `chmod -R go-rwx {}`, or set \
         allow_readable_data = true to start anyway",
        path.display(),
        dir.display()
    );
    if allow_readable {
        tracing::warn!("{message}");
        Ok(())
    } else {
        Err(Error::FailedPrecondition(message))
    }
}

/// The first path at or below `path` (down to `depth` levels) with a group or other
/// permission bit, and its mode.
fn first_open_to_others(path: &Path, depth: usize) -> Result<Option<(PathBuf, u32)>> {
    let metadata = std::fs::symlink_metadata(path)?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 && !metadata.file_type().is_symlink() {
        return Ok(Some((path.to_path_buf(), mode)));
    }
    if metadata.is_dir() && depth > 0 {
        for entry in std::fs::read_dir(path)? {
            if let Some(found) = first_open_to_others(&entry?.path(), depth - 1)? {
                return Ok(Some(found));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_is_private_and_a_readable_one_refuses_the_start() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        prepare(&dir, false).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        prepare(&dir, false).unwrap();

        let log = dir.join("decisions");
        std::fs::create_dir(&log).unwrap();
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = log.join("00000000000000000001.log");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = prepare(&dir, false).unwrap_err();
        assert!(
            err.to_string().contains("00000000000000000001.log"),
            "{err}"
        );
        assert!(err.to_string().contains("644"), "{err}");
        prepare(&dir, true).expect("insisting starts anyway");

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = prepare(&dir, false).unwrap_err();
        assert!(err.to_string().contains("755"), "{err}");
    }
}
