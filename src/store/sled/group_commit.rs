//! Group commit: makes sled's writes durable with one `fdatasync` shared by every writer
//! that is waiting at the time.
//!
//! sled 0.34's `flush()` ends in `sync_file_range`, which survives a process crash but not a
//! power cut. So after flushing, the leader calls `sync_data` on sled's log file. Writers that
//! arrive while a sync runs wait for the next one, which covers all of them: under load the
//! number of syncs grows with time, not with the number of writes.

use crate::sync::Unpoisoned;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct State {
    /// Tickets handed out; a ticket is taken after its writer's change is in sled.
    requested: u64,
    /// Every ticket up to this one is on stable storage.
    synced: u64,
    leader_active: bool,
    /// Set on the first failed sync. After an fsync failure the page cache state is unknown,
    /// so every later write is refused rather than acknowledged on a guess.
    failed: Option<String>,
}

/// Shared durability barrier for one sled database.
pub struct GroupCommit {
    db: sled::Db,
    log_file: File,
    state: Mutex<State>,
    done: Condvar,
    syncs: AtomicU64,
}

impl GroupCommit {
    /// Opens sled's log file (`<dir>/db`) for syncing.
    pub fn new(db: sled::Db, dir: &Path) -> Result<Self> {
        let log_file = File::open(dir.join("db"))
            .map_err(|e| Error::internal(format!("opening {}/db: {e}", dir.display())))?;
        Ok(GroupCommit {
            db,
            log_file,
            state: Mutex::new(State::default()),
            done: Condvar::new(),
            syncs: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent (plain counters).
        self.state.lock().unpoisoned()
    }

    /// Returns once every write this thread completed before the call is on stable storage.
    pub fn sync(&self) -> Result<()> {
        let mut state = self.lock();
        state.requested += 1;
        let ticket = state.requested;
        loop {
            if let Some(failure) = &state.failed {
                return Err(Error::internal(format!(
                    "storage sync failed earlier: {failure}"
                )));
            }
            if state.synced >= ticket {
                return Ok(());
            }
            if state.leader_active {
                state = self.done.wait(state).unpoisoned();
                continue;
            }
            state.leader_active = true;
            let target = state.requested;
            drop(state);
            let result = self.sync_now();
            state = self.lock();
            state.leader_active = false;
            match result {
                Ok(()) => state.synced = state.synced.max(target),
                Err(e) => state.failed = Some(e.to_string()),
            }
            self.done.notify_all();
        }
    }

    fn sync_now(&self) -> Result<()> {
        self.db.flush()?;
        self.log_file.sync_data()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many syncs ran; with concurrent writers, fewer than the writes.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}
